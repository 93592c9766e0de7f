//! Video frame writers: animated GIF, PNG sequence and MP4 (through an external `ffmpeg`).
//!
//! Every writer is atomic: output is first written under a temporary sibling name
//! (`.NAME.partial-PID`) and renamed into place only once it is complete. On any error the
//! temporary files are removed, so a failed write never leaves half-written output behind.
//! Data is checked for NaN/Inf before anything is written.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};

use motionrt_kernels::unfinished::{self, Unfinished};

/// Decoded video: `data` is `[frames, height, width, 3]` RGB in `[0, 1]` (row-major, f32).
#[derive(Debug, Clone, PartialEq)]
pub struct Frames {
    pub frames: usize,
    pub height: usize,
    pub width: usize,
    pub data: Vec<f32>,
}

impl Frames {
    /// Wraps `data` laid out as `[frames, height, width, 3]`.
    ///
    /// Fails with [`FramesError::Shape`] when any dimension is zero or when `data.len()` is not
    /// `frames * height * width * 3`.
    pub fn new(
        frames: usize,
        height: usize,
        width: usize,
        data: Vec<f32>,
    ) -> Result<Self, FramesError> {
        check_len(frames, height, width, data.len())?;
        Ok(Self {
            frames,
            height,
            width,
            data,
        })
    }

    /// Number of f32 values in one frame (`height * width * 3`).
    pub fn frame_len(&self) -> usize {
        self.height * self.width * 3
    }

    /// The raw f32 values of frame `i` (`[height, width, 3]`). Panics if `i >= self.frames`.
    pub fn frame(&self, i: usize) -> &[f32] {
        assert!(
            i < self.frames,
            "frame index {i} out of range ({} frames)",
            self.frames
        );
        let n = self.frame_len();
        &self.data[i * n..(i + 1) * n]
    }

    /// Frame `i` as packed RGB8 (`[height, width, 3]`), each value `round(clamp(x, 0, 1) * 255)`.
    /// NaN maps to 0. Panics if `i >= self.frames`.
    pub fn frame_rgb8(&self, i: usize) -> Vec<u8> {
        self.frame(i).iter().map(|&x| to_u8(x)).collect()
    }

    /// `Err(NonFinite { index })` naming the first frame that holds a NaN or infinite value.
    pub fn check_finite(&self) -> Result<(), FramesError> {
        let n = self.frame_len().max(1);
        match self.data.iter().position(|x| !x.is_finite()) {
            Some(pos) => Err(FramesError::NonFinite { index: pos / n }),
            None => Ok(()),
        }
    }

    /// Checks the shape invariants (fields are public, so they may have been changed after
    /// [`Frames::new`]).
    fn check_shape(&self) -> Result<(), FramesError> {
        check_len(self.frames, self.height, self.width, self.data.len())
    }

    fn validate(&self) -> Result<(), FramesError> {
        self.check_shape()?;
        self.check_finite()
    }
}

/// `Err(Shape)` unless `len` values are `frames` (> 0) RGB frames of `height`×`width` (> 0).
pub(crate) fn check_len(
    frames: usize,
    height: usize,
    width: usize,
    len: usize,
) -> Result<(), FramesError> {
    let expected = frames
        .checked_mul(height)
        .and_then(|n| n.checked_mul(width))
        .and_then(|n| n.checked_mul(3));
    if frames == 0 || height == 0 || width == 0 || expected != Some(len) {
        return Err(FramesError::Shape {
            frames,
            height,
            width,
            len,
        });
    }
    Ok(())
}

pub(crate) fn to_u8(x: f32) -> u8 {
    if x.is_nan() {
        0
    } else {
        (x.clamp(0.0, 1.0) * 255.0).round() as u8
    }
}

/// Output container chosen from the output path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    /// Animated GIF, looping forever.
    Gif,
    /// PNG sequence: `out.png` -> `out_000.png`, `out_001.png`, ...; a directory ->
    /// `DIR/frame_000.png`, ...
    Png,
    /// H.264 MP4 through an external `ffmpeg`.
    Mp4,
}

