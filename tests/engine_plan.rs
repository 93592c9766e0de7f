//! The engine builder's fusions (`motionrt build --plan-only`): every pattern the exporter emits
//! is found (counted against the exported graph's own structure), and each fused graph computes
//! what the exported graph computes, on ONNX Runtime with the fused operators' CPU kernels.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::Command;

use common::*;
use motionrt_export::graph::unet::Semantics;
use motionrt_export::graph::Precision;
use motionrt_export::onnx::proto::ModelProto;
use motionrt_export::onnx::{load_model, summarize};
use motionrt_runtime::engine::program::{self, InitializerSource, Layout, Program, Step};
use motionrt_runtime::engine::source::FileInitializers;
use motionrt_runtime::engine::{cpu_exec, plan_graph};
use motionrt_runtime::rng::NormalRng;
use motionrt_runtime::{error_stats, Input, OrtSession, OutputData, SessionOptions, Tolerance};

fn tiny(precision: Precision) -> Exported {
    export_pipeline(
        &pipeline_fixtures().join("tiny"),
        false,
        Semantics::Diffusers,
        precision,
    )
}

fn ops(m: &ModelProto) -> BTreeMap<String, usize> {
    summarize(m).op_counts
}

fn count(h: &BTreeMap<String, usize>, op: &str) -> usize {
    h.get(op).copied().unwrap_or(0)
}

/// Rank-2 `.weight` initializers other than embedding tables: the Linear weights (`[out, in]`).
fn linear_weights(m: &ModelProto) -> usize {
    m.graph
        .as_ref()
        .unwrap()
        .initializer
        .iter()
        .filter(|t| {
            t.dims.len() == 2
                && t.name.ends_with(".weight")
                && !t.name.ends_with("embedding.weight")
        })
        .count()
}

/// Seeded inputs of the given shapes: token ids < 100 for `input_ids`, the timesteps 981, 21
/// for `timestep`, standard normal values otherwise. `(float data, int64 data)` per input.
fn seeded(inputs: &[(&str, Vec<usize>)]) -> Vec<(Vec<f32>, Vec<i64>)> {
    let mut rng = NormalRng::new(7);
    inputs
        .iter()
        .map(|(name, shape)| {
            let n = shape.iter().product::<usize>();
            match *name {
                "input_ids" => (Vec::new(), (0..n).map(|_| rng.below(100) as i64).collect()),
                "timestep" => (
                    [981.0, 21.0].into_iter().cycle().take(n).collect(),
                    Vec::new(),
                ),
                _ => {
                    let mut v = vec![0f32; n];
                    rng.fill(&mut v);
                    (v, Vec::new())
                }
            }
        })
        .collect()
}

