//! POST /validate: a proof batch checked as a validator checks it. The request is validated
//! before anything runs (every field named in its error), then the validation session
//! ([`crate::session::validation`]) streams a progress line per batch and the verdict.

use super::envelope::{bad_request, error_response, read_json, unwrap_envelope};
use super::ndjson;
use super::AppState;
use crate::session::validation::{self, validate_request};
use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};

/// The largest /validate body accepted: a batch of the most nonces a validation takes
/// ([`crate::pow::validation::MAX_NONCES`]), each with its distance, written out in full.
pub const MAX_VALIDATE_BODY_BYTES: usize = 64 << 20;

pub async fn validate(state: web::Data<AppState>, payload: web::Payload) -> HttpResponse {
    let v = match read_json(
        payload,
        MAX_VALIDATE_BODY_BYTES.max(state.cfg.max_body_bytes),
    )
    .await
    .and_then(unwrap_envelope)
    {
        Ok(v) => v,
        Err(e) => return bad_request(&e),
    };
    let req = match validate_request(&state.engine, &v) {
        Ok(r) => r,
        Err(e) => {
            tracing::info!("validate request refused: {}", crate::logsafe::scrub(&e));
            return bad_request(&e);
        }
    };
    if state.shutting_down() {
        return error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down",
        );
    }
    tracing::info!(
        "validate: {} nonces of public key {}..., {}",
        req.nonces.len(),
        crate::logsafe::prefix16(&req.public_key),
        req.params
    );
    let max = state.cfg.max_job;
    ndjson::response(move |sink| async move {
        validation::run(&state.engine, &req, max, &sink).await;
    })
}
