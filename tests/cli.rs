//! The command line as a user meets it: `inspect` on checkpoints and ONNX files, `demo`, `--help`.

use std::path::Path;
use std::process::Command;

fn motionrt() -> Command {
    Command::new(env!("CARGO_BIN_EXE_motionrt"))
}

fn fx(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/unet")
        .join(name)
}

fn ok(cmd: &mut Command) -> String {
    ok_with_stderr(cmd).0
}

/// Runs `cmd`, expecting success: its stdout and stderr.
fn ok_with_stderr(cmd: &mut Command) -> (String, String) {
    let o = cmd.output().expect("motionrt runs");
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{stderr}");
    (String::from_utf8(o.stdout).unwrap(), stderr)
}

#[test]
fn inspect_reports_motion_module_version_and_layout() {
    for (file, version, layout) in [
        ("mm_v1.ckpt", "v1", "animatediff"),
        ("mm_v2_nested.ckpt", "v2", "animatediff"),
        ("mm_v3.ckpt", "v3", "animatediff"),
        ("adapter_v2", "v2", "diffusers"),
    ] {
        let json = ok(motionrt().args(["inspect", "--json"]).arg(fx(file)));
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["kind"], "motion_module", "{file}");
        assert_eq!(v["layout"], layout, "{file}");
        assert_eq!(v["motion"]["version"], version.to_uppercase(), "{file}");
        assert!(v["parameters"].as_u64().unwrap() > 0);
    }
    let text = ok(motionrt().arg("inspect").arg(fx("mm_v2_nested.ckpt")));
    assert!(text.contains("AnimateDiff v2"), "{text}");
    assert!(text.contains("state_dict"), "{text}");
}

/// What is not there, or is no model, is an error that says which and why — once.
#[test]
fn inspect_refuses_missing_and_empty_files_clearly() {
    let d = tempfile::tempdir().unwrap();
    let missing = d.path().join("nope.safetensors");
    let e = fails(motionrt().arg("inspect").arg(&missing));
    assert!(e.contains("nope.safetensors: no such file"), "{e}");
    assert_eq!(e.matches("no such file").count(), 1, "{e}");
    let empty = d.path().join("empty.onnx");
    std::fs::write(&empty, b"").unwrap();
    let e = fails(motionrt().arg("inspect").arg(&empty));
    assert!(
        e.contains("empty.onnx") && e.contains("no ONNX model"),
        "{e}"
    );
    // an I/O error under a message that names its file is not printed twice
    let e = fails(
        motionrt()
            .args(["export", "--unet"])
            .arg(d.path().join("no-unet"))
            .arg("--out")
            .arg(d.path().join("x")),
    );
    assert!(e.contains("no-unet"), "{e}");
    assert_eq!(e.matches("(os error 2)").count(), 1, "{e}");
}

#[test]
fn inspect_reports_ldm_unet_and_what_else_the_file_holds() {
    let v: serde_json::Value = serde_json::from_str(&ok(motionrt()
        .args(["inspect", "--json"])
        .arg(fx("sd_tiny_ldm.ckpt"))))
    .unwrap();
    assert_eq!(v["kind"], "unet");
    assert_eq!(v["layout"], "ldm");
    assert_eq!(v["unet"]["block_out_channels"], serde_json::json!([32, 64]));
    assert!(v["dtypes"]["f16"].as_u64().unwrap() > 0);
    let mut also: Vec<&str> = v["also_contains"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap())
        .collect();
    also.sort();
    assert_eq!(also, ["text encoder", "vae"]);
}

#[test]
fn export_then_inspect_onnx() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m");
    let text = ok(motionrt()
        .args(["export", "--unet"])
        .arg(fx("sd_tiny_ldm.ckpt"))
        .arg("--motion-module")
        .arg(fx("mm_v3.ckpt"))
        .arg("--out")
        .arg(&out));
    assert!(text.contains("AnimateDiff v3"), "{text}");
    let v: serde_json::Value = serde_json::from_str(&ok(motionrt()
        .args(["inspect", "--json"])
        .arg(out.join("unet.onnx"))))
    .unwrap();
    let names: Vec<&str> = v["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["sample", "timestep", "encoder_hidden_states"]);
    assert_eq!(v["outputs"][0]["name"], "noise_pred");
    assert_eq!(
        v["inputs"][0]["dims"],
        serde_json::json!(["B", "4", "F", "h", "w"])
    );
    assert!(v["op_counts"]["Conv"].as_u64().unwrap() > 10);
    assert!(
        v["op_counts"]
            .as_object()
            .unwrap()
            .keys()
            .all(|k| !k.contains("::")),
        "standard ops only"
    );
    let text = ok(motionrt().arg("inspect").arg(out.join("unet.onnx")));
    assert!(text.contains("noise_pred"), "{text}");
}

