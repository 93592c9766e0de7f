//! The engine file (`motionrt build` output) and the sessions that run it.
//!
//! An engine is a folder: `engine.json` (format `motionrt.engine/1`: the [`DeviceKey`] it was built
//! for, the precision, the optimization profiles with the memory plan of each graph at each, the
//! chosen convolution and GEMM algorithms), `weights.safetensors` (every large float weight, converted
//! once to the engine's precision), the fused graphs with those weights stripped, `model.json`
//! and the tokenizer. Loading it on another GPU, driver, library or motionrt version is refused
//! with a message that says to rebuild.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use motionrt_onnx::proto::{DataLocation, ModelProto, TensorProtoDataType};
use serde::{Deserialize, Serialize};

use super::exec::{
    CudaDevice, DeviceKey, GpuProgram, Precision, TacticCache, WeightData, WeightStore,
};
use super::program::{self, InitializerSource, Layout};
use super::source::FileInitializers;
use super::EngineError;

pub const FORMAT: &str = "motionrt.engine/1";
/// Float initializers larger than this go to `weights.safetensors`; smaller ones stay in the
/// graph (the compiler evaluates shape-sized constants on the host).
pub const INLINE_MAX: usize = 4096;

/// Batch, frames and latent size of one optimization profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    pub batch: usize,
    pub frames: usize,
    /// Latent height and width (pixels / 8).
    pub height: usize,
    pub width: usize,
}

impl Profile {
    pub fn parse(s: &str) -> Result<Self, String> {
        // BxFxHxW in pixels, e.g. 1x16x512x512
        let expected = || {
            format!(
                "{s:?}: expected BATCHxFRAMESxHEIGHTxWIDTH with the size in pixels, multiples of 8 (e.g. 1x16x512x512)"
            )
        };
        let v: Vec<usize> = s
            .split('x')
            .map(|p| p.parse::<usize>().map_err(|_| expected()))
            .collect::<Result<_, _>>()?;
        if v.len() != 4 || v[2] % 8 != 0 || v[3] % 8 != 0 || v.contains(&0) {
            return Err(expected());
        }
        // beyond what runs anywhere, and bounded so that no size the planner multiplies out
        // can overflow
        let side = crate::pipeline::MAX_SIDE;
        if v[0] > 64 || v[1] > 1024 || v[2] > side || v[3] > side {
            return Err(format!(
                "{s:?}: at most 64 videos a batch, 1024 frames and {side}×{side} pixels"
            ));
        }
        Ok(Self {
            batch: v[0],
            frames: v[1],
            height: v[2] / 8,
            width: v[3] / 8,
        })
    }

    /// Input shapes of `graph` at this profile (CFG doubles the UNet batch; the VAE decodes
    /// `vae_chunk` frames per call).
    pub fn shapes(
        &self,
        graph: &str,
        text_width: usize,
        vae_chunk: usize,
    ) -> Vec<(&'static str, Vec<usize>)> {
        let (b, f, h, w) = (2 * self.batch, self.frames, self.height, self.width);
        match graph {
            "unet" => vec![
                ("sample", vec![b, 4, f, h, w]),
                ("timestep", vec![b]),
                ("encoder_hidden_states", vec![b * f, 77, text_width]),
            ],
            "text_encoder" => vec![("input_ids", vec![2 * self.batch, 77])],
            "vae_decoder" => vec![("latent", vec![vae_chunk.min(f), 4, h, w])],
            _ => vec![("image", vec![vae_chunk.min(f), 3, 8 * h, 8 * w])],
        }
    }

