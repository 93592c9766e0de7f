//! The CUDA kernels (`kernels/cuda/*.cu`) run in the CPU emulator (`motionrt_kernels::emu`) and are
//! compared with the CPU references. The attention kernels and the engine kernels passed the same
//! comparisons on NVIDIA H100/H200 GPUs, so these tests check the emulator as much as the kernels:
//! a failure of one of them here means the emulator is wrong. The emulator's own semantics
//! (poisoned shared memory, barriers, deadlock reports, shuffles, ldmatrix/mma layouts, cp.async)
//! are checked by small kernels of this file (`SELF_TEST`).
//!
//! Needs a C++ compiler (`CXX`, `g++` or `c++`); without one the tests print SKIP and pass, unless
//! `MOTIONRT_REQUIRE_EMU=1`.

use std::collections::BTreeSet;
use std::sync::OnceLock;

use motionrt_kernels::emu::{Arg, BankSite, Builder, DeviceBuffer, Elem, Emu, EmuError};
use motionrt_kernels::{cuda, fused, Attention, SparseCausal};

// ---- the emulator, built once per test binary --------------------------------------------------

/// Kernels that exercise the emulator itself (valid CUDA too: NVRTC compiles them when present).
const SELF_TEST: &str = r#"
// (a) shared memory starts poisoned; a neighbour's value needs a barrier
extern "C" __global__ void emu_neighbour(float* out, int sync) {
    MRT_DYN_SMEM(float, s);
    const int t = threadIdx.x, n = blockDim.x;
    s[t] = (float)t;
    if (sync) __syncthreads();
    out[(blockIdx.x * n + t) * 2] = s[(t + 1) % n];
    out[(blockIdx.x * n + t) * 2 + 1] = s[n + t];  // never written
}

// (b) a barrier that only warp 0 reaches: the other threads wait at another one
extern "C" __global__ void emu_divergent_barrier(float* out) {
    if (threadIdx.x < 32) __syncthreads();
    out[threadIdx.x] = 1.f;
    __syncthreads();
}

// half a warp at a barrier, the other half in a shuffle
extern "C" __global__ void emu_barrier_vs_shuffle(float* out) {
    float v = 1.f;
    if (threadIdx.x < 16) __syncthreads();
    else v = __shfl_xor_sync(0xffffffffu, v, 1);
    out[threadIdx.x] = v;
}

// exited threads do not count at a barrier
extern "C" __global__ void emu_early_exit(float* out) {
    MRT_DYN_SMEM(float, s);
    if (threadIdx.x >= 32) return;
    s[threadIdx.x] = (float)threadIdx.x;
    __syncthreads();
    out[threadIdx.x] = s[31 - threadIdx.x];
}

extern "C" __global__ void emu_shuffle_after_exit(float* out) {
    if (threadIdx.x & 1) return;
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 2);
}

extern "C" __global__ void emu_partial_mask(float* out) {
    out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, 1.f, 1);
}

extern "C" __global__ void emu_smem_overrun(float* out, int n) {
    MRT_DYN_SMEM(float, s);
    s[threadIdx.x + n] = 1.f;
    out[threadIdx.x] = 0.f;
}

extern "C" __global__ void emu_shuffles(int* out) {
    const int l = threadIdx.x & 31, v = (int)threadIdx.x * 10;
    int* o = out + threadIdx.x * 8;
    o[0] = __shfl_xor_sync(0xffffffffu, v, 5);
    o[1] = __shfl_xor_sync(0xffffffffu, v, 5, 8);
    o[2] = __shfl_sync(0xffffffffu, v, (l * 7) % 32);
    o[3] = __shfl_sync(0xffffffffu, v, l + 3, 8);
    o[4] = __shfl_up_sync(0xffffffffu, v, 3);
    o[5] = __shfl_down_sync(0xffffffffu, v, 3, 16);
    o[6] = (int)__ballot_sync(0xffffffffu, l % 3 == 0);
    o[7] = (int)mrt_warp_sum((float)l) + (int)mrt_warp_max((float)(l ^ 9));
}

// the same ldmatrix from two places in divergent branches: .aligned forbids it
extern "C" __global__ void emu_ldmatrix_two_sites(unsigned* out) {
    __shared__ __align__(16) unsigned short m[32 * 8];
    const int l = threadIdx.x;
    for (int i = l; i < 32 * 8; i += 32) m[i] = (unsigned short)i;
    __syncwarp();
    unsigned r[4];
    if (l < 16) mrt_ldmatrix_x4(r, m + l * 8);
    else mrt_ldmatrix_x4(r, m + l * 8);
    out[l] = r[0];
}

// (c) ldmatrix: every form, rows gathered from a permuted table; ignored lanes give misaligned
// addresses (which would be an error if they were read)
extern "C" __global__ void emu_ldmatrix(unsigned* out) {
    __shared__ __align__(16) unsigned short m[32 * 8];
    const int l = threadIdx.x;
    for (int i = l; i < 32 * 8; i += 32) m[i] = (unsigned short)(i + 1);
    __syncwarp();
    const unsigned short* row = m + ((l * 5 + 3) % 32) * 8;
    const char* odd = (const char*)m + 2;
    unsigned r[4];
    unsigned* o = out + l * 14;
    mrt_ldmatrix_x1(r, l < 8 ? (const void*)row : odd);
    o[0] = r[0];
    mrt_ldmatrix_x2(r, l < 16 ? (const void*)row : odd);
    o[1] = r[0]; o[2] = r[1];
    mrt_ldmatrix_x4(r, row);
    o[3] = r[0]; o[4] = r[1]; o[5] = r[2]; o[6] = r[3];
    mrt_ldmatrix_x1_trans(r, l < 8 ? (const void*)row : odd);
    o[7] = r[0];
    mrt_ldmatrix_x2_trans(r, l < 16 ? (const void*)row : odd);
    o[8] = r[0]; o[9] = r[1];
    mrt_ldmatrix_x4_trans(r, row);
    o[10] = r[0]; o[11] = r[1]; o[12] = r[2]; o[13] = r[3];
}

// D = A B + C for A 16x16 (row-major), B 16x8 (K x N, row-major), C and D 16x8 (row-major):
// fragments loaded with ldmatrix (A: x4, B: x2.trans), as tensor-core kernels load them
extern "C" __global__ void emu_mma_ldmatrix(const half_bits* a, const half_bits* b, const float* c,
                                            float* d) {
    __shared__ __align__(16) half_bits as[16 * 16];
    __shared__ __align__(16) half_bits bs[16 * 8];
    const int l = threadIdx.x, g = l >> 2, t = l & 3;
    for (int i = l; i < 256; i += 32) as[i] = a[i];
    for (int i = l; i < 128; i += 32) bs[i] = b[i];
    __syncwarp();
    unsigned af[4], bf[2];
    mrt_ldmatrix_x4(af, as + (l % 16) * 16 + (l / 16) * 8);
    mrt_ldmatrix_x2_trans(bf, bs + (l % 16) * 8);
    float acc[4] = {c[g * 8 + 2 * t], c[g * 8 + 2 * t + 1], c[(g + 8) * 8 + 2 * t],
                    c[(g + 8) * 8 + 2 * t + 1]};
    mrt_mma_m16n8k16(acc, af, bf[0], bf[1]);
    d[g * 8 + 2 * t] = acc[0];
    d[g * 8 + 2 * t + 1] = acc[1];
    d[(g + 8) * 8 + 2 * t] = acc[2];
    d[(g + 8) * 8 + 2 * t + 1] = acc[3];
}

// the same product with the fragments gathered by hand from global memory
extern "C" __global__ void emu_mma_direct(const half_bits* a, const half_bits* b, const float* c,
                                          float* d) {
    const int l = threadIdx.x, g = l >> 2, t = l & 3;
    unsigned af[4], bf[2];
    for (int r = 0; r < 4; ++r) {
        const int row = g + 8 * (r & 1), col = 2 * t + 8 * (r >> 1);
        af[r] = (unsigned)a[row * 16 + col] | ((unsigned)a[row * 16 + col + 1] << 16);
    }
    for (int r = 0; r < 2; ++r) {
        const int k = 2 * t + 8 * r;
        bf[r] = (unsigned)b[k * 8 + g] | ((unsigned)b[(k + 1) * 8 + g] << 16);
    }
    float acc[4] = {c[g * 8 + 2 * t], c[g * 8 + 2 * t + 1], c[(g + 8) * 8 + 2 * t],
                    c[(g + 8) * 8 + 2 * t + 1]};
    mrt_mma_m16n8k16(acc, af, bf[0], bf[1]);
    d[g * 8 + 2 * t] = acc[0];
    d[g * 8 + 2 * t + 1] = acc[1];
    d[(g + 8) * 8 + 2 * t] = acc[2];
    d[(g + 8) * 8 + 2 * t + 1] = acc[3];
}

// (d) cp.async: data lands when the issuing thread waits for its group
extern "C" __global__ void emu_cp_async(const float* g, float* out) {
    MRT_DYN_SMEM(float, s);  // three regions of 4 floats per thread
    const int t = threadIdx.x, n = blockDim.x;
    float* o = out + t * 8;
    mrt_cp_async_16(s + 4 * t, g + 4 * t);
    mrt_cp_async_commit();
    mrt_cp_async_16(s + 4 * (n + t), g + 4 * (n + t));
    mrt_cp_async_commit();
    mrt_cp_async_16(s + 4 * (2 * n + t), g + 4 * (2 * n + t));  // not committed
    o[0] = s[4 * t];               // nothing waited for yet
    mrt_cp_async_wait<1>();
    o[1] = s[4 * t];               // the older group landed
    o[2] = s[4 * (n + t)];         // the newer one may still be pending
    mrt_cp_async_wait<0>();
    o[3] = s[4 * (n + t)];
    o[4] = s[4 * (2 * n + t)];     // uncommitted copies are not waited for
    mrt_cp_async_wait_all();
    o[5] = s[4 * (2 * n + t)];
    o[6] = s[4 * ((t + 1) % n)];   // the next thread's copy, before a barrier
    __syncthreads();
    o[7] = s[4 * ((t + 1) % n)];
}

// atomics from every thread of every block
extern "C" __global__ void emu_atomics(int* counter, float* sum, unsigned* hi) {
    atomicAdd(counter, 1);
    atomicAdd(sum, 0.5f);
    atomicMax(hi, blockIdx.x * blockDim.x + threadIdx.x);
}

// bank statistics: lane l copies 16 bytes to row l % 8, chunk l / 8 of shared rows `pitch` bytes
// apart (lane `skip` zero-fills its chunk instead), then reads the same rows back with one
// ldmatrix.x4 (matrix i: lanes 8i..8i+7 = chunk i)
extern "C" __global__ void emu_bank_pitch(const unsigned* g, unsigned* out, int pitch, int skip) {
    MRT_DYN_SMEM(unsigned char, s);
    const int l = threadIdx.x;
    unsigned char* row = s + (l % 8) * pitch + (l / 8) * 16;
    if (l != skip) {
        mrt_cp_async_16(row, g + 4 * l);
    } else {
        unsigned* z = (unsigned*)row;
        z[0] = z[1] = z[2] = z[3] = 0u;
    }
    mrt_cp_async_wait_all();
    __syncthreads();
    unsigned r[4];
    mrt_ldmatrix_x4(r, row);
    for (int i = 0; i < 4; ++i) out[4 * l + i] = r[i];
}

extern "C" __global__ void emu_cp_async_misaligned(const float* g, float* out) {
    MRT_DYN_SMEM(float, s);
    mrt_cp_async_16(s + 1, g);
    mrt_cp_async_wait_all();
    out[threadIdx.x] = s[1];
}
"#;

const SELF_TEST_ENTRIES: &[&str] = &[
    "emu_neighbour",
    "emu_divergent_barrier",
    "emu_barrier_vs_shuffle",
    "emu_early_exit",
    "emu_shuffle_after_exit",
    "emu_partial_mask",
    "emu_smem_overrun",
    "emu_shuffles",
    "emu_ldmatrix",
    "emu_ldmatrix_two_sites",
    "emu_mma_ldmatrix",
    "emu_mma_direct",
    "emu_cp_async",
    "emu_cp_async_misaligned",
    "emu_atomics",
    "emu_bank_pitch",
];

fn emu() -> Option<&'static Emu> {
    static EMU: OnceLock<Result<Emu, EmuError>> = OnceLock::new();
    let r = EMU.get_or_init(|| {
        let t = std::time::Instant::now();
        let e = Builder::new()
            .source("emu_self_test.cu", SELF_TEST, SELF_TEST_ENTRIES)
            .build();
        eprintln!("emulator ready in {:.1} s", t.elapsed().as_secs_f64());
        e
    });
    match r {
        Ok(e) => Some(e),
        Err(e) => {
            e.skip_or_panic();
            None
        }
    }
}

