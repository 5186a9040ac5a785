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

use super::batch::{self, BatchResult, JobSpec, PreparedBatch};
use super::cache::{ModelCache, ModelKey};
use super::device::{bytes_per_nonce, AnyModel, Device};
use super::sizer::BatchSizer;
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
    /// Every job's matrix products in FP8 (`--dtype fp8`: `dtype` is then the activations'
    /// f16), as if its params said `use_fp8: true`.
    pub fp8: bool,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            dtype: Dtype::F16,
            model_cache: 1,
            max_batch_bytes: 2 << 30,
            fp8: false,
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

    fn model_mut(&mut self) -> &mut ModelSpec {
        match self {
            Job::Generate(g) => &mut g.model,
            Job::Range(r) => &mut r.model,
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
    /// How long this batch took on its worker: inputs, forward pass and distances; for a
    /// device that overlaps preparation ([`Device::overlaps_preparation`]), the device's time
    /// ([`Device::run_batch`]) only, the inputs having been drawn while the batch before
    /// computed.
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

    /// The precision as `--dtype` names it: `fp8` when the products run in FP8, else the
    /// dtype.
    pub fn precision(&self) -> &'static str {
        if self.inner.opts.fp8 {
            "fp8"
        } else {
            self.inner.opts.dtype.as_str()
        }
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
        let params = self.job_params(params);
        for d in &self.inner.devices {
            d.check(&params, self.inner.opts.dtype)?;
        }
        Ok(())
    }

    /// The params a job of `params` runs with: FP8 products when the engine computes in FP8.
    pub fn job_params(&self, params: &Params) -> Params {
        let mut p = params.clone();
        p.use_fp8 |= self.inner.opts.fp8;
        p
    }

    /// The batch size a job of `params` asking for `requested` nonces per batch will use.
    pub fn effective_batch_size(&self, params: &Params, requested: u64) -> u64 {
        requested.clamp(1, batch_cap(&self.inner, params))
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
    pub fn submit(&self, mut job: Job) -> Result<JobHandle, SubmitError> {
        let params = self.job_params(&job.model().params);
        job.model_mut().params = params;
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
    fn add(&mut self, r: &BatchResult) {
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
        let cap = batch_cap(inner, &spec.params);
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
    let models = match build_on_every_device(inner, spec) {
        // Cached models of other block hashes still hold device memory (a GPU holds one
        // PARAMS_V2 model, not two): drop them all and try once more.
        Err(BackendError::OutOfMemory(why)) if !lock(&inner.cache).is_empty() => {
            tracing::info!("out of memory building a model ({why}); evicting cached models");
            lock(&inner.cache).clear();
            build_on_every_device(inner, spec)?
        }
        other => other?,
    };
    lock(&inner.cache).insert(key, models.clone());
    Ok((models, false))
}

/// The largest batch `max_batch_bytes` allows for `params` on the engine's hungriest device
/// (what one nonce costs depends on the device: the whole forward pass in host memory on the
/// CPU, only the inputs and permutations on a GPU).
fn batch_cap(inner: &Inner, params: &Params) -> u64 {
    let per = inner
        .devices
        .iter()
        .map(|d| d.bytes_per_nonce(params))
        .max()
        .unwrap_or_else(|| bytes_per_nonce(params))
        .max(1);
    (inner.opts.max_batch_bytes / per).max(1)
}

/// Build `spec`'s model on every device at once.
fn build_on_every_device(inner: &Inner, spec: &ModelSpec) -> Result<Vec<AnyModel>, BackendError> {
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
    built.into_iter().collect()
}

struct WorkerCtx<'a> {
    worker_id: usize,
    n_workers: usize,
    device: &'a dyn Device,
    model: AnyModel,
    control: &'a JobControl,
    tx: &'a mpsc::Sender<JobEvent>,
    /// The request's batch size, cut to the engine's memory bound.
    batch_size: usize,
    started: Instant,
    inner: &'a Inner,
    /// When the job was submitted, and whether any worker has finished a batch yet.
    submitted: Instant,
    first_batch: &'a AtomicBool,
}

/// A batch prepared ahead, while the device computed the one before it.
struct Ahead {
    batch: PreparedBatch,
    /// The size [`BatchSizer::next_size`] gave it.
    size: usize,
    /// The public key its inputs were drawn with.
    public_key: String,
    /// Range jobs: the assignment (and the range restart) it was drawn under.
    epoch: u64,
    restart_epoch: u64,
}

impl Ahead {
    /// A batch of `size` drawn with `spec` under assignment `epoch` / `restart_epoch` (both 0
    /// for /generate, which has no assignments).
    fn drawn(
        batch: PreparedBatch,
        size: usize,
        spec: &JobSpec,
        epoch: u64,
        restart_epoch: u64,
    ) -> Ahead {
        Ahead {
            batch,
            size,
            public_key: spec.public_key.clone(),
            epoch,
            restart_epoch,
        }
    }

    /// Bring a batch drawn under an older assignment up to the current one: keep it when only
    /// r_target or the block height changed, draw its inputs again when the public key
    /// changed (the same nonces: the range goes on, none may be lost), and drop it when the
    /// range was restarted (its nonces belong to the old range).
    fn carry_over(self, spec: &JobSpec, epoch: u64, restart_epoch: u64) -> Option<Ahead> {
        if self.epoch == epoch {
            return Some(self);
        }
        if self.restart_epoch != restart_epoch {
            return None;
        }
        let batch = if self.public_key == spec.public_key {
            self.batch
        } else {
            batch::prepare(spec, self.batch.nonces)
        };
        Some(Ahead::drawn(batch, self.size, spec, epoch, restart_epoch))
    }
}

impl WorkerCtx<'_> {
    /// This worker's batch sizes for a job of `params`.
    fn sizer(&self, params: &Params) -> BatchSizer {
        let device_max = self.device.max_batch(&self.model, params);
        let s = BatchSizer::new(
            self.batch_size,
            device_max,
            self.device.overlaps_preparation(),
        );
        if s.cap() < self.batch_size {
            tracing::info!(
                worker = self.worker_id,
                "batch size {} cut to {} to fit in the memory of {}",
                self.batch_size,
                s.cap(),
                self.device.name()
            );
        }
        s
    }

    /// The report of a computed batch, with the worker's running totals `t` (which count it).
    fn report(
        &self,
        spec: &JobSpec,
        block_height: u64,
        r: BatchResult,
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

    /// Run a prepared batch on the device (the proofs' distances only): the result and the
    /// device time; None (after reporting) when the device failed.
    fn run_on_device(&self, spec: &JobSpec, b: PreparedBatch) -> Option<(BatchResult, Duration)> {
        let t0 = Instant::now();
        match self.device.run_batch(&self.model, spec, b, false) {
            Ok(r) => Some((r, t0.elapsed())),
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

    /// Count a computed batch in the metrics, with the time it is reported with.
    fn count(&self, r: &BatchResult, took: Duration) {
        let m = &self.inner.metrics;
        m.batch(r.nonces.len() as u64, r.valid_nonces.len() as u64, took);
        if !self.first_batch.swap(true, Ordering::SeqCst) {
            m.first_batch(self.submitted.elapsed());
        }
    }

    /// Prepare and compute one batch of `size` (devices that do not overlap preparation): the
    /// result and how long it took (inputs, forward pass and distances); None (after
    /// reporting) when the device failed.
    fn compute(
        &self,
        spec: &JobSpec,
        nonces: Vec<u64>,
        size: usize,
        sizer: &mut BatchSizer,
    ) -> Option<(BatchResult, Duration)> {
        let t0 = Instant::now();
        let prepared = batch::prepare(spec, nonces);
        let (r, device_time) = self.run_on_device(spec, prepared)?;
        let took = t0.elapsed();
        sizer.record(size, r.nonces.len(), device_time);
        self.count(&r, took);
        Some((r, took))
    }

    /// Compute `cur` on the device (from this thread, the one that always drives it) while a
    /// helper thread prepares `next` (when not empty) on the host's threads: the result and
    /// the device time (None, after reporting, when the device failed), and the next batch.
    fn compute_overlapped(
        &self,
        spec: &JobSpec,
        cur: Ahead,
        next: Vec<u64>,
        sizer: &mut BatchSizer,
    ) -> (Option<(BatchResult, Duration)>, Option<PreparedBatch>) {
        let (done, next) = thread::scope(|s| {
            let helper = if next.is_empty() {
                None
            } else {
                // A copy of the nonces, so that none is lost if no thread can be started.
                let nonces = next.clone();
                match thread::Builder::new()
                    .name(format!("prepare-{}", self.worker_id))
                    .spawn_scoped(s, move || batch::prepare(spec, nonces))
                {
                    Ok(h) => Some(h),
                    Err(e) => {
                        tracing::warn!(
                            "cannot start a preparation thread, preparing after the batch: {e}"
                        );
                        None
                    }
                }
            };
            let done = self.run_on_device(spec, cur.batch);
            let prepared = match helper {
                Some(h) => Some(h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))),
                None if next.is_empty() => None,
                None => Some(batch::prepare(spec, next)),
            };
            (done, prepared)
        });
        let done = done.map(|(r, device_time)| {
            sizer.record(cur.size, r.nonces.len(), device_time);
            self.count(&r, device_time);
            (r, device_time)
        });
        (done, next)
    }
}

fn generate_worker(ctx: &WorkerCtx<'_>, spec: JobSpec, job: &GenerateJob) -> Totals {
    let mut sched =
        GenerateSchedule::new(job.start_nonce, ctx.worker_id as u64, ctx.n_workers as u64);
    let mut sizer = ctx.sizer(&spec.params);
    let overlap = ctx.device.overlaps_preparation();
    let mut ahead: Option<Ahead> = None;
    let mut t = Totals::default();
    loop {
        if ctx.control.stopped().is_some() || ctx.started.elapsed() >= job.max_duration {
            break;
        }
        let computed = if overlap {
            let cur = match ahead.take() {
                Some(a) => a,
                None => {
                    let size = sizer.next_size();
                    let nonces = sched.next_batch(size);
                    if nonces.is_empty() {
                        break;
                    }
                    Ahead::drawn(batch::prepare(&spec, nonces), size, &spec, 0, 0)
                }
            };
            // The batch after this one, unless the time will be up: a batch prepared when the
            // job stops is dropped (its nonces were never reported).
            let (next, size) = if ctx.started.elapsed() < job.max_duration {
                let size = sizer.next_size();
                (sched.next_batch(size), size)
            } else {
                (Vec::new(), 0)
            };
            let (done, next) = ctx.compute_overlapped(&spec, cur, next, &mut sizer);
            ahead = next.map(|b| Ahead::drawn(b, size, &spec, 0, 0));
            done
        } else {
            let size = sizer.next_size();
            let nonces = sched.next_batch(size);
            if nonces.is_empty() {
                break;
            }
            ctx.compute(&spec, nonces, size, &mut sizer)
        };
        let Some((r, compute_time)) = computed else {
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
    let mut sizer = ctx.sizer(&base.params);
    let overlap = ctx.device.overlaps_preparation();
    let mut seen_epoch = 0;
    let mut seen_restart = 0;
    let mut current: Option<(JobSpec, Arc<Assignment>)> = None;
    let mut sched: Option<RangeSchedule> = None;
    // Devices that overlap preparation: the next batch, drawn under assignment `epoch`.
    let mut ahead: Option<Ahead> = None;
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
        if let (Some(p), Some((spec, _))) = (ahead.take(), &current) {
            ahead = p.carry_over(spec, seen_epoch, seen_restart);
        }
        if ctx.control.is_paused() {
            thread::sleep(IDLE_POLL);
            continue;
        }
        let (Some((spec, a)), Some(s)) = (&current, &mut sched) else {
            thread::sleep(IDLE_POLL);
            continue;
        };
        let computed = if overlap {
            let cur = match ahead.take() {
                Some(p) => p,
                None => {
                    let size = sizer.next_size();
                    let nonces = s.next_batch(size);
                    if nonces.is_empty() {
                        thread::sleep(IDLE_POLL);
                        continue;
                    }
                    Ahead::drawn(
                        batch::prepare(spec, nonces),
                        size,
                        spec,
                        seen_epoch,
                        seen_restart,
                    )
                }
            };
            let (next, size) = if s.is_done() {
                (Vec::new(), 0)
            } else {
                let size = sizer.next_size();
                (s.next_batch(size), size)
            };
            let (done, next) = ctx.compute_overlapped(spec, cur, next, &mut sizer);
            ahead = next.map(|b| Ahead::drawn(b, size, spec, seen_epoch, seen_restart));
            done
        } else {
            let size = sizer.next_size();
            let nonces = s.next_batch(size);
            if nonces.is_empty() {
                thread::sleep(IDLE_POLL);
                continue;
            }
            ctx.compute(spec, nonces, size, &mut sizer)
        };
        let Some((r, compute_time)) = computed else {
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

    /// A device that holds room for one model: building a second while another is alive
    /// runs out of memory, as a GPU holding a PARAMS_V2 model does.
    struct OneModelDevice {
        cpu: CpuDevice,
        live: Arc<std::sync::atomic::AtomicUsize>,
        builds: std::sync::atomic::AtomicUsize,
    }

    /// A model that counts itself alive.
    struct Counted {
        inner: AnyModel,
        live: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl Drop for Counted {
        fn drop(&mut self) {
            self.live.fetch_sub(1, Ordering::SeqCst);
        }
    }

    impl Device for OneModelDevice {
        fn name(&self) -> String {
            "one-model".into()
        }
        fn check(&self, p: &Params, d: Dtype) -> Result<(), BackendError> {
            self.cpu.check(p, d)
        }
        fn build(&self, bh: &str, p: &Params, d: Dtype) -> Result<AnyModel, BackendError> {
            self.builds.fetch_add(1, Ordering::SeqCst);
            if self.live.load(Ordering::SeqCst) >= 1 {
                return Err(BackendError::OutOfMemory("one model at a time".into()));
            }
            self.live.fetch_add(1, Ordering::SeqCst);
            Ok(Arc::new(Counted {
                inner: self.cpu.build(bh, p, d)?,
                live: self.live.clone(),
            }))
        }
        fn forward(
            &self,
            m: &AnyModel,
            inputs: &[f32],
            batch: usize,
        ) -> Result<Vec<f32>, BackendError> {
            let c = m.downcast_ref::<Counted>().expect("a counted model");
            self.cpu.forward(&c.inner, inputs, batch)
        }
    }

    #[test]
    fn out_of_memory_while_building_evicts_the_cached_models_and_retries() {
        let dev = Arc::new(OneModelDevice {
            cpu: CpuDevice::new(),
            live: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            builds: std::sync::atomic::AtomicUsize::new(0),
        });
        let e = Engine::new(
            vec![dev.clone()],
            EngineOptions {
                model_cache: 2,
                ..EngineOptions::default()
            },
        );
        let (batches, _, _) = drain(&mut e.submit(gen(0.05, 2)).unwrap());
        assert!(!batches.is_empty());
        let mut other = gen(0.05, 2);
        if let Job::Generate(g) = &mut other {
            g.model.block_hash = "another block".into();
        }
        // The first model is cached (capacity 2), so the second build fails once, the cache
        // is emptied, and the retry succeeds.
        let (batches, _, cached) = drain(&mut e.submit(other).unwrap());
        assert!(!batches.is_empty());
        assert!(!cached);
        assert_eq!(dev.builds.load(Ordering::SeqCst), 3);
        assert_eq!(dev.live.load(Ordering::SeqCst), 1);
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

    /// A device that takes a fixed time per batch whatever its size, like a GPU far from
    /// full, and logs when each batch ran.
    struct FakeGpu {
        compute: Duration,
        overlap: bool,
        max: Option<usize>,
        /// Check that every batch's inputs are those of the spec it runs under.
        check_inputs: bool,
        mismatched: AtomicBool,
        log: Mutex<Vec<Ran>>,
    }

    #[derive(Debug, Clone)]
    struct Ran {
        start: Instant,
        end: Instant,
        public_key: String,
        nonces: Vec<u64>,
    }

    impl FakeGpu {
        fn new(compute_ms: u64, overlap: bool) -> Arc<FakeGpu> {
            Arc::new(FakeGpu {
                compute: Duration::from_millis(compute_ms),
                overlap,
                max: None,
                check_inputs: false,
                mismatched: AtomicBool::new(false),
                log: Mutex::new(Vec::new()),
            })
        }

        fn engine(self: &Arc<Self>) -> Engine {
            let d: Arc<dyn Device> = self.clone();
            Engine::new(vec![d], EngineOptions::default())
        }

        fn log(&self) -> Vec<Ran> {
            lock(&self.log).clone()
        }

        /// A nonce's distance: its last decimal digit.
        fn dist(n: u64) -> f64 {
            (n % 10) as f64
        }
    }

    impl Device for FakeGpu {
        fn name(&self) -> String {
            "fake".into()
        }
        fn check(&self, _: &Params, _: Dtype) -> Result<(), BackendError> {
            Ok(())
        }
        fn build(&self, _: &str, _: &Params, _: Dtype) -> Result<AnyModel, BackendError> {
            Ok(Arc::new(()))
        }
        fn forward(&self, _: &AnyModel, _: &[f32], _: usize) -> Result<Vec<f32>, BackendError> {
            Err(BackendError::Device("the engine calls run_batch".into()))
        }
        fn run_batch(
            &self,
            _: &AnyModel,
            job: &JobSpec,
            b: PreparedBatch,
            all_distances: bool,
        ) -> Result<BatchResult, BackendError> {
            let start = Instant::now();
            if self.check_inputs && batch::prepare(job, b.nonces.clone()).inputs != b.inputs {
                self.mismatched.store(true, Ordering::SeqCst);
            }
            thread::sleep(self.compute);
            let dist = b.nonces.iter().map(|&n| Self::dist(n)).collect();
            let r = BatchResult::from_distances(b.nonces.clone(), dist, job.r_target);
            lock(&self.log).push(Ran {
                start,
                end: Instant::now(),
                public_key: job.public_key.clone(),
                nonces: b.nonces,
            });
            Ok(if all_distances {
                r
            } else {
                r.into_valid_only()
            })
        }
        fn overlaps_preparation(&self) -> bool {
            self.overlap
        }
        fn max_batch(&self, _: &AnyModel, _: &Params) -> Option<usize> {
            self.max
        }
    }

    /// Params whose inputs take a noticeable time to draw (the fake device builds nothing).
    fn heavy() -> Params {
        Params {
            dim: 1024,
            n_layers: 1,
            n_heads: 8,
            n_kv_heads: 8,
            vocab_size: 8192,
            multiple_of: 32,
            seq_len: 128,
            ..Params::default()
        }
    }

    fn gen_with(params: Params, secs: f64, bs: u64, r_target: f64) -> Job {
        let Job::Generate(mut g) = gen(secs, bs) else {
            unreachable!()
        };
        g.model.params = params;
        g.r_target = r_target;
        Job::Generate(g)
    }

    /// The first `n` batches of a /generate job, then stop it.
    fn first_batches(e: &Engine, job: Job, n: usize) -> Vec<BatchReport> {
        let mut h = e.submit(job).unwrap();
        let mut out = Vec::new();
        while out.len() < n {
            match h.events.blocking_recv().unwrap() {
                JobEvent::Batch(b) => out.push(b),
                JobEvent::Error(e) => panic!("{e:?}"),
                JobEvent::Finished(end) => panic!("ended early: {end:?}"),
                JobEvent::ModelReady { .. } => {}
            }
        }
        h.control.stop(StopReason::Requested);
        drain(&mut h);
        out
    }

    /// Time between the end of each batch on the device and the start of the next.
    fn gaps(log: &[Ran]) -> Vec<Duration> {
        log.windows(2)
            .map(|w| w[1].start.saturating_duration_since(w[0].end))
            .collect()
    }

    fn median(mut v: Vec<Duration>) -> Duration {
        v.sort();
        v[v.len() / 2]
    }

    #[test]
    fn overlapping_devices_get_their_next_batch_prepared_while_they_compute() {
        const BATCH: u64 = 8;
        const N: usize = 10;
        let job = JobSpec::new("bh", "pk", &heavy(), Dtype::F16, 10.0);
        // How long the host takes to prepare one batch, at best.
        let prepare = (0..5)
            .map(|i| {
                let t0 = Instant::now();
                batch::prepare(&job, (i * BATCH..(i + 1) * BATCH).collect());
                t0.elapsed()
            })
            .min()
            .unwrap();
        // The device is busy longer than the host prepares, so that with overlap it never
        // waits for inputs.
        let compute_ms = (prepare.as_millis() as u64 * 4).max(30);

        // Without overlap, the device waits for the host to prepare between its batches.
        let d = FakeGpu::new(compute_ms, false);
        let batches = first_batches(&d.engine(), gen_with(heavy(), 60.0, BATCH, 5.0), N);
        let serial = gaps(&d.log()[..N]);
        let prepare_in_job = median(serial.clone());
        assert!(prepare_in_job >= prepare / 2, "{serial:?} vs {prepare:?}");
        for (i, b) in batches.iter().enumerate() {
            let first = 7 + i as u64 * BATCH;
            assert_eq!(b.nonces, (first..first + BATCH).collect::<Vec<_>>());
            // compute_time counts the preparation too.
            assert!(b.compute_time >= Duration::from_millis(compute_ms) + prepare / 2);
        }

        // With overlap, batch N+1 is prepared while batch N computes: the device finds it
        // ready when it is done with batch N.
        let d = FakeGpu::new(compute_ms, true);
        let batches = first_batches(&d.engine(), gen_with(heavy(), 60.0, BATCH, 5.0), N);
        let log = d.log();
        let overlapped = gaps(&log[..N]);
        assert!(
            median(overlapped.clone()) < prepare_in_job / 4,
            "the device waited {overlapped:?} between batches, {serial:?} without overlap"
        );
        let (waited, serial_waited) = (
            overlapped.iter().sum::<Duration>(),
            serial.iter().sum::<Duration>(),
        );
        assert!(
            waited < serial_waited / 3,
            "{overlapped:?} vs {serial:?} without overlap"
        );
        // The schedule and the reports are those of a device that does not overlap.
        for (i, b) in batches.iter().enumerate() {
            let first = 7 + i as u64 * BATCH;
            assert_eq!(b.nonces, (first..first + BATCH).collect::<Vec<_>>());
            assert_eq!(b.batch_number, i as u64 + 1);
            assert_eq!(b.next_nonce, first + BATCH);
            let valid: Vec<u64> = b.nonces.iter().copied().filter(|&n| n % 10 < 5).collect();
            assert_eq!(b.valid_nonces, valid);
            assert_eq!(
                b.valid_dist,
                valid.iter().map(|&n| FakeGpu::dist(n)).collect::<Vec<_>>()
            );
            // compute_time is the device's time.
            assert!(b.compute_time >= Duration::from_millis(compute_ms));
            assert!(b.compute_time < log[i].end - log[i].start + prepare_in_job / 2);
            assert_eq!(b.nonces, log[i].nonces);
        }
    }

    #[test]
    fn batch_sizes_ramp_on_overlapping_devices_and_respect_device_memory() {
        // A device whose time does not grow with the batch: throughput doubles with the size,
        // up to the request's 40.
        let d = FakeGpu::new(30, true);
        let sizes: Vec<usize> = first_batches(&d.engine(), gen(60.0, 40), 6)
            .iter()
            .map(|b| b.nonces.len())
            .collect();
        assert_eq!(sizes, [8, 16, 32, 40, 40, 40]);

        // A device that takes at most 20 nonces, with and without overlap.
        for overlap in [true, false] {
            let d = Arc::new(FakeGpu {
                max: Some(20),
                ..Arc::into_inner(FakeGpu::new(30, overlap)).unwrap()
            });
            let batches = first_batches(&d.engine(), gen(60.0, 64), 4);
            let sizes: Vec<usize> = batches.iter().map(|b| b.nonces.len()).collect();
            let want: &[usize] = if overlap {
                &[8, 16, 20, 20]
            } else {
                &[20, 20, 20, 20]
            };
            assert_eq!(sizes, want);
            let all: Vec<u64> = batches.iter().flat_map(|b| b.nonces.clone()).collect();
            assert_eq!(all, (7..7 + all.len() as u64).collect::<Vec<_>>());
        }
    }

    #[test]
    fn overlapping_range_jobs_cover_the_range_across_key_changes_and_restarts() {
        let d = Arc::new(FakeGpu {
            check_inputs: true,
            ..Arc::into_inner(FakeGpu::new(2, true)).unwrap()
        });
        let e = d.engine();
        let mut h = e
            .submit(Job::Range(RangeJob {
                model: ModelSpec {
                    block_hash: "bh".into(),
                    params: tiny(),
                },
                batch_size: 4,
            }))
            .unwrap();
        let a = Assignment {
            public_key: "k1".into(),
            block_height: 9,
            r_target: 5.0,
            range_start: 0,
            range_end: 99_999,
        };
        h.control.assign(a.clone(), true);
        let mut got: Vec<BatchReport> = Vec::new();
        let next_batch = |h: &mut JobHandle| loop {
            match h.events.blocking_recv().unwrap() {
                JobEvent::Batch(b) => return b,
                JobEvent::ModelReady { .. } => {}
                other => panic!("{other:?}"),
            }
        };
        while got.len() < 10 {
            got.push(next_batch(&mut h));
        }
        // A new key for the same range: the range goes on (the batch prepared ahead under k1
        // is drawn again under k2).
        h.control.assign(
            Assignment {
                public_key: "k2".into(),
                r_target: 3.0,
                ..a.clone()
            },
            false,
        );
        loop {
            let b = next_batch(&mut h);
            let k2 = b.public_key == "k2";
            got.push(b);
            if k2 {
                break;
            }
        }
        for _ in 0..5 {
            got.push(next_batch(&mut h));
        }
        // A new range: it starts over (the batch prepared ahead in the old range is dropped).
        h.control.assign(
            Assignment {
                public_key: "k3".into(),
                range_start: 1_000_000,
                range_end: 1_000_049,
                ..a.clone()
            },
            true,
        );
        let mut k3 = Vec::new();
        while k3.len() < 50 {
            let b = next_batch(&mut h);
            if b.public_key == "k3" {
                k3.extend(b.nonces.iter().copied());
            }
            got.push(b);
        }
        h.control.stop(StopReason::Requested);
        let (rest, end, _) = drain(&mut h);
        assert!(rest.is_empty(), "{rest:?}");
        assert_eq!(end, JobEnd::Stopped(StopReason::Requested));
        assert!(!d.mismatched.load(Ordering::SeqCst));

        // Keys in order, each batch with its key's r_target.
        let keys: Vec<&str> = got.iter().map(|b| b.public_key.as_str()).collect();
        let k1_end = keys.iter().position(|&k| k != "k1").unwrap();
        let k2_end = keys.iter().position(|&k| k == "k3").unwrap();
        assert!(k1_end >= 10 && k2_end > k1_end + 5, "{keys:?}");
        assert!(keys[k1_end..k2_end].iter().all(|&k| k == "k2"), "{keys:?}");
        assert!(keys[k2_end..].iter().all(|&k| k == "k3"), "{keys:?}");
        for b in &got {
            let r_target = if b.public_key == "k2" { 3.0 } else { 5.0 };
            let valid: Vec<u64> = b
                .nonces
                .iter()
                .copied()
                .filter(|&n| FakeGpu::dist(n) < r_target)
                .collect();
            assert_eq!(b.valid_nonces, valid);
        }
        // The first range: a prefix, every nonce once, none lost at the key change.
        let first: Vec<u64> = got[..k2_end]
            .iter()
            .flat_map(|b| b.nonces.iter().copied())
            .collect();
        assert_eq!(first, (0..first.len() as u64).collect::<Vec<_>>());
        // The new range: every nonce once, and nothing of the old range under the new key.
        assert_eq!(k3, (1_000_000..=1_000_049).collect::<Vec<_>>());
        assert_eq!(got.last().unwrap().total_computed, 50);
        // The device computed exactly what was reported.
        let ran: Vec<(String, Vec<u64>)> = d
            .log()
            .into_iter()
            .map(|r| (r.public_key, r.nonces))
            .collect();
        let reported: Vec<(String, Vec<u64>)> = got
            .iter()
            .map(|b| (b.public_key.clone(), b.nonces.clone()))
            .collect();
        assert_eq!(ran, reported);
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
