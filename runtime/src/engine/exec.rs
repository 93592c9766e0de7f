//! The native CUDA executor: runs a compiled [`Program`] on the GPU in float16 (or float32)
//! with NVRTC kernels (`kernels/cuda/engine_ops.cu`, the attention kernels), cuBLASLt for the
//! Linear GEMMs (float32 accumulation, bias and residual in the epilogue), cuBLAS for the batched
//! ones and cuDNN for the convolutions (cuBLASLt and cuDNN algorithms chosen by timing them on
//! this GPU, through a [`TacticCache`]). Activations live in one arena placed by lifetime
//! ([`plan_memory`](super::program::plan_memory)); weights are uploaded once. The step sequence is fixed, so it is captured in
//! a CUDA graph and replayed. Everything is loaded dynamically and probed first: on a machine
//! without a GPU, [`CudaDevice::open`] returns an error, never a panic.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::c_void;
use std::rc::Rc;
use std::sync::Arc;

use cudarc::cublas::sys as cublas;
use cudarc::cublaslt::sys as lt;
use cudarc::cudnn::sys as cudnn;
use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaGraph, CudaSlice, CudaStream, DevicePtr, DeviceRepr,
    LaunchConfig, PinnedHostSlice, PushKernelArg,
};
use serde::{Deserialize, Serialize};

pub use super::launch::WeightData;
use super::launch::{
    cast_launch, check_launchable, conv_igemm_launch, conv_igemm_ok, elementwise_launch,
    geglu_pairs, gemm_geglu_launch, group_norm_scratch, group_norm_splits, norm_gemm_launch,
    norm_pairs, opt_in_smem, place_buffers, plan_memory_for, plan_memory_fused, rebase_activations,
    specialize, step_ops, tactic_agrees, tactic_fill_block, tactic_io, ConvDesc, Ctx, GemmCall,
    KArg, Launch, LtCall, LtDesc, LtLayout, Op, TacticIo, CONV_IGEMM_WIDTHS,
};
use super::program::{ConvStep, DType, MemoryPlan, Program, Step, Strided};
use super::EngineError;

// SAFETY: `Strided` is `#[repr(C)]` plain data matching `struct Strided` in engine_ops.cu.
unsafe impl DeviceRepr for Strided {}

fn gpu_err(what: &str, e: impl std::fmt::Debug) -> EngineError {
    EngineError::Graph(format!("CUDA: {what}: {e:?}"))
}

/// Float type of the activations and weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    Fp32,
    Fp16,
}

impl Precision {
    pub fn elem_bytes(self) -> usize {
        match self {
            Precision::Fp32 => 4,
            Precision::Fp16 => 2,
        }
    }
    fn suffix(self) -> &'static str {
        match self {
            Precision::Fp32 => "f32",
            Precision::Fp16 => "f16",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "fp32" | "float32" => Some(Self::Fp32),
            "fp16" | "float16" => Some(Self::Fp16),
            _ => None,
        }
    }
}

/// What an engine is keyed by: loading it elsewhere is refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceKey {
    pub gpu_name: String,
    pub gpu_uuid: String,
    pub compute_capability: String,
    pub driver: String,
    pub cuda: String,
    pub cublas: String,
    /// cuBLASLt's version (`cublasLtGetVersion`; it may be loaded from another folder than
    /// cuBLAS): its algorithm words are only valid for it. Empty in engines built before it was
    /// recorded, which are then refused (rebuilt).
    #[serde(default)]
    pub cublaslt: String,
    pub cudnn: String,
    pub motionrt: String,
}

impl DeviceKey {
    /// The fields in which `other` differs from this key: `(name, this value, other value)`.
    pub fn differences(&self, other: &DeviceKey) -> Vec<(String, String, String)> {
        let a = serde_json::to_value(self).expect("plain struct");
        let b = serde_json::to_value(other).expect("plain struct");
        let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
            return Vec::new();
        };
        a.iter()
            .filter(|(k, v)| b.get(*k) != Some(*v))
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.to_string(),
                    b.get(k).cloned().unwrap_or_default().to_string(),
                )
            })
            .collect()
    }
}

/// Chosen cuDNN algorithms by problem (`ConvStep::problem` + precision) and cuBLASLt algorithms
/// by problem ([`LtDesc::problem`] + precision). Building with the same cache gives the same
/// choices, so the same engine.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TacticCache {
    pub conv: BTreeMap<String, ConvTactic>,
    /// Absent in caches written before GEMM algorithms were timed.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub gemm: BTreeMap<String, GemmTactic>,
    /// Feed-forward projections with their GEGLU, by problem ([`geglu_key`]): `gemm_geglu_f16_nBN`
    /// against cuBLASLt and `geglu`. Absent in caches written before that kernel.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub geglu: BTreeMap<String, FusedTactic>,
    /// GroupNorms and the convolutions of their outputs, by problem ([`norm_pair_key`]):
    /// `conv_igemm_gn_f16_nBN` against the two steps. Absent in caches written before that kernel.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub norm_pair: BTreeMap<String, FusedTactic>,
    /// Attentions on `attention_tiled_f16_d40`, by problem ([`attention_key`]): that kernel
    /// against `attention_tiled2_f16_d40` (two 16-row tiles a warp). Absent in caches written
    /// before the second.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attention: BTreeMap<String, AttentionTactic>,
    /// Only the libraries' algorithms (cuDNN, cuBLASLt) and the kernels every program runs:
    /// motionrt's own tactic kernels — `conv_igemm_f16_nBN`, `gemm_geglu_f16_nBN`,
    /// `conv_igemm_gn/_ln_f16_nBN`, `attention_tiled2_f16_d40` — neither timed nor used, whatever
    /// the maps above say (`motionrt build --no-kernel-tactics`: an engine that runs without
    /// them, should one of them misbehave on a GPU; kept in the engine, so `run --engine` times
    /// none for new shapes either). Absent (false) in caches written before.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub library_only: bool,
}

/// A timing-cache key for an attention: sequences x heads x query rows x keys x head size (and
/// the sequences interleaved, when more than one), and precision.
pub fn attention_key(st: &Step, precision: Precision) -> Option<String> {
    let Step::Attention {
        n,
        l,
        s,
        heads,
        d,
        ns,
        ..
    } = st
    else {
        return None;
    };
    let il = if *ns > 1 {
        format!(" ns{ns}")
    } else {
        String::new()
    };
    Some(format!(
        "{n}x{heads}x{l}x{s}x{d}{il} {}",
        precision.suffix()
    ))
}

/// An attention's two kernels' mean times (ms; `f32::MAX` for one that did not run).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AttentionTactic {
    /// `attention_tiled_f16_d40`: 8 warps of one 16-row tile.
    pub ms: f32,
    /// `attention_tiled2_f16_d40`: 4 warps of two 16-row tiles sharing each K and V fragment.
    pub two_ms: f32,
}

impl AttentionTactic {
    /// Whether the two-tile kernel runs it (it timed faster): a decision from recorded times.
    pub fn two(&self) -> bool {
        self.two_ms < self.ms
    }
}

/// A timing-cache key for a GEGLU pair: its projection's problem (rows x 2d x k, with the
/// bias) and precision.
pub fn geglu_key(m: usize, d: usize, k: usize, bias: bool, precision: Precision) -> String {
    format!(
        "{m}x{}x{k}{} {}",
        2 * d,
        if bias { "+bias" } else { "" },
        precision.suffix()
    )
}

/// A timing-cache key for a normalisation pair: the second step's problem, the normalisation
/// ([`norm_desc`]) and precision.
pub fn norm_pair_key(problem: &str, norm: &str, precision: Precision) -> String {
    format!("{problem} after {norm} {}", precision.suffix())
}

/// What a normalisation pair's first step adds to its key: a GroupNorm's groups, samples, SiLU
/// and input biases (`gn32x2+silu+bias`), a LayerNorm's beta (`ln+beta`).
pub fn norm_desc(st: &Step) -> Option<String> {
    match st {
        Step::GroupNorm {
            groups,
            n,
            silu,
            x_bias,
            x_sbias,
            ..
        } => Some(format!(
            "gn{groups}x{n}{}{}",
            if *silu { "+silu" } else { "" },
            if x_bias.is_some() || x_sbias.is_some() {
                "+bias"
            } else {
                ""
            }
        )),
        Step::LayerNorm { beta, .. } => {
            Some(format!("ln{}", if beta.is_some() { "+beta" } else { "" }))
        }
        _ => None,
    }
}

/// Two steps one kernel may do: the time of the two as they are and of the faster tile width
/// of that kernel. A feed-forward projection and its GEGLU (cuBLASLt's timed algorithm, then
/// `geglu`; `gemm_geglu_f16_nBN`), or a GroupNorm and the convolution of its output (the
/// GroupNorm's passes, then the convolution as chosen alone; the GroupNorm's statistics and
/// `conv_igemm_gn_f16_nBN`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FusedTactic {
    /// Mean time of the two steps (ms).
    pub ms: f32,
    /// Mean time with the faster width of the kernel doing both (ms; `f32::MAX` when none ran).
    pub fused_ms: f32,
    /// Its tile width BN (64 or 128); none where no width ran, or where the faster one did not
    /// compute what the two steps do (the engine's check when it timed it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fused_n: Option<usize>,
}

impl FusedTactic {
    /// The tile width of the kernel that runs the pair, if one does (it timed faster than the
    /// two steps). A decision from recorded times, so the same cache gives the same engine.
    pub fn fused(&self) -> Option<usize> {
        (self.fused_ms < self.ms).then_some(self.fused_n).flatten()
    }
}

/// A timing cache file (`motionrt build --timing-cache`, `motionrt run --engine --timing-cache`;
/// one file may serve both): the algorithms chosen by timing them, with the GPU and library
/// versions they were timed with. cuBLASLt's algorithm words are only valid for the cuBLASLt
/// that produced them, so a cache timed elsewhere is not used ([`TimingCache::load_for`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimingCache {
    pub device: DeviceKey,
    pub tactics: TacticCache,
}

impl TimingCache {
    pub fn read(path: &std::path::Path) -> Result<Self, EngineError> {
        read_json(path, "a timing cache")
    }

    /// Write it to `path` (a temporary name of this process, then renamed).
    pub fn write(&self, path: &std::path::Path) -> Result<(), EngineError> {
        write_json(self, path)
    }

    /// The algorithms of the cache at `path` that may be used on `device`: all of them when they
    /// were timed with this GPU and these versions, none when the file does not exist. A cache
    /// timed on another GPU or with other versions, or written by a motionrt that did not record
    /// them (a bare algorithm table), gives none and a note saying why (the caller rewrites the
    /// file). Anything else at `path` is an error naming it.
    pub fn load_for(
        path: &std::path::Path,
        device: &DeviceKey,
    ) -> Result<(TacticCache, Option<String>), EngineError> {
        if !path.exists() {
            return Ok((TacticCache::default(), None));
        }
        let unused = |why: &str| {
            Some(format!(
                "{}: {why}; not used (rewritten with this machine's choices)",
                path.display()
            ))
        };
        match Self::read(path) {
            Ok(c) if &c.device == device => Ok((c.tactics, None)),
            Ok(c) => {
                let diff: Vec<String> = c
                    .device
                    .differences(device)
                    .into_iter()
                    .map(|(k, _, _)| k)
                    .collect();
                Ok((
                    TacticCache::default(),
                    unused(&format!(
                        "timed on another GPU or with other library versions ({} differ)",
                        diff.join(", ")
                    )),
                ))
            }
            Err(e) => match read_json::<TacticCache>(path, "a timing cache") {
                Ok(_) => Ok((
                    TacticCache::default(),
                    unused("written by an older motionrt without the GPU and versions it was timed with"),
                )),
                Err(_) => Err(e),
            },
        }
    }
}

fn read_json<T: serde::de::DeserializeOwned>(
    path: &std::path::Path,
    what: &str,
) -> Result<T, EngineError> {
    let text = std::fs::read_to_string(path).map_err(|e| EngineError::File {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    serde_json::from_str(&text).map_err(|e| EngineError::File {
        path: path.to_path_buf(),
        message: format!("not {what}: {e}"),
    })
}

/// `v` as pretty JSON at `path`, through a temporary name of this process (two writers never
/// share one), renamed into place.
fn write_json<T: Serialize>(v: &T, path: &std::path::Path) -> Result<(), EngineError> {
    let err = |e: std::io::Error| EngineError::File {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let tmp = path.with_extension(format!("json.{}.tmp", std::process::id()));
    let _unfinished = motionrt_kernels::unfinished::register(&tmp);
    let text = serde_json::to_string_pretty(v).expect("plain data") + "\n";
    std::fs::write(&tmp, text)
        .and_then(|_| motionrt_kernels::unfinished::commit(|| std::fs::rename(&tmp, path)))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            err(e)
        })
}

/// A cuBLASLt algorithm chosen by timing the heuristic's candidates on this GPU.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GemmTactic {
    /// The opaque `cublasLtMatmulAlgo_t`, which cuBLASLt documents as serializable for reuse with
    /// the same cuBLAS version (the engine's key has it; a cached one cuBLASLt no longer accepts
    /// is timed again).
    pub algo: [u64; 8],
    /// Mean time of one matmul with it when chosen (ms).
    pub ms: f32,
    /// The heuristic's first candidate, which an untimed plan would run, and its time (ms;
    /// `None` when it did not run: JSON has no NaN).
    pub heuristic_first: [u64; 8],
    #[serde(default)]
    pub heuristic_first_ms: Option<f32>,
    /// How many candidates were timed.
    pub candidates: usize,
}

impl TacticCache {
    /// Add `other`'s choices for problems this cache has none for (its own are kept, and its
    /// [`TacticCache::library_only`]).
    pub fn merge(&mut self, other: &TacticCache) {
        for (k, v) in &other.conv {
            self.conv.entry(k.clone()).or_insert(*v);
        }
        for (k, v) in &other.gemm {
            self.gemm.entry(k.clone()).or_insert(*v);
        }
        for (k, v) in &other.geglu {
            self.geglu.entry(k.clone()).or_insert(*v);
        }
        for (k, v) in &other.norm_pair {
            self.norm_pair.entry(k.clone()).or_insert(*v);
        }
        for (k, v) in &other.attention {
            self.attention.entry(k.clone()).or_insert(*v);
        }
    }

    /// The `conv_igemm_f16_nBN` tile width that runs convolution problem `key`, if one does
    /// ([`ConvTactic::igemm`]; none in a [`TacticCache::library_only`] cache).
    pub fn conv_kernel(&self, key: &str) -> Option<usize> {
        let t = self.conv.get(key).filter(|_| !self.library_only)?;
        t.igemm()
    }

