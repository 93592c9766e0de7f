//! `DPMSolverMultistepScheduler` (algorithm_type "dpmsolver++", final_sigmas_type "zero"),
//! diffusers 0.42.1.

use super::numpy::{arange, karras_sigmas, linspace, round, sigma_to_t};
use super::{
    alphas_cumprod, check_lens, DpmSolverType, PredictionType, Scheduler, SchedulerConfig,
    SchedulerError, SchedulerKind, TimestepSpacing,
};

/// DPM-Solver++ multistep (order `solver_order`, "2M" = 2), optionally on Karras sigmas.
pub struct DpmSolverMultistep {
    karras: bool,
    prediction_type: PredictionType,
    solver_order: usize,
    solver_type: DpmSolverType,
    lower_order_final: bool,
    timesteps: Vec<f32>,
    sigmas: Vec<f32>,
    /// Converted (x0) model outputs of the last `solver_order` steps, oldest first.
    model_outputs: Vec<Option<Vec<f32>>>,
    lower_order_nums: usize,
}

/// `_sigma_to_alpha_sigma_t` in f32.
#[inline]
fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha_t = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha_t, sigma * alpha_t)
}

impl DpmSolverMultistep {
    pub fn new(cfg: &SchedulerConfig, steps: usize, karras: bool) -> Result<Self, SchedulerError> {
        let kind = if karras {
            SchedulerKind::DpmPp2mKarras
        } else {
            SchedulerKind::DpmPp2m
        };
        let train = cfg.num_train_timesteps;
        // lambda_min_clipped = -inf: clipped_idx = 0, last_timestep = num_train_timesteps.
        let last_timestep = train;
        let mut timesteps: Vec<f64> = match cfg.spacing_for(kind) {
            TimestepSpacing::Linspace => {
                let mut t: Vec<f64> = linspace(0.0, (last_timestep - 1) as f64, steps + 1, true)
                    .into_iter()
                    .map(round)
                    .collect();
                t.reverse();
                t.pop();
                t
            }
            TimestepSpacing::Leading => {
                let ratio = last_timestep / (steps + 1);
                (1..=steps)
                    .rev()
                    .map(|i| (i * ratio) as f64 + cfg.steps_offset as f64)
                    .collect()
            }
            TimestepSpacing::Trailing => {
                let ratio = train as f64 / steps as f64;
                arange(last_timestep as f64, 0.0, -ratio)
                    .into_iter()
                    .map(|t| round(t) - 1.0)
                    .collect()
            }
        };
        // (Karras sigmas replace these timesteps: checked below, once they are made)
        if !karras {
            if timesteps.iter().any(|&t| !(0.0..train as f64).contains(&t)) {
                return Err(SchedulerError::Config(format!(
                    "DPM-Solver schedule for {steps} steps has timesteps outside 0..{train}"
                )));
            }
            // spacing that rounds near num_train_timesteps repeats a timestep: a step of
            // zero, which the solver divides by
            if let Some(w) = timesteps.windows(2).find(|w| w[0] == w[1]) {
                return Err(SchedulerError::Config(format!(
                    "{steps} DPM-Solver steps over {train} timesteps repeat timestep {} (a step of zero): use fewer steps",
                    w[0]
                )));
            }
        }
        let ac = alphas_cumprod(cfg);
        let train_sigmas = super::train_sigmas(&ac);
        let mut sigmas: Vec<f32> = if karras {
            let log_sigmas: Vec<f32> = train_sigmas
                .iter()
                .map(|&s| f64::from(s).ln() as f32)
                .collect();
            let sig = karras_sigmas(
                f64::from(train_sigmas[0]),
                f64::from(train_sigmas[train - 1]),
                steps,
            );
            timesteps = sig
                .iter()
                .map(|&s| round(sigma_to_t(s, &log_sigmas)))
                .collect();
            sig.into_iter().map(|s| s as f32).collect()
        } else {
            // np.interp at integer timesteps is a lookup.
            timesteps
                .iter()
                .map(|&t| train_sigmas[t as usize])
                .collect()
        };
        sigmas.push(0.0);
        if timesteps.iter().any(|&t| !(0.0..train as f64).contains(&t)) {
            return Err(SchedulerError::Config(format!(
                "DPM-Solver schedule for {steps} steps has timesteps outside 0..{train}"
            )));
        }
        Ok(DpmSolverMultistep {
            karras,
            prediction_type: cfg.prediction_type,
            solver_order: cfg.solver_order,
            solver_type: cfg.solver_type,
            lower_order_final: cfg.lower_order_final,
            timesteps: timesteps.into_iter().map(|t| t as i64 as f32).collect(),
            sigmas,
            model_outputs: vec![None; cfg.solver_order],
            lower_order_nums: 0,
        })
    }

    fn lambda(sigma: f32) -> (f32, f32, f32) {
        let (a, s) = alpha_sigma(sigma);
        (a, s, a.ln() - s.ln())
    }
}

