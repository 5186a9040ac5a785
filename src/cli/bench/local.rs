//! Local sweeps: every (dtype, batch size) through the job engine for a fixed time.

use super::plot::{self, LocalPoint};
use super::stats::Percentiles;
use super::{
    flop_per_nonce, non_embedding_params, unix_seconds, BenchArgs, GpuSampler, Progress,
    METRICS_FILE, PLOT_FILE,
};
use crate::cli::serve::DeviceChoice;
use crate::engine::{Engine, EngineOptions, GenerateJob, Job, JobEvent, ModelSpec};
use crate::pow::dtype::Dtype;
use crate::pow::params::Params;
use crate::telemetry::{sku, system, GpuMonitor};
use anyhow::Context;
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

/// The devices of `--device` and, when `auto` fell back to the CPU, why (see
/// [`crate::cli::serve::resolve_devices`]).
pub fn devices(choice: DeviceChoice) -> anyhow::Result<crate::cli::serve::ResolvedDevices> {
    crate::cli::serve::resolve_devices(choice)
}

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

pub fn run(
    args: &BenchArgs,
    params: &Params,
    params_source: &str,
    out: &Path,
    progress: &Progress,
    sampler: &GpuSampler,
) -> anyhow::Result<Value> {
    let (devs, device_note) = devices(args.device)?;
    if let Some(note) = &device_note {
        progress.line(note);
    }
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
    let configs: Vec<(Dtype, u64)> = args
        .dtypes
        .iter()
        .flat_map(|&d| args.batch_sizes.iter().map(move |&b| (Dtype::from(d), b)))
        .collect();
    let bar = progress.bar(configs.len() as u64);
    let mut results = Vec::new();
    let mut points = Vec::new();
    let mut device_names = Vec::new();
    for &dtype in &args.dtypes {
        let dtype = Dtype::from(dtype);
        let engine = Engine::new(
            devs.clone(),
            EngineOptions {
                dtype,
                model_cache: 1,
                ..EngineOptions::default()
            },
        );
        engine
            .check(params)
            .map_err(|e| anyhow::anyhow!("{params_source} in {dtype}: {e}"))?;
        engine.warm_up();
        device_names = engine.device_names();
        for &bs in &args.batch_sizes {
            let effective = engine.effective_batch_size(params, bs);
            let label = format!("{dtype} batch {bs}");
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
                }))
                .context("cannot start the bench job")?;
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
            let mut last_tick = Instant::now();
            while let Some(ev) = h.events.blocking_recv() {
                match ev {
                    JobEvent::ModelReady { seconds, cached } => build = Some((seconds, cached)),
                    JobEvent::Batch(b) => {
                        let t = submitted.elapsed().as_secs_f64();
                        first_batch.get_or_insert(t);
                        let lat = b.compute_time.as_secs_f64() * 1000.0;
                        let w = &mut workers[b.worker_id];
                        w.batches += 1;
                        w.nonces += b.batch_computed();
                        w.valid += b.batch_valid();
                        w.latencies_ms.push(lat);
                        w.last_elapsed = w.last_elapsed.max(b.elapsed.as_secs_f64());
                        csv.write_record([
                            dtype.as_str().to_owned(),
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
                    dtype,
                    batch_size: bs,
                    nonces_per_second: rate,
                    latency: l,
                });
            }
            results.push(json!({
                "dtype": dtype.as_str(),
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
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    csv.flush()?;
    let shown = Path::new(params_source)
        .file_name()
        .map_or(params_source.into(), |f| f.to_string_lossy());
    let title = format!("llama-pow bench: {} on {}", shown, device_names.join(","));
    plot::local(&out.join(PLOT_FILE), &title, &points)?;
    let best = results
        .iter()
        .max_by(|a, b| {
            a["nonces_per_second"]
                .as_f64()
                .unwrap_or(0.0)
                .total_cmp(&b["nonces_per_second"].as_f64().unwrap_or(0.0))
        })
        .map(|r| json!({"dtype": r["dtype"], "batch_size": r["batch_size"], "nonces_per_second": r["nonces_per_second"]}));
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
        "files": [super::REPORT_FILE, METRICS_FILE, super::GPU_FILE, PLOT_FILE],
    }))
}
