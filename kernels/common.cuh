// Storage types and roundings shared by every kernel family. The host prepends this file to
// each family's source before compiling it with NVRTC, so no file includes another and no
// CUDA header is needed.
//
// A model of dtype T stores its tensors as T (f32, or the 16-bit patterns of f16 / bf16) and
// computes in f32; "round to T" is a store followed by a load. Kernels are written once as
// templates over a dtype trait and instantiated per dtype under the name `<family>_<dtype>`
// (rmsnorm_f16, rmsnorm_bf16, rmsnorm_f32), each instantiation spelled out with its full name
// so that the host can check that every name it launches is defined.
//
// The sources are compiled without fused multiply-adds (--fmad=false) and with IEEE division
// and square root, so that each f32 operation rounds exactly where the CPU backend's does.

typedef unsigned short u16;
typedef long long i64;

// Shared memory, declared through these so that the same source also runs in the host
// emulator (tests/kernel_emulation/emulate.hpp, included before this file; NVRTC defines
// __CUDACC_RTC__, the emulator does not):
//   SHARED_ARRAY(type, name, n);  a block-wide array of n values (n = 1 for a scalar)
//   DYNAMIC_SHARED(type, name);   `type* name` at the launch's dynamic shared memory,
//                                 16-byte aligned
// In the emulator the blocks of a launch run one at a time, so a function-local static is
// shared by exactly the threads of one block.
#ifdef __CUDACC_RTC__
#define SHARED_ARRAY(type, name, n) __shared__ type name[n]
#define DYNAMIC_SHARED(type, name)                                                       \
    extern __shared__ __align__(16) unsigned char name##_bytes[];                        \
    type* name = (type*)name##_bytes
#else
#define SHARED_ARRAY(type, name, n)                                                      \
    static type name[n];                                                                 \
    emu_fresh_shared(name, sizeof(name))
#define DYNAMIC_SHARED(type, name) type* name = (type*)emu_dynamic_shared()
#endif

// f32 storage: rounding is the identity.
struct F32 {
    typedef float S;
    static __device__ __forceinline__ float load(S v) { return v; }
    static __device__ __forceinline__ S store(float x) { return x; }
};

// IEEE half precision, round to nearest even (the PTX conversion instructions).
// The host emulator (tests/kernel_emulation) has no PTX: it converts in software, bit for bit.
struct F16 {
    typedef u16 S;
    static __device__ __forceinline__ float load(S v) {
#ifdef __CUDACC_RTC__
        float f;
        asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
        return f;
#else
        return emu_f16_to_f32(v);
#endif
    }
    static __device__ __forceinline__ S store(float x) {
#ifdef __CUDACC_RTC__
        u16 h;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
        return h;
#else
        return emu_f32_to_f16(x);
#endif
    }
};

// bfloat16: the high half of an f32, round to nearest even; a NaN stays a (quiet) NaN.
struct BF16 {
    typedef u16 S;
    static __device__ __forceinline__ float load(S v) {
        return __uint_as_float(((unsigned int)v) << 16);
    }
    static __device__ __forceinline__ S store(float x) {
        unsigned int u = __float_as_uint(x);
        if ((u & 0x7fffffffu) > 0x7f800000u) {
            return (u16)((u >> 16) | 0x40u);
        }
        u += 0x7fffu + ((u >> 16) & 1u);
        return (u16)(u >> 16);
    }
};

// x rounded to T, as an f32.
template <typename T>
__device__ __forceinline__ float round_to(float x) {
    return T::load(T::store(x));
}

// exp in f32: through f64 and one rounding to f32, which gives the correctly rounded value
// except where the f64 result lies within an f64 rounding error of an f32 midpoint (very
// rare). CUDA's own expf may be off by two units in the last place. The CPU backend calls
// the host's expf, which is not always correctly rounded either: on the host it differed
// from this in the last bit for about 0.07% of arguments, so the two backends can differ by
// one f32 unit in an exponential before it is rounded to T.
__device__ __forceinline__ float exp_f32(float x) {
    return (float)exp((double)x);
}

// -infinity (no math header is included, so no INFINITY macro).
__device__ __forceinline__ float neg_inf() {
    return __uint_as_float(0xff800000u);
}

// Global index of this thread in a 1-D grid, as a 64-bit value.
__device__ __forceinline__ i64 global_index() {
    return (i64)blockIdx.x * (i64)blockDim.x + (i64)threadIdx.x;
}

// Raise *amax_bits to the largest `local` of the warp (bits of non-negative floats, which
// order as the floats do); every lane of the warp must call it.
__device__ __forceinline__ void warp_max_into(unsigned int* amax_bits, unsigned int local) {
    for (int off = 16; off > 0; off /= 2) {
        const unsigned int other = __shfl_xor_sync(0xffffffffu, local, off);
        local = other > local ? other : local;
    }
    if (threadIdx.x % 32 == 0 && local != 0u) {
        atomicMax(amax_bits, local);
    }
}

// Threads in a 1-D grid.
__device__ __forceinline__ i64 grid_threads() {
    return (i64)gridDim.x * (i64)blockDim.x;
}
