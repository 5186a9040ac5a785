//! Weights packed for the product kernels, in the model dtype.
//!
//! A weight is PyTorch's row-major `[n, k]` (`[out, in]`): output column `j` of a product is
//! the dot product of an input row with weight row `j`. The kernels read the weights as the
//! transposed right-hand side, 32 output columns at a time, so both layouts cut the columns
//! into panels of [`PANEL`] columns (the last one zero-padded) and store each panel
//! contiguously, in the order the kernels read it:
//!
//! - [`Layout::Rows`]: for each `k`, the panel's 32 values `w[j][k]`. The FMA kernels load
//!   them as two (AVX-512) or four (AVX2) vectors per `k`.
//! - [`Layout::Pairs`]: for each pair of inputs `(2p, 2p + 1)`, the panel's 32 pairs
//!   `(w[j][2p], w[j][2p + 1])` as adjacent 16-bit values: the "VNNI" pair layout that both
//!   `vdpbf16ps` (one pair per 32-bit lane) and AMX's B tiles (a tile row is 16 columns'
//!   pairs, 64 bytes) take. `k` is padded with zeros to a multiple of [`PAIRS_K_ALIGN`], one
//!   AMX tile's depth, so that every tile load stays inside the panel.
//!
//! 16-bit dtypes are stored as their bit patterns, f32 as f32; the values are the model's
//! (exactly representable in its dtype), so packing never rounds.

use crate::pow::dtype::Dtype;
use rayon::prelude::*;

/// Output columns per panel.
pub const PANEL: usize = 32;
/// `k` of a [`Layout::Pairs`] panel is a multiple of this (32 values: one AMX tile's depth).
pub const PAIRS_K_ALIGN: usize = 32;

/// How a packed weight is laid out (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Layout {
    Rows,
    Pairs,
}

/// The stored values.
#[derive(Debug, Clone)]
pub enum Storage {
    /// f32 models.
    F32(Vec<f32>),
    /// f16 or bf16 bit patterns.
    Bits16(Vec<u16>),
}

/// A `[n, k]` weight packed for the product kernels.
#[derive(Debug, Clone)]
pub struct PackedWeight {
    n: usize,
    k: usize,
    dtype: Dtype,
    layout: Layout,
    data: Storage,
}

/// Why a weight cannot be packed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PackError {
    #[error("a weight of shape [{n}, {k}] needs {need} values, got {got}")]
    Shape {
        n: usize,
        k: usize,
        need: usize,
        got: usize,
    },
    #[error("f32 weights have no pair layout (the pair kernels take 16-bit values)")]
    F32Pairs,
}

/// The 16-bit pattern of `v`, a value exactly representable in `dtype`.
#[inline]
pub fn bits16(v: f32, dtype: Dtype) -> u16 {
    match dtype {
        // Exact: v is an f16 value, so the conversion does not round.
        Dtype::F16 => half::f16::from_f32(v).to_bits(),
        // Exact: a bf16 value is an f32 whose low 16 bits are zero.
        Dtype::Bf16 => (v.to_bits() >> 16) as u16,
        Dtype::F32 => unreachable!("f32 weights are stored as f32"),
    }
}

/// The value of a 16-bit pattern of `dtype`.
#[inline]
pub fn from_bits16(b: u16, dtype: Dtype) -> f32 {
    match dtype {
        Dtype::F16 => half::f16::from_bits(b).to_f32(),
        Dtype::Bf16 => f32::from_bits(u32::from(b) << 16),
        Dtype::F32 => unreachable!("f32 weights are stored as f32"),
    }
}

impl PackedWeight {
    /// Pack the row-major `[n, k]` `values` (each exactly representable in `dtype`).
    pub fn pack(
        values: &[f32],
        n: usize,
        k: usize,
        dtype: Dtype,
        layout: Layout,
    ) -> Result<Self, PackError> {
        let need = n * k;
        if values.len() != need {
            return Err(PackError::Shape {
                n,
                k,
                need,
                got: values.len(),
            });
        }
        let panel_len = Self::panel_len_of(k, layout);
        let panels = n.div_ceil(PANEL);
        let data = match (dtype, layout) {
            (Dtype::F32, Layout::Pairs) => return Err(PackError::F32Pairs),
            (Dtype::F32, Layout::Rows) => {
                let mut data = vec![0f32; panels * panel_len];
                fill_panels(&mut data, panel_len, n, k, layout, |v| v, values);
                Storage::F32(data)
            }
            (_, _) => {
                let mut data = vec![0u16; panels * panel_len];
                fill_panels(
                    &mut data,
                    panel_len,
                    n,
                    k,
                    layout,
                    |v| bits16(v, dtype),
                    values,
                );
                Storage::Bits16(data)
            }
        };
        Ok(PackedWeight {
            n,
            k,
            dtype,
            layout,
            data,
        })
    }

    /// Stored values per panel.
    fn panel_len_of(k: usize, layout: Layout) -> usize {
        match layout {
            Layout::Rows => k * PANEL,
            Layout::Pairs => k.next_multiple_of(PAIRS_K_ALIGN) * PANEL,
        }
    }

    /// Output columns.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Inputs (the length of each weight row).
    pub fn k(&self) -> usize {
        self.k
    }

    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Panels of [`PANEL`] columns.
    pub fn panels(&self) -> usize {
        self.n.div_ceil(PANEL)
    }

    /// Stored values per panel.
    pub fn panel_len(&self) -> usize {
        Self::panel_len_of(self.k, self.layout)
    }

