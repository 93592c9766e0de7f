//! Diffusion schedulers, ported from diffusers 0.42.1 and matched step by step against it
//! (fixtures: `tests/fixtures/scheduler/`, test: `runtime/tests/scheduler.rs`).
//!
//! All tensors are flat `f32` slices (e.g. latents of shape `[B, 4, F, h, w]`); the schedulers are
//! element-wise, so the shape never matters. Scalar coefficients are computed in the precision
//! diffusers uses for them: betas / `alphas_cumprod` / per-step scalars in `float32` (torch), the
//! schedule construction that diffusers does in numpy `float64` (interpolation, Karras ramp,
//! `_sigma_to_t`) in `f64` and then rounded to `f32`, as diffusers does.
//!
//! ```no_run
//! use motionrt_runtime::scheduler::{create, SchedulerConfig, SchedulerKind};
//! let mut s = create(SchedulerKind::Euler, &SchedulerConfig::animatediff(), 25).unwrap();
//! let mut latents: Vec<f32> = vec![0.0; 4 * 16 * 64 * 64]; // fill with N(0,1) noise, then:
//! latents.iter_mut().for_each(|x| *x *= s.init_noise_sigma());
//! let mut unet_in = vec![0.0; latents.len()];
//! for i in 0..s.timesteps().len() {
//!     s.scale_model_input(&latents, i, &mut unet_in);
//!     let t = s.timesteps()[i];
//!     let eps: Vec<f32> = unet_in.clone(); // = unet(unet_in, t, ...)
//!     # let _ = t;
//!     s.step(&eps, i, &mut latents, &mut |buf: &mut [f32]| buf.fill(0.0) /* N(0,1) */);
//! }
//! ```

mod ddim;
mod dpm;
mod euler;
mod lcm;
mod numpy;

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

pub use ddim::Ddim;
pub use dpm::DpmSolverMultistep;
pub use euler::Euler;
pub use lcm::Lcm;

/// Which scheduler to run. CLI names: `ddim`, `euler`, `euler-a`, `dpmpp-2m`, `dpmpp-2m-karras`,
/// `lcm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SchedulerKind {
    /// `DDIMScheduler`, eta = 0.
    Ddim,
    /// `EulerDiscreteScheduler`.
    Euler,
    /// `EulerAncestralDiscreteScheduler` (draws noise every step).
    EulerAncestral,
    /// `DPMSolverMultistepScheduler`, dpmsolver++, order `solver_order` (2 by default).
    DpmPp2m,
    /// Same, with `use_karras_sigmas=True`.
    DpmPp2mKarras,
    /// `LCMScheduler` (draws noise between steps, not after the last).
    Lcm,
}

impl SchedulerKind {
    pub const ALL: [SchedulerKind; 6] = [
        SchedulerKind::Ddim,
        SchedulerKind::Euler,
        SchedulerKind::EulerAncestral,
        SchedulerKind::DpmPp2m,
        SchedulerKind::DpmPp2mKarras,
        SchedulerKind::Lcm,
    ];

    /// The CLI name.
    pub fn name(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "ddim",
            SchedulerKind::Euler => "euler",
            SchedulerKind::EulerAncestral => "euler-a",
            SchedulerKind::DpmPp2m => "dpmpp-2m",
            SchedulerKind::DpmPp2mKarras => "dpmpp-2m-karras",
            SchedulerKind::Lcm => "lcm",
        }
    }

    /// Whether `step` calls the noise source.
    pub fn is_stochastic(self) -> bool {
        matches!(self, SchedulerKind::EulerAncestral | SchedulerKind::Lcm)
    }
}

