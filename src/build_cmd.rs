//! `motionrt build`: the engine builder. On a machine with an NVIDIA GPU it writes the native CUDA
//! engine (fused graphs, weights converted once, convolution and GEMM algorithms timed on this GPU, memory
//! plans at the optimization profiles, keyed by GPU and versions); `--plan-only` fuses the graphs
//! on any machine.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use motionrt_runtime::engine::{plan_graph, GraphPlan};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// Native CUDA engine (cuBLASLt, cuDNN, motionrt's NVRTC kernels).
    Cuda,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EnginePrecision {
    Fp16,
    Fp32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EngineLayout {
    /// Channels-last around convolutions: cuDNN's NHWC tensor-core kernels, 1×1 convolutions as
    /// GEMMs, no transposes into and out of the transformers' token layout.
    Nhwc,
    /// NCHW everywhere (for comparison).
    Nchw,
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// A model directory written by `motionrt export` (float32: the builder converts weights itself).
    #[arg(long)]
    pub model: PathBuf,
    /// The engine backend.
    #[arg(long, value_enum, default_value_t = Backend::Cuda)]
    pub backend: Backend,
    /// Engine precision (weights converted once at build time). With --plan-only it is only recorded in
    /// plan.json: the fused graphs stay float32.
    #[arg(long, value_enum, default_value_t = EnginePrecision::Fp16)]
    pub precision: EnginePrecision,
    /// Activation layout around convolutions.
    #[arg(long, value_enum, default_value_t = EngineLayout::Nhwc, conflicts_with = "plan_only")]
    pub layout: EngineLayout,
    /// Where to write: the engine file, or with --plan-only a model directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Plan without a GPU: apply the engine's fusions (GroupNorm+SiLU, Linear with bias/residual
    /// epilogues, GEGLU, attention) and write the fused graphs (float32) with model.json, the
    /// tokenizer and plan.json to --out. `motionrt run --model OUT` runs them on ONNX Runtime,
    /// which is how the fusions are checked against the exported graphs. The engine's own
    /// settings (--layout, the shapes, --vae-chunk, --timing-cache, --no-kernel-tactics) do not
    /// apply and are refused.
    #[arg(long)]
    pub plan_only: bool,
    /// Replace --out if it exists.
    #[arg(long)]
    pub overwrite: bool,
    /// Smallest shape the engine must run, BATCHxFRAMESxHEIGHTxWIDTH in pixels (batch before CFG).
    #[arg(
        long = "min-shape",
        default_value = "1x8x256x256",
        conflicts_with = "plan_only"
    )]
    pub min_shape: String,
    /// The shape the convolution and GEMM algorithms are timed at.
    #[arg(
        long = "opt-shape",
        default_value = "1x16x512x512",
        conflicts_with = "plan_only"
    )]
    pub opt_shape: String,
    /// Largest shape the engine must run [default: 1x32x768x768, its frames lowered to a
    /// motion module's positional table where that is shorter, as AnimateDiff v1's 24 are].
    #[arg(long = "max-shape", conflicts_with = "plan_only")]
    pub max_shape: Option<String>,
    /// Frames per VAE decoder call the engine is planned for (`run --decode-chunk`). At the opt
    /// shape it must keep the VAE's tensors within 2^31 - 1 elements (the build says how many
    /// frames fit); at larger shapes `run` decodes as many a call as fit.
    #[arg(long = "vae-chunk", default_value_t = 16, conflicts_with = "plan_only")]
    pub vae_chunk: usize,
    /// Timing cache (JSON): read when it exists, written after the build. Building again with the
    /// same cache makes the same choices, so the same engine. Like the engine it is keyed to this
    /// GPU and its driver and library versions: one timed elsewhere is not used (and is rewritten).
    /// `run --engine --timing-cache` reads and extends the same file.
    #[arg(long = "timing-cache", conflicts_with = "plan_only")]
    pub timing_cache: Option<PathBuf>,
    /// Time and use only cuDNN's and cuBLASLt's algorithms: motionrt's own tactic kernels (the
    /// implicit-GEMM convolution, the projection with GEGLU, GroupNorm/LayerNorm folded into the
    /// GEMM after them, two-tile attention) are not tried. By default each is timed against the
    /// libraries per problem and kept only where faster; this flag is for a GPU where one of them
    /// misbehaves. The engine remembers it: `run --engine` then times none for new shapes.
    #[arg(long = "no-kernel-tactics", conflicts_with = "plan_only")]
    pub no_kernel_tactics: bool,
}

