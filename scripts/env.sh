# Sourced by scripts/test and scripts/demo: makes ONNX Runtime (from the `onnxruntime` PyPI wheel,
# which ships libonnxruntime.so) and the `onnx` checker available in .venv, and points
# ORT_DYLIB_PATH / MOTIONRT_PYTHON at them. Idempotent; only the first run downloads.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c "import onnxruntime, onnx, numpy, nvidia" 2>/dev/null; then
  "$venv/bin/python" -m pip install --disable-pip-version-check -q -r "$root/scripts/requirements.txt"
fi
lib="$(ls "$venv"/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.* 2>/dev/null | head -n 1)"
if [ -z "$lib" ]; then
  echo "error: the onnxruntime wheel in $venv has no libonnxruntime.so" >&2
  exit 1
fi
export ORT_DYLIB_PATH="$lib"
export MOTIONRT_PYTHON="$venv/bin/python"
nvrtc="$(ls "$venv"/lib/python3*/site-packages/nvidia/cu13/lib/libnvrtc.so.* 2>/dev/null | head -n 1)"
if [ -n "$nvrtc" ]; then
  export MOTIONRT_NVRTC="$nvrtc"
fi