impl OutputFormat {
    /// The format for `path`: `.gif`, `.mp4`, `.png` (case-insensitive), or a PNG sequence
    /// when the path ends in `/` or names an existing directory. `None` otherwise.
    pub fn from_path(path: &Path) -> Option<Self> {
        if is_dir_target(path) {
            return Some(Self::Png);
        }
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "gif" => Some(Self::Gif),
            "png" => Some(Self::Png),
            "mp4" => Some(Self::Mp4),
            _ => None,
        }
    }

    /// Lower-case file extension of the format.
    pub fn extension(self) -> &'static str {
        match self {
            Self::Gif => "gif",
            Self::Png => "png",
            Self::Mp4 => "mp4",
        }
    }
}

/// Errors from the frame writers. Each names the output path (or frame) involved.
#[derive(Debug, thiserror::Error)]
pub enum FramesError {
    #[error("{path}: {source}", path = path.display())]
    Io { path: PathBuf, source: io::Error },

    #[error("{path}: encoding failed: {message}", path = path.display())]
    Encode { path: PathBuf, message: String },

    #[error("cannot write {path}: ffmpeg was not found on the PATH; install ffmpeg (e.g. `apt install ffmpeg`) or write a .gif or .png output instead", path = path.display())]
    FfmpegMissing { path: PathBuf },

    #[error("{path}: ffmpeg failed ({status}): {stderr_tail}", path = path.display())]
    Ffmpeg {
        path: PathBuf,
        status: ExitStatus,
        stderr_tail: String,
    },

    #[error("{path}: unknown output format; use a .gif, .mp4 or .png path, or a directory (ending in `/`) for a PNG sequence", path = path.display())]
    UnknownFormat { path: PathBuf },

    #[error("frame {index} holds a non-finite value (NaN or Inf); nothing was written")]
    NonFinite { index: usize },

    #[error("bad frame shape: {frames} frames of {height}x{width}x3 need {} values, got {len}", frames.saturating_mul(*height).saturating_mul(*width).saturating_mul(3))]
    Shape {
        frames: usize,
        height: usize,
        width: usize,
        len: usize,
    },

    #[error("{path}: invalid frame rate {fps} (must be finite and > 0)", path = path.display())]
    InvalidFps { path: PathBuf, fps: f32 },

