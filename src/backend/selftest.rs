//! The start-up self-test: before a server says it is ready, every device computes a few
//! nonces of golden cases embedded in the binary and compares their distances with the
//! reference's own (the Python/PyTorch reference's outputs in `tests/golden/`, which a test
//! keeps this table in step with). A device whose distances are off by more than the parity
//! tolerance, or whose proofs differ from the reference's, is not used: validators recompute
//! every proof, and a device that computes wrong distances would cost the miner everything
//! it sends. The CPU runs it too (it guards the CPU's own fast matrix products).
//!
//! What runs: the tiny and V2-shaped cases in f16 (the dtype validators recompute) on every
//! device, plus the same cases in the served dtype when it is bf16 or f32, and the V2-shaped
//! case with FP8 products when the server runs FP8 (against the f16 reference, within the
//! FP8 bound). Each case is one batch of four nonces computed twice, once with every
//! distance back (compared nonce by nonce with the reference) and once with only the proofs
//! (the r_target filter as the server runs it: the same valid nonces as the reference's).
//!
//! [`run_on`] tests one device; [`select`] tests every device side by side, keeps those that
//! pass and refuses when none does; `llama-pow selftest` prints the report.

use crate::backend::batch;
use crate::backend::{Backend, JobSpec};
use crate::pow::dtype::Dtype;
use crate::pow::params::Params;
use crate::pow::proof;
use crate::telemetry::{DeviceSelfTest, SelfTestStatus};
use serde::Serialize;
use std::sync::Arc;
use std::time::Instant;

/// Distance tolerance against the reference for f16 and f32 models: the GPU parity tests'.
pub const TOLERANCE: f64 = 2e-5;
/// For bf16 models, whose own rounding is 8 times coarser (the parity tests' too).
pub const TOLERANCE_BF16: f64 = 1e-4;
/// For FP8 products against the f16 reference: the bound the GPU parity test puts on FP8
/// (`tests/gpu_parity.rs`), not yet measured on a GPU. The chosen nonces lie at least
/// 0.0086 from r_target, so the valid set is still compared exactly.
pub const TOLERANCE_FP8: f64 = 5e-3;

/// What a server computes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Served {
    pub dtype: Dtype,
    /// FP8 matrix products (f16 activations).
    pub fp8: bool,
}

/// A few nonces of one golden case, with the reference's distances.
#[derive(Debug, Clone)]
pub struct GoldenCase {
    /// The golden file's name, without `.json`.
    pub name: &'static str,
    pub dtype: Dtype,
    pub params: Params,
    pub block_hash: &'static str,
    pub public_key: &'static str,
    pub r_target: f64,
    pub nonces: &'static [u64],
    pub dist: &'static [f64],
}

const TINY_PARAMS: Params = Params {
    dim: 64,
    n_layers: 2,
    n_heads: 4,
    n_kv_heads: 4,
    vocab_size: 100,
    ffn_dim_multiplier: 1.3,
    multiple_of: 32,
    norm_eps: 1e-05,
    rope_theta: 10000.0,
    use_scaled_rope: false,
    seq_len: 8,
    use_fp8: false,
};

const V2_SHAPED_PARAMS: Params = Params {
    dim: 224,
    n_layers: 2,
    n_heads: 8,
    n_kv_heads: 8,
    vocab_size: 8196,
    ffn_dim_multiplier: 10.0,
    multiple_of: 8192,
    norm_eps: 1e-05,
    rope_theta: 10000.0,
    use_scaled_rope: false,
    seq_len: 32,
    use_fp8: false,
};

