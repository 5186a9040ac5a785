//! `llama-pow bench --agreement`: how far the distances of other dtypes stray from a baseline
//! dtype's (the first of `--dtypes`, f16 by default: the path validators recompute), and what
//! that does to proofs.
//!
//! On the first device of `--device`, each dtype in turn is checked, its model built (timed),
//! and the same `--nonces` nonces (from 0, in batches of the first `--batch-sizes` value, cut
//! to what the device takes) computed with every distance kept; one batch is computed first,
//! untimed, to warm the device up. The rate is nonces per second of device time (the
//! `run_batch` calls only: drawing the inputs on the host is timed apart). Then each other
//! dtype is compared with the baseline, nonce by nonce ([`compare`]): the largest, the p99
//! and the mean difference of distances, and the proofs that flip at an r_target that makes
//! about 1 nonce in [`VALID_ONE_IN`] valid in the baseline ([`r_target_for`]). See the
//! [`super`] docs for the report's fields.

use super::local::{check_dtypes, devices, job_params};
use super::{flop_per_nonce, non_embedding_params, unix_seconds, BenchArgs, Interrupt, Progress};
use crate::backend::batch::prepare;
use crate::backend::{Backend, JobSpec};
use crate::cli::devices::DtypeChoice;
use crate::engine::EngineOptions;
use crate::pow::params::Params;
use crate::pow::proof;
use anyhow::Context;
use serde::Serialize;
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

/// The r_target makes about one nonce in this many valid in the baseline.
pub const VALID_ONE_IN: usize = 500;
/// The share of nonces whose validity may differ from the baseline's.
pub const GOAL_FLIP_RATE: f64 = 1e-4;
/// The largest differences listed per dtype.
pub const LARGEST_SHOWN: usize = 5;
/// Every nonce's distance in every dtype.
pub const CSV_FILE: &str = "agreement.csv";
/// The public key the nonces are drawn for (the sweep's too).
pub const PUBLIC_KEY: &str = "llama-pow-bench";

/// How many nonces of `n` the r_target should make valid: `max(1, round(n / 500))`, halves
/// rounded up.
pub fn valid_count_for(n: usize) -> usize {
    ((n + VALID_ONE_IN / 2) / VALID_ONE_IN).max(1)
}

/// The r_target that makes exactly the `k` smallest of `dist` valid: the midpoint between the
/// k-th and the (k+1)-th smallest (non-finite distances left out). None when there are not
/// k + 1 finite distances, or `k` is 0. Ties at the k-th distance make fewer than `k` valid.
pub fn r_target_for(dist: &[f64], k: usize) -> Option<f64> {
    let mut s: Vec<f64> = dist.iter().copied().filter(|d| d.is_finite()).collect();
    if k == 0 || s.len() <= k {
        return None;
    }
    s.sort_by(f64::total_cmp);
    let (a, b) = (s[k - 1], s[k]);
    Some(a + (b - a) / 2.0)
}

/// The `q` quantile of sorted samples with linear interpolation between the two closest
/// ranks (numpy's default `method="linear"`); NaN when there are none.
pub fn quantile_linear(sorted: &[f64], q: f64) -> f64 {
    let Some(&last) = sorted.last() else {
        return f64::NAN;
    };
    let h = (sorted.len() - 1) as f64 * q.clamp(0.0, 1.0);
    let i = h.floor() as usize;
    if i + 1 >= sorted.len() {
        return last;
    }
    let (a, b) = (sorted[i], sorted[i + 1]);
    a + (b - a) * (h - i as f64)
}

/// The nonces valid (strictly below `r_target`) in one list and not the other:
/// `(valid only in baseline, valid only in other)`.
pub fn flips(baseline: &[f64], other: &[f64], r_target: f64) -> (usize, usize) {
    baseline
        .iter()
        .zip(other)
        .fold((0, 0), |(only_base, only_other), (&b, &o)| {
            match (proof::is_valid(b, r_target), proof::is_valid(o, r_target)) {
                (true, false) => (only_base + 1, only_other),
                (false, true) => (only_base, only_other + 1),
                _ => (only_base, only_other),
            }
        })
}

