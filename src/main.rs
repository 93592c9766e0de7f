//! The `motionrt` command line: parse, call the libraries, print.

mod bench_cmd;
mod build_cmd;
mod graph_tools;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use motionrt_export::config::MotionVersion;
use motionrt_export::export::{export, ExportOptions, ExternalData, Progress};
use motionrt_export::graph::unet::Semantics;
use motionrt_export::graph::Precision;
use motionrt_runtime::engine::exec::TimingCache;
use motionrt_runtime::frame_stream::FrameStream;
use motionrt_runtime::frames::{self, Frames, OutputFormat};
use motionrt_runtime::pipeline::{Event, GenerateOptions, Pipeline};
use motionrt_runtime::scheduler::{SchedulerConfig, SchedulerKind};
use motionrt_runtime::tokenizer::ClipTokenizer;
use motionrt_runtime::SessionOptions;

#[derive(Parser)]
#[command(
    name = "motionrt",
    version,
    about = "Deploy AnimateDiff-family text-to-video models: export checkpoints to ONNX, build GPU engines, run them.",
    long_about = "Deploy AnimateDiff-family text-to-video models.\n\n\
        motionrt turns Stable Diffusion 1.5 UNets inflated with AnimateDiff motion modules (v1/v2/v3) into ONNX \
        graphs that ONNX Runtime (and TensorRT) can run as they are (`export`, `run`), and builds native CUDA \
        engines from them for the GPU at hand (`build`, `run --engine`).\n\n\
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
    /// Export the AnimateDiff UNet (SD1.5 UNet + motion modules) to DIR/unet.onnx, and the VAE, CLIP text encoder and
    /// tokenizer when given or found beside the UNet, with DIR/model.json.
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
        /// Emit the motion modules' attention as com.motionrt.TemporalAttention nodes (docs/operators.md): one
        /// fused operator per attention instead of ~12 standard ops. motionrt runs such graphs (its ONNX Runtime
        /// sessions register the operators); other runtimes need the default standard-op graph.
        #[arg(long = "fused-attention", conflicts_with = "portable")]
        fused_attention: bool,
        /// Emit the 3x3 stride-1 convolutions of the UNet and VAE as Winograd F(2x2, 3x3): com.motionrt.WinogradInput
        /// -> MatMul -> com.motionrt.WinogradOutput (docs/operators.md). 2.25x fewer multiplies; the fastest graphs
        /// for motionrt on the CPU (see BENCHMARKS.md). Float32 only. The kernels are transformed once at export and
        /// stored as `{weight}@winograd`, [16, out, in]: 16/9 the size of the 3x3 weights they replace.
        #[arg(long, conflicts_with = "portable")]
        winograd: bool,
        /// Standard ONNX ops only (the default; spelled out for scripts): every attention, including Tune-A-Video's
        /// sparse-causal one, as MatMul/Softmax/Gather/Concat, runnable by any ONNX runtime or TensorRT.
        #[arg(long)]
        portable: bool,
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
    /// Generate a video from a prompt (text encoder → denoising loop → VAE → frames): with an exported model
    /// directory on ONNX Runtime (CPU), or with --engine on the native CUDA engine.
    Run {
        /// A directory written by `motionrt export` (model.json, unet.onnx, text_encoder.onnx, vae_decoder.onnx,
        /// tokenizer/).
        #[arg(long, required_unless_present = "engine", conflicts_with = "engine")]
        model: Option<PathBuf>,
        /// An engine written by `motionrt build` for this GPU: runs the pipeline on the GPU (fp16, CUDA-graph
        /// replay of each denoising step, frames copied to pinned host memory).
        #[arg(long)]
        engine: Option<PathBuf>,
        /// With --engine: a timing cache (JSON) for shapes the engine was not tuned at (another frame
        /// count, guidance off, another --decode-chunk): algorithms it holds are used instead of timed again,
        /// and those timed in this run are added to it (written once the video is). The same file as
        /// `build --timing-cache`: keyed to this GPU and library versions, one timed elsewhere is not used.
        #[arg(long = "timing-cache")]
        timing_cache: Option<PathBuf>,
        #[arg(long)]
        prompt: String,
        #[arg(long = "negative-prompt", default_value = "")]
        negative_prompt: String,
        /// A prompt from a given frame on, as FRAME:TEXT (repeatable); text embeddings are interpolated between
        /// keyframes. --prompt is used at frame 0 unless a keyframe is given there.
        #[arg(long = "frame-prompt", value_name = "FRAME:TEXT")]
        frame_prompts: Vec<String>,
        /// Output: .gif (looping), .mp4 (needs ffmpeg on the PATH), .png (a numbered sequence NAME_000.png ...)
        /// or a directory (frame_000.png ...).
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 16)]
        frames: usize,
        #[arg(long, default_value_t = 512)]
        height: usize,
        #[arg(long, default_value_t = 512)]
        width: usize,
        #[arg(long, default_value_t = 25)]
        steps: usize,
        /// Classifier-free guidance scale (≤ 1 turns guidance off: half the UNet work).
        #[arg(long, default_value_t = 7.5)]
        guidance: f32,
        /// ddim, euler, euler-a, dpmpp-2m, dpmpp-2m-karras or lcm [default: the class
        /// --scheduler-config names (its `_class_name`), else ddim].
        #[arg(long)]
        scheduler: Option<String>,
        /// A diffusers scheduler_config.json to use instead of the model's AnimateDiff defaults;
        /// its `_class_name` picks the scheduler unless --scheduler is given.
        #[arg(long = "scheduler-config")]
        scheduler_config: Option<PathBuf>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Frames per VAE decoder call: lower bounds memory. On a native engine, lowered (with a
        /// warning) to what keeps the VAE's tensors within 2^31 - 1 elements.
        #[arg(long = "decode-chunk", default_value_t = 16)]
        decode_chunk: usize,
        /// Frames per second of the GIF / MP4.
        #[arg(long, default_value_t = 8.0)]
        fps: f32,
        /// ONNX Runtime threads per operator (0: ONNX Runtime's default, all cores).
        #[arg(long, default_value_t = 0, value_parser = parse_threads)]
        threads: usize,
        /// Print a JSON summary (files, timings) on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Edit a video (Tune-A-Video): encode it with the VAE, DDIM-invert it under --source-prompt to the noise that
    /// regenerates it, then generate from that noise with the edited --prompt and classifier-free guidance.
    Edit {
        /// A directory written by `motionrt export` from a Tune-A-Video model (with VAE, text encoder, tokenizer).
        #[arg(long)]
        model: PathBuf,
        /// The input video: a .gif, a directory of .png frames, a .png, or anything ffmpeg decodes (.mp4 ...).
        #[arg(long)]
        video: PathBuf,
        /// The edited prompt, e.g. "a cat is surfing, cartoon style".
        #[arg(long)]
        prompt: String,
        /// Describes the input; conditions the inversion (Tune-A-Video inverts with "").
        #[arg(long = "source-prompt", default_value = "")]
        source_prompt: String,
        #[arg(long = "negative-prompt", default_value = "")]
        negative_prompt: String,
        /// Output: .gif, .mp4 (ffmpeg), .png sequence or a directory.
        #[arg(long)]
        out: PathBuf,
        /// Size the video is resized to (default: its own size rounded down to a multiple of 8; needed for
        /// ffmpeg-decoded inputs).
        #[arg(long)]
        width: Option<usize>,
        #[arg(long)]
        height: Option<usize>,
        /// Use the first N frames (default: all).
        #[arg(long)]
        frames: Option<usize>,
        /// DDIM steps for the inversion and for the generation.
        #[arg(long, default_value_t = 50)]
        steps: usize,
        /// Classifier-free guidance of the generation (Tune-A-Video's default).
        #[arg(long, default_value_t = 12.5)]
        guidance: f32,
        /// Frames per VAE encoder and decoder call (lowered on a native engine as for `run`).
        #[arg(long = "decode-chunk", default_value_t = 16)]
        decode_chunk: usize,
        #[arg(long, default_value_t = 8.0)]
        fps: f32,
        /// ONNX Runtime threads per operator (0: ONNX Runtime's default, all cores).
        #[arg(long, default_value_t = 0, value_parser = parse_threads)]
        threads: usize,
        /// Also save the inverted noise [1, 4, F, h, w] as .npy (reusable with other prompts).
        #[arg(long = "save-inverted")]
        save_inverted: Option<PathBuf>,
    },
    /// Measure latency: the whole pipeline (text encoder, UNet per step and total, VAE decode, time to first frame,
    /// end to end) or one graph (--graph), after warm-up, with min/median/p90/p99/max, throughput, load time and
    /// peak memory; --json saves the report, --compare A B compares two saved reports per stage.
    Bench(bench_cmd::BenchArgs),
    /// Run one graph (an .onnx file, or --model DIR --graph-name NAME) on inputs from an .npz / a directory of .npy
    /// files, or on seeded random inputs drawn from its declared shapes (--random, saved for reuse), and write every
    /// output to an .npz that numpy.load reads.
    Infer(graph_tools::InferArgs),
    /// Run the same inputs through two configurations (ONNX graphs, or outputs saved by `infer`) and report per
    /// output: max abs error, max error relative to the reference's magnitude, mean error, cosine similarity,
    /// non-finite counts and pass/fail against --atol/--rtol; --mark-all finds the first diverging intermediate tensor.
    Compare(graph_tools::CompareArgs),
    /// Build an engine for this machine's GPU from an exported model: fusions, layouts, weights converted once
    /// (fp16 by default), GEMM and convolution algorithms timed on this GPU, a memory plan, in one engine folder keyed
    /// to this GPU, driver and library versions (`motionrt run --engine`). --plan-only needs no GPU: it writes the
    /// fused graphs instead.
    Build(build_cmd::BuildArgs),
    /// Report what this machine can run: the ONNX Runtime library, the CUDA driver and GPUs, and the CUDA
    /// libraries motionrt's GPU paths load (NVRTC, CUDA runtime, cuBLAS, cuBLASLt, cuDNN), each found or missing
    /// with how to install it. Nothing is called in a library that is missing.
    Probe {
        /// Machine-readable output on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Write a tiny random-weight AnimateDiff model set in the real layouts (diffusers UNet, VAE, CLIP text encoder
    /// and tokenizer folders, original-layout motion module), export it, generate a video on ONNX Runtime (CPU) and
    /// write it as a GIF, printing per-stage timings. Random weights: expect coloured noise, not a picture.
    Demo {
        /// Working directory; its model, export and video are replaced on each run (default: $TMPDIR/motionrt-demo).
        #[arg(long)]
        dir: Option<PathBuf>,
        #[arg(long, default_value_t = 8)]
        frames: usize,
        #[arg(long, default_value_t = 64)]
        height: usize,
        #[arg(long, default_value_t = 64)]
        width: usize,
        #[arg(long, default_value_t = 8)]
        steps: usize,
        #[arg(
            long,
            default_value = "a red fox running through fresh snow, cinematic"
        )]
        prompt: String,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Where to write the video (default: DIR/demo.gif).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    quiet_on_closed_stdout();
    remove_unfinished_outputs_when_interrupted();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// Output piped into a reader that stops early (`motionrt probe --json | head`): Rust ignores
/// SIGPIPE, so `println!` fails with EPIPE and panics. That one panic ends the process quietly,
/// by SIGPIPE, as `grep`/`cat` end; every other panic reports as before. SIGPIPE stays ignored
/// until then so that a writer to a child process (ffmpeg for MP4) gets the error and reports
/// the child's own message.
fn quiet_on_closed_stdout() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let p = info.payload();
        let msg = p
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| p.downcast_ref::<&str>().copied())
            .unwrap_or("");
        // std's message: "failed printing to stdout: Broken pipe (os error 32)"
        if msg.starts_with("failed printing to stdout") && msg.contains("Broken pipe") {
            // as a program killed by SIGPIPE ends (status 141 in a shell; a pipeline under
            // `pipefail` fails, as the rest of the output and any report were not written),
            // without the temporaries of outputs not yet complete
            motionrt_kernels::unfinished::remove_all();
            // SAFETY: restoring SIGPIPE's default action and raising it ends the process.
            unsafe {
                libc::signal(libc::SIGPIPE, libc::SIG_DFL);
                libc::raise(libc::SIGPIPE);
                libc::_exit(141)
            }
        }
        report(info);
    }));
}

