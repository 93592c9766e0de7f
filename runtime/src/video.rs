//! Writing frames: looping GIF, PNG sequence, MP4 through `ffmpeg`. Every file is written under
//! a temporary sibling name and renamed into place, so a failure leaves nothing half-written.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Decoded video: `data` is `[frames, height, width, 3]` RGB in [0, 1], row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Frames {
    pub frames: usize,
    pub height: usize,
    pub width: usize,
    pub data: Vec<f32>,
}

impl Frames {
    pub fn new(frames: usize, height: usize, width: usize, data: Vec<f32>) -> Self {
        debug_assert_eq!(data.len(), frames * height * width * 3);
        Self {
            frames,
            height,
            width,
            data,
        }
    }

    /// Frame `i` as RGB8 (`round(clamp(x, 0, 1) · 255)`).
    pub fn frame_rgb8(&self, i: usize) -> Vec<u8> {
        let n = self.height * self.width * 3;
        self.data[i * n..(i + 1) * n]
            .iter()
            .map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
            .collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    /// Looping animated GIF.
    Gif,
    /// Numbered PNG files: `out.png` → `out_000.png`, …; a directory → `frame_000.png`, ….
    Png,
    /// H.264 MP4 through `ffmpeg`.
    Mp4,
}

impl OutputFormat {
    pub fn from_path(path: &Path) -> Option<Self> {
        if path.is_dir() || path.to_string_lossy().ends_with('/') {
            return Some(Self::Png);
        }
        match path
            .extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase())
            .as_deref()
        {
            Some("gif") => Some(Self::Gif),
            Some("png") => Some(Self::Png),
            Some("mp4") => Some(Self::Mp4),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VideoError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Encode { path: PathBuf, message: String },
    #[error("{path}: unknown output format (use .gif, .mp4, .png or a directory)")]
    UnknownFormat { path: PathBuf },
    #[error("{path}: writing MP4 needs ffmpeg on the PATH, and there is none; install ffmpeg or write .gif / .png instead")]
    FfmpegMissing { path: PathBuf },
    #[error("{path}: ffmpeg failed ({status}): {stderr}")]
    Ffmpeg {
        path: PathBuf,
        status: String,
        stderr: String,
    },
    #[error("frame {index} contains NaN/Inf values; nothing was written")]
    NonFinite { index: usize },
}

type Result<T> = std::result::Result<T, VideoError>;

fn io(path: &Path, source: std::io::Error) -> VideoError {
    VideoError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A temporary sibling of `path`, removed on drop unless committed.
struct Partial {
    tmp: PathBuf,
    done: bool,
}

impl Partial {
    fn new(path: &Path) -> Self {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "out".into());
        let tmp = path.with_file_name(format!(".{name}.partial-{}", std::process::id()));
        Self { tmp, done: false }
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Commit temporaries to their final names (all or, on the first failure, none).
fn commit(parts: &mut [(Partial, PathBuf)]) -> Result<Vec<PathBuf>> {
    for (p, dst) in parts.iter() {
        std::fs::rename(&p.tmp, dst).map_err(|e| io(dst, e))?;
    }
    Ok(parts
        .iter_mut()
        .map(|(p, dst)| {
            p.done = true;
            dst.clone()
        })
        .collect())
}

fn commit_one(mut part: Partial, dst: &Path) -> Result<PathBuf> {
    std::fs::rename(&part.tmp, dst).map_err(|e| io(dst, e))?;
    part.done = true;
    Ok(dst.to_path_buf())
}

fn check_finite(f: &Frames) -> Result<()> {
    let n = f.height * f.width * 3;
    if let Some(i) = f.data.iter().position(|v| !v.is_finite()) {
        return Err(VideoError::NonFinite {
            index: i / n.max(1),
        });
    }
    Ok(())
}

/// Write `frames` to `path` in the format its name asks for; returns the files written.
pub fn write(path: &Path, frames: &Frames, fps: f32) -> Result<Vec<PathBuf>> {
    match OutputFormat::from_path(path) {
        Some(OutputFormat::Gif) => write_gif(path, frames, fps).map(|p| vec![p]),
        Some(OutputFormat::Png) => write_png_sequence(path, frames),
        Some(OutputFormat::Mp4) => write_mp4(path, frames, fps).map(|p| vec![p]),
        None => Err(VideoError::UnknownFormat {
            path: path.to_path_buf(),
        }),
    }
}

/// Looping GIF, one palette per frame, delay from `fps` (at least 2 centiseconds).
pub fn write_gif(path: &Path, frames: &Frames, fps: f32) -> Result<PathBuf> {
    check_finite(frames)?;
    let enc_err = |e: gif::EncodingError| VideoError::Encode {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let (w, h) = (
        u16::try_from(frames.width).map_err(|_| VideoError::Encode {
            path: path.to_path_buf(),
            message: "GIF frames are at most 65535 pixels wide".into(),
        })?,
        u16::try_from(frames.height).map_err(|_| VideoError::Encode {
            path: path.to_path_buf(),
            message: "GIF frames are at most 65535 pixels high".into(),
        })?,
    );
    let delay = ((100.0 / fps.max(0.01)).round() as u16).max(2);
    let part = Partial::new(path);
    {
        let file = std::fs::File::create(&part.tmp).map_err(|e| io(path, e))?;
        let mut enc =
            gif::Encoder::new(std::io::BufWriter::new(file), w, h, &[]).map_err(enc_err)?;
        enc.set_repeat(gif::Repeat::Infinite).map_err(enc_err)?;
        for i in 0..frames.frames {
            let rgb = frames.frame_rgb8(i);
            let mut f = gif::Frame::from_rgb_speed(w, h, &rgb, 10);
            f.delay = delay;
            enc.write_frame(&f).map_err(enc_err)?;
        }
        let mut out = enc.into_inner().map_err(|e| io(path, e))?;
        out.flush().map_err(|e| io(path, e))?;
    }
    commit_one(part, path)
}

/// PNG files, one per frame: `out.png` → `out_000.png`, …; a directory → `dir/frame_000.png`.
pub fn write_png_sequence(path: &Path, frames: &Frames) -> Result<Vec<PathBuf>> {
    check_finite(frames)?;
    let (dir, stem) = if path.is_dir() || path.to_string_lossy().ends_with('/') {
        (path.to_path_buf(), "frame".to_string())
    } else {
        (
            path.parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
                .to_path_buf(),
            path.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "frame".into()),
        )
    };
    let mut parts = Vec::with_capacity(frames.frames);
    for i in 0..frames.frames {
        let dst = dir.join(format!("{stem}_{i:03}.png"));
        let part = Partial::new(&dst);
        let file = std::fs::File::create(&part.tmp).map_err(|e| io(&dst, e))?;
        let mut enc = png::Encoder::new(
            std::io::BufWriter::new(file),
            frames.width as u32,
            frames.height as u32,
        );
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let perr = |e: png::EncodingError| VideoError::Encode {
            path: dst.clone(),
            message: e.to_string(),
        };
        let mut w = enc.write_header().map_err(perr)?;
        w.write_image_data(&frames.frame_rgb8(i)).map_err(perr)?;
        w.finish().map_err(perr)?;
        parts.push((part, dst));
    }
    commit(&mut parts)
}

/// Whether `ffmpeg` runs.
pub fn ffmpeg_available() -> bool {
    Command::new("ffmpeg")
        .arg("-version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// H.264 MP4 (yuv420p, even dimensions by padding) through `ffmpeg`.
pub fn write_mp4(path: &Path, frames: &Frames, fps: f32) -> Result<PathBuf> {
    check_finite(frames)?;
    if !ffmpeg_available() {
        return Err(VideoError::FfmpegMissing {
            path: path.to_path_buf(),
        });
    }
    let part = Partial::new(path);
    let mut child = Command::new("ffmpeg")
        .args([
            "-y",
            "-loglevel",
            "error",
            "-f",
            "rawvideo",
            "-pix_fmt",
            "rgb24",
            "-s",
        ])
        .arg(format!("{}x{}", frames.width, frames.height))
        .arg("-r")
        .arg(format!("{fps}"))
        .args(["-i", "-", "-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2"])
        .args([
            "-c:v",
            "libx264",
            "-pix_fmt",
            "yuv420p",
            "-movflags",
            "+faststart",
            "-f",
            "mp4",
        ])
        .arg(&part.tmp)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| io(path, e))?;
    if let Some(mut stdin) = child.stdin.take() {
        for i in 0..frames.frames {
            if stdin.write_all(&frames.frame_rgb8(i)).is_err() {
                break; // ffmpeg exited; its status says why
            }
        }
    }
    let out = child.wait_with_output().map_err(|e| io(path, e))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: String = err.lines().rev().take(5).collect::<Vec<_>>().join(" | ");
        return Err(VideoError::Ffmpeg {
            path: path.to_path_buf(),
            status: out.status.to_string(),
            stderr: tail,
        });
    }
    commit_one(part, path)
}
