//! Frame writers: GIF / PNG-sequence round trips, MP4 via ffmpeg (when available), error cases.

use motionrt_runtime::frames::{
    ffmpeg_available, gif_delay_cs, stale_sequence_frames, write, write_gif, write_mp4,
    write_png_sequence, Frames, FramesError, OutputFormat,
};
use std::fs::{self, File};
use std::path::{Path, PathBuf};

/// A fresh, empty directory for one test.
fn test_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("frames_test_{name}"));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn dir_entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// A deterministic gradient video with varying content per frame.
fn gradient(frames: usize, height: usize, width: usize) -> Frames {
    let mut data = Vec::with_capacity(frames * height * width * 3);
    for f in 0..frames {
        for y in 0..height {
            for x in 0..width {
                data.push(x as f32 / (width.max(2) - 1) as f32);
                data.push(y as f32 / (height.max(2) - 1) as f32);
                data.push(((f * 37 + x * 3 + y * 5) % 256) as f32 / 255.0);
            }
        }
    }
    Frames::new(frames, height, width, data).unwrap()
}

fn flat(frames: usize, height: usize, width: usize, rgb: [f32; 3]) -> Frames {
    let data = (0..frames * height * width).flat_map(|_| rgb).collect();
    Frames::new(frames, height, width, data).unwrap()
}

#[test]
fn new_rejects_bad_shape() {
    assert!(matches!(
        Frames::new(2, 3, 4, vec![0.0; 2 * 3 * 4 * 3 - 1]),
        Err(FramesError::Shape { .. })
    ));
    assert!(matches!(
        Frames::new(0, 3, 4, vec![]),
        Err(FramesError::Shape { .. })
    ));
}

#[test]
fn frame_rgb8_rounds_and_clamps() {
    let f = Frames::new(1, 1, 2, vec![-0.5, 0.0, 0.5, 1.0, 2.0, 0.1]).unwrap();
    // 0.5 * 255 = 127.5 -> 128; 0.1 * 255 = 25.5 -> 26
    assert_eq!(f.frame_rgb8(0), vec![0, 0, 128, 255, 255, 26]);
}

#[test]
fn format_from_path() {
    let dir = test_dir("format");
    assert_eq!(
        OutputFormat::from_path(Path::new("a/out.gif")),
        Some(OutputFormat::Gif)
    );
    assert_eq!(
        OutputFormat::from_path(Path::new("out.GIF")),
        Some(OutputFormat::Gif)
    );
    assert_eq!(
        OutputFormat::from_path(Path::new("out.mp4")),
        Some(OutputFormat::Mp4)
    );
    assert_eq!(
        OutputFormat::from_path(Path::new("out.png")),
        Some(OutputFormat::Png)
    );
    assert_eq!(
        OutputFormat::from_path(Path::new("some/new/dir/")),
        Some(OutputFormat::Png)
    );
    assert_eq!(OutputFormat::from_path(&dir), Some(OutputFormat::Png));
    assert_eq!(OutputFormat::from_path(Path::new("out.avi")), None);
    assert_eq!(OutputFormat::from_path(Path::new("out")), None);
}

#[test]
fn gif_round_trip() {
    let dir = test_dir("gif");
    let path = dir.join("out.gif");
    let (n, h, w) = (5, 24, 40);
    let frames = gradient(n, h, w);
    let written = write(&path, &frames, 8.0).unwrap();
    assert_eq!(written, vec![path.clone()]);
    assert_eq!(dir_entries(&dir), vec!["out.gif"], "no temp files left");

    let bytes = fs::read(&path).unwrap();
    assert!(bytes.starts_with(b"GIF89a"));
    assert!(
        bytes.windows(11).any(|w| w == b"NETSCAPE2.0"),
        "NETSCAPE loop extension present"
    );

    let mut opts = gif::DecodeOptions::new();
    opts.set_color_output(gif::ColorOutput::RGBA);
    let mut decoder = opts.read_info(File::open(&path).unwrap()).unwrap();
    assert_eq!(usize::from(decoder.width()), w);
    assert_eq!(usize::from(decoder.height()), h);
    let mut count = 0;
    while let Some(frame) = decoder.read_next_frame().unwrap() {
        assert_eq!(usize::from(frame.width), w);
        assert_eq!(usize::from(frame.height), h);
        assert_eq!(frame.delay, 13, "round(100 / 8) centiseconds");
        assert_eq!(frame.delay, gif_delay_cs(8.0));
        count += 1;
    }
    assert_eq!(count, n);
    assert_eq!(decoder.repeat(), gif::Repeat::Infinite);
}