/// Run `onnx` on ONNX Runtime with [`seeded`] inputs.
fn run(onnx: &Path, inputs: &[(&str, Vec<usize>)]) -> Vec<(String, Vec<f32>)> {
    let mut s = OrtSession::load(onnx, &SessionOptions::default())
        .unwrap_or_else(|e| panic!("{}: {e}", onnx.display()));
    let data = seeded(inputs);
    let args: Vec<(&str, Input<'_>)> = inputs
        .iter()
        .zip(&data)
        .map(|((name, shape), (f, i))| {
            let input = if *name == "input_ids" {
                Input::I64(shape, i)
            } else {
                Input::F32(shape, f)
            };
            (*name, input)
        })
        .collect();
    s.run_outputs(&args)
        .unwrap_or_else(|e| panic!("{}: {e}", onnx.display()))
        .into_iter()
        .map(|o| match o.data {
            OutputData::F32(d) => (o.name, d),
            other => panic!("{}: {other:?}", o.name),
        })
        .collect()
}

/// Run the engine's compiled program of `onnx` on the CPU interpreter with [`seeded`] inputs.
fn run_program(
    onnx: &Path,
    inputs: &[(&str, Vec<usize>)],
    layout: Layout,
) -> (Program, Vec<(String, Vec<f32>)>) {
    let model = load_model(onnx).unwrap();
    let src = FileInitializers::new(onnx);
    let prog = program::compile(&model, inputs, &src, layout)
        .unwrap_or_else(|e| panic!("{}: {e}", onnx.display()));
    let data = seeded(inputs);
    let mut f = HashMap::new();
    let mut i = HashMap::new();
    for ((name, _), (fv, iv)) in inputs.iter().zip(data) {
        if *name == "input_ids" {
            i.insert(name.to_string(), iv);
        } else {
            f.insert(name.to_string(), fv);
        }
    }
    let inits: HashMap<&str, _> = model
        .graph
        .as_ref()
        .unwrap()
        .initializer
        .iter()
        .map(|t| (t.name.as_str(), t))
        .collect();
    let weight = |n: &str| src.f32s(inits[n]);
    let out =
        cpu_exec::run(&prog, &f, &i, &weight).unwrap_or_else(|e| panic!("{}: {e}", onnx.display()));
    (prog, out.into_iter().map(|(n, _, v)| (n, v)).collect())
}

#[test]
fn fused_graphs_find_every_pattern_and_match_the_exported_graphs() {
    let e = tiny(Precision::Fp32);
    let src = e.dir.path().join("out");
    let dst = tempfile::tempdir().unwrap();
    let (b, f) = (2usize, 3usize);
    // The text width, from the exported graph's `encoder_hidden_states` [B·F, 77, D].
    let d = text_width(&src);
    type Inputs = Vec<(&'static str, Vec<usize>)>;
    let cases: [(&str, Inputs); 4] = [
        (
            "unet",
            vec![
                ("sample", vec![b, 4, f, 8, 8]),
                ("timestep", vec![b]),
                ("encoder_hidden_states", vec![b * f, 77, d]),
            ],
        ),
        ("text_encoder", vec![("input_ids", vec![2, 77])]),
        ("vae_decoder", vec![("latent", vec![2, 4, 8, 8])]),
        ("vae_encoder", vec![("image", vec![1, 3, 64, 64])]),
    ];
    for (graph, inputs) in cases {
        let a = src.join(format!("{graph}.onnx"));
        let z = dst.path().join(format!("{graph}.onnx"));
        let report = plan_graph(&a, &z).unwrap_or_else(|err| panic!("{graph}: {err}"));
        let (before, after) = (load_model(&a).unwrap(), load_model(&z).unwrap());
        let (hb, ha) = (ops(&before), ops(&after));
        let fused = |k: &str| report.fused.get(k).copied().unwrap_or(0);
        let linears: usize = report
            .fused
            .iter()
            .filter(|(k, _)| k.starts_with("Linear"))
            .map(|(_, v)| v)
            .sum();
        eprintln!(
            "{graph}: {} → {} nodes, {:?}",
            report.nodes_before, report.nodes_after, report.fused
        );
        // Every Linear of the exported graph became one fused GEMM.
        assert_eq!(
            linears,
            linear_weights(&before),
            "{graph}: {:?}",
            report.fused
        );
        assert_eq!(count(&ha, "com.motionrt::Linear"), linears, "{graph}");
        // Every GroupNorm (InstanceNormalization on the grouped view) was fused.
        assert_eq!(
            fused("GroupNorm") + fused("GroupNorm+SiLU"),
            count(&hb, "InstanceNormalization"),
            "{graph}"
        );
        assert_eq!(count(&ha, "InstanceNormalization"), 0, "{graph}");
        if graph == "unet" {
            // Every attention (spatial self/cross and both temporal ones) and every GEGLU.
            assert_eq!(fused("Attention"), count(&hb, "Softmax"));
            assert_eq!(fused("Geglu"), count(&hb, "Erf"));
            assert_eq!(count(&ha, "Softmax") + count(&ha, "Erf"), 0);
            // Resnets: norm1 and norm2 are followed by SiLU; to_out and ff.net.2 take the
            // residual in their epilogue.
            assert!(fused("GroupNorm+SiLU") > 0 && fused("Linear+bias+residual") > 0);
            assert_eq!(
                fused("Linear+bias+residual"),
                fused("Attention") + fused("Geglu")
            );
        }
        // CLIP's causal (masked) attention is not fused yet: only its Linears are.
        let bound = if graph == "text_encoder" {
            report.nodes_before * 3 / 4
        } else {
            report.nodes_before / 2
        };
        assert!(report.nodes_after < bound, "{graph}: {report:?}");
        let want = run(&a, &inputs);
        let got = run(&z, &inputs);
        for ((name, r), (_, o)) in want.iter().zip(&got) {
            let s = error_stats(o, r);
            eprintln!("{graph}.{name}: {s:?}");
            assert!(s.passes(Tolerance::FP32), "{graph}.{name}: {s:?}");
        }
        // The native engine's compiled program (host-evaluated shapes, aliases, strided copies,
        // convolution residual epilogues) on the CPU interpreter computes the same.
        // In both layouts: NCHW, and channels-last (convolutions NHWC, 1×1 convolutions as
        // GEMMs, GroupNorm in place of layout, transposes to tokens as views).
        let mut copies = Vec::new();
        for layout in [Layout::Nchw, Layout::Nhwc] {
            let (prog, got) = run_program(&z, &inputs, layout);
            let mem = program::plan_memory(&prog, |_| 4);
            let n_copies = prog
                .steps
                .iter()
                .filter(|s| matches!(s, Step::Copy { .. }))
                .count();
            eprintln!(
                "{graph} {layout:?}: program of {} steps ({n_copies} copies), arena {} KiB (unshared {} KiB)",
                prog.steps.len(),
                mem.arena_bytes / 1024,
                mem.unshared_bytes / 1024
            );
            assert!(mem.arena_bytes < mem.unshared_bytes, "{graph}: no reuse");
            for ((name, r), (_, o)) in want.iter().zip(&got) {
                let s = error_stats(o, r);
                eprintln!("{graph}.{name} (engine program, CPU, {layout:?}): {s:?}");
                assert!(
                    s.passes(Tolerance::FP32),
                    "{graph}.{name} {layout:?}: {s:?}"
                );
            }
            let nhwc_convs = prog
                .steps
                .iter()
                .filter(|s| matches!(s, Step::Conv(c) if c.nhwc))
                .count();
            let cl_norms = prog
                .steps
                .iter()
                .filter(|s| {
                    matches!(
                        s,
                        Step::GroupNorm {
                            channels_last: true,
                            ..
                        }
                    )
                })
                .count();
            if layout == Layout::Nchw {
                assert_eq!(nhwc_convs + cl_norms, 0, "{graph}");
            } else if graph != "text_encoder" {
                assert!(
                    nhwc_convs > 0 && cl_norms > 0,
                    "{graph}: {nhwc_convs} {cl_norms}"
                );
            }
            if graph == "unet" {
                // GEGLU adds its projection's bias (no pass after the GEMM)
                let geglu: Vec<bool> = prog
                    .steps
                    .iter()
                    .filter_map(|s| match s {
                        Step::Geglu { bias, .. } => Some(bias.is_some()),
                        _ => None,
                    })
                    .collect();
                assert!(!geglu.is_empty() && geglu.iter().all(|&b| b), "{geglu:?}");
                // the motion modules' positional table is added by the LayerNorm before it, and
                // (channels-last) each ResNet's time embedding by its first convolution
                let pe = prog
                    .steps
                    .iter()
                    .filter(|s| matches!(s, Step::LayerNorm { add: Some(_), .. }))
                    .count();
                assert!(pe > 0, "no positional table folded into a LayerNorm");
                let temb = prog
                    .steps
                    .iter()
                    .filter(|s| matches!(s, Step::Conv(c) if c.sample_bias.is_some()))
                    .count();
                assert_eq!(
                    temb > 0,
                    layout == Layout::Nhwc,
                    "{temb} time embeddings folded"
                );
                // the sinusoidal timestep embedding comes from the host in float32 (its input
                // buffer holds [B, 2·half]; the unit test in engine/program.rs checks that no
                // Sin or Cos then runs on the device)
                assert_eq!(
                    prog.input_transforms.len(),
                    1,
                    "{:?}",
                    prog.input_transforms
                );
                assert_eq!(prog.input_transforms[0].0, "timestep");
            }
            copies.push(n_copies);
        }
        if graph == "unet" || graph == "vae_decoder" {
            // the transposes between NCHW and tokens are views in channels-last
            assert!(
                copies[1] < copies[0],
                "{graph}: copies NCHW/NHWC {copies:?}"
            );
        }
    }
}

fn motionrt() -> Command {
    Command::new(env!("CARGO_BIN_EXE_motionrt"))
}

#[test]
fn build_plan_only_writes_a_runnable_model_and_refuses_what_it_cannot_build() {
    let e = tiny(Precision::Fp32);
    let src = e.dir.path().join("out");
    let work = tempfile::tempdir().unwrap();
    let plan = work.path().join("plan");
    let o = motionrt()
        .args(["build", "--plan-only", "--model"])
        .arg(&src)
        .arg("--out")
        .arg(&plan)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let p: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(plan.join("plan.json")).unwrap()).unwrap();
    assert_eq!(p["format"], "motionrt.plan/1");
    assert_eq!(p["graphs"].as_array().unwrap().len(), 4);
    assert!(plan.join("model.json").is_file() && plan.join("tokenizer").is_dir());

    // The whole pipeline on the fused graphs gives the frames of the exported graphs.
    let frames = |model: &Path, out: &Path| {
        let o = motionrt()
            .args([
                "run", "--prompt", "a cat", "--frames", "3", "--height", "64",
            ])
            .args(["--width", "64", "--steps", "2", "--seed", "5", "--model"])
            .arg(model)
            .arg("--out")
            .arg(format!("{}/", out.display()))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let mut px = Vec::new();
        for i in 0..3 {
            let f = std::fs::File::open(out.join(format!("frame_{i:03}.png")))
                .unwrap_or_else(|e| panic!("{}: {e}", out.display()));
            let mut r = png::Decoder::new(std::io::BufReader::new(f))
                .read_info()
                .unwrap();
            let mut buf = vec![0; r.output_buffer_size()];
            let info = r.next_frame(&mut buf).unwrap();
            px.extend_from_slice(&buf[..info.buffer_size()]);
        }
        px
    };
    let a = frames(&src, &work.path().join("a"));
    let b = frames(&plan, &work.path().join("b"));
    assert_eq!(a.len(), b.len());
    let off = a
        .iter()
        .zip(&b)
        .filter(|(x, y)| x.abs_diff(**y) > 1)
        .count();
    assert_eq!(
        off, 0,
        "pixels differing by more than one level (8-bit rounding)"
    );

    // Without --plan-only: the native engine, built on the GPU. Without one (CI), a clear refusal
    // naming what is missing, and nothing written.
    let engine = work.path().join("x.engine");
    let o = motionrt()
        .args(["build", "--model"])
        .arg(&src)
        .arg("--out")
        .arg(&engine)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    let missing = motionrt_runtime::engine::exec::missing_libraries();
    if missing.is_empty() {
        assert!(o.status.success(), "{err}");
        assert!(
            engine.join("engine.json").is_file() && engine.join("weights.safetensors").is_file()
        );
    } else {
        assert!(!o.status.success(), "{err}");
        assert!(
            err.contains(missing[0]) && err.contains("motionrt probe"),
            "{err}"
        );
        assert!(!engine.exists());
        assert_eq!(
            std::fs::read_dir(work.path())
                .unwrap()
                .filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().contains("partial"))
                .count(),
            0
        );
    }
    // `build ARGS --model SRC --out OUT`
    let build = |args: &[&str], out: &Path| {
        motionrt()
            .arg("build")
            .args(args)
            .arg("--model")
            .arg(&src)
            .arg("--out")
            .arg(out)
            .output()
            .unwrap()
    };
    // An existing output is not replaced without --overwrite.
    let o = build(&["--plan-only"], &plan);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--overwrite"));
    // With it, an earlier plan is replaced, but not a folder of something else.
    let o = build(&["--plan-only", "--overwrite"], &plan);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let other = work.path().join("notes");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("keep.txt"), "x").unwrap();
    let o = build(&["--plan-only", "--overwrite"], &other);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("not a motionrt engine"),
        "{err}"
    );
    assert!(other.join("keep.txt").is_file());
    // Profiles are checked before the GPU is opened: each names its flag and the form it
    // expects; frames beyond the motion module's table (32 here) are refused.
    for (flag, value, says) in [
        ("--min-shape", "banana", "BATCHxFRAMESxHEIGHTxWIDTH"),
        ("--opt-shape", "1x8x250x256", "multiples of 8"),
        ("--min-shape", "1x24x256x256", "between"),
        ("--max-shape", "1x64x512x512", "positional table"),
    ] {
        let o = build(&[flag, value], &work.path().join("shapes"));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{flag} {value}: {err}");
        assert!(err.contains(says), "{flag} {value}: {err}");
        if says != "between" {
            assert!(err.contains(flag), "{err}");
        }
    }
    assert!(!work.path().join("shapes").exists());
    // --plan-only writes no engine: the engine's settings are refused, not ignored
    for extra in [
        &["--layout", "nchw"][..],
        &["--min-shape", "1x2x16x16"],
        &["--vae-chunk", "3"],
        &["--timing-cache", "t.json"],
        &["--no-kernel-tactics"],
    ] {
        let mut args = vec!["--plan-only"];
        args.extend_from_slice(extra);
        let o = build(&args, &work.path().join("ignored"));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains("cannot be used with"),
            "{extra:?}: {err}"
        );
    }
    assert!(!work.path().join("ignored").exists());
    // A VAE chunk of no frames is refused before the GPU is opened (with or without one).
    let zero = work.path().join("zero.engine");
    let o = build(&["--vae-chunk", "0"], &zero);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--vae-chunk"), "{err}");
    assert!(!zero.exists());
}

