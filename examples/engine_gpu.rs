//! The native CUDA engine's GPU checks and benchmark (needs an NVIDIA GPU, cuBLAS, cuDNN, NVRTC;
//! driven by `bench/gpu/engine.sh`).
//!
//! ```text
//! engine_gpu check --model EXPORT [--graphs unet,text_encoder,vae_decoder,vae_encoder]
//!                  [--batch 2 --frames 3 --height 8 --width 8] [--layout nhwc,nchw]
//!                  [--precisions fp32,fp16]
//! engine_gpu bench --model EXPORT [--batch 2 --frames 16 --height 64 --width 64]
//!                  [--warmup 3 --repeats 10] [--json OUT] [--no-ab]
//! engine_gpu localize --model EXPORT [check's options]
//! ```
//!
//! With `--no-kernel-tactics` (any mode) the programs take only cuDNN's and cuBLASLt's
//! algorithms: motionrt's tactic kernels (`conv_igemm`, `gemm_geglu`, the normalisation pairs,
//! two-tile attention) are neither timed nor run (`motionrt build --no-kernel-tactics`).
//!
//! `check` fuses each graph of a `motionrt export` folder, compiles it for the given shapes, runs
//! the exported graph on ONNX Runtime (CPU, float32: the reference) and the fused one on the
//! engine in float32 and float16,
//! eagerly and replayed from a captured CUDA graph, with the activations poisoned (NaN) before
//! each run, and compares. Tolerances: float32 max |Δ| ≤ 1e-4 · max |ref|; float16 max |Δ| ≤
//! 1e-2 · max |ref| and cosine ≥ 0.9999 (the CUDA emulator gives at most 2.7e-3 and 0.999997 on
//! the full architecture, tests/engine_emu.rs). Exits non-zero on a miss. Without `--graphs` it checks
//! every graph the folder has; a graph named in `--graphs` must be there. A program that misses
//! its tolerance is then run again one step at a time against the float32 CPU interpretation of
//! the same program (`engine::localize`), which names the first step that departs from it (when
//! that interpretation is affordable: up to 2·10¹¹ multiply-adds, the full UNet at 2 frames
//! 16×16). `localize` does that for every program, whether or not it passes: for a check that
//! ended in a CUDA error, whose context cannot run anything after it, the synchronisation after
//! each step names the step that faulted.
//!
//! `bench` times one UNet call (a CFG step: batch 2) in float16 with CUDA-graph replay and
//! eagerly, medians of CUDA-event times after warm-up, and reports build and load time, the
//! arena, the weights and the device memory in use; in channels-last also two side-by-side
//! comparisons: the float16 specialisation (frame-major motion modules, merged attention
//! projections) against the program as compiled, and the timed cuBLASLt algorithms against the
//! heuristic's first candidates.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use motionrt_runtime::engine::exec::{
    CudaDevice, GpuProgram, Precision, TacticCache, WeightData, WeightStore,
};
use motionrt_runtime::engine::launch::CONV_IGEMM_WIDTHS;
use motionrt_runtime::engine::localize::{reference_macs, Localizer};
use motionrt_runtime::engine::program::{self, InitializerSource, Layout};
use motionrt_runtime::engine::source::FileInitializers;
use motionrt_runtime::engine::{plan_graph, EngineError};
use motionrt_runtime::rng::NormalRng;
use motionrt_runtime::{error_stats, Input, OrtSession, OutputData, SessionOptions};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

struct Args {
    mode: String,
    model: PathBuf,
    graphs: Vec<String>,
    batch: usize,
    frames: usize,
    height: usize,
    width: usize,
    warmup: usize,
    repeats: usize,
    json: Option<PathBuf>,
    /// Layouts to compile with (`check` and `bench` run each).
    layouts: Vec<Layout>,
    /// Precisions `check` runs.
    precisions: Vec<Precision>,
    /// Whether `--graphs` was given (then each must exist).
    graphs_named: bool,
    /// `bench`: also the side-by-side A/B loads (specialisation, GEMM timing).
    ab: bool,
    /// `--no-kernel-tactics`: [`TacticCache::library_only`].
    library_only: bool,
}