#[test]
fn gif_flat_colour_preserved_and_min_delay() {
    let dir = test_dir("gif_flat");
    let path = dir.join("flat.gif");
    let rgb = [0.2f32, 0.6, 0.9];
    let frames = flat(2, 16, 16, rgb);
    write_gif(&path, &frames, 100.0).unwrap();

    let mut opts = gif::DecodeOptions::new();
    opts.set_color_output(gif::ColorOutput::RGBA);
    let mut decoder = opts.read_info(File::open(&path).unwrap()).unwrap();
    let want: Vec<i32> = rgb.iter().map(|c| (c * 255.0).round() as i32).collect();
    let mut count = 0;
    while let Some(frame) = decoder.read_next_frame().unwrap() {
        assert_eq!(frame.delay, 2, "delay is at least 2 centiseconds");
        for px in frame.buffer.chunks_exact(4) {
            for c in 0..3 {
                let d = (i32::from(px[c]) - want[c]).abs();
                assert!(d <= 4, "channel {c}: got {} want {}", px[c], want[c]);
            }
            assert_eq!(px[3], 255, "opaque");
        }
        count += 1;
    }
    assert_eq!(count, 2);
    assert_eq!(decoder.repeat(), gif::Repeat::Infinite);
}

fn decode_png(path: &Path) -> (u32, u32, Vec<u8>) {
    let decoder = png::Decoder::new(File::open(path).unwrap());
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    assert_eq!(info.bit_depth, png::BitDepth::Eight);
    buf.truncate(info.buffer_size());
    (info.width, info.height, buf)
}

#[test]
fn png_sequence_round_trip() {
    let dir = test_dir("png");
    let path = dir.join("out.png");
    let (n, h, w) = (3, 9, 13);
    let frames = gradient(n, h, w);
    let written = write(&path, &frames, 8.0).unwrap();
    let expect: Vec<PathBuf> = (0..n)
        .map(|i| dir.join(format!("out_{i:03}.png")))
        .collect();
    assert_eq!(written, expect);
    assert_eq!(
        dir_entries(&dir),
        vec!["out_000.png", "out_001.png", "out_002.png"],
        "no temp files left"
    );
    for (i, p) in written.iter().enumerate() {
        let (pw, ph, data) = decode_png(p);
        assert_eq!((pw as usize, ph as usize), (w, h));
        assert_eq!(data, frames.frame_rgb8(i), "exact RGB8 round trip");
    }
}

#[test]
fn frames_left_by_an_earlier_longer_sequence_are_found_not_removed() {
    let dir = test_dir("png_stale");
    let path = dir.join("out.png");
    write(&path, &gradient(5, 4, 6), 8.0).unwrap();
    // another padding and other names: only the sequence's own pattern counts
    for other in [
        "out_0007.png",
        "out_x.png",
        "outer_001.png",
        "out_001.gif",
        "notes.txt",
    ] {
        fs::write(dir.join(other), b"x").unwrap();
    }
    let written = write(&path, &gradient(2, 4, 6), 8.0).unwrap();
    assert_eq!(written.len(), 2);
    let stale = stale_sequence_frames(&written);
    let names: Vec<String> = stale
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        vec!["out_0007.png", "out_002.png", "out_003.png", "out_004.png"]
    );
    assert!(stale.iter().all(|p| p.parent() == Some(dir.as_path())));
    assert!(stale.iter().all(|p| p.is_file()), "nothing removed");
    // a directory target, and a sequence with nothing beside it
    let seq = dir.join("seq");
    fs::create_dir(&seq).unwrap();
    let written = write(&seq, &gradient(2, 4, 6), 8.0).unwrap();
    assert!(stale_sequence_frames(&written).is_empty());
    fs::write(seq.join("frame_002.png"), b"x").unwrap();
    assert_eq!(
        stale_sequence_frames(&written),
        vec![seq.join("frame_002.png")]
    );
    // not a sequence
    let gif = write(&dir.join("a.gif"), &gradient(2, 4, 6), 8.0).unwrap();
    assert!(stale_sequence_frames(&gif).is_empty());
}

