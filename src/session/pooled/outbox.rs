//! The results of a /pooled session on their way to the orchestrator. A result is posted at
//! once when nothing older waits; a post that fails keeps it (and everything after it) in the
//! backlog, re-sent oldest first through /results/batch after a growing pause (0.5 s doubling
//! to 4 s). Nothing is ever dropped: when the backlog reaches its limit the outbox asks for the
//! computation to pause ([`Pressure::Pause`]), and to resume once half of it is delivered.

use super::orchestrator::ResultPoster;
use crate::session::client::CallError;
use crate::telemetry::Metrics;
use serde_json::Value;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Results per /results/batch post.
pub const FLUSH_CHUNK: usize = 500;
/// The first pause after a failed post; it doubles with every failure in a row.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// Longest pause between two re-sends of the backlog.
const MAX_BACKOFF: Duration = Duration::from_secs(4);

/// What the computation should do about the backlog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pressure {
    /// The backlog reached its limit: stop computing until it drains.
    Pause,
    /// The backlog is down to half its limit: compute again.
    Resume,
}

/// Results not yet accepted by the orchestrator, and how delivery is going.
pub struct Outbox {
    /// Oldest first.
    backlog: VecDeque<Value>,
    /// The backlog's size, shared with the heartbeat that reports it.
    pending: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
    /// The backlog size last added to the metrics' gauge.
    reported: i64,
    /// No post before this instant (backing off after a failure).
    next_flush: Instant,
    failures: u32,
    sent: u64,
    limit: usize,
    paused: bool,
    /// For the log.
    worker_id: String,
}

impl Outbox {
    /// An empty outbox that asks for a pause at `limit` waiting results.
    pub fn new(limit: usize, metrics: Arc<Metrics>, worker_id: &str) -> Self {
        Outbox {
            backlog: VecDeque::new(),
            pending: Arc::new(AtomicUsize::new(0)),
            metrics,
            reported: 0,
            next_flush: Instant::now(),
            failures: 0,
            sent: 0,
            limit: limit.max(1),
            paused: false,
            worker_id: worker_id.to_owned(),
        }
    }

    /// The number of waiting results, as the heartbeat reads it.
    pub fn pending(&self) -> Arc<AtomicUsize> {
        self.pending.clone()
    }

    pub fn len(&self) -> usize {
        self.backlog.len()
    }

    pub fn is_empty(&self) -> bool {
        self.backlog.is_empty()
    }

    /// Results the orchestrator has accepted.
    pub fn sent(&self) -> u64 {
        self.sent
    }

    /// When the backlog is due to be re-sent; None when it is empty.
    pub fn flush_due(&self) -> Option<Instant> {
        (!self.backlog.is_empty()).then_some(self.next_flush)
    }

    /// Post fresh results now if nothing older waits (and no failure is being waited out),
    /// else queue them behind the backlog.
    pub async fn deliver<P: ResultPoster>(
        &mut self,
        to: &P,
        fresh: Vec<Value>,
    ) -> Option<Pressure> {
        if fresh.is_empty() {
            return None;
        }
        if self.backlog.is_empty() && Instant::now() >= self.next_flush {
            let r = if fresh.len() == 1 {
                to.post_result(&fresh[0]).await
            } else {
                to.post_results(&fresh).await
            };
            match r {
                Ok(_) => {
                    self.sent += fresh.len() as u64;
                    self.failures = 0;
                }
                Err(e) => {
                    self.backlog.extend(fresh);
                    self.failed_post(&e);
                }
            }
        } else {
            self.backlog.extend(fresh);
        }
        self.changed()
    }

    /// Keep `result` for the next flush, without posting it now (the end of a session).
    pub fn keep(&mut self, result: Value) -> Option<Pressure> {
        self.backlog.push_back(result);
        self.changed()
    }

