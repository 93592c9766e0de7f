//! The CUDA executor's host side, run on the CPU: a compiled [`Program`] executed step by step
//! from the very [`Op`] lists [`exec`](super::exec) enqueues on a GPU ([`step_ops`]), with the
//! very buffer placement ([`place_buffers`], [`plan_memory_for`](super::launch::plan_memory_for)). Kernel launches run the real
//! kernel sources in the CUDA emulator (`motionrt_kernels::emu`: argument kinds checked against
//! each kernel's signature, barriers, warp collectives, `mma.sync`, `ldmatrix`, `cp.async`);
//! the library calls run on the CPU by their documented semantics, from the values their
//! descriptors are given: `cublasGemmStridedBatchedEx` (column-major, `op`, leading dimensions,
//! batch strides), the cuBLASLt matmul (layouts, bias epilogue along D's rows, β·C) and cuDNN's
//! forward convolution (NCHW/NHWC tensors, `[k, c, r, s]`/`[k, r, s, c]` filters). Launch limits
//! a GPU enforces (grid extents, threads per block, dynamic shared memory above 48 KiB without
//! opting in) are errors here too, and every library operand must lie inside one allocation.
//!
//! Test infrastructure, like the emulator: slow (every thread is a fiber), for tiny shapes.

use motionrt_kernels::emu::{Arg, DeviceBuffer, Emu};

use super::cpu_exec::dot;
use super::exec::Precision;
use super::launch::{
    cast_launch, conv_igemm_for, geglu_kernel_for, geglu_linear, geglu_pairs, group_norm_scratch,
    norm_pair_first, norm_pair_for, norm_pairs, place_buffers, plan_memory_for, plan_memory_fused,
    rebase_activations, specialize, step_ops, tactic_agrees, tactic_fill_block, tactic_io,
    ConvDesc, Ctx, GemmCall, KArg, Launch, LtCall, Op, WeightData,
};
use super::program::{DType, MemoryPlan, Outputs, Program, Step, Strided};
use super::EngineError;

fn err(msg: String) -> EngineError {
    EngineError::Graph(msg)
}

/// A program loaded into emulated device memory.
pub struct EmuProgram<'e> {
    emu: &'e Emu,
    pub program: Program,
    pub memory: MemoryPlan,
    pub precision: Precision,
    arena: DeviceBuffer,
    weights: Vec<DeviceBuffer>,
    ptrs: Vec<u64>,
    norm_stats: Option<DeviceBuffer>,
    /// Linear steps with a bias or residual run as cuBLASLt matmuls (else GEMM + pass).
    lt: bool,
    smem_optin: usize,
    /// Launches per kernel entry point, and library calls (`cublas`, `cublasLt`, `cudnn`).
    pub calls: std::collections::BTreeMap<String, usize>,
    /// What float16 specialisation changed ([`specialize`]).
    pub specialized: super::launch::Specialized,
    /// The device ranges the current launches may touch (`[start, end)`: the step's buffers, the
    /// normalisation scratch, or a cast's two sides), checked by a race-checking emulator
    /// ([`Emu::launch_within`]); and what they are, for its errors.
    bounds: Vec<(u64, u64)>,
    bounds_note: String,
    /// Test fault for [`EmuProgram::trace`]: `(step, buffer)` overwrites the buffer's first value
    /// with 1e4 just before the step runs — on an activation, what an out-of-bounds write or a
    /// race of a step in between would do; on a weight (step 0), a corrupted upload.
    pub fault: Option<(usize, usize)>,
    /// Convolutions `conv_igemm_f16_nBN` computes run on it, with this BN, instead of the emulated
    /// cuDNN call (on a GPU, those where it timed faster when the engine was built).
    pub conv_kernel: Option<usize>,
    /// GEGLU pairs `gemm_geglu_f16_nBN` computes ([`super::launch::geglu_pairs`]) run on it, with
    /// this BN, instead of the emulated cuBLASLt matmul and `geglu` (on a GPU, those where it
    /// timed faster when the engine was built). Set here, the arena stays as planned at load;
    /// [`EmuProgram::use_geglu_kernel`] also plans it again as the GPU executor then does.
    pub geglu_kernel: Option<usize>,
    /// Normalisation pairs `conv_igemm_gn/_ln_f16_nBN` compute ([`super::launch::norm_pairs`])
    /// run on them, with this BN, instead of the two steps as they are (on a GPU, those where it
    /// timed faster when the engine was built). Set here, the arena stays as planned at load;
    /// [`EmuProgram::use_norm_pairs`] also plans it again as the GPU executor then does.
    pub norm_pair: Option<usize>,
    /// Attentions on `attention_tiled_f16_d40` run on `attention_tiled2_f16_d40` instead (on a
    /// GPU, those where it timed faster when the engine was built).
    pub attention_two: bool,
}

