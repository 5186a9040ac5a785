//! POST /pooled {orchestrator_url}: this server as one worker of an orchestrator.
//!
//! The session registers (retried after 1, 2, 4 and 8 s), waits for a block hash, builds the
//! model, says it is ready and computes the nonce range it is given, streaming every status
//! and result line as it happens. Each result is posted to the orchestrator as it is made; a
//! post that fails is kept and re-sent later through /results/batch, and while more than
//! `pooled_max_backlog` results wait the computation pauses: no result is ever discarded. The
//! orchestrator's config is polled every `pooled_poll` for `compute`, `switch_job` and
//! `shutdown` commands, and a heartbeat goes out every `pooled_heartbeat`. However the session
//! ends (command, time limit, preemption, client gone, SIGTERM) it stops computing, delivers
//! what is pending and posts its shutdown notice.

use super::client::{self, CallError};
use super::envelope::{bad_request, read_json, unwrap_envelope};
use super::generate::{prefix16, BatchFields, ErrorLine, PREEMPTED};
use super::ndjson::{self, LineSink};
use super::{logsafe::scrub, AppState};
use crate::engine::{
    Assignment, BatchReport, Job, JobEnd, JobEvent, JobHandle, ModelSpec, RangeJob, StopReason,
};
use crate::pow::params::Params;
use crate::pow::request::{parse_params, Fields};
use crate::telemetry::Metrics;
use actix_web::{web, HttpResponse};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Delays between registration (and ready) attempts.
const RETRY_DELAYS: [u64; 4] = [1, 2, 4, 8];
/// Results per /results/batch post.
const FLUSH_CHUNK: usize = 500;
/// Longest wait between two re-sends of the backlog.
const MAX_FLUSH_BACKOFF: Duration = Duration::from_secs(4);
/// How long the end of a session may spend delivering results and saying goodbye.
const FINAL_FLUSH: Duration = Duration::from_secs(30);

pub fn parse_pooled(v: &Value) -> Result<String, String> {
    let f = Fields::new(v, "request", "").map_err(|e| e.to_string())?;
    let url = f.string("orchestrator_url").map_err(|e| e.to_string())?;
    client::parse_url("orchestrator_url", &url)
}

pub async fn pooled(state: web::Data<AppState>, payload: web::Payload) -> HttpResponse {
    let url = match read_json(payload, state.cfg.max_body_bytes)
        .await
        .and_then(unwrap_envelope)
        .and_then(|v| parse_pooled(&v))
    {
        Ok(u) => u,
        Err(e) => return bad_request(&e),
    };
    if state.shutting_down() {
        return super::envelope::error_response(
            actix_web::http::StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down",
        );
    }
    let orch = match Orchestrator::new(&url, state.cfg.client_timeout) {
        Ok(o) => o.with_metrics(state.engine.metrics().clone()),
        Err(e) => {
            return super::envelope::error_response(
                actix_web::http::StatusCode::INTERNAL_SERVER_ERROR,
                &e,
            )
        }
    };
    tracing::info!("pooled: worker {} for orchestrator {}", orch.worker_id, url);
    ndjson::response(move |sink| async move {
        let guard = state.sessions.enter();
        let metrics = state.engine.metrics().clone();
        metrics.pooled_session(1);
        let mut s = Session::new(state.clone(), orch, sink);
        let outcome = s.run().await;
        s.finish(outcome).await;
        drop(s);
        metrics.pooled_session(-1);
        drop(guard);
    })
}

/// The orchestrator's API for one worker.
#[derive(Clone)]
pub struct Orchestrator {
    http: reqwest::Client,
    base: String,
    pub worker_id: String,
    metrics: Option<Arc<Metrics>>,
}

impl Orchestrator {
    pub fn new(base: &str, timeout: Duration) -> Result<Self, String> {
        Ok(Orchestrator {
            http: client::client(timeout)?,
            base: base.to_owned(),
            worker_id: uuid::Uuid::new_v4().to_string(),
            metrics: None,
        })
    }

