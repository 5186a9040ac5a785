//! AMX products: f16 on TDPFP16PS, bf16 on TDPBF16PS.
//!
//! The driver ([`run`]) is generic over a tiny tile-instruction layer, [`TileUnit`]: tile
//! configuration, zero, load, store, the dot product and release, exactly the instructions
//! it executes. [`AsmTiles`] executes them (inline assembly: Rust has no stable AMX
//! intrinsics); the tests' software model (`amx_model.rs`) computes what Intel's SDM says
//! they compute. The tiling, the packing, the configuration and the edges are therefore
//! tested on any machine through the model, and the assembly layer itself against the model
//! wherever AMX is present.
//!
//! Tiling: palette 1, all eight tiles 16 rows x 64 bytes. C is a 32 x 32 block of f32 in
//! tiles 0-3 (rows 0-15 / 16-31 by columns 0-15 / 16-31); A is two 16-row tiles (4, 5) of
//! 32 consecutive inputs of a row each (16-bit pairs, as the instruction reads them); B is
//! two tiles (6, 7) of 16 input pairs x 16 columns, read straight from the packed weights'
//! pair layout (a panel's pair row is 128 bytes: columns 0-15, then 16-31). One step of the
//! inner loop is four tile loads and four dot products over 32 inputs. A task (a block of
//! 32 rows by a range of panels) converts its rows of `x` to 16-bit once, zero-padded to 32
//! rows and to the panels' padded `k`, keeps C in the tiles for the whole of `k`, then
//! stores C to a staging block and writes the valid rows and columns rounded to the dtype.

use super::blocked::SharedDst;
use super::pack::{bits16, PAIRS_K_ALIGN, PANEL};
use super::Features;
use crate::pow::dtype::{Dtype, Rounding};
use rayon::prelude::*;
use std::cell::RefCell;

/// Rows and bytes per row of every tile (the largest palette-1 tile).
pub(super) const TILE_ROWS: usize = 16;
pub(super) const TILE_COLSB: usize = 64;
/// Rows of C per block: two A tiles.
const BLOCK_ROWS: usize = 2 * TILE_ROWS;
/// Inputs per dot product: a tile row of 16-bit values.
const TILE_K: usize = TILE_COLSB / 2;
/// Bytes between two input pairs of a panel (32 columns x 2 values x 2 bytes).
const PAIR_ROW_BYTES: usize = 2 * PANEL * 2;
/// Tasks per thread aimed at.
const TASKS_PER_THREAD: usize = 4;

// Tile registers of the driver.
const C00: u8 = 0;
const C01: u8 = 1;
const C10: u8 = 2;
const C11: u8 = 3;
const A0: u8 = 4;
const A1: u8 = 5;
const B0: u8 = 6;
const B1: u8 = 7;

/// The 64-byte operand of LDTILECFG (palette 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C, align(64))]
pub(super) struct TileConfig {
    pub palette: u8,
    pub start_row: u8,
    pub reserved: [u8; 14],
    /// Bytes per row of each tile (16 entries, 8 used).
    pub colsb: [u16; 16],
    /// Rows of each tile (16 entries, 8 used).
    pub rows: [u8; 16],
}

impl TileConfig {
    /// Palette 1 with tiles 0-7 at 16 rows x 64 bytes.
    pub fn full() -> Self {
        let mut colsb = [0u16; 16];
        let mut rows = [0u8; 16];
        for t in 0..8 {
            colsb[t] = TILE_COLSB as u16;
            rows[t] = TILE_ROWS as u8;
        }
        TileConfig {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            colsb,
            rows,
        }
    }
}

/// Which dot product a unit's `dot` executes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TileOp {
    /// TDPBF16PS: bf16 pairs.
    Bf16,
    /// TDPFP16PS: f16 pairs.
    Fp16,
}

impl TileOp {
    pub fn dtype(self) -> Dtype {
        match self {
            TileOp::Bf16 => Dtype::Bf16,
            TileOp::Fp16 => Dtype::F16,
        }
    }
}

