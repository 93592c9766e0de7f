//! Which CUDA libraries this machine can load, found without calling into any of them (a missing
//! library is reported, never a panic). `motionrt probe` prints the result.
//!
//! Each library is looked up by its sonames through the dynamic loader (`LD_LIBRARY_PATH`, the
//! system's paths), then in the `nvidia` Python package of `MOTIONRT_PYTHON` / `python3` (the
//! `nvidia-*` wheels, which PyTorch also installs) and in PyTorch's own `torch/lib`.

use std::path::{Path, PathBuf};

/// One library and where it was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LibStatus {
    /// Short name (`driver`, `nvrtc`, `cudart`, `cublas`, `cublasLt`, `cudnn`).
    pub name: &'static str,
    /// What motionrt uses it for.
    pub role: &'static str,
    /// Where it was loaded from: a path, or the soname the loader resolved; `None`: missing.
    pub found: Option<String>,
    /// How to get it, for a missing library.
    pub hint: &'static str,
}

struct Spec {
    name: &'static str,
    role: &'static str,
    sonames: &'static [&'static str],
    /// Subfolders of an `nvidia` package directory holding it.
    subdirs: &'static [&'static str],
    hint: &'static str,
}

const SPECS: &[Spec] = &[
    Spec {
        name: "driver",
        role: "CUDA driver API (contexts, module loading, launches)",
        sonames: &["libcuda.so.1", "libcuda.so"],
        subdirs: &[],
        hint: "install the NVIDIA driver (it ships libcuda.so.1)",
    },
    Spec {
        name: "nvrtc",
        role: "run-time compilation of kernels/cuda/*.cu",
        sonames: &["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"],
        subdirs: &["cu13/lib", "cuda_nvrtc/lib", "cu12/lib"],
        hint: "python3 -m pip install nvidia-cuda-nvrtc (or set MOTIONRT_NVRTC)",
    },
    Spec {
        name: "cudart",
        role: "CUDA runtime",
        sonames: &["libcudart.so.13", "libcudart.so.12", "libcudart.so"],
        subdirs: &["cu13/lib", "cuda_runtime/lib", "cu12/lib"],
        hint: "python3 -m pip install nvidia-cuda-runtime",
    },
    Spec {
        name: "cublas",
        role: "GEMMs",
        sonames: &["libcublas.so.13", "libcublas.so.12", "libcublas.so"],
        subdirs: &["cu13/lib", "cublas/lib", "cu12/lib"],
        hint: "python3 -m pip install nvidia-cublas",
    },
    Spec {
        name: "cublasLt",
        role: "GEMMs with fused epilogues, algorithm search",
        sonames: &["libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so"],
        subdirs: &["cu13/lib", "cublas/lib", "cu12/lib"],
        hint: "python3 -m pip install nvidia-cublas",
    },
    Spec {
        name: "cudnn",
        role: "convolutions",
        sonames: &["libcudnn.so.9", "libcudnn.so"],
        subdirs: &["cudnn/lib"],
        hint: "python3 -m pip install nvidia-cudnn-cu13",
    },
];

/// Directories of Python packages that may hold CUDA libraries: `nvidia/*` and `torch/lib`.
fn python_dirs() -> (Vec<PathBuf>, Vec<PathBuf>) {
    let mut pythons: Vec<String> = std::env::var("MOTIONRT_PYTHON").into_iter().collect();
    pythons.push("python3".into());
    let script = "import importlib.util as u, os\n\
        for m in ('nvidia', 'torch'):\n\
        \x20   s = u.find_spec(m)\n\
        \x20   for p in (list(s.submodule_search_locations or []) if s else []):\n\
        \x20       print(m + '\\t' + p)\n";
    for py in pythons {
        let Ok(o) = std::process::Command::new(&py)
            .args(["-c", script])
            .output()
        else {
            continue;
        };
        if !o.status.success() {
            continue;
        }
        let mut nvidia = Vec::new();
        let mut torch = Vec::new();
        for line in String::from_utf8_lossy(&o.stdout).lines() {
            match line.split_once('\t') {
                Some(("nvidia", p)) => nvidia.push(PathBuf::from(p)),
                Some(("torch", p)) => torch.push(Path::new(p).join("lib")),
                _ => {}
            }
        }
        return (nvidia, torch);
    }
    (Vec::new(), Vec::new())
}

