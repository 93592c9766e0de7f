//! Shared helpers for the integration tests: fixture paths, exporting, running on ONNX Runtime.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use motionrt_export::export::{export, ExportOptions, ExternalData, ModelManifest};
use motionrt_export::graph::unet::Semantics;
use motionrt_export::graph::Precision;
use motionrt_export::Checkpoint;
use motionrt_runtime::{OrtSession, SessionOptions, Tensor};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/unet")
}

pub fn fx(name: &str) -> PathBuf {
    fixtures().join(name)
}

/// Read a float tensor from a safetensors/ckpt file.
pub fn read(path: &Path, key: &str) -> Tensor {
    let c = Checkpoint::open(path).unwrap_or_else(|e| panic!("{e}"));
    let meta = c
        .meta(key)
        .unwrap_or_else(|| panic!("{}: no tensor {key}", path.display()))
        .clone();
    Tensor::new(
        meta.shape.clone(),
        c.read_f32(key).unwrap_or_else(|e| panic!("{e}")),
    )
}

pub struct Exported {
    pub dir: tempfile::TempDir,
    pub manifest: ModelManifest,
}

impl Exported {
    pub fn onnx(&self) -> PathBuf {
        self.dir.path().join("out/unet.onnx")
    }
}

pub fn export_with(
    unet: &Path,
    mm: Option<&Path>,
    semantics: Semantics,
    precision: Precision,
    external: ExternalData,
) -> Exported {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = ExportOptions {
        unet: unet.to_path_buf(),
        motion_module: mm.map(Path::to_path_buf),
        out: dir.path().join("out"),
        overwrite: false,
        precision,
        semantics,
        external_data: external,
        vae: None,
        text_encoder: None,
        vae_config: None,
        text_encoder_config: None,
        tokenizer: None,
        unet_only: false,
        fused_attention: false,
        winograd: false,
    };
    let manifest = export(&opts, &mut |_| {}).unwrap_or_else(|e| panic!("export failed: {e}"));
    Exported { dir, manifest }
}

pub fn export_fx(unet: &str, mm: &str, semantics: Semantics) -> Exported {
    export_with(
        &fx(unet),
        Some(&fx(mm)),
        semantics,
        Precision::Fp32,
        ExternalData::Auto,
    )
}

/// Run the UNet graph on a fixture case's inputs; returns (ours, reference).
pub fn run_case(onnx: &Path, case: &str) -> (Tensor, Tensor) {
    let path = fx(&format!("case_{case}.safetensors"));
    let sample = read(&path, "sample");
    let timestep = read(&path, "timestep");
    let ctx = read(&path, "encoder_hidden_states");
    let reference = read(&path, "noise_pred");
    let ours = run_unet(onnx, &sample, &timestep, &ctx);
    assert_eq!(ours.shape, reference.shape, "output shape");
    (ours, reference)
}

pub fn run_unet(onnx: &Path, sample: &Tensor, timestep: &Tensor, ctx: &Tensor) -> Tensor {
    let mut s =
        OrtSession::load(onnx, &SessionOptions::default()).unwrap_or_else(|e| panic!("{e}"));
    let mut out = s
        .run(&[
            ("sample", sample),
            ("timestep", timestep),
            ("encoder_hidden_states", ctx),
        ])
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out.len(), 1);
    let (name, t) = out.remove(0);
    assert_eq!(name, "noise_pred");
    t
}

/// A Python with the `onnx` package (set by scripts/env.sh), or None.
pub fn python_with_onnx() -> Option<String> {
    let candidates = [
        std::env::var("MOTIONRT_PYTHON").ok(),
        Some("python3".to_string()),
    ];
    candidates.into_iter().flatten().find(|py| {
        Command::new(py)
            .args(["-c", "import onnx"])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

pub fn pipeline_fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pipeline")
}

/// Read an int64 tensor from a safetensors file.
pub fn read_i64(path: &Path, key: &str) -> (Vec<usize>, Vec<i64>) {
    let c = Checkpoint::open(path).unwrap_or_else(|e| panic!("{e}"));
    let shape = c
        .meta(key)
        .unwrap_or_else(|| panic!("{}: no tensor {key}", path.display()))
        .shape
        .clone();
    let mut raw = Vec::new();
    c.read_raw_into(key, &mut raw)
        .unwrap_or_else(|e| panic!("{e}"));
    let data = raw
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
        .collect();
    (shape, data)
}

/// Export the tiny pipeline fixture (sd_tiny + adapter_v2 + tiny VAE / text encoder / tokenizer).
pub fn export_pipeline(
    vae_and_te: &Path,
    configs: bool,
    semantics: Semantics,
    precision: Precision,
) -> Exported {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = ExportOptions {
        unet: fx("sd_tiny"),
        motion_module: Some(fx("adapter_v2")),
        out: dir.path().join("out"),
        overwrite: false,
        precision,
        semantics,
        external_data: ExternalData::Auto,
        vae: Some(vae_and_te.to_path_buf()),
        text_encoder: Some(vae_and_te.to_path_buf()),
        vae_config: configs.then(|| pipeline_fixtures().join("tiny/vae/config.json")),
        text_encoder_config: configs
            .then(|| pipeline_fixtures().join("tiny/text_encoder/config.json")),
        tokenizer: Some(pipeline_fixtures().join("tiny")),
        unet_only: false,
        fused_attention: false,
        winograd: false,
    };
    let manifest = export(&opts, &mut |_| {}).unwrap_or_else(|e| panic!("export failed: {e}"));
    Exported { dir, manifest }
}

/// The text width D, from an exported UNet's `encoder_hidden_states` `[B·F, 77, D]` (`export`
/// is the folder holding `unet.onnx`).
pub fn text_width(export: &Path) -> usize {
    let m = motionrt_export::onnx::load_model(&export.join("unet.onnx")).unwrap();
    let s = motionrt_export::onnx::summarize(&m);
    let info = s
        .inputs
        .iter()
        .find(|i| i.name == "encoder_hidden_states")
        .unwrap();
    info.dims.last().unwrap().parse::<usize>().unwrap()
}