    /// Re-send the backlog, oldest first, until it is empty or a post fails; whether it is
    /// empty, and what the computation should do now.
    pub async fn flush<P: ResultPoster>(&mut self, to: &P) -> (bool, Option<Pressure>) {
        while !self.backlog.is_empty() {
            let n = self.backlog.len().min(FLUSH_CHUNK);
            let chunk: Vec<Value> = self.backlog.iter().take(n).cloned().collect();
            match to.post_results(&chunk).await {
                Ok(_) => {
                    self.backlog.drain(..n);
                    self.sent += n as u64;
                    if self.failures > 0 {
                        tracing::info!(
                            "pooled {}: orchestrator reachable again, {n} kept results delivered",
                            self.worker_id
                        );
                    }
                    self.failures = 0;
                    self.next_flush = Instant::now();
                }
                Err(e) => {
                    self.failed_post(&e);
                    return (false, self.changed());
                }
            }
        }
        (true, self.changed())
    }

    /// Deliver everything before `deadline`, re-sending after each failure's pause; whether
    /// everything went.
    pub async fn drain<P: ResultPoster>(&mut self, to: &P, deadline: Instant) -> bool {
        self.next_flush = Instant::now();
        while !self.backlog.is_empty() && Instant::now() < deadline {
            if self.flush(to).await.0 {
                break;
            }
            let wait = self
                .next_flush
                .min(deadline)
                .saturating_duration_since(Instant::now());
            tokio::time::sleep(wait).await;
        }
        self.backlog.is_empty()
    }

    fn failed_post(&mut self, e: &CallError) {
        self.failures += 1;
        let backoff = FIRST_BACKOFF
            .saturating_mul(1 << self.failures.saturating_sub(1).min(4))
            .min(MAX_BACKOFF);
        self.next_flush = Instant::now() + backoff;
        if self.failures.is_power_of_two() {
            tracing::warn!(
                "pooled {}: result post failed ({} in a row, {} results kept for re-sending): {e}",
                self.worker_id,
                self.failures,
                self.backlog.len()
            );
        }
    }

