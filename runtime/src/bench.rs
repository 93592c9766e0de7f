//! Latency statistics and the report `motionrt bench` prints and saves.
//!
//! The JSON schema (`"schema": "motionrt.bench/1"`) is documented in `docs/bench-schema.md`; its
//! fields only ever get added to within a schema version.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// The schema identifier written into every report.
pub const SCHEMA: &str = "motionrt.bench/1";

/// The stages a report may hold, in display order. Graph mode uses the name of the stage its
/// graph belongs to (`unet` → `unet_step`, `vae_decoder` → `vae_decode`, `text_encoder`).
pub const STAGES: &[&str] = &[
    "text_encoder",
    "unet_step",
    "unet_total",
    "vae_decode",
    "time_to_first_frame",
    "end_to_end",
];

/// The `q`-th quantile (0 ≤ q ≤ 1) of ascending `sorted` samples, interpolating linearly between
/// the two closest ranks (numpy's default `method="linear"`). `None` when there are no samples.
pub fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    let n = sorted.len();
    if n == 0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * (n - 1) as f64;
    let lo = rank.floor() as usize;
    let hi = rank.ceil() as usize;
    Some(sorted[lo] + (rank - lo as f64) * (sorted[hi] - sorted[lo]))
}

/// Summary of timed samples, seconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub n: usize,
    pub min: f64,
    pub median: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

impl Stats {
    /// `None` for no samples or any non-finite sample.
    pub fn from_samples(samples: &[f64]) -> Option<Self> {
        if samples.is_empty() || samples.iter().any(|x| !x.is_finite()) {
            return None;
        }
        let mut s = samples.to_vec();
        s.sort_by(f64::total_cmp);
        let q = |p| quantile(&s, p).unwrap_or(f64::NAN);
        Some(Self {
            n: s.len(),
            min: s[0],
            median: q(0.5),
            p90: q(0.9),
            p99: q(0.99),
            max: s[s.len() - 1],
            mean: s.iter().sum::<f64>() / s.len() as f64,
        })
    }
}

/// One stage's result: numbers, or the error that stopped it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageReport {
    /// `ok` or `error`.
    pub status: String,
    /// Why the stage has no numbers (`status == "error"`).
    pub error: Option<String>,
    /// Statistics over `samples_s` (`null` on error).
    pub stats: Option<Stats>,
    /// Every timed sample after warm-up, in order, seconds.
    pub samples_s: Vec<f64>,
    /// The very first measurement of the stage (the cold run: allocations, caches), reported
    /// separately; with `warmup ≥ 1` it is not among `samples_s`.
    pub first_run_s: Option<f64>,
}

impl StageReport {
    pub fn is_ok(&self) -> bool {
        self.status == "ok"
    }
}

#[derive(Debug, Default)]
struct StageAcc {
    first: Option<f64>,
    samples: Vec<f64>,
    error: Option<String>,
}

/// Collects stage timings over warm-up and timed runs. Run `i` (0-based, warm-ups included) is
/// a warm-up when `i < warmup`; its samples only count as the first-run cost (run 0).
#[derive(Debug)]
pub struct Recorder {
    warmup: usize,
    run: usize,
    stages: BTreeMap<String, StageAcc>,
}

impl Recorder {
    pub fn new(warmup: usize) -> Self {
        Self {
            warmup,
            run: 0,
            stages: BTreeMap::new(),
        }
    }

    /// Start run `index` (0-based, counting warm-ups).
    pub fn begin_run(&mut self, index: usize) {
        self.run = index;
    }

    pub fn is_warmup(&self) -> bool {
        self.run < self.warmup
    }

    /// Record one sample of `stage` in the current run.
    pub fn record(&mut self, stage: &str, secs: f64) {
        let warm = self.is_warmup();
        let first_run = self.run == 0;
        let acc = self.stages.entry(stage.to_string()).or_default();
        if first_run && acc.first.is_none() {
            acc.first = Some(secs);
        }
        if !warm {
            acc.samples.push(secs);
        }
    }

    /// Mark `stage` as failed; its samples are dropped and the report carries `message`.
    pub fn fail(&mut self, stage: &str, message: impl Into<String>) {
        let acc = self.stages.entry(stage.to_string()).or_default();
        if acc.error.is_none() {
            acc.error = Some(message.into());
        }
    }

    pub fn failed(&self, stage: &str) -> bool {
        self.stages.get(stage).is_some_and(|a| a.error.is_some())
    }

