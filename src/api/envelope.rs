//! Request bodies: size- and time-limited reading and JSON (the envelopes they may come in are
//! unwrapped by [`unwrap_envelope`]), and error answers.

use actix_web::{http::StatusCode, web, HttpResponse};
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::time::Duration;

pub use crate::pow::request::unwrap_envelope;

/// The largest request body accepted (requests are a few hundred bytes).
pub const MAX_BODY_BYTES: usize = 1 << 20;
/// How long a request body may take to arrive, whole, by default.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// What bounds a request body.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    pub max_bytes: usize,
    /// For the whole body: a client that trickles it in is cut off all the same.
    pub timeout: Duration,
}

/// Why a request could not be taken from its body.
#[derive(Debug, Clone, PartialEq)]
pub enum BodyError {
    /// The body did not arrive whole in time (408, and the connection is closed).
    TimedOut(Duration),
    /// Too large, unreadable, empty, not JSON, or not a valid request: the message says
    /// which (400).
    Invalid(String),
}

impl BodyError {
    pub fn response(&self) -> HttpResponse {
        match self {
            BodyError::TimedOut(d) => HttpResponse::build(StatusCode::REQUEST_TIMEOUT)
                .force_close()
                .json(json!({
                    "error": format!(
                        "the request body did not arrive within {} s",
                        d.as_secs_f64()
                    )
                })),
            BodyError::Invalid(m) => bad_request(m),
        }
    }
}

impl From<String> for BodyError {
    fn from(message: String) -> Self {
        BodyError::Invalid(message)
    }
}

/// `{"error": message}` with `status`.
pub fn error_response(status: StatusCode, message: &str) -> HttpResponse {
    HttpResponse::build(status).json(json!({ "error": message }))
}

pub fn bad_request(message: &str) -> HttpResponse {
    error_response(StatusCode::BAD_REQUEST, message)
}

/// Read the whole body (at most `limits.max_bytes`, within `limits.timeout`), parse it as
/// JSON and take the request out of its envelope.
pub async fn read_request(payload: web::Payload, limits: BodyLimits) -> Result<Value, BodyError> {
    let v = tokio::time::timeout(limits.timeout, read_json(payload, limits.max_bytes))
        .await
        .map_err(|_| BodyError::TimedOut(limits.timeout))??;
    Ok(unwrap_envelope(v)?)
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

/// A compute request's body read (within `limits`), unwrapped from its envelope and checked by
/// `check` before anything runs; or the answer to send instead: a 400 naming the field
/// (logged, scrubbed, as `what`), a 408 for a body that does not arrive in time, or a 503
/// while the server shuts down.
pub async fn read_compute_request<T>(
    payload: web::Payload,
    limits: BodyLimits,
    what: &str,
    shutting_down: impl Fn() -> bool,
    check: impl FnOnce(&Value) -> Result<T, String>,
) -> Result<T, HttpResponse> {
    let v = read_request(payload, limits)
        .await
        .map_err(|e| e.response())?;
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
