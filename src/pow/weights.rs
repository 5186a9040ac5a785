//! The model's weights: which parameters exist, the random pool they are drawn from, and each
//! parameter's slice of it (direct, or tiled and rotated when it is larger than the pool).

use super::dtype::Dtype;
use super::params::Params;
use super::rng;
use super::seeds;
use sha2::{Digest, Sha256};

/// Standard deviation of the pool's normals (mean 0).
pub const POOL_SCALE: f64 = 0.02;
/// Fraction of the total parameter count drawn into the pool.
pub const POOL_FRACTION: f64 = 0.05;
/// The pool is never smaller than this.
pub const POOL_MIN: u64 = 50_000;

/// What a parameter is, for the forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    TokEmbeddings,
    Wq,
    Wk,
    Wv,
    Wo,
    W1,
    W2,
    W3,
    AttentionNorm,
    FfnNorm,
    Norm,
    Output,
}

/// One parameter, as `named_parameters()` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub kind: ParamKind,
    /// Layer index for per-layer parameters.
    pub layer: Option<usize>,
}

impl ParamSpec {
    pub fn numel(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }
}

/// Every parameter in PyTorch `named_parameters()` order.
pub fn param_specs(p: &Params) -> Vec<ParamSpec> {
    let dim = p.dim_usize();
    let hd = p.head_dim();
    let q = p.n_heads_usize() * hd;
    let kv = p.n_kv_heads_usize() * hd;
    let hidden = p.ffn_hidden();
    let vocab = p.vocab_usize();
    let mut specs = Vec::with_capacity(3 + 9 * p.n_layers_usize());
    let spec = |name: String, shape: Vec<usize>, kind, layer| ParamSpec {
        name,
        shape,
        kind,
        layer,
    };
    specs.push(spec(
        "tok_embeddings.weight".into(),
        vec![vocab, dim],
        ParamKind::TokEmbeddings,
        None,
    ));
    for i in 0..p.n_layers_usize() {
        let l = Some(i);
        let a = format!("layers.{i}.attention");
        let f = format!("layers.{i}.feed_forward");
        specs.push(spec(
            format!("{a}.wq.weight"),
            vec![q, dim],
            ParamKind::Wq,
            l,
        ));
        specs.push(spec(
            format!("{a}.wk.weight"),
            vec![kv, dim],
            ParamKind::Wk,
            l,
        ));
        specs.push(spec(
            format!("{a}.wv.weight"),
            vec![kv, dim],
            ParamKind::Wv,
            l,
        ));
        specs.push(spec(
            format!("{a}.wo.weight"),
            vec![dim, q],
            ParamKind::Wo,
            l,
        ));
        specs.push(spec(
            format!("{f}.w1.weight"),
            vec![hidden, dim],
            ParamKind::W1,
            l,
        ));
        specs.push(spec(
            format!("{f}.w2.weight"),
            vec![dim, hidden],
            ParamKind::W2,
            l,
        ));
        specs.push(spec(
            format!("{f}.w3.weight"),
            vec![hidden, dim],
            ParamKind::W3,
            l,
        ));
        specs.push(spec(
            format!("layers.{i}.attention_norm.weight"),
            vec![dim],
            ParamKind::AttentionNorm,
            l,
        ));
        specs.push(spec(
            format!("layers.{i}.ffn_norm.weight"),
            vec![dim],
            ParamKind::FfnNorm,
            l,
        ));
    }
    specs.push(spec("norm.weight".into(), vec![dim], ParamKind::Norm, None));
    specs.push(spec(
        "output.weight".into(),
        vec![vocab, dim],
        ParamKind::Output,
        None,
    ));
    specs
}

