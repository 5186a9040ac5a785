//! Bit-exact equivalents of the numpy random streams the protocol is defined by:
//! `Generator(PCG64(SeedSequence(entropy)))` with `standard_normal`, `normal` and
//! `permutation` (numpy 2.x semantics).
//!
//! - [`seed_sequence_state_u64`]: `SeedSequence(entropy).generate_state(n, uint64)`.
//! - [`Pcg64`]: the 128-bit LCG with the XSL-RR output function, seeded from four
//!   SeedSequence words, including numpy's buffered 32-bit draws and `advance`.
//! - [`Generator`]: numpy's 256-layer ziggurat for normals (fast path, wedges and the
//!   tail beyond R), and the masked-rejection Fisher-Yates shuffle behind `permutation`.
//! - [`fill_normal_parallel`] / [`fill_standard_normal_parallel`]: the first n (mapped)
//!   normals of a fresh stream, computed on all rayon threads and equal bit for bit to the
//!   sequential stream.
//!
//! Parallel fill: a normal takes one u64 draw on the fast path and more on the rare wedge
//! and tail paths, so a thread that starts at an arbitrary offset of the u64 stream (reached
//! with `advance`) does not know whether it stands on a sample boundary. Chains of sample
//! boundaries started at different offsets merge within a few samples, though: each chunk
//! records its first K boundaries, the chunk before it runs on past its own end until it
//! lands on one of them, and the later chunk's samples before that merge point are dropped.
//! A chunk that finds no merge ends its round there instead, so the result is exact in every
//! case (details on `fill_mapped_parallel`).

use rayon::prelude::*;

// ---------------------------------------------------------------------------------------
// SeedSequence
// ---------------------------------------------------------------------------------------

/// Number of 32-bit words in SeedSequence's entropy pool.
const POOL_SIZE: usize = 4;
const INIT_A: u32 = 0x43b0_d7e5;
const MULT_A: u32 = 0x931e_8875;
const INIT_B: u32 = 0x8b51_f9dd;
const MULT_B: u32 = 0x58f3_8ded;
const MIX_MULT_L: u32 = 0xca01_f9dd;
const MIX_MULT_R: u32 = 0x4973_f715;
const XSHIFT: u32 = 16;

/// One step of SeedSequence's multiplicative hash; `hash_const` evolves with every call.
#[inline]
fn hashmix(value: u32, hash_const: &mut u32) -> u32 {
    let mut v = value ^ *hash_const;
    *hash_const = hash_const.wrapping_mul(MULT_A);
    v = v.wrapping_mul(*hash_const);
    v ^ (v >> XSHIFT)
}

#[inline]
fn mix(x: u32, y: u32) -> u32 {
    let r = MIX_MULT_L
        .wrapping_mul(x)
        .wrapping_sub(MIX_MULT_R.wrapping_mul(y));
    r ^ (r >> XSHIFT)
}

/// SeedSequence's entropy pool after mixing in `entropy` (no spawn key).
pub fn seed_sequence_pool(entropy: &[u32]) -> [u32; POOL_SIZE] {
    let mut hash_const = INIT_A;
    let mut pool = [0u32; POOL_SIZE];
    for (i, slot) in pool.iter_mut().enumerate() {
        *slot = hashmix(entropy.get(i).copied().unwrap_or(0), &mut hash_const);
    }
    for src in 0..POOL_SIZE {
        for dst in 0..POOL_SIZE {
            if src != dst {
                let h = hashmix(pool[src], &mut hash_const);
                pool[dst] = mix(pool[dst], h);
            }
        }
    }
    for &word in entropy.iter().skip(POOL_SIZE) {
        for slot in pool.iter_mut() {
            let h = hashmix(word, &mut hash_const);
            *slot = mix(*slot, h);
        }
    }
    pool
}

/// `SeedSequence(entropy).generate_state(n_words, uint32)`.
pub fn seed_sequence_state_u32(entropy: &[u32], n_words: usize) -> Vec<u32> {
    let pool = seed_sequence_pool(entropy);
    let mut hash_const = INIT_B;
    (0..n_words)
        .map(|i| {
            let mut v = pool[i % POOL_SIZE] ^ hash_const;
            hash_const = hash_const.wrapping_mul(MULT_B);
            v = v.wrapping_mul(hash_const);
            v ^ (v >> XSHIFT)
        })
        .collect()
}

/// `SeedSequence(entropy).generate_state(n_words, uint64)`: pairs of 32-bit words, the
/// first of each pair being the low half.
pub fn seed_sequence_state_u64(entropy: &[u32], n_words: usize) -> Vec<u64> {
    seed_sequence_state_u32(entropy, 2 * n_words)
        .chunks_exact(2)
        .map(|p| u64::from(p[0]) | (u64::from(p[1]) << 32))
        .collect()
}

// ---------------------------------------------------------------------------------------
// PCG64
// ---------------------------------------------------------------------------------------

/// PCG's default 128-bit LCG multiplier.
const PCG_MULT: u128 = 0x2360_ed05_1fc6_5da4_4385_df64_9fcc_f645;

