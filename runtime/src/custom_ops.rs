//! The `com.motionrt` operators (`docs/operators.md`) registered with ONNX Runtime, so graphs
//! exported with `--fused-attention` run on the CPU: the CPU implementations of
//! `motionrt-kernels`, for float32 and float16 tensors (float16 computed in float32).

use motionrt_kernels::{fused, winograd, Attention, SparseCausal, DOMAIN};
use ort::operator::{
    ComputeContext, Kernel, KernelContext, Operator, OperatorDomain, OperatorInput, OperatorOutput,
    ShapeInferenceContext,
};
use ort::value::{Shape, SymbolicDimensions, TensorElementType, ValueType};

/// The element type one registration handles.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Elem {
    F32,
    F16,
}

impl Elem {
    fn ty(self) -> TensorElementType {
        match self {
            Elem::F32 => TensorElementType::Float32,
            Elem::F16 => TensorElementType::Float16,
        }
    }
}

fn err(op: &str, msg: impl std::fmt::Display) -> ort::Error {
    ort::Error::new(format!("{DOMAIN}.{op}: {msg}"))
}

/// Input `i` as float32 values with its shape (float16 widened).
fn input_f32(
    ctx: &ComputeContext,
    op: &str,
    i: usize,
    elem: Elem,
) -> ort::Result<Option<(Vec<usize>, Vec<f32>)>> {
    let Some(v) = ctx.input(i)? else {
        return Ok(None);
    };
    let (shape, data) = match elem {
        Elem::F32 => {
            let (s, d) = v.try_extract_tensor::<f32>().map_err(|e| err(op, e))?;
            (s.to_vec(), d.to_vec())
        }
        Elem::F16 => {
            let (s, d) = v
                .try_extract_tensor::<half::f16>()
                .map_err(|e| err(op, e))?;
            (s.to_vec(), d.iter().map(|x| x.to_f32()).collect())
        }
    };
    Ok(Some((
        shape.iter().map(|&x| x.max(0) as usize).collect(),
        data,
    )))
}

fn write_output(
    ctx: &ComputeContext,
    op: &str,
    shape: &[usize],
    data: &[f32],
    elem: Elem,
) -> ort::Result<()> {
    let dims: Vec<i64> = shape.iter().map(|&x| x as i64).collect();
    let mut out = ctx.output(0, dims)?.ok_or_else(|| err(op, "no output 0"))?;
    match elem {
        Elem::F32 => {
            let (_, o) = out
                .try_extract_tensor_mut::<f32>()
                .map_err(|e| err(op, e))?;
            o.copy_from_slice(data);
        }
        Elem::F16 => {
            let (_, o) = out
                .try_extract_tensor_mut::<half::f16>()
                .map_err(|e| err(op, e))?;
            for (o, &x) in o.iter_mut().zip(data) {
                *o = half::f16::from_f32(x);
            }
        }
    }
    Ok(())
}

fn attr_heads(kctx: &KernelContext<'_>, op: &str) -> ort::Result<usize> {
    match kctx.get::<i64>("num_heads") {
        Some(h) if h > 0 => Ok(h as usize),
        Some(h) => Err(err(op, format!("num_heads must be positive, got {h}"))),
        None => Err(err(op, "attribute num_heads is required")),
    }
}

/// Shape inference: output 0 is input 0 with its last axis set by `last` (from the last axis of
/// input 0 and the first axis of input 1, -1 where unknown). Without it ONNX Runtime knows
/// nothing of the output and later shape arithmetic (`Shape → Slice → Resize`) fails to load.
fn infer_last_axis(
    ctx: &mut ShapeInferenceContext,
    last: impl Fn(i64, Option<i64>) -> i64,
) -> ort::Result<()> {
    let inputs = ctx.inputs();
    let Some(ValueType::Tensor {
        ty,
        shape,
        dimension_symbols,
    }) = inputs.first()
    else {
        return Ok(());
    };
    if shape.is_empty() {
        return Ok(());
    }
    let second = match inputs.get(1) {
        Some(ValueType::Tensor { shape, .. }) => shape.first().copied().filter(|&d| d >= 0),
        _ => None,
    };
    let mut dims: Vec<i64> = shape.to_vec();
    let mut symbols: Vec<String> = dimension_symbols.to_vec();
    let n = dims.len();
    let new = last(dims[n - 1], second);
    if new != dims[n - 1] {
        dims[n - 1] = new;
        if let Some(s) = symbols.get_mut(n - 1) {
            s.clear();
        }
    }
    // ONNX Runtime reads a -1 without a symbol as the value -1; an unknown dimension needs a
    // name of its own (unique, so no two unknowns are taken to be equal).
    static UNKNOWN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    symbols.resize(n, String::new());
    for (d, s) in dims.iter().zip(symbols.iter_mut()) {
        if *d < 0 && s.is_empty() {
            let k = UNKNOWN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            *s = format!("motionrt_unk_{k}");
        }
    }
    let out = ValueType::Tensor {
        ty: *ty,
        shape: Shape::new(dims),
        dimension_symbols: SymbolicDimensions::new(symbols),
    };
    ctx.set_output(0, &out)
}

