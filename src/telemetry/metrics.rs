//! The Prometheus registry of one server (or one bench run): the engine records jobs,
//! batches and model builds into it, the HTTP layer records /pooled backlogs and orchestrator
//! errors, and GET /metrics renders it as Prometheus text together with the GPU gauges.

use super::gpu::GpuSample;
use prometheus::{
    exponential_buckets, Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter,
    IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};
use serde::Serialize;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The window over which `llama_pow_nonces_per_second` is averaged.
pub const RATE_WINDOW: Duration = Duration::from_secs(10);

/// Every `call` label of `llama_pow_orchestrator_errors_total`: the /pooled session's calls
/// to the orchestrator.
pub const ORCHESTRATOR_CALLS: [&str; 7] = [
    "connect",
    "config",
    "ready",
    "results",
    "results_batch",
    "heartbeat",
    "shutdown",
];

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    /// Waiting for the previous job to let go of the devices.
    Waiting,
    /// Building (or fetching from the cache) the weights.
    Building,
    /// Running batches.
    Computing,
}

impl JobState {
    pub const ALL: [JobState; 3] = [JobState::Waiting, JobState::Building, JobState::Computing];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Waiting => "waiting",
            JobState::Building => "building",
            JobState::Computing => "computing",
        }
    }
}

/// What CUDA graphs did (see `backend::cuda::graphs`): launch sequences captured, graphs
/// replayed, batches run directly because their size's capture failed, and graphs dropped
/// because their scratch buffers were reallocated. Each GPU group keeps its own and adds to
/// the process's ([`cuda_graph_counters`]), which /metrics and the bench report.
#[derive(Debug, Default)]
pub struct GraphCounters {
    captures: AtomicU64,
    replays: AtomicU64,
    fallbacks: AtomicU64,
    dropped: AtomicU64,
}

/// A reading of [`GraphCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct GraphCounts {
    pub captures: u64,
    pub replays: u64,
    pub fallbacks: u64,
    pub dropped: u64,
}

impl GraphCounts {
    /// What happened between `earlier` and this reading.
    pub fn since(self, earlier: GraphCounts) -> GraphCounts {
        GraphCounts {
            captures: self.captures.saturating_sub(earlier.captures),
            replays: self.replays.saturating_sub(earlier.replays),
            fallbacks: self.fallbacks.saturating_sub(earlier.fallbacks),
            dropped: self.dropped.saturating_sub(earlier.dropped),
        }
    }
}

impl GraphCounters {
    pub fn capture(&self) {
        self.captures.fetch_add(1, Ordering::Relaxed);
    }

    pub fn replay(&self) {
        self.replays.fetch_add(1, Ordering::Relaxed);
    }

    pub fn fallback(&self) {
        self.fallbacks.fetch_add(1, Ordering::Relaxed);
    }

    pub fn dropped(&self, graphs: usize) {
        self.dropped.fetch_add(graphs as u64, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> GraphCounts {
        GraphCounts {
            captures: self.captures.load(Ordering::Relaxed),
            replays: self.replays.load(Ordering::Relaxed),
            fallbacks: self.fallbacks.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
        }
    }
}

/// The process's CUDA graph counters.
pub fn cuda_graph_counters() -> &'static GraphCounters {
    static COUNTERS: OnceLock<GraphCounters> = OnceLock::new();
    COUNTERS.get_or_init(GraphCounters::default)
}

/// The start-up self-test as /health and /metrics report it (see `backend::selftest`): every
/// device's result, and whether the server serves (at least one device passed).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SelfTestStatus {
    /// Every device that serves passed (devices that failed were dropped).
    pub passed: bool,
    /// Golden cases computed, over every device.
    pub cases: usize,
    /// The largest |distance - reference distance| over every device and case.
    pub max_abs_diff: f64,
    /// Wall time of the self-test (devices run side by side).
    pub seconds: f64,
    pub devices: Vec<DeviceSelfTest>,
}

/// One device's self-test.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceSelfTest {
    pub device: String,
    pub passed: bool,
    pub cases: usize,
    pub max_abs_diff: f64,
    /// What failed (case, nonce, both distances), when it did.
    pub failure: Option<String>,
}