/// Four nonces of each golden case: two proofs and two not, each at least 0.0086 from
/// r_target (so that no tolerance below that flips one), with the reference's distances.
pub const GOLDEN_CASES: &[GoldenCase] = &[
    GoldenCase {
        name: "tiny_f16",
        dtype: Dtype::F16,
        params: TINY_PARAMS,
        block_hash: "5f1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8",
        public_key: "gonka1qyqszqgpqyqszqgpqyqszqgpqyqszqgpj5v2rx",
        r_target: 1.4,
        nonces: &[5, 8, 0, 6],
        dist: &[
            1.313628573118527,
            1.260452023672119,
            1.5144592763825242,
            1.5429924058983995,
        ],
    },
    GoldenCase {
        name: "tiny_bf16",
        dtype: Dtype::Bf16,
        params: TINY_PARAMS,
        block_hash: "5f1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8",
        public_key: "gonka1qyqszqgpqyqszqgpqyqszqgpqyqszqgpj5v2rx",
        r_target: 1.4,
        nonces: &[5, 8, 0, 6],
        dist: &[
            1.3138558031056093,
            1.2607241561851061,
            1.5147268157626201,
            1.5430268138722762,
        ],
    },
    GoldenCase {
        name: "tiny_f32",
        dtype: Dtype::F32,
        params: TINY_PARAMS,
        block_hash: "5f1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8",
        public_key: "gonka1qyqszqgpqyqszqgpqyqszqgpqyqszqgpj5v2rx",
        r_target: 1.4,
        nonces: &[5, 8, 0, 6],
        dist: &[
            1.313673604581947,
            1.2604591457811312,
            1.514498644082784,
            1.5430200894825155,
        ],
    },
    GoldenCase {
        name: "v2_shaped_f16",
        dtype: Dtype::F16,
        params: V2_SHAPED_PARAMS,
        block_hash: "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        public_key: "gonka1validatorkeyexample000000000000000000",
        r_target: 1.414,
        nonces: &[2, 12, 1, 8],
        dist: &[
            1.4051383965365176,
            1.402789686499333,
            1.4272590890441728,
            1.4263762735463852,
        ],
    },
    GoldenCase {
        name: "v2_shaped_bf16",
        dtype: Dtype::Bf16,
        params: V2_SHAPED_PARAMS,
        block_hash: "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        public_key: "gonka1validatorkeyexample000000000000000000",
        r_target: 1.414,
        nonces: &[2, 12, 1, 8],
        dist: &[
            1.4052389269743006,
            1.4027701445699976,
            1.4272929763493776,
            1.4263522419506014,
        ],
    },
    GoldenCase {
        name: "v2_shaped_f32",
        dtype: Dtype::F32,
        params: V2_SHAPED_PARAMS,
        block_hash: "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        public_key: "gonka1validatorkeyexample000000000000000000",
        r_target: 1.414,
        nonces: &[2, 12, 1, 8],
        dist: &[
            1.4051407846147173,
            1.4027953370375816,
            1.4272615678982339,
            1.4263736308053843,
        ],
    },
];

/// The case of `name` in the table.
fn golden(name: &str) -> &'static GoldenCase {
    GOLDEN_CASES
        .iter()
        .find(|c| c.name == name)
        .expect("the self-test's cases are in the table")
}

/// One check of the self-test: a golden case, in FP8 or not, and its tolerance.
#[derive(Debug, Clone)]
pub struct Check {
    /// `tiny_f16`, ..., or `v2_shaped_fp8` for the FP8 products.
    pub name: String,
    pub case: &'static GoldenCase,
    pub fp8: bool,
    pub tolerance: f64,
}

/// The checks a server that computes in `served` runs on each device.
pub fn checks_for(served: Served) -> Vec<Check> {
    let check = |name: &str, fp8: bool, tolerance: f64| Check {
        name: if fp8 {
            "v2_shaped_fp8".to_string()
        } else {
            name.to_string()
        },
        case: golden(name),
        fp8,
        tolerance,
    };
    let mut out = vec![
        check("tiny_f16", false, TOLERANCE),
        check("v2_shaped_f16", false, TOLERANCE),
    ];
    match served.dtype {
        Dtype::F16 => {}
        Dtype::Bf16 => {
            out.push(check("tiny_bf16", false, TOLERANCE_BF16));
            out.push(check("v2_shaped_bf16", false, TOLERANCE_BF16));
        }
        Dtype::F32 => {
            out.push(check("tiny_f32", false, TOLERANCE));
            out.push(check("v2_shaped_f32", false, TOLERANCE));
        }
    }
    if served.fp8 {
        out.push(check("v2_shaped_f16", true, TOLERANCE_FP8));
    }
    out
}