/// The tile instructions the driver executes. Tile numbers are constants, as they are in
/// the instructions' encodings.
///
/// # Safety
/// Implementations execute (or model) the named instruction with these operands and nothing
/// else. Callers keep the instructions' rules: `configure` before any other call on the
/// same thread, `load` / `store` only of memory valid for `TILE_ROWS` rows of `TILE_COLSB`
/// bytes at `base + row * stride`, `release` before the thread runs unrelated code.
pub(super) unsafe trait TileUnit {
    const OP: TileOp;
    /// LDTILECFG.
    unsafe fn configure(&mut self, cfg: &TileConfig);
    /// TILEZERO.
    unsafe fn zero<const T: u8>(&mut self);
    /// TILELOADD.
    unsafe fn load<const T: u8>(&mut self, base: *const u8, stride: usize);
    /// TILESTORED.
    unsafe fn store<const T: u8>(&mut self, base: *mut u8, stride: usize);
    /// TDPBF16PS or TDPFP16PS (by `OP`): `C += A . B`.
    unsafe fn dot<const C: u8, const A: u8, const B: u8>(&mut self);
    /// TILERELEASE.
    unsafe fn release(&mut self);
}

/// The tile instructions themselves, in inline assembly. `FP16` selects TDPFP16PS.
#[cfg(target_arch = "x86_64")]
pub(super) struct AsmTiles<const FP16: bool>;

/// TDPBF16PS tiles.
#[cfg(target_arch = "x86_64")]
pub(super) type AsmBf16 = AsmTiles<false>;
/// TDPFP16PS tiles.
#[cfg(target_arch = "x86_64")]
pub(super) type AsmFp16 = AsmTiles<true>;

// SAFETY: every method executes exactly the instruction it names on the given operands.
// The assembly touches only tile state and the memory it is given (loads read, stores
// write, through the pointer and stride received). The compiler never allocates tile
// registers, so nothing else lives in them; the blocks are volatile (the default), so they
// keep their order.
#[cfg(target_arch = "x86_64")]
unsafe impl<const FP16: bool> TileUnit for AsmTiles<FP16> {
    const OP: TileOp = if FP16 { TileOp::Fp16 } else { TileOp::Bf16 };

    #[inline(always)]
    unsafe fn configure(&mut self, cfg: &TileConfig) {
        // SAFETY: `cfg` is a valid 64-byte configuration (palette 1); the caller checked
        // that AMX is usable by this process.
        unsafe {
            std::arch::asm!("ldtilecfg [{cfg}]", cfg = in(reg) cfg as *const TileConfig,
                options(nostack, readonly, preserves_flags));
        }
    }

    #[inline(always)]
    unsafe fn zero<const T: u8>(&mut self) {
        // SAFETY: tiles are configured (caller's contract).
        unsafe {
            std::arch::asm!("tilezero tmm{t}", t = const T, options(nostack, nomem, preserves_flags));
        }
    }

    #[inline(always)]
    unsafe fn load<const T: u8>(&mut self, base: *const u8, stride: usize) {
        // SAFETY: the caller guarantees the 16 rows of 64 bytes at base + row * stride.
        unsafe {
            std::arch::asm!("tileloadd tmm{t}, [{base} + {stride} * 1]", t = const T,
                base = in(reg) base, stride = in(reg) stride,
                options(nostack, readonly, preserves_flags));
        }
    }

    #[inline(always)]
    unsafe fn store<const T: u8>(&mut self, base: *mut u8, stride: usize) {
        // SAFETY: the caller guarantees the 16 writable rows of 64 bytes.
        unsafe {
            std::arch::asm!("tilestored [{base} + {stride} * 1], tmm{t}", t = const T,
                base = in(reg) base, stride = in(reg) stride,
                options(nostack, preserves_flags));
        }
    }

