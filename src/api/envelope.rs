//! Request bodies: size-limited reading, JSON, and the three envelopes — bare, the PyWorker's
//! `{"auth_data": ..., "payload": {...}}` and the Runpod-style `{"input": {...}}`.

use actix_web::{http::StatusCode, web, HttpResponse};
use futures_util::StreamExt;
use serde_json::{json, Value};

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

/// The request inside its envelope, if any.
pub fn unwrap_envelope(v: Value) -> Result<Value, String> {
    let Value::Object(mut obj) = v else {
        return Ok(v);
    };
    for key in ["payload", "input"] {
        if let Some(inner) = obj.remove(key) {
            return match inner {
                Value::Object(_) => Ok(inner),
                other => Err(format!(
                    "{key}: expected a JSON object (the request), got {}",
                    match other {
                        Value::Null => "null",
                        Value::Bool(_) => "a boolean",
                        Value::Number(_) => "a number",
                        Value::String(_) => "a string",
                        Value::Array(_) => "an array",
                        Value::Object(_) => unreachable!(),
                    }
                )),
            };
        }
    }
    Ok(Value::Object(obj))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes() {
        let r = json!({"a": 1});
        assert_eq!(unwrap_envelope(r.clone()).unwrap(), r);
        assert_eq!(
            unwrap_envelope(json!({"auth_data": {"x": 1}, "payload": r})).unwrap(),
            r
        );
        assert_eq!(unwrap_envelope(json!({"input": r})).unwrap(), r);
        assert!(unwrap_envelope(json!({"payload": "x"}))
            .unwrap_err()
            .contains("payload: expected"));
        assert_eq!(unwrap_envelope(json!([1])).unwrap(), json!([1]));
    }
}
