//! Write a full-size SD1.5 UNet (diffusers folder, fp32 safetensors) and an AnimateDiff v2 motion
//! module (original layout, fp32 safetensors) with deterministic random weights, for the export
//! benchmark in BENCHMARKS.md.
//!
//! `cargo run --release --example synth_sd15 -- DIR`

use motionrt_export::config::{MotionConfig, UnetConfig};
use motionrt_export::synthetic::write_model;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args().nth(1).ok_or("usage: synth_sd15 DIR")?;
    let m = write_model(
        std::path::Path::new(&dir),
        &UnetConfig::sd15(),
        &MotionConfig::sd15_v2(),
        1,
    )?;
    println!("{}\n{}", m.unet_dir.display(), m.motion_file.display());
    Ok(())
}
