//! Every product path against the path it replaces (the `gemm` crate's f32 GEMM on f32
//! weights, then one rounding) and against the exact statement of its own order.
//!
//! What is compared, and why:
//! - Against its own order, bit for bit: each path's outputs equal a plain scalar loop that
//!   adds the products in the order the path (or the instruction's SDM pseudocode) states.
//!   This is where tiling, packing, edges and strides show: a misplaced or missing product
//!   changes the bits.
//! - Against the current path, bit for bit on exact data: inputs that are small integers
//!   times powers of two keep every partial sum exact in f32, so any order gives the same
//!   sum, and every path must agree with the `gemm` crate to the last bit.
//! - Against the current path on random data: the two sum the same exact products in
//!   different orders, each within `k * 2^-24 * sum |x_l w_l|` of the exact sum (the
//!   textbook bound for recursive summation with FMA), so they differ by at most twice that
//!   before the rounding to T, and by at most one unit of T more after it.

use super::amx_model::{add_daz_ftz, fma_daz_ftz};
use super::*;
use crate::pow::dtype::{RoundBf16, RoundF16, RoundF32};

/// Deterministic data.
struct Rng(crate::splitmix::SplitMix64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(crate::splitmix::SplitMix64(seed))
    }

    fn next(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in [-scale, scale), rounded to `dtype`.
    fn value(&mut self, scale: f32, dtype: Dtype) -> f32 {
        let u = (self.next() >> 40) as f32 / (1u64 << 24) as f32;
        dtype.round((2.0 * u - 1.0) * scale)
    }

    /// A small non-zero integer times a power of two: products and sums stay exact in
    /// f32, and no sum is a negative zero (whose sign would depend on the order).
    fn exact(&mut self) -> f32 {
        let v = (self.next() % 7) as f32 + 1.0;
        let v = if self.next().is_multiple_of(2) { v } else { -v };
        v * [0.25, 0.5, 1.0, 2.0][(self.next() % 4) as usize]
    }
}

/// One product's operands.
struct Case {
    m: usize,
    n: usize,
    k: usize,
    stride: usize,
    dtype: Dtype,
    /// `m` rows at `stride`; the gaps hold NaN, which no path may read.
    x: Vec<f32>,
    /// Row-major `[n, k]`.
    w: Vec<f32>,
}

impl Case {
    fn new(m: usize, n: usize, k: usize, gap: usize, dtype: Dtype, seed: u64, exact: bool) -> Case {
        let mut rng = Rng::new(seed);
        let stride = k + gap;
        let mut x = vec![f32::NAN; (m - 1) * stride + k];
        for i in 0..m {
            for l in 0..k {
                x[i * stride + l] = if exact {
                    rng.exact()
                } else {
                    rng.value(2.0, dtype)
                };
            }
        }
        let scale = 1.5 / (k as f32).sqrt();
        let w = (0..n * k)
            .map(|_| {
                if exact {
                    rng.exact()
                } else {
                    rng.value(scale, dtype)
                }
            })
            .collect();
        Case {
            m,
            n,
            k,
            stride,
            dtype,
            x,
            w,
        }
    }

    fn x_row(&self, i: usize) -> &[f32] {
        &self.x[i * self.stride..i * self.stride + self.k]
    }

    fn w_row(&self, j: usize) -> &[f32] {
        &self.w[j * self.k..(j + 1) * self.k]
    }

    /// The path's output, with a sentinel after `m * n` that must survive.
    fn run(&self, kernel: Kernel) -> Vec<f32> {
        let packed = PackedWeight::pack(&self.w, self.n, self.k, self.dtype, kernel.layout())
            .expect("packable");
        let mut dst = vec![-7.25f32; self.m * self.n + 3];
        match self.dtype {
            Dtype::F32 => {
                linear::<RoundF32>(kernel, &mut dst, &self.x, self.m, self.stride, &packed)
            }
            Dtype::F16 => {
                linear::<RoundF16>(kernel, &mut dst, &self.x, self.m, self.stride, &packed)
            }
            Dtype::Bf16 => {
                linear::<RoundBf16>(kernel, &mut dst, &self.x, self.m, self.stride, &packed)
            }
        }
        assert_eq!(
            &dst[self.m * self.n..],
            &[-7.25; 3],
            "{kernel}: wrote past m * n"
        );
        dst.truncate(self.m * self.n);
        dst
    }

