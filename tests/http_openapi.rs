//! docs/openapi.json against the running server: GET /openapi.json serves it, and every answer
//! the server gives (/health, /metrics, /generate lines, error bodies, /warmup and /pooled lines
//! against stub peers) and every call it makes to those peers is valid against the document's
//! schema for it. A field added, renamed or removed in code without the document fails here.
//!
//! To document one more path: add it to docs/openapi.json, then a test below that sends it
//! requests and checks each answer with [`Contract::check_response`].

mod http_support;

use http_support::*;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const SECS: Duration = Duration::from_secs(1);

/// The document and checks against it.
struct Contract {
    doc: Value,
    /// Validators built so far, by their schema's text (a stream checks thousands of lines).
    validators:
        std::cell::RefCell<std::collections::HashMap<String, std::rc::Rc<jsonschema::Validator>>>,
}

impl Contract {
    fn load() -> Contract {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json");
        let doc = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        Contract {
            doc,
            validators: Default::default(),
        }
    }

    /// The object at `keys` (each one key, unescaped), or a panic naming what is missing.
    fn at(&self, keys: &[&str]) -> &Value {
        let mut v = &self.doc;
        for k in keys {
            v = v
                .get(*k)
                .unwrap_or_else(|| panic!("docs/openapi.json has no {keys:?} (stopped at {k:?})"));
        }
        v
    }

