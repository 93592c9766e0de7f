//! ONNX Runtime backend.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use ort::environment::Environment;
use ort::session::Session;
use ort::value::TensorRef;

use crate::{Result, RuntimeError};

/// A dense float32 tensor (row-major) moved in and out of sessions.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Tensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Self { shape, data }
    }
}

/// Output data of any element type motionrt handles (float16 arrives widened to float32);
/// others are named, not converted.
#[derive(Debug, Clone, PartialEq)]
pub enum OutputData {
    F32(Vec<f32>),
    I64(Vec<i64>),
    /// Another element type (bool, int32, float16 ...), by its name; not extracted.
    Unsupported(String),
}

/// One graph output.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: OutputData,
}

/// A borrowed graph input: shape and row-major data.
#[derive(Debug, Clone, Copy)]
pub enum Input<'a> {
    F32(&'a [usize], &'a [f32]),
    I64(&'a [usize], &'a [i64]),
}

fn check_len(path: &Path, name: &str, shape: &[usize], len: usize) -> Result<()> {
    let n: usize = shape.iter().product();
    if n != len {
        return Err(RuntimeError::Input {
            path: path.to_path_buf(),
            input: name.to_string(),
            message: format!("shape {shape:?} needs {n} values, got {len}"),
        });
    }
    Ok(())
}

/// Locate `libonnxruntime.so`: `ORT_DYLIB_PATH` first, then the `onnxruntime` Python package of
/// `python3` on the PATH (its `capi/` folder ships the library).
pub fn find_onnxruntime() -> Result<PathBuf> {
    let mut tried = Vec::new();
    if let Ok(p) = std::env::var("ORT_DYLIB_PATH") {
        if !p.is_empty() {
            let p = PathBuf::from(p);
            if p.is_file() {
                return Ok(p);
            }
            tried.push(format!("ORT_DYLIB_PATH={} does not exist", p.display()));
        }
    } else {
        tried.push("ORT_DYLIB_PATH is unset".into());
    }
    for py in ["python3", "python"] {
        let out = Command::new(py)
            .args([
                "-c",
                "import onnxruntime, os; print(os.path.dirname(onnxruntime.__file__))",
            ])
            .output();
        match out {
            Ok(o) if o.status.success() => {
                let dir = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()).join("capi");
                if let Some(lib) = newest_lib(&dir) {
                    return Ok(lib);
                }
                tried.push(format!("no libonnxruntime.so* in {}", dir.display()));
            }
            Ok(_) => tried.push(format!("`{py}` has no onnxruntime package")),
            Err(_) => tried.push(format!("no `{py}` on the PATH")),
        }
    }
    Err(RuntimeError::OrtNotFound {
        tried: tried.join("; "),
    })
}

fn newest_lib(dir: &Path) -> Option<PathBuf> {
    let mut libs: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libonnxruntime.so"))
        })
        .collect();
    // Prefer the versioned file (`libonnxruntime.so.1.32.0`) over a bare symlink.
    libs.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    libs.into_iter().next()
}

/// Why ONNX Runtime cannot be used, kept for every later session.
enum LoadFailure {
    /// What was tried.
    NotFound(String),
    /// The library found, and why it did not load.
    Load(PathBuf, String),
}

static ENV: OnceLock<std::result::Result<(PathBuf, Environment), LoadFailure>> = OnceLock::new();

/// The process-wide ONNX Runtime environment, loading the library on first use.
fn environment() -> Result<&'static Environment> {
    let r = ENV.get_or_init(|| {
        let path = find_onnxruntime().map_err(|e| match e {
            RuntimeError::OrtNotFound { tried } => LoadFailure::NotFound(tried),
            e => LoadFailure::NotFound(e.to_string()),
        })?;
        let failed = |e: &dyn std::fmt::Display| LoadFailure::Load(path.clone(), e.to_string());
        let builder = ort::init_from(&path).map_err(|e| failed(&e))?;
        let env = builder
            .with_name("motionrt")
            .build()
            .map_err(|e| failed(&e))?;
        // a failing run's error comes back through the API and is reported with the graph's
        // name; ONNX Runtime's own log line of it (in colour, before ours) only repeats it
        env.set_log_level(ort::logging::LogLevel::Fatal);
        Ok((path, env))
    });
    match r {
        Ok((_, env)) => Ok(env),
        Err(LoadFailure::NotFound(tried)) => Err(RuntimeError::OrtNotFound {
            tried: tried.clone(),
        }),
        Err(LoadFailure::Load(path, message)) => Err(RuntimeError::OrtLoad {
            path: path.clone(),
            message: message.clone(),
        }),
    }
}

