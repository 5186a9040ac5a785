//! Request bodies: size-limited reading and JSON (the envelopes they may come in are unwrapped
//! by [`unwrap_envelope`]), and error answers.

use actix_web::{http::StatusCode, web, HttpResponse};
use futures_util::StreamExt;
use serde_json::{json, Value};

pub use crate::pow::request::unwrap_envelope;

/// The largest request body accepted (requests are a few hundred bytes).
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// `{"error": message}` with `status`.
pub fn error_response(status: StatusCode, message: &str) -> HttpResponse {
    HttpResponse::build(status).json(json!({ "error": message }))
}

pub fn bad_request(message: &str) -> HttpResponse {
    error_response(StatusCode::BAD_REQUEST, message)
}

/// Read the whole body (at most `limit` bytes) and parse it as JSON.
pub async fn read_json(mut payload: web::Payload, limit: usize) -> Result<Value, String> {
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| format!("cannot read the request body: {e}"))?;
        if body.len() + chunk.len() > limit {
            return Err(format!("request body is larger than {limit} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Err("request body is empty: expected a JSON object".into());
    }
    serde_json::from_slice(&body).map_err(|e| format!("request is not valid JSON: {e}"))
}

/// A compute request's body read (at most `limit` bytes), unwrapped from its envelope and
/// checked by `check` before anything runs; or the answer to send instead: a 400 naming the
/// field (logged, scrubbed, as `what`), or a 503 while the server shuts down.
pub async fn read_compute_request<T>(
    payload: web::Payload,
    limit: usize,
    what: &str,
    shutting_down: impl Fn() -> bool,
    check: impl FnOnce(&Value) -> Result<T, String>,
) -> Result<T, HttpResponse> {
    let v = read_json(payload, limit)
        .await
        .and_then(unwrap_envelope)
        .map_err(|e| bad_request(&e))?;
    let req = check(&v).map_err(|e| {
        tracing::info!("{what} request refused: {}", crate::logsafe::scrub(&e));
        bad_request(&e)
    })?;
    if shutting_down() {
        return Err(error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down",
        ));
    }
    Ok(req)
}
