//! Validation against generation on the same model and device: nonces per second of a
//! /validate job (an arbitrary list of nonces, every distance back) next to a /generate job
//! (consecutive nonces, only the proofs back), interleaved in one run. They run the same
//! forward pass, so the ratio should be 1 within noise: a validator wastes nothing.
//!
//! `cargo bench --bench validation`. Environment:
//! - `VALIDATION_CASE`: the golden case whose params and dtype are used (default
//!   `v2_shaped_f16`);
//! - `VALIDATION_SECONDS`: how long each generation runs (default 5); each validation gets
//!   as many nonces as the generation before it computed;
//! - `VALIDATION_ROUNDS`: interleaved rounds (default 3);
//! - `VALIDATION_BATCH`: batch size of both (default 32).
//!
//! Prints one JSON line per run and a summary line with the ratio of the medians.

use llama_pow::backend::cpu::CpuBackend;
use llama_pow::engine::{
    Engine, EngineOptions, GenerateJob, Job, JobEnd, JobEvent, ModelSpec, ValidateJob,
};
use llama_pow::pow::dtype::Dtype;
use llama_pow::pow::params::Params;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Nonces computed and the seconds the workers computed for, over a whole job.
fn run(engine: &Engine, job: Job) -> (u64, f64) {
    let mut h = engine.submit(job).expect("submitted");
    let (mut n, mut secs) = (0u64, 0f64);
    loop {
        match h.events.blocking_recv().expect("events until Finished") {
            JobEvent::Batch(b) => {
                n += b.nonces.len() as u64;
                secs = secs.max(b.elapsed.as_secs_f64());
            }
            JobEvent::Error(e) => panic!("{}", e.message),
            JobEvent::Finished(end) => {
                assert_eq!(end, JobEnd::Completed);
                return (n, secs);
            }
            JobEvent::ModelReady { .. } => {}
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let case_name: String = env("VALIDATION_CASE", "v2_shaped_f16".to_string());
    let seconds: f64 = env("VALIDATION_SECONDS", 5.0);
    let rounds: usize = env("VALIDATION_ROUNDS", 3);
    let batch: u64 = env("VALIDATION_BATCH", 32);
    let path = format!(
        "{}/tests/golden/{case_name}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let case: Value = serde_json::from_str(&std::fs::read_to_string(&path).expect("golden case"))
        .expect("golden JSON");
    let params: Params = serde_json::from_value(case["params"].clone()).expect("params");
    let dtype: Dtype = case["dtype"].as_str().unwrap().parse().unwrap();
    let engine = Engine::new(
        vec![Arc::new(CpuBackend::new())],
        EngineOptions {
            dtype,
            ..EngineOptions::default()
        },
    );
    let model = ModelSpec {
        block_hash: case["block_hash"].as_str().unwrap().into(),
        params,
    };
    let public_key = case["public_key"].as_str().unwrap().to_string();
    let generation = |start_nonce: u64, max_duration: Duration| {
        Job::Generate(GenerateJob {
            model: model.clone(),
            public_key: public_key.clone(),
            block_height: 1,
            r_target: 1.4,
            start_nonce,
            batch_size: batch,
            max_duration,
            max_nonces: None,
        })
    };
    // Build (and cache) the model first: neither side pays for it below.
    run(&engine, generation(0, Duration::from_millis(200)));
    let (mut gen_rates, mut val_rates) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let start = 1_000_000 * (round as u64 + 1);
        let (n, secs) = run(&engine, generation(start, Duration::from_secs_f64(seconds)));
        gen_rates.push(n as f64 / secs);
        println!(
            "{}",
            json!({"round": round, "job": "generate", "nonces": n, "seconds": secs, "nonces_per_second": n as f64 / secs})
        );
        // The same number of other nonces, in a shuffled order, as a validator gets them.
        let mut nonces: Vec<u64> = (0..n).map(|i| start + 500_000 + i * 7).collect();
        nonces.reverse();
        let (m, secs) = run(
            &engine,
            Job::Validate(ValidateJob {
                model: model.clone(),
                public_key: public_key.clone(),
                block_height: 1,
                r_target: 1.4,
                nonces: Arc::new(nonces),
                batch_size: batch,
                max_duration: Duration::from_secs(3600),
            }),
        );
        assert_eq!(m, n, "every nonce validated");
        val_rates.push(m as f64 / secs);
        println!(
            "{}",
            json!({"round": round, "job": "validate", "nonces": m, "seconds": secs, "nonces_per_second": m as f64 / secs})
        );
    }
    let (g, v) = (median(gen_rates), median(val_rates));
    println!(
        "{}",
        json!({"case": case_name, "batch": batch, "generate_nonces_per_second": g,
               "validate_nonces_per_second": v, "validate_over_generate": v / g})
    );
}
