//! The CUDA sources of the operators (`kernels/cuda/*.cu`), compiled at run time with NVRTC
//! (through `cudarc`, loaded dynamically) and cached on disk by source hash, GPU architecture and
//! NVRTC version. Nothing here needs a GPU: NVRTC compiles for any architecture, so CI checks every
//! kernel for sm_80 and sm_90 without one.
//!
//! Finding NVRTC: `MOTIONRT_NVRTC` (the path of `libnvrtc.so.*`), else the `nvidia` Python
//! package of `MOTIONRT_PYTHON` / `python3` (the `nvidia-cuda-nvrtc` wheel, or PyTorch's), else the
//! system's library path. The library is probed before the first call, so a machine without it
//! gets an error that says how to install it, never a panic.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use sha2::{Digest, Sha256};

/// The prelude of every kernel source (`kernels/cuda/prelude.cuh`): all inline PTX and the CUDA
/// intrinsic wrappers, with a CPU emulation behind `MOTIONRT_EMU` ([`crate::emu`]). It is prepended
/// to each source before NVRTC compiles it ([`full_source`]).
pub const PRELUDE: &str = include_str!("../cuda/prelude.cuh");

/// The kernel sources: `(name, CUDA C++)`, each without the [`PRELUDE`]. The attention sources
/// hold `NAME_f32` and `NAME_f16` entry points; `engine_ops` holds the native engine's kernels
/// (`KERNEL_f32`, `KERNEL_f16`).
pub const SOURCES: &[(&str, &str)] = &[
    (
        "temporal_attention",
        include_str!("../cuda/temporal_attention.cu"),
    ),
    (
        "sparse_causal_attention",
        include_str!("../cuda/sparse_causal_attention.cu"),
    ),
    ("engine_ops", include_str!("../cuda/engine_ops.cu")),
];

#[derive(Debug, Clone, thiserror::Error)]
pub enum CudaError {
    #[error("NVRTC was not found ({tried}). Install it with `python3 -m pip install nvidia-cuda-nvrtc` (motionrt finds it inside the Python package) or set MOTIONRT_NVRTC to libnvrtc.so")]
    NvrtcNotFound { tried: String },
    #[error("{path}: {message}")]
    Load { path: PathBuf, message: String },
    #[error("kernels/cuda/{name}.cu for {arch}: NVRTC failed: {log}")]
    Compile {
        name: String,
        arch: String,
        log: String,
    },
    #[error("no kernel source named {0:?}")]
    UnknownKernel(String),
    #[error("kernel cache {path}: {message}")]
    Cache { path: PathBuf, message: String },
}

/// Libraries loaded by full path, kept for the life of the process so that NVRTC's own
/// `dlopen` of its builtins (and cudarc's of `libnvrtc.so.N`) find them by soname.
static PRELOADED: OnceLock<Result<Vec<libloading::Library>, CudaError>> = OnceLock::new();

fn python_nvidia_dirs() -> Vec<PathBuf> {
    let mut pythons: Vec<String> = std::env::var("MOTIONRT_PYTHON").into_iter().collect();
    pythons.push("python3".into());
    for py in pythons {
        let out = Command::new(&py)
            .args([
                "-c",
                "import nvidia, sys; print('\\n'.join(list(nvidia.__path__)))",
            ])
            .output();
        if let Ok(o) = out {
            if o.status.success() {
                return String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .map(PathBuf::from)
                    .collect();
            }
        }
    }
    Vec::new()
}

/// `libnvrtc.so.*` inside an `nvidia` package directory (`cu13/lib`, `cuda_nvrtc/lib`).
fn nvrtc_in(dir: &Path) -> Option<PathBuf> {
    for sub in ["cu13/lib", "cuda_nvrtc/lib", "cu12/lib"] {
        let lib = dir.join(sub);
        let Ok(rd) = std::fs::read_dir(&lib) else {
            continue;
        };
        let mut found: Vec<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("libnvrtc.so"))
            })
            .collect();
        found.sort();
        if let Some(p) = found.pop() {
            return Some(p);
        }
    }
    None
}

fn preload(lib: &Path) -> Result<Vec<libloading::Library>, CudaError> {
    let dir = lib.parent().unwrap_or(Path::new("."));
    let mut libs = Vec::new();
    // the builtins first: libnvrtc dlopens them by name when it compiles
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libnvrtc-builtins.so"))
            {
                // SAFETY: loading NVIDIA's library runs its initialisers, nothing else.
                if let Ok(l) = unsafe { libloading::Library::new(&p) } {
                    libs.push(l);
                }
            }
        }
    }
    // SAFETY: as above.
    let l = unsafe { libloading::Library::new(lib) }.map_err(|e| CudaError::Load {
        path: lib.to_path_buf(),
        message: e.to_string(),
    })?;
    libs.push(l);
    Ok(libs)
}