/// One nonce whose distance differs from the baseline's.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Difference {
    pub nonce: u64,
    pub baseline_dist: f64,
    pub dist: f64,
    /// `dist - baseline_dist`.
    pub diff: f64,
}

/// One dtype's distances against the baseline's, nonce by nonce.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Comparison {
    /// Of |dist - baseline_dist| over the pairs whose difference is finite.
    pub max_abs_diff: f64,
    pub p99_abs_diff: f64,
    pub mean_abs_diff: f64,
    /// Mean of dist - baseline_dist (signed: a bias shows here).
    pub mean_diff: f64,
    /// Pairs whose difference is not finite (left out of the figures above).
    pub non_finite: usize,
    pub valid_baseline: usize,
    pub valid: usize,
    pub valid_only_in_baseline: usize,
    pub valid_only_in_dtype: usize,
    /// `valid_only_in_baseline + valid_only_in_dtype`.
    pub flips: usize,
    /// `flips / nonces`.
    pub flip_rate: f64,
    pub meets_goal: bool,
    /// The largest differences first (non-finite ones before all others).
    pub largest: Vec<Difference>,
}

/// `other`'s distances against `baseline`'s (both in the order of `nonces`) at `r_target`.
pub fn compare(
    nonces: &[u64],
    baseline: &[f64],
    other: &[f64],
    r_target: f64,
    shown: usize,
) -> Comparison {
    let n = nonces.len().min(baseline.len()).min(other.len());
    let diffs: Vec<f64> = (0..n).map(|i| other[i] - baseline[i]).collect();
    let finite: Vec<f64> = diffs.iter().copied().filter(|d| d.is_finite()).collect();
    let mut abs: Vec<f64> = finite.iter().map(|d| d.abs()).collect();
    abs.sort_by(f64::total_cmp);
    let mean = |xs: &[f64]| {
        if xs.is_empty() {
            f64::NAN
        } else {
            xs.iter().sum::<f64>() / xs.len() as f64
        }
    };
    let count_valid = |d: &[f64]| {
        d[..n]
            .iter()
            .filter(|&&x| proof::is_valid(x, r_target))
            .count()
    };
    let (only_base, only_other) = flips(&baseline[..n], &other[..n], r_target);
    let flip_count = only_base + only_other;
    let flip_rate = if n == 0 {
        0.0
    } else {
        flip_count as f64 / n as f64
    };
    // Largest first; a non-finite difference ranks above every finite one.
    let rank = |d: f64| {
        if d.is_finite() {
            d.abs()
        } else {
            f64::INFINITY
        }
    };
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| rank(diffs[b]).total_cmp(&rank(diffs[a])).then(a.cmp(&b)));
    let largest = order
        .into_iter()
        .take(shown)
        .map(|i| Difference {
            nonce: nonces[i],
            baseline_dist: baseline[i],
            dist: other[i],
            diff: diffs[i],
        })
        .collect();
    Comparison {
        max_abs_diff: abs.last().copied().unwrap_or(f64::NAN),
        p99_abs_diff: quantile_linear(&abs, 0.99),
        mean_abs_diff: mean(&abs),
        mean_diff: mean(&finite),
        non_finite: n - finite.len(),
        valid_baseline: count_valid(baseline),
        valid: count_valid(other),
        valid_only_in_baseline: only_base,
        valid_only_in_dtype: only_other,
        flips: flip_count,
        flip_rate,
        meets_goal: flip_rate < GOAL_FLIP_RATE,
        largest,
    }
}

/// One dtype's pass over the nonces.
struct DtypeRun {
    choice: DtypeChoice,
    batch_size: usize,
    build_seconds: f64,
    compute_seconds: f64,
    prepare_seconds: f64,
    dist: Vec<f64>,
}