impl fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl SchedulerKind {
    /// The kind a diffusers `scheduler_config.json` names by its `_class_name` (DPM-Solver with
    /// `use_karras_sigmas` is the Karras kind): `Ok(None)` when it names none, an error for a
    /// class motionrt does not implement.
    pub fn from_diffusers_json(v: &serde_json::Value) -> Result<Option<Self>, SchedulerError> {
        let Some(class) = v.get("_class_name") else {
            return Ok(None);
        };
        let karras = v.get("use_karras_sigmas").and_then(|k| k.as_bool()) == Some(true);
        let kind = match class.as_str() {
            Some("DDIMScheduler") => SchedulerKind::Ddim,
            Some("EulerDiscreteScheduler") => SchedulerKind::Euler,
            Some("EulerAncestralDiscreteScheduler") => SchedulerKind::EulerAncestral,
            Some("DPMSolverMultistepScheduler") if karras => SchedulerKind::DpmPp2mKarras,
            Some("DPMSolverMultistepScheduler") => SchedulerKind::DpmPp2m,
            Some("LCMScheduler") => SchedulerKind::Lcm,
            _ => {
                return Err(SchedulerError::Config(format!(
                    "`_class_name` = {class} is not a scheduler motionrt implements (DDIMScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, DPMSolverMultistepScheduler, LCMScheduler)"
                )))
            }
        };
        Ok(Some(kind))
    }
}

impl FromStr for SchedulerKind {
    type Err = SchedulerError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let norm = s.trim().to_ascii_lowercase().replace('_', "-");
        let kind = match norm.as_str() {
            "ddim" => SchedulerKind::Ddim,
            "euler" => SchedulerKind::Euler,
            "euler-a" | "euler-ancestral" => SchedulerKind::EulerAncestral,
            "dpmpp-2m" | "dpm++-2m" | "dpm++2m" => SchedulerKind::DpmPp2m,
            "dpmpp-2m-karras" | "dpm++-2m-karras" | "dpm++2m-karras" => {
                SchedulerKind::DpmPp2mKarras
            }
            "lcm" => SchedulerKind::Lcm,
            _ => return Err(SchedulerError::UnknownKind(s.to_string())),
        };
        Ok(kind)
    }
}

/// `beta_schedule`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    Linear,
    ScaledLinear,
}

/// `prediction_type`: what the UNet predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    Epsilon,
    VPrediction,
    Sample,
}

/// `timestep_spacing`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    Leading,
    Trailing,
    Linspace,
}

/// DPM-Solver `solver_type` (second-order formula).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DpmSolverType {
    Midpoint,
    Heun,
}

/// Scheduler configuration (the subset of diffusers' scheduler configs that motionrt supports).
/// Fields that only one scheduler reads are ignored by the others.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub prediction_type: PredictionType,
    /// `None`: the scheduler class's own diffusers default (`leading` for DDIM, `linspace` for
    /// Euler / Euler a / DPM-Solver; LCM has its own schedule and ignores it).
    pub timestep_spacing: Option<TimestepSpacing>,
    pub steps_offset: usize,
    /// DDIM / LCM: `alphas_cumprod` used past the last training step (1.0 if true).
    pub set_alpha_to_one: bool,
    /// DDIM / LCM: clamp the predicted x0 to `±clip_sample_range`.
    pub clip_sample: bool,
    pub clip_sample_range: f32,
    /// LCM.
    pub original_inference_steps: usize,
    /// LCM.
    pub timestep_scaling: f64,
    /// DPM-Solver order (1, 2 or 3; "2M" is 2).
    pub solver_order: usize,
    pub solver_type: DpmSolverType,
    pub lower_order_final: bool,
    pub euler_at_final: bool,
}

/// Keys of the diffusers scheduler configs motionrt reads (besides `_class_name` and the other
/// `_`-prefixed bookkeeping keys).
const CONFIG_KEYS: &[&str] = &[
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "prediction_type",
    "timestep_spacing",
    "steps_offset",
    "set_alpha_to_one",
    "clip_sample",
    "clip_sample_range",
    "original_inference_steps",
    "timestep_scaling",
    "solver_order",
    "solver_type",
    "lower_order_final",
    "euler_at_final",
    "trained_betas",
    "variance_type",
    "sigma_min",
    "sigma_max",
    "thresholding",
    "rescale_betas_zero_snr",
    "use_karras_sigmas",
    "algorithm_type",
    "final_sigmas_type",
    "interpolation_type",
    "timestep_type",
    "lambda_min_clipped",
    "dynamic_thresholding_ratio",
    "sample_max_value",
    "skip_prk_steps",
];

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self::animatediff()
    }
}

