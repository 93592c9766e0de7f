//! The native engine's host-side compiler: a fused float32 graph plus concrete input shapes
//! become a flat list of device [`Step`]s over numbered buffers. Shape arithmetic (`Shape`,
//! `Gather`, `Concat` of shape vectors, slices of constant tables) is evaluated here once, so the
//! device program is a fixed sequence of launches that a CUDA graph can capture. Reshapes are
//! aliases; a convolution whose output only feeds an `Add` takes the other operand as a residual
//! in its epilogue. Buffers get arena offsets by lifetime ([`plan_memory`]).
//!
//! Nothing here touches a GPU: every function is tested on the CPU.

use std::collections::HashMap;
use std::sync::Arc;

use motionrt_onnx::proto::{
    AttributeProto, ModelProto, NodeProto, TensorProto, TensorProtoDataType,
};
use serde::{Deserialize, Serialize};

use super::EngineError;

pub const MAX_RANK: usize = 6;

/// Graph outputs as `(name, shape, float32 values)`.
pub type Outputs = Vec<(String, Vec<usize>, Vec<f32>)>;

fn err(m: impl Into<String>) -> EngineError {
    EngineError::Graph(m.into())
}

/// Element type of a device buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    /// The engine's float type (float32 or float16, chosen at execution).
    Float,
    I64,
}

/// A strided iteration shared by the copy and broadcast kernels (`Strided` in engine_ops.cu).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct Strided {
    pub rank: i32,
    pub pad_: i32,
    pub dims: [i64; MAX_RANK],
    pub a: [i64; MAX_RANK],
    pub b: [i64; MAX_RANK],
    pub c: [i64; MAX_RANK],
}

impl Strided {
    pub fn numel(&self) -> usize {
        self.dims[..self.rank as usize].iter().product::<i64>() as usize
    }

    /// The `(a, b, c)` offsets of flat element `i` (what the kernel computes for `i` below
    /// [`numel`](Self::numel), where it takes the outermost index without a division).
    pub fn offsets(&self, mut i: i64) -> (i64, i64, i64) {
        let (mut a, mut b, mut c) = (0, 0, 0);
        for k in (0..self.rank as usize).rev() {
            let d = self.dims[k];
            let ik = i % d;
            i /= d;
            a += ik * self.a[k];
            b += ik * self.b[k];
            c += ik * self.c[k];
        }
        (a, b, c)
    }

    /// For a copy that transposes (axis `ai` contiguous in the input, another axis `ao` in the
    /// output, both at least 16 long), `(ai, ao)`: the executor moves it in 32 × 32 tiles through
    /// shared memory (`copy_transpose`), the other axes as the grid's batch (at most 65535).
    pub fn transpose_axes(&self) -> Option<(usize, usize)> {
        let r = self.rank as usize;
        let ai = (0..r).find(|&k| self.a[k] == 1)?;
        let ao = (0..r).find(|&k| self.c[k] == 1)?;
        let batch: i64 = (0..r)
            .filter(|&k| k != ai && k != ao)
            .map(|k| self.dims[k])
            .product();
        (ai != ao
            && self.dims[ai] >= 16
            && self.dims[ao] >= 16
            && self.dims[ao] <= 32 * 65535
            && batch <= 65535)
            .then_some((ai, ao))
    }

    /// The same copy with its axes ordered by output stride, largest first, and axes that then
    /// run contiguously merged: consecutive threads of the copy kernels write consecutive
    /// elements, and a copy whose rows are contiguous on both sides in another axis order (a
    /// channels-last concatenation, `[N, C, HW]` with C the contiguous axis) can move 16 bytes a
    /// thread ([`Strided::in_units`]). A copy writes every output element once, so the order in
    /// which it visits them is free.
    pub fn output_ordered(&self) -> Strided {
        let r = self.rank as usize;
        let mut order: Vec<usize> = (0..r).collect();
        // stable: axes of equal output stride keep their order
        order.sort_by_key(|&k| std::cmp::Reverse(self.c[k].unsigned_abs()));
        let pick = |v: &[i64; MAX_RANK]| order.iter().map(|&k| v[k]).collect::<Vec<i64>>();
        let dims: Vec<usize> = order.iter().map(|&k| self.dims[k] as usize).collect();
        // merging never needs more axes than there were
        Strided::new(&dims, &pick(&self.a), &pick(&self.b), &pick(&self.c)).unwrap_or(*self)
    }

    /// The same copy over units of `v` elements (16 bytes), when the innermost axis is contiguous
    /// on both sides and every extent, stride and offset divides: the iteration and offsets for
    /// `copy_strided_b16`, with the offsets divided too.
    pub fn in_units(&self, v: i64, in_off: i64, out_off: i64) -> Option<(Strided, i64, i64)> {
        let r = self.rank as usize;
        let last = r.checked_sub(1)?;
        if self.a[last] != 1 || self.c[last] != 1 || self.dims[last] % v != 0 {
            return None;
        }
        if in_off % v != 0 || out_off % v != 0 {
            return None;
        }
        let mut s = *self;
        s.dims[last] /= v;
        for k in 0..last {
            if self.a[k] % v != 0 || self.c[k] % v != 0 {
                return None;
            }
            s.a[k] /= v;
            s.c[k] /= v;
        }
        Some((s, in_off / v, out_off / v))
    }

    pub(crate) fn new(
        dims: &[usize],
        a: &[i64],
        b: &[i64],
        c: &[i64],
    ) -> Result<Self, EngineError> {
        // merge axes that are contiguous in all three stride sets, drop size-1 axes
        let mut m: Vec<(i64, i64, i64, i64)> = Vec::new();
        for k in 0..dims.len() {
            if dims[k] == 1 {
                continue;
            }
            let e = (dims[k] as i64, a[k], b[k], c[k]);
            if let Some(last) = m.last_mut() {
                if last.1 == e.1 * e.0 && last.2 == e.2 * e.0 && last.3 == e.3 * e.0 {
                    *last = (last.0 * e.0, e.1, e.2, e.3);
                    continue;
                }
            }
            m.push(e);
        }
        if m.is_empty() {
            m.push((1, 0, 0, 0));
        }
        if m.len() > MAX_RANK {
            return Err(err(format!(
                "a strided copy over {dims:?} needs {} axes; the kernels take {MAX_RANK}",
                m.len()
            )));
        }
        let mut s = Strided {
            rank: m.len() as i32,
            ..Default::default()
        };
        for (k, e) in m.iter().enumerate() {
            s.dims[k] = e.0;
            s.a[k] = e.1;
            s.b[k] = e.2;
            s.c[k] = e.3;
        }
        Ok(s)
    }
}

pub fn contiguous_strides(shape: &[usize]) -> Vec<i64> {
    let mut s = vec![0i64; shape.len()];
    let mut acc = 1i64;
    for k in (0..shape.len()).rev() {
        s[k] = acc;
        acc *= shape[k] as i64;
    }
    s
}

/// Strides of `shape` (contiguous) read as `out` by numpy broadcasting (0 on broadcast axes).
fn broadcast_strides(shape: &[usize], out: &[usize]) -> Result<Vec<i64>, EngineError> {
    broadcast_view(shape, &contiguous_strides(shape), out)
}

/// Strides that read a `(shape, own)` view as `out` by numpy broadcasting.
fn broadcast_view(shape: &[usize], own: &[i64], out: &[usize]) -> Result<Vec<i64>, EngineError> {
    let off = out.len() - shape.len();
    let mut s = vec![0; out.len()];
    for k in 0..shape.len() {
        if shape[k] == out[off + k] {
            s[off + k] = if shape[k] == 1 { 0 } else { own[k] };
        } else if shape[k] != 1 {
            return Err(err(format!("cannot broadcast {shape:?} to {out:?}")));
        }
    }
    Ok(s)
}

fn broadcast_shape(a: &[usize], b: &[usize]) -> Result<Vec<usize>, EngineError> {
    let r = a.len().max(b.len());
    let mut out = vec![0; r];
    for k in 0..r {
        let x = if k + a.len() >= r {
            a[k + a.len() - r]
        } else {
            1
        };
        let y = if k + b.len() >= r {
            b[k + b.len() - r]
        } else {
            1
        };
        out[k] = if x == y || y == 1 {
            x
        } else if x == 1 {
            y
        } else {
            return Err(err(format!("shapes {a:?} and {b:?} do not broadcast")));
        };
    }
    Ok(out)
}

/// A constant evaluated on the host.
#[derive(Debug, Clone, PartialEq)]
pub enum HostData {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: HostData,
}

impl HostTensor {
    fn i64s(&self) -> Result<&[i64], EngineError> {
        match &self.data {
            HostData::I64(v) => Ok(v),
            HostData::F32(_) => Err(err("expected an int64 constant, found float")),
        }
    }
    /// Gather elements by a strided map (c-offsets are the output's contiguous order).
    fn map(&self, shape: Vec<usize>, s: &Strided, off: i64) -> HostTensor {
        let n = s.numel();
        let idx = |i: usize| (off + s.offsets(i as i64).0) as usize;
        let data = match &self.data {
            HostData::F32(v) => HostData::F32((0..n).map(|i| v[idx(i)]).collect()),
            HostData::I64(v) => HostData::I64((0..n).map(|i| v[idx(i)]).collect()),
        };
        HostTensor { shape, data }
    }
}

/// A device tensor: a buffer read as `shape` through `strides` (in elements). Transposes and
/// reshapes make strided views of their input's buffer; steps that need a particular layout get
/// one through [`Planner::contiguous`] / [`Planner::in_order`], which copy only when the view
/// is not laid out that way already.
#[derive(Debug, Clone, PartialEq)]
pub struct DevTensor {
    pub buf: usize,
    pub shape: Vec<usize>,
    pub strides: Vec<i64>,
}

impl DevTensor {
    /// A contiguous (row-major) tensor.
    pub fn new(buf: usize, shape: Vec<usize>) -> Self {
        let strides = contiguous_strides(&shape);
        Self {
            buf,
            shape,
            strides,
        }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_contiguous(&self) -> bool {
        self.is_dense_in(&(0..self.shape.len()).collect::<Vec<_>>())
    }

    /// Whether the view is dense with its axes in `order` (outermost first), as
    /// [`dense_strides`] lays them out (size-1 axes may have any stride).
    pub fn is_dense_in(&self, order: &[usize]) -> bool {
        let want = dense_strides(&self.shape, order);
        (0..self.shape.len()).all(|k| self.shape[k] == 1 || self.strides[k] == want[k])
    }

    /// The axis order (outermost first) in which the view is dense, if it is a permutation of
    /// a contiguous layout.
    pub fn dense_order(&self) -> Option<Vec<usize>> {
        // size-1 axes (any stride) outermost, so a layout built from this order keeps the
        // others' relative strides
        let mut order: Vec<usize> = (0..self.shape.len()).collect();
        order.sort_by_key(|&k| (self.shape[k] != 1, std::cmp::Reverse(self.strides[k]), k));
        self.is_dense_in(&order).then_some(order)
    }

    /// `[N, C, spatial...]` stored channels-last (`[N, spatial..., C]` in memory): `(N, C, S)`.
    pub fn channels_last(&self) -> Option<(usize, usize, usize)> {
        let r = self.shape.len();
        if r < 3 || !self.is_dense_in(&channels_last_order(r)) {
            return None;
        }
        Some((
            self.shape[0],
            self.shape[1],
            self.shape[2..].iter().product(),
        ))
    }
}

/// `[0, 2, 3, .., 1]`: the axis order of a channels-last `[N, C, spatial...]` tensor.
pub fn channels_last_order(rank: usize) -> Vec<usize> {
    let mut o: Vec<usize> = (0..rank).collect();
    if rank >= 3 {
        o.remove(1);
        o.push(1);
    }
    o
}

/// Strides of `shape` laid out densely with its axes in `order` (outermost first).
pub fn dense_strides(shape: &[usize], order: &[usize]) -> Vec<i64> {
    let mut s = vec![0i64; shape.len()];
    let mut acc = 1i64;
    for &k in order.iter().rev() {
        s[k] = acc;
        acc *= shape[k] as i64;
    }
    s
}

/// The strides that read a `(shape, strides)` view as `new` without moving data, if there are
/// such (numpy's no-copy reshape): each run of old axes that merges or splits into new axes must
/// be contiguous within itself.
pub fn reshape_strides(shape: &[usize], strides: &[i64], new: &[usize]) -> Option<Vec<i64>> {
    if shape.contains(&0) || new.contains(&0) {
        // no elements: any layout reads them
        return Some(contiguous_strides(new));
    }
    let old: Vec<(usize, i64)> = shape
        .iter()
        .zip(strides)
        .filter(|(&d, _)| d != 1)
        .map(|(&d, &s)| (d, s))
        .collect();
    let mut out = vec![0i64; new.len()];
    let (mut i, mut j) = (0usize, 0usize);
    while j < new.len() {
        if new[j] == 1 {
            j += 1;
            continue;
        }
        let (i0, j0) = (i, j);
        let (mut po, mut pn) = (old.get(i)?.0, new[j]);
        i += 1;
        j += 1;
        while po != pn {
            if po < pn {
                po *= old.get(i)?.0;
                i += 1;
            } else {
                pn *= *new.get(j)?;
                j += 1;
            }
        }
        for k in i0..i - 1 {
            if old[k].1 != old[k + 1].1 * old[k + 1].0 as i64 {
                return None;
            }
        }
        let mut st = old[i - 1].1;
        for jj in (j0..j).rev() {
            out[jj] = st;
            st *= new[jj] as i64;
        }
    }
    (i == old.len()).then_some(out)
}

/// For a reshape that is not a view of `t`: an order of `t`'s axes in which it is (each run of
/// axes that merges or splits kept together and in order), with the run holding `t`'s innermost
/// axis last and the others in logical order, so a channels-last tensor stays channels-last.
fn reshape_order(t: &DevTensor, new: &[usize]) -> Option<Vec<usize>> {
    let axes: Vec<usize> = (0..t.shape.len()).filter(|&k| t.shape[k] != 1).collect();
    let new: Vec<usize> = new.iter().copied().filter(|&d| d != 1).collect();
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let (mut i, mut j) = (0usize, 0usize);
    while j < new.len() {
        let mut g = vec![*axes.get(i)?];
        let (mut po, mut pn) = (t.shape[axes[i]], new[j]);
        i += 1;
        j += 1;
        while po != pn {
            if po < pn {
                g.push(*axes.get(i)?);
                po *= t.shape[axes[i]];
                i += 1;
            } else {
                pn *= *new.get(j)?;
                j += 1;
            }
        }
        groups.push(g);
    }
    if i != axes.len() {
        return None;
    }
    let inner = axes.iter().copied().min_by_key(|&k| t.strides[k].abs());
    if let Some(p) = groups
        .iter()
        .position(|g| inner.is_some_and(|a| g.contains(&a)))
    {
        let g = groups.remove(p);
        groups.push(g);
    }
    let mut order: Vec<usize> = (0..t.shape.len()).filter(|&k| t.shape[k] == 1).collect();
    order.extend(groups.into_iter().flatten());
    Some(order)
}

/// `v` (row-major `dims`) with its axes permuted as ONNX `Transpose(perm)` does.
pub fn permute<T: Copy>(v: &[T], dims: &[usize], perm: &[usize]) -> Vec<T> {
    let own = contiguous_strides(dims);
    let out_dims: Vec<usize> = perm.iter().map(|&a| dims[a]).collect();
    let n: usize = dims.iter().product();
    let mut out = Vec::with_capacity(n);
    let mut idx = vec![0usize; dims.len()];
    for _ in 0..n {
        let src: i64 = idx.iter().zip(perm).map(|(&i, &a)| i as i64 * own[a]).sum();
        out.push(v[src as usize]);
        for k in (0..idx.len()).rev() {
            idx[k] += 1;
            if idx[k] < out_dims[k] {
                break;
            }
            idx[k] = 0;
        }
    }
    out
}

#[derive(Debug, Clone)]
enum Value {
    Host(Arc<HostTensor>),
    Dev(DevTensor),
}

/// What a buffer holds.
#[derive(Debug, Clone, PartialEq)]
pub enum BufferKind {
    /// Written and read by steps; placed in the arena by lifetime.
    Activation,
    /// A graph input, written before the first step.
    Input(String),
    /// A weight: an initializer by name, or a constant computed on the host.
    Weight(WeightSource),
}

#[derive(Debug, Clone, PartialEq)]
pub enum WeightSource {
    Initializer(String),
    /// An initializer (row-major `dims`) with its axes permuted as `Transpose(perm)`: the
    /// `[O, kh, kw, I]` kernels of channels-last convolutions. Permuted on the host at upload.
    Permuted {
        name: String,
        dims: Vec<usize>,
        perm: Vec<usize>,
    },
    Computed(Arc<Vec<f32>>),
    ComputedI64(Arc<Vec<i64>>),
    /// Initializers stacked along their first axis (the Q, K and V projections of one attention
    /// as one GEMM's `[3C, K]` weight). Stacked on the host at upload.
    Concat(Vec<String>),
    /// Initializers of one shape added elementwise (a GEMM's bias and the bias of the
    /// convolution whose output it takes as its residual). Added on the host at upload.
    Sum(Vec<String>),
}

/// The values of a [`WeightSource::Sum`]: each part (by name, through `part`) added elementwise;
/// a part of another length than `numel` is an error naming it.
pub(crate) fn sum_parts(
    names: &[String],
    numel: usize,
    part: &mut dyn FnMut(&str) -> Result<Vec<f32>, EngineError>,
) -> Result<Vec<f32>, EngineError> {
    let mut v = vec![0f32; numel];
    for n in names {
        let w = part(n)?;
        if w.len() != numel {
            return Err(err(format!(
                "weight {n}: {} values, the sum {names:?} needs {numel}",
                w.len()
            )));
        }
        v.iter_mut().zip(&w).for_each(|(a, b)| *a += b);
    }
    Ok(v)
}

/// How the compiler lays out 4-D activations around convolutions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// Row-major `[N, C, H, W]` everywhere (cuDNN's NCHW convolutions; transposes to and from
    /// token layouts are copies).
    Nchw,
    /// Channels-last: convolutions read and write `[N, H, W, C]` (cuDNN's NHWC tensor-core
    /// kernels; 1×1 convolutions become GEMMs), GroupNorm and elementwise steps keep that
    /// layout, and the transposes between it and `[N, H·W, C]` tokens are free views.
    #[default]
    Nhwc,
}

