//! UNet export parity against diffusers (fixtures made by tests/fixtures/unet/gen_fixtures.py
//! with the pinned versions in requirements.txt there), across versions, semantics, layouts
//! and precisions.

mod common;

use common::*;
use motionrt_export::export::ExternalData;
use motionrt_export::graph::unet::Semantics;
use motionrt_export::graph::Precision;
use motionrt_runtime::{error_stats, Tolerance};

fn assert_close(case: &str, ours: &[f32], reference: &[f32], tol: Tolerance) {
    let s = error_stats(ours, reference);
    eprintln!(
        "{case}: max abs {:.3e}, max rel-to-max {:.3e} (tolerance {} = {:.0e}), cosine {:.9}",
        s.max_abs, s.max_rel_to_ref_max, tol.name, tol.rel_to_max, s.cosine
    );
    assert!(s.passes(tol), "{case}: {s:?} exceeds tolerance {tol:?}");
}

fn parity(unet: &str, mm: &str, semantics: Semantics, case: &str) {
    let e = export_fx(unet, mm, semantics);
    let (ours, reference) = run_case(&e.onnx(), case);
    assert_close(case, &ours.data, &reference.data, Tolerance::FP32);
}

#[test]
fn v2_diffusers_semantics_match_diffusers() {
    parity(
        "sd_tiny",
        "adapter_v2",
        Semantics::Diffusers,
        "v2_diffusers",
    );
}

/// Export options for sd_tiny + adapter_v2 (diffusers semantics, UNet only) into `out` with the
/// given precision and operator lowering.
fn lowered_options(
    out: &std::path::Path,
    precision: Precision,
    fused_attention: bool,
    winograd: bool,
) -> motionrt_export::export::ExportOptions {
    motionrt_export::export::ExportOptions {
        unet: fx("sd_tiny"),
        motion_module: Some(fx("adapter_v2")),
        out: out.to_path_buf(),
        overwrite: false,
        precision,
        semantics: Semantics::Diffusers,
        external_data: ExternalData::Auto,
        vae: None,
        text_encoder: None,
        vae_config: None,
        text_encoder_config: None,
        tokenizer: None,
        unet_only: true,
        fused_attention,
        winograd,
    }
}

/// [`lowered_options`] in fp32, exported.
fn export_lowered(
    out: &std::path::Path,
    fused_attention: bool,
    winograd: bool,
) -> motionrt_export::export::ModelManifest {
    let opts = lowered_options(out, Precision::Fp32, fused_attention, winograd);
    motionrt_export::export::export(&opts, &mut |_| {}).unwrap_or_else(|e| panic!("{e}"))
}

/// `--fused-attention`: the motion modules' attention as com.motionrt.TemporalAttention, run by
/// motionrt's CPU kernel inside ONNX Runtime; same parity with diffusers, and the same numbers
/// as the standard-op graph within fp32 rounding.
#[test]
fn fused_attention_matches_diffusers_and_the_standard_graph() {
    let dir = tempfile::tempdir().unwrap();
    let m = export_lowered(&dir.path().join("fused"), true, false);
    assert!(m.fused_attention);
    let fused = dir.path().join("fused/unet.onnx");
    let summary =
        motionrt_export::onnx::summarize(&motionrt_export::onnx::load_model(&fused).unwrap());
    // 2 attentions × (layers per block) motion transformer blocks; every one fused
    let n = summary
        .op_counts
        .get("com.motionrt::TemporalAttention")
        .copied()
        .unwrap_or(0);
    let modules = m.motion_module.as_ref().unwrap().modules;
    assert_eq!(n, 2 * modules, "{:?}", summary.op_counts);
    assert!(summary.opsets.contains(&("com.motionrt".to_string(), 1)));
    let (ours, reference) = run_case(&fused, "v2_diffusers");
    assert_close(
        "v2_diffusers fused",
        &ours.data,
        &reference.data,
        Tolerance::FP32,
    );
    let standard = export_fx("sd_tiny", "adapter_v2", Semantics::Diffusers);
    let (std_out, _) = run_case(&standard.onnx(), "v2_diffusers");
    assert_close(
        "fused vs standard",
        &ours.data,
        &std_out.data,
        Tolerance::FP32_REORDERED,
    );
}

