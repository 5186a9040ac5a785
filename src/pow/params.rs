//! Model parameters: the reference's defaults, the production presets, derived sizes and
//! every constraint, each checked with a message that names the field and the rule.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Explicit limits. They are far above anything deployed (PARAMS_V2 is dim 1792, 64 layers)
/// and exist so that a hostile or mistyped request fails fast instead of allocating terabytes.
pub mod limits {
    pub const MAX_DIM: i64 = 65_536;
    pub const MAX_LAYERS: i64 = 1_024;
    pub const MAX_HEADS: i64 = 4_096;
    pub const MAX_VOCAB: i64 = 1 << 20;
    pub const MAX_SEQ_LEN: i64 = 32_768;
    pub const MAX_MULTIPLE_OF: i64 = 1 << 20;
    pub const MAX_FFN_HIDDEN: i64 = 1 << 21;
    pub const MAX_FFN_DIM_MULTIPLIER: f64 = 1_000.0;
    /// 2^40 parameters: 2 TiB in 16-bit, beyond any GPU group.
    pub const MAX_TOTAL_PARAMS: u64 = 1 << 40;
}

/// The `params` object of a request. Every field is optional with the reference's default;
/// an unknown key is an error. Integers are kept signed here so that a negative value gets a
/// message naming the field rather than a generic type error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Params {
    pub dim: i64,
    pub n_layers: i64,
    pub n_heads: i64,
    pub n_kv_heads: i64,
    pub vocab_size: i64,
    pub ffn_dim_multiplier: f64,
    pub multiple_of: i64,
    pub norm_eps: f64,
    pub rope_theta: f64,
    pub use_scaled_rope: bool,
    pub seq_len: i64,
    pub use_fp8: bool,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            dim: 2048,
            n_layers: 16,
            n_heads: 16,
            n_kv_heads: 16,
            vocab_size: 8192,
            ffn_dim_multiplier: 1.3,
            multiple_of: 1024,
            norm_eps: 1e-5,
            rope_theta: 500_000.0,
            use_scaled_rope: false,
            seq_len: 16,
            use_fp8: false,
        }
    }
}

/// A params value that breaks a rule: the field and the rule, in words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("params.{field}: {rule}")]
pub struct ParamsError {
    pub field: &'static str,
    pub rule: String,
}

fn err(field: &'static str, rule: impl Into<String>) -> ParamsError {
    ParamsError {
        field,
        rule: rule.into(),
    }
}

impl Params {
    /// PARAMS_V1 as seen in production.
    pub fn v1() -> Self {
        Params {
            dim: 1024,
            n_layers: 32,
            n_heads: 32,
            n_kv_heads: 32,
            vocab_size: 8196,
            ffn_dim_multiplier: 10.0,
            multiple_of: 2048,
            rope_theta: 10_000.0,
            seq_len: 128,
            ..Params::default()
        }
    }

    /// PARAMS_V2 as seen in production (17.8 B parameters).
    pub fn v2() -> Self {
        Params {
            dim: 1792,
            n_layers: 64,
            n_heads: 64,
            n_kv_heads: 64,
            vocab_size: 8196,
            ffn_dim_multiplier: 10.0,
            multiple_of: 8192,
            rope_theta: 10_000.0,
            seq_len: 256,
            ..Params::default()
        }
    }

