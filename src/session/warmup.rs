//! The /warmup session: poll `{callback_url}/warmup/params?job_id=J` until it hands over a
//! generation request, streaming every status as it happens; then generate like /generate and
//! post `{callback_url}/warmup/complete`. The generation's bounds (`max_seconds`,
//! `max_nonces`) may come in the /warmup request, in the generation request, or both: the
//! tighter of each applies.

use super::client::{self, CallError, Client};
use super::generation::{self, Bounds};
use super::lines::{ErrorLine, LineSink, SHUTTING_DOWN};
use super::Shutdown;
use crate::engine::Engine;
use crate::logsafe::scrub;
use crate::pow::request::unwrap_envelope;
use crate::pow::request::Fields;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// How a /warmup session paces itself.
#[derive(Debug, Clone)]
pub struct WarmupConfig {
    /// Between two polls of the callback for the parameters.
    pub poll: Duration,
    /// Longest wait for the parameters.
    pub max: Duration,
    /// Time limit of the generation.
    pub max_job: Duration,
}

/// What a /warmup session works with.
pub struct WarmupEnv {
    pub engine: Engine,
    pub cfg: WarmupConfig,
    pub shutdown: Shutdown,
}

/// A parsed /warmup request.
#[derive(Debug, Clone, PartialEq)]
pub struct WarmupRequest {
    pub callback_url: String,
    pub job_id: String,
    /// Bounds on the generation to come, on top of the generation request's own.
    pub bounds: Bounds,
}

pub fn parse_warmup(v: &Value) -> Result<WarmupRequest, String> {
    let f = Fields::new(v, "request", "").map_err(|e| e.to_string())?;
    let url = f.string("callback_url").map_err(|e| e.to_string())?;
    let callback_url = client::parse_url("callback_url", &url)?;
    let job_id = match f.get("job_id") {
        None => "unknown".to_owned(),
        Some(Value::String(s)) if !s.is_empty() && s.len() <= 1024 => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(other) => {
            return Err(format!(
                "job_id: expected a non-empty string of at most 1024 bytes, got {other}"
            ))
        }
    };
    let bounds = Bounds::parse(&f).map_err(|e| e.to_string())?;
    Ok(WarmupRequest {
        callback_url,
        job_id,
        bounds,
    })
}

enum Wait {
    Params(Value),
    TimedOut(u64),
    Gone,
}

async fn fetch_params(http: &Client, req: &WarmupRequest) -> Result<Option<Value>, CallError> {
    let url = client::join(&req.callback_url, "/warmup/params");
    let v = http.get_json(&url, &[("job_id", &req.job_id)]).await?;
    if v.get("status").and_then(Value::as_str) == Some("ready") {
        if let Some(p) = v.get("params").filter(|p| !p.is_null()) {
            return Ok(Some(p.clone()));
        }
    }
    Ok(None)
}

async fn wait_for_params(
    env: &WarmupEnv,
    http: &Client,
    req: &WarmupRequest,
    sink: &LineSink,
) -> Wait {
    let start = Instant::now();
    let mut poll_count: u64 = 0;
    let mut failures: u64 = 0;
    loop {
        let elapsed = start.elapsed();
        if elapsed > env.cfg.max {
            return Wait::TimedOut(elapsed.as_secs());
        }
        poll_count += 1;
        let got = tokio::select! {
            r = fetch_params(http, req) => r,
            _ = sink.closed() => return Wait::Gone,
            _ = env.shutdown.wait() => return Wait::Gone,
        };
        match got {
            Ok(Some(p)) => return Wait::Params(p),
            Ok(None) => {}
            Err(e) => {
                failures += 1;
                // Warn at the 1st, 2nd, 4th, 8th... failure in a row.
                if failures.is_power_of_two() {
                    tracing::warn!(
                        "warmup {}: params poll {poll_count} failed ({failures} so far), retrying: {e}",
                        req.job_id
                    );
                }
            }
        }
        let line = json!({
            "status": "warmup_waiting",
            "poll_count": poll_count,
            "elapsed": start.elapsed().as_secs(),
        });
        if !sink.send(&line).await {
            return Wait::Gone;
        }
        tokio::select! {
            _ = tokio::time::sleep(env.cfg.poll) => {}
            _ = sink.closed() => return Wait::Gone,
            _ = env.shutdown.wait() => return Wait::Gone,
        }
    }
}