/// The bare LCG and its output function. It is `Copy` so that hot loops keep it in registers
/// (the cold ziggurat paths take and return it by value rather than by reference).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Lcg {
    state: u128,
    inc: u128,
}

impl Lcg {
    #[inline(always)]
    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_mul(PCG_MULT).wrapping_add(self.inc);
        let hi = (self.state >> 64) as u64;
        let lo = self.state as u64;
        (hi ^ lo).rotate_right((self.state >> 122) as u32)
    }

    #[inline(always)]
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / 9_007_199_254_740_992.0)
    }
}

/// numpy's `PCG64` bit generator: a 128-bit LCG whose 64-bit outputs are the XSL-RR
/// permutation of the state after each step, plus the one-word buffer behind 32-bit draws.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pcg64 {
    lcg: Lcg,
    /// Whether `buffered` holds the high half of the last u64 split for 32-bit draws.
    has_u32: bool,
    buffered: u32,
}

impl Pcg64 {
    /// PCG's `srandom`: the increment is `2 * initseq + 1`; the state is stepped, offset by
    /// `initstate` and stepped again.
    pub fn from_state_and_seq(initstate: u128, initseq: u128) -> Self {
        let mut g = Pcg64 {
            lcg: Lcg {
                state: 0,
                inc: (initseq << 1) | 1,
            },
            has_u32: false,
            buffered: 0,
        };
        g.lcg.next_u64();
        g.lcg.state = g.lcg.state.wrapping_add(initstate);
        g.lcg.next_u64();
        g
    }

    /// numpy's seeding from four SeedSequence words: words 0 and 1 are the high and low
    /// halves of the initial state, words 2 and 3 those of the stream selector.
    pub fn from_seed_words(words: [u64; 4]) -> Self {
        let initstate = (u128::from(words[0]) << 64) | u128::from(words[1]);
        let initseq = (u128::from(words[2]) << 64) | u128::from(words[3]);
        Self::from_state_and_seq(initstate, initseq)
    }

    /// `PCG64(SeedSequence(entropy))`.
    pub fn from_entropy(entropy: &[u32]) -> Self {
        let w = seed_sequence_state_u64(entropy, 4);
        Self::from_seed_words([w[0], w[1], w[2], w[3]])
    }

    /// The next raw 64-bit output.
    #[inline(always)]
    pub fn next_u64(&mut self) -> u64 {
        self.lcg.next_u64()
    }

    /// numpy's 32-bit draw: the low half of a fresh u64, whose high half is kept and handed
    /// out by the following call.
    #[inline]
    pub fn next_u32(&mut self) -> u32 {
        if self.has_u32 {
            self.has_u32 = false;
            return self.buffered;
        }
        let v = self.next_u64();
        self.has_u32 = true;
        self.buffered = (v >> 32) as u32;
        v as u32
    }

    /// A double in [0, 1) from the top 53 bits of the next u64.
    #[inline(always)]
    pub fn next_f64(&mut self) -> f64 {
        self.lcg.next_f64()
    }

    /// Jump ahead as if `delta` u64 draws had been made (O(log delta)); like numpy, this
    /// also drops a buffered 32-bit half.
    pub fn advance(&mut self, delta: u128) {
        let mut acc_mult: u128 = 1;
        let mut acc_plus: u128 = 0;
        let mut cur_mult = PCG_MULT;
        let mut cur_plus = self.lcg.inc;
        let mut d = delta;
        while d > 0 {
            if d & 1 == 1 {
                acc_mult = acc_mult.wrapping_mul(cur_mult);
                acc_plus = acc_plus.wrapping_mul(cur_mult).wrapping_add(cur_plus);
            }
            cur_plus = cur_mult.wrapping_add(1).wrapping_mul(cur_plus);
            cur_mult = cur_mult.wrapping_mul(cur_mult);
            d >>= 1;
        }
        self.lcg.state = acc_mult.wrapping_mul(self.lcg.state).wrapping_add(acc_plus);
        self.has_u32 = false;
        self.buffered = 0;
    }

    /// The raw LCG state and increment (numpy's `state["state"]`).
    pub fn raw_state(&self) -> (u128, u128) {
        (self.lcg.state, self.lcg.inc)
    }

