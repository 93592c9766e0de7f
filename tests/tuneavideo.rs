//! Tune-A-Video: the exported UNet (sparse-causal attn1, attn_temp/norm_temp, cross-frame
//! GroupNorm) against the independent PyTorch reference of tests/fixtures/tuneavideo/
//! gen_tav_fixtures.py, standard and with --fused-attention.

mod common;

use std::path::{Path, PathBuf};

use common::{read, run_unet};
use motionrt_export::export::{export, ExportOptions, ExternalData};
use motionrt_export::graph::unet::Semantics;
use motionrt_export::graph::Precision;
use motionrt_runtime::{error_stats, Tolerance};

fn tav(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tuneavideo")
        .join(name)
}

fn opts(out: &Path, fused: bool, mm: Option<PathBuf>) -> ExportOptions {
    ExportOptions {
        unet: tav("tav_tiny"),
        motion_module: mm,
        out: out.to_path_buf(),
        overwrite: false,
        precision: Precision::Fp32,
        semantics: Semantics::Official,
        external_data: ExternalData::Auto,
        vae: None,
        text_encoder: None,
        vae_config: None,
        text_encoder_config: None,
        tokenizer: None,
        unet_only: true,
        fused_attention: fused,
        winograd: false,
    }
}

#[test]
fn tune_a_video_unet_matches_the_reference() {
    let case = tav("case_tav.safetensors");
    let (sample, timestep, ctx, want) = (
        read(&case, "sample"),
        read(&case, "timestep"),
        read(&case, "encoder_hidden_states"),
        read(&case, "noise_pred"),
    );
    let dir = tempfile::tempdir().unwrap();
    let mut outputs = Vec::new();
    for fused in [false, true] {
        let out = dir.path().join(if fused { "fused" } else { "standard" });
        let m = export(&opts(&out, fused, None), &mut |_| {}).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(m.architecture, "tune-a-video");
        assert!(m.motion_module.is_none());
        let onnx = out.join("unet.onnx");
        let summary =
            motionrt_export::onnx::summarize(&motionrt_export::onnx::load_model(&onnx).unwrap());
        // 4 transformer blocks (down 0: 1, mid: 1, up 1: 2): each has a sparse-causal attn1
        // (Gather of frame 0 and of the previous frame, for K and V) and an attn_temp
        // (fused: one com.motionrt.SparseCausalAttention node each, below)
        let gathers = summary.op_counts.get("Gather").copied().unwrap_or(0);
        assert!(fused || gathers >= 16, "{:?}", summary.op_counts);
        if fused {
            let count = |op: &str| summary.op_counts.get(op).copied();
            assert_eq!(count("com.motionrt::TemporalAttention"), Some(4));
            assert_eq!(count("com.motionrt::SparseCausalAttention"), Some(4));
        }
        let got = run_unet(&onnx, &sample, &timestep, &ctx);
        assert_eq!(got.shape, want.shape);
        let s = error_stats(&got.data, &want.data);
        eprintln!(
            "tune-a-video ({}): max abs {:.3e}, max rel-to-max {:.3e}, cosine {:.9}",
            if fused { "fused" } else { "standard" },
            s.max_abs,
            s.max_rel_to_ref_max,
            s.cosine
        );
        assert!(s.passes(Tolerance::FP32), "{s:?}");
        outputs.push(got);
    }
    let s = error_stats(&outputs[1].data, &outputs[0].data);
    assert!(
        s.passes(Tolerance::FP32_REORDERED),
        "fused vs standard {s:?}"
    );
}

#[test]
fn tune_a_video_takes_no_motion_module() {
    let dir = tempfile::tempdir().unwrap();
    let mm =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/unet/mm_v2_flat.safetensors");
    let e = export(&opts(&dir.path().join("o"), false, Some(mm)), &mut |_| {})
        .expect_err("must fail")
        .to_string();
    assert!(
        e.contains("Tune-A-Video") && e.contains("no motion module"),
        "{e}"
    );
    assert!(!dir.path().join("o").exists(), "nothing written");
}

/// The Tune-A-Video fixture UNet with the pipeline fixture's tiny VAE, text encoder and
/// tokenizer (cross_attention_dim 32 = the text encoder's width).
fn export_tav_pipeline(dir: &Path) -> PathBuf {
    let out = dir.join("tav");
    let tiny = common::pipeline_fixtures().join("tiny");
    let mut o = opts(&out, false, None);
    o.unet_only = false;
    o.vae = Some(tiny.clone());
    o.text_encoder = Some(tiny.clone());
    o.tokenizer = Some(tiny);
    export(&o, &mut |_| {}).unwrap_or_else(|e| panic!("{e}"));
    out
}

