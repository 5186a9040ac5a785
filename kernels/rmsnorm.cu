// RMSNorm, one warp per row:
//   out = round_T(round_T(x * (1 / sqrt(sum(x^2) / dim + eps))) * weight)
// The sum of squares is added in exactly the order of the CPU backend (the order of the
// reference's f32 row sum): 8-lane vectors dealt round-robin to 4 accumulators in a cascade
// of 4 levels, left-over vectors into the first accumulator, the accumulators added up,
// then the left-over scalars and finally the lanes one by one. Rows shorter than 8 use
// 1-lane vectors. The 32 (accumulator, lane) pairs are exactly the 32 threads of a warp:
// thread t keeps accumulator t / W, lane t % W, and runs the cascade on its own stream.
//
// Launch: rmsnorm_<dtype>(x, weight, out, rows, dim, eps); block 128 threads (4 rows), grid
// ceil(rows / 4). x and out hold `rows` contiguous rows of `dim` values.

#define RMS_LANES 8
#define RMS_ILP 4
#define RMS_LEVELS 4
#define RMS_ROWS_PER_BLOCK 4

__device__ __forceinline__ unsigned int ceil_log2_u64(unsigned long long x) {
    if (x <= 1ull) {
        return 0u;
    }
    return 64u - (unsigned int)__clzll((long long)(x - 1ull));
}

template <typename T>
__device__ __forceinline__ float square_at(const typename T::S* x, i64 i) {
    const float a = T::load(x[i]);
    return a * a;
}

// The sum of squares of one row, returned to every thread of the warp. `t` is the lane.
template <typename T>
__device__ float sum_squares_ref(const typename T::S* x, int n, int t) {
    const int w = n >= RMS_LANES ? RMS_LANES : 1;
    const int k = t / w;
    const int l = t % w;
    const bool active = k < RMS_ILP;
    const i64 n_vec = n / w;
    const i64 rows = n_vec / RMS_ILP;
    unsigned int level_power = ceil_log2_u64((unsigned long long)rows) / RMS_LEVELS;
    if (level_power < 4u) {
        level_power = 4u;
    }
    const i64 level_step = 1ll << level_power;
    const unsigned long long level_mask = (unsigned long long)(level_step - 1);

    float acc[RMS_LEVELS];
    for (int j = 0; j < RMS_LEVELS; ++j) {
        acc[j] = 0.0f;
    }
    i64 i = 0;
    while (i + level_step <= rows) {
        for (i64 s = 0; s < level_step; ++s) {
            if (active) {
                acc[0] += square_at<T>(x, (i * RMS_ILP + k) * w + l);
            }
            ++i;
        }
        for (int j = 1; j < RMS_LEVELS; ++j) {
            acc[j] += acc[j - 1];
            acc[j - 1] = 0.0f;
            if (((unsigned long long)i & (level_mask << (j * level_power))) != 0ull) {
                break;
            }
        }
    }
    while (i < rows) {
        if (active) {
            acc[0] += square_at<T>(x, (i * RMS_ILP + k) * w + l);
        }
        ++i;
    }
    float part = acc[0];
    for (int j = 1; j < RMS_LEVELS; ++j) {
        part += acc[j];
    }
    if (active && k == 0) {
        for (i64 v = rows * RMS_ILP; v < n_vec; ++v) {
            part += square_at<T>(x, v * w + l);
        }
    }
    if (!active) {
        part = 0.0f;
    }
    // Lane l of the first accumulator adds the other accumulators' lane l, in order.
    float first = part;
    for (int j = 1; j < RMS_ILP; ++j) {
        const float other = __shfl_sync(0xffffffffu, part, j * w + l);
        first += other;
    }
    // Then the left-over scalars, then the lanes, one by one, on thread 0.
    float total = 0.0f;
    for (int j = 0; j < w; ++j) {
        const float lane = __shfl_sync(0xffffffffu, first, j);
        if (t == 0 && j == 0) {
            for (i64 s = n_vec * w; s < n; ++s) {
                total += square_at<T>(x, s);
            }
        }
        total += lane;
    }
    return __shfl_sync(0xffffffffu, total, 0);
}

template <typename T>
__device__ void rmsnorm_impl(const typename T::S* x, const typename T::S* weight,
                             typename T::S* out, int rows, int dim, float eps) {
    const int warp = threadIdx.x / 32;
    const int t = threadIdx.x % 32;
    const i64 row = (i64)blockIdx.x * RMS_ROWS_PER_BLOCK + warp;
    if (row >= rows) {
        return;  // the whole warp leaves together
    }
    const typename T::S* xr = x + row * dim;
    typename T::S* orow = out + row * dim;
    const float ss = sum_squares_ref<T>(xr, dim, t);
    const float ms = ss / (float)dim;
    const float inv = 1.0f / sqrtf(ms + eps);
    for (int c = t; c < dim; c += 32) {
        const float y = round_to<T>(T::load(xr[c]) * inv);
        orow[c] = T::store(y * T::load(weight[c]));
    }
}

#define RMSNORM_KERNEL(NAME, T)                                                         \
    extern "C" __global__ void NAME(const T::S* x, const T::S* weight, T::S* out,       \
                                    int rows, int dim, float eps) {                     \
        rmsnorm_impl<T>(x, weight, out, rows, dim, eps);                                \
    }

RMSNORM_KERNEL(rmsnorm_f32, F32)
RMSNORM_KERNEL(rmsnorm_f16, F16)
RMSNORM_KERNEL(rmsnorm_bf16, BF16)