    /// The `gemm_geglu_f16_nBN` tile width that runs GEGLU pair `key` ([`geglu_key`]), if one
    /// does (none in a [`TacticCache::library_only`] cache).
    pub fn geglu_kernel(&self, key: &str) -> Option<usize> {
        let t = self.geglu.get(key).filter(|_| !self.library_only)?;
        t.fused()
    }

    /// The `conv_igemm_gn/_ln_f16_nBN` tile width that runs normalisation pair `key`
    /// ([`norm_pair_key`]), if one does (none in a [`TacticCache::library_only`] cache).
    pub fn norm_kernel(&self, key: &str) -> Option<usize> {
        let t = self.norm_pair.get(key).filter(|_| !self.library_only)?;
        t.fused()
    }

    /// Whether attention problem `key` ([`attention_key`]) runs on `attention_tiled2_f16_d40`
    /// (never in a [`TacticCache::library_only`] cache).
    pub fn attention_two(&self, key: &str) -> bool {
        !self.library_only && self.attention.get(key).is_some_and(AttentionTactic::two)
    }

    /// The same cache with every attention it timed on `attention_tiled2_f16_d40`, whatever the
    /// timing said (for checking that kernel on a GPU where the one-tile kernel won).
    pub fn forced_attention_two(&self) -> Self {
        let mut c = self.clone();
        for t in c.attention.values_mut() {
            t.two_ms = f32::MIN;
        }
        c
    }

    /// The same cache with every attention on the one-tile kernel, for measuring what the
    /// two-tile kernel gains, side by side.
    pub fn one_tile_attention(&self) -> Self {
        let mut c = self.clone();
        for t in c.attention.values_mut() {
            t.two_ms = f32::MAX;
        }
        c
    }

    /// The same cache with every normalisation pair `conv_igemm_gn/_ln_f16_n{bn}`
    /// computes on that kernel, whatever the timing said.
    pub fn forced_norm_pairs(&self, bn: usize) -> Self {
        let mut c = self.clone();
        for t in c.norm_pair.values_mut() {
            (t.fused_ms, t.fused_n) = (f32::MIN, Some(bn));
        }
        c
    }

    /// The same cache with every normalisation pair as two steps, for measuring what
    /// `conv_igemm_gn_f16` gains, side by side.
    pub fn unfused_norm_pairs(&self) -> Self {
        let mut c = self.clone();
        for t in c.norm_pair.values_mut() {
            (t.fused_ms, t.fused_n) = (f32::MAX, None);
        }
        c
    }

    /// The same cache with every GEGLU pair `gemm_geglu_f16_n{bn}` computes on that kernel,
    /// whatever the timing said (for checking the kernel on a GPU where the two steps won).
    pub fn forced_geglu(&self, bn: usize) -> Self {
        let mut c = self.clone();
        for t in c.geglu.values_mut() {
            (t.fused_ms, t.fused_n) = (f32::MIN, Some(bn));
        }
        c
    }

    /// The same cache with every GEGLU pair as two steps (`gemm_geglu_f16` recorded as slower,
    /// so not timed again), for measuring what that kernel gains, side by side.
    pub fn unfused_geglu(&self) -> Self {
        let mut c = self.clone();
        for t in c.geglu.values_mut() {
            (t.fused_ms, t.fused_n) = (f32::MAX, None);
        }
        c
    }

    /// The same cache with every convolution `conv_igemm_f16_n{bn}` computes on that kernel,
    /// whatever the timing said (for checking the kernel on a GPU where cuDNN won).
    pub fn forced_igemm(&self, bn: usize) -> Self {
        let mut c = self.clone();
        for t in c.conv.values_mut() {
            (t.igemm_ms, t.igemm_n) = (Some(f32::MIN), Some(bn));
        }
        c
    }

    /// The same cache with every convolution on cuDNN (`conv_igemm_f16` recorded as slower where
    /// it was timed, so not timed again), for measuring what that kernel gains, side by side.
    pub fn cudnn_convs(&self) -> Self {
        let mut c = self.clone();
        for t in c.conv.values_mut() {
            if t.igemm_ms.is_some() {
                (t.igemm_ms, t.igemm_n) = (Some(f32::MAX), None);
            }
        }
        c
    }

    /// The same cache with every GEMM running the heuristic's first candidate instead of the
    /// timed choice (for measuring what timing gains, side by side); a problem whose first
    /// candidate did not run keeps its timed choice.
    pub fn heuristic_gemms(&self) -> Self {
        let mut c = self.clone();
        for t in c.gemm.values_mut() {
            if let Some(ms) = t.heuristic_first_ms {
                t.algo = t.heuristic_first;
                t.ms = ms;
            }
        }
        c
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ConvTactic {
    pub algo: i32,
    /// The math type cuDNN timed the algorithm with (tensor-op or not); absent in caches written
    /// before it was recorded, which then run the precision's math type (as they were timed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub math: Option<i32>,
    /// Workspace bytes cuDNN reported when timing (a record: at load the executor asks cuDNN for
    /// the pair's workspace again).
    pub workspace: usize,
    /// Median time measured by cuDNN when it was chosen (ms).
    pub ms: f32,
    /// Mean time of the faster `conv_igemm_f16_nBN` on the same problem (ms; `f32::MAX` when
    /// none ran), where those kernels apply ([`super::launch::conv_igemm_ok`]), timed with
    /// cuDNN's algorithms; absent in caches and engines written before these kernels, whose
    /// convolutions stay on cuDNN (not timed on load). The kernel runs the convolution when this
    /// is below `ms` ([`ConvTactic::igemm`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub igemm_ms: Option<f32>,
    /// That kernel's tile width BN (64 or 128); none where no width ran, or where the faster one
    /// did not compute what cuDNN does (the engine's check when it timed it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub igemm_n: Option<usize>,
}

impl ConvTactic {
    /// The `conv_igemm_f16_nBN` tile width that runs this convolution, if one does: it was timed
    /// and was faster than cuDNN's choice as cuDNN timed it (which leaves out the bias/residual
    /// pass the kernel does not need: the comparison favours cuDNN). A decision from recorded
    /// times, so the same cache gives the same engine.
    pub fn igemm(&self) -> Option<usize> {
        self.igemm_ms
            .is_some_and(|k| k < self.ms)
            .then_some(self.igemm_n)
            .flatten()
    }
}

/// An open GPU with the engine's kernels and library handles.
pub struct CudaDevice {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    /// Device → host copies of outputs, so they overlap the next run's compute.
    pub copy: Arc<CudaStream>,
    pub key: DeviceKey,
    /// Every kernel, with the most threads a block of it may have (its registers decide).
    functions: HashMap<String, (CudaFunction, u32)>,
    /// Most dynamic shared memory a block may opt in to on this GPU.
    smem_optin: usize,
    blas: cublas::cublasHandle_t,
    lt: lt::cublasLtHandle_t,
    dnn: cudnn::cudnnHandle_t,
    /// GEMM workspace, shared by cuBLAS and cuBLASLt (one stream orders them).
    _blas_ws: CudaSlice<u8>,
    blas_ws_ptr: u64,
}

/// Bytes of the GEMM workspace.
const BLAS_WS: usize = 64 << 20;

fn check_blas(what: &str, s: cublas::cublasStatus_t) -> Result<(), EngineError> {
    if s == cublas::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(gpu_err(what, s))
    }
}
fn check_dnn(what: &str, s: cudnn::cudnnStatus_t) -> Result<(), EngineError> {
    if s == cudnn::cudnnStatus_t::CUDNN_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(gpu_err(what, s))
    }
}

fn arch_name(major: i32, minor: i32) -> &'static str {
    match (major, minor) {
        (8, 0) => "sm_80",
        (8, 6) => "sm_86",
        (8, 9) => "sm_89",
        (9, _) => "sm_90",
        (10, _) => "sm_100",
        (12, _) => "sm_120",
        (m, _) if m > 12 => "sm_120",
        _ => "sm_80",
    }
}

/// The value of `all` whose C number is `v` (read from a timing cache), or an error naming it.
fn cached_enum<T: Copy>(
    all: &[T],
    number: impl Fn(T) -> i32,
    v: i32,
    what: &str,
) -> Result<T, EngineError> {
    all.iter()
        .copied()
        .find(|&x| number(x) == v)
        .ok_or_else(|| EngineError::Graph(format!("{what} {v} is not one cuDNN has")))
}

/// What the engine needs of the GPU, its driver and NVRTC, checked before any kernel is
/// compiled: compute capability 8.0 (the kernels' `mma.sync`/`ldmatrix`/`cp.async`), a CUDA 13
/// driver (motionrt is built against its API), and an NVRTC of no newer major version than the
/// driver: the kernels load as machine code (cubins), which CUDA's minor-version compatibility
/// lets a CUDA 13.0 driver run from any CUDA 13 NVRTC (their PTX it would refuse from a newer
/// minor version; PTX is only the fallback for a GPU the cubin was not made for). `drv` is
/// `cuDriverGetVersion`'s number (13000: 13.0).
fn check_versions(cc: (i32, i32), drv: i32, nvrtc: (i32, i32)) -> Result<(), String> {
    if cc.0 < 8 {
        return Err(format!(
            "the native CUDA engine needs a GPU of compute capability 8.0 or newer; this one is \
             {}.{} (use the ONNX Runtime backend)",
            cc.0, cc.1
        ));
    }
    let v = |n: i32| format!("{}.{}", n / 1000, (n % 1000) / 10);
    if drv < 13000 {
        return Err(format!(
            "the native CUDA engine needs an NVIDIA driver for CUDA 13.0 or newer; this one \
             supports CUDA {}",
            v(drv)
        ));
    }
    if nvrtc.0 > drv / 1000 {
        return Err(format!(
            "NVRTC {}.{} makes machine code the driver (CUDA {}) cannot load: update the driver, \
             or install an NVRTC of the driver's CUDA major version (python3 -m pip install \
             'nvidia-cuda-nvrtc=={}.*', or set MOTIONRT_NVRTC)",
            nvrtc.0,
            nvrtc.1,
            v(drv),
            drv / 1000
        ));
    }
    Ok(())
}

/// Missing libraries, by name (the probe's view), before anything is called.
pub fn missing_libraries() -> Vec<&'static str> {
    // libraries only the probe's search finds (Python packages' folders) are loaded by path
    motionrt_kernels::probe::preload_libraries();
    let mut m = Vec::new();
    // SAFETY: only dlopen attempts on each library's names.
    unsafe {
        if !cudarc::driver::sys::is_culib_present() {
            m.push("libcuda (the NVIDIA driver)");
        }
        if !cublas::is_culib_present() {
            m.push("libcublas");
        }
        if !lt::is_culib_present() {
            m.push("libcublasLt");
        }
        if !cudnn::is_culib_present() {
            m.push("libcudnn");
        }
    }
    if motionrt_kernels::cuda::ensure_nvrtc().is_err() {
        m.push("libnvrtc");
    }
    m
}

impl CudaDevice {
    /// Open GPU `ordinal`, compile (or load from the kernel cache) the engine's kernels, create
    /// the cuBLAS and cuDNN handles.
    pub fn open(ordinal: usize) -> Result<Self, EngineError> {
        let missing = missing_libraries();
        if !missing.is_empty() {
            return Err(EngineError::Graph(format!(
                "the native CUDA engine needs {}; run `motionrt probe` for install hints",
                missing.join(", ")
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| gpu_err("open device", e))?;
        // The executor orders its work itself (one stream, raw pointers): no per-slice events,
        // which would also break CUDA-graph capture.
        // SAFETY: called before any allocation of this context.
        unsafe { ctx.disable_event_tracking() };
        // a stream of its own: the legacy default stream cannot be captured
        let stream = ctx.new_stream().map_err(|e| gpu_err("stream", e))?;
        let copy = ctx.new_stream().map_err(|e| gpu_err("stream", e))?;
        let (major, minor) = ctx.compute_capability().map_err(|e| gpu_err("cc", e))?;
        let mut drv = 0;
        // SAFETY: plain query.
        unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut drv) }
            .result()
            .map_err(|e| gpu_err("cuDriverGetVersion", e))?;
        let nvrtc = motionrt_kernels::cuda::nvrtc_version().unwrap_or((0, 0));
        check_versions((major, minor), drv, nvrtc).map_err(EngineError::Graph)?;
        let arch = arch_name(major, minor);
        let smem_optin = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )
            .map_err(|e| gpu_err("device attribute", e))? as usize;
        let mut functions = HashMap::new();
        for (name, _) in motionrt_kernels::cuda::SOURCES {
            if !["engine_ops", "temporal_attention"].contains(name) {
                continue;
            }
            let c = motionrt_kernels::cuda::compile(name, arch)
                .map_err(|e| EngineError::Graph(e.to_string()))?;
            let module = motionrt_kernels::gpu::load_compiled(&ctx, &c)
                .map_err(|e| EngineError::Graph(format!("CUDA: {e}")))?;
            for line in c.ptx.lines() {
                let l = line.trim();
                if let Some(rest) = l.strip_prefix(".visible .entry ") {
                    let f = rest.split('(').next().unwrap_or("").trim().to_string();
                    let func = module
                        .load_function(&f)
                        .map_err(|e| gpu_err("load function", e))?;
                    // the attention kernels' shared memory can pass the 48 KiB default: allow
                    // it once here (not while a CUDA graph is being captured), where this GPU
                    // can (the dispatch avoids a kernel it cannot)
                    // (the float32 temporal attention's need depends on the shape: up to the 200 KiB
                    // its dispatch allows, once, so that no launch sets a function-wide limit a
                    // captured launch of another size would then be held to)
                    let need = if f.starts_with("temporal_attention_") {
                        Some((200 * 1024).min(smem_optin))
                    } else {
                        opt_in_smem(&f).filter(|&b| b <= smem_optin)
                    };
                    if let Some(bytes) = need.filter(|&b| b > 48 * 1024) {
                        func.set_attribute(
                            cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                            bytes as i32,
                        )
                        .map_err(|e| gpu_err("shared memory", e))?;
                    }
                    let max_threads = func
                        .get_attribute(
                            cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK,
                        )
                        .map_err(|e| gpu_err("function attribute", e))?
                        as u32;
                    functions.insert(f, (func, max_threads));
                }
            }
        }
        let blas_ws = stream
            .alloc_zeros::<u8>(BLAS_WS)
            .map_err(|e| gpu_err("alloc", e))?;
        // destroys what was created if `open` returns early; emptied into `Self` at the end
        let mut h = LibHandles::default();
        // SAFETY: creates a handle, destroyed by `h` or by the device's Drop.
        let st = unsafe { lt::cublasLtCreate(&mut h.lt) };
        if st != lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            return Err(gpu_err("cublasLtCreate", st));
        }
        let (ws_ptr, _g) = blas_ws.device_ptr(&stream);
        // SAFETY: handles are created and bound to this context's stream; the workspace lives as
        // long as the device.
        let (blas_ver, dnn_ver) = unsafe {
            check_blas("cublasCreate", cublas::cublasCreate_v2(&mut h.blas))?;
            check_blas(
                "cublasSetStream",
                cublas::cublasSetStream_v2(h.blas, stream.cu_stream() as _),
            )?;
            check_blas(
                "cublasSetWorkspace",
                cublas::cublasSetWorkspace_v2(h.blas, ws_ptr as *mut c_void, BLAS_WS),
            )?;
            check_dnn("cudnnCreate", cudnn::cudnnCreate(&mut h.dnn))?;
            check_dnn(
                "cudnnSetStream",
                cudnn::cudnnSetStream(h.dnn, stream.cu_stream() as _),
            )?;
            let mut v = 0;
            check_blas(
                "cublasGetVersion",
                cublas::cublasGetVersion_v2(h.blas, &mut v),
            )?;
            (v, cudnn::cudnnGetVersion())
        };
        drop(_g);
        let uuid = ctx.uuid().map_err(|e| gpu_err("uuid", e))?;
        let uuid: String = uuid
            .bytes
            .iter()
            .map(|b| format!("{:02x}", *b as u8))
            .collect();
        let key = DeviceKey {
            gpu_name: ctx.name().map_err(|e| gpu_err("name", e))?,
            gpu_uuid: uuid,
            compute_capability: format!("{major}.{minor}"),
            driver: format!("CUDA driver API {}.{}", drv / 1000, (drv % 1000) / 10),
            cuda: format!("NVRTC {}.{}", nvrtc.0, nvrtc.1),
            cublas: blas_ver.to_string(),
            // SAFETY: no arguments; the library is loaded (the handle was created above).
            cublaslt: unsafe { lt::cublasLtGetVersion() }.to_string(),
            cudnn: dnn_ver.to_string(),
            motionrt: env!("CARGO_PKG_VERSION").to_string(),
        };
        let (blas, lt_handle, dnn) = h.release();
        Ok(Self {
            ctx,
            stream,
            copy,
            key,
            functions,
            smem_optin,
            blas,
            lt: lt_handle,
            dnn,
            _blas_ws: blas_ws,
            blas_ws_ptr: ws_ptr,
        })
    }

    fn func(&self, name: &str) -> Result<&(CudaFunction, u32), EngineError> {
        self.functions
            .get(name)
            .ok_or_else(|| EngineError::Graph(format!("kernel {name} is not loaded")))
    }
}

