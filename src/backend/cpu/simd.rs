//! The elementwise passes compiled for the CPU's widest vectors.
//!
//! The crate is built for the baseline x86-64 (SSE2), so the compiler vectorises plain loops
//! 4 lanes wide. [`wide_fn!`] defines a function whose body is compiled three times (for
//! AVX-512F, for AVX2 + FMA, and for the baseline) and run in the widest form this CPU has,
//! where the same loops are vectorised 16 or 8 lanes wide. Only the width changes, never a
//! value: Rust neither contracts `a * b + c` into an FMA nor reorders floating-point
//! operations, so every lane computes what the scalar code says, in its order.
//!
//! (A closure handed to a `#[target_feature]` function is not reliably inlined into it, and
//! then runs 4 lanes wide: hence a macro that makes the body an `#[inline(always)]` function
//! of its own.)

/// `fn name<R: Rounding>(args) { body }`, dispatched at run time to the body compiled for
/// AVX-512F, AVX2 + FMA or the baseline (see the module docs).
macro_rules! wide_fn {
    (
        $(#[$attr:meta])*
        $vis:vis fn $name:ident<R: Rounding>($($arg:ident: $ty:ty),* $(,)?) $body:block
    ) => {
        $(#[$attr])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name<R: Rounding>($($arg: $ty),*) {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body<R: Rounding>($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx512<R: Rounding>($($arg: $ty),*) {
                    body::<R>($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2<R: Rounding>($($arg: $ty),*) {
                    body::<R>($($arg),*)
                }
                let host = $crate::backend::cpu::matmul::Features::host();
                if host.avx512f {
                    // SAFETY: the CPU has AVX-512F (CPUID, through `Features`).
                    return unsafe { avx512::<R>($($arg),*) };
                }
                if host.avx2_fma {
                    // SAFETY: the CPU has AVX2 and FMA.
                    return unsafe { avx2::<R>($($arg),*) };
                }
            }
            body::<R>($($arg),*)
        }
    };
}

pub(crate) use wide_fn;