/// The whole /warmup session for `req`: statuses while waiting for the parameters, then the
/// generation's lines, then the completion notice to the callback.
pub async fn run(env: &WarmupEnv, http: &Client, req: &WarmupRequest, sink: &LineSink) {
    let start = Instant::now();
    if !sink
        .send(&json!({"status": "warmup_ready", "job_id": req.job_id}))
        .await
    {
        return;
    }
    // Bring the devices up while the node makes up its mind.
    let engine = env.engine.clone();
    let _ = std::thread::Builder::new()
        .name("warm-up".into())
        .spawn(move || engine.warm_up());

    let params = match wait_for_params(env, http, req, sink).await {
        Wait::Params(p) => p,
        Wait::TimedOut(elapsed) => {
            tracing::info!("warmup {}: no params after {elapsed} s", req.job_id);
            sink.send(&json!({"status": "warmup_timeout", "elapsed": elapsed}))
                .await;
            return;
        }
        Wait::Gone => {
            if env.shutdown.is_set() {
                sink.send(&SHUTTING_DOWN).await;
            }
            return;
        }
    };
    let gen_req = match unwrap_envelope(params).and_then(|v| generation::validate(&env.engine, &v))
    {
        Ok(mut r) => {
            r.bounds = r.bounds.tighter(req.bounds);
            r
        }
        Err(e) => {
            tracing::warn!(
                "warmup {}: the callback's params are not a valid request: {}",
                req.job_id,
                scrub(&e)
            );
            sink.send(&ErrorLine {
                error: &format!("invalid params from the callback: {e}"),
                error_type: "ValidationError",
                fatal: false,
            })
            .await;
            return;
        }
    };
    let elapsed = start.elapsed().as_secs();
    tracing::info!(
        "warmup {}: params received after {elapsed} s, generating",
        req.job_id
    );
    if !sink
        .send(&json!({"status": "warmup_params_received", "elapsed": elapsed}))
        .await
    {
        return;
    }
    let handle = match env.engine.submit(gen_req.job(env.cfg.max_job)) {
        Ok(h) => h,
        Err(e) => {
            sink.send(&ErrorLine {
                error: &e.to_string(),
                error_type: "Shutdown",
                fatal: false,
            })
            .await;
            return;
        }
    };
    let totals =
        generation::stream_generation(handle, sink, gen_req.ending(env.cfg.max_job), &env.shutdown)
            .await;
    let body = json!({
        "job_id": req.job_id,
        "total_batches": totals.batches,
        "total_computed": totals.computed,
        "total_valid": totals.valid,
    });
    let url = client::join(&req.callback_url, "/warmup/complete");
    for attempt in 1..=3u32 {
        match http.post_json(&url, &body).await {
            Ok(_) => {
                tracing::info!(
                    "warmup {}: completion posted ({} batches, {} computed, {} valid)",
                    req.job_id,
                    totals.batches,
                    totals.computed,
                    totals.valid
                );
                return;
            }
            Err(e) => {
                tracing::warn!(
                    "warmup {}: completion post {attempt} of 3 failed: {e}",
                    req.job_id
                );
                if attempt < 3 {
                    tokio::time::sleep(Duration::from_secs(u64::from(attempt))).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_requests() {
        let r =
            parse_warmup(&json!({"callback_url": "http://127.0.0.1:1/cb/", "job_id": 7})).unwrap();
        assert_eq!(r.callback_url, "http://127.0.0.1:1/cb");
        assert_eq!(r.job_id, "7");
        assert_eq!(
            parse_warmup(&json!({"callback_url": "http://h"}))
                .unwrap()
                .job_id,
            "unknown"
        );
        assert!(parse_warmup(&json!({}))
            .unwrap_err()
            .contains("callback_url: missing"));
        assert!(parse_warmup(&json!({"callback_url": "file:///etc"}))
            .unwrap_err()
            .contains("http://"));
        assert!(
            parse_warmup(&json!({"callback_url": "http://h", "job_id": []}))
                .unwrap_err()
                .contains("job_id")
        );
        let r = parse_warmup(&json!({"callback_url": "http://h", "max_nonces": 64})).unwrap();
        assert_eq!(r.bounds.max_nonces, Some(64));
        assert!(
            parse_warmup(&json!({"callback_url": "http://h", "max_seconds": 0}))
                .unwrap_err()
                .contains("max_seconds")
        );
    }
}