    #[error("{path}: {width}x{height} is too large for {format} (at most {max} per side)", path = path.display())]
    TooLarge {
        path: PathBuf,
        format: &'static str,
        width: usize,
        height: usize,
        max: usize,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> FramesError + '_ {
    move |source| FramesError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `frames` to `path`, choosing the format with [`OutputFormat::from_path`]. Returns the
/// files written (one for GIF/MP4, one per frame for a PNG sequence). `fps` is ignored for PNG.
pub fn write(path: &Path, frames: &Frames, fps: f32) -> Result<Vec<PathBuf>, FramesError> {
    match OutputFormat::from_path(path) {
        Some(OutputFormat::Gif) => write_gif(path, frames, fps).map(|p| vec![p]),
        Some(OutputFormat::Mp4) => write_mp4(path, frames, fps).map(|p| vec![p]),
        Some(OutputFormat::Png) => write_png_sequence(path, frames),
        None => Err(FramesError::UnknownFormat {
            path: path.to_path_buf(),
        }),
    }
}

fn check_fps(path: &Path, fps: f32) -> Result<(), FramesError> {
    if fps.is_finite() && fps > 0.0 {
        Ok(())
    } else {
        Err(FramesError::InvalidFps {
            path: path.to_path_buf(),
            fps,
        })
    }
}

/// GIF frame delay in centiseconds for `fps`: `round(100 / fps)`, at least 2 (browsers replace
/// smaller delays with 10).
pub fn gif_delay_cs(fps: f32) -> u16 {
    let cs = (100.0 / f64::from(fps)).round();
    if cs.is_nan() {
        2
    } else {
        cs.clamp(2.0, f64::from(u16::MAX)) as u16
    }
}

/// Writes an animated GIF that loops forever (NETSCAPE2.0 extension), one local palette per
/// frame, delay from `fps` (see [`gif_delay_cs`]). Atomic: temp sibling, then rename. Returns
/// the path written.
pub fn write_gif(path: &Path, frames: &Frames, fps: f32) -> Result<PathBuf, FramesError> {
    frames.validate()?;
    let w = FrameWriter::open(
        OutputFormat::Gif,
        path,
        frames.width,
        frames.height,
        frames.frames,
        fps,
    )?;
    write_all(w, frames).map(|_| path.to_path_buf())
}

/// The file names of a PNG sequence for `path` with `count` frames (see [`OutputFormat::Png`]).
/// Indices are zero-padded to at least 3 digits.
pub fn png_sequence_paths(path: &Path, count: usize) -> Vec<PathBuf> {
    let digits = count.saturating_sub(1).to_string().len().max(3);
    if is_dir_target(path) {
        (0..count)
            .map(|i| path.join(format!("frame_{i:0digits$}.png")))
            .collect()
    } else {
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "frame".to_string());
        (0..count)
            .map(|i| path.with_file_name(format!("{stem}_{i:0digits$}.png")))
            .collect()
    }
}

/// Files beside a written PNG sequence that a reader of the sequence would take for part of it:
/// in the directory of `written` (the paths [`png_sequence_paths`] gave), the other files named
/// like them — the same prefix, `_`, digits, `.png` — left by an earlier, longer run or one with
/// another zero-padding. Sorted; empty when `written` is not a PNG sequence. Nothing is removed:
/// the caller decides (motionrt warns).
pub fn stale_sequence_frames(written: &[PathBuf]) -> Vec<PathBuf> {
    fn split(name: &str) -> Option<(&str, &str)> {
        let stem = name.strip_suffix(".png")?;
        let (prefix, digits) = stem.rsplit_once('_')?;
        (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
            .then_some((prefix, digits))
    }
    let Some(first) = written.first() else {
        return Vec::new();
    };
    let Some((prefix, _)) = first.file_name().and_then(|n| n.to_str()).and_then(split) else {
        return Vec::new();
    };
    let dir = match first.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let ours: std::collections::HashSet<&std::ffi::OsStr> =
        written.iter().filter_map(|p| p.file_name()).collect();
    let Ok(entries) = fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut stale: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter(|e| {
            let name = e.file_name();
            !ours.contains(name.as_os_str())
                && name
                    .to_str()
                    .and_then(split)
                    .is_some_and(|(p, _)| p == prefix)
        })
        .map(|e| first.with_file_name(e.file_name()))
        .collect();
    stale.sort();
    stale
}

/// Writes one RGB8 PNG per frame and returns the paths (see [`png_sequence_paths`]). All frames
/// are first written under temporary names, then all renamed into place. A directory target
/// (trailing `/`) that does not exist is created (its parent must exist), and removed again if
/// the write fails.
pub fn write_png_sequence(path: &Path, frames: &Frames) -> Result<Vec<PathBuf>, FramesError> {
    frames.validate()?;
    let w = FrameWriter::open(
        OutputFormat::Png,
        path,
        frames.width,
        frames.height,
        frames.frames,
        1.0,
    )?;
    write_all(w, frames)
}

/// Writes an H.264 MP4 (yuv420p, `+faststart`) by piping raw rgb24 frames into `ffmpeg`.
/// Odd sizes are padded to even. Atomic: ffmpeg writes a temp sibling, which is renamed on
/// success; returns the path written. [`FramesError::FfmpegMissing`] when ffmpeg is not on the
/// PATH.
pub fn write_mp4(path: &Path, frames: &Frames, fps: f32) -> Result<PathBuf, FramesError> {
    frames.validate()?;
    let w = FrameWriter::open(
        OutputFormat::Mp4,
        path,
        frames.width,
        frames.height,
        frames.frames,
        fps,
    )?;
    write_all(w, frames).map(|_| path.to_path_buf())
}

fn write_all(mut w: FrameWriter, frames: &Frames) -> Result<Vec<PathBuf>, FramesError> {
    let enc = w.encoder();
    for i in 0..frames.frames {
        w.write(enc.encode(w.written(), frames.frame_rgb8(i))?)?;
    }
    w.finish()
}

/// Whether an `ffmpeg` executable can be run from the PATH.
pub fn ffmpeg_available() -> bool {
    Command::new(ffmpeg_program())
        .arg("-version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn ffmpeg_program() -> OsString {
    OsString::from("ffmpeg")
}

/// One frame made ready for its container by [`FrameEncoder::encode`].
pub enum EncodedFrame {
    /// Palette-quantized GIF frame (NeuQuant), delay not yet set.
    Gif(gif::Frame<'static>),
    /// A complete PNG file.
    Png(Vec<u8>),
    /// Packed rgb24 for ffmpeg.
    Raw(Vec<u8>),
}

/// The per-frame, order-independent part of writing a video (palette quantization, PNG
/// compression): `Copy` and `Send`, so any number of threads can encode frames of one output
/// while [`FrameWriter::write`] appends them in order.
#[derive(Debug, Clone, Copy)]
pub struct FrameEncoder {
    format: OutputFormat,
    width: usize,
    height: usize,
}

impl FrameEncoder {
    /// Encode frame `index` given as packed RGB8 `[height, width, 3]`.
    pub fn encode(&self, index: usize, rgb8: Vec<u8>) -> Result<EncodedFrame, FramesError> {
        check_len(1, self.height, self.width, rgb8.len())?;
        Ok(match self.format {
            OutputFormat::Gif => EncodedFrame::Gif(gif::Frame::from_rgb_speed(
                self.width as u16,
                self.height as u16,
                &rgb8,
                10,
            )),
            OutputFormat::Mp4 => EncodedFrame::Raw(rgb8),
            OutputFormat::Png => {
                let mut bytes = Vec::new();
                let mut e = png::Encoder::new(&mut bytes, self.width as u32, self.height as u32);
                e.set_color(png::ColorType::Rgb);
                e.set_depth(png::BitDepth::Eight);
                let r = e
                    .write_header()
                    .and_then(|mut w| w.write_image_data(&rgb8).and_then(|_| w.finish()));
                r.map_err(|e| FramesError::Encode {
                    path: PathBuf::from(format!("frame {index}")),
                    message: e.to_string(),
                })?;
                EncodedFrame::Png(bytes)
            }
        })
    }
}

enum Sink {
    Gif {
        encoder: Option<gif::Encoder<BufWriter<File>>>,
        tmp: TempFile,
        delay: u16,
    },
    Png {
        finals: Vec<PathBuf>,
        temps: Vec<TempFile>,
        created_dir: Option<PathBuf>,
    },
    Mp4 {
        child: Child,
        stdin: Option<ChildStdin>,
        stderr: Option<std::thread::JoinHandle<Vec<u8>>>,
        tmp: TempFile,
    },
}

/// An output video written one frame at a time, atomically: frames go to temporary siblings
/// (`.NAME.partial-PID`), which [`FrameWriter::finish`] renames into place once all `frames`
/// declared at creation have been written. Dropping an unfinished writer removes everything it
/// wrote (and stops ffmpeg).
pub struct FrameWriter {
    path: PathBuf,
    format: OutputFormat,
    width: usize,
    height: usize,
    frames: usize,
    written: usize,
    sink: Sink,
    finished: bool,
}

impl FrameWriter {
    /// Open `path` (format from [`OutputFormat::from_path`]) for `frames` frames of
    /// `width`×`height`; `fps` is ignored for PNG sequences.
    pub fn create(
        path: &Path,
        width: usize,
        height: usize,
        frames: usize,
        fps: f32,
    ) -> Result<Self, FramesError> {
        let format = OutputFormat::from_path(path).ok_or_else(|| FramesError::UnknownFormat {
            path: path.to_path_buf(),
        })?;
        if frames == 0 || width == 0 || height == 0 {
            return Err(FramesError::Shape {
                frames,
                height,
                width,
                len: 0,
            });
        }
        Self::open(format, path, width, height, frames, fps)
    }

    fn open(
        format: OutputFormat,
        path: &Path,
        width: usize,
        height: usize,
        frames: usize,
        fps: f32,
    ) -> Result<Self, FramesError> {
        let too_large = |name: &'static str, max: usize| {
            if width > max || height > max {
                Err(FramesError::TooLarge {
                    path: path.to_path_buf(),
                    format: name,
                    width,
                    height,
                    max,
                })
            } else {
                Ok(())
            }
        };
        let sink = match format {
            OutputFormat::Gif => {
                check_fps(path, fps)?;
                too_large("GIF", usize::from(u16::MAX))?;
                let tmp = TempFile::new(path);
                let file = File::create(tmp.path()).map_err(io_err(path))?;
                let mut encoder =
                    gif::Encoder::new(BufWriter::new(file), width as u16, height as u16, &[])
                        .map_err(gif_err(path))?;
                encoder
                    .set_repeat(gif::Repeat::Infinite)
                    .map_err(gif_err(path))?;
                Sink::Gif {
                    encoder: Some(encoder),
                    tmp,
                    delay: gif_delay_cs(fps),
                }
            }
            OutputFormat::Png => {
                too_large("PNG", u32::MAX as usize)?;
                let mut created_dir = None;
                if is_dir_target(path) && !path.is_dir() {
                    fs::create_dir(path).map_err(io_err(path))?;
                    created_dir = Some(path.to_path_buf());
                }
                let finals = png_sequence_paths(path, frames);
                if let Some(d) = finals.iter().find(|f| f.is_dir()) {
                    return Err(not_a_file(d));
                }
                Sink::Png {
                    finals,
                    temps: Vec::with_capacity(frames),
                    created_dir,
                }
            }
            OutputFormat::Mp4 => {
                check_fps(path, fps)?;
                Self::spawn_ffmpeg(path, width, height, fps)?
            }
        };
        Ok(Self {
            path: path.to_path_buf(),
            format,
            width,
            height,
            frames,
            written: 0,
            sink,
            finished: false,
        })
    }

    fn spawn_ffmpeg(
        path: &Path,
        width: usize,
        height: usize,
        fps: f32,
    ) -> Result<Sink, FramesError> {
        let tmp = TempFile::new(path);
        let mut cmd = Command::new(ffmpeg_program());
        cmd.args(["-hide_banner", "-loglevel", "error", "-nostdin", "-y"])
            .args(["-f", "rawvideo", "-pix_fmt", "rgb24"])
            .arg("-s")
            .arg(format!("{width}x{height}"))
            .arg("-r")
            .arg(format!("{fps}"))
            .args(["-i", "-"]);
        if width % 2 == 1 || height % 2 == 1 {
            cmd.args(["-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2"]);
        }
        cmd.args([
            "-c:v",
            "libx264",
            "-pix_fmt",
            "yuv420p",
            "-movflags",
            "+faststart",
        ])
        .args(["-f", "mp4"])
        .arg(tmp.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(FramesError::FfmpegMissing {
                    path: path.to_path_buf(),
                })
            }
            Err(e) => return Err(io_err(path)(e)),
        };
        // Drain stderr on a thread so a chatty ffmpeg cannot block while we feed stdin.
        let mut stderr = child.stderr.take().expect("stderr is piped");
        let stderr = std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = stderr.read_to_end(&mut buf);
            buf
        });
        let stdin = child.stdin.take();
        Ok(Sink::Mp4 {
            child,
            stdin,
            stderr: Some(stderr),
            tmp,
        })
    }