impl Layout {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "nchw" => Some(Self::Nchw),
            "nhwc" => Some(Self::Nhwc),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Buffer {
    pub numel: usize,
    pub dtype: DType,
    pub kind: BufferKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinaryOp {
    Add = 0,
    Sub = 1,
    Mul = 2,
    Div = 3,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnaryOp {
    Sigmoid = 0,
    Sin = 1,
    Cos = 2,
    Silu = 3,
    Neg = 4,
}

/// One device operation. Buffers are indices into [`Program::buffers`]; element offsets are in
/// elements of the buffer's type.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    Copy {
        out: usize,
        inp: usize,
        s: Strided,
        in_off: i64,
        out_off: i64,
    },
    Binary {
        out: usize,
        a: usize,
        b: usize,
        op: BinaryOp,
        /// `None` when both operands have the output's shape.
        s: Option<Strided>,
        n: usize,
    },
    Unary {
        out: usize,
        inp: usize,
        op: UnaryOp,
        n: usize,
    },
    /// `out[..n] = value` (the border of a padded copy).
    Fill {
        out: usize,
        n: usize,
        value: f32,
    },
    /// `out[m, n] = x[m, k] · w[n, k]ᵀ + bias[n] + residual[m, n]`.
    Linear {
        out: usize,
        x: usize,
        w: usize,
        bias: Option<usize>,
        residual: Option<usize>,
        m: usize,
        n: usize,
        k: usize,
    },
    /// `out[i] = alpha · a[i] · b[i]` for `batch` row-major `[m, k]·[k, n]` products (`b[i]`
    /// stored as `[n, k]` and read transposed when `trans_b`); `b_stride` 0 broadcasts `b`.
    MatMul {
        out: usize,
        a: usize,
        b: usize,
        batch: usize,
        m: usize,
        n: usize,
        k: usize,
        b_stride: usize,
        trans_b: bool,
        alpha: f32,
    },
    Conv(ConvStep),
    GroupNorm {
        out: usize,
        x: usize,
        gamma: usize,
        beta: usize,
        n: usize,
        c: usize,
        spatial: usize,
        groups: usize,
        eps: f32,
        silu: bool,
        /// `x` and `out` are stored `[n, spatial, c]` (channels-last) instead of `[n, c, spatial]`.
        channels_last: bool,
        /// Channels-last only: a bias `[c]` and a per-sample bias `[n, c]` added to `x` first
        /// (the bias and time embedding of the convolution before, folded by
        /// [`super::launch::fold_conv_biases`]).
        x_bias: Option<usize>,
        x_sbias: Option<usize>,
    },
    /// Row-wise LayerNorm; `add: Some((t, period, div))` then adds row `(r / div) % period` of
    /// `t` (`[period, cols]`: the motion modules' positional table, folded from the `Add` after
    /// it; `div` > 1 in frame-major rows).
    LayerNorm {
        out: usize,
        x: usize,
        gamma: usize,
        beta: Option<usize>,
        /// A table added to the output: `(buffer, period, div)`, row `(r / div) % period` of
        /// the table to output row `r`.
        add: Option<(usize, usize, usize)>,
        rows: usize,
        cols: usize,
        eps: f32,
    },
    Softmax {
        out: usize,
        x: usize,
        rows: usize,
        cols: usize,
    },
    /// `out[r, j] = (x[r, j] + bias[j]) · gelu(x[r, d + j] + bias[d + j])`.
    Geglu {
        out: usize,
        x: usize,
        bias: Option<usize>,
        rows: usize,
        d: usize,
    },
    Gather {
        out: usize,
        table: usize,
        ids: usize,
        n_ids: usize,
        row: usize,
        n_rows: usize,
    },
    /// `out [n, l, heads·d]` from Q, K, V rows of `heads·d` values: row `r` of Q at element
    /// `offs[0] + r·ld[0]` of buffer `q` (K, V likewise), so Q, K and V may be column blocks of
    /// one projection's output.
    Attention {
        out: usize,
        q: usize,
        k: usize,
        v: usize,
        bias: Option<(usize, usize)>,
        n: usize,
        l: usize,
        s: usize,
        heads: usize,
        d: usize,
        scale: f32,
        ld: [usize; 3],
        offs: [usize; 3],
        /// Sequences interleaved: sequence `i`'s token `t` is row `(i / ns)·T·ns + i % ns + t·ns`
        /// of Q and the output (T = l) and of K and V (T = s); 1: one sequence after another.
        /// (Frame-major motion modules, [`super::launch::frame_major`], only.)
        ns: usize,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct ConvStep {
    pub out: usize,
    pub x: usize,
    pub w: usize,
    pub bias: Option<usize>,
    pub residual: Option<usize>,
    /// `[N, C, H, W]`
    pub x_shape: [usize; 4],
    /// `[O, C/group, kh, kw]`
    pub w_shape: [usize; 4],
    pub y_shape: [usize; 4],
    pub pads: [usize; 4],
    pub strides: [usize; 2],
    pub dilations: [usize; 2],
    pub group: usize,
    /// `[N, O]` added per sample and channel (a ResNet's time embedding, folded from the `Add`
    /// after the convolution; channels-last only).
    pub sample_bias: Option<usize>,
    /// `x`, `out` and `residual` are stored `[N, H, W, C]` and `w` as `[O, kh, kw, C/group]`
    /// (shapes above stay in NCHW order).
    pub nhwc: bool,
}

impl ConvStep {
    /// A key naming the problem (for the tactic cache).
    pub fn problem(&self) -> String {
        format!(
            "conv x{:?} w{:?} pad{:?} s{:?} d{:?} g{}{}",
            self.x_shape,
            self.w_shape,
            self.pads,
            self.strides,
            self.dilations,
            self.group,
            if self.nhwc { " nhwc" } else { "" }
        )
    }
}

impl Step {
    /// `(buffers read, buffer written)`.
    pub fn io(&self) -> (Vec<usize>, usize) {
        match self {
            Step::Copy { out, inp, .. } => (vec![*inp, *out], *out),
            Step::Binary { out, a, b, .. } => (vec![*a, *b], *out),
            Step::Unary { out, inp, .. } => (vec![*inp], *out),
            Step::Fill { out, .. } => (vec![], *out),
            Step::Linear {
                out,
                x,
                w,
                bias,
                residual,
                ..
            } => {
                let mut r = vec![*x, *w];
                r.extend(bias.iter().chain(residual.iter()));
                (r, *out)
            }
            Step::MatMul { out, a, b, .. } => (vec![*a, *b], *out),
            Step::Conv(c) => {
                let mut r = vec![c.x, c.w];
                r.extend(c.bias.iter().chain(c.residual.iter()));
                r.extend(c.sample_bias.iter());
                (r, c.out)
            }
            Step::GroupNorm {
                out,
                x,
                gamma,
                beta,
                x_bias,
                x_sbias,
                ..
            } => {
                let mut r = vec![*x, *gamma, *beta];
                r.extend(x_bias.iter().chain(x_sbias.iter()));
                (r, *out)
            }
            Step::LayerNorm {
                out,
                x,
                gamma,
                beta,
                add,
                ..
            } => {
                let mut r = vec![*x, *gamma];
                r.extend(beta.iter());
                r.extend(add.iter().map(|a| a.0));
                (r, *out)
            }
            Step::Softmax { out, x, .. } => (vec![*x], *out),
            Step::Geglu { out, x, bias, .. } => {
                let mut r = vec![*x];
                r.extend(bias.iter());
                (r, *out)
            }
            Step::Gather {
                out, table, ids, ..
            } => (vec![*table, *ids], *out),
            Step::Attention {
                out, q, k, v, bias, ..
            } => {
                let mut r = vec![*q, *k, *v];
                r.extend(bias.iter().map(|b| b.0));
                (r, *out)
            }
        }
    }

    /// Read buffer `to` wherever this step reads `from` (a copy's destination, which it also
    /// reads, is left as it is).
    pub fn rename_read(&mut self, from: usize, to: usize) {
        let r = |b: &mut usize| {
            if *b == from {
                *b = to;
            }
        };
        let o = |b: &mut Option<usize>| {
            if *b == Some(from) {
                *b = Some(to);
            }
        };
        match self {
            Step::Copy { inp, .. } | Step::Unary { inp, .. } => r(inp),
            Step::Binary { a, b, .. } | Step::MatMul { a, b, .. } => {
                r(a);
                r(b);
            }
            Step::Fill { .. } => {}
            Step::Linear {
                x,
                w,
                bias,
                residual,
                ..
            } => {
                r(x);
                r(w);
                o(bias);
                o(residual);
            }
            Step::Conv(c) => {
                r(&mut c.x);
                r(&mut c.w);
                o(&mut c.bias);
                o(&mut c.residual);
                o(&mut c.sample_bias);
            }
            Step::GroupNorm {
                x,
                gamma,
                beta,
                x_bias,
                x_sbias,
                ..
            } => {
                r(x);
                r(gamma);
                r(beta);
                o(x_bias);
                o(x_sbias);
            }
            Step::LayerNorm {
                x,
                gamma,
                beta,
                add,
                ..
            } => {
                r(x);
                r(gamma);
                o(beta);
                if let Some((t, _, _)) = add {
                    r(t);
                }
            }
            Step::Softmax { x, .. } => r(x),
            Step::Geglu { x, bias, .. } => {
                r(x);
                o(bias);
            }
            Step::Gather { table, ids, .. } => {
                r(table);
                r(ids);
            }
            Step::Attention { q, k, v, bias, .. } => {
                r(q);
                r(k);
                r(v);
                if let Some((b, _)) = bias {
                    r(b);
                }
            }
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Step::Copy { .. } => "copy",
            Step::Binary { .. } => "binary",
            Step::Unary { .. } => "unary",
            Step::Fill { .. } => "fill",
            Step::Linear { .. } => "linear",
            Step::MatMul { .. } => "matmul",
            Step::Conv(_) => "conv",
            Step::GroupNorm { .. } => "group_norm",
            Step::LayerNorm { .. } => "layer_norm",
            Step::Softmax { .. } => "softmax",
            Step::Geglu { .. } => "geglu",
            Step::Gather { .. } => "gather",
            Step::Attention { .. } => "attention",
        }
    }
}

/// Head sizes the fused attention kernels are built for, rounded up to a multiple of 16
/// (`ATT_ENTRIES` in kernels/cuda/engine_ops.cu).
pub const ATTENTION_PADDED_HEADS: [usize; 8] = [16, 32, 48, 64, 80, 96, 128, 160];

/// Whether the CUDA executor's fused attention kernels take heads of size `d` (16-byte rows, a
/// padded size they are built for); other attention is compiled to GEMMs and a softmax.
pub fn fused_attention_head(d: usize) -> bool {
    d % 8 == 0 && ATTENTION_PADDED_HEADS.contains(&d.div_ceil(16).max(1).saturating_mul(16))
}

/// Whether the fused attention kernels take the softmax scale `scale`: they take the running
/// max of the unscaled scores (engine_ops.cu, `att_step`), which is the scaled max only for a
/// positive scale. Other scales are compiled to GEMMs and a softmax.
pub fn fused_attention_scale(scale: f32) -> bool {
    scale > 0.0 && scale.is_finite()
}

/// A graph compiled for concrete input shapes.
#[derive(Debug, Clone)]
pub struct Program {
    pub buffers: Vec<Buffer>,
    pub steps: Vec<Step>,
    /// Graph inputs: name and buffer (in graph order).
    pub inputs: Vec<(String, DevTensor)>,
    /// Inputs whose buffer holds a function of the given values, computed on the host in
    /// float32 by the executors before upload ([`Program::host_input`]).
    pub input_transforms: Vec<(String, Sinusoid)>,
    /// Graph outputs: name and tensor.
    pub outputs: Vec<(String, DevTensor)>,
    /// Nodes of the source graph, for reports.
    pub nodes: usize,
}

/// The sinusoidal timestep embedding `concat(cos(t·f), sin(t·f))` (or sin first) of a `[B]`
/// input, row by row: `[B, 2·freqs]`. The UNet computes it in float32 (diffusers, and the
/// exported graph); in a float16 engine the product `t·f` would round to 0.5 near t = 1000 (a
/// quarter radian of phase), so the engine takes it from the host, in float32, as the rest of
/// the graph takes its inputs (cast to the engine's type on upload).
#[derive(Debug, Clone, PartialEq)]
pub struct Sinusoid {
    pub freqs: Vec<f32>,
    pub cos_first: bool,
}

impl Sinusoid {
    /// Float32 as ONNX Runtime computes the graph: the product rounded to float32, then its
    /// sine and cosine.
    pub fn apply(&self, t: &[f32]) -> Vec<f32> {
        let mut out = Vec::with_capacity(t.len() * 2 * self.freqs.len());
        for &ti in t {
            let a = || self.freqs.iter().map(move |&f| (ti * f) as f64);
            let (sin, cos) = (a().map(|x| x.sin() as f32), a().map(|x| x.cos() as f32));
            if self.cos_first {
                out.extend(cos);
                out.extend(sin);
            } else {
                out.extend(sin);
                out.extend(cos);
            }
        }
        out
    }
}

/// Most elements a tensor of a CUDA engine may hold: cuDNN's legacy API takes a tensor's
/// dimensions and strides as 32-bit `int`s (PyTorch splits a convolution along its batch past
/// this), and motionrt's kernels count a tensor's rows, pixels and channels in 32-bit integers.
pub const MAX_TENSOR_ELEMENTS: usize = i32::MAX as usize;

impl Program {
    /// The activation buffer (not a weight or an input) with the most elements: `(buffer,
    /// elements)`.
    pub fn largest_activation(&self) -> Option<(usize, usize)> {
        self.buffers
            .iter()
            .enumerate()
            .filter(|(_, b)| matches!(b.kind, BufferKind::Activation))
            .map(|(i, b)| (i, b.numel))
            .max_by_key(|&(i, n)| (n, std::cmp::Reverse(i)))
    }

    /// An error naming the first tensor of more than [`MAX_TENSOR_ELEMENTS`] elements — an
    /// input, a weight, or the output of the step that writes it — which a CUDA engine cannot
    /// run; `Ok` when there is none.
    pub fn check_tensor_sizes(&self) -> Result<(), EngineError> {
        let Some((i, b)) = self
            .buffers
            .iter()
            .enumerate()
            .find(|(_, b)| b.numel > MAX_TENSOR_ELEMENTS)
        else {
            return Ok(());
        };
        let what = match &b.kind {
            BufferKind::Input(name) => format!("input `{name}`"),
            BufferKind::Weight(WeightSource::Initializer(name))
            | BufferKind::Weight(WeightSource::Permuted { name, .. }) => format!("weight `{name}`"),
            BufferKind::Weight(_) => format!("a computed weight (buffer {i})"),
            BufferKind::Activation => match self.steps.iter().position(|s| s.io().1 == i) {
                Some(k) => format!(
                    "the output of step {k} ({})",
                    super::localize::label(&self.steps[k])
                ),
                None => format!("activation buffer {i}"),
            },
        };
        Err(err(format!(
            "{what} holds {} elements, more than the {MAX_TENSOR_ELEMENTS} (2^31 - 1) a CUDA \
             engine's tensors may hold (cuDNN and motionrt's kernels count elements in 32-bit \
             integers): run fewer frames per call or a smaller resolution",
            b.numel
        )))
    }

    /// The values to upload into input `name`'s buffer for the given `values`: transformed on
    /// the host where the program says so, else as they are.
    pub fn host_input<'a>(&self, name: &str, values: &'a [f32]) -> std::borrow::Cow<'a, [f32]> {
        match self.input_transforms.iter().find(|(n, _)| n == name) {
            Some((_, s)) => std::borrow::Cow::Owned(s.apply(values)),
            None => std::borrow::Cow::Borrowed(values),
        }
    }
}

/// The timestep embedding's nodes, if the graph computes it from one `[B]` input exactly as the
/// exporter writes it: `Unsqueeze(t, [1])`, `Mul` by a `[1, half]` (or `[half]`) constant, `Sin`
/// and `Cos` of the product, `Concat` of the two on axis 1, with no other use of the input or
/// of the intermediate values. Returns the input, the Concat's output, the transform and the
/// nodes it replaces.
fn find_sinusoid(
    g: &motionrt_onnx::proto::GraphProto,
    p: &mut Planner<'_>,
    input_shapes: &[(&str, Vec<usize>)],
) -> Option<(String, String, Sinusoid, Vec<usize>)> {
    let mut users: HashMap<&str, Vec<usize>> = HashMap::new();
    for (k, n) in g.node.iter().enumerate() {
        for i in &n.input {
            users.entry(i.as_str()).or_default().push(k);
        }
    }
    let outputs: Vec<&str> = g.output.iter().map(|o| o.name.as_str()).collect();
    // the single node using `name` (which is no graph output), of type `op`
    let only = |name: &str, op: &str| -> Option<usize> {
        match users.get(name).map(Vec::as_slice) {
            Some([k]) if g.node[*k].op_type == op && !outputs.contains(&name) => Some(*k),
            _ => None,
        }
    };
    for i in &g.input {
        let rank1 = input_shapes
            .iter()
            .any(|(n, s)| *n == i.name && s.len() == 1);
        if !rank1 || p.inits.contains_key(i.name.as_str()) {
            continue;
        }
        let Some(ku) = only(&i.name, "Unsqueeze") else {
            continue;
        };
        let u = &g.node[ku];
        // constants are initializers here (the exporter's); a value from a node is no match
        let host = |p: &mut Planner<'_>, name: Option<&String>| match name {
            Some(n) if p.inits.contains_key(n.as_str()) => match p.value(n) {
                Ok(Some(Value::Host(h))) => Some(h),
                _ => None,
            },
            _ => None,
        };
        let axes = match attr_ints(u, "axes") {
            Some(a) => a,
            None => match host(p, u.input.get(1)).as_deref() {
                Some(HostTensor {
                    data: HostData::I64(a),
                    ..
                }) => a.clone(),
                _ => continue,
            },
        };
        if axes != [1] && axes != [-1] {
            continue;
        }
        let Some(km) = only(&u.output[0], "Mul") else {
            continue;
        };
        let m = &g.node[km];
        let other = if m.input[0] == u.output[0] {
            &m.input[1]
        } else {
            &m.input[0]
        };
        let freqs = match host(p, Some(other)).as_deref() {
            Some(HostTensor {
                data: HostData::F32(f),
                shape,
            }) if matches!(shape.as_slice(), [1, n] | [n] if *n == f.len()) => f.clone(),
            _ => continue,
        };
        let mo = &m.output[0];
        let (ks, kc) = match users.get(mo.as_str()).map(Vec::as_slice) {
            Some([a, b]) if !outputs.contains(&mo.as_str()) => {
                match (g.node[*a].op_type.as_str(), g.node[*b].op_type.as_str()) {
                    ("Sin", "Cos") => (*a, *b),
                    ("Cos", "Sin") => (*b, *a),
                    _ => continue,
                }
            }
            _ => continue,
        };
        let (so, co) = (&g.node[ks].output[0], &g.node[kc].output[0]);
        let (Some(kk), Some(kk2)) = (only(so, "Concat"), only(co, "Concat")) else {
            continue;
        };
        let k = &g.node[kk];
        if kk != kk2 || k.input.len() != 2 || !matches!(attr_i(k, "axis", 0), 1 | -1) {
            continue;
        }
        let cos_first = k.input[0] == *co;
        return Some((
            i.name.clone(),
            k.output[0].clone(),
            Sinusoid { freqs, cos_first },
            vec![ku, km, ks, kc, kk],
        ));
    }
    None
}

