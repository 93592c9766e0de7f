//! The CUDA executor's host side without a GPU: every tiny graph's compiled program run from the
//! very operation lists the executor enqueues (`engine::launch::step_ops`) — the real kernels in
//! the CUDA emulator with the executor's launch shapes and argument lists, the cuBLAS, cuBLASLt
//! and cuDNN calls on the CPU from their descriptors' values (`engine::emulated`) — in float32
//! and float16, both layouts, against the float32 CPU interpreter of the same program (itself
//! checked against ONNX Runtime in tests/engine_plan.rs). Tolerances are the GPU check's
//! (examples/engine_gpu.rs): float32 max |Δ| ≤ 1e-4 · max |ref|; float16 ≤ 1e-2 · max |ref|
//! with cosine ≥ 0.9999.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use common::*;
use motionrt_export::graph::unet::Semantics;
use motionrt_export::graph::Precision as ExportPrecision;
use motionrt_export::onnx::proto::{
    GraphProto, ModelProto, NodeProto, TensorProto, TensorProtoDataType,
};
use motionrt_export::onnx::{
    attr_float, attr_int, attr_ints, attr_string, load_model, tensor_f32, value_info, Dim,
};
use motionrt_kernels::emu::Emu;
use motionrt_runtime::engine::emulated::EmuProgram;
use motionrt_runtime::engine::exec::Precision;
use motionrt_runtime::engine::file::InlineInitializers;
use motionrt_runtime::engine::launch::{
    conv_igemm_for, geglu_linear, geglu_pairs, norm_pair_first, norm_pairs, plan_memory_for,
    plan_memory_fused, specialize, WeightData, CONV_IGEMM_WIDTHS,
};
use motionrt_runtime::engine::program::{
    self, lifetimes, BinaryOp, BufferKind, InitializerSource, Layout, Outputs, Program, Step,
    WeightSource,
};
use motionrt_runtime::engine::source::FileInitializers;
use motionrt_runtime::engine::{cpu_exec, plan_graph, EngineError};
use motionrt_runtime::error_stats;
use motionrt_runtime::rng::NormalRng;

/// An H100's opt-in shared memory per block (bytes).
const H100_SMEM_OPTIN: usize = 232_448;

fn emu() -> Option<Emu> {
    match Emu::new() {
        Ok(e) => Some(e),
        Err(e) => {
            e.skip_or_panic();
            None
        }
    }
}

