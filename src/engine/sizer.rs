//! How many nonces a worker puts in its next batch.
//!
//! The cap is the request's batch size (already cut to fit `max_batch_bytes`, see
//! [`Engine::effective_batch_size`](super::Engine::effective_batch_size)) and, when the device
//! knows it, the largest batch its free memory takes ([`Backend::max_batch`]). A device that
//! computes while the host prepares (a GPU, [`Backend::overlaps_preparation`]) does not start
//! at the cap: its first batch is small ([`FIRST_BATCH`] nonces) so that a first result comes
//! out quickly after a cold start, and the size then doubles each batch while the measured
//! throughput (nonces per second of device time) improves by more than [`MIN_GAIN`] over the
//! previous size, up to the cap. Once it stops improving the size settles at the best one
//! measured. Every other device (the CPU) gets the cap every time.
//!
//! The worker asks for the size of batch N+1 while batch N computes, so the ramp runs one
//! size ahead of its measurements: when a measurement stops it, at most one batch of the
//! next size is already on its way, and its measurement still counts (the sizer settles at
//! whichever measured size was best).
//!
//! On every device a batch's duration is bounded too ([`BatchSizer::with_max_duration`]):
//! each measured batch gives a throughput, and the next batches hold at most the nonces that
//! throughput computes in the bound (never fewer than one). A stop, a time limit or a newer
//! request then never waits long for the batch in flight, wherever the device can be asked to
//! stop only between batches; and the CPU, which can be stopped between layers, keeps its
//! layers short.
//!
//! [`Backend::max_batch`]: crate::backend::Backend::max_batch
//! [`Backend::overlaps_preparation`]: crate::backend::Backend::overlaps_preparation

use std::time::Duration;

/// The first batch of a ramp (or the cap, if smaller).
pub const FIRST_BATCH: usize = 8;
/// The relative throughput gain a doubling must bring for the ramp to go on.
pub const MIN_GAIN: f64 = 0.03;

/// Batch sizes for one worker of one job.
#[derive(Debug, Clone)]
pub struct BatchSizer {
    cap: usize,
    /// The longest a batch should take, if bounded.
    max_duration: Option<Duration>,
    /// The most nonces the last measured throughput computes within `max_duration` (the cap
    /// until a batch is measured).
    time_cap: usize,
    phase: Phase,
    /// Throughput (nonces/s) of each size measured while ramping, in the order measured.
    measured: Vec<(usize, f64)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Every batch at the cap.
    Fixed,
    /// Doubling: the size the next batch gets.
    Ramping { next: usize },
    /// At the best size measured.
    Settled(usize),
}

impl BatchSizer {
    /// `requested`: the request's batch size (already clamped to the engine's memory bound);
    /// `device_max`: [`Backend::max_batch`](crate::backend::Backend::max_batch); `ramp`: whether
    /// to search for the size (devices that overlap preparation) or use the cap throughout.
    pub fn new(requested: usize, device_max: Option<usize>, ramp: bool) -> Self {
        let cap = device_max.map_or(requested, |m| requested.min(m)).max(1);
        let phase = if ramp {
            Phase::Ramping {
                next: cap.min(FIRST_BATCH),
            }
        } else {
            Phase::Fixed
        };
        BatchSizer {
            cap,
            max_duration: None,
            time_cap: cap,
            phase,
            measured: Vec::new(),
        }
    }

    /// Keep batches within `max` once one has been measured.
    pub fn with_max_duration(mut self, max: Duration) -> Self {
        self.max_duration = Some(max);
        self
    }

    /// The largest size this sizer will ever give.
    pub fn cap(&self) -> usize {
        self.cap
    }

    /// The largest size the duration bound allows now (the cap until a batch is measured).
    pub fn time_cap(&self) -> usize {
        self.time_cap
    }

    /// Whether the size is still being searched for.
    pub fn is_ramping(&self) -> bool {
        matches!(self.phase, Phase::Ramping { .. })
    }

