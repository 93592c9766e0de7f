//! Encoding decoded frames while the next ones decode: a [`FrameStream`] owns a
//! [`FrameWriter`] on its own thread, takes decoded chunks through a bounded queue, converts and
//! encodes each chunk's frames on several CPU threads at once (GIF palette quantization, PNG
//! compression) and appends them in order.
//!
//! Memory stays bounded however many frames a video has: at most `queue` chunks wait in the
//! queue, one is being encoded, and the producer holds the one it is making; [`FrameStream::push`]
//! blocks while the queue is full.

use crate::frames::{EncodedFrame, FrameWriter, FramesError};
use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::thread::JoinHandle;

/// How a chunk's values are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkLayout {
    /// `[frames, 3, height, width]` with values in `[-1, 1]`: the VAE decoder's output.
    PlanarSigned,
    /// `[frames, height, width, 3]` with values in `[0, 1]` (as [`crate::frames::Frames`]).
    Rgb,
}

/// Consecutive decoded frames `start..start + frames`.
#[derive(Debug, Clone, PartialEq)]
pub struct FrameChunk {
    pub start: usize,
    pub frames: usize,
    pub height: usize,
    pub width: usize,
    pub layout: ChunkLayout,
    pub data: Vec<f32>,
}

impl FrameChunk {
    fn frame_len(&self) -> usize {
        self.height * self.width * 3
    }

    fn check(&self) -> Result<(), FramesError> {
        crate::frames::check_len(self.frames, self.height, self.width, self.data.len())
    }

    /// Frame `j` of the chunk as `[height, width, 3]` RGB in `[0, 1]` (clamped).
    pub fn frame_rgb(&self, j: usize) -> Vec<f32> {
        let n = self.frame_len();
        let f = &self.data[j * n..(j + 1) * n];
        match self.layout {
            ChunkLayout::Rgb => f.iter().map(|v| v.clamp(0.0, 1.0)).collect(),
            ChunkLayout::PlanarSigned => {
                let hw = self.height * self.width;
                let mut out = Vec::with_capacity(n);
                for p in 0..hw {
                    for c in 0..3 {
                        out.push((f[c * hw + p] / 2.0 + 0.5).clamp(0.0, 1.0));
                    }
                }
                out
            }
        }
    }

    /// All frames as `[frames, height, width, 3]` RGB in `[0, 1]`.
    pub fn rgb(&self) -> Vec<f32> {
        (0..self.frames).flat_map(|j| self.frame_rgb(j)).collect()
    }

    /// Frame `j` as packed RGB8, each value `round(clamp(x, 0, 1) * 255)` as
    /// [`crate::frames::Frames::frame_rgb8`].
    pub fn frame_rgb8(&self, j: usize) -> Vec<u8> {
        self.frame_rgb(j)
            .into_iter()
            .map(crate::frames::to_u8)
            .collect()
    }

    /// The first frame (global index) holding a NaN or infinite value.
    pub fn first_nonfinite(&self) -> Option<usize> {
        let n = self.frame_len().max(1);
        self.data
            .iter()
            .position(|x| !x.is_finite())
            .map(|p| self.start + p / n)
    }
}

enum Msg {
    Chunk(FrameChunk),
    Finish,
}

/// A video being written on a background thread (see the module docs).
pub struct FrameStream {
    tx: Option<SyncSender<Msg>>,
    thread: Option<JoinHandle<Result<Vec<PathBuf>, FramesError>>>,
}

impl FrameStream {
    /// Start writing to `writer` with `threads` encoding threads (at least 1) and room for
    /// `queue` chunks (at least 1) between the producer and the encoder.
    pub fn spawn(writer: FrameWriter, threads: usize, queue: usize) -> Self {
        let (tx, rx) = sync_channel(queue.max(1));
        let threads = threads.max(1);
        let thread = std::thread::Builder::new()
            .name("motionrt-frames".into())
            .spawn(move || encode_loop(writer, rx, threads))
            .expect("spawning the frame encoder thread");
        Self {
            tx: Some(tx),
            thread: Some(thread),
        }
    }

    /// Encoding threads to use by default: the CPUs there are, at most 8.
    pub fn default_threads() -> usize {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(8)
    }

