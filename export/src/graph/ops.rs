//! Standalone graphs of one `com.motionrt` operator, fused or as its portable decomposition in
//! standard ops, so the operator implementations can be checked against the decomposition and
//! against a float64 computation on any runtime.

use super::layers::{attention_core_bias, sparse_causal_core, temporal_attention_fused, Frames};
use super::{GraphBuilder, Precision};
use crate::export::{IR_VERSION, OPSET};
use crate::onnx::proto::{
    GraphProto, ModelProto, OperatorSetIdProto, TensorProtoDataType, ValueInfoProto,
};
use crate::onnx::{attr_int, value_info, Dim};

/// Which operator a test graph holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpGraph {
    /// `TemporalAttention(Q [N, L, C], K [N, S, C], V [N, S, C] [, bias [Hb, L, S]])`.
    Temporal { heads: usize, bias: bool },
    /// `SparseCausalAttention(Q, K, V)` over `[B·F, S, C]` with `frames = F`.
    SparseCausal { heads: usize, frames: usize },
}

fn sym(names: &[&str], c: usize) -> Vec<Dim> {
    let mut d: Vec<Dim> = names.iter().map(|n| Dim::Symbolic(n.to_string())).collect();
    d.push(Dim::Fixed(c as i64));
    d
}

/// A model with the operator as its only computation: `fused` emits the `com.motionrt` node,
/// otherwise the standard-op decomposition the exporter writes by default. Channels `c` are
/// fixed (they must be divisible by the heads); the other dimensions are symbolic.
pub fn op_model(op: OpGraph, c: usize, fused: bool) -> ModelProto {
    let mut g = GraphBuilder::new(Precision::Fp32);
    let f32t = TensorProtoDataType::Float;
    let (inputs, out): (Vec<ValueInfoProto>, String) = match op {
        OpGraph::Temporal { heads, bias } => {
            let mut ins = vec![
                value_info("q", f32t, &sym(&["N", "L"], c)),
                value_info("k", f32t, &sym(&["N", "S"], c)),
                value_info("v", f32t, &sym(&["N", "S"], c)),
            ];
            if bias {
                ins.push(value_info(
                    "bias",
                    f32t,
                    &[
                        Dim::Symbolic("Hb".into()),
                        Dim::Symbolic("L".into()),
                        Dim::Symbolic("S".into()),
                    ],
                ));
            }
            let o = if fused {
                let mut names = vec!["q", "k", "v"];
                if bias {
                    names.push("bias");
                }
                if bias {
                    g.op_domain(
                        motionrt_kernels::DOMAIN,
                        "TemporalAttention",
                        &names,
                        vec![attr_int("num_heads", heads as i64)],
                    )
                } else {
                    temporal_attention_fused(&mut g, "q", "k", "v", heads)
                }
            } else {
                attention_core_bias(&mut g, "q", "k", "v", c, heads, bias.then_some("bias"))
            };
            (ins, o)
        }
        OpGraph::SparseCausal { heads, frames } => {
            let ins = ["q", "k", "v"]
                .iter()
                .map(|n| value_info(n, f32t, &sym(&["BF", "S"], c)))
                .collect();
            let fr = g.i64s(&[frames as i64]);
            let shape = g.shape("q");
            let bf = g.dim(&shape, 0);
            let batch = g.op("Div", &[&bf, &fr], vec![]);
            let fs = Frames { batch, frames: fr };
            let o = sparse_causal_core(&mut g, "q", "k", "v", c, heads, &fs, Some(frames), fused);
            (ins, o)
        }
    };
    let dims = match op {
        OpGraph::Temporal { .. } => sym(&["N", "L"], c),
        OpGraph::SparseCausal { .. } => sym(&["BF", "S"], c),
    };
    // name the result `out`
    let out_name = "out";
    g.nodes.push(crate::onnx::proto::NodeProto {
        input: vec![out],
        output: vec![out_name.into()],
        name: "/Identity_out".into(),
        op_type: "Identity".into(),
        ..Default::default()
    });
    let mut opset_import = vec![OperatorSetIdProto {
        domain: String::new(),
        version: OPSET,
    }];
    if g.uses_domain(motionrt_kernels::DOMAIN) {
        opset_import.push(OperatorSetIdProto {
            domain: motionrt_kernels::DOMAIN.into(),
            version: 1,
        });
    }
    let GraphBuilder { nodes, consts, .. } = g;
    ModelProto {
        ir_version: IR_VERSION,
        producer_name: "motionrt".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        opset_import,
        graph: Some(GraphProto {
            name: "motionrt_op".into(),
            node: nodes,
            initializer: consts,
            input: inputs,
            output: vec![value_info(out_name, f32t, &dims)],
            ..Default::default()
        }),
        ..Default::default()
    }
}
