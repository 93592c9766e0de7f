#!/usr/bin/env python3
"""Join examples/attention_gpu.rs output (kernels.jsonl) and sdpa_attention.py output
(sdpa.jsonl) into the Markdown table for BENCHMARKS.md: per shape and dtype, motionrt's kernel
time, PyTorch's, the ratio, the bandwidth floor, and the correctness result.

    report.py kernels.jsonl sdpa.jsonl
"""
import json
import sys


def load(path):
    with open(path) as f:
        rows = [json.loads(l) for l in f if l.strip()]
    return rows[0], rows[1:]


def key(r):
    return (r["op"], r["dtype"], tuple(sorted(r["shape"].items())))


def main():
    kh, kernels = load(sys.argv[1])
    th, torch_rows = load(sys.argv[2])
    ref = {key(r): r for r in torch_rows}
    print(f"device: {kh['device']} ({kh['arch']}); PyTorch {th['torch']}; median of {kh['repeats']} after {kh['warmup']} warm-up, CUDA events")
    print()
    print("| op | dtype | shape | motionrt ms | PyTorch ms | PyTorch / motionrt | bandwidth floor ms | max rel err (tol) |")
    print("|---|---|---|---|---|---|---|---|")
    failed = False
    for r in kernels:
        t = ref.get(key(r))
        torch_ms = None
        label = ""
        if t:
            if "diffusers_ms" in t:
                torch_ms, label = t["diffusers_ms"], " (diffusers path; SDPA alone %.3f)" % t["sdpa_ms"]
            else:
                torch_ms = t["tuneavideo_ms"]
        shape = ", ".join(f"{k}={v}" for k, v in r["shape"].items())
        err = "n/a" if r["max_rel_err"] is None else "%.1e (%.0e)%s" % (r["max_rel_err"], r["tolerance"], "" if r["pass"] else " FAIL")
        failed |= r["pass"] is False
        ratio = "" if torch_ms is None else "**%.2f×**%s" % (torch_ms / r["median_ms"], label)
        print(f"| {r['op']} | {r['dtype']} | {shape} | {r['median_ms']:.4f} | {'' if torch_ms is None else '%.4f' % torch_ms} | {ratio} | {r['bandwidth_floor_ms']:.4f} | {err} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
