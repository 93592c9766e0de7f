//! Reading input videos for editing: an animated GIF, a directory of PNG frames (sorted by
//! name), a single PNG, or any video `ffmpeg` can decode (MP4, WebM, ...), into [`Frames`]; and
//! resizing them (bilinear, as PIL's `resize` without antialiasing) to the model's size.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::frames::Frames;

#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct VideoError {
    pub path: PathBuf,
    pub message: String,
}

fn err(path: &Path, message: impl Into<String>) -> VideoError {
    VideoError {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Read a video; `max_frames` keeps the first frames only. `size` (width, height) is needed for
/// ffmpeg-decoded videos, which are scaled by ffmpeg on the way in; other inputs keep theirs.
pub fn read(
    path: &Path,
    max_frames: Option<usize>,
    size: Option<(usize, usize)>,
) -> Result<Frames, VideoError> {
    if path.is_dir() {
        return read_png_dir(path, max_frames);
    }
    if !path.is_file() {
        return Err(err(path, "no such file or directory"));
    }
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    match ext.as_str() {
        "gif" => read_gif(path, max_frames),
        "png" => {
            let (w, h, rgb) = read_png(path)?;
            Frames::new(1, h, w, rgb).map_err(|e| err(path, e.to_string()))
        }
        _ => read_ffmpeg(path, max_frames, size),
    }
}

fn read_gif(path: &Path, max_frames: Option<usize>) -> Result<Frames, VideoError> {
    let file = std::fs::File::open(path).map_err(|e| err(path, e.to_string()))?;
    let mut opts = gif::DecodeOptions::new();
    opts.set_color_output(gif::ColorOutput::RGBA);
    let mut dec = opts
        .read_info(std::io::BufReader::new(file))
        .map_err(|e| err(path, format!("not a GIF: {e}")))?;
    let (w, h) = (dec.width() as usize, dec.height() as usize);
    // Compose each frame onto the canvas (frames may cover part of it).
    let mut canvas = vec![0u8; w * h * 4];
    let mut data = Vec::new();
    let mut n = 0;
    while let Some(frame) = dec
        .read_next_frame()
        .map_err(|e| err(path, format!("frame {n}: {e}")))?
    {
        if max_frames.is_some_and(|m| n >= m) {
            break;
        }
        let (fx, fy, fw, fh) = (
            frame.left as usize,
            frame.top as usize,
            frame.width as usize,
            frame.height as usize,
        );
        for y in 0..fh {
            for x in 0..fw {
                let (cx, cy) = (fx + x, fy + y);
                if cx >= w || cy >= h {
                    continue;
                }
                let s = &frame.buffer[(y * fw + x) * 4..][..4];
                if s[3] > 0 {
                    canvas[(cy * w + cx) * 4..][..4].copy_from_slice(s);
                }
            }
        }
        for px in canvas.chunks_exact(4) {
            data.extend(px[..3].iter().map(|&c| c as f32 / 255.0));
        }
        n += 1;
    }
    if n == 0 {
        return Err(err(path, "the GIF has no frames"));
    }
    Frames::new(n, h, w, data).map_err(|e| err(path, e.to_string()))
}

fn read_png(path: &Path) -> Result<(usize, usize, Vec<f32>), VideoError> {
    let file = std::fs::File::open(path).map_err(|e| err(path, e.to_string()))?;
    let mut dec = png::Decoder::new(std::io::BufReader::new(file));
    dec.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = dec
        .read_info()
        .map_err(|e| err(path, format!("not a PNG: {e}")))?;
    let mut buf = vec![0u8; reader.output_buffer_size()];
    let info = reader
        .next_frame(&mut buf)
        .map_err(|e| err(path, e.to_string()))?;
    let (w, h) = (info.width as usize, info.height as usize);
    let ch = match info.color_type {
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        png::ColorType::Grayscale => 1,
        png::ColorType::GrayscaleAlpha => 2,
        png::ColorType::Indexed => return Err(err(path, "indexed PNG after expansion")),
    };
    let mut rgb = Vec::with_capacity(w * h * 3);
    for px in buf[..w * h * ch].chunks_exact(ch) {
        let (r, g, b) = match ch {
            1 | 2 => (px[0], px[0], px[0]),
            _ => (px[0], px[1], px[2]),
        };
        rgb.extend([r, g, b].iter().map(|&c| c as f32 / 255.0));
    }
    Ok((w, h, rgb))
}

fn read_png_dir(dir: &Path, max_frames: Option<usize>) -> Result<Frames, VideoError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| err(dir, e.to_string()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| e.eq_ignore_ascii_case("png"))
        })
        .collect();
    files.sort();
    if let Some(m) = max_frames {
        files.truncate(m);
    }
    if files.is_empty() {
        return Err(err(dir, "no .png frames in this directory"));
    }
    let mut data = Vec::new();
    let mut size = None;
    for f in &files {
        let (w, h, rgb) = read_png(f)?;
        match size {
            None => size = Some((w, h)),
            Some(s) if s != (w, h) => {
                return Err(err(
                    f,
                    format!("is {w}×{h}, the first frame is {}×{}", s.0, s.1),
                ))
            }
            _ => {}
        }
        data.extend(rgb);
    }
    let (w, h) = size.unwrap_or((0, 0));
    Frames::new(files.len(), h, w, data).map_err(|e| err(dir, e.to_string()))
}