#[test]
fn png_sequence_into_directory() {
    let base = test_dir("png_dir");
    // Existing directory.
    let frames = gradient(2, 4, 6);
    let written = write(&base, &frames, 8.0).unwrap();
    assert_eq!(
        written,
        vec![base.join("frame_000.png"), base.join("frame_001.png")]
    );
    // New directory named with a trailing slash is created.
    let new_dir = base.join("seq");
    let target = PathBuf::from(format!("{}/", new_dir.display()));
    let written = write_png_sequence(&target, &frames).unwrap();
    assert_eq!(written.len(), 2);
    assert_eq!(
        dir_entries(&new_dir),
        vec!["frame_000.png", "frame_001.png"]
    );
    let (_, _, data) = decode_png(&written[1]);
    assert_eq!(data, frames.frame_rgb8(1));
}

#[test]
fn mp4_via_ffmpeg() {
    if !ffmpeg_available() {
        println!("skipped: no ffmpeg");
        return;
    }
    let dir = test_dir("mp4");
    for (name, h, w) in [("even.mp4", 32, 48), ("odd.mp4", 31, 45)] {
        let path = dir.join(name);
        let frames = gradient(6, h, w);
        let written = write(&path, &frames, 8.0).unwrap();
        assert_eq!(written, vec![path.clone()]);
        let bytes = fs::read(&path).unwrap();
        assert!(bytes.len() > 8);
        assert_eq!(&bytes[4..8], b"ftyp", "{name} starts with an ftyp box");
    }
    assert_eq!(
        dir_entries(&dir),
        vec!["even.mp4", "odd.mp4"],
        "no temp files"
    );
}

#[test]
fn mp4_missing_ffmpeg_message() {
    // The message must be actionable whether or not ffmpeg is installed here.
    let e = FramesError::FfmpegMissing {
        path: PathBuf::from("out/video.mp4"),
    };
    let msg = e.to_string();
    assert!(msg.contains("out/video.mp4"), "{msg}");
    assert!(msg.contains("install ffmpeg"), "{msg}");
    assert!(msg.contains(".gif") && msg.contains(".png"), "{msg}");
    if !ffmpeg_available() {
        let dir = test_dir("mp4_missing");
        let path = dir.join("v.mp4");
        let err = write_mp4(&path, &gradient(2, 4, 4), 8.0).unwrap_err();
        assert!(matches!(err, FramesError::FfmpegMissing { .. }), "{err}");
        assert!(dir_entries(&dir).is_empty());
    }
}

#[test]
fn nan_frame_rejected_and_nothing_written() {
    let dir = test_dir("nan");
    let mut frames = gradient(4, 5, 6);
    let per = 5 * 6 * 3;
    frames.data[2 * per + 7] = f32::NAN;
    frames.data[3 * per] = f32::INFINITY;
    for name in ["a.gif", "b.png", "c.mp4"] {
        let err = write(&dir.join(name), &frames, 8.0).unwrap_err();
        assert!(
            matches!(err, FramesError::NonFinite { index: 2 }),
            "{name}: {err}"
        );
    }
    let err = write(&dir.join("seq/"), &frames, 8.0).unwrap_err();
    assert!(matches!(err, FramesError::NonFinite { index: 2 }), "{err}");
    assert!(dir_entries(&dir).is_empty(), "{:?}", dir_entries(&dir));

    frames.data[2 * per + 7] = 0.0;
    let err = write(&dir.join("a.gif"), &frames, 8.0).unwrap_err();
    assert!(matches!(err, FramesError::NonFinite { index: 3 }), "{err}");
    assert!(dir_entries(&dir).is_empty());
}

