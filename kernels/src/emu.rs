//! Test infrastructure: a CPU emulator of the CUDA execution model, so that the real kernel
//! sources (`kernels/cuda/*.cu`) run on machines without a GPU and can be compared with the CPU
//! reference implementations.
//!
//! [`Builder::build`] compiles the [`PRELUDE`](crate::cuda::PRELUDE), the kernel sources, the
//! emulator (`kernels/emu/emu.h`, `emu.cpp`) and the registry of entry points
//! (`kernels/emu/registry.cpp`) with the host C++ compiler into a shared library, cached under
//! `target/motionrt-emu/<hash of everything>/libmrtemu.so`, and loads it. [`Emu::launch`] then runs
//! a kernel like `cuLaunchKernel`: "device memory" is host memory ([`DeviceBuffer`]).
//!
//! What the emulator models (details in `kernels/emu/emu.h`): blocks run one after another; the
//! threads of a block are cooperative fibers scheduled deterministically; `__syncthreads` is a
//! barrier over the live threads; warp collectives (shuffles, `mma.sync`, `ldmatrix`) rendezvous
//! all 32 lanes and compute from the whole warp's operands with the PTX ISA's fragment layouts;
//! `cp.async` copies land when the issuing thread waits for them; dynamic shared memory starts as
//! `0xFF` bytes (NaN). Deadlocks, divergent barriers and misused collectives end the launch with an
//! error naming the kernel, the block and the thread. It does not model timing or the
//! approximation error of fast-math intrinsics (`__expf` is `expf`); memory races between threads
//! that do not synchronise run in a fixed order, unless the library is built with race detection
//! ([`Builder::racecheck`], `MOTIONRT_EMU_RACECHECK=1`): the compiler instruments every load and
//! store of the kernels, and an access that races (shared memory with no barrier between, or
//! read before any thread of the block wrote it; global memory between threads or blocks of one
//! launch) ends the launch with an error naming both accesses; so does, with
//! [`Emu::launch_within`], a global access outside the buffers the launch was given.
//!
//! [`Emu::bank_stats`] counts the shared-memory wavefronts of `ldmatrix`, 16-byte `cp.async` and
//! the kernels' 16-byte shared loads and stores against their number without bank conflicts, per call site ([`BankSite`]): the one
//! performance property of a kernel that its launch on the CPU determines exactly.
//!
//! The compiler is `CXX` if set, else `g++`, else `c++`.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::ptr::NonNull;

use sha2::{Digest, Sha256};

use crate::cuda;

/// The emulator's files, at their paths relative to `kernels/`.
const EMU_FILES: &[(&str, &str)] = &[
    ("emu/emu.h", include_str!("../emu/emu.h")),
    ("emu/emu.cpp", include_str!("../emu/emu.cpp")),
    ("emu/registry.cpp", include_str!("../emu/registry.cpp")),
];

/// Flags of every translation unit (the library's cache key includes them).
const CXX_FLAGS: &[&str] = &[
    "-std=c++17",
    "-O2",
    "-fPIC",
    "-DMOTIONRT_EMU",
    // the kernels view memory through differently typed pointers, as CUDA allows
    "-fno-strict-aliasing",
    "-fvisibility=hidden",
    // the fibers longjmp between stacks, which the fortified longjmp refuses
    "-U_FORTIFY_SOURCE",
    "-Wno-unknown-pragmas",
];

const LIB_NAME: &str = "libmrtemu.so";

#[derive(Debug, thiserror::Error)]
pub enum EmuError {
    #[error("no C++ compiler for the CUDA emulator ({tried}); install g++ or set CXX")]
    NoCompiler { tried: String },
    #[error("{compiler} failed on {unit} ({status}):\n{log}")]
    Compile {
        compiler: String,
        unit: String,
        status: String,
        log: String,
    },
    #[error("emulator build {path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Load { path: PathBuf, message: String },
    #[error("extra source {name:?}: {message}")]
    Source { name: String, message: String },
    #[error("no kernel {kernel:?} in the emulator ({registered} registered)")]
    UnknownKernel { kernel: String, registered: usize },
    #[error("kernel {kernel}: {message}")]
    Arguments { kernel: String, message: String },
    #[error("{0}")]
    Launch(String),
}

