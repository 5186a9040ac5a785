//! Which nonces a worker computes.
//!
//! /generate: worker `w` of `W` takes `start + w + k*W` for k = 0, 1, ... in batches, and a
//! batch's `next_nonce` is `max(nonces) + W`. /pooled: local worker `g` of `G` takes
//! `range_start + g + k*G` while it is `<= range_end` (inclusive). Nonces are u64; a schedule
//! that would pass 2^64 - 1 ends there instead of wrapping.

/// An endless (until u64 runs out) strided schedule for /generate: a range schedule that
/// ends at the largest nonce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenerateSchedule(RangeSchedule);

impl GenerateSchedule {
    /// Worker `worker` of `n_workers` starting from `start_nonce`.
    pub fn new(start_nonce: u64, worker: u64, n_workers: u64) -> Self {
        GenerateSchedule(RangeSchedule::new(start_nonce, u64::MAX, worker, n_workers))
    }

    /// [`GenerateSchedule::new`] over the first `count` nonces only (`start_nonce` ..=
    /// `start_nonce + count - 1`, shared among the workers as usual); endless with None.
    pub fn first(start_nonce: u64, count: Option<u64>, worker: u64, n_workers: u64) -> Self {
        let end = match count {
            None => u64::MAX,
            // No nonce at all: an end below the start leaves every worker empty-handed.
            Some(0) => return GenerateSchedule(RangeSchedule::empty()),
            Some(n) => start_nonce.saturating_add(n - 1),
        };
        GenerateSchedule(RangeSchedule::new(start_nonce, end, worker, n_workers))
    }

    /// The next batch of up to `batch_size` nonces (empty when the u64 range is exhausted).
    pub fn next_batch(&mut self, batch_size: usize) -> Vec<u64> {
        self.0.next_batch(batch_size)
    }

    /// Whether every nonce of this worker has been handed out.
    pub fn is_done(&self) -> bool {
        self.0.is_done()
    }

    /// `next_nonce` as the reference reports it after a batch: `max(nonces) + W`
    /// (saturating at u64::MAX at the very end of the range).
    pub fn next_nonce_after(batch: &[u64], n_workers: u64) -> Option<u64> {
        batch.iter().max().map(|m| m.saturating_add(n_workers))
    }
}

/// A bounded schedule over an inclusive range for /pooled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeSchedule {
    next: Option<u64>,
    end: u64,
    stride: u64,
}

impl RangeSchedule {
    /// Local worker `worker` of `n_workers` over `[range_start, range_end]`.
    pub fn new(range_start: u64, range_end: u64, worker: u64, n_workers: u64) -> Self {
        assert!(
            n_workers > 0 && worker < n_workers,
            "worker {worker} of {n_workers}"
        );
        let first = range_start.checked_add(worker).filter(|&n| n <= range_end);
        RangeSchedule {
            next: first,
            end: range_end,
            stride: n_workers,
        }
    }

    /// A schedule with no nonce.
    fn empty() -> Self {
        RangeSchedule {
            next: None,
            end: 0,
            stride: 1,
        }
    }

    /// The next batch of up to `batch_size` nonces; empty when the range is done.
    pub fn next_batch(&mut self, batch_size: usize) -> Vec<u64> {
        let mut out = Vec::with_capacity(batch_size);
        while out.len() < batch_size {
            let Some(n) = self.next else { break };
            out.push(n);
            self.next = n.checked_add(self.stride).filter(|&m| m <= self.end);
        }
        out
    }

    /// Whether every nonce of this worker has been handed out.
    pub fn is_done(&self) -> bool {
        self.next.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn generate_interleaves_workers() {
        let mut w0 = GenerateSchedule::new(100, 0, 3);
        let mut w2 = GenerateSchedule::new(100, 2, 3);
        assert_eq!(w0.next_batch(3), vec![100, 103, 106]);
        assert_eq!(w0.next_batch(2), vec![109, 112]);
        let b = w2.next_batch(2);
        assert_eq!(b, vec![102, 105]);
        assert_eq!(GenerateSchedule::next_nonce_after(&b, 3), Some(108));
    }

    #[test]
    fn generate_stops_at_the_end_of_u64() {
        let mut s = GenerateSchedule::new(u64::MAX - 4, 1, 2);
        assert_eq!(s.next_batch(10), vec![u64::MAX - 3, u64::MAX - 1]);
        assert!(s.next_batch(10).is_empty());
    }

    #[test]
    fn generate_can_stop_after_a_count() {
        let mut w0 = GenerateSchedule::first(100, Some(5), 0, 2);
        let mut w1 = GenerateSchedule::first(100, Some(5), 1, 2);
        assert_eq!(w0.next_batch(10), vec![100, 102, 104]);
        assert_eq!(w1.next_batch(10), vec![101, 103]);
        assert!(w0.is_done() && w1.is_done());
        assert!(GenerateSchedule::first(7, Some(0), 0, 1).is_done());
        let mut end = GenerateSchedule::first(u64::MAX - 1, Some(10), 0, 1);
        assert_eq!(end.next_batch(10), vec![u64::MAX - 1, u64::MAX]);
        assert!(!GenerateSchedule::first(0, None, 0, 1).is_done());
    }

    #[test]
    fn range_is_inclusive() {
        let mut s = RangeSchedule::new(10, 20, 1, 4);
        assert_eq!(s.next_batch(10), vec![11, 15, 19]);
        assert!(s.is_done());
        let mut s = RangeSchedule::new(10, 10, 0, 1);
        assert_eq!(s.next_batch(5), vec![10]);
        let s = RangeSchedule::new(10, 10, 1, 2);
        assert!(s.is_done());
        let mut s = RangeSchedule::new(u64::MAX - 1, u64::MAX, 0, 1);
        assert_eq!(s.next_batch(5), vec![u64::MAX - 1, u64::MAX]);
    }

    proptest! {
        #[test]
        fn workers_partition_a_range(start in 0u64..1000, len in 0u64..500, n in 1u64..9, bs in 1usize..17) {
            let end = start + len;
            let mut all = Vec::new();
            for w in 0..n {
                let mut s = RangeSchedule::new(start, end, w, n);
                loop {
                    let b = s.next_batch(bs);
                    if b.is_empty() { break; }
                    all.extend(b);
                }
            }
            all.sort_unstable();
            let want: Vec<u64> = (start..=end).collect();
            prop_assert_eq!(all, want);
        }
    }
}
