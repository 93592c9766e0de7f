//! A small builder for ONNX graphs made of standard ops (opset 17).
//!
//! Parameters are requested by their diffusers tensor name with the shape the architecture
//! expects ([`GraphBuilder::param`]); the exporter later checks each against the checkpoint and
//! streams the data into the initializer of that name. Node names follow the module path
//! (`/down_blocks.0/resnets.1/conv1/Conv_12`) so a diverging tensor can be traced to its layer.

pub mod clip;
pub mod layers;
pub mod ops;
pub mod unet;
pub mod vae;

use std::collections::HashMap;

use crate::onnx::proto::{AttributeProto, NodeProto, TensorProto, TensorProtoDataType};
use crate::onnx::{tensor_f16, tensor_f32, tensor_i64};

/// Element type the graph computes in. Inputs and outputs are float32 either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    Fp32,
    Fp16,
}

impl Precision {
    pub fn onnx_type(self) -> TensorProtoDataType {
        match self {
            Precision::Fp32 => TensorProtoDataType::Float,
            Precision::Fp16 => TensorProtoDataType::Float16,
        }
    }

    pub fn bytes(self) -> usize {
        match self {
            Precision::Fp32 => 4,
            Precision::Fp16 => 2,
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::Fp32 => "fp32",
            Precision::Fp16 => "fp16",
        })
    }
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fp32" => Ok(Precision::Fp32),
            "fp16" => Ok(Precision::Fp16),
            other => Err(format!(
                "unknown precision `{other}` (expected fp32 or fp16)"
            )),
        }
    }
}

/// Which `com.motionrt` operators replace standard-op subgraphs (both off: standard ops only,
/// `--portable`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Lowering {
    /// Motion-module / Tune-A-Video attention as `TemporalAttention` / `SparseCausalAttention`.
    pub fused_attention: bool,
    /// 3×3 stride-1 convolutions as Winograd F(2×2, 3×3) (`WinogradInput` → MatMul →
    /// `WinogradOutput`): a CPU optimisation, float32 only.
    pub winograd: bool,
}

/// How a checkpoint tensor is rewritten before it is stored as an initializer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transform {
    /// A `[O, C, 3, 3]` convolution weight stored as its Winograd F(2×2, 3×3) kernels
    /// `U = G·W·Gᵀ`, laid out `[16, O, C]` (`motionrt_kernels::winograd::weight_transform`).
    Winograd,
}

impl Transform {
    /// The suffix of the initializer's name.
    pub fn suffix(self) -> &'static str {
        match self {
            Transform::Winograd => "winograd",
        }
    }

    /// The stored shape for a checkpoint tensor of `shape`.
    pub fn stored_shape(self, shape: &[usize]) -> Vec<usize> {
        match self {
            Transform::Winograd => vec![16, shape[0], shape[1]],
        }
    }

    /// Rewrite the values (float32) of a checkpoint tensor of `shape`.
    pub fn apply(self, shape: &[usize], values: &[f32]) -> Vec<f32> {
        match self {
            Transform::Winograd => {
                motionrt_kernels::winograd::weight_transform(values, shape[0], shape[1])
                    .expect("shape checked against the checkpoint before writing")
            }
        }
    }
}

/// A weight the graph needs: its diffusers name and the shape the architecture expects (both
/// as in the checkpoint), and how it is rewritten for the graph, if it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Param {
    pub name: String,
    pub shape: Vec<usize>,
    pub transform: Option<Transform>,
}

impl Param {
    /// The initializer's name: the diffusers name, with `@{transform}` when rewritten.
    pub fn initializer(&self) -> String {
        match self.transform {
            None => self.name.clone(),
            Some(t) => format!("{}@{}", self.name, t.suffix()),
        }
    }

    /// The initializer's shape.
    pub fn stored_shape(&self) -> Vec<usize> {
        match self.transform {
            None => self.shape.clone(),
            Some(t) => t.stored_shape(&self.shape),
        }
    }
}

/// Accumulates nodes, small constants and parameter requests.
pub struct GraphBuilder {
    pub nodes: Vec<NodeProto>,
    pub consts: Vec<TensorProto>,
    pub params: Vec<Param>,
    param_index: HashMap<String, usize>,
    i64_consts: HashMap<Vec<i64>, String>,
    counter: usize,
    /// Nodes per (scope, op type): node names count within their scope, so graphs that differ
    /// only in some ops (an fp16 export's Casts, a fused attention) keep the other names equal
    /// and `motionrt compare --mark-all` can match their tensors.
    op_counts: HashMap<(String, String), usize>,
    scope: Vec<String>,
    pub precision: Precision,
    /// Emit motion-module attention as `com.motionrt.TemporalAttention` (`--fused-attention`).
    pub fused_attention: bool,
    /// Emit 3×3 stride-1 convolutions as Winograd F(2×2, 3×3) (`--winograd`).
    pub winograd: bool,
}

