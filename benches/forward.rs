//! Throughput of the CPU forward pass: nonces per second for the golden `tiny` and
//! `v2_shaped` configurations, in f32, f16 and bf16.
//!
//! `cargo bench --bench forward`. Environment:
//! - `FORWARD_SECONDS`: how long to time each configuration and dtype (default 3);
//! - `FORWARD_BATCH`: batch size for every configuration (default: 64 for tiny, 8 for
//!   v2_shaped);
//! - `FORWARD_CONFIGS`: comma-separated subset of `tiny,v2_shaped`.
//!
//! Each measurement is printed as one JSON line.

use llama_pow::backend::cpu::{forward_last_logits_with, ForwardScratch};
use llama_pow::pow::dtype::Dtype;
use llama_pow::pow::params::Params;
use llama_pow::pow::weights::ModelWeights;
use std::time::{Duration, Instant};

const BLOCK_HASH: &str = "5f1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8";

fn golden_params(case: &str) -> Params {
    let path = format!("{}/tests/golden/{case}.json", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let v: serde_json::Value = serde_json::from_str(&text).expect("golden JSON");
    serde_json::from_value(v["params"].clone()).expect("golden params")
}

/// Inputs need not be the protocol's for timing: a cheap deterministic fill of the right
/// magnitude, rounded to the dtype.
fn inputs(n: usize, dtype: Dtype) -> Vec<f32> {
    let mut s = 0x2545_F491_4F6C_DD1Du64;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let u = (s >> 40) as f32 / (1u64 << 24) as f32;
            dtype.round(3.4 * u - 1.7)
        })
        .collect()
}

fn main() {
    // `cargo bench` passes `--bench`; ignore arguments.
    let seconds: f64 = std::env::var("FORWARD_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let batch_override: Option<usize> = std::env::var("FORWARD_BATCH")
        .ok()
        .and_then(|s| s.parse().ok());
    let configs = std::env::var("FORWARD_CONFIGS").unwrap_or_else(|_| "tiny,v2_shaped".into());
    let threads = rayon::current_num_threads();
    for config in configs.split(',').map(str::trim).filter(|c| !c.is_empty()) {
        let (case, default_batch) = match config {
            "tiny" => ("tiny_f16", 64),
            "v2_shaped" => ("v2_shaped_f16", 8),
            other => panic!("unknown config {other:?} (tiny, v2_shaped)"),
        };
        let params = golden_params(case);
        let batch = batch_override.unwrap_or(default_batch);
        for dtype in Dtype::ALL {
            let model = ModelWeights::build(BLOCK_HASH, &params, dtype);
            let x = inputs(batch * params.seq_len_usize() * params.dim_usize(), dtype);
            // Scratch buffers are reused across batches, as the CPU backend does. Warm up
            // (thread pool, first touch of the buffers).
            let mut scratch = ForwardScratch::new();
            std::hint::black_box(forward_last_logits_with(&mut scratch, &model, &x, batch));
            let budget = Duration::from_secs_f64(seconds);
            let start = Instant::now();
            let mut batches = 0usize;
            while batches == 0 || start.elapsed() < budget {
                std::hint::black_box(forward_last_logits_with(&mut scratch, &model, &x, batch));
                batches += 1;
            }
            let elapsed = start.elapsed().as_secs_f64();
            let nonces = batches * batch;
            println!(
                "{}",
                serde_json::json!({
                    "bench": "forward_cpu",
                    "config": config,
                    "dtype": dtype.as_str(),
                    "batch": batch,
                    "seq_len": params.seq_len,
                    "threads": threads,
                    "nonces": nonces,
                    "seconds": elapsed,
                    "nonces_per_s": nonces as f64 / elapsed,
                    "ms_per_batch": 1e3 * elapsed / batches as f64,
                })
            );
        }
    }
}
