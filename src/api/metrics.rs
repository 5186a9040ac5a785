//! GET /metrics: the engine's and the server's metrics and the GPU gauges, as Prometheus text.

use super::AppState;
use crate::telemetry::metrics::CONTENT_TYPE;
use actix_web::{web, HttpResponse};
use std::time::Duration;

/// How old GPU readings may be when /health or /metrics hands them out.
pub const GPU_MAX_AGE: Duration = Duration::from_secs(1);

pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    let gpus = state.gpus.recent(GPU_MAX_AGE);
    let text = state.engine.metrics().render(&gpus);
    HttpResponse::Ok().content_type(CONTENT_TYPE).body(text)
}