    /// Count failed calls and delivered results in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Count a failed call; `delivered` results when it succeeded.
    fn record(
        &self,
        call: &str,
        r: Result<Value, CallError>,
        delivered: u64,
    ) -> Result<Value, CallError> {
        if let Some(m) = &self.metrics {
            match &r {
                Ok(_) if delivered > 0 => m.pooled_delivered(delivered),
                Ok(_) => {}
                Err(_) => m.orchestrator_error(call),
            }
        }
        r
    }

    fn url(&self, path: &str) -> String {
        client::join(&self.base, path)
    }

    fn worker_url(&self, path: &str) -> String {
        self.url(&format!("/api/workers/{}{path}", self.worker_id))
    }

    pub async fn connect(&self, gpu_count: usize, gpu_info: &Value) -> Result<Value, CallError> {
        let body =
            json!({"worker_id": self.worker_id, "gpu_count": gpu_count, "gpu_info": gpu_info});
        let r = client::post_json(&self.http, &self.url("/api/workers/connect"), &body).await;
        self.record("connect", r, 0)
    }

    pub async fn config(&self) -> Result<Value, CallError> {
        let r = client::get_json(&self.http, &self.worker_url("/config"), &[]).await;
        self.record("config", r, 0)
    }

    pub async fn ready(&self, gpu_count: usize) -> Result<Value, CallError> {
        let r = client::post_json(
            &self.http,
            &self.worker_url("/ready"),
            &json!({"gpu_count": gpu_count}),
        )
        .await;
        self.record("ready", r, 0)
    }

    pub async fn result(&self, r: &Value) -> Result<Value, CallError> {
        let res = client::post_json(&self.http, &self.worker_url("/results"), r).await;
        self.record("results", res, 1)
    }

    pub async fn results_batch(&self, rs: &[Value]) -> Result<Value, CallError> {
        let r = client::post_json(
            &self.http,
            &self.worker_url("/results/batch"),
            &json!({"results": rs}),
        )
        .await;
        self.record("results_batch", r, rs.len() as u64)
    }

    pub async fn heartbeat(&self, pending: usize) -> Result<Value, CallError> {
        let r = client::post_json(
            &self.http,
            &self.worker_url("/heartbeat"),
            &json!({"pending_results": pending}),
        )
        .await;
        self.record("heartbeat", r, 0)
    }

    pub async fn shutdown(&self, stats: &Value) -> Result<Value, CallError> {
        let r = client::post_json(
            &self.http,
            &self.worker_url("/shutdown"),
            &json!({"stats": stats}),
        )
        .await;
        self.record("shutdown", r, 0)
    }
}

/// What the orchestrator has told this worker so far (later answers override fields).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WorkerConfig {
    pub block_hash: Option<String>,
    pub block_height: u64,
    pub r_target: Option<f64>,
    pub params: Option<Value>,
    pub public_key: Option<String>,
    pub range_start: Option<u64>,
    pub range_end: Option<u64>,
    pub batch_size: Option<u64>,
}

impl WorkerConfig {
    /// Take the fields an answer carries.
    pub fn update(&mut self, v: &Value) {
        let get = |k: &str| v.get(k).filter(|x| !x.is_null());
        if let Some(s) = get("block_hash")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
        {
            self.block_hash = Some(s.to_owned());
        }
        if let Some(h) = get("block_height").and_then(Value::as_u64) {
            self.block_height = h;
        }
        if let Some(r) = get("r_target").and_then(Value::as_f64) {
            self.r_target = Some(r);
        }
        if let Some(p) = get("params").filter(|p| p.is_object()) {
            self.params = Some(p.clone());
        }
        if let Some(k) = get("public_key")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
        {
            self.public_key = Some(k.to_owned());
        }
        if let Some(n) = get("nonce_range_start").and_then(Value::as_u64) {
            self.range_start = Some(n);
        }
        if let Some(n) = get("nonce_range_end").and_then(Value::as_u64) {
            self.range_end = Some(n);
        }
        if let Some(n) = get("batch_size").and_then(Value::as_u64).filter(|&n| n > 0) {
            self.batch_size = Some(n);
        }
    }

    /// What to compute, once the key, range and r_target are known and sound.
    pub fn assignment(&self) -> Option<Assignment> {
        let (Some(key), Some(start), Some(end), Some(r)) = (
            &self.public_key,
            self.range_start,
            self.range_end,
            self.r_target,
        ) else {
            return None;
        };
        if end < start || !r.is_finite() || r <= 0.0 {
            return None;
        }
        Some(Assignment {
            public_key: key.clone(),
            block_height: self.block_height,
            r_target: r,
            range_start: start,
            range_end: end,
        })
    }
}

