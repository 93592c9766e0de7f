//! The AnimateDiff UNet (SD1.x UNet inflated with motion modules) as one ONNX graph.
//!
//! Contract (DESIGN.md): inputs `sample` float[B,C,F,h,w], `timestep` float[B],
//! `encoder_hidden_states` float[B·F,77,D] (one row per frame); output `noise_pred`
//! float[B,C,F,h,w]; B, F, h, w dynamic.

use super::layers::{self, Frames, NormSpan};
use super::{GraphBuilder, Lowering, Precision};
use crate::config::{MotionConfig, MotionVersion, UnetConfig};
use crate::onnx::attr_string;

/// Which implementation's normalisation the graph reproduces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Semantics {
    /// The original AnimateDiff: motion-module GroupNorm per frame; v1 also normalises the
    /// UNet's ResNet blocks (and `conv_norm_out`) across frames, as it ran with
    /// `use_inflated_groupnorm=False`.
    Official,
    /// diffusers' `UNetMotionModel`: motion-module GroupNorm across frames, everything else per
    /// frame.
    Diffusers,
}

impl std::fmt::Display for Semantics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Semantics::Official => "official",
            Semantics::Diffusers => "diffusers",
        })
    }
}

impl std::str::FromStr for Semantics {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "official" => Ok(Semantics::Official),
            "diffusers" => Ok(Semantics::Diffusers),
            other => Err(format!(
                "unknown semantics `{other}` (expected official or diffusers)"
            )),
        }
    }
}

/// Names of the graph's inputs and outputs.
pub const INPUT_SAMPLE: &str = "sample";
pub const INPUT_TIMESTEP: &str = "timestep";
pub const INPUT_CONTEXT: &str = "encoder_hidden_states";
pub const OUTPUT_NOISE: &str = "noise_pred";
/// Text tokens per frame (CLIP's context length).
pub const TEXT_TOKENS: usize = 77;

/// Where normalisation statistics are taken, derived from the semantics and version.
#[derive(Debug, Clone, Copy)]
struct Spans {
    resnet: NormSpan,
    motion: NormSpan,
}

fn spans(semantics: Semantics, motion: Option<&MotionConfig>) -> Spans {
    match semantics {
        Semantics::Diffusers => Spans {
            resnet: NormSpan::PerFrame,
            motion: NormSpan::CrossFrame,
        },
        Semantics::Official => Spans {
            resnet: if motion.is_some_and(|m| m.version == MotionVersion::V1) {
                NormSpan::CrossFrame
            } else {
                NormSpan::PerFrame
            },
            motion: NormSpan::PerFrame,
        },
    }
}

/// Build the UNet graph. Returns the builder holding nodes, constants and the parameter list.
/// `fused_attention`: the motion modules' attention as `com.motionrt.TemporalAttention` nodes.
pub fn build(
    cfg: &UnetConfig,
    motion: Option<&MotionConfig>,
    semantics: Semantics,
    precision: Precision,
    fused_attention: bool,
) -> GraphBuilder {
    let lowering = Lowering {
        fused_attention,
        winograd: false,
    };
    build_with(cfg, motion, semantics, precision, lowering, false)
}