fn read_ffmpeg(
    path: &Path,
    max_frames: Option<usize>,
    size: Option<(usize, usize)>,
) -> Result<Frames, VideoError> {
    if !crate::frames::ffmpeg_available() {
        return Err(err(
            path,
            "reading this format needs ffmpeg on the PATH, and there is none; install ffmpeg or give a .gif / a directory of .png frames",
        ));
    }
    let (w, h) = size.ok_or_else(|| {
        err(
            path,
            "give --width and --height to decode this video with ffmpeg",
        )
    })?;
    let mut cmd = Command::new("ffmpeg");
    cmd.args(["-v", "error", "-i"]).arg(path);
    if let Some(m) = max_frames {
        cmd.args(["-frames:v", &m.to_string()]);
    }
    cmd.args([
        "-vf",
        &format!("scale={w}:{h}:flags=bilinear"),
        "-f",
        "rawvideo",
        "-pix_fmt",
        "rgb24",
        "-",
    ]);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| err(path, format!("running ffmpeg: {e}")))?;
    if !out.status.success() {
        let tail: String = String::from_utf8_lossy(&out.stderr)
            .lines()
            .rev()
            .take(5)
            .collect::<Vec<_>>()
            .join(" | ");
        return Err(err(path, format!("ffmpeg failed ({}): {tail}", out.status)));
    }
    let per = w * h * 3;
    let n = out.stdout.len() / per;
    if n == 0 {
        return Err(err(path, "ffmpeg decoded no frames"));
    }
    let data = out.stdout[..n * per]
        .iter()
        .map(|&c| c as f32 / 255.0)
        .collect();
    Frames::new(n, h, w, data).map_err(|e| err(path, e.to_string()))
}

/// Bilinear resize of every frame to `width × height` (half-pixel centres, edge clamp).
pub fn resize(f: &Frames, width: usize, height: usize) -> Frames {
    if f.width == width && f.height == height {
        return f.clone();
    }
    let mut data = Vec::with_capacity(f.frames * width * height * 3);
    let sx = f.width as f32 / width as f32;
    let sy = f.height as f32 / height as f32;
    for i in 0..f.frames {
        let src = f.frame(i);
        for y in 0..height {
            let fy = ((y as f32 + 0.5) * sy - 0.5).clamp(0.0, (f.height - 1) as f32);
            let (y0, ty) = (fy.floor() as usize, fy - fy.floor());
            let y1 = (y0 + 1).min(f.height - 1);
            for x in 0..width {
                let fx = ((x as f32 + 0.5) * sx - 0.5).clamp(0.0, (f.width - 1) as f32);
                let (x0, tx) = (fx.floor() as usize, fx - fx.floor());
                let x1 = (x0 + 1).min(f.width - 1);
                for c in 0..3 {
                    let p = |yy: usize, xx: usize| src[(yy * f.width + xx) * 3 + c];
                    let top = p(y0, x0) * (1.0 - tx) + p(y0, x1) * tx;
                    let bot = p(y1, x0) * (1.0 - tx) + p(y1, x1) * tx;
                    data.push(top * (1.0 - ty) + bot * ty);
                }
            }
        }
    }
    Frames {
        frames: f.frames,
        height,
        width,
        data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gif_and_png_round_trip_through_the_writers() {
        let dir = std::env::temp_dir().join(format!("motionrt-videoin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (n, h, w) = (3, 8, 12);
        let data: Vec<f32> = (0..n * h * w * 3)
            .map(|i| ((i * 7) % 256) as f32 / 255.0)
            .collect();
        let f = Frames::new(n, h, w, data).unwrap();
        let gif = dir.join("v.gif");
        crate::frames::write(&gif, &f, 8.0).unwrap();
        let back = read(&gif, None, None).unwrap();
        assert_eq!((back.frames, back.height, back.width), (3, 8, 12));
        // GIF quantises to a palette: close, not exact
        let max = back
            .data
            .iter()
            .zip(&f.data)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(max < 0.2, "{max}");
        assert_eq!(read(&gif, Some(2), None).unwrap().frames, 2);
        let pngs = dir.join("seq/");
        crate::frames::write(&pngs, &f, 8.0).unwrap();
        let back = read(&pngs, None, None).unwrap();
        assert_eq!(back.frames, 3);
        let max = back
            .data
            .iter()
            .zip(&f.data)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(max <= 0.5 / 255.0 + 1e-6, "PNG is 8-bit exact: {max}");
        let e = read(&dir.join("missing.gif"), None, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.gif: no such file"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn resize_keeps_constants_and_averages() {
        let f = Frames::new(
            1,
            2,
            2,
            vec![0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0],
        )
        .unwrap();
        let r = resize(&f, 1, 1);
        assert_eq!(r.data, vec![0.5, 0.5, 0.5]);
        let c = Frames::new(2, 4, 4, vec![0.25; 2 * 4 * 4 * 3]).unwrap();
        let r = resize(&c, 8, 6);
        assert_eq!((r.frames, r.height, r.width), (2, 6, 8));
        assert!(r.data.iter().all(|&x| (x - 0.25).abs() < 1e-6));
    }
}