/// Find and load ONNX Runtime as a session would (`motionrt probe`): its version, or why it
/// cannot be used (not found; not a library; older than the oldest version `ort` accepts).
pub fn load_onnxruntime() -> Result<String> {
    environment()?;
    Ok(backend_version().map_or_else(|| "unknown".into(), |v| v.0))
}

/// The loaded ONNX Runtime: `(version, build info)`, `None` before the first session loads.
/// The version comes from the library's file name (`libonnxruntime.so.1.32.0`) or else the
/// build info (`git-branch=rel-1.32.0`).
pub fn backend_version() -> Option<(String, String)> {
    let (path, _) = ENV.get()?.as_ref().ok()?;
    let info = ort::info().to_string();
    let from_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("libonnxruntime.so."))
        .filter(|v| !v.is_empty())
        .map(str::to_string);
    let from_info = info
        .split("rel-")
        .nth(1)
        .map(|v| v.split([',', ' ']).next().unwrap_or(v).to_string());
    Some((
        from_name.or(from_info).unwrap_or_else(|| "unknown".into()),
        info,
    ))
}

/// Session settings.
#[derive(Debug, Clone, Default)]
pub struct SessionOptions {
    /// Threads within an operator; 0 lets ONNX Runtime choose.
    pub intra_threads: usize,
}

impl SessionOptions {
    #[must_use]
    pub fn with_intra_threads(mut self, n: usize) -> Self {
        self.intra_threads = n;
        self
    }
}

/// An ONNX Runtime session on the CPU.
pub struct OrtSession {
    path: PathBuf,
    session: Session,
}

impl OrtSession {
    pub fn load(path: &Path, opts: &SessionOptions) -> Result<Self> {
        let env = environment()?;
        let err = |e: String| RuntimeError::Session {
            path: path.to_path_buf(),
            message: e,
        };
        let mut b = Session::builder(env).map_err(|e| err(e.to_string()))?;
        // motionrt's own operators, for graphs exported with --fused-attention
        let ops = crate::custom_ops::domain()
            .map_err(|e| err(format!("registering com.motionrt operators: {e}")))?;
        b = b.with_operators(ops).map_err(|e| err(e.to_string()))?;
        if opts.intra_threads > 0 {
            b = b
                .with_intra_threads(opts.intra_threads)
                .map_err(|e| err(e.to_string()))?;
        }
        // ONNX Runtime adds custom-op domains to a process-wide table without a lock (two
        // sessions created at once fail with "domain already exist"): create one at a time.
        static CREATE: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let session = {
            let _guard = CREATE.lock().unwrap_or_else(|p| p.into_inner());
            b.commit_from_file(path).map_err(|e| err(e.to_string()))?
        };
        Ok(Self {
            path: path.to_path_buf(),
            session,
        })
    }

    pub fn input_names(&self) -> Vec<String> {
        self.session
            .inputs()
            .iter()
            .map(|o| o.name().to_string())
            .collect()
    }

    pub fn output_names(&self) -> Vec<String> {
        self.session
            .outputs()
            .iter()
            .map(|o| o.name().to_string())
            .collect()
    }