/// One result as posted to the orchestrator and streamed to the client.
pub fn result_value(b: &BatchReport) -> Value {
    serde_json::to_value(BatchFields::of(b, b.batch_number)).unwrap_or(Value::Null)
}

/// How a session ended.
#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    /// Never registered: nothing to tell the orchestrator.
    NotRegistered,
    /// The orchestrator said shutdown.
    Commanded,
    /// pooled_max passed (waiting for a block hash, or computing).
    TimedOut(&'static str),
    Preempted,
    ClientGone,
    ServerShutdown,
    /// Something failed; an error line went out.
    Failed(String),
}

impl Outcome {
    fn reason(&self) -> String {
        match self {
            Outcome::NotRegistered => "not registered".into(),
            Outcome::Commanded => "shutdown command".into(),
            Outcome::TimedOut(what) => (*what).into(),
            Outcome::Preempted => "preempted by a newer request".into(),
            Outcome::ClientGone => "client disconnected".into(),
            Outcome::ServerShutdown => "server shutting down".into(),
            Outcome::Failed(e) => e.clone(),
        }
    }
}

struct Session {
    state: web::Data<AppState>,
    orch: Orchestrator,
    sink: LineSink,
    cfg: WorkerConfig,
    job: Option<JobHandle>,
    /// Results not yet accepted by the orchestrator, oldest first.
    backlog: VecDeque<Value>,
    pending: Arc<AtomicUsize>,
    /// The backlog size last added to the metrics' gauge.
    backlog_reported: i64,
    /// No post before this instant (backing off after a failure).
    next_flush: Instant,
    flush_failures: u32,
    /// Job events read ahead of their turn.
    deferred: VecDeque<JobEvent>,
    sent: u64,
    computed: u64,
    valid: u64,
    session_start: Instant,
    compute_start: Option<Instant>,
    heartbeat: Option<tokio::task::JoinHandle<()>>,
    paused: bool,
}

impl Drop for Session {
    fn drop(&mut self) {
        // Whatever is left is no longer this server's backlog.
        self.state
            .engine
            .metrics()
            .pooled_backlog_add(-self.backlog_reported);
    }
}

enum Step {
    Continue,
    End(Outcome),
}

/// What woke the computing loop.
enum Wake {
    Event(Option<JobEvent>),
    Poll,
    Flush,
    Tick,
    End(Outcome),
}

impl Session {
    fn new(state: web::Data<AppState>, orch: Orchestrator, sink: LineSink) -> Self {
        Session {
            state,
            orch,
            sink,
            cfg: WorkerConfig::default(),
            job: None,
            backlog: VecDeque::new(),
            backlog_reported: 0,
            pending: Arc::new(AtomicUsize::new(0)),
            next_flush: Instant::now(),
            flush_failures: 0,
            deferred: VecDeque::new(),
            sent: 0,
            computed: 0,
            valid: 0,
            session_start: Instant::now(),
            compute_start: None,
            heartbeat: None,
            paused: false,
        }
    }

    fn line(&self, v: &Value) {
        // Status lines never hold the session up: the orchestrator is the record.
        self.sink.send_now(v);
    }

    fn error_line(&self, message: &str, error_type: &str) {
        self.sink.send_now(&ErrorLine {
            error: message,
            error_type,
            fatal: false,
        });
    }

    /// Wait `d`, or less if the client leaves or the server shuts down.
    async fn pause_for(&self, d: Duration) -> Option<Outcome> {
        tokio::select! {
            _ = tokio::time::sleep(d) => None,
            _ = self.sink.closed() => Some(Outcome::ClientGone),
            _ = self.state.shutdown_signal() => Some(Outcome::ServerShutdown),
        }
    }

    fn n_workers(&self) -> usize {
        self.state.engine.n_workers()
    }

