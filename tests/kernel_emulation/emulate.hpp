// Host emulation of the CUDA built-ins that the kernels under kernels/ use, so that their
// exact source runs on the CPU (tests/kernel_emulation.rs compares the results with the CPU
// backend). Include this first, then kernels/common.cuh, then the families' .cu files.
//
// A launch runs its blocks one after another. The threads of a block are fibers on the
// calling OS thread (user-level stacks and a context switch), not OS threads: creating 128
// OS threads costs milliseconds per block on a small machine, a fiber switch costs tens of
// nanoseconds, and with fibers every synchronisation is checked exactly:
// - __syncthreads is a barrier of the block's threads, __syncwarp / __shfl_sync /
//   __shfl_xor_sync / __ballot_sync one of the warp's lanes (32 per warp);
// - every member must reach the same primitive at the same call site, with the mask naming
//   exactly the warp's lanes; a member that has exited, a divergent call site, or a block in
//   which every unfinished thread waits (deadlock) stops the program with a message;
// - a fiber runs until it waits at a barrier; which ready fiber runs next is first-in
//   first-out, last-in first-out or seeded-random (EMU_SCHEDULE=fifo|lifo|random,
//   EMU_SEED=n), so that a missing barrier shows up as a result that depends on the
//   schedule;
// - shared memory (SHARED_ARRAY: a function-local static; DYNAMIC_SHARED: a per-launch
//   buffer of the launch's size, 16-byte aligned) is filled with 0xff bytes (a NaN in every
//   float format) at the start of every block, and the dynamic buffer is fenced by guard
//   bytes that are checked after every block.
//
// exp(double) is the host's (glibc's, correctly rounded in practice; CUDA's is within one
// double ulp, so the f32 result differs only where the double lies next to an f32 rounding
// boundary). EMU_EXP=host_expf replaces it, for arguments that are f32 values, with the
// host's expf widened to double: (float)exp((double)x) is then exactly the expf that the CPU
// backend calls through Rust's f32::exp, which lets a test check everything around the
// exponential bit for bit.
#pragma once

#include <algorithm>
#include <bit>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <math.h>
#include <source_location>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>
#include <sys/mman.h>
#include <unistd.h>
#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
    constexpr dim3() = default;
    constexpr dim3(unsigned int x_, unsigned int y_ = 1, unsigned int z_ = 1)
        : x(x_), y(y_), z(z_) {}
};

