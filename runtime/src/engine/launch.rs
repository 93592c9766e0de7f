//! What the CUDA executor enqueues for each step of a [`Program`], as plain data: kernel
//! launches (entry name, grid, block, shared memory, arguments), cuBLAS GEMMs, cuBLASLt matmuls
//! and cuDNN convolutions with the values their descriptors are given. [`exec`](super::exec)
//! turns these into driver and library calls; [`emulated`](super::emulated) runs the very same
//! list on the CPU (the kernels in the CUDA emulator, the library calls by their documented
//! semantics), which is how the executor's host side — kernel choice, launch shapes, argument
//! lists, scratch placement, descriptor values — is checked on a machine without a GPU.

use std::collections::HashMap;

use super::exec::Precision;
use super::program::{
    permute, BufferKind, DType, MemoryPlan, Program, Step, Strided, WeightSource,
};
use super::EngineError;

/// Weight values for upload.
pub enum WeightData {
    F32(Vec<f32>),
    /// IEEE float16 bits (already converted, as stored in an engine file).
    F16(Vec<u16>),
    I64(Vec<i64>),
}

impl WeightData {
    pub fn len(&self) -> usize {
        match self {
            WeightData::F32(v) => v.len(),
            WeightData::F16(v) => v.len(),
            WeightData::I64(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn f16_bits(v: &[f32]) -> Vec<u16> {
    v.iter()
        .map(|&x| half::f16::from_f32(x).to_bits())
        .collect()
}

/// Every buffer's device address: activations at their arena offsets from `base`, weights as
/// `upload` places them — converted to the precision's element type (float16 rounded to
/// nearest), permuted copies made, an initializer read by several buffers uploaded once, and
/// weights no step reads (an initializer replaced by its permuted copy) left on the host.
/// Returns the addresses and the bytes uploaded.
pub fn place_buffers(
    program: &Program,
    memory: &MemoryPlan,
    base: u64,
    precision: Precision,
    weight: &dyn Fn(&str) -> Result<WeightData, EngineError>,
    upload: &mut dyn FnMut(&[u8]) -> Result<u64, EngineError>,
) -> Result<(Vec<u64>, usize), EngineError> {
    let eb = precision.elem_bytes();
    let mut ptrs = vec![0u64; program.buffers.len()];
    let mut weight_bytes = 0;
    let mut by_name: HashMap<String, u64> = HashMap::new();
    // weights no step reads (an initializer replaced by its permuted copy) stay on the host
    let mut read = vec![false; program.buffers.len()];
    for st in &program.steps {
        for r in st.io().0 {
            read[r] = true;
        }
    }
    for (_, t) in &program.outputs {
        read[t.buf] = true;
    }
    for (i, b) in program.buffers.iter().enumerate() {
        if let Some(off) = memory.offsets[i] {
            ptrs[i] = base + off as u64;
            continue;
        }
        let BufferKind::Weight(src) = &b.kind else {
            continue;
        };
        if !read[i] {
            continue;
        }
        if let WeightSource::Initializer(n) = src {
            if let Some(&p) = by_name.get(n) {
                ptrs[i] = p;
                continue;
            }
        }
        let data = match src {
            WeightSource::Initializer(n) => weight(n)?,
            WeightSource::Permuted { name, dims, perm } => {
                let data = weight(name)?;
                let len = data.len();
                if len != dims.iter().product::<usize>() {
                    return Err(EngineError::Graph(format!(
                        "weight {name}: {len} values, expected {dims:?}"
                    )));
                }
                match data {
                    WeightData::F32(v) => WeightData::F32(permute(&v, dims, perm)),
                    WeightData::F16(v) => WeightData::F16(permute(&v, dims, perm)),
                    WeightData::I64(v) => WeightData::I64(permute(&v, dims, perm)),
                }
            }
            WeightSource::Computed(v) => WeightData::F32((**v).clone()),
            WeightSource::ComputedI64(v) => WeightData::I64((**v).clone()),
            WeightSource::Concat(names) => {
                let mut parts = Vec::new();
                for n in names {
                    parts.push(weight(n)?);
                }
                if parts.iter().all(|p| matches!(p, WeightData::F16(_))) {
                    let mut v = Vec::new();
                    for p in parts {
                        if let WeightData::F16(p) = p {
                            v.extend(p);
                        }
                    }
                    WeightData::F16(v)
                } else {
                    let mut v = Vec::new();
                    for (n, p) in names.iter().zip(parts) {
                        match p {
                            WeightData::F32(p) => v.extend(p),
                            WeightData::F16(p) => {
                                v.extend(p.iter().map(|&h| half::f16::from_bits(h).to_f32()))
                            }
                            WeightData::I64(_) => {
                                return Err(EngineError::Graph(format!(
                                "weight {n}: int64 where a projection's float weight was expected"
                            )))
                            }
                        }
                    }
                    WeightData::F32(v)
                }
            }
        };
        let bytes: Vec<u8> = match (data, b.dtype, precision) {
            (WeightData::I64(v), DType::I64, _) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            (WeightData::F32(v), DType::Float, Precision::Fp32) => {
                v.iter().flat_map(|x| x.to_le_bytes()).collect()
            }
            (WeightData::F32(v), DType::Float, Precision::Fp16) => {
                f16_bits(&v).iter().flat_map(|x| x.to_le_bytes()).collect()
            }
            (WeightData::F16(v), DType::Float, Precision::Fp16) => {
                v.iter().flat_map(|x| x.to_le_bytes()).collect()
            }
            (WeightData::F16(v), DType::Float, Precision::Fp32) => v
                .iter()
                .flat_map(|&x| half::f16::from_bits(x).to_f32().to_le_bytes())
                .collect(),
            _ => {
                return Err(EngineError::Graph(format!(
                    "weight {src:?}: wrong element type"
                )))
            }
        };
        let want = b.numel * if b.dtype == DType::I64 { 8 } else { eb };
        if bytes.len() != want {
            return Err(EngineError::Graph(format!(
                "weight {}: {} bytes, the program needs {want}",
                match src {
                    WeightSource::Initializer(name) | WeightSource::Permuted { name, .. } =>
                        name.clone(),
                    WeightSource::Concat(names) => names.join(" + "),
                    _ => "(computed)".into(),
                },
                bytes.len()
            )));
        }
        weight_bytes += bytes.len();
        let p = upload(&bytes)?;
        ptrs[i] = p;
        if let WeightSource::Initializer(n) = src {
            by_name.insert(n.clone(), p);
        }
    }
    Ok((ptrs, weight_bytes))
}

/// What the executor runs of `p` in `precision`: in float16 the attention projections merged
/// ([`merge_projections`]; returns how many). The CUDA executor, its emulation and the engine
/// builder's memory figures all take the program through here.
pub fn specialize(p: &mut Program, precision: Precision) -> usize {
    match precision {
        Precision::Fp16 => merge_projections(p),
        Precision::Fp32 => 0,
    }
}

/// `(step, out, x, w, n, k)` of a bias-free Linear.
type Projection = (usize, usize, usize, usize, usize, usize);

/// The bias-free Linear writing `b` (its weight an initializer, or computed on the host), when
/// `b` is read once.
fn projection(
    p: &Program,
    writer: &HashMap<usize, usize>,
    readers: &[usize],
    b: usize,
) -> Option<Projection> {
    let si = *writer.get(&b)?;
    match &p.steps[si] {
        Step::Linear {
            out,
            x,
            w,
            bias: None,
            residual: None,
            n,
            k,
            ..
        } if readers[*out] == 1
            && matches!(
                p.buffers[*w].kind,
                BufferKind::Weight(WeightSource::Initializer(_) | WeightSource::Computed(_))
            ) =>
        {
            Some((si, *out, *x, *w, *n, *k))
        }
        _ => None,
    }
}

/// Float16 specialisation: attention whose Q, K and V (or K and V: cross-attention) are
/// projected from one input by bias-free Linears becomes one GEMM over the stacked weights
/// (`[2C or 3C, K]`, [`WeightSource::Concat`]) whose `[M, 2C or 3C]` output the tensor-core
/// attention kernels read in place (row stride 2C or 3C): the input is read once instead of
/// three times and the GEMM is wider. Only attention those kernels run is merged (no bias, a
/// head size they take); each projection's output must be read by that attention alone and its
/// input not rewritten between the projections. Returns how many attentions were merged.
pub fn merge_projections(p: &mut Program) -> usize {
    let writer: HashMap<usize, usize> = p
        .steps
        .iter()
        .enumerate()
        .map(|(si, st)| (st.io().1, si))
        .collect();
    let mut readers = vec![0usize; p.buffers.len()];
    for st in &p.steps {
        let (reads, w) = st.io();
        for r in reads {
            if r != w {
                readers[r] += 1;
            }
        }
    }
    for (_, t) in &p.outputs {
        readers[t.buf] += 1;
    }
    let mut remove = vec![false; p.steps.len()];
    let mut merged = 0;
    for ai in 0..p.steps.len() {
        let Step::Attention {
            q,
            k,
            v,
            bias: None,
            heads,
            d,
            ld,
            offs,
            ..
        } = p.steps[ai].clone()
        else {
            continue;
        };
        let c = heads * d;
        if !super::program::fused_attention_head(d) || ld != [c; 3] || offs != [0; 3] {
            continue;
        }
        let proj = |b| projection(p, &writer, &readers, b);
        let (Some(pq), Some(pk), Some(pv)) = (proj(q), proj(k), proj(v)) else {
            continue;
        };
        let same =
            |a: &Projection, b: &Projection| a.2 == b.2 && a.5 == b.5 && a.4 == c && b.4 == c;
        // which of Q, K, V share their input: all three, or K and V
        let group: Vec<(usize, Projection)> = if same(&pq, &pk) && same(&pk, &pv) {
            vec![(0, pq), (1, pk), (2, pv)]
        } else if same(&pk, &pv) {
            vec![(1, pk), (2, pv)]
        } else {
            continue;
        };
        if group.iter().any(|(_, g)| remove[g.0]) {
            continue;
        }
        let x = group[0].1 .2;
        let first = group.iter().map(|(_, g)| g.0).min().expect("two or three");
        let last = group.iter().map(|(_, g)| g.0).max().expect("two or three");
        // the input must hold the same values at every projection
        if (first + 1..=last).any(|si| p.steps[si].io().1 == x) {
            continue;
        }
        let Step::Linear { m, k: kdim, .. } = p.steps[first] else {
            continue;
        };
        let parts = group.len();
        // the stacked weight: initializers by name (stacked at upload), or host values
        let sources: Vec<&WeightSource> = group
            .iter()
            .filter_map(|(_, g)| match &p.buffers[g.3].kind {
                BufferKind::Weight(s) => Some(s),
                _ => None,
            })
            .collect();
        let stacked = if let Some(names) = sources
            .iter()
            .map(|s| match s {
                WeightSource::Initializer(n) => Some(n.clone()),
                _ => None,
            })
            .collect::<Option<Vec<String>>>()
        {
            WeightSource::Concat(names)
        } else if let Some(values) = sources
            .iter()
            .map(|s| match s {
                WeightSource::Computed(v) => Some(v.as_slice()),
                _ => None,
            })
            .collect::<Option<Vec<&[f32]>>>()
        {
            WeightSource::Computed(std::sync::Arc::new(values.concat()))
        } else {
            continue;
        };
        let wbuf = p.buffers.len();
        p.buffers.push(super::program::Buffer {
            numel: parts * c * kdim,
            dtype: DType::Float,
            kind: BufferKind::Weight(stacked),
        });
        let obuf = p.buffers.len();
        p.buffers.push(super::program::Buffer {
            numel: m * parts * c,
            dtype: DType::Float,
            kind: BufferKind::Activation,
        });
        p.steps[first] = Step::Linear {
            out: obuf,
            x,
            w: wbuf,
            bias: None,
            residual: None,
            m,
            n: parts * c,
            k: kdim,
        };
        for (_, g) in &group {
            if g.0 != first {
                remove[g.0] = true;
            }
        }
        if let Step::Attention {
            q, k, v, ld, offs, ..
        } = &mut p.steps[ai]
        {
            for (j, (which, _)) in group.iter().enumerate() {
                let b = match which {
                    0 => &mut *q,
                    1 => &mut *k,
                    _ => &mut *v,
                };
                *b = obuf;
                ld[*which] = parts * c;
                offs[*which] = j * c;
            }
        }
        merged += 1;
    }
    let mut i = 0;
    p.steps.retain(|_| {
        i += 1;
        !remove[i - 1]
    });
    merged
}

/// A kernel argument, by value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KArg {
    /// A device address.
    Ptr(u64),
    I32(i32),
    I64(i64),
    F32(f32),
    /// `struct Strided` of engine_ops.cu, by value.
    Strided(Strided),
}

/// One kernel launch.
#[derive(Debug, Clone, PartialEq)]
pub struct Launch {
    /// The entry point's full name (`layer_norm_warp_f16`, `attention_tiled_f16_d48`, ...).
    pub kernel: String,
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    /// Dynamic shared memory bytes.
    pub smem: u32,
    /// Set the kernel's dynamic shared memory limit to `smem` before launching (above 48 KiB,
    /// for a kernel not already opted in when the device opened).
    pub opt_in: bool,
    pub args: Vec<KArg>,
}

/// `cublasGemmStridedBatchedEx` in column-major terms: `C[m×n] = alpha·op(A)·op(B)` (β = 0),
/// float32 accumulation, the precision's element type for A, B and C.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GemmCall {
    pub a: u64,
    pub b: u64,
    pub c: u64,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
    pub stride_a: usize,
    pub stride_b: usize,
    pub stride_c: usize,
    pub batch: usize,
    pub alpha: f32,
}

/// A column-major cuBLASLt matrix layout: rows, columns, leading dimension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LtLayout {
    pub rows: u64,
    pub cols: u64,
    pub ld: i64,
}

/// The values of a cuBLASLt matmul's descriptors: `D = op(A)·op(B) (+ bias along D's rows)
/// + beta·C`, with C and D sharing `c`'s layout.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LtDesc {
    pub trans_a: bool,
    pub trans_b: bool,
    pub a: LtLayout,
    pub b: LtLayout,
    pub c: LtLayout,
    /// `CUBLASLT_EPILOGUE_BIAS` with this bias vector (D's element type).
    pub bias: Option<u64>,
    pub beta: f32,
}

