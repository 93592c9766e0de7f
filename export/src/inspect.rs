//! `motionrt inspect`: what a checkpoint, model folder or ONNX file is.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::{MotionConfig, UnetConfig};
use crate::onnx::{load_model, summarize, OnnxSummary};
use crate::remap::Layout;
use crate::source;
use crate::{Checkpoint, ExportError, Result};

/// What a checkpoint (or model folder) holds.
#[derive(Debug, Clone, Serialize)]
pub struct CheckpointSummary {
    pub path: PathBuf,
    /// `unet`, `motion_module` or `unknown`.
    pub kind: String,
    pub layout: Option<Layout>,
    pub files: Vec<(PathBuf, String)>,
    pub nested_state_dict: bool,
    pub tensors: usize,
    pub parameters: u64,
    /// Element count per dtype.
    pub dtypes: BTreeMap<String, u64>,
    pub motion: Option<MotionConfig>,
    pub unet: Option<UnetConfig>,
    /// The UNet file also holds a VAE / text encoder (original single files).
    pub also_contains: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Summary {
    Checkpoint(CheckpointSummary),
    Onnx(OnnxSummary),
}

impl std::fmt::Display for CheckpointSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{}", self.path.display())?;
        let layout = self
            .layout
            .map(|l| l.to_string())
            .unwrap_or_else(|| "unrecognised".into());
        writeln!(f, "  kind:        {} ({layout} layout)", self.kind)?;
        for (p, fmt) in &self.files {
            writeln!(f, "  file:        {} [{fmt}]", p.display())?;
        }
        if self.nested_state_dict {
            writeln!(f, "  nested:      tensors under `state_dict`")?;
        }
        writeln!(f, "  tensors:     {}", self.tensors)?;
        writeln!(
            f,
            "  parameters:  {} ({:.1} M)",
            self.parameters,
            self.parameters as f64 / 1e6
        )?;
        let d: Vec<String> = self
            .dtypes
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        writeln!(f, "  dtypes:      {}", d.join(", "))?;
        if let Some(m) = &self.motion {
            writeln!(
                f,
                "  motion:      AnimateDiff {} — {} modules, channels {:?}, {} heads, positional table {}{}",
                m.version,
                m.module_count(),
                m.block_out_channels,
                m.num_attention_heads,
                m.max_seq_length,
                if m.mid_block { ", mid-block module" } else { "" }
            )?;
        }
        if let Some(u) = &self.unet {
            writeln!(
                f,
                "  unet:        channels {:?}, {} layers/block, cross-attention {}, {} heads",
                u.block_out_channels,
                u.layers_per_block,
                u.cross_attention_dim,
                u.num_attention_heads
            )?;
        }
        if !self.also_contains.is_empty() {
            writeln!(f, "  also holds:  {}", self.also_contains.join(", "))?;
        }
        Ok(())
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Summary::Checkpoint(c) => c.fmt(f),
            Summary::Onnx(o) => o.fmt(f),
        }
    }
}

fn is_onnx(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("onnx"))
}

/// Inspect a checkpoint file, a diffusers folder, or an ONNX file.
pub fn inspect(path: &Path) -> Result<Summary> {
    if !path.exists() {
        return Err(ExportError::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder"),
        ));
    }
    if path.is_file() && is_onnx(path) {
        let m = load_model(path)?;
        // protobuf reads an empty file as a model of nothing: not what anyone means to inspect
        if m.graph.is_none() && m.ir_version == 0 {
            return Err(ExportError::model(
                path,
                "no ONNX model in this file (no graph and no IR version: empty or not ONNX)",
            ));
        }
        return Ok(Summary::Onnx(summarize(&m)));
    }
    // Try as a UNet, then as a motion module; report the raw file if neither fits.
    let unet = source::open_unet(path);
    let motion = source::open_motion(path);
    let (src, kind, unet_cfg, motion_cfg) = match (unet, motion) {
        (Ok((s, c)), Ok((_, m))) => (s, "unet (with motion modules)", Some(c), Some(m)),
        (Ok((s, c)), Err(_)) => (s, "unet", Some(c), None),
        (Err(_), Ok((s, m))) => (s, "motion_module", None, Some(m)),
        (Err(e), Err(_)) => {
            // A readable checkpoint of something else still gets a summary; an unreadable one
            // reports why.
            if path.is_dir() {
                return Err(e);
            }
            let ckpt = Checkpoint::open(path)?;
            let mut dtypes = BTreeMap::new();
            let mut parameters = 0u64;
            for k in ckpt.keys() {
                if let Some(m) = ckpt.meta(k) {
                    let e = dtypes.entry(m.dtype.to_string()).or_insert(0u64);
                    *e = e.saturating_add(m.numel() as u64);
                    parameters = parameters.saturating_add(m.numel() as u64);
                }
            }
            return Ok(Summary::Checkpoint(CheckpointSummary {
                path: path.to_path_buf(),
                kind: "unknown".into(),
                layout: None,
                files: vec![(path.to_path_buf(), ckpt.format().to_string())],
                nested_state_dict: ckpt.nested_state_dict(),
                tensors: ckpt.len(),
                parameters,
                dtypes,
                motion: None,
                unet: None,
                also_contains: vec![],
            }));
        }
    };
    let mut dtypes = BTreeMap::new();
    let mut parameters = 0u64;
    let mut tensors = 0;
    let mut also = Vec::new();
    for ckpt in &src.files {
        for k in ckpt.keys() {
            if let Some(m) = ckpt.meta(k) {
                tensors += 1;
                let e = dtypes.entry(m.dtype.to_string()).or_insert(0u64);
                *e = e.saturating_add(m.numel() as u64);
                // Positional tables are fixed sinusoids stored as buffers, not parameters.
                if !k.ends_with(".pe") {
                    parameters = parameters.saturating_add(m.numel() as u64);
                }
            }
            if k.starts_with("first_stage_model.") && !also.contains(&"vae") {
                also.push("vae");
            }
            if k.starts_with("cond_stage_model.") && !also.contains(&"text encoder") {
                also.push("text encoder");
            }
        }
    }
    Ok(Summary::Checkpoint(CheckpointSummary {
        path: path.to_path_buf(),
        kind: kind.into(),
        layout: Some(src.layout),
        files: src
            .files
            .iter()
            .map(|c| (c.path().to_path_buf(), c.format().to_string()))
            .collect(),
        nested_state_dict: src.files.iter().any(|c| c.nested_state_dict()),
        tensors,
        parameters,
        dtypes,
        motion: motion_cfg,
        unet: unet_cfg,
        also_contains: also.into_iter().map(String::from).collect(),
    }))
}
