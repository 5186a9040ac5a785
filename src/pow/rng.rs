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

// numpy's double-precision ziggurat tables: KI the acceptance bounds of the 52-bit
// magnitudes, WI the layer widths / 2^52, FI the density at the layer edges. They follow from
// ZIG_R and the layer area by a short recursion (scripts/ziggurat_tables.py, which also checks
// them byte for byte against numpy's compiled module); one entry, FI[38], is 1 ulp above the
// correctly rounded value, as in numpy, so they are generated once rather than computed at
// start-up with this platform's exp.
// BEGIN GENERATED ZIGGURAT TABLES (scripts/ziggurat_tables.py)
// Do not edit by hand: regenerate with the script, which also checks them against numpy.
#[rustfmt::skip]
static KI: [u64; 256] = [
    0x000ef33d8025ef6a, 0x0000000000000000, 0x000c08be98fbc6a8, 0x000da354fabd8142,
    0x000e51f67ec1eeea, 0x000eb255e9d3f77e, 0x000eef4b817ecab9, 0x000f19470afa44aa,
    0x000f37ed61ffcb18, 0x000f4f469561255c, 0x000f61a5e41ba396, 0x000f707a755396a4,
    0x000f7cb2ec28449a, 0x000f86f10c6357d3, 0x000f8fa6578325de, 0x000f9724c74dd0da,
    0x000f9da907dbf509, 0x000fa360f581fa74, 0x000fa86fde5b4bf8, 0x000facf160d354dc,
    0x000fb0fb6718b90f, 0x000fb49f8d5374c6, 0x000fb7ec2366fe77, 0x000fbaece9a1e50e,
    0x000fbdab9d040bed, 0x000fc03060ff6c57, 0x000fc2821037a248, 0x000fc4a67ae25bd1,
    0x000fc6a2977aee31, 0x000fc87aa92896a4, 0x000fca325e4bde85, 0x000fcbcce902231a,
    0x000fcd4d12f839c4, 0x000fceb54d8fec99, 0x000fd007bf1dc930, 0x000fd1464dd6c4e6,
    0x000fd272a8e2f450, 0x000fd38e4ff0c91e, 0x000fd49a9990b478, 0x000fd598b8920f53,
    0x000fd689c08e99ec, 0x000fd76ea9c8e832, 0x000fd848547b08e8, 0x000fd9178bad2c8c,
    0x000fd9dd07a7add2, 0x000fda9970105e8c, 0x000fdb4d5dc02e20, 0x000fdbf95c5bfcd0,
    0x000fdc9debb99a7d, 0x000fdd3b8118729d, 0x000fddd288342f90, 0x000fde6364369f64,
    0x000fdeee708d514e, 0x000fdf7401a6b42e, 0x000fdff46599ed40, 0x000fe06fe4bc24f2,
    0x000fe0e6c225a258, 0x000fe1593c28b84c, 0x000fe1c78cbc3f99, 0x000fe231e9db1caa,
    0x000fe29885da1b91, 0x000fe2fb8fb54186, 0x000fe35b33558d4a, 0x000fe3b799d0002a,
    0x000fe410e99ead7f, 0x000fe46746d47734, 0x000fe4bad34c095c, 0x000fe50baed29524,
    0x000fe559f74ebc78, 0x000fe5a5c8e41212, 0x000fe5ef3e138689, 0x000fe6366fd91078,
    0x000fe67b75c6d578, 0x000fe6be661e11aa, 0x000fe6ff55e5f4f2, 0x000fe73e5900a702,
    0x000fe77b823e9e39, 0x000fe7b6e37070a2, 0x000fe7f08d774243, 0x000fe8289053f08c,
    0x000fe85efb35173a, 0x000fe893dc840864, 0x000fe8c741f0cebc, 0x000fe8f9387d4ef6,
    0x000fe929cc879b1d, 0x000fe95909d388ea, 0x000fe986fb939aa2, 0x000fe9b3ac714866,
    0x000fe9df2694b6d5, 0x000fea0973abe67c, 0x000fea329cf166a4, 0x000fea5aab32952c,
    0x000fea81a6d5741a, 0x000feaa797de1cf0, 0x000feacc85f3d920, 0x000feaf07865e63c,
    0x000feb13762fec13, 0x000feb3585fe2a4a, 0x000feb56ae3162b4, 0x000feb76f4e284fa,
    0x000feb965fe62014, 0x000febb4f4cf9d7c, 0x000febd2b8f449d0, 0x000febefb16e2e3e,
    0x000fec0be31ebde8, 0x000fec2752b15a15, 0x000fec42049dafd3, 0x000fec5bfd29f196,
    0x000fec75406ceef4, 0x000fec8dd2500cb4, 0x000feca5b6911f12, 0x000fecbcf0c427fe,
    0x000fecd38454fb15, 0x000fece97488c8b3, 0x000fecfec47f91b7, 0x000fed1377358528,
    0x000fed278f844903, 0x000fed3b10242f4c, 0x000fed4dfbad586e, 0x000fed605498c3dd,
    0x000fed721d414fe8, 0x000fed8357e4a982, 0x000fed9406a42cc8, 0x000feda42b85b704,
    0x000fedb3c8746ab4, 0x000fedc2df416652, 0x000fedd171a46e52, 0x000feddf813c8ad3,
    0x000feded0f909980, 0x000fedfa1e0fd414, 0x000fee06ae124bc4, 0x000fee12c0d95a06,
    0x000fee1e579006e0, 0x000fee29734b6524, 0x000fee34150ae4bc, 0x000fee3e3db89b3c,
    0x000fee47ee2982f4, 0x000fee51271db086, 0x000fee59e9407f41, 0x000fee623528b42e,
    0x000fee6a0b5897f1, 0x000fee716c3e077a, 0x000fee7858327b82, 0x000fee7ecf7b06ba,
    0x000fee84d2484ab2, 0x000fee8a60b66343, 0x000fee8f7accc851, 0x000fee94207e25da,
    0x000fee9851a829ea, 0x000fee9c0e13485c, 0x000fee9f557273f4, 0x000feea22762ccae,
    0x000feea4836b42ac, 0x000feea668fc2d71, 0x000feea7d76ed6fa, 0x000feea8ce04fa0a,
    0x000feea94be8333b, 0x000feea950296410, 0x000feea8d9c0075e, 0x000feea7e7897654,
    0x000feea678481d24, 0x000feea48aa29e83, 0x000feea21d22e4da, 0x000fee9f2e352024,
    0x000fee9bbc26af2e, 0x000fee97c524f2e4, 0x000fee93473c0a3a, 0x000fee8e40557516,
    0x000fee88ae369c7a, 0x000fee828e7f3dfd, 0x000fee7bdea7b888, 0x000fee749bff37ff,
    0x000fee6cc3a9bd5e, 0x000fee64529e007e, 0x000fee5b45a32888, 0x000fee51994e57b6,
    0x000fee474a0006cf, 0x000fee3c53e12c50, 0x000fee30b2e02ad8, 0x000fee2462ad8205,
    0x000fee175eb83c5a, 0x000fee09a22a1447, 0x000fedfb27e349cc, 0x000fedebea76216c,
    0x000feddbe422047e, 0x000fedcb0ece39d3, 0x000fedb964042cf4, 0x000feda6dce938c9,
    0x000fed937237e98d, 0x000fed7f1c38a836, 0x000fed69d2b9c02b, 0x000fed538d06ae00,
    0x000fed3c41dea422, 0x000fed23e76a2fd8, 0x000fed0a732fe644, 0x000fecefda07fe34,
    0x000fecd4100eb7b8, 0x000fecb708956eb4, 0x000fec98b61230c1, 0x000fec790a0da978,
    0x000fec57f50f31fe, 0x000fec356686c962, 0x000fec114cb4b335, 0x000febeb948e6fd0,
    0x000febc429a0b692, 0x000feb9af5ee0cdc, 0x000feb6fe1c98542, 0x000feb42d3ad1f9e,
    0x000feb13b00b2d4b, 0x000feae2591a02e9, 0x000feaaeae992257, 0x000fea788d8ee326,
    0x000fea3fcffd73e5, 0x000fea044c8dd9f6, 0x000fe9c5d62f563b, 0x000fe9843ba947a4,
    0x000fe93f471d4728, 0x000fe8f6bd76c5d6, 0x000fe8aa5dc4e8e6, 0x000fe859e07ab1ea,
    0x000fe804f690a940, 0x000fe7ab488233c0, 0x000fe74c751f6aa5, 0x000fe6e8102aa202,
    0x000fe67da0b6abd8, 0x000fe60c9f38307e, 0x000fe5947338f742, 0x000fe51470977280,
    0x000fe48bd436f458, 0x000fe3f9bffd1e37, 0x000fe35d35eeb19c, 0x000fe2b5122fe4fe,
    0x000fe20003995557, 0x000fe13c82788314, 0x000fe068c4ee67b0, 0x000fdf82b02b71aa,
    0x000fde87c57efeaa, 0x000fdd7509c63bfd, 0x000fdc46e529bf13, 0x000fdaf8f82e0282,
    0x000fd985e1b2ba75, 0x000fd7e6ef48cf04, 0x000fd613adbd650b, 0x000fd40149e2f012,
    0x000fd1a1a7b4c7ac, 0x000fcee204761f9e, 0x000fcba8d85e11b2, 0x000fc7d26ecd2d22,
    0x000fc32b2f1e22ed, 0x000fbd6581c0b83a, 0x000fb606c4005434, 0x000fac40582a2874,
    0x000f9e971e014598, 0x000f89fa48a41dfc, 0x000f66c5f7f0302c, 0x000f1a5a4b331c4a,
];
#[rustfmt::skip]
static WI: [f64; 256] = [
    8.683627060801306e-16, 4.779330175727737e-17, 6.354352417405262e-17,
    7.454870481247696e-17, 8.3293668157931e-17, 9.068060405059482e-17,
    9.714860076567762e-17, 1.0294750314241019e-16, 1.0823430288447684e-16,
    1.131147019610903e-16, 1.176635945702292e-16, 1.2193617278714363e-16,
    1.2597439914637093e-16, 1.2981099886264032e-16, 1.3347203736824123e-16,
    1.3697864842571203e-16, 1.4034823001242382e-16, 1.4359529452056943e-16,
    1.4673208742364422e-16, 1.4976904668391037e-16, 1.5271515003596198e-16,
    1.5557818169460764e-16, 1.5836494009290885e-16, 1.6108140175274928e-16,
    1.6373285203969853e-16, 1.6632399058420835e-16, 1.6885901708676596e-16,
    1.713417017655966e-16, 1.737754436586486e-16, 1.7616331923000996e-16,
    1.7850812316976727e-16, 1.8081240285799152e-16, 1.830784876482675e-16,
    1.853085138861802e-16, 1.8750444639373882e-16, 1.896680970077476e-16,
    1.918011406483862e-16, 1.9390512930625104e-16, 1.9598150426628824e-16,
    1.9803160683128174e-16, 2.000566877627333e-16, 2.0205791562071654e-16,
    2.0403638415480212e-16, 2.0599311887403706e-16, 2.079290829041402e-16,
    2.0984518222370352e-16, 2.1174227035760342e-16, 2.1362115259449868e-16,
    2.1548258978581458e-16, 2.1732730177564367e-16, 2.191559705042727e-16,
    2.2096924282235318e-16, 2.2276773304789553e-16, 2.2455202529414355e-16,
    2.263226755928568e-16, 2.280802138345017e-16, 2.2982514554424684e-16,
    2.3155795351040804e-16, 2.3327909928004356e-16, 2.3498902453470955e-16,
    2.3668815235791604e-16, 2.3837688840454243e-16, 2.4005562198135063e-16,
    2.4172472704675025e-16, 2.433845631371103e-16, 2.4503547622614954e-16,
    2.466777995232705e-16, 2.4831185421610877e-16, 2.4993795016204524e-16,
    2.515563865329658e-16, 2.5316745241713583e-16, 2.547714273816944e-16,
    2.563685819989397e-16, 2.579591783392867e-16, 2.5954347043351707e-16,
    2.6112170470670194e-16, 2.6269412038597256e-16, 2.6426094988411895e-16,
    2.658224191608307e-16, 2.6737874806323633e-16, 2.689301506472616e-16,
    2.704768354811995e-16, 2.720190059327732e-16, 2.735568604408679e-16,
    2.7509059277301666e-16, 2.7662039226963903e-16, 2.781464440759544e-16,
    2.79668929362423e-16, 2.8118802553450207e-16, 2.827039064324479e-16,
    2.842167425218406e-16, 2.8572670107546015e-16, 2.87233946347098e-16,
    2.887386397378482e-16, 2.9024093995538423e-16, 2.9174100316669455e-16,
    2.9323898314471816e-16, 2.947350314092935e-16, 2.9622929736280665e-16,
    2.977219284209029e-16, 2.992130701386013e-16, 3.007028663321331e-16,
    3.0219145919680615e-16, 3.036789894211802e-16, 3.051655962978219e-16,
    3.0665141783089545e-16, 3.081365908408297e-16, 3.0962125106629225e-16,
    3.111055332636893e-16, 3.125895713043999e-16, 3.140734982699446e-16,
    3.1555744654528006e-16, 3.1704154791040285e-16, 3.1852593363044065e-16,
    3.2001073454440114e-16, 3.214960811527447e-16, 3.2298210370394156e-16,
    3.244689322801698e-16, 3.2595669688230784e-16, 3.2744552751437067e-16,
    3.2893555426753697e-16, 3.3042690740391284e-16, 3.3191971744017523e-16,
    3.3341411523123725e-16, 3.3491023205407785e-16, 3.364081996918765e-16,
    3.37908150518595e-16, 3.394102175841489e-16, 3.409145347003126e-16,
    3.424212365275018e-16, 3.4393045866258313e-16, 3.454423377278584e-16,
    3.4695701146137835e-16, 3.4847461880874137e-16, 3.499953000165381e-16,
    3.5151919672760744e-16, 3.53046452078274e-16, 3.5457721079774357e-16,
    3.5611161930983884e-16, 3.5764982583726505e-16, 3.59191980508603e-16,
    3.6073823546823514e-16, 3.6228874498941915e-16, 3.6384366559073444e-16,
    3.65403156156137e-16, 3.669673780588701e-16, 3.685364952894914e-16,
    3.7011067458828983e-16, 3.716900855823823e-16, 3.7327490092779435e-16,
    3.7486529645684887e-16, 3.7646145133120287e-16, 3.7806354820089604e-16,
    3.7967177336979443e-16, 3.8128631696783774e-16, 3.829073731305243e-16,
    3.8453514018609596e-16, 3.8616982085091493e-16, 3.878116224335587e-16,
    3.894607570481926e-16, 3.9111744183782054e-16, 3.9278189920805415e-16,
    3.944543570720877e-16, 3.9613504910761354e-16, 3.9782421502646826e-16,
    3.995221008578565e-16, 4.012289592460629e-16, 4.029450497636328e-16,
    4.04670639241075e-16, 4.0640600211422504e-16, 4.0815142079049387e-16,
    4.0990718603532664e-16, 4.1167359738030257e-16, 4.134509635544236e-16,
    4.1523960294026883e-16, 4.170398440568316e-16, 4.1885202607101123e-16,
    4.206764993399015e-16, 4.2251362598620494e-16, 4.243637805093078e-16,
    4.262273504347798e-16, 4.2810473700531167e-16, 4.2999635591638323e-16,
    4.3190263810026294e-16, 4.338240305622791e-16, 4.357609972736849e-16,
    4.3771402012585875e-16, 4.3968359995105214e-16, 4.4167025761542035e-16,
    4.4367453519065673e-16, 4.456969972112043e-16, 4.477382320247534e-16,
    4.49798853244555e-16, 4.518795013130059e-16, 4.539808451870034e-16,
    4.561035841567422e-16, 4.582484498109567e-16, 4.604162081631153e-16,
    4.626076619547846e-16, 4.648236531543207e-16, 4.670650656712631e-16,
    4.693328283093329e-16, 4.716279179838351e-16, 4.739513632325867e-16,
    4.763042480533137e-16, 4.786877161048723e-16, 4.811029753147417e-16,
    4.835513029411525e-16, 4.860340511450812e-16, 4.885526531353603e-16,
    4.91108629959527e-16, 4.937035980240335e-16, 4.963392774403987e-16,
    4.990175013091822e-16, 5.017402260718089e-16, 5.045095430818727e-16,
    5.073276915733542e-16, 5.101970732341562e-16, 5.131202686306784e-16,
    5.161000557743228e-16, 5.191394311757699e-16, 5.222416338000234e-16,
    5.254101724177597e-16, 5.286488569504945e-16, 5.3196183453384e-16,
    5.353536311816497e-16, 5.388292001334053e-16, 5.423939782201712e-16,
    5.46053951907478e-16, 5.498157350892814e-16, 5.536866612467876e-16,
    5.576748932926576e-16, 5.617895553555417e-16, 5.660408920082422e-16,
    5.704404621291389e-16, 5.750013768919895e-16, 5.797385945724594e-16,
    5.846692893455479e-16, 5.898133176477899e-16, 5.951938149641444e-16,
    6.008379696271908e-16, 6.067780409333449e-16, 6.130527208725282e-16,
    6.197089894581626e-16, 6.268046963301284e-16, 6.344122407127506e-16,
    6.426239659548055e-16, 6.515603317344994e-16, 6.613827885097664e-16,
    6.723150462505587e-16, 6.846803417564259e-16, 6.98971833638762e-16,
    7.159994934830664e-16, 7.372424301798799e-16, 7.658936370805573e-16,
    8.113849337656484e-16,
];
#[rustfmt::skip]
static FI: [f64; 256] = [
    1.0, 0.9771017012676716, 0.9598790918001067,
    0.9451989534422996, 0.9320600759592305, 0.919991505039347,
    0.9087264400521309, 0.8980959218983434, 0.8879846607558334,
    0.8783096558089174, 0.869008688036857, 0.8600336211963315,
    0.851346258458678, 0.8429156531122042, 0.8347162929868834,
    0.8267268339462214, 0.8189291916037024, 0.8113078743126563,
    0.8038494831709643, 0.796542330422959, 0.7893761435660246,
    0.7823418326548025, 0.7754313049811872, 0.7686373157984863,
    0.7619533468367954, 0.7553735065070961, 0.7488924472191568,
    0.742505296340151, 0.7362075981268627, 0.7299952645614762,
    0.7238645334686302, 0.717811932630722, 0.7118342488782484,
    0.7059285013327543, 0.7000919181365116, 0.6943219161261167,
    0.6886160830046718, 0.6829721616449949, 0.6773880362187735,
    0.6718617198970821, 0.6663913439087501, 0.6609751477766631,
    0.6556114705796973, 0.6502987431108167, 0.6450354808208223,
    0.6398202774530566, 0.6346517992876236, 0.6295287799248367,
    0.6244500155470265, 0.6194143606058343, 0.6144207238889139,
    0.6094680649257734, 0.6045553906974678, 0.5996817526191253,
    0.5948462437679874, 0.590047996332826, 0.5852861792633715,
    0.5805599961007909, 0.5758686829723537, 0.5712115067352532,
    0.5665877632561644, 0.5619967758145243, 0.557437893618766,
    0.5529104904258323, 0.5484139632552658, 0.5439477311900263,
    0.5395112342569521, 0.5351039323804576, 0.5307253044036621,
    0.5263748471716845, 0.5220520746723218, 0.5177565172297564,
    0.513487720747327, 0.5092452459957479, 0.5050286679434681,
    0.5008375751261487, 0.4966715690524897, 0.49253026364386854,
    0.48841328470545803, 0.4843202694266833, 0.48025086590904675,
    0.47620473271950586, 0.4721815384677302, 0.4681809614056936,
    0.46420268904817436, 0.46024641781284287, 0.45631185267871643,
    0.4523987068618485, 0.44850670150720306, 0.4446355653957394,
    0.440785034665804, 0.43695485254798555, 0.43314476911265226,
    0.4293545410294414, 0.42558393133802197, 0.4218327092294959,
    0.4181006498378482, 0.4143875340408911, 0.41069314827018816,
    0.40701728432947337, 0.4033597392211145, 0.3997203149801972,
    0.39609881851583245, 0.3924950614593156, 0.3889088600187887,
    0.3853400348400773, 0.38178841087339366, 0.3782538172456192,
    0.37473608713789114, 0.3712350576682395, 0.3677505697790326,
    0.36428246812900406, 0.36083060098964803, 0.3573948201457805,
    0.3539749808000768, 0.3505709414814061, 0.34718256395679364,
    0.3438097131468507, 0.34045225704452187, 0.33711006663700605,
    0.33378301583071845, 0.3304709813791636, 0.3271738428136014,
    0.3238914823763911, 0.32062378495690536, 0.3173706380299136,
    0.3141319315963372, 0.3109075581262865, 0.30769741250429206,
    0.30450139197665, 0.30131939610080305, 0.2981513266966855,
    0.2949970877999618, 0.2918565856170952, 0.2887297284821829,
    0.28561642681550176, 0.2825165930837076, 0.27943014176163794,
    0.2763569892956683, 0.27329705406857707, 0.27025025636587546,
    0.26721651834356147, 0.2641957639972612, 0.2611879191327212,
    0.25819291133761924, 0.25521066995466196, 0.2522411260559422,
    0.24928421241852852, 0.24633986350126383, 0.2434080154227503,
    0.2404886059405006, 0.2375815744312381, 0.23468686187233,
    0.23180441082433872, 0.22893416541468034, 0.22607607132238028,
    0.22323007576391748, 0.220396127480152, 0.21757417672433113,
    0.21476417525117358, 0.21196607630703018, 0.20917983462112508,
    0.2064054063978808, 0.2036427493103349, 0.2008918224946566,
    0.19815258654577514, 0.1954250035141343, 0.19270903690358918,
    0.19000465167046499, 0.1873118142238003, 0.18463049242679927,
    0.18196065559952251, 0.17930227452284758, 0.17665532144373486,
    0.17401977008183855, 0.17139559563750575, 0.1687827748012113,
    0.1661812857644819, 0.16359110823236558, 0.161012223437511,
    0.15844461415592428, 0.1558882647244792, 0.15334316106026286,
    0.15080929068184568, 0.14828664273257455, 0.14577520800599403,
    0.14327497897351346, 0.1407859498144447, 0.13830811644855073,
    0.13584147657125376, 0.13338602969166916, 0.13094177717364436,
    0.12850872227999957, 0.1260868702201859, 0.12367622820159657,
    0.1212768054847903, 0.11888861344291006, 0.11651166562561087,
    0.11414597782783849, 0.11179156816383809, 0.1094484571468118,
    0.1071166677746838, 0.10479622562248707, 0.10248715894193525,
    0.10018949876881002, 0.09790327903886246, 0.095628536713009,
    0.09336531191269101, 0.09111364806637376, 0.08887359206827589,
    0.08664519445055807, 0.08442850957035347, 0.0822235958132029,
    0.08003051581466307, 0.07784933670209612, 0.07568013035892718,
    0.07352297371398132, 0.0713779490588904, 0.06924514439700676,
    0.0671246538277885, 0.0650165779712429, 0.06292102443775814,
    0.06083810834953988, 0.05876795292093374, 0.0567106901062029,
    0.05466646132488892, 0.05263541827679219, 0.05061772386094778,
    0.04861355321586854, 0.04662309490193038, 0.044646552251294463,
    0.04268414491647446, 0.04073611065594094, 0.03880270740452615,
    0.036884215688567305, 0.034980941461716125, 0.03309321945857858,
    0.0312214171919203, 0.02936593975813336, 0.027527235669603113,
    0.02570580400854891, 0.02390220330579588, 0.02211706270730885,
    0.02035109623004451, 0.018605121275724622, 0.016880083152543142,
    0.01517708830793531, 0.013497450601739867, 0.011842757857907879,
    0.010214971439701459, 0.008616582769398726, 0.007050875471373222,
    0.0055224032992509916, 0.0040379725933630236, 0.0026090727461021593,
    0.001260285930498598,
];
// END GENERATED ZIGGURAT TABLES

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
pub fn fill_normal_parallel<T: Send>(
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
pub fn fill_standard_normal_parallel<T: Send>(
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
pub fn fill_normal_parallel_with<T: Send, F: Fn(f64) -> T + Sync>(
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
        // Each sample takes at least one draw, so `span` draws per chunk give at most
        // `remaining` samples per round (and usually about 1.2% fewer).
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
        let round = &mut chunks[..n_chunks];
        round.par_iter_mut().enumerate().for_each(|(c, chunk)| {
            let start = c as u64 * span;
            run_chunk(&rng, start, start + span, plan.probe, f, chunk);
        });
        let (used, skips) = stitch(round, f);
        rng = round[used - 1].rng.clone();
        done += copy_out(&mut round[..used], &skips, &mut out[done..]);
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
}