    /// The format being written.
    pub fn format(&self) -> OutputFormat {
        self.format
    }

    /// `(width, height)` of every frame.
    pub fn size(&self) -> (usize, usize) {
        (self.width, self.height)
    }

    /// Frames declared at creation.
    pub fn frames(&self) -> usize {
        self.frames
    }

    /// Frames written so far.
    pub fn written(&self) -> usize {
        self.written
    }

    /// The encoder for this output's frames (may be used on other threads).
    pub fn encoder(&self) -> FrameEncoder {
        FrameEncoder {
            format: self.format,
            width: self.width,
            height: self.height,
        }
    }

    /// Append the next frame.
    pub fn write(&mut self, frame: EncodedFrame) -> Result<(), FramesError> {
        if self.written >= self.frames {
            return Err(FramesError::Encode {
                path: self.path.clone(),
                message: format!("more than the {} frames declared", self.frames),
            });
        }
        let i = self.written;
        match (&mut self.sink, frame) {
            (Sink::Gif { encoder, delay, .. }, EncodedFrame::Gif(mut f)) => {
                f.delay = *delay;
                let e = encoder.as_mut().expect("open until finish");
                e.write_frame(&f).map_err(gif_err(&self.path))?;
            }
            (Sink::Png { finals, temps, .. }, EncodedFrame::Png(bytes)) => {
                let out = &finals[i];
                let tmp = TempFile::new(out);
                // Keep the temp before writing, so a failed write is cleaned up too.
                temps.push(tmp);
                let tmp = temps.last().expect("pushed");
                let mut file = File::create(tmp.path()).map_err(io_err(out))?;
                file.write_all(&bytes).map_err(io_err(out))?;
            }
            (
                Sink::Mp4 {
                    child,
                    stdin,
                    stderr,
                    ..
                },
                EncodedFrame::Raw(bytes),
            ) => {
                if let Some(s) = stdin.as_mut() {
                    if let Err(e) = s.write_all(&bytes) {
                        // ffmpeg stopped reading: stop here (not after every remaining frame
                        // is made), with ffmpeg's own account of why when it failed
                        drop(stdin.take());
                        ffmpeg_exited(&self.path, child, stderr)?;
                        return Err(io_err(&self.path)(e));
                    }
                }
            }
            _ => {
                return Err(FramesError::Encode {
                    path: self.path.clone(),
                    message: "frame encoded for another format".into(),
                })
            }
        }
        self.written += 1;
        Ok(())
    }

