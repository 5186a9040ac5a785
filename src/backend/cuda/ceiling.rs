//! What cuBLASLt reaches on the forward's own matrix products: the bench's ceiling
//! (`llama-pow bench`, see `cli/bench/ceiling.rs`). Each product of one forward pass
//! ([`forward_products`]) is timed on fresh buffers of random values through the same
//! [`Gemm`] the forward uses, and the times are combined weighted by how often a forward
//! runs each product.

use super::gemm::{element_bytes, Gemm, GemmError, GemmShape};
use crate::pow::dtype::Dtype;
use crate::pow::params::Params;
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DriverError};
use std::sync::Arc;

/// The measured throughput of one product.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CeilingShape {
    pub name: String,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub tflops: f64,
    pub seconds_per_call: f64,
}

/// The best throughput cuBLASLt gives on the forward's own products: what a forward could
/// reach if everything but the products took no time.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Ceiling {
    /// [`Dtype::as_str`].
    pub dtype: &'static str,
    pub shapes: Vec<CeilingShape>,
    /// FLOP-weighted: total flops of one forward's products / total time.
    pub tflops: f64,
}

/// Times `iters` calls of each `(name, m, n, k, count_per_forward)` product on freshly
/// allocated buffers of small random values, after 3 warm-up calls (which also build the
/// plan), with CUDA events; then combines them weighted by each product's count in a
/// forward: `tflops = sum(count * flops) / sum(count * seconds_per_call) / 1e12`.
/// A product with no work (m, n or k is 0) is listed with zero time and throughput.
pub fn measure_ceiling(
    gemm: &Gemm,
    dtype: Dtype,
    products: &[(String, usize, usize, usize, usize)],
    iters: usize,
) -> Result<Ceiling, GemmError> {
    let iters = iters.max(1);
    let mut shapes = Vec::with_capacity(products.len());
    let mut counts = Vec::with_capacity(products.len());
    for (seed, (name, m, n, k, count)) in products.iter().enumerate() {
        let shape = GemmShape {
            dtype,
            m: *m,
            n: *n,
            k: *k,
            x_stride: *k,
        };
        let seconds = if shape.flops() > 0.0 {
            time_product(gemm, shape, iters, seed as u64)?
        } else {
            0.0
        };
        shapes.push(CeilingShape {
            name: name.clone(),
            m: *m,
            n: *n,
            k: *k,
            tflops: throughput(shape.flops(), seconds),
            seconds_per_call: seconds,
        });
        counts.push(*count);
    }
    Ok(combine(dtype, shapes, &counts))
}

/// Tera-FLOP/s, 0 where no time was measured.
fn throughput(flops: f64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        flops / seconds / 1e12
    } else {
        0.0
    }
}

/// The FLOP-weighted ceiling of measured shapes, `counts[i]` calls of `shapes[i]` per forward.
fn combine(dtype: Dtype, shapes: Vec<CeilingShape>, counts: &[usize]) -> Ceiling {
    let (flops, seconds) = shapes
        .iter()
        .zip(counts)
        .fold((0.0, 0.0), |(f, s), (shape, &count)| {
            let per_call = 2.0 * shape.m as f64 * shape.n as f64 * shape.k as f64;
            (
                f + count as f64 * per_call,
                s + count as f64 * shape.seconds_per_call,
            )
        });
    Ceiling {
        dtype: dtype.as_str(),
        shapes,
        tflops: throughput(flops, seconds),
    }
}

