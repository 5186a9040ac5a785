//! The model's parameter dtype and its rounding.
//!
//! Backends compute in f32 and call [`Dtype::round`] at exactly the points where the
//! reference materialises a tensor of the model dtype, so one f32 code path serves all three.

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
            Dtype::F32 => RoundF32::round(x),
            Dtype::F16 => RoundF16::round(x),
            Dtype::Bf16 => RoundBf16::round(x),
        }
    }

    /// Round every element of a slice in place.
    pub fn round_slice(self, xs: &mut [f32]) {
        fn each<R: Rounding>(xs: &mut [f32]) {
            xs.iter_mut().for_each(|x| *x = R::round(*x));
        }
        match self {
            Dtype::F32 => {}
            Dtype::F16 => each::<RoundF16>(xs),
            Dtype::Bf16 => each::<RoundBf16>(xs),
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

/// Rounding an f32 to the model dtype and back (round to nearest, ties to even), as a type
/// so that every loop is compiled for its dtype.
pub trait Rounding: Copy + Send + Sync + 'static {
    const DTYPE: Dtype;
    fn round(x: f32) -> f32;
}

/// f32 models: no rounding.
#[derive(Debug, Clone, Copy)]
pub struct RoundF32;

/// float16: 10 fraction bits, subnormals below 2^-14, overflow to infinity past 65504.
#[derive(Debug, Clone, Copy)]
pub struct RoundF16;

/// bfloat16: the upper half of an f32.
#[derive(Debug, Clone, Copy)]
pub struct RoundBf16;

impl Rounding for RoundF32 {
    const DTYPE: Dtype = Dtype::F32;
    #[inline(always)]
    fn round(x: f32) -> f32 {
        x
    }
}

impl Rounding for RoundF16 {
    const DTYPE: Dtype = Dtype::F16;
    #[inline(always)]
    fn round(x: f32) -> f32 {
        // Adding c = 2^(e + 13), where 2^e is the f16 binade of |x| (clamped to the subnormal
        // binade 2^-14 below and to 2^15 above), leaves |x| + c with f32 spacing 2^(e - 10),
        // the f16 spacing of |x|: the f32 addition rounds to the f16 grid, ties to even (the
        // parity of the f32 mantissa is that of the f16 one), and subtracting c is exact.
        // Float operations only, so the loops around it vectorise.
        let a = x.abs();
        let binade = f32::from_bits(a.to_bits() & 0x7F80_0000);
        let c = binade.clamp(F16_MIN_NORMAL, F16_TOP_BINADE) * 8192.0;
        let r = (a + c) - c;
        // Past 65504 lies infinity (65520 and up round there); NaN compares false and stays.
        let r = if r > F16_MAX { f32::INFINITY } else { r };
        r.copysign(x)
    }
}

const F16_MIN_NORMAL: f32 = 1.0 / 16384.0; // 2^-14
const F16_TOP_BINADE: f32 = 32768.0; // 2^15
const F16_MAX: f32 = 65504.0;

impl Rounding for RoundBf16 {
    const DTYPE: Dtype = Dtype::Bf16;
    #[inline(always)]
    fn round(x: f32) -> f32 {
        let bits = x.to_bits();
        // Ties to even on bit 16; a carry out of the fraction rounds up into the exponent
        // (and to infinity past the largest finite value), the sign bit is never reached.
        let r = bits.wrapping_add(0x7FFF + ((bits >> 16) & 1)) & 0xFFFF_0000;
        let r = if bits & 0x7FFF_FFFF > 0x7F80_0000 {
            (bits | 0x0040_0000) & 0xFFFF_0000
        } else {
            r
        };
        f32::from_bits(r)
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
        assert_eq!(
            Dtype::Bf16.round(1.0 + 3.0 * 2f32.powi(-8)),
            1.0 + 2f32.powi(-6)
        );
    }
}
