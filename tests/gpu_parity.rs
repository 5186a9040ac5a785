//! One parity test body on every device the engine can drive: the CPU always, and where a
//! usable GPU exists each GPU alone and (with two or more) a group of two with the layers
//! split across them. Over every golden case: distances within 2e-5 of the reference's
//! (1e-4 for bf16 models, whose own rounding is 8 times coarser), the same valid set, the
//! same proofs when the device filters on r_target itself, and the logits of the last
//! position within the golden tolerance or one unit of the dtype's last place.
//!
//! Without a GPU the CUDA part is skipped with the reason printed (run with --nocapture to
//! see it).

mod common;

use common::*;
use llama_pow::backend::batch;
use llama_pow::backend::cpu::CpuBackend;
use llama_pow::backend::cuda::{self, CudaBackend, GpuInfo};
use llama_pow::backend::{Backend, JobSpec};
use llama_pow::pow::dtype::Dtype;
use llama_pow::pow::request::parse_params;
use std::sync::{Arc, OnceLock};

/// Distance tolerance against the reference.
fn dist_tolerance(dtype: Dtype) -> f64 {
    match dtype {
        Dtype::Bf16 => 1e-4,
        _ => 2e-5,
    }
}

/// The GPUs of this machine as devices to test, brought up once for the whole binary; or
/// why there are none.
fn gpu_devices() -> &'static Result<Vec<Arc<dyn Backend>>, String> {
    static DEVICES: OnceLock<Result<Vec<Arc<dyn Backend>>, String>> = OnceLock::new();
    DEVICES.get_or_init(|| {
        let gpus: Vec<GpuInfo> = cuda::cuda_available().map_err(|e| e.to_string())?;
        let mut devices: Vec<Arc<dyn Backend>> = Vec::new();
        let mut opened = Vec::new();
        for g in &gpus {
            let d = CudaBackend::open(std::slice::from_ref(g)).map_err(|e| e.to_string())?;
            opened.push(d.gpus()[0].clone());
            devices.push(Arc::new(d));
        }
        if opened.len() >= 2 {
            devices.push(Arc::new(CudaBackend::from_gpus(opened[..2].to_vec())));
        }
        Ok(devices)
    })
}

/// Every device to run the parity body on.
fn devices_under_test() -> Vec<Arc<dyn Backend>> {
    let mut devices: Vec<Arc<dyn Backend>> = vec![Arc::new(CpuBackend::new())];
    match gpu_devices() {
        Ok(gpus) => devices.extend(gpus.iter().cloned()),
        Err(why) => eprintln!("CUDA part skipped: {why}"),
    }
    devices
}

