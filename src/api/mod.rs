//! The HTTP server: routes, envelopes, NDJSON streams, the warmup callback client and the
//! orchestrator client of /pooled. Computation lives in [`crate::engine`]; handlers validate,
//! submit a job and write its events out as lines.

pub mod client;
pub mod envelope;
pub mod generate;
pub mod health;
pub mod metrics;
pub use crate::logsafe;
pub mod ndjson;
pub mod pooled;
pub mod warmup;

use crate::engine::Engine;
use crate::telemetry::GpuMonitor;
use actix_web::http::StatusCode;
use actix_web::{web, App, HttpResponse, HttpServer};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify};

/// The line the PyWorker waits for, printed once when the server is ready.
pub const READY_LINE: &str = "Application startup complete.";

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
    /// How long SIGTERM waits for sessions to deliver their results.
    pub shutdown_grace: Duration,
    pub max_body_bytes: usize,
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
            shutdown_grace: Duration::from_secs(25),
            max_body_bytes: envelope::MAX_BODY_BYTES,
        }
    }
}

/// Counts the streaming sessions that must finish (deliver results, notify) before exit.
#[derive(Clone, Default)]
pub struct Sessions {
    inner: Arc<(AtomicUsize, Notify)>,
}

/// Held by a running session.
pub struct SessionGuard {
    inner: Arc<(AtomicUsize, Notify)>,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.inner.0.fetch_sub(1, Ordering::SeqCst);
        self.inner.1.notify_waiters();
    }
}

impl Sessions {
    pub fn enter(&self) -> SessionGuard {
        self.inner.0.fetch_add(1, Ordering::SeqCst);
        SessionGuard {
            inner: self.inner.clone(),
        }
    }

    pub fn count(&self) -> usize {
        self.inner.0.load(Ordering::SeqCst)
    }

    /// Wait until no session runs.
    pub async fn idle(&self) {
        loop {
            let notified = self.inner.1.notified();
            if self.count() == 0 {
                return;
            }
            // Wake up now and then in case a notification raced the check.
            let _ = tokio::time::timeout(Duration::from_millis(100), notified).await;
        }
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
    shutdown: watch::Receiver<bool>,
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
            shutdown,
        }
    }

    pub fn shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Resolves once the server has begun to shut down.
    pub async fn shutdown_signal(&self) {
        let mut rx = self.shutdown.clone();
        let _ = rx.wait_for(|v| *v).await;
    }
}

async fn not_found() -> HttpResponse {
    envelope::error_response(
        StatusCode::NOT_FOUND,
        "no such endpoint: use /health, /metrics, /generate, /warmup or /pooled",
    )
}

async fn method_not_allowed() -> HttpResponse {
    envelope::error_response(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed: this endpoint takes POST",
    )
}

async fn get_only() -> HttpResponse {
    envelope::error_response(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed: this endpoint takes GET",
    )
}

/// Every route.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/health")
            .route(web::get().to(health::health))
            .route(web::post().to(health::health))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/metrics")
            .route(web::get().to(metrics::metrics))
            .default_service(web::to(get_only)),
    )
    .service(
        web::resource("/generate")
            .route(web::post().to(generate::generate))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/warmup")
            .route(web::post().to(warmup::warmup))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/pooled")
            .route(web::post().to(pooled::pooled))
            .default_service(web::to(method_not_allowed)),
    )
    .default_service(web::to(not_found));
}

/// Bind, print the ready line, serve until SIGTERM / SIGINT, then shut down gracefully:
/// stop the running job, let /pooled sessions deliver their results and say goodbye to the
/// orchestrator (for at most `shutdown_grace`), close the listener.
pub async fn serve(cfg: ServeConfig, engine: Engine) -> anyhow::Result<()> {
    use anyhow::Context;
    use tokio::signal::unix::{signal, SignalKind};

    let mut sigterm = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut sigint = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let state = web::Data::new(AppState::new(engine.clone(), cfg.clone(), shutdown_rx));
    let app_state = state.clone();
    let server = HttpServer::new(move || App::new().app_data(app_state.clone()).configure(routes))
        .workers(cfg.http_workers.max(1))
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
    }
    let e = engine.clone();
    let _ = actix_web::rt::task::spawn_blocking(move || e.wait_idle(Duration::from_secs(5))).await;
    handle.stop(true).await;
    let _ = server_task.await;
    tracing::info!("shut down cleanly");
    Ok(())
}
