//! The native engine's program for a graph at given shapes, step by step kind: how many steps,
//! their arithmetic (FLOP) and the bytes they move at float16, and the time those would take at a
//! GPU's peak rates (a floor, not a measurement): each step at the slowest of its arithmetic, its
//! memory traffic and its exponentials. No GPU needed: the program is compiled here and specialised as the float16
//! executor runs it (motion modules on frame-major rows, merged Q, K, V projections;
//! `--no-merge`: as compiled).
//!
//! `cargo run --release --example engine_floor -- FUSED.onnx [--frames 16 --height 64 --width 64
//!  --batch 2 --layout nhwc|nchw --tflops 989 --tbps 3.35 --texp 3.9 --smem 241.6 --no-merge
//!  --conv-kernel BN
//!  --geglu-kernel BN --norm-pairs BN | --gn-pairs BN --attention-two]`
//!
//! `--texp`: exponentials a second (10¹²; an H100 SXM's special-function units, 16 an SM a cycle),
//! the third bound of an attention's or a softmax's step: one exponential a score.
//! `--smem`: shared-memory wavefronts a second (10⁹; one an SM a cycle, 132 SMs at 1.83 GHz),
//! the fourth bound, of the steps on motionrt's tensor-core kernels (attention, and with the
//! options below the implicit-GEMM family): their `ldmatrix`, 16-byte `cp.async` and 16-byte
//! shared loads and stores, counted from the kernels' tiles as the emulator counts them
//! (`Emu::bank_stats`; conflict-free). The libraries' kernels (cuBLASLt, cuDNN) are not bound so.
//!
//! Last, every launch the float16 executor would make at these shapes is checked against an
//! H100's launch limits, and every tensor against the 2^31 - 1 elements the executor takes
//! (non-zero exit when one is beyond them); `--conv-kernel 64|128`: with
//! every convolution `conv_igemm_f16_nBN` computes on it (as where it times faster than cuDNN);
//! `--geglu-kernel 64|128`: every feed-forward projection `gemm_geglu_f16_nBN` computes with its
//! GEGLU as that one kernel (as where it times faster than cuBLASLt and `geglu`), in the table as
//! `linear+geglu` (the projection's `[rows, 2d]` output neither written nor read again);
//! `--norm-pairs 64|128`: every GEMM after a GroupNorm or LayerNorm that `conv_igemm_gn_f16_nBN` /
//! `conv_igemm_ln_f16_nBN` computes reads the normalisation's input and normalises it as it loads
//! it (as where that times faster than the two steps), the normalisation in the table as
//! `group_norm statistics` / `layer_norm statistics` (one read of its input, no output) and the
//! step after it as `KIND+group_norm` / `KIND+layer_norm`, with the normalisation's
//! special-function work counted as exponentials: every input value normalised once per filter
//! tap and per block of BN output channels, two (SiLU's ex2 and rcp) a value.
//! `--gn-pairs 64|128` (also `--gn-conv`, its name before the LayerNorm pairs): the same for the
//! GroupNorm pairs alone.
//! `--attention-two`: the attentions on `attention_tiled_f16_d40` on `attention_tiled2_f16_d40`
//! (4 warps of two 16-row tiles; the same arithmetic and traffic: launches only).
//!
//! FUSED.onnx is a graph written by `motionrt build --plan-only`: the UNet (inputs at
//! `[batch, 4, frames, height, width]` latents with a 77-token context per frame), or the VAE
//! decoder (`[frames, 4, height, width]` latents: one decode call of `frames` frames), chosen by
//! its file name.

use std::collections::BTreeMap;
use std::path::PathBuf;