fn parse() -> Res<Args> {
    let mut it = std::env::args().skip(1);
    let mode = it
        .next()
        .ok_or("usage: engine_gpu check|bench|localize --model DIR ...")?;
    let mut a = Args {
        mode,
        model: PathBuf::new(),
        graphs: vec![
            "unet".into(),
            "text_encoder".into(),
            "vae_decoder".into(),
            "vae_encoder".into(),
        ],
        batch: 2,
        frames: 3,
        height: 8,
        width: 8,
        warmup: 3,
        repeats: 10,
        json: None,
        layouts: vec![Layout::Nhwc, Layout::Nchw],
        precisions: vec![Precision::Fp32, Precision::Fp16],
        graphs_named: false,
        ab: true,
        library_only: false,
    };
    if a.mode == "bench" {
        a.frames = 16;
        a.height = 64;
        a.width = 64;
    }
    while let Some(k) = it.next() {
        if k == "--no-ab" {
            a.ab = false;
            continue;
        }
        if k == "--no-kernel-tactics" {
            a.library_only = true;
            continue;
        }
        let v = it.next().ok_or(format!("{k} needs a value"))?;
        match k.as_str() {
            "--model" => a.model = v.into(),
            "--graphs" => {
                a.graphs = v.split(',').map(String::from).collect();
                a.graphs_named = true;
            }
            "--precisions" => {
                a.precisions = v
                    .split(',')
                    .map(|p| match p {
                        "fp32" => Ok(Precision::Fp32),
                        "fp16" => Ok(Precision::Fp16),
                        _ => Err(format!("--precisions {p}: fp32 or fp16")),
                    })
                    .collect::<Result<_, _>>()?
            }
            "--batch" => a.batch = v.parse()?,
            "--frames" => a.frames = v.parse()?,
            "--height" => a.height = v.parse()?,
            "--width" => a.width = v.parse()?,
            "--warmup" => a.warmup = v.parse()?,
            "--repeats" => a.repeats = v.parse()?,
            "--json" => a.json = Some(v.into()),
            "--layout" => {
                a.layouts = v
                    .split(',')
                    .map(|l| Layout::parse(l).ok_or(format!("--layout {l}: nhwc or nchw")))
                    .collect::<Result<_, _>>()?
            }
            _ => return Err(format!("unknown argument {k}").into()),
        }
    }
    if a.repeats == 0 {
        return Err("--repeats must be at least 1".into());
    }
    Ok(a)
}

fn text_width(model: &Path) -> Res<usize> {
    let s = motionrt_onnx::summarize(&motionrt_onnx::load_model(&model.join("unet.onnx"))?);
    let i = s
        .inputs
        .iter()
        .find(|i| i.name == "encoder_hidden_states")
        .ok_or("no encoder_hidden_states")?;
    Ok(i.dims.last().ok_or("no dims")?.parse()?)
}

fn shapes(graph: &str, a: &Args, d: usize) -> Vec<(&'static str, Vec<usize>)> {
    let (b, f, h, w) = (a.batch, a.frames, a.height, a.width);
    match graph {
        "unet" => vec![
            ("sample", vec![b, 4, f, h, w]),
            ("timestep", vec![b]),
            ("encoder_hidden_states", vec![b * f, 77, d]),
        ],
        "text_encoder" => vec![("input_ids", vec![b, 77])],
        "vae_decoder" => vec![("latent", vec![b, 4, h, w])],
        _ => vec![("image", vec![1, 3, 8 * h, 8 * w])],
    }
}

fn seeded(inputs: &[(&str, Vec<usize>)]) -> Vec<(Vec<f32>, Vec<i64>)> {
    let mut rng = NormalRng::new(11);
    inputs
        .iter()
        .map(|(name, shape)| {
            let n = shape.iter().product::<usize>();
            match *name {
                "input_ids" => (Vec::new(), (0..n).map(|_| rng.below(100) as i64).collect()),
                "timestep" => (
                    [981.0, 21.0].into_iter().cycle().take(n).collect(),
                    Vec::new(),
                ),
                _ => {
                    let mut v = vec![0f32; n];
                    rng.fill(&mut v);
                    (v, Vec::new())
                }
            }
        })
        .collect()
}

fn weights_from<'a>(
    src: &'a FileInitializers,
    model: &motionrt_onnx::proto::ModelProto,
) -> impl Fn(&str) -> Result<WeightData, EngineError> + 'a {
    let f = weights_f32(src, model);
    move |n: &str| Ok(WeightData::F32(f(n)?))
}