/// Reads initializers' values (the planner needs int64 shape constants and the float tables it
/// slices on the host).
pub trait InitializerSource {
    fn f32s(&self, t: &TensorProto) -> Result<Vec<f32>, EngineError>;
    fn i64s(&self, t: &TensorProto) -> Result<Vec<i64>, EngineError>;
}

/// How many float32 values initializer `t` stores (its `float_data`, its `raw_data`, or the
/// `length` of its external data), without reading them; `None` where the graph does not say:
/// a stripped engine graph's large weights hold no data (they are in `weights.safetensors`,
/// whose shapes the engine checks when it loads them).
fn stored_f32_count(t: &TensorProto) -> Option<usize> {
    if !t.float_data.is_empty() {
        return Some(t.float_data.len());
    }
    if t.data_location == motionrt_onnx::proto::DataLocation::External as i32 {
        let length = t.external_data.iter().find(|e| e.key == "length")?;
        return length.value.parse::<usize>().ok().map(|b| b / 4);
    }
    (!t.raw_data.is_empty()).then_some(t.raw_data.len() / 4)
}

fn attr<'n>(n: &'n NodeProto, name: &str) -> Option<&'n AttributeProto> {
    n.attribute.iter().find(|a| a.name == name)
}
fn attr_i(n: &NodeProto, name: &str, default: i64) -> i64 {
    attr(n, name).map_or(default, |a| a.i)
}
fn attr_f(n: &NodeProto, name: &str, default: f32) -> f32 {
    attr(n, name).map_or(default, |a| a.f)
}
fn attr_ints(n: &NodeProto, name: &str) -> Option<Vec<i64>> {
    attr(n, name).map(|a| a.ints.clone())
}
fn attr_s(n: &NodeProto, name: &str) -> Option<String> {
    attr(n, name).map(|a| String::from_utf8_lossy(&a.s).into_owned())
}

/// `what` of node `n` holds `want` values (a bias, a scale: one per channel).
fn expect_numel(
    n: &NodeProto,
    what: &str,
    shape: &[usize],
    want: usize,
) -> Result<(), EngineError> {
    let got: usize = shape.iter().product();
    if got != want {
        return Err(err(format!(
            "{} {}: {what} {shape:?} holds {got} values; {want} expected",
            n.op_type, n.name
        )));
    }
    Ok(())
}

/// `what` of node `n` has rank `rank`.
fn expect_rank(n: &NodeProto, what: &str, shape: &[usize], rank: usize) -> Result<(), EngineError> {
    if shape.len() != rank {
        return Err(err(format!(
            "{} {}: {what} {shape:?} is not {rank}-D",
            n.op_type, n.name
        )));
    }
    Ok(())
}

/// Integer attribute list `name` of `n`, `len` long, each at least `min` and at most 65536
/// (`default` if absent).
fn attr_ints_checked(
    n: &NodeProto,
    name: &str,
    len: usize,
    min: i64,
    default: i64,
) -> Result<Vec<usize>, EngineError> {
    let v = attr_ints(n, name).unwrap_or_else(|| vec![default; len]);
    if v.len() != len || v.iter().any(|&x| x < min || x > 1 << 16) {
        return Err(err(format!(
            "{} {}: {name} {v:?}: {len} values, each from {min} to 65536, expected",
            n.op_type, n.name
        )));
    }
    Ok(v.into_iter().map(|x| x as usize).collect())
}

fn norm_axis(axis: i64, rank: usize) -> Result<usize, EngineError> {
    let a = if axis < 0 { axis + rank as i64 } else { axis };
    if a < 0 || a as usize >= rank.max(1) {
        return Err(err(format!("axis {axis} out of range for rank {rank}")));
    }
    Ok(a as usize)
}

struct Planner<'a> {
    values: HashMap<String, Value>,
    buffers: Vec<Buffer>,
    steps: Vec<Step>,
    /// Which step wrote a buffer (for epilogue fusion).
    writer: HashMap<usize, usize>,
    /// How many nodes read each value name.
    readers: HashMap<String, usize>,
    /// Outputs of convolutions and GEMMs by buffer, with their value name (for epilogue fusion:
    /// a residual Add, a projection's bias moved into GEGLU).
    gemm_out: HashMap<usize, String>,
    /// Weights already uploaded, by initializer name.
    weight_bufs: HashMap<String, usize>,
    inits: HashMap<&'a str, &'a TensorProto>,
    src: &'a dyn InitializerSource,
    layout: Layout,
}