impl DtypeRun {
    fn nonces_per_second(&self) -> f64 {
        if self.compute_seconds > 0.0 {
            self.dist.len() as f64 / self.compute_seconds
        } else {
            0.0
        }
    }
}

/// Build `choice`'s model on `device` and compute nonces `0..n` with every distance kept.
fn compute(
    device: &dyn Backend,
    args: &BenchArgs,
    params: &Params,
    choice: DtypeChoice,
    n: usize,
    progress: &Progress,
    interrupt: &Interrupt,
) -> anyhow::Result<DtypeRun> {
    let name = choice.as_str();
    let dev = device.name();
    let p = job_params(params, choice);
    let dtype = choice.dtype();
    progress.line(&format!("{name} on {dev}: building the model"));
    let t = Instant::now();
    let model = device
        .build_model(&args.block_hash, &p, dtype)
        .map_err(|e| anyhow::anyhow!("{name} on {dev}: building the model: {e}"))?;
    let build_seconds = t.elapsed().as_secs_f64();
    // The batch, cut as the engine cuts it: to its host-memory bound and the device's own.
    let requested = args.batch_sizes.first().copied().unwrap_or(1);
    let by_bytes =
        (EngineOptions::default().max_batch_bytes / device.bytes_per_nonce(&p).max(1)).max(1);
    let mut batch_size = requested.min(by_bytes).min(n as u64).max(1) as usize;
    if let Some(m) = device.max_batch(&model, &p) {
        batch_size = batch_size.min(m.max(1));
    }
    progress.line(&format!(
        "{name} on {dev}: model built in {build_seconds:.2} s; computing {n} nonces in batches \
         of {batch_size}"
    ));
    let job = JobSpec::new(&args.block_hash, PUBLIC_KEY, &p, dtype, f64::INFINITY);
    let run = |nonces: Vec<u64>| -> anyhow::Result<(Vec<f64>, Duration, Duration)> {
        let t = Instant::now();
        let batch = prepare(&job, nonces.clone());
        let prepared = t.elapsed();
        let t = Instant::now();
        let r = device
            .run_batch(&model, &job, batch, true)
            .map_err(|e| anyhow::anyhow!("{name} on {dev}: {e}"))?;
        let computed = t.elapsed();
        let n_dist = r.distances().map_or(0, <[f64]>::len);
        match r.dist {
            Some(dist) if r.nonces == nonces && dist.len() == nonces.len() => {
                Ok((dist, prepared, computed))
            }
            _ => anyhow::bail!(
                "{name} on {dev}: a batch of {} nonces came back with {} nonces and {n_dist} \
                 distances",
                nonces.len(),
                r.nonces.len(),
            ),
        }
    };
    // Warm-up (kernels compiled, products tuned), not timed.
    run((0..batch_size as u64).collect())?;
    let bar = progress.bar(n as u64);
    if let Some(b) = &bar {
        b.set_message(format!("{name} on {dev}"));
    }
    let (mut prepare_time, mut compute_time) = (Duration::ZERO, Duration::ZERO);
    let mut dist = Vec::with_capacity(n);
    let mut start = 0usize;
    while start < n && !interrupt.is_set() {
        let end = (start + batch_size).min(n);
        let (d, prepared, computed) = run((start as u64..end as u64).collect())?;
        dist.extend(d);
        prepare_time += prepared;
        compute_time += computed;
        if let Some(b) = &bar {
            b.set_position(end as u64);
        }
        start = end;
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let r = DtypeRun {
        choice,
        batch_size,
        build_seconds,
        compute_seconds: compute_time.as_secs_f64(),
        prepare_seconds: prepare_time.as_secs_f64(),
        dist,
    };
    progress.line(&format!(
        "{name} on {dev}: {} nonces in {:.2} s of device time, {:.1} nonces/s (inputs drawn \
         on the host in {:.2} s more)",
        r.dist.len(),
        r.compute_seconds,
        r.nonces_per_second(),
        r.prepare_seconds
    ));
    Ok(r)
}

/// A number for the table: three significant digits in scientific notation, 0, or "n/a".
fn sci(x: Option<f64>) -> String {
    match x {
        Some(0.0) => "0".to_owned(),
        Some(x) if x.is_finite() => format!("{x:.2e}"),
        _ => "n/a".to_owned(),
    }
}

/// The Markdown table of `report["agreement"]`: the baseline's row, then one per dtype.
pub fn markdown(agreement: &Value) -> String {
    let base = agreement["baseline"].as_str().unwrap_or("?");
    let runs = agreement["runs"].as_array().cloned().unwrap_or_default();
    let rows = agreement["rows"].as_array().cloned().unwrap_or_default();
    let nps = |v: &Value| {
        v["nonces_per_second"]
            .as_f64()
            .map_or("n/a".to_owned(), |x| format!("{x:.1}"))
    };
    let mut s = format!(
        "Agreement with {base} over {} nonces on {} (batch {}); r_target {} makes {} valid in \
         {base}:\n\n",
        agreement["nonces"],
        agreement["device"].as_str().unwrap_or("?"),
        agreement["batch_size"],
        agreement["r_target"]
            .as_f64()
            .map_or("n/a".to_owned(), |r| format!("{r:.6}")),
        agreement["valid_in_baseline"],
    );
    s.push_str(&format!(
        "| dtype | nonces/s | vs {base} | max abs diff | p99 abs diff | mean diff | valid | \
         flips | flip rate (goal < {GOAL_FLIP_RATE:.0e}) |\n"
    ));
    s.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---|\n");
    if let Some(b) = runs.first() {
        s.push_str(&format!(
            "| {base} (baseline) | {} | 1.00 | - | - | - | {} | - | - |\n",
            nps(b),
            agreement["valid_in_baseline"]
        ));
    }
    for r in &rows {
        let ok = if r["meets_goal"] == true { "yes" } else { "no" };
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} ({ok}) |\n",
            r["dtype"].as_str().unwrap_or("?"),
            nps(r),
            r["nonces_per_second_ratio"]
                .as_f64()
                .map_or("n/a".to_owned(), |x| format!("{x:.2}")),
            sci(r["max_abs_diff"].as_f64()),
            sci(r["p99_abs_diff"].as_f64()),
            sci(r["mean_diff"].as_f64()),
            r["valid"],
            r["flips"],
            sci(r["flip_rate"].as_f64()),
        ));
    }
    s
}

