//! `EulerDiscreteScheduler` and `EulerAncestralDiscreteScheduler`, diffusers 0.42.1.

use super::numpy::{interp_unit_grid, spaced_timesteps};
use super::{
    alphas_cumprod, check_lens, PredictionType, Scheduler, SchedulerConfig, SchedulerKind,
    TimestepSpacing,
};

/// Euler (`ancestral = false`) or Euler ancestral (`ancestral = true`) over the sigma schedule
/// `sigma(t) = sqrt((1-ᾱ_t)/ᾱ_t)` interpolated at the (possibly fractional) timesteps.
pub struct Euler {
    ancestral: bool,
    prediction_type: PredictionType,
    timesteps: Vec<f32>,
    sigmas: Vec<f32>,
    init_noise_sigma: f32,
    scratch: Vec<f32>,
}

impl Euler {
    pub fn new(cfg: &SchedulerConfig, steps: usize, ancestral: bool) -> Self {
        let kind = if ancestral {
            SchedulerKind::EulerAncestral
        } else {
            SchedulerKind::Euler
        };
        let spacing = cfg.spacing_for(kind);
        // Timesteps are float32 in both classes (linspace values are not rounded).
        let timesteps: Vec<f32> =
            spaced_timesteps(spacing, cfg.num_train_timesteps, steps, cfg.steps_offset)
                .into_iter()
                .map(|t| t as f32)
                .collect();
        let ac = alphas_cumprod(cfg);
        let train_sigmas = super::train_sigmas(&ac);
        let mut sigmas: Vec<f32> = timesteps
            .iter()
            .map(|&t| interp_unit_grid(f64::from(t), &train_sigmas) as f32)
            .collect();
        sigmas.push(0.0);
        let max = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let init_noise_sigma = match spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max,
            TimestepSpacing::Leading => (max * max + 1.0).sqrt(),
        };
        Euler {
            ancestral,
            prediction_type: cfg.prediction_type,
            timesteps,
            sigmas,
            init_noise_sigma,
            scratch: Vec::new(),
        }
    }

    /// x0 prediction for one element (f32, diffusers' operation order).
    #[inline]
    fn pred_x0(&self, sigma: f32, x: f32, m: f32, v_c1: f32, v_c2: f32) -> f32 {
        match self.prediction_type {
            PredictionType::Epsilon => x - sigma * m,
            PredictionType::VPrediction => m * v_c1 + x / v_c2,
            PredictionType::Sample => m,
        }
    }
}

impl Scheduler for Euler {
    fn kind(&self) -> SchedulerKind {
        if self.ancestral {
            SchedulerKind::EulerAncestral
        } else {
            SchedulerKind::Euler
        }
    }
    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }
    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }
    fn init_noise_sigma(&self) -> f32 {
        self.init_noise_sigma
    }

    fn scale_model_input(&self, sample: &[f32], step: usize, out: &mut [f32]) {
        check_lens(sample.len(), out.len(), "out");
        let sigma = self.sigmas[step];
        let s = (sigma * sigma + 1.0).sqrt();
        for (o, &x) in out.iter_mut().zip(sample) {
            *o = x / s;
        }
    }

    fn step(
        &mut self,
        model_output: &[f32],
        step: usize,
        sample: &mut [f32],
        noise: &mut dyn FnMut(&mut [f32]),
    ) {
        check_lens(sample.len(), model_output.len(), "model_output");
        let sigma = self.sigmas[step];
        let sigma_next = self.sigmas[step + 1];
        let v_c2 = sigma * sigma + 1.0;
        let v_c1 = -sigma / v_c2.sqrt();
        if !self.ancestral {
            // s_churn = 0: gamma = 0, sigma_hat = sigma.
            let dt = sigma_next - sigma;
            for (x, &m) in sample.iter_mut().zip(model_output) {
                let x0 = self.pred_x0(sigma, *x, m, v_c1, v_c2);
                let derivative = (*x - x0) / sigma;
                *x += derivative * dt;
            }
            return;
        }
        let (sf2, st2) = (sigma * sigma, sigma_next * sigma_next);
        let sigma_up = (st2 * (sf2 - st2) / sf2).sqrt();
        let sigma_down = (st2 - sigma_up * sigma_up).sqrt();
        let dt = sigma_down - sigma;
        for (x, &m) in sample.iter_mut().zip(model_output) {
            let x0 = self.pred_x0(sigma, *x, m, v_c1, v_c2);
            let derivative = (*x - x0) / sigma;
            *x += derivative * dt;
        }
        // diffusers draws the noise on every step, also the last (where sigma_up = 0).
        self.scratch.resize(sample.len(), 0.0);
        noise(&mut self.scratch);
        for (x, &n) in sample.iter_mut().zip(&self.scratch) {
            *x += n * sigma_up;
        }
    }

    fn add_noise(&self, original: &[f32], noise: &[f32], step: usize, out: &mut [f32]) {
        check_lens(original.len(), noise.len(), "noise");
        check_lens(original.len(), out.len(), "out");
        let sigma = self.sigmas[step];
        for ((o, &x), &n) in out.iter_mut().zip(original).zip(noise) {
            *o = x + n * sigma;
        }
    }
}