impl EmuError {
    /// For tests, on failing to build the emulator: a missing C++ compiler prints SKIP (the test
    /// then passes without running), unless `MOTIONRT_REQUIRE_EMU=1`; anything else panics.
    pub fn skip_or_panic(&self) {
        match self {
            EmuError::NoCompiler { .. }
                if std::env::var("MOTIONRT_REQUIRE_EMU").as_deref() != Ok("1") =>
            {
                eprintln!("SKIP: {self}")
            }
            EmuError::NoCompiler { .. } => panic!("MOTIONRT_REQUIRE_EMU=1 but: {self}"),
            e => panic!("building the CUDA emulator: {e}"),
        }
    }
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> EmuError + '_ {
    move |e| EmuError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// A C++ compiler: the program and its leading arguments (`CXX="ccache g++"` works).
#[derive(Debug, Clone)]
struct Compiler {
    argv: Vec<String>,
    version: String,
}

impl Compiler {
    fn command(&self) -> Command {
        let mut c = Command::new(&self.argv[0]);
        c.args(&self.argv[1..]);
        c
    }

    fn probe(argv: Vec<String>) -> Result<Self, String> {
        let name = argv.join(" ");
        let out = Command::new(&argv[0])
            .args(&argv[1..])
            .arg("--version")
            .output()
            .map_err(|e| format!("{name}: {e}"))?;
        if !out.status.success() {
            return Err(format!("{name} --version: {}", out.status));
        }
        let version = String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .to_string();
        Ok(Self { argv, version })
    }

