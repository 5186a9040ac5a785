//! Attention as [`super::attention`] computes it, value for value, with the scores of a
//! query vectorised across keys.
//!
//! The readable version takes one key at a time and sums `q[t] * k[t]` over `t` in a
//! scalar loop (a dependency chain the CPU cannot overlap). Here the keys of each nonce and
//! kv head are first transposed (`t`-major, keys contiguous), so that one pass over `t`
//! advances every key's sum by one term: the same products, added in the same order to
//! the same -0.0 start (`Iterator::sum`'s), so every score is bit-identical; only
//! independent sums run side by side in vector lanes. Softmax and the product with `v` are
//! the readable version's loops.

use super::simd::wide_fn;
use super::AttnShape;
use crate::pow::dtype::Rounding;
use rayon::prelude::*;

/// Keys are padded to a multiple of this in the transposed layout.
const KEY_PAD: usize = 16;

/// Positions per nonce as transposed (padded to [`KEY_PAD`]).
fn padded(seq: usize) -> usize {
    seq.next_multiple_of(KEY_PAD)
}

/// Values of the transposed keys of `batch` nonces.
pub(super) fn transposed_len(batch: usize, sh: &AttnShape) -> usize {
    batch * sh.n_kv_heads * sh.head_dim * padded(sh.seq)
}

/// `kt[((b * n_kv_heads + g) * head_dim + t) * seq_pad + j] = k[(b * seq + j) * kv_width +
/// g * head_dim + t]`: for each nonce and kv head, the keys' component `t` contiguous.
pub(super) fn transpose_keys(k: &[f32], kt: &mut [f32], batch: usize, sh: &AttnShape) {
    let (seq, hd, n_kv) = (sh.seq, sh.head_dim, sh.n_kv_heads);
    let kv_width = n_kv * hd;
    let seq_pad = padded(seq);
    let per_head = hd * seq_pad;
    kt[..batch * n_kv * per_head]
        .par_chunks_mut(per_head)
        .enumerate()
        .for_each(|(bg, dst)| {
            let (b, g) = (bg / n_kv, bg % n_kv);
            for j in 0..seq {
                let src = &k[(b * seq + j) * kv_width + g * hd..][..hd];
                for (t, &v) in src.iter().enumerate() {
                    dst[t * seq_pad + j] = v;
                }
            }
        });
}

/// [`super::attention`] with the keys given transposed by [`transpose_keys`].
pub(super) fn attention_by_keys<R: Rounding>(
    q: &[f32],
    kt: &[f32],
    v: &[f32],
    out: &mut [f32],
    sh: AttnShape,
) {
    let q_width = sh.n_heads * sh.head_dim;
    out.par_chunks_mut(q_width)
        .zip(q.par_chunks(q_width))
        .enumerate()
        .for_each_init(
            || vec![0f32; padded(sh.seq)],
            |scores, (r, (orow, qrow))| row_wide::<R>(scores, r, qrow, kt, v, orow, &sh),
        );
}

wide_fn! {
    /// [`row`], compiled for the widest vectors.
    fn row_wide<R: Rounding>(
        scores: &mut [f32],
        r: usize,
        qrow: &[f32],
        kt: &[f32],
        v: &[f32],
        orow: &mut [f32],
        sh: &AttnShape,
    ) {
        row::<R>(scores, r, qrow, kt, v, orow, sh)
    }
}

