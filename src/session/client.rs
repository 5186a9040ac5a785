//! Outgoing HTTP calls (warmup callbacks, the orchestrator): JSON in and out, one timeout for
//! the whole call, and errors in one line that is safe to log.
//!
//! The URLs come from requests, so their answers are treated as hostile: a reply body is read
//! as a stream and abandoned past [`ClientLimits::max_reply_bytes`] (an endless body costs at
//! most that much memory), and no redirect is followed (a 3xx is a failed call that names its
//! Location). Both are failed calls like a 500, retried wherever a 500 is.

use serde_json::Value;
use std::fmt;
use std::time::Duration;

/// The largest reply body read by default: answers are a few hundred bytes.
pub const DEFAULT_MAX_REPLY_BYTES: usize = 1 << 20;

/// Longest Location shown in an error.
const MAX_LOCATION_SHOWN: usize = 200;

/// A call that did not succeed.
#[derive(Debug, Clone, PartialEq)]
pub enum CallError {
    /// No answer: refused, reset, timed out, DNS.
    Transport(String),
    /// An answer with a non-2xx status.
    Status(u16),
    /// A 3xx answer: redirects are not followed.
    Redirect { status: u16, location: String },
    /// A reply body longer than the limit; what came of it was dropped.
    TooLarge { limit: usize },
    /// A 2xx answer whose body says `"status": "error"`.
    Rejected(String),
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CallError::Transport(s) => write!(f, "no answer ({})", crate::logsafe::scrub(s)),
            CallError::Status(c) => write!(f, "HTTP status {c}"),
            CallError::Redirect { status, location } => write!(
                f,
                "HTTP status {status}, a redirect to {} (redirects are not followed)",
                crate::logsafe::scrub(location)
            ),
            CallError::TooLarge { limit } => write!(
                f,
                "the reply is larger than {limit} bytes (--max-reply-bytes); it was not read"
            ),
            CallError::Rejected(s) => write!(f, "rejected ({})", crate::logsafe::scrub(s)),
        }
    }
}

/// What bounds every outgoing call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientLimits {
    /// For the whole call: connecting, sending, and reading the reply.
    pub timeout: Duration,
    /// The largest reply body read.
    pub max_reply_bytes: usize,
}

impl Default for ClientLimits {
    fn default() -> Self {
        ClientLimits {
            timeout: Duration::from_secs(10),
            max_reply_bytes: DEFAULT_MAX_REPLY_BYTES,
        }
    }
}

/// The client every outgoing call of a session uses. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    max_reply_bytes: usize,
}

impl Client {
    pub fn new(limits: ClientLimits) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .timeout(limits.timeout)
            .connect_timeout(limits.timeout)
            .pool_idle_timeout(Duration::from_secs(30))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("llama-pow/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot set up the HTTP client: {}", error_chain(&e)))?;
        Ok(Client {
            http,
            max_reply_bytes: limits.max_reply_bytes,
        })
    }

    pub async fn post_json(&self, url: &str, body: &Value) -> Result<Value, CallError> {
        self.finish(self.http.post(url).json(body).send().await)
            .await
    }

    pub async fn get_json(&self, url: &str, query: &[(&str, &str)]) -> Result<Value, CallError> {
        self.finish(self.http.get(url).query(query).send().await)
            .await
    }

    async fn finish(
        &self,
        resp: Result<reqwest::Response, reqwest::Error>,
    ) -> Result<Value, CallError> {
        let resp = resp.map_err(|e| CallError::Transport(error_chain(&e)))?;
        let status = resp.status();
        if status.is_redirection() {
            let location = resp
                .headers()
                .get(reqwest::header::LOCATION)
                .map(|l| String::from_utf8_lossy(l.as_bytes()).into_owned())
                .unwrap_or_else(|| "nowhere (no Location header)".into());
            return Err(CallError::Redirect {
                status: status.as_u16(),
                location: location.chars().take(MAX_LOCATION_SHOWN).collect(),
            });
        }
        if !status.is_success() {
            return Err(CallError::Status(status.as_u16()));
        }
        let body = read_capped(resp, self.max_reply_bytes).await?;
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
}