    /// Queue the next chunk; blocks while the queue is full. Chunks must come in frame order.
    /// When the encoder has failed, returns its error (and the output is not written).
    pub fn push(&mut self, chunk: FrameChunk) -> Result<(), FramesError> {
        let sent = match &self.tx {
            Some(tx) => tx.send(Msg::Chunk(chunk)).is_ok(),
            None => false,
        };
        if sent {
            return Ok(());
        }
        // The encoder stopped early: it failed.
        self.tx = None;
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(Err(e))) => Err(e),
            Some(Err(p)) => Err(encoder_panicked(&*p)),
            _ => Err(FramesError::Encode {
                path: PathBuf::from("(frame encoder)"),
                message: "the frame encoder thread stopped".into(),
            }),
        }
    }

    /// Wait for every queued frame, then complete the output (renaming it into place).
    pub fn finish(mut self) -> Result<Vec<PathBuf>, FramesError> {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Msg::Finish);
        }
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(p)) => Err(encoder_panicked(&*p)),
            None => Err(FramesError::Encode {
                path: PathBuf::from("(frame encoder)"),
                message: "the frame encoder thread stopped".into(),
            }),
        }
    }
}

/// The error for an encoder thread that panicked, with the panic's message.
fn encoder_panicked(payload: &(dyn std::any::Any + Send)) -> FramesError {
    let why = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into());
    FramesError::Encode {
        path: PathBuf::from("(frame encoder)"),
        message: format!("the frame encoder thread panicked: {why}"),
    }
}

impl Drop for FrameStream {
    /// Dropped without [`FrameStream::finish`]: the encoder stops and removes what it wrote.
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn encode_loop(
    mut w: FrameWriter,
    rx: Receiver<Msg>,
    threads: usize,
) -> Result<Vec<PathBuf>, FramesError> {
    let (width, height) = w.size();
    for msg in rx {
        let c = match msg {
            Msg::Chunk(c) => c,
            Msg::Finish => return w.finish(),
        };
        c.check()?;
        if (c.width, c.height) != (width, height) || c.start != w.written() {
            return Err(FramesError::Encode {
                path: PathBuf::from(format!("frames {}..{}", c.start, c.start + c.frames)),
                message: format!(
                    "expected frame {} at {width}x{height}, got frame {} at {}x{}",
                    w.written(),
                    c.start,
                    c.width,
                    c.height
                ),
            });
        }
        if let Some(index) = c.first_nonfinite() {
            return Err(FramesError::NonFinite { index });
        }
        for f in encode_chunk(&w, &c, threads) {
            w.write(f?)?;
        }
    }
    // The producer went away without finishing: dropping `w` removes the partial output.
    Err(FramesError::Encode {
        path: PathBuf::from("(frame encoder)"),
        message: "stopped before the last frame".into(),
    })
}

/// Encode the chunk's frames on up to `threads` threads, in frame order.
fn encode_chunk(
    w: &FrameWriter,
    c: &FrameChunk,
    threads: usize,
) -> Vec<Result<EncodedFrame, FramesError>> {
    let enc = w.encoder();
    let t = threads.min(c.frames).max(1);
    let mut slots: Vec<Option<Result<EncodedFrame, FramesError>>> =
        (0..c.frames).map(|_| None).collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..t)
            .map(|k| {
                s.spawn(move || {
                    (k..c.frames)
                        .step_by(t)
                        .map(|j| (j, enc.encode(c.start + j, c.frame_rgb8(j))))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for h in handles {
            // a panic in an encoding thread reaches the stream's join with its own message
            let done = h.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
            for (j, r) in done {
                slots[j] = Some(r);
            }
        }
    });
    slots
        .into_iter()
        .map(|r| r.expect("every frame encoded"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_encoder_thread_says_why() {
        let stream = std::thread::spawn(|| -> Result<Vec<PathBuf>, FramesError> {
            let r = std::thread::scope(|s| {
                s.spawn(|| panic!("no room for frame {}", 7))
                    .join()
                    .unwrap_or_else(|p| std::panic::resume_unwind(p))
            });
            Ok(r)
        });
        let e = match stream.join() {
            Err(p) => encoder_panicked(&*p).to_string(),
            Ok(_) => panic!("the thread should have panicked"),
        };
        assert!(
            e.contains("the frame encoder thread panicked: no room for frame 7"),
            "{e}"
        );
    }
}