    /// `CXX` (only it, when set), else `g++`, else `c++`.
    fn find() -> Result<Self, EmuError> {
        let candidates: Vec<Vec<String>> = match std::env::var("CXX") {
            Ok(cxx) if !cxx.trim().is_empty() => {
                vec![cxx.split_whitespace().map(String::from).collect()]
            }
            _ => vec![vec!["g++".into()], vec!["c++".into()]],
        };
        let mut tried = Vec::new();
        for argv in candidates {
            match Self::probe(argv) {
                Ok(c) => return Ok(c),
                Err(e) => tried.push(e),
            }
        }
        Err(EmuError::NoCompiler {
            tried: tried.join("; "),
        })
    }
}

/// Where emulator libraries are cached: `MOTIONRT_EMU_DIR`, else `$CARGO_TARGET_DIR/motionrt-emu`,
/// else the workspace's `target/motionrt-emu`.
pub fn cache_root() -> PathBuf {
    if let Some(d) = std::env::var_os("MOTIONRT_EMU_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("motionrt-emu");
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target")
        .join("motionrt-emu")
}

/// A file of the build tree: its path relative to the tree's root, and its text.
type TreeFile = (String, String);

/// A translation unit: a file of the build tree and its flags (`-D`, instrumentation).
struct Unit {
    file: String,
    defines: Vec<String>,
}

struct ExtraSource {
    name: String,
    code: String,
    entries: Vec<String>,
}

fn is_identifier(s: &str) -> bool {
    let mut c = s.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
}

/// Builds (or finds in the cache) and loads the emulator library.
#[derive(Default)]
pub struct Builder {
    extra: Vec<ExtraSource>,
    cache_root: Option<PathBuf>,
    racecheck: bool,
}

/// Flags of the kernel units in a race-checking build: the compiler instruments every load and
/// store (ThreadSanitizer's instrumentation, without its runtime: `emu.cpp` implements the calls).
const RACECHECK_FLAGS: &[&str] = &[
    "-fsanitize=thread",
    "--param=tsan-instrument-func-entry-exit=0",
    "-DMOTIONRT_EMU_RACECHECK",
    // line tables, for naming where a race's accesses are (addr2line)
    "-g",
];

impl Builder {
    /// A builder; race checking is on when `MOTIONRT_EMU_RACECHECK=1` ([`Builder::racecheck`]).
    pub fn new() -> Self {
        Self {
            racecheck: std::env::var("MOTIONRT_EMU_RACECHECK").as_deref() == Ok("1"),
            ..Self::default()
        }
    }

    /// Check every launch for data races (`kernels/emu/emu.cpp`, "race detection"): shared memory
    /// read or written by two threads with no `__syncthreads` (or, within a warp, `__syncwarp`)
    /// between, shared memory read before any thread of the block wrote it, and global memory
    /// accessed so by two threads or two blocks of one launch. The first race ends the launch
    /// with an error naming both threads and where in the kernel each access was. Several times
    /// slower; a library of its own in the cache.
    pub fn racecheck(mut self, on: bool) -> Self {
        self.racecheck = on;
        self
    }

    /// Also compile `code`, a kernel source that relies on the prelude like the project's, and
    /// register its `extern "C"` kernels `entries`. `name` labels it in messages.
    pub fn source(mut self, name: &str, code: &str, entries: &[&str]) -> Self {
        self.extra.push(ExtraSource {
            name: name.into(),
            code: code.into(),
            entries: entries.iter().map(|e| e.to_string()).collect(),
        });
        self
    }

    /// Cache the library under `dir` instead of [`cache_root`].
    pub fn cache_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cache_root = Some(dir.into());
        self
    }

    /// The files of the build tree (`(path, text)`) and the translation units among them.
    fn files(&self) -> Result<(Vec<TreeFile>, Vec<Unit>), EmuError> {
        let mut files: Vec<TreeFile> = EMU_FILES
            .iter()
            .map(|(p, t)| (p.to_string(), t.to_string()))
            .collect();
        files.push(("cuda/prelude.cuh".into(), cuda::PRELUDE.into()));
        for (name, src) in cuda::SOURCES {
            files.push((format!("cuda/{name}.cu"), src.to_string()));
        }
        // kernel units: instrumented in a race-checking build
        let rc: Vec<String> = if self.racecheck {
            RACECHECK_FLAGS.iter().map(|f| f.to_string()).collect()
        } else {
            Vec::new()
        };
        let mut units = vec![Unit {
            file: "emu/emu.cpp".into(),
            defines: if self.racecheck {
                vec!["-DMOTIONRT_EMU_RACECHECK".into()]
            } else {
                vec![]
            },
        }];
        for i in 0..cuda::SOURCES.len() {
            let mut defines = vec![format!("-DMRT_EMU_UNIT={i}")];
            defines.extend(rc.iter().cloned());
            units.push(Unit {
                file: "emu/registry.cpp".into(),
                defines,
            });
        }
        for (i, x) in self.extra.iter().enumerate() {
            if x.entries.is_empty() {
                return Err(EmuError::Source {
                    name: x.name.clone(),
                    message: "no entry points to register".into(),
                });
            }
            if let Some(bad) = x.entries.iter().find(|e| !is_identifier(e)) {
                return Err(EmuError::Source {
                    name: x.name.clone(),
                    message: format!("entry point {bad:?} is not a C identifier"),
                });
            }
            let label: String = x
                .name
                .chars()
                .map(|c| if c == '"' || c == '\\' { '_' } else { c })
                .collect();
            let mut text = format!(
                "#include \"cuda/prelude.cuh\"\nnamespace mrt_extra_{i} {{\n#line 1 \"{label}\"\n{}\n}}\n",
                x.code
            );
            for e in &x.entries {
                text.push_str(&format!("MRT_EMU_REGISTER(mrt_extra_{i}, {e})\n"));
            }
            let file = format!("extra_{i}.cpp");
            files.push((file.clone(), text));
            units.push(Unit {
                file,
                defines: rc.clone(),
            });
        }
        Ok((files, units))
    }

    pub fn build(self) -> Result<Emu, EmuError> {
        let cxx = Compiler::find()?;
        let (files, units) = self.files()?;
        let mut h = Sha256::new();
        h.update(cxx.argv.join(" ").as_bytes());
        h.update(cxx.version.as_bytes());
        h.update(CXX_FLAGS.join(" ").as_bytes());
        for (name, text) in &files {
            h.update((name.len() as u64).to_le_bytes());
            h.update(name.as_bytes());
            h.update((text.len() as u64).to_le_bytes());
            h.update(text.as_bytes());
        }
        for u in &units {
            h.update(format!("{} {:?};", u.file, u.defines).as_bytes());
        }
        let hex: String = h
            .finalize()
            .iter()
            .take(8)
            .map(|b| format!("{b:02x}"))
            .collect();
        let dir = self.cache_root.unwrap_or_else(cache_root).join(hex);
        let lib = dir.join(LIB_NAME);
        if !lib.is_file() {
            compile(&cxx, &dir, &files, &units)?;
        }
        let mut e = Emu::load(&lib)?;
        e.racecheck = self.racecheck;
        Ok(e)
    }
}

/// Compile every unit (in parallel) in a private build directory, link, and move the library into
/// `dir` (a rename, so concurrent builders never see a partial file).
fn compile(cxx: &Compiler, dir: &Path, files: &[TreeFile], units: &[Unit]) -> Result<(), EmuError> {
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let build = dir.join(format!("build-{}-{nonce}", std::process::id()));
    std::fs::create_dir_all(&build).map_err(io_err(&build))?;
    let result = (|| {
        for (name, text) in files {
            let p = build.join(name);
            if let Some(parent) = p.parent() {
                std::fs::create_dir_all(parent).map_err(io_err(parent))?;
            }
            std::fs::write(&p, text).map_err(io_err(&p))?;
        }
        let mut children = Vec::new();
        for (i, Unit { file, defines }) in units.iter().enumerate() {
            let obj = build.join(format!("unit{i}.o"));
            let log = build.join(format!("unit{i}.log"));
            let log_file = File::create(&log).map_err(io_err(&log))?;
            let mut cmd = cxx.command();
            cmd.args(CXX_FLAGS)
                .args(defines)
                .arg("-I")
                .arg(&build)
                .arg("-c")
                .arg(build.join(file))
                .arg("-o")
                .arg(&obj)
                .stdout(Stdio::null())
                .stderr(Stdio::from(log_file));
            let child = cmd.spawn().map_err(|e| EmuError::Compile {
                compiler: cxx.argv.join(" "),
                unit: file.clone(),
                status: "could not start".into(),
                log: e.to_string(),
            })?;
            children.push((format!("{file} {}", defines.join(" ")), child, log, obj));
        }
        let mut objs = Vec::new();
        let mut failure = None;
        for (unit, mut child, log, obj) in children {
            let status = child.wait().map_err(io_err(&log))?;
            if !status.success() && failure.is_none() {
                failure = Some(EmuError::Compile {
                    compiler: cxx.argv.join(" "),
                    unit: unit.trim().to_string(),
                    status: status.to_string(),
                    log: std::fs::read_to_string(&log).unwrap_or_default(),
                });
            }
            objs.push(obj);
        }
        if let Some(f) = failure {
            return Err(f);
        }
        let out = build.join(LIB_NAME);
        let link = cxx
            .command()
            .arg("-shared")
            // an instrumentation call without its hook in emu.cpp fails here, not at load
            .arg("-Wl,-z,defs")
            .arg("-o")
            .arg(&out)
            .args(&objs)
            .output()
            .map_err(io_err(&out))?;
        if !link.status.success() {
            return Err(EmuError::Compile {
                compiler: cxx.argv.join(" "),
                unit: "the link".into(),
                status: link.status.to_string(),
                log: String::from_utf8_lossy(&link.stderr).into_owned(),
            });
        }
        let lib = dir.join(LIB_NAME);
        std::fs::rename(&out, &lib).map_err(io_err(&lib))
    })();
    let _ = std::fs::remove_dir_all(&build);
    result
}

type LaunchFn = unsafe extern "C" fn(
    *const c_char,
    u32,
    u32,
    u32,
    u32,
    u32,
    u32,
    usize,
    *mut *mut c_void,
    *mut c_char,
    usize,
) -> c_int;
type CountFn = unsafe extern "C" fn() -> c_int;
type NameFn = unsafe extern "C" fn(c_int) -> *const c_char;
type ParamsFn = unsafe extern "C" fn(*const c_char, *mut c_char, *mut usize, c_int) -> c_int;
type BoundsFn = unsafe extern "C" fn(*const u64, usize);
type BankStatsFn = unsafe extern "C" fn(c_int);
type BankReportFn = unsafe extern "C" fn(*mut c_char, usize) -> usize;

/// Shared-memory bank counts of one call site's `ldmatrix` or 16-byte `cp.async` instructions
/// ([`Emu::bank_stats`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BankSite {
    /// `file:line` of the call in the kernel source.
    pub site: String,
    /// The instruction: `ldmatrix.x4`, `ldmatrix.x2.trans`, `cp.async.16`, `ld.shared.16`,
    /// `st.shared.16`, ...
    pub op: String,
    /// Warp instructions executed.
    pub requests: u64,
    /// Shared-memory wavefronts they took.
    pub wavefronts: u64,
    /// The wavefronts they would take without bank conflicts (one per 8x8 matrix of an
    /// `ldmatrix`, one per quarter warp of a 16-byte access).
    pub ideal: u64,
    /// `cp.async` instructions among `requests` whose lanes called the site unequally often
    /// between two barriers: counted as if the lanes with fewer calls skipped the last ones (a
    /// loop's tail); where they skipped calls in between (a chunk zero-filled instead), the n-th
    /// calls of the lanes were not one instruction and these counts are not the hardware's.
    pub uneven: u64,
    /// `cp.async`: the 32-byte global-memory sectors its sources touched (per warp instruction,
    /// summed), and the fewest their bytes could take (two 16-byte copies a sector).
    pub sectors: u64,
    pub ideal_sectors: u64,
}

