//! The VAE and the CLIP text encoder: configs (from a diffusers/transformers `config.json` or
//! inferred from shapes), key remapping from the original single-file layout
//! (`first_stage_model.*`, `cond_stage_model.transformer.*`) and opening them as [`Source`]s.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::checkpoint::Checkpoint;
use crate::remap::Layout;
use crate::source::{Source, TensorRef};
use crate::{ExportError, Result, TensorMeta};

/// SD1.x's latent scaling factor (`vae.config.scaling_factor`).
pub const SD15_SCALING_FACTOR: f32 = 0.18215;

/// diffusers' `AutoencoderKL`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub latent_channels: usize,
    /// SD1.5: 128, 256, 512, 512.
    pub block_out_channels: Vec<usize>,
    /// ResNets per encoder level (the decoder has one more).
    pub layers_per_block: usize,
    pub norm_num_groups: usize,
    pub scaling_factor: f32,
}

impl VaeConfig {
    pub fn sd15() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            latent_channels: 4,
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            norm_num_groups: 32,
            scaling_factor: SD15_SCALING_FACTOR,
        }
    }

    /// Spatial downsampling factor between image and latent.
    pub fn scale(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }

    pub fn from_json(path: &Path, text: &str) -> Result<Self> {
        let v = parse_json(path, text)?;
        let d = Self::sd15();
        Ok(Self {
            in_channels: get_usize(path, &v, "in_channels", d.in_channels)?,
            out_channels: get_usize(path, &v, "out_channels", d.out_channels)?,
            latent_channels: get_usize(path, &v, "latent_channels", d.latent_channels)?,
            block_out_channels: get_list(path, &v, "block_out_channels")?
                .unwrap_or(d.block_out_channels),
            layers_per_block: get_usize(path, &v, "layers_per_block", d.layers_per_block)?,
            norm_num_groups: get_usize(path, &v, "norm_num_groups", d.norm_num_groups)?,
            scaling_factor: match v.get("scaling_factor") {
                Some(x) => x.as_f64().ok_or_else(|| {
                    config_err(
                        path,
                        format!("`scaling_factor` must be a number, found {x}"),
                    )
                })? as f32,
                None => d.scaling_factor,
            },
        })
    }

    /// Infer from diffusers-named shapes (original checkpoints carry no config).
    pub fn infer(path: &Path, shapes: &BTreeMap<String, TensorMeta>) -> Result<Self> {
        let shape = |k: &str| -> Result<&[usize]> {
            shapes
                .get(k)
                .map(|m| m.shape.as_slice())
                .ok_or_else(|| ExportError::MissingTensor {
                    path: path.to_path_buf(),
                    tensor: k.into(),
                    expected_for: "the VAE (needed to infer its architecture)".into(),
                })
        };
        let levels = (0..)
            .take_while(|i| {
                shapes.contains_key(&format!("encoder.down_blocks.{i}.resnets.0.conv1.weight"))
            })
            .count();
        if levels == 0 {
            return Err(config_err(
                path,
                "no VAE encoder blocks (`encoder.down_blocks.0.*`)".into(),
            ));
        }
        let block_out_channels = (0..levels)
            .map(|i| Ok(shape(&format!("encoder.down_blocks.{i}.resnets.0.conv1.weight"))?[0]))
            .collect::<Result<Vec<_>>>()?;
        let layers_per_block = (0..)
            .take_while(|j| {
                shapes.contains_key(&format!("encoder.down_blocks.0.resnets.{j}.conv1.weight"))
            })
            .count();
        let conv_in = shape("encoder.conv_in.weight")?;
        let conv_out = shape("decoder.conv_out.weight")?;
        let post = shape("post_quant_conv.weight")?;
        let c0 = block_out_channels[0];
        Ok(Self {
            in_channels: conv_in[1],
            out_channels: conv_out[0],
            latent_channels: post[0],
            block_out_channels,
            layers_per_block,
            // SD VAEs use 32 groups; 32 must divide the first width.
            norm_num_groups: if c0 % 32 == 0 { 32 } else { gcd(c0, 32) },
            scaling_factor: SD15_SCALING_FACTOR,
        })
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// The activation of a CLIP text encoder's MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HiddenAct {
    /// `x · sigmoid(1.702 x)` (OpenAI CLIP, SD1.x).
    QuickGelu,
    /// exact (erf) GELU (OpenCLIP, SD2.x).
    Gelu,
}

/// transformers' `CLIPTextModel`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TextEncoderConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: HiddenAct,
    pub layer_norm_eps: f32,
}

