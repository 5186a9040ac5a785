// The tail of a batch: from last-position logits to the (nonce, distance) pairs that pass
// r_target, so that only those cross back to the host.
//
//   tail_gather_<dtype>(logits, perm, o, batch, vocab):
//       o[b, j] = logits[b, perm[b, j]] as f32    (one thread per value, grid-stride, block 256)
//   tail_distance(o, target, dist, batch, vocab):
//       norm = sqrt(sum_j o[b, j]^2)              (f32, numpy's pairwise order)
//       dist[b] = sqrt(sum_j ((o[b, j] / norm) as f64 - target[j])^2)
//                                                 (f64, numpy's pairwise order)
//       one thread per nonce: block 32, grid ceil(batch / 32)
//   tail_filter(dist, batch, r_target, count, index, valid_dist):
//       the b with dist[b] < r_target (strict), in increasing order, into index and
//       valid_dist, their number into count; one block of 32 threads
//
// numpy's pairwise sum: fewer than 8 values are added in order from 0; up to 128 values go
// to 8 interleaved accumulators, combined as ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7)),
// then the remainder in order; longer runs split at n / 2 rounded down to a multiple of 8,
// the halves summed recursively and added.

#define PAIRWISE_BLOCK 128

// Element k of the f32 sum: the square of o[k].
struct SquareF32 {
    const float* o;
    __device__ __forceinline__ float operator()(i64 k) const { return o[k] * o[k]; }
};

// Element k of the f64 sum: the squared difference to the target.
struct DiffSquareF64 {
    const float* o;
    const double* target;
    float norm;
    __device__ __forceinline__ double operator()(i64 k) const {
        const double d = (double)(o[k] / norm) - target[k];
        return d * d;
    }
};

template <typename A, typename F>
__device__ A pairwise_leaf(const F& f, i64 lo, i64 n) {
    if (n < 8) {
        A res = (A)0;
        for (i64 k = 0; k < n; ++k) {
            res += f(lo + k);
        }
        return res;
    }
    A r[8];
    for (int j = 0; j < 8; ++j) {
        r[j] = f(lo + j);
    }
    const i64 full = n - n % 8;
    for (i64 k = 8; k < full; k += 8) {
        for (int j = 0; j < 8; ++j) {
            r[j] += f(lo + k + j);
        }
    }
    A res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for (i64 k = full; k < n; ++k) {
        res += f(lo + k);
    }
    return res;
}

// The recursion, unrolled onto an explicit stack: a range longer than a leaf pushes its
// left half; a finished value goes to its parent, which then either pushes its right half
// (the value was its left half) or adds left + right and hands that on in turn.
// The stack is per thread, so it is sized to what the largest vocab needs and no more: 15
// levels cover every length up to 2^20 (params' vocab limit; the deepest is 983,049).
// launch/tail.rs derives the figure from the recursion, checks it against this line, and
// refuses a longer vocab; kernels.rs checks the frame ptxas gives the kernel.
#define PAIRWISE_MAX_DEPTH 15

template <typename A, typename F>
__device__ A pairwise_sum(const F& f, i64 n_total) {
    i64 lo_stack[PAIRWISE_MAX_DEPTH];
    i64 n_stack[PAIRWISE_MAX_DEPTH];
    bool left_done[PAIRWISE_MAX_DEPTH];
    A left[PAIRWISE_MAX_DEPTH];
    int top = 0;
    lo_stack[0] = 0;
    n_stack[0] = n_total;
    left_done[0] = false;
    for (;;) {
        const i64 lo = lo_stack[top];
        const i64 n = n_stack[top];
        if (n > PAIRWISE_BLOCK) {
            i64 n2 = n / 2;
            n2 -= n2 % 8;
            lo_stack[top + 1] = lo;
            n_stack[top + 1] = n2;
            left_done[top + 1] = false;
            ++top;
            continue;
        }
        A value = pairwise_leaf<A>(f, lo, n);
        for (;;) {
            if (top == 0) {
                return value;
            }
            --top;
            if (!left_done[top]) {
                left_done[top] = true;
                left[top] = value;
                i64 n2 = n_stack[top] / 2;
                n2 -= n2 % 8;
                lo_stack[top + 1] = lo_stack[top] + n2;
                n_stack[top + 1] = n_stack[top] - n2;
                left_done[top + 1] = false;
                ++top;
                break;
            }
            value = left[top] + value;
        }
    }
}

template <typename T>
__device__ void tail_gather_impl(const typename T::S* logits, const i64* perm, float* o,
                                 int batch, int vocab) {
    const i64 total = (i64)batch * vocab;
    for (i64 k = global_index(); k < total; k += grid_threads()) {
        const i64 b = k / vocab;
        o[k] = T::load(logits[b * vocab + perm[k]]);
    }
}

#define TAIL_GATHER_KERNEL(NAME, T)                                                      \
    extern "C" __global__ void NAME(const T::S* logits, const i64* perm, float* o,       \
                                    int batch, int vocab) {                              \
        tail_gather_impl<T>(logits, perm, o, batch, vocab);                              \
    }

TAIL_GATHER_KERNEL(tail_gather_f32, F32)
TAIL_GATHER_KERNEL(tail_gather_f16, F16)
TAIL_GATHER_KERNEL(tail_gather_bf16, BF16)

extern "C" __global__ void tail_distance(const float* o, const double* target, double* dist,
                                         int batch, int vocab) {
    const i64 b = global_index();
    if (b >= batch) {
        return;
    }
    const float* ob = o + b * vocab;
    SquareF32 sq;
    sq.o = ob;
    const float norm = sqrtf(pairwise_sum<float>(sq, vocab));
    DiffSquareF64 ds;
    ds.o = ob;
    ds.target = target;
    ds.norm = norm;
    dist[b] = sqrt(pairwise_sum<double>(ds, vocab));
}

extern "C" __global__ void tail_filter(const double* dist, int batch, double r_target,
                                       int* count, int* index, double* valid_dist) {
    const unsigned int lane = threadIdx.x;
    int base = 0;
    for (int start = 0; start < batch; start += 32) {
        const int b = start + (int)lane;
        const bool valid = b < batch && dist[b] < r_target;
        const unsigned int mask = __ballot_sync(0xffffffffu, valid);
        if (valid) {
            const int slot = base + __popc(mask & ((1u << lane) - 1u));
            index[slot] = b;
            valid_dist[slot] = dist[b];
        }
        base += __popc(mask);
    }
    if (lane == 0) {
        *count = base;
    }
}
