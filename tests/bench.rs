//! `motionrt bench` as users and bench/compare/compare.py meet it: the JSON report (schema
//! motionrt.bench/1, docs/bench-schema.md), percentiles recomputed from the recorded samples,
//! warm-up runs excluded, a failing stage reported as an error with the other stages' numbers
//! kept, graph mode, `--compare`, and the worker protocol.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use motionrt_runtime::npy::{self, NpyArray};
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

/// A demo model set (tiny UNet + v2 motion module, VAE, text encoder, tokenizer), exported.
fn demo_export() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let (ok, _, err) = run(motionrt()
        .args([
            "demo", "--frames", "2", "--height", "16", "--width", "16", "--steps", "1", "--dir",
        ])
        .arg(dir.path()));
    assert!(ok, "{err}");
    let export = dir.path().join("export");
    (dir, export)
}

const SMALL: &[&str] = &[
    "--frames",
    "4",
    "--height",
    "32",
    "--width",
    "48",
    "--steps",
    "3",
    "--threads",
    "1",
];

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).expect("report written")).expect("JSON")
}

fn numpy_linear_quantile(sorted: &[f64], q: f64) -> f64 {
    let r = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (r.floor() as usize, r.ceil() as usize);
    sorted[lo] + (r - lo as f64) * (sorted[hi] - sorted[lo])
}

/// Stats recomputed from `samples_s` must equal the reported ones.
fn check_stage(name: &str, s: &Value, n: usize) {
    assert_eq!(s["status"], "ok", "{name}: {s}");
    assert!(s["error"].is_null());
    let samples: Vec<f64> = s["samples_s"]
        .as_array()
        .unwrap_or_else(|| panic!("{name}: samples_s"))
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(samples.len(), n, "{name}: samples");
    assert!(
        samples.iter().all(|&x| x > 0.0 && x < 600.0),
        "{name}: {samples:?}"
    );
    let mut sorted = samples.clone();
    sorted.sort_by(f64::total_cmp);
    let st = &s["stats"];
    assert_eq!(st["n"].as_u64(), Some(n as u64));
    let get = |k: &str| {
        st[k]
            .as_f64()
            .unwrap_or_else(|| panic!("{name}: stats.{k}"))
    };
    assert_eq!(get("min"), sorted[0]);
    assert_eq!(get("max"), sorted[n - 1]);
    for (k, q) in [("median", 0.5), ("p90", 0.9), ("p99", 0.99)] {
        let want = numpy_linear_quantile(&sorted, q);
        assert!(
            (get(k) - want).abs() <= 1e-12 * want.abs().max(1.0),
            "{name}: {k} {} vs {want}",
            get(k)
        );
    }
    let mean = samples.iter().sum::<f64>() / n as f64;
    assert!((get("mean") - mean).abs() < 1e-12);
    assert!(
        s["first_run_s"].as_f64().is_some_and(|x| x > 0.0),
        "{name}: first_run_s"
    );
}

