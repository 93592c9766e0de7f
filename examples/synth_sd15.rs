//! Write a full-size SD1.5 UNet (diffusers folder, fp32 safetensors) and an AnimateDiff v2 motion
//! module (original layout, fp32 safetensors) with deterministic random weights, for the
//! benchmarks in BENCHMARKS.md.
//!
//! `cargo run --release --example synth_sd15 -- DIR [--components]`
//!
//! `--components` also writes the SD1.5 VAE (`DIR/sd/vae`, 83.7 M parameters) and the CLIP
//! ViT-L/14 text encoder (`DIR/sd/text_encoder`, 123 M parameters, vocabulary 49408) with random
//! weights, and tokenizer files (`DIR/sd/tokenizer`: motionrt's byte-level BPE vocabulary, whose
//! ids all lie inside CLIP's 49408), so `motionrt export --unet DIR/sd` exports the whole pipeline.

use motionrt_export::components::{TextEncoderConfig, VaeConfig};
use motionrt_export::config::{MotionConfig, UnetConfig};
use motionrt_export::synthetic::{write_model, write_vae_and_text_encoder};
use motionrt_runtime::tokenizer::ClipTokenizer;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut dir = None;
    let mut components = false;
    for a in std::env::args().skip(1) {
        match a.as_str() {
            "--components" => components = true,
            _ if dir.is_none() && !a.starts_with('-') => dir = Some(a),
            _ => return Err(format!("usage: synth_sd15 DIR [--components] (got {a:?})").into()),
        }
    }
    let dir = dir.ok_or("usage: synth_sd15 DIR [--components]")?;
    let m = write_model(
        std::path::Path::new(&dir),
        &UnetConfig::sd15(),
        &MotionConfig::sd15_v2(),
        1,
    )?;
    if components {
        let tok = ClipTokenizer::byte_level();
        tok.write_files(&m.unet_dir.join("tokenizer"))?;
        write_vae_and_text_encoder(
            &m.unet_dir,
            &VaeConfig::sd15(),
            &TextEncoderConfig::clip_vit_l14(),
            2,
        )?;
    }
    println!("{}\n{}", m.unet_dir.display(), m.motion_file.display());
    Ok(())
}