    #[inline(always)]
    unsafe fn dot<const C: u8, const A: u8, const B: u8>(&mut self) {
        // SAFETY: tiles are configured with matching shapes (16 x 64 bytes everywhere).
        // Intel syntax: destination, then A (rows of pairs), then B (pair rows).
        unsafe {
            if FP16 {
                std::arch::asm!("tdpfp16ps tmm{c}, tmm{a}, tmm{b}", c = const C, a = const A,
                    b = const B, options(nostack, nomem, preserves_flags));
            } else {
                std::arch::asm!("tdpbf16ps tmm{c}, tmm{a}, tmm{b}", c = const C, a = const A,
                    b = const B, options(nostack, nomem, preserves_flags));
            }
        }
    }

    #[inline(always)]
    unsafe fn release(&mut self) {
        // SAFETY: returns the tile state to its initial (unused) state.
        unsafe {
            std::arch::asm!("tilerelease", options(nostack, nomem, preserves_flags));
        }
    }
}

/// The operands of one AMX product, checked by the caller (`super::linear`).
pub(super) struct Operands<'a> {
    pub x: &'a [f32],
    pub m: usize,
    pub x_row_stride: usize,
    pub k: usize,
    /// Pair-layout panels of 16-bit patterns, `panel_len` values each.
    pub w: &'a [u16],
    pub panel_len: usize,
    pub n: usize,
}

thread_local! {
    /// The 16-bit rows of the task running on this thread.
    static ROWS16: RefCell<Vec<u16>> = const { RefCell::new(Vec::new()) };
}

/// C staging block: 32 x 32 f32, 64-byte aligned rows for the tile stores.
#[repr(C, align(64))]
struct Staging([[f32; PANEL]; BLOCK_ROWS]);

