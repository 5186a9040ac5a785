// Runs one CUDA kernel of kernels/*.cu on the CPU through the emulator (emulate.hpp), with
// the grid, block and shared memory that its Rust launcher (src/backend/cuda/launch/*.rs)
// uses. Driven by tests/kernel_emulation.rs.
//
//   harness <kernel> <dtype> key=value ...   < inputs   > outputs
//
// dtype is f32, f16 or bf16 (storage: f32, or the u16 bit patterns); tail_distance and
// tail_filter take "-". Integers are decimal; f32 / f64 scalars are their bit patterns in hex
// (eps=0x3727c5ac). Inputs are the kernel's input arrays, raw little-endian, one after the
// other in the order listed below; the outputs are written the same way. Grid-stride kernels
// take their number of blocks (blocks=n, block 256) so that a test can make them stride.
//
//   rmsnorm       rows dim eps             x[rows*dim] w[dim]         -> out[rows*dim]
//   rope          rows row_width head_dim rows_per_batch first_pos positions blocks
//                                          x[rows*row_width] cos[positions*head_dim/2] (f32)
//                                          sin[...] (f32)             -> x
//   attention, attention_smem
//                 batch seq n_heads n_kv_heads head_dim q_rows scale
//                 chunk (attention: scores in shared memory) smem (attention_smem)
//                                          q[batch*q_rows*n_heads*head_dim]
//                                          k[batch*seq*n_kv_heads*head_dim] v[same]
//                                                                     -> out[like q]
//   silu_mul, add n blocks                 a[n] b[n]                  -> a
//   silu_mul_amax n blocks                 a[n] b[n]          -> a, amax (u32, zeroed first)
//   from_f32      n blocks                 src[n] (f32)               -> dst[n]
//   to_f32        n blocks                 src[n]                     -> dst[n] (f32)
//   gather_rows   rows width src_stride blocks
//                                          src[(rows-1)*src_stride+width] -> dst[rows*width]
//   fill_direct   pool_size start numel blocks   pool[pool_size]      -> dst[numel]
//   fill_tiled    pool_size numel shift blocks   pool[pool_size]      -> dst[numel]
//   tail_gather   batch vocab blocks       logits[batch*vocab] perm[batch*vocab] (i64)
//                                                                     -> o[batch*vocab] (f32)
//   tail_distance batch vocab              o[batch*vocab] (f32) target[vocab] (f64)
//                                                                     -> dist[batch] (f64)
//   tail_filter   batch r_target           dist[batch] (f64)
//                                          -> count (i32) index[batch] (i32)
//                                             valid_dist[batch] (f64)
//   quantize_e4m3 rows width stride blocks x[(rows-1)*stride+width]
//                                          -> dst[rows*width] (u8) scale (f32) amax (u32)
//                 (amax_<dtype> then quantize_e4m3_<dtype>, the maximum zeroed first, as
//                 the launcher runs them)
//   selftest      case=<name>              checks of the emulator itself (see below)
//
// Every buffer is fenced by guard bytes (checked after the launch) and every output starts
// as 0xff bytes, so that a write out of bounds or a value never written shows.
//
// Environment: EMU_SCHEDULE, EMU_SEED, EMU_EXP (see emulate.hpp).

#include "emulate.hpp"

#include "../../kernels/common.cuh"
#include "../../kernels/elementwise.cu"
#include "../../kernels/rmsnorm.cu"
#include "../../kernels/rope.cu"
#include "../../kernels/attention.cu"
#include "../../kernels/tail.cu"
#include "../../kernels/weights.cu"
#include "../../kernels/fp8.cu"

#undef exp

#include <map>
#include <memory>
#include <string>
#include <vector>

namespace {

using emu::fail;

// A host buffer standing in for device memory, with guard bytes on both sides.
class Buf {
  public:
    static constexpr size_t GUARD = 64;
    Buf(std::string name, size_t bytes, unsigned char fill)
        : name_(std::move(name)), bytes_(bytes), raw_(bytes + 2 * GUARD, 0xa5) {
        std::memset(raw_.data() + GUARD, fill, bytes);
    }
    template <typename T>
    T* as() {
        return reinterpret_cast<T*>(raw_.data() + GUARD);
    }
    unsigned char* data() { return raw_.data() + GUARD; }
    size_t bytes() const { return bytes_; }
    void check() const {
        for (size_t i = 0; i < GUARD; ++i) {
            if (raw_[i] != 0xa5 || raw_[GUARD + bytes_ + i] != 0xa5) {
                fail("a kernel wrote outside %s (%zu bytes)", name_.c_str(), bytes_);
            }
        }
    }

