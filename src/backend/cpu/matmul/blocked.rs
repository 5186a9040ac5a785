//! The driver of the register-blocked kernels (scalar, AVX2, AVX-512, AVX512_BF16): cache
//! blocking, packing of the left-hand side, tasks for the threads, edges and the rounding of
//! the outputs. A kernel only computes one block of `MR` rows by one panel of 32 columns over
//! a stretch of `k`.
//!
//! Loop nest of one task (a range of rows by a range of panels), the classic one for
//! register-blocked products: for each stretch of `KC_STEPS` steps of `k`, the task's rows are
//! packed once (`MR`-row micro-panels, step-major, so that a kernel reads them sequentially),
//! then for each panel (its stretch is streamed from L2 by every block) every micro-panel is
//! multiplied. An output is accumulated across the stretches in
//! `dst` itself (stored and reloaded as f32, which changes nothing), and rounded to the model
//! dtype by the kernel as it stores the last stretch.

use super::pack::PANEL;
use crate::pow::dtype::{Dtype, Rounding};
use rayon::prelude::*;
use std::cell::RefCell;

/// Most rows per task (more tasks than threads matter more than the size of the block).
const MC_MAX: usize = 256;
/// Tasks per thread aimed at, so that uneven tasks and a busy core even out.
const TASKS_PER_THREAD: usize = 4;

/// One register-blocked kernel.
pub(super) trait BlockKernel: Sync {
    /// Stored weight element: f32 or a 16-bit pattern.
    type B: Copy + Sync;
    /// Rows of one block.
    const MR: usize;
    /// Inputs per step: 1 (an FMA per output per input) or 2 (a bf16 pair per lane).
    const K_STEP: usize;
    /// Steps per stretch of `k`.
    const KC_STEPS: usize;

    /// One step of one row of the packed left-hand side, from its inputs `lo` (input
    /// `K_STEP * s`) and `hi` (input `K_STEP * s + 1`, zero past `k`; unused when
    /// `K_STEP` is 1), as a 32-bit word: an f32, or a bf16 pair (low half `lo`).
    fn pack_a(lo: f32, hi: f32) -> u32;

    /// `c[r][j] (+)= sum over steps` for `r < out.rows`, `j < out.cols`, in the kernel's
    /// order, rounded to `out.round` when given (the last stretch of `k`).
    ///
    /// # Safety
    /// - `a` holds `steps * MR` packed words (step-major, `MR` rows per step);
    /// - `b` holds `steps * PANEL * K_STEP` weight values (the panel's stretch);
    /// - `out.c` is valid for reads and writes of `out.cols` values at `out.c + r * out.ldc`
    ///   for `r < out.rows`, and nothing else aliases those values during the call;
    /// - `out.rows <= MR`, `out.cols <= PANEL`;
    /// - the CPU has the kernel's instruction set (the caller checked `Features`).
    unsafe fn block(&self, steps: usize, a: *const u32, b: *const Self::B, out: &BlockOut);
}

/// Where a kernel's block goes.
pub(super) struct BlockOut {
    /// The block's first output.
    pub c: *mut f32,
    /// Distance between two rows of `c`.
    pub ldc: usize,
    /// Valid rows (at most `MR`) and columns (at most 32).
    pub rows: usize,
    pub cols: usize,
    /// Start from the values in `c` (a later stretch of `k`) instead of zero.
    pub accumulate: bool,
    /// Round to this dtype when storing (after the last stretch; `None` for f32 models).
    pub round: Option<Dtype>,
}

/// The operands of one product, checked by the caller (`super::linear`).
pub(super) struct Operands<'a, B> {
    pub x: &'a [f32],
    pub m: usize,
    pub x_row_stride: usize,
    pub k: usize,
    /// The packed panels, `panel_len` values each.
    pub w: &'a [B],
    pub panel_len: usize,
    pub n: usize,
}

/// How a product is cut into tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Plan {
    /// Rows per task (a multiple of the kernel's rows).
    pub rows_per_task: usize,
    /// Panels per task.
    pub panels_per_task: usize,
}