    /// Stage reports by name.
    pub fn finish(self) -> BTreeMap<String, StageReport> {
        self.stages
            .into_iter()
            .map(|(name, acc)| {
                let r = match acc.error {
                    Some(e) => StageReport {
                        status: "error".into(),
                        error: Some(e),
                        stats: None,
                        samples_s: Vec::new(),
                        first_run_s: None,
                    },
                    None => match Stats::from_samples(&acc.samples) {
                        Some(stats) => StageReport {
                            status: "ok".into(),
                            error: None,
                            stats: Some(stats),
                            samples_s: acc.samples,
                            first_run_s: acc.first,
                        },
                        None => StageReport {
                            status: "error".into(),
                            error: Some(if acc.samples.is_empty() {
                                "no timed samples (was --runs 0?)".into()
                            } else {
                                "non-finite timing sample".into()
                            }),
                            stats: None,
                            samples_s: acc.samples,
                            first_run_s: acc.first,
                        },
                    },
                };
                (name, r)
            })
            .collect()
    }
}

/// The machine a report was measured on.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    pub cpu: String,
    /// Logical cores available to this process.
    pub cores: usize,
    pub memory_bytes: Option<u64>,
    pub os: String,
    pub arch: String,
    pub gpu: Option<String>,
    pub driver: Option<String>,
}

impl Machine {
    /// Describe this machine (CPU backends: no GPU fields).
    pub fn detect() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let memory_bytes = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| proc_kib(&m, "MemTotal:"))
            .map(|k| k * 1024);
        Self {
            cpu,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_bytes,
            os: std::env::consts::OS.into(),
            arch: std::env::consts::ARCH.into(),
            gpu: None,
            driver: None,
        }
    }
}

fn proc_kib(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l[key.len()..].split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Peak resident set size of this process so far (Linux `VmHWM`), bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    proc_kib(&s, "VmHWM:").map(|k| k * 1024)
}

/// Versions of what produced the numbers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Versions {
    pub motionrt: String,
    /// `git describe`-style revision of the motionrt build (`unknown` outside a checkout); a
    /// `-dirty` suffix marks uncommitted changes.
    pub git_revision: String,
    /// Backend library version (ONNX Runtime `1.23.2`, ...).
    pub backend: Option<String>,
    /// Backend build details as the library reports them.
    pub backend_build: Option<String>,
}

/// What was measured.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BenchConfig {
    /// `pipeline` or `graph`.
    pub mode: String,
    /// Graph mode: `unet`, `vae_decoder` or `text_encoder`.
    pub graph: Option<String>,
    pub model: String,
    pub batch: usize,
    pub frames: usize,
    pub height: usize,
    pub width: usize,
    pub steps: usize,
    pub guidance: f32,
    pub scheduler: String,
    pub warmup: usize,
    pub runs: usize,
    pub seed: u64,
    pub threads: usize,
}

/// Throughput derived from the median end-to-end time.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Throughput {
    pub frames_per_s: Option<f64>,
    pub videos_per_min: Option<f64>,
}

/// Peak memory.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Memory {
    pub peak_host_bytes: Option<u64>,
    pub peak_device_bytes: Option<u64>,
}

/// A benchmark report (`motionrt bench --json FILE`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub schema: String,
    /// UTC, RFC 3339.
    pub created: String,
    pub machine: Machine,
    pub versions: Versions,
    /// `onnxruntime-cpu`, later `cuda`.
    pub backend: String,
    /// `fp32` or `fp16` (the model's export precision).
    pub precision: String,
    pub config: BenchConfig,
    /// Session (engine) load time per graph, seconds, and `total`.
    pub load_s: BTreeMap<String, f64>,
    pub stages: BTreeMap<String, StageReport>,
    pub throughput: Throughput,
    pub memory: Memory,
    /// False when any stage failed.
    pub ok: bool,
}

impl Report {
    /// Fill the derived fields (throughput, ok) from the stages.
    pub fn finalize(&mut self) {
        let e2e = self
            .stages
            .get("end_to_end")
            .and_then(|s| s.stats.as_ref())
            .map(|s| s.median);
        self.throughput = Throughput {
            frames_per_s: e2e
                .filter(|t| *t > 0.0)
                .map(|t| self.config.frames as f64 / t),
            videos_per_min: e2e.filter(|t| *t > 0.0).map(|t| 60.0 / t),
        };
        self.ok = self.stages.values().all(StageReport::is_ok);
    }

