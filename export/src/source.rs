//! Resolving `--unet` / `--motion-module` paths into checkpoints whose keys are mapped onto
//! diffusers names.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::checkpoint::Checkpoint;
use crate::config::{MotionConfig, UnetConfig};
use crate::remap::{self, Layout};
use crate::{ExportError, Result, TensorMeta};

/// Where one diffusers-named tensor comes from.
#[derive(Debug, Clone)]
pub struct TensorRef {
    /// Index into [`Source::files`].
    pub file: usize,
    /// The key in that file (source layout).
    pub key: String,
    pub meta: TensorMeta,
}

/// One logical input (a UNet or a motion module): one or more checkpoint files, their layout and
/// the diffusers-name map.
pub struct Source {
    /// What the user passed.
    pub path: PathBuf,
    pub files: Vec<Checkpoint>,
    /// A diffusers `config.json`, if the input had one.
    pub config_json: Option<(PathBuf, String)>,
    pub layout: Layout,
    pub tensors: BTreeMap<String, TensorRef>,
}

impl Source {
    pub fn shapes(&self) -> BTreeMap<String, TensorMeta> {
        self.tensors
            .iter()
            .map(|(k, r)| (k.clone(), r.meta.clone()))
            .collect()
    }

    /// Files that make up this input (weights and config), for hashing and reporting.
    pub fn input_files(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = self.files.iter().map(|c| c.path().to_path_buf()).collect();
        if let Some((p, _)) = &self.config_json {
            v.push(p.clone());
        }
        v
    }

    pub fn file_of(&self, r: &TensorRef) -> &Path {
        self.files[r.file].path()
    }

    /// Restrict to the tensors whose diffusers name satisfies `keep`.
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.tensors.retain(|k, _| keep(k));
    }
}

const WEIGHT_NAMES: &[&str] = &[
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.bin",
    "model.safetensors",
];

/// Find the folder holding `config.json` for `component` (`unet`) inside a pipeline folder, or
/// the folder itself.
fn model_folder(path: &Path, component: Option<&str>) -> Option<PathBuf> {
    if let Some(c) = component {
        let sub = path.join(c);
        if sub.join("config.json").is_file() {
            return Some(sub);
        }
    }
    path.join("config.json")
        .is_file()
        .then(|| path.to_path_buf())
}

fn open_folder(
    path: &Path,
    component: Option<&str>,
) -> Result<(Vec<Checkpoint>, (PathBuf, String))> {
    let folder = model_folder(path, component).ok_or_else(|| {
        ExportError::model(
            path,
            format!(
                "not a diffusers model folder: no {}config.json",
                component
                    .map(|c| format!("{c}/config.json or "))
                    .unwrap_or_default()
            ),
        )
    })?;
    let cfg_path = folder.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| ExportError::io(&cfg_path, e))?;
    // Sharded weights: an index file maps keys to shard files.
    for index in [
        "diffusion_pytorch_model.safetensors.index.json",
        "diffusion_pytorch_model.bin.index.json",
    ] {
        let ip = folder.join(index);
        if ip.is_file() {
            let t = std::fs::read_to_string(&ip).map_err(|e| ExportError::io(&ip, e))?;
            let v: serde_json::Value = serde_json::from_str(&t)
                .map_err(|e| ExportError::malformed(&ip, "index json", e.to_string()))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| {
                    ExportError::malformed(&ip, "index json", "no `weight_map` object")
                })?;
            let mut shards: Vec<String> = map
                .values()
                .filter_map(|s| s.as_str().map(String::from))
                .collect();
            shards.sort();
            shards.dedup();
            let files = shards
                .iter()
                .map(|s| Checkpoint::open(&folder.join(s)))
                .collect::<Result<Vec<_>>>()?;
            return Ok((files, (cfg_path, text)));
        }
    }
    for name in WEIGHT_NAMES {
        let p = folder.join(name);
        if p.is_file() {
            return Ok((vec![Checkpoint::open(&p)?], (cfg_path, text)));
        }
    }
    Err(ExportError::model(
        &folder,
        format!("no weights found (looked for {})", WEIGHT_NAMES.join(", ")),
    ))
}