// The running thread's indices: set by the scheduler before it switches to a fiber.
inline dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace emu {

[[noreturn]] inline void fail(const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    std::fputs("emulator: ", stderr);
    std::vfprintf(stderr, fmt, ap);
    std::fputc('\n', stderr);
    va_end(ap);
    std::fflush(stderr);
    std::fflush(stdout);
    std::_Exit(70);
}

// ------------------------------------------------------------------------------------------
// Fibers

#if defined(__x86_64__)
// Saves the callee-saved registers on the current stack, stores the stack pointer in *save,
// switches to `next` (a stack saved the same way, or prepared by make_stack) and pops them.
extern "C" void emu_ctx_switch(void** save, void* next);
asm(R"(
    .pushsection .text
    .globl emu_ctx_switch
    .type emu_ctx_switch, @function
emu_ctx_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_ctx_switch, .-emu_ctx_switch
    .popsection
)");
#endif

constexpr size_t STACK_BYTES = 256 * 1024;
constexpr unsigned int MAX_THREADS = 1024;

// Fiber stacks, mapped once and reused by every block, each above a guard page.
inline char* stack_base(unsigned int i) {
    static std::vector<char*> stacks;
    while (stacks.size() <= i) {
        const size_t page = (size_t)sysconf(_SC_PAGESIZE);
        void* p = mmap(nullptr, STACK_BYTES + page, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) {
            fail("cannot map a fiber stack");
        }
        mprotect(p, page, PROT_NONE);
        stacks.push_back((char*)p + page);
    }
    return stacks[i];
}

// A set of threads that synchronise together: the block or one warp.
struct Group {
    int expected = 0;
    int arrived = 0;
    int exited = 0;
    const char* op = nullptr;
    std::source_location site;
    std::vector<int> waiting;
};

struct Warp {
    Group group;
    int lanes = 0;
    unsigned int mask = 0;  // the lanes present
    uint64_t slots[32] = {};
};

struct Fiber {
#if defined(__x86_64__)
    void* sp = nullptr;
#else
    ucontext_t ctx;
#endif
    dim3 tid;
    int warp = 0;
    int lane = 0;
    bool done = false;
    const char* op = nullptr;  // where it waits
    std::source_location site;
};

enum class Schedule { Fifo, Lifo, Random };

struct Launch {
    dim3 grid, block;
    size_t smem = 0;
    std::function<void()> body;
    std::vector<Fiber> fibers;
    Group block_group;
    std::vector<Warp> warps;
    std::vector<int> ready;
    size_t ready_head = 0;
    int current = -1;
#if defined(__x86_64__)
    void* sched_sp = nullptr;
#else
    ucontext_t sched_ctx;
#endif
    std::vector<unsigned char> dyn;  // guard, smem, guard
};

constexpr size_t DYN_GUARD = 64;
constexpr unsigned char GUARD_BYTE = 0xa5;

inline Launch* g_launch = nullptr;
inline uint64_t g_epoch = 0;  // blocks started so far, in any launch
inline Schedule g_schedule = Schedule::Fifo;
inline uint64_t g_rng = 0x9e3779b97f4a7c15ull;

inline uint64_t next_random() {
    uint64_t z = (g_rng += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

inline void read_environment() {
    if (const char* s = std::getenv("EMU_SCHEDULE")) {
        const std::string v = s;
        if (v == "fifo") {
            g_schedule = Schedule::Fifo;
        } else if (v == "lifo") {
            g_schedule = Schedule::Lifo;
        } else if (v == "random") {
            g_schedule = Schedule::Random;
        } else {
            fail("EMU_SCHEDULE must be fifo, lifo or random, not %s", s);
        }
    }
    if (const char* s = std::getenv("EMU_SEED")) {
        g_rng = std::strtoull(s, nullptr, 0);
    }
}

inline Launch& launch_state() {
    if (g_launch == nullptr) {
        fail("a CUDA built-in was called outside a launch");
    }
    return *g_launch;
}

inline std::string where(const std::source_location& s) {
    return std::string(s.file_name()) + ":" + std::to_string(s.line());
}

inline std::string thread_name(const Fiber& f) {
    return "thread (" + std::to_string(f.tid.x) + "," + std::to_string(f.tid.y) + "," +
           std::to_string(f.tid.z) + ") of block (" + std::to_string(blockIdx.x) + "," +
           std::to_string(blockIdx.y) + "," + std::to_string(blockIdx.z) + ")";
}

// Back to the scheduler from the running fiber.
inline void to_scheduler() {
    Launch& L = *g_launch;
    Fiber& f = L.fibers[L.current];
#if defined(__x86_64__)
    emu_ctx_switch(&f.sp, L.sched_sp);
#else
    swapcontext(&f.ctx, &L.sched_ctx);
#endif
}

// The running fiber reaches `op` of group `g` at `site`; it resumes when every member has.
inline void arrive(Group& g, const char* op, const std::source_location& site,
                   const char* group_name) {
    Launch& L = launch_state();
    Fiber& f = L.fibers[L.current];
    if (g.exited > 0) {
        fail("%s at %s: %s waits for %d thread(s) of its %s that have exited",
             op, where(site).c_str(), thread_name(f).c_str(), g.exited, group_name);
    }
    if (g.arrived == 0) {
        g.op = op;
        g.site = site;
    } else if (std::strcmp(g.op, op) != 0 || g.site.line() != site.line() ||
               g.site.column() != site.column() ||
               std::strcmp(g.site.file_name(), site.file_name()) != 0) {
        fail("divergent synchronisation in a %s: %s is at %s (%s) while others are at %s (%s)",
             group_name, thread_name(f).c_str(), op, where(site).c_str(), g.op,
             where(g.site).c_str());
    }
    f.op = op;
    f.site = site;
    g.waiting.push_back(L.current);
    if (++g.arrived == g.expected) {
        for (int w : g.waiting) {
            L.ready.push_back(w);
        }
        g.waiting.clear();
        g.arrived = 0;
    }
    to_scheduler();
    f.op = nullptr;
}

inline void thread_exits() {
    Launch& L = *g_launch;
    Fiber& f = L.fibers[L.current];
    f.done = true;
    Group* groups[2] = {&L.block_group, &L.warps[f.warp].group};
    const char* names[2] = {"block", "warp"};
    for (int i = 0; i < 2; ++i) {
        Group& g = *groups[i];
        ++g.exited;
        if (g.arrived > 0) {
            fail("%s exited while %d thread(s) of its %s wait at %s (%s)",
                 thread_name(f).c_str(), g.arrived, names[i], g.op, where(g.site).c_str());
        }
    }
}

inline void fiber_main() {
    g_launch->body();
    thread_exits();
    to_scheduler();
    fail("a finished fiber was resumed");
}

#if defined(__x86_64__)
extern "C" inline void emu_fiber_entry() {
    fiber_main();
}
#endif

inline void start_fiber(Launch& L, int i) {
    char* top = stack_base((unsigned int)i) + STACK_BYTES;
#if defined(__x86_64__)
    // Six zeroed registers, then the entry as the return address, then a fake return address
    // of the entry: at the entry %rsp % 16 == 8, as after a call.
    void** sp = (void**)top;
    *--sp = nullptr;
    *--sp = (void*)&emu_fiber_entry;
    for (int r = 0; r < 6; ++r) {
        *--sp = nullptr;
    }
    L.fibers[i].sp = sp;
#else
    Fiber& f = L.fibers[i];
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = top - STACK_BYTES;
    f.ctx.uc_stack.ss_size = STACK_BYTES;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, (void (*)())fiber_main, 0);
#endif
}

inline void run_block(Launch& L) {
    const unsigned int n = L.block.x * L.block.y * L.block.z;
    ++g_epoch;
    if (L.smem > 0) {
        std::memset(L.dyn.data() + DYN_GUARD, 0xff, L.smem);
    }
    L.block_group = Group{};
    L.block_group.expected = (int)n;
    const unsigned int n_warps = (n + 31) / 32;
    L.warps.assign(n_warps, Warp{});
    for (unsigned int w = 0; w < n_warps; ++w) {
        const unsigned int lanes = n - 32 * w < 32 ? n - 32 * w : 32;
        L.warps[w].lanes = (int)lanes;
        L.warps[w].mask = lanes == 32 ? 0xffffffffu : (1u << lanes) - 1u;
        L.warps[w].group.expected = (int)lanes;
    }
    L.fibers.assign(n, Fiber{});
    L.ready.clear();
    L.ready_head = 0;
    for (unsigned int i = 0; i < n; ++i) {
        Fiber& f = L.fibers[i];
        f.tid = dim3(i % L.block.x, (i / L.block.x) % L.block.y, i / (L.block.x * L.block.y));
        f.warp = (int)(i / 32);
        f.lane = (int)(i % 32);
        start_fiber(L, (int)i);
        L.ready.push_back((int)i);
    }
    for (;;) {
        const size_t pending = L.ready.size() - L.ready_head;
        if (pending == 0) {
            break;
        }
        int next;
        if (g_schedule == Schedule::Fifo) {
            next = L.ready[L.ready_head++];
        } else if (g_schedule == Schedule::Lifo) {
            next = L.ready.back();
            L.ready.pop_back();
        } else {
            const size_t k = L.ready_head + next_random() % pending;
            next = L.ready[k];
            L.ready[k] = L.ready.back();
            L.ready.pop_back();
        }
        if (L.ready_head > 4096 && L.ready_head * 2 > L.ready.size()) {
            L.ready.erase(L.ready.begin(), L.ready.begin() + (std::ptrdiff_t)L.ready_head);
            L.ready_head = 0;
        }
        L.current = next;
        threadIdx = L.fibers[next].tid;
#if defined(__x86_64__)
        emu_ctx_switch(&L.sched_sp, L.fibers[next].sp);
#else
        swapcontext(&L.sched_ctx, &L.fibers[next].ctx);
#endif
    }
    L.current = -1;
    std::string stuck;
    int n_stuck = 0;
    for (const Fiber& f : L.fibers) {
        if (!f.done) {
            if (n_stuck++ < 8) {
                stuck += "\n  " + thread_name(f) + " waits at " + (f.op ? f.op : "?") + " (" +
                         where(f.site) + ")";
            }
        }
    }
    if (n_stuck > 0) {
        fail("deadlock: %d thread(s) wait forever:%s", n_stuck, stuck.c_str());
    }
    for (size_t i = 0; i < DYN_GUARD; ++i) {
        if (L.dyn[i] != GUARD_BYTE || L.dyn[DYN_GUARD + L.smem + i] != GUARD_BYTE) {
            fail("block (%u,%u,%u) wrote outside its %zu bytes of dynamic shared memory",
                 blockIdx.x, blockIdx.y, blockIdx.z, L.smem);
        }
    }
}

// Runs `body` (the kernel call) as a launch of `grid` x `block` threads with `smem` bytes of
// dynamic shared memory.
inline void launch(dim3 grid, dim3 block, size_t smem, std::function<void()> body) {
    const unsigned long long n = (unsigned long long)block.x * block.y * block.z;
    if (n == 0 || n > MAX_THREADS || block.z > 64) {
        fail("invalid block (%u,%u,%u)", block.x, block.y, block.z);
    }
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535) {
        fail("invalid grid (%u,%u,%u)", grid.x, grid.y, grid.z);
    }
    if (smem > 227 * 1024) {
        fail("%zu bytes of dynamic shared memory: more than any device gives a block", smem);
    }
    Launch L;
    L.grid = grid;
    L.block = block;
    L.smem = smem;
    L.body = std::move(body);
    L.dyn.assign(smem + 2 * DYN_GUARD, GUARD_BYTE);
    g_launch = &L;
    gridDim = grid;
    blockDim = block;
    std::vector<dim3> order;
    for (unsigned int z = 0; z < grid.z; ++z) {
        for (unsigned int y = 0; y < grid.y; ++y) {
            for (unsigned int x = 0; x < grid.x; ++x) {
                order.push_back(dim3(x, y, z));
            }
        }
    }
    if (g_schedule == Schedule::Lifo) {
        std::reverse(order.begin(), order.end());
    } else if (g_schedule == Schedule::Random) {
        for (size_t i = order.size(); i > 1; --i) {
            std::swap(order[i - 1], order[next_random() % i]);
        }
    }
    for (const dim3& b : order) {
        blockIdx = b;
        run_block(L);
    }
    g_launch = nullptr;
}

// The dynamic shared memory of the running block (DYNAMIC_SHARED), 16-byte aligned.
inline void* dynamic_shared() {
    Launch& L = launch_state();
    return L.dyn.data() + DYN_GUARD;
}

// A SHARED_ARRAY's static storage: filled with 0xff bytes by the first of the block's
// threads to declare it.
inline void fresh_shared(void* p, size_t bytes) {
    static std::unordered_map<void*, uint64_t> seen;
    uint64_t& epoch = seen[p];
    if (epoch != g_epoch) {
        epoch = g_epoch;
        std::memset(p, 0xff, bytes);
    }
}

// ------------------------------------------------------------------------------------------
// Warp primitives

inline Warp& running_warp(unsigned int mask, const char* op, const std::source_location& s) {
    Launch& L = launch_state();
    Fiber& f = L.fibers[L.current];
    Warp& w = L.warps[f.warp];
    if (mask != w.mask) {
        fail("%s at %s: mask %08x, but the warp's lanes are %08x", op, where(s).c_str(), mask,
             w.mask);
    }
    return w;
}

template <typename T>
T shuffle(unsigned int mask, T v, int src, const char* op, const std::source_location& s) {
    static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8);
    Launch& L = launch_state();
    Warp& w = running_warp(mask, op, s);
    const int lane = L.fibers[L.current].lane;
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    w.slots[lane] = bits;
    arrive(w.group, op, s, "warp");
    if (src < 0 || src >= w.lanes) {
        fail("%s at %s: lane %d reads lane %d of a warp of %d", op, where(s).c_str(), lane, src,
             w.lanes);
    }
    bits = w.slots[src];
    arrive(w.group, op, s, "warp");  // everyone has read before the slots are reused
    T out;
    std::memcpy(&out, &bits, sizeof(T));
    return out;
}

