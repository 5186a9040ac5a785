//! What a proof is: per-nonce inputs and permutations, the target, the distance and the
//! strict `dist < r_target` filter. The reductions are numpy's own (pairwise summation), so
//! that given the same logits the distance is the reference's to the last bit.

use super::dtype::{round_f64_via_f32, Dtype};
use super::params::Params;
use super::seeds;

/// The unit target vector: `seeded(f"{block_hash}_target", 1).standard_normal(vocab)`
/// divided by its L2 norm, in f64.
pub fn target(block_hash: &str, vocab: usize) -> Vec<f64> {
    let mut g = seeds::seeded(&seeds::target_seed(block_hash), seeds::TARGET_HASHES);
    let mut t = vec![0f64; vocab];
    g.fill_standard_normal(&mut t);
    let norm = l2_norm_f64(&t);
    t.iter_mut().for_each(|x| *x /= norm);
    t
}

/// A nonce's input embeddings, `seq_len * dim` values as the model dtype sees them:
/// standard normals rounded f64 -> f32 -> f16 (the dtype inputs are generated in), then to
/// `dtype` (f16 -> bf16 for bfloat16 models).
pub fn inputs_into(block_hash: &str, public_key: &str, nonce: u64, dtype: Dtype, out: &mut [f32]) {
    let mut g = seeds::seeded(
        &seeds::input_seed(block_hash, public_key, nonce),
        seeds::INPUT_HASHES,
    );
    let mut normals = vec![0f64; out.len()];
    g.fill_standard_normal(&mut normals);
    for (o, &x) in out.iter_mut().zip(&normals) {
        *o = dtype.round(round_f64_via_f32(x, Dtype::F16));
    }
}

/// [`inputs_into`] for a whole model's shape.
pub fn inputs(
    block_hash: &str,
    public_key: &str,
    nonce: u64,
    params: &Params,
    dtype: Dtype,
) -> Vec<f32> {
    let mut v = vec![0f32; params.seq_len_usize() * params.dim_usize()];
    inputs_into(block_hash, public_key, nonce, dtype, &mut v);
    v
}

/// A nonce's output permutation of the vocabulary.
pub fn permutation(block_hash: &str, public_key: &str, nonce: u64, vocab: usize) -> Vec<i64> {
    let mut g = seeds::seeded(
        &seeds::permutation_seed(block_hash, public_key, nonce),
        seeds::PERMUTATION_HASHES,
    );
    g.permutation(vocab)
}

/// `dist = || o / ||o||_f32 - target ||_f64` with `o[j] = logits[perm[j]]`, computed as
/// the reference does with numpy: the normalisation in f32, the difference and its norm in f64.
pub fn distance(logits: &[f32], perm: &[i64], target: &[f64]) -> f64 {
    debug_assert_eq!(logits.len(), perm.len());
    debug_assert_eq!(logits.len(), target.len());
    let o: Vec<f32> = perm.iter().map(|&j| logits[j as usize]).collect();
    let sq: Vec<f32> = o.iter().map(|&x| x * x).collect();
    let norm = numpy_sum_f32(&sq).sqrt();
    let diff_sq: Vec<f64> = o
        .iter()
        .zip(target)
        .map(|(&x, &t)| {
            let d = (x / norm) as f64 - t;
            d * d
        })
        .collect();
    numpy_sum_f64(&diff_sq).sqrt()
}

/// A nonce is a proof when its distance is strictly below r_target.
#[inline]
pub fn is_valid(dist: f64, r_target: f64) -> bool {
    dist < r_target
}

/// L2 norm as `np.linalg.norm(x)` along an axis computes it: sqrt of numpy's sum of squares.
pub fn l2_norm_f64(x: &[f64]) -> f64 {
    let sq: Vec<f64> = x.iter().map(|&v| v * v).collect();
    numpy_sum_f64(&sq).sqrt()
}

/// Elements summed by a plain loop at the leaves of numpy's pairwise summation.
const PAIRWISE_BLOCK: usize = 128;

macro_rules! numpy_pairwise {
    ($name:ident, $t:ty) => {
        /// numpy's pairwise summation as `add.reduce` runs it over a contiguous axis.
        fn $name(a: &[$t]) -> $t {
            let n = a.len();
            if n < 8 {
                let mut res: $t = 0.0;
                for &x in a {
                    res += x;
                }
                res
            } else if n <= PAIRWISE_BLOCK {
                let mut r = [0 as $t; 8];
                r.copy_from_slice(&a[..8]);
                let full = n - n % 8;
                let mut i = 8;
                while i < full {
                    for j in 0..8 {
                        r[j] += a[i + j];
                    }
                    i += 8;
                }
                let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
                for &x in &a[full..] {
                    res += x;
                }
                res
            } else {
                let mut n2 = n / 2;
                n2 -= n2 % 8;
                $name(&a[..n2]) + $name(&a[n2..])
            }
        }
    };
}
numpy_pairwise!(pairwise_f32, f32);
numpy_pairwise!(pairwise_f64, f64);

/// `np.add.reduce` of a contiguous f32 vector (identity 0 plus the pairwise sum of all of it,
/// checked against numpy 2.4 for sizes 1 to 10007).
pub fn numpy_sum_f32(a: &[f32]) -> f32 {
    pairwise_f32(a)
}

/// `np.add.reduce` of a contiguous f64 vector.
pub fn numpy_sum_f64(a: &[f64]) -> f64 {
    pairwise_f64(a)
}
