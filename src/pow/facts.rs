//! `facts`: hashes of everything random a request implies, in the golden files' format, so
//! that an operator can check an install against the reference without running a model.
//! Parameters are hashed straight from the pool, so PARAMS_V2 (17.8 B values) never exists
//! in memory; nor does its 888 M-value pool, unless a parameter asked for is tiled from it
//! (see [`PoolPass`]).

use super::dtype::Dtype;
use super::params::Params;
use super::proof;
use super::weights::{self, PoolSlice};
use super::{rng, seeds};
use half::f16;
use rayon::prelude::*;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::borrow::Cow;

/// Values converted to bytes per hasher update: big enough to amortise, small enough for cache.
const HASH_CHUNK: usize = 1 << 14;

/// How values are laid out for hashing: f16 for float16 models, f32 for the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashElem {
    F16,
    F32,
}

impl HashElem {
    pub fn for_dtype(dtype: Dtype) -> Self {
        if dtype == Dtype::F16 {
            HashElem::F16
        } else {
            HashElem::F32
        }
    }

    /// Feed values (f32 holding dtype-exact values) to a hasher as little-endian bytes.
    pub fn update(self, h: &mut Sha256, values: &[f32]) {
        let mut buf = Vec::with_capacity(HASH_CHUNK * 4);
        for chunk in values.chunks(HASH_CHUNK) {
            buf.clear();
            match self {
                HashElem::F16 => chunk
                    .iter()
                    .for_each(|&v| buf.extend_from_slice(&f16::from_f32(v).to_le_bytes())),
                HashElem::F32 => chunk
                    .iter()
                    .for_each(|&v| buf.extend_from_slice(&v.to_le_bytes())),
            }
            h.update(&buf);
        }
    }

    pub fn sha256(self, values: &[f32]) -> String {
        let mut h = Sha256::new();
        self.update(&mut h, values);
        hex::encode(h.finalize())
    }
}

pub fn sha256_f64le(values: &[f64]) -> String {
    let mut h = Sha256::new();
    values.iter().for_each(|v| h.update(v.to_le_bytes()));
    hex::encode(h.finalize())
}

pub fn sha256_i64le(values: &[i64]) -> String {
    let mut h = Sha256::new();
    values.iter().for_each(|v| h.update(v.to_le_bytes()));
    hex::encode(h.finalize())
}

/// Values whose little-endian bytes are hashed.
trait LeBytes: Copy + Send + Sync + 'static {
    fn le_bytes(values: &[Self]) -> Cow<'_, [u8]>;
}

/// The bytes of plain numbers as they lie in memory: on a little-endian machine, their
/// little-endian bytes, borrowed; elsewhere converted.
macro_rules! le_bytes_of {
    ($t:ty) => {
        impl LeBytes for $t {
            fn le_bytes(values: &[$t]) -> Cow<'_, [u8]> {
                if cfg!(target_endian = "little") {
                    // SAFETY: $t is a plain number type with no padding and no invalid bit
                    // patterns as bytes; the byte slice covers exactly the same memory
                    // (size_of_val bytes) for the same lifetime, and u8 has alignment 1.
                    Cow::Borrowed(unsafe {
                        std::slice::from_raw_parts(
                            values.as_ptr().cast::<u8>(),
                            std::mem::size_of_val(values),
                        )
                    })
                } else {
                    Cow::Owned(values.iter().flat_map(|v| v.to_le_bytes()).collect())
                }
            }
        }
    };
}
le_bytes_of!(u16);
le_bytes_of!(f32);

/// A value of the pool in the layout its hash covers: f16 bit patterns for float16 models,
/// f32 for the others, so that a stretch of the pool is hashed as it lies in memory.
trait PoolValue: LeBytes {
    fn to_f32(self) -> f32;
}

impl PoolValue for u16 {
    fn to_f32(self) -> f32 {
        f16::from_bits(self).to_f32()
    }
}

impl PoolValue for f32 {
    fn to_f32(self) -> f32 {
        self
    }
}

/// How the pool is gone through. `Streamed` hashes each stretch as it is drawn and keeps
/// none of it: the pool's hash, and every parameter that lies in the pool directly hashed
/// from the stretches that cover it (in order, so one hasher each). `Held` keeps the whole
/// pool, which a tiled parameter needs (its values wrap around the pool). Both hash the
/// pool while it is drawn; streaming also saves faulting in and copying the pool's memory
/// (1.78 GB for PARAMS_V2), so `facts` costs about the drawing alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PoolPass {
    Held,
    Streamed,
}

/// Where a parameter's values come from, and whether they are hashed.
struct SliceOf {
    name_hash: u64,
    slice: PoolSlice,
    numel: u64,
    wanted: bool,
}

