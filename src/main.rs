//! The `motionrt` command line: parse, call the libraries, print.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use motionrt_export::config::MotionVersion;
use motionrt_export::export::{export, ExportOptions, ExternalData, Progress};
use motionrt_export::graph::unet::Semantics;
use motionrt_export::graph::Precision;

#[derive(Parser)]
#[command(
    name = "motionrt",
    version,
    about = "Deploy AnimateDiff-family text-to-video models: export checkpoints to ONNX, inspect them, run them.",
    long_about = "Deploy AnimateDiff-family text-to-video models.\n\n\
        motionrt turns Stable Diffusion 1.5 UNets inflated with AnimateDiff motion modules (v1/v2/v3) into ONNX \
        graphs that ONNX Runtime (and TensorRT) can run as they are.\n\n\
        Start with `motionrt demo`: it writes a tiny random-weight model in the real file layouts, exports it and runs it."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum PrecisionArg {
    Fp32,
    Fp16,
}

#[derive(Clone, Copy, ValueEnum)]
enum SemanticsArg {
    /// The original AnimateDiff: motion-module GroupNorm per frame (v1: cross-frame GroupNorm in the ResNets).
    Official,
    /// diffusers' UNetMotionModel: motion-module GroupNorm across frames.
    Diffusers,
}

#[derive(Clone, Copy, ValueEnum)]
enum ExternalArg {
    /// External data file when the weights exceed 1 GiB.
    Auto,
    Always,
    Never,
}

#[derive(Subcommand)]
enum Command {
    /// Export the AnimateDiff UNet (SD1.5 UNet + motion modules) to DIR/unet.onnx and DIR/model.json.
    Export {
        /// The UNet: a diffusers model folder (`unet/config.json` + weights, or the pipeline folder) or an original
        /// single-file SD1.5 checkpoint (.safetensors/.ckpt with `model.diffusion_model.*` keys).
        #[arg(long)]
        unet: PathBuf,
        /// The motion module: an original AnimateDiff file (mm_sd_v15.ckpt, mm_sd_v15_v2.ckpt, v3_sd15_mm.ckpt;
        /// .ckpt or .safetensors) or a diffusers MotionAdapter folder. The version is detected from the keys.
        #[arg(long = "motion-module")]
        motion_module: Option<PathBuf>,
        /// Output directory (must not exist unless --overwrite).
        #[arg(long)]
        out: PathBuf,
        /// Weight and compute precision of the graph (inputs and outputs stay float32).
        #[arg(long, value_enum, default_value = "fp32")]
        precision: PrecisionArg,
        /// Which implementation's normalisation to reproduce.
        #[arg(long, value_enum, default_value = "official")]
        semantics: SemanticsArg,
        /// Where the weights go.
        #[arg(long = "external-data", value_enum, default_value = "auto")]
        external_data: ExternalArg,
        /// Replace DIR if it exists.
        #[arg(long)]
        overwrite: bool,
        /// The VAE (exported as vae_decoder.onnx + vae_encoder.onnx): a diffusers pipeline or `vae` folder, or an
        /// original single file (`first_stage_model.*`). Default: the one inside --unet, if any.
        #[arg(long)]
        vae: Option<PathBuf>,
        /// The CLIP text encoder (exported as text_encoder.onnx): a diffusers pipeline or `text_encoder` folder,
        /// or an original single file (`cond_stage_model.transformer.*`). Default: the one inside --unet, if any.
        #[arg(long = "text-encoder")]
        text_encoder: Option<PathBuf>,
        /// config.json for a single-file --vae (default: inferred from the shapes, 32 GroupNorm groups).
        #[arg(long = "vae-config")]
        vae_config: Option<PathBuf>,
        /// config.json for a single-file --text-encoder (default: inferred from the shapes, 64-wide heads).
        #[arg(long = "text-encoder-config")]
        text_encoder_config: Option<PathBuf>,
        /// The tokenizer, copied to DIR/tokenizer: a folder with vocab.json + merges.txt (or a pipeline folder
        /// with tokenizer/), or the original bpe_simple_vocab_16e6.txt.gz. Default: --unet's tokenizer/, if any.
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// Export the UNet only, even when --unet holds a VAE and text encoder.
        #[arg(long = "unet-only")]
        unet_only: bool,
        /// Print model.json to stdout instead of a summary.
        #[arg(long)]
        json: bool,
    },
    /// Describe a checkpoint (kind, AnimateDiff version, layout, tensors, parameters, dtypes) or an ONNX file
    /// (inputs, outputs, opsets, node counts by op type).
    Inspect {
        path: PathBuf,
        /// Machine-readable output on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Write a tiny random-weight AnimateDiff model in the real layouts, export it, and run one UNet step on
    /// ONNX Runtime (CPU), printing per-stage timings.
    Demo {
        /// Working directory; its model and export are replaced on each run (default: $TMPDIR/motionrt-demo).
        #[arg(long)]
        dir: Option<PathBuf>,
        #[arg(long, default_value_t = 8)]
        frames: usize,
        #[arg(long, default_value_t = 64)]
        height: usize,
        #[arg(long, default_value_t = 64)]
        width: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Export {
            unet,
            motion_module,
            out,
            precision,
            semantics,
            external_data,
            overwrite,
            vae,
            text_encoder,
            vae_config,
            text_encoder_config,
            tokenizer,
            unet_only,
            json,
        } => {
            let opts = ExportOptions {
                unet,
                motion_module,
                out,
                overwrite,
                vae,
                text_encoder,
                vae_config,
                text_encoder_config,
                tokenizer,
                unet_only,
                precision: match precision {
                    PrecisionArg::Fp32 => Precision::Fp32,
                    PrecisionArg::Fp16 => Precision::Fp16,
                },
                semantics: match semantics {
                    SemanticsArg::Official => Semantics::Official,
                    SemanticsArg::Diffusers => Semantics::Diffusers,
                },
                external_data: match external_data {
                    ExternalArg::Auto => ExternalData::Auto,
                    ExternalArg::Always => ExternalData::Always,
                    ExternalArg::Never => ExternalData::Never,
                },
            };
            let t0 = Instant::now();
            let m = export_with_progress(&opts, !json)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&m)?);
            } else {
                print_export_summary(&m, &opts, t0.elapsed().as_secs_f64());
            }
            Ok(())
        }
        Command::Inspect { path, json } => {
            let s = motionrt_export::inspect::inspect(&path)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print!("{s}");
            }
            Ok(())
        }
        Command::Demo {
            dir,
            frames,
            height,
            width,
            seed,
        } => demo(dir, frames, height, width, seed),
    }
}

