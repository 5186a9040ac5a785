//! `facts`: hashes of everything random a request implies, in the golden files' format, so
//! that an operator can check an install against the reference without running a model.
//! Parameters are hashed straight from the pool, so PARAMS_V2 (17.8 B values) never exists
//! in memory: only its 888 M-value pool does.

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

/// The pool held in the layout its hash covers: f16 bit patterns for float16 models, f32
/// for the others, so that a stretch of it is hashed as it lies in memory.
enum HashedPool {
    F16(Vec<u16>),
    F32(Vec<f32>),
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

impl HashedPool {
    /// `seeded(block_hash, 4).normal(0, 0.02, pool_size)` rounded f64 -> f32 -> dtype, and
    /// the SHA-256 of its values in the layout of [`HashElem::for_dtype`]. The hash is
    /// taken while the pool is drawn: each stretch, as soon as it is final, is fed to the
    /// hasher by a task that runs beside the drawing of the next one, so hashing 888 M
    /// values costs little beyond drawing them.
    fn draw(block_hash: &str, pool_size: u64, dtype: Dtype) -> (HashedPool, String) {
        let entropy = seeds::entropy(&seeds::weights_seed(block_hash), seeds::WEIGHTS_HASHES);
        let n = pool_size as usize;
        match HashElem::for_dtype(dtype) {
            HashElem::F16 => {
                let mut pool = vec![0u16; n];
                let hash = draw_hashing(&entropy, &mut pool, |x| f16::from_f32(x as f32).to_bits());
                (HashedPool::F16(pool), hash)
            }
            HashElem::F32 => {
                let mut pool = vec![0f32; n];
                let hash = draw_hashing(&entropy, &mut pool, |x| dtype.round(x as f32));
                (HashedPool::F32(pool), hash)
            }
        }
    }

    fn len(&self) -> usize {
        match self {
            HashedPool::F16(v) => v.len(),
            HashedPool::F32(v) => v.len(),
        }
    }

    /// The little-endian bytes of values `range`.
    fn le_bytes(&self, range: std::ops::Range<usize>) -> Cow<'_, [u8]> {
        match self {
            HashedPool::F16(v) => u16::le_bytes(&v[range]),
            HashedPool::F32(v) => f32::le_bytes(&v[range]),
        }
    }

    /// The first `n` values.
    fn first(&self, n: usize) -> Vec<f32> {
        match self {
            HashedPool::F16(v) => v
                .iter()
                .take(n)
                .map(|&b| f16::from_bits(b).to_f32())
                .collect(),
            HashedPool::F32(v) => v.iter().take(n).copied().collect(),
        }
    }
}

/// Fill `out` with the weight pool's normals mapped through `map`, hashing every finished
/// stretch in order (a task of its own beside the drawing of the next stretch); returns the
/// hex SHA-256 of all of `out`.
fn draw_hashing<T: LeBytes>(
    entropy: &[u32],
    out: &mut [T],
    map: impl Fn(f64) -> T + Sync,
) -> String {
    let mut h = Sha256::new();
    rng::fill_normal_parallel_in_order(entropy, 0.0, weights::POOL_SCALE, out, map, |stretch| {
        h.update(T::le_bytes(stretch))
    });
    hex::encode(h.finalize())
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
    let specs = weights::param_specs(input.params);
    if let ParamSelection::Named(names) = input.selection {
        if let Some(bad) = names.iter().find(|n| !specs.iter().any(|s| &s.name == *n)) {
            return Err(UnknownParam(bad.clone()));
        }
    }
    let total = weights::total_params(input.params);
    let pool_size = weights::pool_size(total);
    let elem = HashElem::for_dtype(input.dtype);
    let (pool, pool_hash) = HashedPool::draw(input.block_hash, pool_size, input.dtype);

    let parameters: Vec<ParamFacts> = specs
        .par_iter()
        .map(|spec| {
            let numel = spec.numel();
            let name_hash = weights::name_hash(input.block_hash, &spec.name);
            let slice = PoolSlice::new(name_hash, numel, pool_size);
            let wanted = match input.selection {
                ParamSelection::All => true,
                ParamSelection::Named(names) => names.contains(&spec.name),
            };
            let hash = wanted.then(|| {
                let mut h = Sha256::new();
                slice.for_each_run(pool.len(), numel as usize, |r| h.update(pool.le_bytes(r)));
                hex::encode(h.finalize())
            });
            ParamFacts {
                name: spec.name.clone(),
                shape: spec.shape.clone(),
                numel,
                name_hash,
                start: match slice {
                    PoolSlice::Direct { start } => Some(start),
                    PoolSlice::Tiled { .. } => None,
                },
                sha256_f16le: hash.clone().filter(|_| elem == HashElem::F16),
                sha256_f32le: hash.filter(|_| elem == HashElem::F32),
            }
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
        pool_sha256_f16le: (elem == HashElem::F16).then(|| pool_hash.clone()),
        pool_sha256_f32le: (elem == HashElem::F32).then_some(pool_hash),
        pool_first8: pool.first(8),
        parameters,
        target_sha256_f64le: sha256_f64le(&target),
        nonces: input.nonces.to_vec(),
        inputs_sha256_f16le,
        permutations_sha256_i64le,
    })
}
