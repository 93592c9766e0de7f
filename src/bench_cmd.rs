//! `motionrt bench`: latency of the pipeline or one graph, a saved-report comparison, and the
//! worker mode that `bench/compare/compare.py` drives (one pipeline run per stdin line).

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use motionrt_runtime::bench::{self, BenchConfig, Machine, Memory, Recorder, Report, Versions};
use motionrt_runtime::npy::{self, NpyData};
use motionrt_runtime::pipeline::{Event, GenerateOptions, ModelInfo, Pipeline, Timings};
use motionrt_runtime::rng::NormalRng;
use motionrt_runtime::scheduler::SchedulerKind;
use motionrt_runtime::{Input, OrtSession};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GraphArg {
    /// One UNet call (`unet_step`).
    Unet,
    /// One VAE decoder call over B·F latents (`vae_decode`).
    #[value(alias = "vae_decoder")]
    VaeDecoder,
    /// One text encoder call over B prompts (`text_encoder`).
    #[value(alias = "text_encoder")]
    TextEncoder,
}

impl GraphArg {
    fn file(self) -> &'static str {
        match self {
            GraphArg::Unet => "unet",
            GraphArg::VaeDecoder => "vae_decoder",
            GraphArg::TextEncoder => "text_encoder",
        }
    }

    fn stage(self) -> &'static str {
        match self {
            GraphArg::Unet => "unet_step",
            GraphArg::VaeDecoder => "vae_decode",
            GraphArg::TextEncoder => "text_encoder",
        }
    }
}

#[derive(Args)]
pub struct BenchArgs {
    /// A directory written by `motionrt export` (runs on ONNX Runtime, CPU).
    #[arg(long, required_unless_present_any = ["compare", "engine"], conflicts_with = "engine")]
    pub model: Option<PathBuf>,
    /// An engine written by `motionrt build` for this GPU: time the pipeline on the native CUDA
    /// engine (pipeline mode only; `unet_step` is each denoising step's UNet call, CUDA-graph
    /// replays after the first run, read on the host once its output is back). Reports the GPU,
    /// driver and library versions and the device memory in use after the runs.
    #[arg(long)]
    pub engine: Option<PathBuf>,
    /// Time one graph with random inputs instead of the whole pipeline.
    #[arg(long, value_enum)]
    pub graph: Option<GraphArg>,
    /// Graph mode: the batch of the graph call (default: unet 2, the classifier-free-guidance
    /// pair; vae_decoder 1 video of --frames latents; text_encoder 2 prompts). The pipeline
    /// generates one video (its UNet batch is 2 with guidance).
    #[arg(long)]
    pub batch: Option<usize>,
    #[arg(long, default_value_t = 16)]
    pub frames: usize,
    #[arg(long, default_value_t = 512)]
    pub height: usize,
    #[arg(long, default_value_t = 512)]
    pub width: usize,
    /// Denoising steps per pipeline run.
    #[arg(long, default_value_t = 25)]
    pub steps: usize,
    #[arg(long, default_value_t = 7.5)]
    pub guidance: f32,
    /// ddim, euler, euler-a, dpmpp-2m, dpmpp-2m-karras or lcm.
    #[arg(long, default_value = "ddim")]
    pub scheduler: String,
    #[arg(
        long,
        default_value = "a corgi running along the beach at sunset, cinematic"
    )]
    pub prompt: String,
    /// Frames per VAE decoder call in pipeline mode.
    #[arg(long = "decode-chunk", default_value_t = 16)]
    pub decode_chunk: usize,
    /// Untimed runs first (their first run is reported as the cold cost).
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Timed runs.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Run i draws its noise / random inputs from seed + i.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// ONNX Runtime threads per operator (0: ONNX Runtime's default, all cores).
    #[arg(long, default_value_t = 0, value_parser = crate::parse_threads)]
    pub threads: usize,
    /// Print the report as JSON on stdout instead of the table (schema motionrt.bench/1,
    /// docs/bench-schema.md); `--json FILE` writes it to FILE and still prints the table.
    #[arg(long, value_name = "FILE", num_args = 0..=1, default_missing_value = "-")]
    pub json: Option<PathBuf>,
    /// Compare two saved reports (--json files) per stage instead of measuring: A B.
    #[arg(long, num_args = 2, value_names = ["A", "B"])]
    pub compare: Option<Vec<PathBuf>>,
    /// Serve one pipeline run per stdin line (`run SEED [LATENTS.npy]`, `quit`) and answer with
    /// JSON lines: the protocol of bench/compare/compare.py.
    #[arg(long, hide = true)]
    pub worker: bool,
}

