//! Model configs: plain structs read from a diffusers `config.json` or inferred from a
//! checkpoint's tensor shapes (original layouts carry no config), with named presets.
//! Validation returns errors; nothing here panics on bad input.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use crate::{ExportError, Result, TensorMeta};

/// The spatial SD UNet (SD1.x family) that AnimateDiff inflates.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UnetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    /// Output channels per resolution level (SD1.5: 320, 640, 1280, 1280).
    pub block_out_channels: Vec<usize>,
    /// Whether each down level has cross-attention transformers (SD1.5: true, true, true, false).
    /// Up levels mirror it in reverse.
    pub down_attention: Vec<bool>,
    pub layers_per_block: usize,
    pub cross_attention_dim: usize,
    /// Attention heads of the spatial transformers (SD1.x: 8; diffusers calls it
    /// `attention_head_dim` in SD1.5 configs).
    pub num_attention_heads: usize,
    pub transformer_layers_per_block: usize,
    pub norm_num_groups: usize,
    pub norm_eps: f32,
    pub use_linear_projection: bool,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f32,
    /// Width of the sinusoidal timestep embedding (= block_out_channels[0]).
    pub time_proj_dim: usize,
    /// Width of the timestep MLP (SD1.5: 1280).
    pub time_embed_dim: usize,
}

impl UnetConfig {
    /// Stable Diffusion 1.5, as in `runwayml/stable-diffusion-v1-5/unet/config.json`.
    pub fn sd15() -> Self {
        Self {
            in_channels: 4,
            out_channels: 4,
            block_out_channels: vec![320, 640, 1280, 1280],
            down_attention: vec![true, true, true, false],
            layers_per_block: 2,
            cross_attention_dim: 768,
            num_attention_heads: 8,
            transformer_layers_per_block: 1,
            norm_num_groups: 32,
            norm_eps: 1e-5,
            use_linear_projection: false,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            time_proj_dim: 320,
            time_embed_dim: 1280,
        }
    }

