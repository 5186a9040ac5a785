// Rotary position embedding of adjacent pairs, in place:
//   (x0, x1) -> (round_T(x0 * c - x1 * s), round_T(x1 * c + x0 * s))
// with (c, s) from a table the host builds exactly as the CPU backend does (f32 angles, the
// host's cosf / sinf, each value rounded to T, stored as f32): `half = head_dim / 2` pairs
// per position. Row r of x sits at position first_pos + r % rows_per_batch.
//
// Launch: rope_<dtype>(x, cos, sin, rows, row_width, head_dim, rows_per_batch, first_pos);
// one thread per pair, any 1-D grid (grid-stride loop); block 256.

template <typename T>
__device__ void rope_impl(typename T::S* x, const float* cos_t, const float* sin_t, i64 rows,
                          int row_width, int head_dim, int rows_per_batch, int first_pos) {
    const int half = head_dim / 2;
    const i64 pairs_per_row = row_width / 2;
    const i64 total = rows * pairs_per_row;
    for (i64 p = global_index(); p < total; p += grid_threads()) {
        const i64 r = p / pairs_per_row;
        const int c = (int)(p % pairs_per_row) * 2;
        const int j = (c % head_dim) / 2;
        const int pos = first_pos + (int)(r % rows_per_batch);
        const float cs = cos_t[(i64)pos * half + j];
        const float sn = sin_t[(i64)pos * half + j];
        typename T::S* e = x + r * row_width + c;
        const float x0 = T::load(e[0]);
        const float x1 = T::load(e[1]);
        e[0] = T::store(x0 * cs - x1 * sn);
        e[1] = T::store(x1 * cs + x0 * sn);
    }
}

#define ROPE_KERNEL(NAME, T)                                                             \
    extern "C" __global__ void NAME(T::S* x, const float* cos_t, const float* sin_t,     \
                                    i64 rows, int row_width, int head_dim,               \
                                    int rows_per_batch, int first_pos) {                 \
        rope_impl<T>(x, cos_t, sin_t, rows, row_width, head_dim, rows_per_batch,         \
                     first_pos);                                                         \
    }

ROPE_KERNEL(rope_f32, F32)
ROPE_KERNEL(rope_f16, F16)
ROPE_KERNEL(rope_bf16, BF16)
