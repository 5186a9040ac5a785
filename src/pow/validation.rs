//! What validators do with a proof batch: recompute each nonce's distance and run the fraud
//! test (DESIGN.md, "Validation"). Pure: the request, the verdict and its statistics; the
//! recomputation itself is the engine's.
//!
//! A proof batch carries only distances below r_target (the reference asserts it, so a
//! received distance at or above r_target is a bad request, not a fraud signal). A nonce is
//! invalid when its recomputed distance is strictly above r_target (one exactly at r_target is
//! not, although a miner's own filter is `dist < r_target`). The batch is judged a fraud when
//! the probability of that many invalid nonces from an honest miner, each mismatching with
//! probability [`PROBABILITY_MISMATCH`], falls below the fraud threshold.

use super::binomial;
use super::params::Params;
use super::request::{parse_params, wrong, Fields, RequestError, MAX_BATCH_SIZE};
use serde::Serialize;
use serde_json::Value;
use std::collections::HashMap;

/// The chance that an honest miner's nonce does not reproduce (the reference's constant).
pub const PROBABILITY_MISMATCH: f64 = 5e-4;
/// The reference's default fraud threshold.
pub const DEFAULT_FRAUD_THRESHOLD: f64 = 0.01;
/// The most nonces one validation may carry.
pub const MAX_NONCES: usize = 1 << 20;

/// The fields a validation request must carry, in the order they are listed when missing.
pub const REQUIRED_KEYS: [&str; 7] = [
    "block_hash",
    "block_height",
    "public_key",
    "params",
    "r_target",
    "nonces",
    "dist",
];

/// The optional fields of a validation request.
pub const OPTIONAL_KEYS: [&str; 3] = ["node_id", "fraud_threshold", "batch_size"];

/// A proof batch to validate, as a miner sent it.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidationRequest {
    pub block_hash: String,
    pub block_height: u64,
    pub public_key: String,
    pub node_id: u64,
    pub params: Params,
    pub r_target: f64,
    pub fraud_threshold: f64,
    /// In the order received; neither sorted nor contiguous, but each at most once.
    pub nonces: Vec<u64>,
    /// The miner's distance of each nonce.
    pub dist: Vec<f64>,
    pub batch_size: Option<u64>,
}

impl ValidationRequest {
    /// Parse the fields of a validation request from an object (other keys are left to the
    /// caller). Every missing required field is named in one error; every other error names
    /// its field (and, in a list, its index).
    pub fn from_fields(f: &Fields<'_>) -> Result<Self, RequestError> {
        let missing: Vec<&str> = REQUIRED_KEYS
            .iter()
            .copied()
            .filter(|k| f.get(k).is_none())
            .collect();
        match missing.len() {
            0 => {}
            1 => {
                return Err(RequestError(format!(
                    "{}: missing required field",
                    missing[0]
                )))
            }
            _ => {
                return Err(RequestError(format!(
                    "missing required fields: {}",
                    missing.join(", ")
                )))
            }
        }
        let block_hash = f.string("block_hash")?;
        let block_height = f.u64("block_height")?;
        let public_key = f.string("public_key")?;
        let node_id = f.u64_opt("node_id")?.unwrap_or(0);
        let params = parse_params(f.required("params")?)?;
        let r_target = f.f64("r_target")?;
        if !r_target.is_finite() || r_target <= 0.0 {
            return Err(RequestError(format!(
                "r_target: must be a positive finite number (got {r_target})"
            )));
        }
        let fraud_threshold = f
            .f64_opt("fraud_threshold")?
            .unwrap_or(DEFAULT_FRAUD_THRESHOLD);
        if !(0.0..=1.0).contains(&fraud_threshold) {
            return Err(RequestError(format!(
                "fraud_threshold: must be a probability between 0 and 1 (got {fraud_threshold})"
            )));
        }
        let batch_size = f.positive_opt("batch_size", MAX_BATCH_SIZE)?;
        let nonces = nonce_list(f.required("nonces")?)?;
        let dist = dist_list(f.required("dist")?, r_target)?;
        if dist.len() != nonces.len() {
            return Err(RequestError(format!(
                "dist: {} distances for {} nonces (one distance per nonce)",
                dist.len(),
                nonces.len()
            )));
        }
        Ok(ValidationRequest {
            block_hash,
            block_height,
            public_key,
            node_id,
            params,
            r_target,
            fraud_threshold,
            nonces,
            dist,
            batch_size,
        })
    }
}