impl<'e> EmuProgram<'e> {
    /// Place `program` as [`GpuProgram::load`](super::exec::GpuProgram::load) does: the arena
    /// filled with `0xFF` bytes (NaN in both precisions), so a value read before it is written
    /// shows. `smem_optin`: the emulated GPU's opt-in shared memory per block (an H100's is
    /// 232448 bytes); `lt`: whether cuBLASLt takes the Linear epilogues.
    pub fn load(
        emu: &'e Emu,
        program: Program,
        precision: Precision,
        weight: &dyn Fn(&str) -> Result<WeightData, EngineError>,
        smem_optin: usize,
        lt: bool,
    ) -> Result<Self, EngineError> {
        let mut program = program;
        let specialized = specialize(&mut program, precision);
        // as the GPU executor: a tensor past 32-bit element counts is refused before placement
        program.check_tensor_sizes()?;
        let memory = plan_memory_for(&program, precision);
        let arena = DeviceBuffer::filled(memory.arena_bytes.max(256), 0xFF);
        let mut weights = Vec::new();
        let (ptrs, _) = place_buffers(
            &program,
            &memory,
            arena.as_ptr() as u64,
            precision,
            weight,
            &mut |bytes: &[u8]| {
                let b = DeviceBuffer::from_slice(bytes);
                let p = b.as_ptr() as u64;
                weights.push(b);
                Ok(p)
            },
            &mut std::collections::HashMap::new(),
        )?;
        let stats = group_norm_scratch(&program);
        let norm_stats = (stats > 0).then(|| DeviceBuffer::filled(stats * 4, 0xFF));
        Ok(Self {
            emu,
            program,
            memory,
            precision,
            arena,
            weights,
            ptrs,
            norm_stats,
            lt,
            smem_optin,
            calls: Default::default(),
            specialized,
            bounds: Vec::new(),
            bounds_note: String::new(),
            fault: None,
            conv_kernel: None,
            geglu_kernel: None,
            norm_pair: None,
            attention_two: false,
        })
    }

    /// Every GEGLU pair `gemm_geglu_f16_n{bn}` computes on that kernel, and the activations
    /// planned again without those projections' outputs in a new arena (NaN-filled), as the GPU
    /// executor does once its timing chose the kernel ([`plan_memory_fused`]; it keeps the
    /// first plan where the new one is not smaller, this always takes the new one, so that it
    /// is what runs here).
    pub fn use_geglu_kernel(&mut self, bn: usize) {
        self.geglu_kernel = Some(bn);
        self.replan();
    }

    /// Every normalisation pair `conv_igemm_gn/_ln_f16_n{bn}` computes on those kernels,
    /// and the activations planned again without those GroupNorms' outputs, as
    /// [`EmuProgram::use_geglu_kernel`] does for its pairs.
    pub fn use_norm_pairs(&mut self, bn: usize) {
        self.norm_pair = Some(bn);
        self.replan();
    }

    /// The arena planned again (NaN-filled) without the outputs of the first steps of the pairs
    /// that run as one kernel.
    fn replan(&mut self) {
        let mut fused = Vec::new();
        if self.geglu_kernel.is_some() {
            fused.extend(geglu_pairs(&self.program, self.precision));
        }
        if self.norm_pair.is_some() {
            fused.extend(norm_pairs(&self.program, self.precision));
        }
        let memory = plan_memory_fused(&self.program, self.precision, &fused);
        self.arena = DeviceBuffer::filled(memory.arena_bytes.max(256), 0xFF);
        rebase_activations(
            &mut self.ptrs,
            &self.memory,
            &memory,
            self.arena.as_ptr() as u64,
        );
        self.memory = memory;
    }