/// Run a kernel; panics with the emulator's message on failure.
fn launch(
    emu: &Emu,
    kernel: &str,
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    smem: usize,
    args: &[Arg<'_>],
) {
    // SAFETY: every test sizes its buffers for the shapes it passes.
    unsafe { emu.launch(kernel, grid, block, smem, args) }.unwrap_or_else(|e| panic!("{e}"));
}

fn launch_err(
    emu: &Emu,
    kernel: &str,
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    smem: usize,
    args: &[Arg<'_>],
) -> String {
    // SAFETY: as in `launch`.
    match unsafe { emu.launch(kernel, grid, block, smem, args) } {
        Ok(()) => panic!("{kernel}: the launch was expected to fail"),
        Err(e) => e.to_string(),
    }
}

/// The engine's launch shape for `n` elements (runtime/src/engine/exec.rs `launch_cfg`).
fn elementwise(n: usize) -> ((u32, u32, u32), (u32, u32, u32)) {
    let blocks = n.div_ceil(256).clamp(1, 132 * 32) as u32;
    ((blocks, 1, 1), (256, 1, 1))
}

// ---- data ---------------------------------------------------------------------------------------

/// splitmix64 and Box–Muller: seeded standard normal values.
fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    let mut next = move || {
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| {
            let u = next().max(1e-300);
            let v = next();
            ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
        })
        .collect()
}

/// IEEE float16 bits to f32 (exact).
fn f16_to_f32(h: u16) -> f32 {
    let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
    let e = ((h >> 10) & 0x1f) as i32;
    let m = (h & 0x3ff) as f64;
    let v = match e {
        0 => m * 2f64.powi(-24),
        31 if m == 0.0 => f64::INFINITY,
        31 => f64::NAN,
        _ => (1.0 + m / 1024.0) * 2f64.powi(e - 15),
    };
    (sign * v) as f32
}

/// f32 to the nearest float16 (ties to even), by search over the f16 values: independent of the
/// emulator's bit manipulation.
fn f32_to_f16(x: f32) -> u16 {
    if x.is_nan() {
        return 0x7e00;
    }
    let sign = if x.is_sign_negative() { 0x8000 } else { 0 };
    let a = x.abs() as f64;
    // 0x7c00 (inf) stands for 65536 here: the value that |x| >= 65520 rounds to
    let val = |h: u16| {
        if h == 0x7c00 {
            65536.0
        } else {
            f16_to_f32(h) as f64
        }
    };
    if a >= 65536.0 {
        return sign | 0x7c00;
    }
    let (mut lo, mut hi) = (0u16, 0x7c00u16); // val(lo) <= a < val(hi)
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if val(mid) <= a {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let (dl, dh) = (a - val(lo), val(hi) - a);
    sign | if dl < dh || (dl == dh && lo % 2 == 0) {
        lo
    } else {
        hi
    }
}

/// An element type of the kernels: f32, or u16 holding float16 bits.
trait Host: Elem + PartialEq + std::fmt::Debug {
    const SUFFIX: &'static str;
    /// Relative tolerance against the max magnitude of the reference.
    const TOL: f64;
    fn encode(v: &[f32]) -> Vec<Self>;
    fn decode(v: &[Self]) -> Vec<f32>;
    /// `v` as the kernel sees it (rounded to f16 for f16).
    fn round(v: &[f32]) -> Vec<f32> {
        Self::decode(&Self::encode(v))
    }
}

impl Host for f32 {
    const SUFFIX: &'static str = "f32";
    const TOL: f64 = 1e-5;
    fn encode(v: &[f32]) -> Vec<Self> {
        v.to_vec()
    }
    fn decode(v: &[Self]) -> Vec<f32> {
        v.to_vec()
    }
}

impl Host for u16 {
    const SUFFIX: &'static str = "f16";
    const TOL: f64 = 2e-3;
    fn encode(v: &[f32]) -> Vec<Self> {
        v.iter().map(|&x| f32_to_f16(x)).collect()
    }
    fn decode(v: &[Self]) -> Vec<f32> {
        v.iter().map(|&x| f16_to_f32(x)).collect()
    }
}

fn buf<T: Host>(v: &[f32]) -> DeviceBuffer {
    DeviceBuffer::from_slice(&T::encode(v))
}

/// An output buffer of `n` elements, NaN-poisoned.
fn out_buf<T: Host>(n: usize) -> DeviceBuffer {
    DeviceBuffer::filled(n * std::mem::size_of::<T>(), 0xff)
}

fn read<T: Host>(b: &DeviceBuffer) -> Vec<f32> {
    T::decode(&b.to_vec::<T>())
}

/// max |got − want| / max |want| (infinite if `got` has a non-finite value where `want` has not).
fn rel(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let m = want.iter().fold(0f64, |m, &x| m.max(x.abs() as f64));
    let e = got
        .iter()
        .zip(want)
        .map(|(&g, &w)| {
            if g.is_finite() {
                (g as f64 - w as f64).abs()
            } else {
                f64::INFINITY
            }
        })
        .fold(0f64, f64::max);
    e / m.max(1e-30)
}

fn check<T: Host>(what: &str, got: &[f32], want: &[f32]) {
    let r = rel(got, want);
    assert!(
        r <= T::TOL,
        "{what} ({}): max error {r:.3e} of the reference's magnitude > {:.0e}",
        T::SUFFIX,
        T::TOL
    );
}

// ---- the emulator's contract with the sources ----------------------------------------------------

#[test]
fn kernel_sources_leave_inline_ptx_to_the_prelude() {
    for (name, src) in cuda::SOURCES {
        let bytes = src.as_bytes();
        for (i, _) in src.match_indices("asm") {
            let before = i.checked_sub(1).map(|j| bytes[j]);
            let after = bytes.get(i + 3).copied();
            let ident = |c: Option<u8>| c.is_some_and(|c| c.is_ascii_alphanumeric() || c == b'_');
            assert!(
                ident(before) || ident(after),
                "kernels/cuda/{name}.cu holds inline asm at byte {i}: PTX belongs in prelude.cuh"
            );
        }
    }
    assert!(cuda::PRELUDE.contains("#ifdef MOTIONRT_EMU"));
}

fn nvrtc_available() -> bool {
    match cuda::ensure_nvrtc() {
        Ok(()) => true,
        Err(e) if std::env::var_os("CI").is_some() => {
            panic!("NVRTC is required in CI (scripts/env.sh installs nvidia-cuda-nvrtc): {e}")
        }
        Err(e) => {
            eprintln!("SKIP (NVRTC): {e}");
            false
        }
    }
}

fn ptx_entries(ptx: &str) -> BTreeSet<String> {
    ptx.lines()
        .filter_map(|l| {
            let rest = l.trim_start().strip_prefix(".visible .entry ")?;
            Some(rest.split('(').next()?.trim().to_string())
        })
        .collect()
}

#[test]
fn every_nvrtc_entry_point_is_registered() {
    let Some(emu) = emu() else { return };
    if !nvrtc_available() {
        return;
    }
    let registered: BTreeSet<String> = emu
        .kernels()
        .into_iter()
        .filter(|k| !SELF_TEST_ENTRIES.contains(&k.as_str()))
        .collect();
    let mut entries = BTreeSet::new();
    for (name, _) in cuda::SOURCES {
        let c = cuda::compile_uncached(name, "sm_90").unwrap_or_else(|e| panic!("{e}"));
        let found = ptx_entries(&c.ptx);
        assert!(!found.is_empty(), "{name}: no .entry in the PTX");
        entries.extend(found);
    }
    let missing: Vec<_> = entries.difference(&registered).collect();
    assert!(
        missing.is_empty(),
        "not in kernels/emu/registry.cpp: {missing:?}"
    );
    let extra: Vec<_> = registered.difference(&entries).collect();
    assert!(extra.is_empty(), "registered but not in the PTX: {extra:?}");
    eprintln!("{} entry points registered", entries.len());
}

#[test]
fn self_test_kernels_compile_with_nvrtc() {
    if !nvrtc_available() {
        return;
    }
    // NVRTC assembles PTX for a real architecture (sm_XX), so this also checks the inline PTX of
    // the prelude's wrappers that the project's kernels do not use yet
    for arch in ["sm_80", "sm_90"] {
        let c = cuda::compile_source_uncached("emu_self_test", SELF_TEST, arch)
            .unwrap_or_else(|e| panic!("{e}"));
        let entries = ptx_entries(&c.ptx);
        for e in SELF_TEST_ENTRIES {
            assert!(entries.contains(*e), "{arch}: no entry {e}");
        }
        for instr in [
            "ldmatrix.sync.aligned.m8n8.x1.shared.b16",
            "ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16",
            "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16",
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32",
            "cp.async.cg.shared.global",
            "cp.async.commit_group",
            "cp.async.wait_group 1",
            "cp.async.wait_all",
        ] {
            assert!(c.ptx.contains(instr), "{arch}: the PTX has no {instr}");
        }
    }
}

// ---- emulator semantics ------------------------------------------------------------------------

#[test]
fn shared_memory_is_poisoned_and_barriers_order_it() {
    let Some(emu) = emu() else { return };
    let n = 64;
    for sync in [0, 1] {
        let out = out_buf::<f32>(2 * 2 * n);
        // SAFETY: out holds two floats per thread of both blocks.
        let r = unsafe {
            emu.launch(
                "emu_neighbour",
                (2, 1, 1),
                (n as u32, 1, 1),
                2 * n * 4,
                &[Arg::Buf(&out), Arg::I32(sync)],
            )
        };
        if emu.racecheck() {
            // (MOTIONRT_EMU_RACECHECK=1) reading the unwritten half is itself an error then
            let e = r
                .expect_err("an unwritten read passed the race check")
                .to_string();
            assert!(e.contains("which no thread of this block wrote"), "{e}");
            continue;
        }
        r.unwrap();
        let v = out.to_vec::<u32>();
        for blk in 0..2 {
            for t in 0..n {
                let (nb, unwritten) = (v[(blk * n + t) * 2], v[(blk * n + t) * 2 + 1]);
                assert_eq!(
                    unwritten, 0xffff_ffff,
                    "block {blk} thread {t}: unwritten smem"
                );
                let want = ((t + 1) % n) as f32;
                if sync == 1 || t == n - 1 {
                    // the last thread runs after thread 0 wrote
                    assert_eq!(
                        f32::from_bits(nb),
                        want,
                        "sync {sync} block {blk} thread {t}"
                    );
                } else {
                    assert_eq!(
                        nb, 0xffff_ffff,
                        "block {blk} thread {t} read without a barrier"
                    );
                }
            }
        }
    }
}

#[test]
fn barriers_count_live_threads_and_deadlocks_are_reported() {
    let Some(emu) = emu() else { return };
    let out = out_buf::<f32>(64);
    launch(
        emu,
        "emu_early_exit",
        (1, 1, 1),
        (64, 1, 1),
        32 * 4,
        &[Arg::Buf(&out)],
    );
    let v = out.to_vec::<f32>();
    for (t, &x) in v[..32].iter().enumerate() {
        assert_eq!(x, (31 - t) as f32);
    }
    assert!(v[32..].iter().all(|x| x.is_nan()));

    let e = launch_err(
        emu,
        "emu_divergent_barrier",
        (2, 1, 1),
        (64, 1, 1),
        0,
        &[Arg::Buf(&out)],
    );
    for part in [
        "kernel emu_divergent_barrier",
        "block (0,0,0)",
        "deadlock",
        "32 thread(s) from (0,0,0) wait at __syncthreads (emu_self_test.cu:",
        "32 thread(s) from (32,0,0) wait at __syncthreads (emu_self_test.cu:",
    ] {
        assert!(e.contains(part), "{part:?} not in: {e}");
    }

    let e = launch_err(
        emu,
        "emu_barrier_vs_shuffle",
        (1, 1, 1),
        (32, 1, 1),
        0,
        &[Arg::Buf(&out)],
    );
    for part in [
        "deadlock: no thread can proceed: 16 thread(s) from (0,0,0) wait at __syncthreads",
        "16 lane(s) of warp 0 from thread (16,0,0) wait in __shfl_xor_sync (emu_self_test.cu:",
        "16 of 32 arrived",
    ] {
        assert!(e.contains(part), "{part:?} not in: {e}");
    }

    let e = launch_err(
        emu,
        "emu_ldmatrix_two_sites",
        (1, 1, 1),
        (32, 1, 1),
        0,
        &[Arg::Buf(&out)],
    );
    for part in [
        "reached ldmatrix.x4 (emu_self_test.cu:",
        "wait in it at emu_self_test.cu:",
        "same .aligned instruction",
    ] {
        assert!(e.contains(part), "{part:?} not in: {e}");
    }

    let e = launch_err(
        emu,
        "emu_shuffle_after_exit",
        (1, 1, 1),
        (32, 1, 1),
        0,
        &[Arg::Buf(&out)],
    );
    assert!(
        e.contains("thread (1,0,0) exited") && e.contains("__shfl_xor_sync"),
        "{e}"
    );
    let e = launch_err(
        emu,
        "emu_partial_mask",
        (1, 1, 1),
        (32, 1, 1),
        0,
        &[Arg::Buf(&out)],
    );
    assert!(e.contains("mask 0x0000ffff"), "{e}");
    let e = launch_err(
        emu,
        "emu_smem_overrun",
        (1, 1, 1),
        (32, 1, 1),
        64,
        &[Arg::Buf(&out), Arg::I32(16)],
    );
    assert!(e.contains("past the end of its 64 bytes"), "{e}");
}

#[test]
fn a_misaligned_16_byte_access_fails_as_on_a_gpu() {
    let Some(emu) = emu() else { return };
    // float16 elementwise add, 16 bytes a thread (n a multiple of 8): x one element (2 bytes)
    // past a 16-byte boundary
    let n = 64;
    let xs = buf::<u16>(&vec![1.0; n + 1]);
    let y = buf::<u16>(&vec![2.0; n]);
    let out = out_buf::<u16>(n);
    let (grid, block) = elementwise(n);
    let x_off = Arg::Addr(xs.as_ptr() as u64 + 2);
    let e = launch_err(
        emu,
        "binary_same_f16",
        grid,
        block,
        0,
        &[
            Arg::Buf(&out),
            x_off,
            Arg::Buf(&y),
            Arg::I64(n as i64),
            Arg::I32(0),
        ],
    );
    assert!(
        e.contains("16-byte load") && e.contains("must be 16-byte aligned"),
        "{e}"
    );
    // aligned, the same launch runs
    launch(
        emu,
        "binary_same_f16",
        grid,
        block,
        0,
        &[
            Arg::Buf(&out),
            Arg::Addr(xs.as_ptr() as u64),
            Arg::Buf(&y),
            Arg::I64(n as i64),
            Arg::I32(0),
        ],
    );
    assert!(read::<u16>(&out).iter().all(|&v| v == 3.0));
}

#[test]
fn launch_errors_name_what_is_wrong() {
    let Some(emu) = emu() else { return };
    let out = out_buf::<f32>(64);
    let e = launch_err(
        emu,
        "emu_neighbour",
        (1, 1, 1),
        (48, 1, 1),
        2 * 48 * 4,
        &[Arg::Buf(&out), Arg::I32(1)],
    );
    assert!(
        e.contains("48 threads") && e.contains("multiple of 32"),
        "{e}"
    );
    // SAFETY: the launch is refused before it runs.
    let e = unsafe { emu.launch("no_such_kernel", (1, 1, 1), (32, 1, 1), 0, &[]) }.unwrap_err();
    assert!(matches!(e, EmuError::UnknownKernel { .. }), "{e}");
    // an i32 where the kernel takes an int is fine; an i64 is not
    let e = launch_err(
        emu,
        "emu_neighbour",
        (1, 1, 1),
        (32, 1, 1),
        256,
        &[Arg::Buf(&out), Arg::I64(1)],
    );
    assert!(
        e.contains("argument 1 is a 8-byte signed integer") && e.contains("4-byte signed integer"),
        "{e}"
    );
    let e = launch_err(
        emu,
        "emu_neighbour",
        (1, 1, 1),
        (32, 1, 1),
        256,
        &[Arg::Buf(&out)],
    );
    assert!(e.contains("takes 2 arguments"), "{e}");
}

#[test]
fn compile_errors_carry_the_compiler_log() {
    if emu().is_none() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("motionrt-emu-bad-{}", std::process::id()));
    let e = Builder::new()
        .cache_dir(&dir)
        .source(
            "broken.cu",
            "extern \"C\" __global__ void broken(float* o) { o[0] = undeclared; }",
            &["broken"],
        )
        .build()
        .unwrap_err();
    let _ = std::fs::remove_dir_all(&dir);
    let msg = e.to_string();
    assert!(matches!(e, EmuError::Compile { .. }), "{msg}");
    assert!(
        msg.contains("broken.cu:1") && msg.contains("undeclared"),
        "{msg}"
    );
    let e = Builder::new()
        .source("x.cu", "", &["not an identifier"])
        .build()
        .unwrap_err();
    assert!(e.to_string().contains("is not a C identifier"), "{e}");
}

#[test]
fn shuffles_follow_the_cuda_semantics() {
    let Some(emu) = emu() else { return };
    let n = 64;
    let out = DeviceBuffer::zeroed(n * 8 * 4);
    launch(
        emu,
        "emu_shuffles",
        (1, 1, 1),
        (n as u32, 1, 1),
        0,
        &[Arg::Buf(&out)],
    );
    let v = out.to_vec::<i32>();
    for t in 0..n {
        let (w, l) = (t / 32 * 32, t % 32);
        let val = |lane: usize| ((w + lane) * 10) as i32;
        // width w: segments of w lanes; xor may reach earlier segments, later ones give var
        let xor = |m: usize, width: usize| {
            let s = l ^ m;
            if s < (l / width + 1) * width {
                val(s)
            } else {
                val(l)
            }
        };
        let idx = |src: usize, width: usize| val(l / width * width + src % width);
        let up = |d: usize| if l % 32 >= d { val(l - d) } else { val(l) };
        let down = |d: usize, width: usize| {
            if l % width + d < width {
                val(l + d)
            } else {
                val(l)
            }
        };
        let ballot = (0..32).filter(|x| x % 3 == 0).fold(0u32, |b, x| b | 1 << x) as i32;
        let want = [
            xor(5, 32),
            xor(5, 8),
            idx(l * 7 % 32, 32),
            idx(l + 3, 8),
            up(3),
            down(3, 16),
            ballot,
            496 + 31,
        ];
        assert_eq!(&v[t * 8..t * 8 + 8], &want, "thread {t}");
    }
}

#[test]
fn ldmatrix_follows_the_ptx_fragment_layout() {
    let Some(emu) = emu() else { return };
    let out = DeviceBuffer::zeroed(32 * 14 * 4);
    launch(
        emu,
        "emu_ldmatrix",
        (1, 1, 1),
        (32, 1, 1),
        0,
        &[Arg::Buf(&out)],
    );
    let v = out.to_vec::<u32>();
    // shared m[r][c] = 8 r + c + 1; lane a supplies row (5 a + 3) % 32
    let row_of = |lane: usize| (lane * 5 + 3) % 32;
    let elem = |lane: usize, col: usize| (row_of(lane) * 8 + col + 1) as u32;
    let pair = |lo: u32, hi: u32| lo | hi << 16;
    for l in 0..32 {
        let o = &v[l * 14..l * 14 + 14];
        // matrix i: rows from lanes 8i..8i+7; lane l holds row l/4, cols 2(l%4), 2(l%4)+1
        let plain = |i: usize| {
            let a = 8 * i + l / 4;
            pair(elem(a, 2 * (l % 4)), elem(a, 2 * (l % 4) + 1))
        };
        // .trans: lane l holds (row 2(l%4), col l/4) and (row 2(l%4)+1, col l/4)
        let trans = |i: usize| {
            let a = 8 * i + 2 * (l % 4);
            pair(elem(a, l / 4), elem(a + 1, l / 4))
        };
        let want = [
            plain(0),
            plain(0),
            plain(1),
            plain(0),
            plain(1),
            plain(2),
            plain(3),
            trans(0),
            trans(0),
            trans(1),
            trans(0),
            trans(1),
            trans(2),
            trans(3),
        ];
        assert_eq!(o, &want, "lane {l}");
    }
}

#[test]
fn mma_computes_the_matrix_product() {
    let Some(emu) = emu() else { return };
    let a = <u16 as Host>::encode(&random(16 * 16, 1));
    let b = <u16 as Host>::encode(&random(16 * 8, 2));
    let c = random(16 * 8, 3);
    let (af, bf) = (<u16 as Host>::decode(&a), <u16 as Host>::decode(&b));
    let want: Vec<f32> = (0..16 * 8)
        .map(|x| {
            let (i, j) = (x / 8, x % 8);
            let s: f64 = (0..16)
                .map(|k| af[i * 16 + k] as f64 * bf[k * 8 + j] as f64)
                .sum();
            (s + c[x] as f64) as f32
        })
        .collect();
    let (ab, bb, cb) = (
        DeviceBuffer::from_slice(&a),
        DeviceBuffer::from_slice(&b),
        DeviceBuffer::from_slice(&c),
    );
    for kernel in ["emu_mma_ldmatrix", "emu_mma_direct"] {
        let d = out_buf::<f32>(16 * 8);
        launch(
            emu,
            kernel,
            (1, 1, 1),
            (32, 1, 1),
            0,
            &[Arg::Buf(&ab), Arg::Buf(&bb), Arg::Buf(&cb), Arg::Buf(&d)],
        );
        let got = d.to_vec::<f32>();
        let r = rel(&got, &want);
        assert!(r < 1e-6, "{kernel}: max error {r:.2e}");
    }
}

#[test]
fn cp_async_data_lands_at_the_wait() {
    let Some(emu) = emu() else { return };
    let n = 64;
    let g: Vec<f32> = (0..3 * 4 * n).map(|i| i as f32).collect();
    let gb = DeviceBuffer::from_slice(&g);
    let out = out_buf::<f32>(8 * n);
    // SAFETY: g holds 3 x 4 floats and out 8 floats per thread.
    let r = unsafe {
        emu.launch(
            "emu_cp_async",
            (1, 1, 1),
            (n as u32, 1, 1),
            3 * 4 * n * 4,
            &[Arg::Buf(&gb), Arg::Buf(&out)],
        )
    };
    if emu.racecheck() {
        // (MOTIONRT_EMU_RACECHECK=1) reading a destination before its copy landed is an error
        let e = r
            .expect_err("an early read passed the race check")
            .to_string();
        assert!(e.contains("to it is in flight"), "{e}");
    } else {
        r.unwrap();
        cp_async_values(n, &g, &out);
    }
    let e = launch_err(
        emu,
        "emu_cp_async_misaligned",
        (1, 1, 1),
        (32, 1, 1),
        256,
        &[Arg::Buf(&gb), Arg::Buf(&out)],
    );
    assert!(e.contains("16-byte aligned"), "{e}");
}

#[test]
fn bank_statistics_count_the_wavefronts_of_each_phase() {
    let Some(emu) = emu() else { return };
    let g: Vec<u32> = (0..128).collect();
    let gb = DeviceBuffer::from_slice(&g);
    let out = DeviceBuffer::zeroed(128 * 4);
    // one launch of emu_bank_pitch (lane `skip` zero-filling), counted if `count`
    let run = |pitch: usize, skip: i32, count: bool| {
        emu.bank_stats(count);
        let args = [
            Arg::Buf(&gb),
            Arg::Buf(&out),
            Arg::from(pitch as i32),
            Arg::from(skip),
        ];
        launch(
            emu,
            "emu_bank_pitch",
            (1, 1, 1),
            (32, 1, 1),
            7 * pitch + 64,
            &args,
        );
        let r = emu.bank_report();
        emu.bank_stats(false);
        r
    };
    // eight 16-byte rows `pitch` bytes apart (at least 64: the four chunks of a row do not overlap
    // the next row) in each of the 4 phases of both instructions: the wavefronts are the largest
    // number of rows whose chunks fall in the same four banks (row r at r · pitch mod 128)
    for (pitch, ways) in [(64, 4), (80, 1), (96, 2), (128, 8), (144, 1), (160, 2)] {
        let r = run(pitch, -1, true);
        let ops: Vec<&str> = r.iter().map(|s| s.op.as_str()).collect();
        assert_eq!(ops, ["cp.async.16", "ldmatrix.x4"], "pitch {pitch}: {r:?}");
        for s in &r {
            assert!(s.site.starts_with("emu_self_test.cu:"), "{s:?}");
            // 32 lanes' consecutive 16 bytes: 16 sectors (the buffer is 64-byte aligned)
            let sectors = if s.op == "cp.async.16" { 16 } else { 0 };
            assert_eq!((s.sectors, s.ideal_sectors), (sectors, sectors), "{}", s.op);
            assert_eq!(
                (s.requests, s.wavefronts, s.ideal, s.uneven),
                (1, 4 * ways, 4, 0),
                "pitch {pitch}, {}",
                s.op
            );
        }
        // the data made the round trip: lane l's register i holds row l / 4 of chunk i
        let v = out.to_vec::<u32>();
        for l in 0..32 {
            for i in 0..4 {
                let row = l / 4;
                assert_eq!(v[4 * l + i], g[4 * (8 * i + row) + l % 4], "pitch {pitch}");
            }
        }
    }
    // lane 5 zero-fills its chunk: the other 31 lanes' cp.async, uneven (quarter 0: 7 rows in the
    // same banks)
    let counts: Vec<_> = run(128, 5, true)
        .iter()
        .map(|s| (s.op.clone(), s.requests, s.wavefronts, s.ideal, s.uneven))
        .collect();
    let want = [("cp.async.16", 1, 31, 4, 1), ("ldmatrix.x4", 1, 32, 4, 0)];
    assert_eq!(
        counts,
        want.map(|(o, a, b, c, d)| (o.to_string(), a, b, c, d))
    );
    // off: nothing counted
    assert!(run(128, -1, false).is_empty());
}

/// The values `emu_cp_async` left (without race checking: with it, its early reads are errors).
fn cp_async_values(n: usize, g: &[f32], out: &DeviceBuffer) {
    let v = out.to_vec::<u32>();
    let stale = 0xffff_ffffu32;
    for t in 0..n {
        let o = &v[t * 8..t * 8 + 8];
        let at = |i: usize| (g[i]).to_bits();
        let next = (t + 1) % n;
        let want = [
            stale,
            at(4 * t),
            stale,
            at(4 * (n + t)),
            stale,
            at(4 * (2 * n + t)),
            if t == n - 1 { at(0) } else { stale },
            at(4 * next),
        ];
        assert_eq!(o, &want, "thread {t}");
    }
}

#[test]
fn atomics_see_every_thread() {
    let Some(emu) = emu() else { return };
    let (counter, sum, hi) = (
        DeviceBuffer::zeroed(4),
        DeviceBuffer::zeroed(4),
        DeviceBuffer::zeroed(4),
    );
    launch(
        emu,
        "emu_atomics",
        (3, 1, 1),
        (96, 1, 1),
        0,
        &[Arg::Buf(&counter), Arg::Buf(&sum), Arg::Buf(&hi)],
    );
    assert_eq!(counter.to_vec::<i32>(), [288]);
    assert_eq!(sum.to_vec::<f32>(), [144.0]);
    assert_eq!(hi.to_vec::<u32>(), [287]);
}

#[test]
fn float16_conversions_round_to_nearest_even() {
    let Some(emu) = emu() else { return };
    // every float16 to f32
    let all: Vec<u16> = (0..=u16::MAX).collect();
    let hb = DeviceBuffer::from_slice(&all);
    let out = out_buf::<f32>(all.len());
    let (g, b) = elementwise(all.len());
    launch(
        emu,
        "cast_to_f32_f16",
        g,
        b,
        0,
        &[Arg::Buf(&out), Arg::Buf(&hb), Arg::I64(all.len() as i64)],
    );
    for (h, got) in all.iter().zip(out.to_vec::<f32>()) {
        let want = f16_to_f32(*h);
        assert!(
            got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
            "{h:#06x}: {got} != {want}"
        );
    }
    // f32 to float16: every midpoint between neighbouring float16 values and its neighbours,
    // subnormals, overflow, infinities, NaN, random values
    let mut xs: Vec<f32> = vec![
        0.0,
        -0.0,
        65504.0,
        65519.99,
        65520.0,
        -65520.0,
        1e6,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::MIN_POSITIVE,
        1e-45,
        2.9802322e-8, // 2^-25: half the smallest subnormal (ties to zero)
        2.9802326e-8, // just above
        5.9604645e-8,
    ];
    for h in 0..0x7bffu16 {
        let (lo, hi) = (f16_to_f32(h) as f64, f16_to_f32(h + 1) as f64);
        let mid = ((lo + hi) / 2.0) as f32; // exact in f32
        for x in [
            mid,
            f32::from_bits(mid.to_bits() - 1),
            f32::from_bits(mid.to_bits() + 1),
        ] {
            xs.push(x);
            xs.push(-x);
        }
    }
    xs.extend(random(20000, 7).iter().map(|x| x * 1000.0));
    xs.extend(random(20000, 8).iter().map(|x| x * 1e-5));
    let xb = DeviceBuffer::from_slice(&xs);
    let out = out_buf::<u16>(xs.len());
    let (g, b) = elementwise(xs.len());
    launch(
        emu,
        "cast_from_f32_f16",
        g,
        b,
        0,
        &[Arg::Buf(&out), Arg::Buf(&xb), Arg::I64(xs.len() as i64)],
    );
    for (x, got) in xs.iter().zip(out.to_vec::<u16>()) {
        if x.is_nan() {
            assert!(f16_to_f32(got).is_nan(), "NaN became {got:#06x}");
        } else {
            assert_eq!(got, f32_to_f16(*x), "{x:e} ({:#010x})", x.to_bits());
        }
    }
}

// ---- attention kernels (verified on H100/H200) ---------------------------------------------------

fn temporal<T: Host>(emu: &Emu, n: usize, l: usize, s: usize, heads: usize, d: usize, bias: usize) {
    let a = Attention::new(n, l, s, heads, d);
    let c = heads * d;
    let seed = (n * 1000 + l * 100 + s * 10 + bias) as u64;
    let q = T::round(&random(n * l * c, seed));
    let k = T::round(&random(n * s * c, seed + 1));
    let v = T::round(&random(n * s * c, seed + 2));
    let b = (bias > 0).then(|| T::round(&random(bias * l * s, seed + 3)));
    let mut want = vec![0f32; n * l * c];
    a.run(&q, &k, &v, b.as_deref(), &mut want).unwrap();
    let (qb, kb, vb) = (buf::<T>(&q), buf::<T>(&k), buf::<T>(&v));
    let bb = b.as_ref().map(|b| buf::<T>(b));
    let y = out_buf::<T>(n * l * c);
    launch(
        emu,
        &format!("temporal_attention_{}", T::SUFFIX),
        (n as u32, heads as u32, 1),
        (32 * l.clamp(1, 8) as u32, 1, 1),
        2 * s * d * 4,
        &[
            Arg::Buf(&qb),
            Arg::Buf(&kb),
            Arg::Buf(&vb),
            bb.as_ref().map_or(Arg::Null, Arg::Buf),
            Arg::Buf(&y),
            Arg::I32(l as i32),
            Arg::I32(s as i32),
            Arg::I32(heads as i32),
            Arg::I32(d as i32),
            Arg::I32(bias.max(1) as i32),
            Arg::F32(a.scale),
        ],
    );
    check::<T>(
        &format!("temporal attention N {n} L {l} S {s} {heads}x{d} bias heads {bias}"),
        &read::<T>(&y),
        &want,
    );
}

#[test]
fn temporal_attention_matches_the_cpu() {
    let Some(emu) = emu() else { return };
    for (n, l, s, heads, d, bias) in [
        (3, 16, 16, 8, 40, 0),
        (3, 16, 16, 8, 40, 8),
        (2, 5, 7, 2, 24, 0),
        (2, 5, 7, 2, 24, 1),
    ] {
        temporal::<f32>(emu, n, l, s, heads, d, bias);
        temporal::<u16>(emu, n, l, s, heads, d, bias);
    }
}

fn sparse<T: Host>(emu: &Emu, videos: usize, frames: usize, tokens: usize, heads: usize, d: usize) {
    let a = SparseCausal::new(videos, frames, tokens, heads, d);
    let len = videos * frames * tokens * heads * d;
    let seed = (videos * 100 + frames * 10 + tokens) as u64;
    let q = T::round(&random(len, seed));
    let k = T::round(&random(len, seed + 1));
    let v = T::round(&random(len, seed + 2));
    let mut want = vec![0f32; len];
    a.run(&q, &k, &v, &mut want).unwrap();
    let (qb, kb, vb) = (buf::<T>(&q), buf::<T>(&k), buf::<T>(&v));
    let y = out_buf::<T>(len);
    launch(
        emu,
        &format!("sparse_causal_attention_{}", T::SUFFIX),
        (
            (videos * frames) as u32,
            heads as u32,
            tokens.div_ceil(32) as u32,
        ),
        (256, 1, 1),
        2 * 32 * d * 4,
        &[
            Arg::Buf(&qb),
            Arg::Buf(&kb),
            Arg::Buf(&vb),
            Arg::Buf(&y),
            Arg::I32(frames as i32),
            Arg::I32(tokens as i32),
            Arg::I32(heads as i32),
            Arg::I32(d as i32),
            Arg::F32(a.scale),
        ],
    );
    check::<T>(
        &format!("sparse-causal attention {videos}x{frames} frames, {tokens} tokens, {heads}x{d}"),
        &read::<T>(&y),
        &want,
    );
}

#[test]
fn sparse_causal_attention_matches_the_cpu() {
    let Some(emu) = emu() else { return };
    // 40 tokens: two query tiles and 80 keys in three key tiles
    for (videos, frames, tokens, heads, d) in
        [(1, 3, 40, 2, 24), (2, 3, 16, 8, 40), (2, 2, 6, 1, 40)]
    {
        sparse::<f32>(emu, videos, frames, tokens, heads, d);
        sparse::<u16>(emu, videos, frames, tokens, heads, d);
    }
}

/// How Q, K and V lie in memory: each alone (row stride H·d), or as column blocks of one
/// projection's output (row stride 3·H·d for Q, K, V; 2·H·d for K, V).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Packing {
    Apart,
    Qkv,
    Kv,
}