#[test]
fn pipeline_report_follows_the_schema() {
    let (_d, model) = demo_export();
    let out = tempfile::tempdir().unwrap();
    let json = out.path().join("r.json");
    let (ok, stdout, err) = run(motionrt()
        .args(["bench", "--model"])
        .arg(&model)
        .args(SMALL)
        .args(["--warmup", "2", "--runs", "3", "--seed", "5", "--json"])
        .arg(&json));
    assert!(ok, "{err}");
    // the table
    for s in [
        "text_encoder",
        "unet_step",
        "vae_decode",
        "end_to_end",
        "median",
        "p99",
        "peak host memory",
        "videos/min",
    ] {
        assert!(stdout.contains(s), "{s} missing from\n{stdout}");
    }
    let r = read_json(&json);
    assert_eq!(r["schema"], "motionrt.bench/1");
    assert!(r["ok"].as_bool().unwrap());
    let created = r["created"].as_str().unwrap();
    assert!(
        created.len() == 20 && created.ends_with('Z') && created.as_bytes()[10] == b'T',
        "{created}"
    );
    assert!(r["machine"]["cores"].as_u64().unwrap() >= 1);
    assert!(!r["machine"]["cpu"].as_str().unwrap().is_empty());
    assert!(r["machine"]["gpu"].is_null());
    assert!(r["versions"]["motionrt"].is_string());
    assert!(!r["versions"]["git_revision"].as_str().unwrap().is_empty());
    assert!(r["versions"]["backend"].as_str().unwrap().starts_with("1."));
    assert_eq!(r["backend"], "onnxruntime-cpu");
    assert_eq!(r["precision"], "fp32");
    let c = &r["config"];
    assert_eq!(c["mode"], "pipeline");
    assert!(c["graph"].is_null());
    for (k, v) in [
        ("frames", 4),
        ("height", 32),
        ("width", 48),
        ("steps", 3),
        ("warmup", 2),
        ("runs", 3),
        ("seed", 5),
        ("threads", 1),
        ("batch", 1),
    ] {
        assert_eq!(c[k].as_u64(), Some(v), "config.{k}");
    }
    for k in ["unet", "text_encoder", "vae_decoder", "total"] {
        assert!(
            r["load_s"][k].as_f64().is_some_and(|x| x > 0.0),
            "load_s.{k}"
        );
    }
    // warm-up runs excluded: 3 timed runs; every UNet step of them is a sample
    let st = &r["stages"];
    for (name, n) in [
        ("text_encoder", 3),
        ("unet_step", 9),
        ("unet_total", 3),
        ("vae_decode", 3),
        ("time_to_first_frame", 3),
        ("end_to_end", 3),
    ] {
        check_stage(name, &st[name], n);
    }
    assert_eq!(st.as_object().unwrap().len(), 6);
    // the parts fit inside the whole, run by run
    let e2e = st["end_to_end"]["samples_s"].as_array().unwrap();
    let unet = st["unet_total"]["samples_s"].as_array().unwrap();
    for (e, u) in e2e.iter().zip(unet) {
        assert!(u.as_f64().unwrap() < e.as_f64().unwrap());
    }
    let med = st["end_to_end"]["stats"]["median"].as_f64().unwrap();
    let fps = r["throughput"]["frames_per_s"].as_f64().unwrap();
    assert!((fps - 4.0 / med).abs() < 1e-9 * fps);
    let vpm = r["throughput"]["videos_per_min"].as_f64().unwrap();
    assert!((vpm - 60.0 / med).abs() < 1e-9 * vpm);
    assert!(r["memory"]["peak_host_bytes"].as_u64().unwrap() > 1 << 20);
    assert!(r["memory"]["peak_device_bytes"].is_null());

    // bare --json prints only the JSON, on stdout
    let (ok, stdout, err) = run(motionrt()
        .args(["bench", "--model"])
        .arg(&model)
        .args(SMALL)
        .args(["--warmup", "0", "--runs", "1", "--json"]));
    assert!(ok, "{err}");
    let r: Value = serde_json::from_str(&stdout).expect("stdout is the JSON report");
    // without warm-up the first run is both the cold figure and a sample
    let te = &r["stages"]["text_encoder"];
    assert_eq!(te["first_run_s"], te["samples_s"][0]);
}

#[test]
fn failing_stage_reports_an_error_instead_of_numbers() {
    let (_d, model) = demo_export();
    // A decoder that is a valid graph but takes other inputs: it loads, then fails to run.
    std::fs::copy(
        model.join("text_encoder.onnx"),
        model.join("vae_decoder.onnx"),
    )
    .unwrap();
    let out = tempfile::tempdir().unwrap();
    let json = out.path().join("r.json");
    let (ok, stdout, err) = run(motionrt()
        .args(["bench", "--model"])
        .arg(&model)
        .args(SMALL)
        .args(["--warmup", "1", "--runs", "2", "--json"])
        .arg(&json));
    assert!(!ok, "a failed stage must fail the command");
    assert!(
        err.contains("vae_decode") && err.contains("vae_decoder.onnx"),
        "{err}"
    );
    assert!(stdout.contains("ERROR"), "{stdout}");
    let r = read_json(&json);
    assert_eq!(r["ok"], false);
    let st = &r["stages"];
    let v = &st["vae_decode"];
    assert_eq!(v["status"], "error");
    assert!(v["stats"].is_null() && v["samples_s"].as_array().unwrap().is_empty());
    let msg = v["error"].as_str().unwrap();
    assert!(
        msg.contains("vae_decoder.onnx") && msg.contains("input_ids"),
        "{msg}"
    );
    for s in ["end_to_end", "time_to_first_frame"] {
        assert_eq!(st[s]["status"], "error");
        assert_eq!(st[s]["error"], "not run: vae_decode failed");
        assert!(st[s]["stats"].is_null());
    }
    // the stages before the decoder still report every timed run
    check_stage("text_encoder", &st["text_encoder"], 2);
    check_stage("unet_step", &st["unet_step"], 6);
    check_stage("unet_total", &st["unet_total"], 2);
    assert!(r["throughput"]["frames_per_s"].is_null());

    // graph mode on the same broken decoder
    let (ok, _, err) = run(motionrt()
        .args(["bench", "--graph", "vae-decoder", "--model"])
        .arg(&model)
        .args(SMALL)
        .args(["--json"])
        .arg(&json));
    assert!(!ok);
    assert!(err.contains("vae_decode"), "{err}");
    let r = read_json(&json);
    assert_eq!(r["stages"]["vae_decode"]["status"], "error");

    // a report that could not be written is refused before the timing, not after it
    let (ok, stdout, err) = run(motionrt()
        .args(["bench", "--model"])
        .arg(&model)
        .args(SMALL)
        .args(["--json"])
        .arg(out.path().join("no/r.json")));
    assert!(!ok && err.contains("no such folder"), "{err}");
    assert!(!stdout.contains("text_encoder"), "{stdout}");
    let (ok, stdout, err) = run(motionrt()
        .args(["bench", "--model"])
        .arg(&model)
        .args(SMALL)
        .args(["--json"])
        .arg(out.path()));
    assert!(!ok && err.contains("a folder has this name"), "{err}");
    assert!(!stdout.contains("text_encoder"), "{stdout}");
}

