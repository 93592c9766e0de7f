#!/usr/bin/env python3
"""Time one UNet step of diffusers' UNetMotionModel on PyTorch (CPU): the reference side of the
motionrt vs diffusers benchmark (driven by bench/unet_step_cpu.sh).

Benchmark mode (same arguments as `cargo run --release --example unet_step`):

    diffusers_unet_step.py --model OUT_DIR --batch 2 --frames 8 --height 16 --width 16 \
        --threads 2 --warmup 1 --repeats 3 --seed 0 --inputs inputs.bin --save-output ref.bin

The UNet and the motion module are the ones recorded in OUT_DIR/model.json by `motionrt export`
(override with --unet / --motion-module). The inputs are read from the file written by the Rust
example (`--inputs FILE`: raw little-endian f32 + FILE.json), so both sides see the same arrays.
Prints one JSON line: {"impl":"diffusers-torch","median_s":..,"times_s":[..],...}.

Compare mode: `diffusers_unet_step.py --compare OUT.bin REF.bin` prints
{"max_abs_diff":..,"max_abs_ref":..,"rel_err":..,"ok":rel_err<=tol}.
"""

import argparse
import json
import os
import sys
import time


def read_arrays(path):
    import numpy as np

    side = path + ".json"
    try:
        with open(side) as f:
            desc = json.load(f)
    except FileNotFoundError:
        sys.exit(f"error: {side} not found (write it with the Rust example's --inputs/--save-output)")
    raw = np.fromfile(path, dtype="<f4")
    out = {}
    for a in desc["arrays"]:
        n = 1
        for s in a["shape"]:
            n *= s
        off = a["offset"] // 4
        if off + n > raw.size:
            sys.exit(f"error: {path}: array {a['name']} runs past the end of the file")
        out[a["name"]] = raw[off : off + n].reshape(a["shape"])
    return out


def write_arrays(path, arrays, meta):
    import numpy as np

    desc, off = [], 0
    with open(path, "wb") as f:
        for name, arr in arrays:
            arr = np.ascontiguousarray(arr, dtype="<f4")
            desc.append({"name": name, "shape": list(arr.shape), "offset": off, "dtype": "<f4"})
            f.write(arr.tobytes())
            off += arr.nbytes
    with open(path + ".json", "w") as f:
        json.dump({"file": os.path.basename(path), "arrays": desc, "meta": meta}, f, indent=2)
        f.write("\n")


def compare(out_path, ref_path, tol):
    import numpy as np

    (out,) = read_arrays(out_path).values()
    (ref,) = read_arrays(ref_path).values()
    if out.shape != ref.shape:
        sys.exit(f"error: shape mismatch: {out_path} {out.shape} vs {ref_path} {ref.shape}")
    out64, ref64 = out.astype(np.float64), ref.astype(np.float64)
    diff = float(np.abs(out64 - ref64).max())
    scale = float(np.abs(ref64).max())
    rel = diff / scale if scale > 0 else diff
    res = {
        "max_abs_diff": diff,
        "max_abs_ref": scale,
        "rel_err": rel,
        "mean_abs_diff": float(np.abs(out64 - ref64).mean()),
        "tol": tol,
        "ok": bool(rel <= tol and np.isfinite(out).all()),
    }
    print(json.dumps(res))
    return 0 if res["ok"] else 1


def rss_mib():
    """(VmRSS, VmHWM) of this process in MiB (Linux), else (None, None)."""
    try:
        with open("/proc/self/status") as f:
            kv = dict(l.split(":", 1) for l in f if ":" in l)
        return (int(kv["VmRSS"].split()[0]) / 1024, int(kv["VmHWM"].split()[0]) / 1024)
    except (OSError, KeyError, ValueError):
        return (None, None)


