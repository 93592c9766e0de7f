//! Checkpoint key remapping: every layout we read is mapped onto the diffusers tensor names, which
//! are the graph's initializer names. One table of rules per layout, each rule a pure function of
//! the key, so the whole mapping is testable without weights.
//!
//! Layouts:
//! - [`Layout::Diffusers`]: diffusers `UNet2DConditionModel` / `UNetMotionModel` / `MotionAdapter`
//!   names; identity.
//! - [`Layout::Ldm`]: the original CompVis/LDM single-file checkpoint (`model.diffusion_model.*`),
//!   as in `v1-5-pruned-emaonly.ckpt`. The VAE (`first_stage_model.*`) and text encoder
//!   (`cond_stage_model.*`) keys map to nothing here.
//! - [`Layout::AnimateDiff`]: the original AnimateDiff motion-module files (`mm_sd_v15.ckpt`,
//!   `mm_sd_v15_v2.ckpt`, `v3_sd15_mm.ckpt`): `temporal_transformer.` dropped,
//!   `attention_blocks.{0,1}` → `attn{1,2}`, `norms.{0,1}` → `norm{1,2}`, `ff_norm` → `norm3`,
//!   `attention_blocks.N.pos_encoder.pe` → `pos_embed.pe`.

/// The key layout of a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    Diffusers,
    Ldm,
    AnimateDiff,
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Layout::Diffusers => "diffusers",
            Layout::Ldm => "ldm (original single file)",
            Layout::AnimateDiff => "animatediff (original motion module)",
        })
    }
}

/// Prefix of the UNet in original single-file checkpoints.
pub const LDM_UNET_PREFIX: &str = "model.diffusion_model.";

/// Guess the layout of a set of keys. `None` when nothing recognisable is present.
pub fn detect_layout<'a>(keys: impl IntoIterator<Item = &'a str>) -> Option<Layout> {
    let (mut ldm, mut ad, mut diff) = (0usize, 0usize, 0usize);
    for k in keys {
        if k.starts_with(LDM_UNET_PREFIX) {
            ldm += 1;
        } else if k.contains(".temporal_transformer.") {
            ad += 1;
        } else if k.starts_with("down_blocks.")
            || k.starts_with("up_blocks.")
            || k.starts_with("mid_block.")
            || k.starts_with("conv_in.")
        {
            diff += 1;
        }
    }
    if ldm > 0 {
        Some(Layout::Ldm)
    } else if ad > 0 {
        Some(Layout::AnimateDiff)
    } else if diff > 0 {
        Some(Layout::Diffusers)
    } else {
        None
    }
}

/// Map one key of `layout` to its diffusers name. `None`: the key is not part of a UNet or motion
/// module (VAE, text encoder, EMA copies, optimizer state) and is ignored.
///
/// `layers_per_block` is needed for the LDM layout, whose block indices are flat.
pub fn to_diffusers(layout: Layout, key: &str, layers_per_block: usize) -> Option<String> {
    match layout {
        Layout::Diffusers => Some(key.to_string()),
        Layout::Ldm => ldm_to_diffusers(key, layers_per_block),
        Layout::AnimateDiff => animatediff_to_diffusers(key),
    }
}

fn animatediff_to_diffusers(key: &str) -> Option<String> {
    // Some exports prefix the module name.
    let key = key.strip_prefix("module.").unwrap_or(key);
    if !key.contains(".motion_modules.") {
        return None;
    }
    let key = key.replace(".temporal_transformer.", ".");
    let mut out: Vec<String> = Vec::new();
    let parts: Vec<&str> = key.split('.').collect();
    let mut i = 0;
    while i < parts.len() {
        match parts[i] {
            "attention_blocks" if i + 1 < parts.len() => {
                let n: usize = parts[i + 1].parse().ok()?;
                if parts.get(i + 2) == Some(&"pos_encoder") {
                    // One table per attention in the original; diffusers keeps one per block.
                    out.push("pos_embed".into());
                    i += 3;
                    continue;
                }
                out.push(format!("attn{}", n + 1));
                i += 2;
            }
            "norms" if i + 1 < parts.len() => {
                let n: usize = parts[i + 1].parse().ok()?;
                out.push(format!("norm{}", n + 1));
                i += 2;
            }
            "ff_norm" => {
                out.push("norm3".into());
                i += 1;
            }
            p => {
                out.push(p.to_string());
                i += 1;
            }
        }
    }
    Some(out.join("."))
}