    async fn register(&mut self) -> Result<(), Outcome> {
        let gpu_info: Value = self
            .state
            .engine
            .device_names()
            .iter()
            .enumerate()
            .map(|(i, n)| json!({"index": i, "name": n}))
            .collect();
        for attempt in 0..=RETRY_DELAYS.len() {
            match self.orch.connect(self.n_workers(), &gpu_info).await {
                Ok(v) => {
                    self.cfg.update(&v);
                    return Ok(());
                }
                Err(e) => {
                    tracing::warn!(
                        "pooled {}: registration attempt {} failed: {e}",
                        self.orch.worker_id,
                        attempt + 1
                    );
                    if let Some(&d) = RETRY_DELAYS.get(attempt) {
                        if let Some(o) = self.pause_for(Duration::from_secs(d)).await {
                            return Err(o);
                        }
                    }
                }
            }
        }
        self.error_line("Failed to register with orchestrator", "ConnectionError");
        Err(Outcome::NotRegistered)
    }

    fn start_heartbeat(&mut self) {
        let orch = self.orch.clone();
        let pending = self.pending.clone();
        let every = self.state.cfg.pooled_heartbeat;
        self.heartbeat = Some(actix_web::rt::spawn(async move {
            let mut failures = 0u64;
            loop {
                tokio::time::sleep(every).await;
                match orch.heartbeat(pending.load(Ordering::SeqCst)).await {
                    Ok(_) => failures = 0,
                    Err(e) => {
                        failures += 1;
                        if failures.is_power_of_two() {
                            tracing::warn!(
                                "pooled {}: heartbeat failed ({failures} in a row): {e}",
                                orch.worker_id
                            );
                        }
                    }
                }
            }
        }));
    }

    async fn poll_once(&mut self) -> Option<Value> {
        match self.orch.config().await {
            Ok(v) => {
                self.cfg.update(&v);
                Some(v)
            }
            Err(e) => {
                tracing::debug!("pooled {}: config poll failed: {e}", self.orch.worker_id);
                None
            }
        }
    }

    async fn wait_block_hash(&mut self) -> Result<(), Outcome> {
        let start = Instant::now();
        while self.cfg.block_hash.is_none() {
            if start.elapsed() > self.state.cfg.pooled_max {
                tracing::warn!(
                    "pooled {}: no block hash after {:.0} s",
                    self.orch.worker_id,
                    start.elapsed().as_secs_f64()
                );
                self.line(&json!({"status": "timeout", "message": "No block_hash received"}));
                return Err(Outcome::TimedOut("timeout_waiting_block_hash"));
            }
            let polled = tokio::select! {
                v = self.orch.config() => v.ok(),
                _ = self.sink.closed() => return Err(Outcome::ClientGone),
                _ = self.state.shutdown_signal() => return Err(Outcome::ServerShutdown),
            };
            if let Some(v) = &polled {
                self.cfg.update(v);
            }
            if command(&polled) == Some("shutdown") {
                return Err(Outcome::Commanded);
            }
            if self.cfg.block_hash.is_some() {
                break;
            }
            if let Some(o) = self.pause_for(self.state.cfg.pooled_poll).await {
                return Err(o);
            }
        }
        Ok(())
    }

    fn model_params(&self) -> Result<Params, String> {
        let v = self.cfg.params.clone().unwrap_or_else(|| json!({}));
        let p = parse_params(&v).map_err(|e| e.to_string())?;
        self.state.engine.check(&p).map_err(|e| e.to_string())?;
        Ok(p)
    }

    /// Read job events until the model is ready.
    async fn load_model(&mut self) -> Result<f64, Outcome> {
        loop {
            let ev = {
                let Some(job) = self.job.as_mut() else {
                    return Err(Outcome::Failed("no job".into()));
                };
                tokio::select! {
                    ev = job.events.recv() => ev,
                    _ = self.sink.closed() => return Err(Outcome::ClientGone),
                    _ = self.state.shutdown_signal() => return Err(Outcome::ServerShutdown),
                }
            };
            match ev {
                Some(JobEvent::ModelReady { seconds, .. }) => return Ok(seconds),
                Some(JobEvent::Error(e)) => {
                    self.sink.send_now(&ErrorLine::of(&e));
                    return Err(Outcome::Failed(e.message));
                }
                Some(JobEvent::Finished(end)) => return Err(self.job_ended(end)),
                Some(JobEvent::Batch(b)) => self.deferred.push_back(JobEvent::Batch(b)),
                None => return Err(Outcome::Failed("the job ended".into())),
            }
        }
    }

