//! The fused operators the engine builder forms from standard-op patterns (`docs/operators.md`,
//! "Engine fusions"): CPU implementations, float32 in and out with float64 accumulation, the
//! references the GPU kernels are checked against.
//!
//! - [`group_norm`]: `com.motionrt.GroupNorm` — GroupNorm over axis 1 of an `[N, C, ...]`
//!   tensor with per-channel affine, optionally followed by SiLU (`activation = "silu"`).
//! - [`linear`]: `com.motionrt.Linear` — `Y = X·Wᵀ (+ bias) (+ residual)` for a PyTorch
//!   `[out, in]` weight: the GEMM with its bias and residual adds in the epilogue.
//! - [`geglu`]: `com.motionrt.Geglu` — `a · gelu(gate)` (exact erf GELU) of the two halves of
//!   the last axis.

use crate::KernelError;

fn shape(op: &'static str, what: String) -> KernelError {
    KernelError::Shape { op, what }
}

/// GroupNorm (+ SiLU) of `x` with shape `dims = [N, C, ...]`.
pub fn group_norm(
    x: &[f32],
    dims: &[usize],
    gamma: &[f32],
    beta: &[f32],
    groups: usize,
    eps: f32,
    silu: bool,
) -> Result<Vec<f32>, KernelError> {
    const OP: &str = "GroupNorm";
    if dims.len() < 2 {
        return Err(shape(OP, format!("X must be [N, C, ...], got {dims:?}")));
    }
    let (n, c) = (dims[0], dims[1]);
    let inner: usize = dims[2..].iter().product();
    if x.len() != n * c * inner {
        return Err(shape(
            OP,
            format!("X has {} values, {dims:?} needs {}", x.len(), n * c * inner),
        ));
    }
    if groups == 0 || c % groups != 0 {
        return Err(shape(
            OP,
            format!("{c} channels are not divisible into {groups} groups"),
        ));
    }
    if gamma.len() != c || beta.len() != c {
        return Err(shape(
            OP,
            format!(
                "scale and bias must have {c} values, got {} and {}",
                gamma.len(),
                beta.len()
            ),
        ));
    }
    let per = c / groups * inner;
    let mut y = vec![0f32; x.len()];
    for (gi, (xs, ys)) in x.chunks(per).zip(y.chunks_mut(per)).enumerate() {
        let mean = xs.iter().map(|&v| v as f64).sum::<f64>() / per as f64;
        let var = xs.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / per as f64;
        let inv = 1.0 / (var + eps as f64).sqrt();
        let c0 = (gi % groups) * (c / groups);
        for (j, (xv, yv)) in xs.iter().zip(ys.iter_mut()).enumerate() {
            let ch = c0 + j / inner;
            let v = (*xv as f64 - mean) * inv * gamma[ch] as f64 + beta[ch] as f64;
            let v = if silu { v / (1.0 + (-v).exp()) } else { v };
            *yv = v as f32;
        }
    }
    Ok(y)
}

/// `Y[r, o] = Σ_k X[r, k]·W[o, k] + bias[o] + residual[r, o]` for `rows × k` inputs.
pub fn linear(
    x: &[f32],
    rows: usize,
    k: usize,
    w: &[f32],
    out: usize,
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
) -> Result<Vec<f32>, KernelError> {
    const OP: &str = "Linear";
    if x.len() != rows * k {
        return Err(shape(
            OP,
            format!("X has {} values, [{rows}, {k}] needs {}", x.len(), rows * k),
        ));
    }
    if w.len() != out * k {
        return Err(shape(
            OP,
            format!("W has {} values, [{out}, {k}] needs {}", w.len(), out * k),
        ));
    }
    if let Some(b) = bias {
        if b.len() != out {
            return Err(shape(
                OP,
                format!("bias has {} values, expected {out}", b.len()),
            ));
        }
    }
    if let Some(r) = residual {
        if r.len() != rows * out {
            return Err(shape(
                OP,
                format!(
                    "residual has {} values, the output [{rows}, {out}] has {} (no broadcasting)",
                    r.len(),
                    rows * out
                ),
            ));
        }
    }
    let mut y = vec![0f32; rows * out];
    for r in 0..rows {
        let xr = &x[r * k..(r + 1) * k];
        for o in 0..out {
            let wr = &w[o * k..(o + 1) * k];
            let mut acc = xr
                .iter()
                .zip(wr)
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum::<f64>();
            if let Some(b) = bias {
                acc += b[o] as f64;
            }
            if let Some(res) = residual {
                acc += res[r * out + o] as f64;
            }
            y[r * out + o] = acc as f32;
        }
    }
    Ok(y)
}

