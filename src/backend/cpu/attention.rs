//! Attention as [`super::attention`] computes it, value for value, with the scores of a
//! query vectorised across keys.
//!
//! The readable version takes one key at a time and sums `q[t] * k[t]` over `t` in a
//! scalar loop (a dependency chain the CPU cannot overlap). Here the keys of each nonce and
//! kv head are first transposed (`t`-major, keys contiguous), so that one pass over `t`
//! advances every key's sum by one term: the same products, added in the same order to
//! the same -0.0 start (`Iterator::sum`'s), so every score is bit-identical; only
//! independent sums run side by side in vector lanes. Softmax after its maximum is the
//! readable version's own function; the product with `v` sums in the same order.

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

/// The largest value of `xs` (NEG_INFINITY when empty), in 16 independent lanes.
#[inline(always)]
fn max_in_lanes(xs: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let mut chunks = xs.chunks_exact(16);
    for c in chunks.by_ref() {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l = l.max(v);
        }
    }
    for (l, &v) in lanes.iter_mut().zip(chunks.remainder()) {
        *l = l.max(v);
    }
    lanes.iter().fold(f32::NEG_INFINITY, |m, &l| m.max(l))
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
    // Keys 0..=i, in whole blocks of KEY_PAD (the transposed keys are padded so).
    let blocks = (i + 1).div_ceil(KEY_PAD);
    let (all, _) = scores.split_at_mut(blocks * KEY_PAD);
    for h in 0..sh.n_heads {
        let g = h / rep;
        let qh = &qrow[h * hd..(h + 1) * hd];
        let keys = &kt[(b * sh.n_kv_heads + g) * hd * seq_pad..][..hd * seq_pad];
        // sum_t q[t] * k_j[t] for every j <= i at once, t in order from -0.0, up to four
        // blocks of keys at a time in registers (keys past i are computed and ignored).
        let mut first = 0;
        while first < blocks {
            let group = (blocks - first).min(4);
            let out = &mut all[first * KEY_PAD..(first + group) * KEY_PAD];
            let keys = &keys[first * KEY_PAD..];
            match group {
                1 => key_dots::<1>(qh, keys, seq_pad, out),
                2 => key_dots::<2>(qh, keys, seq_pad, out),
                3 => key_dots::<3>(qh, keys, seq_pad, out),
                _ => key_dots::<4>(qh, keys, seq_pad, out),
            }
            first += group;
        }
        let scores = &mut all[..=i];
        // The readable loop rounds, scales and takes the maximum in one pass; here the
        // elementwise part is a loop of its own (it vectorises) and the maximum is taken in
        // lanes (the maximum of the same values, whatever the order; a zero's sign cannot
        // matter, as only `s - max` is used).
        for s in scores.iter_mut() {
            let raw = R::round(*s);
            *s = R::round(raw / scale);
        }
        super::softmax_from_max::<R>(scores, max_in_lanes(scores));
        // o[t] = sum_j p_j v_j[t], j in order from +0.0, up to 64 components at a time in
        // four vector accumulators.
        let oh = &mut orow[h * hd..(h + 1) * hd];
        let vs = &v[kv_base * kv_width + g * hd..];
        let whole = hd / 16;
        let mut c0 = 0;
        while c0 < whole {
            let group = (whole - c0).min(4);
            let out = &mut oh[c0 * 16..(c0 + group) * 16];
            let vs = &vs[c0 * 16..];
            match group {
                1 => value_sums::<R, 1>(scores, vs, kv_width, out),
                2 => value_sums::<R, 2>(scores, vs, kv_width, out),
                3 => value_sums::<R, 3>(scores, vs, kv_width, out),
                _ => value_sums::<R, 4>(scores, vs, kv_width, out),
            }
            c0 += group;
        }
        let t0 = whole * 16;
        let rest = &mut oh[t0..];
        if !rest.is_empty() {
            rest.fill(0.0);
            for (j, &p) in scores.iter().enumerate() {
                let vrow = &vs[j * kv_width + t0..][..rest.len()];
                for (o, &vv) in rest.iter_mut().zip(vrow) {
                    *o += p * vv;
                }
            }
            for o in rest.iter_mut() {
                *o = R::round(*o);
            }
        }
    }
}

/// `out[c * 16 + l] = round_T(sum_j p[j] * v[j * stride + c * 16 + l])` for chunks `c < NC`,
/// each sum from +0.0 in increasing `j`, in `NC` vector accumulators.
#[inline(always)]
fn value_sums<R: Rounding, const NC: usize>(p: &[f32], v: &[f32], stride: usize, out: &mut [f32]) {
    let mut acc = [[0f32; 16]; NC];
    for (j, &pj) in p.iter().enumerate() {
        let row = &v[j * stride..][..NC * 16];
        for (a, vs) in acc.iter_mut().zip(row.chunks_exact(16)) {
            for (x, &vv) in a.iter_mut().zip(vs) {
                *x += pj * vv;
            }
        }
    }
    for (o, a) in out.chunks_exact_mut(16).zip(&acc) {
        for (o, &x) in o.iter_mut().zip(a) {
            *o = R::round(x);
        }
    }
}

/// `out[b * 16 + l] = sum_t q[t] * keys[t * stride + b * 16 + l]` for blocks `b < NB`, each
/// sum from -0.0 in increasing `t`, in `NB` vector accumulators.
#[inline(always)]
fn key_dots<const NB: usize>(q: &[f32], keys: &[f32], stride: usize, out: &mut [f32]) {
    let mut acc = [[-0.0f32; KEY_PAD]; NB];
    for (t, &qt) in q.iter().enumerate() {
        let row = &keys[t * stride..][..NB * KEY_PAD];
        for (a, ks) in acc.iter_mut().zip(row.chunks_exact(KEY_PAD)) {
            for (x, &kv) in a.iter_mut().zip(ks) {
                *x += qt * kv;
            }
        }
    }
    for (o, a) in out.chunks_exact_mut(KEY_PAD).zip(&acc) {
        o.copy_from_slice(a);
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
