//! What a /pooled session is told: its pacing by the server ([`PooledConfig`]) and its work
//! by the orchestrator ([`WorkerConfig`], updated by every answer).

use crate::engine::Assignment;
use serde_json::Value;
use std::time::Duration;

/// How a /pooled session paces itself (the server's options).
#[derive(Debug, Clone)]
pub struct PooledConfig {
    /// Between two polls of the orchestrator's config.
    pub poll: Duration,
    /// Longest wait for a block hash, and longest computing session.
    pub max: Duration,
    /// Between two heartbeats.
    pub heartbeat: Duration,
    /// Results waiting for the orchestrator at which computing pauses.
    pub max_backlog: usize,
    /// Nonces per batch when the orchestrator does not say.
    pub batch_size: u64,
    /// How long a server shutdown lets the session deliver its results and say goodbye.
    pub shutdown_grace: Duration,
    /// The client's bounds (the /pooled request's `max_seconds` and `max_nonces`): the
    /// whole session's length, and the nonces after which it winds down.
    pub client: ClientBounds,
}

/// What the client of a /pooled session asked for: bounds that end the session early.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ClientBounds {
    /// The session's whole length, from the request to the wind-down.
    pub max_seconds: Option<Duration>,
    /// Wind down once at least this many nonces were computed (batches already in flight
    /// are still delivered).
    pub max_nonces: Option<u64>,
}

impl ClientBounds {
    /// From a request's `max_seconds` and `max_nonces`.
    pub fn of(b: &crate::session::generation::Bounds) -> Self {
        ClientBounds {
            max_seconds: b.max_seconds.map(Duration::from_secs_f64),
            max_nonces: b.max_nonces,
        }
    }
}

/// What the orchestrator has told this worker so far (later answers override fields).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WorkerConfig {
    pub block_hash: Option<String>,
    pub block_height: u64,
    pub r_target: Option<f64>,
    pub params: Option<Value>,
    pub public_key: Option<String>,
    pub range_start: Option<u64>,
    pub range_end: Option<u64>,
    pub batch_size: Option<u64>,
}

impl WorkerConfig {
    /// Take the fields an answer carries.
    pub fn update(&mut self, v: &Value) {
        let get = |k: &str| v.get(k).filter(|x| !x.is_null());
        if let Some(s) = get("block_hash")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
        {
            self.block_hash = Some(s.to_owned());
        }
        if let Some(h) = get("block_height").and_then(Value::as_u64) {
            self.block_height = h;
        }
        if let Some(r) = get("r_target").and_then(Value::as_f64) {
            self.r_target = Some(r);
        }
        if let Some(p) = get("params").filter(|p| p.is_object()) {
            self.params = Some(p.clone());
        }
        if let Some(k) = get("public_key")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
        {
            self.public_key = Some(k.to_owned());
        }
        if let Some(n) = get("nonce_range_start").and_then(Value::as_u64) {
            self.range_start = Some(n);
        }
        if let Some(n) = get("nonce_range_end").and_then(Value::as_u64) {
            self.range_end = Some(n);
        }
        if let Some(n) = get("batch_size").and_then(Value::as_u64).filter(|&n| n > 0) {
            self.batch_size = Some(n);
        }
    }

    /// What to compute, once the key, range and r_target are known and sound.
    pub fn assignment(&self) -> Option<Assignment> {
        let (Some(key), Some(start), Some(end), Some(r)) = (
            &self.public_key,
            self.range_start,
            self.range_end,
            self.r_target,
        ) else {
            return None;
        };
        if end < start || !r.is_finite() || r <= 0.0 {
            return None;
        }
        Some(Assignment {
            public_key: key.clone(),
            block_height: self.block_height,
            r_target: r,
            range_start: start,
            range_end: end,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn config_updates_and_assignments() {
        let mut c = WorkerConfig::default();
        c.update(&json!({"status": "wait"}));
        assert_eq!(c, WorkerConfig::default());
        c.update(
            &json!({"block_hash": "bh", "block_height": 5, "r_target": 1.4, "params": {"dim": 64}}),
        );
        assert_eq!(c.block_hash.as_deref(), Some("bh"));
        assert!(c.assignment().is_none());
        c.update(&json!({"public_key": "pk", "nonce_range_start": 10, "nonce_range_end": 19, "block_hash": null}));
        let a = c.assignment().unwrap();
        assert_eq!((a.range_start, a.range_end, a.block_height), (10, 19, 5));
        assert_eq!(c.block_hash.as_deref(), Some("bh"));
        c.update(&json!({"nonce_range_end": 3}));
        assert!(c.assignment().is_none());
    }
}