/// A smooth moving pattern, `[F, H, W, 3]` in [0, 1].
pub fn synthetic_video(f: usize, h: usize, w: usize) -> motionrt_runtime::frames::Frames {
    let mut d = Vec::with_capacity(f * h * w * 3);
    for i in 0..f {
        for y in 0..h {
            for x in 0..w {
                let u = (x as f32 + 3.0 * i as f32) / w as f32;
                let v = y as f32 / h as f32;
                d.extend([
                    0.5 + 0.4 * (6.0 * u).sin(),
                    0.5 + 0.4 * (4.0 * v + u).cos(),
                    0.3 + 0.4 * u * v,
                ]);
            }
        }
    }
    motionrt_runtime::frames::Frames::new(f, h, w, d).unwrap()
}

fn rel_to_max(a: &[f32], b: &[f32]) -> f64 {
    error_stats(a, b).max_rel_to_ref_max
}

fn scale_initializer(onnx: &Path, name: &str, k: f32) {
    let mut m = motionrt_export::onnx::load_model(onnx).unwrap();
    let t = m
        .graph
        .as_mut()
        .unwrap()
        .initializer
        .iter_mut()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("no initializer {name}"));
    assert!(!t.raw_data.is_empty());
    for c in t.raw_data.chunks_exact_mut(4) {
        let v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]) * k;
        c.copy_from_slice(&v.to_le_bytes());
    }
    motionrt_export::onnx::write_model(&m, onnx).unwrap();
}

/// DDIM inversion then regeneration with the same prompt and no guidance reconstructs the input
/// video's latents in the regime the method assumes, and converges as that regime is approached.
///
/// DDIM inversion is exact when the noise prediction ε(x, t) does not depend on x, and its error
/// grows with that dependence (and with the step size). A random-weight UNet is far from a
/// trained denoiser: its ε swings with x, regenerations from any noise reach ~100× the input's
/// scale, and inversion does not reconstruct (49× max|x0| after 10 steps). So the test scales the
/// UNet's last layer (conv_out) by k, which scales ε's dependence on x by k, and measures: the
/// reconstruction error falls in proportion to k, and with more steps; at k = 5e-4 it is within
/// 5e-2 of max|x0|, while regenerating from other noise stays ~100× off. (Real checkpoints cannot
/// be downloaded here; how close a trained Tune-A-Video model reconstructs is not measured.)
#[test]
fn ddim_inversion_reconstructs_the_input_latents() {
    use motionrt_runtime::edit::invert;
    use motionrt_runtime::pipeline::{GenerateOptions, Pipeline};
    use motionrt_runtime::SessionOptions;

    let dir = tempfile::tempdir().unwrap();
    let model = export_tav_pipeline(dir.path());
    let onnx = model.join("unet.onnx");
    let video = synthetic_video(3, 64, 64);
    let prompt = "a red fox running through fresh snow";
    let mut errors = Vec::new();
    let mut scale = 1.0f32;
    for k in [5e-2f32, 5e-3, 5e-4] {
        // conv_out's weight and bias scaled to k of the original
        scale_initializer(&onnx, "conv_out.weight", k / scale);
        scale_initializer(&onnx, "conv_out.bias", k / scale);
        scale = k;
        let mut pipe =
            Pipeline::load(&model, &SessionOptions::default()).unwrap_or_else(|e| panic!("{e}"));
        let x0 = pipe.encode(&video, 2, &mut |w| panic!("{w}")).unwrap();
        assert_eq!(x0.len(), 4 * 3 * 8 * 8);
        for steps in [10usize, 50] {
            let inv = invert(&mut pipe, &x0, 3, 8, 8, prompt, steps, &None, &mut |_| {}).unwrap();
            let mut regen = |init: Option<Vec<f32>>| {
                pipe.generate(
                    &GenerateOptions {
                        prompt: prompt.into(),
                        frames: 3,
                        height: 64,
                        width: 64,
                        steps,
                        guidance: 1.0,
                        init_latents: init,
                        seed: 7,
                        ..Default::default()
                    },
                    &mut |_| {},
                )
                .unwrap()
                .latents
            };
            let e_rec = rel_to_max(&regen(Some(inv.clone())), &x0);
            let e_other = rel_to_max(&regen(None), &x0);
            let e_inv = rel_to_max(&inv, &x0);
            eprintln!(
                "k={k:.0e}, {steps} steps: reconstruction {e_rec:.2e} of max|x0|; inverted vs x0 {e_inv:.2e}; from other noise {e_other:.2e}"
            );
            assert!(e_inv > 0.5, "the inverted latents are noise, not the input");
            assert!(e_other > 10.0 * e_rec, "other noise must not reconstruct");
            errors.push((k, steps, e_rec));
        }
    }
    let e = |k: f32, s: usize| errors.iter().find(|x| x.0 == k && x.1 == s).unwrap().2;
    for k in [5e-2f32, 5e-3, 5e-4] {
        assert!(
            e(k, 50) < e(k, 10),
            "more steps must reconstruct better (k={k})"
        );
    }
    assert!(
        e(5e-3, 10) < 0.2 * e(5e-2, 10) && e(5e-4, 10) < 0.2 * e(5e-3, 10),
        "{errors:?}"
    );
    assert!(e(5e-4, 10) < 5e-2 && e(5e-4, 50) < 5e-2, "{errors:?}");
}

