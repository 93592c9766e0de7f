//! `DDIMScheduler` (eta = 0), diffusers 0.42.1.

use super::numpy::{round, spaced_timesteps};
use super::{
    alphas_cumprod, check_lens, PredictionType, Scheduler, SchedulerConfig, SchedulerKind,
    TimestepSpacing,
};

/// Converts one element of the model output to `(pred_x0, pred_eps)` given sqrt(ᾱ_t) and
/// sqrt(1-ᾱ_t), as DDIM / LCM do (f32 arithmetic in diffusers' operation order).
#[inline]
pub(crate) fn x0_eps(pred: PredictionType, sqrt_a: f32, sqrt_b: f32, x: f32, m: f32) -> (f32, f32) {
    match pred {
        PredictionType::Epsilon => ((x - sqrt_b * m) / sqrt_a, m),
        PredictionType::Sample => (m, (x - sqrt_a * m) / sqrt_b),
        PredictionType::VPrediction => (sqrt_a * x - sqrt_b * m, sqrt_a * m + sqrt_b * x),
    }
}

/// `DDIMScheduler` with eta = 0 (deterministic).
pub struct Ddim {
    cfg: SchedulerConfig,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    timesteps_i: Vec<i64>,
    timesteps: Vec<f32>,
    /// `num_train_timesteps // num_inference_steps`: diffusers' DDIM steps back by this amount
    /// whatever the spacing (so with `linspace` x_{t-1} is not exactly at the next timestep).
    step_back: i64,
}

impl Ddim {
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> Self {
        let ac = alphas_cumprod(cfg);
        let final_alpha_cumprod = if cfg.set_alpha_to_one { 1.0 } else { ac[0] };
        let spacing = cfg.spacing_for(SchedulerKind::Ddim);
        let raw = spaced_timesteps(spacing, cfg.num_train_timesteps, steps, cfg.steps_offset);
        let timesteps_i: Vec<i64> = raw
            .into_iter()
            .map(|t| match spacing {
                TimestepSpacing::Linspace => round(t) as i64,
                _ => t as i64,
            })
            .collect();
        Ddim {
            cfg: cfg.clone(),
            alphas_cumprod: ac,
            final_alpha_cumprod,
            timesteps: timesteps_i.iter().map(|&t| t as f32).collect(),
            timesteps_i,
            step_back: (cfg.num_train_timesteps / steps) as i64,
        }
    }

    /// The integer timesteps, descending.
    pub fn timesteps_i(&self) -> &[i64] {
        &self.timesteps_i
    }

    /// One step of DDIM inversion, as Tune-A-Video's `next_step`: the latent at
    /// `t − num_train_timesteps/steps` (capped at 999) moves to timestep `t`, using the model
    /// output evaluated at `t`: `x_t = √ᾱ_t · x̂0 + √(1−ᾱ_t) · ε` with
    /// `x̂0 = (x − √(1−ᾱ_prev) · ε) / √ᾱ_prev`.
    pub fn invert_step(&self, model_output: &[f32], t: i64, sample: &mut [f32]) {
        check_lens(sample.len(), model_output.len(), "model_output");
        let cur = (t - self.step_back).min(999);
        let a = self.alpha_at(cur);
        let a_next = self.alpha_at(t);
        let (sqrt_a, sqrt_b) = (a.sqrt(), (1.0 - a).sqrt());
        let (sqrt_an, sqrt_bn) = (a_next.sqrt(), (1.0 - a_next).sqrt());
        for (x, &m) in sample.iter_mut().zip(model_output) {
            let (x0, eps) = x0_eps(self.cfg.prediction_type, sqrt_a, sqrt_b, *x, m);
            *x = sqrt_an * x0 + sqrt_bn * eps;
        }
    }

    fn alpha_at(&self, t: i64) -> f32 {
        if t >= 0 {
            self.alphas_cumprod[t as usize]
        } else {
            self.final_alpha_cumprod
        }
    }
}

impl Scheduler for Ddim {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Ddim
    }
    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    fn step(
        &mut self,
        model_output: &[f32],
        step: usize,
        sample: &mut [f32],
        _noise: &mut dyn FnMut(&mut [f32]),
    ) {
        check_lens(sample.len(), model_output.len(), "model_output");
        let t = self.timesteps_i[step];
        let prev_t = t - self.step_back;
        let alpha_prod_t = self.alpha_at(t);
        let alpha_prod_t_prev = self.alpha_at(prev_t);
        let beta_prod_t = 1.0 - alpha_prod_t;
        let (sqrt_a, sqrt_b) = (alpha_prod_t.sqrt(), beta_prod_t.sqrt());
        // eta = 0: std_dev_t = 0.
        let dir = (1.0 - alpha_prod_t_prev - 0.0f32).sqrt();
        let sqrt_a_prev = alpha_prod_t_prev.sqrt();
        let (clip, range) = (self.cfg.clip_sample, self.cfg.clip_sample_range);
        for (x, &m) in sample.iter_mut().zip(model_output) {
            let (mut x0, eps) = x0_eps(self.cfg.prediction_type, sqrt_a, sqrt_b, *x, m);
            if clip {
                x0 = x0.clamp(-range, range);
            }
            *x = sqrt_a_prev * x0 + dir * eps;
        }
    }

    fn add_noise(&self, original: &[f32], noise: &[f32], step: usize, out: &mut [f32]) {
        add_noise_alpha(
            &self.alphas_cumprod,
            self.timesteps_i[step],
            original,
            noise,
            out,
        );
    }
}

/// `sqrt(ᾱ_t)·x + sqrt(1-ᾱ_t)·n` (DDIM / LCM `add_noise`).
pub(crate) fn add_noise_alpha(
    ac: &[f32],
    t: i64,
    original: &[f32],
    noise: &[f32],
    out: &mut [f32],
) {
    check_lens(original.len(), noise.len(), "noise");
    check_lens(original.len(), out.len(), "out");
    let a = ac[t as usize];
    let (sa, sb) = (a.sqrt(), (1.0 - a).sqrt());
    for ((o, &x), &n) in out.iter_mut().zip(original).zip(noise) {
        *o = sa * x + sb * n;
    }
}