fn infer_same(ctx: &mut ShapeInferenceContext) -> ort::Result<()> {
    infer_last_axis(ctx, |d, _| d)
}

struct TemporalAttentionOp(Elem);

struct TemporalKernel {
    heads: usize,
    scale: Option<f32>,
    elem: Elem,
}

const TEMPORAL: &str = "TemporalAttention";
const SPARSE: &str = "SparseCausalAttention";

impl Kernel for TemporalKernel {
    fn compute(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let need = |i, name| -> ort::Result<(Vec<usize>, Vec<f32>)> {
            input_f32(ctx, TEMPORAL, i, self.elem)?
                .ok_or_else(|| err(TEMPORAL, format!("input {name} is required")))
        };
        let (qs, q) = need(0, "Q")?;
        let (ks, k) = need(1, "K")?;
        let (_, v) = need(2, "V")?;
        let bias = input_f32(ctx, TEMPORAL, 3, self.elem)?;
        if qs.len() != 3 || ks.len() != 3 {
            return Err(err(
                TEMPORAL,
                format!("Q and K must be [N, L, C], got {qs:?} and {ks:?}"),
            ));
        }
        let c = qs[2];
        if c % self.heads != 0 {
            return Err(err(
                TEMPORAL,
                format!("channels {c} are not divisible by num_heads {}", self.heads),
            ));
        }
        let mut a = Attention::new(qs[0], qs[1], ks[1], self.heads, c / self.heads);
        if let Some(s) = self.scale {
            a.scale = s;
        }
        let mut out = vec![0f32; q.len()];
        a.run(&q, &k, &v, bias.as_ref().map(|b| b.1.as_slice()), &mut out)
            .map_err(|e| ort::Error::new(e.to_string()))?;
        write_output(ctx, TEMPORAL, &qs, &out, self.elem)
    }
}

impl Operator for TemporalAttentionOp {
    type Kernel<'a> = TemporalKernel;

    fn name(&self) -> &str {
        TEMPORAL
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        let t = self.0.ty();
        [
            OperatorInput::required(t),
            OperatorInput::required(t),
            OperatorInput::required(t),
            OperatorInput::optional(t),
        ]
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        [OperatorOutput::required(self.0.ty())]
    }

    fn infer_shape(&self, ctx: &mut ShapeInferenceContext) -> ort::Result<()> {
        infer_same(ctx)
    }

    fn create_kernel<'a>(&self, kctx: &KernelContext<'a>) -> ort::Result<Self::Kernel<'a>> {
        Ok(TemporalKernel {
            heads: attr_heads(kctx, TEMPORAL)?,
            scale: kctx.get::<f32>("scale"),
            elem: self.0,
        })
    }
}

struct SparseCausalOp(Elem);

struct SparseKernel {
    heads: usize,
    frames: Option<usize>,
    scale: Option<f32>,
    elem: Elem,
}

impl Kernel for SparseKernel {
    fn compute(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let need = |i, name| -> ort::Result<(Vec<usize>, Vec<f32>)> {
            input_f32(ctx, SPARSE, i, self.elem)?
                .ok_or_else(|| err(SPARSE, format!("input {name} is required")))
        };
        let (qs, q) = need(0, "Q")?;
        let (_, k) = need(1, "K")?;
        let (_, v) = need(2, "V")?;
        if qs.len() != 3 {
            return Err(err(SPARSE, format!("Q must be [B·F, S, C], got {qs:?}")));
        }
        let frames = match (self.frames, ctx.input(3)?) {
            (Some(f), _) => f,
            (None, Some(v)) => {
                let (_, d) = v.try_extract_tensor::<i64>().map_err(|e| err(SPARSE, e))?;
                match d.first() {
                    Some(&f) if f > 0 => f as usize,
                    _ => {
                        return Err(err(
                            SPARSE,
                            format!("input frames must hold one positive count, got {d:?}"),
                        ))
                    }
                }
            }
            (None, None) => {
                return Err(err(
                    SPARSE,
                    "give the frame count: attribute frames or input 3",
                ))
            }
        };
        if qs[0] % frames != 0 {
            return Err(err(
                SPARSE,
                format!("the batch {} is not a multiple of frames = {frames}", qs[0]),
            ));
        }
        let c = qs[2];
        if c % self.heads != 0 {
            return Err(err(
                SPARSE,
                format!("channels {c} are not divisible by num_heads {}", self.heads),
            ));
        }
        let mut op = SparseCausal::new(qs[0] / frames, frames, qs[1], self.heads, c / self.heads);
        if let Some(s) = self.scale {
            op.scale = s;
        }
        let mut out = vec![0f32; q.len()];
        op.run(&q, &k, &v, &mut out)
            .map_err(|e| ort::Error::new(e.to_string()))?;
        write_output(ctx, SPARSE, &qs, &out, self.elem)
    }
}