/// Sum of all numels, tok_embeddings included (the forward never reads it, but it counts).
/// Computed in closed form so that it is cheap for any size and never overflows.
pub fn total_params(p: &Params) -> u64 {
    let dim = p.dim.max(0) as u64;
    let hd = if p.n_heads > 0 {
        dim / p.n_heads as u64
    } else {
        0
    };
    let q = p.n_heads.max(0) as u64 * hd;
    let kv = p.n_kv_heads.max(0) as u64 * hd;
    let hidden = p.ffn_hidden() as u64;
    let vocab = p.vocab_size.max(0) as u64;
    let layers = p.n_layers.max(0) as u64;
    let per_layer = dim
        .saturating_mul(q * 2 + kv * 2)
        .saturating_add(dim.saturating_mul(hidden).saturating_mul(3))
        .saturating_add(2 * dim);
    vocab
        .saturating_mul(dim)
        .saturating_mul(2)
        .saturating_add(dim)
        .saturating_add(per_layer.saturating_mul(layers))
}

/// `max(50000, floor(total * 0.05))`.
pub fn pool_size(total: u64) -> u64 {
    // Python's int(total * 0.05) on a float: exact for every total below 2^53.
    POOL_MIN.max((total as f64 * POOL_FRACTION) as u64)
}

/// `int(first 8 hex digits of SHA-256(f"{block_hash}_{name}"), 16)`.
pub fn name_hash(block_hash: &str, name: &str) -> u64 {
    let d = Sha256::digest(seeds::param_name_seed(block_hash, name).as_bytes());
    u32::from_be_bytes([d[0], d[1], d[2], d[3]]) as u64
}

/// Where a parameter's values come from in the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolSlice {
    /// `values[k] = pool[start + k]`.
    Direct { start: u64 },
    /// The pool tiled to `numel` values, rotated left by `shift`:
    /// `values[k] = pool[((k + shift) % numel) % pool_size]`.
    Tiled { shift: u64 },
}

impl PoolSlice {
    pub fn new(name_hash: u64, numel: u64, pool_size: u64) -> Self {
        if numel <= pool_size {
            PoolSlice::Direct {
                start: name_hash % (pool_size - numel + 1),
            }
        } else {
            PoolSlice::Tiled {
                shift: name_hash % numel,
            }
        }
    }

    /// Call `f` with the parameter's values as consecutive runs of the pool, in order.
    pub fn for_each_run(
        self,
        pool_len: usize,
        numel: usize,
        mut f: impl FnMut(std::ops::Range<usize>),
    ) {
        match self {
            PoolSlice::Direct { start } => {
                let s = start as usize;
                f(s..s + numel);
            }
            PoolSlice::Tiled { shift } => {
                // The rotated sequence runs from position `shift` to the end of the tiled
                // array, then from its start; each stretch splits where a pool copy ends.
                let mut k = 0usize;
                let mut src = shift as usize;
                while k < numel {
                    if src == numel {
                        src = 0;
                    }
                    let in_pool = src % pool_len;
                    let run = (pool_len - in_pool).min(numel - src).min(numel - k);
                    f(in_pool..in_pool + run);
                    k += run;
                    src += run;
                }
            }
        }
    }

    /// Copy the parameter's values out of `pool` into `out` (`out.len()` is its numel).
    pub fn fill<T: Copy>(self, pool: &[T], out: &mut [T]) {
        let mut k = 0;
        self.for_each_run(pool.len(), out.len(), |r| {
            out[k..k + r.len()].copy_from_slice(&pool[r.clone()]);
            k += r.len();
        });
    }
}

/// The pool: `seeded(block_hash, 4).normal(0, 0.02, pool_size)`, each value rounded
/// f64 -> f32 -> dtype, kept as f32, on all threads.
pub fn build_pool(block_hash: &str, pool_size: u64, dtype: Dtype) -> Vec<f32> {
    let entropy = seeds::entropy(&seeds::weights_seed(block_hash), seeds::WEIGHTS_HASHES);
    let mut pool = vec![0f32; pool_size as usize];
    rng::fill_normal_parallel(&entropy, 0.0, POOL_SCALE, &mut pool, |x| {
        dtype.round(x as f32)
    });
    pool
}

/// One transformer block's weights, row-major `[out, in]` for the linear layers.
#[derive(Debug, Clone)]
pub struct LayerWeights {
    pub wq: Vec<f32>,
    pub wk: Vec<f32>,
    pub wv: Vec<f32>,
    pub wo: Vec<f32>,
    pub w1: Vec<f32>,
    pub w2: Vec<f32>,
    pub w3: Vec<f32>,
    pub attention_norm: Vec<f32>,
    pub ffn_norm: Vec<f32>,
}