  private:
    std::string name_;
    size_t bytes_;
    std::vector<unsigned char> raw_;
};

struct Io {
    std::map<std::string, std::string> args;
    std::vector<unsigned char> in;
    size_t pos = 0;
    std::vector<std::unique_ptr<Buf>> bufs;
    std::vector<Buf*> outs;

    long long i(const char* k) const {
        auto it = args.find(k);
        if (it == args.end()) {
            fail("missing argument %s", k);
        }
        char* end = nullptr;
        const long long v = std::strtoll(it->second.c_str(), &end, 10);
        if (*end != '\0') {
            fail("argument %s=%s is not an integer", k, it->second.c_str());
        }
        return v;
    }
    unsigned long long bits(const char* k) const {
        auto it = args.find(k);
        if (it == args.end()) {
            fail("missing argument %s", k);
        }
        return std::strtoull(it->second.c_str(), nullptr, 16);
    }
    float f32(const char* k) const { return std::bit_cast<float>((uint32_t)bits(k)); }
    double f64(const char* k) const { return std::bit_cast<double>((uint64_t)bits(k)); }

    // An input array of n values of T, read from stdin.
    Buf& input(const char* name, size_t n, size_t elem) {
        bufs.push_back(std::make_unique<Buf>(name, n * elem, 0));
        Buf* b = bufs.back().get();
        if (pos + b->bytes() > in.size()) {
            fail("input %s: %zu bytes expected, %zu left", name, b->bytes(), in.size() - pos);
        }
        std::memcpy(b->data(), in.data() + pos, b->bytes());
        pos += b->bytes();
        return *b;
    }
    // An output array, 0xff bytes until the kernel writes it.
    Buf& output(const char* name, size_t n, size_t elem) {
        bufs.push_back(std::make_unique<Buf>(name, n * elem, 0xff));
        Buf* b = bufs.back().get();
        outs.push_back(b);
        return *b;
    }
    // An input that the kernel also writes (in place): returned as an output as well.
    Buf& inout(const char* name, size_t n, size_t elem) {
        Buf& b = input(name, n, elem);
        outs.push_back(&b);
        return b;
    }
    void finish() {
        if (pos != in.size()) {
            fail("%zu input bytes left over", in.size() - pos);
        }
        for (const auto& b : bufs) {
            b->check();
        }
        for (Buf* b : outs) {
            if (std::fwrite(b->data(), 1, b->bytes(), stdout) != b->bytes()) {
                fail("cannot write the output");
            }
        }
        std::fflush(stdout);
    }
};

size_t count(long long v, const char* what) {
    if (v < 0) {
        fail("%s = %lld is negative", what, v);
    }
    return (size_t)v;
}

dim3 grid_stride_grid(const Io& io) { return dim3((unsigned int)io.i("blocks")); }

// ------------------------------------------------------------------------------------------
// One function per kernel, over the storage type S.

template <typename S, typename K>
void rmsnorm(K kernel, Io& io) {
    const int rows = (int)io.i("rows"), dim = (int)io.i("dim");
    const float eps = io.f32("eps");
    S* x = io.input("x", count(rows, "rows") * dim, sizeof(S)).template as<S>();
    S* w = io.input("weight", count(dim, "dim"), sizeof(S)).template as<S>();
    S* out = io.output("out", (size_t)rows * dim, sizeof(S)).template as<S>();
    // launch/rmsnorm.rs: grid ceil(rows / 4), block 32 * 4, no shared memory.
    emu::launch(dim3((unsigned int)((rows + 3) / 4)), dim3(128), 0,
                [&] { kernel(x, w, out, rows, dim, eps); });
}

template <typename S, typename K>
void rope(K kernel, Io& io) {
    const long long rows = io.i("rows");
    const int width = (int)io.i("row_width"), hd = (int)io.i("head_dim");
    const int rpb = (int)io.i("rows_per_batch"), first = (int)io.i("first_pos");
    const size_t table = count(io.i("positions"), "positions") * (size_t)(hd / 2);
    S* x = io.inout("x", count(rows, "rows") * (size_t)width, sizeof(S)).template as<S>();
    float* c = io.input("cos", table, 4).template as<float>();
    float* s = io.input("sin", table, 4).template as<float>();
    emu::launch(grid_stride_grid(io), dim3(256), 0,
                [&] { kernel(x, c, s, rows, width, hd, rpb, first); });
}

// The buffers of one attention launch and its shape.
template <typename S>
struct AttentionIo {
    int batch, seq, n_heads, n_kv, hd, qr;
    float scale;
    S *q, *k, *v, *out;