impl LtDesc {
    /// Row-major `out[m, n] = x[m, k]·w[n, k]ᵀ (+ bias[n]) (+ res[m, n])`, seen column-major as
    /// `Dᵀ[n × m] = op_T(W)·X` with the bias along D's rows.
    pub fn linear((m, n, k): (usize, usize, usize), bias: Option<u64>, residual: bool) -> Self {
        let l = |rows: usize, cols: usize| LtLayout {
            rows: rows as u64,
            cols: cols as u64,
            ld: rows as i64,
        };
        LtDesc {
            trans_a: true,
            trans_b: false,
            a: l(k, n), // W stored [n, k] row-major = k × n column-major
            b: l(k, m), // X stored [m, k] row-major = k × m column-major
            c: l(n, m), // out and residual [m, n] row-major = n × m column-major
            bias,
            beta: if residual { 1.0 } else { 0.0 },
        }
    }

    /// The problem as a timing-cache key: what an algorithm's choice depends on (operations,
    /// layouts, epilogue, β), not the pointers.
    pub fn problem(&self) -> String {
        let l = |x: &LtLayout, t: bool| {
            format!("{}x{}/{}{}", x.rows, x.cols, x.ld, if t { "T" } else { "" })
        };
        format!(
            "lt A{} B{} D{}{}{}",
            l(&self.a, self.trans_a),
            l(&self.b, self.trans_b),
            l(&self.c, false),
            if self.bias.is_some() { " bias" } else { "" },
            if self.beta != 0.0 { " +C" } else { "" }
        )
    }
}