    /// Complete the output: check that every declared frame was written, flush, and rename
    /// the temporary files into place. Returns the files written.
    pub fn finish(mut self) -> Result<Vec<PathBuf>, FramesError> {
        if self.written != self.frames {
            return Err(FramesError::Encode {
                path: self.path.clone(),
                message: format!(
                    "only {} of the {} declared frames were written",
                    self.written, self.frames
                ),
            });
        }
        let path = self.path.clone();
        let r = match &mut self.sink {
            Sink::Gif { encoder, tmp, .. } => (|| {
                let e = encoder.take().expect("open until finish");
                let writer = e.into_inner().map_err(io_err(&path))?;
                let file = writer
                    .into_inner()
                    .map_err(|e| io_err(&path)(e.into_error()))?;
                file.sync_all().map_err(io_err(&path))?;
                drop(file);
                unfinished::commit(|| tmp.commit_ref(&path))?;
                Ok(vec![path.clone()])
            })(),
            // every frame in place, or (interrupted) none
            Sink::Png { finals, temps, .. } => {
                unfinished::commit(|| commit_sequence(temps, finals))
            }
            Sink::Mp4 {
                child,
                stdin,
                stderr,
                tmp,
            } => (|| {
                // EOF (stdin dropped): ffmpeg finishes the file; its own failure is reported
                // before a flush error
                let flushed = stdin.take().map_or(Ok(()), |mut s| s.flush());
                ffmpeg_exited(&path, child, stderr)?;
                flushed.map_err(io_err(&path))?;
                if !tmp.path().is_file() {
                    return Err(FramesError::Encode {
                        path: path.clone(),
                        message: "ffmpeg exited successfully but wrote no file".to_string(),
                    });
                }
                unfinished::commit(|| tmp.commit_ref(&path))?;
                Ok(vec![path.clone()])
            })(),
        };
        self.finished = r.is_ok();
        r
    }
}

