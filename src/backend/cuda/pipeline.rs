//! How a batch crosses a GPU group whose layers are split into stages, one stage per GPU.
//!
//! The batch is cut into micro-batches ([`micro_batches`]) and the stages work on them as a
//! pipeline: while stage 1 computes micro-batch 0, stage 0 computes micro-batch 1, and so on,
//! so that a group of two GPUs is not half idle. Every operation goes to the stream of the
//! stage it belongs to and the host never waits between them: a stage learns that its
//! input is ready from an event the stage before it records ([`schedule`]):
//!
//! ```text
//! for each micro-batch m, for each stage s:
//!     s > 0:      Wait(s, m)     stream s waits for the event of (s - 1, m)
//!                 Receive(s, m)  the residual rows of m, from stage s - 1's buffer into s's
//!                 Compute(s, m)  s's layers on the rows of m (the first stage converts the
//!                                inputs first, the last one runs the head after)
//!     s < last:   Record(s, m)   the event of (s, m)
//! ```
//!
//! Each micro-batch has its own rows of each stage's residual buffer, so a stage never writes
//! rows the next stage is still receiving; the other scratch buffers of a stage are used by
//! its computes one after the other, in the order of its stream. The host queues everything
//! in the order above; a stage's stream runs its own operations in that order and waits only
//! where told to. When the last stage has finished its last micro-batch, every operation of
//! the batch on every stage has (each one comes before that one, through its stream or an
//! event), so the tail and the host's wait on the last stage close the batch.
//!
//! A group of one GPU computes the batch as one micro-batch: one Compute, nothing else.
//!
//! The schedule is pure and [`run`] plays it on any [`StageStreams`]: the GPU group's streams
//! (`forward.rs`), or the simulated group of the tests, which times every operation, checks
//! that no rows are read and written at once, and measures how much the stages overlap.

use std::ops::Range;

/// Micro-batches per stage of a group of several GPUs. With S stages and M micro-batches a
/// pipeline runs for M + S - 1 micro-batch steps instead of M * S: 4 per stage leaves the
/// pipeline empty for (S - 1) / (5S - 1) of the time (1/9 for two GPUs), while each
/// micro-batch keeps a quarter of the batch per stage's share of it (a batch of 64 nonces
/// on two GPUs: micro-batches of 8, 2,048 rows of V2's products). Not yet measured on GPUs.
pub const MICRO_BATCHES_PER_STAGE: usize = 4;

/// The micro-batches of `batch` nonces on a group of `n_stages` stages: one for a single
/// stage, else `MICRO_BATCHES_PER_STAGE * n_stages` (at most one per nonce), consecutive
/// and as equal as possible (the first ones one nonce larger).
pub fn micro_batches(batch: usize, n_stages: usize) -> Vec<Range<usize>> {
    if batch == 0 {
        return Vec::new();
    }
    let n = if n_stages <= 1 {
        1
    } else {
        (MICRO_BATCHES_PER_STAGE * n_stages).min(batch)
    };
    let (per, extra) = (batch / n, batch % n);
    let mut start = 0;
    (0..n)
        .map(|i| {
            let len = per + usize::from(i < extra);
            let r = start..start + len;
            start += len;
            r
        })
        .collect()
}

/// One operation of the schedule, queued on the stream of `stage` (see the module's
/// documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StageOp {
    /// Stream `stage` waits for the event stage `stage - 1` records after micro-batch `micro`.
    Wait { stage: usize, micro: usize },
    /// Stage `stage` receives micro-batch `micro`'s residual rows from stage `stage - 1`.
    Receive { stage: usize, micro: usize },
    /// Stage `stage` computes its layers on micro-batch `micro`.
    Compute { stage: usize, micro: usize },
    /// Stage `stage` records that it has finished micro-batch `micro`.
    Record { stage: usize, micro: usize },
}

/// The operations of `n_micro` micro-batches across `n_stages` stages, in the order the
/// host queues them.
pub fn schedule(n_stages: usize, n_micro: usize) -> Vec<StageOp> {
    let mut ops = Vec::with_capacity(n_micro * (4 * n_stages));
    for micro in 0..n_micro {
        for stage in 0..n_stages {
            if stage > 0 {
                ops.push(StageOp::Wait { stage, micro });
                ops.push(StageOp::Receive { stage, micro });
            }
            ops.push(StageOp::Compute { stage, micro });
            if stage + 1 < n_stages {
                ops.push(StageOp::Record { stage, micro });
            }
        }
    }
    ops
}