    /// The `gemm` crate on f32 values, then one rounding: the path before this module.
    fn current_path(&self) -> Vec<f32> {
        let (m, n, k) = (self.m, self.n, self.k);
        let mut dst = vec![0f32; m * n];
        // SAFETY: the call the forward made before (same strides): dst is m x n with row
        // stride n, x has m rows of k at `stride`, w is n rows of k (the right-hand side
        // element (l, j) at j * k + l); dst is unaliased and not read (read_dst false).
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                dst.as_mut_ptr(),
                1,
                n as isize,
                false,
                self.x.as_ptr(),
                1,
                self.stride as isize,
                self.w.as_ptr(),
                k as isize,
                1,
                0.0f32,
                1.0f32,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(rayon::current_num_threads()),
            );
        }
        dst.iter().map(|&v| self.dtype.round(v)).collect()
    }

    /// Each output from a scalar statement of an order.
    fn by_order(&self, dot: impl Fn(&[f32], &[f32]) -> f32) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.m * self.n);
        for i in 0..self.m {
            for j in 0..self.n {
                out.push(self.dtype.round(dot(self.x_row(i), self.w_row(j))));
            }
        }
        out
    }

    /// `sum |x_l w_l|` per output, in f64.
    fn magnitudes(&self) -> Vec<f64> {
        let mut out = Vec::with_capacity(self.m * self.n);
        for i in 0..self.m {
            for j in 0..self.n {
                let s: f64 = self
                    .x_row(i)
                    .iter()
                    .zip(self.w_row(j))
                    .map(|(a, b)| (*a as f64 * *b as f64).abs())
                    .sum();
                out.push(s);
            }
        }
        out
    }
}

/// FMA paths: `acc = fma(x[l], w[l], acc)`, `l` increasing, from +0.
fn sequential_fma(x: &[f32], w: &[f32]) -> f32 {
    x.iter().zip(w).fold(0f32, |acc, (a, b)| a.mul_add(*b, acc))
}

/// `vdpbf16ps` (SDM): per pair, the odd input then the even one, DAZ / FTZ FMAs.
fn vdpbf16ps_order(x: &[f32], w: &[f32]) -> f32 {
    let at = |v: &[f32], i: usize| v.get(i).copied().unwrap_or(0.0);
    let mut acc = 0f32;
    for p in 0..x.len().div_ceil(2) {
        acc = fma_daz_ftz(at(x, 2 * p + 1), at(w, 2 * p + 1), acc);
        acc = fma_daz_ftz(at(x, 2 * p), at(w, 2 * p), acc);
    }
    acc
}

/// TDPBF16PS (SDM): per 32 inputs, even and odd sums from zero, their sum added.
fn tdpbf16ps_order(x: &[f32], w: &[f32]) -> f32 {
    let at = |v: &[f32], i: usize| v.get(i).copied().unwrap_or(0.0);
    let mut acc = 0f32;
    for block in 0..x.len().div_ceil(32) {
        let (mut even, mut odd) = (0f32, 0f32);
        for p in 0..16 {
            let l = block * 32 + 2 * p;
            even = fma_daz_ftz(at(x, l), at(w, l), even);
            odd = fma_daz_ftz(at(x, l + 1), at(w, l + 1), odd);
        }
        acc = add_daz_ftz(acc, add_daz_ftz(even, odd));
    }
    acc
}

/// The order `kernel` adds in, for `dtype`.
fn order_of(kernel: Kernel, dtype: Dtype) -> fn(&[f32], &[f32]) -> f32 {
    match (kernel, dtype) {
        (Kernel::Avx512Bf16 | Kernel::Avx512Bf16Model, _) => vdpbf16ps_order,
        (Kernel::AmxModel | Kernel::Amx, Dtype::Bf16) => tdpbf16ps_order,
        // TDPFP16PS is the sequential order (its flush of f32 denormals never acts on a sum
        // of f16 products: every partial sum is a multiple of 2^-48).
        _ => sequential_fma,
    }
}