/// Ctrl-C, SIGTERM or SIGHUP ends the process at once (the default), but first removes the
/// temporary files and folders of outputs not yet complete (an export's `.NAME.partial-PID`
/// folder, a video's `.NAME.gif.partial-PID`: `motionrt_kernels::unfinished`), which an exit
/// by signal would otherwise leave behind; an output being renamed into place is completed
/// first, and none is after. Exit status 130, as a shell reports an interrupt.
///
/// The exit is `_exit`: no atexit handlers or C++ static destructors, which would tear ONNX
/// Runtime down under the main thread still running a graph (and print its errors). Stderr is
/// locked first and stays so until the exit: the main thread, still running for that moment,
/// can neither print nor end the process on an error its removed temporaries cause (`main`
/// prints before it returns). Should the lock or the removal not come (a reader of stderr that
/// stopped reading), a watchdog ends the process after 3 s all the same.
fn remove_unfinished_outputs_when_interrupted() {
    let r = ctrlc::set_handler(|| {
        std::thread::spawn(|| {
            std::thread::sleep(std::time::Duration::from_secs(3));
            // SAFETY: _exit ends the process without running anything else.
            unsafe { libc::_exit(130) }
        });
        let mut err = std::io::stderr().lock();
        let removed = motionrt_kernels::unfinished::remove_all();
        let names: Vec<String> = removed.iter().map(|p| p.display().to_string()).collect();
        let _ = if names.is_empty() {
            writeln!(err, "\ninterrupted")
        } else {
            writeln!(
                err,
                "\ninterrupted: removed the unfinished output{} {}",
                if names.len() == 1 { "" } else { "s" },
                names.join(", ")
            )
        };
        // SAFETY: _exit ends the process without running anything else; always sound to call.
        unsafe { libc::_exit(130) }
    });
    if let Err(e) = r {
        eprintln!(
            "warning: no interrupt handler ({e}): an interrupted run may leave .partial files"
        );
    }
}