/// Make NVRTC loadable (once per process); an error says what was tried.
pub fn ensure_nvrtc() -> Result<(), CudaError> {
    PRELOADED
        .get_or_init(|| {
            let mut tried = Vec::new();
            let mut candidate = None;
            match std::env::var("MOTIONRT_NVRTC") {
                Ok(p) if !p.is_empty() => {
                    let p = PathBuf::from(p);
                    if p.is_file() {
                        candidate = Some(p);
                    } else {
                        tried.push(format!("MOTIONRT_NVRTC={} does not exist", p.display()));
                    }
                }
                _ => tried.push("MOTIONRT_NVRTC is unset".into()),
            }
            if candidate.is_none() {
                let dirs = python_nvidia_dirs();
                candidate = dirs.iter().find_map(|d| nvrtc_in(d));
                if candidate.is_none() {
                    tried.push(if dirs.is_empty() {
                        "no `nvidia` Python package".into()
                    } else {
                        format!(
                            "no libnvrtc.so in {}",
                            dirs.iter()
                                .map(|d| d.display().to_string())
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    });
                }
            }
            let libs = match candidate {
                Some(p) => preload(&p)?,
                None => Vec::new(),
            };
            // SAFETY: only tries dlopen on the candidate names.
            if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
                Ok(libs)
            } else {
                tried.push("none on the system library path".into());
                Err(CudaError::NvrtcNotFound {
                    tried: tried.join("; "),
                })
            }
        })
        .as_ref()
        .map(|_| ())
        .map_err(Clone::clone)
}

/// NVRTC's version `(major, minor)`.
pub fn nvrtc_version() -> Result<(i32, i32), CudaError> {
    ensure_nvrtc()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: NVRTC is loaded (ensure_nvrtc); the pointers are valid for the call.
    let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if r != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(CudaError::Compile {
            name: "-".into(),
            arch: "-".into(),
            log: format!("nvrtcVersion: {r:?}"),
        });
    }
    Ok((major, minor))
}

/// A compiled kernel module: PTX, and the machine code ptxas made of it for `arch` (what the
/// engine loads: CUDA's minor-version compatibility covers machine code from a newer CUDA 13
/// toolkit on an older CUDA 13 driver, but not PTX, which that driver's JIT refuses).
#[derive(Debug, Clone)]
pub struct Compiled {
    pub name: String,
    pub arch: String,
    pub ptx: String,
    /// The cubin (ELF) for `arch`.
    pub cubin: Vec<u8>,
    /// Loaded from the disk cache rather than compiled now.
    pub cached: bool,
    pub cache_path: Option<PathBuf>,
}

fn source(name: &str) -> Result<&'static str, CudaError> {
    SOURCES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, s)| *s)
        .ok_or_else(|| CudaError::UnknownKernel(name.into()))
}

/// NVRTC's options for `arch`: a real architecture (`sm_90`), so that NVRTC runs ptxas and a
/// cubin comes out with the PTX.
fn options(arch: &str) -> Vec<String> {
    vec!["--std=c++17".into(), format!("--gpu-architecture={arch}")]
}

/// What NVRTC compiles for the source `name`: the [`PRELUDE`], then the source with its own line
/// numbers (so NVRTC's messages point into `name.cu`).
pub fn full_source(name: &str, src: &str) -> String {
    format!("{PRELUDE}\n#line 1 \"{name}.cu\"\n{src}")
}

/// Compile `kernels/cuda/{name}.cu` for `arch` (`sm_80`, `sm_90`, ...), without the cache.
pub fn compile_uncached(name: &str, arch: &'static str) -> Result<Compiled, CudaError> {
    compile_source_uncached(name, source(name)?, arch)
}