/// `--winograd`: every 3×3 stride-1 convolution with ≥ 32 channels on both sides as
/// WinogradInput → MatMul → WinogradOutput; same parity with diffusers, and the standard graph's
/// numbers within fp32 rounding. The other convolutions (conv_in: 4 channels, conv_out: 4,
/// stride-2 downsamplers, 1×1 shortcuts and projections) stay `Conv`.
#[test]
fn winograd_convolutions_match_diffusers_and_the_standard_graph() {
    let dir = tempfile::tempdir().unwrap();
    let m = export_lowered(&dir.path().join("wino"), false, true);
    assert!(m.winograd);
    let wino = dir.path().join("wino/unet.onnx");
    let model = motionrt_export::onnx::load_model(&wino).unwrap();
    let graph = model.graph.as_ref().unwrap();
    let conv3 = |n: &motionrt_export::onnx::proto::NodeProto| {
        n.op_type == "Conv"
            && n.attribute
                .iter()
                .any(|a| a.name == "kernel_shape" && a.ints == [3, 3])
    };
    let strided = |n: &motionrt_export::onnx::proto::NodeProto| {
        n.attribute
            .iter()
            .any(|a| a.name == "strides" && a.ints == [2, 2])
    };
    let count = |op: &str| graph.node.iter().filter(|n| n.op_type == op).count();
    let inputs = count("WinogradInput");
    assert!(inputs > 0, "no Winograd convolutions");
    assert_eq!(inputs, count("WinogradOutput"));
    // what stays direct: conv_in, conv_out and the stride-2 downsamplers
    let mut direct: Vec<&str> = graph
        .node
        .iter()
        .filter(|n| conv3(n) && !strided(n))
        .map(|n| n.input[1].as_str())
        .collect();
    direct.sort();
    assert_eq!(
        direct,
        ["conv_in.weight", "conv_out.weight"],
        "3x3 stride-1 convolutions left direct (by weight)"
    );
    let standard = export_fx("sd_tiny", "adapter_v2", Semantics::Diffusers);
    let std_model = motionrt_export::onnx::load_model(&standard.onnx()).unwrap();
    let std_direct = std_model
        .graph
        .as_ref()
        .unwrap()
        .node
        .iter()
        .filter(|n| conv3(n) && !strided(n))
        .count();
    assert_eq!(
        inputs + 2,
        std_direct,
        "every other 3x3 stride-1 conv is Winograd"
    );
    let (ours, reference) = run_case(&wino, "v2_diffusers");
    assert_close(
        "v2_diffusers winograd",
        &ours.data,
        &reference.data,
        Tolerance::FP32,
    );
    let (std_out, _) = run_case(&standard.onnx(), "v2_diffusers");
    assert_close(
        "winograd vs standard",
        &ours.data,
        &std_out.data,
        Tolerance::FP32_REORDERED,
    );
    // the kernels are stored transformed, [16, O, C], beside the checkpoint's name; model.json
    // maps them back to the checkpoint tensor
    let name = "down_blocks.0.resnets.0.conv1.weight";
    let init = format!("{name}@winograd");
    assert!(graph
        .initializer
        .iter()
        .any(|t| t.name == init && t.dims == [16, 32, 32]));
    assert!(!graph.initializer.iter().any(|t| t.name == name));
    let src = &m.tensor_map[&init];
    assert_eq!(src.key, name);
    assert_eq!(
        src.transform,
        Some(motionrt_export::graph::Transform::Winograd)
    );
}

/// `--winograd` with `--precision fp16` is refused before anything is written.
#[test]
fn winograd_needs_fp32() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("w16");
    let opts = lowered_options(&out, Precision::Fp16, false, true);
    let e = motionrt_export::export::export(&opts, &mut |_| {}).unwrap_err();
    assert!(e.to_string().contains("--winograd"), "{e}");
    assert!(!out.exists());
}