/// `--threads N`: at most 64, or 4 per core on a larger machine. Each thread of ONNX Runtime's
/// pool waits on the others, so far more than the cores only slows a run down (thousands hang
/// it for hours).
pub(crate) fn parse_threads(s: &str) -> std::result::Result<usize, String> {
    let n: usize = s.parse().map_err(|e| format!("{e}"))?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let max = (4 * cores).max(64);
    if n > max {
        return Err(format!(
            "{n} threads for this machine's {cores} cores: at most {max} (0, the default, uses each core once)"
        ));
    }
    Ok(n)
}

/// ONNX Runtime's session options for `--threads N`; more threads than this machine has cores
/// (each then waiting on the others: many times slower) gets a warning, once.
pub(crate) fn session_options(threads: usize) -> SessionOptions {
    static WARNED: std::sync::Once = std::sync::Once::new();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    if cores > 0 && threads > cores {
        WARNED.call_once(|| {
            eprintln!(
                "warning: --threads {threads} is more than this machine's {cores} cores: ONNX Runtime's threads would wait on one another (0, the default, uses each core once)"
            )
        });
    }
    SessionOptions::default().with_intra_threads(threads)
}

/// `path` is UTF-8 (it is recorded in a JSON file that names it); the error names `flag`.
pub(crate) fn utf8_path(flag: &str, path: &Path) -> Result<()> {
    if path.to_str().is_none() {
        anyhow::bail!(
            "{flag} {}: the path is not valid UTF-8, and motionrt records it in JSON: rename it",
            path.display()
        );
    }
    Ok(())
}