/// The paths this machine runs for `dtype`, and the AMX driver on the model.
fn paths(dtype: Dtype) -> Vec<Kernel> {
    let host = Features::host();
    let mut out: Vec<Kernel> = Kernel::ALL
        .into_iter()
        .filter(|k| k.runs(dtype, &host))
        .collect();
    if dtype != Dtype::F32 {
        out.push(Kernel::AmxModel);
    }
    if dtype == Dtype::Bf16 {
        out.push(Kernel::Avx512Bf16Model);
    }
    for k in Kernel::ALL {
        let applies = match k {
            Kernel::Amx => dtype != Dtype::F32,
            Kernel::Avx512Bf16 => dtype == Dtype::Bf16,
            _ => true,
        };
        if applies && !k.runs(dtype, &host) {
            eprintln!("{dtype}: the {k} path cannot run on this CPU, not tested here");
        }
    }
    out
}

/// Odd shapes: (m, n, k, gap between input rows). The last ones run past every kernel's
/// stretch of k (at most 2048 steps), so accumulation across stretches is covered.
const SHAPES: [(usize, usize, usize, usize); 13] = [
    (1, 1, 1, 0),
    (1, 1, 1, 3),
    (1, 40, 1, 0),
    (7, 1, 5, 0),
    (13, 33, 2, 0),
    (12, 32, 32, 0),
    (33, 31, 33, 5),
    (25, 70, 45, 64),
    (3, 65, 300, 0),
    (40, 97, 61, 7),
    (2, 9, 600, 100),
    (61, 64, 1030, 2),
    (5, 40, 4301, 3),
];

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn every_path_follows_its_stated_order_bit_for_bit() {
    for dtype in Dtype::ALL {
        for kernel in paths(dtype) {
            for (ci, &(m, n, k, gap)) in SHAPES.iter().enumerate() {
                let case = Case::new(m, n, k, gap, dtype, 100 + ci as u64, false);
                let got = case.run(kernel);
                let want = case.by_order(order_of(kernel, dtype));
                assert!(
                    got.iter().all(|v| v.is_finite()),
                    "{kernel} {dtype} {m}x{n}x{k}+{gap}: read a NaN from a row gap"
                );
                // Equal as numbers: an output of exactly zero may carry either sign.
                let differ = got.iter().zip(&want).filter(|(a, b)| a != b).count();
                assert_eq!(
                    differ,
                    0,
                    "{kernel} {dtype} {m}x{n}x{k}+{gap}: {differ} outputs differ from the order \
                     it states\n got {:?}\nwant {:?}",
                    &got[..got.len().min(8)],
                    &want[..want.len().min(8)]
                );
            }
        }
    }
}

#[test]
fn every_path_equals_the_current_path_on_exact_data() {
    for dtype in Dtype::ALL {
        for kernel in paths(dtype) {
            for (ci, &(m, n, k, gap)) in SHAPES.iter().enumerate() {
                let case = Case::new(m, n, k, gap, dtype, 200 + ci as u64, true);
                let got = case.run(kernel);
                let want = case.current_path();
                assert_eq!(
                    bits(&got),
                    bits(&want),
                    "{kernel} {dtype} {m}x{n}x{k}+{gap}: exact sums differ"
                );
            }
        }
    }
}

#[test]
fn every_path_is_within_the_reordering_bound_of_the_current_path() {
    for dtype in Dtype::ALL {
        let unit = match dtype {
            Dtype::F32 => 0.0,
            Dtype::F16 => 2f64.powi(-10),
            Dtype::Bf16 => 2f64.powi(-7),
        };
        for kernel in paths(dtype) {
            let (mut same, mut total) = (0usize, 0usize);
            for (ci, &(m, n, k, gap)) in SHAPES.iter().enumerate() {
                let case = Case::new(m, n, k, gap, dtype, 300 + ci as u64, false);
                let got = case.run(kernel);
                let want = case.current_path();
                for ((g, w), mag) in got.iter().zip(&want).zip(case.magnitudes()) {
                    let reorder = 2.0 * k as f64 * 2f64.powi(-24) * mag;
                    // One unit of T at the larger of the two (a rounding boundary between them).
                    let ulp_t = unit * (g.abs().max(w.abs()) as f64).max(f64::MIN_POSITIVE);
                    let d = (*g as f64 - *w as f64).abs();
                    assert!(
                        d <= reorder + 2.0 * ulp_t,
                        "{kernel} {dtype} {m}x{n}x{k}+{gap}: {g} vs {w}: |diff| {d:e} > bound"
                    );
                    same += usize::from(g == w);
                    total += 1;
                }
            }
            eprintln!("{kernel} {dtype}: {same} of {total} outputs equal to the current path's");
            if dtype != Dtype::F32 {
                assert!(same * 10 >= total * 9, "{kernel} {dtype}: too many differ");
            }
        }
    }
}

