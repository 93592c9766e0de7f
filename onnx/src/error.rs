//! Errors from reading and writing ONNX files; each names the file.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

pub type Result<T, E = OnnxError> = std::result::Result<T, E>;

impl OnnxError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}