/// `path`'s folder exists (checked before long work whose output would go there); the error
/// names `flag`.
pub(crate) fn check_parent_dir(flag: &str, path: &Path) -> Result<()> {
    let parent = path.parent().filter(|d| !d.as_os_str().is_empty());
    if let Some(d) = parent.filter(|d| !d.is_dir()) {
        bail!("{flag} {}: no such folder {}", path.display(), d.display());
    }
    Ok(())
}

/// [`check_parent_dir`], and `path` is not a folder: for a file written after long work.
pub(crate) fn check_output_file(flag: &str, path: &Path) -> Result<()> {
    check_parent_dir(flag, path)?;
    if path.is_dir() {
        bail!(
            "{flag} {}: a folder has this name; give a file name",
            path.display()
        );
    }
    Ok(())
}

/// The error and its causes, joined with ": " — without a cause whose text the message before
/// it already ends with (the library errors that name a file print their I/O cause too, which
/// `{:#}` would print a second time: "x.onnx: No such file …: No such file …").
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.is_empty() {
            out = text;
        } else if !out.ends_with(&text) {
            out = format!("{out}: {text}");
        }
    }
    out
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
            fused_attention,
            winograd,
            portable: _,
            json,
        } => {
            // model.json records where each part came from, as text
            for (flag, p) in [
                ("--unet", Some(&unet)),
                ("--motion-module", motion_module.as_ref()),
            ]
            .into_iter()
            .chain([
                ("--out", Some(&out)),
                ("--vae", vae.as_ref()),
                ("--text-encoder", text_encoder.as_ref()),
                ("--vae-config", vae_config.as_ref()),
                ("--text-encoder-config", text_encoder_config.as_ref()),
                ("--tokenizer", tokenizer.as_ref()),
            ]) {
                if let Some(p) = p {
                    utf8_path(flag, p)?;
                }
            }
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
                fused_attention,
                winograd,
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
        Command::Run {
            model,
            engine,
            timing_cache,
            prompt,
            negative_prompt,
            frame_prompts,
            out,
            frames,
            height,
            width,
            steps,
            guidance,
            scheduler,
            scheduler_config,
            seed,
            decode_chunk,
            fps,
            threads,
            json,
        } => {
            let given = scheduler
                .as_deref()
                .map(|s| {
                    s.parse::<SchedulerKind>()
                        .map_err(|e| anyhow::anyhow!("--scheduler: {e}"))
                })
                .transpose()?;
            let mut scheduler = given.unwrap_or(SchedulerKind::Ddim);
            let scheduler_config = scheduler_config
                .map(|p| -> Result<SchedulerConfig> {
                    let text = std::fs::read_to_string(&p)
                        .with_context(|| format!("reading {}", p.display()))?;
                    let v: serde_json::Value = serde_json::from_str(&text)
                        .with_context(|| format!("{}: not JSON", p.display()))?;
                    let config = SchedulerConfig::from_diffusers_json(&v)
                        .with_context(|| format!("{}", p.display()))?;
                    // the class the config names, unless --scheduler chose one (a class motionrt
                    // lacks, such as SD1.5's own PNDMScheduler: DDIM with the config's settings)
                    match given {
                        None => match SchedulerKind::from_diffusers_json(&v) {
                            Ok(Some(k)) => scheduler = k,
                            Ok(None) => {}
                            Err(e) => eprintln!(
                                "note: {}: {e}: using {} with its settings (--scheduler picks another)",
                                p.display(),
                                scheduler.name()
                            ),
                        },
                        Some(k) => {
                            if let Ok(Some(named)) = SchedulerKind::from_diffusers_json(&v) {
                                if named != k {
                                    eprintln!(
                                        "note: --scheduler {} replaces the {} scheduler that {} names",
                                        k.name(),
                                        named.name(),
                                        p.display()
                                    );
                                }
                            }
                        }
                    }
                    if v.get("use_karras_sigmas").and_then(|k| k.as_bool()) == Some(true)
                        && scheduler != SchedulerKind::DpmPp2mKarras
                    {
                        eprintln!(
                            "note: {} sets use_karras_sigmas, which motionrt implements for dpmpp-2m-karras only: {} uses its own sigmas",
                            p.display(),
                            scheduler.name()
                        );
                    }
                    Ok(config)
                })
                .transpose()?;
            let opts = GenerateOptions {
                prompt,
                negative_prompt,
                frame_prompts: parse_frame_prompts(&frame_prompts)?,
                frames,
                height,
                width,
                steps,
                guidance,
                scheduler,
                scheduler_config,
                seed,
                decode_chunk,
                init_latents: None,
            };
            if timing_cache.is_some() && engine.is_none() {
                bail!("--timing-cache holds the native engine's algorithms: it needs --engine");
            }
            let dir = match (model, engine) {
                (_, Some(e)) => {
                    if !e.join("engine.json").is_file() {
                        bail!("{}: no engine.json; --engine takes a folder written by `motionrt build`", e.display());
                    }
                    e
                }
                (Some(m), None) => {
                    if m.join("engine.json").is_file() {
                        bail!("{}: this is an engine; run it with --engine", m.display());
                    }
                    m
                }
                (None, None) => unreachable!("clap requires one"),
            };
            generate(
                &dir,
                &opts,
                &out,
                fps,
                threads,
                json,
                timing_cache.as_deref(),
            )
        }
        Command::Bench(args) => bench_cmd::bench(args),
        Command::Edit {
            model,
            video,
            prompt,
            source_prompt,
            negative_prompt,
            out,
            width,
            height,
            frames,
            steps,
            guidance,
            decode_chunk,
            fps,
            threads,
            save_inverted,
        } => edit_video(EditArgs {
            model,
            video,
            prompt,
            source_prompt,
            negative_prompt,
            out,
            width,
            height,
            frames,
            steps,
            guidance,
            decode_chunk,
            fps,
            threads,
            save_inverted,
        }),
        Command::Infer(args) => graph_tools::infer(args),
        Command::Compare(args) => graph_tools::compare(args),
        Command::Build(args) => build_cmd::build(args),
        Command::Probe { json } => probe(json),
        Command::Demo {
            dir,
            frames,
            height,
            width,
            steps,
            prompt,
            seed,
            out,
        } => demo(DemoArgs {
            dir,
            frames,
            height,
            width,
            steps,
            prompt,
            seed,
            out,
        }),
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
    if let Some(v) = &m.vae {
        println!(
            "  vae:     {} ({} layout), {:.1} M parameters, scaling factor {} -> vae_decoder.onnx, vae_encoder.onnx",
            v.path.display(),
            v.layout,
            v.parameters as f64 / 1e6,
            m.scaling_factor
        );
    } else {
        println!("  vae:     none (pass --vae to export it; `run` needs it)");
    }
    if let Some(t) = &m.text_encoder {
        println!(
            "  text:    {} ({} layout), {:.1} M parameters -> text_encoder.onnx",
            t.path.display(),
            t.layout,
            t.parameters as f64 / 1e6
        );
    } else {
        println!("  text:    none (pass --text-encoder to export it; `run` needs it)");
    }
    match &m.tokenizer {
        Some(t) => println!("  tokenizer: {} -> tokenizer/", t.source.display()),
        None => println!("  tokenizer: none (pass --tokenizer; `run` needs it)"),
    }
    if let Some(ext) = &m.graphs["unet"].external_data {
        println!("  weights: {}", opts.out.join(ext).display());
    }
}

