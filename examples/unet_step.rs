//! Time one UNet step of an exported model (`motionrt export --unet-only`) on ONNX Runtime (CPU),
//! for the motionrt vs diffusers benchmark in BENCHMARKS.md (driven by `bench/unet_step_cpu.sh`).
//!
//! ```text
//! cargo run --release --example unet_step -- --model OUT_DIR --batch 2 --frames 8 \
//!     --height 16 --width 16 --threads 2 --warmup 1 --repeats 3 --seed 0 \
//!     --inputs inputs.bin --save-output motionrt_out.bin
//! ```
//!
//! Inputs come from a seeded generator (SplitMix64 + Box-Muller): `sample` [B,4,F,h,w] and
//! `encoder_hidden_states` [B·F,77,D] standard normal, `timestep` [B] one integer in [0,1000)
//! repeated over the batch. `--inputs FILE` writes them as raw little-endian f32 (sample,
//! timestep, encoder_hidden_states, in that order) plus `FILE.json` describing shapes and
//! offsets, so `bench/diffusers_unet_step.py` feeds the very same arrays to diffusers.
//! `--save-output FILE` writes the output the same way (`FILE` + `FILE.json`).
//!
//! Prints one JSON line: `{"impl":"motionrt-ort","median_s":..,"times_s":[..],...}`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use motionrt_runtime::{Input, OrtSession, SessionOptions};
use serde_json::json;

#[derive(Parser, Debug)]
#[command(about = "Time one UNet step of an exported motionrt model on ONNX Runtime (CPU)")]
struct Args {
    /// Export folder holding model.json and unet.onnx.
    #[arg(long)]
    model: PathBuf,
    #[arg(long, default_value_t = 2)]
    batch: usize,
    #[arg(long, default_value_t = 8)]
    frames: usize,
    /// Latent height.
    #[arg(long, default_value_t = 16)]
    height: usize,
    /// Latent width.
    #[arg(long, default_value_t = 16)]
    width: usize,
    /// ONNX Runtime intra-op threads (0: ONNX Runtime's default).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write the generated inputs here (raw f32 LE + FILE.json) for the diffusers side.
    #[arg(long)]
    inputs: Option<PathBuf>,
    /// Write the output of the last timed run here (raw f32 LE + FILE.json).
    #[arg(long)]
    save_output: Option<PathBuf>,
}

/// SplitMix64: tiny, seedable, reproducible across platforms.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    fn normals(&mut self, n: usize) -> Vec<f32> {
        let mut v = Vec::with_capacity(n + 1);
        while v.len() < n {
            let (u1, u2) = (self.uniform(), self.uniform());
            let r = (-2.0 * u1.ln()).sqrt();
            let a = std::f64::consts::TAU * u2;
            v.push((r * a.cos()) as f32);
            v.push((r * a.sin()) as f32);
        }
        v.truncate(n);
        v
    }
}

/// Write named f32 arrays back to back as raw little-endian bytes, plus `PATH.json` describing them.
fn write_arrays(
    path: &Path,
    arrays: &[(&str, &[usize], &[f32])],
    meta: serde_json::Value,
) -> Result<()> {
    let total: usize = arrays.iter().map(|(_, _, d)| d.len()).sum();
    let mut bytes = Vec::with_capacity(total * 4);
    let mut desc = Vec::new();
    for (name, shape, data) in arrays {
        desc.push(json!({"name": name, "shape": shape, "offset": bytes.len(), "dtype": "<f4"}));
        for x in *data {
            bytes.extend_from_slice(&x.to_le_bytes());
        }
    }
    std::fs::write(path, &bytes).with_context(|| format!("writing {}", path.display()))?;
    let side = sidecar(path);
    let j = json!({"file": path.file_name().map(|n| n.to_string_lossy().into_owned()), "arrays": desc, "meta": meta});
    std::fs::write(&side, serde_json::to_string_pretty(&j)? + "\n")
        .with_context(|| format!("writing {}", side.display()))?;
    Ok(())
}

