//! Deterministic random-weight models in the real file layouts, for the `demo` and for tests
//! that need files to break. The weights come from a seeded SplitMix64 + Box–Muller stream, so the
//! same seed writes byte-identical files on every machine.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::config::{MotionConfig, MotionVersion, UnetConfig};
use crate::graph::layers::positional_table;
use crate::graph::unet::{self, Semantics};
use crate::graph::Precision;
use crate::remap::diffusers_to_animatediff;
use crate::{ExportError, Result};

/// A tiny SD1.x-shaped UNet: two levels (32, 64 channels), two layers per block, the first level
/// with cross-attention, 8 heads, 32-wide text embeddings.
pub fn tiny_unet() -> UnetConfig {
    UnetConfig {
        block_out_channels: vec![32, 64],
        down_attention: vec![true, false],
        cross_attention_dim: 32,
        time_proj_dim: 32,
        time_embed_dim: 128,
        ..UnetConfig::sd15()
    }
}

/// Motion modules matching [`tiny_unet`].
pub fn tiny_motion(version: MotionVersion) -> MotionConfig {
    MotionConfig {
        version,
        block_out_channels: vec![32, 64],
        layers_per_block: 2,
        transformer_layers: 1,
        num_attention_heads: 8,
        norm_num_groups: 32,
        max_seq_length: if version == MotionVersion::V1 { 24 } else { 32 },
        mid_block: version == MotionVersion::V2,
    }
}

/// Seeded normal samples.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

    /// SplitMix64's output for the state `z`.
    fn mix(mut z: u64) -> u64 {
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(Self::GAMMA);
        Self::mix(self.0)
    }

    fn to_uniform(x: u64) -> f64 {
        ((x >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// Uniform in (0, 1).
    pub fn uniform(&mut self) -> f64 {
        Self::to_uniform(self.next_u64())
    }

    fn box_muller(u1: f64, u2: f64) -> f32 {
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    }

    pub fn normal(&mut self) -> f32 {
        let (u1, u2) = (self.uniform(), self.uniform());
        Self::box_muller(u1, u2)
    }

    /// `f` of `n` normal samples: the values `n` calls of [`Rng::normal`] give, the state moved
    /// past them. The generator is counter-based (sample `i` is a function of the state and
    /// `i`), so large draws are split over threads with the same result.
    pub fn normals(&mut self, n: usize, f: impl Fn(f32) -> f32 + Sync) -> Vec<f32> {
        let s0 = self.0;
        let at = |i: usize| {
            let k = 2 * i as u64;
            let u1 = Self::to_uniform(Self::mix(
                s0.wrapping_add((k + 1).wrapping_mul(Self::GAMMA)),
            ));
            let u2 = Self::to_uniform(Self::mix(
                s0.wrapping_add((k + 2).wrapping_mul(Self::GAMMA)),
            ));
            f(Self::box_muller(u1, u2))
        };
        let mut v = vec![0f32; n];
        let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
        let chunk = n.div_ceil(threads).max(1 << 16);
        std::thread::scope(|sc| {
            for (c, part) in v.chunks_mut(chunk).enumerate() {
                let at = &at;
                sc.spawn(move || {
                    for (j, x) in part.iter_mut().enumerate() {
                        *x = at(c * chunk + j);
                    }
                });
            }
        });
        self.0 = s0.wrapping_add((2 * n as u64).wrapping_mul(Self::GAMMA));
        v
    }
}

/// Values for a parameter by its role: weights N(0, 1/√fan_in), biases N(0, 0.1),
/// norm scales 1 + N(0, 0.1).
fn init_param(rng: &mut Rng, name: &str, shape: &[usize]) -> Vec<f32> {
    let n: usize = shape.iter().product();
    let is_norm = name.rsplit('.').nth(1).is_some_and(|m| m.contains("norm"));
    if name.ends_with(".bias") {
        rng.normals(n, |x| 0.1 * x)
    } else if is_norm && shape.len() == 1 {
        rng.normals(n, |x| 1.0 + 0.1 * x)
    } else {
        let fan_in: usize = shape.iter().skip(1).product::<usize>().max(1);
        let s = 1.0 / (fan_in as f32).sqrt();
        rng.normals(n, |x| s * x)
    }
}

/// Write float32 tensors as a `.safetensors` file (temporary name, then rename).
pub fn write_safetensors(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Result<()> {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape, data) in tensors {
        let len = data.len() * 4;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len]}),
        );
        offset += len;
    }
    let mut h = serde_json::to_vec(&serde_json::Value::Object(header))
        .map_err(|e| ExportError::model(path, e.to_string()))?;
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let tmp = path.with_extension("safetensors.tmp");
    let _unfinished = motionrt_kernels::unfinished::register(&tmp);
    let write = || -> std::io::Result<()> {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        f.write_all(&(h.len() as u64).to_le_bytes())?;
        f.write_all(&h)?;
        let mut buf = Vec::with_capacity(1 << 20);
        for (_, _, data) in tensors {
            for part in data.chunks(1 << 18) {
                buf.clear();
                buf.extend(part.iter().flat_map(|v| v.to_le_bytes()));
                f.write_all(&buf)?;
            }
        }
        f.into_inner().map_err(|e| e.into_error())?.sync_all()
    };
    write().map_err(|e| ExportError::io(&tmp, e))?;
    motionrt_kernels::unfinished::commit(|| std::fs::rename(&tmp, path))
        .map_err(|e| ExportError::io(path, e))
}

