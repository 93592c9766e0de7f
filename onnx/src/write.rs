//! Writing models: the protobuf, and weights appended to an external data file.

use std::fs::File;
use std::io::{BufWriter, Seek, Write};
use std::path::{Path, PathBuf};

use prost::Message;

use super::proto::{
    DataLocation, ModelProto, StringStringEntryProto, TensorProto, TensorProtoDataType,
};
use crate::{OnnxError, Result};

/// Protobuf messages cannot exceed 2 GiB.
const PROTOBUF_LIMIT: usize = (1 << 31) - 1;

/// Encode and write `model` to `path`.
pub fn write_model(model: &ModelProto, path: &Path) -> Result<()> {
    let len = model.encoded_len();
    if len > PROTOBUF_LIMIT {
        return Err(OnnxError::Invalid {
            path: path.to_path_buf(),
            reason: format!("the model encodes to {len} bytes, over protobuf's 2 GiB limit: store the weights as external data"),
        });
    }
    let mut buf = Vec::with_capacity(len);
    model.encode(&mut buf).map_err(|e| OnnxError::Invalid {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let mut f = File::create(path).map_err(|e| OnnxError::io(path, e))?;
    f.write_all(&buf)
        .and_then(|_| f.sync_all())
        .map_err(|e| OnnxError::io(path, e))
}

/// Appends tensor data to an external data file, 64-byte aligned, returning the initializer
/// that points at it (`data_location = EXTERNAL`, `location`/`offset`/`length`).
pub struct ExternalDataWriter {
    path: PathBuf,
    location: String,
    out: BufWriter<File>,
    offset: u64,
}

impl ExternalDataWriter {
    /// `location`: the file name as the `.onnx` file refers to it (relative to its folder).
    pub fn create(data_path: &Path, location: &str) -> Result<Self> {
        let f = File::create(data_path).map_err(|e| OnnxError::io(data_path, e))?;
        Ok(Self {
            path: data_path.to_path_buf(),
            location: location.into(),
            out: BufWriter::with_capacity(1 << 22, f),
            offset: 0,
        })
    }

    pub fn append(
        &mut self,
        name: &str,
        data_type: TensorProtoDataType,
        dims: &[i64],
        bytes: &[u8],
    ) -> Result<TensorProto> {
        let pad = (64 - self.offset % 64) % 64;
        let write = |out: &mut BufWriter<File>| -> std::io::Result<()> {
            out.write_all(&[0u8; 64][..pad as usize])?;
            out.write_all(bytes)
        };
        write(&mut self.out).map_err(|e| OnnxError::io(&self.path, e))?;
        let start = self.offset + pad;
        self.offset = start + bytes.len() as u64;
        let entry = |k: &str, v: String| StringStringEntryProto {
            key: k.into(),
            value: v,
        };
        Ok(TensorProto {
            name: name.into(),
            dims: dims.to_vec(),
            data_type: data_type as i32,
            data_location: DataLocation::External as i32,
            external_data: vec![
                entry("location", self.location.clone()),
                entry("offset", start.to_string()),
                entry("length", bytes.len().to_string()),
            ],
            ..Default::default()
        })
    }

    /// Flush and fsync; returns the bytes written.
    pub fn finish(mut self) -> Result<u64> {
        self.out.flush().map_err(|e| OnnxError::io(&self.path, e))?;
        let f = self.out.get_mut();
        let end = f
            .stream_position()
            .map_err(|e| OnnxError::io(&self.path, e))?;
        f.sync_all().map_err(|e| OnnxError::io(&self.path, e))?;
        Ok(end)
    }
}
