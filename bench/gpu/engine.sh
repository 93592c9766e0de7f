#!/usr/bin/env bash
# The native CUDA engine's GPU checks and benchmark (issue 6), in one run on a machine with an
# NVIDIA GPU and PyTorch's CUDA wheels (cuBLAS, cuDNN, NVRTC come from its `nvidia` packages; ONNX
# Runtime from the `onnxruntime` wheel). Build first, on any machine:
#
#   cargo build --release --bin motionrt --example engine_gpu --example synth_sd15
#
# then:  BIN=target/release bench/gpu/engine.sh [--no-full] [--no-compile]
#
# 1. tiny AnimateDiff pipeline (tests' fixtures, exported here): every graph, fp32 and fp16,
#    channels-last and NCHW layouts, eager and CUDA-graph replay, vs ONNX Runtime CPU fp32
#    (engine_gpu check; non-zero on a miss)
# 2. full SD1.5 + AnimateDiff v2 with the SD1.5 VAE and CLIP text encoder (random weights,
#    synth_sd15 --components), exported: the UNet at 2 frames 16x16, and the VAE decoder at
#    512x512 (64x64 latent: its 4096-token attention with one 512-wide head), vs ONNX Runtime
#    CPU fp32, fp32 and fp16, both layouts
# 3. the same UNet at 16 frames, 512x512 (64x64 latents), batch 2 (CFG): engine fp16 per-step
#    latency in both layouts (CUDA graph and eager, per-step profile), build/load time, memory;
#    then diffusers fp16 (SDPA) eager (with its kernel-family profile) and torch.compile on the
#    same GPU (bench/gpu/unet_step_torch.py; needs diffusers)
# Stages: --no-full stops after 1; --no-compile skips torch.compile; --only-bench runs 3 alone.
set -uo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-target/release}
WORK=${WORK:-/tmp/motionrt-engine}
OUTDIR=${OUT:-$WORK/out}
full=1; compile=1; only_bench=0
for a in "$@"; do
  case $a in --no-full) full=0 ;; --no-compile) compile=0 ;; --only-bench) only_bench=1 ;; *) echo "unknown $a"; exit 2 ;; esac
done
mkdir -p "$WORK" "$OUTDIR"
PY=${MOTIONRT_PYTHON:-python3}
# Python packages the GPU machine lacks (diffusers and its needs), carried as wheels in .whl/
# (download them with the device README's `pip download` line: diffusers==0.42.1,
# importlib_metadata, lazy-importer)
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/motionrt-site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/motionrt-site${PYTHONPATH:+:$PYTHONPATH}
fi
NV=$($PY -c "import nvidia; print(nvidia.__path__[0])")
export LD_LIBRARY_PATH="$(ls -d "$NV"/*/lib | tr '\n' ':')${LD_LIBRARY_PATH:-}"
export ORT_DYLIB_PATH=${ORT_DYLIB_PATH:-$($PY -c "import onnxruntime, os, glob; print(sorted(glob.glob(os.path.join(os.path.dirname(onnxruntime.__file__), 'capi', 'libonnxruntime.so*')))[-1])")}
export MOTIONRT_PYTHON=$PY
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
rc=0
tiny=${TINY:-$WORK/tiny}
if [ ! -d "$tiny" ]; then
  "$BIN/motionrt" export --unet tests/fixtures/unet/sd_tiny --motion-module tests/fixtures/unet/adapter_v2 \
    --vae tests/fixtures/pipeline/tiny --text-encoder tests/fixtures/pipeline/tiny \
    --tokenizer tests/fixtures/pipeline/tiny --semantics diffusers --out "$tiny" >/dev/null || exit 1
fi
if [ "$only_bench" = 0 ]; then
echo "== 1. tiny pipeline: engine vs ONNX Runtime CPU fp32"
"$BIN/examples/engine_gpu" check --model "$tiny" 2>&1 | tee "$OUTDIR/check_tiny.md" || rc=1
echo "== 1b. motionrt build + run --engine vs run on ONNX Runtime (CPU): PSNR of the frames"
rm -rf "$WORK/tiny.engine" "$WORK/tiny2.engine" "$WORK/tc.json" "$WORK/f_cpu" "$WORK/f_gpu"; mkdir -p "$WORK/f_cpu" "$WORK/f_gpu"
shape="--min-shape 1x2x32x32 --opt-shape 1x4x64x64 --max-shape 1x16x128x128 --vae-chunk 4"
"$BIN/motionrt" build --model "$tiny" --out "$WORK/tiny.engine" $shape --timing-cache "$WORK/tc.json" || rc=1
"$BIN/motionrt" build --model "$tiny" --out "$WORK/tiny2.engine" $shape --timing-cache "$WORK/tc.json" || rc=1
if (cd "$WORK/tiny.engine" && find . -type f | sort | xargs sha256sum) > "$OUTDIR/tiny1.sha" &&
   (cd "$WORK/tiny2.engine" && find . -type f | sort | xargs sha256sum) > "$OUTDIR/tiny2.sha" &&
   cmp -s "$OUTDIR/tiny1.sha" "$OUTDIR/tiny2.sha"; then echo "rebuild with the timing cache: identical engine"; else echo "rebuild: engines DIFFER"; rc=1; fi
