//! The emulator's race detection (`Builder::racecheck`, `kernels/emu/emu.cpp` "race detection"):
//! small kernels with a race of each kind the detector names — and the same kernels with the
//! barrier that removes it, which must run clean. The project's kernels run under it in
//! `scripts/test` (`MOTIONRT_EMU_RACECHECK=1` over `kernels/tests/emu.rs`).
//!
//! Needs a C++ compiler (`CXX`, `g++` or `c++`); without one the tests print SKIP and pass, unless
//! `MOTIONRT_REQUIRE_EMU=1`.

use std::sync::OnceLock;

use motionrt_kernels::emu::{Arg, Builder, DeviceBuffer, Emu, EmuError};

/// Each kernel takes `mode`: 0 leaves the race in, 1 has the synchronisation that removes it.
const RACY: &str = r#"
// read after write: each thread rewrites its slot, then reads the previous thread's
extern "C" __global__ void rc_raw(float* out, int mode) {
    MRT_DYN_SMEM(float, s);
    const int t = threadIdx.x, n = blockDim.x;
    s[t] = (float)t;
    __syncthreads();
    s[t] = (float)(t + 100);
    if (mode) __syncthreads();
    out[t] = s[(t + n - 1) % n];
}

// write after read: each thread reads the next thread's slot, then overwrites its own
extern "C" __global__ void rc_war(float* out, int mode) {
    MRT_DYN_SMEM(float, s);
    const int t = threadIdx.x, n = blockDim.x;
    s[t] = (float)t;
    __syncthreads();
    out[t] = s[(t + 1) % n];
    if (mode) __syncthreads();
    s[t] = -1.f;
}

// within a warp: mode 0 no __syncwarp, 1 a __syncwarp, 2 a __syncwarp but the other warp's data
extern "C" __global__ void rc_warp(float* out, int mode) {
    MRT_DYN_SMEM(float, s);
    const int t = threadIdx.x;
    s[t] = (float)t;
    __syncthreads();
    s[t] = (float)(t + 100);
    if (mode) __syncwarp();
    out[t] = s[mode == 2 ? (t + 32) % 64 : t ^ 1];
}

// shared memory read before any thread of the block wrote it (dynamic, then static)
extern "C" __global__ void rc_uninit(float* out, int mode) {
    MRT_DYN_SMEM(float, s);
    __shared__ float st[64];
    const int t = threadIdx.x;
    if (mode) {
        s[t] = 1.f;
        st[t] = 2.f;
    }
    __syncthreads();
    out[t] = s[t] + (mode == 0 ? 0.f : st[t]);
    if (mode == 2) {  // static: the next thread's element read, then rewritten by it, no barrier
        out[t] += st[(t + 1) % 64];
        st[t] = 3.f;
    }
}

// a block reduction's scratch used twice: the second use must wait for the first's reads
extern "C" __global__ void rc_scratch(float* out, int mode) {
    __shared__ float sc[32];
    const int t = threadIdx.x, lane = t & 31, w = t >> 5, nw = blockDim.x >> 5;
    float v = (float)t;
    for (int k = 16; k; k >>= 1) v += __shfl_xor_sync(0xffffffffu, v, k);
    if (lane == 0) sc[w] = v;
    __syncthreads();
    float tot = lane < nw ? sc[lane] : 0.f;
    for (int k = 16; k; k >>= 1) tot += __shfl_xor_sync(0xffffffffu, tot, k);
    if (mode) __syncthreads();
    if (lane == 0) sc[w] = 2.f * v;
    __syncthreads();
    out[t] = tot + (lane < nw ? sc[lane] : 0.f);
}

// global memory: every block writes the same element (mode 0), or its own (mode 1)
extern "C" __global__ void rc_global(float* out, int mode) {
    if (threadIdx.x == 0) out[mode ? blockIdx.x : 0] = (float)blockIdx.x;
}