/// One cuBLASLt matmul: `C` is `res` when `beta` ≠ 0, else `out`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LtCall {
    pub desc: LtDesc,
    pub a: u64,
    pub b: u64,
    pub res: u64,
    pub out: u64,
}

/// The values of a cuDNN forward convolution's descriptors (cross-correlation, y = conv(x, w),
/// β = 0). Tensor dimensions are always given in NCHW order (filters `[k, c, r, s]`); `nhwc`
/// says how both tensors and the filter are stored (`CUDNN_TENSOR_NHWC`: filters `[k, r, s, c]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvDesc {
    pub nhwc: bool,
    pub x: [usize; 4],
    pub w: [usize; 4],
    pub y: [usize; 4],
    /// Symmetric padding (height, width).
    pub pads: [usize; 2],
    pub strides: [usize; 2],
    pub dilations: [usize; 2],
    pub group: usize,
}

impl ConvDesc {
    /// The descriptor of a Conv step (cuDNN takes symmetric padding only).
    pub fn of(c: &super::program::ConvStep) -> Result<Self, EngineError> {
        if c.pads[0] != c.pads[2] || c.pads[1] != c.pads[3] {
            return Err(EngineError::Graph(format!(
                "Conv with asymmetric padding {:?} is not supported by the CUDA engine yet",
                c.pads
            )));
        }
        Ok(Self::leading(c))
    }