/// `parts` tensors of `rows × c` as column blocks of one `rows × (parts·c)` buffer.
fn interleave(parts: &[&[f32]], rows: usize, c: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(rows * c * parts.len());
    for r in 0..rows {
        for p in parts {
            v.extend_from_slice(&p[r * c..][..c]);
        }
    }
    v
}

/// The engine's float16 attention kernels (engine_ops.cu) with its launch shapes
/// (runtime/src/engine/launch.rs): `attention_tiled` for long queries, `attention_short{1,2}`
/// for at most 16 / 32 query rows, against the CPU implementation on float16-rounded inputs.
fn attention_f16(emu: &Emu, kernel: &str, n: usize, l: usize, s: usize, heads: usize, d: usize) {
    attention_f16_packed(emu, kernel, (n, l, s, heads, d), Packing::Apart, 1);
}

/// Rows of `n` sequences of `len` tokens (`c` values each) from sequence order to `ns` sequences
/// interleaved (sequence i's token t at row (i / ns)·len·ns + i % ns + t·ns), or back.
fn interleave_seqs(x: &[f32], n: usize, len: usize, c: usize, ns: usize, back: bool) -> Vec<f32> {
    let mut y = vec![0f32; x.len()];
    for i in 0..n {
        for t in 0..len {
            let (a, b) = (i * len + t, (i / ns) * len * ns + i % ns + t * ns);
            let (from, to) = if back { (b, a) } else { (a, b) };
            y[to * c..(to + 1) * c].copy_from_slice(&x[from * c..(from + 1) * c]);
        }
    }
    y
}