/// Seconds per call of one product, on fresh buffers.
fn time_product(gemm: &Gemm, shape: GemmShape, iters: usize, seed: u64) -> Result<f64, GemmError> {
    let stream = gemm.stream();
    // Checked: a size that wrapped around would allocate less than the product touches.
    let elem = element_bytes(shape.dtype);
    let bytes = |rows: usize, cols: usize| {
        rows.checked_mul(cols)
            .and_then(|v| v.checked_mul(elem))
            .ok_or_else(|| GemmError::Shape {
                shape,
                reason: "the buffers' sizes overflow".into(),
            })
    };
    let mut x = stream.alloc_zeros::<u8>(bytes(shape.m, shape.x_stride)?)?;
    let mut w = stream.alloc_zeros::<u8>(bytes(shape.n, shape.k)?)?;
    let mut dst = stream.alloc_zeros::<u8>(bytes(shape.m, shape.n)?)?;
    fill_random(stream, &mut x, shape.dtype, 2 * seed)?;
    fill_random(stream, &mut w, shape.dtype, 2 * seed + 1)?;

    let (xp, _x_sync) = x.device_ptr(stream);
    let (wp, _w_sync) = w.device_ptr(stream);
    let (dp, _dst_sync) = cudarc::driver::DevicePtrMut::device_ptr_mut(&mut dst, stream);
    let run = || {
        // SAFETY: the three buffers were allocated on this stream for exactly this shape
        // (x_stride = k), by the allocator (256-byte aligned), are distinct, and outlive the
        // calls: they are dropped after the end event has been waited for.
        unsafe { gemm.linear(shape, dp, xp, wp) }
    };
    for _ in 0..3 {
        run()?;
    }
    let start = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    for _ in 0..iters {
        run()?;
    }
    let end = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    // Waits for both events.
    let ms = start.elapsed_ms(&end)?;
    Ok(f64::from(ms) / 1e3 / iters as f64)
}

/// Fills a device buffer with small random values of the dtype (uniform in [-1/8, 1/8),
/// like weights of this scale): 1 MiB of them copied from the host, then repeated on the
/// device by doubling, so that filling gigabytes costs no host time. Random rather than
/// constant data: it draws the power (and clocks) real data does.
fn fill_random(
    stream: &Arc<CudaStream>,
    buf: &mut CudaSlice<u8>,
    dtype: Dtype,
    seed: u64,
) -> Result<(), DriverError> {
    const PATTERN_BYTES: usize = 1 << 20;
    let len = buf.len();
    let elem = element_bytes(dtype);
    let head = len.min(PATTERN_BYTES) / elem * elem;
    if head == 0 {
        return Ok(());
    }
    let mut rng = crate::splitmix::SplitMix64(seed);
    let values: Vec<f32> = (0..head / elem)
        .map(|_| dtype.round((rng.unit() - 0.5) as f32 * 0.25))
        .collect();
    let pattern = encode(dtype, &values);
    stream.memcpy_htod(&pattern, &mut buf.slice_mut(0..head))?;
    let mut filled = head;
    while filled < len {
        let n = filled.min(len - filled);
        let (src, mut dst) = buf.split_at_mut(filled);
        stream.memcpy_dtod(&src.slice(0..n), &mut dst.slice_mut(0..n))?;
        filled += n;
    }
    Ok(())
}

/// The little-endian bytes of values of the dtype (each already representable in it, or
/// rounded to nearest even).
pub(crate) fn encode(dtype: Dtype, values: &[f32]) -> Vec<u8> {
    match dtype {
        Dtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Dtype::F16 => values
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_bits().to_le_bytes())
            .collect(),
        Dtype::Bf16 => values
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_bits().to_le_bytes())
            .collect(),
    }
}

