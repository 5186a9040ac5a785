//! Waking threads when something they wait for changes, instead of sleeping and looking again.
//!
//! Whoever changes state another thread may wait on (a job stopped, paused, re-assigned; the
//! devices let go; a job finished) calls [`Signal::notify`] after the change. A waiter reads
//! the signal's version, checks its condition, and sleeps only while the version is the one it
//! read: a change that lands between its check and its sleep bumps the version first, so no
//! wake-up is lost.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Instant;

/// A version counter with a condition variable (see the module doc).
#[derive(Debug, Default)]
pub struct Signal {
    version: Mutex<u64>,
    changed: Condvar,
}

impl Signal {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, u64> {
        self.version.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Something changed: wake every waiter so that it checks its condition again.
    pub fn notify(&self) {
        *self.lock() += 1;
        self.changed.notify_all();
    }

    /// The current version, to read before checking a condition.
    pub fn version(&self) -> u64 {
        *self.lock()
    }

    /// Sleep until the version is no longer `seen` or `deadline` passes.
    pub fn wait_past(&self, seen: u64, deadline: Option<Instant>) {
        let mut v = self.lock();
        while *v == seen {
            match deadline {
                None => v = self.changed.wait(v).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return;
                    }
                    v = self
                        .changed
                        .wait_timeout(v, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
        }
    }

    /// Wait until `ready()` holds (checked at once and after every change), at most until
    /// `deadline`; whether it holds.
    pub fn wait_until(&self, deadline: Option<Instant>, mut ready: impl FnMut() -> bool) -> bool {
        loop {
            let seen = self.version();
            if ready() {
                return true;
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return false;
            }
            self.wait_past(seen, deadline);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn a_waiter_wakes_on_the_change_it_waits_for() {
        let s = Arc::new(Signal::new());
        let flag = Arc::new(AtomicBool::new(false));
        let (s2, f2) = (s.clone(), flag.clone());
        let t0 = Instant::now();
        let waiter = std::thread::spawn(move || {
            s2.wait_until(None, || f2.load(Ordering::SeqCst));
            t0.elapsed()
        });
        std::thread::sleep(Duration::from_millis(50));
        // A change of something else wakes it, and it sleeps on.
        s.notify();
        std::thread::sleep(Duration::from_millis(20));
        assert!(!waiter.is_finished());
        flag.store(true, Ordering::SeqCst);
        s.notify();
        let took = waiter.join().unwrap();
        assert!(took >= Duration::from_millis(70), "{took:?}");
        assert!(took < Duration::from_secs(5), "{took:?}");
    }

    #[test]
    fn deadlines_end_a_wait_and_say_so() {
        let s = Signal::new();
        let t0 = Instant::now();
        assert!(!s.wait_until(Some(t0 + Duration::from_millis(30)), || false));
        assert!(t0.elapsed() >= Duration::from_millis(30));
        assert!(s.wait_until(Some(t0), || true));
        // A version already past returns at once.
        let v = s.version();
        s.notify();
        s.wait_past(v, None);
    }

    #[test]
    fn no_wake_up_is_lost_between_the_check_and_the_sleep() {
        // Many rounds of a change racing the waiter's check: each must be seen.
        let s = Arc::new(Signal::new());
        let n = Arc::new(std::sync::atomic::AtomicU64::new(0));
        for round in 1..=200u64 {
            let (s2, n2) = (s.clone(), n.clone());
            let w = std::thread::spawn(move || {
                s2.wait_until(Some(Instant::now() + Duration::from_secs(10)), || {
                    n2.load(Ordering::SeqCst) >= round
                })
            });
            n.store(round, Ordering::SeqCst);
            s.notify();
            assert!(w.join().unwrap(), "round {round} missed its wake-up");
        }
    }
}