impl Drop for CudaDevice {
    fn drop(&mut self) {
        // the libraries' destroy calls synchronize the device: make it this context, whatever
        // thread drops the device
        let _ = self.ctx.bind_to_thread();
        drop(LibHandles {
            blas: self.blas,
            lt: self.lt,
            dnn: self.dnn,
        });
    }
}

/// cuBLAS, cuBLASLt and cuDNN handles, each destroyed once when the value drops (null: none).
struct LibHandles {
    blas: cublas::cublasHandle_t,
    lt: lt::cublasLtHandle_t,
    dnn: cudnn::cudnnHandle_t,
}

impl Default for LibHandles {
    fn default() -> Self {
        Self {
            blas: std::ptr::null_mut(),
            lt: std::ptr::null_mut(),
            dnn: std::ptr::null_mut(),
        }
    }
}

impl LibHandles {
    /// The handles, no longer destroyed by this value.
    fn release(
        self,
    ) -> (
        cublas::cublasHandle_t,
        lt::cublasLtHandle_t,
        cudnn::cudnnHandle_t,
    ) {
        let r = (self.blas, self.lt, self.dnn);
        std::mem::forget(self);
        r
    }
}

impl Drop for LibHandles {
    fn drop(&mut self) {
        // SAFETY: handles created by `CudaDevice::open` (null where it stopped before them),
        // destroyed once: `release` forgets the value that hands them on.
        unsafe {
            if !self.blas.is_null() {
                cublas::cublasDestroy_v2(self.blas);
            }
            if !self.lt.is_null() {
                lt::cublasLtDestroy(self.lt);
            }
            if !self.dnn.is_null() {
                cudnn::cudnnDestroy(self.dnn);
            }
        }
    }
}

struct ConvPrep {
    x: cudnn::cudnnTensorDescriptor_t,
    y: cudnn::cudnnTensorDescriptor_t,
    w: cudnn::cudnnFilterDescriptor_t,
    conv: cudnn::cudnnConvolutionDescriptor_t,
    algo: cudnn::cudnnConvolutionFwdAlgo_t,
}

impl Drop for ConvPrep {
    fn drop(&mut self) {
        // SAFETY: created in prepare_convs (null until then), destroyed once.
        unsafe {
            if !self.x.is_null() {
                cudnn::cudnnDestroyTensorDescriptor(self.x);
            }
            if !self.y.is_null() {
                cudnn::cudnnDestroyTensorDescriptor(self.y);
            }
            if !self.w.is_null() {
                cudnn::cudnnDestroyFilterDescriptor(self.w);
            }
            if !self.conv.is_null() {
                cudnn::cudnnDestroyConvolutionDescriptor(self.conv);
            }
        }
    }
}

/// A Linear step as one cuBLASLt matmul: bias in the epilogue, the residual as `C` (β = 1).
struct LtPlan {
    desc: lt::cublasLtMatmulDesc_t,
    a: lt::cublasLtMatrixLayout_t,
    b: lt::cublasLtMatrixLayout_t,
    c: lt::cublasLtMatrixLayout_t,
    algo: lt::cublasLtMatmulAlgo_t,
    beta: f32,
    /// The bias address the descriptor holds (`CUBLASLT_MATMUL_DESC_BIAS_POINTER`): a call
    /// whose bias lives elsewhere (an activation the arena moved) sets it again before it runs.
    bias: std::cell::Cell<Option<u64>>,
}

/// Heuristic candidates timed per GEMM problem, and timed runs of each (after one warm-up).
const LT_CANDIDATES: usize = 8;
const LT_TIMED_RUNS: usize = 5;

fn lt_check(what: &str, st: lt::cublasStatus_t) -> Result<(), String> {
    if st == lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(format!("{what}: {st:?}"))
    }
}

/// The alignment cuBLASLt may assume of a pointer: its largest power-of-two divisor, at most the
/// 256 bytes cuBLASLt's heuristic assumes by default.
fn lt_alignment(ptr: u64) -> u32 {
    1 << ptr.trailing_zeros().min(8)
}

/// A cuBLASLt matmul's timing-cache key: its problem and precision, and each pointer's
/// alignment (A, B, C, D with the bias) when one is under 256 bytes. The heuristic is told how
/// aligned each pointer is (`candidates`) and an algorithm check takes no pointers, so an
/// algorithm chosen for 256-byte-aligned buffers (the arena's and the weights', so far always)
/// is not reused for less aligned ones.
fn lt_key(d: &LtDesc, call: &LtCall, precision: Precision) -> String {
    let c = if d.beta != 0.0 { call.res } else { call.out };
    let d_align = lt_alignment(call.out).min(d.bias.map_or(256, lt_alignment));
    let align = [
        lt_alignment(call.a),
        lt_alignment(call.b),
        lt_alignment(c),
        d_align,
    ];
    if align.iter().any(|&x| x < 256) {
        let [a, b, c, dd] = align;
        format!(
            "{} {} align{a}/{b}/{c}/{dd}",
            d.problem(),
            precision.suffix()
        )
    } else {
        format!("{} {}", d.problem(), precision.suffix())
    }
}

impl LtPlan {
    /// The matmul `d` describes ([`LtDesc::linear`] for a Linear step), with the algorithm
    /// `tactics` has for its problem, or else the fastest of cuBLASLt's heuristic candidates timed
    /// on `call`'s buffers (added to `tactics`). `Ok(Err(reason))` when cuBLASLt has no
    /// algorithm for it: the step then runs as a GEMM and a bias/residual pass. `Err` when the
    /// GPU faulted while algorithms ran (the context is lost: nothing later can run).
    fn new(
        dev: &CudaDevice,
        precision: Precision,
        d: &LtDesc,
        call: &LtCall,
        tactics: &mut TacticCache,
    ) -> Result<Result<Self, String>, EngineError> {
        let r = Self::plan(dev, precision, d, call, tactics);
        // a refusal is cuBLASLt's answer; a fault shows on the stream
        dev.stream.synchronize().map_err(|e| {
            EngineError::Graph(format!(
                "cuBLASLt {} {}: the GPU faulted while its algorithms ran ({e:?}){}",
                d.problem(),
                precision.suffix(),
                r.as_ref().err().map_or(String::new(), |r| format!("; {r}"))
            ))
        })?;
        Ok(r)
    }

    fn plan(
        dev: &CudaDevice,
        precision: Precision,
        d: &LtDesc,
        call: &LtCall,
        tactics: &mut TacticCache,
    ) -> Result<Self, String> {
        let check = lt_check;
        let dt = match precision {
            Precision::Fp32 => lt::cudaDataType_t::CUDA_R_32F,
            Precision::Fp16 => lt::cudaDataType_t::CUDA_R_16F,
        };
        let mut p = LtPlan {
            desc: std::ptr::null_mut(),
            a: std::ptr::null_mut(),
            b: std::ptr::null_mut(),
            c: std::ptr::null_mut(),
            // SAFETY: plain data, set below.
            algo: unsafe { std::mem::zeroed() },
            beta: d.beta,
            bias: std::cell::Cell::new(d.bias),
        };
        // SAFETY: descriptors created here are destroyed by Drop (also on the error paths, as
        // `p` is dropped); attribute buffers are locals of the stated sizes.
        unsafe {
            check(
                "cublasLtMatmulDescCreate",
                lt::cublasLtMatmulDescCreate(
                    &mut p.desc,
                    lt::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    lt::cudaDataType_t::CUDA_R_32F,
                ),
            )?;
            let set = |attr: lt::cublasLtMatmulDescAttributes_t, v: *const c_void, len: usize| {
                check(
                    "cublasLtMatmulDescSetAttribute",
                    lt::cublasLtMatmulDescSetAttribute(p.desc, attr, v, len),
                )
            };
            // CUBLAS_OP_T = 1, CUBLAS_OP_N = 0
            let (op_a, op_b) = (d.trans_a as i32, d.trans_b as i32);
            set(
                lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                &op_a as *const i32 as *const c_void,
                4,
            )?;
            set(
                lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
                &op_b as *const i32 as *const c_void,
                4,
            )?;
            if let Some(ptr) = d.bias {
                let epi = lt::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS;
                set(
                    lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE,
                    &epi as *const lt::cublasLtEpilogue_t as *const c_void,
                    std::mem::size_of::<lt::cublasLtEpilogue_t>(),
                )?;
                set(
                    lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                    &ptr as *const u64 as *const c_void,
                    8,
                )?;
            }
            let layout = |l: &mut lt::cublasLtMatrixLayout_t, d: &LtLayout| {
                check(
                    "cublasLtMatrixLayoutCreate",
                    lt::cublasLtMatrixLayoutCreate(l, dt, d.rows, d.cols, d.ld),
                )
            };
            layout(&mut p.a, &d.a)?;
            layout(&mut p.b, &d.b)?;
            layout(&mut p.c, &d.c)?;
        }
        let key = lt_key(d, call, precision);
        if let Some(t) = tactics.gemm.get(&key) {
            let algo = lt::cublasLtMatmulAlgo_t { data: t.algo };
            // cuBLASLt documents that a successful check does not guarantee the algorithm runs:
            // run it once (its output is scratch, as in `time`); a refusal is timed again, a
            // fault on the GPU is not recoverable (the context is lost) and is reported as such
            let ran = p
                .accepts(dev, &algo)
                .and_then(|()| p.matmul(dev, call, &algo).map_err(|e| e.to_string()));
            match ran {
                Ok(()) => {
                    dev.stream.synchronize().map_err(|e| {
                        format!("{key}: the cached cuBLASLt algorithm faulted on the GPU ({e:?})")
                    })?;
                    p.algo = algo;
                    return Ok(p);
                }
                Err(e) => eprintln!(
                    "note: timing cache: {key}: the cached cuBLASLt algorithm does not run ({e}); \
                     timing again"
                ),
            }
        }
        let candidates = p.candidates(dev, call, d.bias)?;
        let times: Vec<Option<f32>> = candidates.iter().map(|a| p.time(dev, call, a)).collect();
        let mut best: Option<(usize, f32)> = None;
        for (i, t) in times.iter().enumerate() {
            if let Some(t) = *t {
                // strictly faster: ties keep the heuristic's order
                if best.is_none_or(|(_, b)| t < b) {
                    best = Some((i, t));
                }
            }
        }
        let (i, ms) = best.ok_or_else(|| {
            format!(
                "none of cuBLASLt's {} candidate algorithms ran",
                candidates.len()
            )
        })?;
        p.algo = candidates[i];
        tactics.gemm.insert(
            key,
            GemmTactic {
                algo: candidates[i].data,
                ms,
                heuristic_first: candidates[0].data,
                heuristic_first_ms: times[0],
                candidates: candidates.len(),
            },
        );
        Ok(p)
    }