/// Every metric the server exposes. Cheap to record into from any thread.
pub struct Metrics {
    registry: Registry,
    jobs_started: IntCounterVec,
    jobs_finished: IntCounterVec,
    job_state: IntGaugeVec,
    preemptions: IntCounter,
    nonces_computed: IntCounter,
    nonces_valid: IntCounter,
    batches: IntCounter,
    nonces_per_second: Gauge,
    batch_seconds: Histogram,
    time_to_first_batch: Histogram,
    last_time_to_first_batch: Gauge,
    model_build: Histogram,
    last_model_build: Gauge,
    model_cache_hits: IntCounter,
    device_errors: IntCounterVec,
    pooled_backlog: IntGauge,
    pooled_sessions: IntGauge,
    pooled_results_delivered: IntCounter,
    orchestrator_errors: IntCounterVec,
    validations: IntCounter,
    nonces_validated: IntCounter,
    validation_invalid: IntCounter,
    frauds_detected: IntCounter,
    gpus: IntGauge,
    gpu_memory_used: GaugeVec,
    gpu_memory_total: GaugeVec,
    gpu_utilization: GaugeVec,
    gpu_memory_utilization: GaugeVec,
    gpu_power: GaugeVec,
    gpu_temperature: GaugeVec,
    gpu_sm_clock: GaugeVec,
    gpu_memory_clock: GaugeVec,
    /// The process's [`cuda_graph_counters`], as of the last render.
    cuda_graphs: IntCounterVec,
    selftest_passed: IntGaugeVec,
    selftest_cases: IntGaugeVec,
    selftest_max_abs_diff: GaugeVec,
    selftest: Mutex<Option<SelfTestStatus>>,
    /// (when, nonces) of the batches of the last [`RATE_WINDOW`].
    recent: Mutex<VecDeque<(Instant, u64)>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        // Names, help texts and label sets are constants: registration cannot fail.
        fn reg<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
            r.register(Box::new(c.clone()))
                .expect("metric names are unique and valid");
            c
        }
        fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
            reg(r, IntCounter::new(name, help).expect("valid counter"))
        }
        fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
            reg(
                r,
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter"),
            )
        }
        fn gauge(r: &Registry, name: &str, help: &str) -> Gauge {
            reg(r, Gauge::new(name, help).expect("valid gauge"))
        }
        fn gpu_gauge(r: &Registry, name: &str, help: &str) -> GaugeVec {
            reg(
                r,
                GaugeVec::new(Opts::new(name, help), &["gpu", "name"]).expect("valid gauge"),
            )
        }
        fn histogram(r: &Registry, name: &str, help: &str, start: f64, n: usize) -> Histogram {
            let buckets = exponential_buckets(start, 2.0, n).expect("valid buckets");
            reg(
                r,
                Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
                    .expect("valid histogram"),
            )
        }
        let r = &registry;
        let job_state = reg(
            r,
            IntGaugeVec::new(
                Opts::new(
                    "llama_pow_job_state",
                    "Jobs in each state (idle is 1 when no job exists)",
                ),
                &["state"],
            )
            .expect("valid gauge"),
        );
        for s in ["idle", "waiting", "building", "computing"] {
            job_state.with_label_values(&[s]).set(0);
        }
        job_state.with_label_values(&["idle"]).set(1);
        let metrics = Metrics {
            jobs_started: counter_vec(
                r,
                "llama_pow_jobs_started_total",
                "Jobs submitted to the engine, by kind",
                &["kind"],
            ),
            jobs_finished: counter_vec(
                r,
                "llama_pow_jobs_finished_total",
                "Jobs that ended, by kind and how they ended",
                &["kind", "end"],
            ),
            job_state,
            preemptions: counter(
                r,
                "llama_pow_preemptions_total",
                "Running jobs stopped because a newer request took the devices",
            ),
            nonces_computed: counter(
                r,
                "llama_pow_nonces_computed_total",
                "Nonces whose distance was computed",
            ),
            nonces_valid: counter(
                r,
                "llama_pow_nonces_valid_total",
                "Computed nonces closer than r_target",
            ),
            batches: counter(r, "llama_pow_batches_total", "Batches computed"),
            nonces_per_second: gauge(
                r,
                "llama_pow_nonces_per_second",
                "Nonces computed per second over the last 10 s, at scrape time (a convenience: \
                 rate(llama_pow_nonces_computed_total[...]) is the canonical throughput)",
            ),
            batch_seconds: histogram(
                r,
                "llama_pow_batch_seconds",
                "Time of one batch on one worker: inputs, forward pass, distances",
                0.0005,
                18,
            ),
            time_to_first_batch: histogram(
                r,
                "llama_pow_time_to_first_batch_seconds",
                "From a job's submission to its first computed batch",
                0.001,
                20,
            ),
            last_time_to_first_batch: gauge(
                r,
                "llama_pow_last_time_to_first_batch_seconds",
                "Time to first batch of the latest job that computed one",
            ),
            model_build: histogram(
                r,
                "llama_pow_model_build_seconds",
                "Time to build a model's weights on the devices (cache misses only)",
                0.001,
                20,
            ),
            last_model_build: gauge(
                r,
                "llama_pow_last_model_build_seconds",
                "Weight-build time of the latest model built",
            ),
            model_cache_hits: counter(
                r,
                "llama_pow_model_cache_hits_total",
                "Jobs whose model came from the cache",
            ),
            device_errors: counter_vec(
                r,
                "llama_pow_device_errors_total",
                "Model builds and batches that failed, by error type",
                &["error_type"],
            ),
            pooled_backlog: reg(
                r,
                IntGauge::new(
                    "llama_pow_pooled_backlog",
                    "Results of /pooled sessions not yet delivered to the orchestrator",
                )
                .expect("valid gauge"),
            ),
            pooled_sessions: reg(
                r,
                IntGauge::new("llama_pow_pooled_sessions", "Running /pooled sessions")
                    .expect("valid gauge"),
            ),
            pooled_results_delivered: counter(
                r,
                "llama_pow_pooled_results_delivered_total",
                "/pooled results the orchestrator accepted",
            ),
            orchestrator_errors: counter_vec(
                r,
                "llama_pow_orchestrator_errors_total",
                "Failed calls to the orchestrator, by call",
                &["call"],
            ),
            validations: counter(
                r,
                "llama_pow_validations_total",
                "Proof batches validated to a verdict",
            ),
            nonces_validated: counter(
                r,
                "llama_pow_nonces_validated_total",
                "Nonces recomputed by validations that reached a verdict",
            ),
            validation_invalid: counter(
                r,
                "llama_pow_validation_invalid_total",
                "Validated nonces whose recomputed distance was above r_target",
            ),
            frauds_detected: counter(
                r,
                "llama_pow_frauds_detected_total",
                "Validated batches judged a fraud (probability_honest below the threshold)",
            ),
            gpus: reg(
                r,
                IntGauge::new("llama_pow_gpus", "GPUs NVML reports (0 without NVML)")
                    .expect("valid gauge"),
            ),
            gpu_memory_used: gpu_gauge(r, "llama_pow_gpu_memory_used_bytes", "GPU memory in use"),
            gpu_memory_total: gpu_gauge(
                r,
                "llama_pow_gpu_memory_total_bytes",
                "GPU memory installed",
            ),
            gpu_utilization: gpu_gauge(
                r,
                "llama_pow_gpu_utilization_percent",
                "Share of the last sample period a kernel ran on the GPU",
            ),
            gpu_memory_utilization: gpu_gauge(
                r,
                "llama_pow_gpu_memory_utilization_percent",
                "Share of the last sample period GPU memory was read or written",
            ),
            gpu_power: gpu_gauge(r, "llama_pow_gpu_power_watts", "GPU power draw"),
            gpu_temperature: gpu_gauge(
                r,
                "llama_pow_gpu_temperature_celsius",
                "GPU core temperature",
            ),
            gpu_sm_clock: gpu_gauge(r, "llama_pow_gpu_sm_clock_mhz", "GPU SM clock"),
            gpu_memory_clock: gpu_gauge(r, "llama_pow_gpu_memory_clock_mhz", "GPU memory clock"),
            cuda_graphs: counter_vec(
                r,
                "llama_pow_cuda_graphs_total",
                "CUDA graph events (--cuda-graphs): launch sequences captured, graphs replayed, \
                 batches run directly because their capture failed (fallback), graphs dropped \
                 when their scratch buffers were reallocated",
                &["event"],
            ),
            selftest_passed: reg(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "llama_pow_selftest_passed",
                        "1 when the device's start-up self-test matched the reference, 0 when \
                         it did not (the device is then not used)",
                    ),
                    &["device"],
                )
                .expect("valid gauge"),
            ),
            selftest_cases: reg(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "llama_pow_selftest_cases",
                        "Golden cases the device computed in the start-up self-test",
                    ),
                    &["device"],
                )
                .expect("valid gauge"),
            ),
            selftest_max_abs_diff: reg(
                r,
                GaugeVec::new(
                    Opts::new(
                        "llama_pow_selftest_max_abs_diff",
                        "Largest |distance - reference distance| of the device's start-up \
                         self-test",
                    ),
                    &["device"],
                )
                .expect("valid gauge"),
            ),
            selftest: Mutex::new(None),
            recent: Mutex::new(VecDeque::new()),
            registry,
        };
        metrics.create_known_series();
        metrics
    }

    /// Every labelled counter at 0 for each label value the server can give it, so that a
    /// dashboard or an alert sees every series from the first scrape instead of after its
    /// first event (an absent series and a zero one look different to `rate()` and `absent()`).
    /// The per-GPU gauges are set at every scrape for each GPU NVML reports.
    fn create_known_series(&self) {
        use crate::engine::{Job, JobEnd, JobError};
        for kind in Job::KINDS {
            self.jobs_started.with_label_values(&[kind]);
            for end in JobEnd::labels() {
                self.jobs_finished.with_label_values(&[kind, end]);
            }
        }
        for error_type in JobError::DEVICE_ERROR_TYPES {
            self.device_errors.with_label_values(&[error_type]);
        }
        for call in ORCHESTRATOR_CALLS {
            self.orchestrator_errors.with_label_values(&[call]);
        }
    }

    pub fn job_started(&self, kind: &str) {
        self.jobs_started.with_label_values(&[kind]).inc();
    }

    /// `end`: "completed", "preempted", "client_gone", "shutdown", "requested" or "failed".
    pub fn job_finished(&self, kind: &str, end: &str) {
        self.jobs_finished.with_label_values(&[kind, end]).inc();
    }

    /// A job entered `to` (from `from`, if it was in a state).
    pub fn job_state(&self, from: Option<JobState>, to: Option<JobState>) {
        if let Some(f) = from {
            self.job_state.with_label_values(&[f.as_str()]).dec();
        }
        if let Some(t) = to {
            self.job_state.with_label_values(&[t.as_str()]).inc();
        }
        let busy: i64 = JobState::ALL
            .iter()
            .map(|s| self.job_state.with_label_values(&[s.as_str()]).get())
            .sum();
        self.job_state
            .with_label_values(&["idle"])
            .set(i64::from(busy == 0));
    }

    pub fn preempted(&self) {
        self.preemptions.inc();
    }

    /// One batch of `computed` nonces (`valid` of them proofs) that took `latency`.
    pub fn batch(&self, computed: u64, valid: u64, latency: Duration) {
        self.batches.inc();
        self.nonces_computed.inc_by(computed);
        self.nonces_valid.inc_by(valid);
        self.batch_seconds.observe(latency.as_secs_f64());
        let now = Instant::now();
        let mut r = lock(&self.recent);
        r.push_back((now, computed));
        Self::prune(&mut r, now);
    }

    fn prune(r: &mut VecDeque<(Instant, u64)>, now: Instant) {
        while r
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW)
        {
            r.pop_front();
        }
    }

    /// Nonces per second over the last [`RATE_WINDOW`].
    pub fn nonces_per_second(&self) -> f64 {
        let now = Instant::now();
        let mut r = lock(&self.recent);
        Self::prune(&mut r, now);
        let n: u64 = r.iter().map(|(_, c)| c).sum();
        n as f64 / RATE_WINDOW.as_secs_f64()
    }

    pub fn first_batch(&self, since_submit: Duration) {
        self.time_to_first_batch.observe(since_submit.as_secs_f64());
        self.last_time_to_first_batch
            .set(since_submit.as_secs_f64());
    }

    /// A model was ready after `seconds`, built or from the cache.
    pub fn model_ready(&self, seconds: f64, cached: bool) {
        if cached {
            self.model_cache_hits.inc();
        } else {
            self.model_build.observe(seconds);
            self.last_model_build.set(seconds);
        }
    }

    /// `error_type`: one of [`crate::engine::JobError::DEVICE_ERROR_TYPES`].
    pub fn device_error(&self, error_type: &str) {
        self.device_errors.with_label_values(&[error_type]).inc();
    }

    /// Change the /pooled backlog by `delta` results.
    pub fn pooled_backlog_add(&self, delta: i64) {
        self.pooled_backlog.add(delta);
    }

    pub fn pooled_session(&self, delta: i64) {
        self.pooled_sessions.add(delta);
    }

    pub fn pooled_delivered(&self, n: u64) {
        self.pooled_results_delivered.inc_by(n);
    }

    /// `call`: "connect", "config", "ready", "results", "results_batch", "heartbeat",
    /// "shutdown".
    pub fn orchestrator_error(&self, call: &str) {
        debug_assert!(ORCHESTRATOR_CALLS.contains(&call), "unknown call {call}");
        self.orchestrator_errors.with_label_values(&[call]).inc();
    }

    /// A validation reached its verdict on `nonces` nonces, `invalid` of them invalid.
    pub fn validated(&self, nonces: u64, invalid: u64, fraud: bool) {
        self.validations.inc();
        self.nonces_validated.inc_by(nonces);
        self.validation_invalid.inc_by(invalid);
        if fraud {
            self.frauds_detected.inc();
        }
    }

    pub fn nonces_computed(&self) -> u64 {
        self.nonces_computed.get()
    }

    /// Record the start-up self-test.
    pub fn set_selftest(&self, status: SelfTestStatus) {
        for d in &status.devices {
            let labels = [d.device.as_str()];
            self.selftest_passed
                .with_label_values(&labels)
                .set(i64::from(d.passed));
            self.selftest_cases
                .with_label_values(&labels)
                .set(d.cases as i64);
            self.selftest_max_abs_diff
                .with_label_values(&labels)
                .set(d.max_abs_diff);
        }
        *lock(&self.selftest) = Some(status);
    }

    /// The start-up self-test, when one ran.
    pub fn selftest(&self) -> Option<SelfTestStatus> {
        lock(&self.selftest).clone()
    }

    /// Everything as Prometheus text (format 0.0.4), with these GPU readings.
    pub fn render(&self, gpus: &[GpuSample]) -> String {
        self.nonces_per_second.set(self.nonces_per_second());
        let graphs = cuda_graph_counters().snapshot();
        for (event, now) in [
            ("capture", graphs.captures),
            ("replay", graphs.replays),
            ("fallback", graphs.fallbacks),
            ("dropped", graphs.dropped),
        ] {
            let c = self.cuda_graphs.with_label_values(&[event]);
            // The process's counters only grow: catch up with them.
            c.inc_by(now.saturating_sub(c.get()));
        }
        self.gpus.set(gpus.len() as i64);
        let all = [
            &self.gpu_memory_used,
            &self.gpu_memory_total,
            &self.gpu_utilization,
            &self.gpu_memory_utilization,
            &self.gpu_power,
            &self.gpu_temperature,
            &self.gpu_sm_clock,
            &self.gpu_memory_clock,
        ];
        for g in all {
            g.reset();
        }
        for s in gpus {
            let index = s.index.to_string();
            let labels = [index.as_str(), s.name.as_str()];
            let set = |g: &GaugeVec, v: Option<f64>| {
                if let Some(v) = v {
                    g.with_label_values(&labels).set(v);
                }
            };
            set(&self.gpu_memory_used, s.memory_used_bytes.map(|x| x as f64));
            set(
                &self.gpu_memory_total,
                s.memory_total_bytes.map(|x| x as f64),
            );
            set(
                &self.gpu_utilization,
                s.utilization_gpu_percent.map(f64::from),
            );
            set(
                &self.gpu_memory_utilization,
                s.utilization_memory_percent.map(f64::from),
            );
            set(&self.gpu_power, s.power_watts);
            set(&self.gpu_temperature, s.temperature_celsius.map(f64::from));
            set(&self.gpu_sm_clock, s.sm_clock_mhz.map(f64::from));
            set(&self.gpu_memory_clock, s.memory_clock_mhz.map(f64::from));
        }
        let mut buf = Vec::with_capacity(8192);
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }
}

