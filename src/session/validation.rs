//! A validation (/validate, `llama-pow validate`): the batch's nonces recomputed on the
//! engine's devices as one job, a progress line per computed batch, then the verdict
//! ([`ValidatedBatch`]) as the last line. A job that does not finish (preempted, stopped, out
//! of time, failed) ends the stream with its error line instead: there is no verdict on part
//! of a batch.

use super::events::{EventReader, Next};
use super::lines::{ErrorLine, LineSink, ValidationProgress, PREEMPTED, SHUTTING_DOWN};
use super::Shutdown;
use crate::engine::{
    Engine, Job, JobEnd, JobEvent, JobHandle, ModelSpec, StopReason, SubmitError, ValidateJob,
};
use crate::pow::request::{Fields, RequestError, DEFAULT_BATCH_SIZE};
use crate::pow::validation::{self, ValidatedBatch, ValidationRequest};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// A /validate request: the contract's fields (unknown top-level keys are ignored, as for
/// /generate: the PyWorker may add its own; `params` is strict), checked against the devices.
pub fn validate_request(engine: &Engine, v: &Value) -> Result<ValidationRequest, String> {
    let f = Fields::new(v, "request", "").map_err(|e| e.to_string())?;
    let req = ValidationRequest::from_fields(&f).map_err(|e: RequestError| e.to_string())?;
    engine.check(&req.params).map_err(|e| e.to_string())?;
    Ok(req)
}

/// The job that recomputes `req`'s nonces, limited to `max_duration`.
pub fn job_for(req: &ValidationRequest, max_duration: Duration) -> Job {
    Job::Validate(ValidateJob {
        model: ModelSpec::new(&req.block_hash, &req.params),
        public_key: req.public_key.clone(),
        block_height: req.block_height,
        r_target: req.r_target,
        nonces: Arc::new(req.nonces.clone()),
        batch_size: req.batch_size.unwrap_or(DEFAULT_BATCH_SIZE),
        max_duration,
    })
}

/// How a validation ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The verdict (also the stream's last line).
    Verdict(Box<ValidatedBatch>),
    /// No verdict: the error line that ended the stream, or why there was none.
    Unfinished(String),
}

/// Validate `req` on `engine`, writing the lines into `sink`. An empty batch has its verdict
/// at once, without a job. Once `shutdown` fires the stream ends with the shutdown line
/// within [`SHUTDOWN_DRAIN`](super::events::SHUTDOWN_DRAIN).
pub async fn run(
    engine: &Engine,
    req: &ValidationRequest,
    max: Duration,
    sink: &LineSink,
    shutdown: &Shutdown,
) -> Outcome {
    if req.nonces.is_empty() {
        return verdict(engine, req, Vec::new(), 0.0, sink).await;
    }
    let handle = match engine.submit(job_for(req, max)) {
        Ok(h) => h,
        Err(e) => {
            let error_type = match e {
                SubmitError::ShuttingDown => "Shutdown",
                SubmitError::Spawn(_) => "InternalError",
            };
            let message = e.to_string();
            sink.send(&ErrorLine {
                error: &message,
                error_type,
                fatal: false,
            })
            .await;
            return Outcome::Unfinished(message);
        }
    };
    stream(engine, handle, req, max, sink, shutdown).await
}

