//! Telemetry and the bench on the CPU backend: GET /metrics parses as Prometheus text and
//! its counters move with a job, /health lists GPUs (none without NVML), and `llama-pow
//! bench` writes a complete run folder locally, with --json, and against a running server.

mod http_support;

use http_support::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

fn scrape(s: &Server) -> prometheus_parse::Scrape {
    let (status, headers, body) = request_raw(s.port, "GET", "/metrics", None);
    assert_eq!(status, 200);
    let ct = headers
        .iter()
        .find(|(k, _)| k == "content-type")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    assert!(ct.starts_with("text/plain"), "{ct}");
    let text = String::from_utf8(body).unwrap();
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap()
}

/// The value of a counter or gauge sample whose labels include `labels`.
fn value(s: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    s.samples
        .iter()
        .find(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| match &x.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            other => panic!("{name}: not a single value: {other:?}"),
        })
}

fn histogram_count(s: &prometheus_parse::Scrape, name: &str) -> u64 {
    s.samples
        .iter()
        .find_map(|x| match (&x.value, x.metric == name) {
            (prometheus_parse::Value::Histogram(h), true) => {
                Some(h.iter().map(|b| b.count).fold(0.0, f64::max) as u64)
            }
            _ => None,
        })
        .unwrap_or_else(|| panic!("no histogram {name}"))
}