    /// Parse a saved report, checking the schema.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        match v.get("schema").and_then(|s| s.as_str()) {
            Some(SCHEMA) => {}
            Some(other) => return Err(format!("schema {other:?}; this motionrt reads {SCHEMA:?}")),
            None => return Err("no \"schema\" field: not a motionrt bench report".into()),
        }
        serde_json::from_value(v).map_err(|e| format!("does not match {SCHEMA}: {e}"))
    }

    /// The human-readable table.
    pub fn table(&self) -> String {
        let c = &self.config;
        let mut s = String::new();
        let what = match &c.graph {
            Some(g) => format!("graph {g}"),
            None => "pipeline".into(),
        };
        let _ = writeln!(
            s,
            "motionrt bench: {what} of {}, B={} F={} {}×{} steps={} guidance={} {} | {} {} {} threads | warm-up {} runs {}",
            c.model,
            c.batch,
            c.frames,
            c.width,
            c.height,
            c.steps,
            c.guidance,
            c.scheduler,
            self.backend,
            self.precision,
            if c.threads == 0 { "default".to_string() } else { c.threads.to_string() },
            c.warmup,
            c.runs
        );
        let _ = writeln!(
            s,
            "machine: {} ({} cores); motionrt {} ({}); backend {}",
            self.machine.cpu,
            self.machine.cores,
            self.versions.motionrt,
            self.versions.git_revision,
            self.versions.backend.as_deref().unwrap_or("?")
        );
        let _ = writeln!(
            s,
            "{:<20} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>5}",
            "stage", "first", "min", "median", "p90", "p99", "max", "n"
        );
        for name in ordered(self.stages.keys()) {
            let r = &self.stages[name];
            match (&r.stats, &r.error) {
                (Some(st), _) => {
                    let _ = writeln!(
                        s,
                        "{:<20} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>5}",
                        name,
                        r.first_run_s.map_or("-".into(), fmt_secs),
                        fmt_secs(st.min),
                        fmt_secs(st.median),
                        fmt_secs(st.p90),
                        fmt_secs(st.p99),
                        fmt_secs(st.max),
                        st.n
                    );
                }
                (None, e) => {
                    let _ = writeln!(
                        s,
                        "{:<20} ERROR: {}",
                        name,
                        e.as_deref().unwrap_or("no samples")
                    );
                }
            }
        }
        let mut tail = Vec::new();
        if let Some(v) = self.throughput.frames_per_s {
            tail.push(format!("{v:.2} frames/s"));
        }
        if let Some(v) = self.throughput.videos_per_min {
            tail.push(format!("{v:.2} videos/min"));
        }
        if let Some(t) = self.load_s.get("total") {
            tail.push(format!("load {}", fmt_secs(*t)));
        }
        if let Some(b) = self.memory.peak_host_bytes {
            tail.push(format!("peak host memory {}", fmt_bytes(b)));
        }
        if let Some(b) = self.memory.peak_device_bytes {
            tail.push(format!("peak device memory {}", fmt_bytes(b)));
        }
        if !tail.is_empty() {
            let _ = writeln!(s, "{}", tail.join(" | "));
        }
        s
    }
}

/// Stage names in [`STAGES`] order, then any others alphabetically.
fn ordered<'a>(names: impl Iterator<Item = &'a String>) -> Vec<&'a str> {
    let mut v: Vec<&str> = names.map(String::as_str).collect();
    v.sort_by_key(|n| (STAGES.iter().position(|s| s == n).unwrap_or(usize::MAX), *n));
    v
}

/// Seconds with a unit that keeps 3–4 significant digits.
pub fn fmt_secs(t: f64) -> String {
    if !t.is_finite() {
        "nan".into()
    } else if t >= 1.0 {
        format!("{t:.3} s")
    } else if t >= 1e-3 {
        format!("{:.2} ms", t * 1e3)
    } else {
        format!("{:.1} µs", t * 1e6)
    }
}

pub fn fmt_bytes(b: u64) -> String {
    let g = b as f64 / (1u64 << 30) as f64;
    if g >= 1.0 {
        format!("{g:.2} GiB")
    } else {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    }
}

/// One row of a comparison of two reports.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CompareRow {
    pub stage: String,
    pub a_median_s: Option<f64>,
    pub b_median_s: Option<f64>,
    /// `b / a`: below 1 means B is faster.
    pub ratio: Option<f64>,
    /// `b - a`, seconds.
    pub delta_s: Option<f64>,
    /// Why a side has no number.
    pub note: Option<String>,
}

