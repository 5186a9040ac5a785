// Causal attention with grouped-query heads, for any head_dim, in the CPU backend's order:
//   score_j = round_T(round_T(q . k_j) / scale)      for j <= i (later positions are masked)
//   p_j     = round_T(exp(score_j - max) * (1 / sum)) (exp and sum in f32, the sum in order)
//   out     = round_T(sum_j p_j * v_j)                (f32, j in order)
// One block per (query row, head). The dot products run over head_dim in order from -0.0
// (the host's f32 sum starts there); the max is order-free and reduced in parallel; the
// exponential sum is added on one thread, in position order.
//
// q holds batch * q_rows_per_batch rows of n_heads * head_dim (rotated); k and v hold
// batch * seq rows of n_kv_heads * head_dim. Query row r of nonce b = r / q_rows_per_batch
// sits at position seq - q_rows_per_batch + r % q_rows_per_batch. Head h reads kv head
// h / (n_heads / n_kv_heads). out has the layout of q.
//
// Two kernels compute exactly this, in the same order:
// - attention_smem_<dtype>: the fast one. One block per (nonce, head, 32 query rows), four
//   warps; the block first copies the keys and values its rows attend to into shared memory
//   (coalesced), then each warp takes one query row at a time: lanes score positions, the
//   warp reduces the max, lane 0 adds the exponentials in position order, lanes then own
//   output dimensions. Launch: grid (batch * n_heads, ceil(q_rows_per_batch / 32)), block
//   128, dynamic shared memory attention_smem_bytes(seq, head_dim, sizeof(T)) (the host
//   raises the function's limit above 48 KiB when it needs to, and falls back to the other
//   kernel when the device cannot give that much).
// - attention_<dtype>: the fallback for any size. Launch: grid (batch * q_rows_per_batch,
//   n_heads); block 128 (a multiple of 32, at most 1024); dynamic shared memory chunk * 4
//   bytes: the scores of `chunk` positions at a time. The host makes chunk as large as the
//   device allows (opting in above 48 KiB), so that a row of up to chunk positions keeps
//   every score in shared memory from the first pass to the last. A longer row (seq_len
//   beyond what one block's shared memory holds: about 12,000 positions in 48 KiB, 25,000
//   in Ada's 99 KiB, 57,000 in Hopper's 227 KiB) is walked a chunk at a time, and each
//   score is computed again where a later pass needs it: the same operations on the same
//   values give the same bits, so the order of every sum, and so every result, is that of a
//   row that fits.

#define ATT_MAX_WARPS 32

// Score of position j for one query head: round_T(round_T(q . k_j) / scale), the dot product
// over head_dim in order from -0.0 (the host's f32 sum starts there).
template <typename T>
__device__ __forceinline__ float attention_score(const typename T::S* qh,
                                                const typename T::S* kr, int head_dim,
                                                float scale) {
    float acc = -0.0f;
    for (int t = 0; t < head_dim; ++t) {
        acc += T::load(qh[t]) * T::load(kr[t]);
    }
    const float raw = round_to<T>(acc);
    return round_to<T>(raw / scale);
}