/// One check's result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CaseResult {
    pub case: String,
    pub nonces: usize,
    /// The largest |distance - reference| over the nonces (NaN when the case did not run).
    pub max_abs_diff: f64,
    pub tolerance: f64,
    pub passed: bool,
    /// What was wrong: the nonce and both distances, a differing valid set, or the error
    /// that stopped the case.
    pub failure: Option<String>,
}

/// One device's self-test.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceReport {
    pub device: String,
    pub passed: bool,
    pub cases: Vec<CaseResult>,
    pub max_abs_diff: f64,
    pub seconds: f64,
}

impl DeviceReport {
    /// The first failure, prefixed with its case.
    pub fn failure(&self) -> Option<String> {
        self.cases
            .iter()
            .find_map(|c| c.failure.as_ref().map(|f| format!("{}: {f}", c.case)))
    }
}

/// Run every check of `served` on `device`.
pub fn run_on(device: &dyn Backend, served: Served) -> DeviceReport {
    let started = Instant::now();
    let cases: Vec<CaseResult> = checks_for(served)
        .iter()
        .map(|c| run_check(device, c))
        .collect();
    let max_abs_diff = cases.iter().map(|c| c.max_abs_diff).fold(0.0, f64::max);
    DeviceReport {
        device: device.name(),
        passed: cases.iter().all(|c| c.passed),
        max_abs_diff,
        seconds: started.elapsed().as_secs_f64(),
        cases,
    }
}

/// One check on one device: the nonces with every distance, then with only the proofs.
fn run_check(device: &dyn Backend, check: &Check) -> CaseResult {
    let c = check.case;
    let mut result = CaseResult {
        case: check.name.clone(),
        nonces: c.nonces.len(),
        max_abs_diff: f64::NAN,
        tolerance: check.tolerance,
        passed: false,
        failure: None,
    };
    match compare(device, check) {
        Ok(max) => {
            result.max_abs_diff = max;
            result.passed = true;
        }
        Err((max, why)) => {
            result.max_abs_diff = max;
            result.failure = Some(why);
        }
    }
    result
}

/// The largest difference, or it (NaN when nothing was computed) and what was wrong.
fn compare(device: &dyn Backend, check: &Check) -> Result<f64, (f64, String)> {
    let c = check.case;
    let mut params = c.params.clone();
    params.use_fp8 = check.fp8;
    let stopped = |what: &str, e: &dyn std::fmt::Display| (f64::NAN, format!("{what}: {e}"));
    device
        .check(&params, c.dtype)
        .map_err(|e| stopped("refused", &e))?;
    let model = device
        .build_model(c.block_hash, &params, c.dtype)
        .map_err(|e| stopped("building the model failed", &e))?;
    let job = JobSpec::new(c.block_hash, c.public_key, &params, c.dtype, c.r_target);
    let nonces = c.nonces.to_vec();
    let want_valid: Vec<u64> = c
        .nonces
        .iter()
        .zip(c.dist)
        .filter(|(_, &d)| proof::is_valid(d, c.r_target))
        .map(|(&n, _)| n)
        .collect();

    let all = device
        .run_batch(&model, &job, batch::prepare(&job, nonces.clone()), true)
        .map_err(|e| stopped("the batch failed", &e))?;
    let got = all
        .distances()
        .filter(|d| d.len() == nonces.len())
        .ok_or_else(|| {
            (
                f64::NAN,
                "the device did not return every distance".to_string(),
            )
        })?;
    let mut max = 0f64;
    let mut first_off = None;
    for ((&n, &g), &w) in nonces.iter().zip(got).zip(c.dist) {
        let diff = (g - w).abs();
        // NaN compares false everywhere: count it as the largest difference there is.
        let diff = if diff.is_nan() { f64::INFINITY } else { diff };
        max = max.max(diff);
        if diff > check.tolerance && first_off.is_none() {
            first_off = Some(format!(
                "nonce {n}: distance {g} against the reference's {w} (|diff| {diff:.2e} > \
                 {:.0e})",
                check.tolerance
            ));
        }
    }
    if let Some(why) = first_off {
        return Err((max, why));
    }
    if all.valid_nonces != want_valid {
        return Err((
            max,
            format!(
                "valid nonces {:?} against the reference's {want_valid:?} at r_target {}",
                all.valid_nonces, c.r_target
            ),
        ));
    }
    let proofs = device
        .run_batch(&model, &job, batch::prepare(&job, nonces), false)
        .map_err(|e| (max, format!("the batch of proofs failed: {e}")))?;
    if proofs.valid_nonces != want_valid {
        return Err((
            max,
            format!(
                "the r_target filter kept {:?}, the reference's proofs are {want_valid:?}",
                proofs.valid_nonces
            ),
        ));
    }
    for (&n, &g) in proofs.valid_nonces.iter().zip(&proofs.valid_dist) {
        let i = c.nonces.iter().position(|&m| m == n).unwrap_or(0);
        let (w, diff) = (c.dist[i], (g - c.dist[i]).abs());
        if diff.is_nan() || diff > check.tolerance {
            return Err((
                max.max(diff),
                format!("proof {n}: distance {g} against the reference's {w}"),
            ));
        }
    }
    Ok(max)
}

