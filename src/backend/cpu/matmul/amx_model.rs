//! A software model of the AMX tile instructions the driver executes, written from the
//! operation sections of Intel's SDM (LDTILECFG, TILEZERO, TILELOADD, TILESTORED,
//! TDPBF16PS, TDPFP16PS, TILERELEASE), so that the AMX driver runs, and is tested, on any
//! machine.
//!
//! The dot products, per the SDM:
//! - TDPBF16PS: for each row `m` of C, a temporary of `2 N` f32 (N = C's columns) starts at
//!   zero; for each pair `k` of A's row and each column `n`, lane `2n` accumulates
//!   `A[m][2k] * B[k][2n]` and lane `2n + 1` accumulates `A[m][2k+1] * B[k][2n+1]`, each an
//!   FMA with input denormals read as zero and denormal results flushed to zero, round to
//!   nearest even. Then `C[m][n] += temp[2n] + temp[2n + 1]` (the sum first), with the same
//!   denormal rules. So within one instruction the even and the odd inputs form two
//!   separate sums.
//! - TDPFP16PS: for each row `m`, `tmp = C[m]`; for each pair `k` and column `n`,
//!   `tmp[n] += A[m][2k] * B[k][2n]`, then `tmp[n] += A[m][2k+1] * B[k][2n+1]`, each an FMA
//!   rounded to nearest even; f16 input denormals are honoured, f32 denormal results are
//!   flushed to zero. (A product of two f16 values is exact in f32, so each step is one
//!   rounding of an exact sum.)
//!
//! The SDM notes that the hardware may order these operations differently from its
//! pseudocode; the model follows the pseudocode, and the assembly layer is compared with it
//! (within a bound, counting exact agreements) wherever AMX runs.

use super::amx::{TileConfig, TileOp, TileUnit, TILE_COLSB, TILE_ROWS};

/// Flush an f32 denormal to a zero of the same sign.
pub(super) fn ftz(x: f32) -> f32 {
    if x.is_subnormal() {
        0f32.copysign(x)
    } else {
        x
    }
}

/// A bf16 pattern as f32 with denormals read as zero.
pub(super) fn bf16_daz(b: u16) -> f32 {
    ftz(f32::from_bits(u32::from(b) << 16))
}

/// An f16 pattern as f32 (f16 denormals are normal f32 values).
pub(super) fn f16_value(b: u16) -> f32 {
    half::f16::from_bits(b).to_f32()
}

/// One FMA as the BF16 dot products do it: DAZ in, FTZ out, RNE.
pub(super) fn fma_daz_ftz(a: f32, b: f32, c: f32) -> f32 {
    ftz(ftz(a).mul_add(ftz(b), ftz(c)))
}

/// One addition with DAZ in, FTZ out.
pub(super) fn add_daz_ftz(a: f32, b: f32) -> f32 {
    ftz(ftz(a) + ftz(b))
}

/// The tile register file of one thread.
pub(super) struct TileModel<const FP16: bool> {
    cfg: Option<TileConfig>,
    tiles: Box<[[u8; TILE_ROWS * TILE_COLSB]; 8]>,
}

impl<const FP16: bool> TileModel<FP16> {
    pub fn new() -> Self {
        TileModel {
            cfg: None,
            tiles: Box::new([[0; TILE_ROWS * TILE_COLSB]; 8]),
        }
    }

    fn cfg(&self) -> &TileConfig {
        self.cfg
            .as_ref()
            .expect("a tile instruction before LDTILECFG raises #UD")
    }

    /// (rows, bytes per row) of tile `t`.
    fn shape(&self, t: u8) -> (usize, usize) {
        let c = self.cfg();
        let (rows, colsb) = (c.rows[t as usize] as usize, c.colsb[t as usize] as usize);
        assert!(
            rows > 0 && rows <= TILE_ROWS && colsb > 0 && colsb <= TILE_COLSB && colsb % 4 == 0,
            "tile {t} is not configured for use"
        );
        (rows, colsb)
    }

    fn u16_at(&self, t: u8, row: usize, i: usize) -> u16 {
        let o = row * TILE_COLSB + 2 * i;
        u16::from_le_bytes([self.tiles[t as usize][o], self.tiles[t as usize][o + 1]])
    }

    fn f32_at(&self, t: u8, row: usize, i: usize) -> f32 {
        let o = row * TILE_COLSB + 4 * i;
        let b = &self.tiles[t as usize][o..o + 4];
        f32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
}

// SAFETY: the model touches only its own state and, for loads and stores, exactly the
// rows x bytes-per-row the configuration gives the tile at base + row * stride, which the
// caller guarantees valid (the same contract as the instructions).
unsafe impl<const FP16: bool> TileUnit for TileModel<FP16> {
    const OP: TileOp = if FP16 { TileOp::Fp16 } else { TileOp::Bf16 };

