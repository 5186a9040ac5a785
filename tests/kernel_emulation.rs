//! The CUDA kernels (kernels/*.cu), their exact source run on the CPU, against the CPU
//! backend. No GPU needed: tests/kernel_emulation/emulate.hpp provides the CUDA built-ins
//! (threads of a block as fibers, barriers, warp shuffles and ballots, shared memory) and
//! tests/kernel_emulation/harness.cpp launches each kernel with the grid, block and shared
//! memory of its Rust launcher. The harness is built here with the host's C++ compiler (CXX,
//! else c++, g++ or clang++) into the target's temporary directory, once per version of the
//! sources; without a C++20 compiler every test is skipped, saying so.
//!
//! Each kernel gets random inputs that are exact in the model dtype, over shapes with odd
//! sizes, and must agree bit for bit with the CPU backend's own function, with one exception:
//! the kernels' exponential is `(float)exp((double)x)` and the CPU backend's is Rust's
//! `f32::exp` (the host's expf), which differ in the last f32 bit for a small fraction of
//! arguments. silu_mul and attention therefore run twice:
//! - with the emulator's exp replaced by the host's expf (EMU_EXP=host_expf), where they
//!   must agree bit for bit: that pins every operation around the exponential;
//! - with the device's exp, where a small fraction of the values may differ: by one unit in
//!   the last place of f16 / bf16; in f32 by two units for silu_mul (a quotient by 1 + e
//!   moves by up to two when e moves by one) and, for attention, by a few f32 units of the
//!   largest |v| in absolute value (a last-bit change in a probability can be many units of
//!   an output that cancels). The counts are printed: run with `--nocapture`.
//!
//! The emulator runs with a seeded random schedule, so that a missing barrier changes the
//! results; `emulator_catches_misuse_of_synchronisation` checks that divergent, deadlocked
//! or out-of-bounds kernels are stopped.

use llama_pow::backend::cpu::{self, AttnShape, RopeTable};
use llama_pow::backend::cuda::launch::attention::{plan, smem_bytes, AttnPlan};
use llama_pow::pow::dtype::{Dtype, RoundBf16, RoundF16, RoundF32};
use llama_pow::pow::params::Params;
use llama_pow::pow::proof;
use llama_pow::pow::weights::PoolSlice;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

// ---------------------------------------------------------------------------------------------
// The harness

const FLAGS: &[&str] = &[
    "-std=c++20",
    "-O2",
    "-pthread",
    "-ffp-contract=off",
    "-Wall",
];

/// The built harness, or why there is none.
fn harness() -> Result<&'static Path, &'static str> {
    static HARNESS: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match HARNESS.get_or_init(build_harness) {
        Ok(p) => Ok(p.as_path()),
        Err(e) => Err(e.as_str()),
    }
}

/// The harness, or None after printing why the test is skipped.
fn emulator(test: &str) -> Option<&'static Path> {
    match harness() {
        Ok(p) => Some(p),
        Err(why) => {
            eprintln!("skipped: {test}: {why}");
            None
        }
    }
}

fn cxx_candidates() -> Vec<String> {
    let mut c: Vec<String> = std::env::var("CXX").into_iter().collect();
    c.extend(["c++", "g++", "clang++"].map(String::from));
    c
}