fn parse_frame_prompts(args: &[String]) -> Result<Vec<(usize, String)>> {
    args.iter()
        .map(|a| {
            let (f, text) = a.split_once(':').with_context(|| {
                format!("--frame-prompt {a:?}: expected FRAME:TEXT, e.g. 8:a dog")
            })?;
            let f = f
                .trim()
                .parse::<usize>()
                .with_context(|| format!("--frame-prompt {a:?}: {f:?} is not a frame number"))?;
            Ok((f, text.to_string()))
        })
        .collect()
}

/// Run the pipeline with a progress bar and write the video; prints a summary line with
/// per-stage times.
fn generate(
    model: &Path,
    opts: &GenerateOptions,
    out: &Path,
    fps: f32,
    threads: usize,
    json: bool,
    timing_cache: Option<&Path>,
) -> Result<()> {
    // Fail on the output before minutes of work.
    let format = OutputFormat::from_path(out).with_context(|| {
        format!(
            "{}: unknown output format (use .gif, .mp4, .png, or a directory for a PNG sequence: an existing one, or a name ending in /)",
            out.display()
        )
    })?;
    if format == OutputFormat::Mp4 && !frames::ffmpeg_available() {
        bail!(
            "{}: writing MP4 needs ffmpeg on the PATH, and there is none; install ffmpeg or write .gif / .png instead",
            out.display()
        );
    }
    check_parent_dir("--out", out)?;
    let mut pipe = Pipeline::load(model, &crate::session_options(threads))
        .with_context(|| format!("loading {}", model.display()))?;
    pipe.validate(opts)?;
    let untuned = pipe.untuned_shapes(opts);
    if !untuned.is_empty() {
        eprintln!(
            "note: {}: their algorithms are timed on first use{}",
            untuned.join("; "),
            if timing_cache.is_some() {
                ", unless the timing cache has them"
            } else {
                " (--timing-cache FILE keeps them for later runs)"
            }
        );
    }
    if let (Some(p), Some(device)) = (timing_cache, pipe.engine_device().cloned()) {
        let (tactics, note) = TimingCache::load_for(p, &device)?;
        if let Some(n) = note {
            eprintln!("note: {n}");
        }
        pipe.merge_tactics(&tactics);
    }
    let bar = indicatif::ProgressBar::new(opts.steps as u64);
    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:>12} {bar:40} {pos}/{len} [{elapsed} < {eta}]",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    // Frames are encoded on CPU threads as the VAE decodes them (at most one chunk queued);
    // the output appears under its name only once every frame is written.
    let writer = frames::FrameWriter::create(out, opts.width, opts.height, opts.frames, fps)?;
    let mut stream = FrameStream::spawn(writer, FrameStream::default_threads(), 1);
    let video = pipe.generate_streaming(
        opts,
        &mut |e| match e {
            Event::Stage(s) => bar.set_message(s),
            Event::Step { index, total } => {
                bar.set_length(total as u64);
                bar.set_position(index as u64 + 1);
            }
            Event::Decoded { .. } => {}
            Event::Warning(w) => bar.suspend(|| eprintln!("warning: {w}")),
        },
        &mut |chunk| Ok(stream.push(chunk)?),
    );
    bar.finish_and_clear();
    let video = video?;
    let t = Instant::now();
    let files = stream.finish()?;
    // Encoding overlaps decoding: this is only what was left after the last chunk.
    let write_s = t.elapsed().as_secs_f64();
    warn_stale_frames(&files);
    if let (Some(p), Some(tactics), Some(device)) =
        (timing_cache, pipe.tactics(), pipe.engine_device().cloned())
    {
        // the video is written: a cache that cannot be is worth a warning, not a failure
        if let Err(e) = (TimingCache { device, tactics }).write(p) {
            eprintln!("warning: the timing cache was not written: {e}");
        }
    }
    // on the native engine, programs are made on first use, inside the stages' times
    let programs_s = pipe.engine_program_load_seconds();
    let tm = &video.timings;
    let mut steps = tm.steps.clone();
    steps.sort_by(f64::total_cmp);
    let step_median = steps.get(steps.len() / 2).copied().unwrap_or(0.0);
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "files": files,
                "frames": video.frames,
                "height": video.height,
                "width": video.width,
                "timings_s": {
                    "load": pipe.load_seconds,
                    "engine_programs": programs_s,
                    "text_encoder": tm.text_encoder,
                    "denoise": tm.denoise,
                    "step_median": step_median,
                    "vae_decode": tm.vae_decode,
                    "write": write_s,
                },
                "warnings": video.warnings,
            }))?
        );
    } else {
        println!(
            "wrote {}: {} frames {}×{}",
            file_span(&files),
            video.frames,
            video.width,
            video.height
        );
        println!(
            "timings: load {:.2} s | text encoder {:.3} s | denoise {:.2} s ({} steps, median {:.3} s/step) | VAE decode {:.2} s | write {:.2} s",
            pipe.load_seconds,
            tm.text_encoder,
            tm.denoise,
            tm.steps.len(),
            step_median,
            tm.vae_decode,
            write_s
        );
        if let Some(p) = programs_s {
            println!(
                "  (the engine made its programs on first use: {p:.2} s of compiling, weight upload and algorithm timing inside the stages above)"
            );
        }
    }
    Ok(())
}