#[test]
fn fma_paths_agree_with_each_other_bit_for_bit() {
    let host = Features::host();
    for dtype in Dtype::ALL {
        let fma: Vec<Kernel> = [Kernel::Scalar, Kernel::Avx2, Kernel::Avx512]
            .into_iter()
            .filter(|k| k.runs(dtype, &host))
            .collect();
        for &(m, n, k, gap) in &SHAPES {
            let case = Case::new(m, n, k, gap, dtype, 7, false);
            let want = bits(&case.run(Kernel::Scalar));
            for &kernel in &fma[1..] {
                assert_eq!(
                    bits(&case.run(kernel)),
                    want,
                    "{kernel} {dtype} {m}x{n}x{k}"
                );
            }
        }
    }
}

#[test]
fn k_zero_gives_zeros_and_empty_products_write_nothing() {
    for dtype in Dtype::ALL {
        let w = PackedWeight::pack(&[], 5, 0, dtype, Layout::Rows).unwrap();
        let mut dst = vec![3.0f32; 12];
        match dtype {
            Dtype::F32 => linear::<RoundF32>(Kernel::Scalar, &mut dst, &[], 2, 0, &w),
            Dtype::F16 => linear::<RoundF16>(Kernel::Scalar, &mut dst, &[], 2, 0, &w),
            Dtype::Bf16 => linear::<RoundBf16>(Kernel::Scalar, &mut dst, &[], 2, 0, &w),
        }
        assert_eq!(&dst[..10], &[0.0; 10]);
        assert_eq!(&dst[10..], &[3.0, 3.0]);
    }
    let w = PackedWeight::pack(&[1.0; 4], 2, 2, Dtype::F32, Layout::Rows).unwrap();
    let mut dst = vec![3.0f32; 2];
    linear::<RoundF32>(Kernel::Scalar, &mut dst, &[], 0, 2, &w);
    assert_eq!(dst, [3.0, 3.0]);
}

#[test]
#[should_panic(expected = "weight layout")]
fn a_weight_packed_for_another_path_is_refused() {
    let w = PackedWeight::pack(&[1.0; 4], 2, 2, Dtype::Bf16, Layout::Pairs).unwrap();
    let mut dst = vec![0f32; 2];
    linear::<RoundBf16>(Kernel::Scalar, &mut dst, &[1.0, 1.0], 1, 2, &w);
}