/// Run the self-test on every device side by side; keep the devices that pass, in order,
/// with the status to report. Each device that fails is logged with its case, nonce and both
/// distances and left out; when none passes, the error says why for each.
pub fn select(
    devices: Vec<Arc<dyn Backend>>,
    served: Served,
) -> Result<(Vec<Arc<dyn Backend>>, SelfTestStatus), String> {
    let started = Instant::now();
    let reports: Vec<DeviceReport> = std::thread::scope(|s| {
        let running: Vec<_> = devices
            .iter()
            .map(|d| s.spawn(move || run_on(d.as_ref(), served)))
            .collect();
        running
            .into_iter()
            .zip(&devices)
            .map(|(h, d)| {
                h.join().unwrap_or_else(|_| DeviceReport {
                    device: d.name(),
                    passed: false,
                    cases: vec![CaseResult {
                        case: "(all)".into(),
                        nonces: 0,
                        max_abs_diff: f64::NAN,
                        tolerance: 0.0,
                        passed: false,
                        failure: Some("the self-test panicked".into()),
                    }],
                    max_abs_diff: f64::NAN,
                    seconds: 0.0,
                })
            })
            .collect()
    });
    let seconds = started.elapsed().as_secs_f64();
    let mut kept = Vec::new();
    let mut failures = Vec::new();
    for (d, r) in devices.into_iter().zip(&reports) {
        if r.passed {
            tracing::info!(
                "self-test passed on {}: {} golden cases, largest |distance difference| {:.1e}, \
                 {:.2} s",
                r.device,
                r.cases.len(),
                r.max_abs_diff,
                r.seconds
            );
            kept.push(d);
        } else {
            let why = r.failure().unwrap_or_default();
            tracing::warn!(
                "self-test failed on {}: {why}; {} is not used",
                r.device,
                r.device
            );
            failures.push(format!("{}: {why}", r.device));
        }
    }
    if kept.is_empty() {
        return Err(format!(
            "the start-up self-test failed on every device ({})",
            failures.join("; ")
        ));
    }
    Ok((kept, status(&reports, seconds)))
}