    /// `k` as stored: padded to [`PAIRS_K_ALIGN`] in the pair layout.
    pub fn k_stored(&self) -> usize {
        match self.layout {
            Layout::Rows => self.k,
            Layout::Pairs => self.k.next_multiple_of(PAIRS_K_ALIGN),
        }
    }

    pub fn storage(&self) -> &Storage {
        &self.data
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match &self.data {
            Storage::F32(v) => 4 * v.len(),
            Storage::Bits16(v) => 2 * v.len(),
        }
    }

    /// Where `w[row][col]` is stored.
    fn index(&self, row: usize, col: usize) -> usize {
        let (panel, j) = (row / PANEL, row % PANEL);
        let base = panel * self.panel_len();
        match self.layout {
            Layout::Rows => base + col * PANEL + j,
            Layout::Pairs => base + (col / 2) * 2 * PANEL + 2 * j + col % 2,
        }
    }

    /// `w[row][col]`, for tests and checks (the kernels read the panels directly).
    pub fn get(&self, row: usize, col: usize) -> f32 {
        assert!(row < self.n && col < self.k, "weight index out of range");
        let i = self.index(row, col);
        match &self.data {
            Storage::F32(v) => v[i],
            Storage::Bits16(v) => from_bits16(v[i], self.dtype),
        }
    }

    /// The row-major `[n, k]` values back.
    pub fn unpack(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.n * self.k);
        for row in 0..self.n {
            for col in 0..self.k {
                out.push(self.get(row, col));
            }
        }
        out
    }
}

/// Write every panel of `data` (zeroed, `panel_len` values each) from the row-major values.
fn fill_panels<T: Copy + Send>(
    data: &mut [T],
    panel_len: usize,
    n: usize,
    k: usize,
    layout: Layout,
    conv: impl Fn(f32) -> T + Sync,
    values: &[f32],
) {
    if panel_len == 0 {
        return;
    }
    data.par_chunks_mut(panel_len)
        .enumerate()
        .for_each(|(panel, out)| {
            let rows = (panel * PANEL)..(n.min((panel + 1) * PANEL));
            for (j, row) in rows.enumerate() {
                let src = &values[row * k..(row + 1) * k];
                match layout {
                    Layout::Rows => {
                        for (col, &v) in src.iter().enumerate() {
                            out[col * PANEL + j] = conv(v);
                        }
                    }
                    Layout::Pairs => {
                        for (col, &v) in src.iter().enumerate() {
                            out[(col / 2) * 2 * PANEL + 2 * j + col % 2] = conv(v);
                        }
                    }
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, k: usize, dtype: Dtype) -> Vec<f32> {
        (0..n * k)
            .map(|i| dtype.round(((i * 7919) % 1000) as f32 / 64.0 - 7.0))
            .collect()
    }

    #[test]
    fn packing_round_trips_in_every_layout() {
        for &(n, k) in &[(1, 1), (31, 3), (32, 32), (33, 1), (70, 45), (5, 64)] {
            for dtype in Dtype::ALL {
                for layout in [Layout::Rows, Layout::Pairs] {
                    let v = values(n, k, dtype);
                    let p = PackedWeight::pack(&v, n, k, dtype, layout);
                    if dtype == Dtype::F32 && layout == Layout::Pairs {
                        assert_eq!(p.unwrap_err(), PackError::F32Pairs);
                        continue;
                    }
                    let p = p.unwrap();
                    assert_eq!(p.unpack(), v, "{n}x{k} {dtype} {layout:?}");
                    assert_eq!(p.panels(), n.div_ceil(32));
                    let padded = match layout {
                        Layout::Rows => k,
                        Layout::Pairs => k.next_multiple_of(32),
                    };
                    let per = if dtype == Dtype::F32 { 4 } else { 2 };
                    assert_eq!(p.bytes(), p.panels() * padded * 32 * per);
                }
            }
        }
    }

    #[test]
    fn the_pair_layout_is_the_vnni_one() {
        // w[j][c] = 8 j + c: small integers, exact in f16.
        let (n, k) = (33, 5);
        let v: Vec<f32> = (0..n * k).map(|i| ((i / k) * 8 + i % k) as f32).collect();
        let p = PackedWeight::pack(&v, n, k, Dtype::F16, Layout::Pairs).unwrap();
        let Storage::Bits16(d) = p.storage() else {
            panic!("16-bit")
        };
        let val = |i: usize| from_bits16(d[i], Dtype::F16);
        // Panel 0, pair 1 (inputs 2, 3): column 4's pair sits at 2 * 32 + 2 * 4.
        assert_eq!(val(64 + 8), (4 * 8 + 2) as f32);
        assert_eq!(val(64 + 9), (4 * 8 + 3) as f32);
        // Input 5 does not exist: its slot of pair 2 is zero padding, as are pairs 3..16.
        assert_eq!(val(2 * 64 + 1), 0.0);
        assert!(d[3 * 64..32 * 32].iter().all(|&b| b == 0));
        // Panel 1 holds column 32 only, the other 31 columns are zeros.
        let p1 = &d[32 * 32..];
        assert_eq!(from_bits16(p1[0], Dtype::F16), (32 * 8) as f32);
        assert!(p1[2..64].iter().all(|&b| b == 0));
        assert!(PackedWeight::pack(&v[1..], n, k, Dtype::F16, Layout::Rows).is_err());
    }
}