fn check_case_on(device: &dyn Backend, name: &str) {
    let case = load(&format!("{name}.json"));
    let params = parse_params(&case["params"]).unwrap();
    let dtype: Dtype = str_of(&case["dtype"]).parse().unwrap();
    let bh = str_of(&case["block_hash"]);
    let pk = str_of(&case["public_key"]);
    let nonces = u64s(&case["nonces"]);
    let r_target = case["r_target"].as_f64().unwrap();
    let tol = dist_tolerance(dtype);
    let dev = device.name();

    device.check(&params, dtype).unwrap();
    let model = device.build_model(bh, &params, dtype).unwrap();
    let job = JobSpec::new(bh, pk, &params, dtype, r_target);

    // Logits of the last position.
    let prepared = batch::prepare(&job, nonces.clone());
    let logits = device
        .forward_last_logits(&model, &prepared.inputs, nonces.len())
        .unwrap();
    let vocab = params.vocab_usize();
    let logit_tol: f64 = if dtype == Dtype::Bf16 { 1e-4 } else { 1e-5 };
    let mut max_logit = 0f64;
    for (i, want) in case["last_token_logits"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        for (j, (&g, &w)) in logits[i * vocab..(i + 1) * vocab]
            .iter()
            .zip(&f64s(want))
            .enumerate()
        {
            let d = (g as f64 - w).abs();
            max_logit = max_logit.max(d);
            let allowed = logit_tol.max(ulp(dtype, w));
            assert!(
                d <= allowed,
                "{name} on {dev}: nonce {i} logit {j}: {g} vs {w} (|diff| {d:e} > {allowed:e})"
            );
        }
    }

    // Every distance, through the device's own tail.
    let r = device
        .run_batch(&model, &job, batch::prepare(&job, nonces.clone()), true)
        .unwrap();
    assert_eq!(r.nonces, nonces, "{name} on {dev}: nonces in batch order");
    let r_dist = r.distances().expect("every distance");
    let want_dist = f64s(&case["dist"]);
    let mut max_dist = 0f64;
    for (i, (&g, &w)) in r_dist.iter().zip(&want_dist).enumerate() {
        let d = (g - w).abs();
        max_dist = max_dist.max(d);
        assert!(
            d <= tol,
            "{name} on {dev}: nonce {} dist {g} vs {w} (|diff| {d:e} > {tol:e})",
            nonces[i]
        );
    }
    let want_valid = u64s(&case["valid_nonces"]);
    assert_eq!(r.valid_nonces, want_valid, "{name} on {dev}: valid set");

    // Only the proofs, filtered where the device filters.
    let v = device
        .run_batch(&model, &job, batch::prepare(&job, nonces.clone()), false)
        .unwrap();
    assert_eq!(v.nonces, nonces);
    assert_eq!(
        v.valid_nonces, r.valid_nonces,
        "{name} on {dev}: filtered proofs"
    );
    assert_eq!(
        v.valid_dist, r.valid_dist,
        "{name} on {dev}: filtered distances"
    );

    // A batch of one, and a batch larger than the first (scratch buffers regrown), agree
    // with the full batch (within the tolerance: cuBLASLt may pick another algorithm, and
    // so another f32 summation order, for another number of rows).
    let one = device
        .run_batch(&model, &job, batch::prepare(&job, vec![nonces[0]]), true)
        .unwrap();
    let one = one.distances().expect("every distance");
    assert!(
        (one[0] - r_dist[0]).abs() <= tol,
        "{name} on {dev}: batch of one {} vs {}",
        one[0],
        r_dist[0]
    );
    let mut twice = nonces.clone();
    twice.extend(nonces.iter().map(|n| n.wrapping_add(1_000_003)));
    let big = device
        .run_batch(&model, &job, batch::prepare(&job, twice), true)
        .unwrap();
    for (a, b) in big.distances().expect("every distance").iter().zip(r_dist) {
        assert!(
            (a - b).abs() <= tol,
            "{name} on {dev}: larger batch {a} vs {b}"
        );
    }

    eprintln!("{name} on {dev}: max |logit diff| {max_logit:.3e}, max |dist diff| {max_dist:.3e}");
}

fn check_case(name: &str) {
    for d in devices_under_test() {
        check_case_on(d.as_ref(), name);
    }
}

macro_rules! parity_cases {
    ($($test:ident => $name:literal),* $(,)?) => {
        $( #[test] fn $test() { check_case($name); } )*
    };
}

parity_cases! {
    tiny_f32 => "tiny_f32",
    tiny_f16 => "tiny_f16",
    tiny_bf16 => "tiny_bf16",
    gqa_scaled_rope_f32 => "gqa_scaled_rope_f32",
    gqa_scaled_rope_f16 => "gqa_scaled_rope_f16",
    v2_shaped_f32 => "v2_shaped_f32",
    v2_shaped_f16 => "v2_shaped_f16",
    v2_shaped_bf16 => "v2_shaped_bf16",
    deep64_f32 => "deep64_f32",
    deep64_f16 => "deep64_f16",
    seq1_bignonce_f16 => "seq1_bignonce_f16",
}

#[test]
fn every_golden_case_is_covered() {
    // Keep the list above in step with the golden files.
    let src = include_str!("gpu_parity.rs");
    for name in MODEL_CASES {
        assert!(
            src.contains(&format!("=> \"{name}\"")),
            "{name} is not tested"
        );
    }
}

#[test]
fn gpu_and_cpu_agree_on_every_distance() {
    // Device against device, beyond the golden nonces: 64 nonces of the V2-shaped f16 case.
    let gpus = match gpu_devices() {
        Ok(g) if !g.is_empty() => g,
        Ok(_) => return,
        Err(why) => {
            eprintln!("skipped: {why}");
            return;
        }
    };
    let case = load("v2_shaped_f16.json");
    let params = parse_params(&case["params"]).unwrap();
    let (bh, pk) = (str_of(&case["block_hash"]), str_of(&case["public_key"]));
    let job = JobSpec::new(bh, pk, &params, Dtype::F16, 1.4);
    let nonces: Vec<u64> = (0..64).map(|i| 7 * i + 3).collect();
    let cpu = CpuBackend::new();
    let cm = cpu.build_model(bh, &params, Dtype::F16).unwrap();
    let want = cpu
        .run_batch(&cm, &job, batch::prepare(&job, nonces.clone()), true)
        .unwrap();
    for g in gpus {
        let gm = g.build_model(bh, &params, Dtype::F16).unwrap();
        let got = g
            .run_batch(&gm, &job, batch::prepare(&job, nonces.clone()), true)
            .unwrap();
        let max = got
            .distances()
            .expect("every distance")
            .iter()
            .zip(want.distances().expect("every distance"))
            .map(|(a, b)| (a - b).abs())
            .fold(0f64, f64::max);
        eprintln!(
            "v2_shaped_f16, 64 nonces, {} vs cpu: max |dist diff| {max:.3e}",
            g.name()
        );
        assert!(max <= 2e-5, "{}: {max:e}", g.name());
    }
}

#[test]
fn fp8_tracks_the_f16_reference_where_the_gpu_has_it_and_is_refused_elsewhere() {
    // The V2-shaped case: every product's sizes are multiples of 16.
    let case = load("v2_shaped_f16.json");
    let mut params = parse_params(&case["params"]).unwrap();
    params.use_fp8 = true;
    let (bh, pk) = (str_of(&case["block_hash"]), str_of(&case["public_key"]));
    let nonces = u64s(&case["nonces"]);
    let want = f64s(&case["dist"]);
    // The CPU has no FP8: a clear refusal, never f16 in its place.
    let e = CpuBackend::new().check(&params, Dtype::F16).unwrap_err();
    assert!(e.to_string().contains("use_fp8"), "{e}");
    let gpus = match gpu_devices() {
        Ok(g) => g,
        Err(why) => {
            eprintln!("CUDA part skipped: {why}");
            return;
        }
    };
    for g in gpus {
        if let Err(e) = g.check(&params, Dtype::F16) {
            eprintln!("{}: FP8 refused: {e}", g.name());
            assert!(e.to_string().contains("use_fp8"), "{e}");
            continue;
        }
        let m = g.build_model(bh, &params, Dtype::F16).unwrap();
        let job = JobSpec::new(bh, pk, &params, Dtype::F16, 1.4);
        let r = g
            .run_batch(&m, &job, batch::prepare(&job, nonces.clone()), true)
            .unwrap();
        let dist = r.distances().expect("every distance");
        let max = dist
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f64, f64::max);
        eprintln!(
            "v2_shaped in FP8 on {}: max |dist diff| to the f16 reference {max:.3e}",
            g.name()
        );
        // FP8 is a coarser arithmetic, not a different computation: distances stay near
        // the reference's (they spread about 0.01 around sqrt(2)); garbage (a wrong scale,
        // NaN) lands far away.
        assert!(dist.iter().all(|d| d.is_finite()));
        assert!(max < 5e-3, "{}: {max:e}", g.name());
    }
}

