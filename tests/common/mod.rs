//! Shared helpers for the golden tests: loading the reference's outputs.
#![allow(dead_code)]

use llama_pow::pow::dtype::Dtype;
use serde_json::Value;
use std::path::PathBuf;

/// One unit in the last place of `x` in `dtype` (the logits are rounded to the dtype last,
/// so a logit may sit one unit away from the reference's).
pub fn ulp(dtype: Dtype, x: f64) -> f64 {
    let (mantissa_bits, min_exp) = match dtype {
        Dtype::F32 => (23, -126),
        Dtype::F16 => (10, -14),
        Dtype::Bf16 => (7, -126),
    };
    let e = (x.abs().log2().floor() as i32).max(min_exp);
    2f64.powi(e - mantissa_bits)
}

/// `tests/golden/` of the source tree, or `LLAMA_POW_GOLDEN_DIR` when set: the GPU
/// acceptance bundle (scripts/gpu-acceptance.sh) runs these tests on another machine, with the
/// golden files beside them.
pub fn golden_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("LLAMA_POW_GOLDEN_DIR") {
        return PathBuf::from(dir);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("golden")
}

pub fn load(name: &str) -> Value {
    let path = golden_dir().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// The full-computation golden cases (every file but rng.json and v2_scale_facts.json).
pub const MODEL_CASES: [&str; 11] = [
    "tiny_f32",
    "tiny_f16",
    "tiny_bf16",
    "gqa_scaled_rope_f32",
    "gqa_scaled_rope_f16",
    "v2_shaped_f32",
    "v2_shaped_f16",
    "v2_shaped_bf16",
    "deep64_f32",
    "deep64_f16",
    "seq1_bignonce_f16",
];

pub fn f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

pub fn u64s(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

pub fn i64s(v: &Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

pub fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_owned())
        .collect()
}

pub fn str_of(v: &Value) -> &str {
    v.as_str().unwrap()
}