impl BankSite {
    /// Wavefronts per ideal wavefront: 1 without bank conflicts, up to 8 with all eight 16-byte
    /// rows of a phase in the same banks.
    pub fn conflict_ratio(&self) -> f64 {
        self.wavefronts as f64 / self.ideal.max(1) as f64
    }
}

/// The loaded emulator library.
pub struct Emu {
    path: PathBuf,
    racecheck: bool,
    launch: LaunchFn,
    count: CountFn,
    name: NameFn,
    params: ParamsFn,
    set_bounds: BoundsFn,
    bank_stats: BankStatsFn,
    bank_report: BankReportFn,
    // keeps the functions above valid
    _lib: libloading::Library,
}

impl std::fmt::Debug for Emu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Emu").field("path", &self.path).finish()
    }
}

/// A kernel parameter as the emulator's registry describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Param {
    /// `'p'` pointer, `'i'` signed integer, `'u'` unsigned integer, `'f'` floating point, `'s'`
    /// anything else (a struct passed by value).
    pub kind: char,
    pub size: usize,
}

impl std::fmt::Display for Param {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match self.kind {
            'p' => "pointer",
            'i' => "signed integer",
            'u' => "unsigned integer",
            'f' => "float",
            _ => "struct",
        };
        write!(f, "{}-byte {what}", self.size)
    }
}