// ldmatrix reads the row whose address a lane gives; the rows were written by the lane before
extern "C" __global__ void rc_ldmatrix(unsigned* out, int mode) {
    MRT_DYN_SMEM(unsigned short, s);  // 32 rows of 8 halves
    const int l = threadIdx.x;
    for (int j = 0; j < 8; ++j) s[((l + 1) % 32) * 8 + j] = (unsigned short)(l * 8 + j);
    if (mode) __syncwarp();
    unsigned r[4];
    mrt_ldmatrix_x4(r, s + l * 8);
    for (int i = 0; i < 4; ++i) out[l * 4 + i] = r[i];
}

// a warp's inclusive scan in shared memory (Hillis-Steele), __syncwarp between the steps: clean
extern "C" __global__ void rc_scan(float* out, int mode) {
    MRT_DYN_SMEM(float, s);
    const int l = threadIdx.x;
    s[l] = (float)mode;
    __syncwarp();
    for (int k = 1; k < 32; k <<= 1) {
        const float v = l >= k ? s[l - k] : 0.f;
        __syncwarp();
        s[l] += v;
        __syncwarp();
    }
    out[l] = s[l];
}

// a cp.async may land any time before its thread waits: the neighbour reads it after a barrier,
// but (mode 0) before the wait
extern "C" __global__ void rc_cp_flight(const float* g, float* out, int mode) {
    MRT_DYN_SMEM(float, s);
    const int t = threadIdx.x, n = blockDim.x;
    for (int j = 0; j < 4; ++j) s[4 * t + j] = 0.f;
    __syncthreads();
    mrt_cp_async_16(s + 4 * t, g + 4 * t);
    mrt_cp_async_commit();
    if (mode) mrt_cp_async_wait_all();
    __syncthreads();
    out[t] = s[4 * ((t + 1) % n)];
    if (!mode) mrt_cp_async_wait_all();
}

// atomics on a shared counter: a plain read of it needs a barrier after the others' atomics
extern "C" __global__ void rc_atomic(float* out, int mode) {
    __shared__ int count;
    if (threadIdx.x == 0) count = 0;
    __syncthreads();
    atomicAdd(&count, 1);
    if (mode) __syncthreads();
    out[threadIdx.x] = (float)count;
}

// the element before the dynamic shared memory (mode 0), or the first one
extern "C" __global__ void rc_underflow(float* out, int mode) {
    MRT_DYN_SMEM(float, s);
    s[(int)threadIdx.x - (mode ? 0 : 1)] = 1.f;
    __syncthreads();
    out[threadIdx.x] = s[threadIdx.x];
}

// one element past the end of the buffer the launch was given (mode 0), or inside it
extern "C" __global__ void rc_bounds(float* out, int mode) {
    out[threadIdx.x + (mode ? 0 : 1)] = 1.f;
}

// cp.async: a thread reads another thread's copy after its own wait, before a barrier
extern "C" __global__ void rc_cp_async(const float* g, float* out, int mode) {
    MRT_DYN_SMEM(float, s);
    const int t = threadIdx.x, n = blockDim.x;
    mrt_cp_async_16(s + 4 * t, g + 4 * t);
    mrt_cp_async_wait_all();
    if (mode) __syncthreads();
    out[t] = s[4 * ((t + 1) % n)];
}
"#;

const ENTRIES: &[&str] = &[
    "rc_raw",
    "rc_war",
    "rc_warp",
    "rc_uninit",
    "rc_scratch",
    "rc_global",
    "rc_ldmatrix",
    "rc_cp_async",
    "rc_bounds",
    "rc_scan",
    "rc_cp_flight",
    "rc_atomic",
    "rc_underflow",
];

fn emu() -> Option<&'static Emu> {
    static EMU: OnceLock<Result<Emu, EmuError>> = OnceLock::new();
    let r = EMU.get_or_init(|| {
        Builder::new()
            .racecheck(true)
            .source("racy.cu", RACY, ENTRIES)
            .build()
    });
    match r {
        Ok(e) => Some(e),
        Err(e) => {
            e.skip_or_panic();
            None
        }
    }
}

