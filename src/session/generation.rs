//! A generation job (/generate, and /warmup once it has its parameters) as NDJSON lines:
//! one line per batch that found at least one valid nonce, an error line for a failure, and
//! the fixed line of a preempted or shut-down job, until the job ends or the client goes away.
//! Once the server shuts down, the stream ends with the shutdown line within
//! [`SHUTDOWN_DRAIN`], whether or not the job has finished by then.

use super::lines::{BatchFields, ErrorLine, GenerateLine, LineSink, PREEMPTED, SHUTTING_DOWN};
use super::Shutdown;
use crate::engine::{
    BatchReport, Engine, GenerateJob, Job, JobEnd, JobEvent, JobHandle, ModelSpec, StopReason,
};
use crate::pow::request::{Fields, ProofRequest, RequestError, PROOF_REQUEST_KEYS};
use serde_json::Value;
use std::time::Duration;

/// How long a stream waits, once the server shuts down, for its job's last events before it
/// writes the shutdown line and ends.
pub const SHUTDOWN_DRAIN: Duration = Duration::from_secs(3);

/// A generation request: every field of the contract is required (every missing one is named
/// in the one error); other top-level keys (the PyWorker may add some) are ignored, while
/// `params` is strict.
pub fn parse_generate(v: &Value) -> Result<ProofRequest, RequestError> {
    let f = Fields::new(v, "request", "")?;
    let missing: Vec<&str> = PROOF_REQUEST_KEYS
        .into_iter()
        .filter(|key| f.get(key).is_none())
        .collect();
    match missing.as_slice() {
        [] => ProofRequest::from_fields(&f),
        [one] => Err(RequestError(format!("{one}: missing required field"))),
        several => Err(RequestError(format!(
            "{}: missing required fields",
            several.join(", ")
        ))),
    }
}

/// Validate a generation request against the contract and the devices.
pub fn validate(engine: &Engine, v: &Value) -> Result<ProofRequest, String> {
    let req = parse_generate(v).map_err(|e| e.to_string())?;
    engine.check(&req.params).map_err(|e| e.to_string())?;
    Ok(req)
}

/// The job of a generation request, limited to `max_duration`.
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

/// Write a generation job's events as lines until it ends or the client goes away; when the
/// server shuts down, end with the shutdown line within [`SHUTDOWN_DRAIN`].
pub async fn stream_generation(
    mut handle: JobHandle,
    sink: &LineSink,
    shutdown: &Shutdown,
) -> GenerationTotals {
    let mut t = GenerationTotals::default();
    let drain = tokio::time::sleep(Duration::MAX);
    tokio::pin!(drain);
    let mut draining = false;
    loop {
        let ev = tokio::select! {
            ev = handle.events.recv() => ev,
            _ = sink.closed() => None,
            _ = shutdown.wait(), if !draining => {
                draining = true;
                drain.as_mut().reset(tokio::time::Instant::now() + SHUTDOWN_DRAIN);
                continue;
            }
            _ = &mut drain => {
                // The job has not finished in time (the engine was told to stop it).
                tracing::info!(job = handle.id, "shutting down: ending the stream of job {}", handle.id);
                sink.send(&SHUTTING_DOWN).await;
                break;
            }
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
                    // A job that ended some other way as the server shuts down: the stream
                    // still says why it ends here.
                    _ if shutdown.is_set() => {
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
