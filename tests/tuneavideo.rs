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
        assert!(
            summary.op_counts.get("Gather").copied().unwrap_or(0) >= 6,
            "{:?}",
            summary.op_counts
        );
        if fused {
            assert_eq!(
                summary
                    .op_counts
                    .get("com.motionrt::TemporalAttention")
                    .copied(),
                Some(4)
            );
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