fn export_with_progress(
    opts: &ExportOptions,
    show: bool,
) -> Result<motionrt_export::export::ModelManifest> {
    let bar = indicatif::ProgressBar::hidden();
    if show {
        bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    }
    let m = export(opts, &mut |p| match p {
        Progress::Start { total_bytes, .. } => {
            bar.set_length(total_bytes);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "exporting {bar:40} {bytes}/{total_bytes} {bytes_per_sec} {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
        }
        Progress::Tensor { bytes, .. } => bar.inc(bytes),
        Progress::Finishing => bar.set_message("hashing inputs"),
    });
    bar.finish_and_clear();
    m.with_context(|| {
        format!(
            "export to {} failed (nothing was written)",
            opts.out.display()
        )
    })
}

fn print_export_summary(
    m: &motionrt_export::export::ModelManifest,
    opts: &ExportOptions,
    secs: f64,
) {
    println!(
        "exported {} in {secs:.1} s",
        opts.out.join("unet.onnx").display()
    );
    println!(
        "  unet:    {} ({} layout), {:.1} M parameters",
        m.unet.path.display(),
        m.unet.layout,
        m.unet.parameters as f64 / 1e6
    );
    if let Some(mm) = &m.motion_module {
        println!(
            "  motion:  {} ({} layout), AnimateDiff {}, {} modules, positional table {}, {:.1} M parameters",
            mm.source.path.display(),
            mm.source.layout,
            mm.version,
            mm.modules,
            mm.positional_table_length,
            mm.source.parameters as f64 / 1e6
        );
    } else {
        println!("  motion:  none (a per-frame image UNet)");
    }
    println!(
        "  graph:   {} nodes, precision {}, semantics {}, opset {}",
        m.graphs["unet"].nodes, m.precision, m.semantics, m.opset
    );
    if let Some(ext) = &m.graphs["unet"].external_data {
        println!("  weights: {}", opts.out.join(ext).display());
    }
}

