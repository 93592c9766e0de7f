//! The GPU checks of the `com.motionrt` attention kernels (run on a machine with an NVIDIA GPU;
//! `bench/gpu/attention.sh` runs this and the PyTorch side and prints the table):
//!
//! 1. correctness: each CUDA kernel (fp32 and fp16) against the CPU implementation on fresh
//!    random inputs, the output buffer poisoned (NaN) before every launch; fp32 within 1e-5 and
//!    fp16 within 2e-3 of the output's magnitude;
//! 2. timing: CUDA events around each launch, median of `--repeats` after `--warmup`, at the
//!    AnimateDiff shapes (B = 2 for guidance, 16 frames, 512×512: B·h·w = 2·64·64 ... 2·8·8, 8 heads)
//!    and Tune-A-Video's sparse-causal shapes, with the memory-bandwidth floor of each call.
//!
//! `cargo build --release --example attention_gpu`, then
//! `target/release/examples/attention_gpu [--warmup 5] [--repeats 50] [--bandwidth 3.35e12]`.
//! Prints one JSON object per line.

use motionrt_kernels::attention::{Attention, SparseCausal};
use motionrt_kernels::gpu::{Gpu, GpuElem};
use motionrt_runtime::rng::NormalRng;

struct Args {
    warmup: usize,
    repeats: usize,
    bandwidth: f64,
}

fn args() -> Args {
    let mut a = Args {
        warmup: 5,
        repeats: 50,
        bandwidth: 3.35e12,
    };
    let v: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < v.len() {
        let val = v.get(i + 1).cloned().unwrap_or_default();
        match v[i].as_str() {
            "--warmup" => a.warmup = val.parse().expect("--warmup N"),
            "--repeats" => a.repeats = val.parse().expect("--repeats N"),
            "--bandwidth" => a.bandwidth = val.parse().expect("--bandwidth BYTES_PER_S"),
            other => panic!("unknown argument {other}"),
        }
        i += 2;
    }
    a
}

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut r = NormalRng::new(seed);
    let mut v = vec![0f32; n];
    r.fill(&mut v);
    v
}

fn to_f16(v: &[f32]) -> Vec<u16> {
    v.iter()
        .map(|&x| half::f16::from_f32(x).to_bits())
        .collect()
}

fn from_f16(v: &[u16]) -> Vec<f32> {
    v.iter()
        .map(|&x| half::f16::from_bits(x).to_f32())
        .collect()
}

/// max |a − b| / max |b|
fn rel(a: &[f32], b: &[f32]) -> f64 {
    let m = b.iter().fold(0f64, |m, &x| m.max(x.abs() as f64));
    let e = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| {
            if x.is_finite() {
                (x as f64 - y as f64).abs()
            } else {
                f64::INFINITY
            }
        })
        .fold(0f64, f64::max);
    e / m.max(1e-30)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median milliseconds of `launch` between CUDA events.
fn time(gpu: &Gpu, a: &Args, mut launch: impl FnMut()) -> f64 {
    use cudarc::driver::sys::CUevent_flags;
    for _ in 0..a.warmup {
        launch();
    }
    let mut times = Vec::with_capacity(a.repeats);
    for _ in 0..a.repeats {
        let start = gpu
            .ctx
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .unwrap();
        let end = gpu
            .ctx
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .unwrap();
        start.record(&gpu.stream).unwrap();
        launch();
        end.record(&gpu.stream).unwrap();
        end.synchronize().unwrap();
        times.push(start.elapsed_ms(&end).unwrap() as f64);
    }
    median(times)
}

trait Host: GpuElem {
    fn encode(v: &[f32]) -> Vec<Self>;
    fn decode(v: &[Self]) -> Vec<f32>;
    const BYTES: usize;
    const TOL: f64;
}

impl Host for f32 {
    fn encode(v: &[f32]) -> Vec<Self> {
        v.to_vec()
    }
    fn decode(v: &[Self]) -> Vec<f32> {
        v.to_vec()
    }
    const BYTES: usize = 4;
    const TOL: f64 = 1e-5;
}

impl Host for u16 {
    fn encode(v: &[f32]) -> Vec<Self> {
        to_f16(v)
    }
    fn decode(v: &[Self]) -> Vec<f32> {
        from_f16(v)
    }
    const BYTES: usize = 2;
    const TOL: f64 = 2e-3;
}

fn poison<T: Host>() -> T {
    T::encode(&[f32::NAN])[0]
}

fn temporal<T: Host>(
    gpu: &Gpu,
    a: &Args,
    n: usize,
    f: usize,
    heads: usize,
    d: usize,
    seed: u64,
) -> serde_json::Value {
    let c = heads * d;
    let len = n * f * c;
    let (q, k, v) = (
        random(len, seed),
        random(len, seed + 1),
        random(len, seed + 2),
    );
    // the reference sees exactly the values the GPU sees (fp16-rounded for fp16)
    let (qh, kh, vh) = (T::encode(&q), T::encode(&k), T::encode(&v));
    let (q32, k32, v32) = (T::decode(&qh), T::decode(&kh), T::decode(&vh));
    let op = Attention::new(n, f, f, heads, d);
    let mut want = vec![0f32; len];
    op.run(&q32, &k32, &v32, None, &mut want).unwrap();
    let s = &gpu.stream;
    let (dq, dk, dv) = (
        s.clone_htod(&qh).unwrap(),
        s.clone_htod(&kh).unwrap(),
        s.clone_htod(&vh).unwrap(),
    );
    let mut dy = s.clone_htod(&vec![poison::<T>(); len]).unwrap();
    gpu.temporal(&op, &dq, &dk, &dv, None, &mut dy).unwrap();
    let got = T::decode(&s.clone_dtoh(&dy).unwrap());
    let err = rel(&got, &want);
    let ms = time(gpu, a, || {
        gpu.temporal(&op, &dq, &dk, &dv, None, &mut dy).unwrap()
    });
    let bytes = 4 * len * T::BYTES;
    let flops = 4.0 * (n * heads * f * f * d) as f64;
    serde_json::json!({
        "op": "TemporalAttention", "dtype": T::SUFFIX, "shape": {"N": n, "F": f, "heads": heads, "d": d},
        "max_rel_err": err, "tolerance": T::TOL, "pass": err <= T::TOL,
        "median_ms": ms, "bytes": bytes, "bandwidth_floor_ms": bytes as f64 / a.bandwidth * 1e3,
        "achieved_gb_s": bytes as f64 / (ms * 1e-3) / 1e9, "gflop": flops / 1e9,
    })
}