/// The original AnimateDiff key of a diffusers motion-module name (the inverse of the
/// AnimateDiff rules; `pos_embed.pe` maps to the first attention's `pos_encoder.pe`).
pub fn diffusers_to_animatediff(name: &str) -> Option<String> {
    let (head, rest) = name.split_once(".motion_modules.")?;
    let (idx, rest) = rest.split_once('.')?;
    let mut out = Vec::new();
    for part in rest.split('.') {
        match part {
            "attn1" => out.push("attention_blocks.0".to_string()),
            "attn2" => out.push("attention_blocks.1".to_string()),
            "norm1"
                if out
                    .last()
                    .is_some_and(|p: &String| p.chars().all(|c| c.is_ascii_digit())) =>
            {
                out.push("norms.0".into())
            }
            "norm2"
                if out
                    .last()
                    .is_some_and(|p: &String| p.chars().all(|c| c.is_ascii_digit())) =>
            {
                out.push("norms.1".into())
            }
            "norm3" => out.push("ff_norm".into()),
            "pos_embed" => out.push("attention_blocks.0.pos_encoder".into()),
            p => out.push(p.to_string()),
        }
    }
    Some(format!(
        "{head}.motion_modules.{idx}.temporal_transformer.{}",
        out.join(".")
    ))
}

/// Renames inside an LDM ResBlock.
const LDM_RESNET: &[(&str, &str)] = &[
    ("in_layers.0.", "norm1."),
    ("in_layers.2.", "conv1."),
    ("emb_layers.1.", "time_emb_proj."),
    ("out_layers.0.", "norm2."),
    ("out_layers.3.", "conv2."),
    ("skip_connection.", "conv_shortcut."),
];

/// Top-level renames.
const LDM_TOP: &[(&str, &str)] = &[
    ("time_embed.0.", "time_embedding.linear_1."),
    ("time_embed.2.", "time_embedding.linear_2."),
    ("input_blocks.0.0.", "conv_in."),
    ("out.0.", "conv_norm_out."),
    ("out.2.", "conv_out."),
];

fn rename_resnet(rest: &str) -> Option<String> {
    LDM_RESNET
        .iter()
        .find_map(|(from, to)| rest.strip_prefix(from).map(|r| format!("{to}{r}")))
}

fn is_resnet(rest: &str) -> bool {
    LDM_RESNET.iter().any(|(from, _)| rest.starts_with(from))
}

