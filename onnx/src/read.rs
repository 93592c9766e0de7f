//! Reading models and summarising them for `motionrt inspect`.

use std::collections::BTreeMap;
use std::path::Path;

use prost::Message;
use serde::Serialize;

use super::proto::{
    DataLocation, DimensionValue, ModelProto, TensorProtoDataType, TypeValue, ValueInfoProto,
};
use crate::{OnnxError, Result};

/// Decode an ONNX file (the protobuf only; external data is not read).
pub fn load_model(path: &Path) -> Result<ModelProto> {
    let bytes = std::fs::read(path).map_err(|e| OnnxError::io(path, e))?;
    ModelProto::decode(bytes.as_slice()).map_err(|e| OnnxError::Invalid {
        path: path.to_path_buf(),
        reason: format!("not an ONNX model: protobuf decode failed: {e}"),
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct IoInfo {
    pub name: String,
    pub elem_type: String,
    /// Fixed sizes as numbers in text ("4"), symbolic ones by name ("B"), unknown as "?".
    pub dims: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct OnnxSummary {
    pub ir_version: i64,
    pub producer: String,
    pub opsets: Vec<(String, i64)>,
    pub inputs: Vec<IoInfo>,
    pub outputs: Vec<IoInfo>,
    pub node_count: usize,
    /// Op type → count; ops of non-default domains as `domain::Op`.
    pub op_counts: BTreeMap<String, usize>,
    pub initializer_count: usize,
    pub parameter_count: u64,
    pub external_data_files: Vec<String>,
    pub metadata: Vec<(String, String)>,
}

fn elem_name(t: i32) -> String {
    TensorProtoDataType::try_from(t)
        .map(|d| match d {
            TensorProtoDataType::Float => "float".to_string(),
            TensorProtoDataType::Float16 => "float16".to_string(),
            TensorProtoDataType::Bfloat16 => "bfloat16".to_string(),
            TensorProtoDataType::Double => "double".to_string(),
            other => format!("{other:?}").to_lowercase(),
        })
        .unwrap_or_else(|_| format!("type{t}"))
}

fn io_info(v: &ValueInfoProto) -> IoInfo {
    let (elem_type, dims) = match v.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(TypeValue::TensorType(t)) => (
            elem_name(t.elem_type),
            t.shape
                .as_ref()
                .map(|s| {
                    s.dim
                        .iter()
                        .map(|d| match &d.value {
                            Some(DimensionValue::DimValue(v)) => v.to_string(),
                            Some(DimensionValue::DimParam(p)) => p.clone(),
                            None => "?".into(),
                        })
                        .collect()
                })
                .unwrap_or_default(),
        ),
        None => ("?".into(), vec![]),
    };
    IoInfo {
        name: v.name.clone(),
        elem_type,
        dims,
    }
}

pub fn summarize(model: &ModelProto) -> OnnxSummary {
    let empty = Default::default();
    let g = model.graph.as_ref().unwrap_or(&empty);
    let mut op_counts = BTreeMap::new();
    for n in &g.node {
        let key = if n.domain.is_empty() || n.domain == "ai.onnx" {
            n.op_type.clone()
        } else {
            format!("{}::{}", n.domain, n.op_type)
        };
        *op_counts.entry(key).or_insert(0) += 1;
    }
    let mut external = Vec::new();
    let mut params = 0u64;
    for t in &g.initializer {
        params += t.dims.iter().product::<i64>().max(0) as u64;
        if t.data_location == DataLocation::External as i32 {
            if let Some(loc) = t.external_data.iter().find(|e| e.key == "location") {
                if !external.contains(&loc.value) {
                    external.push(loc.value.clone());
                }
            }
        }
    }
    OnnxSummary {
        ir_version: model.ir_version,
        producer: format!("{} {}", model.producer_name, model.producer_version)
            .trim()
            .to_string(),
        opsets: model
            .opset_import
            .iter()
            .map(|o| {
                (
                    if o.domain.is_empty() {
                        "ai.onnx".into()
                    } else {
                        o.domain.clone()
                    },
                    o.version,
                )
            })
            .collect(),
        inputs: g.input.iter().map(io_info).collect(),
        outputs: g.output.iter().map(io_info).collect(),
        node_count: g.node.len(),
        op_counts,
        initializer_count: g.initializer.len(),
        parameter_count: params,
        external_data_files: external,
        metadata: model
            .metadata_props
            .iter()
            .map(|e| (e.key.clone(), e.value.clone()))
            .collect(),
    }
}

impl std::fmt::Display for OnnxSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "ONNX model (IR {}, producer {})",
            self.ir_version, self.producer
        )?;
        let ops: Vec<String> = self
            .opsets
            .iter()
            .map(|(d, v)| format!("{d} {v}"))
            .collect();
        writeln!(f, "  opsets:       {}", ops.join(", "))?;
        for (label, list) in [("input", &self.inputs), ("output", &self.outputs)] {
            for io in list {
                writeln!(
                    f,
                    "  {label:<7}       {} {}[{}]",
                    io.name,
                    io.elem_type,
                    io.dims.join(", ")
                )?;
            }
        }
        writeln!(f, "  nodes:        {}", self.node_count)?;
        writeln!(
            f,
            "  initializers: {} ({:.1} M values)",
            self.initializer_count,
            self.parameter_count as f64 / 1e6
        )?;
        if !self.external_data_files.is_empty() {
            writeln!(f, "  weights in:   {}", self.external_data_files.join(", "))?;
        }
        for (k, v) in &self.metadata {
            writeln!(f, "  {k}: {v}")?;
        }
        writeln!(f, "  ops:")?;
        let mut by_count: Vec<_> = self.op_counts.iter().collect();
        by_count.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        for (op, n) in by_count {
            writeln!(f, "    {op:<24} {n}")?;
        }
        Ok(())
    }
}