    /// The check the GPU executor makes of a tactic kernel before it takes one (float16): the
    /// inputs of `steps` ([`tactic_io`]) filled with [`tactic_fill_block`]'s values and what the
    /// steps write with NaN, the steps run as they are, then the same again after `kernel` has
    /// put them on the kernel (this program's `conv_kernel`, `geglu_kernel`, `norm_pair` or
    /// `attention_two`, restored after), and the two outputs compared ([`tactic_agrees`]).
    pub fn tactic_check(
        &mut self,
        steps: &[usize],
        kernel: &dyn Fn(&mut Self),
    ) -> Result<Result<f64, String>, EngineError> {
        let io = tactic_io(&self.program, steps);
        let block = tactic_fill_block();
        let nan = vec![half::f16::NAN.to_bits(); block.len()];
        let run = |me: &mut Self| -> Result<Vec<f32>, EngineError> {
            // (NaN first: an input the last step also writes, a residual in place, keeps its
            // values)
            let poisoned = io.computed.iter().chain([&io.out]).map(|&b| (b, &nan[..]));
            for (b, fill) in poisoned.chain(io.inputs.iter().map(|&b| (b, block))) {
                let (ptr, n) = (me.ptrs[b], me.program.buffers[b].numel);
                me.check_range(ptr, n * 2, "tactic check input")?;
                for at in (0..n).step_by(fill.len()) {
                    let k = (n - at).min(fill.len());
                    // SAFETY: elements [at, at + k) of the buffer (its range checked above)
                    unsafe {
                        std::ptr::copy_nonoverlapping(fill.as_ptr(), (ptr as *mut u16).add(at), k)
                    };
                }
            }
            for &si in steps {
                me.step(si)?;
            }
            me.read(
                me.ptrs[io.out],
                me.program.buffers[io.out].numel,
                "tactic check output",
            )
        };
        let want = run(self)?;
        let saved = (
            self.conv_kernel,
            self.geglu_kernel,
            self.norm_pair,
            self.attention_two,
        );
        kernel(self);
        let got = run(self);
        (
            self.conv_kernel,
            self.geglu_kernel,
            self.norm_pair,
            self.attention_two,
        ) = saved;
        Ok(tactic_agrees(&want, &got?))
    }

    /// Overwrite buffer `buf`'s first value (a test's fault: a weight a kernel would misread).
    pub fn corrupt(&mut self, buf: usize, value: f32) -> Result<(), EngineError> {
        self.poke(buf, value)
    }

    /// Run once: float32 inputs (int64 through `ids`) in, float32 outputs out, through the
    /// executor's casts.
    pub fn run(
        &mut self,
        inputs: &[(&str, &[f32])],
        ids: &[(&str, &[i64])],
    ) -> Result<Outputs, EngineError> {
        let _staging = self.set_inputs(inputs, ids)?;
        for si in 0..self.program.steps.len() {
            self.step(si)?;
        }
        self.outputs()
    }

    /// [`EmuProgram::run`], each step's output compared with the reference as soon as it is
    /// complete ([`super::localize`]; the arena is refilled with NaN first).
    pub fn trace(
        &mut self,
        inputs: &[(&str, &[f32])],
        ids: &[(&str, &[i64])],
        loc: &mut super::localize::Localizer,
    ) -> Result<Outputs, EngineError> {
        // SAFETY: the arena's own bytes; no launch is running (launches here are synchronous).
        unsafe { std::ptr::write_bytes(self.arena.as_ptr(), 0xFF, self.arena.len_bytes()) };
        let _staging = self.set_inputs(inputs, ids)?;
        // outputs of projections a GEGLU's gemm_geglu computes and of GroupNorms a convolution
        // normalises as it reads their input: never written, so not compared
        let mut unwritten = std::collections::HashSet::new();
        for si in 0..self.program.steps.len() {
            if let Some((_, b)) = self.fault.filter(|f| f.0 == si) {
                self.poke(b, 1e4)?;
            }
            for b in loc.inputs_before(si) {
                if unwritten.contains(&b) {
                    continue;
                }
                let v = self.read(self.ptrs[b], self.program.buffers[b].numel, "traced input")?;
                loc.observe_input(si, b, &v);
            }
            self.step(si)?;
            let fused_first = match self.program.steps[si] {
                Step::Linear { .. } => {
                    geglu_kernel_for(&self.program, si, self.precision, self.geglu_kernel)
                }
                Step::GroupNorm { .. } | Step::LayerNorm { .. } => {
                    norm_pair_for(&self.program, si, self.precision, self.norm_pair)
                }
                _ => None,
            };
            if fused_first.is_some() {
                unwritten.insert(self.program.steps[si].io().1);
                continue;
            }
            if loc.wants(si) {
                let b = self.program.steps[si].io().1;
                let v = self.read(self.ptrs[b], self.program.buffers[b].numel, "traced output")?;
                loc.observe(si, b, &v);
            }
        }
        self.outputs()
    }

