//! When a batch runs as a CUDA graph (`--cuda-graphs`, single-GPU groups).
//!
//! A graph replays the launch sequence of one batch size with the scratch buffers' addresses
//! baked in: one launch instead of a few thousand. [`GraphBook`] decides, per batch size,
//! what the next batch of that size does:
//!
//! - the first batch of a size runs directly: cuBLASLt builds its plans (a heuristic query
//!   per shape) and the driver loads kernels lazily, neither of which belongs in a capture;
//! - the next one is captured, then launched;
//! - every later one replays the graph;
//! - a size whose capture failed runs directly from then on (a fallback, logged once).
//!
//! A ramp of batch sizes (8, 16, 32, ...: each size once) therefore captures nothing; only a
//! size that comes back is captured, once. When the scratch buffers are reallocated (a larger
//! batch than they hold), the graphs hold stale addresses and are dropped, but the sizes stay
//! warmed: each is captured again at its next batch, not run directly first.
//!
//! Pure bookkeeping, tested without a GPU; the forward pass does what it says.

use crate::telemetry::{cuda_graph_counters, GraphCounters, GraphCounts};
use std::collections::{HashMap, HashSet};

/// One GPU group's graph counters, each event also added to the process's
/// ([`cuda_graph_counters`], what /metrics shows).
#[derive(Debug, Default)]
pub struct GroupGraphCounters(GraphCounters);

impl GroupGraphCounters {
    pub fn capture(&self) {
        self.0.capture();
        cuda_graph_counters().capture();
    }

    pub fn replay(&self) {
        self.0.replay();
        cuda_graph_counters().replay();
    }

    pub fn fallback(&self) {
        self.0.fallback();
        cuda_graph_counters().fallback();
    }

    pub fn dropped(&self, graphs: usize) {
        self.0.dropped(graphs);
        cuda_graph_counters().dropped(graphs);
    }

    /// This group's counts.
    pub fn snapshot(&self) -> GraphCounts {
        self.0.snapshot()
    }
}

/// What the next batch of a size does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GraphStep {
    /// Run the launch sequence directly (the size's first batch, or its capture failed).
    Direct,
    /// Capture the launch sequence into a graph, then launch it.
    Capture,
    /// Launch the graph captured earlier.
    Replay,
}

/// The graphs of one model's scratch buffers, and what each batch size has done so far.
#[derive(Debug)]
pub struct GraphBook<G> {
    /// Sizes that have run directly at least once (plans built, kernels loaded).
    warmed: HashSet<usize>,
    /// Sizes whose capture failed: they run directly for good.
    failed: HashSet<usize>,
    /// The graphs of the current scratch buffers.
    graphs: HashMap<usize, G>,
}

impl<G> Default for GraphBook<G> {
    fn default() -> Self {
        GraphBook {
            warmed: HashSet::new(),
            failed: HashSet::new(),
            graphs: HashMap::new(),
        }
    }
}

impl<G> GraphBook<G> {
    /// What the next batch of `batch` nonces does.
    pub fn step(&self, batch: usize) -> GraphStep {
        if self.graphs.contains_key(&batch) {
            GraphStep::Replay
        } else if self.failed.contains(&batch) || !self.warmed.contains(&batch) {
            GraphStep::Direct
        } else {
            GraphStep::Capture
        }
    }

    /// A batch of `batch` nonces ran directly.
    pub fn ran_direct(&mut self, batch: usize) {
        self.warmed.insert(batch);
    }

    /// The graph of `batch`, to replay.
    pub fn graph(&self, batch: usize) -> Option<&G> {
        self.graphs.get(&batch)
    }

    /// `batch`'s launch sequence was captured into `graph`.
    pub fn captured(&mut self, batch: usize, graph: G) {
        self.graphs.insert(batch, graph);
    }

    /// `batch`'s capture failed: it runs directly from now on.
    pub fn capture_failed(&mut self, batch: usize) {
        self.failed.insert(batch);
    }

    /// Whether `batch`'s capture failed before.
    pub fn has_failed(&self, batch: usize) -> bool {
        self.failed.contains(&batch)
    }