use motionrt_runtime::engine::exec::Precision;
use motionrt_runtime::engine::launch;
use motionrt_runtime::engine::program::{self, Layout, Step};
use motionrt_runtime::engine::source::FileInitializers;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn main() -> Res<()> {
    let mut it = std::env::args().skip(1);
    let path: PathBuf = it
        .next()
        .ok_or("usage: engine_floor FUSED.onnx [options]")?
        .into();
    let (mut b, mut f, mut h, mut w) = (2usize, 16usize, 64usize, 64usize);
    let (mut tflops, mut tbps, mut texp, mut smem) = (989.0f64, 3.35f64, 3.9f64, 241.6f64);
    let mut layout = Layout::Nhwc;
    let mut merge = true;
    let mut conv_kernel: Option<usize> = None;
    let mut geglu_kernel: Option<usize> = None;
    let mut norm_pair: Option<usize> = None;
    let mut gn_only = false;
    let mut attention_two = false;
    while let Some(k) = it.next() {
        if k == "--no-merge" {
            merge = false;
            continue;
        }
        if k == "--attention-two" {
            attention_two = true;
            continue;
        }
        let v = it.next().ok_or(format!("{k} needs a value"))?;
        match k.as_str() {
            "--batch" => b = v.parse()?,
            "--frames" => f = v.parse()?,
            "--height" => h = v.parse()?,
            "--width" => w = v.parse()?,
            "--tflops" => tflops = v.parse()?,
            "--tbps" => tbps = v.parse()?,
            "--texp" => texp = v.parse()?,
            "--smem" => smem = v.parse()?,
            "--layout" => layout = Layout::parse(&v).ok_or("--layout nhwc|nchw")?,
            "--conv-kernel" => conv_kernel = Some(v.parse()?),
            "--geglu-kernel" => geglu_kernel = Some(v.parse()?),
            "--norm-pairs" => norm_pair = Some(v.parse()?),
            // the GroupNorm pairs alone (`--gn-conv`: the flag's name before the LayerNorm pairs)
            "--gn-pairs" | "--gn-conv" => {
                norm_pair = Some(v.parse()?);
                gn_only = true;
            }
            _ => return Err(format!("unknown argument {k}").into()),
        }
    }
    let model = motionrt_onnx::load_model(&path)?;
    let vae = path
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with("vae_decoder"));
    let inputs = if vae {
        vec![("latent", vec![f, 4, h, w])]
    } else {
        let d = motionrt_onnx::summarize(&model)
            .inputs
            .iter()
            .find(|i| i.name == "encoder_hidden_states")
            .and_then(|i| i.dims.last()?.parse::<usize>().ok())
            .ok_or("no encoder_hidden_states [.., .., D] input")?;
        vec![
            ("sample", vec![b, 4, f, h, w]),
            ("timestep", vec![b]),
            ("encoder_hidden_states", vec![b * f, 77, d]),
        ]
    };
    let mut prog = program::compile(&model, &inputs, &FileInitializers::new(&path), layout)?;
    // what the float16 executor runs: motion modules on frame-major rows, Q, K, V projections
    // merged into one GEMM
    if merge {
        let s = launch::specialize(&mut prog, Precision::Fp16);
        println!(
            "{} motion modules on frame-major rows ({} residual adds into a GEMM epilogue); {} convolution biases added by the GroupNorm or GEMM after; {} attentions read Q, K, V (or K, V) from one GEMM",
            s.frame_major, s.residual_adds, s.conv_biases, s.merged
        );
    }
    let el = 2.0; // float16
    let numel = |buf: usize| prog.buffers[buf].numel as f64;
    // each step at the slowest of its arithmetic, its memory traffic and its exponentials (and,
    // on motionrt's tensor-core kernels, its shared-memory wavefronts: floor_wf)
    let floor = |fl: f64, by: f64, ex: f64| {
        (fl / (tflops * 1e12))
            .max(by / (tbps * 1e12))
            .max(ex / (texp * 1e12))
            * 1e3
    };
    let floor_wf =
        |fl: f64, by: f64, ex: f64, wf: f64| floor(fl, by, ex).max(wf / (smem * 1e9) * 1e3);
    // wavefronts of the implicit-GEMM family (engine_ops.cu conv_igemm) for M rows, k, O output
    // channels at tile width BN: each 128 x BN block and 32-wide k tile stores its A and W tiles
    // ((128 + BN) rows of 64 bytes: (128 + BN) / 2) and its 4 warps read them with ldmatrix.x4
    // (two k16 steps of 4 A and BN / 32 W fragments: 128 + BN); a GroupNorm or LayerNorm form
    // also loads and stores its A chunks once (128)
    let igemm_wf = |m: usize, k: usize, o: usize, bn: usize, norm: bool| {
        let blocks = (m.div_ceil(128) * o.div_ceil(bn)) as f64;
        let per_tile = 1.5 * (128 + bn) as f64 + if norm { 128.0 } else { 0.0 };
        blocks * (k / 32) as f64 * per_tile
    };
    // kind -> (steps, flop, bytes, floor ms)
    let mut by: BTreeMap<String, (usize, f64, f64, f64)> = BTreeMap::new();
    let fused: Vec<(usize, usize)> = match geglu_kernel {
        Some(_) => launch::geglu_pairs(&prog, Precision::Fp16),
        None => Vec::new(),
    };
    let gn_pairs = match norm_pair {
        Some(_) => chosen_norm_pairs(&prog, gn_only),
        None => Vec::new(),
    };
    let gn_fused: Vec<usize> = gn_pairs.iter().map(|&(gi, _)| gi).collect();
    // the second step of each pair: its normalisation's name and SiLU flag
    let gn_second: BTreeMap<usize, (&str, bool)> = gn_pairs
        .iter()
        .map(|&(gi, ci)| match prog.steps[gi] {
            Step::GroupNorm { silu, .. } => (ci, ("group_norm", silu)),
            _ => (ci, ("layer_norm", false)),
        })
        .collect();
    for (si, s) in prog.steps.iter().enumerate() {
        let stats = match s {
            Step::GroupNorm { n, c, spatial, .. } => Some(("group_norm", n * c * spatial)),
            Step::LayerNorm { rows, cols, .. } => Some(("layer_norm", rows * cols)),
            _ => None,
        };
        if let (true, Some((norm, numel))) = (gn_fused.contains(&si), stats) {
            // statistics only: one read of the input (the GEMM reads it again anyway)
            let bytes = numel as f64 * el;
            let e = by.entry(format!("{norm} statistics")).or_default();
            e.0 += 1;
            e.2 += bytes;
            e.3 += floor(0.0, bytes, 0.0);
            continue;
        }
        if fused.iter().any(|&(_, gi)| gi == si) {
            continue; // in its projection's kernel
        }
        if fused.iter().any(|&(li, _)| li == si) {
            if let Step::Linear { m, n, k, .. } = s {
                let (flop, bytes) = (
                    2.0 * (m * n * k) as f64,
                    (m * k + n * k + m * n / 2) as f64 * el,
                );
                let wf = igemm_wf(*m, *k, *n, geglu_kernel.unwrap_or(64), false);
                let e = by.entry("linear+geglu".into()).or_default();
                e.0 += 1;
                e.1 += flop;
                e.2 += bytes;
                e.3 += floor_wf(flop, bytes, 0.0, wf);
                continue;
            }
        }
        // one exponential a score (attention, softmax)
        let exps = match s {
            Step::Attention { n, l, s, heads, .. } => (n * heads * l * s) as f64,
            Step::Softmax { rows, cols, .. } => (rows * cols) as f64,
            _ => 0.0,
        };
        let (kind, flop, bytes) = match s {
            Step::Copy { s: st, .. } => ("copy".into(), 0.0, 2.0 * st.numel() as f64 * el),
            Step::Binary { a, b, n, .. } => (
                "binary".into(),
                *n as f64,
                (numel(*a).min(*n as f64) + numel(*b).min(*n as f64) + *n as f64) * el,
            ),
            Step::Unary { n, .. } => ("unary".into(), *n as f64, 2.0 * *n as f64 * el),
            Step::Fill { n, .. } => ("fill".into(), 0.0, *n as f64 * el),
            Step::Linear {
                m, n, k, residual, ..
            } => (
                format!(
                    "linear{}",
                    if residual.is_some() { "+residual" } else { "" }
                ),
                2.0 * (*m * *n * *k) as f64,
                ((m * k + n * k + m * n) as f64 + residual.map_or(0.0, |_| (m * n) as f64)) * el,
            ),
            Step::MatMul { batch, m, n, k, .. } => (
                "matmul".into(),
                2.0 * (batch * m * n * k) as f64,
                (batch * (m * k + k * n + m * n)) as f64 * el,
            ),
            Step::Conv(c) => {
                let [_, o, oh, ow] = c.y_shape;
                let [_, cg, kh, kw] = c.w_shape;
                let out = (c.y_shape[0] * o * oh * ow) as f64;
                // the bias/residual epilogue is a kernel of its own after cuDNN's: it reads and
                // writes the output again (and reads the residual), at its own floor; on
                // conv_igemm (or conv_igemm_gn) it is the kernel's epilogue, reading the residual
                let on_kernel = launch::conv_igemm_for(&prog, si, Precision::Fp16, conv_kernel)
                    .is_some()
                    || gn_second.contains_key(&si);
                let epilogue = c.bias.is_some() || c.residual.is_some() || c.sample_bias.is_some();
                if epilogue && !on_kernel {
                    let bytes = (2.0 + c.residual.is_some() as u8 as f64) * out * el;
                    let e = by.entry("conv bias/residual pass".into()).or_default();
                    e.0 += 1;
                    e.2 += bytes;
                    e.3 += floor(0.0, bytes, 0.0);
                }
                let residual = if on_kernel && c.residual.is_some() {
                    out
                } else {
                    0.0
                };
                (
                    format!("conv {kh}x{kw}"),
                    2.0 * out * (cg * kh * kw) as f64,
                    (c.x_shape.iter().product::<usize>() as f64
                        + out
                        + residual
                        + c.w_shape.iter().product::<usize>() as f64)
                        * el,
                )
            }
            Step::GroupNorm { n, c, spatial, .. } => (
                "group_norm".into(),
                0.0,
                3.0 * (n * c * spatial) as f64 * el,
            ),
            Step::LayerNorm { rows, cols, .. } => {
                ("layer_norm".into(), 0.0, 2.0 * (rows * cols) as f64 * el)
            }
            Step::Softmax { rows, cols, .. } => {
                ("softmax".into(), 0.0, 2.0 * (rows * cols) as f64 * el)
            }
            Step::Geglu { rows, d, .. } => ("geglu".into(), 0.0, 3.0 * (rows * d) as f64 * el),
            Step::Gather { n_ids, row, .. } => {
                ("gather".into(), 0.0, 2.0 * (n_ids * row) as f64 * el)
            }
            Step::Attention {
                n, l, s, heads, d, ..
            } => (
                format!("attention L={l} S={s} d={d}"),
                4.0 * (n * heads * l * s * d) as f64,
                (2 * n * l * heads * d + 2 * n * s * heads * d) as f64 * el,
            ),
        };
        // a step on conv_igemm_gn normalises its A tiles as it loads them: each block its own,
        // so every input value once per filter tap and per block of BN output channels; with
        // SiLU two special-function instructions a value (ex2, rcp), counted as exponentials
        let (kind, exps) = match (gn_second.get(&si), norm_pair) {
            (Some(&(norm, silu)), Some(bn)) => {
                let (rows, k, o) = match s {
                    Step::Conv(c) => (
                        c.y_shape[0] * c.y_shape[2] * c.y_shape[3],
                        c.w_shape[1] * c.w_shape[2] * c.w_shape[3],
                        c.w_shape[0],
                    ),
                    Step::Linear { m, n, k, .. } => (*m, *k, *n),
                    _ => (0, 0, 0),
                };
                let mufu = if silu { 2.0 } else { 0.0 };
                (
                    format!("{kind}+{norm}"),
                    exps + mufu * (rows * k * o.div_ceil(bn)) as f64,
                )
            }
            _ => (kind, exps),
        };
        // the GEMM of a normalisation pair: on conv_igemm_gn/_ln at norm_pair's width
        let norm_gemm = norm_pair.filter(|_| gn_second.contains_key(&si));
        let wf = smem_wavefronts(&prog, si, conv_kernel, norm_gemm, attention_two, &igemm_wf);
        let e = by.entry(kind).or_default();
        e.0 += 1;
        e.1 += flop;
        e.2 += bytes;
        e.3 += floor_wf(flop, bytes, exps, wf);
    }
    println!(
        "{} at {:?}, layout {layout:?}: {} steps; floors at {tflops} TFLOP/s, {tbps} TB/s, {texp}·10¹² exponentials/s and {smem}·10⁹ shared-memory wavefronts/s on motionrt's tensor-core kernels (float16)",
        path.display(),
        inputs[0].1,
        prog.steps.len()
    );
    println!("| steps | kind | GFLOP | GB moved | floor ms |");
    println!("| --- | --- | --- | --- | --- |");
    let mut rows: Vec<_> = by.into_iter().collect();
    rows.sort_by(|x, y| y.1 .3.total_cmp(&x.1 .3));
    let (mut tf, mut tb, mut tt) = (0.0, 0.0, 0.0);
    for (k, (n, fl, byt, t)) in &rows {
        let t = *t;
        tf += fl;
        tb += byt;
        tt += t;
        println!(
            "| {n} | {k} | {:.0} | {:.2} | {t:.2} |",
            fl / 1e9,
            byt / 1e9
        );
    }
    println!(
        "| {} | total | {:.0} | {:.2} | {tt:.2} |",
        prog.steps.len(),
        tf / 1e9,
        tb / 1e9
    );
    launches(
        &prog,
        conv_kernel,
        geglu_kernel,
        norm_pair,
        gn_only,
        attention_two,
    )
}

