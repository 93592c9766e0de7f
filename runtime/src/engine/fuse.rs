//! Fusion passes over an exported float32 graph: each finds a standard-op pattern the exporter
//! emits and replaces its last node with one `com.motionrt` operator computing the same
//! function (same output name); nodes nothing reads any more are then removed.
//!
//! | pattern (as `export/src/graph/layers.rs` emits it) | fused |
//! | --- | --- |
//! | `Reshape[0,G,-1] → InstanceNormalization(1, 0) → Reshape(Shape(X)) → Mul(γ) → Add(β)` (`→ Sigmoid, Mul`) | `GroupNorm` (`activation = silu`) |
//! | `MatMul(X, Transpose(W)) (→ Add(bias)) (→ Add(residual))` | `Linear` (bias and residual in the epilogue) |
//! | `Split[d,d] → a · (g · ½(1 + erf(g/√2)))` | `Geglu` |
//! | `Reshape/Transpose(Q,K,V) → Mul(scale) → MatMul → Softmax → MatMul → Transpose → Reshape` | `TemporalAttention` (multi-head attention, any `L`, `S`) |
//!
//! A pattern only grows past a value that nothing else reads, so no work is duplicated; a value
//! read elsewhere ends the pattern there. Constants are read from initializers.

use std::collections::{BTreeMap, HashMap, HashSet};

use motionrt_onnx::proto::{
    AttributeProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto, TensorProtoDataType,
};
use motionrt_onnx::{attr_float, attr_int, attr_string};
use serde::Serialize;

use super::EngineError;

/// What [`fuse`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FusionReport {
    pub nodes_before: usize,
    pub nodes_after: usize,
    /// Fused operator → how many (`GroupNorm+SiLU`, `Linear+bias+residual`, ...).
    pub fused: BTreeMap<String, usize>,
    /// Operator histogram of the fused graph (as `motionrt inspect` counts them).
    pub ops_after: BTreeMap<String, usize>,
}

/// The graph's nodes with who produces and who reads each value.
struct Index<'a> {
    nodes: &'a [NodeProto],
    producer: HashMap<&'a str, usize>,
    consumers: HashMap<&'a str, Vec<usize>>,
    inits: HashMap<&'a str, &'a TensorProto>,
    graph_outputs: HashSet<&'a str>,
}

impl<'a> Index<'a> {
    fn new(
        nodes: &'a [NodeProto],
        inits: &'a [TensorProto],
        graph_outputs: impl Iterator<Item = &'a str>,
    ) -> Self {
        let mut producer = HashMap::new();
        let mut consumers: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, n) in nodes.iter().enumerate() {
            for o in &n.output {
                producer.insert(o.as_str(), i);
            }
            for x in &n.input {
                if !x.is_empty() {
                    consumers.entry(x.as_str()).or_default().push(i);
                }
            }
        }
        Self {
            nodes,
            producer,
            consumers,
            inits: inits.iter().map(|t| (t.name.as_str(), t)).collect(),
            graph_outputs: graph_outputs.collect(),
        }
    }

    /// The node producing `v` if it is a `op` node.
    fn producer_op(&self, v: &str, op: &str) -> Option<&'a NodeProto> {
        let n = &self.nodes[*self.producer.get(v)?];
        (n.op_type == op && n.domain.is_empty()).then_some(n)
    }

    /// The only reader of `v`, if there is exactly one and `v` is not a graph output.
    fn sole_consumer(&self, v: &str) -> Option<&'a NodeProto> {
        if self.graph_outputs.contains(v) {
            return None;
        }
        match self.consumers.get(v).map(Vec::as_slice) {
            Some(&[i]) => Some(&self.nodes[i]),
            _ => None,
        }
    }

    fn readers(&self, v: &str) -> Vec<&'a NodeProto> {
        if self.graph_outputs.contains(v) {
            return Vec::new();
        }
        self.consumers
            .get(v)
            .map(|c| c.iter().map(|&i| &self.nodes[i]).collect())
            .unwrap_or_default()
    }

    fn init(&self, v: &str) -> Option<&'a TensorProto> {
        self.inits.get(v).copied()
    }

    fn const_i64(&self, v: &str) -> Option<Vec<i64>> {
        let t = self.init(v)?;
        if t.data_type != TensorProtoDataType::Int64 as i32 {
            return None;
        }
        if !t.int64_data.is_empty() {
            return Some(t.int64_data.clone());
        }
        (!t.raw_data.is_empty() && t.raw_data.len() % 8 == 0).then(|| {
            t.raw_data
                .chunks(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
                .collect()
        })
    }

    fn const_f32(&self, v: &str) -> Option<Vec<f32>> {
        let t = self.init(v)?;
        if t.data_type != TensorProtoDataType::Float as i32 {
            return None;
        }
        if !t.float_data.is_empty() {
            return Some(t.float_data.clone());
        }
        (t.raw_data.len() % 4 == 0 && t.external_data.is_empty()).then(|| {
            t.raw_data
                .chunks(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect()
        })
    }

    /// A float32 scalar constant (any shape with one element) equal to `want` within 1e-6.
    fn is_scalar(&self, v: &str, want: f32) -> bool {
        self.const_f32(v)
            .is_some_and(|c| c.len() == 1 && (c[0] - want).abs() <= 1e-6 * want.abs().max(1.0))
    }

    /// A float32 initializer's dims (weights may live in external data).
    fn float_init_dims(&self, v: &str) -> Option<&'a [i64]> {
        let t = self.init(v)?;
        (t.data_type == TensorProtoDataType::Float as i32).then_some(t.dims.as_slice())
    }
}

