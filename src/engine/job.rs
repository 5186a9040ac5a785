//! The engine's vocabulary: what a job is ([`Job`]: a /generate-style [`GenerateJob`] or a
//! /pooled-style [`RangeJob`]), how it is steered while it runs ([`JobControl`]), what it
//! tells its reader ([`JobEvent`], [`BatchReport`]) and how it ends ([`JobEnd`],
//! [`StopReason`]). Running jobs is [`super::scheduler`]'s, computing their batches
//! [`super::worker`]'s.

use super::signal::Signal;
use crate::backend::{BackendError, StopToken};
use crate::pow::params::Params;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Which model a job needs.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub block_hash: String,
    pub params: Params,
}

impl ModelSpec {
    pub fn new(block_hash: &str, params: &Params) -> Self {
        ModelSpec {
            block_hash: block_hash.to_owned(),
            params: params.clone(),
        }
    }
}

/// A schedule from `start_nonce` until `max_duration` has passed (no batch starts after it),
/// or until the first `max_nonces` nonces are computed, whichever comes first.
#[derive(Debug, Clone)]
pub struct GenerateJob {
    pub model: ModelSpec,
    pub public_key: String,
    pub block_height: u64,
    pub r_target: f64,
    pub start_nonce: u64,
    pub batch_size: u64,
    pub max_duration: Duration,
    /// Compute nonces `start_nonce ..= start_nonce + max_nonces - 1` and end (None: no end
    /// but the time limit).
    pub max_nonces: Option<u64>,
}

/// A range job: the model now, the public key and nonce range through [`JobControl::assign`].
#[derive(Debug, Clone)]
pub struct RangeJob {
    pub model: ModelSpec,
    pub batch_size: u64,
}

/// Recompute the distances of a given list of nonces (a proof batch to validate), until
/// every one is done or `max_duration` has passed.
#[derive(Debug, Clone)]
pub struct ValidateJob {
    pub model: ModelSpec,
    pub public_key: String,
    pub block_height: u64,
    pub r_target: f64,
    /// In any order, each at most once; worker w of W takes those at positions w, w + W, ...
    pub nonces: Arc<Vec<u64>>,
    pub batch_size: u64,
    pub max_duration: Duration,
}

#[derive(Debug, Clone)]
pub enum Job {
    Generate(GenerateJob),
    Range(RangeJob),
    Validate(ValidateJob),
}

impl Job {
    pub fn model(&self) -> &ModelSpec {
        match self {
            Job::Generate(g) => &g.model,
            Job::Range(r) => &r.model,
            Job::Validate(v) => &v.model,
        }
    }

    pub(crate) fn model_mut(&mut self) -> &mut ModelSpec {
        match self {
            Job::Generate(g) => &mut g.model,
            Job::Range(r) => &mut r.model,
            Job::Validate(v) => &mut v.model,
        }
    }

    pub fn batch_size(&self) -> u64 {
        match self {
            Job::Generate(g) => g.batch_size,
            Job::Range(r) => r.batch_size,
            Job::Validate(v) => v.batch_size,
        }
    }

    /// Every value [`Job::kind`] gives (metric labels are created for each at start-up).
    pub const KINDS: [&'static str; 3] = ["generate", "range", "validate"];

    /// A metric label: "generate", "range" or "validate".
    pub fn kind(&self) -> &'static str {
        match self {
            Job::Generate(_) => "generate",
            Job::Range(_) => "range",
            Job::Validate(_) => "validate",
        }
    }

    /// Whether the job's reports carry every nonce's distance (validation), not only the
    /// proofs'.
    pub fn wants_all_distances(&self) -> bool {
        matches!(self, Job::Validate(_))
    }
}

/// What a range job computes now.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    pub public_key: String,
    pub block_height: u64,
    pub r_target: f64,
    /// Inclusive bounds.
    pub range_start: u64,
    pub range_end: u64,
}

/// Why a job stopped before its schedule or time ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// A newer job took the devices.
    Preempted,
    /// Whoever read the job's events went away.
    ClientGone,
    /// The server is shutting down.
    Shutdown,
    /// The caller asked the job to stop.
    Requested,
    /// A device failed (an [`JobEvent::Error`] came first).
    Failed,
}

impl StopReason {
    /// Every reason, for metric labels created at start-up.
    pub const ALL: [StopReason; 5] = [
        StopReason::Preempted,
        StopReason::ClientGone,
        StopReason::Shutdown,
        StopReason::Requested,
        StopReason::Failed,
    ];

    fn code(self) -> u8 {
        match self {
            StopReason::Preempted => 1,
            StopReason::ClientGone => 2,
            StopReason::Shutdown => 3,
            StopReason::Requested => 4,
            StopReason::Failed => 5,
        }
    }

    fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            1 => StopReason::Preempted,
            2 => StopReason::ClientGone,
            3 => StopReason::Shutdown,
            4 => StopReason::Requested,
            5 => StopReason::Failed,
            _ => return None,
        })
    }

    /// A metric label: "preempted", "client_gone", "shutdown", "requested" or "failed".
    pub fn label(self) -> &'static str {
        match self {
            StopReason::Preempted => "preempted",
            StopReason::ClientGone => "client_gone",
            StopReason::Shutdown => "shutdown",
            StopReason::Requested => "requested",
            StopReason::Failed => "failed",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::Preempted => "preempted",
            StopReason::ClientGone => "client gone",
            StopReason::Shutdown => "shutdown",
            StopReason::Requested => "stop requested",
            StopReason::Failed => "device failure",
        }
    }
}

/// How a job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobEnd {
    /// The time limit passed or the schedule ran out.
    Completed,
    Stopped(StopReason),
}

impl JobEnd {
    /// A metric label: "completed" or the [`StopReason::label`].
    pub fn label(self) -> &'static str {
        match self {
            JobEnd::Completed => "completed",
            JobEnd::Stopped(r) => r.label(),
        }
    }

    /// Every label [`JobEnd::label`] gives.
    pub fn labels() -> impl Iterator<Item = &'static str> {
        std::iter::once("completed").chain(StopReason::ALL.iter().map(|r| r.label()))
    }
}

/// A failure inside a running job, in words and as a short type name.
#[derive(Debug, Clone, PartialEq)]
pub struct JobError {
    pub message: String,
    pub error_type: &'static str,
    /// The device cannot go on (the server should be restarted).
    pub fatal: bool,
}

impl JobError {
    /// Every `error_type` a device failure is reported with ([`JobError::from_backend`]).
    pub const DEVICE_ERROR_TYPES: [&'static str; 3] =
        ["Unsupported", "OutOfMemory", "DeviceFailure"];

    pub(crate) fn from_backend(e: &BackendError) -> Self {
        let (error_type, fatal) = match e {
            BackendError::Unsupported(_) => ("Unsupported", false),
            BackendError::OutOfMemory(_) => ("OutOfMemory", false),
            BackendError::Device(_) => ("DeviceFailure", true),
            // Workers treat a stopped batch as the stop it is and never report it.
            BackendError::Stopped => ("Stopped", false),
        };
        JobError {
            message: e.to_string(),
            error_type,
            fatal,
        }
    }
}

/// One batch of one worker.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchReport {
    pub worker_id: usize,
    pub n_workers: usize,
    pub public_key: String,
    pub block_hash: String,
    pub block_height: u64,
    /// Every nonce computed in this batch.
    pub nonces: Vec<u64>,
    /// Those below r_target, and their distances.
    pub valid_nonces: Vec<u64>,
    pub valid_dist: Vec<f64>,
    /// Every nonce's distance, lined up with `nonces`, for jobs that want them
    /// ([`Job::wants_all_distances`]); None otherwise.
    pub dist: Option<Vec<f64>>,
    /// Per worker, counted since the job started (range jobs: since the last restart).
    pub batch_number: u64,
    pub total_computed: u64,
    pub total_valid: u64,
    /// Since the workers started computing.
    pub elapsed: Duration,
    /// /generate: `max(nonces) + n_workers`.
    pub next_nonce: u64,
    /// How long this batch took on its worker: inputs, forward pass and distances; for a
    /// device that overlaps preparation ([`Backend::overlaps_preparation`]), the device's time
    /// ([`Backend::run_batch`]) only, the inputs having been drawn while the batch before
    /// computed.
    ///
    /// [`Backend::overlaps_preparation`]: crate::backend::Backend::overlaps_preparation
    /// [`Backend::run_batch`]: crate::backend::Backend::run_batch
    pub compute_time: Duration,
}

impl BatchReport {
    pub fn batch_computed(&self) -> u64 {
        self.nonces.len() as u64
    }
    pub fn batch_valid(&self) -> u64 {
        self.valid_nonces.len() as u64
    }
}

/// What a job tells its reader.
#[derive(Debug, Clone)]
pub enum JobEvent {
    /// The models are on the devices.
    ModelReady {
        seconds: f64,
        cached: bool,
    },
    Batch(BatchReport),
    Error(JobError),
    /// Always the last event.
    Finished(JobEnd),
}

/// Steering a running job. Every change wakes the job's workers (and anything else that waits
/// on the engine's [`Signal`]).
#[derive(Debug)]
pub struct JobControl {
    /// The [`StopReason`] code, 0 while the job runs; watched by async readers.
    stop: watch::Sender<u8>,
    /// Set with the first stop, for backends to give up the batch they compute
    /// ([`JobControl::stop_token`]).
    stopped_flag: Arc<AtomicBool>,
    paused: AtomicBool,
    assignment: Mutex<AssignmentSlot>,
    signal: Arc<Signal>,
}