/// [`build`], or with `tune_a_video` Tune-A-Video's UNet (`UNet3DConditionModel`): no motion
/// modules; spatial transformer blocks with sparse-causal `attn1` and `attn_temp`/`norm_temp`;
/// GroupNorm across frames in the ResNets and `conv_norm_out` (it normalises 5-D tensors).
pub fn build_with(
    cfg: &UnetConfig,
    motion: Option<&MotionConfig>,
    semantics: Semantics,
    precision: Precision,
    lowering: Lowering,
    tune_a_video: bool,
) -> GraphBuilder {
    let mut g = GraphBuilder::with_lowering(precision, lowering);
    let mut spans = spans(semantics, motion);
    if tune_a_video {
        spans.resnet = NormSpan::CrossFrame;
    }
    let groups = cfg.norm_num_groups;
    let eps = cfg.norm_eps;
    let temb_dim = cfg.time_embed_dim;

    // Dynamic dims.
    let sshape = g.shape(INPUT_SAMPLE);
    let batch = g.dim(&sshape, 0);
    let nframes = g.dim(&sshape, 2);
    let h = g.dim(&sshape, 3);
    let w = g.dim(&sshape, 4);
    let frames = Frames {
        batch: batch.clone(),
        frames: nframes.clone(),
    };

    // [B, C, F, h, w] → [B·F, C, h, w]
    let x = g.transpose(INPUT_SAMPLE, &[0, 2, 1, 3, 4]);
    let m1 = g.i64s(&[-1]);
    let cin = g.i64s(&[cfg.in_channels as i64]);
    let s = g.concat(&[&m1, &cin, &h, &w], 0);
    let x = g.reshape(&x, &s);
    let x = g.to_compute(&x);
    let context = g.to_compute(INPUT_CONTEXT);

    // Timestep embedding: sinusoidal in float32, then the MLP; repeated per frame.
    let temb = g.scoped("time_embedding", |g| {
        let half = cfg.time_proj_dim / 2;
        let ln = (10000f32).ln();
        let freqs: Vec<f32> = (0..half)
            .map(|i| (-ln * i as f32 / (half as f32 - cfg.freq_shift)).exp())
            .collect();
        let f = g.const_f32(&[1, half as i64], &freqs);
        let t = g.unsqueeze(INPUT_TIMESTEP, &[1]);
        let a = g.mul(&t, &f);
        let sin = g.op("Sin", &[&a], vec![]);
        let cos = g.op("Cos", &[&a], vec![]);
        let e = if cfg.flip_sin_to_cos {
            g.concat(&[&cos, &sin], 1)
        } else {
            g.concat(&[&sin, &cos], 1)
        };
        let e = g.to_compute(&e);
        let e = layers::linear(
            g,
            &e,
            "time_embedding.linear_1",
            cfg.time_proj_dim,
            temb_dim,
            true,
        );
        let e = g.silu(&e);
        let e = layers::linear(g, &e, "time_embedding.linear_2", temb_dim, temb_dim, true);
        // repeat_interleave over frames: [B, E] → [B, F, E] → [B·F, E]
        let e = g.unsqueeze(&e, &[1]);
        let ed = g.i64s(&[temb_dim as i64]);
        let s = g.concat(&[&batch, &nframes, &ed], 0);
        let e = g.op("Expand", &[&e, &s], vec![]);
        g.reshape_to(&e, &[-1, temb_dim as i64])
    });
    // Every ResNet applies SiLU to the embedding before its projection; do it once.
    let temb_act = g.silu(&temb);

    // One positional table per motion-module width.
    let mut pos_tables: Vec<(usize, String)> = Vec::new();
    let mut pos_for = |g: &mut GraphBuilder, c: usize, len: usize| -> String {
        if let Some((_, n)) = pos_tables.iter().find(|(cc, _)| *cc == c) {
            return n.clone();
        }
        let n = g.constf(
            &[1, len as i64, c as i64],
            &layers::positional_table(len, c),
        );
        pos_tables.push((c, n.clone()));
        n
    };
    let mut mm = |g: &mut GraphBuilder, x: &str, prefix: &str, c: usize| -> String {
        match motion {
            Some(m) => {
                let pos = pos_for(g, c, m.max_seq_length);
                layers::motion_module(
                    g,
                    x,
                    prefix,
                    c,
                    m.num_attention_heads,
                    m.transformer_layers,
                    m.norm_num_groups,
                    &pos,
                    spans.motion,
                    &frames,
                )
            }
            None => x.to_string(),
        }
    };

    let transformer = |g: &mut GraphBuilder, x: &str, prefix: &str, c: usize| {
        layers::spatial_transformer(
            g,
            x,
            &context,
            prefix,
            c,
            cfg.cross_attention_dim,
            cfg.num_attention_heads,
            cfg.transformer_layers_per_block,
            groups,
            cfg.use_linear_projection,
            &frames,
            tune_a_video,
        )
    };
    let res = |g: &mut GraphBuilder, x: &str, prefix: &str, cin: usize, cout: usize| {
        layers::resnet(
            g,
            x,
            &temb_act,
            prefix,
            cin,
            cout,
            temb_dim,
            groups,
            eps,
            spans.resnet,
            &frames,
        )
    };

    let c0 = cfg.block_out_channels[0];
    let mut x = layers::conv2d(&mut g, &x, "conv_in", cfg.in_channels, c0, 3, 1, 1);
    let mut skips: Vec<(String, usize)> = vec![(x.clone(), c0)];
    let mut ch = c0;
    let levels = cfg.levels();

    for (i, (&cout, &attn)) in cfg
        .block_out_channels
        .iter()
        .zip(&cfg.down_attention)
        .enumerate()
    {
        let p = format!("down_blocks.{i}");
        for j in 0..cfg.layers_per_block {
            x = res(&mut g, &x, &format!("{p}.resnets.{j}"), ch, cout);
            ch = cout;
            if attn {
                x = transformer(&mut g, &x, &format!("{p}.attentions.{j}"), ch);
            }
            x = mm(&mut g, &x, &format!("{p}.motion_modules.{j}"), ch);
            skips.push((x.clone(), ch));
        }
        if i + 1 < levels {
            x = layers::conv2d(
                &mut g,
                &x,
                &format!("{p}.downsamplers.0.conv"),
                ch,
                ch,
                3,
                2,
                1,
            );
            skips.push((x.clone(), ch));
        }
    }

    // Mid block: resnet → attention → (v2) motion module → resnet.
    x = res(&mut g, &x, "mid_block.resnets.0", ch, ch);
    x = transformer(&mut g, &x, "mid_block.attentions.0", ch);
    if motion.is_some_and(|m| m.mid_block) {
        x = mm(&mut g, &x, "mid_block.motion_modules.0", ch);
    }
    x = res(&mut g, &x, "mid_block.resnets.1", ch, ch);

    for i in 0..levels {
        let p = format!("up_blocks.{i}");
        let cout = cfg.block_out_channels[levels - 1 - i];
        let attn = cfg.down_attention[levels - 1 - i];
        for j in 0..=cfg.layers_per_block {
            let Some((skip, skip_ch)) = skips.pop() else {
                unreachable!(
                    "the down path pushes layers_per_block + 1 skips per level plus conv_in"
                );
            };
            x = g.concat(&[&x, &skip], 1);
            x = res(&mut g, &x, &format!("{p}.resnets.{j}"), ch + skip_ch, cout);
            ch = cout;
            if attn {
                x = transformer(&mut g, &x, &format!("{p}.attentions.{j}"), ch);
            }
            x = mm(&mut g, &x, &format!("{p}.motion_modules.{j}"), ch);
        }
        if i + 1 < levels {
            // Nearest upsampling to the size of the next skip (diffusers passes that size when
            // the latent is not a multiple of the total stride; otherwise it is exactly 2×).
            let (next_skip, _) = skips
                .last()
                .expect("skips remain for every upsampled level");
            let next_skip = next_skip.clone();
            x = g.scoped(&format!("{p}.upsamplers.0"), |g| {
                let ss = g.shape(&next_skip);
                let hw = {
                    let two = g.i64s(&[2]);
                    let four = g.i64s(&[4]);
                    g.op("Slice", &[&ss, &two, &four], vec![])
                };
                let xs = g.shape(&x);
                let nc = {
                    let zero = g.i64s(&[0]);
                    let two = g.i64s(&[2]);
                    g.op("Slice", &[&xs, &zero, &two], vec![])
                };
                let sizes = g.concat(&[&nc, &hw], 0);
                let up = g.op(
                    "Resize",
                    &[&x, "", "", &sizes],
                    vec![
                        attr_string("mode", "nearest"),
                        attr_string("coordinate_transformation_mode", "asymmetric"),
                        attr_string("nearest_mode", "floor"),
                    ],
                );
                layers::conv2d(g, &up, &format!("{p}.upsamplers.0.conv"), ch, ch, 3, 1, 1)
            });
        }
    }

    let x = layers::group_norm(
        &mut g,
        &x,
        "conv_norm_out",
        ch,
        groups,
        eps,
        spans.resnet,
        &frames,
    );
    let x = g.silu(&x);
    let x = layers::conv2d(&mut g, &x, "conv_out", ch, cfg.out_channels, 3, 1, 1);
    let x = g.to_f32(&x);
    // [B·F, C, h, w] → [B, C, F, h, w]
    let cout = g.i64s(&[cfg.out_channels as i64]);
    let s = g.concat(&[&batch, &nframes, &cout, &h, &w], 0);
    let x = g.reshape(&x, &s);
    g.transpose(&x, &[0, 2, 1, 3, 4]);
    // The last node produces the graph output: give it the contract name.
    if let Some(last) = g.nodes.last_mut() {
        last.output = vec![OUTPUT_NOISE.to_string()];
    }
    g
}