fn array<'a>(field: &str, v: &'a Value) -> Result<&'a Vec<Value>, RequestError> {
    let a = v.as_array().ok_or_else(|| wrong(field, "an array", v))?;
    if a.len() > MAX_NONCES {
        return Err(RequestError(format!(
            "{field}: at most {MAX_NONCES} per validation (got {}); split the batch",
            a.len()
        )));
    }
    Ok(a)
}

/// Nonces: integers in 0..2^64, none repeated.
fn nonce_list(v: &Value) -> Result<Vec<u64>, RequestError> {
    let a = array("nonces", v)?;
    let mut seen: HashMap<u64, usize> = HashMap::with_capacity(a.len());
    let mut out = Vec::with_capacity(a.len());
    for (i, x) in a.iter().enumerate() {
        let n = x.as_u64().ok_or_else(|| {
            wrong(
                &format!("nonces[{i}]"),
                "a non-negative integer below 2^64",
                x,
            )
        })?;
        if let Some(first) = seen.insert(n, i) {
            return Err(RequestError(format!(
                "nonces[{i}]: {n} appears twice (also at nonces[{first}]); a proof batch holds \
                 each nonce once"
            )));
        }
        out.push(n);
    }
    Ok(out)
}

/// Received distances: finite, each strictly below r_target.
fn dist_list(v: &Value, r_target: f64) -> Result<Vec<f64>, RequestError> {
    let a = array("dist", v)?;
    let mut out = Vec::with_capacity(a.len());
    for (i, x) in a.iter().enumerate() {
        let d = x
            .as_f64()
            .ok_or_else(|| wrong(&format!("dist[{i}]"), "a number", x))?;
        if !d.is_finite() || d >= r_target {
            return Err(RequestError(format!(
                "dist[{i}]: {d} is not below r_target {r_target} (a proof batch holds only \
                 distances below r_target)"
            )));
        }
        out.push(d);
    }
    Ok(out)
}

/// scipy's `binomtest(n_invalid, n, PROBABILITY_MISMATCH, alternative='greater').pvalue`: the
/// probability that an honest miner's batch of `n` nonces has `n_invalid` or more that do not
/// reproduce (1 for an empty batch or no invalid nonce).
pub fn probability_honest(n_invalid: u64, n: u64) -> f64 {
    binomial::sf_at_least(n_invalid, n, PROBABILITY_MISMATCH)
}

/// The verdict on a batch: the reference's ValidatedBatch, and what a miner checking an
/// install wants to see beside it (which nonces failed, how far the distances moved, how long
/// the recomputation took).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ValidatedBatch {
    pub public_key: String,
    pub block_hash: String,
    pub block_height: u64,
    pub node_id: u64,
    pub nonces: Vec<u64>,
    pub received_dist: Vec<f64>,
    /// Recomputed, lined up with `nonces`.
    pub dist: Vec<f64>,
    pub r_target: f64,
    pub fraud_threshold: f64,
    pub n_invalid: u64,
    pub probability_honest: f64,
    pub fraud_detected: bool,
    /// The nonces whose recomputed distance is above r_target, in batch order.
    pub invalid_nonces: Vec<u64>,
    /// Between received and recomputed distances; null for an empty batch.
    pub max_abs_dist_diff: Option<f64>,
    /// The 99th percentile (linear interpolation between order statistics, as numpy's
    /// default); null for an empty batch.
    pub p99_abs_dist_diff: Option<f64>,
    pub compute_seconds: f64,
}

/// Whether a recomputed distance makes a nonce invalid: strictly above r_target.
pub fn is_invalid(recomputed: f64, r_target: f64) -> bool {
    recomputed > r_target
}

