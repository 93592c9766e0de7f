//! A float32 CPU interpreter of compiled [`Program`]s: the reference the CUDA executor is
//! checked against, and how the host-side compiler (shape evaluation, aliases, strided copies,
//! epilogue fusion) is verified in CI without a GPU. Slow by design: direct convolution.

use std::collections::HashMap;

use motionrt_kernels::fused;
use motionrt_kernels::Attention;

use super::program::{permute, BinaryOp, BufferKind, Program, Step, UnaryOp, WeightSource};
use super::EngineError;

fn kerr(e: motionrt_kernels::KernelError) -> EngineError {
    EngineError::Graph(e.to_string())
}

/// Run `p` on float32 inputs (int64 inputs as `i64` through `ids`). `weight(name)` gives an
/// initializer's values.
pub fn run(
    p: &Program,
    inputs: &HashMap<String, Vec<f32>>,
    ids: &HashMap<String, Vec<i64>>,
    weight: &dyn Fn(&str) -> Result<Vec<f32>, EngineError>,
) -> Result<super::program::Outputs, EngineError> {
    run_traced(p, inputs, ids, weight, &mut |_, _| {})
}

/// [`run`], calling `each(step, values)` after every step with the float32 values of the buffer
/// it wrote (empty for an int64 buffer): how a device run is compared step by step
/// ([`super::localize`]).
pub fn run_traced(
    p: &Program,
    inputs: &HashMap<String, Vec<f32>>,
    ids: &HashMap<String, Vec<i64>>,
    weight: &dyn Fn(&str) -> Result<Vec<f32>, EngineError>,
    each: &mut dyn FnMut(usize, &[f32]),
) -> Result<super::program::Outputs, EngineError> {
    let mut f: Vec<Vec<f32>> = p.buffers.iter().map(|_| Vec::new()).collect();
    let mut i: Vec<Vec<i64>> = p.buffers.iter().map(|_| Vec::new()).collect();
    for (k, b) in p.buffers.iter().enumerate() {
        match &b.kind {
            BufferKind::Input(name) => {
                if let Some(v) = inputs.get(name) {
                    f[k] = p.host_input(name, v).into_owned();
                } else if let Some(v) = ids.get(name) {
                    i[k] = v.clone();
                } else {
                    return Err(EngineError::Graph(format!("input {name} not given")));
                }
            }
            BufferKind::Weight(WeightSource::Initializer(n)) => f[k] = weight(n)?,
            BufferKind::Weight(WeightSource::Permuted { name, dims, perm }) => {
                f[k] = permute(&weight(name)?, dims, perm)
            }
            BufferKind::Weight(WeightSource::Computed(v)) => f[k] = (**v).clone(),
            BufferKind::Weight(WeightSource::ComputedI64(v)) => i[k] = (**v).clone(),
            BufferKind::Weight(WeightSource::Concat(names)) => {
                let mut v = Vec::new();
                for n in names {
                    v.extend(weight(n)?);
                }
                f[k] = v;
            }
            BufferKind::Weight(WeightSource::Sum(names)) => {
                f[k] = super::program::sum_parts(names, b.numel, &mut |n| weight(n))?
            }
            BufferKind::Activation => f[k] = vec![f32::NAN; b.numel],
        }
    }
    let trace = std::env::var_os("MOTIONRT_TRACE").is_some();
    for (si, s) in p.steps.iter().enumerate() {
        if trace {
            let (reads, w) = s.io();
            let bad: Vec<usize> = reads
                .iter()
                .copied()
                .filter(|&r| r != w && f[r].iter().any(|v| v.is_nan()))
                .collect();
            if !bad.is_empty() {
                eprintln!(
                    "step {si} {} -> {w}: NaN in inputs {bad:?}: {s:?}",
                    s.name()
                );
                break;
            }
        }
        match s {
            Step::Copy {
                out,
                inp,
                s,
                in_off,
                out_off,
            } => {
                fn copy<T: Copy>(
                    dst: &mut [T],
                    src: &[T],
                    s: &super::program::Strided,
                    io: i64,
                    oo: i64,
                ) {
                    for e in 0..s.numel() as i64 {
                        let (a, _, c) = s.offsets(e);
                        dst[(oo + c) as usize] = src[(io + a) as usize];
                    }
                }
                if p.buffers[*out].dtype == super::program::DType::I64 {
                    if i[*out].is_empty() {
                        i[*out] = vec![0; p.buffers[*out].numel];
                    }
                    let src = i[*inp].clone();
                    copy(&mut i[*out], &src, s, *in_off, *out_off);
                } else {
                    let src = f[*inp].clone();
                    copy(&mut f[*out], &src, s, *in_off, *out_off);
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
                let (x, y) = (f[*a].clone(), f[*b].clone());
                let g = |u: f32, v: f32| match op {
                    BinaryOp::Add => u + v,
                    BinaryOp::Sub => u - v,
                    BinaryOp::Mul => u * v,
                    BinaryOp::Div => u / v,
                };
                f[*out] = (0..*n)
                    .map(|e| match s {
                        None => g(x[e], y[e]),
                        Some(s) => {
                            let (p, q, _) = s.offsets(e as i64);
                            g(x[p as usize], y[q as usize])
                        }
                    })
                    .collect();
            }
            Step::Unary { out, inp, op, n } => {
                let x = &f[*inp];
                let sig = |v: f32| 1.0 / (1.0 + (-v).exp());
                let y: Vec<f32> = x[..*n]
                    .iter()
                    .map(|&v| match op {
                        UnaryOp::Sigmoid => sig(v),
                        UnaryOp::Sin => v.sin(),
                        UnaryOp::Cos => v.cos(),
                        UnaryOp::Silu => v * sig(v),
                        UnaryOp::Neg => -v,
                    })
                    .collect();
                f[*out] = y;
            }
            Step::Fill { out, n, value } => {
                f[*out][..*n].fill(*value);
            }
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
                let y = fused::linear(
                    &f[*x][..m * k],
                    *m,
                    *k,
                    &f[*w],
                    *n,
                    bias.map(|b| f[b].as_slice()),
                    residual.map(|r| &f[r][..m * n]),
                )
                .map_err(kerr)?;
                f[*out] = y;
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
                let (x, y) = (&f[*a], &f[*b]);
                let mut o = vec![0f32; batch * m * n];
                let b_at = |e: usize, c: usize| if *trans_b { c * k + e } else { e * n + c };
                for bi in 0..*batch {
                    for r in 0..*m {
                        for c in 0..*n {
                            let mut acc = 0f64;
                            for e in 0..*k {
                                acc += x[(bi * m + r) * k + e] as f64
                                    * y[bi * b_stride + b_at(e, c)] as f64;
                            }
                            o[(bi * m + r) * n + c] = (*alpha as f64 * acc) as f32;
                        }
                    }
                }
                f[*out] = o;
            }
            Step::Conv(c) => {
                let d = super::launch::ConvDesc::leading(c);
                let mut y = conv2d(&d, &f[c.x], &f[c.w]);
                let [_, o, oh, ow] = c.y_shape;
                for (at, v) in y.iter_mut().enumerate() {
                    // channel and sample of flat output element `at`
                    let (oc, b) = if c.nhwc {
                        (at % o, at / (o * oh * ow))
                    } else {
                        ((at / (oh * ow)) % o, at / (o * oh * ow))
                    };
                    *v += c.bias.map_or(0.0, |bb| f[bb][oc])
                        + c.residual.map_or(0.0, |r| f[r][at])
                        + c.sample_bias.map_or(0.0, |sb| f[sb][b * o + oc]);
                }
                f[c.out] = y;
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
                // channels-last [n, spatial, c] through the NCHW reference and back
                let dims = [*n, *spatial, *c];
                let mut x = f[*x][..n * c * spatial].to_vec();
                if x_bias.is_some() || x_sbias.is_some() {
                    // channels innermost (only channels-last steps have input biases)
                    for (i, v) in x.iter_mut().enumerate() {
                        let (s, ch) = (i / (c * spatial), i % c);
                        if let Some(b) = x_bias {
                            *v += f[*b][ch];
                        }
                        if let Some(b) = x_sbias {
                            *v += f[*b][s * c + ch];
                        }
                    }
                }
                let xs = if *channels_last {
                    permute(&x, &dims, &[0, 2, 1])
                } else {
                    x
                };
                let y = fused::group_norm(
                    &xs,
                    &[*n, *c, *spatial],
                    &f[*gamma],
                    &f[*beta],
                    *groups,
                    *eps,
                    *silu,
                )
                .map_err(kerr)?;
                f[*out] = if *channels_last {
                    permute(&y, &[*n, *c, *spatial], &[0, 2, 1])
                } else {
                    y
                };
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
                let xv = &f[*x];
                let mut y = vec![0f32; rows * cols];
                for r in 0..*rows {
                    let row = &xv[r * cols..(r + 1) * cols];
                    let mean = row.iter().map(|&v| v as f64).sum::<f64>() / *cols as f64;
                    let var =
                        row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / *cols as f64;
                    let rstd = 1.0 / (var + *eps as f64).sqrt();
                    for j in 0..*cols {
                        let mut v = (row[j] as f64 - mean) * rstd * f[*gamma][j] as f64;
                        if let Some(b) = beta {
                            v += f[*b][j] as f64;
                        }
                        let mut v = v as f32;
                        if let Some((t, period, div)) = add {
                            v += f[*t][((r / div) % period) * cols + j];
                        }
                        y[r * cols + j] = v;
                    }
                }
                f[*out] = y;
            }
            Step::Softmax { out, x, rows, cols } => {
                let xv = &f[*x];
                let mut y = vec![0f32; rows * cols];
                for r in 0..*rows {
                    let row = &xv[r * cols..(r + 1) * cols];
                    let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                    let s: f64 = row.iter().map(|&v| ((v - m) as f64).exp()).sum();
                    for j in 0..*cols {
                        y[r * cols + j] = (((row[j] - m) as f64).exp() / s) as f32;
                    }
                }
                f[*out] = y;
            }
            Step::Geglu {
                out,
                x,
                bias,
                rows,
                d,
            } => {
                let mut xv = f[*x][..rows * 2 * d].to_vec();
                if let Some(b) = bias {
                    for (i, v) in xv.iter_mut().enumerate() {
                        *v += f[*b][i % (2 * d)];
                    }
                }
                f[*out] = fused::geglu(&xv, 2 * d).map_err(kerr)?;
            }
            Step::Gather {
                out,
                table,
                ids,
                n_ids,
                row,
                n_rows,
            } => {
                let mut y = vec![0f32; n_ids * row];
                for r in 0..*n_ids {
                    let id = i[*ids][r];
                    if id < 0 || id as usize >= *n_rows {
                        return Err(EngineError::Graph(format!(
                            "Gather: index {id} out of range 0..{n_rows}"
                        )));
                    }
                    y[r * row..(r + 1) * row]
                        .copy_from_slice(&f[*table][id as usize * row..(id as usize + 1) * row]);
                }
                f[*out] = y;
            }
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
                let mut a = Attention::new(*n, *l, *s, *heads, *d);
                a.scale = *scale;
                let c = heads * d;
                // the row of sequence i's token t (ns sequences interleaved)
                let row = |i: usize, t: usize, len: usize| (i / ns) * len * ns + i % ns + t * ns;
                // rows of c values at offs + row·ld, gathered in sequence order
                let rows = |b: usize, x: usize, len: usize| -> Vec<f32> {
                    (0..n * len)
                        .flat_map(|r| {
                            let at = offs[x] + row(r / len, r % len, len) * ld[x];
                            f[b][at..at + c].iter().copied()
                        })
                        .collect()
                };
                let (qv, kv, vv) = (rows(*q, 0, *l), rows(*k, 1, *s), rows(*v, 2, *s));
                let mut y = vec![0f32; n * l * c];
                a.run(&qv, &kv, &vv, bias.map(|b| f[b.0].as_slice()), &mut y)
                    .map_err(kerr)?;
                // back to the rows' order
                let mut o = vec![0f32; n * l * c];
                for r in 0..n * l {
                    let at = row(r / l, r % l, *l) * c;
                    o[at..at + c].copy_from_slice(&y[r * c..(r + 1) * c]);
                }
                f[*out] = o;
            }
        }
        each(si, &f[s.io().1]);
    }
    Ok(p.outputs
        .iter()
        .map(|(name, t)| {
            (
                name.clone(),
                t.shape.clone(),
                f[t.buf][..t.numel()].to_vec(),
            )
        })
        .collect())
}

