//! Bad input to `motionrt export`: each case exits non-zero with a message naming the file (and
//! the tensor, where there is one) and leaves no output directory behind.

use std::path::{Path, PathBuf};
use std::process::Command;

use motionrt_export::config::MotionVersion;
use motionrt_export::synthetic::{self, write_safetensors};
use motionrt_export::Checkpoint;

fn motionrt() -> Command {
    Command::new(env!("CARGO_BIN_EXE_motionrt"))
}

fn export_cmd(unet: &Path, mm: &Path, out: &Path) -> Command {
    let mut c = motionrt();
    c.args(["export", "--unet"])
        .arg(unet)
        .arg("--motion-module")
        .arg(mm)
        .arg("--out")
        .arg(out);
    c
}

/// Run an export expected to fail; returns stderr.
fn export_fails(work: &Path, unet: &Path, mm: &Path) -> String {
    let out = work.join("out");
    let o = export_cmd(unet, mm, &out).output().expect("motionrt runs");
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "export should fail; stderr: {stderr}");
    assert!(!out.exists(), "a failed export left {}", out.display());
    let leftovers: Vec<_> = std::fs::read_dir(work)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("partial"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "temporary output left behind: {leftovers:?}"
    );
    eprintln!("{stderr}");
    stderr
}

struct Model {
    dir: tempfile::TempDir,
    unet: PathBuf,
    mm: PathBuf,
}

fn tiny() -> Model {
    let dir = tempfile::tempdir().unwrap();
    let m = synthetic::write_model(
        &dir.path().join("model"),
        &synthetic::tiny_unet(),
        &synthetic::tiny_motion(MotionVersion::V2),
        7,
    )
    .unwrap();
    Model {
        unet: m.unet_dir,
        mm: m.motion_file,
        dir,
    }
}

/// Rewrite a safetensors file through `edit`.
fn rewrite(path: &Path, edit: impl FnOnce(&mut Vec<(String, Vec<usize>, Vec<f32>)>)) {
    let c = Checkpoint::open(path).unwrap();
    let mut t: Vec<_> = c
        .keys()
        .map(|k| {
            (
                k.to_string(),
                c.meta(k).unwrap().shape.clone(),
                c.read_f32(k).unwrap(),
            )
        })
        .collect();
    drop(c);
    edit(&mut t);
    write_safetensors(path, &t).unwrap();
}

