//! Throughput of the CPU forward pass: nonces per second for the golden `tiny` and
//! `v2_shaped` configurations (or a params file), in f32, f16 and bf16.
//!
//! `cargo bench --bench forward`. Environment:
//! - `FORWARD_SECONDS`: how long to time each configuration and dtype (default 3);
//! - `FORWARD_BATCH`: batch size for every configuration (default: 64 for tiny, 8 for
//!   v2_shaped, 32 for a params file);
//! - `FORWARD_CONFIGS`: comma-separated subset of `tiny,v2_shaped`, or `file`;
//! - `FORWARD_PARAMS`: the params JSON file of the `file` configuration;
//! - `FORWARD_DTYPES`: comma-separated subset of `f32,f16,bf16`.
//!
//! The model is built as the CPU backend builds it (weights packed in the dtype for this
//! machine's product path; `LLAMA_POW_CPU_MATMUL` caps the path). Each measurement is
//! printed as one JSON line, with the CPU time per batch (all threads) next to the wall
//! time: on a shared machine the CPU time is the steadier figure.

use llama_pow::backend::cpu::{forward_last_logits_with, CpuModel, ForwardScratch};
use llama_pow::pow::dtype::Dtype;
use llama_pow::pow::params::Params;
use std::time::Duration;

mod common;
use common::{time, uniform};

const BLOCK_HASH: &str = "5f1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8";

fn golden_params(case: &str) -> Params {
    let path = format!("{}/tests/golden/{case}.json", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let v: serde_json::Value = serde_json::from_str(&text).expect("golden JSON");
    serde_json::from_value(v["params"].clone()).expect("golden params")
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
    let dtypes: Vec<Dtype> = std::env::var("FORWARD_DTYPES")
        .unwrap_or_else(|_| "f32,f16,bf16".into())
        .split(',')
        .map(|d| d.trim().parse().expect("FORWARD_DTYPES"))
        .collect();
    let threads = rayon::current_num_threads();
    for config in configs.split(',').map(str::trim).filter(|c| !c.is_empty()) {
        let (params, default_batch) = match config {
            "tiny" => (golden_params("tiny_f16"), 64),
            "v2_shaped" => (golden_params("v2_shaped_f16"), 8),
            "file" => {
                let path = std::env::var("FORWARD_PARAMS").expect("FORWARD_PARAMS: a params file");
                let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
                let params: Params = serde_json::from_str(&text).expect("a params object");
                (params, 32)
            }
            other => panic!("unknown config {other:?} (tiny, v2_shaped, file)"),
        };
        let batch = batch_override.unwrap_or(default_batch);
        for &dtype in &dtypes {
            let model = CpuModel::build(BLOCK_HASH, &params, dtype).expect("model");
            let x = uniform(
                batch * params.seq_len_usize() * params.dim_usize(),
                1.7,
                dtype,
                0x2545_F491_4F6C_DD1D,
            );
            // Scratch buffers are reused across batches, as the CPU backend does; the untimed
            // first call warms up the thread pool and first touches the buffers.
            let mut scratch = ForwardScratch::new();
            let t = time(Duration::from_secs_f64(seconds), || {
                std::hint::black_box(forward_last_logits_with(&mut scratch, &model, &x, batch));
            });
            let nonces = t.calls as usize * batch;
            println!(
                "{}",
                serde_json::json!({
                    "bench": "forward_cpu",
                    "config": config,
                    "dtype": dtype.as_str(),
                    "path": model.kernel.name(),
                    "batch": batch,
                    "seq_len": params.seq_len,
                    "threads": threads,
                    "nonces": nonces,
                    "seconds": t.wall,
                    "nonces_per_s": nonces as f64 / t.wall,
                    "ms_per_batch": 1e3 * t.wall_per_call(),
                    "cpu_ms_per_batch": 1e3 * t.cpu_per_call(),
                })
            );
        }
    }
}