impl TextEncoderConfig {
    /// CLIP ViT-L/14's text tower (SD1.5).
    pub fn clip_vit_l14() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 77,
            hidden_act: HiddenAct::QuickGelu,
            layer_norm_eps: 1e-5,
        }
    }

    pub fn from_json(path: &Path, text: &str) -> Result<Self> {
        let v = parse_json(path, text)?;
        // A full CLIPModel config nests the text tower.
        let v = v.get("text_config").cloned().unwrap_or(v);
        let d = Self::clip_vit_l14();
        let hidden_act = match v.get("hidden_act").and_then(|x| x.as_str()) {
            None | Some("quick_gelu") => HiddenAct::QuickGelu,
            Some("gelu") => HiddenAct::Gelu,
            Some(other) => {
                return Err(config_err(
                    path,
                    format!("`hidden_act` {other:?} is not supported (quick_gelu or gelu)"),
                ))
            }
        };
        Ok(Self {
            vocab_size: get_usize(path, &v, "vocab_size", d.vocab_size)?,
            hidden_size: get_usize(path, &v, "hidden_size", d.hidden_size)?,
            intermediate_size: get_usize(path, &v, "intermediate_size", d.intermediate_size)?,
            num_hidden_layers: get_usize(path, &v, "num_hidden_layers", d.num_hidden_layers)?,
            num_attention_heads: get_usize(path, &v, "num_attention_heads", d.num_attention_heads)?,
            max_position_embeddings: get_usize(
                path,
                &v,
                "max_position_embeddings",
                d.max_position_embeddings,
            )?,
            hidden_act,
            layer_norm_eps: v
                .get("layer_norm_eps")
                .and_then(|x| x.as_f64())
                .map_or(d.layer_norm_eps, |x| x as f32),
        })
    }

    /// Infer from `text_model.*` shapes; heads default to width / 64 (CLIP's head size).
    pub fn infer(path: &Path, shapes: &BTreeMap<String, TensorMeta>) -> Result<Self> {
        let shape = |k: &str| -> Result<&[usize]> {
            shapes
                .get(k)
                .map(|m| m.shape.as_slice())
                .ok_or_else(|| ExportError::MissingTensor {
                    path: path.to_path_buf(),
                    tensor: k.into(),
                    expected_for: "the text encoder (needed to infer its architecture)".into(),
                })
        };
        let tok = shape("text_model.embeddings.token_embedding.weight")?;
        let pos = shape("text_model.embeddings.position_embedding.weight")?;
        let fc1 = shape("text_model.encoder.layers.0.mlp.fc1.weight")?;
        let layers = (0..)
            .take_while(|i| {
                shapes.contains_key(&format!("text_model.encoder.layers.{i}.mlp.fc1.weight"))
            })
            .count();
        let hidden = tok[1];
        Ok(Self {
            vocab_size: tok[0],
            hidden_size: hidden,
            intermediate_size: fc1[0],
            num_hidden_layers: layers,
            num_attention_heads: (hidden / 64).max(1),
            max_position_embeddings: pos[0],
            hidden_act: HiddenAct::QuickGelu,
            layer_norm_eps: 1e-5,
        })
    }
}

fn config_err(path: &Path, reason: String) -> ExportError {
    ExportError::Config {
        path: path.to_path_buf(),
        reason,
    }
}

fn parse_json(path: &Path, text: &str) -> Result<serde_json::Value> {
    serde_json::from_str(text).map_err(|e| config_err(path, format!("not JSON: {e}")))
}

fn get_usize(path: &Path, v: &serde_json::Value, k: &str, default: usize) -> Result<usize> {
    match v.get(k) {
        None | Some(serde_json::Value::Null) => Ok(default),
        Some(x) => x
            .as_u64()
            .map(|u| u as usize)
            .ok_or_else(|| config_err(path, format!("`{k}` must be an integer, found {x}"))),
    }
}

fn get_list(path: &Path, v: &serde_json::Value, k: &str) -> Result<Option<Vec<usize>>> {
    match v.get(k) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_u64()
                    .map(|u| u as usize)
                    .ok_or_else(|| config_err(path, format!("`{k}` must be a list of integers")))
            })
            .collect::<Result<Vec<_>>>()
            .map(Some),
        Some(x) => Err(config_err(path, format!("`{k}` must be a list, found {x}"))),
    }
}

/// Prefix of the VAE in original single-file checkpoints.
pub const LDM_VAE_PREFIX: &str = "first_stage_model.";
/// Prefix of the text encoder in original single-file checkpoints (a transformers CLIPTextModel).
pub const LDM_TEXT_PREFIX: &str = "cond_stage_model.transformer.";