/// diffusers `config.json` for a UNet config.
pub fn unet_config_json(cfg: &UnetConfig) -> serde_json::Value {
    let down: Vec<&str> = cfg
        .down_attention
        .iter()
        .map(|&a| {
            if a {
                "CrossAttnDownBlock2D"
            } else {
                "DownBlock2D"
            }
        })
        .collect();
    let up: Vec<&str> = cfg
        .down_attention
        .iter()
        .rev()
        .map(|&a| if a { "CrossAttnUpBlock2D" } else { "UpBlock2D" })
        .collect();
    serde_json::json!({
        "_class_name": "UNet2DConditionModel",
        "act_fn": "silu",
        "attention_head_dim": cfg.num_attention_heads,
        "block_out_channels": cfg.block_out_channels,
        "cross_attention_dim": cfg.cross_attention_dim,
        "down_block_types": down,
        "up_block_types": up,
        "flip_sin_to_cos": cfg.flip_sin_to_cos,
        "freq_shift": cfg.freq_shift,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "layers_per_block": cfg.layers_per_block,
        "norm_eps": cfg.norm_eps,
        "norm_num_groups": cfg.norm_num_groups,
        "use_linear_projection": cfg.use_linear_projection,
        "time_embedding_dim": cfg.time_embed_dim,
        "sample_size": 64
    })
}

/// Paths of a written synthetic model.
#[derive(Debug, Clone)]
pub struct SyntheticModel {
    /// A diffusers pipeline-style folder with `unet/config.json` + weights.
    pub unet_dir: PathBuf,
    /// An original-layout AnimateDiff motion module (`.safetensors`).
    pub motion_file: PathBuf,
}

/// Write a random-weight UNet (diffusers layout) and motion module (original AnimateDiff layout)
/// under `dir`.
pub fn write_model(
    dir: &Path,
    unet_cfg: &UnetConfig,
    motion_cfg: &MotionConfig,
    seed: u64,
) -> Result<SyntheticModel> {
    let g = unet::build(
        unet_cfg,
        Some(motion_cfg),
        Semantics::Diffusers,
        Precision::Fp32,
        false,
    );
    let mut rng = Rng::new(seed);
    let (mut unet_t, mut mm_t) = (Vec::new(), Vec::new());
    for p in &g.params {
        let v = init_param(&mut rng, &p.name, &p.shape);
        if p.name.contains(".motion_modules.") {
            let key = diffusers_to_animatediff(&p.name).ok_or_else(|| {
                ExportError::model(dir, format!("no AnimateDiff name for {}", p.name))
            })?;
            mm_t.push((key, p.shape.clone(), v));
        } else {
            unet_t.push((p.name.clone(), p.shape.clone(), v));
        }
    }
    // The original files carry a positional table per attention.
    let mut pe = Vec::new();
    for (k, shape, _) in &mm_t {
        if let Some(base) = k.strip_suffix(".attention_blocks.0.to_q.weight") {
            let c = shape[0];
            let table = positional_table(motion_cfg.max_seq_length, c);
            for a in 0..2 {
                pe.push((
                    format!("{base}.attention_blocks.{a}.pos_encoder.pe"),
                    vec![1, motion_cfg.max_seq_length, c],
                    table.clone(),
                ));
            }
        }
    }
    mm_t.extend(pe);
    let unet_dir = dir.join("sd");
    let sub = unet_dir.join("unet");
    std::fs::create_dir_all(&sub).map_err(|e| ExportError::io(&sub, e))?;
    let cfg_path = sub.join("config.json");
    let text = serde_json::to_string_pretty(&unet_config_json(unet_cfg))
        .map_err(|e| ExportError::model(&cfg_path, e.to_string()))?;
    std::fs::write(&cfg_path, text).map_err(|e| ExportError::io(&cfg_path, e))?;
    write_safetensors(&sub.join("diffusion_pytorch_model.safetensors"), &unet_t)?;
    let motion_file = dir.join(format!("mm_{}.safetensors", motion_cfg.version));
    write_safetensors(&motion_file, &mm_t)?;
    Ok(SyntheticModel {
        unet_dir,
        motion_file,
    })
}