pub fn bench(a: BenchArgs) -> Result<()> {
    // before the minutes of timing, what would only fail at their end
    if let Some(j) = &a.json {
        crate::check_output_file("--json", j)?;
    }
    if let Some(files) = &a.compare {
        return compare_files(&files[0], &files[1], a.json.as_deref());
    }
    motionrt_runtime::pipeline::check_size(a.width, a.height)?;
    let model = match (&a.model, &a.engine) {
        (_, Some(e)) => {
            if !e.join("engine.json").is_file() {
                bail!(
                    "{}: no engine.json; --engine takes a folder written by `motionrt build`",
                    e.display()
                );
            }
            if a.graph.is_some() {
                bail!("--graph times one ONNX graph on ONNX Runtime; on --engine, the pipeline mode reports the UNet per denoising step (unet_step), the text encoder and the VAE decode");
            }
            if a.worker {
                bail!("the bench worker runs ONNX Runtime models (--model), not --engine");
            }
            motionrt_runtime::engine::file::read_manifest(e)?;
            e.clone()
        }
        (Some(m), None) => {
            if m.join("engine.json").is_file() {
                bail!("{}: this is an engine; time it with --engine", m.display());
            }
            m.clone()
        }
        (None, None) => bail!("--model or --engine is required"),
    };
    if a.worker {
        return worker(&a, &model);
    }
    if a.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let json_only = a.json.as_deref() == Some(Path::new("-"));
    let info = ModelInfo::load(&model)?;
    let mut report = Report {
        schema: bench::SCHEMA.into(),
        created: bench::utc_now(),
        machine: Machine::detect(),
        versions: Versions {
            motionrt: env!("CARGO_PKG_VERSION").into(),
            git_revision: env!("MOTIONRT_GIT_REVISION").into(),
            backend: None,
            backend_build: None,
        },
        backend: "onnxruntime-cpu".into(),
        precision: info.precision.clone(),
        config: BenchConfig {
            mode: if a.graph.is_some() {
                "graph"
            } else {
                "pipeline"
            }
            .into(),
            graph: a.graph.map(|g| g.file().to_string()),
            model: model.display().to_string(),
            batch: 0,
            frames: a.frames,
            height: a.height,
            width: a.width,
            steps: a.steps,
            guidance: a.guidance,
            scheduler: a.scheduler.clone(),
            warmup: a.warmup,
            runs: a.runs,
            seed: a.seed,
            threads: a.threads,
        },
        load_s: BTreeMap::new(),
        stages: BTreeMap::new(),
        throughput: Default::default(),
        memory: Memory::default(),
        ok: false,
    };
    let bar = progress(a.warmup + a.runs, json_only);
    match a.graph {
        Some(g) => bench_graph(&a, &info, g, &mut report, &bar)?,
        None => bench_pipeline(&a, &model, &mut report, &bar)?,
    }
    bar.finish_and_clear();
    if a.engine.is_none() {
        if let Some((v, build)) = motionrt_runtime::backend_version() {
            report.versions.backend = Some(v);
            report.versions.backend_build = Some(build);
        }
    }
    report.memory.peak_host_bytes = bench::peak_rss_bytes();
    report.finalize();

    if json_only {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
        if let Some(p) = &a.json {
            write_json_atomic(p, &serde_json::to_value(&report)?)?;
            println!("report: {}", p.display());
        }
    }
    if !report.ok {
        let failed: Vec<String> = report
            .stages
            .iter()
            .filter(|(_, s)| !s.is_ok())
            .map(|(n, s)| format!("{n}: {}", s.error.as_deref().unwrap_or("failed")))
            .collect();
        bail!("{} stage(s) failed: {}", failed.len(), failed.join("; "));
    }
    Ok(())
}

