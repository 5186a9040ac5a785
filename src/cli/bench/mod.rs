//! `llama-pow bench`: throughput and latency, written to a run folder.
//!
//! Locally ([`local`]) it sweeps dtypes and batch sizes on this machine's devices through the
//! job engine, for a fixed time each. With `--server URL` ([`server`]) it drives a running
//! server as its clients do: a sequence of /generate jobs, and /health probes arriving as a
//! Poisson process meanwhile. Either way the folder holds `report.json`, `metrics.csv`,
//! `gpu.csv` (NVML samples every 500 ms; only a header without GPUs) and
//! `throughput_latency.png`; `--json` prints the report on standard output and nothing else.
//! With `--agreement` ([`agreement`]) it compares dtypes instead of sweeping them (below).
//!
//! The defaults fit the device: `--params auto` is PARAMS_V2 on GPUs and `v2-small`
//! ([`v2_small`]) on the CPU; `--batch-sizes` is 16,64,256 on GPUs, 1,8,32 on the CPU and 16
//! with `--server` ([`BenchArgs::resolved`]). Each local configuration is stopped through its
//! job's control once `--seconds` have passed since its model was ready, inside the batch that
//! runs where the device allows. Ctrl-C ([`Interrupt`]) ends any mode early: what was measured
//! is written as usual, the report says `interrupted: true`, and the command exits with 130.
//!
//! `--dtypes` takes f32, f16, bf16 and fp8. fp8 is f16 activations with the matrix products in
//! FP8, as `serve --dtype fp8` runs it: every job's params get `use_fp8: true`. Its rows,
//! `metrics.csv` lines and `start` / `ceiling` / `reference` entries are labelled `fp8`; its
//! efficiency is rated against the 16-bit dense peak (with an `efficiency_note`), and its
//! `ceiling` is the f16 products' (`products_dtype`, `note`). Every dtype is checked on every
//! device before anything is computed: a device without FP8 (the CPU) fails the bench at once
//! with its reason.
//!
//! Every report holds `cuda_graphs` (whether `--cuda-graphs` was on) and
//! `cuda_graph_events`: `captures`, `replays`, `fallbacks` (batches run directly because
//! their size's capture failed) and `dropped` (graphs dropped when scratch buffers were
//! reallocated) during the run; all zero without graphs.
//!
//! Besides the sweep's `results` (one object per configuration) and `best`, a local run's
//! report states the figures the CUDA backend is judged by, all measured in the same process:
//!
//! - `start` (per dtype, e.g. `start.f16`): `cold_seconds`, from submitting the dtype's first
//!   configuration to its first batch, the model built (`model_cached` false), with
//!   `cold_batch_size` and `cold_model_build_seconds`; `cached_seconds`, the same for the
//!   next configuration of the dtype whose model came from the cache (`model_cached` true),
//!   with `cached_batch_size` (both null, with a `cached_note`, when the sweep has one batch
//!   size); `goal_cold_seconds` (5) and `goal_cached_seconds` (0.5), and `cold_meets_goal` /
//!   `cached_meets_goal`.
//! - `ceiling` (see [`ceiling`]): on CUDA devices, per dtype (`ceiling.f16`...), cuBLASLt's
//!   FLOP-weighted throughput on one forward's own products, measured on the first GPU in use
//!   after the dtype's sweep, for the batch of its best configuration: `gpu`, `gpus_in_use`,
//!   `batch_size` (requested), `forward_batch` (the largest batch forwarded), `iters` (timed
//!   calls per product: 20, or 3 when a batch took over 2 s), `measure_seconds`,
//!   `ceiling_tflops`, `product_flop_per_nonce` (FLOPs of one forward's products / its
//!   batch), `ceiling_nonces_per_second` (per GPU: `ceiling_tflops * 1e12 /
//!   product_flop_per_nonce`), `measured_nonces_per_second` (the best configuration, whole
//!   machine), `measured_nonces_per_second_per_gpu` (divided by `gpus_in_use`: a group splits
//!   every forward's layers across its GPUs), `fraction_of_ceiling` (per GPU measured /
//!   ceiling), `goal_fraction_of_ceiling` (0.85), `meets_goal`, and `shapes` (each product's
//!   `name`, `m`, `n`, `k`, `tflops`, `seconds_per_call`); `{"error": ...}` for a dtype whose
//!   ceiling could not be measured. Without CUDA devices: `{"skipped": "<why>"}`.
//! - `reference`, with `--reference-command`: the command is run with `sh -c` after the sweep
//!   and the ceilings, with `LLAMA_POW_BENCH_PARAMS` (the params, JSON),
//!   `LLAMA_POW_BENCH_DTYPE` (the first of `--dtypes`), `LLAMA_POW_BENCH_SECONDS`,
//!   `LLAMA_POW_BENCH_BLOCK_HASH`, `LLAMA_POW_BENCH_BATCH_SIZES` (comma-separated) and
//!   `LLAMA_POW_BENCH_R_TARGET` in its environment, and must print a JSON object holding
//!   `"nonces_per_second"` (a positive number) as the last line of its standard output; it is
//!   killed (its process group) after max(60 s, 10 x `--seconds`). Reported: `command`,
//!   `dtype`, `nonces_per_second` (theirs), `ours_nonces_per_second` and `ours_batch_size`
//!   (our best configuration of that dtype, whole machine), `ratio` (ours / theirs),
//!   `goal_ratio` (1.3), `meets_goal`, `seconds` (the command's wall time),
//!   `timeout_seconds` and `raw` (the object as printed). A command that fails, times out or
//!   prints no such object gives `{"command", "error", "timeout_seconds"}` and a warning on
//!   standard error, not a failed bench. Null when no command was given.
//!
//! # `--agreement`
//!
//! `llama-pow bench --agreement --params v2 --device cuda --dtypes f16,bf16,fp8 --nonces 10000`
//! computes nonces 0..`--nonces` (default 10000; at least 2) in each dtype of `--dtypes` on
//! the first device of `--device`, in batches of the first `--batch-sizes` value (cut to what
//! the device takes), and compares every dtype after the first with the first, the baseline
//! (the path validators recompute is f16). Per dtype: every dtype checked first (fp8 on the
//! CPU fails here, with the device's reason), the model built (timed), one untimed warm-up
//! batch, then the nonces with every distance kept (`run_batch` with `all_distances`); the
//! rate is nonces per second of device time (the `run_batch` calls; drawing the inputs on the
//! host is `prepare_seconds`, apart). Not with `--server` or `--reference-command`; `--seconds`
//! and `--r-target` are not used. The report has `mode: "agreement"` (no `results`, `best`,
//! `start` or `ceiling`) and `report["agreement"]`:
//!
//! - `baseline` (its dtype), `nonces`, `start_nonce` (0), `device`, `batch_size` (requested),
//!   `valid_one_in` (500), `valid_target` (k = max(1, round(nonces / 500)), halves up),
//!   `r_target` (the midpoint between the baseline's k-th and (k+1)-th smallest distances, so
//!   that exactly k nonces are valid in it, fewer only on a tie), `valid_in_baseline`,
//!   `goal_flip_rate` (1e-4);
//! - `runs`, one per dtype in `--dtypes` order: `dtype`, `batch_size` (as computed),
//!   `model_build_seconds`, `compute_seconds`, `prepare_seconds`, `nonces_per_second`,
//!   `valid` (at `r_target`);
//! - `rows`, one per dtype after the baseline: `dtype`, `baseline`, `nonces_per_second`,
//!   `baseline_nonces_per_second`, `nonces_per_second_ratio` (dtype / baseline),
//!   `max_abs_diff`, `p99_abs_diff` (linear interpolation, numpy's default), `mean_abs_diff`
//!   and `mean_diff` (dtype - baseline, signed) of the distances, over the nonces whose
//!   difference is finite (`non_finite` counts the others), `valid_baseline`, `valid`,
//!   `valid_only_in_baseline`, `valid_only_in_dtype`, `flips` (their sum), `flip_rate`
//!   (flips / nonces), `goal_flip_rate`, `meets_goal` (flip_rate < 1e-4), and
//!   `largest_diffs`: the 5 largest differences (`nonce`, `baseline_dist`, `dist`, `diff`);
//! - `markdown`: the table printed on standard error (unless `--json`), the baseline's row
//!   then one per dtype.
//!
//! The folder holds `report.json`, `gpu.csv` and `agreement.csv` (a row per nonce: `nonce`,
//! then the distance in each dtype).

