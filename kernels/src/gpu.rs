//! Launching the CUDA kernels (`kernels/cuda/*.cu`) through `cudarc`'s driver API. The CUDA driver
//! is loaded dynamically and probed first: without it, [`Gpu::new`] returns an error naming what
//! is missing instead of panicking.

use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DeviceRepr, LaunchConfig, PushKernelArg,
};

use crate::cuda::{self, CudaError};
use crate::{Attention, SparseCausal};

/// An element type the kernels take: `f32`, or `u16` holding IEEE float16 bits.
pub trait GpuElem: DeviceRepr + Copy + Default + Unpin + 'static {
    const SUFFIX: &'static str;
}

impl GpuElem for f32 {
    const SUFFIX: &'static str = "f32";
}

impl GpuElem for u16 {
    const SUFFIX: &'static str = "f16";
}

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error(
        "the CUDA driver (libcuda.so) was not found: motionrt's GPU paths need an NVIDIA driver"
    )]
    NoDriver,
    #[error(transparent)]
    Compile(#[from] CudaError),
    #[error("CUDA: {0}")]
    Driver(String),
    #[error(transparent)]
    Shape(#[from] crate::KernelError),
}

fn drv<E: std::fmt::Debug>(e: E) -> GpuError {
    GpuError::Driver(format!("{e:?}"))
}

/// A device with the attention kernels loaded.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub name: String,
    /// `sm_XY`.
    pub arch: &'static str,
    functions: Vec<(String, CudaFunction)>,
    /// Most dynamic shared memory a block may opt in to on this GPU (every kernel is opened to
    /// it at load).
    smem_optin: usize,
}

fn arch_name(major: i32, minor: i32) -> &'static str {
    match (major, minor) {
        (7, 0) => "sm_70",
        (7, 5) => "sm_75",
        (8, 0) => "sm_80",
        (8, 6) => "sm_86",
        (8, 9) => "sm_89",
        (9, 0) => "sm_90",
        (10, 0) => "sm_100",
        (12, 0) => "sm_120",
        (m, _) if m >= 10 => "sm_100",
        (9, _) => "sm_90",
        (8, _) => "sm_80",
        _ => "sm_70",
    }
}

/// Load a compiled module into `ctx`: its cubin, or else its PTX (for a GPU whose architecture
/// the cubin was not made for, which the driver's JIT compiles the PTX for). Both errors when
/// neither loads.
pub fn load_compiled(
    ctx: &Arc<CudaContext>,
    c: &cuda::Compiled,
) -> Result<Arc<cudarc::driver::CudaModule>, String> {
    match ctx.load_module(cudarc::nvrtc::Ptx::from_binary(c.cubin.clone())) {
        Ok(m) => Ok(m),
        Err(eb) => ctx
            .load_module(cudarc::nvrtc::Ptx::from_src(c.ptx.clone()))
            .map_err(|ep| {
                format!(
                    "loading {} ({}): the cubin: {eb:?}; the PTX: {ep:?}",
                    c.name, c.arch
                )
            }),
    }
}

