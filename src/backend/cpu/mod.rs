//! The forward pass on the CPU, faithful to the reference's rounding points.
//!
//! Every value is computed in f32 and rounded to the model dtype T exactly where the
//! reference materialises a tensor of dtype T; for f32 models that rounding is the identity.
//! The rounding points, in order:
//! - RMSNorm: `y = x * (1 / sqrt(mean(x^2) + eps))` in f32, rounded to T, then `y * weight`
//!   rounded to T.
//! - Linear layers: T inputs and weights, f32 accumulation, output rounded to T.
//! - RoPE: an f32 table of (cos, sin), each rounded to T; the rotation of each adjacent pair
//!   in f32, rounded to T.
//! - Attention: `q . k` rounded to T, divided by `sqrt(head_dim)` (f32) and rounded to T,
//!   causal softmax in f32, probabilities rounded to T, `probs . v` rounded to T.
//! - FFN: `silu(w1 x)` rounded to T, times `w3 x` rounded to T, then w2.
//! - Residual adds rounded to T; the logits are the output projection rounded to T.
//!
//! Matrix products go through [`matmul`] (our own kernels: AMX, AVX-512, AVX2 or scalar,
//! chosen from CPUID) on all rayon threads; all nonces and positions of a batch form one
//! product with `batch * seq_len` rows. The weights are held in the model dtype, packed for
//! the chosen kernel when the model is built ([`CpuModel`]). The last layer only
//! needs the keys and values of every position: its queries, attention output, FFN, the final
//! norm and the output projection run on the last position of each nonce only.
//!
//! The whole pass is generic over the rounding ([`Rounding`]), so that the f32 model pays
//! nothing for it and the f16 / bf16 roundings are branch-free arithmetic that the
//! compiler vectorises (they agree with [`Dtype::round`] on every input; see the tests).
//!
//! The functions here (`rmsnorm`, `attention`, `silu_mul`, `add_round`, `RopeTable::apply`)
//! are the readable statements, and the CUDA kernels are checked against them to the bit.
//! The forward pass uses faster forms where one is worth it, each tested against its
//! readable one: attention vectorised across keys (`attention.rs`, bit for bit); the
//! FFN's two products and SiLU-times fused block by block ([`matmul::linear_silu_mul`], bit
//! for bit with the three passes); SiLU with an exponential that vectorises (`math.rs`, the
//! last bit of `exp` differs from the C library's in about 1e-4 of inputs). The elementwise
//! loops run compiled for AVX-512 or AVX2 where the CPU has them (`simd.rs`), which changes
//! no value.

mod attention;
mod math;
pub mod matmul;
mod model;
mod simd;

pub use model::{CpuLayer, CpuModel, CpuWeights};

use super::batch::{self, BatchResult, JobSpec, PreparedBatch, StopToken};
use super::{downcast_model, Backend, BackendError, Model};
use crate::pow::dtype::{Dtype, RoundBf16, RoundF16, RoundF32, Rounding};
use crate::pow::params::Params;
use crate::pow::weights;
#[cfg(test)]
use crate::pow::weights::{LayerWeights, ModelWeights};
use matmul::{linear, Kernel};
use rayon::prelude::*;
use simd::wide_fn;
use std::sync::{Arc, Mutex, Weak};

/// Elements per rayon task in elementwise passes.
const ELEMWISE_CHUNK: usize = 1 << 14;

/// LLaMA-3.1 RoPE frequency scaling constants.
const ROPE_SCALE_FACTOR: f32 = 8.0;
const ROPE_LOW_FREQ_FACTOR: f32 = 1.0;
const ROPE_HIGH_FREQ_FACTOR: f32 = 4.0;
const ROPE_OLD_CONTEXT_LEN: f32 = 8192.0;

const GIB: f64 = (1u64 << 30) as f64;

#[inline(always)]
fn round_slice<R: Rounding>(xs: &mut [f32]) {
    for x in xs {
        *x = R::round(*x);
    }
}

// ---------------------------------------------------------------------------------------------
// RoPE

/// The rotary frequencies `1 / theta^(2j / head_dim)` for `j < head_dim / 2`, in f32 as the
/// reference computes them (the exponent is an f32 quotient, theta is cast to f32), with the
/// LLaMA-3.1 scaling applied when `scaled`.
pub fn rope_freqs(head_dim: usize, theta: f64, scaled: bool) -> Vec<f32> {
    let theta = theta as f32;
    (0..head_dim / 2)
        .map(|j| {
            let exponent = (2 * j) as f32 / head_dim as f32;
            let freq = 1.0f32 / theta.powf(exponent);
            if scaled {
                scale_rope_freq(freq)
            } else {
                freq
            }
        })
        .collect()
}

/// LLaMA-3.1 frequency scaling of one frequency, every operation in f32.
///
/// The reference runs this on 0-dim float32 tensors with Python scalars: a Python number
/// divided by a tensor is evaluated as `tensor.reciprocal() * number`, so the wavelength and
/// `old_context_len / wavelen` are a reciprocal followed by a product, not a division.
pub fn scale_rope_freq(freq: f32) -> f32 {
    let low_freq_wavelen = ROPE_OLD_CONTEXT_LEN / ROPE_LOW_FREQ_FACTOR;
    let high_freq_wavelen = ROPE_OLD_CONTEXT_LEN / ROPE_HIGH_FREQ_FACTOR;
    let two_pi = (2.0 * std::f64::consts::PI) as f32;
    let wavelen = (1.0f32 / freq) * two_pi;
    if wavelen < high_freq_wavelen {
        freq
    } else if wavelen > low_freq_wavelen {
        freq / ROPE_SCALE_FACTOR
    } else {
        let smooth = ((1.0f32 / wavelen) * ROPE_OLD_CONTEXT_LEN - ROPE_LOW_FREQ_FACTOR)
            / (ROPE_HIGH_FREQ_FACTOR - ROPE_LOW_FREQ_FACTOR);
        ((1.0 - smooth) * freq) / ROPE_SCALE_FACTOR + smooth * freq
    }
}

/// The (cos, sin) table for positions `0..seq_len`, `head_dim / 2` pairs per position, each
/// value rounded to the model dtype.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeTable {
    /// Pairs per position (`head_dim / 2`).
    pub half: usize,
    /// `cos[pos * half + j]`.
    pub cos: Vec<f32>,
    /// `sin[pos * half + j]`.
    pub sin: Vec<f32>,
}

impl RopeTable {
    /// The angle is `pos * freq` in f32. Its cosine and sine are taken in f32 through the
    /// platform's `cosf` / `sinf`, which is what the reference's `torch.polar` calls on the
    /// CPU: they are not always correctly rounded (about 0.4% of these angles differ in the
    /// last bit from a correctly rounded value), and for f32 models the table must agree with
    /// the reference's to the last bit.
    pub fn new(params: &Params, dtype: Dtype) -> Self {
        let hd = params.head_dim();
        let freqs = rope_freqs(hd, params.rope_theta, params.use_scaled_rope);
        let half = freqs.len();
        let n = params.seq_len_usize() * half;
        let mut cos = Vec::with_capacity(n);
        let mut sin = Vec::with_capacity(n);
        for pos in 0..params.seq_len_usize() {
            for &f in &freqs {
                let angle = pos as f32 * f;
                cos.push(dtype.round(angle.cos()));
                sin.push(dtype.round(angle.sin()));
            }
        }
        RopeTable { half, cos, sin }
    }

    /// Rotate every head of every row of `xs` (`row_width = n_heads * head_dim` values per
    /// row) in place. Row `r` sits at position `first_pos + r % rows_per_batch`.
    /// Public as a reference for the CUDA kernels (tests/kernel_emulation.rs).
    pub fn apply<R: Rounding>(
        &self,
        xs: &mut [f32],
        row_width: usize,
        rows_per_batch: usize,
        first_pos: usize,
    ) {
        let hd = 2 * self.half;
        xs.par_chunks_mut(row_width)
            .enumerate()
            .with_min_len(8)
            .for_each(|(r, row)| {
                let pos = first_pos + r % rows_per_batch;
                let cos = &self.cos[pos * self.half..(pos + 1) * self.half];
                let sin = &self.sin[pos * self.half..(pos + 1) * self.half];
                rope_row::<R>(row, hd, cos, sin)
            });
    }
}