/// Map an original-layout VAE key (without `first_stage_model.`) onto its diffusers name.
/// `levels` is the number of resolution levels (decoder `up.{i}` is diffusers `up_blocks.{levels-1-i}`).
pub fn ldm_vae_to_diffusers(key: &str, levels: usize) -> Option<String> {
    let parts: Vec<&str> = key.split('.').collect();
    let (side, rest) = (parts.first()?, &parts[1..]);
    if *side != "encoder" && *side != "decoder" {
        return match *side {
            "quant_conv" | "post_quant_conv" => Some(key.to_string()),
            _ => None,
        };
    }
    let leaf = |rest: &[&str]| -> String {
        rest.iter()
            .map(|p| match *p {
                "nin_shortcut" => "conv_shortcut",
                other => other,
            })
            .collect::<Vec<_>>()
            .join(".")
    };
    let mapped = match rest {
        ["down", i, "block", j, tail @ ..] => {
            format!("down_blocks.{i}.resnets.{j}.{}", leaf(tail))
        }
        ["down", i, "downsample", "conv", tail @ ..] => {
            format!("down_blocks.{i}.downsamplers.0.conv.{}", leaf(tail))
        }
        ["up", i, "block", j, tail @ ..] => {
            let i: usize = i.parse().ok()?;
            format!(
                "up_blocks.{}.resnets.{j}.{}",
                levels.checked_sub(i + 1)?,
                leaf(tail)
            )
        }
        ["up", i, "upsample", "conv", tail @ ..] => {
            let i: usize = i.parse().ok()?;
            format!(
                "up_blocks.{}.upsamplers.0.conv.{}",
                levels.checked_sub(i + 1)?,
                leaf(tail)
            )
        }
        ["mid", "block_1", tail @ ..] => format!("mid_block.resnets.0.{}", leaf(tail)),
        ["mid", "block_2", tail @ ..] => format!("mid_block.resnets.1.{}", leaf(tail)),
        ["mid", "attn_1", which, tail @ ..] => {
            let m = match *which {
                "norm" => "group_norm",
                "q" => "to_q",
                "k" => "to_k",
                "v" => "to_v",
                "proj_out" => "to_out.0",
                _ => return None,
            };
            format!("mid_block.attentions.0.{m}.{}", leaf(tail))
        }
        ["norm_out", tail @ ..] => format!("conv_norm_out.{}", leaf(tail)),
        ["conv_in", ..] | ["conv_out", ..] => leaf(rest),
        _ => return None,
    };
    Some(format!("{side}.{mapped}"))
}

/// diffusers VAE checkpoints saved before 0.14 name the mid-block attention `query`/`key`/
/// `value`/`proj_attn`.
fn legacy_vae_attention(key: &str) -> String {
    for (old, new) in [
        (".attentions.0.query.", ".attentions.0.to_q."),
        (".attentions.0.key.", ".attentions.0.to_k."),
        (".attentions.0.value.", ".attentions.0.to_v."),
        (".attentions.0.proj_attn.", ".attentions.0.to_out.0."),
    ] {
        if key.contains(old) {
            return key.replace(old, new);
        }
    }
    key.to_string()
}

/// Which component to open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    Vae,
    TextEncoder,
}

impl Component {
    fn folder(self) -> &'static str {
        match self {
            Component::Vae => "vae",
            Component::TextEncoder => "text_encoder",
        }
    }
    fn what(self) -> &'static str {
        match self {
            Component::Vae => "VAE",
            Component::TextEncoder => "text encoder",
        }
    }
}

const WEIGHT_NAMES: &[&str] = &[
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
    "diffusion_pytorch_model.fp16.safetensors",
    "model.fp16.safetensors",
];

/// Find a diffusers component folder: `path/{vae,text_encoder}/` of a pipeline folder, or the
/// component folder itself.
pub fn component_folder(path: &Path, c: Component) -> Option<PathBuf> {
    let sub = path.join(c.folder());
    if sub.join("config.json").is_file() {
        return Some(sub);
    }
    (path.join("config.json").is_file() && path.file_name().is_some_and(|n| n == c.folder()))
        .then(|| path.to_path_buf())
}