impl GraphBuilder {
    pub fn new(precision: Precision) -> Self {
        Self {
            nodes: Vec::new(),
            consts: Vec::new(),
            params: Vec::new(),
            param_index: HashMap::new(),
            i64_consts: HashMap::new(),
            counter: 0,
            op_counts: HashMap::new(),
            scope: Vec::new(),
            precision,
            fused_attention: false,
            winograd: false,
        }
    }

    /// A builder that lowers as `lowering` says.
    pub fn with_lowering(precision: Precision, lowering: Lowering) -> Self {
        let mut g = Self::new(precision);
        g.fused_attention = lowering.fused_attention;
        g.winograd = lowering.winograd;
        g
    }

    /// Run `f` with `name` appended to the node-name scope.
    pub fn scoped<T>(&mut self, name: &str, f: impl FnOnce(&mut Self) -> T) -> T {
        self.scope.push(name.to_string());
        let out = f(self);
        self.scope.pop();
        out
    }

    fn fresh(&mut self, op: &str) -> String {
        let scope = self.scope.join("/");
        let k = self
            .op_counts
            .entry((scope.clone(), op.to_string()))
            .or_insert(0);
        let name = if scope.is_empty() {
            format!("/{op}_{k}")
        } else {
            format!("/{scope}/{op}_{k}")
        };
        *k += 1;
        name
    }