/// Per-stage medians of two reports side by side (stages of either report).
pub fn compare(a: &Report, b: &Report) -> Vec<CompareRow> {
    let mut names: Vec<&String> = a.stages.keys().collect();
    names.extend(b.stages.keys().filter(|k| !a.stages.contains_key(*k)));
    let median = |r: &Report, n: &str| stage_median(r.stages.get(n));
    ordered(names.into_iter())
        .into_iter()
        .map(|n| {
            let (am, an) = median(a, n);
            let (bm, bn) = median(b, n);
            let note = match (an, bn) {
                (None, None) => None,
                (Some(x), None) => Some(format!("A: {x}")),
                (None, Some(y)) => Some(format!("B: {y}")),
                (Some(x), Some(y)) => Some(format!("A: {x}; B: {y}")),
            };
            CompareRow {
                stage: n.to_string(),
                a_median_s: am,
                b_median_s: bm,
                ratio: am.zip(bm).filter(|(a, _)| *a > 0.0).map(|(a, b)| b / a),
                delta_s: am.zip(bm).map(|(a, b)| b - a),
                note,
            }
        })
        .collect()
}

/// A stage's median, or why it has none: not in the report, its error, or (a report edited by
/// hand, or written by a run that stopped) no statistics and no error.
fn stage_median(stage: Option<&StageReport>) -> (Option<f64>, Option<String>) {
    match stage {
        None => (None, Some("not measured".into())),
        Some(s) => match &s.stats {
            Some(st) => (Some(st.median), None),
            None => {
                let why = s.error.as_deref().map(str::trim).filter(|e| !e.is_empty());
                let why = why.map_or_else(
                    || {
                        format!(
                            "no statistics (status {:?}, {} samples)",
                            s.status,
                            s.samples_s.len()
                        )
                    },
                    str::to_string,
                );
                (None, Some(why))
            }
        },
    }
}

/// The comparison as a table, with the settings that differ between the two runs.
pub fn compare_table(a: &Report, b: &Report, a_name: &str, b_name: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "A: {a_name} ({}, {}, {}, {})",
        a.backend, a.precision, a.machine.cpu, a.created
    );
    let _ = writeln!(
        s,
        "B: {b_name} ({}, {}, {}, {})",
        b.backend, b.precision, b.machine.cpu, b.created
    );
    let diffs = config_differences(a, b);
    if !diffs.is_empty() {
        let _ = writeln!(s, "settings that differ: {}", diffs.join("; "));
    }
    let _ = writeln!(
        s,
        "{:<20} {:>12} {:>12} {:>9} {:>12}",
        "stage", "A median", "B median", "B/A", "B-A"
    );
    for r in compare(a, b) {
        let cell = |x: Option<f64>| x.map_or("-".to_string(), fmt_secs);
        let _ = write!(
            s,
            "{:<20} {:>12} {:>12} {:>9} {:>12}",
            r.stage,
            cell(r.a_median_s),
            cell(r.b_median_s),
            r.ratio.map_or("-".into(), |x| format!("{x:.3}×")),
            r.delta_s.map_or("-".into(), |d| {
                let sign = if d < 0.0 { "-" } else { "+" };
                format!("{sign}{}", fmt_secs(d.abs()))
            })
        );
        if let Some(n) = r.note {
            let _ = write!(s, "  ({n})");
        }
        s.push('\n');
    }
    s
}

fn config_differences(a: &Report, b: &Report) -> Vec<String> {
    let mut out = Vec::new();
    let (ca, cb) = (
        serde_json::to_value(&a.config).unwrap_or_default(),
        serde_json::to_value(&b.config).unwrap_or_default(),
    );
    if let (Some(ma), Some(mb)) = (ca.as_object(), cb.as_object()) {
        for (k, va) in ma {
            let vb = mb.get(k).cloned().unwrap_or_default();
            if *va != vb {
                out.push(format!("{k} {va} vs {vb}"));
            }
        }
    }
    for (k, va, vb) in [
        ("backend", &a.backend, &b.backend),
        ("precision", &a.precision, &b.precision),
        ("cpu", &a.machine.cpu, &b.machine.cpu),
    ] {
        if va != vb {
            out.push(format!("{k} {va:?} vs {vb:?}"));
        }
    }
    if a.machine.gpu != b.machine.gpu {
        out.push(format!("gpu {:?} vs {:?}", a.machine.gpu, b.machine.gpu));
    }
    out
}

/// Now, UTC, as RFC 3339 (`2026-11-25T06:30:00Z`).
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    rfc3339(secs)
}