#[allow(clippy::too_many_arguments)]
fn sparse<T: Host>(
    gpu: &Gpu,
    a: &Args,
    b: usize,
    f: usize,
    tokens: usize,
    heads: usize,
    d: usize,
    check: bool,
    seed: u64,
) -> serde_json::Value {
    let c = heads * d;
    let len = b * f * tokens * c;
    let (q, k, v) = (
        random(len, seed),
        random(len, seed + 1),
        random(len, seed + 2),
    );
    let (qh, kh, vh) = (T::encode(&q), T::encode(&k), T::encode(&v));
    let op = SparseCausal::new(b, f, tokens, heads, d);
    let s = &gpu.stream;
    let (dq, dk, dv) = (
        s.clone_htod(&qh).unwrap(),
        s.clone_htod(&kh).unwrap(),
        s.clone_htod(&vh).unwrap(),
    );
    let mut dy = s.clone_htod(&vec![poison::<T>(); len]).unwrap();
    gpu.sparse_causal(&op, &dq, &dk, &dv, &mut dy).unwrap();
    let err = if check {
        let (q32, k32, v32) = (T::decode(&qh), T::decode(&kh), T::decode(&vh));
        let mut want = vec![0f32; len];
        op.run(&q32, &k32, &v32, &mut want).unwrap();
        let got = T::decode(&s.clone_dtoh(&dy).unwrap());
        Some(rel(&got, &want))
    } else {
        None
    };
    let ms = time(gpu, a, || {
        gpu.sparse_causal(&op, &dq, &dk, &dv, &mut dy).unwrap()
    });
    // Q and Y once; K and V at least once (they are re-read per frame from L2 at best)
    let bytes = 4 * len * T::BYTES;
    let flops = 4.0 * (b * f * heads * tokens * 2 * tokens * d) as f64;
    serde_json::json!({
        "op": "SparseCausalAttention", "dtype": T::SUFFIX,
        "shape": {"B": b, "F": f, "S": tokens, "heads": heads, "d": d},
        "max_rel_err": err, "tolerance": T::TOL, "pass": err.map(|e| e <= T::TOL),
        "median_ms": ms, "bytes": bytes, "bandwidth_floor_ms": bytes as f64 / a.bandwidth * 1e3,
        "gflop": flops / 1e9, "tflop_s": flops / (ms * 1e-3) / 1e12,
    })
}

fn main() {
    let a = args();
    let gpu = match Gpu::new(0) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("attention_gpu: {e}");
            std::process::exit(2);
        }
    };
    println!(
        "{}",
        serde_json::json!({"device": gpu.name, "arch": gpu.arch, "warmup": a.warmup, "repeats": a.repeats, "bandwidth": a.bandwidth})
    );
    let mut ok = true;
    let mut emit = |v: serde_json::Value| {
        if v["pass"] == false {
            ok = false;
        }
        println!("{v}");
    };
    // AnimateDiff motion modules at 16 frames, 512×512, guidance (B = 2): the four levels
    for &(n, heads, d) in &[
        (2 * 64 * 64, 8, 40),
        (2 * 32 * 32, 8, 80),
        (2 * 16 * 16, 8, 160),
        (2 * 8 * 8, 8, 160),
    ] {
        emit(temporal::<f32>(&gpu, &a, n, 16, heads, d, 1));
        emit(temporal::<u16>(&gpu, &a, n, 16, heads, d, 2));
    }
    // odd and small shapes for correctness
    for &(n, f, heads, d) in &[
        (7, 1, 8, 40),
        (9, 2, 8, 40),
        (33, 24, 8, 40),
        (5, 16, 2, 160),
    ] {
        emit(temporal::<f32>(&gpu, &a, n, f, heads, d, 3));
        emit(temporal::<u16>(&gpu, &a, n, f, heads, d, 4));
    }
    // Tune-A-Video sparse-causal: checked at 32×32 and odd sizes, timed at 64×64 too
    for &(b, f, s, heads, d, check) in &[
        (1, 8, 32 * 32, 8, 40, true),
        (2, 3, 37, 8, 80, true),
        (1, 24, 15, 2, 160, true),
        (2, 8, 64 * 64, 8, 40, false),
        (2, 8, 32 * 32, 8, 80, true),
    ] {
        emit(sparse::<f32>(&gpu, &a, b, f, s, heads, d, check, 5));
        emit(sparse::<u16>(&gpu, &a, b, f, s, heads, d, check, 6));
    }
    if !ok {
        eprintln!("attention_gpu: a kernel is outside its tolerance");
        std::process::exit(1);
    }
}