impl Planner<'_> {
    fn new_buf(&mut self, numel: usize, dtype: DType, kind: BufferKind) -> usize {
        self.buffers.push(Buffer { numel, dtype, kind });
        self.buffers.len() - 1
    }

    fn activation(&mut self, shape: Vec<usize>) -> DevTensor {
        let n = shape.iter().product();
        DevTensor::new(self.new_buf(n, DType::Float, BufferKind::Activation), shape)
    }

    /// A new activation laid out densely with its axes in `order` (outermost first).
    fn activation_in(&mut self, shape: Vec<usize>, order: &[usize]) -> DevTensor {
        let n = shape.iter().product();
        let buf = self.new_buf(n, DType::Float, BufferKind::Activation);
        let strides = dense_strides(&shape, order);
        DevTensor {
            buf,
            shape,
            strides,
        }
    }

    /// `t` laid out densely in `order`: `t` itself when it is, else a copy.
    fn in_order(&mut self, t: DevTensor, order: &[usize]) -> Result<DevTensor, EngineError> {
        if t.is_dense_in(order) {
            return Ok(t);
        }
        let out = self.activation_in(t.shape.clone(), order);
        // int64 tensors (token ids) stay int64
        self.buffers[out.buf].dtype = self.buffers[t.buf].dtype;
        self.copy(&out, &t, &t.shape, &t.strides, &out.strides, 0, 0)?;
        Ok(out)
    }

    /// `t` in row-major order (a copy only for a strided view).
    fn contiguous(&mut self, t: DevTensor) -> Result<DevTensor, EngineError> {
        let order: Vec<usize> = (0..t.shape.len()).collect();
        self.in_order(t, &order)
    }

    /// `t` read as `shape`: a view when the strides allow it, else a copy into the layout that
    /// keeps the innermost axis innermost and makes the reshape a view.
    fn reshape(&mut self, t: DevTensor, shape: Vec<usize>) -> Result<DevTensor, EngineError> {
        if let Some(strides) = reshape_strides(&t.shape, &t.strides, &shape) {
            return Ok(DevTensor {
                buf: t.buf,
                shape,
                strides,
            });
        }
        let order = reshape_order(&t, &shape)
            .ok_or_else(|| err(format!("cannot reshape {:?} to {shape:?}", t.shape)))?;
        let m = self.in_order(t, &order)?;
        let strides = reshape_strides(&m.shape, &m.strides, &shape).ok_or_else(|| {
            err(format!(
                "internal: reshape {:?} to {shape:?} after a copy",
                m.shape
            ))
        })?;
        Ok(DevTensor {
            buf: m.buf,
            shape,
            strides,
        })
    }

    fn push(&mut self, s: Step) {
        let out = s.io().1;
        self.writer.insert(out, self.steps.len());
        self.steps.push(s);
    }

    fn value(&mut self, name: &str) -> Result<Option<Value>, EngineError> {
        if name.is_empty() {
            return Ok(None);
        }
        if let Some(v) = self.values.get(name) {
            return Ok(Some(v.clone()));
        }
        if let Some(t) = self.inits.get(name).copied() {
            let shape: Vec<usize> = t
                .dims
                .iter()
                .map(|&d| usize::try_from(d).ok())
                .collect::<Option<_>>()
                .ok_or_else(|| err(format!("initializer {name}: dims {:?}", t.dims)))?;
            let numel = shape
                .iter()
                .try_fold(1usize, |n, &d| n.checked_mul(d))
                .ok_or_else(|| err(format!("initializer {name}: dims {:?} overflow", t.dims)))?;
            let dt = TensorProtoDataType::try_from(t.data_type).ok();
            let data = match dt {
                Some(TensorProtoDataType::Int64) => HostData::I64(self.src.i64s(t)?),
                Some(TensorProtoDataType::Float) => {
                    // large float weights stay by name; the executor reads them at upload
                    if numel > 4096 {
                        // what the file holds must match the dims (the upload reads the data)
                        if let Some(stored) = stored_f32_count(t) {
                            if stored != numel {
                                return Err(err(format!(
                                    "initializer {name}: {stored} values stored for dims {:?} ({numel} expected)",
                                    t.dims
                                )));
                            }
                        }
                        let buf = self.weight(name, numel);
                        let v = Value::Dev(DevTensor::new(buf, shape));
                        self.values.insert(name.into(), v.clone());
                        return Ok(Some(v));
                    }
                    HostData::F32(self.src.f32s(t)?)
                }
                _ => {
                    return Err(err(format!(
                        "initializer {name}: data type {} is not supported by the engine",
                        t.data_type
                    )))
                }
            };
            let len = match &data {
                HostData::F32(v) => v.len(),
                HostData::I64(v) => v.len(),
            };
            if len != numel {
                return Err(err(format!(
                    "initializer {name}: {len} values for dims {:?} ({numel} expected)",
                    t.dims
                )));
            }
            let v = Value::Host(Arc::new(HostTensor { shape, data }));
            self.values.insert(name.into(), v.clone());
            return Ok(Some(v));
        }
        Err(err(format!("value {name:?} is used before it is defined")))
    }

    fn weight(&mut self, name: &str, numel: usize) -> usize {
        if let Some(&b) = self.weight_bufs.get(name) {
            return b;
        }
        let b = self.new_buf(
            numel,
            DType::Float,
            BufferKind::Weight(WeightSource::Initializer(name.into())),
        );
        self.weight_bufs.insert(name.into(), b);
        b
    }

    /// A device view of a value: host float constants become computed weights.
    /// Fold `main + other` into the step that wrote `main` when this node is `main`'s only reader
    /// and `other` is a broadcast that step's epilogue adds: a `[period, C]` table onto a
    /// LayerNorm's rows (`r % period`), or a `[N, C, 1, 1]` per-sample bias onto a channels-last
    /// convolution. Returns `main`, now holding the sum.
    fn fold_broadcast_add(
        &mut self,
        n: &NodeProto,
        da: &DevTensor,
        db: &DevTensor,
        out_shape: &[usize],
    ) -> Option<DevTensor> {
        for (main, other) in [(da, db), (db, da)] {
            if main.shape != out_shape || !other.is_contiguous() {
                continue;
            }
            let sole = self.gemm_out.get(&main.buf).is_some_and(|name| {
                n.input.contains(name) && self.readers.get(name).copied() == Some(1)
            });
            let Some(&si) = self.writer.get(&main.buf).filter(|_| sole) else {
                continue;
            };
            let os: Vec<usize> = other
                .shape
                .iter()
                .copied()
                .skip_while(|&d| d == 1)
                .collect();
            let r = out_shape.len();
            let folds = match &self.steps[si] {
                Step::LayerNorm { out, add, cols, .. } => {
                    *out == main.buf
                        && add.is_none()
                        && os.len() == 2
                        && os[1] == *cols
                        && r >= 2
                        && out_shape[r - 2] == os[0]
                }
                Step::Conv(c) => {
                    c.nhwc
                        && c.out == main.buf
                        && c.sample_bias.is_none()
                        && other.shape == [c.y_shape[0], c.y_shape[1], 1, 1]
                }
                _ => false,
            };
            if !folds {
                continue;
            }
            // `other` must exist when that step runs: computed after it (a ResNet's time
            // embedding is projected after its first convolution), the step moves to the end —
            // its inputs are still there (buffers are written once) and only this node reads it
            let si = if self.writer.get(&other.buf).is_some_and(|&w| w > si) {
                let st = self.steps.remove(si);
                for w in self.writer.values_mut() {
                    if *w > si {
                        *w -= 1;
                    }
                }
                self.writer.insert(main.buf, self.steps.len());
                self.steps.push(st);
                self.steps.len() - 1
            } else {
                si
            };
            match &mut self.steps[si] {
                Step::LayerNorm { add, .. } => *add = Some((other.buf, os[0], 1)),
                Step::Conv(c) => c.sample_bias = Some(other.buf),
                _ => unreachable!("checked above"),
            }
            return Some(main.clone());
        }
        None
    }

    /// A weight with its axes permuted (`Transpose(perm)`), contiguous: an initializer is
    /// permuted on the host at upload, a host constant here, anything else by a device copy.
    fn permuted_weight(&mut self, v: Value, perm: &[usize]) -> Result<DevTensor, EngineError> {
        let shape = Self::shape_of(&v);
        let out_shape: Vec<usize> = perm.iter().map(|&a| shape[a]).collect();
        match v {
            Value::Host(h) => {
                let HostData::F32(data) = &h.data else {
                    return Err(err("a float weight was expected"));
                };
                let buf = self.new_buf(
                    data.len(),
                    DType::Float,
                    BufferKind::Weight(WeightSource::Computed(Arc::new(permute(
                        data, &shape, perm,
                    )))),
                );
                Ok(DevTensor::new(buf, out_shape))
            }
            Value::Dev(d) => {
                if let BufferKind::Weight(WeightSource::Initializer(name)) =
                    &self.buffers[d.buf].kind
                {
                    if d.is_contiguous() {
                        let key = format!("{name} as {shape:?} permuted {perm:?}");
                        if let Some(&b) = self.weight_bufs.get(&key) {
                            return Ok(DevTensor::new(b, out_shape));
                        }
                        let src = WeightSource::Permuted {
                            name: name.clone(),
                            dims: shape.clone(),
                            perm: perm.to_vec(),
                        };
                        let b = self.new_buf(d.numel(), DType::Float, BufferKind::Weight(src));
                        self.weight_bufs.insert(key, b);
                        return Ok(DevTensor::new(b, out_shape));
                    }
                }
                let view = DevTensor {
                    buf: d.buf,
                    shape: out_shape,
                    strides: perm.iter().map(|&a| d.strides[a]).collect(),
                };
                self.contiguous(view)
            }
        }
    }

    /// A value on the device, contiguous.
    fn dev(&mut self, v: Value, what: &str) -> Result<DevTensor, EngineError> {
        let t = self.view(v, what)?;
        self.contiguous(t)
    }

    /// A value on the device as it is laid out (host constants are uploaded contiguous). Every
    /// operand is float data but a Gather's `ids`, which are int64: anything else is a graph
    /// whose types do not match (ONNX Runtime refuses it as well).
    fn view(&mut self, v: Value, what: &str) -> Result<DevTensor, EngineError> {
        let t = self.view_any(v)?;
        let int = self.buffers[t.buf].dtype == DType::I64;
        if int != (what == "ids") {
            return Err(err(format!(
                "operand {what} holds {} data; {} expected",
                if int { "int64" } else { "float" },
                if int { "float" } else { "int64" }
            )));
        }
        Ok(t)
    }

    fn view_any(&mut self, v: Value) -> Result<DevTensor, EngineError> {
        match v {
            Value::Dev(d) => Ok(d),
            Value::Host(h) => match &h.data {
                HostData::F32(data) => {
                    let buf = self.new_buf(
                        data.len(),
                        DType::Float,
                        BufferKind::Weight(WeightSource::Computed(Arc::new(data.clone()))),
                    );
                    Ok(DevTensor::new(buf, h.shape.clone()))
                }
                HostData::I64(data) => {
                    // int64 index constants (Gather ids) go up as computed int64 data
                    let buf = self.new_buf(
                        data.len(),
                        DType::I64,
                        BufferKind::Weight(WeightSource::ComputedI64(Arc::new(data.clone()))),
                    );
                    Ok(DevTensor::new(buf, h.shape.clone()))
                }
            },
        }
    }

    fn shape_of(v: &Value) -> Vec<usize> {
        match v {
            Value::Host(h) => h.shape.clone(),
            Value::Dev(d) => d.shape.clone(),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn copy(
        &mut self,
        out: &DevTensor,
        inp: &DevTensor,
        dims: &[usize],
        ins: &[i64],
        outs: &[i64],
        in_off: i64,
        out_off: i64,
    ) -> Result<(), EngineError> {
        let zeros = vec![0; dims.len()];
        let s = Strided::new(dims, ins, &zeros, outs)?;
        self.push(Step::Copy {
            out: out.buf,
            inp: inp.buf,
            s,
            in_off,
            out_off,
        });
        Ok(())
    }

    /// Attention as GEMMs, for head sizes the fused kernels do not take (the VAE's single
    /// 512-wide head): heads moved to the front (a copy, unless there is one head), scores
    /// `scale · Q Kᵀ` `[N·H, L, S]`, softmax in place, `P V`, heads moved back.
    fn attention_gemms(
        &mut self,
        q: &DevTensor,
        k: &DevTensor,
        v: &DevTensor,
        heads: usize,
        d: usize,
        scale: f32,
    ) -> Result<DevTensor, EngineError> {
        let (nq, l, c) = (q.shape[0], q.shape[1], q.shape[2]);
        let s = k.shape[1];
        let tokens_major = |rows: usize| vec![(rows * c) as i64, d as i64, c as i64, 1];
        let heads_first = |p: &mut Self, t: &DevTensor, rows: usize| {
            if heads == 1 {
                return Ok(t.clone());
            }
            let dims = [nq, heads, rows, d];
            let out = p.activation(dims.to_vec());
            p.copy(
                &out,
                t,
                &dims,
                &tokens_major(rows),
                &contiguous_strides(&dims),
                0,
                0,
            )?;
            Ok::<_, EngineError>(out)
        };
        let (qh, kh, vh) = (
            heads_first(self, q, l)?,
            heads_first(self, k, s)?,
            heads_first(self, v, s)?,
        );
        let batch = nq * heads;
        let scores = self.activation(vec![batch, l, s]);
        self.push(Step::MatMul {
            out: scores.buf,
            a: qh.buf,
            b: kh.buf,
            batch,
            m: l,
            n: s,
            k: d,
            b_stride: s * d,
            trans_b: true,
            alpha: scale,
        });
        self.push(Step::Softmax {
            out: scores.buf,
            x: scores.buf,
            rows: batch * l,
            cols: s,
        });
        let oh = self.activation(vec![batch, l, d]);
        self.push(Step::MatMul {
            out: oh.buf,
            a: scores.buf,
            b: vh.buf,
            batch,
            m: l,
            n: d,
            k: s,
            b_stride: s * d,
            trans_b: false,
            alpha: 1.0,
        });
        if heads == 1 {
            return Ok(DevTensor::new(oh.buf, q.shape.clone()));
        }
        let out = self.activation(q.shape.clone());
        let dims = [nq, heads, l, d];
        self.copy(
            &out,
            &oh,
            &dims,
            &contiguous_strides(&dims),
            &tokens_major(l),
            0,
            0,
        )?;
        Ok(out)
    }

    fn node(&mut self, n: &NodeProto) -> Result<(), EngineError> {
        let mut ins = Vec::new();
        for i in &n.input {
            ins.push(self.value(i)?);
        }
        let all_host = ins.iter().all(|v| !matches!(v, Some(Value::Dev(_))));
        let op = if n.domain.is_empty() || n.domain == "ai.onnx" {
            n.op_type.clone()
        } else {
            format!("{}::{}", n.domain, n.op_type)
        };
        let get = |k: usize| -> Result<Value, EngineError> {
            ins.get(k)
                .cloned()
                .flatten()
                .ok_or_else(|| err(format!("{op} {}: input {k} is missing", n.name)))
        };
        let host = |k: usize| -> Result<Arc<HostTensor>, EngineError> {
            match get(k)? {
                Value::Host(h) => Ok(h),
                Value::Dev(_) => Err(err(format!(
                    "{op} {}: input {k} must be a constant (computed from shapes), but depends on the graph's inputs",
                    n.name
                ))),
            }
        };
        let out_name = n.output.first().cloned().unwrap_or_default();
        let set = |p: &mut Self, v: Value| {
            p.values.insert(out_name.clone(), v);
        };
        match op.as_str() {
            "Shape" => {
                let s = Self::shape_of(&get(0)?);
                let v = HostTensor {
                    shape: vec![s.len()],
                    data: HostData::I64(s.iter().map(|&d| d as i64).collect()),
                };
                set(self, Value::Host(Arc::new(v)));
            }
            "Reshape" | "Unsqueeze" | "Squeeze" | "Flatten" | "Identity" | "Cast" => {
                let x = get(0)?;
                let shape = Self::shape_of(&x);
                let new_shape = match op.as_str() {
                    "Reshape" => {
                        let spec = host(1)?;
                        let spec = spec.i64s()?;
                        let total: usize = shape.iter().product();
                        let mut out: Vec<usize> = Vec::new();
                        let mut infer = None;
                        for (k, &d) in spec.iter().enumerate() {
                            match d {
                                0 => out.push(
                                    *shape
                                        .get(k)
                                        .ok_or_else(|| err("Reshape: 0 past the input's rank"))?,
                                ),
                                -1 => {
                                    infer = Some(k);
                                    out.push(1);
                                }
                                d if d > 0 => out.push(d as usize),
                                d => {
                                    return Err(err(format!(
                                        "Reshape {}: bad dimension {d}",
                                        n.name
                                    )))
                                }
                            }
                        }
                        if let Some(k) = infer {
                            let known: usize = out.iter().product();
                            out[k] = total / known.max(1);
                        }
                        if out.iter().product::<usize>() != total {
                            return Err(err(format!(
                                "Reshape {}: {shape:?} cannot become {spec:?}",
                                n.name
                            )));
                        }
                        out
                    }
                    "Unsqueeze" => {
                        let axes = match ins.get(1).cloned().flatten() {
                            Some(_) => host(1)?.i64s()?.to_vec(),
                            None => attr_ints(n, "axes").unwrap_or_default(),
                        };
                        let r = shape.len() + axes.len();
                        let mut axes: Vec<usize> = axes
                            .iter()
                            .map(|&a| norm_axis(a, r))
                            .collect::<Result<_, _>>()?;
                        axes.sort();
                        let mut out = shape.clone();
                        for a in axes {
                            out.insert(a, 1);
                        }
                        out
                    }
                    "Squeeze" => {
                        let axes = match ins.get(1).cloned().flatten() {
                            Some(_) => host(1)?.i64s()?.to_vec(),
                            None => attr_ints(n, "axes").unwrap_or_default(),
                        };
                        let axes: Vec<usize> = axes
                            .iter()
                            .map(|&a| norm_axis(a, shape.len()))
                            .collect::<Result<_, _>>()?;
                        shape
                            .iter()
                            .enumerate()
                            .filter(|(k, &d)| !(d == 1 && (axes.is_empty() || axes.contains(k))))
                            .map(|(_, &d)| d)
                            .collect()
                    }
                    "Flatten" => {
                        // axis in [-rank, rank]: a negative one counts from the end of `shape`
                        let ax = attr_i(n, "axis", 1);
                        let ax = if ax < 0 { ax + shape.len() as i64 } else { ax };
                        let a = norm_axis(ax, shape.len() + 1)?;
                        vec![shape[..a].iter().product(), shape[a..].iter().product()]
                    }
                    _ => shape.clone(),
                };
                let v = match x {
                    Value::Dev(d) => {
                        if op == "Cast" {
                            // an alias: only casts within the buffer's kind (float types or
                            // integer types) keep the values
                            let to = attr_i(n, "to", 1);
                            let int = matches!(to, 2..=7 | 12 | 13);
                            let is_int = self.buffers[d.buf].dtype == DType::I64;
                            if int != is_int {
                                return Err(err(format!(
                                    "Cast {}: the engine does not convert device tensors between integer and float types",
                                    n.name
                                )));
                            }
                        }
                        Value::Dev(self.reshape(d, new_shape)?)
                    }
                    Value::Host(h) => {
                        let mut h = (*h).clone();
                        if op == "Cast" {
                            let to = attr_i(n, "to", 1);
                            h.data = match (h.data, to) {
                                (HostData::I64(v), 1) => {
                                    HostData::F32(v.iter().map(|&x| x as f32).collect())
                                }
                                (HostData::F32(v), 7) => {
                                    HostData::I64(v.iter().map(|&x| x as i64).collect())
                                }
                                (d, _) => d,
                            };
                        }
                        h.shape = new_shape;
                        Value::Host(Arc::new(h))
                    }
                };
                set(self, v);
            }
            "Gather" if all_host => {
                let data = host(0)?;
                let idx = host(1)?;
                let axis = norm_axis(attr_i(n, "axis", 0), data.shape.len())?;
                let ids = idx.i64s()?;
                let dim = data.shape[axis] as i64;
                let outer: usize = data.shape[..axis].iter().product();
                let inner: usize = data.shape[axis + 1..].iter().product();
                let mut shape = data.shape[..axis].to_vec();
                shape.extend(&idx.shape);
                shape.extend(&data.shape[axis + 1..]);
                if let Some(bad) = ids.iter().find(|&&id| id < -dim || id >= dim) {
                    return Err(err(format!(
                        "Gather {}: index {bad} out of range for axis {axis} of {:?}",
                        n.name, data.shape
                    )));
                }
                let pick = |o: usize, id: i64, j: usize| {
                    let id = if id < 0 { id + dim } else { id } as usize;
                    (o * data.shape[axis] + id) * inner + j
                };
                let mut order = Vec::new();
                for o in 0..outer {
                    for &id in ids {
                        for j in 0..inner {
                            order.push(pick(o, id, j));
                        }
                    }
                }
                let d = match &data.data {
                    HostData::F32(v) => HostData::F32(order.iter().map(|&i| v[i]).collect()),
                    HostData::I64(v) => HostData::I64(order.iter().map(|&i| v[i]).collect()),
                };
                set(self, Value::Host(Arc::new(HostTensor { shape, data: d })));
            }
            "Gather" => {
                let axis = attr_i(n, "axis", 0);
                let table = self.dev(get(0)?, "table")?;
                let ids = self.dev(get(1)?, "ids")?;
                expect_rank(n, "table", &table.shape, 2)?;
                if axis != 0 || table.shape.len() != 2 {
                    return Err(err(format!(
                        "Gather {}: the engine gathers rows of a 2-D table (axis 0)",
                        n.name
                    )));
                }
                let mut shape = ids.shape.clone();
                shape.push(table.shape[1]);
                let out = self.activation(shape);
                self.push(Step::Gather {
                    out: out.buf,
                    table: table.buf,
                    ids: ids.buf,
                    n_ids: ids.numel(),
                    row: table.shape[1],
                    n_rows: table.shape[0],
                });
                set(self, Value::Dev(out));
            }
            "Concat" => {
                let parts: Vec<Value> = (0..ins.len()).map(get).collect::<Result<_, _>>()?;
                let Some(first) = parts.first() else {
                    return Err(err(format!("Concat {}: no inputs", n.name)));
                };
                let rank = Self::shape_of(first).len();
                let axis = norm_axis(attr_i(n, "axis", 0), rank)?;
                let s0 = Self::shape_of(first);
                for p in &parts {
                    let sp = Self::shape_of(p);
                    let differ = |(k, (a, b)): (usize, (&usize, &usize))| k != axis && a != b;
                    if sp.len() != rank || sp.iter().zip(&s0).enumerate().any(differ) {
                        return Err(err(format!(
                            "Concat {}: inputs {s0:?} and {sp:?} differ off axis {axis}",
                            n.name
                        )));
                    }
                }
                let mut shape = Self::shape_of(&parts[0]);
                shape[axis] = parts.iter().map(|p| Self::shape_of(p)[axis]).sum();
                if all_host {
                    let outer: usize = shape[..axis].iter().product();
                    let mut f = Vec::new();
                    let mut i = Vec::new();
                    for o in 0..outer {
                        for p in &parts {
                            let Value::Host(h) = p else { unreachable!() };
                            let inner: usize = h.shape[axis..].iter().product();
                            match &h.data {
                                HostData::F32(v) => {
                                    f.extend_from_slice(&v[o * inner..(o + 1) * inner])
                                }
                                HostData::I64(v) => {
                                    i.extend_from_slice(&v[o * inner..(o + 1) * inner])
                                }
                            }
                        }
                    }
                    let data = if f.is_empty() {
                        HostData::I64(i)
                    } else {
                        HostData::F32(f)
                    };
                    set(self, Value::Host(Arc::new(HostTensor { shape, data })));
                } else {
                    let parts: Vec<DevTensor> = parts
                        .into_iter()
                        .map(|p| self.view(p, "part"))
                        .collect::<Result<_, _>>()?;
                    // the first part's layout (channels-last skip connections stay so)
                    let order = parts[0]
                        .dense_order()
                        .unwrap_or_else(|| (0..rank).collect());
                    let out = self.activation_in(shape.clone(), &order);
                    let mut at = 0usize;
                    for d in parts {
                        self.copy(
                            &out,
                            &d,
                            &d.shape,
                            &d.strides,
                            &out.strides,
                            0,
                            at as i64 * out.strides[axis],
                        )?;
                        at += d.shape[axis];
                    }
                    set(self, Value::Dev(out));
                }
            }
            "Slice" => {
                let x = get(0)?;
                let shape = Self::shape_of(&x);
                let starts = host(1)?.i64s()?.to_vec();
                let ends = host(2)?.i64s()?.to_vec();
                let axes = match ins.get(3).cloned().flatten() {
                    Some(_) => host(3)?.i64s()?.to_vec(),
                    None => (0..starts.len() as i64).collect(),
                };
                let steps = match ins.get(4).cloned().flatten() {
                    Some(_) => host(4)?.i64s()?.to_vec(),
                    None => vec![1; starts.len()],
                };
                if ends.len() != starts.len()
                    || axes.len() != starts.len()
                    || steps.len() != starts.len()
                {
                    return Err(err(format!(
                        "Slice {}: starts {starts:?}, ends {ends:?}, axes {axes:?} and steps {steps:?} differ in length",
                        n.name
                    )));
                }
                let mut out_shape = shape.clone();
                let own = match &x {
                    Value::Dev(d) => d.strides.clone(),
                    Value::Host(_) => contiguous_strides(&shape),
                };
                let mut strides = own.clone();
                let mut off = 0i64;
                for k in 0..starts.len() {
                    let a = norm_axis(axes[k], shape.len())?;
                    let dim = shape[a] as i64;
                    let st = steps[k];
                    if st <= 0 {
                        return Err(err(format!(
                            "Slice {}: the engine takes positive steps",
                            n.name
                        )));
                    }
                    let clamp = |v: i64| {
                        let v = if v < 0 { v + dim } else { v };
                        v.clamp(0, dim)
                    };
                    let (s, e) = (clamp(starts[k]), clamp(ends[k]));
                    out_shape[a] = if e > s {
                        ((e - s + st - 1) / st) as usize
                    } else {
                        0
                    };
                    off += s * own[a];
                    strides[a] = own[a] * st;
                }
                let zeros = vec![0; out_shape.len()];
                let cs = contiguous_strides(&out_shape);
                match x {
                    Value::Host(h) => {
                        let s = Strided::new(&out_shape, &strides, &zeros, &cs)?;
                        set(self, Value::Host(Arc::new(h.map(out_shape, &s, off))));
                    }
                    Value::Dev(d) => {
                        let out = self.activation(out_shape.clone());
                        self.copy(&out, &d, &out_shape, &strides, &cs, off, 0)?;
                        set(self, Value::Dev(out));
                    }
                }
            }
            "Transpose" => {
                let x = get(0)?;
                let shape = Self::shape_of(&x);
                let perm: Vec<usize> = attr_ints(n, "perm")
                    .map(|p| {
                        p.iter()
                            .map(|&a| usize::try_from(a).unwrap_or(usize::MAX))
                            .collect()
                    })
                    .unwrap_or_else(|| (0..shape.len()).rev().collect());
                let mut sorted = perm.clone();
                sorted.sort_unstable();
                if sorted != (0..shape.len()).collect::<Vec<_>>() {
                    return Err(err(format!(
                        "Transpose {}: perm {:?} is not a permutation of the {} axes of its input {shape:?}",
                        n.name,
                        attr_ints(n, "perm").unwrap_or_default(),
                        shape.len()
                    )));
                }
                let out_shape: Vec<usize> = perm.iter().map(|&a| shape[a]).collect();
                match x {
                    Value::Host(h) => {
                        let own = contiguous_strides(&shape);
                        let strides: Vec<i64> = perm.iter().map(|&a| own[a]).collect();
                        let cs = contiguous_strides(&out_shape);
                        let zeros = vec![0; out_shape.len()];
                        let s = Strided::new(&out_shape, &strides, &zeros, &cs)?;
                        set(self, Value::Host(Arc::new(h.map(out_shape, &s, 0))));
                    }
                    // a view: whoever needs another layout copies
                    Value::Dev(d) => {
                        let strides = perm.iter().map(|&a| d.strides[a]).collect();
                        set(
                            self,
                            Value::Dev(DevTensor {
                                buf: d.buf,
                                shape: out_shape,
                                strides,
                            }),
                        );
                    }
                }
            }
            "Expand" => {
                let x = get(0)?;
                let shape = Self::shape_of(&x);
                let target: Vec<usize> = host(1)?
                    .i64s()?
                    .iter()
                    .map(|&d| usize::try_from(d).ok())
                    .collect::<Option<_>>()
                    .ok_or_else(|| {
                        err(format!("Expand {}: a negative target dimension", n.name))
                    })?;
                let out_shape = broadcast_shape(&shape, &target)?;
                let strides = match &x {
                    Value::Dev(d) => broadcast_view(&shape, &d.strides, &out_shape)?,
                    Value::Host(_) => broadcast_strides(&shape, &out_shape)?,
                };
                let cs = contiguous_strides(&out_shape);
                match x {
                    Value::Host(h) => {
                        let zeros = vec![0; out_shape.len()];
                        let s = Strided::new(&out_shape, &strides, &zeros, &cs)?;
                        set(self, Value::Host(Arc::new(h.map(out_shape, &s, 0))));
                    }
                    Value::Dev(d) => {
                        let out = self.activation(out_shape.clone());
                        self.copy(&out, &d, &out_shape, &strides, &cs, 0, 0)?;
                        set(self, Value::Dev(out));
                    }
                }
            }
            "Resize" => {
                let x = self.view(get(0)?, "X")?;
                let mode = attr_s(n, "mode").unwrap_or_else(|| "nearest".into());
                let ctm = attr_s(n, "coordinate_transformation_mode")
                    .unwrap_or_else(|| "half_pixel".into());
                if mode != "nearest" || x.shape.len() != 4 {
                    return Err(err(format!("Resize {}: the engine takes nearest-neighbour resizing of 4-D tensors, not {mode}", n.name)));
                }
                let out_shape: Vec<usize> = if let Some(Some(_)) = ins.get(3) {
                    host(3)?.i64s()?.iter().map(|&d| d as usize).collect()
                } else {
                    let sc = host(2)?;
                    let HostData::F32(s) = &sc.data else {
                        return Err(err("Resize: float scales expected"));
                    };
                    x.shape
                        .iter()
                        .zip(s)
                        .map(|(&d, &f)| (d as f32 * f).floor() as usize)
                        .collect()
                };
                if out_shape.len() != 4 || out_shape.contains(&0) || x.shape.contains(&0) {
                    return Err(err(format!(
                        "Resize {}: {:?} to {out_shape:?}: 4-D, non-empty sizes expected",
                        n.name, x.shape
                    )));
                }
                let (h, w) = (x.shape[2], x.shape[3]);
                let (oh, ow) = (out_shape[2], out_shape[3]);
                if out_shape[..2] != x.shape[..2]
                    || oh % h != 0
                    || ow % w != 0
                    || (ctm != "asymmetric" && (oh != h || ow != w))
                {
                    return Err(err(format!(
                        "Resize {}: the engine takes integer nearest upsampling with asymmetric coordinates ({:?} -> {out_shape:?}, {ctm})",
                        n.name, x.shape
                    )));
                }
                let (sh, sw) = (oh / h, ow / w);
                let order = x.dense_order().unwrap_or_else(|| vec![0, 1, 2, 3]);
                let out = self.activation_in(out_shape, &order);
                // output row i·sh + j reads input row i (stride 0 along the repeat axes)
                let dims = [x.shape[0], x.shape[1], h, sh, w, sw];
                let xs = &x.strides;
                let ins_ = [xs[0], xs[1], xs[2], 0, xs[3], 0];
                let os = &out.strides;
                let outs = [
                    os[0],
                    os[1],
                    os[2] * sh as i64,
                    os[2],
                    os[3] * sw as i64,
                    os[3],
                ];
                self.copy(&out, &x, &dims, &ins_, &outs, 0, 0)?;
                set(self, Value::Dev(out));
            }
            "Add" | "Sub" | "Mul" | "Div" => {
                let bop = match op.as_str() {
                    "Add" => BinaryOp::Add,
                    "Sub" => BinaryOp::Sub,
                    "Mul" => BinaryOp::Mul,
                    _ => BinaryOp::Div,
                };
                let (a, b) = (get(0)?, get(1)?);
                let (sa, sb) = (Self::shape_of(&a), Self::shape_of(&b));
                let out_shape = broadcast_shape(&sa, &sb)?;
                if all_host {
                    let (Value::Host(ha), Value::Host(hb)) = (&a, &b) else {
                        unreachable!()
                    };
                    let zeros = vec![0; out_shape.len()];
                    let s = Strided::new(
                        &out_shape,
                        &broadcast_strides(&sa, &out_shape)?,
                        &broadcast_strides(&sb, &out_shape)?,
                        &zeros,
                    )?;
                    let nn = s.numel();
                    let data = match (&ha.data, &hb.data) {
                        (HostData::I64(x), HostData::I64(y)) => HostData::I64(
                            (0..nn)
                                .map(|i| {
                                    let (p, q, _) = s.offsets(i as i64);
                                    let (u, v) = (x[p as usize], y[q as usize]);
                                    match bop {
                                        BinaryOp::Add => u + v,
                                        BinaryOp::Sub => u - v,
                                        BinaryOp::Mul => u * v,
                                        BinaryOp::Div => u / v,
                                    }
                                })
                                .collect(),
                        ),
                        (HostData::F32(x), HostData::F32(y)) => HostData::F32(
                            (0..nn)
                                .map(|i| {
                                    let (p, q, _) = s.offsets(i as i64);
                                    let (u, v) = (x[p as usize], y[q as usize]);
                                    match bop {
                                        BinaryOp::Add => u + v,
                                        BinaryOp::Sub => u - v,
                                        BinaryOp::Mul => u * v,
                                        BinaryOp::Div => u / v,
                                    }
                                })
                                .collect(),
                        ),
                        _ => {
                            return Err(err(format!(
                                "{op} {}: mixed int64 and float constants",
                                n.name
                            )))
                        }
                    };
                    set(
                        self,
                        Value::Host(Arc::new(HostTensor {
                            shape: out_shape,
                            data,
                        })),
                    );
                    return Ok(());
                }
                let da = self.view(a, "A")?;
                let db = self.view(b, "B")?;
                if bop == BinaryOp::Add {
                    if let Some(folded) = self.fold_broadcast_add(n, &da, &db, &out_shape) {
                        set(self, Value::Dev(folded));
                        return Ok(());
                    }
                }
                // a convolution whose output only feeds this Add takes the other operand as its
                // residual (read element by element, so in the same layout)
                if bop == BinaryOp::Add && sa == sb {
                    for (conv_side, other) in [(&da, &db), (&db, &da)] {
                        let same_layout = conv_side
                            .dense_order()
                            .is_some_and(|o| other.is_dense_in(&o));
                        if !same_layout {
                            continue;
                        }
                        // only the convolution's own output, read by this Add alone
                        let single = self.gemm_out.get(&conv_side.buf).is_some_and(|name| {
                            n.input.contains(name) && self.readers.get(name).copied() == Some(1)
                        });
                        if !single {
                            continue;
                        }
                        if let Some(&si) = self.writer.get(&conv_side.buf) {
                            // the residual must exist when the convolution runs
                            if self.writer.get(&other.buf).is_some_and(|&w| w > si) {
                                continue;
                            }
                            let fused = match &mut self.steps[si] {
                                Step::Conv(c)
                                    if c.residual.is_none()
                                        && c.out == conv_side.buf
                                        && c.x != other.buf =>
                                {
                                    c.residual = Some(other.buf);
                                    true
                                }
                                // a 1×1 convolution compiled to a GEMM
                                Step::Linear {
                                    out, x, residual, ..
                                } if residual.is_none()
                                    && *out == conv_side.buf
                                    && *x != other.buf =>
                                {
                                    *residual = Some(other.buf);
                                    true
                                }
                                _ => false,
                            };
                            if fused {
                                set(self, Value::Dev(conv_side.clone()));
                                return Ok(());
                            }
                        }
                    }
                }
                // the output takes the layout of a full-size operand; iterate in its memory order
                let order = [&da, &db]
                    .iter()
                    .filter(|t| t.shape == out_shape)
                    .find_map(|t| t.dense_order())
                    .unwrap_or_else(|| (0..out_shape.len()).collect());
                let out = self.activation_in(out_shape.clone(), &order);
                let s = if sa == out_shape
                    && sb == out_shape
                    && da.is_dense_in(&order)
                    && db.is_dense_in(&order)
                {
                    None
                } else {
                    let ba = broadcast_view(&sa, &da.strides, &out_shape)?;
                    let bb = broadcast_view(&sb, &db.strides, &out_shape)?;
                    let pick = |v: &[i64]| order.iter().map(|&k| v[k]).collect::<Vec<i64>>();
                    let dims: Vec<usize> = order.iter().map(|&k| out_shape[k]).collect();
                    Some(Strided::new(
                        &dims,
                        &pick(&ba),
                        &pick(&bb),
                        &pick(&out.strides),
                    )?)
                };
                self.push(Step::Binary {
                    out: out.buf,
                    a: da.buf,
                    b: db.buf,
                    op: bop,
                    s,
                    n: out.numel(),
                });
                set(self, Value::Dev(out));
            }
            "Sigmoid" | "Sin" | "Cos" | "Neg" => {
                let x = get(0)?;
                if let Value::Host(h) = &x {
                    let HostData::F32(v) = &h.data else {
                        return Err(err(format!("{op}: float expected")));
                    };
                    let f: fn(f32) -> f32 = match op.as_str() {
                        "Sigmoid" => |x| 1.0 / (1.0 + (-x).exp()),
                        "Sin" => f32::sin,
                        "Cos" => f32::cos,
                        _ => |x| -x,
                    };
                    set(
                        self,
                        Value::Host(Arc::new(HostTensor {
                            shape: h.shape.clone(),
                            data: HostData::F32(v.iter().map(|&x| f(x)).collect()),
                        })),
                    );
                    return Ok(());
                }
                // elementwise over the buffer: any dense layout is kept
                let x = self.view(x, "X")?;
                let x = match x.dense_order() {
                    Some(_) => x,
                    None => self.contiguous(x)?,
                };
                let uop = match op.as_str() {
                    "Sigmoid" => UnaryOp::Sigmoid,
                    "Sin" => UnaryOp::Sin,
                    "Cos" => UnaryOp::Cos,
                    _ => UnaryOp::Neg,
                };
                let order = x.dense_order().expect("dense");
                let out = self.activation_in(x.shape.clone(), &order);
                self.push(Step::Unary {
                    out: out.buf,
                    inp: x.buf,
                    op: uop,
                    n: x.numel(),
                });
                set(self, Value::Dev(out));
            }
            "LayerNormalization" => {
                let x = self.dev(get(0)?, "X")?;
                let gamma = self.dev(get(1)?, "scale")?;
                let beta = match ins.get(2).cloned().flatten() {
                    Some(b) => Some(self.dev(b, "bias")?.buf),
                    None => None,
                };
                let axis = norm_axis(attr_i(n, "axis", -1), x.shape.len())?;
                if axis != x.shape.len() - 1 {
                    return Err(err(format!(
                        "LayerNormalization {}: the engine normalizes the last axis only",
                        n.name
                    )));
                }
                let cols = x.shape[axis];
                expect_numel(n, "scale", &gamma.shape, cols)?;
                if let Some(b) = beta {
                    expect_numel(n, "bias", &[self.buffers[b].numel], cols)?;
                }
                let out = self.activation(x.shape.clone());
                self.gemm_out.insert(out.buf, out_name.clone());
                self.push(Step::LayerNorm {
                    out: out.buf,
                    x: x.buf,
                    gamma: gamma.buf,
                    beta,
                    add: None,
                    rows: x.numel() / cols,
                    cols,
                    eps: attr_f(n, "epsilon", 1e-5),
                });
                set(self, Value::Dev(out));
            }
            "Softmax" => {
                let x = self.dev(get(0)?, "X")?;
                let axis = norm_axis(attr_i(n, "axis", -1), x.shape.len())?;
                if axis != x.shape.len() - 1 {
                    return Err(err(format!(
                        "Softmax {}: the engine takes the last axis only",
                        n.name
                    )));
                }
                let cols = x.shape[axis];
                if cols == 0 {
                    return Err(err(format!("Softmax {}: an empty axis", n.name)));
                }
                let out = self.activation(x.shape.clone());
                self.push(Step::Softmax {
                    out: out.buf,
                    x: x.buf,
                    rows: x.numel() / cols,
                    cols,
                });
                set(self, Value::Dev(out));
            }
            "MatMul" => {
                let a = self.dev(get(0)?, "A")?;
                let b = self.dev(get(1)?, "B")?;
                if a.shape.len() < 2 || b.shape.len() < 2 {
                    return Err(err(format!(
                        "MatMul {}: rank-1 operands are not supported",
                        n.name
                    )));
                }
                let (m, k) = (a.shape[a.shape.len() - 2], a.shape[a.shape.len() - 1]);
                let (k2, nn) = (b.shape[b.shape.len() - 2], b.shape[b.shape.len() - 1]);
                let ba: usize = a.shape[..a.shape.len() - 2].iter().product();
                let bb: usize = b.shape[..b.shape.len() - 2].iter().product();
                if k != k2 || !(bb == ba || bb == 1) {
                    return Err(err(format!("MatMul {}: {:?} x {:?} is not supported (batch dims must match, or B is 2-D)", n.name, a.shape, b.shape)));
                }
                let mut shape = a.shape[..a.shape.len() - 1].to_vec();
                shape.push(nn);
                let out = self.activation(shape);
                self.push(Step::MatMul {
                    out: out.buf,
                    a: a.buf,
                    b: b.buf,
                    batch: ba,
                    m,
                    n: nn,
                    k,
                    b_stride: if bb == 1 { 0 } else { k * nn },
                    trans_b: false,
                    alpha: 1.0,
                });
                set(self, Value::Dev(out));
            }
            "Conv" => {
                let xv = self.view(get(0)?, "X")?;
                let wv = get(1)?;
                let w_shape = Self::shape_of(&wv);
                let bias = match ins.get(2).cloned().flatten() {
                    Some(b) => Some(self.dev(b, "B")?.buf),
                    None => None,
                };
                if xv.shape.len() != 4 || w_shape.len() != 4 {
                    return Err(err(format!(
                        "Conv {}: the engine takes 2-D convolutions",
                        n.name
                    )));
                }
                let pads = attr_ints_checked(n, "pads", 4, 0, 0)?;
                let strides = attr_ints_checked(n, "strides", 2, 1, 1)?;
                let dil = attr_ints_checked(n, "dilations", 2, 1, 1)?;
                let group = usize::try_from(attr_i(n, "group", 1))
                    .ok()
                    .filter(|&g| g >= 1)
                    .ok_or_else(|| {
                        err(format!("Conv {}: group {}", n.name, attr_i(n, "group", 1)))
                    })?;
                if xv.shape[1] != w_shape[1] * group || w_shape[0] % group != 0 {
                    return Err(err(format!(
                        "Conv {}: input {:?} and weight {w_shape:?} in {group} groups do not match",
                        n.name, xv.shape
                    )));
                }
                if let Some(b) = bias {
                    expect_numel(n, "bias", &[self.buffers[b].numel], w_shape[0])?;
                }
                for a in 0..2 {
                    let reach = dil[a] * w_shape[2 + a].saturating_sub(1) + 1;
                    if xv.shape[2 + a] + pads[a] + pads[a + 2] < reach {
                        return Err(err(format!(
                            "Conv {}: kernel {w_shape:?} (dilations {dil:?}) is larger than the padded input {:?}",
                            n.name, xv.shape
                        )));
                    }
                }
                if attr_s(n, "auto_pad").is_some_and(|s| s != "NOTSET") {
                    return Err(err(format!("Conv {}: auto_pad is not supported", n.name)));
                }
                let nhwc = self.layout == Layout::Nhwc;
                let order = if nhwc {
                    channels_last_order(4)
                } else {
                    vec![0, 1, 2, 3]
                };
                let mut x = self.in_order(xv, &order)?;
                let mut p = [pads[0], pads[1], pads[2], pads[3]];
                if p[0] != p[2] || p[1] != p[3] {
                    // cuDNN pads symmetrically: copy into a zero-bordered buffer first
                    let (h, w_) = (x.shape[2], x.shape[3]);
                    let ps = vec![x.shape[0], x.shape[1], h + p[0] + p[2], w_ + p[1] + p[3]];
                    let padded = self.activation_in(ps, &order);
                    self.push(Step::Fill {
                        out: padded.buf,
                        n: padded.numel(),
                        value: 0.0,
                    });
                    let off = p[0] as i64 * padded.strides[2] + p[1] as i64 * padded.strides[3];
                    self.copy(&padded, &x, &x.shape, &x.strides, &padded.strides, 0, off)?;
                    x = padded;
                    p = [0; 4];
                }
                let xs = [x.shape[0], x.shape[1], x.shape[2], x.shape[3]];
                let ws = [w_shape[0], w_shape[1], w_shape[2], w_shape[3]];
                let (st, dl) = ([strides[0], strides[1]], [dil[0], dil[1]]);
                let oh = (xs[2] + p[0] + p[2] - dl[0] * (ws[2] - 1) - 1) / st[0] + 1;
                let ow = (xs[3] + p[1] + p[3] - dl[1] * (ws[3] - 1) - 1) / st[1] + 1;
                let ys = [xs[0], ws[0], oh, ow];
                let out = self.activation_in(ys.to_vec(), &order);
                self.gemm_out.insert(out.buf, out_name.clone());
                let pointwise =
                    ws[2] == 1 && ws[3] == 1 && st == [1, 1] && p == [0; 4] && group == 1;
                if nhwc && pointwise {
                    // channels-last 1×1: a GEMM over the pixels, [N·H·W, C] · Wᵀ
                    let w = self.dev(wv, "W")?;
                    self.push(Step::Linear {
                        out: out.buf,
                        x: x.buf,
                        w: w.buf,
                        bias,
                        residual: None,
                        m: xs[0] * xs[2] * xs[3],
                        n: ws[0],
                        k: ws[1],
                    });
                } else {
                    let w = if nhwc {
                        self.permuted_weight(wv, &[0, 2, 3, 1])?
                    } else {
                        self.dev(wv, "W")?
                    };
                    self.push(Step::Conv(ConvStep {
                        out: out.buf,
                        x: x.buf,
                        w: w.buf,
                        bias,
                        residual: None,
                        x_shape: xs,
                        w_shape: ws,
                        y_shape: ys,
                        pads: p,
                        strides: st,
                        dilations: dl,
                        group,
                        nhwc,
                        sample_bias: None,
                    }));
                }
                set(self, Value::Dev(out));
            }
            "com.motionrt::GroupNorm" => {
                let xv = self.view(get(0)?, "X")?;
                // channels-last input (after a channels-last convolution, or a concatenation of
                // such): normalised in place of layout
                let channels_last = self.layout == Layout::Nhwc
                    && xv
                        .channels_last()
                        .is_some_and(|(_, c, _)| c <= GROUP_NORM_NHWC_MAX_CHANNELS);
                let x = if channels_last {
                    xv
                } else {
                    self.contiguous(xv)?
                };
                let gamma = self.dev(get(1)?, "scale")?;
                let beta = self.dev(get(2)?, "bias")?;
                let groups = usize::try_from(attr_i(n, "num_groups", 32)).unwrap_or(0);
                if x.shape.len() < 2 || groups == 0 {
                    return Err(err(format!(
                        "GroupNorm {}: input {:?} in {} groups",
                        n.name,
                        x.shape,
                        attr_i(n, "num_groups", 32)
                    )));
                }
                let c = x.shape[1];
                expect_numel(n, "scale", &gamma.shape, c)?;
                expect_numel(n, "bias", &beta.shape, c)?;
                if c % groups != 0 {
                    return Err(err(format!(
                        "GroupNorm {}: {c} channels in {groups} groups",
                        n.name
                    )));
                }
                let out = if channels_last {
                    self.activation_in(x.shape.clone(), &channels_last_order(x.shape.len()))
                } else {
                    self.activation(x.shape.clone())
                };
                let act = attr_s(n, "activation").unwrap_or_else(|| "none".into());
                self.push(Step::GroupNorm {
                    out: out.buf,
                    x: x.buf,
                    gamma: gamma.buf,
                    beta: beta.buf,
                    n: x.shape[0],
                    c,
                    spatial: x.shape[2..].iter().product(),
                    groups,
                    eps: attr_f(n, "epsilon", 1e-5),
                    silu: act == "silu",
                    channels_last,
                    x_bias: None,
                    x_sbias: None,
                });
                set(self, Value::Dev(out));
            }
            "com.motionrt::Linear" => {
                let x = self.dev(get(0)?, "X")?;
                let w = self.dev(get(1)?, "W")?;
                let bias = match ins.get(2).cloned().flatten() {
                    Some(b) => Some(self.dev(b, "bias")?.buf),
                    None => None,
                };
                expect_rank(n, "W", &w.shape, 2)?;
                let (nn, k) = (w.shape[0], w.shape[1]);
                if let Some(b) = bias {
                    expect_numel(n, "bias", &[self.buffers[b].numel], nn)?;
                }
                if x.shape.last() != Some(&k) {
                    return Err(err(format!(
                        "Linear {}: X {:?} and W {:?}",
                        n.name, x.shape, w.shape
                    )));
                }
                let mut shape = x.shape.clone();
                *shape.last_mut().unwrap() = nn;
                let residual = match ins.get(3).cloned().flatten() {
                    Some(r) => {
                        let r = self.dev(r, "residual")?;
                        if r.shape.iter().product::<usize>() != shape.iter().product::<usize>() {
                            return Err(err(format!(
                                "Linear {}: residual {:?} for output {shape:?}",
                                n.name, r.shape
                            )));
                        }
                        Some(r.buf)
                    }
                    None => None,
                };
                let out = self.activation(shape);
                self.gemm_out.insert(out.buf, out_name.clone());
                self.push(Step::Linear {
                    out: out.buf,
                    x: x.buf,
                    w: w.buf,
                    bias,
                    residual,
                    m: x.numel() / k,
                    n: nn,
                    k,
                });
                set(self, Value::Dev(out));
            }
            "com.motionrt::Geglu" => {
                let x = self.dev(get(0)?, "X")?;
                let last = x.shape.last().copied().unwrap_or(0);
                if last == 0 || last % 2 != 0 {
                    return Err(err(format!(
                        "Geglu {}: input {:?}: an even last axis expected",
                        n.name, x.shape
                    )));
                }
                let mut shape = x.shape.clone();
                *shape.last_mut().unwrap() = last / 2;
                // the projection's bias is added here instead of in a pass after its GEMM, when
                // this node is the projection's only reader
                let sole = self.gemm_out.get(&x.buf).is_some_and(|name| {
                    n.input[0] == *name && self.readers.get(name).copied() == Some(1)
                });
                let mut bias = None;
                if let Some(&si) = self.writer.get(&x.buf).filter(|_| sole) {
                    if let Step::Linear {
                        out,
                        bias: b @ Some(_),
                        residual: None,
                        ..
                    } = &mut self.steps[si]
                    {
                        if *out == x.buf {
                            bias = b.take();
                        }
                    }
                }
                let out = self.activation(shape);
                self.push(Step::Geglu {
                    out: out.buf,
                    x: x.buf,
                    bias,
                    rows: x.numel() / last,
                    d: last / 2,
                });
                set(self, Value::Dev(out));
            }
            "com.motionrt::TemporalAttention" => {
                let q = self.dev(get(0)?, "Q")?;
                let k = self.dev(get(1)?, "K")?;
                let v = self.dev(get(2)?, "V")?;
                let heads = usize::try_from(attr_i(n, "num_heads", 1)).unwrap_or(0);
                for (what, t) in [("Q", &q), ("K", &k), ("V", &v)] {
                    expect_rank(n, what, &t.shape, 3)?;
                }
                let (nq, l, c) = (q.shape[0], q.shape[1], q.shape[2]);
                let s = k.shape[1];
                if k.shape != v.shape
                    || k.shape[0] != nq
                    || k.shape[2] != c
                    || heads == 0
                    || c % heads != 0
                {
                    return Err(err(format!(
                        "{} {}: Q {:?}, K {:?}, V {:?} in {} heads do not match",
                        n.op_type,
                        n.name,
                        q.shape,
                        k.shape,
                        v.shape,
                        attr_i(n, "num_heads", 1)
                    )));
                }
                let d = c / heads;
                let bias = match ins.get(3).cloned().flatten() {
                    Some(b) => {
                        let b = self.dev(b, "bias")?;
                        let Some(&rows) = b.shape.first() else {
                            return Err(err(format!("{} {}: a scalar bias", n.op_type, n.name)));
                        };
                        Some((b.buf, rows))
                    }
                    None => None,
                };
                let scale = attr_f(n, "scale", 1.0 / (d as f32).sqrt());
                if bias.is_none() && !(fused_attention_head(d) && fused_attention_scale(scale)) {
                    let out = self.attention_gemms(&q, &k, &v, heads, d, scale)?;
                    set(self, Value::Dev(out));
                    return Ok(());
                }
                let out = self.activation(q.shape.clone());
                self.push(Step::Attention {
                    out: out.buf,
                    q: q.buf,
                    k: k.buf,
                    v: v.buf,
                    bias,
                    n: nq,
                    l,
                    s,
                    heads,
                    d,
                    scale,
                    ld: [c; 3],
                    offs: [0; 3],
                    ns: 1,
                });
                set(self, Value::Dev(out));
            }
            other => {
                return Err(err(format!(
                    "node {} ({other}): operator not supported by the native engine",
                    n.name
                )))
            }
        }
        Ok(())
    }
}

/// Compile `model` for the given input shapes.
pub fn compile(
    model: &ModelProto,
    input_shapes: &[(&str, Vec<usize>)],
    src: &dyn InitializerSource,
    layout: Layout,
) -> Result<Program, EngineError> {
    let g = model
        .graph
        .as_ref()
        .ok_or_else(|| err("the model has no graph"))?;
    let mut p = Planner {
        values: HashMap::new(),
        buffers: Vec::new(),
        steps: Vec::new(),
        writer: HashMap::new(),
        readers: HashMap::new(),
        weight_bufs: HashMap::new(),
        gemm_out: HashMap::new(),
        inits: g.initializer.iter().map(|t| (t.name.as_str(), t)).collect(),
        src,
        layout,
    };
    for node in &g.node {
        for i in &node.input {
            *p.readers.entry(i.clone()).or_default() += 1;
        }
    }
    for o in &g.output {
        *p.readers.entry(o.name.clone()).or_default() += 1;
    }
    let sinusoid = find_sinusoid(g, &mut p, input_shapes);
    let mut input_transforms = Vec::new();
    let mut inputs = Vec::new();
    for i in &g.input {
        if p.inits.contains_key(i.name.as_str()) {
            continue;
        }
        if let Some((name, out, s, _)) = &sinusoid {
            if *name == i.name {
                let b = input_shapes
                    .iter()
                    .find(|(n, _)| *n == i.name)
                    .map_or(1, |(_, s)| s[0]);
                let shape = vec![b, 2 * s.freqs.len()];
                let buf = p.new_buf(
                    shape.iter().product(),
                    DType::Float,
                    BufferKind::Input(i.name.clone()),
                );
                let t = DevTensor::new(buf, shape);
                p.values.insert(out.clone(), Value::Dev(t.clone()));
                inputs.push((i.name.clone(), t));
                input_transforms.push((name.clone(), s.clone()));
                continue;
            }
        }
        let shape = input_shapes
            .iter()
            .find(|(n, _)| *n == i.name)
            .map(|(_, s)| s.clone())
            .ok_or_else(|| err(format!("no shape given for input {}", i.name)))?;
        let elem = match &i.r#type {
            Some(t) => match &t.value {
                Some(motionrt_onnx::proto::TypeValue::TensorType(tt)) => tt.elem_type,
                _ => 1,
            },
            None => 1,
        };
        let dtype = if elem == TensorProtoDataType::Int64 as i32 {
            DType::I64
        } else {
            DType::Float
        };
        let buf = p.new_buf(
            shape.iter().product(),
            dtype,
            BufferKind::Input(i.name.clone()),
        );
        let t = DevTensor::new(buf, shape);
        p.values.insert(i.name.clone(), Value::Dev(t.clone()));
        inputs.push((i.name.clone(), t));
    }
    let skip = sinusoid.map(|s| s.3).unwrap_or_default();
    for (k, node) in g.node.iter().enumerate() {
        if !skip.contains(&k) {
            // each error names its node
            p.node(node).map_err(|e| match e {
                EngineError::Graph(m) if !m.contains(&node.name) => {
                    EngineError::Graph(format!("node {} ({}): {m}", node.name, node.op_type))
                }
                e => e,
            })?;
        }
    }
    let mut outputs = Vec::new();
    for o in &g.output {
        match p.values.get(&o.name).cloned() {
            Some(Value::Dev(d)) => {
                let d = p.contiguous(d)?;
                outputs.push((o.name.clone(), d))
            }
            _ => {
                return Err(err(format!(
                    "output {} is not computed on the device",
                    o.name
                )))
            }
        }
    }
    // dead-step elimination is unnecessary: the fused graphs are already pruned
    Ok(Program {
        buffers: p.buffers,
        steps: p.steps,
        inputs,
        input_transforms,
        outputs,
        nodes: g.node.len(),
    })
}