#[test]
fn selection_takes_the_fastest_path_within_the_cap() {
    let all = Features::ALL;
    assert_eq!(Kernel::best(Dtype::F16, &all, Cap::Amx), Kernel::Amx);
    assert_eq!(Kernel::best(Dtype::Bf16, &all, Cap::Amx), Kernel::Amx);
    assert_eq!(Kernel::best(Dtype::F32, &all, Cap::Amx), Kernel::Avx512);
    assert_eq!(
        Kernel::best(Dtype::Bf16, &all, Cap::Avx512),
        Kernel::Avx512Bf16
    );
    assert_eq!(Kernel::best(Dtype::F16, &all, Cap::Avx512), Kernel::Avx512);
    assert_eq!(Kernel::best(Dtype::F16, &all, Cap::Avx2), Kernel::Avx2);
    assert_eq!(Kernel::best(Dtype::Bf16, &all, Cap::Scalar), Kernel::Scalar);
    // AMX absent (this machine's case, or a refused permission): the AVX-512 paths.
    let no_amx = Features {
        amx_bf16: false,
        amx_fp16: false,
        ..all
    };
    assert_eq!(Kernel::best(Dtype::F16, &no_amx, Cap::Amx), Kernel::Avx512);
    assert_eq!(
        Kernel::best(Dtype::Bf16, &no_amx, Cap::Amx),
        Kernel::Avx512Bf16
    );
    // AMX-BF16 without AMX-FP16 (Sapphire Rapids): AMX for bf16 only.
    let bf16_only = Features {
        amx_fp16: false,
        ..all
    };
    assert_eq!(
        Kernel::best(Dtype::F16, &bf16_only, Cap::Amx),
        Kernel::Avx512
    );
    assert_eq!(Kernel::best(Dtype::Bf16, &bf16_only, Cap::Amx), Kernel::Amx);
    // The AVX2 path needs F16C (for every dtype: one kernel serves all three).
    let avx2 = Features {
        avx2_fma: true,
        ..Features::default()
    };
    assert_eq!(Kernel::best(Dtype::Bf16, &avx2, Cap::Amx), Kernel::Scalar);
    let avx2 = Features { f16c: true, ..avx2 };
    assert_eq!(Kernel::best(Dtype::F16, &avx2, Cap::Amx), Kernel::Avx2);
    assert_eq!(Kernel::best(Dtype::Bf16, &avx2, Cap::Amx), Kernel::Avx2);
    assert_eq!(
        Kernel::best(Dtype::F32, &Features::default(), Cap::Amx),
        Kernel::Scalar
    );
    // Whatever the host, the choice runs on it.
    for dtype in Dtype::ALL {
        for cap in [Cap::Scalar, Cap::Avx2, Cap::Avx512, Cap::Amx] {
            let k = Kernel::best(dtype, &Features::host(), cap);
            assert!(k.runs(dtype, &Features::host()) && k.family() <= cap);
        }
    }
}

#[test]
fn caps_parse() {
    assert_eq!(Cap::parse("auto"), Ok(Cap::Amx));
    assert_eq!(Cap::parse(""), Ok(Cap::Amx));
    assert_eq!(Cap::parse("AVX512"), Ok(Cap::Avx512));
    assert_eq!(Cap::parse(" avx2 "), Ok(Cap::Avx2));
    assert_eq!(Cap::parse("scalar"), Ok(Cap::Scalar));
    let e = Cap::parse("neon").unwrap_err();
    assert!(e.to_string().contains("neon") && e.to_string().contains(MATMUL_ENV));
}

/// The order statement of `vdpbf16ps` against the instruction, lane by lane, including
/// denormal inputs, accumulators and results.
#[test]
fn vdpbf16ps_does_what_the_sdm_says() {
    #[cfg(target_arch = "x86_64")]
    {
        if !Features::host().avx512_bf16 {
            eprintln!("skipped: this CPU has no AVX512_BF16");
            return;
        }
        let mut rng = Rng::new(99);
        let bf = |b: u16| f32::from_bits(u32::from(b) << 16);
        let word = |tiny: bool, rng: &mut Rng| -> u16 {
            let r = rng.next();
            let sign = ((r >> 15) & 1) as u16;
            let exp = if tiny {
                (r >> 8) % 3
            } else {
                120 + (r >> 8) % 16
            } as u16;
            (sign << 15) | (exp << 7) | (r & 0x7F) as u16
        };
        let mut checked = 0;
        for it in 0..20_000 {
            let tiny = it % 5 == 0;
            let mut acc = [0f32; 16];
            let (mut a, mut b) = ([0u32; 16], [0u32; 16]);
            for i in 0..16 {
                a[i] = u32::from(word(false, &mut rng)) | u32::from(word(false, &mut rng)) << 16;
                b[i] = u32::from(word(tiny, &mut rng)) | u32::from(word(false, &mut rng)) << 16;
                acc[i] = if tiny {
                    f32::from_bits(rng.next() as u32 & 0x807F_FFFF)
                } else {
                    bf(word(false, &mut rng)) * 1.37
                };
            }
            // SAFETY: AVX-512F and AVX512_BF16 are present (checked above).
            let hw = unsafe { x86::vdpbf16ps_lanes(acc, a, b) };
            for i in 0..16 {
                let x = [bf(a[i] as u16), bf((a[i] >> 16) as u16)];
                let w = [bf(b[i] as u16), bf((b[i] >> 16) as u16)];
                let want = fma_daz_ftz(x[0], w[0], fma_daz_ftz(x[1], w[1], acc[i]));
                assert_eq!(
                    hw[i].to_bits(),
                    want.to_bits(),
                    "lane {i}: acc {:e} x {x:?} w {w:?}",
                    acc[i]
                );
                checked += 1;
            }
        }
        // The order shows: acc 1, odd product -1, even product 2^-30. Odd first leaves
        // 2^-30; even first would lose it (1 + 2^-30 = 1) and give 0.
        let one_minus_one = 0x3F80 | (0xBF80u32 << 16);
        let tiny_one = 0x3080 | (0x3F80u32 << 16);
        // SAFETY: as above.
        let hw = unsafe { x86::vdpbf16ps_lanes([1.0; 16], [one_minus_one; 16], [tiny_one; 16]) };
        assert_eq!(hw[0], 2f32.powi(-30));
        eprintln!("vdpbf16ps: {checked} lanes equal to the SDM statement");
    }
    #[cfg(not(target_arch = "x86_64"))]
    eprintln!("skipped: not an x86-64 CPU");
}