/// A whole model's weights as f32 values that are exactly representable in `dtype`.
/// tok_embeddings is not kept: the inputs are embeddings already.
#[derive(Debug, Clone)]
pub struct ModelWeights {
    pub params: Params,
    pub dtype: Dtype,
    pub layers: Vec<LayerWeights>,
    pub norm: Vec<f32>,
    pub output: Vec<f32>,
}

impl ModelWeights {
    /// Build every parameter the forward pass reads from the pool of `block_hash`.
    pub fn build(block_hash: &str, params: &Params, dtype: Dtype) -> Self {
        let total = total_params(params);
        let psize = pool_size(total);
        let pool = build_pool(block_hash, psize, dtype);
        Self::from_pool(block_hash, params, dtype, &pool)
    }

    /// Build from an already drawn pool (shared across dtypes or cached).
    pub fn from_pool(block_hash: &str, params: &Params, dtype: Dtype, pool: &[f32]) -> Self {
        use rayon::prelude::*;
        let specs: Vec<ParamSpec> = param_specs(params)
            .into_iter()
            .filter(|s| s.kind != ParamKind::TokEmbeddings)
            .collect();
        let mut values: Vec<Vec<f32>> = specs
            .par_iter()
            .map(|spec| {
                let slice = PoolSlice::new(
                    name_hash(block_hash, &spec.name),
                    spec.numel(),
                    pool.len() as u64,
                );
                let mut v = vec![0f32; spec.numel() as usize];
                slice.fill(pool, &mut v);
                v
            })
            .collect();
        // Specs come in named_parameters() order: nine per layer, then norm and output.
        let output = values.pop().expect("output.weight");
        let norm = values.pop().expect("norm.weight");
        let mut it = values.into_iter();
        let mut next = || it.next().expect("per-layer parameter");
        let layers = (0..params.n_layers_usize())
            .map(|_| LayerWeights {
                wq: next(),
                wk: next(),
                wv: next(),
                wo: next(),
                w1: next(),
                w2: next(),
                w3: next(),
                attention_norm: next(),
                ffn_norm: next(),
            })
            .collect();
        ModelWeights {
            params: params.clone(),
            dtype,
            layers,
            norm,
            output,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiled_fill_matches_the_definition() {
        let pool: Vec<u32> = (0..7).collect();
        for numel in [8usize, 13, 14, 15, 30] {
            for hash in [0u64, 1, 6, 7, 12, 29, 1 << 31] {
                let slice = PoolSlice::new(hash, numel as u64, 7);
                let PoolSlice::Tiled { shift } = slice else {
                    panic!("tiled")
                };
                let mut out = vec![0u32; numel];
                slice.fill(&pool, &mut out);
                let want: Vec<u32> = (0..numel)
                    .map(|k| pool[((k + shift as usize) % numel) % 7])
                    .collect();
                assert_eq!(out, want, "numel {numel} hash {hash}");
            }
        }
    }

    #[test]
    fn direct_slice_fits_the_pool() {
        let pool: Vec<u32> = (0..10).collect();
        let s = PoolSlice::new(123, 10, 10);
        assert_eq!(s, PoolSlice::Direct { start: 0 });
        let s = PoolSlice::new(7, 4, 10);
        assert_eq!(s, PoolSlice::Direct { start: 0 });
        let mut out = [0u32; 4];
        PoolSlice::new(6, 4, 10).fill(&pool, &mut out);
        assert_eq!(out, [6, 7, 8, 9]);
    }

    #[test]
    fn totals_of_the_presets() {
        assert_eq!(total_params(&Params::v2()), 17_763_122_944);
        assert_eq!(pool_size(17_763_122_944), 888_156_147);
        let n: u64 = param_specs(&Params::v1()).iter().map(|s| s.numel()).sum();
        assert_eq!(total_params(&Params::v1()), n);
    }
}