/// Layers per block of an LDM checkpoint, read from where its first downsampler sits
/// (`input_blocks.{L+1}.0.op`).
fn ldm_layers_per_block(files: &[Checkpoint]) -> Option<usize> {
    files
        .iter()
        .flat_map(|c| c.keys())
        .filter_map(|k| {
            let r = k
                .strip_prefix(remap::LDM_UNET_PREFIX)?
                .strip_prefix("input_blocks.")?;
            let (n, rest) = r.split_once('.')?;
            rest.starts_with("0.op.")
                .then(|| n.parse::<usize>().ok())
                .flatten()
        })
        .min()
        .map(|n| n - 1)
}

fn build_map(
    path: &Path,
    files: &[Checkpoint],
    layout: Layout,
) -> Result<BTreeMap<String, TensorRef>> {
    let lpb = if layout == Layout::Ldm {
        ldm_layers_per_block(files).unwrap_or(2)
    } else {
        2
    };
    let mut map = BTreeMap::new();
    for (fi, ckpt) in files.iter().enumerate() {
        for key in ckpt.keys() {
            let Some(name) = remap::to_diffusers(layout, key, lpb) else {
                continue;
            };
            let Some(meta) = ckpt.meta(key) else { continue };
            map.entry(name).or_insert_with(|| TensorRef {
                file: fi,
                key: key.to_string(),
                meta: meta.clone(),
            });
        }
    }
    if map.is_empty() {
        return Err(ExportError::model(
            path,
            format!("no UNet or motion-module tensors found in the {layout} layout"),
        ));
    }
    Ok(map)
}

/// Open a UNet input: a diffusers folder (pipeline or `unet/`), or a single file in the LDM or
/// diffusers layout.
pub fn open_unet(path: &Path) -> Result<(Source, UnetConfig)> {
    let (files, config_json) = if path.is_dir() {
        let (f, c) = open_folder(path, Some("unet"))?;
        (f, Some(c))
    } else {
        (vec![Checkpoint::open(path)?], None)
    };
    let layout = remap::detect_layout(files.iter().flat_map(|c| c.keys())).ok_or_else(|| {
        ExportError::model(
            path,
            "no Stable Diffusion UNet tensors found (expected `model.diffusion_model.*` keys of an original checkpoint or diffusers names like `conv_in.weight`)",
        )
    })?;
    if layout == Layout::AnimateDiff {
        return Err(ExportError::model(
            path,
            "this is an AnimateDiff motion module, not a UNet: pass it with --motion-module",
        ));
    }
    let tensors = build_map(path, &files, layout)?;
    let mut src = Source {
        path: path.to_path_buf(),
        files,
        config_json,
        layout,
        tensors,
    };
    let cfg = match &src.config_json {
        Some((p, text)) => UnetConfig::from_diffusers_json(p, text)?,
        None => UnetConfig::infer(path, &src.shapes())?,
    };
    // Positional tables are rebuilt, never read.
    src.retain(|k| !k.ends_with(".pos_embed.pe"));
    Ok((src, cfg))
}

/// Motion-module settings a diffusers `MotionAdapter` config may carry.
fn adapter_json_hints(path: &Path, text: &str) -> Result<(Option<usize>, Option<usize>)> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| ExportError::Config {
        path: path.to_path_buf(),
        reason: format!("not JSON: {e}"),
    })?;
    let first = |k: &str| match v.get(k) {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|u| u as usize),
        Some(serde_json::Value::Array(a)) => a.first().and_then(|x| x.as_u64()).map(|u| u as usize),
        _ => None,
    };
    Ok((
        first("motion_max_seq_length"),
        first("motion_num_attention_heads"),
    ))
}

/// Positional-table length carried by the tensors themselves (`pos_embed.pe` = [1, len, C]).
fn pe_len(src: &Source) -> Option<usize> {
    src.tensors
        .iter()
        .find(|(k, _)| k.ends_with(".pos_embed.pe"))
        .and_then(|(_, r)| r.meta.shape.get(1).copied())
}