#[test]
fn graph_mode_and_compare() {
    let (_d, model) = demo_export();
    let out = tempfile::tempdir().unwrap();
    let a = out.path().join("a.json");
    let b = out.path().join("b.json");
    let (ok, _, err) = run(motionrt()
        .args(["bench", "--graph", "unet", "--model"])
        .arg(&model)
        .args(SMALL)
        .args(["--runs", "4", "--json"])
        .arg(&a));
    assert!(ok, "{err}");
    let ra = read_json(&a);
    assert_eq!(ra["config"]["mode"], "graph");
    assert_eq!(ra["config"]["graph"], "unet");
    assert_eq!(ra["config"]["batch"], 2);
    assert_eq!(ra["stages"].as_object().unwrap().len(), 1);
    check_stage("unet_step", &ra["stages"]["unet_step"], 4);
    assert!(ra["load_s"]["unet"].as_f64().unwrap() > 0.0);

    let (ok, _, err) = run(motionrt()
        .args([
            "bench",
            "--graph",
            "text_encoder", // as the graph file and `infer --graph-name` spell it
            "--batch",
            "3",
            "--model",
        ])
        .arg(&model)
        .args(["--runs", "2", "--json"])
        .arg(&b));
    assert!(ok, "{err}");
    let rb = read_json(&b);
    assert_eq!(rb["config"]["batch"], 3);
    check_stage("text_encoder", &rb["stages"]["text_encoder"], 2);

    // a second UNet report at batch 1, then the comparison
    let (ok, _, err) = run(motionrt()
        .args(["bench", "--graph", "unet", "--batch", "1", "--model"])
        .arg(&model)
        .args(SMALL)
        .args(["--runs", "3", "--json"])
        .arg(&b));
    assert!(ok, "{err}");
    let rb = read_json(&b);
    let (ok, table, err) = run(motionrt().args(["bench", "--compare"]).arg(&a).arg(&b));
    assert!(ok, "{err}");
    assert!(
        table.contains("B/A") && table.contains("unet_step"),
        "{table}"
    );
    assert!(
        table.contains("settings that differ: batch 2 vs 1"),
        "{table}"
    );
    let (ok, rows, err) = run(motionrt()
        .args(["bench", "--compare"])
        .arg(&a)
        .arg(&b)
        .args(["--json", "-"]));
    assert!(ok, "{err}");
    let rows: Value = serde_json::from_str(&rows).unwrap();
    let row = &rows[0];
    assert_eq!(row["stage"], "unet_step");
    let ma = ra["stages"]["unet_step"]["stats"]["median"]
        .as_f64()
        .unwrap();
    let mb = rb["stages"]["unet_step"]["stats"]["median"]
        .as_f64()
        .unwrap();
    assert_eq!(row["a_median_s"].as_f64(), Some(ma));
    assert!((row["ratio"].as_f64().unwrap() - mb / ma).abs() < 1e-12);

    // not a report
    let bad = out.path().join("bad.json");
    std::fs::write(&bad, "{\"hello\": 1}").unwrap();
    let (ok, _, err) = run(motionrt().args(["bench", "--compare"]).arg(&a).arg(&bad));
    assert!(!ok);
    assert!(
        err.contains("bad.json") && err.contains("not a motionrt bench report"),
        "{err}"
    );
}