fn demo(dir: Option<PathBuf>, frames: usize, height: usize, width: usize, seed: u64) -> Result<()> {
    use motionrt_export::synthetic;
    use motionrt_runtime::{OrtSession, SessionOptions, Tensor};
    if height % 8 != 0 || width % 8 != 0 || height == 0 || width == 0 {
        bail!("--height and --width must be positive multiples of 8 (got {height}×{width})");
    }
    let motion_cfg = synthetic::tiny_motion(MotionVersion::V2);
    if frames == 0 || frames > motion_cfg.max_seq_length {
        bail!(
            "--frames must be between 1 and {} (the motion module's positional table)",
            motion_cfg.max_seq_length
        );
    }
    // The files stay after the run so they can be inspected (`motionrt inspect DIR/export/unet.onnx`).
    let dir = dir.unwrap_or_else(|| std::env::temp_dir().join("motionrt-demo"));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let t = Instant::now();
    let model = synthetic::write_model(&dir, &synthetic::tiny_unet(), &motion_cfg, seed)?;
    let t_write = t.elapsed();
    println!(
        "wrote tiny random-weight model: {} (diffusers layout), {} (AnimateDiff layout)",
        model.unet_dir.display(),
        model.motion_file.display()
    );

    let out = dir.join("export");
    let opts = ExportOptions {
        unet: model.unet_dir.clone(),
        motion_module: Some(model.motion_file.clone()),
        out: out.clone(),
        overwrite: true,
        precision: Precision::Fp32,
        semantics: Semantics::Official,
        external_data: ExternalData::Auto,
        vae: None,
        text_encoder: None,
        vae_config: None,
        text_encoder_config: None,
        tokenizer: None,
        unet_only: false,
    };
    let t = Instant::now();
    let m = export_with_progress(&opts, true)?;
    let t_export = t.elapsed();
    print_export_summary(&m, &opts, t_export.as_secs_f64());

    let t = Instant::now();
    let mut session = OrtSession::load(&out.join("unet.onnx"), &SessionOptions::default())?;
    let t_load = t.elapsed();
    let (h, w) = (height / 8, width / 8);
    let mut rng = synthetic::Rng::new(seed ^ 0x5eed);
    let d = m.unet_config.cross_attention_dim;
    let sample = Tensor::new(
        vec![1, 4, frames, h, w],
        (0..4 * frames * h * w).map(|_| rng.normal()).collect(),
    );
    let timestep = Tensor::new(vec![1], vec![500.0]);
    let ctx = Tensor::new(
        vec![frames, 77, d],
        (0..frames * 77 * d).map(|_| rng.normal()).collect(),
    );
    let inputs = [
        ("sample", &sample),
        ("timestep", &timestep),
        ("encoder_hidden_states", &ctx),
    ];
    let t = Instant::now();
    session.run(&inputs)?; // warm-up
    let t_first = t.elapsed();
    let mut times = Vec::new();
    let mut last = None;
    for _ in 0..3 {
        let t = Instant::now();
        last = Some(session.run(&inputs)?);
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let outputs = last.context("no run")?;
    let (name, noise) = &outputs[0];
    let finite = noise.data.iter().all(|v| v.is_finite());
    let max = noise.data.iter().fold(0f32, |a, v| a.max(v.abs()));
    if !finite {
        bail!("the UNet produced non-finite values");
    }
    println!(
        "ran the UNet on ONNX Runtime (CPU): {name} {:?}, max |x| {max:.3}",
        noise.shape
    );
    println!(
        "timings: write model {:.2} s | export {:.2} s | session load {:.2} s | first step {:.3} s | step median {:.3} s ({} frames, {}×{} latent)",
        t_write.as_secs_f64(),
        t_export.as_secs_f64(),
        t_load.as_secs_f64(),
        t_first.as_secs_f64(),
        times[times.len() / 2],
        frames,
        h,
        w
    );
    Ok(())
}