#[test]
fn metrics_parse_and_move_with_a_job() {
    let s = Server::start_with_env(&["--max-job-seconds", "30"], &[("LLAMA_POW_NVML", "0")]);
    let before = scrape(&s);
    assert_eq!(
        value(&before, "llama_pow_nonces_computed_total", &[]),
        Some(0.0)
    );
    assert_eq!(
        value(&before, "llama_pow_job_state", &[("state", "idle")]),
        Some(1.0)
    );
    assert_eq!(value(&before, "llama_pow_gpus", &[]), Some(0.0));
    // The start-up self-test passed on the CPU, on the two f16 golden cases.
    let cpu = [("device", "cpu")];
    assert_eq!(value(&before, "llama_pow_selftest_passed", &cpu), Some(1.0));
    assert_eq!(value(&before, "llama_pow_selftest_cases", &cpu), Some(2.0));
    assert!(value(&before, "llama_pow_selftest_max_abs_diff", &cpu).unwrap() < 2e-5);
    // A CPU server runs no CUDA graph, and says so.
    for event in ["capture", "replay", "fallback", "dropped"] {
        let labels = [("event", event)];
        assert_eq!(
            value(&before, "llama_pow_cuda_graphs_total", &labels),
            Some(0.0)
        );
    }
    assert_eq!(histogram_count(&before, "llama_pow_batch_seconds"), 0);

    // A job on the tiny model: every nonce is valid under r_target 10, so every batch is a line.
    let stream = post_stream(s.port, "/generate", &generate_request(10.0, 4, 0));
    let lines = stream.until(Duration::from_secs(20), |_| true);
    assert!(!lines.is_empty());
    let mut during = None;
    assert!(wait_until(Duration::from_secs(10), || {
        let m = scrape(&s);
        let ok = value(&m, "llama_pow_job_state", &[("state", "computing")]) == Some(1.0)
            && value(&m, "llama_pow_nonces_computed_total", &[]).unwrap_or(0.0) > 0.0;
        during = Some(m);
        ok
    }));
    let during = during.unwrap();
    assert_eq!(
        value(&during, "llama_pow_job_state", &[("state", "idle")]),
        Some(0.0)
    );
    assert!(value(&during, "llama_pow_nonces_per_second", &[]).unwrap() > 0.0);
    assert_eq!(
        value(
            &during,
            "llama_pow_jobs_started_total",
            &[("kind", "generate")]
        ),
        Some(1.0)
    );
    assert!(histogram_count(&during, "llama_pow_time_to_first_batch_seconds") == 1);
    assert!(histogram_count(&during, "llama_pow_model_build_seconds") == 1);

    // A second request preempts the first.
    let second = post_stream(s.port, "/generate", &generate_request(10.0, 4, 1000));
    assert!(!second.until(Duration::from_secs(20), |_| true).is_empty());
    second.disconnect();
    drop(stream);
    assert!(wait_until(Duration::from_secs(10), || !s.busy()));
    let after = scrape(&s);
    let computed = value(&after, "llama_pow_nonces_computed_total", &[]).unwrap();
    let valid = value(&after, "llama_pow_nonces_valid_total", &[]).unwrap();
    assert!(computed >= value(&during, "llama_pow_nonces_computed_total", &[]).unwrap());
    assert_eq!(valid, computed, "r_target 10 makes every nonce valid");
    assert_eq!(value(&after, "llama_pow_preemptions_total", &[]), Some(1.0));
    assert_eq!(
        value(&after, "llama_pow_model_cache_hits_total", &[]),
        Some(1.0)
    );
    assert_eq!(
        value(
            &after,
            "llama_pow_jobs_finished_total",
            &[("end", "preempted")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(&after, "llama_pow_job_state", &[("state", "idle")]),
        Some(1.0)
    );
    assert!(histogram_count(&after, "llama_pow_batch_seconds") >= 2);
    assert_eq!(value(&after, "llama_pow_pooled_backlog", &[]), Some(0.0));

    // /health lists the GPUs: none, NVML being switched off.
    let h = s.health();
    assert_eq!(h["gpus"], serde_json::json!([]));
    let (status, _) = request(s.port, "POST", "/metrics", Some(b"{}"));
    assert_eq!(status, 405);
    s.assert_clean_log();
}

#[test]
fn health_without_nvml_settings_still_answers() {
    // Whatever this machine has (no NVIDIA library in CI): a list, never a failure.
    let s = Server::start(&["--max-job-seconds", "1"]);
    let h = s.health();
    assert!(h["gpus"].is_array());
    let m = scrape(&s);
    let n = value(&m, "llama_pow_gpus", &[]).unwrap();
    assert_eq!(n as usize, h["gpus"].as_array().unwrap().len());
}

// ---------------------------------------------------------------------------------------------
// The bench

fn scratch(name: &str) -> PathBuf {
    let d =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The tiny golden model's params, as a file.
fn tiny_params_file(dir: &Path) -> PathBuf {
    let p = dir.join("tiny_params.json");
    std::fs::write(&p, tiny_params().to_string()).unwrap();
    p
}

fn bench(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_llama-pow"))
        .arg("bench")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bench {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn png_size(path: &Path) -> (u32, u32) {
    let decoder = png::Decoder::new(std::fs::File::open(path).unwrap());
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    (info.width, info.height)
}

fn csv_rows(path: &Path) -> (Vec<String>, Vec<csv::StringRecord>) {
    let mut r = csv::Reader::from_path(path).unwrap();
    let header = r.headers().unwrap().iter().map(str::to_owned).collect();
    let rows = r.records().map(Result::unwrap).collect();
    (header, rows)
}

fn check_gpu_csv(dir: &Path) {
    let (header, rows) = csv_rows(&dir.join("gpu.csv"));
    assert_eq!(header[0], "t_seconds");
    assert!(header.contains(&"power_watts".to_owned()));
    // No NVML here: a header and nothing else.
    if !Path::new("/proc/driver/nvidia").exists() {
        assert!(rows.is_empty());
    }
}

#[test]
fn local_bench_writes_a_complete_folder() {
    let dir = scratch("bench-local");
    let params = tiny_params_file(&dir);
    let out = dir.join("run");
    let o = bench(&[
        "--params",
        params.to_str().unwrap(),
        "--dtypes",
        "f32,f16",
        "--batch-sizes",
        "2,8",
        "--seconds",
        "0.3",
        "--out",
        out.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8(o.stdout).unwrap();
    assert!(stdout.trim().ends_with("report.json"), "{stdout}");
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["mode"], "local");
    assert_eq!(report["params"], tiny_params());
    assert!(report["flop_per_nonce"].as_f64().unwrap() > 0.0);
    assert!(report["machine"]["logical_cpus"].as_u64().unwrap() >= 1);
    assert!(report["llama_pow_version"].is_string());
    assert!(report["gpus"].is_array());
    assert_eq!(report["cuda_graphs"], false);
    assert_eq!(report["cuda_graph_events"]["replays"], 0);
    assert_eq!(report["cuda_graph_events"]["captures"], 0);
    let results = report["results"].as_array().unwrap();
    assert_eq!(results.len(), 4);
    let mut batches = 0;
    for (r, (dtype, bs)) in results
        .iter()
        .zip([("f32", 2), ("f32", 8), ("f16", 2), ("f16", 8)])
    {
        assert_eq!(r["dtype"], dtype);
        assert_eq!(r["batch_size"], bs);
        assert!(r["nonces_per_second"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["achieved_tflops"].as_f64().unwrap() > 0.0);
        assert!(r["time_to_first_batch_seconds"].as_f64().unwrap() > 0.0);
        assert!(r["model_build_seconds"].as_f64().is_some());
        let lat = &r["batch_latency_ms"];
        let (p50, p90, p99) = (
            lat["p50"].as_f64().unwrap(),
            lat["p90"].as_f64().unwrap(),
            lat["p99"].as_f64().unwrap(),
        );
        assert!(0.0 < p50 && p50 <= p90 && p90 <= p99);
        assert!(r["peak_rss_bytes"].as_u64().unwrap() > 0);
        let w = &r["per_worker"][0];
        assert_eq!(w["device"], "cpu");
        assert!(w["efficiency"].is_null());
        assert!(w["efficiency_note"].as_str().unwrap().contains("CPU"));
        assert_eq!(r["nonces"].as_u64().unwrap() % bs, 0);
        batches += r["batches"].as_u64().unwrap();
    }
    // The first batch size of a dtype builds the model, the second takes it from the cache.
    assert_eq!(results[0]["model_cached"], false);
    assert_eq!(results[1]["model_cached"], true);
    let (header, rows) = csv_rows(&out.join("metrics.csv"));
    assert_eq!(header[..3], ["dtype", "batch_size", "worker_id"]);
    assert_eq!(rows.len() as u64, batches, "one row per batch");
    for row in &rows {
        assert!(row[9].parse::<f64>().unwrap() > 0.0, "latency_ms");
    }
    check_gpu_csv(&out);
    assert_eq!(png_size(&out.join("throughput_latency.png")), (1280, 800));
}

#[test]
fn bench_json_prints_exactly_one_object() {
    let dir = scratch("bench-json");
    let params = tiny_params_file(&dir);
    let out = dir.join("run");
    let o = bench(&[
        "--params",
        params.to_str().unwrap(),
        "--batch-sizes",
        "4",
        "--seconds",
        "0.2",
        "--json",
        "--out",
        out.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8(o.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    let mut it = serde_json::Deserializer::from_str(&stdout).into_iter::<Value>();
    let v = it.next().unwrap().unwrap();
    assert!(it.next().is_none());
    assert!(v.is_object());
    assert!(v["results"][0]["nonces_per_second"].as_f64().unwrap() > 0.0);
    // CUDA discovery is part of the report: GPUs, or why there are none.
    let cuda = &v["cuda"];
    if cuda["available"] == false {
        assert!(!cuda["unavailable_reason"].as_str().unwrap().is_empty());
    } else {
        assert!(!cuda["gpus"].as_array().unwrap().is_empty());
    }
    assert!(
        o.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.join("report.json").exists());
}

#[test]
fn bench_refuses_what_it_cannot_do() {
    for (args, needle) in [
        (
            vec!["--device", "cuda", "--seconds", "0.1"],
            "cannot compute on CUDA",
        ),
        (vec!["--params", "nope.json"], "neither a preset"),
    ] {
        let dir = scratch("bench-refuse");
        let out = Command::new(env!("CARGO_BIN_EXE_llama-pow"))
            .arg("bench")
            .args(&args)
            .args(["--out", dir.join("run").to_str().unwrap()])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{err}");
    }
}

#[test]
fn server_bench_drives_a_running_server() {
    // The jobs run for their whole second, so that /health probes arriving at 40/s certainly
    // fall inside the run (a run bounded by a few lines would last milliseconds).
    let s = Server::start_with_env(&["--max-job-seconds", "30"], &[("LLAMA_POW_NVML", "0")]);
    let dir = scratch("bench-server");
    let params = tiny_params_file(&dir);
    let out = dir.join("run");
    let o = bench(&[
        "--server",
        &s.url(""),
        "--params",
        params.to_str().unwrap(),
        "--batch-sizes",
        "4",
        "--r-target",
        "10",
        "--jobs",
        "2",
        "--job-seconds",
        "1",
        "--job-lines",
        "1000000",
        "--health-rate",
        "40",
        "--json",
        "--out",
        out.to_str().unwrap(),
    ]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["mode"], "server");
    assert_eq!(v["server_health"]["status"], "healthy");
    let jobs = v["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 2);
    for j in jobs {
        assert_eq!(j["status"], 200);
        assert!(j["lines"].as_u64().unwrap() > 0, "{j}");
        assert!(j["time_to_first_result_seconds"].as_f64().unwrap() > 0.0);
        assert!(j["nonces_computed"].as_u64().unwrap() > 0);
        assert_eq!(j["errors"].as_array().unwrap().len(), 0, "{j}");
    }
    assert!(v["summary"]["lines_per_second"].as_f64().unwrap() > 0.0);
    let h = &v["health"];
    assert!(h["probes"].as_u64().unwrap() > 0, "{h}");
    assert_eq!(h["errors"], 0);
    assert!(h["latency_ms"]["p99"].as_f64().unwrap() >= h["latency_ms"]["p50"].as_f64().unwrap());
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["jobs"], v["jobs"]);
    let (_, rows) = csv_rows(&out.join("metrics.csv"));
    let lines: u64 = jobs.iter().map(|j| j["lines"].as_u64().unwrap()).sum();
    assert_eq!(rows.len() as u64, lines);
    let (_, probes) = csv_rows(&out.join("health.csv"));
    assert_eq!(probes.len() as u64, h["probes"].as_u64().unwrap());
    check_gpu_csv(&out);
    assert_eq!(png_size(&out.join("throughput_latency.png")), (1280, 800));
    // The server saw the jobs: its own counters moved.
    let m = scrape(&s);
    assert!(value(&m, "llama_pow_jobs_started_total", &[("kind", "generate")]).unwrap() >= 2.0);

    // The client also leaves after a number of lines: 5 lines long before the 30 s limit.
    let out = dir.join("run-lines");
    let o = bench(&[
        "--server",
        &s.url(""),
        "--params",
        params.to_str().unwrap(),
        "--batch-sizes",
        "4",
        "--r-target",
        "10",
        "--jobs",
        "1",
        "--job-seconds",
        "30",
        "--job-lines",
        "5",
        "--health-rate",
        "1",
        "--json",
        "--out",
        out.to_str().unwrap(),
    ]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["jobs"][0]["lines"], 5, "{}", v["jobs"][0]);
    s.assert_clean_log();
}

/// Every metric name (and every `by (...)` label) a query of the shipped Grafana dashboard
/// uses is one the server exports: the real server's /metrics from its first scrape (the
/// labelled counters are there at 0), plus the per-GPU gauges as the server renders them for a
/// GPU, which this machine may not have.
#[test]
fn every_dashboard_query_names_an_exported_metric() {
    use llama_pow::telemetry::{GpuSample, Metrics};
    let s = Server::start_with_env(&[], &[("LLAMA_POW_NVML", "0")]);
    let served = scrape(&s);
    let gpu = GpuSample {
        index: 0,
        name: "Any GPU".into(),
        uuid: Some("GPU-0".into()),
        memory_used_bytes: Some(1),
        memory_total_bytes: Some(2),
        utilization_gpu_percent: Some(3),
        utilization_memory_percent: Some(4),
        power_watts: Some(5.0),
        temperature_celsius: Some(6),
        sm_clock_mhz: Some(7),
        memory_clock_mhz: Some(8),
        graphics_clock_mhz: Some(9),
    };
    let text = Metrics::new().render(&[gpu]);
    let with_gpu = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
    // name -> the labels its samples carry.
    let mut exported: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> =
        Default::default();
    for sample in served.samples.iter().chain(&with_gpu.samples) {
        let labels = exported.entry(sample.metric.clone()).or_default();
        labels.extend(sample.labels.keys().map(|k| k.to_string()));
        if let prometheus_parse::Value::Histogram(_) = sample.value {
            // Histograms are queried through their series.
            for suffix in ["_bucket", "_sum", "_count"] {
                let series = exported
                    .entry(format!("{}{suffix}", sample.metric))
                    .or_default();
                series.insert("le".into());
            }
        }
    }
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/grafana/llama-pow-dashboard.json"
    );
    let dash: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut exprs: Vec<String> = Vec::new();
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    match (k.as_str(), x) {
                        ("expr" | "definition", Value::String(e)) => out.push(e.clone()),
                        _ => walk(x, out),
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    walk(&dash, &mut exprs);
    assert!(exprs.len() >= 20, "{} queries", exprs.len());
    let mut seen = std::collections::BTreeSet::new();
    for e in &exprs {
        let names: Vec<&str> = e
            .match_indices("llama_pow_")
            .map(|(i, _)| {
                let rest = &e[i..];
                let end = rest
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(rest.len());
                &rest[..end]
            })
            .collect();
        assert!(!names.is_empty(), "a query with no llama-pow metric: {e}");
        for n in &names {
            assert!(
                exported.contains_key(*n),
                "{n} is not exported (query: {e})"
            );
            seen.insert(n.to_string());
        }
        for group in e.split("by (").skip(1) {
            for label in group.split(')').next().unwrap().split(',') {
                let label = label.trim();
                assert!(
                    names.iter().any(|n| exported[*n].contains(label)),
                    "no metric of {e} has the label {label}"
                );
            }
        }
    }
    // The panels the dashboard promises.
    for needed in [
        "llama_pow_nonces_computed_total",
        "llama_pow_nonces_valid_total",
        "llama_pow_batch_seconds_bucket",
        "llama_pow_gpu_utilization_percent",
        "llama_pow_gpu_memory_used_bytes",
        "llama_pow_gpu_power_watts",
        "llama_pow_device_errors_total",
    ] {
        assert!(
            seen.contains(needed),
            "the dashboard does not show {needed}"
        );
    }
}

/// Ctrl-C during a local bench: it stops, still writes the report, CSVs and plot with what
/// was measured, marks the report interrupted and exits with 130.
#[test]
fn an_interrupted_bench_still_writes_its_report() {
    let dir = scratch("bench-interrupted");
    let params = tiny_params_file(&dir);
    let out = dir.join("run");
    let mut child = Command::new(env!("CARGO_BIN_EXE_llama-pow"))
        .arg("bench")
        .args(["--params", params.to_str().unwrap(), "--device", "cpu"])
        .args(["--batch-sizes", "4,8", "--seconds", "30"])
        .args(["--out", out.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Let the first configuration compute for a while.
    assert!(wait_until(Duration::from_secs(30), || {
        csv_rows_if_any(&out.join("metrics.csv")) > 10
    }));
    // SAFETY: kill(2) with the PID of a child this test started and has not reaped.
    let rc = unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    assert_eq!(rc, 0);
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the bench did not stop"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(130));
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["interrupted"], true);
    let results = report["results"].as_array().unwrap();
    assert_eq!(results.len(), 1, "the second configuration never started");
    assert!(results[0]["nonces"].as_u64().unwrap() > 0);
    assert!(results[0]["seconds"].as_f64().unwrap() < 25.0);
    assert_eq!(png_size(&out.join("throughput_latency.png")), (1280, 800));
    let (_, rows) = csv_rows(&out.join("metrics.csv"));
    assert_eq!(rows.len() as u64, results[0]["batches"].as_u64().unwrap());
}

/// Rows of a CSV file being written, 0 while it does not exist.
fn csv_rows_if_any(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|t| t.lines().count().saturating_sub(1))
        .unwrap_or(0)
}