#[test]
fn v2_official_semantics_match_per_frame_reference() {
    parity(
        "sd_tiny",
        "mm_v2_nested.ckpt",
        Semantics::Official,
        "v2_official",
    );
}

#[test]
fn v3_both_semantics() {
    parity(
        "sd_tiny",
        "mm_v3.ckpt",
        Semantics::Diffusers,
        "v3_diffusers",
    );
    parity("sd_tiny", "mm_v3.ckpt", Semantics::Official, "v3_official");
}

#[test]
fn v1_both_semantics() {
    parity(
        "sd_tiny",
        "mm_v1.ckpt",
        Semantics::Diffusers,
        "v1_diffusers",
    );
    parity("sd_tiny", "mm_v1.ckpt", Semantics::Official, "v1_official");
}

/// The two semantics must differ by far more than the tolerance on the fixture, or the parity
/// tests above could not tell them apart.
#[test]
fn semantics_differ_far_beyond_tolerance() {
    for v in ["v1", "v2", "v3"] {
        let off = read(&fx(&format!("case_{v}_official.safetensors")), "noise_pred");
        let dif = read(
            &fx(&format!("case_{v}_diffusers.safetensors")),
            "noise_pred",
        );
        let s = error_stats(&off.data, &dif.data);
        eprintln!(
            "{v}: official vs diffusers reference: {:.3e} of max",
            s.max_rel_to_ref_max
        );
        assert!(
            s.max_rel_to_ref_max > 100.0 * Tolerance::FP32.rel_to_max,
            "{v}: semantics differ by only {s:?}"
        );
    }
    // And our graphs differ the same way: the official export does not match the diffusers case.
    let e = export_fx("sd_tiny", "mm_v2_nested.ckpt", Semantics::Official);
    let (ours, reference) = run_case(&e.onnx(), "v2_diffusers");
    let s = error_stats(&ours.data, &reference.data);
    assert!(
        s.max_rel_to_ref_max > 100.0 * Tolerance::FP32.rel_to_max,
        "{s:?}"
    );
}

/// The same weights in the original layouts (LDM single file; AnimateDiff .ckpt nested and
/// .safetensors flat) give the same outputs as the diffusers layout.
#[test]
fn original_layouts_match_diffusers_layout() {
    let base = export_fx("sd_tiny", "adapter_v2", Semantics::Diffusers);
    let (want, _) = run_case(&base.onnx(), "v2_diffusers");
    for (unet, mm) in [
        ("sd_tiny_ldm.ckpt", "mm_v2_nested.ckpt"),
        ("sd_tiny_ldm.ckpt", "mm_v2_flat.safetensors"),
        ("sd_tiny", "mm_v2_flat.safetensors"),
    ] {
        let e = export_fx(unet, mm, Semantics::Diffusers);
        let (got, _) = run_case(&e.onnx(), "v2_diffusers");
        assert_close(
            &format!("{unet} + {mm}"),
            &got.data,
            &want.data,
            Tolerance::SAME_WEIGHTS,
        );
        // Initializers carry diffusers names whatever the source layout; model.json maps back.
        let m = &e.manifest;
        let src =
            &m.tensor_map["down_blocks.0.motion_modules.0.transformer_blocks.0.attn1.to_q.weight"];
        assert_eq!(src.key, "down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.to_q.weight");
        if unet.ends_with(".ckpt") {
            assert_eq!(
                m.tensor_map["down_blocks.0.resnets.0.conv1.weight"].key,
                "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
            );
        }
    }
}

