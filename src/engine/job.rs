//! The job engine: one job owns the devices at a time, each device is driven by its own worker
//! thread, and results travel to the caller over a bounded channel as they are made.
//!
//! A job is either a /generate-style open-ended schedule from a start nonce under a time limit
//! ([`GenerateJob`]) or a /pooled-style inclusive nonce range whose public key, range and
//! r_target the caller assigns and re-assigns while it runs ([`RangeJob`]). Submitting a job
//! while another runs stops the old one ([`StopReason::Preempted`]); the new one takes the
//! devices as soon as the old one's workers have finished their current batch.
//!
//! Nothing here knows about HTTP: callers read [`JobEvent`]s and steer a job through its
//! [`JobControl`].

use super::batch::{self, JobSpec};
use super::cache::{ModelCache, ModelKey};
use super::device::{bytes_per_nonce, AnyModel, Device};
use crate::backend::BackendError;
use crate::pow::dtype::Dtype;
use crate::pow::nonces::{GenerateSchedule, RangeSchedule};
use crate::pow::params::Params;
use crate::telemetry::{JobState, Metrics};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::thread;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Events a job may queue before its workers wait for the reader.
const EVENT_CAPACITY: usize = 64;
/// How often an idle worker looks at its job's control again.
const IDLE_POLL: Duration = Duration::from_millis(10);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Engine-wide settings.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// The dtype every model is built in.
    pub dtype: Dtype,
    /// How many built models to keep across jobs (0: none).
    pub model_cache: usize,
    /// Upper bound on the memory one batch may take on a device; larger batch sizes are cut.
    pub max_batch_bytes: u64,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            dtype: Dtype::F16,
            model_cache: 1,
            max_batch_bytes: 2 << 30,
        }
    }
}

/// Which model a job needs.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub block_hash: String,
    pub params: Params,
}

/// An open-ended schedule from `start_nonce` until `max_duration` has passed.
#[derive(Debug, Clone)]
pub struct GenerateJob {
    pub model: ModelSpec,
    pub public_key: String,
    pub block_height: u64,
    pub r_target: f64,
    pub start_nonce: u64,
    pub batch_size: u64,
    pub max_duration: Duration,
}

/// A range job: the model now, the public key and nonce range through [`JobControl::assign`].
#[derive(Debug, Clone)]
pub struct RangeJob {
    pub model: ModelSpec,
    pub batch_size: u64,
}

#[derive(Debug, Clone)]
pub enum Job {
    Generate(GenerateJob),
    Range(RangeJob),
}

impl Job {
    fn model(&self) -> &ModelSpec {
        match self {
            Job::Generate(g) => &g.model,
            Job::Range(r) => &r.model,
        }
    }

