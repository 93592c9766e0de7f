//! `motionrt export`: checkpoints → `unet.onnx` (+ external data) and `model.json`, written into a
//! temporary sibling directory and renamed into place only when everything succeeded.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::config::{MotionConfig, UnetConfig};
use crate::graph::unet::{
    self, Semantics, INPUT_CONTEXT, INPUT_SAMPLE, INPUT_TIMESTEP, OUTPUT_NOISE, TEXT_TOKENS,
};
use crate::graph::{GraphBuilder, Precision};
use crate::onnx::proto::{
    GraphProto, ModelProto, OperatorSetIdProto, StringStringEntryProto, TensorProto,
    TensorProtoDataType,
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
    pub unet: SourceReport,
    pub unet_config: UnetConfig,
    pub motion_module: Option<MotionReport>,
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
    /// diffusers name → where it came from.
    pub tensor_map: BTreeMap<String, TensorSource>,
}

/// Removes a directory on drop unless disarmed: a failed export leaves nothing behind.
struct TempDir {
    path: PathBuf,
    armed: bool,
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

/// Resolve every graph parameter to a source tensor, checking presence, shape and dtype.
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
            return Err(ExportError::MissingTensor {
                path: src.path.clone(),
                tensor: p.name.clone(),
                expected_for: format!(
                    "{what}, diffusers name, read from the {} layout",
                    src.layout
                ),
            });
        };
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
        out.push((src, r));
    }
    Ok(out)
}

