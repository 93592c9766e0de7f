//! diffusers' `AutoencoderKL` as two ONNX graphs.
//!
//! Contract (DESIGN.md): `vae_decoder.onnx` maps `latent` float[N,C_lat,h,w] (already divided by
//! the scaling factor) to `image` float[N,3,8h,8w] in [-1, 1] (not clamped); `vae_encoder.onnx`
//! maps `image` float[N,3,H,W] in [-1, 1] to `latent_mean` float[N,C_lat,H/8,W/8] (the posterior
//! mean, not yet multiplied by the scaling factor). N, h, w dynamic.

use super::layers::{self, Frames, NormSpan};
use super::{GraphBuilder, Lowering, Precision};
use crate::components::VaeConfig;
use crate::onnx::{attr_int, attr_ints, attr_string};

pub const DECODER_INPUT: &str = "latent";
pub const DECODER_OUTPUT: &str = "image";
pub const ENCODER_INPUT: &str = "image";
pub const ENCODER_OUTPUT: &str = "latent_mean";

const EPS: f32 = 1e-6;

/// A GroupNorm of a 4-D activation per sample (the VAE has no frame axis).
fn norm(g: &mut GraphBuilder, x: &str, prefix: &str, c: usize, groups: usize) -> String {
    // PerFrame never reads the frame tensors.
    let no_frames = Frames {
        batch: String::new(),
        frames: String::new(),
    };
    layers::group_norm(g, x, prefix, c, groups, EPS, NormSpan::PerFrame, &no_frames)
}

/// `ResnetBlock2D` without a time embedding.
fn resnet(
    g: &mut GraphBuilder,
    x: &str,
    prefix: &str,
    cin: usize,
    cout: usize,
    groups: usize,
) -> String {
    g.scoped(prefix, |g| {
        let h = norm(g, x, &format!("{prefix}.norm1"), cin, groups);
        let h = g.silu(&h);
        let h = layers::conv2d(g, &h, &format!("{prefix}.conv1"), cin, cout, 3, 1, 1);
        let h = norm(g, &h, &format!("{prefix}.norm2"), cout, groups);
        let h = g.silu(&h);
        let h = layers::conv2d(g, &h, &format!("{prefix}.conv2"), cout, cout, 3, 1, 1);
        let shortcut = if cin != cout {
            layers::conv2d(g, x, &format!("{prefix}.conv_shortcut"), cin, cout, 1, 1, 0)
        } else {
            x.to_string()
        };
        g.add(&h, &shortcut)
    })
}

/// The mid-block attention: GroupNorm, one head over all H·W positions, q/k/v/out with bias,
/// residual.
fn attention(g: &mut GraphBuilder, x: &str, prefix: &str, c: usize, groups: usize) -> String {
    g.scoped(prefix, |g| {
        let shape = g.shape(x);
        let h = norm(g, x, &format!("{prefix}.group_norm"), c, groups);
        let h = g.reshape_to(&h, &[0, c as i64, -1]);
        let h = g.transpose(&h, &[0, 2, 1]); // [N, HW, C]
        let q = layers::linear(g, &h, &format!("{prefix}.to_q"), c, c, true);
        let k = layers::linear(g, &h, &format!("{prefix}.to_k"), c, c, true);
        let v = layers::linear(g, &h, &format!("{prefix}.to_v"), c, c, true);
        let scale = g.constf(&[], &[1.0 / (c as f32).sqrt()]);
        let q = g.mul(&q, &scale);
        let kt = g.transpose(&k, &[0, 2, 1]);
        let s = g.matmul(&q, &kt);
        let p = g.op("Softmax", &[&s], vec![attr_int("axis", -1)]);
        let o = g.matmul(&p, &v);
        let o = layers::linear(g, &o, &format!("{prefix}.to_out.0"), c, c, true);
        let o = g.transpose(&o, &[0, 2, 1]);
        let o = g.reshape(&o, &shape);
        g.add(&o, x)
    })
}

fn mid_block(g: &mut GraphBuilder, x: &str, prefix: &str, c: usize, groups: usize) -> String {
    let h = resnet(g, x, &format!("{prefix}.resnets.0"), c, c, groups);
    let h = attention(g, &h, &format!("{prefix}.attentions.0"), c, groups);
    resnet(g, &h, &format!("{prefix}.resnets.1"), c, c, groups)
}

