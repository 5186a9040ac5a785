//! `facts`: hashes of everything random a request implies, in the golden files' format, so
//! that an operator can check an install against the reference without running a model.
//! Parameters are hashed straight from the pool, so PARAMS_V2 (17.8 B values) never exists
//! in memory: only its 888 M-value pool does.

use super::dtype::Dtype;
use super::params::Params;
use super::proof;
use super::weights::{self, PoolSlice};
use half::f16;
use rayon::prelude::*;
use serde::Serialize;
use sha2::{Digest, Sha256};

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
    let pool = weights::build_pool(input.block_hash, pool_size, input.dtype);
    let elem = HashElem::for_dtype(input.dtype);
    let pool_hash = elem.sha256(&pool);

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
                slice.for_each_run(pool.len(), numel as usize, |r| {
                    elem.update(&mut h, &pool[r])
                });
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
        pool_first8: pool.iter().take(8).copied().collect(),
        parameters,
        target_sha256_f64le: sha256_f64le(&target),
        nonces: input.nonces.to_vec(),
        inputs_sha256_f16le,
        permutations_sha256_i64le,
    })
}