impl SchedulerConfig {
    /// The AnimateDiff scheduler config: linear betas 0.00085..0.012 over 1000 steps, epsilon,
    /// `clip_sample=False`, `set_alpha_to_one=False`, `steps_offset=1`,
    /// `timestep_spacing="linspace"` (as in the diffusers AnimateDiff docs).
    pub fn animatediff() -> Self {
        SchedulerConfig {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::Linear,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: Some(TimestepSpacing::Linspace),
            steps_offset: 1,
            set_alpha_to_one: false,
            clip_sample: false,
            clip_sample_range: 1.0,
            original_inference_steps: 50,
            timestep_scaling: 10.0,
            solver_order: 2,
            solver_type: DpmSolverType::Midpoint,
            lower_order_final: true,
            euler_at_final: false,
        }
    }

    /// Reads a diffusers `scheduler_config.json` (any scheduler class). Unknown keys are ignored;
    /// absent keys keep the [`SchedulerConfig::animatediff`] value, except `timestep_spacing`,
    /// which then falls back to the scheduler class's own default. Keys whose non-default values
    /// would change the math in ways motionrt does not implement (e.g. `thresholding`,
    /// `rescale_betas_zero_snr`, `trained_betas`, `algorithm_type` other than `dpmsolver++`) are
    /// rejected with [`SchedulerError::Config`]. `use_karras_sigmas` is ignored: the
    /// [`SchedulerKind`] decides.
    pub fn from_diffusers_json(v: &serde_json::Value) -> Result<Self, SchedulerError> {
        let obj = v.as_object().ok_or_else(|| {
            SchedulerError::Config("scheduler config is not a JSON object".into())
        })?;
        let mut c = SchedulerConfig::animatediff();
        c.timestep_spacing = None;
        let bad = |key: &str, val: &serde_json::Value, want: &str| {
            SchedulerError::Config(format!(
                "`{key}` = {val} is not supported (expected {want})"
            ))
        };
        let get_usize = |key: &str, val: &serde_json::Value| {
            val.as_u64()
                .map(|x| x as usize)
                .ok_or_else(|| bad(key, val, "a non-negative integer"))
        };
        let get_f64 = |key: &str, val: &serde_json::Value| {
            val.as_f64().ok_or_else(|| bad(key, val, "a number"))
        };
        let get_bool = |key: &str, val: &serde_json::Value| {
            val.as_bool().ok_or_else(|| bad(key, val, "true or false"))
        };
        let get_str = |key: &str, val: &serde_json::Value| -> Result<String, SchedulerError> {
            val.as_str()
                .map(str::to_string)
                .ok_or_else(|| bad(key, val, "a string"))
        };
        for (key, val) in obj {
            match key.as_str() {
                "num_train_timesteps" => c.num_train_timesteps = get_usize(key, val)?,
                "beta_start" => c.beta_start = get_f64(key, val)?,
                "beta_end" => c.beta_end = get_f64(key, val)?,
                "beta_schedule" => {
                    c.beta_schedule = match get_str(key, val)?.as_str() {
                        "linear" => BetaSchedule::Linear,
                        "scaled_linear" => BetaSchedule::ScaledLinear,
                        _ => return Err(bad(key, val, "\"linear\" or \"scaled_linear\"")),
                    }
                }
                "prediction_type" => {
                    c.prediction_type = match get_str(key, val)?.as_str() {
                        "epsilon" => PredictionType::Epsilon,
                        "v_prediction" => PredictionType::VPrediction,
                        "sample" => PredictionType::Sample,
                        _ => {
                            return Err(bad(
                                key,
                                val,
                                "\"epsilon\", \"v_prediction\" or \"sample\"",
                            ))
                        }
                    }
                }
                "timestep_spacing" => {
                    c.timestep_spacing = Some(match get_str(key, val)?.as_str() {
                        "leading" => TimestepSpacing::Leading,
                        "trailing" => TimestepSpacing::Trailing,
                        "linspace" => TimestepSpacing::Linspace,
                        _ => {
                            return Err(bad(key, val, "\"leading\", \"trailing\" or \"linspace\""))
                        }
                    })
                }
                "steps_offset" => c.steps_offset = get_usize(key, val)?,
                "set_alpha_to_one" => c.set_alpha_to_one = get_bool(key, val)?,
                "clip_sample" => c.clip_sample = get_bool(key, val)?,
                "clip_sample_range" => c.clip_sample_range = get_f64(key, val)? as f32,
                "original_inference_steps" => c.original_inference_steps = get_usize(key, val)?,
                "timestep_scaling" => c.timestep_scaling = get_f64(key, val)?,
                "solver_order" => c.solver_order = get_usize(key, val)?,
                "solver_type" => {
                    c.solver_type = match get_str(key, val)?.as_str() {
                        "midpoint" => DpmSolverType::Midpoint,
                        "heun" => DpmSolverType::Heun,
                        _ => return Err(bad(key, val, "\"midpoint\" or \"heun\"")),
                    }
                }
                "lower_order_final" => c.lower_order_final = get_bool(key, val)?,
                "euler_at_final" => c.euler_at_final = get_bool(key, val)?,
                // Accepted only at the value motionrt implements.
                "trained_betas" | "variance_type" | "sigma_min" | "sigma_max" if !val.is_null() => {
                    return Err(bad(key, val, "null"))
                }
                "thresholding"
                | "rescale_betas_zero_snr"
                | "use_exponential_sigmas"
                | "use_beta_sigmas"
                | "use_lu_lambdas"
                | "use_flow_sigmas"
                | "use_dynamic_shifting"
                    if val.as_bool() == Some(true) =>
                {
                    return Err(bad(key, val, "false"))
                }
                "algorithm_type" if val.as_str() != Some("dpmsolver++") => {
                    return Err(bad(key, val, "\"dpmsolver++\""))
                }
                "final_sigmas_type" if val.as_str() != Some("zero") => {
                    return Err(bad(key, val, "\"zero\""))
                }
                "interpolation_type" if val.as_str() != Some("linear") => {
                    return Err(bad(key, val, "\"linear\""))
                }
                "timestep_type" if val.as_str() != Some("discrete") => {
                    return Err(bad(key, val, "\"discrete\""))
                }
                "lambda_min_clipped"
                    if !(val.is_null() || val.as_f64().is_some_and(|x| x == f64::NEG_INFINITY)) =>
                {
                    return Err(bad(key, val, "-inf"))
                }
                _ => {}
            }
        }
        // a JSON object that is not a scheduler config at all (the wrong file) would otherwise
        // run silently with the defaults
        if !obj.is_empty()
            && !obj
                .keys()
                .any(|k| k.starts_with('_') || CONFIG_KEYS.contains(&k.as_str()))
        {
            return Err(SchedulerError::Config(format!(
                "none of its keys ({}) is a diffusers scheduler config's (num_train_timesteps, beta_schedule, timestep_spacing, ...)",
                obj.keys().take(5).cloned().collect::<Vec<_>>().join(", ")
            )));
        }
        Ok(c)
    }