    /// cuBLASLt's heuristic candidates for this problem (best first) within the workspace, for
    /// `call`'s pointers as aligned as they are, and with split-K partial sums (if any) reduced
    /// in the float32 compute type rather than in the float16 output.
    fn candidates(
        &self,
        dev: &CudaDevice,
        call: &LtCall,
        bias: Option<u64>,
    ) -> Result<Vec<lt::cublasLtMatmulAlgo_t>, String> {
        use lt::cublasLtMatmulPreferenceAttributes_t as P;
        let mut pref: lt::cublasLtMatmulPreference_t = std::ptr::null_mut();
        let c = if self.beta != 0.0 { call.res } else { call.out };
        // the bias is read with D's alignment requirement
        let d_align = lt_alignment(call.out).min(bias.map_or(256, lt_alignment));
        let u32_prefs = [
            (
                P::CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK,
                lt::cublasLtReductionScheme_t::CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE as u32,
            ),
            (
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                lt_alignment(call.a),
            ),
            (
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                lt_alignment(call.b),
            ),
            (
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                lt_alignment(c),
            ),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, d_align),
        ];
        // SAFETY: the preference is destroyed below; attribute values and result buffers are
        // locals of the stated sizes; descriptors were created by `new`.
        unsafe {
            lt_check(
                "cublasLtMatmulPreferenceCreate",
                lt::cublasLtMatmulPreferenceCreate(&mut pref),
            )?;
            let ws = BLAS_WS as u64;
            let r = lt_check(
                "cublasLtMatmulPreferenceSetAttribute",
                lt::cublasLtMatmulPreferenceSetAttribute(
                    pref,
                    P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                    &ws as *const u64 as *const c_void,
                    8,
                ),
            )
            .and_then(|_| {
                for (attr, v) in u32_prefs {
                    lt_check(
                        "cublasLtMatmulPreferenceSetAttribute",
                        lt::cublasLtMatmulPreferenceSetAttribute(
                            pref,
                            attr,
                            &v as *const u32 as *const c_void,
                            4,
                        ),
                    )
                    .map_err(|e| format!("{e} ({attr:?} = {v})"))?;
                }
                Ok(())
            })
            .and_then(|_| {
                let mut res: [lt::cublasLtMatmulHeuristicResult_t; LT_CANDIDATES] =
                    std::mem::zeroed();
                let mut got = 0;
                lt_check(
                    "cublasLtMatmulAlgoGetHeuristic",
                    lt::cublasLtMatmulAlgoGetHeuristic(
                        dev.lt,
                        self.desc,
                        self.a,
                        self.b,
                        self.c,
                        self.c,
                        pref,
                        LT_CANDIDATES as i32,
                        res.as_mut_ptr(),
                        &mut got,
                    ),
                )?;
                let algos: Vec<_> = res[..(got.max(0) as usize).min(LT_CANDIDATES)]
                    .iter()
                    .filter(|r| r.state == lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
                    .map(|r| r.algo)
                    .collect();
                if algos.is_empty() {
                    Err("cublasLtMatmulAlgoGetHeuristic: no algorithm".to_string())
                } else {
                    Ok(algos)
                }
            });
            lt::cublasLtMatmulPreferenceDestroy(pref);
            r
        }
    }

    /// Whether cuBLASLt accepts `algo` for this problem within the workspace.
    fn accepts(&self, dev: &CudaDevice, algo: &lt::cublasLtMatmulAlgo_t) -> Result<(), String> {
        // SAFETY: plain data, filled by the check.
        let mut res: lt::cublasLtMatmulHeuristicResult_t = unsafe { std::mem::zeroed() };
        // SAFETY: descriptors created by `new`; `algo` and the result are valid references.
        let st = unsafe {
            lt::cublasLtMatmulAlgoCheck(
                dev.lt, self.desc, self.a, self.b, self.c, self.c, algo, &mut res,
            )
        };
        lt_check("cublasLtMatmulAlgoCheck", st)?;
        if res.workspaceSize > BLAS_WS {
            return Err(format!(
                "needs {} bytes of workspace, more than {BLAS_WS}",
                res.workspaceSize
            ));
        }
        Ok(())
    }

    /// Mean time (ms) of one matmul with `algo` on `call`'s buffers, after a warm-up; `None`
    /// when it does not run. (Its output is scratch: the program has not run yet.)
    fn time(
        &self,
        dev: &CudaDevice,
        call: &LtCall,
        algo: &lt::cublasLtMatmulAlgo_t,
    ) -> Option<f32> {
        let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        self.matmul(dev, call, algo).ok()?;
        let e0 = dev.stream.record_event(flags).ok()?;
        for _ in 0..LT_TIMED_RUNS {
            self.matmul(dev, call, algo).ok()?;
        }
        let e1 = dev.stream.record_event(flags).ok()?;
        e1.synchronize().ok()?;
        let ms = e0.elapsed_ms(&e1).ok()?;
        Some(ms / LT_TIMED_RUNS as f32)
    }

    /// Enqueue on the device's stream.
    fn run(&self, dev: &CudaDevice, call: &LtCall) -> Result<(), EngineError> {
        self.matmul(dev, call, &self.algo)
    }

    fn matmul(
        &self,
        dev: &CudaDevice,
        call: &LtCall,
        algo: &lt::cublasLtMatmulAlgo_t,
    ) -> Result<(), EngineError> {
        let alpha = 1f32;
        let (w, x, out) = (call.a, call.b, call.out);
        let c = if self.beta != 0.0 { call.res } else { out };
        if call.desc.bias != self.bias.get() {
            // the same epilogue, and a bias as aligned as the one the algorithm was chosen for
            let Some(ptr) = call.desc.bias.filter(|&p| {
                self.bias
                    .get()
                    .is_some_and(|old| lt_alignment(p) >= lt_alignment(old))
            }) else {
                return Err(EngineError::Graph(format!(
                    "cuBLASLt {}: the call's bias ({:?}) is not the plan's ({:?}) nor as aligned",
                    call.desc.problem(),
                    call.desc.bias,
                    self.bias.get()
                )));
            };
            // SAFETY: a host-side descriptor attribute (8 bytes, the pointer's size); legal
            // while a stream is being captured (the matmul captured reads it as it is now).
            let st = unsafe {
                lt::cublasLtMatmulDescSetAttribute(
                    self.desc,
                    lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                    &ptr as *const u64 as *const c_void,
                    8,
                )
            };
            lt_check("cublasLtMatmulDescSetAttribute", st).map_err(EngineError::Graph)?;
            self.bias.set(Some(ptr));
        }
        // SAFETY: pointers are the program's buffers with the shapes the layouts describe.
        let st = unsafe {
            lt::cublasLtMatmul(
                dev.lt,
                self.desc,
                &alpha as *const f32 as *const c_void,
                w as *const c_void,
                self.a,
                x as *const c_void,
                self.b,
                &self.beta as *const f32 as *const c_void,
                c as *const c_void,
                self.c,
                out as *mut c_void,
                self.c,
                algo,
                dev.blas_ws_ptr as *mut c_void,
                BLAS_WS,
                dev.stream.cu_stream() as _,
            )
        };
        if st == lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            Ok(())
        } else {
            Err(gpu_err("cublasLtMatmul", st))
        }
    }
}

impl Drop for LtPlan {
    fn drop(&mut self) {
        // SAFETY: created in `new` (null when not), destroyed once.
        unsafe {
            for l in [self.a, self.b, self.c] {
                if !l.is_null() {
                    lt::cublasLtMatrixLayoutDestroy(l);
                }
            }
            if !self.desc.is_null() {
                lt::cublasLtMatmulDescDestroy(self.desc);
            }
        }
    }
}

/// Where one run's outputs go: float32 device staging, pinned host buffers, and the events
/// that order them (`computed`: staging written, on the compute stream; `copied`: host copy
/// done, on the copy stream).
struct OutSlot {
    staging: Vec<CudaSlice<f32>>,
    pinned: Vec<PinnedHostSlice<f32>>,
    computed: CudaEvent,
    copied: CudaEvent,
    pending: bool,
}

/// Weights on the device by [`weight_key`](super::launch::weight_key): shared by the programs of
/// one graph compiled at other input shapes (a session's), and kept while any of them lives.
#[derive(Default)]
pub struct WeightStore {
    addr: HashMap<String, u64>,
    slices: Vec<CudaSlice<u8>>,
    /// Bytes uploaded.
    bytes: usize,
}

impl WeightStore {
    /// A store to share between programs.
    pub fn shared() -> Rc<RefCell<Self>> {
        Rc::new(RefCell::new(Self::default()))
    }

    /// Bytes of weights on the device.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// A program resident on the GPU.
pub struct GpuProgram {
    pub program: Program,
    pub memory: MemoryPlan,
    pub precision: Precision,
    arena: CudaSlice<u8>,
    /// Its weights, and those of the other programs sharing them.
    weights: Rc<RefCell<WeightStore>>,
    ptrs: Vec<u64>,
    convs: HashMap<usize, ConvPrep>,
    /// Convolution steps `conv_igemm_f16_nBN` runs (timed faster than cuDNN's choice), by BN.
    conv_kernel: HashMap<usize, usize>,
    /// Both steps of each GEGLU pair `gemm_geglu_f16_nBN` runs (timed faster than the two), by BN.
    geglu_kernel: HashMap<usize, usize>,
    /// Attention steps on `attention_tiled2_f16_d40` (timed faster than the one-tile kernel).
    attention_two: HashSet<usize>,
    /// Both steps of each normalisation pair `conv_igemm_gn/_ln_f16_nBN` runs, by BN.
    norm_pair: HashMap<usize, usize>,
    /// Linear steps as single cuBLASLt matmuls (bias in the epilogue, residual as `C`).
    lt_plans: HashMap<usize, LtPlan>,
    conv_ws: Option<CudaSlice<u8>>,
    conv_ws_ptr: (u64, usize),
    /// float32 partial statistics of the GroupNorms split over several blocks per group.
    norm_stats: Option<CudaSlice<f32>>,
    /// float32 staging per input and output.
    staging_in: Vec<CudaSlice<f32>>,
    /// Output slots (allocated on first use): two let one run's outputs travel to the host
    /// while the next run computes.
    slots: Vec<OutSlot>,
    graph: Option<CudaGraph>,
    /// Whether its launches ran once eagerly (every kernel and library routine they reach is
    /// then loaded, and capture need not run them first).
    ran_eagerly: bool,
    /// Bytes of weights this program uploaded (those it shares with programs loaded before it
    /// are not counted again).
    pub weight_bytes: usize,
}

impl Drop for GpuProgram {
    fn drop(&mut self) {
        // A copy to a slot's pinned buffers may still run on the copy stream (an error between
        // a run and its collection): the buffers and staging must outlive it. (Everything else
        // is freed in order on the compute stream.)
        for s in &self.slots {
            let _ = s.copied.synchronize();
        }
    }
}

impl GpuProgram {
    /// Upload `program`'s weights, place its arena, choose convolution and GEMM algorithms (timed
    /// on the GPU unless `tactics` already has them; new choices are added to it). In float16 the
    /// program is specialised first ([`super::launch::specialize`]: frame-major motion modules,
    /// merged attention projections).
    pub fn load(
        dev: &CudaDevice,
        program: Program,
        precision: Precision,
        weight: &dyn Fn(&str) -> Result<WeightData, EngineError>,
        tactics: &mut TacticCache,
    ) -> Result<Self, EngineError> {
        Self::load_with(
            dev,
            program,
            precision,
            weight,
            tactics,
            true,
            WeightStore::shared(),
        )
    }

    /// [`GpuProgram::load`], with the float16 specialisation chosen (`false`: the program as
    /// compiled — motion modules through token order, each projection its own GEMM — for
    /// measuring what it gives, or for a program specialised already), and the weights taken
    /// from `store` where it has them (a program of the same graph at other shapes: a session's
    /// programs share one; [`WeightStore::shared`] for a store of its own), the rest added to it.
    pub fn load_with(
        dev: &CudaDevice,
        program: Program,
        precision: Precision,
        weight: &dyn Fn(&str) -> Result<WeightData, EngineError>,
        tactics: &mut TacticCache,
        specialise: bool,
        store: Rc<RefCell<WeightStore>>,
    ) -> Result<Self, EngineError> {
        let s = &dev.stream;
        let mut program = program;
        if specialise {
            specialize(&mut program, precision);
        }
        // (before anything is allocated: a tensor past 32-bit element counts would fail in
        // cuDNN, or overflow a kernel's index arithmetic)
        program.check_tensor_sizes()?;
        let memory = plan_memory_for(&program, precision);
        let arena = s
            .alloc_zeros::<u8>(memory.arena_bytes.max(256))
            .map_err(|e| gpu_err("arena", e))?;
        let (base, g) = arena.device_ptr(s);
        drop(g);
        let (ptrs, weight_bytes) = {
            let mut st = store.borrow_mut();
            let WeightStore {
                addr,
                slices,
                bytes: stored,
            } = &mut *st;
            place_buffers(
                &program,
                &memory,
                base,
                precision,
                weight,
                &mut |bytes: &[u8]| {
                    let d = s.clone_htod(bytes).map_err(|e| gpu_err("upload", e))?;
                    let (p, g) = d.device_ptr(s);
                    drop(g);
                    slices.push(d);
                    *stored += bytes.len();
                    Ok(p)
                },
                addr,
            )?
        };
        let mut staging_in = Vec::new();
        for (_, t) in &program.inputs {
            staging_in.push(
                s.alloc_zeros::<f32>(t.numel().max(1))
                    .map_err(|e| gpu_err("alloc", e))?,
            );
        }
        let stats_len = Some(group_norm_scratch(&program)).filter(|&n| n > 0);
        let norm_stats = match stats_len {
            Some(len) => Some(s.alloc_zeros::<f32>(len).map_err(|e| gpu_err("alloc", e))?),
            None => None,
        };
        let mut me = Self {
            program,
            memory,
            precision,
            arena,
            weights: store,
            ptrs,
            convs: HashMap::new(),
            conv_kernel: Default::default(),
            geglu_kernel: Default::default(),
            attention_two: Default::default(),
            norm_pair: Default::default(),
            lt_plans: HashMap::new(),
            conv_ws: None,
            conv_ws_ptr: (0, 0),
            norm_stats,
            staging_in,
            slots: Vec::new(),
            graph: None,
            ran_eagerly: false,
            weight_bytes,
        };
        let timed_convs = me.prepare_convs(dev, tactics)?;
        let timed = me.prepare_linears(dev, tactics)?;
        me.prepare_geglus(dev, tactics, &timed)?;
        me.prepare_norm_pairs(dev, tactics, &timed_convs, &timed)?;
        me.prepare_attentions(dev, tactics, !timed.is_empty() || !timed_convs.is_empty())?;
        me.replan_fused(dev)?;
        Ok(me)
    }

    /// Once GEGLU pairs are known to run as one `gemm_geglu_f16_nBN` and (GroupNorm,
    /// convolution) pairs as one `conv_igemm_gn_f16_nBN`: the activations planned again without
    /// those projections' `[rows, 2d]` outputs and those GroupNorms' outputs
    /// ([`plan_memory_fused`]), in a new, smaller arena. Nothing has run yet (timing's outputs
    /// are scratch), so nothing in the old arena is kept; it is freed before the new one is
    /// allocated.
    fn replan_fused(&mut self, dev: &CudaDevice) -> Result<(), EngineError> {
        let fused: Vec<(usize, usize)> = geglu_pairs(&self.program, self.precision)
            .into_iter()
            .filter(|(_, gi)| self.geglu_kernel.contains_key(gi))
            .chain(
                norm_pairs(&self.program, self.precision)
                    .into_iter()
                    .filter(|(_, ci)| self.norm_pair.contains_key(ci)),
            )
            .collect();
        if fused.is_empty() {
            return Ok(());
        }
        let memory = plan_memory_fused(&self.program, self.precision, &fused);
        if memory.arena_bytes >= self.memory.arena_bytes {
            return Ok(());
        }
        let s = &dev.stream;
        // the old arena goes first (both at once would raise the peak this lowers)
        self.arena = s.alloc_zeros::<u8>(256).map_err(|e| gpu_err("arena", e))?;
        self.arena = s
            .alloc_zeros::<u8>(memory.arena_bytes.max(256))
            .map_err(|e| gpu_err("arena", e))?;
        let (base, g) = self.arena.device_ptr(s);
        drop(g);
        rebase_activations(&mut self.ptrs, &self.memory, &memory, base);
        self.memory = memory;
        Ok(())
    }

