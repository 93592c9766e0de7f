//! Tune-A-Video-style video editing: encode the input video, invert it with DDIM to the noise
//! that regenerates it (conditioned on a source prompt, no guidance), then generate from that
//! noise with an edited prompt and classifier-free guidance.
//!
//! The inversion is Tune-A-Video's `ddim_inversion`: for the DDIM timesteps in ascending order,
//! `ε = UNet(x, t, source)` and `x ← √ᾱ_t · x̂0 + √(1−ᾱ_t) · ε` with `x̂0` computed at the
//! previous timestep (`Ddim::invert_step`).

use std::time::Instant;

use crate::frames::Frames;
use crate::pipeline::{Event, GenerateOptions, Pipeline, PipelineError, Result, Video};
use crate::scheduler::{Ddim, SchedulerConfig, SchedulerKind};

/// What to edit into the video.
#[derive(Debug, Clone)]
pub struct EditOptions {
    /// Describes the input video; conditions the inversion (Tune-A-Video uses "").
    pub source_prompt: String,
    /// The edited prompt the output is generated with.
    pub prompt: String,
    pub negative_prompt: String,
    /// DDIM steps, for the inversion and the generation.
    pub steps: usize,
    /// Classifier-free guidance of the generation (Tune-A-Video: 12.5).
    pub guidance: f32,
    pub decode_chunk: usize,
    pub scheduler_config: Option<SchedulerConfig>,
}

/// The result: the edited video, the inverted latents and per-stage times.
pub struct Edited {
    pub video: Video,
    /// `[1, C, F, h, w]`, the noise the generation started from.
    pub inverted: Vec<f32>,
    /// The input video's latents.
    pub source_latents: Vec<f32>,
    pub encode_seconds: f64,
    pub invert_seconds: f64,
}

fn sched_config(pipe: &Pipeline, o: &Option<SchedulerConfig>) -> Result<SchedulerConfig> {
    Ok(match o {
        Some(c) => c.clone(),
        None if pipe.info.scheduler_defaults.is_object() => {
            SchedulerConfig::from_diffusers_json(&pipe.info.scheduler_defaults)?
        }
        None => SchedulerConfig::animatediff(),
    })
}

/// DDIM-invert `latents` (`[1, C, F, h, w]`) conditioned on `prompt` (no guidance).
#[allow(clippy::too_many_arguments)]
pub fn invert(
    pipe: &mut Pipeline,
    latents: &[f32],
    frames: usize,
    h: usize,
    w: usize,
    prompt: &str,
    steps: usize,
    scheduler_config: &Option<SchedulerConfig>,
    events: &mut dyn FnMut(Event),
) -> Result<Vec<f32>> {
    let c = pipe.info.latent_channels;
    if latents.len() != c * frames * h * w {
        return Err(PipelineError::Options(format!(
            "latents have {} values; [1, {c}, {frames}, {h}, {w}] needs {}",
            latents.len(),
            c * frames * h * w
        )));
    }
    let cfg = sched_config(pipe, scheduler_config)?;
    // steps > 0 and ≤ the training steps: checked by the scheduler constructor
    crate::scheduler::create(SchedulerKind::Ddim, &cfg, steps)?;
    let ddim = Ddim::new(&cfg, steps);
    let ctx_opts = GenerateOptions {
        prompt: prompt.to_string(),
        frames,
        guidance: 1.0,
        ..Default::default()
    };
    let ctx = pipe.text_context(&ctx_opts, &mut |m| events(Event::Warning(m)))?;
    let mut x = latents.to_vec();
    let ts: Vec<i64> = ddim.timesteps_i().iter().rev().copied().collect();
    for (i, &t) in ts.iter().enumerate() {
        let eps = pipe.unet(&x, [1, c, frames, h, w], t as f32, &ctx)?;
        ddim.invert_step(&eps, t, &mut x);
        let bad = x.iter().filter(|v| !v.is_finite()).count();
        if bad > 0 {
            return Err(PipelineError::NonFinite {
                what: "the inverted latents",
                when: format!("after inversion step {} of {}", i + 1, ts.len()),
                count: bad,
                advice: pipe.overflow_advice(),
            });
        }
        events(Event::Step {
            index: i,
            total: ts.len(),
        });
    }
    Ok(x)
}

/// Encode, invert, regenerate with the edited prompt.
pub fn edit(
    pipe: &mut Pipeline,
    input: &Frames,
    o: &EditOptions,
    events: &mut dyn FnMut(Event),
) -> Result<Edited> {
    let gen = GenerateOptions {
        prompt: o.prompt.clone(),
        negative_prompt: o.negative_prompt.clone(),
        frames: input.frames,
        height: input.height,
        width: input.width,
        steps: o.steps,
        guidance: o.guidance,
        scheduler: SchedulerKind::Ddim,
        scheduler_config: o.scheduler_config.clone(),
        decode_chunk: o.decode_chunk,
        ..Default::default()
    };
    pipe.validate(&gen)?;
    events(Event::Stage("VAE encode"));
    let t = Instant::now();
    let source_latents = pipe.encode(input, o.decode_chunk, &mut |m| events(Event::Warning(m)))?;
    let encode_seconds = t.elapsed().as_secs_f64();
    let (f, h, w) = pipe.latent_dims(&gen);
    events(Event::Stage("inverting"));
    let t = Instant::now();
    let inverted = invert(
        pipe,
        &source_latents,
        f,
        h,
        w,
        &o.source_prompt,
        o.steps,
        &o.scheduler_config,
        events,
    )?;
    let invert_seconds = t.elapsed().as_secs_f64();
    let video = pipe.generate(
        &GenerateOptions {
            init_latents: Some(inverted.clone()),
            ..gen
        },
        events,
    )?;
    Ok(Edited {
        video,
        inverted,
        source_latents,
        encode_seconds,
        invert_seconds,
    })
}