/// Build `vae_encoder.onnx`'s graph; the input is named [`ENCODER_INPUT`] and the output is the
/// node output returned.
pub fn build_encoder(cfg: &VaeConfig, precision: Precision, lowering: Lowering) -> GraphBuilder {
    let mut g = GraphBuilder::with_lowering(precision, lowering);
    let groups = cfg.norm_num_groups;
    let x = g.to_compute(ENCODER_INPUT);
    let ch = &cfg.block_out_channels;
    let mut h = layers::conv2d(
        &mut g,
        &x,
        "encoder.conv_in",
        cfg.in_channels,
        ch[0],
        3,
        1,
        1,
    );
    let mut cin = ch[0];
    for (i, &cout) in ch.iter().enumerate() {
        for j in 0..cfg.layers_per_block {
            h = resnet(
                &mut g,
                &h,
                &format!("encoder.down_blocks.{i}.resnets.{j}"),
                cin,
                cout,
                groups,
            );
            cin = cout;
        }
        if i + 1 < ch.len() {
            // Downsample2D(padding=0): pad right/bottom by one, 3×3 stride-2 conv.
            let p = format!("encoder.down_blocks.{i}.downsamplers.0.conv");
            let w = g.param(&format!("{p}.weight"), &[cout, cout, 3, 3]);
            let b = g.param(&format!("{p}.bias"), &[cout]);
            h = g.op(
                "Conv",
                &[&h, &w, &b],
                vec![
                    attr_ints("kernel_shape", &[3, 3]),
                    attr_ints("strides", &[2, 2]),
                    attr_ints("pads", &[0, 0, 1, 1]),
                ],
            );
        }
    }
    let c = *ch.last().unwrap_or(&ch[0]);
    h = mid_block(&mut g, &h, "encoder.mid_block", c, groups);
    h = norm(&mut g, &h, "encoder.conv_norm_out", c, groups);
    h = g.silu(&h);
    let moments = 2 * cfg.latent_channels;
    h = layers::conv2d(&mut g, &h, "encoder.conv_out", c, moments, 3, 1, 1);
    h = layers::conv2d(&mut g, &h, "quant_conv", moments, moments, 1, 1, 0);
    // The posterior's mean is the first half of the moments.
    let l = cfg.latent_channels as i64;
    let starts = g.i64s(&[0]);
    let ends = g.i64s(&[l]);
    let axes = g.i64s(&[1]);
    let mean = g.op("Slice", &[&h, &starts, &ends, &axes], vec![]);
    let out = g.to_f32(&mean);
    g.name_output(&out, ENCODER_OUTPUT);
    g
}

/// Build `vae_decoder.onnx`'s graph; the input is named [`DECODER_INPUT`].
pub fn build_decoder(cfg: &VaeConfig, precision: Precision, lowering: Lowering) -> GraphBuilder {
    let mut g = GraphBuilder::with_lowering(precision, lowering);
    let groups = cfg.norm_num_groups;
    let l = cfg.latent_channels;
    let z = g.to_compute(DECODER_INPUT);
    let z = layers::conv2d(&mut g, &z, "post_quant_conv", l, l, 1, 1, 0);
    let rev: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
    let mut h = layers::conv2d(&mut g, &z, "decoder.conv_in", l, rev[0], 3, 1, 1);
    h = mid_block(&mut g, &h, "decoder.mid_block", rev[0], groups);
    let mut cin = rev[0];
    for (i, &cout) in rev.iter().enumerate() {
        for j in 0..=cfg.layers_per_block {
            h = resnet(
                &mut g,
                &h,
                &format!("decoder.up_blocks.{i}.resnets.{j}"),
                cin,
                cout,
                groups,
            );
            cin = cout;
        }
        if i + 1 < rev.len() {
            let scales = g.const_f32(&[4], &[1.0, 1.0, 2.0, 2.0]);
            let up = g.op(
                "Resize",
                &[&h, "", &scales],
                vec![
                    attr_string("mode", "nearest"),
                    attr_string("coordinate_transformation_mode", "asymmetric"),
                    attr_string("nearest_mode", "floor"),
                ],
            );
            h = layers::conv2d(
                &mut g,
                &up,
                &format!("decoder.up_blocks.{i}.upsamplers.0.conv"),
                cout,
                cout,
                3,
                1,
                1,
            );
        }
    }
    h = norm(&mut g, &h, "decoder.conv_norm_out", cin, groups);
    h = g.silu(&h);
    h = layers::conv2d(
        &mut g,
        &h,
        "decoder.conv_out",
        cin,
        cfg.out_channels,
        3,
        1,
        1,
    );
    let out = g.to_f32(&h);
    g.name_output(&out, DECODER_OUTPUT);
    g
}
