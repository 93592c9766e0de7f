//! Where a device run parts from the reference: the diagnosis a failed accuracy check needs.
//!
//! An output that misses its tolerance says nothing about which of a thousand steps went wrong.
//! Here the program (as the executor runs it, specialisations included) is interpreted on the CPU
//! in float32 ([`super::cpu_exec::run_traced`]) and run on the device one step at a time with a
//! synchronisation after each (`GpuProgram::trace`, `EmuProgram::trace`); each step's output is
//! compared right after it, and each buffer it reads again just before it (a buffer that changed
//! in between was written by a step that should not have: out of bounds, or a race). The step to
//! look at is the first whose output misses the per-step tolerance while what
//! it read did not (its own fault, not an inherited one); a launch that faults names its step
//! through the synchronisation after it. The steps run eagerly, one run at a time: a check that
//! failed only in CUDA-graph replay, or with two runs in flight, localizes clean — which says
//! where to look as well.

use std::collections::HashMap;

use super::exec::Precision;
use super::program::{DType, Program, Step};
use crate::compare::{error_stats, ErrorStats};

/// For each step, the float buffer it writes (compared after it), else `None` (int64 buffers).
/// A buffer keeps its memory from its first write to its last read, so after any step that
/// writes it the device holds what the reference holds — except where a partial write (a copy
/// into a concatenation) has not reached yet: NaN in the reference, skipped by the comparison.
pub fn checkpoints(p: &Program) -> Vec<Option<usize>> {
    p.steps
        .iter()
        .map(|s| {
            let w = s.io().1;
            (p.buffers[w].dtype == DType::Float).then_some(w)
        })
        .collect()
}

/// Per-step relative tolerance (max |Δ| / max |ref| of the step's output): float32 as the output
/// check's (1e-4), float16 looser (the check's 1e-2), so that the rounding a step inherits does
/// not point at it.
pub fn step_tolerance(precision: Precision) -> f64 {
    match precision {
        Precision::Fp32 => 1e-4,
        Precision::Fp16 => 3e-2,
    }
}

/// A buffer that changed between the step that wrote it and a step that read it: something in
/// between wrote into it (out of bounds, or a race).
#[derive(Debug, Clone)]
pub struct Clobber {
    pub buffer: usize,
    pub written_at: usize,
    pub read_at: usize,
    /// max |Δ| / max |ref| right after the write, and when read.
    pub rel_written: f64,
    pub rel_read: f64,
}

/// One compared step.
#[derive(Debug, Clone)]
pub struct StepError {
    pub step: usize,
    pub label: String,
    pub numel: usize,
    pub stats: ErrorStats,
    /// Values the device made non-finite where the reference is finite.
    pub device_nonfinite: usize,
    /// The largest relative error among the buffers the step read (0 for weights and inputs).
    pub input_rel: f64,
}

impl StepError {
    fn bad(&self, tol: f64) -> bool {
        self.device_nonfinite > 0 || self.stats.max_rel_to_ref_max > tol
    }
}

/// A short description of a step: its kind and the dimensions that tell it apart.
pub fn label(s: &Step) -> String {
    match s {
        Step::Linear {
            m,
            n,
            k,
            bias,
            residual,
            ..
        } => format!(
            "linear {m}x{n}x{k}{}{}",
            if bias.is_some() { " +bias" } else { "" },
            if residual.is_some() { " +res" } else { "" }
        ),
        Step::MatMul { batch, m, n, k, .. } => format!("matmul {batch}x[{m}x{n}x{k}]"),
        Step::Conv(c) => format!(
            "conv {}x{} s{} x{:?} -> {:?}{}",
            c.w_shape[2],
            c.w_shape[3],
            c.strides[0],
            c.x_shape,
            c.y_shape,
            if c.nhwc { " nhwc" } else { "" }
        ),
        Step::Attention {
            n,
            l,
            s,
            heads,
            d,
            ns,
            ..
        } => format!("attention n={n} L={l} S={s} heads={heads} d={d} ns={ns}"),
        Step::GroupNorm {
            c,
            spatial,
            groups,
            silu,
            channels_last,
            ..
        } => format!(
            "group_norm c={c} spatial={spatial} groups={groups}{}{}",
            if *silu { " +silu" } else { "" },
            if *channels_last { " channels-last" } else { "" }
        ),
        Step::LayerNorm {
            rows, cols, add, ..
        } => format!(
            "layer_norm {rows}x{cols}{}",
            if add.is_some() { " +table" } else { "" }
        ),
        Step::Geglu { rows, d, .. } => format!("geglu {rows}x{d}"),
        other => other.name().to_string(),
    }
}

