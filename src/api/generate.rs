//! POST /generate: validate, take the devices (preempting whoever has them), and stream one
//! line per batch that found at least one valid nonce until the job's time limit.

use super::envelope::{bad_request, error_response, read_json, unwrap_envelope};
use super::ndjson::{self, LineSink};
use super::AppState;
use crate::engine::{
    BatchReport, Engine, GenerateJob, Job, JobEnd, JobError, JobEvent, JobHandle, ModelSpec,
    StopReason, SubmitError,
};
use crate::pow::request::{Fields, ProofRequest, RequestError, PROOF_REQUEST_KEYS};
use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};
use serde::Serialize;
use serde_json::Value;

/// A generation request: every field of the contract is required; other top-level keys
/// (the PyWorker may add some) are ignored, while `params` is strict.
pub fn parse_generate(v: &Value) -> Result<ProofRequest, RequestError> {
    let f = Fields::new(v, "request", "")?;
    for key in PROOF_REQUEST_KEYS {
        if f.get(key).is_none() {
            return Err(RequestError(format!("{key}: missing required field")));
        }
    }
    ProofRequest::from_fields(&f)
}

/// Validate a generation request against the contract and the devices.
pub fn validate(engine: &Engine, v: &Value) -> Result<ProofRequest, String> {
    let req = parse_generate(v).map_err(|e| e.to_string())?;
    engine.check(&req.params).map_err(|e| e.to_string())?;
    Ok(req)
}

pub fn job_for(req: &ProofRequest, max_duration: std::time::Duration) -> Job {
    Job::Generate(GenerateJob {
        model: ModelSpec {
            block_hash: req.block_hash.clone(),
            params: req.params.clone(),
        },
        public_key: req.public_key.clone(),
        block_height: req.block_height,
        r_target: req.r_target,
        start_nonce: req.start_nonce,
        batch_size: req
            .batch_size
            .unwrap_or(crate::pow::request::DEFAULT_BATCH_SIZE),
        max_duration,
    })
}

/// The fields every batch result carries, on /generate lines and in /pooled results.
#[derive(Debug, Serialize)]
pub struct BatchFields<'a> {
    pub worker_id: usize,
    pub public_key: &'a str,
    pub block_hash: &'a str,
    pub block_height: u64,
    pub nonces: &'a [u64],
    pub dist: &'a [f64],
    pub node_id: usize,
    pub batch_number: u64,
    pub batch_computed: u64,
    pub batch_valid: u64,
    pub total_computed: u64,
    pub total_valid: u64,
    pub elapsed_seconds: u64,
}

impl<'a> BatchFields<'a> {
    /// A batch's valid nonces and their distances, numbered `batch_number`.
    pub fn of(b: &'a BatchReport, batch_number: u64) -> Self {
        BatchFields {
            worker_id: b.worker_id,
            public_key: &b.public_key,
            block_hash: &b.block_hash,
            block_height: b.block_height,
            nonces: &b.valid_nonces,
            dist: &b.valid_dist,
            node_id: b.worker_id,
            batch_number,
            batch_computed: b.batch_computed(),
            batch_valid: b.batch_valid(),
            total_computed: b.total_computed,
            total_valid: b.total_valid,
            elapsed_seconds: b.elapsed.as_secs(),
        }
    }
}

/// One line of a /generate stream: the batch's fields, then the stream's running totals.
#[derive(Debug, Serialize)]
pub struct GenerateLine<'a> {
    #[serde(flatten)]
    pub batch: BatchFields<'a>,
    pub next_nonce: u64,
    pub aggregated_batch_number: u64,
    pub aggregated_total_computed: u64,
    pub aggregated_total_valid: u64,
    pub n_workers: usize,
}

/// `{"error", "error_type"[, "fatal"]}`.
#[derive(Debug, Serialize)]
pub struct ErrorLine<'a> {
    pub error: &'a str,
    pub error_type: &'a str,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub fatal: bool,
}

impl<'a> ErrorLine<'a> {
    pub fn of(e: &'a JobError) -> Self {
        ErrorLine {
            error: &e.message,
            error_type: e.error_type,
            fatal: e.fatal,
        }
    }
}

pub const PREEMPTED: ErrorLine<'static> = ErrorLine {
    error: "preempted by a newer request",
    error_type: "Preempted",
    fatal: false,
};