pub mod agreement;
pub mod ceiling;
pub mod local;
pub mod plot;
pub mod server;
pub mod stats;

use super::devices::{DeviceChoice, DtypeChoice};
use super::seconds;
use crate::pow::params::Params;
use crate::telemetry::{GpuMonitor, GpuSample};
use anyhow::Context;
use clap::Args;
use serde_json::Value;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The block hash the bench builds its model for, unless told otherwise.
pub const DEFAULT_BLOCK_HASH: &str =
    "5f1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8";
/// Interval between two NVML samples.
pub const GPU_SAMPLE_INTERVAL: Duration = Duration::from_millis(500);
/// The plot's size in pixels.
pub const PLOT_SIZE: (u32, u32) = (1280, 800);

pub const REPORT_FILE: &str = "report.json";
pub const METRICS_FILE: &str = "metrics.csv";
pub const GPU_FILE: &str = "gpu.csv";
pub const HEALTH_FILE: &str = "health.csv";
pub const PLOT_FILE: &str = "throughput_latency.png";

/// `--params auto` on GPUs: the production preset.
pub const AUTO_PARAMS_GPU: &str = "v2";
/// `--params auto` on the CPU: PARAMS_V2's shape at a size a CPU computes in milliseconds.
pub const AUTO_PARAMS_CPU: &str = "v2-small";
/// `--batch-sizes` unless given: on GPUs...
pub const AUTO_BATCH_SIZES_GPU: [u64; 3] = [16, 64, 256];
/// ...on the CPU...
pub const AUTO_BATCH_SIZES_CPU: [u64; 3] = [1, 8, 32];
/// ...and the one batch size of `--server` runs.
pub const AUTO_BATCH_SIZE_SERVER: u64 = 16;

