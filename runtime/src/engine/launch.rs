//! What the CUDA executor enqueues for each step of a [`Program`], as plain data: kernel
//! launches (entry name, grid, block, shared memory, arguments), cuBLAS GEMMs, cuBLASLt matmuls
//! and cuDNN convolutions with the values their descriptors are given. [`exec`](super::exec)
//! turns these into driver and library calls; [`emulated`](super::emulated) runs the very same
//! list on the CPU (the kernels in the CUDA emulator, the library calls by their documented
//! semantics), which is how the executor's host side — kernel choice, launch shapes, argument
//! lists, scratch placement, descriptor values — is checked on a machine without a GPU.

use std::collections::{HashMap, HashSet};

use super::exec::Precision;
use super::program::{
    dense_strides, permute, BinaryOp, BufferKind, DType, MemoryPlan, Program, Step, Strided,
    WeightSource,
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

/// What a weight buffer holds, as a key under which its device copy can be shared: by programs
/// of one graph compiled at other shapes, and by buffers of one program reading the same
/// initializer. `None` for values the compiler computed (they may differ between shapes).
pub fn weight_key(src: &WeightSource, dtype: DType, precision: Precision) -> Option<String> {
    let what = match src {
        WeightSource::Initializer(n) => n.clone(),
        WeightSource::Permuted { name, dims, perm } => format!("{name} {dims:?} permuted {perm:?}"),
        WeightSource::Concat(names) => format!("concat {}", names.join(" ++ ")),
        WeightSource::Sum(names) => format!("sum {}", names.join(" + ")),
        WeightSource::Computed(_) | WeightSource::ComputedI64(_) => return None,
    };
    Some(format!("{precision:?} {dtype:?} {what}"))
}

/// Every buffer's device address: activations at their arena offsets from `base`, weights as
/// `upload` places them — converted to the precision's element type (float16 rounded to
/// nearest), permuted copies made, a weight `known` already holds (by [`weight_key`]: uploaded
/// for another buffer, or for a program of the same graph at other shapes) not uploaded again,
/// and weights no step reads (an initializer replaced by its permuted copy) left on the host.
/// New uploads are added to `known`. Returns the addresses and the bytes uploaded.
pub fn place_buffers(
    program: &Program,
    memory: &MemoryPlan,
    base: u64,
    precision: Precision,
    weight: &dyn Fn(&str) -> Result<WeightData, EngineError>,
    upload: &mut dyn FnMut(&[u8]) -> Result<u64, EngineError>,
    known: &mut HashMap<String, u64>,
) -> Result<(Vec<u64>, usize), EngineError> {
    let eb = precision.elem_bytes();
    let mut ptrs = vec![0u64; program.buffers.len()];
    let mut weight_bytes = 0;
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
        let key = weight_key(src, b.dtype, precision);
        if let Some(&p) = key.as_ref().and_then(|k| known.get(k)) {
            ptrs[i] = p;
            continue;
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
            WeightSource::Sum(names) => {
                // added in float32 (float16 engine weights widened first), rounded once
                WeightData::F32(super::program::sum_parts(
                    names,
                    b.numel,
                    &mut |n| match weight(n)? {
                        WeightData::F32(w) => Ok(w),
                        WeightData::F16(w) => Ok(w
                            .iter()
                            .map(|&h| half::f16::from_bits(h).to_f32())
                            .collect()),
                        WeightData::I64(_) => Err(EngineError::Graph(format!(
                            "weight {n}: int64 where a bias was expected"
                        ))),
                    },
                )?)
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
                    WeightSource::Concat(names) => names.join(" ++ "),
                    WeightSource::Sum(names) => names.join(" + "),
                    _ => "(computed)".into(),
                },
                bytes.len()
            )));
        }
        weight_bytes += bytes.len();
        let p = upload(&bytes)?;
        ptrs[i] = p;
        if let Some(k) = key {
            known.insert(k, p);
        }
    }
    Ok((ptrs, weight_bytes))
}

/// What [`specialize`] changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Specialized {
    /// Motion modules run on frame-major rows ([`frame_major`]).
    pub frame_major: usize,
    /// Adds folded into a Linear's residual ([`fold_residual_adds`]).
    pub residual_adds: usize,
    /// Convolution biases left to the GroupNorm or GEMM after them ([`fold_conv_biases`],
    /// [`fold_conv_biases_into_gemms`]).
    pub conv_biases: usize,
    /// Attentions whose projections are one GEMM ([`merge_projections`]).
    pub merged: usize,
}