impl Emu {
    /// The project's kernels only (see [`Builder`] for more).
    pub fn new() -> Result<Self, EmuError> {
        Builder::new().build()
    }

    /// Whether every launch is checked for data races ([`Builder::racecheck`]).
    pub fn racecheck(&self) -> bool {
        self.racecheck
    }

    fn load(path: &Path) -> Result<Self, EmuError> {
        let load_err = |e: libloading::Error| EmuError::Load {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        // SAFETY: loading our own library runs its static initialisers (the kernel registry).
        let lib = unsafe { libloading::Library::new(path) }.map_err(load_err)?;
        // SAFETY: the symbols are emu.cpp's C ABI, with these signatures.
        unsafe {
            let launch = *lib.get::<LaunchFn>(b"mrt_emu_launch\0").map_err(load_err)?;
            let count = *lib
                .get::<CountFn>(b"mrt_emu_kernel_count\0")
                .map_err(load_err)?;
            let name = *lib
                .get::<NameFn>(b"mrt_emu_kernel_name\0")
                .map_err(load_err)?;
            let params = *lib
                .get::<ParamsFn>(b"mrt_emu_kernel_params\0")
                .map_err(load_err)?;
            let set_bounds = *lib
                .get::<BoundsFn>(b"mrt_emu_set_bounds\0")
                .map_err(load_err)?;
            let bank_stats = *lib
                .get::<BankStatsFn>(b"mrt_emu_bank_stats\0")
                .map_err(load_err)?;
            let bank_report = *lib
                .get::<BankReportFn>(b"mrt_emu_bank_report\0")
                .map_err(load_err)?;
            Ok(Self {
                path: path.to_path_buf(),
                racecheck: false,
                launch,
                count,
                name,
                params,
                set_bounds,
                bank_stats,
                bank_report,
                _lib: lib,
            })
        }
    }

    /// The shared library's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The registered kernels' names.
    pub fn kernels(&self) -> Vec<String> {
        // SAFETY: the registry is immutable after loading; names are NUL-terminated strings owned
        // by the library.
        unsafe {
            (0..(self.count)())
                .filter_map(|i| {
                    let p = (self.name)(i);
                    (!p.is_null()).then(|| CStr::from_ptr(p).to_string_lossy().into_owned())
                })
                .collect()
        }
    }

    /// Count the shared-memory bank conflicts of `ldmatrix` and 16-byte `cp.async` in the next
    /// launches from this OS thread (`on`), or stop; either way the counts so far are cleared.
    /// A phase (one 8×8 matrix of an `ldmatrix`, one quarter warp of a 16-byte access) takes as
    /// many wavefronts as the most distinct 4-byte words any of the 32 banks holds among its
    /// addresses; a `cp.async` instruction is the n-th call of its site by each lane of a warp
    /// since the block's last barrier (see [`BankSite::uneven`] where the lanes called it
    /// unequally often).
    /// Of the kernels' own loads and stores, the engine's 16-byte `load16` / `store16` are counted
    /// where they touch dynamic shared memory (`ld.shared.16`, `st.shared.16`, grouped as
    /// `cp.async`); other plain accesses are not: their width is the host compiler's.
    pub fn bank_stats(&self, on: bool) {
        // SAFETY: no arguments beyond the flag; thread-local state in the library.
        unsafe { (self.bank_stats)(c_int::from(on)) }
    }

    /// The counts since [`Emu::bank_stats`] on this OS thread, one entry per call site and
    /// instruction, sorted by site.
    pub fn bank_report(&self) -> Vec<BankSite> {
        // SAFETY: a null buffer asks for the length only; then a buffer of that length + 1.
        let text = unsafe {
            let n = (self.bank_report)(std::ptr::null_mut(), 0);
            let mut buf = vec![0 as c_char; n + 1];
            (self.bank_report)(buf.as_mut_ptr(), buf.len());
            CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned()
        };
        text.lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split('\t').collect();
                let [site, op, r, w, i, u, sec, isec] = f[..] else {
                    return None;
                };
                Some(BankSite {
                    site: site.into(),
                    op: op.into(),
                    requests: r.parse().ok()?,
                    wavefronts: w.parse().ok()?,
                    ideal: i.parse().ok()?,
                    uneven: u.parse().ok()?,
                    sectors: sec.parse().ok()?,
                    ideal_sectors: isec.parse().ok()?,
                })
            })
            .collect()
    }

    /// The parameters of `kernel`, from its signature.
    pub fn params(&self, kernel: &str) -> Result<Vec<Param>, EmuError> {
        let unknown = || EmuError::UnknownKernel {
            kernel: kernel.into(),
            registered: self.kernels().len(),
        };
        let c = CString::new(kernel).map_err(|_| unknown())?;
        let mut kinds = vec![0 as c_char; 64];
        let mut sizes = vec![0usize; 64];
        // SAFETY: the buffers hold 64 entries, as passed.
        let n = unsafe { (self.params)(c.as_ptr(), kinds.as_mut_ptr(), sizes.as_mut_ptr(), 64) };
        if n < 0 {
            return Err(unknown());
        }
        let n = n as usize;
        if n > 64 {
            return Err(EmuError::Arguments {
                kernel: kernel.into(),
                message: format!("{n} parameters; the emulator's API takes at most 64"),
            });
        }
        Ok((0..n)
            .map(|i| Param {
                kind: kinds[i] as u8 as char,
                size: sizes[i],
            })
            .collect())
    }

    /// [`Emu::launch`], the kernel's global memory accesses confined to `buffers` (`[start, end)`
    /// addresses) in a race-checking library ([`Builder::racecheck`]): an access outside them
    /// (and outside the kernel's parameters and constants) ends the launch with an error naming
    /// the thread, the address and the nearest buffer (by its index in `buffers`). Without race
    /// checking, the same as [`Emu::launch`].
    ///
    /// # Safety
    ///
    /// As [`Emu::launch`].
    pub unsafe fn launch_within(
        &self,
        kernel: &str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        dyn_smem: usize,
        args: &[Arg<'_>],
        buffers: &[(u64, u64)],
    ) -> Result<(), EmuError> {
        let params = self.params(kernel)?;
        let bad = |message: String| EmuError::Arguments {
            kernel: kernel.into(),
            message,
        };
        if params.len() != args.len() {
            return Err(bad(format!(
                "takes {} arguments ({}), got {}",
                params.len(),
                params
                    .iter()
                    .map(|p| p.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                args.len()
            )));
        }
        let mut slots: Vec<Vec<u64>> = Vec::with_capacity(args.len());
        for (i, (p, a)) in params.iter().zip(args).enumerate() {
            let bytes = a.bytes();
            let kind = a.param();
            if kind != *p {
                return Err(bad(format!(
                    "argument {i} is a {kind} ({a:?}); the parameter is a {p}"
                )));
            }
            // 8-byte aligned storage for the value (the trampoline copies it out bytewise)
            let mut slot = vec![0u64; bytes.len().div_ceil(8).max(1)];
            // SAFETY: the slot holds at least bytes.len() bytes; the two do not overlap.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    bytes.as_ptr(),
                    slot.as_mut_ptr() as *mut u8,
                    bytes.len(),
                );
            }
            slots.push(slot);
        }
        let mut ptrs: Vec<*mut c_void> = slots
            .iter_mut()
            .map(|s| s.as_mut_ptr() as *mut c_void)
            .collect();
        let name = CString::new(kernel).map_err(|_| bad("the name holds a NUL".into()))?;
        let mut err = vec![0 as c_char; 8192];
        let flat: Vec<u64> = buffers.iter().flat_map(|&(a, b)| [a, b]).collect();
        // SAFETY: `flat` holds buffers.len() pairs, which the library copies; the parameter slots
        // hold values of the kernel's parameter types (checked above); the pointers among them
        // are the caller's promise (see # Safety); the bounds are cleared after.
        let rc = unsafe {
            (self.set_bounds)(flat.as_ptr(), buffers.len());
            let rc = (self.launch)(
                name.as_ptr(),
                grid.0,
                grid.1,
                grid.2,
                block.0,
                block.1,
                block.2,
                dyn_smem,
                ptrs.as_mut_ptr(),
                err.as_mut_ptr(),
                err.len(),
            );
            (self.set_bounds)(std::ptr::null(), 0);
            rc
        };
        if rc != 0 {
            // SAFETY: the library writes a NUL-terminated message into err.
            let msg = unsafe { CStr::from_ptr(err.as_ptr()) };
            return Err(EmuError::Launch(symbolize(&msg.to_string_lossy())));
        }
        Ok(())
    }

    /// Run `kernel` over `grid` blocks of `block` threads with `dyn_smem` bytes of dynamic shared
    /// memory, like `cuLaunchKernel`. The arguments' kinds and sizes are checked against the
    /// kernel's signature first. Returns when the whole grid has run; an emulator error (deadlock,
    /// bad block size, misuse of a collective) names the kernel, the block and the thread. In a
    /// race-checking library, when every pointer argument is a [`Arg::Buf`] (or null), the
    /// kernel's global accesses are confined to those buffers ([`Emu::launch_within`]).
    ///
    /// # Safety
    ///
    /// The kernel reads and writes host memory through the pointers it is given, like a CUDA
    /// kernel: the buffers must be large enough for what the other arguments make it access.
    pub unsafe fn launch(
        &self,
        kernel: &str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        dyn_smem: usize,
        args: &[Arg<'_>],
    ) -> Result<(), EmuError> {
        let bufs: Option<Vec<(u64, u64)>> = args
            .iter()
            .filter_map(|a| match a {
                Arg::Buf(b) => {
                    let p = b.as_ptr() as u64;
                    Some(Some((p, p + b.len_bytes() as u64)))
                }
                Arg::Addr(_) => Some(None),
                _ => None,
            })
            .collect();
        let bufs = bufs.filter(|_| self.racecheck).unwrap_or_default();
        // SAFETY: the caller's promise.
        unsafe { self.launch_within(kernel, grid, block, dyn_smem, args, &bufs) }
    }
}

