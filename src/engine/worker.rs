//! The worker loop: one thread per device for the length of a job. A generate worker walks
//! its share of the nonces from the start nonce until the time limit; a range worker follows
//! the assignments of its [`JobControl`] (waiting, asleep, while paused, unassigned or done
//! with its range). Both compute through one [`Pipeline`], which on devices that overlap
//! preparation draws the next batch's inputs on the host while the device computes the
//! current one, and both send a [`BatchReport`] per batch.
//!
//! A stop reaches a batch in flight through its [`JobSpec::stop`]: the device may give the
//! batch up midway ([`BackendError::Stopped`]). Such a batch is dropped whole and none of its
//! nonces is reported; a range worker puts them back in front of its schedule, so that a
//! range that goes on computes them after all.

use super::job::{
    send_event, send_event_unless_stopped, Assignment, BatchReport, GenerateJob, Job, JobControl,
    JobError, JobEvent, StopReason, ValidateJob,
};
use super::sizer::BatchSizer;
use crate::backend::batch;
use crate::backend::{Backend, BackendError, BatchResult, JobSpec, Model, PreparedBatch};
use crate::pow::nonces::{GenerateSchedule, RangeSchedule};
use crate::pow::params::Params;
use crate::telemetry::Metrics;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// What one worker (or a whole job) computed.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Totals {
    pub batches: u64,
    pub computed: u64,
    pub valid: u64,
}

impl Totals {
    /// Count one more batch.
    fn add(&mut self, r: &BatchResult) {
        self.batches += 1;
        self.computed += r.nonces.len() as u64;
        self.valid += r.valid_nonces.len() as u64;
    }

    pub fn plus(self, t: &Totals) -> Totals {
        Totals {
            batches: self.batches + t.batches,
            computed: self.computed + t.computed,
            valid: self.valid + t.valid,
        }
    }
}

/// What a worker needs from its job and engine.
pub(super) struct WorkerCtx<'a> {
    pub worker_id: usize,
    pub n_workers: usize,
    pub device: &'a dyn Backend,
    pub model: Model,
    pub control: &'a JobControl,
    pub tx: &'a mpsc::Sender<JobEvent>,
    /// The request's batch size, cut to the engine's memory bound.
    pub batch_size: usize,
    /// Whether the device hands back every nonce's distance (validation) rather than only
    /// the proofs'.
    pub all_distances: bool,
    pub started: Instant,
    pub metrics: &'a Metrics,
    /// Set when a device fails for good (/health's `cuda_broken`).
    pub device_failed: &'a AtomicBool,
    /// When the job was submitted, and whether any worker has finished a batch yet.
    pub submitted: Instant,
    pub first_batch: &'a AtomicBool,
    /// The longest a batch should take ([`BatchSizer`] cuts sizes to it once measured).
    pub max_batch_duration: Duration,
}

/// Run the worker of `job` on `ctx`'s device; what it computed.
pub(super) fn run(ctx: &WorkerCtx<'_>, base: JobSpec, job: &Job) -> Totals {
    match job {
        Job::Generate(g) => generate_worker(ctx, base, g),
        Job::Range(_) => range_worker(ctx, base),
        Job::Validate(v) => validate_worker(ctx, base, v),
    }
}

/// Where a batch was drawn: the assignment epoch and the range restart it belongs to (both 0
/// for /generate, which has no assignments).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Epochs {
    assignment: u64,
    restart: u64,
}

/// Where a worker's nonces come from.
trait NonceSource {
    /// The next `n` nonces (fewer at the end, none when there are no more).
    fn take(&mut self, n: usize) -> Vec<u64>;
    /// Whether a batch may be drawn ahead of the one about to compute (false when the
    /// schedule is done or the job is about to end: a batch drawn then would be dropped, its
    /// nonces never reported).
    fn more(&self) -> bool;
}

/// A /generate worker's schedule until the job's time limit (or its last nonce).
struct UntilDeadline<'a> {
    sched: &'a mut GenerateSchedule,
    started: Instant,
    max: Duration,
}

impl NonceSource for UntilDeadline<'_> {
    fn take(&mut self, n: usize) -> Vec<u64> {
        self.sched.next_batch(n)
    }
    fn more(&self) -> bool {
        !self.sched.is_done() && self.started.elapsed() < self.max
    }
}

/// A validation worker's share of a list of nonces (every n-th from its own position) until
/// the job's time limit.
struct ListShare<'a> {
    nonces: &'a [u64],
    next: usize,
    stride: usize,
    started: Instant,
    max: Duration,
}