struct DemoArgs {
    dir: Option<PathBuf>,
    frames: usize,
    height: usize,
    width: usize,
    steps: usize,
    prompt: String,
    seed: u64,
    out: Option<PathBuf>,
}

fn demo(a: DemoArgs) -> Result<()> {
    use motionrt_export::synthetic;
    if a.height % 8 != 0 || a.width % 8 != 0 || a.height == 0 || a.width == 0 {
        bail!(
            "--height and --width must be positive multiples of 8 (got {}×{})",
            a.height,
            a.width
        );
    }
    motionrt_runtime::pipeline::check_size(a.width, a.height)?;
    let motion_cfg = synthetic::tiny_motion(MotionVersion::V2);
    if a.frames == 0 || a.frames > motion_cfg.max_seq_length {
        bail!(
            "--frames must be between 1 and {} (the motion module's positional table)",
            motion_cfg.max_seq_length
        );
    }
    if a.steps == 0 {
        bail!("--steps must be at least 1");
    }
    // the video's name before the model set is written (its folder is checked when it opens)
    if let Some(out) = &a.out {
        if OutputFormat::from_path(out).is_none() {
            bail!(
                "{}: unknown output format (use .gif, .mp4, .png, or a directory for a PNG sequence: an existing one, or a name ending in /)",
                out.display()
            );
        }
        check_parent_dir("--out", out)?;
    }
    // The files stay after the run so they can be inspected (`motionrt inspect DIR/export/unet.onnx`).
    let dir = a
        .dir
        .unwrap_or_else(|| std::env::temp_dir().join("motionrt-demo"));
    // the export is replaced at the end: refused now, if it is something else, not after the
    // model set is written
    let out = dir.join("export");
    if out.exists() && !motionrt_export::export::replaceable_export(&out) {
        bail!(
            "{}: exists and is not a motionrt export (no model.json): choose another --dir",
            out.display()
        );
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let t = Instant::now();
    let model = synthetic::write_model(&dir, &synthetic::tiny_unet(), &motion_cfg, a.seed)?;
    let tokenizer = ClipTokenizer::byte_level();
    let tok_dir = model.unet_dir.join("tokenizer");
    tokenizer
        .write_files(&tok_dir)
        .with_context(|| format!("writing {}", tok_dir.display()))?;
    synthetic::write_vae_and_text_encoder(
        &model.unet_dir,
        &synthetic::tiny_vae(),
        &synthetic::tiny_text_encoder(tokenizer.vocab_size()),
        a.seed ^ 0x7e,
    )?;
    let t_write = t.elapsed();
    println!(
        "wrote a tiny random-weight model set: {} (diffusers UNet, VAE, text encoder, tokenizer), {} (AnimateDiff layout)",
        model.unet_dir.display(),
        model.motion_file.display()
    );

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
        fused_attention: false,
        winograd: false,
    };
    let t = Instant::now();
    let m = export_with_progress(&opts, true)?;
    let t_export = t.elapsed();
    print_export_summary(&m, &opts, t_export.as_secs_f64());
    println!(
        "model set written in {:.2} s, exported in {:.2} s",
        t_write.as_secs_f64(),
        t_export.as_secs_f64()
    );

    let video = a.out.unwrap_or_else(|| dir.join("demo.gif"));
    let gen = GenerateOptions {
        prompt: a.prompt,
        negative_prompt: "blurry, low quality".into(),
        frames: a.frames,
        height: a.height,
        width: a.width,
        steps: a.steps,
        seed: a.seed,
        ..Default::default()
    };
    generate(&out, &gen, &video, 8.0, 0, false, None)
}

