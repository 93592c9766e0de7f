// A CPU emulator of the CUDA execution model, for testing the kernels of kernels/cuda/*.cu without
// a GPU (test infrastructure: kernels/src/emu.rs builds and loads it). The kernel sources compile
// unchanged with g++ -DMOTIONRT_EMU: kernels/cuda/prelude.cuh includes this header, which supplies
// the CUDA keywords, built-in variables and intrinsics; emu.cpp implements them.
//
// Execution model (deterministic): a launch runs the grid's blocks one after another; the threads
// of a block are cooperative fibers on the calling OS thread, scheduled round-robin in linear
// thread order, each running until it reaches a barrier or a warp collective, or returns.
// - __syncthreads(): a barrier over every thread of the block that has not exited; all must wait
//   at the same call site (divergent barriers are reported as a deadlock).
// - warp collectives (shuffles, __syncwarp, ballot, mma, ldmatrix): warps are 32 consecutive
//   linear thread ids; the full mask only; every lane deposits its operands and waits until all
//   32 lanes have arrived, then each lane's result is computed from the whole warp's operands.
// - cp.async: each thread keeps its pending copies; a copy is performed when its thread waits for
//   it (so a read of the destination before the wait, or by another thread without a barrier
//   after that wait, sees the old data).
// - shared memory: static __shared__ arrays are thread_local statics (blocks run one at a time on
//   a thread); the dynamic block is filled with 0xFF bytes (NaN as f32 and as f16) before every
//   block, and writes past its end are reported.
// Errors (unknown kernel, bad launch shape, deadlock, misuse of a collective) end the launch with
// a message naming the kernel, the block and the thread.
//
// Counted on request (mrt_emu_bank_stats, emu.cpp "shared-memory bank statistics"): the
// shared-memory wavefronts of ldmatrix and 16-byte cp.async, against their conflict-free number.
// Not modelled: timing; races between threads that do not synchronise (the fixed schedule decides
// who wins) — unless the library is built with race detection (emu.cpp, "race detection": such
// accesses are then errors); a thread that spins on memory another thread will write, with no barrier or
// collective in the loop, never yields and hangs the launch; partial warp masks; the
// approximation error of fast intrinsics (__expf is expf); static __shared__ arrays are not
// poisoned (they keep what the previous block of this OS thread left).

#ifndef MOTIONRT_EMU_H
#define MOTIONRT_EMU_H

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

// ---- CUDA keywords ------------------------------------------------------------------------------

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// blocks run one at a time on an OS thread, so one instance per OS thread is the block's
#define __shared__ static thread_local
#define __constant__ static

struct uint3 {
    unsigned x, y, z;
};

namespace mrt_emu {

struct Ids {
    uint3 thread_idx, block_idx, block_dim, grid_dim;
};

// The running fiber's ids (set by the scheduler before every switch).
extern thread_local const Ids* tls_ids __attribute__((visibility("hidden")));

enum Collective : int {
    SHFL_XOR = 1,
    SHFL_IDX,
    SHFL_UP,
    SHFL_DOWN,
    SYNCWARP,
    BALLOT,
    MMA_M16N8K16,
    MMA_M16N8K8,
    LDMATRIX,  // + 8 * (num) + (trans ? 1 : 0)
};

void syncthreads(const char* file, int line);
unsigned long long shuffle(int op, unsigned mask, unsigned long long bits, int arg, int width,
                           const char* file, int line);
void syncwarp(unsigned mask, const char* file, int line);
unsigned ballot(unsigned mask, int predicate, const char* file, int line);
void mma_m16n8k16(float* c, const unsigned* a, unsigned b0, unsigned b1, const char* file,
                  int line);
void mma_m16n8k8(float* c, const unsigned* a, unsigned b0, const char* file, int line);
void ldmatrix(int num, bool trans, unsigned* r, const void* row, const char* file, int line);
void cp_async(void* smem, const void* gmem, unsigned bytes, const char* file, int line);
void cp_async_commit();
void cp_async_wait(int pending);
void cp_async_wait_all();
void* dynamic_shared();
// A kernel's own 16-byte access at p, for the bank statistics (counted where p lies in the
// dynamic shared block and statistics are on; the access itself is the caller's). An address
// that is not 16-byte aligned, global or shared, ends the launch with an error, as a GPU would.
void shared16(const void* p, bool write, const char* file, int line);
void atomic_rmw(const void* p, std::size_t size);  // race detection's record of an atomic
float h2f(unsigned short h);
unsigned short f2h(float f);

// ---- registry -----------------------------------------------------------------------------------

using Thunk = void (*)(void (*fn)(), void** params);

struct Param {
    char kind;  // 'p' pointer, 'i' signed integer, 'u' unsigned integer, 'f' float, 's' struct
    std::size_t size;
};

void register_kernel(const char* name, void (*fn)(), Thunk thunk, const Param* params, int n);

template <typename T>
constexpr char param_kind() {
    return std::is_pointer<T>::value          ? 'p'
           : std::is_floating_point<T>::value ? 'f'
           : std::is_integral<T>::value       ? (std::is_signed<T>::value ? 'i' : 'u')
                                              : 's';
}

// A kernel argument out of a cuLaunchKernel-style parameter slot (byte copy: any alignment).
template <typename T>
T param_value(void* slot) {
    static_assert(std::is_trivially_copyable<T>::value, "kernel parameters are plain data");
    typename std::remove_cv<T>::type v;
    std::memcpy(&v, slot, sizeof v);
    return v;
}

template <typename... A, std::size_t... I>
void call_kernel(void (*fn)(A...), void** params, std::index_sequence<I...>) {
    fn(param_value<A>(params[I])...);
}

// Register `fn` under `name`: the trampoline unpacks params[i] as the i-th parameter's own type.
template <typename... A>
int register_entry(const char* name, void (*fn)(A...)) {
    static const Param params[] = {{param_kind<A>(), sizeof(A)}..., {0, 0}};
    Thunk thunk = [](void (*g)(), void** slots) {
        call_kernel(reinterpret_cast<void (*)(A...)>(g), slots, std::index_sequence_for<A...>{});
    };
    register_kernel(name, reinterpret_cast<void (*)()>(fn), thunk, params, (int)sizeof...(A));
    return 0;
}

}  // namespace mrt_emu

