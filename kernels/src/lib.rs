//! motionrt-kernels: the custom operators of the `com.motionrt` ONNX domain (schemas in
//! `docs/operators.md`), with CPU implementations and their float64 references. No model
//! knowledge lives here.

pub mod attention;
pub mod cuda;
pub mod emu;
pub mod fused;
pub mod gpu;
pub mod probe;
pub mod unfinished;
pub mod winograd;

pub use attention::{Attention, KernelError, SparseCausal};

/// The ONNX domain of motionrt's operators.
pub const DOMAIN: &str = "com.motionrt";