    /// Upload the inputs through the executor's casts; the staging buffers returned must live
    /// until the casts ran (they have, on return: launches here are synchronous).
    fn set_inputs(
        &mut self,
        inputs: &[(&str, &[f32])],
        ids: &[(&str, &[i64])],
    ) -> Result<Vec<DeviceBuffer>, EngineError> {
        let mut staging = Vec::new();
        for (name, t) in self.program.inputs.clone() {
            let dst = self.ptrs[t.buf];
            if self.program.buffers[t.buf].dtype == DType::I64 {
                let v = ids
                    .iter()
                    .find(|(n, _)| *n == name)
                    .ok_or_else(|| err(format!("input {name} (int64) not given")))?
                    .1;
                if v.len() != t.numel() {
                    return Err(err(format!("input {name}: {} values", v.len())));
                }
                self.check_range(dst, v.len() * 8, &name)?;
                // SAFETY: the range lies in the arena (checked above).
                unsafe {
                    std::ptr::copy_nonoverlapping(v.as_ptr(), dst as *mut i64, v.len());
                }
                continue;
            }
            let v = inputs
                .iter()
                .find(|(n, _)| *n == name)
                .ok_or_else(|| err(format!("input {name} not given")))?
                .1;
            let v = &*self.program.host_input(&name, v);
            if v.len() != t.numel() {
                return Err(err(format!("input {name}: {} values", v.len())));
            }
            let src = DeviceBuffer::from_slice(v);
            let l = cast_launch(
                "cast_from_f32",
                self.precision,
                dst,
                src.as_ptr() as u64,
                v.len(),
            );
            self.bounds = vec![
                (dst, dst + (v.len() * self.eb()) as u64),
                (
                    src.as_ptr() as u64,
                    src.as_ptr() as u64 + 4 * v.len() as u64,
                ),
            ];
            self.bounds_note = format!(" (buffers: 0 input {name}, 1 its float32 staging)");
            staging.push(src);
            self.kernel(&l)?;
        }
        Ok(staging)
    }

