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

/// Libraries loaded from Python packages' folders, kept loaded for the process.
static PRELOADED: std::sync::OnceLock<Vec<libloading::Library>> = std::sync::OnceLock::new();

/// Make cuBLASLt, cuBLAS and cuDNN loadable by name (as cudarc loads them) when the dynamic
/// loader cannot find them but [`probe`] does, in the `nvidia` Python packages or `torch/lib`:
/// each is loaded there by path, with the libraries beside it that share its name (cuDNN opens
/// its `libcudnn_*` parts by name), so that later loads by soname resolve to them. Once per
/// process; a library found nowhere stays missing (the caller reports it).
pub fn preload_libraries() {
    PRELOADED.get_or_init(|| {
        let wanted: Vec<&Spec> = ["cublasLt", "cublas", "cudnn"]
            .iter()
            .filter_map(|n| SPECS.iter().find(|s| s.name == *n))
            .filter(|s| !s.sonames.iter().any(|so| loadable(so)))
            .collect();
        if wanted.is_empty() {
            return Vec::new();
        }
        let (nvidia, torch) = python_dirs();
        let mut libs = Vec::new();
        for s in wanted {
            let dirs = nvidia
                .iter()
                .flat_map(|d| s.subdirs.iter().map(move |sub| d.join(sub)))
                .chain(torch.iter().cloned());
            // only the major version cudarc's bindings are for (the first soname): another
            // is left missing, and reported so
            let fits = |p: &PathBuf| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(s.sonames[0]))
            };
            if let Some(p) = dirs.filter_map(|d| find_in(&d, s.sonames)).find(fits) {
                libs.extend(load_with_parts(&p));
            }
        }
        libs
    });
}

/// Load `lib` and the files beside it whose names start with its stem and `_` (`libcudnn_ops`),
/// retrying until no more load (they need each other in an order the names do not tell).
fn load_with_parts(lib: &Path) -> Vec<libloading::Library> {
    let dir = lib.parent().unwrap_or(Path::new("."));
    let name = lib.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let stem = name.find(".so").map_or(name, |i| &name[..i]);
    let mut pending: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(&format!("{stem}_")) && n.contains(".so"))
                })
                .collect()
        })
        .unwrap_or_default();
    pending.sort();
    pending.insert(0, lib.to_path_buf());
    let mut libs = Vec::new();
    loop {
        let before = pending.len();
        pending.retain(|p| {
            // SAFETY: loading NVIDIA's library runs its initialisers, nothing else.
            match unsafe { libloading::Library::new(p) } {
                Ok(l) => {
                    libs.push(l);
                    false
                }
                Err(_) => true,
            }
        });
        if pending.is_empty() || pending.len() == before {
            return libs;
        }
    }
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

    /// `load_with_parts` loads a library and its `stem_*` parts whichever order they need (as
    /// cuDNN's), with real shared objects: `libmrtx_a` needs `libmrtx_b` by soname and no search
    /// path finds it, so `_a` loads only once `_b` has.
    #[test]
    fn loads_a_library_with_parts_that_need_each_other() {
        let cc = ["cc", "gcc", "g++"]
            .into_iter()
            .find(|c| {
                std::process::Command::new(c)
                    .arg("--version")
                    .output()
                    .is_ok()
            })
            .expect("a C compiler (the CUDA emulator's tests need one too)");
        let dir = std::env::temp_dir().join(format!("motionrt-parts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let build = |name: &str, src: &str, needs: Option<&str>| {
            let c = dir.join(format!("{name}.c"));
            std::fs::write(&c, src).unwrap();
            let mut cmd = std::process::Command::new(cc);
            cmd.args(["-shared", "-fPIC", "-o"])
                .arg(dir.join(format!("{name}.so.1")))
                .arg(&c)
                .arg(format!("-Wl,-soname,{name}.so.1"));
            if let Some(n) = needs {
                cmd.arg(dir.join(format!("{n}.so.1")));
            }
            assert!(cmd.status().unwrap().success(), "{cc} failed on {name}");
            std::fs::remove_file(&c).unwrap();
        };
        build("libmrtx_b", "int mrtx_b(void) { return 2; }", None);
        build(
            "libmrtx_a",
            "int mrtx_b(void); int mrtx_a(void) { return mrtx_b() + 1; }",
            Some("libmrtx_b"),
        );
        build("libmrtx", "int mrtx(void) { return 1; }", None);
        std::fs::write(dir.join("libmrty.so.1"), b"not a library").unwrap();
        // by name alone, `_a` cannot load: nothing tells the loader where `_b` is
        assert!(!loadable(dir.join("libmrtx_a.so.1").to_str().unwrap()));
        let libs = load_with_parts(&dir.join("libmrtx.so.1"));
        assert_eq!(libs.len(), 3, "libmrtx, libmrtx_a and libmrtx_b");
        // SAFETY: the symbol has the C signature compiled above.
        let a: libloading::Symbol<'_, unsafe extern "C" fn() -> i32> =
            unsafe { libs[2].get(b"mrtx_a") }.unwrap();
        assert_eq!(unsafe { a() }, 3);
        drop(libs);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