impl NonceSource for ListShare<'_> {
    fn take(&mut self, n: usize) -> Vec<u64> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n && self.next < self.nonces.len() {
            out.push(self.nonces[self.next]);
            self.next += self.stride;
        }
        out
    }
    fn more(&self) -> bool {
        self.next < self.nonces.len() && self.started.elapsed() < self.max
    }
}

/// A range worker's nonces: its schedule, behind the nonces of batches given up midway.
struct RangeNonces {
    sched: RangeSchedule,
    /// Nonces of stopped batches, taken before the schedule's.
    given_back: Vec<u64>,
}

impl RangeNonces {
    fn new(sched: RangeSchedule) -> Self {
        RangeNonces {
            sched,
            given_back: Vec::new(),
        }
    }

    /// Put back the nonces of a batch that was given up: none of them was reported.
    fn give_back(&mut self, mut nonces: Vec<u64>) {
        nonces.append(&mut self.given_back);
        self.given_back = nonces;
    }
}

impl NonceSource for RangeNonces {
    fn take(&mut self, n: usize) -> Vec<u64> {
        let mut out: Vec<u64> = self
            .given_back
            .drain(..n.min(self.given_back.len()))
            .collect();
        if out.len() < n {
            out.extend(self.sched.next_batch(n - out.len()));
        }
        out
    }
    fn more(&self) -> bool {
        !self.given_back.is_empty() || !self.sched.is_done()
    }
}

/// A batch prepared ahead, while the device computed the one before it.
struct Ahead {
    batch: PreparedBatch,
    /// The size [`BatchSizer::next_size`] gave it.
    size: usize,
    /// The public key its inputs were drawn with.
    public_key: String,
    at: Epochs,
}

impl Ahead {
    /// A batch of `size` drawn with `spec` under `at`.
    fn drawn(batch: PreparedBatch, size: usize, spec: &JobSpec, at: Epochs) -> Ahead {
        Ahead {
            batch,
            size,
            public_key: spec.public_key.clone(),
            at,
        }
    }

    /// Bring a batch drawn under an older assignment up to the current one: keep it when only
    /// r_target or the block height changed, draw its inputs again when the public key
    /// changed (the same nonces: the range goes on, none may be lost), and drop it when the
    /// range was restarted (its nonces belong to the old range).
    fn carry_over(self, spec: &JobSpec, at: Epochs) -> Option<Ahead> {
        if self.at.assignment == at.assignment {
            return Some(self);
        }
        if self.at.restart != at.restart {
            return None;
        }
        let batch = if self.public_key == spec.public_key {
            self.batch
        } else {
            batch::prepare(spec, self.batch.nonces)
        };
        Some(Ahead::drawn(batch, self.size, spec, at))
    }
}

/// Why a batch came back without a result.
enum Halt {
    /// The device failed (already reported).
    Failed,
    /// The device gave the batch up because the job is stopping: its nonces, none reported.
    Stopped(Vec<u64>),
}

/// What one step of the pipeline did.
enum Step {
    /// A batch computed, and the time it is reported with.
    Computed(BatchResult, Duration),
    /// The source had no nonces.
    Idle,
    /// No result: see [`Halt`].
    Halted(Halt),
}

/// A worker's batches through its device: sized by a [`BatchSizer`], and, on devices that
/// overlap preparation, each one's successor drawn on the host while it computes.
struct Pipeline<'c, 'a> {
    ctx: &'c WorkerCtx<'a>,
    sizer: BatchSizer,
    overlap: bool,
    ahead: Option<Ahead>,
}

impl<'c, 'a> Pipeline<'c, 'a> {
    fn new(ctx: &'c WorkerCtx<'a>, params: &Params) -> Self {
        Pipeline {
            ctx,
            sizer: ctx.sizer(params),
            overlap: ctx.device.overlaps_preparation(),
            ahead: None,
        }
    }

    /// After an assignment change: keep, redraw or drop the batch drawn ahead (see
    /// [`Ahead::carry_over`]).
    fn carry_over(&mut self, spec: &JobSpec, at: Epochs) {
        if let Some(a) = self.ahead.take() {
            self.ahead = a.carry_over(spec, at);
        }
    }