/// The reply body, chunk by chunk, given up (and the connection with it) as soon as it
/// passes `limit` bytes.
async fn read_capped(mut resp: reqwest::Response, limit: usize) -> Result<Vec<u8>, CallError> {
    let too_large = CallError::TooLarge { limit };
    if resp.content_length().is_some_and(|n| n > limit as u64) {
        return Err(too_large);
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| CallError::Transport(error_chain(&e)))?
    {
        if body.len() + chunk.len() > limit {
            return Err(too_large);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
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

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A loopback server that answers every connection with `head` and then, when `endless`,
    /// chunks of a JSON string for as long as the client reads; how many requests it saw.
    async fn stub(
        head: &'static str,
        endless: bool,
    ) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = std::sync::Arc::new(AtomicUsize::new(0));
        let counter = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = sock.read(&mut buf).await;
                    if sock.write_all(head.as_bytes()).await.is_err() || !endless {
                        return;
                    }
                    let chunk = format!("10000\r\n{}\r\n", "a".repeat(0x10000));
                    let _ = sock.write_all(b"2\r\n[\"\r\n").await;
                    while sock.write_all(chunk.as_bytes()).await.is_ok() {}
                });
            }
        });
        (url, seen)
    }

    fn limits(max_reply_bytes: usize) -> ClientLimits {
        ClientLimits {
            timeout: Duration::from_secs(20),
            max_reply_bytes,
        }
    }

    #[tokio::test]
    async fn an_endless_reply_is_abandoned_at_the_limit() {
        let (url, _) = stub(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
            true,
        )
        .await;
        let c = Client::new(limits(1 << 20)).unwrap();
        let t0 = std::time::Instant::now();
        let e = c.get_json(&url, &[]).await.unwrap_err();
        assert_eq!(e, CallError::TooLarge { limit: 1 << 20 });
        assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
        assert!(e.to_string().contains("larger than 1048576 bytes"), "{e}");
        let e = c.post_json(&url, &Value::Null).await.unwrap_err();
        assert_eq!(e, CallError::TooLarge { limit: 1 << 20 });
    }

    #[tokio::test]
    async fn a_declared_length_over_the_limit_is_not_read() {
        let (url, _) = stub("HTTP/1.1 200 OK\r\nContent-Length: 5000000\r\n\r\n", false).await;
        let e = Client::new(limits(1 << 20))
            .unwrap()
            .get_json(&url, &[])
            .await
            .unwrap_err();
        assert_eq!(e, CallError::TooLarge { limit: 1 << 20 });
        // At the limit, an answer is read.
        let (url, _) = stub(
            "HTTP/1.1 200 OK\r\nContent-Length: 16\r\n\r\n{\"status\": \"ok\"}",
            false,
        )
        .await;
        let v = Client::new(limits(16))
            .unwrap()
            .get_json(&url, &[])
            .await
            .unwrap();
        assert_eq!(v["status"], "ok");
    }

    #[tokio::test]
    async fn redirects_are_not_followed() {
        let (url, seen) = stub(
            "HTTP/1.1 307 Temporary Redirect\r\nLocation: http://127.0.0.2:9/steal\r\nContent-Length: 0\r\n\r\n",
            false,
        )
        .await;
        let c = Client::new(limits(1 << 20)).unwrap();
        let e = c
            .post_json(&url, &serde_json::json!({"secret": 1}))
            .await
            .unwrap_err();
        assert_eq!(
            e,
            CallError::Redirect {
                status: 307,
                location: "http://127.0.0.2:9/steal".into()
            }
        );
        assert!(e.to_string().contains("redirects are not followed"), "{e}");
        assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 1);
    }
}