// Register the extern "C" kernel NS::NAME (NS: the namespace its source was included in).
#define MRT_EMU_REGISTER(NS, NAME) \
    static const int mrt_emu_registered_##NAME = ::mrt_emu::register_entry(#NAME, &NS::NAME);

// ---- built-in variables -------------------------------------------------------------------------

#define threadIdx (::mrt_emu::tls_ids->thread_idx)
#define blockIdx (::mrt_emu::tls_ids->block_idx)
#define blockDim (::mrt_emu::tls_ids->block_dim)
#define gridDim (::mrt_emu::tls_ids->grid_dim)
static const int warpSize = 32;

// ---- synchronisation and warp intrinsics --------------------------------------------------------

inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    mrt_emu::syncthreads(file, line);
}

inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(),
                       int line = __builtin_LINE()) {
    mrt_emu::syncwarp(mask, file, line);
}

template <typename T>
T mrt_emu_shuffle(int op, unsigned mask, T v, int arg, int width, const char* file, int line) {
    static_assert(sizeof(T) == 4 || sizeof(T) == 8, "shuffles move 32- or 64-bit values");
    unsigned long long bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    bits = mrt_emu::shuffle(op, mask, bits, arg, width, file, line);
    T r;
    std::memcpy(&r, &bits, sizeof(T));
    return r;
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32,
                  const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return mrt_emu_shuffle(mrt_emu::SHFL_XOR, mask, v, lane_mask, width, file, line);
}
template <typename T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32,
              const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return mrt_emu_shuffle(mrt_emu::SHFL_IDX, mask, v, src_lane, width, file, line);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32,
                 const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return mrt_emu_shuffle(mrt_emu::SHFL_UP, mask, v, (int)delta, width, file, line);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32,
                   const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return mrt_emu_shuffle(mrt_emu::SHFL_DOWN, mask, v, (int)delta, width, file, line);
}

inline unsigned __ballot_sync(unsigned mask, int predicate, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
    return mrt_emu::ballot(mask, predicate, file, line);
}
inline int __any_sync(unsigned mask, int predicate, const char* file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
    return mrt_emu::ballot(mask, predicate, file, line) != 0;
}
inline int __all_sync(unsigned mask, int predicate, const char* file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
    return mrt_emu::ballot(mask, predicate, file, line) == mask;
}

// Atomics: blocks run one at a time and fibers switch only at barriers and collectives, so a
// read-modify-write is atomic as it stands. Not instrumented in a race-checking build (atomics
// do not race).
#ifdef MOTIONRT_EMU_RACECHECK
#define MRT_ATOMIC __attribute__((no_sanitize_thread, noinline))
#define MRT_ATOMIC_RECORD(p) ::mrt_emu::atomic_rmw((p), sizeof *(p))
#else
#define MRT_ATOMIC
#define MRT_ATOMIC_RECORD(p) ((void)0)
#endif
template <typename T>
MRT_ATOMIC T atomicAdd(T* p, T v) {
    MRT_ATOMIC_RECORD(p);
    const T old = *p;
    *p = old + v;
    return old;
}
template <typename T>
MRT_ATOMIC T atomicSub(T* p, T v) {
    MRT_ATOMIC_RECORD(p);
    const T old = *p;
    *p = old - v;
    return old;
}
template <typename T>
MRT_ATOMIC T atomicExch(T* p, T v) {
    MRT_ATOMIC_RECORD(p);
    const T old = *p;
    *p = v;
    return old;
}
template <typename T>
MRT_ATOMIC T atomicMax(T* p, T v) {
    MRT_ATOMIC_RECORD(p);
    const T old = *p;
    *p = old < v ? v : old;
    return old;
}
template <typename T>
MRT_ATOMIC T atomicMin(T* p, T v) {
    MRT_ATOMIC_RECORD(p);
    const T old = *p;
    *p = v < old ? v : old;
    return old;
}
template <typename T>
MRT_ATOMIC T atomicCAS(T* p, T compare, T v) {
    MRT_ATOMIC_RECORD(p);
    const T old = *p;
    if (old == compare) *p = v;
    return old;
}
inline void __threadfence() {}
inline void __threadfence_block() {}
template <typename T>
T __ldg(const T* p) {
    return *p;
}

// In the emulator "shared" and "generic" addresses are the same host addresses.
inline std::size_t __cvta_generic_to_shared(const void* p) { return (std::size_t)p; }

// ---- math and bit intrinsics (device code sees them in the global namespace) --------------------

// expf, exp2f, erff, sinf, cosf, fmaxf, ... come from <cmath> (the C library's global names).
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }

inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
inline float __uint_as_float(unsigned i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
inline int __float_as_int(float f) {
    int i;
    std::memcpy(&i, &f, 4);
    return i;
}
inline unsigned __float_as_uint(float f) {
    unsigned i;
    std::memcpy(&i, &f, 4);
    return i;
}
inline unsigned __umulhi(unsigned a, unsigned b) {
    return (unsigned)(((unsigned long long)a * b) >> 32);
}
inline int __mulhi(int a, int b) { return (int)(((long long)a * b) >> 32); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }

// CUDA's device min/max overloads
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }

#endif  // MOTIONRT_EMU_H