fn ldm_to_diffusers(key: &str, layers_per_block: usize) -> Option<String> {
    let k = key.strip_prefix(LDM_UNET_PREFIX)?;
    for (from, to) in LDM_TOP {
        if let Some(r) = k.strip_prefix(from) {
            return Some(format!("{to}{r}"));
        }
    }
    let l = layers_per_block;
    let split3 = |s: &str| -> Option<(usize, usize, String)> {
        let mut it = s.splitn(3, '.');
        let a = it.next()?.parse().ok()?;
        let b = it.next()?.parse().ok()?;
        Some((a, b, it.next()?.to_string()))
    };
    if let Some(r) = k.strip_prefix("input_blocks.") {
        let (n, sub, rest) = split3(r)?;
        if n == 0 {
            return None;
        }
        let (block, j) = ((n - 1) / (l + 1), (n - 1) % (l + 1));
        if j == l {
            // The last entry of a level is its downsampler.
            let r = rest.strip_prefix("op.")?;
            return Some(format!("down_blocks.{block}.downsamplers.0.conv.{r}"));
        }
        return match sub {
            0 => Some(format!(
                "down_blocks.{block}.resnets.{j}.{}",
                rename_resnet(&rest)?
            )),
            1 => Some(format!("down_blocks.{block}.attentions.{j}.{rest}")),
            _ => None,
        };
    }
    if let Some(r) = k.strip_prefix("middle_block.") {
        let (sub, rest) = r.split_once('.')?;
        return match sub {
            "0" => Some(format!("mid_block.resnets.0.{}", rename_resnet(rest)?)),
            "1" => Some(format!("mid_block.attentions.0.{rest}")),
            "2" => Some(format!("mid_block.resnets.1.{}", rename_resnet(rest)?)),
            _ => None,
        };
    }
    if let Some(r) = k.strip_prefix("output_blocks.") {
        let (n, sub, rest) = split3(r)?;
        let (block, j) = (n / (l + 1), n % (l + 1));
        if sub == 0 && is_resnet(&rest) {
            return Some(format!(
                "up_blocks.{block}.resnets.{j}.{}",
                rename_resnet(&rest)?
            ));
        }
        // Sub-modules 1 and 2 are the attention and/or the upsampler (`conv.*`).
        if let Some(r) = rest.strip_prefix("conv.") {
            return Some(format!("up_blocks.{block}.upsamplers.0.conv.{r}"));
        }
        if sub >= 1 {
            return Some(format!("up_blocks.{block}.attentions.{j}.{rest}"));
        }
        return None;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldm_sd15_names() {
        let cases = [
            ("time_embed.0.weight", "time_embedding.linear_1.weight"),
            ("time_embed.2.bias", "time_embedding.linear_2.bias"),
            ("input_blocks.0.0.weight", "conv_in.weight"),
            (
                "input_blocks.1.0.in_layers.0.weight",
                "down_blocks.0.resnets.0.norm1.weight",
            ),
            (
                "input_blocks.2.0.emb_layers.1.bias",
                "down_blocks.0.resnets.1.time_emb_proj.bias",
            ),
            (
                "input_blocks.2.1.proj_in.weight",
                "down_blocks.0.attentions.1.proj_in.weight",
            ),
            (
                "input_blocks.3.0.op.weight",
                "down_blocks.0.downsamplers.0.conv.weight",
            ),
            (
                "input_blocks.4.0.skip_connection.weight",
                "down_blocks.1.resnets.0.conv_shortcut.weight",
            ),
            (
                "input_blocks.7.1.transformer_blocks.0.attn2.to_k.weight",
                "down_blocks.2.attentions.0.transformer_blocks.0.attn2.to_k.weight",
            ),
            (
                "input_blocks.11.0.out_layers.3.weight",
                "down_blocks.3.resnets.1.conv2.weight",
            ),
            (
                "middle_block.0.in_layers.2.weight",
                "mid_block.resnets.0.conv1.weight",
            ),
            (
                "middle_block.1.norm.bias",
                "mid_block.attentions.0.norm.bias",
            ),
            (
                "middle_block.2.out_layers.0.bias",
                "mid_block.resnets.1.norm2.bias",
            ),
            (
                "output_blocks.0.0.in_layers.0.weight",
                "up_blocks.0.resnets.0.norm1.weight",
            ),
            (
                "output_blocks.2.1.conv.weight",
                "up_blocks.0.upsamplers.0.conv.weight",
            ),
            (
                "output_blocks.3.1.proj_out.bias",
                "up_blocks.1.attentions.0.proj_out.bias",
            ),
            (
                "output_blocks.5.2.conv.bias",
                "up_blocks.1.upsamplers.0.conv.bias",
            ),
            (
                "output_blocks.11.1.norm.weight",
                "up_blocks.3.attentions.2.norm.weight",
            ),
            ("out.0.weight", "conv_norm_out.weight"),
            ("out.2.bias", "conv_out.bias"),
        ];
        for (ldm, want) in cases {
            let got = to_diffusers(Layout::Ldm, &format!("{LDM_UNET_PREFIX}{ldm}"), 2);
            assert_eq!(got.as_deref(), Some(want), "{ldm}");
        }
        assert_eq!(
            to_diffusers(Layout::Ldm, "first_stage_model.encoder.conv_in.weight", 2),
            None
        );
        assert_eq!(
            to_diffusers(Layout::Ldm, "cond_stage_model.transformer.x", 2),
            None
        );
    }

    #[test]
    fn animatediff_names() {
        let cases = [
            (
                "down_blocks.0.motion_modules.0.temporal_transformer.norm.weight",
                "down_blocks.0.motion_modules.0.norm.weight",
            ),
            (
                "up_blocks.3.motion_modules.2.temporal_transformer.transformer_blocks.0.attention_blocks.1.to_out.0.bias",
                "up_blocks.3.motion_modules.2.transformer_blocks.0.attn2.to_out.0.bias",
            ),
            (
                "mid_block.motion_modules.0.temporal_transformer.transformer_blocks.0.norms.0.weight",
                "mid_block.motion_modules.0.transformer_blocks.0.norm1.weight",
            ),
            (
                "down_blocks.1.motion_modules.1.temporal_transformer.transformer_blocks.0.ff_norm.bias",
                "down_blocks.1.motion_modules.1.transformer_blocks.0.norm3.bias",
            ),
            (
                "down_blocks.1.motion_modules.1.temporal_transformer.transformer_blocks.0.attention_blocks.0.pos_encoder.pe",
                "down_blocks.1.motion_modules.1.transformer_blocks.0.pos_embed.pe",
            ),
            (
                "down_blocks.2.motion_modules.0.temporal_transformer.transformer_blocks.0.ff.net.0.proj.weight",
                "down_blocks.2.motion_modules.0.transformer_blocks.0.ff.net.0.proj.weight",
            ),
        ];
        for (src, want) in cases {
            assert_eq!(
                to_diffusers(Layout::AnimateDiff, src, 2).as_deref(),
                Some(want),
                "{src}"
            );
        }
    }

    #[test]
    fn animatediff_inverse_round_trips() {
        for name in [
            "down_blocks.0.motion_modules.1.norm.weight",
            "down_blocks.0.motion_modules.1.proj_in.bias",
            "up_blocks.2.motion_modules.0.transformer_blocks.0.attn2.to_q.weight",
            "up_blocks.2.motion_modules.0.transformer_blocks.0.norm1.weight",
            "up_blocks.2.motion_modules.0.transformer_blocks.0.norm2.bias",
            "mid_block.motion_modules.0.transformer_blocks.0.norm3.weight",
            "mid_block.motion_modules.0.transformer_blocks.0.ff.net.2.weight",
            "mid_block.motion_modules.0.transformer_blocks.0.pos_embed.pe",
        ] {
            let orig = diffusers_to_animatediff(name).unwrap();
            assert!(orig.contains(".temporal_transformer."), "{orig}");
            assert_eq!(
                to_diffusers(Layout::AnimateDiff, &orig, 2).as_deref(),
                Some(name),
                "{orig}"
            );
        }
    }

    #[test]
    fn layout_detection() {
        assert_eq!(
            detect_layout(["model.diffusion_model.out.0.weight"]),
            Some(Layout::Ldm)
        );
        assert_eq!(
            detect_layout(["down_blocks.0.motion_modules.0.temporal_transformer.norm.weight"]),
            Some(Layout::AnimateDiff)
        );
        assert_eq!(detect_layout(["conv_in.weight"]), Some(Layout::Diffusers));
        assert_eq!(detect_layout(["foo"]), None);
    }
}