/// Wait for ffmpeg (its input closed) writing `path`: an error with its exit status and the end
/// of what it printed when it failed.
fn ffmpeg_exited(
    path: &Path,
    child: &mut Child,
    stderr: &mut Option<std::thread::JoinHandle<Vec<u8>>>,
) -> Result<(), FramesError> {
    let status = child.wait().map_err(io_err(path))?;
    let stderr_bytes = stderr
        .take()
        .and_then(|t| t.join().ok())
        .unwrap_or_default();
    if !status.success() {
        return Err(FramesError::Ffmpeg {
            path: path.to_path_buf(),
            status,
            stderr_tail: tail(&String::from_utf8_lossy(&stderr_bytes), 2000),
        });
    }
    Ok(())
}

impl Drop for FrameWriter {
    fn drop(&mut self) {
        match &mut self.sink {
            Sink::Mp4 {
                child,
                stdin,
                stderr,
                ..
            } if !self.finished => {
                drop(stdin.take());
                let _ = child.kill();
                let _ = child.wait();
                if let Some(t) = stderr.take() {
                    let _ = t.join();
                }
            }
            Sink::Png {
                temps, created_dir, ..
            } if !self.finished => {
                temps.clear(); // removes the temporary frames
                if let Some(dir) = created_dir.take() {
                    let _ = fs::remove_dir(dir);
                }
            }
            _ => {}
        }
    }
}