    /// Read a diffusers `UNet2DConditionModel` / `UNetMotionModel` config.json.
    pub fn from_diffusers_json(path: &Path, text: &str) -> Result<Self> {
        let bad = |reason: String| ExportError::Config {
            path: path.to_path_buf(),
            reason,
        };
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| bad(format!("not JSON: {e}")))?;
        let get_usize = |k: &str, default: Option<usize>| -> Result<usize> {
            match v.get(k) {
                Some(x) if x.is_u64() => Ok(x.as_u64().unwrap_or_default() as usize),
                Some(serde_json::Value::Null) | None => {
                    default.ok_or_else(|| bad(format!("`{k}` is missing")))
                }
                Some(x) => Err(bad(format!("`{k}` must be an integer, found {x}"))),
            }
        };
        let list = |k: &str| -> Result<Vec<serde_json::Value>> {
            v.get(k)
                .and_then(|x| x.as_array())
                .cloned()
                .ok_or_else(|| bad(format!("`{k}` must be a list")))
        };
        let block_out_channels = list("block_out_channels")?
            .iter()
            .map(|x| x.as_u64().map(|u| u as usize))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad("`block_out_channels` must be a list of integers".into()))?;
        let down_types = list("down_block_types")?;
        let up_types = list("up_block_types")?;
        if down_types.len() != block_out_channels.len() || up_types.len() != down_types.len() {
            return Err(bad(format!(
                "{} down blocks, {} up blocks and {} channel entries must agree",
                down_types.len(),
                up_types.len(),
                block_out_channels.len()
            )));
        }
        let mut down_attention = Vec::new();
        for t in &down_types {
            match t.as_str() {
                Some(
                    "CrossAttnDownBlock2D" | "CrossAttnDownBlockMotion" | "CrossAttnDownBlock3D",
                ) => down_attention.push(true),
                Some("DownBlock2D" | "DownBlockMotion" | "DownBlock3D") => {
                    down_attention.push(false)
                }
                other => return Err(bad(format!("unsupported down block type {other:?}"))),
            }
        }
        for (i, t) in up_types.iter().enumerate() {
            let want = down_attention[down_attention.len() - 1 - i];
            let attn = match t.as_str() {
                Some("CrossAttnUpBlock2D" | "CrossAttnUpBlockMotion" | "CrossAttnUpBlock3D") => {
                    true
                }
                Some("UpBlock2D" | "UpBlockMotion" | "UpBlock3D") => false,
                other => return Err(bad(format!("unsupported up block type {other:?}"))),
            };
            if attn != want {
                return Err(bad(format!(
                    "up block {i} ({t}) does not mirror the down blocks; only symmetric UNets are supported"
                )));
            }
        }
        for k in [
            "addition_embed_type",
            "class_embed_type",
            "encoder_hid_dim_type",
        ] {
            if let Some(x) = v.get(k) {
                if !x.is_null() {
                    return Err(bad(format!(
                        "`{k}` = {x} is not supported (SD1.x UNets only)"
                    )));
                }
            }
        }
        if let Some(t) = v.get("mid_block_type").and_then(|x| x.as_str()) {
            if !matches!(t, "UNetMidBlock2DCrossAttn" | "UNetMidBlockCrossAttnMotion") {
                return Err(bad(format!("unsupported mid block type {t:?}")));
            }
        }
        let scalar_or_first = |k: &str| -> Option<usize> {
            match v.get(k)? {
                serde_json::Value::Number(n) => n.as_u64().map(|u| u as usize),
                serde_json::Value::Array(a) => a.first()?.as_u64().map(|u| u as usize),
                _ => None,
            }
        };
        // diffusers: `num_attention_heads` falls back to `attention_head_dim` (a historic
        // misnomer that SD1.5 configs rely on).
        let heads = scalar_or_first("num_attention_heads")
            .or_else(|| scalar_or_first("attention_head_dim"))
            .unwrap_or(8);
        let c0 = *block_out_channels
            .first()
            .ok_or_else(|| bad("`block_out_channels` is empty".into()))?;
        let cfg = Self {
            in_channels: get_usize("in_channels", Some(4))?,
            out_channels: get_usize("out_channels", Some(4))?,
            layers_per_block: get_usize("layers_per_block", Some(2))?,
            cross_attention_dim: get_usize("cross_attention_dim", Some(768))?,
            num_attention_heads: heads,
            transformer_layers_per_block: scalar_or_first("transformer_layers_per_block")
                .unwrap_or(1),
            norm_num_groups: get_usize("norm_num_groups", Some(32))?,
            norm_eps: v.get("norm_eps").and_then(|x| x.as_f64()).unwrap_or(1e-5) as f32,
            use_linear_projection: v
                .get("use_linear_projection")
                .and_then(|x| x.as_bool())
                .unwrap_or(false),
            flip_sin_to_cos: v
                .get("flip_sin_to_cos")
                .and_then(|x| x.as_bool())
                .unwrap_or(true),
            freq_shift: v.get("freq_shift").and_then(|x| x.as_f64()).unwrap_or(0.0) as f32,
            time_proj_dim: c0,
            time_embed_dim: v
                .get("time_embedding_dim")
                .and_then(|x| x.as_u64())
                .map(|u| u as usize)
                .unwrap_or(c0 * 4),
            block_out_channels,
            down_attention,
        };
        cfg.validate().map_err(bad)?;
        Ok(cfg)
    }

    /// Infer the config from diffusers-named tensor shapes (for original single files, which
    /// carry no config). Fields the weights cannot reveal (heads, eps, groups) take SD1.x values.
    pub fn infer(path: &Path, shapes: &BTreeMap<String, TensorMeta>) -> Result<Self> {
        let shape = |k: &str| shapes.get(k).map(|m| m.shape.as_slice());
        let missing = |k: &str| ExportError::MissingTensor {
            path: path.to_path_buf(),
            tensor: k.to_string(),
            expected_for: "a Stable Diffusion UNet".into(),
        };
        let conv_in = shape("conv_in.weight").ok_or_else(|| missing("conv_in.weight"))?;
        let conv_out = shape("conv_out.weight").ok_or_else(|| missing("conv_out.weight"))?;
        let lin1 = shape("time_embedding.linear_1.weight")
            .ok_or_else(|| missing("time_embedding.linear_1.weight"))?;
        let mut block_out_channels = Vec::new();
        let mut down_attention = Vec::new();
        while let Some(s) = shape(&format!(
            "down_blocks.{}.resnets.0.conv1.weight",
            block_out_channels.len()
        )) {
            let i = block_out_channels.len();
            block_out_channels.push(s[0]);
            down_attention
                .push(shapes.contains_key(&format!("down_blocks.{i}.attentions.0.proj_in.weight")));
        }
        if block_out_channels.is_empty() {
            return Err(missing("down_blocks.0.resnets.0.conv1.weight"));
        }
        let mut layers_per_block = 0;
        while shapes.contains_key(&format!(
            "down_blocks.0.resnets.{layers_per_block}.conv1.weight"
        )) {
            layers_per_block += 1;
        }
        let first_attn = down_attention.iter().position(|&a| a);
        let (cross_attention_dim, use_linear_projection, transformer_layers_per_block) =
            match first_attn {
                Some(i) => {
                    let p = format!("down_blocks.{i}.attentions.0");
                    let k = format!("{p}.transformer_blocks.0.attn2.to_k.weight");
                    let to_k = shape(&k).ok_or_else(|| missing(&k))?;
                    let proj_in = shape(&format!("{p}.proj_in.weight")).unwrap_or(&[]);
                    let mut n = 0;
                    while shapes.contains_key(&format!("{p}.transformer_blocks.{n}.norm1.weight")) {
                        n += 1;
                    }
                    (
                        to_k.get(1).copied().unwrap_or(0),
                        proj_in.len() == 2,
                        n.max(1),
                    )
                }
                None => (768, false, 1),
            };
        let cfg = Self {
            in_channels: conv_in.get(1).copied().unwrap_or(0),
            out_channels: conv_out.first().copied().unwrap_or(0),
            layers_per_block,
            cross_attention_dim,
            num_attention_heads: 8,
            transformer_layers_per_block,
            norm_num_groups: 32,
            norm_eps: 1e-5,
            use_linear_projection,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            time_proj_dim: lin1.get(1).copied().unwrap_or(0),
            time_embed_dim: lin1.first().copied().unwrap_or(0),
            block_out_channels,
            down_attention,
        };
        cfg.validate().map_err(|reason| ExportError::Config {
            path: path.to_path_buf(),
            reason,
        })?;
        Ok(cfg)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        if self.block_out_channels.is_empty() || self.layers_per_block == 0 {
            return Err("a UNet needs at least one level and one layer per block".into());
        }
        for &c in &self.block_out_channels {
            if c == 0 || c % self.norm_num_groups != 0 {
                return Err(format!(
                    "block width {c} is not a multiple of norm_num_groups {}",
                    self.norm_num_groups
                ));
            }
            if c % self.num_attention_heads != 0 {
                return Err(format!(
                    "block width {c} is not divisible by {} attention heads",
                    self.num_attention_heads
                ));
            }
        }
        if self.time_proj_dim % 2 != 0 || self.time_proj_dim == 0 {
            return Err(format!(
                "timestep embedding width {} must be even",
                self.time_proj_dim
            ));
        }
        if self.in_channels == 0 || self.out_channels == 0 || self.cross_attention_dim == 0 {
            return Err("in/out channels and cross_attention_dim must be positive".into());
        }
        Ok(())
    }

    pub fn levels(&self) -> usize {
        self.block_out_channels.len()
    }
}