struct EditArgs {
    model: PathBuf,
    video: PathBuf,
    prompt: String,
    source_prompt: String,
    negative_prompt: String,
    out: PathBuf,
    width: Option<usize>,
    height: Option<usize>,
    frames: Option<usize>,
    steps: usize,
    guidance: f32,
    decode_chunk: usize,
    fps: f32,
    threads: usize,
    save_inverted: Option<PathBuf>,
}

/// A PNG sequence written beside frames of an earlier one (a longer run, another zero-padding):
/// a viewer or `ffmpeg -i out_%03d.png` would play them on after the new ones. They are the
/// user's files, so they are named, not removed.
fn warn_stale_frames(files: &[PathBuf]) {
    let stale = frames::stale_sequence_frames(files);
    if !stale.is_empty() {
        eprintln!(
            "warning: {} other file(s) named like this PNG sequence's frames were not written by this run ({}); readers of the sequence may take them for more frames: remove them or write to an empty directory",
            stale.len(),
            file_span(&stale)
        );
    }
}

/// `files` in a line: the one, or the first and last with the count.
fn file_span(files: &[PathBuf]) -> String {
    match files {
        [one] => one.display().to_string(),
        [first, .., last] => format!(
            "{} … {} ({} files)",
            first.display(),
            last.display(),
            files.len()
        ),
        [] => String::from("nothing"),
    }
}