    /// The step's convolution with its leading pads (the trailing ones follow from the output
    /// size): what the CPU interpreter computes, asymmetric padding included.
    pub fn leading(c: &super::program::ConvStep) -> Self {
        ConvDesc {
            nhwc: c.nhwc,
            x: c.x_shape,
            w: c.w_shape,
            y: c.y_shape,
            pads: [c.pads[0], c.pads[1]],
            strides: c.strides,
            dilations: c.dilations,
            group: c.group,
        }
    }
}

/// The memory plan of `program` with the precision's element size.
pub fn plan_memory_for(program: &Program, precision: Precision) -> MemoryPlan {
    let eb = precision.elem_bytes();
    super::program::plan_memory(program, |d| match d {
        DType::Float => eb,
        DType::I64 => 8,
    })
}

/// One cuDNN convolution (`step`: the Conv step whose prepared descriptors run it).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConvCall {
    pub step: usize,
    pub x: u64,
    pub w: u64,
    pub y: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    Kernel(Launch),
    Gemm(GemmCall),
    Lt(LtCall),
    Conv(ConvCall),
}

/// What the step planner needs from the executor.
pub struct Ctx<'a> {
    pub precision: Precision,
    /// Device address of every buffer of the program.
    pub ptrs: &'a [u64],
    /// The GroupNorm scratch ([`group_norm_scratch`] floats; 0 when no step needs one).
    pub norm_stats: u64,
    /// Most dynamic shared memory a block may opt in to on this GPU.
    pub smem_optin: usize,
    /// Whether Linear step `si` runs as one cuBLASLt matmul (its algorithm timed on the GPU; a
    /// bias in the epilogue, a residual as `C`); otherwise a cuBLAS GEMM and a bias/residual pass.
    pub lt: &'a dyn Fn(usize) -> bool,
}

/// Values per block of a GroupNorm group (`group_norm_stats`/`group_norm_apply`); groups that
/// fit in one chunk take the single-kernel `group_norm`.
pub const GROUP_NORM_CHUNK: usize = 16384;

/// Blocks per GroupNorm group of `count` values.
pub fn group_norm_splits(count: usize) -> usize {
    count.div_ceil(GROUP_NORM_CHUNK)
}

/// Positions per block of a channels-last GroupNorm (about [`GROUP_NORM_CHUNK`] values).
fn nhwc_chunk(c: usize) -> usize {
    GROUP_NORM_CHUNK.div_ceil(c.max(1))
}

/// Threads of a channels-last GroupNorm statistics block: each takes up to 8 channels (at least
/// 256 threads; at most 512, for
/// [`GROUP_NORM_NHWC_MAX_CHANNELS`](super::program::GROUP_NORM_NHWC_MAX_CHANNELS)).
pub fn nhwc_stats_block(c: usize) -> u32 {
    (c.div_ceil(8).div_ceil(32) * 32).clamp(256, 512) as u32
}

/// float32 scratch of a GroupNorm step: partial statistics, and for channels-last the merged
/// mean and inverse deviation per (sample, group) after them.
fn group_norm_step_scratch(n: usize, c: usize, spatial: usize, groups: usize, cl: bool) -> usize {
    if cl {
        n * spatial.div_ceil(nhwc_chunk(c)) * groups * 2 + n * groups * 2
    } else {
        match group_norm_splits(c / groups * spatial) {
            1 => 0,
            splits => n * groups * splits * 2,
        }
    }
}

/// float32 values of GroupNorm scratch the program needs (the largest step's; 0 for none).
pub fn group_norm_scratch(p: &Program) -> usize {
    p.steps
        .iter()
        .filter_map(|st| match st {
            Step::GroupNorm {
                n,
                c,
                spatial,
                groups,
                channels_last,
                ..
            } => Some(group_norm_step_scratch(
                *n,
                *c,
                *spatial,
                *groups,
                *channels_last,
            )),
            _ => None,
        })
        .max()
        .unwrap_or(0)
}

