//! `llama-pow serve`: the HTTP server.

use crate::api::{self, ServeConfig};
use crate::backend::cuda::{self, CudaUnavailable, GpuInfo};
use crate::engine::cuda_device::CudaDevice;
use crate::engine::groups::{groups_for, GroupDevice, NotEnoughGPUResources};
use crate::engine::{CpuDevice, Device, Engine, EngineOptions};
use crate::pow::dtype::Dtype;
use crate::pow::params::Params;
use clap::{Args, ValueEnum};
use std::sync::Arc;
use std::time::Duration;

/// Where the forward pass runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceChoice {
    /// CUDA when a usable GPU and a CUDA forward pass exist, else the CPU (with a log line
    /// saying why).
    Auto,
    Cpu,
    Cuda,
}

/// The model dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DtypeChoice {
    F32,
    F16,
    Bf16,
    /// FP8 (E4M3) matrix products on sm_89 / sm_90 / sm_100 GPUs, everything else in f16:
    /// the same as f16 with `use_fp8: true` in every request's params.
    Fp8,
}

impl DtypeChoice {
    /// The dtype of the model's activations (f16 for fp8).
    pub fn dtype(self) -> Dtype {
        match self {
            DtypeChoice::F32 => Dtype::F32,
            DtypeChoice::F16 | DtypeChoice::Fp8 => Dtype::F16,
            DtypeChoice::Bf16 => Dtype::Bf16,
        }
    }

    /// Whether the matrix products run in FP8.
    pub fn fp8(self) -> bool {
        self == DtypeChoice::Fp8
    }

    /// The name the command line takes.
    pub fn as_str(self) -> &'static str {
        match self {
            DtypeChoice::F32 => "f32",
            DtypeChoice::F16 => "f16",
            DtypeChoice::Bf16 => "bf16",
            DtypeChoice::Fp8 => "fp8",
        }
    }
}