    fn job_ended(&mut self, end: JobEnd) -> Outcome {
        self.job = None;
        match end {
            JobEnd::Stopped(StopReason::Preempted) => {
                self.sink.send_now(&PREEMPTED);
                Outcome::Preempted
            }
            JobEnd::Stopped(StopReason::Shutdown) => Outcome::ServerShutdown,
            JobEnd::Stopped(StopReason::ClientGone) => Outcome::ClientGone,
            JobEnd::Stopped(StopReason::Failed) => Outcome::Failed("device failure".into()),
            JobEnd::Stopped(StopReason::Requested) | JobEnd::Completed => Outcome::Commanded,
        }
    }

    async fn notify_ready(&mut self) -> Result<(), Outcome> {
        for attempt in 0..=RETRY_DELAYS.len() {
            match self.orch.ready(self.n_workers()).await {
                Ok(v) => {
                    self.cfg.update(&v);
                    return Ok(());
                }
                Err(e) => {
                    tracing::warn!(
                        "pooled {}: ready notice {} failed: {e}",
                        self.orch.worker_id,
                        attempt + 1
                    );
                    if let Some(&d) = RETRY_DELAYS.get(attempt) {
                        if let Some(o) = self.pause_for(Duration::from_secs(d)).await {
                            return Err(o);
                        }
                    }
                }
            }
        }
        self.error_line("Failed to notify ready", "ConnectionError");
        Err(Outcome::Failed("cannot notify ready".into()))
    }

    /// Apply the current config to the job; `switch` restarts the range.
    fn apply_assignment(&mut self, switch: bool) -> bool {
        let Some(job) = &self.job else { return false };
        let Some(a) = self.cfg.assignment() else {
            return false;
        };
        let current = job.control.assignment();
        let changed = current.as_deref() != Some(&a);
        if !changed && !switch {
            return false;
        }
        let restart = match &current {
            None => true,
            Some(c) => {
                (c.range_start, c.range_end) != (a.range_start, a.range_end)
                    || (switch && c.public_key != a.public_key)
            }
        };
        if switch && !restart {
            // The same key and range again: nothing to switch.
            return false;
        }
        tracing::info!(
            "pooled {}: computing {}..={} for {}...{}",
            self.orch.worker_id,
            a.range_start,
            a.range_end,
            prefix16(&a.public_key),
            if restart { " (range restarted)" } else { "" }
        );
        job.control.assign(a, restart);
        true
    }