fn build_engine(a: &BuildArgs, profiles: motionrt_runtime::engine::file::Profiles) -> Result<()> {
    use motionrt_runtime::engine::exec::{CudaDevice, Precision, TacticCache, TimingCache};
    use motionrt_runtime::engine::file;
    use motionrt_runtime::engine::program::Layout;
    let precision = match a.precision {
        EnginePrecision::Fp16 => Precision::Fp16,
        EnginePrecision::Fp32 => Precision::Fp32,
    };
    let dev =
        CudaDevice::open(0).context("the native CUDA engine is built on the GPU it will run on")?;
    eprintln!(
        "building for {} (cc {}), {}, cuBLAS {}, cuBLASLt {}, cuDNN {}",
        dev.key.gpu_name,
        dev.key.compute_capability,
        dev.key.driver,
        dev.key.cublas,
        dev.key.cublaslt,
        dev.key.cudnn
    );
    let mut tactics = match &a.timing_cache {
        Some(p) => {
            let (t, note) = TimingCache::load_for(p, &dev.key)?;
            if let Some(n) = note {
                eprintln!("note: {n}");
            }
            t
        }
        None => TacticCache::default(),
    };
    // this build's choice, not the cache's
    if tactics.library_only && !a.no_kernel_tactics {
        eprintln!(
            "note: the timing cache was written by a build with --no-kernel-tactics: its problems \
             keep cuDNN's and cuBLASLt's algorithms (motionrt's kernels are timed only with the \
             libraries'); a new cache times them"
        );
    }
    tactics.library_only = a.no_kernel_tactics;
    if a.no_kernel_tactics {
        eprintln!("--no-kernel-tactics: cuDNN's and cuBLASLt's algorithms only");
    }
    // (an engine at --out, with --overwrite, is replaced once the new one is complete)
    let t = std::time::Instant::now();
    let m = file::build(
        &dev,
        &a.model,
        &a.out,
        precision,
        match a.layout {
            EngineLayout::Nhwc => Layout::Nhwc,
            EngineLayout::Nchw => Layout::Nchw,
        },
        &profiles,
        a.vae_chunk,
        &mut tactics,
        &mut |g, msg| eprintln!("{g:>13}: {msg}"),
    )
    .with_context(|| format!("building {}", a.out.display()))?;
    if let Some(p) = &a.timing_cache {
        TimingCache {
            device: dev.key.clone(),
            tactics,
        }
        .write(p)?;
    }
    for g in &m.graphs {
        eprintln!(
            "{:>13}: {} steps, {:.0} MiB weights, arena {} MiB at opt (min {}, max {}; {} MiB without reuse)",
            g.name,
            g.steps,
            g.weight_bytes as f64 / 1048576.0,
            g.arena_bytes["opt"] >> 20,
            g.arena_bytes["min"] >> 20,
            g.arena_bytes["max"] >> 20,
            g.arena_unshared_bytes >> 20
        );
    }
    let g = &m.tactics.gemm;
    let other = g.values().filter(|t| t.algo != t.heuristic_first).count();
    let (chosen, first): (f64, f64) = g
        .values()
        .filter_map(|t| Some((t.ms as f64, t.heuristic_first_ms? as f64)))
        .fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
    let on = |n: Option<usize>| n.is_some() as usize;
    eprintln!(
        "wrote {} in {:.1} s ({} convolution algorithms chosen, {} of them on motionrt's \
         conv_igemm; {} GEMM problems, {other} of them faster with another than cuBLASLt's first \
         candidate: {chosen:.2} ms against {first:.2} ms, one call of each; {} of {} GEGLU \
         problems on motionrt's gemm_geglu; {} of {} normalisation + GEMM problems on \
         motionrt's conv_igemm_gn/_ln)",
        a.out.display(),
        t.elapsed().as_secs_f64(),
        m.tactics.conv.len(),
        // (by problem, as the engine decides: none with --no-kernel-tactics)
        m.tactics
            .conv
            .keys()
            .map(|k| on(m.tactics.conv_kernel(k)))
            .sum::<usize>(),
        g.len(),
        m.tactics
            .geglu
            .keys()
            .map(|k| on(m.tactics.geglu_kernel(k)))
            .sum::<usize>(),
        m.tactics.geglu.len(),
        m.tactics
            .norm_pair
            .keys()
            .map(|k| on(m.tactics.norm_kernel(k)))
            .sum::<usize>(),
        m.tactics.norm_pair.len(),
    );
    Ok(())
}

const DEFAULT_MAX_SHAPE: &str = "1x32x768x768";

/// The optimization profiles of `--min-shape`/`--opt-shape`/`--max-shape`: each parsed, in
/// order, and the frames within the motion module's positional table.
fn profiles(a: &BuildArgs) -> Result<motionrt_runtime::engine::file::Profiles> {
    use motionrt_runtime::engine::file::{Profile, Profiles};
    let parse =
        |flag: &str, s: &str| Profile::parse(s).map_err(|e| anyhow::anyhow!("--{flag} {e}"));
    let mut p = Profiles {
        min: parse("min-shape", &a.min_shape)?,
        opt: parse("opt-shape", &a.opt_shape)?,
        max: parse(
            "max-shape",
            a.max_shape.as_deref().unwrap_or(DEFAULT_MAX_SHAPE),
        )?,
    };
    let info = motionrt_runtime::pipeline::ModelInfo::load(&a.model)?;
    if let Some(max) = info.max_frames {
        if p.max.frames > max && a.max_shape.is_none() {
            if !a.plan_only {
                eprintln!(
                    "note: the default --max-shape's frames lowered from {} to {max}, the motion module's positional table",
                    p.max.frames
                );
            }
            p.max.frames = max;
        }
        if p.max.frames > max {
            bail!(
                "--max-shape {}: {} frames exceed the motion module's positional table ({max} frames per UNet call)",
                a.max_shape.as_deref().unwrap_or(DEFAULT_MAX_SHAPE),
                p.max.frames
            );
        }
    }
    if !Profile::contains(&p.min, &p.max, &p.opt) {
        bail!("--opt-shape must lie between --min-shape and --max-shape (each of its batch, frames, height and width)");
    }
    Ok(p)
}