impl Plan {
    /// Enough tasks for every thread (`TASKS_PER_THREAD` each), cut along the rows first
    /// (each row block packs its inputs once), then along the panels (small `m`: the last
    /// layer and the output projection have one row per nonce).
    pub fn new(m: usize, panels: usize, mr: usize, threads: usize) -> Plan {
        let want = TASKS_PER_THREAD * threads.max(1);
        let mut row_blocks = m.div_ceil(MC_MAX).max(1);
        let mut groups = 1;
        if row_blocks < want {
            groups = want.div_ceil(row_blocks).min(panels.max(1));
        }
        if row_blocks * groups < want {
            row_blocks = want.div_ceil(groups).min(m.div_ceil(mr).max(1));
        }
        let rows_per_task = m.div_ceil(row_blocks).next_multiple_of(mr).max(mr);
        let panels_per_task = panels.div_ceil(groups).max(1);
        Plan {
            rows_per_task,
            panels_per_task,
        }
    }
}

/// `dst` shared by the tasks, each writing its own rows and columns.
#[derive(Clone, Copy)]
pub(super) struct SharedDst(*mut f32);

impl SharedDst {
    pub fn new(dst: &mut [f32]) -> Self {
        SharedDst(dst.as_mut_ptr())
    }

    /// The element `offset` of the destination.
    ///
    /// # Safety
    /// `offset` lies inside the destination slice this was made from.
    pub unsafe fn at(&self, offset: usize) -> *mut f32 {
        // SAFETY: the caller keeps the offset inside the destination.
        unsafe { self.0.add(offset) }
    }
}
// SAFETY: the tasks that receive copies of the pointer write disjoint (row range, column
// range) rectangles of the destination, so no element is touched by two threads; the
// destination outlives the parallel section (it is a borrow held by the caller).
unsafe impl Send for SharedDst {}
// SAFETY: as above: shared only to hand it to tasks with disjoint rectangles.
unsafe impl Sync for SharedDst {}

thread_local! {
    /// The packed left-hand side of the task running on this thread, kept across tasks.
    static PACKED_A: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
}

/// `dst[i][j] = round_T(sum_l x[i][l] w[j][l])` with the kernel `K`.
pub(super) fn run<K: BlockKernel, R: Rounding>(
    kernel: &K,
    dst: &mut [f32],
    op: Operands<'_, K::B>,
) {
    run_tasks::<K, R>(kernel, dst, op, None);
}

/// Rows of a block held on the stack by [`run_gated`].
const GATED_MR_MAX: usize = 16;

/// One product's block in [`run_gated`] (its rows at a stride of 32).
type GatedBlock = [f32; GATED_MR_MAX * PANEL];

/// Whether [`run_gated`] can compute a product of depth `k` with `K`: the whole of `k` must
/// fit in one stretch, so that each block is final when the kernel stores it.
pub(super) fn gated_fits<K: BlockKernel>(k: usize) -> bool {
    k.div_ceil(K::K_STEP) <= K::KC_STEPS && K::MR <= GATED_MR_MAX
}

/// The FFN's gated product in one pass: `dst = round_T(round_T(silu(g)) * u)` with
/// `g = round_T(x . gate^T)` and `u = round_T(x . up^T)`, block by block, exactly what
/// two products and [`crate::backend::cpu::silu_mul_vectorised`] give, without writing
/// `g` and `u` to memory. Both weights have the same shape and layout; [`gated_fits`] holds.
pub(super) fn run_gated<K: BlockKernel, R: Rounding>(
    kernel: &K,
    dst: &mut [f32],
    gate: Operands<'_, K::B>,
    up: &[K::B],
) {
    assert!(
        gated_fits::<K>(gate.k),
        "the gated product needs k within one stretch"
    );
    debug_assert!(up.len() == gate.w.len());
    run_tasks::<K, R>(kernel, dst, gate, Some(up));
}

