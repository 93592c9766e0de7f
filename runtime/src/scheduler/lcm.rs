//! `LCMScheduler`, diffusers 0.42.1.

use super::ddim::{add_noise_alpha, x0_eps};
use super::numpy::linspace;
use super::{
    alphas_cumprod, check_lens, Scheduler, SchedulerConfig, SchedulerError, SchedulerKind,
};

/// `LCMScheduler`: timesteps are a subset of the `original_inference_steps` distillation
/// schedule; each step applies the boundary-condition scalings c_skip / c_out and re-noises to
/// the next timestep (except after the last step, which returns the denoised sample).
pub struct Lcm {
    cfg: SchedulerConfig,
    alphas_cumprod: Vec<f32>,
    timesteps_i: Vec<i64>,
    timesteps: Vec<f32>,
    scratch: Vec<f32>,
}

impl Lcm {
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> Result<Self, SchedulerError> {
        let original = cfg.original_inference_steps;
        if original == 0 || original > cfg.num_train_timesteps {
            return Err(SchedulerError::Config(format!(
                "LCM original_inference_steps must be in 1..={}, got {original}",
                cfg.num_train_timesteps
            )));
        }
        if steps > original {
            return Err(SchedulerError::LcmTooManySteps { steps, original });
        }
        let k = (cfg.num_train_timesteps / original) as i64;
        // lcm_origin_timesteps = [1..=original] * k - 1, reversed (strength = 1).
        let origin: Vec<i64> = (1..=original as i64).rev().map(|i| i * k - 1).collect();
        let timesteps_i: Vec<i64> = linspace(0.0, origin.len() as f64, steps, false)
            .into_iter()
            .map(|x| origin[x.floor() as usize])
            .collect();
        Ok(Lcm {
            cfg: cfg.clone(),
            alphas_cumprod: alphas_cumprod(cfg),
            timesteps: timesteps_i.iter().map(|&t| t as f32).collect(),
            timesteps_i,
            scratch: Vec::new(),
        })
    }

    fn alpha_at(&self, t: i64) -> f32 {
        if t >= 0 {
            self.alphas_cumprod[t as usize]
        } else if self.cfg.set_alpha_to_one {
            1.0
        } else {
            self.alphas_cumprod[0]
        }
    }
}

impl Scheduler for Lcm {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Lcm
    }
    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    fn step(
        &mut self,
        model_output: &[f32],
        step: usize,
        sample: &mut [f32],
        noise: &mut dyn FnMut(&mut [f32]),
    ) {
        check_lens(sample.len(), model_output.len(), "model_output");
        let t = self.timesteps_i[step];
        let last = step + 1 >= self.timesteps_i.len();
        let prev_t = if last { t } else { self.timesteps_i[step + 1] };
        let alpha_prod_t = self.alpha_at(t);
        let alpha_prod_t_prev = self.alpha_at(prev_t);
        let beta_prod_t = 1.0 - alpha_prod_t;
        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;
        // get_scalings_for_boundary_condition_discrete, in f32 (timestep tensor * 10.0).
        let scaled = t as f32 * self.cfg.timestep_scaling as f32;
        let denom = scaled * scaled + 0.25f32;
        let c_skip = 0.25f32 / denom;
        let c_out = scaled / denom.sqrt();
        let (sqrt_a, sqrt_b) = (alpha_prod_t.sqrt(), beta_prod_t.sqrt());
        let (clip, range) = (self.cfg.clip_sample, self.cfg.clip_sample_range);
        for (x, &m) in sample.iter_mut().zip(model_output) {
            let (mut x0, _) = x0_eps(self.cfg.prediction_type, sqrt_a, sqrt_b, *x, m);
            if clip {
                x0 = x0.clamp(-range, range);
            }
            *x = c_out * x0 + c_skip * *x;
        }
        if !last {
            self.scratch.resize(sample.len(), 0.0);
            noise(&mut self.scratch);
            let (sa, sb) = (alpha_prod_t_prev.sqrt(), beta_prod_t_prev.sqrt());
            for (x, &n) in sample.iter_mut().zip(&self.scratch) {
                *x = sa * *x + sb * n;
            }
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
