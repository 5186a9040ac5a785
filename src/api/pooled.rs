//! POST /pooled {orchestrator_url}: the request checked, then a /pooled session
//! ([`crate::session::pooled`]) with that orchestrator streamed.

use super::envelope::{error_response, read_request};
use super::ndjson;
use super::AppState;
use crate::pow::request::Fields;
use crate::session::client;
use crate::session::generation::Bounds;
use crate::session::pooled::{
    self, ClientBounds, Orchestrator, OrchestratorApi, PooledConfig, PooledEnv,
};
use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};
use serde_json::Value;

/// A /pooled request: the orchestrator's URL and the client's optional bounds on the session.
#[derive(Debug, Clone, PartialEq)]
pub struct PooledRequest {
    pub orchestrator_url: String,
    pub bounds: ClientBounds,
}

pub fn parse_pooled(v: &Value) -> Result<PooledRequest, String> {
    let f = Fields::new(v, "request", "").map_err(|e| e.to_string())?;
    let url = f.string("orchestrator_url").map_err(|e| e.to_string())?;
    let bounds = Bounds::parse(&f).map_err(|e| e.to_string())?;
    Ok(PooledRequest {
        orchestrator_url: client::parse_url("orchestrator_url", &url)?,
        bounds: ClientBounds::of(&bounds),
    })
}

pub async fn pooled(state: web::Data<AppState>, payload: web::Payload) -> HttpResponse {
    let (url, bounds) = match read_request(payload, state.cfg.body_limits())
        .await
        .and_then(|v| Ok(parse_pooled(&v)?))
    {
        Ok(r) => (r.orchestrator_url, r.bounds),
        Err(e) => return e.response(),
    };
    if state.shutting_down() {
        return error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down",
        );
    }
    let orch = match Orchestrator::new(&url, state.cfg.client_limits()) {
        Ok(o) => o.with_metrics(state.engine.metrics().clone()),
        Err(e) => return error_response(StatusCode::INTERNAL_SERVER_ERROR, &e),
    };
    tracing::info!(
        "pooled: worker {} for orchestrator {}",
        orch.worker_id(),
        url
    );
    ndjson::response(move |sink| async move {
        let _session = state.sessions.enter();
        let env = PooledEnv {
            engine: state.engine.clone(),
            cfg: PooledConfig {
                client: bounds,
                ..state.cfg.pooled()
            },
            shutdown: state.shutdown.clone(),
        };
        pooled::run(&env, orch, sink).await;
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn pooled_requests() {
        let r = parse_pooled(&json!({"orchestrator_url": "http://127.0.0.1:5/"})).unwrap();
        assert_eq!(r.orchestrator_url, "http://127.0.0.1:5");
        assert_eq!(r.bounds, ClientBounds::default());
        let r = parse_pooled(
            &json!({"orchestrator_url": "http://h", "max_seconds": 1.5, "max_nonces": 9}),
        )
        .unwrap();
        assert_eq!(
            r.bounds,
            ClientBounds {
                max_seconds: Some(std::time::Duration::from_millis(1500)),
                max_nonces: Some(9)
            }
        );
        assert!(
            parse_pooled(&json!({"orchestrator_url": "http://h", "max_nonces": 0}))
                .unwrap_err()
                .contains("max_nonces")
        );
        assert!(parse_pooled(&json!({}))
            .unwrap_err()
            .contains("orchestrator_url: missing"));
        assert!(parse_pooled(&json!({"orchestrator_url": 5}))
            .unwrap_err()
            .contains("expected a string"));
    }
}