/// What the executor runs of `p` in `precision`: in float16 the motion modules on frame-major
/// rows, the adds that leaves after a Linear in its epilogue, convolution biases added by the
/// GroupNorm or GEMM after them, and the attention projections merged. The CUDA executor, its
/// emulation and the engine builder's memory figures all take the program through here.
pub fn specialize(p: &mut Program, precision: Precision) -> Specialized {
    match precision {
        Precision::Fp16 => {
            let frame_major = frame_major(p);
            let residual_adds = fold_residual_adds(p);
            let conv_biases = fold_conv_biases(p) + fold_conv_biases_into_gemms(p);
            let merged = merge_projections(p);
            Specialized {
                frame_major,
                residual_adds,
                conv_biases,
                merged,
            }
        }
        Precision::Fp32 => Specialized::default(),
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
    remove_steps(p, &remove);
    merged
}

/// Drop the steps `remove` marks.
fn remove_steps(p: &mut Program, remove: &[bool]) {
    let mut i = 0;
    p.steps.retain(|_| {
        i += 1;
        !remove[i - 1]
    });
}

/// Which steps read each buffer (a copy's own destination, which it also reads, not counted).
fn readers_of(p: &Program) -> Vec<Vec<usize>> {
    let mut r = vec![Vec::new(); p.buffers.len()];
    for (si, st) in p.steps.iter().enumerate() {
        let (reads, w) = st.io();
        for b in reads {
            if !(b == w && matches!(st, Step::Copy { .. })) && r[b].last() != Some(&si) {
                r[b].push(si);
            }
        }
    }
    r
}

/// Which steps write each buffer.
fn writers_of(p: &Program) -> Vec<Vec<usize>> {
    let mut w = vec![Vec::new(); p.buffers.len()];
    for (si, st) in p.steps.iter().enumerate() {
        w[st.io().1].push(si);
    }
    w
}

/// A whole-buffer copy that swaps two row axes of dense rows: input `[b, i, j, c]`, output
/// `[b, j, i, c]`, both dense with `c` values a row. `(input, output, b, i, j, c)`.
fn row_swap(p: &Program, st: &Step) -> Option<(usize, usize, [usize; 4])> {
    let Step::Copy {
        out,
        inp,
        s,
        in_off: 0,
        out_off: 0,
    } = st
    else {
        return None;
    };
    let r = s.rank as usize;
    let mut ax: Vec<(i64, i64, i64)> = (0..r)
        .filter(|&k| s.dims[k] != 1)
        .map(|k| (s.dims[k], s.a[k], s.c[k]))
        .collect();
    ax.sort_by_key(|&(_, _, c)| std::cmp::Reverse(c));
    if ax.len() == 3 {
        ax.insert(0, (1, 0, 0));
    }
    let [(b, ab, cb), (j, aj, cj), (i, ai, ci), (c, ac, cc)] = ax[..] else {
        return None;
    };
    let dense_out = cc == 1 && ci == c && cj == i * c && (b == 1 || cb == j * i * c);
    let dense_in = ac == 1 && aj == c && ai == j * c && (b == 1 || ab == i * j * c);
    let n = (b * i * j * c) as usize;
    (dense_out
        && dense_in
        && i > 1
        && j > 1
        && p.buffers[*inp].numel == n
        && p.buffers[*out].numel == n)
        .then_some((*inp, *out, [b as usize, i as usize, j as usize, c as usize]))
}

/// Which stride set of a [`Strided`] reads a region buffer.
#[derive(Clone, Copy)]
enum Side {
    A,
    B,
}

/// `s` with its `side` strides (and `off`), which step through a buffer in token order
/// `[b, hw, f, c]`, re-expressed over the same values in frame-major order `[b, f, hw, c]`: each
/// axis maps into one of the four, or is split where it spans several (a merged frame and
/// channel axis, say). `None` where an axis does not line up with them or the kernels' rank
/// would be exceeded.
fn restride(
    s: &Strided,
    side: Side,
    off: i64,
    [b, f, hw, c]: [usize; 4],
) -> Option<(Strided, i64)> {
    let (b, f, hw, c) = (b as i64, f as i64, hw as i64, c as i64);
    // (stride in token order, extent, stride in frame-major order), innermost first
    let parts = [
        (1, c, 1),
        (c, f, hw * c),
        (f * c, hw, c),
        (hw * f * c, b, f * hw * c),
    ];
    let map_off = |t: i64| -> i64 {
        parts
            .iter()
            .map(|&(ts, extent, fs)| (t / ts) % extent * fs)
            .sum()
    };
    if off < 0 || off >= b * hw * f * c {
        return None;
    }
    let mut axes: Vec<(usize, [i64; 3])> = Vec::new(); // (dim, [a, b, c]) outermost first
    for k in 0..s.rank as usize {
        let (d, mut st) = (s.dims[k], [s.a[k], s.b[k], s.c[k]]);
        let i = match side {
            Side::A => 0,
            Side::B => 1,
        };
        if d == 1 || st[i] == 0 {
            axes.push((d as usize, st));
            continue;
        }
        // split the axis from its innermost part outwards
        let mut sub: Vec<(usize, [i64; 3])> = Vec::new();
        let mut rest = d;
        loop {
            let t = st[i];
            let &(ts, extent, fs) = parts
                .iter()
                .find(|&&(ts, extent, _)| t >= ts && t < ts * extent && t % ts == 0)?;
            let q = t / ts;
            if q * rest <= extent {
                let mut e = st;
                e[i] = q * fs;
                sub.push((rest as usize, e));
                break;
            }
            // this part holds `inner` steps of the axis; the rest continue outside it
            if extent % q != 0 || rest % (extent / q) != 0 {
                return None;
            }
            let inner = extent / q;
            let mut e = st;
            e[i] = q * fs;
            sub.push((inner as usize, e));
            rest /= inner;
            for (j, x) in st.iter_mut().enumerate() {
                if j == i {
                    *x = t * inner;
                } else {
                    *x *= inner;
                }
            }
        }
        axes.extend(sub.into_iter().rev());
    }
    let dims: Vec<usize> = axes.iter().map(|a| a.0).collect();
    let pick = |j: usize| -> Vec<i64> { axes.iter().map(|a| a.1[j]).collect() };
    let st = Strided::new(&dims, &pick(0), &pick(1), &pick(2)).ok()?;
    Some((st, map_off(off)))
}

/// Whether a strided elementwise step whose output is dense in token order `[b, hw, f, c]`
/// (`dims` with output strides `cs`) reads an operand through strides `os` from a dense
/// frame-major buffer `[b, f, hw, c]` (how a batch-1 motion module adds its input back).
fn reads_frame_major(dims: &[i64], cs: &[i64], os: &[i64], [b, f, hw, c]: [usize; 4]) -> bool {
    let (b, f, hw, c) = (b as i64, f as i64, hw as i64, c as i64);
    // (stride in token order, extent, stride in frame-major order) of b, hw, f, c
    let parts = [
        (hw * f * c, b, f * hw * c),
        (f * c, hw, c),
        (c, f, hw * c),
        (1, c, 1),
    ];
    dims.iter().zip(cs).zip(os).all(|((&d, &s), &o)| {
        d == 1
            || parts.iter().any(|&(ts, extent, fs)| {
                s >= ts && s % ts == 0 && (s / ts) * d <= extent && o == (s / ts) * fs
            })
    })
}

/// What [`frame_major`] changes for one motion module.
struct FrameMajor {
    /// The copy into token order, its source (frame-major rows) and destination.
    t_in: usize,
    src: usize,
    dst: usize,
    /// Positions per frame (the interleave), frames.
    hw: usize,
    /// The attention and positional-table LayerNorm steps, and the adds of a frame-major
    /// operand read in token order (now elementwise).
    attention: Vec<usize>,
    layer_norms: Vec<usize>,
    strided_adds: Vec<usize>,
    /// Copies and strided elementwise steps that read a region buffer, and how they read it
    /// frame-major (`Copy`: the iteration and input offset; `Binary`: the iteration).
    restrided: Vec<(usize, Strided, i64)>,
    /// The copies back to frame-major rows: (step, its source in the region, destination).
    back: Vec<(usize, usize, usize)>,
}

/// The motion module whose tokens `t_in` copies into `[B·H·W, F, C]` order, if every step
/// between there and the copies back reads its rows in any order (Linear, LayerNorm, GEGLU,
/// elementwise Add of two such values, attention over the frames).
fn frame_major_region(
    p: &Program,
    readers: &[Vec<usize>],
    writers: &[Vec<usize>],
    outputs: &HashSet<usize>,
    t_in: usize,
) -> Option<FrameMajor> {
    // frame-major [B, F, HW, C] rows into token order [B, HW, F, C]
    let (src, dst, [b, f, hw, c]) = row_swap(p, &p.steps[t_in])?;
    let rows = b * f * hw;
    let mut region: HashSet<usize> = HashSet::new();
    let mut pending: std::collections::BTreeSet<usize> = std::collections::BTreeSet::new();
    let mut fm = FrameMajor {
        t_in,
        src,
        dst,
        hw,
        attention: Vec::new(),
        layer_norms: Vec::new(),
        strided_adds: Vec::new(),
        restrided: Vec::new(),
        back: Vec::new(),
    };
    let admit = |buf: usize,
                 by: usize,
                 region: &mut HashSet<usize>,
                 pending: &mut std::collections::BTreeSet<usize>|
     -> Option<()> {
        if outputs.contains(&buf) || writers[buf] != [by] {
            return None;
        }
        region.insert(buf);
        pending.extend(readers[buf].iter().copied());
        Some(())
    };
    admit(dst, t_in, &mut region, &mut pending)?;
    let inr = |b: &usize, region: &HashSet<usize>| region.contains(b);
    while let Some(si) = pending.pop_first() {
        match &p.steps[si] {
            Step::Linear {
                out,
                x,
                w,
                bias,
                residual,
                m,
                ..
            } => {
                let ok = inr(x, &region)
                    && *m == rows
                    && !inr(w, &region)
                    && bias.is_none_or(|b| !inr(&b, &region))
                    && residual.is_none_or(|r| inr(&r, &region));
                if !ok {
                    return None;
                }
                admit(*out, si, &mut region, &mut pending)?;
            }
            Step::LayerNorm {
                out,
                x,
                gamma,
                beta,
                add,
                rows: r,
                ..
            } => {
                let ok = inr(x, &region)
                    && *r == rows
                    && !inr(gamma, &region)
                    && beta.is_none_or(|b| !inr(&b, &region))
                    && add.is_none_or(|(t, period, div)| {
                        !inr(&t, &region) && period == f && div == 1
                    });
                if !ok {
                    return None;
                }
                if add.is_some() {
                    fm.layer_norms.push(si);
                }
                admit(*out, si, &mut region, &mut pending)?;
            }
            Step::Geglu {
                out,
                x,
                bias,
                rows: r,
                ..
            } => {
                if !(inr(x, &region) && *r == rows && bias.is_none_or(|b| !inr(&b, &region))) {
                    return None;
                }
                admit(*out, si, &mut region, &mut pending)?;
            }
            Step::Binary {
                out,
                a,
                b: bb,
                op: BinaryOp::Add,
                s,
                n,
            } => {
                let Some(st) = s else {
                    // elementwise: both operands in the region's rows
                    if !(inr(a, &region) && inr(bb, &region)) {
                        return None;
                    }
                    admit(*out, si, &mut region, &mut pending)?;
                    continue;
                };
                // a value of the region plus a frame-major buffer read in token order, dense
                // output: elementwise in frame-major rows
                let r = st.rank as usize;
                let (dims, cs) = (&st.dims[..r], &st.c[..r]);
                let dense = dense_strides(
                    &dims.iter().map(|&d| d as usize).collect::<Vec<_>>(),
                    &(0..r).collect::<Vec<_>>(),
                );
                let fits = |mine: &[i64], other: &[i64], o: usize| {
                    mine == cs
                        && !inr(&o, &region)
                        && p.buffers[o].numel == rows * c
                        && reads_frame_major(dims, cs, other, [b, f, hw, c])
                };
                let joins = *n == rows * c
                    && cs == dense.as_slice()
                    && ((inr(a, &region) && fits(&st.a[..r], &st.b[..r], *bb))
                        || (inr(bb, &region) && fits(&st.b[..r], &st.a[..r], *a)));
                if joins {
                    fm.strided_adds.push(si);
                    admit(*out, si, &mut region, &mut pending)?;
                    continue;
                }
                // otherwise it reads the region's operands frame-major, its output as it was
                let mut s2 = *st;
                if inr(a, &region) {
                    s2 = restride(&s2, Side::A, 0, [b, f, hw, c])?.0;
                }
                if inr(bb, &region) {
                    s2 = restride(&s2, Side::B, 0, [b, f, hw, c])?.0;
                }
                fm.restrided.push((si, s2, 0));
            }
            Step::Attention {
                out,
                q,
                k,
                v,
                bias: None,
                n,
                l,
                s,
                heads,
                d,
                ld,
                offs,
                ns: 1,
                ..
            } => {
                let ok = inr(q, &region)
                    && inr(k, &region)
                    && inr(v, &region)
                    && *l == f
                    && *s == f
                    && *n == b * hw
                    && *ld == [heads * d; 3]
                    && *offs == [0; 3]
                    && super::program::fused_attention_head(*d);
                if !ok {
                    return None;
                }
                fm.attention.push(si);
                admit(*out, si, &mut region, &mut pending)?;
            }
            st @ Step::Copy {
                inp,
                out,
                s,
                in_off,
                ..
            } => {
                // back to frame-major rows: [B, HW, F, C] -> [B, F, HW, C]
                if let Some((from, to, shape)) = row_swap(p, st) {
                    // (a graph output must stay written: its copy is kept)
                    if inr(&from, &region)
                        && shape == [b, hw, f, c]
                        && writers[to] == [si]
                        && !outputs.contains(&to)
                    {
                        fm.back.push((si, from, to));
                        continue;
                    }
                }
                // any other copy of a region value reads it frame-major
                if !inr(inp, &region) || inr(out, &region) {
                    return None;
                }
                let (s2, off) = restride(s, Side::A, *in_off, [b, f, hw, c])?;
                fm.restrided.push((si, s2, off));
            }
            _ => return None,
        }
    }
    // a motion module (the attention over frames is what makes it one); every reader of its
    // values was accounted for above
    (!fm.attention.is_empty()).then_some(fm)
}

/// Float16 specialisation: motion modules in frame-major rows. A motion module's transformer
/// reads its input as tokens `[B·H·W, F, C]` (the frames of one position in a row), which the
/// channels-last activations (`[B, F, H·W, C]`) hold in another row order: the compiled program
/// copies them into token order and back. Every step in between but the attention treats rows
/// independently, so this runs them on the frame-major rows as they are: the two copies go, the
/// attention reads each position's frames `H·W` rows apart (`ns`) and the positional table's
/// LayerNorm picks its row by frame (`div`). Returns how many motion modules changed.
pub fn frame_major(p: &mut Program) -> usize {
    let outputs: HashSet<usize> = p.outputs.iter().map(|(_, t)| t.buf).collect();
    let mut remove = vec![false; p.steps.len()];
    let mut changed = 0;
    for t_in in 0..p.steps.len() {
        if remove[t_in] || row_swap(p, &p.steps[t_in]).is_none() {
            continue;
        }
        let (readers, writers) = (readers_of(p), writers_of(p));
        let Some(fm) = frame_major_region(p, &readers, &writers, &outputs, t_in) else {
            continue;
        };
        remove[fm.t_in] = true;
        for &si in &readers[fm.dst] {
            p.steps[si].rename_read(fm.dst, fm.src);
        }
        for &si in &fm.attention {
            if let Step::Attention { ns, .. } = &mut p.steps[si] {
                *ns = fm.hw;
            }
        }
        for &si in &fm.layer_norms {
            if let Step::LayerNorm {
                add: Some((_, _, div)),
                ..
            } = &mut p.steps[si]
            {
                *div = fm.hw;
            }
        }
        for &si in &fm.strided_adds {
            if let Step::Binary { s, .. } = &mut p.steps[si] {
                *s = None;
            }
        }
        for (si, s2, off) in &fm.restrided {
            match &mut p.steps[*si] {
                Step::Copy { s, in_off, .. } => {
                    *s = *s2;
                    *in_off = *off;
                }
                Step::Binary { s, .. } => *s = Some(*s2),
                _ => unreachable!("only copies and strided binaries are restrided"),
            }
        }
        for &(si, from, to) in &fm.back {
            remove[si] = true;
            for &r in &readers[to] {
                p.steps[r].rename_read(to, from);
            }
        }
        changed += 1;
    }
    remove_steps(p, &remove);
    changed
}

/// A channels-last convolution whose output only a Linear reads, as its residual (a ResNet's
/// second convolution, added to its 1×1 shortcut GEMM), leaves its bias to that GEMM's bias
/// epilogue (the two vectors added at upload, [`WeightSource::Sum`]): the convolution's output
/// pass goes. Returns how many were folded.
pub fn fold_conv_biases_into_gemms(p: &mut Program) -> usize {
    let outputs: HashSet<usize> = p.outputs.iter().map(|(_, t)| t.buf).collect();
    let (readers, writers) = (readers_of(p), writers_of(p));
    let mut folded = 0;
    for li in 0..p.steps.len() {
        let Step::Linear {
            residual: Some(r),
            bias: lbias,
            n,
            ..
        } = p.steps[li]
        else {
            continue;
        };
        let [ci] = writers[r][..] else { continue };
        let Step::Conv(c) = &p.steps[ci] else {
            continue;
        };
        let Some(cb) = c.bias else { continue };
        if !c.nhwc
            || c.residual.is_some()
            || c.sample_bias.is_some()
            || c.y_shape[1] != n
            || readers[r] != [li]
            || outputs.contains(&r)
        {
            continue;
        }
        let kind = |b: usize| match &p.buffers[b].kind {
            BufferKind::Weight(s) if p.buffers[b].numel == n => Some(s.clone()),
            _ => None,
        };
        // the two biases as one vector: initializers added at upload, host values here
        let bias = match lbias.map(kind) {
            None => Some(cb),
            Some(Some(lk)) => match (lk, kind(cb)) {
                (WeightSource::Initializer(a), Some(WeightSource::Initializer(b))) => {
                    Some(WeightSource::Sum(vec![a, b]))
                }
                (WeightSource::Computed(a), Some(WeightSource::Computed(b))) => {
                    Some(WeightSource::Computed(std::sync::Arc::new(
                        a.iter().zip(b.iter()).map(|(x, y)| x + y).collect(),
                    )))
                }
                _ => None,
            }
            .map(|s| {
                p.buffers.push(super::program::Buffer {
                    numel: n,
                    dtype: DType::Float,
                    kind: BufferKind::Weight(s),
                });
                p.buffers.len() - 1
            }),
            Some(None) => None,
        };
        let Some(bias) = bias else { continue };
        if let Step::Conv(c) = &mut p.steps[ci] {
            c.bias = None;
        }
        if let Step::Linear { bias: b, .. } = &mut p.steps[li] {
            *b = Some(bias);
        }
        folded += 1;
    }
    folded
}

/// A channels-last convolution whose output only a channels-last GroupNorm reads (a ResNet's
/// first convolution, read by its second norm) leaves its bias and time embedding to that norm,
/// which adds them as it reads: the convolution's output pass (read and write of its whole
/// output) goes. Returns how many were folded.
pub fn fold_conv_biases(p: &mut Program) -> usize {
    let outputs: HashSet<usize> = p.outputs.iter().map(|(_, t)| t.buf).collect();
    let readers = readers_of(p);
    let mut folded = 0;
    for ci in 0..p.steps.len() {
        let Step::Conv(c) = &p.steps[ci] else {
            continue;
        };
        if !c.nhwc
            || c.residual.is_some()
            || (c.bias.is_none() && c.sample_bias.is_none())
            || outputs.contains(&c.out)
        {
            continue;
        }
        let [gi] = readers[c.out][..] else { continue };
        let (bias, sbias, out) = (c.bias, c.sample_bias, c.out);
        let [yn, yc, yh, yw] = c.y_shape;
        let ok = matches!(
            &p.steps[gi],
            Step::GroupNorm {
                x,
                n,
                c: gc,
                spatial,
                channels_last: true,
                x_bias: None,
                x_sbias: None,
                ..
            } if *x == out && *n == yn && *gc == yc && *spatial == yh * yw
        );
        if !ok {
            continue;
        }
        if let Step::Conv(c) = &mut p.steps[ci] {
            c.bias = None;
            c.sample_bias = None;
        }
        if let Step::GroupNorm {
            x_bias, x_sbias, ..
        } = &mut p.steps[gi]
        {
            *x_bias = bias;
            *x_sbias = sbias;
        }
        folded += 1;
    }
    folded
}

/// An elementwise `Add` of a bias-free-residual Linear's output (read by that `Add` alone) and a
/// value computed before the Linear becomes the Linear's residual (the GEMM epilogue's `C`): the
/// motion modules' `proj_out` and their input, once [`frame_major`] has removed the copy between.
/// Returns how many were folded.
pub fn fold_residual_adds(p: &mut Program) -> usize {
    let outputs: HashSet<usize> = p.outputs.iter().map(|(_, t)| t.buf).collect();
    let (readers, writers) = (readers_of(p), writers_of(p));
    let mut remove = vec![false; p.steps.len()];
    let mut folded = 0;
    for bi in 0..p.steps.len() {
        let Step::Binary {
            out,
            a,
            b,
            op: BinaryOp::Add,
            s: None,
            n,
        } = p.steps[bi]
        else {
            continue;
        };
        for (x, other) in [(a, b), (b, a)] {
            let [li] = writers[x][..] else { continue };
            let Step::Linear {
                residual: None,
                m,
                n: cols,
                ..
            } = p.steps[li]
            else {
                continue;
            };
            // `other` must be there when the Linear runs; `x` read by this Add alone
            let ready = writers[other].iter().all(|&w| w < li);
            if x == other
                || remove[li]
                || readers[x] != [bi]
                || outputs.contains(&x)
                || m * cols != n
                || p.buffers[other].numel < n
                || !ready
            {
                continue;
            }
            if let Step::Linear {
                residual, out: lo, ..
            } = &mut p.steps[li]
            {
                *residual = Some(other);
                *lo = out;
            }
            remove[bi] = true;
            folded += 1;
            break;
        }
    }
    remove_steps(p, &remove);
    folded
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
    plan_memory_fused(program, precision, &[])
}

/// [`plan_memory_for`] once the step pairs `fused` (`(first, second)` step indices: GEGLU pairs
/// `(linear, geglu)` ([`geglu_pairs`]) and GroupNorm pairs `(group norm, convolution)`
/// ([`norm_pairs`])) are known to run as one kernel each (`gemm_geglu_f16_nBN`,
/// `conv_igemm_gn_f16_nBN`, at the second step): the first steps' outputs, which nothing then
/// writes or reads, get no space (address 0). Every pair that may run so keeps its first step's
/// input live through its second step (the kernel reads it there), so the second's output is
/// never placed on it, whichever the timing chooses after the first plan.
pub fn plan_memory_fused(
    program: &Program,
    precision: Precision,
    fused: &[(usize, usize)],
) -> MemoryPlan {
    let eb = precision.elem_bytes();
    // (every input of the first step: a LayerNorm's gamma and beta are read by the kernel too,
    // and may be activations; weights are not in the plan)
    let extend: Vec<(usize, usize)> = geglu_pairs(program, precision)
        .into_iter()
        .chain(norm_pairs(program, precision))
        .flat_map(|(first, second)| {
            program.steps[first]
                .io()
                .0
                .into_iter()
                .map(move |b| (b, second))
        })
        .collect();
    let unused: Vec<usize> = fused
        .iter()
        .map(|&(li, _)| program.steps[li].io().1)
        .collect();
    super::program::plan_memory_extended(
        program,
        |d| match d {
            DType::Float => eb,
            DType::I64 => 8,
        },
        &extend,
        &unused,
    )
}

/// The activations' addresses in `ptrs` moved from plan `old` to plan `new` with its arena at
/// `base`: a buffer `new` gives no space gets address 0; weights keep theirs.
pub fn rebase_activations(ptrs: &mut [u64], old: &MemoryPlan, new: &MemoryPlan, base: u64) {
    for (i, p) in ptrs.iter_mut().enumerate() {
        match new.offsets[i] {
            Some(off) => *p = base + off as u64,
            None if old.offsets[i].is_some() => *p = 0,
            None => {}
        }
    }
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
    /// The normalisation scratch ([`group_norm_scratch`] floats; 0 when no step needs one).
    pub norm_stats: u64,
    /// Most dynamic shared memory a block may opt in to on this GPU.
    pub smem_optin: usize,
    /// Whether Linear step `si` runs as one cuBLASLt matmul (its algorithm timed on the GPU; a
    /// bias in the epilogue, a residual as `C`); otherwise a cuBLAS GEMM and a bias/residual pass.
    pub lt: &'a dyn Fn(usize) -> bool,
    /// The `conv_igemm_f16_nBN` tile width convolution step `si` runs on ([`conv_igemm_launch`]:
    /// chosen over cuDNN by timing them when the engine is built); `None`: cuDNN and a bias pass.
    pub conv_kernel: &'a dyn Fn(usize) -> Option<usize>,
    /// The `gemm_geglu_f16_nBN` tile width of a GEGLU pair ([`geglu_pairs`]) that runs as that
    /// one kernel (chosen over cuBLASLt and `geglu` by timing them when the engine is built),
    /// asked with the index of either step of the pair: the Linear then enqueues nothing and
    /// the GEGLU the kernel ([`gemm_geglu_launch`]); `None`: both steps as they are.
    pub geglu_kernel: &'a dyn Fn(usize) -> Option<usize>,
    /// The tile width of a normalisation pair ([`norm_pairs`]: a GroupNorm or LayerNorm and the
    /// GEMM after it) that runs as `conv_igemm_gn_f16_nBN` / `conv_igemm_ln_f16_nBN` (chosen over
    /// the two steps as chosen alone by timing them when the engine is built), asked with the
    /// index of either step: the normalisation then makes its statistics (a GroupNorm also the
    /// scale and shift per (sample, channel)) but writes no output, and the GEMM reads the
    /// normalisation's input ([`norm_gemm_launch`]); `None`: both steps as they are.
    pub norm_pair: &'a dyn Fn(usize) -> Option<usize>,
    /// Whether attention step `si`, where it would run on `attention_tiled_f16_d40`, runs on
    /// `attention_tiled2_f16_d40` (4 warps of two 16-row tiles: chosen over the one-tile kernel
    /// by timing them when the engine is built).
    pub attention_two: &'a dyn Fn(usize) -> bool,
}

/// `conv_igemm_f16_nBN`'s tile widths (output channels a block; 128 output pixels, k tiles of 32).
pub const CONV_IGEMM_WIDTHS: [usize; 2] = [64, 128];

/// Dynamic shared memory of `conv_igemm_f16_nBN` and `gemm_geglu_f16_nBN` (the same kernel), by
/// entry name: three stages of a 128-row and a BN-row tile of 40 halves a row.
pub fn conv_igemm_smem(name: &str) -> Option<usize> {
    let bn: usize = name
        .strip_prefix("conv_igemm_f16_n")
        .or_else(|| name.strip_prefix("conv_igemm_gn_f16_n"))
        .or_else(|| name.strip_prefix("conv_igemm_ln_f16_n"))
        .or_else(|| name.strip_prefix("gemm_geglu_f16_n"))?
        .parse()
        .ok()?;
    CONV_IGEMM_WIDTHS
        .contains(&bn)
        .then_some(3 * (128 + bn) * 40 * 2)
}

/// Dynamic shared memory above the 48 KiB default an entry point may launch with: the attention
/// kernels' and the 128-wide implicit-GEMM kernels', opened once when the device loads the
/// kernels.
pub fn opt_in_smem(name: &str) -> Option<usize> {
    attention_smem(name).or_else(|| conv_igemm_smem(name))
}

/// Whether `conv_igemm_f16_nBN` (engine_ops.cu: channels-last float16 implicit GEMM on the
/// tensor cores) computes convolution `c`: float16, channels-last, one group, no dilation, input
/// channels a multiple of the k tile (32), output channels a multiple of 8, at most 32 filter
/// taps.
pub fn conv_igemm_ok(c: &super::program::ConvStep, precision: Precision) -> bool {
    let [_, ch, _, _] = c.x_shape;
    let [o, _, kh, kw] = c.w_shape;
    precision == Precision::Fp16
        && c.nhwc
        && c.group == 1
        && c.dilations == [1, 1]
        && ch % 32 == 0
        && o % 8 == 0
        && kh * kw <= 32
        // the kernel's row indices reach a block (128) past the pixels
        && c.y_shape[0] * c.y_shape[2] * c.y_shape[3] + 128 < i32::MAX as usize
        && kh * kw * ch < i32::MAX as usize
}

/// `bn` for step `si` of `p` if it is a convolution `conv_igemm_f16_n{bn}` computes, else `None`:
/// every such convolution on that kernel (the emulated executor's and `engine_floor`'s choice,
/// where the GPU executor's is timed).
pub fn conv_igemm_for(
    p: &Program,
    si: usize,
    precision: Precision,
    bn: Option<usize>,
) -> Option<usize> {
    bn.filter(|_| matches!(&p.steps[si], Step::Conv(c) if conv_igemm_ok(c, precision)))
}

/// The launch of `conv_igemm_f16_n{bn}` for convolution `c` (its buffers at `ptr`): bias,
/// per-sample bias and residual in its epilogue, so no pass after it.
pub fn conv_igemm_launch(
    c: &super::program::ConvStep,
    bn: usize,
    ptr: &dyn Fn(usize) -> u64,
) -> Launch {
    use KArg::{Ptr, I32};
    let [n, ch, h, w] = c.x_shape;
    let [o, _, kh, kw] = c.w_shape;
    let [_, _, oh, ow] = c.y_shape;
    let opt = |b: &Option<usize>| Ptr(b.map_or(0, ptr));
    let i = |v: usize| I32(v as i32);
    let kernel = format!("conv_igemm_f16_n{bn}");
    Launch {
        grid: ((n * oh * ow).div_ceil(128) as u32, o.div_ceil(bn) as u32, 1),
        block: (128, 1, 1),
        smem: conv_igemm_smem(&kernel).unwrap_or(0) as u32,
        opt_in: false,
        kernel,
        args: vec![
            Ptr(ptr(c.x)),
            Ptr(ptr(c.w)),
            Ptr(ptr(c.out)),
            opt(&c.bias),
            opt(&c.sample_bias),
            opt(&c.residual),
            i(n),
            i(h),
            i(w),
            i(ch),
            i(oh),
            i(ow),
            i(o),
            i(kh),
            i(kw),
            i(c.strides[0]),
            i(c.strides[1]),
            i(c.pads[0]),
            i(c.pads[1]),
        ],
    }
}

/// The input of step `si` as a GroupNorm pair's second step reads it: a convolution's or a
/// Linear's `x`.
fn norm_consumer_input(st: &Step) -> Option<usize> {
    match st {
        Step::Conv(c) => Some(c.x),
        Step::Linear { x, .. } => Some(*x),
        _ => None,
    }
}

/// The normalisation step whose output step `ci` alone reads, when `conv_igemm_gn_f16_nBN` or
/// `conv_igemm_ln_f16_nBN` computes step `ci` from the normalisation's input (normalising it as
/// it is read). A LayerNorm without a positional table (`add`) and a Linear over its rows and
/// width (k a multiple of 32, n of 8, its output not a GEGLU's input); or a GroupNorm and a
/// convolution
/// `conv_igemm_f16_nBN` computes ([`conv_igemm_ok`]) over the GroupNorm's samples, channels and
/// pixels, or a Linear over its rows (`m = n·spatial`, `k = c`: a 1×1 convolution of `n` images
/// of `spatial` pixels; `k` a multiple of 32, `n` of 8, its output not a GEGLU's input), of a
/// channels-last GroupNorm without SiLU whose output no other step reads and is not a graph
/// output. No other GroupNorm or LayerNorm between the two (they share the scratch that holds
/// the statistics until the second step reads them).
///
/// Without SiLU: the kernel normalises each block's A tiles as it loads them, so every input
/// value once per filter tap and per block of output channels, and SiLU's two special-function
/// instructions a value that often outweigh the tensor cores' work (`engine_floor --norm-pairs`:
/// the SD1.5 UNet's 44 ResNet convolutions at 22 ms instead of about 11). What remains are the
/// transformers' GroupNorm before `proj_in` (in SD1.5 37 of them, Linears of 320 to 1280
/// channels, whose GEMM moves less than the GroupNorm's apply pass would); the kernel takes
/// SiLU all the same (its flag), for a step where that pays.
pub fn norm_pair_first(p: &Program, ci: usize, precision: Precision) -> Option<usize> {
    let st = p.steps.get(ci)?;
    let cx = norm_consumer_input(st)?;
    if precision != Precision::Fp16 || p.outputs.iter().any(|(_, t)| t.buf == cx) {
        return None;
    }
    let gi = (0..ci).rev().find(|&i| p.steps[i].io().1 == cx)?;
    // the first step: (its input, the samples, channels and positions of a GroupNorm; rows as
    // samples of one position for a LayerNorm)
    let (x, n, ch, spatial, layer_norm) = match p.steps[gi] {
        Step::GroupNorm {
            x,
            n,
            c,
            spatial,
            channels_last: true,
            silu: false,
            ..
        } => (x, n, c, spatial, false),
        Step::LayerNorm {
            x,
            rows,
            cols,
            add: None,
            ..
        } => (x, rows, cols, 1, true),
        _ => return None,
    };
    let shapes_fit = match st {
        Step::Conv(_) if layer_norm => false,
        Step::Conv(c) => {
            let [xn, xc, xh, xw] = c.x_shape;
            conv_igemm_ok(c, precision)
                && c.residual != Some(cx)
                && (n, ch, spatial) == (xn, xc, xh * xw)
        }
        Step::Linear {
            out,
            residual,
            m,
            n: o,
            k,
            ..
        } => {
            *m == n * spatial
                && *k == ch
                && k % 32 == 0
                && o % 8 == 0
                && *residual != Some(cx)
                // the kernel's row indices reach a block (128) past the rows
                && m + 128 < i32::MAX as usize
                && o * k < i32::MAX as usize
                && !p
                    .steps
                    .iter()
                    .any(|s| matches!(s, Step::Geglu { x, .. } if x == out))
        }
        _ => false,
    };
    let only_reader = p
        .steps
        .iter()
        .enumerate()
        .all(|(i, s)| i == gi || i == ci || !s.io().0.contains(&cx));
    let no_norm_between = p.steps[gi + 1..ci]
        .iter()
        .all(|s| !matches!(s, Step::GroupNorm { .. } | Step::LayerNorm { .. }));
    (shapes_fit && only_reader && no_norm_between && x != cx).then_some(gi)
}

/// The buffers a tactic kernel's check touches ([`tactic_io`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TacticIo {
    /// Float activations the steps read that no earlier one of them writes: filled with the same
    /// pseudo-random values ([`tactic_fill_block`]) before the libraries' run of the steps and
    /// before the kernel's.
    pub inputs: Vec<usize>,
    /// What the steps before the last write (a projection's output a GEGLU reads, a
    /// normalisation's output): filled with NaN before each run, so that a kernel reading one
    /// instead of computing it shows.
    pub computed: Vec<usize>,
    /// What the last step writes: filled with NaN before each run, then compared.
    pub out: usize,
}