    async fn run(&mut self) -> Outcome {
        self.line(&json!({"status": "registering", "worker_id": self.orch.worker_id, "gpu_count": self.n_workers()}));
        if let Err(o) = self.register().await {
            return o;
        }
        tracing::info!("pooled {}: registered", self.orch.worker_id);
        self.line(&json!({"status": "registered", "worker_id": self.orch.worker_id}));
        self.start_heartbeat();

        self.line(&json!({"status": "waiting_block_hash"}));
        if let Err(o) = self.wait_block_hash().await {
            return o;
        }
        let block_hash = self.cfg.block_hash.clone().unwrap_or_default();
        self.line(&json!({"status": "received_block_hash", "block_hash": prefix16(&block_hash)}));
        let params = match self.model_params() {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(
                    "pooled {}: unusable params: {}",
                    self.orch.worker_id,
                    scrub(&e)
                );
                self.error_line(
                    &format!("invalid params from the orchestrator: {e}"),
                    "ValidationError",
                );
                return Outcome::Failed(e);
            }
        };
        self.line(&json!({"status": "loading_model"}));
        let batch_size = self
            .cfg
            .batch_size
            .unwrap_or(self.state.cfg.pooled_batch_size)
            .min(crate::pow::request::MAX_BATCH_SIZE);
        let job = Job::Range(RangeJob {
            model: ModelSpec { block_hash, params },
            batch_size,
        });
        match self.state.engine.submit(job) {
            Ok(h) => self.job = Some(h),
            Err(e) => {
                self.error_line(&e.to_string(), "Shutdown");
                return Outcome::ServerShutdown;
            }
        }
        let load = match self.load_model().await {
            Ok(s) => s,
            Err(o) => return o,
        };
        self.line(&json!({"status": "model_loaded", "load_time": load.round() as u64}));
        if let Err(o) = self.notify_ready().await {
            return o;
        }
        self.apply_assignment(false);
        self.line(
            &json!({"status": "ready", "public_key": self.cfg.public_key.as_deref().map(prefix16)}),
        );
        self.line(&json!({"status": "computing"}));
        self.compute_start = Some(Instant::now());
        self.compute().await
    }

    async fn compute(&mut self) -> Outcome {
        let start = Instant::now();
        let max = self.state.cfg.pooled_max;
        let mut poll = tokio::time::interval(self.state.cfg.pooled_poll);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if start.elapsed() > max {
                tracing::info!("pooled {}: session time limit reached", self.orch.worker_id);
                return Outcome::TimedOut("session time limit");
            }
            if let Some(ev) = self.deferred.pop_front() {
                if let Step::End(o) = self.on_event(Some(ev)).await {
                    return o;
                }
                continue;
            }
            let flush_due = !self.backlog.is_empty();
            let next_flush = tokio::time::Instant::from_std(self.next_flush);
            let step = {
                let Some(job) = self.job.as_mut() else {
                    return Outcome::Failed("no job".into());
                };
                tokio::select! {
                    biased;
                    _ = self.state.shutdown_signal() => Wake::End(Outcome::ServerShutdown),
                    _ = self.sink.closed() => Wake::End(Outcome::ClientGone),
                    ev = job.events.recv() => Wake::Event(ev),
                    _ = poll.tick() => Wake::Poll,
                    _ = tokio::time::sleep_until(next_flush), if flush_due => Wake::Flush,
                    _ = tokio::time::sleep(max.saturating_sub(start.elapsed())) => Wake::Tick,
                }
            };
            let step = match step {
                Wake::Event(ev) => self.on_event(ev).await,
                Wake::Poll => self.on_poll().await,
                Wake::Flush => {
                    self.flush().await;
                    Step::Continue
                }
                Wake::Tick => Step::Continue,
                Wake::End(o) => Step::End(o),
            };
            if let Step::End(o) = step {
                return o;
            }
        }
    }

    async fn on_event(&mut self, ev: Option<JobEvent>) -> Step {
        match ev {
            None => Step::End(Outcome::Failed("the job ended".into())),
            Some(JobEvent::ModelReady { .. }) => Step::Continue,
            Some(JobEvent::Error(e)) => {
                self.sink.send_now(&ErrorLine::of(&e));
                Step::Continue
            }
            Some(JobEvent::Finished(end)) => Step::End(self.job_ended(end)),
            Some(JobEvent::Batch(b)) => {
                // Take every batch already waiting, to post them together when behind.
                let mut fresh = vec![self.take(&b)];
                if let Some(job) = self.job.as_mut() {
                    while fresh.len() < FLUSH_CHUNK {
                        match job.events.try_recv() {
                            Ok(JobEvent::Batch(b)) => fresh.push(result_value(&b)),
                            Ok(other) => {
                                self.deferred.push_back(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                }
                for v in &fresh[1..] {
                    self.count(v);
                    self.line(v);
                }
                self.deliver(fresh).await;
                Step::Continue
            }
        }
    }

    fn count(&mut self, v: &Value) {
        self.computed += v["batch_computed"].as_u64().unwrap_or(0);
        self.valid += v["batch_valid"].as_u64().unwrap_or(0);
    }

    fn take(&mut self, b: &BatchReport) -> Value {
        let v = result_value(b);
        self.count(&v);
        self.line(&v);
        v
    }

    /// Post fresh results now if nothing older waits, else queue them behind the backlog.
    async fn deliver(&mut self, fresh: Vec<Value>) {
        if self.backlog.is_empty() && Instant::now() >= self.next_flush {
            let r = if fresh.len() == 1 {
                self.orch.result(&fresh[0]).await
            } else {
                self.orch.results_batch(&fresh).await
            };
            match r {
                Ok(_) => {
                    self.sent += fresh.len() as u64;
                    self.flush_failures = 0;
                }
                Err(e) => {
                    self.backlog.extend(fresh);
                    self.failed_post(&e);
                }
            }
        } else {
            self.backlog.extend(fresh);
        }
        self.backlog_changed();
    }

    fn failed_post(&mut self, e: &CallError) {
        self.flush_failures += 1;
        let backoff = Duration::from_millis(500)
            .saturating_mul(1 << self.flush_failures.saturating_sub(1).min(4))
            .min(MAX_FLUSH_BACKOFF);
        self.next_flush = Instant::now() + backoff;
        if self.flush_failures.is_power_of_two() {
            tracing::warn!(
                "pooled {}: result post failed ({} in a row, {} results kept for re-sending): {e}",
                self.orch.worker_id,
                self.flush_failures,
                self.backlog.len()
            );
        }
    }

    /// Re-send the backlog, oldest first, until it is empty or a post fails.
    async fn flush(&mut self) -> bool {
        while !self.backlog.is_empty() {
            let n = self.backlog.len().min(FLUSH_CHUNK);
            let chunk: Vec<Value> = self.backlog.iter().take(n).cloned().collect();
            match self.orch.results_batch(&chunk).await {
                Ok(_) => {
                    self.backlog.drain(..n);
                    self.sent += n as u64;
                    if self.flush_failures > 0 {
                        tracing::info!(
                            "pooled {}: orchestrator reachable again, {n} kept results delivered",
                            self.orch.worker_id
                        );
                    }
                    self.flush_failures = 0;
                    self.next_flush = Instant::now();
                }
                Err(e) => {
                    self.failed_post(&e);
                    self.backlog_changed();
                    return false;
                }
            }
        }
        self.backlog_changed();
        true
    }

    fn backlog_changed(&mut self) {
        let n = self.backlog.len();
        self.pending.store(n, Ordering::SeqCst);
        let m = self.state.engine.metrics();
        m.pooled_backlog_add(n as i64 - self.backlog_reported);
        self.backlog_reported = n as i64;
        let limit = self.state.cfg.pooled_max_backlog.max(1);
        let Some(job) = &self.job else { return };
        if !self.paused && n >= limit {
            self.paused = true;
            job.control.set_paused(true);
            tracing::warn!(
                "pooled {}: {n} results wait for the orchestrator: computing paused until they are delivered",
                self.orch.worker_id
            );
        } else if self.paused && n <= limit / 2 {
            self.paused = false;
            job.control.set_paused(false);
            tracing::info!(
                "pooled {}: backlog down to {n}: computing again",
                self.orch.worker_id
            );
        }
    }

    async fn on_poll(&mut self) -> Step {
        let Some(v) = self.poll_once().await else {
            return Step::Continue;
        };
        match command(&Some(v.clone())) {
            Some("shutdown") => {
                tracing::info!("pooled {}: shutdown command", self.orch.worker_id);
                return Step::End(Outcome::Commanded);
            }
            Some("switch_job") => {
                if self.apply_assignment(true) {
                    let key = self.cfg.public_key.clone().unwrap_or_default();
                    self.line(
                        &json!({"status": "switched_public_key", "public_key": prefix16(&key)}),
                    );
                }
            }
            _ => {
                self.apply_assignment(false);
            }
        }
        Step::Continue
    }

    /// Stop computing, deliver everything, tell the orchestrator, end the stream.
    async fn finish(&mut self, outcome: Outcome) {
        let registered = outcome != Outcome::NotRegistered;
        let reason = match &outcome {
            Outcome::ClientGone => StopReason::ClientGone,
            Outcome::ServerShutdown => StopReason::Shutdown,
            _ => StopReason::Requested,
        };
        let deadline = Instant::now()
            + if outcome == Outcome::ServerShutdown {
                self.state
                    .cfg
                    .shutdown_grace
                    .saturating_sub(Duration::from_secs(3))
                    .max(Duration::from_secs(1))
            } else {
                FINAL_FLUSH
            };
        // Take in every batch the workers still finish.
        if let Some(mut job) = self.job.take() {
            job.control.set_paused(false);
            job.control.stop(reason);
            let left = deadline.saturating_duration_since(Instant::now());
            let _ = tokio::time::timeout(left, async {
                while let Some(ev) = job.events.recv().await {
                    match ev {
                        JobEvent::Batch(b) => {
                            let v = self.take(&b);
                            self.backlog.push_back(v);
                        }
                        JobEvent::Finished(_) => break,
                        _ => {}
                    }
                }
            })
            .await;
        }
        for ev in std::mem::take(&mut self.deferred) {
            if let JobEvent::Batch(b) = ev {
                let v = self.take(&b);
                self.backlog.push_back(v);
            }
        }
        if registered {
            self.next_flush = Instant::now();
            while !self.backlog.is_empty() && Instant::now() < deadline {
                if self.flush().await {
                    break;
                }
                let wait = self
                    .next_flush
                    .min(deadline)
                    .saturating_duration_since(Instant::now());
                tokio::time::sleep(wait).await;
            }
            if !self.backlog.is_empty() {
                tracing::warn!(
                    "pooled {}: {} results could not be delivered before the session ended",
                    self.orch.worker_id,
                    self.backlog.len()
                );
            }
            let stats = json!({
                "reason": outcome.reason(),
                "total_batches_sent": self.sent,
                "total_computed": self.computed,
                "total_valid": self.valid,
                "pending_results": self.backlog.len(),
                "session_duration": self.session_start.elapsed().as_secs(),
            });
            let mut notified = false;
            for d in [0u64, 1, 2, 4] {
                if d > 0 {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_secs(d).min(left)).await;
                }
                match self.orch.shutdown(&stats).await {
                    Ok(_) => {
                        notified = true;
                        break;
                    }
                    Err(e) => tracing::warn!(
                        "pooled {}: shutdown notice failed: {e}",
                        self.orch.worker_id
                    ),
                }
            }
            if let Some(h) = self.heartbeat.take() {
                h.abort();
            }
            tracing::info!(
                "pooled {}: session ended ({}): {} results sent, {} computed, {} pending, orchestrator {}",
                self.orch.worker_id,
                outcome.reason(),
                self.sent,
                self.computed,
                self.backlog.len(),
                if notified { "notified" } else { "not notified" }
            );
            match outcome {
                Outcome::Preempted | Outcome::ClientGone => {}
                _ => {
                    let mut line = json!({
                        "status": "shutdown",
                        "total_batches_sent": self.sent,
                        "session_duration": self.session_start.elapsed().as_secs(),
                        "pending_results": self.backlog.len(),
                        "reason": outcome.reason(),
                    });
                    if outcome == Outcome::ServerShutdown {
                        line["error_type"] = json!("Shutdown");
                    }
                    self.sink.send(&line).await;
                }
            }
        }
        if let Some(h) = self.heartbeat.take() {
            h.abort();
        }
    }
}

fn command(v: &Option<Value>) -> Option<&str> {
    v.as_ref()?.get("type")?.as_str()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_updates_and_assignments() {
        let mut c = WorkerConfig::default();
        c.update(&json!({"status": "wait"}));
        assert_eq!(c, WorkerConfig::default());
        c.update(
            &json!({"block_hash": "bh", "block_height": 5, "r_target": 1.4, "params": {"dim": 64}}),
        );
        assert_eq!(c.block_hash.as_deref(), Some("bh"));
        assert!(c.assignment().is_none());
        c.update(&json!({"public_key": "pk", "nonce_range_start": 10, "nonce_range_end": 19, "block_hash": null}));
        let a = c.assignment().unwrap();
        assert_eq!((a.range_start, a.range_end, a.block_height), (10, 19, 5));
        assert_eq!(c.block_hash.as_deref(), Some("bh"));
        c.update(&json!({"nonce_range_end": 3}));
        assert!(c.assignment().is_none());
    }

    #[test]
    fn pooled_requests() {
        assert_eq!(
            parse_pooled(&json!({"orchestrator_url": "http://127.0.0.1:5/"})).unwrap(),
            "http://127.0.0.1:5"
        );
        assert!(parse_pooled(&json!({}))
            .unwrap_err()
            .contains("orchestrator_url: missing"));
        assert!(parse_pooled(&json!({"orchestrator_url": 5}))
            .unwrap_err()
            .contains("expected a string"));
    }
}