    /// A preset by name: "v1", "v2" or "default".
    pub fn preset(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "v1" | "params_v1" => Some(Params::v1()),
            "v2" | "params_v2" => Some(Params::v2()),
            "default" => Some(Params::default()),
            _ => None,
        }
    }

    /// Check every constraint; the first broken one is returned.
    pub fn validate(&self) -> Result<(), ParamsError> {
        use limits::*;
        let positive = |field: &'static str, v: i64, max: i64| {
            if v <= 0 {
                Err(err(field, format!("must be a positive integer (got {v})")))
            } else if v > max {
                Err(err(field, format!("must be at most {max} (got {v})")))
            } else {
                Ok(())
            }
        };
        positive("dim", self.dim, MAX_DIM)?;
        positive("n_layers", self.n_layers, MAX_LAYERS)?;
        positive("n_heads", self.n_heads, MAX_HEADS)?;
        positive("n_kv_heads", self.n_kv_heads, MAX_HEADS)?;
        positive("vocab_size", self.vocab_size, MAX_VOCAB)?;
        positive("multiple_of", self.multiple_of, MAX_MULTIPLE_OF)?;
        positive("seq_len", self.seq_len, MAX_SEQ_LEN)?;
        if self.dim % self.n_heads != 0 {
            return Err(err(
                "n_heads",
                format!(
                    "must divide dim (dim {} is not a multiple of {})",
                    self.dim, self.n_heads
                ),
            ));
        }
        if self.n_kv_heads > self.n_heads || self.n_heads % self.n_kv_heads != 0 {
            return Err(err(
                "n_kv_heads",
                format!(
                    "must divide n_heads (n_heads {} is not a multiple of {})",
                    self.n_heads, self.n_kv_heads
                ),
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(err(
                "n_heads",
                format!(
                    "head_dim = dim / n_heads must be even for RoPE (got {} / {} = {})",
                    self.dim,
                    self.n_heads,
                    self.head_dim()
                ),
            ));
        }
        let m = self.ffn_dim_multiplier;
        if !m.is_finite() || m <= 0.0 || m > MAX_FFN_DIM_MULTIPLIER {
            return Err(err(
                "ffn_dim_multiplier",
                format!("must be a finite number in (0, {MAX_FFN_DIM_MULTIPLIER}] (got {m})"),
            ));
        }
        let hidden = self.ffn_hidden_unchecked();
        if hidden <= 0 || hidden > MAX_FFN_HIDDEN {
            return Err(err(
                "ffn_dim_multiplier",
                format!(
                    "gives an FFN hidden size of {hidden}, which must be in [1, {MAX_FFN_HIDDEN}]"
                ),
            ));
        }
        if !self.norm_eps.is_finite() || self.norm_eps <= 0.0 || self.norm_eps > 1.0 {
            return Err(err(
                "norm_eps",
                format!("must be a finite number in (0, 1] (got {})", self.norm_eps),
            ));
        }
        if !self.rope_theta.is_finite() || self.rope_theta <= 1.0 || self.rope_theta > 1e12 {
            return Err(err(
                "rope_theta",
                format!(
                    "must be a finite number in (1, 1e12] (got {})",
                    self.rope_theta
                ),
            ));
        }
        let total = super::weights::total_params(self);
        if total > MAX_TOTAL_PARAMS {
            return Err(err(
                "dim",
                format!(
                    "the model would have {total} parameters, more than the limit of {MAX_TOTAL_PARAMS}"
                ),
            ));
        }
        Ok(())
    }

    pub fn head_dim(&self) -> usize {
        (self.dim / self.n_heads) as usize
    }

    /// FFN hidden size: `multiple_of * ceil(h / multiple_of)` with
    /// `h = floor(ffn_dim_multiplier * floor(2 * 4 * dim / 3))`, as the reference computes it.
    pub fn ffn_hidden(&self) -> usize {
        self.ffn_hidden_unchecked() as usize
    }

    fn ffn_hidden_unchecked(&self) -> i64 {
        // int(2 * (4 * dim) / 3) in Python is float division then truncation; for the sizes
        // allowed here (dim <= 65536) the f64 quotient is exact enough that flooring the
        // integer division gives the same value.
        let h = (2 * 4 * self.dim) / 3;
        let h = (self.ffn_dim_multiplier * h as f64).floor();
        if !h.is_finite() || h > 1e15 {
            return i64::MAX;
        }
        let h = h as i64;
        let m = self.multiple_of.max(1);
        m.saturating_mul((h + m - 1) / m)
    }

    /// Shorthands as usize for the backends (valid params only).
    pub fn dim_usize(&self) -> usize {
        self.dim as usize
    }
    pub fn n_layers_usize(&self) -> usize {
        self.n_layers as usize
    }
    pub fn n_heads_usize(&self) -> usize {
        self.n_heads as usize
    }
    pub fn n_kv_heads_usize(&self) -> usize {
        self.n_kv_heads as usize
    }
    pub fn vocab_usize(&self) -> usize {
        self.vocab_size as usize
    }
    pub fn seq_len_usize(&self) -> usize {
        self.seq_len as usize
    }
}