/// What a tactic kernel is checked on before an engine takes it ([`tactic_agrees`]), for the
/// steps `steps` (in order) it replaces.
pub fn tactic_io(p: &Program, steps: &[usize]) -> TacticIo {
    let (last, earlier) = steps.split_last().expect("at least one step");
    let computed: Vec<usize> = earlier.iter().map(|&s| p.steps[s].io().1).collect();
    let mut inputs = Vec::new();
    for &s in steps {
        for b in p.steps[s].io().0 {
            let buf = &p.buffers[b];
            if !computed.contains(&b)
                && !inputs.contains(&b)
                && buf.dtype == DType::Float
                && !matches!(buf.kind, BufferKind::Weight(_))
            {
                inputs.push(b);
            }
        }
    }
    TacticIo {
        inputs,
        computed,
        out: p.steps[*last].io().1,
    }
}

/// Elements in [`tactic_fill_block`], repeated over a buffer (not a power of two, so that rows
/// of a power-of-two width do not repeat one another).
pub const TACTIC_FILL_PERIOD: usize = (1 << 20) - 3;

/// Float16 values (bits) uniform in [-1, 1), deterministic: what a tactic kernel's inputs are
/// filled with, repeated, when it is checked against the libraries ([`tactic_io`]).
pub fn tactic_fill_block() -> &'static [u16] {
    static BLOCK: std::sync::OnceLock<Vec<u16>> = std::sync::OnceLock::new();
    BLOCK.get_or_init(|| {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        (0..TACTIC_FILL_PERIOD)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let u = (x >> 40) as f32 / (1u64 << 24) as f32;
                half::f16::from_f32(2.0 * u - 1.0).to_bits()
            })
            .collect()
    })
}

