//! `--server URL`: /generate jobs one after the other, the client leaving each after a time
//! or a number of lines, with /health probes as a Poisson process meanwhile.

use super::plot;
use super::stats::Percentiles;
use super::{
    flop_per_nonce, unix_seconds, BenchArgs, Interrupt, Progress, HEALTH_FILE, METRICS_FILE,
    PLOT_FILE,
};
use crate::pow::params::Params;
use anyhow::Context;
use serde_json::{json, Value};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One /health probe: when it was sent (seconds since the run started), its latency, and
/// its status (0: no answer).
#[derive(Debug, Clone)]
struct Probe {
    t: f64,
    latency_ms: f64,
    status: u16,
    error: Option<String>,
}

/// One line of a /generate stream.
struct Line {
    job: u64,
    index: u64,
    t_job: f64,
    t_run: f64,
    valid: u64,
    batch_computed: u64,
    aggregated_computed: u64,
    error: Option<String>,
}

/// The probes' exponential gaps.
struct Gaps(crate::splitmix::SplitMix64);

impl Gaps {
    /// An exponential gap of mean 1 / rate seconds.
    fn gap(&mut self, rate: f64) -> Duration {
        Duration::from_secs_f64((-self.0.unit_nonzero().ln() / rate).min(3600.0))
    }
}

fn join(base: &str, path: &str) -> String {
    format!("{}{path}", base.trim_end_matches('/'))
}

