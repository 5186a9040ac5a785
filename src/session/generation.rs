//! A generation job (/generate, and /warmup once it has its parameters) as NDJSON lines:
//! one line per batch that found at least one valid nonce, an error line for a failure, and
//! the fixed line of a preempted or shut-down job, until the job ends or the client goes away.
//! A request that sets its own bounds (`max_seconds`, `max_nonces`) gets one more line at the
//! end, [`FinishedLine`], saying which limit ended it; one that does not keeps the
//! reference's contract, where the stream simply ends at the server's job limit.
//!
//! Once the server shuts down, the stream ends with the shutdown line within
//! [`SHUTDOWN_DRAIN`](super::events::SHUTDOWN_DRAIN), whether or not the job has finished by
//! then.

use super::events::{EventReader, Next};
use super::lines::{
    BatchFields, ErrorLine, FinishReason, FinishedLine, GenerateLine, LineSink, PREEMPTED,
    SHUTTING_DOWN,
};
use super::Shutdown;
use crate::engine::{
    BatchReport, Engine, GenerateJob, Job, JobEnd, JobEvent, JobHandle, ModelSpec, StopReason,
};
use crate::pow::request::{Fields, ProofRequest, RequestError, PROOF_REQUEST_KEYS};
use serde_json::Value;
use std::time::{Duration, Instant};

/// The longest `max_seconds` a request may give (it is cut to the server's job limit anyway).
pub const MAX_SECONDS_LIMIT: f64 = 1e9;

/// Limits a client may put on its own generation, each optional. Both end the stream with a
/// [`FinishedLine`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Bounds {
    /// Seconds of computing; no batch starts after it. Cut to the server's job limit.
    pub max_seconds: Option<f64>,
    /// Compute nonces `start_nonce ..= start_nonce + max_nonces - 1` (all of them, each once)
    /// and end.
    pub max_nonces: Option<u64>,
}

impl Bounds {
    /// `max_seconds` (a positive number) and `max_nonces` (a positive integer) of a request
    /// object, when present.
    pub fn parse(f: &Fields<'_>) -> Result<Bounds, RequestError> {
        let max_seconds = match f.f64_opt("max_seconds")? {
            Some(s) if !(s.is_finite() && s > 0.0 && s <= MAX_SECONDS_LIMIT) => {
                return Err(RequestError(format!(
                    "max_seconds: must be a positive number of seconds (got {s})"
                )))
            }
            other => other,
        };
        let max_nonces = f.positive_opt("max_nonces", u64::MAX)?;
        Ok(Bounds {
            max_seconds,
            max_nonces,
        })
    }

    /// Whether the client set either bound (then the stream ends with a [`FinishedLine`]).
    pub fn is_set(&self) -> bool {
        self.max_seconds.is_some() || self.max_nonces.is_some()
    }

    /// The tighter of two sets of bounds, bound by bound.
    pub fn tighter(self, other: Bounds) -> Bounds {
        fn min<T: PartialOrd>(a: Option<T>, b: Option<T>) -> Option<T> {
            match (a, b) {
                (Some(a), Some(b)) => Some(if b < a { b } else { a }),
                (a, b) => a.or(b),
            }
        }
        Bounds {
            max_seconds: min(self.max_seconds, other.max_seconds),
            max_nonces: min(self.max_nonces, other.max_nonces),
        }
    }

    /// How long the job may compute under a server whose job limit is `server_limit`.
    pub fn duration(&self, server_limit: Duration) -> Duration {
        match self.max_seconds {
            Some(s) => Duration::from_secs_f64(s).min(server_limit),
            None => server_limit,
        }
    }

    /// Why a job that ran to completion ended, having computed `computed` nonces.
    pub fn reason(&self, computed: u64, server_limit: Duration) -> FinishReason {
        if self.max_nonces.is_some_and(|n| computed >= n) {
            FinishReason::MaxNonces
        } else if self
            .max_seconds
            .is_some_and(|s| Duration::from_secs_f64(s) < server_limit)
        {
            FinishReason::MaxSeconds
        } else {
            FinishReason::TimeLimit
        }
    }
}

/// A generation request: the proof fields and the client's own bounds.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    pub proof: ProofRequest,
    pub bounds: Bounds,
}

/// A generation request: every field of the contract is required (every missing one is named
/// in the one error); other top-level keys (the PyWorker may add some) are ignored, while
/// `params` is strict.
pub fn parse_generate(v: &Value) -> Result<GenerateRequest, RequestError> {
    let f = Fields::new(v, "request", "")?;
    let missing: Vec<&str> = PROOF_REQUEST_KEYS
        .into_iter()
        .filter(|key| f.get(key).is_none())
        .collect();
    match missing.as_slice() {
        [] => Ok(GenerateRequest {
            proof: ProofRequest::from_fields(&f)?,
            bounds: Bounds::parse(&f)?,
        }),
        [one] => Err(RequestError(format!("{one}: missing required field"))),
        several => Err(RequestError(format!(
            "{}: missing required fields",
            several.join(", ")
        ))),
    }
}

/// Validate a generation request against the contract and the devices.
pub fn validate(engine: &Engine, v: &Value) -> Result<GenerateRequest, String> {
    let req = parse_generate(v).map_err(|e| e.to_string())?;
    engine.check(&req.proof.params).map_err(|e| e.to_string())?;
    Ok(req)
}

