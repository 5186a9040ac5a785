// Filling a parameter from the pool (already in the model dtype on the device, pool_size
// values), one thread per value in a grid-stride loop (any 1-D grid, block 256):
//   fill_direct_<dtype>(pool, start, dst, numel):
//       dst[k] = pool[start + k]                          (numel <= pool_size)
//   fill_tiled_<dtype>(pool, pool_size, dst, numel, shift):
//       dst[k] = pool[((k + shift) % numel) % pool_size]  (the pool repeated to numel
//                                                          values, rotated left by shift)
// start and shift come from the parameter's name hash on the host. The pool itself reaches
// the device as f32 (each f64 draw rounded once to f32) and is rounded to the model dtype
// by from_f32_<dtype> (elementwise.cu): f64 -> f32 -> T, two roundings in that order.

template <typename T>
__device__ void fill_direct_impl(const typename T::S* pool, i64 start, typename T::S* dst,
                                 i64 numel) {
    for (i64 k = global_index(); k < numel; k += grid_threads()) {
        dst[k] = pool[start + k];
    }
}

template <typename T>
__device__ void fill_tiled_impl(const typename T::S* pool, i64 pool_size, typename T::S* dst,
                                i64 numel, i64 shift) {
    for (i64 k = global_index(); k < numel; k += grid_threads()) {
        i64 j = k + shift;
        if (j >= numel) {
            j -= numel;  // shift < numel, so one subtraction is the remainder
        }
        dst[k] = pool[j % pool_size];
    }
}

#define FILL_DIRECT_KERNEL(NAME, T)                                                      \
    extern "C" __global__ void NAME(const T::S* pool, i64 start, T::S* dst, i64 numel) { \
        fill_direct_impl<T>(pool, start, dst, numel);                                    \
    }
#define FILL_TILED_KERNEL(NAME, T)                                                       \
    extern "C" __global__ void NAME(const T::S* pool, i64 pool_size, T::S* dst,          \
                                    i64 numel, i64 shift) {                              \
        fill_tiled_impl<T>(pool, pool_size, dst, numel, shift);                          \
    }

FILL_DIRECT_KERNEL(fill_direct_f32, F32)
FILL_DIRECT_KERNEL(fill_direct_f16, F16)
FILL_DIRECT_KERNEL(fill_direct_bf16, BF16)
FILL_TILED_KERNEL(fill_tiled_f32, F32)
FILL_TILED_KERNEL(fill_tiled_f16, F16)
FILL_TILED_KERNEL(fill_tiled_bf16, BF16)
