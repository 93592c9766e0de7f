//! Graph-level tools: `motionrt infer` runs one graph from saved (or seeded random) inputs and
//! writes every output to .npz; `motionrt compare` runs the same inputs through two
//! configurations and reports per-output error metrics, optionally for every intermediate tensor.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use motionrt_export::onnx::proto::{DataLocation, ValueInfoProto};
use motionrt_export::onnx::{load_model, summarize, IoInfo};
use motionrt_runtime::npy::{self, NpyArray, NpyData};
use motionrt_runtime::rng::NormalRng;
use motionrt_runtime::{error_stats, Input, OrtSession, Output, OutputData};
use serde::Serialize;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendArg {
    /// ONNX Runtime on the CPU.
    Cpu,
    /// Not for one graph: the native CUDA engine (`motionrt build`) runs whole pipelines
    /// (`motionrt run --engine`, `motionrt bench --engine`); chosen here, an error that says so.
    Cuda,
}

/// Where the inputs come from (shared by infer and compare).
#[derive(Args, Clone)]
pub struct InputArgs {
    /// Inputs by name: an .npz file or a directory of NAME.npy files.
    #[arg(long, conflicts_with = "random")]
    pub inputs: Option<PathBuf>,
    /// Draw inputs from the graph's declared shapes instead: float inputs standard normal
    /// (`timestep`: integers in [0, 1000)), int64 inputs uniform in [0, --int-high).
    #[arg(long)]
    pub random: bool,
    /// Size of a symbolic dimension for --random, as NAME=SIZE (repeatable), e.g. --dim B=2
    /// --dim F=16. A name made of given names (BF) gets their product.
    #[arg(long = "dim", value_name = "NAME=SIZE")]
    pub dims: Vec<String>,
    /// Seed of --random.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Exclusive upper bound of random int64 inputs (token ids). Default: the text encoder's
    /// vocabulary from model.json beside the graph, else 49408.
    #[arg(long = "int-high")]
    pub int_high: Option<u64>,
    /// Where --random saves the inputs it drew (.npz), so the run can be repeated elsewhere.
    /// Default: `infer` beside --out as NAME.inputs.npz; `compare`
    /// $TMPDIR/motionrt-compare.inputs.npz.
    #[arg(long = "save-inputs")]
    pub save_inputs: Option<PathBuf>,
}