/// Multiply-accumulates of the steps that dominate a CPU interpretation (what decides whether the
/// float32 reference of a program is affordable).
pub fn reference_macs(p: &Program) -> f64 {
    p.steps
        .iter()
        .map(|s| match s {
            Step::Linear { m, n, k, .. } => (m * n * k) as f64,
            Step::MatMul { batch, m, n, k, .. } => (batch * m * n * k) as f64,
            Step::Conv(c) => {
                let y: usize = c.y_shape.iter().product();
                (y * c.w_shape[1] * c.w_shape[2] * c.w_shape[3]) as f64
            }
            Step::Attention {
                n, l, s, heads, d, ..
            } => 2.0 * (n * l * s * heads * d) as f64,
            _ => 0.0,
        })
        .sum()
}

/// `got` against `want`: the statistics, the values the device made non-finite where the
/// reference is finite, and the relative error (infinite when there are such values).
fn compare(got: &[f32], want: &[f32]) -> (ErrorStats, usize, f64) {
    let stats = error_stats(got, want);
    let nonfinite = got
        .iter()
        .zip(want)
        .filter(|(g, w)| !g.is_finite() && w.is_finite())
        .count();
    let rel = if nonfinite > 0 {
        f64::INFINITY
    } else {
        stats.max_rel_to_ref_max
    };
    (stats, nonfinite, rel)
}

/// The per-step comparison of one device run against the reference's values.
pub struct Localizer {
    /// The reference's value of each checkpoint step's output.
    reference: HashMap<usize, Vec<f32>>,
    /// The relative error per buffer as last measured: after its latest write, or when a step
    /// read it (0 for weights and inputs).
    buf_err: Vec<f64>,
    /// The step that last wrote each buffer (as observed).
    last_writer: Vec<Option<usize>>,
    pub clobbers: Vec<Clobber>,
    reads: Vec<Vec<usize>>,
    labels: Vec<String>,
    pub steps: Vec<StepError>,
    pub precision: Precision,
}

impl Localizer {
    /// Interpret `p` in float32 on the CPU and keep each checkpoint's values.
    pub fn new(
        p: &Program,
        precision: Precision,
        inputs: &HashMap<String, Vec<f32>>,
        ids: &HashMap<String, Vec<i64>>,
        weight: &dyn Fn(&str) -> Result<Vec<f32>, super::EngineError>,
    ) -> Result<Self, super::EngineError> {
        let points = checkpoints(p);
        let mut reference = HashMap::new();
        super::cpu_exec::run_traced(p, inputs, ids, weight, &mut |si, v| {
            if points[si].is_some() {
                reference.insert(si, v.to_vec());
            }
        })?;
        Ok(Self {
            reference,
            buf_err: vec![0.0; p.buffers.len()],
            last_writer: vec![None; p.buffers.len()],
            clobbers: Vec::new(),
            reads: p
                .steps
                .iter()
                // an in-place step or a partial write reads what it writes: its earlier error
                .map(|s| s.io().0)
                .collect(),
            labels: p.steps.iter().map(label).collect(),
            steps: Vec::new(),
            precision,
        })
    }

    /// Whether step `si`'s output is compared (the device side reads it back only then).
    pub fn wants(&self, si: usize) -> bool {
        self.reference.contains_key(&si)
    }

