//! `motionrt infer` and `motionrt compare`: .npy/.npz exchange with numpy (files numpy wrote),
//! seeded random inputs saved and replayed, clear errors for bad inputs, and comparisons that
//! give zero for identical configurations, a bounded error for fp32 vs fp16, and catch a
//! corrupted weight, with --mark-all naming the first diverging tensor.

use std::path::{Path, PathBuf};
use std::process::Command;

use motionrt_export::onnx::proto::TensorProtoDataType;
use motionrt_export::onnx::{load_model, write_model};
use motionrt_runtime::npy::{self, NpyData};
use serde_json::Value;

fn motionrt() -> Command {
    Command::new(env!("CARGO_BIN_EXE_motionrt"))
}

fn run(cmd: &mut Command) -> (bool, String, String) {
    let o = cmd.output().expect("motionrt runs");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn npz_fx(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/npz")
        .join(name)
}

/// The demo model set, exported (fp32), plus its UNet exported again in fp16.
struct Models {
    _dir: tempfile::TempDir,
    export: PathBuf,
    fp16: PathBuf,
}

fn models() -> Models {
    let dir = tempfile::tempdir().unwrap();
    let (ok, _, err) = run(motionrt()
        .args([
            "demo", "--frames", "2", "--height", "16", "--width", "16", "--steps", "1", "--dir",
        ])
        .arg(dir.path()));
    assert!(ok, "{err}");
    let fp16 = dir.path().join("fp16");
    let (ok, _, err) = run(motionrt()
        .args(["export", "--unet-only", "--precision", "fp16", "--unet"])
        .arg(dir.path().join("sd"))
        .arg("--motion-module")
        .arg(dir.path().join("mm_v2.safetensors"))
        .arg("--out")
        .arg(&fp16));
    assert!(ok, "{err}");
    Models {
        export: dir.path().join("export"),
        fp16: fp16.join("unet.onnx"),
        _dir: dir,
    }
}

const DIMS: &[&str] = &[
    "--dim", "B=2", "--dim", "F=3", "--dim", "h=4", "--dim", "w=6",
];

#[test]
fn reads_what_numpy_writes() {
    let exp: Value =
        serde_json::from_str(&std::fs::read_to_string(npz_fx("expected.json")).unwrap()).unwrap();
    let exp = exp["arrays"].as_object().unwrap();
    for source in ["savez.npz", "savez_compressed.npz", "npy"] {
        let arrays = npy::read_arrays(&npz_fx(source)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(arrays.len(), exp.len(), "{source}");
        for (name, a) in &arrays {
            let e = &exp[name.as_str()];
            assert_eq!(a.dtype, e["dtype"].as_str().unwrap(), "{source} {name}");
            let shape: Vec<usize> = e["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as usize)
                .collect();
            assert_eq!(a.shape, shape, "{source} {name}");
            let values = e["values"].as_array().unwrap();
            match &a.data {
                NpyData::F32(v) => {
                    assert_eq!(v.len(), values.len());
                    for (x, y) in v.iter().zip(values) {
                        let y = y.as_f64().unwrap() as f32;
                        assert!(x.to_bits() == y.to_bits(), "{source} {name}: {x} vs {y}");
                    }
                }
                NpyData::I64(v) => {
                    let want: Vec<i64> = values.iter().map(|x| x.as_i64().unwrap()).collect();
                    assert_eq!(v, &want, "{source} {name}");
                }
            }
        }
    }
}

#[test]
fn infer_random_inputs_are_saved_and_replay_exactly() {
    let m = models();
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("o.npz");
    let (ok, stdout, err) = run(motionrt()
        .args(["infer", "--random", "--seed", "3", "--model"])
        .arg(&m.export)
        .args(DIMS)
        .arg("--out")
        .arg(&out));
    assert!(ok, "{err}");
    assert!(stdout.contains("noise_pred"), "{stdout}");
    let saved = t.path().join("o.inputs.npz");
    let inputs = npy::read_npz(&saved).unwrap();
    let names: Vec<&str> = inputs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["sample", "timestep", "encoder_hidden_states"]);
    assert_eq!(inputs[0].1.shape, vec![2, 4, 3, 4, 6]);
    assert_eq!(inputs[1].1.shape, vec![2]);
    assert_eq!(inputs[2].1.shape, vec![6, 77, 32], "BF = B·F");
    let NpyData::F32(ts) = &inputs[1].1.data else {
        panic!("timestep is float")
    };
    assert!(ts
        .iter()
        .all(|t| t.fract() == 0.0 && (0.0..1000.0).contains(t)));
    let outputs = npy::read_npz(&out).unwrap();
    assert_eq!(outputs[0].0, "noise_pred");
    assert_eq!(outputs[0].1.shape, vec![2, 4, 3, 4, 6]);

    // same seed: same inputs, byte for byte; another seed: different ones
    let again = t.path().join("again.npz");
    let (ok, _, err) = run(motionrt()
        .args(["infer", "--random", "--seed", "3", "--model"])
        .arg(&m.export)
        .args(DIMS)
        .arg("--out")
        .arg(&again));
    assert!(ok, "{err}");
    assert_eq!(
        std::fs::read(&saved).unwrap(),
        std::fs::read(t.path().join("again.inputs.npz")).unwrap()
    );
    let other = t.path().join("other.npz");
    let (ok, _, err) = run(motionrt()
        .args(["infer", "--random", "--seed", "4", "--model"])
        .arg(&m.export)
        .args(DIMS)
        .arg("--out")
        .arg(&other));
    assert!(ok, "{err}");
    assert_ne!(
        npy::read_npz(&t.path().join("other.inputs.npz")).unwrap()[0],
        inputs[0]
    );

    // replay from the saved inputs, and from a directory of .npy files: identical outputs
    let npys = t.path().join("npys");
    std::fs::create_dir_all(&npys).unwrap();
    for (n, a) in &inputs {
        npy::write(&npys.join(format!("{n}.npy")), a).unwrap();
    }
    for src in [saved.clone(), npys] {
        let replay = t.path().join("replay.npz");
        let (ok, _, err) = run(motionrt()
            .args(["infer", "--graph"])
            .arg(m.export.join("unet.onnx"))
            .arg("--inputs")
            .arg(&src)
            .arg("--out")
            .arg(&replay));
        assert!(ok, "{err}");
        assert_eq!(
            npy::read_npz(&replay).unwrap(),
            outputs,
            "{}",
            src.display()
        );
    }

    // the text encoder: int64 token ids below the vocabulary from model.json
    let te = t.path().join("te.npz");
    let (ok, stdout, err) = run(motionrt()
        .args([
            "infer",
            "--random",
            "--graph-name",
            "text_encoder",
            "--dim",
            "N=3",
            "--json",
            "--model",
        ])
        .arg(&m.export)
        .arg("--out")
        .arg(&te));
    assert!(ok, "{err}");
    let j: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(j["outputs"][0]["shape"], serde_json::json!([3, 77, 32]));
    let ids = npy::read_npz(&t.path().join("te.inputs.npz")).unwrap();
    let NpyData::I64(ids) = &ids[0].1.data else {
        panic!("input_ids are int64")
    };
    let model: Value =
        serde_json::from_str(&std::fs::read_to_string(m.export.join("model.json")).unwrap())
            .unwrap();
    let vocab = model["text_encoder_config"]["vocab_size"].as_i64().unwrap();
    assert!(ids.iter().all(|&i| (0..vocab).contains(&i)));
    assert!(ids.iter().any(|&i| i > vocab / 2));
}

#[test]
fn infer_rejects_bad_inputs_listing_the_graph_inputs() {
    let m = models();
    let t = tempfile::tempdir().unwrap();
    let good = t.path().join("good.npz");
    let (ok, _, err) = run(motionrt()
        .args(["infer", "--random", "--model"])
        .arg(&m.export)
        .args(DIMS)
        .arg("--out")
        .arg(&good));
    assert!(ok, "{err}");
    let inputs = npy::read_npz(&t.path().join("good.inputs.npz")).unwrap();
    let graph = m.export.join("unet.onnx");
    let bad = t.path().join("bad.npz");
    let out = t.path().join("out.npz");
    let try_with = |arrays: Vec<(String, npy::NpyArray)>| -> String {
        npy::write_npz(&bad, &arrays).unwrap();
        let (ok, _, err) = run(motionrt()
            .args(["infer", "--graph"])
            .arg(&graph)
            .arg("--inputs")
            .arg(&bad)
            .arg("--out")
            .arg(&out));
        assert!(!ok);
        assert!(!out.exists(), "nothing written on error");
        err
    };
    let takes =
        "takes: sample float[B,4,F,h,w], timestep float[B], encoder_hidden_states float[BF,77,32]";
    // missing
    let err = try_with(inputs[..2].to_vec());
    assert!(
        err.contains("input `encoder_hidden_states` is missing") && err.contains(takes),
        "{err}"
    );
    // extra
    let mut extra = inputs.clone();
    extra.push(("noise".into(), npy::NpyArray::f32(vec![1], vec![0.0])));
    let err = try_with(extra);
    assert!(
        err.contains("`noise` is not an input") && err.contains(takes),
        "{err}"
    );
    // a fixed dimension wrong
    let mut shape = inputs.clone();
    shape[0].1 = npy::NpyArray::f32(vec![2, 3, 3, 4, 6], vec![0.0; 2 * 3 * 3 * 4 * 6]);
    let err = try_with(shape);
    assert!(
        err.contains("`sample` has shape [2, 3, 3, 4, 6]") && err.contains("dimension 1 must be 4"),
        "{err}"
    );
    // inconsistent symbolic size
    let mut sym = inputs.clone();
    sym[1].1 = npy::NpyArray::f32(vec![3], vec![1.0; 3]);
    let err = try_with(sym);
    assert!(err.contains("`B` is 2 in `sample` but 3 here"), "{err}");
    // BF (the per-frame text rows) not B·F
    let mut rows = inputs.clone();
    rows[2].1 = npy::NpyArray::f32(vec![5, 77, 32], vec![0.0; 5 * 77 * 32]);
    let err = try_with(rows);
    assert!(
        err.contains("BF = 5") && err.contains("make BF = 6"),
        "{err}"
    );
    // --dim BF against B and F
    let (ok, _, err) = run(motionrt()
        .args(["infer", "--random", "--graph"])
        .arg(&graph)
        .args(DIMS)
        .args(["--dim", "BF=5", "--out"])
        .arg(&out));
    assert!(
        !ok && err.contains("--dim BF=5") && err.contains("make BF = 6"),
        "{err}"
    );
    // wrong element type
    let mut ty = inputs.clone();
    ty[1].1 = npy::NpyArray::i64(vec![2], vec![1, 2]);
    let err = try_with(ty);
    assert!(
        err.contains("`timestep` is int64") && err.contains("float[B]"),
        "{err}"
    );
    // --random without the symbolic sizes
    let (ok, _, err) = run(motionrt()
        .args(["infer", "--random", "--graph"])
        .arg(&graph)
        .arg("--out")
        .arg(&out));
    assert!(!ok);
    assert!(
        err.contains("--dim B=N") && err.contains("--dim F=N"),
        "{err}"
    );
    // BF is named after B and F: not asked for
    assert!(!err.contains("--dim BF=N"), "{err}");
    // token ids past the vocabulary would fail inside the embedding's Gather
    let (ok, _, err) = run(motionrt()
        .args([
            "infer",
            "--random",
            "--graph-name",
            "text_encoder",
            "--dim",
            "N=1",
        ])
        .args(["--int-high", "100000", "--model"])
        .arg(&m.export)
        .arg("--out")
        .arg(&out));
    assert!(
        !ok && err.contains("--int-high 100000") && err.contains("vocabulary"),
        "{err}"
    );
    // neither --inputs nor --random
    let (ok, _, err) = run(motionrt()
        .args(["infer", "--graph"])
        .arg(&graph)
        .arg("--out")
        .arg(&out));
    assert!(!ok);
    assert!(err.contains("--inputs") && err.contains(takes), "{err}");
    // one graph does not run on the native engine: the error says what does
    let (ok, _, err) = run(motionrt()
        .args(["infer", "--backend", "cuda", "--graph"])
        .arg(&graph)
        .arg("--inputs")
        .arg(t.path().join("good.inputs.npz"))
        .arg("--out")
        .arg(&out));
    assert!(!ok);
    assert!(
        err.contains("motionrt build") && err.contains("run --engine"),
        "{err}"
    );
    // a symbolic size of 0 is refused before anything is drawn or saved
    let (ok, _, err) = run(motionrt()
        .args(["infer", "--random", "--dim", "B=0", "--graph"])
        .arg(&graph)
        .arg("--out")
        .arg(t.path().join("zero.npz")));
    assert!(!ok && err.contains("B=0"), "{err}");
    assert!(!t.path().join("zero.inputs.npz").exists());
}

fn compare_json(args: &[&std::ffi::OsStr]) -> (bool, Value) {
    let (ok, stdout, err) = run(motionrt().arg("compare").args(args).arg("--json"));
    let v: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}\n{err}"));
    (ok, v)
}

#[test]
fn compare_identical_fp16_and_corrupted() {
    let m = models();
    let t = tempfile::tempdir().unwrap();
    let inputs = t.path().join("in.npz");
    let first = t.path().join("first.npz");
    let (ok, _, err) = run(motionrt()
        .args(["infer", "--random", "--seed", "11", "--model"])
        .arg(&m.export)
        .args(DIMS)
        .arg("--save-inputs")
        .arg(&inputs)
        .arg("--out")
        .arg(&first));
    assert!(ok, "{err}");
    let fp32 = m.export.join("unet.onnx");
    let inp = ["--inputs".as_ref(), inputs.as_os_str()];

    // identical configurations: zero error, graph vs graph and graph vs saved outputs
    for (r, s) in [(&fp32, &fp32), (&fp32, &first)] {
        let (ok, v) = compare_json(&[r.as_os_str(), s.as_os_str(), inp[0], inp[1]]);
        assert!(ok, "{v}");
        let o = &v["outputs"][0];
        assert_eq!(o["name"], "noise_pred");
        assert_eq!(o["max_abs"], 0.0);
        assert_eq!(o["mean_abs"], 0.0);
        assert_eq!(o["violations"], 0);
        assert!((o["cosine"].as_f64().unwrap() - 1.0).abs() < 1e-12);
        assert_eq!(v["pass"], true);
    }

    // fp32 vs fp16: a non-zero error, bounded by fp16's precision
    let (ok, v) = compare_json(&[fp32.as_os_str(), m.fp16.as_os_str(), inp[0], inp[1]]);
    assert!(!ok, "default tolerances are fp32-tight: {v}");
    let o = &v["outputs"][0];
    let rel = o["max_rel_to_ref_max"].as_f64().unwrap();
    assert!(rel > 1e-5 && rel < 1e-2, "fp16 error {rel}");
    assert!(o["cosine"].as_f64().unwrap() > 0.9999);
    assert_eq!(o["nonfinite_test"], 0);
    let (ok, table, err) = run(motionrt()
        .arg("compare")
        .arg(&fp32)
        .arg(&m.fp16)
        .args(inp)
        .args(["--atol", "0.05", "--rtol", "0.01"]));
    assert!(ok, "{table}{err}");
    assert!(table.contains("PASS: 1 output(s)"), "{table}");
    // node names count per scope and op, so the fp16 graph's extra Casts leave the other
    // tensors matched by name: --mark-all compares them across precisions
    let (_, v) = compare_json(&[
        fp32.as_os_str(),
        m.fp16.as_os_str(),
        inp[0],
        inp[1],
        "--mark-all".as_ref(),
        "--atol".as_ref(),
        "0.05".as_ref(),
        "--rtol".as_ref(),
        "0.01".as_ref(),
    ]);
    assert!(v["intermediates_compared"].as_u64().unwrap() > 100, "{v}");
    assert_eq!(v["intermediates_not_comparable"], 0);

    // standard vs fused attention (com.motionrt.TemporalAttention): fp32 rounding only
    let fused_dir = m.export.parent().unwrap().join("fused");
    let (ok, _, err) = run(motionrt()
        .args(["export", "--unet-only", "--fused-attention", "--unet"])
        .arg(m.export.parent().unwrap().join("sd"))
        .arg("--motion-module")
        .arg(m.export.parent().unwrap().join("mm_v2.safetensors"))
        .arg("--out")
        .arg(&fused_dir));
    assert!(ok, "{err}");
    let fused = fused_dir.join("unet.onnx");
    let (ok, v) = compare_json(&[
        fp32.as_os_str(),
        fused.as_os_str(),
        inp[0],
        inp[1],
        "--mark-all".as_ref(),
    ]);
    assert!(ok, "{v}");
    let o = &v["outputs"][0];
    assert!(o["max_rel_to_ref_max"].as_f64().unwrap() < 1e-5, "{o}");
    assert!(
        o["max_abs"].as_f64().unwrap() > 0.0,
        "different kernels, not a copy"
    );
    assert_eq!(v["intermediates_failed"], 0);
    assert!(v["intermediates_compared"].as_u64().unwrap() > 100);

    // a graph with its weights in an external data file: --mark-all marks a copy beside it
    // (ONNX Runtime reads external data only from the model's directory) and removes it after
    let ext_dir = m.export.parent().unwrap().join("external");
    let (ok, _, err) = run(motionrt()
        .args([
            "export",
            "--unet-only",
            "--external-data",
            "always",
            "--unet",
        ])
        .arg(m.export.parent().unwrap().join("sd"))
        .arg("--motion-module")
        .arg(m.export.parent().unwrap().join("mm_v2.safetensors"))
        .arg("--out")
        .arg(&ext_dir));
    assert!(ok, "{err}");
    let ext = ext_dir.join("unet.onnx");
    let (ok, v) = compare_json(&[
        ext.as_os_str(),
        fp32.as_os_str(),
        inp[0],
        inp[1],
        "--mark-all".as_ref(),
    ]);
    assert!(ok, "{v}");
    assert_eq!(v["outputs"][0]["max_abs"], 0.0);
    assert!(v["intermediates_compared"].as_u64().unwrap() > 100);
    let mut left: Vec<String> = std::fs::read_dir(&ext_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(
        left,
        ["model.json", "unet.onnx", "unet.onnx.data"],
        "temporary copies removed"
    );

    // a corrupted weight: an up-block ResNet's second convolution (added to the residual, so no
    // normalisation hides it) with a pattern added to its values
    let mut model = load_model(&fp32).unwrap();
    let g = model.graph.as_mut().unwrap();
    let (ti, weight) = g
        .initializer
        .iter()
        .enumerate()
        .find(|(_, t)| {
            t.name.starts_with("up_blocks.1.")
                && t.name.ends_with("conv2.weight")
                && t.data_type == TensorProtoDataType::Float as i32
        })
        .map(|(i, t)| (i, t.name.clone()))
        .expect("an up-block conv weight");
    let raw = &mut g.initializer[ti].raw_data;
    assert!(!raw.is_empty(), "weights embedded as raw data");
    for (k, c) in raw.chunks_exact_mut(4).enumerate() {
        let v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]) + 0.05 * ((k % 7) as f32 - 3.0);
        c.copy_from_slice(&v.to_le_bytes());
    }
    // the first node (in graph order) that reads the weight makes the first diverging tensor
    let first_reader = g
        .node
        .iter()
        .find(|n| n.input.iter().any(|i| i == &weight))
        .map(|n| n.output[0].clone())
        .unwrap();
    let bad = t.path().join("corrupted.onnx");
    write_model(&model, &bad).unwrap();

    let (ok, table, _) = run(motionrt().arg("compare").arg(&fp32).arg(&bad).args(inp));
    assert!(!ok, "{weight}: {table}");
    assert!(table.contains("FAIL"), "{table}");
    let (ok, v) = compare_json(&[
        fp32.as_os_str(),
        bad.as_os_str(),
        inp[0],
        inp[1],
        "--mark-all".as_ref(),
    ]);
    assert!(!ok);
    assert!(
        v["intermediates_compared"].as_u64().unwrap() > 100,
        "{}",
        v["intermediates_compared"]
    );
    assert_eq!(v["intermediates_not_comparable"], 0);
    let d = &v["first_divergence"];
    assert_eq!(d["name"].as_str().unwrap(), first_reader, "{d}");
    assert!(d["max_abs"].as_f64().unwrap() > 0.0);
    // and the same comparison of identical graphs marks nothing
    let (ok, v) = compare_json(&[
        fp32.as_os_str(),
        fp32.as_os_str(),
        inp[0],
        inp[1],
        "--mark-all".as_ref(),
    ]);
    assert!(ok, "{v}");
    assert!(v["first_divergence"].is_null());
    assert_eq!(v["intermediates_failed"], 0);

    // errors
    let (ok, _, err) = run(motionrt()
        .arg("compare")
        .arg(&first)
        .arg(&bad)
        .arg("--mark-all"));
    assert!(!ok);
    assert!(err.contains("--mark-all needs two ONNX graphs"), "{err}");
    let (ok, _, err) = run(motionrt()
        .arg("compare")
        .arg(&fp32)
        .arg(t.path().join("x.txt")));
    assert!(!ok);
    assert!(
        err.contains("x.txt: expected an ONNX graph (.onnx) or saved outputs (.npz)"),
        "{err}"
    );
}