#[derive(Args)]
pub struct InferArgs {
    /// The ONNX graph to run.
    #[arg(long, required_unless_present = "model", conflicts_with = "model")]
    pub graph: Option<PathBuf>,
    /// A model directory written by `motionrt export`; runs DIR/<graph-name>.onnx.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// With --model: unet, vae_decoder, vae_encoder or text_encoder (or vae-decoder ...).
    #[arg(long = "graph-name", default_value = "unet")]
    pub graph_name: String,
    #[command(flatten)]
    pub input: InputArgs,
    /// Write every graph output here (.npz, readable with numpy.load).
    #[arg(long)]
    pub out: PathBuf,
    /// Where the graph runs.
    #[arg(long, value_enum, default_value = "cpu")]
    pub backend: BackendArg,
    /// ONNX Runtime threads per operator (0: all cores).
    #[arg(long, default_value_t = 0, value_parser = crate::parse_threads)]
    pub threads: usize,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct CompareArgs {
    /// The reference: an ONNX graph (run here on the inputs) or an .npz of outputs (from
    /// `motionrt infer --out`).
    pub reference: PathBuf,
    /// The configuration under test: an ONNX graph or an .npz of outputs.
    pub test: PathBuf,
    #[command(flatten)]
    pub input: InputArgs,
    /// Absolute tolerance: an element passes when |test − ref| ≤ atol + rtol·|ref|.
    #[arg(long, default_value_t = 1e-4)]
    pub atol: f64,
    /// Relative tolerance (see --atol).
    #[arg(long, default_value_t = 1e-4)]
    pub rtol: f64,
    /// Also compare every intermediate tensor the two graphs share by name, in the reference's
    /// node order, and name the first that diverges (both sides must be ONNX graphs).
    #[arg(long = "mark-all")]
    pub mark_all: bool,
    /// ONNX Runtime threads per operator (0: all cores).
    #[arg(long, default_value_t = 0, value_parser = crate::parse_threads)]
    pub threads: usize,
    /// Print the comparison as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// A graph's inputs and outputs as declared (initializers excluded).
struct GraphIo {
    inputs: Vec<IoInfo>,
    outputs: Vec<IoInfo>,
}

fn graph_io(path: &Path) -> Result<GraphIo> {
    let model = load_model(path)?;
    let s = summarize(&model);
    let inits: std::collections::HashSet<&str> = model
        .graph
        .as_ref()
        .map(|g| g.initializer.iter().map(|t| t.name.as_str()).collect())
        .unwrap_or_default();
    let inputs = s
        .inputs
        .into_iter()
        .filter(|i| !inits.contains(i.name.as_str()))
        .collect();
    Ok(GraphIo {
        inputs,
        outputs: s.outputs,
    })
}

fn describe(io: &[IoInfo]) -> String {
    io.iter()
        .map(|i| format!("{} {}[{}]", i.name, i.elem_type, i.dims.join(",")))
        .collect::<Vec<_>>()
        .join(", ")
}

fn dtype_name(a: &NpyArray) -> &'static str {
    match a.data {
        NpyData::F32(_) => "float",
        NpyData::I64(_) => "int64",
    }
}

/// Check feeds against the declared inputs: names, element types, ranks, fixed sizes and
/// consistent symbolic sizes.
fn check_feeds(
    graph: &Path,
    io: &GraphIo,
    source: &str,
    feeds: &[(String, NpyArray)],
) -> Result<()> {
    let takes = describe(&io.inputs);
    for i in &io.inputs {
        if !feeds.iter().any(|(n, _)| n == &i.name) {
            bail!(
                "{}: input `{}` is missing from {source}; the graph takes: {takes}",
                graph.display(),
                i.name
            );
        }
    }
    let mut symbols: HashMap<&str, (usize, &str)> = HashMap::new();
    for (name, arr) in feeds {
        let Some(i) = io.inputs.iter().find(|i| &i.name == name) else {
            bail!(
                "{source}: `{name}` is not an input of {}; the graph takes: {takes}",
                graph.display()
            );
        };
        let want = match i.elem_type.as_str() {
            "float" => "float",
            "int64" => "int64",
            other => bail!(
                "{}: input `{name}` is {other}; motionrt feeds float and int64 inputs",
                graph.display()
            ),
        };
        if dtype_name(arr) != want {
            bail!(
                "{source}: `{name}` is {} ({}); the graph declares {}[{}]",
                dtype_name(arr),
                arr.dtype,
                i.elem_type,
                i.dims.join(",")
            );
        }
        let bad_shape = |why: String| {
            anyhow::anyhow!(
                "{source}: `{name}` has shape {:?}; the graph declares {}[{}]: {why}",
                arr.shape,
                i.elem_type,
                i.dims.join(",")
            )
        };
        if !i.dims.is_empty() && arr.shape.len() != i.dims.len() {
            return Err(bad_shape(format!(
                "rank {} instead of {}",
                arr.shape.len(),
                i.dims.len()
            )));
        }
        for (k, (d, &n)) in i.dims.iter().zip(&arr.shape).enumerate() {
            if let Ok(fixed) = d.parse::<usize>() {
                if fixed != n {
                    return Err(bad_shape(format!("dimension {k} must be {fixed}")));
                }
            } else if d != "?" {
                match symbols.get(d.as_str()) {
                    Some(&(v, other)) if v != n => {
                        return Err(bad_shape(format!("`{d}` is {v} in `{other}` but {n} here")))
                    }
                    _ => {
                        symbols.insert(d.as_str(), (n, name.as_str()));
                    }
                }
            }
        }
    }
    // a name made of others (`BF` of `B` and `F`: the UNet's per-frame text rows) is their
    // product, as the exporter declares it
    let sizes: BTreeMap<String, usize> = symbols
        .iter()
        .map(|(k, (v, _))| (k.to_string(), *v))
        .collect();
    for (&d, &(n, name)) in &symbols {
        let mut others = sizes.clone();
        others.remove(d);
        if let Some(p) = symbol_size(d, &others).filter(|&p| p != n && !d.is_empty()) {
            bail!(
                "{source}: `{name}` has {d} = {n}, but the other inputs make {d} = {p} (the product of the sizes it is named after); the graph takes: {takes}"
            );
        }
    }
    Ok(())
}

fn parse_dims(args: &[String]) -> Result<BTreeMap<String, usize>> {
    args.iter()
        .map(|a| {
            let (k, v) = a
                .split_once('=')
                .with_context(|| format!("--dim {a:?}: expected NAME=SIZE, e.g. F=16"))?;
            let v = v
                .trim()
                .parse::<usize>()
                .ok()
                .filter(|&v| v > 0)
                .with_context(|| format!("--dim {a:?}: {v:?} is not a size (1 or more)"))?;
            Ok((k.trim().to_string(), v))
        })
        .collect()
}

/// The size of symbol `d`: given, or the product of given names it is made of (`BF` = B·F).
fn symbol_size(d: &str, given: &BTreeMap<String, usize>) -> Option<usize> {
    if let Some(&v) = given.get(d) {
        return Some(v);
    }
    if d.is_empty() {
        return Some(1);
    }
    // longest given name first, so `BF` with B, F and BF all given takes BF above
    let mut names: Vec<&String> = given.keys().filter(|k| !k.is_empty()).collect();
    names.sort_by_key(|k| std::cmp::Reverse(k.len()));
    for k in names {
        if let Some(rest) = d.strip_prefix(k.as_str()) {
            if let Some(r) = symbol_size(rest, given) {
                return Some(given[k] * r);
            }
        }
    }
    None
}

/// The vocabulary size from model.json beside the graph, if any.
fn vocab_beside(graph: &Path) -> Option<u64> {
    let dir = graph.parent()?;
    let text = std::fs::read_to_string(dir.join("model.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.pointer("/text_encoder_config/vocab_size")?.as_u64()
}

fn random_inputs(graph: &Path, io: &GraphIo, a: &InputArgs) -> Result<Vec<(String, NpyArray)>> {
    let given = parse_dims(&a.dims)?;
    // a name given and also made of given names (BF with B and F) must agree with them
    for (k, &v) in &given {
        let mut others = given.clone();
        others.remove(k);
        if let Some(product) = symbol_size(k, &others).filter(|&p| p != v && !k.is_empty()) {
            bail!("--dim {k}={v}, but the other --dim values make {k} = {product}: give one or the other");
        }
    }
    let mut missing = Vec::new();
    let mut shapes = Vec::new();
    for i in &io.inputs {
        let mut shape = Vec::new();
        for (k, d) in i.dims.iter().enumerate() {
            if let Ok(v) = d.parse::<usize>() {
                shape.push(v);
            } else if let Some(v) = symbol_size(d, &given) {
                shape.push(v);
            } else if d == "?" {
                bail!("{}: dimension {k} of input `{}` has neither a size nor a name, so --random cannot size it; pass --inputs", graph.display(), i.name);
            } else {
                if !missing.contains(d) {
                    missing.push(d.clone());
                }
                shape.push(0);
            }
        }
        shapes.push(shape);
    }
    // a missing name made of other missing names (BF of B and F) is sized by those
    let composite = |m: &String| {
        let mut g = given.clone();
        for o in missing.iter().filter(|o| *o != m) {
            g.insert(o.clone(), 1);
        }
        symbol_size(m, &g).is_some()
    };
    let parts: Vec<String> = missing.iter().filter(|m| !composite(m)).cloned().collect();
    let missing = if parts.is_empty() { missing } else { parts };
    if !missing.is_empty() {
        bail!(
            "{}: --random needs the size of {}: pass {} (the graph takes: {})",
            graph.display(),
            missing.join(", "),
            missing
                .iter()
                .map(|m| format!("--dim {m}=N"))
                .collect::<Vec<_>>()
                .join(" "),
            describe(&io.inputs)
        );
    }
    let int_high = a.int_high.or_else(|| vocab_beside(graph)).unwrap_or(49408);
    if int_high == 0 {
        bail!("--int-high must be at least 1");
    }
    if let Some(vocab) = vocab_beside(graph).filter(|&v| int_high > v) {
        bail!(
            "--int-high {int_high}: token ids must stay below the text encoder's vocabulary of {vocab} (model.json)"
        );
    }
    let mut rng = NormalRng::new(a.seed);
    let mut out = Vec::new();
    for (i, shape) in io.inputs.iter().zip(shapes) {
        let n: usize = shape.iter().product();
        let arr = match i.elem_type.as_str() {
            "float" if i.name.contains("timestep") => {
                let v = (0..n).map(|_| rng.below(1000) as f32).collect();
                NpyArray::f32(shape, v)
            }
            "float" => {
                let mut v = vec![0f32; n];
                rng.fill(&mut v);
                NpyArray::f32(shape, v)
            }
            "int64" => {
                let v = (0..n).map(|_| rng.below(int_high) as i64).collect();
                NpyArray::i64(shape, v)
            }
            other => bail!(
                "{}: input `{}` is {other}; --random draws float and int64 inputs",
                graph.display(),
                i.name
            ),
        };
        out.push((i.name.clone(), arr));
    }
    Ok(out)
}

/// Named arrays, in order.
type Arrays = Vec<(String, NpyArray)>;

/// Inputs for `graph`: read (`--inputs`) or drawn (`--random`, saved to `save`), checked.
fn load_inputs(
    graph: &Path,
    io: &GraphIo,
    a: &InputArgs,
    default_save: Option<PathBuf>,
) -> Result<(Arrays, Option<PathBuf>)> {
    match (&a.inputs, a.random) {
        (Some(p), _) => {
            let feeds = npy::read_arrays(p)?;
            check_feeds(graph, io, &p.display().to_string(), &feeds)?;
            Ok((feeds, None))
        }
        (None, true) => {
            let feeds = random_inputs(graph, io, a)?;
            let save = a.save_inputs.clone().or(default_save);
            if let Some(s) = &save {
                npy::write_npz(s, &feeds)?;
            }
            Ok((feeds, save))
        }
        (None, false) => bail!(
            "give the inputs: --inputs FILE.npz|DIR, or --random (with --dim NAME=SIZE for symbolic sizes); {} takes: {}",
            graph.display(),
            describe(&io.inputs)
        ),
    }
}

fn run_graph(
    graph: &Path,
    feeds: &[(String, NpyArray)],
    threads: usize,
) -> Result<(Vec<Output>, f64, f64)> {
    let t = Instant::now();
    let mut s = OrtSession::load(graph, &crate::session_options(threads))?;
    let load = t.elapsed().as_secs_f64();
    let inputs: Vec<(&str, Input<'_>)> = feeds
        .iter()
        .map(|(n, a)| {
            (
                n.as_str(),
                match &a.data {
                    NpyData::F32(v) => Input::F32(&a.shape, v),
                    NpyData::I64(v) => Input::I64(&a.shape, v),
                },
            )
        })
        .collect();
    let t = Instant::now();
    let out = s.run_outputs(&inputs)?;
    Ok((out, load, t.elapsed().as_secs_f64()))
}

fn outputs_to_arrays(out: &[Output]) -> (Vec<(String, NpyArray)>, Vec<String>) {
    let mut arrays = Vec::new();
    let mut skipped = Vec::new();
    for o in out {
        match &o.data {
            OutputData::F32(v) => {
                arrays.push((o.name.clone(), NpyArray::f32(o.shape.clone(), v.clone())))
            }
            OutputData::I64(v) => {
                arrays.push((o.name.clone(), NpyArray::i64(o.shape.clone(), v.clone())))
            }
            OutputData::Unsupported(t) => skipped.push(format!("{} ({t})", o.name)),
        }
    }
    (arrays, skipped)
}

fn no_cuda(backend: BackendArg) -> Result<()> {
    if backend == BackendArg::Cuda {
        bail!("--backend cuda: `infer` runs one ONNX graph on ONNX Runtime (--backend cpu); a native CUDA engine, made by `motionrt build`, runs whole pipelines: `motionrt run --engine ENGINE` or `motionrt bench --engine ENGINE`");
    }
    Ok(())
}

fn with_suffix(p: &Path, suffix: &str) -> PathBuf {
    let stem = p
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("out")
        .to_string();
    p.with_file_name(format!("{stem}{suffix}"))
}

pub fn infer(a: InferArgs) -> Result<()> {
    no_cuda(a.backend)?;
    let graph = match (&a.graph, &a.model) {
        (Some(g), _) => g.clone(),
        (None, Some(m)) => {
            // `vae-decoder` as `bench --graph` spells it, or the file's `vae_decoder`
            let p = m.join(format!("{}.onnx", a.graph_name.replace('-', "_")));
            if !p.is_file() {
                bail!(
                    "{}: no such graph in {} (graphs there: {})",
                    p.display(),
                    m.display(),
                    list_graphs(m)
                );
            }
            p
        }
        (None, None) => bail!("give --graph FILE.onnx or --model DIR"),
    };
    let io = graph_io(&graph)?;
    let (feeds, saved) = load_inputs(
        &graph,
        &io,
        &a.input,
        Some(with_suffix(&a.out, ".inputs.npz")),
    )?;
    let (out, load_s, run_s) = run_graph(&graph, &feeds, a.threads).inspect_err(|_| {
        if let Some(s) = &saved {
            eprintln!(
                "note: the inputs drawn are saved in {} (--inputs repeats them)",
                s.display()
            );
        }
    })?;
    let (arrays, skipped) = outputs_to_arrays(&out);
    npy::write_npz(&a.out, &arrays)?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "graph": graph,
                "inputs": feeds.iter().map(|(n, a)| serde_json::json!({"name": n, "dtype": dtype_name(a), "shape": a.shape})).collect::<Vec<_>>(),
                "inputs_saved": saved,
                "outputs": arrays.iter().map(|(n, a)| serde_json::json!({"name": n, "dtype": dtype_name(a), "shape": a.shape})).collect::<Vec<_>>(),
                "skipped_outputs": skipped,
                "out": a.out,
                "load_s": load_s,
                "run_s": run_s,
            }))?
        );
    } else {
        println!(
            "ran {} in {:.2} ms (session load {:.2} ms, ONNX Runtime CPU)",
            graph.display(),
            run_s * 1e3,
            load_s * 1e3
        );
        for (n, arr) in &feeds {
            println!("  input  {n}: {}{:?}", dtype_name(arr), arr.shape);
        }
        for (n, arr) in &arrays {
            println!("  output {n}: {}{:?}", dtype_name(arr), arr.shape);
        }
        for s in &skipped {
            eprintln!("warning: output {s} not written: motionrt writes float and int64 tensors");
        }
        if let Some(s) = saved {
            println!("inputs saved to {}", s.display());
        }
        println!("outputs written to {}", a.out.display());
    }
    Ok(())
}

