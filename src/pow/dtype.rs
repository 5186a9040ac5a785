//! The model's parameter dtype and its rounding.
//!
//! Backends compute in f32 and call [`Dtype::round`] at exactly the points where the
//! reference materialises a tensor of the model dtype, so one f32 code path serves all three.

use half::{bf16, f16};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Parameter dtype of the model, as the reference names it in PyTorch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    F32,
    F16,
    Bf16,
}

impl Dtype {
    pub const ALL: [Dtype; 3] = [Dtype::F32, Dtype::F16, Dtype::Bf16];

    /// Round an f32 to this dtype (round to nearest, ties to even, as PyTorch's casts do)
    /// and widen it back.
    #[inline(always)]
    pub fn round(self, x: f32) -> f32 {
        match self {
            Dtype::F32 => x,
            Dtype::F16 => f16::from_f32(x).to_f32(),
            Dtype::Bf16 => bf16::from_f32(x).to_f32(),
        }
    }

    /// Round every element of a slice in place.
    pub fn round_slice(self, xs: &mut [f32]) {
        match self {
            Dtype::F32 => {}
            Dtype::F16 => xs.iter_mut().for_each(|x| *x = f16::from_f32(*x).to_f32()),
            Dtype::Bf16 => xs.iter_mut().for_each(|x| *x = bf16::from_f32(*x).to_f32()),
        }
    }

    /// The name the CLI and the HTTP API use.
    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
        }
    }

    /// The name PyTorch (and the golden files) use.
    pub fn torch_name(self) -> &'static str {
        match self {
            Dtype::F32 => "float32",
            Dtype::F16 => "float16",
            Dtype::Bf16 => "bfloat16",
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Dtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "f32" | "float32" => Ok(Dtype::F32),
            "f16" | "float16" => Ok(Dtype::F16),
            "bf16" | "bfloat16" => Ok(Dtype::Bf16),
            other => Err(format!(
                "dtype must be one of \"f32\", \"f16\", \"bf16\" (got {other:?})"
            )),
        }
    }
}

/// Round an f64 the way `torch.tensor(f64).to(dtype)` after a numpy `astype(float32)` does:
/// f64 -> f32 -> dtype, two roundings in that order (a direct f64 -> f16 differs in rare ties).
#[inline(always)]
pub fn round_f64_via_f32(x: f64, dtype: Dtype) -> f32 {
    dtype.round(x as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn double_rounding_differs_from_direct_in_a_tie() {
        // 1 + 2^-11 + 2^-40 in f64: rounds up directly to f16 (above the tie), but to f32
        // first it becomes exactly 1 + 2^-11, a tie that f16 rounds to even (1.0).
        let x = 1.0f64 + 2f64.powi(-11) + 2f64.powi(-40);
        assert_eq!(round_f64_via_f32(x, Dtype::F16), 1.0);
        // Correctly rounded in one step, x is above the midpoint 1 + 2^-11 of 1 and 1 + 2^-10.
        assert!(x > 1.0 + 2f64.powi(-11));
    }

    #[test]
    fn names_round_trip() {
        for d in Dtype::ALL {
            assert_eq!(d.as_str().parse::<Dtype>().unwrap(), d);
            assert_eq!(d.torch_name().parse::<Dtype>().unwrap(), d);
        }
        assert!("fp64".parse::<Dtype>().unwrap_err().contains("fp64"));
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        // 1 + 2^-8 is a tie between 1 and 1 + 2^-7 in bf16: even is 1.
        assert_eq!(Dtype::Bf16.round(1.0 + 2f32.powi(-8)), 1.0);
        assert_eq!(Dtype::Bf16.round(1.0 + 3.0 * 2f32.powi(-8)), 1.0 + 2f32.powi(-6));
    }
}