#[test]
fn the_synthetic_model_itself_exports() {
    // Guards the cases below: they fail because of the one thing each breaks.
    let m = tiny();
    let o = export_cmd(&m.unet, &m.mm, &m.dir.path().join("ok"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(m.dir.path().join("ok/unet.onnx").is_file());
    assert!(m.dir.path().join("ok/model.json").is_file());
}

#[test]
fn truncated_file() {
    let m = tiny();
    let bytes = std::fs::read(&m.mm).unwrap();
    std::fs::write(&m.mm, &bytes[..bytes.len() / 2]).unwrap();
    let err = export_fails(m.dir.path(), &m.unet, &m.mm);
    assert!(err.contains(&m.mm.display().to_string()), "{err}");
}

#[test]
fn tensor_with_wrong_shape() {
    let m = tiny();
    let key = "down_blocks.1.resnets.0.conv1.weight";
    rewrite(
        &m.unet.join("unet/diffusion_pytorch_model.safetensors"),
        |t| {
            let e = t.iter_mut().find(|(k, _, _)| k == key).unwrap();
            e.1 = vec![64, 32, 1, 9]; // same element count, wrong shape
        },
    );
    let err = export_fails(m.dir.path(), &m.unet, &m.mm);
    assert!(err.contains(key), "{err}");
    assert!(err.contains("diffusion_pytorch_model.safetensors"), "{err}");
    assert!(
        err.contains("[64, 32, 3, 3]"),
        "expected shape named: {err}"
    );
}

#[test]
fn missing_key() {
    let m = tiny();
    let key = "down_blocks.0.motion_modules.1.temporal_transformer.transformer_blocks.0.attention_blocks.1.to_v.weight";
    rewrite(&m.mm, |t| t.retain(|(k, _, _)| k != key));
    let err = export_fails(m.dir.path(), &m.unet, &m.mm);
    // the file's own key, and the diffusers name the exporter reads it by
    assert!(err.contains(&format!("`{key}`")), "{err}");
    assert!(
        err.contains("down_blocks.0.motion_modules.1.transformer_blocks.0.attn2.to_v.weight"),
        "{err}"
    );
    assert!(err.contains(&m.mm.display().to_string()), "{err}");
}

/// A motion module whose `proj_in` is not a linear layer's `[C, C]` (flattened): the error
/// names the file's key and the shape expected.
#[test]
fn motion_module_proj_in_of_another_rank() {
    let m = tiny();
    let key = "down_blocks.0.motion_modules.0.temporal_transformer.proj_in.weight";
    rewrite(&m.mm, |t| {
        let e = t.iter_mut().find(|(k, _, _)| k == key).unwrap();
        e.1 = vec![e.1.iter().product()];
    });
    let err = export_fails(m.dir.path(), &m.unet, &m.mm);
    assert!(err.contains(&format!("`{key}`")), "{err}");
    assert!(err.contains("[C, C]"), "{err}");
}

#[test]
fn motion_module_of_another_base_model() {
    // An SDXL-shaped motion module (three levels, widths that do not match the UNet's).
    let m = tiny();
    let mut unet3 = synthetic::tiny_unet();
    unet3.block_out_channels = vec![64, 128, 128];
    unet3.down_attention = vec![false, true, true];
    let mut mm3 = synthetic::tiny_motion(MotionVersion::V3);
    mm3.block_out_channels = vec![64, 128, 128];
    let other = synthetic::write_model(&m.dir.path().join("xl"), &unet3, &mm3, 3).unwrap();
    let err = export_fails(m.dir.path(), &m.unet, &other.motion_file);
    assert!(
        err.contains(&other.motion_file.display().to_string()),
        "{err}"
    );
    assert!(
        err.contains("down_blocks.0.motion_modules.0.temporal_transformer.proj_in.weight"),
        "{err}"
    );
    assert!(err.contains("SDXL"), "{err}");
}

#[test]
fn pickle_that_executes_code() {
    let m = tiny();
    let evil = Path::new(env!("CARGO_MANIFEST_DIR")).join("export/tests/data/malicious.pt");
    let err = export_fails(m.dir.path(), &m.unet, &evil);
    assert!(err.contains("malicious.pt"), "{err}");
    assert!(
        err.contains("system"),
        "the refused callable is named: {err}"
    );
}

#[test]
fn unknown_format() {
    let m = tiny();
    let f = m.dir.path().join("notes.ckpt");
    std::fs::write(&f, "this is not a checkpoint\n").unwrap();
    let err = export_fails(m.dir.path(), &m.unet, &f);
    assert!(err.contains("notes.ckpt"), "{err}");
    assert!(err.contains("unknown checkpoint format"), "{err}");
}

#[test]
fn existing_output_is_not_clobbered() {
    let m = tiny();
    let out = m.dir.path().join("existing");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "x").unwrap();
    let o = export_cmd(&m.unet, &m.mm, &out).output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--overwrite"));
    assert!(out.join("keep.txt").is_file());
    // --overwrite replaces an earlier export, not a folder of something else (a mistyped --out)
    let o = export_cmd(&m.unet, &m.mm, &out)
        .arg("--overwrite")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("not a motionrt export"),
        "{err}"
    );
    assert!(out.join("keep.txt").is_file());
    let export = m.dir.path().join("export");
    for _ in 0..2 {
        let o = export_cmd(&m.unet, &m.mm, &export)
            .arg("--overwrite")
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(export.join("model.json").is_file());
    }
}
