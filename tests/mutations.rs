//! Damaged input never panics: deterministic mutations (bit flips, bytes set to edge values,
//! truncations, deleted and repeated ranges, lengths overwritten with huge numbers) of real
//! files of each format motionrt reads, each fed to its reader, which must return a value or an
//! error, never panic or abort. The checkpoints' pickle is mutated inside a well-formed archive
//! (the zip's checksums would otherwise stop it at the container), and every tensor a damaged
//! checkpoint still lists is read. A failure lists the mutations that panicked and keeps each
//! input under `target/mutations/` to reproduce it.

use std::io::{Cursor, Read, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

mod common;

use std::collections::HashMap;

use common::{export_pipeline, pipeline_fixtures, text_width};
use motionrt_export::checkpoint::Checkpoint;
use motionrt_export::graph::unet::Semantics;
use motionrt_export::graph::Precision;
use motionrt_export::onnx::load_model;
use motionrt_export::onnx::proto::ModelProto;
use motionrt_runtime::engine::program::{self, InitializerSource, Layout};
use motionrt_runtime::engine::source::FileInitializers;
use motionrt_runtime::engine::{cpu_exec, fuse, EngineError};
use motionrt_runtime::{npy, video_in};

/// xorshift64*: the same mutations on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One mutation of `data`, described.
fn mutate(rng: &mut Rng, data: &mut Vec<u8>) -> String {
    if data.is_empty() {
        data.push(rng.next() as u8);
        return "one byte into an empty input".into();
    }
    let n = data.len();
    let at = rng.below(n);
    match rng.below(7) {
        0 => {
            let bit = rng.below(8);
            data[at] ^= 1 << bit;
            format!("bit {bit} of byte {at} flipped")
        }
        1 => {
            let v = [0u8, 0xff, 0x7f, 0x80, 0x01][rng.below(5)];
            data[at] = v;
            format!("byte {at} set to {v:#x}")
        }
        2 => {
            data[at] = rng.next() as u8;
            format!("byte {at} set to {:#x}", data[at])
        }
        3 => {
            data.truncate(at);
            format!("truncated to {at} bytes")
        }
        4 => {
            let len = rng.below(64).min(n - at);
            data.drain(at..at + len);
            format!("{len} bytes at {at} deleted")
        }
        5 => {
            let len = rng.below(64).min(n - at);
            let copy = data[at..at + len].to_vec();
            let to = rng.below(data.len());
            data.splice(to..to, copy);
            format!("{len} bytes from {at} repeated at {to}")
        }
        _ => {
            let big: [u8; 8] = [
                u64::MAX.to_le_bytes(),
                (u32::MAX as u64).to_le_bytes(),
                (i32::MAX as u64).to_le_bytes(),
                (1u64 << 40).to_le_bytes(),
            ][rng.below(4)];
            let len = (n - at).min(4 << rng.below(2));
            data[at..at + len].copy_from_slice(&big[..len]);
            format!("{len} bytes at {at} set to a huge number")
        }
    }
}

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

thread_local! {
    /// Whether this thread's panics are expected (caught and reported by the harness).
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Where this thread's last quiet panic happened.
    static LAST_PANIC_AT: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// Quiet panics on this thread until the guard drops: the process-wide hook (installed once, so
/// tests running in parallel never swap it under one another) records where they happened and
/// prints nothing; other threads' panics report as usual.
fn quiet_panics() -> impl Drop {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        let report = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if QUIET.with(|q| q.get()) {
                let at = info.location().map(|l| l.to_string()).unwrap_or_default();
                LAST_PANIC_AT.with(|l| *l.borrow_mut() = at);
            } else {
                report(info);
            }
        }));
    });
    QUIET.with(|q| q.set(true));
    struct Loud;
    impl Drop for Loud {
        fn drop(&mut self) {
            QUIET.with(|q| q.set(false));
        }
    }
    Loud
}

/// A caught panic's message and where it happened.
fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    let msg = p
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default();
    let at = LAST_PANIC_AT.with(|l| l.borrow().clone());
    format!("{msg} (at {at})")
}