fn attr<'n>(n: &'n NodeProto, name: &str) -> Option<&'n AttributeProto> {
    n.attribute.iter().find(|a| a.name == name)
}

/// The input of the binary node `n` that is not `v` (`None` if `v` is neither or both).
fn other<'n>(n: &'n NodeProto, v: &str) -> Option<&'n str> {
    match n.input.as_slice() {
        [a, b] if a == v && b != v => Some(b),
        [a, b] if b == v && a != v => Some(a),
        _ => None,
    }
}

fn binary<'n>(n: Option<&'n NodeProto>, op: &str) -> Option<&'n NodeProto> {
    n.filter(|n| n.op_type == op && n.domain.is_empty() && n.input.len() == 2)
}

/// One rewrite: the node at `at` becomes `node` (which keeps its output names).
struct Rewrite {
    at: usize,
    node: NodeProto,
    kind: String,
}

fn fused_node(
    domain: &str,
    op: &str,
    name: &str,
    inputs: Vec<String>,
    output: &str,
    attrs: Vec<AttributeProto>,
) -> NodeProto {
    NodeProto {
        input: inputs,
        output: vec![output.to_string()],
        name: format!("{name}/{op}"),
        op_type: op.into(),
        attribute: attrs,
        domain: domain.into(),
        ..Default::default()
    }
}