/// Write a validation job's events as lines until it ends or the client goes away.
async fn stream(
    engine: &Engine,
    mut handle: JobHandle,
    req: &ValidationRequest,
    max: Duration,
    sink: &LineSink,
    shutdown: &Shutdown,
) -> Outcome {
    let position: HashMap<u64, usize> = req
        .nonces
        .iter()
        .enumerate()
        .map(|(i, &n)| (n, i))
        .collect();
    let total = req.nonces.len() as u64;
    let mut recomputed: Vec<Option<f64>> = vec![None; req.nonces.len()];
    let (mut done, mut invalid) = (0u64, 0u64);
    let mut compute_seconds = 0f64;
    // What went wrong inside the job, and whether its error line already went out.
    let mut failure: Option<(String, bool)> = None;
    let mut events = EventReader::new(&mut handle, sink, shutdown);
    loop {
        let ev = match events.next().await {
            Next::Event(ev) => ev,
            Next::Gone => {
                let h = events.handle();
                if sink.is_closed() {
                    tracing::info!(
                        job = h.id,
                        "client disconnected: stopping validation {}",
                        h.id
                    );
                    h.control.stop(StopReason::ClientGone);
                }
                return Outcome::Unfinished("the client went away".into());
            }
            Next::ShutDown => return Outcome::Unfinished(SHUTTING_DOWN.error.into()),
        };
        match ev {
            JobEvent::ModelReady { .. } => {}
            JobEvent::Batch(b) => {
                let Some(dist) = &b.dist else {
                    let why = "a validation batch came back without its distances";
                    failure = Some((why.into(), false));
                    events.handle().control.stop(StopReason::Failed);
                    continue;
                };
                for (&n, &d) in b.nonces.iter().zip(dist) {
                    match position.get(&n) {
                        Some(&i) if recomputed[i].is_none() => {
                            recomputed[i] = Some(d);
                            done += 1;
                            invalid += u64::from(validation::is_invalid(d, req.r_target));
                        }
                        _ => {
                            let why = format!("nonce {n} was computed twice or unasked");
                            failure = Some((why, false));
                            events.handle().control.stop(StopReason::Failed);
                        }
                    }
                }
                compute_seconds = compute_seconds.max(b.elapsed.as_secs_f64());
                let progress = ValidationProgress {
                    validated: done,
                    total,
                    n_invalid_so_far: invalid,
                    elapsed_seconds: (b.elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
                };
                if !sink.send(&progress).await {
                    events.handle().control.stop(StopReason::ClientGone);
                    return Outcome::Unfinished("the client went away".into());
                }
            }
            JobEvent::Error(e) => {
                sink.send(&ErrorLine::of(&e)).await;
                failure = Some((e.message, true));
            }
            JobEvent::Finished(end) => {
                return match end {
                    JobEnd::Stopped(StopReason::Preempted) => {
                        sink.send(&PREEMPTED).await;
                        Outcome::Unfinished(PREEMPTED.error.into())
                    }
                    JobEnd::Stopped(StopReason::Shutdown) => {
                        sink.send(&SHUTTING_DOWN).await;
                        Outcome::Unfinished(SHUTTING_DOWN.error.into())
                    }
                    JobEnd::Stopped(StopReason::ClientGone) => {
                        Outcome::Unfinished("the client went away".into())
                    }
                    _ if failure.is_some() => {
                        let (message, sent) = failure.unwrap_or_default();
                        if !sent {
                            sink.send(&ErrorLine {
                                error: &message,
                                error_type: "InternalError",
                                fatal: false,
                            })
                            .await;
                        }
                        Outcome::Unfinished(message)
                    }
                    JobEnd::Stopped(r) => {
                        let message = format!("the validation stopped: {}", r.as_str());
                        sink.send(&ErrorLine {
                            error: &message,
                            error_type: "Stopped",
                            fatal: false,
                        })
                        .await;
                        Outcome::Unfinished(message)
                    }
                    JobEnd::Completed if done < total => {
                        let message = format!(
                            "time limit: {done} of {total} nonces recomputed in {:.0} s; \
                             validate smaller batches or raise the job time limit",
                            max.as_secs_f64()
                        );
                        sink.send(&ErrorLine {
                            error: &message,
                            error_type: "TimeLimit",
                            fatal: false,
                        })
                        .await;
                        Outcome::Unfinished(message)
                    }
                    JobEnd::Completed => {
                        let dist: Vec<f64> = recomputed.into_iter().flatten().collect();
                        verdict(engine, req, dist, compute_seconds, sink).await
                    }
                };
            }
        }
    }
}

/// Judge, count, and write the verdict line.
async fn verdict(
    engine: &Engine,
    req: &ValidationRequest,
    dist: Vec<f64>,
    compute_seconds: f64,
    sink: &LineSink,
) -> Outcome {
    match validation::judge(req, dist, compute_seconds) {
        Ok(v) => {
            engine
                .metrics()
                .validated(req.nonces.len() as u64, v.n_invalid, v.fraud_detected);
            tracing::info!(
                "validation of {} nonces for {}...: {} invalid, probability honest {:.3e}{}",
                req.nonces.len(),
                crate::logsafe::prefix16(&req.public_key),
                v.n_invalid,
                v.probability_honest,
                if v.fraud_detected {
                    ", fraud detected"
                } else {
                    ""
                }
            );
            sink.send(&v).await;
            Outcome::Verdict(Box::new(v))
        }
        Err(message) => {
            sink.send(&ErrorLine {
                error: &message,
                error_type: "DeviceFailure",
                fatal: true,
            })
            .await;
            Outcome::Unfinished(message)
        }
    }
}
