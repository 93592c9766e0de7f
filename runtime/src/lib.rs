//! motionrt-runtime: runs exported graphs. For now: ONNX Runtime sessions through `ort` with the
//! library loaded at run time (`load-dynamic`), found via `ORT_DYLIB_PATH` or the `onnxruntime`
//! Python package.

pub mod bench;
pub mod compare;
mod custom_ops;
pub mod edit;
pub mod engine;
pub mod frame_stream;
pub mod frames;
pub mod npy;
mod ort_backend;
pub mod pipeline;
pub mod rng;
pub mod scheduler;
pub mod tokenizer;
pub mod video_in;

pub use compare::{error_stats, ErrorStats, Tolerance};
pub use ort_backend::{
    backend_version, find_onnxruntime, load_onnxruntime, Input, OrtSession, Output, OutputData,
    SessionOptions, Tensor,
};

use std::path::PathBuf;

/// Runtime errors. Each names the file or graph input involved.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("ONNX Runtime was not found ({tried}). Install it with `python3 -m pip install onnxruntime` (motionrt finds the library inside the Python package), or set ORT_DYLIB_PATH to libonnxruntime.so")]
    OrtNotFound { tried: String },

    #[error("ONNX Runtime library {path}: {message}")]
    OrtLoad { path: PathBuf, message: String },

    #[error("{path}: {message}")]
    Session { path: PathBuf, message: String },

    #[error("{path}: input `{input}`: {message}")]
    Input {
        path: PathBuf,
        input: String,
        message: String,
    },
}

pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;