pub(crate) fn seconds(s: &str) -> Result<Duration, String> {
    let x: f64 = s
        .parse()
        .map_err(|_| format!("expected a number of seconds, got {s:?}"))?;
    if !x.is_finite() || x <= 0.0 || x > 1e9 {
        return Err(format!("expected a positive number of seconds, got {s}"));
    }
    Ok(Duration::from_secs_f64(x))
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on. Loopback by default: the PyWorker reaches the server there.
    /// 0.0.0.0 opens the port to the network, and with it the devices and outgoing calls
    /// to any URL a request names.
    #[arg(long, env = "LLAMA_POW_HOST", default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port, logged as "listening on").
    #[arg(long, env = "LLAMA_POW_PORT", default_value_t = 18000)]
    pub port: u16,
    /// Device to compute on: auto (CUDA when usable, else the CPU), cpu, cuda.
    #[arg(long, env = "LLAMA_POW_DEVICE", value_enum, default_value = "auto")]
    pub device: DeviceChoice,
    /// Model dtype.
    #[arg(long, env = "LLAMA_POW_DTYPE", value_enum, default_value = "f16")]
    pub dtype: DtypeChoice,
    /// Time limit of a /generate job (and of /warmup's generation), in seconds.
    #[arg(long, env = "LLAMA_POW_MAX_JOB_SECONDS", default_value = "420", value_parser = seconds)]
    pub max_job_seconds: Duration,
    /// /warmup: interval between polls of the callback for params, in seconds.
    #[arg(long, env = "LLAMA_POW_WARMUP_POLL_SECONDS", default_value = "5", value_parser = seconds)]
    pub warmup_poll_seconds: Duration,
    /// /warmup: give up waiting for params after this long, in seconds.
    #[arg(long, env = "LLAMA_POW_WARMUP_MAX_SECONDS", default_value = "600", value_parser = seconds)]
    pub warmup_max_seconds: Duration,
    /// /pooled: interval between polls of the orchestrator's config, in seconds.
    #[arg(long, env = "LLAMA_POW_POOLED_POLL_SECONDS", default_value = "0.5", value_parser = seconds)]
    pub pooled_poll_seconds: Duration,
    /// /pooled: longest wait for a block hash, and longest computing session, in seconds.
    #[arg(long, env = "LLAMA_POW_POOLED_MAX_SECONDS", default_value = "600", value_parser = seconds)]
    pub pooled_max_seconds: Duration,
    /// /pooled: interval between heartbeats, in seconds.
    #[arg(long, env = "LLAMA_POW_POOLED_HEARTBEAT_SECONDS", default_value = "10", value_parser = seconds)]
    pub pooled_heartbeat_seconds: Duration,
    /// /pooled: results waiting for the orchestrator at which computing pauses (none is ever
    /// dropped; computing resumes when the backlog is down to half).
    #[arg(long, env = "LLAMA_POW_POOLED_MAX_BACKLOG", default_value_t = 1000)]
    pub pooled_max_backlog: usize,
    /// /pooled: nonces per batch unless the orchestrator's config gives batch_size.
    #[arg(long, env = "LLAMA_POW_POOLED_BATCH_SIZE", default_value_t = 32,
          value_parser = clap::value_parser!(u64).range(1..=65536))]
    pub pooled_batch_size: u64,
    /// Timeout of every call to a warmup callback or the orchestrator, in seconds.
    #[arg(long, env = "LLAMA_POW_CLIENT_TIMEOUT_SECONDS", default_value = "10", value_parser = seconds)]
    pub client_timeout_seconds: Duration,
    /// On SIGTERM / SIGINT: how long /pooled sessions may take to deliver their results and
    /// notify the orchestrator before the process exits, in seconds.
    #[arg(long, env = "LLAMA_POW_SHUTDOWN_GRACE_SECONDS", default_value = "25", value_parser = seconds)]
    pub shutdown_grace_seconds: Duration,
    /// Built models kept across requests (each as large as the model).
    #[arg(long, env = "LLAMA_POW_MODEL_CACHE", default_value_t = 1)]
    pub model_cache: usize,
    /// GPUs are grouped for the memory this preset needs (as the reference does): `v2`
    /// (38 GiB per group; right for every params but PARAMS_V1) or `v1` (10 GiB per group:
    /// more, smaller groups on GPUs under 38 GiB, for a fleet that only serves PARAMS_V1).
    #[arg(long, env = "LLAMA_POW_GROUP_FOR", default_value = "v2",
          value_parser = ["v1", "v2"])]
    pub group_for: String,
    /// Replay each batch size's launch sequence on a GPU as a captured CUDA graph (one launch
    /// per batch instead of thousands; single-GPU groups). Off until measured on a GPU.
    #[arg(long, env = "LLAMA_POW_CUDA_GRAPHS")]
    pub cuda_graphs: bool,
    /// HTTP worker threads.
    #[arg(long, env = "LLAMA_POW_HTTP_WORKERS", default_value_t = 2,
          value_parser = clap::value_parser!(u64).range(1..=64))]
    pub http_workers: u64,
}

impl ServeArgs {
    /// The params whose memory minimum forms the GPU groups (`--group-for`).
    pub fn group_params(&self) -> anyhow::Result<Params> {
        Params::preset(&self.group_for).ok_or_else(|| {
            anyhow::anyhow!("--group-for: expected v1 or v2, got {}", self.group_for)
        })
    }

    pub fn config(&self) -> ServeConfig {
        ServeConfig {
            host: self.host.clone(),
            port: self.port,
            http_workers: self.http_workers as usize,
            max_job: self.max_job_seconds,
            warmup_poll: self.warmup_poll_seconds,
            warmup_max: self.warmup_max_seconds,
            pooled_poll: self.pooled_poll_seconds,
            pooled_max: self.pooled_max_seconds,
            pooled_heartbeat: self.pooled_heartbeat_seconds,
            pooled_max_backlog: self.pooled_max_backlog.max(1),
            pooled_batch_size: self.pooled_batch_size,
            client_timeout: self.client_timeout_seconds,
            shutdown_grace: self.shutdown_grace_seconds,
            ..ServeConfig::default()
        }
    }

    /// The devices this build can drive for the chosen `--device`.
    /// When `auto` falls back to the CPU, a warning saying why is logged (call after
    /// logging is set up).
    pub fn devices(&self) -> anyhow::Result<Vec<Arc<dyn Device>>> {
        let (devices, note) =
            resolve_devices(self.device, &self.group_params()?, self.cuda_graphs)?;
        if let Some(note) = note {
            tracing::warn!("{note}");
        }
        Ok(devices)
    }
}

