//! The building blocks of the SD UNet and AnimateDiff motion modules, as standard ONNX ops.
//! Each function takes the diffusers module path as `prefix` and requests its weights under
//! `{prefix}.{tensor}`.
//!
//! Activations of the 2-D parts are `[B·F, C, H, W]` (frames folded into the batch, as diffusers
//! does); `Frames` carries the 1-D int64 tensors `B` and `F` needed to unfold them.

use super::{GraphBuilder, Transform};
use crate::onnx::{attr_float, attr_int, attr_ints};

/// The runtime batch and frame counts, as 1-element int64 tensors.
#[derive(Debug, Clone)]
pub struct Frames {
    pub batch: String,
    pub frames: String,
}

/// Over which axes a GroupNorm of a `[B·F, C, H, W]` activation computes its statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormSpan {
    /// Each frame on its own (a 2-D GroupNorm on the folded batch).
    PerFrame,
    /// Across all frames of a video (a GroupNorm on `[B, C, F, H, W]`).
    CrossFrame,
}

/// `y = x·Wᵀ + b` for a `[.., in]` input and a PyTorch `[out, in]` weight.
pub fn linear(
    g: &mut GraphBuilder,
    x: &str,
    prefix: &str,
    din: usize,
    dout: usize,
    bias: bool,
) -> String {
    let w = g.param(&format!("{prefix}.weight"), &[dout, din]);
    let wt = g.transpose(&w, &[1, 0]);
    let y = g.matmul(x, &wt);
    if bias {
        let b = g.param(&format!("{prefix}.bias"), &[dout]);
        g.add(&y, &b)
    } else {
        y
    }
}

/// 2-D convolution with bias, square kernel, "same"-style padding `pad`.
#[allow(clippy::too_many_arguments)]
pub fn conv2d(
    g: &mut GraphBuilder,
    x: &str,
    prefix: &str,
    cin: usize,
    cout: usize,
    k: usize,
    stride: i64,
    pad: i64,
) -> String {
    if g.winograd
        && k == 3
        && stride == 1
        && pad == 1
        && cin >= WINOGRAD_MIN_CHANNELS
        && cout >= WINOGRAD_MIN_CHANNELS
    {
        let u = g.param_transformed(
            &format!("{prefix}.weight"),
            &[cout, cin, 3, 3],
            Transform::Winograd,
        );
        let b = g.param(&format!("{prefix}.bias"), &[cout]);
        return g.scoped(prefix, |g| winograd_conv3x3(g, x, &u, &b));
    }
    let w = g.param(&format!("{prefix}.weight"), &[cout, cin, k, k]);
    let b = g.param(&format!("{prefix}.bias"), &[cout]);
    g.op(
        "Conv",
        &[x, &w, &b],
        vec![
            attr_ints("kernel_shape", &[k as i64, k as i64]),
            attr_ints("strides", &[stride, stride]),
            attr_ints("pads", &[pad, pad, pad, pad]),
        ],
    )
}

/// Convolutions with fewer input or output channels stay direct under `--winograd` (`conv_in`,
/// `conv_out`): their GEMMs would be too thin to gain.
pub const WINOGRAD_MIN_CHANNELS: usize = 32;

/// A 3×3, stride-1, padding-1 convolution as Winograd F(2×2, 3×3) (`--winograd`):
/// `com.motionrt.WinogradInput` → one batched MatMul with the transformed kernels `u`
/// (`U = G·W·Gᵀ`, `[16, O, C]`, written by the exporter as `{weight}@winograd`) →
/// `com.motionrt.WinogradOutput` (+ bias).
fn winograd_conv3x3(g: &mut GraphBuilder, x: &str, u: &str, b: &str) -> String {
    let v = g.op_domain(motionrt_kernels::DOMAIN, "WinogradInput", &[x], vec![]);
    let m = g.matmul(u, &v); // [16, O, T]
    let shape = g.shape(x);
    g.op_domain(
        motionrt_kernels::DOMAIN,
        "WinogradOutput",
        &[&m, &shape, b],
        vec![],
    )
}

