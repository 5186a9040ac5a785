//! The /pooled session's state machine: register, wait for a block hash, build the model,
//! say ready, compute the assigned ranges while polling for commands, then wind down
//! (see the [module doc](super)).

use super::config::{PooledConfig, WorkerConfig};
use super::orchestrator::OrchestratorApi;
use super::outbox::{Outbox, Pressure, FLUSH_CHUNK};
use crate::engine::StopReason;
use crate::engine::{BatchReport, Engine, Job, JobEnd, JobEvent, JobHandle, ModelSpec, RangeJob};
use crate::logsafe::{prefix16, scrub};
use crate::pow::params::Params;
use crate::pow::request::parse_params;
use crate::session::client::CallError;
use crate::session::lines::{BatchFields, ErrorLine, LineSink, PREEMPTED};
use crate::session::Shutdown;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Delays between registration (and ready) attempts.
const RETRY_DELAYS: [u64; 4] = [1, 2, 4, 8];
/// How long the end of a session may spend delivering results and saying goodbye.
const FINAL_FLUSH: Duration = Duration::from_secs(30);

/// What a /pooled session works with.
pub struct PooledEnv {
    pub engine: Engine,
    pub cfg: PooledConfig,
    pub shutdown: Shutdown,
}

/// Run a whole /pooled session for `orch`, writing its lines into `sink`, and wind it down.
pub async fn run<O: OrchestratorApi>(env: &PooledEnv, orch: O, sink: LineSink) {
    let metrics = env.engine.metrics().clone();
    metrics.pooled_session(1);
    let mut s = Session::new(env, orch, sink);
    let outcome = s.run().await;
    s.finish(outcome).await;
    drop(s);
    metrics.pooled_session(-1);
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
    /// The session's time limit passed (waiting for a block hash, or computing).
    TimedOut(&'static str),
    Preempted,
    ClientGone,
    ServerShutdown,
    /// The client's `max_seconds` or `max_nonces` was reached.
    Bounded(&'static str),
    /// Something failed; an error line went out.
    Failed(String),
}

impl Outcome {
    fn reason(&self) -> String {
        match self {
            Outcome::NotRegistered => "not registered".into(),
            Outcome::Commanded => "shutdown command".into(),
            Outcome::TimedOut(what) | Outcome::Bounded(what) => (*what).into(),
            Outcome::Preempted => "preempted by a newer request".into(),
            Outcome::ClientGone => "client disconnected".into(),
            Outcome::ServerShutdown => "server shutting down".into(),
            Outcome::Failed(e) => e.clone(),
        }
    }
}

struct Session<'e, O: OrchestratorApi> {
    env: &'e PooledEnv,
    orch: O,
    sink: LineSink,
    cfg: WorkerConfig,
    job: Option<JobHandle>,
    outbox: Outbox,
    /// Job events read ahead of their turn.
    deferred: VecDeque<JobEvent>,
    computed: u64,
    valid: u64,
    session_start: Instant,
    heartbeat: Option<tokio::task::JoinHandle<()>>,
}

enum Step {
    Continue,
    End(Outcome),
}

/// What woke the computing loop.
// Lives for one turn of the loop, on its stack: boxing the event would only add an allocation.
#[allow(clippy::large_enum_variant)]
enum Wake {
    Event(Option<JobEvent>),
    Poll,
    Flush,
    Tick,
    End(Outcome),
}

impl<'e, O: OrchestratorApi> Session<'e, O> {
    fn new(env: &'e PooledEnv, orch: O, sink: LineSink) -> Self {
        let outbox = Outbox::new(
            env.cfg.max_backlog,
            env.engine.metrics().clone(),
            orch.worker_id(),
        );
        Session {
            env,
            orch,
            sink,
            cfg: WorkerConfig::default(),
            job: None,
            outbox,
            deferred: VecDeque::new(),
            computed: 0,
            valid: 0,
            session_start: Instant::now(),
            heartbeat: None,
        }
    }

    fn id(&self) -> &str {
        self.orch.worker_id()
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
            _ = self.env.shutdown.wait() => Some(Outcome::ServerShutdown),
        }
    }

    fn n_workers(&self) -> usize {
        self.env.engine.n_workers()
    }

    async fn register(&mut self) -> Result<(), Outcome> {
        let gpu_info: Value = self
            .env
            .engine
            .device_names()
            .iter()
            .enumerate()
            .map(|(i, n)| json!({"index": i, "name": n}))
            .collect();
        let n = self.n_workers();
        match self
            .retried("registration attempt", || self.orch.connect(n, &gpu_info))
            .await
        {
            Ok(v) => {
                self.cfg.update(&v);
                Ok(())
            }
            Err(Some(o)) => Err(o),
            Err(None) => {
                self.error_line("Failed to register with orchestrator", "ConnectionError");
                Err(Outcome::NotRegistered)
            }
        }
    }

    /// `call` until it answers: at most once more than [`RETRY_DELAYS`] has delays, pausing
    /// that long after each failure (logged as `what` with its number). `Err(None)` when
    /// every call failed, `Err(Some(outcome))` when the session had to end during a pause.
    async fn retried<F: std::future::Future<Output = Result<Value, CallError>>>(
        &self,
        what: &str,
        call: impl Fn() -> F,
    ) -> Result<Value, Option<Outcome>> {
        for attempt in 0..=RETRY_DELAYS.len() {
            match call().await {
                Ok(v) => return Ok(v),
                Err(e) => {
                    tracing::warn!("pooled {}: {what} {} failed: {e}", self.id(), attempt + 1);
                    if let Some(&d) = RETRY_DELAYS.get(attempt) {
                        if let Some(o) = self.pause_for(Duration::from_secs(d)).await {
                            return Err(Some(o));
                        }
                    }
                }
            }
        }
        Err(None)
    }

    fn start_heartbeat(&mut self) {
        let orch = self.orch.clone();
        let pending = self.outbox.pending();
        let every = self.env.cfg.heartbeat;
        self.heartbeat = Some(actix_web::rt::spawn(async move {
            let mut failures = 0u64;
            loop {
                tokio::time::sleep(every).await;
                let n = pending.load(std::sync::atomic::Ordering::SeqCst);
                match orch.heartbeat(n).await {
                    Ok(_) => failures = 0,
                    Err(e) => {
                        failures += 1;
                        if failures.is_power_of_two() {
                            tracing::warn!(
                                "pooled {}: heartbeat failed ({failures} in a row): {e}",
                                orch.worker_id()
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
                tracing::debug!("pooled {}: config poll failed: {e}", self.id());
                None
            }
        }
    }

    async fn wait_block_hash(&mut self) -> Result<(), Outcome> {
        let start = Instant::now();
        while self.cfg.block_hash.is_none() {
            if self.client_time_is_up() {
                return Err(Outcome::Bounded("max_seconds"));
            }
            if start.elapsed() > self.env.cfg.max {
                tracing::warn!(
                    "pooled {}: no block hash after {:.0} s",
                    self.id(),
                    start.elapsed().as_secs_f64()
                );
                self.line(&json!({"status": "timeout", "message": "No block_hash received"}));
                return Err(Outcome::TimedOut("timeout_waiting_block_hash"));
            }
            let polled = tokio::select! {
                v = self.orch.config() => v.ok(),
                _ = self.sink.closed() => return Err(Outcome::ClientGone),
                _ = self.env.shutdown.wait() => return Err(Outcome::ServerShutdown),
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
            if let Some(o) = self.pause_for(self.env.cfg.poll).await {
                return Err(o);
            }
        }
        Ok(())
    }

    /// Whether the client's `max_seconds` has passed since the session began.
    fn client_time_is_up(&self) -> bool {
        self.env
            .cfg
            .client
            .max_seconds
            .is_some_and(|m| self.session_start.elapsed() >= m)
    }

    /// How long until the session must end: the server's limit on computing (from
    /// `compute_start`) or the client's on the whole session, whichever comes first, and the
    /// outcome it ends with.
    fn time_left(&self, compute_start: Instant) -> (Duration, Outcome) {
        let server = self.env.cfg.max.saturating_sub(compute_start.elapsed());
        match self.env.cfg.client.max_seconds {
            Some(m) if m.saturating_sub(self.session_start.elapsed()) <= server => (
                m.saturating_sub(self.session_start.elapsed()),
                Outcome::Bounded("max_seconds"),
            ),
            _ => (server, Outcome::TimedOut("session time limit")),
        }
    }

    fn model_params(&self) -> Result<Params, String> {
        let v = self.cfg.params.clone().unwrap_or_else(|| json!({}));
        let p = parse_params(&v).map_err(|e| e.to_string())?;
        self.env.engine.check(&p).map_err(|e| e.to_string())?;
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
                    _ = self.env.shutdown.wait() => return Err(Outcome::ServerShutdown),
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
        let n = self.n_workers();
        match self.retried("ready notice", || self.orch.ready(n)).await {
            Ok(v) => {
                self.cfg.update(&v);
                Ok(())
            }
            Err(Some(o)) => Err(o),
            Err(None) => {
                self.error_line("Failed to notify ready", "ConnectionError");
                Err(Outcome::Failed("cannot notify ready".into()))
            }
        }
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
            self.id(),
            a.range_start,
            a.range_end,
            prefix16(&a.public_key),
            if restart { " (range restarted)" } else { "" }
        );
        job.control.assign(a, restart);
        true
    }

    /// Pause or resume the computation as the outbox asks.
    fn apply_pressure(&self, p: Option<Pressure>) {
        if let (Some(p), Some(job)) = (p, &self.job) {
            job.control.set_paused(p == Pressure::Pause);
        }
    }

    async fn run(&mut self) -> Outcome {
        self.line(&json!({"status": "registering", "worker_id": self.id(), "gpu_count": self.n_workers()}));
        if let Err(o) = self.register().await {
            return o;
        }
        tracing::info!("pooled {}: registered", self.id());
        self.line(&json!({"status": "registered", "worker_id": self.id()}));
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
                tracing::warn!("pooled {}: unusable params: {}", self.id(), scrub(&e));
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
            .unwrap_or(self.env.cfg.batch_size)
            .min(crate::pow::request::MAX_BATCH_SIZE);
        let job = Job::Range(RangeJob {
            model: ModelSpec { block_hash, params },
            batch_size,
        });
        match self.env.engine.submit(job) {
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
        self.compute().await
    }

    async fn compute(&mut self) -> Outcome {
        let start = Instant::now();
        let mut poll = tokio::time::interval(self.env.cfg.poll);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let (left, at_end) = self.time_left(start);
            if left.is_zero() {
                tracing::info!("pooled {}: {} reached", self.id(), at_end.reason());
                return at_end;
            }
            if let Some(ev) = self.deferred.pop_front() {
                if let Step::End(o) = self.on_event(Some(ev)).await {
                    return o;
                }
                continue;
            }
            let flush_due = self.outbox.flush_due();
            let next_flush = tokio::time::Instant::from_std(flush_due.unwrap_or_else(Instant::now));
            let step = {
                let Some(job) = self.job.as_mut() else {
                    return Outcome::Failed("no job".into());
                };
                tokio::select! {
                    biased;
                    _ = self.env.shutdown.wait() => Wake::End(Outcome::ServerShutdown),
                    _ = self.sink.closed() => Wake::End(Outcome::ClientGone),
                    ev = job.events.recv() => Wake::Event(ev),
                    _ = poll.tick() => Wake::Poll,
                    _ = tokio::time::sleep_until(next_flush), if flush_due.is_some() => Wake::Flush,
                    _ = tokio::time::sleep(left) => Wake::Tick,
                }
            };
            let step = match step {
                Wake::Event(ev) => self.on_event(ev).await,
                Wake::Poll => self.on_poll().await,
                Wake::Flush => {
                    let (_, p) = self.outbox.flush(&self.orch).await;
                    self.apply_pressure(p);
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
                let p = self.outbox.deliver(&self.orch, fresh).await;
                self.apply_pressure(p);
                if self
                    .env
                    .cfg
                    .client
                    .max_nonces
                    .is_some_and(|n| self.computed >= n)
                {
                    tracing::info!("pooled {}: max_nonces reached", self.id());
                    return Step::End(Outcome::Bounded("max_nonces"));
                }
                Step::Continue
            }
        }
    }

    fn count(&mut self, v: &Value) {
        self.computed += v["batch_computed"].as_u64().unwrap_or(0);
        self.valid += v["batch_valid"].as_u64().unwrap_or(0);
    }

    /// A batch's result: counted and streamed.
    fn take(&mut self, b: &BatchReport) -> Value {
        let v = result_value(b);
        self.count(&v);
        self.line(&v);
        v
    }

    async fn on_poll(&mut self) -> Step {
        let Some(v) = self.poll_once().await else {
            return Step::Continue;
        };
        match command(&Some(v.clone())) {
            Some("shutdown") => {
                tracing::info!("pooled {}: shutdown command", self.id());
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
                self.env
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
                            self.outbox.keep(v);
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
                self.outbox.keep(v);
            }
        }
        if registered {
            if !self.outbox.drain(&self.orch, deadline).await {
                tracing::warn!(
                    "pooled {}: {} results could not be delivered before the session ended",
                    self.id(),
                    self.outbox.len()
                );
            }
            let stats = json!({
                "reason": outcome.reason(),
                "total_batches_sent": self.outbox.sent(),
                "total_computed": self.computed,
                "total_valid": self.valid,
                "pending_results": self.outbox.len(),
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
                    Err(e) => tracing::warn!("pooled {}: shutdown notice failed: {e}", self.id()),
                }
            }
            if let Some(h) = self.heartbeat.take() {
                h.abort();
            }
            tracing::info!(
                "pooled {}: session ended ({}): {} results sent, {} computed, {} pending, orchestrator {}",
                self.id(),
                outcome.reason(),
                self.outbox.sent(),
                self.computed,
                self.outbox.len(),
                if notified { "notified" } else { "not notified" }
            );
            match outcome {
                Outcome::Preempted | Outcome::ClientGone => {}
                _ => {
                    let mut line = json!({
                        "status": "shutdown",
                        "total_batches_sent": self.outbox.sent(),
                        "session_duration": self.session_start.elapsed().as_secs(),
                        "pending_results": self.outbox.len(),
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
    use crate::backend::cpu::CpuBackend;
    use crate::engine::EngineOptions;
    use crate::session::pooled::ClientBounds;
    use crate::session::pooled::ResultPoster;
    use std::cell::RefCell;
    use std::rc::Rc;
    use std::sync::Arc;
    use tokio::sync::watch;

    /// What the fake orchestrator was told, and how it behaves.
    #[derive(Default)]
    struct Seen {
        connect_failures_left: u32,
        connects: u32,
        /// Results are refused until this instant.
        down_until: Option<Instant>,
        refused_posts: u32,
        /// Every nonce of every accepted result, in order.
        delivered: Vec<u64>,
        /// Shut the session down once this many nonces arrived.
        shutdown_after: usize,
        stats: Option<Value>,
        heartbeats: u32,
    }

    #[derive(Clone)]
    struct FakeOrch {
        seen: Rc<RefCell<Seen>>,
        config: Value,
    }

    impl FakeOrch {
        fn accept(&self, rs: &[Value]) -> Result<Value, CallError> {
            let mut s = self.seen.borrow_mut();
            if s.down_until.is_some_and(|t| Instant::now() < t) {
                s.refused_posts += 1;
                return Err(CallError::Transport("connection refused".into()));
            }
            for r in rs {
                let ns = r["nonces"].as_array().unwrap();
                // Every nonce is valid at this r_target: the nonces list is the batch.
                assert_eq!(r["batch_valid"].as_u64().unwrap() as usize, ns.len());
                s.delivered.extend(ns.iter().map(|n| n.as_u64().unwrap()));
            }
            Ok(json!({"status": "ok"}))
        }
    }

    impl ResultPoster for FakeOrch {
        async fn post_result(&self, r: &Value) -> Result<Value, CallError> {
            self.accept(std::slice::from_ref(r))
        }
        async fn post_results(&self, rs: &[Value]) -> Result<Value, CallError> {
            self.accept(rs)
        }
    }

    impl OrchestratorApi for FakeOrch {
        fn worker_id(&self) -> &str {
            "fake-worker"
        }
        async fn connect(&self, gpu_count: usize, _: &Value) -> Result<Value, CallError> {
            assert_eq!(gpu_count, 1);
            let mut s = self.seen.borrow_mut();
            s.connects += 1;
            if s.connect_failures_left > 0 {
                s.connect_failures_left -= 1;
                return Err(CallError::Status(502));
            }
            Ok(json!({"status": "registered"}))
        }
        async fn config(&self) -> Result<Value, CallError> {
            let s = self.seen.borrow();
            if s.delivered.len() >= s.shutdown_after {
                return Ok(json!({"type": "shutdown"}));
            }
            Ok(self.config.clone())
        }
        async fn ready(&self, _: usize) -> Result<Value, CallError> {
            Ok(json!({"status": "ok"}))
        }
        async fn heartbeat(&self, _: usize) -> Result<Value, CallError> {
            self.seen.borrow_mut().heartbeats += 1;
            Ok(Value::Null)
        }
        async fn shutdown(&self, stats: &Value) -> Result<Value, CallError> {
            self.seen.borrow_mut().stats = Some(stats.clone());
            Ok(Value::Null)
        }
    }

    fn env(shutdown: watch::Receiver<bool>) -> PooledEnv {
        PooledEnv {
            engine: Engine::new(vec![Arc::new(CpuBackend::new())], EngineOptions::default()),
            cfg: PooledConfig {
                poll: Duration::from_millis(20),
                max: Duration::from_secs(60),
                heartbeat: Duration::from_millis(50),
                max_backlog: 1000,
                batch_size: 4,
                shutdown_grace: Duration::from_secs(5),
                client: ClientBounds::default(),
            },
            shutdown: Shutdown::new(shutdown),
        }
    }

    fn orchestrator(seen: Seen, range_end: u64) -> FakeOrch {
        FakeOrch {
            seen: Rc::new(RefCell::new(seen)),
            config: json!({
                "block_hash": "a block", "block_height": 7, "r_target": 10.0,
                "public_key": "a key", "nonce_range_start": 0, "nonce_range_end": range_end,
                "params": {"dim": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 2,
                           "vocab_size": 40, "multiple_of": 32, "seq_len": 4},
            }),
        }
    }

    /// Run a session to its end; its lines.
    fn session(orch: FakeOrch) -> Vec<Value> {
        session_bounded(orch, ClientBounds::default())
    }

    /// [`session`] with the client's bounds.
    fn session_bounded(orch: FakeOrch, client: ClientBounds) -> Vec<Value> {
        actix_web::rt::System::new().block_on(async move {
            let (_tx, rx) = watch::channel(false);
            let mut env = env(rx);
            env.cfg.client = client;
            let (sink, mut lines) = LineSink::channel();
            let done = tokio::time::timeout(Duration::from_secs(60), run(&env, orch, sink)).await;
            assert!(done.is_ok(), "the session did not end");
            let mut out = Vec::new();
            while let Ok(l) = lines.try_recv() {
                out.push(serde_json::from_slice(&l).unwrap());
            }
            out
        })
    }

    fn statuses(lines: &[Value]) -> Vec<&str> {
        lines.iter().filter_map(|l| l["status"].as_str()).collect()
    }

    #[test]
    fn a_session_registers_computes_its_range_and_delivers_every_result_once() {
        let orch = orchestrator(
            Seen {
                // One failed registration: retried after a second.
                connect_failures_left: 1,
                shutdown_after: 40,
                ..Seen::default()
            },
            39,
        );
        let seen = orch.seen.clone();
        let lines = session(orch);
        let s = seen.borrow();
        assert_eq!(s.connects, 2);
        let mut got = s.delivered.clone();
        got.sort_unstable();
        assert_eq!(got, (0..40).collect::<Vec<_>>(), "every nonce once");
        let stats = s.stats.as_ref().expect("the shutdown notice was posted");
        assert_eq!(stats["reason"], "shutdown command");
        assert_eq!(stats["total_computed"], 40);
        assert_eq!(stats["pending_results"], 0);
        assert_eq!(
            statuses(&lines)[..8],
            [
                "registering",
                "registered",
                "waiting_block_hash",
                "received_block_hash",
                "loading_model",
                "model_loaded",
                "ready",
                "computing"
            ]
        );
        assert_eq!(statuses(&lines).last(), Some(&"shutdown"));
        // The results streamed to the client are the delivered ones.
        let streamed: usize = lines
            .iter()
            .filter_map(|l| l["nonces"].as_array())
            .map(Vec::len)
            .sum();
        assert_eq!(streamed, 40);
    }

    #[test]
    fn the_clients_bounds_wind_the_session_down_and_say_which() {
        // max_nonces: at least 12 computed, all delivered, long before the range's end.
        let orch = orchestrator(
            Seen {
                shutdown_after: usize::MAX,
                ..Seen::default()
            },
            1_000_000,
        );
        let seen = orch.seen.clone();
        let lines = session_bounded(
            orch,
            ClientBounds {
                max_seconds: None,
                max_nonces: Some(12),
            },
        );
        let last = lines.last().unwrap();
        assert_eq!(
            (last["status"].as_str(), last["reason"].as_str()),
            (Some("shutdown"), Some("max_nonces"))
        );
        let s = seen.borrow();
        assert!(s.delivered.len() >= 12 && s.delivered.len() < 1_000_000);
        assert_eq!(s.stats.as_ref().unwrap()["reason"], "max_nonces");
        assert_eq!(s.stats.as_ref().unwrap()["pending_results"], 0);
        drop(s);

        // max_seconds: the whole session, the orchestrator never sending a block hash.
        let mut orch = orchestrator(
            Seen {
                shutdown_after: usize::MAX,
                ..Seen::default()
            },
            10,
        );
        orch.config = json!({"status": "waiting"});
        let t = Instant::now();
        let lines = session_bounded(
            orch,
            ClientBounds {
                max_seconds: Some(Duration::from_millis(300)),
                max_nonces: None,
            },
        );
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        let last = lines.last().unwrap();
        assert_eq!(last["reason"], "max_seconds", "{lines:?}");
    }

    #[test]
    fn an_orchestrator_outage_loses_no_result() {
        let orch = orchestrator(
            Seen {
                down_until: Some(Instant::now() + Duration::from_millis(1500)),
                shutdown_after: 120,
                ..Seen::default()
            },
            119,
        );
        let seen = orch.seen.clone();
        session(orch);
        let s = seen.borrow();
        assert!(s.refused_posts > 0, "the outage was seen");
        let mut got = s.delivered.clone();
        got.sort_unstable();
        assert_eq!(got, (0..120).collect::<Vec<_>>(), "every nonce once");
        assert_eq!(s.stats.as_ref().unwrap()["pending_results"], 0);
        assert!(s.heartbeats > 0);
    }
}
