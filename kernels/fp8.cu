// FP8 (E4M3) quantisation with one scale per tensor, for the FP8 matrix products of sm_89 /
// sm_90 / sm_100 (cuBLASLt multiplies each product by the two tensors' scales):
//
//   amax_<dtype>(x, rows, width, stride, amax_bits):
//       *amax_bits = max(*amax_bits, bits of max |x[r * stride + c]|), r < rows, c < width.
//       Non-negative floats order as their bit patterns, so atomicMax on the bits is a max
//       (a NaN, whose bits lie above infinity's, wins: the tensor is then unusable, and the
//       distances come out NaN rather than silently wrong). The caller zeroes *amax_bits.
//   quantize_e4m3_<dtype>(x, rows, width, stride, amax_bits, dst, scale):
//       s = amax / 448 (448 is E4M3's largest finite value; s = 1 for an all-zero tensor),
//       dst[r * width + c] = e4m3(x[r * stride + c] / s), rounded to nearest even and
//       saturated to +-448; *scale = s (thread 0 of block 0).
//
// Both grid-stride over rows * width, block 256. The E4M3 conversion is an sm_89
// instruction: built for an older architecture the kernels trap (the host refuses FP8
// there before anything is launched).

#define E4M3_MAX 448.0f

__device__ __forceinline__ unsigned char to_e4m3(float x) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 890)
    unsigned short pair;
    // The pair's high byte converts the first operand, the low byte the second.
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(pair) : "f"(0.0f), "f"(x));
    return (unsigned char)(pair & 0xffu);
#elif defined(__CUDACC_RTC__)
    __trap();
    return 0;
#else
    // The host emulator (tests/kernel_emulation): the same conversion in integer arithmetic.
    // E4M3 (OCP "FN"): bias 7, 3 mantissa bits, largest finite 448, no infinity, NaN is
    // S.1111.111; round to nearest even, saturated to +-448 (NaN stays NaN).
    const unsigned int u = __float_as_uint(x);
    const unsigned char sign = (unsigned char)((u >> 24) & 0x80u);
    const unsigned int a = u & 0x7fffffffu;
    if (a > 0x7f800000u) {
        return (unsigned char)(sign | 0x7fu);
    }
    if (a >= 0x43e00000u) {  // 448 and above (infinity included) saturate
        return (unsigned char)(sign | 0x7eu);
    }
    const int e = (int)(a >> 23) - 127;
    if (e < -6) {
        // Subnormal: a multiple of 2^-9, rounded to nearest even (an f32 product by a power
        // of two is exact, and so is the f32 rounding of a value below 2^24).
        const float q = __uint_as_float(a) * 512.0f;
        float r = (float)(int)q;
        const float frac = q - r;
        if (frac > 0.5f || (frac == 0.5f && ((int)r & 1))) {
            r += 1.0f;
        }
        return (unsigned char)(sign | (unsigned char)(int)r);  // 8 is the smallest normal
    }
    unsigned int m = (a & 0x7fffffu) >> 20;
    const unsigned int rest = a & 0xfffffu;
    int exp = e + 7;
    if (rest > 0x80000u || (rest == 0x80000u && (m & 1u))) {
        m += 1u;
        if (m == 8u) {
            m = 0u;
            exp += 1;
        }
    }
    if (exp > 15 || (exp == 15 && m == 7u)) {
        return (unsigned char)(sign | 0x7eu);
    }
    return (unsigned char)(sign | (unsigned char)((exp << 3) | (int)m));
#endif
}

template <typename T>
__device__ void amax_impl(const typename T::S* x, i64 rows, i64 width, i64 stride,
                          unsigned int* amax_bits) {
    const i64 n = rows * width;
    unsigned int local = 0u;
    for (i64 i = global_index(); i < n; i += grid_threads()) {
        const float v = T::load(x[(i / width) * stride + i % width]);
        const unsigned int bits = __float_as_uint(v) & 0x7fffffffu;
        local = bits > local ? bits : local;
    }
    warp_max_into(amax_bits, local);
}

template <typename T>
__device__ void quantize_e4m3_impl(const typename T::S* x, i64 rows, i64 width, i64 stride,
                                   const unsigned int* amax_bits, unsigned char* dst,
                                   float* scale) {
    const float amax = __uint_as_float(*amax_bits);
    const float s = amax > 0.0f ? amax / E4M3_MAX : 1.0f;
    const i64 n = rows * width;
    for (i64 i = global_index(); i < n; i += grid_threads()) {
        const float v = T::load(x[(i / width) * stride + i % width]);
        dst[i] = to_e4m3(v / s);
    }
    if (global_index() == 0) {
        *scale = s;
    }
}

#define AMAX_KERNEL(NAME, T)                                                             \
    extern "C" __global__ void NAME(const T::S* x, i64 rows, i64 width, i64 stride,      \
                                    unsigned int* amax_bits) {                           \
        amax_impl<T>(x, rows, width, stride, amax_bits);                                 \
    }
#define QUANTIZE_E4M3_KERNEL(NAME, T)                                                    \
    extern "C" __global__ void NAME(const T::S* x, i64 rows, i64 width, i64 stride,      \
                                    const unsigned int* amax_bits, unsigned char* dst,   \
                                    float* scale) {                                      \
        quantize_e4m3_impl<T>(x, rows, width, stride, amax_bits, dst, scale);            \
    }

AMAX_KERNEL(amax_f32, F32)
AMAX_KERNEL(amax_f16, F16)
AMAX_KERNEL(amax_bf16, BF16)
QUANTIZE_E4M3_KERNEL(quantize_e4m3_f32, F32)
QUANTIZE_E4M3_KERNEL(quantize_e4m3_f16, F16)
QUANTIZE_E4M3_KERNEL(quantize_e4m3_bf16, BF16)