#[test]
fn cuda_graphs_replay_the_same_distances() {
    let gpus = match cuda::cuda_available() {
        Ok(g) => g,
        Err(why) => {
            eprintln!("skipped: {why}");
            return;
        }
    };
    let case = load("v2_shaped_f16.json");
    let params = parse_params(&case["params"]).unwrap();
    let (bh, pk) = (str_of(&case["block_hash"]), str_of(&case["public_key"]));
    let job = JobSpec::new(bh, pk, &params, Dtype::F16, 1.4);
    let nonces: Vec<u64> = (0..24).collect();
    let plain = CudaBackend::open(&gpus[..1]).unwrap();
    let graphs = CudaBackend::open(&gpus[..1]).unwrap().with_graphs(true);
    let pm = plain.build_model(bh, &params, Dtype::F16).unwrap();
    let gm = graphs.build_model(bh, &params, Dtype::F16).unwrap();
    let want = plain
        .run_batch(&pm, &job, batch::prepare(&job, nonces.clone()), true)
        .unwrap();
    // The first call runs directly, the second captures the graph, the next ones replay
    // it; other nonces through the same graph must come out as without it too.
    for round in 0..3u64 {
        let shifted: Vec<u64> = nonces.iter().map(|n| n + 1000 * round).collect();
        let base = plain
            .run_batch(&pm, &job, batch::prepare(&job, shifted.clone()), true)
            .unwrap();
        let got = graphs
            .run_batch(&gm, &job, batch::prepare(&job, shifted), true)
            .unwrap();
        assert_eq!(got.dist, base.dist, "round {round}");
    }
    let again = graphs
        .run_batch(&gm, &job, batch::prepare(&job, nonces), true)
        .unwrap();
    assert_eq!(again.dist, want.dist);
    // Four batches of one size: the first ran directly (plans built, kernels loaded), the
    // second was captured, the last two replayed the graph. Distances that agree prove
    // nothing if no graph ever ran.
    let counts = graphs.graph_counts();
    assert_eq!(
        (counts.captures, counts.replays, counts.fallbacks),
        (1, 2, 0),
        "{counts:?}"
    );
    assert_eq!(plain.graph_counts(), Default::default());
    eprintln!(
        "CUDA graphs on {}: identical distances, {counts:?}",
        plain.name()
    );
}
