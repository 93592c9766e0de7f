//! motionrt-export: turns AnimateDiff-family checkpoints into ONNX graphs.
//!
//! Flow: [`source`] opens the inputs and maps their keys onto diffusers names ([`remap`]),
//! [`config`] reads or infers the architecture, [`graph`] builds the ONNX graph requesting each
//! weight by name and shape, and [`export`] validates every weight before streaming them into
//! the output.

pub mod checkpoint;
pub mod components;
pub mod config;
pub mod error;
pub mod export;
pub mod graph;
pub mod inspect;
pub use motionrt_onnx as onnx;
pub mod remap;
pub mod source;
pub mod synthetic;
pub mod tensor;

pub use checkpoint::{Checkpoint, Format};
pub use error::{ExportError, Result};
pub use tensor::{DType, TensorMeta};