template <typename T>
__device__ void attention_impl(const typename T::S* q, const typename T::S* k,
                               const typename T::S* v, typename T::S* out, int seq,
                               int n_heads, int n_kv_heads, int head_dim,
                               int q_rows_per_batch, float scale, int chunk) {
    DYNAMIC_SHARED(float, scores);
    SHARED_ARRAY(float, warp_max, ATT_MAX_WARPS);
    SHARED_ARRAY(float, shared_max, 1);
    SHARED_ARRAY(float, shared_inv, 1);

    const int r = blockIdx.x;
    const int h = blockIdx.y;
    const int b = r / q_rows_per_batch;
    const int i = seq - q_rows_per_batch + r % q_rows_per_batch;
    const int rep = n_heads / n_kv_heads;
    const int kv_off = (h / rep) * head_dim;
    const i64 q_width = (i64)n_heads * head_dim;
    const i64 kv_width = (i64)n_kv_heads * head_dim;
    const i64 kv_base = (i64)b * seq;
    const typename T::S* qh = q + (i64)r * q_width + (i64)h * head_dim;
    // Positions 0 .. n - 1 are attended to, chunk by chunk; a row of one chunk keeps its
    // scores in shared memory through the three passes.
    const int n = i + 1;
    const bool one_chunk = n <= chunk;

    // Pass 1: the largest score (order-free).
    float local_max = neg_inf();
    for (int c0 = 0; c0 < n; c0 += chunk) {
        const int len = n - c0 < chunk ? n - c0 : chunk;
        for (int j = threadIdx.x; j < len; j += blockDim.x) {
            const typename T::S* kr = k + (kv_base + c0 + j) * kv_width + kv_off;
            const float s = attention_score<T>(qh, kr, head_dim, scale);
            if (one_chunk) {
                scores[j] = s;
            }
            local_max = fmaxf(local_max, s);
        }
    }
    for (int off = 16; off > 0; off /= 2) {
        local_max = fmaxf(local_max, __shfl_xor_sync(0xffffffffu, local_max, off));
    }
    const int warp = threadIdx.x / 32;
    const int n_warps = (blockDim.x + 31) / 32;
    if (threadIdx.x % 32 == 0) {
        warp_max[warp] = local_max;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        float m = neg_inf();
        for (int w = 0; w < n_warps; ++w) {
            m = fmaxf(m, warp_max[w]);
        }
        shared_max[0] = m;
    }
    __syncthreads();
    const float row_max = shared_max[0];

    // Pass 2: the exponentials, added on one thread in position order, a chunk at a time.
    float sum = 0.0f;
    for (int c0 = 0; c0 < n; c0 += chunk) {
        const int len = n - c0 < chunk ? n - c0 : chunk;
        for (int j = threadIdx.x; j < len; j += blockDim.x) {
            float s;
            if (one_chunk) {
                s = scores[j];
            } else {
                const typename T::S* kr = k + (kv_base + c0 + j) * kv_width + kv_off;
                s = attention_score<T>(qh, kr, head_dim, scale);
            }
            scores[j] = exp_f32(s - row_max);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            for (int j = 0; j < len; ++j) {
                sum += scores[j];
            }
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        shared_inv[0] = 1.0f / sum;
    }
    __syncthreads();
    const float inv = shared_inv[0];

    // Pass 3: the probabilities, rounded to T, times v, summed in position order. Each
    // thread owns output dimensions t0 + threadIdx.x of a slab of blockDim.x of them.
    if (one_chunk) {
        for (int j = threadIdx.x; j < n; j += blockDim.x) {
            scores[j] = round_to<T>(scores[j] * inv);
        }
        __syncthreads();
    }
    typename T::S* oh = out + (i64)r * q_width + (i64)h * head_dim;
    for (int t0 = 0; t0 < head_dim; t0 += blockDim.x) {
        const int t = t0 + threadIdx.x;
        float acc = 0.0f;
        for (int c0 = 0; c0 < n; c0 += chunk) {
            const int len = n - c0 < chunk ? n - c0 : chunk;
            if (!one_chunk) {
                // Everyone is done with the previous chunk's probabilities.
                __syncthreads();
                for (int j = threadIdx.x; j < len; j += blockDim.x) {
                    const typename T::S* kr = k + (kv_base + c0 + j) * kv_width + kv_off;
                    const float s = attention_score<T>(qh, kr, head_dim, scale);
                    scores[j] = round_to<T>(exp_f32(s - row_max) * inv);
                }
                __syncthreads();
            }
            if (t < head_dim) {
                for (int j = 0; j < len; ++j) {
                    acc += scores[j] * T::load(v[(kv_base + c0 + j) * kv_width + kv_off + t]);
                }
            }
        }
        if (t < head_dim) {
            oh[t] = T::store(acc);
        }
    }
}

#define ATTENTION_KERNEL(NAME, T)                                                        \
    extern "C" __global__ void NAME(const T::S* q, const T::S* k, const T::S* v,         \
                                    T::S* out, int seq, int n_heads, int n_kv_heads,     \
                                    int head_dim, int q_rows_per_batch, float scale,     \
                                    int chunk) {                                         \
        attention_impl<T>(q, k, v, out, seq, n_heads, n_kv_heads, head_dim,              \
                          q_rows_per_batch, scale, chunk);                               \
    }

// Shared memory of attention_smem: keys and values (storage type, padded to 16 bytes), then
// one query row and one row of scores per warp (f32). The host computes the same sum.
#define ATT_SMEM_WARPS 4
#define ATT_SMEM_ROWS 32

template <typename T>
__device__ void attention_smem_impl(const typename T::S* q, const typename T::S* k,
                                    const typename T::S* v, typename T::S* out, int seq,
                                    int n_heads, int n_kv_heads, int head_dim,
                                    int q_rows_per_batch, float scale) {
    DYNAMIC_SHARED(unsigned char, att_smem);
    typedef typename T::S S;
    const int b = blockIdx.x / n_heads;
    const int h = blockIdx.x % n_heads;
    const int row0 = blockIdx.y * ATT_SMEM_ROWS;
    const int rows_left = q_rows_per_batch - row0;
    const int rows_here = rows_left < ATT_SMEM_ROWS ? rows_left : ATT_SMEM_ROWS;
    const int first_pos = seq - q_rows_per_batch;
    // Positions 0 .. kv_len - 1 are all that the block's last row attends to.
    const int kv_len = first_pos + row0 + rows_here;
    const int rep = n_heads / n_kv_heads;
    const int kv_off = (h / rep) * head_dim;
    const i64 q_width = (i64)n_heads * head_dim;
    const i64 kv_width = (i64)n_kv_heads * head_dim;
    const i64 kv_base = (i64)b * seq;

    const i64 kv_elems = (i64)seq * head_dim;
    const i64 kv_bytes = ((2 * kv_elems * (i64)sizeof(S)) + 15) / 16 * 16;
    S* ks = (S*)att_smem;
    S* vs = ks + kv_elems;
    float* qs = (float*)(att_smem + kv_bytes);
    float* ss = qs + ATT_SMEM_WARPS * head_dim;

    const i64 n_load = (i64)kv_len * head_dim;
    for (i64 e = threadIdx.x; e < n_load; e += blockDim.x) {
        const i64 j = e / head_dim;
        const i64 t = e % head_dim;
        const i64 src = (kv_base + j) * kv_width + kv_off + t;
        ks[e] = k[src];
        vs[e] = v[src];
    }
    __syncthreads();

    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    float* qw = qs + warp * head_dim;
    float* sw = ss + (i64)warp * seq;
    for (int rr = warp; rr < rows_here; rr += ATT_SMEM_WARPS) {
        const int qrow = row0 + rr;
        const int i = first_pos + qrow;
        const i64 r = (i64)b * q_rows_per_batch + qrow;
        const S* qh = q + r * q_width + (i64)h * head_dim;
        for (int t = lane; t < head_dim; t += 32) {
            qw[t] = T::load(qh[t]);
        }
        __syncwarp();
        float local_max = neg_inf();
        for (int j = lane; j <= i; j += 32) {
            const S* kr = ks + (i64)j * head_dim;
            float acc = -0.0f;
            for (int t = 0; t < head_dim; ++t) {
                acc += qw[t] * T::load(kr[t]);
            }
            const float raw = round_to<T>(acc);
            const float s = round_to<T>(raw / scale);
            sw[j] = s;
            local_max = fmaxf(local_max, s);
        }
        for (int off = 16; off > 0; off /= 2) {
            local_max = fmaxf(local_max, __shfl_xor_sync(0xffffffffu, local_max, off));
        }
        for (int j = lane; j <= i; j += 32) {
            sw[j] = exp_f32(sw[j] - local_max);
        }
        __syncwarp();
        float inv = 0.0f;
        if (lane == 0) {
            float sum = 0.0f;
            for (int j = 0; j <= i; ++j) {
                sum += sw[j];
            }
            inv = 1.0f / sum;
        }
        inv = __shfl_sync(0xffffffffu, inv, 0);
        for (int j = lane; j <= i; j += 32) {
            sw[j] = round_to<T>(sw[j] * inv);
        }
        __syncwarp();
        S* oh = out + r * q_width + (i64)h * head_dim;
        for (int t = lane; t < head_dim; t += 32) {
            float acc = 0.0f;
            for (int j = 0; j <= i; ++j) {
                acc += sw[j] * T::load(vs[(i64)j * head_dim + t]);
            }
            oh[t] = T::store(acc);
        }
        __syncwarp();
    }
}

#define ATTENTION_SMEM_KERNEL(NAME, T)                                                   \
    extern "C" __global__ void NAME(const T::S* q, const T::S* k, const T::S* v,         \
                                    T::S* out, int seq, int n_heads, int n_kv_heads,     \
                                    int head_dim, int q_rows_per_batch, float scale) {   \
        attention_smem_impl<T>(q, k, v, out, seq, n_heads, n_kv_heads, head_dim,         \
                               q_rows_per_batch, scale);                                 \
    }

ATTENTION_SMEM_KERNEL(attention_smem_f32, F32)
ATTENTION_SMEM_KERNEL(attention_smem_f16, F16)
ATTENTION_SMEM_KERNEL(attention_smem_bf16, BF16)
ATTENTION_KERNEL(attention_f32, F32)
ATTENTION_KERNEL(attention_f16, F16)
ATTENTION_KERNEL(attention_bf16, BF16)