/// An engine keeps only small initializers in its graphs (the rest go to
/// `weights.safetensors`, no data left in the graph): the stripped graphs compile as
/// `run --engine` compiles them, reading initializers with `InlineInitializers`.
#[test]
fn stripped_engine_graphs_compile_as_the_engine_loads_them() {
    use motionrt_runtime::engine::file::{strip_weights, InlineInitializers};
    let e = tiny(Precision::Fp32);
    let src = e.dir.path().join("out");
    let dst = tempfile::tempdir().unwrap();
    let d = text_width(&src);
    type Inputs = Vec<(&'static str, Vec<usize>)>;
    let cases: [(&str, Inputs); 3] = [
        (
            "unet",
            vec![
                ("sample", vec![2, 4, 2, 8, 8]),
                ("timestep", vec![2]),
                ("encoder_hidden_states", vec![4, 77, d]),
            ],
        ),
        ("vae_decoder", vec![("latent", vec![1, 4, 8, 8])]),
        ("text_encoder", vec![("input_ids", vec![1, 77])]),
    ];
    let mut stripped = 0;
    for (graph, inputs) in cases {
        let z = dst.path().join(format!("{graph}.onnx"));
        plan_graph(&src.join(format!("{graph}.onnx")), &z).unwrap();
        let mut m = load_model(&z).unwrap();
        stripped += strip_weights(&mut m, &FileInitializers::new(&z))
            .unwrap()
            .len();
        for layout in [Layout::Nchw, Layout::Nhwc] {
            program::compile(&m, &inputs, &InlineInitializers, layout)
                .unwrap_or_else(|err| panic!("{graph} {layout:?}: {err}"));
        }
    }
    assert!(stripped > 0, "the tiny graphs hold weights past INLINE_MAX");
}

#[test]
fn build_refuses_a_float16_export_naming_the_file() {
    let e = tiny(Precision::Fp16);
    let work = tempfile::tempdir().unwrap();
    let o = motionrt()
        .args(["build", "--plan-only", "--model"])
        .arg(e.dir.path().join("out"))
        .arg("--out")
        .arg(work.path().join("plan"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains(".onnx") && err.contains("float32 export"),
        "{err}"
    );
    assert!(!work.path().join("plan").exists());
    let leftovers: Vec<_> = std::fs::read_dir(work.path()).unwrap().collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// The full SD1.5 + AnimateDiff v2 UNet's engine program (and the SD VAE decoder's and CLIP text
/// encoder's, when exported) on the CPU interpreter, in both layouts, against ONNX Runtime on the
/// same fused graph: the real architecture's channel counts, head sizes (40/80/160, the VAE's
/// 512), mid block and motion modules at a small latent. Minutes; run by hand with
/// `MOTIONRT_FULL_PLAN=DIR` (a `motionrt build --plan-only` folder of a `synth_sd15` export):
/// `MOTIONRT_FULL_PLAN=/tmp/full/plan ./scripts/test --test engine_plan -- --ignored`.
#[test]
#[ignore]
fn full_unet_program_matches_onnx_runtime_in_both_layouts() {
    let Some(dir) = std::env::var_os("MOTIONRT_FULL_PLAN") else {
        eprintln!("SKIP: MOTIONRT_FULL_PLAN is not set");
        return;
    };
    type Inputs = Vec<(&'static str, Vec<usize>)>;
    let cases: [(&str, Inputs); 3] = [
        (
            "unet",
            vec![
                ("sample", vec![1, 4, 2, 16, 16]),
                ("timestep", vec![1]),
                ("encoder_hidden_states", vec![2, 77, 768]),
            ],
        ),
        // the SD VAE's mid-block attention: 64 tokens, one 512-wide head (as GEMMs)
        ("vae_decoder", vec![("latent", vec![1, 4, 8, 8])]),
        ("text_encoder", vec![("input_ids", vec![1, 77])]),
    ];
    for (graph, inputs) in cases {
        let z = Path::new(&dir).join(format!("{graph}.onnx"));
        if !z.exists() {
            eprintln!("SKIP: {}: not exported", z.display());
            continue;
        }
        let want = run(&z, &inputs);
        for layout in [Layout::Nhwc, Layout::Nchw] {
            let t = std::time::Instant::now();
            let (prog, got) = run_program(&z, &inputs, layout);
            for ((name, r), (_, o)) in want.iter().zip(&got) {
                let s = error_stats(o, r);
                eprintln!(
                    "full {graph}.{name} ({layout:?}, {} steps, {:.0} s): {s:?}",
                    prog.steps.len(),
                    t.elapsed().as_secs_f64()
                );
                assert!(
                    s.passes(Tolerance::FP32),
                    "{graph}.{name} {layout:?}: {s:?}"
                );
            }
        }
    }
}
