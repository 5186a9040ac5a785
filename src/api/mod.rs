//! The HTTP layer: routes, request bodies and envelopes, NDJSON responses, and one thin
//! handler per endpoint that validates a request, starts its session or job and streams what
//! it writes. What a request does over time lives in [`crate::session`], computing in
//! [`crate::engine`]; the server's options, shared state and life in [`server`].

pub mod envelope;
pub mod generate;
pub mod health;
pub mod metrics;
pub mod ndjson;
pub mod openapi;
pub mod pooled;
pub mod server;
pub mod validate;
pub mod warmup;

pub use server::{serve, AppState, ServeConfig, Sessions, READY_LINE};

use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};

async fn not_found() -> HttpResponse {
    envelope::error_response(
        StatusCode::NOT_FOUND,
        "no such endpoint: use /health, /metrics, /openapi.json, /generate, /validate, /warmup \
         or /pooled",
    )
}

/// 405 naming the methods `allow` lists (and saying so in the Allow header).
fn not_allowed(allow: &'static str) -> HttpResponse {
    let words = allow.replace(", ", " and ");
    let mut r = envelope::error_response(
        StatusCode::METHOD_NOT_ALLOWED,
        &format!("method not allowed: this endpoint takes {words}"),
    );
    r.headers_mut().insert(
        actix_web::http::header::ALLOW,
        actix_web::http::header::HeaderValue::from_static(allow),
    );
    r
}

async fn method_not_allowed() -> HttpResponse {
    not_allowed("POST")
}

async fn get_only() -> HttpResponse {
    not_allowed("GET")
}

async fn get_or_post() -> HttpResponse {
    not_allowed("GET, POST")
}

/// Every route.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/health")
            .route(web::get().to(health::health))
            .route(web::post().to(health::health))
            .default_service(web::to(get_or_post)),
    )
    .service(
        web::resource("/metrics")
            .route(web::get().to(metrics::metrics))
            .default_service(web::to(get_only)),
    )
    .service(
        web::resource("/openapi.json")
            .route(web::get().to(openapi::openapi))
            .default_service(web::to(get_only)),
    )
    .service(
        web::resource("/generate")
            .route(web::post().to(generate::generate))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/warmup")
            .route(web::post().to(warmup::warmup))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/pooled")
            .route(web::post().to(pooled::pooled))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/validate")
            .route(web::post().to(validate::validate))
            .default_service(web::to(method_not_allowed)),
    )
    .default_service(web::to(not_found));
}
