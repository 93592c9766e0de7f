//! transformers' `CLIPTextModel` as an ONNX graph.
//!
//! Contract (DESIGN.md): `input_ids` int64[N,77] → `last_hidden_state` float[N,77,D] (after the
//! final LayerNorm), causal self-attention, no padding mask (as Stable Diffusion calls it).

use super::layers;
use super::{GraphBuilder, Precision};
use crate::components::{HiddenAct, TextEncoderConfig};
use crate::onnx::attr_int;

pub const INPUT_IDS: &str = "input_ids";
pub const OUTPUT_HIDDEN: &str = "last_hidden_state";

/// Build the text encoder for sequences of exactly `cfg.max_position_embeddings` tokens.
pub fn build(cfg: &TextEncoderConfig, precision: Precision) -> GraphBuilder {
    let mut g = GraphBuilder::new(precision);
    let d = cfg.hidden_size;
    let len = cfg.max_position_embeddings;
    let heads = cfg.num_attention_heads;
    let hd = d / heads;
    let eps = cfg.layer_norm_eps;

    let tok = g.param(
        "text_model.embeddings.token_embedding.weight",
        &[cfg.vocab_size, d],
    );
    let pos = g.param("text_model.embeddings.position_embedding.weight", &[len, d]);
    let x = g.op("Gather", &[&tok, INPUT_IDS], vec![attr_int("axis", 0)]);
    let mut x = g.add(&x, &pos);

    // Causal mask: position i sees positions ≤ i.
    let mask: Vec<f32> = (0..len * len)
        .map(|k| {
            if k % len > k / len {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    let mask = g.constf(&[1, 1, len as i64, len as i64], &mask);
    let split = [0, 0, heads as i64, hd as i64];

    for i in 0..cfg.num_hidden_layers {
        let p = format!("text_model.encoder.layers.{i}");
        x = g.scoped(&p, |g| {
            let h = layers::layer_norm(g, &x, &format!("{p}.layer_norm1"), d, eps);
            let a = format!("{p}.self_attn");
            let q = layers::linear(g, &h, &format!("{a}.q_proj"), d, d, true);
            let k = layers::linear(g, &h, &format!("{a}.k_proj"), d, d, true);
            let v = layers::linear(g, &h, &format!("{a}.v_proj"), d, d, true);
            let scale = g.constf(&[], &[1.0 / (hd as f32).sqrt()]);
            let q = g.mul(&q, &scale);
            let q = g.reshape_to(&q, &split);
            let q = g.transpose(&q, &[0, 2, 1, 3]);
            let k = g.reshape_to(&k, &split);
            let k = g.transpose(&k, &[0, 2, 3, 1]);
            let v = g.reshape_to(&v, &split);
            let v = g.transpose(&v, &[0, 2, 1, 3]);
            let s = g.matmul(&q, &k);
            let s = g.add(&s, &mask);
            let pr = g.op("Softmax", &[&s], vec![attr_int("axis", -1)]);
            let o = g.matmul(&pr, &v);
            let o = g.transpose(&o, &[0, 2, 1, 3]);
            let o = g.reshape_to(&o, &[0, 0, d as i64]);
            let o = layers::linear(g, &o, &format!("{a}.out_proj"), d, d, true);
            let x = g.add(&x, &o);

            let h = layers::layer_norm(g, &x, &format!("{p}.layer_norm2"), d, eps);
            let m = format!("{p}.mlp");
            let h = layers::linear(g, &h, &format!("{m}.fc1"), d, cfg.intermediate_size, true);
            let h = match cfg.hidden_act {
                HiddenAct::QuickGelu => {
                    let k = g.constf(&[], &[1.702]);
                    let s = g.mul(&h, &k);
                    let s = g.op("Sigmoid", &[&s], vec![]);
                    g.mul(&h, &s)
                }
                HiddenAct::Gelu => {
                    let inv_sqrt2 = g.constf(&[], &[std::f32::consts::FRAC_1_SQRT_2]);
                    let one = g.constf(&[], &[1.0]);
                    let half = g.constf(&[], &[0.5]);
                    let e = g.mul(&h, &inv_sqrt2);
                    let e = g.op("Erf", &[&e], vec![]);
                    let e = g.add(&e, &one);
                    let e = g.mul(&e, &half);
                    g.mul(&h, &e)
                }
            };
            let h = layers::linear(g, &h, &format!("{m}.fc2"), cfg.intermediate_size, d, true);
            g.add(&x, &h)
        });
    }
    let x = layers::layer_norm(&mut g, &x, "text_model.final_layer_norm", d, eps);
    let out = g.to_f32(&x);
    g.name_output(&out, OUTPUT_HIDDEN);
    g
}
