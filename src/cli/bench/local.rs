//! Local sweeps: every (dtype, batch size) through the job engine for a fixed time; then, on
//! CUDA devices, each dtype's ceiling ([`super::ceiling`]), the start figures, and the
//! reference's throughput when `--reference-command` is given (see the [`super`] docs).

use super::ceiling;
use super::plot::{self, LocalPoint};
use super::stats::Percentiles;
use super::{
    flop_per_nonce, non_embedding_params, unix_seconds, BenchArgs, GpuSampler, Interrupt, Progress,
    METRICS_FILE, PLOT_FILE,
};
use crate::backend::Backend;
use crate::cli::devices::{DeviceChoice, DtypeChoice};
use crate::engine::{
    Engine, EngineOptions, GenerateJob, Job, JobControl, JobEvent, ModelSpec, StopReason,
};
use crate::pow::dtype::Dtype;
use crate::pow::params::Params;
use crate::telemetry::{sku, system, GpuMonitor};
use anyhow::Context;
use serde_json::{json, Value};
use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The start a model's first batch should beat: built from scratch...
pub const GOAL_COLD_SECONDS: f64 = 5.0;
/// ...and taken from the cache.
pub const GOAL_CACHED_SECONDS: f64 = 0.5;
/// Our best rate over the reference's, as a goal.
pub const GOAL_REFERENCE_RATIO: f64 = 1.3;
/// The reference command's shortest time limit; longer sweeps give it 10 x `--seconds`.
pub const REFERENCE_MIN_TIMEOUT: Duration = Duration::from_secs(60);

/// The devices of `--device` and, when `auto` fell back to the CPU, why (see
/// [`crate::cli::devices::resolve_devices`]).
pub fn devices(
    choice: DeviceChoice,
    params: &Params,
    cuda_graphs: bool,
) -> anyhow::Result<crate::cli::devices::ResolvedDevices> {
    // GPUs grouped for the params being measured.
    crate::cli::devices::resolve_devices(choice, params, cuda_graphs)
}

/// The params a job of `params` runs with in `choice`: FP8 products for fp8, as the engine's
/// [`Engine::job_params`] gives them with `EngineOptions::fp8`.
pub fn job_params(params: &Params, choice: DtypeChoice) -> Params {
    let mut p = params.clone();
    p.use_fp8 |= choice.fp8();
    p
}

/// Every dtype of `choices` checked on every device before anything is computed, so that one
/// the devices cannot do (fp8 on the CPU) fails at once with the device's reason.
pub fn check_dtypes(
    devices: &[Arc<dyn Backend>],
    params: &Params,
    params_source: &str,
    choices: &[DtypeChoice],
) -> anyhow::Result<()> {
    for &choice in choices {
        let p = job_params(params, choice);
        for d in devices {
            d.check(&p, choice.dtype()).map_err(|e| {
                anyhow::anyhow!(
                    "{params_source} in {} on {}: {e}",
                    choice.as_str(),
                    d.name()
                )
            })?;
        }
    }
    Ok(())
}

/// Why an fp8 row's efficiency is what it is: the peak table has 16-bit figures only.
const FP8_PEAK_NOTE: &str =
    "fp8: rated against the 16-bit dense peak (the peak table has no FP8 figures)";

/// What one worker did in one configuration.
#[derive(Default)]
struct WorkerRun {
    device: String,
    batches: u64,
    nonces: u64,
    valid: u64,
    latencies_ms: Vec<f64>,
    last_elapsed: f64,
}

/// A device's dense peak for `dtype`, or why there is none.
fn peak_of(
    device: &str,
    gpus: &[crate::telemetry::GpuSample],
    dtype: Dtype,
) -> (Option<f64>, Option<String>, Option<String>) {
    let Some(index) = device
        .strip_prefix("cuda:")
        .and_then(|i| i.parse::<u32>().ok())
    else {
        return (
            None,
            None,
            Some(format!(
                "{device}: no dense peak table for CPUs; efficiency is for GPUs"
            )),
        );
    };
    let Some(g) = gpus.iter().find(|g| g.index == index) else {
        return (
            None,
            None,
            Some(format!("{device}: NVML does not report this GPU")),
        );
    };
    match sku::detect(&g.name) {
        Some(s) => (Some(s.peak_tflops(dtype)), Some(s.name.to_owned()), None),
        None => (
            None,
            None,
            Some(format!("{}: not in the peak table", g.name)),
        ),
    }
}