fn gif_err(path: &Path) -> impl Fn(gif::EncodingError) -> FramesError + '_ {
    move |e| match e {
        gif::EncodingError::Io(source) => FramesError::Io {
            path: path.to_path_buf(),
            source,
        },
        other => FramesError::Encode {
            path: path.to_path_buf(),
            message: other.to_string(),
        },
    }
}

/// The last `max` bytes of `s` (on a char boundary), trimmed.
fn tail(s: &str, max: usize) -> String {
    let s = s.trim();
    if s.len() <= max {
        return s.to_string();
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    format!("...{}", &s[start..])
}

/// A path ending in a separator, or naming an existing directory.
fn is_dir_target(path: &Path) -> bool {
    let s = path.as_os_str().to_string_lossy();
    s.ends_with('/') || s.ends_with(std::path::MAIN_SEPARATOR) || path.is_dir()
}

/// Move a PNG sequence's complete temporary frames onto their final names. Each file a frame
/// replaces is first given a second name, `.NAME.old-PID` (a hard link; the file is moved there
/// where links are not supported); each frame then replaces its name in one rename, so a name
/// holds the old file or the new frame at every moment, even if the process is killed. If a
/// step fails, the frames already in place are removed and the old files put back (an error
/// says where any that could not be are); the remaining temps are removed when dropped. The
/// second names are removed once every frame is in place. Runs inside [`unfinished::commit`], so
/// an interrupt (Ctrl-C) comes before the first rename or after the last removal.
fn commit_sequence(
    temps: &mut [TempFile],
    finals: &[PathBuf],
) -> Result<Vec<PathBuf>, FramesError> {
    // (final name, second name, whether a link: the file is still at the final name too)
    let mut kept: Vec<(&PathBuf, PathBuf, bool)> = Vec::new();
    let mut done: Vec<&PathBuf> = Vec::with_capacity(finals.len());
    let undo = |e: FramesError, done: &[&PathBuf], kept: &[(&PathBuf, PathBuf, bool)]| {
        let mut lost = Vec::new();
        for p in done {
            if !kept.iter().any(|(out, _, _)| out == p) {
                let _ = fs::remove_file(p);
            }
        }
        for (out, old, linked) in kept {
            // a link whose name was not yet replaced is the same file under both names
            // (renaming one onto the other would do nothing): drop the second name
            let r = if *linked && !done.contains(out) {
                fs::remove_file(old)
            } else {
                fs::rename(old, out)
            };
            if r.is_err() {
                lost.push(format!("{} is at {}", out.display(), old.display()));
            }
        }
        if lost.is_empty() {
            e
        } else {
            FramesError::Encode {
                path: kept[0].0.clone(),
                message: format!(
                    "{e}; and not every file it replaced could be put back: {}",
                    lost.join(", ")
                ),
            }
        }
    };
    for out in finals {
        if let Ok(m) = fs::symlink_metadata(out) {
            if m.is_dir() {
                return Err(undo(not_a_file(out), &done, &kept));
            }
            let old = old_name(out);
            let linked = fs::hard_link(out, &old).is_ok();
            if !linked {
                if let Err(e) = fs::rename(out, &old) {
                    return Err(undo(io_err(out)(e), &done, &kept));
                }
            }
            kept.push((out, old, linked));
        }
    }
    for (tmp, out) in temps.iter_mut().zip(finals) {
        if let Err(e) = tmp.commit_ref(out) {
            return Err(undo(e, &done, &kept));
        }
        done.push(out);
    }
    for (_, old, _) in &kept {
        let _ = fs::remove_file(old);
    }
    Ok(finals.to_vec())
}

fn not_a_file(path: &Path) -> FramesError {
    FramesError::Encode {
        path: path.to_path_buf(),
        message: "a directory has this name: the output would replace it (choose another --out)"
            .into(),
    }
}

/// `.NAME.old-PID` beside `path` (`-1`, `-2`, … after it where that exists: a killed run's,
/// perhaps the only copy of a file): the second name of a file a sequence replaces until the
/// sequence is in place.
fn old_name(path: &Path) -> PathBuf {
    let old = hidden_sibling(path, "old");
    std::iter::once(old.clone())
        .chain((1..).map(|i| {
            let mut n = old.clone().into_os_string();
            n.push(format!("-{i}"));
            PathBuf::from(n)
        }))
        .find(|p| fs::symlink_metadata(p).is_err())
        .expect("a free name")
}

/// `.NAME.TAG-PID` beside `path`: where this process keeps a file on its way in or out.
fn hidden_sibling(path: &Path, tag: &str) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "output".to_string());
    path.with_file_name(format!(".{name}.{tag}-{}", std::process::id()))
}

