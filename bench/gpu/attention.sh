#!/usr/bin/env bash
# One command for the GPU checks of the attention kernels (issue 5), on a machine with an NVIDIA
# GPU, PyTorch with CUDA, and NVRTC (PyTorch's nvidia-cuda-nvrtc, or MOTIONRT_NVRTC):
#
#   bench/gpu/attention.sh [OUTDIR]
#
# Runs examples/attention_gpu (built beforehand on a machine with Rust:
# `cargo build --release --example attention_gpu`; its CUDA kernels compile here with NVRTC)
# and bench/gpu/sdpa_attention.py, then prints the Markdown table (bench/gpu/report.py).
# Exit status non-zero when a kernel is outside its tolerance.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
out="${1:-${OUT:-/tmp/motionrt-gpu}}"
mkdir -p "$out"
py="${PYTHON:-python3}"
# CUDA libraries from the PyTorch install (libnvrtc for the kernels; the driver is the system's)
torch_lib="$("$py" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
nv="$("$py" -c 'import nvidia, os; print(os.pathsep.join(p + "/" + s for p in nvidia.__path__ for s in ("cu13/lib", "cuda_nvrtc/lib")))' 2>/dev/null || true)"
export LD_LIBRARY_PATH="${nv}:${torch_lib}:${LD_LIBRARY_PATH:-}"
export MOTIONRT_PYTHON="$py"
export MOTIONRT_CACHE_DIR="$out/cache"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt" || true
status=0
"$root/target/release/examples/attention_gpu" > "$out/kernels.jsonl" || status=$?
"$py" "$root/bench/gpu/sdpa_attention.py" > "$out/sdpa.jsonl"
"$py" "$root/bench/gpu/report.py" "$out/kernels.jsonl" "$out/sdpa.jsonl" | tee "$out/report.md" || status=1
exit $status