/// The error function (Abramowitz–Stegun 7.1.26 is too coarse for a reference; this is the
/// series / continued-fraction pair, accurate to ~1e-15).
pub fn erf(x: f64) -> f64 {
    let a = x.abs();
    let v = if a < 2.5 {
        // Maclaurin series: erf(x) = 2/√π Σ (-1)^n x^(2n+1) / (n! (2n+1))
        let mut term = a;
        let mut sum = a;
        let x2 = a * a;
        let mut n = 0.0;
        while term.abs() > 1e-17 * sum.abs() {
            n += 1.0;
            term *= -x2 / n;
            sum += term / (2.0 * n + 1.0);
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        // erfc continued fraction (Lentz), converges fast for x ≥ 2.5.
        let mut f = a;
        let mut c = a;
        let mut d = 0.0;
        for i in 1..200 {
            let an = i as f64 / 2.0;
            d = a + an * d;
            d = 1.0 / d;
            c = a + an / c;
            let delta = c * d;
            f *= delta;
            if (delta - 1.0).abs() < 1e-16 {
                break;
            }
        }
        1.0 - (-a * a).exp() / (f * std::f64::consts::PI.sqrt())
    };
    if x < 0.0 {
        -v
    } else {
        v
    }
}

/// `a · gelu(gate)` for `x = [..., 2·d]` split into `a = x[..., :d]`, `gate = x[..., d:]`.
pub fn geglu(x: &[f32], last: usize) -> Result<Vec<f32>, KernelError> {
    const OP: &str = "Geglu";
    if last % 2 != 0 || last == 0 || x.len() % last != 0 {
        return Err(shape(
            OP,
            format!(
                "the last axis ({last}) must be even and divide the {} values",
                x.len()
            ),
        ));
    }
    let d = last / 2;
    let mut y = Vec::with_capacity(x.len() / 2);
    for row in x.chunks(last) {
        let (a, gate) = row.split_at(d);
        for (&a, &g) in a.iter().zip(gate) {
            let g = g as f64;
            let gelu = 0.5 * g * (1.0 + erf(g * std::f64::consts::FRAC_1_SQRT_2));
            y.push((a as f64 * gelu) as f32);
        }
    }
    Ok(y)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_matches_known_values() {
        // erf values from Abramowitz & Stegun table 7.1 / high-precision tables.
        for (x, want) in [
            (0.0, 0.0),
            (0.5, 0.520_499_877_813_046_5),
            (1.0, 0.842_700_792_949_714_9),
            (2.0, 0.995_322_265_018_952_7),
            (3.0, 0.999_977_909_503_001_4),
            (-1.5, -0.966_105_146_475_310_7),
        ] {
            assert!((erf(x) - want).abs() < 1e-13, "erf({x}) = {}", erf(x));
        }
    }

    #[test]
    fn group_norm_normalises_each_group_and_applies_silu() {
        // [1, 4, 3]: 2 groups of 2 channels × 3 values.
        let x: Vec<f32> = (0..12).map(|i| (i * i) as f32 * 0.1).collect();
        let gamma = [1.0, 2.0, 1.0, 0.5];
        let beta = [0.0, 1.0, -1.0, 0.0];
        let y = group_norm(&x, &[1, 4, 3], &gamma, &beta, 2, 1e-5, false).unwrap();
        for g in 0..2 {
            let xs = &x[g * 6..g * 6 + 6];
            let mean = xs.iter().sum::<f32>() / 6.0;
            let var = xs.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / 6.0;
            for j in 0..6 {
                let ch = g * 2 + j / 3;
                let want = (xs[j] - mean) / (var + 1e-5).sqrt() * gamma[ch] + beta[ch];
                assert!((y[g * 6 + j] - want).abs() < 1e-5);
            }
        }
        let s = group_norm(&x, &[1, 4, 3], &gamma, &beta, 2, 1e-5, true).unwrap();
        for (s, y) in s.iter().zip(&y) {
            assert!((s - y / (1.0 + (-y).exp())).abs() < 1e-6);
        }
        let e = group_norm(&x, &[1, 4, 3], &gamma, &beta, 3, 1e-5, false).unwrap_err();
        assert!(e.to_string().contains("not divisible into 3 groups"), "{e}");
    }

    #[test]
    fn linear_adds_bias_and_residual_in_the_epilogue() {
        let x = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]; // [2, 3]
        let w = [1.0, 0.0, -1.0, 0.5, 0.5, 0.5]; // [2, 3]
        let y = linear(
            &x,
            2,
            3,
            &w,
            2,
            Some(&[10.0, 20.0]),
            Some(&[1.0, 2.0, 3.0, 4.0]),
        )
        .unwrap();
        assert_eq!(
            y,
            vec![
                -2.0 + 10.0 + 1.0,
                3.0 + 20.0 + 2.0,
                -2.0 + 10.0 + 3.0,
                7.5 + 20.0 + 4.0
            ]
        );
        let e = linear(&x, 2, 3, &w, 2, None, Some(&[1.0, 2.0])).unwrap_err();
        assert!(e.to_string().contains("no broadcasting"), "{e}");
    }

    #[test]
    fn geglu_gates_the_first_half_with_gelu_of_the_second() {
        let x = [2.0, -1.0, 1.0, 0.0]; // one row, d = 2
        let y = geglu(&x, 4).unwrap();
        let gelu1 = 0.5 * (1.0 + erf(std::f64::consts::FRAC_1_SQRT_2));
        assert!((y[0] as f64 - 2.0 * gelu1).abs() < 1e-6);
        assert_eq!(y[1], 0.0);
        assert!(geglu(&x, 3).is_err());
    }
}