/// Arena placement of a program's activation and input buffers by lifetime.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryPlan {
    /// Byte offset in the arena per buffer (`None` for weights).
    pub offsets: Vec<Option<usize>>,
    pub arena_bytes: usize,
    /// What the arena would be without reuse.
    pub unshared_bytes: usize,
}

pub const ALIGN: usize = 256;

/// Most channels the channels-last GroupNorm kernels take: eight per thread of a block of at most
/// 512 threads (SD1.5's largest, 2560 channels, needs 320).
pub const GROUP_NORM_NHWC_MAX_CHANNELS: usize = 8 * 512;

/// Lifetimes `[first, last]` (step indices) of every non-weight buffer: inputs start at 0,
/// outputs live to the end.
pub fn lifetimes(p: &Program) -> Vec<Option<(usize, usize)>> {
    let mut life: Vec<Option<(usize, usize)>> = vec![None; p.buffers.len()];
    let end = p.steps.len();
    for (i, b) in p.buffers.iter().enumerate() {
        if let BufferKind::Input(_) = b.kind {
            life[i] = Some((0, 0));
        }
    }
    for (si, s) in p.steps.iter().enumerate() {
        let (reads, w) = s.io();
        for b in reads.into_iter().chain(std::iter::once(w)) {
            if matches!(p.buffers[b].kind, BufferKind::Weight(_)) {
                continue;
            }
            life[b] = Some(match life[b] {
                Some((f, _)) => (f, si),
                None => (si, si),
            });
        }
    }
    for (_, o) in &p.outputs {
        if let Some(l) = life[o.buf].as_mut() {
            l.1 = end;
        } else {
            life[o.buf] = Some((0, end));
        }
    }
    life
}