/// One query row (all heads); mirrors the body of [`super::attention`].
#[inline(always)]
fn row<R: Rounding>(
    scores: &mut [f32],
    r: usize,
    qrow: &[f32],
    kt: &[f32],
    v: &[f32],
    orow: &mut [f32],
    sh: &AttnShape,
) {
    let (seq, hd, qr) = (sh.seq, sh.head_dim, sh.q_rows_per_batch);
    let kv_width = sh.n_kv_heads * hd;
    let rep = sh.n_heads / sh.n_kv_heads;
    let seq_pad = padded(seq);
    let scale = (hd as f64).sqrt() as f32;
    let b = r / qr;
    let i = seq - qr + r % qr;
    let kv_base = b * seq;
    let scores = &mut scores[..=i];
    for h in 0..sh.n_heads {
        let g = h / rep;
        let qh = &qrow[h * hd..(h + 1) * hd];
        let keys = &kt[(b * sh.n_kv_heads + g) * hd * seq_pad..][..hd * seq_pad];
        // sum_t q[t] * k_j[t] for every j <= i at once, t in order from -0.0.
        scores.fill(-0.0);
        for (t, &qt) in qh.iter().enumerate() {
            for (s, &kv) in scores.iter_mut().zip(&keys[t * seq_pad..]) {
                *s += qt * kv;
            }
        }
        let mut max = f32::NEG_INFINITY;
        for s in scores.iter_mut() {
            let raw = R::round(*s);
            *s = R::round(raw / scale);
            max = max.max(*s);
        }
        let mut sum = 0f32;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        let inv = 1.0f32 / sum;
        for s in scores.iter_mut() {
            *s = R::round(*s * inv);
        }
        let oh = &mut orow[h * hd..(h + 1) * hd];
        oh.fill(0.0);
        let kv_off = g * hd;
        for (j, &p) in scores.iter().enumerate() {
            let vrow = &v[(kv_base + j) * kv_width + kv_off..][..hd];
            for (o, &vv) in oh.iter_mut().zip(vrow) {
                *o += p * vv;
            }
        }
        for o in oh.iter_mut() {
            *o = R::round(*o);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pow::dtype::{Dtype, RoundBf16, RoundF16, RoundF32};
    use crate::splitmix::SplitMix64;

    fn run<R: Rounding>(q: &[f32], k: &[f32], v: &[f32], sh: AttnShape, batch: usize) {
        let mut want = vec![f32::NAN; q.len()];
        super::super::attention::<R>(q, k, v, &mut want, sh);
        let mut kt = vec![f32::NAN; transposed_len(batch, &sh)];
        transpose_keys(k, &mut kt, batch, &sh);
        let mut got = vec![f32::NAN; q.len()];
        attention_by_keys::<R>(q, &kt, v, &mut got, sh);
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&got),
            bits(&want),
            "{:?} {:?}",
            R::DTYPE,
            (batch, sh.seq)
        );
    }

    /// Bit for bit the readable attention, on the shapes of the CUDA kernels' tests.
    #[test]
    fn equals_the_readable_attention_bit_for_bit() {
        // (batch, seq, n_heads, n_kv_heads, head_dim, q_rows_per_batch)
        let shapes = [
            (1, 1, 4, 4, 2, 1),
            (2, 3, 4, 4, 6, 3),
            (3, 3, 8, 2, 6, 1),
            (2, 17, 8, 2, 28, 17),
            (2, 17, 4, 4, 64, 1),
            (1, 40, 8, 2, 6, 40),
            (1, 100, 4, 1, 6, 100),
            (2, 64, 16, 16, 64, 64),
            (3, 64, 16, 16, 64, 1),
        ];
        let mut rng = SplitMix64(5);
        for dt in Dtype::ALL {
            for &(batch, seq, n_heads, n_kv, hd, qr) in &shapes {
                let mut vals = |n: usize, scale: f64| -> Vec<f32> {
                    (0..n)
                        .map(|_| dt.round(((rng.unit() * 2.0 - 1.0) * scale) as f32))
                        .collect()
                };
                let q = vals(batch * qr * n_heads * hd, 3.0);
                let k = vals(batch * seq * n_kv * hd, 3.0);
                let v = vals(batch * seq * n_kv * hd, 2.0);
                let sh = AttnShape {
                    seq,
                    n_heads,
                    n_kv_heads: n_kv,
                    head_dim: hd,
                    q_rows_per_batch: qr,
                };
                match dt {
                    Dtype::F32 => run::<RoundF32>(&q, &k, &v, sh, batch),
                    Dtype::F16 => run::<RoundF16>(&q, &k, &v, sh, batch),
                    Dtype::Bf16 => run::<RoundBf16>(&q, &k, &v, sh, batch),
                }
            }
        }
    }
}