fn run_tasks<K: BlockKernel, R: Rounding>(
    kernel: &K,
    dst: &mut [f32],
    op: Operands<'_, K::B>,
    up: Option<&[K::B]>,
) {
    let Operands {
        x,
        m,
        x_row_stride,
        k,
        w,
        panel_len,
        n,
    } = op;
    let panels = n.div_ceil(PANEL);
    let steps_total = k.div_ceil(K::K_STEP);
    debug_assert!(panel_len >= steps_total * PANEL * K::K_STEP);
    debug_assert!(w.len() >= panels * panel_len);
    debug_assert!(dst.len() >= m * n);
    let plan = Plan::new(m, panels, K::MR, rayon::current_num_threads());
    let row_blocks = m.div_ceil(plan.rows_per_task);
    let groups = panels.div_ceil(plan.panels_per_task);
    let out = SharedDst::new(dst);
    let round = (R::DTYPE != Dtype::F32).then_some(R::DTYPE);
    (0..row_blocks * groups).into_par_iter().for_each(|task| {
        let (rb, g) = (task / groups, task % groups);
        let rows = rb * plan.rows_per_task..m.min((rb + 1) * plan.rows_per_task);
        let panel_range = g * plan.panels_per_task..panels.min((g + 1) * plan.panels_per_task);
        let micro = rows.len().div_ceil(K::MR);
        // The gated product's two blocks, reused by every block of the task.
        let (mut gate_block, mut up_block) =
            ([0f32; GATED_MR_MAX * PANEL], [0f32; GATED_MR_MAX * PANEL]);
        PACKED_A.with(|cell| {
            let mut packed = cell.borrow_mut();
            let need = micro * K::KC_STEPS.min(steps_total) * K::MR;
            if packed.len() < need {
                packed.resize(need, 0);
            }
            let mut s0 = 0;
            while s0 < steps_total {
                let steps = K::KC_STEPS.min(steps_total - s0);
                let last = s0 + steps == steps_total;
                pack_rows::<K>(&mut packed, x, x_row_stride, k, rows.clone(), s0, steps);
                for p in panel_range.clone() {
                    let cols = PANEL.min(n - p * PANEL);
                    let b = &w[p * panel_len + s0 * PANEL * K::K_STEP..];
                    for mp in 0..micro {
                        let row0 = rows.start + mp * K::MR;
                        let here = K::MR.min(rows.end - row0);
                        let a = &packed[mp * steps * K::MR..];
                        // SAFETY: this task alone writes rows `rows` x columns of panels
                        // `panel_range` of dst (disjoint from every other task), and the
                        // block `row0..row0 + here` x `p * 32..p * 32 + cols` lies inside:
                        // row0 + here <= m, p * 32 + cols <= n, and dst.len() >= m * n.
                        // The packed A holds `steps * MR` words per micro-panel, the panel
                        // stretch `steps * 32 * K_STEP` values (panel_len covers every step).
                        // `linear` checked that the CPU has the kernel's instructions.
                        let c = unsafe { out.at(row0 * n + p * PANEL) };
                        match up {
                            None => {
                                let block = BlockOut {
                                    c,
                                    ldc: n,
                                    rows: here,
                                    cols,
                                    accumulate: s0 > 0,
                                    round: round.filter(|_| last),
                                };
                                // SAFETY: as above.
                                unsafe { kernel.block(steps, a.as_ptr(), b.as_ptr(), &block) };
                            }
                            Some(up) => {
                                let u = &up[p * panel_len..];
                                // SAFETY: as above; `gated_fits` made this stretch the
                                // whole of k (s0 = 0, last), and the two stack blocks hold
                                // GATED_MR_MAX >= MR rows of 32.
                                unsafe {
                                    gated_block::<K, R>(
                                        kernel,
                                        steps,
                                        a,
                                        b,
                                        u,
                                        c,
                                        n,
                                        here,
                                        cols,
                                        round,
                                        (&mut gate_block, &mut up_block),
                                    )
                                };
                            }
                        }
                    }
                }
                s0 += steps;
            }
        });
    });
}

/// One block of the gated product: the two products into stack blocks (rounded), combined,
/// the valid part written to `c`.
///
/// # Safety
/// As [`BlockKernel::block`] for `c` (rows `here`, columns `cols`, row stride `ldc`), with
/// `steps` the whole of k and `K::MR <= GATED_MR_MAX`.
#[allow(clippy::too_many_arguments)]
unsafe fn gated_block<K: BlockKernel, R: Rounding>(
    kernel: &K,
    steps: usize,
    a: &[u32],
    gate: &[K::B],
    up: &[K::B],
    c: *mut f32,
    ldc: usize,
    here: usize,
    cols: usize,
    round: Option<Dtype>,
    bufs: (&mut GatedBlock, &mut GatedBlock),
) {
    let (g, u) = bufs;
    for (w, buf) in [(gate, &mut *g), (up, &mut *u)] {
        let block = BlockOut {
            c: buf.as_mut_ptr(),
            ldc: PANEL,
            rows: K::MR,
            cols: PANEL,
            accumulate: false,
            round,
        };
        // SAFETY: the stack block holds GATED_MR_MAX >= MR rows of PANEL values and is
        // unaliased; the caller guarantees the rest of the kernel's contract.
        unsafe { kernel.block(steps, a.as_ptr(), w.as_ptr(), &block) };
    }
    crate::backend::cpu::silu_mul_vectorised_chunk::<R>(&mut g[..here * PANEL], &u[..here * PANEL]);
    for (r, row) in g.chunks_exact(PANEL).take(here).enumerate() {
        // SAFETY: the caller guarantees `cols` writable, unaliased values at c + r * ldc.
        let d = unsafe { std::slice::from_raw_parts_mut(c.add(r * ldc), cols) };
        d.copy_from_slice(&row[..cols]);
    }
}