/// `msg` with each `[LIBRARY+0xOFFSET]` (a code address the emulator could not name: the kernels'
/// symbols are hidden) replaced by `function (file:line)` from `addr2line`, where it is
/// installed; left as it is otherwise.
fn symbolize(msg: &str) -> String {
    let mut out = String::new();
    let mut rest = msg;
    while let Some(i) = rest.find('[') {
        let Some(j) = rest[i..].find(']').map(|j| i + j) else {
            break;
        };
        out.push_str(&rest[..i]);
        let inner = &rest[i + 1..j];
        let named = inner.rsplit_once("+0x").and_then(|(lib, off)| {
            // the return address of the instrumentation call: the access is the byte before
            let off = u64::from_str_radix(off, 16).ok()?.checked_sub(1)?;
            let o = Command::new("addr2line")
                .args(["-f", "-C", "-i", "-e", lib, &format!("{off:#x}")])
                .output()
                .ok()
                .filter(|o| o.status.success())?;
            // (function, file:line) pairs, the innermost inlined call first: three at most
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            let lines: Vec<&str> = text.lines().map(str::trim).collect();
            let mut pairs: Vec<&[&str]> = lines.chunks_exact(2).filter(|p| p[0] != "??").collect();
            // a function's own lexical blocks show as frames of the same name
            pairs.dedup_by(|b, a| a[0] == b[0]);
            let frames: Vec<String> = pairs
                .iter()
                .take(3)
                .map(|p| format!("{} ({})", p[0], p[1]))
                .collect();
            (!frames.is_empty()).then(|| frames.join(", inlined in "))
        });
        match named {
            Some(n) => out.push_str(&n),
            None => out.push_str(&rest[i..=j]),
        }
        rest = &rest[j + 1..];
    }
    out.push_str(rest);
    out
}