#[test]
fn unknown_extension() {
    let dir = test_dir("unknown");
    let path = dir.join("out.avi");
    let err = write(&path, &gradient(1, 2, 2), 8.0).unwrap_err();
    assert!(matches!(err, FramesError::UnknownFormat { .. }), "{err}");
    assert!(err.to_string().contains("out.avi"), "{err}");
    assert!(dir_entries(&dir).is_empty());
}

#[test]
fn invalid_fps() {
    let dir = test_dir("fps");
    for fps in [0.0, -1.0, f32::NAN] {
        let err = write(&dir.join("x.gif"), &gradient(1, 2, 2), fps).unwrap_err();
        assert!(matches!(err, FramesError::InvalidFps { .. }), "{err}");
    }
    assert!(dir_entries(&dir).is_empty());
}

#[test]
fn nonexistent_directory_is_io_error() {
    let dir = test_dir("nodir");
    let missing = dir.join("does_not_exist");
    let frames = gradient(2, 4, 4);
    let mut names = vec!["out.gif", "out.png", "sub/"];
    if ffmpeg_available() {
        names.push("out.mp4");
    }
    for name in names {
        let path = missing.join(name);
        let err = write(&path, &frames, 8.0).unwrap_err();
        match &err {
            FramesError::Io { path: p, .. } => {
                assert!(p.starts_with(&missing), "{name}: {}", p.display());
            }
            FramesError::Ffmpeg { path: p, .. } => {
                // ffmpeg itself reports the failure to open its output.
                assert_eq!(p, &path);
            }
            other => panic!("{name}: unexpected error {other}"),
        }
        assert!(
            err.to_string().contains("does_not_exist"),
            "{name}: message names the path: {err}"
        );
        assert!(!missing.exists(), "{name}: nothing created");
    }
    assert!(dir_entries(&dir).is_empty());
}

// ---- streaming: FrameWriter + FrameStream ----

use motionrt_runtime::frame_stream::{ChunkLayout, FrameChunk, FrameStream};
use motionrt_runtime::frames::FrameWriter;

/// Chunks of `frames` (RGB layout) of `chunk` frames each.
fn chunks_of(frames: &Frames, chunk: usize) -> Vec<FrameChunk> {
    let n = frames.frame_len();
    (0..frames.frames)
        .step_by(chunk)
        .map(|start| {
            let m = chunk.min(frames.frames - start);
            FrameChunk {
                start,
                frames: m,
                height: frames.height,
                width: frames.width,
                layout: ChunkLayout::Rgb,
                data: frames.data[start * n..(start + m) * n].to_vec(),
            }
        })
        .collect()
}

fn stream_write(
    path: &Path,
    frames: &Frames,
    chunk: usize,
    threads: usize,
) -> Result<Vec<PathBuf>, FramesError> {
    let w = FrameWriter::create(path, frames.width, frames.height, frames.frames, 8.0)?;
    let mut s = FrameStream::spawn(w, threads, 1);
    for c in chunks_of(frames, chunk) {
        s.push(c)?;
    }
    s.finish()
}

#[test]
fn streamed_output_is_byte_identical_to_the_batch_writer() {
    let dir = test_dir("stream_same");
    let frames = gradient(7, 12, 20);
    write(&dir.join("batch.gif"), &frames, 8.0).unwrap();
    write(&dir.join("batch.png"), &frames, 8.0).unwrap();
    for (chunk, threads) in [(1, 1), (3, 2), (7, 4), (16, 3)] {
        let sub = dir.join(format!("c{chunk}_t{threads}"));
        fs::create_dir_all(&sub).unwrap();
        let files = stream_write(&sub.join("s.gif"), &frames, chunk, threads).unwrap();
        assert_eq!(files, vec![sub.join("s.gif")]);
        assert_eq!(
            fs::read(sub.join("s.gif")).unwrap(),
            fs::read(dir.join("batch.gif")).unwrap(),
            "GIF, chunk {chunk}, {threads} threads"
        );
        let files = stream_write(&sub.join("s.png"), &frames, chunk, threads).unwrap();
        assert_eq!(files.len(), 7);
        for (i, f) in files.iter().enumerate() {
            assert_eq!(
                fs::read(f).unwrap(),
                fs::read(dir.join(format!("batch_{i:03}.png"))).unwrap(),
                "PNG frame {i}, chunk {chunk}, {threads} threads"
            );
        }
        let mut names = dir_entries(&sub);
        names.retain(|n| n.starts_with('.'));
        assert!(names.is_empty(), "temporary files left: {names:?}");
    }
}