fn edit_video(a: EditArgs) -> Result<()> {
    use motionrt_runtime::edit::{edit, EditOptions};
    use motionrt_runtime::video_in;
    let format = OutputFormat::from_path(&a.out).with_context(|| {
        format!(
            "{}: unknown output format (use .gif, .mp4, .png, or a directory for a PNG sequence: an existing one, or a name ending in /)",
            a.out.display()
        )
    })?;
    if format == OutputFormat::Mp4 && !frames::ffmpeg_available() {
        bail!(
            "{}: writing MP4 needs ffmpeg on the PATH, and there is none; install ffmpeg or write .gif / .png instead",
            a.out.display()
        );
    }
    if a.frames == Some(0) {
        bail!("--frames must be at least 1");
    }
    // an output written over the input video, or over the other output
    let same = |x: &Path, y: &Path| {
        x == y
            || std::fs::canonicalize(x)
                .ok()
                .is_some_and(|c| std::fs::canonicalize(y).is_ok_and(|d| c == d))
    };
    if same(&a.out, &a.video) {
        bail!(
            "--out {}: that is the input --video; write the edit elsewhere",
            a.out.display()
        );
    }
    if let Some(p) = &a.save_inverted {
        if same(p, &a.video) || same(p, &a.out) {
            bail!(
                "--save-inverted {}: that is the input --video or --out; give the .npy its own name",
                p.display()
            );
        }
    }
    let size = a.width.zip(a.height);
    let input = video_in::read(&a.video, a.frames, size)?;
    if let Some(n) = a.frames.filter(|&n| n > input.frames) {
        eprintln!(
            "warning: --frames {n}, but {} holds {} frame(s): editing those",
            a.video.display(),
            input.frames
        );
    }
    let (w, h) = (
        a.width.unwrap_or(input.width / 8 * 8),
        a.height.unwrap_or(input.height / 8 * 8),
    );
    if w == 0 || h == 0 || w % 8 != 0 || h % 8 != 0 {
        bail!("--width and --height must be positive multiples of 8 (got {w}×{h})");
    }
    motionrt_runtime::pipeline::check_size(w, h)?;
    let input = video_in::resize(&input, w, h);
    // Fail on the outputs before the inversion's and the generation's minutes.
    let mut writer = frames::FrameWriter::create(&a.out, w, h, input.frames, a.fps)?;
    if let Some(p) = &a.save_inverted {
        check_output_file("--save-inverted", p)?;
    }
    let mut pipe = Pipeline::load(&a.model, &crate::session_options(a.threads))
        .with_context(|| format!("loading {}", a.model.display()))?;
    eprintln!(
        "{}: {} frames, {}×{} -> inverting under {:?}, then generating {:?}",
        a.video.display(),
        input.frames,
        w,
        h,
        a.source_prompt,
        a.prompt
    );
    let bar = indicatif::ProgressBar::new(a.steps as u64);
    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:>12} {bar:40} {pos}/{len} [{elapsed} < {eta}]",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let opts = EditOptions {
        source_prompt: a.source_prompt,
        prompt: a.prompt,
        negative_prompt: a.negative_prompt,
        steps: a.steps,
        guidance: a.guidance,
        decode_chunk: a.decode_chunk,
        scheduler_config: None,
    };
    let result = edit(&mut pipe, &input, &opts, &mut |e| match e {
        Event::Stage(s) => {
            bar.set_message(s);
            bar.set_position(0);
        }
        Event::Step { index, total } => {
            bar.set_length(total as u64);
            bar.set_position(index as u64 + 1);
        }
        Event::Decoded { .. } => {}
        Event::Warning(w) => bar.suspend(|| eprintln!("warning: {w}")),
    });
    bar.finish_and_clear();
    let mut r = result?;
    if let Some(p) = &a.save_inverted {
        let (f, lh, lw) = (input.frames, h / 8, w / 8);
        let c = r.inverted.len() / (f * lh * lw);
        motionrt_runtime::npy::write(
            p,
            &motionrt_runtime::npy::NpyArray::f32(
                vec![1, c, f, lh, lw],
                std::mem::take(&mut r.inverted),
            ),
        )?;
    }
    let t = Instant::now();
    let out_frames = Frames::new(
        r.video.frames,
        r.video.height,
        r.video.width,
        std::mem::take(&mut r.video.rgb),
    )?;
    out_frames.check_finite()?;
    let enc = writer.encoder();
    for i in 0..out_frames.frames {
        writer.write(enc.encode(i, out_frames.frame_rgb8(i))?)?;
    }
    let files = writer.finish()?;
    warn_stale_frames(&files);
    let tm = &r.video.timings;
    println!(
        "wrote {}: {} frames {}×{}",
        file_span(&files),
        r.video.frames,
        r.video.width,
        r.video.height
    );
    println!(
        "timings: load {:.2} s | VAE encode {:.2} s | inversion {:.2} s ({} steps) | text encoder {:.3} s | denoise {:.2} s | VAE decode {:.2} s | write {:.2} s",
        pipe.load_seconds,
        r.encode_seconds,
        r.invert_seconds,
        a.steps,
        tm.text_encoder,
        tm.denoise,
        tm.vae_decode,
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `motionrt probe`: ONNX Runtime, CUDA driver, GPUs and CUDA libraries, found or missing.
fn probe(json: bool) -> Result<()> {
    // found, then loaded as a session would load it: a library that is there but cannot be
    // used (not a library, too old for this build) is UNUSABLE, not found
    let ort = motionrt_runtime::find_onnxruntime().map(|p| {
        (
            p,
            motionrt_runtime::load_onnxruntime().map_err(|e| e.to_string()),
        )
    });
    let libs = motionrt_kernels::probe::probe();
    let gpus = motionrt_kernels::probe::gpus();
    if json {
        let v = serde_json::json!({
            "onnxruntime": match &ort {
                Ok((p, Ok(v))) => serde_json::json!({"found": p, "loaded": true, "version": v}),
                Ok((p, Err(e))) => serde_json::json!({"found": p, "loaded": false, "error": e}),
                Err(e) => serde_json::json!({"found": null, "loaded": false, "error": e.to_string()}),
            },
            "cuda_libraries": libs.iter().map(|l| serde_json::json!({
                "name": l.name, "role": l.role, "found": l.found,
                "hint": if l.found.is_none() { Some(l.hint) } else { None },
            })).collect::<Vec<_>>(),
            "gpus": match &gpus {
                Ok(g) => serde_json::json!(g.iter().map(|g| serde_json::json!({
                    "ordinal": g.ordinal, "name": g.name,
                    "compute_capability": format!("{}.{}", g.compute_capability.0, g.compute_capability.1),
                    "memory_bytes": g.memory_bytes,
                })).collect::<Vec<_>>()),
                Err(_) => serde_json::json!([]),
            },
            "gpu_error": gpus.as_ref().err(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    match &ort {
        Ok((p, Ok(v))) => println!(
            "{:<12} found      {}  (version {v}; loads)",
            "onnxruntime",
            p.display()
        ),
        Ok((_, Err(e))) => println!("{:<12} UNUSABLE   {e}", "onnxruntime"),
        Err(e) => println!("{:<12} MISSING    {e}", "onnxruntime"),
    }
    for l in &libs {
        match &l.found {
            Some(p) => println!("{:<12} found      {p}  ({})", l.name, l.role),
            None => println!(
                "{:<12} MISSING    {}  ({}; GPU paths only)",
                l.name, l.role, l.hint
            ),
        }
    }
    match &gpus {
        Ok(g) if g.is_empty() => println!("{:<12} none       the driver reports no device", "gpus"),
        Ok(g) => {
            for g in g {
                println!(
                    "{:<12} {}          {} (sm_{}{}, {:.1} GiB)",
                    "gpu",
                    g.ordinal,
                    g.name,
                    g.compute_capability.0,
                    g.compute_capability.1,
                    g.memory_bytes as f64 / (1u64 << 30) as f64
                );
            }
        }
        Err(e) => println!("{:<12} none       {e}", "gpus"),
    }
    println!(
        "the CPU paths (export, run, bench, infer, compare on ONNX Runtime) need only onnxruntime"
    );
    Ok(())
}