fn weights_f32<'a>(
    src: &'a FileInitializers,
    model: &motionrt_onnx::proto::ModelProto,
) -> impl Fn(&str) -> Result<Vec<f32>, EngineError> + 'a {
    let inits: HashMap<String, motionrt_onnx::proto::TensorProto> = model
        .graph
        .as_ref()
        .unwrap()
        .initializer
        .iter()
        .map(|t| (t.name.clone(), t.clone()))
        .collect();
    move |n: &str| {
        let t = inits
            .get(n)
            .ok_or_else(|| EngineError::Graph(format!("no initializer {n}")))?;
        src.f32s(t)
    }
}

/// The most multiply-adds a CPU reference for [`localize`] may take (minutes, single-threaded).
const LOCALIZE_MACS: f64 = 2e11;

/// Run `gp` one step at a time against the float32 CPU interpretation of its program and print
/// where they part (`engine::localize`). `Ok(false)` when a step departs from the reference;
/// `Ok(true)` also when the reference would take too long (then nothing is compared).
fn localize(
    dev: &CudaDevice,
    gp: &mut GpuProgram,
    what: &str,
    weight: &dyn Fn(&str) -> Result<Vec<f32>, EngineError>,
    inputs: &[(&str, Vec<usize>)],
    data: &[(Vec<f32>, Vec<i64>)],
) -> Res<bool> {
    let macs = reference_macs(&gp.program);
    if macs > LOCALIZE_MACS {
        println!(
            "\n(no step-by-step comparison of {what}: its CPU reference is {macs:.1e} multiply-adds; \
             run `engine_gpu localize` at a smaller shape)\n"
        );
        return Ok(true);
    }
    let f: HashMap<String, Vec<f32>> = inputs
        .iter()
        .zip(data)
        .filter(|(i, _)| i.0 != "input_ids")
        .map(|(i, d)| (i.0.to_string(), d.0.clone()))
        .collect();
    let ids: HashMap<String, Vec<i64>> = inputs
        .iter()
        .zip(data)
        .filter(|(i, _)| i.0 == "input_ids")
        .map(|(i, d)| (i.0.to_string(), d.1.clone()))
        .collect();
    let t = Instant::now();
    let mut loc = Localizer::new(&gp.program, gp.precision, &f, &ids, weight)?;
    let t_ref = t.elapsed().as_secs_f64();
    let f_in: Vec<(&str, &[f32])> = f.iter().map(|(k, v)| (k.as_str(), &v[..])).collect();
    let i_in: Vec<(&str, &[i64])> = ids.iter().map(|(k, v)| (k.as_str(), &v[..])).collect();
    let traced = gp.trace(dev, &f_in, &i_in, &mut loc);
    println!("\n{}\n(CPU reference {t_ref:.1} s)", loc.report(what, 12));
    if let Err(e) = traced {
        println!("localize {what}: the step-by-step run stopped: {e}\n");
        return Err(e.into());
    }
    Ok(loc.clean())
}