fn list_graphs(dir: &Path) -> String {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|r| {
            r.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let n = e.file_name().to_string_lossy().to_string();
                    n.strip_suffix(".onnx").map(str::to_string)
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

/// Per-tensor comparison result.
#[derive(Debug, Clone, Serialize)]
pub struct TensorCompare {
    pub name: String,
    pub shape: Vec<usize>,
    pub max_abs: f64,
    /// max |test − ref| / max |ref|
    pub max_rel_to_ref_max: f64,
    pub mean_abs: f64,
    pub cosine: f64,
    pub nonfinite_ref: usize,
    pub nonfinite_test: usize,
    /// Elements outside atol + rtol·|ref|.
    pub violations: usize,
    pub pass: bool,
    /// Why the tensor could not be compared element-wise.
    pub note: Option<String>,
}

fn as_f32(a: &NpyArray) -> Vec<f32> {
    match &a.data {
        NpyData::F32(v) => v.clone(),
        NpyData::I64(v) => v.iter().map(|&x| x as f32).collect(),
    }
}

fn compare_tensor(name: &str, r: &NpyArray, t: &NpyArray, atol: f64, rtol: f64) -> TensorCompare {
    let mut c = TensorCompare {
        name: name.into(),
        shape: r.shape.clone(),
        max_abs: f64::NAN,
        max_rel_to_ref_max: f64::NAN,
        mean_abs: f64::NAN,
        cosine: f64::NAN,
        nonfinite_ref: 0,
        nonfinite_test: 0,
        violations: 0,
        pass: false,
        note: None,
    };
    if r.shape != t.shape {
        c.note = Some(format!("shape {:?} vs {:?}", r.shape, t.shape));
        return c;
    }
    if dtype_name(r) != dtype_name(t) {
        c.note = Some(format!("dtype {} vs {}", dtype_name(r), dtype_name(t)));
        return c;
    }
    let (rv, tv) = (as_f32(r), as_f32(t));
    let s = error_stats(&tv, &rv);
    c.max_abs = s.max_abs;
    c.max_rel_to_ref_max = s.max_rel_to_ref_max;
    c.mean_abs = s.mean_abs;
    c.cosine = s.cosine;
    c.nonfinite_ref = rv.iter().filter(|x| !x.is_finite()).count();
    c.nonfinite_test = tv.iter().filter(|x| !x.is_finite()).count();
    c.violations = motionrt_runtime::compare::allclose_violations(&tv, &rv, atol, rtol);
    // NaN or Inf anywhere fails, even where both sides hold the same one: two runs that both
    // overflowed do not agree on anything worth checking
    c.pass = c.violations == 0 && c.nonfinite_ref == 0 && c.nonfinite_test == 0;
    if c.nonfinite_ref + c.nonfinite_test > 0 {
        c.note = Some(format!(
            "non-finite values (NaN/Inf): {} in the reference, {} in the test",
            c.nonfinite_ref, c.nonfinite_test
        ));
    }
    c
}

/// The outputs of one side: run an ONNX graph, or read an .npz.
struct Side {
    path: PathBuf,
    is_graph: bool,
}

impl Side {
    fn new(p: &Path) -> Result<Self> {
        let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
        match ext {
            "onnx" => Ok(Self {
                path: p.to_path_buf(),
                is_graph: true,
            }),
            "npz" => Ok(Self {
                path: p.to_path_buf(),
                is_graph: false,
            }),
            _ => bail!(
                "{}: expected an ONNX graph (.onnx) or saved outputs (.npz)",
                p.display()
            ),
        }
    }
}

/// A copy of `graph` with every node output also a graph output, in `dir` (or, for a graph with
/// external data, beside the original); returns its path and the node outputs in node order
/// with their op.
fn mark_all(graph: &Path, dir: &Path) -> Result<(PathBuf, Vec<(String, String)>)> {
    let mut model = load_model(graph)?;
    let g = model
        .graph
        .as_mut()
        .with_context(|| format!("{}: no graph", graph.display()))?;
    let existing: std::collections::HashSet<String> =
        g.output.iter().map(|o| o.name.clone()).collect();
    let mut order = Vec::new();
    for n in &g.node {
        for o in &n.output {
            if !o.is_empty() {
                let label = if n.name.is_empty() {
                    n.op_type.clone()
                } else {
                    format!("{} ({})", n.name, n.op_type)
                };
                order.push((o.clone(), label));
            }
        }
    }
    for (name, _) in &order {
        if !existing.contains(name) {
            g.output.push(ValueInfoProto {
                name: name.clone(),
                ..Default::default()
            });
        }
    }
    let uses_external = g
        .initializer
        .iter()
        .any(|t| t.data_location == DataLocation::External as i32);
    // ONNX Runtime reads external data only from inside the model's directory (symlinks that
    // lead out are refused), so a graph with external data is marked beside the original under
    // a hidden temporary name, removed when the comparison ends.
    let out = if uses_external {
        let src_dir = graph.parent().unwrap_or(Path::new("."));
        let stem = graph
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("graph");
        src_dir.join(format!(
            ".{stem}.marked-{}-{}.onnx",
            std::process::id(),
            dir.file_name().and_then(|s| s.to_str()).unwrap_or("x")
        ))
    } else {
        dir.join(graph.file_name().unwrap_or_default())
    };
    motionrt_export::onnx::write_model(&model, &out)?;
    Ok((out, order))
}

/// Removes the marked copies written beside their originals.
struct RemoveOnDrop(Vec<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

pub fn compare(a: CompareArgs) -> Result<()> {
    let (rs, ts) = (Side::new(&a.reference)?, Side::new(&a.test)?);
    if a.mark_all && !(rs.is_graph && ts.is_graph) {
        bail!("--mark-all needs two ONNX graphs (intermediate tensors are not in saved outputs)");
    }
    if !(a.atol >= 0.0 && a.rtol >= 0.0) {
        bail!("--atol and --rtol must be non-negative");
    }
    let given = a.input.inputs.is_some()
        || a.input.random
        || !a.input.dims.is_empty()
        || a.input.int_high.is_some()
        || a.input.save_inputs.is_some();
    if given && !(rs.is_graph || ts.is_graph) {
        bail!(
            "--inputs, --random, --dim, --int-high and --save-inputs feed an ONNX graph; both sides here are saved outputs (.npz)"
        );
    }
    // Inputs come from (and are checked against) the first graph.
    let feeds = if let Some(g) = [&rs, &ts].into_iter().find(|s| s.is_graph) {
        let io = graph_io(&g.path)?;
        let default_save = a
            .input
            .random
            .then(|| std::env::temp_dir().join("motionrt-compare.inputs.npz"));
        let (feeds, saved) = load_inputs(
            &g.path,
            &io,
            &a.input,
            a.input.save_inputs.clone().or(default_save),
        )?;
        if let Some(s) = saved {
            eprintln!("inputs saved to {}", s.display());
        }
        for s in [&rs, &ts] {
            if s.is_graph && s.path != g.path {
                let io2 = graph_io(&s.path)?;
                check_feeds(&s.path, &io2, "the inputs", &feeds)?;
            }
        }
        feeds
    } else {
        Vec::new()
    };

    let tmp = tempfile::tempdir()?;
    let mut cleanup = RemoveOnDrop(Vec::new());
    let mut order: Vec<(String, String)> = Vec::new();
    let mut outputs = Vec::new();
    let mut declared: Vec<Vec<String>> = Vec::new();
    for (k, s) in [&rs, &ts].into_iter().enumerate() {
        if s.is_graph {
            let io = graph_io(&s.path)?;
            declared.push(io.outputs.iter().map(|o| o.name.clone()).collect());
            let path = if a.mark_all {
                let dir = tmp.path().join(format!("side{k}"));
                std::fs::create_dir_all(&dir)?;
                let (p, o) = mark_all(&s.path, &dir)?;
                if !p.starts_with(tmp.path()) {
                    cleanup.0.push(p.clone());
                }
                if k == 0 {
                    order = o;
                }
                p
            } else {
                s.path.clone()
            };
            let (out, _, run_s) = run_graph(&path, &feeds, a.threads)
                .with_context(|| format!("running {}", s.path.display()))?;
            if !a.json {
                eprintln!("ran {} in {:.2} ms", s.path.display(), run_s * 1e3);
            }
            outputs.push(outputs_to_arrays(&out).0);
        } else {
            let arrays = npy::read_npz(&s.path)?;
            declared.push(arrays.iter().map(|(n, _)| n.clone()).collect());
            outputs.push(arrays);
        }
    }
    let (r_out, t_out) = (&outputs[0], &outputs[1]);
    let find =
        |v: &[(String, NpyArray)], n: &str| v.iter().find(|(k, _)| k == n).map(|(_, a)| a.clone());

    // Declared outputs of the reference, in its order.
    let mut results = Vec::new();
    let mut missing = Vec::new();
    for name in &declared[0] {
        match (find(r_out, name), find(t_out, name)) {
            (Some(r), Some(t)) => results.push(compare_tensor(name, &r, &t, a.atol, a.rtol)),
            (Some(_), None) => missing.push(name.clone()),
            _ => {}
        }
    }
    if results.is_empty() {
        bail!(
            "{} and {} have no output in common (reference: {}; test: {})",
            a.reference.display(),
            a.test.display(),
            declared[0].join(", "),
            declared[1].join(", ")
        );
    }

    // Intermediates, in the reference's node order.
    let mut intermediates = Vec::new();
    let mut not_comparable = 0usize;
    if a.mark_all {
        for (name, label) in &order {
            if declared[0].contains(name) {
                continue;
            }
            if let (Some(r), Some(t)) = (find(r_out, name), find(t_out, name)) {
                if r.shape != t.shape || dtype_name(&r) != dtype_name(&t) {
                    // Same name, different tensor: graphs of different structure number
                    // their nodes differently.
                    not_comparable += 1;
                    continue;
                }
                let mut c = compare_tensor(name, &r, &t, a.atol, a.rtol);
                c.note = Some(c.note.map_or(label.clone(), |n| format!("{label}: {n}")));
                intermediates.push(c);
            }
        }
    }
    let first_divergence = intermediates.iter().find(|c| !c.pass).cloned();
    let pass = results.iter().all(|c| c.pass) && missing.is_empty();

    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "reference": a.reference,
                "test": a.test,
                "atol": a.atol,
                "rtol": a.rtol,
                "outputs": results,
                "missing_in_test": missing,
                "intermediates_compared": intermediates.len(),
                "intermediates_not_comparable": not_comparable,
                "intermediates_failed": intermediates.iter().filter(|c| !c.pass).count(),
                "first_divergence": first_divergence,
                "pass": pass,
            }))?
        );
    } else {
        println!(
            "reference {} | test {} | pass when |test − ref| ≤ {} + {}·|ref|",
            a.reference.display(),
            a.test.display(),
            a.atol,
            a.rtol
        );
        println!(
            "{:<24} {:>16} {:>11} {:>11} {:>11} {:>10} {:>9} {:>10}  result",
            "output",
            "shape",
            "max abs",
            "max/|ref|",
            "mean abs",
            "cosine",
            "nonfinite",
            "violations"
        );
        for c in &results {
            print_row(c);
        }
        for m in &missing {
            println!("{m:<24} missing from the test side");
        }
        if a.mark_all {
            let failed = intermediates.iter().filter(|c| !c.pass).count();
            println!(
                "intermediate tensors compared: {} ({} outside tolerance; {} shared names hold tensors of different shape or type, not compared)",
                intermediates.len(),
                failed,
                not_comparable
            );
            match &first_divergence {
                Some(c) => {
                    println!(
                        "first divergence: `{}` from {}",
                        c.name,
                        c.note.as_deref().unwrap_or("?")
                    );
                    print_row(c);
                }
                None => println!("no intermediate tensor diverges"),
            }
        }
        println!(
            "{}",
            if pass {
                format!("PASS: {} output(s) within tolerance", results.len())
            } else {
                let bad = results.iter().filter(|c| !c.pass).count() + missing.len();
                format!(
                    "FAIL: {bad} of {} output(s) outside tolerance",
                    results.len() + missing.len()
                )
            }
        );
    }
    if !pass {
        let nonfinite: usize = results
            .iter()
            .map(|c| c.nonfinite_ref + c.nonfinite_test)
            .sum();
        bail!(
            "{} differs from {} beyond atol {} / rtol {}{}",
            a.test.display(),
            a.reference.display(),
            a.atol,
            a.rtol,
            if nonfinite > 0 {
                format!(", or holds NaN/Inf ({nonfinite} values on the two sides)")
            } else {
                String::new()
            }
        );
    }
    Ok(())
}

fn print_row(c: &TensorCompare) {
    let name = if c.name.chars().count() > 24 {
        let tail: Vec<char> = c.name.chars().rev().take(23).collect();
        format!("…{}", tail.into_iter().rev().collect::<String>())
    } else {
        c.name.clone()
    };
    if c.max_abs.is_nan() && c.note.as_deref().is_some_and(|n| n.contains(" vs ")) {
        println!("{name:<24} FAIL: {}", c.note.as_deref().unwrap_or(""));
        return;
    }
    println!(
        "{:<24} {:>16} {:>11.3e} {:>11.3e} {:>11.3e} {:>10.6} {:>9} {:>10}  {}",
        name,
        format!("{:?}", c.shape).replace(' ', ""),
        c.max_abs,
        c.max_rel_to_ref_max,
        c.mean_abs,
        c.cosine,
        format!("{}/{}", c.nonfinite_ref, c.nonfinite_test),
        c.violations,
        if c.pass { "pass" } else { "FAIL" }
    );
}
