// Elementwise passes, each one thread per element in a grid-stride loop (any 1-D grid,
// block 256):
//   silu_mul_<dtype>(a, b, n):  a = round_T(round_T(a / (1 + exp(-a))) * b)  (f32 inside)
//   silu_mul_amax_<dtype>(a, b, n, amax_bits): silu_mul, and the largest |a| it wrote into
//                               *amax_bits (atomicMax on the bits of a non-negative f32; the
//                               caller zeroes it): the input of an FP8 product quantised
//                               without a separate pass to find its scale (fp8.cu)
//   add_<dtype>(x, y, n):       x = round_T(x + y)                          (residual add)
//   from_f32_<dtype>(src, dst, n): dst = round_T(src)   (f32 values into the model dtype)
//   to_f32_<dtype>(src, dst, n):   dst = src as f32     (exact)

template <typename T>
__device__ void silu_mul_impl(typename T::S* a, const typename T::S* b, i64 n) {
    for (i64 i = global_index(); i < n; i += grid_threads()) {
        const float x = T::load(a[i]);
        const float s = round_to<T>(x / (1.0f + exp_f32(-x)));
        a[i] = T::store(s * T::load(b[i]));
    }
}

template <typename T>
__device__ void silu_mul_amax_impl(typename T::S* a, const typename T::S* b, i64 n,
                                   unsigned int* amax_bits) {
    unsigned int local = 0u;
    for (i64 i = global_index(); i < n; i += grid_threads()) {
        const float x = T::load(a[i]);
        const float s = round_to<T>(x / (1.0f + exp_f32(-x)));
        const typename T::S out = T::store(s * T::load(b[i]));
        a[i] = out;
        const unsigned int bits = __float_as_uint(T::load(out)) & 0x7fffffffu;
        local = bits > local ? bits : local;
    }
    warp_max_into(amax_bits, local);
}

template <typename T>
__device__ void add_impl(typename T::S* x, const typename T::S* y, i64 n) {
    for (i64 i = global_index(); i < n; i += grid_threads()) {
        x[i] = T::store(T::load(x[i]) + T::load(y[i]));
    }
}

template <typename T>
__device__ void from_f32_impl(const float* src, typename T::S* dst, i64 n) {
    for (i64 i = global_index(); i < n; i += grid_threads()) {
        dst[i] = T::store(src[i]);
    }
}

template <typename T>
__device__ void to_f32_impl(const typename T::S* src, float* dst, i64 n) {
    for (i64 i = global_index(); i < n; i += grid_threads()) {
        dst[i] = T::load(src[i]);
    }
}

#define SILU_MUL_KERNEL(NAME, T)                                                         \
    extern "C" __global__ void NAME(T::S* a, const T::S* b, i64 n) {                     \
        silu_mul_impl<T>(a, b, n);                                                       \
    }
#define SILU_MUL_AMAX_KERNEL(NAME, T)                                                    \
    extern "C" __global__ void NAME(T::S* a, const T::S* b, i64 n,                       \
                                    unsigned int* amax_bits) {                           \
        silu_mul_amax_impl<T>(a, b, n, amax_bits);                                       \
    }
#define ADD_KERNEL(NAME, T)                                                              \
    extern "C" __global__ void NAME(T::S* x, const T::S* y, i64 n) { add_impl<T>(x, y, n); }
#define FROM_F32_KERNEL(NAME, T)                                                         \
    extern "C" __global__ void NAME(const float* src, T::S* dst, i64 n) {                \
        from_f32_impl<T>(src, dst, n);                                                   \
    }
#define TO_F32_KERNEL(NAME, T)                                                           \
    extern "C" __global__ void NAME(const T::S* src, float* dst, i64 n) {                \
        to_f32_impl<T>(src, dst, n);                                                     \
    }

SILU_MUL_KERNEL(silu_mul_f32, F32)
SILU_MUL_KERNEL(silu_mul_f16, F16)
SILU_MUL_KERNEL(silu_mul_bf16, BF16)
SILU_MUL_AMAX_KERNEL(silu_mul_amax_f32, F32)
SILU_MUL_AMAX_KERNEL(silu_mul_amax_f16, F16)
SILU_MUL_AMAX_KERNEL(silu_mul_amax_bf16, BF16)
ADD_KERNEL(add_f32, F32)
ADD_KERNEL(add_f16, F16)
ADD_KERNEL(add_bf16, BF16)
FROM_F32_KERNEL(from_f32_f32, F32)
FROM_F32_KERNEL(from_f32_f16, F16)
FROM_F32_KERNEL(from_f32_bf16, BF16)
TO_F32_KERNEL(to_f32_f32, F32)
TO_F32_KERNEL(to_f32_f16, F16)
TO_F32_KERNEL(to_f32_bf16, BF16)

// Rows out of a strided matrix: dst[r * width + c] = src[r * src_stride + c] for r < rows,
// c < width (the last position of each nonce out of the residual: src_stride = seq * dim).
// Launch: gather_rows_<dtype>(src, dst, rows, width, src_stride); grid-stride over
// rows * width, block 256. src and dst must not overlap.
template <typename T>
__device__ void gather_rows_impl(const typename T::S* src, typename T::S* dst, i64 rows,
                                 i64 width, i64 src_stride) {
    const i64 n = rows * width;
    for (i64 i = global_index(); i < n; i += grid_threads()) {
        const i64 r = i / width;
        dst[i] = src[r * src_stride + i % width];
    }
}

#define GATHER_ROWS_KERNEL(NAME, T)                                                      \
    extern "C" __global__ void NAME(const T::S* src, T::S* dst, i64 rows, i64 width,     \
                                    i64 src_stride) {                                    \
        gather_rows_impl<T>(src, dst, rows, width, src_stride);                          \
    }

GATHER_ROWS_KERNEL(gather_rows_f32, F32)
GATHER_ROWS_KERNEL(gather_rows_f16, F16)
GATHER_ROWS_KERNEL(gather_rows_bf16, BF16)