    pub fn contains(lo: &Self, hi: &Self, x: &Self) -> bool {
        (lo.batch..=hi.batch).contains(&x.batch)
            && (lo.frames..=hi.frames).contains(&x.frames)
            && (lo.height..=hi.height).contains(&x.height)
            && (lo.width..=hi.width).contains(&x.width)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Profiles {
    pub min: Profile,
    pub opt: Profile,
    pub max: Profile,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GraphEntry {
    pub name: String,
    pub file: String,
    pub steps: usize,
    /// Arena bytes (activations reused by lifetime) at the min, opt and max profiles.
    pub arena_bytes: BTreeMap<String, usize>,
    /// Without reuse, at the opt profile.
    pub arena_unshared_bytes: usize,
    pub weight_bytes: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EngineManifest {
    pub format: String,
    pub key: DeviceKey,
    pub precision: Precision,
    /// Activation layout around convolutions (engines written before it existed: NCHW).
    #[serde(default = "nchw")]
    pub layout: Layout,
    pub profiles: Profiles,
    pub vae_chunk: usize,
    pub text_width: usize,
    pub graphs: Vec<GraphEntry>,
    pub tactics: TacticCache,
}

fn nchw() -> Layout {
    Layout::Nchw
}

/// Refuse an engine built for another GPU or versions; the error lists every difference.
pub fn check_key(path: &Path, built: &DeviceKey, here: &DeviceKey) -> Result<(), EngineError> {
    let diffs: Vec<String> = built
        .differences(here)
        .into_iter()
        .map(|(k, b, h)| format!("{k}: built for {b}, this machine has {h}"))
        .collect();
    if diffs.is_empty() {
        return Ok(());
    }
    Err(EngineError::File {
        path: path.to_path_buf(),
        message: format!(
            "this engine was built for another GPU or software versions ({}); rebuild it here with `motionrt build --model EXPORT_DIR --out ENGINE`",
            diffs.join("; ")
        ),
    })
}

pub fn read_manifest(dir: &Path) -> Result<EngineManifest, EngineError> {
    let p = dir.join("engine.json");
    let text = std::fs::read_to_string(&p).map_err(|e| EngineError::File {
        path: p.clone(),
        message: format!("{e} (an engine folder written by `motionrt build` holds engine.json)"),
    })?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| EngineError::File {
        path: p.clone(),
        message: format!("not a motionrt engine manifest (not JSON: {e})"),
    })?;
    // The format first: a manifest of another format (or of another motionrt whose manifest
    // gained a field) gets the rebuild message, not a parse error about one of its fields.
    let Some(format) = v.get("format").and_then(|f| f.as_str()) else {
        return Err(EngineError::File {
            path: p,
            message: "not a motionrt engine manifest (it has no \"format\")".into(),
        });
    };
    if format != FORMAT {
        return Err(EngineError::File {
            path: p,
            message: format!(
                "format {format:?}, this motionrt reads {FORMAT:?}: rebuild the engine with `motionrt build --model EXPORT_DIR --out ENGINE`"
            ),
        });
    }
    serde_json::from_value(v).map_err(|e| EngineError::File {
        path: p,
        message: format!(
            "not an engine manifest this motionrt ({}) reads: {e}; if another motionrt build wrote it, rebuild the engine with `motionrt build --model EXPORT_DIR --out ENGINE`",
            env!("CARGO_PKG_VERSION")
        ),
    })
}

/// The engine's weights (`weights.safetensors`), held in memory; the header is parsed once.
pub struct EngineWeights {
    path: PathBuf,
    bytes: Vec<u8>,
    meta: safetensors::tensor::Metadata,
    /// Where the tensors' data starts in `bytes` (after the length and the header).
    data_start: usize,
}

impl EngineWeights {
    pub fn open(dir: &Path) -> Result<Self, EngineError> {
        let path = dir.join("weights.safetensors");
        let bytes = std::fs::read(&path).map_err(|e| EngineError::File {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let (n, meta) =
            safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| EngineError::File {
                path: path.clone(),
                message: format!("not a safetensors file: {e}"),
            })?;
        Ok(Self {
            path,
            bytes,
            meta,
            data_start: 8 + n,
        })
    }

    pub fn get(&self, name: &str) -> Result<WeightData, EngineError> {
        let t = self.meta.info(name).ok_or_else(|| EngineError::File {
            path: self.path.clone(),
            message: format!("tensor {name}: not in the engine's weights"),
        })?;
        // read_metadata checked that every tensor's range lies in the file
        let (a, b) = t.data_offsets;
        let d = &self.bytes[self.data_start + a..self.data_start + b];
        Ok(match t.dtype {
            safetensors::Dtype::F16 => WeightData::F16(
                d.chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]))
                    .collect(),
            ),
            safetensors::Dtype::F32 => WeightData::F32(
                d.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
            other => {
                return Err(EngineError::File {
                    path: self.path.clone(),
                    message: format!("tensor {name}: dtype {other:?}, expected F16 or F32"),
                })
            }
        })
    }
}

/// Move every float initializer larger than [`INLINE_MAX`] out of `model` (read through
/// `src`): returns `(name, dims, values)`; the graph keeps the initializer's name, type and dims
/// with no data.
pub fn strip_weights(
    model: &mut ModelProto,
    src: &FileInitializers,
) -> Result<super::program::Outputs, EngineError> {
    let g = model
        .graph
        .as_mut()
        .ok_or_else(|| EngineError::Graph("no graph".into()))?;
    let mut out = Vec::new();
    for t in g.initializer.iter_mut() {
        let n: usize = t.dims.iter().map(|&d| d as usize).product();
        if t.data_type != TensorProtoDataType::Float as i32 || n <= INLINE_MAX {
            if t.data_location == DataLocation::External as i32 {
                // small external initializers come inline
                let b = src.bytes(t)?;
                t.raw_data = b;
                t.external_data.clear();
                t.data_location = DataLocation::Default as i32;
            }
            continue;
        }
        let v = src.f32s(t)?;
        out.push((
            t.name.clone(),
            t.dims.iter().map(|&d| d as usize).collect(),
            v,
        ));
        t.raw_data.clear();
        t.float_data.clear();
        t.external_data.clear();
        t.data_location = DataLocation::Default as i32;
    }
    Ok(out)
}

/// Reads initializers of a stripped engine graph: inline ones from the graph, the others are
/// device weights (never needed on the host).
pub struct InlineInitializers;

impl InitializerSource for InlineInitializers {
    fn f32s(&self, t: &motionrt_onnx::proto::TensorProto) -> Result<Vec<f32>, EngineError> {
        if !t.float_data.is_empty() {
            return Ok(t.float_data.clone());
        }
        if t.raw_data.is_empty() {
            return Err(EngineError::Graph(format!(
                "initializer {} lives in weights.safetensors but the engine needs it on the host",
                t.name
            )));
        }
        Ok(t.raw_data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
    fn i64s(&self, t: &motionrt_onnx::proto::TensorProto) -> Result<Vec<i64>, EngineError> {
        if !t.int64_data.is_empty() {
            return Ok(t.int64_data.clone());
        }
        Ok(t.raw_data
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8")))
            .collect())
    }
}

/// One graph of an engine on the GPU: compiled per input shapes on first use (the programs share
/// the graph's weights on the device), the second call with the same shapes captures a CUDA
/// graph that later calls replay.
pub struct CudaSession {
    pub name: String,
    dev: Rc<CudaDevice>,
    model: ModelProto,
    weights: Rc<EngineWeights>,
    precision: Precision,
    layout: Layout,
    tactics: TacticCache,
    programs: HashMap<Vec<Vec<usize>>, (GpuProgram, usize)>,
    /// The graph's weights on the device, shared by its programs (one per input shapes).
    store: Rc<RefCell<WeightStore>>,
    /// Seconds spent making programs (compile, weight upload, algorithm timing), which happens
    /// on the first call at each input shape.
    pub program_load_seconds: f64,
    /// [`CudaSession::max_batch`]'s answers by input and shape (each a compile of the graph).
    max_batches: HashMap<(String, Vec<usize>), usize>,
}

/// Capture `gp`'s launches in a CUDA graph; a capture that fails leaves the program running
/// its launches one by one, with a warning (a launch this driver or library will not capture
/// costs the graph, not the run).
fn capture_or_warn(dev: &CudaDevice, name: &str, gp: &mut GpuProgram) -> Result<(), EngineError> {
    if let Err(e) = gp.capture(dev) {
        dev.stream.synchronize().map_err(|s| {
            EngineError::Graph(format!(
                "{name}: CUDA graph capture failed ({e}) and the GPU did not recover ({s:?})"
            ))
        })?;
        eprintln!("warning: {name}: CUDA graph capture failed ({e}); its launches run one by one");
    }
    Ok(())
}

impl Drop for CudaSession {
    fn drop(&mut self) {
        // programs (their CUDA graphs and buffers) before the device they were made on, which
        // may go with this session: its kernels' modules unload when it drops
        self.programs.clear();
    }
}

impl CudaSession {
    pub fn load(
        dev: Rc<CudaDevice>,
        dir: &Path,
        entry: &GraphEntry,
        weights: Rc<EngineWeights>,
        m: &EngineManifest,
    ) -> Result<Self, EngineError> {
        let model = motionrt_onnx::load_model(&dir.join(&entry.file))?;
        Ok(Self {
            name: entry.name.clone(),
            dev,
            model,
            weights,
            precision: m.precision,
            layout: m.layout,
            tactics: m.tactics.clone(),
            programs: HashMap::new(),
            store: WeightStore::shared(),
            program_load_seconds: 0.0,
            max_batches: HashMap::new(),
        })
    }

    /// Most samples per call (`input`'s first axis) whose program keeps every tensor within
    /// [`program::MAX_TENSOR_ELEMENTS`], `one` being `input`'s shape for one sample
    /// ([`max_batch`]).
    pub fn max_batch(&mut self, input: &str, one: &[usize]) -> Result<usize, EngineError> {
        let key = (input.to_string(), one.to_vec());
        if let Some(&n) = self.max_batches.get(&key) {
            return Ok(n);
        }
        let n = max_batch(&self.model, input, one, self.layout, self.precision)?;
        self.max_batches.insert(key, n);
        Ok(n)
    }

    /// The convolution and GEMM algorithms it has: the engine's, and those timed since for
    /// other input shapes.
    pub fn tactics(&self) -> &TacticCache {
        &self.tactics
    }

    /// Take `other`'s algorithms for problems it has none for (a timing cache of earlier runs:
    /// each is checked on this GPU before it is used).
    pub fn merge_tactics(&mut self, other: &TacticCache) {
        self.tactics.merge(other);
    }

    /// Run with float32 inputs (int64 through `ids`): `(name, shape, values)` per output.
    pub fn run(
        &mut self,
        inputs: &[(&str, &[usize], &[f32])],
        ids: &[(&str, &[usize], &[i64])],
    ) -> Result<super::program::Outputs, EngineError> {
        let t = self.submit(inputs, ids)?;
        self.collect(t)
    }

    /// Queue a run (see [`GpuProgram::submit`]); [`CudaSession::collect`] waits for it. At most
    /// two runs of one input shape may be outstanding.
    pub fn submit(
        &mut self,
        inputs: &[(&str, &[usize], &[f32])],
        ids: &[(&str, &[usize], &[i64])],
    ) -> Result<Ticket, EngineError> {
        let mut key: Vec<Vec<usize>> = inputs.iter().map(|i| i.1.to_vec()).collect();
        key.extend(ids.iter().map(|i| i.1.to_vec()));
        if !self.programs.contains_key(&key) {
            let t = std::time::Instant::now();
            let shapes: Vec<(&str, Vec<usize>)> = inputs
                .iter()
                .map(|i| (i.0, i.1.to_vec()))
                .chain(ids.iter().map(|i| (i.0, i.1.to_vec())))
                .collect();
            let prog = program::compile(&self.model, &shapes, &InlineInitializers, self.layout)?;
            let w = self.weights.clone();
            let g = self.name.clone();
            let weight = move |n: &str| w.get(&format!("{g}/{n}"));
            let gp = GpuProgram::load_with(
                &self.dev,
                prog,
                self.precision,
                &weight,
                &mut self.tactics,
                true,
                self.store.clone(),
            )?;
            self.dev
                .stream
                .synchronize()
                .map_err(|e| EngineError::Graph(format!("{}: loading: {e:?}", self.name)))?;
            self.program_load_seconds += t.elapsed().as_secs_f64();
            self.programs.insert(key.clone(), (gp, 0));
        }
        let (gp, calls) = self.programs.get_mut(&key).expect("inserted");
        // the first call runs eagerly (loading what loads lazily), the second captures (its
        // only attempt) and replays
        if *calls == 1 && !gp.captured() {
            capture_or_warn(&self.dev, &self.name, gp)?;
        }
        *calls += 1;
        let f: Vec<(&str, &[f32])> = inputs.iter().map(|i| (i.0, i.2)).collect();
        let i: Vec<(&str, &[i64])> = ids.iter().map(|i| (i.0, i.2)).collect();
        let slot = gp.submit(&self.dev, &f, &i)?;
        Ok(Ticket { key, slot })
    }

    /// Capture the CUDA graph of every program that has run once and not been captured (so
    /// that its next call replays it).
    pub fn capture_loaded(&mut self) -> Result<(), EngineError> {
        for (gp, calls) in self.programs.values_mut() {
            // (a program past its second call had its one capture attempt)
            if *calls == 1 && !gp.captured() {
                capture_or_warn(&self.dev, &self.name, gp)?;
                *calls = 2;
            }
        }
        Ok(())
    }

    /// Wait for a submitted run's outputs (in pinned host memory) and return them.
    pub fn collect(&mut self, t: Ticket) -> Result<super::program::Outputs, EngineError> {
        let (gp, _) = self
            .programs
            .get_mut(&t.key)
            .ok_or_else(|| EngineError::Graph("collect: no program for these shapes".into()))?;
        gp.collect(t.slot)
    }
}

/// Most samples per call of a single-input graph (the VAE's: frames decode and encode
/// independently) whose program, as the executor runs it, keeps every activation within
/// [`program::MAX_TENSOR_ELEMENTS`]: `one` is `input`'s shape for one sample (`[1, ..]`), and
/// the activations grow with the samples (the weights do not; [`GpuProgram::load_with`]
/// checks every tensor of the program it is given). At least 1 (a sample too large on its own is
/// that load's error).
pub fn max_batch(
    model: &ModelProto,
    input: &str,
    one: &[usize],
    layout: Layout,
    precision: Precision,
) -> Result<usize, EngineError> {
    let mut prog = program::compile(model, &[(input, one.to_vec())], &InlineInitializers, layout)?;
    super::launch::specialize(&mut prog, precision);
    Ok(match prog.largest_activation() {
        Some((_, n)) if n > 0 => (program::MAX_TENSOR_ELEMENTS / n).max(1),
        _ => usize::MAX,
    })
}

/// A run queued by [`CudaSession::submit`].
#[derive(Debug)]
pub struct Ticket {
    key: Vec<Vec<usize>>,
    slot: usize,
}

/// Build an engine for the GPU `dev` from the exported float32 graphs in `model_dir`.
/// `progress(graph, message)` reports each stage. Writes `out` through a temporary folder; an
/// engine already at `out` is replaced once the new one is complete (kept if the build fails).
#[allow(clippy::too_many_arguments)]
pub fn build(
    dev: &CudaDevice,
    model_dir: &Path,
    out: &Path,
    precision: Precision,
    layout: Layout,
    profiles: &Profiles,
    vae_chunk: usize,
    tactics: &mut TacticCache,
    progress: &mut dyn FnMut(&str, &str),
) -> Result<EngineManifest, EngineError> {
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = out.file_name().and_then(|n| n.to_str()).unwrap_or("engine");
    let tmp = parent.join(format!(".{name}.partial"));
    let _ = std::fs::remove_dir_all(&tmp);
    // removed if the process is interrupted while the engine is built
    let _unfinished = motionrt_kernels::unfinished::register(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| EngineError::File {
        path: tmp.clone(),
        message: e.to_string(),
    })?;
    let r = build_into(
        dev, model_dir, &tmp, precision, layout, profiles, vae_chunk, tactics, progress,
    );
    match r {
        Ok(m) => {
            // an engine being replaced goes only now that its successor is complete
            let old = parent.join(format!(".{name}.old"));
            let replacing = out.exists();
            let io = |p: &Path, e: std::io::Error| EngineError::File {
                path: p.to_path_buf(),
                message: e.to_string(),
            };
            // (a folder, or whatever --overwrite was told to replace)
            let remove = |p: &Path| {
                let _ = std::fs::remove_dir_all(p).or_else(|_| std::fs::remove_file(p));
            };
            if replacing {
                remove(&old);
            }
            // the earlier engine and the new one trade places whole, or not at all if
            // interrupted; the earlier one, once replaced, is removed by an interrupt too
            let _removing = motionrt_kernels::unfinished::register(&old);
            motionrt_kernels::unfinished::commit(|| {
                if replacing {
                    std::fs::rename(out, &old).map_err(|e| io(out, e))?;
                }
                if let Err(e) = std::fs::rename(&tmp, out) {
                    if replacing {
                        let _ = std::fs::rename(&old, out);
                    }
                    return Err(io(out, e));
                }
                Ok(())
            })?;
            if replacing {
                remove(&old);
            }
            Ok(m)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

/// Whether graph `g`'s program `prog` at the `label` profile `p` (`frames` samples a call: the
/// VAE's chunk) keeps its tensors within [`program::MAX_TENSOR_ELEMENTS`]: `Ok(None)` when it
/// does; for the VAE at the min or max profile a note (frames decode and encode independently,
/// and `run` takes as many a call as fit, `max_batch`); an error for the VAE at the opt profile
/// (the program the build times), saying which `--vae-chunk` fits, and for any other graph.
pub fn check_profile(
    g: &str,
    label: &str,
    p: &Profile,
    frames: usize,
    prog: &program::Program,
) -> Result<Option<String>, EngineError> {
    let Err(e) = prog.check_tensor_sizes() else {
        return Ok(None);
    };
    let most = prog
        .largest_activation()
        .map(|(_, n)| (program::MAX_TENSOR_ELEMENTS / n.div_ceil(frames.max(1))).max(1));
    let (w, h) = (8 * p.width, 8 * p.height);
    match most {
        Some(most) if g.starts_with("vae_") && label == "opt" => Err(EngineError::Graph(format!(
            "{g} at the opt profile ({w}x{h}), {frames} frames a call: {e}; build with \
             --vae-chunk {most} or less"
        ))),
        Some(most) if g.starts_with("vae_") => Ok(Some(format!(
            "note: at the {label} profile ({w}x{h}) {frames} frames a call would make tensors \
             past 32-bit element counts; `run` takes {most} a call there"
        ))),
        _ => Err(EngineError::Graph(format!(
            "{g} at the {label} profile ({}x{}x{h}x{w}): {e}; lower --{label}-shape",
            p.batch, p.frames
        ))),
    }
}

#[allow(clippy::too_many_arguments)]
fn build_into(
    dev: &CudaDevice,
    model_dir: &Path,
    tmp: &Path,
    precision: Precision,
    layout: Layout,
    profiles: &Profiles,
    vae_chunk: usize,
    tactics: &mut TacticCache,
    progress: &mut dyn FnMut(&str, &str),
) -> Result<EngineManifest, EngineError> {
    let ioerr = |p: &Path, e: std::io::Error| EngineError::File {
        path: p.to_path_buf(),
        message: e.to_string(),
    };
    let text_width = {
        let s = motionrt_onnx::summarize(&motionrt_onnx::load_model(&model_dir.join("unet.onnx"))?);
        s.inputs
            .iter()
            .find(|i| i.name == "encoder_hidden_states")
            .and_then(|i| i.dims.last().and_then(|d| d.parse().ok()))
            .ok_or_else(|| {
                EngineError::Graph("unet.onnx: no encoder_hidden_states [.., .., D] input".into())
            })?
    };
    let mut all: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    let mut graphs = Vec::new();
    for g in ["unet", "text_encoder", "vae_decoder", "vae_encoder"] {
        let src = model_dir.join(format!("{g}.onnx"));
        if !src.exists() {
            continue;
        }
        progress(g, "fusing");
        let fused = tmp.join(format!(".{g}.fused.onnx"));
        super::plan_graph(&src, &fused)?;
        let mut model = motionrt_onnx::load_model(&fused)?;
        let init = FileInitializers::new(&fused);
        progress(g, "compiling at the min/opt/max profiles");
        let mut arena = BTreeMap::new();
        let mut unshared = 0;
        let mut steps = 0;
        let mut opt_prog = None;
        for (label, p) in [
            ("min", profiles.min),
            ("opt", profiles.opt),
            ("max", profiles.max),
        ] {
            let mut prog =
                program::compile(&model, &p.shapes(g, text_width, vae_chunk), &init, layout)?;
            // what the executor will run (loaded below as it is, not specialised again)
            super::launch::specialize(&mut prog, precision);
            let frames = p.shapes(g, text_width, vae_chunk)[0].1[0];
            if let Some(note) = check_profile(g, label, &p, frames, &prog)? {
                progress(g, &note);
            }
            let plan = super::launch::plan_memory_for(&prog, precision);
            arena.insert(label.to_string(), plan.arena_bytes);
            if label == "opt" {
                unshared = plan.unshared_bytes;
                steps = prog.steps.len();
                opt_prog = Some(prog);
            }
        }
        progress(g, "timing convolution and GEMM algorithms on this GPU");
        let weight = |n: &str| -> Result<WeightData, EngineError> {
            let t = model
                .graph
                .as_ref()
                .unwrap()
                .initializer
                .iter()
                .find(|t| t.name == n)
                .ok_or_else(|| EngineError::Graph(format!("no initializer {n}")))?;
            Ok(WeightData::F32(init.f32s(t)?))
        };
        let gp = GpuProgram::load_with(
            dev,
            opt_prog.expect("opt"),
            precision,
            &weight,
            tactics,
            false,
            WeightStore::shared(),
        )?;
        let weight_bytes = gp.weight_bytes;
        // the arena the executor allocates at opt once the timing chose (GEGLU and GroupNorm
        // pairs on one kernel plan it again, smaller)
        arena.insert("opt".to_string(), gp.memory.arena_bytes);
        drop(gp);
        let stripped = strip_weights(&mut model, &init)?;
        let file = format!("{g}.onnx");
        motionrt_onnx::write_model(&model, &tmp.join(&file))?;
        let _ = std::fs::remove_file(&fused);
        let _ = std::fs::remove_file(tmp.join(format!(".{g}.fused.onnx.data")));
        for (n, dims, v) in stripped {
            all.push((format!("{g}/{n}"), dims, v));
        }
        graphs.push(GraphEntry {
            name: g.into(),
            file,
            steps,
            arena_bytes: arena,
            arena_unshared_bytes: unshared,
            weight_bytes,
        });
    }
    progress("weights", "converting and writing weights.safetensors");
    // graph-qualified names in the file; the sessions look weights up by initializer name
    let data: Vec<(String, Vec<usize>, Vec<u8>, safetensors::Dtype)> = all
        .into_iter()
        .map(|(n, dims, v)| match precision {
            Precision::Fp16 => (
                n,
                dims,
                v.iter()
                    .flat_map(|&x| half::f16::from_f32(x).to_bits().to_le_bytes())
                    .collect(),
                safetensors::Dtype::F16,
            ),
            Precision::Fp32 => (
                n,
                dims,
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                safetensors::Dtype::F32,
            ),
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = data
        .iter()
        .map(|(n, dims, b, dt)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*dt, dims.clone(), b).expect("sizes match"),
            )
        })
        .collect();
    let wpath = tmp.join("weights.safetensors");
    safetensors::serialize_to_file(views, None, &wpath).map_err(|e| EngineError::File {
        path: wpath.clone(),
        message: e.to_string(),
    })?;
    let mj = model_dir.join("model.json");
    std::fs::copy(&mj, tmp.join("model.json")).map_err(|e| ioerr(&mj, e))?;
    let tok = model_dir.join("tokenizer");
    if tok.is_dir() {
        std::fs::create_dir(tmp.join("tokenizer")).map_err(|e| ioerr(&tmp.join("tokenizer"), e))?;
        for e in std::fs::read_dir(&tok)
            .map_err(|e| ioerr(&tok, e))?
            .flatten()
        {
            std::fs::copy(e.path(), tmp.join("tokenizer").join(e.file_name()))
                .map_err(|er| ioerr(&e.path(), er))?;
        }
    }
    let m = EngineManifest {
        format: FORMAT.into(),
        key: dev.key.clone(),
        precision,
        layout,
        profiles: profiles.clone(),
        vae_chunk,
        text_width,
        graphs,
        tactics: tactics.clone(),
    };
    let mpath = tmp.join("engine.json");
    std::fs::write(
        &mpath,
        serde_json::to_string_pretty(&m).expect("plain data") + "\n",
    )
    .map_err(|e| ioerr(&mpath, e))?;
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> DeviceKey {
        DeviceKey {
            gpu_name: "NVIDIA H100 80GB HBM3".into(),
            gpu_uuid: "00ff".into(),
            compute_capability: "9.0".into(),
            driver: "CUDA driver API 13.0".into(),
            cuda: "NVRTC 13.0".into(),
            cublas: "130100".into(),
            cublaslt: "130100".into(),
            cudnn: "91400".into(),
            motionrt: "0.1.0".into(),
        }
    }

    #[test]
    fn an_engine_loads_only_where_it_was_built() {
        let p = Path::new("eng/engine.json");
        assert!(check_key(p, &key(), &key()).is_ok());
        let mut other = key();
        other.gpu_uuid = "1234".into();
        other.cudnn = "91500".into();
        let e = check_key(p, &key(), &other).unwrap_err().to_string();
        assert!(e.contains("eng/engine.json"), "{e}");
        assert!(
            e.contains("gpu_uuid") && e.contains("cudnn") && e.contains("rebuild"),
            "{e}"
        );
        assert!(!e.contains("gpu_name"), "{e}");
    }

    /// A manifest of another format, or one this motionrt cannot read (a field another build
    /// added or dropped), says to rebuild the engine and names the file; JSON that is no
    /// manifest at all says so.
    #[test]
    fn a_manifest_this_motionrt_cannot_read_says_to_rebuild() {
        let dir = std::env::temp_dir().join(format!("motionrt-manifest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = Profile::parse("1x16x512x512").unwrap();
        let m = EngineManifest {
            format: FORMAT.into(),
            key: key(),
            precision: Precision::Fp16,
            layout: Layout::Nhwc,
            profiles: Profiles {
                min: p,
                opt: p,
                max: p,
            },
            vae_chunk: 16,
            text_width: 768,
            graphs: Vec::new(),
            tactics: TacticCache::default(),
        };
        let write = |v: &serde_json::Value| {
            std::fs::write(dir.join("engine.json"), v.to_string()).unwrap();
            read_manifest(&dir).map_err(|e| e.to_string())
        };
        let good = serde_json::to_value(&m).unwrap();
        assert_eq!(write(&good).unwrap(), m);
        let mut other_format = good.clone();
        other_format["format"] = "motionrt.engine/0".into();
        // (and a field this build does not know, which alone would fail the parse)
        other_format["precision"] = "int8".into();
        let e = write(&other_format).unwrap_err();
        assert!(
            e.contains("engine.json") && e.contains("motionrt.engine/0") && e.contains("rebuild"),
            "{e}"
        );
        let mut missing = good.clone();
        missing.as_object_mut().unwrap().remove("vae_chunk");
        let e = write(&missing).unwrap_err();
        assert!(
            e.contains("engine.json") && e.contains("vae_chunk") && e.contains("rebuild"),
            "{e}"
        );
        std::fs::write(dir.join("engine.json"), "[1, 2").unwrap();
        let e = read_manifest(&dir).unwrap_err().to_string();
        assert!(e.contains("not a motionrt engine manifest"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A timing cache: merged under the engine's choices (which it never replaces), written whole
    /// (temporary name, then renamed) and read back; used only where it was timed (GPU and
    /// versions), a bare algorithm table of older motionrt versions not at all; anything else is
    /// an error naming the file.
    #[test]
    fn timing_caches_merge_under_the_engines_and_are_used_only_where_timed() {
        use super::super::exec::{ConvTactic, TimingCache};
        let conv = |algo: i32| ConvTactic {
            algo,
            math: Some(1),
            workspace: 0,
            ms: 0.5,
            igemm_ms: None,
            igemm_n: None,
        };
        let mut engine = TacticCache::default();
        engine.conv.insert("a f16".into(), conv(1));
        let mut run = TacticCache::default();
        run.conv.insert("a f16".into(), conv(2));
        run.conv.insert("b f16".into(), conv(3));
        engine.merge(&run);
        assert_eq!(
            engine.conv["a f16"].algo, 1,
            "the engine's own choice stays"
        );
        assert_eq!(engine.conv["b f16"].algo, 3, "another shape's is added");
        let dir = std::env::temp_dir().join(format!("motionrt-tc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("tc.json");
        let cache = TimingCache {
            device: key(),
            tactics: engine.clone(),
        };
        cache.write(&p).unwrap();
        assert_eq!(TimingCache::read(&p).unwrap(), cache);
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            1,
            "no temporary left"
        );
        // used where it was timed
        let (t, note) = TimingCache::load_for(&p, &key()).unwrap();
        assert_eq!((t, note), (engine.clone(), None));
        // not where the GPU or a library differs: cuBLASLt's algorithm words are its own
        let mut other = key();
        other.cublaslt = "130200".into();
        let (t, note) = TimingCache::load_for(&p, &other).unwrap();
        assert!(t.conv.is_empty() && t.gemm.is_empty());
        let note = note.unwrap();
        assert!(
            note.contains("tc.json") && note.contains("cublaslt") && note.contains("not used"),
            "{note}"
        );
        assert!(!note.contains("gpu_uuid"), "{note}");
        // a bare algorithm table (older motionrt): not used, said so
        std::fs::write(&p, serde_json::to_string(&engine).unwrap()).unwrap();
        let (t, note) = TimingCache::load_for(&p, &key()).unwrap();
        assert!(t.conv.is_empty());
        assert!(note.unwrap().contains("older motionrt"));
        // no file: nothing, silently
        let (t, note) = TimingCache::load_for(&dir.join("none.json"), &key()).unwrap();
        assert!(t.conv.is_empty() && note.is_none());
        // anything else: an error naming the file
        std::fs::write(&p, "[1, 2]").unwrap();
        let e = TimingCache::load_for(&p, &key()).unwrap_err().to_string();
        assert!(
            e.contains("tc.json") && e.contains("not a timing cache"),
            "{e}"
        );
        let e = TimingCache::read(&dir.join("none.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("none.json"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// An engine built before cuBLASLt's version was recorded reads, and is refused here.
    #[test]
    fn engines_without_the_cublaslt_version_are_rebuilt() {
        let mut old = serde_json::to_value(key()).unwrap();
        old.as_object_mut().unwrap().remove("cublaslt");
        let built: DeviceKey = serde_json::from_value(old).unwrap();
        let e = check_key(Path::new("eng/engine.json"), &built, &key())
            .unwrap_err()
            .to_string();
        assert!(e.contains("cublaslt") && e.contains("rebuild"), "{e}");
    }

    #[test]
    fn timing_caches_keep_gemm_algorithms_and_read_older_ones() {
        use super::super::exec::GemmTactic;
        // a cache written before GEMM algorithms were timed: convolutions only
        let old = r#"{"conv": {"x f16": {"algo": 1, "math": 1, "workspace": 0, "ms": 0.5}}}"#;
        let c: TacticCache = serde_json::from_str(old).unwrap();
        assert!(c.gemm.is_empty());
        assert_eq!(c.conv["x f16"].algo, 1);
        // opaque algorithm words round-trip exactly (JSON integers up to u64::MAX)
        let mut c = TacticCache::default();
        c.conv.insert("x f16".into(), kernel_conv());
        let t = GemmTactic {
            algo: [u64::MAX, 1, 2, 3, 4, 5, 6, 1 << 63],
            ms: 0.25,
            heuristic_first: [7; 8],
            heuristic_first_ms: Some(0.5),
            candidates: 8,
        };
        c.gemm.insert("lt A3x4/3T B3x6/3 D4x6/4 f16".into(), t);
        // a problem whose heuristic-first algorithm did not run (no time: JSON has no NaN)
        let unrun = GemmTactic {
            heuristic_first_ms: None,
            ..t
        };
        c.gemm.insert("lt A8x8/8T B8x8/8 D8x8/8 f16".into(), unrun);
        let json = serde_json::to_string_pretty(&c).unwrap();
        let back: TacticCache = serde_json::from_str(&json).unwrap();
        assert_eq!(back, c);
        // the side-by-side comparison runs the heuristic's first candidates, convolutions as
        // timed; the problem whose first candidate did not run keeps its timed choice
        let h = c.heuristic_gemms();
        assert_eq!(h.conv, c.conv);
        let g = &h.gemm["lt A3x4/3T B3x6/3 D4x6/4 f16"];
        assert_eq!((g.algo, g.ms), ([7; 8], 0.5));
        assert_eq!(h.gemm["lt A8x8/8T B8x8/8 D8x8/8 f16"], unrun);
        // the implicit-GEMM convolution runs where it timed faster than cuDNN's choice; the
        // side-by-side copy keeps cuDNN everywhere, without timing the kernel again
        assert_eq!(c.conv["x f16"].igemm(), Some(128));
        let d = c.cudnn_convs();
        assert_eq!(d.conv["x f16"].igemm(), None);
        assert_eq!(d.conv["x f16"].igemm_ms, Some(f32::MAX));
        assert_eq!(d.gemm, c.gemm);
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(serde_json::from_str::<TacticCache>(&json).unwrap(), d);
        // an entry never timed against it keeps cuDNN
        let mut u = c.conv["x f16"];
        u.igemm_ms = None;
        assert_eq!(u.igemm(), None);
        // nor one timed slower
        u.igemm_ms = Some(0.75);
        assert_eq!(u.igemm(), None);
        // the GPU check's copy puts every convolution on the kernel at the width asked for
        assert_eq!(d.forced_igemm(64).conv["x f16"].igemm(), Some(64));
    }

    #[test]
    fn timing_caches_keep_geglu_choices_and_read_older_ones() {
        use super::super::exec::{geglu_key, FusedTactic, Precision};
        // a cache written before the GEGLU kernel: the pairs stay two steps (not timed on load)
        let old = r#"{"conv": {}, "gemm": {}}"#;
        let c: TacticCache = serde_json::from_str(old).unwrap();
        assert!(c.geglu.is_empty());
        let key = geglu_key(32768, 1280, 320, true, Precision::Fp16);
        assert_eq!(key, "32768x2560x320+bias f16");
        let mut c = TacticCache::default();
        let faster = FusedTactic {
            ms: 0.5,
            fused_ms: 0.25,
            fused_n: Some(64),
        };
        let slower = FusedTactic {
            ms: 0.5,
            fused_ms: 0.75,
            fused_n: Some(128),
        };
        // neither width ran
        let none = FusedTactic {
            ms: 0.5,
            fused_ms: f32::MAX,
            fused_n: None,
        };
        c.geglu.insert(key.clone(), faster);
        c.geglu.insert("a f16".into(), slower);
        c.geglu.insert("b f16".into(), none);
        let json = serde_json::to_string_pretty(&c).unwrap();
        let back: TacticCache = serde_json::from_str(&json).unwrap();
        assert_eq!(back, c);
        assert_eq!(c.geglu[&key].fused(), Some(64));
        assert_eq!(c.geglu["a f16"].fused(), None);
        assert_eq!(c.geglu["b f16"].fused(), None);
        // the side-by-side copy keeps two steps everywhere without timing again; the check's
        // copy puts every pair on the kernel at the width asked for
        let u = c.unfused_geglu();
        assert!(u.geglu.values().all(|t| t.fused().is_none()));
        assert_eq!(u.geglu.len(), 3);
        let f = c.forced_geglu(128);
        assert!(f.geglu.values().all(|t| t.fused() == Some(128)));
        // a merge keeps this cache's own choice
        let mut m = u.clone();
        m.merge(&c);
        assert_eq!(m, u);
        let mut e = TacticCache::default();
        e.merge(&c);
        assert_eq!(e.geglu, c.geglu);
    }

    #[test]
    fn timing_caches_keep_normalisation_pair_choices_and_read_older_ones() {
        use super::super::exec::{norm_desc, norm_pair_key, FusedTactic, Precision};
        use super::super::program::Step;
        // a cache written before conv_igemm_gn: the pairs stay two steps (not timed on load)
        let old = r#"{"conv": {}, "gemm": {}, "geglu": {}}"#;
        let c: TacticCache = serde_json::from_str(old).unwrap();
        assert!(c.norm_pair.is_empty());
        let gn = Step::GroupNorm {
            out: 1,
            x: 0,
            gamma: 2,
            beta: 3,
            n: 2,
            c: 320,
            spatial: 65536,
            groups: 32,
            eps: 1e-6,
            silu: false,
            channels_last: true,
            x_bias: None,
            x_sbias: None,
        };
        let ln = Step::LayerNorm {
            out: 1,
            x: 0,
            gamma: 2,
            beta: Some(3),
            add: None,
            rows: 131072,
            cols: 320,
            eps: 1e-5,
        };
        let key = norm_pair_key(
            "linear 131072x320x320+bias",
            &norm_desc(&gn).unwrap(),
            Precision::Fp16,
        );
        assert_eq!(key, "linear 131072x320x320+bias after gn32x2 f16");
        let ln_key = norm_pair_key(
            "linear 131072x320x320+bias",
            &norm_desc(&ln).unwrap(),
            Precision::Fp16,
        );
        assert_eq!(ln_key, "linear 131072x320x320+bias after ln+beta f16");
        let mut c = TacticCache::default();
        let (faster, slower) = (
            FusedTactic {
                ms: 0.5,
                fused_ms: 0.4,
                fused_n: Some(128),
            },
            FusedTactic {
                ms: 0.5,
                fused_ms: 0.6,
                fused_n: Some(64),
            },
        );
        c.norm_pair.insert(key.clone(), faster);
        c.norm_pair.insert(ln_key.clone(), slower);
        // an empty map is left out, so caches without these pairs read as before
        let json = serde_json::to_string_pretty(&c).unwrap();
        assert!(!json.contains("\"geglu\""), "{json}");
        let back: TacticCache = serde_json::from_str(&json).unwrap();
        assert_eq!(back, c);
        assert_eq!(c.norm_pair[&key].fused(), Some(128));
        assert_eq!(c.norm_pair[&ln_key].fused(), None);
        let u = c.unfused_norm_pairs();
        assert!(u.norm_pair.values().all(|t| t.fused().is_none()));
        let f = c.forced_norm_pairs(64);
        assert!(f.norm_pair.values().all(|t| t.fused() == Some(64)));
        // GEGLU and normalisation pair choices are kept apart
        assert!(f.geglu.is_empty() && c.forced_geglu(64).norm_pair == c.norm_pair);
        let mut m = u.clone();
        m.merge(&c);
        assert_eq!(m, u);
        let mut e = TacticCache::default();
        e.merge(&c);
        assert_eq!(e.norm_pair, c.norm_pair);
    }

    #[test]
    fn timing_caches_keep_attention_choices_and_read_older_ones() {
        use super::super::exec::{attention_key, AttentionTactic, Precision};
        use super::super::program::Step;
        // a cache written before the two-tile kernel: every attention on the one-tile kernel
        let old = r#"{"conv": {}, "gemm": {}, "geglu": {}, "norm_pair": {}}"#;
        let c: TacticCache = serde_json::from_str(old).unwrap();
        assert!(c.attention.is_empty());
        let att = |ns: usize| Step::Attention {
            out: 3,
            q: 0,
            k: 1,
            v: 2,
            bias: None,
            n: 32,
            l: 4096,
            s: 4096,
            heads: 8,
            d: 40,
            scale: 0.158,
            ld: [960; 3],
            offs: [0, 320, 640],
            ns,
        };
        let key = attention_key(&att(1), Precision::Fp16).unwrap();
        assert_eq!(key, "32x8x4096x4096x40 f16");
        let motion = attention_key(&att(4096), Precision::Fp16).unwrap();
        assert_eq!(motion, "32x8x4096x4096x40 ns4096 f16");
        let mut c = TacticCache::default();
        c.attention.insert(
            key.clone(),
            AttentionTactic {
                ms: 2.0,
                two_ms: 1.5,
            },
        );
        c.attention.insert(
            motion.clone(),
            AttentionTactic {
                ms: 1.0,
                two_ms: f32::MAX,
            },
        );
        let json = serde_json::to_string_pretty(&c).unwrap();
        assert!(!json.contains("\"norm_pair\""), "{json}");
        let back: TacticCache = serde_json::from_str(&json).unwrap();
        assert_eq!(back, c);
        assert!(c.attention[&key].two() && !c.attention[&motion].two());
        assert!(c.forced_attention_two().attention.values().all(|t| t.two()));
        assert!(c.one_tile_attention().attention.values().all(|t| !t.two()));
        let mut e = TacticCache::default();
        e.merge(&c);
        assert_eq!(e.attention, c.attention);
    }

    /// A convolution tactic whose `conv_igemm_f16_n128` timed faster than cuDNN's algorithm.
    fn kernel_conv() -> super::super::exec::ConvTactic {
        super::super::exec::ConvTactic {
            algo: 1,
            math: Some(1),
            workspace: 0,
            ms: 0.5,
            igemm_ms: Some(0.25),
            igemm_n: Some(128),
        }
    }

    #[test]
    fn a_library_only_cache_runs_none_of_motionrts_tactic_kernels() {
        use super::super::exec::{AttentionTactic, FusedTactic};
        // a cache whose timing put one problem of each kind on motionrt's kernels
        let mut c = TacticCache::default();
        c.conv.insert("conv f16".into(), kernel_conv());
        let fused = FusedTactic {
            ms: 0.5,
            fused_ms: 0.25,
            fused_n: Some(64),
        };
        c.geglu.insert("geglu f16".into(), fused);
        c.norm_pair.insert("pair f16".into(), fused);
        c.attention.insert(
            "att f16".into(),
            AttentionTactic {
                ms: 2.0,
                two_ms: 1.5,
            },
        );
        let kernels = |c: &TacticCache| {
            (
                c.conv_kernel("conv f16"),
                c.geglu_kernel("geglu f16"),
                c.norm_kernel("pair f16"),
                c.attention_two("att f16"),
            )
        };
        assert_eq!(kernels(&c), (Some(128), Some(64), Some(64), true));
        // problems the cache does not have run on the libraries
        assert_eq!(c.conv_kernel("other f16"), None);
        assert!(!c.attention_two("other f16"));
        // `build --no-kernel-tactics`: the same choices, none of the kernels; written only when
        // set, so caches and engines from before read as false
        assert!(!serde_json::to_string(&c).unwrap().contains("library_only"));
        let lib = TacticCache {
            library_only: true,
            ..c.clone()
        };
        assert_eq!(kernels(&lib), (None, None, None, false));
        // not even forced (the GPU check's copies of it)
        let forced = lib
            .forced_igemm(64)
            .forced_geglu(128)
            .forced_norm_pairs(128)
            .forced_attention_two();
        assert_eq!(kernels(&forced), (None, None, None, false));
        let json = serde_json::to_string(&lib).unwrap();
        assert!(json.contains("\"library_only\":true"), "{json}");
        assert_eq!(serde_json::from_str::<TacticCache>(&json).unwrap(), lib);
        // a merge (a run's timing cache into the engine's) keeps the engine's choice
        let mut m = lib.clone();
        m.merge(&c);
        assert!(m.library_only);
        let mut m = c.clone();
        m.merge(&lib);
        assert!(!m.library_only);
    }

    #[test]
    fn profiles_parse_pixels_into_latents_and_bound_requests() {
        let lo = Profile::parse("1x8x256x256").unwrap();
        let hi = Profile::parse("2x32x768x768").unwrap();
        assert_eq!(
            lo,
            Profile {
                batch: 1,
                frames: 8,
                height: 32,
                width: 32
            }
        );
        let x = Profile::parse("1x16x512x512").unwrap();
        assert!(Profile::contains(&lo, &hi, &x));
        assert!(!Profile::contains(
            &lo,
            &hi,
            &Profile::parse("1x64x512x512").unwrap()
        ));
        assert!(Profile::parse("1x16x500x512").is_err());
        assert!(Profile::parse("1x16x999999992x512").is_err());
        assert!(Profile::parse("1x16x4096x4096").is_ok());
        assert_eq!(x.shapes("unet", 768, 8)[0].1, vec![2, 4, 16, 64, 64]);
    }
}