    /// The scratch buffers are about to be reallocated: drop the graphs (they hold the old
    /// addresses) and say how many there were. Warmed and failed sizes stay so.
    pub fn drop_graphs(&mut self) -> usize {
        let n = self.graphs.len();
        self.graphs.clear();
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GPU group as far as graphs go: scratch buffers that grow to the next power of two,
    /// and a capture that fails for the sizes in `uncapturable`.
    struct SimulatedGpu {
        capacity: usize,
        book: GraphBook<usize>,
        uncapturable: Vec<usize>,
        counters: GroupGraphCounters,
        /// Launch sequences queued directly, and graph launches.
        direct_runs: usize,
        graph_launches: usize,
    }

    impl SimulatedGpu {
        fn new(uncapturable: &[usize]) -> Self {
            SimulatedGpu {
                capacity: 0,
                book: GraphBook::default(),
                uncapturable: uncapturable.to_vec(),
                counters: GroupGraphCounters::default(),
                direct_runs: 0,
                graph_launches: 0,
            }
        }

        /// One batch, as forward.rs runs it.
        fn run(&mut self, batch: usize) {
            if batch > self.capacity {
                self.counters.dropped(self.book.drop_graphs());
                self.capacity = batch.next_power_of_two();
            }
            match self.book.step(batch) {
                GraphStep::Replay => {
                    assert_eq!(self.book.graph(batch), Some(&batch));
                    self.graph_launches += 1;
                    self.counters.replay();
                }
                GraphStep::Capture if self.uncapturable.contains(&batch) => {
                    self.book.capture_failed(batch);
                    self.direct_runs += 1;
                    self.counters.fallback();
                }
                GraphStep::Capture => {
                    self.book.captured(batch, batch);
                    self.graph_launches += 1;
                    self.counters.capture();
                }
                GraphStep::Direct => {
                    if self.book.has_failed(batch) {
                        self.counters.fallback();
                    }
                    self.book.ran_direct(batch);
                    self.direct_runs += 1;
                }
            }
        }
    }

    #[test]
    fn a_ramp_captures_nothing_and_the_settled_size_replays() {
        let mut g = SimulatedGpu::new(&[]);
        // The sizer's ramp, then the best size (64) for good, and the end of a range (37).
        for b in [8, 16, 32, 64, 128, 64, 64, 64, 64, 37] {
            g.run(b);
        }
        assert_eq!(
            g.counters.snapshot(),
            GraphCounts {
                captures: 1,
                replays: 3,
                fallbacks: 0,
                dropped: 0,
            }
        );
        // Every size's first batch ran directly, and only 64 came back.
        assert_eq!((g.direct_runs, g.graph_launches), (6, 4));
    }

    #[test]
    fn a_larger_batch_drops_the_graphs_and_warmed_sizes_capture_at_once() {
        let mut g = SimulatedGpu::new(&[]);
        for b in [8, 8, 8] {
            g.run(b);
        }
        assert_eq!(g.book.step(8), GraphStep::Replay);
        // A batch of 100 reallocates the scratch (capacity 8 -> 128): the graph of 8 goes.
        g.run(100);
        assert_eq!(g.counters.snapshot().dropped, 1);
        // 8 was warmed before: captured at its next batch, no direct run first.
        assert_eq!(g.book.step(8), GraphStep::Capture);
        g.run(8);
        g.run(8);
        let c = g.counters.snapshot();
        assert_eq!((c.captures, c.replays), (2, 2));
        // Within the new capacity nothing is dropped again.
        for b in [100, 100, 64, 64, 100] {
            g.run(b);
        }
        assert_eq!(g.counters.snapshot().dropped, 1);
    }

    #[test]
    fn a_failed_capture_falls_back_for_good_and_is_counted() {
        let mut g = SimulatedGpu::new(&[24]);
        for _ in 0..5 {
            g.run(24);
        }
        let c = g.counters.snapshot();
        assert_eq!((c.captures, c.replays), (0, 0));
        // The batch whose capture failed and the three after it.
        assert_eq!(c.fallbacks, 4);
        assert_eq!(g.direct_runs, 5);
        assert_eq!(g.book.step(24), GraphStep::Direct);
        // Other sizes still get graphs.
        for _ in 0..3 {
            g.run(16);
        }
        assert_eq!(g.counters.snapshot().replays, 1);
    }
}

#[test]
fn a_groups_counts_add_to_the_process_counts() {
    let group = GroupGraphCounters::default();
    let before = cuda_graph_counters().snapshot();
    group.capture();
    group.replay();
    group.dropped(2);
    let after = cuda_graph_counters().snapshot().since(before);
    // Other tests may count too (they run in parallel): at least ours.
    assert!(after.captures >= 1 && after.replays >= 1 && after.dropped >= 2);
    assert_eq!(
        group.snapshot(),
        GraphCounts {
            captures: 1,
            replays: 1,
            fallbacks: 0,
            dropped: 2
        }
    );
}
