//! GFLOP/s of every CPU product path this machine runs, on the forward's shapes, next to the
//! `gemm` crate's f32 GEMM (the path the CPU backend used before its own kernels).
//!
//! `cargo bench --bench matmul`. Environment:
//! - `MATMUL_SECONDS`: time per (shape, dtype, path) (default 1);
//! - `MATMUL_SHAPES`: `m x n x k` triples, comma-separated (default: the products of a
//!   dim-1024, FFN-4096, batch 32 x seq 64 forward: `2048x1024x1024,2048x4096x1024,
//!   2048x1024x4096,32x8192x1024`).
//!
//! Each measurement is one JSON line: wall-clock GFLOP/s, and GFLOP per CPU-second of all
//! threads (per core, and steadier than the wall clock on a shared machine).

use llama_pow::backend::cpu::matmul::{linear, Features, Kernel, PackedWeight};
use llama_pow::pow::dtype::{Dtype, RoundBf16, RoundF16, RoundF32};
use std::time::Duration;

mod common;
use common::{time, uniform, Timed};

fn main() {
    let seconds: f64 = std::env::var("MATMUL_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    let budget = Duration::from_secs_f64(seconds);
    let shapes = std::env::var("MATMUL_SHAPES")
        .unwrap_or_else(|_| "2048x1024x1024,2048x4096x1024,2048x1024x4096,32x8192x1024".into());
    let host = Features::host();
    let threads = rayon::current_num_threads();
    for shape in shapes.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let dims: Vec<usize> = shape
            .split('x')
            .map(|d| d.parse().expect("MATMUL_SHAPES: m x n x k"))
            .collect();
        let [m, n, k] = dims[..] else {
            panic!("MATMUL_SHAPES: {shape} is not m x n x k")
        };
        let flop = 2.0 * (m * n * k) as f64;
        for dtype in [Dtype::F16, Dtype::Bf16, Dtype::F32] {
            let x = uniform(m * k, 2.0, dtype, 1);
            let w = uniform(n * k, 0.05, dtype, 2);
            let mut dst = vec![0f32; m * n];
            let report = |path: &str, t: Timed| {
                let (secs, cpu) = (t.wall_per_call(), t.cpu_per_call());
                println!(
                    "{}",
                    serde_json::json!({
                        "bench": "matmul_cpu",
                        "shape": [m, n, k],
                        "dtype": dtype.as_str(),
                        "path": path,
                        "threads": threads,
                        "ms": 1e3 * secs,
                        "gflop_per_s": flop / secs / 1e9,
                        "gflop_per_cpu_s": flop / cpu / 1e9,
                    })
                );
            };
            for kernel in Kernel::ALL.into_iter().filter(|p| p.runs(dtype, &host)) {
                if kernel == Kernel::Scalar {
                    continue; // the readable reference: too slow to be worth timing
                }
                let packed = PackedWeight::pack(&w, n, k, dtype, kernel.layout()).unwrap();
                let secs = time(budget, || match dtype {
                    Dtype::F32 => linear::<RoundF32>(kernel, &mut dst, &x, m, k, &packed),
                    Dtype::F16 => linear::<RoundF16>(kernel, &mut dst, &x, m, k, &packed),
                    Dtype::Bf16 => linear::<RoundBf16>(kernel, &mut dst, &x, m, k, &packed),
                });
                report(kernel.name(), secs);
            }
            if dtype == Dtype::F32 {
                let secs = time(budget, || {
                    // SAFETY: dst is m x n (row stride n), x is m x k (row stride k), w is
                    // n x k read as the k x n right-hand side (column stride k); dst is
                    // unaliased and not read.
                    unsafe {
                        gemm::gemm(
                            m,
                            n,
                            k,
                            dst.as_mut_ptr(),
                            1,
                            n as isize,
                            false,
                            x.as_ptr(),
                            1,
                            k as isize,
                            w.as_ptr(),
                            k as isize,
                            1,
                            0.0f32,
                            1.0f32,
                            false,
                            false,
                            false,
                            gemm::Parallelism::Rayon(threads),
                        )
                    }
                });
                report("gemm-crate", secs);
            }
        }
    }
}