/// The normalisation pairs put on the kernel: all of them, or only those of a GroupNorm.
fn chosen_norm_pairs(prog: &program::Program, gn_only: bool) -> Vec<(usize, usize)> {
    launch::norm_pairs(prog, Precision::Fp16)
        .into_iter()
        .filter(|&(gi, _)| !gn_only || matches!(prog.steps[gi], Step::GroupNorm { .. }))
        .collect()
}

/// Shared-memory wavefronts of step `si` where it runs on one of motionrt's tensor-core kernels
/// (0 elsewhere): an attention on the tiled or short kernels, a convolution on `conv_igemm`, the
/// GEMM of a normalisation pair (`norm_gemm`: its tile width; `igemm_wf`: the implicit-GEMM
/// family's count). An attention: per 16-row tile and 8·NT keys (NT = 8 for the tiled kernels' 64-key tiles, 2·MT for the short
/// ones), K's `ldmatrix` (NT / 2 n-tile pairs, an x4 of 4 wavefronts each 16 dimensions, an x2 of
/// 2 for a last half chunk) and V's (NT / 2 key chunks, an x4 each pair of 8-wide n-tiles, an x2
/// for a last single one), halved for two tiles a warp (`attention_tiled2`); each 16-row tile's
/// Q fragments once; the K and V tiles' 16-byte stores (and Q's) once per block or warp.
fn smem_wavefronts(
    prog: &program::Program,
    si: usize,
    conv_kernel: Option<usize>,
    norm_gemm: Option<usize>,
    attention_two: bool,
    igemm_wf: &dyn Fn(usize, usize, usize, usize, bool) -> f64,
) -> f64 {
    if let Some(bn) = norm_gemm {
        return match &prog.steps[si] {
            Step::Conv(c) => igemm_wf(
                c.y_shape[0] * c.y_shape[2] * c.y_shape[3],
                c.w_shape[1] * c.w_shape[2] * c.w_shape[3],
                c.w_shape[0],
                bn,
                true,
            ),
            Step::Linear { m, n, k, .. } => igemm_wf(*m, *k, *n, bn, true),
            _ => 0.0,
        };
    }
    match &prog.steps[si] {
        Step::Conv(c) => match launch::conv_igemm_for(prog, si, Precision::Fp16, conv_kernel) {
            Some(bn) => igemm_wf(
                c.y_shape[0] * c.y_shape[2] * c.y_shape[3],
                c.w_shape[1] * c.w_shape[2] * c.w_shape[3],
                c.w_shape[0],
                bn,
                false,
            ),
            None => 0.0,
        },
        Step::Attention {
            n,
            l,
            s,
            heads,
            d,
            bias: None,
            ..
        } if program::fused_attention_head(*d) => {
            let entry = launch::attention_entry_head(*d);
            let dp = d.div_ceil(16) * 16;
            let ones = entry == 40;
            let half = d % 16 != 0;
            let (short, mt) = (*l <= 32, if *l > 16 { 2 } else { 1 });
            let nt = if short { 2 * mt } else { 8 };
            let k_wf = (nt / 2) as f64 * (4 * (dp / 16) - if half { 2 } else { 0 }) as f64;
            let v_wf = (nt / 2) as f64 * ((dp / 16) * 4 - if half && !ones { 2 } else { 0 }) as f64;
            let two = attention_two && ones && !short;
            let per_tile = (k_wf + v_wf) / if two { 2.0 } else { 1.0 };
            let seqs = (n * heads) as f64;
            // rows padded to the kernels' blocks: 128 (tiled), 16·MT (short)
            let rows = if short {
                16 * mt
            } else {
                l.div_ceil(128) * 128
            };
            let row_tiles = seqs * (rows / 16) as f64;
            let key_tiles = s.div_ceil(8 * nt) as f64;
            // 16-byte stores of Q (once) and of K and V (each key tile, once per block or warp):
            // d / 8 chunks a row
            let chunk_rows = |r: usize| (r * d * 2).div_ceil(128) as f64;
            let blocks = seqs * (rows / if short { 16 * mt } else { 128 }) as f64;
            let stores = blocks * (chunk_rows(rows) + key_tiles * 2.0 * chunk_rows(8 * nt));
            row_tiles * (key_tiles * per_tile + (4 * (dp / 16)) as f64) + stores
        }
        _ => 0.0,
    }
}

