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
// Launch: attention_<dtype>(q, k, v, out, seq, n_heads, n_kv_heads, head_dim,
// q_rows_per_batch, scale); grid (batch * q_rows_per_batch, n_heads); block 128 (a multiple
// of 32, at most 1024); dynamic shared memory seq * 4 bytes.

#define ATT_MAX_WARPS 32

template <typename T>
__device__ void attention_impl(const typename T::S* q, const typename T::S* k,
                               const typename T::S* v, typename T::S* out, int seq,
                               int n_heads, int n_kv_heads, int head_dim,
                               int q_rows_per_batch, float scale) {
    extern __shared__ float scores[];
    __shared__ float warp_max[ATT_MAX_WARPS];
    __shared__ float shared_max;
    __shared__ float shared_inv;

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

    float local_max = neg_inf();
    for (int j = threadIdx.x; j <= i; j += blockDim.x) {
        const typename T::S* kr = k + (kv_base + j) * kv_width + kv_off;
        float acc = -0.0f;
        for (int t = 0; t < head_dim; ++t) {
            acc += T::load(qh[t]) * T::load(kr[t]);
        }
        const float raw = round_to<T>(acc);
        const float s = round_to<T>(raw / scale);
        scores[j] = s;
        local_max = fmaxf(local_max, s);
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
        shared_max = m;
    }
    __syncthreads();
    const float row_max = shared_max;
    for (int j = threadIdx.x; j <= i; j += blockDim.x) {
        scores[j] = exp_f32(scores[j] - row_max);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        float sum = 0.0f;
        for (int j = 0; j <= i; ++j) {
            sum += scores[j];
        }
        shared_inv = 1.0f / sum;
    }
    __syncthreads();
    const float inv = shared_inv;
    for (int j = threadIdx.x; j <= i; j += blockDim.x) {
        scores[j] = round_to<T>(scores[j] * inv);
    }
    __syncthreads();
    typename T::S* oh = out + (i64)r * q_width + (i64)h * head_dim;
    for (int t = threadIdx.x; t < head_dim; t += blockDim.x) {
        float acc = 0.0f;
        for (int j = 0; j <= i; ++j) {
            acc += scores[j] * T::load(v[(kv_base + j) * kv_width + kv_off + t]);
        }
        oh[t] = T::store(acc);
    }
}

#define ATTENTION_KERNEL(NAME, T)                                                        \
    extern "C" __global__ void NAME(const T::S* q, const T::S* k, const T::S* v,         \
                                    T::S* out, int seq, int n_heads, int n_kv_heads,     \
                                    int head_dim, int q_rows_per_batch, float scale) {   \
        attention_impl<T>(q, k, v, out, seq, n_heads, n_kv_heads, head_dim,              \
                          q_rows_per_batch, scale);                                      \
    }

ATTENTION_KERNEL(attention_f32, F32)
ATTENTION_KERNEL(attention_f16, F16)
ATTENTION_KERNEL(attention_bf16, BF16)
