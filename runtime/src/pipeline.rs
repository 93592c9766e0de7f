//! The text-to-video pipeline on ONNX Runtime, as diffusers' `AnimateDiffPipeline` computes it:
//! tokenize → text encoder → denoising loop (scheduler, batched classifier-free guidance, UNet)
//! → VAE decode in chunks of frames → RGB frames in [0, 1].
//!
//! A model directory is what `motionrt export` writes: `model.json`, `unet.onnx`,
//! `text_encoder.onnx`, `vae_decoder.onnx` and `tokenizer/`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::engine::file as engine_file;
use crate::frame_stream::{ChunkLayout, FrameChunk};
use crate::ort_backend::{Input, OrtSession, SessionOptions, Tensor};
use crate::rng::NormalRng;
use crate::scheduler::{self, SchedulerConfig, SchedulerError, SchedulerKind};
use crate::tokenizer::{ClipTokenizer, TokenizerError};
use crate::RuntimeError;

/// Pipeline errors; each says what to change.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("{path}: {message}")]
    Model { path: PathBuf, message: String },
    #[error("{0}")]
    Options(String),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Scheduler(#[from] SchedulerError),
    #[error(transparent)]
    Frames(#[from] crate::frames::FramesError),
    #[error("{what} contains {count} NaN/Inf values {when} ({advice})")]
    NonFinite {
        what: &'static str,
        when: String,
        count: usize,
        /// What to try ([`Pipeline::overflow_advice`]).
        advice: &'static str,
    },
}

pub type Result<T, E = PipelineError> = std::result::Result<T, E>;

/// What the pipeline reads from `model.json`.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub dir: PathBuf,
    pub latent_channels: usize,
    pub cross_attention_dim: usize,
    /// Image pixels per latent pixel (8 for SD).
    pub latent_scale: usize,
    pub scaling_factor: f32,
    /// The motion module's positional-table length (frames per UNet call), if any.
    pub max_frames: Option<usize>,
    pub scheduler_defaults: serde_json::Value,
    pub precision: String,
    /// The text encoder's vocabulary size, when it was exported.
    pub text_vocab_size: Option<usize>,
}

fn model_err(path: &Path, message: impl Into<String>) -> PipelineError {
    PipelineError::Model {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// The warning for a prompt longer than CLIP's 77 tokens, naming where it came from.
fn truncation_warning(label: &str, prompt: &str, n_tokens: usize) -> String {
    format!(
        "{label} is {n_tokens} tokens; CLIP takes 77, so it was truncated to the first 75 (\"{}…\")",
        prompt.chars().take(40).collect::<String>()
    )
}

impl ModelInfo {
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("model.json");
        let text = std::fs::read_to_string(&path).map_err(|e| {
            let what = if dir.join("engine.json").is_file() {
                "an engine folder that `motionrt build` wrote holds it: rebuild the engine"
            } else {
                "a model directory is what `motionrt export` writes"
            };
            model_err(&path, format!("{e} ({what})"))
        })?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| model_err(&path, format!("not JSON: {e}")))?;
        // what `motionrt export` writes: another format, or a later version of this one, is
        // refused by name rather than read as far as it happens to match
        let format = v.get("format").and_then(|f| f.as_str());
        let version = v.get("format_version").and_then(|f| f.as_u64());
        if format != Some("motionrt-model") || version != Some(1) {
            return Err(model_err(
                &path,
                format!(
                    "format {} version {}: this motionrt reads \"motionrt-model\" version 1, what `motionrt export` writes",
                    format.map_or("(none)".into(), |f| format!("{f:?}")),
                    version.map_or("(none)".into(), |n| n.to_string())
                ),
            ));
        }
        // sizes: whole numbers from 1 up (a hand-edited 0 would divide by zero later)
        let size = |ptr: &str| -> Result<usize> {
            v.pointer(ptr)
                .and_then(|x| x.as_u64())
                .filter(|&n| n >= 1)
                .map(|n| n as usize)
                .ok_or_else(|| {
                    model_err(
                        &path,
                        format!("`{ptr}` is missing or not a whole number of at least 1"),
                    )
                })
        };
        let scaling_factor = v
            .get("scaling_factor")
            .and_then(|x| x.as_f64())
            .unwrap_or(0.18215) as f32;
        if !(scaling_factor.is_finite() && scaling_factor > 0.0) {
            return Err(model_err(
                &path,
                format!("`scaling_factor` must be a positive number, got {scaling_factor}"),
            ));
        }
        let max_frames = match v.get("max_frames") {
            None | Some(serde_json::Value::Null) => None,
            Some(_) => Some(size("/max_frames")?),
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            latent_channels: size("/unet_config/in_channels")?,
            cross_attention_dim: size("/unet_config/cross_attention_dim")?,
            latent_scale: size("/latent_scale")?,
            scaling_factor,
            max_frames,
            scheduler_defaults: v
                .get("scheduler_defaults")
                .cloned()
                .unwrap_or(serde_json::Value::Null),
            precision: v
                .get("precision")
                .and_then(|x| x.as_str())
                .unwrap_or("fp32")
                .to_string(),
            text_vocab_size: v
                .pointer("/text_encoder_config/vocab_size")
                .and_then(|x| x.as_u64())
                .map(|x| x as usize),
        })
    }

    /// `DIR/NAME.onnx`, or an error saying how to export it.
    pub fn graph(&self, name: &str) -> Result<PathBuf> {
        let p = self.dir.join(format!("{name}.onnx"));
        if p.is_file() {
            Ok(p)
        } else {
            let hint = match name {
                "vae_decoder" => "export with --vae (or from a pipeline folder / single file that contains the VAE)",
                "text_encoder" => "export with --text-encoder (or from a pipeline folder / single file that contains it)",
                _ => "re-export the model",
            };
            Err(model_err(&p, format!("missing: {hint}")))
        }
    }
}

/// The largest frame side, in pixels, `run`, `edit`, `bench` and `demo` accept: 4× the largest
/// these models are trained at (SD1.5 512, EasyAnimate 1024), and above what a GPU's memory
/// holds for a video's UNet activations; sizes beyond it would fail on allocation (at 8192
/// pixels, 16 frames' float32 RGB alone take 13 GB) instead of with a message.
pub const MAX_SIDE: usize = 4096;

