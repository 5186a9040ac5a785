//! Parsing requests from JSON with messages that name the field and say what was expected.
//!
//! Parsing goes through `serde_json::Value` by hand rather than a derived `Deserialize`, because
//! serde's messages ("invalid type: string, expected i64 at line 1 column 9") do not name the
//! field, and an operator facing a 400 needs to know which one.

use super::dtype::Dtype;
use super::params::Params;
use serde_json::{Map, Value};

/// The largest batch a request may ask for.
pub const MAX_BATCH_SIZE: u64 = 1 << 16;
/// The most nonces one `compute` request may ask for.
pub const MAX_COUNT: u64 = 1 << 20;
/// Longest block hash or public key accepted (the real ones are 64 and ~45 characters).
pub const MAX_KEY_LEN: usize = 1024;
/// Nonces per `compute` when neither `count` nor `batch_size` is given.
pub const DEFAULT_BATCH_SIZE: u64 = 32;

/// A request that cannot be served, in one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RequestError(pub String);

impl From<super::params::ParamsError> for RequestError {
    fn from(e: super::params::ParamsError) -> Self {
        RequestError(e.to_string())
    }
}

pub(crate) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a fractional number",
        Value::Number(n) if n.is_i64() && n.as_i64() < Some(0) => "a negative integer",
        Value::Number(_) => "an integer",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

pub(crate) fn wrong(field: &str, expected: &str, v: &Value) -> RequestError {
    let shown = v.to_string();
    let shown = if shown.chars().count() > 40 {
        format!("{}...", shown.chars().take(40).collect::<String>())
    } else {
        shown
    };
    RequestError(format!(
        "{field}: expected {expected}, got {} ({shown})",
        type_name(v)
    ))
}

/// Typed access to the fields of one JSON object, naming each in errors.
pub struct Fields<'a> {
    obj: &'a Map<String, Value>,
    prefix: &'static str,
}

impl<'a> Fields<'a> {
    pub fn new(
        v: &'a Value,
        what: &'static str,
        prefix: &'static str,
    ) -> Result<Self, RequestError> {
        match v {
            Value::Object(obj) => Ok(Fields { obj, prefix }),
            other => Err(RequestError(format!(
                "{what}: expected a JSON object, got {}",
                type_name(other)
            ))),
        }
    }

    fn name(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// Fail on a key not in `known`.
    pub fn deny_unknown(&self, known: &[&str]) -> Result<(), RequestError> {
        for k in self.obj.keys() {
            if !known.contains(&k.as_str()) {
                return Err(RequestError(format!(
                    "{}: unknown field (expected one of: {})",
                    self.name(k),
                    known.join(", ")
                )));
            }
        }
        Ok(())
    }

    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    pub(crate) fn required(&self, key: &str) -> Result<&'a Value, RequestError> {
        self.get(key)
            .ok_or_else(|| RequestError(format!("{}: missing required field", self.name(key))))
    }

    pub fn string(&self, key: &str) -> Result<String, RequestError> {
        let v = self.required(key)?;
        let s = v
            .as_str()
            .ok_or_else(|| wrong(&self.name(key), "a string", v))?;
        if s.is_empty() {
            return Err(RequestError(format!(
                "{}: must not be empty",
                self.name(key)
            )));
        }
        if s.len() > MAX_KEY_LEN {
            return Err(RequestError(format!(
                "{}: must be at most {MAX_KEY_LEN} bytes (got {})",
                self.name(key),
                s.len()
            )));
        }
        Ok(s.to_owned())
    }