// ------------------------------------------------------------------------------------------
// exp(double), as the kernels call it

enum class ExpMode { Device, HostExpf };
inline ExpMode g_exp = ExpMode::Device;

inline double exp_of(double x) {
    if (g_exp == ExpMode::HostExpf) {
        const float f = (float)x;
        if ((double)f != x) {
            fail("EMU_EXP=host_expf: exp of %a, which is not an f32 value", x);
        }
        return (double)::expf(f);
    }
    return ::exp(x);
}

inline void read_exp_environment() {
    if (const char* s = std::getenv("EMU_EXP")) {
        const std::string v = s;
        if (v == "device") {
            g_exp = ExpMode::Device;
        } else if (v == "host_expf") {
            g_exp = ExpMode::HostExpf;
        } else {
            fail("EMU_EXP must be device or host_expf, not %s", s);
        }
    }
}

// ------------------------------------------------------------------------------------------
// IEEE half precision, round to nearest even (what cvt.rn.f16.f32 / cvt.f32.f16 do).

inline float f16_to_f32(unsigned short h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t e = (h >> 10) & 0x1fu;
    const uint32_t m = h & 0x3ffu;
    if (e == 0x1fu) {
        return std::bit_cast<float>(sign | 0x7f800000u | (m << 13));  // inf, NaN
    }
    if (e == 0) {
        // Zero or subnormal: m * 2^-24, exact in f32.
        const float mag = (float)m * 0x1p-24f;
        return std::bit_cast<float>(sign | std::bit_cast<uint32_t>(mag));
    }
    return std::bit_cast<float>(sign | ((e + 112u) << 23) | (m << 13));
}

