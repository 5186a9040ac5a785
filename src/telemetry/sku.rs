//! Dense (no sparsity) tensor-core peaks of GPU models, from their makers' data sheets, to
//! turn achieved FLOP/s into an efficiency. The 16-bit figures are for FP16/BF16 inputs with
//! FP32 accumulation (what the forward pass does); f32 models are rated against the TF32 peak.

use crate::pow::dtype::Dtype;
use serde::Serialize;

/// A known GPU model and its dense peaks, in TFLOP/s.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Sku {
    pub name: &'static str,
    pub dense_fp16_tflops: f64,
    pub dense_tf32_tflops: f64,
}

impl Sku {
    /// The peak that applies to a model of `dtype`.
    pub fn peak_tflops(&self, dtype: Dtype) -> f64 {
        match dtype {
            Dtype::F16 | Dtype::Bf16 => self.dense_fp16_tflops,
            Dtype::F32 => self.dense_tf32_tflops,
        }
    }
}

/// Known models; the first whose every pattern occurs in the device name wins, so more
/// specific entries come first.
const TABLE: &[(&[&str], Sku)] = &[
    (
        &["GH200"],
        Sku {
            name: "GH200",
            dense_fp16_tflops: 989.4,
            dense_tf32_tflops: 494.7,
        },
    ),
    (
        &["H200"],
        Sku {
            name: "H200",
            dense_fp16_tflops: 989.4,
            dense_tf32_tflops: 494.7,
        },
    ),
    (
        &["H100", "PCIE"],
        Sku {
            name: "H100 PCIe",
            dense_fp16_tflops: 756.5,
            dense_tf32_tflops: 378.0,
        },
    ),
    (
        &["H100", "NVL"],
        Sku {
            name: "H100 NVL",
            dense_fp16_tflops: 835.5,
            dense_tf32_tflops: 417.5,
        },
    ),
    (
        &["H100"],
        Sku {
            name: "H100 SXM",
            dense_fp16_tflops: 989.4,
            dense_tf32_tflops: 494.7,
        },
    ),
    (
        &["H800"],
        Sku {
            name: "H800 SXM",
            dense_fp16_tflops: 989.4,
            dense_tf32_tflops: 494.7,
        },
    ),
    (
        &["B200"],
        Sku {
            name: "B200",
            dense_fp16_tflops: 2250.0,
            dense_tf32_tflops: 1100.0,
        },
    ),
    (
        &["A100"],
        Sku {
            name: "A100",
            dense_fp16_tflops: 312.0,
            dense_tf32_tflops: 156.0,
        },
    ),
    (
        &["A800"],
        Sku {
            name: "A800",
            dense_fp16_tflops: 312.0,
            dense_tf32_tflops: 156.0,
        },
    ),
    (
        &["L40S"],
        Sku {
            name: "L40S",
            dense_fp16_tflops: 362.05,
            dense_tf32_tflops: 183.0,
        },
    ),
    (
        &["L40"],
        Sku {
            name: "L40",
            dense_fp16_tflops: 181.05,
            dense_tf32_tflops: 90.5,
        },
    ),
    (
        &["L4"],
        Sku {
            name: "L4",
            dense_fp16_tflops: 121.0,
            dense_tf32_tflops: 60.0,
        },
    ),
    (
        &["A10G"],
        Sku {
            name: "A10G",
            dense_fp16_tflops: 70.0,
            dense_tf32_tflops: 35.0,
        },
    ),
    (
        &["A10"],
        Sku {
            name: "A10",
            dense_fp16_tflops: 125.0,
            dense_tf32_tflops: 62.5,
        },
    ),
    (
        &["RTX 6000 ADA"],
        Sku {
            name: "RTX 6000 Ada",
            dense_fp16_tflops: 364.2,
            dense_tf32_tflops: 182.1,
        },
    ),
    (
        &["5090"],
        Sku {
            name: "RTX 5090",
            dense_fp16_tflops: 209.5,
            dense_tf32_tflops: 104.8,
        },
    ),
    (
        &["4090"],
        Sku {
            name: "RTX 4090",
            dense_fp16_tflops: 165.2,
            dense_tf32_tflops: 82.6,
        },
    ),
    (
        &["3090"],
        Sku {
            name: "RTX 3090",
            dense_fp16_tflops: 71.0,
            dense_tf32_tflops: 35.6,
        },
    ),
];

/// The model of a GPU named `device_name` (as NVML names it), if it is in the table.
pub fn detect(device_name: &str) -> Option<Sku> {
    let upper = device_name.to_ascii_uppercase();
    TABLE
        .iter()
        .find(|(pats, _)| pats.iter().all(|p| upper.contains(p)))
        .map(|(_, s)| *s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_models() {
        assert_eq!(detect("NVIDIA H100 80GB HBM3").unwrap().name, "H100 SXM");
        assert_eq!(detect("NVIDIA H100 PCIe").unwrap().name, "H100 PCIe");
        assert_eq!(detect("NVIDIA H100 NVL").unwrap().name, "H100 NVL");
        assert_eq!(detect("NVIDIA H200").unwrap().name, "H200");
        assert_eq!(detect("NVIDIA GH200 480GB").unwrap().name, "GH200");
        assert_eq!(detect("NVIDIA A100-SXM4-80GB").unwrap().name, "A100");
        assert_eq!(detect("NVIDIA L40S").unwrap().name, "L40S");
        assert_eq!(detect("NVIDIA L40").unwrap().name, "L40");
        assert_eq!(detect("NVIDIA L4").unwrap().name, "L4");
        assert_eq!(detect("NVIDIA GeForce RTX 4090").unwrap().name, "RTX 4090");
        assert_eq!(detect("NVIDIA B200").unwrap().name, "B200");
        assert!(detect("Tesla T4").is_none());
        let h100 = detect("NVIDIA H100 80GB HBM3").unwrap();
        assert_eq!(h100.peak_tflops(Dtype::Bf16), 989.4);
        assert_eq!(h100.peak_tflops(Dtype::F32), 494.7);
    }
}