    /// The attentions on `attention_tiled_f16_d40` (SD1.5's 64x64 level): that kernel timed
    /// against `attention_tiled2_f16_d40` when this load timed other algorithms (`tune`: a build,
    /// or shapes the cache did not have; not for an engine or cache written before the second
    /// kernel, so two loads of it run the same), the faster kept — the decision is the cache's
    /// ([`AttentionTactic::two`]).
    fn prepare_attentions(
        &mut self,
        dev: &CudaDevice,
        tactics: &mut TacticCache,
        tune: bool,
    ) -> Result<(), EngineError> {
        if tactics.library_only {
            return Ok(());
        }
        // problems timed in this load, the (problem, layout of Q, K, V and bias) their kernel was
        // checked on, and the steps on it by problem
        let mut timed = HashSet::new();
        let mut checked = HashSet::new();
        let mut on_two: Vec<(usize, String)> = Vec::new();
        for si in 0..self.program.steps.len() {
            let Some(key) = attention_key(&self.program.steps[si], self.precision) else {
                continue;
            };
            let Step::Attention { bias, ld, offs, .. } = &self.program.steps[si] else {
                continue;
            };
            let variant = (key.clone(), bias.is_some(), *ld, *offs);
            let one = self.step_ops(dev, si)?;
            let [Op::Kernel(l1)] = &one[..] else {
                continue;
            };
            if l1.kernel != "attention_tiled_f16_d40" {
                continue;
            }
            if !tactics.attention.contains_key(&key) && tune {
                self.attention_two.insert(si);
                let two = self.step_ops(dev, si);
                self.attention_two.remove(&si);
                let two = two?;
                let two_ms = match &two[..] {
                    [Op::Kernel(l2)] if runs_here(dev, &format!("attention {key}"), l2) => {
                        time_launch(dev, l2)?
                    }
                    _ => f32::MAX,
                };
                let ms = time_launch(dev, l1)?;
                tactics
                    .attention
                    .insert(key.clone(), AttentionTactic { ms, two_ms });
                timed.insert(key.clone());
            }
            // the two-tile kernel only where it computes what the one-tile kernel does: checked,
            // when timed in this load, on the first step of each layout that takes it (a cached
            // choice was checked when it was timed)
            if tactics.attention_two(&key) && timed.contains(&key) && checked.insert(variant) {
                self.attention_two.insert(si);
                let two = self.step_ops(dev, si);
                self.attention_two.remove(&si);
                if let [Op::Kernel(l2)] = &two?[..] {
                    let io = tactic_io(&self.program, &[si]);
                    let want = self.tactic_output(dev, &io, &|| launch_op(dev, l1))?;
                    let got = self.tactic_output(dev, &io, &|| launch_op(dev, l2))?;
                    let what = format!("attention {key}: {}", l2.kernel);
                    if !Self::tactic_checks(&what, &l1.kernel, &want, &got) {
                        // none of the problem's steps takes it (those before this one too)
                        if let Some(t) = tactics.attention.get_mut(&key) {
                            t.two_ms = f32::MAX;
                        }
                        for (s, _) in on_two.iter().filter(|(_, k)| *k == key) {
                            self.attention_two.remove(s);
                        }
                    }
                }
            }
            if tactics.attention_two(&key) {
                self.attention_two.insert(si);
                on_two.push((si, key));
            }
        }
        Ok(())
    }

    /// The GEGLU pairs `gemm_geglu_f16_nBN` computes ([`geglu_pairs`]): each tile width timed
    /// against the two steps as they run when the projection's cuBLASLt algorithm was timed in
    /// this load (`timed`: its step indices; not on a cached choice, so an engine or cache written
    /// before this kernel keeps the two steps and two loads of it run the same), the fastest kept
    /// where it beats them — the decision is the cache's ([`FusedTactic::fused`]).
    fn prepare_geglus(
        &mut self,
        dev: &CudaDevice,
        tactics: &mut TacticCache,
        timed: &HashSet<usize>,
    ) -> Result<(), EngineError> {
        if tactics.library_only {
            return Ok(());
        }
        for (li, gi) in geglu_pairs(&self.program, self.precision) {
            let (Step::Linear { m, k, .. }, Step::Geglu { d, bias, .. }) =
                (&self.program.steps[li], &self.program.steps[gi])
            else {
                continue;
            };
            let key = geglu_key(*m, *d, *k, bias.is_some(), self.precision);
            if !tactics.geglu.contains_key(&key) && timed.contains(&li) {
                let ms = time_enqueue(dev, &|| {
                    self.enqueue_step(dev, li)?;
                    self.enqueue_step(dev, gi)
                })?;
                let mut best = fastest_width(dev, &format!("geglu {key}"), &|bn| {
                    gemm_geglu_launch(&self.program, li, gi, bn, &|b| self.ptrs[b])
                })?;
                // the kernel only where it computes what the two steps do
                if let (t, Some(bn)) = best {
                    if t < ms {
                        let io = tactic_io(&self.program, &[li, gi]);
                        let want = self.tactic_output(dev, &io, &|| {
                            self.enqueue_step(dev, li)?;
                            self.enqueue_step(dev, gi)
                        })?;
                        let l = gemm_geglu_launch(&self.program, li, gi, bn, &|b| self.ptrs[b])?;
                        let got = self.tactic_output(dev, &io, &|| launch_op(dev, &l))?;
                        let what = format!("geglu {key}: {}", l.kernel);
                        if !Self::tactic_checks(&what, "cuBLASLt and geglu", &want, &got) {
                            best.1 = None;
                        }
                    }
                }
                tactics.geglu.insert(
                    key.clone(),
                    FusedTactic {
                        ms,
                        fused_ms: best.0,
                        fused_n: best.1,
                    },
                );
            }
            if let Some(bn) = tactics.geglu_kernel(&key) {
                self.geglu_kernel.insert(li, bn);
                self.geglu_kernel.insert(gi, bn);
            }
        }
        Ok(())
    }

    /// The normalisation pairs `conv_igemm_gn/_ln_f16_nBN` compute ([`norm_pairs`]): each tile
    /// width timed against the two steps as they run (the second as chosen alone) when the second step's algorithms were timed in this load (`timed_convs`,
    /// `timed_linears`: step indices; not on a cached choice, so an engine or cache written
    /// before this kernel keeps the two steps and two loads of it run the same), the fastest
    /// kept where it beats them — the decision is the cache's ([`FusedTactic::fused`]).
    fn prepare_norm_pairs(
        &mut self,
        dev: &CudaDevice,
        tactics: &mut TacticCache,
        timed_convs: &HashSet<usize>,
        timed_linears: &HashSet<usize>,
    ) -> Result<(), EngineError> {
        if tactics.library_only {
            return Ok(());
        }
        let time_pair = |me: &Self, gi: usize, ci: usize| {
            time_enqueue(dev, &|| {
                me.enqueue_step(dev, gi)?;
                me.enqueue_step(dev, ci)
            })
        };
        for (gi, ci) in norm_pairs(&self.program, self.precision) {
            let Some(norm) = norm_desc(&self.program.steps[gi]) else {
                continue;
            };
            let (problem, timed) = match &self.program.steps[ci] {
                Step::Conv(c) => (c.problem(), timed_convs.contains(&ci)),
                Step::Linear {
                    bias,
                    residual,
                    m,
                    n,
                    k,
                    ..
                } => (
                    format!(
                        "linear {m}x{n}x{k}{}{}",
                        if bias.is_some() { "+bias" } else { "" },
                        if residual.is_some() { "+res" } else { "" }
                    ),
                    timed_linears.contains(&ci),
                ),
                _ => continue,
            };
            let key = norm_pair_key(&problem, &norm, self.precision);
            if !tactics.norm_pair.contains_key(&key) && timed {
                let ms = time_pair(self, gi, ci)?;
                let mut best = (f32::MAX, None);
                for bn in CONV_IGEMM_WIDTHS {
                    // a width this GPU cannot launch is left out, as fastest_width does
                    let l = norm_gemm_launch(
                        &self.program,
                        gi,
                        ci,
                        bn,
                        &|b| self.ptrs[b],
                        self.norm_stats_ptr(dev),
                    )?;
                    if !runs_here(dev, &key, &l) {
                        continue;
                    }
                    self.norm_pair.insert(gi, bn);
                    self.norm_pair.insert(ci, bn);
                    let t = time_pair(self, gi, ci);
                    self.norm_pair.remove(&gi);
                    self.norm_pair.remove(&ci);
                    let t = t?;
                    if t < best.0 {
                        best = (t, Some(bn));
                    }
                }
                // the kernel only where it computes what the two steps do
                if let (t, Some(bn)) = best {
                    if t < ms {
                        let io = tactic_io(&self.program, &[gi, ci]);
                        let pair = |me: &Self| {
                            me.tactic_output(dev, &io, &|| {
                                me.enqueue_step(dev, gi)?;
                                me.enqueue_step(dev, ci)
                            })
                        };
                        let want = pair(self)?;
                        self.norm_pair.insert(gi, bn);
                        self.norm_pair.insert(ci, bn);
                        let got = pair(self);
                        self.norm_pair.remove(&gi);
                        self.norm_pair.remove(&ci);
                        let what = format!("{key}: conv_igemm_gn/_ln_f16_n{bn}");
                        if !Self::tactic_checks(&what, "the normalisation and GEMM", &want, &got?) {
                            best.1 = None;
                        }
                    }
                }
                tactics.norm_pair.insert(
                    key.clone(),
                    FusedTactic {
                        ms,
                        fused_ms: best.0,
                        fused_n: best.1,
                    },
                );
            }
            if let Some(bn) = tactics.norm_kernel(&key) {
                self.norm_pair.insert(gi, bn);
                self.norm_pair.insert(ci, bn);
            }
        }
        Ok(())
    }

    /// cuBLASLt plans for the Linear steps, algorithms timed on this GPU unless `tactics` has
    /// them. A step cuBLASLt has no algorithm for keeps a cuBLAS GEMM (+ bias/residual pass; said
    /// once on stderr). Returns the steps whose problem `tactics` had no algorithm for at the
    /// start (timed in this load).
    fn prepare_linears(
        &mut self,
        dev: &CudaDevice,
        tactics: &mut TacticCache,
    ) -> Result<HashSet<usize>, EngineError> {
        let cached: HashSet<String> = tactics.gemm.keys().cloned().collect();
        let mut timed = HashSet::new();
        let mut refused = None;
        let mut n_refused = 0usize;
        for (i, st) in self.program.steps.iter().enumerate() {
            let Step::Linear {
                out,
                x,
                w,
                bias,
                residual,
                m,
                n,
                k,
            } = st
            else {
                continue;
            };
            let d = LtDesc::linear((*m, *n, *k), bias.map(|b| self.ptrs[b]), residual.is_some());
            let call = LtCall {
                desc: d,
                a: self.ptrs[*w],
                b: self.ptrs[*x],
                res: residual.map_or(0, |r| self.ptrs[r]),
                out: self.ptrs[*out],
            };
            if !cached.contains(&lt_key(&d, &call, self.precision)) {
                timed.insert(i);
            }
            match LtPlan::new(dev, self.precision, &d, &call, tactics)? {
                Ok(p) => {
                    self.lt_plans.insert(i, p);
                }
                Err(e) => {
                    n_refused += 1;
                    refused.get_or_insert((e, *m, *n, *k));
                }
            }
        }
        if let Some((e, m, n, k)) = refused {
            let more = match n_refused {
                1 => String::new(),
                n => format!(" (and {} more Linear steps)", n - 1),
            };
            eprintln!("note: cuBLASLt unavailable for {m}x{n}x{k} ({e}){more}; a cuBLAS GEMM (and a separate bias pass) runs instead");
        }
        Ok(timed)
    }

