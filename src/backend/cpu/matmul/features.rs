//! What the CPU offers the matrix products: read once from CPUID (and, for AMX, from the
//! operating system), so that every product picks its path without asking again.

use std::sync::OnceLock;

/// The instruction sets the products can use. `Default` is a CPU with none of them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Features {
    /// AVX2 with FMA (256-bit f32 FMAs).
    pub avx2_fma: bool,
    /// F16C: f16 <-> f32 conversions (the AVX2 path needs it; every AVX2 CPU has it).
    pub f16c: bool,
    /// AVX-512 Foundation (512-bit FMAs, masked stores, f16 -> f32 conversion).
    pub avx512f: bool,
    /// AVX512_BF16: `vdpbf16ps`, a dot product of bf16 pairs accumulated in f32.
    pub avx512_bf16: bool,
    /// AMX tiles with TDPBF16PS, usable by this process (CPU, OS and permission).
    pub amx_bf16: bool,
    /// AMX tiles with TDPFP16PS, usable by this process.
    pub amx_fp16: bool,
}

impl Features {
    /// This machine's features, detected on first use.
    pub fn host() -> Features {
        static HOST: OnceLock<Features> = OnceLock::new();
        *HOST.get_or_init(detect)
    }

    /// Every feature present: for tests of the selection logic.
    #[cfg(test)]
    pub const ALL: Features = Features {
        avx2_fma: true,
        f16c: true,
        avx512f: true,
        avx512_bf16: true,
        amx_bf16: true,
        amx_fp16: true,
    };
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Features {
    let amx = amx::usable();
    Features {
        avx2_fma: is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
        f16c: is_x86_feature_detected!("f16c"),
        avx512f: is_x86_feature_detected!("avx512f"),
        avx512_bf16: is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16"),
        amx_bf16: amx.bf16,
        amx_fp16: amx.fp16,
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Features {
    Features::default()
}

/// Why AMX is or is not usable here, in words (for test output and logs).
pub fn amx_status() -> String {
    #[cfg(target_arch = "x86_64")]
    {
        amx::usable().reason.to_string()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        "AMX is an x86-64 feature".to_string()
    }
}

#[cfg(target_arch = "x86_64")]
mod amx {
    use std::arch::x86_64::__cpuid_count;
    use std::sync::OnceLock;

    /// CPUID.(EAX=7, ECX=0):EDX bits for AMX-BF16 and AMX-TILE.
    const EDX_AMX_BF16: u32 = 1 << 22;
    const EDX_AMX_TILE: u32 = 1 << 24;
    /// CPUID.(EAX=7, ECX=1):EAX bit for AMX-FP16.
    const EAX_AMX_FP16: u32 = 1 << 21;
    /// CPUID.1:ECX bit OSXSAVE: the OS manages XCR0, so XGETBV may be executed.
    const ECX_OSXSAVE: u32 = 1 << 27;
    /// XCR0 bits of the tile configuration and tile data state components.
    const XCR0_XTILECFG: u64 = 1 << 17;
    const XCR0_XTILEDATA: u64 = 1 << 18;

    #[derive(Debug, Clone, Copy)]
    pub struct Amx {
        pub bf16: bool,
        pub fp16: bool,
        pub reason: &'static str,
    }

    /// AMX as this process may use it: the CPU has the tiles, the OS saves their state
    /// (XCR0), and Linux granted this process the tile data permission (asked once here).
    pub fn usable() -> Amx {
        static AMX: OnceLock<Amx> = OnceLock::new();
        *AMX.get_or_init(probe)
    }

    fn probe() -> Amx {
        let none = |reason| Amx {
            bf16: false,
            fp16: false,
            reason,
        };
        // CPUID exists on every x86-64 CPU; leaf 7 exists when the maximum basic leaf
        // (leaf 0's EAX) is at least 7, checked first.
        let max_leaf = __cpuid_count(0, 0).eax;
        if max_leaf < 7 {
            return none("the CPU has no CPUID leaf 7, so no AMX");
        }
        let (leaf1, leaf7, leaf7_1) = (
            __cpuid_count(1, 0),
            __cpuid_count(7, 0),
            __cpuid_count(7, 1),
        );
        if leaf7.edx & EDX_AMX_TILE == 0 {
            return none("the CPU has no AMX tiles (CPUID AMX-TILE is clear)");
        }
        let cpu_bf16 = leaf7.edx & EDX_AMX_BF16 != 0;
        let cpu_fp16 = leaf7_1.eax & EAX_AMX_FP16 != 0;
        if leaf1.ecx & ECX_OSXSAVE == 0 {
            return none("the OS does not enable XSAVE, so it cannot hold tile state");
        }
        // SAFETY: OSXSAVE is set, so XGETBV with ECX = 0 is allowed in user mode.
        let xcr0 = unsafe { xgetbv0() };
        if xcr0 & (XCR0_XTILECFG | XCR0_XTILEDATA) != XCR0_XTILECFG | XCR0_XTILEDATA {
            return none("the OS does not enable the tile state in XCR0");
        }
        if !request_tile_permission() {
            return none("the OS did not grant this process the AMX tile data permission");
        }
        Amx {
            bf16: cpu_bf16,
            fp16: cpu_fp16,
            reason: match (cpu_bf16, cpu_fp16) {
                (true, true) => "AMX-BF16 and AMX-FP16 are usable",
                (true, false) => "AMX-BF16 is usable; the CPU has no AMX-FP16",
                (false, true) => "AMX-FP16 is usable; the CPU has no AMX-BF16",
                (false, false) => "the CPU has AMX tiles but neither AMX-BF16 nor AMX-FP16",
            },
        }
    }

    /// XCR0, through XGETBV (ECX = 0).
    ///
    /// # Safety
    /// The caller checks CPUID.1:ECX.OSXSAVE first: XGETBV faults without it.
    unsafe fn xgetbv0() -> u64 {
        let (lo, hi): (u32, u32);
        // SAFETY: the caller guarantees XGETBV is enabled; it reads XCR0 into EDX:EAX and
        // touches neither memory nor flags.
        unsafe {
            std::arch::asm!(
                "xgetbv",
                in("ecx") 0u32,
                out("eax") lo,
                out("edx") hi,
                options(nomem, nostack, preserves_flags),
            );
        }
        (u64::from(hi) << 32) | u64::from(lo)
    }

    /// Linux hands out the (8 KiB) tile data state only to processes that ask:
    /// `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`. The permission covers every
    /// thread of the process, present and future. A refusal (old kernel, seccomp) leaves
    /// AMX unused; executing a tile instruction without it would be a fatal signal.
    #[cfg(target_os = "linux")]
    fn request_tile_permission() -> bool {
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: arch_prctl with ARCH_REQ_XCOMP_PERM takes two integer arguments and only
        // changes this process's permitted xstate features; an unknown request returns an
        // error (EINVAL) instead of doing anything.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            )
        };
        rc == 0
    }

    /// Other systems: AMX is not used (no known way to ask for the tile state).
    #[cfg(not(target_os = "linux"))]
    fn request_tile_permission() -> bool {
        false
    }
}