impl Operator for SparseCausalOp {
    type Kernel<'a> = SparseKernel;

    fn name(&self) -> &str {
        SPARSE
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        let t = self.0.ty();
        [
            OperatorInput::required(t),
            OperatorInput::required(t),
            OperatorInput::required(t),
            OperatorInput::optional(TensorElementType::Int64),
        ]
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        [OperatorOutput::required(self.0.ty())]
    }

    fn create_kernel<'a>(&self, kctx: &KernelContext<'a>) -> ort::Result<Self::Kernel<'a>> {
        // the frame count: the attribute, or else input 3 at run time
        let frames = match kctx.get::<i64>("frames") {
            Some(f) if f > 0 => Some(f as usize),
            Some(f) => return Err(err(SPARSE, format!("frames must be positive, got {f}"))),
            None => None,
        };
        Ok(SparseKernel {
            heads: attr_heads(kctx, SPARSE)?,
            frames,
            scale: kctx.get::<f32>("scale"),
            elem: self.0,
        })
    }
}

const WINO_IN: &str = "WinogradInput";
const WINO_OUT: &str = "WinogradOutput";

/// `com.motionrt.WinogradInput`: `X [N, C, H, W]` → the transformed tiles `V [16, C, T]`.
struct WinogradInputOp;

struct WinogradInputKernel;

impl Kernel for WinogradInputKernel {
    fn compute(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let x = ctx
            .input(0)?
            .ok_or_else(|| err(WINO_IN, "input X is required"))?;
        let (xs, xd) = x.try_extract_tensor::<f32>().map_err(|e| err(WINO_IN, e))?;
        let &[n, c, h, w] = &xs[..] else {
            return Err(err(WINO_IN, format!("X must be [N, C, H, W], got {xs:?}")));
        };
        let (n, c, h, w) = (n as usize, c as usize, h as usize, w as usize);
        let (th, tw) = winograd::tiles(h, w);
        let t = n * th * tw;
        let mut out = ctx
            .output(0, vec![16, c as i64, t as i64])?
            .ok_or_else(|| err(WINO_IN, "no output 0"))?;
        let (_, v) = out
            .try_extract_tensor_mut::<f32>()
            .map_err(|e| err(WINO_IN, e))?;
        winograd::input_transform(xd, n, c, h, w, v).map_err(|e| err(WINO_IN, e))
    }
}

impl Operator for WinogradInputOp {
    type Kernel<'a> = WinogradInputKernel;

    fn name(&self) -> &str {
        WINO_IN
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        [OperatorInput::required(TensorElementType::Float32)]
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        [OperatorOutput::required(TensorElementType::Float32)]
    }

    fn create_kernel<'a>(&self, _: &KernelContext<'a>) -> ort::Result<Self::Kernel<'a>> {
        Ok(WinogradInputKernel)
    }
}

/// `com.motionrt.WinogradOutput`: the GEMM result `M [16, O, T]`, the input's shape
/// (`Shape(X)`, int64 `[4]`) and an optional bias `[O]` → `Y [N, O, H, W]`.
struct WinogradOutputOp;

struct WinogradOutputKernel;