#[test]
fn bench_rejects_bad_settings() {
    let (_d, model) = demo_export();
    let (ok, _, err) = run(motionrt()
        .args(["bench", "--model"])
        .arg(&model)
        .args(["--height", "30", "--runs", "1"]));
    assert!(!ok);
    assert!(err.contains("multiples of 8"), "{err}");
    let (ok, _, err) = run(motionrt()
        .args(["bench", "--graph", "unet", "--model"])
        .arg(&model)
        .args(["--frames", "999", "--height", "16", "--width", "16"]));
    assert!(!ok);
    assert!(err.contains("positional table"), "{err}");
    let (ok, _, err) = run(motionrt()
        .args(["bench", "--batch", "4", "--model"])
        .arg(&model)
        .args(SMALL));
    assert!(!ok);
    assert!(err.contains("--batch applies to --graph"), "{err}");
    let (ok, _, err) = run(motionrt().args(["bench", "--model", "/nonexistent/dir"]));
    assert!(!ok);
    assert!(err.contains("/nonexistent/dir/model.json"), "{err}");
}

#[test]
fn bench_engine_is_checked_before_anything_loads() {
    let d = tempfile::tempdir().unwrap();
    let (ok, _, err) = run(motionrt().args(["bench", "--engine"]).arg(d.path()));
    assert!(!ok);
    assert!(
        err.contains("no engine.json") && err.contains("motionrt build"),
        "{err}"
    );
    std::fs::write(d.path().join("engine.json"), "{}").unwrap();
    let (ok, _, err) = run(motionrt()
        .args(["bench", "--graph", "unet", "--engine"])
        .arg(d.path()));
    assert!(!ok);
    assert!(
        err.contains("--graph") && err.contains("unet_step"),
        "{err}"
    );
    let (ok, _, err) = run(motionrt().args(["bench", "--model"]).arg(d.path()));
    assert!(!ok);
    assert!(
        err.contains("this is an engine") && err.contains("--engine"),
        "{err}"
    );
    // a manifest that is not one: the error names the file
    let (ok, _, err) = run(motionrt().args(["bench", "--engine"]).arg(d.path()));
    assert!(!ok);
    assert!(
        err.contains("engine.json") && err.contains("not a motionrt engine manifest"),
        "{err}"
    );
    let (ok, _, err) = run(motionrt()
        .args(["bench", "--model", "m", "--engine"])
        .arg(d.path()));
    assert!(!ok);
    assert!(err.contains("cannot be used with"), "{err}");
}

#[test]
fn worker_protocol_runs_given_noise() {
    let (_d, model) = demo_export();
    let tmp = tempfile::tempdir().unwrap();
    let noise = tmp.path().join("noise.npy");
    // [1, 4, 4, 4, 6] for 4 frames of 32×48 px
    let n = 4 * 4 * 4 * 6;
    let data: Vec<f32> = (0..n)
        .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
        .collect();
    npy::write(&noise, &NpyArray::f32(vec![1, 4, 4, 4, 6], data)).unwrap();
    let wrong = tmp.path().join("wrong.npy");
    npy::write(&wrong, &NpyArray::f32(vec![3], vec![0.0; 3])).unwrap();

    let mut child = motionrt()
        .args(["bench", "--worker", "--model"])
        .arg(&model)
        .args(SMALL)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = || -> Value { serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap() };
    let ready = next();
    assert_eq!(ready["event"], "ready");
    writeln!(stdin, "run 3 {}", noise.display()).unwrap();
    let r = next();
    assert_eq!(r["event"], "run", "{r}");
    assert_eq!(r["unet_steps"].as_array().unwrap().len(), 3);
    let e2e = r["end_to_end"].as_f64().unwrap();
    for k in [
        "text_encoder",
        "unet_total",
        "vae_decode",
        "time_to_first_frame",
    ] {
        assert!(r[k].as_f64().unwrap() <= e2e, "{k}");
    }
    writeln!(stdin, "run 4 {}", wrong.display()).unwrap();
    let r = next();
    assert_eq!(r["event"], "error");
    assert!(r["message"].as_str().unwrap().contains("3 values"), "{r}");
    writeln!(stdin, "jump").unwrap();
    assert_eq!(next()["event"], "error");
    writeln!(stdin, "quit").unwrap();
    let done = next();
    assert_eq!(done["event"], "done");
    assert!(done["peak_host_bytes"].as_u64().unwrap() > 0);
    assert!(child.wait().unwrap().success());
}