fn attention_f16_packed(
    emu: &Emu,
    kernel: &str,
    shape: (usize, usize, usize, usize, usize),
    packing: Packing,
    ns: usize,
) {
    // as the engine chooses (launch::attention_entry_head): head size 40 has entries of its
    // own, others take d rounded up to 16
    let d = shape.4;
    let entry = if d == 40 { 40 } else { d.div_ceil(16) * 16 };
    attention_f16_entry(emu, kernel, shape, packing, ns, entry, (|_| 1.0, |_| 1.0));
}

/// A factor per token of a sequence (its index in the sequence), applied to random Q or K rows.
type Gain = fn(usize) -> f32;

/// `attention_{kernel}_f16_d{entry}` on the shape (entry: d, or d rounded up to 16).
fn attention_f16_entry(
    emu: &Emu,
    kernel: &str,
    (n, l, s, heads, d): (usize, usize, usize, usize, usize),
    packing: Packing,
    ns: usize,
    entry: usize,
    (q_gain, k_gain): (Gain, Gain),
) {
    let a = Attention::new(n, l, s, heads, d);
    let c = heads * d;
    let dp = d.div_ceil(16) * 16;
    let pitch = dp + 8;
    let seed = (n * 1000 + l * 10 + s + d) as u64;
    // larger logits than unit noise, so the softmax is far from uniform
    // (query t of each sequence times q_gain(t))
    let q: Vec<f32> = random(n * l * c, seed)
        .iter()
        .enumerate()
        .map(|(i, x)| 3.0 * x * q_gain(i / c % l))
        .collect();
    let q = <u16 as Host>::round(&q);
    // key t of each sequence times k_gain(t)
    let k: Vec<f32> = random(n * s * c, seed + 1)
        .iter()
        .enumerate()
        .map(|(i, x)| x * k_gain(i / c % s))
        .collect();
    let k = <u16 as Host>::round(&k);
    let v = <u16 as Host>::round(&random(n * s * c, seed + 2));
    let mut want = vec![0f32; n * l * c];
    a.run(&q, &k, &v, None, &mut want).unwrap();
    // the rows as the kernels read them: `ns` sequences interleaved
    let (q, k, v) = (
        interleave_seqs(&q, n, l, c, ns, false),
        interleave_seqs(&k, n, s, c, ns, false),
        interleave_seqs(&v, n, s, c, ns, false),
    );
    // addresses and row strides of Q, K, V in the packing's buffers
    let half = |b: &DeviceBuffer, col: usize| Arg::Addr(b.as_ptr() as u64 + 2 * col as u64);
    let (bufs, ptrs, ld): (Vec<DeviceBuffer>, [(usize, usize); 3], usize) = match packing {
        Packing::Apart => (
            vec![buf::<u16>(&q), buf::<u16>(&k), buf::<u16>(&v)],
            [(0, 0), (1, 0), (2, 0)],
            c,
        ),
        Packing::Qkv => {
            assert_eq!(l, s, "Q, K and V from one projection have as many rows");
            (
                vec![buf::<u16>(&interleave(&[&q, &k, &v], n * l, c))],
                [(0, 0), (0, c), (0, 2 * c)],
                3 * c,
            )
        }
        Packing::Kv => (
            vec![buf::<u16>(&q), buf::<u16>(&interleave(&[&k, &v], n * s, c))],
            [(0, 0), (1, 0), (1, c)],
            2 * c,
        ),
    };
    let (ldq, ldkv) = if packing == Packing::Kv {
        (c, ld)
    } else {
        (ld, ld)
    };
    let y = out_buf::<u16>(n * l * c);
    let name = format!("attention_{kernel}_f16_d{entry}");
    let [(qi, qo), (ki, ko), (vi, vo)] = ptrs;
    let common = [
        half(&bufs[qi], qo),
        half(&bufs[ki], ko),
        half(&bufs[vi], vo),
        Arg::Buf(&y),
    ];
    let tail = [
        Arg::I32(l as i32),
        Arg::I32(s as i32),
        Arg::I32(heads as i32),
        Arg::I32(d as i32),
        Arg::I32(ldq as i32),
        Arg::I32(ldkv as i32),
        Arg::I32(ns as i32),
        Arg::F32(a.scale),
    ];
    if kernel.starts_with("tiled") {
        // 128-row blocks: 8 warps of 16 rows, or (tiled2) 4 warps of 32
        let threads = if kernel == "tiled2" { 128 } else { 256 };
        let args: Vec<Arg<'_>> = common.into_iter().chain(tail).collect();
        launch(
            emu,
            &name,
            (l.div_ceil(128) as u32, heads as u32, n as u32),
            (threads, 1, 1),
            4 * 64 * pitch * 2,
            &args,
        );
    } else {
        let mt = if kernel == "short1" { 1 } else { 2 };
        let args: Vec<Arg<'_>> = common
            .into_iter()
            .chain([Arg::I32(n as i32)])
            .chain(tail)
            .collect();
        launch(
            emu,
            &name,
            ((n * heads).div_ceil(4) as u32, 1, 1),
            (128, 1, 1),
            4 * 3 * 16 * mt * pitch * 2,
            &args,
        );
    }
    check::<u16>(
        &format!("{name}: N {n} L {l} S {s} {heads}x{d} {packing:?} ns {ns}"),
        &interleave_seqs(&read::<u16>(&y), n, l, c, ns, true),
        &want,
    );
}

#[test]
fn attention_reads_q_k_v_packed_in_one_projection() {
    let Some(emu) = emu() else { return };
    // self-attention over pixels and frames (Q, K, V one [rows, 3C] output), cross-attention
    // (K, V one [rows, 2C] output)
    for (kernel, shape, packing) in [
        ("tiled", (1, 130, 130, 2, 40), Packing::Qkv),
        ("tiled", (2, 100, 77, 2, 80), Packing::Kv),
        ("short1", (3, 16, 16, 2, 40), Packing::Qkv),
        ("short2", (1, 24, 24, 2, 160), Packing::Qkv),
        ("short1", (2, 9, 37, 1, 48), Packing::Kv),
    ] {
        attention_f16_packed(emu, kernel, shape, packing, 1);
    }
}

/// The DP = 48 entries choose the m16n8k8 path at run time for d = 40 (the engine takes the
/// d = 40 entries, where it is a compile-time choice; other odd multiples of 8 take this path).
#[test]
fn attention_dp48_entries_take_head_size_40_at_run_time() {
    let Some(emu) = emu() else { return };
    for (kernel, shape, packing, ns) in [
        ("tiled", (1, 130, 77, 2, 40), Packing::Kv, 1),
        ("short1", (6, 16, 16, 2, 40), Packing::Qkv, 3),
        ("short2", (2, 24, 24, 2, 40), Packing::Apart, 1),
    ] {
        attention_f16_entry(emu, kernel, shape, packing, ns, 48, (|_| 1.0, |_| 1.0));
    }
}

/// The tiled kernels take each row's weights against a running max that moves only when some
/// row of the warp has grown past it by more than 2^8 (`att_softmax`, `ATT_RESCALE_LOG2`): keys
/// whose scores grow tile by tile, each 64-key tile's max some 2^10 past the last's (the rescale
/// runs at every tile — left out, or with a higher threshold, the weights overflow float16), and
/// shrink (it runs at the first tile only: the rest are taken against a max up to 2^8 below their
/// own); and with the growth in one half of each 16-row tile only (queries 0–7 or 8–15 of 16
/// scaled down to a growth below the threshold), so that a vote over the other half's rows
/// alone misses it. (That tiles skip the rescale is seen in the machine code, not here.)
#[test]
fn tiled_attention_rescales_when_a_max_grows_past_its_threshold() {
    let Some(emu) = emu() else { return };
    let one: Gain = |_| 1.0;
    let grow: Gain = |t| 1.0 + (t / 64) as f32;
    let shrink: Gain = |t| 4.0 - (t / 64) as f32;
    let low_half: Gain = |t| if t % 16 < 8 { 1.0 } else { 0.2 };
    let high_half: Gain = |t| if t % 16 < 8 { 0.2 } else { 1.0 };
    for gains in [
        (one, grow),
        (one, shrink),
        (low_half, grow),
        (high_half, grow),
    ] {
        for (kernel, d, entry) in [("tiled", 40, 40), ("tiled2", 40, 40), ("tiled", 80, 80)] {
            attention_f16_entry(
                emu,
                kernel,
                (1, 40, 250, 2, d),
                Packing::Apart,
                1,
                entry,
                gains,
            );
        }
    }
}

#[test]
fn attention_reads_sequences_interleaved() {
    let Some(emu) = emu() else { return };
    // frame-major motion modules: the frames of one position are rows H·W apart (here 6 or 5
    // positions per sample, 2 or 3 samples), Q, K, V one projection's output or apart
    for (kernel, shape, packing, ns) in [
        ("short1", (12, 16, 16, 2, 40), Packing::Qkv, 6),
        ("short2", (10, 24, 24, 1, 80), Packing::Apart, 5),
        ("tiled", (6, 70, 70, 2, 40), Packing::Qkv, 3),
    ] {
        attention_f16_packed(emu, kernel, shape, packing, ns);
    }
}

#[test]
fn tiled_attention_matches_the_cpu() {
    let Some(emu) = emu() else { return };
    for (n, l, s, heads, d) in [
        // cross-attention (77 keys: a full and a partial tile), rows past L in the block
        (2, 100, 77, 2, 40),
        // one exact tile, the smallest head
        (1, 128, 64, 1, 16),
        // two row blocks, four key tiles (both stages twice), the last partial
        (1, 130, 200, 2, 80),
        // every other padded head size once (120 pads to 128)
        (1, 20, 70, 1, 32),
        (1, 20, 70, 1, 48),
        (1, 20, 70, 1, 64),
        (1, 20, 70, 1, 96),
        (1, 20, 70, 1, 120),
        (1, 20, 70, 1, 160),
        // a single key
        (1, 40, 1, 2, 40),
    ] {
        attention_f16(emu, "tiled", n, l, s, heads, d);
    }
}

/// `attention_tiled2_f16_d40` (4 warps of two 16-row tiles sharing each K and V fragment): rows
/// past L in a warp's second tile and in its first, keys over partial tiles, one key, and Q, K,
/// V packed and interleaved as the engine gives them.
#[test]
fn two_tile_attention_matches_the_cpu() {
    let Some(emu) = emu() else { return };
    for (n, l, s, heads) in [
        (2, 100, 77, 2),
        (1, 128, 200, 1),
        (1, 20, 70, 2),
        (1, 40, 1, 1),
    ] {
        attention_f16(emu, "tiled2", n, l, s, heads, 40);
    }
    attention_f16_packed(emu, "tiled2", (1, 130, 130, 2, 40), Packing::Qkv, 1);
    attention_f16_packed(emu, "tiled2", (2, 100, 77, 2, 40), Packing::Kv, 1);
    attention_f16_packed(emu, "tiled2", (6, 70, 70, 2, 40), Packing::Qkv, 3);
}

#[test]
fn short_attention_matches_the_cpu() {
    let Some(emu) = emu() else { return };
    for (kernel, n, l, s, heads, d) in [
        // motion-module attention over 16 frames; 6 warps' tasks: one block partly idle
        ("short1", 3, 16, 16, 2, 40),
        ("short1", 2, 16, 16, 8, 80),
        // fewer rows than a tile, keys over several tiles (the last partial)
        ("short1", 1, 9, 37, 3, 160),
        // the same at d = 40 (its entries sum the weights on the tensor cores)
        ("short1", 1, 9, 37, 2, 40),
        ("short1", 5, 1, 1, 1, 16),
        // 24 and 32 frames (v1 / v2 positional tables)
        ("short2", 2, 24, 24, 2, 40),
        ("short2", 1, 32, 32, 8, 160),
        ("short2", 1, 17, 70, 1, 120),
    ] {
        attention_f16(emu, kernel, n, l, s, heads, d);
    }
}

