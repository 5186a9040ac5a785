//! POST /warmup {callback_url, job_id?}: the request checked, then the /warmup session
//! ([`crate::session::warmup`]) streamed.

use super::envelope::read_request;
use super::ndjson;
use super::AppState;
use crate::session::client::Client;
use crate::session::warmup::{self, parse_warmup, WarmupEnv};
use actix_web::{web, HttpResponse};

pub async fn warmup(state: web::Data<AppState>, payload: web::Payload) -> HttpResponse {
    let req = match read_request(payload, state.cfg.body_limits())
        .await
        .and_then(|v| Ok(parse_warmup(&v)?))
    {
        Ok(r) => r,
        Err(e) => return e.response(),
    };
    let http = match Client::new(state.cfg.client_limits()) {
        Ok(c) => c,
        Err(e) => {
            return super::envelope::error_response(
                actix_web::http::StatusCode::INTERNAL_SERVER_ERROR,
                &e,
            )
        }
    };
    tracing::info!("warmup: job {}, waiting for params", req.job_id);
    ndjson::response(move |sink| async move {
        let _session = state.sessions.enter();
        let env = WarmupEnv {
            engine: state.engine.clone(),
            cfg: state.cfg.warmup(),
            shutdown: state.shutdown.clone(),
        };
        warmup::run(&env, &http, &req, &sink).await;
    })
}