/// Stops a configuration's job when its time budget has passed since its model was ready,
/// through the job's control: inside the batch that runs where the device allows it, else
/// after it. Dropping it (or [`Budget::finished`]) lets the timer go.
struct Budget {
    start: std::sync::mpsc::Sender<()>,
    timer: Option<std::thread::JoinHandle<()>>,
}

impl Budget {
    fn new(control: Arc<JobControl>, seconds: Duration) -> Self {
        let (start, started) = std::sync::mpsc::channel::<()>();
        let timer = std::thread::Builder::new()
            .name("bench-budget".into())
            .spawn(move || {
                // Wait for the model, then for the budget; a closed channel means the job ended.
                if started.recv().is_err() {
                    return;
                }
                if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    started.recv_timeout(seconds)
                {
                    control.stop(StopReason::Requested);
                }
            })
            .ok();
        Budget { start, timer }
    }

    /// The model is ready: the budget starts now.
    fn model_ready(&self) {
        let _ = self.start.send(());
    }

    /// The job ended: let the timer go.
    fn finished(self) {
        let Budget { start, timer } = self;
        drop(start);
        if let Some(t) = timer {
            let _ = t.join();
        }
    }
}

pub fn run(
    args: &BenchArgs,
    params: &Params,
    params_source: &str,
    out: &Path,
    progress: &Progress,
    sampler: &GpuSampler,
    interrupt: &Interrupt,
) -> anyhow::Result<Value> {
    let (devs, device_note) = devices(args.device, params, args.cuda_graphs)?;
    if let Some(note) = &device_note {
        progress.line(note);
    }
    check_dtypes(&devs, params, params_source, &args.dtypes)?;
    progress.line(&args.chosen(params_source));
    let started_unix = unix_seconds();
    let t_run = Instant::now();
    let flop = flop_per_nonce(params);
    let gpus = GpuMonitor::open().sample();
    let mut csv = csv::Writer::from_path(out.join(METRICS_FILE))
        .with_context(|| format!("cannot write {}", out.join(METRICS_FILE).display()))?;
    csv.write_record([
        "dtype",
        "batch_size",
        "worker_id",
        "device",
        "batch_index",
        "t_seconds",
        "compute_elapsed_seconds",
        "nonces",
        "valid",
        "latency_ms",
        "nonces_per_second",
    ])?;
    let configs = args.dtypes.len() * args.batch_sizes.len();
    let bar = progress.bar(configs as u64);
    let mut results = Vec::new();
    // The largest batch each configuration forwarded (parallel to `results`).
    let mut forward_batches: Vec<u64> = Vec::new();
    let mut ceilings = serde_json::Map::new();
    let mut points = Vec::new();
    let mut device_names = Vec::new();
    let say = |s: &str| match &bar {
        Some(b) => b.println(s),
        None => progress.line(s),
    };
    'dtypes: for &choice in &args.dtypes {
        if interrupt.is_set() {
            break;
        }
        // The activations' dtype (f16 for fp8) and the name rows, files and figures carry.
        let dtype = choice.dtype();
        let name = choice.as_str();
        let dtype_first = results.len();
        let engine = Engine::new(
            devs.clone(),
            EngineOptions {
                dtype,
                fp8: choice.fp8(),
                model_cache: 1,
                ..EngineOptions::default()
            },
        );
        engine
            .check(params)
            .map_err(|e| anyhow::anyhow!("{params_source} in {name}: {e}"))?;
        engine.warm_up();
        device_names = engine.device_names();
        for &bs in &args.batch_sizes {
            if interrupt.is_set() {
                break 'dtypes;
            }
            let effective = engine.effective_batch_size(params, bs);
            let label = format!("{name} batch {bs}");
            if let Some(b) = &bar {
                b.set_message(format!("{label}: building / computing"));
            } else {
                progress.line(&format!(
                    "{label}: computing for {:.1} s",
                    args.seconds.as_secs_f64()
                ));
            }
            let t_cfg = sampler.now();
            let submitted = Instant::now();
            let mut h = engine
                .submit(Job::Generate(GenerateJob {
                    model: ModelSpec {
                        block_hash: args.block_hash.clone(),
                        params: params.clone(),
                    },
                    public_key: "llama-pow-bench".into(),
                    block_height: 1,
                    r_target: args.r_target,
                    start_nonce: 0,
                    batch_size: bs,
                    max_duration: args.seconds,
                    max_nonces: None,
                }))
                .context("cannot start the bench job")?;
            let budget = Budget::new(h.control.clone(), args.seconds);
            interrupt.measuring(Some(h.control.clone()));
            let mut workers: Vec<WorkerRun> = engine
                .device_names()
                .into_iter()
                .map(|device| WorkerRun {
                    device,
                    ..WorkerRun::default()
                })
                .collect();
            let mut build = None;
            let mut first_batch = None;
            let mut largest_batch = 0u64;
            let mut last_tick = Instant::now();
            while let Some(ev) = h.events.blocking_recv() {
                match ev {
                    JobEvent::ModelReady { seconds, cached } => {
                        budget.model_ready();
                        build = Some((seconds, cached));
                    }
                    JobEvent::Batch(b) => {
                        let t = submitted.elapsed().as_secs_f64();
                        first_batch.get_or_insert(t);
                        largest_batch = largest_batch.max(b.batch_computed());
                        let lat = b.compute_time.as_secs_f64() * 1000.0;
                        let w = &mut workers[b.worker_id];
                        w.batches += 1;
                        w.nonces += b.batch_computed();
                        w.valid += b.batch_valid();
                        w.latencies_ms.push(lat);
                        w.last_elapsed = w.last_elapsed.max(b.elapsed.as_secs_f64());
                        csv.write_record([
                            name.to_owned(),
                            bs.to_string(),
                            b.worker_id.to_string(),
                            w.device.clone(),
                            b.batch_number.to_string(),
                            format!("{t:.6}"),
                            format!("{:.6}", b.elapsed.as_secs_f64()),
                            b.batch_computed().to_string(),
                            b.batch_valid().to_string(),
                            format!("{lat:.4}"),
                            format!(
                                "{:.3}",
                                b.batch_computed() as f64 / (lat / 1000.0).max(1e-9)
                            ),
                        ])?;
                        if let Some(bar) = &bar {
                            if last_tick.elapsed() > Duration::from_millis(200) {
                                last_tick = Instant::now();
                                let n: u64 = workers.iter().map(|w| w.nonces).sum();
                                let secs = b.elapsed.as_secs_f64().max(1e-9);
                                bar.set_message(format!(
                                    "{label}: {:.1} nonces/s",
                                    n as f64 / secs
                                ));
                            }
                        }
                    }
                    JobEvent::Error(e) => {
                        anyhow::bail!("{label}: {} ({})", e.message, e.error_type)
                    }
                    JobEvent::Finished(_) => break,
                }
            }
            budget.finished();
            interrupt.measuring(None);
            csv.flush()?;
            let t_cfg_end = sampler.now();
            let nonces: u64 = workers.iter().map(|w| w.nonces).sum();
            let valid: u64 = workers.iter().map(|w| w.valid).sum();
            let secs = workers
                .iter()
                .map(|w| w.last_elapsed)
                .fold(0.0f64, f64::max);
            let rate = if secs > 0.0 {
                nonces as f64 / secs
            } else {
                0.0
            };
            let all_lat: Vec<f64> = workers
                .iter()
                .flat_map(|w| w.latencies_ms.clone())
                .collect();
            let lat = Percentiles::of(&all_lat);
            let gpu_peaks = sampler.peak_memory(t_cfg, t_cfg_end);
            let per_worker: Vec<Value> = workers
                .iter()
                .enumerate()
                .map(|(i, w)| {
                    let r = if w.last_elapsed > 0.0 {
                        w.nonces as f64 / w.last_elapsed
                    } else {
                        0.0
                    };
                    let tflops = r * flop / 1e12;
                    let (peak, sku_name, why) = peak_of(&w.device, &gpus, dtype);
                    let why = why.or_else(|| {
                        (choice.fp8() && peak.is_some()).then(|| FP8_PEAK_NOTE.to_owned())
                    });
                    let peak_mem = w
                        .device
                        .strip_prefix("cuda:")
                        .and_then(|x| x.parse::<u32>().ok())
                        .and_then(|idx| gpu_peaks.iter().find(|(g, _)| *g == idx).map(|(_, m)| *m));
                    json!({
                        "worker_id": i,
                        "device": w.device,
                        "sku": sku_name,
                        "batches": w.batches,
                        "nonces": w.nonces,
                        "valid": w.valid,
                        "seconds": w.last_elapsed,
                        "nonces_per_second": r,
                        "achieved_tflops": tflops,
                        "peak_tflops": peak,
                        "efficiency": peak.map(|p| tflops / p),
                        "efficiency_note": why,
                        "batch_latency_ms": Percentiles::of(&w.latencies_ms),
                        "peak_memory_bytes": peak_mem,
                        "peak_memory_kind": peak_mem.map(|_| "gpu_memory_used (NVML)"),
                    })
                })
                .collect();
            let tflops = rate * flop / 1e12;
            let summary = format!(
                "{label}: {rate:.1} nonces/s, {tflops:.4} TFLOP/s, latency p50 {:.2} ms p99 {:.2} ms",
                lat.map_or(f64::NAN, |l| l.p50),
                lat.map_or(f64::NAN, |l| l.p99)
            );
            match &bar {
                Some(b) => {
                    b.println(&summary);
                    b.inc(1);
                }
                None => progress.line(&summary),
            }
            if let Some(l) = lat {
                points.push(LocalPoint {
                    dtype: name,
                    batch_size: bs,
                    nonces_per_second: rate,
                    latency: l,
                });
            }
            forward_batches.push(if largest_batch > 0 {
                largest_batch
            } else {
                effective
            });
            results.push(json!({
                "dtype": name,
                "batch_size": bs,
                "effective_batch_size": effective,
                "batches": workers.iter().map(|w| w.batches).sum::<u64>(),
                "nonces": nonces,
                "valid": valid,
                "seconds": secs,
                "nonces_per_second": rate,
                "achieved_tflops": tflops,
                "time_to_first_batch_seconds": first_batch,
                "model_build_seconds": build.map(|b| b.0),
                "model_cached": build.map(|b| b.1),
                "batch_latency_ms": lat,
                "peak_rss_bytes": system::peak_rss_bytes(),
                "per_worker": per_worker,
            }));
        }
        // The ceiling, on the GPUs just swept, once the engine and its models are gone.
        engine.clear_cache();
        drop(engine);
        let ordinals = ceiling::gpu_ordinals(&device_names);
        let measured = !interrupt.is_set();
        if let (true, false, Some(i)) = (
            measured,
            ordinals.is_empty(),
            best_index(&results[dtype_first..]),
        ) {
            let r = &results[dtype_first + i];
            let bs = r["batch_size"].as_u64().unwrap_or(1);
            let forward_batch = forward_batches[dtype_first + i].max(1) as usize;
            let nps = r["nonces_per_second"].as_f64().unwrap_or(0.0);
            let forward_seconds = r["batch_latency_ms"]["p50"].as_f64().map(|ms| ms / 1e3);
            if let Some(b) = &bar {
                b.set_message(format!("{name}: measuring the ceiling"));
            }
            say(&format!(
                "{name} ceiling: timing cuBLASLt on the forward's products for a batch of \
                 {forward_batch} on cuda:{}",
                ordinals[0]
            ));
            let mut c = ceiling::report(
                params,
                dtype,
                bs,
                forward_batch,
                nps,
                forward_seconds,
                &ordinals,
            );
            if choice.fp8() {
                if let Some(obj) = c.as_object_mut() {
                    obj.insert("products_dtype".into(), dtype.as_str().into());
                    obj.insert(
                        "note".into(),
                        "fp8: the ceiling of the products in f16 (cuBLASLt's FP8 products are \
                         not timed here), so fraction_of_ceiling may exceed 1"
                            .into(),
                    );
                }
            }
            match (c["error"].as_str(), c["fraction_of_ceiling"].as_f64()) {
                (Some(e), _) => say(&format!("warning: {name} ceiling: {e}")),
                (None, Some(f)) => say(&format!(
                    "{name} ceiling: {:.1} TFLOP/s, {:.1} nonces/s per GPU; batch {bs} \
                     reached {:.1}% of it (goal {:.0}%)",
                    c["ceiling_tflops"].as_f64().unwrap_or(f64::NAN),
                    c["ceiling_nonces_per_second"].as_f64().unwrap_or(f64::NAN),
                    f * 100.0,
                    ceiling::GOAL_FRACTION_OF_CEILING * 100.0
                )),
                (None, None) => say(&format!("{name} ceiling: no throughput measured")),
            }
            ceilings.insert(name.to_owned(), c);
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let ceiling_report = if ceilings.is_empty() && interrupt.is_set() {
        json!({"skipped": "interrupted (Ctrl-C) before a ceiling was measured"})
    } else if ceilings.is_empty() {
        json!({"skipped": ceiling_skipped_reason(device_note.as_deref())})
    } else {
        Value::Object(ceilings)
    };
    let start = start_figures(&results, &args.dtypes);
    csv.flush()?;
    let shown = Path::new(params_source)
        .file_name()
        .map_or(params_source.into(), |f| f.to_string_lossy());
    let title = format!("llama-pow bench: {} on {}", shown, device_names.join(","));
    plot::local(&out.join(PLOT_FILE), &title, &points)?;
    let best = best_index(&results)
        .map(|i| &results[i])
        .map(|r| json!({"dtype": r["dtype"], "batch_size": r["batch_size"], "nonces_per_second": r["nonces_per_second"]}));
    let reference = args
        .reference_command
        .as_deref()
        .filter(|_| !interrupt.is_set())
        .map(|cmd| reference(args, params, cmd, &results, progress));
    let devices: Vec<Value> = device_names
        .iter()
        .map(|d| {
            let (peak16, sku_name, why) = peak_of(d, &gpus, Dtype::F16);
            json!({"device": d, "sku": sku_name, "dense_peak_tflops_16bit": peak16, "peak_note": why})
        })
        .collect();
    Ok(json!({
        "mode": "local",
        "started_unix": started_unix,
        "duration_seconds": t_run.elapsed().as_secs_f64(),
        "params_source": params_source,
        "params": params,
        "total_params": crate::pow::weights::total_params(params),
        "non_embedding_params": non_embedding_params(params),
        "flop_per_nonce": flop,
        "block_hash": args.block_hash,
        "r_target": args.r_target,
        "seconds_per_config": args.seconds.as_secs_f64(),
        "devices": devices,
        "device_note": device_note,
        "peak_memory_note": "CPU: the process's peak resident memory so far (VmHWM), which only grows across configurations; GPU: the largest NVML memory-in-use sample during the configuration",
        "results": results,
        "best": best,
        "start": start,
        "ceiling": ceiling_report,
        "reference": reference,
        "files": [super::REPORT_FILE, METRICS_FILE, super::GPU_FILE, PLOT_FILE],
    }))
}

/// The configuration with the most nonces per second, if any.
fn best_index(results: &[Value]) -> Option<usize> {
    let rate = |r: &Value| r["nonces_per_second"].as_f64().unwrap_or(0.0);
    (0..results.len()).max_by(|&a, &b| rate(&results[a]).total_cmp(&rate(&results[b])))
}

/// Why there is no ceiling: CUDA's own reason when it is unavailable, else why the sweep ran
/// on the CPU.
fn ceiling_skipped_reason(device_note: Option<&str>) -> String {
    match crate::backend::cuda::cuda_available() {
        Err(why) => why.to_string(),
        Ok(_) => device_note.map_or_else(
            || "the sweep ran on the CPU (--device cpu)".to_owned(),
            str::to_owned,
        ),
    }
}

/// `report["start"]`: per dtype, the first batch's time after a cold build and after a
/// cached model, from the sweep's results (in their order).
pub fn start_figures(results: &[Value], dtypes: &[DtypeChoice]) -> Value {
    let mut out = serde_json::Map::new();
    for dtype in dtypes {
        if out.contains_key(dtype.as_str()) {
            continue;
        }
        let of: Vec<&Value> = results
            .iter()
            .filter(|r| r["dtype"] == dtype.as_str())
            .collect();
        let cold_at = of.iter().position(|r| r["model_cached"] == false);
        let cold = cold_at.map(|i| of[i]);
        let cached = cold_at.and_then(|i| of[i + 1..].iter().find(|r| r["model_cached"] == true));
        let first = |r: Option<&&Value>| r.and_then(|r| r["time_to_first_batch_seconds"].as_f64());
        let cold_s = first(cold.as_ref());
        let cached_s = first(cached);
        let mut v = json!({
            "cold_seconds": cold_s,
            "cold_batch_size": cold.map(|r| r["batch_size"].clone()),
            "cold_model_build_seconds": cold.map(|r| r["model_build_seconds"].clone()),
            "cached_seconds": cached_s,
            "cached_batch_size": cached.map(|r| r["batch_size"].clone()),
            "goal_cold_seconds": GOAL_COLD_SECONDS,
            "goal_cached_seconds": GOAL_CACHED_SECONDS,
            "cold_meets_goal": cold_s.map(|s| s <= GOAL_COLD_SECONDS),
            "cached_meets_goal": cached_s.map(|s| s <= GOAL_CACHED_SECONDS),
        });
        if cached.is_none() {
            v["cached_note"] = "no configuration after the first took its model from the cache: \
                                sweep two batch sizes or more"
                .into();
        }
        out.insert(dtype.as_str().to_owned(), v);
    }
    Value::Object(out)
}

/// `report["reference"]`: runs the reference command and compares our best rate (the first
/// dtype, whole machine) with its own; a failure is reported, with a warning, not raised.
fn reference(
    args: &BenchArgs,
    params: &Params,
    command: &str,
    results: &[Value],
    progress: &Progress,
) -> Value {
    let dtype = args.dtypes[0];
    let timeout = REFERENCE_MIN_TIMEOUT.max(args.seconds.saturating_mul(10));
    let batch_sizes: Vec<String> = args.batch_sizes.iter().map(u64::to_string).collect();
    let env = [
        (
            "LLAMA_POW_BENCH_PARAMS",
            serde_json::to_string(params).unwrap_or_default(),
        ),
        ("LLAMA_POW_BENCH_DTYPE", dtype.as_str().to_owned()),
        (
            "LLAMA_POW_BENCH_SECONDS",
            args.seconds.as_secs_f64().to_string(),
        ),
        ("LLAMA_POW_BENCH_BLOCK_HASH", args.block_hash.clone()),
        ("LLAMA_POW_BENCH_BATCH_SIZES", batch_sizes.join(",")),
        ("LLAMA_POW_BENCH_R_TARGET", args.r_target.to_string()),
    ];
    progress.line(&format!(
        "reference: running `{command}` (time limit {} s)",
        timeout.as_secs()
    ));
    let started = Instant::now();
    let outcome =
        run_reference(command, &env, timeout).and_then(|stdout| parse_reference_output(&stdout));
    let seconds = started.elapsed().as_secs_f64();
    let (theirs, raw) = match outcome {
        Ok(x) => x,
        Err(error) => {
            eprintln!("warning: --reference-command: {error}");
            return json!({
                "command": command,
                "error": error,
                "timeout_seconds": timeout.as_secs_f64(),
            });
        }
    };
    let ours = results
        .iter()
        .enumerate()
        .filter(|(_, r)| r["dtype"] == dtype.as_str())
        .map(|(i, _)| i)
        .max_by(|&a, &b| {
            let rate = |i: usize| results[i]["nonces_per_second"].as_f64().unwrap_or(0.0);
            rate(a).total_cmp(&rate(b))
        })
        .map(|i| &results[i]);
    let ours_rate = ours.and_then(|r| r["nonces_per_second"].as_f64());
    let ratio = ours_rate.map(|o| o / theirs);
    progress.line(&format!(
        "reference: {theirs:.1} nonces/s; ours {:.1} nonces/s, ratio {:.2} (goal {GOAL_REFERENCE_RATIO})",
        ours_rate.unwrap_or(f64::NAN),
        ratio.unwrap_or(f64::NAN)
    ));
    json!({
        "command": command,
        "dtype": dtype.as_str(),
        "nonces_per_second": theirs,
        "ours_nonces_per_second": ours_rate,
        "ours_batch_size": ours.map(|r| r["batch_size"].clone()),
        "ratio": ratio,
        "goal_ratio": GOAL_REFERENCE_RATIO,
        "meets_goal": ratio.map(|r| r >= GOAL_REFERENCE_RATIO),
        "seconds": seconds,
        "timeout_seconds": timeout.as_secs_f64(),
        "raw": raw,
    })
}

/// The most of a stream kept (its end); a reference prints a line or a few.
const OUTPUT_KEEP_BYTES: usize = 4 << 20;
/// How long the output may stay open after the shell exited (a background process of the
/// command's holding it), before the command's processes are killed.
const OUTPUT_GRACE: Duration = Duration::from_secs(5);

/// A stream read to its end on a thread, keeping its last [`OUTPUT_KEEP_BYTES`].
struct Drain {
    buf: Arc<Mutex<(Vec<u8>, bool)>>,
}

impl Drain {
    fn start(mut r: impl Read + Send + 'static) -> Self {
        let buf = Arc::new(Mutex::new((Vec::new(), false)));
        let shared = buf.clone();
        std::thread::spawn(move || {
            let mut chunk = [0u8; 8192];
            loop {
                let n = r.read(&mut chunk).unwrap_or(0);
                let mut b = shared.lock().unwrap_or_else(|e| e.into_inner());
                if n == 0 {
                    b.1 = true;
                    return;
                }
                b.0.extend_from_slice(&chunk[..n]);
                if b.0.len() > OUTPUT_KEEP_BYTES {
                    let cut = b.0.len() - OUTPUT_KEEP_BYTES;
                    b.0.drain(..cut);
                }
            }
        });
        Drain { buf }
    }

    fn done(&self) -> bool {
        self.buf.lock().unwrap_or_else(|e| e.into_inner()).1
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.buf.lock().unwrap_or_else(|e| e.into_inner()).0).into_owned()
    }
}

