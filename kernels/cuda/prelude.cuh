// The prelude of every kernel source (kernels/cuda/*.cu): all inline PTX and every CUDA intrinsic
// wrapper the kernels use, in one place, so that the same source compiles two ways:
//
// - for the GPU: kernels/src/cuda.rs prepends this text to each source before NVRTC compiles it
//   (MOTIONRT_EMU is undefined there, so NVRTC never sees the emulator header);
// - for the CPU emulator (kernels/emu, test infrastructure): g++ compiles the sources with
//   MOTIONRT_EMU defined, and every function below calls the emulator instead of issuing PTX.
//
// Kernel sources must not contain `asm` of their own: add a wrapper here, with its emulation.
//
// API (device functions; `half_bits` is an IEEE float16 value as raw 16 bits):
//   float mrt_h2f(half_bits)                  cvt.f32.f16 (exact)
//   half_bits mrt_f2h(float)                  cvt.rn.f16.f32 (round to nearest even)
//   unsigned mrt_pack_h2(float lo, float hi)  cvt.rn.f16x2.f32: lo in bits 0-15, hi in 16-31
//   float mrt_load(const T*, i), void mrt_store(T*, i, float)  for T = float or half_bits
//   float mrt_warp_sum(float), mrt_warp_max(float)  butterfly reductions over the full warp
//   float mrt_ex2(float)                      ex2.approx.ftz.f32: 2^x in one MUFU instruction
//   float mrt_rcp(float)                      rcp.approx.ftz.f32: 1/x in one MUFU instruction
//   void mrt_mma_m16n8k16(float c[4], const unsigned a[4], unsigned b0, unsigned b1)
//        mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32, c += a * b in place
//   void mrt_mma_m16n8k8(float c[4], const unsigned a[2], unsigned b0)   the same for k = 8
//   void mrt_ldmatrix_x1/_x2/_x4(unsigned* r, const void* smem_row), and _trans variants
//        ldmatrix.sync.aligned.m8n8.xN[.trans].shared.b16; smem_row is this lane's row address
//   void mrt_cp_async_16(void* smem, const void* gmem)  cp.async.cg.shared.global, 16 bytes
//   void mrt_cp_async_commit(), mrt_cp_async_wait<N>(), mrt_cp_async_wait_all()
//   MRT_DYN_SMEM(type, name)  declares `type* name`, the block's dynamic shared memory
//
// In the emulator each wrapper also records its call site (file and line) for error messages;
// MRT_SITE / MRT_PASS_SITE add those parameters there and nothing for NVRTC.

#ifndef MOTIONRT_PRELUDE_CUH
#define MOTIONRT_PRELUDE_CUH

#ifdef MOTIONRT_EMU
#include "../emu/emu.h"
#define MRT_SITE , const char *mrt_file = __builtin_FILE(), int mrt_line = __builtin_LINE()
#define MRT_PASS_SITE , mrt_file, mrt_line
#else
#define MRT_SITE
#define MRT_PASS_SITE
#endif

typedef unsigned short half_bits;

// ---- float16 conversions ----------------------------------------------------------------------

__device__ __forceinline__ float mrt_h2f(half_bits h) {
#ifdef MOTIONRT_EMU
    return mrt_emu::h2f(h);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#endif
}

__device__ __forceinline__ half_bits mrt_f2h(float f) {
#ifdef MOTIONRT_EMU
    return mrt_emu::f2h(f);
#else
    half_bits h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
#endif
}

__device__ __forceinline__ unsigned mrt_pack_h2(float lo, float hi) {
#ifdef MOTIONRT_EMU
    return (unsigned)mrt_emu::f2h(lo) | ((unsigned)mrt_emu::f2h(hi) << 16);
#else
    unsigned r;
    // cvt.rn.f16x2.f32 d, a, b puts a in the upper half and b in the lower half
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
#endif
}

__device__ __forceinline__ float mrt_load(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float mrt_load(const half_bits* p, long long i) { return mrt_h2f(p[i]); }
__device__ __forceinline__ void mrt_store(float* p, long long i, float v) { p[i] = v; }
__device__ __forceinline__ void mrt_store(half_bits* p, long long i, float v) { p[i] = mrt_f2h(v); }

// ---- special functions --------------------------------------------------------------------------

// 2^x as one MUFU.EX2 (relative error about 2^-22; subnormal inputs and results flushed to zero).
// exp2f compiles to four instructions: a range test and two predicated multiplies around the
// MUFU keep results in the subnormal range, which a softmax's weights do not need.
__device__ __forceinline__ float mrt_ex2(float x) {
#ifdef MOTIONRT_EMU
    const float r = exp2f(x);
    return r < 1.17549435e-38f ? 0.f : r;
#else
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
#endif
}

// 1/x as one MUFU.RCP (about 1 ulp; subnormals flushed to zero, 1/inf = 0). __fdividef(1, x)
// wraps the same instruction in a test and two predicated multiplies for |x| > 2^126.
__device__ __forceinline__ float mrt_rcp(float x) {
#ifdef MOTIONRT_EMU
    // ftz: a subnormal input is a signed zero (1/x = ±inf), a subnormal result a signed zero
    if (x != 0.f && x > -1.17549435e-38f && x < 1.17549435e-38f) x = copysignf(0.f, x);
    const float r = 1.f / x;
    return (r != 0.f && r > -1.17549435e-38f && r < 1.17549435e-38f) ? copysignf(0.f, r) : r;
#else
    float r;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
#endif
}

// ---- warp reductions (every lane gets the result; all 32 lanes must call) ----------------------

__device__ __forceinline__ float mrt_warp_sum(float v MRT_SITE) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o, 32 MRT_PASS_SITE);
    return v;
}