/// The status /health and /metrics report: the devices that serve all passed.
pub fn status(reports: &[DeviceReport], seconds: f64) -> SelfTestStatus {
    SelfTestStatus {
        passed: reports.iter().any(|r| r.passed),
        cases: reports.iter().map(|r| r.cases.len()).sum(),
        max_abs_diff: reports
            .iter()
            .filter(|r| r.passed)
            .map(|r| r.max_abs_diff)
            .fold(0.0, f64::max),
        seconds,
        devices: reports
            .iter()
            .map(|r| DeviceSelfTest {
                device: r.device.clone(),
                passed: r.passed,
                cases: r.cases.len(),
                max_abs_diff: r.max_abs_diff,
                failure: r.failure(),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::backend::{BackendError, BatchResult, Model, PreparedBatch};
    use serde_json::Value;

    /// The golden file of a case.
    fn golden_file(name: &str) -> Value {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden")
            .join(format!("{name}.json"));
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
    }

    #[test]
    fn the_embedded_cases_are_the_golden_files() {
        for c in GOLDEN_CASES {
            let g = golden_file(c.name);
            let params: Params = serde_json::from_value(g["params"].clone()).unwrap();
            assert_eq!(c.params, params, "{}", c.name);
            let dtype = match g["dtype"].as_str().unwrap() {
                "float16" => Dtype::F16,
                "bfloat16" => Dtype::Bf16,
                "float32" => Dtype::F32,
                other => panic!("{other}"),
            };
            assert_eq!(c.dtype, dtype, "{}", c.name);
            assert_eq!(c.block_hash, g["block_hash"].as_str().unwrap());
            assert_eq!(c.public_key, g["public_key"].as_str().unwrap());
            assert_eq!(
                c.r_target.to_bits(),
                g["r_target"].as_f64().unwrap().to_bits()
            );
            let nonces: Vec<u64> = g["nonces"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n.as_u64().unwrap())
                .collect();
            let valid: Vec<u64> = g["valid_nonces"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n.as_u64().unwrap())
                .collect();
            assert_eq!(c.nonces.len(), c.dist.len());
            let (mut proofs, mut others) = (0, 0);
            for (&n, &d) in c.nonces.iter().zip(c.dist) {
                let i = nonces.iter().position(|&m| m == n).unwrap();
                let want = g["dist"][i].as_f64().unwrap();
                assert_eq!(d.to_bits(), want.to_bits(), "{} nonce {n}", c.name);
                // Far enough from r_target that no tolerance here flips it.
                assert!(
                    (d - c.r_target).abs() > TOLERANCE_FP8,
                    "{} nonce {n}",
                    c.name
                );
                if valid.contains(&n) {
                    assert!(d < c.r_target);
                    proofs += 1;
                } else {
                    others += 1;
                }
            }
            assert!(proofs >= 1 && others >= 1, "{}: proofs and others", c.name);
        }
    }

    #[test]
    fn each_served_precision_gets_its_cases() {
        let names =
            |served| -> Vec<String> { checks_for(served).into_iter().map(|c| c.name).collect() };
        let f16 = Served {
            dtype: Dtype::F16,
            fp8: false,
        };
        assert_eq!(names(f16), ["tiny_f16", "v2_shaped_f16"]);
        let bf16 = Served {
            dtype: Dtype::Bf16,
            ..f16
        };
        assert_eq!(
            names(bf16),
            ["tiny_f16", "v2_shaped_f16", "tiny_bf16", "v2_shaped_bf16"]
        );
        let fp8 = Served { fp8: true, ..f16 };
        assert_eq!(names(fp8), ["tiny_f16", "v2_shaped_f16", "v2_shaped_fp8"]);
        let c = checks_for(fp8).pop().unwrap();
        assert!(c.fp8 && c.tolerance == TOLERANCE_FP8 && c.case.name == "v2_shaped_f16");
        assert_eq!(checks_for(bf16)[2].tolerance, TOLERANCE_BF16);
        let f32 = Served {
            dtype: Dtype::F32,
            ..f16
        };
        assert_eq!(names(f32)[2..], ["tiny_f32", "v2_shaped_f32"]);
    }

    #[test]
    fn the_cpu_passes_and_reports_its_largest_difference() {
        for dtype in Dtype::ALL {
            let served = Served { dtype, fp8: false };
            let r = run_on(&CpuBackend::new(), served);
            assert!(r.passed, "{r:?}");
            assert_eq!(r.device, "cpu");
            assert_eq!(r.cases.len(), 4 - usize::from(dtype == Dtype::F16) * 2);
            assert!(r.max_abs_diff < TOLERANCE, "{r:?}");
            eprintln!(
                "{dtype}: {} cases on the CPU, max |diff| {:.2e}, {:.3} s",
                r.cases.len(),
                r.max_abs_diff,
                r.seconds
            );
        }
    }

    /// The CPU, with one nonce's distance moved by `shift` in every run (and the r_target
    /// filter applied to the moved distances, as a device would).
    struct Off {
        cpu: CpuBackend,
        nonce: u64,
        shift: f64,
        name: &'static str,
    }

    impl Backend for Off {
        fn name(&self) -> String {
            self.name.into()
        }
        fn check(&self, params: &Params, dtype: Dtype) -> Result<(), BackendError> {
            self.cpu.check(params, dtype)
        }
        fn build_model(&self, bh: &str, p: &Params, d: Dtype) -> Result<Model, BackendError> {
            self.cpu.build_model(bh, p, d)
        }
        fn forward_last_logits(
            &self,
            model: &Model,
            inputs: &[f32],
            batch: usize,
        ) -> Result<Vec<f32>, BackendError> {
            self.cpu.forward_last_logits(model, inputs, batch)
        }
        fn run_batch(
            &self,
            model: &Model,
            job: &JobSpec,
            batch: PreparedBatch,
            all_distances: bool,
        ) -> Result<BatchResult, BackendError> {
            let r = self.cpu.run_batch(model, job, batch, true)?;
            let mut dist = r.dist.clone().unwrap();
            for (n, d) in r.nonces.iter().zip(&mut dist) {
                if *n == self.nonce {
                    *d += self.shift;
                }
            }
            let moved = BatchResult::from_distances(r.nonces, dist, job.r_target);
            Ok(moved.keeping_distances(all_distances))
        }
        fn bytes_per_nonce(&self, params: &Params) -> u64 {
            self.cpu.bytes_per_nonce(params)
        }
    }

    fn off(nonce: u64, shift: f64, name: &'static str) -> Arc<dyn Backend> {
        Arc::new(Off {
            cpu: CpuBackend::new(),
            nonce,
            shift,
            name,
        })
    }

    const F16: Served = Served {
        dtype: Dtype::F16,
        fp8: false,
    };

    #[test]
    fn a_wrong_distance_fails_naming_the_case_the_nonce_and_both_distances() {
        // 1e-4 on nonce 12 of v2_shaped: within every valid set, beyond the tolerance.
        let r = run_on(off(12, 1e-4, "cuda:0").as_ref(), F16);
        assert!(!r.passed);
        assert!(r.cases[0].passed, "{r:?}");
        let v2 = &r.cases[1];
        assert!(
            !v2.passed && (v2.max_abs_diff - 1e-4).abs() < 1e-6,
            "{v2:?}"
        );
        let why = r.failure().unwrap();
        assert!(
            why.starts_with("v2_shaped_f16: nonce 12: distance 1.40288"),
            "{why}"
        );
        assert!(
            why.contains("against the reference's 1.402789686499333"),
            "{why}"
        );
        // Just inside the tolerance: passes.
        assert!(run_on(off(12, 1.9e-5, "cuda:0").as_ref(), F16).passed);
        // A shift that flips a proof (nonce 2 of v2_shaped lies 0.0089 below r_target) is
        // caught too, and the NaN a broken device gives as well.
        let r = run_on(off(2, 0.01, "cuda:0").as_ref(), F16);
        assert!(r.failure().unwrap().contains("nonce 2: distance"), "{r:?}");
        let r = run_on(off(5, f64::NAN, "cuda:0").as_ref(), F16);
        assert!(
            !r.passed
                && r.failure()
                    .unwrap()
                    .starts_with("tiny_f16: nonce 5: distance NaN")
        );
    }

    #[test]
    fn devices_that_fail_are_dropped_and_none_left_is_a_refusal() {
        let good: Arc<dyn Backend> = Arc::new(CpuBackend::new());
        let devices = vec![off(0, 0.5, "cuda:0"), good, off(1, -3e-5, "cuda:2")];
        let (kept, status) = select(devices, F16).unwrap();
        let names: Vec<String> = kept.iter().map(|d| d.name()).collect();
        assert_eq!(names, ["cpu"]);
        assert!(status.passed);
        assert_eq!(status.cases, 6);
        assert!(status.max_abs_diff < TOLERANCE);
        let failed: Vec<&DeviceSelfTest> = status.devices.iter().filter(|d| !d.passed).collect();
        assert_eq!(failed.len(), 2);
        assert!(failed[0]
            .failure
            .as_ref()
            .unwrap()
            .contains("tiny_f16: nonce 0"));
        assert!(failed[1]
            .failure
            .as_ref()
            .unwrap()
            .contains("v2_shaped_f16: nonce 1"));

        let e = select(vec![off(8, 1e-3, "cuda:0+1")], F16).err().unwrap();
        assert!(
            e.starts_with("the start-up self-test failed on every device"),
            "{e}"
        );
        assert!(e.contains("cuda:0+1: tiny_f16: nonce 8: distance"), "{e}");
    }
}