/// Largest difference a tactic kernel's output may have from the libraries' on the same
/// inputs, relative to the largest magnitude of theirs: both float16 with float32 accumulation,
/// in another order (the engine's checks allow the same against ONNX Runtime's float32).
pub const TACTIC_TOLERANCE: f64 = 1e-2;

/// Whether a tactic kernel's output `got` agrees with the libraries' `want` on the same inputs:
/// `Ok(max |Δ| / max |want|)`, or what is wrong — a non-finite value, a difference past
/// [`TACTIC_TOLERANCE`], or a reference with a non-finite value (an input left unfilled, an
/// overflow: nothing sound to check against, so the kernel is not taken).
pub fn tactic_agrees(want: &[f32], got: &[f32]) -> Result<f64, String> {
    if want.len() != got.len() {
        return Err(format!(
            "{} values, the libraries' {}",
            got.len(),
            want.len()
        ));
    }
    let bad = want.iter().filter(|w| !w.is_finite()).count();
    if bad > 0 {
        return Err(format!(
            "the libraries' output has {bad} non-finite values of {}: nothing to compare with",
            want.len()
        ));
    }
    if let Some(i) = got.iter().position(|g| !g.is_finite()) {
        return Err(format!(
            "value {i} is {} where the libraries' is {}",
            got[i], want[i]
        ));
    }
    let pairs = || want.iter().zip(got);
    let peak = want.iter().map(|w| w.abs() as f64).fold(0.0, f64::max);
    let diff = pairs()
        .map(|(w, g)| (*w as f64 - *g as f64).abs())
        .fold(0.0, f64::max);
    let rel = if peak > 0.0 {
        diff / peak
    } else if diff == 0.0 {
        0.0
    } else {
        f64::INFINITY
    };
    if rel <= TACTIC_TOLERANCE {
        Ok(rel)
    } else {
        Err(format!(
            "max |Δ| {rel:.2e} of the libraries' largest magnitude, more than {TACTIC_TOLERANCE:.0e}"
        ))
    }
}