/// A kernel argument.
#[derive(Debug, Clone, Copy)]
pub enum Arg<'a> {
    I32(i32),
    U32(u32),
    I64(i64),
    F32(f32),
    /// The address of a buffer.
    Buf(&'a DeviceBuffer),
    /// A null pointer.
    Null,
    /// A device address held as a number: host memory the caller owns (an arena carved into
    /// buffers), as an executor passes `CUdeviceptr`s.
    Addr(u64),
    /// A `#[repr(C)]` plain-data struct passed by value, as its bytes in memory (native byte
    /// order; padding written explicitly).
    Pod(&'a [u8]),
}

impl Arg<'_> {
    fn param(&self) -> Param {
        let (kind, size) = match self {
            Arg::I32(_) => ('i', 4),
            Arg::U32(_) => ('u', 4),
            Arg::I64(_) => ('i', 8),
            Arg::F32(_) => ('f', 4),
            Arg::Buf(_) | Arg::Null | Arg::Addr(_) => ('p', std::mem::size_of::<*const u8>()),
            Arg::Pod(b) => ('s', b.len()),
        };
        Param { kind, size }
    }

    /// The value as the kernel's parameter holds it in memory.
    fn bytes(&self) -> Vec<u8> {
        match self {
            Arg::I32(v) => v.to_ne_bytes().to_vec(),
            Arg::U32(v) => v.to_ne_bytes().to_vec(),
            Arg::I64(v) => v.to_ne_bytes().to_vec(),
            Arg::F32(v) => v.to_ne_bytes().to_vec(),
            Arg::Buf(b) => (b.as_ptr() as usize).to_ne_bytes().to_vec(),
            Arg::Null => 0usize.to_ne_bytes().to_vec(),
            Arg::Addr(a) => (*a as usize).to_ne_bytes().to_vec(),
            Arg::Pod(b) => b.to_vec(),
        }
    }
}