    fn batch_size(&self) -> u64 {
        match self {
            Job::Generate(g) => g.batch_size,
            Job::Range(r) => r.batch_size,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Job::Generate(_) => "generate",
            Job::Range(_) => "range",
        }
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

/// A failure inside a running job, in words and as a short type name.
#[derive(Debug, Clone, PartialEq)]
pub struct JobError {
    pub message: String,
    pub error_type: &'static str,
    /// The device cannot go on (the server should be restarted).
    pub fatal: bool,
}

impl JobError {
    fn from_backend(e: &BackendError) -> Self {
        let (error_type, fatal) = match e {
            BackendError::Unsupported(_) => ("Unsupported", false),
            BackendError::OutOfMemory(_) => ("OutOfMemory", false),
            BackendError::Device(_) => ("DeviceFailure", true),
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
    /// Per worker, counted since the job started (range jobs: since the last restart).
    pub batch_number: u64,
    pub total_computed: u64,
    pub total_valid: u64,
    /// Since the workers started computing.
    pub elapsed: Duration,
    /// /generate: `max(nonces) + n_workers`.
    pub next_nonce: u64,
    /// How long this batch took on its worker: inputs, forward pass and distances.
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

/// Steering a running job.
#[derive(Debug, Default)]
pub struct JobControl {
    stop: AtomicU8,
    paused: AtomicBool,
    assignment: Mutex<AssignmentSlot>,
}

#[derive(Debug, Default)]
struct AssignmentSlot {
    epoch: u64,
    restart_epoch: u64,
    current: Option<Arc<Assignment>>,
}

impl JobControl {
    /// Ask the job to stop after the batches in flight (the first reason given wins).
    pub fn stop(&self, reason: StopReason) {
        let _ = self
            .stop
            .compare_exchange(0, reason.code(), Ordering::SeqCst, Ordering::SeqCst);
    }

    pub fn stopped(&self) -> Option<StopReason> {
        StopReason::from_code(self.stop.load(Ordering::SeqCst))
    }

    /// Hold the workers before their next batch (range jobs: bounded result backlog).
    pub fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::SeqCst);
    }

    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// Set what a range job computes. `restart` starts the range over with fresh counters
    /// (a new key or range); otherwise the workers go on where they are with the new values.
    pub fn assign(&self, a: Assignment, restart: bool) {
        let mut slot = lock(&self.assignment);
        slot.epoch += 1;
        if restart || slot.current.is_none() {
            slot.restart_epoch = slot.epoch;
        }
        slot.current = Some(Arc::new(a));
    }

    /// The current assignment, if any.
    pub fn assignment(&self) -> Option<Arc<Assignment>> {
        lock(&self.assignment).current.clone()
    }

    fn assignment_since(&self, seen_epoch: u64) -> Option<(u64, u64, Arc<Assignment>)> {
        let slot = lock(&self.assignment);
        match &slot.current {
            Some(a) if slot.epoch != seen_epoch => {
                Some((slot.epoch, slot.restart_epoch, a.clone()))
            }
            _ => None,
        }
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

/// A snapshot for /health.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineStatus {
    pub busy: bool,
    pub job_id: Option<u64>,
    pub job_kind: Option<&'static str>,
    pub job_seconds: Option<f64>,
    pub jobs_started: u64,
    pub models_cached: usize,
    pub device_failed: bool,
    pub shutting_down: bool,
}

struct Running {
    id: u64,
    kind: &'static str,
    since: Instant,
    control: Arc<JobControl>,
}

#[derive(Default)]
struct State {
    next_id: u64,
    current: Option<Running>,
    shutting_down: bool,
}

struct Inner {
    devices: Vec<Arc<dyn Device>>,
    opts: EngineOptions,
    cache: Mutex<ModelCache>,
    /// Held by the job that computes.
    devices_busy: Mutex<()>,
    state: Mutex<State>,
    jobs_started: AtomicU64,
    device_failed: AtomicBool,
    metrics: Arc<Metrics>,
}

/// The job engine. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl Engine {
    /// An engine with one worker per device.
    pub fn new(devices: Vec<Arc<dyn Device>>, opts: EngineOptions) -> Self {
        Self::with_metrics(devices, opts, Arc::new(Metrics::new()))
    }

    /// An engine that records its jobs, batches and builds into `metrics`.
    pub fn with_metrics(
        devices: Vec<Arc<dyn Device>>,
        opts: EngineOptions,
        metrics: Arc<Metrics>,
    ) -> Self {
        assert!(!devices.is_empty(), "an engine needs at least one device");
        Engine {
            inner: Arc::new(Inner {
                cache: Mutex::new(ModelCache::new(opts.model_cache)),
                devices,
                opts,
                devices_busy: Mutex::new(()),
                state: Mutex::new(State::default()),
                jobs_started: AtomicU64::new(0),
                device_failed: AtomicBool::new(false),
                metrics,
            }),
        }
    }

    /// The metrics this engine records into.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    pub fn n_workers(&self) -> usize {
        self.inner.devices.len()
    }

    pub fn device_names(&self) -> Vec<String> {
        self.inner.devices.iter().map(|d| d.name()).collect()
    }

    pub fn dtype(&self) -> Dtype {
        self.inner.opts.dtype
    }

    /// Bring every device up (blocking).
    pub fn warm_up(&self) {
        thread::scope(|s| {
            for d in &self.inner.devices {
                s.spawn(move || d.warm_up());
            }
        });
    }

    /// Whether every device can serve `params` in the engine's dtype.
    pub fn check(&self, params: &Params) -> Result<(), BackendError> {
        for d in &self.inner.devices {
            d.check(params, self.inner.opts.dtype)?;
        }
        Ok(())
    }

    /// The batch size a job of `params` asking for `requested` nonces per batch will use.
    pub fn effective_batch_size(&self, params: &Params, requested: u64) -> u64 {
        let cap = (self.inner.opts.max_batch_bytes / bytes_per_nonce(params).max(1)).max(1);
        requested.clamp(1, cap)
    }

    pub fn status(&self) -> EngineStatus {
        let st = lock(&self.inner.state);
        EngineStatus {
            busy: st.current.is_some(),
            job_id: st.current.as_ref().map(|r| r.id),
            job_kind: st.current.as_ref().map(|r| r.kind),
            job_seconds: st.current.as_ref().map(|r| r.since.elapsed().as_secs_f64()),
            jobs_started: self.inner.jobs_started.load(Ordering::SeqCst),
            models_cached: lock(&self.inner.cache).len(),
            device_failed: self.inner.device_failed.load(Ordering::SeqCst),
            shutting_down: st.shutting_down,
        }
    }

    pub fn is_busy(&self) -> bool {
        lock(&self.inner.state).current.is_some()
    }

    /// Start `job`, stopping the one that runs (it ends with [`StopReason::Preempted`]).
    pub fn submit(&self, job: Job) -> Result<JobHandle, SubmitError> {
        let mut st = lock(&self.inner.state);
        if st.shutting_down {
            return Err(SubmitError::ShuttingDown);
        }
        if let Some(old) = &st.current {
            tracing::info!(
                job = old.id,
                "preempting job {} for a newer request",
                old.id
            );
            if old.control.stopped().is_none() {
                self.inner.metrics.preempted();
            }
            old.control.stop(StopReason::Preempted);
        }
        st.next_id += 1;
        let id = st.next_id;
        let control = Arc::new(JobControl::default());
        let (tx, rx) = mpsc::channel(EVENT_CAPACITY);
        let kind = job.kind();
        let inner = self.inner.clone();
        let ctl = control.clone();
        self.inner.metrics.job_started(kind);
        thread::Builder::new()
            .name(format!("job-{id}"))
            .spawn(move || run_job(inner, id, job, ctl, tx))
            .map_err(|e| SubmitError::Spawn(e.to_string()))?;
        st.current = Some(Running {
            id,
            kind,
            since: Instant::now(),
            control: control.clone(),
        });
        self.inner.jobs_started.fetch_add(1, Ordering::SeqCst);
        Ok(JobHandle {
            id,
            events: rx,
            control,
        })
    }

    /// Refuse new jobs and stop the running one.
    pub fn shutdown(&self) {
        let mut st = lock(&self.inner.state);
        st.shutting_down = true;
        if let Some(r) = &st.current {
            r.control.stop(StopReason::Shutdown);
        }
    }

    /// Wait until no job runs, at most `timeout`; whether it is idle.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if !self.is_busy() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(IDLE_POLL);
        }
    }