    pub fn u64_opt(&self, key: &str) -> Result<Option<u64>, RequestError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| wrong(&self.name(key), "a non-negative integer below 2^64", v)),
        }
    }

    pub fn u64(&self, key: &str) -> Result<u64, RequestError> {
        self.required(key)?;
        Ok(self.u64_opt(key)?.expect("present"))
    }

    /// A positive integer no larger than `max`.
    pub fn positive_opt(&self, key: &str, max: u64) -> Result<Option<u64>, RequestError> {
        match self.u64_opt(key) {
            Ok(Some(0)) => Err(RequestError(format!(
                "{}: must be at least 1 (got 0)",
                self.name(key)
            ))),
            Ok(Some(n)) if n > max => Err(RequestError(format!(
                "{}: must be at most {max} (got {n})",
                self.name(key)
            ))),
            Err(_) if self.get(key).and_then(Value::as_i64).is_some_and(|n| n < 0) => {
                Err(RequestError(format!(
                    "{}: must be a positive integer (got {})",
                    self.name(key),
                    self.get(key).unwrap()
                )))
            }
            other => other,
        }
    }

    pub fn i64_opt(&self, key: &str) -> Result<Option<i64>, RequestError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match (v.as_i64(), v.as_u64()) {
                (Some(n), _) => Ok(Some(n)),
                (None, Some(_)) => Ok(Some(i64::MAX)),
                _ => Err(wrong(&self.name(key), "an integer", v)),
            },
        }
    }

    pub fn f64_opt(&self, key: &str) -> Result<Option<f64>, RequestError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| wrong(&self.name(key), "a number", v)),
        }
    }

    pub fn f64(&self, key: &str) -> Result<f64, RequestError> {
        self.required(key)?;
        Ok(self.f64_opt(key)?.expect("present"))
    }

    pub fn bool_opt(&self, key: &str) -> Result<Option<bool>, RequestError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| wrong(&self.name(key), "true or false", v)),
        }
    }
}

const PARAM_KEYS: [&str; 12] = [
    "dim",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "vocab_size",
    "ffn_dim_multiplier",
    "multiple_of",
    "norm_eps",
    "rope_theta",
    "use_scaled_rope",
    "seq_len",
    "use_fp8",
];

/// An integer of `params` no larger than `max`, refused here when larger with the number as
/// it was sent (held in an i64 first, 2^64 - 1 would be shown as 2^63 - 1).
fn int_param(f: &Fields<'_>, key: &str, max: i64) -> Result<Option<i64>, RequestError> {
    let n = f.i64_opt(key)?;
    match (n, f.get(key)) {
        (Some(n), Some(sent)) if n > max => Err(RequestError(format!(
            "{}: must be at most {max} (got {sent})",
            f.name(key)
        ))),
        _ => Ok(n),
    }
}

/// The `params` object: defaults for absent keys, unknown keys rejected, every rule checked.
pub fn parse_params(v: &Value) -> Result<Params, RequestError> {
    use super::params::limits::*;
    let f = Fields::new(v, "params", "params.")?;
    f.deny_unknown(&PARAM_KEYS)?;
    let d = Params::default();
    let p = Params {
        dim: int_param(&f, "dim", MAX_DIM)?.unwrap_or(d.dim),
        n_layers: int_param(&f, "n_layers", MAX_LAYERS)?.unwrap_or(d.n_layers),
        n_heads: int_param(&f, "n_heads", MAX_HEADS)?.unwrap_or(d.n_heads),
        n_kv_heads: int_param(&f, "n_kv_heads", MAX_HEADS)?.unwrap_or(d.n_kv_heads),
        vocab_size: int_param(&f, "vocab_size", MAX_VOCAB)?.unwrap_or(d.vocab_size),
        ffn_dim_multiplier: f
            .f64_opt("ffn_dim_multiplier")?
            .unwrap_or(d.ffn_dim_multiplier),
        multiple_of: int_param(&f, "multiple_of", MAX_MULTIPLE_OF)?.unwrap_or(d.multiple_of),
        norm_eps: f.f64_opt("norm_eps")?.unwrap_or(d.norm_eps),
        rope_theta: f.f64_opt("rope_theta")?.unwrap_or(d.rope_theta),
        use_scaled_rope: f.bool_opt("use_scaled_rope")?.unwrap_or(d.use_scaled_rope),
        seq_len: int_param(&f, "seq_len", MAX_SEQ_LEN)?.unwrap_or(d.seq_len),
        use_fp8: f.bool_opt("use_fp8")?.unwrap_or(d.use_fp8),
    };
    p.validate()?;
    Ok(p)
}