impl From<i32> for Arg<'_> {
    fn from(v: i32) -> Self {
        Arg::I32(v)
    }
}
impl From<u32> for Arg<'_> {
    fn from(v: u32) -> Self {
        Arg::U32(v)
    }
}
impl From<i64> for Arg<'_> {
    fn from(v: i64) -> Self {
        Arg::I64(v)
    }
}
impl From<f32> for Arg<'_> {
    fn from(v: f32) -> Self {
        Arg::F32(v)
    }
}
impl<'a> From<&'a DeviceBuffer> for Arg<'a> {
    fn from(b: &'a DeviceBuffer) -> Self {
        Arg::Buf(b)
    }
}

mod sealed {
    pub trait Sealed {}
}

/// Element types of [`DeviceBuffer`]s: plain numbers, valid for every bit pattern.
pub trait Elem: Copy + sealed::Sealed + 'static {}

macro_rules! elem {
    ($($t:ty),*) => { $(impl sealed::Sealed for $t {} impl Elem for $t {})* };
}
elem!(u8, u16, i32, u32, i64, u64, f32, f64);

/// Host memory that emulated kernels use as device memory: 256-byte aligned like `cudaMalloc`.
/// Kernels write through its address while Rust holds only `&DeviceBuffer`; read the results
/// with [`to_vec`](Self::to_vec) after the launch.
pub struct DeviceBuffer {
    ptr: NonNull<u8>,
    bytes: usize,
}

const BUF_ALIGN: usize = 256;

impl DeviceBuffer {
    fn layout(bytes: usize) -> std::alloc::Layout {
        std::alloc::Layout::from_size_align(bytes.max(BUF_ALIGN), BUF_ALIGN)
            .expect("buffer size overflows")
    }

    /// `bytes` bytes, each `byte` (0xFF: NaN as f32 and f16, to make unwritten outputs show).
    pub fn filled(bytes: usize, byte: u8) -> Self {
        let layout = Self::layout(bytes);
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { std::alloc::alloc(layout) };
        let ptr = NonNull::new(p).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        // SAFETY: the allocation holds at least `bytes` bytes.
        unsafe { std::ptr::write_bytes(ptr.as_ptr(), byte, layout.size()) };
        Self { ptr, bytes }
    }

    pub fn zeroed(bytes: usize) -> Self {
        Self::filled(bytes, 0)
    }

    pub fn from_slice<T: Elem>(v: &[T]) -> Self {
        let b = Self::zeroed(std::mem::size_of_val(v));
        // SAFETY: the buffer holds size_of_val(v) bytes and does not overlap v.
        unsafe {
            std::ptr::copy_nonoverlapping(v.as_ptr() as *const u8, b.ptr.as_ptr(), b.bytes);
        }
        b
    }

    /// The contents as `T`s (the size must be a multiple of `T`'s).
    pub fn to_vec<T: Elem>(&self) -> Vec<T> {
        let size = std::mem::size_of::<T>();
        assert!(
            self.bytes % size == 0,
            "{} bytes are not a whole number of {size}-byte elements",
            self.bytes
        );
        let n = self.bytes / size;
        let mut v = Vec::<T>::with_capacity(n);
        // SAFETY: n elements fit in both; every bit pattern is a valid T (Elem); the buffer is
        // aligned for any Elem.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.as_ptr() as *const T, v.as_mut_ptr(), n);
            v.set_len(n);
        }
        v
    }

    pub fn len_bytes(&self) -> usize {
        self.bytes
    }

    /// The "device address".
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated in `filled` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.bytes)) };
    }
}

impl std::fmt::Debug for DeviceBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceBuffer({:p}, {} bytes)", self.ptr, self.bytes)
    }
}