/// `conv_igemm_f16_n{64,128}` (the channels-last implicit-GEMM convolution, a tactic the engine times
/// against cuDNN's) against a direct convolution on the CPU of the same float16-rounded values:
/// partial pixel and channel blocks, stride 2, a 1×1 filter, and the epilogue's bias,
/// per-sample bias and residual.
#[test]
fn implicit_gemm_convolution_matches_the_cpu() {
    let Some(emu) = emu() else { return };
    // (n, h, w, c, o, kh, kw, stride, pad, epilogue)
    for (n, h, wd, c, o, kh, kw, st, pd, epi) in [
        (2, 5, 6, 32, 24, 3, 3, 1, 1, true),
        (3, 8, 8, 64, 136, 3, 3, 1, 1, false),
        (1, 9, 7, 32, 72, 3, 3, 2, 1, true),
        (2, 4, 4, 96, 16, 1, 1, 1, 0, true),
    ] {
        let (oh, ow) = ((h + 2 * pd - kh) / st + 1, (wd + 2 * pd - kw) / st + 1);
        let m = n * oh * ow;
        let kdim = kh * kw * c;
        let seed = (n * 100 + h * 10 + c + o) as u64;
        let round = |v: Vec<f32>| <u16 as Host>::round(&v);
        let x = round(random(n * h * wd * c, seed));
        // weights [o, kh, kw, c], scaled so a sum over k stays near unit size
        let sc = 1.0 / (kdim as f32).sqrt();
        let wt = round(random(o * kdim, seed + 1).iter().map(|v| v * sc).collect());
        let bias = round(random(o, seed + 2));
        let sbias = round(random(n * o, seed + 3));
        let res = round(random(m * o, seed + 4));
        let mut want = conv_nhwc_cpu(&x, &wt, [n, h, wd, c], [o, kh, kw], st, pd);
        if epi {
            for (row, wr) in want.chunks_mut(o).enumerate() {
                let img = row / (oh * ow);
                for (oc, v) in wr.iter_mut().enumerate() {
                    *v = (*v as f64 + (bias[oc] + sbias[img * o + oc] + res[row * o + oc]) as f64)
                        as f32;
                }
            }
        }
        let (bx, bw) = (buf::<u16>(&x), buf::<u16>(&wt));
        let (bb, bs, br) = (buf::<u16>(&bias), buf::<u16>(&sbias), buf::<u16>(&res));
        for bn in [64usize, 128] {
            let out = out_buf::<u16>(m * o);
            let opt = |b| if epi { Arg::Buf(b) } else { Arg::Null };
            let i = |v: usize| Arg::I32(v as i32);
            launch(
                emu,
                &format!("conv_igemm_f16_n{bn}"),
                (m.div_ceil(128) as u32, o.div_ceil(bn) as u32, 1),
                (128, 1, 1),
                3 * (128 + bn) * 40 * 2,
                &[
                    Arg::Buf(&bx),
                    Arg::Buf(&bw),
                    Arg::Buf(&out),
                    opt(&bb),
                    opt(&bs),
                    opt(&br),
                    i(n),
                    i(h),
                    i(wd),
                    i(c),
                    i(oh),
                    i(ow),
                    i(o),
                    i(kh),
                    i(kw),
                    i(st),
                    i(st),
                    i(pd),
                    i(pd),
                ],
            );
            check::<u16>(
                &format!(
                    "conv_igemm_f16_n{bn} {n}x{h}x{wd}x{c} -> {o}, {kh}x{kw} stride {st} pad {pd}"
                ),
                &read::<u16>(&out),
                &want,
            );
        }
    }
}

/// The channels-last convolution of `x` `[n, h, w, c]` by `wt` `[o, kh, kw, c]` (stride `st`,
/// zero padding `pd` each side), `[n, oh, ow, o]`, summed in float64.
fn conv_nhwc_cpu(
    x: &[f32],
    wt: &[f32],
    [n, h, wd, c]: [usize; 4],
    [o, kh, kw]: [usize; 3],
    st: usize,
    pd: usize,
) -> Vec<f32> {
    let (oh, ow) = ((h + 2 * pd - kh) / st + 1, (wd + 2 * pd - kw) / st + 1);
    let mut want = vec![0f32; n * oh * ow * o];
    for img in 0..n {
        for y in 0..oh {
            for xx in 0..ow {
                let row = (img * oh + y) * ow + xx;
                for oc in 0..o {
                    let mut acc = 0f64;
                    for a in 0..kh {
                        for b in 0..kw {
                            let (iy, ix) = (
                                (y * st + a) as isize - pd as isize,
                                (xx * st + b) as isize - pd as isize,
                            );
                            if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize {
                                continue;
                            }
                            let xi = ((img * h + iy as usize) * wd + ix as usize) * c;
                            let wi = ((oc * kh + a) * kw + b) * c;
                            for ci in 0..c {
                                acc += x[xi + ci] as f64 * wt[wi + ci] as f64;
                            }
                        }
                    }
                    want[row * o + oc] = acc as f32;
                }
            }
        }
    }
    want
}

/// `group_norm_nhwc_coeffs_f16` then `conv_igemm_gn_f16_n{64,128}` (a GroupNorm + SiLU read by
/// the convolution after it straight from its input, a tactic the engine times against the
/// GroupNorm's apply pass and the convolution) against the CPU's GroupNorm + SiLU, rounded to
/// float16 as the apply pass stores it, then convolved: the GroupNorm's input with and
/// without the biases of a convolution before it, images of fewer pixels than a block (a
/// thread's rows in two samples) and of a number that leaves blocks straddling two, padding
/// that must stay zero after the normalisation, and a strided and a 1x1 convolution.
#[test]
fn convolution_of_a_group_norm_from_its_input_matches_the_cpu() {
    let Some(emu) = emu() else { return };
    // (n, h, w, c, groups, o, kh, kw, stride, pad, input biases, silu)
    for (n, h, wd, c, g, o, kh, kw, st, pd, inb, silu) in [
        (2, 12, 12, 64, 8, 40, 3, 3, 1, 1, true, true),
        (5, 6, 6, 32, 4, 24, 3, 3, 1, 1, false, true),
        (3, 7, 9, 96, 32, 136, 3, 3, 2, 1, true, true),
        (2, 5, 5, 64, 16, 16, 1, 1, 1, 0, false, false),
    ] {
        let (oh, ow) = ((h + 2 * pd - kh) / st + 1, (wd + 2 * pd - kw) / st + 1);
        let m = n * oh * ow;
        let (sp, cg) = (h * wd, c / g);
        let seed = (n * 1000 + h * 10 + c + o) as u64;
        let round = |v: Vec<f32>| <u16 as Host>::round(&v);
        // an offset and spread per channel, as activations have
        let x = round(
            random(n * sp * c, seed)
                .iter()
                .enumerate()
                .map(|(i, v)| 0.5 + (i % c) as f32 * 0.01 + v * (1.0 + (i % 7) as f32 * 0.2))
                .collect(),
        );
        let gamma = round(random(c, seed + 1).iter().map(|v| 1.0 + 0.3 * v).collect());
        let beta = round(random(c, seed + 2).iter().map(|v| 0.2 * v).collect());
        let (xb, xsb) = (round(random(c, seed + 3)), round(random(n * c, seed + 4)));
        let inb_at = |img: usize, ch: usize| {
            if inb {
                (xb[ch] + xsb[img * c + ch]) as f64
            } else {
                0.0
            }
        };
        // mean and inverse deviation per (sample, group), as group_norm_nhwc_finalize leaves them
        let eps = 1e-5f64;
        let mut mr = vec![0f32; n * g * 2];
        let mut normed = vec![0f32; n * sp * c];
        for img in 0..n {
            for gi in 0..g {
                let vals: Vec<f64> = (0..sp)
                    .flat_map(|p| (gi * cg..(gi + 1) * cg).map(move |ch| (p, ch)))
                    .map(|(p, ch)| x[(img * sp + p) * c + ch] as f64 + inb_at(img, ch))
                    .collect();
                let mean = vals.iter().sum::<f64>() / vals.len() as f64;
                let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / vals.len() as f64;
                let rstd = 1.0 / (var + eps).sqrt();
                mr[(img * g + gi) * 2] = mean as f32;
                mr[(img * g + gi) * 2 + 1] = rstd as f32;
                for p in 0..sp {
                    for ch in gi * cg..(gi + 1) * cg {
                        let i = (img * sp + p) * c + ch;
                        let mut v =
                            (x[i] as f64 + inb_at(img, ch) - mean) * rstd * gamma[ch] as f64
                                + beta[ch] as f64;
                        if silu {
                            v /= 1.0 + (-v).exp();
                        }
                        normed[i] = v as f32;
                    }
                }
            }
        }
        let normed = round(normed);
        let kdim = kh * kw * c;
        let sc = 1.0 / (kdim as f32).sqrt();
        let wt = round(random(o * kdim, seed + 5).iter().map(|v| v * sc).collect());
        let bias = round(random(o, seed + 6));
        let mut want = conv_nhwc_cpu(&normed, &wt, [n, h, wd, c], [o, kh, kw], st, pd);
        for wr in want.chunks_mut(o) {
            for (oc, v) in wr.iter_mut().enumerate() {
                *v += bias[oc];
            }
        }
        let i = |v: usize| Arg::I32(v as i32);
        let ab = DeviceBuffer::filled(n * c * 2 * 4, 0xff);
        let (bmr, bg, bbe) = (buf::<f32>(&mr), buf::<u16>(&gamma), buf::<u16>(&beta));
        let (bxb, bxsb) = (buf::<u16>(&xb), buf::<u16>(&xsb));
        let opt = |b| if inb { Arg::Buf(b) } else { Arg::Null };
        let (grid, block) = elementwise(n * c);
        launch(
            emu,
            "group_norm_nhwc_coeffs_f16",
            grid,
            block,
            0,
            &[
                Arg::Buf(&ab),
                Arg::Buf(&bmr),
                Arg::Buf(&bg),
                Arg::Buf(&bbe),
                opt(&bxb),
                opt(&bxsb),
                i(n),
                i(c),
                i(g),
            ],
        );
        let (bx, bw, bb) = (buf::<u16>(&x), buf::<u16>(&wt), buf::<u16>(&bias));
        for bn in [64usize, 128] {
            let out = out_buf::<u16>(m * o);
            launch(
                emu,
                &format!("conv_igemm_gn_f16_n{bn}"),
                (m.div_ceil(128) as u32, o.div_ceil(bn) as u32, 1),
                (128, 1, 1),
                3 * (128 + bn) * 40 * 2,
                &[
                    Arg::Buf(&bx),
                    Arg::Buf(&bw),
                    Arg::Buf(&out),
                    Arg::Buf(&bb),
                    Arg::Null,
                    Arg::Null,
                    Arg::Buf(&ab),
                    i(silu as usize),
                    i(n),
                    i(h),
                    i(wd),
                    i(c),
                    i(oh),
                    i(ow),
                    i(o),
                    i(kh),
                    i(kw),
                    i(st),
                    i(st),
                    i(pd),
                    i(pd),
                ],
            );
            check::<u16>(
                &format!(
                    "conv_igemm_gn_f16_n{bn} {n}x{h}x{wd}x{c} ({g} groups, input biases {inb}, \
                     silu {silu}) -> {o}, {kh}x{kw} stride {st} pad {pd}"
                ),
                &read::<u16>(&out),
                &want,
            );
        }
    }
}

/// `layer_norm_stats_f16` then `conv_igemm_ln_f16_n{64,128}` as a GEMM (a LayerNorm read by the
/// projection after it straight from its input, a tactic the engine times against the
/// LayerNorm and cuBLASLt) against the CPU's LayerNorm, rounded to float16 as `layer_norm_warp`
/// stores it, then the product with bias and residual: rows short of a block and past one,
/// widths of one k tile and of several, with and without beta; rows whose mean is far from 0.
#[test]
fn projection_of_a_layer_norm_from_its_input_matches_the_cpu() {
    let Some(emu) = emu() else { return };
    // (rows, cols, out, beta)
    for (m, k, o, with_beta) in [
        (5, 32, 8, true),
        (200, 320, 136, true),
        (130, 96, 40, false),
    ] {
        let seed = (m * 13 + k + o) as u64;
        let round = |v: Vec<f32>| <u16 as Host>::round(&v);
        let x = round(
            random(m * k, seed)
                .iter()
                .enumerate()
                .map(|(i, v)| 3.0 + (i / k) as f32 * 0.05 + v * (1.0 + (i % 5) as f32 * 0.3))
                .collect(),
        );
        let gamma = round(random(k, seed + 1).iter().map(|v| 1.0 + 0.3 * v).collect());
        let beta = round(random(k, seed + 2).iter().map(|v| 0.2 * v).collect());
        let eps = 1e-5f64;
        let mut normed = vec![0f32; m * k];
        for r in 0..m {
            let row = &x[r * k..(r + 1) * k];
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / k as f64;
            let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / k as f64;
            let rstd = 1.0 / (var + eps).sqrt();
            for c in 0..k {
                let b = if with_beta { beta[c] as f64 } else { 0.0 };
                normed[r * k + c] = ((row[c] as f64 - mean) * rstd * gamma[c] as f64 + b) as f32;
            }
        }
        let normed = round(normed);
        let sc = 1.0 / (k as f32).sqrt();
        let wt = round(random(o * k, seed + 3).iter().map(|v| v * sc).collect());
        let bias = round(random(o, seed + 4));
        let res = round(random(m * o, seed + 5));
        let mut want = conv_nhwc_cpu(&normed, &wt, [1, m, 1, k], [o, 1, 1], 1, 0);
        for (r, wr) in want.chunks_mut(o).enumerate() {
            for (oc, v) in wr.iter_mut().enumerate() {
                *v += bias[oc] + res[r * o + oc];
            }
        }
        let i = |v: usize| Arg::I32(v as i32);
        let rs = DeviceBuffer::filled(m * 2 * 4, 0xff);
        let bx = buf::<u16>(&x);
        launch(
            emu,
            "layer_norm_stats_f16",
            (m.div_ceil(8) as u32, 1, 1),
            (256, 1, 1),
            0,
            &[
                Arg::Buf(&rs),
                Arg::Buf(&bx),
                Arg::I64(m as i64),
                i(k),
                Arg::F32(eps as f32),
            ],
        );
        let (bw, bb, br) = (buf::<u16>(&wt), buf::<u16>(&bias), buf::<u16>(&res));
        let (bg, bbe) = (buf::<u16>(&gamma), buf::<u16>(&beta));
        for bn in [64usize, 128] {
            let out = out_buf::<u16>(m * o);
            launch(
                emu,
                &format!("conv_igemm_ln_f16_n{bn}"),
                (m.div_ceil(128) as u32, o.div_ceil(bn) as u32, 1),
                (128, 1, 1),
                3 * (128 + bn) * 40 * 2,
                &[
                    Arg::Buf(&bx),
                    Arg::Buf(&bw),
                    Arg::Buf(&out),
                    Arg::Buf(&bb),
                    Arg::Null,
                    Arg::Buf(&br),
                    Arg::Buf(&rs),
                    Arg::Buf(&bg),
                    if with_beta { Arg::Buf(&bbe) } else { Arg::Null },
                    i(1),
                    i(m),
                    i(1),
                    i(k),
                    i(m),
                    i(1),
                    i(o),
                    i(1),
                    i(1),
                    i(1),
                    i(1),
                    i(0),
                    i(0),
                ],
            );
            check::<u16>(
                &format!("conv_igemm_ln_f16_n{bn} {m}x{k} -> {o}, beta {with_beta}"),
                &read::<u16>(&out),
                &want,
            );
        }
    }
}