/// `bench --agreement`: the report (see the [`super`] docs).
pub fn run(
    args: &BenchArgs,
    params: &Params,
    params_source: &str,
    out: &Path,
    progress: &Progress,
    interrupt: &Interrupt,
) -> anyhow::Result<Value> {
    let (devs, device_note) = devices(args.device, params, args.cuda_graphs)?;
    if let Some(note) = &device_note {
        progress.line(note);
    }
    let device = devs.first().cloned().context("no device to compute on")?;
    let dev = device.name();
    // Every dtype checked before the first is computed: fp8 on the CPU fails at once.
    check_dtypes(&devs[..1], params, params_source, &args.dtypes)?;
    progress.line(&args.chosen(params_source));
    let started_unix = unix_seconds();
    let t_run = Instant::now();
    let n = usize::try_from(args.nonces).context("--nonces: too many for this machine")?;
    device.warm_up();
    let mut runs = Vec::with_capacity(args.dtypes.len());
    for &choice in &args.dtypes {
        if interrupt.is_set() {
            break;
        }
        runs.push(compute(
            device.as_ref(),
            args,
            params,
            choice,
            n,
            progress,
            interrupt,
        )?);
    }
    // Interrupted (Ctrl-C): compare the nonces every dtype computed.
    let n = runs.iter().map(|r| r.dist.len()).min().unwrap_or(0);
    for r in &mut runs {
        r.dist.truncate(n);
    }
    if interrupt.is_set() && (runs.len() < 2 || n < 2) {
        anyhow::bail!(
            "interrupted before two dtypes had nonces to compare ({} dtype(s), {n} nonces)",
            runs.len()
        );
    }
    let nonces: Vec<u64> = (0..n as u64).collect();
    let base = &runs[0];
    let base_name = base.choice.as_str();
    let k = valid_count_for(n);
    let r_target = r_target_for(&base.dist, k).with_context(|| {
        format!(
            "{base_name}: fewer than {} finite distances, no r_target making {k} valid",
            k + 1
        )
    })?;
    let valid_in_baseline = base
        .dist
        .iter()
        .filter(|&&d| proof::is_valid(d, r_target))
        .count();
    let base_nps = base.nonces_per_second();
    let rows: Vec<Value> = runs[1..]
        .iter()
        .map(|r| {
            let c = compare(&nonces, &base.dist, &r.dist, r_target, LARGEST_SHOWN);
            let nps = r.nonces_per_second();
            json!({
                "dtype": r.choice.as_str(),
                "baseline": base_name,
                "nonces_per_second": nps,
                "baseline_nonces_per_second": base_nps,
                "nonces_per_second_ratio": (base_nps > 0.0).then(|| nps / base_nps),
                "max_abs_diff": c.max_abs_diff,
                "p99_abs_diff": c.p99_abs_diff,
                "mean_abs_diff": c.mean_abs_diff,
                "mean_diff": c.mean_diff,
                "non_finite": c.non_finite,
                "valid_baseline": c.valid_baseline,
                "valid": c.valid,
                "valid_only_in_baseline": c.valid_only_in_baseline,
                "valid_only_in_dtype": c.valid_only_in_dtype,
                "flips": c.flips,
                "flip_rate": c.flip_rate,
                "goal_flip_rate": GOAL_FLIP_RATE,
                "meets_goal": c.meets_goal,
                "largest_diffs": c.largest,
            })
        })
        .collect();
    let run_figures: Vec<Value> = runs
        .iter()
        .map(|r| {
            json!({
                "dtype": r.choice.as_str(),
                "batch_size": r.batch_size,
                "model_build_seconds": r.build_seconds,
                "compute_seconds": r.compute_seconds,
                "prepare_seconds": r.prepare_seconds,
                "nonces_per_second": r.nonces_per_second(),
                "valid": r.dist.iter().filter(|&&d| proof::is_valid(d, r_target)).count(),
            })
        })
        .collect();
    let mut agreement = json!({
        "baseline": base_name,
        "nonces": n,
        "start_nonce": 0,
        "device": dev,
        "batch_size": args.batch_sizes.first().copied().unwrap_or(1),
        "valid_one_in": VALID_ONE_IN,
        "valid_target": k,
        "r_target": r_target,
        "valid_in_baseline": valid_in_baseline,
        "goal_flip_rate": GOAL_FLIP_RATE,
        "runs": run_figures,
        "rows": rows,
    });
    let table = markdown(&agreement);
    agreement["markdown"] = table.clone().into();
    progress.line("");
    for line in table.lines() {
        progress.line(line);
    }
    for r in &rows {
        let shown: Vec<String> = r["largest_diffs"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|d| {
                let f = |k: &str| d[k].as_f64().unwrap_or(f64::NAN);
                format!(
                    "nonce {}: {:.6} vs {:.6} ({:+.2e})",
                    d["nonce"],
                    f("baseline_dist"),
                    f("dist"),
                    f("diff")
                )
            })
            .collect();
        progress.line(&format!(
            "{} against {base_name}, the largest differences: {}",
            r["dtype"].as_str().unwrap_or("?"),
            shown.join("; ")
        ));
    }
    write_csv(&out.join(CSV_FILE), &nonces, &runs)?;
    Ok(json!({
        "mode": "agreement",
        "started_unix": started_unix,
        "duration_seconds": t_run.elapsed().as_secs_f64(),
        "params_source": params_source,
        "params": params,
        "total_params": crate::pow::weights::total_params(params),
        "non_embedding_params": non_embedding_params(params),
        "flop_per_nonce": flop_per_nonce(params),
        "block_hash": args.block_hash,
        "device_note": device_note,
        "agreement": agreement,
        "files": [super::REPORT_FILE, CSV_FILE, super::GPU_FILE],
    }))
}