/// `--width`/`--height` within [`MAX_SIDE`] (their other checks are the model's).
pub fn check_size(width: usize, height: usize) -> Result<()> {
    if width > MAX_SIDE || height > MAX_SIDE {
        return Err(PipelineError::Options(format!(
            "--width and --height must be at most {MAX_SIDE} pixels (got {width}×{height})"
        )));
    }
    Ok(())
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub prompt: String,
    pub negative_prompt: String,
    /// Keyframe prompts `(frame, prompt)`: each frame's text embedding is interpolated linearly
    /// between the surrounding keyframes (frames before the first / after the last use it as is).
    /// Empty: `prompt` for every frame. Without a keyframe at frame 0, `prompt` is used there.
    pub frame_prompts: Vec<(usize, String)>,
    pub frames: usize,
    pub height: usize,
    pub width: usize,
    pub steps: usize,
    /// Classifier-free guidance scale; ≤ 1 disables guidance (one UNet batch instead of two).
    pub guidance: f32,
    pub scheduler: SchedulerKind,
    /// `None`: the model's `scheduler_defaults` (AnimateDiff's betas).
    pub scheduler_config: Option<SchedulerConfig>,
    pub seed: u64,
    /// Frames per VAE decoder call (bounds memory).
    pub decode_chunk: usize,
    /// Initial noise `[1, C, F, h, w]` instead of seeded noise (before `init_noise_sigma`).
    pub init_latents: Option<Vec<f32>>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: String::new(),
            frame_prompts: Vec::new(),
            frames: 16,
            height: 512,
            width: 512,
            steps: 25,
            guidance: 7.5,
            scheduler: SchedulerKind::Ddim,
            scheduler_config: None,
            seed: 0,
            decode_chunk: 16,
            init_latents: None,
        }
    }
}

/// Progress events.
#[derive(Debug, Clone)]
pub enum Event {
    Stage(&'static str),
    /// Denoising step `index` (0-based) of `total` finished.
    Step {
        index: usize,
        total: usize,
    },
    /// Frames `done` of `total` decoded.
    Decoded {
        done: usize,
        total: usize,
    },
    Warning(String),
}

/// Wall time per stage, seconds.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Timings {
    pub text_encoder: f64,
    pub denoise: f64,
    /// Each denoising step: scheduler, guidance and UNet.
    pub steps: Vec<f64>,
    /// The UNet call within each step.
    pub unet_steps: Vec<f64>,
    pub vae_decode: f64,
}

/// A generated video.
#[derive(Debug, Clone)]
pub struct Video {
    pub frames: usize,
    pub height: usize,
    pub width: usize,
    /// `[frames, height, width, 3]` RGB in [0, 1] (empty from [`Pipeline::generate_streaming`],
    /// which hands the frames to its sink instead).
    pub rgb: Vec<f32>,
    /// Final latents `[1, C, F, h, w]` (before the 1/scaling_factor).
    pub latents: Vec<f32>,
    pub timings: Timings,
    pub warnings: Vec<String>,
}

/// Loaded sessions and tokenizer.
/// One graph: on ONNX Runtime (an export folder) or on the native CUDA engine (an engine
/// folder written by `motionrt build`).
pub enum GraphSession {
    Ort(OrtSession),
    Cuda(Box<engine_file::CudaSession>),
}

/// A graph run that has been started by [`GraphSession::submit`]; [`GraphSession::collect`]
/// gives its outputs.
pub enum PendingRun {
    /// Already complete (ONNX Runtime runs synchronously).
    Done(Vec<(String, Tensor)>),
    /// Queued on the GPU; outputs are on their way to pinned host buffers.
    Cuda(engine_file::Ticket),
}