    /// cuDNN descriptors for the convolution steps, algorithms timed on this GPU unless `tactics`
    /// has them, and the implicit-GEMM kernels timed against them where they apply. Returns the
    /// steps whose problem `tactics` had no choice for at the start (timed in this load).
    fn prepare_convs(
        &mut self,
        dev: &CudaDevice,
        tactics: &mut TacticCache,
    ) -> Result<HashSet<usize>, EngineError> {
        let dt = match self.precision {
            Precision::Fp32 => cudnn::cudnnDataType_t::CUDNN_DATA_FLOAT,
            Precision::Fp16 => cudnn::cudnnDataType_t::CUDNN_DATA_HALF,
        };
        let math = match self.precision {
            Precision::Fp32 => cudnn::cudnnMathType_t::CUDNN_FMA_MATH,
            Precision::Fp16 => cudnn::cudnnMathType_t::CUDNN_TENSOR_OP_MATH,
        };
        let nchw = cudnn::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
        let nhwc = cudnn::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC;
        let own_kernels = !tactics.library_only;
        // the workspace cuDNN's algorithms are timed with (so the most the chosen one needs)
        const FIND_WORKSPACE: usize = 256 << 20;
        let mut max_ws = 0usize;
        let mut found_ws: Option<CudaSlice<u8>> = None;
        // the problems the cache had at the start, and the steps of the others (timed here)
        let cached: HashSet<String> = tactics.conv.keys().cloned().collect();
        let mut timed = HashSet::new();
        // problems whose implicit-GEMM kernels were timed in this load, and each convolution
        // with its problem and cuDNN's workspace
        let mut kernel_timed = HashSet::new();
        let mut placed: Vec<(usize, ConvStep, String, usize)> = Vec::new();
        let steps: Vec<(usize, ConvStep)> = self
            .program
            .steps
            .iter()
            .enumerate()
            .filter_map(|(i, s)| match s {
                Step::Conv(c) => Some((i, c.clone())),
                _ => None,
            })
            .collect();
        for (i, c) in steps {
            let mut p = ConvPrep {
                x: std::ptr::null_mut(),
                y: std::ptr::null_mut(),
                w: std::ptr::null_mut(),
                conv: std::ptr::null_mut(),
                algo: cudnn::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
            };
            let i32s = |v: usize| v as i32;
            let d = ConvDesc::of(&c)?;
            // dimensions stay in NCHW order; the format says how they are stored
            let fmt = if d.nhwc { nhwc } else { nchw };
            // SAFETY: descriptors are created here and destroyed in Drop.
            unsafe {
                check_dnn("desc", cudnn::cudnnCreateTensorDescriptor(&mut p.x))?;
                check_dnn("desc", cudnn::cudnnCreateTensorDescriptor(&mut p.y))?;
                check_dnn("desc", cudnn::cudnnCreateFilterDescriptor(&mut p.w))?;
                check_dnn("desc", cudnn::cudnnCreateConvolutionDescriptor(&mut p.conv))?;
                let [n, ch, h, w] = d.x;
                check_dnn(
                    "x desc",
                    cudnn::cudnnSetTensor4dDescriptor(
                        p.x,
                        fmt,
                        dt,
                        i32s(n),
                        i32s(ch),
                        i32s(h),
                        i32s(w),
                    ),
                )?;
                let [n, ch, h, w] = d.y;
                check_dnn(
                    "y desc",
                    cudnn::cudnnSetTensor4dDescriptor(
                        p.y,
                        fmt,
                        dt,
                        i32s(n),
                        i32s(ch),
                        i32s(h),
                        i32s(w),
                    ),
                )?;
                let [o, ci, kh, kw] = d.w;
                check_dnn(
                    "w desc",
                    cudnn::cudnnSetFilter4dDescriptor(
                        p.w,
                        dt,
                        fmt,
                        i32s(o),
                        i32s(ci),
                        i32s(kh),
                        i32s(kw),
                    ),
                )?;
                check_dnn(
                    "conv desc",
                    cudnn::cudnnSetConvolution2dDescriptor(
                        p.conv,
                        i32s(d.pads[0]),
                        i32s(d.pads[1]),
                        i32s(d.strides[0]),
                        i32s(d.strides[1]),
                        i32s(d.dilations[0]),
                        i32s(d.dilations[1]),
                        cudnn::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                        cudnn::cudnnDataType_t::CUDNN_DATA_FLOAT,
                    ),
                )?;
                check_dnn("math", cudnn::cudnnSetConvolutionMathType(p.conv, math))?;
                check_dnn(
                    "group",
                    cudnn::cudnnSetConvolutionGroupCount(p.conv, d.group as i32),
                )?;
            }
            let key = format!("{} {}", c.problem(), self.precision.suffix());
            if !cached.contains(&key) {
                timed.insert(i);
            }
            // a cached choice (the engine's, or a run's timing cache) is used if this cuDNN takes
            // it here; otherwise, or with none, every algorithm is timed on this GPU
            let mut cached = tactics.conv.get(&key).copied();
            // whether cuDNN's algorithms were timed in this load (not taken from a cache)
            let mut timed_here = false;
            let ws = loop {
                let from_cache = cached.is_some();
                let tactic = match cached.take() {
                    Some(t) => t,
                    None => {
                        timed_here = true;
                        // time every algorithm on this GPU (cuDNN runs each and sorts by time)
                        let limit = FIND_WORKSPACE;
                        if found_ws.is_none() {
                            found_ws = Some(
                                dev.stream
                                    .alloc_zeros::<u8>(limit)
                                    .map_err(|e| gpu_err("alloc", e))?,
                            );
                        }
                        let (wp, g) = found_ws.as_ref().unwrap().device_ptr(&dev.stream);
                        drop(g);
                        let mut perf: [cudnn::cudnnConvolutionFwdAlgoPerf_t; 8] =
                            unsafe { std::mem::zeroed() };
                        let mut got = 0;
                        // SAFETY: buffers are the program's own (sizes from the plan); workspace
                        // as given; the descriptor was created above.
                        unsafe {
                            // a cached choice that did not apply may have left its math type
                            check_dnn("math", cudnn::cudnnSetConvolutionMathType(p.conv, math))?;
                            check_dnn(
                                "cudnnFindConvolutionForwardAlgorithmEx",
                                cudnn::cudnnFindConvolutionForwardAlgorithmEx(
                                    dev.dnn,
                                    p.x,
                                    self.ptrs[c.x] as *const c_void,
                                    p.w,
                                    self.ptrs[c.w] as *const c_void,
                                    p.conv,
                                    p.y,
                                    self.ptrs[c.out] as *mut c_void,
                                    8,
                                    &mut got,
                                    perf.as_mut_ptr(),
                                    wp as *mut c_void,
                                    limit,
                                ),
                            )?;
                        }
                        // float32 stays float32: no TF32 tensor-core result (its ~1e-3
                        // relative error is float16's, not what an fp32 engine promises)
                        let exact = |r: &&cudnn::cudnnConvolutionFwdAlgoPerf_t| {
                            self.precision != Precision::Fp32
                                || r.mathType == cudnn::cudnnMathType_t::CUDNN_FMA_MATH
                        };
                        let best = perf[..(got.max(0) as usize).min(perf.len())]
                            .iter()
                            .filter(exact)
                            .find(|r| r.status == cudnn::cudnnStatus_t::CUDNN_STATUS_SUCCESS)
                            .ok_or_else(|| {
                                EngineError::Graph(format!(
                                    "cuDNN found no algorithm for {key}{}",
                                    if d.nhwc {
                                        " (channels-last; building with --layout nchw may avoid it)"
                                    } else {
                                        ""
                                    }
                                ))
                            })?;
                        let t = ConvTactic {
                            algo: best.algo as i32,
                            math: Some(best.mathType as i32),
                            workspace: best.memory,
                            ms: best.time,
                            igemm_ms: None,
                            igemm_n: None,
                        };
                        tactics.conv.insert(key.clone(), t);
                        t
                    }
                };
                let mut apply = || -> Result<usize, EngineError> {
                    use cudnn::cudnnConvolutionFwdAlgo_t as A;
                    use cudnn::cudnnMathType_t as M;
                    p.algo = cached_enum(
                        &[
                            A::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
                            A::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
                            A::CUDNN_CONVOLUTION_FWD_ALGO_GEMM,
                            A::CUDNN_CONVOLUTION_FWD_ALGO_DIRECT,
                            A::CUDNN_CONVOLUTION_FWD_ALGO_FFT,
                            A::CUDNN_CONVOLUTION_FWD_ALGO_FFT_TILING,
                            A::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD,
                            A::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED,
                        ],
                        |a| a as i32,
                        tactic.algo,
                        &format!("timing cache: {key}: algorithm"),
                    )?;
                    let math = cached_enum(
                        &[
                            M::CUDNN_DEFAULT_MATH,
                            M::CUDNN_TENSOR_OP_MATH,
                            M::CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION,
                            M::CUDNN_FMA_MATH,
                        ],
                        |m| m as i32,
                        match self.precision {
                            // whatever a cache says: float32 without TF32
                            Precision::Fp32 => math as i32,
                            Precision::Fp16 => tactic.math.unwrap_or(math as i32),
                        },
                        &format!("timing cache: {key}: math type"),
                    )?;
                    // run what was timed: the algorithm with its math type, and the workspace
                    // that pair needs on this cuDNN
                    let mut ws = 0usize;
                    // SAFETY: descriptors created above.
                    unsafe {
                        check_dnn("math", cudnn::cudnnSetConvolutionMathType(p.conv, math))?;
                        check_dnn(
                            "cudnnGetConvolutionForwardWorkspaceSize",
                            cudnn::cudnnGetConvolutionForwardWorkspaceSize(
                                dev.dnn, p.x, p.w, p.conv, p.y, p.algo, &mut ws,
                            ),
                        )?;
                    }
                    Ok(ws)
                };
                match apply() {
                    Ok(ws) => break ws,
                    Err(e) if from_cache => eprintln!(
                        "note: timing cache: {key}: the cached convolution algorithm does not run \
                         here ({e}); timing again"
                    ),
                    Err(e) => return Err(e),
                }
            };
            self.convs.insert(i, p);
            // the implicit-GEMM kernels where they apply: each tile width timed when cuDNN's
            // algorithms are (not on a cached choice: an engine or cache written before these
            // kernels keeps cuDNN, so loading it twice runs the same), the fastest kept where it
            // beats cuDNN's choice — the decision is the cache's (ConvTactic::igemm)
            let t = tactics
                .conv
                .get_mut(&key)
                .expect("a tactic was chosen above");
            if own_kernels
                && conv_igemm_ok(&c, self.precision)
                && timed_here
                && t.igemm_ms.is_none()
            {
                let best = fastest_width(dev, &key, &|bn| {
                    Ok(conv_igemm_launch(&c, bn, &|b| self.ptrs[b]))
                })?;
                (t.igemm_ms, t.igemm_n) = (Some(best.0), best.1);
                kernel_timed.insert(key.clone());
            }
            placed.push((i, c, key, ws));
        }
        // the kernel only where it computes what cuDNN's algorithm (and the bias and residual
        // pass after it) does: checked, when timed in this load, on the first convolution of each
        // epilogue (bias, time embedding, residual) that takes it, cuDNN on the workspace it was
        // timed with (a cached choice was checked when it was timed); where one disagrees, none
        // of the problem's convolutions takes it (its time is kept, its width dropped)
        if let Some(ws_buf) = found_ws.as_ref() {
            let (wp, g) = ws_buf.device_ptr(&dev.stream);
            drop(g);
            let mut checked = HashSet::new();
            for (i, c, key, _) in &placed {
                let epilogue = (
                    c.bias.is_some(),
                    c.sample_bias.is_some(),
                    c.residual.is_some(),
                );
                let Some(bn) = tactics.conv_kernel(key) else {
                    continue;
                };
                if !kernel_timed.contains(key)
                    || !conv_igemm_ok(c, self.precision)
                    || !checked.insert((key.clone(), epilogue))
                {
                    continue;
                }
                let io = tactic_io(&self.program, &[*i]);
                let before = std::mem::replace(&mut self.conv_ws_ptr, (wp, FIND_WORKSPACE));
                let want = self.tactic_output(dev, &io, &|| self.enqueue_step(dev, *i));
                self.conv_ws_ptr = before;
                let want = want?;
                let l = conv_igemm_launch(c, bn, &|b| self.ptrs[b]);
                let got = self.tactic_output(dev, &io, &|| launch_op(dev, &l))?;
                let what = format!("{key}: {}", l.kernel);
                if !Self::tactic_checks(&what, "cuDNN", &want, &got) {
                    if let Some(t) = tactics.conv.get_mut(key) {
                        t.igemm_n = None;
                    }
                }
            }
        }
        for (i, c, key, ws) in placed {
            match tactics.conv_kernel(&key) {
                Some(bn) if conv_igemm_ok(&c, self.precision) => {
                    self.conv_kernel.insert(i, bn);
                }
                // cuDNN's workspace only for the convolutions it runs
                _ => max_ws = max_ws.max(ws),
            }
        }
        drop(found_ws);
        if max_ws > 0 {
            let ws = dev
                .stream
                .alloc_zeros::<u8>(max_ws)
                .map_err(|e| gpu_err("alloc", e))?;
            let (ptr, g) = ws.device_ptr(&dev.stream);
            drop(g);
            self.conv_ws_ptr = (ptr, max_ws);
            self.conv_ws = Some(ws);
        }
        Ok(timed)
    }

    /// The device address of the normalisation scratch (0 when no step needs one).
    fn norm_stats_ptr(&self, dev: &CudaDevice) -> u64 {
        match &self.norm_stats {
            Some(s) => {
                let (p, g) = s.device_ptr(&dev.stream);
                drop(g);
                p
            }
            None => 0,
        }
    }

    /// Enqueue every step on the stream (no synchronization).
    fn enqueue(&self, dev: &CudaDevice) -> Result<(), EngineError> {
        for si in 0..self.program.steps.len() {
            self.enqueue_step(dev, si)?;
        }
        Ok(())
    }

    /// Time every step eagerly with CUDA events: `(label, ms)` per step, labels like
    /// `conv 3x3`, `attention flash L=4096 S=4096 d=40`, `linear 32768x320x1280`.
    pub fn profile(&self, dev: &CudaDevice) -> Result<Vec<(String, f64)>, EngineError> {
        let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let mut evs = Vec::new();
        for si in 0..self.program.steps.len() {
            let e0 = dev
                .stream
                .record_event(flags)
                .map_err(|e| gpu_err("event", e))?;
            self.enqueue_step(dev, si)?;
            let e1 = dev
                .stream
                .record_event(flags)
                .map_err(|e| gpu_err("event", e))?;
            evs.push((e0, e1));
        }
        dev.stream.synchronize().map_err(|e| gpu_err("sync", e))?;
        let mut out = Vec::new();
        for (si, (e0, e1)) in evs.iter().enumerate() {
            let ms = e0.elapsed_ms(e1).map_err(|e| gpu_err("elapsed", e))? as f64;
            let label = match &self.program.steps[si] {
                Step::Conv(c) if self.norm_pair.contains_key(&si) => format!(
                    "conv {}x{} s{}+group_norm (conv_igemm_gn_f16_n{})",
                    c.w_shape[2], c.w_shape[3], c.strides[0], self.norm_pair[&si]
                ),
                Step::Conv(c) => {
                    format!("conv {}x{} s{}", c.w_shape[2], c.w_shape[3], c.strides[0])
                }
                Step::Attention { l, s, d, .. } => format!("attention L={l} S={s} d={d}"),
                Step::Linear { m, n, k, .. } if self.norm_pair.contains_key(&si) => format!(
                    "linear {m}x{n}x{k}+normalisation (conv_igemm_gn/_ln_f16_n{})",
                    self.norm_pair[&si]
                ),
                Step::Linear { .. } if self.geglu_kernel.contains_key(&si) => {
                    "linear (in the GEGLU's gemm_geglu)".to_string()
                }
                Step::LayerNorm { .. } if self.norm_pair.contains_key(&si) => {
                    "layer_norm statistics (applied in conv_igemm_ln)".to_string()
                }
                Step::GroupNorm { .. } if self.norm_pair.contains_key(&si) => {
                    "group_norm statistics (applied in conv_igemm_gn)".to_string()
                }
                Step::Geglu { .. } if self.geglu_kernel.contains_key(&si) => format!(
                    "geglu+projection (gemm_geglu_f16_n{})",
                    self.geglu_kernel[&si]
                ),
                Step::Linear { residual, bias, .. } => format!(
                    "linear{}{}{}",
                    if bias.is_some() { "+bias" } else { "" },
                    if residual.is_some() { "+res" } else { "" },
                    if self.lt_plans.contains_key(&si) {
                        " (cublasLt)"
                    } else {
                        ""
                    }
                ),
                Step::Copy {
                    s, in_off, out_off, ..
                } => {
                    let kind = if s.transpose_axes().is_some() {
                        "tiled transpose"
                    } else if s
                        .output_ordered()
                        .in_units(16 / self.precision.elem_bytes() as i64, *in_off, *out_off)
                        .is_some()
                    {
                        "16-byte units"
                    } else {
                        "strided"
                    };
                    format!("copy ({kind})")
                }
                Step::GroupNorm {
                    c,
                    spatial,
                    groups,
                    channels_last,
                    ..
                } => format!(
                    "group_norm{}",
                    if *channels_last {
                        " channels-last"
                    } else if group_norm_splits(c / groups * spatial) > 1 {
                        " split"
                    } else {
                        ""
                    }
                ),
                other => other.name().to_string(),
            };
            out.push((label, ms));
        }
        Ok(out)
    }