/// `v2-small`: PARAMS_V2's head size (28), FFN width (8192), vocabulary (8196) and RoPE theta,
/// at dim 224, 2 layers and seq_len 32 (the golden `v2_shaped` case): about 0.85 GFLOP per
/// nonce, a few milliseconds per nonce on a CPU core, 30 MB of weights.
pub fn v2_small() -> Params {
    Params {
        dim: 224,
        n_layers: 2,
        n_heads: 8,
        n_kv_heads: 8,
        seq_len: 32,
        ..Params::v2()
    }
}

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Model parameters: auto (v2 on GPUs; v2-small, PARAMS_V2's shape at dim 224, 2 layers and
    /// seq_len 32, on the CPU), a preset (v1, v2, v2-small, default), or a JSON file holding a
    /// params object (or a request whose "params" key holds one). With --server, auto asks the
    /// server's /health which device it computes on.
    #[arg(long, default_value = "auto")]
    pub params: String,
    /// Device to compute on (local runs): auto, cpu or cuda.
    #[arg(long, value_enum, default_value = "auto")]
    pub device: DeviceChoice,
    /// Model dtypes to sweep, comma-separated (local runs).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "f16")]
    pub dtypes: Vec<DtypeChoice>,
    /// Batch sizes to sweep, comma-separated (local runs; --server and --agreement use the
    /// first). Default: 16,64,256 on GPUs, 1,8,32 on the CPU, 16 with --server.
    #[arg(long, value_delimiter = ',',
          value_parser = clap::value_parser!(u64).range(1..=65536))]
    pub batch_sizes: Vec<u64>,
    /// Seconds of computing per (dtype, batch size) (local runs). A configuration is stopped
    /// when they have passed, inside its batch where the device allows it.
    #[arg(long, default_value = "10", value_parser = seconds)]
    pub seconds: Duration,
    /// The run folder (default: bench-runs/<UTC time>); created if missing.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print the report as one JSON object on standard output, and nothing else.
    #[arg(long)]
    pub json: bool,
    /// Block hash the weights are drawn from.
    #[arg(long, default_value = DEFAULT_BLOCK_HASH)]
    pub block_hash: String,
    /// r_target of the jobs (with --server it decides which batches give a line).
    #[arg(long, default_value_t = 1.4)]
    pub r_target: f64,
    /// Drive the server at this URL (e.g. http://127.0.0.1:18000) instead of local devices.
    #[arg(long)]
    pub server: Option<String>,
    /// --server: /generate jobs to run one after the other.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=10000))]
    pub jobs: u64,
    /// --server: the client leaves a job after this many seconds...
    #[arg(long, default_value = "10", value_parser = seconds)]
    pub job_seconds: Duration,
    /// --server: ...or after this many lines, whichever comes first.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub job_lines: Option<u64>,
    /// --server: mean /health probes per second (a Poisson process; 0: none).
    #[arg(long, default_value_t = 20.0)]
    pub health_rate: f64,
    /// --server: timeout of each /health probe, in seconds.
    #[arg(long, default_value = "5", value_parser = seconds)]
    pub health_timeout: Duration,
    /// Local runs: after the sweep, run this shell command (`sh -c`) measuring the reference
    /// implementation on this machine; its last line of standard output must be a JSON object
    /// with "nonces_per_second". It gets LLAMA_POW_BENCH_PARAMS (JSON), LLAMA_POW_BENCH_DTYPE,
    /// LLAMA_POW_BENCH_SECONDS, LLAMA_POW_BENCH_BLOCK_HASH, LLAMA_POW_BENCH_BATCH_SIZES and
    /// LLAMA_POW_BENCH_R_TARGET, and is killed after max(60, 10 x --seconds) seconds.
    #[arg(long)]
    pub reference_command: Option<String>,
    /// Replay each batch size's GPU launch sequence as a captured CUDA graph (as the server's
    /// --cuda-graphs); run the bench with and without it to measure the gain.
    #[arg(long)]
    pub cuda_graphs: bool,
    /// Instead of the sweep: compute the same nonces in every dtype of --dtypes on the first
    /// device and compare each with the first dtype (the baseline): nonces/s, distance
    /// differences, and proofs that flip at an r_target making 1 nonce in 500 valid.
    #[arg(long)]
    pub agreement: bool,
    /// --agreement: nonces to compute in each dtype (from nonce 0).
    #[arg(long, default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(2..=100_000_000))]
    pub nonces: u64,
}

