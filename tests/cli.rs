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
    let o = cmd.output().expect("motionrt runs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
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
fn demo_runs_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let text = ok(motionrt()
        .args([
            "demo", "--frames", "3", "--height", "32", "--width", "24", "--dir",
        ])
        .arg(dir.path()));
    assert!(text.contains("noise_pred [1, 4, 3, 4, 3]"), "{text}");
    assert!(text.contains("step median"), "{text}");
}

#[test]
fn help_explains_the_commands() {
    let text = ok(motionrt().arg("--help"));
    for cmd in ["export", "inspect", "demo"] {
        assert!(text.contains(cmd), "{text}");
    }
    let text = ok(motionrt().args(["export", "--help"]));
    assert!(
        text.contains("--semantics") && text.contains("--motion-module"),
        "{text}"
    );
}