impl GenerateRequest {
    /// The job of this request under a server whose job limit is `server_limit`.
    pub fn job(&self, server_limit: Duration) -> Job {
        let req = &self.proof;
        Job::Generate(GenerateJob {
            model: ModelSpec::new(&req.block_hash, &req.params),
            public_key: req.public_key.clone(),
            block_height: req.block_height,
            r_target: req.r_target,
            start_nonce: req.start_nonce,
            batch_size: req
                .batch_size
                .unwrap_or(crate::pow::request::DEFAULT_BATCH_SIZE),
            max_duration: self.bounds.duration(server_limit),
            max_nonces: self.bounds.max_nonces,
        })
    }

    /// How the stream of this request ends (see [`Ending`]).
    pub fn ending(&self, server_limit: Duration) -> Ending {
        Ending {
            bounds: self.bounds,
            server_limit,
        }
    }
}

/// What a stream needs to say why it ended: the client's bounds and the server's job limit.
#[derive(Debug, Clone, Copy)]
pub struct Ending {
    pub bounds: Bounds,
    pub server_limit: Duration,
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

/// Write a generation job's events as lines until it ends or the client goes away; a
/// bounded request's job that completes gets a [`FinishedLine`] last; when the server shuts
/// down, the stream ends with the shutdown line within
/// [`SHUTDOWN_DRAIN`](super::events::SHUTDOWN_DRAIN).
pub async fn stream_generation(
    mut handle: JobHandle,
    sink: &LineSink,
    ending: Ending,
    shutdown: &Shutdown,
) -> GenerationTotals {
    let started = Instant::now();
    let mut t = GenerationTotals::default();
    let mut events = EventReader::new(&mut handle, sink, shutdown);
    loop {
        let ev = match events.next().await {
            Next::Event(ev) => ev,
            Next::Gone => {
                if sink.is_closed() {
                    stop_for_gone_client(events.handle(), &mut t);
                }
                break;
            }
            Next::ShutDown => break,
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
                    JobEnd::Completed if ending.bounds.is_set() => {
                        sink.send(&FinishedLine {
                            status: "finished",
                            reason: ending.bounds.reason(t.computed, ending.server_limit),
                            seconds: (started.elapsed().as_secs_f64() * 1000.0).round() / 1000.0,
                            aggregated_batch_number: t.batches,
                            aggregated_total_computed: t.computed,
                            aggregated_total_valid: t.valid,
                        })
                        .await;
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
            stop_for_gone_client(events.handle(), &mut t);
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn request() -> Value {
        json!({
            "block_hash": "bh", "block_height": 1, "public_key": "pk", "r_target": 1.4,
            "batch_size": 4, "start_nonce": 0,
            "params": {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 4,
                       "vocab_size": 100, "multiple_of": 32, "seq_len": 8},
            "added_by_a_proxy": {"ignored": true},
        })
    }

    #[test]
    fn bounds_are_optional_checked_and_cut_to_the_server_limit() {
        let r = parse_generate(&request()).unwrap();
        assert_eq!(r.bounds, Bounds::default());
        assert!(!r.bounds.is_set());
        let limit = Duration::from_secs(420);
        assert_eq!(r.bounds.duration(limit), limit);

        let mut v = request();
        v["max_seconds"] = json!(2.5);
        v["max_nonces"] = json!(100);
        let r = parse_generate(&v).unwrap();
        assert_eq!(r.bounds.max_seconds, Some(2.5));
        assert_eq!(r.bounds.max_nonces, Some(100));
        assert_eq!(r.bounds.duration(limit), Duration::from_millis(2500));
        assert_eq!(
            r.bounds.duration(Duration::from_secs(1)),
            Duration::from_secs(1)
        );
        let Job::Generate(g) = r.job(limit) else {
            panic!("a generate job")
        };
        assert_eq!(
            (g.max_nonces, g.max_duration),
            (Some(100), Duration::from_millis(2500))
        );

        for (key, value, want) in [
            (
                "max_seconds",
                json!(0),
                "max_seconds: must be a positive number",
            ),
            (
                "max_seconds",
                json!(-1.0),
                "max_seconds: must be a positive number",
            ),
            ("max_seconds", json!("5"), "max_seconds: expected a number"),
            ("max_nonces", json!(0), "max_nonces: must be at least 1"),
            (
                "max_nonces",
                json!(2.5),
                "max_nonces: expected a non-negative integer",
            ),
            (
                "max_nonces",
                json!(-3),
                "max_nonces: must be a positive integer",
            ),
        ] {
            let mut v = request();
            v[key] = value;
            let e = parse_generate(&v).unwrap_err().to_string();
            assert!(e.contains(want), "{key}: {e}");
        }
    }

    #[test]
    fn the_finish_reason_names_the_limit_that_ended_the_job() {
        let limit = Duration::from_secs(420);
        let b = Bounds {
            max_seconds: Some(5.0),
            max_nonces: Some(64),
        };
        assert_eq!(b.reason(64, limit), FinishReason::MaxNonces);
        assert_eq!(b.reason(10, limit), FinishReason::MaxSeconds);
        // max_seconds above the server's limit: the server's limit ended it.
        assert_eq!(
            b.reason(10, Duration::from_secs(2)),
            FinishReason::TimeLimit
        );
        let t = b.tighter(Bounds {
            max_seconds: Some(9.0),
            max_nonces: Some(16),
        });
        assert_eq!((t.max_seconds, t.max_nonces), (Some(5.0), Some(16)));
        let t = Bounds::default().tighter(Bounds {
            max_seconds: None,
            max_nonces: Some(3),
        });
        assert_eq!((t.max_seconds, t.max_nonces), (None, Some(3)));
    }
}
