#!/usr/bin/env python3
"""The headline of a bench/gpu/engine.sh run, from its result folder ($WORK/out): the engine's
UNet step against diffusers eager and torch.compile (same run), the compute floor, device memory,
build and load time, PSNR and the checks' failures. Prints a short Markdown summary (the device
tool keeps only the end of a call's output); missing results are named as missing.

    summary.py RESULT_DIR [--floor-ms 45]
"""
import argparse
import glob
import json
import os
import re


def json_lines(path):
    """Every JSON object printed on its own line in a log."""
    out = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line.startswith("{"):
                    try:
                        out.append(json.loads(line))
                    except ValueError:
                        pass
    except OSError:
        pass
    return out


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def fmt(x, unit="", digits=1):
    return "missing" if x is None else f"{x:.{digits}f}{unit}"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("res")
    p.add_argument("--floor-ms", type=float, default=45.0,
                   help="the compute floor of one UNet step (the issue's ~45 ms on an H100)")
    a = p.parse_args()
    rows = []

    # each stage's exit status, limit and time (engine.sh's stages.txt), and the first error a
    # failed stage's logs show
    try:
        with open(os.path.join(a.res, "stages.txt")) as f:
            stages = [l.split() for l in f if l.strip()]
    except OSError:
        stages = []
    if stages:
        print("stages: " + ", ".join(
            f"{s[0]} {'ok' if s[1] == '0' else 'TIMED OUT' if s[1] == '124' else s[1] if not s[1].isdigit() else 'exit ' + s[1]}"
            + (f" ({s[3]} of {s[2]} s)" if s[1].isdigit() else "")
            for s in stages if len(s) == 4))
        errors = []
        for log in sorted(glob.glob(os.path.join(a.res, "*.log")) + glob.glob(os.path.join(a.res, "*.md"))):
            with open(log, errors="replace") as f:
                for l in f:
                    if l.startswith("error:") or "panicked at" in l:
                        errors.append(f"{os.path.basename(log)}: {l.strip()[:240]}")
                        break
        for e in errors[:6]:
            print(e)
        print()

    # engine (engine_gpu bench): one layout's object or a list of them; the first with numbers
    engs = []
    # engine_bench_lib.json, engine_bench_nchw.json: the runs without motionrt's tactic kernels
    # (then also in NCHW) the script makes when the benchmark ends in an error
    for name in ("engine_bench.json", "engine_bench_lib.json", "engine_bench_nchw.json"):
        eng = load(os.path.join(a.res, name))
        engs += eng if isinstance(eng, list) else [eng] if eng else []
    engs = [e for e in engs if isinstance(e, dict) and e.get("graph_median_ms")]
    torch_lines = json_lines(os.path.join(a.res, "torch_bench.log"))
    tr = {}
    for t in torch_lines:
        if "impl" in t:
            tr = t  # the last line has the most (eager, then eager + compiled)
    eager = tr.get("eager_median_ms") or None
    compiled = tr.get("compiled_median_ms")
    print("## motionrt engine vs PyTorch: one UNet step, same run")
    print()
    dev = (engs[0].get("device") if engs else None) or tr.get("device") or "?"
    shape = (engs[0].get("shape") if engs else None) or tr.get("shape")
    print(f"device: {dev}; shape [batch, 4, frames, h, w] (latents): {shape}")
    print()
    print("| implementation | median ms | speed-up vs diffusers eager | ms / floor |")
    print("| --- | --- | --- | --- |")

    def row(name, ms):
        up = f"{eager / ms:.2f}x" if (eager and ms) else "n/a"
        fl = f"{ms / a.floor_ms:.2f}" if ms else "n/a"
        print(f"| {name} | {fmt(ms)} | {up} | {fl} |")

    row("diffusers fp16 eager (SDPA, cudnn.benchmark off)", eager)
    row("diffusers fp16 torch.compile (default mode: no CUDA graphs)", compiled)
    def label(e):
        lib = "" if e.get("kernel_tactics", True) else ", cuDNN/cuBLASLt only"
        return f"{e.get('layout', '?')}{lib}"

    def broken(e):
        # a timing of a program whose output is not finite is not the engine's number
        return ", OUTPUT NOT FINITE" if e.get("output_nonfinite") else ""

    for e in engs:
        row(f"motionrt engine fp16 {label(e)}, CUDA graph{broken(e)}", e.get("graph_median_ms"))
        row(f"motionrt engine fp16 {label(e)}, eager launches{broken(e)}", e.get("eager_median_ms"))
    if not engs:
        print("| motionrt engine | missing (engine_bench.json) | | |")
    print()
    sound = [e for e in engs if not e.get("output_nonfinite")]
    if sound and eager:
        e = min(sound, key=lambda e: e["graph_median_ms"])
        best = e["graph_median_ms"]
        print(f"targets ({label(e)}, CUDA graph): >= 1.5x faster than eager: "
              f"{'MET' if eager / best >= 1.5 else 'NOT met'} "
              f"({eager / best:.2f}x); within 2x of the {a.floor_ms:.0f} ms floor: "
              f"{'MET' if best <= 2 * a.floor_ms else 'NOT met'} ({best / a.floor_ms:.2f}x)")
    for e in engs:
        print(f"engine {label(e)}: device memory in use {fmt(e.get('device_used_mib'), ' MiB', 0)} "
              f"(weights {fmt(e.get('weights_mib'), ' MiB', 0)}, arena {fmt(e.get('arena_mib'), ' MiB', 0)}); "
              f"compile {fmt(e.get('compile_s'), ' s', 2)}, load with timing {fmt(e.get('build_load_s'), ' s')}, "
              f"load from cache {fmt(e.get('load_cached_s'), ' s')}, capture {fmt(e.get('capture_s'), ' s', 2)}; "
              f"same tactics on reload: {e.get('tactics_deterministic')}; non-finite outputs: "
              f"{e.get('output_nonfinite')}")
        # per problem each applies to: [problem, the library's ms, the kernel's ms (its faster
        # tile width), that width, chosen]
        for key, kernel, what, library in (("conv_igemm", "conv_igemm_f16", "convolution", "cuDNN"),
                                           ("gemm_geglu", "gemm_geglu_f16", "GEGLU", "cuBLASLt + geglu"),
                                           ("norm_gemm", "conv_igemm_gn/_ln_f16", "normalisation + GEMM",
                                            "normalisation + GEMM")):
            t = e.get(key) or []
            if t:
                won = sum(1 for r in t if r[-1])
                print(f"engine {label(e)}: {kernel} chosen for {won} of {len(t)} {what} "
                      f"problems; one call each: {library} {sum(r[1] for r in t):.2f} ms, {kernel} "
                      f"{sum(r[2] for r in t if r[2] < 1e30):.2f} ms")
        # [problem, one-tile ms, two-tile ms, chosen]
        t = e.get("attention_two") or []
        if t:
            print(f"engine {label(e)}: attention_tiled2_f16_d40 chosen for "
                  f"{sum(1 for r in t if r[-1])} of {len(t)} d = 40 attention problems; one call "
                  f"each: one-tile {sum(r[1] for r in t):.2f} ms, two-tile "
                  f"{sum(r[2] for r in t if r[2] < 1e30):.2f} ms")
        for key in ("specialisation_ab", "gemm_timing_ab", "conv_kernel_ab", "geglu_kernel_ab",
                    "norm_kernel_ab", "attention_two_ab"):
            if e.get(key):
                print(f"engine {label(e)}: {key} {json.dumps(e[key])}")
    if tr:
        print(f"torch: load {fmt(tr.get('load_s'), ' s')}, eager peak allocated "
              f"{fmt(tr.get('eager_peak_mib'), ' MiB', 0)}, device in use "
              f"{fmt(tr.get('eager_device_used_mib'), ' MiB', 0)}; compile {fmt(tr.get('compile_s'), ' s', 0)}, "
              f"compiled peak {fmt(tr.get('compiled_peak_mib'), ' MiB', 0)}")
    print()

    # build and pipeline
    try:
        with open(os.path.join(a.res, "build_full.log")) as f:
            text = f.read()
    except OSError:
        text = None
    run = load(os.path.join(a.res, "run_full_engine.json"))
    build_s, build_how = None, ""
    for line in (text or "").splitlines()[::-1]:
        # "build: N s", or "build (--no-kernel-tactics): N s" when the first build failed
        m = re.match(r"build( \(--no-kernel-tactics\))?: ([0-9.]+) s$", line.strip())
        if m:
            build_s = float(m.group(2))
            build_how = " (retried with --no-kernel-tactics after a failed build)" if m.group(1) else ""
            break
    if text is not None or run:
        print(f"full engine: build {fmt(build_s, ' s', 0)}{build_how}; pipeline (16 frames 512x512, CFG) "
              f"timings: {json.dumps(run.get('timings_s')) if run else 'missing'}")
    bf = load(os.path.join(a.res, "bench_full_engine.json"))
    if bf:
        st = bf.get("stages", {})
        med = lambda k: (st.get(k) or {}).get("stats") and st[k]["stats"].get("median")
        mem = (bf.get("memory") or {}).get("peak_device_bytes")
        print(f"bench --engine (pipeline): unet_step median {fmt(med('unet_step') and med('unet_step') * 1e3, ' ms')}, "
              f"vae_decode {fmt(med('vae_decode'), ' s', 2)}, end_to_end {fmt(med('end_to_end'), ' s', 2)}, "
              f"load {json.dumps(bf.get('load_s'))}, device memory {fmt(mem and mem / 2**20, ' MiB', 0)}")
    rebuild = os.path.join(a.res, "full_rebuild.txt")
    if os.path.exists(rebuild):
        print(open(rebuild).read().strip())

    # correctness
    fails = 0
    checked = 0
    for md in sorted(glob.glob(os.path.join(a.res, "check_*.md"))):
        with open(md) as f:
            for line in f:
                if line.startswith("|") and line.rstrip().endswith("|"):
                    cells = [c.strip() for c in line.strip().strip("|").split("|")]
                    if cells and cells[-1] in ("ok", "FAIL"):
                        checked += 1
                        if cells[-1] == "FAIL":
                            fails += 1
                            rows.append(f"FAIL {os.path.basename(md)}: {line.strip()}")
    print(f"checks vs ONNX Runtime CPU fp32: {checked} rows, {fails} FAIL")
    for r in rows[:12]:
        print(r)
    # tactic kernels that timed faster but did not compute what the libraries do (so not taken)
    rejected = []
    for log in sorted(glob.glob(os.path.join(a.res, "*.log")) + glob.glob(os.path.join(a.res, "*.md"))):
        with open(log, errors="replace") as f:
            rejected += [f"{os.path.basename(log)}: {l.strip()}" for l in f
                         if "the kernel does not compute what" in l]
    print(f"tactic kernels turned away by their correctness check: {len(rejected)}")
    for r in rejected[:8]:
        print(r[:300])
    # step-by-step localisation after a failed check or an error (engine_gpu localize)
    for md in sorted(glob.glob(os.path.join(a.res, "check_*.md")) + glob.glob(os.path.join(a.res, "localize_*.md"))):
        with open(md) as f:
            for line in f:
                if line.startswith("localize ") or line.startswith("(no step-by-step"):
                    print(f"{os.path.basename(md)}: {line.strip()}")
    for ps in sorted(glob.glob(os.path.join(a.res, "psnr_*.json"))):
        j = load(ps)
        if not j:
            # psnr.py failed before writing (no frames, a frame-count mismatch): say so
            print(f"{os.path.basename(ps)}: MISSING or invalid (psnr.py printed no result)")
            continue
        db = j.get('min_psnr_db')
        db = "inf (identical frames)" if db is None else f"{db} dB"
        print(f"{os.path.basename(ps)}: min PSNR {db} over {j.get('frames')} frames, pass {j.get('pass')}")
    for name in ("tiny1.sha", "tiny2.sha"):
        if not os.path.exists(os.path.join(a.res, name)):
            break
    else:
        same = open(os.path.join(a.res, "tiny1.sha")).read() == open(os.path.join(a.res, "tiny2.sha")).read()
        print(f"tiny engine built twice with the timing cache: {'identical' if same else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