/// Pack steps `s0..s0 + steps` of `rows` into `MR`-row micro-panels, step-major; rows past
/// the end and inputs past `k` are zeros.
fn pack_rows<K: BlockKernel>(
    packed: &mut [u32],
    x: &[f32],
    x_row_stride: usize,
    k: usize,
    rows: std::ops::Range<usize>,
    s0: usize,
    steps: usize,
) {
    let mr = K::MR;
    // Inputs of this stretch, and how many of its steps are whole (every input inside k).
    let l0 = s0 * K::K_STEP;
    let l_end = ((s0 + steps) * K::K_STEP).min(k);
    let whole = (l_end - l0) / K::K_STEP;
    for (mp, chunk) in packed
        .chunks_mut(steps * mr)
        .take(rows.len().div_ceil(mr))
        .enumerate()
    {
        for r in 0..mr {
            let row = rows.start + mp * mr + r;
            // One word per step at r of each MR-word group: a column of the micro-panel.
            let column = chunk.chunks_exact_mut(mr).map(move |step| &mut step[r]);
            if row >= rows.end {
                column.for_each(|w| *w = 0);
                continue;
            }
            let src = &x[row * x_row_stride + l0..row * x_row_stride + l_end];
            let mut column = column;
            for (w, inputs) in column.by_ref().zip(src.chunks_exact(K::K_STEP)).take(whole) {
                *w = K::pack_a(inputs[0], if K::K_STEP > 1 { inputs[1] } else { 0.0 });
            }
            // A last pair with one input inside k (K_STEP 2, odd k), then zeros.
            let rest = &src[whole * K::K_STEP..];
            for (i, w) in column.enumerate() {
                *w = match (i, rest) {
                    (0, [lo, ..]) => K::pack_a(*lo, 0.0),
                    _ => 0,
                };
            }
        }
    }
}

/// How a stored weight value widens to f32, for the portable kernel.
pub(super) trait Widen: Copy + Sync {
    fn widen(self) -> f32;
}

impl Widen for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

/// An f16 bit pattern.
#[derive(Clone, Copy)]
#[repr(transparent)]
pub(super) struct F16Bits(pub u16);

/// A bf16 bit pattern.
#[derive(Clone, Copy)]
#[repr(transparent)]
pub(super) struct Bf16Bits(pub u16);

impl Widen for F16Bits {
    #[inline(always)]
    fn widen(self) -> f32 {
        half::f16::from_bits(self.0).to_f32()
    }
}

impl Widen for Bf16Bits {
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits(u32::from(self.0) << 16)
    }
}

/// The portable kernel and the readable statement of what every FMA kernel computes: each
/// output is `acc = fma(x[l], w[l], acc)` for `l = 0, 1, ..., k - 1` in order, starting
/// from `acc = +0`, every step one f32 rounding (`f32::mul_add` is a fused multiply-add).
/// The vector kernels compute exactly these values, lane by lane.
pub(super) struct ScalarFma<E>(std::marker::PhantomData<E>);

impl<E> ScalarFma<E> {
    pub const fn new() -> Self {
        ScalarFma(std::marker::PhantomData)
    }
}

/// Rows of the portable kernel's block.
const SCALAR_MR: usize = 4;

impl<E: Widen> BlockKernel for ScalarFma<E> {
    type B = E;
    const MR: usize = SCALAR_MR;
    const K_STEP: usize = 1;
    const KC_STEPS: usize = 256;

    fn pack_a(lo: f32, _hi: f32) -> u32 {
        lo.to_bits()
    }

