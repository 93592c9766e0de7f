//! Write a full-size SD1.5 UNet (diffusers folder, fp32 safetensors) and an AnimateDiff v2 motion
//! module (original layout, fp32 safetensors) with deterministic random weights, for the export
//! benchmark in BENCHMARKS.md.
//!
//! `cargo run --release --example synth_sd15 -- DIR`

use motionrt_export::config::{MotionConfig, MotionVersion, UnetConfig};
use motionrt_export::synthetic::write_model;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args().nth(1).ok_or("usage: synth_sd15 DIR")?;
    let motion = MotionConfig {
        version: MotionVersion::V2,
        block_out_channels: vec![320, 640, 1280, 1280],
        layers_per_block: 2,
        transformer_layers: 1,
        num_attention_heads: 8,
        norm_num_groups: 32,
        max_seq_length: 32,
        mid_block: true,
    };
    let m = write_model(std::path::Path::new(&dir), &UnetConfig::sd15(), &motion, 1)?;
    println!("{}\n{}", m.unet_dir.display(), m.motion_file.display());
    Ok(())
}