    explicit AttentionIo(Io& io)
        : batch((int)io.i("batch")),
          seq((int)io.i("seq")),
          n_heads((int)io.i("n_heads")),
          n_kv((int)io.i("n_kv_heads")),
          hd((int)io.i("head_dim")),
          qr((int)io.i("q_rows")),
          scale(io.f32("scale")) {
        const size_t q_len = (size_t)batch * qr * n_heads * hd;
        const size_t kv_len = (size_t)batch * seq * n_kv * hd;
        q = io.input("q", q_len, sizeof(S)).template as<S>();
        k = io.input("k", kv_len, sizeof(S)).template as<S>();
        v = io.input("v", kv_len, sizeof(S)).template as<S>();
        out = io.output("out", q_len, sizeof(S)).template as<S>();
    }
};

template <typename S, typename K>
void attention_smem(K kernel, Io& io) {
    AttentionIo<S> a(io);
    // launch/attention.rs: grid (batch * n_heads, ceil(q_rows / 32)), block 128,
    // attention::smem_bytes(seq, head_dim, dtype) (passed in by the test).
    emu::launch(dim3((unsigned int)(a.batch * a.n_heads), (unsigned int)((a.qr + 31) / 32)),
                dim3(128), count(io.i("smem"), "smem"), [&] {
                    kernel(a.q, a.k, a.v, a.out, a.seq, a.n_heads, a.n_kv, a.hd, a.qr,
                           a.scale);
                });
}

template <typename S, typename K>
void attention(K kernel, Io& io) {
    AttentionIo<S> a(io);
    const int chunk = (int)count(io.i("chunk"), "chunk");
    // launch/attention.rs: grid (batch * q_rows, n_heads), block 128, chunk * 4 bytes.
    emu::launch(dim3((unsigned int)(a.batch * a.qr), (unsigned int)a.n_heads), dim3(128),
                (size_t)chunk * 4, [&] {
                    kernel(a.q, a.k, a.v, a.out, a.seq, a.n_heads, a.n_kv, a.hd, a.qr,
                           a.scale, chunk);
                });
}

template <typename S, typename K>
void two_arrays(K kernel, Io& io) {
    const long long n = io.i("n");
    S* a = io.inout("a", count(n, "n"), sizeof(S)).template as<S>();
    S* b = io.input("b", (size_t)n, sizeof(S)).template as<S>();
    emu::launch(grid_stride_grid(io), dim3(256), 0, [&] { kernel(a, b, n); });
}

template <typename S, typename K>
void silu_mul_amax(K kernel, Io& io) {
    const long long n = io.i("n");
    S* a = io.inout("a", count(n, "n"), sizeof(S)).template as<S>();
    S* b = io.input("b", (size_t)n, sizeof(S)).template as<S>();
    Buf& amax_buf = io.output("amax", 1, 4);
    std::memset(amax_buf.data(), 0, 4);
    unsigned int* amax = amax_buf.template as<unsigned int>();
    emu::launch(grid_stride_grid(io), dim3(256), 0, [&] { kernel(a, b, n, amax); });
}

template <typename S, typename K>
void from_f32(K kernel, Io& io) {
    const long long n = io.i("n");
    float* src = io.input("src", count(n, "n"), 4).template as<float>();
    S* dst = io.output("dst", (size_t)n, sizeof(S)).template as<S>();
    emu::launch(grid_stride_grid(io), dim3(256), 0, [&] { kernel(src, dst, n); });
}

template <typename S, typename K>
void to_f32(K kernel, Io& io) {
    const long long n = io.i("n");
    S* src = io.input("src", count(n, "n"), sizeof(S)).template as<S>();
    float* dst = io.output("dst", (size_t)n, 4).template as<float>();
    emu::launch(grid_stride_grid(io), dim3(256), 0, [&] { kernel(src, dst, n); });
}

template <typename S, typename K>
void gather_rows(K kernel, Io& io) {
    const long long rows = io.i("rows"), width = io.i("width"), stride = io.i("src_stride");
    if (rows < 1 || width < 1 || stride < width) {
        fail("gather_rows: bad shape");
    }
    S* src = io.input("src", (size_t)((rows - 1) * stride + width), sizeof(S)).template as<S>();
    S* dst = io.output("dst", (size_t)(rows * width), sizeof(S)).template as<S>();
    emu::launch(grid_stride_grid(io), dim3(256), 0,
                [&] { kernel(src, dst, rows, width, stride); });
}

template <typename S, typename KA, typename KQ>
void quantize_e4m3(KA amax_kernel, KQ quantize_kernel, Io& io) {
    const long long rows = io.i("rows"), width = io.i("width"), stride = io.i("stride");
    if (rows < 1 || width < 1 || stride < width) {
        fail("quantize_e4m3: bad shape");
    }
    S* x = io.input("x", (size_t)((rows - 1) * stride + width), sizeof(S)).template as<S>();
    unsigned char* dst =
        io.output("dst", (size_t)(rows * width), 1).template as<unsigned char>();
    float* scale = io.output("scale", 1, 4).template as<float>();
    Buf& amax_buf = io.output("amax", 1, 4);
    std::memset(amax_buf.data(), 0, 4);
    unsigned int* amax = amax_buf.template as<unsigned int>();
    emu::launch(grid_stride_grid(io), dim3(256), 0,
                [&] { amax_kernel(x, rows, width, stride, amax); });
    emu::launch(grid_stride_grid(io), dim3(256), 0,
                [&] { quantize_kernel(x, rows, width, stride, amax, dst, scale); });
}

template <typename S, typename K>
void fill_direct(K kernel, Io& io) {
    const long long pool_size = io.i("pool_size"), start = io.i("start"), n = io.i("numel");
    S* pool = io.input("pool", count(pool_size, "pool_size"), sizeof(S)).template as<S>();
    S* dst = io.output("dst", count(n, "numel"), sizeof(S)).template as<S>();
    emu::launch(grid_stride_grid(io), dim3(256), 0, [&] { kernel(pool, start, dst, n); });
}

template <typename S, typename K>
void fill_tiled(K kernel, Io& io) {
    const long long pool_size = io.i("pool_size"), n = io.i("numel"), shift = io.i("shift");
    S* pool = io.input("pool", count(pool_size, "pool_size"), sizeof(S)).template as<S>();
    S* dst = io.output("dst", count(n, "numel"), sizeof(S)).template as<S>();
    emu::launch(grid_stride_grid(io), dim3(256), 0,
                [&] { kernel(pool, pool_size, dst, n, shift); });
}

template <typename S, typename K>
void tail_gather(K kernel, Io& io) {
    const int batch = (int)io.i("batch"), vocab = (int)io.i("vocab");
    const size_t n = count(batch, "batch") * count(vocab, "vocab");
    S* logits = io.input("logits", n, sizeof(S)).template as<S>();
    i64* perm = io.input("perm", n, 8).template as<i64>();
    float* o = io.output("o", n, 4).template as<float>();
    emu::launch(grid_stride_grid(io), dim3(256), 0,
                [&] { kernel(logits, perm, o, batch, vocab); });
}

void run_tail_distance(Io& io) {
    const int batch = (int)io.i("batch"), vocab = (int)io.i("vocab");
    float* o = io.input("o", count(batch, "batch") * count(vocab, "vocab"), 4).as<float>();
    double* target = io.input("target", (size_t)vocab, 8).as<double>();
    double* dist = io.output("dist", (size_t)batch, 8).as<double>();
    // launch/tail.rs: grid ceil(batch / 32), block 32.
    emu::launch(dim3((unsigned int)((batch + 31) / 32)), dim3(32), 0,
                [&] { tail_distance(o, target, dist, batch, vocab); });
}

void run_tail_filter(Io& io) {
    const int batch = (int)io.i("batch");
    const double r_target = io.f64("r_target");
    double* dist = io.input("dist", count(batch, "batch"), 8).as<double>();
    int* n_valid = io.output("count", 1, 4).as<int>();
    int* index = io.output("index", (size_t)batch, 4).as<int>();
    double* valid = io.output("valid_dist", (size_t)batch, 8).as<double>();
    // launch/tail.rs: one block of 32 threads.
    emu::launch(dim3(1), dim3(32), 0,
                [&] { tail_filter(dist, batch, r_target, n_valid, index, valid); });
}

// ------------------------------------------------------------------------------------------
// Checks of the emulator itself: `ok_*` cases print "ok", the others must stop the program
// with the emulator's message (exit status 70).

void selftest(const std::string& which) {
    if (which == "ok_warp_primitives") {
        // Shuffles, xor shuffles and ballots of two warps and a partial third one.
        std::vector<int> got(80 * 4, -1);
        emu::launch(dim3(2), dim3(80), 0, [&] {
            const int t = (int)threadIdx.x;
            const int lane = t % 32;
            const int lanes = t / 32 == 2 ? 16 : 32;
            const unsigned int mask = lanes == 32 ? 0xffffffffu : 0xffffu;
            const int from = __shfl_sync(mask, t * 10, (lane + 1) % lanes);
            const int x = __shfl_xor_sync(mask, t, lanes == 32 ? 5 : 3);
            const unsigned int b = __ballot_sync(mask, lane % 3 == 0);
            __syncthreads();
            if (blockIdx.x == 1) {
                got[t * 4 + 0] = from;
                got[t * 4 + 1] = x;
                got[t * 4 + 2] = (int)b;
                got[t * 4 + 3] = (int)blockDim.x;
            }
        });
        for (int t = 0; t < 80; ++t) {
            const int lane = t % 32, base = t - lane;
            const int lanes = t / 32 == 2 ? 16 : 32;
            unsigned int ballot = 0;
            for (int l = 0; l < lanes; ++l) {
                ballot |= (l % 3 == 0 ? 1u : 0u) << l;
            }
            const int want[4] = {(base + (lane + 1) % lanes) * 10,
                                 base + (lane ^ (lanes == 32 ? 5 : 3)), (int)ballot, 80};
            for (int j = 0; j < 4; ++j) {
                if (got[t * 4 + j] != want[j]) {
                    fail("selftest: thread %d value %d: %d, expected %d", t, j, got[t * 4 + j],
                         want[j]);
                }
            }
        }
    } else if (which == "ok_shared_memory") {
        // A static shared array is shared by the block's threads and starts as 0xff bytes in
        // every block; dynamic shared memory likewise.
        std::vector<unsigned int> seen(3, 0);
        emu::launch(dim3(3), dim3(64), 40, [&] {
            SHARED_ARRAY(unsigned int, a, 64);
            DYNAMIC_SHARED(unsigned int, d);
            if (threadIdx.x == 0) {
                seen[blockIdx.x] = a[5] & d[9];
            }
            __syncthreads();
            a[threadIdx.x] = threadIdx.x + 100 * blockIdx.x;
            if (threadIdx.x < 10) {
                d[threadIdx.x] = threadIdx.x;
            }
            __syncthreads();
            if (a[63 - threadIdx.x] != 63 - threadIdx.x + 100 * blockIdx.x) {
                fail("selftest: shared array not shared");
            }
        });
        for (unsigned int s : seen) {
            if (s != 0xffffffffu) {
                fail("selftest: shared memory not refilled: %08x", s);
            }
        }
    } else if (which == "divergent_shuffle") {
        emu::launch(dim3(1), dim3(32), 0, [&] {
            float v = 1.0f;
            if (threadIdx.x < 16) {
                v = __shfl_sync(0xffffffffu, v, 0);
            } else {
                v = __shfl_sync(0xffffffffu, v, 1);
            }
        });
    } else if (which == "exited_lane") {
        emu::launch(dim3(1), dim3(64), 0, [&] {
            if (threadIdx.x == 3) {
                return;
            }
            __syncthreads();
        });
    } else if (which == "divergent_barrier") {
        emu::launch(dim3(1), dim3(64), 0, [&] {
            if (threadIdx.x < 32) {
                __syncthreads();
            } else {
                __syncwarp();
                __syncthreads();  // another call site
            }
        });
    } else if (which == "deadlock") {
        emu::launch(dim3(1), dim3(64), 0, [&] {
            if (threadIdx.x % 32 < 16) {
                __syncwarp();  // half of each warp waits here, the other half below
            }
            __syncthreads();
        });
    } else if (which == "shared_overrun") {
        emu::launch(dim3(1), dim3(32), 16, [&] {
            DYNAMIC_SHARED(float, d);
            d[threadIdx.x] = 0.0f;
        });
    } else if (which == "partial_mask") {
        emu::launch(dim3(1), dim3(32), 0, [&] { (void)__ballot_sync(0xffffu, 1); });
    } else {
        fail("unknown selftest %s", which.c_str());
    }
    std::printf("ok\n");
}

}  // namespace