inline unsigned short f32_to_f16(float f) {
    const uint32_t x = std::bit_cast<uint32_t>(f);
    const uint32_t sign = (x >> 16) & 0x8000u;
    const uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) {
        return (unsigned short)(sign | 0x7e00u | ((ax >> 13) & 0x3ffu));  // a quiet NaN
    }
    if (ax >= 0x477ff000u) {
        return (unsigned short)(sign | 0x7c00u);  // 65520 and above round to infinity
    }
    if (ax >= 0x38800000u) {
        // Normal (2^-14 and above): round the 13 dropped bits to even, rebias 127 -> 15.
        const uint32_t r = ax + 0xfffu + ((ax >> 13) & 1u) - 0x38000000u;
        return (unsigned short)(sign | (r >> 13));
    }
    const uint32_t e = ax >> 23;
    if (e < 102u) {
        return (unsigned short)sign;  // below 2^-25: zero
    }
    // Subnormal: the value in units of 2^-24 is m * 2^(e - 126), 14 <= 126 - e <= 24.
    const uint32_t m = (ax & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - e;
    uint32_t q = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (q & 1u))) {
        ++q;  // may carry into the smallest normal, which is the right encoding
    }
    return (unsigned short)(sign | q);
}

}  // namespace emu

// ------------------------------------------------------------------------------------------
// The built-ins, under their CUDA names.