    /// Validate `instance` against `schema`, a schema of the document (its `$ref`s resolve
    /// against the document's components); every violation, or Ok.
    fn validate(&self, schema: &Value, instance: &Value) -> Result<(), String> {
        let key = schema.to_string();
        let cached = self.validators.borrow().get(&key).cloned();
        let validator = cached.unwrap_or_else(|| {
            let root = json!({
                "$schema": "https://json-schema.org/draft/2020-12/schema",
                "allOf": [schema],
                "components": self.doc["components"],
            });
            let v = std::rc::Rc::new(
                jsonschema::validator_for(&root)
                    .unwrap_or_else(|e| panic!("not a valid schema ({e}): {schema}")),
            );
            self.validators.borrow_mut().insert(key, v.clone());
            v
        });
        let errors: Vec<String> = validator
            .iter_errors(instance)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    fn check(&self, what: &str, schema: &Value, instance: &Value) {
        if let Err(e) = self.validate(schema, instance) {
            panic!("{what}: {instance} does not match the document: {e}");
        }
    }

    /// A component schema by name.
    fn schema(&self, name: &str) -> &Value {
        self.at(&["components", "schemas", name])
    }

    /// The media type object documented for `method path` answering `status` with
    /// `content_type` (parameters such as charset may follow the documented type).
    fn media(&self, path: &str, method: &str, status: u16, content_type: &str) -> &Value {
        let content = self.at(&[
            "paths",
            path,
            method,
            "responses",
            &status.to_string(),
            "content",
        ]);
        let obj = content.as_object().unwrap();
        obj.iter()
            .find(|(k, _)| content_type == k.as_str() || content_type.starts_with(&format!("{k};")))
            .map(|(_, v)| v)
            .unwrap_or_else(|| {
                panic!(
                    "{method} {path} {status}: content type {content_type:?} is not documented \
                     (documented: {:?})",
                    obj.keys().collect::<Vec<_>>()
                )
            })
    }

    /// A whole JSON answer of `method path`.
    fn check_response(
        &self,
        path: &str,
        method: &str,
        status: u16,
        content_type: &str,
        body: &Value,
    ) {
        let schema = &self.media(path, method, status, content_type)["schema"];
        self.check(&format!("{method} {path} {status}"), schema, body);
    }

    /// Every line of an NDJSON answer of `method path` against its `itemSchema`.
    fn check_lines(&self, path: &str, method: &str, content_type: &str, lines: &[Value]) {
        let item = &self.media(path, method, 200, content_type)["itemSchema"];
        assert!(item.is_object(), "{method} {path}: no itemSchema");
        for (i, l) in lines.iter().enumerate() {
            self.check(&format!("{method} {path} line {}", i + 1), item, l);
        }
    }

    /// The body the server sent to a peer in callback `name` of `method path`.
    fn check_callback(&self, path: &str, method: &str, name: &str, body: &Value) {
        let cb = self.at(&["paths", path, method, "callbacks", name]);
        let (_, ops) = cb.as_object().unwrap().iter().next().unwrap();
        let (cb_method, op) = ops.as_object().unwrap().iter().next().unwrap();
        let schema = &op["requestBody"]["content"]["application/json"]["schema"];
        self.check(
            &format!("{path} callback {name} ({cb_method})"),
            schema,
            body,
        );
    }
}

fn content_type(headers: &[(String, String)]) -> String {
    headers
        .iter()
        .find(|(k, _)| k == "content-type")
        .map(|(_, v)| v.clone())
        .unwrap_or_default()
}

fn server() -> Server {
    Server::start(&[
        "--max-job-seconds",
        "1.5",
        "--warmup-poll-seconds",
        "0.1",
        "--pooled-poll-seconds",
        "0.1",
        "--pooled-heartbeat-seconds",
        "0.2",
        "--client-timeout-seconds",
        "2",
    ])
}

#[test]
fn the_document_is_served_and_its_schemas_compile() {
    let c = Contract::load();
    let s = server();
    let (status, headers, body) = request_raw(s.port, "GET", "/openapi.json", None);
    assert_eq!(status, 200);
    let served: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(served, c.doc, "GET /openapi.json is docs/openapi.json");
    c.check_response(
        "/openapi.json",
        "get",
        200,
        &content_type(&headers),
        &served,
    );
    for (name, schema) in c.doc["components"]["schemas"].as_object().unwrap() {
        // Compiling each schema resolves every reference in it.
        let _ = c.validate(schema, &Value::Null);
        assert!(schema.is_object(), "{name}");
    }
    // Wrong schemas are caught: the check can fail.
    assert!(c
        .validate(
            c.schema("ErrorLine"),
            &json!({"error": "x", "error_type": "T", "extra": 1})
        )
        .is_err());
    assert!(c
        .validate(c.schema("GenerateLine"), &json!({"status": "finished"}))
        .is_err());
}

#[test]
fn health_metrics_and_error_bodies_match() {
    let c = Contract::load();
    let s = server();
    for method in ["GET", "POST"] {
        let (status, headers, body) = request_raw(s.port, method, "/health", Some(b"{}"));
        let v: Value = serde_json::from_slice(&body).unwrap();
        c.check_response(
            "/health",
            &method.to_lowercase(),
            status,
            &content_type(&headers),
            &v,
        );
    }
    let (status, headers, body) = request_raw(s.port, "GET", "/metrics", None);
    assert_eq!(status, 200);
    let ct = content_type(&headers);
    let media = c.media("/metrics", "get", 200, &ct);
    assert!(media["schema"]["type"] == "string");
    let text = String::from_utf8(body).unwrap();
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("Prometheus text");
    assert!(!scrape.samples.is_empty());

    let bad_requests: [(&str, &[u8], u16); 6] = [
        ("/generate", b"{not json", 400),
        ("/generate", br#"{"block_hash": "x"}"#, 400),
        ("/warmup", br#"{"job_id": 1}"#, 400),
        ("/pooled", br#"{"orchestrator_url": "ftp://x"}"#, 400),
        (
            "/pooled",
            br#"{"orchestrator_url": "http://127.0.0.1:1", "max_nonces": 0}"#,
            400,
        ),
        ("/generate", b"", 400),
    ];
    for (path, body, want) in bad_requests {
        let (status, headers, answer) = request_raw(s.port, "POST", path, Some(body));
        assert_eq!(status, want, "{path} {}", String::from_utf8_lossy(body));
        let v: Value = serde_json::from_slice(&answer).unwrap();
        c.check_response(path, "post", status, &content_type(&headers), &v);
    }
    // params is strict, while unknown top-level keys are ignored.
    let mut req = generate_request(1.4, 8, 0);
    req["params"]["dims"] = json!(64);
    let (status, v) = post(s.port, "/generate", &req);
    assert_eq!(status, 400);
    assert!(v["error"]
        .as_str()
        .unwrap()
        .contains("params.dims: unknown field"));
    // Unknown paths and wrong methods: an ErrorBody too.
    for (method, path, want) in [
        ("GET", "/nope", 404),
        ("GET", "/generate", 405),
        ("POST", "/metrics", 405),
    ] {
        let (status, v) = request(s.port, method, path, None);
        assert_eq!(status, want);
        c.check(&format!("{method} {path}"), c.schema("ErrorBody"), &v);
    }
    s.assert_clean_log();
}

#[test]
fn generate_lines_match_bounded_unbounded_and_preempted() {
    let c = Contract::load();
    let s = server();
    // Bounded by max_nonces: proofs, then the finished line; unknown top-level keys ignored.
    let mut req = generate_request(1.4, 16, 0);
    req["max_nonces"] = json!(100);
    req["added_by_a_proxy"] = json!({"anything": true});
    let st = post_stream(s.port, "/generate", &req);
    assert_eq!(st.status, 200);
    let lines = st.collect(20 * SECS);
    c.check_lines("/generate", "post", &st.content_type, &lines);
    let last = lines.last().unwrap();
    assert_eq!(last["status"], "finished");
    assert_eq!(last["reason"], "max_nonces");
    assert_eq!(last["aggregated_total_computed"], 100);
    let proofs: Vec<u64> = lines[..lines.len() - 1]
        .iter()
        .flat_map(|l| {
            l["nonces"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n.as_u64().unwrap())
        })
        .collect();
    assert!(proofs.iter().all(|&n| n < 100), "only the first 100 nonces");
    assert_eq!(
        proofs.len() as u64,
        last["aggregated_total_valid"].as_u64().unwrap()
    );

    // Bounded by max_seconds, in an envelope.
    let mut req = generate_request(1.4, 16, 0);
    req["max_seconds"] = json!(0.3);
    let st = post_stream(s.port, "/generate", &json!({"input": req}));
    let lines = st.collect(20 * SECS);
    c.check_lines("/generate", "post", &st.content_type, &lines);
    assert_eq!(lines.last().unwrap()["reason"], "max_seconds");

    // Unbounded: the reference's contract, batch lines until the server's limit and no more.
    let st = post_stream(s.port, "/generate", &generate_request(1.4, 16, 0));
    let lines = st.collect(20 * SECS);
    assert!(!lines.is_empty());
    c.check_lines("/generate", "post", &st.content_type, &lines);
    assert!(lines.iter().all(|l| l.get("nonces").is_some()));

    // Preempted: the error line.
    let first = post_stream(s.port, "/generate", &generate_request(1.4, 16, 0));
    assert!(first.next(10 * SECS).is_some());
    let second = post_stream(s.port, "/generate", &generate_request(1.4, 16, 5000));
    let lines = first.collect(20 * SECS);
    c.check_lines("/generate", "post", &first.content_type, &lines);
    assert_eq!(lines.last().unwrap()["error_type"], "Preempted");
    second.disconnect();
    s.assert_clean_log();
}

#[test]
fn warmup_lines_and_callbacks_match() {
    let c = Contract::load();
    let polls = Arc::new(Mutex::new(0usize));
    let p = polls.clone();
    let stub = Stub::start(move |r| match (r.method.as_str(), r.path.as_str()) {
        ("GET", "/warmup/params") => {
            let mut n = p.lock().unwrap();
            *n += 1;
            if *n < 3 {
                ok(json!({"status": "waiting"}))
            } else {
                let mut params = generate_request(1.4, 8, 0);
                params["max_nonces"] = json!(40);
                ok(json!({"status": "ready", "params": params}))
            }
        }
        ("POST", "/warmup/complete") => ok(json!({"status": "ok"})),
        _ => Reply::Json(404, json!({})),
    });
    let s = server();
    let st = post_stream(
        s.port,
        "/warmup",
        &json!({"callback_url": stub.url(), "job_id": "j1"}),
    );
    assert_eq!(st.status, 200);
    let lines = st.collect(30 * SECS);
    c.check_lines("/warmup", "post", &st.content_type, &lines);
    let statuses: Vec<&str> = lines.iter().filter_map(|l| l["status"].as_str()).collect();
    assert_eq!(statuses.first(), Some(&"warmup_ready"));
    assert!(statuses.contains(&"warmup_waiting"));
    assert!(statuses.contains(&"warmup_params_received"));
    assert_eq!(statuses.last(), Some(&"finished"));
    assert!(wait_until(10 * SECS, || !stub
        .requests_to("/warmup/complete")
        .is_empty()));
    let done = &stub.requests_to("/warmup/complete")[0].body;
    c.check_callback("/warmup", "post", "complete", done);
    assert_eq!(done["total_computed"], 40);

    // Params the callback gets wrong: a ValidationError line, valid against the document.
    let stub = Stub::start(|r| match r.path.as_str() {
        "/warmup/params" => ok(json!({"status": "ready", "params": {"block_hash": "x"}})),
        _ => ok(json!({})),
    });
    let st = post_stream(s.port, "/warmup", &json!({"callback_url": stub.url()}));
    let lines = st.collect(30 * SECS);
    c.check_lines("/warmup", "post", &st.content_type, &lines);
    assert_eq!(lines.last().unwrap()["error_type"], "ValidationError");
    s.assert_clean_log();
}

#[test]
fn pooled_lines_and_orchestrator_calls_match() {
    let c = Contract::load();
    let seen: Arc<Mutex<Vec<(String, Value)>>> = Arc::default();
    let delivered = Arc::new(Mutex::new(0u64));
    let (seen_in, delivered_in) = (seen.clone(), delivered.clone());
    let stub = Stub::start(move |r| {
        let p = r.path.clone();
        seen_in.lock().unwrap().push((p.clone(), r.body.clone()));
        let mut d = delivered_in.lock().unwrap();
        if p.ends_with("/results") {
            *d += r.body["batch_computed"].as_u64().unwrap_or(0);
        } else if p.ends_with("/results/batch") {
            *d += r.body["results"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x["batch_computed"].as_u64().unwrap_or(0))
                .sum::<u64>();
        }
        if p.ends_with("/config") {
            if *d >= 64 {
                return ok(json!({"type": "shutdown"}));
            }
            return ok(json!({
                "block_hash": BLOCK_HASH, "block_height": 3, "r_target": 1.4,
                "params": tiny_params(), "public_key": "gonka1pooled",
                "nonce_range_start": 0, "nonce_range_end": 63, "batch_size": 8,
            }));
        }
        ok(json!({"status": "ok"}))
    });
    let s = server();
    let st = post_stream(s.port, "/pooled", &json!({"orchestrator_url": stub.url()}));
    assert_eq!(st.status, 200);
    let lines = st.collect(60 * SECS);
    c.check_lines("/pooled", "post", &st.content_type, &lines);
    let last = lines.last().unwrap();
    assert_eq!(
        (last["status"].as_str(), last["reason"].as_str()),
        (Some("shutdown"), Some("shutdown command"))
    );
    for (path, body) in seen.lock().unwrap().iter() {
        let name = match path.rsplit('/').next().unwrap() {
            "connect" => "connect",
            "ready" => "ready",
            "results" => "results",
            "batch" => "resultsBatch",
            "heartbeat" => "heartbeat",
            "shutdown" => "shutdown",
            "config" => continue,
            other => panic!("unexpected call {other}"),
        };
        c.check_callback("/pooled", "post", name, body);
    }
    assert!(seen
        .lock()
        .unwrap()
        .iter()
        .any(|(p, _)| p.ends_with("/shutdown")));

    // Bounded by the client: the shutdown line names the bound.
    let stub = Stub::start(|r| {
        if r.path.ends_with("/config") {
            return ok(json!({
                "block_hash": BLOCK_HASH, "r_target": 1.4, "params": tiny_params(),
                "public_key": "gonka1pooled", "nonce_range_start": 0,
                "nonce_range_end": 1_000_000_000u64,
            }));
        }
        ok(json!({"status": "ok"}))
    });
    let st = post_stream(
        s.port,
        "/pooled",
        &json!({"orchestrator_url": stub.url(), "max_nonces": 50}),
    );
    let lines = st.collect(60 * SECS);
    c.check_lines("/pooled", "post", &st.content_type, &lines);
    assert_eq!(lines.last().unwrap()["reason"], "max_nonces");
    s.assert_clean_log();
}

#[test]
fn validate_lines_and_errors_match() {
    let c = Contract::load();
    let s = server();
    let g = golden("tiny_f16");
    let batch = json!({
        "block_hash": g["block_hash"], "block_height": 3, "public_key": g["public_key"],
        "params": g["params"], "r_target": g["r_target"],
        "nonces": g["valid_nonces"], "dist": g["valid_dist"], "batch_size": 8,
    });
    c.check("the example batch", c.schema("ValidateRequest"), &batch);
    // Progress lines and the verdict.
    let st = post_stream(s.port, "/validate", &json!({"input": batch.clone()}));
    assert_eq!(st.status, 200);
    let lines = st.collect(30 * SECS);
    assert!(lines.len() >= 2, "{lines:?}");
    c.check_lines("/validate", "post", &st.content_type, &lines);
    // An empty batch: the verdict alone, with its nulls.
    let mut empty = batch.clone();
    empty["nonces"] = json!([]);
    empty["dist"] = json!([]);
    let st = post_stream(s.port, "/validate", &empty);
    c.check_lines(
        "/validate",
        "post",
        &st.content_type,
        &st.collect(10 * SECS),
    );
    // A validation longer than the job limit: progress, then the TimeLimit error line.
    let v2 = golden("v2_shaped_f16");
    let long = json!({
        "block_hash": v2["block_hash"], "block_height": 1, "public_key": v2["public_key"],
        "params": v2["params"], "r_target": 2.0,
        "nonces": (0..20_000u64).collect::<Vec<_>>(), "dist": vec![1.0; 20_000],
    });
    let st = post_stream(s.port, "/validate", &long);
    let lines = st.collect(30 * SECS);
    assert_eq!(lines.last().unwrap()["error_type"], "TimeLimit");
    c.check_lines("/validate", "post", &st.content_type, &lines);
    // Refused before any streaming: an ErrorBody.
    for body in [json!({"block_hash": "x"}), {
        let mut b = batch.clone();
        b["dist"] = json!([9.0]);
        b
    }] {
        let (status, headers, answer) = request_raw(
            s.port,
            "POST",
            "/validate",
            Some(body.to_string().as_bytes()),
        );
        assert_eq!(status, 400);
        let v: Value = serde_json::from_slice(&answer).unwrap();
        c.check_response("/validate", "post", status, &content_type(&headers), &v);
    }
    s.assert_clean_log();
}