    /// Add a single-output node in the default domain; returns the output's name.
    pub fn op(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>) -> String {
        let name = self.fresh(op);
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![name.clone()],
            name: name.clone(),
            op_type: op.to_string(),
            attribute: attrs,
            ..Default::default()
        });
        name
    }

    /// Add a single-output node of another domain (`com.motionrt`); returns the output's name.
    pub fn op_domain(
        &mut self,
        domain: &str,
        op: &str,
        inputs: &[&str],
        attrs: Vec<AttributeProto>,
    ) -> String {
        let name = self.fresh(op);
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![name.clone()],
            name: name.clone(),
            op_type: op.to_string(),
            domain: domain.to_string(),
            attribute: attrs,
            ..Default::default()
        });
        name
    }

    /// Whether any node belongs to `domain`.
    pub fn uses_domain(&self, domain: &str) -> bool {
        self.nodes.iter().any(|n| n.domain == domain)
    }

    /// Add a node with `n` outputs.
    pub fn op_n(
        &mut self,
        op: &str,
        inputs: &[&str],
        attrs: Vec<AttributeProto>,
        n: usize,
    ) -> Vec<String> {
        let name = self.fresh(op);
        let outputs: Vec<String> = (0..n).map(|i| format!("{name}:{i}")).collect();
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.clone(),
            name,
            op_type: op.to_string(),
            attribute: attrs,
            ..Default::default()
        });
        outputs
    }

    /// Request a weight by diffusers name. Requesting the same name twice with the same shape
    /// returns the same initializer; with another shape it is a bug in the architecture code.
    pub fn param(&mut self, name: &str, shape: &[usize]) -> String {
        if let Some(&i) = self.param_index.get(name) {
            debug_assert_eq!(self.params[i].shape, shape, "param {name} requested twice");
            return name.to_string();
        }
        self.param_index.insert(name.to_string(), self.params.len());
        self.params.push(Param {
            name: name.to_string(),
            shape: shape.to_vec(),
            transform: None,
        });
        name.to_string()
    }

    /// Request a weight by diffusers name (checked against the checkpoint with `shape`) to be
    /// stored rewritten by `transform`; returns the initializer's name.
    pub fn param_transformed(
        &mut self,
        name: &str,
        shape: &[usize],
        transform: Transform,
    ) -> String {
        let p = Param {
            name: name.to_string(),
            shape: shape.to_vec(),
            transform: Some(transform),
        };
        let init = p.initializer();
        if self.param_index.contains_key(&init) {
            return init;
        }
        self.param_index.insert(init.clone(), self.params.len());
        self.params.push(p);
        init
    }

    /// A 1-D int64 constant (shapes, axes, indices); identical values share one initializer.
    pub fn i64s(&mut self, vals: &[i64]) -> String {
        if let Some(n) = self.i64_consts.get(vals) {
            return n.clone();
        }
        self.counter += 1;
        let name = format!("/const_i64_{}", self.counter);
        self.consts
            .push(tensor_i64(&name, &[vals.len() as i64], vals));
        self.i64_consts.insert(vals.to_vec(), name.clone());
        name
    }

    /// A float constant in the graph's compute precision.
    pub fn constf(&mut self, dims: &[i64], vals: &[f32]) -> String {
        self.counter += 1;
        let name = format!("/const_f_{}", self.counter);
        self.consts.push(match self.precision {
            Precision::Fp32 => tensor_f32(&name, dims, vals),
            Precision::Fp16 => tensor_f16(&name, dims, vals),
        });
        name
    }

    /// A float32 constant whatever the compute precision.
    pub fn const_f32(&mut self, dims: &[i64], vals: &[f32]) -> String {
        self.counter += 1;
        let name = format!("/const_f32_{}", self.counter);
        self.consts.push(tensor_f32(&name, dims, vals));
        name
    }

    // ---- thin op helpers -------------------------------------------------------------------

    pub fn shape(&mut self, x: &str) -> String {
        self.op("Shape", &[x], vec![])
    }

    /// `shape[i..i+1]` as a 1-D int64 tensor.
    pub fn dim(&mut self, shape: &str, i: i64) -> String {
        let s = self.i64s(&[i]);
        let e = self.i64s(&[i + 1]);
        self.op("Slice", &[shape, &s, &e], vec![])
    }

    pub fn concat(&mut self, parts: &[&str], axis: i64) -> String {
        self.op("Concat", parts, vec![crate::onnx::attr_int("axis", axis)])
    }

    pub fn reshape(&mut self, x: &str, shape: &str) -> String {
        self.op("Reshape", &[x, shape], vec![])
    }

    pub fn reshape_to(&mut self, x: &str, dims: &[i64]) -> String {
        let s = self.i64s(dims);
        self.reshape(x, &s)
    }

    pub fn transpose(&mut self, x: &str, perm: &[i64]) -> String {
        self.op(
            "Transpose",
            &[x],
            vec![crate::onnx::attr_ints("perm", perm)],
        )
    }

    pub fn add(&mut self, a: &str, b: &str) -> String {
        self.op("Add", &[a, b], vec![])
    }

    pub fn mul(&mut self, a: &str, b: &str) -> String {
        self.op("Mul", &[a, b], vec![])
    }

    pub fn matmul(&mut self, a: &str, b: &str) -> String {
        self.op("MatMul", &[a, b], vec![])
    }

    pub fn silu(&mut self, x: &str) -> String {
        let s = self.op("Sigmoid", &[x], vec![]);
        self.mul(x, &s)
    }

    pub fn unsqueeze(&mut self, x: &str, axes: &[i64]) -> String {
        let a = self.i64s(axes);
        self.op("Unsqueeze", &[x, &a], vec![])
    }

    pub fn cast(&mut self, x: &str, to: TensorProtoDataType) -> String {
        self.op("Cast", &[x], vec![crate::onnx::attr_int("to", to as i64)])
    }

    /// Cast to the compute precision (no node when it is already float32).
    pub fn to_compute(&mut self, x: &str) -> String {
        match self.precision {
            Precision::Fp32 => x.to_string(),
            Precision::Fp16 => self.cast(x, TensorProtoDataType::Float16),
        }
    }

    /// Cast from the compute precision to float32 (no node in fp32 graphs).
    pub fn to_f32(&mut self, x: &str) -> String {
        match self.precision {
            Precision::Fp32 => x.to_string(),
            Precision::Fp16 => self.cast(x, TensorProtoDataType::Float),
        }
    }

    /// Give the value `out` the graph-output name `name`: rename the last node's output when it
    /// produced `out`, else add an Identity node.
    pub fn name_output(&mut self, out: &str, name: &str) {
        match self.nodes.last_mut() {
            Some(last) if last.output.len() == 1 && last.output[0] == out => {
                last.output = vec![name.to_string()];
            }
            _ => {
                self.nodes.push(NodeProto {
                    input: vec![out.to_string()],
                    output: vec![name.to_string()],
                    name: format!("/output_{name}"),
                    op_type: "Identity".into(),
                    ..Default::default()
                });
            }
        }
    }
}
