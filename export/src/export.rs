//! `motionrt export`: checkpoints → `unet.onnx` (+ external data) and `model.json`, written into a
//! temporary sibling directory and renamed into place only when everything succeeded.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use motionrt_kernels::unfinished::{self, Unfinished};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::components::{self, Component, ComponentConfig, TextEncoderConfig, VaeConfig};
use crate::config::{MotionConfig, UnetConfig};
use crate::graph::unet::{
    self, Semantics, INPUT_CONTEXT, INPUT_SAMPLE, INPUT_TIMESTEP, OUTPUT_NOISE, TEXT_TOKENS,
};
use crate::graph::{clip, vae, GraphBuilder, Lowering, Param, Precision};
use crate::onnx::proto::{
    GraphProto, ModelProto, OperatorSetIdProto, StringStringEntryProto, TensorProto,
    TensorProtoDataType, ValueInfoProto,
};
use crate::onnx::{value_info, write_model, Dim, ExternalDataWriter};
use crate::remap::Layout;
use crate::source::{self, Source, TensorRef};
use crate::tensor::decode_to_f32;
use crate::{DType, ExportError, Result};

/// ONNX opset of the default domain.
pub const OPSET: i64 = 17;
/// ONNX IR version written.
pub const IR_VERSION: i64 = 8;
/// Above this many weight bytes, weights go to an external data file (protobuf's hard limit is
/// 2 GiB for the whole model).
pub const INLINE_LIMIT: u64 = 1 << 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExternalData {
    /// External when the weights exceed [`INLINE_LIMIT`].
    #[default]
    Auto,
    Always,
    Never,
}

#[derive(Debug, Clone)]
pub struct ExportOptions {
    pub unet: PathBuf,
    pub motion_module: Option<PathBuf>,
    pub precision: Precision,
    pub semantics: Semantics,
    pub out: PathBuf,
    /// Replace `out` if it exists.
    pub overwrite: bool,
    pub external_data: ExternalData,
    /// VAE: a diffusers pipeline/`vae` folder or an original single file. `None`: taken from
    /// `unet` when it holds one.
    pub vae: Option<PathBuf>,
    /// Text encoder, as `vae`.
    pub text_encoder: Option<PathBuf>,
    /// A `config.json` for a single-file VAE / text encoder instead of inferring it from shapes.
    pub vae_config: Option<PathBuf>,
    pub text_encoder_config: Option<PathBuf>,
    /// Tokenizer: a folder with `vocab.json` + `merges.txt` (or a pipeline folder with
    /// `tokenizer/`), or `bpe_simple_vocab_16e6.txt.gz`. `None`: `unet`'s `tokenizer/` if any.
    pub tokenizer: Option<PathBuf>,
    /// Export the UNet only.
    pub unet_only: bool,
    /// Motion-module attention as `com.motionrt.TemporalAttention` nodes (runs where motionrt's
    /// operators are registered: motionrt's ONNX Runtime sessions).
    pub fused_attention: bool,
    /// 3×3 stride-1 convolutions of the UNet and VAE as Winograd F(2×2, 3×3)
    /// (`com.motionrt.WinogradInput`/`WinogradOutput` around a MatMul): 2.25× fewer multiplies
    /// on the CPU. Float32 only.
    pub winograd: bool,
}

/// Progress events for a UI.
#[derive(Debug, Clone)]
pub enum Progress {
    /// Inputs resolved and validated; `total_bytes` of weights will be written.
    Start { tensors: usize, total_bytes: u64 },
    /// One tensor written.
    Tensor { name: String, bytes: u64 },
    /// Hashing inputs and finishing files.
    Finishing,
}