    /// Compute the next batch of `spec`, its nonces from `src` (or drawn ahead under `at`).
    fn step(&mut self, spec: &JobSpec, at: Epochs, src: &mut dyn NonceSource) -> Step {
        if !self.overlap {
            let size = self.sizer.next_size();
            let nonces = src.take(size);
            if nonces.is_empty() {
                return Step::Idle;
            }
            return match self.ctx.compute(spec, nonces, size, &mut self.sizer) {
                Ok((r, took)) => Step::Computed(r, took),
                Err(h) => Step::Halted(h),
            };
        }
        let cur = match self.ahead.take() {
            Some(a) => a,
            None => {
                let size = self.sizer.next_size();
                let nonces = src.take(size);
                if nonces.is_empty() {
                    return Step::Idle;
                }
                Ahead::drawn(batch::prepare(spec, nonces), size, spec, at)
            }
        };
        let (next, size) = if src.more() {
            let size = self.sizer.next_size();
            (src.take(size), size)
        } else {
            (Vec::new(), 0)
        };
        let (done, next) = self
            .ctx
            .compute_overlapped(spec, cur, next, &mut self.sizer);
        self.ahead = next.map(|b| Ahead::drawn(b, size, spec, at));
        match done {
            Ok((r, device_time)) => Step::Computed(r, device_time),
            Err(h) => Step::Halted(h),
        }
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
        )
        .with_max_duration(self.max_batch_duration);
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
            dist: r.dist,
            batch_number: t.batches,
            total_computed: t.computed,
            total_valid: t.valid,
            elapsed: self.started.elapsed(),
            compute_time,
        }
    }

    /// Run a prepared batch on the device (the proofs' distances, or every one for jobs that
    /// want them): the result and the device time; a halt when the device failed (reported
    /// here) or gave the batch up for a stop (not a failure: nothing is reported).
    fn run_on_device(
        &self,
        spec: &JobSpec,
        b: PreparedBatch,
    ) -> Result<(BatchResult, Duration), Halt> {
        let t0 = Instant::now();
        let nonces = b.nonces.clone();
        match self
            .device
            .run_batch(&self.model, spec, b, self.all_distances)
        {
            Ok(r) => Ok((r, t0.elapsed())),
            Err(BackendError::Stopped) => {
                tracing::debug!(
                    worker = self.worker_id,
                    "a batch of {} nonces was given up midway for a stop",
                    nonces.len()
                );
                Err(Halt::Stopped(nonces))
            }
            Err(e) => {
                let err = JobError::from_backend(&e);
                self.metrics.device_error(err.error_type);
                if err.fatal {
                    self.device_failed.store(true, Ordering::SeqCst);
                }
                tracing::warn!(
                    worker = self.worker_id,
                    error_type = err.error_type,
                    "batch failed: {}",
                    crate::logsafe::scrub(&err.message)
                );
                self.control.stop(StopReason::Failed);
                send_event(self.tx, JobEvent::Error(err));
                Err(Halt::Failed)
            }
        }
    }

    /// Count a computed batch in the metrics, with the time it is reported with.
    fn count(&self, r: &BatchResult, took: Duration) {
        let m = self.metrics;
        m.batch(r.nonces.len() as u64, r.valid_nonces.len() as u64, took);
        if !self.first_batch.swap(true, Ordering::SeqCst) {
            m.first_batch(self.submitted.elapsed());
        }
    }

    /// Prepare and compute one batch of `size` (devices that do not overlap preparation): the
    /// result and how long it took (inputs, forward pass and distances), or why there is none.
    fn compute(
        &self,
        spec: &JobSpec,
        nonces: Vec<u64>,
        size: usize,
        sizer: &mut BatchSizer,
    ) -> Result<(BatchResult, Duration), Halt> {
        let t0 = Instant::now();
        let prepared = batch::prepare(spec, nonces);
        let (r, device_time) = self.run_on_device(spec, prepared)?;
        let took = t0.elapsed();
        sizer.record(size, r.nonces.len(), device_time);
        self.count(&r, took);
        Ok((r, took))
    }

    /// Compute `cur` on the device (from this thread, the one that always drives it) while a
    /// helper thread prepares `next` (when not empty) on the host's threads: the result and
    /// the device time (or why there is none), and the next batch.
    fn compute_overlapped(
        &self,
        spec: &JobSpec,
        cur: Ahead,
        next: Vec<u64>,
        sizer: &mut BatchSizer,
    ) -> (Result<(BatchResult, Duration), Halt>, Option<PreparedBatch>) {
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
    // The time limit gives up the batch in flight too (the job then ends as completed).
    let spec = spec.until(ctx.started + job.max_duration);
    let mut sched = GenerateSchedule::first(
        job.start_nonce,
        job.max_nonces,
        ctx.worker_id as u64,
        ctx.n_workers as u64,
    );
    let mut src = UntilDeadline {
        sched: &mut sched,
        started: ctx.started,
        max: job.max_duration,
    };
    walk(ctx, &spec, &mut src, job.block_height, job.max_duration)
}