/// GroupNorm core on `x = [N, C, ...]`: statistics per (n, group) over everything after axis 1.
/// Computed in float32 whatever the graph precision (variance of large activations overflows
/// fp16).
fn group_norm_core(
    g: &mut GraphBuilder,
    x: &str,
    prefix: &str,
    c: usize,
    groups: usize,
    eps: f32,
    rank: usize,
) -> String {
    let shape = g.shape(x);
    let grouped = g.reshape_to(x, &[0, groups as i64, -1]);
    let grouped = g.to_f32(&grouped);
    let ones = g.const_f32(&[groups as i64], &vec![1.0; groups]);
    let zeros = g.const_f32(&[groups as i64], &vec![0.0; groups]);
    let normed = g.op(
        "InstanceNormalization",
        &[&grouped, &ones, &zeros],
        vec![attr_float("epsilon", eps)],
    );
    let normed = g.to_compute(&normed);
    let normed = g.reshape(&normed, &shape);
    let mut affine_shape = vec![c as i64];
    affine_shape.extend(std::iter::repeat_n(1, rank - 2));
    let gamma = g.param(&format!("{prefix}.weight"), &[c]);
    let beta = g.param(&format!("{prefix}.bias"), &[c]);
    let gamma = g.reshape_to(&gamma, &affine_shape);
    let beta = g.reshape_to(&beta, &affine_shape);
    let y = g.mul(&normed, &gamma);
    g.add(&y, &beta)
}

/// GroupNorm of a `[B·F, C, H, W]` activation, per frame or across frames.
#[allow(clippy::too_many_arguments)]
pub fn group_norm(
    g: &mut GraphBuilder,
    x: &str,
    prefix: &str,
    c: usize,
    groups: usize,
    eps: f32,
    span: NormSpan,
    frames: &Frames,
) -> String {
    g.scoped(prefix, |g| match span {
        NormSpan::PerFrame => group_norm_core(g, x, prefix, c, groups, eps, 4),
        NormSpan::CrossFrame => {
            let shape = g.shape(x);
            let cc = g.i64s(&[c as i64]);
            let rest = g.i64s(&[-1]);
            let s5 = g.concat(&[&frames.batch, &frames.frames, &cc, &rest], 0);
            let v = g.reshape(x, &s5); // [B, F, C, HW]
            let v = g.transpose(&v, &[0, 2, 1, 3]); // [B, C, F, HW]
            let v = group_norm_core(g, &v, prefix, c, groups, eps, 4);
            let v = g.transpose(&v, &[0, 2, 1, 3]);
            g.reshape(&v, &shape)
        }
    })
}

pub fn layer_norm(g: &mut GraphBuilder, x: &str, prefix: &str, c: usize, eps: f32) -> String {
    let gamma = g.param(&format!("{prefix}.weight"), &[c]);
    let beta = g.param(&format!("{prefix}.bias"), &[c]);
    g.op(
        "LayerNormalization",
        &[x, &gamma, &beta],
        vec![attr_int("axis", -1), attr_float("epsilon", eps)],
    )
}

/// Multi-head attention of diffusers' `Attention` (no q/k/v bias, `to_out.0` with bias).
/// `x`: `[N, L, dim]`; `context`: `[N, S, ctx_dim]` (None: self-attention). `fused`: the core
/// as one `com.motionrt.TemporalAttention` node instead of standard ops.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    g: &mut GraphBuilder,
    x: &str,
    context: Option<&str>,
    prefix: &str,
    dim: usize,
    ctx_dim: usize,
    heads: usize,
    fused: bool,
) -> String {
    g.scoped(prefix, |g| {
        let kv = context.unwrap_or(x);
        let kv_dim = if context.is_some() { ctx_dim } else { dim };
        let q = linear(g, x, &format!("{prefix}.to_q"), dim, dim, false);
        let k = linear(g, kv, &format!("{prefix}.to_k"), kv_dim, dim, false);
        let v = linear(g, kv, &format!("{prefix}.to_v"), kv_dim, dim, false);
        let o = if fused {
            temporal_attention_fused(g, &q, &k, &v, heads)
        } else {
            attention_core(g, &q, &k, &v, dim, heads)
        };
        linear(g, &o, &format!("{prefix}.to_out.0"), dim, dim, true)
    })
}

/// `softmax(Q·Kᵀ/√d)·V` per head in standard ops: `q` `[N, L, dim]`, `k`/`v` `[N, S, dim]`.
/// This is also the portable decomposition of `com.motionrt.TemporalAttention`.
pub fn attention_core(
    g: &mut GraphBuilder,
    q: &str,
    k: &str,
    v: &str,
    dim: usize,
    heads: usize,
) -> String {
    attention_core_bias(g, q, k, v, dim, heads, None)
}