/// The model's TDPBF16PS keeps the even and odd sums apart within an instruction, where a
/// sequence of FMAs would not: with C = 1 and two products of 2^-24, the pair sum 2^-23
/// survives, while adding 2^-24 twice to 1 leaves 1 (ties to even). TDPFP16PS is the
/// sequence.
#[test]
fn the_tile_model_sums_bf16_pairs_apart_and_f16_in_sequence() {
    use super::amx::{TileConfig, TileUnit};
    use super::amx_model::TileModel;
    let mut cfg = TileConfig::full();
    // A 1 x 1-pair product: C 1 row x 4 bytes, A 1 row x 4 bytes, B 1 row x 4 bytes.
    for t in 0..8 {
        cfg.rows[t] = 1;
        cfg.colsb[t] = 4;
    }
    let c_in = [1f32];
    let twelve = 2f32.powi(-12);
    let run = |fp16: bool| -> f32 {
        let (a, b): ([u16; 2], [u16; 2]) = if fp16 {
            let h = half::f16::from_f32(twelve).to_bits();
            ([h, h], [h, h])
        } else {
            let h = (twelve.to_bits() >> 16) as u16;
            ([h, h], [h, h])
        };
        let mut out = [0f32];
        // SAFETY: every pointer covers the 1 row x 4 bytes the configuration gives.
        unsafe {
            macro_rules! go {
                ($u:expr) => {{
                    let mut u = $u;
                    u.configure(&cfg);
                    u.load::<0>(c_in.as_ptr().cast(), 4);
                    u.load::<4>(a.as_ptr().cast(), 4);
                    u.load::<6>(b.as_ptr().cast(), 4);
                    u.dot::<0, 4, 6>();
                    u.store::<0>(out.as_mut_ptr().cast(), 4);
                    u.release();
                }};
            }
            if fp16 {
                go!(TileModel::<true>::new())
            } else {
                go!(TileModel::<false>::new())
            }
        }
        out[0]
    };
    assert_eq!(run(false), 1.0 + 2f32.powi(-23));
    assert_eq!(run(true), 1.0);
}