    unsafe fn configure(&mut self, cfg: &TileConfig) {
        assert_eq!(cfg.palette, 1, "the model knows palette 1 only");
        assert_eq!(cfg.start_row, 0);
        // LDTILECFG zeroes every tile.
        self.cfg = Some(*cfg);
        self.tiles.iter_mut().for_each(|t| t.fill(0));
    }

    unsafe fn zero<const T: u8>(&mut self) {
        self.shape(T);
        self.tiles[T as usize].fill(0);
    }

    unsafe fn load<const T: u8>(&mut self, base: *const u8, stride: usize) {
        let (rows, colsb) = self.shape(T);
        let tile = &mut self.tiles[T as usize];
        tile.fill(0);
        for r in 0..rows {
            // SAFETY: the caller guarantees `colsb` readable bytes at base + r * stride
            // (colsb <= TILE_COLSB, the row's room in the tile).
            unsafe {
                std::ptr::copy_nonoverlapping(
                    base.add(r * stride),
                    tile.as_mut_ptr().add(r * TILE_COLSB),
                    colsb,
                );
            }
        }
    }

    unsafe fn store<const T: u8>(&mut self, base: *mut u8, stride: usize) {
        let (rows, colsb) = self.shape(T);
        let tile = &self.tiles[T as usize];
        for r in 0..rows {
            // SAFETY: the caller guarantees `colsb` writable bytes at base + r * stride,
            // which do not overlap the model's own tiles.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    tile.as_ptr().add(r * TILE_COLSB),
                    base.add(r * stride),
                    colsb,
                );
            }
        }
    }

    unsafe fn dot<const C: u8, const A: u8, const B: u8>(&mut self) {
        let (c_rows, c_colsb) = self.shape(C);
        let (a_rows, a_colsb) = self.shape(A);
        let (b_rows, b_colsb) = self.shape(B);
        // The shape checks of the SDM (#UD otherwise).
        assert!(C != A && C != B && A != B, "tile operands must differ");
        assert_eq!(c_rows, a_rows, "C and A rows");
        assert_eq!(c_colsb, b_colsb, "C and B columns");
        assert_eq!(a_colsb / 4, b_rows, "A pairs and B rows");
        let (n_cols, k_pairs) = (c_colsb / 4, a_colsb / 4);
        let mut out = [[0f32; TILE_COLSB / 4]; TILE_ROWS];
        for (m, out_m) in out.iter_mut().enumerate().take(c_rows) {
            if FP16 {
                let mut tmp: [f32; TILE_COLSB / 4] = std::array::from_fn(|n| {
                    if n < n_cols {
                        self.f32_at(C, m, n)
                    } else {
                        0.0
                    }
                });
                for k in 0..k_pairs {
                    let (a0, a1) = (
                        f16_value(self.u16_at(A, m, 2 * k)),
                        f16_value(self.u16_at(A, m, 2 * k + 1)),
                    );
                    for (n, t) in tmp.iter_mut().enumerate().take(n_cols) {
                        let (b0, b1) = (
                            f16_value(self.u16_at(B, k, 2 * n)),
                            f16_value(self.u16_at(B, k, 2 * n + 1)),
                        );
                        *t = ftz(a0.mul_add(b0, *t));
                        *t = ftz(a1.mul_add(b1, *t));
                    }
                }
                *out_m = tmp;
            } else {
                let mut temp = [0f32; TILE_COLSB / 2];
                for k in 0..k_pairs {
                    let (a0, a1) = (
                        bf16_daz(self.u16_at(A, m, 2 * k)),
                        bf16_daz(self.u16_at(A, m, 2 * k + 1)),
                    );
                    for n in 0..n_cols {
                        let (b0, b1) = (
                            bf16_daz(self.u16_at(B, k, 2 * n)),
                            bf16_daz(self.u16_at(B, k, 2 * n + 1)),
                        );
                        temp[2 * n] = fma_daz_ftz(a0, b0, temp[2 * n]);
                        temp[2 * n + 1] = fma_daz_ftz(a1, b1, temp[2 * n + 1]);
                    }
                }
                for (n, o) in out_m.iter_mut().enumerate().take(n_cols) {
                    let pair = add_daz_ftz(temp[2 * n], temp[2 * n + 1]);
                    *o = add_daz_ftz(self.f32_at(C, m, n), pair);
                }
            }
        }
        // write_row_and_zero / zero_upper_rows: the rest of the tile becomes zero.
        let tile = &mut self.tiles[C as usize];
        tile.fill(0);
        for (m, out_m) in out.iter().enumerate().take(c_rows) {
            for (n, v) in out_m.iter().enumerate().take(n_cols) {
                let o = m * TILE_COLSB + 4 * n;
                tile[o..o + 4].copy_from_slice(&v.to_le_bytes());
            }
        }
    }

    unsafe fn release(&mut self) {
        self.cfg = None;
        self.tiles.iter_mut().for_each(|t| t.fill(0));
    }
}