/// The content type of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_labelled_counter_is_at_zero_from_the_start() {
        let text = Metrics::new().render(&[]);
        for kind in ["generate", "range"] {
            assert!(
                text.contains(&format!(
                    "llama_pow_jobs_started_total{{kind=\"{kind}\"}} 0"
                )),
                "{text}"
            );
            for end in [
                "completed",
                "preempted",
                "client_gone",
                "shutdown",
                "requested",
                "failed",
            ] {
                assert!(
                    text.contains(&format!(
                        "llama_pow_jobs_finished_total{{end=\"{end}\",kind=\"{kind}\"}} 0"
                    )),
                    "{kind} {end}: {text}"
                );
            }
        }
        for t in ["Unsupported", "OutOfMemory", "DeviceFailure"] {
            assert!(text.contains(&format!(
                "llama_pow_device_errors_total{{error_type=\"{t}\"}} 0"
            )));
        }
        for call in ORCHESTRATOR_CALLS {
            assert!(text.contains(&format!(
                "llama_pow_orchestrator_errors_total{{call=\"{call}\"}} 0"
            )));
        }
        for plain in [
            "llama_pow_preemptions_total 0",
            "llama_pow_nonces_computed_total 0",
            "llama_pow_batches_total 0",
            "llama_pow_batch_seconds_count 0",
            "llama_pow_last_model_build_seconds 0",
            "llama_pow_last_time_to_first_batch_seconds 0",
            "llama_pow_pooled_backlog 0",
        ] {
            assert!(text.contains(plain), "{plain}: {text}");
        }
    }

    #[test]
    fn renders_counters_states_and_gpu_gauges() {
        let m = Metrics::new();
        m.job_started("generate");
        m.job_state(None, Some(JobState::Waiting));
        m.job_state(Some(JobState::Waiting), Some(JobState::Computing));
        m.batch(8, 2, Duration::from_millis(3));
        m.model_ready(0.5, false);
        m.model_ready(0.0, true);
        m.orchestrator_error("heartbeat");
        let gpu = GpuSample {
            index: 0,
            name: "Test GPU".into(),
            memory_used_bytes: Some(1 << 30),
            power_watts: Some(300.5),
            ..GpuSample::default()
        };
        let text = m.render(&[gpu]);
        assert!(text.contains("llama_pow_nonces_computed_total 8"), "{text}");
        assert!(text.contains("llama_pow_nonces_valid_total 2"));
        assert!(text.contains("llama_pow_job_state{state=\"computing\"} 1"));
        assert!(text.contains("llama_pow_job_state{state=\"idle\"} 0"));
        assert!(text.contains("llama_pow_gpu_power_watts{gpu=\"0\",name=\"Test GPU\"} 300.5"));
        assert!(text.contains("llama_pow_orchestrator_errors_total{call=\"heartbeat\"} 1"));
        assert!(text.contains("llama_pow_gpus 1"));
        for event in ["capture", "replay", "fallback", "dropped"] {
            let line = format!("llama_pow_cuda_graphs_total{{event=\"{event}\"}} ");
            assert!(text.contains(&line), "{line} in {text}");
        }
        assert!(m.nonces_per_second() > 0.0);
        m.job_state(Some(JobState::Computing), None);
        let text = m.render(&[]);
        assert!(text.contains("llama_pow_job_state{state=\"idle\"} 1"));
        assert!(!text.contains("llama_pow_gpu_power_watts{"));
        assert!(text.contains("llama_pow_gpus 0"));
    }
}

