#!/usr/bin/env python3
"""One UNet call (a CFG step) of diffusers' UNetMotionModel on the GPU in float16: eager with
PyTorch's SDPA attention, then torch.compile. The PyTorch side of bench/gpu/engine.sh.

    unet_step_torch.py --model EXPORT_DIR --batch 2 --frames 16 --height 64 --width 64 \
        [--warmup 3 --repeats 10] [--no-compile] [--device cuda]

`--device cpu` (float32, wall-clock timing, no memory figure or profile) is a dry run of this
script on a machine without a GPU, at a tiny shape; its times mean nothing.

The UNet and motion module are the ones model.json names (as bench/diffusers_unet_step.py).
Times with CUDA events, medians after warm-up. Prints one JSON line.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def timed(fn, warmup, repeats, torch, cuda=True):
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        if not cuda:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
            continue
        e0 = torch.cuda.Event(enable_timing=True)
        e1 = torch.cuda.Event(enable_timing=True)
        e0.record()
        fn()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1))
    s = sorted(times)
    n = len(s)
    return (s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2), times


# kernel name fragments -> family, first match wins (the same families as the engine's profile)
# (cuDNN's convolutions are implicit GEMMs: "fprop"/"implicit" first; Hopper's cuBLAS kernels are
# sm90_xmma_gemm_* and nvjet_*)
FAMILIES = [
    ("attention", ("flash", "fmha", "attention", "sdpa", "mha")),
    ("conv", ("conv", "implicit", "winograd", "fprop", "dgrad", "cudnn")),
    ("gemm", ("gemm", "nvjet", "cutlass", "sm90_", "ampere_", "cublas")),
    ("group_norm", ("group_norm", "groupnorm")),
    ("layer_norm", ("layer_norm", "layernorm")),
    ("softmax", ("softmax",)),
    ("copy", ("copy", "transpose", "cat", "permute")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "reduce")),
]


def kernel_families(step, torch):
    """CUDA time of one eager call by kernel family (ms), from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile
    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    fam = {}
    for ev in prof.key_averages():
        us = getattr(ev, "device_time_total", None)
        if us is None:
            us = getattr(ev, "cuda_time_total", 0)
        if not us:
            continue
        name = ev.key.lower()
        kind = next((k for k, keys in FAMILIES if any(x in name for x in keys)), "other")
        fam.setdefault(kind, [0.0, 0])
        fam[kind][0] += us / 1000.0
        fam[kind][1] += ev.count
    return {k: [round(v[0], 3), v[1]] for k, v in sorted(fam.items(), key=lambda kv: -kv[1][0])}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--device", default="cuda", help="cuda (float16), or cpu for a float32 dry run")
    p.add_argument("--profile", action="store_true",
                   help="also break one eager call's CUDA time down by kernel family (torch.profiler)")
    a = p.parse_args()
    import torch
    from diffusers import UNet2DConditionModel, UNetMotionModel
    from diffusers_unet_step import load_motion_adapter

    with open(os.path.join(a.model, "model.json")) as f:
        manifest = json.load(f)
    unet_dir = manifest["unet"]["path"]
    mm_path = manifest["motion_module"]["path"]
    t0 = time.perf_counter()
    sub = "unet" if os.path.isfile(os.path.join(unet_dir, "unet", "config.json")) else None
    unet = UNet2DConditionModel.from_pretrained(unet_dir, subfolder=sub, torch_dtype=torch.float32)
    adapter = load_motion_adapter(mm_path, manifest)
    cuda = a.device == "cuda"
    dev, dtype = a.device, (torch.float16 if cuda else torch.float32)
    model = UNetMotionModel.from_unet2d(unet, adapter).eval().to(dev, dtype)
    del unet, adapter
    load_s = time.perf_counter() - t0
    g = torch.Generator(device=dev).manual_seed(0)
    b, f = a.batch, a.frames
    sample = torch.randn(b, 4, f, a.height, a.width, device=dev, dtype=dtype, generator=g)
    t = torch.tensor([981.0] * b, device=dev)
    d = model.config.cross_attention_dim
    ctx = torch.randn(b * f, 77, d, device=dev, dtype=dtype, generator=g)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    out = {"impl": "diffusers-torch-" + ("fp16" if cuda else "fp32-cpu-dry-run"),
           "device": torch.cuda.get_device_name() if cuda else "cpu",
           "torch": torch.__version__, "diffusers": __import__("diffusers").__version__,
           "shape": [b, 4, f, a.height, a.width], "load_s": load_s}
    with torch.inference_mode():
        step = lambda: model(sample, t, encoder_hidden_states=ctx).sample
        out["eager_median_ms"], out["eager_ms"] = timed(step, a.warmup, a.repeats, torch, cuda)
        if cuda:
            # allocated: tensors alone; reserved: the caching allocator's pool; device used:
            # total - free (context and libraries too: comparable with the engine's figure)
            out["eager_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
            out["eager_peak_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
            free, total = torch.cuda.mem_get_info()
            out["eager_device_used_mib"] = (total - free) / 2**20
        print(json.dumps(out), flush=True)
        if a.profile and cuda:
            print(json.dumps({"eager_kernels_ms": kernel_families(step, torch)}), flush=True)
        if not a.no_compile:
            cm = torch.compile(model)
            step = lambda: cm(sample, t, encoder_hidden_states=ctx).sample
            t1 = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            out["compile_s"] = time.perf_counter() - t1
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            out["compiled_median_ms"], out["compiled_ms"] = timed(step, a.warmup, a.repeats, torch, cuda)
            if cuda:
                out["compiled_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
                free, total = torch.cuda.mem_get_info()
                out["compiled_device_used_mib"] = (total - free) / 2**20
            print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