    /// The spacing `kind` uses with this config.
    pub fn spacing_for(&self, kind: SchedulerKind) -> TimestepSpacing {
        self.timestep_spacing.unwrap_or(match kind {
            SchedulerKind::Ddim | SchedulerKind::Lcm => TimestepSpacing::Leading,
            _ => TimestepSpacing::Linspace,
        })
    }
}

/// Scheduler construction errors.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SchedulerError {
    #[error("unknown scheduler `{0}` (expected one of: ddim, euler, euler-a, dpmpp-2m, dpmpp-2m-karras, lcm)")]
    UnknownKind(String),
    #[error("the number of inference steps must be at least 1")]
    ZeroSteps,
    #[error("{steps} inference steps is more than num_train_timesteps ({train}): the model was trained on only {train} noise levels")]
    TooManySteps { steps: usize, train: usize },
    #[error("LCM: {steps} inference steps is more than original_inference_steps ({original}); LCM steps are a subset of the {original}-step distillation schedule, so use at most {original}")]
    LcmTooManySteps { steps: usize, original: usize },
    #[error("invalid scheduler config: {0}")]
    Config(String),
}

/// A configured scheduler with its inference schedule fixed (`set_timesteps` done).
///
/// Call `scale_model_input` then `step` for `step = 0, 1, …, timesteps().len() - 1`, in order
/// (multistep solvers keep history). Slices must all have the same length; a length mismatch or
/// an out-of-range `step` is a programming error and panics.
pub trait Scheduler: Send {
    fn kind(&self) -> SchedulerKind;
    /// Values fed to the UNet's `timestep` input, in order (integers for DDIM / DPM / LCM,
    /// possibly fractional for Euler).
    fn timesteps(&self) -> &[f32];
    /// The sigma schedule (`len = timesteps().len() + 1`, ending in 0) for sigma-based
    /// schedulers, `None` for DDIM / LCM.
    fn sigmas(&self) -> Option<&[f32]> {
        None
    }
    /// Initial latents = standard-normal noise × this.
    fn init_noise_sigma(&self) -> f32 {
        1.0
    }
    /// The UNet input for `step`: `sample` scaled as the scheduler requires (a copy for most).
    fn scale_model_input(&self, sample: &[f32], step: usize, out: &mut [f32]) {
        let _ = step;
        out.copy_from_slice(sample);
    }
    /// One denoising step: `sample` (x_t) is replaced by x_{t-1}. `noise` fills the slice it is
    /// given with standard-normal values; it is called once per step by Euler a (every step,
    /// including the last where its weight is 0, as diffusers draws it) and by LCM (every step
    /// but the last), never by the others. After LCM's last step `sample` is the denoised
    /// prediction, which is what diffusers' pipelines decode.
    fn step(
        &mut self,
        model_output: &[f32],
        step: usize,
        sample: &mut [f32],
        noise: &mut dyn FnMut(&mut [f32]),
    );
    /// Noise `original` to the noise level of `timesteps()[step]` (video-to-video start):
    /// `out = sqrt(ᾱ)·x + sqrt(1-ᾱ)·n` (DDIM, LCM), `x + σ·n` (Euler, Euler a),
    /// `α_σ·x + σ_σ·n` (DPM-Solver).
    fn add_noise(&self, original: &[f32], noise: &[f32], step: usize, out: &mut [f32]);
}