/// Greedy placement by decreasing size: each buffer takes the lowest offset that overlaps no
/// already-placed buffer alive at the same time. `elem_bytes(dtype)` sizes the elements.
pub fn plan_memory(p: &Program, elem_bytes: impl Fn(DType) -> usize) -> MemoryPlan {
    plan_memory_extended(p, elem_bytes, &[], &[])
}

/// [`plan_memory`], with buffer `b` of each `(b, si)` in `extend` kept live through step `si`
/// at least (a kernel that runs two steps at the later one reads the earlier one's input then),
/// and the buffers in `unused` given no space (offset `None`: nothing writes or reads them).
pub fn plan_memory_extended(
    p: &Program,
    elem_bytes: impl Fn(DType) -> usize,
    extend: &[(usize, usize)],
    unused: &[usize],
) -> MemoryPlan {
    let mut life = lifetimes(p);
    for &(b, si) in extend {
        if let Some((_, last)) = &mut life[b] {
            *last = (*last).max(si);
        }
    }
    for &b in unused {
        life[b] = None;
    }
    let size =
        |i: usize| (p.buffers[i].numel * elem_bytes(p.buffers[i].dtype)).div_ceil(ALIGN) * ALIGN;
    let mut order: Vec<usize> = (0..p.buffers.len())
        .filter(|&i| life[i].is_some())
        .collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(size(i)), i));
    let mut placed: Vec<(usize, usize, usize, usize)> = Vec::new(); // (offset, end, first, last)
    let mut offsets = vec![None; p.buffers.len()];
    let mut arena = 0;
    let mut unshared = 0;
    for i in order {
        let (f, l) = life[i].unwrap();
        let sz = size(i);
        unshared += sz;
        let mut busy: Vec<(usize, usize)> = placed
            .iter()
            .filter(|q| q.2 <= l && f <= q.3)
            .map(|q| (q.0, q.1))
            .collect();
        busy.sort();
        let mut at = 0;
        for (s, e) in busy {
            if at + sz <= s {
                break;
            }
            at = at.max(e);
        }
        placed.push((at, at + sz, f, l));
        offsets[i] = Some(at);
        arena = arena.max(at + sz);
    }
    MemoryPlan {
        offsets,
        arena_bytes: arena,
        unshared_bytes: unshared,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strided_merges_contiguous_axes_and_maps_a_transpose() {
        // [2, 3] transposed to [3, 2]
        let s = Strided::new(&[3, 2], &[1, 3], &[0, 0], &[2, 1]).unwrap();
        let got: Vec<i64> = (0..6).map(|i| s.offsets(i).0).collect();
        assert_eq!(got, vec![0, 3, 1, 4, 2, 5]);
        // a contiguous copy collapses to one axis
        let s = Strided::new(&[2, 3, 4], &[12, 4, 1], &[12, 4, 1], &[12, 4, 1]).unwrap();
        assert_eq!(s.rank, 1);
        assert_eq!(s.dims[0], 24);
        // broadcasting [3, 1] against [3, 4]
        let b = broadcast_strides(&[3, 1], &[3, 4]).unwrap();
        assert_eq!(b, vec![1, 0]);
        assert!(broadcast_strides(&[3, 2], &[3, 4]).is_err());
        assert_eq!(broadcast_shape(&[2, 1, 4], &[3, 1]).unwrap(), vec![2, 3, 4]);
    }

    #[test]
    fn reshapes_of_views_are_views_when_the_strides_allow() {
        // contiguous: any reshape
        let c = contiguous_strides(&[2, 3, 4]);
        assert_eq!(reshape_strides(&[2, 3, 4], &c, &[6, 4]), Some(vec![4, 1]));
        // (a size-1 axis may take any stride: 0 here)
        assert_eq!(
            reshape_strides(&[2, 3, 4], &c, &[2, 1, 12]),
            Some(vec![12, 0, 1])
        );
        // channels-last [N, C, H, W] (strides [HWC, 1, WC, C]) to [N, C, HW]: H and W merge
        let nhwc = dense_strides(&[2, 8, 3, 5], &channels_last_order(4));
        assert_eq!(nhwc, vec![120, 1, 40, 8]);
        assert_eq!(
            reshape_strides(&[2, 8, 3, 5], &nhwc, &[2, 8, 15]),
            Some(vec![120, 1, 8])
        );
        // ... and back, splitting HW
        assert_eq!(
            reshape_strides(&[2, 8, 15], &[120, 1, 8], &[2, 8, 3, 5]),
            Some(nhwc.clone())
        );
        // merging N with C is not a view of channels-last
        assert_eq!(reshape_strides(&[2, 8, 3, 5], &nhwc, &[16, 15]), None);
    }

    #[test]
    fn a_reshape_that_needs_a_copy_keeps_the_innermost_axis_innermost() {
        // motion-module exit: [B, F, C, HW] read from [B, HW, F, C] memory, to [B·F, C, H, W]
        let (b, f, c, hw) = (2, 3, 8, 6);
        let t = DevTensor {
            buf: 0,
            shape: vec![b, f, c, hw],
            strides: vec![(hw * f * c) as i64, c as i64, 1, (f * c) as i64],
        };
        assert_eq!(
            reshape_strides(&t.shape, &t.strides, &[b * f, c, 2, 3]),
            None
        );
        // copy as [B, F, HW, C]: the result is channels-last [B·F, C, 2, 3]
        let order = reshape_order(&t, &[b * f, c, 2, 3]).unwrap();
        assert_eq!(order, vec![0, 1, 3, 2]);
        let dense = dense_strides(&t.shape, &order);
        let st = reshape_strides(&t.shape, &dense, &[b * f, c, 2, 3]).unwrap();
        let v = DevTensor {
            buf: 0,
            shape: vec![b * f, c, 2, 3],
            strides: st,
        };
        assert_eq!(v.channels_last(), Some((b * f, c, 6)));
    }

    #[test]
    fn permute_matches_transpose() {
        // [2, 3] -> [3, 2]
        assert_eq!(
            permute(&[1, 2, 3, 4, 5, 6], &[2, 3], &[1, 0]),
            vec![1, 4, 2, 5, 3, 6]
        );
        // [O, C, kh, kw] -> [O, kh, kw, C]
        let w: Vec<i32> = (0..2 * 3 * 2 * 2).collect();
        let p = permute(&w, &[2, 3, 2, 2], &[0, 2, 3, 1]);
        // element [o, c, y, x] lands at [o, y, x, c]
        for (o, c, y, x) in [(1, 2, 0, 1), (0, 1, 1, 0)] {
            assert_eq!(
                p[((o * 2 + y) * 2 + x) * 3 + c],
                w[((o * 3 + c) * 2 + y) * 2 + x]
            );
        }
    }

    #[test]
    fn copies_with_a_contiguous_inner_axis_move_in_16_byte_units() {
        let z = [0; 3];
        // a concatenation slice: rows of 64 into rows of 128, at column 64
        let s = Strided::new(&[6, 4096, 64], &[262144, 64, 1], &z, &[524288, 128, 1]).unwrap();
        let (u, i, o) = s.in_units(8, 0, 64).unwrap();
        assert_eq!((u.dims[u.rank as usize - 1], i, o), (8, 0, 8));
        assert_eq!(u.numel() * 8, s.numel());
        // every unit's offsets are the element offsets / 8
        for e in [0, 1, 7, 8, 100, u.numel() as i64 - 1] {
            let (a, _, c) = u.offsets(e);
            let (ea, _, ec) = s.offsets(e * 8);
            assert_eq!((a * 8, c * 8 + 64), (ea, ec + 64));
        }
        // inner axis not contiguous on one side, or not divisible: no
        let t = Strided::new(&[40, 50], &[50, 1], &[0, 0], &[1, 40]).unwrap();
        assert!(t.in_units(8, 0, 0).is_none());
        let t = Strided::new(&[3, 12], &[12, 1], &[0, 0], &[24, 1]).unwrap();
        assert!(t.in_units(8, 0, 0).is_none());
        assert!(s.in_units(8, 0, 4).is_none());
    }

    /// Channels-last copies described in NCHW's axis order (the contiguous channel axis in the
    /// middle) are visited in the output's order: then 16 bytes a thread, the same elements.
    #[test]
    fn copies_are_visited_in_the_outputs_axis_order() {
        let pairs = |s: &Strided| {
            let mut v: Vec<(i64, i64)> = (0..s.numel() as i64)
                .map(|e| {
                    let (a, _, c) = s.offsets(e);
                    (a, c)
                })
                .collect();
            v.sort();
            v
        };
        // a concatenation's first input, [N, C, HW] channels-last: C = 16 of a row of 48
        let s = Strided::new(&[2, 16, 5], &[80, 1, 16], &[0; 3], &[240, 1, 48]).unwrap();
        assert!(s.transpose_axes().is_none() && s.in_units(8, 0, 0).is_none());
        let o = s.output_ordered();
        assert_eq!(o.c[o.rank as usize - 1], 1);
        assert_eq!(pairs(&o), pairs(&s));
        let (u, _, _) = o.in_units(8, 0, 32).unwrap();
        assert_eq!(u.numel() * 8, s.numel());
        // a nearest 2× upsample, [N, C, H, 2, W, 2] channels-last (the input read twice per axis)
        let s = Strided::new(
            &[2, 16, 3, 2, 3, 2],
            &[144, 1, 48, 0, 16, 0],
            &[0; 6],
            &[576, 1, 192, 96, 32, 16],
        )
        .unwrap();
        assert!(s.in_units(8, 0, 0).is_none());
        let o = s.output_ordered();
        assert_eq!(pairs(&o), pairs(&s));
        assert!(o.in_units(8, 0, 0).is_some());
        // already in order: unchanged
        let t = Strided::new(&[6, 4096, 64], &[262144, 64, 1], &[0; 3], &[524288, 128, 1]).unwrap();
        assert_eq!(t.output_ordered(), t);
    }

    #[test]
    fn transposing_copies_are_recognised() {
        let z = [0; 4];
        // [N, C, HW] -> [N, HW, C] (tokens from NCHW): axis 2 read contiguously, axis 1 written
        let s = Strided::new(
            &[2, 320, 4096],
            &[320 * 4096, 4096, 1],
            &z,
            &[320 * 4096, 1, 320],
        );
        assert_eq!(s.unwrap().transpose_axes(), Some((2, 1)));
        // a contiguous copy (one merged axis), a concatenation slice, a tiny transpose: no
        let s = Strided::new(&[2, 3, 4], &[12, 4, 1], &z, &[12, 4, 1]).unwrap();
        assert_eq!(s.transpose_axes(), None);
        let s = Strided::new(&[2, 64, 64], &[4096, 64, 1], &z, &[8192, 64, 1]).unwrap();
        assert_eq!(s.transpose_axes(), None);
        let s = Strided::new(&[3, 4], &[1, 3], &z, &[4, 1]).unwrap();
        assert_eq!(s.transpose_axes(), None);
    }

    fn prog(buffers: usize, steps: Vec<Step>, outputs: &[usize]) -> Program {
        Program {
            buffers: (0..buffers)
                .map(|i| Buffer {
                    numel: 64 * (i + 1),
                    dtype: DType::Float,
                    kind: if i == 0 {
                        BufferKind::Input("x".into())
                    } else {
                        BufferKind::Activation
                    },
                })
                .collect(),
            steps,
            inputs: vec![],
            input_transforms: Vec::new(),
            outputs: outputs
                .iter()
                .map(|&b| (format!("o{b}"), DevTensor::new(b, vec![1])))
                .collect(),
            nodes: 0,
        }
    }

    fn un(out: usize, inp: usize) -> Step {
        Step::Unary {
            out,
            inp,
            op: UnaryOp::Neg,
            n: 1,
        }
    }

    #[test]
    fn memory_plan_reuses_dead_buffers_and_never_overlaps_live_ones() {
        // a chain 0 -> 1 -> 2 -> 3 -> 4: only neighbours are alive together
        let p = prog(5, vec![un(1, 0), un(2, 1), un(3, 2), un(4, 3)], &[4]);
        let plan = plan_memory(&p, |_| 4);
        let life = lifetimes(&p);
        for i in 0..5 {
            for j in 0..5 {
                if i == j {
                    continue;
                }
                let (fi, li) = life[i].unwrap();
                let (fj, lj) = life[j].unwrap();
                if fi <= lj && fj <= li {
                    let (oi, oj) = (plan.offsets[i].unwrap(), plan.offsets[j].unwrap());
                    let si = p.buffers[i].numel * 4;
                    let sj = p.buffers[j].numel * 4;
                    assert!(oi + si <= oj || oj + sj <= oi, "{i} and {j} overlap");
                }
            }
        }
        assert!(plan.arena_bytes < plan.unshared_bytes, "{plan:?}");
        // the two largest neighbours bound the arena: 4 and 5 units of 256 bytes
        assert_eq!(plan.arena_bytes, (4 + 5) * 256);
    }

    #[test]
    fn outputs_stay_alive_to_the_end() {
        // 1 is an output computed first; 2 and 3 come later and must not take its place
        let p = prog(4, vec![un(1, 0), un(2, 0), un(3, 2)], &[1, 3]);
        let plan = plan_memory(&p, |_| 4);
        let o1 = plan.offsets[1].unwrap();
        for b in [2, 3] {
            let o = plan.offsets[b].unwrap();
            let (s1, sb) = (p.buffers[1].numel * 4, p.buffers[b].numel * 4);
            assert!(o1 + s1 <= o || o + sb <= o1);
        }
    }

    struct NoInitializers;
    impl InitializerSource for NoInitializers {
        fn f32s(&self, t: &TensorProto) -> Result<Vec<f32>, EngineError> {
            Err(err(format!("no initializer {}", t.name)))
        }
        fn i64s(&self, t: &TensorProto) -> Result<Vec<i64>, EngineError> {
            Err(err(format!("no initializer {}", t.name)))
        }
    }

    /// A graph of one `com.motionrt.TemporalAttention` over graph inputs q, k, v.
    fn attention_model(heads: usize) -> ModelProto {
        use motionrt_onnx::proto::GraphProto;
        use motionrt_onnx::{attr_int, value_info, Dim};
        let io = |n: &str| {
            let d: Vec<Dim> = ["n", "l", "c"]
                .iter()
                .map(|s| Dim::Symbolic(format!("{n}{s}")))
                .collect();
            value_info(n, TensorProtoDataType::Float, &d)
        };
        ModelProto {
            graph: Some(GraphProto {
                node: vec![NodeProto {
                    name: "attn".into(),
                    op_type: "TemporalAttention".into(),
                    domain: motionrt_kernels::DOMAIN.into(),
                    input: vec!["q".into(), "k".into(), "v".into()],
                    output: vec!["y".into()],
                    attribute: vec![attr_int("num_heads", heads as i64)],
                    ..Default::default()
                }],
                input: vec![io("q"), io("k"), io("v")],
                output: vec![io("y")],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// A graph over named inputs (float unless listed in `ints`) and initializers.
    fn graph(
        nodes: Vec<NodeProto>,
        inputs: &[&str],
        ints: &[&str],
        inits: Vec<TensorProto>,
        output: &str,
    ) -> ModelProto {
        use motionrt_onnx::proto::GraphProto;
        use motionrt_onnx::{value_info, Dim};
        let io = |n: &str| {
            let t = if ints.contains(&n) {
                TensorProtoDataType::Int64
            } else {
                TensorProtoDataType::Float
            };
            value_info(n, t, &[Dim::Symbolic(format!("{n}0"))])
        };
        ModelProto {
            graph: Some(GraphProto {
                node: nodes,
                input: inputs.iter().map(|n| io(n)).collect(),
                output: vec![io(output)],
                initializer: inits,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn node(op: &str, ins: &[&str], out: &str, attribute: Vec<AttributeProto>) -> NodeProto {
        NodeProto {
            name: out.into(),
            op_type: op.into(),
            input: ins.iter().map(|s| s.to_string()).collect(),
            output: vec![out.into()],
            attribute,
            ..Default::default()
        }
    }

    use super::super::file::InlineInitializers as Inline;

    #[test]
    fn flatten_takes_a_negative_axis_from_the_end() {
        use motionrt_onnx::attr_int;
        let m = graph(
            vec![
                node("Flatten", &["x"], "f", vec![attr_int("axis", -1)]),
                node("Softmax", &["f"], "y", vec![]),
            ],
            &["x"],
            &[],
            vec![],
            "y",
        );
        let p = compile(&m, &[("x", vec![2, 3, 4])], &Inline, Layout::Nhwc).unwrap();
        assert_eq!(p.outputs[0].1.shape, vec![6, 4]);
        let x: Vec<f32> = (0..24).map(|v| v as f32 / 7.0).collect();
        let inputs: HashMap<String, Vec<f32>> = [("x".to_string(), x.clone())].into();
        let out = super::super::cpu_exec::run(&p, &inputs, &HashMap::new(), &|n: &str| {
            Err(err(format!("no weight {n}")))
        })
        .unwrap();
        for r in 0..6 {
            let row = &x[r * 4..r * 4 + 4];
            let z: f32 = row.iter().map(|v| v.exp()).sum();
            for (c, v) in row.iter().enumerate() {
                assert!((out[0].2[r * 4 + c] - v.exp() / z).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn int64_views_are_copied_as_int64() {
        use motionrt_onnx::{attr_ints, tensor_f32};
        // ids [2, 3] transposed to [3, 2], then rows of a table gathered by them
        let table: Vec<f32> = (0..40).map(|v| v as f32).collect();
        let m = graph(
            vec![
                node("Transpose", &["ids"], "t", vec![attr_ints("perm", &[1, 0])]),
                node("Gather", &["table", "t"], "y", vec![]),
            ],
            &["ids"],
            &["ids"],
            vec![tensor_f32("table", &[10, 4], &table)],
            "y",
        );
        let p = compile(&m, &[("ids", vec![2, 3])], &Inline, Layout::Nhwc).unwrap();
        let ids = vec![1i64, 2, 3, 7, 8, 9];
        let out = super::super::cpu_exec::run(
            &p,
            &HashMap::new(),
            &[("ids".to_string(), ids.clone())].into(),
            &|n: &str| Err(err(format!("no weight {n}"))),
        )
        .unwrap();
        let t = [1, 7, 2, 8, 3, 9]; // ids transposed
        let want: Vec<f32> = t
            .iter()
            .flat_map(|&r| table[r * 4..r * 4 + 4].to_vec())
            .collect();
        assert_eq!(out[0].2, want);
        // a cast of a device tensor between integer and float is refused, not aliased
        let m = graph(
            vec![node(
                "Cast",
                &["ids"],
                "y",
                vec![motionrt_onnx::attr_int("to", 1)],
            )],
            &["ids"],
            &["ids"],
            vec![],
            "y",
        );
        let e = compile(&m, &[("ids", vec![2, 3])], &Inline, Layout::Nhwc).unwrap_err();
        assert!(e.to_string().contains("integer and float"), "{e}");
    }

    #[test]
    fn the_timestep_embedding_is_computed_on_the_host_in_float32() {
        use motionrt_onnx::{attr_int, attr_ints, tensor_f32, tensor_i64};
        let half = 4;
        let freqs: Vec<f32> = (0..half)
            .map(|i| (-(10000f32).ln() * i as f32 / half as f32).exp())
            .collect();
        #[derive(Clone, Copy, Default)]
        struct V {
            sin_first: bool,
            freqs_1d: bool,
            axes_attr: bool,
            axis_neg: bool,
            // not the exporter's pattern: the device path stays
            reuse_product: bool,
            three_way_concat: bool,
        }
        let model = |v: V| {
            let unsqueeze = if v.axes_attr {
                node("Unsqueeze", &["t"], "u", vec![attr_ints("axes", &[1])])
            } else {
                node("Unsqueeze", &["t", "axes"], "u", vec![])
            };
            let cat: &[&str] = match (v.sin_first, v.three_way_concat) {
                (_, true) => &["c", "s", "c"],
                (true, false) => &["s", "c"],
                (false, false) => &["c", "s"],
            };
            let axis = if v.axis_neg { -1 } else { 1 };
            let mut nodes = vec![
                unsqueeze,
                node("Mul", &["u", "f"], "m", vec![]),
                node("Sin", &["m"], "s", vec![]),
                node("Cos", &["m"], "c", vec![]),
                node("Concat", cat, "e", vec![attr_int("axis", axis)]),
                node("Neg", &["e"], "y", vec![]),
            ];
            if v.reuse_product {
                nodes.push(node("Neg", &["m"], "y2", vec![]));
            }
            let fdims: &[i64] = if v.freqs_1d {
                &[half as i64]
            } else {
                &[1, half as i64]
            };
            graph(
                nodes,
                &["t"],
                &[],
                vec![
                    tensor_i64("axes", &[1], &[1]),
                    tensor_f32("f", fdims, &freqs),
                ],
                "y",
            )
        };
        let t = vec![981.0f32, 20.5];
        let want = |v: V| -> Vec<f32> {
            t.iter()
                .flat_map(|&ti| {
                    let a: Vec<f64> = freqs.iter().map(|&f| (ti * f) as f64).collect();
                    let cos: Vec<f32> = a.iter().map(|x| -(x.cos() as f32)).collect();
                    let sin: Vec<f32> = a.iter().map(|x| -(x.sin() as f32)).collect();
                    match (v.sin_first, v.three_way_concat) {
                        (_, true) => [cos.clone(), sin, cos].concat(),
                        (true, false) => [sin, cos].concat(),
                        (false, false) => [cos, sin].concat(),
                    }
                })
                .collect()
        };
        let inputs: HashMap<String, Vec<f32>> = [("t".to_string(), t.clone())].into();
        let d = V::default();
        for (v, host) in [
            (d, true),
            (
                V {
                    sin_first: true,
                    ..d
                },
                true,
            ),
            (
                V {
                    freqs_1d: true,
                    ..d
                },
                true,
            ),
            (
                V {
                    axes_attr: true,
                    ..d
                },
                true,
            ),
            (
                V {
                    axis_neg: true,
                    ..d
                },
                true,
            ),
            (
                V {
                    reuse_product: true,
                    ..d
                },
                false,
            ),
            (
                V {
                    three_way_concat: true,
                    ..d
                },
                false,
            ),
        ] {
            let p = compile(&model(v), &[("t", vec![2])], &Inline, Layout::Nhwc).unwrap();
            assert_eq!(p.input_transforms.len(), usize::from(host));
            let sincos = p
                .steps
                .iter()
                .filter(|s| {
                    matches!(
                        s,
                        Step::Unary {
                            op: UnaryOp::Sin | UnaryOp::Cos,
                            ..
                        }
                    )
                })
                .count();
            assert_eq!(sincos, if host { 0 } else { 2 });
            let out = super::super::cpu_exec::run(&p, &inputs, &HashMap::new(), &|n: &str| {
                Err(err(format!("no weight {n}")))
            })
            .unwrap();
            let w = want(v);
            assert_eq!(out[0].2.len(), w.len());
            for (g, w) in out[0].2.iter().zip(&w) {
                assert!((g - w).abs() < 1e-6, "{host}: {g} vs {w}");
            }
        }
    }

    #[test]
    fn size_one_axes_and_empty_tensors_keep_views_simple() {
        // an unsqueezed [3, 4] (new axis of stride 0) is dense with the new axis outermost
        let t = DevTensor {
            buf: 0,
            shape: vec![1, 3, 4],
            strides: vec![0, 4, 1],
        };
        assert_eq!(t.dense_order(), Some(vec![0, 1, 2]));
        // empty tensors reshape freely
        assert_eq!(reshape_strides(&[0, 4], &[4, 1], &[4, 0]), Some(vec![0, 1]));
        assert_eq!(reshape_strides(&[2, 0], &[0, 1], &[0]), Some(vec![1]));
    }

    /// The attention model compiled for q `[n, l, c]`, k and v `[n, s, c]`, channels-last.
    fn compile_attention(m: &ModelProto, [n, l, s, c]: [usize; 4]) -> Program {
        let shapes = [
            ("q", vec![n, l, c]),
            ("k", vec![n, s, c]),
            ("v", vec![n, s, c]),
        ];
        compile(m, &shapes, &NoInitializers, Layout::Nhwc).unwrap()
    }

    /// Runs an attention program on the CPU interpreter and the same attention on the reference
    /// kernel (random q, k, v from `seed`); panics unless they agree within 1e-5 of the largest
    /// reference value. `what` names the case in the message.
    fn assert_attention_program_matches(
        p: &Program,
        [n, l, s, heads, d]: [usize; 5],
        scale: Option<f32>,
        seed: u64,
        what: &str,
    ) {
        let c = heads * d;
        let mut rng = crate::rng::NormalRng::new(seed);
        let mut data = |len: usize| -> Vec<f32> { (0..len).map(|_| rng.normal()).collect() };
        let (q, k, v) = (data(n * l * c), data(n * s * c), data(n * s * c));
        let inputs: HashMap<String, Vec<f32>> = [("q", &q), ("k", &k), ("v", &v)]
            .into_iter()
            .map(|(a, b)| (a.to_string(), b.clone()))
            .collect();
        let out = super::super::cpu_exec::run(p, &inputs, &HashMap::new(), &|n: &str| {
            Err(err(format!("no weight {n}")))
        })
        .unwrap();
        assert_eq!(out[0].1, vec![n, l, c], "{what}");
        let mut a = motionrt_kernels::Attention::new(n, l, s, heads, d);
        if let Some(scale) = scale {
            a.scale = scale;
        }
        let mut want = vec![0f32; n * l * c];
        a.run(&q, &k, &v, None, &mut want).unwrap();
        assert!(out[0].2.iter().all(|x| x.is_finite()), "{what}: not finite");
        let max = want.iter().fold(0f32, |m, x| m.max(x.abs()));
        let e = out[0]
            .2
            .iter()
            .zip(&want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(e <= 1e-5 * max, "{what}: error {e} of {max}");
    }

    #[test]
    fn attention_with_a_scale_the_kernels_do_not_take_becomes_gemms() {
        // the tensor-core kernels take the max before scaling: only positive finite scales
        assert!(fused_attention_scale(0.125) && !fused_attention_scale(0.0));
        assert!(!fused_attention_scale(-0.5) && !fused_attention_scale(f32::NAN));
        assert!(!fused_attention_scale(f32::INFINITY));
        let (n, l, s, heads, d) = (2, 5, 6, 2, 40);
        let c = heads * d;
        for scale in [-0.3f32, 0.0] {
            let mut m = attention_model(heads);
            let node = &mut m.graph.as_mut().unwrap().node[0];
            node.attribute
                .push(motionrt_onnx::attr_float("scale", scale));
            let p = compile_attention(&m, [n, l, s, c]);
            let names: Vec<&str> = p.steps.iter().map(|s| s.name()).collect();
            assert!(!names.contains(&"attention"), "scale {scale}: {names:?}");
            let what = format!("scale {scale}");
            assert_attention_program_matches(&p, [n, l, s, heads, d], Some(scale), 7, &what);
        }
    }

    #[test]
    fn attention_the_kernels_do_not_take_becomes_gemms_and_a_softmax() {
        // d 12 (not 16-byte rows), 200 (too wide), 112 (no kernel built for it), 40 (fused)
        assert!(!fused_attention_head(112) && !fused_attention_head(144));
        assert!(fused_attention_head(120) && fused_attention_head(8) && fused_attention_head(160));
        for (n, l, s, heads, d) in [(2, 5, 7, 3, 12), (1, 9, 9, 1, 200), (2, 6, 4, 2, 40)] {
            let c = heads * d;
            let m = attention_model(heads);
            let p = compile_attention(&m, [n, l, s, c]);
            let names: Vec<&str> = p.steps.iter().map(|s| s.name()).collect();
            if fused_attention_head(d) {
                assert_eq!(names, ["attention"]);
                continue;
            }
            // heads to the front and back (copies) only when there are several
            let copies = if heads == 1 { 0 } else { 4 };
            assert_eq!(
                names.iter().filter(|&&x| x == "copy").count(),
                copies,
                "{names:?}"
            );
            assert_eq!(
                names.iter().filter(|&&x| x == "matmul").count(),
                2,
                "{names:?}"
            );
            assert!(!names.contains(&"attention"), "{names:?}");
            let what = format!("N {n} L {l} S {s} {heads}x{d}");
            let seed = n as u64 * 31 + d as u64;
            assert_attention_program_matches(&p, [n, l, s, heads, d], None, seed, &what);
        }
    }
}