fn prepare_out_dir(out: &Path, overwrite: bool) -> Result<TempDir> {
    if out.exists() && !overwrite {
        return Err(ExportError::model(
            out,
            "output directory already exists (pass --overwrite to replace it)",
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
    std::fs::create_dir(&tmp).map_err(|e| ExportError::io(&tmp, e))?;
    Ok(TempDir {
        path: tmp,
        armed: true,
    })
}

fn commit_dir(mut tmp: TempDir, out: &Path) -> Result<()> {
    if out.exists() {
        let old = tmp.path.with_extension("old");
        std::fs::rename(out, &old).map_err(|e| ExportError::io(out, e))?;
        std::fs::rename(&tmp.path, out).map_err(|e| ExportError::io(out, e))?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(&tmp.path, out).map_err(|e| ExportError::io(out, e))?;
    }
    tmp.armed = false;
    Ok(())
}

fn sym(s: &str) -> serde_json::Value {
    serde_json::Value::String(s.into())
}

/// Export the UNet (with motion modules) described by `opts`.
pub fn export(opts: &ExportOptions, progress: &mut dyn FnMut(Progress)) -> Result<ModelManifest> {
    let (unet_src, unet_cfg) = source::open_unet(&opts.unet)?;
    let has_builtin_motion = unet_src
        .tensors
        .keys()
        .any(|k| k.contains(".motion_modules."));
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

    let g = unet::build(
        &unet_cfg,
        motion_cfg.as_ref(),
        opts.semantics,
        opts.precision,
    );
    let resolved = resolve_params(&g, &unet_src, motion_src.as_ref())?;
    let total_bytes: u64 = g
        .params
        .iter()
        .map(|p| (p.shape.iter().product::<usize>() * opts.precision.bytes()) as u64)
        .sum();
    let external = match opts.external_data {
        ExternalData::Always => true,
        ExternalData::Never => false,
        ExternalData::Auto => total_bytes > INLINE_LIMIT,
    };
    if !external && total_bytes >= (2u64 << 30) - (64 << 20) {
        return Err(ExportError::model(
            &opts.out,
            format!("{total_bytes} bytes of weights cannot be stored inside one protobuf; use external data"),
        ));
    }

    let tmp = prepare_out_dir(&opts.out, opts.overwrite)?;
    progress(Progress::Start {
        tensors: g.params.len(),
        total_bytes,
    });

    // Hash the inputs on another thread while the weights stream.
    let mut input_files: Vec<PathBuf> = unet_src.input_files();
    if let Some(m) = &motion_src {
        for f in m.input_files() {
            if !input_files.contains(&f) {
                input_files.push(f);
            }
        }
    }
    let onnx_name = "unet.onnx";
    let data_name = "unet.onnx.data";
    let (initializers, inputs_sha256) = std::thread::scope(|s| -> Result<_> {
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
        let mut writer = if external {
            Some(ExternalDataWriter::create(
                &tmp.path.join(data_name),
                data_name,
            )?)
        } else {
            None
        };
        let mut buf = Vec::new();
        let mut bytes = Vec::new();
        let mut inits: Vec<TensorProto> = Vec::with_capacity(g.params.len());
        for (p, (src, r)) in g.params.iter().zip(&resolved) {
            let ckpt = &src.files[r.file];
            let want = match opts.precision {
                Precision::Fp32 => DType::F32,
                Precision::Fp16 => DType::F16,
            };
            // Same dtype in and out: the stored bytes are the output. Otherwise decode (from the
            // bytes already read when the format gave them, else through the reader) and encode.
            match ckpt.read_raw_into(&r.key, &mut bytes)? {
                Some(dt) if dt == want => {}
                found => {
                    match found {
                        Some(dt) => decode_to_f32(dt, &bytes, &mut buf),
                        None => ckpt.read_f32_into(&r.key, &mut buf)?,
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
            let dims: Vec<i64> = p.shape.iter().map(|&d| d as i64).collect();
            let dt = opts.precision.onnx_type();
            let t = match writer.as_mut() {
                Some(w) => w.append(&p.name, dt, &dims, &bytes)?,
                None => TensorProto {
                    name: p.name.clone(),
                    dims,
                    data_type: dt as i32,
                    raw_data: bytes.clone(),
                    ..Default::default()
                },
            };
            inits.push(t);
            progress(Progress::Tensor {
                name: p.name.clone(),
                bytes: bytes.len() as u64,
            });
        }
        if let Some(w) = writer {
            w.finish()?;
        }
        progress(Progress::Finishing);
        let hashes = hasher
            .join()
            .map_err(|_| ExportError::model(&opts.out, "input hashing thread panicked"))??;
        Ok((inits, hashes))
    })?;

    // Assemble the model.
    let f32t = TensorProtoDataType::Float;
    let d = unet_cfg.cross_attention_dim as i64;
    let cin = unet_cfg.in_channels as i64;
    let cout = unet_cfg.out_channels as i64;
    let s = |x: &str| Dim::Symbolic(x.into());
    let inputs = vec![
        value_info(
            INPUT_SAMPLE,
            f32t,
            &[s("B"), Dim::Fixed(cin), s("F"), s("h"), s("w")],
        ),
        value_info(INPUT_TIMESTEP, f32t, &[s("B")]),
        value_info(
            INPUT_CONTEXT,
            f32t,
            &[s("BF"), Dim::Fixed(TEXT_TOKENS as i64), Dim::Fixed(d)],
        ),
    ];
    let outputs = vec![value_info(
        OUTPUT_NOISE,
        f32t,
        &[s("B"), Dim::Fixed(cout), s("F"), s("h"), s("w")],
    )];
    let tensor_map: BTreeMap<String, TensorSource> = g
        .params
        .iter()
        .zip(&resolved)
        .map(|(p, (src, r))| {
            (
                p.name.clone(),
                TensorSource {
                    file: src.file_of(r).to_path_buf(),
                    key: r.key.clone(),
                },
            )
        })
        .collect();
    let node_count = g.nodes.len();
    let init_count = initializers.len() + g.consts.len();
    let GraphBuilder { nodes, consts, .. } = g;
    let mut all_inits = initializers;
    all_inits.extend(consts);
    let version = env!("CARGO_PKG_VERSION");
    let mut meta = vec![
        ("motionrt.semantics", opts.semantics.to_string()),
        ("motionrt.precision", opts.precision.to_string()),
    ];
    if let Some(m) = &motion_cfg {
        meta.push(("motionrt.motion_version", m.version.to_string()));
        meta.push(("motionrt.max_frames", m.max_seq_length.to_string()));
    }
    let model = ModelProto {
        ir_version: IR_VERSION,
        producer_name: "motionrt".into(),
        producer_version: version.into(),
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: OPSET,
        }],
        metadata_props: meta
            .into_iter()
            .map(|(k, v)| StringStringEntryProto {
                key: k.into(),
                value: v,
            })
            .collect(),
        graph: Some(GraphProto {
            name: "motionrt_unet".into(),
            node: nodes,
            initializer: all_inits,
            input: inputs,
            output: outputs,
            ..Default::default()
        }),
        ..Default::default()
    };
    write_model(&model, &tmp.path.join(onnx_name))?;
    drop(model);

    // model.json
    let params_of = |src: &Source| -> u64 {
        resolved
            .iter()
            .filter(|(s, _)| std::ptr::eq(*s, src))
            .map(|(_, r)| r.meta.numel() as u64)
            .sum()
    };
    let report = |src: &Source| SourceReport {
        path: src.path.clone(),
        layout: src.layout,
        files: src.input_files(),
        parameters: params_of(src),
    };
    let dims = |v: &[&str]| {
        v.iter()
            .map(|x| {
                x.parse::<i64>()
                    .map(serde_json::Value::from)
                    .unwrap_or_else(|_| sym(x))
            })
            .collect::<Vec<_>>()
    };
    let cin_s = cin.to_string();
    let cout_s = cout.to_string();
    let d_s = d.to_string();
    let tokens_s = TEXT_TOKENS.to_string();
    let mut graphs = BTreeMap::new();
    graphs.insert(
        "unet".to_string(),
        GraphReport {
            file: onnx_name.into(),
            external_data: external.then(|| data_name.to_string()),
            inputs: BTreeMap::from([
                (
                    INPUT_SAMPLE.to_string(),
                    dims(&["B", &cin_s, "F", "h", "w"]),
                ),
                (INPUT_TIMESTEP.to_string(), dims(&["B"])),
                (INPUT_CONTEXT.to_string(), dims(&["BF", &tokens_s, &d_s])),
            ]),
            outputs: BTreeMap::from([(
                OUTPUT_NOISE.to_string(),
                dims(&["B", &cout_s, "F", "h", "w"]),
            )]),
            nodes: node_count,
            initializers: init_count,
        },
    );
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
    let manifest = ModelManifest {
        format: "motionrt-model",
        format_version: 1,
        motionrt_version: version,
        precision: opts.precision,
        semantics: opts.semantics,
        opset: OPSET,
        parameters: unet_report.parameters
            + motion_report.as_ref().map_or(0, |m| m.source.parameters),
        unet: unet_report,
        unet_config: unet_cfg.clone(),
        max_frames: motion_cfg.as_ref().map(|m| m.max_seq_length),
        motion_module: motion_report,
        text_tokens: TEXT_TOKENS,
        latent_scale: 8,
        graphs,
        scheduler_defaults: serde_json::json!({
            "num_train_timesteps": 1000,
            "beta_schedule": "linear",
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "clip_sample": false,
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