    /// A uniform integer in `[0, max]` by masked rejection (numpy's `random_interval`):
    /// 32-bit draws while `max` fits in 32 bits, 64-bit draws beyond.
    #[inline]
    pub fn random_interval(&mut self, max: u64) -> u64 {
        if max == 0 {
            return 0;
        }
        let mask = u64::MAX >> max.leading_zeros();
        if max <= u64::from(u32::MAX) {
            loop {
                let v = u64::from(self.next_u32()) & mask;
                if v <= max {
                    return v;
                }
            }
        } else {
            loop {
                let v = self.next_u64() & mask;
                if v <= max {
                    return v;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Ziggurat
// ---------------------------------------------------------------------------------------

/// Right edge of the base layer of the 256-layer normal ziggurat.
const ZIG_R: f64 = 3.654_152_885_361_009;
/// 1 / ZIG_R, as numpy rounds it.
const ZIG_INV_R: f64 = 0.273_661_237_329_758_3;
const MANTISSA_52: u64 = 0x000f_ffff_ffff_ffff;

// numpy's tables (generated, in their own file) and the KI / WI pairs built from them.
use super::ziggurat_tables::{FI, KI, WI};

/// KI and WI side by side, so that the fast path reads one cache line per sample.
static KW: [(u64, f64); 256] = {
    let mut t = [(0u64, 0f64); 256];
    let mut i = 0;
    while i < 256 {
        t[i] = (KI[i], WI[i]);
        i += 1;
    }
    t
};

/// One standard normal, numpy's ziggurat; `draws` is increased by the number of u64 draws
/// it consumed (1 on the fast path taken 98.8% of the time).
#[inline(always)]
fn standard_normal_counted(rng: &mut Lcg, draws: &mut u64) -> f64 {
    loop {
        let r = rng.next_u64();
        *draws += 1;
        let idx = (r & 0xff) as usize;
        let r = r >> 8;
        let rabs = (r >> 1) & MANTISSA_52;
        // rabs < 2^52, so the signed conversion is exact (and cheaper than the unsigned one).
        // Negation as a sign-bit flip (also for 0.0), without a data-dependent branch.
        let (k, w) = KW[idx];
        let x = f64::from_bits(((rabs as i64) as f64 * w).to_bits() ^ ((r & 1) << 63));
        if rabs < k {
            return x;
        }
        let slow = ziggurat_slow(*rng, idx, rabs, x);
        *rng = slow.rng;
        *draws += slow.draws;
        if let Some(v) = slow.value {
            return v;
        }
    }
}

/// What a rare path did: the stream after it, the extra draws it took, and the sample
/// (`None`: rejected, the caller starts over with a fresh draw).
struct SlowPath {
    rng: Lcg,
    draws: u64,
    value: Option<f64>,
}

/// The rare paths: the tail beyond R for layer 0, the wedge test otherwise.
#[cold]
#[inline(never)]
fn ziggurat_slow(mut rng: Lcg, idx: usize, rabs: u64, x: f64) -> SlowPath {
    if idx == 0 {
        let mut draws = 0;
        loop {
            // 1 - U rather than U keeps the logarithms finite.
            let xx = -ZIG_INV_R * (-rng.next_f64()).ln_1p();
            let yy = -(-rng.next_f64()).ln_1p();
            draws += 2;
            if yy + yy > xx * xx {
                let v = if (rabs >> 8) & 1 == 1 {
                    -(ZIG_R + xx)
                } else {
                    ZIG_R + xx
                };
                return SlowPath {
                    rng,
                    draws,
                    value: Some(v),
                };
            }
        }
    } else {
        let u = rng.next_f64();
        let accept = (FI[idx - 1] - FI[idx]) * u + FI[idx] < (-0.5 * x * x).exp();
        SlowPath {
            rng,
            draws: 1,
            value: accept.then_some(x),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Generator
// ---------------------------------------------------------------------------------------

/// numpy's `Generator` over [`Pcg64`], for the distributions the protocol uses.
#[derive(Clone, Debug)]
pub struct Generator {
    bitgen: Pcg64,
}

impl Generator {
    /// `default_rng(SeedSequence(entropy))`.
    pub fn from_entropy(entropy: &[u32]) -> Self {
        Generator {
            bitgen: Pcg64::from_entropy(entropy),
        }
    }

    pub fn from_bit_generator(bitgen: Pcg64) -> Self {
        Generator { bitgen }
    }

    pub fn bit_generator(&mut self) -> &mut Pcg64 {
        &mut self.bitgen
    }

    /// `standard_normal()`.
    #[inline]
    pub fn standard_normal(&mut self) -> f64 {
        let mut draws = 0;
        standard_normal_counted(&mut self.bitgen.lcg, &mut draws)
    }

    /// `normal(loc, scale)` = `loc + scale * standard_normal()`.
    #[inline]
    pub fn normal(&mut self, loc: f64, scale: f64) -> f64 {
        loc + scale * self.standard_normal()
    }

    /// `standard_normal(out.len())`, in order.
    pub fn fill_standard_normal(&mut self, out: &mut [f64]) {
        fill_sequential(&mut self.bitgen, out, &|z| z);
    }

    /// `normal(loc, scale, out.len())`, in order.
    pub fn fill_normal(&mut self, loc: f64, scale: f64, out: &mut [f64]) {
        fill_sequential(&mut self.bitgen, out, &|z| loc + scale * z);
    }

    /// `standard_normal(n)` as a vector.
    pub fn standard_normal_vec(&mut self, n: usize) -> Vec<f64> {
        let mut v = vec![0.0; n];
        self.fill_standard_normal(&mut v);
        v
    }

    /// `shuffle(items)`: Fisher-Yates from the last index down to 1, each partner drawn by
    /// masked rejection.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.bitgen.random_interval(i as u64) as usize;
            items.swap(i, j);
        }
    }

    /// `permutation(n)`: `arange(n)` shuffled.
    pub fn permutation(&mut self, n: usize) -> Vec<i64> {
        let mut items: Vec<i64> = (0..n as i64).collect();
        self.shuffle(&mut items);
        items
    }
}

// ---------------------------------------------------------------------------------------
// Parallel fill
// ---------------------------------------------------------------------------------------

/// How [`fill_normal_parallel_with`] cuts the work; [`ParallelPlan::default`] is what
/// [`fill_normal_parallel`] uses. Exposed for tests that force many merges and fallbacks.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParallelPlan {
    /// Chunks per round (spread over the rayon threads).
    pub chunks: usize,
    /// Most u64 draws one chunk covers.
    pub chunk_draws: u64,
    /// K: how many leading sample boundaries each chunk records for the merge.
    pub probe: usize,
    /// Below this many samples still to make, the rest is drawn sequentially.
    pub sequential_below: usize,
}

impl Default for ParallelPlan {
    /// Two chunks per thread (some slack for uneven threads) of 128 Ki draws: the per-chunk
    /// buffers stay small (cache-sized for 16-bit outputs) and a round costs milliseconds,
    /// so its two fork-joins are noise. Timings were flat from 64 Ki to 1 Mi draws.
    fn default() -> Self {
        ParallelPlan {
            chunks: 2 * rayon::current_num_threads().max(1),
            chunk_draws: 1 << 17,
            probe: 4096,
            sequential_below: 1 << 15,
        }
    }
}

/// The first `out.len()` values of `normal(loc, scale)` from a fresh generator seeded with
/// `entropy`, each mapped through `map` (e.g. f64 -> f32 -> f16), computed on all rayon
/// threads. Equal to the sequential result bit for bit.
pub fn fill_normal_parallel<T: Send + Sync>(
    entropy: &[u32],
    loc: f64,
    scale: f64,
    out: &mut [T],
    map: impl Fn(f64) -> T + Sync,
) {
    let rng = Pcg64::from_entropy(entropy);
    fill_normal_parallel_with(rng, loc, scale, out, &map, ParallelPlan::default());
}

/// The first `out.len()` values of `standard_normal()` from a fresh generator seeded with
/// `entropy`, each mapped through `map`, computed on all rayon threads.
pub fn fill_standard_normal_parallel<T: Send + Sync>(
    entropy: &[u32],
    out: &mut [T],
    map: impl Fn(f64) -> T + Sync,
) {
    let rng = Pcg64::from_entropy(entropy);
    fill_mapped_parallel(rng, out, &map, ParallelPlan::default());
}

/// [`fill_normal_parallel`] starting from the stream `rng` (at a sample boundary), with an
/// explicit plan.
#[doc(hidden)]
pub fn fill_normal_parallel_with<T: Send + Sync, F: Fn(f64) -> T + Sync>(
    rng: Pcg64,
    loc: f64,
    scale: f64,
    out: &mut [T],
    map: &F,
    plan: ParallelPlan,
) {
    fill_mapped_parallel(rng, out, &|z| map(loc + scale * z), plan);
}

/// One chunk of a round: its own copy of the stream, the samples it made and the stream
/// positions (u64 draws since the start of the round) of its first sample boundaries.
struct Chunk<T> {
    rng: Pcg64,
    pos: u64,
    samples: Vec<T>,
    bounds: Vec<u64>,
}

/// `f(standard_normal())` for every slot of `out`, in stream order, on all rayon threads.
///
/// A normal takes one u64 draw on the fast path and more on the rare wedge and tail paths,
/// so a chunk started at an arbitrary position of the u64 stream need not start on a sample
/// boundary of the true sequence. Each round cuts the next stretch of the stream into
/// chunks that are generated in parallel from their own start positions (reached with
/// `advance`); every chunk records the positions of its first `probe` sample boundaries.
/// Then, from the first chunk (whose start is a true boundary) on, each chunk continues past
/// its end until its chain of boundaries meets a boundary recorded by the next chunk: from
/// that point both chains are the same, so the next chunk's samples after it are the true
/// ones and those before it are dropped. Should a chunk's chain not meet any recorded
/// boundary (it takes a probe of a handful of samples to make that rare), the round ends at
/// that chunk's position, which is a true boundary, and the next round starts there: later
/// chunks are redone rather than trusted. Rounds aim slightly short of the count still
/// missing, and the last few samples are drawn sequentially.
fn fill_mapped_parallel<T: Send, F: Fn(f64) -> T + Sync>(
    mut rng: Pcg64,
    out: &mut [T],
    f: &F,
    plan: ParallelPlan,
) {
    let chunks_per_round = plan.chunks.max(1);
    let chunk_draws = plan.chunk_draws.max(1);
    let mut chunks: Vec<Chunk<T>> = Vec::new();
    let mut done = 0usize;
    while done < out.len() {
        let remaining = out.len() - done;
        if remaining <= plan.sequential_below || chunks_per_round == 1 {
            fill_sequential(&mut rng, &mut out[done..], f);
            return;
        }
        let (round, span) = plan_round(&mut chunks, &rng, remaining, chunks_per_round, chunk_draws);
        draw_round(&rng, round, span, plan.probe, f);
        let (used, skips) = stitch(round, f);
        rng = round[used - 1].rng.clone();
        done += copy_out(&mut round[..used], &skips, &mut out[done..]);
    }
}

/// The chunks of the next round and the draws each covers, for `remaining` samples still to
/// make. Each sample takes at least one draw, so `span` draws per chunk give at most
/// `remaining` samples per round (and usually about 1.2% fewer).
fn plan_round<'c, T>(
    chunks: &'c mut Vec<Chunk<T>>,
    rng: &Pcg64,
    remaining: usize,
    chunks_per_round: usize,
    chunk_draws: u64,
) -> (&'c mut [Chunk<T>], u64) {
    let n_chunks = chunks_per_round.min(remaining);
    let span = ((remaining / n_chunks) as u64).min(chunk_draws);
    while chunks.len() < n_chunks {
        chunks.push(Chunk {
            rng: rng.clone(),
            pos: 0,
            samples: Vec::new(),
            bounds: Vec::new(),
        });
    }
    (&mut chunks[..n_chunks], span)
}

/// Draw every chunk of a round, `span` draws each from where the previous one starts, in
/// parallel.
fn draw_round<T: Send, F: Fn(f64) -> T + Sync>(
    rng: &Pcg64,
    round: &mut [Chunk<T>],
    span: u64,
    probe: usize,
    f: &F,
) {
    round.par_iter_mut().enumerate().for_each(|(c, chunk)| {
        let start = c as u64 * span;
        run_chunk(rng, start, start + span, probe, f, chunk);
    })
}

/// The first `n` values of `normal(loc, scale)` from a fresh generator seeded with `entropy`,
/// each mapped through `map`, handed to `done` in order as stretches that tile them, without
/// ever holding them all (a consumer that keeps them copies them). `done` runs on the rayon
/// pool as one more task beside the drawing of the next round, so whatever it does (hash
/// the values, say) shares the threads with the drawing instead of competing with them for
/// the cores. Two rounds of chunks are alive at a time (a few MB): the
/// one `done` reads and the one being drawn beside it. Equal to the sequential stream bit
/// for bit.
pub fn stream_normal_parallel<T: Send + Sync>(
    entropy: &[u32],
    loc: f64,
    scale: f64,
    n: usize,
    map: impl Fn(f64) -> T + Sync,
    mut done: impl FnMut(&[T]) + Send,
) {
    // Eight chunks per thread instead of two: the task running `done` takes a thread for a
    // while, and smaller shares of the round let the others even out around it.
    let plan = ParallelPlan {
        chunks: 8 * rayon::current_num_threads().max(1),
        ..ParallelPlan::default()
    };
    let rng = Pcg64::from_entropy(entropy);
    stream_mapped_parallel(rng, n, &|z| map(loc + scale * z), plan, &mut done);
}

/// [`stream_normal_parallel`] from the stream `rng`, with an explicit plan.
#[doc(hidden)]
pub fn stream_normal_parallel_with<T: Send + Sync, F: Fn(f64) -> T + Sync>(
    rng: Pcg64,
    loc: f64,
    scale: f64,
    n: usize,
    map: &F,
    plan: ParallelPlan,
    done: &mut (dyn FnMut(&[T]) + Send),
) {
    stream_mapped_parallel(rng, n, &|z| map(loc + scale * z), plan, done);
}

/// The kept samples of a stitched round: for each chunk that takes part, its samples after
/// the skipped ones, the whole round capped at `limit` values.
struct Kept<'c, T> {
    chunks: &'c [Chunk<T>],
    skips: Vec<usize>,
    limit: usize,
}

impl<T> Kept<'_, T> {
    fn for_each(&self, done: &mut (dyn FnMut(&[T]) + Send)) {
        let mut left = self.limit;
        for (chunk, &skip) in self.chunks.iter().zip(&self.skips) {
            let take = (chunk.samples.len() - skip).min(left);
            if take > 0 {
                done(&chunk.samples[skip..skip + take]);
            }
            left -= take;
        }
    }

    fn len(&self) -> usize {
        let kept: usize = self
            .chunks
            .iter()
            .zip(&self.skips)
            .map(|(c, &s)| c.samples.len() - s)
            .sum();
        kept.min(self.limit)
    }
}

/// [`fill_mapped_parallel`] handing each round to `done` instead of copying it out: the rounds are drawn into two sets of chunks
/// in turn, and `done` reads the kept samples of one round straight from its chunks while
/// the next round is drawn into the other set (no copy, no output to fault in).
fn stream_mapped_parallel<T: Send + Sync, F: Fn(f64) -> T + Sync>(
    mut rng: Pcg64,
    n: usize,
    f: &F,
    plan: ParallelPlan,
    done: &mut (dyn FnMut(&[T]) + Send),
) {
    let chunks_per_round = plan.chunks.max(1);
    let chunk_draws = plan.chunk_draws.max(1);
    let mut sets: [Vec<Chunk<T>>; 2] = [Vec::new(), Vec::new()];
    let mut remaining = n;
    // Which set holds the round `done` has yet to read, and what it keeps of it.
    let mut pending: Option<(usize, Vec<usize>, usize)> = None;
    let mut turn = 0;
    while remaining > 0 {
        if remaining <= plan.sequential_below || chunks_per_round == 1 {
            break;
        }
        let (drawing, reading) = match &mut sets {
            [a, b] if turn == 0 => (a, &*b),
            [a, b] => (b, &*a),
        };
        let (round, span) = plan_round(drawing, &rng, remaining, chunks_per_round, chunk_draws);
        let previous = pending.take().map(|(used, skips, limit)| Kept {
            chunks: &reading[..used],
            skips,
            limit,
        });
        rayon::join(
            || draw_round(&rng, round, span, plan.probe, f),
            || {
                if let Some(kept) = &previous {
                    kept.for_each(done);
                }
            },
        );
        let (used, skips) = stitch(round, f);
        rng = round[used - 1].rng.clone();
        let kept = Kept {
            chunks: &round[..used],
            skips,
            limit: remaining,
        };
        remaining -= kept.len();
        pending = Some((used, kept.skips, kept.limit));
        turn = 1 - turn;
    }
    if let Some((used, skips, limit)) = pending {
        // The set drawn last is the one `turn` no longer points at.
        let kept = Kept {
            chunks: &sets[1 - turn][..used],
            skips,
            limit,
        };
        kept.for_each(done);
    }
    if remaining > 0 {
        let mut tail: Vec<T> = Vec::with_capacity(remaining);
        let mut lcg = rng.lcg;
        let mut draws = 0;
        for _ in 0..remaining {
            tail.push(f(standard_normal_counted(&mut lcg, &mut draws)));
        }
        done(&tail);
    }
}

/// The sequential reference: `f(standard_normal())` for every slot, in order.
fn fill_sequential<T, F: Fn(f64) -> T>(rng: &mut Pcg64, out: &mut [T], f: &F) {
    let mut lcg = rng.lcg;
    let mut draws = 0;
    for v in out.iter_mut() {
        *v = f(standard_normal_counted(&mut lcg, &mut draws));
    }
    rng.lcg = lcg;
}

/// Generate the samples of one chunk: from stream position `start` (relative to `base`) until
/// the position reaches `end`, recording the first `probe` boundaries.
fn run_chunk<T, F: Fn(f64) -> T>(
    base: &Pcg64,
    start: u64,
    end: u64,
    probe: usize,
    f: &F,
    chunk: &mut Chunk<T>,
) {
    let mut rng = base.clone();
    rng.advance(u128::from(start));
    let mut lcg = rng.lcg;
    let mut pos = start;
    let samples = &mut chunk.samples;
    samples.clear();
    // At most one sample per draw, plus a little room for the merge that follows.
    samples.reserve((end - start) as usize + 16);
    chunk.bounds.clear();
    chunk.bounds.push(pos);
    while pos < end && chunk.bounds.len() <= probe {
        samples.push(f(standard_normal_counted(&mut lcg, &mut pos)));
        chunk.bounds.push(pos);
    }
    let before = samples.len();
    let mut made = 0usize;
    for slot in samples.spare_capacity_mut() {
        if pos >= end {
            break;
        }
        slot.write(f(standard_normal_counted(&mut lcg, &mut pos)));
        made += 1;
    }
    // SAFETY: the loop above initialised exactly `made` slots directly after the `before`
    // initialised elements, within the capacity (spare_capacity_mut's length bounds it).
    unsafe { samples.set_len(before + made) };
    // Every sample consumes at least one draw, and the capacity covered one slot per draw.
    assert!(pos >= end, "chunk buffer too small");
    rng.lcg = lcg;
    chunk.rng = rng;
    chunk.pos = pos;
}

/// Join the chunks of a round into one stretch of the true sequence. Returns how many chunks
/// take part and, for each of those, how many of its leading samples to drop.
fn stitch<T, F: Fn(f64) -> T>(round: &mut [Chunk<T>], f: &F) -> (usize, Vec<usize>) {
    let mut skips = vec![0usize; round.len()];
    for c in 0..round.len() - 1 {
        let (head, tail) = round.split_at_mut(c + 1);
        let chunk = &mut head[c];
        let next = &tail[0].bounds;
        let mut j = 0;
        loop {
            while j < next.len() && next[j] < chunk.pos {
                j += 1;
            }
            if j == next.len() {
                // No merge within the recorded boundaries: end the round here.
                return (c + 1, skips);
            }
            if next[j] == chunk.pos {
                skips[c + 1] = j;
                break;
            }
            let z = standard_normal_counted(&mut chunk.rng.lcg, &mut chunk.pos);
            chunk.samples.push(f(z));
        }
    }
    (round.len(), skips)
}

/// Move the kept samples of a round into `out` (as many as fit), in parallel. Returns the
/// number of values written.
fn copy_out<T: Send>(round: &mut [Chunk<T>], skips: &[usize], out: &mut [T]) -> usize {
    let mut jobs = Vec::with_capacity(round.len());
    let mut rest = out;
    let mut written = 0;
    for (chunk, &skip) in round.iter_mut().zip(skips) {
        let kept = chunk.samples.len() - skip;
        let take = kept.min(rest.len());
        let (dst, tail) = std::mem::take(&mut rest).split_at_mut(take);
        rest = tail;
        written += take;
        jobs.push((dst, chunk, skip));
    }
    jobs.into_par_iter().for_each(|(dst, chunk, skip)| {
        let n = dst.len();
        let samples = &mut chunk.samples;
        if std::mem::needs_drop::<T>() {
            for (d, s) in dst.iter_mut().zip(samples.drain(skip..skip + n)) {
                *d = s;
            }
        } else {
            // SAFETY: `skip + n <= samples.len()` (n was capped by the kept count), and `dst`
            // is a distinct allocation of exactly n slots, so the copy is in bounds and does
            // not overlap. T has no drop glue, so overwriting the old values of `dst` leaks
            // nothing, and the bitwise copies left behind in `samples` are discarded by
            // setting its length to 0 without any drop running.
            unsafe {
                std::ptr::copy_nonoverlapping(samples.as_ptr().add(skip), dst.as_mut_ptr(), n);
                samples.set_len(0);
            }
        }
    });
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    fn normals_seq(entropy: &[u32], n: usize) -> Vec<f64> {
        let mut g = Generator::from_entropy(entropy);
        (0..n).map(|_| g.normal(0.0, 0.02)).collect()
    }

    /// The tables follow from (R, V) by the recursion of scripts/ziggurat_tables.py; the
    /// one pinned entry is the value numpy's tables hold there.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn tables_follow_from_the_defining_constants() {
        const V: f64 = 0.004_928_673_233_974_652;
        const SCALE: f64 = 4_503_599_627_370_496.0;
        let mut k = [0u64; 256];
        let mut w = [0f64; 256];
        let mut f = [0f64; 256];
        let mut x_hi = ZIG_R;
        w[255] = x_hi / SCALE;
        f[255] = (-0.5 * x_hi * x_hi).exp();
        k[0] = (x_hi * f[255] / V * SCALE) as u64;
        w[0] = V / f[255] / SCALE;
        f[0] = 1.0;
        for i in (1..=254).rev() {
            let x = (-2.0 * (V / x_hi + f[i + 1]).ln()).sqrt();
            k[i + 1] = (x / x_hi * SCALE).round_ties_even() as u64;
            w[i] = x / SCALE;
            f[i] = if i == 38 {
                FI[38]
            } else {
                (-0.5 * x * x).exp()
            };
            x_hi = x;
        }
        assert_eq!(k, KI);
        assert_eq!(w.map(f64::to_bits), WI.map(f64::to_bits));
        assert_eq!(f.map(f64::to_bits), FI.map(f64::to_bits));
        // The pinned entry is within an ulp of the exact value.
        let x = WI[38] * SCALE;
        assert_eq!(FI[38].to_bits() - (-0.5 * x * x).exp().to_bits(), 1);
    }

    #[test]
    fn tail_constants_match_the_tables() {
        assert_eq!(ZIG_R, WI[255] * 4_503_599_627_370_496.0);
        assert_eq!(ZIG_INV_R, 1.0 / ZIG_R);
    }

    /// The LCG state whose next output is `want` (the output function is inverted for a
    /// chosen high half, then one step is undone).
    fn lcg_before_output(want: u64, inc: u128) -> Lcg {
        let hi: u64 = 0x0123_4567_89ab_cdef;
        let rot = (hi >> 58) as u32;
        let lo = want.rotate_left(rot) ^ hi;
        let next = (u128::from(hi) << 64) | u128::from(lo);
        // Inverse of the multiplier mod 2^128 by Newton's iteration.
        let mut inv: u128 = PCG_MULT;
        for _ in 0..7 {
            inv = inv.wrapping_mul(2u128.wrapping_sub(PCG_MULT.wrapping_mul(inv)));
        }
        assert_eq!(inv.wrapping_mul(PCG_MULT), 1);
        let lcg = Lcg {
            state: next.wrapping_sub(inc).wrapping_mul(inv),
            inc,
        };
        let mut probe = lcg;
        assert_eq!(probe.next_u64(), want);
        lcg
    }

    #[test]
    fn negative_zero_survives_like_numpy() {
        // Layer 5, sign bit set, magnitude 0: numpy returns -0.0 from standard_normal, and
        // normal(0, 1) turns it into 0.0 + -0.0 = +0.0.
        let lcg = lcg_before_output(0x105, 12345);
        let mut g = Generator::from_bit_generator(Pcg64 {
            lcg,
            has_u32: false,
            buffered: 0,
        });
        let mut h = g.clone();
        let mut k = g.clone();
        assert_eq!(g.standard_normal().to_bits(), (-0.0f64).to_bits());
        assert_eq!(h.normal(0.0, 1.0).to_bits(), 0.0f64.to_bits());
        let mut one = [1.0];
        k.fill_standard_normal(&mut one);
        assert_eq!(one[0].to_bits(), (-0.0f64).to_bits());
    }

    #[test]
    fn tail_and_wedge_paths_are_taken() {
        // Layer 0 with a magnitude beyond KI[0] goes to the tail (|x| > R), the largest
        // magnitude in layer 200 to the wedge test. The expected values are what numpy 2.4
        // returns from a PCG64 set to the same states.
        let mut draws = 0;
        let mut tail = lcg_before_output((MANTISSA_52 << 9) | 0x100, 777);
        let v = standard_normal_counted(&mut tail, &mut draws);
        assert_eq!(v, -3.724_031_924_874_137_4);
        assert!(v.abs() > ZIG_R && draws >= 3);
        let mut draws = 0;
        let mut wedge = lcg_before_output((MANTISSA_52 << 9) | 200, 777);
        let v = standard_normal_counted(&mut wedge, &mut draws);
        assert_eq!(v, -1.224_264_560_457_646_5);
        assert!(draws >= 2);
    }

    #[test]
    fn advance_matches_stepping() {
        let mut a = Pcg64::from_entropy(&[1, 2, 3]);
        let mut b = a.clone();
        for _ in 0..1000 {
            a.next_u64();
        }
        b.advance(1000);
        assert_eq!(a, b);
        assert_eq!(a.next_u64(), b.next_u64());
    }

    #[test]
    fn u32_draws_split_u64_low_then_high() {
        let mut a = Pcg64::from_entropy(&[7]);
        let mut b = a.clone();
        let v = b.next_u64();
        assert_eq!(a.next_u32(), v as u32);
        assert_eq!(a.next_u32(), (v >> 32) as u32);
        assert_eq!(a.next_u64(), b.next_u64());
    }

    #[test]
    fn parallel_equals_sequential_small_plans() {
        let entropy = [0xdead_beef, 42];
        for n in [0, 1, 2, 3, 5, 17, 100, 1000, 4097, 20_000] {
            let want = normals_seq(&entropy, n);
            for (chunks, chunk_draws, probe) in [
                (2, 1, 1),
                (3, 7, 2),
                (4, 64, 3),
                (8, 1000, 16),
                (5, 1 << 20, 4096),
                (2, 3, 0),
            ] {
                let plan = ParallelPlan {
                    chunks,
                    chunk_draws,
                    probe,
                    sequential_below: 0,
                };
                let mut got = vec![0.0; n];
                fill_normal_parallel_with(
                    Pcg64::from_entropy(&entropy),
                    0.0,
                    0.02,
                    &mut got,
                    &|v| v,
                    plan,
                );
                assert_eq!(
                    got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "n {n} plan {plan:?}"
                );
            }
        }
    }

    #[test]
    fn a_stream_hands_over_the_sequential_values_in_order_without_an_output() {
        let entropy = [11, 0xfeed];
        for n in [0usize, 1, 99, 5000, 30_000] {
            let want = normals_seq(&entropy, n);
            // Tiny probes and chunks force rounds that end early at an unmerged chunk, and
            // a cap below the round's kept samples; sequential_below covers the tail path.
            for (chunks, chunk_draws, probe, sequential_below) in [
                (3, 7, 16, 0),
                (4, 500, 16, 100),
                (2, 1 << 20, 16, 0),
                (5, 64, 1, 0),
                (1, 64, 16, 0),
            ] {
                let plan = ParallelPlan {
                    chunks,
                    chunk_draws,
                    probe,
                    sequential_below,
                };
                let mut seen: Vec<f64> = Vec::new();
                let mut stretches = 0;
                stream_normal_parallel_with(
                    Pcg64::from_entropy(&entropy),
                    0.0,
                    0.02,
                    n,
                    &|v| v,
                    plan,
                    &mut |stretch: &[f64]| {
                        // Final when handed over: the values the sequential stream gives.
                        let at = seen.len();
                        assert_eq!(stretch, &want[at..at + stretch.len()], "n {n} at {at}");
                        seen.extend_from_slice(stretch);
                        stretches += 1;
                    },
                );
                assert_eq!(
                    seen.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "n {n} plan {plan:?}"
                );
                if n > 1000 && chunk_draws < 1000 && chunks > 1 {
                    assert!(stretches > 1, "n {n}: handed over in more than one stretch");
                }
            }
        }
        // The public entry point, through a map, against the full fill.
        let mut full = vec![0u16; 300_000];
        let to_f16 = |v: f64| half::f16::from_f32(v as f32).to_bits();
        fill_normal_parallel(&entropy, 0.0, 0.02, &mut full, to_f16);
        let mut streamed = Vec::new();
        stream_normal_parallel(&entropy, 0.0, 0.02, full.len(), to_f16, |s: &[u16]| {
            streamed.extend_from_slice(s)
        });
        assert_eq!(streamed, full);
    }
}