pub fn run(
    args: &BenchArgs,
    params: &Params,
    params_source: &str,
    out: &Path,
    progress: &Progress,
    interrupt: &Interrupt,
) -> anyhow::Result<Value> {
    let url = args.server.clone().unwrap_or_default();
    let parsed =
        reqwest::Url::parse(&url).with_context(|| format!("--server: {url:?} is not a URL"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        anyhow::bail!("--server: expected an http:// or https:// URL, got {url:?}");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(drive(
        args,
        params,
        params_source,
        out,
        progress,
        &url,
        interrupt,
    ))
}

async fn drive(
    args: &BenchArgs,
    params: &Params,
    params_source: &str,
    out: &Path,
    progress: &Progress,
    url: &str,
    interrupt: &Interrupt,
) -> anyhow::Result<Value> {
    let started_unix = unix_seconds();
    let t0 = Instant::now();
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .build()
        .context("cannot build the HTTP client")?;
    let server_health: Value = http
        .get(join(url, "/health"))
        .timeout(args.health_timeout)
        .send()
        .await
        .with_context(|| format!("--server: {url} does not answer /health"))?
        .json()
        .await
        .unwrap_or(Value::Null);

    progress.line(&args.chosen(params_source));
    // /health probes, open loop: each is sent at its time whatever the earlier ones do.
    let probes: Arc<Mutex<Vec<Probe>>> = Arc::default();
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let prober = if args.health_rate > 0.0 {
        let http = http.clone();
        let probes = probes.clone();
        let rate = args.health_rate;
        let timeout = args.health_timeout;
        let health_url = join(url, "/health");
        let seed = (unix_seconds() * 1e9) as u64 ^ u64::from(std::process::id());
        Some(tokio::spawn(async move {
            let mut gaps = Gaps(crate::splitmix::SplitMix64(seed));
            let mut tasks = Vec::new();
            let mut next = tokio::time::Instant::now() + gaps.gap(rate);
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(next) => {}
                    _ = stop_rx.wait_for(|v| *v) => break,
                }
                next += gaps.gap(rate);
                let http = http.clone();
                let probes = probes.clone();
                let u = health_url.clone();
                tasks.push(tokio::spawn(async move {
                    let sent = Instant::now();
                    let t = t0.elapsed().as_secs_f64();
                    let r = http.get(&u).timeout(timeout).send().await;
                    let (status, error) = match r {
                        Ok(resp) => {
                            let s = resp.status().as_u16();
                            match resp.bytes().await {
                                Ok(_) if s == 200 => (s, None),
                                Ok(_) => (s, Some(format!("status {s}"))),
                                Err(e) => (s, Some(e.to_string())),
                            }
                        }
                        Err(e) => (0, Some(e.to_string())),
                    };
                    let p = Probe {
                        t,
                        latency_ms: sent.elapsed().as_secs_f64() * 1000.0,
                        status,
                        error,
                    };
                    probes.lock().unwrap_or_else(|e| e.into_inner()).push(p);
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
        }))
    } else {
        None
    };

    let batch_size = args.batch_sizes[0];
    let mut lines: Vec<Line> = Vec::new();
    let mut jobs = Vec::new();
    let bar = progress.bar(args.jobs);
    for job in 1..=args.jobs {
        if interrupt.is_set() {
            break;
        }
        let body = json!({
            "block_hash": args.block_hash,
            "block_height": 1,
            "public_key": "llama-pow-bench",
            "r_target": args.r_target,
            "batch_size": batch_size,
            "start_nonce": (job - 1) * 1_000_000_000,
            "params": params,
        });
        let sent = Instant::now();
        let deadline = tokio::time::Instant::now() + args.job_seconds;
        let mut first = None;
        let mut n_lines = 0u64;
        let mut errors: Vec<String> = Vec::new();
        let mut computed = 0u64;
        let mut valid = 0u64;
        let mut status = 0u16;
        let mut left = "time";
        let resp = tokio::select! {
            r = tokio::time::timeout_at(
                deadline,
                http.post(join(url, "/generate")).json(&body).send(),
            ) => Some(r),
            _ = interrupt.wait() => None,
        };
        match resp {
            None => left = "interrupted",
            Some(Err(_)) => errors.push("no answer before the job's time ran out".into()),
            Some(Ok(Err(e))) => errors.push(format!("request failed: {e}")),
            Some(Ok(Ok(mut resp))) => {
                status = resp.status().as_u16();
                if status != 200 {
                    let text = resp.text().await.unwrap_or_default();
                    errors.push(format!("status {status}: {}", text.trim()));
                } else {
                    let mut buf: Vec<u8> = Vec::new();
                    'read: loop {
                        let next = tokio::select! {
                            c = tokio::time::timeout_at(deadline, resp.chunk()) => c,
                            _ = interrupt.wait() => {
                                left = "interrupted";
                                break;
                            }
                        };
                        let chunk = match next {
                            Err(_) => break,
                            Ok(Err(e)) => {
                                errors.push(format!("stream broke: {e}"));
                                left = "error";
                                break;
                            }
                            Ok(Ok(None)) => {
                                left = "stream ended";
                                break;
                            }
                            Ok(Ok(Some(c))) => c,
                        };
                        buf.extend_from_slice(&chunk);
                        while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
                            let raw: Vec<u8> = buf.drain(..=pos).collect();
                            let text = String::from_utf8_lossy(&raw);
                            let text = text.trim();
                            if text.is_empty() {
                                continue;
                            }
                            let t_job = sent.elapsed().as_secs_f64();
                            let v: Value = serde_json::from_str(text).unwrap_or(Value::Null);
                            let error = v
                                .get("error")
                                .and_then(Value::as_str)
                                .map(str::to_owned)
                                .or_else(|| v.is_null().then(|| "a line that is not JSON".into()));
                            if let Some(e) = &error {
                                errors.push(e.clone());
                            } else {
                                n_lines += 1;
                                first.get_or_insert(t_job);
                                valid += v["batch_valid"].as_u64().unwrap_or(0);
                                computed =
                                    v["aggregated_total_computed"].as_u64().unwrap_or(computed);
                            }
                            lines.push(Line {
                                job,
                                index: n_lines,
                                t_job,
                                t_run: t0.elapsed().as_secs_f64(),
                                valid: v["batch_valid"].as_u64().unwrap_or(0),
                                batch_computed: v["batch_computed"].as_u64().unwrap_or(0),
                                aggregated_computed: v["aggregated_total_computed"]
                                    .as_u64()
                                    .unwrap_or(0),
                                error,
                            });
                            if args.job_lines.is_some_and(|n| n_lines >= n) {
                                left = "lines";
                                break 'read;
                            }
                        }
                    }
                }
                // Dropping the response here is the client leaving.
            }
        }
        let secs = sent.elapsed().as_secs_f64();
        let summary = format!(
            "job {job}: {n_lines} lines in {secs:.2} s, first after {}, {} error(s)",
            first.map_or("-".into(), |f| format!("{:.3} s", f)),
            errors.len()
        );
        match &bar {
            Some(b) => {
                b.println(&summary);
                b.inc(1);
            }
            None => progress.line(&summary),
        }
        jobs.push(json!({
            "job": job,
            "status": status,
            "seconds": secs,
            "left_after": left,
            "time_to_first_result_seconds": first,
            "lines": n_lines,
            "lines_per_second": if secs > 0.0 { n_lines as f64 / secs } else { 0.0 },
            "nonces_computed": computed,
            "nonces_valid": valid,
            "nonces_per_second": if secs > 0.0 { computed as f64 / secs } else { 0.0 },
            "errors": errors,
        }));
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let _ = stop_tx.send(true);
    if let Some(p) = prober {
        let _ = tokio::time::timeout(args.health_timeout + Duration::from_secs(1), p).await;
    }
    let total_secs = t0.elapsed().as_secs_f64();
    let probes = probes.lock().unwrap_or_else(|e| e.into_inner()).clone();

    let mut csv = csv::Writer::from_path(out.join(METRICS_FILE))
        .with_context(|| format!("cannot write {}", out.join(METRICS_FILE).display()))?;
    csv.write_record([
        "job",
        "line",
        "t_job_seconds",
        "t_run_seconds",
        "batch_valid",
        "batch_computed",
        "aggregated_total_computed",
        "error",
    ])?;
    for l in &lines {
        csv.write_record([
            l.job.to_string(),
            l.index.to_string(),
            format!("{:.6}", l.t_job),
            format!("{:.6}", l.t_run),
            l.valid.to_string(),
            l.batch_computed.to_string(),
            l.aggregated_computed.to_string(),
            l.error.clone().unwrap_or_default(),
        ])?;
    }
    csv.flush()?;
    let mut hcsv = csv::Writer::from_path(out.join(HEALTH_FILE))
        .with_context(|| format!("cannot write {}", out.join(HEALTH_FILE).display()))?;
    hcsv.write_record(["t_seconds", "latency_ms", "status", "error"])?;
    for p in &probes {
        hcsv.write_record([
            format!("{:.6}", p.t),
            format!("{:.4}", p.latency_ms),
            p.status.to_string(),
            p.error.clone().unwrap_or_default(),
        ])?;
    }
    hcsv.flush()?;

    let ok: Vec<&Probe> = probes.iter().filter(|p| p.error.is_none()).collect();
    let ok_lat: Vec<f64> = ok.iter().map(|p| p.latency_ms).collect();
    let series: Vec<Vec<(f64, f64)>> = (1..=args.jobs)
        .map(|j| {
            lines
                .iter()
                .filter(|l| l.job == j && l.error.is_none())
                .map(|l| (l.t_run, l.index as f64))
                .collect()
        })
        .collect();
    let health_pts: Vec<(f64, f64)> = ok.iter().map(|p| (p.t, p.latency_ms)).collect();
    plot::server(
        &out.join(PLOT_FILE),
        &format!("llama-pow bench --server: {params_source}, batch {batch_size}"),
        &series,
        &health_pts,
    )?;
    let total_lines: u64 = jobs.iter().map(|j| j["lines"].as_u64().unwrap_or(0)).sum();
    let first: Vec<f64> = jobs
        .iter()
        .filter_map(|j| j["time_to_first_result_seconds"].as_f64())
        .collect();
    let job_errors: usize = jobs
        .iter()
        .map(|j| j["errors"].as_array().map_or(0, Vec::len))
        .sum();
    let health_errors = probes.len() - ok.len();
    Ok(json!({
        "mode": "server",
        "server_url": url,
        "server_health": server_health,
        "started_unix": started_unix,
        "duration_seconds": total_secs,
        "params_source": params_source,
        "params": params,
        "flop_per_nonce": flop_per_nonce(params),
        "block_hash": args.block_hash,
        "r_target": args.r_target,
        "batch_size": batch_size,
        "job_seconds": args.job_seconds.as_secs_f64(),
        "job_lines": args.job_lines,
        "summary": {
            "jobs": args.jobs,
            "lines": total_lines,
            "lines_per_second": if total_secs > 0.0 { total_lines as f64 / total_secs } else { 0.0 },
            "time_to_first_result_seconds": Percentiles::of(&first),
            "job_errors": job_errors,
        },
        "jobs": jobs,
        "health": {
            "rate_requested": args.health_rate,
            "probes": probes.len(),
            "rate_achieved": if total_secs > 0.0 { probes.len() as f64 / total_secs } else { 0.0 },
            "errors": health_errors,
            "latency_ms": Percentiles::of(&ok_lat),
        },
        "files": [super::REPORT_FILE, METRICS_FILE, HEALTH_FILE, super::GPU_FILE, PLOT_FILE],
    }))
}