/// The normalisation step pairs (a GroupNorm or LayerNorm, then a GEMM)
/// `conv_igemm_gn/_ln_f16_nBN` compute ([`norm_pair_first`]).
pub fn norm_pairs(p: &Program, precision: Precision) -> Vec<(usize, usize)> {
    (0..p.steps.len())
        .filter_map(|ci| norm_pair_first(p, ci, precision).map(|gi| (gi, ci)))
        .collect()
}

/// `bn` for step `si` of `p` if it is either step of a pair `conv_igemm_gn_f16_n{bn}` computes,
/// else `None`: every such pair on that kernel (the emulated executor's and `engine_floor`'s
/// choice, where the GPU executor's is timed).
pub fn norm_pair_for(
    p: &Program,
    si: usize,
    precision: Precision,
    bn: Option<usize>,
) -> Option<usize> {
    bn?;
    match &p.steps[si] {
        Step::Conv(_) | Step::Linear { .. } => norm_pair_first(p, si, precision).and(bn),
        Step::GroupNorm { out, .. } | Step::LayerNorm { out, .. } => p.steps[si + 1..]
            .iter()
            .position(|st| norm_consumer_input(st) == Some(*out))
            .and_then(|j| norm_pair_first(p, si + 1 + j, precision))
            .filter(|&gi| gi == si)
            .and(bn),
        _ => None,
    }
}

/// The launch of the kernel that computes step `ci` (a convolution, or a Linear as a 1×1
/// convolution) from the input of the normalisation `gi` whose output it reads
/// ([`norm_pair_first`]; buffers at `ptr`, the normalisation scratch at `norm_stats`):
/// `conv_igemm_gn_f16_n{bn}` after a GroupNorm (a Linear as `n` images of `spatial` pixels), with
/// the scale and shift its step leaves in the scratch and its SiLU flag;
/// `conv_igemm_ln_f16_n{bn}` after a LayerNorm (one image of `rows` pixels), with the rows'
/// statistics its step leaves there and its gamma and beta. The second step's weight, output
/// and epilogue (bias, per-sample bias, residual) as they are.
pub fn norm_gemm_launch(
    p: &Program,
    gi: usize,
    ci: usize,
    bn: usize,
    ptr: &dyn Fn(usize) -> u64,
    norm_stats: u64,
) -> Result<Launch, EngineError> {
    use KArg::{Ptr, I32};
    let bad = || {
        EngineError::Graph(format!(
            "steps {gi} and {ci} are not a pair conv_igemm_gn_f16_n{bn} or conv_igemm_ln_f16_n{bn} computes"
        ))
    };
    // the first step's input and output, and what the kernel reads of it: (images, pixels
    // each, the kernel's name, its arguments after the epilogue's)
    let (gx, gout, n, spatial, ch, kernel, extra) = match &p.steps[gi] {
        Step::GroupNorm {
            out,
            x,
            n,
            c,
            spatial,
            groups,
            silu,
            channels_last: true,
            ..
        } => {
            let ab = norm_stats + (gn_coeffs_offset(*n, *c, *spatial, *groups) * 4) as u64;
            (
                *x,
                *out,
                *n,
                *spatial,
                *c,
                "conv_igemm_gn",
                vec![Ptr(ab), I32(*silu as i32)],
            )
        }
        Step::LayerNorm {
            out,
            x,
            gamma,
            beta,
            rows,
            cols,
            add: None,
            ..
        } => (
            *x,
            *out,
            1,
            *rows,
            *cols,
            "conv_igemm_ln",
            vec![Ptr(norm_stats), Ptr(ptr(*gamma)), Ptr(beta.map_or(0, ptr))],
        ),
        _ => return Err(bad()),
    };
    if !CONV_IGEMM_WIDTHS.contains(&bn) || norm_consumer_input(&p.steps[ci]) != Some(gout) {
        return Err(bad());
    }
    let mut l = match &p.steps[ci] {
        Step::Conv(c) => {
            let [xn, xc, xh, xw] = c.x_shape;
            if kernel != "conv_igemm_gn" || (n, ch, spatial) != (xn, xc, xh * xw) {
                return Err(bad());
            }
            conv_igemm_launch(c, bn, ptr)
        }
        Step::Linear {
            out,
            w,
            bias,
            residual,
            m,
            n: o,
            k,
            ..
        } => {
            if *m != n * spatial || *k != ch || k % 32 != 0 || o % 8 != 0 {
                return Err(bad());
            }
            let i = |v: usize| I32(v as i32);
            let opt = |b: &Option<usize>| Ptr(b.map_or(0, ptr));
            Launch {
                grid: (m.div_ceil(128) as u32, o.div_ceil(bn) as u32, 1),
                block: (128, 1, 1),
                smem: 0,
                opt_in: false,
                kernel: String::new(),
                // x, w, y, bias, per-sample bias, residual; N, H, W, C, OH, OW, O, KH, KW,
                // strides, pads: n images of spatial x 1 pixels, a 1x1 filter
                args: vec![
                    Ptr(0),
                    Ptr(ptr(*w)),
                    Ptr(ptr(*out)),
                    opt(bias),
                    Ptr(0),
                    opt(residual),
                    i(n),
                    i(spatial),
                    i(1),
                    i(*k),
                    i(spatial),
                    i(1),
                    i(*o),
                    i(1),
                    i(1),
                    i(1),
                    i(1),
                    i(0),
                    i(0),
                ],
            }
        }
        _ => return Err(bad()),
    };
    l.kernel = format!("{kernel}_f16_n{bn}");
    l.smem = conv_igemm_smem(&l.kernel).unwrap_or(0) as u32;
    l.args[0] = Ptr(ptr(gx));
    l.args.splice(6..6, extra);
    Ok(l)
}

/// The GroupNorm that writes `x`, the input of step `si` on `conv_igemm_gn_f16_n{bn}`: the pair
/// was checked when the kernel was chosen ([`norm_pairs`]); here only the GroupNorm is found,
/// without going through every step again on each eager run.
fn norm_producer(p: &Program, si: usize, x: usize, bn: usize) -> Result<usize, EngineError> {
    (0..si)
        .rev()
        .find(|&i| p.steps[i].io().1 == x)
        .filter(|&gi| matches!(p.steps[gi], Step::GroupNorm { .. } | Step::LayerNorm { .. }))
        .ok_or_else(|| {
            EngineError::Graph(format!(
                "step {si}: a step on conv_igemm_gn/_ln_f16_n{bn} reads no GroupNorm or LayerNorm"
            ))
        })
}