/// The products of one forward pass of `batch` nonces, as `(name, m, n, k, count)`.
///
/// Per layer: the projections q, k, v (`m = batch*seq`, `n = heads*head_dim` or
/// `kv_heads*head_dim`, `k = dim`), o (`n = dim`, `k = heads*head_dim`), the FFN's w1 and w3
/// (`n = hidden`, `k = dim`) and w2 (`n = dim`, `k = hidden`). The last layer only needs the
/// last position's output, so its q, o and FFN products have `m = batch` (the `*_last`
/// entries); its k and v still cover every position (attention reads them all). Then the
/// output projection of the last positions (`m = batch`, `n = vocab`, `k = dim`).
/// Entries that occur 0 times (the full-sequence ones of a 1-layer model) are left out.
pub fn forward_products(
    params: &Params,
    batch: usize,
) -> Vec<(String, usize, usize, usize, usize)> {
    let dim = params.dim_usize();
    let q_out = params.n_heads_usize() * params.head_dim();
    let kv_out = params.n_kv_heads_usize() * params.head_dim();
    let hidden = params.ffn_hidden();
    let layers = params.n_layers_usize();
    let full = batch * params.seq_len_usize();

    // (name, n, k, whether the last layer computes only the last position)
    let per_layer = [
        ("q", q_out, dim, true),
        ("k", kv_out, dim, false),
        ("v", kv_out, dim, false),
        ("o", dim, q_out, true),
        ("w1", hidden, dim, true),
        ("w3", hidden, dim, true),
        ("w2", dim, hidden, true),
    ];
    let mut products = Vec::with_capacity(2 * per_layer.len() + 1);
    for &(name, n, k, last_position_only) in &per_layer {
        let count = if last_position_only {
            layers.saturating_sub(1)
        } else {
            layers
        };
        products.push((name.to_string(), full, n, k, count));
    }
    for &(name, n, k, last_position_only) in &per_layer {
        if last_position_only && layers > 0 {
            products.push((format!("{name}_last"), batch, n, k, 1));
        }
    }
    products.push(("output".to_string(), batch, params.vocab_usize(), dim, 1));
    products.retain(|p| p.4 > 0);
    products
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cuda::cuda_available;
    use cudarc::driver::CudaContext;

    type Product = (String, usize, usize, usize, usize);

    fn total_flops(products: &[Product]) -> f64 {
        products
            .iter()
            .map(|&(_, m, n, k, count)| count as f64 * 2.0 * m as f64 * n as f64 * k as f64)
            .sum()
    }

    #[test]
    fn forward_products_of_v2() {
        let p = Params::v2();
        assert_eq!(
            (
                p.dim_usize(),
                p.head_dim(),
                p.ffn_hidden(),
                p.seq_len_usize()
            ),
            (1792, 28, 49152, 256)
        );
        let products = forward_products(&p, 1);
        let names: Vec<&str> = products.iter().map(|p| p.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "q", "k", "v", "o", "w1", "w3", "w2", "q_last", "o_last", "w1_last", "w3_last",
                "w2_last", "output"
            ]
        );
        assert!(products.contains(&("q".into(), 256, 1792, 1792, 63)));
        assert!(products.contains(&("k".into(), 256, 1792, 1792, 64)));
        assert!(products.contains(&("w2_last".into(), 1, 1792, 49152, 1)));
        assert!(products.contains(&("output".into(), 1, 8196, 1792, 1)));

        // By hand: q, k, v, o are [1792, 1792]; w1, w3, w2 are [1792, 49152] (or its
        // transpose). 63 full layers of all seven, k and v full in the 64th, the 64th's q, o
        // and FFN on the last position only, and the output head on it. Every partial sum is
        // an integer below 2^53, so f64 is exact and the order of the sum does not matter.
        let attn = 1792.0 * 1792.0;
        let ffn = 1792.0 * 49152.0;
        let expected = 2.0 * 256.0 * (63.0 * (4.0 * attn + 3.0 * ffn) + 2.0 * attn)
            + 2.0 * (2.0 * attn + 3.0 * ffn)
            + 2.0 * 8196.0 * 1792.0;
        assert_eq!(total_flops(&products), expected);

        // Every layer on every position (what DESIGN quotes, ~9.1 TFLOP per nonce): the
        // `_last` entries scaled back to the whole sequence.
        let all_full: Vec<Product> = products
            .iter()
            .map(|(name, m, n, k, c)| {
                let m = if name.ends_with("_last") { m * 256 } else { *m };
                (name.clone(), m, *n, *k, *c)
            })
            .collect();
        let full = total_flops(&all_full);
        assert_eq!(
            full,
            2.0 * 256.0 * 64.0 * (4.0 * attn + 3.0 * ffn) + 2.0 * 8196.0 * 1792.0
        );
        assert!(9.0e12 < full && full < 9.2e12, "{full:e}");

        // Linear in the batch.
        assert_eq!(total_flops(&forward_products(&p, 4)), 4.0 * expected);
    }

    #[test]
    fn forward_products_of_one_layer_leave_out_empty_entries() {
        let p = Params {
            n_layers: 1,
            n_kv_heads: 16,
            ..Params::v2()
        };
        let products = forward_products(&p, 2);
        let names: Vec<&str> = products.iter().map(|p| p.0.as_str()).collect();
        assert_eq!(
            names,
            ["k", "v", "q_last", "o_last", "w1_last", "w3_last", "w2_last", "output"]
        );
        // Grouped-query attention: k and v are narrower than q.
        assert!(products.contains(&("k".into(), 512, 16 * 28, 1792, 1)));
        assert!(products.contains(&("q_last".into(), 2, 1792, 1792, 1)));
    }

    #[test]
    fn ceiling_is_flop_weighted() {
        let shape = |name: &str, m, n, k, seconds| CeilingShape {
            name: name.into(),
            m,
            n,
            k,
            tflops: throughput(2.0 * (m * n * k) as f64, seconds),
            seconds_per_call: seconds,
        };
        // 2e12 flops in 1 s (2 TFLOP/s) counted 3 times, 2e12 flops in 4 s counted once:
        // 8e12 flops in 7 s.
        let shapes = vec![
            shape("fast", 1000, 1000, 1_000_000, 1.0),
            shape("slow", 1000, 1000, 1_000_000, 4.0),
        ];
        assert_eq!(shapes[0].tflops, 2.0);
        let c = combine(Dtype::Bf16, shapes, &[3, 1]);
        assert_eq!(c.dtype, "bf16");
        assert!((c.tflops - 8.0 / 7.0).abs() < 1e-12, "{}", c.tflops);
        assert_eq!(combine(Dtype::F32, Vec::new(), &[]).tflops, 0.0);
    }

    #[test]
    fn encode_writes_the_dtype_bits() {
        assert_eq!(encode(Dtype::F32, &[1.0]), 1.0f32.to_le_bytes());
        assert_eq!(encode(Dtype::F16, &[1.0, -2.0]), [0x00, 0x3C, 0x00, 0xC0]);
        assert_eq!(encode(Dtype::Bf16, &[1.0]), [0x80, 0x3F]);
    }

    /// Without libcublasLt, making a `Gemm` is an error, not cudarc's panic. (`Gemm::new`
    /// needs a stream, so a GPU; its first step is this check, tested here on its own.)

    #[test]
    fn ceiling_on_the_gpu() {
        if let Err(why) = cuda_available() {
            eprintln!("skipped: {why}");
            return;
        }
        let ctx = CudaContext::new(0).unwrap();
        let gemm = Gemm::new(ctx.default_stream()).unwrap();
        let products = vec![
            ("a".to_string(), 256, 1792, 1792, 3),
            ("b".to_string(), 256, 4096, 1792, 1),
            ("empty".to_string(), 0, 4096, 1792, 1),
        ];
        let c = measure_ceiling(&gemm, Dtype::Bf16, &products, 5).unwrap();
        assert_eq!(c.shapes.len(), 3);
        assert!(c.tflops > 0.0 && c.tflops.is_finite(), "{c:?}");
        assert!(c.shapes[0].seconds_per_call > 0.0, "{c:?}");
        assert_eq!(c.shapes[2].seconds_per_call, 0.0);
        eprintln!("{}", serde_json::to_string(&c).unwrap());
    }
}