/// The inline-assembly tile layer against the model, wherever AMX runs.
#[test]
fn the_amx_assembly_agrees_with_the_model() {
    let host = Features::host();
    let mut ran = false;
    for dtype in [Dtype::F16, Dtype::Bf16] {
        if !Kernel::Amx.runs(dtype, &host) {
            eprintln!(
                "skipped {dtype}: AMX does not run here ({})",
                features::amx_status()
            );
            continue;
        }
        ran = true;
        let (mut same, mut total) = (0usize, 0usize);
        for (ci, &(m, n, k, gap)) in SHAPES.iter().enumerate() {
            let case = Case::new(m, n, k, gap, dtype, 400 + ci as u64, false);
            let hw = case.run(Kernel::Amx);
            let model = case.run(Kernel::AmxModel);
            for ((h, w), mag) in hw.iter().zip(&model).zip(case.magnitudes()) {
                let unit = if dtype == Dtype::F16 {
                    2f64.powi(-10)
                } else {
                    2f64.powi(-7)
                };
                let bound = 2.0 * k as f64 * 2f64.powi(-24) * mag
                    + 2.0 * unit * (h.abs().max(w.abs()) as f64);
                assert!(
                    ((*h as f64) - (*w as f64)).abs() <= bound,
                    "{dtype} {m}x{n}x{k}: AMX {h} vs model {w}"
                );
                same += usize::from(h == w);
                total += 1;
            }
            // Exact data: any order, same bits.
            let exact = Case::new(m, n, k, gap, dtype, 500 + ci as u64, true);
            assert_eq!(bits(&exact.run(Kernel::Amx)), bits(&exact.current_path()));
        }
        eprintln!("AMX {dtype}: {same} of {total} outputs equal to the model's bit for bit");
    }
    if !ran {
        eprintln!("the AMX assembly layer was not run on this machine");
    }
}

/// The vector roundings of the kernels' stores against `Dtype::round`: every upper half with
/// low halves around the ties, and random patterns.
#[test]
fn vector_roundings_equal_dtype_round() {
    #[cfg(target_arch = "x86_64")]
    {
        let host = Features::host();
        let lows: [u32; 12] = [
            0x0000, 0x0001, 0x0FFF, 0x1000, 0x1001, 0x7FFF, 0x8000, 0x8001, 0xC000, 0xE000, 0xF000,
            0xFFFF,
        ];
        let mut rng = Rng::new(11);
        let mut patterns: Vec<u32> = (0u32..1 << 16)
            .flat_map(|hi| lows.iter().map(move |&lo| hi << 16 | lo))
            .collect();
        patterns.extend((0..200_000).map(|_| rng.next() as u32));
        for dtype in [Dtype::F16, Dtype::Bf16] {
            let same = |got: f32, x: f32, path: &str| {
                let want = dtype.round(x);
                assert!(
                    got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                    "{path} {dtype}: {x:e} ({:#010x}) -> {got:e}, want {want:e}",
                    x.to_bits()
                );
            };
            for chunk in patterns.chunks_exact(16) {
                let v: [f32; 16] = std::array::from_fn(|i| f32::from_bits(chunk[i]));
                if host.avx512f {
                    let mut out = [0f32; 16];
                    // SAFETY: AVX-512F is present; 16 writable values.
                    unsafe { x86::store_rounded_x16(&v, out.as_mut_ptr(), 16, dtype) };
                    for (g, x) in out.iter().zip(&v) {
                        same(*g, *x, "avx512");
                    }
                }
                if host.avx2_fma && host.f16c {
                    let lo: [f32; 8] = std::array::from_fn(|i| v[i]);
                    // SAFETY: AVX2, FMA and F16C are present.
                    let out = unsafe { x86::round_x8_lanes(lo, dtype) };
                    for (g, x) in out.iter().zip(&lo) {
                        same(*g, *x, "avx2");
                    }
                }
            }
        }
    }
}