/// Every launch the float16 executor makes for `prog` (its very `step_ops`, at addresses laid
/// out as it lays them: activations at their arena offsets, weights apart), each kernel checked
/// against an H100's launch limits (grid, block, 227 KiB of opt-in shared memory) as the
/// executor checks it before launching. Errors when one is beyond them.
fn launches(
    prog: &program::Program,
    conv_kernel: Option<usize>,
    geglu_kernel: Option<usize>,
    norm_pair: Option<usize>,
    gn_only: bool,
    attention_two: bool,
) -> Res<()> {
    use motionrt_runtime::engine::launch::{
        check_launchable, conv_igemm_for, geglu_kernel_for, group_norm_scratch, norm_pair_for,
        plan_memory_for, step_ops, Ctx, Op,
    };
    const H100_SMEM_OPTIN: usize = 227 * 1024;
    let memory = plan_memory_for(prog, Precision::Fp16);
    // what keeping each GEGLU projection's input live through its GEGLU (gemm_geglu_f16 reads it
    // there) costs the activation arena
    let plain = program::plan_memory(prog, |d| match d {
        program::DType::Float => 2,
        program::DType::I64 => 8,
    });
    let geglu_fused = launch::plan_memory_fused(
        prog,
        Precision::Fp16,
        &launch::geglu_pairs(prog, Precision::Fp16),
    );
    let mut pairs = launch::geglu_pairs(prog, Precision::Fp16);
    pairs.extend(launch::norm_pairs(prog, Precision::Fp16));
    let fused = launch::plan_memory_fused(prog, Precision::Fp16, &pairs);
    let mib = |b: usize| b as f64 / 1048576.0;
    println!(
        "activation arena (float16): {:.0} MiB as planned at load ({:.0} MiB without the GEGLU and normalisation pairs' first inputs kept live; {:.0} MiB planned again with every GEGLU pair on gemm_geglu, {:.0} MiB with every normalisation pair on conv_igemm_gn/_ln too; {:.0} MiB without reuse)",
        mib(memory.arena_bytes),
        mib(plain.arena_bytes),
        mib(geglu_fused.arena_bytes),
        mib(fused.arena_bytes),
        mib(memory.unshared_bytes)
    );
    let chosen = chosen_norm_pairs(prog, gn_only);
    let (base, mut next) = (1u64 << 40, 1u64 << 44);
    let ptrs: Vec<u64> = (0..prog.buffers.len())
        .map(|i| match memory.offsets[i] {
            Some(o) => base + o as u64,
            None => {
                let p = next;
                next += (prog.buffers[i].numel as u64 * 2)
                    .next_multiple_of(256)
                    .max(256);
                p
            }
        })
        .collect();
    let lt = |_: usize| true;
    let ctx = Ctx {
        precision: Precision::Fp16,
        ptrs: &ptrs,
        norm_stats: if group_norm_scratch(prog) > 0 {
            1 << 43
        } else {
            0
        },
        smem_optin: H100_SMEM_OPTIN,
        lt: &lt,
        conv_kernel: &|si| conv_igemm_for(prog, si, Precision::Fp16, conv_kernel),
        geglu_kernel: &|si| geglu_kernel_for(prog, si, Precision::Fp16, geglu_kernel),
        norm_pair: &|si| {
            norm_pair_for(prog, si, Precision::Fp16, norm_pair)
                .filter(|_| !gn_only || chosen.iter().any(|&(gi, ci)| si == gi || si == ci))
        },
        attention_two: &|_| attention_two,
    };
    let (mut kernels, mut lts, mut gemms, mut convs) = (0, 0, 0, 0);
    let mut bad = Vec::new();
    // the executor's load refuses a tensor past 32-bit element counts (cuDNN, the kernels)
    if let Some((_, n)) = prog.largest_activation() {
        println!(
            "largest activation: {n} elements ({:.1} % of the {} a CUDA engine's tensors may hold)",
            100.0 * n as f64 / program::MAX_TENSOR_ELEMENTS as f64,
            program::MAX_TENSOR_ELEMENTS
        );
    }
    let too_big = prog.check_tensor_sizes().err();
    if let Some(e) = &too_big {
        println!("  {e}");
    }
    let mut by_kernel: BTreeMap<String, usize> = BTreeMap::new();
    for si in 0..prog.steps.len() {
        for op in step_ops(prog, si, &ctx)? {
            match op {
                Op::Kernel(l) => {
                    kernels += 1;
                    *by_kernel.entry(l.kernel.clone()).or_default() += 1;
                    if let Err(e) = check_launchable(&l, H100_SMEM_OPTIN) {
                        bad.push(format!("step {si} ({}): {e}", prog.steps[si].name()));
                    }
                }
                Op::Lt(_) => lts += 1,
                Op::Gemm(_) => gemms += 1,
                Op::Conv(_) => convs += 1,
            }
        }
    }
    println!(
        "launches (float16 executor): {kernels} kernels, {lts} cuBLASLt, {gemms} cuBLAS, {convs} \
         cuDNN; {} kernel(s) beyond an H100's launch limits",
        bad.len()
    );
    let by: Vec<String> = by_kernel.iter().map(|(k, n)| format!("{k} {n}")).collect();
    println!("kernels by name: {}", by.join(", "));
    for b in &bad {
        println!("  {b}");
    }
    match (bad.len(), too_big) {
        (0, None) => Ok(()),
        (0, Some(_)) => Err("a tensor past 32-bit element counts".into()),
        (n, _) => Err(format!("{n} launches beyond an H100's limits").into()),
    }
}