fn progress(total: usize, hidden: bool) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total as u64);
    if hidden {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    } else {
        bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    }
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg:>14} {bar:40} {pos}/{len} [{elapsed}]")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

fn write_json_atomic(path: &Path, v: &serde_json::Value) -> Result<()> {
    let tmp = path.with_extension("json.partial");
    let _unfinished = motionrt_kernels::unfinished::register(&tmp);
    let text = serde_json::to_string_pretty(v)? + "\n";
    std::fs::write(&tmp, text)
        .and_then(|_| motionrt_kernels::unfinished::commit(|| std::fs::rename(&tmp, path)))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            anyhow::anyhow!("writing {}: {e}", path.display())
        })
}

fn generate_options(a: &BenchArgs) -> Result<GenerateOptions> {
    Ok(GenerateOptions {
        prompt: a.prompt.clone(),
        negative_prompt: String::new(),
        frames: a.frames,
        height: a.height,
        width: a.width,
        steps: a.steps,
        guidance: a.guidance,
        scheduler: a
            .scheduler
            .parse::<SchedulerKind>()
            .map_err(|e| anyhow::anyhow!("--scheduler: {e}"))?,
        decode_chunk: a.decode_chunk,
        ..Default::default()
    })
}

/// Stages downstream of each stage (they cannot run once it failed).
fn dependents(stage: &str) -> &'static [&'static str] {
    match stage {
        "text_encoder" => &[
            "unet_step",
            "unet_total",
            "vae_decode",
            "time_to_first_frame",
            "end_to_end",
        ],
        "unet_step" => &[
            "unet_total",
            "vae_decode",
            "time_to_first_frame",
            "end_to_end",
        ],
        "vae_decode" => &["time_to_first_frame", "end_to_end"],
        _ => &[],
    }
}

fn fail_with_dependents(rec: &mut Recorder, stage: &str, e: &dyn std::fmt::Display) {
    rec.fail(stage, format!("{e:#}"));
    for d in dependents(stage) {
        rec.fail(d, format!("not run: {stage} failed"));
    }
}