impl Scheduler for DpmSolverMultistep {
    fn kind(&self) -> SchedulerKind {
        if self.karras {
            SchedulerKind::DpmPp2mKarras
        } else {
            SchedulerKind::DpmPp2m
        }
    }
    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }
    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }

    fn step(
        &mut self,
        model_output: &[f32],
        step: usize,
        sample: &mut [f32],
        _noise: &mut dyn FnMut(&mut [f32]),
    ) {
        check_lens(sample.len(), model_output.len(), "model_output");
        if step == 0 {
            // A fresh run: forget any history from a previous one.
            self.model_outputs.iter_mut().for_each(|m| *m = None);
            self.lower_order_nums = 0;
        }
        let n = self.timesteps.len();
        // final_sigmas_type = "zero": the last step is always first order (so `euler_at_final`
        // and `lower_order_final` cannot change it).
        let lower_order_final = step == n - 1;
        let lower_order_second = step + 2 == n && self.lower_order_final && n < 15;

        // convert_model_output -> x0 prediction.
        let (alpha_s0, sigma_s0_t) = alpha_sigma(self.sigmas[step]);
        let mut x0 = self.model_outputs[0].take().unwrap_or_default();
        x0.clear();
        x0.extend(
            sample
                .iter()
                .zip(model_output)
                .map(|(&x, &m)| match self.prediction_type {
                    PredictionType::Epsilon => (x - sigma_s0_t * m) / alpha_s0,
                    PredictionType::Sample => m,
                    PredictionType::VPrediction => alpha_s0 * x - sigma_s0_t * m,
                }),
        );
        self.model_outputs.rotate_left(1);
        let last = self.model_outputs.len() - 1;
        self.model_outputs[last] = Some(x0);

        let (alpha_t, sigma_t, lambda_t) = Self::lambda(self.sigmas[step + 1]);
        let (_, sigma_s0, lambda_s0) = Self::lambda(self.sigmas[step]);
        let h = lambda_t - lambda_s0;
        let ratio = sigma_t / sigma_s0;
        let em1 = (-h).exp() - 1.0;
        let c0 = alpha_t * em1;
        let outs = &self.model_outputs;
        let m0 = outs[last].as_deref().expect("current model output");

        let order = if self.solver_order == 1 || self.lower_order_nums < 1 || lower_order_final {
            1
        } else if self.solver_order == 2 || self.lower_order_nums < 2 || lower_order_second {
            2
        } else {
            3
        };
        match order {
            1 => {
                for (x, &d0) in sample.iter_mut().zip(m0) {
                    *x = ratio * *x - c0 * d0;
                }
            }
            2 => {
                let m1 = outs[last - 1].as_deref().expect("previous model output");
                let (_, _, lambda_s1) = Self::lambda(self.sigmas[step - 1]);
                let h_0 = lambda_s0 - lambda_s1;
                let r0 = h_0 / h;
                let inv_r0 = 1.0 / r0;
                match self.solver_type {
                    DpmSolverType::Midpoint => {
                        let c1 = 0.5 * c0;
                        for ((x, &d0), &p1) in sample.iter_mut().zip(m0).zip(m1) {
                            let d1 = inv_r0 * (d0 - p1);
                            *x = ratio * *x - c0 * d0 - c1 * d1;
                        }
                    }
                    DpmSolverType::Heun => {
                        let c1 = alpha_t * (em1 / h + 1.0);
                        for ((x, &d0), &p1) in sample.iter_mut().zip(m0).zip(m1) {
                            let d1 = inv_r0 * (d0 - p1);
                            *x = ratio * *x - c0 * d0 + c1 * d1;
                        }
                    }
                }
            }
            _ => {
                let m1 = outs[last - 1].as_deref().expect("previous model output");
                let m2 = outs[last - 2]
                    .as_deref()
                    .expect("model output two steps back");
                let (_, _, lambda_s1) = Self::lambda(self.sigmas[step - 1]);
                let (_, _, lambda_s2) = Self::lambda(self.sigmas[step - 2]);
                let (h_0, h_1) = (lambda_s0 - lambda_s1, lambda_s1 - lambda_s2);
                let (r0, r1) = (h_0 / h, h_1 / h);
                let (inv_r0, inv_r1) = (1.0 / r0, 1.0 / r1);
                let k1 = r0 / (r0 + r1);
                let k2 = 1.0 / (r0 + r1);
                let c1 = alpha_t * (em1 / h + 1.0);
                let c2 = alpha_t * ((em1 + h) / (h * h) - 0.5);
                for (((x, &p0), &p1), &p2) in sample.iter_mut().zip(m0).zip(m1).zip(m2) {
                    let d1_0 = inv_r0 * (p0 - p1);
                    let d1_1 = inv_r1 * (p1 - p2);
                    let d1 = d1_0 + k1 * (d1_0 - d1_1);
                    let d2 = k2 * (d1_0 - d1_1);
                    *x = ratio * *x - c0 * p0 + c1 * d1 - c2 * d2;
                }
            }
        }
        if self.lower_order_nums < self.solver_order {
            self.lower_order_nums += 1;
        }
    }

    fn add_noise(&self, original: &[f32], noise: &[f32], step: usize, out: &mut [f32]) {
        check_lens(original.len(), noise.len(), "noise");
        check_lens(original.len(), out.len(), "out");
        let (a, s) = alpha_sigma(self.sigmas[step]);
        for ((o, &x), &n) in out.iter_mut().zip(original).zip(noise) {
            *o = a * x + s * n;
        }
    }
}