/// The pool's hash, its first eight values and the hash of each wanted parameter.
struct PoolFacts {
    hash: String,
    first8: Vec<f32>,
    param_hashes: Vec<Option<String>>,
}

impl PoolPass {
    /// Streamed unless a wanted parameter is tiled.
    fn for_slices(slices: &[SliceOf]) -> Self {
        if slices
            .iter()
            .all(|s| !s.wanted || matches!(s.slice, PoolSlice::Direct { .. }))
        {
            PoolPass::Streamed
        } else {
            PoolPass::Held
        }
    }
}

/// `seeded(block_hash, 4).normal(0, 0.02, pool_size)` rounded f64 -> f32 -> dtype, gone
/// through as `pass` says: its SHA-256 in the layout of [`HashElem::for_dtype`], its first
/// values, and the hashes of the wanted parameters.
fn pool_facts(
    block_hash: &str,
    pool_size: u64,
    dtype: Dtype,
    slices: &[SliceOf],
    pass: PoolPass,
) -> PoolFacts {
    let entropy = seeds::entropy(&seeds::weights_seed(block_hash), seeds::WEIGHTS_HASHES);
    let n = pool_size as usize;
    match HashElem::for_dtype(dtype) {
        HashElem::F16 => pool_facts_as(&entropy, n, slices, pass, |x| {
            f16::from_f32(x as f32).to_bits()
        }),
        HashElem::F32 => pool_facts_as(&entropy, n, slices, pass, |x| dtype.round(x as f32)),
    }
}

fn pool_facts_as<T: PoolValue>(
    entropy: &[u32],
    n: usize,
    slices: &[SliceOf],
    pass: PoolPass,
    map: impl Fn(f64) -> T + Sync,
) -> PoolFacts {
    match pass {
        PoolPass::Held => held_pool_facts(entropy, n, slices, map),
        PoolPass::Streamed => streamed_pool_facts(entropy, n, slices, map),
    }
}

/// [`PoolPass::Held`]: the pool kept whole, each stretch copied and hashed as it is drawn;
/// the parameters hashed from it afterwards, in parallel.
fn held_pool_facts<T: PoolValue>(
    entropy: &[u32],
    n: usize,
    slices: &[SliceOf],
    map: impl Fn(f64) -> T + Sync,
) -> PoolFacts {
    let mut pool = Vec::with_capacity(n);
    let mut h = Sha256::new();
    rng::stream_normal_parallel(entropy, 0.0, weights::POOL_SCALE, n, map, |s| {
        h.update(T::le_bytes(s));
        pool.extend_from_slice(s);
    });
    let param_hashes = slices
        .par_iter()
        .map(|s| {
            s.wanted.then(|| {
                let mut h = Sha256::new();
                s.slice
                    .for_each_run(n, s.numel as usize, |r| h.update(T::le_bytes(&pool[r])));
                hex::encode(h.finalize())
            })
        })
        .collect();
    PoolFacts {
        hash: hex::encode(h.finalize()),
        first8: pool.iter().take(8).map(|&v| v.to_f32()).collect(),
        param_hashes,
    }
}

/// [`PoolPass::Streamed`]: every stretch, as it is drawn, goes to the pool's hasher and to
/// the hasher of each wanted parameter it overlaps (those in parallel); nothing is kept.
fn streamed_pool_facts<T: PoolValue>(
    entropy: &[u32],
    n: usize,
    slices: &[SliceOf],
    map: impl Fn(f64) -> T + Sync,
) -> PoolFacts {
    // (pool range, hasher) of each wanted parameter, in the order of `slices`.
    let mut params: Vec<Option<(std::ops::Range<usize>, Sha256)>> = slices
        .iter()
        .map(|s| match (s.wanted, s.slice) {
            (true, PoolSlice::Direct { start }) => {
                let start = start as usize;
                Some((start..start + s.numel as usize, Sha256::new()))
            }
            (false, _) => None,
            (true, PoolSlice::Tiled { .. }) => unreachable!("a tiled parameter is held"),
        })
        .collect();
    let mut pool_hasher = Sha256::new();
    let mut first8 = Vec::with_capacity(8);
    let mut at = 0usize;
    rng::stream_normal_parallel(entropy, 0.0, weights::POOL_SCALE, n, map, |s| {
        let span = at..at + s.len();
        first8.extend(s.iter().take(8 - first8.len()).map(|&v| v.to_f32()));
        rayon::join(
            || pool_hasher.update(T::le_bytes(s)),
            || {
                params.par_iter_mut().flatten().for_each(|(range, h)| {
                    let lo = range.start.max(span.start);
                    let hi = range.end.min(span.end);
                    if lo < hi {
                        h.update(T::le_bytes(&s[lo - span.start..hi - span.start]));
                    }
                })
            },
        );
        at = span.end;
    });
    debug_assert_eq!(at, n);
    PoolFacts {
        hash: hex::encode(pool_hasher.finalize()),
        first8,
        param_hashes: params
            .into_iter()
            .map(|p| p.map(|(_, h)| hex::encode(h.finalize())))
            .collect(),
    }
}