/// A float64-accumulated dot product in 4 lanes (what the compiler vectorizes).
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f64 {
    let mut acc = [0f64; 4];
    let (ca, cb) = (a.chunks_exact(4), b.chunks_exact(4));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..4 {
            acc[l] += x[l] as f64 * y[l] as f64;
        }
    }
    let tail: f64 = ra.iter().zip(rb).map(|(x, y)| *x as f64 * *y as f64).sum();
    acc.iter().sum::<f64>() + tail
}

/// Cross-correlation `y = conv(x, w)` as `d` describes it (cuDNN's forward convolution):
/// dimensions in NCHW order, stored NCHW (filters `[k, c, r, s]`) or NHWC (filters
/// `[k, r, s, c]`); `pads` are the leading pads, the trailing ones follow from `d.y`.
pub fn conv2d(d: &super::launch::ConvDesc, x: &[f32], w: &[f32]) -> Vec<f32> {
    let [n, ci, h, wd] = d.x;
    let [ko, cg, r, s] = d.w;
    let [_, yc, yh, yw] = d.y;
    // channels-innermost copies, gathered through the stated format, so the sums run over
    // contiguous channels
    let xv: Vec<f32> = if d.nhwc {
        x.to_vec()
    } else {
        let mut v = vec![0f32; x.len()];
        for b in 0..n {
            for c in 0..ci {
                for p in 0..h * wd {
                    v[(b * h * wd + p) * ci + c] = x[(b * ci + c) * h * wd + p];
                }
            }
        }
        v
    };
    let wv: Vec<f32> = if d.nhwc {
        w.to_vec()
    } else {
        let mut v = vec![0f32; w.len()];
        for k in 0..ko {
            for c in 0..cg {
                for p in 0..r * s {
                    v[(k * r * s + p) * cg + c] = w[(k * cg + c) * r * s + p];
                }
            }
        }
        v
    };
    let kpg = ko / d.group.max(1);
    let mut y = vec![0f32; n * yc * yh * yw];
    for b in 0..n {
        for k in 0..ko {
            let c0 = (k / kpg) * cg;
            for oh in 0..yh {
                for ow in 0..yw {
                    let mut acc = 0f64;
                    for rr in 0..r {
                        let ih =
                            (oh * d.strides[0] + rr * d.dilations[0]) as isize - d.pads[0] as isize;
                        if ih < 0 || ih >= h as isize {
                            continue;
                        }
                        for ss in 0..s {
                            let iw = (ow * d.strides[1] + ss * d.dilations[1]) as isize
                                - d.pads[1] as isize;
                            if iw < 0 || iw >= wd as isize {
                                continue;
                            }
                            let xo = ((b * h + ih as usize) * wd + iw as usize) * ci + c0;
                            let wo = ((k * r + rr) * s + ss) * cg;
                            acc += dot(&xv[xo..][..cg], &wv[wo..][..cg]);
                        }
                    }
                    let at = if d.nhwc {
                        ((b * yh + oh) * yw + ow) * yc + k
                    } else {
                        ((b * yc + k) * yh + oh) * yw + ow
                    };
                    y[at] = acc as f32;
                }
            }
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::super::program::{Buffer, DType, DevTensor};
    use super::*;

    /// A Linear whose bias is two initializers added (a shortcut GEMM that took over the bias of
    /// the convolution it adds): the interpreter adds them.
    #[test]
    fn a_summed_bias_is_the_sum_of_its_initializers() {
        let buf = |numel: usize, kind: BufferKind| Buffer {
            numel,
            dtype: DType::Float,
            kind,
        };
        let init = |n: &str| BufferKind::Weight(WeightSource::Initializer(n.into()));
        let p = Program {
            buffers: vec![
                buf(2, BufferKind::Input("x".into())),
                buf(2, init("w")),
                buf(
                    2,
                    BufferKind::Weight(WeightSource::Sum(vec!["b1".into(), "b2".into()])),
                ),
                buf(2, BufferKind::Activation),
            ],
            steps: vec![Step::Linear {
                out: 3,
                x: 0,
                w: 1,
                bias: Some(2),
                residual: None,
                m: 1,
                n: 2,
                k: 2,
            }],
            inputs: vec![("x".into(), DevTensor::new(0, vec![1, 2]))],
            input_transforms: Vec::new(),
            outputs: vec![("y".into(), DevTensor::new(3, vec![1, 2]))],
            nodes: 1,
        };
        let weights: HashMap<&str, Vec<f32>> = HashMap::from([
            ("w", vec![1.0, 0.0, 0.0, 1.0]),
            ("b1", vec![10.0, 20.0]),
            ("b2", vec![0.5, -1.0]),
        ]);
        let w = |n: &str| Ok(weights[n].clone());
        let x: HashMap<String, Vec<f32>> = HashMap::from([("x".to_string(), vec![3.0, 4.0])]);
        let out = run(&p, &x, &HashMap::new(), &w).unwrap();
        assert_eq!(out[0].2, vec![13.5, 23.0]);
        // a part of another length is an error naming it
        let short: HashMap<&str, Vec<f32>> = HashMap::from([
            ("w", vec![1.0, 0.0, 0.0, 1.0]),
            ("b1", vec![10.0, 20.0]),
            ("b2", vec![0.5]),
        ]);
        let w = |n: &str| Ok(short[n].clone());
        let e = run(&p, &x, &HashMap::new(), &w).unwrap_err();
        assert!(e.to_string().contains("b2"), "{e}");
    }
}