impl GraphSession {
    pub fn run_with(&mut self, inputs: &[(&str, Input<'_>)]) -> Result<Vec<(String, Tensor)>> {
        let p = self.submit(inputs)?;
        self.collect(p)
    }

    /// Start a run. On the native engine it only queues the work: the host may prepare the
    /// next inputs (and [`GraphSession::submit`] one more run) while the GPU computes and
    /// copies the outputs to pinned memory on a separate stream.
    pub fn submit(&mut self, inputs: &[(&str, Input<'_>)]) -> Result<PendingRun> {
        match self {
            GraphSession::Ort(s) => Ok(PendingRun::Done(s.run_with(inputs)?)),
            GraphSession::Cuda(s) => {
                let f: Vec<(&str, &[usize], &[f32])> = inputs
                    .iter()
                    .filter_map(|(n, i)| match i {
                        Input::F32(sh, d) => Some((*n, *sh, *d)),
                        Input::I64(..) => None,
                    })
                    .collect();
                let ids: Vec<(&str, &[usize], &[i64])> = inputs
                    .iter()
                    .filter_map(|(n, i)| match i {
                        Input::I64(sh, d) => Some((*n, *sh, *d)),
                        Input::F32(..) => None,
                    })
                    .collect();
                let t = s.submit(&f, &ids).map_err(|e| RuntimeError::Session {
                    path: PathBuf::from(format!("engine graph {}", s.name)),
                    message: e.to_string(),
                })?;
                Ok(PendingRun::Cuda(t))
            }
        }
    }

    /// Most samples per call a native engine runs of this single-input graph (`one`: `input`'s
    /// shape for one sample) within 32-bit tensor element counts; `None` on ONNX Runtime, which
    /// has no such limit.
    pub fn max_batch(&mut self, input: &str, one: &[usize]) -> Result<Option<usize>> {
        match self {
            GraphSession::Ort(_) => Ok(None),
            GraphSession::Cuda(s) => s.max_batch(input, one).map(Some).map_err(|e| {
                RuntimeError::Session {
                    path: PathBuf::from(format!("engine graph {}", s.name)),
                    message: e.to_string(),
                }
                .into()
            }),
        }
    }

    /// Wait for a submitted run and return its outputs.
    pub fn collect(&mut self, p: PendingRun) -> Result<Vec<(String, Tensor)>> {
        match (self, p) {
            (_, PendingRun::Done(out)) => Ok(out),
            (GraphSession::Cuda(s), PendingRun::Cuda(t)) => {
                let out = s.collect(t).map_err(|e| RuntimeError::Session {
                    path: PathBuf::from(format!("engine graph {}", s.name)),
                    message: e.to_string(),
                })?;
                Ok(out
                    .into_iter()
                    .map(|(n, shape, data)| (n, Tensor { shape, data }))
                    .collect())
            }
            (GraphSession::Ort(_), PendingRun::Cuda(_)) => Err(RuntimeError::Session {
                path: PathBuf::from("(graph session)"),
                message: "a GPU run was collected from an ONNX Runtime session".into(),
            }
            .into()),
        }
    }
}

/// What a native engine's sessions share.
struct EngineCtx {
    dir: PathBuf,
    dev: std::rc::Rc<crate::engine::exec::CudaDevice>,
    weights: std::rc::Rc<engine_file::EngineWeights>,
    manifest: engine_file::EngineManifest,
}

impl EngineCtx {
    fn session(&self, name: &str) -> Result<GraphSession> {
        let entry = self
            .manifest
            .graphs
            .iter()
            .find(|g| g.name == name)
            .ok_or_else(|| model_err(&self.dir, format!("the engine has no {name} graph")))?;
        let s = engine_file::CudaSession::load(
            self.dev.clone(),
            &self.dir,
            entry,
            self.weights.clone(),
            &self.manifest,
        )
        .map_err(|e| model_err(&self.dir, e.to_string()))?;
        Ok(GraphSession::Cuda(Box::new(s)))
    }
}

pub struct Pipeline {
    pub info: ModelInfo,
    unet: GraphSession,
    text: GraphSession,
    vae: GraphSession,
    /// `vae_encoder.onnx`, loaded on first use (editing).
    vae_encoder: Option<GraphSession>,
    engine: Option<EngineCtx>,
    session_options: SessionOptions,
    tokenizer: ClipTokenizer,
    /// Seconds spent loading sessions.
    pub load_seconds: f64,
    /// Seconds per graph: `unet`, `text_encoder`, `vae_decoder`.
    pub load_times: Vec<(&'static str, f64)>,
}

/// The frames per VAE call for `frames` frames: `want` (at least 1, at most `frames`), or where a
/// native engine runs no more than `most` at this size (its tensors' 32-bit element counts) the
/// fewest calls of at most `most` frames, evened out (16 frames at 14 a call: two calls of 8, not
/// 14 and 2 padded to 14), with a warning that says so.
fn fit_chunk(
    frames: usize,
    want: usize,
    most: Option<usize>,
    what: &str,
    (width, height): (usize, usize),
    warn: &mut dyn FnMut(String),
) -> usize {
    let want = want.max(1).min(frames.max(1));
    match most {
        Some(most) if most < want => {
            let most = most.max(1);
            let chunk = frames.div_ceil(frames.div_ceil(most));
            warn(format!(
                "{what} {chunk} frames per VAE call instead of {want}: at {width}×{height} more \
                 than {most} would make tensors past the 2^31 - 1 elements a CUDA engine's \
                 tensors may hold"
            ));
            chunk
        }
        _ => want,
    }
}

/// [`Pipeline::untuned_shapes`] for an engine tuned at `opt` with `vae_chunk` frames per VAE call
/// (latents `scale` times smaller than the pixels).
fn untuned_shapes(
    opt: &engine_file::Profile,
    vae_chunk: usize,
    scale: usize,
    o: &GenerateOptions,
) -> Vec<String> {
    let s = scale.max(1);
    let mut out = Vec::new();
    let cfg = o.guidance > 1.0;
    let tuned_unet =
        (1, o.frames, o.height / s, o.width / s) == (opt.batch, opt.frames, opt.height, opt.width);
    if !tuned_unet || !cfg {
        out.push(format!(
            "the UNet at {} frames {}×{}{} (tuned: {} frames {}×{} with guidance)",
            o.frames,
            o.width,
            o.height,
            if cfg { "" } else { " without guidance" },
            opt.frames,
            opt.width * s,
            opt.height * s
        ));
    }
    let per_call = o.frames.min(o.decode_chunk.max(1));
    let tuned = vae_chunk.min(opt.frames);
    if per_call != tuned || (o.height / s, o.width / s) != (opt.height, opt.width) {
        out.push(format!(
            "the VAE decoding {per_call} frames {}×{} per call (tuned: {tuned} frames {}×{}; --decode-chunk, build --vae-chunk)",
            o.width,
            o.height,
            opt.width * s,
            opt.height * s
        ));
    }
    out
}

fn count_nonfinite(v: &[f32]) -> usize {
    v.iter().filter(|x| !x.is_finite()).count()
}

impl Pipeline {
    fn cuda_sessions(&mut self) -> impl Iterator<Item = &mut engine_file::CudaSession> {
        [&mut self.unet, &mut self.text, &mut self.vae]
            .into_iter()
            .chain(self.vae_encoder.as_mut())
            .filter_map(|g| match g {
                GraphSession::Cuda(s) => Some(&mut **s),
                GraphSession::Ort(_) => None,
            })
    }

    /// On the native engine: give every graph `t`'s algorithms for problems the engine has none
    /// for (a timing cache of earlier runs at other shapes), so they are not timed again.
    pub fn merge_tactics(&mut self, t: &crate::engine::exec::TacticCache) {
        // sessions made later (the VAE encoder, on first use) start from the manifest's
        if let Some(e) = &mut self.engine {
            e.manifest.tactics.merge(t);
        }
        for s in self.cuda_sessions() {
            s.merge_tactics(t);
        }
    }

    /// What to try when a run's values overflow: on a native engine, rebuilding it without
    /// motionrt's tactic kernels or in float32; on ONNX Runtime, a float32 export.
    pub fn overflow_advice(&self) -> &'static str {
        if self.engine.is_some() {
            "the model overflowed; on a native engine: rebuild it with `motionrt build \
             --no-kernel-tactics` (cuDNN and cuBLASLt only), or with --precision fp32"
        } else if self.info.precision == "fp16" {
            "the model overflowed in float16: export with --precision fp32"
        } else {
            "a float32 export: check the model's weights and model.json (scaling_factor, \
             scheduler_defaults) and the --scheduler-config"
        }
    }

    /// The GPU and library versions the native engine runs with; `None` on ONNX Runtime.
    pub fn engine_device(&self) -> Option<&crate::engine::exec::DeviceKey> {
        self.engine.as_ref().map(|e| &e.dev.key)
    }

    /// On the native engine: its precision (`fp16`/`fp32`) and the device memory in use on its
    /// GPU now (`cuMemGetInfo`: total − free, so it counts every process on the GPU; the engine
    /// keeps what its programs allocate, transient workspaces aside). `None` on ONNX Runtime.
    pub fn engine_memory(&self) -> Option<(String, Result<u64>)> {
        let e = self.engine.as_ref()?;
        let precision = match e.manifest.precision {
            crate::engine::exec::Precision::Fp16 => "fp16",
            crate::engine::exec::Precision::Fp32 => "fp32",
        }
        .to_string();
        let used = e
            .dev
            .ctx
            .mem_get_info()
            .map(|(free, total)| total.saturating_sub(free) as u64)
            .map_err(|err| model_err(&e.dir, format!("cuMemGetInfo: {err}")));
        Some((precision, used))
    }

    /// On the native engine: what a generation with `o` runs at shapes the engine's algorithms
    /// were not timed for at build (its `--opt-shape` with guidance, its `--vae-chunk`), whose
    /// algorithms are then timed on first use. Empty on ONNX Runtime and at the tuned shapes.
    pub fn untuned_shapes(&mut self, o: &GenerateOptions) -> Vec<String> {
        if self.engine.is_none() {
            return Vec::new();
        }
        // the frames per VAE call the decode will take (a compile error here is the decode's
        // to report)
        let (f, h, w) = self.latent_dims(o);
        let per_call = self
            .decode_chunk(f, h, w, o.decode_chunk, &mut |_| {})
            .unwrap_or(o.decode_chunk);
        let Some(e) = &self.engine else {
            return Vec::new();
        };
        untuned_shapes(
            &e.manifest.profiles.opt,
            e.manifest.vae_chunk,
            self.info.latent_scale,
            &GenerateOptions {
                decode_chunk: per_call,
                ..o.clone()
            },
        )
    }

    /// The frames per VAE decoder call of `f` frames of `h`×`w` latents asked to decode `want` a
    /// call: on a native engine fewer where more would pass its tensors' 32-bit element counts
    /// (`warn` hears of it), else `want` (at most `f`).
    pub fn decode_chunk(
        &mut self,
        f: usize,
        h: usize,
        w: usize,
        want: usize,
        warn: &mut dyn FnMut(String),
    ) -> Result<usize> {
        let c = self.info.latent_channels;
        let s = self.info.latent_scale;
        let most = self.vae.max_batch("latent", &[1, c, h, w])?;
        Ok(fit_chunk(f, want, most, "decoding", (w * s, h * s), warn))
    }

    /// On the native engine: seconds spent so far making its programs (compile, weight upload,
    /// algorithm timing), which happens on each graph's first call at each input shape, so
    /// inside the stage timings of the run that made them. `None` on ONNX Runtime.
    pub fn engine_program_load_seconds(&mut self) -> Option<f64> {
        self.engine.as_ref()?;
        Some(self.cuda_sessions().map(|s| s.program_load_seconds).sum())
    }

    /// On the native engine: make every program a generation with `o` runs (text encoder, UNet,
    /// VAE, at their shapes) and capture their CUDA graphs, by generating once with one
    /// denoising step and discarding the frames, so that the next generation with these
    /// settings runs as fast as any later one. Nothing to do on ONNX Runtime.
    pub fn prepare(&mut self, o: &GenerateOptions) -> Result<()> {
        if self.engine.is_none() {
            return Ok(());
        }
        let one = GenerateOptions {
            steps: 1,
            ..o.clone()
        };
        self.validate(&one)?;
        let dir = self.info.dir.clone();
        let ctx = self.text_context(&one, &mut |_| {})?;
        let latents = self.denoise(&one, &ctx, &mut Timings::default(), &mut |_| {});
        // the text encoder's and UNet's graphs, whatever comes after (their runs are done)
        for s in self.cuda_sessions() {
            s.capture_loaded()
                .map_err(|e| model_err(&dir, e.to_string()))?;
        }
        let latents = latents?;
        let (f, h, w) = self.latent_dims(&one);
        let decoded = self.decode_to(
            &latents,
            f,
            h,
            w,
            one.decode_chunk,
            &mut |_| {},
            &mut |_| Ok(()),
        );
        for s in self.cuda_sessions() {
            s.capture_loaded()
                .map_err(|e| model_err(&dir, e.to_string()))?;
        }
        decoded
    }

    /// On the native engine, every algorithm its graphs have now (the engine's and those timed
    /// during this run); `None` on ONNX Runtime.
    pub fn tactics(&mut self) -> Option<crate::engine::exec::TacticCache> {
        self.engine.as_ref()?;
        let mut all = crate::engine::exec::TacticCache::default();
        for s in self.cuda_sessions() {
            all.merge(s.tactics());
            // (a timing cache written from an engine built with --no-kernel-tactics says so:
            // its problems were not timed against motionrt's kernels)
            all.library_only |= s.tactics().library_only;
        }
        Some(all)
    }

    pub fn load(dir: &Path, opts: &SessionOptions) -> Result<Self> {
        let t = Instant::now();
        let info = ModelInfo::load(dir)?;
        let tok_dir = dir.join("tokenizer");
        let tokenizer = if tok_dir.join("vocab.json").is_file() {
            ClipTokenizer::from_dir(&tok_dir)?
        } else if tok_dir.join("bpe_simple_vocab_16e6.txt.gz").is_file() {
            ClipTokenizer::from_bpe_gz(&tok_dir.join("bpe_simple_vocab_16e6.txt.gz"))?
        } else {
            return Err(model_err(
                &tok_dir,
                "no tokenizer (vocab.json + merges.txt or bpe_simple_vocab_16e6.txt.gz): export with --tokenizer",
            ));
        };
        // an id past the text encoder's table would fail inside its Gather, mid-run
        if let Some(v) = info.text_vocab_size {
            if tokenizer.max_id() as usize >= v {
                return Err(model_err(
                    &tok_dir,
                    format!(
                        "token id {} is past the text encoder's vocabulary of {v} (model.json's text_encoder_config): the tokenizer and the text encoder do not belong together",
                        tokenizer.max_id()
                    ),
                ));
            }
        }
        // Check every file before the slow loads.
        let paths = [
            info.graph("unet")?,
            info.graph("text_encoder")?,
            info.graph("vae_decoder")?,
        ];
        let mut load_times = Vec::new();
        let engine = if dir.join("engine.json").is_file() {
            let manifest =
                engine_file::read_manifest(dir).map_err(|e| model_err(dir, e.to_string()))?;
            let dev = crate::engine::exec::CudaDevice::open(0)
                .map_err(|e| model_err(dir, e.to_string()))?;
            engine_file::check_key(&dir.join("engine.json"), &manifest.key, &dev.key)
                .map_err(|e| model_err(dir, e.to_string()))?;
            let t = Instant::now();
            let weights =
                engine_file::EngineWeights::open(dir).map_err(|e| model_err(dir, e.to_string()))?;
            load_times.push(("weights", t.elapsed().as_secs_f64()));
            Some(EngineCtx {
                dir: dir.to_path_buf(),
                dev: std::rc::Rc::new(dev),
                weights: std::rc::Rc::new(weights),
                manifest,
            })
        } else {
            None
        };
        let mut load = |name: &'static str, p: &Path| -> Result<GraphSession> {
            let t = Instant::now();
            let s = match &engine {
                Some(e) => e.session(name)?,
                None => GraphSession::Ort(OrtSession::load(p, opts)?),
            };
            load_times.push((name, t.elapsed().as_secs_f64()));
            Ok(s)
        };
        let unet = load("unet", &paths[0])?;
        let text = load("text_encoder", &paths[1])?;
        let vae = load("vae_decoder", &paths[2])?;
        Ok(Self {
            info,
            unet,
            text,
            vae,
            vae_encoder: None,
            engine,
            session_options: opts.clone(),
            tokenizer,
            load_seconds: t.elapsed().as_secs_f64(),
            load_times,
        })
    }

    pub fn tokenizer(&self) -> &ClipTokenizer {
        &self.tokenizer
    }

    /// `last_hidden_state` of each prompt, `[n, 77, D]` flattened; warns about truncation,
    /// naming the prompt by its label (the option it came from, such as `--negative-prompt`).
    pub fn encode_prompts(
        &mut self,
        prompts: &[(String, &str)],
        warn: &mut dyn FnMut(String),
    ) -> Result<Vec<f32>> {
        let mut ids = Vec::with_capacity(prompts.len() * 77);
        for (label, p) in prompts {
            let e = self.tokenizer.encode(p);
            if e.truncated {
                warn(truncation_warning(label, p, e.n_tokens));
            }
            ids.extend(e.ids);
        }
        let shape = [prompts.len(), crate::tokenizer::MAX_LENGTH];
        let mut out = self
            .text
            .run_with(&[("input_ids", Input::I64(&shape, &ids))])?;
        Ok(out.remove(0).1.data)
    }

    /// Check options against the model before any work.
    pub fn validate(&self, o: &GenerateOptions) -> Result<()> {
        let s = self.info.latent_scale;
        check_size(o.width, o.height)?;
        if !o.guidance.is_finite() {
            return Err(PipelineError::Options(format!(
                "--guidance must be a finite number (got {}); 1 or less turns guidance off",
                o.guidance
            )));
        }
        if let Some(e) = &self.engine {
            let p = &e.manifest.profiles;
            let want = engine_file::Profile {
                batch: 1,
                frames: o.frames,
                height: o.height / s.max(1),
                width: o.width / s.max(1),
            };
            if !engine_file::Profile::contains(&p.min, &p.max, &want) {
                return Err(PipelineError::Options(format!(
                    "{} frames at {}×{} is outside the engine's profiles (frames {}..={}, {}×{} to {}×{}): rebuild it with --min-shape/--max-shape",
                    o.frames,
                    o.width,
                    o.height,
                    p.min.frames,
                    p.max.frames,
                    p.min.width * s,
                    p.min.height * s,
                    p.max.width * s,
                    p.max.height * s
                )));
            }
        }
        if o.height == 0 || o.width == 0 || o.height % s != 0 || o.width % s != 0 {
            return Err(PipelineError::Options(format!(
                "--height and --width must be positive multiples of {s} (got {}×{})",
                o.height, o.width
            )));
        }
        if o.frames == 0 {
            return Err(PipelineError::Options("--frames must be at least 1".into()));
        }
        if let Some(max) = self.info.max_frames {
            if o.frames > max {
                return Err(PipelineError::Options(format!(
                    "{} frames exceed the motion module's positional table ({max} frames per UNet call); context windows are not implemented yet: use --frames {max} or fewer",
                    o.frames
                )));
            }
        }
        if o.steps == 0 {
            return Err(PipelineError::Options("--steps must be at least 1".into()));
        }
        if o.decode_chunk == 0 {
            return Err(PipelineError::Options(
                "--decode-chunk must be at least 1".into(),
            ));
        }
        let mut given: Vec<usize> = o.frame_prompts.iter().map(|(f, _)| *f).collect();
        given.sort_unstable();
        if let Some(w) = given.windows(2).find(|w| w[0] == w[1]) {
            return Err(PipelineError::Options(format!(
                "--frame-prompt: frame {} is given two prompts",
                w[0]
            )));
        }
        if let Some((f, _)) = o.frame_prompts.iter().find(|(f, _)| *f >= o.frames) {
            return Err(PipelineError::Options(format!(
                "frame prompt at frame {f} is beyond the last frame ({})",
                o.frames - 1
            )));
        }
        let (h, w) = (o.height / s, o.width / s);
        let n = self.info.latent_channels * o.frames * h * w;
        if let Some(l) = &o.init_latents {
            if l.len() != n {
                return Err(PipelineError::Options(format!(
                    "initial latents have {} values; [1, {}, {}, {h}, {w}] needs {n}",
                    l.len(),
                    self.info.latent_channels,
                    o.frames
                )));
            }
        }
        Ok(())
    }

    /// Per-frame text embeddings `[F, 77, D]` of the positive prompt(s), and the negative one
    /// `[77, D]`.
    fn text_embeddings(
        &mut self,
        o: &GenerateOptions,
        warn: &mut dyn FnMut(String),
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let mut keys: Vec<(usize, &str)> = o
            .frame_prompts
            .iter()
            .map(|(f, p)| (*f, p.as_str()))
            .collect();
        keys.sort_by_key(|k| k.0);
        keys.dedup_by_key(|k| k.0);
        if keys.first().is_none_or(|k| k.0 != 0) {
            keys.insert(0, (0, o.prompt.as_str()));
        }
        let from_prompt = o.frame_prompts.iter().all(|(f, _)| *f != 0);
        let mut prompts = vec![("--negative-prompt".to_string(), o.negative_prompt.as_str())];
        prompts.extend(keys.iter().map(|&(f, p)| {
            let label = if f == 0 && from_prompt {
                "--prompt".to_string()
            } else {
                format!("--frame-prompt {f}")
            };
            (label, p)
        }));
        let emb = self.encode_prompts(&prompts, warn)?;
        let row = 77 * self.info.cross_attention_dim;
        if emb.len() != prompts.len() * row {
            return Err(model_err(
                &self.info.dir.join("text_encoder.onnx"),
                format!(
                    "its output holds {} values for {} prompts, not [{}, 77, {}] (the UNet's cross_attention_dim in model.json): the text encoder and the UNet do not belong together",
                    emb.len(),
                    prompts.len(),
                    prompts.len(),
                    self.info.cross_attention_dim
                ),
            ));
        }
        let negative = emb[..row].to_vec();
        let key_emb = |i: usize| &emb[(i + 1) * row..(i + 2) * row];
        let mut per_frame = Vec::with_capacity(o.frames * row);
        for f in 0..o.frames {
            let i = keys.iter().rposition(|k| k.0 <= f).unwrap_or(0);
            match keys.get(i + 1) {
                Some(next) if keys[i].0 != f => {
                    let w = (f - keys[i].0) as f32 / (next.0 - keys[i].0) as f32;
                    let (a, b) = (key_emb(i), key_emb(i + 1));
                    per_frame.extend(a.iter().zip(b).map(|(x, y)| x + w * (y - x)));
                }
                _ => per_frame.extend_from_slice(key_emb(i)),
            }
        }
        Ok((per_frame, negative))
    }

    /// Generate a video.
    pub fn generate(
        &mut self,
        o: &GenerateOptions,
        events: &mut dyn FnMut(Event),
    ) -> Result<Video> {
        let mut rgb = Vec::new();
        let mut v = self.generate_streaming(o, events, &mut |c| {
            rgb.extend(c.rgb());
            Ok(())
        })?;
        v.rgb = rgb;
        Ok(v)
    }

    /// Generate a video, handing the decoded frames to `sink` chunk by chunk as they come off
    /// the VAE (see [`Pipeline::decode_to`]); the returned [`Video`]'s `rgb` is empty.
    pub fn generate_streaming(
        &mut self,
        o: &GenerateOptions,
        events: &mut dyn FnMut(Event),
        sink: &mut dyn FnMut(FrameChunk) -> Result<()>,
    ) -> Result<Video> {
        self.validate(o)?;
        let mut warnings = Vec::new();
        let mut timings = Timings::default();
        let (f, h, w) = self.latent_dims(o);

        events(Event::Stage("text encoder"));
        let t = Instant::now();
        let ctx = self.text_context(o, &mut |m| {
            events(Event::Warning(m.clone()));
            warnings.push(m);
        })?;
        timings.text_encoder = t.elapsed().as_secs_f64();

        events(Event::Stage("denoising"));
        let t0 = Instant::now();
        let latents = self.denoise(o, &ctx, &mut timings, events)?;
        timings.denoise = t0.elapsed().as_secs_f64();

        events(Event::Stage("VAE decode"));
        let t = Instant::now();
        self.decode_to(&latents, f, h, w, o.decode_chunk, events, sink)?;
        timings.vae_decode = t.elapsed().as_secs_f64();
        Ok(Video {
            frames: f,
            height: o.height,
            width: o.width,
            rgb: Vec::new(),
            latents,
            timings,
            warnings,
        })
    }

    /// `(frames, latent height, latent width)` for these options.
    pub fn latent_dims(&self, o: &GenerateOptions) -> (usize, usize, usize) {
        (
            o.frames,
            o.height / self.info.latent_scale,
            o.width / self.info.latent_scale,
        )
    }

    /// The UNet's `encoder_hidden_states` `[B·F, 77, D]`: with guidance, the negative prompt's
    /// rows for every frame, then the positive (per-frame) rows.
    pub fn text_context(
        &mut self,
        o: &GenerateOptions,
        warn: &mut dyn FnMut(String),
    ) -> Result<Vec<f32>> {
        let (f, d) = (o.frames, self.info.cross_attention_dim);
        let cfg = o.guidance > 1.0;
        let (positive, negative) = self.text_embeddings(o, warn)?;
        let mut ctx = Vec::with_capacity(if cfg { 2 } else { 1 } * f * 77 * d);
        if cfg {
            for _ in 0..f {
                ctx.extend_from_slice(&negative);
            }
        }
        ctx.extend_from_slice(&positive);
        Ok(ctx)
    }

    /// The denoising loop from seeded (or given) noise to the final latents `[1, C, F, h, w]`;
    /// records the time of every step and of every UNet call in `timings`.
    pub fn denoise(
        &mut self,
        o: &GenerateOptions,
        ctx: &[f32],
        timings: &mut Timings,
        events: &mut dyn FnMut(Event),
    ) -> Result<Vec<f32>> {
        let c = self.info.latent_channels;
        let (f, h, w) = self.latent_dims(o);
        let d = self.info.cross_attention_dim;
        let cfg = o.guidance > 1.0;
        let batch = if cfg { 2 } else { 1 };
        if ctx.len() != batch * f * 77 * d {
            return Err(PipelineError::Options(format!(
                "text context has {} values; [{}, 77, {d}] needs {}",
                ctx.len(),
                batch * f,
                batch * f * 77 * d
            )));
        }
        let sched_cfg = match &o.scheduler_config {
            Some(c) => c.clone(),
            None if self.info.scheduler_defaults.is_object() => {
                SchedulerConfig::from_diffusers_json(&self.info.scheduler_defaults)?
            }
            None => SchedulerConfig::animatediff(),
        };
        let mut sched = scheduler::create(o.scheduler, &sched_cfg, o.steps)?;
        let n = c * f * h * w;
        let mut rng = NormalRng::new(o.seed);
        let mut latents = match &o.init_latents {
            Some(l) => l.clone(),
            None => {
                let mut v = vec![0f32; n];
                rng.fill(&mut v);
                v
            }
        };
        let sigma = sched.init_noise_sigma();
        latents.iter_mut().for_each(|x| *x *= sigma);

        let mut unet_in = vec![0f32; batch * n];
        let sample_shape = [batch, c, f, h, w];
        let ctx_shape = [batch * f, 77, d];
        let total = sched.timesteps().len();
        for i in 0..total {
            let ts = Instant::now();
            sched.scale_model_input(&latents, i, &mut unet_in[..n]);
            if cfg {
                let (a, b) = unet_in.split_at_mut(n);
                b.copy_from_slice(a);
            }
            let t = vec![sched.timesteps()[i]; batch];
            let tu = Instant::now();
            let out = self.unet.run_with(&[
                ("sample", Input::F32(&sample_shape, &unet_in)),
                ("timestep", Input::F32(&[batch], &t)),
                ("encoder_hidden_states", Input::F32(&ctx_shape, ctx)),
            ])?;
            timings.unet_steps.push(tu.elapsed().as_secs_f64());
            let mut noise = self.unet_output(out, &sample_shape)?;
            if cfg {
                let (u, c2) = noise.split_at(n);
                let guided: Vec<f32> = u
                    .iter()
                    .zip(c2)
                    .map(|(u, c2)| u + o.guidance * (c2 - u))
                    .collect();
                noise = guided;
            }
            sched.step(&noise, i, &mut latents, &mut |buf| rng.fill(buf));
            let bad = count_nonfinite(&latents);
            if bad > 0 {
                return Err(PipelineError::NonFinite {
                    what: "the latents",
                    when: format!("after denoising step {} of {total}", i + 1),
                    count: bad,
                    advice: self.overflow_advice(),
                });
            }
            timings.steps.push(ts.elapsed().as_secs_f64());
            events(Event::Step { index: i, total });
        }
        Ok(latents)
    }

    /// Encode RGB frames (`[F, H, W, 3]` in [0, 1], `H`, `W` multiples of the latent scale) into
    /// latents `[1, C, F, h, w]` (the VAE encoder's mean, times the scaling factor), `chunk`
    /// frames per call.
    /// `warn` hears of a chunk lowered to what a native engine can run.
    pub fn encode(
        &mut self,
        video: &crate::frames::Frames,
        chunk: usize,
        warn: &mut dyn FnMut(String),
    ) -> Result<Vec<f32>> {
        let s = self.info.latent_scale;
        if video.height % s != 0 || video.width % s != 0 {
            return Err(PipelineError::Options(format!(
                "the video is {}×{}; the VAE needs multiples of {s}",
                video.width, video.height
            )));
        }
        if self.vae_encoder.is_none() {
            let p = self.info.graph("vae_encoder")?;
            self.vae_encoder = Some(match &self.engine {
                Some(e) => e.session("vae_encoder")?,
                None => GraphSession::Ort(OrtSession::load(&p, &self.session_options)?),
            });
        }
        let enc = self.vae_encoder.as_mut().expect("loaded above");
        let (f, hh, ww) = (video.frames, video.height, video.width);
        let (h, w, c) = (hh / s, ww / s, self.info.latent_channels);
        let chunk = fit_chunk(
            f,
            chunk,
            enc.max_batch("image", &[1, 3, hh, ww])?,
            "encoding",
            (ww, hh),
            warn,
        );
        let mut lat = vec![0f32; c * f * h * w];
        let mut start = 0;
        while start < f {
            let m = chunk.min(f - start);
            // [m, 3, H, W] in [-1, 1]
            let mut img = vec![0f32; m * 3 * hh * ww];
            for j in 0..m {
                let fr = video.frame(start + j);
                for y in 0..hh {
                    for x in 0..ww {
                        for ch in 0..3 {
                            img[((j * 3 + ch) * hh + y) * ww + x] =
                                fr[(y * ww + x) * 3 + ch] * 2.0 - 1.0;
                        }
                    }
                }
            }
            let out = enc.run_with(&[("image", Input::F32(&[m, 3, hh, ww], &img))])?;
            let z =
                out.into_iter().next().map(|o| o.1).ok_or_else(|| {
                    model_err(&self.info.dir, "vae_encoder.onnx returned no output")
                })?;
            if z.shape != [m, c, h, w] {
                return Err(model_err(
                    &self.info.dir,
                    format!(
                        "vae_encoder.onnx returned {:?}, expected [{m}, {c}, {h}, {w}]",
                        z.shape
                    ),
                ));
            }
            for j in 0..m {
                for ch in 0..c {
                    let src = &z.data[(j * c + ch) * h * w..][..h * w];
                    let dst = &mut lat[(ch * f + start + j) * h * w..][..h * w];
                    for (d, &v) in dst.iter_mut().zip(src) {
                        *d = v * self.info.scaling_factor;
                    }
                }
            }
            start += m;
        }
        Ok(lat)
    }

    /// One UNet call: `sample` `[B, C, F, h, w]`, one timestep for the batch, `ctx` `[B·F, 77, D]`.
    pub fn unet(
        &mut self,
        sample: &[f32],
        shape: [usize; 5],
        t: f32,
        ctx: &[f32],
    ) -> Result<Vec<f32>> {
        let b = shape[0];
        let ts = vec![t; b];
        let ctx_shape = [b * shape[2], 77, self.info.cross_attention_dim];
        let out = self.unet.run_with(&[
            ("sample", Input::F32(&shape, sample)),
            ("timestep", Input::F32(&[b], &ts)),
            ("encoder_hidden_states", Input::F32(&ctx_shape, ctx)),
        ])?;
        self.unet_output(out, &shape)
    }

    /// The UNet's first output, which must have the sample's shape (an engine or graph of
    /// other shapes is a clear error, not a panic or a short noise prediction).
    fn unet_output(&self, out: Vec<(String, Tensor)>, shape: &[usize]) -> Result<Vec<f32>> {
        let Some((name, t)) = out.into_iter().next() else {
            return Err(model_err(&self.info.dir, "unet.onnx returned no output"));
        };
        if t.shape != shape || t.data.len() != shape.iter().product::<usize>() {
            return Err(model_err(
                &self.info.dir,
                format!(
                    "unet.onnx returned `{name}` of shape {:?} ({} values); expected the \
                     sample's shape {shape:?}",
                    t.shape,
                    t.data.len()
                ),
            ));
        }
        Ok(t.data)
    }

    /// Decode `[1, C, F, h, w]` latents into `[F, H, W, 3]` RGB in [0, 1], `chunk` frames per
    /// VAE call.
    pub fn decode(
        &mut self,
        latents: &[f32],
        f: usize,
        h: usize,
        w: usize,
        chunk: usize,
        events: &mut dyn FnMut(Event),
    ) -> Result<Vec<f32>> {
        let mut rgb: Vec<f32> = Vec::new();
        self.decode_to(latents, f, h, w, chunk, events, &mut |c| {
            rgb.extend(c.rgb());
            Ok(())
        })?;
        Ok(rgb)
    }

    /// Decode `[1, C, F, h, w]` latents `chunk` frames per VAE call, handing each decoded chunk
    /// (the VAE's `[m, 3, H, W]` output in `[-1, 1]`) to `sink` in frame order. One VAE call runs
    /// ahead: on the native engine the GPU decodes chunk `i + 1` while chunk `i` travels to
    /// pinned host memory and `sink` takes it. Host memory holds a bounded number of chunks,
    /// whatever the frame count: the engine's two pinned output slots, the chunk collected from
    /// one, and (with a [`crate::frame_stream::FrameStream`] as the sink) one queued and one
    /// being encoded.
    #[allow(clippy::too_many_arguments)]
    pub fn decode_to(
        &mut self,
        latents: &[f32],
        f: usize,
        h: usize,
        w: usize,
        chunk: usize,
        events: &mut dyn FnMut(Event),
        sink: &mut dyn FnMut(FrameChunk) -> Result<()>,
    ) -> Result<()> {
        let c = self.info.latent_channels;
        let hw = h * w;
        let inv = 1.0 / self.info.scaling_factor;
        let chunk = self.decode_chunk(f, h, w, chunk, &mut |m| events(Event::Warning(m)))?;
        // [C, F, h, w] → [m, C, h, w] for frames start..start+m
        let slice = |start: usize, m: usize| {
            let mut z = vec![0f32; m * c * hw];
            for j in 0..m {
                for ch in 0..c {
                    let src = (ch * f + start + j) * hw;
                    let dst = (j * c + ch) * hw;
                    for (o, s) in z[dst..dst + hw].iter_mut().zip(&latents[src..src + hw]) {
                        *o = s * inv;
                    }
                }
            }
            z
        };
        // The native engine runs each input shape as its own program (its own arena, tuned
        // algorithms and CUDA graph): a shorter last chunk is padded to the chunk's length with
        // copies of its last frame (frames decode independently) and the copies dropped.
        let pad = matches!(self.vae, GraphSession::Cuda(_)) && f > chunk;
        let starts: Vec<usize> = (0..f).step_by(chunk).collect();
        let mut pending = std::collections::VecDeque::new();
        let mut result = Ok(());
        for &start in &starts {
            let m = chunk.min(f - start);
            let mut z = slice(start, m);
            let run = if pad { chunk } else { m };
            let last = z[(m - 1) * c * hw..].to_vec();
            for _ in m..run {
                z.extend_from_slice(&last);
            }
            match self
                .vae
                .submit(&[("latent", Input::F32(&[run, c, h, w], &z))])
            {
                Ok(p) => pending.push_back((start, m, run, p)),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
            // Keep one run in flight ahead of the one being collected.
            if pending.len() == 2 {
                let (start, m, run, p) = pending.pop_front().expect("two pending");
                result = self.take_decoded((start, m, run), f, p, events, sink);
                if result.is_err() {
                    break;
                }
            }
        }
        // after an error, the run still in flight is collected and dropped: on the native
        // engine its output slot would otherwise stay taken for later decodes
        while let Some((start, m, run, p)) = pending.pop_front() {
            if result.is_ok() {
                result = self.take_decoded((start, m, run), f, p, events, sink);
            } else {
                let _ = self.vae.collect(p);
            }
        }
        result
    }

    /// Hand frames `start..start + m` of a decode of `run` frames (the rest padding) to `sink`.
    fn take_decoded(
        &mut self,
        (start, m, run): (usize, usize, usize),
        f: usize,
        p: PendingRun,
        events: &mut dyn FnMut(Event),
        sink: &mut dyn FnMut(FrameChunk) -> Result<()>,
    ) -> Result<()> {
        let out = self.vae.collect(p)?;
        let img = out
            .into_iter()
            .next()
            .map(|o| o.1)
            .ok_or_else(|| model_err(&self.info.dir, "vae_decoder.onnx returned no output"))?;
        if img.shape.len() != 4 || img.shape[0] != run || img.shape[1] != 3 {
            return Err(model_err(
                &self.info.dir,
                format!(
                    "vae_decoder.onnx returned `image` of shape {:?}; expected [{run}, 3, H, W]",
                    img.shape
                ),
            ));
        }
        let mut data = img.data;
        data.truncate(m * 3 * img.shape[2] * img.shape[3]);
        let bad = count_nonfinite(&data);
        if bad > 0 {
            return Err(PipelineError::NonFinite {
                what: "the decoded frames",
                when: format!("(frames {start}..{})", start + m),
                count: bad,
                advice: self.overflow_advice(),
            });
        }
        sink(FrameChunk {
            start,
            frames: m,
            height: img.shape[2],
            width: img.shape[3],
            layout: ChunkLayout::PlanarSigned,
            data,
        })?;
        events(Event::Decoded {
            done: start + m,
            total: f,
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vae_chunk_past_what_the_engine_runs_is_lowered_with_a_warning() {
        let mut said = Vec::new();
        let mut fit = |frames, want, most| {
            fit_chunk(
                frames,
                want,
                most,
                "decoding",
                (768, 768),
                &mut |m: String| said.push(m),
            )
        };
        // ONNX Runtime (no limit), an engine that runs the chunk, fewer frames than either:
        // as asked (at most the frames), silently
        assert_eq!(fit(16, 16, None), 16);
        assert_eq!(fit(16, 16, Some(16)), 16);
        assert_eq!(fit(8, 16, Some(14)), 8);
        assert_eq!(fit(40, 4, Some(14)), 4);
        assert_eq!(fit(5, 0, Some(3)), 1);
        // the SD1.5 decoder at 768×768 runs at most 14: 16 frames as two calls of 8 (not 14
        // and 2 padded to 14), 40 as three of 14
        assert_eq!(fit(16, 16, Some(14)), 8);
        assert_eq!(fit(40, 16, Some(14)), 14);
        assert_eq!(fit(29, 32, Some(14)), 10);
        assert_eq!(said.len(), 3);
        assert!(
            said[0].starts_with(
                "decoding 8 frames per VAE call instead of 16: at 768×768 more than 14"
            ),
            "{said:?}"
        );
    }

    #[test]
    fn shapes_the_engine_was_not_tuned_for_are_named() {
        let opt = engine_file::Profile {
            batch: 1,
            frames: 16,
            height: 64,
            width: 64,
        };
        let o = GenerateOptions {
            frames: 16,
            height: 512,
            width: 512,
            guidance: 7.5,
            decode_chunk: 4,
            ..Default::default()
        };
        // the build's opt shape, with guidance, 4 frames per VAE call as built
        assert!(untuned_shapes(&opt, 4, 8, &o).is_empty());
        // a VAE built for 16 frames a call, decoded 4 at a time
        let n = untuned_shapes(&opt, 16, 8, &o);
        assert!(
            n.len() == 1 && n[0].contains("VAE decoding 4 frames"),
            "{n:?}"
        );
        // guidance off halves the UNet's batch
        let n = untuned_shapes(
            &opt,
            4,
            8,
            &GenerateOptions {
                guidance: 1.0,
                ..o.clone()
            },
        );
        assert!(n.len() == 1 && n[0].contains("without guidance"), "{n:?}");
        // another frame count: the UNet, and (fewer frames than a chunk) the VAE too
        let n = untuned_shapes(
            &opt,
            16,
            8,
            &GenerateOptions {
                frames: 8,
                decode_chunk: 16,
                ..o.clone()
            },
        );
        assert_eq!(n.len(), 2, "{n:?}");
        assert!(
            n[0].contains("UNet at 8 frames 512×512") && n[1].contains("8 frames"),
            "{n:?}"
        );
    }
}