/// GroupNorm (+ SiLU), anchored at InstanceNormalization.
fn group_norm(ix: &Index<'_>, i: usize) -> Option<Rewrite> {
    let n = &ix.nodes[i];
    if n.op_type != "InstanceNormalization" || n.input.len() != 3 {
        return None;
    }
    let grouped = ix.producer_op(&n.input[0], "Reshape")?;
    let x = grouped.input.first()?;
    let spec = ix.const_i64(grouped.input.get(1)?)?;
    let &[0, groups, -1] = spec.as_slice() else {
        return None;
    };
    let ones = ix.const_f32(&n.input[1])?;
    let zeros = ix.const_f32(&n.input[2])?;
    if ones.len() != groups as usize
        || zeros.len() != groups as usize
        || ones.iter().any(|&v| v != 1.0)
        || zeros.iter().any(|&v| v != 0.0)
    {
        return None;
    }
    let eps = attr(n, "epsilon").map_or(1e-5, |a| a.f);
    let back = ix.sole_consumer(&n.output[0])?;
    if back.op_type != "Reshape" || back.input.first() != Some(&n.output[0]) {
        return None;
    }
    let shape = ix.producer_op(back.input.get(1)?, "Shape")?;
    if shape.input.first() != Some(x) {
        return None;
    }
    // The affine: Mul by Reshape(γ, [C, 1, ..]), Add Reshape(β, [C, 1, ..]).
    let affine = |v: &str| -> Option<(String, usize)> {
        let r = ix.producer_op(v, "Reshape")?;
        let p = r.input.first()?;
        let dims = ix.float_init_dims(p)?;
        let spec = ix.const_i64(r.input.get(1)?)?;
        let c = *dims.first()?;
        (dims.len() == 1 && spec.first() == Some(&c) && spec[1..].iter().all(|&d| d == 1))
            .then(|| (p.clone(), spec.len()))
    };
    let mul = binary(ix.sole_consumer(&back.output[0]), "Mul")?;
    let (gamma, rank_g) = affine(other(mul, &back.output[0])?)?;
    let add = binary(ix.sole_consumer(&mul.output[0]), "Add")?;
    let (beta, rank_b) = affine(other(add, &mul.output[0])?)?;
    if rank_g != rank_b {
        return None;
    }
    // SiLU: y · Sigmoid(y), y read by exactly those two nodes.
    let y = &add.output[0];
    let mut last = add;
    let mut activation = "none";
    if let [a, b] = ix.readers(y).as_slice() {
        let (sig, mul) = if a.op_type == "Sigmoid" {
            (a, b)
        } else {
            (b, a)
        };
        if sig.op_type == "Sigmoid"
            && sig.domain.is_empty()
            && binary(Some(mul), "Mul").is_some()
            && other(mul, y) == sig.output.first().map(String::as_str)
            && ix.sole_consumer(&sig.output[0]).is_some()
        {
            last = mul;
            activation = "silu";
        }
    }
    let at = ix.producer[last.output[0].as_str()];
    Some(Rewrite {
        at,
        node: fused_node(
            motionrt_kernels::DOMAIN,
            "GroupNorm",
            &n.name,
            vec![x.clone(), gamma, beta],
            &last.output[0],
            vec![
                attr_int("num_groups", groups),
                attr_float("epsilon", eps),
                attr_string("activation", activation),
            ],
        ),
        kind: if activation == "silu" {
            "GroupNorm+SiLU".into()
        } else {
            "GroupNorm".into()
        },
    })
}

/// GEGLU, anchored at a two-way Split of the last axis into equal halves.
fn geglu(ix: &Index<'_>, i: usize) -> Option<Rewrite> {
    let n = &ix.nodes[i];
    if n.op_type != "Split" || !n.domain.is_empty() || n.output.len() != 2 {
        return None;
    }
    let axis = attr(n, "axis").map_or(0, |a| a.i);
    let sizes = ix.const_i64(n.input.get(1)?)?;
    if axis != -1 || sizes.len() != 2 || sizes[0] != sizes[1] {
        return None;
    }
    let (a, gate) = (&n.output[0], &n.output[1]);
    // gate is read by Mul(gate, 1/√2) and by the Mul(gate, ½(1 + erf)).
    let readers = ix.readers(gate);
    let [r1, r2] = readers.as_slice() else {
        return None;
    };
    let (scale, gelu) =
        if other(r1, gate).is_some_and(|c| ix.is_scalar(c, std::f32::consts::FRAC_1_SQRT_2)) {
            (*r1, *r2)
        } else {
            (*r2, *r1)
        };
    binary(Some(scale), "Mul")?;
    if !other(scale, gate).is_some_and(|c| ix.is_scalar(c, std::f32::consts::FRAC_1_SQRT_2)) {
        return None;
    }
    let erf = ix.sole_consumer(&scale.output[0])?;
    if erf.op_type != "Erf" {
        return None;
    }
    let plus = binary(ix.sole_consumer(&erf.output[0]), "Add")?;
    if !other(plus, &erf.output[0]).is_some_and(|c| ix.is_scalar(c, 1.0)) {
        return None;
    }
    let halve = binary(ix.sole_consumer(&plus.output[0]), "Mul")?;
    if !other(halve, &plus.output[0]).is_some_and(|c| ix.is_scalar(c, 0.5)) {
        return None;
    }
    binary(Some(gelu), "Mul")?;
    if other(gelu, gate) != Some(halve.output[0].as_str())
        || ix.sole_consumer(&halve.output[0]).is_none()
    {
        return None;
    }
    let out = binary(ix.sole_consumer(&gelu.output[0]), "Mul")?;
    if other(out, &gelu.output[0]) != Some(a.as_str()) || ix.sole_consumer(a).is_none() {
        return None;
    }
    Some(Rewrite {
        at: ix.producer[out.output[0].as_str()],
        node: fused_node(
            motionrt_kernels::DOMAIN,
            "Geglu",
            &n.name,
            vec![n.input[0].clone()],
            &out.output[0],
            vec![],
        ),
        kind: "Geglu".into(),
    })
}