    /// Drop the kept models.
    pub fn clear_cache(&self) {
        lock(&self.inner.cache).clear();
    }
}

/// Queue an event for the reader; false when the reader is gone (or, with `give_up`, when
/// the job was told to stop while the queue was full).
fn send(
    tx: &mpsc::Sender<JobEvent>,
    ev: JobEvent,
    control: &JobControl,
    give_up_on_stop: bool,
) -> bool {
    let mut ev = ev;
    loop {
        match tx.try_send(ev) {
            Ok(()) => return true,
            Err(mpsc::error::TrySendError::Closed(_)) => return false,
            Err(mpsc::error::TrySendError::Full(e)) => {
                if give_up_on_stop && control.stopped().is_some() {
                    return false;
                }
                ev = e;
                thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

fn run_job(
    inner: Arc<Inner>,
    id: u64,
    job: Job,
    control: Arc<JobControl>,
    tx: mpsc::Sender<JobEvent>,
) {
    let started = Instant::now();
    let kind = job.kind();
    let (end, totals) = {
        let mut state = StateGuard::new(&inner.metrics);
        run_job_holding_devices(&inner, &job, &control, &tx, &mut state, started)
    };
    inner.metrics.job_finished(
        kind,
        match end {
            JobEnd::Completed => "completed",
            JobEnd::Stopped(r) => r.label(),
        },
    );
    {
        let mut st = lock(&inner.state);
        if st.current.as_ref().is_some_and(|r| r.id == id) {
            st.current = None;
        }
    }
    let how = match end {
        JobEnd::Completed => "completed",
        JobEnd::Stopped(r) => r.as_str(),
    };
    tracing::info!(
        job = id,
        kind,
        computed = totals.computed,
        valid = totals.valid,
        batches = totals.batches,
        seconds = format!("{:.2}", started.elapsed().as_secs_f64()),
        "job {id} ended: {how}"
    );
    send(&tx, JobEvent::Finished(end), &control, false);
}

/// A job's state in the metrics, left when the job ends however it ends.
struct StateGuard<'a> {
    metrics: &'a Metrics,
    state: Option<JobState>,
}

impl<'a> StateGuard<'a> {
    fn new(metrics: &'a Metrics) -> Self {
        metrics.job_state(None, Some(JobState::Waiting));
        StateGuard {
            metrics,
            state: Some(JobState::Waiting),
        }
    }

    fn set(&mut self, to: JobState) {
        self.metrics.job_state(self.state, Some(to));
        self.state = Some(to);
    }
}

impl Drop for StateGuard<'_> {
    fn drop(&mut self) {
        self.metrics.job_state(self.state.take(), None);
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Totals {
    batches: u64,
    computed: u64,
    valid: u64,
}

impl Totals {
    /// Count one more batch.
    fn add(&mut self, r: &batch::BatchResult) {
        self.batches += 1;
        self.computed += r.nonces.len() as u64;
        self.valid += r.valid_nonces.len() as u64;
    }
}

fn run_job_holding_devices(
    inner: &Arc<Inner>,
    job: &Job,
    control: &Arc<JobControl>,
    tx: &mpsc::Sender<JobEvent>,
    state: &mut StateGuard<'_>,
    submitted: Instant,
) -> (JobEnd, Totals) {
    let none = Totals::default();
    // Wait for the previous job's workers to let go of the devices.
    let _devices = loop {
        if let Some(r) = control.stopped() {
            return (JobEnd::Stopped(r), none);
        }
        match inner.devices_busy.try_lock() {
            Ok(g) => break g,
            Err(TryLockError::Poisoned(p)) => break p.into_inner(),
            Err(TryLockError::WouldBlock) => thread::sleep(Duration::from_millis(2)),
        }
    };
    if let Some(r) = control.stopped() {
        return (JobEnd::Stopped(r), none);
    }
    let spec = job.model();
    state.set(JobState::Building);
    let t0 = Instant::now();
    let (models, cached) = match models_for(inner, spec) {
        Ok(m) => m,
        Err(e) => {
            let err = JobError::from_backend(&e);
            inner.metrics.device_error(err.error_type);
            if err.fatal {
                inner.device_failed.store(true, Ordering::SeqCst);
            }
            tracing::warn!(
                error_type = err.error_type,
                "cannot build the model: {}",
                crate::logsafe::scrub(&err.message)
            );
            send(tx, JobEvent::Error(err), control, false);
            return (JobEnd::Stopped(StopReason::Failed), none);
        }
    };
    let seconds = t0.elapsed().as_secs_f64();
    inner.metrics.model_ready(seconds, cached);
    tracing::info!(
        cached,
        seconds = format!("{seconds:.3}"),
        "model ready: {}",
        spec.params
    );
    if let Some(r) = control.stopped() {
        return (JobEnd::Stopped(r), none);
    }
    if !send(tx, JobEvent::ModelReady { seconds, cached }, control, true) {
        return (
            JobEnd::Stopped(control.stopped().unwrap_or(StopReason::ClientGone)),
            none,
        );
    }

    let dtype = inner.opts.dtype;
    let n = inner.devices.len();
    let batch_size = {
        let requested = job.batch_size();
        let cap = (inner.opts.max_batch_bytes / bytes_per_nonce(&spec.params).max(1)).max(1);
        if requested > cap {
            tracing::info!("batch size {requested} cut to {cap} to fit in memory");
        }
        requested.clamp(1, cap) as usize
    };
    // The target depends on the block hash only: draw it once for every worker.
    let base = match job {
        Job::Generate(g) => JobSpec::new(
            &spec.block_hash,
            &g.public_key,
            &spec.params,
            dtype,
            g.r_target,
        ),
        Job::Range(_) => JobSpec::new(&spec.block_hash, "", &spec.params, dtype, f64::INFINITY),
    };
    state.set(JobState::Computing);
    let first_batch = AtomicBool::new(false);
    let compute_start = Instant::now();
    let totals: Vec<Totals> = thread::scope(|s| {
        let handles: Vec<_> = inner
            .devices
            .iter()
            .zip(models)
            .enumerate()
            .map(|(w, (device, model))| {
                let ctx = WorkerCtx {
                    worker_id: w,
                    n_workers: n,
                    device: device.as_ref(),
                    model,
                    control,
                    tx,
                    batch_size,
                    started: compute_start,
                    inner,
                    submitted,
                    first_batch: &first_batch,
                };
                let base = base.clone();
                thread::Builder::new()
                    .name(format!("worker-{w}"))
                    .spawn_scoped(s, move || match job {
                        Job::Generate(g) => generate_worker(&ctx, base, g),
                        Job::Range(_) => range_worker(&ctx, base),
                    })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| match h {
                Ok(h) => h.join().unwrap_or_else(|_| {
                    control.stop(StopReason::Failed);
                    Totals::default()
                }),
                Err(e) => {
                    tracing::warn!("cannot start a worker thread: {e}");
                    control.stop(StopReason::Failed);
                    Totals::default()
                }
            })
            .collect()
    });
    let sum = totals.iter().fold(Totals::default(), |a, t| Totals {
        batches: a.batches + t.batches,
        computed: a.computed + t.computed,
        valid: a.valid + t.valid,
    });
    match control.stopped() {
        Some(r) => (JobEnd::Stopped(r), sum),
        None => (JobEnd::Completed, sum),
    }
}

fn models_for(inner: &Inner, spec: &ModelSpec) -> Result<(Vec<AnyModel>, bool), BackendError> {
    let key = ModelKey {
        block_hash: spec.block_hash.clone(),
        params: spec.params.clone(),
        dtype: inner.opts.dtype,
    };
    if let Some(m) = lock(&inner.cache).get(&key) {
        return Ok((m, true));
    }
    lock(&inner.cache).make_room();
    let dtype = inner.opts.dtype;
    let built: Vec<Result<AnyModel, BackendError>> = thread::scope(|s| {
        let handles: Vec<_> = inner
            .devices
            .iter()
            .map(|d| s.spawn(move || d.build(&spec.block_hash, &spec.params, dtype)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(BackendError::Device("model build panicked".into())))
            })
            .collect()
    });
    let models = built.into_iter().collect::<Result<Vec<_>, _>>()?;
    lock(&inner.cache).insert(key, models.clone());
    Ok((models, false))
}

struct WorkerCtx<'a> {
    worker_id: usize,
    n_workers: usize,
    device: &'a dyn Device,
    model: AnyModel,
    control: &'a JobControl,
    tx: &'a mpsc::Sender<JobEvent>,
    batch_size: usize,
    started: Instant,
    inner: &'a Inner,
    /// When the job was submitted, and whether any worker has finished a batch yet.
    submitted: Instant,
    first_batch: &'a AtomicBool,
}

impl WorkerCtx<'_> {
    /// The report of a computed batch, with the worker's running totals `t` (which count it).
    fn report(
        &self,
        spec: &JobSpec,
        block_height: u64,
        r: batch::BatchResult,
        t: &Totals,
        compute_time: Duration,
    ) -> BatchReport {
        BatchReport {
            worker_id: self.worker_id,
            n_workers: self.n_workers,
            public_key: spec.public_key.clone(),
            block_hash: spec.block_hash.clone(),
            block_height,
            next_nonce: GenerateSchedule::next_nonce_after(&r.nonces, self.n_workers as u64)
                .unwrap_or(0),
            nonces: r.nonces,
            valid_nonces: r.valid_nonces,
            valid_dist: r.valid_dist,
            batch_number: t.batches,
            total_computed: t.computed,
            total_valid: t.valid,
            elapsed: self.started.elapsed(),
            compute_time,
        }
    }

    /// Compute one batch and how long it took; None (after reporting) when the device failed.
    fn compute(&self, spec: &JobSpec, nonces: Vec<u64>) -> Option<(batch::BatchResult, Duration)> {
        let t0 = Instant::now();
        let prepared = batch::prepare(spec, nonces);
        match self
            .device
            .forward(&self.model, &prepared.inputs, prepared.nonces.len())
        {
            Ok(logits) => {
                let r = batch::finish(spec, prepared, &logits);
                let took = t0.elapsed();
                let m = &self.inner.metrics;
                m.batch(r.nonces.len() as u64, r.valid_nonces.len() as u64, took);
                if !self.first_batch.swap(true, Ordering::SeqCst) {
                    m.first_batch(self.submitted.elapsed());
                }
                Some((r, took))
            }
            Err(e) => {
                let err = JobError::from_backend(&e);
                self.inner.metrics.device_error(err.error_type);
                if err.fatal {
                    self.inner.device_failed.store(true, Ordering::SeqCst);
                }
                tracing::warn!(
                    worker = self.worker_id,
                    error_type = err.error_type,
                    "batch failed: {}",
                    crate::logsafe::scrub(&err.message)
                );
                self.control.stop(StopReason::Failed);
                send(self.tx, JobEvent::Error(err), self.control, false);
                None
            }
        }
    }
}

fn generate_worker(ctx: &WorkerCtx<'_>, spec: JobSpec, job: &GenerateJob) -> Totals {
    let mut sched =
        GenerateSchedule::new(job.start_nonce, ctx.worker_id as u64, ctx.n_workers as u64);
    let mut t = Totals::default();
    loop {
        if ctx.control.stopped().is_some() || ctx.started.elapsed() >= job.max_duration {
            break;
        }
        let nonces = sched.next_batch(ctx.batch_size);
        if nonces.is_empty() {
            break;
        }
        let Some((r, compute_time)) = ctx.compute(&spec, nonces) else {
            break;
        };
        t.add(&r);
        let report = ctx.report(&spec, job.block_height, r, &t, compute_time);
        // A stopped /generate has no one to hand its last batch to: give up on a full queue.
        if !send(ctx.tx, JobEvent::Batch(report), ctx.control, true) {
            break;
        }
    }
    t
}

fn range_worker(ctx: &WorkerCtx<'_>, base: JobSpec) -> Totals {
    let mut seen_epoch = 0;
    let mut seen_restart = 0;
    let mut current: Option<(JobSpec, Arc<Assignment>)> = None;
    let mut sched: Option<RangeSchedule> = None;
    let mut t = Totals::default(); // since the last restart, as reported
    let mut all = Totals::default(); // over the whole job, for the log
    loop {
        if ctx.control.stopped().is_some() {
            break;
        }
        if let Some((epoch, restart, a)) = ctx.control.assignment_since(seen_epoch) {
            seen_epoch = epoch;
            let mut spec = base.clone();
            spec.public_key = a.public_key.clone();
            spec.r_target = a.r_target;
            if restart != seen_restart || sched.is_none() {
                seen_restart = restart;
                sched = Some(RangeSchedule::new(
                    a.range_start,
                    a.range_end,
                    ctx.worker_id as u64,
                    ctx.n_workers as u64,
                ));
                t = Totals::default();
            }
            current = Some((spec, a));
        }
        if ctx.control.is_paused() {
            thread::sleep(IDLE_POLL);
            continue;
        }
        let (Some((spec, a)), Some(s)) = (&current, &mut sched) else {
            thread::sleep(IDLE_POLL);
            continue;
        };
        let nonces = s.next_batch(ctx.batch_size);
        if nonces.is_empty() {
            thread::sleep(IDLE_POLL);
            continue;
        }
        let Some((r, compute_time)) = ctx.compute(spec, nonces) else {
            break;
        };
        t.add(&r);
        all.add(&r);
        let report = ctx.report(spec, a.block_height, r, &t, compute_time);
        // Range results must reach the orchestrator: wait for the reader even when stopping.
        if !send(ctx.tx, JobEvent::Batch(report), ctx.control, false) {
            break;
        }
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::device::CpuDevice;

    fn tiny() -> Params {
        Params {
            dim: 32,
            n_layers: 1,
            n_heads: 2,
            n_kv_heads: 2,
            vocab_size: 40,
            multiple_of: 32,
            seq_len: 4,
            ..Params::default()
        }
    }

    fn engine() -> Engine {
        Engine::new(vec![Arc::new(CpuDevice::new())], EngineOptions::default())
    }

    fn gen(secs: f64, bs: u64) -> Job {
        Job::Generate(GenerateJob {
            model: ModelSpec {
                block_hash: "bh".into(),
                params: tiny(),
            },
            public_key: "pk".into(),
            block_height: 3,
            r_target: 10.0,
            start_nonce: 7,
            batch_size: bs,
            max_duration: Duration::from_secs_f64(secs),
        })
    }

    fn drain(h: &mut JobHandle) -> (Vec<BatchReport>, JobEnd, bool) {
        let mut out = Vec::new();
        let mut cached = false;
        loop {
            match h.events.blocking_recv().expect("finished comes last") {
                JobEvent::Batch(b) => out.push(b),
                JobEvent::ModelReady { cached: c, .. } => cached = c,
                JobEvent::Error(e) => panic!("{e:?}"),
                JobEvent::Finished(end) => return (out, end, cached),
            }
        }
    }

    #[test]
    fn generate_runs_until_its_time_limit_and_caches_the_model() {
        let e = engine();
        let mut h = e.submit(gen(0.2, 5)).unwrap();
        let (batches, end, cached) = drain(&mut h);
        assert_eq!(end, JobEnd::Completed);
        assert!(!cached);
        assert!(!batches.is_empty());
        assert_eq!(batches[0].nonces, vec![7, 8, 9, 10, 11]);
        assert_eq!(batches[0].next_nonce, 12);
        assert_eq!(batches[1].batch_number, 2);
        assert!(!e.is_busy());
        let mut h = e.submit(gen(0.05, 5)).unwrap();
        let (_, _, cached) = drain(&mut h);
        assert!(cached);
        assert_eq!(e.status().jobs_started, 2);
    }

    #[test]
    fn a_new_job_preempts_the_old_one() {
        let e = engine();
        let mut a = e.submit(gen(60.0, 2)).unwrap();
        // Wait until the first job computes.
        loop {
            if let JobEvent::Batch(_) = a.events.blocking_recv().unwrap() {
                break;
            }
        }
        let mut b = e.submit(gen(0.1, 2)).unwrap();
        let (_, end, _) = drain(&mut a);
        assert_eq!(end, JobEnd::Stopped(StopReason::Preempted));
        let (batches, end, _) = drain(&mut b);
        assert_eq!(end, JobEnd::Completed);
        assert!(!batches.is_empty());
    }

    #[test]
    fn range_jobs_follow_assignments_and_cover_the_range() {
        let e = engine();
        let mut h = e
            .submit(Job::Range(RangeJob {
                model: ModelSpec {
                    block_hash: "bh".into(),
                    params: tiny(),
                },
                batch_size: 4,
            }))
            .unwrap();
        assert!(matches!(
            h.events.blocking_recv(),
            Some(JobEvent::ModelReady { .. })
        ));
        let a = Assignment {
            public_key: "k1".into(),
            block_height: 9,
            r_target: 10.0,
            range_start: 100,
            range_end: 109,
        };
        h.control.assign(a.clone(), true);
        let mut seen = Vec::new();
        while seen.len() < 10 {
            if let Some(JobEvent::Batch(b)) = h.events.blocking_recv() {
                assert_eq!(b.public_key, "k1");
                seen.extend(b.nonces);
            }
        }
        seen.sort();
        assert_eq!(seen, (100..=109).collect::<Vec<_>>());
        h.control.assign(
            Assignment {
                public_key: "k2".into(),
                ..a
            },
            true,
        );
        let mut seen = Vec::new();
        while seen.len() < 10 {
            if let Some(JobEvent::Batch(b)) = h.events.blocking_recv() {
                assert_eq!(b.public_key, "k2");
                seen.extend(b.nonces);
            }
        }
        assert_eq!(seen.len(), 10);
        h.control.stop(StopReason::Requested);
        let (rest, end, _) = drain(&mut h);
        assert!(rest.is_empty());
        assert_eq!(end, JobEnd::Stopped(StopReason::Requested));
    }

    #[test]
    fn several_workers_interleave_their_nonces() {
        let e = Engine::new(
            vec![Arc::new(CpuDevice::new()), Arc::new(CpuDevice::new())],
            EngineOptions::default(),
        );
        assert_eq!(e.n_workers(), 2);
        let mut h = e.submit(gen(0.2, 3)).unwrap();
        let (batches, end, _) = drain(&mut h);
        assert_eq!(end, JobEnd::Completed);
        let mut all = Vec::new();
        for w in 0..2u64 {
            let mine: Vec<&BatchReport> =
                batches.iter().filter(|b| b.worker_id as u64 == w).collect();
            assert!(!mine.is_empty(), "worker {w} computed nothing");
            assert_eq!(mine[0].nonces, vec![7 + w, 9 + w, 11 + w]);
            for b in &mine {
                assert_eq!(b.n_workers, 2);
                assert_eq!(b.next_nonce, b.nonces.iter().max().unwrap() + 2);
                all.extend(b.nonces.iter().copied());
            }
        }
        all.sort_unstable();
        let n = all.len() as u64;
        // Together they cover a prefix of the schedule, each nonce once (up to the batches
        // in flight when the time ran out).
        all.dedup();
        assert_eq!(all.len() as u64, n);

        let mut h = e
            .submit(Job::Range(RangeJob {
                model: ModelSpec {
                    block_hash: "bh".into(),
                    params: tiny(),
                },
                batch_size: 2,
            }))
            .unwrap();
        h.control.assign(
            Assignment {
                public_key: "k".into(),
                block_height: 1,
                r_target: 10.0,
                range_start: 50,
                range_end: 70,
            },
            true,
        );
        let mut seen = Vec::new();
        while seen.len() < 21 {
            if let Some(JobEvent::Batch(b)) = h.events.blocking_recv() {
                assert!(b.nonces.iter().all(|n| (n - 50) % 2 == b.worker_id as u64));
                seen.extend(b.nonces);
            }
        }
        seen.sort_unstable();
        assert_eq!(seen, (50..=70).collect::<Vec<_>>());
    }

    #[test]
    fn shutdown_refuses_new_jobs() {
        let e = engine();
        e.shutdown();
        assert!(matches!(
            e.submit(gen(1.0, 1)),
            Err(SubmitError::ShuttingDown)
        ));
    }
}
