#!/usr/bin/env python3
"""PSNR (dB, 8-bit) between the PNG frames of two folders written by `motionrt run --out DIR`.
Prints one JSON line with the per-frame and minimum PSNR (null for identical frames: JSON has no
infinity); exits 1 if the minimum is under --min."""
import argparse, glob, json, math, os, sys

import numpy as np
from PIL import Image

p = argparse.ArgumentParser()
p.add_argument("a")
p.add_argument("b")
p.add_argument("--min", type=float, default=35.0)
a = p.parse_args()
fa = sorted(glob.glob(os.path.join(a.a, "*.png")))
fb = sorted(glob.glob(os.path.join(a.b, "*.png")))
if not fa or len(fa) != len(fb):
    sys.exit(f"error: {len(fa)} frames in {a.a}, {len(fb)} in {a.b}")
ps = []
for x, y in zip(fa, fb):
    u = np.asarray(Image.open(x).convert("RGB"), dtype=np.float64)
    v = np.asarray(Image.open(y).convert("RGB"), dtype=np.float64)
    mse = ((u - v) ** 2).mean()
    ps.append(float("inf") if mse == 0 else 10 * math.log10(255.0 ** 2 / mse))
m = min(ps)
js = lambda x: None if math.isinf(x) else x
print(json.dumps({"frames": len(ps), "psnr_db": [js(x) for x in ps], "min_psnr_db": js(m),
                  "threshold_db": a.min, "pass": m >= a.min}))
sys.exit(0 if m >= a.min else 1)