/// Run the bench; the report is returned (and printed by the caller when `--json`). A first
/// Ctrl-C ends the run early with a report of what was measured (`interrupted: true`); a
/// second exits at once.
pub fn run(args: &BenchArgs) -> anyhow::Result<Value> {
    let interrupt = Interrupt::listen();
    let args = &args.resolved()?;
    if !(args.r_target.is_finite() && args.r_target > 0.0) {
        anyhow::bail!("--r-target: expected a positive number");
    }
    if !(args.health_rate.is_finite() && args.health_rate >= 0.0 && args.health_rate <= 10_000.0) {
        anyhow::bail!("--health-rate: expected a number of probes per second in 0..=10000");
    }
    if args.dtypes.is_empty() {
        anyhow::bail!("--dtypes needs at least one value");
    }
    if let Some(cmd) = &args.reference_command {
        if args.server.is_some() {
            anyhow::bail!("--reference-command: local runs only, not with --server");
        }
        if cmd.trim().is_empty() {
            anyhow::bail!("--reference-command: expected a shell command");
        }
    }
    if args.agreement {
        if args.server.is_some() {
            anyhow::bail!("--agreement: local runs only, not with --server");
        }
        if args.reference_command.is_some() {
            anyhow::bail!("--agreement: not with --reference-command (a sweep's figure)");
        }
        if args.dtypes.len() < 2 {
            anyhow::bail!(
                "--agreement: --dtypes needs the baseline and at least one dtype to compare \
                 with it, e.g. --dtypes f16,bf16,fp8"
            );
        }
    }
    let (params, params_source) = load_params(&args.params)?;
    let out = match &args.out {
        Some(p) => p.clone(),
        None => PathBuf::from("bench-runs").join(utc_stamp(SystemTime::now())),
    };
    std::fs::create_dir_all(&out)
        .with_context(|| format!("cannot create the run folder {}", out.display()))?;
    let progress = Progress::new(args.json);
    let monitor = GpuMonitor::open();
    let sampler = GpuSampler::start(monitor.clone(), &out.join(GPU_FILE))?;
    let graphs_before = crate::telemetry::cuda_graph_counters().snapshot();
    let result = match &args.server {
        Some(_) => server::run(args, &params, &params_source, &out, &progress, &interrupt),
        None if args.agreement => {
            agreement::run(args, &params, &params_source, &out, &progress, &interrupt)
        }
        None => local::run(
            args,
            &params,
            &params_source,
            &out,
            &progress,
            &sampler,
            &interrupt,
        ),
    };
    let samples = sampler.stop();
    let mut report = result?;
    // Common to both modes: the machine, NVML and the folder.
    let nvml = serde_json::json!({
        "available": monitor.available(),
        "unavailable_reason": monitor.unavailable_reason(),
        "driver_version": monitor.driver_version(),
        "cuda_driver_version": monitor.cuda_driver_version(),
        "samples": samples.len(),
    });
    let obj = report
        .as_object_mut()
        .context("internal: the report is not an object")?;
    obj.insert("llama_pow_version".into(), env!("CARGO_PKG_VERSION").into());
    obj.insert(
        "machine".into(),
        serde_json::to_value(crate::telemetry::system::Machine::detect())?,
    );
    obj.insert("gpus".into(), serde_json::to_value(monitor.sample())?);
    obj.insert("nvml".into(), nvml);
    obj.insert("cuda".into(), cuda_report());
    obj.insert("cuda_graphs".into(), args.cuda_graphs.into());
    let graphs = crate::telemetry::cuda_graph_counters()
        .snapshot()
        .since(graphs_before);
    obj.insert("cuda_graph_events".into(), serde_json::to_value(graphs)?);
    obj.insert("interrupted".into(), interrupt.is_set().into());
    obj.insert("run_folder".into(), out.display().to_string().into());
    let text = serde_json::to_string_pretty(&report)?;
    std::fs::write(out.join(REPORT_FILE), text + "\n")
        .with_context(|| format!("cannot write {}", out.join(REPORT_FILE).display()))?;
    if interrupt.is_set() {
        progress.line("interrupted: the report holds what was measured until then");
    }
    progress.line(&format!("report written to {}", out.display()));
    Ok(report)
}