/// Builds a scheduler of `kind` with `steps` inference steps.
pub fn create(
    kind: SchedulerKind,
    config: &SchedulerConfig,
    steps: usize,
) -> Result<Box<dyn Scheduler>, SchedulerError> {
    check_config(config)?;
    if steps == 0 {
        return Err(SchedulerError::ZeroSteps);
    }
    if steps > config.num_train_timesteps {
        return Err(SchedulerError::TooManySteps {
            steps,
            train: config.num_train_timesteps,
        });
    }
    check_schedule(kind, config, steps)?;
    Ok(match kind {
        SchedulerKind::Ddim => Box::new(Ddim::new(config, steps)),
        SchedulerKind::Euler => Box::new(Euler::new(config, steps, false)),
        SchedulerKind::EulerAncestral => Box::new(Euler::new(config, steps, true)),
        SchedulerKind::DpmPp2m => Box::new(DpmSolverMultistep::new(config, steps, false)?),
        SchedulerKind::DpmPp2mKarras => Box::new(DpmSolverMultistep::new(config, steps, true)?),
        SchedulerKind::Lcm => Box::new(Lcm::new(config, steps)?),
    })
}

/// DDIM's schedule within its table of ᾱ: "leading" spacing adds `steps_offset` to its largest
/// timestep (999 + 1 at 1000 steps of 1000, which diffusers too would index past the table).
/// (Euler interpolates its sigmas, clamped, as diffusers does; DPM-Solver checks its own.)
fn check_schedule(
    kind: SchedulerKind,
    c: &SchedulerConfig,
    steps: usize,
) -> Result<(), SchedulerError> {
    let train = c.num_train_timesteps;
    if kind == SchedulerKind::Ddim && c.spacing_for(kind) == TimestepSpacing::Leading {
        let last = (steps - 1) * (train / steps) + c.steps_offset;
        if last >= train {
            return Err(SchedulerError::Config(format!(
                "{steps} DDIM steps with \"leading\" timestep spacing and steps_offset {} reach timestep {last}, past the last of num_train_timesteps ({train}): use fewer steps or \"trailing\" spacing",
                c.steps_offset
            )));
        }
    }
    Ok(())
}