impl Kernel for WinogradOutputKernel {
    fn compute(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let m = ctx
            .input(0)?
            .ok_or_else(|| err(WINO_OUT, "input M is required"))?;
        let (ms, md) = m
            .try_extract_tensor::<f32>()
            .map_err(|e| err(WINO_OUT, e))?;
        let shape = ctx
            .input(1)?
            .ok_or_else(|| err(WINO_OUT, "input shape is required"))?;
        let (_, sd) = shape
            .try_extract_tensor::<i64>()
            .map_err(|e| err(WINO_OUT, e))?;
        let &[n, _, h, w] = sd else {
            return Err(err(
                WINO_OUT,
                format!("shape must hold the 4 dims of X, got {sd:?}"),
            ));
        };
        let &[16, o, _] = &ms[..] else {
            return Err(err(WINO_OUT, format!("M must be [16, O, T], got {ms:?}")));
        };
        let bias = ctx.input(2)?;
        let bias = match &bias {
            Some(b) => Some(
                b.try_extract_tensor::<f32>()
                    .map_err(|e| err(WINO_OUT, e))?
                    .1,
            ),
            None => None,
        };
        let mut out = ctx
            .output(0, vec![n, o, h, w])?
            .ok_or_else(|| err(WINO_OUT, "no output 0"))?;
        let (_, y) = out
            .try_extract_tensor_mut::<f32>()
            .map_err(|e| err(WINO_OUT, e))?;
        winograd::output_transform(md, n as usize, o as usize, h as usize, w as usize, bias, y)
            .map_err(|e| err(WINO_OUT, e))
    }
}

impl Operator for WinogradOutputOp {
    type Kernel<'a> = WinogradOutputKernel;

    fn name(&self) -> &str {
        WINO_OUT
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        [
            OperatorInput::required(TensorElementType::Float32),
            OperatorInput::required(TensorElementType::Int64),
            OperatorInput::optional(TensorElementType::Float32),
        ]
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        [OperatorOutput::required(TensorElementType::Float32)]
    }

    fn create_kernel<'a>(&self, _: &KernelContext<'a>) -> ort::Result<Self::Kernel<'a>> {
        Ok(WinogradOutputKernel)
    }
}

/// Input `i` of a float32-only operator, with its shape.
fn f32_input(
    ctx: &ComputeContext,
    op: &str,
    i: usize,
) -> ort::Result<Option<(Vec<usize>, Vec<f32>)>> {
    input_f32(ctx, op, i, Elem::F32)
}

const GROUP_NORM: &str = "GroupNorm";
const LINEAR: &str = "Linear";
const GEGLU: &str = "Geglu";

/// `com.motionrt.GroupNorm(X, scale, bias)`: attributes `num_groups`, `epsilon`, `activation`
/// (`"none"` or `"silu"`).
struct GroupNormOp;

struct GroupNormKernel {
    groups: usize,
    eps: f32,
    silu: bool,
}

impl Kernel for GroupNormKernel {
    fn compute(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let need = |i, name| -> ort::Result<(Vec<usize>, Vec<f32>)> {
            f32_input(ctx, GROUP_NORM, i)?
                .ok_or_else(|| err(GROUP_NORM, format!("input {name} is required")))
        };
        let (xs, x) = need(0, "X")?;
        let (_, gamma) = need(1, "scale")?;
        let (_, beta) = need(2, "bias")?;
        let y = fused::group_norm(&x, &xs, &gamma, &beta, self.groups, self.eps, self.silu)
            .map_err(|e| err(GROUP_NORM, e))?;
        write_output(ctx, GROUP_NORM, &xs, &y, Elem::F32)
    }
}

impl Operator for GroupNormOp {
    type Kernel<'a> = GroupNormKernel;

    fn name(&self) -> &str {
        GROUP_NORM
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        (0..3).map(|_| OperatorInput::required(TensorElementType::Float32))
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        [OperatorOutput::required(TensorElementType::Float32)]
    }

    fn infer_shape(&self, ctx: &mut ShapeInferenceContext) -> ort::Result<()> {
        infer_same(ctx)
    }

    fn create_kernel<'a>(&self, kctx: &KernelContext<'a>) -> ort::Result<Self::Kernel<'a>> {
        let groups = match kctx.get::<i64>("num_groups") {
            Some(g) if g > 0 => g as usize,
            other => {
                return Err(err(
                    GROUP_NORM,
                    format!("attribute num_groups must be a positive int, got {other:?}"),
                ))
            }
        };
        let silu = match kctx.get::<String>("activation").as_deref() {
            None | Some("none") => false,
            Some("silu") => true,
            Some(a) => {
                return Err(err(
                    GROUP_NORM,
                    format!("activation must be \"none\" or \"silu\", got {a:?}"),
                ))
            }
        };
        Ok(GroupNormKernel {
            groups,
            eps: kctx.get::<f32>("epsilon").unwrap_or(1e-5),
            silu,
        })
    }
}