/// What every proof request carries: the /generate request fields.
#[derive(Debug, Clone, PartialEq)]
pub struct ProofRequest {
    pub block_hash: String,
    pub block_height: u64,
    pub public_key: String,
    pub r_target: f64,
    pub start_nonce: u64,
    pub batch_size: Option<u64>,
    pub params: Params,
}

/// The /generate request fields, in the order a missing one is reported.
pub const PROOF_REQUEST_KEYS: [&str; 7] = [
    "block_hash",
    "block_height",
    "public_key",
    "r_target",
    "batch_size",
    "start_nonce",
    "params",
];

impl ProofRequest {
    /// Parse the fields of a proof request from an object (other keys are left to the caller).
    pub fn from_fields(f: &Fields<'_>) -> Result<Self, RequestError> {
        let block_hash = f.string("block_hash")?;
        let public_key = f.string("public_key")?;
        let params = parse_params(f.required("params")?)?;
        let start_nonce = f.u64("start_nonce")?;
        let r_target = f.f64("r_target")?;
        if !r_target.is_finite() || r_target <= 0.0 {
            return Err(RequestError(format!(
                "r_target: must be a positive finite number (got {r_target})"
            )));
        }
        let block_height = f.u64_opt("block_height")?.unwrap_or(0);
        let batch_size = f.positive_opt("batch_size", MAX_BATCH_SIZE)?;
        Ok(ProofRequest {
            block_hash,
            block_height,
            public_key,
            r_target,
            start_nonce,
            batch_size,
            params,
        })
    }
}

/// `llama-pow compute` and `llama-pow facts`: a proof request plus how many consecutive
/// nonces to compute and in which dtype.
#[derive(Debug, Clone, PartialEq)]
pub struct ComputeRequest {
    pub proof: ProofRequest,
    pub count: u64,
    pub dtype: Dtype,
}

impl ComputeRequest {
    pub fn parse(v: &Value) -> Result<Self, RequestError> {
        let f = Fields::new(v, "request", "")?;
        let mut known: Vec<&str> = PROOF_REQUEST_KEYS.to_vec();
        known.extend(["count", "dtype"]);
        f.deny_unknown(&known)?;
        let proof = ProofRequest::from_fields(&f)?;
        let count = f
            .positive_opt("count", MAX_COUNT)?
            .or(proof.batch_size)
            .unwrap_or(DEFAULT_BATCH_SIZE);
        if proof.start_nonce.checked_add(count - 1).is_none() {
            return Err(RequestError(format!(
                "count: start_nonce {} + count {count} passes the largest nonce 2^64 - 1",
                proof.start_nonce
            )));
        }
        let dtype = match f.get("dtype") {
            None => Dtype::F16,
            Some(Value::String(s)) => s.parse().map_err(|e: String| RequestError(e))?,
            Some(other) => return Err(wrong("dtype", "a string", other)),
        };
        Ok(ComputeRequest {
            proof,
            count,
            dtype,
        })
    }

    pub fn parse_str(s: &str) -> Result<Self, RequestError> {
        let v: Value = serde_json::from_str(s)
            .map_err(|e| RequestError(format!("request is not valid JSON: {e}")))?;
        Self::parse(&v)
    }

    /// The nonces: `count` consecutive ones from start_nonce.
    pub fn nonces(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.count).map(|i| self.proof.start_nonce + i)
    }
}