fn build_harness() -> Result<PathBuf, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cxx = cxx_candidates()
        .into_iter()
        .find(|c| {
            Command::new(c)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .ok_or("no C++ compiler found (CXX, c++, g++, clang++) to build the kernel emulator")?;
    // One binary per version of the sources and flags.
    let mut files: Vec<PathBuf> = vec![
        root.join("tests/kernel_emulation/harness.cpp"),
        root.join("tests/kernel_emulation/emulate.hpp"),
    ];
    let mut kernels: Vec<PathBuf> = std::fs::read_dir(root.join("kernels"))
        .map_err(|e| e.to_string())?
        .map(|e| e.unwrap().path())
        .collect();
    kernels.sort();
    files.extend(kernels);
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (&cxx, FLAGS).hash(&mut h);
    for f in &files {
        f.hash(&mut h);
        std::fs::read(f).map_err(|e| e.to_string())?.hash(&mut h);
    }
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kernel_emulation");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let exe = dir.join(format!("harness-{:016x}", h.finish()));
    if exe.exists() {
        return Ok(exe);
    }
    // A compiler without C++20 (bit_cast, source_location) cannot build it: skip, not fail.
    let probe_src = dir.join(format!("probe-{}.cpp", std::process::id()));
    std::fs::write(
        &probe_src,
        "#include <bit>\n#include <source_location>\nint main() { return \
         std::bit_cast<int>(0.0f) + (int)std::source_location::current().line() - 3; }\n",
    )
    .map_err(|e| e.to_string())?;
    let probe = Command::new(&cxx)
        .args(["-std=c++20", "-fsyntax-only"])
        .arg(&probe_src)
        .output();
    let _ = std::fs::remove_file(&probe_src);
    if !probe.is_ok_and(|o| o.status.success()) {
        return Err(format!("{cxx} does not compile C++20"));
    }
    let tmp = dir.join(format!("harness.{}.tmp", std::process::id()));
    let out = Command::new(&cxx)
        .args(FLAGS)
        .arg("-o")
        .arg(&tmp)
        .arg(root.join("tests/kernel_emulation/harness.cpp"))
        .output()
        .map_err(|e| e.to_string())?;
    assert!(
        out.status.success(),
        "building the kernel emulator with {cxx} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.stderr.is_empty() {
        eprintln!(
            "kernel emulator warnings:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    std::fs::rename(&tmp, &exe).map_err(|e| e.to_string())?;
    Ok(exe)
}

/// How the emulator computes the kernels' `exp(double)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exp {
    /// The host's double exp, as the device computes it (to within the last double bit).
    Device,
    /// The host's f32 expf, which the CPU backend calls: isolates everything else.
    HostExpf,
}

/// One launch: a kernel, its dtype ("-" for none), its scalar arguments and its inputs.
struct Launch {
    kernel: &'static str,
    dtype: &'static str,
    args: Vec<String>,
    input: Vec<u8>,
    exp: Exp,
    seed: u64,
}

impl Launch {
    fn new(kernel: &'static str, dtype: Option<Dtype>) -> Self {
        Launch {
            kernel,
            dtype: dtype.map_or("-", dtype_name),
            args: Vec::new(),
            input: Vec::new(),
            exp: Exp::Device,
            seed: 1,
        }
    }
    fn arg(mut self, k: &str, v: impl std::fmt::Display) -> Self {
        self.args.push(format!("{k}={v}"));
        self
    }
    fn f32_arg(self, k: &str, v: f32) -> Self {
        self.arg(k, format!("{:08x}", v.to_bits()))
    }
    fn f64_arg(self, k: &str, v: f64) -> Self {
        self.arg(k, format!("{:016x}", v.to_bits()))
    }
    fn input(mut self, bytes: &[u8]) -> Self {
        self.input.extend_from_slice(bytes);
        self
    }
    fn exp(mut self, exp: Exp) -> Self {
        self.exp = exp;
        self
    }
    /// Seed of the emulator's random schedule (which ready thread runs next).
    fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
    fn describe(&self) -> String {
        format!("{} {} {}", self.kernel, self.dtype, self.args.join(" "))
    }

    /// Run it; the outputs, concatenated.
    fn run(mut self, exe: &Path) -> Vec<u8> {
        let mut child = Command::new(exe)
            .arg(self.kernel)
            .arg(self.dtype)
            .args(&self.args)
            .env("EMU_SCHEDULE", "random")
            .env("EMU_SEED", self.seed.to_string())
            .env(
                "EMU_EXP",
                match self.exp {
                    Exp::Device => "device",
                    Exp::HostExpf => "host_expf",
                },
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting the kernel emulator");
        let mut stdin = child.stdin.take().unwrap();
        let input = std::mem::take(&mut self.input);
        let writer = std::thread::spawn(move || stdin.write_all(&input));
        let out = child
            .wait_with_output()
            .expect("running the kernel emulator");
        let fed = writer.join().unwrap();
        // Its message first: a harness that stops early also breaks the pipe.
        assert!(
            out.status.success(),
            "emulated {} failed ({}):\n{}",
            self.describe(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        fed.expect("feeding the kernel emulator");
        out.stdout
    }
}

// ---------------------------------------------------------------------------------------------
// Storage and comparison

fn dtype_name(dt: Dtype) -> &'static str {
    match dt {
        Dtype::F32 => "f32",
        Dtype::F16 => "f16",
        Dtype::Bf16 => "bf16",
    }
}

/// The storage bits of `x`, which must be exact in `dt`.
fn storage_bits(dt: Dtype, x: f32) -> u32 {
    match dt {
        Dtype::F32 => x.to_bits(),
        Dtype::F16 => {
            let h = half::f16::from_f32(x);
            assert!(x.is_nan() || h.to_f32() == x, "{x} is not an f16 value");
            h.to_bits() as u32
        }
        Dtype::Bf16 => {
            let h = half::bf16::from_f32(x);
            assert!(x.is_nan() || h.to_f32() == x, "{x} is not a bf16 value");
            h.to_bits() as u32
        }
    }
}

/// Values exact in `dt` as the dtype's storage, little-endian.
fn encode(dt: Dtype, xs: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(xs.len() * 4);
    for &x in xs {
        let b = storage_bits(dt, x);
        match dt {
            Dtype::F32 => out.extend_from_slice(&b.to_le_bytes()),
            _ => out.extend_from_slice(&(b as u16).to_le_bytes()),
        }
    }
    out
}

fn decode(dt: Dtype, bytes: &[u8]) -> Vec<f32> {
    match dt {
        Dtype::F32 => f32s(bytes),
        Dtype::F16 => u16s(bytes)
            .into_iter()
            .map(|b| half::f16::from_bits(b).to_f32())
            .collect(),
        Dtype::Bf16 => u16s(bytes)
            .into_iter()
            .map(|b| half::bf16::from_bits(b).to_f32())
            .collect(),
    }
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn f64s(b: &[u8]) -> Vec<f64> {
    b.chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn u16s(b: &[u8]) -> Vec<u16> {
    b.chunks_exact(2)
        .map(|c| u16::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn bytes_f32(xs: &[f32]) -> Vec<u8> {
    xs.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn bytes_f64(xs: &[f64]) -> Vec<u8> {
    xs.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn bytes_i64(xs: &[i64]) -> Vec<u8> {
    xs.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Distance of two values in units in the last place of `dt` (0: the same bits; a sign of
/// zero or a lone NaN counts as far apart).
fn ulps(dt: Dtype, a: f32, b: f32) -> u64 {
    if a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()) {
        return 0;
    }
    if a.is_nan() || b.is_nan() || a == b {
        return u64::MAX;
    }
    let (ba, bb, sign) = match dt {
        Dtype::F32 => (a.to_bits(), b.to_bits(), 0x8000_0000u32),
        _ => (storage_bits(dt, a), storage_bits(dt, b), 0x8000),
    };
    let ordered = |v: u32| -> i64 {
        let m = (v & (sign - 1)) as i64;
        if v & sign != 0 {
            -m
        } else {
            m
        }
    };
    (ordered(ba) - ordered(bb)).unsigned_abs()
}

/// How closely a kernel must agree with the CPU backend.
#[derive(Debug, Clone, Copy)]
enum Tol {
    Exact,
    /// At most this many units in the last place of the dtype (how many values may differ
    /// at all is checked on the totals of a kernel: [`Diff::at_most`]).
    Ulps(u64),
    /// At most this far apart in absolute value.
    Abs(f32),
}

/// Differences between a kernel's output and the CPU backend's: how many values differ by
/// 1, 2, 3 and more units in the last place of the dtype.
#[derive(Debug, Default, Clone, Copy)]
struct Diff {
    values: usize,
    by_ulps: [usize; 4],
    max_ulps: u64,
}

impl Diff {
    fn add(&mut self, o: Diff) {
        self.values += o.values;
        for (a, b) in self.by_ulps.iter_mut().zip(o.by_ulps) {
            *a += b;
        }
        self.max_ulps = self.max_ulps.max(o.max_ulps);
    }
    fn differing(&self) -> usize {
        self.by_ulps.iter().sum()
    }
    /// Panics when more than the fraction `frac` of the values differ.
    fn at_most(self, what: &str, dt: Dtype, frac: f64) -> Self {
        assert!(
            self.differing() as f64 <= frac * self.values as f64,
            "{what} {dt:?}: {} of {} values differ (more than a fraction {frac})",
            self.differing(),
            self.values
        );
        self
    }
}

fn compare(what: &str, dt: Dtype, got: &[f32], want: &[f32], tol: Tol) -> Diff {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let allowed = |g: f32, w: f32, u: u64| match tol {
        Tol::Exact => u == 0,
        Tol::Ulps(max) => u <= max,
        Tol::Abs(bound) => u == 0 || (g - w).abs() <= bound,
    };
    let mut d = Diff {
        values: got.len(),
        ..Diff::default()
    };
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let u = ulps(dt, g, w);
        assert!(
            allowed(g, w, u),
            "{what}: index {i}: kernel {g:e} ({:#x}), cpu {w:e} ({:#x}): {} ulp",
            storage_bits_lossy(dt, g),
            storage_bits_lossy(dt, w),
            if u == u64::MAX {
                "incomparable".to_string()
            } else {
                u.to_string()
            }
        );
        if u > 0 {
            d.by_ulps[(u.min(4) - 1) as usize] += 1;
            d.max_ulps = d.max_ulps.max(u);
        }
    }
    d
}

/// One unit in the last place of an f32 of magnitude `x` (normal range).
fn f32_ulp(x: f32) -> f32 {
    2f32.powi(x.abs().log2().floor() as i32 - 23)
}

fn storage_bits_lossy(dt: Dtype, x: f32) -> u32 {
    match dt {
        Dtype::F32 => x.to_bits(),
        Dtype::F16 => half::f16::from_f32(x).to_bits() as u32,
        Dtype::Bf16 => half::bf16::from_f32(x).to_bits() as u32,
    }
}

// ---------------------------------------------------------------------------------------------
// Random inputs

struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    /// `n` values uniform in (-scale, scale), rounded to `dt`.
    fn uniform(&mut self, dt: Dtype, n: usize, scale: f64) -> Vec<f32> {
        (0..n)
            .map(|_| dt.round(((2.0 * self.unit() - 1.0) * scale) as f32))
            .collect()
    }
    /// `n` values of random sign and magnitude 2^[lo, hi), rounded to `dt`: wide dynamic
    /// range, so that sums depend on their order.
    fn spread(&mut self, dt: Dtype, n: usize, lo: i32, hi: i32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let e = lo as f64 + self.unit() * (hi - lo) as f64;
                let s = if self.next_u64() & 1 == 0 { 1.0 } else { -1.0 };
                dt.round((s * e.exp2()) as f32)
            })
            .collect()
    }
    /// Random storage bit patterns (any value, NaNs included), as bytes.
    fn storage(&mut self, dt: Dtype, n: usize) -> Vec<u8> {
        let width = if dt == Dtype::F32 { 4 } else { 2 };
        (0..n * width).map(|_| self.next_u64() as u8).collect()
    }
    fn permutation(&mut self, n: usize) -> Vec<i64> {
        let mut p: Vec<i64> = (0..n as i64).collect();
        for i in (1..n).rev() {
            p.swap(i, self.below(i + 1));
        }
        p
    }
}

/// Evaluates `$body` with `$r` the CPU backend's rounding type for the dtype `$dt`.
macro_rules! with_rounding {
    ($dt:expr, $r:ident => $body:expr) => {
        match $dt {
            Dtype::F32 => {
                type $r = RoundF32;
                $body
            }
            Dtype::F16 => {
                type $r = RoundF16;
                $body
            }
            Dtype::Bf16 => {
                type $r = RoundBf16;
                $body
            }
        }
    };
}

fn report(what: &str, dt: Dtype, d: Diff) {
    if d.differing() == 0 {
        println!(
            "{what:<30} {:<5} {:>7} values: exact",
            dtype_name(dt),
            d.values
        );
        return;
    }
    println!(
        "{what:<30} {:<5} {:>7} values: {} differ ({:.3}%): {} by 1 ulp, {} by 2, {} by 3, \
         {} by more (at most {})",
        dtype_name(dt),
        d.values,
        d.differing(),
        100.0 * d.differing() as f64 / d.values.max(1) as f64,
        d.by_ulps[0],
        d.by_ulps[1],
        d.by_ulps[2],
        d.by_ulps[3],
        d.max_ulps
    );
}

// ---------------------------------------------------------------------------------------------
// The emulator itself

#[test]
fn emulator_catches_misuse_of_synchronisation() {
    let Some(exe) = emulator("emulator_catches_misuse_of_synchronisation") else {
        return;
    };
    for (case, expect) in [
        ("ok_warp_primitives", ""),
        ("ok_shared_memory", ""),
        ("divergent_shuffle", "divergent synchronisation in a warp"),
        ("divergent_barrier", "divergent synchronisation in a block"),
        ("exited_lane", "exited while"),
        ("deadlock", "deadlock"),
        (
            "shared_overrun",
            "outside its 16 bytes of dynamic shared memory",
        ),
        ("partial_mask", "mask 0000ffff"),
    ] {
        let out = Command::new(exe)
            .args(["selftest", "-", &format!("case={case}")])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        if expect.is_empty() {
            assert!(out.status.success(), "{case}: {err}");
            assert_eq!(String::from_utf8_lossy(&out.stdout), "ok\n", "{case}");
        } else {
            assert_eq!(out.status.code(), Some(70), "{case}: {err}");
            assert!(err.contains(expect), "{case}: {err}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Conversions (the dtype roundings themselves)

/// f32 values around every rounding boundary of `dt`: each finite value of the dtype, the
/// midpoint to the next one (a tie) and the f32 values either side of that midpoint, with
/// both signs, plus random f32 bit patterns and special values.
fn rounding_probes(dt: Dtype, rng: &mut Rng) -> Vec<f32> {
    let to_f32 = |b: u16| -> f32 {
        match dt {
            Dtype::F16 => half::f16::from_bits(b).to_f32(),
            _ => half::bf16::from_bits(b).to_f32(),
        }
    };
    let inf_bits: u16 = if dt == Dtype::F16 { 0x7c00 } else { 0x7f80 };
    let mut v = Vec::new();
    for b in 0..inf_bits {
        let x = to_f32(b);
        let next = to_f32(b + 1);
        // The tie between x and the next value (past the largest finite value: the next
        // one the exponent range would have).
        let next = if next.is_infinite() {
            2.0 * x as f64 - to_f32(b - 1) as f64
        } else {
            next as f64
        };
        let mid = ((x as f64 + next) / 2.0) as f32;
        assert_eq!(
            mid as f64,
            (x as f64 + next) / 2.0,
            "{b:#06x}: the tie is an f32"
        );
        for y in [
            x,
            mid,
            f32::from_bits(mid.to_bits() - 1),
            f32::from_bits(mid.to_bits() + 1),
        ] {
            v.push(y);
            v.push(-y);
        }
    }
    v.extend([
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MAX,
        f32::MIN_POSITIVE,
        f32::from_bits(1),
        65504.0,
        65519.996,
        65520.0,
        2f32.powi(-24),
        2f32.powi(-25),
        1.5 * 2f32.powi(-25),
        f32::NAN,
        -f32::NAN,
        f32::from_bits(0x7f80_0001),
        f32::from_bits(0xffc0_1234),
    ]);
    v.extend((0..100_000).map(|_| f32::from_bits(rng.next_u64() as u32)));
    v
}

#[test]
fn conversions_round_like_the_half_crate_and_the_cpu_backend() {
    let Some(exe) = emulator("conversions") else {
        return;
    };
    let mut rng = Rng(7);
    for dt in [Dtype::F16, Dtype::Bf16] {
        // to_f32: every bit pattern.
        let all: Vec<u16> = (0..=u16::MAX).collect();
        let bytes: Vec<u8> = all.iter().flat_map(|b| b.to_le_bytes()).collect();
        let out = f32s(
            &Launch::new("to_f32", Some(dt))
                .arg("n", all.len())
                .arg("blocks", 3)
                .input(&bytes)
                .run(exe),
        );
        for (&b, &got) in all.iter().zip(&out) {
            let want = match dt {
                Dtype::F16 => half::f16::from_bits(b).to_f32(),
                _ => half::bf16::from_bits(b).to_f32(),
            };
            if want.is_nan() {
                assert!(got.is_nan(), "to_f32 {dt:?} {b:#06x}: {got}");
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "to_f32 {dt:?} {b:#06x}");
            }
        }
        // from_f32: ties, their neighbours, subnormals, overflow, random values.
        let probes = rounding_probes(dt, &mut rng);
        let out = u16s(
            &Launch::new("from_f32", Some(dt))
                .arg("n", probes.len())
                .arg("blocks", 2)
                .input(&bytes_f32(&probes))
                .run(exe),
        );
        for (&x, &got) in probes.iter().zip(&out) {
            let want = match dt {
                Dtype::F16 => half::f16::from_f32(x).to_bits(),
                _ => half::bf16::from_f32(x).to_bits(),
            };
            if x.is_nan() {
                let back = decode(dt, &got.to_le_bytes());
                assert!(
                    back[0].is_nan(),
                    "from_f32 {dt:?} of NaN {:#x}",
                    x.to_bits()
                );
                if dt == Dtype::Bf16 {
                    assert_eq!(got, want, "from_f32 bf16 of NaN {:#x}", x.to_bits());
                }
                continue;
            }
            assert_eq!(
                got,
                want,
                "from_f32 {dt:?} of {x:e} ({:#010x})",
                x.to_bits()
            );
            // The CPU backend's rounding gives the same value.
            let cpu = dt.round(x);
            assert_eq!(
                decode(dt, &got.to_le_bytes())[0].to_bits(),
                cpu.to_bits(),
                "from_f32 {dt:?} of {x:e} against the CPU backend's rounding"
            );
        }
        println!(
            "conversions {:<5} to_f32: 65536 patterns, from_f32: {} values: exact",
            dtype_name(dt),
            probes.len()
        );
    }
    // f32 storage: both are the identity, bit for bit.
    let xs: Vec<f32> = (0..5000)
        .map(|_| f32::from_bits(rng.next_u64() as u32))
        .collect();
    for kernel in ["from_f32", "to_f32"] {
        let out = Launch::new(kernel, Some(Dtype::F32))
            .arg("n", xs.len())
            .arg("blocks", 2)
            .input(&bytes_f32(&xs))
            .run(exe);
        assert_eq!(out, bytes_f32(&xs), "{kernel} f32");
    }
}

// ---------------------------------------------------------------------------------------------
// RMSNorm

#[test]
fn rmsnorm_matches_the_cpu_backend() {
    let Some(exe) = emulator("rmsnorm") else {
        return;
    };
    let mut rng = Rng(11);
    for dt in Dtype::ALL {
        let mut total = Diff::default();
        for dim in [1, 7, 8, 33, 224, 1792, 4096, 8259] {
            for rows in [1, 5] {
                let x = rng.spread(dt, rows * dim, -6, 3);
                let w = rng.uniform(dt, dim, 2.0);
                let eps = 1e-5f32;
                let out = Launch::new("rmsnorm", Some(dt))
                    .arg("rows", rows)
                    .arg("dim", dim)
                    .f32_arg("eps", eps)
                    .input(&encode(dt, &x))
                    .input(&encode(dt, &w))
                    .seed(dim as u64 * 10 + rows as u64)
                    .run(exe);
                let mut want = vec![0f32; rows * dim];
                with_rounding!(dt, R => cpu::rmsnorm::<R>(&x, &w, &mut want, dim, eps));
                let what = format!("rmsnorm {dt:?} rows {rows} dim {dim}");
                total.add(compare(&what, dt, &decode(dt, &out), &want, Tol::Exact));
            }
        }
        report("rmsnorm", dt, total);
    }
}

// ---------------------------------------------------------------------------------------------
// RoPE

#[test]
fn rope_matches_the_cpu_backend() {
    let Some(exe) = emulator("rope") else {
        return;
    };
    let mut rng = Rng(13);
    let mut case = 0u64;
    for dt in Dtype::ALL {
        let mut total = Diff::default();
        for (seq, hd, n_heads, n_kv, theta, scaled) in [
            (1, 2, 4, 4, 10_000.0, false),
            (3, 6, 8, 2, 500_000.0, true),
            (17, 28, 4, 4, 10_000.0, false),
            (40, 64, 8, 2, 500_000.0, true),
            (40, 2, 8, 2, 10_000.0, false),
            (17, 6, 4, 4, 500_000.0, true),
        ] {
            let params = Params {
                dim: (hd * n_heads) as i64,
                n_heads: n_heads as i64,
                n_kv_heads: n_kv as i64,
                seq_len: seq as i64,
                rope_theta: theta,
                use_scaled_rope: scaled,
                ..Params::default()
            };
            let table = RopeTable::new(&params, dt);
            assert_eq!(table.half, hd / 2);
            let batch = 2;
            // Queries (every position, or the last only) and keys.
            for (rows_per_batch, width) in
                [(seq, n_heads * hd), (1, n_heads * hd), (seq, n_kv * hd)]
            {
                case += 1;
                let rows = batch * rows_per_batch;
                let first_pos = seq - rows_per_batch;
                let x = rng.uniform(dt, rows * width, 4.0);
                let out = Launch::new("rope", Some(dt))
                    .arg("rows", rows)
                    .arg("row_width", width)
                    .arg("head_dim", hd)
                    .arg("rows_per_batch", rows_per_batch)
                    .arg("first_pos", first_pos)
                    .arg("positions", seq)
                    .arg("blocks", 1 + case % 3)
                    .input(&encode(dt, &x))
                    .input(&bytes_f32(&table.cos))
                    .input(&bytes_f32(&table.sin))
                    .seed(case)
                    .run(exe);
                let mut want = x.clone();
                with_rounding!(dt, R => table.apply::<R>(&mut want, width, rows_per_batch, first_pos));
                let what = format!(
                    "rope {dt:?} seq {seq} head_dim {hd} width {width} rows/batch {rows_per_batch}"
                );
                total.add(compare(&what, dt, &decode(dt, &out), &want, Tol::Exact));
            }
        }
        report("rope", dt, total);
    }
}

// ---------------------------------------------------------------------------------------------
// Attention

/// (batch, seq, n_heads, n_kv_heads, head_dim, q_rows_per_batch).
const ATTENTION_SHAPES: &[(usize, usize, usize, usize, usize, usize)] = &[
    (1, 1, 4, 4, 2, 1),
    (2, 3, 4, 4, 6, 3),
    (3, 3, 8, 2, 6, 1),
    (2, 17, 8, 2, 28, 17),
    (2, 17, 4, 4, 64, 1),
    (1, 17, 4, 4, 2, 17),
    (1, 40, 4, 4, 28, 40),
    (2, 40, 8, 2, 64, 40),
    (3, 40, 8, 2, 2, 1),
    (2, 3, 8, 2, 64, 3),
    (1, 40, 8, 2, 6, 40),
    // Four blocks of 32 query rows, the last one partly filled; one kv head for all.
    (1, 100, 4, 1, 6, 100),
    // PARAMS_V2's seq and head_dim: every position (in f32 attention_smem then needs more
    // than the 48 KiB of shared memory a block gets without opting in), and the last layer.
    (1, 256, 2, 2, 28, 256),
    (2, 256, 4, 4, 28, 1),
    // head_dim above the block's 128 threads: each thread owns two output dimensions.
    (1, 40, 2, 2, 200, 40),
    // A last-layer row longer than 48 KiB of f32 scores (12,288 positions less the kernel's
    // own shared memory): the general kernel takes it in chunks when the device cannot opt
    // in further, where a fixed seq * 4 bytes failed at launch.
    (1, 12_300, 2, 1, 4, 1),
];

#[test]
fn attention_matches_the_cpu_backend() {
    let Some(exe) = emulator("attention") else {
        return;
    };
    let mut rng = Rng(17);
    let mut case = 0u64;
    for dt in Dtype::ALL {
        let mut device = [Diff::default(); 2];
        for &(batch, seq, n_heads, n_kv, hd, qr) in ATTENTION_SHAPES {
            case += 1;
            let q = rng.uniform(dt, batch * qr * n_heads * hd, 2.0);
            let k = rng.uniform(dt, batch * seq * n_kv * hd, 2.0);
            let v = rng.uniform(dt, batch * seq * n_kv * hd, 2.0);
            let shape = AttnShape {
                seq,
                n_heads,
                n_kv_heads: n_kv,
                head_dim: hd,
                q_rows_per_batch: qr,
            };
            let mut want = vec![0f32; q.len()];
            with_rounding!(dt, R => cpu::attention::<R>(&q, &k, &v, &mut want, shape));
            // With the device's exp: one ulp of the dtype in a few values; in f32 a last-bit
            // change in a probability can be large next to an output that cancels, so there
            // the bound is absolute, a few f32 ulps of the largest |v| (sum p_j = 1).
            let device_tol = if dt == Dtype::F32 {
                let v_max = v.iter().fold(0f32, |m, x| m.max(x.abs()));
                Tol::Abs(4.0 * f32_ulp(v_max))
            } else {
                Tol::Ulps(1)
            };
            // As launch/attention.rs computes it.
            let scale = (hd as f64).sqrt() as f32;
            // The general kernel with each row in one chunk, as a device with enough shared
            // memory runs it; with the chunks a device gets without opting in
            // (launch/attention.rs's plan), when that is less than the row; and with chunks of
            // a third of the row, so that every shape also walks several chunks (scores
            // computed again, sums carried across chunks); then the shared-memory kernel.
            let planned = match plan(seq, hd, dt, 0) {
                AttnPlan::General { chunk } if chunk < seq => Some(chunk),
                _ => None,
            };
            // (The shared-memory kernel only where some device's blocks hold its keys and
            // values: Hopper's 227 KiB.)
            let smem_fits = matches!(plan(seq, hd, dt, 227 * 1024), AttnPlan::Smem { .. });
            let mut launches = vec![Some(seq)];
            launches.extend(planned.map(Some));
            launches.push(Some(seq.div_ceil(3).max(1)));
            if smem_fits {
                launches.push(None);
            }
            let mut by_kernel: Vec<(String, Vec<f32>)> = Vec::new();
            for chunk in launches {
                let kernel = if chunk.is_some() {
                    "attention"
                } else {
                    "attention_smem"
                };
                for exp in [Exp::Device, Exp::HostExpf] {
                    let mut l = Launch::new(kernel, Some(dt))
                        .arg("batch", batch)
                        .arg("seq", seq)
                        .arg("n_heads", n_heads)
                        .arg("n_kv_heads", n_kv)
                        .arg("head_dim", hd)
                        .arg("q_rows", qr)
                        .f32_arg("scale", scale);
                    l = match chunk {
                        Some(c) => l.arg("chunk", c),
                        None => l.arg("smem", smem_bytes(seq, hd, dt)),
                    };
                    let out = l
                        .input(&encode(dt, &q))
                        .input(&encode(dt, &k))
                        .input(&encode(dt, &v))
                        .exp(exp)
                        .seed(case)
                        .run(exe);
                    let got = decode(dt, &out);
                    let what = format!(
                        "{kernel} {dt:?} batch {batch} seq {seq} heads {n_heads}/{n_kv} \
                         head_dim {hd} q_rows {qr} chunk {chunk:?} exp {exp:?}"
                    );
                    match exp {
                        Exp::HostExpf => {
                            compare(&what, dt, &got, &want, Tol::Exact);
                        }
                        Exp::Device => {
                            let which = usize::from(chunk.is_none());
                            device[which].add(compare(&what, dt, &got, &want, device_tol));
                            by_kernel.push((what, got));
                        }
                    }
                }
            }
            // Every launch computes the same thing in the same order.
            for (what, got) in &by_kernel[1..] {
                let what = format!("{what} against {}", by_kernel[0].0);
                compare(&what, dt, got, &by_kernel[0].1, Tol::Exact);
            }
        }
        // The fraction of values that an exponential one f32 ulp off reaches.
        let frac = if dt == Dtype::F32 { 0.01 } else { 0.005 };
        report(
            "attention (exp: device)",
            dt,
            device[0].at_most("attention", dt, frac),
        );
        report(
            "attention_smem (exp: device)",
            dt,
            device[1].at_most("attention_smem", dt, frac),
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Elementwise

const ELEMENTWISE_LENGTHS: &[usize] = &[1, 7, 255, 256, 257, 1000, 4099, 70_001];

#[test]
fn silu_mul_and_add_match_the_cpu_backend() {
    let Some(exe) = emulator("silu_mul / add") else {
        return;
    };
    let mut rng = Rng(19);
    let mut case = 0u64;
    for dt in Dtype::ALL {
        let mut silu = Diff::default();
        let mut add = Diff::default();
        for &n in ELEMENTWISE_LENGTHS {
            case += 1;
            let blocks = 1 + case % 3;
            // silu: mostly moderate arguments, some where exp under- or overflows.
            let a: Vec<f32> = (0..n)
                .map(|i| {
                    let s = if i % 50 == 0 { 120.0 } else { 12.0 };
                    dt.round(((2.0 * rng.unit() - 1.0) * s) as f32)
                })
                .collect();
            let b = rng.uniform(dt, n, 3.0);
            let mut want = a.clone();
            with_rounding!(dt, R => cpu::silu_mul::<R>(&mut want, &b));
            for exp in [Exp::Device, Exp::HostExpf] {
                let out = Launch::new("silu_mul", Some(dt))
                    .arg("n", n)
                    .arg("blocks", blocks)
                    .input(&encode(dt, &a))
                    .input(&encode(dt, &b))
                    .exp(exp)
                    .seed(case)
                    .run(exe);
                let what = format!("silu_mul {dt:?} n {n} exp {exp:?}");
                let tol = match exp {
                    // x / (1 + e) moves by up to two f32 ulps when e does by one.
                    Exp::Device if dt == Dtype::F32 => Tol::Ulps(2),
                    Exp::Device => Tol::Ulps(1),
                    Exp::HostExpf => Tol::Exact,
                };
                let d = compare(&what, dt, &decode(dt, &out), &want, tol);
                if exp == Exp::Device {
                    silu.add(d);
                }
            }
            // add: wide dynamic range (cancellation, ties), and for f16 sums past 65504.
            let mut x = rng.spread(dt, n, -20, 14);
            let y = rng.spread(dt, n, -20, 14);
            for i in (0..n).step_by(97) {
                x[i] = -y[i];
            }
            let out = Launch::new("add", Some(dt))
                .arg("n", n)
                .arg("blocks", blocks)
                .input(&encode(dt, &x))
                .input(&encode(dt, &y))
                .seed(case)
                .run(exe);
            let mut want = x.clone();
            with_rounding!(dt, R => cpu::add_round::<R>(&mut want, &y));
            let what = format!("add {dt:?} n {n}");
            add.add(compare(&what, dt, &decode(dt, &out), &want, Tol::Exact));
        }
        report(
            "silu_mul (exp: device)",
            dt,
            silu.at_most("silu_mul", dt, 0.005),
        );
        report("add", dt, add);
    }
}

// ---------------------------------------------------------------------------------------------
// Copies: gather_rows, fill

#[test]
fn gather_rows_and_fill_copy_exactly() {
    let Some(exe) = emulator("gather_rows / fill") else {
        return;
    };
    let mut rng = Rng(23);
    let mut case = 0u64;
    for dt in Dtype::ALL {
        let width_bytes = if dt == Dtype::F32 { 4 } else { 2 };
        for (rows, width, stride) in [
            (1, 1, 1),
            (1, 7, 7),
            (5, 33, 40),
            (3, 224, 224 * 17),
            (33, 8, 9),
            (4, 1792, 1792 * 3),
        ] {
            case += 1;
            let src = rng.storage(dt, (rows - 1) * stride + width);
            let out = Launch::new("gather_rows", Some(dt))
                .arg("rows", rows)
                .arg("width", width)
                .arg("src_stride", stride)
                .arg("blocks", 1 + case % 3)
                .input(&src)
                .run(exe);
            let mut want = Vec::new();
            for r in 0..rows {
                let at = r * stride * width_bytes;
                want.extend_from_slice(&src[at..at + width * width_bytes]);
            }
            assert!(out == want, "gather_rows {dt:?} rows {rows} width {width}");
        }
        // Fill: slices chosen by PoolSlice::new from random hashes, and the edge cases.
        for (pool_size, numel) in [
            (1, 1),
            (1, 9),
            (7, 3),
            (7, 7),
            (7, 50),
            (129, 1000),
            (1000, 129),
            (1000, 3000),
            (1000, 2500),
            (8196, 70_001),
        ] {
            let pool = rng.storage(dt, pool_size);
            let mut slices = vec![PoolSlice::new(
                rng.next_u64(),
                numel as u64,
                pool_size as u64,
            )];
            if numel <= pool_size {
                slices.push(PoolSlice::Direct { start: 0 });
                slices.push(PoolSlice::Direct {
                    start: (pool_size - numel) as u64,
                });
            } else {
                slices.push(PoolSlice::Tiled { shift: 0 });
                slices.push(PoolSlice::Tiled {
                    shift: numel as u64 - 1,
                });
            }
            for slice in slices {
                case += 1;
                let l = match slice {
                    PoolSlice::Direct { start } => {
                        Launch::new("fill_direct", Some(dt)).arg("start", start)
                    }
                    PoolSlice::Tiled { shift } => {
                        Launch::new("fill_tiled", Some(dt)).arg("shift", shift)
                    }
                };
                let out = l
                    .arg("pool_size", pool_size)
                    .arg("numel", numel)
                    .arg("blocks", 1 + case % 3)
                    .input(&pool)
                    .run(exe);
                // PoolSlice::fill over the storage values.
                let want: Vec<u8> = if dt == Dtype::F32 {
                    let p: Vec<u32> = pool
                        .chunks_exact(4)
                        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
                        .collect();
                    let mut o = vec![0u32; numel];
                    slice.fill(&p, &mut o);
                    o.iter().flat_map(|v| v.to_le_bytes()).collect()
                } else {
                    let p = u16s(&pool);
                    let mut o = vec![0u16; numel];
                    slice.fill(&p, &mut o);
                    o.iter().flat_map(|v| v.to_le_bytes()).collect()
                };
                assert!(
                    out == want,
                    "{slice:?} {dt:?} pool {pool_size} numel {numel}"
                );
            }
        }
    }
    println!("gather_rows, fill_direct, fill_tiled: every dtype, byte for byte");
}

// ---------------------------------------------------------------------------------------------
// The tail: gather by permutation, distance, r_target filter

#[test]
fn tail_matches_proof_distance() {
    let Some(exe) = emulator("tail") else {
        return;
    };
    let mut rng = Rng(29);
    let mut case = 0u64;
    let mut nonces = 0;
    for dt in Dtype::ALL {
        // The last length is the one whose pairwise sum goes deepest of all up to the vocab
        // limit: it fills the kernel's stack to the last level.
        for (batch, vocab) in [
            (1, 1),
            (3, 7),
            (33, 7),
            (2, 129),
            (5, 1000),
            (3, 8196),
            (1, 983_049),
        ] {
            case += 1;
            let logits = rng.uniform(dt, batch * vocab, 12.0);
            let perm: Vec<i64> = (0..batch).flat_map(|_| rng.permutation(vocab)).collect();
            let o = f32s(
                &Launch::new("tail_gather", Some(dt))
                    .arg("batch", batch)
                    .arg("vocab", vocab)
                    .arg("blocks", 1 + case % 3)
                    .input(&encode(dt, &logits))
                    .input(&bytes_i64(&perm))
                    .run(exe),
            );
            for b in 0..batch {
                for j in 0..vocab {
                    let want = logits[b * vocab + perm[b * vocab + j] as usize];
                    assert_eq!(
                        o[b * vocab + j].to_bits(),
                        want.to_bits(),
                        "tail_gather {dt:?} batch {batch} vocab {vocab} at ({b}, {j})"
                    );
                }
            }
            let mut target: Vec<f64> = (0..vocab).map(|_| rng.unit() * 2.0 - 1.0).collect();
            let norm = target.iter().map(|t| t * t).sum::<f64>().sqrt();
            target.iter_mut().for_each(|t| *t /= norm);
            let dist = f64s(
                &Launch::new("tail_distance", None)
                    .arg("batch", batch)
                    .arg("vocab", vocab)
                    .input(&bytes_f32(&o))
                    .input(&bytes_f64(&target))
                    .run(exe),
            );
            for b in 0..batch {
                let row = &logits[b * vocab..(b + 1) * vocab];
                let want = proof::distance(row, &perm[b * vocab..(b + 1) * vocab], &target);
                assert_eq!(
                    dist[b].to_bits(),
                    want.to_bits(),
                    "tail_distance {dt:?} batch {batch} vocab {vocab} nonce {b}: {} vs {want}",
                    dist[b]
                );
            }
            nonces += batch;
        }
    }
    println!("tail_gather, tail_distance: {nonces} nonces, bit for bit");
}

#[test]
fn tail_filter_keeps_exactly_the_valid_nonces_in_order() {
    let Some(exe) = emulator("tail_filter") else {
        return;
    };
    let mut rng = Rng(31);
    let mut case = 0u64;
    for batch in [1, 3, 31, 32, 33, 64, 65, 100] {
        let base: Vec<f64> = (0..batch).map(|_| 1.0 + rng.unit()).collect();
        let r_mid = 1.5;
        // Mixed, with ties at r_target (not valid: the test is strict).
        let mut ties = base.clone();
        for i in (0..batch).step_by(3) {
            ties[i] = r_mid;
        }
        for (dist, r_target) in [
            (base.clone(), r_mid),
            (ties, r_mid),
            (base.clone(), 0.5),           // none valid
            (base.clone(), 2.5),           // all valid
            (vec![r_mid; batch], r_mid),   // all tied: none valid
            (base.clone(), f64::INFINITY), // all valid
        ] {
            case += 1;
            let out = Launch::new("tail_filter", None)
                .arg("batch", batch)
                .f64_arg("r_target", r_target)
                .input(&bytes_f64(&dist))
                .seed(case)
                .run(exe);
            let count = i32::from_le_bytes(out[..4].try_into().unwrap()) as usize;
            let index: Vec<i32> = out[4..4 + 4 * batch]
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            let valid = f64s(&out[4 + 4 * batch..]);
            let want: Vec<usize> = (0..batch)
                .filter(|&b| proof::is_valid(dist[b], r_target))
                .collect();
            let what = format!("tail_filter batch {batch} r_target {r_target}");
            assert_eq!(count, want.len(), "{what}: count");
            for (slot, &b) in want.iter().enumerate() {
                assert_eq!(index[slot], b as i32, "{what}: index {slot}");
                assert_eq!(
                    valid[slot].to_bits(),
                    dist[b].to_bits(),
                    "{what}: dist {slot}"
                );
            }
        }
    }
    println!("tail_filter: {case} cases, exact");
}

// ---------------------------------------------------------------------------------------------
// FP8 quantisation

/// The value of an E4M3 ("FN") code: bias 7, 3 mantissa bits, subnormals below 2^-6, no
/// infinity; S.1111.111 is NaN.
fn e4m3_value(code: u8) -> f32 {
    let sign = if code & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let e = ((code >> 3) & 0xf) as i32;
    let m = (code & 7) as f32;
    if e == 15 && code & 7 == 7 {
        return f32::NAN;
    }
    if e == 0 {
        sign * m * 2f32.powi(-9)
    } else {
        sign * (1.0 + m / 8.0) * 2f32.powi(e - 7)
    }
}

/// E4M3 of `x` by search over every code: the nearest value, ties to the even code, anything
/// beyond 448 saturated to +-448. An independent reference for the kernels' conversion.
fn e4m3_reference(x: f32) -> u8 {
    if x.is_nan() {
        return 0x7f;
    }
    let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
    let a = x.abs().min(448.0) as f64;
    let mut best = 0u8;
    let mut best_d = f64::INFINITY;
    for code in 0u8..0x7f {
        let d = (e4m3_value(code) as f64 - a).abs();
        if d < best_d || (d == best_d && code & 1 == 0) {
            best = code;
            best_d = d;
        }
    }
    sign | best
}

#[test]
fn e4m3_reference_round_trips_every_code() {
    for code in 0u8..=255 {
        if code & 0x7f == 0x7f {
            continue;
        }
        let v = e4m3_value(code);
        // -0 comes back as -0 (code 0x80), every other value as itself.
        assert_eq!(e4m3_reference(v), code, "{code:#04x} = {v}");
    }
    assert_eq!(e4m3_reference(1000.0), 0x7e);
    assert_eq!(e4m3_reference(-f32::INFINITY), 0xfe);
    // Halfway between 1.0 and 1.125: to the even code (1.0); between 1.125 and 1.25: 1.25.
    assert_eq!(e4m3_reference(1.0625), 0x38);
    assert_eq!(e4m3_reference(1.1875), 0x3a);
}

#[test]
fn fp8_quantisation_matches_an_independent_reference() {
    let Some(exe) = emulator("quantize_e4m3") else {
        return;
    };
    let mut rng = Rng(89);
    let mut case = 0u64;
    for dt in Dtype::ALL {
        for (rows, width, stride, scale) in [
            (1, 1, 1, 1.0f64),
            (1, 16, 16, 0.02),
            (3, 33, 40, 3.0),
            (5, 224, 224 * 3, 0.5),
            (2, 1792, 1792, 40.0),
            (4, 100, 100, 0.0), // an all-zero tensor: scale 1, every code 0
        ] {
            case += 1;
            let n = (rows - 1) * stride + width;
            let mut values = rng.uniform(dt, n, scale.max(1e-30));
            if scale == 0.0 {
                values.iter_mut().for_each(|v| *v = 0.0);
            }
            let out = Launch::new("quantize_e4m3", Some(dt))
                .arg("rows", rows)
                .arg("width", width)
                .arg("stride", stride)
                .arg("blocks", 1 + case % 3)
                .input(&encode(dt, &values))
                .run(exe);
            let (codes, rest) = out.split_at(rows * width);
            let got_scale = f32::from_le_bytes(rest[0..4].try_into().unwrap());
            let got_amax = u32::from_le_bytes(rest[4..8].try_into().unwrap());
            // The tensor's rows only: what lies between them is not part of it.
            let elems: Vec<f32> = (0..rows)
                .flat_map(|r| values[r * stride..r * stride + width].iter().copied())
                .collect();
            let amax = elems.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert_eq!(got_amax, amax.to_bits(), "{dt:?} {rows}x{width}: amax");
            let want_scale = if amax > 0.0 { amax / 448.0 } else { 1.0 };
            assert_eq!(got_scale.to_bits(), want_scale.to_bits(), "{dt:?}: scale");
            for (i, (&c, &v)) in codes.iter().zip(&elems).enumerate() {
                assert_eq!(
                    c,
                    e4m3_reference(v / want_scale),
                    "{dt:?} {rows}x{width} value {i}: {v} / {want_scale}"
                );
            }
            // The largest magnitude maps to 448 (or just below, by the division's rounding).
            if amax > 0.0 {
                let top = codes.iter().map(|c| c & 0x7f).max().unwrap();
                assert!(top == 0x7e || top == 0x7d, "{dt:?}: top code {top:#x}");
            }
        }
    }
    println!("quantize_e4m3: amax, scale and every code exact in every dtype");
}

#[test]
fn silu_mul_amax_writes_what_silu_mul_writes_and_its_largest_magnitude() {
    let Some(exe) = emulator("silu_mul_amax") else {
        return;
    };
    let mut rng = Rng(97);
    let mut case = 0u64;
    for dt in Dtype::ALL {
        for &n in ELEMENTWISE_LENGTHS {
            case += 1;
            let a = rng.uniform(dt, n, 12.0);
            let b = rng.uniform(dt, n, 3.0);
            let run = |kernel: &'static str| {
                Launch::new(kernel, Some(dt))
                    .arg("n", n)
                    .arg("blocks", 1 + case % 3)
                    .input(&encode(dt, &a))
                    .input(&encode(dt, &b))
                    .seed(case)
                    .run(exe)
            };
            let plain = run("silu_mul");
            let fused = run("silu_mul_amax");
            let width = if dt == Dtype::F32 { 4 } else { 2 };
            let (values, amax) = fused.split_at(n * width);
            // The same values, bit for bit, as the unfused kernel.
            assert!(
                values == plain.as_slice(),
                "silu_mul_amax {dt:?} n {n}: values"
            );
            let want = decode(dt, values).iter().fold(0f32, |m, v| m.max(v.abs()));
            let got = u32::from_le_bytes(amax.try_into().unwrap());
            assert_eq!(got, want.to_bits(), "silu_mul_amax {dt:?} n {n}: maximum");
        }
    }
    println!("silu_mul_amax: silu_mul's values and their exact maximum in every dtype");
}