/// A temporary sibling `.NAME.partial-PID` of a final path; removed on drop unless committed,
/// and registered as unfinished (removed if the process is interrupted) until then.
struct TempFile {
    path: PathBuf,
    armed: bool,
    _unfinished: Unfinished,
}

impl TempFile {
    fn new(final_path: &Path) -> Self {
        let path = hidden_sibling(final_path, "partial");
        Self {
            _unfinished: unfinished::register(&path),
            path,
            armed: true,
        }
    }

    fn path(&self) -> &Path {
        &self.path
    }

    /// Renames the temp file onto `final_path`; afterwards dropping it removes nothing. Called
    /// inside [`unfinished::commit`] (which is not reentrant: this does not take it).
    fn commit_ref(&mut self, final_path: &Path) -> Result<(), FramesError> {
        fs::rename(&self.path, final_path).map_err(io_err(final_path))?;
        self.armed = false;
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if self.armed {
            let _ = fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_from_fps() {
        assert_eq!(gif_delay_cs(8.0), 13);
        assert_eq!(gif_delay_cs(10.0), 10);
        assert_eq!(gif_delay_cs(60.0), 2);
        assert_eq!(gif_delay_cs(1000.0), 2);
    }

    #[test]
    fn temp_name_is_hidden_sibling() {
        let t = TempFile::new(Path::new("/a/b/out.gif"));
        assert_eq!(
            t.path(),
            Path::new(&format!("/a/b/.out.gif.partial-{}", std::process::id()))
        );
    }

    #[test]
    fn tail_keeps_end() {
        assert_eq!(tail("abc", 10), "abc");
        assert_eq!(tail("abcdef", 3), "...def");
    }
}
