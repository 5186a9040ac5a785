//! The `llama-pow` binary as an operator runs it: compute and facts on golden cases, the
//! self-test, and one clear line on stderr for a bad request.

mod common;

use common::*;
use serde_json::{json, Value};
use std::io::Write;
use std::process::{Command, Output, Stdio};

fn run(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_llama-pow"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn request_for(case: &Value, count: usize, dtype: &str) -> Value {
    json!({
        "block_hash": case["block_hash"],
        "public_key": case["public_key"],
        "params": case["params"],
        "start_nonce": case["nonces"][0],
        "r_target": case["r_target"],
        "block_height": 12,
        "batch_size": 5,
        "count": count,
        "dtype": dtype,
    })
}

#[test]
fn compute_matches_the_reference_distances() {
    for (name, dtype, tol) in [
        ("tiny_f16", "f16", 1e-5),
        ("seq1_bignonce_f16", "f16", 1e-5),
        ("tiny_bf16", "bf16", 1e-4),
    ] {
        let case = load(&format!("{name}.json"));
        let count = 12.min(case["nonces"].as_array().unwrap().len());
        let out = run(&["compute"], &request_for(&case, count, dtype).to_string());
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(u64s(&v["nonces"]), u64s(&case["nonces"])[..count].to_vec());
        let want = f64s(&case["dist"]);
        for (g, w) in f64s(&v["dist"]).iter().zip(&want) {
            assert!((g - w).abs() <= tol, "{name}: {g} vs {w}");
        }
        let r = case["r_target"].as_f64().unwrap();
        let valid: Vec<u64> = u64s(&v["nonces"])
            .into_iter()
            .zip(f64s(&v["dist"]))
            .filter(|&(_, d)| d < r)
            .map(|(n, _)| n)
            .collect();
        assert_eq!(u64s(&v["valid_nonces"]), valid);
        assert_eq!(f64s(&v["valid_dist"]).len(), valid.len());
    }
}