#[test]
fn edit_command_inverts_and_regenerates_a_gif() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = common::pipeline_fixtures().join("tiny");
    let model = dir.path().join("tav");
    let bin = env!("CARGO_BIN_EXE_motionrt");
    let o = std::process::Command::new(bin)
        .args(["export", "--unet"])
        .arg(tav("tav_tiny"))
        .arg("--vae")
        .arg(&tiny)
        .arg("--text-encoder")
        .arg(&tiny)
        .arg("--tokenizer")
        .arg(&tiny)
        .arg("--out")
        .arg(&model)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // a 4-frame 72×56 input: resized to 64×48 (multiples of 8)
    let input = dir.path().join("in.gif");
    let v = synthetic_video(4, 56, 72);
    motionrt_runtime::frames::write(&input, &v, 8.0).unwrap();
    let out = dir.path().join("out.gif");
    let inv = dir.path().join("inv.npy");
    let o = std::process::Command::new(bin)
        .args(["edit", "--model"])
        .arg(&model)
        .arg("--video")
        .arg(&input)
        .args([
            "--prompt",
            "a cat surfing a wave",
            "--steps",
            "3",
            "--frames",
            "3",
            "--width",
            "64",
            "--height",
            "48",
            "--out",
        ])
        .arg(&out)
        .arg("--save-inverted")
        .arg(&inv)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        stdout.contains("inversion") && stdout.contains("VAE encode"),
        "{stdout}"
    );
    let back = motionrt_runtime::video_in::read(&out, None, None).unwrap();
    assert_eq!((back.frames, back.width, back.height), (3, 64, 48));
    let n = motionrt_runtime::npy::read(&inv).unwrap();
    assert_eq!(n.shape, vec![1, 4, 3, 6, 8]);
    assert!(!String::from_utf8_lossy(&o.stderr).contains("warning"));
    // more --frames than the video holds: said, and the video's frames edited
    let o = std::process::Command::new(bin)
        .args(["edit", "--model"])
        .arg(&model)
        .arg("--video")
        .arg(&input)
        .args(["--prompt", "x", "--steps", "1", "--frames", "6", "--out"])
        .arg(dir.path().join("all.gif"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("--frames 6") && err.contains("holds 4 frame(s)"),
        "{err}"
    );
    let back = motionrt_runtime::video_in::read(&dir.path().join("all.gif"), None, None).unwrap();
    assert_eq!(back.frames, 4);

    // bad input
    let o = std::process::Command::new(bin)
        .args(["edit", "--model"])
        .arg(&model)
        .arg("--video")
        .arg(dir.path().join("nope.gif"))
        .args(["--prompt", "x", "--out"])
        .arg(dir.path().join("o2.gif"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("nope.gif: no such file"), "{err}");
    assert!(!dir.path().join("o2.gif").exists());
    // outputs that could not be written are refused before the inversion (which prints its
    // stage line first when it runs), and nothing is left
    for (extra, says) in [
        (vec!["--fps", "0", "--out", "o3.gif"], "frame rate"),
        (vec!["--out", "no/o3.gif"], "no/o3.gif"),
        (
            vec!["--out", "o3.gif", "--save-inverted", "no/inv.npy"],
            "--save-inverted",
        ),
        // outputs over the input or each other
        (vec!["--out", "in.gif"], "that is the input --video"),
        (
            vec!["--out", "o3.gif", "--save-inverted", "in.gif"],
            "its own name",
        ),
        (
            vec!["--out", "o3.gif", "--save-inverted", "o3.gif"],
            "its own name",
        ),
    ] {
        let o = std::process::Command::new(bin)
            .current_dir(dir.path())
            .args(["edit", "--model"])
            .arg(&model)
            .arg("--video")
            .arg(&input)
            .args(["--prompt", "x", "--steps", "1"])
            .args(&extra)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains(says),
            "{extra:?}: {err}"
        );
        assert!(!err.contains("inverting"), "{extra:?}: {err}");
        assert!(!dir.path().join("o3.gif").exists());
    }
}