/// The elementwise launch shape: 256 threads per block, grid-stride beyond 132 × 32 blocks.
pub fn elementwise(n: usize) -> ((u32, u32, u32), (u32, u32, u32)) {
    let blocks = n.div_ceil(256).clamp(1, 132 * 32) as u32;
    ((blocks, 1, 1), (256, 1, 1))
}

/// Dynamic shared memory of the tensor-core attention kernels (engine_ops.cu), by entry name:
/// `attention_tiled_f16_dDP` two stages of 64-key K and V tiles, `attention_short{M}_f16_dDP`
/// per warp (4) its Q, K and V tiles of 16·M rows; rows of DP + 8 halves.
pub fn attention_smem(name: &str) -> Option<usize> {
    let (kind, dp) = name.strip_prefix("attention_")?.split_once("_f16_d")?;
    let pitch = (dp.parse::<usize>().ok()? + 8) * 2;
    match kind {
        "tiled" => Some(4 * 64 * pitch),
        "short1" => Some(4 * 3 * 16 * pitch),
        "short2" => Some(4 * 3 * 32 * pitch),
        _ => None,
    }
}

/// An elementwise launch of `kernel` over `n` elements.
pub fn elementwise_launch(kernel: String, n: usize, args: Vec<KArg>) -> Launch {
    let (grid, block) = elementwise(n);
    Launch {
        kernel,
        grid,
        block,
        smem: 0,
        opt_in: false,
        args,
    }
}

/// `cast_from_f32` (float32 staging → the precision) or `cast_to_f32` over `n` values.
pub fn cast_launch(kernel: &str, precision: Precision, dst: u64, src: u64, n: usize) -> Launch {
    let sfx = match precision {
        Precision::Fp32 => "f32",
        Precision::Fp16 => "f16",
    };
    elementwise_launch(
        format!("{kernel}_{sfx}"),
        n,
        vec![KArg::Ptr(dst), KArg::Ptr(src), KArg::I64(n as i64)],
    )
}