fn check_config(c: &SchedulerConfig) -> Result<(), SchedulerError> {
    // (the table of ᾱ is allocated at this length)
    if !(2..=100_000).contains(&c.num_train_timesteps) {
        return Err(SchedulerError::Config(format!(
            "num_train_timesteps must be in 2..=100000, got {}",
            c.num_train_timesteps
        )));
    }
    if c.steps_offset >= c.num_train_timesteps {
        return Err(SchedulerError::Config(format!(
            "steps_offset must be below num_train_timesteps ({}), got {}",
            c.num_train_timesteps, c.steps_offset
        )));
    }
    if !(c.clip_sample_range.is_finite() && c.clip_sample_range > 0.0) {
        return Err(SchedulerError::Config(format!(
            "clip_sample_range must be a positive number, got {}",
            c.clip_sample_range
        )));
    }
    if !(c.beta_start.is_finite() && c.beta_end.is_finite())
        || c.beta_start <= 0.0
        || c.beta_end >= 1.0
        || c.beta_start > c.beta_end
    {
        return Err(SchedulerError::Config(format!(
            "betas must satisfy 0 < beta_start <= beta_end < 1, got {}..{}",
            c.beta_start, c.beta_end
        )));
    }
    if !(1..=3).contains(&c.solver_order) {
        return Err(SchedulerError::Config(format!(
            "solver_order must be 1, 2 or 3, got {}",
            c.solver_order
        )));
    }
    Ok(())
}

/// `alphas_cumprod` exactly as diffusers computes it: `torch.linspace(..., dtype=float32)` (whose
/// CPU kernel is `start + step*i` fused-multiply-add for the first half and `end - step*(n-1-i)`
/// for the second), `(…)**2` for scaled_linear, `1 - betas` in f32, and `torch.cumprod`, which
/// accumulates in f64 on CPU and rounds each prefix to f32.
pub(crate) fn alphas_cumprod(c: &SchedulerConfig) -> Vec<f32> {
    let n = c.num_train_timesteps;
    let (start, end) = match c.beta_schedule {
        BetaSchedule::Linear => (c.beta_start as f32, c.beta_end as f32),
        BetaSchedule::ScaledLinear => (c.beta_start.sqrt() as f32, c.beta_end.sqrt() as f32),
    };
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    let mut acc = 1.0f64;
    (0..n)
        .map(|i| {
            let b = if i < half {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((n - i - 1) as f32, end)
            };
            let b = match c.beta_schedule {
                BetaSchedule::Linear => b,
                BetaSchedule::ScaledLinear => b * b,
            };
            acc *= f64::from(1.0 - b);
            acc as f32
        })
        .collect()
}

/// `((1 - ᾱ) / ᾱ) ** 0.5` over the training steps, in f32 as torch computes it.
pub(crate) fn train_sigmas(alphas_cumprod: &[f32]) -> Vec<f32> {
    alphas_cumprod
        .iter()
        .map(|&a| ((1.0 - a) / a).sqrt())
        .collect()
}

#[inline]
pub(crate) fn check_lens(a: usize, b: usize, what: &str) {
    assert_eq!(
        a, b,
        "scheduler: `{what}` length {b} differs from sample length {a}"
    );
}