impl fmt::Display for Params {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "dim {} layers {} heads {}/{} vocab {} ffn {} seq {}",
            self.dim,
            self.n_layers,
            self.n_heads,
            self.n_kv_heads,
            self.vocab_size,
            self.ffn_hidden_unchecked(),
            self.seq_len
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_derive_the_documented_sizes() {
        let v2 = Params::v2();
        v2.validate().unwrap();
        assert_eq!(v2.head_dim(), 28);
        assert_eq!(v2.ffn_hidden(), 49152);
        let v1 = Params::v1();
        v1.validate().unwrap();
        assert_eq!(v1.head_dim(), 32);
        Params::default().validate().unwrap();
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let e = serde_json::from_str::<Params>(r#"{"dim": 64, "dims": 3}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `dims`"), "{e}");
    }

    #[test]
    fn missing_keys_take_defaults() {
        let p: Params =
            serde_json::from_str(r#"{"dim": 64, "n_heads": 4, "n_kv_heads": 2}"#).unwrap();
        assert_eq!(p.n_layers, 16);
        assert_eq!(p.n_kv_heads, 2);
    }

    #[test]
    fn each_rule_names_its_field() {
        let cases: Vec<(Params, &str)> = vec![
            (
                Params {
                    dim: 0,
                    ..Params::default()
                },
                "params.dim: must be a positive integer",
            ),
            (
                Params {
                    n_layers: -3,
                    ..Params::default()
                },
                "params.n_layers: must be a positive",
            ),
            (
                Params {
                    n_heads: 3,
                    ..Params::default()
                },
                "params.n_heads: must divide dim",
            ),
            (
                Params {
                    n_kv_heads: 3,
                    ..Params::default()
                },
                "params.n_kv_heads: must divide n_heads",
            ),
            (
                Params {
                    n_kv_heads: 32,
                    ..Params::default()
                },
                "params.n_kv_heads: must divide n_heads",
            ),
            (
                Params {
                    dim: 96,
                    n_heads: 32,
                    n_kv_heads: 32,
                    ..Params::default()
                },
                "head_dim = dim / n_heads must be even",
            ),
            (
                Params {
                    vocab_size: 1 << 30,
                    ..Params::default()
                },
                "params.vocab_size: must be at most",
            ),
            (
                Params {
                    seq_len: 0,
                    ..Params::default()
                },
                "params.seq_len",
            ),
            (
                Params {
                    ffn_dim_multiplier: f64::NAN,
                    ..Params::default()
                },
                "params.ffn_dim_multiplier",
            ),
            (
                Params {
                    ffn_dim_multiplier: -1.0,
                    ..Params::default()
                },
                "params.ffn_dim_multiplier",
            ),
            (
                Params {
                    norm_eps: 0.0,
                    ..Params::default()
                },
                "params.norm_eps",
            ),
            (
                Params {
                    rope_theta: f64::INFINITY,
                    ..Params::default()
                },
                "params.rope_theta",
            ),
            (
                Params {
                    dim: 65536,
                    n_layers: 1024,
                    ..Params::default()
                },
                "parameters, more than the limit",
            ),
        ];
        for (p, want) in cases {
            let e = p.validate().unwrap_err().to_string();
            assert!(e.contains(want), "{e:?} should contain {want:?}");
        }
    }
}