run="--prompt a_cat_walking --frames 4 --height 64 --width 64 --steps 6 --decode-chunk 4 --seed 3"
"$BIN/motionrt" run --model "$tiny" $run --out "$WORK/f_cpu" --json > "$OUTDIR/run_cpu.json" || rc=1
"$BIN/motionrt" run --engine "$WORK/tiny.engine" $run --out "$WORK/f_gpu" --json > "$OUTDIR/run_gpu.json" || rc=1
$PY bench/gpu/psnr.py "$WORK/f_cpu" "$WORK/f_gpu" --min 35 | tee "$OUTDIR/psnr_tiny.json" || rc=1
echo "== 1c. streamed decode: 7 frames, 3 per VAE call, the last call padded (two output slots, copy stream overlapping the next chunk)"
rm -rf "$WORK/s_cpu" "$WORK/s_gpu"; mkdir -p "$WORK/s_cpu" "$WORK/s_gpu"
run="--prompt a_cat_walking --frames 7 --height 64 --width 64 --steps 4 --decode-chunk 3 --seed 5"
"$BIN/motionrt" run --model "$tiny" $run --out "$WORK/s_cpu" --json > "$OUTDIR/run_cpu_stream.json" || rc=1
"$BIN/motionrt" run --engine "$WORK/tiny.engine" $run --out "$WORK/s_gpu" --json > "$OUTDIR/run_gpu_stream.json" || rc=1
$PY bench/gpu/psnr.py "$WORK/s_cpu" "$WORK/s_gpu" --min 35 | tee "$OUTDIR/psnr_tiny_stream.json" || rc=1
[ "$full" = 1 ] || exit $rc
fi
if [ ! -f "$WORK/exp/vae_decoder.onnx" ]; then
  t0=$(date +%s)
  paths=$("$BIN/examples/synth_sd15" "$WORK/sd" --components) || exit 1
  unet=$(echo "$paths" | sed -n 1p); mm=$(echo "$paths" | sed -n 2p)
  "$BIN/motionrt" export --unet "$unet" --motion-module "$mm" --semantics diffusers --out "$WORK/exp" >/dev/null || exit 1
  echo "synth + export: $(( $(date +%s) - t0 )) s"
fi
if [ "$only_bench" = 0 ]; then
echo "== 2. full SD1.5 + v2 UNet (2 frames, 16x16) vs ONNX Runtime CPU fp32"
"$BIN/examples/engine_gpu" check --model "$WORK/exp" --graphs unet --batch 1 --frames 2 --height 16 --width 16 2>&1 | tee "$OUTDIR/check_full.md" || rc=1
echo "== 2a. full SD1.5 VAE decoder at 512x512 (64x64 latent) vs ONNX Runtime CPU fp32"
"$BIN/examples/engine_gpu" check --model "$WORK/exp" --graphs vae_decoder --batch 1 --height 64 --width 64 2>&1 | tee "$OUTDIR/check_vae.md" || rc=1
echo "== 2b. motionrt build of the full UNet (twice, with the timing cache)"
rm -rf "$WORK/full.engine" "$WORK/full2.engine" "$WORK/tcf.json"
/usr/bin/time -f "build: %e s" "$BIN/motionrt" build --model "$WORK/exp" --out "$WORK/full.engine" --timing-cache "$WORK/tcf.json" 2>&1 | tail -4 || rc=1
/usr/bin/time -f "rebuild: %e s" "$BIN/motionrt" build --model "$WORK/exp" --out "$WORK/full2.engine" --timing-cache "$WORK/tcf.json" 2>&1 | tail -2 || rc=1
if cmp -s "$WORK/full.engine/engine.json" "$WORK/full2.engine/engine.json" && cmp -s "$WORK/full.engine/weights.safetensors" "$WORK/full2.engine/weights.safetensors" && cmp -s "$WORK/full.engine/unet.onnx" "$WORK/full2.engine/unet.onnx"; then echo "full rebuild: identical engine"; else echo "full rebuild: engines DIFFER"; rc=1; fi
du -sh "$WORK/full.engine"
rm -rf "$WORK/full2.engine"
echo "== 2c. the whole pipeline on the full engine: 16 frames 512x512, 8 DDIM steps, CFG, streamed decode"
"$BIN/motionrt" run --engine "$WORK/full.engine" --prompt "a_red_fox_running" --frames 16 --height 512 --width 512 \
  --steps 8 --seed 1 --out "$WORK/full.gif" --json > "$OUTDIR/run_full_engine.json" || rc=1
cat "$OUTDIR/run_full_engine.json"
fi
echo "== 3. UNet step, 16 frames 512x512, batch 2: channels-last and NCHW engines, then PyTorch"
"$BIN/examples/engine_gpu" bench --model "$WORK/exp" --layout nhwc,nchw --json "$OUTDIR/engine_bench.json" 2>&1 | tee "$OUTDIR/engine_bench.log" || rc=1
if [ "$compile" = 1 ]; then c=; else c=--no-compile; fi
$PY bench/gpu/unet_step_torch.py --model "$WORK/exp" --profile $c 2>&1 | grep -v Warning | tee "$OUTDIR/torch_bench.log" || rc=1
exit $rc