    /// The size of the next batch (between 1 and the cap).
    pub fn next_size(&mut self) -> usize {
        let size = match self.phase {
            Phase::Fixed => self.cap,
            Phase::Settled(s) => s,
            Phase::Ramping { next } => {
                self.phase = Phase::Ramping {
                    next: next.saturating_mul(2).min(self.cap),
                };
                next
            }
        };
        size.min(self.time_cap)
    }

    /// Record that a batch of `size` (as [`BatchSizer::next_size`] gave it) computed `nonces`
    /// nonces in `device_time`. Its throughput bounds the next sizes by duration; a batch cut
    /// short (the end of a range) says nothing more about its size and is otherwise ignored.
    pub fn record(&mut self, size: usize, nonces: usize, device_time: Duration) {
        self.bound_duration(nonces, device_time);
        if matches!(self.phase, Phase::Fixed) || nonces < size || size == 0 {
            return;
        }
        let rate = nonces as f64 / device_time.as_secs_f64().max(1e-9);
        match self.phase {
            Phase::Fixed => {}
            Phase::Settled(s) => {
                // A batch of a larger size that was already prepared when the ramp stopped:
                // it is a measurement like the others.
                if size != s && !self.measured.iter().any(|&(m, _)| m == size) {
                    self.measured.push((size, rate));
                    self.phase = Phase::Settled(self.best());
                }
            }
            Phase::Ramping { .. } => {
                // The duration bound caps the ramp as the memory cap does.
                let limit = self.cap.min(self.time_cap);
                if self.measured.iter().any(|&(m, _)| m == size) {
                    // The cap again while its first measurement was on its way; at the
                    // duration bound for good, the ramp is over.
                    if size >= limit {
                        self.phase = Phase::Settled(self.best());
                    }
                    return;
                }
                let previous = self
                    .measured
                    .iter()
                    .rev()
                    .find(|&&(m, _)| m < size)
                    .map(|&(_, r)| r);
                self.measured.push((size, rate));
                let improved = previous.is_none_or(|p| rate > p * (1.0 + MIN_GAIN));
                if !improved || size >= limit {
                    self.phase = Phase::Settled(self.best());
                }
            }
        }
    }

    /// Bound the next sizes by what `nonces` in `device_time` says fits in the duration bound.
    /// The extrapolation is linear in the nonces, so it errs on the short side whenever a batch
    /// has a fixed cost (a ramp then creeps up to the bound from below).
    fn bound_duration(&mut self, nonces: usize, device_time: Duration) {
        let Some(max) = self.max_duration else { return };
        if nonces == 0 {
            return;
        }
        let per_nonce = device_time.as_secs_f64() / nonces as f64;
        let fits = if per_nonce > 0.0 {
            (max.as_secs_f64() / per_nonce).floor().min(self.cap as f64) as usize
        } else {
            self.cap
        };
        self.time_cap = fits.clamp(1, self.cap);
    }