/// Linear with its bias and residual adds, anchored at MatMul(X, Transpose(W)).
fn linear(ix: &Index<'_>, i: usize) -> Option<Rewrite> {
    let n = &ix.nodes[i];
    if n.op_type != "MatMul" || !n.domain.is_empty() || n.input.len() != 2 {
        return None;
    }
    let t = ix.producer_op(&n.input[1], "Transpose")?;
    let w = t.input.first()?;
    let dims = ix.float_init_dims(w)?;
    let perm = attr(t, "perm").map(|a| a.ints.as_slice());
    if dims.len() != 2 || !matches!(perm, Some([1, 0]) | None) {
        return None;
    }
    let out = dims[0];
    let mut inputs = vec![n.input[0].clone(), w.clone()];
    let mut last = n;
    let mut kind = String::from("Linear");
    if let Some(add) = binary(ix.sole_consumer(&last.output[0]), "Add") {
        if let Some(b) = other(add, &last.output[0]) {
            if ix.float_init_dims(b) == Some(&[out][..]) {
                inputs.push(b.to_string());
                last = add;
                kind.push_str("+bias");
            }
        }
    }
    if let Some(add) = binary(ix.sole_consumer(&last.output[0]), "Add") {
        // A residual is an activation, never a constant (a constant would be a broadcast bias);
        // the kernel checks at run time that it has the output's shape.
        if let Some(r) = other(add, &last.output[0]) {
            if ix.init(r).is_none() {
                if inputs.len() == 2 {
                    inputs.push(String::new());
                }
                inputs.push(r.to_string());
                last = add;
                kind.push_str("+residual");
            }
        }
    }
    Some(Rewrite {
        at: ix.producer[last.output[0].as_str()],
        node: fused_node(
            motionrt_kernels::DOMAIN,
            "Linear",
            &n.name,
            inputs,
            &last.output[0],
            vec![],
        ),
        kind,
    })
}

/// Multi-head attention in standard ops, anchored at Softmax(axis −1).
fn attention(ix: &Index<'_>, i: usize) -> Option<Rewrite> {
    let n = &ix.nodes[i];
    if n.op_type != "Softmax" || !n.domain.is_empty() {
        return None;
    }
    let axis = attr(n, "axis").map_or(-1, |a| a.i);
    if axis != -1 && axis != 3 {
        return None;
    }
    let logits = ix.producer_op(&n.input[0], "MatMul")?;
    ix.sole_consumer(&logits.output[0])?;
    let scaled = ix.producer_op(&logits.input[0], "Mul")?;
    // Heads split: Transpose(Reshape(x, [0, 0, h, d]), perm) → (x, h, d).
    let heads = |v: &str, perm: &[i64]| -> Option<(String, i64, i64)> {
        ix.sole_consumer(v)?;
        let t = ix.producer_op(v, "Transpose")?;
        if attr(t, "perm").map(|a| a.ints.as_slice()) != Some(perm) {
            return None;
        }
        let r = ix.producer_op(t.input.first()?, "Reshape")?;
        ix.sole_consumer(&r.output[0])?;
        let spec = ix.const_i64(r.input.get(1)?)?;
        let &[0, 0, h, d] = spec.as_slice() else {
            return None;
        };
        Some((r.input[0].clone(), h, d))
    };
    let (q, scale) = {
        let [a, b] = scaled.input.as_slice() else {
            return None;
        };
        let (q4, c) = if ix.const_f32(b).is_some() {
            (a, b)
        } else {
            (b, a)
        };
        let c = ix.const_f32(c)?;
        if c.len() != 1 || ix.sole_consumer(&scaled.output[0]).is_none() {
            return None;
        }
        (heads(q4, &[0, 2, 1, 3])?, c[0])
    };
    let k = heads(&logits.input[1], &[0, 2, 3, 1])?;
    let pv = ix.sole_consumer(&n.output[0])?;
    if pv.op_type != "MatMul" || pv.input.first() != Some(&n.output[0]) {
        return None;
    }
    let v = heads(pv.input.get(1)?, &[0, 2, 1, 3])?;
    let merge = ix.sole_consumer(&pv.output[0])?;
    if merge.op_type != "Transpose"
        || attr(merge, "perm").map(|a| a.ints.as_slice()) != Some(&[0, 2, 1, 3][..])
    {
        return None;
    }
    let fold = ix.sole_consumer(&merge.output[0])?;
    if fold.op_type != "Reshape" {
        return None;
    }
    let (h, d) = (q.1, q.2);
    if (k.1, k.2) != (h, d)
        || (v.1, v.2) != (h, d)
        || ix.const_i64(fold.input.get(1)?)? != [0, 0, h * d]
    {
        return None;
    }
    Some(Rewrite {
        at: ix.producer[fold.output[0].as_str()],
        node: fused_node(
            motionrt_kernels::DOMAIN,
            "TemporalAttention",
            &n.name,
            vec![q.0, k.0, v.0],
            &fold.output[0],
            vec![attr_int("num_heads", h), attr_float("scale", scale)],
        ),
        kind: "Attention".into(),
    })
}

