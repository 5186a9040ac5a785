//! What the CPU benches share: a cheap deterministic fill, and timing by the wall clock and
//! by the CPU time of all threads (on a shared machine the CPU time moves far less with other
//! load than the wall clock does).

use llama_pow::pow::dtype::Dtype;
use llama_pow::splitmix::SplitMix64;
use std::time::{Duration, Instant};

/// `n` values uniform in [-half_width, half_width), rounded to `dtype`: inputs for timing
/// need not be the protocol's, only of the right magnitude.
pub fn uniform(n: usize, half_width: f32, dtype: Dtype, seed: u64) -> Vec<f32> {
    let mut g = SplitMix64(seed);
    (0..n)
        .map(|_| dtype.round((2.0 * g.unit() as f32 - 1.0) * half_width))
        .collect()
}

/// CPU time this process has used (all threads), in seconds.
fn cpu_seconds() -> f64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes one rusage into the pointer, which is valid and sized for it;
    // a zeroed rusage is a valid value of the type whatever the call does.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
        usage.assume_init()
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// How often a timed call ran, and the wall and CPU seconds all the calls took.
pub struct Timed {
    pub calls: u32,
    pub wall: f64,
    pub cpu: f64,
}

impl Timed {
    pub fn wall_per_call(&self) -> f64 {
        self.wall / f64::from(self.calls)
    }

    pub fn cpu_per_call(&self) -> f64 {
        self.cpu / f64::from(self.calls)
    }
}

/// Call `f` once untimed (thread pool, first touch of buffers), then as often as fits in
/// about `budget`, at least once.
pub fn time(budget: Duration, mut f: impl FnMut()) -> Timed {
    f();
    let start = Instant::now();
    let cpu = cpu_seconds();
    let mut calls = 0u32;
    while calls == 0 || start.elapsed() < budget {
        f();
        calls += 1;
    }
    Timed {
        calls,
        wall: start.elapsed().as_secs_f64(),
        cpu: cpu_seconds() - cpu,
    }
}