/// Open a motion-module input: an original AnimateDiff file or a diffusers `MotionAdapter`
/// folder (or a diffusers-layout single file).
pub fn open_motion(path: &Path) -> Result<(Source, MotionConfig)> {
    let (files, config_json) = if path.is_dir() {
        let (f, c) = open_folder(path, None)?;
        (f, Some(c))
    } else {
        (vec![Checkpoint::open(path)?], None)
    };
    let layout = remap::detect_layout(files.iter().flat_map(|c| c.keys())).ok_or_else(|| {
        ExportError::model(
            path,
            "no motion-module tensors found (expected keys like `down_blocks.0.motion_modules.0.temporal_transformer.norm.weight`)",
        )
    })?;
    if layout == Layout::Ldm {
        return Err(ExportError::model(
            path,
            "this is a Stable Diffusion checkpoint, not a motion module: pass it with --unet",
        ));
    }
    let tensors = build_map(path, &files, layout)?;
    let mut src = Source {
        path: path.to_path_buf(),
        files,
        config_json,
        layout,
        tensors,
    };
    src.retain(|k| k.contains(".motion_modules."));
    if src.tensors.is_empty() {
        return Err(ExportError::model(
            path,
            "no motion-module tensors (`*.motion_modules.*`) found",
        ));
    }
    let (json_len, json_heads) = match &src.config_json {
        Some((p, t)) => adapter_json_hints(p, t)?,
        None => (None, None),
    };
    let cfg = MotionConfig::infer(path, &src.shapes(), pe_len(&src).or(json_len), json_heads)
        .map_err(|e| src.file_names(e))?;
    src.retain(|k| !k.ends_with(".pos_embed.pe"));
    Ok((src, cfg))
}

impl Source {
    /// `e` with its tensor named as this source's file names it (its diffusers name is what
    /// the exporter looks for; an original AnimateDiff file holds
    /// `….motion_modules.N.temporal_transformer.…`).
    pub(crate) fn file_names(&self, mut e: ExportError) -> ExportError {
        let file_name = |t: &str| {
            if let Some(r) = self.tensors.get(t) {
                Some(r.key.clone())
            } else if self.layout == Layout::AnimateDiff {
                crate::remap::diffusers_to_animatediff(t)
            } else {
                None
            }
        };
        match &mut e {
            ExportError::ShapeMismatch { tensor, .. }
            | ExportError::MissingTensor { tensor, .. }
            | ExportError::UnsupportedDtype { tensor, .. } => {
                if let Some(k) = file_name(tensor) {
                    *tensor = k;
                }
            }
            // a message that names tensors in backquotes
            ExportError::Model { reason, .. } => {
                let parts: Vec<&str> = reason.split('`').collect();
                *reason = parts
                    .iter()
                    .enumerate()
                    .map(|(i, p)| match (i % 2, file_name(p)) {
                        (1, Some(k)) => k,
                        _ => p.to_string(),
                    })
                    .collect::<Vec<_>>()
                    .join("`");
            }
            _ => {}
        }
        e
    }
}

/// Check that a motion module fits a UNet; the error names the motion file and a tensor.
pub fn check_compatible(
    unet: &UnetConfig,
    motion: &MotionConfig,
    motion_src: &Source,
) -> Result<()> {
    if motion.block_out_channels != unet.block_out_channels
        || motion.layers_per_block != unet.layers_per_block
    {
        let levels = motion
            .block_out_channels
            .len()
            .min(unet.block_out_channels.len());
        let i = (0..levels)
            .find(|&i| motion.block_out_channels[i] != unet.block_out_channels[i])
            .unwrap_or(levels.saturating_sub(1));
        let name = format!("down_blocks.{i}.motion_modules.0.proj_in.weight");
        let found = motion_src
            .tensors
            .get(&name)
            .map(|r| r.meta.shape.clone())
            .unwrap_or_default();
        let c = unet.block_out_channels.get(i).copied().unwrap_or(0);
        let key = motion_src
            .tensors
            .get(&name)
            .map(|r| r.key.clone())
            .unwrap_or(name);
        return Err(ExportError::ShapeMismatch {
            path: motion_src.path.clone(),
            tensor: key,
            found,
            expected: vec![c, c],
            hint: format!(
                " — this motion module has levels of {:?} channels × {} layers, the UNet has {:?} × {}; it was made for another base model (an SDXL motion module cannot inflate an SD1.5 UNet)",
                motion.block_out_channels, motion.layers_per_block, unet.block_out_channels, unet.layers_per_block
            ),
        });
    }
    if motion.norm_num_groups == 0
        || motion
            .block_out_channels
            .iter()
            .any(|c| c % motion.norm_num_groups != 0 || c % motion.num_attention_heads != 0)
    {
        return Err(ExportError::model(
            &motion_src.path,
            format!(
                "motion-module widths {:?} are not divisible by {} groups and {} heads",
                motion.block_out_channels, motion.norm_num_groups, motion.num_attention_heads
            ),
        ));
    }
    Ok(())
}