/// The request inside its envelope, if any: bodies may come bare, as the PyWorker's
/// `{"auth_data": ..., "payload": {...}}` or Runpod-style as `{"input": {...}}`.
pub fn unwrap_envelope(v: Value) -> Result<Value, String> {
    let Value::Object(mut obj) = v else {
        return Ok(v);
    };
    for key in ["payload", "input"] {
        if let Some(inner) = obj.remove(key) {
            return match inner {
                Value::Object(_) => Ok(inner),
                other => Err(format!(
                    "{key}: expected a JSON object (the request), got {}",
                    match other {
                        Value::Null => "null",
                        Value::Bool(_) => "a boolean",
                        Value::Number(_) => "a number",
                        Value::String(_) => "a string",
                        Value::Array(_) => "an array",
                        Value::Object(_) => unreachable!(),
                    }
                )),
            };
        }
    }
    Ok(Value::Object(obj))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn base() -> Value {
        json!({
            "block_hash": "abc",
            "public_key": "pk",
            "params": {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 4, "vocab_size": 100,
                        "multiple_of": 32, "seq_len": 8},
            "start_nonce": 5,
            "r_target": 1.4,
        })
    }

    fn with(key: &str, value: Value) -> Value {
        let mut v = base();
        v[key] = value;
        v
    }

    fn without(key: &str) -> Value {
        let mut v = base();
        v.as_object_mut().unwrap().remove(key);
        v
    }

    fn with_param(key: &str, value: Value) -> Value {
        let mut v = base();
        v["params"][key] = value;
        v
    }

    fn error_of(v: Value) -> String {
        ComputeRequest::parse(&v).unwrap_err().to_string()
    }

    #[test]
    fn defaults() {
        let r = ComputeRequest::parse(&base()).unwrap();
        assert_eq!(r.count, DEFAULT_BATCH_SIZE);
        assert_eq!(r.dtype, Dtype::F16);
        assert_eq!(r.proof.block_height, 0);
        assert_eq!(r.nonces().take(2).collect::<Vec<_>>(), vec![5, 6]);
        let r = ComputeRequest::parse(&with("batch_size", json!(7))).unwrap();
        assert_eq!(r.count, 7);
    }

    #[test]
    fn bad_requests_name_the_field_and_the_rule() {
        let cases: Vec<(Value, &str)> = vec![
            (json!([1, 2]), "request: expected a JSON object, got an array"),
            (without("block_hash"), "block_hash: missing required field"),
            (without("params"), "params: missing required field"),
            (without("start_nonce"), "start_nonce: missing required field"),
            (without("r_target"), "r_target: missing required field"),
            (with("block_hash", json!(12)), "block_hash: expected a string, got an integer (12)"),
            (with("block_hash", json!("")), "block_hash: must not be empty"),
            (with("public_key", json!("k".repeat(2000))), "public_key: must be at most 1024 bytes"),
            (with("start_nonce", json!(-1)), "start_nonce: expected a non-negative integer below 2^64, got a negative integer (-1)"),
            (with("start_nonce", json!(1.5)), "start_nonce: expected a non-negative integer"),
            (with("start_nonce", json!("7")), "start_nonce: expected a non-negative integer below 2^64, got a string (\"7\")"),
            (with("r_target", json!("1.4")), "r_target: expected a number, got a string"),
            (with("r_target", json!(0)), "r_target: must be a positive finite number"),
            (with("batch_size", json!(0)), "batch_size: must be at least 1 (got 0)"),
            (with("batch_size", json!(-4)), "batch_size: must be a positive integer (got -4)"),
            (with("batch_size", json!(1u64 << 40)), "batch_size: must be at most 65536"),
            (with("count", json!(0)), "count: must be at least 1"),
            (with("dtype", json!("f64")), "dtype must be one of"),
            (with("dtype", json!(16)), "dtype: expected a string"),
            (with("nonce", json!(1)), "nonce: unknown field (expected one of: block_hash"),
            (with("params", json!("v2")), "params: expected a JSON object, got a string"),
            (with_param("dims", json!(3)), "params.dims: unknown field"),
            (with_param("dim", json!("64")), "params.dim: expected an integer, got a string"),
            (with_param("dim", json!(64.5)), "params.dim: expected an integer, got a fractional number"),
            (with_param("dim", json!(0)), "params.dim: must be a positive integer (got 0)"),
            (with_param("dim", json!(-64)), "params.dim: must be a positive integer (got -64)"),
            (with_param("dim", json!(u64::MAX)), "params.dim: must be at most 65536 (got 18446744073709551615)"),
            (with_param("seq_len", json!(1u64 << 63)), "params.seq_len: must be at most 32768 (got 9223372036854775808)"),
            (with_param("n_layers", json!(i64::MAX)), "params.n_layers: must be at most 1024 (got 9223372036854775807)"),
            (with_param("vocab_size", json!(1 << 21)), "params.vocab_size: must be at most 1048576 (got 2097152)"),
            (with_param("n_heads", json!(5)), "params.n_heads: must divide dim"),
            (with_param("n_kv_heads", json!(3)), "params.n_kv_heads: must divide n_heads"),
            (with_param("n_heads", json!(64)), "head_dim = dim / n_heads must be even"),
            (with_param("seq_len", json!(1 << 20)), "params.seq_len: must be at most"),
            (with_param("vocab_size", json!(0)), "params.vocab_size: must be a positive integer"),
            (with_param("use_fp8", json!(1)), "params.use_fp8: expected true or false"),
            (with_param("norm_eps", json!(-1e-5)), "params.norm_eps: must be a finite number in (0, 1]"),
        ];
        for (v, want) in cases {
            let e = error_of(v.clone());
            assert!(e.contains(want), "{v}: {e:?} should contain {want:?}");
        }
    }

    #[test]
    fn count_may_not_pass_the_last_nonce() {
        let mut v = with("start_nonce", json!(u64::MAX - 1));
        v["count"] = json!(3);
        assert!(error_of(v.clone()).contains("passes the largest nonce"));
        v["count"] = json!(2);
        ComputeRequest::parse(&v).unwrap();
    }

    #[test]
    fn invalid_json_is_one_clear_line() {
        let e = ComputeRequest::parse_str("{\"block_hash\": ")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("request is not valid JSON"), "{e}");
        assert!(!e.contains('\n'));
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            any::<u64>().prop_map(|n| json!(n)),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| json!(f)),
            "[a-z_]{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 24, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map(
                    prop_oneof![
                        Just("dim".to_owned()),
                        Just("n_heads".to_owned()),
                        Just("n_kv_heads".to_owned()),
                        Just("seq_len".to_owned()),
                        Just("params".to_owned()),
                        Just("block_hash".to_owned()),
                        Just("start_nonce".to_owned()),
                        Just("r_target".to_owned()),
                        "[a-z]{1,6}"
                    ],
                    inner,
                    0..6
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// Any JSON at all: an answer or a one-line error, never a panic.
        #[test]
        fn parsing_never_panics(v in arb_json()) {
            if let Err(e) = ComputeRequest::parse(&v) {
                prop_assert!(!e.to_string().is_empty() && !e.to_string().contains('\n'));
            }
        }

        /// Any params values in range: validation decides without panicking, and accepted
        /// params have consistent derived sizes.
        #[test]
        fn params_validation_is_total(dim in -5i64..5000, heads in -2i64..70, kv in -2i64..70,
                                      layers in -1i64..5, seq in -1i64..600, mult in -1.0f64..50.0,
                                      multiple_of in -1i64..9000) {
            let v = json!({"dim": dim, "n_heads": heads, "n_kv_heads": kv, "n_layers": layers,
                           "seq_len": seq, "ffn_dim_multiplier": mult, "multiple_of": multiple_of});
            if let Ok(p) = parse_params(&v) {
                prop_assert_eq!(p.head_dim() * p.n_heads as usize, p.dim as usize);
                prop_assert_eq!(p.head_dim() % 2, 0);
                prop_assert_eq!(p.n_heads % p.n_kv_heads, 0);
                prop_assert!(p.ffn_hidden() >= 1);
            }
        }
    }

    #[test]
    fn envelopes() {
        let r = json!({"a": 1});
        assert_eq!(unwrap_envelope(r.clone()).unwrap(), r);
        assert_eq!(
            unwrap_envelope(json!({"auth_data": {"x": 1}, "payload": r})).unwrap(),
            r
        );
        assert_eq!(unwrap_envelope(json!({"input": r})).unwrap(), r);
        assert!(unwrap_envelope(json!({"payload": "x"}))
            .unwrap_err()
            .contains("payload: expected"));
        assert_eq!(unwrap_envelope(json!([1])).unwrap(), json!([1]));
    }
}