#[test]
fn numpy_reads_the_saved_inputs_and_motionrt_reads_numpys_copy() {
    let py = [
        std::env::var("MOTIONRT_PYTHON").ok(),
        Some("python3".into()),
    ]
    .into_iter()
    .flatten()
    .find(|py| {
        Command::new(py)
            .args(["-c", "import numpy"])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    let Some(py) = py else {
        if std::env::var_os("CI").is_some() {
            panic!("numpy is required in CI (scripts/env.sh installs it)");
        }
        eprintln!("SKIP: no python with numpy (run ./scripts/test)");
        return;
    };
    let m = models();
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("o.npz");
    let (ok, _, err) = run(motionrt()
        .args(["infer", "--random", "--seed", "9", "--model"])
        .arg(&m.export)
        .args(DIMS)
        .arg("--out")
        .arg(&out));
    assert!(ok, "{err}");
    let te = t.path().join("te.npz");
    let (ok, _, err) = run(motionrt()
        .args([
            "infer",
            "--random",
            "--graph-name",
            "text-encoder", // as `bench --graph` spells it
            "--dim",
            "N=2",
            "--model",
        ])
        .arg(&m.export)
        .arg("--out")
        .arg(&te));
    assert!(ok, "{err}");
    for (saved, want) in [
        (
            t.path().join("o.inputs.npz"),
            r#"{"sample": ["<f4", [2, 4, 3, 4, 6]], "timestep": ["<f4", [2]], "encoder_hidden_states": ["<f4", [6, 77, 32]]}"#,
        ),
        (out.clone(), r#"{"noise_pred": ["<f4", [2, 4, 3, 4, 6]]}"#),
        (
            t.path().join("te.inputs.npz"),
            r#"{"input_ids": ["<i8", [2, 77]]}"#,
        ),
    ] {
        let back = t.path().join("back.npz");
        let o = Command::new(&py)
            .arg(npz_fx("roundtrip.py"))
            .arg(&saved)
            .arg(&back)
            .arg(want)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        // numpy's sums agree with ours
        let sums: Value = serde_json::from_slice(&o.stdout).unwrap();
        let ours = npy::read_npz(&saved).unwrap();
        for (name, a) in &ours {
            let s: f64 = match &a.data {
                NpyData::F32(v) => v.iter().map(|&x| x as f64).sum(),
                NpyData::I64(v) => v.iter().map(|&x| x as f64).sum(),
            };
            let theirs = sums[name.as_str()][2].as_f64().unwrap();
            assert!(
                (s - theirs).abs() <= 1e-9 * s.abs().max(1.0),
                "{name}: {s} vs {theirs}"
            );
        }
        // numpy's compressed copy reads back identical
        assert_eq!(npy::read_npz(&back).unwrap(), ours, "{}", saved.display());
        let (ok, stdout, err) = run(motionrt()
            .arg("compare")
            .arg(&saved)
            .arg(&back)
            .args(["--atol", "0", "--rtol", "0"]));
        assert!(ok, "{stdout}{err}");
    }
}

/// Two saved outputs holding the same NaNs do not compare as a pass (two runs that both
/// overflowed agree on nothing worth checking), and the input options, which feed a graph, are
/// refused when neither side is one.
#[test]
fn compare_fails_on_nan_and_refuses_input_options_without_a_graph() {
    let t = tempfile::tempdir().unwrap();
    let arr = |v: Vec<f32>| npy::NpyArray {
        shape: vec![v.len()],
        data: NpyData::F32(v),
        dtype: "<f4".into(),
    };
    let (a, b) = (t.path().join("a.npz"), t.path().join("b.npz"));
    let half_nan = vec![1.0, f32::NAN, 2.0, f32::NAN];
    npy::write_npz(&a, &[("out".into(), arr(half_nan.clone()))]).unwrap();
    npy::write_npz(&b, &[("out".into(), arr(half_nan))]).unwrap();
    let (ok, v) = compare_json(&[a.as_os_str(), b.as_os_str()]);
    assert!(!ok, "{v}");
    let o = &v["outputs"][0];
    assert_eq!(
        (o["nonfinite_ref"].as_u64(), o["pass"].as_bool()),
        (Some(2), Some(false))
    );
    assert!(o["note"].as_str().unwrap().contains("NaN"), "{o}");
    let (ok, _, err) = run(motionrt().arg("compare").arg(&a).arg(&b));
    assert!(!ok && err.contains("NaN/Inf"), "{err}");
    // finite and equal: a pass
    npy::write_npz(&a, &[("out".into(), arr(vec![1.0, 2.0]))]).unwrap();
    npy::write_npz(&b, &[("out".into(), arr(vec![1.0, 2.0]))]).unwrap();
    let (ok, v) = compare_json(&[a.as_os_str(), b.as_os_str()]);
    assert!(ok, "{v}");
    for extra in [&["--random"][..], &["--inputs", "x.npz"], &["--dim", "B=1"]] {
        let (ok, _, err) = run(motionrt().arg("compare").arg(&a).arg(&b).args(extra));
        assert!(
            !ok && err.contains("both sides here are saved outputs"),
            "{extra:?}: {err}"
        );
    }
}