/// The newest file in `dir` whose name starts with one of `sonames`' stems (`libcublas.so`).
fn find_in(dir: &Path, sonames: &[&str]) -> Option<PathBuf> {
    let rd = std::fs::read_dir(dir).ok()?;
    let stems: Vec<&str> = sonames
        .iter()
        .map(|s| s.find(".so").map_or(*s, |i| &s[..i + 3]))
        .collect();
    let mut found: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                stems
                    .iter()
                    .any(|s| n.starts_with(s) && !n.contains("builtins"))
            })
        })
        .collect();
    found.sort();
    found.pop()
}

/// Whether the dynamic loader can open `name` (a soname or a path). Loading runs only the
/// library's initialisers; nothing of it is called.
fn loadable(name: &str) -> bool {
    // SAFETY: dlopen of an NVIDIA library runs its initialisers only; it is closed again.
    unsafe { libloading::Library::new(name) }.is_ok()
}

/// Probe every library motionrt's CUDA paths use.
pub fn probe() -> Vec<LibStatus> {
    let (nvidia, torch) = python_dirs();
    SPECS
        .iter()
        .map(|s| {
            let mut found = s
                .sonames
                .iter()
                .find(|so| loadable(so))
                .map(|so| so.to_string());
            if found.is_none() && s.name == "nvrtc" {
                if let Ok(p) = std::env::var("MOTIONRT_NVRTC") {
                    if !p.is_empty() && Path::new(&p).is_file() {
                        found = Some(p);
                    }
                }
            }
            if found.is_none() {
                let dirs = nvidia
                    .iter()
                    .flat_map(|d| s.subdirs.iter().map(move |sub| d.join(sub)))
                    .chain(torch.iter().cloned());
                for dir in dirs {
                    if let Some(p) = find_in(&dir, s.sonames) {
                        found = Some(p.display().to_string());
                        break;
                    }
                }
            }
            LibStatus {
                name: s.name,
                role: s.role,
                found,
                hint: s.hint,
            }
        })
        .collect()
}

/// One GPU the driver reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuInfo {
    pub ordinal: usize,
    pub name: String,
    /// `(major, minor)`.
    pub compute_capability: (i32, i32),
    pub memory_bytes: usize,
}

/// The GPUs the driver reports; an error string when the driver is missing or fails (never a
/// panic: the driver library is probed before the first call).
pub fn gpus() -> Result<Vec<GpuInfo>, String> {
    // SAFETY: only dlopen attempts on the driver's library names.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err("the CUDA driver (libcuda.so.1) is not installed".into());
    }
    let n = cudarc::driver::CudaContext::device_count().map_err(|e| format!("{e:?}"))?;
    let mut out = Vec::new();
    for i in 0..n.max(0) as usize {
        let ctx = cudarc::driver::CudaContext::new(i).map_err(|e| format!("{e:?}"))?;
        out.push(GpuInfo {
            ordinal: i,
            name: ctx.name().map_err(|e| format!("{e:?}"))?,
            compute_capability: ctx.compute_capability().map_err(|e| format!("{e:?}"))?,
            memory_bytes: ctx.total_mem().unwrap_or(0),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_library_is_reported_found_or_missing_with_a_hint() {
        let libs = probe();
        let names: Vec<&str> = libs.iter().map(|l| l.name).collect();
        assert_eq!(
            names,
            ["driver", "nvrtc", "cudart", "cublas", "cublasLt", "cudnn"]
        );
        for l in &libs {
            assert!(!l.hint.is_empty() && !l.role.is_empty());
            if let Some(p) = &l.found {
                assert!(
                    p.starts_with("lib") || Path::new(p).is_file(),
                    "{}: {p}",
                    l.name
                );
            }
        }
        // the driver and the GPU list agree
        let driver = libs[0].found.is_some();
        match gpus() {
            Ok(_) => assert!(driver, "GPUs listed without a driver library"),
            Err(e) => {
                if !driver {
                    assert!(e.contains("not installed"), "{e}")
                }
            }
        }
    }

    #[test]
    fn finds_the_newest_library_in_a_folder() {
        let dir = std::env::temp_dir().join(format!("motionrt-probe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for f in [
            "libcublas.so.12",
            "libcublas.so.13",
            "libnvrtc-builtins.so.13",
            "other.so",
        ] {
            std::fs::write(dir.join(f), b"").unwrap();
        }
        assert_eq!(
            find_in(&dir, &["libcublas.so.13"]),
            Some(dir.join("libcublas.so.13"))
        );
        assert_eq!(find_in(&dir, &["libnvrtc.so.13"]), None);
        assert_eq!(find_in(&dir, &["libcudnn.so.9"]), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