#[test]
fn demo_writes_a_looping_gif() {
    let dir = tempfile::tempdir().unwrap();
    let text = ok(motionrt()
        .args([
            "demo", "--frames", "5", "--height", "32", "--width", "48", "--steps", "3", "--dir",
        ])
        .arg(dir.path()));
    assert!(text.contains("5 frames 48×32"), "{text}");
    for stage in ["text encoder", "denoise", "VAE decode", "s/step"] {
        assert!(text.contains(stage), "{text}");
    }
    let gif_path = dir.path().join("demo.gif");
    let mut opts = gif::DecodeOptions::new();
    opts.set_color_output(gif::ColorOutput::RGBA);
    let mut dec = opts
        .read_info(std::fs::File::open(&gif_path).expect("demo.gif exists"))
        .expect("a GIF");
    assert_eq!((dec.width(), dec.height()), (48, 32));
    let mut n = 0;
    let mut distinct = std::collections::HashSet::new();
    while let Some(f) = dec.read_next_frame().expect("frame decodes") {
        assert_eq!((f.width, f.height), (48, 32));
        distinct.extend(f.buffer.chunks(4).map(|p| p.to_vec()));
        n += 1;
    }
    assert_eq!(n, 5, "frame count");
    assert_eq!(dec.repeat(), gif::Repeat::Infinite, "the GIF loops");
    assert!(
        distinct.len() > 16,
        "frames are not flat: {} colours",
        distinct.len()
    );
}

/// A model directory exported once for the `run` tests.
fn demo_model() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    ok(motionrt()
        .args([
            "demo", "--frames", "2", "--height", "16", "--width", "16", "--steps", "1", "--dir",
        ])
        .arg(dir.path()));
    dir
}

/// `run` of one step, two 16×16 frames, on `model`, into `out`: expected to fail; its stderr.
fn run_fails(model: &Path, out: &Path) -> String {
    fails(
        motionrt()
            .args([
                "run", "--prompt", "a cat", "--steps", "1", "--frames", "2", "--height", "16",
                "--width", "16", "--model",
            ])
            .arg(model)
            .arg("--out")
            .arg(out),
    )
}