/// AnimateDiff motion-module generations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum MotionVersion {
    V1,
    V2,
    V3,
}

impl std::fmt::Display for MotionVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MotionVersion::V1 => "v1",
            MotionVersion::V2 => "v2",
            MotionVersion::V3 => "v3",
        })
    }
}

/// The temporal (motion) modules that inflate the UNet.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MotionConfig {
    pub version: MotionVersion,
    /// Channels of the modules per level; must equal the UNet's `block_out_channels`.
    pub block_out_channels: Vec<usize>,
    /// Modules per down level (up levels have one more).
    pub layers_per_block: usize,
    pub transformer_layers: usize,
    pub num_attention_heads: usize,
    pub norm_num_groups: usize,
    /// Length of the sinusoidal positional table: the most frames one window may hold.
    pub max_seq_length: usize,
    pub mid_block: bool,
}

impl MotionConfig {
    /// AnimateDiff v2 for SD1.5 (`mm_sd_v15_v2.ckpt`; diffusers' `MotionAdapter` defaults):
    /// 21 modules including the mid block, positional table 32.
    pub fn sd15_v2() -> Self {
        Self {
            version: MotionVersion::V2,
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: 2,
            transformer_layers: 1,
            num_attention_heads: 8,
            norm_num_groups: 32,
            max_seq_length: 32,
            mid_block: true,
        }
    }

    /// Number of motion modules (SD1.5: 20 for v1/v3, 21 for v2).
    pub fn module_count(&self) -> usize {
        let n = self.block_out_channels.len();
        n * self.layers_per_block + n * (self.layers_per_block + 1) + usize::from(self.mid_block)
    }

