//! The exporter's error type. Every variant names the file (and the tensor or key, where one is
//! involved) and what was expected, so a user can act on the message alone.

use std::path::PathBuf;

/// Errors from reading checkpoints, resolving models and writing graphs.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The file's bytes do not form a valid file of the format it claims to be.
    #[error("{path}: malformed {format} file: {reason}")]
    Malformed {
        path: PathBuf,
        format: &'static str,
        reason: String,
    },

    /// The file is of no format motionrt reads.
    #[error("{path}: unknown checkpoint format ({reason}); expected .safetensors, a PyTorch zip checkpoint (.ckpt/.pt/.pth/.bin), or a diffusers model folder")]
    UnknownFormat { path: PathBuf, reason: String },

    /// A pickle asked for a callable outside the tensor-rebuilding allow-list. Nothing was run.
    #[error("{path}: refusing to load pickle: it references `{global}`, which is not a tensor or container type (loading it would execute code); only tensors, dicts, lists and tuples are accepted")]
    UnsafePickle { path: PathBuf, global: String },

    #[error("{path}: tensor `{tensor}` is missing (expected for {expected_for})")]
    MissingTensor {
        path: PathBuf,
        tensor: String,
        expected_for: String,
    },

    #[error("{path}: tensor `{tensor}` has shape {found:?}, expected {expected:?}{hint}")]
    ShapeMismatch {
        path: PathBuf,
        tensor: String,
        found: Vec<usize>,
        expected: Vec<usize>,
        hint: String,
    },

    #[error("{path}: tensor `{tensor}` has dtype {found}, expected one of {expected}")]
    UnsupportedDtype {
        path: PathBuf,
        tensor: String,
        found: String,
        expected: &'static str,
    },

    /// The inputs are individually valid but do not belong together, or are not a model we know.
    #[error("{path}: {reason}")]
    Model { path: PathBuf, reason: String },

    #[error("{path}: invalid config: {reason}")]
    Config { path: PathBuf, reason: String },

    #[error("{path}: {reason}")]
    Onnx { path: PathBuf, reason: String },
}

pub type Result<T, E = ExportError> = std::result::Result<T, E>;

impl From<motionrt_onnx::OnnxError> for ExportError {
    fn from(e: motionrt_onnx::OnnxError) -> Self {
        match e {
            motionrt_onnx::OnnxError::Io { path, source } => Self::Io { path, source },
            motionrt_onnx::OnnxError::Invalid { path, reason } => Self::Onnx { path, reason },
        }
    }
}

impl ExportError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn malformed(
        path: impl Into<PathBuf>,
        format: &'static str,
        reason: impl Into<String>,
    ) -> Self {
        Self::Malformed {
            path: path.into(),
            format,
            reason: reason.into(),
        }
    }

    pub(crate) fn model(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Self::Model {
            path: path.into(),
            reason: reason.into(),
        }
    }
}