    /// Step `si`'s launches and library calls.
    fn step(&mut self, si: usize) -> Result<(), EngineError> {
        let norm_stats = self.norm_stats.as_ref().map_or(0, |b| b.as_ptr() as u64);
        let lt_on = self.lt;
        let is_lt = move |_: usize| lt_on;
        let ck = conv_igemm_for(&self.program, si, self.precision, self.conv_kernel);
        let is_ck = move |_: usize| ck;
        let gk = geglu_kernel_for(&self.program, si, self.precision, self.geglu_kernel);
        let is_gk = move |_: usize| gk;
        let gc = norm_pair_for(&self.program, si, self.precision, self.norm_pair);
        let is_gc = move |_: usize| gc;
        let ctx = Ctx {
            precision: self.precision,
            ptrs: &self.ptrs,
            norm_stats,
            smem_optin: self.smem_optin,
            lt: &is_lt,
            conv_kernel: &is_ck,
            geglu_kernel: &is_gk,
            norm_pair: &is_gc,
            attention_two: &|_| self.attention_two,
        };
        let ops = step_ops(&self.program, si, &ctx)?;
        // what the step's launches may touch: the buffers it reads and writes, and the scratch;
        // a GEGLU on gemm_geglu_f16_nBN reads its projection's input and weight instead of the
        // projection (which it does not touch)
        let (mut bufs, w) = self.program.steps[si].io();
        if let (Some(_), Step::Geglu { x, .. }) = (gk, &self.program.steps[si]) {
            let li = geglu_linear(&self.program, si, self.precision)
                .expect("geglu_kernel_for checked the pair");
            bufs.retain(|b| b != x);
            bufs.extend(self.program.steps[li].io().0);
        }
        // a convolution or Linear on conv_igemm_gn/_ln_f16_nBN reads its normalisation's inputs
        // (and a LayerNorm's gamma and beta) instead of its output; the normalisation writes only
        // the scratch
        match (gc, &self.program.steps[si]) {
            (Some(_), Step::Conv(_) | Step::Linear { .. }) => {
                let gi = norm_pair_first(&self.program, si, self.precision)
                    .expect("norm_pair_for checked the pair");
                let (gin, gout) = self.program.steps[gi].io();
                bufs.retain(|&b| b != gout);
                bufs.extend(gin);
                bufs.push(w);
            }
            (Some(_), Step::GroupNorm { .. } | Step::LayerNorm { .. }) => {}
            _ => bufs.push(w),
        }
        bufs.dedup();
        self.bounds = bufs
            .iter()
            .map(|&b| {
                let bytes = self.program.buffers[b].numel
                    * match self.program.buffers[b].dtype {
                        DType::I64 => 8,
                        DType::Float => self.eb(),
                    };
                (self.ptrs[b], self.ptrs[b] + bytes as u64)
            })
            .collect();
        let mut note: Vec<String> = bufs.iter().map(|b| format!("program buffer {b}")).collect();
        if let Some(ns) = &self.norm_stats {
            self.bounds.push((
                ns.as_ptr() as u64,
                (ns.as_ptr() as usize + ns.len_bytes()) as u64,
            ));
            note.push("normalisation scratch".into());
        }
        self.bounds_note = format!(
            " (step {si}, {}; buffers: {})",
            self.program.steps[si].name(),
            note.iter()
                .enumerate()
                .map(|(i, n)| format!("{i} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        for op in ops {
            let what = format!("step {si} ({})", self.program.steps[si].name());
            match op {
                Op::Kernel(l) => self.kernel(&l),
                Op::Gemm(g) => self.gemm(&g),
                Op::Lt(c) => self.lt_matmul(&c),
                Op::Conv(c) => self.conv(c.step, c.x, c.w, c.y),
            }
            .map_err(|e| err(format!("{what}: {e}")))?;
        }
        Ok(())
    }

    /// The outputs, cast to float32 as the executor does.
    fn outputs(&mut self) -> Result<Outputs, EngineError> {
        let mut out = Vec::new();
        for (name, t) in self.program.outputs.clone() {
            let dst = DeviceBuffer::filled(t.numel().max(1) * 4, 0xFF);
            let l = cast_launch(
                "cast_to_f32",
                self.precision,
                dst.as_ptr() as u64,
                self.ptrs[t.buf],
                t.numel(),
            );
            let src = self.ptrs[t.buf];
            self.bounds = vec![
                (
                    dst.as_ptr() as u64,
                    dst.as_ptr() as u64 + 4 * t.numel() as u64,
                ),
                (src, src + (t.numel() * self.eb()) as u64),
            ];
            self.bounds_note = format!(" (buffers: 0 the float32 staging, 1 output {name})");
            self.kernel(&l)?;
            let mut v = dst.to_vec::<f32>();
            v.truncate(t.numel());
            out.push((name, t.shape.clone(), v));
        }
        Ok(out)
    }

    /// Buffer `buf`'s first value on the device becomes `value` ([`EmuProgram::fault`]).
    fn poke(&mut self, buf: usize, value: f32) -> Result<(), EngineError> {
        let ptr = self.ptrs[buf];
        self.check_range(ptr, self.eb(), "fault")?;
        // SAFETY: one element inside one allocation (checked above).
        unsafe {
            match self.precision {
                Precision::Fp32 => *(ptr as *mut f32) = value,
                Precision::Fp16 => *(ptr as *mut u16) = half::f16::from_f32(value).to_bits(),
            }
        }
        Ok(())
    }

    /// The allocation holding `[ptr, ptr + bytes)`, or an error naming the operand.
    fn check_range(&self, ptr: u64, bytes: usize, what: &str) -> Result<(), EngineError> {
        let inside = |b: &DeviceBuffer| {
            let base = b.as_ptr() as u64;
            ptr >= base && ptr + bytes as u64 <= base + b.len_bytes() as u64
        };
        let ok = inside(&self.arena)
            || self.weights.iter().any(inside)
            || self.norm_stats.as_ref().is_some_and(inside);
        if ok || bytes == 0 {
            Ok(())
        } else {
            Err(err(format!(
                "{what}: {bytes} bytes at {ptr:#x} lie outside every allocation"
            )))
        }
    }

    fn count(&mut self, what: &str) {
        *self.calls.entry(what.to_string()).or_default() += 1;
    }

    fn kernel(&mut self, l: &Launch) -> Result<(), EngineError> {
        super::launch::check_launchable(l, self.smem_optin).map_err(err)?;
        let strided: Vec<Vec<u8>> = l
            .args
            .iter()
            .filter_map(|a| match a {
                KArg::Strided(s) => Some(strided_bytes(s)),
                _ => None,
            })
            .collect();
        let mut pods = strided.iter();
        let args: Vec<Arg<'_>> = l
            .args
            .iter()
            .map(|a| match a {
                KArg::Ptr(0) => Arg::Null,
                KArg::Ptr(p) => Arg::Addr(*p),
                KArg::I32(v) => Arg::I32(*v),
                KArg::I64(v) => Arg::I64(*v),
                KArg::F32(v) => Arg::F32(*v),
                KArg::Strided(_) => Arg::Pod(pods.next().expect("one per Strided")),
            })
            .collect();
        // SAFETY: the addresses are this program's buffers, sized by the compiler and the plan
        // for the shapes the launch's other arguments give — what this check is for: a wrong
        // size shows as a wrong result or a crash of the test, not of a GPU.
        unsafe {
            self.emu.launch_within(
                &l.kernel,
                l.grid,
                l.block,
                l.smem as usize,
                &args,
                &self.bounds,
            )
        }
        .map_err(|e| err(format!("{}: {e}{}", l.kernel, self.bounds_note)))?;
        self.count(&l.kernel);
        Ok(())
    }

    fn eb(&self) -> usize {
        self.precision.elem_bytes()
    }

    /// `n` elements of the precision's type at `ptr`, as f32 (bounds-checked).
    fn read(&self, ptr: u64, n: usize, what: &str) -> Result<Vec<f32>, EngineError> {
        self.check_range(ptr, n * self.eb(), what)?;
        // SAFETY: the range lies inside one allocation (checked above); any bit pattern is a
        // valid f32/u16.
        Ok(unsafe {
            match self.precision {
                Precision::Fp32 => std::slice::from_raw_parts(ptr as *const f32, n).to_vec(),
                Precision::Fp16 => std::slice::from_raw_parts(ptr as *const u16, n)
                    .iter()
                    .map(|&h| half::f16::from_bits(h).to_f32())
                    .collect(),
            }
        })
    }

    /// Store f32 values at `ptr` in the precision's type (float16 rounded to nearest).
    fn write(&self, ptr: u64, v: &[f32], what: &str) -> Result<(), EngineError> {
        self.check_range(ptr, v.len() * self.eb(), what)?;
        // SAFETY: as in `read`; nothing else runs while a library call is emulated.
        unsafe {
            match self.precision {
                Precision::Fp32 => {
                    std::ptr::copy_nonoverlapping(v.as_ptr(), ptr as *mut f32, v.len())
                }
                Precision::Fp16 => {
                    let h: Vec<u16> = v
                        .iter()
                        .map(|&x| half::f16::from_f32(x).to_bits())
                        .collect();
                    std::ptr::copy_nonoverlapping(h.as_ptr(), ptr as *mut u16, h.len())
                }
            }
        }
        Ok(())
    }

    /// `cublasGemmStridedBatchedEx`, column-major, β = 0, float32 accumulation.
    fn gemm(&mut self, g: &GemmCall) -> Result<(), EngineError> {
        let (m, n, k) = (g.m, g.n, g.k);
        // cuBLAS's own argument checks (CUBLAS_STATUS_INVALID_VALUE)
        let (ra, rb) = (if g.trans_a { k } else { m }, if g.trans_b { n } else { k });
        if g.lda < ra.max(1) || g.ldb < rb.max(1) || g.ldc < m.max(1) {
            return Err(err(format!(
                "cublasGemmStridedBatchedEx: leading dimensions {}/{}/{} below {ra}/{rb}/{m}",
                g.lda, g.ldb, g.ldc
            )));
        }
        // extent of one matrix stored column-major with `rows` rows, `cols` columns
        let span = |rows: usize, cols: usize, ld: usize| {
            if rows == 0 || cols == 0 {
                0
            } else {
                (cols - 1) * ld + rows
            }
        };
        let (ca, cb) = (if g.trans_a { m } else { k }, if g.trans_b { k } else { n });
        let eb = self.eb() as u64;
        for bi in 0..g.batch {
            let pa = g.a + (bi * g.stride_a) as u64 * eb;
            let pb = g.b + (bi * g.stride_b) as u64 * eb;
            let pc = g.c + (bi * g.stride_c) as u64 * eb;
            let a = self.read(pa, span(ra, ca, g.lda), "GEMM A")?;
            let b = self.read(pb, span(rb, cb, g.ldb), "GEMM B")?;
            let mut c = self.read(pc, span(m, n, g.ldc), "GEMM C")?;
            let (a, b) = (
                rows_of_op(&a, g.trans_a, m, k, g.lda),
                cols_of_op(&b, g.trans_b, k, n, g.ldb),
            );
            for j in 0..n {
                for i in 0..m {
                    c[i + j * g.ldc] = g.alpha * dot(&a[i * k..][..k], &b[j * k..][..k]) as f32;
                }
            }
            self.write(pc, &c, "GEMM C")?;
        }
        self.count("cublas gemm");
        Ok(())
    }

    /// A cuBLASLt matmul: `D = op(A)·op(B) (+ bias[row]) + β·C`, C and D in one layout.
    fn lt_matmul(&mut self, c: &LtCall) -> Result<(), EngineError> {
        let d = &c.desc;
        for (name, l) in [("A", d.a), ("B", d.b), ("C", d.c)] {
            if l.ld < l.rows as i64 {
                return Err(err(format!(
                    "cublasLt layout {name}: ld {} < rows {}",
                    l.ld, l.rows
                )));
            }
        }
        // the heuristic's algorithms assume its default minimum alignment of A, B, C and D
        // (CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_*_BYTES: 256)
        let c_ptr = if d.beta != 0.0 { c.res } else { c.out };
        for (name, ptr) in [("A", c.a), ("B", c.b), ("C", c_ptr), ("D", c.out)] {
            if ptr % 256 != 0 {
                return Err(err(format!(
                    "cublasLt {name} at {ptr:#x}: not 256-byte aligned"
                )));
            }
        }
        let dims = |l: super::launch::LtLayout, t: bool| {
            if t {
                (l.cols as usize, l.rows as usize)
            } else {
                (l.rows as usize, l.cols as usize)
            }
        };
        let ((m, ka), (kb, n)) = (dims(d.a, d.trans_a), dims(d.b, d.trans_b));
        if ka != kb || (m, n) != (d.c.rows as usize, d.c.cols as usize) {
            return Err(err(format!(
                "cublasLt: op(A) {m}×{ka}, op(B) {kb}×{n}, D {}×{}",
                d.c.rows, d.c.cols
            )));
        }
        let len =
            |l: super::launch::LtLayout| (l.cols as usize - 1) * l.ld as usize + l.rows as usize;
        let a = self.read(c.a, len(d.a), "cublasLt A")?;
        let b = self.read(c.b, len(d.b), "cublasLt B")?;
        let cm = if d.beta != 0.0 {
            Some(self.read(c.res, len(d.c), "cublasLt C")?)
        } else {
            None
        };
        let bias = match d.bias {
            Some(p) => Some(self.read(p, m, "cublasLt bias")?),
            None => None,
        };
        let mut out = self.read(c.out, len(d.c), "cublasLt D")?;
        let (lda, ldb, ldc) = (d.a.ld as usize, d.b.ld as usize, d.c.ld as usize);
        let (a, b) = (
            rows_of_op(&a, d.trans_a, m, ka, lda),
            cols_of_op(&b, d.trans_b, ka, n, ldb),
        );
        for j in 0..n {
            for i in 0..m {
                let mut acc = dot(&a[i * ka..][..ka], &b[j * ka..][..ka]) as f32;
                if let Some(bias) = &bias {
                    acc += bias[i];
                }
                if let Some(cm) = &cm {
                    acc += d.beta * cm[i + j * ldc];
                }
                out[i + j * ldc] = acc;
            }
        }
        self.write(c.out, &out, "cublasLt D")?;
        self.count("cublasLt matmul");
        Ok(())
    }

    /// cuDNN's forward convolution (cross-correlation, α = 1, β = 0) of Conv step `si`.
    fn conv(&mut self, si: usize, x: u64, w: u64, y: u64) -> Result<(), EngineError> {
        let Step::Conv(c) = &self.program.steps[si] else {
            return Err(err(format!("step {si} is not a convolution")));
        };
        let d = ConvDesc::of(c)?;
        let [n, ci, h, wd] = d.x;
        let [ko, cg, r, s] = d.w;
        let [yn, yc, yh, yw] = d.y;
        let g = d.group;
        // cudnnGetConvolution2dForwardOutputDim
        let out = |i: usize, p: usize, k: usize, st: usize, dl: usize| {
            (i + 2 * p)
                .checked_sub(dl * (k - 1) + 1)
                .map(|v| v / st + 1)
        };
        let want = (
            n,
            ko,
            out(h, d.pads[0], r, d.strides[0], d.dilations[0]),
            out(wd, d.pads[1], s, d.strides[1], d.dilations[1]),
        );
        if g == 0 || ci != cg * g || ko % g != 0 || want != (yn, yc, Some(yh), Some(yw)) {
            return Err(err(format!(
                "cuDNN: x {:?}, w {:?}, group {g} give y {want:?}, the descriptor says {:?}",
                d.x, d.w, d.y
            )));
        }
        let xv = self.read(x, n * ci * h * wd, "cuDNN x")?;
        let wv = self.read(w, ko * cg * r * s, "cuDNN w")?;
        let yv = super::cpu_exec::conv2d(&d, &xv, &wv);
        self.write(y, &yv, "cuDNN y")?;
        self.count("cudnn convolution");
        Ok(())
    }
}

/// Row `i` of op(A) (`m × k`, A column-major with leading dimension `ld`) at `[i·k..]`.
fn rows_of_op(a: &[f32], trans: bool, m: usize, k: usize, ld: usize) -> Vec<f32> {
    let mut v = vec![0f32; m * k];
    for i in 0..m {
        for p in 0..k {
            v[i * k + p] = if trans { a[p + i * ld] } else { a[i + p * ld] };
        }
    }
    v
}

/// Column `j` of op(B) (`k × n`, B column-major with leading dimension `ld`) at `[j·k..]`.
fn cols_of_op(b: &[f32], trans: bool, k: usize, n: usize, ld: usize) -> Vec<f32> {
    let mut v = vec![0f32; n * k];
    for j in 0..n {
        for p in 0..k {
            v[j * k + p] = if trans { b[j + p * ld] } else { b[p + j * ld] };
        }
    }
    v
}

/// `struct Strided` as the kernel parameter's bytes.
fn strided_bytes(s: &Strided) -> Vec<u8> {
    let mut v = Vec::with_capacity(std::mem::size_of::<Strided>());
    v.extend(s.rank.to_ne_bytes());
    v.extend(s.pad_.to_ne_bytes());
    for a in [&s.dims, &s.a, &s.b, &s.c] {
        for x in a.iter() {
            v.extend(x.to_ne_bytes());
        }
    }
    debug_assert_eq!(v.len(), std::mem::size_of::<Strided>());
    v
}