/// [`attention_core`] with an additive `[1 or h, L, S]` bias on the logits.
pub fn attention_core_bias(
    g: &mut GraphBuilder,
    q: &str,
    k: &str,
    v: &str,
    dim: usize,
    heads: usize,
    bias: Option<&str>,
) -> String {
    let d = dim / heads;
    let split = [0, 0, heads as i64, d as i64];
    let q = g.reshape_to(q, &split);
    let q = g.transpose(&q, &[0, 2, 1, 3]); // [N, h, L, d]
    let k = g.reshape_to(k, &split);
    let k = g.transpose(&k, &[0, 2, 3, 1]); // [N, h, d, S]
    let v = g.reshape_to(v, &split);
    let v = g.transpose(&v, &[0, 2, 1, 3]); // [N, h, S, d]
    let scale = g.constf(&[], &[1.0 / (d as f32).sqrt()]);
    let q = g.mul(&q, &scale);
    let mut s = g.matmul(&q, &k);
    if let Some(b) = bias {
        s = g.add(&s, b);
    }
    let p = g.op("Softmax", &[&s], vec![attr_int("axis", -1)]);
    let o = g.matmul(&p, &v);
    let o = g.transpose(&o, &[0, 2, 1, 3]);
    g.reshape_to(&o, &[0, 0, dim as i64])
}

/// `com.motionrt.TemporalAttention(Q, K, V)` (docs/operators.md).
pub fn temporal_attention_fused(
    g: &mut GraphBuilder,
    q: &str,
    k: &str,
    v: &str,
    heads: usize,
) -> String {
    g.op_domain(
        motionrt_kernels::DOMAIN,
        "TemporalAttention",
        &[q, k, v],
        vec![attr_int("num_heads", heads as i64)],
    )
}

/// Tune-A-Video's sparse-causal attention core over `[B·F, S, dim]` projections: frame `i`'s
/// queries attend to the keys/values of frame 0 and frame `max(i − 1, 0)`. `fused`: one
/// `com.motionrt.SparseCausalAttention` node (needs the frame count `frames_static`); else the
/// portable decomposition (Gather of the two frames, Concat, standard attention). The frame
/// count comes from `frames_static` (the node's attribute) or else from the graph at run time
/// (the fused node's optional input 3).
#[allow(clippy::too_many_arguments)]
pub fn sparse_causal_core(
    g: &mut GraphBuilder,
    q: &str,
    k: &str,
    v: &str,
    dim: usize,
    heads: usize,
    frames: &Frames,
    frames_static: Option<usize>,
    fused: bool,
) -> String {
    if fused {
        return match frames_static {
            Some(f) => g.op_domain(
                motionrt_kernels::DOMAIN,
                "SparseCausalAttention",
                &[q, k, v],
                vec![
                    attr_int("num_heads", heads as i64),
                    attr_int("frames", f as i64),
                ],
            ),
            // the frame count of this call, as input 3
            None => g.op_domain(
                motionrt_kernels::DOMAIN,
                "SparseCausalAttention",
                &[q, k, v, &frames.frames],
                vec![attr_int("num_heads", heads as i64)],
            ),
        };
    }
    // former = max(arange(F) − 1, 0); first = arange(F) · 0
    let zero = g.i64s(&[0]);
    let f_scalar = g.reshape_to(&frames.frames, &[]);
    let z = g.reshape_to(&zero, &[]);
    let one = g.i64s(&[1]);
    let one_s = g.reshape_to(&one, &[]);
    let range = g.op("Range", &[&z, &f_scalar, &one_s], vec![]);
    let prev = g.op("Sub", &[&range, &one], vec![]);
    let former = g.op("Max", &[&prev, &zero], vec![]);
    let first = g.op("Mul", &[&range, &zero], vec![]);
    let cc = g.i64s(&[dim as i64]);
    let rest = g.i64s(&[-1]);
    let unfold = g.concat(&[&frames.batch, &frames.frames, &rest, &cc], 0);
    let bf = g.op("Mul", &[&frames.batch, &frames.frames], vec![]);
    let fold = g.concat(&[&bf, &rest, &cc], 0);
    let mut gathered = Vec::new();
    for x in [k, v] {
        let x4 = g.reshape(x, &unfold); // [B, F, S, C]
        let a = g.op("Gather", &[&x4, &first], vec![attr_int("axis", 1)]);
        let b = g.op("Gather", &[&x4, &former], vec![attr_int("axis", 1)]);
        let cat = g.concat(&[&a, &b], 2); // [B, F, 2S, C]
        let fold = g.op("Reshape", &[&cat, &fold], vec![]); // [B·F, 2S, C]
        gathered.push(fold);
    }
    attention_core(g, q, &gathered[0], &gathered[1], dim, heads)
}