#define BY_DTYPE(fn, base, ...)                                                          \
    do {                                                                                 \
        if (dt == "f32") {                                                               \
            fn<float>(base##_f32, io __VA_OPT__(, ) __VA_ARGS__);                        \
        } else if (dt == "f16") {                                                        \
            fn<u16>(base##_f16, io __VA_OPT__(, ) __VA_ARGS__);                          \
        } else if (dt == "bf16") {                                                       \
            fn<u16>(base##_bf16, io __VA_OPT__(, ) __VA_ARGS__);                         \
        } else {                                                                         \
            fail("unknown dtype %s", dt.c_str());                                       \
        }                                                                                \
    } while (0)

int main(int argc, char** argv) {
    if (argc < 3) {
        fail("usage: harness <kernel> <dtype> key=value ... < inputs > outputs");
    }
    emu::read_environment();
    emu::read_exp_environment();
    const std::string cmd = argv[1], dt = argv[2];
    Io io;
    for (int a = 3; a < argc; ++a) {
        const std::string kv = argv[a];
        const size_t eq = kv.find('=');
        if (eq == std::string::npos) {
            fail("argument %s is not key=value", kv.c_str());
        }
        io.args[kv.substr(0, eq)] = kv.substr(eq + 1);
    }
    if (cmd == "selftest") {
        selftest(io.args["case"]);
        return 0;
    }
    unsigned char chunk[1 << 16];
    size_t got;
    while ((got = std::fread(chunk, 1, sizeof(chunk), stdin)) > 0) {
        io.in.insert(io.in.end(), chunk, chunk + got);
    }
    if (cmd == "rmsnorm") {
        BY_DTYPE(rmsnorm, rmsnorm);
    } else if (cmd == "rope") {
        BY_DTYPE(rope, rope);
    } else if (cmd == "attention") {
        BY_DTYPE(attention, attention);
    } else if (cmd == "attention_smem") {
        BY_DTYPE(attention_smem, attention_smem);
    } else if (cmd == "silu_mul") {
        BY_DTYPE(two_arrays, silu_mul);
    } else if (cmd == "silu_mul_amax") {
        BY_DTYPE(silu_mul_amax, silu_mul_amax);
    } else if (cmd == "add") {
        BY_DTYPE(two_arrays, add);
    } else if (cmd == "from_f32") {
        BY_DTYPE(from_f32, from_f32);
    } else if (cmd == "to_f32") {
        BY_DTYPE(to_f32, to_f32);
    } else if (cmd == "quantize_e4m3") {
        if (dt == "f32") {
            quantize_e4m3<float>(amax_f32, quantize_e4m3_f32, io);
        } else if (dt == "f16") {
            quantize_e4m3<u16>(amax_f16, quantize_e4m3_f16, io);
        } else if (dt == "bf16") {
            quantize_e4m3<u16>(amax_bf16, quantize_e4m3_bf16, io);
        } else {
            fail("unknown dtype %s", dt.c_str());
        }
    } else if (cmd == "gather_rows") {
        BY_DTYPE(gather_rows, gather_rows);
    } else if (cmd == "fill_direct") {
        BY_DTYPE(fill_direct, fill_direct);
    } else if (cmd == "fill_tiled") {
        BY_DTYPE(fill_tiled, fill_tiled);
    } else if (cmd == "tail_gather") {
        BY_DTYPE(tail_gather, tail_gather);
    } else if (cmd == "tail_distance") {
        run_tail_distance(io);
    } else if (cmd == "tail_filter") {
        run_tail_filter(io);
    } else {
        fail("unknown kernel %s", cmd.c_str());
    }
    io.finish();
    return 0;
}