impl Gpu {
    /// Open device `ordinal`, compile (or load from the cache) every kernel for its architecture.
    pub fn new(ordinal: usize) -> Result<Self, GpuError> {
        // SAFETY: only dlopen attempts on the driver's library names.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(GpuError::NoDriver);
        }
        let ctx = CudaContext::new(ordinal).map_err(drv)?;
        let (major, minor) = ctx.compute_capability().map_err(drv)?;
        let arch = arch_name(major, minor);
        let name = ctx.name().map_err(drv)?;
        let smem_optin = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )
            .map_err(drv)? as usize;
        let mut functions = Vec::new();
        for (src, _) in cuda::SOURCES {
            // the native engine's kernels are loaded by motionrt-runtime's executor
            if *src == "engine_ops" {
                continue;
            }
            let c = cuda::compile(src, arch)?;
            let module = load_compiled(&ctx, &c).map_err(GpuError::Driver)?;
            for suffix in ["f32", "f16"] {
                let f = format!("{src}_{suffix}");
                let func = module.load_function(&f).map_err(drv)?;
                // the shared memory these kernels need grows with the head size (and the
                // temporal one's with the frames): allowed past 48 KiB once, up to this GPU's
                if smem_optin > 48 * 1024 {
                    func.set_attribute(
                        cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        smem_optin as i32,
                    )
                    .map_err(drv)?;
                }
                functions.push((f, func));
            }
        }
        Ok(Self {
            stream: ctx.default_stream(),
            ctx,
            name,
            arch,
            functions,
            smem_optin,
        })
    }

    /// An error when a launch needs more dynamic shared memory than this GPU gives a block.
    fn check_smem(&self, kernel: &str, bytes: u32) -> Result<(), GpuError> {
        if bytes as usize > self.smem_optin.max(48 * 1024) {
            return Err(GpuError::Driver(format!(
                "{kernel}: {bytes} bytes of shared memory, more than the {} a block may have on \
                 this GPU",
                self.smem_optin
            )));
        }
        Ok(())
    }

    fn function(&self, name: &str) -> Result<&CudaFunction, GpuError> {
        self.functions
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, f)| f)
            .ok_or_else(|| GpuError::Driver(format!("kernel {name} not loaded")))
    }

    /// `y = TemporalAttention(q, k, v [, bias])` on the stream (asynchronous).
    pub fn temporal<T: GpuElem>(
        &self,
        a: &Attention,
        q: &CudaSlice<T>,
        k: &CudaSlice<T>,
        v: &CudaSlice<T>,
        bias: Option<(&CudaSlice<T>, usize)>,
        y: &mut CudaSlice<T>,
    ) -> Result<(), GpuError> {
        a.check(
            q.len(),
            k.len(),
            v.len(),
            bias.map(|(b, h)| (h, b.len())),
            y.len(),
        )?;
        if a.head_dim > 256 {
            return Err(GpuError::Driver(format!(
                "head size {} > 256 is not supported by the CUDA kernel",
                a.head_dim
            )));
        }
        let f = self.function(&format!("temporal_attention_{}", T::SUFFIX))?;
        let shared = (2 * a.kv_len * a.head_dim * 4) as u32;
        self.check_smem("temporal_attention", shared)?;
        let warps = a.q_len.clamp(1, 8) as u32;
        let cfg = LaunchConfig {
            grid_dim: (a.sequences as u32, a.heads as u32, 1),
            block_dim: (32 * warps, 1, 1),
            shared_mem_bytes: shared,
        };
        let (l, s, h, d) = (
            a.q_len as i32,
            a.kv_len as i32,
            a.heads as i32,
            a.head_dim as i32,
        );
        let null = 0u64;
        let bias_heads = bias.map_or(1, |(_, h)| h as i32);
        let mut b = self.stream.launch_builder(f);
        b.arg(q).arg(k).arg(v);
        match bias {
            Some((bb, _)) => b.arg(bb),
            None => b.arg(&null),
        };
        b.arg(y)
            .arg(&l)
            .arg(&s)
            .arg(&h)
            .arg(&d)
            .arg(&bias_heads)
            .arg(&a.scale);
        // SAFETY: argument types and order match temporal_attention_{f32,f16}; sizes checked.
        unsafe { b.launch(cfg) }.map_err(drv)?;
        Ok(())
    }

    /// `y = SparseCausalAttention(q, k, v)` on the stream (asynchronous).
    pub fn sparse_causal<T: GpuElem>(
        &self,
        a: &SparseCausal,
        q: &CudaSlice<T>,
        k: &CudaSlice<T>,
        v: &CudaSlice<T>,
        y: &mut CudaSlice<T>,
    ) -> Result<(), GpuError> {
        a.check(q.len(), k.len(), v.len(), y.len())?;
        if a.head_dim > 256 {
            return Err(GpuError::Driver(format!(
                "head size {} > 256 is not supported by the CUDA kernel",
                a.head_dim
            )));
        }
        let f = self.function(&format!("sparse_causal_attention_{}", T::SUFFIX))?;
        let shared = (2 * 32 * a.head_dim * 4) as u32;
        self.check_smem("sparse_causal_attention", shared)?;
        let cfg = LaunchConfig {
            grid_dim: (
                (a.videos * a.frames) as u32,
                a.heads as u32,
                a.tokens.div_ceil(32) as u32,
            ),
            block_dim: (256, 1, 1),
            shared_mem_bytes: shared,
        };
        let (fr, s, h, d) = (
            a.frames as i32,
            a.tokens as i32,
            a.heads as i32,
            a.head_dim as i32,
        );
        let mut b = self.stream.launch_builder(f);
        b.arg(q)
            .arg(k)
            .arg(v)
            .arg(y)
            .arg(&fr)
            .arg(&s)
            .arg(&h)
            .arg(&d)
            .arg(&a.scale);
        // SAFETY: argument types and order match sparse_causal_attention_{f32,f16}.
        unsafe { b.launch(cfg) }.map_err(drv)?;
        Ok(())
    }
}