impl BenchArgs {
    /// The line a run starts with once its checks passed: what `auto` chose, and how to stop.
    pub fn chosen(&self, params_source: &str) -> String {
        let sizes: Vec<String> = self.batch_sizes.iter().map(u64::to_string).collect();
        format!(
            "params {params_source}, batch sizes {}; Ctrl-C stops early and still writes the report",
            sizes.join(",")
        )
    }

    /// These arguments with `--params auto` and an absent `--batch-sizes` made concrete for
    /// the device the bench runs on.
    pub fn resolved(&self) -> anyhow::Result<BenchArgs> {
        let mut a = self.clone();
        let on_gpu = || -> anyhow::Result<bool> {
            Ok(match (&a.server, a.device) {
                (Some(url), _) => server_computes_on_gpu(url)?,
                (None, DeviceChoice::Cpu) => false,
                (None, _) => crate::backend::cuda::cuda_available().is_ok(),
            })
        };
        let gpu = if a.params.eq_ignore_ascii_case("auto") || a.batch_sizes.is_empty() {
            on_gpu()?
        } else {
            false
        };
        if a.params.eq_ignore_ascii_case("auto") {
            a.params = if gpu {
                AUTO_PARAMS_GPU
            } else {
                AUTO_PARAMS_CPU
            }
            .to_owned();
        }
        if a.batch_sizes.is_empty() {
            a.batch_sizes = match (&a.server, gpu) {
                (Some(_), _) => vec![AUTO_BATCH_SIZE_SERVER],
                (None, true) => AUTO_BATCH_SIZES_GPU.to_vec(),
                (None, false) => AUTO_BATCH_SIZES_CPU.to_vec(),
            };
        }
        Ok(a)
    }
}