/// What `--device` resolves to on this machine.
#[derive(Debug, Clone, PartialEq)]
pub enum DevicePlan {
    /// Compute on the CPU; `note` says why not on a GPU when `auto` fell back to it.
    Cpu { note: Option<String> },
    /// Compute on these GPUs.
    Cuda(Vec<GpuInfo>),
}

/// Decide where to compute. `discover` is only called when the choice needs it (not for
/// `cpu`); `has_forward` says whether this build has a CUDA forward pass. `auto` takes CUDA
/// when both a GPU and the forward pass exist, else the CPU with a note saying why; `cuda`
/// fails with the reason instead of falling back.
pub fn plan_devices(
    choice: DeviceChoice,
    discover: impl FnOnce() -> Result<Vec<GpuInfo>, CudaUnavailable>,
    has_forward: bool,
) -> Result<DevicePlan, String> {
    if choice == DeviceChoice::Cpu {
        return Ok(DevicePlan::Cpu { note: None });
    }
    let why_not = match discover() {
        Ok(gpus) if has_forward => return Ok(DevicePlan::Cuda(gpus)),
        Ok(gpus) => {
            let list: Vec<String> = gpus.iter().map(GpuInfo::to_string).collect();
            format!(
                "this build has no CUDA forward pass yet (found {} GPU{}: {})",
                gpus.len(),
                if gpus.len() == 1 { "" } else { "s" },
                list.join("; ")
            )
        }
        Err(why) => why.to_string(),
    };
    match choice {
        DeviceChoice::Cuda => Err(format!(
            "--device cuda: cannot compute on CUDA: {why_not}; use --device cpu (or auto)"
        )),
        _ => Ok(DevicePlan::Cpu {
            note: Some(format!(
                "--device auto: computing on the CPU, not on CUDA: {why_not}"
            )),
        }),
    }
}

/// A worker's devices and, when `auto` fell back to the CPU, the note saying why.
pub type ResolvedDevices = (Vec<Arc<dyn Device>>, Option<String>);

/// The devices of `choice` on this machine: [`plan_devices`] with the machine's CUDA
/// discovery, then the GPUs formed into groups as the reference does (for the minimum memory
/// of `group_for`'s params: see [`crate::engine::groups`]), one worker per group, each group
/// brought up (contexts, kernels compiled for its architecture, cuBLASLt).
///
/// `auto` falls back to the CPU, with a note saying why, when no group can be formed or a
/// GPU cannot be brought up; `cuda` fails instead (no group at all is the reference's fatal
/// NotEnoughGPUResources). `cuda_graphs` turns on CUDA graph replay in the GPU devices.
pub fn resolve_devices(
    choice: DeviceChoice,
    group_for: &Params,
    cuda_graphs: bool,
) -> anyhow::Result<ResolvedDevices> {
    let gpus = match plan_devices(choice, cuda::cuda_available, cuda::HAS_FORWARD) {
        Ok(DevicePlan::Cpu { note }) => return Ok((vec![Arc::new(CpuDevice::new())], note)),
        Ok(DevicePlan::Cuda(gpus)) => gpus,
        Err(why) => return Err(anyhow::anyhow!(why)),
    };
    match cuda_devices(&gpus, group_for, cuda_graphs) {
        Ok((devices, note)) => Ok((devices, note)),
        Err(why) if choice == DeviceChoice::Cuda => Err(anyhow::anyhow!("--device cuda: {why}")),
        Err(why) => Ok((
            vec![Arc::new(CpuDevice::new())],
            Some(format!(
                "--device auto: computing on the CPU, not on CUDA: {why}"
            )),
        )),
    }
}