inline float emu_f16_to_f32(unsigned short h) { return emu::f16_to_f32(h); }
inline unsigned short emu_f32_to_f16(float f) { return emu::f32_to_f16(f); }
inline void* emu_dynamic_shared() { return emu::dynamic_shared(); }
inline void emu_fresh_shared(void* p, size_t bytes) { emu::fresh_shared(p, bytes); }

inline void __syncthreads(std::source_location s = std::source_location::current()) {
    emu::arrive(emu::launch_state().block_group, "__syncthreads", s, "block");
}

inline void __syncwarp(unsigned int mask = 0xffffffffu,
                       std::source_location s = std::source_location::current()) {
    emu::Warp& w = emu::running_warp(mask, "__syncwarp", s);
    emu::arrive(w.group, "__syncwarp", s, "warp");
}

template <typename T>
T __shfl_sync(unsigned int mask, T v, int src_lane, int width = 32,
              std::source_location s = std::source_location::current()) {
    if (width != 32) {
        emu::fail("__shfl_sync with width %d: only 32 is emulated", width);
    }
    return emu::shuffle(mask, v, ((src_lane % 32) + 32) % 32, "__shfl_sync", s);
}

template <typename T>
T __shfl_xor_sync(unsigned int mask, T v, int lane_mask, int width = 32,
                  std::source_location s = std::source_location::current()) {
    if (width != 32) {
        emu::fail("__shfl_xor_sync with width %d: only 32 is emulated", width);
    }
    emu::Launch& L = emu::launch_state();
    const int lane = L.fibers[L.current].lane;
    return emu::shuffle(mask, v, (lane ^ lane_mask) & 31, "__shfl_xor_sync", s);
}

inline unsigned int __ballot_sync(unsigned int mask, int predicate,
                                  std::source_location s = std::source_location::current()) {
    const unsigned int v = predicate != 0 ? 1u : 0u;
    emu::Warp& w = emu::running_warp(mask, "__ballot_sync", s);
    unsigned int out = 0;
    // Every lane's bit, through the same exchange as a shuffle from each lane in turn.
    emu::Launch& L = emu::launch_state();
    const int lane = L.fibers[L.current].lane;
    w.slots[lane] = v;
    emu::arrive(w.group, "__ballot_sync", s, "warp");
    for (int l = 0; l < w.lanes; ++l) {
        out |= (unsigned int)(w.slots[l] & 1u) << l;
    }
    emu::arrive(w.group, "__ballot_sync", s, "warp");
    return out;
}

inline int __popc(unsigned int x) { return std::popcount(x); }
inline int __clzll(long long x) { return std::countl_zero((unsigned long long)x); }
inline unsigned int __float_as_uint(float x) { return std::bit_cast<unsigned int>(x); }
// The threads of a launch run as fibers on one OS thread, switching only at barriers and
// shuffles: a read-modify-write is atomic by construction.
inline unsigned int atomicMax(unsigned int* address, unsigned int v) {
    const unsigned int old = *address;
    if (v > old) {
        *address = v;
    }
    return old;
}
inline float __uint_as_float(unsigned int x) { return std::bit_cast<float>(x); }

// The kernels' exp(double): see the header.
#define exp(x) ::emu::exp_of(x)
