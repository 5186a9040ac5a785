//! The engine as a whole: jobs submitted, preempted and stopped, models built and cached,
//! batches computed on real (CPU) and simulated devices, the pipeline's overlap measured.

use super::job::lock;
use super::*;
use crate::backend::batch;
use crate::backend::cpu::{self, CpuBackend};
use crate::backend::{Backend, BackendError, BatchResult, JobSpec, Model, PreparedBatch};
use crate::pow::dtype::Dtype;
use crate::pow::params::Params;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

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
    Engine::new(vec![Arc::new(CpuBackend::new())], EngineOptions::default())
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
        max_nonces: None,
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
    cpu: CpuBackend,
    live: Arc<std::sync::atomic::AtomicUsize>,
    builds: std::sync::atomic::AtomicUsize,
}

/// A model that counts itself alive.
struct Counted {
    inner: Model,
    live: Arc<std::sync::atomic::AtomicUsize>,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.live.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Backend for OneModelDevice {
    fn name(&self) -> String {
        "one-model".into()
    }
    fn check(&self, p: &Params, d: Dtype) -> Result<(), BackendError> {
        self.cpu.check(p, d)
    }
    fn build_model(&self, bh: &str, p: &Params, d: Dtype) -> Result<Model, BackendError> {
        self.builds.fetch_add(1, Ordering::SeqCst);
        if self.live.load(Ordering::SeqCst) >= 1 {
            return Err(BackendError::OutOfMemory("one model at a time".into()));
        }
        self.live.fetch_add(1, Ordering::SeqCst);
        Ok(Arc::new(Counted {
            inner: self.cpu.build_model(bh, p, d)?,
            live: self.live.clone(),
        }))
    }
    fn forward_last_logits(
        &self,
        m: &Model,
        inputs: &[f32],
        batch: usize,
    ) -> Result<Vec<f32>, BackendError> {
        let c = m.downcast_ref::<Counted>().expect("a counted model");
        self.cpu.forward_last_logits(&c.inner, inputs, batch)
    }
    fn bytes_per_nonce(&self, p: &Params) -> u64 {
        cpu::bytes_per_nonce(p)
    }
}

#[test]
fn out_of_memory_while_building_evicts_the_cached_models_and_retries() {
    let dev = Arc::new(OneModelDevice {
        cpu: CpuBackend::new(),
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

/// Wait until `h`'s job has computed a batch.
fn first_batch(h: &mut JobHandle) {
    loop {
        if let JobEvent::Batch(_) = h.events.blocking_recv().unwrap() {
            return;
        }
    }
}

#[test]
fn generate_ends_after_its_first_max_nonces() {
    let e = engine();
    let mut job = gen(60.0, 4);
    if let Job::Generate(g) = &mut job {
        g.max_nonces = Some(10);
    }
    let t = Instant::now();
    let mut h = e.submit(job).unwrap();
    let (batches, end, _) = drain(&mut h);
    assert_eq!(end, JobEnd::Completed);
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    let mut nonces: Vec<u64> = batches.iter().flat_map(|b| b.nonces.clone()).collect();
    nonces.sort_unstable();
    assert_eq!(
        nonces,
        (7..17).collect::<Vec<_>>(),
        "exactly the first 10, once each"
    );
}

#[test]
fn a_new_job_preempts_the_old_one() {
    let e = engine();
    let mut a = e.submit(gen(60.0, 2)).unwrap();
    first_batch(&mut a);
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
        vec![Arc::new(CpuBackend::new()), Arc::new(CpuBackend::new())],
        EngineOptions::default(),
    );
    assert_eq!(e.n_workers(), 2);
    let mut h = e.submit(gen(0.2, 3)).unwrap();
    let (batches, end, _) = drain(&mut h);
    assert_eq!(end, JobEnd::Completed);
    let mut all = Vec::new();
    for w in 0..2u64 {
        let mine: Vec<&BatchReport> = batches.iter().filter(|b| b.worker_id as u64 == w).collect();
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
        let d: Arc<dyn Backend> = self.clone();
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

impl Backend for FakeGpu {
    fn name(&self) -> String {
        "fake".into()
    }
    fn check(&self, _: &Params, _: Dtype) -> Result<(), BackendError> {
        Ok(())
    }
    fn build_model(&self, _: &str, _: &Params, _: Dtype) -> Result<Model, BackendError> {
        Ok(Arc::new(()))
    }
    fn forward_last_logits(
        &self,
        _: &Model,
        _: &[f32],
        _: usize,
    ) -> Result<Vec<f32>, BackendError> {
        Err(BackendError::Device("the engine calls run_batch".into()))
    }
    fn run_batch(
        &self,
        _: &Model,
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
        Ok(r.keeping_distances(all_distances))
    }
    fn overlaps_preparation(&self) -> bool {
        self.overlap
    }
    fn max_batch(&self, _: &Model, _: &Params) -> Option<usize> {
        self.max
    }
    fn bytes_per_nonce(&self, p: &Params) -> u64 {
        cpu::bytes_per_nonce(p)
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

/// Held by the tests that load every core for seconds and by the one that measures gaps of
/// milliseconds, so that they do not run at the same time.
static CORES: Mutex<()> = Mutex::new(());

#[test]
fn overlapping_devices_get_their_next_batch_prepared_while_they_compute() {
    let _cores = lock(&CORES);
    const BATCH: u64 = 8;
    const N: usize = 10;
    let job = JobSpec::new("bh", "pk", &heavy(), Dtype::F16, 10.0);
    // How long the host takes to prepare one batch, at best.
    let fastest_prepare = || {
        (0..5)
            .map(|i| {
                let t0 = Instant::now();
                batch::prepare(&job, (i * BATCH..(i + 1) * BATCH).collect());
                t0.elapsed()
            })
            .min()
            .unwrap()
    };
    let before = fastest_prepare();
    // The device is busy longer than the host prepares, so that with overlap it never
    // waits for inputs.
    let compute_ms = (before.as_millis() as u64 * 4).max(30);

    // Without overlap, the device waits for the host to prepare between its batches.
    let d = FakeGpu::new(compute_ms, false);
    let batches = first_batches(&d.engine(), gen_with(heavy(), 60.0, BATCH, 5.0), N);
    // At best, measured on both sides of the run: a machine busy with other work while it
    // was measured once must not make the job look faster than preparing can be.
    let prepare = before.min(fastest_prepare());
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

fn validate_job(nonces: Vec<u64>, bs: u64, secs: f64) -> Job {
    Job::Validate(ValidateJob {
        model: ModelSpec {
            block_hash: "bh".into(),
            params: tiny(),
        },
        public_key: "pk".into(),
        block_height: 3,
        r_target: 10.0,
        nonces: Arc::new(nonces),
        batch_size: bs,
        max_duration: Duration::from_secs_f64(secs),
    })
}

#[test]
fn a_validation_computes_exactly_its_nonces_with_every_distance() {
    for n_devices in [1, 2] {
        let devices: Vec<Arc<dyn Backend>> = (0..n_devices)
            .map(|_| Arc::new(CpuBackend::new()) as Arc<dyn Backend>)
            .collect();
        let e = Engine::new(devices, EngineOptions::default());
        // Not sorted, not contiguous, near the top of the range.
        let nonces: Vec<u64> = vec![9, 3, u64::MAX, 1_000_000, 7, 0, 42, u64::MAX - 5, 11];
        let (batches, end, _) =
            drain(&mut e.submit(validate_job(nonces.clone(), 2, 60.0)).unwrap());
        assert_eq!(end, JobEnd::Completed);
        let mut got: Vec<(u64, f64)> = Vec::new();
        for b in &batches {
            let dist = b.dist.as_ref().expect("every distance of a validation");
            assert_eq!(dist.len(), b.nonces.len());
            got.extend(b.nonces.iter().copied().zip(dist.iter().copied()));
        }
        got.sort_by_key(|x| x.0);
        let mut want_nonces = nonces.clone();
        want_nonces.sort_unstable();
        assert_eq!(got.iter().map(|x| x.0).collect::<Vec<_>>(), want_nonces);
        // The distances are the host's own recomputation of each nonce, alone.
        let cpu = CpuBackend::new();
        let m = cpu.build_model("bh", &tiny(), Dtype::F16).unwrap();
        let spec = JobSpec::new("bh", "pk", &tiny(), Dtype::F16, 10.0);
        for (n, d) in got {
            let one = cpu
                .run_batch(&m, &spec, batch::prepare(&spec, vec![n]), true)
                .unwrap();
            assert_eq!(one.distances(), Some(&[d][..]), "nonce {n}");
        }
    }
}

#[test]
fn validations_and_generations_preempt_each_other() {
    let e = engine();
    // A generation preempted by a validation, which then runs to its end.
    let mut g = e.submit(gen(60.0, 2)).unwrap();
    first_batch(&mut g);
    let mut v = e.submit(validate_job((0..50).collect(), 4, 60.0)).unwrap();
    let (_, end, _) = drain(&mut g);
    assert_eq!(end, JobEnd::Stopped(StopReason::Preempted));
    let (batches, end, _) = drain(&mut v);
    assert_eq!(end, JobEnd::Completed);
    assert_eq!(batches.iter().map(|b| b.nonces.len()).sum::<usize>(), 50);
    // A validation preempted by a generation.
    let mut v = e
        .submit(validate_job((0..1_000_000).collect(), 2, 60.0))
        .unwrap();
    first_batch(&mut v);
    let mut g = e.submit(gen(0.2, 2)).unwrap();
    let (_, end, _) = drain(&mut v);
    assert_eq!(end, JobEnd::Stopped(StopReason::Preempted));
    let (batches, end, _) = drain(&mut g);
    assert_eq!(end, JobEnd::Completed);
    assert!(!batches.is_empty());
    assert_eq!(e.status().jobs_started, 4);
}

#[test]
fn a_validation_stops_at_its_time_limit() {
    let e = engine();
    let (batches, end, _) = drain(
        &mut e
            .submit(validate_job((0..1_000_000).collect(), 4, 0.2))
            .unwrap(),
    );
    assert_eq!(end, JobEnd::Completed);
    let n: usize = batches.iter().map(|b| b.nonces.len()).sum();
    assert!(n > 0 && n < 1_000_000, "{n}");
}

#[test]
fn a_validation_on_an_overlapping_device_loses_no_nonce_drawn_ahead() {
    // The batch drawn ahead while the last one computes must still be computed once the list
    // is exhausted.
    for n in [1usize, 7, 8, 9, 40, 101] {
        let d = FakeGpu::new(2, true);
        let e = d.engine();
        let nonces: Vec<u64> = (0..n as u64).map(|i| 1000 - 3 * i).collect();
        let (batches, end, _) =
            drain(&mut e.submit(validate_job(nonces.clone(), 8, 60.0)).unwrap());
        assert_eq!(end, JobEnd::Completed);
        let mut got: Vec<u64> = batches.iter().flat_map(|b| b.nonces.clone()).collect();
        got.sort_unstable();
        let mut want = nonces;
        want.sort_unstable();
        assert_eq!(got, want, "{n} nonces");
        for b in &batches {
            let dist = b.dist.as_ref().unwrap();
            let want: Vec<f64> = b.nonces.iter().map(|&n| FakeGpu::dist(n)).collect();
            assert_eq!(dist, &want);
        }
    }
}

/// A model of many thin layers: a batch of eight takes a second or two on the CPU, each of
/// its 48 layers a small fraction of that.
fn deep() -> Params {
    Params {
        dim: 128,
        n_layers: 48,
        n_heads: 2,
        n_kv_heads: 2,
        vocab_size: 64,
        multiple_of: 128,
        seq_len: 256,
        ..Params::default()
    }
}

/// How long one nonce of `p` takes on the CPU (the model built, one batch of one).
fn one_nonce_time(p: &Params) -> Duration {
    let be = CpuBackend::new();
    let m = be.build_model("bh", p, Dtype::F16).unwrap();
    let job = JobSpec::new("bh", "pk", p, Dtype::F16, 10.0);
    let b = batch::prepare(&job, vec![1]);
    let t0 = Instant::now();
    be.run_batch(&m, &job, b, false).unwrap();
    t0.elapsed()
}

/// The job's events until it finishes, and how long after `since` it did.
fn until_finished(h: &mut JobHandle, since: Instant) -> (Vec<BatchReport>, JobEnd, Duration) {
    let mut out = Vec::new();
    loop {
        match h.events.blocking_recv().expect("finished comes last") {
            JobEvent::Batch(b) => out.push(b),
            JobEvent::Finished(end) => return (out, end, since.elapsed()),
            JobEvent::ModelReady { .. } => {}
            JobEvent::Error(e) => panic!("{e:?}"),
        }
    }
}

#[test]
fn a_stop_gives_up_the_cpu_batch_in_flight_between_layers() {
    let _cores = lock(&CORES);
    let p = deep();
    let per_nonce = one_nonce_time(&p);
    let layer = per_nonce / p.n_layers as u32;
    let e = engine();
    // Eight nonces a batch: seconds, before the duration bound has measured anything.
    let mut h = e.submit(gen_with(p.clone(), 600.0, 8, 10.0)).unwrap();
    assert!(matches!(
        h.events.blocking_recv(),
        Some(JobEvent::ModelReady { .. })
    ));
    thread::sleep(per_nonce / 2);
    let t0 = Instant::now();
    h.control.stop(StopReason::Requested);
    let (batches, end, latency) = until_finished(&mut h, t0);
    assert_eq!(end, JobEnd::Stopped(StopReason::Requested));
    assert!(batches.is_empty(), "the batch in flight is dropped whole");
    // About one layer of the eight-nonce batch (a 48th of it) when the cores are free; far
    // within the batch itself however busy they are with other tests.
    let batch = per_nonce * 8;
    assert!(
        latency < batch / 4,
        "stopped after {latency:?}; a layer takes {:?}, the batch {batch:?}",
        layer * 8
    );
}

#[test]
fn the_time_limit_ends_a_generate_job_inside_its_batch() {
    let _cores = lock(&CORES);
    let p = deep();
    let per_nonce = one_nonce_time(&p);
    let e = engine();
    let limit = per_nonce;
    let mut h = e
        .submit(gen_with(p.clone(), limit.as_secs_f64(), 8, 10.0))
        .unwrap();
    assert!(matches!(
        h.events.blocking_recv(),
        Some(JobEvent::ModelReady { .. })
    ));
    let t0 = Instant::now();
    let (batches, end, took) = until_finished(&mut h, t0);
    assert_eq!(end, JobEnd::Completed, "the time limit is a completion");
    assert!(batches.is_empty());
    assert!(
        took < limit + per_nonce * 8 / 4,
        "ended {took:?} after the model was ready; limit {limit:?}, batch {:?}",
        per_nonce * 8
    );
}

#[test]
fn cpu_batches_shrink_to_the_duration_bound() {
    let _cores = lock(&CORES);
    let p = deep();
    let per_nonce = one_nonce_time(&p);
    // A bound of about two nonces: the first batch (6) is measured, the next ones fit it.
    let e = Engine::new(
        vec![Arc::new(CpuBackend::new())],
        EngineOptions {
            max_batch_duration: per_nonce * 2 + per_nonce / 2,
            ..EngineOptions::default()
        },
    );
    let sizes: Vec<usize> = first_batches(&e, gen_with(p, 600.0, 6, 10.0), 3)
        .iter()
        .map(|b| b.nonces.len())
        .collect();
    assert_eq!(sizes[0], 6);
    // About two or three by the measurement (which other tests' load may blur): fewer than six.
    assert!(
        sizes[1..].iter().all(|&n| (1..=4).contains(&n)),
        "{sizes:?} (one nonce takes {per_nonce:?})"
    );
}

/// A CPU that gives up the first batch it is handed, as if told to stop, although the job
/// goes on.
struct GivesUpOnce {
    cpu: CpuBackend,
    given_up: AtomicBool,
    released: std::sync::atomic::AtomicUsize,
}

impl Backend for GivesUpOnce {
    fn name(&self) -> String {
        "gives-up-once".into()
    }
    fn check(&self, p: &Params, d: Dtype) -> Result<(), BackendError> {
        self.cpu.check(p, d)
    }
    fn build_model(&self, bh: &str, p: &Params, d: Dtype) -> Result<Model, BackendError> {
        self.cpu.build_model(bh, p, d)
    }
    fn forward_last_logits(
        &self,
        m: &Model,
        inputs: &[f32],
        batch: usize,
    ) -> Result<Vec<f32>, BackendError> {
        self.cpu.forward_last_logits(m, inputs, batch)
    }
    fn run_batch(
        &self,
        m: &Model,
        job: &JobSpec,
        b: PreparedBatch,
        all_distances: bool,
    ) -> Result<BatchResult, BackendError> {
        if !self.given_up.swap(true, Ordering::SeqCst) {
            return Err(BackendError::Stopped);
        }
        self.cpu.run_batch(m, job, b, all_distances)
    }
    fn bytes_per_nonce(&self, p: &Params) -> u64 {
        cpu::bytes_per_nonce(p)
    }
    fn release_working_memory(&self) {
        self.released.fetch_add(1, Ordering::SeqCst);
        self.cpu.release_working_memory();
    }
}

#[test]
fn a_range_batch_given_up_midway_is_computed_again_and_nothing_is_lost() {
    let dev = Arc::new(GivesUpOnce {
        cpu: CpuBackend::new(),
        given_up: AtomicBool::new(false),
        released: std::sync::atomic::AtomicUsize::new(0),
    });
    let e = Engine::new(vec![dev.clone()], EngineOptions::default());
    let mut h = e
        .submit(Job::Range(RangeJob {
            model: ModelSpec {
                block_hash: "bh".into(),
                params: tiny(),
            },
            batch_size: 4,
        }))
        .unwrap();
    h.control.assign(
        Assignment {
            public_key: "k".into(),
            block_height: 1,
            r_target: 10.0,
            range_start: 0,
            range_end: 9,
        },
        true,
    );
    let mut seen = Vec::new();
    while seen.len() < 10 {
        match h.events.blocking_recv().unwrap() {
            JobEvent::Batch(b) => seen.extend(b.nonces),
            JobEvent::Error(e) => panic!("a stopped batch is no failure: {e:?}"),
            JobEvent::Finished(end) => panic!("ended early: {end:?}"),
            JobEvent::ModelReady { .. } => {}
        }
    }
    assert!(dev.given_up.load(Ordering::SeqCst));
    seen.sort_unstable();
    assert_eq!(
        seen,
        (0..=9).collect::<Vec<_>>(),
        "every nonce exactly once"
    );
    assert!(!e.status().device_failed);
    h.control.stop(StopReason::Requested);
    let (_, end, _) = drain(&mut h);
    assert_eq!(end, JobEnd::Stopped(StopReason::Requested));
    assert_eq!(
        dev.released.load(Ordering::SeqCst),
        1,
        "released when the job ended"
    );
}

#[test]
fn cpu_scratch_is_released_when_a_job_ends() {
    let cpu = Arc::new(CpuBackend::new());
    let e = Engine::new(vec![cpu.clone()], EngineOptions::default());
    let (batches, _, _) = drain(&mut e.submit(gen(0.2, 4)).unwrap());
    assert!(!batches.is_empty());
    // What is left to give back is the cached model alone.
    let m = cpu.build_model("other", &tiny(), Dtype::F16).unwrap();
    let model_only = cpu.reclaimable_bytes();
    drop(m);
    assert_eq!(
        cpu.reclaimable_bytes() * 2,
        model_only,
        "one cached model left"
    );
}