fn fails(cmd: &mut Command) -> String {
    let o = cmd.output().expect("motionrt runs");
    assert!(
        !o.status.success(),
        "expected failure, got success: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8(o.stderr).unwrap()
}

#[test]
fn run_writes_png_sequence_and_warns_on_long_prompts() {
    let d = demo_model();
    let model = d.path().join("export");
    let long = "a very long prompt with many many words ".repeat(12);
    let out = d.path().join("seq/clip.png");
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    let (_, stderr) = ok_with_stderr(
        motionrt()
            .args([
                "run", "--frames", "3", "--height", "16", "--width", "24", "--steps", "2",
                "--prompt", &long,
            ])
            .args([
                "--frame-prompt",
                &format!("2:{long}"),
                "--scheduler",
                "euler-a",
                "--model",
            ])
            .arg(&model)
            .arg("--out")
            .arg(&out),
    );
    // each long prompt is named by the option it came from
    assert!(stderr.contains("--prompt is "), "{stderr}");
    assert!(stderr.contains("--frame-prompt 2 is "), "{stderr}");
    assert!(!stderr.contains("--negative-prompt is"), "{stderr}");
    for i in 0..3 {
        let p = d.path().join(format!("seq/clip_{i:03}.png"));
        let dec = png::Decoder::new(std::io::BufReader::new(
            std::fs::File::open(&p).expect("png written"),
        ));
        let r = dec.read_info().expect("png decodes");
        assert_eq!((r.info().width, r.info().height), (24, 16));
    }
    assert!(!stderr.contains("named like this PNG sequence"), "{stderr}");
    // a shorter sequence over it: the third frame stays, named in a warning
    let (_, stderr) = ok_with_stderr(
        motionrt()
            .args([
                "run", "--frames", "2", "--height", "16", "--width", "24", "--steps", "1",
                "--prompt", "a cat", "--model",
            ])
            .arg(&model)
            .arg("--out")
            .arg(&out),
    );
    assert!(
        stderr.contains("1 other file(s) named like this PNG sequence")
            && stderr.contains("clip_002.png"),
        "{stderr}"
    );
    assert!(d.path().join("seq/clip_002.png").is_file());
}

#[test]
fn run_rejects_bad_input_clearly() {
    let d = demo_model();
    let model = d.path().join("export");
    let gif = d.path().join("x.gif");
    let run = |extra: &[&str]| {
        let mut c = motionrt();
        c.args(["run", "--prompt", "a cat", "--steps", "1"])
            .args(extra);
        c
    };
    // frames beyond the positional table
    let e = fails(
        run(&["--frames", "40", "--height", "16", "--width", "16"])
            .arg("--model")
            .arg(&model)
            .arg("--out")
            .arg(&gif),
    );
    assert!(e.contains("positional table") && e.contains("32"), "{e}");
    // size not divisible by 8
    let e = fails(
        run(&["--frames", "2", "--height", "20", "--width", "16"])
            .arg("--model")
            .arg(&model)
            .arg("--out")
            .arg(&gif),
    );
    assert!(e.contains("multiples of 8"), "{e}");
    // an output into a folder that does not exist: said as the other commands say it
    let e = fails(
        run(&["--frames", "2", "--height", "16", "--width", "16"])
            .arg("--model")
            .arg(&model)
            .arg("--out")
            .arg(d.path().join("nodir/x.gif")),
    );
    assert!(e.contains("--out") && e.contains("no such folder"), "{e}");
    // sizes no model or machine runs: an error, not an allocation failure, and no folder made
    let e = fails(
        run(&["--frames", "2", "--height", "4294967288", "--width", "16"])
            .arg("--model")
            .arg(&model)
            .arg("--out")
            .arg(d.path().join("seq/")),
    );
    assert!(e.contains("at most 4096"), "{e}");
    assert!(!d.path().join("seq").exists());
    // a guidance scale that is not a number
    let e = fails(
        run(&[
            "--frames",
            "2",
            "--height",
            "16",
            "--width",
            "16",
            "--guidance",
            "NaN",
        ])
        .arg("--model")
        .arg(&model)
        .arg("--out")
        .arg(&gif),
    );
    assert!(e.contains("--guidance") && e.contains("NaN"), "{e}");
    // missing model files
    let e = fails(
        run(&["--frames", "2"])
            .arg("--model")
            .arg(d.path().join("nope"))
            .arg("--out")
            .arg(&gif),
    );
    assert!(e.contains("model.json"), "{e}");
    std::fs::remove_file(model.join("vae_decoder.onnx")).unwrap();
    let e = fails(
        run(&["--frames", "2", "--height", "16", "--width", "16"])
            .arg("--model")
            .arg(&model)
            .arg("--out")
            .arg(&gif),
    );
    assert!(e.contains("vae_decoder.onnx") && e.contains("--vae"), "{e}");
    // unknown output format
    let e = fails(
        run(&["--frames", "2"])
            .arg("--model")
            .arg(&model)
            .arg("--out")
            .arg(d.path().join("x.avi")),
    );
    assert!(e.contains("unknown output format"), "{e}");
    // bad scheduler name
    let e = fails(
        run(&["--scheduler", "heun"])
            .arg("--model")
            .arg(&model)
            .arg("--out")
            .arg(&gif),
    );
    assert!(e.contains("--scheduler"), "{e}");
    // a run-time timing cache belongs to the native engine
    let e = fails(
        run(&["--timing-cache", "tc.json"])
            .arg("--model")
            .arg(&model)
            .arg("--out")
            .arg(&gif),
    );
    assert!(
        e.contains("--timing-cache") && e.contains("--engine"),
        "{e}"
    );
    assert!(!gif.exists(), "nothing written");
}

/// Loads `path` (an ONNX file), lets `edit` change its graph, and writes it back in place.
fn edit_graph(path: &Path, edit: impl FnOnce(&mut motionrt_export::onnx::proto::GraphProto)) {
    let mut m = motionrt_export::onnx::load_model(path).unwrap();
    edit(m.graph.as_mut().unwrap());
    motionrt_export::onnx::write_model(&m, path).unwrap();
}

/// A UNet that returns something other than the sample's shape: the run stops naming the file
/// and the shape it expected, without a panic, and writes no output.
#[test]
fn run_refuses_a_unet_output_of_another_shape() {
    use motionrt_export::onnx::attr_int;
    use motionrt_export::onnx::proto::NodeProto;
    let d = demo_model();
    let model = d.path().join("export");
    edit_graph(&model.join("unet.onnx"), |g| {
        // the noise prediction twice over along the batch: `[2B, C, F, h, w]`
        let out = g.output[0].name.clone();
        let inner = format!("{out}_once");
        for n in &mut g.node {
            for o in &mut n.output {
                if *o == out {
                    *o = inner.clone();
                }
            }
        }
        g.node.push(NodeProto {
            name: "twice".into(),
            op_type: "Concat".into(),
            input: vec![inner.clone(), inner],
            output: vec![out],
            attribute: vec![attr_int("axis", 0)],
            ..Default::default()
        });
        g.output[0].r#type = None;
    });
    let gif = d.path().join("twice.gif");
    let e = run_fails(&model, &gif);
    assert!(
        e.contains("unet.onnx returned")
            && e.contains("expected the sample's shape [2, 4, 2, 2, 2]"),
        "{e}"
    );
    assert!(!e.contains("panicked"), "{e}");
    assert!(!gif.exists(), "nothing written");
}

#[test]
fn a_failing_ffmpeg_stops_the_run_with_its_own_message() {
    use std::os::unix::fs::PermissionsExt;
    let d = demo_model();
    let model = d.path().join("export");
    // an `ffmpeg` first on PATH that answers `-version` and then refuses to encode
    let bin = d.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let ffmpeg = bin.join("ffmpeg");
    std::fs::write(
        &ffmpeg,
        "#!/bin/sh\n[ \"$1\" = -version ] && exit 0\necho 'fake ffmpeg: no encoder here' >&2\nexit 3\n",
    )
    .unwrap();
    std::fs::set_permissions(&ffmpeg, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mp4 = d.path().join("out.mp4");
    // 16 frames of 64×64 (196 KB of raw frames, more than a pipe holds), 4 a VAE call
    let e = fails(
        motionrt()
            .env("PATH", path)
            .args([
                "run",
                "--prompt",
                "a cat",
                "--steps",
                "1",
                "--frames",
                "16",
                "--height",
                "64",
                "--width",
                "64",
                "--decode-chunk",
                "4",
                "--model",
            ])
            .arg(&model)
            .arg("--out")
            .arg(&mp4),
    );
    assert!(
        e.contains("out.mp4") && e.contains("fake ffmpeg: no encoder here"),
        "{e}"
    );
    let left: Vec<_> = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("out.mp4"))
        .collect();
    assert!(left.is_empty(), "nothing written: {left:?}");
}

/// A model whose values overflow (here a VAE decoder weight made NaN, as an fp16 overflow
/// would leave it): the run stops with what overflowed, when, and what to try (a float32
/// export: not the float16 advice), and writes no output.
#[test]
fn run_says_where_values_overflow_and_what_to_try() {
    use motionrt_export::onnx::proto::TensorProtoDataType;
    let d = demo_model();
    let model = d.path().join("export");
    edit_graph(&model.join("vae_decoder.onnx"), |g| {
        let w = g
            .initializer
            .iter_mut()
            .find(|t| {
                t.name.contains("conv_out")
                    && t.data_type == TensorProtoDataType::Float as i32
                    && !t.raw_data.is_empty()
            })
            .expect("the decoder's conv_out weight, embedded");
        w.raw_data[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    });
    let gif = d.path().join("nan.gif");
    let e = run_fails(&model, &gif);
    assert!(
        e.contains("decoded frames")
            && e.contains("NaN/Inf")
            && e.contains("frames 0..")
            && e.contains("float32 export")
            && e.contains("weights"),
        "{e}"
    );
    assert!(!gif.exists(), "nothing written");
}

#[test]
fn run_without_onnx_runtime_says_how_to_install_it() {
    let d = tempfile::tempdir().unwrap();
    let e = fails(
        motionrt()
            .args(["run", "--prompt", "x", "--model"])
            .arg(d.path())
            .arg("--out")
            .arg(d.path().join("x.gif"))
            .env("ORT_DYLIB_PATH", d.path().join("missing/libonnxruntime.so"))
            .env("PATH", d.path()),
    );
    // model.json is checked first; give it one so the library lookup is reached.
    assert!(e.contains("model.json"), "{e}");
    let m = demo_model();
    let e = fails(
        motionrt()
            .args([
                "run", "--prompt", "x", "--frames", "2", "--height", "16", "--width", "16",
                "--model",
            ])
            .arg(m.path().join("export"))
            .arg("--out")
            .arg(d.path().join("x.gif"))
            .env("ORT_DYLIB_PATH", d.path().join("missing/libonnxruntime.so"))
            .env("PATH", d.path()),
    );
    assert!(
        e.contains("ONNX Runtime was not found") && e.contains("pip install onnxruntime"),
        "{e}"
    );
}

#[test]
fn mp4_needs_ffmpeg_or_says_so() {
    let m = demo_model();
    let out = m.path().join("v.mp4");
    let o = motionrt()
        .args([
            "run", "--prompt", "x", "--frames", "2", "--height", "16", "--width", "16", "--steps",
            "1", "--model",
        ])
        .arg(m.path().join("export"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let ffmpeg = std::process::Command::new("ffmpeg")
        .arg("-version")
        .output()
        .is_ok_and(|o| o.status.success());
    if ffmpeg {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let bytes = std::fs::read(&out).unwrap();
        assert_eq!(&bytes[4..8], b"ftyp");
    } else {
        println!("no ffmpeg on the PATH: checking the message");
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && e.contains("ffmpeg"), "{e}");
        assert!(!out.exists());
    }
}

#[test]
fn help_explains_the_commands() {
    let text = ok(motionrt().arg("--help"));
    for cmd in ["export", "inspect", "run", "bench", "demo"] {
        assert!(text.contains(cmd), "{text}");
    }
    let text = ok(motionrt().args(["export", "--help"]));
    assert!(
        text.contains("--semantics") && text.contains("--motion-module"),
        "{text}"
    );
    // the builder's choices a user of a GPU needs to know about
    let text = ok(motionrt().args(["build", "--help"]));
    for flag in [
        "--opt-shape",
        "--vae-chunk",
        "--timing-cache",
        "--no-kernel-tactics",
    ] {
        assert!(text.contains(flag), "{text}");
    }
}

#[test]
fn probe_lists_every_cuda_library_found_or_missing_without_panicking() {
    // Runs on machines with and without CUDA: each library is either found (a path or soname)
    // or missing with an install hint; a machine without a driver reports no GPU and an error.
    let v: serde_json::Value =
        serde_json::from_str(&ok(motionrt().args(["probe", "--json"]))).unwrap();
    let libs = v["cuda_libraries"].as_array().unwrap();
    let names: Vec<&str> = libs.iter().map(|l| l["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["driver", "nvrtc", "cudart", "cublas", "cublasLt", "cudnn"]
    );
    for l in libs {
        match l["found"].as_str() {
            Some(p) => assert!(!p.is_empty() && l["hint"].is_null(), "{l}"),
            None => assert!(
                l["hint"].as_str().is_some_and(|h| h.contains("install")),
                "{l}"
            ),
        }
    }
    let driver_missing = libs[0]["found"].is_null();
    if driver_missing {
        assert_eq!(v["gpus"], serde_json::json!([]));
        assert!(v["gpu_error"].as_str().unwrap().contains("libcuda"), "{v}");
    }
    let text = ok(motionrt().arg("probe"));
    assert!(text.contains("onnxruntime"), "{text}");
    assert_eq!(
        text.matches("MISSING").count(),
        libs.iter().filter(|l| l["found"].is_null()).count()
            + usize::from(v["onnxruntime"]["found"].is_null()),
        "{text}"
    );
    // the suite's ONNX Runtime (scripts/env.sh) is loaded, not only found
    let ort = &v["onnxruntime"];
    if std::env::var_os("ORT_DYLIB_PATH").is_some() {
        assert_eq!(ort["loaded"], true, "{ort}");
        assert!(
            ort["version"].as_str().is_some_and(|v| v.starts_with("1.")),
            "{ort}"
        );
        assert!(text.contains("loads"), "{text}");
    }
}

/// Output into a pipe whose reader has gone (`motionrt probe | head -1`): the process ends by
/// SIGPIPE, quietly, as `cat` does, not with a panic (Rust ignores SIGPIPE, so printing fails
/// with EPIPE).
#[test]
fn printing_into_a_closed_pipe_ends_quietly() {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let o = motionrt().arg("probe").stdout(writer).output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        o.status.signal(),
        Some(libc::SIGPIPE),
        "{:?} {stderr}",
        o.status
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// Ctrl-C during a run: the process ends with status 130 and removes its unfinished output
/// (the GIF's hidden temporary, opened before denoising starts); no GIF appears.
#[test]
fn an_interrupted_run_leaves_no_partial_file() {
    let m = demo_model();
    let out_dir = m.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let out = out_dir.join("long.gif");
    let mut child = motionrt()
        .args([
            "run", "--prompt", "x", "--frames", "4", "--height", "64", "--width", "64", "--steps",
            "500", "--model",
        ])
        .arg(m.path().join("export"))
        .arg("--out")
        .arg(&out)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let partial = || {
        std::fs::read_dir(&out_dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .find(|n| n.contains(".partial"))
    };
    let t = std::time::Instant::now();
    let name = loop {
        if let Some(n) = partial() {
            break n;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before its output was opened"
        );
        assert!(t.elapsed().as_secs() < 120, "no partial file appeared");
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    // a few steps in, then Ctrl-C (SIGINT, as a terminal sends it)
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the run ended too soon to interrupt"
    );
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let o = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains("interrupted: removed the unfinished output") && stderr.contains(&name),
        "{stderr}"
    );
    assert_eq!(partial(), None, "{stderr}");
    assert!(!out.exists());
}

/// Paths that motionrt records in JSON (model.json, plan.json, engine.json) must be UTF-8: a
/// clear error naming the option, not a panic or an error about a temporary file.
#[test]
fn non_utf8_paths_are_refused_naming_the_option() {
    use std::os::unix::ffi::OsStrExt;
    let m = demo_model();
    let odd = m.path().join(std::ffi::OsStr::from_bytes(b"exp\xff"));
    std::fs::rename(m.path().join("export"), &odd).unwrap();
    let e = fails(
        motionrt()
            .args(["build", "--plan-only", "--model"])
            .arg(&odd)
            .arg("--out")
            .arg(m.path().join("plan")),
    );
    assert!(
        e.contains("--model") && e.contains("not valid UTF-8"),
        "{e}"
    );
    assert!(!e.contains("panicked"), "{e}");
    let e = fails(
        motionrt()
            .arg("export")
            .arg("--unet")
            .arg(m.path().join(std::ffi::OsStr::from_bytes(b"sd\xff")))
            .arg("--out")
            .arg(m.path().join("x")),
    );
    assert!(e.contains("--unet") && e.contains("not valid UTF-8"), "{e}");
    assert!(!m.path().join("x").exists());
}

/// Thousands of ONNX Runtime threads would hang a run for hours: refused up front, by every
/// command that takes --threads.
#[test]
fn absurd_thread_counts_are_refused() {
    for cmd in [
        &["run", "--prompt", "x", "--model", "m", "--out", "x.gif"][..],
        &["bench", "--model", "m"],
        &["infer", "--model", "m", "--random", "--out", "x.npz"],
    ] {
        let e = fails(motionrt().args(cmd).args(["--threads", "10000"]));
        assert!(
            e.contains("--threads") && e.contains("at most"),
            "{cmd:?}: {e}"
        );
    }
}

/// --scheduler-config's `_class_name` picks the scheduler unless --scheduler does (a note says
/// which wins); a class motionrt lacks runs DDIM with the config's settings, said in a note; a
/// JSON file that is no scheduler config is refused.
#[test]
fn scheduler_config_names_the_scheduler() {
    let m = demo_model();
    let model = m.path().join("export");
    let cfg = m.path().join("scheduler_config.json");
    let gif = |name: &str, extra: &[&str]| -> (Vec<u8>, String) {
        let out = m.path().join(name);
        let (_, stderr) = ok_with_stderr(
            motionrt()
                .args([
                    "run", "--prompt", "a cat", "--frames", "2", "--height", "16", "--width", "16",
                    "--steps", "3", "--model",
                ])
                .arg(&model)
                .args(extra)
                .arg("--out")
                .arg(&out),
        );
        (std::fs::read(&out).unwrap(), stderr)
    };
    std::fs::write(&cfg, r#"{"_class_name": "EulerDiscreteScheduler"}"#).unwrap();
    let c = cfg.to_str().unwrap();
    let (named, _) = gif("named.gif", &["--scheduler-config", c]);
    let (euler, _) = gif("euler.gif", &["--scheduler", "euler"]);
    let (ddim, _) = gif("ddim.gif", &[]);
    assert_eq!(named, euler, "the config's class is used");
    assert_ne!(named, ddim);
    let (chosen, stderr) = gif(
        "chosen.gif",
        &["--scheduler-config", c, "--scheduler", "ddim"],
    );
    assert_eq!(chosen, ddim, "--scheduler wins");
    assert!(stderr.contains("replaces the euler scheduler"), "{stderr}");
    // SD1.5's own config names PNDM, which motionrt lacks: DDIM with its settings, said so
    std::fs::write(
        &cfg,
        r#"{"_class_name": "PNDMScheduler", "skip_prk_steps": true}"#,
    )
    .unwrap();
    let (pndm, stderr) = gif("pndm.gif", &["--scheduler-config", c]);
    assert_eq!(pndm, ddim);
    assert!(
        stderr.contains("PNDMScheduler") && stderr.contains("using ddim"),
        "{stderr}"
    );
    // a JSON object that is no scheduler config
    std::fs::write(&cfg, r#"{"foo": 1}"#).unwrap();
    let e = fails(
        motionrt()
            .args(["run", "--prompt", "x", "--model"])
            .arg(&model)
            .args(["--scheduler-config", c, "--out"])
            .arg(m.path().join("no.gif")),
    );
    assert!(
        e.contains("none of its keys") && e.contains("scheduler_config.json"),
        "{e}"
    );
}

/// --vae-config / --text-encoder-config describe single-file checkpoints: with a diffusers
/// folder (whose config.json describes its weights) they are refused, naming that file, rather
/// than misreading the weights.
#[test]
fn component_configs_are_refused_for_folders() {
    let m = demo_model();
    let cfg = m.path().join("junk.json");
    std::fs::write(&cfg, r#"{"block_out_channels": [512]}"#).unwrap();
    for flag in ["--vae-config", "--text-encoder-config"] {
        let e = fails(
            motionrt()
                .arg("export")
                .arg("--unet")
                .arg(m.path().join("sd"))
                .arg("--motion-module")
                .arg(m.path().join("mm_v2.safetensors"))
                .arg(flag)
                .arg(&cfg)
                .arg("--out")
                .arg(m.path().join("x")),
        );
        assert!(
            e.contains(flag) && e.contains("single-file") && e.contains("config.json"),
            "{e}"
        );
        assert!(!m.path().join("x").exists());
    }
}

/// A file where ONNX Runtime should be that is not a library: probe says it cannot be used and
/// why, and `run` fails naming it (before, probe reported it found).
#[test]
fn probe_and_run_name_an_onnx_runtime_that_does_not_load() {
    let d = tempfile::tempdir().unwrap();
    let fake = d.path().join("libonnxruntime.so.1.99.0");
    std::fs::write(&fake, b"not a shared library").unwrap();
    let v: serde_json::Value = serde_json::from_str(&ok(motionrt()
        .args(["probe", "--json"])
        .env("ORT_DYLIB_PATH", &fake)))
    .unwrap();
    let ort = &v["onnxruntime"];
    assert_eq!(ort["loaded"], false, "{ort}");
    assert_eq!(ort["found"].as_str(), fake.to_str(), "{ort}");
    assert!(
        ort["error"]
            .as_str()
            .unwrap()
            .contains("libonnxruntime.so.1.99.0"),
        "{ort}"
    );
    let text = ok(motionrt().arg("probe").env("ORT_DYLIB_PATH", &fake));
    assert!(
        text.lines()
            .any(|l| l.starts_with("onnxruntime") && l.contains("UNUSABLE")),
        "{text}"
    );
    let m = demo_model();
    let e = fails(
        motionrt()
            .args([
                "run", "--prompt", "x", "--frames", "2", "--height", "16", "--width", "16",
                "--model",
            ])
            .arg(m.path().join("export"))
            .arg("--out")
            .arg(d.path().join("x.gif"))
            .env("ORT_DYLIB_PATH", &fake),
    );
    assert!(
        e.contains("ONNX Runtime library") && e.contains("libonnxruntime.so.1.99.0"),
        "{e}"
    );
    assert!(!d.path().join("x.gif").exists());
}

/// The demo's options are checked before its model set is written: nothing is left in --dir.
#[test]
fn demo_refuses_bad_options_before_writing_its_model_set() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("demo");
    for (extra, says) in [
        (vec!["--steps", "0"], "--steps"),
        (vec!["--out", "x.avi"], "unknown output format"),
        (vec!["--out", "no/x.gif"], "no such folder"),
        (vec!["--height", "8192"], "at most 4096"),
    ] {
        let e = fails(motionrt().arg("demo").arg("--dir").arg(&dir).args(&extra));
        assert!(e.contains(says), "{extra:?}: {e}");
        assert!(!dir.exists(), "{extra:?}");
    }
    // an `export` folder there that is something else is refused before the model set is
    // written beside it
    std::fs::create_dir_all(dir.join("export")).unwrap();
    std::fs::write(dir.join("export/notes.txt"), "x").unwrap();
    let e = fails(motionrt().arg("demo").arg("--dir").arg(&dir));
    assert!(e.contains("not a motionrt export"), "{e}");
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(dir.join("export/notes.txt").is_file());
}

/// A hand-edited `model.json` that parses but cannot be right, and options that contradict
/// one another: an error naming the file or the flag, not a panic.
#[test]
fn run_refuses_an_inconsistent_model_json_and_duplicate_frame_prompts() {
    let d = demo_model();
    let model = d.path().join("export");
    let gif = d.path().join("x.gif");
    let json = model.join("model.json");
    let original = std::fs::read_to_string(&json).unwrap();
    let edit = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut v: serde_json::Value = serde_json::from_str(&original).unwrap();
        f(&mut v);
        std::fs::write(&json, v.to_string()).unwrap();
    };
    edit(&|v| v["format_version"] = 2.into());
    let e = run_fails(&model, &gif);
    assert!(e.contains("model.json") && e.contains("version 2"), "{e}");
    edit(&|v| v["latent_scale"] = 0.into());
    let e = run_fails(&model, &gif);
    assert!(
        e.contains("model.json") && e.contains("latent_scale"),
        "{e}"
    );
    edit(&|v| v["scaling_factor"] = 0.0.into());
    let e = run_fails(&model, &gif);
    assert!(e.contains("scaling_factor"), "{e}");
    // a UNet whose cross-attention width is not the text encoder's
    edit(&|v| v["unet_config"]["cross_attention_dim"] = 64.into());
    let e = run_fails(&model, &gif);
    assert!(
        e.contains("text_encoder.onnx") && e.contains("cross_attention_dim"),
        "{e}"
    );
    std::fs::write(&json, &original).unwrap();
    // a tokenizer with an id past the text encoder's embedding table
    let vocab = model.join("tokenizer/vocab.json");
    let text = std::fs::read_to_string(&vocab).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["h"] = 100000.into();
    std::fs::write(&vocab, v.to_string()).unwrap();
    let e = run_fails(&model, &gif);
    assert!(e.contains("tokenizer") && e.contains("100000"), "{e}");
    std::fs::write(&vocab, text).unwrap();
    let e = fails(
        motionrt()
            .args(["run", "--prompt", "a", "--steps", "1", "--frames", "2"])
            .args(["--height", "16", "--width", "16"])
            .args(["--frame-prompt", "1:b", "--frame-prompt", "1:c", "--model"])
            .arg(&model)
            .arg("--out")
            .arg(&gif),
    );
    assert!(e.contains("frame 1 is given two prompts"), "{e}");
    // the export's DDIM (leading spacing, steps_offset 1) cannot take 1000 steps of 1000
    let e = fails(
        motionrt()
            .args(["run", "--prompt", "a", "--steps", "1000", "--frames", "1"])
            .args(["--height", "8", "--width", "8", "--model"])
            .arg(&model)
            .arg("--out")
            .arg(&gif),
    );
    assert!(e.contains("leading") && e.contains("fewer steps"), "{e}");
    assert!(!gif.exists());
}