/// Launch `kernel` with `(out, mode)` (and `g` first for cp.async): the error, if any.
fn run(kernel: &str, grid: u32, threads: u32, smem: usize, mode: i32) -> Option<String> {
    let emu = emu()?;
    assert!(emu.racecheck());
    let out = DeviceBuffer::filled(4096 * 4, 0);
    let g = DeviceBuffer::from_slice(&(0..4096).map(|i| i as f32).collect::<Vec<f32>>());
    let mut args = vec![Arg::Buf(&out), Arg::I32(mode)];
    if kernel.starts_with("rc_cp_") {
        args.insert(0, Arg::Buf(&g));
    }
    // SAFETY: the buffers hold 4096 values, more than any of these kernels touches.
    match unsafe { emu.launch(kernel, (grid, 1, 1), (threads, 1, 1), smem, &args) } {
        Ok(()) => None,
        Err(e) => Some(e.to_string()),
    }
}

/// Mode 0 fails with a message holding every one of `want`; mode 1 runs clean.
fn races(kernel: &str, grid: u32, threads: u32, smem: usize, want: &[&str]) {
    if emu().is_none() {
        return;
    }
    let e = run(kernel, grid, threads, smem, 0)
        .unwrap_or_else(|| panic!("{kernel}: the race was not detected"));
    eprintln!("{kernel}: {e}");
    for w in want {
        assert!(e.contains(w), "{kernel}: {w:?} not in: {e}");
    }
    // where: the kernel's function, resolved from the hidden symbol (addr2line), or the library
    assert!(e.contains(kernel) || e.contains("libmrtemu.so+0x"), "{e}");
    if let Some(e) = run(kernel, grid, threads, smem, 1) {
        panic!("{kernel} with its barrier: {e}");
    }
}

#[test]
fn read_after_write_without_a_barrier() {
    races(
        "rc_raw",
        1,
        64,
        64 * 4,
        &[
            "race",
            "thread (1,0,0) [warp 0] reads byte 0 of the dynamic shared memory",
            "which thread (0,0,0) [warp 0] wrote",
        ],
    );
}

#[test]
fn write_after_read_without_a_barrier() {
    races(
        "rc_war",
        1,
        64,
        64 * 4,
        &[
            "thread (1,0,0) [warp 0] writes byte 4 of the dynamic shared memory",
            "which thread (0,0,0) [warp 0] read",
        ],
    );
}

#[test]
fn lanes_of_a_warp_need_syncwarp_and_warps_need_a_barrier() {
    races(
        "rc_warp",
        1,
        64,
        64 * 4,
        &[
            "thread (1,0,0) [warp 0] writes byte 4 ",
            "which thread (0,0,0) [warp 0] read",
            "__syncwarp",
        ],
    );
    // __syncwarp orders the lanes of one warp only
    let Some(e) = run("rc_warp", 1, 64, 64 * 4, 2) else {
        assert!(
            emu().is_none(),
            "rc_warp mode 2: a read of the other warp's write passed"
        );
        return;
    };
    assert!(
        e.contains("[warp 1] writes")
            && e.contains("[warp 0] read")
            && e.contains("no __syncthreads between"),
        "{e}"
    );
}

#[test]
fn shared_memory_read_before_it_is_written() {
    if emu().is_none() {
        return;
    }
    let e = run("rc_uninit", 1, 64, 64 * 4, 0).expect("dynamic: not detected");
    assert!(
        e.contains("reads byte 0 of the dynamic shared memory")
            && e.contains("which no thread of this block wrote"),
        "{e}"
    );
    assert_eq!(run("rc_uninit", 1, 64, 64 * 4, 1), None);
    // static __shared__ arrays (thread-local statics in the emulator) are tracked too
    let e = run("rc_uninit", 1, 64, 64 * 4, 2).expect("static: not detected");
    assert!(
        e.contains("thread (1,0,0) [warp 0] writes static __shared__ byte")
            && e.contains("which thread (0,0,0) [warp 0] read"),
        "{e}"
    );
}