/// Compile the CUDA source `src` (which relies on the [`PRELUDE`], prepended here) for `arch`,
/// without the cache; `name` labels it in errors. Tests use it for kernels outside [`SOURCES`].
pub fn compile_source_uncached(
    name: &str,
    src: &str,
    arch: &'static str,
) -> Result<Compiled, CudaError> {
    use cudarc::nvrtc::{result as nvrtc, sys};
    ensure_nvrtc()?;
    let err = |log: String| CudaError::Compile {
        name: name.into(),
        arch: arch.into(),
        log,
    };
    let text = |v: &[std::ffi::c_char]| {
        let b: Vec<u8> = v.iter().map(|&c| c as u8).take_while(|&c| c != 0).collect();
        String::from_utf8_lossy(&b).into_owned()
    };
    let full = std::ffi::CString::new(full_source(name, src))
        .map_err(|_| err("the source holds a NUL byte".into()))?;
    let prog = nvrtc::create_program(&full, None).map_err(|e| err(format!("{e:?}")))?;
    // SAFETY: `prog` was just created; it is read after a successful compile only and destroyed
    // once, on every path; the cubin buffer has the size NVRTC reports.
    unsafe {
        let out = (|| {
            if let Err(e) = nvrtc::compile_program(prog, &options(arch)) {
                let log = nvrtc::get_program_log(prog)
                    .map(|l| text(&l))
                    .unwrap_or_default();
                return Err(err(if log.trim().is_empty() {
                    format!("{e:?}")
                } else {
                    log
                }));
            }
            let ptx = nvrtc::get_ptx(prog).map_err(|e| err(format!("nvrtcGetPTX: {e:?}")))?;
            let mut size = 0usize;
            sys::nvrtcGetCUBINSize(prog, &mut size)
                .result()
                .map_err(|e| err(format!("nvrtcGetCUBINSize: {e:?}")))?;
            let mut cubin = vec![0u8; size];
            sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr().cast())
                .result()
                .map_err(|e| err(format!("nvrtcGetCUBIN: {e:?}")))?;
            Ok((text(&ptx), cubin))
        })();
        let _ = nvrtc::destroy_program(prog);
        let (ptx, cubin) = out?;
        Ok(Compiled {
            name: name.into(),
            arch: arch.into(),
            ptx,
            cubin,
            cached: false,
            cache_path: None,
        })
    }
}

/// The cache directory: `MOTIONRT_CACHE_DIR`, else `$XDG_CACHE_HOME/motionrt`, else
/// `$HOME/.cache/motionrt`; kernels go under `kernels/`.
pub fn cache_dir() -> PathBuf {
    let base = std::env::var_os("MOTIONRT_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|x| PathBuf::from(x).join("motionrt")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/motionrt")))
        .unwrap_or_else(|| std::env::temp_dir().join("motionrt-cache"));
    base.join("kernels")
}

/// The cache key of a module: prelude and source, options, architecture and NVRTC version.
pub fn cache_key(name: &str, arch: &str, nvrtc: (i32, i32)) -> Result<String, CudaError> {
    let mut h = Sha256::new();
    h.update(full_source(name, source(name)?).as_bytes());
    h.update(format!("{:?}", options("sm_00")).as_bytes());
    let hex: String = h
        .finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(format!("{name}-{arch}-nvrtc{}.{}-{hex}", nvrtc.0, nvrtc.1))
}

/// Compile through the disk cache.
pub fn compile(name: &str, arch: &'static str) -> Result<Compiled, CudaError> {
    let key = cache_key(name, arch, nvrtc_version()?)?;
    let dir = cache_dir();
    let path = dir.join(format!("{key}.ptx"));
    let cubin_path = dir.join(format!("{key}.cubin"));
    if let (Ok(ptx), Ok(cubin)) = (std::fs::read_to_string(&path), std::fs::read(&cubin_path)) {
        // a cubin is an ELF file
        if ptx.contains(".entry") && cubin.starts_with(b"\x7fELF") {
            return Ok(Compiled {
                name: name.into(),
                arch: arch.into(),
                ptx,
                cubin,
                cached: true,
                cache_path: Some(path),
            });
        }
    }
    let mut c = compile_uncached(name, arch)?;
    // the module is compiled: a cache that cannot be written costs the next start a compile,
    // not this one its kernels
    match write_cache(
        &dir,
        &[(&cubin_path, &c.cubin[..]), (&path, c.ptx.as_bytes())],
    ) {
        Ok(()) => c.cache_path = Some(path),
        Err(e) => eprintln!("warning: the kernel cache was not written: {e}"),
    }
    Ok(c)
}

/// Write `files` into the cache folder `dir`, each under a temporary name unique to this
/// process and call, then renamed into place (the cubin first: an entry counts once its PTX is
/// there).
fn write_cache(dir: &Path, files: &[(&PathBuf, &[u8])]) -> Result<(), CudaError> {
    static SERIAL: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    std::fs::create_dir_all(dir).map_err(|e| CudaError::Cache {
        path: dir.to_path_buf(),
        message: e.to_string(),
    })?;
    for (p, bytes) in files {
        let n = SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = p.with_extension(format!("partial.{}.{n}", std::process::id()));
        let _unfinished = crate::unfinished::register(&tmp);
        std::fs::write(&tmp, bytes)
            .and_then(|_| crate::unfinished::commit(|| std::fs::rename(&tmp, p)))
            .map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                CudaError::Cache {
                    path: (*p).clone(),
                    message: e.to_string(),
                }
            })?;
    }
    Ok(())
}
