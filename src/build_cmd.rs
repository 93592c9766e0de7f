//! `motionrt build`: the engine builder. Today it plans (fuses) the graphs on any machine; the
//! native CUDA engine itself (tactic timing, the engine file, the executor) is not built yet.

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
    /// Where to write: the engine file, or with --plan-only a model directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Plan without a GPU: apply the engine's fusions (GroupNorm+SiLU, Linear with bias/residual
    /// epilogues, GEGLU, attention) and write the fused graphs (float32) with model.json, the
    /// tokenizer and plan.json to --out. `motionrt run --model OUT` runs them on ONNX Runtime,
    /// which is how the fusions are checked against the exported graphs.
    #[arg(long)]
    pub plan_only: bool,
    /// Replace --out if it exists.
    #[arg(long)]
    pub overwrite: bool,
}

const GRAPHS: [&str; 4] = ["text_encoder", "unet", "vae_decoder", "vae_encoder"];

pub fn build(a: BuildArgs) -> Result<()> {
    if !a.plan_only {
        bail!(
            "the native {:?} engine (tactic timing on the GPU, the fp16 engine file, the CUDA executor) is not implemented yet; \
             `motionrt build --plan-only` writes the fused graphs and the build plan, and `motionrt probe` lists the CUDA libraries this machine has",
            a.backend
        );
    }
    if !a.model.join("model.json").is_file() {
        bail!(
            "{}: no model.json; --model takes a directory written by `motionrt export`",
            a.model.display()
        );
    }
    if a.out.exists() && !a.overwrite {
        bail!(
            "{}: exists (pass --overwrite to replace it)",
            a.out.display()
        );
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
    if a.out.exists() {
        std::fs::remove_dir_all(&a.out).with_context(|| a.out.display().to_string())?;
    }
    let tmp = tmp.keep();
    std::fs::rename(&tmp, &a.out).with_context(|| a.out.display().to_string())?;
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
            std::fs::create_dir_all(&dst)?;
            copy_rest(&e.path(), &dst)?;
        } else {
            std::fs::copy(e.path(), &dst).with_context(|| e.path().display().to_string())?;
        }
    }
    Ok(())
}
