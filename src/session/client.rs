//! Outgoing HTTP calls (warmup callbacks, the orchestrator): JSON in and out, one timeout for
//! the whole call, and errors in one line that is safe to log.

use serde_json::Value;
use std::fmt;
use std::time::Duration;

/// A call that did not succeed.
#[derive(Debug, Clone, PartialEq)]
pub enum CallError {
    /// No answer: refused, reset, timed out, DNS.
    Transport(String),
    /// An answer with a non-2xx status.
    Status(u16),
    /// A 2xx answer whose body says `"status": "error"`.
    Rejected(String),
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CallError::Transport(s) => write!(f, "no answer ({})", crate::logsafe::scrub(s)),
            CallError::Status(c) => write!(f, "HTTP status {c}"),
            CallError::Rejected(s) => write!(f, "rejected ({})", crate::logsafe::scrub(s)),
        }
    }
}

/// The client every outgoing call of a session uses.
pub fn client(timeout: Duration) -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .pool_idle_timeout(Duration::from_secs(30))
        .user_agent(concat!("llama-pow/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("cannot set up the HTTP client: {}", error_chain(&e)))
}

/// An error and its causes on one line (reqwest's own Display hides the cause).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let cs = c.to_string();
        if !s.contains(&cs) {
            s.push_str(": ");
            s.push_str(&cs);
        }
        cur = c.source();
    }
    s
}

async fn finish(resp: Result<reqwest::Response, reqwest::Error>) -> Result<Value, CallError> {
    let resp = resp.map_err(|e| CallError::Transport(error_chain(&e)))?;
    let status = resp.status();
    if !status.is_success() {
        return Err(CallError::Status(status.as_u16()));
    }
    let body = resp
        .bytes()
        .await
        .map_err(|e| CallError::Transport(error_chain(&e)))?;
    let v: Value = if body.iter().all(|b| b.is_ascii_whitespace()) {
        Value::Null
    } else {
        serde_json::from_slice(&body).unwrap_or(Value::Null)
    };
    if v.get("status").and_then(Value::as_str) == Some("error") {
        let msg = v
            .get("message")
            .or_else(|| v.get("error"))
            .map(|m| m.to_string())
            .unwrap_or_else(|| "status error".into());
        return Err(CallError::Rejected(msg));
    }
    Ok(v)
}

pub async fn post_json(
    client: &reqwest::Client,
    url: &str,
    body: &Value,
) -> Result<Value, CallError> {
    finish(client.post(url).json(body).send().await).await
}

pub async fn get_json(
    client: &reqwest::Client,
    url: &str,
    query: &[(&str, &str)],
) -> Result<Value, CallError> {
    finish(client.get(url).query(query).send().await).await
}

/// `base` without trailing slashes, then `path`.
pub fn join(base: &str, path: &str) -> String {
    format!("{}{}", base.trim_end_matches('/'), path)
}

/// Parse a URL the server may call: http or https only.
pub fn parse_url(field: &str, s: &str) -> Result<String, String> {
    match reqwest::Url::parse(s) {
        Ok(u) if (u.scheme() == "http" || u.scheme() == "https") && u.host_str().is_some() => {
            Ok(s.trim_end_matches('/').to_owned())
        }
        Ok(u) => Err(format!(
            "{field}: expected an http:// or https:// URL with a host (got scheme {:?})",
            u.scheme()
        )),
        Err(e) => Err(format!("{field}: not a valid URL ({e})")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("u", "http://127.0.0.1:9/x/").unwrap(),
            "http://127.0.0.1:9/x"
        );
        assert!(parse_url("u", "ftp://h/")
            .unwrap_err()
            .starts_with("u: expected"));
        assert!(parse_url("u", "nonsense")
            .unwrap_err()
            .starts_with("u: not a valid URL"));
        assert_eq!(join("http://h/", "/a"), "http://h/a");
    }
}