/// Run `check` on `cases` mutations of `original` (one to three mutations each); every panic is
/// reported with its input kept under `target/mutations/NAME-CASE`.
fn fuzz(name: &str, original: &[u8], cases: usize, seed: u64, check: &dyn Fn(&[u8])) {
    let keep = Path::new(env!("CARGO_TARGET_TMPDIR")).join("mutations");
    let mut rng = Rng(seed);
    let mut panics = Vec::new();
    let quiet = quiet_panics();
    for case in 0..cases {
        let mut data = original.to_vec();
        let what: Vec<String> = (0..1 + rng.below(3))
            .map(|_| mutate(&mut rng, &mut data))
            .collect();
        if let Err(e) = catch_unwind(AssertUnwindSafe(|| check(&data))) {
            std::fs::create_dir_all(&keep).unwrap();
            let p = keep.join(format!("{name}-{case}"));
            std::fs::write(&p, &data).unwrap();
            panics.push(format!(
                "case {case} ({}): {}: {}",
                what.join(", "),
                p.display(),
                panic_message(&*e)
            ));
        }
    }
    drop(quiet);
    assert!(
        panics.is_empty(),
        "{name}: {} of {cases} damaged inputs panicked:\n{}",
        panics.len(),
        panics.join("\n")
    );
}

/// Open `path` as a checkpoint and read every tensor it lists; errors are fine.
fn open_and_read(path: &Path) {
    if let Ok(c) = Checkpoint::open(path) {
        let keys: Vec<String> = c.keys().map(str::to_string).collect();
        for k in keys {
            let _ = c.read_f32(&k);
        }
    }
}

#[test]
fn damaged_pickles_in_a_torch_checkpoint() {
    let src = std::fs::read(fixture("unet/mm_v1.ckpt")).unwrap();
    let mut archive = zip::ZipArchive::new(Cursor::new(&src[..])).unwrap();
    let pkl_name = (0..archive.len())
        .map(|i| archive.name_for_index(i).unwrap().unwrap().into_owned())
        .find(|n| n.ends_with("/data.pkl"))
        .unwrap();
    let mut pkl = Vec::new();
    archive
        .by_name(&pkl_name)
        .unwrap()
        .read_to_end(&mut pkl)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("damaged.ckpt");
    fuzz("pickle", &pkl, 600, 0x5eed_0001, &|data| {
        // the damaged pickle in place of the original, every other entry as it was
        let mut out = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
        let mut a = zip::ZipArchive::new(Cursor::new(&src[..])).unwrap();
        for i in 0..a.len() {
            let entry = a.by_index_raw(i).unwrap();
            if entry.name().unwrap() == pkl_name.as_str() {
                drop(entry);
                let opts = zip::write::SimpleFileOptions::default()
                    .compression_method(zip::CompressionMethod::Stored);
                out.start_file(pkl_name.as_str(), opts).unwrap();
                out.write_all(data).unwrap();
            } else {
                out.raw_copy_file(entry).unwrap();
            }
        }
        out.finish().unwrap();
        open_and_read(&path);
    });
}

#[test]
fn damaged_checkpoint_files() {
    // the whole file: zip directory and local headers, safetensors header and data
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("damaged");
    for (name, rel, seed) in [
        ("torch-zip", "unet/mm_v3.ckpt", 0x5eed_0002),
        ("safetensors", "unet/mm_v2_flat.safetensors", 0x5eed_0003),
    ] {
        let src = std::fs::read(fixture(rel)).unwrap();
        // mutations near the start and the end, where the headers and the zip directory are:
        // the tensor data between only changes values
        let head = src.len().min(64 << 10);
        let (front, rest) = src.split_at(head);
        fuzz(&format!("{name}-front"), front, 300, seed, &|data| {
            std::fs::write(&path, [data, rest].concat()).unwrap();
            open_and_read(&path);
        });
        let tail_at = src.len() - src.len().min(48 << 10);
        let (body, tail) = src.split_at(tail_at);
        fuzz(&format!("{name}-end"), tail, 300, seed ^ 0xff, &|data| {
            std::fs::write(&path, [body, data].concat()).unwrap();
            open_and_read(&path);
        });
    }
}

#[test]
fn damaged_npy_and_npz() {
    let dir = tempfile::tempdir().unwrap();
    for (i, f) in ["f16", "f32", "f64", "i32", "i64", "scalar", "empty"]
        .iter()
        .enumerate()
    {
        let src = std::fs::read(fixture(&format!("npz/npy/{f}.npy"))).unwrap();
        fuzz(f, &src, 300, 0x5eed_0100 + i as u64, &|data| {
            let _ = npy::parse(Path::new("damaged.npy"), data);
        });
    }
    let path = dir.path().join("damaged.npz");
    for (i, f) in ["savez", "savez_compressed"].iter().enumerate() {
        let src = std::fs::read(fixture(&format!("npz/{f}.npz"))).unwrap();
        fuzz(f, &src, 400, 0x5eed_0200 + i as u64, &|data| {
            std::fs::write(&path, data).unwrap();
            let _ = npy::read_npz(&path);
        });
    }
}