/// One [`CudaDevice`] per GPU group, and a note naming the GPUs no group could use.
fn cuda_devices(
    gpus: &[GpuInfo],
    group_for: &Params,
    cuda_graphs: bool,
) -> Result<ResolvedDevices, String> {
    let seen: Vec<GroupDevice> = gpus.iter().map(GroupDevice::from).collect();
    let grouping = groups_for(group_for, &seen)
        .map_err(|e| format!("{}: {e}", NotEnoughGPUResources::ERROR_TYPE))?;
    let mut devices: Vec<Arc<dyn Device>> = Vec::with_capacity(grouping.groups.len());
    for group in &grouping.groups {
        let infos: Vec<GpuInfo> = group
            .ordinals
            .iter()
            .filter_map(|o| gpus.iter().find(|g| g.ordinal == *o).cloned())
            .collect();
        let device = CudaDevice::open(&infos)
            .map_err(|e| format!("{} could not be brought up: {e}", group.name()))?
            .with_graphs(cuda_graphs);
        devices.push(Arc::new(device));
    }
    let note = (!grouping.left_out.is_empty()).then(|| {
        let names: Vec<String> = grouping
            .left_out
            .iter()
            .map(|o| format!("cuda:{o}"))
            .collect();
        format!(
            "{} left out: not enough memory to start a GPU group of their own",
            names.join(", ")
        )
    });
    Ok((devices, note))
}

/// Standard output for log events, each event scrubbed of the PyWorker's fatal markers
/// (see [`crate::logsafe`]) before it is written: a request field, a URL or a library's
/// error text cannot make a log line look fatal. Fatal start-up failures are printed by
/// `main` directly, unscrubbed.
struct ScrubbedStdout;

/// One event's bytes, written out scrubbed when the event is complete.
struct ScrubbedEvent(Vec<u8>);

impl std::io::Write for ScrubbedEvent {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for ScrubbedEvent {
    fn drop(&mut self) {
        use std::io::Write;
        if self.0.is_empty() {
            return;
        }
        let text = String::from_utf8_lossy(&self.0);
        let mut line = crate::logsafe::scrub(text.trim_end_matches(['\n', '\r']));
        line.push('\n');
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(line.as_bytes());
        let _ = out.flush();
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for ScrubbedStdout {
    type Writer = ScrubbedEvent;

    fn make_writer(&'a self) -> Self::Writer {
        ScrubbedEvent(Vec::with_capacity(256))
    }
}

/// Logging to standard output, next to the ready line, without colours unless on a terminal.
/// `LLAMA_POW_LOG` (or `RUST_LOG`) sets the filter. A panic (a bug) is logged scrubbed too:
/// it ends the job it happened in, not the server.
pub fn init_logging() {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("LLAMA_POW_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info,actix_server=warn,actix_web=warn,actix_http=warn,hyper=warn,reqwest=warn,rustls=warn".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(filter))
        .with_ansi(std::io::stdout().is_terminal())
        .with_target(false)
        .with_writer(ScrubbedStdout)
        .try_init();
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        tracing::error!(
            "internal failure in thread {}: {}",
            thread.name().unwrap_or("unnamed"),
            crate::logsafe::scrub(&info.to_string())
        );
    }));
}

/// `--dtype fp8` needs every device to multiply in FP8: refused at start-up otherwise (a
/// server that would refuse every request is no server), with the device's own reason.
pub fn check_fp8_devices(devices: &[Arc<dyn Device>]) -> anyhow::Result<()> {
    // A model small enough for any device, with every size a multiple of 16.
    let probe = Params {
        dim: 64,
        n_layers: 1,
        n_heads: 4,
        n_kv_heads: 4,
        vocab_size: 64,
        multiple_of: 32,
        seq_len: 2,
        use_fp8: true,
        ..Params::default()
    };
    for d in devices {
        d.check(&probe, Dtype::F16)
            .map_err(|e| anyhow::anyhow!("--dtype fp8 on {}: {e}", d.name()))?;
    }
    Ok(())
}

