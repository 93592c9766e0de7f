//! VAE and text-encoder graphs against diffusers / transformers (tests/fixtures/pipeline), from
//! the diffusers folders and from the original single-file layout.

mod common;

use common::*;
use motionrt_export::graph::unet::Semantics;
use motionrt_export::graph::Precision;
use motionrt_runtime::{error_stats, Input, OrtSession, SessionOptions, Tensor, Tolerance};
use std::path::Path;

fn run1(onnx: &Path, inputs: &[(&str, Input<'_>)]) -> Tensor {
    let mut s =
        OrtSession::load(onnx, &SessionOptions::default()).unwrap_or_else(|e| panic!("{e}"));
    let mut out = s.run_with(inputs).unwrap_or_else(|e| panic!("{e}"));
    out.remove(0).1
}

struct Outputs {
    decoded: Tensor,
    encoded: Tensor,
    hidden: Tensor,
}

fn run_components(out: &Path) -> Outputs {
    let vae_case = pipeline_fixtures().join("vae_case.safetensors");
    let te_case = pipeline_fixtures().join("te_case.safetensors");
    let z = read(&vae_case, "latent");
    let x = read(&vae_case, "enc_image");
    let (ids_shape, ids) = read_i64(&te_case, "input_ids");
    Outputs {
        decoded: run1(
            &out.join("vae_decoder.onnx"),
            &[("latent", Input::F32(&z.shape, &z.data))],
        ),
        encoded: run1(
            &out.join("vae_encoder.onnx"),
            &[("image", Input::F32(&x.shape, &x.data))],
        ),
        hidden: run1(
            &out.join("text_encoder.onnx"),
            &[("input_ids", Input::I64(&ids_shape, &ids))],
        ),
    }
}

fn check(name: &str, ours: &Tensor, reference: &Tensor, tol: Tolerance) {
    assert_eq!(ours.shape, reference.shape, "{name}: shape");
    let s = error_stats(&ours.data, &reference.data);
    println!(
        "{name}: max abs err {:.3e} = {:.3e} of max |ref| {:.3}",
        s.max_abs, s.max_rel_to_ref_max, s.ref_max
    );
    assert!(
        s.nonfinite == 0 && s.max_rel_to_ref_max <= tol.rel_to_max,
        "{name}: {:.3e} of max |ref| > {} tolerance {:.0e}",
        s.max_rel_to_ref_max,
        tol.name,
        tol.rel_to_max
    );
}

#[test]
fn vae_and_text_encoder_match_diffusers() {
    let e = export_pipeline(
        &pipeline_fixtures().join("tiny"),
        false,
        Semantics::Diffusers,
        Precision::Fp32,
    );
    let m = &e.manifest;
    assert!(
        (m.scaling_factor - 0.18215).abs() < 1e-7,
        "scaling factor {}",
        m.scaling_factor
    );
    for g in ["unet", "vae_decoder", "vae_encoder", "text_encoder"] {
        assert!(m.graphs.contains_key(g), "{g} missing from model.json");
    }
    let tok = m.tokenizer.as_ref().expect("tokenizer copied");
    assert!(
        tok.files.contains(&"vocab.json".to_string())
            && tok.files.contains(&"merges.txt".to_string())
    );
    let out = e.dir.path().join("out");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("model.json")).expect("model.json"))
            .expect("json");
    assert_eq!(
        json["scaling_factor"].as_f64().map(|v| v as f32),
        Some(0.18215)
    );

    let o = run_components(&out);
    let vae_case = pipeline_fixtures().join("vae_case.safetensors");
    let te_case = pipeline_fixtures().join("te_case.safetensors");
    check(
        "vae_decoder",
        &o.decoded,
        &read(&vae_case, "image"),
        Tolerance::FP32,
    );
    check(
        "vae_encoder",
        &o.encoded,
        &read(&vae_case, "latent_mean"),
        Tolerance::FP32,
    );
    check(
        "text_encoder",
        &o.hidden,
        &read(&te_case, "last_hidden_state"),
        Tolerance::FP32,
    );
}

#[test]
fn single_file_layout_gives_identical_graphs() {
    let a = export_pipeline(
        &pipeline_fixtures().join("tiny"),
        false,
        Semantics::Diffusers,
        Precision::Fp32,
    );
    let b = export_pipeline(
        &pipeline_fixtures().join("ldm_vae_te.safetensors"),
        // The heads of a text encoder are not visible in its shapes.
        true,
        Semantics::Diffusers,
        Precision::Fp32,
    );
    let vb = b.manifest.vae.as_ref().expect("vae");
    assert_eq!(vb.layout.to_string(), "ldm (original single file)");
    assert_eq!(
        b.manifest.tensor_map["encoder.mid_block.attentions.0.to_q.weight"].key,
        "first_stage_model.encoder.mid.attn_1.q.weight"
    );
    let (oa, ob) = (
        run_components(&a.dir.path().join("out")),
        run_components(&b.dir.path().join("out")),
    );
    assert_eq!(oa.decoded, ob.decoded);
    assert_eq!(oa.encoded, ob.encoded);
    assert_eq!(oa.hidden, ob.hidden);
}

#[test]
fn fp16_components_stay_close() {
    let e = export_pipeline(
        &pipeline_fixtures().join("tiny"),
        false,
        Semantics::Diffusers,
        Precision::Fp16,
    );
    let o = run_components(&e.dir.path().join("out"));
    let vae_case = pipeline_fixtures().join("vae_case.safetensors");
    let te_case = pipeline_fixtures().join("te_case.safetensors");
    check(
        "vae_decoder fp16",
        &o.decoded,
        &read(&vae_case, "image"),
        Tolerance::FP16,
    );
    check(
        "vae_encoder fp16",
        &o.encoded,
        &read(&vae_case, "latent_mean"),
        Tolerance::FP16,
    );
    check(
        "text_encoder fp16",
        &o.hidden,
        &read(&te_case, "last_hidden_state"),
        Tolerance::FP16,
    );
}