#[test]
fn a_reduction_scratch_reused_without_a_barrier() {
    races(
        "rc_scratch",
        1,
        128,
        0,
        &["writes static __shared__ byte", "read in"],
    );
}

#[test]
fn blocks_writing_one_global_element() {
    races(
        "rc_global",
        4,
        32,
        0,
        &["both write global memory byte", "(blocks 0 and 1)"],
    );
}

#[test]
fn ldmatrix_rows_written_by_other_lanes_need_syncwarp() {
    races(
        "rc_ldmatrix",
        1,
        32,
        32 * 16,
        &["race (ldmatrix.x4", "wrote", "__syncwarp"],
    );
}

#[test]
fn cp_async_copies_of_other_threads_need_a_barrier() {
    races(
        "rc_cp_async",
        1,
        64,
        64 * 16,
        &["reads byte 16 of the dynamic shared memory"],
    );
}

#[test]
fn global_accesses_outside_the_launchs_buffers() {
    let Some(emu) = emu() else { return };
    let out = DeviceBuffer::filled(64 * 4, 0);
    let p = out.as_ptr() as u64;
    // the kernel is given 32 floats of a larger allocation: one past them is caught all the same
    let within = |mode: i32| {
        // SAFETY: the allocation holds 64 floats; the kernel writes at most 33.
        unsafe {
            emu.launch_within(
                "rc_bounds",
                (1, 1, 1),
                (32, 1, 1),
                0,
                &[Arg::Buf(&out), Arg::I32(mode)],
                &[(p + 1024, p + 1040), (p, p + 128)],
            )
        }
    };
    let e = within(0)
        .expect_err("the write past the buffer passed")
        .to_string();
    assert!(
        e.contains("out of bounds: thread (31,0,0) [warp 0] writes 4 byte(s)")
            && e.contains("outside every buffer of the launch")
            && e.contains("0 byte(s) past the end of buffer 1 (128 bytes)"),
        "{e}"
    );
    within(1).unwrap();
    // Emu::launch bounds the kernel by its Buf arguments: the whole allocation here
    // SAFETY: as above.
    unsafe {
        emu.launch(
            "rc_bounds",
            (1, 1, 1),
            (32, 1, 1),
            0,
            &[Arg::Buf(&out), Arg::I32(0)],
        )
    }
    .unwrap();
}

#[test]
fn a_warp_scan_ordered_by_syncwarp_runs_clean() {
    if emu().is_none() {
        return;
    }
    // each element read by another lane, then (after a __syncwarp) by its own, then written
    assert_eq!(run("rc_scan", 1, 32, 32 * 4, 1), None);
}

#[test]
fn a_cp_async_in_flight_is_not_to_be_read() {
    races(
        "rc_cp_flight",
        1,
        64,
        64 * 16,
        &[
            "thread (0,0,0) [warp 0] reads byte 16 of the dynamic shared memory",
            "while a cp.async of thread (1,0,0) [warp 0] to it is in flight",
        ],
    );
}

#[test]
fn atomics_race_with_plain_accesses_only() {
    races(
        "rc_atomic",
        1,
        64,
        0,
        &[
            "race (atomic): thread (1,0,0) [warp 0] writes static __shared__ byte",
            "(0,0,0) [warp 0] read",
        ],
    );
}

#[test]
fn dynamic_shared_memory_underflow() {
    races(
        "rc_underflow",
        1,
        32,
        32 * 4,
        &["out of bounds: thread (0,0,0) [warp 0] writes 4 byte(s) before the start of the dynamic shared memory"],
    );
}