    /// What step `si` enqueues (kernel choice, launch shapes, arguments, library calls).
    fn step_ops(&self, dev: &CudaDevice, si: usize) -> Result<Vec<Op>, EngineError> {
        let norm_stats = self.norm_stats_ptr(dev);
        let lt = |i: usize| self.lt_plans.contains_key(&i);
        let ck = |i: usize| self.conv_kernel.get(&i).copied();
        let gk = |i: usize| self.geglu_kernel.get(&i).copied();
        let gc = |i: usize| self.norm_pair.get(&i).copied();
        let at2 = |i: usize| self.attention_two.contains(&i);
        let ctx = Ctx {
            precision: self.precision,
            ptrs: &self.ptrs,
            norm_stats,
            smem_optin: dev.smem_optin,
            lt: &lt,
            conv_kernel: &ck,
            geglu_kernel: &gk,
            norm_pair: &gc,
            attention_two: &at2,
        };
        step_ops(&self.program, si, &ctx)
    }

    fn enqueue_step(&self, dev: &CudaDevice, si: usize) -> Result<(), EngineError> {
        for op in self.step_ops(dev, si)? {
            match op {
                Op::Kernel(l) => launch_op(dev, &l)?,
                Op::Gemm(g) => self.gemm(dev, &g)?,
                Op::Lt(c) => {
                    let plan = self.lt_plans.get(&si).ok_or_else(|| {
                        EngineError::Graph(format!("step {si}: no cuBLASLt plan"))
                    })?;
                    plan.run(dev, &c)?;
                }
                Op::Conv(c) => {
                    let prep = &self.convs[&c.step];
                    let (one, zero) = (1f32, 0f32);
                    let (ws, ws_len) = self.conv_ws_ptr;
                    // SAFETY: descriptors match the buffers' shapes (from the program).
                    unsafe {
                        check_dnn(
                            "cudnnConvolutionForward",
                            cudnn::cudnnConvolutionForward(
                                dev.dnn,
                                &one as *const f32 as *const c_void,
                                prep.x,
                                c.x as *const c_void,
                                prep.w,
                                c.w as *const c_void,
                                prep.conv,
                                prep.algo,
                                ws as *mut c_void,
                                ws_len,
                                &zero as *const f32 as *const c_void,
                                prep.y,
                                c.y as *mut c_void,
                            ),
                        )?;
                    }
                }
            }
        }
        Ok(())
    }

    /// One [`GemmCall`] through `cublasGemmStridedBatchedEx`.
    fn gemm(&self, dev: &CudaDevice, g: &GemmCall) -> Result<(), EngineError> {
        let dt = match self.precision {
            Precision::Fp32 => cublas::cudaDataType_t::CUDA_R_32F,
            Precision::Fp16 => cublas::cudaDataType_t::CUDA_R_16F,
        };
        let op = |t: bool| {
            if t {
                cublas::cublasOperation_t::CUBLAS_OP_T
            } else {
                cublas::cublasOperation_t::CUBLAS_OP_N
            }
        };
        let zero = 0f32;
        // SAFETY: pointers are the program's buffers, sized by the compiler for these shapes.
        unsafe {
            check_blas(
                "cublasGemmStridedBatchedEx",
                cublas::cublasGemmStridedBatchedEx(
                    dev.blas,
                    op(g.trans_a),
                    op(g.trans_b),
                    g.m as i32,
                    g.n as i32,
                    g.k as i32,
                    &g.alpha as *const f32 as *const c_void,
                    g.a as *const c_void,
                    dt,
                    g.lda as i32,
                    g.stride_a as i64,
                    g.b as *const c_void,
                    dt,
                    g.ldb as i32,
                    g.stride_b as i64,
                    &zero as *const f32 as *const c_void,
                    g.c as *mut c_void,
                    dt,
                    g.ldc as i32,
                    g.stride_c as i64,
                    g.batch as i32,
                    cublas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    cublas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                ),
            )
        }
    }

    /// Copy float32 host inputs (int64 through `ids`) into the program's input buffers.
    pub fn set_inputs(
        &mut self,
        dev: &CudaDevice,
        inputs: &[(&str, &[f32])],
        ids: &[(&str, &[i64])],
    ) -> Result<(), EngineError> {
        for (k, (name, t)) in self.program.inputs.clone().iter().enumerate() {
            let dst = self.ptrs[t.buf];
            if self.program.buffers[t.buf].dtype == DType::I64 {
                let v = ids
                    .iter()
                    .find(|(n, _)| n == name)
                    .ok_or_else(|| EngineError::Graph(format!("input {name} (int64) not given")))?
                    .1;
                if v.len() != t.numel() {
                    return Err(EngineError::Graph(format!(
                        "input {name}: {} values, expected {:?}",
                        v.len(),
                        t.shape
                    )));
                }
                // SAFETY: the device range holds numel int64 values; the host slice is
                // pageable memory, which an asynchronous copy stages before it returns (so `v`
                // may go at once; CUDA's synchronisation rules let the driver wait for the
                // stream's earlier work while it stages, so an upload may not overlap the
                // previous run)
                unsafe {
                    cudarc::driver::result::memcpy_htod_async(dst, v, dev.stream.cu_stream())
                }
                .map_err(|e| gpu_err("upload", e))?;
                continue;
            }
            let v = inputs
                .iter()
                .find(|(n, _)| n == name)
                .ok_or_else(|| EngineError::Graph(format!("input {name} not given")))?
                .1;
            let v = &*self.program.host_input(name, v);
            if v.len() != t.numel() {
                return Err(EngineError::Graph(format!(
                    "input {name}: {} values, expected {:?}",
                    v.len(),
                    t.shape
                )));
            }
            dev.stream
                .memcpy_htod(v, &mut self.staging_in[k])
                .map_err(|e| gpu_err("upload", e))?;
            let (src, g) = self.staging_in[k].device_ptr(&dev.stream);
            drop(g);
            launch_op(
                dev,
                &cast_launch("cast_from_f32", self.precision, dst, src, v.len()),
            )?;
        }
        Ok(())
    }

    /// Run the steps: through the captured CUDA graph when there is one.
    pub fn execute(&mut self, dev: &CudaDevice) -> Result<(), EngineError> {
        match &self.graph {
            Some(g) => g.launch().map_err(|e| gpu_err("graph launch", e)),
            None => {
                self.enqueue(dev)?;
                self.ran_eagerly = true;
                Ok(())
            }
        }
    }

    /// Capture the step sequence in a CUDA graph (after one eager run has loaded every kernel).
    pub fn capture(&mut self, dev: &CudaDevice) -> Result<(), EngineError> {
        // lazily loaded kernels (CUDA's lazy module loading, cuBLAS/cuDNN routines) load on a
        // first eager run, not inside a capture: one, unless the program ran already
        if !self.ran_eagerly {
            self.enqueue(dev)?;
            self.ran_eagerly = true;
        }
        dev.stream.synchronize().map_err(|e| gpu_err("sync", e))?;
        dev.stream
            .begin_capture(
                cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
            )
            .map_err(|e| gpu_err("begin capture", e))?;
        // a panic while enqueuing (a bug) still ends the capture as it unwinds
        let guard = CaptureGuard(&dev.stream);
        let r = self.enqueue(dev);
        std::mem::forget(guard);
        let g = dev
            .stream
            .end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0));
        if g.is_err() {
            // cudarc may refuse before ending the capture (an error an earlier call left on the
            // context): end it here, or the stream stays capturing and nothing runs on it again
            end_open_capture(&dev.stream);
        }
        // an error while capturing invalidates the capture: report the first one
        r?;
        let g = g.map_err(|e| gpu_err("end capture", e))?;
        if let Some(g) = &g {
            g.upload().map_err(|e| gpu_err("graph upload", e))?;
        }
        self.graph = g;
        Ok(())
    }

    pub fn captured(&self) -> bool {
        self.graph.is_some()
    }

    /// A free output slot, allocated on first need; an error when both slots are waiting to be
    /// collected.
    fn free_slot(&mut self, dev: &CudaDevice) -> Result<usize, EngineError> {
        if let Some(k) = self.slots.iter().position(|s| !s.pending) {
            return Ok(k);
        }
        if self.slots.len() >= 2 {
            return Err(EngineError::Graph(
                "two runs are already waiting to be collected".into(),
            ));
        }
        let mut staging = Vec::new();
        let mut pinned = Vec::new();
        for (_, t) in &self.program.outputs {
            staging.push(
                dev.stream
                    .alloc_zeros::<f32>(t.numel().max(1))
                    .map_err(|e| gpu_err("alloc", e))?,
            );
            // Page-locked and cached (flags 0): the host reads these buffers, which cudarc's
            // default write-combined pinned memory makes slow.
            // SAFETY: written by a device copy before it is read.
            pinned.push(
                unsafe { dev.ctx.alloc_pinned_with_flags::<f32>(t.numel().max(1), 0) }
                    .map_err(|e| gpu_err("pinned", e))?,
            );
        }
        let ev = |f| dev.ctx.new_event(Some(f)).map_err(|e| gpu_err("event", e));
        use cudarc::driver::sys::CUevent_flags::{CU_EVENT_BLOCKING_SYNC, CU_EVENT_DISABLE_TIMING};
        self.slots.push(OutSlot {
            staging,
            pinned,
            computed: ev(CU_EVENT_DISABLE_TIMING)?,
            // `collect` waits on it: sleep rather than spin, the encoder threads need the CPU
            copied: ev(CU_EVENT_BLOCKING_SYNC)?,
            pending: false,
        });
        Ok(self.slots.len() - 1)
    }

    /// Queue the outputs' trip to pinned host memory: cast to float32 into the slot's device
    /// staging on the compute stream, then copy on the copy stream, so the compute stream is
    /// free for the next run at once. The slot's previous copy must have finished before its
    /// staging is overwritten (the compute stream waits for it).
    fn enqueue_outputs(&mut self, dev: &CudaDevice, k: usize) -> Result<(), EngineError> {
        let slot = &self.slots[k];
        dev.stream
            .wait(&slot.copied)
            .map_err(|e| gpu_err("wait", e))?;
        for (o, (_, t)) in self.program.outputs.iter().enumerate() {
            let src = self.ptrs[t.buf];
            let (dst, g) = slot.staging[o].device_ptr(&dev.stream);
            drop(g);
            launch_op(
                dev,
                &cast_launch("cast_to_f32", self.precision, dst, src, t.numel()),
            )?;
        }
        slot.computed
            .record(&dev.stream)
            .map_err(|e| gpu_err("record", e))?;
        dev.copy
            .wait(&slot.computed)
            .map_err(|e| gpu_err("wait", e))?;
        let slot = &mut self.slots[k];
        let mut queued = Ok(());
        for o in 0..slot.staging.len() {
            queued = dev
                .copy
                .memcpy_dtoh(&slot.staging[o], &mut slot.pinned[o])
                .map_err(|e| gpu_err("download", e));
            if queued.is_err() {
                break;
            }
        }
        // recorded after whatever copies were queued, also when one failed: the event is what
        // `Drop` waits on before the buffers go
        slot.copied
            .record(&dev.copy)
            .map_err(|e| gpu_err("record", e))?;
        queued?;
        slot.pending = true;
        Ok(())
    }

    /// Wait for the outputs queued in `slot` and return them.
    pub fn collect(&mut self, slot: usize) -> Result<super::program::Outputs, EngineError> {
        let s = self
            .slots
            .get_mut(slot)
            .filter(|s| s.pending)
            .ok_or_else(|| {
                EngineError::Graph(format!("no run is waiting in output slot {slot}"))
            })?;
        // the slot is free again either way: a failed wait is the device's error (a fault
        // leaves the context unusable), which later calls should report, not a full slot
        s.pending = false;
        s.copied.synchronize().map_err(|e| gpu_err("sync", e))?;
        let mut out = Vec::new();
        for (o, (name, t)) in self.program.outputs.iter().enumerate() {
            let v = s.pinned[o].as_slice().map_err(|e| gpu_err("pinned", e))?;
            out.push((name.clone(), t.shape.clone(), v[..t.numel()].to_vec()));
        }
        Ok(out)
    }

    /// How many convolution steps run on `conv_igemm_f16_nBN` (the rest on cuDNN).
    pub fn conv_kernel_steps(&self) -> usize {
        self.conv_kernel.len()
    }

    /// How many GEGLU pairs run as one `gemm_geglu_f16_nBN` (the rest as a cuBLASLt matmul and
    /// `geglu`).
    pub fn geglu_kernel_pairs(&self) -> usize {
        self.geglu_kernel.len() / 2
    }

    /// How many normalisation pairs run as the normalisation's statistics and one
    /// `conv_igemm_gn/_ln_f16_nBN` (the rest as the two steps).
    pub fn norm_kernel_pairs(&self) -> usize {
        self.norm_pair.len() / 2
    }

    /// How many attentions run on `attention_tiled2_f16_d40`.
    pub fn attention_two_steps(&self) -> usize {
        self.attention_two.len()
    }

    /// Bytes of weights on the device for this program and those sharing them with it.
    pub fn device_weight_bytes(&self) -> usize {
        self.weights.borrow().bytes()
    }

    /// Copy the outputs to pinned host buffers (asynchronously), then wait and return them.
    pub fn outputs(&mut self, dev: &CudaDevice) -> Result<super::program::Outputs, EngineError> {
        let k = self.free_slot(dev)?;
        self.enqueue_outputs(dev, k)?;
        self.collect(k)
    }

    /// Fill every activation with NaN (so an unwritten output shows).
    pub fn poison(&self, dev: &CudaDevice) -> Result<(), EngineError> {
        let (base, g) = self.arena.device_ptr(&dev.stream);
        drop(g);
        let n = self.memory.arena_bytes / self.precision.elem_bytes();
        self.fill_nan(dev, base, n)
    }

    /// `n` elements of the precision's type at `ptr` set to NaN, on the stream.
    fn fill_nan(&self, dev: &CudaDevice, ptr: u64, n: usize) -> Result<(), EngineError> {
        launch_op(
            dev,
            &elementwise_launch(
                format!("fill_{}", self.precision.suffix()),
                n,
                vec![KArg::Ptr(ptr), KArg::I64(n as i64), KArg::F32(f32::NAN)],
            ),
        )
    }

    /// Run once eagerly, one step at a time with a synchronisation after each, comparing each
    /// step's output with the reference as soon as it is complete ([`super::localize`]); the
    /// activations are poisoned (NaN) first. A launch that faults is reported with its step.
    pub fn trace(
        &mut self,
        dev: &CudaDevice,
        inputs: &[(&str, &[f32])],
        ids: &[(&str, &[i64])],
        loc: &mut super::localize::Localizer,
    ) -> Result<(), EngineError> {
        self.poison(dev)?;
        self.set_inputs(dev, inputs, ids)?;
        dev.stream.synchronize().map_err(|e| gpu_err("inputs", e))?;
        // outputs of projections a GEGLU's gemm_geglu computes and of GroupNorms a convolution
        // normalises as it reads their input: never written, so not compared
        let mut unwritten = HashSet::new();
        for si in 0..self.program.steps.len() {
            let what = || {
                format!(
                    "step {si} ({})",
                    super::localize::label(&self.program.steps[si])
                )
            };
            for b in loc.inputs_before(si) {
                if unwritten.contains(&b) {
                    continue;
                }
                let v = self.read_back(b).map_err(|e| gpu_err(&what(), e))?;
                loc.observe_input(si, b, &v);
            }
            self.enqueue_step(dev, si)
                .map_err(|e| EngineError::Graph(format!("{}: {e}", what())))?;
            dev.stream.synchronize().map_err(|e| gpu_err(&what(), e))?;
            if match self.program.steps[si] {
                Step::Linear { .. } => self.geglu_kernel.contains_key(&si),
                Step::GroupNorm { .. } | Step::LayerNorm { .. } => self.norm_pair.contains_key(&si),
                _ => false,
            } {
                unwritten.insert(self.program.steps[si].io().1);
                continue;
            }
            if loc.wants(si) {
                let b = self.program.steps[si].io().1;
                let v = self.read_back(b).map_err(|e| gpu_err(&what(), e))?;
                loc.observe(si, b, &v);
            }
        }
        Ok(())
    }

    /// Float buffer `b`'s values, copied to the host synchronously (the stream must be idle).
    fn read_back(&self, b: usize) -> Result<Vec<f32>, cudarc::driver::DriverError> {
        let n = self.program.buffers[b].numel;
        let mut bytes = vec![0u8; n * self.precision.elem_bytes()];
        // SAFETY: the buffer's device range holds n elements of the precision's type (the memory
        // plan's placement); the caller has synchronised the stream.
        unsafe { cudarc::driver::result::memcpy_dtoh_sync(&mut bytes[..], self.ptrs[b]) }?;
        Ok(match self.precision {
            Precision::Fp32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Precision::Fp16 => bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        })
    }

    /// Buffer `b` (float16) filled with `block` repeated, on the stream (from pageable memory:
    /// the copies complete before the stream's next work).
    fn upload_tiled(&self, dev: &CudaDevice, b: usize, block: &[u16]) -> Result<(), EngineError> {
        debug_assert_eq!(self.precision, Precision::Fp16);
        let (n, ptr) = (self.program.buffers[b].numel, self.ptrs[b]);
        if ptr == 0 {
            return Err(EngineError::Graph(format!(
                "buffer {b} has no place in the arena"
            )));
        }
        let mut at = 0;
        while at < n {
            let k = (n - at).min(block.len());
            // SAFETY: elements [at, at + k) of a buffer of n float16 values; pageable memory,
            // staged by the driver before the call returns
            unsafe {
                cudarc::driver::result::memcpy_htod_async(
                    ptr + 2 * at as u64,
                    &block[..k],
                    dev.stream.cu_stream(),
                )
            }
            .map_err(|e| gpu_err("upload", e))?;
            at += k;
        }
        Ok(())
    }

    /// What `run` (the steps whose buffers are `io`, [`tactic_io`]: the libraries' way, or a
    /// tactic kernel's) writes to the output when the inputs hold [`tactic_fill_block`]'s values
    /// and what the steps write NaN before it runs (float16 programs).
    fn tactic_output(
        &self,
        dev: &CudaDevice,
        io: &TacticIo,
        run: &dyn Fn() -> Result<(), EngineError>,
    ) -> Result<Vec<f32>, EngineError> {
        let sync = |what: &str| {
            dev.stream
                .synchronize()
                .map_err(|e| gpu_err(&format!("tactic check: {what}"), e))
        };
        sync("before")?;
        // (NaN first: an input the last step also writes, a residual in place, keeps the values)
        for &b in io.computed.iter().chain([&io.out]) {
            let (ptr, n) = (self.ptrs[b], self.program.buffers[b].numel);
            if ptr == 0 {
                return Err(EngineError::Graph(format!(
                    "buffer {b} has no place in the arena"
                )));
            }
            self.fill_nan(dev, ptr, n)?;
        }
        for &b in &io.inputs {
            self.upload_tiled(dev, b, tactic_fill_block())?;
        }
        run()?;
        sync("run")?;
        self.read_back(io.out)
            .map_err(|e| gpu_err("tactic check: read back", e))
    }

    /// Whether a tactic kernel's output `got` agrees with `want`, what the steps it replaces
    /// (`reference`: cuDNN, cuBLASLt and the kernels they take) compute on the same inputs
    /// ([`tactic_agrees`]); a disagreement is said on stderr, naming the kernel and problem
    /// (`what`), and the caller records the kernel as not chosen.
    fn tactic_checks(what: &str, reference: &str, want: &[f32], got: &[f32]) -> bool {
        match tactic_agrees(want, got) {
            Ok(_) => true,
            Err(e) => {
                eprintln!(
                    "warning: {what}: the kernel does not compute what {reference} does on this \
                     GPU ({e}); not used"
                );
                false
            }
        }
    }

    /// Run once: inputs in, outputs out.
    pub fn run(
        &mut self,
        dev: &CudaDevice,
        inputs: &[(&str, &[f32])],
        ids: &[(&str, &[i64])],
    ) -> Result<super::program::Outputs, EngineError> {
        let k = self.submit(dev, inputs, ids)?;
        self.collect(k)
    }

    /// Queue one run: inputs are uploaded, the steps (or their CUDA graph) and the outputs'
    /// copy to pinned host memory are enqueued, and the output slot to
    /// [`GpuProgram::collect`] is returned without waiting. At most two runs may be waiting.
    pub fn submit(
        &mut self,
        dev: &CudaDevice,
        inputs: &[(&str, &[f32])],
        ids: &[(&str, &[i64])],
    ) -> Result<usize, EngineError> {
        // Refuse before touching the inputs when both slots are waiting.
        let k = self.free_slot(dev)?;
        self.set_inputs(dev, inputs, ids)?;
        self.execute(dev)?;
        self.enqueue_outputs(dev, k)?;
        Ok(k)
    }
}