/// Whether `path` (a pipeline folder or single file) contains `c`: for a single file, the
/// tensors at both ends of the component must be present (partial leftovers are ignored).
pub fn has_component(path: &Path, c: Component) -> bool {
    if path.is_dir() {
        return component_folder(path, c).is_some();
    }
    let Ok(ck) = Checkpoint::open(path) else {
        return false;
    };
    let markers: &[&[&str]] = match c {
        Component::Vae => &[
            &["first_stage_model.encoder.conv_in.weight"],
            &["first_stage_model.decoder.conv_out.weight"],
        ],
        Component::TextEncoder => &[
            &[
                "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
                "cond_stage_model.transformer.embeddings.token_embedding.weight",
            ],
            &[
                "cond_stage_model.transformer.text_model.final_layer_norm.weight",
                "cond_stage_model.transformer.final_layer_norm.weight",
            ],
        ],
    };
    markers
        .iter()
        .all(|alts| alts.iter().any(|k| ck.meta(k).is_some()))
}

/// The text encoder key of a single-file checkpoint, without its prefix, in transformers' current
/// naming (old transformers versions had no `text_model.` level).
fn ldm_text_to_hf(key: &str) -> Option<String> {
    let k = key.strip_prefix(LDM_TEXT_PREFIX)?;
    if k.ends_with("position_ids") {
        return None;
    }
    Some(if k.starts_with("text_model.") {
        k.to_string()
    } else {
        format!("text_model.{k}")
    })
}

/// Config of an opened component.
#[derive(Debug, Clone)]
pub enum ComponentConfig {
    Vae(VaeConfig),
    TextEncoder(TextEncoderConfig),
}

