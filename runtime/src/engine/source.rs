//! Initializer values of an ONNX graph on disk: inline (`raw_data`, `float_data`, `int64_data`)
//! or in external data files beside the graph.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use motionrt_onnx::proto::{DataLocation, TensorProto, TensorProtoDataType};

use super::program::InitializerSource;
use super::EngineError;

/// Reads initializers of a graph stored in `dir` (external data paths are relative to it).
pub struct FileInitializers {
    dir: PathBuf,
    open: RefCell<HashMap<String, File>>,
}

impl FileInitializers {
    pub fn new(graph_path: &Path) -> Self {
        Self {
            dir: graph_path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
                .to_path_buf(),
            open: RefCell::new(HashMap::new()),
        }
    }

    /// The raw little-endian bytes of `t`.
    pub fn bytes(&self, t: &TensorProto) -> Result<Vec<u8>, EngineError> {
        if t.data_location != DataLocation::External as i32 {
            return Ok(t.raw_data.clone());
        }
        let get = |k: &str| {
            t.external_data
                .iter()
                .find(|e| e.key == k)
                .map(|e| e.value.clone())
        };
        let bad = |m: String| EngineError::File {
            path: self.dir.clone(),
            message: format!("initializer {}: {m}", t.name),
        };
        let loc = get("location").ok_or_else(|| bad("no location".into()))?;
        let offset: u64 = get("offset")
            .map_or(Ok(0), |v| v.parse())
            .map_err(|e| bad(format!("offset: {e}")))?;
        let length: usize = get("length")
            .ok_or_else(|| bad("no length".into()))?
            .parse()
            .map_err(|e| bad(format!("length: {e}")))?;
        let path = self.dir.join(&loc);
        let mut open = self.open.borrow_mut();
        if !open.contains_key(&loc) {
            let f = File::open(&path).map_err(|e| EngineError::File {
                path: path.clone(),
                message: e.to_string(),
            })?;
            open.insert(loc.clone(), f);
        }
        let f = open.get_mut(&loc).expect("just inserted");
        let mut buf = vec![0u8; length];
        f.seek(SeekFrom::Start(offset))
            .and_then(|_| f.read_exact(&mut buf))
            .map_err(|e| EngineError::File {
                path: path.clone(),
                message: format!("initializer {}: {length} bytes at {offset}: {e}", t.name),
            })?;
        Ok(buf)
    }
}

impl InitializerSource for FileInitializers {
    fn f32s(&self, t: &TensorProto) -> Result<Vec<f32>, EngineError> {
        if t.data_type != TensorProtoDataType::Float as i32 {
            return Err(EngineError::Graph(format!(
                "initializer {}: expected float32, found data type {}",
                t.name, t.data_type
            )));
        }
        if !t.float_data.is_empty() {
            return Ok(t.float_data.clone());
        }
        let b = self.bytes(t)?;
        Ok(b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    fn i64s(&self, t: &TensorProto) -> Result<Vec<i64>, EngineError> {
        if !t.int64_data.is_empty() {
            return Ok(t.int64_data.clone());
        }
        let b = self.bytes(t)?;
        Ok(b.chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect())
    }
}
