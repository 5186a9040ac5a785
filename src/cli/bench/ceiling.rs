//! The ceiling of a local CUDA sweep: what cuBLASLt reaches on the forward's own matrix
//! products (see [`crate::backend::cuda::ceiling::measure_ceiling`]), measured in the bench's
//! process right after a dtype's sweep, and the share of it the sweep's best configuration
//! achieved.
//!
//! The ceiling counts only the products (no attention, norms or other kernels), so it is
//! what a forward could reach if everything else took no time: `fraction_of_ceiling` near 1
//! means the forward is bound by its matrix products.

use crate::backend::cuda::ceiling::{forward_products, measure_ceiling, Ceiling};
use crate::backend::cuda::gpu::Gpu;
use crate::pow::dtype::Dtype;
use crate::pow::params::Params;
use serde::Serialize;
use serde_json::{json, Value};
use std::time::Instant;

/// The share of the ceiling a configuration should reach.
pub const GOAL_FRACTION_OF_CEILING: f64 = 0.85;
/// Timed calls of each product...
pub const ITERS: usize = 20;
/// ...or this many when one forward takes longer than [`SLOW_FORWARD_SECONDS`].
pub const ITERS_SLOW: usize = 3;
pub const SLOW_FORWARD_SECONDS: f64 = 2.0;

/// One product of a forward: `(name, m, n, k, count_per_forward)`.
pub type Product = (String, usize, usize, usize, usize);

/// The ceiling turned into nonces and compared with a measured rate.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CeilingFigures {
    /// FLOPs of one forward's products divided by its batch size.
    pub product_flop_per_nonce: f64,
    /// What one GPU computes at the ceiling: `ceiling.tflops * 1e12 / product_flop_per_nonce`
    /// (None when there is no work or no throughput to divide by).
    pub ceiling_nonces_per_second: Option<f64>,
    /// The measured rate of the whole machine divided by the GPUs it ran on (a group splits
    /// one forward's layers across its GPUs, so each GPU does its share of every nonce).
    pub measured_nonces_per_second_per_gpu: f64,
    /// `measured_nonces_per_second_per_gpu / ceiling_nonces_per_second`.
    pub fraction_of_ceiling: Option<f64>,
}

/// FLOPs per nonce of one forward of `batch` nonces: `sum(count * 2*m*n*k) / batch`.
pub fn product_flop_per_nonce(products: &[Product], batch: usize) -> f64 {
    if batch == 0 {
        return 0.0;
    }
    let flop: f64 = products
        .iter()
        .map(|(_, m, n, k, count)| *count as f64 * 2.0 * *m as f64 * *n as f64 * *k as f64)
        .sum();
    flop / batch as f64
}

/// The ceiling in nonces per second per GPU, and the fraction of it that `measured` nonces
/// per second on `gpus` GPUs reached.
pub fn figures(
    products: &[Product],
    ceiling: &Ceiling,
    batch: usize,
    measured: f64,
    gpus: usize,
) -> CeilingFigures {
    let per_nonce = product_flop_per_nonce(products, batch);
    let ceiling_nps = (per_nonce > 0.0 && ceiling.tflops > 0.0 && ceiling.tflops.is_finite())
        .then(|| ceiling.tflops * 1e12 / per_nonce);
    let per_gpu = measured / gpus.max(1) as f64;
    CeilingFigures {
        product_flop_per_nonce: per_nonce,
        ceiling_nonces_per_second: ceiling_nps,
        measured_nonces_per_second_per_gpu: per_gpu,
        fraction_of_ceiling: ceiling_nps.map(|c| per_gpu / c),
    }
}

/// The GPU ordinals the engine's devices use, in order: `cuda:0` is one, `cuda:2+3` (a group)
/// two; CPU devices none.
pub fn gpu_ordinals(device_names: &[String]) -> Vec<usize> {
    device_names
        .iter()
        .filter_map(|d| d.strip_prefix("cuda:"))
        .flat_map(|ids| ids.split('+').filter_map(|i| i.parse::<usize>().ok()))
        .collect()
}

/// Timed calls per product for a forward that took `forward_seconds` (when known).
pub fn iterations(forward_seconds: Option<f64>) -> usize {
    match forward_seconds {
        Some(s) if s > SLOW_FORWARD_SECONDS => ITERS_SLOW,
        _ => ITERS,
    }
}

/// Measures the ceiling on GPU `ordinal`, brought up afresh for it (the engine that swept must
/// be gone, so that its memory is free; the kernels are compiled once per process).
pub fn measure(
    ordinal: usize,
    dtype: Dtype,
    products: &[Product],
    iters: usize,
) -> Result<(Ceiling, String), String> {
    let gpus = crate::backend::cuda::cuda_available().map_err(|e| e.to_string())?;
    let info = gpus
        .iter()
        .find(|g| g.ordinal == ordinal)
        .ok_or_else(|| format!("cuda:{ordinal}: not found by CUDA discovery"))?;
    let gpu = Gpu::open(info).map_err(|e| e.to_string())?;
    // Every stream of the context, the engine's included: its stream-ordered frees are done.
    gpu.ctx
        .synchronize()
        .map_err(|e| format!("cuda:{ordinal}: synchronize: {e}"))?;
    let ceiling = measure_ceiling(&gpu.gemm, dtype, products, iters)
        .map_err(|e| format!("cuda:{ordinal}: {e}"))?;
    Ok((ceiling, info.to_string()))
}