#[derive(Debug, Default)]
struct AssignmentSlot {
    epoch: u64,
    restart_epoch: u64,
    current: Option<Arc<Assignment>>,
}

impl JobControl {
    /// The control of a new job; its changes notify `signal`.
    pub(crate) fn new(signal: Arc<Signal>) -> Self {
        JobControl {
            stop: watch::Sender::new(0),
            stopped_flag: Arc::new(AtomicBool::new(false)),
            paused: AtomicBool::new(false),
            assignment: Mutex::new(AssignmentSlot::default()),
            signal,
        }
    }

    /// Ask the job to stop (the first reason given wins). Batches in flight are given up
    /// where their backend can (the CPU between layers; see [`JobControl::stop_token`]).
    pub fn stop(&self, reason: StopReason) {
        self.stopped_flag.store(true, Ordering::SeqCst);
        self.stop.send_if_modified(|code| {
            let first = *code == 0;
            if first {
                *code = reason.code();
            }
            first
        });
        self.signal.notify();
    }

    pub fn stopped(&self) -> Option<StopReason> {
        StopReason::from_code(*self.stop.borrow())
    }

    /// What a backend asks, while it computes a batch of this job, whether to give it up.
    pub fn stop_token(&self) -> StopToken {
        StopToken::new(self.stopped_flag.clone())
    }

    /// Resolves once the job has been told to stop.
    pub async fn wait_stopped(&self) {
        let mut rx = self.stop.subscribe();
        let _ = rx.wait_for(|&code| code != 0).await;
    }

    /// Hold the workers before their next batch (range jobs: bounded result backlog).
    pub fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::SeqCst);
        self.signal.notify();
    }

    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// Set what a range job computes. `restart` starts the range over with fresh counters
    /// (a new key or range); otherwise the workers go on where they are with the new values.
    pub fn assign(&self, a: Assignment, restart: bool) {
        {
            let mut slot = lock(&self.assignment);
            slot.epoch += 1;
            if restart || slot.current.is_none() {
                slot.restart_epoch = slot.epoch;
            }
            slot.current = Some(Arc::new(a));
        }
        self.signal.notify();
    }

    /// The current assignment, if any.
    pub fn assignment(&self) -> Option<Arc<Assignment>> {
        lock(&self.assignment).current.clone()
    }

    /// The assignment when it changed since `seen_epoch`: its epoch, the epoch of the last
    /// restart, and the assignment.
    pub(crate) fn assignment_since(&self, seen_epoch: u64) -> Option<(u64, u64, Arc<Assignment>)> {
        let slot = lock(&self.assignment);
        match &slot.current {
            Some(a) if slot.epoch != seen_epoch => {
                Some((slot.epoch, slot.restart_epoch, a.clone()))
            }
            _ => None,
        }
    }

    /// What the job's changes notify.
    pub(crate) fn signal(&self) -> &Signal {
        &self.signal
    }
}

/// A submitted job: its events and its control. Dropping the handle stops the job.
pub struct JobHandle {
    pub id: u64,
    pub events: mpsc::Receiver<JobEvent>,
    pub control: Arc<JobControl>,
}

impl Drop for JobHandle {
    fn drop(&mut self) {
        self.control.stop(StopReason::ClientGone);
    }
}

/// Why a job could not be submitted.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("cannot start a job thread: {0}")]
    Spawn(String),
}

/// Queue an event for the reader, waiting while the queue is full; false once the reader is
/// gone.
pub(crate) fn send_event(tx: &mpsc::Sender<JobEvent>, ev: JobEvent) -> bool {
    match tx.try_send(ev) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Closed(_)) => false,
        // Job threads are plain threads, never inside an async runtime.
        Err(mpsc::error::TrySendError::Full(ev)) => tx.blocking_send(ev).is_ok(),
    }
}

/// [`send_event`], except that a job told to stop while the queue is full gives the event up
/// (false) instead of waiting for a reader that may never read again.
pub(crate) fn send_event_unless_stopped(
    tx: &mpsc::Sender<JobEvent>,
    ev: JobEvent,
    control: &JobControl,
) -> bool {
    let ev = match tx.try_send(ev) {
        Ok(()) => return true,
        Err(mpsc::error::TrySendError::Closed(_)) => return false,
        Err(mpsc::error::TrySendError::Full(ev)) => ev,
    };
    // Wait for room in the queue or for the stop, whichever comes first (a stop already
    // given wins).
    futures_executor::block_on(async {
        tokio::select! {
            biased;
            _ = control.wait_stopped() => false,
            permit = tx.reserve() => match permit {
                Ok(p) => {
                    p.send(ev);
                    true
                }
                Err(_) => false,
            },
        }
    })
}