fn sidecar(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".json");
    PathBuf::from(s)
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// (VmRSS, VmHWM) of this process in MiB, from /proc/self/status (Linux only).
fn rss_mib() -> (Option<f64>, Option<f64>) {
    let Ok(s) = std::fs::read_to_string("/proc/self/status") else {
        return (None, None);
    };
    let field = |k: &str| {
        s.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn main() -> Result<()> {
    let a = Args::parse();
    if a.repeats == 0 {
        bail!("--repeats must be at least 1");
    }
    let manifest_path = a.model.join("model.json");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest_path).with_context(|| {
            format!(
                "reading {} (run `motionrt export` first)",
                manifest_path.display()
            )
        })?)
        .with_context(|| format!("parsing {}", manifest_path.display()))?;
    let d = manifest["unet_config"]["cross_attention_dim"]
        .as_u64()
        .with_context(|| {
            format!(
                "{}: no unet_config.cross_attention_dim",
                manifest_path.display()
            )
        })? as usize;
    let in_ch = manifest["unet_config"]["in_channels"].as_u64().unwrap_or(4) as usize;
    let tokens = manifest["text_tokens"].as_u64().unwrap_or(77) as usize;
    let onnx = a.model.join(
        manifest["graphs"]["unet"]["file"]
            .as_str()
            .unwrap_or("unet.onnx"),
    );

    let (b, f, h, w) = (a.batch, a.frames, a.height, a.width);
    let sample_shape = [b, in_ch, f, h, w];
    let t_shape = [b];
    let ctx_shape = [b * f, tokens, d];
    let mut rng = Rng(a.seed);
    let sample = rng.normals(sample_shape.iter().product());
    let t_val = (rng.next_u64() % 1000) as f32;
    let timestep = vec![t_val; b];
    let ctx = rng.normals(ctx_shape.iter().product());
    if let Some(p) = &a.inputs {
        write_arrays(
            p,
            &[
                ("sample", &sample_shape, &sample),
                ("timestep", &t_shape, &timestep),
                ("encoder_hidden_states", &ctx_shape, &ctx),
            ],
            json!({"seed": a.seed, "generator": "splitmix64+box-muller"}),
        )?;
    }

    let t0 = Instant::now();
    let mut session = OrtSession::load(
        &onnx,
        &SessionOptions::default().with_intra_threads(a.threads),
    )
    .with_context(|| format!("loading {}", onnx.display()))?;
    let load_s = t0.elapsed().as_secs_f64();
    let (rss_after_load, _) = rss_mib();

    let feeds = [
        ("sample", Input::F32(&sample_shape, &sample)),
        ("timestep", Input::F32(&t_shape, &timestep)),
        ("encoder_hidden_states", Input::F32(&ctx_shape, &ctx)),
    ];
    let mut warmup_s = Vec::new();
    for _ in 0..a.warmup {
        let t = Instant::now();
        session.run_with(&feeds)?;
        warmup_s.push(t.elapsed().as_secs_f64());
    }
    let mut times = Vec::with_capacity(a.repeats);
    let mut out = None;
    for _ in 0..a.repeats {
        let t = Instant::now();
        let o = session.run_with(&feeds)?;
        times.push(t.elapsed().as_secs_f64());
        out = Some(o);
    }
    let outputs = out.expect("repeats >= 1");
    let (out_name, out_t) = outputs.first().context("the graph returned no output")?;
    let (rss_end, hwm) = rss_mib();
    let (sum, max_abs) = out_t
        .data
        .iter()
        .fold((0f64, 0f32), |(s, m), &x| (s + x as f64, m.max(x.abs())));
    if let Some(p) = &a.save_output {
        write_arrays(
            p,
            &[(out_name.as_str(), &out_t.shape, &out_t.data)],
            json!({"impl": "motionrt-ort"}),
        )?;
    }
    let line = json!({
        "impl": "motionrt-ort",
        "median_s": median(&times),
        "times_s": times,
        "warmup_s": warmup_s,
        "threads": a.threads,
        "shape": sample_shape,
        "timestep": t_val,
        "cross_attention_dim": d,
        "load_s": load_s,
        "rss_after_load_mib": rss_after_load,
        "rss_end_mib": rss_end,
        "peak_rss_mib": hwm,
        "output": {"name": out_name, "shape": out_t.shape, "sum": sum, "max_abs": max_abs},
        "model": a.model,
    });
    println!("{line}");
    Ok(())
}