/// Compute the nonces of `src` until it has no more (the batch drawn ahead included), the
/// job's time `max` is up or it is stopped, reporting each batch. A stopped job has no one to
/// hand its last batch to (a /generate client gone or preempted, a validation without a
/// verdict): on a full queue the batch is given up.
fn walk(
    ctx: &WorkerCtx<'_>,
    spec: &JobSpec,
    src: &mut dyn NonceSource,
    block_height: u64,
    max: Duration,
) -> Totals {
    let mut pipe = Pipeline::new(ctx, &spec.params);
    let mut t = Totals::default();
    while ctx.control.stopped().is_none() && ctx.started.elapsed() < max {
        let (r, compute_time) = match pipe.step(spec, Epochs::default(), src) {
            Step::Computed(r, took) => (r, took),
            // A stopped /generate batch is dropped: the job is over (stopped or out of
            // time), and the stream's next_nonce says where it got.
            Step::Idle | Step::Halted(_) => break,
        };
        t.add(&r);
        let report = ctx.report(spec, block_height, r, &t, compute_time);
        if !send_event_unless_stopped(ctx.tx, JobEvent::Batch(report), ctx.control) {
            break;
        }
    }
    t
}

fn range_worker(ctx: &WorkerCtx<'_>, base: JobSpec) -> Totals {
    let mut pipe = Pipeline::new(ctx, &base.params);
    let signal = ctx.control.signal();
    let mut at = Epochs::default();
    let mut current: Option<(JobSpec, Arc<Assignment>)> = None;
    let mut sched: Option<RangeNonces> = None;
    let mut t = Totals::default(); // since the last restart, as reported
    let mut all = Totals::default(); // over the whole job, for the log
    loop {
        // Read before looking at the control: a change made after this wakes the waits
        // below at once.
        let seen = signal.version();
        if ctx.control.stopped().is_some() {
            break;
        }
        if let Some((epoch, restart, a)) = ctx.control.assignment_since(at.assignment) {
            at.assignment = epoch;
            let mut spec = base.clone();
            spec.public_key = a.public_key.clone();
            spec.r_target = a.r_target;
            if restart != at.restart || sched.is_none() {
                at.restart = restart;
                sched = Some(RangeNonces::new(RangeSchedule::new(
                    a.range_start,
                    a.range_end,
                    ctx.worker_id as u64,
                    ctx.n_workers as u64,
                )));
                t = Totals::default();
            }
            current = Some((spec, a));
        }
        if let Some((spec, _)) = &current {
            pipe.carry_over(spec, at);
        }
        let (Some((spec, a)), Some(s)) = (&current, &mut sched) else {
            // Nothing assigned yet.
            signal.wait_past(seen, None);
            continue;
        };
        if ctx.control.is_paused() {
            signal.wait_past(seen, None);
            continue;
        }
        let (r, compute_time) = match pipe.step(spec, at, s) {
            Step::Computed(r, took) => (r, took),
            Step::Halted(Halt::Failed) => break,
            Step::Halted(Halt::Stopped(nonces)) => {
                // Not one of them was reported: should the range go on, they come first.
                s.give_back(nonces);
                continue;
            }
            Step::Idle => {
                // The range is done: wait for a new one, or for the end.
                signal.wait_past(seen, None);
                continue;
            }
        };
        t.add(&r);
        all.add(&r);
        let report = ctx.report(spec, a.block_height, r, &t, compute_time);
        // Range results must reach the orchestrator: wait for the reader even when stopping.
        if !send_event(ctx.tx, JobEvent::Batch(report)) {
            break;
        }
    }
    all
}

fn validate_worker(ctx: &WorkerCtx<'_>, spec: JobSpec, job: &ValidateJob) -> Totals {
    // As for /generate: the time limit gives up the batch in flight (no verdict comes of a
    // validation cut short anyway).
    let spec = spec.until(ctx.started + job.max_duration);
    let mut src = ListShare {
        nonces: &job.nonces,
        next: ctx.worker_id,
        stride: ctx.n_workers,
        started: ctx.started,
        max: job.max_duration,
    };
    walk(ctx, &spec, &mut src, job.block_height, job.max_duration)
}
