//! motionrt-onnx: ONNX protobuf messages, constructors, the model writer (with external data) and the reader.

pub mod error;
pub mod proto;
mod read;
mod write;

pub use error::{OnnxError, Result};

pub use read::{load_model, summarize, IoInfo, OnnxSummary};
pub use write::{write_model, ExternalDataWriter};

use proto::{
    AttributeProto, AttributeType, Dimension, DimensionValue, TensorProto, TensorProtoDataType,
    TensorShapeProto, TypeProto, TypeProtoTensor, TypeValue, ValueInfoProto,
};

pub fn attr_int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        i: v,
        r#type: AttributeType::Int as i32,
        ..Default::default()
    }
}

pub fn attr_ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        ints: v.to_vec(),
        r#type: AttributeType::Ints as i32,
        ..Default::default()
    }
}

pub fn attr_float(name: &str, v: f32) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        f: v,
        r#type: AttributeType::Float as i32,
        ..Default::default()
    }
}

pub fn attr_floats(name: &str, v: &[f32]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        floats: v.to_vec(),
        r#type: AttributeType::Floats as i32,
        ..Default::default()
    }
}

pub fn attr_string(name: &str, v: &str) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        s: v.as_bytes().to_vec(),
        r#type: AttributeType::String as i32,
        ..Default::default()
    }
}

pub fn attr_tensor(name: &str, t: TensorProto) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        t: Some(t),
        r#type: AttributeType::Tensor as i32,
        ..Default::default()
    }
}

fn raw_tensor(name: &str, dims: &[i64], dt: TensorProtoDataType, raw: Vec<u8>) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: dt as i32,
        raw_data: raw,
        ..Default::default()
    }
}

/// A float32 tensor (little-endian raw data).
pub fn tensor_f32(name: &str, dims: &[i64], data: &[f32]) -> TensorProto {
    raw_tensor(
        name,
        dims,
        TensorProtoDataType::Float,
        data.iter().flat_map(|v| v.to_le_bytes()).collect(),
    )
}

/// A float16 tensor converted from float32 values (round to nearest even).
pub fn tensor_f16(name: &str, dims: &[i64], data: &[f32]) -> TensorProto {
    raw_tensor(
        name,
        dims,
        TensorProtoDataType::Float16,
        data.iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect(),
    )
}

pub fn tensor_i64(name: &str, dims: &[i64], data: &[i64]) -> TensorProto {
    raw_tensor(
        name,
        dims,
        TensorProtoDataType::Int64,
        data.iter().flat_map(|v| v.to_le_bytes()).collect(),
    )
}

/// A graph input/output dimension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dim {
    Fixed(i64),
    Symbolic(String),
}

pub fn value_info(name: &str, elem_type: TensorProtoDataType, dims: &[Dim]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                Dim::Fixed(v) => DimensionValue::DimValue(*v),
                Dim::Symbolic(s) => DimensionValue::DimParam(s.clone()),
            }),
            denotation: String::new(),
        })
        .collect();
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(TypeValue::TensorType(TypeProtoTensor {
                elem_type: elem_type as i32,
                shape: Some(TensorShapeProto { dim }),
            })),
            denotation: String::new(),
        }),
        doc_string: String::new(),
    }
}