/// Kills the command's processes: the shell leads its own process group, so the group's id
/// is the shell's PID.
fn kill_command(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-9", "--", &format!("-{}", child.id())])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let _ = child.kill();
    let _ = child.wait();
}

/// The last few hundred characters of a text, for an error message.
fn tail(s: &str, chars: usize) -> String {
    let t = s.trim();
    let n = t.chars().count();
    if n <= chars {
        t.to_owned()
    } else {
        let rest: String = t.chars().skip(n - chars).collect();
        format!("...{rest}")
    }
}

/// Runs `command` with `sh -c` (in its own process group, standard input empty) and returns
/// its standard output; an error when it cannot start, exits unsuccessfully or outlives
/// `timeout` (then it is killed).
pub fn run_reference(
    command: &str,
    env: &[(&str, String)],
    timeout: Duration,
) -> Result<String, String> {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(command)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().map_err(|e| format!("cannot start sh: {e}"))?;
    let stdout = Drain::start(child.stdout.take().expect("piped"));
    let stderr = Drain::start(child.stderr.take().expect("piped"));
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() >= timeout => {
                kill_command(&mut child);
                return Err(format!(
                    "timed out after {} s and was killed; standard error: {:?}",
                    timeout.as_secs(),
                    tail(&stderr.text(), 500)
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => {
                kill_command(&mut child);
                return Err(format!("cannot wait for it: {e}"));
            }
        }
    };
    let exited = Instant::now();
    while !(stdout.done() && stderr.done()) {
        if exited.elapsed() >= OUTPUT_GRACE {
            // Something it left running holds the output open.
            kill_command(&mut child);
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if !status.success() {
        return Err(format!(
            "exited with {status}; standard error: {:?}",
            tail(&stderr.text(), 500)
        ));
    }
    Ok(stdout.text())
}

/// The reference's rate from its standard output: the last non-empty line, a JSON object
/// whose "nonces_per_second" is a positive number; the object is returned too.
pub fn parse_reference_output(stdout: &str) -> Result<(f64, Value), String> {
    let line = stdout
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .ok_or_else(|| {
            "printed nothing on standard output; expected a JSON object with \
             \"nonces_per_second\" on its last line"
                .to_owned()
        })?;
    let v: Value = serde_json::from_str(line)
        .map_err(|e| format!("its last line is not JSON ({e}): {:?}", tail(line, 200)))?;
    let obj = v
        .as_object()
        .ok_or_else(|| format!("its last line is not a JSON object: {}", tail(line, 200)))?;
    let rate = obj.get("nonces_per_second").ok_or_else(|| {
        format!(
            "its last line has no \"nonces_per_second\": {}",
            tail(line, 200)
        )
    })?;
    match rate.as_f64() {
        Some(x) if x.is_finite() && x > 0.0 => Ok((x, v)),
        Some(x) => Err(format!("\"nonces_per_second\" must be positive, not {x}")),
        None => Err(format!("\"nonces_per_second\" is not a number: {rate}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reference_rate_is_the_last_json_line() {
        let (x, raw) = parse_reference_output(
            "warming up\n{\"x\": 1}\n{\"nonces_per_second\": 12.5, \"gpu\": \"h100\"}\n\n",
        )
        .unwrap();
        assert_eq!(x, 12.5);
        assert_eq!(raw["gpu"], "h100");
        assert_eq!(
            parse_reference_output("{\"nonces_per_second\": 3}")
                .unwrap()
                .0,
            3.0
        );
        for (out, want) in [
            ("", "printed nothing"),
            ("  \n\n", "printed nothing"),
            ("{\"nonces_per_second\": 1}\nnot json", "not JSON"),
            ("[1, 2]", "not a JSON object"),
            ("{\"rate\": 5}", "no \"nonces_per_second\""),
            ("{\"nonces_per_second\": \"5\"}", "is not a number"),
            ("{\"nonces_per_second\": null}", "is not a number"),
            ("{\"nonces_per_second\": 0}", "must be positive"),
            ("{\"nonces_per_second\": -2.5}", "must be positive"),
        ] {
            let e = parse_reference_output(out).unwrap_err();
            assert!(e.contains(want), "{out:?}: {e}");
        }
    }

    #[test]
    fn the_reference_command_runs_with_its_environment_and_a_time_limit() {
        let env = [("LLAMA_POW_BENCH_DTYPE", "bf16".to_owned())];
        let out = run_reference(
            r#"echo starting >&2; echo "{\"nonces_per_second\": 7, \"dtype\": \"$LLAMA_POW_BENCH_DTYPE\"}""#,
            &env,
            Duration::from_secs(30),
        )
        .unwrap();
        let (x, raw) = parse_reference_output(&out).unwrap();
        assert_eq!((x, raw["dtype"].as_str()), (7.0, Some("bf16")));
        let e = run_reference("echo oops >&2; exit 3", &[], Duration::from_secs(30)).unwrap_err();
        assert!(e.contains("exit status: 3") && e.contains("oops"), "{e}");
        let t = Instant::now();
        let e = run_reference("sleep 30; echo late", &[], Duration::from_millis(300)).unwrap_err();
        assert!(e.contains("timed out"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    }

    #[test]
    fn start_figures_name_the_cold_and_the_cached_start() {
        let r = |dtype: &str, bs: u64, cached: bool, first: f64| {
            json!({"dtype": dtype, "batch_size": bs, "model_cached": cached,
                   "time_to_first_batch_seconds": first, "model_build_seconds": 0.25})
        };
        let results = [
            r("f16", 1, false, 3.0),
            r("f16", 8, true, 0.2),
            r("f16", 32, true, 0.9),
            r("bf16", 4, false, 6.0),
        ];
        let s = start_figures(&results, &[DtypeChoice::F16, DtypeChoice::Bf16]);
        let f = &s["f16"];
        assert_eq!(f["cold_seconds"], 3.0);
        assert_eq!(f["cold_batch_size"], 1);
        assert_eq!(f["cold_model_build_seconds"], 0.25);
        assert_eq!(f["cached_seconds"], 0.2);
        assert_eq!(f["cached_batch_size"], 8);
        assert_eq!(f["goal_cold_seconds"], 5.0);
        assert_eq!(f["goal_cached_seconds"], 0.5);
        assert_eq!(f["cold_meets_goal"], true);
        assert_eq!(f["cached_meets_goal"], true);
        assert!(f.get("cached_note").is_none());
        let b = &s["bf16"];
        assert_eq!(b["cold_seconds"], 6.0);
        assert_eq!(b["cold_meets_goal"], false);
        assert!(b["cached_seconds"].is_null());
        assert!(b["cached_meets_goal"].is_null());
        assert!(b["cached_note"].is_string());
    }
}
