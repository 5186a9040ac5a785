//! POST /generate: validate, take the devices (preempting whoever has them), and stream the
//! generation job's lines ([`crate::session::generation`]) until its time limit or the
//! request's own bounds.

use super::envelope::{error_response, read_compute_request};
use super::ndjson;
use super::AppState;
use crate::engine::SubmitError;
use crate::logsafe::prefix16;
use crate::session::generation::{self, validate};
use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};

/// The HTTP answer to a refused job.
pub fn refused(e: &SubmitError) -> HttpResponse {
    match e {
        SubmitError::ShuttingDown => {
            error_response(StatusCode::SERVICE_UNAVAILABLE, &e.to_string())
        }
        SubmitError::Spawn(_) => error_response(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

pub async fn generate(state: web::Data<AppState>, payload: web::Payload) -> HttpResponse {
    let req = match read_compute_request(
        payload,
        state.cfg.body_limits(),
        "generate",
        || state.shutting_down(),
        |v| validate(&state.engine, v),
    )
    .await
    {
        Ok(r) => r,
        Err(answer) => return answer,
    };
    let handle = match state.engine.submit(req.job(state.cfg.max_job)) {
        Ok(h) => h,
        Err(e) => return refused(&e),
    };
    let proof = &req.proof;
    tracing::info!(
        job = handle.id,
        block_height = proof.block_height,
        start_nonce = proof.start_nonce,
        batch_size = proof.batch_size,
        max_seconds = req.bounds.max_seconds,
        max_nonces = req.bounds.max_nonces,
        "generate: public key {}..., {}",
        prefix16(&proof.public_key),
        proof.params
    );
    let ending = req.ending(state.cfg.max_job);
    ndjson::response(move |sink| async move {
        // A session, so that a shutdown lets the stream end with its shutdown line.
        let _session = state.sessions.enter();
        generation::stream_generation(handle, &sink, ending, &state.shutdown).await;
    })
}