#[cfg(test)]
mod graph_tests {
    use super::*;

    #[test]
    fn graph_counters_count_and_subtract() {
        let c = GraphCounters::default();
        let before = c.snapshot();
        c.capture();
        c.replay();
        c.replay();
        c.fallback();
        c.dropped(3);
        let d = c.snapshot().since(before);
        assert_eq!(
            d,
            GraphCounts {
                captures: 1,
                replays: 2,
                fallbacks: 1,
                dropped: 3
            }
        );
        assert_eq!(before.since(c.snapshot()), GraphCounts::default());
    }
}

#[cfg(test)]
mod selftest_tests {
    use super::*;

    #[test]
    fn the_selftest_is_kept_and_rendered_per_device() {
        let m = Metrics::new();
        assert_eq!(m.selftest(), None);
        let device = |name: &str, passed, diff| DeviceSelfTest {
            device: name.into(),
            passed,
            cases: 2,
            max_abs_diff: diff,
            failure: (!passed).then(|| "v2_shaped_f16: nonce 2: ...".to_string()),
        };
        let status = SelfTestStatus {
            passed: true,
            cases: 4,
            max_abs_diff: 3e-7,
            seconds: 0.5,
            devices: vec![device("cuda:0", true, 3e-7), device("cuda:1", false, 0.25)],
        };
        m.set_selftest(status.clone());
        assert_eq!(m.selftest(), Some(status));
        let text = m.render(&[]);
        assert!(
            text.contains("llama_pow_selftest_passed{device=\"cuda:0\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("llama_pow_selftest_passed{device=\"cuda:1\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("llama_pow_selftest_cases{device=\"cuda:0\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("llama_pow_selftest_max_abs_diff{device=\"cuda:1\"} 0.25"),
            "{text}"
        );
    }
}
