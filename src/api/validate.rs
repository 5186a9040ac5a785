//! POST /validate: a proof batch checked as a validator checks it. The request is validated
//! before anything runs (every field named in its error), then the validation session
//! ([`crate::session::validation`]) streams a progress line per batch and the verdict.

use super::envelope::{read_compute_request, BodyLimits};
use super::ndjson;
use super::AppState;
use crate::session::validation::{self, validate_request};
use actix_web::{web, HttpResponse};

/// The largest /validate body accepted: a batch of the most nonces a validation takes
/// ([`crate::pow::validation::MAX_NONCES`]), each with its distance, written out in full.
pub const MAX_VALIDATE_BODY_BYTES: usize = 64 << 20;

pub async fn validate(state: web::Data<AppState>, payload: web::Payload) -> HttpResponse {
    let limits = BodyLimits {
        max_bytes: MAX_VALIDATE_BODY_BYTES.max(state.cfg.max_body_bytes),
        ..state.cfg.body_limits()
    };
    let req = match read_compute_request(
        payload,
        limits,
        "validate",
        || state.shutting_down(),
        |v| validate_request(&state.engine, v),
    )
    .await
    {
        Ok(r) => r,
        Err(answer) => return answer,
    };
    tracing::info!(
        "validate: {} nonces of public key {}..., {}",
        req.nonces.len(),
        crate::logsafe::prefix16(&req.public_key),
        req.params
    );
    let max = state.cfg.max_job;
    ndjson::response(move |sink| async move {
        // A session, so that a shutdown lets the stream end with its shutdown line.
        let _session = state.sessions.enter();
        validation::run(&state.engine, &req, max, &sink, &state.shutdown).await;
    })
}