/// Whether the server at `url` computes on GPUs, from its /health `device` ("cpu", or GPU
/// groups such as "cuda:0,cuda:1").
fn server_computes_on_gpu(url: &str) -> anyhow::Result<bool> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let health: Value = rt.block_on(async {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .context("cannot build the HTTP client")?;
        let r = http
            .get(format!("{}/health", url.trim_end_matches('/')))
            .send()
            .await
            .with_context(|| format!("--server: {url} does not answer /health"))?;
        r.json::<Value>()
            .await
            .with_context(|| format!("--server: {url}/health is not JSON"))
    })?;
    Ok(health["device"]
        .as_str()
        .is_some_and(|d| d.starts_with("cuda")))
}

/// Ctrl-C during a bench. The first one sets the flag, stops the job that computes and wakes
/// whoever watches: the run ends early and still writes its report with what was measured. A
/// second one exits at once (status 130).
#[derive(Clone)]
pub struct Interrupt {
    set: Arc<AtomicBool>,
    job: Arc<std::sync::Mutex<Option<Arc<crate::engine::JobControl>>>>,
    watch: tokio::sync::watch::Receiver<bool>,
}

impl Interrupt {
    /// Watch for Ctrl-C (SIGINT) from now on, on a thread of its own.
    pub fn listen() -> Self {
        let i = Self::unarmed();
        let (tx, rx) = tokio::sync::watch::channel(false);
        let i = Interrupt { watch: rx, ..i };
        let me = i.clone();
        let spawned = thread::Builder::new().name("ctrl-c".into()).spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                if tokio::signal::ctrl_c().await.is_err() {
                    return;
                }
                eprintln!(
                    "\ninterrupted: stopping and writing the report (Ctrl-C again to exit now)"
                );
                me.trigger();
                let _ = tx.send(true);
                let _ = tokio::signal::ctrl_c().await;
                std::process::exit(130);
            });
        });
        if let Err(e) = spawned {
            eprintln!("warning: Ctrl-C will end the bench without a report: {e}");
        }
        i
    }

    /// An interrupt that only [`Interrupt::trigger`] sets (tests).
    pub fn unarmed() -> Self {
        Interrupt {
            set: Arc::new(AtomicBool::new(false)),
            job: Arc::default(),
            watch: tokio::sync::watch::channel(false).1,
        }
    }

    /// Set the flag and stop the job being measured.
    pub fn trigger(&self) {
        self.set.store(true, Ordering::SeqCst);
        if let Some(c) = self.job.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            c.stop(crate::engine::StopReason::Requested);
        }
    }

    pub fn is_set(&self) -> bool {
        self.set.load(Ordering::SeqCst)
    }

    /// The job an interrupt should stop (None once it has ended).
    pub fn measuring(&self, control: Option<Arc<crate::engine::JobControl>>) {
        let mut slot = self.job.lock().unwrap_or_else(|e| e.into_inner());
        if self.is_set() {
            if let Some(c) = &control {
                c.stop(crate::engine::StopReason::Requested);
            }
        }
        *slot = control;
    }

    /// Resolves once Ctrl-C was pressed (never for an unarmed interrupt).
    pub async fn wait(&self) {
        let mut w = self.watch.clone();
        let _ = w.wait_for(|v| *v).await;
        if !*w.borrow() {
            std::future::pending::<()>().await;
        }
    }
}