    /// The measured size with the highest throughput (the smaller one on a tie).
    fn best(&self) -> usize {
        let mut best: Option<(usize, f64)> = None;
        for &(s, r) in &self.measured {
            match best {
                Some((bs, br)) if r < br || (r == br && s >= bs) => {}
                _ => best = Some((s, r)),
            }
        }
        best.map_or(self.cap.min(FIRST_BATCH), |(s, _)| s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_cut_to_the_duration_bound_once_measured() {
        // A CPU-like device: 0.5 s per nonce, asked for 32 per batch.
        let per = |n: usize| Duration::from_millis(500 * n as u64);
        let mut s = BatchSizer::new(32, None, false).with_max_duration(Duration::from_secs(2));
        assert_eq!(s.next_size(), 32, "nothing measured yet");
        s.record(32, 32, per(32));
        assert_eq!(s.time_cap(), 4);
        assert_eq!(run_lockstep(&mut s, per, 3), [4, 4, 4]);
        // Slower than the bound per nonce: one at a time, never none.
        s.record(4, 4, Duration::from_secs(40));
        assert_eq!(s.next_size(), 1);
        // Faster again: back up, never past the cap.
        s.record(1, 1, Duration::from_millis(1));
        assert_eq!(s.next_size(), 32);
        // Unbounded sizers ignore durations.
        let mut u = BatchSizer::new(32, None, false);
        u.record(32, 32, Duration::from_secs(3600));
        assert_eq!(u.next_size(), 32);
    }

    #[test]
    fn a_ramp_stops_at_the_duration_bound() {
        // 0.5 s to start plus 5 ms per nonce: throughput still gains 16% from 256 to 512,
        // but 2 s holds about 300 nonces.
        let slow = |n: usize| Duration::from_millis(500 + 5 * n as u64);
        let mut s = BatchSizer::new(4096, None, true).with_max_duration(Duration::from_secs(2));
        let sizes = run_pipelined(&mut s, slow, 12);
        assert!(!s.is_ramping(), "{sizes:?}");
        assert!(sizes.iter().all(|&n| n <= 512), "{sizes:?}");
        let settled = &sizes[sizes.len() - 4..];
        assert!(
            settled
                .iter()
                .all(|&n| (256..=300).contains(&n) && slow(n) <= Duration::from_secs(2)),
            "{sizes:?}"
        );
    }

    /// Device time of a batch of `n` nonces: a fixed launch cost plus a per-nonce cost that
    /// falls as the device fills up (throughput saturates at `peak` nonces/s).
    fn saturating(n: usize) -> Duration {
        let peak = 10_000.0;
        let launch = 0.004;
        Duration::from_secs_f64(launch + n as f64 / peak)
    }

    /// Throughput rises until 64 and collapses above (memory pressure).
    fn dropping(n: usize) -> Duration {
        let rate = if n <= 64 {
            1000.0 * n as f64
        } else {
            64_000.0 / 4.0
        };
        Duration::from_secs_f64(n as f64 / rate)
    }

    /// Ask and record in lockstep (no batch in flight while the next is sized).
    fn run_lockstep(s: &mut BatchSizer, time: impl Fn(usize) -> Duration, n: usize) -> Vec<usize> {
        (0..n)
            .map(|_| {
                let b = s.next_size();
                s.record(b, b, time(b));
                b
            })
            .collect()
    }

    /// As a worker that overlaps preparation asks: the size of batch N+1 before batch N is
    /// measured.
    fn run_pipelined(s: &mut BatchSizer, time: impl Fn(usize) -> Duration, n: usize) -> Vec<usize> {
        let mut sizes = Vec::new();
        let mut in_flight = s.next_size();
        for _ in 0..n {
            let next = s.next_size();
            s.record(in_flight, in_flight, time(in_flight));
            sizes.push(in_flight);
            in_flight = next;
        }
        sizes
    }

    #[test]
    fn without_ramp_it_is_always_the_cap() {
        let mut s = BatchSizer::new(100, None, false);
        assert!(!s.is_ramping());
        assert_eq!(run_lockstep(&mut s, saturating, 5), vec![100; 5]);
        let mut s = BatchSizer::new(100, Some(30), false);
        assert_eq!(s.cap(), 30);
        assert_eq!(run_lockstep(&mut s, saturating, 3), vec![30; 3]);
        let mut s = BatchSizer::new(0, Some(0), false);
        assert_eq!(s.next_size(), 1);
    }

    #[test]
    fn a_saturating_curve_ramps_until_the_gain_is_small() {
        // Throughput n / (0.004 + n/10000): 8 -> 1667, 16 -> 2857, 32 -> 4444, 64 -> 6154,
        // 128 -> 7619, 256 -> 8649, 512 -> 9275, 1024 -> 9624 (+3.8%), 2048 -> 9808 (+1.9%).
        let mut s = BatchSizer::new(100_000, None, true);
        assert!(s.is_ramping());
        let sizes = run_lockstep(&mut s, saturating, 14);
        assert_eq!(
            sizes,
            [8, 16, 32, 64, 128, 256, 512, 1024, 2048, 2048, 2048, 2048, 2048, 2048]
        );
        assert!(!s.is_ramping());
    }

    #[test]
    fn pipelined_ramps_overshoot_by_one_size_at_most() {
        let mut s = BatchSizer::new(100_000, None, true);
        let sizes = run_pipelined(&mut s, saturating, 14);
        // 2048 stops the ramp while 4096 is already prepared, and the batch after it is sized
        // (2048, the best so far) before 4096 is measured; 4096 turns out best and stays.
        assert_eq!(
            sizes,
            [8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 2048, 4096, 4096, 4096]
        );
    }

    #[test]
    fn a_dropping_curve_settles_at_its_peak() {
        let mut s = BatchSizer::new(1 << 20, None, true);
        let sizes = run_lockstep(&mut s, dropping, 10);
        assert_eq!(sizes, [8, 16, 32, 64, 128, 64, 64, 64, 64, 64]);

        let mut s = BatchSizer::new(1 << 20, None, true);
        let sizes = run_pipelined(&mut s, dropping, 10);
        // 128 is measured (and found worse) while 256 is on its way; 256 is worse still.
        assert_eq!(sizes, [8, 16, 32, 64, 128, 256, 64, 64, 64, 64]);
    }

    #[test]
    fn the_cap_is_never_passed() {
        // The request's cap, smaller than where the curve saturates.
        let mut s = BatchSizer::new(100, None, true);
        let sizes = run_lockstep(&mut s, saturating, 8);
        assert_eq!(sizes, [8, 16, 32, 64, 100, 100, 100, 100]);
        let mut s = BatchSizer::new(100, None, true);
        let sizes = run_pipelined(&mut s, saturating, 8);
        assert_eq!(sizes, [8, 16, 32, 64, 100, 100, 100, 100]);

        // The device's memory cap below the request's.
        let mut s = BatchSizer::new(1000, Some(40), true);
        assert_eq!(s.cap(), 40);
        let sizes = run_pipelined(&mut s, saturating, 6);
        assert_eq!(sizes, [8, 16, 32, 40, 40, 40]);
        assert!(!s.is_ramping());

        // A cap below the first batch.
        let mut s = BatchSizer::new(5, None, true);
        assert_eq!(run_lockstep(&mut s, saturating, 3), [5, 5, 5]);
        assert!(!s.is_ramping());
    }

    #[test]
    fn cap_one() {
        for ramp in [false, true] {
            let mut s = BatchSizer::new(1, None, ramp);
            assert_eq!(run_lockstep(&mut s, saturating, 4), [1, 1, 1, 1]);
            let mut s = BatchSizer::new(64, Some(1), ramp);
            assert_eq!(run_pipelined(&mut s, dropping, 4), [1, 1, 1, 1]);
        }
    }

    #[test]
    fn short_batches_and_flat_curves() {
        // A batch cut short by the end of a range does not count.
        let mut s = BatchSizer::new(1000, None, true);
        assert_eq!(s.next_size(), 8);
        s.record(8, 3, Duration::from_secs(1));
        assert!(s.is_ramping());
        assert_eq!(s.next_size(), 16);

        // A flat curve (no gain from doubling) stays at the first size.
        let flat = |n: usize| Duration::from_secs_f64(n as f64 / 500.0);
        let mut s = BatchSizer::new(1000, None, true);
        assert_eq!(run_lockstep(&mut s, flat, 5), [8, 16, 8, 8, 8]);

        // A gain of 3% or less stops the ramp; more goes on.
        let mut s = BatchSizer::new(1000, None, true);
        s.next_size();
        s.record(8, 8, Duration::from_millis(100));
        s.next_size();
        s.record(16, 16, Duration::from_secs_f64(0.2 / 1.029));
        assert!(!s.is_ramping());
        assert_eq!(s.next_size(), 16);
        let mut s = BatchSizer::new(1000, None, true);
        s.next_size();
        s.record(8, 8, Duration::from_millis(100));
        s.next_size();
        s.record(16, 16, Duration::from_secs_f64(0.2 / 1.04));
        assert!(s.is_ramping());
        assert_eq!(s.next_size(), 32);

        // A zero device time does not divide by zero.
        let mut s = BatchSizer::new(16, None, true);
        assert_eq!(run_lockstep(&mut s, |_| Duration::ZERO, 3), [8, 16, 16]);
    }
}
