//! End to end against diffusers' `AnimateDiffPipeline` (tests/fixtures/pipeline): the same tiny
//! model, prompt, negative prompt, initial noise, scheduler and steps, with classifier-free
//! guidance; our final latents and decoded frames must match.

mod common;

use common::*;
use motionrt_export::graph::unet::Semantics;
use motionrt_export::graph::Precision;
use motionrt_runtime::pipeline::{GenerateOptions, Pipeline};
use motionrt_runtime::scheduler::{SchedulerConfig, SchedulerKind};
use motionrt_runtime::{error_stats, SessionOptions, Tolerance};

/// Frames are compared in absolute terms on the [0, 1] scale: 1e-3 is a quarter of one 8-bit
/// level.
const FRAME_ABS_TOL: f64 = 1e-3;

fn manifest() -> serde_json::Value {
    let p = pipeline_fixtures().join("manifest.json");
    serde_json::from_str(&std::fs::read_to_string(&p).expect("manifest")).expect("json")
}

#[test]
fn matches_animatediff_pipeline() {
    let e = export_pipeline(
        &pipeline_fixtures().join("tiny"),
        false,
        Semantics::Diffusers,
        Precision::Fp32,
    );
    let out = e.dir.path().join("out");
    let mut pipe =
        Pipeline::load(&out, &SessionOptions::default()).unwrap_or_else(|e| panic!("{e}"));
    let m = manifest();
    for (case, kind) in [
        ("ddim", SchedulerKind::Ddim),
        ("euler", SchedulerKind::Euler),
        ("dpmpp", SchedulerKind::DpmPp2mKarras),
    ] {
        let file = pipeline_fixtures().join(format!("pipe_{case}.safetensors"));
        let cfg = SchedulerConfig::from_diffusers_json(&m["cases"][case]["scheduler_config"])
            .unwrap_or_else(|e| panic!("{case}: {e}"));
        let opts = GenerateOptions {
            prompt: m["prompt"].as_str().unwrap().into(),
            negative_prompt: m["negative_prompt"].as_str().unwrap().into(),
            frames: m["frames"].as_u64().unwrap() as usize,
            height: m["height"].as_u64().unwrap() as usize,
            width: m["width"].as_u64().unwrap() as usize,
            steps: m["steps"].as_u64().unwrap() as usize,
            guidance: m["guidance"].as_f64().unwrap() as f32,
            scheduler: kind,
            scheduler_config: Some(cfg),
            decode_chunk: 3,
            init_latents: Some(read(&file, "init_latents").data),
            ..Default::default()
        };
        let video = pipe
            .generate(&opts, &mut |_| {})
            .unwrap_or_else(|e| panic!("{case}: {e}"));
        let ref_latents = read(&file, "latents");
        let ref_frames = read(&file, "frames");
        let sl = error_stats(&video.latents, &ref_latents.data);
        let sf = error_stats(&video.rgb, &ref_frames.data);
        println!(
            "{case}: latents max err {:.2e} ({:.2e} of max |ref| {:.2}); frames max abs err {:.2e}, mean {:.2e}",
            sl.max_abs, sl.max_rel_to_ref_max, sl.ref_max, sf.max_abs, sf.mean_abs
        );
        assert_eq!(
            video.rgb.len(),
            ref_frames.data.len(),
            "{case}: frame data size"
        );
        assert!(
            sl.max_rel_to_ref_max <= Tolerance::FP32.rel_to_max,
            "{case}: latents {:.2e} of max",
            sl.max_rel_to_ref_max
        );
        assert!(
            sf.max_abs <= FRAME_ABS_TOL,
            "{case}: frames {:.2e}",
            sf.max_abs
        );
        if case == "ddim" {
            // Streaming decode, one frame per VAE call (one call in flight ahead of the one
            // handed over): the chunks come in order and hold the same frames.
            let (f, h, w) = pipe.latent_dims(&opts);
            let mut seen = Vec::new();
            let mut rgb = Vec::new();
            pipe.decode_to(&video.latents, f, h, w, 1, &mut |_| {}, &mut |c| {
                seen.push((c.start, c.frames));
                rgb.extend(c.rgb());
                Ok(())
            })
            .unwrap();
            assert_eq!(seen, (0..f).map(|i| (i, 1)).collect::<Vec<_>>());
            let d = error_stats(&rgb, &video.rgb);
            assert!(d.max_abs <= 1e-5, "chunk 1 vs chunk 3: {:.2e}", d.max_abs);
        }
    }
}

/// A sink that fails on the first chunk stops the decode with its error; the run decoding the
/// next chunk (in flight) is collected, so the pipeline decodes again afterwards.
#[test]
fn a_failing_frame_sink_stops_the_decode_and_the_pipeline_still_decodes() {
    let e = export_pipeline(
        &pipeline_fixtures().join("tiny"),
        false,
        Semantics::Diffusers,
        Precision::Fp32,
    );
    let mut pipe = Pipeline::load(&e.dir.path().join("out"), &SessionOptions::default())
        .unwrap_or_else(|e| panic!("{e}"));
    let m = manifest();
    let opts = GenerateOptions {
        prompt: "a cat".into(),
        frames: m["frames"].as_u64().unwrap() as usize,
        height: m["height"].as_u64().unwrap() as usize,
        width: m["width"].as_u64().unwrap() as usize,
        steps: 1,
        ..Default::default()
    };
    assert!(opts.frames >= 2, "two chunks of one frame at least");
    let ctx = pipe.text_context(&opts, &mut |_| {}).unwrap();
    let mut t = Default::default();
    let latents = pipe.denoise(&opts, &ctx, &mut t, &mut |_| {}).unwrap();
    let (f, h, w) = pipe.latent_dims(&opts);
    let mut seen = 0;
    let r = pipe.decode_to(&latents, f, h, w, 1, &mut |_| {}, &mut |_| {
        seen += 1;
        Err(motionrt_runtime::pipeline::PipelineError::Options(
            "the sink is full".into(),
        ))
    });
    let e = r.unwrap_err().to_string();
    assert!(e.contains("the sink is full"), "{e}");
    assert_eq!(seen, 1, "nothing is handed to the sink after its error");
    let mut frames = 0;
    pipe.decode_to(&latents, f, h, w, 1, &mut |_| {}, &mut |c| {
        frames += c.frames;
        Ok(())
    })
    .unwrap();
    assert_eq!(frames, f);
}