/// `dst[i][j] = round_T(sum_l x[i][l] w[j][l])` on tiles; `new_unit` makes each task's unit.
pub(super) fn run<U: TileUnit, R: Rounding>(
    new_unit: impl Fn() -> U + Sync,
    dst: &mut [f32],
    op: Operands<'_>,
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
    let dtype = U::OP.dtype();
    debug_assert_eq!(R::DTYPE, dtype);
    let k_pad = k.next_multiple_of(PAIRS_K_ALIGN);
    debug_assert_eq!(panel_len, k_pad * PANEL);
    let panels = n.div_ceil(PANEL);
    debug_assert!(w.len() >= panels * panel_len);
    let row_blocks = m.div_ceil(BLOCK_ROWS);
    let want = TASKS_PER_THREAD * rayon::current_num_threads().max(1);
    let groups = want.div_ceil(row_blocks).clamp(1, panels.max(1));
    let per_group = panels.div_ceil(groups);
    let groups = panels.div_ceil(per_group);
    let out = SharedDst::new(dst);
    let wide = Features::host().avx512f;
    (0..row_blocks * groups).into_par_iter().for_each(|task| {
        let (rb, g) = (task / groups, task % groups);
        let row0 = rb * BLOCK_ROWS;
        let rows = BLOCK_ROWS.min(m - row0);
        let panel_range = g * per_group..panels.min((g + 1) * per_group);
        ROWS16.with(|cell| {
            let mut a16 = cell.borrow_mut();
            a16.clear();
            a16.resize(BLOCK_ROWS * k_pad, 0);
            for r in 0..rows {
                let src = &x[(row0 + r) * x_row_stride..(row0 + r) * x_row_stride + k];
                for (d, &v) in a16[r * k_pad..].iter_mut().zip(src) {
                    *d = bits16(v, dtype);
                }
            }
            let mut unit = new_unit();
            let mut staging = Staging([[0f32; PANEL]; BLOCK_ROWS]);
            let a_stride = 2 * k_pad;
            let a_base = a16.as_ptr().cast::<u8>();
            // SAFETY: (the tile calls and the copies below) the unit is configured first and
            // released last, on this thread. A tile loads rows r0..r0 + 16 of the 32-row block at
            // input kb * 32, 64 bytes each: inside `a16` (32 rows of k_pad values, k_pad a
            // multiple of 32). B tiles load 16 pair rows of 128 bytes from input pair
            // kb * 16 of panel p, the first 64 or the last 64 bytes: inside the panel
            // (k_pad / 2 pair rows). C stores write the 32 x 32 staging block, rows of 128
            // bytes. The caller checked that the CPU and OS allow AMX (or `U` is a model).
            unsafe {
                unit.configure(&TileConfig::full());
                for p in panel_range {
                    let panel = w.as_ptr().add(p * panel_len).cast::<u8>();
                    unit.zero::<C00>();
                    unit.zero::<C01>();
                    unit.zero::<C10>();
                    unit.zero::<C11>();
                    for kb in 0..k_pad / TILE_K {
                        let a_k = a_base.add(kb * TILE_K * 2);
                        unit.load::<A0>(a_k, a_stride);
                        unit.load::<A1>(a_k.add(TILE_ROWS * a_stride), a_stride);
                        let b_k = panel.add(kb * (TILE_K / 2) * PAIR_ROW_BYTES);
                        unit.load::<B0>(b_k, PAIR_ROW_BYTES);
                        unit.load::<B1>(b_k.add(TILE_COLSB), PAIR_ROW_BYTES);
                        unit.dot::<C00, A0, B0>();
                        unit.dot::<C01, A0, B1>();
                        unit.dot::<C10, A1, B0>();
                        unit.dot::<C11, A1, B1>();
                    }
                    let s = staging.0.as_mut_ptr().cast::<u8>();
                    let row_bytes = PANEL * 4;
                    unit.store::<C00>(s, row_bytes);
                    unit.store::<C01>(s.add(TILE_COLSB), row_bytes);
                    unit.store::<C10>(s.add(TILE_ROWS * row_bytes), row_bytes);
                    unit.store::<C11>(s.add(TILE_ROWS * row_bytes + TILE_COLSB), row_bytes);
                    let cols = PANEL.min(n - p * PANEL);
                    for (r, srow) in staging.0.iter().enumerate().take(rows) {
                        // This task alone writes rows row0..row0 + rows and the columns of
                        // its panels; row0 + r < m and p * 32 + cols <= n <= dst row length.
                        let d = out.at((row0 + r) * n + p * PANEL);
                        copy_rounded::<R>(srow, d, cols, wide);
                    }
                }
                unit.release();
            }
        });
    });
}

/// Write the first `cols` values of a staging row to `dst`, rounded to `R`'s dtype; with
/// AVX-512F when `wide` (every CPU with AMX has it), else one value at a time.
///
/// # Safety
/// `cols <= 32` values at `dst` are writable and unaliased; `wide` only if the CPU has
/// AVX-512F.
unsafe fn copy_rounded<R: Rounding>(src: &[f32; PANEL], dst: *mut f32, cols: usize, wide: bool) {
    #[cfg(target_arch = "x86_64")]
    if wide {
        let (lo, hi) = src.split_at(16);
        let (lo, hi): (&[f32; 16], &[f32; 16]) = (lo.try_into().unwrap(), hi.try_into().unwrap());
        // SAFETY: the caller guarantees `cols` writable values at dst and AVX-512F; each
        // call writes at most its own 16 of them (the second starts 16 further on, and only
        // when there are more than 16).
        unsafe {
            super::x86::store_rounded_x16(lo, dst, cols.min(16), R::DTYPE);
            if cols > 16 {
                super::x86::store_rounded_x16(hi, dst.add(16), cols - 16, R::DTYPE);
            }
        }
        return;
    }
    let _ = wide;
    // SAFETY: the caller guarantees `cols` writable, unaliased values at dst.
    let d = unsafe { std::slice::from_raw_parts_mut(dst, cols) };
    for (d, &v) in d.iter_mut().zip(src) {
        *d = R::round(v);
    }
}