wide_fn! {
    /// The rotation of every head of one row, compiled for the widest vectors.
    fn rope_row<R: Rounding>(row: &mut [f32], hd: usize, cos: &[f32], sin: &[f32]) {
        for head in row.chunks_exact_mut(hd) {
            for ((pair, &c), &s) in head.chunks_exact_mut(2).zip(cos).zip(sin) {
                let (x0, x1) = (pair[0], pair[1]);
                pair[0] = R::round(x0 * c - x1 * s);
                pair[1] = R::round(x1 * c + x0 * s);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Building blocks

/// Lanes of the reference's f32 vectors (its AVX2 kernels): they fix the order of its sums.
const REF_LANES: usize = 8;
/// Independent accumulators of the reference's row sums.
const REF_ILP: usize = 4;
/// Levels of the reference's cascade summation.
const REF_LEVELS: usize = 4;

fn ceil_log2(x: usize) -> u32 {
    if x <= 1 {
        0
    } else {
        usize::BITS - (x - 1).leading_zeros()
    }
}

/// `sum(x[i]^2)` in f32, added in the order of PyTorch's CPU sum of a contiguous f32 row
/// (the reduction inside `x.pow(2).mean(-1)`): `W`-lane vectors (W = 1 for rows shorter than
/// a vector) dealt round-robin to `REF_ILP` accumulators in a cascade of `REF_LEVELS`
/// levels, the left-over vectors into the first accumulator, the accumulators added up, then
/// the left-over scalars and finally the lanes, one by one. Matching the order rather than
/// just the precision makes f32 models agree with the reference to the last bit far more
/// often (in the golden v2_shaped_f32 case, 89% of the logits instead of 35%).
fn sum_squares_ref_order<const W: usize>(x: &[f32]) -> f32 {
    #[inline(always)]
    fn vadd<const W: usize>(a: &mut [f32; W], b: &[f32; W]) {
        for (a, b) in a.iter_mut().zip(b) {
            *a += b;
        }
    }
    let n_vec = x.len() / W;
    let load = |v: usize| -> [f32; W] { std::array::from_fn(|l| x[v * W + l] * x[v * W + l]) };
    let rows = n_vec / REF_ILP;
    let level_power = 4.max(ceil_log2(rows) / REF_LEVELS as u32);
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;
    let mut acc = [[[0f32; W]; REF_ILP]; REF_LEVELS];
    let add_row = |acc0: &mut [[f32; W]; REF_ILP], row: usize| {
        for (k, a) in acc0.iter_mut().enumerate() {
            vadd(a, &load(row * REF_ILP + k));
        }
    };
    let mut i = 0;
    while i + level_step <= rows {
        for _ in 0..level_step {
            add_row(&mut acc[0], i);
            i += 1;
        }
        for j in 1..REF_LEVELS {
            let (lower, upper) = acc.split_at_mut(j);
            for (hi, lo) in upper[0].iter_mut().zip(lower[j - 1].iter_mut()) {
                vadd(hi, lo);
                *lo = [0.0; W];
            }
            if i & (level_mask << (j as u32 * level_power)) != 0 {
                break;
            }
        }
    }
    while i < rows {
        add_row(&mut acc[0], i);
        i += 1;
    }
    let mut part = acc[0];
    for lvl in &acc[1..] {
        for (p, a) in part.iter_mut().zip(lvl) {
            vadd(p, a);
        }
    }
    for v in rows * REF_ILP..n_vec {
        vadd(&mut part[0], &load(v));
    }
    let (first, rest) = part.split_at_mut(1);
    for p in rest.iter() {
        vadd(&mut first[0], p);
    }
    let mut total = 0f32;
    for &v in &x[n_vec * W..] {
        total += v * v;
    }
    for &p in &first[0] {
        total += p;
    }
    total
}

/// The reference's `sum(x^2)` of one row (see [`sum_squares_ref_order`]).
fn sum_squares(x: &[f32]) -> f32 {
    if x.len() >= REF_LANES {
        sum_squares_ref_order::<REF_LANES>(x)
    } else {
        sum_squares_ref_order::<1>(x)
    }
}

/// RMSNorm of each `dim`-wide row of `x` into `out`: the mean of the squares is their f32
/// sum (in the reference's order) divided by `dim` in f32.
/// Public as a reference for the CUDA kernels (tests/kernel_emulation.rs).
pub fn rmsnorm<R: Rounding>(x: &[f32], weight: &[f32], out: &mut [f32], dim: usize, eps: f32) {
    let rows_per_task = (ELEMWISE_CHUNK / dim).max(1);
    out.par_chunks_mut(dim * rows_per_task)
        .zip(x.par_chunks(dim * rows_per_task))
        .for_each(|(out, x)| rmsnorm_rows::<R>(x, weight, out, dim, eps));
}

wide_fn! {
    /// RMSNorm of whole rows, compiled for the widest vectors.
    fn rmsnorm_rows<R: Rounding>(x: &[f32], weight: &[f32], out: &mut [f32], dim: usize, eps: f32) {
        for (o, xr) in out.chunks_exact_mut(dim).zip(x.chunks_exact(dim)) {
            let ms = sum_squares(xr) / dim as f32;
            let inv = 1.0f32 / (ms + eps).sqrt();
            for ((o, &v), &w) in o.iter_mut().zip(xr).zip(weight) {
                *o = R::round(R::round(v * inv) * w);
            }
        }
    }
}

/// `x = round_T(x + y)`.
/// Public as a reference for the CUDA kernels (tests/kernel_emulation.rs).
pub fn add_round<R: Rounding>(x: &mut [f32], y: &[f32]) {
    x.par_chunks_mut(ELEMWISE_CHUNK)
        .zip(y.par_chunks(ELEMWISE_CHUNK))
        .for_each(|(x, y)| add_round_chunk::<R>(x, y));
}

wide_fn! {
    /// `x = round_T(x + y)` on one chunk, compiled for the widest vectors.
    fn add_round_chunk<R: Rounding>(x: &mut [f32], y: &[f32]) {
        for (a, &b) in x.iter_mut().zip(y) {
            *a = R::round(*a + b);
        }
    }
}

/// `a = round_T(round_T(silu(a)) * b)`, silu(a) = a / (1 + exp(-a)) in f32.
/// Public as a reference for the CUDA kernels (tests/kernel_emulation.rs).
pub fn silu_mul<R: Rounding>(a: &mut [f32], b: &[f32]) {
    a.par_chunks_mut(ELEMWISE_CHUNK)
        .zip(b.par_chunks(ELEMWISE_CHUNK))
        .for_each(|(a, b)| silu_mul_chunk::<R>(a, b));
}

wide_fn! {
    /// [`silu_mul`] on one chunk, compiled for the widest vectors.
    fn silu_mul_chunk<R: Rounding>(a: &mut [f32], b: &[f32]) {
        for (x, &y) in a.iter_mut().zip(b) {
            let s = R::round(*x / (1.0 + (-*x).exp()));
            *x = R::round(s * y);
        }
    }
}

/// [`silu_mul`] with [`math::exp_f32`] for the exponential, so that the whole loop runs in
/// vector lanes; what the forward pass uses. The same rounding points; the exponential
/// differs from the C library's `expf` in the last bit for about one input in ten thousand
/// (the reference's own vectorised `expf` is not the C library's either).
pub(crate) fn silu_mul_vectorised<R: Rounding>(a: &mut [f32], b: &[f32]) {
    a.par_chunks_mut(ELEMWISE_CHUNK)
        .zip(b.par_chunks(ELEMWISE_CHUNK))
        .for_each(|(a, b)| silu_mul_vectorised_chunk::<R>(a, b));
}

wide_fn! {
    /// [`silu_mul_vectorised`] on one chunk.
    pub(crate) fn silu_mul_vectorised_chunk<R: Rounding>(a: &mut [f32], b: &[f32]) {
        for (x, &y) in a.iter_mut().zip(b) {
            let s = R::round(*x / (1.0 + math::exp_f32(-*x)));
            *x = R::round(s * y);
        }
    }
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Shapes of one attention call.
/// Public as a reference for the CUDA kernels (tests/kernel_emulation.rs).
#[derive(Clone, Copy)]
pub struct AttnShape {
    /// Positions per nonce (keys and values).
    pub seq: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key / value heads (`n_heads` is a multiple).
    pub n_kv_heads: usize,
    /// Values per head.
    pub head_dim: usize,
    /// Query rows per nonce: `seq` (every position) or 1 (the last position only).
    pub q_rows_per_batch: usize,
}

/// The rest of a softmax once `max` (of the unmasked scores) is known: `exp(s - max)`, summed
/// in order, then every value times the reciprocal of the sum (as the reference's softmax
/// does), rounded to the dtype. Shared with the vectorised attention, whose scores it must
/// treat exactly as the readable one does (inlined, so that it is compiled for the vectors
/// of the function that calls it).
#[inline(always)]
fn softmax_from_max<R: Rounding>(scores: &mut [f32], max: f32) {
    let mut sum = 0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    let inv = 1.0f32 / sum;
    for s in scores.iter_mut() {
        *s = R::round(*s * inv);
    }
}

/// Causal attention. `q` holds `batch * q_rows_per_batch` rows of `n_heads * head_dim`
/// (rotated), `k` and `v` hold `batch * seq` rows of `n_kv_heads * head_dim`; query row `r`
/// of nonce `b` sits at position `seq - q_rows_per_batch + r % q_rows_per_batch`. Writes the
/// heads concatenated, one row per query row, into `out`. Rows are independent tasks.
/// Public as a reference for the CUDA kernels (tests/kernel_emulation.rs).
pub fn attention<R: Rounding>(q: &[f32], k: &[f32], v: &[f32], out: &mut [f32], sh: AttnShape) {
    let AttnShape {
        seq,
        n_heads,
        n_kv_heads,
        head_dim: hd,
        q_rows_per_batch: qr,
    } = sh;
    let q_width = n_heads * hd;
    let kv_width = n_kv_heads * hd;
    let rep = n_heads / n_kv_heads;
    let first_pos = seq - qr;
    // The reference divides a T tensor by the Python float sqrt(hd): in f32 by that value
    // converted to f32.
    let scale = (hd as f64).sqrt() as f32;
    out.par_chunks_mut(q_width)
        .zip(q.par_chunks(q_width))
        .enumerate()
        .for_each_init(
            || vec![0f32; seq],
            |scores, (r, (orow, qrow))| {
                let b = r / qr;
                let i = first_pos + r % qr;
                let kv_base = b * seq;
                let scores = &mut scores[..=i];
                for h in 0..n_heads {
                    let kv_off = (h / rep) * hd;
                    let qh = &qrow[h * hd..(h + 1) * hd];
                    // Positions j > i are masked (-inf): exp gives exactly 0 there, so they
                    // are left out of the max, the sum and the product with v.
                    let mut max = f32::NEG_INFINITY;
                    for (j, s) in scores.iter_mut().enumerate() {
                        let row = (kv_base + j) * kv_width + kv_off;
                        let raw = R::round(dot(qh, &k[row..row + hd]));
                        *s = R::round(raw / scale);
                        max = max.max(*s);
                    }
                    softmax_from_max::<R>(scores, max);
                    let oh = &mut orow[h * hd..(h + 1) * hd];
                    oh.fill(0.0);
                    for (j, &p) in scores.iter().enumerate() {
                        let row = (kv_base + j) * kv_width + kv_off;
                        for (o, &vv) in oh.iter_mut().zip(&v[row..row + hd]) {
                            *o += p * vv;
                        }
                    }
                    round_slice::<R>(oh);
                }
            },
        );
}

/// Scratch buffers of the forward pass. They grow to the largest batch seen and are reused
/// by later calls (pass the same one to [`forward_last_logits_with`]).
#[derive(Debug, Default)]
pub struct ForwardScratch {
    x: Vec<f32>,
    xn: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    tmp: Vec<f32>,
    h1: Vec<f32>,
    /// `w3 x`, when the path computes the FFN's two products apart.
    h3: Vec<f32>,
    /// The keys transposed for [`attention::attention_by_keys`].
    kt: Vec<f32>,
}

impl ForwardScratch {
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes currently held.
    pub fn bytes(&self) -> usize {
        4 * [
            &self.x, &self.xn, &self.q, &self.k, &self.v, &self.att, &self.tmp, &self.h1, &self.h3,
            &self.kt,
        ]
        .iter()
        .map(|b| b.len())
        .sum::<usize>()
    }

    fn ensure(&mut self, m: usize, d: &Dims) {
        let grow = |b: &mut Vec<f32>, n: usize| {
            if b.len() < n {
                b.resize(n, 0.0);
            }
        };
        let want = ScratchLens::for_rows(m, d);
        grow(&mut self.x, want.x);
        grow(&mut self.xn, want.xn);
        grow(&mut self.q, want.q);
        grow(&mut self.k, want.k);
        grow(&mut self.v, want.v);
        grow(&mut self.att, want.att);
        grow(&mut self.tmp, want.tmp);
        grow(&mut self.h1, want.h1);
        grow(&mut self.h3, want.h3);
        grow(&mut self.kt, want.kt);
    }
}

/// The lengths (f32 values) of [`ForwardScratch`]'s buffers for `rows` residual rows
/// (`batch * seq_len`): what the forward pass allocates, and what the memory check counts
/// ([`working_bytes_per_nonce`]), from this one place.
#[derive(Debug, Clone, Copy)]
struct ScratchLens {
    x: usize,
    xn: usize,
    q: usize,
    k: usize,
    v: usize,
    att: usize,
    tmp: usize,
    h1: usize,
    /// Zero when the product path fuses the FFN's two products (see `ffn_block`).
    h3: usize,
    kt: usize,
}

impl ScratchLens {
    fn for_rows(rows: usize, d: &Dims) -> Self {
        ScratchLens {
            x: rows * d.dim,
            xn: rows * d.dim,
            q: rows * d.n_heads * d.hd,
            k: rows * d.n_kv_heads * d.hd,
            v: rows * d.n_kv_heads * d.hd,
            att: rows * d.n_heads * d.hd,
            tmp: rows * d.dim,
            h1: rows * d.hidden,
            h3: if d.ffn_fused { 0 } else { rows * d.hidden },
            kt: attention::transposed_len(rows / d.seq.max(1), &d.attn_shape(d.seq)),
        }
    }

    fn total(&self) -> usize {
        let ScratchLens {
            x,
            xn,
            q,
            k,
            v,
            att,
            tmp,
            h1,
            h3,
            kt,
        } = *self;
        x + xn + q + k + v + att + tmp + h1 + h3 + kt
    }
}

/// Model sizes as usize.
#[derive(Clone, Copy)]
struct Dims {
    /// The product path the weights are packed for.
    kernel: Kernel,
    /// Whether that path computes the FFN's two products and SiLU-times in one pass.
    ffn_fused: bool,
    dim: usize,
    seq: usize,
    n_heads: usize,
    n_kv_heads: usize,
    hd: usize,
    hidden: usize,
    eps: f32,
}

impl Dims {
    /// The sizes of `p`, for weights packed for `path` (kernel and dtype); `None` (the
    /// memory check, which knows neither) assumes the FFN's products are not fused, the
    /// larger working memory.
    fn of(p: &Params, path: Option<(Kernel, Dtype)>) -> Self {
        let (kernel, ffn_fused) = match path {
            Some((kernel, dtype)) => (kernel, matmul::fuses_silu_mul(kernel, dtype, p.dim_usize())),
            None => (Kernel::Scalar, false),
        };
        Dims {
            kernel,
            ffn_fused,
            dim: p.dim_usize(),
            seq: p.seq_len_usize(),
            n_heads: p.n_heads_usize(),
            n_kv_heads: p.n_kv_heads_usize(),
            hd: p.head_dim(),
            hidden: p.ffn_hidden(),
            eps: p.norm_eps as f32,
        }
    }

    /// The attention shape with `q_rows` query rows per nonce.
    fn attn_shape(&self, q_rows: usize) -> AttnShape {
        AttnShape {
            seq: self.seq,
            n_heads: self.n_heads,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.hd,
            q_rows_per_batch: q_rows,
        }
    }
}

/// `x = x + FFN(RMSNorm_f(x))` on `rows` rows.
fn ffn_block<R: Rounding>(
    x: &mut [f32],
    rows: usize,
    lw: &CpuLayer,
    s: &mut ForwardScratch,
    d: Dims,
) {
    let (dim, hidden, kernel) = (d.dim, d.hidden, d.kernel);
    let xn = &mut s.xn[..rows * dim];
    rmsnorm::<R>(x, &lw.ffn_norm, xn, dim, d.eps);
    let h1 = &mut s.h1[..rows * hidden];
    if !matmul::linear_silu_mul::<R>(kernel, h1, xn, rows, dim, &lw.w1, &lw.w3) {
        // The path cannot fuse them: the same values in three passes.
        if s.h3.len() < rows * hidden {
            s.h3.resize(rows * hidden, 0.0);
        }
        let h3 = &mut s.h3[..rows * hidden];
        linear::<R>(kernel, h1, xn, rows, dim, &lw.w1);
        linear::<R>(kernel, h3, xn, rows, dim, &lw.w3);
        silu_mul_vectorised::<R>(h1, h3);
    }
    let out = &mut s.tmp[..rows * dim];
    linear::<R>(kernel, out, h1, rows, hidden, &lw.w2);
    add_round::<R>(x, out);
}

/// One transformer block on the residual `s.x` (`batch * seq` rows). When `last`, only each
/// nonce's last position is carried on: its residual is compacted into the first `batch`
/// rows. Returns the number of residual rows after the block.
fn block<R: Rounding>(
    batch: usize,
    lw: &CpuLayer,
    rope: &RopeTable,
    s: &mut ForwardScratch,
    d: Dims,
    last: bool,
) -> usize {
    let Dims {
        kernel,
        dim,
        seq,
        n_heads,
        n_kv_heads,
        hd,
        ..
    } = d;
    let m = batch * seq;
    let q_width = n_heads * hd;
    let kv_width = n_kv_heads * hd;
    let mut x = std::mem::take(&mut s.x);
    rmsnorm::<R>(
        &x[..m * dim],
        &lw.attention_norm,
        &mut s.xn[..m * dim],
        dim,
        d.eps,
    );
    let xn = &s.xn[..m * dim];
    let k = &mut s.k[..m * kv_width];
    let v = &mut s.v[..m * kv_width];
    linear::<R>(kernel, k, xn, m, dim, &lw.wk);
    linear::<R>(kernel, v, xn, m, dim, &lw.wv);
    rope.apply::<R>(k, kv_width, seq, 0);
    let qr = if last { 1 } else { seq };
    let mq = batch * qr;
    let q = &mut s.q[..mq * q_width];
    if last {
        // Row b of the product is the last position of nonce b: rows `seq * dim` apart.
        linear::<R>(kernel, q, &xn[(seq - 1) * dim..], batch, seq * dim, &lw.wq);
    } else {
        linear::<R>(kernel, q, xn, m, dim, &lw.wq);
    }
    rope.apply::<R>(q, q_width, qr, seq - qr);
    let shape = d.attn_shape(qr);
    let kt = &mut s.kt[..attention::transposed_len(batch, &shape)];
    attention::transpose_keys(k, kt, batch, &shape);
    let att = &mut s.att[..mq * q_width];
    attention::attention_by_keys::<R>(q, kt, v, att, shape);
    let proj = &mut s.tmp[..mq * dim];
    linear::<R>(kernel, proj, att, mq, q_width, &lw.wo);
    if last && seq > 1 {
        // Source row b * seq + seq - 1 >= b, and every later source row lies beyond row b,
        // so compacting in increasing order reads each source before it can be overwritten.
        for b in 0..batch {
            x.copy_within((b * seq + seq - 1) * dim..(b * seq + seq) * dim, b * dim);
        }
    }
    let xr = &mut x[..mq * dim];
    add_round::<R>(xr, proj);
    ffn_block::<R>(xr, mq, lw, s, d);
    s.x = x;
    mq
}

/// The forward pass, or None when `stop` said to give up (asked before every layer and
/// before the output projection, so a stop takes effect within one layer's time).
fn forward_impl<R: Rounding>(
    s: &mut ForwardScratch,
    weights: &CpuModel,
    inputs: &[f32],
    batch: usize,
    stop: &StopToken,
) -> Option<Vec<f32>> {
    let p = &weights.params;
    let d = Dims::of(p, Some((weights.kernel, R::DTYPE)));
    let vocab = p.vocab_usize();
    let m = batch * d.seq;
    let rope = RopeTable::new(p, R::DTYPE);
    s.ensure(m, &d);
    s.x[..m * d.dim].copy_from_slice(inputs);
    let mut rows = m;
    let n_layers = weights.layers.len();
    for (l, lw) in weights.layers.iter().enumerate() {
        if stop.is_stopped() {
            return None;
        }
        rows = block::<R>(batch, lw, &rope, s, d, l + 1 == n_layers);
    }
    if stop.is_stopped() {
        return None;
    }
    if rows != batch {
        // No layers: keep the last position of each nonce.
        for b in 0..batch {
            let src = (b * d.seq + d.seq - 1) * d.dim;
            s.x.copy_within(src..src + d.dim, b * d.dim);
        }
    }
    let xn = &mut s.xn[..batch * d.dim];
    rmsnorm::<R>(&s.x[..batch * d.dim], &weights.norm, xn, d.dim, d.eps);
    let mut logits = vec![0f32; batch * vocab];
    linear::<R>(d.kernel, &mut logits, xn, batch, d.dim, &weights.output);
    Some(logits)
}

/// The forward pass: `inputs` are `batch * seq_len * dim` embeddings (exactly representable
/// in the model's dtype); returns the f32 logits of each nonce's last position,
/// `batch * vocab_size` values.
///
/// Panics when `inputs.len()` does not match (the [`Backend`] implementation checks first),
/// or when readable weights cannot be packed (see [`CpuWeights`]).
pub fn forward_last_logits<W: CpuWeights + ?Sized>(
    weights: &W,
    inputs: &[f32],
    batch: usize,
) -> Vec<f32> {
    forward_last_logits_with(&mut ForwardScratch::new(), weights, inputs, batch)
}

/// [`forward_last_logits`] with caller-held scratch buffers, reused across calls.
pub fn forward_last_logits_with<W: CpuWeights + ?Sized>(
    scratch: &mut ForwardScratch,
    weights: &W,
    inputs: &[f32],
    batch: usize,
) -> Vec<f32> {
    forward_last_logits_until(scratch, weights, inputs, batch, &StopToken::default())
        .expect("a forward pass that is never stopped finishes")
}

/// [`forward_last_logits_with`] that gives up (None) as soon as `stop` says so, checked
/// between layers.
pub fn forward_last_logits_until<W: CpuWeights + ?Sized>(
    scratch: &mut ForwardScratch,
    weights: &W,
    inputs: &[f32],
    batch: usize,
    stop: &StopToken,
) -> Option<Vec<f32>> {
    let p = weights.params();
    assert_eq!(
        inputs.len(),
        batch * p.seq_len_usize() * p.dim_usize(),
        "inputs must hold batch * seq_len * dim values"
    );
    if batch == 0 {
        return Some(Vec::new());
    }
    let weights = weights.packed().unwrap_or_else(|e| panic!("{e}"));
    let weights = &*weights;
    // Run on a thread of the rayon pool: the many small parallel sections inside are then
    // forked by work stealing instead of each being injected into the pool from outside and
    // waited for (which costs more than the work itself for small models).
    rayon::scope(|_| match weights.dtype {
        Dtype::F32 => forward_impl::<RoundF32>(scratch, weights, inputs, batch, stop),
        Dtype::F16 => forward_impl::<RoundF16>(scratch, weights, inputs, batch, stop),
        Dtype::Bf16 => forward_impl::<RoundBf16>(scratch, weights, inputs, batch, stop),
    })
}

// ---------------------------------------------------------------------------------------------
// Memory estimate

/// Bytes the CPU model of `dtype` needs while it is built: the weights as [`CpuModel`] holds
/// them, the f32 pool they are drawn from, and the parameters in flight (each one goes
/// through f32 on its way in, one per thread at a time: counted at the largest).
pub fn model_bytes(params: &Params, dtype: Dtype) -> u64 {
    let pool = weights::pool_size(weights::total_params(params));
    let largest = weights::param_specs(params)
        .iter()
        .map(|s| s.numel())
        .max()
        .unwrap_or(0);
    let in_flight = largest
        .saturating_mul(4)
        .saturating_mul(rayon::current_num_threads() as u64);
    weight_bytes(params, dtype)
        .saturating_add(pool.saturating_mul(4))
        .saturating_add(in_flight)
}

/// Bytes of the weights the forward reads (all but tok_embeddings), once built: one value of
/// the model dtype each ([`CpuModel`] holds f16 and bf16 weights in 2 bytes, f32 in 4).
fn weight_bytes(params: &Params, dtype: Dtype) -> u64 {
    let total = weights::total_params(params);
    let embeddings = (params.vocab_size.max(0) as u64).saturating_mul(params.dim.max(0) as u64);
    total
        .saturating_sub(embeddings)
        .saturating_mul(dtype_bytes(dtype))
}

/// Bytes of one stored value of `dtype`.
fn dtype_bytes(dtype: Dtype) -> u64 {
    match dtype {
        Dtype::F32 => 4,
        Dtype::F16 | Dtype::Bf16 => 2,
    }
}

/// Bytes one nonce takes while a batch computes, from the sizes the code allocates: the
/// forward's scratch buffers for its `seq_len` rows ([`ScratchLens`]), its inputs (f32), its
/// permutation (i64), its logits (f32) and the distance's temporaries; plus what one forward
/// pass holds whatever the batch (one row of attention scores per thread, the RoPE table).
/// The memory check asks for room for one nonce; the engine's `max_batch_bytes` divided by
/// this caps a batch.
pub fn working_bytes_per_nonce(params: &Params) -> u64 {
    let d = Dims::of(params, None);
    let vocab = params.vocab_usize() as u64;
    let seq = d.seq as u64;
    let scratch = ScratchLens::for_rows(d.seq, &d).total() as u64 * 4;
    let inputs = seq * d.dim as u64 * 4;
    let permutation = vocab * 8;
    let logits = vocab * 4;
    // proof::distance: the gathered logits and their squares (f32), the differences (f64).
    let distance = vocab * (4 + 4 + 8);
    let scores = seq * 4 * rayon::current_num_threads() as u64;
    let rope = seq * d.hd as u64 * 4;
    scratch + inputs + permutation + logits + distance + scores + rope
}

fn gib(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.1} GiB", bytes as f64 / GIB)
    } else {
        format!("{:.0} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

/// `MemAvailable` from /proc/meminfo, in bytes, when readable.
pub fn mem_available_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_mem_available(&text)
}

fn parse_mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let mut it = line["MemAvailable:".len()..].split_whitespace();
    let value: u64 = it.next()?.parse().ok()?;
    let unit = match it.next() {
        None => 1,
        Some(u) if u.eq_ignore_ascii_case("kb") => 1024,
        Some(_) => return None,
    };
    value.checked_mul(unit)
}

/// Refuse a model that, with one nonce's working memory, does not fit in `available` bytes
/// (unknown: let it try). The message names the params behind the larger part.
pub fn check_model_fits(
    params: &Params,
    dtype: Dtype,
    available: Option<u64>,
) -> Result<(), BackendError> {
    let Some(avail) = available else {
        return Ok(());
    };
    let weights = weight_bytes(params, dtype);
    let build = model_bytes(params, dtype);
    let working = working_bytes_per_nonce(params);
    // The pool is freed once the weights are built, before the first batch.
    let need = build.max(weights.saturating_add(working));
    if need <= avail {
        return Ok(());
    }
    let p = params;
    let hidden = p.ffn_hidden();
    let culprit = if working > weights {
        format!(
            "seq_len {} with dim {} and the FFN hidden size {hidden} (from ffn_dim_multiplier \
             and multiple_of) make one nonce's working memory {}",
            p.seq_len,
            p.dim,
            gib(working)
        )
    } else {
        format!(
            "n_layers {} with dim {}, the FFN hidden size {hidden} (from ffn_dim_multiplier \
             and multiple_of) and vocab_size {} make the {} weights {}",
            p.n_layers,
            p.dim,
            p.vocab_size,
            dtype.as_str(),
            gib(weights)
        )
    };
    Err(BackendError::OutOfMemory(format!(
        "params: the CPU needs {} for this model ({} of {} weights, {} while their pool is \
         drawn, {} of working memory for one nonce), but only {} of memory is available: \
         {culprit}",
        gib(need),
        gib(weights),
        dtype.as_str(),
        gib(build.saturating_sub(weights)),
        gib(working),
        gib(avail)
    )))
}

/// Bytes a built model holds, from its buffers' lengths.
fn resident_bytes(m: &CpuModel) -> u64 {
    m.bytes() as u64
}

// ---------------------------------------------------------------------------------------------
// Backend

/// The CPU backend: f32 arithmetic with the model dtype's rounding points, on all rayon
/// threads. Keeps the scratch buffers of finished batches for the next ones until the job
/// ends ([`Backend::release_working_memory`]).
#[derive(Debug, Default)]
pub struct CpuBackend {
    scratch: Mutex<Vec<ForwardScratch>>,
    /// Every model built here that may still be alive (in the engine's cache or a running
    /// job): the memory a new job could have back, since building evicts them.
    built: Mutex<Vec<Weak<CpuModel>>>,
}

impl CpuBackend {
    pub fn new() -> Self {
        Self::default()
    }

    /// Drop the kept scratch buffers.
    pub fn release_scratch(&self) {
        self.scratch
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Whether `params` in `dtype` fits in `mem_available` bytes (unknown: yes) plus what this
    /// backend would give back to a new job ([`CpuBackend::reclaimable_bytes`]).
    fn check_fits(
        &self,
        params: &Params,
        dtype: Dtype,
        mem_available: Option<u64>,
    ) -> Result<(), BackendError> {
        let available = mem_available.map(|a| a.saturating_add(self.reclaimable_bytes()));
        check_model_fits(params, dtype, available)
    }

    /// Bytes a new job could take over: the models built here that are still alive (the
    /// engine evicts cached models when a build runs out of memory, and a running job's
    /// model goes when a new job preempts it) and the kept scratch buffers (released when
    /// that job ends).
    pub fn reclaimable_bytes(&self) -> u64 {
        let models: u64 = {
            let mut built = self.built.lock().unwrap_or_else(|e| e.into_inner());
            built.retain(|w| w.strong_count() > 0);
            built
                .iter()
                .filter_map(Weak::upgrade)
                .map(|m| resident_bytes(&m))
                .sum()
        };
        let scratch: usize = self
            .scratch
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(ForwardScratch::bytes)
            .sum();
        models + scratch as u64
    }
}

fn fp8_unsupported() -> BackendError {
    BackendError::Unsupported(
        "use_fp8 needs a GPU with FP8 tensor cores; the CPU backend computes f32, f16 and \
         bf16 models only"
            .into(),
    )
}

impl CpuBackend {
    /// The forward pass of a model this backend built (or of readable weights, packed for
    /// the call), with the inputs' length checked.
    pub fn forward<W: CpuWeights + ?Sized>(
        &self,
        model: &W,
        inputs: &[f32],
        batch: usize,
    ) -> Result<Vec<f32>, BackendError> {
        self.forward_until(model, inputs, batch, &StopToken::default())
    }

    /// [`CpuBackend::forward`], given up between layers ([`BackendError::Stopped`]) as soon
    /// as `stop` says so.
    pub fn forward_until<W: CpuWeights + ?Sized>(
        &self,
        model: &W,
        inputs: &[f32],
        batch: usize,
        stop: &StopToken,
    ) -> Result<Vec<f32>, BackendError> {
        let p = model.params();
        if p.use_fp8 {
            return Err(fp8_unsupported());
        }
        let want = batch
            .checked_mul(p.seq_len_usize())
            .and_then(|n| n.checked_mul(p.dim_usize()));
        if want != Some(inputs.len()) {
            let need = want.map_or_else(|| "more than usize::MAX".to_string(), |n| n.to_string());
            return Err(BackendError::Unsupported(format!(
                "inputs hold {} values, but a batch of {batch} needs batch * seq_len * dim = \
                 {batch} * {} * {} = {need}",
                inputs.len(),
                p.seq_len,
                p.dim
            )));
        }
        let model = model.packed()?;
        let taken = self.scratch.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut scratch = taken.unwrap_or_default();
        let logits = forward_last_logits_until(&mut scratch, &*model, inputs, batch, stop);
        self.scratch
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(scratch);
        logits.ok_or(BackendError::Stopped)
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> String {
        "cpu".into()
    }

    /// Valid params, no FP8, and room for the model and one nonce's working memory in the
    /// memory available now plus what the models and buffers kept here would give back.
    fn check(&self, params: &Params, dtype: Dtype) -> Result<(), BackendError> {
        params
            .validate()
            .map_err(|e| BackendError::Unsupported(e.to_string()))?;
        if params.use_fp8 {
            return Err(BackendError::Unsupported(
                "params.use_fp8: this server computes on the CPU, which has no FP8 support; \
                 send use_fp8 false"
                    .into(),
            ));
        }
        self.check_fits(params, dtype, mem_available_bytes())
    }

    fn warm_up(&self) {
        // Start rayon's global pool so that the first batch does not pay for it.
        rayon::broadcast(|_| ());
    }

    /// Refused (out of memory) unless the model and one nonce fit in the memory available
    /// now: the engine then evicts its cached models and tries once more.
    fn build_model(
        &self,
        block_hash: &str,
        params: &Params,
        dtype: Dtype,
    ) -> Result<Model, BackendError> {
        params
            .validate()
            .map_err(|e| BackendError::Unsupported(e.to_string()))?;
        if params.use_fp8 {
            return Err(fp8_unsupported());
        }
        check_model_fits(params, dtype, mem_available_bytes())?;
        let model = Arc::new(CpuModel::build(block_hash, params, dtype)?);
        self.built
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::downgrade(&model));
        Ok(model)
    }

    fn forward_last_logits(
        &self,
        model: &Model,
        inputs: &[f32],
        batch: usize,
    ) -> Result<Vec<f32>, BackendError> {
        let m = downcast_model::<CpuModel>(model, &self.name())?;
        self.forward(m, inputs, batch)
    }

    /// The default (forward, then the distances on the host), except that the forward pass
    /// gives up between layers once `job.stop` says so.
    fn run_batch(
        &self,
        model: &Model,
        job: &JobSpec,
        batch: PreparedBatch,
        all_distances: bool,
    ) -> Result<BatchResult, BackendError> {
        let m = downcast_model::<CpuModel>(model, &self.name())?;
        let logits = self.forward_until(m, &batch.inputs, batch.nonces.len(), &job.stop)?;
        Ok(batch::finish(job, batch, &logits).keeping_distances(all_distances))
    }

    /// The CPU computes in host memory: the whole forward pass's activations.
    fn bytes_per_nonce(&self, params: &Params) -> u64 {
        bytes_per_nonce(params)
    }

    fn release_working_memory(&self) {
        self.release_scratch();
    }
}

/// Bytes one nonce occupies during a CPU forward pass ([`working_bytes_per_nonce`]), to cap
/// a batch so that a large `batch_size` cannot exhaust memory.
pub fn bytes_per_nonce(params: &Params) -> u64 {
    working_bytes_per_nonce(params)
}

#[cfg(test)]
// The reference implementations below index on purpose: they read like the formulas.
#[allow(clippy::needless_range_loop)]
mod tests {
    use super::*;

    /// Deterministic test weights and inputs.
    struct Filler(crate::splitmix::SplitMix64);

    impl Filler {
        fn new(seed: u64) -> Self {
            Filler(crate::splitmix::SplitMix64(seed))
        }

        fn next_u64(&mut self) -> u64 {
            self.0.next_u64()
        }

        /// Uniform in [-scale, scale), rounded to `dtype`.
        fn vec(&mut self, n: usize, scale: f32, dtype: Dtype) -> Vec<f32> {
            (0..n)
                .map(|_| {
                    let u = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
                    dtype.round((2.0 * u - 1.0) * scale)
                })
                .collect()
        }
    }

    /// Weights that keep every activation of order one (unit-variance linear layers, norm
    /// weights around 1), so that each rounding point shows in the logits.
    fn test_model(params: &Params, dtype: Dtype, seed: u64) -> ModelWeights {
        params.validate().unwrap();
        let mut f = Filler::new(seed);
        let dim = params.dim_usize();
        let qd = params.n_heads_usize() * params.head_dim();
        let kvd = params.n_kv_heads_usize() * params.head_dim();
        let hidden = params.ffn_hidden();
        let mut lin = |out: usize, inp: usize| f.vec(out * inp, 1.7 / (inp as f32).sqrt(), dtype);
        let mut layers = Vec::new();
        for _ in 0..params.n_layers_usize() {
            layers.push(LayerWeights {
                wq: lin(qd, dim),
                wk: lin(kvd, dim),
                wv: lin(kvd, dim),
                wo: lin(dim, qd),
                w1: lin(hidden, dim),
                w2: lin(dim, hidden),
                w3: lin(hidden, dim),
                attention_norm: Vec::new(),
                ffn_norm: Vec::new(),
            });
        }
        let output = lin(params.vocab_usize(), dim);
        let norm = |f: &mut Filler| -> Vec<f32> {
            f.vec(dim, 0.5, Dtype::F32)
                .iter()
                .map(|v| dtype.round(1.0 + v))
                .collect()
        };
        for l in &mut layers {
            l.attention_norm = norm(&mut f);
            l.ffn_norm = norm(&mut f);
        }
        ModelWeights {
            params: params.clone(),
            dtype,
            layers,
            norm: norm(&mut f),
            output,
        }
    }

    // ---- the naive reference: one nonce at a time, plain loops, every position ----

    fn naive_matvec(w: &[f32], x: &[f32], out_dim: usize, dt: Dtype) -> Vec<f32> {
        let in_dim = x.len();
        (0..out_dim)
            .map(|o| {
                let mut acc = 0f32;
                for i in 0..in_dim {
                    acc += w[o * in_dim + i] * x[i];
                }
                dt.round(acc)
            })
            .collect()
    }

    fn naive_rmsnorm(x: &[f32], w: &[f32], eps: f32, dt: Dtype) -> Vec<f32> {
        let mut ss = 0f32;
        for &v in x {
            ss += v * v;
        }
        let r = 1.0 / (ss / x.len() as f32 + eps).sqrt();
        (0..x.len())
            .map(|i| dt.round(dt.round(x[i] * r) * w[i]))
            .collect()
    }

    fn naive_rope(x: &mut [f32], n_heads: usize, hd: usize, pos: usize, freqs: &[f32], dt: Dtype) {
        for h in 0..n_heads {
            for j in 0..hd / 2 {
                let angle = pos as f32 * freqs[j];
                let c = dt.round(angle.cos());
                let s = dt.round(angle.sin());
                let a = x[h * hd + 2 * j];
                let b = x[h * hd + 2 * j + 1];
                x[h * hd + 2 * j] = dt.round(a * c - b * s);
                x[h * hd + 2 * j + 1] = dt.round(b * c + a * s);
            }
        }
    }

    fn naive_forward_one(w: &ModelWeights, input: &[f32]) -> Vec<f32> {
        let p = &w.params;
        let dt = w.dtype;
        let (dim, seq) = (p.dim_usize(), p.seq_len_usize());
        let (nh, nkv, hd) = (p.n_heads_usize(), p.n_kv_heads_usize(), p.head_dim());
        let hidden = p.ffn_hidden();
        let eps = p.norm_eps as f32;
        let freqs = rope_freqs(hd, p.rope_theta, p.use_scaled_rope);
        let mut x: Vec<Vec<f32>> = (0..seq)
            .map(|i| input[i * dim..(i + 1) * dim].to_vec())
            .collect();
        for lw in &w.layers {
            let xn: Vec<Vec<f32>> = x
                .iter()
                .map(|r| naive_rmsnorm(r, &lw.attention_norm, eps, dt))
                .collect();
            let mut q: Vec<Vec<f32>> = xn
                .iter()
                .map(|r| naive_matvec(&lw.wq, r, nh * hd, dt))
                .collect();
            let mut k: Vec<Vec<f32>> = xn
                .iter()
                .map(|r| naive_matvec(&lw.wk, r, nkv * hd, dt))
                .collect();
            let v: Vec<Vec<f32>> = xn
                .iter()
                .map(|r| naive_matvec(&lw.wv, r, nkv * hd, dt))
                .collect();
            for i in 0..seq {
                naive_rope(&mut q[i], nh, hd, i, &freqs, dt);
                naive_rope(&mut k[i], nkv, hd, i, &freqs, dt);
            }
            let mut att = vec![vec![0f32; nh * hd]; seq];
            for h in 0..nh {
                let kvh = h / (nh / nkv);
                for i in 0..seq {
                    // Full row with the mask added, as the reference does it.
                    let mut sc = vec![0f32; seq];
                    for j in 0..seq {
                        let mut acc = 0f32;
                        for t in 0..hd {
                            acc += q[i][h * hd + t] * k[j][kvh * hd + t];
                        }
                        let scaled = dt.round(dt.round(acc) / (hd as f64).sqrt() as f32);
                        let mask = if j > i { f32::NEG_INFINITY } else { 0.0 };
                        sc[j] = dt.round(scaled + mask);
                    }
                    let max = sc.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                    let e: Vec<f32> = sc.iter().map(|&s| (s - max).exp()).collect();
                    let sum: f32 = e.iter().sum();
                    let probs: Vec<f32> = e.iter().map(|&x| dt.round(x / sum)).collect();
                    for t in 0..hd {
                        let mut acc = 0f32;
                        for j in 0..seq {
                            acc += probs[j] * v[j][kvh * hd + t];
                        }
                        att[i][h * hd + t] = dt.round(acc);
                    }
                }
            }
            for i in 0..seq {
                let o = naive_matvec(&lw.wo, &att[i], dim, dt);
                for c in 0..dim {
                    x[i][c] = dt.round(x[i][c] + o[c]);
                }
                let hn = naive_rmsnorm(&x[i], &lw.ffn_norm, eps, dt);
                let a = naive_matvec(&lw.w1, &hn, hidden, dt);
                let b = naive_matvec(&lw.w3, &hn, hidden, dt);
                let g: Vec<f32> = (0..hidden)
                    .map(|t| {
                        let s = dt.round(a[t] / (1.0 + (-a[t]).exp()));
                        dt.round(s * b[t])
                    })
                    .collect();
                let o = naive_matvec(&lw.w2, &g, dim, dt);
                for c in 0..dim {
                    x[i][c] = dt.round(x[i][c] + o[c]);
                }
            }
        }
        let xn = naive_rmsnorm(&x[seq - 1], &w.norm, eps, dt);
        naive_matvec(&w.output, &xn, p.vocab_usize(), dt)
    }

    fn eps_of(dt: Dtype) -> f32 {
        match dt {
            Dtype::F32 => f32::EPSILON,
            Dtype::F16 => 2f32.powi(-10),
            Dtype::Bf16 => 2f32.powi(-7),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn shape(
        dim: i64,
        n_layers: i64,
        n_heads: i64,
        n_kv_heads: i64,
        vocab: i64,
        multiple_of: i64,
        seq: i64,
        scaled: bool,
    ) -> Params {
        Params {
            dim,
            n_layers,
            n_heads,
            n_kv_heads,
            vocab_size: vocab,
            ffn_dim_multiplier: 1.3,
            multiple_of,
            norm_eps: 1e-5,
            rope_theta: if scaled { 500_000.0 } else { 10_000.0 },
            use_scaled_rope: scaled,
            seq_len: seq,
            use_fp8: false,
        }
    }

    /// The optimised forward against the naive one. Both round at the same points and differ
    /// only in the order of f32 accumulations, which now and then moves a value across a
    /// rounding boundary of T. So: for f32 the logits agree within a few ulps of the largest
    /// one; for f16 and bf16 almost every logit agrees exactly (a single missing or extra
    /// rounding point makes most of them differ).
    #[test]
    fn optimised_forward_matches_the_naive_reference() {
        // (params, batch)
        let cases = [
            (shape(12, 2, 2, 2, 7, 1, 5, false), 3), // head_dim 6, odd FFN hidden (41)
            (shape(10, 2, 5, 5, 7, 3, 4, false), 1), // head_dim 2
            (shape(24, 2, 4, 2, 7, 1, 6, true), 3),  // GQA, head_dim 6, scaled RoPE
            (shape(16, 2, 2, 1, 7, 1, 1, false), 3), // seq_len 1, GQA
            (shape(40, 3, 4, 1, 13, 8, 9, true), 2), // GQA 4:1, head_dim 10
            (shape(36, 1, 6, 3, 7, 1, 7, false), 1), // one layer, head_dim 6
            (shape(96, 2, 6, 2, 20, 32, 16, false), 3), // blocked GEMM sizes, head_dim 16
        ];
        for dt in Dtype::ALL {
            let (mut mismatched, mut total) = (0usize, 0usize);
            for (ci, (params, batch)) in cases.iter().enumerate() {
                let w = test_model(params, dt, 1000 + ci as u64);
                let n_in = batch * params.seq_len_usize() * params.dim_usize();
                let inputs = Filler::new(77 + ci as u64).vec(n_in, 1.7, dt);
                let got = forward_last_logits(&w, &inputs, *batch);
                let vocab = params.vocab_usize();
                assert_eq!(got.len(), batch * vocab);
                let per = params.seq_len_usize() * params.dim_usize();
                let want: Vec<f32> = (0..*batch)
                    .flat_map(|b| naive_forward_one(&w, &inputs[b * per..(b + 1) * per]))
                    .collect();
                let scale = want.iter().fold(0f32, |a, &v| a.max(v.abs()));
                assert!(scale > 0.0, "case {ci} {dt}: all-zero logits");
                let diff = got
                    .iter()
                    .zip(&want)
                    .fold(0f32, |a, (g, w)| a.max((g - w).abs()));
                let ulps = diff / (scale * eps_of(dt));
                let differ = got.iter().zip(&want).filter(|(g, w)| g != w).count();
                eprintln!(
                    "case {ci} {dt}: max |diff| {diff:e} = {ulps:.3} ulps of {scale:e}, \
                     {differ}/{} logits differ",
                    got.len()
                );
                assert!(
                    ulps <= 4.0,
                    "case {ci} {dt}: max |diff| {diff:e} = {ulps:.2} ulps of the largest logit \
                     {scale:e}\n got {got:?}\nwant {want:?}"
                );
                // Every logit is a finite value of the dtype.
                assert!(got.iter().all(|&v| dt.round(v) == v && v.is_finite()));
                mismatched += differ;
                total += got.len();
            }
            if dt != Dtype::F32 {
                assert!(
                    mismatched * 4 <= total,
                    "{dt}: {mismatched} of {total} logits differ from the naive forward"
                );
            }
        }
    }

    #[test]
    fn batches_agree_with_single_nonces() {
        let params = shape(24, 2, 4, 2, 7, 1, 6, false);
        let w = test_model(&params, Dtype::F32, 5);
        let per = 6 * 24;
        let inputs = Filler::new(9).vec(4 * per, 2.0, Dtype::F32);
        let all = forward_last_logits(&w, &inputs, 4);
        for b in 0..4 {
            let one = forward_last_logits(&w, &inputs[b * per..(b + 1) * per], 1);
            for (x, y) in one.iter().zip(&all[b * 7..(b + 1) * 7]) {
                assert!(
                    (x - y).abs() <= 1e-6 * (1.0 + y.abs()),
                    "{one:?} vs {all:?}"
                );
            }
        }
        assert!(forward_last_logits(&w, &[], 0).is_empty());
    }

    /// The bit-level roundings against `Dtype::round` (the `half` crate): every upper-16-bit
    /// pattern with low halves around each tie, every f16 subnormal grid point and midpoint,
    /// and a million random patterns.
    #[test]
    fn fast_rounding_matches_the_half_crate() {
        fn check<R: Rounding>(x: f32) {
            let want = match R::DTYPE {
                Dtype::F32 => x,
                Dtype::F16 => half::f16::from_f32(x).to_f32(),
                Dtype::Bf16 => half::bf16::from_f32(x).to_f32(),
            };
            let got = R::round(x);
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "{}: {x:e} ({:#010x}) -> {got:e}, want {want:e}",
                R::DTYPE,
                x.to_bits()
            );
        }
        fn all(x: f32) {
            check::<RoundF32>(x);
            check::<RoundF16>(x);
            check::<RoundBf16>(x);
        }
        let lows: [u32; 20] = [
            0x0000, 0x0001, 0x0FFF, 0x1000, 0x1001, 0x1FFF, 0x2000, 0x2FFF, 0x3000, 0x3001, 0x5A5A,
            0x7FFF, 0x8000, 0x8001, 0x9000, 0xB000, 0xDFFF, 0xE000, 0xF000, 0xFFFF,
        ];
        for hi in 0u32..1 << 16 {
            for &lo in &lows {
                all(f32::from_bits(hi << 16 | lo));
            }
        }
        let ulp = 2f32.powi(-24);
        for k in 0..2048u32 {
            for x in [k as f32 * ulp, (k as f32 + 0.5) * ulp] {
                for y in [
                    x,
                    -x,
                    f32::from_bits(x.to_bits() + 1),
                    f32::from_bits(x.to_bits().max(1) - 1),
                ] {
                    all(y);
                }
            }
        }
        let mut f = Filler::new(42);
        for _ in 0..1_000_000 {
            all(f32::from_bits(f.next_u64() as u32));
        }
        for x in [
            65504.0,
            65519.99,
            65520.0,
            1e9,
            f32::MAX,
            f32::INFINITY,
            f32::NAN,
            0.0,
            -0.0,
        ] {
            all(x);
            all(-x);
        }
    }

    #[test]
    fn scratch_is_reused_across_calls_and_sizes() {
        let params = shape(24, 2, 4, 2, 7, 1, 6, false);
        let w = test_model(&params, Dtype::Bf16, 11);
        let per = 6 * 24;
        let inputs = Filler::new(12).vec(3 * per, 1.7, Dtype::Bf16);
        let mut s = ForwardScratch::new();
        let a = forward_last_logits_with(&mut s, &w, &inputs, 3);
        let held = s.bytes();
        assert!(held > 0);
        let b = forward_last_logits_with(&mut s, &w, &inputs[..per], 1);
        let c = forward_last_logits_with(&mut s, &w, &inputs, 3);
        assert_eq!(s.bytes(), held, "no growth for a batch seen before");
        assert_eq!(a, c);
        assert_eq!(b, forward_last_logits(&w, &inputs[..per], 1));
        assert_eq!(a, forward_last_logits(&w, &inputs, 3));
        // Through the backend, twice (the second call reuses the kept buffers).
        let be = CpuBackend::new();
        assert_eq!(be.forward(&w, &inputs, 3).unwrap(), a);
        assert_eq!(be.forward(&w, &inputs, 3).unwrap(), a);
        be.release_scratch();
    }

    /// An independent, literal transcription of the reference's summation order.
    fn reference_order_sum(xs: &[f32], w: usize) -> f32 {
        let n = xs.len();
        let n_vec = n / w;
        let rows = n_vec / 4;
        let level_power = 4.max(ceil_log2(rows) / 4);
        let step = 1usize << level_power;
        let mut acc = vec![vec![vec![0f32; w]; 4]; 4];
        let mut i = 0usize;
        while i + step <= rows {
            for _ in 0..step {
                for k in 0..4 {
                    for l in 0..w {
                        acc[0][k][l] += xs[(i * 4 + k) * w + l];
                    }
                }
                i += 1;
            }
            for j in 1..4 {
                for k in 0..4 {
                    for l in 0..w {
                        let a = acc[j - 1][k][l];
                        acc[j][k][l] += a;
                        acc[j - 1][k][l] = 0.0;
                    }
                }
                if i & ((step - 1) << (j as u32 * level_power)) != 0 {
                    break;
                }
            }
        }
        for r in i..rows {
            for k in 0..4 {
                for l in 0..w {
                    acc[0][k][l] += xs[(r * 4 + k) * w + l];
                }
            }
        }
        let mut p = vec![vec![0f32; w]; 4];
        for k in 0..4 {
            for l in 0..w {
                p[k][l] = acc[0][k][l] + acc[1][k][l] + acc[2][k][l] + acc[3][k][l];
            }
        }
        for v in rows * 4..n_vec {
            for l in 0..w {
                p[0][l] += xs[v * w + l];
            }
        }
        let mut lanes = p[0].clone();
        for l in 0..w {
            lanes[l] = ((lanes[l] + p[1][l]) + p[2][l]) + p[3][l];
        }
        let mut total = 0f32;
        for &v in &xs[n_vec * w..] {
            total += v;
        }
        for l in lanes {
            total += l;
        }
        total
    }

    #[test]
    fn sum_of_squares_follows_the_reference_order() {
        // Two vectors, no full row of four: lanes x[l]^2 + x[8 + l]^2, after the 4 scalars.
        let x: Vec<f32> = (0..20).map(|i| 1.0 + i as f32 * 0.37).collect();
        let sq: Vec<f32> = x.iter().map(|v| v * v).collect();
        let mut want = 0f32;
        for &v in &sq[16..] {
            want += v;
        }
        for l in 0..8 {
            want += sq[l] + sq[8 + l];
        }
        assert_eq!(sum_squares(&x).to_bits(), want.to_bits());
        // Short rows are summed by four scalar accumulators, the fifth value joining the
        // first: 2^-24 + 2^-24 before 1.0 gives 1 + 2^-23, where a running sum gives 1.
        let e = 2f32.powi(-12);
        let x = [e, 1.0, 0.0, 0.0, e];
        assert_eq!(sum_squares(&x), 1.0 + 2f32.powi(-23));
        assert_eq!(x.iter().map(|v| v * v).sum::<f32>(), 1.0);
        // Rows long enough for the cascade (more than 16 rows of four vectors), awkward tails.
        let mut f = Filler::new(3);
        for n in [1usize, 7, 8, 31, 64, 224, 1792, 2048 + 13, 8192, 40_000] {
            let x = f.vec(n, 3.0, Dtype::F32);
            let sq: Vec<f32> = x.iter().map(|v| v * v).collect();
            let w = if n >= 8 { 8 } else { 1 };
            assert_eq!(
                sum_squares(&x).to_bits(),
                reference_order_sum(&sq, w).to_bits(),
                "n {n}"
            );
            let exact: f64 = sq.iter().map(|&v| v as f64).sum();
            assert!(
                (sum_squares(&x) as f64 - exact).abs() <= 1e-5 * exact,
                "n {n}"
            );
        }
    }

    #[test]
    fn rope_table_known_values() {
        // head_dim 4, theta 10000: freqs 1 and 10000^-0.5 = 0.01.
        let p = Params {
            dim: 8,
            n_heads: 2,
            n_kv_heads: 2,
            rope_theta: 10_000.0,
            seq_len: 3,
            ..Params::default()
        };
        assert_eq!(rope_freqs(4, 10_000.0, false), vec![1.0, 0.01]);
        let t = RopeTable::new(&p, Dtype::F32);
        assert_eq!(t.half, 2);
        assert_eq!(&t.cos[..2], &[1.0, 1.0]);
        assert_eq!(&t.sin[..2], &[0.0, 0.0]);
        let close = |a: f32, b: f64| (a as f64 - b).abs() <= 1e-7 * b.abs().max(1e-3);
        assert!(close(t.cos[2], 1f64.cos()) && close(t.sin[2], 1f64.sin()));
        assert!(close(t.cos[3], (0.01f32 as f64).cos()) && close(t.sin[3], (0.01f32 as f64).sin()));
        assert!(close(t.cos[4], 2f64.cos()) && close(t.sin[4], 2f64.sin()));
        assert!(close(t.sin[5], (2.0 * 0.01f32 as f64).sin()));
        // f16: cos(1) = 0.5403023 rounds to 1107 * 2^-11, sin(1) = 0.8414710 to 1723 * 2^-11.
        let h = RopeTable::new(&p, Dtype::F16);
        assert_eq!(h.cos[2], 1107.0 / 2048.0);
        assert_eq!(h.sin[2], 1723.0 / 2048.0);
        assert!(h
            .cos
            .iter()
            .chain(&h.sin)
            .all(|&v| Dtype::F16.round(v) == v));
        // head_dim 6: the exponent 2j/6 is an f32 quotient.
        let f = rope_freqs(6, 10_000.0, false);
        assert_eq!(f[1], 1.0 / 10_000f32.powf(2.0f32 / 6.0));
    }

    #[test]
    fn scaled_rope_bands() {
        // High frequencies (wavelength < 2048) are kept, low ones (> 8192) divided by 8.
        assert_eq!(scale_rope_freq(1.0), 1.0);
        assert_eq!(scale_rope_freq(0.01), 0.01);
        assert_eq!(scale_rope_freq(1e-4), 1e-4 / 8.0);
        // In between, a smooth blend: wavelength 4096 gives smooth = (2 - 1) / 3.
        let f = (2.0 * std::f64::consts::PI / 4096.0) as f32;
        let smooth = 1.0 / 3.0;
        let want = (1.0 - smooth) * f as f64 / 8.0 + smooth * f as f64;
        assert!((scale_rope_freq(f) as f64 - want).abs() < 1e-6 * want);
        // head_dim 16, theta 500000 (the golden gqa case) spans all three bands.
        let fr = rope_freqs(16, 500_000.0, true);
        let plain = rope_freqs(16, 500_000.0, false);
        assert_eq!(fr[0], plain[0]);
        assert_eq!(fr[7], plain[7] / 8.0);
        assert!(fr[4] < plain[4] && fr[4] > plain[4] / 8.0);
    }

    #[test]
    fn memory_estimate_refuses_v2_where_it_does_not_fit() {
        let v2 = Params::v2();
        let need = model_bytes(&v2, Dtype::F32);
        // 17.75 G f32 weights + 0.89 G pool values, and one w1 (88 M values) a thread in
        // flight: about 70 GiB.
        let gib = need as f64 / GIB;
        assert!((69.4..72.0).contains(&gib), "{gib}");
        // In f16 the weights take half of that.
        let f16 = model_bytes(&v2, Dtype::F16) as f64 / GIB;
        assert!((36.0..38.5).contains(&f16), "{f16}");
        // This machine (or, on a big one, a 64 GiB stand-in) cannot hold it.
        let avail = match mem_available_bytes() {
            Some(a) if a < 80_000_000_000 => a,
            _ => 64 << 30,
        };
        let e = check_model_fits(&v2, Dtype::F32, Some(avail)).unwrap_err();
        assert!(matches!(e, BackendError::OutOfMemory(_)), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("of f32 weights") && msg.contains("GiB"),
            "{msg}"
        );
        // A small model fits; an unknown amount of memory is not a refusal.
        let tiny = shape(64, 2, 4, 4, 100, 32, 8, false);
        check_model_fits(&tiny, Dtype::F16, Some(avail)).unwrap();
        check_model_fits(&v2, Dtype::F32, None).unwrap();
        // The backend itself refuses V2 here instead of aborting on allocation.
        if mem_available_bytes().is_some_and(|a| a < need) {
            let e = CpuBackend::new()
                .build_model("00", &v2, Dtype::F16)
                .unwrap_err();
            assert!(matches!(e, BackendError::OutOfMemory(_)), "{e}");
        }
    }

    #[test]
    fn one_nonce_of_working_memory_is_part_of_the_check() {
        // A 1-layer model of 15.6 GB whose one nonce needs 30 GB: refused in 20 GiB, with
        // the params that make it too big named.
        let p = Params {
            dim: 16384,
            n_layers: 1,
            n_heads: 128,
            n_kv_heads: 128,
            vocab_size: 8192,
            seq_len: 32768,
            ..Params::default()
        };
        let working = working_bytes_per_nonce(&p);
        assert!(
            working > 28 << 30 && working > model_bytes(&p, Dtype::F32),
            "{working}"
        );
        let e = check_model_fits(&p, Dtype::F32, Some(20 << 30)).unwrap_err();
        assert!(matches!(e, BackendError::OutOfMemory(_)), "{e}");
        let msg = e.to_string();
        for want in [
            "params:",
            "seq_len 32768 with dim 16384",
            "working memory for one nonce",
            "only 20.0 GiB of memory is available",
        ] {
            assert!(msg.contains(want), "{want:?} in {msg}");
        }
        // Weights that do not fit name n_layers instead.
        let big = Params {
            n_layers: 64,
            seq_len: 16,
            ..p.clone()
        };
        let msg = check_model_fits(&big, Dtype::F32, Some(20 << 30))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("n_layers 64 with dim 16384"), "{msg}");
        // The check counts what the forward pass allocates: after a batch of one nonce the
        // scratch holds exactly its scratch part.
        let small = shape(24, 2, 4, 2, 7, 1, 6, false);
        let w = test_model(&small, Dtype::Bf16, 11);
        let mut s = ForwardScratch::new();
        forward_last_logits_with(&mut s, &w, &[0.25; 6 * 24], 1);
        let d = Dims::of(
            &small,
            Some((Kernel::select(Dtype::Bf16).unwrap(), Dtype::Bf16)),
        );
        assert_eq!(s.bytes(), 4 * ScratchLens::for_rows(6, &d).total());
        assert!((s.bytes() as u64) < working_bytes_per_nonce(&small));
    }

    #[test]
    fn cached_models_count_as_available() {
        let be = CpuBackend::new();
        let a = shape(64, 2, 4, 4, 100, 8, 16, false);
        let b = shape(64, 3, 4, 4, 100, 8, 16, false);
        let need_b = model_bytes(&b, Dtype::F16)
            .max(weight_bytes(&b, Dtype::F16) + working_bytes_per_nonce(&b));
        let held = be.build_model("block a", &a, Dtype::F16).unwrap();
        let resident = be.reclaimable_bytes();
        let built = held.downcast_ref::<CpuModel>().unwrap();
        assert_eq!(
            resident,
            built.bytes() as u64,
            "a built model holds its weights packed in the dtype"
        );
        // The estimate counts them as the model holds them: in the dtype (packing adds at
        // most a padded row or pair here and there).
        let estimate = weight_bytes(&a, Dtype::F16);
        assert!(
            resident >= estimate && resident <= estimate + estimate / 16,
            "{resident} held, {estimate} estimated"
        );
        assert!(resident < weight_bytes(&a, Dtype::F32));
        // B fits once A is evicted: accepted while A is cached...
        let avail = need_b - resident / 2;
        be.check_fits(&b, Dtype::F16, Some(avail)).unwrap();
        // ...and refused once nothing is left to evict.
        drop(held);
        assert_eq!(be.reclaimable_bytes(), 0);
        let e = be.check_fits(&b, Dtype::F16, Some(avail)).unwrap_err();
        assert!(matches!(e, BackendError::OutOfMemory(_)), "{e}");
        // Kept scratch buffers count too, until they are released.
        let m = be.build_model("block a", &a, Dtype::F16).unwrap();
        be.forward_last_logits(&m, &vec![0.5; 16 * 64], 1).unwrap();
        drop(m);
        assert!(be.reclaimable_bytes() > 0);
        be.release_working_memory();
        assert_eq!(be.reclaimable_bytes(), 0);
    }

    #[test]
    fn a_stopped_token_gives_up_the_forward_pass() {
        let params = shape(24, 3, 4, 2, 7, 1, 6, false);
        let w = test_model(&params, Dtype::F16, 5);
        let be = CpuBackend::new();
        let inputs = vec![0.5f32; 6 * 24];
        let stopped = StopToken::default().with_deadline(std::time::Instant::now());
        assert!(matches!(
            be.forward_until(&w, &inputs, 1, &stopped),
            Err(BackendError::Stopped)
        ));
        let never = StopToken::default();
        assert_eq!(
            be.forward_until(&w, &inputs, 1, &never).unwrap(),
            forward_last_logits(&w, &inputs, 1)
        );
    }

    #[test]
    fn meminfo_parsing() {
        let text = "MemTotal:       32768000 kB\nMemFree:  100 kB\nMemAvailable:   24453984 kB\n";
        assert_eq!(parse_mem_available(text), Some(24_453_984 * 1024));
        assert_eq!(parse_mem_available("MemTotal: 5 kB\n"), None);
    }

    #[test]
    fn backend_checks_inputs_and_fp8() {
        let params = shape(12, 1, 2, 2, 7, 1, 3, false);
        let w = test_model(&params, Dtype::F16, 3);
        let be = CpuBackend::new();
        assert_eq!(be.name(), "cpu");
        let e = be.forward(&w, &[0.0; 35], 1).unwrap_err();
        assert!(
            matches!(e, BackendError::Unsupported(_)) && e.to_string().contains("36"),
            "{e}"
        );
        let ok = be.forward(&w, &[0.5; 72], 2).unwrap();
        assert_eq!(ok.len(), 14);
        let mut w8 = w.clone();
        w8.params.use_fp8 = true;
        let e = be.forward(&w8, &[0.5; 36], 1).unwrap_err();
        assert!(e.to_string().contains("FP8 tensor cores"), "{e}");
        let e = be.build_model("00", &w8.params, Dtype::F16).unwrap_err();
        assert!(e.to_string().contains("FP8 tensor cores"), "{e}");
    }

    fn small() -> Params {
        Params {
            dim: 32,
            n_layers: 1,
            n_heads: 2,
            n_kv_heads: 2,
            vocab_size: 40,
            multiple_of: 32,
            seq_len: 4,
            ..Params::default()
        }
    }

    #[test]
    fn cpu_backend_refuses_fp8_and_builds_tiny() {
        let d = CpuBackend::new();
        let mut p = Params {
            dim: 64,
            n_layers: 1,
            n_heads: 4,
            n_kv_heads: 4,
            vocab_size: 50,
            multiple_of: 32,
            seq_len: 4,
            ..Params::default()
        };
        d.check(&p, Dtype::F16).unwrap();
        let m = d.build_model("h", &p, Dtype::F16).unwrap();
        let inputs = vec![0.5f32; 2 * 4 * 64];
        assert_eq!(d.forward_last_logits(&m, &inputs, 2).unwrap().len(), 100);
        p.use_fp8 = true;
        assert!(d
            .check(&p, Dtype::F16)
            .unwrap_err()
            .to_string()
            .contains("use_fp8"));
        let wrong: Model = Arc::new(3u8);
        assert!(d.forward_last_logits(&wrong, &inputs, 2).is_err());
        assert!(bytes_per_nonce(&p) > 0);
    }

    #[test]
    fn default_run_batch_is_forward_then_finish() {
        use crate::backend::batch::{self, JobSpec};
        let d = CpuBackend::new();
        let p = small();
        assert!(!d.overlaps_preparation());
        let m = d.build_model("bh", &p, Dtype::F16).unwrap();
        assert_eq!(d.max_batch(&m, &p), None);
        let nonces: Vec<u64> = (10..26).collect();
        // An r_target between the distances, so that some nonces are proofs and some not.
        let mut job = JobSpec::new("bh", "pk", &p, Dtype::F16, f64::INFINITY);
        let all = d
            .run_batch(&m, &job, batch::prepare(&job, nonces.clone()), true)
            .unwrap();
        let mut sorted = all.distances().unwrap().to_vec();
        sorted.sort_by(f64::total_cmp);
        job.r_target = sorted[nonces.len() / 2];

        let prepared = batch::prepare(&job, nonces.clone());
        let logits = d
            .forward_last_logits(&m, &prepared.inputs, prepared.nonces.len())
            .unwrap();
        let want = batch::finish(&job, prepared.clone(), &logits);
        assert_eq!(want.nonces, nonces);
        assert_eq!(want.dist, all.dist);
        assert_eq!(want.valid_nonces.len(), nonces.len() / 2);
        assert!(want.distances().is_some());

        let got = d.run_batch(&m, &job, prepared.clone(), true).unwrap();
        assert_eq!(got, want);

        // Without all_distances: every nonce, only the proofs' distances.
        let got = d.run_batch(&m, &job, prepared, false).unwrap();
        assert_eq!(got.nonces, nonces);
        assert_eq!(got.valid_nonces, want.valid_nonces);
        assert_eq!(got.valid_dist, want.valid_dist);
        assert!(got.distances().is_none());
        assert!(got.valid_dist.iter().all(|&x| x < job.r_target));

        let wrong: Model = Arc::new(3u8);
        let prepared = batch::prepare(&job, nonces);
        assert!(d.run_batch(&wrong, &job, prepared, false).is_err());
    }

    /// The whole forward on every product path this machine runs, and on the AMX and
    /// `vdpbf16ps` drivers through their software models: each against the naive forward by
    /// the criteria of `optimised_forward_matches_the_naive_reference`, and the FMA paths
    /// (which add in the same order) bit for bit equal to one another.
    #[test]
    fn every_product_path_runs_the_forward() {
        let host = matmul::Features::host();
        let cases = [
            (shape(12, 2, 2, 2, 7, 1, 5, false), 3),
            (shape(40, 3, 4, 1, 13, 8, 9, true), 2),
            (shape(96, 2, 6, 2, 20, 32, 16, false), 3),
        ];
        for dt in Dtype::ALL {
            let mut kernels: Vec<Kernel> = Kernel::ALL
                .into_iter()
                .filter(|k| k.runs(dt, &host))
                .collect();
            if dt != Dtype::F32 {
                kernels.push(Kernel::AmxModel);
            }
            if dt == Dtype::Bf16 {
                kernels.push(Kernel::Avx512Bf16Model);
            }
            let mut mismatched = std::collections::BTreeMap::new();
            for (ci, (params, batch)) in cases.iter().enumerate() {
                let w = test_model(params, dt, 2000 + ci as u64);
                let n_in = batch * params.seq_len_usize() * params.dim_usize();
                let inputs = Filler::new(88 + ci as u64).vec(n_in, 1.7, dt);
                let per = params.seq_len_usize() * params.dim_usize();
                let want: Vec<f32> = (0..*batch)
                    .flat_map(|b| naive_forward_one(&w, &inputs[b * per..(b + 1) * per]))
                    .collect();
                let scale = want.iter().fold(0f32, |a, &v| a.max(v.abs()));
                let mut fma_logits: Option<Vec<f32>> = None;
                for &kernel in &kernels {
                    let model = CpuModel::from_weights(&w, kernel).unwrap();
                    let got = forward_last_logits(&model, &inputs, *batch);
                    let diff = got
                        .iter()
                        .zip(&want)
                        .fold(0f32, |a, (g, w)| a.max((g - w).abs()));
                    let ulps = diff / (scale * eps_of(dt));
                    let differ = got.iter().zip(&want).filter(|(g, w)| g != w).count();
                    // The naive forward adds products without FMAs, in its own order; in
                    // f32 (no rounding to a dtype between layers) such differences add up
                    // over the layers to some ulps of the largest logit, in f16 and bf16
                    // they mostly vanish in the roundings.
                    let allowed = if dt == Dtype::F32 { 16.0 } else { 4.0 };
                    assert!(
                        ulps <= allowed,
                        "{kernel} case {ci} {dt}: {ulps:.2} ulps of the largest logit"
                    );
                    let counts = mismatched.entry(kernel.name()).or_insert((0, 0));
                    counts.0 += differ;
                    counts.1 += got.len();
                    if matches!(kernel, Kernel::Scalar | Kernel::Avx2 | Kernel::Avx512) {
                        match &fma_logits {
                            None => fma_logits = Some(got),
                            Some(first) => assert_eq!(first, &got, "{kernel} case {ci} {dt}"),
                        }
                    }
                }
            }
            for (kernel, (differ, total)) in mismatched {
                eprintln!("{kernel} {dt}: {differ} of {total} logits differ from the naive");
                if dt != Dtype::F32 {
                    assert!(differ * 4 <= total, "{kernel} {dt}: {differ} of {total}");
                }
            }
        }
    }
}
