//! The server as a whole: its options ([`ServeConfig`]), what every handler shares
//! ([`AppState`]), and its life ([`serve`]): bind, bring the devices up, print the ready line,
//! serve until SIGTERM / SIGINT / SIGHUP, then shut down gracefully.

use super::envelope::BodyLimits;
use super::routes;
use crate::engine::Engine;
use crate::session::client::ClientLimits;
use crate::session::pooled::PooledConfig;
use crate::session::warmup::WarmupConfig;
use crate::session::Shutdown;
use crate::telemetry::GpuMonitor;
use actix_web::{web, App, HttpServer};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// The line the PyWorker waits for, printed once when the server is ready.
pub const READY_LINE: &str = "Application startup complete.";

/// Connections served at once by default.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

/// The open-file limit (the soft one) of this process, from /proc/self/limits.
fn open_file_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    parse_open_file_limit(&text)
}

fn parse_open_file_limit(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The connections to serve at once: `requested`, cut so that connections leave an eighth of
/// the open-file limit (at least 64 files) for everything else the server opens (outgoing
/// calls, /proc reads, devices). Past the cap new connections wait in the listen backlog
/// instead of failing every accept once the files run out.
pub fn connection_cap(requested: usize, open_file_limit: Option<u64>) -> usize {
    let Some(limit) = open_file_limit else {
        return requested.max(1);
    };
    let reserve = (limit / 8).max(64);
    let room = usize::try_from(limit.saturating_sub(reserve)).unwrap_or(usize::MAX);
    requested.min(room).max(1)
}

/// Everything `serve` can be told.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub host: String,
    pub port: u16,
    /// HTTP worker threads.
    pub http_workers: usize,
    /// /generate (and the generation of /warmup) stops after this long.
    pub max_job: Duration,
    pub warmup_poll: Duration,
    pub warmup_max: Duration,
    pub pooled_poll: Duration,
    /// /pooled: longest wait for a block hash, and longest computing session.
    pub pooled_max: Duration,
    pub pooled_heartbeat: Duration,
    /// /pooled: unsent results at which computing pauses until they are delivered.
    pub pooled_max_backlog: usize,
    /// /pooled: nonces per batch when the orchestrator does not say.
    pub pooled_batch_size: u64,
    /// Timeout of every outgoing call.
    pub client_timeout: Duration,
    /// The largest reply body an outgoing call reads.
    pub max_reply_bytes: usize,
    /// How long SIGTERM / SIGINT / SIGHUP wait for streams to end and sessions to deliver
    /// their results.
    pub shutdown_grace: Duration,
    pub max_body_bytes: usize,
    /// How long a request body may take to arrive, whole.
    pub body_timeout: Duration,
    /// Connections served at once, over all HTTP workers (further ones wait to be accepted);
    /// cut at start-up to stay below the open-file limit ([`connection_cap`]).
    pub max_connections: usize,
}

impl ServeConfig {
    /// How /warmup sessions pace themselves.
    pub fn warmup(&self) -> WarmupConfig {
        WarmupConfig {
            poll: self.warmup_poll,
            max: self.warmup_max,
            max_job: self.max_job,
        }
    }

    /// What bounds a request body.
    pub fn body_limits(&self) -> BodyLimits {
        BodyLimits {
            max_bytes: self.max_body_bytes,
            timeout: self.body_timeout,
        }
    }

    /// What bounds every outgoing call.
    pub fn client_limits(&self) -> ClientLimits {
        ClientLimits {
            timeout: self.client_timeout,
            max_reply_bytes: self.max_reply_bytes,
        }
    }

    /// How /pooled sessions pace themselves.
    pub fn pooled(&self) -> PooledConfig {
        PooledConfig {
            poll: self.pooled_poll,
            max: self.pooled_max,
            heartbeat: self.pooled_heartbeat,
            max_backlog: self.pooled_max_backlog,
            batch_size: self.pooled_batch_size,
            shutdown_grace: self.shutdown_grace,
            client: Default::default(),
        }
    }
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            host: "127.0.0.1".into(),
            port: 18000,
            http_workers: 2,
            max_job: Duration::from_secs(420),
            warmup_poll: Duration::from_secs(5),
            warmup_max: Duration::from_secs(600),
            pooled_poll: Duration::from_millis(500),
            pooled_max: Duration::from_secs(600),
            pooled_heartbeat: Duration::from_secs(10),
            pooled_max_backlog: 1000,
            pooled_batch_size: 32,
            client_timeout: Duration::from_secs(10),
            max_reply_bytes: crate::session::client::DEFAULT_MAX_REPLY_BYTES,
            shutdown_grace: Duration::from_secs(25),
            max_body_bytes: super::envelope::MAX_BODY_BYTES,
            body_timeout: super::envelope::BODY_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// Counts the streaming sessions that must finish (deliver results, notify) before exit.
#[derive(Clone)]
pub struct Sessions {
    running: Arc<watch::Sender<usize>>,
}

impl Default for Sessions {
    fn default() -> Self {
        Sessions {
            running: Arc::new(watch::Sender::new(0)),
        }
    }
}

/// Held by a running session.
pub struct SessionGuard {
    running: Arc<watch::Sender<usize>>,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.running.send_modify(|n| *n -= 1);
    }
}

impl Sessions {
    pub fn enter(&self) -> SessionGuard {
        self.running.send_modify(|n| *n += 1);
        SessionGuard {
            running: self.running.clone(),
        }
    }

    pub fn count(&self) -> usize {
        *self.running.borrow()
    }

    /// Wait until no session runs.
    pub async fn idle(&self) {
        let mut rx = self.running.subscribe();
        let _ = rx.wait_for(|&n| n == 0).await;
    }
}