    /// Run with float32 inputs by name; returns every output (float32) by name, in graph order.
    pub fn run(&mut self, inputs: &[(&str, &Tensor)]) -> Result<Vec<(String, Tensor)>> {
        let feeds: Vec<(&str, Input<'_>)> = inputs
            .iter()
            .map(|(n, t)| (*n, Input::F32(&t.shape, &t.data)))
            .collect();
        self.run_with(&feeds)
    }

    /// Run with borrowed inputs (no copy into ONNX Runtime); returns every output (float32) by
    /// name, in graph order.
    pub fn run_with(&mut self, inputs: &[(&str, Input<'_>)]) -> Result<Vec<(String, Tensor)>> {
        let path = self.path.clone();
        self.run_outputs(inputs)?
            .into_iter()
            .map(|o| match o.data {
                OutputData::F32(data) => Ok((o.name, Tensor::new(o.shape, data))),
                OutputData::I64(_) => Err(RuntimeError::Session {
                    path: path.clone(),
                    message: format!("output `{}`: int64, expected float32", o.name),
                }),
                OutputData::Unsupported(t) => Err(RuntimeError::Session {
                    path: path.clone(),
                    message: format!("output `{}`: {t}, expected float32", o.name),
                }),
            })
            .collect()
    }

    /// Run with borrowed inputs; returns every output by name, in graph order, float32 and
    /// int64 extracted, other element types named.
    pub fn run_outputs(&mut self, inputs: &[(&str, Input<'_>)]) -> Result<Vec<Output>> {
        let expected = self.input_names();
        for name in &expected {
            if !inputs.iter().any(|(n, _)| n == name) {
                return Err(RuntimeError::Input {
                    path: self.path.clone(),
                    input: name.clone(),
                    message: format!("missing (the graph takes {})", expected.join(", ")),
                });
            }
        }
        let mut feeds: Vec<(
            std::borrow::Cow<'_, str>,
            ort::session::SessionInputValue<'_>,
        )> = Vec::new();
        for (name, t) in inputs {
            if !expected.iter().any(|e| e == name) {
                return Err(RuntimeError::Input {
                    path: self.path.clone(),
                    input: name.to_string(),
                    message: format!(
                        "not an input of this graph (it takes {})",
                        expected.join(", ")
                    ),
                });
            }
            let bad = |e: ort::Error| RuntimeError::Input {
                path: self.path.clone(),
                input: name.to_string(),
                message: e.to_string(),
            };
            let v: ort::session::SessionInputValue<'_> = match *t {
                Input::F32(shape, data) => {
                    check_len(&self.path, name, shape, data.len())?;
                    TensorRef::from_array_view((shape, data))
                        .map_err(bad)?
                        .into()
                }
                Input::I64(shape, data) => {
                    check_len(&self.path, name, shape, data.len())?;
                    TensorRef::from_array_view((shape, data))
                        .map_err(bad)?
                        .into()
                }
            };
            feeds.push((std::borrow::Cow::Owned(name.to_string()), v));
        }
        let out_names = self.output_names();
        let path = self.path.clone();
        let outputs = self.session.run(feeds).map_err(|e| RuntimeError::Session {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let mut result = Vec::new();
        for name in out_names {
            let v = &outputs[name.as_str()];
            let (shape, data) = if let Ok((shape, data)) = v.try_extract_tensor::<f32>() {
                (shape.to_vec(), OutputData::F32(data.to_vec()))
            } else if let Ok((shape, data)) = v.try_extract_tensor::<i64>() {
                (shape.to_vec(), OutputData::I64(data.to_vec()))
            } else if let Ok((shape, data)) = v.try_extract_tensor::<half::f16>() {
                // fp16 graphs' tensors, widened (exactly) for comparison
                (
                    shape.to_vec(),
                    OutputData::F32(data.iter().map(|x| x.to_f32()).collect()),
                )
            } else {
                let shape = v
                    .dtype()
                    .tensor_shape()
                    .map(|s| s.to_vec())
                    .unwrap_or_default();
                (shape, OutputData::Unsupported(format!("{:?}", v.dtype())))
            };
            let shape: Vec<usize> = shape.iter().map(|&d| d.max(0) as usize).collect();
            result.push(Output { name, shape, data });
        }
        Ok(result)
    }
}