pub const SHUTTING_DOWN: ErrorLine<'static> = ErrorLine {
    error: "the server is shutting down",
    error_type: "Shutdown",
    fatal: false,
};

/// What a generation stream did, for /warmup's completion notice.
#[derive(Debug, Default, Clone, Copy)]
pub struct GenerationTotals {
    /// Lines written (batches with at least one valid nonce), over all workers.
    pub batches: u64,
    pub computed: u64,
    pub valid: u64,
    pub client_gone: bool,
}

/// The client went away: stop its job and remember why.
fn stop_for_gone_client(handle: &JobHandle, t: &mut GenerationTotals) {
    tracing::info!(
        job = handle.id,
        "client disconnected: stopping job {}",
        handle.id
    );
    handle.control.stop(StopReason::ClientGone);
    t.client_gone = true;
}

/// Write a generation job's events as lines until it ends or the client goes away.
pub async fn stream_generation(mut handle: JobHandle, sink: &LineSink) -> GenerationTotals {
    let mut t = GenerationTotals::default();
    loop {
        let ev = tokio::select! {
            ev = handle.events.recv() => ev,
            _ = sink.closed() => None,
        };
        let Some(ev) = ev else {
            if sink.is_closed() {
                stop_for_gone_client(&handle, &mut t);
            }
            break;
        };
        let delivered = match ev {
            JobEvent::ModelReady { .. } => true,
            JobEvent::Batch(b) => {
                t.computed += b.batch_computed();
                t.valid += b.batch_valid();
                if b.valid_nonces.is_empty() {
                    true
                } else {
                    t.batches += 1;
                    sink.send(&line(&b, &t)).await
                }
            }
            JobEvent::Error(e) => sink.send(&ErrorLine::of(&e)).await,
            JobEvent::Finished(end) => {
                match end {
                    JobEnd::Stopped(StopReason::Preempted) => {
                        sink.send(&PREEMPTED).await;
                    }
                    JobEnd::Stopped(StopReason::Shutdown) => {
                        sink.send(&SHUTTING_DOWN).await;
                    }
                    _ => {}
                }
                break;
            }
        };
        if !delivered {
            stop_for_gone_client(&handle, &mut t);
            break;
        }
    }
    t
}

fn line<'a>(b: &'a BatchReport, t: &GenerationTotals) -> GenerateLine<'a> {
    GenerateLine {
        // As the reference streams it: batch_number is the running count over all workers.
        batch: BatchFields::of(b, t.batches),
        next_nonce: b.next_nonce,
        aggregated_batch_number: t.batches,
        aggregated_total_computed: t.computed,
        aggregated_total_valid: t.valid,
        n_workers: b.n_workers,
    }
}

/// The HTTP answer to a refused job.
pub fn refused(e: &SubmitError) -> HttpResponse {
    match e {
        SubmitError::ShuttingDown => {
            error_response(StatusCode::SERVICE_UNAVAILABLE, &e.to_string())
        }
        SubmitError::Spawn(_) => error_response(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

/// The first 16 characters, as the reference logs keys and hashes.
pub(crate) fn prefix16(s: &str) -> &str {
    match s.char_indices().nth(16) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

pub async fn generate(state: web::Data<AppState>, payload: web::Payload) -> HttpResponse {
    let v = match read_json(payload, state.cfg.max_body_bytes)
        .await
        .and_then(unwrap_envelope)
    {
        Ok(v) => v,
        Err(e) => return bad_request(&e),
    };
    let req = match validate(&state.engine, &v) {
        Ok(r) => r,
        Err(e) => {
            tracing::info!("generate request refused: {}", super::logsafe::scrub(&e));
            return bad_request(&e);
        }
    };
    if state.shutting_down() {
        return error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down",
        );
    }
    let handle = match state.engine.submit(job_for(&req, state.cfg.max_job)) {
        Ok(h) => h,
        Err(e) => return refused(&e),
    };
    tracing::info!(
        job = handle.id,
        block_height = req.block_height,
        start_nonce = req.start_nonce,
        batch_size = req.batch_size,
        "generate: public key {}..., {}",
        prefix16(&req.public_key),
        req.params
    );
    ndjson::response(move |sink| async move {
        stream_generation(handle, &sink).await;
    })
}