    /// Infer from diffusers-named tensor shapes. `pe_len` is the positional-table length if the
    /// file carried one (or a config said so); otherwise the v2/v3 default of 32 is assumed.
    pub fn infer(
        path: &Path,
        shapes: &BTreeMap<String, TensorMeta>,
        pe_len: Option<usize>,
        heads: Option<usize>,
    ) -> Result<Self> {
        let mut block_out_channels = Vec::new();
        loop {
            let k = format!(
                "down_blocks.{}.motion_modules.0.proj_in.weight",
                block_out_channels.len()
            );
            match shapes.get(&k) {
                Some(m) if m.shape.len() == 2 => block_out_channels.push(m.shape[1]),
                Some(m) => {
                    return Err(ExportError::model(
                        path,
                        format!(
                            "tensor `{k}` has shape {:?}, expected a linear layer's [C, C] (a motion module's proj_in)",
                            m.shape
                        ),
                    ))
                }
                None => break,
            }
        }
        if block_out_channels.is_empty() {
            return Err(ExportError::MissingTensor {
                path: path.to_path_buf(),
                tensor: "down_blocks.0.motion_modules.0.proj_in.weight".into(),
                expected_for: "an AnimateDiff motion module".into(),
            });
        }
        let mut layers_per_block = 0;
        while shapes.contains_key(&format!(
            "down_blocks.0.motion_modules.{layers_per_block}.proj_in.weight"
        )) {
            layers_per_block += 1;
        }
        let mut transformer_layers = 0;
        while shapes.contains_key(&format!(
            "down_blocks.0.motion_modules.0.transformer_blocks.{transformer_layers}.norm1.weight"
        )) {
            transformer_layers += 1;
        }
        let mid_block = shapes
            .keys()
            .any(|k| k.starts_with("mid_block.motion_modules."));
        let max_seq_length = pe_len.unwrap_or(32);
        // DESIGN: mid-block present → v2; positional table of 24 → v1; otherwise v3.
        let version = if mid_block {
            MotionVersion::V2
        } else if max_seq_length == 24 {
            MotionVersion::V1
        } else {
            MotionVersion::V3
        };
        Ok(Self {
            version,
            block_out_channels,
            layers_per_block,
            transformer_layers: transformer_layers.max(1),
            num_attention_heads: heads.unwrap_or(8),
            norm_num_groups: 32,
            max_seq_length,
            mid_block,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sd15_json_matches_preset() {
        let json = r#"{"_class_name":"UNet2DConditionModel","act_fn":"silu","attention_head_dim":8,
        "block_out_channels":[320,640,1280,1280],"center_input_sample":false,"cross_attention_dim":768,
        "down_block_types":["CrossAttnDownBlock2D","CrossAttnDownBlock2D","CrossAttnDownBlock2D","DownBlock2D"],
        "downsample_padding":1,"flip_sin_to_cos":true,"freq_shift":0,"in_channels":4,"layers_per_block":2,
        "mid_block_scale_factor":1,"norm_eps":1e-05,"norm_num_groups":32,"out_channels":4,"sample_size":64,
        "up_block_types":["UpBlock2D","CrossAttnUpBlock2D","CrossAttnUpBlock2D","CrossAttnUpBlock2D"]}"#;
        let cfg = UnetConfig::from_diffusers_json(Path::new("config.json"), json).unwrap();
        assert_eq!(cfg, UnetConfig::sd15());
    }

    #[test]
    fn sdxl_like_config_is_rejected() {
        let json = r#"{"block_out_channels":[320,640,1280],"addition_embed_type":"text_time",
        "down_block_types":["DownBlock2D","CrossAttnDownBlock2D","CrossAttnDownBlock2D"],
        "up_block_types":["CrossAttnUpBlock2D","CrossAttnUpBlock2D","UpBlock2D"]}"#;
        let err = UnetConfig::from_diffusers_json(Path::new("unet/config.json"), json).unwrap_err();
        assert!(err.to_string().contains("addition_embed_type"), "{err}");
        assert!(err.to_string().contains("unet/config.json"), "{err}");
    }

    #[test]
    fn sd15_motion_counts() {
        let mut cfg = MotionConfig::sd15_v2();
        assert_eq!(cfg.module_count(), 21);
        cfg.mid_block = false;
        assert_eq!(cfg.module_count(), 20);
    }
}
