//! The engine builder's graph side: what `motionrt build` does before any GPU work. It reads the
//! float32 graphs of a `motionrt export` folder and applies the fusions the native CUDA engine
//! executes as single kernels ([`fuse`]). `--plan-only` writes the fused graphs as ONNX with
//! their weights (the fused operators run on ONNX Runtime through the CPU implementations in
//! `motionrt-kernels`), which is how the fusions are verified without a GPU: the fused graph
//! must compute what the exported graph computes.
//!
//! The native engine itself: [`program`] compiles a fused graph for concrete shapes into device
//! steps and plans their memory; [`cpu_exec`] interprets a program on the CPU (how the compiler is
//! checked without a GPU); [`exec`] runs it on the GPU (cuBLAS, cuDNN, NVRTC kernels, CUDA
//! graphs); [`file`] builds, keys, writes and loads engine folders.

pub mod cpu_exec;
pub mod emulated;
pub mod exec;
pub mod file;
pub mod fuse;
pub mod launch;
pub mod localize;
pub mod program;
pub mod source;

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use motionrt_onnx::proto::{DataLocation, ModelProto, TensorProtoDataType};
use motionrt_onnx::{load_model, write_model, ExternalDataWriter};
use serde::Serialize;

pub use fuse::{fuse, FusionReport};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    Graph(String),

    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },

    #[error(transparent)]
    Onnx(#[from] motionrt_onnx::OnnxError),
}

fn file_err(path: &Path, message: impl std::fmt::Display) -> EngineError {
    EngineError::File {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

/// One graph's plan.
#[derive(Debug, Clone, Serialize)]
pub struct GraphPlan {
    pub graph: String,
    pub source: PathBuf,
    pub fusions: FusionReport,
}

/// Fuse `src` (an exported float32 graph) and write the result to `dst` (`{dst}.data` beside it
/// when the source keeps its weights in external data). Writes to temporary names, then renames.
pub fn plan_graph(src: &Path, dst: &Path) -> Result<FusionReport, EngineError> {
    let mut model = load_model(src)?;
    let report = fuse(&mut model).map_err(|e| match e {
        EngineError::Graph(m) => file_err(src, m),
        e => e,
    })?;
    let dir = dst
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = dst
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| file_err(dst, "not a file name"))?;
    let tmp = dir.join(format!(".{name}.partial"));
    let data_name = format!("{name}.data");
    let tmp_data = dir.join(format!(".{data_name}.partial"));
    let _unfinished = [&tmp, &tmp_data].map(motionrt_kernels::unfinished::register);
    let result = copy_weights(&mut model, src, &tmp_data, &data_name).and_then(|external| {
        write_model(&model, &tmp)?;
        motionrt_kernels::unfinished::commit(|| {
            if external {
                std::fs::rename(&tmp_data, dir.join(&data_name))
                    .map_err(|e| file_err(&tmp_data, e))?;
            }
            std::fs::rename(&tmp, dst).map_err(|e| file_err(&tmp, e))
        })
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
        let _ = std::fs::remove_file(&tmp_data);
    }
    result.map(|_| report)
}

/// Rewrite the external-data initializers of `model` (loaded from `src`) to point into a new
/// data file `data_path` holding only the weights the fused graph still reads. Returns whether
/// there were any.
fn copy_weights(
    model: &mut ModelProto,
    src: &Path,
    data_path: &Path,
    location: &str,
) -> Result<bool, EngineError> {
    let graph = model.graph.as_mut().expect("fused graphs have a graph");
    if !graph
        .initializer
        .iter()
        .any(|t| t.data_location == DataLocation::External as i32)
    {
        return Ok(false);
    }
    let src_dir = src.parent().unwrap_or(Path::new("."));
    let mut writer = ExternalDataWriter::create(data_path, location)?;
    let mut open: Option<(String, std::fs::File)> = None;
    let mut buf = Vec::new();
    for t in graph.initializer.iter_mut() {
        if t.data_location != DataLocation::External as i32 {
            continue;
        }
        let get = |k: &str| {
            t.external_data
                .iter()
                .find(|e| e.key == k)
                .map(|e| e.value.clone())
        };
        let loc = get("location")
            .ok_or_else(|| file_err(src, format!("initializer {}: no location", t.name)))?;
        let offset: u64 = get("offset")
            .map_or(Ok(0), |v| v.parse())
            .map_err(|e| file_err(src, format!("initializer {}: bad offset: {e}", t.name)))?;
        let length: usize = get("length")
            .ok_or_else(|| file_err(src, format!("initializer {}: no length", t.name)))?
            .parse()
            .map_err(|e| file_err(src, format!("initializer {}: bad length: {e}", t.name)))?;
        let path = src_dir.join(&loc);
        if open.as_ref().map(|o| &o.0) != Some(&loc) {
            let f = std::fs::File::open(&path).map_err(|e| file_err(&path, e))?;
            open = Some((loc.clone(), f));
        }
        let f = &mut open.as_mut().unwrap().1;
        buf.resize(length, 0);
        f.seek(SeekFrom::Start(offset))
            .and_then(|_| f.read_exact(&mut buf))
            .map_err(|e| {
                file_err(
                    &path,
                    format!("initializer {}: {length} bytes at {offset}: {e}", t.name),
                )
            })?;
        let dt = TensorProtoDataType::try_from(t.data_type)
            .map_err(|_| file_err(src, format!("initializer {}: unknown data type", t.name)))?;
        *t = writer.append(&t.name, dt, &t.dims, &buf)?;
    }
    writer.finish()?;
    Ok(true)
}