#[test]
fn damaged_gif_input() {
    // a small looping GIF as `motionrt demo` writes it, then damaged, read as `edit --video`
    let dir = tempfile::tempdir().unwrap();
    let src = {
        let (w, h, frames) = (24u16, 16u16, 3);
        let mut bytes = Vec::new();
        {
            let mut enc = gif::Encoder::new(&mut bytes, w, h, &[]).unwrap();
            enc.set_repeat(gif::Repeat::Infinite).unwrap();
            for f in 0..frames {
                let rgb: Vec<u8> = (0..w as usize * h as usize * 3)
                    .map(|i| (i * 7 + f * 31) as u8)
                    .collect();
                let frame = gif::Frame::from_rgb(w, h, &rgb);
                enc.write_frame(&frame).unwrap();
            }
        }
        bytes
    };
    let path = dir.path().join("damaged.gif");
    fuzz("gif", &src, 400, 0x5eed_0300, &|data| {
        std::fs::write(&path, data).unwrap();
        let _ = video_in::read(&path, Some(8), Some((16, 16)));
        let _ = video_in::read(&path, None, None);
    });
}

/// One structural change to a graph, described: a node removed, repeated or moved before its
/// inputs' producers; an input renamed to another tensor or to none; an operator swapped; an
/// attribute or an initializer's dims set to edge values; an initializer removed.
fn mutate_graph(rng: &mut Rng, m: &mut ModelProto) -> String {
    let g = m.graph.as_mut().expect("a graph");
    let names: Vec<String> = g
        .node
        .iter()
        .flat_map(|n| n.output.iter().cloned())
        .chain(g.initializer.iter().map(|t| t.name.clone()))
        .collect();
    let ops: Vec<String> = g.node.iter().map(|n| n.op_type.clone()).collect();
    let edge = [0i64, 1, -1, 2, 3, 7, 1 << 31, i64::MAX, i64::MIN];
    let ni = rng.below(g.node.len());
    match rng.below(9) {
        0 => {
            let n = g.node.remove(ni);
            format!("node {} ({}) removed", n.name, n.op_type)
        }
        1 => {
            let n = g.node[ni].clone();
            let to = rng.below(g.node.len());
            g.node.insert(to, n);
            format!("node {ni} repeated at {to}")
        }
        2 => {
            let n = g.node.remove(ni);
            let to = rng.below(ni + 1);
            g.node.insert(to, n);
            format!("node {ni} moved to {to}")
        }
        3 | 4 => {
            let n = &mut g.node[ni];
            if n.input.is_empty() {
                return "nothing (a node without inputs)".into();
            }
            let k = rng.below(n.input.len());
            n.input[k] = if rng.below(4) == 0 {
                "no such tensor".into()
            } else {
                names[rng.below(names.len())].clone()
            };
            format!(
                "input {k} of {} ({}) now {:?}",
                n.name, n.op_type, n.input[k]
            )
        }
        5 => {
            let n = &mut g.node[ni];
            n.op_type = ops[rng.below(ops.len())].clone();
            format!("node {} now a {}", n.name, n.op_type)
        }
        6 => {
            let n = &mut g.node[ni];
            if n.attribute.is_empty() {
                return "nothing (a node without attributes)".into();
            }
            let a = rng.below(n.attribute.len());
            let v = edge[rng.below(edge.len())];
            let attr = &mut n.attribute[a];
            attr.i = v;
            attr.f = v as f32;
            if !attr.ints.is_empty() {
                let k = rng.below(attr.ints.len());
                attr.ints[k] = v;
            }
            format!(
                "attribute {} of {} ({}) set to {v}",
                attr.name, n.name, n.op_type
            )
        }
        7 => {
            if g.initializer.is_empty() {
                return "nothing (no initializers)".into();
            }
            let k = rng.below(g.initializer.len());
            let t = &mut g.initializer[k];
            if t.dims.is_empty() {
                t.dims.push(2);
            } else {
                let k = rng.below(t.dims.len());
                t.dims[k] = edge[rng.below(edge.len())];
            }
            format!("initializer {} dims now {:?}", t.name, t.dims)
        }
        _ => {
            if g.initializer.is_empty() {
                return "nothing (no initializers)".into();
            }
            let t = g.initializer.remove(rng.below(g.initializer.len()));
            format!("initializer {} removed", t.name)
        }
    }
}