/// Params from a preset name or a JSON file.
pub fn load_params(spec: &str) -> anyhow::Result<(Params, String)> {
    if let Some(p) = Params::preset(spec) {
        return Ok((p, spec.to_ascii_lowercase()));
    }
    if spec.eq_ignore_ascii_case(AUTO_PARAMS_CPU) {
        return Ok((v2_small(), AUTO_PARAMS_CPU.to_owned()));
    }
    let path = Path::new(spec);
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "--params: {spec:?} is neither a preset (auto, v1, v2, v2-small, default) nor a \
             readable file"
        )
    })?;
    let v: Value =
        serde_json::from_str(&text).with_context(|| format!("--params: {spec} is not JSON"))?;
    let inner = match v.get("params") {
        Some(p) if p.is_object() => p,
        _ => &v,
    };
    let p = crate::pow::request::parse_params(inner)?;
    p.validate()?;
    Ok((p, path.display().to_string()))
}

/// Parameters of the forward pass that count: all but the token embeddings, which the
/// forward never reads.
pub fn non_embedding_params(p: &Params) -> u64 {
    crate::pow::weights::total_params(p)
        .saturating_sub(p.vocab_size.max(0) as u64 * p.dim.max(0) as u64)
}

/// FLOPs of one nonce: 2 per weight per position, plus the attention products (scores and
/// the weighted sum of values, both full seq_len x seq_len per head).
pub fn flop_per_nonce(p: &Params) -> f64 {
    let seq = p.seq_len.max(0) as f64;
    let dim = p.dim.max(0) as f64;
    let layers = p.n_layers.max(0) as f64;
    2.0 * non_embedding_params(p) as f64 * seq + 4.0 * seq * seq * dim * layers
}

/// Progress for people: a bar on a terminal, plain lines otherwise, nothing with --json.
pub struct Progress {
    quiet: bool,
    terminal: bool,
}

impl Progress {
    pub fn new(quiet: bool) -> Self {
        Progress {
            quiet,
            terminal: std::io::stderr().is_terminal(),
        }
    }

    /// A bar of `len` steps, or None where plain lines are better.
    pub fn bar(&self, len: u64) -> Option<indicatif::ProgressBar> {
        if self.quiet || !self.terminal {
            return None;
        }
        let bar = indicatif::ProgressBar::new(len);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {pos}/{len} {msg}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        Some(bar)
    }

    /// A line on standard error (above the bar when there is one).
    pub fn line(&self, s: &str) {
        if !self.quiet {
            eprintln!("{s}");
        }
    }
}

/// What CUDA discovery found on this machine (see [`crate::backend::cuda::cuda_available`]).
fn cuda_report() -> Value {
    use crate::backend::cuda;
    let nvrtc = cuda::kernels::nvrtc_version().map(|(major, minor)| format!("{major}.{minor}"));
    match cuda::cuda_available() {
        Ok(gpus) => serde_json::json!({
            "available": true,
            "gpus": gpus,
            "nvrtc_version": nvrtc,
        }),
        Err(why) => serde_json::json!({
            "available": false,
            "unavailable_reason": why.to_string(),
            "nvrtc_version": nvrtc,
        }),
    }
}

/// NVML samples every [`GPU_SAMPLE_INTERVAL`] into gpu.csv, kept in memory too.
pub struct GpuSampler {
    stop: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<Vec<(f64, GpuSample)>>>,
    started: Instant,
    samples: Arc<std::sync::Mutex<Vec<(f64, GpuSample)>>>,
}

pub const GPU_CSV_HEADER: [&str; 13] = [
    "t_seconds",
    "gpu",
    "name",
    "memory_used_bytes",
    "memory_total_bytes",
    "utilization_gpu_percent",
    "utilization_memory_percent",
    "power_watts",
    "temperature_celsius",
    "sm_clock_mhz",
    "memory_clock_mhz",
    "graphics_clock_mhz",
    "uuid",
];

fn opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref().map(|x| x.to_string()).unwrap_or_default()
}