/// GEGLU feed-forward: `net.2(a · gelu(gate))`, `[a, gate] = net.0.proj(x)`; exact (erf) GELU.
pub fn geglu_ff(g: &mut GraphBuilder, x: &str, prefix: &str, dim: usize) -> String {
    g.scoped(prefix, |g| {
        let inner = dim * 4;
        let h = linear(g, x, &format!("{prefix}.net.0.proj"), dim, inner * 2, true);
        let sizes = g.i64s(&[inner as i64, inner as i64]);
        let parts = g.op_n("Split", &[&h, &sizes], vec![attr_int("axis", -1)], 2);
        let (a, gate) = (&parts[0], &parts[1]);
        let inv_sqrt2 = g.constf(&[], &[std::f32::consts::FRAC_1_SQRT_2]);
        let one = g.constf(&[], &[1.0]);
        let half = g.constf(&[], &[0.5]);
        let e = g.mul(gate, &inv_sqrt2);
        let e = g.op("Erf", &[&e], vec![]);
        let e = g.add(&e, &one);
        let e = g.mul(&e, &half);
        let gelu = g.mul(gate, &e);
        let y = g.mul(a, &gelu);
        linear(g, &y, &format!("{prefix}.net.2"), inner, dim, true)
    })
}

/// Which blocks a `transformer_blocks.N` belongs to.
pub enum BlockKind<'a> {
    /// Spatial: attn1 self over pixels, attn2 cross to the text embeddings.
    Spatial { context: &'a str, ctx_dim: usize },
    /// Tune-A-Video: attn1 sparse-causal over pixels (frame 0 and the previous frame), attn2
    /// cross to the text embeddings, the feed-forward, then `attn_temp` self-attention over
    /// frames (tokens `(B·h·w, F, C)`, pre-LayerNorm `norm_temp`, no positional table).
    TuneAVideo {
        context: &'a str,
        ctx_dim: usize,
        frames: &'a Frames,
    },
    /// Temporal: attn1 and attn2 both self over frames, with the positional table added to the
    /// normed tokens before each.
    Temporal { pos: &'a str },
}

/// diffusers' `BasicTransformerBlock` (pre-LayerNorm, eps 1e-5).
pub fn transformer_block(
    g: &mut GraphBuilder,
    x: &str,
    prefix: &str,
    dim: usize,
    heads: usize,
    kind: &BlockKind<'_>,
) -> String {
    g.scoped(prefix, |g| {
        let eps = 1e-5;
        let mut h = x.to_string();
        for (i, attn) in ["attn1", "attn2"].iter().enumerate() {
            let n = layer_norm(g, &h, &format!("{prefix}.norm{}", i + 1), dim, eps);
            let a = match kind {
                BlockKind::Spatial { context, ctx_dim } => {
                    let ctx = if i == 0 { None } else { Some(*context) };
                    attention(
                        g,
                        &n,
                        ctx,
                        &format!("{prefix}.{attn}"),
                        dim,
                        *ctx_dim,
                        heads,
                        false,
                    )
                }
                BlockKind::TuneAVideo {
                    context,
                    ctx_dim,
                    frames,
                } => {
                    if i == 0 {
                        let p = format!("{prefix}.attn1");
                        g.scoped(&p, |g| {
                            let q = linear(g, &n, &format!("{p}.to_q"), dim, dim, false);
                            let k = linear(g, &n, &format!("{p}.to_k"), dim, dim, false);
                            let v = linear(g, &n, &format!("{p}.to_v"), dim, dim, false);
                            let fused = g.fused_attention;
                            let o =
                                sparse_causal_core(g, &q, &k, &v, dim, heads, frames, None, fused);
                            linear(g, &o, &format!("{p}.to_out.0"), dim, dim, true)
                        })
                    } else {
                        attention(
                            g,
                            &n,
                            Some(*context),
                            &format!("{prefix}.{attn}"),
                            dim,
                            *ctx_dim,
                            heads,
                            false,
                        )
                    }
                }
                BlockKind::Temporal { pos } => {
                    let n = g.add(&n, pos);
                    let fused = g.fused_attention;
                    attention(
                        g,
                        &n,
                        None,
                        &format!("{prefix}.{attn}"),
                        dim,
                        dim,
                        heads,
                        fused,
                    )
                }
            };
            h = g.add(&a, &h);
        }
        let n = layer_norm(g, &h, &format!("{prefix}.norm3"), dim, eps);
        let f = geglu_ff(g, &n, &format!("{prefix}.ff"), dim);
        let h = g.add(&f, &h);
        match kind {
            BlockKind::TuneAVideo { frames, .. } => {
                temporal_self_attention(g, &h, prefix, dim, heads, frames)
            }
            _ => h,
        }
    })
}

/// Tune-A-Video's `attn_temp` with `norm_temp`: `(B·F, D, C)` tokens regrouped to `(B·D, F, C)`,
/// `x + attn_temp(norm_temp(x))`, and back.
fn temporal_self_attention(
    g: &mut GraphBuilder,
    h: &str,
    prefix: &str,
    dim: usize,
    heads: usize,
    frames: &Frames,
) -> String {
    let shape = g.shape(h); // [B·F, D, C]
    let cc = g.i64s(&[dim as i64]);
    let rest = g.i64s(&[-1]);
    let s = g.concat(&[&frames.batch, &frames.frames, &rest, &cc], 0);
    let t = g.reshape(h, &s); // [B, F, D, C]
    let t = g.transpose(&t, &[0, 2, 1, 3]); // [B, D, F, C]
    let s = g.concat(&[&rest, &frames.frames, &cc], 0);
    let t = g.reshape(&t, &s); // [B·D, F, C]
    let n = layer_norm(g, &t, &format!("{prefix}.norm_temp"), dim, 1e-5);
    let fused = g.fused_attention;
    let a = attention(
        g,
        &n,
        None,
        &format!("{prefix}.attn_temp"),
        dim,
        dim,
        heads,
        fused,
    );
    let t = g.add(&a, &t);
    let s = g.concat(&[&frames.batch, &rest, &frames.frames, &cc], 0);
    let t = g.reshape(&t, &s); // [B, D, F, C]
    let t = g.transpose(&t, &[0, 2, 1, 3]); // [B, F, D, C]
    g.reshape(&t, &shape)
}

/// diffusers' `ResnetBlock2D` (SD1.x: no time scale-shift, output scale 1).
#[allow(clippy::too_many_arguments)]
pub fn resnet(
    g: &mut GraphBuilder,
    x: &str,
    temb_act: &str,
    prefix: &str,
    cin: usize,
    cout: usize,
    temb_dim: usize,
    groups: usize,
    eps: f32,
    span: NormSpan,
    frames: &Frames,
) -> String {
    g.scoped(prefix, |g| {
        let h = group_norm(
            g,
            x,
            &format!("{prefix}.norm1"),
            cin,
            groups,
            eps,
            span,
            frames,
        );
        let h = g.silu(&h);
        let h = conv2d(g, &h, &format!("{prefix}.conv1"), cin, cout, 3, 1, 1);
        let t = linear(
            g,
            temb_act,
            &format!("{prefix}.time_emb_proj"),
            temb_dim,
            cout,
            true,
        );
        let t = g.unsqueeze(&t, &[2, 3]);
        let h = g.add(&h, &t);
        let h = group_norm(
            g,
            &h,
            &format!("{prefix}.norm2"),
            cout,
            groups,
            eps,
            span,
            frames,
        );
        let h = g.silu(&h);
        let h = conv2d(g, &h, &format!("{prefix}.conv2"), cout, cout, 3, 1, 1);
        let shortcut = if cin != cout {
            conv2d(g, x, &format!("{prefix}.conv_shortcut"), cin, cout, 1, 1, 0)
        } else {
            x.to_string()
        };
        g.add(&h, &shortcut)
    })
}

/// diffusers' `Transformer2DModel` for SD1.x: GroupNorm(eps 1e-6, per frame) → proj_in →
/// transformer blocks over the H·W tokens → proj_out → + residual.
#[allow(clippy::too_many_arguments)]
pub fn spatial_transformer(
    g: &mut GraphBuilder,
    x: &str,
    context: &str,
    prefix: &str,
    c: usize,
    ctx_dim: usize,
    heads: usize,
    layers: usize,
    groups: usize,
    linear_proj: bool,
    frames: &Frames,
    tune_a_video: bool,
) -> String {
    g.scoped(prefix, |g| {
        let shape = g.shape(x);
        let h = group_norm(
            g,
            x,
            &format!("{prefix}.norm"),
            c,
            groups,
            1e-6,
            NormSpan::PerFrame,
            frames,
        );
        let to_tokens = |g: &mut GraphBuilder, v: &str| {
            let t = g.reshape_to(v, &[0, 0, -1]);
            g.transpose(&t, &[0, 2, 1]) // [BF, HW, C]
        };
        let mut t = if linear_proj {
            let t = to_tokens(g, &h);
            linear(g, &t, &format!("{prefix}.proj_in"), c, c, true)
        } else {
            let p = conv2d(g, &h, &format!("{prefix}.proj_in"), c, c, 1, 1, 0);
            to_tokens(g, &p)
        };
        let kind = if tune_a_video {
            BlockKind::TuneAVideo {
                context,
                ctx_dim,
                frames,
            }
        } else {
            BlockKind::Spatial { context, ctx_dim }
        };
        for i in 0..layers {
            t = transformer_block(
                g,
                &t,
                &format!("{prefix}.transformer_blocks.{i}"),
                c,
                heads,
                &kind,
            );
        }
        let out = if linear_proj {
            let t = linear(g, &t, &format!("{prefix}.proj_out"), c, c, true);
            let t = g.transpose(&t, &[0, 2, 1]);
            g.reshape(&t, &shape)
        } else {
            let t = g.transpose(&t, &[0, 2, 1]);
            let t = g.reshape(&t, &shape);
            conv2d(g, &t, &format!("{prefix}.proj_out"), c, c, 1, 1, 0)
        };
        g.add(&out, x)
    })
}

/// The sinusoidal positional table of the motion modules, `[1, len, dim]`, computed as
/// diffusers' `SinusoidalPositionalEmbedding` does (float32): even channels sin, odd cos.
pub fn positional_table(len: usize, dim: usize) -> Vec<f32> {
    let mut pe = vec![0f32; len * dim];
    let scale = -(10000f32).ln() / dim as f32;
    for pos in 0..len {
        for i in (0..dim).step_by(2) {
            let div = (i as f32 * scale).exp();
            let a = pos as f32 * div;
            pe[pos * dim + i] = a.sin();
            if i + 1 < dim {
                pe[pos * dim + i + 1] = a.cos();
            }
        }
    }
    pe
}

/// An AnimateDiff motion module (diffusers `AnimateDiffTransformer3D`, original
/// `VanillaTemporalModule`): GroupNorm(eps 1e-6; `norm_span` per frame for the original
/// semantics, across frames for diffusers) → proj_in → temporal transformer blocks over
/// `(B·H·W, F, C)` tokens → proj_out → + residual.
#[allow(clippy::too_many_arguments)]
pub fn motion_module(
    g: &mut GraphBuilder,
    x: &str,
    prefix: &str,
    c: usize,
    heads: usize,
    layers: usize,
    groups: usize,
    pos_table: &str,
    norm_span: NormSpan,
    frames: &Frames,
) -> String {
    g.scoped(prefix, |g| {
        let shape = g.shape(x);
        let n = group_norm(
            g,
            x,
            &format!("{prefix}.norm"),
            c,
            groups,
            1e-6,
            norm_span,
            frames,
        );
        let cc = g.i64s(&[c as i64]);
        let rest = g.i64s(&[-1]);
        let s = g.concat(&[&frames.batch, &frames.frames, &cc, &rest], 0);
        let t = g.reshape(&n, &s); // [B, F, C, HW]
        let t = g.transpose(&t, &[0, 3, 1, 2]); // [B, HW, F, C]
        let s = g.concat(&[&rest, &frames.frames, &cc], 0);
        let t = g.reshape(&t, &s); // [B·HW, F, C]
        let mut t = linear(g, &t, &format!("{prefix}.proj_in"), c, c, true);
        // pe[:, :F]
        let zero = g.i64s(&[0]);
        let axis1 = g.i64s(&[1]);
        let pos = g.op("Slice", &[pos_table, &zero, &frames.frames, &axis1], vec![]);
        let kind = BlockKind::Temporal { pos: &pos };
        for i in 0..layers {
            t = transformer_block(
                g,
                &t,
                &format!("{prefix}.transformer_blocks.{i}"),
                c,
                heads,
                &kind,
            );
        }
        let t = linear(g, &t, &format!("{prefix}.proj_out"), c, c, true);
        let s = g.concat(&[&frames.batch, &rest, &frames.frames, &cc], 0);
        let t = g.reshape(&t, &s); // [B, HW, F, C]
        let t = g.transpose(&t, &[0, 2, 3, 1]); // [B, F, C, HW]
        let t = g.reshape(&t, &shape);
        g.add(&t, x)
    })
}
