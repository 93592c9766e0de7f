//! The few numpy routines diffusers builds its schedules with, reproduced with numpy's exact
//! float64 arithmetic (numpy 2.x), so rounding to integer timesteps lands the same way.

/// `np.linspace(start, stop, num, endpoint)`: `i * step + start`, last element exactly `stop`
/// when `endpoint`.
pub(crate) fn linspace(start: f64, stop: f64, num: usize, endpoint: bool) -> Vec<f64> {
    let div = if endpoint { num.saturating_sub(1) } else { num };
    let delta = stop - start;
    let mut y: Vec<f64> = if div > 0 {
        let step = delta / div as f64;
        if step == 0.0 {
            (0..num).map(|i| i as f64 / div as f64 * delta).collect()
        } else {
            (0..num).map(|i| i as f64 * step).collect()
        }
    } else {
        (0..num).map(|i| i as f64 * delta).collect()
    };
    for v in &mut y {
        *v += start;
    }
    if endpoint && num > 1 {
        y[num - 1] = stop;
    }
    y
}

/// `np.arange(start, stop, step)` for floats: length `ceil((stop - start) / step)`, element `i`
/// = `start + i * ((start + step) - start)` (numpy's fill rule).
pub(crate) fn arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    let len = if len > 0.0 { len as usize } else { 0 };
    let delta = (start + step) - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => start + step,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// `np.round` (half to even).
pub(crate) fn round(x: f64) -> f64 {
    x.round_ties_even()
}

/// `np.interp(x, arange(len(fp)), fp)` with float64 arithmetic.
pub(crate) fn interp_unit_grid(x: f64, fp: &[f32]) -> f64 {
    let last = fp.len() - 1;
    if x.is_nan() {
        return x;
    }
    if x >= last as f64 {
        return f64::from(fp[last]);
    }
    if x <= 0.0 {
        return f64::from(fp[0]);
    }
    let j = x.floor() as usize;
    let xj = j as f64;
    let (y0, y1) = (f64::from(fp[j]), f64::from(fp[j + 1]));
    if x == xj {
        return y0;
    }
    let slope = (y1 - y0) / ((j + 1) as f64 - xj);
    let r = slope * (x - xj) + y0;
    if r.is_nan() {
        slope * (x - (j + 1) as f64) + y1
    } else {
        r
    }
}

/// diffusers' `_sigma_to_t(sigma, log_sigmas)` for one float64 sigma, where `log_sigmas` is the
/// float32 `np.log` of the training sigmas. `low - high` is a float32 subtraction there.
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let count = log_sigmas
        .iter()
        .filter(|&&l| log_sigma - f64::from(l) >= 0.0)
        .count();
    // cumsum(dists >= 0).argmax(): log_sigmas is increasing, so the trues are a prefix and the
    // first maximum sits at its end (index 0 when there is none).
    let low_idx = count.saturating_sub(1).min(log_sigmas.len() - 2);
    let high_idx = low_idx + 1;
    let low = log_sigmas[low_idx];
    let high = log_sigmas[high_idx];
    let w = (f64::from(low) - log_sigma) / f64::from(low - high);
    let w = w.clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// diffusers' `_convert_to_karras` (rho = 7) over `in_sigmas` (decreasing, float32).
pub(crate) fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0f64;
    let ramp = linspace(0.0, 1.0, n, true);
    let min_inv_rho = sigma_min.powf(1.0 / rho);
    let max_inv_rho = sigma_max.powf(1.0 / rho);
    ramp.iter()
        .map(|&r| (max_inv_rho + r * (min_inv_rho - max_inv_rho)).powf(rho))
        .collect()
}

/// Integer timestep schedules shared by DDIM / Euler (`set_timesteps` with `num_inference_steps`).
/// Returns float64 values before any dtype cast; `linspace` is not rounded here.
pub(crate) fn spaced_timesteps(
    spacing: super::TimestepSpacing,
    train: usize,
    n: usize,
    steps_offset: usize,
) -> Vec<f64> {
    use super::TimestepSpacing::*;
    match spacing {
        Linspace => {
            let mut t = linspace(0.0, (train - 1) as f64, n, true);
            t.reverse();
            t
        }
        Leading => {
            let ratio = train / n;
            (0..n)
                .rev()
                .map(|i| (i * ratio) as f64 + steps_offset as f64)
                .collect()
        }
        Trailing => {
            let ratio = train as f64 / n as f64;
            arange(train as f64, 0.0, -ratio)
                .into_iter()
                .map(|t| round(t) - 1.0)
                .collect()
        }
    }
}