    /// The buffers step `si` reads that an earlier step wrote: read back before it runs
    /// ([`Localizer::observe_input`]), so that its inputs are judged as it sees them.
    pub fn inputs_before(&self, si: usize) -> Vec<usize> {
        let mut v: Vec<usize> = self.reads[si]
            .iter()
            .copied()
            .filter(|&b| self.last_writer[b].is_some_and(|w| self.reference.contains_key(&w)))
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// The device's values of buffer `b` just before step `si` runs: compared with what its last
    /// writer left; a buffer much further off than it was after that write was overwritten by a
    /// step in between ([`Clobber`]).
    pub fn observe_input(&mut self, si: usize, b: usize, got: &[f32]) {
        let Some(w) = self.last_writer[b] else { return };
        let Some(want) = self.reference.get(&w) else {
            return;
        };
        let (_, _, rel) = compare(got, want);
        let before = self.buf_err[b];
        if rel > step_tolerance(self.precision) && rel > 4.0 * before {
            self.clobbers.push(Clobber {
                buffer: b,
                written_at: w,
                read_at: si,
                rel_written: before,
                rel_read: rel,
            });
        }
        self.buf_err[b] = rel;
    }

    /// The device's values of step `si`'s output (after it ran).
    pub fn observe(&mut self, si: usize, out_buf: usize, got: &[f32]) {
        let Some(want) = self.reference.get(&si) else {
            return;
        };
        let (stats, device_nonfinite, rel) = compare(got, want);
        let input_rel = self.reads[si]
            .iter()
            .map(|&b| self.buf_err[b])
            .fold(0.0, f64::max);
        self.buf_err[out_buf] = rel;
        self.last_writer[out_buf] = Some(si);
        self.steps.push(StepError {
            step: si,
            label: self.labels[si].clone(),
            numel: got.len(),
            stats,
            device_nonfinite,
            input_rel,
        });
    }

    /// No step over the tolerance and no buffer changed between its write and a read.
    pub fn clean(&self) -> bool {
        self.culprit().is_none() && self.clobbers.is_empty()
    }

    /// The first step over the tolerance whose inputs were within it: the step to look at.
    pub fn culprit(&self) -> Option<&StepError> {
        let tol = step_tolerance(self.precision);
        self.steps
            .iter()
            .find(|e| e.bad(tol) && e.input_rel <= tol)
            .or_else(|| self.steps.iter().find(|e| e.bad(tol)))
    }

    /// A Markdown report: the verdict, the first steps over the tolerance and the steps that
    /// grew the error most.
    pub fn report(&self, what: &str, rows: usize) -> String {
        let tol = step_tolerance(self.precision);
        let mut o = format!(
            "#### {what}: {} of {} steps compared (per-step tolerance max|Δ|/max|ref| ≤ {tol:.0e})\n\n",
            self.steps.len(),
            self.labels.len()
        );
        // a buffer overwritten between its write and a read: the strongest evidence, first
        if let Some(c) = self.clobbers.first() {
            o.push_str(&format!(
                "localize {what}: buffer {} changed after step {} wrote it (max|Δ|/max|ref| {:.2e}) \
                 and before step {} read it ({:.2e}): a step in between wrote into it (out of \
                 bounds, or a race); {} such buffer(s)\n",
                c.buffer,
                c.written_at,
                c.rel_written,
                c.read_at,
                c.rel_read,
                self.clobbers.len()
            ));
        }
        let bad: Vec<&StepError> = self.steps.iter().filter(|e| e.bad(tol)).collect();
        match self.culprit() {
            None => o.push_str(&format!(
                "localize {what}: every step within the tolerance\n"
            )),
            Some(c) => o.push_str(&format!(
                "localize {what}: {} steps over the tolerance; the first whose inputs were within \
                 it: step {} ({}), max|Δ|/max|ref| {:.2e} from inputs at {:.2e}, {} non-finite\n",
                bad.len(),
                c.step,
                c.label,
                c.stats.max_rel_to_ref_max,
                c.input_rel,
                c.device_nonfinite
            )),
        }
        let row = |e: &StepError| {
            format!(
                "| {} | {} | {} | {:.2e} | {:.2e} | {:.6} | {} |\n",
                e.step,
                e.label,
                e.numel,
                e.input_rel,
                e.stats.max_rel_to_ref_max,
                e.stats.cosine,
                e.device_nonfinite
            )
        };
        let head = "| step | what | values | inputs' max|Δ|/max|ref| | max|Δ|/max|ref| | cosine | non-finite |\n| --- | --- | --- | --- | --- | --- | --- |\n";
        if !bad.is_empty() {
            o.push_str("\nfirst steps over the tolerance:\n\n");
            o.push_str(head);
            for e in bad.iter().take(rows) {
                o.push_str(&row(e));
            }
        }
        // growth: the error a step adds over what it read (floored at 1e-7, float32's rounding)
        let mut grow: Vec<&StepError> = self.steps.iter().collect();
        let g = |e: &StepError| {
            if e.device_nonfinite > 0 {
                f64::INFINITY
            } else {
                e.stats.max_rel_to_ref_max / e.input_rel.max(1e-7)
            }
        };
        grow.sort_by(|a, b| g(b).total_cmp(&g(a)));
        o.push_str("\nsteps that grew the error most:\n\n");
        o.push_str(head);
        for e in grow.iter().take(rows) {
            o.push_str(&row(e));
        }
        o
    }
}