#[derive(Debug, Clone, Serialize)]
pub struct SourceReport {
    pub path: PathBuf,
    pub layout: Layout,
    pub files: Vec<PathBuf>,
    pub parameters: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct MotionReport {
    #[serde(flatten)]
    pub source: SourceReport,
    pub version: crate::config::MotionVersion,
    pub modules: usize,
    pub positional_table_length: usize,
    pub config: MotionConfig,
}

#[derive(Debug, Clone, Serialize)]
pub struct GraphReport {
    pub file: String,
    pub external_data: Option<String>,
    pub inputs: BTreeMap<String, Vec<serde_json::Value>>,
    pub outputs: BTreeMap<String, Vec<serde_json::Value>>,
    pub nodes: usize,
    pub initializers: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct TensorSource {
    pub file: PathBuf,
    pub key: String,
    /// How the checkpoint tensor was rewritten for the graph (`winograd`), if it was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transform: Option<crate::graph::Transform>,
}

/// What `model.json` holds (and what `export` returns).
#[derive(Debug, Clone, Serialize)]
pub struct ModelManifest {
    pub format: &'static str,
    pub format_version: u32,
    pub motionrt_version: &'static str,
    pub precision: Precision,
    pub semantics: Semantics,
    pub opset: i64,
    /// Motion-module attention as `com.motionrt.TemporalAttention` (needs motionrt's operators).
    pub fused_attention: bool,
    /// 3×3 convolutions as Winograd F(2×2, 3×3) (needs motionrt's operators).
    pub winograd: bool,
    /// `animatediff` (SD UNet + motion module), `tune-a-video`, or `image` (no temporal layers).
    pub architecture: &'static str,
    pub unet: SourceReport,
    pub unet_config: UnetConfig,
    pub motion_module: Option<MotionReport>,
    pub vae: Option<SourceReport>,
    pub vae_config: Option<VaeConfig>,
    /// Latents are multiplied by this after encoding and divided by it before decoding.
    pub scaling_factor: f32,
    pub text_encoder: Option<SourceReport>,
    pub text_encoder_config: Option<TextEncoderConfig>,
    /// The tokenizer files copied into `tokenizer/` (relative paths), if any.
    pub tokenizer: Option<TokenizerReport>,
    /// The most frames one UNet call may take (the positional table's length).
    pub max_frames: Option<usize>,
    pub text_tokens: usize,
    pub latent_scale: u32,
    pub parameters: u64,
    pub graphs: BTreeMap<String, GraphReport>,
    pub scheduler_defaults: serde_json::Value,
    /// sha256 of every input file; with `tensor_map` and `precision` these determine the written
    /// weights exactly (the conversion is deterministic).
    pub inputs_sha256: BTreeMap<String, String>,
    /// Initializer name (the diffusers name, or `{name}@winograd` for a kernel stored
    /// Winograd-transformed) → where it came from.
    pub tensor_map: BTreeMap<String, TensorSource>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TokenizerReport {
    /// Where it was copied from.
    pub source: PathBuf,
    /// Files inside the output's `tokenizer/` folder.
    pub files: Vec<String>,
}

/// Removes a directory on drop unless disarmed: a failed export leaves nothing behind.
struct TempDir {
    path: PathBuf,
    armed: bool,
    /// Removed if the process is interrupted before the export is complete.
    _unfinished: Unfinished,
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if self.armed {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Shapes equal up to size-1 axes (a 1×1 conv stored as a linear layer, or the reverse).
fn shapes_compatible(found: &[usize], expected: &[usize]) -> bool {
    found == expected || {
        let a: Vec<_> = found.iter().filter(|&&d| d != 1).collect();
        let b: Vec<_> = expected.iter().filter(|&&d| d != 1).collect();
        a == b && found.iter().product::<usize>() == expected.iter().product::<usize>()
    }
}

/// Check a source tensor against the shape the graph expects.
fn check_ref(src: &Source, r: &TensorRef, p: &Param) -> Result<()> {
    if !shapes_compatible(&r.meta.shape, &p.shape) {
        return Err(ExportError::ShapeMismatch {
            path: src.file_of(r).to_path_buf(),
            tensor: r.key.clone(),
            found: r.meta.shape.clone(),
            expected: p.shape.clone(),
            hint: if r.key != p.name {
                format!(" (diffusers name `{}`)", p.name)
            } else {
                String::new()
            },
        });
    }
    if !r.meta.dtype.is_float() {
        return Err(ExportError::UnsupportedDtype {
            path: src.file_of(r).to_path_buf(),
            tensor: r.key.clone(),
            found: r.meta.dtype.to_string(),
            expected: "f32, f16, bf16 or f64",
        });
    }
    Ok(())
}

/// Resolve every UNet graph parameter to a source tensor, checking presence, shape and dtype.
fn resolve_params<'a>(
    g: &GraphBuilder,
    unet: &'a Source,
    motion: Option<&'a Source>,
) -> Result<Vec<(&'a Source, &'a TensorRef)>> {
    let mut out = Vec::with_capacity(g.params.len());
    for p in &g.params {
        let is_motion = p.name.contains(".motion_modules.");
        let src = match (is_motion, motion) {
            (true, Some(m)) if !unet.tensors.contains_key(&p.name) => m,
            _ => unet,
        };
        let Some(r) = src.tensors.get(&p.name) else {
            let what = if is_motion {
                "the motion module"
            } else {
                "the UNet"
            };
            // named as the file would name it (an original AnimateDiff key), with the
            // diffusers name the exporter reads it by
            return Err(src.file_names(ExportError::MissingTensor {
                path: src.path.clone(),
                tensor: p.name.clone(),
                expected_for: format!(
                    "{what}: diffusers name `{}`, read from the {} layout",
                    p.name, src.layout
                ),
            }));
        };
        check_ref(src, r, p)?;
        out.push((src, r));
    }
    Ok(out)
}

/// Resolve every parameter of a VAE or text-encoder graph in one source.
fn resolve_single<'a>(
    g: &GraphBuilder,
    src: &'a Source,
    what: &str,
) -> Result<Vec<(&'a Source, &'a TensorRef)>> {
    g.params
        .iter()
        .map(|p| {
            let r = src
                .tensors
                .get(&p.name)
                .ok_or_else(|| ExportError::MissingTensor {
                    path: src.path.clone(),
                    tensor: p.name.clone(),
                    expected_for: format!(
                        "the {what}, diffusers name, read from the {} layout",
                        src.layout
                    ),
                })?;
            check_ref(src, r, p)?;
            Ok((src, r))
        })
        .collect()
}

fn prepare_out_dir(out: &Path, overwrite: bool) -> Result<TempDir> {
    if out.exists() && !overwrite {
        return Err(ExportError::model(
            out,
            "output directory already exists (pass --overwrite to replace it)",
        ));
    }
    // --overwrite replaces an earlier export (or an empty folder), never anything else a
    // mistyped --out might name
    if out.exists() && !replaceable_export(out) {
        return Err(ExportError::model(
            out,
            "exists and is not a motionrt export (a folder with model.json) or an empty folder: --overwrite replaces only those; choose another --out or remove it yourself",
        ));
    }
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| ExportError::io(parent, e))?;
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "export".into());
    let tmp = parent.join(format!(".{name}.partial-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| ExportError::io(&tmp, e))?;
    }
    let unfinished = unfinished::register(&tmp);
    std::fs::create_dir(&tmp).map_err(|e| ExportError::io(&tmp, e))?;
    Ok(TempDir {
        path: tmp,
        armed: true,
        _unfinished: unfinished,
    })
}

/// A folder `--overwrite` may replace: one holding any of `markers` (what motionrt wrote there
/// before: `model.json` for an export), or an empty one.
pub fn replaceable_output(out: &Path, markers: &[&str]) -> bool {
    out.is_dir()
        && (markers.iter().any(|m| out.join(m).is_file())
            || std::fs::read_dir(out).is_ok_and(|mut d| d.next().is_none()))
}

/// A folder `export --overwrite` may replace: an earlier export, or an empty folder.
pub fn replaceable_export(out: &Path) -> bool {
    replaceable_output(out, &["model.json"])
}

fn commit_dir(mut tmp: TempDir, out: &Path) -> Result<()> {
    // the earlier export and the new one trade places whole, or not at all if interrupted; the
    // earlier one, once replaced, is removed by an interrupt too
    let old = tmp.path.with_extension("old");
    let _removing = unfinished::register(&old);
    let replaced = unfinished::commit(|| -> Result<bool> {
        if !out.exists() {
            std::fs::rename(&tmp.path, out).map_err(|e| ExportError::io(out, e))?;
            return Ok(false);
        }
        std::fs::rename(out, &old).map_err(|e| ExportError::io(out, e))?;
        if let Err(e) = std::fs::rename(&tmp.path, out) {
            // the earlier export back in place
            let _ = std::fs::rename(&old, out);
            return Err(ExportError::io(out, e));
        }
        Ok(true)
    })?;
    tmp.armed = false;
    if replaced {
        let _ = std::fs::remove_dir_all(&old);
    }
    Ok(())
}

fn sym(s: &str) -> serde_json::Value {
    serde_json::Value::String(s.into())
}

/// One ONNX graph to write: its builder, the weights it requests and its I/O contract.
struct GraphJob<'a> {
    name: &'static str,
    g: GraphBuilder,
    resolved: Vec<(&'a Source, &'a TensorRef)>,
    /// (name, element type, dims as strings: numbers are fixed, anything else symbolic)
    inputs: Vec<(&'static str, TensorProtoDataType, Vec<String>)>,
    outputs: Vec<(&'static str, TensorProtoDataType, Vec<String>)>,
    meta: Vec<(&'static str, String)>,
}

impl GraphJob<'_> {
    fn weight_bytes(&self, precision: Precision) -> u64 {
        self.g
            .params
            .iter()
            .map(|p| (p.stored_shape().iter().product::<usize>() * precision.bytes()) as u64)
            .sum()
    }
}

fn dims_json(v: &[String]) -> Vec<serde_json::Value> {
    v.iter()
        .map(|x| {
            x.parse::<i64>()
                .map(serde_json::Value::from)
                .unwrap_or_else(|_| sym(x))
        })
        .collect()
}

fn value_infos(v: &[(&'static str, TensorProtoDataType, Vec<String>)]) -> Vec<ValueInfoProto> {
    v.iter()
        .map(|(name, t, dims)| {
            let dims: Vec<Dim> = dims
                .iter()
                .map(|d| match d.parse::<i64>() {
                    Ok(n) => Dim::Fixed(n),
                    Err(_) => Dim::Symbolic(d.clone()),
                })
                .collect();
            value_info(name, *t, &dims)
        })
        .collect()
}

/// Stream a job's weights (converted to the target precision) and write `{name}.onnx`.
fn write_graph(
    job: GraphJob<'_>,
    dir: &Path,
    opts: &ExportOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<GraphReport> {
    let total_bytes = job.weight_bytes(opts.precision);
    let external = match opts.external_data {
        ExternalData::Always => true,
        ExternalData::Never => false,
        ExternalData::Auto => total_bytes > INLINE_LIMIT,
    };
    let onnx_name = format!("{}.onnx", job.name);
    let data_name = format!("{onnx_name}.data");
    if !external && total_bytes >= (2u64 << 30) - (64 << 20) {
        return Err(ExportError::model(
            &opts.out,
            format!("{onnx_name}: {total_bytes} bytes of weights cannot be stored inside one protobuf; use external data"),
        ));
    }
    let mut writer = if external {
        Some(ExternalDataWriter::create(
            &dir.join(&data_name),
            &data_name,
        )?)
    } else {
        None
    };
    let want = match opts.precision {
        Precision::Fp32 => DType::F32,
        Precision::Fp16 => DType::F16,
    };
    let mut buf = Vec::new();
    let mut bytes = Vec::new();
    let mut inits: Vec<TensorProto> = Vec::with_capacity(job.g.params.len());
    for (p, (src, r)) in job.g.params.iter().zip(&job.resolved) {
        let ckpt = &src.files[r.file];
        // Same dtype in and out, nothing to rewrite: the stored bytes are the output. Otherwise
        // decode (from the bytes already read when the format gave them, else through the
        // reader), rewrite, and encode.
        match ckpt.read_raw_into(&r.key, &mut bytes)? {
            Some(dt) if dt == want && p.transform.is_none() => {}
            found => {
                match found {
                    Some(dt) => decode_to_f32(dt, &bytes, &mut buf),
                    None => ckpt.read_f32_into(&r.key, &mut buf)?,
                }
                if let Some(t) = p.transform {
                    buf = t.apply(&p.shape, &buf);
                }
                bytes.clear();
                match opts.precision {
                    Precision::Fp32 => bytes.extend(buf.iter().flat_map(|v| v.to_le_bytes())),
                    Precision::Fp16 => bytes.extend(
                        buf.iter()
                            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes()),
                    ),
                }
            }
        }
        let dims: Vec<i64> = p.stored_shape().iter().map(|&d| d as i64).collect();
        let dt = opts.precision.onnx_type();
        let init = p.initializer();
        let t = match writer.as_mut() {
            Some(w) => w.append(&init, dt, &dims, &bytes)?,
            None => TensorProto {
                name: init.clone(),
                dims,
                data_type: dt as i32,
                raw_data: bytes.clone(),
                ..Default::default()
            },
        };
        inits.push(t);
        progress(Progress::Tensor {
            name: init,
            bytes: bytes.len() as u64,
        });
    }
    if let Some(w) = writer {
        w.finish()?;
    }

    let report = GraphReport {
        file: onnx_name.clone(),
        external_data: external.then(|| data_name.clone()),
        inputs: job
            .inputs
            .iter()
            .map(|(n, _, d)| (n.to_string(), dims_json(d)))
            .collect(),
        outputs: job
            .outputs
            .iter()
            .map(|(n, _, d)| (n.to_string(), dims_json(d)))
            .collect(),
        nodes: job.g.nodes.len(),
        initializers: inits.len() + job.g.consts.len(),
    };
    let inputs = value_infos(&job.inputs);
    let outputs = value_infos(&job.outputs);
    let mut opset_import = vec![OperatorSetIdProto {
        domain: String::new(),
        version: OPSET,
    }];
    if job.g.uses_domain(motionrt_kernels::DOMAIN) {
        opset_import.push(OperatorSetIdProto {
            domain: motionrt_kernels::DOMAIN.into(),
            version: 1,
        });
    }
    let GraphBuilder { nodes, consts, .. } = job.g;
    inits.extend(consts);
    let mut meta = vec![("motionrt.precision", opts.precision.to_string())];
    meta.extend(job.meta);
    let model = ModelProto {
        ir_version: IR_VERSION,
        producer_name: "motionrt".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        opset_import,
        metadata_props: meta
            .into_iter()
            .map(|(k, v)| StringStringEntryProto {
                key: k.into(),
                value: v,
            })
            .collect(),
        graph: Some(GraphProto {
            name: format!("motionrt_{}", job.name),
            node: nodes,
            initializer: inits,
            input: inputs,
            output: outputs,
            ..Default::default()
        }),
        ..Default::default()
    };
    write_model(&model, &dir.join(&onnx_name))?;
    Ok(report)
}

/// Tokenizer files recognised in a folder.
const TOKENIZER_FILES: &[&str] = &[
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "tokenizer_config.json",
];
/// The original CLIP BPE vocabulary.
pub const BPE_GZ: &str = "bpe_simple_vocab_16e6.txt.gz";

/// Where the tokenizer is: a `tokenizer/` folder (or one with vocab.json + merges.txt), or the
/// original gz vocabulary.
fn find_tokenizer(path: &Path) -> Option<PathBuf> {
    if path.is_file() {
        return Some(path.to_path_buf());
    }
    [path.join("tokenizer"), path.to_path_buf()]
        .into_iter()
        .find(|d| {
            (d.join("vocab.json").is_file() && d.join("merges.txt").is_file())
                || d.join(BPE_GZ).is_file()
        })
}

/// Copy the tokenizer's files into `dir/tokenizer/`.
fn copy_tokenizer(src: &Path, dir: &Path) -> Result<TokenizerReport> {
    let found = find_tokenizer(src).ok_or_else(|| {
        ExportError::model(
            src,
            format!("no tokenizer: expected vocab.json + merges.txt (in the folder or its tokenizer/), or {BPE_GZ}"),
        )
    })?;
    let out = dir.join("tokenizer");
    // (not create_dir_all: an interrupted export's removed folder is not made again)
    std::fs::create_dir(&out).map_err(|e| ExportError::io(&out, e))?;
    let mut files = Vec::new();
    let mut copy = |from: &Path, name: &str| -> Result<()> {
        std::fs::copy(from, out.join(name)).map_err(|e| ExportError::io(from, e))?;
        files.push(name.to_string());
        Ok(())
    };
    if found.is_file() {
        if !found.to_string_lossy().ends_with(".gz") {
            return Err(ExportError::model(
                &found,
                format!("a tokenizer file must be the original {BPE_GZ} (or pass a folder with vocab.json + merges.txt)"),
            ));
        }
        copy(&found, BPE_GZ)?;
    } else if found.join("vocab.json").is_file() {
        for name in TOKENIZER_FILES {
            let p = found.join(name);
            if p.is_file() {
                copy(&p, name)?;
            }
        }
    } else {
        copy(&found.join(BPE_GZ), BPE_GZ)?;
    }
    Ok(TokenizerReport {
        source: found,
        files,
    })
}

/// Export the UNet (with motion modules) described by `opts`, and the VAE, text encoder and
/// tokenizer when they are given or found beside the UNet.
pub fn export(opts: &ExportOptions, progress: &mut dyn FnMut(Progress)) -> Result<ModelManifest> {
    if opts.winograd && opts.precision != Precision::Fp32 {
        return Err(ExportError::model(
            &opts.out,
            format!(
                "--winograd computes in float32 (it is a CPU optimisation); export with --precision fp32 or without --winograd (precision {} requested)",
                opts.precision
            ),
        ));
    }
    let (unet_src, unet_cfg) = source::open_unet(&opts.unet)?;
    let has_builtin_motion = unet_src
        .tensors
        .keys()
        .any(|k| k.contains(".motion_modules."));
    // Tune-A-Video's UNet carries temporal attention (`attn_temp`) in its transformer blocks.
    let tune_a_video = unet_src.tensors.keys().any(|k| k.contains(".attn_temp."));
    if tune_a_video && (opts.motion_module.is_some() || has_builtin_motion) {
        return Err(ExportError::model(
            &opts.unet,
            "a Tune-A-Video UNet (attn_temp tensors) has its own temporal layers; it takes no motion module",
        ));
    }
    let (motion_src, motion_cfg) = match &opts.motion_module {
        Some(p) => {
            let (s, c) = source::open_motion(p)?;
            (Some(s), Some(c))
        }
        None if has_builtin_motion => {
            let (s, c) = source::open_motion(&opts.unet)?;
            (Some(s), Some(c))
        }
        None => (None, None),
    };
    if let (Some(m), Some(ms)) = (&motion_cfg, &motion_src) {
        source::check_compatible(&unet_cfg, m, ms)?;
    }

    // The other components: given explicitly, or found beside the UNet.
    let component_path = |given: &Option<PathBuf>, c: Component| -> Option<PathBuf> {
        if opts.unet_only {
            return None;
        }
        given
            .clone()
            .or_else(|| components::has_component(&opts.unet, c).then(|| opts.unet.clone()))
    };
    let vae = component_path(&opts.vae, Component::Vae)
        .map(|p| components::open(&p, Component::Vae, opts.vae_config.as_deref()))
        .transpose()?;
    let text = component_path(&opts.text_encoder, Component::TextEncoder)
        .map(|p| {
            components::open(
                &p,
                Component::TextEncoder,
                opts.text_encoder_config.as_deref(),
            )
        })
        .transpose()?;
    let tokenizer_src = if opts.unet_only {
        None
    } else {
        match &opts.tokenizer {
            Some(p) => Some(p.clone()),
            None => find_tokenizer(&opts.unet).filter(|p| p.is_dir()),
        }
    };
    let vae_cfg = vae.as_ref().and_then(|(_, c)| match c {
        ComponentConfig::Vae(v) => Some(v.clone()),
        ComponentConfig::TextEncoder(_) => None,
    });
    let text_cfg = text.as_ref().and_then(|(_, c)| match c {
        ComponentConfig::TextEncoder(t) => Some(t.clone()),
        ComponentConfig::Vae(_) => None,
    });
    if let Some(t) = &text_cfg {
        if t.hidden_size != unet_cfg.cross_attention_dim {
            return Err(ExportError::model(
                text.as_ref().map_or(opts.unet.clone(), |(s, _)| s.path.clone()),
                format!(
                    "the text encoder's width {} does not match the UNet's cross-attention width {}",
                    t.hidden_size, unet_cfg.cross_attention_dim
                ),
            ));
        }
        if t.max_position_embeddings != TEXT_TOKENS {
            return Err(ExportError::model(
                text.as_ref().map_or(opts.unet.clone(), |(s, _)| s.path.clone()),
                format!(
                    "the text encoder has {} positions; motionrt's contract is {TEXT_TOKENS} tokens",
                    t.max_position_embeddings
                ),
            ));
        }
    }
    if let Some(v) = &vae_cfg {
        if v.latent_channels != unet_cfg.in_channels {
            return Err(ExportError::model(
                vae.as_ref()
                    .map_or(opts.unet.clone(), |(s, _)| s.path.clone()),
                format!(
                    "the VAE has {} latent channels but the UNet takes {}",
                    v.latent_channels, unet_cfg.in_channels
                ),
            ));
        }
    }

    let f32t = TensorProtoDataType::Float;
    let d = unet_cfg.cross_attention_dim.to_string();
    let cin = unet_cfg.in_channels.to_string();
    let cout = unet_cfg.out_channels.to_string();
    let tokens = TEXT_TOKENS.to_string();
    let v = |x: &[&str]| x.iter().map(|s| s.to_string()).collect::<Vec<_>>();

    // Build every graph and resolve (and check) every weight before writing anything.
    let mut jobs: Vec<GraphJob<'_>> = Vec::new();
    let g = unet::build_with(
        &unet_cfg,
        motion_cfg.as_ref(),
        opts.semantics,
        opts.precision,
        Lowering {
            fused_attention: opts.fused_attention,
            winograd: opts.winograd,
        },
        tune_a_video,
    );
    let resolved = resolve_params(&g, &unet_src, motion_src.as_ref())?;
    let mut unet_meta = vec![("motionrt.semantics", opts.semantics.to_string())];
    if tune_a_video {
        unet_meta.push(("motionrt.architecture", "tune-a-video".into()));
    }
    if opts.fused_attention {
        unet_meta.push(("motionrt.fused_attention", "true".into()));
    }
    if opts.winograd {
        unet_meta.push(("motionrt.winograd", "true".into()));
    }
    // the VAE has no temporal attention; only the convolution lowering applies to it
    let vae_lowering = Lowering {
        fused_attention: false,
        winograd: opts.winograd,
    };
    if let Some(m) = &motion_cfg {
        unet_meta.push(("motionrt.motion_version", m.version.to_string()));
        unet_meta.push(("motionrt.max_frames", m.max_seq_length.to_string()));
    }
    jobs.push(GraphJob {
        name: "unet",
        g,
        resolved,
        inputs: vec![
            (INPUT_SAMPLE, f32t, v(&["B", &cin, "F", "h", "w"])),
            (INPUT_TIMESTEP, f32t, v(&["B"])),
            (INPUT_CONTEXT, f32t, v(&["BF", &tokens, &d])),
        ],
        outputs: vec![(OUTPUT_NOISE, f32t, v(&["B", &cout, "F", "h", "w"]))],
        meta: unet_meta,
    });
    if let (Some((src, _)), Some(cfg)) = (&vae, &vae_cfg) {
        let lat = cfg.latent_channels.to_string();
        let (ci, co) = (cfg.in_channels.to_string(), cfg.out_channels.to_string());
        let g = vae::build_decoder(cfg, opts.precision, vae_lowering);
        let resolved = resolve_single(&g, src, "VAE")?;
        jobs.push(GraphJob {
            name: "vae_decoder",
            g,
            resolved,
            inputs: vec![(vae::DECODER_INPUT, f32t, v(&["N", &lat, "h", "w"]))],
            outputs: vec![(vae::DECODER_OUTPUT, f32t, v(&["N", &co, "H", "W"]))],
            meta: vec![("motionrt.scaling_factor", cfg.scaling_factor.to_string())],
        });
        let g = vae::build_encoder(cfg, opts.precision, vae_lowering);
        let resolved = resolve_single(&g, src, "VAE")?;
        jobs.push(GraphJob {
            name: "vae_encoder",
            g,
            resolved,
            inputs: vec![(vae::ENCODER_INPUT, f32t, v(&["N", &ci, "H", "W"]))],
            outputs: vec![(vae::ENCODER_OUTPUT, f32t, v(&["N", &lat, "h", "w"]))],
            meta: vec![("motionrt.scaling_factor", cfg.scaling_factor.to_string())],
        });
    }
    if let (Some((src, _)), Some(cfg)) = (&text, &text_cfg) {
        let g = clip::build(cfg, opts.precision);
        let resolved = resolve_single(&g, src, "text encoder")?;
        let width = cfg.hidden_size.to_string();
        jobs.push(GraphJob {
            name: "text_encoder",
            g,
            resolved,
            inputs: vec![(
                clip::INPUT_IDS,
                TensorProtoDataType::Int64,
                v(&["N", &tokens]),
            )],
            outputs: vec![(clip::OUTPUT_HIDDEN, f32t, v(&["N", &tokens, &width]))],
            meta: vec![],
        });
    }

    let tensor_map: BTreeMap<String, TensorSource> = jobs
        .iter()
        .flat_map(|j| j.g.params.iter().zip(&j.resolved))
        .map(|(p, (src, r))| {
            (
                p.initializer(),
                TensorSource {
                    file: src.file_of(r).to_path_buf(),
                    key: r.key.clone(),
                    transform: p.transform,
                },
            )
        })
        .collect();
    let params_of = |src: &Source| -> u64 {
        let mut seen = std::collections::HashSet::new();
        jobs.iter()
            .flat_map(|j| j.resolved.iter())
            .filter(|(s, r)| std::ptr::eq(*s, src) && seen.insert(&r.key))
            .map(|(_, r)| r.meta.numel() as u64)
            .sum()
    };
    let report = |src: &Source| SourceReport {
        path: src.path.clone(),
        layout: src.layout,
        files: src.input_files(),
        parameters: params_of(src),
    };
    let unet_report = report(&unet_src);
    let motion_report = match (&motion_src, &motion_cfg) {
        (Some(s), Some(c)) => Some(MotionReport {
            source: report(s),
            version: c.version,
            modules: c.module_count(),
            positional_table_length: c.max_seq_length,
            config: c.clone(),
        }),
        _ => None,
    };
    let vae_report = vae.as_ref().map(|(s, _)| report(s));
    let text_report = text.as_ref().map(|(s, _)| report(s));

    let tmp = prepare_out_dir(&opts.out, opts.overwrite)?;
    progress(Progress::Start {
        tensors: jobs.iter().map(|j| j.g.params.len()).sum(),
        total_bytes: jobs.iter().map(|j| j.weight_bytes(opts.precision)).sum(),
    });

    // Hash the inputs on another thread while the weights stream.
    let mut input_files: Vec<PathBuf> = Vec::new();
    for src in [Some(&unet_src), motion_src.as_ref()]
        .into_iter()
        .flatten()
        .chain(vae.iter().map(|(s, _)| s))
        .chain(text.iter().map(|(s, _)| s))
    {
        for f in src.input_files() {
            if !input_files.contains(&f) {
                input_files.push(f);
            }
        }
    }
    let (graphs, inputs_sha256) = std::thread::scope(|s| -> Result<_> {
        let hasher = s.spawn(|| -> Result<BTreeMap<String, String>> {
            input_files
                .iter()
                .map(|p| {
                    Ok((
                        p.display().to_string(),
                        sha256_file(p).map_err(|e| ExportError::io(p, e))?,
                    ))
                })
                .collect()
        });
        let mut graphs = BTreeMap::new();
        for job in jobs {
            let name = job.name;
            graphs.insert(
                name.to_string(),
                write_graph(job, &tmp.path, opts, progress)?,
            );
        }
        progress(Progress::Finishing);
        let hashes = hasher
            .join()
            .map_err(|_| ExportError::model(&opts.out, "input hashing thread panicked"))??;
        Ok((graphs, hashes))
    })?;
    let tokenizer = tokenizer_src
        .map(|p| copy_tokenizer(&p, &tmp.path))
        .transpose()?;

    let version = env!("CARGO_PKG_VERSION");
    let manifest = ModelManifest {
        format: "motionrt-model",
        format_version: 1,
        motionrt_version: version,
        precision: opts.precision,
        semantics: opts.semantics,
        fused_attention: opts.fused_attention,
        winograd: opts.winograd,
        architecture: if tune_a_video {
            "tune-a-video"
        } else if motion_cfg.is_some() {
            "animatediff"
        } else {
            "image"
        },
        opset: OPSET,
        parameters: unet_report.parameters
            + motion_report.as_ref().map_or(0, |m| m.source.parameters)
            + vae_report.as_ref().map_or(0, |r| r.parameters)
            + text_report.as_ref().map_or(0, |r| r.parameters),
        unet: unet_report,
        unet_config: unet_cfg.clone(),
        max_frames: motion_cfg.as_ref().map(|m| m.max_seq_length),
        motion_module: motion_report,
        scaling_factor: vae_cfg
            .as_ref()
            .map_or(components::SD15_SCALING_FACTOR, |c| c.scaling_factor),
        vae: vae_report,
        vae_config: vae_cfg,
        text_encoder: text_report,
        text_encoder_config: text_cfg,
        tokenizer,
        text_tokens: TEXT_TOKENS,
        latent_scale: 8,
        graphs,
        scheduler_defaults: serde_json::json!({
            "num_train_timesteps": 1000,
            "beta_schedule": "linear",
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "clip_sample": false,
            "steps_offset": 1,
            "prediction_type": "epsilon",
        }),
        inputs_sha256,
        tensor_map,
    };
    let json_path = tmp.path.join("model.json");
    let text = serde_json::to_string_pretty(&manifest)
        .map_err(|e| ExportError::model(&json_path, e.to_string()))?;
    std::fs::write(&json_path, text).map_err(|e| ExportError::io(&json_path, e))?;
    commit_dir(tmp, &opts.out)?;
    Ok(manifest)
}