#[test]
fn compute_reads_a_request_file() {
    let case = load("tiny_f32.json");
    let dir = std::env::temp_dir().join(format!("llama-pow-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("req.json");
    std::fs::write(&path, request_for(&case, 3, "f32").to_string()).unwrap();
    let out = run(&["compute", "--request", path.to_str().unwrap()], "");
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    for (g, w) in f64s(&v["dist"]).iter().zip(f64s(&case["dist"])) {
        assert!((g - w).abs() <= 1e-5);
    }
}

#[test]
fn bad_requests_fail_with_one_line() {
    let case = load("tiny_f16.json");
    let good = request_for(&case, 2, "f16");
    let mut missing = good.clone();
    missing.as_object_mut().unwrap().remove("public_key");
    let mut bad_param = good.clone();
    bad_param["params"]["n_kv_heads"] = json!(3);
    let mut bad_dtype = good.clone();
    bad_dtype["dtype"] = json!("fp64");
    let mut fp8 = good.clone();
    fp8["params"]["use_fp8"] = json!(true);
    for (input, want) in [
        ("not json".to_owned(), "request is not valid JSON"),
        (missing.to_string(), "public_key: missing required field"),
        (
            bad_param.to_string(),
            "params.n_kv_heads: must divide n_heads",
        ),
        (bad_dtype.to_string(), "dtype must be one of"),
        (fp8.to_string(), "fp8"),
    ] {
        let out = run(&["compute"], &input);
        assert!(!out.status.success(), "{input} should fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "one line: {err:?}");
        assert!(err.contains(want), "{err:?} should contain {want:?}");
        assert!(out.stdout.is_empty());
    }
}

#[test]
fn facts_match_the_golden_hashes() {
    let case = load("gqa_scaled_rope_f16.json");
    let out = run(
        &[
            "facts",
            "--param",
            "layers.1.attention.wk.weight",
            "--param",
            "norm.weight",
        ],
        &request_for(&case, 4, "f16").to_string(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["total_params"], case["total_params"]);
    assert_eq!(v["pool_size"], case["pool_size"]);
    assert_eq!(v["target_sha256_f64le"], case["target_sha256_f64le"]);
    assert_eq!(
        strs(&v["inputs_sha256_f16le"]),
        strs(&case["inputs_sha256_f16le"])[..4].to_vec()
    );
    let params = v["parameters"].as_array().unwrap();
    let golden = case["parameters"].as_array().unwrap();
    assert_eq!(params.len(), golden.len());
    for (p, g) in params.iter().zip(golden) {
        assert_eq!(p["name"], g["name"]);
        assert_eq!(p["name_hash"], g["name_hash"]);
        let named = p["name"] == "layers.1.attention.wk.weight" || p["name"] == "norm.weight";
        if named {
            assert_eq!(p["sha256_f16le"], g["sha256_f16le"], "{}", p["name"]);
        } else {
            assert!(p.get("sha256_f16le").is_none());
        }
    }
    let out = run(
        &["facts", "--param", "nope"],
        &request_for(&case, 1, "f16").to_string(),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--param \"nope\": no such parameter"));
}

#[test]
fn bench_reports_the_reference_the_ceiling_and_the_start() {
    let dir = std::env::temp_dir().join(format!("llama-pow-cli-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let params = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/tiny.json");
    let out = run(
        &[
            "bench",
            "--params",
            params,
            "--device",
            "cpu",
            "--seconds",
            "0.5",
            "--batch-sizes",
            "2",
            "--json",
            "--out",
            dir.join("run").to_str().unwrap(),
            "--reference-command",
            r#"echo '{"nonces_per_second": 12.5}'"#,
        ],
        "",
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let reference = &v["reference"];
    assert_eq!(reference["nonces_per_second"], 12.5);
    assert_eq!(reference["raw"], json!({"nonces_per_second": 12.5}));
    assert_eq!(reference["dtype"], "f16");
    assert!(reference["ratio"].as_f64().unwrap() > 0.0, "{reference}");
    assert_eq!(reference["goal_ratio"], 1.3);
    // Computed on the CPU: no ceiling, and why.
    assert!(
        !v["ceiling"]["skipped"].as_str().unwrap().is_empty(),
        "{}",
        v["ceiling"]
    );
    let start = &v["start"]["f16"];
    assert!(start["cold_seconds"].as_f64().unwrap() > 0.0, "{start}");
    assert_eq!(start["goal_cold_seconds"], 5.0);
    assert_eq!(start["goal_cached_seconds"], 0.5);
    // One batch size: no configuration started from the cache.
    assert!(start["cached_seconds"].is_null());

    // A reference that prints no rate is reported, not fatal.
    let dir = std::env::temp_dir().join(format!("llama-pow-cli-bench2-{}", std::process::id()));
    let out = run(
        &[
            "bench",
            "--params",
            params,
            "--device",
            "cpu",
            "--seconds",
            "0.2",
            "--batch-sizes",
            "2",
            "--json",
            "--out",
            dir.join("run").to_str().unwrap(),
            "--reference-command",
            "echo nothing useful",
        ],
        "",
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["reference"]["error"]
        .as_str()
        .unwrap()
        .contains("not JSON"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("warning: --reference-command"));
}

#[test]
fn bench_agreement_compares_dtypes_with_the_baseline() {
    let dir = std::env::temp_dir().join(format!("llama-pow-cli-agree-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let params = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/tiny.json");
    let run_dir = dir.join("run");
    let out = run(
        &[
            "bench",
            "--agreement",
            "--params",
            params,
            "--device",
            "cpu",
            "--dtypes",
            "f32,f16,bf16",
            "--nonces",
            "300",
            "--batch-sizes",
            "64",
            "--json",
            "--out",
            run_dir.to_str().unwrap(),
        ],
        "",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // --json: the report on standard output, nothing on standard error.
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let csv = std::fs::read_to_string(run_dir.join("agreement.csv")).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(v["mode"], "agreement");
    let a = &v["agreement"];
    assert_eq!(a["baseline"], "f32");
    assert_eq!(a["nonces"], 300);
    assert_eq!(a["device"], "cpu");
    // round(300 / 500) = 1, and at least one: one valid nonce in the baseline.
    assert_eq!(a["valid_target"], 1);
    assert_eq!(a["valid_in_baseline"], 1);
    let r = a["r_target"].as_f64().unwrap();
    assert!(r.is_finite() && r > 0.0, "{a}");
    assert_eq!(a["runs"].as_array().unwrap().len(), 3);
    let rows = a["rows"].as_array().unwrap();
    let dtypes: Vec<&str> = rows.iter().map(|r| r["dtype"].as_str().unwrap()).collect();
    assert_eq!(dtypes, ["f16", "bf16"]);
    for row in rows {
        assert_eq!(row["baseline"], "f32");
        assert_eq!(row["valid_baseline"], 1);
        let max = row["max_abs_diff"].as_f64().unwrap();
        let p99 = row["p99_abs_diff"].as_f64().unwrap();
        assert!(max > 0.0 && p99 <= max, "{row}");
        assert!(row["mean_diff"].as_f64().unwrap().abs() <= max, "{row}");
        assert!(row["nonces_per_second"].as_f64().unwrap() > 0.0, "{row}");
        assert!(
            row["nonces_per_second_ratio"].as_f64().unwrap() > 0.0,
            "{row}"
        );
        let flips = row["flips"].as_u64().expect("an integer count of flips");
        assert_eq!(
            flips,
            row["valid_only_in_baseline"].as_u64().unwrap()
                + row["valid_only_in_dtype"].as_u64().unwrap()
        );
        assert_eq!(row["flip_rate"].as_f64().unwrap(), flips as f64 / 300.0);
        assert_eq!(row["goal_flip_rate"], 1e-4);
        assert_eq!(row["meets_goal"], flips == 0);
        let largest = row["largest_diffs"].as_array().unwrap();
        assert_eq!(largest.len(), 5);
        assert_eq!(largest[0]["diff"].as_f64().unwrap().abs(), max);
    }
    // f16 against f32: close, but not the same.
    assert!(
        rows[0]["max_abs_diff"].as_f64().unwrap() < 1e-3,
        "{}",
        rows[0]
    );
    let table = a["markdown"].as_str().unwrap();
    assert!(table.contains("| f32 (baseline) |"), "{table}");
    assert!(table.contains("| bf16 |"), "{table}");
    // A row per nonce, a column per dtype.
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "nonce,f32,f16,bf16");
    assert_eq!(lines.len(), 301);

    // FP8 on the CPU: refused before anything is computed, in one line.
    let out = run(
        &[
            "bench",
            "--agreement",
            "--params",
            params,
            "--device",
            "cpu",
            "--dtypes",
            "f16,fp8",
            "--nonces",
            "300",
            "--out",
            dir.join("fp8").to_str().unwrap(),
        ],
        "",
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "one line: {err:?}");
    assert!(err.contains("use_fp8") && err.contains("FP8"), "{err:?}");
    assert!(err.contains("in fp8"), "{err:?}");
}

#[test]
fn bench_sweep_of_fp8_on_the_cpu_fails_with_the_reason() {
    let dir = std::env::temp_dir().join(format!("llama-pow-cli-fp8-{}", std::process::id()));
    let params = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/tiny.json");
    let out = run(
        &[
            "bench",
            "--params",
            params,
            "--device",
            "cpu",
            "--dtypes",
            "f16,fp8",
            "--seconds",
            "0.2",
            "--batch-sizes",
            "2",
            "--out",
            dir.join("run").to_str().unwrap(),
        ],
        "",
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    // Checked before the sweep: no f16 configuration ran, and fp8 was not run as f16.
    assert!(!err.contains("f16 batch 2"), "{err:?}");
    assert!(err.contains("in fp8") && err.contains("use_fp8"), "{err:?}");
}

#[test]
fn proofs_made_by_compute_validate_in_another_dtype() {
    // The install check of the README: f16 proofs from `compute`, validated in f32.
    let case = load("tiny_f16.json");
    let mut req = request_for(&case, 200, "f16");
    req["start_nonce"] = json!(0);
    let out = run(&["compute"], &req.to_string());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let computed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let proofs = computed["valid_nonces"].as_array().unwrap().len();
    assert!(proofs > 10, "{proofs}");
    let batch = json!({
        "block_hash": case["block_hash"], "public_key": case["public_key"],
        "block_height": 12, "params": case["params"], "r_target": case["r_target"],
        "nonces": computed["valid_nonces"], "dist": computed["valid_dist"],
        "dtype": "f32", "batch_size": 16,
    });
    let out = run(&["validate"], &batch.to_string());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("one JSON object on stdout");
    assert_eq!(v["n_invalid"], 0);
    assert_eq!(v["fraud_detected"], false);
    assert_eq!(v["nonces"], computed["valid_nonces"]);
    // f16 against f32: within the dtypes' own spread.
    assert!(v["max_abs_dist_diff"].as_f64().unwrap() < 1e-3);
    // Progress on stderr, one line per batch.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let progress: Vec<Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(progress.len(), proofs.div_ceil(16), "{stderr}");
    assert_eq!(progress.last().unwrap()["validated"], proofs);

    // A bad batch: one line on stderr naming the field, and a failure.
    let mut bad = batch.clone();
    bad["dist"][0] = json!(9.0);
    let out = run(&["validate"], &bad.to_string());
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("dist[0]: 9 is not below r_target"),
        "{stderr}"
    );
}

#[test]
fn selftest_passes_on_the_cpu_and_exits_non_zero_when_it_cannot_run() {
    for (dtype, cases) in [("f16", 2), ("bf16", 4), ("f32", 4)] {
        let o = run(&["selftest", "--device", "cpu", "--dtype", dtype], "");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["passed"], true, "{v}");
        let cpu = &v["devices"][0];
        assert_eq!(cpu["device"], "cpu");
        assert_eq!(cpu["cases"].as_array().unwrap().len(), cases, "{v}");
        assert!(cpu["max_abs_diff"].as_f64().unwrap() < 2e-5, "{v}");
    }
    // FP8 on the CPU: every device fails the FP8 case, and the exit status says so.
    let o = run(&["selftest", "--device", "cpu", "--dtype", "fp8"], "");
    assert!(!o.status.success());
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["passed"], false, "{v}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.starts_with("llama-pow: self-test failed: cpu: v2_shaped_fp8: refused:"),
        "{err}"
    );
    // Without a GPU, --device cuda cannot even start: one line, non-zero.
    if !std::path::Path::new("/dev/nvidia0").exists() {
        let o = run(&["selftest", "--device", "cuda"], "");
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.starts_with("llama-pow: --device cuda: cannot compute on CUDA"),
            "{err}"
        );
    }
}