type Pass = fn(&Index<'_>, usize) -> Option<Rewrite>;

/// Apply one pass everywhere it matches; returns how many rewrites of each kind.
fn run_pass(model: &mut ModelProto, pass: Pass, report: &mut FusionReport) {
    let graph = model.graph.as_mut().expect("checked by fuse");
    let rewrites: Vec<Rewrite> = {
        let ix = Index::new(
            &graph.node,
            &graph.initializer,
            graph.output.iter().map(|o| o.name.as_str()),
        );
        (0..graph.node.len()).filter_map(|i| pass(&ix, i)).collect()
    };
    let mut taken = HashSet::new();
    for r in rewrites {
        // Two matches never end at the same node; keep the first if they did.
        if taken.insert(r.at) {
            graph.node[r.at] = r.node;
            *report.fused.entry(r.kind).or_default() += 1;
        }
    }
    remove_dead(model);
}

/// Remove nodes whose outputs nothing reads and initializers no node reads.
fn remove_dead(model: &mut ModelProto) {
    let graph = model.graph.as_mut().expect("checked by fuse");
    let mut live: HashSet<String> = graph.output.iter().map(|o| o.name.clone()).collect();
    let mut keep = vec![false; graph.node.len()];
    for (i, n) in graph.node.iter().enumerate().rev() {
        if n.output.iter().any(|o| live.contains(o)) {
            keep[i] = true;
            live.extend(n.input.iter().filter(|x| !x.is_empty()).cloned());
        }
    }
    let mut k = keep.iter();
    graph.node.retain(|_| *k.next().unwrap());
    graph.initializer.retain(|t| live.contains(&t.name));
}

/// Run every fusion pass over `model` (a float32 graph written by `motionrt export`).
pub fn fuse(model: &mut ModelProto) -> Result<FusionReport, EngineError> {
    let Some(graph) = model.graph.as_ref() else {
        return Err(EngineError::Graph("the model has no graph".into()));
    };
    if graph
        .initializer
        .iter()
        .any(|t| t.data_type == TensorProtoDataType::Float16 as i32)
    {
        return Err(EngineError::Graph(
            "float16 weights: build from the float32 export (the builder converts weights to float16 itself)".into(),
        ));
    }
    let mut report = FusionReport {
        nodes_before: graph.node.len(),
        ..Default::default()
    };
    // GEGLU before Linear: the feed-forward's first Linear ends in the Split GEGLU reads.
    let passes: [Pass; 4] = [group_norm, geglu, attention, linear];
    for pass in passes {
        run_pass(model, pass, &mut report);
    }
    let graph = model.graph.as_ref().expect("checked above");
    report.nodes_after = graph.node.len();
    report.ops_after = motionrt_onnx::summarize(model).op_counts;
    if !model
        .opset_import
        .iter()
        .any(|o| o.domain == motionrt_kernels::DOMAIN)
        && graph
            .node
            .iter()
            .any(|n| n.domain == motionrt_kernels::DOMAIN)
    {
        model.opset_import.push(OperatorSetIdProto {
            domain: motionrt_kernels::DOMAIN.into(),
            version: 1,
        });
    }
    Ok(report)
}
