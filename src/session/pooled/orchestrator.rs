//! The orchestrator's API for one worker: [`OrchestratorApi`] (what a session asks) and
//! [`ResultPoster`] (where its results go), implemented over HTTP by [`Orchestrator`]. Every
//! call counts in the metrics: failures per call, results delivered.
//!
//! The endpoints, relative to the orchestrator's URL: POST /api/workers/connect
//! {worker_id, gpu_count, gpu_info}; GET /api/workers/{id}/config; POST /api/workers/{id}/ready
//! {gpu_count}; POST /api/workers/{id}/results (one result) and /results/batch {"results"};
//! POST /api/workers/{id}/heartbeat {pending_results}; POST /api/workers/{id}/shutdown {stats}.

use crate::session::client::{self, CallError, Client, ClientLimits};
use crate::telemetry::Metrics;
use serde_json::{json, Value};
use std::sync::Arc;

// Sessions run on one thread of the HTTP server (their futures need not be Send), so the
// traits' async methods carry no Send bound on purpose.

/// Where a session's results go.
#[allow(async_fn_in_trait)]
pub trait ResultPoster {
    /// Post one result.
    async fn post_result(&self, result: &Value) -> Result<Value, CallError>;
    /// Post several results at once.
    async fn post_results(&self, results: &[Value]) -> Result<Value, CallError>;
}

/// The orchestrator as a /pooled session talks to it.
#[allow(async_fn_in_trait)]
pub trait OrchestratorApi: ResultPoster + Clone + 'static {
    /// This worker's id, as registered.
    fn worker_id(&self) -> &str;
    async fn connect(&self, gpu_count: usize, gpu_info: &Value) -> Result<Value, CallError>;
    async fn config(&self) -> Result<Value, CallError>;
    async fn ready(&self, gpu_count: usize) -> Result<Value, CallError>;
    async fn heartbeat(&self, pending: usize) -> Result<Value, CallError>;
    async fn shutdown(&self, stats: &Value) -> Result<Value, CallError>;
}

/// The orchestrator's HTTP API for one worker.
#[derive(Clone)]
pub struct Orchestrator {
    http: Client,
    base: String,
    worker_id: String,
    metrics: Option<Arc<Metrics>>,
}

impl Orchestrator {
    /// A new worker (a fresh id) of the orchestrator at `base`, every call bounded by
    /// `limits`.
    pub fn new(base: &str, limits: ClientLimits) -> Result<Self, String> {
        Ok(Orchestrator {
            http: Client::new(limits)?,
            base: base.to_owned(),
            worker_id: uuid::Uuid::new_v4().to_string(),
            metrics: None,
        })
    }

    /// Count failed calls and delivered results in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Count a failed call; `delivered` results when it succeeded.
    fn record(
        &self,
        call: &str,
        r: Result<Value, CallError>,
        delivered: u64,
    ) -> Result<Value, CallError> {
        if let Some(m) = &self.metrics {
            match &r {
                Ok(_) if delivered > 0 => m.pooled_delivered(delivered),
                Ok(_) => {}
                Err(_) => m.orchestrator_error(call),
            }
        }
        r
    }

    fn url(&self, path: &str) -> String {
        client::join(&self.base, path)
    }

    fn worker_url(&self, path: &str) -> String {
        self.url(&format!("/api/workers/{}{path}", self.worker_id))
    }
}

impl ResultPoster for Orchestrator {
    async fn post_result(&self, r: &Value) -> Result<Value, CallError> {
        let res = self.http.post_json(&self.worker_url("/results"), r).await;
        self.record("results", res, 1)
    }

    async fn post_results(&self, rs: &[Value]) -> Result<Value, CallError> {
        let r = self
            .http
            .post_json(&self.worker_url("/results/batch"), &json!({"results": rs}))
            .await;
        self.record("results_batch", r, rs.len() as u64)
    }
}

impl OrchestratorApi for Orchestrator {
    fn worker_id(&self) -> &str {
        &self.worker_id
    }

    async fn connect(&self, gpu_count: usize, gpu_info: &Value) -> Result<Value, CallError> {
        let body =
            json!({"worker_id": self.worker_id, "gpu_count": gpu_count, "gpu_info": gpu_info});
        let r = self
            .http
            .post_json(&self.url("/api/workers/connect"), &body)
            .await;
        self.record("connect", r, 0)
    }

    async fn config(&self) -> Result<Value, CallError> {
        let r = self.http.get_json(&self.worker_url("/config"), &[]).await;
        self.record("config", r, 0)
    }

    async fn ready(&self, gpu_count: usize) -> Result<Value, CallError> {
        let r = self
            .http
            .post_json(&self.worker_url("/ready"), &json!({"gpu_count": gpu_count}))
            .await;
        self.record("ready", r, 0)
    }

    async fn heartbeat(&self, pending: usize) -> Result<Value, CallError> {
        let r = self
            .http
            .post_json(
                &self.worker_url("/heartbeat"),
                &json!({"pending_results": pending}),
            )
            .await;
        self.record("heartbeat", r, 0)
    }

    async fn shutdown(&self, stats: &Value) -> Result<Value, CallError> {
        let r = self
            .http
            .post_json(&self.worker_url("/shutdown"), &json!({"stats": stats}))
            .await;
        self.record("shutdown", r, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_of_a_worker() {
        let o = Orchestrator::new("http://127.0.0.1:9/orch/", ClientLimits::default()).unwrap();
        assert_eq!(o.worker_id().len(), 36, "a UUID");
        assert_eq!(
            o.url("/api/workers/connect"),
            "http://127.0.0.1:9/orch/api/workers/connect"
        );
        assert_eq!(
            o.worker_url("/results/batch"),
            format!(
                "http://127.0.0.1:9/orch/api/workers/{}/results/batch",
                o.worker_id()
            )
        );
        let other = Orchestrator::new("http://127.0.0.1:9", ClientLimits::default()).unwrap();
        assert_ne!(
            other.worker_id(),
            o.worker_id(),
            "every session is a new worker"
        );
    }

    #[test]
    fn failed_calls_and_delivered_results_are_counted() {
        let m = Arc::new(Metrics::new());
        let o = Orchestrator::new("http://127.0.0.1:9", ClientLimits::default())
            .unwrap()
            .with_metrics(m.clone());
        let _ = o.record("results_batch", Ok(Value::Null), 3);
        let _ = o.record("config", Err(CallError::Status(503)), 0);
        let text = m.render(&[]);
        assert!(
            text.contains("llama_pow_pooled_results_delivered_total 3"),
            "{text}"
        );
        assert!(
            text.contains("llama_pow_orchestrator_errors_total{call=\"config\"} 1"),
            "{text}"
        );
    }
}