/// `report["ceiling"][dtype]`: the ceiling of `dtype`'s products for the best configuration
/// of its sweep (`batch_size`, forwarded as `forward_batch` nonces, `measured` nonces/s on
/// the GPUs `ordinals`), or `{"error": ...}` when it could not be measured.
pub fn report(
    params: &Params,
    dtype: Dtype,
    batch_size: u64,
    forward_batch: usize,
    measured: f64,
    forward_seconds: Option<f64>,
    ordinals: &[usize],
) -> Value {
    let Some(&ordinal) = ordinals.first() else {
        return json!({"error": "no GPU in use"});
    };
    let products = forward_products(params, forward_batch);
    let iters = iterations(forward_seconds);
    let started = Instant::now();
    match measure(ordinal, dtype, &products, iters) {
        Ok((ceiling, gpu)) => {
            let f = figures(&products, &ceiling, forward_batch, measured, ordinals.len());
            json!({
                "gpu": gpu,
                "gpus_in_use": ordinals.len(),
                "batch_size": batch_size,
                "forward_batch": forward_batch,
                "iters": iters,
                "measure_seconds": started.elapsed().as_secs_f64(),
                "ceiling_tflops": ceiling.tflops,
                "product_flop_per_nonce": f.product_flop_per_nonce,
                "ceiling_nonces_per_second": f.ceiling_nonces_per_second,
                "measured_nonces_per_second": measured,
                "measured_nonces_per_second_per_gpu": f.measured_nonces_per_second_per_gpu,
                "fraction_of_ceiling": f.fraction_of_ceiling,
                "goal_fraction_of_ceiling": GOAL_FRACTION_OF_CEILING,
                "meets_goal": f.fraction_of_ceiling.map(|x| x >= GOAL_FRACTION_OF_CEILING),
                "shapes": ceiling.shapes,
            })
        }
        Err(error) => json!({
            "error": error,
            "batch_size": batch_size,
            "forward_batch": forward_batch,
            "measured_nonces_per_second": measured,
            "goal_fraction_of_ceiling": GOAL_FRACTION_OF_CEILING,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ceiling(tflops: f64) -> Ceiling {
        Ceiling {
            dtype: "f16",
            shapes: Vec::new(),
            tflops,
        }
    }

    #[test]
    fn the_ceiling_in_nonces_and_the_fraction_reached() {
        // 2 calls of 10x10x10 (2*1000 flops each) + 1 call of 5x4x3 (2*60): 4120 flops for a
        // batch of 5, 824 per nonce.
        let products: Vec<Product> = vec![("a".into(), 10, 10, 10, 2), ("b".into(), 5, 4, 3, 1)];
        assert_eq!(product_flop_per_nonce(&products, 5), 824.0);
        // 0.000824 TFLOP/s = 8.24e8 flop/s: 1e6 nonces/s per GPU.
        let f = figures(&products, &ceiling(0.000824), 5, 1.2e6, 2);
        assert_eq!(f.product_flop_per_nonce, 824.0);
        let c = f.ceiling_nonces_per_second.unwrap();
        assert!((c - 1e6).abs() < 1e-6, "{c}");
        assert_eq!(f.measured_nonces_per_second_per_gpu, 6e5);
        assert!((f.fraction_of_ceiling.unwrap() - 0.6).abs() < 1e-12);
        // One GPU: the whole rate is its own.
        let f = figures(&products, &ceiling(0.000824), 5, 9e5, 1);
        assert!((f.fraction_of_ceiling.unwrap() - 0.9).abs() < 1e-12);
        // Nothing to divide by: no ceiling, no fraction.
        let f = figures(&products, &ceiling(0.0), 5, 9e5, 1);
        assert_eq!(f.ceiling_nonces_per_second, None);
        assert_eq!(f.fraction_of_ceiling, None);
        assert_eq!(
            figures(&[], &ceiling(1.0), 5, 1.0, 1).fraction_of_ceiling,
            None
        );
        assert_eq!(product_flop_per_nonce(&products, 0), 0.0);
    }

    #[test]
    fn forward_products_give_the_flops_of_a_forward() {
        let p = crate::cli::bench::load_params("v1").unwrap().0;
        let batch = 4;
        let products = forward_products(&p, batch);
        let per_nonce = product_flop_per_nonce(&products, batch);
        // The products are the forward's weights applied: at most 2 flops per weight per
        // position (the last layer computes fewer positions), and at least the output.
        let seq = p.seq_len_usize() as f64;
        let upper = 2.0 * crate::cli::bench::non_embedding_params(&p) as f64 * seq;
        assert!(
            per_nonce > 0.0 && per_nonce <= upper,
            "{per_nonce} vs {upper}"
        );
        assert!(per_nonce >= 2.0 * p.vocab_usize() as f64 * p.dim_usize() as f64);
    }

    #[test]
    fn gpus_in_use_and_iterations() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(gpu_ordinals(&names(&["cpu"])), Vec::<usize>::new());
        assert_eq!(gpu_ordinals(&names(&["cuda:0", "cuda:1"])), vec![0, 1]);
        assert_eq!(
            gpu_ordinals(&names(&["cuda:2+3", "cuda:0+1"])),
            vec![2, 3, 0, 1]
        );
        assert_eq!(iterations(None), ITERS);
        assert_eq!(iterations(Some(0.5)), ITERS);
        assert_eq!(iterations(Some(2.5)), ITERS_SLOW);
    }
}