#[test]
fn versions_are_detected_and_recorded() {
    for (mm, version, modules, pe) in [
        ("mm_v1.ckpt", "V1", 10, 24),
        ("mm_v2_nested.ckpt", "V2", 11, 32),
        ("mm_v2_flat.safetensors", "V2", 11, 32),
        ("adapter_v2", "V2", 11, 32),
        ("mm_v3.ckpt", "V3", 10, 32),
    ] {
        let e = export_fx("sd_tiny", mm, Semantics::Official);
        let m = e
            .manifest
            .motion_module
            .as_ref()
            .expect("motion module recorded");
        assert_eq!(format!("{:?}", m.version), version, "{mm}");
        assert_eq!(m.modules, modules, "{mm}");
        assert_eq!(m.positional_table_length, pe, "{mm}");
        assert_eq!(e.manifest.max_frames, Some(pe));
        let json: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(e.dir.path().join("out/model.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(json["semantics"], "official");
        assert_eq!(json["precision"], "fp32");
        assert!(json["inputs_sha256"].as_object().unwrap().len() >= 2);
        for h in json["inputs_sha256"].as_object().unwrap().values() {
            assert_eq!(h.as_str().unwrap().len(), 64);
        }
    }
}

#[test]
fn external_data_gives_the_same_graph() {
    let inline = export_with(
        &fx("sd_tiny"),
        Some(&fx("adapter_v2")),
        Semantics::Diffusers,
        Precision::Fp32,
        ExternalData::Never,
    );
    let ext = export_with(
        &fx("sd_tiny"),
        Some(&fx("adapter_v2")),
        Semantics::Diffusers,
        Precision::Fp32,
        ExternalData::Always,
    );
    assert!(ext.dir.path().join("out/unet.onnx.data").is_file());
    assert!(!inline.dir.path().join("out/unet.onnx.data").exists());
    let (a, reference) = run_case(&inline.onnx(), "v2_diffusers");
    let (b, _) = run_case(&ext.onnx(), "v2_diffusers");
    assert_eq!(a.data, b.data);
    assert_close("external data", &b.data, &reference.data, Tolerance::FP32);
}

/// fp16 export: the error against the fp32 diffusers reference is measured and bounded.
#[test]
fn fp16_error_is_bounded() {
    for (mm, semantics, case) in [
        ("adapter_v2", Semantics::Diffusers, "v2_diffusers"),
        ("mm_v1.ckpt", Semantics::Official, "v1_official"),
    ] {
        let e = export_with(
            &fx("sd_tiny"),
            Some(&fx(mm)),
            semantics,
            Precision::Fp16,
            ExternalData::Auto,
        );
        let (ours, reference) = run_case(&e.onnx(), case);
        let s = error_stats(&ours.data, &reference.data);
        eprintln!(
            "fp16 {case}: {:.3e} of max, cosine {:.6}",
            s.max_rel_to_ref_max, s.cosine
        );
        assert!(s.passes(Tolerance::FP16), "{case}: {s:?}");
        // fp16 really is in effect: the error is above fp32 rounding.
        assert!(
            s.max_rel_to_ref_max > Tolerance::FP32.rel_to_max,
            "{case}: fp16 graph looks like fp32: {s:?}"
        );
    }
}

/// The exported graph passes the ONNX checker's full check (with shape inference).
#[test]
fn onnx_checker_full_check() {
    let Some(py) = python_with_onnx() else {
        if std::env::var_os("CI").is_some() {
            panic!("the onnx Python package is required in CI (scripts/env.sh installs it)");
        }
        eprintln!("SKIP: no python with the `onnx` package (run ./scripts/test)");
        return;
    };
    for (precision, ext) in [
        (Precision::Fp32, ExternalData::Never),
        (Precision::Fp16, ExternalData::Always),
    ] {
        let e = export_with(
            &fx("sd_tiny_ldm.ckpt"),
            Some(&fx("mm_v2_nested.ckpt")),
            Semantics::Official,
            precision,
            ext,
        );
        let script = "import sys, onnx\nm = sys.argv[1]\nonnx.checker.check_model(m, full_check=True)\nmodel = onnx.load(m)\nops = {o.domain for o in model.opset_import}\nassert ops == {''}, ops\nassert max(o.version for o in model.opset_import) >= 17\nprint('ok', len(model.graph.node))";
        let out = std::process::Command::new(&py)
            .args(["-c", script])
            .arg(e.onnx())
            .output()
            .expect("python runs");
        assert!(
            out.status.success(),
            "onnx.checker failed ({precision:?}): {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