/// The streams of a group, as the schedule uses them.
pub trait StageStreams {
    type Error;
    fn wait(&mut self, stage: usize, micro: usize) -> Result<(), Self::Error>;
    fn receive(&mut self, stage: usize, micro: usize) -> Result<(), Self::Error>;
    fn compute(&mut self, stage: usize, micro: usize) -> Result<(), Self::Error>;
    fn record(&mut self, stage: usize, micro: usize) -> Result<(), Self::Error>;
}

/// Queue `ops` (a [`schedule`]) on `streams`.
pub fn run<S: StageStreams>(streams: &mut S, ops: &[StageOp]) -> Result<(), S::Error> {
    for &op in ops {
        match op {
            StageOp::Wait { stage, micro } => streams.wait(stage, micro)?,
            StageOp::Receive { stage, micro } => streams.receive(stage, micro)?,
            StageOp::Compute { stage, micro } => streams.compute(stage, micro)?,
            StageOp::Record { stage, micro } => streams.record(stage, micro)?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Which rows an operation touches: micro-batch `micro`'s rows of stage `stage`'s
    /// residual buffer, or (micro `None`) the stage's other scratch buffers, shared by all
    /// its micro-batches.
    type Rows = (usize, Option<usize>);

    #[derive(Debug, Clone, Copy)]
    struct Access {
        rows: Rows,
        writes: bool,
        start: f64,
        end: f64,
        op: StageOp,
    }

    /// A simulated group: each stream runs its operations in the order queued, one at a
    /// time, each taking a fixed time; a wait holds a stream until the event's time.
    struct SimulatedGroup {
        /// Time one stage takes to compute one micro-batch, and to receive one.
        compute: f64,
        copy: f64,
        /// When each stream is free again.
        free_at: Vec<f64>,
        /// When each recorded event fires.
        events: HashMap<(usize, usize), f64>,
        accesses: Vec<Access>,
        /// (start, end) of every operation that takes time.
        spans: HashMap<StageOp, (f64, f64)>,
    }

    impl SimulatedGroup {
        fn new(n_stages: usize, compute: f64, copy: f64) -> Self {
            SimulatedGroup {
                compute,
                copy,
                free_at: vec![0.0; n_stages],
                events: HashMap::new(),
                accesses: Vec::new(),
                spans: HashMap::new(),
            }
        }

        fn busy(&mut self, stage: usize, time: f64, op: StageOp, touches: &[(Rows, bool)]) {
            let start = self.free_at[stage];
            let end = start + time;
            self.free_at[stage] = end;
            self.spans.insert(op, (start, end));
            for &(rows, writes) in touches {
                self.accesses.push(Access {
                    rows,
                    writes,
                    start,
                    end,
                    op,
                });
            }
        }

        fn makespan(&self) -> f64 {
            self.free_at.iter().copied().fold(0.0, f64::max)
        }

        /// Two operations that touch the same rows, one of them writing, at the same time.
        fn races(&self) -> Vec<(StageOp, StageOp)> {
            let mut out = Vec::new();
            for (i, a) in self.accesses.iter().enumerate() {
                for b in &self.accesses[i + 1..] {
                    let overlap = a.start < b.end && b.start < a.end;
                    if a.rows == b.rows && (a.writes || b.writes) && overlap && a.op != b.op {
                        out.push((a.op, b.op));
                    }
                }
            }
            out
        }
    }

    impl StageStreams for SimulatedGroup {
        type Error = String;

        fn wait(&mut self, stage: usize, micro: usize) -> Result<(), String> {
            let at = self.events.get(&(stage - 1, micro)).ok_or_else(|| {
                format!(
                    "stage {stage} waits for ({}, {micro}), never recorded",
                    stage - 1
                )
            })?;
            self.free_at[stage] = self.free_at[stage].max(*at);
            Ok(())
        }

        fn receive(&mut self, stage: usize, micro: usize) -> Result<(), String> {
            let op = StageOp::Receive { stage, micro };
            let touches = [
                ((stage - 1, Some(micro)), false),
                ((stage, Some(micro)), true),
            ];
            self.busy(stage, self.copy, op, &touches);
            Ok(())
        }

        fn compute(&mut self, stage: usize, micro: usize) -> Result<(), String> {
            let op = StageOp::Compute { stage, micro };
            let touches = [((stage, Some(micro)), true), ((stage, None), true)];
            self.busy(stage, self.compute, op, &touches);
            Ok(())
        }

        fn record(&mut self, stage: usize, micro: usize) -> Result<(), String> {
            self.events.insert((stage, micro), self.free_at[stage]);
            Ok(())
        }
    }

    /// Play `ops` on a simulated group; the group and its makespan.
    fn simulate(n_stages: usize, ops: &[StageOp]) -> Result<SimulatedGroup, String> {
        let mut g = SimulatedGroup::new(n_stages, 1.0, 0.05);
        run(&mut g, ops)?;
        Ok(g)
    }

    #[test]
    fn micro_batches_cover_the_batch_in_order() {
        assert_eq!(micro_batches(10, 1), vec![0..10]);
        assert_eq!(micro_batches(0, 2), Vec::<Range<usize>>::new());
        assert_eq!(micro_batches(3, 2), vec![0..1, 1..2, 2..3]);
        for batch in [1usize, 7, 8, 9, 64, 100, 513] {
            for stages in [1usize, 2, 3, 4, 8] {
                let m = micro_batches(batch, stages);
                assert_eq!(
                    m.len(),
                    if stages == 1 {
                        1
                    } else {
                        batch.min(4 * stages)
                    }
                );
                assert_eq!(m[0].start, 0);
                assert_eq!(m.last().unwrap().end, batch);
                for w in m.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                    assert!(w[0].len() == w[1].len() || w[0].len() == w[1].len() + 1);
                }
            }
        }
    }

    #[test]
    fn one_gpu_computes_the_batch_in_one_step() {
        assert_eq!(
            schedule(1, 1),
            vec![StageOp::Compute { stage: 0, micro: 0 }]
        );
    }

    #[test]
    fn the_pipeline_respects_every_dependency_and_overlaps_the_stages() {
        for stages in [2usize, 3, 4, 8] {
            let micro = 4 * stages;
            let g = simulate(stages, &schedule(stages, micro)).unwrap();
            assert!(g.races().is_empty(), "{stages} stages: {:?}", g.races());
            // Each micro-batch goes through the stages in order: a stage receives it after
            // the stage before has computed it, and computes it after receiving it.
            for m in 0..micro {
                for s in 1..stages {
                    let before = g.spans[&StageOp::Compute {
                        stage: s - 1,
                        micro: m,
                    }];
                    let recv = g.spans[&StageOp::Receive { stage: s, micro: m }];
                    let comp = g.spans[&StageOp::Compute { stage: s, micro: m }];
                    assert!(recv.0 >= before.1 && comp.0 >= recv.1, "{s} {m}");
                }
            }
            // M + S - 1 steps (and the copies) instead of M * S: the stages overlap.
            let serial = (micro * stages) as f64;
            let ideal = (micro + stages - 1) as f64;
            let got = g.makespan();
            assert!(
                got >= ideal && got <= ideal + 0.05 * (micro + stages) as f64,
                "{got}"
            );
            assert!(got / serial < 0.6, "{stages} stages: {got} of {serial}");
            eprintln!("{stages} GPUs, {micro} micro-batches: {got:.2} steps, {serial} serially");
        }
    }

    #[test]
    fn the_simulation_catches_a_missing_wait() {
        // Without the waits a stage receives rows the stage before is still computing.
        let ops: Vec<StageOp> = schedule(2, 8)
            .into_iter()
            .filter(|op| !matches!(op, StageOp::Wait { .. }))
            .collect();
        let g = simulate(2, &ops).unwrap();
        assert!(!g.races().is_empty());
        // And a wait for an event nobody recorded is an error, not a hang.
        let ops: Vec<StageOp> = schedule(2, 2)
            .into_iter()
            .filter(|op| !matches!(op, StageOp::Record { .. }))
            .collect();
        assert!(simulate(2, &ops).is_err());
    }
}