/// `com.motionrt.Linear(X [.., in], W [out, in], bias [out]?, residual [.., out]?)`.
struct LinearOp;

struct LinearKernel;

impl Kernel for LinearKernel {
    fn compute(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let (xs, x) =
            f32_input(ctx, LINEAR, 0)?.ok_or_else(|| err(LINEAR, "input X is required"))?;
        let (ws, w) =
            f32_input(ctx, LINEAR, 1)?.ok_or_else(|| err(LINEAR, "input W is required"))?;
        let bias = f32_input(ctx, LINEAR, 2)?;
        let residual = f32_input(ctx, LINEAR, 3)?;
        let (&[out, k], Some(&xk)) = (&ws[..], xs.last()) else {
            return Err(err(
                LINEAR,
                format!("W must be [out, in] and X [.., in], got {ws:?} and {xs:?}"),
            ));
        };
        if xk != k {
            return Err(err(
                LINEAR,
                format!("X {xs:?} has {xk} features, W {ws:?} expects {k}"),
            ));
        }
        let mut ys = xs.clone();
        *ys.last_mut().unwrap() = out;
        if let Some((rs, _)) = &residual {
            if *rs != ys {
                return Err(err(
                    LINEAR,
                    format!("residual {rs:?} must have the output's shape {ys:?}"),
                ));
            }
        }
        let rows = x.len() / k.max(1);
        let y = fused::linear(
            &x,
            rows,
            k,
            &w,
            out,
            bias.as_ref().map(|b| b.1.as_slice()),
            residual.as_ref().map(|r| r.1.as_slice()),
        )
        .map_err(|e| err(LINEAR, e))?;
        write_output(ctx, LINEAR, &ys, &y, Elem::F32)
    }
}

impl Operator for LinearOp {
    type Kernel<'a> = LinearKernel;

    fn name(&self) -> &str {
        LINEAR
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        let t = TensorElementType::Float32;
        [
            OperatorInput::required(t),
            OperatorInput::required(t),
            OperatorInput::optional(t),
            OperatorInput::optional(t),
        ]
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        [OperatorOutput::required(TensorElementType::Float32)]
    }

    fn infer_shape(&self, ctx: &mut ShapeInferenceContext) -> ort::Result<()> {
        infer_last_axis(ctx, |_, out| out.unwrap_or(-1))
    }

    fn create_kernel<'a>(&self, _: &KernelContext<'a>) -> ort::Result<Self::Kernel<'a>> {
        Ok(LinearKernel)
    }
}

/// `com.motionrt.Geglu(X [.., 2d]) → [.., d]`.
struct GegluOp;

struct GegluKernel;

impl Kernel for GegluKernel {
    fn compute(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let (xs, x) = f32_input(ctx, GEGLU, 0)?.ok_or_else(|| err(GEGLU, "input X is required"))?;
        let last = *xs.last().ok_or_else(|| err(GEGLU, "X must have an axis"))?;
        let y = fused::geglu(&x, last).map_err(|e| err(GEGLU, e))?;
        let mut ys = xs.clone();
        *ys.last_mut().unwrap() = last / 2;
        write_output(ctx, GEGLU, &ys, &y, Elem::F32)
    }
}

impl Operator for GegluOp {
    type Kernel<'a> = GegluKernel;

    fn name(&self) -> &str {
        GEGLU
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        [OperatorInput::required(TensorElementType::Float32)]
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        [OperatorOutput::required(TensorElementType::Float32)]
    }

    fn infer_shape(&self, ctx: &mut ShapeInferenceContext) -> ort::Result<()> {
        infer_last_axis(ctx, |d, _| if d >= 0 { d / 2 } else { -1 })
    }

    fn create_kernel<'a>(&self, _: &KernelContext<'a>) -> ort::Result<Self::Kernel<'a>> {
        Ok(GegluKernel)
    }
}

/// The `com.motionrt` domain with every operator (one per session: ONNX Runtime's domain
/// handles are not shareable across threads).
pub(crate) fn domain() -> Result<OperatorDomain, String> {
    let build = || -> ort::Result<OperatorDomain> {
        OperatorDomain::new(DOMAIN)?
            .add(TemporalAttentionOp(Elem::F32))?
            .add(TemporalAttentionOp(Elem::F16))?
            .add(SparseCausalOp(Elem::F32))?
            .add(SparseCausalOp(Elem::F16))?
            .add(WinogradInputOp)?
            .add(WinogradOutputOp)?
            .add(GroupNormOp)?
            .add(LinearOp)?
            .add(GegluOp)
    };
    build().map_err(|e| e.to_string())
}
