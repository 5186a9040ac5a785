//! The PARAMS_V2 weight pool: 888,156,147 values of normal(0, 0.02) rounded f64 -> f32 -> f16,
//! drawn with the parallel fill, timed, hashed and compared with numpy.
//!
//! `cargo bench --bench pool`. Environment:
//! - `POOL_N`: draw only this many values (the hash is then not checked against the known one);
//! - `POOL_NUMPY=0`: skip the numpy run (it is also skipped when numpy is not importable);
//! - `POOL_SEQUENTIAL=1`: also time the single-threaded stream, for comparison;
//! - `POOL_FACTS=0`: skip timing `llama-pow facts` on the same pool (PARAMS_V2,
//!   `--param output.weight`, 4 nonces) right after the pool, which it hashes as it draws.
//!
//! The last line printed is one JSON object with the figures.

use half::f16;
use llama_pow::pow::dtype::Dtype;
use llama_pow::pow::facts::{self, FactsInput, ParamSelection};
use llama_pow::pow::params::Params;
use llama_pow::pow::{rng, seeds};
use sha2::{Digest, Sha256};
use std::process::Command;
use std::time::Instant;

const BLOCK_HASH: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
const V2_POOL_SIZE: usize = 888_156_147;
const V2_POOL_SHA256: &str = "3edff6e1c610d8b5edbbd871474afb4f3d2b9086c47f50047d69fcb329710a9e";

fn to_f16(v: f64) -> f16 {
    f16::from_f32(v as f32)
}

fn sha256_f16(values: &[u16]) -> String {
    let mut h = Sha256::new();
    let mut bytes = Vec::with_capacity(2 * 65536);
    for block in values.chunks(65536) {
        bytes.clear();
        for v in block {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        h.update(&bytes);
    }
    hex::encode(h.finalize())
}

/// Run scripts/numpy_pool.py; `None` when python3 or numpy is not available.
fn numpy_run(n: usize) -> Option<(f64, String)> {
    if std::env::var("POOL_NUMPY").is_ok_and(|v| v == "0") {
        return None;
    }
    let probe = Command::new("python3")
        .args(["-c", "import numpy"])
        .output()
        .ok()?;
    if !probe.status.success() {
        eprintln!("numpy is not importable: skipping the numpy run");
        return None;
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/numpy_pool.py");
    let out = Command::new("python3")
        .args([
            script,
            &n.to_string(),
            BLOCK_HASH,
            &seeds::WEIGHTS_HASHES.to_string(),
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!("numpy run failed: {}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(text.trim().lines().last()?).ok()?;
    Some((v["seconds"].as_f64()?, v["sha256"].as_str()?.to_owned()))
}

fn main() {
    let n: usize = std::env::var("POOL_N")
        .ok()
        .map(|s| {
            s.trim()
                .replace('_', "")
                .parse()
                .expect("POOL_N is a count")
        })
        .unwrap_or(V2_POOL_SIZE);
    let threads = rayon::current_num_threads();
    let entropy = seeds::entropy(&seeds::weights_seed(BLOCK_HASH), seeds::WEIGHTS_HASHES);

    // The timed span covers the allocation too, as numpy's does. The pool is held as the
    // f16 bit patterns: a zeroed u16 vector comes from calloc, untouched until filled.
    let start = Instant::now();
    let mut pool = vec![0u16; n];
    let allocated = start.elapsed().as_secs_f64();
    rng::fill_normal_parallel(&entropy, 0.0, 0.02, &mut pool, |v| to_f16(v).to_bits());
    let rust_seconds = start.elapsed().as_secs_f64();
    println!("rust: {n} values on {threads} threads in {rust_seconds:.3} s (allocation {allocated:.3} s)");

    let digest = sha256_f16(&pool);
    println!("sha256(f16 le) = {digest}");
    let full = n == V2_POOL_SIZE;
    if full {
        assert_eq!(
            digest, V2_POOL_SHA256,
            "the V2 pool hash differs from the reference's"
        );
        println!("matches the reference's V2 pool hash");
    }

    let sequential_seconds = if std::env::var("POOL_SEQUENTIAL").is_ok_and(|v| v == "1") {
        let start = Instant::now();
        let mut g = rng::Generator::from_entropy(&entropy);
        for v in pool.iter_mut() {
            *v = to_f16(g.normal(0.0, 0.02)).to_bits();
        }
        let secs = start.elapsed().as_secs_f64();
        assert_eq!(
            sha256_f16(&pool),
            digest,
            "sequential and parallel pools differ"
        );
        println!("rust sequential: {secs:.3} s");
        Some(secs)
    } else {
        None
    };
    drop(pool);

    // facts for the same pool, timed the same way right after it: the goal is about the
    // pool's own time (the hashing hides behind the drawing as far as the cores allow).
    let facts_seconds = (full && !std::env::var("POOL_FACTS").is_ok_and(|v| v == "0")).then(|| {
        let start = Instant::now();
        let f = facts::compute(&FactsInput {
            block_hash: BLOCK_HASH,
            public_key: "gonka1poolbench",
            params: &Params::v2(),
            dtype: Dtype::F16,
            nonces: &[0, 1, 2, 3],
            selection: &ParamSelection::Named(vec!["output.weight".to_owned()]),
        })
        .expect("output.weight is a PARAMS_V2 parameter");
        let secs = start.elapsed().as_secs_f64();
        assert_eq!(f.pool_sha256_f16le.as_deref(), Some(V2_POOL_SHA256));
        println!(
            "facts (V2, --param output.weight, 4 nonces): {secs:.3} s, {:.2}x the pool's time",
            secs / rust_seconds
        );
        secs
    });

    let numpy = numpy_run(n);
    if let Some((secs, ref np_digest)) = numpy {
        println!("numpy: {secs:.3} s, sha256 {np_digest}");
        assert_eq!(np_digest, &digest, "numpy's pool differs from ours");
    }
    let summary = serde_json::json!({
        "n": n,
        "threads": threads,
        "rust_seconds": rust_seconds,
        "rust_sequential_seconds": sequential_seconds,
        "facts_seconds": facts_seconds,
        "facts_over_pool": facts_seconds.map(|f| f / rust_seconds),
        "sha256": digest,
        "reference_hash_checked": full,
        "numpy_seconds": numpy.as_ref().map(|x| x.0),
        "numpy_over_rust": numpy.as_ref().map(|x| x.0 / rust_seconds),
    });
    println!("{summary}");
}