/// Open the VAE or text encoder from a diffusers pipeline/component folder or an original
/// single-file checkpoint. Tensor names in the returned [`Source`] are diffusers/transformers
/// names.
///
/// `config`: a `config.json` to use instead of inferring the architecture of a single file
/// (attention heads and GroupNorm groups are not visible in the shapes).
pub fn open(path: &Path, c: Component, config: Option<&Path>) -> Result<(Source, ComponentConfig)> {
    let (files, config_json, layout) = if path.is_dir() {
        let folder = component_folder(path, c).ok_or_else(|| {
            ExportError::model(
                path,
                format!(
                    "no {} here: expected {}/config.json (a diffusers pipeline folder) or a config.json in the folder itself",
                    c.what(),
                    c.folder()
                ),
            )
        })?;
        let cfg = folder.join("config.json");
        if let Some(given) = config {
            // the folder's own config describes its weights; replacing it only misreads them
            let flag = match c {
                Component::Vae => "--vae-config",
                Component::TextEncoder => "--text-encoder-config",
            };
            return Err(ExportError::model(
                given,
                format!(
                    "{flag} is for a single-file {} (an original-layout checkpoint); {} describes the folder's weights: edit that, or drop {flag}",
                    c.what(),
                    cfg.display()
                ),
            ));
        }
        let text = std::fs::read_to_string(&cfg).map_err(|e| ExportError::io(&cfg, e))?;
        let weights = WEIGHT_NAMES
            .iter()
            .map(|n| folder.join(n))
            .find(|p| p.is_file())
            .ok_or_else(|| {
                ExportError::model(
                    &folder,
                    format!(
                        "no {} weights found (looked for {})",
                        c.what(),
                        WEIGHT_NAMES.join(", ")
                    ),
                )
            })?;
        (
            vec![Checkpoint::open(&weights)?],
            Some((cfg, text)),
            Layout::Diffusers,
        )
    } else {
        (vec![Checkpoint::open(path)?], None, Layout::Ldm)
    };
    let ck = &files[0];
    let mut tensors = BTreeMap::new();
    let mut add = |name: String, key: &str| {
        if let Some(meta) = ck.meta(key) {
            tensors.entry(name).or_insert_with(|| TensorRef {
                file: 0,
                key: key.to_string(),
                meta: meta.clone(),
            });
        }
    };
    match (c, layout) {
        (Component::Vae, Layout::Diffusers) => {
            for k in ck.keys() {
                add(legacy_vae_attention(k), k);
            }
        }
        (Component::TextEncoder, Layout::Diffusers) => {
            for k in ck.keys() {
                if k.ends_with("position_ids") {
                    continue;
                }
                let name = if k.starts_with("text_model.") {
                    k.to_string()
                } else {
                    format!("text_model.{k}")
                };
                add(name, k);
            }
        }
        (Component::Vae, _) => {
            let levels = ck
                .keys()
                .filter_map(|k| {
                    k.strip_prefix(LDM_VAE_PREFIX)?
                        .strip_prefix("encoder.down.")?
                        .split('.')
                        .next()?
                        .parse::<usize>()
                        .ok()
                })
                .max()
                .map_or(0, |m| m + 1);
            for k in ck.keys() {
                if let Some(name) = k
                    .strip_prefix(LDM_VAE_PREFIX)
                    .and_then(|r| ldm_vae_to_diffusers(r, levels))
                {
                    add(name, k);
                }
            }
        }
        (Component::TextEncoder, _) => {
            for k in ck.keys() {
                if let Some(name) = ldm_text_to_hf(k) {
                    add(name, k);
                }
            }
        }
    }
    if tensors.is_empty() {
        let expected = match (c, path.is_dir()) {
            (Component::Vae, false) => "`first_stage_model.*` keys",
            (Component::TextEncoder, false) => "`cond_stage_model.transformer.*` keys",
            (Component::Vae, true) => "diffusers AutoencoderKL names like `decoder.conv_in.weight`",
            (Component::TextEncoder, true) => {
                "transformers names like `text_model.embeddings.token_embedding.weight`"
            }
        };
        return Err(ExportError::model(
            ck.path(),
            format!("no {} tensors found (expected {expected})", c.what()),
        ));
    }
    let config_json = match config {
        Some(p) => Some((
            p.to_path_buf(),
            std::fs::read_to_string(p).map_err(|e| ExportError::io(p, e))?,
        )),
        None => config_json,
    };
    let src = Source {
        path: path.to_path_buf(),
        files,
        config_json,
        layout,
        tensors,
    };
    let shapes = src.shapes();
    let cfg = match (c, &src.config_json) {
        (Component::Vae, Some((p, t))) => ComponentConfig::Vae(VaeConfig::from_json(p, t)?),
        (Component::Vae, None) => ComponentConfig::Vae(VaeConfig::infer(path, &shapes)?),
        (Component::TextEncoder, Some((p, t))) => {
            ComponentConfig::TextEncoder(TextEncoderConfig::from_json(p, t)?)
        }
        (Component::TextEncoder, None) => {
            ComponentConfig::TextEncoder(TextEncoderConfig::infer(path, &shapes)?)
        }
    };
    Ok((src, cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldm_vae_keys() {
        let cases = [
            ("encoder.conv_in.weight", "encoder.conv_in.weight"),
            (
                "encoder.down.1.block.0.nin_shortcut.bias",
                "encoder.down_blocks.1.resnets.0.conv_shortcut.bias",
            ),
            (
                "encoder.down.0.downsample.conv.weight",
                "encoder.down_blocks.0.downsamplers.0.conv.weight",
            ),
            (
                "encoder.mid.block_2.norm1.weight",
                "encoder.mid_block.resnets.1.norm1.weight",
            ),
            (
                "encoder.mid.attn_1.q.weight",
                "encoder.mid_block.attentions.0.to_q.weight",
            ),
            (
                "encoder.mid.attn_1.proj_out.bias",
                "encoder.mid_block.attentions.0.to_out.0.bias",
            ),
            (
                "encoder.mid.attn_1.norm.weight",
                "encoder.mid_block.attentions.0.group_norm.weight",
            ),
            ("encoder.norm_out.bias", "encoder.conv_norm_out.bias"),
            (
                "decoder.up.3.block.2.conv1.weight",
                "decoder.up_blocks.0.resnets.2.conv1.weight",
            ),
            (
                "decoder.up.1.upsample.conv.bias",
                "decoder.up_blocks.2.upsamplers.0.conv.bias",
            ),
            (
                "decoder.up.0.block.0.nin_shortcut.weight",
                "decoder.up_blocks.3.resnets.0.conv_shortcut.weight",
            ),
            ("post_quant_conv.weight", "post_quant_conv.weight"),
            ("quant_conv.bias", "quant_conv.bias"),
        ];
        for (k, want) in cases {
            assert_eq!(ldm_vae_to_diffusers(k, 4).as_deref(), Some(want), "{k}");
        }
        assert_eq!(ldm_vae_to_diffusers("loss.logvar", 4), None);
        assert_eq!(
            ldm_vae_to_diffusers("decoder.up.4.block.0.conv1.weight", 4),
            None
        );
    }

    #[test]
    fn ldm_text_keys() {
        assert_eq!(
            ldm_text_to_hf(
                "cond_stage_model.transformer.text_model.encoder.layers.3.mlp.fc1.weight"
            )
            .as_deref(),
            Some("text_model.encoder.layers.3.mlp.fc1.weight")
        );
        assert_eq!(
            ldm_text_to_hf("cond_stage_model.transformer.embeddings.token_embedding.weight")
                .as_deref(),
            Some("text_model.embeddings.token_embedding.weight")
        );
        assert_eq!(
            ldm_text_to_hf("cond_stage_model.transformer.text_model.embeddings.position_ids"),
            None
        );
        assert_eq!(ldm_text_to_hf("model.diffusion_model.out.0.weight"), None);
    }
}