/// The tensor-core kernels' `ldmatrix` and 16-byte `cp.async` at the engine's launch shapes, on
/// full tiles (no padding, no partial blocks), with the emulator's bank statistics
/// ([`Emu::bank_stats`]): each phase of eight 16-byte rows should fall in distinct banks, as
/// their shared rows' pitches (`CIG_P`, `DP + 8` halves) are chosen for. A site that takes more
/// wavefronts than it would without conflicts fails, named with its ratio. The convolution
/// kernels' `cp.async` should also read whole 32-byte sectors of global memory (a warp reads 8
/// rows' 64 contiguous bytes); the attention kernels' rows of 40 halves cannot (printed only).
#[test]
fn tensor_core_kernels_load_shared_memory_without_bank_conflicts() {
    let Some(emu) = emu() else { return };
    emu.bank_stats(true);
    // attention: 128 query rows and two 64-key tiles; the motion modules' 16 and 24 frames
    for d in [40, 80, 160] {
        attention_f16(emu, "tiled", 1, 128, 128, 1, d);
        attention_f16(emu, "short1", 4, 16, 16, 1, d);
        attention_f16(emu, "short2", 4, 32, 32, 1, d);
    }
    attention_f16(emu, "tiled2", 1, 128, 128, 1, 40);
    let mut report = emu.bank_report();
    // the two-tile kernel loads each K and V fragment once for 32 query rows: half the
    // wavefronts of the one-tile kernel's K and V ldmatrix at the same shape (Q's, att_begin's
    // x4 of 16 rows, the same)
    let wavefronts = |kernel: &str| {
        emu.bank_stats(true);
        attention_f16(emu, kernel, 1, 256, 256, 1, 40);
        let r = emu.bank_report();
        let w = |op: &str| -> u64 { r.iter().filter(|s| s.op == op).map(|s| s.wavefronts).sum() };
        (
            w("ldmatrix.x4") + w("ldmatrix.x2") + w("ldmatrix.x4.trans"),
            w("cp.async.16"),
        )
    };
    let (one, two) = (wavefronts("tiled"), wavefronts("tiled2"));
    // Q: 256 rows, 3 x4 a 16-row tile (12 wavefronts): 192 in both
    let q = 256 / 16 * 12;
    assert_eq!(
        two.0 - q,
        (one.0 - q) / 2,
        "ldmatrix wavefronts: tiled {one:?}, tiled2 {two:?}"
    );
    assert_eq!(
        one.1, two.1,
        "cp.async wavefronts: tiled {one:?}, tiled2 {two:?}"
    );
    emu.bank_stats(true);
    // the convolution family's counts apart
    emu.bank_stats(true);
    let i = |v: usize| Arg::I32(v as i32);
    // a 3x3 convolution without padding of 18x18 images: 2 x 256 output rows, 64 -> 128 channels
    let (n, h, c, o) = (2usize, 18usize, 64usize, 128usize);
    let (oh, k) = (h - 2, 9 * c);
    let m = n * oh * oh;
    let x = buf::<u16>(&<u16 as Host>::round(&random(n * h * h * c, 1)));
    let w = buf::<u16>(&<u16 as Host>::round(&random(o * k, 2)));
    // GroupNorm coefficients [n, c, 2] and LayerNorm row statistics [m', 2], gamma, beta
    let ab = DeviceBuffer::from_slice(&vec![0.5f32; n * c * 2]);
    let rs = DeviceBuffer::from_slice(&vec![0.5f32; m * 2]);
    let gb = buf::<u16>(&vec![1.0; k]);
    for bn in [64usize, 128] {
        let out = out_buf::<u16>(m * o);
        let geometry = [
            i(n),
            i(h),
            i(h),
            i(c),
            i(oh),
            i(oh),
            i(o),
            i(3),
            i(3),
            i(1),
            i(1),
            i(0),
            i(0),
        ];
        let grid = ((m / 128) as u32, (o / bn) as u32, 1);
        let smem = 3 * (128 + bn) * 40 * 2;
        let head = [Arg::Buf(&x), Arg::Buf(&w), Arg::Buf(&out)];
        let plain: Vec<Arg<'_>> = head
            .iter()
            .cloned()
            .chain([Arg::Null, Arg::Null, Arg::Null])
            .chain(geometry.iter().cloned())
            .collect();
        let run = |kernel: &str, args: &[Arg<'_>]| {
            launch(
                emu,
                &format!("{kernel}_f16_n{bn}"),
                grid,
                (128, 1, 1),
                smem,
                args,
            )
        };
        run("conv_igemm", &plain);
        let gn: Vec<Arg<'_>> = head
            .iter()
            .cloned()
            .chain([Arg::Null, Arg::Null, Arg::Null, Arg::Buf(&ab), i(1)])
            .chain(geometry.iter().cloned())
            .collect();
        run("conv_igemm_gn", &gn);
        // a LayerNorm's projection: m rows of k = 576 values as a 1x1 convolution
        let ln: Vec<Arg<'_>> = head
            .iter()
            .cloned()
            .chain([Arg::Null, Arg::Null, Arg::Null])
            .chain([Arg::Buf(&rs), Arg::Buf(&gb), Arg::Buf(&gb)])
            .chain([i(1), i(m), i(1), i(k), i(m), i(1), i(o)])
            .chain([i(1), i(1), i(1), i(1), i(0), i(0)])
            .collect();
        let xl = buf::<u16>(&<u16 as Host>::round(&random(m * k, 3)));
        let mut ln = ln;
        ln[0] = Arg::Buf(&xl);
        run("conv_igemm_ln", &ln);
        // GEGLU: m rows of k, 2 x 64 output columns
        let geglu = [
            Arg::Buf(&xl),
            Arg::Buf(&w),
            Arg::Buf(&out),
            Arg::Null,
            i(m),
            i(k),
            i(64),
        ];
        launch(
            emu,
            &format!("gemm_geglu_f16_n{bn}"),
            ((m / 128) as u32, (128 / bn) as u32, 1),
            (128, 1, 1),
            smem,
            &geglu,
        );
    }
    let conv = emu.bank_report();
    emu.bank_stats(false);
    let scattered: Vec<&BankSite> = conv
        .iter()
        .filter(|s| s.sectors != s.ideal_sectors)
        .collect();
    assert!(
        scattered.is_empty(),
        "convolution loads reading more sectors than their bytes need: {scattered:?}"
    );
    report.extend(conv);
    let table: Vec<String> = report
        .iter()
        .map(|s| {
            format!(
                "{:<24} {:<18} {:>8} requests {:>9} wavefronts (ideal {:>9}, {:.2}x){}{}",
                s.site,
                s.op,
                s.requests,
                s.wavefronts,
                s.ideal,
                s.conflict_ratio(),
                if s.sectors > 0 {
                    format!(
                        ", {} global sectors (ideal {}, {:.2}x)",
                        s.sectors,
                        s.ideal_sectors,
                        s.sectors as f64 / s.ideal_sectors.max(1) as f64
                    )
                } else {
                    String::new()
                },
                if s.uneven > 0 {
                    format!(", {} uneven", s.uneven)
                } else {
                    String::new()
                }
            )
        })
        .collect();
    eprintln!("{}", table.join("\n"));
    assert!(
        report
            .iter()
            .any(|s| s.op.starts_with("ldmatrix") && s.requests > 0)
            && report
                .iter()
                .any(|s| s.op == "cp.async.16" && s.requests > 0),
        "nothing counted"
    );
    let conflicted: Vec<&String> = report
        .iter()
        .zip(&table)
        .filter(|(s, _)| s.wavefronts != s.ideal)
        .map(|(_, t)| t)
        .collect();
    assert!(
        conflicted.is_empty(),
        "bank conflicts:\n{}",
        conflicted
            .iter()
            .map(|t| t.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// `gemm_geglu_f16_n{64,128}` (the feed-forward's first projection with GEGLU in its epilogue,
/// a tactic the engine times against cuBLASLt + `geglu_f16`) against the CPU's GEGLU of the
/// product of the same float16-rounded values: partial row and channel blocks, with and
/// without the projection's bias.
#[test]
fn gemm_with_geglu_epilogue_matches_the_cpu() {
    let Some(emu) = emu() else { return };
    // (rows, k, d, bias): d a multiple of 8; 2d below, at and above a block's 64 / 128 columns
    for (m, k, d, with_bias) in [
        (5, 32, 8, true),
        (130, 64, 40, true),
        (200, 96, 72, false),
        (129, 320, 136, true),
    ] {
        let seed = (m * 7 + k + d) as u64;
        let round = |v: Vec<f32>| <u16 as Host>::round(&v);
        let x = round(random(m * k, seed));
        let sc = 1.0 / (k as f32).sqrt();
        // [value; gate] rows, [2d, k]
        let wt = round(random(2 * d * k, seed + 1).iter().map(|v| v * sc).collect());
        let bias = round(random(2 * d, seed + 2));
        let mut proj = vec![0f32; m * 2 * d];
        for r in 0..m {
            for o in 0..2 * d {
                let mut acc = 0f64;
                for i in 0..k {
                    acc += x[r * k + i] as f64 * wt[o * k + i] as f64;
                }
                if with_bias {
                    acc += bias[o] as f64;
                }
                proj[r * 2 * d + o] = acc as f32;
            }
        }
        let want = fused::geglu(&proj, 2 * d).unwrap();
        let (bx, bw, bb) = (buf::<u16>(&x), buf::<u16>(&wt), buf::<u16>(&bias));
        for bn in [64usize, 128] {
            let out = out_buf::<u16>(m * d);
            let i = |v: usize| Arg::I32(v as i32);
            launch(
                emu,
                &format!("gemm_geglu_f16_n{bn}"),
                (m.div_ceil(128) as u32, (2 * d).div_ceil(bn) as u32, 1),
                (128, 1, 1),
                3 * (128 + bn) * 40 * 2,
                &[
                    Arg::Buf(&bx),
                    Arg::Buf(&bw),
                    Arg::Buf(&out),
                    if with_bias { Arg::Buf(&bb) } else { Arg::Null },
                    i(m),
                    i(k),
                    i(d),
                ],
            );
            check::<u16>(
                &format!("gemm_geglu_f16_n{bn} {m}x{k} -> 2x{d}, bias {with_bias}"),
                &read::<u16>(&out),
                &want,
            );
        }
    }
}

// ---- engine element kernels (verified on H100/H200 through the engine) ----------------------------

/// `#[repr(C)] struct Strided` of engine_ops.cu (and motionrt_runtime::engine::program::Strided).
fn strided(dims: &[i64], a: &[i64], b: &[i64], c: &[i64]) -> Vec<u8> {
    let mut v = Vec::with_capacity(200);
    v.extend((dims.len() as i32).to_ne_bytes());
    v.extend(0i32.to_ne_bytes()); // pad_
    for arr in [dims, a, b, c] {
        for k in 0..6 {
            v.extend(arr.get(k).copied().unwrap_or(0).to_ne_bytes());
        }
    }
    v
}

fn copy_and_binary<T: Host>(emu: &Emu) {
    // transpose [2, 3, 4] -> [4, 2, 3] (out[k][i][j] = in[i][j][k]) into an offset window
    let x = random(24, 11);
    let xb = buf::<T>(&x);
    let off = 5;
    let out = out_buf::<T>(24 + off);
    let s = strided(&[4, 2, 3], &[1, 12, 4], &[0, 0, 0], &[6, 3, 1]);
    let (g, b) = elementwise(24);
    launch(
        emu,
        &format!("copy_strided_{}", T::SUFFIX),
        g,
        b,
        0,
        &[
            Arg::Buf(&out),
            Arg::Buf(&xb),
            Arg::I64(24),
            Arg::Pod(&s),
            Arg::I64(0),
            Arg::I64(off as i64),
        ],
    );
    let got = read::<T>(&out);
    assert!(
        got[..off].iter().all(|v| v.is_nan()),
        "wrote before out_off"
    );
    let xr = T::round(&x);
    let want: Vec<f32> = (0..24)
        .map(|o| {
            let (k, i, j) = (o / 6, o / 3 % 2, o % 3);
            xr[i * 12 + j * 4 + k]
        })
        .collect();
    assert_eq!(&got[off..], &want[..], "copy_strided_{}", T::SUFFIX);

    // x [2, 3, 4] op y [3, 1], broadcast
    let y: Vec<f32> = random(3, 12).iter().map(|v| 0.5 + v.abs()).collect();
    let (xr, yr) = (T::round(&x), T::round(&y));
    let yb = buf::<T>(&y);
    let s = strided(&[2, 3, 4], &[12, 4, 1], &[0, 1, 0], &[0, 0, 0]);
    for op in 0..4 {
        let out = out_buf::<T>(24);
        launch(
            emu,
            &format!("binary_{}", T::SUFFIX),
            g,
            b,
            0,
            &[
                Arg::Buf(&out),
                Arg::Buf(&xb),
                Arg::Buf(&yb),
                Arg::I64(24),
                Arg::I32(op),
                Arg::Pod(&s),
            ],
        );
        let want: Vec<f32> = (0..24)
            .map(|i| {
                let (a, c) = (xr[i], yr[i / 4 % 3]);
                match op {
                    0 => a + c,
                    1 => a - c,
                    2 => a * c,
                    _ => a / c,
                }
            })
            .collect();
        check::<T>(&format!("binary op {op}"), &read::<T>(&out), &want);
    }
    // the same shapes, no broadcasting: 16 bytes per thread (24 values), one value (21)
    let z = random(24, 13);
    let (zr, zb) = (T::round(&z), buf::<T>(&z));
    for n in [24usize, 21] {
        for op in 0..4 {
            let out = out_buf::<T>(24);
            launch(
                emu,
                &format!("binary_same_{}", T::SUFFIX),
                g,
                b,
                0,
                &[
                    Arg::Buf(&out),
                    Arg::Buf(&xb),
                    Arg::Buf(&zb),
                    Arg::I64(n as i64),
                    Arg::I32(op),
                ],
            );
            let want: Vec<f32> = (0..n)
                .map(|i| match op {
                    0 => xr[i] + zr[i],
                    1 => xr[i] - zr[i],
                    2 => xr[i] * zr[i],
                    _ => xr[i] / zr[i],
                })
                .collect();
            let got = read::<T>(&out);
            check::<T>(&format!("binary_same n {n} op {op}"), &got[..n], &want);
            assert!(got[n..].iter().all(|v| v.is_nan()), "wrote past n {n}");
        }
    }
}

/// `copy_strided_b16`: a concatenation's rows in 16-byte units (what the engine launches when the
/// innermost axis is contiguous on both sides), against the element-wise definition.
fn copy_units<T: Host>(emu: &Emu) {
    let v = 16 / std::mem::size_of::<T>() as i64; // elements per unit
    let (rows, cols, wide, at) = (5i64, 2 * v, 4 * v, v); // [5, cols] into [5, wide] at column `at`
    let x = random((rows * cols) as usize, 41);
    let xb = buf::<T>(&x);
    let out = out_buf::<T>((rows * wide) as usize);
    // in units: dims [rows, cols / v], strides divided by v
    let s = strided(&[rows, cols / v], &[cols / v, 1], &[0, 0], &[wide / v, 1]);
    let n = rows * cols / v;
    let (g, b) = elementwise(n as usize);
    launch(
        emu,
        "copy_strided_b16",
        g,
        b,
        0,
        &[
            Arg::Buf(&out),
            Arg::Buf(&xb),
            Arg::I64(n),
            Arg::Pod(&s),
            Arg::I64(0),
            Arg::I64(at / v),
        ],
    );
    let xr = T::round(&x);
    let got = read::<T>(&out);
    for r in 0..rows as usize {
        for c in 0..wide as usize {
            let g = got[r * wide as usize + c];
            if c >= at as usize && c < (at + cols) as usize {
                assert_eq!(g, xr[r * cols as usize + c - at as usize], "({r}, {c})");
            } else {
                assert!(g.is_nan(), "wrote outside the slice at ({r}, {c})");
            }
        }
    }
}

/// `copy_transpose` on the engine's launch shape against the strided copy's definition
/// (out[out_off + c-offset] = in[in_off + a-offset]).
fn copy_transpose<T: Host>(emu: &Emu, dims: &[i64], a: &[i64], c: &[i64], ai: usize, ao: usize) {
    let (in_off, out_off) = (3usize, 7usize);
    let n: i64 = dims.iter().product();
    let span = |st: &[i64]| dims.iter().zip(st).map(|(d, s)| (d - 1) * s).sum::<i64>() as usize + 1;
    let x = random(in_off + span(a), 21);
    let xb = buf::<T>(&x);
    let out = out_buf::<T>(out_off + span(c));
    let s = strided(dims, a, &vec![0; dims.len()], c);
    let batch = n / (dims[ai] * dims[ao]);
    launch(
        emu,
        &format!("copy_transpose_{}", T::SUFFIX),
        (
            dims[ai].div_euclid(32) as u32 + (dims[ai] % 32 != 0) as u32,
            dims[ao].div_euclid(32) as u32 + (dims[ao] % 32 != 0) as u32,
            batch as u32,
        ),
        (32, 8, 1),
        0,
        &[
            Arg::Buf(&out),
            Arg::Buf(&xb),
            Arg::Pod(&s),
            Arg::I32(ai as i32),
            Arg::I32(ao as i32),
            Arg::I64(in_off as i64),
            Arg::I64(out_off as i64),
        ],
    );
    let xr = T::round(&x);
    let mut want = vec![f32::NAN; out_off + span(c)];
    for i in 0..n {
        let (mut r, mut ia, mut oc) = (i, 0, 0);
        for k in (0..dims.len()).rev() {
            let ik = r % dims[k];
            r /= dims[k];
            ia += ik * a[k];
            oc += ik * c[k];
        }
        want[out_off + oc as usize] = xr[in_off + ia as usize];
    }
    let got = read::<T>(&out);
    let same = got
        .iter()
        .zip(&want)
        .all(|(g, w)| g == w || (g.is_nan() && w.is_nan()));
    assert!(same, "copy_transpose_{} over {dims:?}", T::SUFFIX);
}

#[test]
fn copy_transpose_matches_the_strided_copy() {
    let Some(emu) = emu() else { return };
    for run in [copy_transpose::<f32>, copy_transpose::<u16>] {
        // NCHW [2, 40, 50] -> tokens [2, 50, 40]: partial tiles on both axes
        run(emu, &[2, 40, 50], &[2000, 50, 1], &[2000, 1, 40], 2, 1);
        // motion-module layout: (b, f, c, hw) -> (b, hw, f, c)
        run(
            emu,
            &[2, 3, 24, 36],
            &[3 * 24 * 36, 24 * 36, 36, 1],
            &[36 * 3 * 24, 24, 1, 3 * 24],
            3,
            2,
        );
        // tokens back to NCHW into a wider buffer (a concatenation's slice)
        run(emu, &[33, 17], &[1, 33], &[17 * 2, 1], 0, 1);
    }
}

#[test]
fn copy_strided_and_binary_match() {
    let Some(emu) = emu() else { return };
    copy_and_binary::<f32>(emu);
    copy_and_binary::<u16>(emu);
    copy_units::<f32>(emu);
    copy_units::<u16>(emu);
}

fn unary_and_fill<T: Host>(emu: &Emu) {
    let n = 300;
    let x = random(n, 21);
    let (xr, xb) = (T::round(&x), buf::<T>(&x));
    let (g, b) = elementwise(n);
    for op in 0..5 {
        let out = out_buf::<T>(n);
        launch(
            emu,
            &format!("unary_{}", T::SUFFIX),
            g,
            b,
            0,
            &[
                Arg::Buf(&out),
                Arg::Buf(&xb),
                Arg::I64(n as i64),
                Arg::I32(op),
            ],
        );
        let want: Vec<f32> = xr
            .iter()
            .map(|&v| {
                let v = v as f64;
                let sig = 1.0 / (1.0 + (-v).exp());
                (match op {
                    0 => sig,
                    1 => v.sin(),
                    2 => v.cos(),
                    3 => v * sig,
                    _ => -v,
                }) as f32
            })
            .collect();
        check::<T>(&format!("unary op {op}"), &read::<T>(&out), &want);
    }
    let out = out_buf::<T>(n);
    launch(
        emu,
        &format!("fill_{}", T::SUFFIX),
        g,
        b,
        0,
        &[Arg::Buf(&out), Arg::I64(n as i64), Arg::F32(1.5)],
    );
    assert!(read::<T>(&out).iter().all(|&v| v == 1.5));
}

#[test]
fn unary_and_fill_match() {
    let Some(emu) = emu() else { return };
    unary_and_fill::<f32>(emu);
    unary_and_fill::<u16>(emu);
}

fn group_norm<T: Host>(emu: &Emu, n: usize, c: usize, groups: usize, spatial: usize, silu: bool) {
    let seed = (n * 1000 + c * 10 + spatial) as u64;
    let x: Vec<f32> = random(n * c * spatial, seed)
        .iter()
        .map(|v| 2.0 * v + 0.5)
        .collect();
    let gamma = random(c, seed + 1);
    let beta = random(c, seed + 2);
    let (xr, gr, br) = (T::round(&x), T::round(&gamma), T::round(&beta));
    let eps = 1e-6f32;
    let want = fused::group_norm(&xr, &[n, c, spatial], &gr, &br, groups, eps, silu).unwrap();
    let (xb, gb, bb) = (buf::<T>(&x), buf::<T>(&gamma), buf::<T>(&beta));
    let y = out_buf::<T>(x.len());
    launch(
        emu,
        &format!("group_norm_{}", T::SUFFIX),
        ((n * groups) as u32, 1, 1),
        (512, 1, 1),
        0,
        &[
            Arg::Buf(&y),
            Arg::Buf(&xb),
            Arg::Buf(&gb),
            Arg::Buf(&bb),
            Arg::I32(c as i32),
            Arg::I64(spatial as i64),
            Arg::I32(groups as i32),
            Arg::F32(eps),
            Arg::I32(silu as i32),
        ],
    );
    check::<T>(
        &format!("group_norm [{n}, {c}, {spatial}] {groups} groups silu {silu}"),
        &read::<T>(&y),
        &want,
    );
    // split over blocks: statistics per chunk, merged by every block of the group
    for chunk in [64usize, 100, 1000] {
        let count = c / groups * spatial;
        let splits = count.div_ceil(chunk);
        let stats = out_buf::<f32>(n * groups * splits * 2);
        launch(
            emu,
            &format!("group_norm_stats_{}", T::SUFFIX),
            ((n * groups) as u32, splits as u32, 1),
            (256, 1, 1),
            0,
            &[
                Arg::Buf(&stats),
                Arg::Buf(&xb),
                Arg::I32(c as i32),
                Arg::I64(spatial as i64),
                Arg::I32(groups as i32),
                Arg::I64(chunk as i64),
            ],
        );
        let y = out_buf::<T>(x.len());
        launch(
            emu,
            &format!("group_norm_apply_{}", T::SUFFIX),
            ((n * groups) as u32, splits as u32, 1),
            (256, 1, 1),
            0,
            &[
                Arg::Buf(&y),
                Arg::Buf(&xb),
                Arg::Buf(&stats),
                Arg::Buf(&gb),
                Arg::Buf(&bb),
                Arg::I32(c as i32),
                Arg::I64(spatial as i64),
                Arg::I32(groups as i32),
                Arg::I64(chunk as i64),
                Arg::F32(eps),
                Arg::I32(silu as i32),
            ],
        );
        check::<T>(
            &format!(
                "group_norm split by {chunk} [{n}, {c}, {spatial}] {groups} groups silu {silu}"
            ),
            &read::<T>(&y),
            &want,
        );
    }
}

/// The channels-last GroupNorm (stats per chunk of positions, finalize, apply) on the engine's
/// launch shapes (the statistics in blocks of `block` threads), against the fused reference on
/// the NCHW view of the same values; with `biases`, a bias `[C]` and a per-sample bias `[N, C]`
/// added to the input on the fly (the convolution's before it, folded).
#[allow(clippy::too_many_arguments)]
fn group_norm_nhwc<T: Host>(
    emu: &Emu,
    block: usize,
    n: usize,
    c: usize,
    groups: usize,
    spatial: usize,
    chunk: usize,
    silu: bool,
    biases: bool,
) {
    let seed = (n * 7000 + c * 10 + spatial) as u64;
    let x: Vec<f32> = random(n * c * spatial, seed)
        .iter()
        .map(|v| 2.0 * v + 0.5)
        .collect();
    let gamma = random(c, seed + 1);
    let beta = random(c, seed + 2);
    let xbias: Vec<f32> = random(c, seed + 3).iter().map(|v| v + 1.0).collect();
    let xsbias = random(n * c, seed + 4);
    let (xr, gr, br) = (T::round(&x), T::round(&gamma), T::round(&beta));
    let (xbr, xsr) = (T::round(&xbias), T::round(&xsbias));
    // the input the normalisation sees, NCHW
    let xin: Vec<f32> = if biases {
        xr.iter()
            .enumerate()
            .map(|(i, &v)| {
                let (b, ch) = (i / (c * spatial), i / spatial % c);
                v + xbr[ch] + xsr[b * c + ch]
            })
            .collect()
    } else {
        xr.clone()
    };
    let eps = 1e-6f32;
    let want = fused::group_norm(&xin, &[n, c, spatial], &gr, &br, groups, eps, silu).unwrap();
    // [N, C, S] -> [N, S, C]
    let to_nhwc = |v: &[f32]| -> Vec<f32> {
        let mut o = vec![0f32; v.len()];
        for b in 0..n {
            for ch in 0..c {
                for p in 0..spatial {
                    o[(b * spatial + p) * c + ch] = v[(b * c + ch) * spatial + p];
                }
            }
        }
        o
    };
    let (xb, gb, bb) = (buf::<T>(&to_nhwc(&x)), buf::<T>(&gamma), buf::<T>(&beta));
    let (ib, isb) = (buf::<T>(&xbias), buf::<T>(&xsbias));
    let bias_args = if biases {
        [Arg::Buf(&ib), Arg::Buf(&isb)]
    } else {
        [Arg::Null, Arg::Null]
    };
    let splits = spatial.div_ceil(chunk);
    let stats = out_buf::<f32>(n * splits * groups * 2);
    let mr = out_buf::<f32>(n * groups * 2);
    let y = out_buf::<T>(x.len());
    let (ci, si, gi) = (c as i32, spatial as i64, groups as i32);
    launch(
        emu,
        &format!("group_norm_nhwc_stats_{}", T::SUFFIX),
        (n as u32, splits as u32, 1),
        (block as u32, 1, 1),
        // (R + 1)·C floats with 16-byte rows (R = block / (C / V) row lanes, at least 1), else C
        if c % (16 / std::mem::size_of::<T>()) == 0 {
            (1 + (block / (c / (16 / std::mem::size_of::<T>()))).max(1)) * c * 4
        } else {
            c * 4
        },
        &[
            Arg::Buf(&stats),
            Arg::Buf(&xb),
            bias_args[0],
            bias_args[1],
            Arg::I32(ci),
            Arg::I64(si),
            Arg::I32(gi),
            Arg::I64(chunk as i64),
        ],
    );
    launch(
        emu,
        "group_norm_nhwc_finalize",
        ((n * groups).div_ceil(32) as u32, 1, 1),
        (32, 1, 1),
        0,
        &[
            Arg::Buf(&mr),
            Arg::Buf(&stats),
            Arg::I32(n as i32),
            Arg::I32(ci),
            Arg::I64(si),
            Arg::I32(gi),
            Arg::I64(chunk as i64),
            Arg::I32(splits as i32),
            Arg::F32(eps),
        ],
    );
    // rows of whole 16-byte vectors: a thread per vector of channels, R row lanes a block, grid
    // (position blocks, N), as runtime::engine::launch::nhwc_apply_geometry launches it; here
    // with max(block, C / V) threads in whole warps (R = that / (C / V), the rest idle), about
    // two positions a thread and at most 2 grid rows (a third sample taken 2 rows on, as past
    // 65535 samples). Else elementwise.
    let v = 16 / std::mem::size_of::<T>();
    let (g, b) = if c % v == 0 {
        let threads = block.max(c / v).div_ceil(32) * 32;
        let lanes = threads / (c / v);
        let blocks = spatial.div_ceil(2 * lanes);
        ((blocks as u32, n.min(2) as u32, 1), (threads as u32, 1, 1))
    } else {
        elementwise(x.len())
    };
    launch(
        emu,
        &format!("group_norm_nhwc_apply_{}", T::SUFFIX),
        g,
        b,
        0,
        &[
            Arg::Buf(&y),
            Arg::Buf(&xb),
            bias_args[0],
            bias_args[1],
            Arg::Buf(&mr),
            Arg::Buf(&gb),
            Arg::Buf(&bb),
            Arg::I32(ci),
            Arg::I64(si),
            Arg::I32(gi),
            Arg::I64(x.len() as i64),
            Arg::I32(silu as i32),
        ],
    );
    check::<T>(
        &format!(
            "group_norm_nhwc [{n}, {c}, {spatial}] {groups} groups, chunk {chunk}, silu {silu}, input biases {biases}"
        ),
        &read::<T>(&y),
        &to_nhwc(&want),
    );
}

#[test]
fn channels_last_group_norm_matches_the_fused_reference() {
    let Some(emu) = emu() else { return };
    for silu in [false, true] {
        // one chunk; several (the last partial); more channels than threads (3 per thread)
        group_norm_nhwc::<f32>(emu, 64, 2, 6, 3, 37, 64, silu, false);
        group_norm_nhwc::<u16>(emu, 64, 2, 6, 3, 37, 10, silu, false);
        group_norm_nhwc::<f32>(emu, 64, 1, 160, 32, 50, 7, silu, false);
        group_norm_nhwc::<u16>(emu, 64, 3, 64, 32, 20, 3, silu, false);
    }
    // with the convolution's bias and time embedding added on the fly (vectorised path: C a
    // multiple of 8; and not)
    group_norm_nhwc::<u16>(emu, 64, 2, 64, 32, 20, 3, true, true);
    group_norm_nhwc::<f32>(emu, 64, 2, 6, 3, 37, 10, false, true);
    group_norm_nhwc::<u16>(emu, 64, 3, 6, 3, 13, 64, true, true);
    // more 16-byte columns than threads (64): statistics threads take two or three, one row
    // lane; the apply kernel's blocks are widened to a thread a vector
    group_norm_nhwc::<u16>(emu, 64, 2, 640, 32, 9, 4, true, true);
    group_norm_nhwc::<f32>(emu, 64, 1, 640, 32, 5, 2, false, false);
    // the engine's own blocks: SD1.5's 320 channels in 256 threads (6 row lanes of 40 vectors,
    // 16 idle threads), and its widest, 2560 channels in 320 threads (one row lane)
    group_norm_nhwc::<u16>(emu, 256, 1, 320, 32, 40, 30, true, true);
    group_norm_nhwc::<u16>(emu, 320, 1, 2560, 32, 6, 4, false, true);
}

#[test]
fn group_norm_matches_the_fused_reference() {
    let Some(emu) = emu() else { return };
    for silu in [false, true] {
        group_norm::<f32>(emu, 2, 6, 3, 37, silu);
        group_norm::<u16>(emu, 2, 6, 3, 37, silu);
        group_norm::<f32>(emu, 1, 64, 32, 300, silu);
        group_norm::<u16>(emu, 1, 64, 32, 300, silu);
    }
}

fn layer_norm_and_softmax<T: Host>(emu: &Emu, rows: usize, cols: usize) {
    let seed = (rows * 1000 + cols) as u64;
    let x: Vec<f32> = random(rows * cols, seed)
        .iter()
        .map(|v| 3.0 * v - 1.0)
        .collect();
    let gamma = random(cols, seed + 1);
    let beta = random(cols, seed + 2);
    let (xr, gr, br) = (T::round(&x), T::round(&gamma), T::round(&beta));
    let (xb, gb, bb) = (buf::<T>(&x), buf::<T>(&gamma), buf::<T>(&beta));
    let eps = 1e-5f32;
    // a [period, cols] table, row (r / div) % period added to row r (the motion modules'
    // positional encoding; div > 1 for frame-major rows)
    let (period, div) = (3, 2);
    let table = random(period * cols, seed + 3);
    let (tr, tb) = (T::round(&table), buf::<T>(&table));
    for (with_beta, with_add) in [(true, false), (false, false), (true, true)] {
        let mut want = Vec::with_capacity(x.len());
        for (ri, r) in xr.chunks(cols).enumerate() {
            let mean = r.iter().map(|&v| v as f64).sum::<f64>() / cols as f64;
            let var = r.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / cols as f64;
            let inv = 1.0 / (var + eps as f64).sqrt();
            for (i, &v) in r.iter().enumerate() {
                let b = if with_beta { br[i] as f64 } else { 0.0 };
                let t = if with_add {
                    tr[((ri / div) % period) * cols + i] as f64
                } else {
                    0.0
                };
                want.push(((v as f64 - mean) * inv * gr[i] as f64 + b + t) as f32);
            }
        }
        let add = if with_add { Arg::Buf(&tb) } else { Arg::Null };
        let y = out_buf::<T>(x.len());
        launch(
            emu,
            &format!("layer_norm_{}", T::SUFFIX),
            (rows as u32, 1, 1),
            (256, 1, 1),
            0,
            &[
                Arg::Buf(&y),
                Arg::Buf(&xb),
                Arg::Buf(&gb),
                if with_beta { Arg::Buf(&bb) } else { Arg::Null },
                add,
                Arg::I32(period as i32),
                Arg::I32(div as i32),
                Arg::I32(cols as i32),
                Arg::F32(eps),
            ],
        );
        check::<T>(
            &format!("layer_norm [{rows}, {cols}] beta {with_beta} add {with_add}"),
            &read::<T>(&y),
            &want,
        );
        // one warp per row (rows up to 1280 wide), 8 rows per block as the engine launches it
        // the warp kernel also with x one element off 16-byte alignment (its value-a-lane path)
        let shifted: Vec<f32> = std::iter::once(0.0).chain(x.iter().copied()).collect();
        let xs = buf::<T>(&shifted);
        let x_off = Arg::Addr(xs.as_ptr() as u64 + std::mem::size_of::<T>() as u64);
        for (xarg, what) in [(Arg::Buf(&xb), ""), (x_off, ", x misaligned")] {
            if cols > 1280 {
                break;
            }
            let y = out_buf::<T>(x.len());
            launch(
                emu,
                &format!("layer_norm_warp_{}", T::SUFFIX),
                (rows.div_ceil(8) as u32, 1, 1),
                (256, 1, 1),
                0,
                &[
                    Arg::Buf(&y),
                    xarg,
                    Arg::Buf(&gb),
                    if with_beta { Arg::Buf(&bb) } else { Arg::Null },
                    add,
                    Arg::I32(period as i32),
                    Arg::I32(div as i32),
                    Arg::I64(rows as i64),
                    Arg::I32(cols as i32),
                    Arg::F32(eps),
                ],
            );
            check::<T>(
                &format!("layer_norm_warp [{rows}, {cols}] beta {with_beta} add {with_add}{what}"),
                &read::<T>(&y),
                &want,
            );
        }
    }
    let mut want = Vec::with_capacity(x.len());
    for r in xr.chunks(cols) {
        let m = r.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
        let s: f64 = r.iter().map(|&v| (v as f64 - m).exp()).sum();
        want.extend(r.iter().map(|&v| ((v as f64 - m).exp() / s) as f32));
    }
    let y = out_buf::<T>(x.len());
    launch(
        emu,
        &format!("softmax_{}", T::SUFFIX),
        (rows as u32, 1, 1),
        (256, 1, 1),
        0,
        &[Arg::Buf(&y), Arg::Buf(&xb), Arg::I32(cols as i32)],
    );
    check::<T>(&format!("softmax [{rows}, {cols}]"), &read::<T>(&y), &want);
}

#[test]
fn layer_norm_and_softmax_match() {
    let Some(emu) = emu() else { return };
    // the warp kernel's 16-byte path takes every multiple of 8 up to 1280: one vector slot a
    // lane (40), two (320), three with the last partial (648), up to its budget (1280: 5 slots
    // of 8 halves, 10 of 4 floats); 77 takes its value-a-lane path, 1300 the block kernel
    for (rows, cols) in [
        (5, 77),
        (4, 40),
        (3, 320),
        (3, 648),
        (6, 1024),
        (9, 1280),
        (2, 1300),
    ] {
        layer_norm_and_softmax::<f32>(emu, rows, cols);
        layer_norm_and_softmax::<u16>(emu, rows, cols);
    }
}

fn geglu_and_epilogues<T: Host>(emu: &Emu) {
    // GEGLU over [7, 2 * d], without and with the projection's bias; 16 bytes per thread (d 40)
    // and one value per thread (d 13)
    for (with_bias, d) in [(false, 40), (true, 40), (false, 13), (true, 13)] {
        let rows = 7;
        let x = random(rows * 2 * d, 31);
        let pb = random(2 * d, 35);
        let (xr, pbr) = (T::round(&x), T::round(&pb));
        let (xb, pbb) = (buf::<T>(&x), buf::<T>(&pb));
        {
            let biased: Vec<f32> = xr
                .iter()
                .enumerate()
                .map(|(i, &v)| if with_bias { v + pbr[i % (2 * d)] } else { v })
                .collect();
            let want = fused::geglu(&biased, 2 * d).unwrap();
            let y = out_buf::<T>(rows * d);
            let (g, b) = elementwise(rows * d);
            launch(
                emu,
                &format!("geglu_{}", T::SUFFIX),
                g,
                b,
                0,
                &[
                    Arg::Buf(&y),
                    Arg::Buf(&xb),
                    if with_bias { Arg::Buf(&pbb) } else { Arg::Null },
                    Arg::I64(rows as i64),
                    Arg::I64(d as i64),
                ],
            );
            check::<T>(
                &format!("geglu d {d} bias {with_bias}"),
                &read::<T>(&y),
                &want,
            );
        }
    }

    // y[n, c, s] += bias[c] + res[n, c, s] after a convolution, in place
    let (n, c, sp) = (2, 5, 9);
    let total = n * c * sp;
    let y0 = random(total, 32);
    let bias = random(c, 33);
    let res = random(total, 34);
    let (y0r, biasr, resr) = (T::round(&y0), T::round(&bias), T::round(&res));
    let (biasb, resb) = (buf::<T>(&bias), buf::<T>(&res));
    let (g, b) = elementwise(total);
    for (with_bias, with_res) in [(true, true), (true, false), (false, true)] {
        let y = buf::<T>(&y0);
        launch(
            emu,
            &format!("channel_bias_{}", T::SUFFIX),
            g,
            b,
            0,
            &[
                Arg::Buf(&y),
                if with_bias {
                    Arg::Buf(&biasb)
                } else {
                    Arg::Null
                },
                if with_res { Arg::Buf(&resb) } else { Arg::Null },
                Arg::I64(total as i64),
                Arg::I64(c as i64),
                Arg::I64(sp as i64),
            ],
        );
        let want: Vec<f32> = (0..total)
            .map(|i| {
                let mut v = y0r[i];
                if with_bias {
                    v += biasr[i / sp % c];
                }
                if with_res {
                    v += resr[i];
                }
                v
            })
            .collect();
        check::<T>(
            &format!("channel_bias bias {with_bias} res {with_res}"),
            &read::<T>(&y),
            &want,
        );
    }

    // y[r, c] += bias[c] + sbias[r / rps, c] + res[r, c] after a GEMM or a channels-last
    // convolution (rps rows per sample), in place: a value a thread (10 columns) and 16 bytes
    // a thread (16)
    for (rows, cols, rps) in [(6, 10, 2), (6, 16, 3)] {
        bias_residual_case::<T>(emu, rows, cols, rps);
    }
}

fn bias_residual_case<T: Host>(emu: &Emu, rows: usize, cols: usize, rps: usize) {
    let y0 = random(rows * cols, 35);
    let bias = random(cols, 36);
    let res = random(rows * cols, 37);
    let sb = random(rows / rps * cols, 38);
    let (y0r, biasr, resr, sbr) = (
        T::round(&y0),
        T::round(&bias),
        T::round(&res),
        T::round(&sb),
    );
    let (biasb, resb, sbb) = (buf::<T>(&bias), buf::<T>(&res), buf::<T>(&sb));
    let (g, b) = elementwise(rows * cols);
    for (with_bias, with_res, with_sb) in [
        (true, true, false),
        (true, false, false),
        (false, true, false),
        (true, true, true),
        (false, false, true),
    ] {
        let y = buf::<T>(&y0);
        launch(
            emu,
            &format!("bias_residual_{}", T::SUFFIX),
            g,
            b,
            0,
            &[
                Arg::Buf(&y),
                if with_bias {
                    Arg::Buf(&biasb)
                } else {
                    Arg::Null
                },
                if with_sb { Arg::Buf(&sbb) } else { Arg::Null },
                if with_res { Arg::Buf(&resb) } else { Arg::Null },
                Arg::I64(rows as i64),
                Arg::I64(cols as i64),
                Arg::I64(rps as i64),
            ],
        );
        let want: Vec<f32> = (0..rows * cols)
            .map(|i| {
                let mut v = y0r[i];
                if with_bias {
                    v += biasr[i % cols];
                }
                if with_sb {
                    v += sbr[i / cols / rps * cols + i % cols];
                }
                if with_res {
                    v += resr[i];
                }
                v
            })
            .collect();
        check::<T>(
            &format!("bias_residual bias {with_bias} res {with_res} sample bias {with_sb}"),
            &read::<T>(&y),
            &want,
        );
    }
}

#[test]
fn geglu_and_bias_epilogues_match() {
    let Some(emu) = emu() else { return };
    geglu_and_epilogues::<f32>(emu);
    geglu_and_epilogues::<u16>(emu);
}

fn gather_and_casts<T: Host>(emu: &Emu) {
    // rows of a [7, 12] table; ids out of range give NaN rows
    let (n_rows, row) = (7usize, 12usize);
    let table = random(n_rows * row, 41);
    let tr = T::round(&table);
    let ids: Vec<i64> = vec![3, 0, 6, 7, -1, 3];
    let (tb, ib) = (buf::<T>(&table), DeviceBuffer::from_slice(&ids));
    let out = out_buf::<T>(ids.len() * row);
    let (g, b) = elementwise(ids.len() * row);
    launch(
        emu,
        &format!("gather_rows_{}", T::SUFFIX),
        g,
        b,
        0,
        &[
            Arg::Buf(&out),
            Arg::Buf(&tb),
            Arg::Buf(&ib),
            Arg::I64(ids.len() as i64),
            Arg::I64(row as i64),
            Arg::I64(n_rows as i64),
        ],
    );
    let got = read::<T>(&out);
    for (r, &id) in ids.iter().enumerate() {
        let g = &got[r * row..(r + 1) * row];
        if (0..n_rows as i64).contains(&id) {
            assert_eq!(g, &tr[id as usize * row..][..row], "gather row {r}");
        } else {
            assert!(g.iter().all(|v| v.is_nan()), "id {id}: not NaN");
        }
    }

    // f32 -> T -> f32
    let n = 1000;
    let x: Vec<f32> = random(n, 42).iter().map(|v| v * 100.0).collect();
    let xb = DeviceBuffer::from_slice(&x);
    let mid = out_buf::<T>(n);
    let back = out_buf::<f32>(n);
    let (g, b) = elementwise(n);
    launch(
        emu,
        &format!("cast_from_f32_{}", T::SUFFIX),
        g,
        b,
        0,
        &[Arg::Buf(&mid), Arg::Buf(&xb), Arg::I64(n as i64)],
    );
    assert_eq!(
        mid.to_vec::<T>(),
        T::encode(&x),
        "cast_from_f32_{}",
        T::SUFFIX
    );
    launch(
        emu,
        &format!("cast_to_f32_{}", T::SUFFIX),
        g,
        b,
        0,
        &[Arg::Buf(&back), Arg::Buf(&mid), Arg::I64(n as i64)],
    );
    assert_eq!(
        back.to_vec::<f32>(),
        T::round(&x),
        "cast_to_f32_{}",
        T::SUFFIX
    );
}

#[test]
fn gather_rows_and_casts_match() {
    let Some(emu) = emu() else { return };
    gather_and_casts::<f32>(emu);
    gather_and_casts::<u16>(emu);
}