def load_motion_adapter(path, manifest):
    import torch
    from diffusers import MotionAdapter

    if os.path.isdir(path):
        return MotionAdapter.from_pretrained(path, torch_dtype=torch.float32)
    # Original AnimateDiff layout: convert keys like from_single_file does, but offline, with the
    # config motionrt inferred from the tensor shapes (model.json motion_module.config).
    from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers

    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(path)
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        sd = sd.get("state_dict", sd)
    mc = (manifest.get("motion_module") or {}).get("config") or {}
    config = {
        "block_out_channels": tuple(mc.get("block_out_channels", (320, 640, 1280, 1280))),
        "motion_layers_per_block": mc.get("layers_per_block", 2),
        "motion_transformer_layers_per_block": mc.get("transformer_layers", 1),
        "motion_num_attention_heads": mc.get("num_attention_heads", 8),
        "motion_norm_num_groups": mc.get("norm_num_groups", 32),
        "motion_max_seq_length": mc.get("max_seq_length", 32),
        "use_motion_mid_block": mc.get("mid_block", True),
    }
    adapter = MotionAdapter(**config)
    converted = convert_animatediff_checkpoint_to_diffusers(sd)
    del sd
    missing, unexpected = adapter.load_state_dict(converted, strict=False)
    # pos_embed buffers are recomputed sinusoids in diffusers; any other key must match exactly.
    missing = [k for k in missing if not k.endswith("pos_embed.pe")]
    unexpected = [k for k in unexpected if not k.endswith("pos_embed.pe")]
    if missing or unexpected:
        sys.exit(f"error: {path}: motion module keys do not match diffusers' MotionAdapter: "
                 f"missing {missing[:5]}... ({len(missing)}), unexpected {unexpected[:5]}... ({len(unexpected)})")
    return adapter


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="motionrt export folder (model.json names the UNet and motion module)")
    p.add_argument("--unet", help="diffusers UNet folder (default: from model.json)")
    p.add_argument("--motion-module", help="MotionAdapter folder or original-layout file (default: from model.json)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--height", type=int, default=16)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0, help="recorded only; the inputs come from --inputs")
    p.add_argument("--inputs", help="inputs written by the Rust example (--inputs FILE)")
    p.add_argument("--save-output", help="write the output of the last timed run here")
    p.add_argument("--compare", nargs=2, metavar=("OUT", "REF"), help="compare two saved outputs and exit")
    p.add_argument("--tol", type=float, default=1e-3, help="--compare: max |out-ref| / max |ref| allowed")
    a = p.parse_args()

    if a.compare:
        return compare(a.compare[0], a.compare[1], a.tol)
    if not a.model or not a.inputs:
        p.error("--model and --inputs are required (or use --compare)")
    if a.repeats < 1:
        p.error("--repeats must be at least 1")

    import torch

    # Before any parallel work: intra-op threads as asked, no inter-op pool (ORT runs sequentially too).
    torch.set_num_threads(a.threads)
    torch.set_num_interop_threads(1)

    from diffusers import UNet2DConditionModel, UNetMotionModel

    with open(os.path.join(a.model, "model.json")) as f:
        manifest = json.load(f)
    unet_dir = a.unet or manifest["unet"]["path"]
    mm_path = a.motion_module or (manifest.get("motion_module") or {}).get("path")
    if not mm_path:
        sys.exit(f"error: {a.model}/model.json names no motion module; pass --motion-module")

    arrs = read_arrays(a.inputs)
    sample = torch.from_numpy(arrs["sample"].copy())
    timestep = torch.from_numpy(arrs["timestep"].copy())
    ctx = torch.from_numpy(arrs["encoder_hidden_states"].copy())
    want = [a.batch, sample.shape[1], a.frames, a.height, a.width]
    if list(sample.shape) != want:
        sys.exit(f"error: {a.inputs}: sample is {list(sample.shape)}, arguments ask for {want}")

    t0 = time.perf_counter()
    sub = "unet" if os.path.isfile(os.path.join(unet_dir, "unet", "config.json")) else None
    unet = UNet2DConditionModel.from_pretrained(unet_dir, subfolder=sub, torch_dtype=torch.float32)
    adapter = load_motion_adapter(mm_path, manifest)
    model = UNetMotionModel.from_unet2d(unet, adapter).eval()
    del unet, adapter
    load_s = time.perf_counter() - t0
    rss_after_load, _ = rss_mib()

    def step():
        return model(sample, timestep, encoder_hidden_states=ctx).sample

    warmup_s, times = [], []
    with torch.inference_mode():
        for _ in range(a.warmup):
            t = time.perf_counter()
            step()
            warmup_s.append(time.perf_counter() - t)
        out = None
        for _ in range(a.repeats):
            t = time.perf_counter()
            out = step()
            times.append(time.perf_counter() - t)
    out = out.float().numpy()
    rss_end, hwm = rss_mib()
    if a.save_output:
        write_arrays(a.save_output, [("noise_pred", out)], {"impl": "diffusers-torch"})
    s = sorted(times)
    n = len(s)
    med = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
    print(json.dumps({
        "impl": "diffusers-torch",
        "median_s": med,
        "times_s": times,
        "warmup_s": warmup_s,
        "threads": a.threads,
        "shape": list(sample.shape),
        "timestep": float(timestep[0]),
        "load_s": load_s,
        "rss_after_load_mib": rss_after_load,
        "rss_end_mib": rss_end,
        "peak_rss_mib": hwm,
        "output": {"shape": list(out.shape), "sum": float(out.astype("float64").sum()),
                   "max_abs": float(abs(out).max())},
        "torch": torch.__version__,
        "diffusers": __import__("diffusers").__version__,
        "torch_threads": torch.get_num_threads(),
        "unet": unet_dir,
        "motion_module": mm_path,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
