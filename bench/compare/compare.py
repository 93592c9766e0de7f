#!/usr/bin/env python3
"""Side-by-side latency: motionrt (ONNX Runtime) vs diffusers' AnimateDiffPipeline (PyTorch) on
exactly the same model files, shapes, steps, scheduler and initial noise, interleaved in one run.

    bench/compare/compare.py --model EXPORT_DIR [--frames 8 --height 128 --width 128 --steps 4]
        [--guidance 7.5] [--threads N] [--warmup 1] [--runs 3] [--seed 0] [--json OUT.json]

EXPORT_DIR is what `motionrt export` wrote from diffusers folders: its model.json names the UNet
(pipeline folder with unet/, vae/, text_encoder/), the motion module (original AnimateDiff file or
MotionAdapter folder), the VAE and the text encoder; the tokenizer is EXPORT_DIR/tokenizer. diffusers
builds UNetMotionModel.from_unet2d(unet, adapter), AutoencoderKL, CLIPTextModel, CLIPTokenizer and a
DDIMScheduler from model.json's scheduler_defaults (AnimateDiff's betas).

motionrt runs as a worker process (`motionrt bench --worker`) that keeps its sessions loaded;
diffusers runs in this process. Rounds alternate A B, B A, A B, ... (warm-up rounds first, not
counted); round r uses the initial noise numpy.random.default_rng(seed + r).standard_normal for both
sides (written to a .npy for motionrt, passed as `latents=` to diffusers). Both use --threads
intra-op threads (torch interop threads 1). diffusers' stages are timed by wrapping encode_prompt,
unet.forward and decode_latents (with torch.inference_mode, output_type="np").

Prints a Markdown block (per stage: medians, the ratio diffusers/motionrt with the min-max of the
per-round ratios, peak resident memory of each process) for BENCHMARKS.md.
Needs: torch, diffusers, transformers, numpy (pinned: tests/fixtures/unet/requirements.txt).
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(HERE))  # bench/ for diffusers_unet_step.load_motion_adapter


def die(msg):
    sys.exit(f"compare.py: error: {msg}")


def peak_rss_bytes():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def component_dir(entry, sub, what):
    """A diffusers/transformers folder for a model.json component entry."""
    if not entry:
        die(f"model.json has no {what}: export it (motionrt export --{what.replace('_', '-')} ...)")
    path = entry["path"]
    if entry.get("layout") not in (None, "diffusers", "transformers") and not os.path.isdir(path):
        die(f"{what} {path} is a single file ({entry.get('layout')}); this script loads diffusers folders")
    if os.path.isfile(os.path.join(path, sub, "config.json")):
        return path, sub
    if os.path.isfile(os.path.join(path, "config.json")):
        return path, None
    die(f"{what}: no config.json in {path} or {path}/{sub}")


def load_diffusers(model_dir, manifest):
    import torch
    from diffusers import AnimateDiffPipeline, AutoencoderKL, DDIMScheduler, UNet2DConditionModel, UNetMotionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from diffusers_unet_step import load_motion_adapter

    unet_dir, sub = component_dir(manifest.get("unet"), "unet", "unet")
    unet = UNet2DConditionModel.from_pretrained(unet_dir, subfolder=sub, torch_dtype=torch.float32)
    mm = manifest.get("motion_module")
    if not mm:
        die("model.json names no motion module")
    adapter = load_motion_adapter(mm["path"], manifest)
    vae_dir, sub = component_dir(manifest.get("vae"), "vae", "vae")
    vae = AutoencoderKL.from_pretrained(vae_dir, subfolder=sub, torch_dtype=torch.float32)
    te_dir, sub = component_dir(manifest.get("text_encoder"), "text_encoder", "text_encoder")
    te = CLIPTextModel.from_pretrained(te_dir, subfolder=sub, torch_dtype=torch.float32)
    tok = CLIPTokenizer.from_pretrained(os.path.join(model_dir, "tokenizer"))
    sched = DDIMScheduler.from_config(manifest["scheduler_defaults"])
    pipe = AnimateDiffPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, motion_adapter=adapter,
                               scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class Timed:
    """Wraps a bound method, appending the seconds of each call to `times`."""

    def __init__(self, obj, name, times):
        self.orig = getattr(obj, name)
        self.times = times
        setattr(obj, name, self)

    def __call__(self, *args, **kw):
        t = time.perf_counter()
        r = self.orig(*args, **kw)
        self.times.append(time.perf_counter() - t)
        return r


def diffusers_pass(pipe, a, latents):
    import torch

    rec = {"encode_prompt": [], "unet": [], "decode": []}
    hooks = [Timed(pipe, "encode_prompt", rec["encode_prompt"]), Timed(pipe.unet, "forward", rec["unet"]),
             Timed(pipe, "decode_latents", rec["decode"])]
    try:
        t = time.perf_counter()
        with torch.inference_mode():
            pipe(prompt=a.prompt, negative_prompt="", num_frames=a.frames, height=a.height, width=a.width,
                 num_inference_steps=a.steps, guidance_scale=a.guidance, latents=torch.from_numpy(latents),
                 output_type="np", decode_chunk_size=a.decode_chunk)
        e2e = time.perf_counter() - t
    finally:
        for h, name, obj in zip(hooks, ["encode_prompt", "forward", "decode_latents"], [pipe, pipe.unet, pipe]):
            setattr(obj, name, h.orig)
    return {"text_encoder": sum(rec["encode_prompt"]), "unet_steps": rec["unet"],
            "unet_total": None, "vae_decode": sum(rec["decode"]), "end_to_end": e2e}


class Worker:
    def __init__(self, cmd):
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.ready = self.read()
        if self.ready.get("event") != "ready":
            die(f"motionrt worker: {self.ready}")

    def read(self):
        line = self.p.stdout.readline()
        if not line:
            die(f"motionrt worker exited (status {self.p.wait()}); its error is above")
        return json.loads(line)

    def ask(self, line):
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()
        return self.read()

    def close(self):
        r = self.ask("quit")
        self.p.wait()
        return r


def med(xs):
    return statistics.median(xs) if xs else None


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="motionrt export folder (from diffusers folders)")
    p.add_argument("--motionrt", default=os.path.join(ROOT, "target", "release", "motionrt"))
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--decode-chunk", type=int, default=16)
    p.add_argument("--prompt", default="a corgi running along the beach at sunset, cinematic")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the raw samples and summary here")
    a = p.parse_args()
    if a.runs < 1:
        die("--runs must be at least 1")
    if not os.access(a.motionrt, os.X_OK):
        die(f"{a.motionrt} is not an executable (cargo build --release, or pass --motionrt)")
    with open(os.path.join(a.model, "model.json")) as f:
        manifest = json.load(f)

    import numpy as np
    import torch
    import diffusers

    torch.set_num_threads(a.threads)
    torch.set_num_interop_threads(1)
    cmdline = "bench/compare/compare.py " + " ".join(sys.argv[1:])

    worker = Worker([a.motionrt, "bench", "--worker", "--model", a.model, "--frames", str(a.frames),
                     "--height", str(a.height), "--width", str(a.width), "--steps", str(a.steps),
                     "--guidance", str(a.guidance), "--decode-chunk", str(a.decode_chunk),
                     "--threads", str(a.threads), "--prompt", a.prompt])
    t = time.perf_counter()
    pipe = load_diffusers(a.model, manifest)
    torch_load = time.perf_counter() - t

    h, w = a.height // 8, a.width // 8
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.warmup + a.runs):
            noise = np.random.default_rng(a.seed + r).standard_normal((1, 4, a.frames, h, w)).astype(np.float32)
            npy = os.path.join(tmp, f"noise_{r}.npy")
            np.save(npy, noise)
            res = {}
            order = ["motionrt", "diffusers"] if r % 2 == 0 else ["diffusers", "motionrt"]
            for side in order:
                if side == "motionrt":
                    out = worker.ask(f"run {a.seed + r} {npy}")
                    if out.get("event") != "run":
                        die(f"motionrt: {out.get('message', out)}")
                    res["motionrt"] = out
                else:
                    res["diffusers"] = diffusers_pass(pipe, a, noise)
            warm = r < a.warmup
            print(f"round {r}{' (warm-up)' if warm else ''}: motionrt {res['motionrt']['end_to_end']:.3f} s, "
                  f"diffusers {res['diffusers']['end_to_end']:.3f} s end to end ({' then '.join(order)})",
                  file=sys.stderr)
            if not warm:
                rounds.append(res)
    done = worker.close()

    stages = ["text_encoder", "unet_step", "vae_decode", "end_to_end"]
    summary = {}
    for st in stages:
        per = {}
        for side in ("motionrt", "diffusers"):
            if st == "unet_step":
                per[side] = [x for r in rounds for x in r[side]["unet_steps"]]
            else:
                per[side] = [r[side][st] for r in rounds]
        if st == "unet_step":
            ratios = [med(r["diffusers"]["unet_steps"]) / med(r["motionrt"]["unet_steps"]) for r in rounds]
        else:
            ratios = [r["diffusers"][st] / r["motionrt"][st] for r in rounds]
        summary[st] = {"motionrt_median_s": med(per["motionrt"]), "diffusers_median_s": med(per["diffusers"]),
                       "ratio": med(per["diffusers"]) / med(per["motionrt"]),
                       "ratio_min": min(ratios), "ratio_max": max(ratios),
                       "samples": per}
    mem = {"motionrt_peak_rss_bytes": done.get("peak_host_bytes"), "diffusers_peak_rss_bytes": peak_rss_bytes()}

    gib = lambda b: f"{b / 2**30:.2f} GiB" if b else "?"
    print("```text")
    print(f"pipeline on the CPU: motionrt (ONNX Runtime {worker.ready.get('backend')}) vs diffusers {diffusers.__version__}"
          f" (PyTorch {torch.__version__}), AnimateDiffPipeline, DDIM")
    print(f"model:    {a.model} ({manifest.get('precision')}, semantics {manifest.get('semantics')})")
    print(f"shape:    1 video, {a.frames} frames, {a.width}x{a.height} px (latent {w}x{h}), {a.steps} steps, "
          f"guidance {a.guidance} (UNet batch 2)")
    print(f"threads:  {a.threads} intra-op each (torch interop 1); warm-up {a.warmup}, timed rounds {a.runs}, "
          f"interleaved A B / B A")
    print(f"machine:  {cpu_name()}, {os.cpu_count()} logical CPUs")
    print(f"date:     {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"command:  {cmdline}")
    print("```")
    print()
    print("| stage | motionrt median | diffusers median | diffusers / motionrt (per-round min–max) |")
    print("|---|---|---|---|")
    for st in stages:
        s = summary[st]
        print(f"| {st} | {s['motionrt_median_s']:.4f} s | {s['diffusers_median_s']:.4f} s | "
              f"**{s['ratio']:.2f}×** ({s['ratio_min']:.2f}–{s['ratio_max']:.2f}) |")
    print(f"| peak RSS | {gib(mem['motionrt_peak_rss_bytes'])} | {gib(mem['diffusers_peak_rss_bytes'])} | "
          f"{(mem['diffusers_peak_rss_bytes'] or 0) / (mem['motionrt_peak_rss_bytes'] or 1):.2f}× |")
    print(f"| load | {worker.ready.get('load_s', 0):.2f} s | {torch_load:.2f} s | |")
    if a.json:
        with open(a.json + ".partial", "w") as f:
            json.dump({"command": cmdline, "args": vars(a), "summary": summary, "memory": mem,
                       "rounds": rounds, "motionrt_load_s": worker.ready.get("load_s"),
                       "diffusers_load_s": torch_load}, f, indent=2)
        os.replace(a.json + ".partial", a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
