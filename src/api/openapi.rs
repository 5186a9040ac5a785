//! GET /openapi.json: the HTTP API as an OpenAPI 3.2 document, the file `docs/openapi.json`
//! built into the binary. `tests/http_openapi.rs` holds the server's real answers to it.

use actix_web::HttpResponse;

/// The document, as written in the repository.
pub const DOCUMENT: &str = include_str!("../../docs/openapi.json");

pub async fn openapi() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(DOCUMENT)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_document_is_json_and_names_every_route() {
        let doc: serde_json::Value = serde_json::from_str(super::DOCUMENT).unwrap();
        assert_eq!(doc["openapi"], "3.2.0");
        for path in [
            "/health",
            "/metrics",
            "/openapi.json",
            "/generate",
            "/warmup",
            "/pooled",
        ] {
            assert!(doc["paths"].get(path).is_some(), "{path} is not documented");
        }
    }
}