impl GpuSampler {
    pub fn start(monitor: GpuMonitor, path: &Path) -> anyhow::Result<Self> {
        let mut w = csv::Writer::from_path(path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        w.write_record(GPU_CSV_HEADER)?;
        w.flush()?;
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(std::sync::Mutex::new(Vec::new()));
        let started = Instant::now();
        let handle = if monitor.available() {
            let stop = stop.clone();
            let samples = samples.clone();
            Some(
                thread::Builder::new()
                    .name("gpu-sampler".into())
                    .spawn(move || {
                        let mut next = Instant::now();
                        while !stop.load(Ordering::SeqCst) {
                            let t = started.elapsed().as_secs_f64();
                            for g in monitor.sample() {
                                let _ = w.write_record([
                                    format!("{t:.3}"),
                                    g.index.to_string(),
                                    g.name.clone(),
                                    opt(&g.memory_used_bytes),
                                    opt(&g.memory_total_bytes),
                                    opt(&g.utilization_gpu_percent),
                                    opt(&g.utilization_memory_percent),
                                    opt(&g.power_watts),
                                    opt(&g.temperature_celsius),
                                    opt(&g.sm_clock_mhz),
                                    opt(&g.memory_clock_mhz),
                                    opt(&g.graphics_clock_mhz),
                                    opt(&g.uuid),
                                ]);
                                samples
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .push((t, g));
                            }
                            let _ = w.flush();
                            next += GPU_SAMPLE_INTERVAL;
                            while !stop.load(Ordering::SeqCst) && Instant::now() < next {
                                thread::sleep(Duration::from_millis(20));
                            }
                        }
                        Vec::new()
                    })?,
            )
        } else {
            None
        };
        Ok(GpuSampler {
            stop,
            handle,
            started,
            samples,
        })
    }

    /// Seconds since sampling started.
    pub fn now(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// The largest memory in use per GPU index between `from` and `to` (seconds).
    pub fn peak_memory(&self, from: f64, to: f64) -> Vec<(u32, u64)> {
        let s = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        let mut peak: std::collections::BTreeMap<u32, u64> = Default::default();
        for (t, g) in s.iter() {
            if *t >= from && *t <= to {
                if let Some(m) = g.memory_used_bytes {
                    let e = peak.entry(g.index).or_default();
                    *e = (*e).max(m);
                }
            }
        }
        peak.into_iter().collect()
    }

    /// Stop and hand back every sample.
    pub fn stop(mut self) -> Vec<(f64, GpuSample)> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        std::mem::take(&mut *self.samples.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// `YYYYMMDD-HHMMSS` in UTC.
pub fn utc_stamp(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Days since 1970-01-01 to a civil date (proleptic Gregorian).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Seconds since the epoch.
pub fn unix_seconds() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_and_flops() {
        assert_eq!(
            utc_stamp(UNIX_EPOCH + Duration::from_secs(1_700_000_000)),
            "20231114-221320"
        );
        assert_eq!(utc_stamp(UNIX_EPOCH), "19700101-000000");
        // PARAMS_V2: about 9.1 TFLOP per nonce.
        let f = flop_per_nonce(&Params::v2());
        assert!((f / 1e12 - 9.12).abs() < 0.05, "{f}");
        assert!(load_params("v1").is_ok());
        assert!(load_params("no-such-file.json").is_err());
        let (p, name) = load_params("v2-small").unwrap();
        assert_eq!(
            (p.head_dim(), p.ffn_hidden(), name.as_str()),
            (28, 8192, "v2-small")
        );
        p.validate().unwrap();
    }

    #[test]
    fn auto_defaults_fit_the_device() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            bench: BenchArgs,
        }
        let cpu = Cli::parse_from(["bench", "--device", "cpu"]).bench;
        assert_eq!(cpu.params, "auto");
        assert!(cpu.batch_sizes.is_empty());
        let r = cpu.resolved().unwrap();
        assert_eq!(r.params, AUTO_PARAMS_CPU);
        assert_eq!(r.batch_sizes, AUTO_BATCH_SIZES_CPU);
        let given = Cli::parse_from([
            "bench",
            "--device",
            "cpu",
            "--params",
            "v1",
            "--batch-sizes",
            "4",
        ])
        .bench
        .resolved()
        .unwrap();
        assert_eq!((given.params.as_str(), given.batch_sizes), ("v1", vec![4]));
    }
}