#[test]
fn planar_signed_chunks_convert_like_the_vae_postprocess() {
    // [m, 3, H, W] in [-1, 1] -> [m, H, W, 3] in [0, 1], clamped.
    let (m, h, w) = (2, 3, 4);
    let data: Vec<f32> = (0..m * 3 * h * w)
        .map(|i| (i as f32 * 0.37).sin() * 1.3)
        .collect();
    let c = FrameChunk {
        start: 5,
        frames: m,
        height: h,
        width: w,
        layout: ChunkLayout::PlanarSigned,
        data: data.clone(),
    };
    let rgb = c.rgb();
    for j in 0..m {
        for y in 0..h {
            for x in 0..w {
                for ch in 0..3 {
                    let v = data[((j * 3 + ch) * h + y) * w + x];
                    let want = (v / 2.0 + 0.5).clamp(0.0, 1.0);
                    assert_eq!(rgb[((j * h + y) * w + x) * 3 + ch], want);
                }
            }
        }
    }
    let frames = Frames::new(m, h, w, rgb).unwrap();
    assert_eq!(c.frame_rgb8(1), frames.frame_rgb8(1));
}

#[test]
fn stream_errors_leave_nothing_behind() {
    let dir = test_dir("stream_err");
    let mut frames = gradient(6, 5, 6);
    // A NaN in frame 4 (the second chunk of 3): named, nothing written.
    let n = frames.frame_len();
    frames.data[4 * n + 2] = f32::NAN;
    for name in ["a.gif", "b.png", "seq/"] {
        let err = stream_write(&dir.join(name), &frames, 3, 2).unwrap_err();
        assert!(
            matches!(err, FramesError::NonFinite { index: 4 }),
            "{name}: {err}"
        );
    }
    assert!(dir_entries(&dir).is_empty(), "{:?}", dir_entries(&dir));

    // Fewer frames than declared: an error at finish, nothing written.
    let frames = gradient(6, 5, 6);
    let w = FrameWriter::create(&dir.join("short.gif"), 6, 5, 6, 8.0).unwrap();
    let mut s = FrameStream::spawn(w, 2, 1);
    s.push(chunks_of(&frames, 4).remove(0)).unwrap();
    let err = s.finish().unwrap_err();
    assert!(err.to_string().contains("4 of the 6"), "{err}");
    assert!(dir_entries(&dir).is_empty(), "{:?}", dir_entries(&dir));

    // Dropped before finishing (the producer failed): nothing written.
    for name in ["drop.gif", "drop.png"] {
        let w = FrameWriter::create(&dir.join(name), 6, 5, 6, 8.0).unwrap();
        let mut s = FrameStream::spawn(w, 2, 1);
        s.push(chunks_of(&frames, 4).remove(0)).unwrap();
        drop(s);
    }
    assert!(dir_entries(&dir).is_empty(), "{:?}", dir_entries(&dir));

    // Out of order, or the wrong size: an error that says what was expected.
    let w = FrameWriter::create(&dir.join("order.gif"), 6, 5, 6, 8.0).unwrap();
    let mut s = FrameStream::spawn(w, 2, 1);
    let mut c = chunks_of(&frames, 2);
    s.push(c.remove(1)).unwrap();
    // The encoder fails on the first chunk; a later push or finish reports it.
    let err = s
        .push(c.remove(0))
        .and_then(|_| s.finish().map(|_| ()))
        .unwrap_err();
    assert!(err.to_string().contains("expected frame 0"), "{err}");
    assert!(dir_entries(&dir).is_empty(), "{:?}", dir_entries(&dir));
}