/// The Linear step whose output GEGLU step `gi` alone reads, when `gemm_geglu_f16_nBN` computes
/// the pair as one kernel (the projection with GEGLU in its epilogue): float16, the Linear
/// without a bias (moved into the GEGLU) or residual, `n = 2d` its `[value; gate]` columns over
/// the GEGLU's rows, `k` a multiple of the k tile (32), `d` a multiple of 8, and the projection
/// read by no other step and not a graph output.
pub fn geglu_linear(p: &Program, gi: usize, precision: Precision) -> Option<usize> {
    let Step::Geglu { x, rows, d, .. } = p.steps.get(gi)? else {
        return None;
    };
    if precision != Precision::Fp16 || d % 8 != 0 || p.outputs.iter().any(|(_, t)| t.buf == *x) {
        return None;
    }
    let li = (0..gi).rev().find(|&i| p.steps[i].io().1 == *x)?;
    let Step::Linear {
        bias: None,
        residual: None,
        m,
        n,
        k,
        ..
    } = p.steps[li]
    else {
        return None;
    };
    let only_reader = p
        .steps
        .iter()
        .enumerate()
        .all(|(i, st)| i == gi || i == li || !st.io().0.contains(x));
    (only_reader
        && m == *rows
        && n == 2 * d
        && k % 32 == 0
        // the kernel's row indices reach a block (128) past the rows
        && m + 128 < i32::MAX as usize
        && n * k < i32::MAX as usize)
        .then_some(li)
}

/// The (Linear, GEGLU) step pairs `gemm_geglu_f16_nBN` computes ([`geglu_linear`]).
pub fn geglu_pairs(p: &Program, precision: Precision) -> Vec<(usize, usize)> {
    (0..p.steps.len())
        .filter_map(|gi| geglu_linear(p, gi, precision).map(|li| (li, gi)))
        .collect()
}

/// `bn` for step `si` of `p` if it is either step of a pair `gemm_geglu_f16_n{bn}` computes, else
/// `None`: every such pair on that kernel (the emulated executor's and `engine_floor`'s choice,
/// where the GPU executor's is timed).
pub fn geglu_kernel_for(
    p: &Program,
    si: usize,
    precision: Precision,
    bn: Option<usize>,
) -> Option<usize> {
    bn?;
    match &p.steps[si] {
        Step::Geglu { .. } => geglu_linear(p, si, precision).and(bn),
        Step::Linear { out, .. } => p.steps[si + 1..]
            .iter()
            .position(|st| matches!(st, Step::Geglu { x, .. } if x == out))
            .and_then(|j| geglu_linear(p, si + 1 + j, precision))
            .filter(|&li| li == si)
            .and(bn),
        _ => None,
    }
}