/// Judge `req` by its recomputed distances (lined up with `req.nonces`). Refuses distances
/// that are not finite: a device that produced them failed, and its verdict would be
/// meaningless (NaN is never above r_target).
pub fn judge(
    req: &ValidationRequest,
    recomputed: Vec<f64>,
    compute_seconds: f64,
) -> Result<ValidatedBatch, String> {
    assert_eq!(recomputed.len(), req.nonces.len(), "one distance per nonce");
    if let Some(i) = recomputed.iter().position(|d| !d.is_finite()) {
        return Err(format!(
            "the recomputed distance of nonce {} is {} (the device failed)",
            req.nonces[i], recomputed[i]
        ));
    }
    let invalid_nonces: Vec<u64> = req
        .nonces
        .iter()
        .zip(&recomputed)
        .filter(|(_, &d)| is_invalid(d, req.r_target))
        .map(|(&n, _)| n)
        .collect();
    let n_invalid = invalid_nonces.len() as u64;
    let probability_honest = probability_honest(n_invalid, req.nonces.len() as u64);
    let mut diffs: Vec<f64> = req
        .dist
        .iter()
        .zip(&recomputed)
        .map(|(a, b)| (a - b).abs())
        .collect();
    diffs.sort_by(f64::total_cmp);
    Ok(ValidatedBatch {
        public_key: req.public_key.clone(),
        block_hash: req.block_hash.clone(),
        block_height: req.block_height,
        node_id: req.node_id,
        nonces: req.nonces.clone(),
        received_dist: req.dist.clone(),
        dist: recomputed,
        r_target: req.r_target,
        fraud_threshold: req.fraud_threshold,
        n_invalid,
        probability_honest,
        fraud_detected: probability_honest < req.fraud_threshold,
        invalid_nonces,
        max_abs_dist_diff: diffs.last().copied(),
        p99_abs_dist_diff: percentile(&diffs, 0.99),
        compute_seconds,
    })
}