/// What every handler shares.
pub struct AppState {
    pub engine: Engine,
    pub cfg: ServeConfig,
    pub started: Instant,
    pub sessions: Sessions,
    /// GPU readings for /health and /metrics (none without NVML).
    pub gpus: GpuMonitor,
    pub shutdown: Shutdown,
}

impl AppState {
    pub fn new(engine: Engine, cfg: ServeConfig, shutdown: watch::Receiver<bool>) -> Self {
        Self::with_gpus(engine, cfg, shutdown, GpuMonitor::open())
    }

    pub fn with_gpus(
        engine: Engine,
        cfg: ServeConfig,
        shutdown: watch::Receiver<bool>,
        gpus: GpuMonitor,
    ) -> Self {
        AppState {
            engine,
            cfg,
            started: Instant::now(),
            sessions: Sessions::default(),
            gpus,
            shutdown: Shutdown::new(shutdown),
        }
    }

    pub fn shutting_down(&self) -> bool {
        self.shutdown.is_set()
    }
}

/// Bind, print the ready line, serve until SIGTERM / SIGINT / SIGHUP (all three alike), then
/// shut down gracefully: stop the running job, let streams end with their shutdown line and
/// /pooled sessions deliver their results and say goodbye to the orchestrator (for at most
/// `shutdown_grace`), close the listener.
pub async fn serve(cfg: ServeConfig, engine: Engine) -> anyhow::Result<()> {
    use anyhow::Context;
    use tokio::signal::unix::{signal, SignalKind};

    let mut sigterm = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut sigint = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    // A hang-up (the terminal or the supervisor going away) ends the server as SIGTERM does,
    // with the results delivered, rather than killing it where it stands.
    let mut sighup = signal(SignalKind::hangup()).context("cannot watch SIGHUP")?;

    // A job's buffers go back to the system once it ends, not into the allocator's arenas.
    crate::engine::heap::map_large_blocks();
    let workers = cfg.http_workers.max(1);
    let files = open_file_limit();
    let connections = connection_cap(cfg.max_connections, files);
    if connections < cfg.max_connections {
        tracing::info!(
            "serving at most {connections} connections at once (the open-file limit is {})",
            files.unwrap_or(0)
        );
    }

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let state = web::Data::new(AppState::new(engine.clone(), cfg.clone(), shutdown_rx));
    let app_state = state.clone();
    let server = HttpServer::new(move || App::new().app_data(app_state.clone()).configure(routes))
        .workers(workers)
        // Per worker: new connections wait to be accepted while every worker is full.
        .max_connections(connections.div_ceil(workers).max(1))
        .disable_signals()
        .h1_allow_half_closed(false)
        .shutdown_timeout(2)
        .bind((cfg.host.as_str(), cfg.port))
        .with_context(|| format!("cannot listen on {}:{}", cfg.host, cfg.port))?;
    let addrs: Vec<SocketAddr> = server.addrs();
    let running = server.run();
    let handle = running.handle();
    let mut server_task = actix_web::rt::spawn(running);

    let devices = engine.device_names().join(",");
    let warm = engine.clone();
    actix_web::rt::task::spawn_blocking(move || warm.warm_up())
        .await
        .context("device warm-up failed")?;
    for a in &addrs {
        tracing::info!("listening on {a}");
    }
    tracing::info!(
        "backend ready: {devices} ({} worker(s), dtype {})",
        engine.n_workers(),
        engine.precision()
    );
    if cfg.host != "127.0.0.1" && cfg.host != "localhost" && cfg.host != "::1" {
        tracing::warn!(
            "listening beyond loopback ({}): anyone who reaches this port can spend the devices \
             and make this server call URLs of their choice",
            cfg.host
        );
    }
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{READY_LINE}");
        let _ = out.flush();
    }

    let which = tokio::select! {
        _ = sigterm.recv() => "SIGTERM",
        _ = sigint.recv() => "SIGINT",
        _ = sighup.recv() => "SIGHUP",
        r = &mut server_task => {
            r.context("the HTTP server task failed")?.context("the HTTP server stopped")?;
            return Ok(());
        }
    };
    tracing::info!(
        sessions = state.sessions.count(),
        "{which} received: stopping the job, delivering pending results, then exiting"
    );
    let _ = shutdown_tx.send(true);
    engine.shutdown();
    let grace = cfg.shutdown_grace;
    tokio::select! {
        _ = state.sessions.idle() => {}
        _ = tokio::time::sleep(grace) => {
            tracing::warn!("sessions still running after {:.0} s: exiting anyway", grace.as_secs_f64());
        }
        _ = sigterm.recv() => tracing::warn!("second SIGTERM: exiting now"),
        _ = sigint.recv() => tracing::warn!("second SIGINT: exiting now"),
        _ = sighup.recv() => tracing::warn!("second SIGHUP: exiting now"),
    }
    let e = engine.clone();
    let _ = actix_web::rt::task::spawn_blocking(move || e.wait_idle(Duration::from_secs(5))).await;
    handle.stop(true).await;
    let _ = server_task.await;
    tracing::info!("shut down cleanly");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_stay_below_the_open_file_limit() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            20000                524288               files\n";
        assert_eq!(parse_open_file_limit(limits), Some(20_000));
        assert_eq!(parse_open_file_limit("Max processes 5 5\n"), None);
        // Plenty of files: the request stands.
        assert_eq!(connection_cap(1024, Some(20_000)), 1024);
        // 1024 files: 128 kept for the rest.
        assert_eq!(connection_cap(1024, Some(1024)), 896);
        // Few files: at least 64 kept, at least one connection.
        assert_eq!(connection_cap(1024, Some(256)), 192);
        assert_eq!(connection_cap(1024, Some(10)), 1);
        assert_eq!(connection_cap(1024, None), 1024);
    }
}
