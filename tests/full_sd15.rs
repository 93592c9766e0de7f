//! The full SD1.5 + AnimateDiff v2 architecture (random weights, ~1.3 B parameters) exported and
//! compared with diffusers at a tiny latent (B=1, F=2, 16×16). Ignored by default: the input is
//! generated, not committed (~5 GB, needs torch + diffusers):
//!
//! ```sh
//! python tests/fixtures/unet/gen_full_sd15.py target/full_sd15
//! MOTIONRT_FULL_SD15=target/full_sd15 ./scripts/test --test full_sd15 -- --ignored --nocapture
//! ```

mod common;

use std::path::PathBuf;

use common::*;
use motionrt_export::export::ExternalData;
use motionrt_export::graph::unet::Semantics;
use motionrt_export::graph::Precision;
use motionrt_runtime::{error_stats, Tolerance};

#[test]
#[ignore = "needs the generated full-size input (see the module docs)"]
fn full_sd15_v2_matches_diffusers() {
    let dir = std::env::var_os("MOTIONRT_FULL_SD15")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/full_sd15"));
    assert!(
        dir.join("case_full.safetensors").is_file(),
        "run tests/fixtures/unet/gen_full_sd15.py {} first",
        dir.display()
    );
    let e = export_with(
        &dir,
        Some(&dir.join("mm_sd_v15_v2.safetensors")),
        Semantics::Diffusers,
        Precision::Fp32,
        ExternalData::Auto,
    );
    let m = &e.manifest;
    assert_eq!(m.unet.parameters, 859_520_964, "SD1.5 UNet parameter count");
    let mm = m.motion_module.as_ref().unwrap();
    assert_eq!((mm.modules, mm.positional_table_length), (21, 32));
    assert!(
        m.graphs["unet"].external_data.is_some(),
        "5 GB of weights go to external data"
    );
    let case = dir.join("case_full.safetensors");
    let reference = read(&case, "noise_pred");
    let ours = run_unet(
        &e.onnx(),
        &read(&case, "sample"),
        &read(&case, "timestep"),
        &read(&case, "encoder_hidden_states"),
    );
    let s = error_stats(&ours.data, &reference.data);
    eprintln!("full SD1.5 + v2: {s:?}");
    assert!(s.passes(Tolerance::FP32), "{s:?}");
}
