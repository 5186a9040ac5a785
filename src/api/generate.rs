//! POST /generate: validate, take the devices (preempting whoever has them), and stream the
//! generation job's lines ([`crate::session::generation`]) until its time limit.

use super::envelope::{bad_request, error_response, read_request};
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
    let v = match read_request(payload, state.cfg.body_limits()).await {
        Ok(v) => v,
        Err(e) => return e.response(),
    };
    let req = match validate(&state.engine, &v) {
        Ok(r) => r,
        Err(e) => {
            tracing::info!("generate request refused: {}", crate::logsafe::scrub(&e));
            return bad_request(&e);
        }
    };
    if state.shutting_down() {
        return error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down",
        );
    }
    let handle = match state
        .engine
        .submit(generation::job_for(&req, state.cfg.max_job))
    {
        Ok(h) => h,
        Err(e) => return refused(&e),
    };
    tracing::info!(
        job = handle.id,
        block_height = req.block_height,
        start_nonce = req.start_nonce,
        batch_size = req.batch_size,
        "generate: public key {}..., {}",
        prefix16(&req.public_key),
        req.params
    );
    ndjson::response(move |sink| async move {
        // A session, so that a shutdown lets the stream end with its shutdown line.
        let _session = state.sessions.enter();
        generation::stream_generation(handle, &sink, &state.shutdown).await;
    })
}