/// Run the server until SIGTERM / SIGINT.
pub fn run(args: &ServeArgs) -> anyhow::Result<()> {
    init_logging();
    let devices = args.devices()?;
    if args.dtype.fp8() {
        check_fp8_devices(&devices)?;
    }
    let engine = Engine::new(
        devices,
        EngineOptions {
            dtype: args.dtype.dtype(),
            fp8: args.dtype.fp8(),
            model_cache: args.model_cache,
            ..EngineOptions::default()
        },
    );
    let cfg = args.config();
    actix_web::rt::System::new().block_on(api::serve(cfg, engine))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cuda::CudaLibrary;

    fn h100(ordinal: usize) -> GpuInfo {
        GpuInfo {
            ordinal,
            name: "NVIDIA H100 80GB HBM3".into(),
            compute_capability: (9, 0),
            total_bytes: 85_520_809_984,
            free_bytes: 84_987_133_952,
        }
    }

    fn missing() -> Result<Vec<GpuInfo>, CudaUnavailable> {
        Err(CudaUnavailable::LibraryMissing(CudaLibrary::Driver))
    }

    #[test]
    fn cpu_never_probes_cuda() {
        let plan = plan_devices(DeviceChoice::Cpu, || panic!("probed"), true).unwrap();
        assert_eq!(plan, DevicePlan::Cpu { note: None });
    }

    #[test]
    fn auto_takes_cuda_when_usable_else_says_why() {
        let gpus = vec![h100(0), h100(1)];
        let plan = plan_devices(DeviceChoice::Auto, || Ok(gpus.clone()), true).unwrap();
        assert_eq!(plan, DevicePlan::Cuda(gpus.clone()));

        let DevicePlan::Cpu { note: Some(note) } =
            plan_devices(DeviceChoice::Auto, missing, true).unwrap()
        else {
            panic!("auto without CUDA must fall back to the CPU with a note");
        };
        assert!(note.contains("computing on the CPU"), "{note}");
        assert!(note.contains("libcuda.so.1 not found"), "{note}");

        let DevicePlan::Cpu { note: Some(note) } =
            plan_devices(DeviceChoice::Auto, || Ok(gpus.clone()), false).unwrap()
        else {
            panic!("auto without a CUDA forward pass must fall back to the CPU");
        };
        assert!(note.contains("no CUDA forward pass"), "{note}");
        assert!(note.contains("found 2 GPUs: cuda:0 NVIDIA H100"), "{note}");
    }

    #[test]
    fn cuda_fails_with_the_reason() {
        let e = plan_devices(DeviceChoice::Cuda, missing, true).unwrap_err();
        assert!(
            e.starts_with("--device cuda: cannot compute on CUDA: libcuda.so.1"),
            "{e}"
        );
        let e =
            plan_devices(DeviceChoice::Cuda, || Err(CudaUnavailable::NoDevices), true).unwrap_err();
        assert!(e.contains("sees no GPU"), "{e}");
        let e = plan_devices(DeviceChoice::Cuda, || Ok(vec![h100(0)]), false).unwrap_err();
        assert!(
            e.contains("no CUDA forward pass yet (found 1 GPU: cuda:0"),
            "{e}"
        );
        let plan = plan_devices(DeviceChoice::Cuda, || Ok(vec![h100(0)]), true).unwrap();
        assert_eq!(plan, DevicePlan::Cuda(vec![h100(0)]));
    }

    #[test]
    fn fp8_is_refused_at_start_up_on_the_cpu() {
        let devices: Vec<Arc<dyn Device>> = vec![Arc::new(CpuDevice::new())];
        let e = check_fp8_devices(&devices).unwrap_err().to_string();
        assert!(e.starts_with("--dtype fp8 on cpu: "), "{e}");
        assert!(e.contains("use_fp8"), "{e}");
        assert_eq!(DtypeChoice::Fp8.dtype(), Dtype::F16);
        assert!(DtypeChoice::Fp8.fp8() && !DtypeChoice::Bf16.fp8());
        assert_eq!(DtypeChoice::Fp8.as_str(), "fp8");
    }

    #[test]
    fn this_machine_resolves_without_panicking() {
        let v2 = Params::v2();
        let (devices, note) = resolve_devices(DeviceChoice::Auto, &v2, false).unwrap();
        assert!(!devices.is_empty());
        match cuda::cuda_available() {
            Err(why) => {
                // No usable GPU here: auto takes the CPU and says why; cuda refuses.
                assert_eq!(devices.len(), 1);
                assert_eq!(devices[0].name(), "cpu");
                assert!(note.unwrap().contains(&why.to_string()));
                let e = resolve_devices(DeviceChoice::Cuda, &v2, false)
                    .err()
                    .unwrap()
                    .to_string();
                assert!(e.contains("cannot compute on CUDA"), "{e}");
            }
            Ok(gpus) => {
                eprintln!(
                    "GPUs here: {} found, {} worker(s)",
                    gpus.len(),
                    devices.len()
                );
                assert!(
                    devices[0].name().starts_with("cuda:"),
                    "{}",
                    devices[0].name()
                );
            }
        }
    }
}