type Inputs = Vec<(&'static str, Vec<usize>)>;

/// Seeded inputs: token ids < 100, timesteps 981/21, standard normal values otherwise.
fn seeded(inputs: &Inputs) -> (HashMap<String, Vec<f32>>, HashMap<String, Vec<i64>>) {
    let mut rng = NormalRng::new(11);
    let (mut f, mut i) = (HashMap::new(), HashMap::new());
    for (name, shape) in inputs {
        let n = shape.iter().product::<usize>();
        match *name {
            "input_ids" => {
                i.insert(
                    name.to_string(),
                    (0..n).map(|_| rng.below(100) as i64).collect(),
                );
            }
            "timestep" => {
                f.insert(
                    name.to_string(),
                    [981.0, 21.0].into_iter().cycle().take(n).collect(),
                );
            }
            _ => {
                let mut v = vec![0f32; n];
                rng.fill(&mut v);
                f.insert(name.to_string(), v);
            }
        }
    }
    (f, i)
}

struct Case {
    prog: Program,
    weights: HashMap<String, Vec<f32>>,
    f: HashMap<String, Vec<f32>>,
    i: HashMap<String, Vec<i64>>,
    want: Outputs,
}

fn case(onnx: &Path, inputs: &Inputs, layout: Layout) -> Case {
    let model = load_model(onnx).unwrap();
    let src = FileInitializers::new(onnx);
    let prog = program::compile(&model, inputs, &src, layout)
        .unwrap_or_else(|e| panic!("{}: {e}", onnx.display()));
    let weights = initializers(&model, &src);
    let (f, i) = seeded(inputs);
    let w = |n: &str| Ok(weights[n].clone());
    let want = cpu_exec::run(&prog, &f, &i, &w).unwrap();
    Case {
        prog,
        weights,
        f,
        i,
        want,
    }
}

/// `model`'s float initializers by name, from `src`.
fn initializers(model: &ModelProto, src: &FileInitializers) -> HashMap<String, Vec<f32>> {
    model
        .graph
        .as_ref()
        .unwrap()
        .initializer
        .iter()
        .filter_map(|t| Some((t.name.clone(), src.f32s(t).ok()?)))
        .collect()
}

/// `MOTIONRT_FULL_PLAN` (the full-architecture tests' plan folder) and the emulator, or `None`
/// (said) where either is missing.
fn full_plan() -> Option<(std::ffi::OsString, Emu)> {
    let Some(dir) = std::env::var_os("MOTIONRT_FULL_PLAN") else {
        eprintln!("SKIP: MOTIONRT_FULL_PLAN is not set");
        return None;
    };
    Some((dir, emu()?))
}

/// Run `c` on the emulated executor; `(outputs, calls per kernel / library)`.
fn emulate(
    emu: &Emu,
    c: &Case,
    precision: Precision,
    smem_optin: usize,
    lt: bool,
) -> Result<(Outputs, BTreeMap<String, usize>), EngineError> {
    emulate_with(emu, c, precision, smem_optin, lt, Kernels::default())
}

/// The kernel tactics [`emulate_with`] takes (what an engine runs where each timed faster).
#[derive(Default, Clone, Copy)]
struct Kernels {
    /// Every convolution `conv_igemm_f16_nBN` computes on it, with this BN (instead of cuDNN).
    conv: Option<usize>,
    /// Every GEGLU pair `gemm_geglu_f16_nBN` computes likewise (instead of cuBLASLt and `geglu`).
    geglu: Option<usize>,
    /// Every normalisation pair `conv_igemm_gn/_ln_f16_nBN` computes likewise (instead of the
    /// two steps).
    norm: Option<usize>,
    /// Every attention on `attention_tiled_f16_d40` on `attention_tiled2_f16_d40` instead.
    attention_two: bool,
    /// The weights handed over as float16 bits (their values rounded), as an fp16 engine's
    /// file holds them, instead of float32.
    f16_weights: bool,
}

/// [`emulate`], with those kernels chosen.
fn emulate_with(
    emu: &Emu,
    c: &Case,
    precision: Precision,
    smem_optin: usize,
    lt: bool,
    k: Kernels,
) -> Result<(Outputs, BTreeMap<String, usize>), EngineError> {
    let Kernels {
        conv: conv_kernel,
        geglu: geglu_kernel,
        norm: norm_pair,
        attention_two,
        f16_weights,
    } = k;
    let w = |n: &str| -> Result<WeightData, EngineError> {
        let v = &c.weights[n];
        Ok(if f16_weights {
            WeightData::F16(
                v.iter()
                    .map(|&x| half::f16::from_f32(x).to_bits())
                    .collect(),
            )
        } else {
            WeightData::F32(v.clone())
        })
    };
    let mut p = EmuProgram::load(emu, c.prog.clone(), precision, &w, smem_optin, lt)?;
    p.conv_kernel = conv_kernel;
    p.attention_two = attention_two;
    // as the GPU executor once its timing chose the kernel: the arena planned again without the
    // projections' outputs
    if let Some(bn) = geglu_kernel {
        p.use_geglu_kernel(bn);
    }
    if let Some(bn) = norm_pair {
        p.use_norm_pairs(bn);
    }
    let f: Vec<(&str, &[f32])> = c.f.iter().map(|(k, v)| (k.as_str(), &v[..])).collect();
    let i: Vec<(&str, &[i64])> = c.i.iter().map(|(k, v)| (k.as_str(), &v[..])).collect();
    let out = p.run(&f, &i)?;
    let mut calls = p.calls.clone();
    calls.insert("merged projections".into(), p.specialized.merged);
    calls.insert(
        "frame-major motion modules".into(),
        p.specialized.frame_major,
    );
    calls.insert("residual adds folded".into(), p.specialized.residual_adds);
    calls.insert("conv biases in GroupNorm".into(), p.specialized.conv_biases);
    calls.insert("arena bytes".into(), p.memory.arena_bytes);
    Ok((out, calls))
}

/// How many calls of `k` an emulated run made (0 when none).
fn count(calls: &BTreeMap<String, usize>, k: &str) -> usize {
    calls.get(k).copied().unwrap_or(0)
}

fn check(
    what: &str,
    precision: Precision,
    want: &[(String, Vec<usize>, Vec<f32>)],
    got: &[(String, Vec<usize>, Vec<f32>)],
) {
    assert_eq!(want.len(), got.len(), "{what}");
    for ((name, ws, w), (_, gs, g)) in want.iter().zip(got) {
        assert_eq!(ws, gs, "{what}.{name}: shape");
        let s = error_stats(g, w);
        eprintln!("{what}.{name}: {s:?}");
        let pass = match precision {
            Precision::Fp32 => s.nonfinite == 0 && s.max_rel_to_ref_max <= 1e-4,
            Precision::Fp16 => {
                s.nonfinite == 0 && s.max_rel_to_ref_max <= 1e-2 && s.cosine >= 0.9999
            }
        };
        assert!(pass, "{what}.{name}: {s:?}");
    }
}

fn attention_kernels(calls: &BTreeMap<String, usize>) -> Vec<String> {
    calls
        .keys()
        .filter(|k| k.contains("attention"))
        .cloned()
        .collect()
}

#[test]
fn every_tiny_graph_runs_on_the_emulated_executor_as_on_the_cpu_interpreter() {
    let Some(emu) = emu() else { return };
    let (_export, src, dst, d) = tiny_export();
    // two samples (the guidance batch: the time embedding differs per sample), two frames
    let (b, f) = (2usize, 2usize);
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
    let mut attention = std::collections::BTreeSet::new();
    for (graph, inputs) in cases {
        let a = src.join(format!("{graph}.onnx"));
        let z = dst.path().join(format!("{graph}.onnx"));
        plan_graph(&a, &z).unwrap_or_else(|err| panic!("{graph}: {err}"));
        for layout in [Layout::Nhwc, Layout::Nchw] {
            let c = case(&z, &inputs, layout);
            for precision in [Precision::Fp16, Precision::Fp32] {
                let t = std::time::Instant::now();
                let what = format!("{graph} {layout:?} {precision:?}");
                let (got, calls) = emulate(&emu, &c, precision, H100_SMEM_OPTIN, true)
                    .unwrap_or_else(|err| panic!("{what}: {err}"));
                eprintln!(
                    "{what}: {} steps in {:.1} s, {calls:?}",
                    c.prog.steps.len(),
                    t.elapsed().as_secs_f64()
                );
                check(&what, precision, &c.want, &got);
                // the executor's paths were taken: convolutions through cuDNN, Linear epilogues
                // through cuBLASLt, float16 attention through the tensor-core kernels
                let has = |k: &str| calls.keys().any(|c| c.contains(k));
                if graph != "text_encoder" {
                    assert!(has("cudnn"), "{what}: {calls:?}");
                }
                if c.prog.steps.iter().any(|s| {
                    matches!(s, Step::Linear { bias, residual, .. } if bias.is_some() || residual.is_some())
                }) {
                    assert!(has("cublasLt"), "{what}: {calls:?}");
                }
                if precision == Precision::Fp16 {
                    attention.extend(attention_kernels(&calls));
                    // the motion modules' attention (heads of 8) reads Q, K, V from one GEMM;
                    // channels-last, the motion modules run on frame-major rows with their
                    // residual add in proj_out's epilogue
                    if graph == "unet" {
                        assert!(calls["merged projections"] > 0, "{what}: {calls:?}");
                        if layout == Layout::Nhwc {
                            assert!(calls["frame-major motion modules"] > 0, "{what}: {calls:?}");
                            assert!(calls["residual adds folded"] > 0, "{what}: {calls:?}");
                            assert!(calls["conv biases in GroupNorm"] > 0, "{what}: {calls:?}");
                        }
                    }
                }
            }
        }
    }
    // float16 attention over frames ran through the tensor-core kernel (the tiled one is
    // exercised at the SD1.5 head sizes below; the tiny graphs' other heads are 4 wide: GEMMs)
    assert!(
        attention.iter().any(|k| k.starts_with("attention_short")),
        "{attention:?}"
    );
}

/// Channels-last float16 convolutions on `conv_igemm_f16` (an engine's choice where it times
/// faster than cuDNN's): the tiny UNet runs as on the interpreter, every convolution the kernel
/// takes (channels a multiple of 32) without a bias pass after it, the rest (the 4-channel
/// latents') on cuDNN. (The tiny VAE's channels are not multiples of 32; the SD1.5 VAE's are:
/// `full_architecture_runs_on_the_emulated_executor`.)
#[test]
fn implicit_gemm_convolutions_run_the_tiny_graphs() {
    let Some(emu) = emu() else { return };
    let (_export, src, dst, d) = tiny_export();
    let (b, f) = (2usize, 2usize);
    let cases: [(&str, Inputs); 1] = [(
        "unet",
        vec![
            ("sample", vec![b, 4, f, 8, 8]),
            ("timestep", vec![b]),
            ("encoder_hidden_states", vec![b * f, 77, d]),
        ],
    )];
    for (graph, inputs) in cases {
        let z = dst.path().join(format!("{graph}.onnx"));
        plan_graph(&src.join(format!("{graph}.onnx")), &z).unwrap();
        let c = case(&z, &inputs, Layout::Nhwc);
        let what = format!("{graph} Nhwc Fp16 conv_igemm");
        let (got, calls) = emulate_with(
            &emu,
            &c,
            Precision::Fp16,
            H100_SMEM_OPTIN,
            true,
            Kernels {
                conv: Some(128),
                ..Default::default()
            },
        )
        .unwrap_or_else(|err| panic!("{what}: {err}"));
        eprintln!("{what}: {calls:?}");
        check(&what, Precision::Fp16, &c.want, &got);
        let (_, cudnn) = emulate(&emu, &c, Precision::Fp16, H100_SMEM_OPTIN, true).unwrap();
        let n = count;
        let taken = n(&calls, "conv_igemm_f16_n128");
        assert!(taken > 0, "{what}: {calls:?}");
        // each convolution either way; the kernel's bias passes gone with it
        let convs = |m: &BTreeMap<String, usize>| {
            m.iter()
                .filter(|(k, _)| k.starts_with("cudnn"))
                .map(|(_, v)| v)
                .sum::<usize>()
        };
        assert_eq!(convs(&calls) + taken, convs(&cudnn), "{what}");
        assert!(
            n(&calls, "bias_residual_f16") < n(&cudnn, "bias_residual_f16")
                || n(&cudnn, "bias_residual_f16") == 0,
            "{what}: {calls:?} vs {cudnn:?}"
        );
    }
}

/// The feed-forwards' first projection and its GEGLU as one `gemm_geglu_f16_nBN` (an engine's
/// choice where it times faster than cuBLASLt and `geglu`): the tiny UNet in both layouts, both
/// tile widths, runs as on the interpreter, with every GEGLU pair on the kernel — no `geglu`
/// pass, one cuBLASLt matmul fewer each.
#[test]
fn gemm_geglu_runs_the_tiny_unet() {
    let Some(emu) = emu() else { return };
    let c = tiny_unet_case();
    let pairs = {
        let mut p = c.prog.clone();
        specialize(&mut p, Precision::Fp16);
        // the memory plan keeps each projection's input apart from its GEGLU's output, which
        // the kernel writes while it still reads that input
        let plan = plan_memory_for(&p, Precision::Fp16);
        let range = |b: usize| {
            plan.offsets[b].map(|o| (o, o + p.buffers[b].numel * Precision::Fp16.elem_bytes()))
        };
        for &(li, gi) in &geglu_pairs(&p, Precision::Fp16) {
            let (Step::Linear { x, .. }, Step::Geglu { out, .. }) = (&p.steps[li], &p.steps[gi])
            else {
                panic!("steps {li}, {gi}: not a Linear and a GEGLU");
            };
            if let (Some(a), Some(b)) = (range(*x), range(*out)) {
                assert!(
                    a.1 <= b.0 || b.1 <= a.0,
                    "steps {li}, {gi}: {a:?} and {b:?} overlap"
                );
            }
        }
        // the plan once every pair runs on the kernel: the projections' outputs have no space,
        // and no two buffers live at once (a projection's input through its GEGLU) share any
        let pairs = geglu_pairs(&p, Precision::Fp16);
        let fused = plan_memory_fused(&p, Precision::Fp16, &pairs);
        let mut life = lifetimes(&p);
        for &(li, gi) in &pairs {
            let (Step::Linear { x, out, .. }, _) = (&p.steps[li], &p.steps[gi]) else {
                unreachable!()
            };
            assert_eq!(fused.offsets[*out], None, "step {li}'s output");
            if let Some(l) = life[*x].as_mut() {
                l.1 = l.1.max(gi);
            }
        }
        assert_disjoint_while_live(&p, &fused, &life);
        // what keeps a pair off the kernel: float32; a projection with a bias or residual of
        // its own; its output read by another step as well
        let (li, gi) = pairs[0];
        assert_eq!(geglu_linear(&p, gi, Precision::Fp16), Some(li));
        assert_eq!(geglu_linear(&p, gi, Precision::Fp32), None);
        let (y, any) = (p.steps[li].io().1, p.steps[li].io().0[0]);
        let mut q = p.clone();
        if let Step::Linear { bias, .. } = &mut q.steps[li] {
            *bias = Some(any);
        }
        assert_eq!(geglu_linear(&q, gi, Precision::Fp16), None, "with a bias");
        let mut q = p.clone();
        if let Step::Linear { residual, .. } = &mut q.steps[li] {
            *residual = Some(any);
        }
        assert_eq!(
            geglu_linear(&q, gi, Precision::Fp16),
            None,
            "with a residual"
        );
        let mut q = p.clone();
        q.steps.push(Step::Binary {
            out: any,
            a: y,
            b: y,
            op: BinaryOp::Add,
            s: None,
            n: 1,
        });
        assert_eq!(geglu_linear(&q, gi, Precision::Fp16), None, "read twice");
        pairs.len()
    };
    assert!(
        pairs > 0,
        "the tiny UNet has GEGLU pairs the kernel computes"
    );
    let (_, plain) = emulate(&emu, &c, Precision::Fp16, H100_SMEM_OPTIN, true).unwrap();
    let n = count;
    assert_eq!(n(&plain, "geglu_f16"), pairs, "{plain:?}");
    for bn in [64, 128] {
        let what = format!("tiny unet Fp16 gemm_geglu_f16_n{bn}");
        let (got, calls) = emulate_with(
            &emu,
            &c,
            Precision::Fp16,
            H100_SMEM_OPTIN,
            true,
            Kernels {
                geglu: Some(bn),
                ..Default::default()
            },
        )
        .unwrap_or_else(|err| panic!("{what}: {err}"));
        eprintln!("{what}: {calls:?}");
        check(&what, Precision::Fp16, &c.want, &got);
        assert_eq!(n(&calls, &format!("gemm_geglu_f16_n{bn}")), pairs, "{what}");
        assert_eq!(n(&calls, "geglu_f16"), 0, "{what}: {calls:?}");
        assert_eq!(
            n(&calls, "cublasLt matmul") + pairs,
            n(&plain, "cublasLt matmul"),
            "{what}: {calls:?} vs {plain:?}"
        );
        // run in the arena planned again without the projections' [rows, 2d] outputs (here no
        // smaller: the peak lies elsewhere; at SD1.5's sizes 1,364 -> 804 MiB, engine_floor)
        assert!(n(&calls, "arena bytes") > 0, "{what}: {calls:?}");
    }
    // the step-by-step comparison of a failed check passes over the projections the kernel
    // computes (their outputs are never written) and finds nothing wrong; here with the arena
    // as planned at load (which the kernel runs in as well)
    assert_trace_clean(&emu, &c, "tiny unet gemm_geglu_f16_n64", |p| {
        p.geglu_kernel = Some(64)
    });
}

/// A normalisation and the GEMM that alone reads its output — the transformers' GroupNorm and
/// `proj_in`, their attentions' LayerNorm and Q (Q, K, V) projection — as the normalisation's
/// statistics and one `conv_igemm_gn_f16_nBN` / `conv_igemm_ln_f16_nBN` reading its input (an
/// engine's choice where it times faster than the two steps): the tiny UNet, both tile widths,
/// runs as on the interpreter with every such pair on the kernels — no apply pass or LayerNorm
/// for them, one cuBLASLt matmul fewer each — in the arena planned again without the
/// normalisations' outputs; and what keeps a pair off them.
#[test]
fn normalisation_pairs_run_the_tiny_unet() {
    let Some(emu) = emu() else { return };
    let c = tiny_unet_case();
    let mut p = c.prog.clone();
    specialize(&mut p, Precision::Fp16);
    let pairs = norm_pairs(&p, Precision::Fp16);
    let is_gn = |gi: usize| matches!(p.steps[gi], Step::GroupNorm { .. });
    let gn: Vec<(usize, usize)> = pairs.iter().copied().filter(|&(gi, _)| is_gn(gi)).collect();
    let ln: Vec<(usize, usize)> = pairs
        .iter()
        .copied()
        .filter(|&(gi, _)| !is_gn(gi))
        .collect();
    let linears = pairs
        .iter()
        .filter(|&&(_, ci)| matches!(p.steps[ci], Step::Linear { .. }))
        .count();
    assert!(
        !gn.is_empty() && !ln.is_empty(),
        "the tiny UNet has GroupNorm and LayerNorm pairs: {pairs:?}"
    );
    // the plan at load keeps each normalisation's input apart from its GEMM's output, which the
    // kernel writes while it still reads that input; once every pair runs on the kernels, the
    // normalisations' outputs have no space, and no two buffers live at once share any
    let plan = plan_memory_for(&p, Precision::Fp16);
    let fused = plan_memory_fused(&p, Precision::Fp16, &pairs);
    let eb = Precision::Fp16.elem_bytes();
    let mut life = lifetimes(&p);
    for &(gi, ci) in &pairs {
        let (x, out) = (p.steps[gi].io().0[0], p.steps[gi].io().1);
        let (cx, cout) = match &p.steps[ci] {
            Step::Conv(cv) => (cv.x, cv.out),
            Step::Linear { x, out, .. } => (*x, *out),
            st => panic!("step {ci}: {}", st.name()),
        };
        assert_eq!(cx, out);
        let range = |b: usize| plan.offsets[b].map(|o| (o, o + p.buffers[b].numel * eb));
        if let (Some(a), Some(b)) = (range(x), range(cout)) {
            assert!(
                a.1 <= b.0 || b.1 <= a.0,
                "steps {gi}, {ci}: {a:?} and {b:?} overlap"
            );
        }
        assert_eq!(fused.offsets[out], None, "step {gi}'s output");
        if let Some(l) = life[x].as_mut() {
            l.1 = l.1.max(ci);
        }
    }
    assert_disjoint_while_live(&p, &fused, &life);
    // what keeps a pair off the kernels: float32; the normalisation's output read by another
    // step as well (or as the second step's residual); another normalisation in between (they
    // share the scratch that holds the statistics); a channels-first GroupNorm; SiLU (the
    // ResNets' GroupNorms before their convolutions: none is a pair); a LayerNorm that adds a
    // positional table (the motion modules'); a projection whose output a GEGLU reads
    let silu_before_conv = p.steps.iter().enumerate().any(|(i, st)| {
        let Step::Conv(cv) = st else { return false };
        matches!(
            p.steps[..i].iter().rev().find(|s| s.io().1 == cv.x),
            Some(Step::GroupNorm {
                silu: true,
                channels_last: true,
                ..
            })
        )
    });
    assert!(silu_before_conv, "the tiny UNet has ResNet GroupNorms");
    assert!(pairs
        .iter()
        .all(|&(gi, _)| !matches!(p.steps[gi], Step::GroupNorm { silu: true, .. })));
    let no = |q: &Program, ci: usize, what: &str| {
        assert_eq!(norm_pair_first(q, ci, Precision::Fp16), None, "{what}");
    };
    for &(gi, ci) in [gn[0], ln[0]].iter() {
        assert_eq!(norm_pair_first(&p, ci, Precision::Fp16), Some(gi));
        assert_eq!(norm_pair_first(&p, ci, Precision::Fp32), None);
        let y = p.steps[gi].io().1;
        let any = p.steps[gi].io().0[0];
        let mut q = p.clone();
        q.steps.push(Step::Binary {
            out: any,
            a: y,
            b: y,
            op: BinaryOp::Add,
            s: None,
            n: 1,
        });
        no(&q, ci, "read twice");
        let mut q = p.clone();
        match &mut q.steps[ci] {
            Step::Conv(cv) => cv.residual = Some(y),
            Step::Linear { residual, .. } => *residual = Some(y),
            _ => unreachable!(),
        }
        no(&q, ci, "as the residual too");
        let mut q = p.clone();
        let other = q.steps[gi].clone();
        q.steps.insert(gi + 1, other);
        // (the copy writes the same output: the GEMM now reads the second normalisation)
        assert_eq!(norm_pair_first(&q, ci + 1, Precision::Fp16), Some(gi + 1));
        match &mut q.steps[gi + 1] {
            Step::GroupNorm { out, .. } | Step::LayerNorm { out, .. } => *out = any,
            _ => unreachable!(),
        }
        no(&q, ci + 1, "a normalisation in between");
        let mut q = p.clone();
        match &mut q.steps[gi] {
            Step::GroupNorm { silu, .. } => *silu = true,
            Step::LayerNorm { add, .. } => *add = Some((any, 1, 1)),
            _ => unreachable!(),
        }
        no(&q, ci, "with SiLU / a positional table");
    }
    let (gi, ci) = gn[0];
    let mut q = p.clone();
    if let Step::GroupNorm { channels_last, .. } = &mut q.steps[gi] {
        *channels_last = false;
    }
    no(&q, ci, "channels first");
    let ff = geglu_pairs(&p, Precision::Fp16);
    let (li, _) = ff[0];
    let lx = p.steps[li].io().0[0];
    assert!(
        matches!(
            p.steps.iter().find(|s| s.io().1 == lx),
            Some(Step::LayerNorm { .. })
        ),
        "a feed-forward's projection reads a LayerNorm"
    );
    no(&p, li, "a GEGLU's projection");

    let n = count;
    let (_, plain) = emulate_with(
        &emu,
        &c,
        Precision::Fp16,
        H100_SMEM_OPTIN,
        true,
        Kernels {
            conv: Some(64),
            ..Default::default()
        },
    )
    .unwrap();
    for bn in [64, 128] {
        let what = format!("tiny unet Fp16 conv_igemm_gn/_ln_f16_n{bn}");
        let (got, calls) = emulate_with(
            &emu,
            &c,
            Precision::Fp16,
            H100_SMEM_OPTIN,
            true,
            Kernels {
                conv: Some(64),
                norm: Some(bn),
                ..Default::default()
            },
        )
        .unwrap_or_else(|err| panic!("{what}: {err}"));
        eprintln!("{what}: {calls:?}");
        check(&what, Precision::Fp16, &c.want, &got);
        for (k, want) in [
            (format!("conv_igemm_gn_f16_n{bn}"), gn.len()),
            ("group_norm_nhwc_coeffs_f16".into(), gn.len()),
            (format!("conv_igemm_ln_f16_n{bn}"), ln.len()),
            ("layer_norm_stats_f16".into(), ln.len()),
        ] {
            assert_eq!(n(&calls, &k), want, "{what}: {k}");
        }
        for (k, fewer) in [
            ("group_norm_nhwc_apply_f16", gn.len()),
            ("layer_norm_warp_f16", ln.len()),
            ("conv_igemm_f16_n64", pairs.len() - linears),
            ("cublasLt matmul", linears),
        ] {
            assert_eq!(
                n(&calls, k) + fewer,
                n(&plain, k),
                "{what}: {k}: {calls:?} vs {plain:?}"
            );
        }
    }
    // the step-by-step comparison passes over the normalisations the kernels apply (their
    // outputs are never written) and finds nothing wrong
    assert_trace_clean(&emu, &c, "tiny unet conv_igemm_gn/_ln_f16_n128", |p| {
        p.use_norm_pairs(128)
    });
}

/// No two buffers that `plan` places share bytes while both are live (`life`: first and last
/// step of each, as the plan was made with).
fn assert_disjoint_while_live(
    p: &Program,
    plan: &program::MemoryPlan,
    life: &[Option<(usize, usize)>],
) {
    let placed: Vec<(usize, usize, usize, (usize, usize))> = (0..p.buffers.len())
        .filter_map(|b| {
            let o = plan.offsets[b]?;
            let bytes = p.buffers[b].numel * Precision::Fp16.elem_bytes();
            Some((b, o, o + bytes, life[b]?))
        })
        .collect();
    for (i, a) in placed.iter().enumerate() {
        for b in &placed[i + 1..] {
            let live = a.3 .0 <= b.3 .1 && b.3 .0 <= a.3 .1;
            let share = a.1 < b.2 && b.1 < a.2;
            assert!(!(live && share), "buffers {} and {} overlap", a.0, b.0);
        }
    }
}

/// The step-by-step comparison of case `c` on the emulated float16 executor, set up by `setup`,
/// names no step and finds every step within its tolerance.
fn assert_trace_clean(emu: &Emu, c: &Case, what: &str, setup: impl FnOnce(&mut EmuProgram<'_>)) {
    use motionrt_runtime::engine::localize::Localizer;
    let wf =
        |n: &str| -> Result<WeightData, EngineError> { Ok(WeightData::F32(c.weights[n].clone())) };
    let w32 = |n: &str| -> Result<Vec<f32>, EngineError> { Ok(c.weights[n].clone()) };
    let f: Vec<(&str, &[f32])> = c.f.iter().map(|(k, v)| (k.as_str(), &v[..])).collect();
    let i: Vec<(&str, &[i64])> = c.i.iter().map(|(k, v)| (k.as_str(), &v[..])).collect();
    let mut p = EmuProgram::load(
        emu,
        c.prog.clone(),
        Precision::Fp16,
        &wf,
        H100_SMEM_OPTIN,
        true,
    )
    .unwrap();
    setup(&mut p);
    let mut loc = Localizer::new(&p.program, Precision::Fp16, &c.f, &c.i, &w32).unwrap();
    p.trace(&f, &i, &mut loc).unwrap();
    let report = loc.report(what, 5);
    assert!(loc.culprit().is_none(), "{report}");
    assert!(loc.clean(), "{report}");
}

/// The step-by-step comparison a failed GPU check runs (`engine::localize`, `engine_gpu
/// localize`): through the emulated executor every step of the tiny UNet's specialised program
/// is within the per-step tolerance; with one weight corrupted on the "device" only, the step
/// named is the one that reads it, and the steps after it are seen to inherit the error.
#[test]
fn localize_names_the_step_that_departs_from_the_reference() {
    use motionrt_runtime::engine::localize::{checkpoints, Localizer};
    let Some(emu) = emu() else { return };
    let c = tiny_unet_case();
    let wf =
        |n: &str| -> Result<WeightData, EngineError> { Ok(WeightData::F32(c.weights[n].clone())) };
    let w32 = |n: &str| -> Result<Vec<f32>, EngineError> { Ok(c.weights[n].clone()) };
    let f: Vec<(&str, &[f32])> = c.f.iter().map(|(k, v)| (k.as_str(), &v[..])).collect();
    let i: Vec<(&str, &[i64])> = c.i.iter().map(|(k, v)| (k.as_str(), &v[..])).collect();
    for precision in [Precision::Fp32, Precision::Fp16] {
        let mut p =
            EmuProgram::load(&emu, c.prog.clone(), precision, &wf, H100_SMEM_OPTIN, true).unwrap();
        let points = checkpoints(&p.program).iter().flatten().count();
        let mut loc = Localizer::new(&p.program, precision, &c.f, &c.i, &w32).unwrap();
        p.trace(&f, &i, &mut loc).unwrap();
        let report = loc.report(&format!("tiny unet {precision:?}"), 5);
        eprintln!("{report}");
        assert_eq!(
            loc.steps.len(),
            points,
            "{precision:?}: every checkpoint compared"
        );
        assert!(
            points > p.program.steps.len() / 2,
            "{points} of {}",
            p.program.steps.len()
        );
        assert!(loc.culprit().is_none(), "{precision:?}: {report}");
        assert!(
            report.contains("every step within the tolerance"),
            "{report}"
        );

        // a convolution in the middle of the program, its weight corrupted
        let cps = checkpoints(&p.program);
        let convs: Vec<(usize, usize)> = p
            .program
            .steps
            .iter()
            .enumerate()
            .filter_map(|(si, s)| match s {
                Step::Conv(cv) if cps[si].is_some() => Some((si, cv.w)),
                _ => None,
            })
            .collect();
        let (target, wbuf) = convs[convs.len() / 2];
        // the weight is read by that step alone (else another step could be named first)
        let readers = p
            .program
            .steps
            .iter()
            .filter(|s| s.io().0.contains(&wbuf))
            .count();
        assert_eq!(readers, 1);
        p.fault = Some((0, wbuf));
        let mut loc = Localizer::new(&p.program, precision, &c.f, &c.i, &w32).unwrap();
        p.trace(&f, &i, &mut loc).unwrap();
        let report = loc.report(
            &format!("tiny unet {precision:?}, step {target}'s weight corrupted"),
            5,
        );
        eprintln!("{report}");
        let culprit = loc.culprit().unwrap_or_else(|| panic!("{report}"));
        assert_eq!(culprit.step, target, "{report}");
        assert!(culprit.input_rel < 3e-2, "{report}");
        // every step before it is clean, and later ones inherit the error
        assert!(loc
            .steps
            .iter()
            .filter(|e| e.step < target)
            .all(|e| e.stats.max_rel_to_ref_max < 3e-2));
        assert!(
            loc.steps
                .iter()
                .any(|e| e.step > target && e.input_rel > 3e-2),
            "{report}"
        );
        assert!(report.contains(&format!("step {target} (conv")), "{report}");

        // an activation overwritten between its write and a later read (what an out-of-bounds
        // write or a race does) is named with both steps
        let mut p =
            EmuProgram::load(&emu, c.prog.clone(), precision, &wf, H100_SMEM_OPTIN, true).unwrap();
        let steps = &p.program.steps;
        let (w, b, r) = (0..steps.len())
            .find_map(|w| {
                let b = steps[w].io().1;
                // its next reader, two or more steps later, with no write in between
                let r = (w + 1..steps.len())
                    .find(|&r| steps[r].io().0.contains(&b) || steps[r].io().1 == b)?;
                (r > w + 1 && steps[r].io().1 != b && p.program.buffers[b].numel > 1)
                    .then_some((w, b, r))
            })
            .expect("a buffer read two steps after its write");
        p.fault = Some((r, b));
        let mut loc = Localizer::new(&p.program, precision, &c.f, &c.i, &w32).unwrap();
        p.trace(&f, &i, &mut loc).unwrap();
        let report = loc.report(&format!("tiny unet {precision:?}, buffer {b} clobbered"), 3);
        eprintln!("{report}");
        let k = loc.clobbers.first().unwrap_or_else(|| panic!("{report}"));
        assert_eq!((k.buffer, k.written_at, k.read_at), (b, w, r), "{report}");
        assert!(!loc.clean());
        assert!(
            report.contains(&format!("buffer {b} changed after step {w} wrote it")),
            "{report}"
        );
    }
}

/// The fallback of Linear epilogues to a GEMM and a bias/residual pass (where cuBLASLt has no
/// algorithm), and the refusal of a GPU whose shared memory cannot hold the attention kernels.
#[test]
fn the_executors_fallbacks_compute_the_same() {
    let Some(emu) = emu() else { return };
    let c = tiny_unet_case();
    // the float16 specialisation (motion modules on frame-major rows, their residual add in a
    // GEMM epilogue, ResNet convolutions' biases added by the GroupNorm after them, Q, K, V from
    // one GEMM read in place) computes the same on the interpreter too, to float32 rounding
    let mut special = c.prog.clone();
    let s = specialize(&mut special, Precision::Fp16);
    assert!(
        s.merged > 0 && s.frame_major > 0 && s.residual_adds > 0 && s.conv_biases > 0,
        "{s:?}"
    );
    assert!(special.steps.len() < c.prog.steps.len());
    // a shortcut GEMM's bias and the bias of the convolution it adds, one vector (host values
    // added here: the tiny graphs' weights are inline; initializers become a summed weight)
    assert!(
        special.steps.iter().any(|s| matches!(
            s,
            Step::Linear { bias: Some(b), residual: Some(_), .. }
                if *b >= c.prog.buffers.len()
                    && matches!(
                        special.buffers[*b].kind,
                        BufferKind::Weight(WeightSource::Computed(_) | WeightSource::Sum(_))
                    )
        )),
        "no shortcut GEMM took its convolution's bias"
    );
    let w = |n: &str| Ok(c.weights[n].clone());
    let got = cpu_exec::run(&special, &c.f, &c.i, &w).unwrap();
    check(
        "unet, float16 specialisation, interpreter",
        Precision::Fp32,
        &c.want,
        &got,
    );
    let (got, calls) = emulate(&emu, &c, Precision::Fp16, H100_SMEM_OPTIN, false).unwrap();
    check("unet without cuBLASLt", Precision::Fp16, &c.want, &got);
    assert!(!calls.contains_key("cublasLt matmul"), "{calls:?}");
    assert!(calls.contains_key("bias_residual_f16"), "{calls:?}");
    // a GPU without the shared memory the attention kernels need: a clear error, no launch
    let e = emulate(&emu, &c, Precision::Fp16, 8 * 1024, true).unwrap_err();
    assert!(e.to_string().contains("shared memory"), "{e}");
    // the weights as a float16 engine's file holds them (float16 bits: the upload's own
    // permutation of channels-last filters, concatenation of merged projections, widening of
    // summed biases) compute what the float32 weights rounded at upload do: the same values
    // but for the summed biases, rounded once more
    let (want16, _) = emulate(&emu, &c, Precision::Fp16, H100_SMEM_OPTIN, true).unwrap();
    let k = Kernels {
        f16_weights: true,
        ..Kernels::default()
    };
    let (got16, _) = emulate_with(&emu, &c, Precision::Fp16, H100_SMEM_OPTIN, true, k).unwrap();
    for ((name, _, a), (_, _, b)) in want16.iter().zip(&got16) {
        let top = a.iter().fold(0f32, |m, x| m.max(x.abs()));
        let d = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(
            d <= 1e-3 * top,
            "{name}: float16 weights {d} from float32's (max {top})"
        );
    }
    assert_eq!(want16.len(), got16.len());
}

/// The tiny pipeline exported (float32, diffusers semantics): the export, its `out` folder, a
/// folder for the fused graphs, and the text width.
fn tiny_export() -> (Exported, std::path::PathBuf, tempfile::TempDir, usize) {
    let e = export_pipeline(
        &pipeline_fixtures().join("tiny"),
        false,
        Semantics::Diffusers,
        ExportPrecision::Fp32,
    );
    let src = e.dir.path().join("out");
    let d = text_width(&src);
    (e, src, tempfile::tempdir().unwrap(), d)
}

/// The tiny UNet, fused, compiled channels-last for one sample of 2 frames at 8×8.
fn tiny_unet_case() -> Case {
    let (_export, src, dst, d) = tiny_export();
    let inputs: Inputs = vec![
        ("sample", vec![1, 4, 2, 8, 8]),
        ("timestep", vec![1]),
        ("encoder_hidden_states", vec![2, 77, d]),
    ];
    let z = dst.path().join("unet.onnx");
    plan_graph(&src.join("unet.onnx"), &z).unwrap();
    case(&z, &inputs, Layout::Nhwc)
}

struct NoInitializers;
impl InitializerSource for NoInitializers {
    fn f32s(&self, t: &TensorProto) -> Result<Vec<f32>, EngineError> {
        Err(EngineError::Graph(format!("no initializer {}", t.name)))
    }
    fn i64s(&self, t: &TensorProto) -> Result<Vec<i64>, EngineError> {
        Err(EngineError::Graph(format!("no initializer {}", t.name)))
    }
}

/// One `com.motionrt::TemporalAttention` over inputs `q`, `k`, `v` `[N, L|S, heads·d]`.
fn attention_model(heads: usize) -> ModelProto {
    let io = |n: &str| {
        let d: Vec<Dim> = ["n", "l", "c"]
            .iter()
            .map(|s| Dim::Symbolic(format!("{n}{s}")))
            .collect();
        value_info(n, TensorProtoDataType::Float, &d)
    };
    ModelProto {
        graph: Some(GraphProto {
            node: vec![NodeProto {
                name: "attn".into(),
                op_type: "TemporalAttention".into(),
                domain: motionrt_kernels::DOMAIN.into(),
                input: vec!["q".into(), "k".into(), "v".into()],
                output: vec!["y".into()],
                attribute: vec![attr_int("num_heads", heads as i64)],
                ..Default::default()
            }],
            input: vec![io("q"), io("k"), io("v")],
            output: vec![io("y")],
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The float16 attention dispatch at the SD1.5 head sizes (40, 80, 160): over frames (L ≤ 16,
/// ≤ 32) one warp per (sequence, head), over pixels and the text 128-row blocks with ragged
/// edges — and on a GPU with 99 KiB of opt-in shared memory (sm_86/sm_89), where the 32-frame
/// kernel for 160-wide heads does not fit and the tiled one takes it. Then with the two-tile
/// kernel chosen (as where it times faster): the d = 40 tiled attention on
/// `attention_tiled2_f16_d40`, the others as they were.
#[test]
fn float16_attention_takes_the_kernel_the_shapes_and_the_gpu_allow() {
    let Some(emu) = emu() else { return };
    let cases = [
        // (n, l, s, heads, d, smem opt-in, kernel)
        (
            3,
            16,
            16,
            2,
            40,
            H100_SMEM_OPTIN,
            "attention_short1_f16_d40",
        ),
        (
            2,
            24,
            24,
            1,
            160,
            H100_SMEM_OPTIN,
            "attention_short2_f16_d160",
        ),
        (2, 24, 24, 1, 160, 101_376, "attention_tiled_f16_d160"),
        (
            1,
            200,
            200,
            2,
            40,
            H100_SMEM_OPTIN,
            "attention_tiled_f16_d40",
        ),
        (
            1,
            130,
            77,
            1,
            80,
            H100_SMEM_OPTIN,
            "attention_tiled_f16_d80",
        ),
    ];
    for (n, l, s, heads, d, optin, kernel) in cases {
        let c = heads * d;
        let shapes: Inputs = vec![
            ("q", vec![n, l, c]),
            ("k", vec![n, s, c]),
            ("v", vec![n, s, c]),
        ];
        let prog = program::compile(
            &attention_model(heads),
            &shapes,
            &NoInitializers,
            Layout::Nhwc,
        )
        .unwrap();
        let (f, i) = seeded(&shapes);
        let want = cpu_exec::run(&prog, &f, &i, &|n: &str| {
            Err(EngineError::Graph(format!("no weight {n}")))
        })
        .unwrap();
        let c = Case {
            prog,
            weights: HashMap::new(),
            f,
            i,
            want,
        };
        let what = format!("N {n} L {l} S {s} {heads}x{d}, {optin} B of shared memory");
        let (got, calls) = emulate(&emu, &c, Precision::Fp16, optin, true)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(attention_kernels(&calls), [kernel], "{what}");
        check(&what, Precision::Fp16, &c.want, &got);
        // the two-tile kernel chosen
        let w = |n: &str| -> Result<WeightData, EngineError> {
            Err(EngineError::Graph(format!("no weight {n}")))
        };
        let mut p = EmuProgram::load(&emu, c.prog.clone(), Precision::Fp16, &w, optin, true)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        p.attention_two = true;
        let f: Vec<(&str, &[f32])> = c.f.iter().map(|(k, v)| (k.as_str(), &v[..])).collect();
        let got = p
            .run(&f, &[])
            .unwrap_or_else(|e| panic!("{what}, two tiles: {e}"));
        let two = kernel.replace("attention_tiled_f16_d40", "attention_tiled2_f16_d40");
        assert_eq!(
            attention_kernels(&p.calls),
            [two.as_str()],
            "{what}, two tiles"
        );
        check(
            &format!("{what}, two tiles"),
            Precision::Fp16,
            &c.want,
            &got,
        );
    }
}

/// Before an engine takes one of motionrt's tactic kernels for a problem (where its timing came
/// out faster), the GPU executor runs the problem's steps as they are and then on the kernel, on
/// the same pseudo-random inputs, and compares the outputs (`tactic_io`, `tactic_agrees`). The
/// same check on the emulated executor: every convolution, GEGLU pair and normalisation pair of
/// the tiny UNet, and a d = 40 attention, pass it at both tile widths (so the check turns no
/// correct kernel away: its inputs are all filled, its tolerance holds), and a kernel that reads a
/// corrupted weight fails it (so it would turn a wrong one away).
#[test]
fn tactic_kernels_are_checked_against_the_libraries_before_they_are_taken() {
    let Some(emu) = emu() else { return };
    let c = tiny_unet_case();
    let w =
        |n: &str| -> Result<WeightData, EngineError> { Ok(WeightData::F32(c.weights[n].clone())) };
    let f16 = Precision::Fp16;
    let mut p = EmuProgram::load(&emu, c.prog.clone(), f16, &w, H100_SMEM_OPTIN, true).unwrap();
    // (the program as specialised at load: its step indices)
    let convs: Vec<usize> = (0..p.program.steps.len())
        .filter(|&si| conv_igemm_for(&p.program, si, f16, Some(64)).is_some())
        .collect();
    let geglus = geglu_pairs(&p.program, f16);
    let norms = norm_pairs(&p.program, f16);
    assert!(
        convs.len() >= 4 && !geglus.is_empty() && !norms.is_empty(),
        "{convs:?} {geglus:?} {norms:?}"
    );
    let mut worst = 0f64;
    let mut checked = 0;
    let mut agrees = |what: String, r: Result<f64, String>| {
        let rel = r.unwrap_or_else(|e| panic!("{what}: {e}"));
        worst = worst.max(rel);
        checked += 1;
    };
    for bn in CONV_IGEMM_WIDTHS {
        for &si in &convs {
            let r = p.tactic_check(&[si], &|p| p.conv_kernel = Some(bn));
            agrees(format!("convolution {si} n{bn}"), r.unwrap());
        }
        for &(li, gi) in &geglus {
            let r = p.tactic_check(&[li, gi], &|p| p.geglu_kernel = Some(bn));
            agrees(format!("GEGLU pair {li} {gi} n{bn}"), r.unwrap());
        }
        for &(gi, ci) in &norms {
            let r = p.tactic_check(&[gi, ci], &|p| p.norm_pair = Some(bn));
            agrees(format!("normalisation pair {gi} {ci} n{bn}"), r.unwrap());
        }
        // the kernels ran (not the libraries twice), once a problem each
        for (kernel, n) in [
            ("conv_igemm_f16", convs.len()),
            ("gemm_geglu_f16", geglus.len()),
            ("conv_igemm_gn_f16", 0),
            ("conv_igemm_ln_f16", 0),
        ] {
            let got = p
                .calls
                .get(&format!("{kernel}_n{bn}"))
                .copied()
                .unwrap_or(0);
            assert!(
                got > 0 && (n == 0 || got == n),
                "{kernel}_n{bn}: {got} of {n}: {:?}",
                p.calls
            );
        }
    }
    assert_eq!(
        p.calls["conv_igemm_gn_f16_n64"] + p.calls["conv_igemm_ln_f16_n64"],
        norms.len()
    );
    // a d = 40 attention over 200 pixels on two 16-row tiles a warp against one
    let shapes: Inputs = vec![
        ("q", vec![1, 200, 80]),
        ("k", vec![1, 200, 80]),
        ("v", vec![1, 200, 80]),
    ];
    let prog =
        program::compile(&attention_model(2), &shapes, &NoInitializers, Layout::Nhwc).unwrap();
    let none = |n: &str| -> Result<WeightData, EngineError> {
        Err(EngineError::Graph(format!("no weight {n}")))
    };
    let mut a = EmuProgram::load(&emu, prog, f16, &none, H100_SMEM_OPTIN, true).unwrap();
    let si = (0..a.program.steps.len())
        .find(|&si| matches!(a.program.steps[si], Step::Attention { d: 40, .. }))
        .expect("an attention step");
    let r = a.tactic_check(&[si], &|a| a.attention_two = true).unwrap();
    agrees("attention two tiles".into(), r);
    assert!(
        a.calls.contains_key("attention_tiled_f16_d40")
            && a.calls.contains_key("attention_tiled2_f16_d40"),
        "{:?}",
        a.calls
    );
    eprintln!("{checked} tactic checks passed, worst max |Δ| / max |ref| {worst:.2e}");
    // a kernel that computes something else: the projection's weight corrupted before the
    // kernel's run (the libraries' ran on the true one)
    let (li, gi) = geglus[0];
    let Step::Linear { w: wb, .. } = p.program.steps[li] else {
        panic!("a GEGLU pair starts with a Linear")
    };
    let r = p
        .tactic_check(&[li, gi], &|p| {
            p.geglu_kernel = Some(64);
            p.corrupt(wb, 1e4).unwrap();
        })
        .unwrap();
    let e = r.expect_err("a kernel on a corrupted weight agreed");
    assert!(e.contains("max |Δ|"), "{e}");
    assert_eq!(
        p.geglu_kernel, None,
        "the check restores the program's choice"
    );
}

/// The full SD1.5 + AnimateDiff v2 UNet (2 frames, 16×16 latent: heads of 40/80/160, 320 to
/// 1280 channels, the mid block, motion modules), the SD VAE decoder (its 512-wide attention as
/// GEMMs) and the CLIP ViT-L/14 text encoder, in both layouts, float16, on the emulated executor
/// against the float32 interpreter. Minutes; run by hand with `MOTIONRT_FULL_PLAN=DIR` (a
/// `motionrt build --plan-only` folder of a `synth_sd15 --components` export):
/// `MOTIONRT_FULL_PLAN=/tmp/full/plan ./scripts/test --test engine_emu -- --ignored`.
#[test]
#[ignore]
fn full_architecture_runs_on_the_emulated_executor() {
    let Some((dir, emu)) = full_plan() else {
        return;
    };
    let cases: [(&str, Inputs); 3] = [
        (
            "unet",
            vec![
                ("sample", vec![1, 4, 2, 16, 16]),
                ("timestep", vec![1]),
                ("encoder_hidden_states", vec![2, 77, 768]),
            ],
        ),
        ("vae_decoder", vec![("latent", vec![1, 4, 8, 8])]),
        ("text_encoder", vec![("input_ids", vec![1, 77])]),
    ];
    for (graph, inputs) in cases {
        let z = Path::new(&dir).join(format!("{graph}.onnx"));
        if !z.exists() {
            eprintln!("SKIP: {}: not exported", z.display());
            continue;
        }
        for layout in [Layout::Nhwc, Layout::Nchw] {
            let t = std::time::Instant::now();
            let c = case(&z, &inputs, layout);
            eprintln!(
                "full {graph} {layout:?}: interpreter {:.0} s",
                t.elapsed().as_secs_f64()
            );
            let t = std::time::Instant::now();
            let what = format!("full {graph} {layout:?} Fp16");
            let (got, calls) = emulate(&emu, &c, Precision::Fp16, H100_SMEM_OPTIN, true)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            eprintln!(
                "{what}: {} steps emulated in {:.0} s: {calls:?}",
                c.prog.steps.len(),
                t.elapsed().as_secs_f64()
            );
            check(&what, Precision::Fp16, &c.want, &got);
            if layout == Layout::Nhwc && graph != "text_encoder" {
                // the convolutions conv_igemm_f16 takes on it instead of cuDNN (both tile
                // widths: 128 in the UNet, whose 320 channels leave half the last block's
                // warps idle; 64 in the VAE)
                let t = std::time::Instant::now();
                // — and in the UNet, its feed-forwards' GEGLU pairs on gemm_geglu_f16_n64, and
                // its GroupNorm pairs on conv_igemm_gn_f16 at the convolutions' width
                let bn = if graph == "unet" { 128 } else { 64 };
                let gk = (graph == "unet").then_some(64);
                let what = format!(
                    "{what} conv_igemm_n{bn}{} conv_igemm_gn_n{bn}",
                    if gk.is_some() {
                        " gemm_geglu_n64 attention_tiled2_d40"
                    } else {
                        ""
                    }
                );
                let (got, calls) = emulate_with(
                    &emu,
                    &c,
                    Precision::Fp16,
                    H100_SMEM_OPTIN,
                    true,
                    Kernels {
                        conv: Some(bn),
                        geglu: gk,
                        norm: Some(bn),
                        attention_two: graph == "unet",
                        ..Kernels::default()
                    },
                )
                .unwrap_or_else(|e| panic!("{what}: {e}"));
                eprintln!(
                    "{what}: emulated in {:.0} s: {calls:?}",
                    t.elapsed().as_secs_f64()
                );
                let k = format!("conv_igemm_f16_n{bn}");
                assert!(calls.get(&k).is_some_and(|&n| n > 0), "{what}");
                // the transformers' GroupNorm and proj_in (the VAE's GroupNorms all end in
                // SiLU: none of its pairs is eligible)
                if graph == "unet" {
                    let k = format!("conv_igemm_gn_f16_n{bn}");
                    assert!(calls.get(&k).is_some_and(|&n| n > 0), "{what}: {calls:?}");
                }
                if gk.is_some() {
                    assert!(
                        calls.get("gemm_geglu_f16_n64").is_some_and(|&n| n > 0),
                        "{what}"
                    );
                    assert!(!calls.contains_key("geglu_f16"), "{what}: {calls:?}");
                    // the 64x64 level's attentions over its 256 pixels (and the text)
                    assert!(
                        calls
                            .get("attention_tiled2_f16_d40")
                            .is_some_and(|&n| n > 0)
                            && !calls.contains_key("attention_tiled_f16_d40"),
                        "{what}: {calls:?}"
                    );
                }
                check(&what, Precision::Fp16, &c.want, &got);
            }
        }
    }
}

/// What puts a program's steps on a tactic kernel ([`EmuProgram::tactic_check`]).
type TacticOn<'a> = dyn Fn(&mut EmuProgram<'_>) + 'a;

/// The tactic kernels' correctness check (see
/// `tactic_kernels_are_checked_against_the_libraries_before_they_are_taken`) at the full SD1.5 +
/// v2 UNet's widths, where its tolerance matters most: the convolution with the longest
/// reduction (2560 channels × 9 taps at the 8×8 level's up block), the widest GEGLU pair
/// (1280 → 2·5120), the normalisation pairs of the widest GroupNorm and LayerNorm, and a d = 40
/// self-attention, at both tile widths, pass it. Run by hand like the test above
/// (`MOTIONRT_FULL_PLAN=DIR`; a few minutes).
#[test]
#[ignore]
fn tactic_checks_pass_at_the_full_architectures_widths() {
    let Some((dir, emu)) = full_plan() else {
        return;
    };
    let z = Path::new(&dir).join("unet.onnx");
    let inputs: Inputs = vec![
        ("sample", vec![1, 4, 2, 16, 16]),
        ("timestep", vec![1]),
        ("encoder_hidden_states", vec![2, 77, 768]),
    ];
    let model = load_model(&z).unwrap();
    let src = FileInitializers::new(&z);
    let prog = program::compile(&model, &inputs, &src, Layout::Nhwc).unwrap();
    let weights = initializers(&model, &src);
    let w =
        |n: &str| -> Result<WeightData, EngineError> { Ok(WeightData::F32(weights[n].clone())) };
    let f16 = Precision::Fp16;
    let mut p = EmuProgram::load(&emu, prog, f16, &w, H100_SMEM_OPTIN, true).unwrap();
    let steps = p.program.steps.clone();
    let conv = (0..steps.len())
        .filter(|&si| conv_igemm_for(&p.program, si, f16, Some(64)).is_some())
        .max_by_key(|&si| match &steps[si] {
            Step::Conv(c) => c.x_shape[1] * c.w_shape[2] * c.w_shape[3],
            _ => 0,
        })
        .expect("a convolution conv_igemm takes");
    let k_of = |si: usize| match &steps[si] {
        Step::Linear { k, n, .. } => k * n,
        Step::Conv(c) => c.x_shape[1] * c.w_shape[0],
        _ => 0,
    };
    let geglu = geglu_pairs(&p.program, f16)
        .into_iter()
        .max_by_key(|&(li, _)| k_of(li))
        .expect("a GEGLU pair");
    let pairs = norm_pairs(&p.program, f16);
    let widest = |gn: bool| {
        pairs
            .iter()
            .copied()
            .filter(|&(ni, _)| matches!(steps[ni], Step::GroupNorm { .. }) == gn)
            .max_by_key(|&(_, ci)| k_of(ci))
    };
    let (gn, ln) = (
        widest(true).expect("a GroupNorm pair"),
        widest(false).expect("a LayerNorm pair"),
    );
    let attention = (0..steps.len())
        .find(|&si| matches!(steps[si], Step::Attention { d: 40, l, s, .. } if l == s && l > 16))
        .expect("a d = 40 self-attention");
    for bn in CONV_IGEMM_WIDTHS {
        let checks: [(&str, Vec<usize>, &TacticOn<'_>); 4] = [
            ("convolution", vec![conv], &|p| p.conv_kernel = Some(bn)),
            ("GEGLU pair", vec![geglu.0, geglu.1], &|p| {
                p.geglu_kernel = Some(bn)
            }),
            ("GroupNorm pair", vec![gn.0, gn.1], &|p| {
                p.norm_pair = Some(bn)
            }),
            ("LayerNorm pair", vec![ln.0, ln.1], &|p| {
                p.norm_pair = Some(bn)
            }),
        ];
        for (what, s, kernel) in checks {
            let t = std::time::Instant::now();
            let r = p.tactic_check(&s, kernel).unwrap();
            let rel = r.unwrap_or_else(|e| panic!("{what} {s:?} n{bn}: {e}"));
            eprintln!(
                "{what} {s:?} n{bn}: max |Δ| / max |ref| {rel:.2e} ({:.0} s)",
                t.elapsed().as_secs_f64()
            );
        }
    }
    let r = p
        .tactic_check(&[attention], &|p| p.attention_two = true)
        .unwrap();
    let rel = r.unwrap_or_else(|e| panic!("attention {attention}: {e}"));
    eprintln!("attention {attention} on two tiles: max |Δ| / max |ref| {rel:.2e}");
}

/// `x → [Conv 3×3] → GroupNorm(+SiLU) → y` with seeded weights.
/// How the GroupNorm's input is made: the graph input itself (NCHW); a 3×3 convolution of it
/// (channels-last in that layout); or the input given `[N, H, W, C]` and transposed to NCHW (a
/// channels-last view, as a concatenation of channels-last tensors is).
#[derive(Clone, Copy, PartialEq)]
enum Before {
    Nothing,
    Conv,
    Transpose,
}

fn group_norm_model(
    c: usize,
    groups: usize,
    before: Before,
) -> (ModelProto, HashMap<String, Vec<f32>>) {
    let mut rng = NormalRng::new(c as u64 * 7 + groups as u64);
    let mut vals =
        |n: usize, scale: f32| -> Vec<f32> { (0..n).map(|_| rng.normal() * scale).collect() };
    let mut weights = HashMap::new();
    weights.insert(
        "gamma".to_string(),
        vals(c, 0.5).iter().map(|v| v + 1.0).collect(),
    );
    weights.insert("beta".to_string(), vals(c, 0.5));
    let mut node = Vec::new();
    let mut x = "x";
    if before == Before::Transpose {
        node.push(NodeProto {
            name: "to_nchw".into(),
            op_type: "Transpose".into(),
            input: vec!["x".into()],
            output: vec!["xt".into()],
            attribute: vec![attr_ints("perm", &[0, 3, 1, 2])],
            ..Default::default()
        });
        x = "xt";
    }
    if before == Before::Conv {
        weights.insert(
            "w".to_string(),
            vals(c * c * 9, 1.0 / (3.0 * c as f32).sqrt()),
        );
        weights.insert("b".to_string(), vals(c, 0.5));
        node.push(NodeProto {
            name: "conv".into(),
            op_type: "Conv".into(),
            input: vec!["x".into(), "w".into(), "b".into()],
            output: vec!["h".into()],
            attribute: vec![
                attr_ints("kernel_shape", &[3, 3]),
                attr_ints("pads", &[1, 1, 1, 1]),
            ],
            ..Default::default()
        });
        x = "h";
    }
    node.push(NodeProto {
        name: "gn".into(),
        op_type: "GroupNorm".into(),
        domain: motionrt_kernels::DOMAIN.into(),
        input: vec![x.into(), "gamma".into(), "beta".into()],
        output: vec!["y".into()],
        attribute: vec![
            attr_int("num_groups", groups as i64),
            attr_float("epsilon", 1e-5),
            attr_string("activation", "silu"),
        ],
        ..Default::default()
    });
    let dims = |n: &str| -> Vec<Dim> {
        ["n", "c", "h", "w"]
            .iter()
            .map(|s| Dim::Symbolic(format!("{n}{s}")))
            .collect()
    };
    let shapes: [(&str, Vec<i64>); 4] = [
        ("w", vec![c as i64, c as i64, 3, 3]),
        ("b", vec![c as i64]),
        ("gamma", vec![c as i64]),
        ("beta", vec![c as i64]),
    ];
    let initializer = shapes
        .iter()
        .filter(|(n, _)| weights.contains_key(*n))
        .map(|(n, d)| tensor_f32(n, d, &weights[*n]))
        .collect();
    let m = ModelProto {
        graph: Some(GraphProto {
            node,
            input: vec![value_info("x", TensorProtoDataType::Float, &dims("x"))],
            output: vec![value_info("y", TensorProtoDataType::Float, &dims("y"))],
            initializer,
            ..Default::default()
        }),
        ..Default::default()
    };
    (m, weights)
}

/// GroupNorm's three executor paths: one block per group; groups of more than 16384 values
/// split over blocks (NCHW: the motion modules' cross-frame norms, the VAE at full size); and
/// channels-last statistics over several chunks of positions merged per group.
#[test]
fn group_norm_runs_on_every_path_the_executor_takes() {
    let Some(emu) = emu() else { return };
    let cases = [
        // (c, groups, h·w, input made by, layout, kernels expected)
        (
            64,
            32,
            (96, 96),
            Before::Nothing,
            Layout::Nchw,
            "group_norm_stats",
        ),
        (
            64,
            32,
            (8, 8),
            Before::Nothing,
            Layout::Nchw,
            "group_norm_f",
        ),
        (
            64,
            32,
            (32, 32),
            Before::Conv,
            Layout::Nhwc,
            "group_norm_nhwc_stats",
        ),
        // SD1.5's widest norm (2560 channels of a concatenation): a block of 320 threads
        (
            2560,
            32,
            (4, 3),
            Before::Transpose,
            Layout::Nhwc,
            "group_norm_nhwc_stats",
        ),
    ];
    for (c, groups, (h, w), before, layout, kernel) in cases {
        let (m, weights) = group_norm_model(c, groups, before);
        let x = if before == Before::Transpose {
            vec![2, h, w, c]
        } else {
            vec![2, c, h, w]
        };
        let shapes: Inputs = vec![("x", x)];
        let prog = program::compile(&m, &shapes, &InlineInitializers, layout).unwrap();
        let (f, i) = seeded(&shapes);
        let wf = |n: &str| Ok(weights[n].clone());
        let want = cpu_exec::run(&prog, &f, &i, &wf).unwrap();
        let case = Case {
            prog,
            weights,
            f,
            i,
            want,
        };
        for precision in [Precision::Fp16, Precision::Fp32] {
            let what = format!("GroupNorm c {c} / {groups} over {h}×{w} {layout:?} {precision:?}");
            let (got, calls) = emulate(&emu, &case, precision, H100_SMEM_OPTIN, true)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            assert!(
                calls.keys().any(|k| k.starts_with(kernel)),
                "{what}: {calls:?}"
            );
            check(&what, precision, &case.want, &got);
        }
    }
}

/// Programs of one graph at other input shapes share its weights on the device (a session
/// compiles one per shape): the second placement uploads only what the compiler computed (host
/// constants) and finds every other weight where the first put it, with the bytes a placement
/// of its own would upload.
#[test]
fn programs_of_one_graph_at_other_shapes_share_its_weights() {
    use motionrt_runtime::engine::launch::{place_buffers, plan_memory_for, weight_key};
    let (_export, src, dst, d) = tiny_export();
    let z = dst.path().join("unet.onnx");
    plan_graph(&src.join("unet.onnx"), &z).unwrap();
    let at = |frames: usize| -> Inputs {
        vec![
            ("sample", vec![1, 4, frames, 8, 8]),
            ("timestep", vec![1]),
            ("encoder_hidden_states", vec![frames, 77, d]),
        ]
    };
    let (a, b) = (
        case(&z, &at(2), Layout::Nhwc),
        case(&z, &at(3), Layout::Nhwc),
    );
    // a fake device: address -> bytes
    let mut device: HashMap<u64, Vec<u8>> = HashMap::new();
    let mut next = 1u64 << 32;
    let mut place = |c: &Case, known: &mut HashMap<String, u64>| {
        let mut p = c.prog.clone();
        specialize(&mut p, Precision::Fp16);
        let memory = plan_memory_for(&p, Precision::Fp16);
        let w = |n: &str| -> Result<WeightData, EngineError> {
            Ok(WeightData::F32(c.weights[n].clone()))
        };
        let (ptrs, bytes) = place_buffers(
            &p,
            &memory,
            0,
            Precision::Fp16,
            &w,
            &mut |v: &[u8]| {
                let at = next;
                next += v.len().next_multiple_of(256).max(256) as u64;
                device.insert(at, v.to_vec());
                Ok(at)
            },
            known,
        )
        .unwrap();
        (p, ptrs, bytes)
    };
    let mut shared = HashMap::new();
    let (_, _, first) = place(&a, &mut shared);
    let keys = shared.len();
    let (pb, shared_ptrs, second) = place(&b, &mut shared);
    let (_, own_ptrs, alone) = place(&b, &mut HashMap::new());
    assert!(
        keys > 0 && shared.len() == keys,
        "{keys} then {}",
        shared.len()
    );
    assert!(second < alone / 2, "{first} {second} {alone}");
    let mut reused = 0;
    for (i, buf) in pb.buffers.iter().enumerate() {
        let BufferKind::Weight(ws) = &buf.kind else {
            continue;
        };
        let (Some(x), Some(y)) = (device.get(&shared_ptrs[i]), device.get(&own_ptrs[i])) else {
            continue;
        };
        assert_eq!(x, y, "weight buffer {i} ({ws:?})");
        reused += weight_key(ws, buf.dtype, Precision::Fp16).is_some() as usize;
    }
    assert!(reused > 0);
    eprintln!(
        "second shape: {second} bytes uploaded instead of {alone} ({reused} weights shared, {keys} keys)"
    );
}

/// A CUDA engine's tensors hold at most 2^31 - 1 elements (cuDNN's legacy API and the kernels
/// count them in 32-bit integers): the tiny VAE decoder at a 2048×2048 image runs as many frames
/// a call as `max_batch` says and no more — one frame more is refused, before anything is
/// placed, by a message naming the step that writes the tensor. (The SD1.5 VAE decoder at
/// 768×768, the default build's largest profile, holds 151 million elements a frame in its
/// 256-channel layers: 14 frames a call, not the default 16.)
#[test]
fn tensors_past_32_bit_element_counts_are_refused_and_the_vae_takes_fewer_frames() {
    let (_export, src, dst, _) = tiny_export();
    let z = dst.path().join("vae_decoder.onnx");
    plan_graph(&src.join("vae_decoder.onnx"), &z).unwrap();
    // (the engine's graphs hold no initializer past INLINE_MAX values, which the planner keeps
    // by name without reading: the tiny VAE's are all smaller)
    let model = load_model(&z).unwrap();
    let fp16 = Precision::Fp16;
    let shape = |frames: usize| vec![frames, 4, 128, 128];
    let compiled = |frames: usize| {
        let mut p = program::compile(
            &model,
            &[("latent", shape(frames))],
            &InlineInitializers,
            Layout::Nhwc,
        )
        .unwrap();
        specialize(&mut p, fp16);
        p
    };
    let (_, one) = compiled(1).largest_activation().unwrap();
    // the mid block's attention scores, 16384 × 16384 a frame
    assert_eq!(one, 16384 * 16384);
    let most =
        motionrt_runtime::engine::file::max_batch(&model, "latent", &shape(1), Layout::Nhwc, fp16)
            .unwrap();
    assert_eq!(most, program::MAX_TENSOR_ELEMENTS / one);
    assert!((2..64).contains(&most), "{most} frames of {one} elements");
    let fits = compiled(most);
    fits.check_tensor_sizes().unwrap();
    assert_eq!(fits.largest_activation().unwrap().1, most * one);
    let over = compiled(most + 1);
    let e = over.check_tensor_sizes().unwrap_err().to_string();
    assert!(
        e.contains(&format!("{} elements", (most + 1) * one))
            && e.contains("the output of step")
            && e.contains("fewer frames"),
        "{e}"
    );
    // what `motionrt build` makes of it at each profile (latents 128×128: a 1024×1024 image)
    use motionrt_runtime::engine::file::{check_profile, Profile};
    let p = Profile {
        batch: 1,
        frames: 16,
        height: 128,
        width: 128,
    };
    assert_eq!(
        check_profile("vae_decoder", "max", &p, most, &fits).unwrap(),
        None
    );
    let note = check_profile("vae_decoder", "max", &p, most + 1, &over)
        .unwrap()
        .unwrap();
    assert!(
        note.contains(&format!("`run` takes {most} a call")) && note.contains("1024x1024"),
        "{note}"
    );
    let e = check_profile("vae_decoder", "opt", &p, most + 1, &over)
        .unwrap_err()
        .to_string();
    assert!(e.contains(&format!("--vae-chunk {most} or less")), "{e}");
    let e = check_profile("unet", "max", &p, most + 1, &over)
        .unwrap_err()
        .to_string();
    assert!(e.contains("lower --max-shape"), "{e}");
    // the emulated executor, like the GPU's, refuses it before placing a buffer
    let Some(emu) = emu() else { return };
    let no_weights = |n: &str| -> Result<WeightData, EngineError> {
        panic!("weight {n} asked for: the program should have been refused first")
    };
    let e = EmuProgram::load(&emu, over, fp16, &no_weights, H100_SMEM_OPTIN, true)
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains("2^31 - 1"), "{e}");
}
