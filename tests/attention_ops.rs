//! The `com.motionrt` attention operators (docs/operators.md) three ways on random inputs of
//! many shapes: the fused operator (motionrt's CPU kernel, registered with ONNX Runtime), its
//! portable decomposition in standard ONNX ops (what `--portable` / the default export emits),
//! and a straightforward float64 computation. All agree within float32 rounding.

use motionrt_export::graph::ops::{op_model, OpGraph};
use motionrt_export::onnx::write_model;
use motionrt_kernels::attention::reference;
use motionrt_runtime::{Input, OrtSession, SessionOptions};

/// Deterministic normal-ish values.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = motionrt_runtime::rng::NormalRng::new(seed);
    let mut v = vec![0f32; n];
    rng.fill(&mut v);
    v
}

/// max |a − b| / max |b|
fn rel(a: &[f32], b: &[f64]) -> f64 {
    let m = b.iter().fold(0f64, |m, x| m.max(x.abs()));
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y).abs())
        .fold(0f64, f64::max)
        / m
}

/// float32 rounding through a softmax-weighted sum of O(100) terms: a few ulps of the result's
/// magnitude. Observed ≤ 6e-7 (2026-11-25); the bound leaves room for other CPUs' reassociation.
const FP32_ROUNDING: f64 = 1e-5;

fn run_model(
    dir: &std::path::Path,
    name: &str,
    op: OpGraph,
    c: usize,
    fused: bool,
    feeds: &[(&str, Vec<usize>, &[f32])],
) -> Vec<f32> {
    let path = dir.join(format!("{name}.onnx"));
    write_model(&op_model(op, c, fused), &path).unwrap();
    let mut s =
        OrtSession::load(&path, &SessionOptions::default()).unwrap_or_else(|e| panic!("{e}"));
    let inputs: Vec<(&str, Input<'_>)> = feeds
        .iter()
        .map(|(n, sh, d)| (*n, Input::F32(sh, d)))
        .collect();
    let out = s
        .run_with(&inputs)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    out.into_iter().next().unwrap().1.data
}

#[test]
fn temporal_attention_fused_portable_and_float64_agree() {
    let dir = tempfile::tempdir().unwrap();
    // (sequences N = B·h·w, frames F, heads, head dim, bias heads)
    for &(n, f, heads, d, bias) in &[
        (7, 1, 8, 40, None),
        (9, 2, 8, 40, Some(1)),
        (15, 16, 8, 40, Some(8)),
        (5, 24, 8, 40, None),
        (3, 16, 8, 80, None),
        (3, 16, 2, 160, Some(2)),
    ] {
        let c = heads * d;
        let (q, k, v) = (
            values(n * f * c, 1),
            values(n * f * c, 2),
            values(n * f * c, 3),
        );
        let b = bias.map(|bh| values(bh * f * f, 4));
        let mut feeds: Vec<(&str, Vec<usize>, &[f32])> = vec![
            ("q", vec![n, f, c], &q),
            ("k", vec![n, f, c], &k),
            ("v", vec![n, f, c], &v),
        ];
        if let (Some(bh), Some(b)) = (bias, &b) {
            feeds.push(("bias", vec![bh, f, f], b));
        }
        let op = OpGraph::Temporal {
            heads,
            bias: bias.is_some(),
        };
        let fused = run_model(dir.path(), "fused", op, c, true, &feeds);
        let portable = run_model(dir.path(), "portable", op, c, false, &feeds);
        let want = reference::attention(
            &q,
            &k,
            &v,
            b.as_deref(),
            n,
            f,
            f,
            heads,
            d,
            1.0 / (d as f64).sqrt(),
        );
        let (ef, ep) = (rel(&fused, &want), rel(&portable, &want));
        let want32: Vec<f64> = portable.iter().map(|&x| x as f64).collect();
        let efp = rel(&fused, &want32);
        eprintln!("temporal N={n} F={f} h={heads} d={d} bias={bias:?}: fused {ef:.1e}, portable {ep:.1e}, fused vs portable {efp:.1e}");
        assert!(ef < FP32_ROUNDING && ep < FP32_ROUNDING && efp < FP32_ROUNDING);
    }
}

#[test]
fn sparse_causal_attention_fused_portable_and_float64_agree() {
    let dir = tempfile::tempdir().unwrap();
    // (videos B, frames F, tokens per frame S = h·w (odd ones too), heads, head dim)
    for &(b, f, s, heads, d) in &[
        (1, 1, 9, 8, 40),
        (2, 2, 15, 8, 40),
        (1, 16, 7, 8, 40),
        (1, 24, 5, 2, 80),
        (2, 3, 4, 2, 160),
    ] {
        let c = heads * d;
        let len = b * f * s * c;
        let (q, k, v) = (values(len, 5), values(len, 6), values(len, 7));
        let shape = vec![b * f, s, c];
        let feeds: Vec<(&str, Vec<usize>, &[f32])> = vec![
            ("q", shape.clone(), &q),
            ("k", shape.clone(), &k),
            ("v", shape, &v),
        ];
        let op = OpGraph::SparseCausal { heads, frames: f };
        let fused = run_model(dir.path(), "fused", op, c, true, &feeds);
        let portable = run_model(dir.path(), "portable", op, c, false, &feeds);
        let want = reference::sparse_causal(&q, &k, &v, b, f, s, heads, d, 1.0 / (d as f64).sqrt());
        let (ef, ep) = (rel(&fused, &want), rel(&portable, &want));
        eprintln!(
            "sparse-causal B={b} F={f} S={s} h={heads} d={d}: fused {ef:.1e}, portable {ep:.1e}"
        );
        assert!(ef < FP32_ROUNDING && ep < FP32_ROUNDING);
    }
}

#[test]
fn operator_errors_name_the_operator() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sc.onnx");
    write_model(
        &op_model(
            OpGraph::SparseCausal {
                heads: 2,
                frames: 3,
            },
            8,
            true,
        ),
        &path,
    )
    .unwrap();
    let mut s = OrtSession::load(&path, &SessionOptions::default()).unwrap();
    let x = vec![0f32; 4 * 5 * 8];
    let shape = [4usize, 5, 8];
    let e = s
        .run_with(&[
            ("q", Input::F32(&shape, &x)),
            ("k", Input::F32(&shape, &x)),
            ("v", Input::F32(&shape, &x)),
        ])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("com.motionrt.SparseCausalAttention")
            && e.contains("not a multiple of frames = 3"),
        "{e}"
    );
}