/// What one pipeline pass measured: stage times (NaN where a stage did not run).
struct PassTimes {
    timings: Timings,
    first_frame: f64,
    end_to_end: f64,
    /// The stage that failed, if one did; the stages before it completed.
    failed: Option<(&'static str, anyhow::Error)>,
}

/// One pipeline pass, stage by stage (the decoder only when `decode`).
fn pipeline_pass(pipe: &mut Pipeline, o: &GenerateOptions, decode: bool) -> PassTimes {
    let mut p = PassTimes {
        timings: Timings {
            text_encoder: f64::NAN,
            denoise: f64::NAN,
            vae_decode: f64::NAN,
            ..Timings::default()
        },
        first_frame: f64::NAN,
        end_to_end: f64::NAN,
        failed: None,
    };
    let t_run = Instant::now();
    let t = Instant::now();
    let ctx = match pipe.text_context(o, &mut |_| {}) {
        Ok(c) => c,
        Err(e) => {
            p.failed = Some(("text_encoder", e.into()));
            return p;
        }
    };
    p.timings.text_encoder = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let latents = match pipe.denoise(o, &ctx, &mut p.timings, &mut |_| {}) {
        Ok(l) => l,
        Err(e) => {
            p.failed = Some(("unet_step", e.into()));
            return p;
        }
    };
    p.timings.denoise = t.elapsed().as_secs_f64();
    if !decode {
        return p;
    }
    let (f, h, w) = pipe.latent_dims(o);
    let t = Instant::now();
    let mut first_frame = None;
    let r = pipe.decode(&latents, f, h, w, o.decode_chunk, &mut |e| {
        if let Event::Decoded { .. } = e {
            first_frame.get_or_insert(t_run.elapsed().as_secs_f64());
        }
    });
    if let Err(e) = r {
        p.failed = Some(("vae_decode", e.into()));
        return p;
    }
    p.timings.vae_decode = t.elapsed().as_secs_f64();
    p.end_to_end = t_run.elapsed().as_secs_f64();
    p.first_frame = first_frame.unwrap_or(p.end_to_end);
    p
}

fn bench_pipeline(
    a: &BenchArgs,
    model: &Path,
    report: &mut Report,
    bar: &indicatif::ProgressBar,
) -> Result<()> {
    if a.batch.is_some_and(|b| b != 1) {
        bail!("--batch applies to --graph; the pipeline generates one video per run (its UNet batch is 2 with guidance)");
    }
    let base = generate_options(a)?;
    report.config.batch = 1;
    bar.set_message("loading");
    let mut pipe = Pipeline::load(model, &crate::session_options(a.threads))
        .with_context(|| format!("loading {}", model.display()))?;
    pipe.validate(&base)?;
    for (name, t) in &pipe.load_times {
        report.load_s.insert((*name).to_string(), *t);
    }
    let mut total_load = pipe.load_seconds;
    if pipe.engine_device().is_some() {
        let untuned = pipe.untuned_shapes(&base);
        if !untuned.is_empty() {
            bar.suspend(|| {
                eprintln!(
                    "note: {}: their algorithms are timed while preparing (in load_s.prepare)",
                    untuned.join("; ")
                )
            });
        }
        // the engine makes its programs (compile, weight upload, algorithm timing) on their
        // first call and captures their graphs on the second: both here, once, as loading
        bar.set_message("preparing");
        let t = Instant::now();
        if let Err(e) = pipe.prepare(&base) {
            // the passes meet it again and record it against its stage, timing the others
            bar.suspend(|| eprintln!("warning: preparing the engine: {e}"));
        }
        let s = t.elapsed().as_secs_f64();
        report.load_s.insert("prepare".into(), s);
        total_load += s;
    }
    report.load_s.insert("total".into(), total_load);
    if let Some(key) = pipe.engine_device() {
        report.backend = "cuda".into();
        report.config.threads = 0;
        report.machine.gpu = Some(format!(
            "{} (compute capability {})",
            key.gpu_name, key.compute_capability
        ));
        report.machine.driver = Some(key.driver.clone());
        report.versions.backend = Some(format!("CUDA {}", key.cuda));
        report.versions.backend_build = Some(format!("cuBLAS {}, cuDNN {}", key.cublas, key.cudnn));
    }

    let mut rec = Recorder::new(a.warmup);
    // the engine's device memory in use, sampled after each pass (the most seen is reported)
    let mut device_used: Option<u64> = None;
    for i in 0..a.warmup + a.runs {
        rec.begin_run(i);
        bar.set_message(if rec.is_warmup() {
            "warm-up"
        } else {
            "timed run"
        });
        if rec.failed("text_encoder") || rec.failed("unet_step") {
            break; // nothing downstream can run
        }
        let o = GenerateOptions {
            seed: a.seed + i as u64,
            ..base.clone()
        };
        // After a decoder failure the remaining runs still time the text encoder and UNet.
        let p = pipeline_pass(&mut pipe, &o, !rec.failed("vae_decode"));
        if let Some((_, Ok(b))) = pipe.engine_memory() {
            device_used = device_used.max(Some(b));
        }
        record_pass(&mut rec, &p);
        if let Some((stage, e)) = &p.failed {
            fail_with_dependents(&mut rec, stage, e);
        }
        bar.inc(1);
    }
    report.stages = rec.finish();
    if let Some((precision, used)) = pipe.engine_memory() {
        report.precision = precision;
        match used {
            Ok(b) => report.memory.peak_device_bytes = device_used.max(Some(b)),
            Err(e) => eprintln!("warning: device memory not reported: {e}"),
        }
    }
    Ok(())
}

/// Record the stages a pass completed.
fn record_pass(rec: &mut Recorder, p: &PassTimes) {
    let mut put = |stage: &str, t: f64| {
        if t.is_finite() {
            rec.record(stage, t);
        }
    };
    put("text_encoder", p.timings.text_encoder);
    put("unet_total", p.timings.denoise);
    put("vae_decode", p.timings.vae_decode);
    put("time_to_first_frame", p.first_frame);
    put("end_to_end", p.end_to_end);
    if p.timings.denoise.is_finite() {
        for &s in &p.timings.unet_steps {
            rec.record("unet_step", s);
        }
    }
}

/// Fresh random inputs for one graph call.
enum Feeds {
    F32(Vec<(&'static str, Vec<usize>, Vec<f32>)>),
    Ids(Vec<usize>, Vec<i64>),
}

fn graph_inputs(
    g: GraphArg,
    info: &ModelInfo,
    a: &BenchArgs,
    batch: usize,
    seed: u64,
) -> Result<Feeds> {
    let mut rng = NormalRng::new(seed);
    let normal = |rng: &mut NormalRng, shape: &[usize]| {
        let mut v = vec![0f32; shape.iter().product()];
        rng.fill(&mut v);
        v
    };
    let (h, w) = (a.height / info.latent_scale, a.width / info.latent_scale);
    let c = info.latent_channels;
    Ok(match g {
        GraphArg::Unet => {
            let sample = [batch, c, a.frames, h, w];
            let ctx = [batch * a.frames, 77, info.cross_attention_dim];
            let t = rng.below(1000) as f32;
            Feeds::F32(vec![
                ("sample", sample.to_vec(), normal(&mut rng, &sample)),
                ("timestep", vec![batch], vec![t; batch]),
                (
                    "encoder_hidden_states",
                    ctx.to_vec(),
                    normal(&mut rng, &ctx),
                ),
            ])
        }
        GraphArg::VaeDecoder => {
            let z = [batch * a.frames, c, h, w];
            Feeds::F32(vec![("latent", z.to_vec(), normal(&mut rng, &z))])
        }
        GraphArg::TextEncoder => {
            let vocab = info.text_vocab_size.with_context(|| {
                format!(
                    "{}: no text_encoder_config.vocab_size (export the text encoder)",
                    info.dir.join("model.json").display()
                )
            })? as u64;
            let ids = (0..batch * 77).map(|_| rng.below(vocab) as i64).collect();
            Feeds::Ids(vec![batch, 77], ids)
        }
    })
}

fn bench_graph(
    a: &BenchArgs,
    info: &ModelInfo,
    g: GraphArg,
    report: &mut Report,
    bar: &indicatif::ProgressBar,
) -> Result<()> {
    let batch = a.batch.unwrap_or(match g {
        GraphArg::Unet | GraphArg::TextEncoder => 2,
        GraphArg::VaeDecoder => 1,
    });
    if batch == 0 || a.frames == 0 {
        bail!("--batch and --frames must be at least 1");
    }
    let s = info.latent_scale;
    if g != GraphArg::TextEncoder
        && (a.height == 0 || a.width == 0 || a.height % s != 0 || a.width % s != 0)
    {
        bail!(
            "--height and --width must be positive multiples of {s} (got {}×{})",
            a.height,
            a.width
        );
    }
    if let (GraphArg::Unet, Some(max)) = (g, info.max_frames) {
        if a.frames > max {
            bail!("{} frames exceed the motion module's positional table ({max} frames per UNet call): use --frames {max} or fewer", a.frames);
        }
    }
    report.config.batch = batch;
    let path = info.graph(g.file())?;
    bar.set_message("loading");
    let t = Instant::now();
    let mut session = OrtSession::load(&path, &crate::session_options(a.threads))?;
    let load = t.elapsed().as_secs_f64();
    report.load_s.insert(g.file().into(), load);
    report.load_s.insert("total".into(), load);

    let stage = g.stage();
    let mut rec = Recorder::new(a.warmup);
    for i in 0..a.warmup + a.runs {
        rec.begin_run(i);
        bar.set_message(if rec.is_warmup() {
            "warm-up"
        } else {
            "timed run"
        });
        // Inputs are drawn before the clock starts.
        let feeds = graph_inputs(g, info, a, batch, a.seed + i as u64)?;
        let t = Instant::now();
        let r = match &feeds {
            Feeds::F32(v) => session.run_with(
                &v.iter()
                    .map(|(n, s, d)| (*n, Input::F32(s, d)))
                    .collect::<Vec<_>>(),
            ),
            Feeds::Ids(s, d) => session.run_with(&[("input_ids", Input::I64(s, d))]),
        };
        let secs = t.elapsed().as_secs_f64();
        match r {
            Ok(out) => {
                let bad: usize = out
                    .iter()
                    .map(|(_, t)| t.data.iter().filter(|x| !x.is_finite()).count())
                    .sum();
                if bad > 0 {
                    rec.fail(
                        stage,
                        format!("{} produced {bad} NaN/Inf values", path.display()),
                    );
                    break;
                }
                rec.record(stage, secs);
            }
            Err(e) => {
                rec.fail(stage, e.to_string());
                break;
            }
        }
        bar.inc(1);
    }
    report.stages = rec.finish();
    Ok(())
}

fn compare_files(a: &Path, b: &Path, json: Option<&Path>) -> Result<()> {
    let read = |p: &Path| -> Result<Report> {
        let text =
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        Report::from_json(&text).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))
    };
    let (ra, rb) = (read(a)?, read(b)?);
    let rows = bench::compare(&ra, &rb);
    match json {
        Some(p) if p == Path::new("-") => {
            println!("{}", serde_json::to_string_pretty(&rows)?);
        }
        Some(p) => {
            print!(
                "{}",
                bench::compare_table(&ra, &rb, &a.display().to_string(), &b.display().to_string())
            );
            write_json_atomic(p, &serde_json::to_value(&rows)?)?;
        }
        None => print!(
            "{}",
            bench::compare_table(&ra, &rb, &a.display().to_string(), &b.display().to_string())
        ),
    }
    Ok(())
}

/// Line protocol for bench/compare/compare.py: after loading, `{"event":"ready",...}`; each
/// `run SEED [LATENTS.npy]` line runs the pipeline once (initial noise from the file when
/// given, `[1, C, F, h, w]` float32) and answers `{"event":"run",...}` with stage times in
/// seconds, or `{"event":"error","message":...}`; `quit` (or end of input) answers
/// `{"event":"done","peak_host_bytes":...}`.
fn worker(a: &BenchArgs, model: &Path) -> Result<()> {
    let base = generate_options(a)?;
    let mut pipe = Pipeline::load(model, &crate::session_options(a.threads))
        .with_context(|| format!("loading {}", model.display()))?;
    pipe.validate(&base)?;
    let out = std::io::stdout();
    let say = |v: serde_json::Value| -> Result<()> {
        let mut o = out.lock();
        writeln!(o, "{v}")?;
        o.flush()?;
        Ok(())
    };
    say(serde_json::json!({
        "event": "ready",
        "load_s": pipe.load_seconds,
        "backend": motionrt_runtime::backend_version().map(|v| v.0),
    }))?;
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let mut words = line.split_whitespace();
        match words.next() {
            None => continue,
            Some("quit") => break,
            Some("run") => {
                let reply = (|| -> Result<serde_json::Value> {
                    let seed: u64 = words
                        .next()
                        .context("run needs a seed")?
                        .parse()
                        .context("seed is not an integer")?;
                    let mut o = GenerateOptions {
                        seed,
                        ..base.clone()
                    };
                    if let Some(p) = words.next() {
                        let arr = npy::read(Path::new(p))?;
                        match arr.data {
                            NpyData::F32(v) => o.init_latents = Some(v),
                            NpyData::I64(_) => bail!("{p}: latents must be floating point"),
                        }
                        pipe.validate(&o)?;
                    }
                    let mut p = pipeline_pass(&mut pipe, &o, true);
                    if let Some((stage, e)) = p.failed.take() {
                        return Err(e.context(format!("stage {stage}")));
                    }
                    Ok(serde_json::json!({
                        "event": "run",
                        "text_encoder": p.timings.text_encoder,
                        "unet_steps": p.timings.unet_steps,
                        "unet_total": p.timings.denoise,
                        "vae_decode": p.timings.vae_decode,
                        "time_to_first_frame": p.first_frame,
                        "end_to_end": p.end_to_end,
                    }))
                })();
                match reply {
                    Ok(v) => say(v)?,
                    Err(e) => {
                        say(serde_json::json!({"event": "error", "message": format!("{e:#}")}))?
                    }
                }
            }
            Some(other) => say(serde_json::json!({
                "event": "error",
                "message": format!("unknown command {other:?} (run SEED [LATENTS.npy] | quit)")
            }))?,
        }
    }
    say(serde_json::json!({"event": "done", "peak_host_bytes": bench::peak_rss_bytes()}))
}