/// The engine builder on damaged graphs (`motionrt build` reads whatever ONNX files the model
/// folder holds): the tiny pipeline's text encoder and VAE decoder, changed structurally, then
/// fused, compiled in both layouts, memory-planned and, where that all succeeds, run on the
/// CPU interpreter. Each must return a value or an error.
#[test]
fn damaged_graphs_for_the_engine_builder() {
    let e = export_pipeline(
        &pipeline_fixtures().join("tiny"),
        false,
        Semantics::Diffusers,
        Precision::Fp32,
    );
    let d = text_width(&e.dir.path().join("out"));
    type Inputs = Vec<(&'static str, Vec<usize>)>;
    // (graph, input shapes, seed, cases): 1500 of each (two seeds) passed when this was
    // written; the suite keeps fewer of the UNet's, each a second of compiling
    let cases: [(&str, Inputs, u64, usize); 3] = [
        (
            "text_encoder",
            vec![("input_ids", vec![1, 77])],
            0x5eed_0400,
            400,
        ),
        (
            "vae_decoder",
            vec![("latent", vec![1, 4, 4, 4])],
            0x5eed_0500,
            400,
        ),
        (
            "unet",
            vec![
                ("sample", vec![1, 4, 2, 8, 8]),
                ("timestep", vec![1]),
                ("encoder_hidden_states", vec![2, 77, d]),
            ],
            0x5eed_0600,
            100,
        ),
    ];
    let quiet = quiet_panics();
    let mut panics = Vec::new();
    let mut compiled = 0;
    for (graph, inputs, seed, count) in cases {
        let path = e.dir.path().join(format!("out/{graph}.onnx"));
        let original = load_model(&path).unwrap();
        let src = FileInitializers::new(&path);
        let mut rng = Rng(seed);
        for case in 0..count {
            let mut m = original.clone();
            let what: Vec<String> = (0..1 + rng.below(2))
                .map(|_| mutate_graph(&mut rng, &mut m))
                .collect();
            let r = catch_unwind(AssertUnwindSafe(|| {
                if fuse(&mut m).is_err() {
                    return 0;
                }
                let mut ok = 0;
                for layout in [Layout::Nchw, Layout::Nhwc] {
                    let Ok(prog) = program::compile(&m, &inputs, &src, layout) else {
                        continue;
                    };
                    ok += 1;
                    let _ = program::plan_memory(&prog, |_| 4);
                    // a damaged size can make a program too large to run here (an allocation
                    // failure aborts, which no test can catch): those stop at compiling
                    let elements = prog
                        .buffers
                        .iter()
                        .fold(0usize, |n, b| n.saturating_add(b.numel));
                    if prog.check_tensor_sizes().is_err() || elements > 1 << 26 {
                        continue;
                    }
                    let inits: HashMap<&str, _> = m
                        .graph
                        .as_ref()
                        .unwrap()
                        .initializer
                        .iter()
                        .map(|t| (t.name.as_str(), t))
                        .collect();
                    let weight = |n: &str| match inits.get(n) {
                        Some(t) => src.f32s(t),
                        None => Err(EngineError::Graph(format!("no initializer {n}"))),
                    };
                    let (mut f, mut i) = (HashMap::new(), HashMap::new());
                    for (name, shape) in &inputs {
                        let n: usize = shape.iter().product();
                        if *name == "input_ids" {
                            i.insert(name.to_string(), (0..n as i64).map(|x| x % 50).collect());
                        } else {
                            f.insert(name.to_string(), vec![0.5f32; n]);
                        }
                    }
                    let _ = cpu_exec::run(&prog, &f, &i, &weight);
                }
                ok
            }));
            match r {
                Ok(n) => compiled += n,
                Err(p) => panics.push(format!(
                    "{graph} case {case}: {}: {}",
                    what.join("; "),
                    panic_message(&*p)
                )),
            }
        }
    }
    drop(quiet);
    eprintln!("{compiled} damaged programs compiled");
    assert!(
        panics.is_empty(),
        "{} damaged graphs panicked:\n{}",
        panics.len(),
        panics.join("\n")
    );
}

/// The harness reports a reader that panics (so the tests above can fail).
#[test]
#[should_panic(expected = "damaged inputs panicked")]
fn a_panicking_reader_is_reported() {
    fuzz("self-test", b"0123456789", 20, 1, &|data| {
        assert!(data.len() >= 10, "shorter input");
    });
}