    unsafe fn block(&self, steps: usize, a: *const u32, b: *const E, out: &BlockOut) {
        // SAFETY: the caller guarantees `steps * MR` words at `a` and `steps * PANEL`
        // values at `b`.
        let (a, b) = unsafe {
            (
                std::slice::from_raw_parts(a, steps * SCALAR_MR),
                std::slice::from_raw_parts(b, steps * PANEL),
            )
        };
        let (rows, cols) = (out.rows, out.cols);
        let mut acc = [[0f32; PANEL]; SCALAR_MR];
        if out.accumulate {
            for (r, acc_r) in acc.iter_mut().enumerate().take(rows) {
                // SAFETY: row r < rows of the block is valid for `cols` reads.
                let row = unsafe { std::slice::from_raw_parts(out.c.add(r * out.ldc), cols) };
                acc_r[..cols].copy_from_slice(row);
            }
        }
        for (a_s, b_s) in a.chunks_exact(SCALAR_MR).zip(b.chunks_exact(PANEL)) {
            let wide: [f32; PANEL] = std::array::from_fn(|j| b_s[j].widen());
            for (acc_r, &a_r) in acc.iter_mut().zip(a_s) {
                let av = f32::from_bits(a_r);
                for (o, &bv) in acc_r.iter_mut().zip(&wide) {
                    *o = av.mul_add(bv, *o);
                }
            }
        }
        for (r, acc_r) in acc.iter().enumerate().take(rows) {
            // SAFETY: row r < rows of the block is valid for `cols` writes, unaliased.
            let row = unsafe { std::slice::from_raw_parts_mut(out.c.add(r * out.ldc), cols) };
            match out.round {
                Some(dtype) => {
                    for (o, &v) in row.iter_mut().zip(acc_r) {
                        *o = dtype.round(v);
                    }
                }
                None => row.copy_from_slice(&acc_r[..cols]),
            }
        }
    }
}

/// A software model of `vdpbf16ps` as a kernel of this driver (tests only): per lane and
/// input pair, the odd input first, then the even one, each an FMA with bf16 denormals read
/// as zero and denormal results flushed (Intel's SDM; the tests check the instruction
/// against the same statement). It runs the pair-step driver (packing of pairs, odd `k`)
/// where the instruction does not exist.
#[cfg(test)]
pub(super) struct DpBf16Model;

#[cfg(test)]
impl BlockKernel for DpBf16Model {
    type B = u16;
    const MR: usize = 5;
    const K_STEP: usize = 2;
    const KC_STEPS: usize = 96;

    fn pack_a(lo: f32, hi: f32) -> u32 {
        (lo.to_bits() >> 16) | (hi.to_bits() & 0xFFFF_0000)
    }

    unsafe fn block(&self, steps: usize, a: *const u32, b: *const u16, out: &BlockOut) {
        use super::amx_model::{bf16_daz, fma_daz_ftz};
        // SAFETY: the caller guarantees `steps * MR` words at `a` and `steps * 64` values
        // at `b` (a pair row is 32 columns x 2 values).
        let (a, b) = unsafe {
            (
                std::slice::from_raw_parts(a, steps * Self::MR),
                std::slice::from_raw_parts(b, steps * 2 * PANEL),
            )
        };
        for r in 0..out.rows {
            for j in 0..out.cols {
                // SAFETY: row r < rows and column j < cols of the block are valid.
                let c = unsafe { out.c.add(r * out.ldc + j) };
                // SAFETY: as above; read only when accumulating (initialised then).
                let mut acc = if out.accumulate { unsafe { *c } } else { 0.0 };
                for s in 0..steps {
                    let x = a[s * Self::MR + r];
                    let (w_lo, w_hi) = (b[s * 2 * PANEL + 2 * j], b[s * 2 * PANEL + 2 * j + 1]);
                    acc = fma_daz_ftz(bf16_daz((x >> 16) as u16), bf16_daz(w_hi), acc);
                    acc = fma_daz_ftz(bf16_daz(x as u16), bf16_daz(w_lo), acc);
                }
                let v = match out.round {
                    Some(dtype) => dtype.round(acc),
                    None => acc,
                };
                // SAFETY: as above.
                unsafe { *c = v };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_cover_every_thread() {
        // The forward's products on two threads.
        let p = Plan::new(2048, 32, 12, 2);
        assert_eq!(p.panels_per_task, 32);
        assert!(2048usize.div_ceil(p.rows_per_task) >= 8);
        assert_eq!(p.rows_per_task % 12, 0);
        // One row per nonce: split along the panels.
        let p = Plan::new(32, 256, 12, 2);
        assert_eq!(p.rows_per_task, 36);
        assert_eq!(256usize.div_ceil(p.panels_per_task), 8);
        // Tiny products: one task, nothing empty.
        let p = Plan::new(1, 1, 4, 16);
        assert_eq!((p.rows_per_task, p.panels_per_task), (4, 1));
        let p = Plan::new(5, 3, 4, 2);
        assert!(p.rows_per_task >= 4 && p.panels_per_task >= 1);
    }
}
