//! `llama-pow serve`: the HTTP server.

use super::devices::{check_fp8_devices, resolve_devices, DeviceChoice, DtypeChoice};
use super::seconds;
use crate::api::{self, ServeConfig};
use crate::backend::{selftest, Backend};
use crate::engine::{Engine, EngineOptions};
use crate::pow::params::Params;
use crate::telemetry::Metrics;
use clap::Args;
use std::sync::Arc;
use std::time::Duration;

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
    /// Time limit of a /generate job (and of /warmup's generation), in seconds; a request may
    /// ask for less with max_seconds (or for a number of nonces with max_nonces).
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
    /// Largest reply body read from a warmup callback or the orchestrator, in bytes; a longer
    /// one is a failed call (retried like a 500).
    #[arg(long, env = "LLAMA_POW_MAX_REPLY_BYTES", default_value_t = 1 << 20,
          value_parser = clap::value_parser!(u64).range(1024..=1 << 30))]
    pub max_reply_bytes: u64,
    /// On SIGTERM / SIGINT / SIGHUP: how long streams may take to end with their shutdown
    /// line and /pooled sessions to deliver their results and notify the orchestrator before
    /// the process exits, in seconds.
    #[arg(long, env = "LLAMA_POW_SHUTDOWN_GRACE_SECONDS", default_value = "25", value_parser = seconds)]
    pub shutdown_grace_seconds: Duration,
    /// The longest a batch should take on a device, in seconds: once a batch has been
    /// measured, batch sizes are cut to what the device computes in this long (never below
    /// one nonce), so that stops and newer requests do not wait long.
    #[arg(long, env = "LLAMA_POW_MAX_BATCH_SECONDS", default_value = "2", value_parser = seconds)]
    pub max_batch_seconds: Duration,
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
    /// How long a request body may take to arrive, whole, in seconds (408 after that).
    #[arg(long, env = "LLAMA_POW_BODY_TIMEOUT_SECONDS", default_value = "10", value_parser = seconds)]
    pub body_timeout_seconds: Duration,
    /// Connections served at once over all HTTP workers; further ones wait to be accepted.
    /// Cut at start-up to stay below the open-file limit.
    #[arg(long, env = "LLAMA_POW_MAX_CONNECTIONS", default_value_t = 1024,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_connections: u64,
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
            max_reply_bytes: self.max_reply_bytes as usize,
            shutdown_grace: self.shutdown_grace_seconds,
            body_timeout: self.body_timeout_seconds,
            max_connections: self.max_connections as usize,
            ..ServeConfig::default()
        }
    }

    /// The devices this build can drive for the chosen `--device`.
    /// When `auto` falls back to the CPU, a warning saying why is logged (call after
    /// logging is set up).
    pub fn devices(&self) -> anyhow::Result<Vec<Arc<dyn Backend>>> {
        let (devices, note) =
            resolve_devices(self.device, &self.group_params()?, self.cuda_graphs)?;
        if let Some(note) = note {
            tracing::warn!("{note}");
        }
        Ok(devices)
    }
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

/// Run the server until SIGTERM / SIGINT. Before the ready line, every device runs the
/// start-up self-test ([`crate::backend::selftest`]): a device that fails it is not used,
/// and with none left the server refuses to start.
pub fn run(args: &ServeArgs) -> anyhow::Result<()> {
    init_logging();
    let devices = args.devices()?;
    if args.dtype.fp8() {
        check_fp8_devices(&devices)?;
    }
    let (devices, selftest) =
        selftest::select(devices, args.dtype.served()).map_err(|e| anyhow::anyhow!(e))?;
    let metrics = Arc::new(Metrics::new());
    metrics.set_selftest(selftest);
    let engine = Engine::with_metrics(
        devices,
        EngineOptions {
            dtype: args.dtype.dtype(),
            fp8: args.dtype.fp8(),
            model_cache: args.model_cache,
            max_batch_duration: args.max_batch_seconds,
            ..EngineOptions::default()
        },
        metrics,
    );
    let cfg = args.config();
    actix_web::rt::System::new().block_on(api::serve(cfg, engine))
}