/// A tiny VAE with SD's structure (4 levels, so latents are 1/8 of the image): 8, 16, 16, 16
/// channels, one ResNet per level, 8 GroupNorm groups.
pub fn tiny_vae() -> crate::components::VaeConfig {
    crate::components::VaeConfig {
        block_out_channels: vec![8, 16, 16, 16],
        layers_per_block: 1,
        norm_num_groups: 8,
        ..crate::components::VaeConfig::sd15()
    }
}

/// A tiny CLIP text encoder for [`tiny_unet`] (width 32) over a `vocab_size` vocabulary.
pub fn tiny_text_encoder(vocab_size: usize) -> crate::components::TextEncoderConfig {
    crate::components::TextEncoderConfig {
        vocab_size,
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        ..crate::components::TextEncoderConfig::clip_vit_l14()
    }
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let text =
        serde_json::to_string_pretty(v).map_err(|e| ExportError::model(path, e.to_string()))?;
    std::fs::write(path, text).map_err(|e| ExportError::io(path, e))
}

/// Write a random-weight VAE (`pipeline/vae/`) and CLIP text encoder (`pipeline/text_encoder/`)
/// in the diffusers / transformers folder layouts.
pub fn write_vae_and_text_encoder(
    pipeline: &Path,
    vae: &crate::components::VaeConfig,
    text: &crate::components::TextEncoderConfig,
    seed: u64,
) -> Result<()> {
    use crate::graph::{clip, vae as vae_graph};
    let mut rng = Rng::new(seed);
    let random = |rng: &mut Rng, params: &[crate::graph::Param]| {
        params
            .iter()
            .map(|p| {
                (
                    p.name.clone(),
                    p.shape.clone(),
                    init_param(rng, &p.name, &p.shape),
                )
            })
            .collect::<Vec<_>>()
    };
    let mut vae_t = random(
        &mut rng,
        &vae_graph::build_encoder(vae, Precision::Fp32, Default::default()).params,
    );
    vae_t.extend(random(
        &mut rng,
        &vae_graph::build_decoder(vae, Precision::Fp32, Default::default()).params,
    ));
    let d = pipeline.join("vae");
    std::fs::create_dir_all(&d).map_err(|e| ExportError::io(&d, e))?;
    write_json(
        &d.join("config.json"),
        &serde_json::json!({
            "_class_name": "AutoencoderKL",
            "in_channels": vae.in_channels,
            "out_channels": vae.out_channels,
            "latent_channels": vae.latent_channels,
            "block_out_channels": vae.block_out_channels,
            "down_block_types": vec!["DownEncoderBlock2D"; vae.block_out_channels.len()],
            "up_block_types": vec!["UpDecoderBlock2D"; vae.block_out_channels.len()],
            "layers_per_block": vae.layers_per_block,
            "norm_num_groups": vae.norm_num_groups,
            "act_fn": "silu",
            "scaling_factor": vae.scaling_factor,
        }),
    )?;
    write_safetensors(&d.join("diffusion_pytorch_model.safetensors"), &vae_t)?;

    let te_t = random(&mut rng, &clip::build(text, Precision::Fp32).params);
    let d = pipeline.join("text_encoder");
    std::fs::create_dir_all(&d).map_err(|e| ExportError::io(&d, e))?;
    write_json(
        &d.join("config.json"),
        &serde_json::json!({
            "architectures": ["CLIPTextModel"],
            "model_type": "clip_text_model",
            "vocab_size": text.vocab_size,
            "hidden_size": text.hidden_size,
            "intermediate_size": text.intermediate_size,
            "num_hidden_layers": text.num_hidden_layers,
            "num_attention_heads": text.num_attention_heads,
            "max_position_embeddings": text.max_position_embeddings,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": text.layer_norm_eps,
        }),
    )?;
    write_safetensors(&d.join("model.safetensors"), &te_t)
}

#[cfg(test)]
mod tests {
    use super::Rng;

    /// The threaded draw gives exactly the sequential samples (several chunks at this size) and
    /// leaves the generator where the sequential draw would.
    #[test]
    fn threaded_normals_equal_sequential_ones() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        let n = 300_001;
        let seq: Vec<f32> = (0..n).map(|_| 0.5 * a.normal()).collect();
        let par = b.normals(n, |x| 0.5 * x);
        assert!(seq
            .iter()
            .zip(&par)
            .all(|(x, y)| x.to_bits() == y.to_bits()));
        assert_eq!(a.normal().to_bits(), b.normal().to_bits());
        assert!(b.normals(0, |x| x).is_empty());
        assert_eq!(a.uniform().to_bits(), b.uniform().to_bits());
    }
}