fn check(a: &Args) -> Res<bool> {
    let dev = CudaDevice::open(0)?;
    println!(
        "device: {} (cc {}), {}, cuBLAS {}, cuDNN {}",
        dev.key.gpu_name, dev.key.compute_capability, dev.key.driver, dev.key.cublas, dev.key.cudnn
    );
    let d = text_width(&a.model)?;
    let tmp = tempfile::tempdir()?;
    let mut ok = true;
    let mut tactics = TacticCache {
        library_only: a.library_only,
        ..TacticCache::default()
    };
    println!("| graph | precision | mode | max|Δ|/max|ref| | cosine | nonfinite | pass |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for g in &a.graphs {
        let src_path = a.model.join(format!("{g}.onnx"));
        if !src_path.exists() {
            if a.graphs_named {
                println!("| {g} | | | {} is missing | | | FAIL |", src_path.display());
                ok = false;
            }
            continue;
        }
        let fused = tmp.path().join(format!("{g}.onnx"));
        plan_graph(&src_path, &fused)?;
        let inputs = shapes(g, a, d);
        let data = seeded(&inputs);
        // reference: ONNX Runtime on the CPU, float32, the exported graph as it is (the fusions'
        // CPU kernels are references, far slower than ONNX Runtime's own at full size; that the
        // fused graph computes the same is checked on the CPU, tests/engine_plan.rs)
        // (localize compares with the CPU interpretation of each program instead)
        let want: HashMap<String, Vec<f32>> = if a.mode == "localize" {
            HashMap::new()
        } else {
            let mut s = OrtSession::load(&src_path, &SessionOptions::default())?;
            let args: Vec<(&str, Input<'_>)> = inputs
                .iter()
                .zip(&data)
                .map(|((n, sh), (f, i))| {
                    (
                        *n,
                        if *n == "input_ids" {
                            Input::I64(sh, i)
                        } else {
                            Input::F32(sh, f)
                        },
                    )
                })
                .collect();
            let want = s
                .run_outputs(&args)?
                .into_iter()
                .filter_map(|o| match o.data {
                    OutputData::F32(v) => Some((o.name, v)),
                    _ => None,
                })
                .collect();
            drop(s);
            want
        };
        let model = motionrt_onnx::load_model(&fused)?;
        let init = FileInitializers::new(&fused);
        let f_in: Vec<(&str, &[f32])> = inputs
            .iter()
            .zip(&data)
            .filter(|(i, _)| i.0 != "input_ids")
            .map(|(i, d)| (i.0, d.0.as_slice()))
            .collect();
        let i_in: Vec<(&str, &[i64])> = inputs
            .iter()
            .zip(&data)
            .filter(|(i, _)| i.0 == "input_ids")
            .map(|(i, d)| (i.0, d.1.as_slice()))
            .collect();
        for &layout in &a.layouts {
            let prog = program::compile(&model, &inputs, &init, layout)?;
            for &precision in &a.precisions {
                let weight = weights_from(&init, &model);
                let mut gp =
                    match GpuProgram::load(&dev, prog.clone(), precision, &weight, &mut tactics) {
                        Ok(g) => g,
                        Err(e) => {
                            println!("| {g} | {precision:?} {layout:?} | load | {e} | | | FAIL |");
                            ok = false;
                            continue;
                        }
                    };
                let what = format!("{g} {precision:?} {layout:?}");
                let step_by_step = |gp: &mut GpuProgram| {
                    localize(&dev, gp, &what, &weights_f32(&init, &model), &inputs, &data)
                };
                if a.mode == "localize" {
                    ok &= step_by_step(&mut gp)?;
                    continue;
                }
                let ok_before = ok;
                for mode in ["eager", "graph"] {
                    if mode == "graph" {
                        gp.capture(&dev)?;
                    }
                    gp.poison(&dev)?;
                    let got = gp.run(&dev, &f_in, &i_in)?;
                    if got.len() != want.len() {
                        println!(
                            "| {g} | {precision:?} {layout:?} | {mode} | {} outputs, ONNX Runtime gave {} | | | FAIL |",
                            got.len(),
                            want.len()
                        );
                        ok = false;
                    }
                    for (name, _, o) in &got {
                        // by name: the exported and the fused graph may list outputs differently
                        let Some(r) = want.get(name) else {
                            println!(
                                "| {g}.{name} | {precision:?} {layout:?} | {mode} | ONNX Runtime has no float output {name} | | | FAIL |"
                            );
                            ok = false;
                            continue;
                        };
                        let st = error_stats(o, r);
                        let pass = match precision {
                            Precision::Fp32 => st.nonfinite == 0 && st.max_rel_to_ref_max <= 1e-4,
                            Precision::Fp16 => {
                                st.nonfinite == 0
                                    && st.max_rel_to_ref_max <= 1e-2
                                    && st.cosine >= 0.9999
                            }
                        };
                        ok &= pass;
                        println!(
                            "| {g}.{name} | {precision:?} {layout:?} | {mode} | {:.2e} | {:.6} | {} | {} |",
                            st.max_rel_to_ref_max,
                            st.cosine,
                            st.nonfinite,
                            if pass { "ok" } else { "FAIL" }
                        );
                    }
                }
                // Two runs in flight (what VAE decode does): the second is queued before the first
                // is collected; each must come back with its own outputs.
                let half: Vec<Vec<f32>> = f_in
                    .iter()
                    .map(|(_, v)| v.iter().map(|x| x * 0.5).collect())
                    .collect();
                let f_half: Vec<(&str, &[f32])> = f_in
                    .iter()
                    .zip(&half)
                    .map(|((n, _), v)| (*n, v.as_slice()))
                    .collect();
                let first = gp.run(&dev, &f_in, &i_in)?;
                let second = gp.run(&dev, &f_half, &i_in)?;
                let a = gp.submit(&dev, &f_in, &i_in)?;
                let b = gp.submit(&dev, &f_half, &i_in)?;
                let third = gp.submit(&dev, &f_in, &i_in).is_err();
                let (ga, gb) = (gp.collect(a)?, gp.collect(b)?);
                let mut worst = 0f64;
                for (x, y) in ga.iter().zip(&first).chain(gb.iter().zip(&second)) {
                    worst = worst.max(error_stats(&x.2, &y.2).max_rel_to_ref_max);
                }
                let pass = worst <= 1e-5 && third && a != b;
                ok &= pass;
                println!(
                    "| {g} (2 in flight) | {precision:?} {layout:?} | graph | {worst:.2e} | | | {} |",
                    if pass { "ok" } else { "FAIL" }
                );
                if ok_before && !ok {
                    step_by_step(&mut gp)?;
                }
                // the implicit-GEMM kernels, at both widths, on every convolution, GEGLU pair and
                // normalisation pair they compute (whichever the timing chose above),
                // eager
                if precision == Precision::Fp16 && layout == Layout::Nhwc {
                    drop(gp);
                    for bn in CONV_IGEMM_WIDTHS {
                        let mut forced = tactics
                            .forced_igemm(bn)
                            .forced_geglu(bn)
                            .forced_norm_pairs(bn)
                            .forced_attention_two();
                        let mut gk = match GpuProgram::load(
                            &dev,
                            prog.clone(),
                            precision,
                            &weight,
                            &mut forced,
                        ) {
                            Ok(g) => g,
                            Err(e) => {
                                println!("| {g} | {precision:?} {layout:?} | load, convolutions on conv_igemm_f16_n{bn}, GEGLU pairs on gemm_geglu_f16_n{bn}, normalisation pairs on conv_igemm_gn/_ln_f16_n{bn}, d = 40 attentions on attention_tiled2_f16_d40 | {e} | | | FAIL |");
                                ok = false;
                                continue;
                            }
                        };
                        if gk.conv_kernel_steps() == 0
                            && gk.geglu_kernel_pairs() == 0
                            && gk.norm_kernel_pairs() == 0
                            && gk.attention_two_steps() == 0
                        {
                            break;
                        }
                        gk.poison(&dev)?;
                        let got = gk.run(&dev, &f_in, &i_in)?;
                        for (name, _, o) in &got {
                            let Some(r) = want.get(name) else { continue };
                            let st = error_stats(o, r);
                            let pass = st.nonfinite == 0
                                && st.max_rel_to_ref_max <= 1e-2
                                && st.cosine >= 0.9999;
                            ok &= pass;
                            println!(
                                "| {g}.{name} | {precision:?} {layout:?} | eager, {} convolutions on conv_igemm_f16_n{bn}, {} GEGLU pairs on gemm_geglu_f16_n{bn}, {} normalisation pairs on conv_igemm_gn/_ln_f16_n{bn}, {} attentions on attention_tiled2_f16_d40 | {:.2e} | {:.6} | {} | {} |",
                                gk.conv_kernel_steps(),
                                gk.geglu_kernel_pairs(),
                                gk.norm_kernel_pairs(),
                                gk.attention_two_steps(),
                                st.max_rel_to_ref_max,
                                st.cosine,
                                st.nonfinite,
                                if pass { "ok" } else { "FAIL" }
                            );
                        }
                    }
                }
            }
        }
    }
    Ok(ok)
}

/// The median of `v` (not empty: `--repeats` is at least 1), which keeps its order.
fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn bench(a: &Args) -> Res<()> {
    let t0 = Instant::now();
    let dev = CudaDevice::open(0)?;
    let open_s = t0.elapsed().as_secs_f64();
    let d = text_width(&a.model)?;
    let tmp = tempfile::tempdir_in(a.model.parent().unwrap_or(Path::new(".")))?;
    let fused = tmp.path().join("unet.onnx");
    let t = Instant::now();
    plan_graph(&a.model.join("unet.onnx"), &fused)?;
    let fuse_s = t.elapsed().as_secs_f64();
    let inputs = shapes("unet", a, d);
    let data = seeded(&inputs);
    let model = motionrt_onnx::load_model(&fused)?;
    let init = FileInitializers::new(&fused);
    let mut results = Vec::new();
    println!(
        "{}",
        serde_json::json!({"open_s": open_s, "fuse_s": fuse_s, "device": dev.key.gpu_name})
    );
    // each layout in turn, in this one process: the ratio between them is side by side
    for &layout in &a.layouts {
        results.push(serde_json::json!({"open_s": open_s, "fuse_s": fuse_s}));
        bench_layout(
            a,
            &dev,
            layout,
            (&model, &init),
            &inputs,
            &data,
            &mut results,
        )?;
    }
    Ok(())
}

/// Write what is measured so far to `--json` (after each result, so that a run stopped later
/// keeps it): one layout's object, or a list of them.
fn save(a: &Args, results: &[serde_json::Value]) -> Res<()> {
    if let Some(p) = &a.json {
        let v = match results {
            [one] => one.clone(),
            _ => serde_json::Value::Array(results.to_vec()),
        };
        std::fs::write(p, serde_json::to_string_pretty(&v)?)?;
    }
    Ok(())
}

/// Time one layout; its results go into the last of `results` (saved as they come).
fn bench_layout(
    a: &Args,
    dev: &CudaDevice,
    layout: Layout,
    (model, init): (&motionrt_onnx::proto::ModelProto, &FileInitializers),
    inputs: &[(&str, Vec<usize>)],
    data: &[(Vec<f32>, Vec<i64>)],
    results: &mut [serde_json::Value],
) -> Res<()> {
    eprintln!("== layout {layout:?}");
    let t = Instant::now();
    let prog = program::compile(model, inputs, init, layout)?;
    let compile_s = t.elapsed().as_secs_f64();
    let mut tactics = TacticCache {
        library_only: a.library_only,
        ..TacticCache::default()
    };
    let weight = weights_from(init, model);
    let t = Instant::now();
    let gp = GpuProgram::load(dev, prog.clone(), Precision::Fp16, &weight, &mut tactics)?;
    dev.stream.synchronize()?;
    let build_load_s = t.elapsed().as_secs_f64();
    // a second load with the tactics now cached: no timing, the same choices
    let t = Instant::now();
    let before = tactics.clone();
    drop(gp);
    let prog_for_ab = prog.clone();
    let mut gp = GpuProgram::load(dev, prog, Precision::Fp16, &weight, &mut tactics)?;
    dev.stream.synchronize()?;
    let load_cached_s = t.elapsed().as_secs_f64();
    let deterministic = before == tactics;
    let f_in: Vec<(&str, &[f32])> = inputs
        .iter()
        .zip(data)
        .map(|(i, d)| (i.0, d.0.as_slice()))
        .collect();
    gp.set_inputs(dev, &f_in, &[])?;
    let time_it = |gp: &mut GpuProgram, n: usize| -> Res<Vec<f64>> {
        let mut v = Vec::new();
        for _ in 0..n {
            let e0 = dev
                .stream
                .record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))?;
            gp.execute(dev)?;
            let e1 = dev
                .stream
                .record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))?;
            e1.synchronize()?;
            v.push(e0.elapsed_ms(&e1)? as f64);
        }
        Ok(v)
    };
    time_it(&mut gp, a.warmup)?;
    let eager = time_it(&mut gp, a.repeats)?;
    let t = Instant::now();
    gp.capture(dev)?;
    let capture_s = t.elapsed().as_secs_f64();
    time_it(&mut gp, a.warmup)?;
    let graph = time_it(&mut gp, a.repeats)?;
    let out = gp.outputs(dev)?;
    let nonfinite = out[0].2.iter().filter(|x| !x.is_finite()).count();
    // device memory in use now: context, libraries, weights, arena, workspaces (the engine
    // allocates everything at load, so this is its peak too)
    let (free, total_mem) = dev.ctx.mem_get_info()?;
    // where the time goes: every step timed eagerly, summed by label
    let prof = gp.profile(dev)?;
    let total: f64 = prof.iter().map(|p| p.1).sum();
    let mut sums: HashMap<String, (f64, usize)> = HashMap::new();
    for (l, ms) in &prof {
        let e = sums.entry(l.clone()).or_default();
        e.0 += ms;
        e.1 += 1;
    }
    let mut sums: Vec<_> = sums.into_iter().collect();
    sums.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0));
    eprintln!(
        "profile (eager, per step): {total:.1} ms in {} steps",
        prof.len()
    );
    for (l, (ms, n)) in &sums {
        eprintln!("  {ms:8.2} ms  {:5.1}%  {n:4}x  {l}", 100.0 * ms / total);
    }
    let steps = gp.program.steps.len();
    let mut by_kind: HashMap<&str, usize> = HashMap::new();
    for s in &gp.program.steps {
        *by_kind.entry(s.name()).or_default() += 1;
    }
    let r = results
        .last_mut()
        .expect("the caller pushed this layout's entry");
    let head = serde_json::json!({
        "impl": "motionrt-engine-fp16",
        "layout": format!("{layout:?}").to_lowercase(),
        "device": dev.key.gpu_name,
        "shape": [a.batch, 4, a.frames, a.height, a.width],
        "graph_median_ms": median(&graph),
        "graph_ms": graph,
        "eager_median_ms": median(&eager),
        "eager_ms": eager,
        "steps": steps,
        "steps_by_kind": by_kind,
        "profile_total_ms": total,
        "profile_ms_by_label": sums.iter().take(40).map(|(l, (ms, n))| serde_json::json!([l, ms, n])).collect::<Vec<_>>(),
        "arena_mib": gp.memory.arena_bytes as f64 / 1048576.0,
        "arena_unshared_mib": gp.memory.unshared_bytes as f64 / 1048576.0,
        "weights_mib": gp.device_weight_bytes() as f64 / 1048576.0,
        "device_used_mib": (total_mem - free) as f64 / 1048576.0,
        "compile_s": compile_s,
        "build_load_s": build_load_s,
        "load_cached_s": load_cached_s,
        "capture_s": capture_s,
        "tactics_deterministic": deterministic,
        "kernel_tactics": !a.library_only,
        "conv_tactics": tactics.conv.len(),
        // the implicit-GEMM kernels against cuDNN's choice, per problem where they apply: [problem,
        // cuDNN ms, the faster tile width's ms, that width, chosen] (times of one call: cuDNN's
        // own measurement, the kernel's mean of 5)
        "conv_igemm": tactics
            .conv
            .iter()
            .filter_map(|(k, t)| {
                t.igemm_ms
                    .map(|ms| serde_json::json!([k, t.ms, ms, t.igemm_n, t.igemm().is_some()]))
            })
            .collect::<Vec<_>>(),
        "gemm_tactics": tactics.gemm.len(),
        // the projection-with-GEGLU kernel against cuBLASLt's matmul and `geglu`, per problem:
        // [problem, the two steps' ms, the faster tile width's ms, that width, chosen] (means of 5)
        "gemm_geglu": tactics
            .geglu
            .iter()
            .map(|(k, t)| serde_json::json!([k, t.ms, t.fused_ms, t.fused_n, t.fused().is_some()]))
            .collect::<Vec<_>>(),
        "geglu_pairs_on_kernel": gp.geglu_kernel_pairs(),
        // a GroupNorm's or LayerNorm's pass folded into the GEMM after it, against the two steps,
        // per problem: [problem, the two steps' ms, the faster tile width's ms, that width,
        // chosen] (means of 5)
        "norm_gemm": tactics
            .norm_pair
            .iter()
            .map(|(k, t)| serde_json::json!([k, t.ms, t.fused_ms, t.fused_n, t.fused().is_some()]))
            .collect::<Vec<_>>(),
        "norm_pairs_on_kernel": gp.norm_kernel_pairs(),
        // the two-tile attention kernel against the one-tile kernel, per d = 40 problem:
        // [problem, one-tile ms, two-tile ms, chosen] (means of 5)
        "attention_two": tactics
            .attention
            .iter()
            .map(|(k, t)| serde_json::json!([k, t.ms, t.two_ms, t.two()]))
            .collect::<Vec<_>>(),
        "attentions_on_two_tiles": gp.attention_two_steps(),
        "output_nonfinite": nonfinite,
    });
    for (k, v) in head.as_object().expect("an object") {
        r[k] = v.clone();
    }
    // the headline first, in case the side-by-side loads below run out of time
    println!("{}", serde_json::to_string(&head)?);
    save(a, results)?;
    if layout != Layout::Nhwc || !a.ab {
        return Ok(());
    }
    // what the float16 specialisation gives (motion modules on frame-major rows, merged attention
    // projections): the program as compiled, graph replay timed right after (tactics cached),
    // then the specialised one again; and what timing the GEMM algorithms gives: the specialised
    // program running cuBLASLt's first candidate for every GEMM instead of the timed choice
    drop(gp);
    // the specialised program's GEMM problems (the as-compiled load below adds its own)
    let specialised_gemms = tactics.gemm.clone();
    let runs = |specialise: bool, tactics: &mut TacticCache| -> Res<f64> {
        let mut g = GpuProgram::load_with(
            dev,
            prog_for_ab.clone(),
            Precision::Fp16,
            &weight,
            tactics,
            specialise,
            WeightStore::shared(),
        )?;
        g.set_inputs(dev, &f_in, &[])?;
        g.capture(dev)?;
        time_it(&mut g, a.warmup)?;
        Ok(median(&time_it(&mut g, a.repeats)?))
    };
    let compiled = runs(false, &mut tactics)?;
    let special = runs(true, &mut tactics)?;
    eprintln!(
        "float16 specialisation (frame-major motion modules, merged projections): {special:.2} ms, as compiled: {compiled:.2} ms ({:.3}x)",
        compiled / special
    );
    let ab = serde_json::json!({
        "specialised_graph_median_ms": special,
        "as_compiled_graph_median_ms": compiled,
        "specialised_steps": steps,
        "as_compiled_steps": prog_for_ab.steps.len(),
    });
    println!(
        "{}",
        serde_json::to_string(&serde_json::json!({ "specialisation_ab": ab }))?
    );
    results.last_mut().expect("this layout's entry")["specialisation_ab"] = ab;
    save(a, results)?;
    let mut first = tactics.heuristic_gemms();
    let heuristic = runs(true, &mut first)?;
    let timed = runs(true, &mut tactics)?;
    let differ = specialised_gemms
        .values()
        .filter(|t| t.algo != t.heuristic_first)
        .count();
    eprintln!(
        "GEMM algorithms timed: {timed:.2} ms, cuBLASLt's first candidates: {heuristic:.2} ms ({:.3}x; {differ} of {} problems chose another)",
        heuristic / timed,
        specialised_gemms.len()
    );
    let ab = serde_json::json!({
        "timed_graph_median_ms": timed,
        "heuristic_first_graph_median_ms": heuristic,
        "gemm_problems": specialised_gemms.len(),
        "problems_choosing_another": differ,
    });
    println!(
        "{}",
        serde_json::to_string(&serde_json::json!({ "gemm_timing_ab": ab }))?
    );
    results.last_mut().expect("this layout's entry")["gemm_timing_ab"] = ab;
    save(a, results)?;
    if a.library_only {
        return Ok(());
    }
    // what motionrt's implicit-GEMM kernels give where they timed faster: every convolution on
    // cuDNN instead, then every GEGLU pair as a cuBLASLt matmul and `geglu`, then every
    // normalisation pair as two steps, side by side
    let on_igemm = tactics.conv.values().filter(|t| t.igemm().is_some());
    let on_geglu = tactics.geglu.values().filter(|t| t.fused().is_some());
    let on_gn = tactics.norm_pair.values().filter(|t| t.fused().is_some());
    let on_two = tactics.attention.values().filter(|t| t.two());
    let kernels = [
        (
            "conv_kernel_ab",
            "convolutions",
            "conv_igemm_f16",
            "on cuDNN",
            "cudnn_only_graph_median_ms",
            on_igemm.count(),
            tactics.conv.len(),
            tactics.cudnn_convs(),
        ),
        (
            "geglu_kernel_ab",
            "GEGLU pairs",
            "gemm_geglu_f16",
            "as two steps",
            "two_steps_graph_median_ms",
            on_geglu.count(),
            tactics.geglu.len(),
            tactics.unfused_geglu(),
        ),
        (
            "norm_kernel_ab",
            "normalisation pairs",
            "conv_igemm_gn/_ln_f16",
            "as two steps",
            "two_steps_graph_median_ms",
            on_gn.count(),
            tactics.norm_pair.len(),
            tactics.unfused_norm_pairs(),
        ),
        (
            "attention_two_ab",
            "d = 40 attentions",
            "attention_tiled2_f16_d40",
            "on attention_tiled_f16_d40",
            "one_tile_graph_median_ms",
            on_two.count(),
            tactics.attention.len(),
            tactics.one_tile_attention(),
        ),
    ];
    for (key, what, kernel, other, other_key, chosen, problems, mut alt) in kernels {
        let without = runs(true, &mut alt)?;
        let timed = runs(true, &mut tactics)?;
        eprintln!(
            "{what} as timed ({chosen} of {problems} problems on {kernel}): {timed:.2} ms, all {other}: {without:.2} ms ({:.3}x)",
            without / timed
        );
        let ab = serde_json::json!({
            "timed_graph_median_ms": timed,
            other_key: without,
            "problems": problems,
            "problems_on_kernel": chosen,
        });
        println!(
            "{}",
            serde_json::to_string(&serde_json::json!({ key: ab }))?
        );
        results.last_mut().expect("this layout's entry")[key] = ab;
        save(a, results)?;
    }
    Ok(())
}

fn main() {
    let a = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let r = match a.mode.as_str() {
        "check" | "localize" => check(&a).map(|ok| if ok { 0 } else { 1 }),
        "bench" => bench(&a).map(|_| 0),
        m => Err(format!("unknown mode {m}").into()),
    };
    match r {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