const GRAPHS: [&str; 4] = ["text_encoder", "unet", "vae_decoder", "vae_encoder"];

pub fn build(a: BuildArgs) -> Result<()> {
    // plan.json and engine.json record both
    crate::utf8_path("--model", &a.model)?;
    crate::utf8_path("--out", &a.out)?;
    if !a.model.join("model.json").is_file() {
        bail!(
            "{}: no model.json; --model takes a directory written by `motionrt export`",
            a.model.display()
        );
    }
    if a.vae_chunk == 0 {
        bail!("--vae-chunk must be at least 1 (frames per VAE decoder call)");
    }
    let profiles = profiles(&a)?;
    if a.out.exists() && !a.overwrite {
        bail!(
            "{}: exists (pass --overwrite to replace it)",
            a.out.display()
        );
    }
    // --overwrite replaces an earlier engine or plan (or an empty folder), never anything else
    // a mistyped --out might name
    let replaceable =
        motionrt_export::export::replaceable_output(&a.out, &["engine.json", "plan.json"]);
    if a.out.exists() && !replaceable {
        bail!(
            "{}: exists and is not a motionrt engine (engine.json) or plan (plan.json), nor an empty folder: --overwrite replaces only those; choose another --out or remove it yourself",
            a.out.display()
        );
    }
    if !a.plan_only {
        return build_engine(&a, profiles);
    }
    let parent = a
        .out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| parent.display().to_string())?;
    let tmp = tempfile::Builder::new()
        .prefix(".motionrt-build-")
        .tempdir_in(parent)
        .with_context(|| parent.display().to_string())?;
    let _unfinished = motionrt_kernels::unfinished::register(tmp.path());
    let mut plans = Vec::new();
    for g in GRAPHS {
        let src = a.model.join(format!("{g}.onnx"));
        if !src.is_file() {
            continue;
        }
        let t = std::time::Instant::now();
        let report = plan_graph(&src, &tmp.path().join(format!("{g}.onnx")))?;
        let fused: Vec<String> = report
            .fused
            .iter()
            .map(|(k, v)| format!("{v} {k}"))
            .collect();
        eprintln!(
            "{g:<13} {:>5} → {:>5} nodes  ({:.1} s)  {}",
            report.nodes_before,
            report.nodes_after,
            t.elapsed().as_secs_f64(),
            if fused.is_empty() {
                "no fusions".into()
            } else {
                fused.join(", ")
            }
        );
        plans.push(GraphPlan {
            graph: g.into(),
            source: src,
            fusions: report,
        });
    }
    if plans.is_empty() {
        bail!(
            "{}: no graphs ({}.onnx)",
            a.model.display(),
            GRAPHS.join(".onnx, ")
        );
    }
    // Everything else the model directory holds (model.json, tokenizer/) comes along.
    copy_rest(&a.model, tmp.path())?;
    let plan = serde_json::json!({
        "format": "motionrt.plan/1",
        "model": a.model,
        "backend": format!("{:?}", a.backend).to_lowercase(),
        "precision": format!("{:?}", a.precision).to_lowercase(),
        "graphs": plans,
    });
    std::fs::write(
        tmp.path().join("plan.json"),
        serde_json::to_string_pretty(&plan)?,
    )?;
    let tmp = tmp.keep();
    // the earlier plan goes and the new one comes whole, or not at all if interrupted
    motionrt_kernels::unfinished::commit(|| -> Result<()> {
        if a.out.exists() {
            std::fs::remove_dir_all(&a.out).with_context(|| a.out.display().to_string())?;
        }
        std::fs::rename(&tmp, &a.out).with_context(|| a.out.display().to_string())?;
        Ok(())
    })?;
    println!("wrote {} (fused graphs, plan.json)", a.out.display());
    Ok(())
}

fn copy_rest(from: &Path, to: &Path) -> Result<()> {
    for e in std::fs::read_dir(from).with_context(|| from.display().to_string())? {
        let e = e?;
        let name = e.file_name();
        let n = name.to_string_lossy();
        if n.ends_with(".onnx") || n.ends_with(".onnx.data") || n.starts_with('.') {
            continue;
        }
        let dst = to.join(&name);
        if e.file_type()?.is_dir() {
            // (not create_dir_all: an interrupted build's removed folder is not made again)
            std::fs::create_dir(&dst)?;
            copy_rest(&e.path(), &dst)?;
        } else {
            std::fs::copy(e.path(), &dst).with_context(|| e.path().display().to_string())?;
        }
    }
    Ok(())
}