/// The `q` quantile of sorted values, interpolating linearly between order statistics.
fn percentile(sorted: &[f64], q: f64) -> Option<f64> {
    let last = sorted.len().checked_sub(1)?;
    let pos = q * last as f64;
    let lo = pos.floor() as usize;
    let hi = (lo + 1).min(last);
    let frac = pos - lo as f64;
    Some(sorted[lo] + frac * (sorted[hi] - sorted[lo]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body() -> Value {
        json!({
            "block_hash": "bh", "block_height": 3, "public_key": "pk",
            "params": {"dim": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 2,
                       "vocab_size": 40, "multiple_of": 32, "seq_len": 4},
            "r_target": 1.4, "nonces": [5, 1, 9], "dist": [1.3, 1.39, 1.0]
        })
    }

    fn parse(v: &Value) -> Result<ValidationRequest, String> {
        let f = Fields::new(v, "request", "").map_err(|e| e.to_string())?;
        ValidationRequest::from_fields(&f).map_err(|e| e.to_string())
    }

    fn with(key: &str, v: Value) -> Value {
        let mut b = body();
        b[key] = v;
        b
    }

    #[test]
    fn a_batch_parses_with_its_defaults() {
        let r = parse(&body()).unwrap();
        assert_eq!(r.nonces, [5, 1, 9]);
        assert_eq!(r.dist, [1.3, 1.39, 1.0]);
        assert_eq!(r.node_id, 0);
        assert_eq!(r.fraud_threshold, DEFAULT_FRAUD_THRESHOLD);
        assert_eq!(r.batch_size, None);
        let r = parse(&with("nonces", json!([]))).map(|_| ()).unwrap_err();
        assert!(r.contains("0 nonces"), "{r}");
        let mut empty = body();
        empty["nonces"] = json!([]);
        empty["dist"] = json!([]);
        assert!(parse(&empty).unwrap().nonces.is_empty());
    }

    #[test]
    fn every_bad_field_is_named() {
        let mut b = body();
        let o = b.as_object_mut().unwrap();
        o.remove("nonces");
        o.remove("public_key");
        o.remove("r_target");
        assert_eq!(
            parse(&b).unwrap_err(),
            "missing required fields: public_key, r_target, nonces"
        );
        let mut b = body();
        b.as_object_mut().unwrap().remove("dist");
        assert_eq!(parse(&b).unwrap_err(), "dist: missing required field");
        let cases: Vec<(Value, &str)> = vec![
            (
                with("nonces", json!([1, 2, 1])),
                "nonces[2]: 1 appears twice (also at nonces[0])",
            ),
            (
                with("nonces", json!([1, -2, 3])),
                "nonces[1]: expected a non-negative integer",
            ),
            (with("nonces", json!("1,2")), "nonces: expected an array"),
            (
                with("dist", json!([1.3, 1.4, 1.0])),
                "dist[1]: 1.4 is not below r_target 1.4",
            ),
            (
                with("dist", json!([1.3, "x", 1.0])),
                "dist[1]: expected a number",
            ),
            (
                with("dist", json!([1.3, 1.0])),
                "dist: 2 distances for 3 nonces",
            ),
            (
                with("r_target", json!(-1)),
                "r_target: must be a positive finite number",
            ),
            (
                with("fraud_threshold", json!(1.5)),
                "fraud_threshold: must be a probability",
            ),
            (with("batch_size", json!(0)), "batch_size:"),
            (with("block_height", json!("3")), "block_height: expected"),
            (with("node_id", json!(-1)), "node_id: expected"),
            (with("params", json!({"dim": 33})), "params."),
        ];
        for (v, want) in cases {
            let e = parse(&v).unwrap_err();
            assert!(e.starts_with(want), "{e:?} should start with {want:?}");
        }
    }

    #[test]
    fn the_verdict_counts_strictly_above_r_target() {
        let mut r = parse(&body()).unwrap();
        // Nonce 5 recomputes exactly at r_target: not invalid. Nonce 1 lands above it.
        let v = judge(&r, vec![1.4, 1.400_000_1, 1.0], 2.5).unwrap();
        assert_eq!(v.n_invalid, 1);
        assert_eq!(v.invalid_nonces, [1]);
        // One mismatch in 3 nonces: P(X >= 1) = 1 - (1 - 5e-4)^3, about 1.5e-3, below the
        // default threshold of 0.01: a fraud.
        let want = 1.0 - (1.0 - 5e-4f64).powi(3);
        assert!((v.probability_honest / want - 1.0).abs() < 1e-12);
        assert!(v.fraud_detected);
        assert!((v.max_abs_dist_diff.unwrap() - 0.1).abs() < 1e-15);
        assert_eq!(v.dist, [1.4, 1.400_000_1, 1.0]);
        assert_eq!(v.received_dist, r.dist);
        assert_eq!(v.compute_seconds, 2.5);
        // All reproduce: honest with probability 1.
        let v = judge(&r, r.dist.clone(), 0.0).unwrap();
        assert_eq!(
            (v.n_invalid, v.probability_honest, v.fraud_detected),
            (0, 1.0, false)
        );
        assert_eq!(v.max_abs_dist_diff, Some(0.0));
        // A NaN is a failed device, not an honest nonce.
        assert!(judge(&r, vec![1.0, f64::NAN, 1.0], 0.0).is_err());
        // Empty: nothing to judge, honest.
        r.nonces.clear();
        r.dist.clear();
        let v = judge(&r, vec![], 0.0).unwrap();
        assert_eq!((v.n_invalid, v.probability_honest), (0, 1.0));
        assert_eq!((v.max_abs_dist_diff, v.p99_abs_dist_diff), (None, None));
    }

    #[test]
    fn percentiles_interpolate_like_numpy() {
        let v: Vec<f64> = (0..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.99), Some(99.0));
        assert_eq!(percentile(&[1.0, 2.0], 0.99), Some(1.99));
        assert_eq!(percentile(&[3.0], 0.99), Some(3.0));
        assert_eq!(percentile(&[], 0.99), None);
    }
}