/// The launch of `gemm_geglu_f16_n{bn}` for GEGLU step `gi` and the Linear `li` before it
/// ([`geglu_linear`]; buffers at `ptr`): the Linear's input and weight, the GEGLU's bias and
/// output; the Linear's own output is not written.
pub fn gemm_geglu_launch(
    p: &Program,
    li: usize,
    gi: usize,
    bn: usize,
    ptr: &dyn Fn(usize) -> u64,
) -> Result<Launch, EngineError> {
    use KArg::{Ptr, I32};
    let (
        Step::Linear {
            x,
            w,
            m,
            n,
            k,
            bias: None,
            residual: None,
            ..
        },
        Step::Geglu {
            out, bias, d, rows, ..
        },
    ) = (&p.steps[li], &p.steps[gi])
    else {
        return Err(EngineError::Graph(format!(
            "steps {li} and {gi} are not a Linear without bias or residual and a GEGLU"
        )));
    };
    if !CONV_IGEMM_WIDTHS.contains(&bn) || m != rows || *n != 2 * d || k % 32 != 0 || d % 8 != 0 {
        return Err(EngineError::Graph(format!(
            "steps {li} and {gi} are not a pair gemm_geglu_f16_n{bn} computes"
        )));
    }
    let kernel = format!("gemm_geglu_f16_n{bn}");
    let i = |v: usize| I32(v as i32);
    Ok(Launch {
        grid: (m.div_ceil(128) as u32, (2 * d).div_ceil(bn) as u32, 1),
        block: (128, 1, 1),
        smem: conv_igemm_smem(&kernel).unwrap_or(0) as u32,
        opt_in: false,
        kernel,
        args: vec![
            Ptr(ptr(*x)),
            Ptr(ptr(*w)),
            Ptr(ptr(*out)),
            Ptr(bias.map_or(0, ptr)),
            i(*m),
            i(*k),
            i(*d),
        ],
    })
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

/// Grid and block of `group_norm_nhwc_apply` over `n` samples of `spatial` positions of `c`
/// channels of `elem_bytes`-byte values. Rows of whole 16-byte vectors (`cv = c / V` of them): a
/// thread per vector of channels, `R = max(1, 256 / cv)` row lanes a block (block `cv · R`
/// rounded up to whole warps, the rest idle), grid (position blocks, `min(n, 65535)`: further
/// samples taken that many apart) with about four positions a thread (its channels' scale and
/// shift computed once a sample). Otherwise the elementwise geometry over every value.
pub fn nhwc_apply_geometry(
    n: usize,
    c: usize,
    spatial: usize,
    elem_bytes: usize,
) -> ((u32, u32, u32), (u32, u32, u32)) {
    let v = 16 / elem_bytes;
    if c % v != 0 {
        return elementwise(n * c * spatial);
    }
    let cv = c / v;
    let lanes = (256 / cv).max(1);
    let blocks = spatial.div_ceil(lanes * 4).max(1);
    let threads = (cv * lanes).div_ceil(32) * 32;
    // samples beyond the grid's 65535 rows are taken gridDim.y apart
    let rows = n.clamp(1, 65535);
    ((blocks as u32, rows as u32, 1), (threads as u32, 1, 1))
}

/// Threads `bias_residual` needs over `n` values in rows of `cols`: one per 16 bytes when rows
/// are whole 16-byte vectors (its vectorised path), else one per value.
fn bias_residual_threads(n: usize, cols: usize, precision: Precision) -> usize {
    let v = 16 / precision.elem_bytes();
    if cols % v == 0 && n < 0x7fff_ffff {
        n / v
    } else {
        n
    }
}

/// The widest rows `layer_norm_warp` takes (32 lanes × `LN_WARP_PER_LANE` values in registers);
/// wider ones take the block-per-row `layer_norm`.
pub const LAYER_NORM_WARP_MAX_COLS: usize = 1280;

/// Dynamic shared memory (bytes) of a channels-last GroupNorm statistics block of `block` threads
/// over `c` channels of `elem_bytes`-byte values: the row lanes' partial sums and the group means
/// ((R + 1)·C floats) when a row is whole 16-byte vectors, else C floats.
pub fn nhwc_stats_smem(c: usize, block: u32, elem_bytes: usize) -> u32 {
    let v = 16 / elem_bytes;
    let lanes = if c % v == 0 {
        let cv = c / v;
        1 + (block as usize / cv).max(1)
    } else {
        1
    };
    (lanes * c * 4) as u32
}

/// float32 scratch of a GroupNorm step: partial statistics, and for channels-last the merged
/// mean and inverse deviation per (sample, group) after them, then the per-(sample, channel)
/// scale and shift a convolution reading the GroupNorm's input takes ([`norm_gemm_launch`]).
fn group_norm_step_scratch(n: usize, c: usize, spatial: usize, groups: usize, cl: bool) -> usize {
    if cl {
        gn_coeffs_offset(n, c, spatial, groups) + n * c * 2
    } else {
        match group_norm_splits(c / groups * spatial) {
            1 => 0,
            splits => n * groups * splits * 2,
        }
    }
}

/// Where a channels-last GroupNorm's merged statistics ([`gn_mr_offset`]) and scale-and-shift
/// coefficients start in the scratch, in floats.
fn gn_mr_offset(n: usize, c: usize, spatial: usize, groups: usize) -> usize {
    n * spatial.div_ceil(nhwc_chunk(c)) * groups * 2
}
/// (rounded up to 4 floats: `conv_igemm_gn_f16_nBN` reads them 16 bytes at a time, and a
/// scratch of GroupNorms of few groups would otherwise leave them 8 bytes off)
fn gn_coeffs_offset(n: usize, c: usize, spatial: usize, groups: usize) -> usize {
    (gn_mr_offset(n, c, spatial, groups) + n * groups * 2).next_multiple_of(4)
}

/// float32 values of normalisation scratch the program needs (GroupNorm statistics and
/// coefficients, a paired LayerNorm's row statistics) (the largest step's; 0 for none).
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
            // a LayerNorm a GEMM may read from its input (conv_igemm_ln_f16_nBN): its rows'
            // statistics, two floats a row
            Step::LayerNorm {
                rows,
                cols,
                add: None,
                ..
            } if cols % 32 == 0 => Some(rows * 2),
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

/// Head sizes with entries of their own (`attention_*_f16_d40`: d a compile-time constant in
/// the DP = 48 kernels, so neither the m16n8k8 choice nor the padding costs instructions);
/// others take the entry of d rounded up to 16.
pub const ATTENTION_EXACT_HEADS: [usize; 1] = [40];

/// The attention entries' head-size suffix for head size `d`: d itself where it has entries of
/// its own, else d rounded up to 16 (DP).
pub fn attention_entry_head(d: usize) -> usize {
    if ATTENTION_EXACT_HEADS.contains(&d) {
        d
    } else {
        d.div_ceil(16) * 16
    }
}

/// Dynamic shared memory of the tensor-core attention kernels (engine_ops.cu), by entry name:
/// `attention_tiled_f16_dD` two stages of 64-key K and V tiles, `attention_short{M}_f16_dD`
/// per warp (4) its Q, K and V tiles of 16·M rows; rows of DP + 8 halves (DP = D rounded up
/// to 16).
pub fn attention_smem(name: &str) -> Option<usize> {
    let (kind, d) = name.strip_prefix("attention_")?.split_once("_f16_d")?;
    let pitch = (d.parse::<usize>().ok()?.div_ceil(16) * 16 + 8) * 2;
    match kind {
        "tiled" | "tiled2" => Some(4 * 64 * pitch),
        "short1" => Some(4 * 3 * 16 * pitch),
        "short2" => Some(4 * 3 * 32 * pitch),
        _ => None,
    }
}

/// Dynamic shared memory a block may use without opting in.
pub const SMEM_DEFAULT: usize = 48 * 1024;

/// Whether `l` can launch on a GPU whose blocks may opt in to `smem_optin` bytes of dynamic
/// shared memory: grid and block within CUDA's limits, shared memory within the default or
/// opted in (the device opens the attention kernels to their size where the GPU allows it, at
/// load). The executor checks every launch with it, and the emulator too.
pub fn check_launchable(l: &Launch, smem_optin: usize) -> Result<(), String> {
    let (g, b) = (l.grid, l.block);
    if g.0 == 0 || g.1 == 0 || g.2 == 0 || g.1 > 65535 || g.2 > 65535 || g.0 > i32::MAX as u32 {
        return Err(format!("{}: grid {g:?} is not launchable", l.kernel));
    }
    let threads = b.0 as u64 * b.1 as u64 * b.2 as u64;
    if threads == 0 || threads > 1024 || b.2 > 64 {
        return Err(format!("{}: block {b:?} is not launchable", l.kernel));
    }
    let smem = l.smem as usize;
    let opted = if l.opt_in {
        smem
    } else {
        opt_in_smem(&l.kernel)
            .filter(|&s| s <= smem_optin)
            .unwrap_or(0)
    };
    if smem > SMEM_DEFAULT.max(opted) || smem > smem_optin {
        return Err(format!(
            "{}: {smem} bytes of dynamic shared memory (limit {SMEM_DEFAULT} without opting in, \
             {smem_optin} with, on this GPU)",
            l.kernel
        ));
    }
    Ok(())
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
            // what the non-transposing copies iterate: the output's axis order
            let ordered = s.output_ordered();
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
                ordered.in_units(16 / ctx.precision.elem_bytes() as i64, *in_off, *out_off)
            {
                // rows contiguous on both sides (in the output's axis order): 16 bytes per thread
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
                // consecutive threads write consecutive elements
                let s = ordered;
                let n = s.numel();
                ops.push(ew(
                    typed("copy_strided"),
                    n,
                    vec![
                        ptr(*out),
                        ptr(*inp),
                        I64(n as i64),
                        KArg::Strided(s),
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
        Step::Linear { x, .. } if (ctx.norm_pair)(si).is_some() => {
            let bn = (ctx.norm_pair)(si).unwrap_or(0);
            ops.push(Op::Kernel(norm_gemm_launch(
                p,
                norm_producer(p, si, *x, bn)?,
                si,
                bn,
                &|b| ctx.ptrs[b],
                ctx.norm_stats,
            )?));
        }
        // the projection of a GEGLU pair on gemm_geglu_f16_nBN: computed by the GEGLU's launch
        Step::Linear { .. } if (ctx.geglu_kernel)(si).is_some() => {}
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
                    bias_residual_threads(m * n, *n, ctx.precision),
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
        Step::Conv(c) if (ctx.norm_pair)(si).is_some() => {
            let bn = (ctx.norm_pair)(si).unwrap_or(0);
            ops.push(Op::Kernel(norm_gemm_launch(
                p,
                norm_producer(p, si, c.x, bn)?,
                si,
                bn,
                &|b| ctx.ptrs[b],
                ctx.norm_stats,
            )?));
        }
        Step::Conv(c) if (ctx.conv_kernel)(si).is_some() => {
            let bn = (ctx.conv_kernel)(si).unwrap_or(0);
            if !conv_igemm_ok(c, ctx.precision) || !CONV_IGEMM_WIDTHS.contains(&bn) {
                return Err(EngineError::Graph(format!(
                    "step {si}: convolution {} is not one conv_igemm_f16_n{bn} computes",
                    c.problem()
                )));
            }
            ops.push(Op::Kernel(conv_igemm_launch(c, bn, &|b| ctx.ptrs[b])));
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
                    bias_residual_threads((rows * cols) as usize, cols as usize, ctx.precision),
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
            x_bias,
            x_sbias,
        } => {
            if !*channels_last && (x_bias.is_some() || x_sbias.is_some()) {
                return Err(EngineError::Graph(
                    "GroupNorm input biases are channels-last only".into(),
                ));
            }
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
                let mr = Ptr(st + (gn_mr_offset(*n, *c, *spatial, *groups) * 4) as u64);
                let ch = I64(chunk as i64);
                ops.push(Op::Kernel(Launch {
                    kernel: typed("group_norm_nhwc_stats"),
                    grid: (*n as u32, parts as u32, 1),
                    block: (nhwc_stats_block(*c), 1, 1),
                    smem: nhwc_stats_smem(*c, nhwc_stats_block(*c), ctx.precision.elem_bytes()),
                    opt_in: false,
                    args: vec![Ptr(st), ptr(*x), opt(x_bias), opt(x_sbias), ci, sp, g, ch],
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
                if (ctx.norm_pair)(si).is_some() {
                    // the convolution after it normalises its input as it reads it
                    // (conv_igemm_gn_f16_nBN): the scale and shift per (sample, channel) only
                    let ab = st + (gn_coeffs_offset(*n, *c, *spatial, *groups) * 4) as u64;
                    ops.push(ew(
                        typed("group_norm_nhwc_coeffs"),
                        n * c,
                        vec![
                            Ptr(ab),
                            mr,
                            ptr(*gamma),
                            ptr(*beta),
                            opt(x_bias),
                            opt(x_sbias),
                            I32(*n as i32),
                            ci,
                            g,
                        ],
                    ));
                    return Ok(ops);
                }
                let total = n * c * spatial;
                let (grid, block) =
                    nhwc_apply_geometry(*n, *c, *spatial, ctx.precision.elem_bytes());
                ops.push(launch(
                    typed("group_norm_nhwc_apply"),
                    grid,
                    block.0,
                    0,
                    vec![
                        ptr(*out),
                        ptr(*x),
                        opt(x_bias),
                        opt(x_sbias),
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
            if (ctx.norm_pair)(si).is_some() {
                // the GEMM after it normalises its input as it reads it (conv_igemm_ln_f16_nBN):
                // the rows' statistics only, at the start of the scratch
                ops.push(launch(
                    typed("layer_norm_stats"),
                    (rows.div_ceil(8) as u32, 1, 1),
                    256,
                    0,
                    vec![
                        Ptr(ctx.norm_stats),
                        ptr(*x),
                        I64(*rows as i64),
                        c,
                        F32(*eps),
                    ],
                ));
                return Ok(ops);
            }
            let (ap, period, div) = add.map_or((Ptr(0), I32(1), I32(1)), |(t, per, div)| {
                (ptr(t), I32(per as i32), I32(div as i32))
            });
            if *cols <= LAYER_NORM_WARP_MAX_COLS {
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
                        div,
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
                        div,
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
        Step::Geglu { x, .. } if (ctx.geglu_kernel)(si).is_some() => {
            let bn = (ctx.geglu_kernel)(si).unwrap_or(0);
            // the pair was checked when the kernel was chosen ([`geglu_pairs`]); here only its
            // projection is found (the step just before, as compiled), without going through
            // every step again on each eager run
            let li = (0..si)
                .rev()
                .find(|&i| p.steps[i].io().1 == *x)
                .filter(|&li| matches!(p.steps[li], Step::Linear { .. }))
                .ok_or_else(|| {
                    EngineError::Graph(format!(
                    "step {si}: a GEGLU gemm_geglu_f16_n{bn} does not compute with its projection"
                ))
                })?;
            ops.push(Op::Kernel(gemm_geglu_launch(p, li, si, bn, &|b| {
                ctx.ptrs[b]
            })?));
        }
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
            ns,
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
                // the kernels move rows of 8 halves (cp.async, ldmatrix: 16 bytes): every row
                // start 16-byte aligned, and at least one key
                let aligned = ld.iter().chain(offs.iter()).all(|&x| x % 8 == 0)
                    && qkvo.iter().all(|a| matches!(a, Ptr(p) if p % 16 == 0));
                if !aligned || *s == 0 {
                    return Err(EngineError::Graph(format!(
                        "attention over {s} keys with Q, K, V at strides {ld:?}, offsets {offs:?}: \
                         the tensor-core kernels need rows 16-byte aligned and a key"
                    )));
                }
                if !super::program::fused_attention_scale(*scale) {
                    return Err(EngineError::Graph(format!(
                        "attention with scale {scale}: the tensor-core kernels need a positive \
                         finite scale (the compiler gives others GEMMs and a softmax)"
                    )));
                }
                let entry = attention_entry_head(*d);
                let short = format!("attention_short{}_f16_d{entry}", 1 + (*l > 16) as usize);
                // one warp per sequence where this GPU's shared memory allows it
                let fits = |k: &str| attention_smem(k).is_some_and(|b| b <= ctx.smem_optin);
                // 128-row blocks: 8 warps of one 16-row tile, or (d = 40, where timed faster) 4
                // of two
                let two = entry == 40 && (ctx.attention_two)(si);
                let (name, grid, block) = if *l <= 32 && fits(&short) {
                    (short, ((n * heads).div_ceil(4) as u32, 1, 1), 128)
                } else {
                    (
                        format!("attention_tiled{}_f16_d{entry}", if two { "2" } else { "" }),
                        (l.div_ceil(128) as u32, *heads as u32, *n as u32),
                        if two { 128 } else { 256 },
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
                args.push(I32(*ns as i32));
                args.push(F32(*scale));
                ops.push(launch(name, grid, block, smem, args));
            } else {
                if *ld != [heads * d; 3] || *offs != [0; 3] || *ns != 1 {
                    return Err(EngineError::Graph(format!(
                        "attention with Q, K, V at strides {ld:?} ({ns} sequences interleaved) runs on the float16 kernels only"
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

    /// A tactic kernel is taken only where its output agrees with the libraries' on the same
    /// inputs: what agreeing means.
    #[test]
    fn tactic_kernels_agree_only_within_the_tolerance_and_where_finite() {
        let want: Vec<f32> = (0..1000).map(|i| ((i as f32) * 0.37).sin() * 4.0).collect();
        assert_eq!(tactic_agrees(&want, &want), Ok(0.0));
        // float16 rounding of a value of 4: within tolerance
        let rounded: Vec<f32> = want
            .iter()
            .map(|&x| half::f16::from_f32(x).to_f32())
            .collect();
        let rel = tactic_agrees(&want, &rounded).unwrap();
        assert!(rel > 0.0 && rel < 1e-3, "{rel}");
        // one value 2 % of the peak off
        let mut off = want.clone();
        off[500] += 0.02 * 4.0;
        let e = tactic_agrees(&want, &off).unwrap_err();
        assert!(e.contains("max |Δ|"), "{e}");
        // just inside
        let mut near = want.clone();
        near[500] += 0.009 * 4.0;
        assert!(tactic_agrees(&want, &near).is_ok());
        // a non-finite value where the reference is finite, wherever it is
        for bad in [f32::NAN, f32::INFINITY] {
            let mut g = want.clone();
            g[999] = bad;
            let e = tactic_agrees(&want, &g).unwrap_err();
            assert!(e.contains("value 999"), "{e}");
        }
        // a reference with a non-finite value is nothing sound to compare with: not taken,
        // even where the kernel gives the same
        let mut w = want.clone();
        w[3] = f32::NAN;
        let e = tactic_agrees(&w, &w).unwrap_err();
        assert!(e.contains("1 non-finite"), "{e}");
        // nor another length
        let nan = vec![f32::NAN; 4];
        assert!(tactic_agrees(&nan, &nan).is_err());
        assert!(tactic_agrees(&want, &want[..999]).is_err());
        // an all-zero reference: only zeros agree
        let zero = vec![0.0f32; 8];
        assert_eq!(tactic_agrees(&zero, &zero), Ok(0.0));
        let mut z = zero.clone();
        z[2] = 1e-6;
        assert!(tactic_agrees(&zero, &z).is_err());
    }

    /// The inputs a tactic kernel is checked on: deterministic float16 values spread over
    /// [-1, 1), the same on every call.
    #[test]
    fn tactic_inputs_are_deterministic_float16_values_in_the_unit_interval() {
        let a = tactic_fill_block();
        assert_eq!(a.len(), TACTIC_FILL_PERIOD);
        assert_eq!(a, tactic_fill_block());
        let v: Vec<f32> = a
            .iter()
            .map(|&b| half::f16::from_bits(b).to_f32())
            .collect();
        assert!(v.iter().all(|x| x.is_finite() && (-1.0..=1.0).contains(x)));
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64;
        // uniform on [-1, 1): mean 0, variance 1/3
        assert!(
            mean.abs() < 0.01 && (var - 1.0 / 3.0).abs() < 0.01,
            "{mean} {var}"
        );
        // no short period: a row of 320 values differs from the next
        assert_ne!(v[..320], v[320..640]);
    }

    /// What the check of a tactic kernel fills and compares: the activations its steps read that
    /// none of them computed (not the weights, not the intermediate), and the last one's output.
    #[test]
    fn a_tactic_check_fills_the_steps_inputs_and_reads_the_last_output() {
        use super::super::program::{Buffer, WeightSource};
        let act = |numel| Buffer {
            numel,
            dtype: DType::Float,
            kind: BufferKind::Activation,
        };
        let weight = |numel| Buffer {
            numel,
            dtype: DType::Float,
            kind: BufferKind::Weight(WeightSource::Initializer("w".into())),
        };
        // 0 x, 1 w, 2 bias, 3 projection output, 4 GEGLU output, 5 GEGLU bias (an activation
        // here), 6 a residual read in place by a last step
        let p = Program {
            buffers: vec![
                act(8 * 4),
                weight(16 * 4),
                weight(16),
                act(8 * 16),
                act(8 * 8),
                act(16),
                act(8 * 8),
            ],
            steps: vec![
                Step::Linear {
                    out: 3,
                    x: 0,
                    w: 1,
                    bias: Some(2),
                    residual: None,
                    m: 8,
                    n: 16,
                    k: 4,
                },
                Step::Geglu {
                    out: 4,
                    x: 3,
                    bias: Some(5),
                    rows: 8,
                    d: 8,
                },
                Step::Linear {
                    out: 6,
                    x: 4,
                    w: 1,
                    bias: None,
                    residual: Some(6),
                    m: 8,
                    n: 8,
                    k: 8,
                },
            ],
            inputs: vec![],
            input_transforms: vec![],
            outputs: vec![],
            nodes: 3,
        };
        let io = |inputs: Vec<usize>, computed: Vec<usize>, out| TacticIo {
            inputs,
            computed,
            out,
        };
        assert_eq!(tactic_io(&p, &[0, 1]), io(vec![0, 5], vec![3], 4));
        assert_eq!(tactic_io(&p, &[1]), io(vec![3, 5], vec![], 4));
        // a residual the last step writes in place is an input too (filled, so compared)
        assert_eq!(tactic_io(&p, &[1, 2]), io(vec![3, 5, 6], vec![4], 6));
    }

    /// The per-(sample, channel) coefficients conv_igemm_gn_f16 reads 16 bytes at a time start
    /// 16-byte aligned in the scratch, and the scratch holds them, whatever the groups (one
    /// sample of one group: statistics of 129 chunk-pairs would leave them 8 bytes off).
    #[test]
    fn group_norm_coefficients_are_aligned_inside_the_scratch() {
        for (n, c, spatial, groups) in [(1, 512, 4096, 1), (32, 320, 4096, 32), (3, 96, 35, 3)] {
            let at = gn_coeffs_offset(n, c, spatial, groups);
            assert_eq!(at % 4, 0, "{n} {c} {spatial} {groups}");
            assert!(at >= gn_mr_offset(n, c, spatial, groups) + n * groups * 2);
            assert!(group_norm_step_scratch(n, c, spatial, groups, true) >= at + n * c * 2);
        }
    }

    /// The host's switch to the one-warp LayerNorm and the kernel's registers per lane agree.
    #[test]
    fn layer_norm_warp_width_matches_its_kernel() {
        let src = motionrt_kernels::cuda::SOURCES
            .iter()
            .find(|(n, _)| *n == "engine_ops")
            .unwrap()
            .1;
        let per_lane: usize = src
            .lines()
            .find_map(|l| l.strip_prefix("#define LN_WARP_PER_LANE "))
            .and_then(|v| v.trim().parse().ok())
            .expect("engine_ops.cu defines LN_WARP_PER_LANE");
        assert_eq!(32 * per_lane, LAYER_NORM_WARP_MAX_COLS);
    }

    /// `bias_residual` gets a thread per 16 bytes where its rows are whole vectors.
    #[test]
    fn bias_residual_threads_follow_its_vector_path() {
        assert_eq!(
            bias_residual_threads(64 * 320, 320, Precision::Fp16),
            64 * 40
        );
        assert_eq!(
            bias_residual_threads(64 * 320, 320, Precision::Fp32),
            64 * 80
        );
        assert_eq!(bias_residual_threads(6 * 10, 10, Precision::Fp16), 60);
    }

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
        // the d = 40 entries run the DP = 48 kernels
        assert_eq!(
            attention_smem("attention_tiled_f16_d40"),
            attention_smem("attention_tiled_f16_d48")
        );
        assert_eq!(attention_smem("layer_norm_f16"), None);
        assert_eq!(attention_smem("attention_tiled_f16_dxx"), None);
        assert_eq!(
            [8, 16, 40, 48, 72, 80, 160].map(attention_entry_head),
            [16, 16, 40, 48, 80, 80, 160]
        );
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

    /// Values of a `[b, hw, f, c]` token-order buffer and the same values frame-major.
    fn token_and_frame_major([b, f, hw, c]: [usize; 4]) -> (Vec<f32>, Vec<f32>) {
        let n = b * f * hw * c;
        let tok: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let mut fm = vec![0f32; n];
        for (bi, pi, fi, ci) in (0..b).flat_map(|bi| {
            (0..hw).flat_map(move |pi| {
                (0..f).flat_map(move |fi| (0..c).map(move |ci| (bi, pi, fi, ci)))
            })
        }) {
            fm[((bi * f + fi) * hw + pi) * c + ci] = tok[((bi * hw + pi) * f + fi) * c + ci];
        }
        (tok, fm)
    }

    #[test]
    fn restrided_reads_see_the_token_order_values_in_frame_major_rows() {
        let shape @ [_, f, hw, c] = [2, 4, 3, 5];
        let (tok, fm) = token_and_frame_major(shape);
        let (f, hw, c) = (f as i64, hw as i64, c as i64);
        // (dims, input strides in token order, output strides, input offset)
        type Case = (Vec<usize>, Vec<i64>, Vec<i64>, i64);
        let cases: Vec<Case> = vec![
            // to NCHW: [b, f, c, hw]
            (
                vec![2, 4, 5, 3],
                vec![hw * f * c, c, 1, f * c],
                vec![f * c * hw, c * hw, hw, 1],
                0,
            ),
            // the whole buffer in order (one merged axis: split into all four)
            (vec![120], vec![1], vec![1], 0),
            // frame and channel merged, a position axis broadcast, from position 1 on
            (
                vec![2, 2, 2, 20],
                vec![hw * f * c, f * c, 0, 1],
                vec![80, 40, 20, 1],
                f * c,
            ),
        ];
        for (dims, a, cs, off) in cases {
            let zeros = vec![0; dims.len()];
            let s = Strided::new(&dims, &a, &zeros, &cs).unwrap();
            let (s2, off2) = restride(&s, Side::A, off, shape).unwrap();
            assert_eq!(s.numel(), s2.numel());
            for i in 0..s.numel() as i64 {
                let (x, _, y) = s.offsets(i);
                let (x2, _, y2) = s2.offsets(i);
                assert_eq!(y, y2, "{dims:?} element {i}: written elsewhere");
                assert_eq!(
                    tok[(off + x) as usize],
                    fm[(off2 + x2) as usize],
                    "{dims:?} element {i}"
                );
            }
        }
        // an axis that straddles two parts unevenly does not map
        let s = Strided::new(&[3, 40], &[40, 1], &[0, 0], &[40, 1]).unwrap();
        let odd = Strided::new(&[7], &[3], &[0], &[1]).unwrap();
        assert!(restride(&s, Side::A, 0, shape).is_some());
        assert!(restride(&odd, Side::A, 0, shape).is_none());
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