/// Seconds since the Unix epoch as RFC 3339 UTC.
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Days to civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_match_numpy_linear() {
        // np.quantile([3, 1, 4, 1, 5, 9, 2, 6], [0, .5, .9, .99, 1]) = 1, 3.5, 6.9, 8.79, 9 (numpy 2.x)
        let s = Stats::from_samples(&[3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0]).unwrap();
        assert_eq!(s.n, 8);
        assert_eq!(s.min, 1.0);
        assert_eq!(s.max, 9.0);
        assert!((s.median - 3.5).abs() < 1e-12);
        assert!((s.p90 - 6.9).abs() < 1e-12, "{}", s.p90);
        assert!((s.p99 - 8.79).abs() < 1e-12, "{}", s.p99);
        assert!((s.mean - 3.875).abs() < 1e-12);
        // one sample: every quantile is that sample
        let one = Stats::from_samples(&[0.25]).unwrap();
        assert_eq!(
            (one.min, one.median, one.p99, one.max),
            (0.25, 0.25, 0.25, 0.25)
        );
        // odd count: the middle element
        assert_eq!(Stats::from_samples(&[5.0, 1.0, 3.0]).unwrap().median, 3.0);
        // 101 samples 0..=100: p90 = 90, p99 = 99 exactly
        let v: Vec<f64> = (0..=100).rev().map(f64::from).collect();
        let s = Stats::from_samples(&v).unwrap();
        assert_eq!((s.median, s.p90, s.p99), (50.0, 90.0, 99.0));
        assert!(Stats::from_samples(&[]).is_none());
        assert!(Stats::from_samples(&[1.0, f64::NAN]).is_none());
    }

    #[test]
    fn warmup_runs_are_excluded_and_first_run_kept() {
        let mut r = Recorder::new(2);
        // run 0 and 1 are warm-ups (100 s, 50 s), runs 2..5 timed (1, 2, 3)
        for (i, t) in [100.0, 50.0, 1.0, 2.0, 3.0].into_iter().enumerate() {
            r.begin_run(i);
            assert_eq!(r.is_warmup(), i < 2);
            r.record("unet_step", t);
            r.record("unet_step", t + 0.5);
        }
        let out = r.finish();
        let st = &out["unet_step"];
        assert_eq!(st.samples_s, vec![1.0, 1.5, 2.0, 2.5, 3.0, 3.5]);
        assert_eq!(st.first_run_s, Some(100.0));
        assert_eq!(st.stats.as_ref().unwrap().max, 3.5);
        assert_eq!(st.stats.as_ref().unwrap().median, 2.25);

        // without warm-up the first run is a sample too
        let mut r = Recorder::new(0);
        r.begin_run(0);
        r.record("vae_decode", 7.0);
        r.begin_run(1);
        r.record("vae_decode", 1.0);
        let out = r.finish();
        assert_eq!(out["vae_decode"].samples_s, vec![7.0, 1.0]);
        assert_eq!(out["vae_decode"].first_run_s, Some(7.0));
    }

    #[test]
    fn failed_stage_has_error_and_no_numbers() {
        let mut r = Recorder::new(0);
        r.begin_run(0);
        r.record("text_encoder", 0.1);
        r.record("vae_decode", 0.2);
        r.fail("vae_decode", "vae_decoder.onnx: boom");
        r.fail("vae_decode", "second error is not kept");
        let out = r.finish();
        assert!(out["text_encoder"].is_ok());
        let v = &out["vae_decode"];
        assert_eq!(v.status, "error");
        assert_eq!(v.error.as_deref(), Some("vae_decoder.onnx: boom"));
        assert!(v.stats.is_none() && v.samples_s.is_empty());
    }

    #[test]
    fn a_stage_without_numbers_says_why() {
        let mut r = Recorder::new(0);
        r.begin_run(0);
        r.record("unet_step", 0.5);
        r.record("vae_decode", 0.2);
        r.fail("vae_decode", "vae_decoder.onnx: boom");
        let out = r.finish();
        assert_eq!(stage_median(out.get("unet_step")), (Some(0.5), None));
        assert_eq!(
            stage_median(out.get("vae_decode")),
            (None, Some("vae_decoder.onnx: boom".into()))
        );
        assert_eq!(stage_median(None), (None, Some("not measured".into())));
        // no statistics and no error (a report edited by hand): said so, not an empty note
        let mut bare = out["unet_step"].clone();
        bare.stats = None;
        bare.error = Some(" ".into());
        let (m, why) = stage_median(Some(&bare));
        assert_eq!(m, None);
        assert_eq!(why.unwrap(), "no statistics (status \"ok\", 1 samples)");
    }

    #[test]
    fn dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_591_845), "2026-11-25T07:30:45Z");
    }
}