/// One parameter's facts.
#[derive(Debug, Clone, Serialize)]
pub struct ParamFacts {
    pub name: String,
    pub shape: Vec<usize>,
    pub numel: u64,
    pub name_hash: u64,
    /// Pool offset of a parameter that fits in the pool (absent when it is tiled).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256_f16le: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256_f32le: Option<String>,
}

/// Everything `llama-pow facts` prints.
#[derive(Debug, Clone, Serialize)]
pub struct Facts {
    pub params: Params,
    pub dtype: Dtype,
    pub block_hash: String,
    pub public_key: String,
    pub total_params: u64,
    pub pool_size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool_sha256_f16le: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool_sha256_f32le: Option<String>,
    pub pool_first8: Vec<f32>,
    pub parameters: Vec<ParamFacts>,
    pub target_sha256_f64le: String,
    pub nonces: Vec<u64>,
    pub inputs_sha256_f16le: Vec<String>,
    pub permutations_sha256_i64le: Vec<String>,
}

/// Which parameters get their values hashed.
#[derive(Debug, Clone)]
pub enum ParamSelection {
    All,
    Named(Vec<String>),
}

/// What to compute facts for.
pub struct FactsInput<'a> {
    pub block_hash: &'a str,
    pub public_key: &'a str,
    pub params: &'a Params,
    pub dtype: Dtype,
    pub nonces: &'a [u64],
    pub selection: &'a ParamSelection,
}

/// An unknown `--param` name.
#[derive(Debug, thiserror::Error)]
#[error("--param {0:?}: no such parameter (names look like \"layers.0.attention.wq.weight\")")]
pub struct UnknownParam(pub String);

pub fn compute(input: &FactsInput<'_>) -> Result<Facts, UnknownParam> {
    compute_with(input, None)
}