/// Ends a capture left open on `stream` (cudarc refused to end it, or a panic unwound through
/// it): otherwise the stream stays capturing and nothing runs on it again.
fn end_open_capture(stream: &CudaStream) {
    // SAFETY: the device's own stream; a graph returned is destroyed at once.
    unsafe {
        use cudarc::driver::sys::CUstreamCaptureStatus as S;
        if !matches!(
            cudarc::driver::result::stream::is_capturing(stream.cu_stream()),
            Ok(S::CU_STREAM_CAPTURE_STATUS_NONE)
        ) {
            if let Ok(graph) = cudarc::driver::result::stream::end_capture(stream.cu_stream()) {
                if !graph.is_null() {
                    let _ = cudarc::driver::result::graph::destroy(graph);
                }
            }
        }
    }
}

/// Ends the capture if dropped while it is open (forgotten once enqueuing returned).
struct CaptureGuard<'a>(&'a CudaStream);

impl Drop for CaptureGuard<'_> {
    fn drop(&mut self) {
        end_open_capture(self.0);
    }
}

/// Whether `l` can launch on this GPU ([`launchable`]); a note naming `what` when not.
fn runs_here(dev: &CudaDevice, what: &str, l: &Launch) -> bool {
    match launchable(dev, l) {
        Ok(_) => true,
        Err(e) => {
            eprintln!("note: {what}: {} does not run here ({e})", l.kernel);
            false
        }
    }
}

/// The faster of the implicit-GEMM kernel's tile widths ([`CONV_IGEMM_WIDTHS`]) for the launch
/// `launch` gives at each: its mean time (ms) and width; `(f32::MAX, None)` when none ran. A
/// launch this GPU refuses is skipped (said on stderr, with `what`); a fault while one runs is
/// an error (the context is then unusable).
fn fastest_width(
    dev: &CudaDevice,
    what: &str,
    launch: &dyn Fn(usize) -> Result<Launch, EngineError>,
) -> Result<(f32, Option<usize>), EngineError> {
    let mut best: (f32, Option<usize>) = (f32::MAX, None);
    for bn in CONV_IGEMM_WIDTHS {
        let l = launch(bn)?;
        if !runs_here(dev, what, &l) {
            continue;
        }
        let ms = time_launch(dev, &l)?;
        if ms < best.0 {
            best = (ms, Some(bn));
        }
    }
    Ok(best)
}

/// Mean time (ms) of `l` over [`LT_TIMED_RUNS`] launches after a warm-up (on the program's own
/// buffers before it has run: the output is scratch).
fn time_launch(dev: &CudaDevice, l: &Launch) -> Result<f32, EngineError> {
    time_enqueue(dev, &|| launch_op(dev, l))
}

/// Mean time (ms) of what `enqueue` puts on the device's stream, over [`LT_TIMED_RUNS`] calls
/// after a warm-up.
fn time_enqueue(
    dev: &CudaDevice,
    enqueue: &dyn Fn() -> Result<(), EngineError>,
) -> Result<f32, EngineError> {
    let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    enqueue()?;
    let e0 = dev
        .stream
        .record_event(flags)
        .map_err(|e| gpu_err("event", e))?;
    for _ in 0..LT_TIMED_RUNS {
        enqueue()?;
    }
    let e1 = dev
        .stream
        .record_event(flags)
        .map_err(|e| gpu_err("event", e))?;
    e1.synchronize().map_err(|e| gpu_err("synchronize", e))?;
    let ms = e0.elapsed_ms(&e1).map_err(|e| gpu_err("elapsed", e))?;
    Ok(ms / LT_TIMED_RUNS as f32)
}

/// Enqueue one [`Launch`] on the device's stream.
/// The kernel `l` launches, if this GPU can run `l`: its geometry within the device's limits
/// (`check_launchable`), the kernel loaded, its block within the threads the kernel's registers
/// allow.
fn launchable<'a>(dev: &'a CudaDevice, l: &Launch) -> Result<&'a CudaFunction, EngineError> {
    check_launchable(l, dev.smem_optin).map_err(EngineError::Graph)?;
    let (f, max_threads) = dev.func(&l.kernel)?;
    let threads = l.block.0 * l.block.1 * l.block.2;
    if threads > *max_threads {
        return Err(EngineError::Graph(format!(
            "{}: a block of {threads} threads, more than the {max_threads} its registers allow \
             on this GPU",
            l.kernel
        )));
    }
    Ok(f)
}

fn launch_op(dev: &CudaDevice, l: &Launch) -> Result<(), EngineError> {
    let f = launchable(dev, l)?;
    // shared memory above 48 KiB (`l.opt_in`) was opened at load for every kernel that may need
    // it, up to what this GPU allows (check_launchable)
    let cfg = LaunchConfig {
        grid_dim: l.grid,
        block_dim: l.block,
        shared_mem_bytes: l.smem,
    };
    let mut b = dev.stream.launch_builder(f);
    for a in &l.args {
        match a {
            KArg::Ptr(v) => b.arg(v),
            KArg::I32(v) => b.arg(v),
            KArg::I64(v) => b.arg(v),
            KArg::F32(v) => b.arg(v),
            KArg::Strided(v) => b.arg(v),
        };
    }
    // SAFETY: argument lists match the kernels' signatures in engine_ops.cu and
    // temporal_attention.cu (the same lists run in the CUDA emulator: tests/engine_emu.rs).
    unsafe { b.launch(cfg) }.map_err(|e| gpu_err("launch", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cublaslt_is_told_the_alignment_pointers_have() {
        // cuMemAlloc gives 256-byte alignment (the heuristic's default); arena offsets are
        // multiples of 256; anything less is said as it is
        assert_eq!(lt_alignment(0), 256);
        assert_eq!(lt_alignment(0x7f00_0000_0000), 256);
        assert_eq!(lt_alignment(0x7f00_0000_0200), 256);
        assert_eq!(lt_alignment(0x7f00_0000_0010), 16);
        assert_eq!(lt_alignment(0x7f00_0000_0002), 2);
        assert_eq!(lt_alignment(0x7f00_0000_0001), 1);
    }

    #[test]
    fn gemm_algorithms_are_cached_by_alignment_below_256_bytes() {
        let d = LtDesc::linear((64, 320, 640), Some(0x7f00_0000_0400), true);
        let call = |a: u64, res: u64| LtCall {
            desc: d,
            a,
            b: 0x7f00_0001_0000,
            res,
            out: 0x7f00_0002_0000,
        };
        let key = |a, res| lt_key(&d, &call(a, res), Precision::Fp16);
        assert_eq!(
            key(0x7f00_0000_0100, 0x7f00_0003_0000),
            format!("{} f16", d.problem())
        );
        let a16 = key(0x7f00_0000_0110, 0x7f00_0003_0000);
        assert_eq!(a16, format!("{} f16 align16/256/256/256", d.problem()));
        // the residual is C: its alignment counts too, as its own
        let c16 = key(0x7f00_0000_0100, 0x7f00_0003_0010);
        assert!(c16.ends_with("align256/256/16/256"), "{c16}");
        assert_ne!(a16, c16);
    }

    #[test]
    fn versions_the_engine_needs_are_checked_with_clear_errors() {
        // an H100 on a CUDA 13.0 driver with NVRTC 13.0 (the GPU machine here)
        assert_eq!(check_versions((9, 0), 13000, (13, 0)), Ok(()));
        // a newer driver runs older NVRTC's PTX
        assert_eq!(check_versions((8, 6), 13020, (13, 1)), Ok(()));
        let e = check_versions((7, 5), 13000, (13, 0)).unwrap_err();
        assert!(
            e.contains("compute capability 8.0") && e.contains("7.5"),
            "{e}"
        );
        let e = check_versions((9, 0), 12080, (12, 8)).unwrap_err();
        assert!(e.contains("CUDA 13.0") && e.contains("12.8"), "{e}");
        // a newer CUDA 13 NVRTC's cubins run on a CUDA 13.0 driver (minor-version compatibility)
        assert_eq!(check_versions((9, 0), 13000, (13, 2)), Ok(()));
        let e = check_versions((9, 0), 13000, (14, 0)).unwrap_err();
        assert!(
            e.contains("NVRTC 14.0") && e.contains("nvidia-cuda-nvrtc==13.*"),
            "{e}"
        );
    }
}