__device__ __forceinline__ float mrt_warp_max(float v MRT_SITE) {
    for (int o = 16; o > 0; o >>= 1)
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o, 32 MRT_PASS_SITE));
    return v;
}

// ---- tensor cores -------------------------------------------------------------------------------

// c (16x8 f32, accumulator layout) += a (16x16 f16, row-major fragments) * b (16x8 f16, col).
__device__ __forceinline__ void mrt_mma_m16n8k16(float* c, const unsigned* a, unsigned b0,
                                                 unsigned b1 MRT_SITE) {
#ifdef MOTIONRT_EMU
    mrt_emu::mma_m16n8k16(c, a, b0, b1, mrt_file, mrt_line);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// c (16x8 f32) += a (16x8 f16: a[0], a[1] of the k16 fragments) * b (8x8 f16, col).
__device__ __forceinline__ void mrt_mma_m16n8k8(float* c, const unsigned* a, unsigned b0 MRT_SITE) {
#ifdef MOTIONRT_EMU
    mrt_emu::mma_m16n8k8(c, a, b0, mrt_file, mrt_line);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(b0));
#endif
}

#ifndef MOTIONRT_EMU
__device__ __forceinline__ unsigned mrt_smem_addr(const void* p) {
    return (unsigned)__cvta_generic_to_shared(p);
}
#endif

__device__ __forceinline__ void mrt_ldmatrix_x1(unsigned* r, const void* smem_row MRT_SITE) {
#ifdef MOTIONRT_EMU
    mrt_emu::ldmatrix(1, false, r, smem_row, mrt_file, mrt_line);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];"
                 : "=r"(r[0])
                 : "r"(mrt_smem_addr(smem_row)));
#endif
}

__device__ __forceinline__ void mrt_ldmatrix_x2(unsigned* r, const void* smem_row MRT_SITE) {
#ifdef MOTIONRT_EMU
    mrt_emu::ldmatrix(2, false, r, smem_row, mrt_file, mrt_line);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(mrt_smem_addr(smem_row)));
#endif
}

__device__ __forceinline__ void mrt_ldmatrix_x4(unsigned* r, const void* smem_row MRT_SITE) {
#ifdef MOTIONRT_EMU
    mrt_emu::ldmatrix(4, false, r, smem_row, mrt_file, mrt_line);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(mrt_smem_addr(smem_row)));
#endif
}

__device__ __forceinline__ void mrt_ldmatrix_x1_trans(unsigned* r, const void* smem_row MRT_SITE) {
#ifdef MOTIONRT_EMU
    mrt_emu::ldmatrix(1, true, r, smem_row, mrt_file, mrt_line);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];"
                 : "=r"(r[0])
                 : "r"(mrt_smem_addr(smem_row)));
#endif
}

__device__ __forceinline__ void mrt_ldmatrix_x2_trans(unsigned* r, const void* smem_row MRT_SITE) {
#ifdef MOTIONRT_EMU
    mrt_emu::ldmatrix(2, true, r, smem_row, mrt_file, mrt_line);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(mrt_smem_addr(smem_row)));
#endif
}

__device__ __forceinline__ void mrt_ldmatrix_x4_trans(unsigned* r, const void* smem_row MRT_SITE) {
#ifdef MOTIONRT_EMU
    mrt_emu::ldmatrix(4, true, r, smem_row, mrt_file, mrt_line);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(mrt_smem_addr(smem_row)));
#endif
}

// ---- asynchronous global -> shared copies (sm_80+) ----------------------------------------------

// Both addresses 16-byte aligned. The data may land any time until this thread's wait that covers
// it; other threads see it only after a barrier that follows that wait.
__device__ __forceinline__ void mrt_cp_async_16(void* smem, const void* gmem MRT_SITE) {
#ifdef MOTIONRT_EMU
    mrt_emu::cp_async(smem, gmem, 16, mrt_file, mrt_line);
#else
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(mrt_smem_addr(smem)),
                 "l"(gmem)
                 : "memory");
#endif
}

// Close the group of this thread's cp.async operations issued since the last commit.
__device__ __forceinline__ void mrt_cp_async_commit() {
#ifdef MOTIONRT_EMU
    mrt_emu::cp_async_commit();
#else
    asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}

// Wait until at most N of this thread's most recently committed groups are pending
// (uncommitted operations are not waited for).
template <int N>
__device__ __forceinline__ void mrt_cp_async_wait() {
#ifdef MOTIONRT_EMU
    mrt_emu::cp_async_wait(N);
#else
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#endif
}

// Wait for every cp.async of this thread, committed or not.
__device__ __forceinline__ void mrt_cp_async_wait_all() {
#ifdef MOTIONRT_EMU
    mrt_emu::cp_async_wait_all();
#else
    asm volatile("cp.async.wait_all;" ::: "memory");
#endif
}

// ---- dynamic shared memory ----------------------------------------------------------------------

// `type* name` = the block's dynamic shared memory (16-byte aligned). One raw byte array underlies
// every use, so several kernels in one source may view it as different types.
#ifdef MOTIONRT_EMU
#define MRT_DYN_SMEM(type, name) type* name = reinterpret_cast<type*>(::mrt_emu::dynamic_shared())
#else
#define MRT_DYN_SMEM(type, name)                                    \
    extern __shared__ __align__(16) unsigned char mrt_dyn_smem_[]; \
    type* name = reinterpret_cast<type*>(mrt_dyn_smem_)
#endif

#endif  // MOTIONRT_PRELUDE_CUH