/// [`compute`], going through the pool as `pass` says (or as the parameters asked for
/// allow, when `None`).
fn compute_with(input: &FactsInput<'_>, pass: Option<PoolPass>) -> Result<Facts, UnknownParam> {
    let specs = weights::param_specs(input.params);
    if let ParamSelection::Named(names) = input.selection {
        if let Some(bad) = names.iter().find(|n| !specs.iter().any(|s| &s.name == *n)) {
            return Err(UnknownParam(bad.clone()));
        }
    }
    let total = weights::total_params(input.params);
    let pool_size = weights::pool_size(total);
    let elem = HashElem::for_dtype(input.dtype);
    let slices: Vec<SliceOf> = specs
        .iter()
        .map(|spec| {
            let name_hash = weights::name_hash(input.block_hash, &spec.name);
            SliceOf {
                name_hash,
                slice: PoolSlice::new(name_hash, spec.numel(), pool_size),
                numel: spec.numel(),
                wanted: match input.selection {
                    ParamSelection::All => true,
                    ParamSelection::Named(names) => names.contains(&spec.name),
                },
            }
        })
        .collect();
    let pool = pool_facts(
        input.block_hash,
        pool_size,
        input.dtype,
        &slices,
        pass.unwrap_or_else(|| PoolPass::for_slices(&slices)),
    );

    let parameters: Vec<ParamFacts> = specs
        .iter()
        .zip(&slices)
        .zip(pool.param_hashes)
        .map(|((spec, s), hash)| ParamFacts {
            name: spec.name.clone(),
            shape: spec.shape.clone(),
            numel: s.numel,
            name_hash: s.name_hash,
            start: match s.slice {
                PoolSlice::Direct { start } => Some(start),
                PoolSlice::Tiled { .. } => None,
            },
            sha256_f16le: hash.clone().filter(|_| elem == HashElem::F16),
            sha256_f32le: hash.filter(|_| elem == HashElem::F32),
        })
        .collect();

    let vocab = input.params.vocab_usize();
    let target = proof::target(input.block_hash, vocab);
    let per_nonce: Vec<(String, String)> = input
        .nonces
        .par_iter()
        .map(|&n| {
            // Inputs are generated in float16 whatever the model dtype: hash them as such.
            let x = proof::inputs(
                input.block_hash,
                input.public_key,
                n,
                input.params,
                Dtype::F16,
            );
            let p = proof::permutation(input.block_hash, input.public_key, n, vocab);
            (HashElem::F16.sha256(&x), sha256_i64le(&p))
        })
        .collect();
    let (inputs_sha256_f16le, permutations_sha256_i64le) = per_nonce.into_iter().unzip();

    Ok(Facts {
        params: input.params.clone(),
        dtype: input.dtype,
        block_hash: input.block_hash.to_owned(),
        public_key: input.public_key.to_owned(),
        total_params: total,
        pool_size,
        pool_sha256_f16le: (elem == HashElem::F16).then(|| pool.hash.clone()),
        pool_sha256_f32le: (elem == HashElem::F32).then_some(pool.hash),
        pool_first8: pool.first8,
        parameters,
        target_sha256_f64le: sha256_f64le(&target),
        nonces: input.nonces.to_vec(),
        inputs_sha256_f16le,
        permutations_sha256_i64le,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(dim: i64, vocab: i64) -> Params {
        let mut p = Params::v2();
        p.dim = dim;
        p.n_layers = 2;
        p.n_heads = 4;
        p.n_kv_heads = 2;
        p.vocab_size = vocab;
        p.ffn_dim_multiplier = 1.0;
        p.multiple_of = 32;
        p.seq_len = 4;
        p
    }

    fn facts(p: &Params, dtype: Dtype, selection: &ParamSelection, pass: PoolPass) -> Facts {
        let input = FactsInput {
            block_hash: "00ff5f1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6",
            public_key: "gonka1streamedpoolcheck",
            params: p,
            dtype,
            nonces: &[0, 7],
            selection,
        };
        compute_with(&input, Some(pass)).unwrap()
    }

    /// Streaming the pool gives every hash and value that holding it gives, in every hash
    /// layout, for all parameters and for a few.
    #[test]
    fn a_streamed_pool_gives_the_facts_of_a_held_one() {
        // Every parameter of a dim-32 model lies in the 50,000-value pool directly.
        let small = params(32, 300);
        let specs = weights::param_specs(&small);
        let names: Vec<String> = specs.iter().step_by(3).map(|s| s.name.clone()).collect();
        for dtype in [Dtype::F16, Dtype::Bf16, Dtype::F32] {
            for selection in [ParamSelection::All, ParamSelection::Named(names.clone())] {
                let held = facts(&small, dtype, &selection, PoolPass::Held);
                let streamed = facts(&small, dtype, &selection, PoolPass::Streamed);
                assert_eq!(
                    serde_json::to_value(&held).unwrap(),
                    serde_json::to_value(&streamed).unwrap(),
                    "{dtype} {selection:?}"
                );
                assert!(held.parameters.iter().all(|p| p.start.is_some()));
            }
        }
    }

    /// A tiled parameter needs the pool held; one that lies in it directly does not.
    #[test]
    fn only_a_tiled_parameter_asked_for_holds_the_pool() {
        let mixed = params(256, 300);
        let total = weights::total_params(&mixed);
        let pool_size = weights::pool_size(total);
        let slices: Vec<(String, PoolSlice, u64)> = weights::param_specs(&mixed)
            .iter()
            .map(|s| {
                let h = weights::name_hash("ab", &s.name);
                (
                    s.name.clone(),
                    PoolSlice::new(h, s.numel(), pool_size),
                    s.numel(),
                )
            })
            .collect();
        let tiled = slices
            .iter()
            .find(|s| matches!(s.1, PoolSlice::Tiled { .. }))
            .expect("a dim-256 layer's products are larger than the pool");
        let direct = slices
            .iter()
            .find(|s| matches!(s.1, PoolSlice::Direct { .. }))
            .expect("its norms lie in the pool");
        let pass = |wanted: &str| {
            PoolPass::for_slices(
                &slices
                    .iter()
                    .map(|(name, slice, numel)| SliceOf {
                        name_hash: 0,
                        slice: *slice,
                        numel: *numel,
                        wanted: name == wanted,
                    })
                    .collect::<Vec<_>>(),
            )
        };
        assert_eq!(pass(&tiled.0), PoolPass::Held);
        assert_eq!(pass(&direct.0), PoolPass::Streamed);
        // And the direct one's facts agree either way, next to tiled ones not asked for.
        let selection = ParamSelection::Named(vec![direct.0.clone()]);
        let held = facts(&mixed, Dtype::F16, &selection, PoolPass::Held);
        let streamed = facts(&mixed, Dtype::F16, &selection, PoolPass::Streamed);
        assert_eq!(
            serde_json::to_value(&held).unwrap(),
            serde_json::to_value(&streamed).unwrap()
        );
    }
}