/// The fused FFN product against its three steps, bit for bit, on every path that fuses
/// (and `false`, untouched, where it cannot).
#[test]
fn the_gated_product_equals_two_products_and_silu_mul() {
    fn three_steps<R: Rounding>(
        kernel: Kernel,
        c: &Case,
        gate: &PackedWeight,
        up: &PackedWeight,
    ) -> Vec<f32> {
        let mut g = vec![0f32; c.m * c.n];
        let mut u = vec![0f32; c.m * c.n];
        linear::<R>(kernel, &mut g, &c.x, c.m, c.stride, gate);
        linear::<R>(kernel, &mut u, &c.x, c.m, c.stride, up);
        crate::backend::cpu::silu_mul_vectorised::<R>(&mut g, &u);
        g
    }
    fn fused<R: Rounding>(
        kernel: Kernel,
        c: &Case,
        gate: &PackedWeight,
        up: &PackedWeight,
    ) -> Option<Vec<f32>> {
        let mut d = vec![-7.25f32; c.m * c.n + 2];
        if !linear_silu_mul::<R>(kernel, &mut d, &c.x, c.m, c.stride, gate, up) {
            assert!(
                d.iter().all(|&v| v == -7.25),
                "{kernel}: refused, but wrote"
            );
            return None;
        }
        assert_eq!(&d[c.m * c.n..], &[-7.25, -7.25]);
        d.truncate(c.m * c.n);
        Some(d)
    }
    for dtype in Dtype::ALL {
        for kernel in paths(dtype) {
            let mut fused_any = false;
            for (ci, &(m, n, k, gap)) in SHAPES.iter().enumerate() {
                let c = Case::new(m, n, k, gap, dtype, 600 + ci as u64, false);
                let up_case = Case::new(m, n, k, gap, dtype, 700 + ci as u64, false);
                let layout = kernel.layout();
                let gate = PackedWeight::pack(&c.w, n, k, dtype, layout).unwrap();
                let up = PackedWeight::pack(&up_case.w, n, k, dtype, layout).unwrap();
                let (got, want) = match dtype {
                    Dtype::F32 => (
                        fused::<RoundF32>(kernel, &c, &gate, &up),
                        three_steps::<RoundF32>(kernel, &c, &gate, &up),
                    ),
                    Dtype::F16 => (
                        fused::<RoundF16>(kernel, &c, &gate, &up),
                        three_steps::<RoundF16>(kernel, &c, &gate, &up),
                    ),
                    Dtype::Bf16 => (
                        fused::<RoundBf16>(kernel, &c, &gate, &up),
                        three_steps::<RoundBf16>(kernel, &c, &gate, &up),
                    ),
                };
                assert_eq!(
                    got.is_some(),
                    fuses_silu_mul(kernel, dtype, k),
                    "{kernel} {dtype} k {k}"
                );
                if let Some(got) = got {
                    fused_any = true;
                    assert_eq!(
                        bits(&got),
                        bits(&want),
                        "{kernel} {dtype} {m}x{n}x{k}+{gap}"
                    );
                }
            }
            let register_blocked = !matches!(kernel, Kernel::Amx | Kernel::AmxModel);
            assert_eq!(
                fused_any, register_blocked,
                "{kernel} {dtype}: fused where expected"
            );
        }
    }
}

#[test]
fn the_first_use_proof_of_a_path_holds_it_to_exact_sums() {
    // Every path this machine runs, the AMX one through its model, computes the exact case
    // exactly: it is what a machine's AMX tiles must do before they compute proofs.
    for dtype in [Dtype::F16, Dtype::Bf16] {
        for kernel in [Kernel::Scalar, Kernel::AmxModel, Kernel::Avx512Bf16Model] {
            if kernel.runs(dtype, &Features::host()) {
                exact_product_agrees(kernel, dtype).unwrap();
            }
        }
        for kernel in [Kernel::Avx2, Kernel::Avx512, Kernel::Avx512Bf16] {
            if kernel.runs(dtype, &Features::host()) {
                exact_product_agrees(kernel, dtype).unwrap();
            }
        }
        // The wanted outputs really are exact: the f32 sum of each is its f64 sum.
        let (x, w, want) = exact_case(dtype);
        assert!(want.iter().any(|&v| v != 0.0));
        let r = 3;
        for c in 0..EXACT_N {
            let f32_sum: f32 = (0..EXACT_K)
                .map(|l| x[r * EXACT_K + l] * w[c * EXACT_K + l])
                .sum();
            assert_eq!(dtype.round(f32_sum), want[r * EXACT_N + c]);
        }
    }
    // A path that disagrees is reported with the output that shows it.
    let (_, _, want) = exact_case(Dtype::F16);
    let mut wrong = want.clone();
    wrong[100] = f32::from_bits(wrong[100].to_bits() ^ 1);
    let e = first_difference(&wrong, &want).unwrap_err();
    assert!(e.starts_with("output 100 of a 19 x 37 x 70 product"), "{e}");
    first_difference(&want, &want).unwrap();
    // Where AMX is absent, selection never tries it.
    if !Features::host().amx_bf16 {
        assert_ne!(Kernel::select(Dtype::Bf16).unwrap(), Kernel::Amx);
    }
}