#[test]
fn writer_rejects_bad_requests_up_front() {
    let dir = test_dir("writer_bad");
    assert!(matches!(
        FrameWriter::create(&dir.join("x.avi"), 4, 4, 2, 8.0),
        Err(FramesError::UnknownFormat { .. })
    ));
    assert!(matches!(
        FrameWriter::create(&dir.join("x.gif"), 4, 4, 2, 0.0),
        Err(FramesError::InvalidFps { .. })
    ));
    assert!(matches!(
        FrameWriter::create(&dir.join("x.gif"), 4, 4, 0, 8.0),
        Err(FramesError::Shape { .. })
    ));
    let err = FrameWriter::create(&dir.join("missing/x.gif"), 4, 4, 2, 8.0)
        .err()
        .expect("missing directory");
    assert!(matches!(err, FramesError::Io { .. }), "{err}");
    assert!(err.to_string().contains("missing/x.gif"), "{err}");
    assert!(dir_entries(&dir).is_empty());
}

/// A PNG sequence that replaces frames of an older one: a frame name taken by a directory is
/// refused before anything is written, and a failure while the frames are moved into place
/// puts the old files back (a failed write never costs the user files). A successful write
/// replaces them and leaves nothing else behind.
#[test]
fn a_failed_png_sequence_keeps_the_files_it_would_replace() {
    use motionrt_runtime::frames::FrameWriter;
    let dir = test_dir("png_replace");
    let old = |d: &Path| {
        fs::write(d.join("frame_000.png"), "A").unwrap();
        fs::write(d.join("frame_001.png"), "B").unwrap();
    };
    let kept = |d: &Path| {
        assert_eq!(fs::read(d.join("frame_000.png")).unwrap(), b"A");
        assert_eq!(fs::read(d.join("frame_001.png")).unwrap(), b"B");
    };
    let frames = gradient(3, 4, 6);
    // a writer of the three frames, not yet finished
    let written = |d: &Path| {
        let mut w = FrameWriter::create(d, 6, 4, 3, 8.0).unwrap();
        for i in 0..3 {
            w.write(w.encoder().encode(i, frames.frame_rgb8(i)).unwrap())
                .unwrap();
        }
        w
    };
    // the old frames as they were, beside the folder named like the third frame
    let kept_with_folder = || {
        kept(&dir);
        assert_eq!(
            dir_entries(&dir),
            ["frame_000.png", "frame_001.png", "frame_002.png"]
        );
    };
    // caught when the writer is opened: before the generation's work, nothing written
    old(&dir);
    fs::create_dir(dir.join("frame_002.png")).unwrap();
    let e = write(&dir, &frames, 8.0).unwrap_err().to_string();
    assert!(
        e.contains("frame_002.png") && e.contains("directory"),
        "{e}"
    );
    kept_with_folder();
    // the directory appears while the frames are being written: the two old frames, already
    // given second names when it is met, keep their own
    fs::remove_dir(dir.join("frame_002.png")).unwrap();
    let w = written(&dir);
    fs::create_dir(dir.join("frame_002.png")).unwrap();
    let e = w.finish().unwrap_err().to_string();
    assert!(e.contains("frame_002.png"), "{e}");
    kept_with_folder();
    // a frame that fails to move into place after another has: the one in place is undone
    // (its old file back), the one not yet replaced keeps its old file, nothing hidden is left
    fs::remove_dir(dir.join("frame_002.png")).unwrap();
    let w = written(&dir);
    let temp = dir.join(format!(".frame_001.png.partial-{}", std::process::id()));
    fs::remove_file(&temp).unwrap();
    let e = w.finish().unwrap_err().to_string();
    assert!(e.contains("frame_001.png"), "{e}");
    kept(&dir);
    assert_eq!(dir_entries(&dir), ["frame_000.png", "frame_001.png"]);
    // without the clash the new frames replace the old, and nothing else is left
    write(&dir, &frames, 8.0).unwrap();
    assert_eq!(
        dir_entries(&dir),
        ["frame_000.png", "frame_001.png", "frame_002.png"]
    );
    assert_eq!(
        decode_png(&dir.join("frame_001.png")).2,
        frames.frame_rgb8(1)
    );
}