    /// Publish the backlog's size and say whether the computation should pause or resume.
    fn changed(&mut self) -> Option<Pressure> {
        let n = self.backlog.len();
        self.pending.store(n, Ordering::SeqCst);
        self.metrics.pooled_backlog_add(n as i64 - self.reported);
        self.reported = n as i64;
        if !self.paused && n >= self.limit {
            self.paused = true;
            tracing::warn!(
                "pooled {}: {n} results wait for the orchestrator: computing paused until they are delivered",
                self.worker_id
            );
            Some(Pressure::Pause)
        } else if self.paused && n <= self.limit / 2 {
            self.paused = false;
            tracing::info!(
                "pooled {}: backlog down to {n}: computing again",
                self.worker_id
            );
            Some(Pressure::Resume)
        } else {
            None
        }
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        // Whatever is left is no longer this server's backlog.
        self.metrics.pooled_backlog_add(-self.reported);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::cell::RefCell;

    /// A poster that fails while `down` and records every result it accepted, and every call.
    #[derive(Default)]
    struct Fake {
        down: RefCell<bool>,
        accepted: RefCell<Vec<u64>>,
        calls: RefCell<Vec<(&'static str, usize)>>,
    }

    impl Fake {
        fn take(&self, what: &'static str, rs: &[Value]) -> Result<Value, CallError> {
            self.calls.borrow_mut().push((what, rs.len()));
            if *self.down.borrow() {
                return Err(CallError::Status(503));
            }
            self.accepted
                .borrow_mut()
                .extend(rs.iter().map(|r| r["n"].as_u64().unwrap()));
            Ok(Value::Null)
        }
    }

    impl ResultPoster for Fake {
        async fn post_result(&self, r: &Value) -> Result<Value, CallError> {
            self.take("one", std::slice::from_ref(r))
        }
        async fn post_results(&self, rs: &[Value]) -> Result<Value, CallError> {
            self.take("batch", rs)
        }
    }

    fn results(range: std::ops::Range<u64>) -> Vec<Value> {
        range.map(|n| json!({ "n": n })).collect()
    }

    fn run<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn results_go_at_once_while_the_orchestrator_answers() {
        run(async {
            let m = Arc::new(Metrics::new());
            let fake = Fake::default();
            let mut o = Outbox::new(10, m, "w");
            assert_eq!(o.deliver(&fake, results(0..1)).await, None);
            assert_eq!(o.deliver(&fake, results(1..4)).await, None);
            assert_eq!(*fake.calls.borrow(), [("one", 1), ("batch", 3)]);
            assert_eq!(*fake.accepted.borrow(), [0, 1, 2, 3]);
            assert_eq!((o.sent(), o.len(), o.flush_due()), (4, 0, None));
        });
    }

    #[test]
    fn a_failed_post_keeps_everything_in_order_and_backs_off() {
        run(async {
            let m = Arc::new(Metrics::new());
            let fake = Fake::default();
            let mut o = Outbox::new(100, m.clone(), "w");
            *fake.down.borrow_mut() = true;
            o.deliver(&fake, results(0..2)).await;
            let due = o.flush_due().expect("a re-send is due");
            assert!(
                due > Instant::now() + Duration::from_millis(300),
                "backing off"
            );
            // While backing off, fresh results queue behind the old ones without a post.
            o.deliver(&fake, results(2..3)).await;
            assert_eq!(fake.calls.borrow().len(), 1);
            assert_eq!(o.pending().load(Ordering::SeqCst), 3);
            assert!(m.render(&[]).contains("llama_pow_pooled_backlog 3"));
            // Each failure in a row waits longer, up to the cap.
            let mut last = Duration::ZERO;
            for _ in 0..6 {
                assert!(!o.flush(&fake).await.0);
                let wait = o.flush_due().unwrap() - Instant::now();
                assert!(
                    wait + Duration::from_millis(50) >= last,
                    "{wait:?} < {last:?}"
                );
                assert!(wait <= MAX_BACKOFF);
                last = wait;
            }
            assert!(last > Duration::from_secs(3), "{last:?}");
            *fake.down.borrow_mut() = false;
            assert!(o.flush(&fake).await.0);
            assert_eq!(*fake.accepted.borrow(), [0, 1, 2]);
            assert_eq!((o.sent(), o.len()), (3, 0));
            assert!(m.render(&[]).contains("llama_pow_pooled_backlog 0"));
        });
    }

    #[test]
    fn a_full_backlog_pauses_the_computation_until_half_is_delivered() {
        run(async {
            let m = Arc::new(Metrics::new());
            let fake = Fake::default();
            let mut o = Outbox::new(4, m, "w");
            *fake.down.borrow_mut() = true;
            assert_eq!(o.deliver(&fake, results(0..3)).await, None);
            assert_eq!(o.keep(json!({"n": 3})), Some(Pressure::Pause));
            // Already paused: more results do not ask again.
            assert_eq!(o.keep(json!({"n": 4})), None);
            *fake.down.borrow_mut() = false;
            let (empty, p) = o.flush(&fake).await;
            assert!(empty);
            assert_eq!(p, Some(Pressure::Resume));
            assert_eq!(*fake.accepted.borrow(), [0, 1, 2, 3, 4]);
        });
    }

    #[test]
    fn large_backlogs_go_in_chunks_and_drain_waits_out_failures_until_its_deadline() {
        run(async {
            let m = Arc::new(Metrics::new());
            let fake = Fake::default();
            let mut o = Outbox::new(10_000, m, "w");
            for r in results(0..1234) {
                o.keep(r);
            }
            assert!(o.flush(&fake).await.0);
            let sizes: Vec<usize> = fake.calls.borrow().iter().map(|c| c.1).collect();
            assert_eq!(sizes, [FLUSH_CHUNK, FLUSH_CHUNK, 234]);
            assert_eq!(*fake.accepted.borrow(), (0..1234).collect::<Vec<_>>());

            // An orchestrator that stays down: drain gives up at its deadline, keeping all.
            *fake.down.borrow_mut() = true;
            o.keep(json!({"n": 9999}));
            let t0 = Instant::now();
            assert!(!o.drain(&fake, t0 + Duration::from_millis(800)).await);
            assert!(t0.elapsed() >= Duration::from_millis(800));
            assert!(t0.elapsed() < Duration::from_secs(3));
            assert_eq!(o.len(), 1);
        });
    }
}
