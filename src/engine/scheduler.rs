//! The scheduler: one job owns the devices at a time. Submitting a job while another runs
//! stops the old one ([`StopReason::Preempted`]); the new one takes the devices as soon as the
//! old one's workers have finished their current batch, builds (or takes from the cache) the
//! model on every device, and runs one worker thread per device ([`super::worker`]) until its
//! schedule or time runs out or it is stopped.
//!
//! Nothing here knows about HTTP or about any particular device: callers read
//! [`JobEvent`]s and steer a job through its [`JobControl`]; devices are [`Backend`]s.

use super::cache::{ModelCache, ModelKey};
use super::job::{
    lock, send_event, send_event_unless_stopped, Job, JobControl, JobEnd, JobError, JobEvent,
    JobHandle, ModelSpec, StopReason, SubmitError,
};
use super::signal::Signal;
use super::worker::{self, Totals, WorkerCtx};
use crate::backend::{Backend, BackendError, JobSpec, Model};
use crate::pow::dtype::Dtype;
use crate::pow::params::Params;
use crate::telemetry::{JobState, Metrics};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::thread;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Events a job may queue before its workers wait for the reader.
const EVENT_CAPACITY: usize = 64;

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
    /// The longest a batch should take on a device: once a batch has been measured, batch
    /// sizes are cut so that the next ones take about this long at most.
    pub max_batch_duration: Duration,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            dtype: Dtype::F16,
            model_cache: 1,
            max_batch_bytes: 2 << 30,
            fp8: false,
            max_batch_duration: Duration::from_secs(2),
        }
    }
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
    devices: Vec<Arc<dyn Backend>>,
    opts: EngineOptions,
    cache: Mutex<ModelCache>,
    /// Held by the job that computes.
    devices_busy: Mutex<()>,
    state: Mutex<State>,
    jobs_started: AtomicU64,
    device_failed: AtomicBool,
    metrics: Arc<Metrics>,
    /// Notified whenever a job is stopped, paused or re-assigned, the devices are let go, or
    /// a job ends: what every wait of the engine wakes on.
    signal: Arc<Signal>,
}

/// The job engine. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl Engine {
    /// An engine with one worker per device.
    pub fn new(devices: Vec<Arc<dyn Backend>>, opts: EngineOptions) -> Self {
        Self::with_metrics(devices, opts, Arc::new(Metrics::new()))
    }

    /// An engine that records its jobs, batches and builds into `metrics`.
    pub fn with_metrics(
        devices: Vec<Arc<dyn Backend>>,
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
                signal: Arc::new(Signal::new()),
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
        let control = Arc::new(JobControl::new(self.inner.signal.clone()));
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
        self.inner
            .signal
            .wait_until(Some(Instant::now() + timeout), || !self.is_busy())
    }

    /// Drop the kept models.
    pub fn clear_cache(&self) {
        lock(&self.inner.cache).clear();
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
    inner.metrics.job_finished(kind, end.label());
    {
        let mut st = lock(&inner.state);
        if st.current.as_ref().is_some_and(|r| r.id == id) {
            st.current = None;
        }
    }
    inner.signal.notify();
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
    send_event(&tx, JobEvent::Finished(end));
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

/// The devices, held by the job that computes; letting go of them wakes the job waiting for
/// them.
struct DevicesHeld<'a> {
    guard: Option<MutexGuard<'a, ()>>,
    signal: &'a Signal,
}

impl Drop for DevicesHeld<'_> {
    fn drop(&mut self) {
        // Unlock first, then wake: a waiter woken before the unlock would find them held and
        // sleep on with no further wake-up to come.
        self.guard.take();
        self.signal.notify();
    }
}

/// Wait until the previous job's workers have let go of the devices, or until `control` is
/// stopped (None).
fn take_devices<'a>(inner: &'a Inner, control: &JobControl) -> Option<DevicesHeld<'a>> {
    let mut held = None;
    inner.signal.wait_until(None, || {
        if control.stopped().is_some() {
            return true;
        }
        match inner.devices_busy.try_lock() {
            Ok(g) => held = Some(g),
            Err(TryLockError::Poisoned(p)) => held = Some(p.into_inner()),
            Err(TryLockError::WouldBlock) => return false,
        }
        true
    });
    let guard = held?;
    Some(DevicesHeld {
        guard: Some(guard),
        signal: &inner.signal,
    })
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
    let _devices = match take_devices(inner, control) {
        Some(d) if control.stopped().is_none() => d,
        _ => {
            let r = control.stopped().unwrap_or(StopReason::Failed);
            return (JobEnd::Stopped(r), none);
        }
    };
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
            send_event(tx, JobEvent::Error(err));
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
    if !send_event_unless_stopped(tx, JobEvent::ModelReady { seconds, cached }, control) {
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
        Job::Validate(v) => JobSpec::new(
            &spec.block_hash,
            &v.public_key,
            &spec.params,
            dtype,
            v.r_target,
        ),
    };
    // A stop gives up the batches in flight where the device can (the CPU between layers).
    let base = JobSpec {
        stop: control.stop_token(),
        ..base
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
                    all_distances: job.wants_all_distances(),
                    started: compute_start,
                    metrics: &inner.metrics,
                    device_failed: &inner.device_failed,
                    submitted,
                    first_batch: &first_batch,
                    max_batch_duration: inner.opts.max_batch_duration,
                };
                let base = base.clone();
                thread::Builder::new()
                    .name(format!("worker-{w}"))
                    .spawn_scoped(s, move || worker::run(&ctx, base, job))
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
    let sum = totals.iter().fold(Totals::default(), |a, t| a.plus(t));
    // The job is over: an idle server keeps its cached models, not the batches' buffers.
    for d in &inner.devices {
        d.release_working_memory();
    }
    super::heap::give_back_free_memory();
    match control.stopped() {
        Some(r) => (JobEnd::Stopped(r), sum),
        None => (JobEnd::Completed, sum),
    }
}

fn models_for(inner: &Inner, spec: &ModelSpec) -> Result<(Vec<Model>, bool), BackendError> {
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
        .unwrap_or(1)
        .max(1);
    (inner.opts.max_batch_bytes / per).max(1)
}

/// Build `spec`'s model on every device at once.
fn build_on_every_device(inner: &Inner, spec: &ModelSpec) -> Result<Vec<Model>, BackendError> {
    let dtype = inner.opts.dtype;
    let built: Vec<Result<Model, BackendError>> = thread::scope(|s| {
        let handles: Vec<_> = inner
            .devices
            .iter()
            .map(|d| s.spawn(move || d.build_model(&spec.block_hash, &spec.params, dtype)))
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