/// `agreement.csv`: a row per nonce, a column of distances per dtype (in `--dtypes` order).
fn write_csv(path: &Path, nonces: &[u64], runs: &[DtypeRun]) -> anyhow::Result<()> {
    let mut w =
        csv::Writer::from_path(path).with_context(|| format!("cannot write {}", path.display()))?;
    let mut header = vec!["nonce".to_owned()];
    header.extend(runs.iter().map(|r| r.choice.as_str().to_owned()));
    w.write_record(&header)?;
    for (i, nonce) in nonces.iter().enumerate() {
        let mut row = vec![nonce.to_string()];
        row.extend(runs.iter().map(|r| r.dist[i].to_string()));
        w.write_record(&row)?;
    }
    w.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_valid_in_500_rounded_half_up_and_at_least_one() {
        assert_eq!(valid_count_for(10_000), 20);
        assert_eq!(valid_count_for(300), 1);
        assert_eq!(valid_count_for(2), 1);
        assert_eq!(valid_count_for(749), 1);
        assert_eq!(valid_count_for(750), 2);
        assert_eq!(valid_count_for(1_250), 3);
    }

    #[test]
    fn r_target_sits_between_the_kth_and_the_next() {
        let d = [0.9, 0.3, 0.5, f64::NAN, 0.1, 0.7];
        assert_eq!(r_target_for(&d, 1), Some(0.2));
        assert_eq!(r_target_for(&d, 2), Some(0.4));
        // Five finite distances once the NaN is left out: no sixth to stop at for k = 5.
        assert_eq!(r_target_for(&d, 4), Some(0.8));
        assert_eq!(r_target_for(&d, 5), None);
        assert_eq!(r_target_for(&d, 0), None);
        // Exactly k valid below it.
        let r = r_target_for(&d, 2).unwrap();
        assert_eq!(d.iter().filter(|&&x| proof::is_valid(x, r)).count(), 2);
    }

    #[test]
    fn quantiles_interpolate_as_numpy_does() {
        // np.percentile([1, 2, 3, 4], 99) == 3.97; np.quantile(..., 0.5) == 2.5.
        let s = [1.0, 2.0, 3.0, 4.0];
        assert!((quantile_linear(&s, 0.99) - 3.97).abs() < 1e-12);
        assert_eq!(quantile_linear(&s, 0.5), 2.5);
        assert_eq!(quantile_linear(&s, 0.0), 1.0);
        assert_eq!(quantile_linear(&s, 1.0), 4.0);
        assert_eq!(quantile_linear(&[7.0], 0.99), 7.0);
        assert!(quantile_linear(&[], 0.99).is_nan());
        // 0..=100: the p99 is 99 exactly; 0..=10: 9.9.
        let v: Vec<f64> = (0..=100).map(f64::from).collect();
        assert_eq!(quantile_linear(&v, 0.99), 99.0);
        let v: Vec<f64> = (0..=10).map(f64::from).collect();
        assert!((quantile_linear(&v, 0.99) - 9.9).abs() < 1e-12);
    }

    #[test]
    fn flips_count_both_ways() {
        let base = [0.1, 0.5, 0.29, 0.31, 0.9];
        let other = [0.1, 0.2, 0.31, 0.29, 0.3];
        // r = 0.3: nonce 1 and 3 become valid, 2 stops being valid; 4 stays invalid (0.3 is not
        // below 0.3).
        assert_eq!(flips(&base, &other, 0.3), (1, 2));
        assert_eq!(flips(&base, &base, 0.3), (0, 0));
        // NaN is never valid.
        assert_eq!(flips(&[0.1], &[f64::NAN], 0.3), (1, 0));
    }

    #[test]
    fn comparison_of_hand_made_distances() {
        let nonces = [10, 11, 12, 13, 14];
        let base = [1.0, 2.0, 3.0, 4.0, 5.0];
        let other = [1.0, 2.5, 2.9, 4.0, 5.2];
        let c = compare(&nonces, &base, &other, 2.2, 2);
        assert!((c.max_abs_diff - 0.5).abs() < 1e-12);
        // |diffs| sorted: 0, 0, 0.1, 0.2, 0.5; p99 at h = 3.96: 0.2 + 0.96 * 0.3.
        assert!((c.p99_abs_diff - 0.488).abs() < 1e-12, "{}", c.p99_abs_diff);
        assert!((c.mean_diff - 0.12).abs() < 1e-12, "{}", c.mean_diff);
        assert!((c.mean_abs_diff - 0.16).abs() < 1e-12);
        assert_eq!((c.valid_baseline, c.valid), (2, 1));
        assert_eq!((c.valid_only_in_baseline, c.valid_only_in_dtype), (1, 0));
        assert_eq!(c.flips, 1);
        assert!((c.flip_rate - 0.2).abs() < 1e-12);
        assert!(!c.meets_goal);
        assert_eq!(c.non_finite, 0);
        let shown: Vec<u64> = c.largest.iter().map(|d| d.nonce).collect();
        assert_eq!(shown, [11, 14]);
        assert_eq!(c.largest[0].baseline_dist, 2.0);
        assert_eq!(c.largest[0].dist, 2.5);

        // Identical distances: nothing differs, the goal is met; a NaN ranks first.
        let c = compare(&nonces, &base, &base, 2.2, 5);
        assert_eq!((c.max_abs_diff, c.p99_abs_diff, c.flips), (0.0, 0.0, 0));
        assert!(c.meets_goal);
        let mut odd = base;
        odd[3] = f64::NAN;
        let c = compare(&nonces, &base, &odd, 2.2, 1);
        assert_eq!(c.non_finite, 1);
        assert_eq!(c.largest[0].nonce, 13);
        assert_eq!(c.max_abs_diff, 0.0);
    }

    #[test]
    fn the_table_has_the_baseline_then_a_row_per_dtype() {
        let a = json!({
            "baseline": "f16", "nonces": 10000, "device": "cuda:0", "batch_size": 256,
            "r_target": 1.25, "valid_in_baseline": 20,
            "runs": [{"dtype": "f16", "nonces_per_second": 1000.0}],
            "rows": [{"dtype": "bf16", "nonces_per_second": 1100.0,
                      "nonces_per_second_ratio": 1.1, "max_abs_diff": 0.003,
                      "p99_abs_diff": 0.001, "mean_diff": -1e-5, "valid": 21, "flips": 1,
                      "flip_rate": 1e-4, "meets_goal": false}],
        });
        let t = markdown(&a);
        let lines: Vec<&str> = t.lines().collect();
        assert!(
            lines[0].contains("10000 nonces on cuda:0 (batch 256)"),
            "{t}"
        );
        assert!(lines[0].contains("r_target 1.250000 makes 20 valid"), "{t}");
        assert!(lines[2].starts_with("| dtype | nonces/s | vs f16 |"), "{t}");
        assert_eq!(
            lines[4],
            "| f16 (baseline) | 1000.0 | 1.00 | - | - | - | 20 | - | - |"
        );
        assert_eq!(
            lines[5],
            "| bf16 | 1100.0 | 1.10 | 3.00e-3 | 1.00e-3 | -1.00e-5 | 21 | 1 | 1.00e-4 (no) |"
        );
        assert_eq!(sci(Some(0.0)), "0");
        assert_eq!(sci(Some(f64::NAN)), "n/a");
        assert_eq!(sci(None), "n/a");
    }
}