/// What step `si` of `p` enqueues, in order.
pub fn step_ops(p: &Program, si: usize, ctx: &Ctx<'_>) -> Result<Vec<Op>, EngineError> {
    use KArg::{Ptr, F32, I32, I64};
    let ptr = |b: usize| Ptr(ctx.ptrs[b]);
    let opt = |b: &Option<usize>| Ptr(b.map_or(0, |b| ctx.ptrs[b]));
    let sfx = match ctx.precision {
        Precision::Fp32 => "f32",
        Precision::Fp16 => "f16",
    };
    let typed = |name: &str| format!("{name}_{sfx}");
    let launch = |kernel: String, grid: (u32, u32, u32), block: u32, smem: usize, args| {
        Op::Kernel(Launch {
            kernel,
            grid,
            block: (block, 1, 1),
            smem: smem as u32,
            opt_in: false,
            args,
        })
    };
    let ew = |kernel: String, n: usize, args| Op::Kernel(elementwise_launch(kernel, n, args));
    let mut ops = Vec::new();
    match &p.steps[si] {
        Step::Copy {
            out,
            inp,
            s,
            in_off,
            out_off,
        } => {
            let (io, oo) = (I64(*in_off), I64(*out_off));
            if p.buffers[*out].dtype == DType::I64 {
                let n = s.numel();
                ops.push(ew(
                    "copy_strided_i64".into(),
                    n,
                    vec![
                        ptr(*out),
                        ptr(*inp),
                        I64(n as i64),
                        KArg::Strided(*s),
                        io,
                        oo,
                    ],
                ));
            } else if let Some((ai, ao)) = s.transpose_axes() {
                // 32 × 32 tiles through shared memory, the other axes as the grid's batch
                let batch = s.numel() as i64 / (s.dims[ai] * s.dims[ao]);
                ops.push(Op::Kernel(Launch {
                    kernel: typed("copy_transpose"),
                    grid: (
                        (s.dims[ai] + 31) as u32 / 32,
                        (s.dims[ao] + 31) as u32 / 32,
                        batch as u32,
                    ),
                    block: (32, 8, 1),
                    smem: 0,
                    opt_in: false,
                    args: vec![
                        ptr(*out),
                        ptr(*inp),
                        KArg::Strided(*s),
                        I32(ai as i32),
                        I32(ao as i32),
                        io,
                        oo,
                    ],
                }));
            } else if let Some((u, uio, uoo)) =
                s.in_units(16 / ctx.precision.elem_bytes() as i64, *in_off, *out_off)
            {
                // rows contiguous on both sides: 16 bytes per thread
                let n = u.numel();
                ops.push(ew(
                    "copy_strided_b16".into(),
                    n,
                    vec![
                        ptr(*out),
                        ptr(*inp),
                        I64(n as i64),
                        KArg::Strided(u),
                        I64(uio),
                        I64(uoo),
                    ],
                ));
            } else {
                let n = s.numel();
                ops.push(ew(
                    typed("copy_strided"),
                    n,
                    vec![
                        ptr(*out),
                        ptr(*inp),
                        I64(n as i64),
                        KArg::Strided(*s),
                        io,
                        oo,
                    ],
                ));
            }
        }
        Step::Binary {
            out,
            a,
            b,
            op,
            s,
            n,
        } => {
            let mut args = vec![ptr(*out), ptr(*a), ptr(*b), I64(*n as i64), I32(*op as i32)];
            let kernel = match s {
                None => typed("binary_same"),
                Some(s) => {
                    args.push(KArg::Strided(*s));
                    typed("binary")
                }
            };
            ops.push(ew(kernel, *n, args));
        }
        Step::Unary { out, inp, op, n } => ops.push(ew(
            typed("unary"),
            *n,
            vec![ptr(*out), ptr(*inp), I64(*n as i64), I32(*op as i32)],
        )),
        Step::Fill { out, n, value } => ops.push(ew(
            typed("fill"),
            *n,
            vec![ptr(*out), I64(*n as i64), F32(*value)],
        )),
        Step::Linear {
            out,
            x,
            w,
            bias,
            residual,
            m,
            n,
            k,
        } => {
            if (ctx.lt)(si) {
                let desc =
                    LtDesc::linear((*m, *n, *k), bias.map(|b| ctx.ptrs[b]), residual.is_some());
                ops.push(Op::Lt(LtCall {
                    desc,
                    a: ctx.ptrs[*w],
                    b: ctx.ptrs[*x],
                    res: residual.map_or(0, |r| ctx.ptrs[r]),
                    out: ctx.ptrs[*out],
                }));
                return Ok(ops);
            }
            // row-major out = x·wᵀ is column-major outᵀ = op_T(w)·xᵀ
            ops.push(Op::Gemm(GemmCall {
                a: ctx.ptrs[*w],
                b: ctx.ptrs[*x],
                c: ctx.ptrs[*out],
                m: *n,
                n: *m,
                k: *k,
                trans_a: true,
                trans_b: false,
                lda: *k,
                ldb: *k,
                ldc: *n,
                stride_a: 0,
                stride_b: 0,
                stride_c: 0,
                batch: 1,
                alpha: 1.0,
            }));
            if bias.is_some() || residual.is_some() {
                let (rows, cols) = (*m as i64, *n as i64);
                ops.push(ew(
                    typed("bias_residual"),
                    m * n,
                    vec![
                        ptr(*out),
                        opt(bias),
                        Ptr(0),
                        opt(residual),
                        I64(rows),
                        I64(cols),
                        I64(rows),
                    ],
                ));
            }
        }
        Step::MatMul {
            out,
            a,
            b,
            batch,
            m,
            n,
            k,
            b_stride,
            trans_b,
            alpha,
        } => {
            // row-major out = a·op(b) is column-major outᵀ = op(b)ᵀ·aᵀ
            ops.push(Op::Gemm(GemmCall {
                a: ctx.ptrs[*b],
                b: ctx.ptrs[*a],
                c: ctx.ptrs[*out],
                m: *n,
                n: *m,
                k: *k,
                trans_a: *trans_b,
                trans_b: false,
                lda: if *trans_b { *k } else { *n },
                ldb: *k,
                ldc: *n,
                stride_a: *b_stride,
                stride_b: m * k,
                stride_c: m * n,
                batch: *batch,
                alpha: *alpha,
            }));
        }
        Step::Conv(c) => {
            ops.push(Op::Conv(ConvCall {
                step: si,
                x: ctx.ptrs[c.x],
                w: ctx.ptrs[c.w],
                y: ctx.ptrs[c.out],
            }));
            if c.nhwc && (c.bias.is_some() || c.residual.is_some() || c.sample_bias.is_some()) {
                // channels innermost: the row-wise bias of a GEMM epilogue, plus the per-sample
                // bias over each sample's H·W rows
                let cols = c.y_shape[1] as i64;
                let rps = (c.y_shape[2] * c.y_shape[3]) as i64;
                let rows = c.y_shape[0] as i64 * rps;
                ops.push(ew(
                    typed("bias_residual"),
                    (rows * cols) as usize,
                    vec![
                        ptr(c.out),
                        opt(&c.bias),
                        opt(&c.sample_bias),
                        opt(&c.residual),
                        I64(rows),
                        I64(cols),
                        I64(rps),
                    ],
                ));
            } else if c.bias.is_some() || c.residual.is_some() {
                let total = c.y_shape.iter().product::<usize>();
                let (ch, sp) = (c.y_shape[1] as i64, (c.y_shape[2] * c.y_shape[3]) as i64);
                ops.push(ew(
                    typed("channel_bias"),
                    total,
                    vec![
                        ptr(c.out),
                        opt(&c.bias),
                        opt(&c.residual),
                        I64(total as i64),
                        I64(ch),
                        I64(sp),
                    ],
                ));
            }
        }
        Step::GroupNorm {
            out,
            x,
            gamma,
            beta,
            n,
            c,
            spatial,
            groups,
            eps,
            silu,
            channels_last,
        } => {
            let (ci, sp, g, si_) = (
                I32(*c as i32),
                I64(*spatial as i64),
                I32(*groups as i32),
                I32(*silu as i32),
            );
            let splits = group_norm_splits(c / groups * spatial);
            let st = ctx.norm_stats;
            if *channels_last {
                // statistics per chunk of positions, merged per (sample, group), applied
                let chunk = nhwc_chunk(*c);
                let parts = spatial.div_ceil(chunk);
                let mr = Ptr(st + (n * parts * groups * 2 * 4) as u64);
                let ch = I64(chunk as i64);
                ops.push(Op::Kernel(Launch {
                    kernel: typed("group_norm_nhwc_stats"),
                    grid: (*n as u32, parts as u32, 1),
                    block: (nhwc_stats_block(*c), 1, 1),
                    smem: (c * 4) as u32,
                    opt_in: false,
                    args: vec![Ptr(st), ptr(*x), ci, sp, g, ch],
                }));
                ops.push(launch(
                    "group_norm_nhwc_finalize".into(),
                    ((n * groups).div_ceil(256) as u32, 1, 1),
                    256,
                    0,
                    vec![
                        mr,
                        Ptr(st),
                        I32(*n as i32),
                        ci,
                        sp,
                        g,
                        ch,
                        I32(parts as i32),
                        F32(*eps),
                    ],
                ));
                let total = n * c * spatial;
                ops.push(ew(
                    typed("group_norm_nhwc_apply"),
                    total,
                    vec![
                        ptr(*out),
                        ptr(*x),
                        mr,
                        ptr(*gamma),
                        ptr(*beta),
                        ci,
                        sp,
                        g,
                        I64(total as i64),
                        si_,
                    ],
                ));
            } else if splits == 1 {
                ops.push(launch(
                    typed("group_norm"),
                    ((n * groups) as u32, 1, 1),
                    512,
                    0,
                    vec![
                        ptr(*out),
                        ptr(*x),
                        ptr(*gamma),
                        ptr(*beta),
                        ci,
                        sp,
                        g,
                        F32(*eps),
                        si_,
                    ],
                ));
            } else {
                // too large for one block per group: statistics per chunk, then every chunk
                // normalised by its own block
                let grid = ((n * groups) as u32, splits as u32, 1);
                let chunk = I64(GROUP_NORM_CHUNK as i64);
                ops.push(launch(
                    typed("group_norm_stats"),
                    grid,
                    256,
                    0,
                    vec![Ptr(st), ptr(*x), ci, sp, g, chunk],
                ));
                ops.push(launch(
                    typed("group_norm_apply"),
                    grid,
                    256,
                    0,
                    vec![
                        ptr(*out),
                        ptr(*x),
                        Ptr(st),
                        ptr(*gamma),
                        ptr(*beta),
                        ci,
                        sp,
                        g,
                        chunk,
                        F32(*eps),
                        si_,
                    ],
                ));
            }
        }
        Step::LayerNorm {
            out,
            x,
            gamma,
            beta,
            add,
            rows,
            cols,
            eps,
        } => {
            let c = I32(*cols as i32);
            let (ap, period) = add.map_or((Ptr(0), I32(1)), |(t, per)| (ptr(t), I32(per as i32)));
            if *cols <= 1024 {
                // one warp per row, 8 rows per block
                ops.push(launch(
                    typed("layer_norm_warp"),
                    (rows.div_ceil(8) as u32, 1, 1),
                    256,
                    0,
                    vec![
                        ptr(*out),
                        ptr(*x),
                        ptr(*gamma),
                        opt(beta),
                        ap,
                        period,
                        I64(*rows as i64),
                        c,
                        F32(*eps),
                    ],
                ));
            } else {
                ops.push(launch(
                    typed("layer_norm"),
                    (*rows as u32, 1, 1),
                    256,
                    0,
                    vec![
                        ptr(*out),
                        ptr(*x),
                        ptr(*gamma),
                        opt(beta),
                        ap,
                        period,
                        c,
                        F32(*eps),
                    ],
                ));
            }
        }
        Step::Softmax { out, x, rows, cols } => ops.push(launch(
            typed("softmax"),
            (*rows as u32, 1, 1),
            256,
            0,
            vec![ptr(*out), ptr(*x), I32(*cols as i32)],
        )),
        Step::Geglu {
            out,
            x,
            bias,
            rows,
            d,
        } => ops.push(ew(
            typed("geglu"),
            rows * d,
            vec![
                ptr(*out),
                ptr(*x),
                opt(bias),
                I64(*rows as i64),
                I64(*d as i64),
            ],
        )),
        Step::Gather {
            out,
            table,
            ids,
            n_ids,
            row,
            n_rows,
        } => ops.push(ew(
            typed("gather_rows"),
            n_ids * row,
            vec![
                ptr(*out),
                ptr(*table),
                ptr(*ids),
                I64(*n_ids as i64),
                I64(*row as i64),
                I64(*n_rows as i64),
            ],
        )),
        Step::Attention {
            out,
            q,
            k,
            v,
            bias,
            n,
            l,
            s,
            heads,
            d,
            scale,
            ld,
            offs,
        } => {
            // float16 without a bias: the tensor-core kernels (the compiler leaves only heads
            // they take, `fused_attention_head`); one warp per (sequence, head) for the short
            // attention over frames, 128-row blocks otherwise
            let fused = ctx.precision == Precision::Fp16
                && bias.is_none()
                && super::program::fused_attention_head(*d);
            let (li, si_, hi, di) = (
                I32(*l as i32),
                I32(*s as i32),
                I32(*heads as i32),
                I32(*d as i32),
            );
            // Q, K, V rows at their offsets and strides (column blocks of one projection's output
            // after `merge_projections`; only the tensor-core kernels read those)
            let eb = ctx.precision.elem_bytes() as u64;
            let at = |b: usize, i: usize| Ptr(ctx.ptrs[b] + offs[i] as u64 * eb);
            let qkvo = [at(*q, 0), at(*k, 1), at(*v, 2), ptr(*out)];
            // the kernels take one row stride for K and V (equal alone and packed)
            if ld[1] != ld[2] {
                return Err(EngineError::Graph(format!(
                    "attention with K and V at different row strides {ld:?}"
                )));
            }
            let strides = [I32(ld[0] as i32), I32(ld[1] as i32)];
            if fused {
                let dp = d.div_ceil(16) * 16;
                let short = format!("attention_short{}_f16_d{dp}", 1 + (*l > 16) as usize);
                // one warp per sequence where this GPU's shared memory allows it
                let fits = |k: &str| attention_smem(k).is_some_and(|b| b <= ctx.smem_optin);
                let (name, grid, block) = if *l <= 32 && fits(&short) {
                    (short, ((n * heads).div_ceil(4) as u32, 1, 1), 128)
                } else {
                    (
                        format!("attention_tiled_f16_d{dp}"),
                        (l.div_ceil(128) as u32, *heads as u32, *n as u32),
                        256,
                    )
                };
                let smem = attention_smem(&name).unwrap_or(0);
                if !fits(&name) {
                    return Err(EngineError::Graph(format!(
                        "{name} needs {smem} bytes of shared memory per block; this GPU allows {}",
                        ctx.smem_optin
                    )));
                }
                let mut args = qkvo.to_vec();
                if name.starts_with("attention_short") {
                    args.push(I32(*n as i32));
                }
                args.extend([li, si_, hi, di]);
                args.extend(strides);
                args.push(F32(*scale));
                ops.push(launch(name, grid, block, smem, args));
            } else {
                if *ld != [heads * d; 3] || *offs != [0; 3] {
                    return Err(EngineError::Graph(format!(
                        "attention with Q, K, V at strides {ld:?} runs on the float16 kernels only"
                    )));
                }
                let shared = 2 * s * d * 4;
                if shared > 200 * 1024 || *d > 256 {
                    return Err(EngineError::Graph(format!(
                        "attention over {s} keys of size {d} in {:?} is not supported by the CUDA engine (use fp16)",
                        ctx.precision
                    )));
                }
                let (bp, bh) = match bias {
                    Some((b, h)) => (ptr(*b), I32(*h as i32)),
                    None => (Ptr(0), I32(1)),
                };
                ops.push(Op::Kernel(Launch {
                    kernel: typed("temporal_attention"),
                    grid: (*n as u32, *heads as u32, 1),
                    block: (32 * (*l).clamp(1, 8) as u32, 1, 1),
                    smem: shared as u32,
                    opt_in: shared > 48 * 1024,
                    args: vec![
                        qkvo[0],
                        qkvo[1],
                        qkvo[2],
                        bp,
                        qkvo[3],
                        li,
                        si_,
                        hi,
                        di,
                        bh,
                        F32(*scale),
                    ],
                }));
            }
        }
    }
    Ok(ops)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attention_shared_memory_follows_the_kernels_layout() {
        // rows of DP + 8 halves: 64-key K and V tiles in two stages; per warp Q, K, V tiles
        assert_eq!(
            attention_smem("attention_tiled_f16_d48"),
            Some(4 * 64 * 56 * 2)
        );
        assert_eq!(
            attention_smem("attention_short1_f16_d160"),
            Some(4 * 3 * 16 * 168 * 2)
        );
        assert_eq!(
            attention_smem("attention_short2_f16_d16"),
            Some(4 * 3 * 32 * 24 * 2)
        );
        assert_eq!(attention_smem("layer_norm_f16"), None);
        assert_eq!(attention_smem("attention_tiled_f16_dxx"), None);
    }

    #[test]
    fn linear_as_cublaslt_is_the_transposed_column_major_product() {
        let d = LtDesc::linear((6, 4, 3), Some(64), true);
        assert!(d.trans_a && !d.trans_b);
        // op(A) = Wᵀ seen column-major: n × k; B: k × m; D: n × m
        assert_eq!((d.a.rows, d.a.cols, d.a.ld), (3, 4, 3));
        assert_eq!((d.b.rows, d.b.cols, d.b.ld), (3, 6, 3));
        assert_eq!((d.c.rows, d.c.cols, d.c.ld), (4, 6, 4));
        assert_eq!(d.beta, 1.0);
        assert_eq!(LtDesc::linear((6, 4, 3), None, false).beta, 0.0);
    }

    #[test]
    fn a_gemm_problem_key_names_what_the_algorithm_depends_on() {
        let k = |m, n, k, bias: Option<u64>, res| LtDesc::linear((m, n, k), bias, res).problem();
        // the pointers are not part of the problem; shapes, epilogue and β are
        assert_eq!(k(6, 4, 3, Some(64), true), k(6, 4, 3, Some(4096), true));
        assert_eq!(
            k(6, 4, 3, Some(64), true),
            "lt A3x4/3T B3x6/3 D4x6/4 bias +C"
        );
        assert_eq!(k(6, 4, 3, None, false), "lt A3x4/3T B3x6/3 D4x6/4");
        let all = [
            k(6, 4, 3, None, false),
            k(6, 4, 3, Some(64), false),
            k(6, 4, 3, None, true),
            k(4, 6, 3, None, false),
            k(6, 4, 5, None, false),
        ];
        let distinct: std::collections::BTreeSet<_> = all.iter().collect();
        assert_eq!(distinct.len(), all.len(), "{all:?}");
    }
}
