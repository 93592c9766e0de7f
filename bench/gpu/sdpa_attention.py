#!/usr/bin/env python3
"""PyTorch's side of the attention-kernel comparison (bench/gpu/attention.sh): the same shapes
as examples/attention_gpu.rs, timed with CUDA events (median of --repeats after --warmup), for

- `sdpa`: torch.nn.functional.scaled_dot_product_attention on [N, heads, L, d] tensors already
  in that layout (the kernel alone);
- `diffusers`: what diffusers' attention processor does around it for [N, L, C] tokens
  (view, transpose, SDPA, transpose back, reshape);
- sparse-causal: Tune-A-Video's key gathering (index frame 0 and frame i-1, cat) + SDPA.

Prints one JSON object per line. Needs torch with CUDA.
"""
import argparse
import json
import statistics

import torch
import torch.nn.functional as F


def timed(fn, warmup, repeats):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def temporal(n, f, heads, d, dtype, a):
    c = heads * d
    q, k, v = (torch.randn(n, f, c, device="cuda", dtype=dtype) for _ in range(3))
    qh, kh, vh = (x.view(n, f, heads, d).transpose(1, 2).contiguous() for x in (q, k, v))

    def sdpa():
        return F.scaled_dot_product_attention(qh, kh, vh)

    def diffusers_path():
        qq, kk, vv = (x.view(n, -1, heads, d).transpose(1, 2) for x in (q, k, v))
        o = F.scaled_dot_product_attention(qq, kk, vv)
        return o.transpose(1, 2).reshape(n, -1, c)

    with torch.inference_mode():
        return {"op": "TemporalAttention", "dtype": "f16" if dtype == torch.float16 else "f32",
                "shape": {"N": n, "F": f, "heads": heads, "d": d},
                "sdpa_ms": timed(sdpa, a.warmup, a.repeats),
                "diffusers_ms": timed(diffusers_path, a.warmup, a.repeats)}


def sparse(b, f, s, heads, d, dtype, a):
    c = heads * d
    q, k, v = (torch.randn(b * f, s, c, device="cuda", dtype=dtype) for _ in range(3))
    former = torch.arange(f, device="cuda") - 1
    former[0] = 0

    def tav():
        kk = k.view(b, f, s, c)
        vv = v.view(b, f, s, c)
        kk = torch.cat([kk[:, [0] * f], kk[:, former]], dim=2).view(b * f, 2 * s, c)
        vv = torch.cat([vv[:, [0] * f], vv[:, former]], dim=2).view(b * f, 2 * s, c)
        qq, kk, vv = (x.view(b * f, -1, heads, d).transpose(1, 2) for x in (q, kk, vv))
        o = F.scaled_dot_product_attention(qq, kk, vv)
        return o.transpose(1, 2).reshape(b * f, s, c)

    with torch.inference_mode():
        return {"op": "SparseCausalAttention", "dtype": "f16" if dtype == torch.float16 else "f32",
                "shape": {"B": b, "F": f, "S": s, "heads": heads, "d": d},
                "tuneavideo_ms": timed(tav, a.warmup, a.repeats)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=50)
    a = p.parse_args()
    print(json.dumps({"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                      "warmup": a.warmup, "repeats": a.repeats}))
    for dtype in (torch.float32, torch.float16):
        for n, heads, d in [(2 * 64 * 64, 8, 40), (2 * 32 * 32, 8, 80), (2 * 16 * 16, 8, 160), (2 * 8 * 8, 8, 160)]:
            print(json.dumps(temporal(n, 16, heads, d, dtype, a)), flush=True)
        for b, f, s, heads, d in [(1, 8, 32 * 32, 8, 40), (2, 8, 64 * 64, 8, 40), (2, 8, 32 * 32, 8, 80)]:
            print(json.dumps(sparse(b, f, s, heads, d, dtype, a)), flush=True)


if __name__ == "__main__":
    main()
