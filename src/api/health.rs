//! GET and POST /health.

use super::AppState;
use actix_web::{web, HttpResponse};
use serde_json::json;

/// `{"status": "healthy", "cuda_broken": false, "busy": ...}` plus what the engine is doing,
/// the GPUs' readings (`gpus`: an empty list without NVML or GPUs) and the start-up
/// self-test (`selftest`: passed, cases, max_abs_diff, per device; null if none ran).
/// POST bodies (the PyWorker's benchmark posts `{}`) are ignored.
pub async fn health(state: web::Data<AppState>) -> HttpResponse {
    let s = state.engine.status();
    let gpus = state.gpus.recent(super::metrics::GPU_MAX_AGE);
    HttpResponse::Ok().json(json!({
        "status": "healthy",
        "cuda_broken": s.device_failed,
        "busy": s.busy,
        "job": s.job_kind,
        "job_id": s.job_id,
        "job_seconds": s.job_seconds.map(|x| (x * 1000.0).round() / 1000.0),
        "jobs_started": s.jobs_started,
        "models_cached": s.models_cached,
        "sessions": state.sessions.count(),
        "shutting_down": s.shutting_down || state.shutting_down(),
        "device": state.engine.device_names().join(","),
        "n_workers": state.engine.n_workers(),
        "dtype": state.engine.precision(),
        "uptime_seconds": state.started.elapsed().as_secs(),
        "gpus": gpus,
        "selftest": state.engine.metrics().selftest(),
        "version": env!("CARGO_PKG_VERSION"),
    }))
}
