#!/usr/bin/env bash
# The native CUDA engine's GPU checks and benchmark (issue 6), on a machine with an NVIDIA GPU and
# PyTorch's CUDA wheels (cuBLAS, cuDNN, NVRTC come from its `nvidia` packages; ONNX Runtime from
# the `onnxruntime` wheel). Build first, on any machine:
#
#   cargo build --release --bin motionrt --example engine_gpu --example synth_sd15
#
# then:  BIN=target/release bench/gpu/engine.sh [--stages S1,S2,..] [--layouts nhwc,nchw] [--no-ab]
#
# Stages, run in the order given (default: bench,tiny,torch,build,pipeline,full-psnr,full-check), each under its own
# time limit (STAGE_TIMEOUT seconds if set, else 300, torch 420, full-check 480; a stage that runs
# out is reported and the next one starts), all within DEADLINE_S seconds of the start (default
# 570, under the device's 10 minutes a call): a stage's limit is cut to what is left, and a stage
# with under 30 s left is skipped, so results of finished stages are always packed. The last
# lines printed are a summary (bench/gpu/summary.py). Times in brackets are estimates for an H100
# machine with 16 cores.
#   tiny        [1-1.5 min] the tests' tiny AnimateDiff pipeline, exported here: every graph,
#               float32 and float16, both layouts, eager and CUDA-graph replay, vs ONNX Runtime
#               CPU float32 (engine_gpu check); `motionrt build` twice with a timing cache
#               (identical engines); `motionrt run --engine` vs `run` on ONNX Runtime: frames'
#               PSNR >= 35 dB, also with a streamed decode whose last chunk is padded, and
#               once with LD_LIBRARY_PATH as the machine set it, without the wheels' folders
#               (cuBLAS/cuDNN then found by the probe's search of the Python packages)
#   bench       [1.5-3 min] the full SD1.5 + AnimateDiff v2 UNet (random weights: synth_sd15
#               --components, exported here once, ~1 min) at 16 frames 512x512, batch 2 (CFG):
#               engine float16 per-step latency (CUDA graph and eager, per-step profile),
#               build/load time, device memory; with A/B loads (float16 specialisation, timed
#               GEMM algorithms, motionrt's tactic kernels) unless --no-ab; --layouts picks the
#               layouts (default nhwc); if the benchmark ends in an error (an error message, a
#               crash, or BENCH_S seconds passed: default 200, 280 with A/Bs) it is run again without
#               motionrt's tactic kernels (--no-kernel-tactics), and if that fails too in NCHW
#   torch       [3-4 min] diffusers' UNetMotionModel fp16 (SDPA), eager, same shape, same GPU,
#               with its kernel-family profile, then torch.compile of it (~2.5 min to compile on
#               an H100; the eager figures are printed first) (bench/gpu/unet_step_torch.py;
#               needs diffusers: carried wheels in .whl/ are installed first)
#   full-small  [~1 min] the full UNet's float16 program in the benchmark's layout at 2 frames
#               16x16 vs ONNX Runtime CPU float32 (the first part of full-check, for the first
#               call)
#   full-check  [3-5 min] the full UNet vs ONNX Runtime CPU float32: at 2 frames 16x16 (both
#               layouts, float32 and float16) and at the benchmark's shape (channels-last
#               float16); the CLIP text encoder; the VAE decoder at 512x512
#   build       [2-3 min] `motionrt build` of the full engine (build time; FULL_REBUILD=1 builds
#               twice and compares), then the whole pipeline from it: 16 frames 512x512, 8 DDIM
#               steps, CFG, decoded 4 frames per VAE call (load time in its JSON); the engine
#               is kept for the stages after
#   pipeline    [~1 min] `motionrt bench --engine` at the same settings: per-stage latency of the
#               pipeline, the programs' preparation time, device memory (builds the engine if
#               build did not)
#   full-psnr   [1.5-3 min] the whole full-architecture pipeline at the engine's smallest profile
#               shape (8 frames 256x256, 2 DDIM steps, CFG) on the engine and on ONNX Runtime
#               (CPU, float32): frames' PSNR >= 35 dB (builds the engine if build did not)
# A program that misses its tolerance is compared again step by step with the CPU interpretation
# of the same program (engine_gpu check does it, up to the full UNet at 2 frames 16x16), and a
# check or bench that ends in an error is rerun so (engine_gpu localize): the summary names the
# step that faulted or first departed from the reference (localize_*.md, check_*.md). A
# `motionrt build` that fails is repeated with --no-kernel-tactics (cuDNN and cuBLASLt only), so
# the stages that use its engine still run (the stage is reported as failed).
# Suggested device calls (15 min of device time in all, starts included; at most 10 min a call;
# a machine stays warm only 30 s after a call and none starts with under 4 min left, so the first
# call carries what matters most; torch last, as its torch.compile figure may run out of time
# after the eager one is printed):
#   DEADLINE_S=540 ... --stages bench,tiny,full-small,torch --no-ab       (timeout_s 600)
#   then, if a machine is still to be had:  --stages build,pipeline,full-psnr,full-check
#                              (DEADLINE_S = that time - 60)
# DEADLINE_S counts from this script's start: keep it under the limit the device really gives
# the call (its reply's limit_s can be less than timeout_s when little device time is left; a
# cold start takes minutes of it), or the device ends the call before the summary is printed
# and the stage then running is lost (finished stages are packed as they end).
#
# Output: everything printed goes to $OUT/engine.log too; the result files (Markdown tables,
# JSON) to $WORK/out, packed into $OUT/results.tgz after each stage, and the two benchmark JSON
# files copied to $OUT.
set -uo pipefail
cd "$(dirname "$0")/../.."
export BIN=${BIN:-target/release}
export WORK=${WORK:-/tmp/motionrt-engine}
export RES=$WORK/out
OUTX=${OUT:-}
stages=bench,tiny,torch,build,pipeline,full-psnr,full-check
export LAYOUTS=nhwc AB=
while [ $# -gt 0 ]; do
  case $1 in
    --stages|--layouts) [ $# -ge 2 ] || { echo "$1 needs a value"; exit 2; } ;;&
    --stages) stages=$2; shift ;;
    --layouts) LAYOUTS=$2; shift ;;
    --no-ab) AB=--no-ab ;;
    *) echo "unknown argument $1"; exit 2 ;;
  esac
  shift
done
mkdir -p "$WORK" "$RES"
: > "$RES/stages.txt"
export T0=$(date +%s)
stamp() { echo "== [$(date +%T) +$(( $(date +%s) - T0 ))s] $*"; }
export -f stamp

main() {
export PY=${MOTIONRT_PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# Python packages the GPU machine lacks (diffusers and its needs), carried as wheels in .whl/
# (`pip download --no-deps -d .whl diffusers==0.42.1`, pure Python; the GPU machine has what it
# requires: huggingface-hub, safetensors, regex, ...)
if ls .whl/*.whl >/dev/null 2>&1; then
  # a failed install drops the torch stage (preflight below), not the call
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/motionrt-site .whl/*.whl || echo "preflight: installing the carried wheels in .whl/ failed"
  export PYTHONPATH=/tmp/motionrt-site${PYTHONPATH:+:$PYTHONPATH}
fi
NV=$($PY -c "import nvidia; print(nvidia.__path__[0])") || { echo "preflight: no nvidia Python package"; exit 2; }
# the machine's own library path (the driver's libcuda may be on it), kept for the stage that
# runs without the wheels' libraries
export LD0=${LD_LIBRARY_PATH:-}
NVLIB=$(ls -d "$NV"/*/lib | paste -sd: -)
export LD_LIBRARY_PATH="$NVLIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export ORT_DYLIB_PATH=${ORT_DYLIB_PATH:-$($PY -c "import onnxruntime, os, glob; print(sorted(glob.glob(os.path.join(os.path.dirname(onnxruntime.__file__), 'capi', 'libonnxruntime.so*')))[-1])")}
export MOTIONRT_PYTHON=$PY

# preflight: what every stage needs, before minutes of work
for b in "$BIN/motionrt" "$BIN/examples/engine_gpu" "$BIN/examples/synth_sd15"; do
  [ -x "$b" ] || { echo "preflight: $b is missing (build it first)"; exit 2; }
done
$PY -c "import numpy, PIL, onnxruntime" || { echo "preflight: numpy, Pillow and onnxruntime are needed"; exit 2; }
# without diffusers the torch stage is dropped, not the call: the engine's stages still run
case ",$stages," in *,torch,*)
  if ! $PY -c "import torch, diffusers; assert torch.cuda.is_available()"; then
    echo "preflight: the torch stage needs diffusers (carry .whl/) and a CUDA PyTorch: SKIPPED"
    stages=$(echo ",$stages," | sed 's/,torch,/,/; s/^,//; s/,$//')
    TORCH_SKIPPED=1
    echo "torch skipped 0 0" >> "$RES/stages.txt"
  fi ;;
esac
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv,noheader || true
df -h "$WORK" | tail -1
"$BIN/motionrt" probe 2>&1 | tail -12

# the full SD1.5 + v2 set (random weights), exported once per machine
full_export() {
  [ -f "$WORK/exp/vae_decoder.onnx" ] && return 0
  local t0=$SECONDS paths unet mm
  rm -rf "$WORK/sd" "$WORK/exp"
  paths=$("$BIN/examples/synth_sd15" "$WORK/sd" --components) || return 1
  unet=$(echo "$paths" | sed -n 1p); mm=$(echo "$paths" | sed -n 2p)
  "$BIN/motionrt" export --unet "$unet" --motion-module "$mm" --semantics diffusers --out "$WORK/exp" >/dev/null || return 1
  echo "synth + export: $((SECONDS - t0)) s"
}
export -f full_export

# After a check or bench that ended in an error (a CUDA fault leaves its context unusable, so
# nothing after it ran): the same programs again, one step at a time with a synchronisation after
# each, against the CPU interpretation of each program (engine_gpu localize): the step that
# faults, or the first that departs from the reference.
# Each run under its own limit (LOCALIZE_S, default 150 s), reports printed per program as they
# finish. Arguments: the log, the failed command's exit status, a name, engine_gpu's options.
# Whether a command whose output is in the log and whose exit status is given ended in an error:
# an error or a panic (exit 1 with "error:", 101), a time limit (124) or a signal (> 128: a
# crash); not a FAIL row (exit 1 alone).
ended_in_error() {
  grep -q -e '^error:' -e 'panicked at' "$1" || [ "$2" -gt 1 ]
}
export -f ended_in_error

localize_after_error() {
  local log=$1 status=$2 name=$3; shift 3
  ended_in_error "$log" "$status" || return 0
  stamp "localize $name one step at a time (after exit $status: $(grep -m1 -e '^error:' -e 'panicked at' "$log" | cut -c1-200))"
  # --foreground: in the stage's process group, so the stage's own limit ends it too
  timeout --foreground -k 5 "${LOCALIZE_S:-150}" "$BIN/examples/engine_gpu" localize "$@" 2>&1 | tee "$RES/localize_$name.md"
}
export -f localize_after_error

stage_tiny() {
  local rc=0 tiny=$WORK/tiny
  if [ ! -d "$tiny" ]; then
    "$BIN/motionrt" export --unet tests/fixtures/unet/sd_tiny --motion-module tests/fixtures/unet/adapter_v2 \
      --vae tests/fixtures/pipeline/tiny --text-encoder tests/fixtures/pipeline/tiny \
      --tokenizer tests/fixtures/pipeline/tiny --semantics diffusers --out "$tiny" >/dev/null || return 1
  fi
  stamp "tiny: every graph vs ONNX Runtime CPU fp32"
  "$BIN/examples/engine_gpu" check --model "$tiny" 2>&1 | tee "$RES/check_tiny.md"
  local r=$?; [ $r = 0 ] || rc=1
  localize_after_error "$RES/check_tiny.md" $r tiny --model "$tiny"
  stamp "tiny: motionrt build twice with the timing cache"
  rm -rf "$WORK/tiny.engine" "$WORK/tiny2.engine" "$WORK/tc.json" "$WORK/f_cpu" "$WORK/f_gpu" "$WORK/s_cpu" "$WORK/s_gpu"
  mkdir -p "$WORK/f_cpu" "$WORK/f_gpu" "$WORK/s_cpu" "$WORK/s_gpu"
  local shape="--min-shape 1x2x32x32 --opt-shape 1x4x64x64 --max-shape 1x16x128x128 --vae-chunk 4"
  local kt=
  if ! "$BIN/motionrt" build --model "$tiny" --out "$WORK/tiny.engine" $shape --timing-cache "$WORK/tc.json"; then
    # (what follows still runs, on an engine without motionrt's tactic kernels)
    rc=1; kt=--no-kernel-tactics
    stamp "tiny: the build failed; building without motionrt's tactic kernels"
    rm -f "$WORK/tc.json"
    "$BIN/motionrt" build --model "$tiny" --out "$WORK/tiny.engine" $shape --timing-cache "$WORK/tc.json" $kt
  fi
  "$BIN/motionrt" build --model "$tiny" --out "$WORK/tiny2.engine" $shape --timing-cache "$WORK/tc.json" $kt || rc=1
  if (cd "$WORK/tiny.engine" && find . -type f | sort | xargs sha256sum) > "$RES/tiny1.sha" &&
     (cd "$WORK/tiny2.engine" && find . -type f | sort | xargs sha256sum) > "$RES/tiny2.sha" &&
     cmp -s "$RES/tiny1.sha" "$RES/tiny2.sha"; then echo "rebuild with the timing cache: identical engine"; else echo "rebuild: engines DIFFER"; rc=1; fi
  stamp "tiny: run --engine vs run on ONNX Runtime (CPU): PSNR of the frames"
  local run="--prompt a_cat_walking --frames 4 --height 64 --width 64 --steps 6 --decode-chunk 4 --seed 3"
  "$BIN/motionrt" run --model "$tiny" $run --out "$WORK/f_cpu" --json > "$RES/run_cpu.json" || rc=1
  "$BIN/motionrt" run --engine "$WORK/tiny.engine" $run --out "$WORK/f_gpu" --json > "$RES/run_gpu.json" || rc=1
  $PY bench/gpu/psnr.py "$WORK/f_cpu" "$WORK/f_gpu" --min 35 | tee "$RES/psnr_tiny.json" || rc=1
  stamp "tiny: streamed decode, 7 frames, 3 per VAE call, the last call padded (two output slots, copy stream overlapping the next chunk)"
  run="--prompt a_cat_walking --frames 7 --height 64 --width 64 --steps 4 --decode-chunk 3 --seed 5"
  "$BIN/motionrt" run --model "$tiny" $run --out "$WORK/s_cpu" --json > "$RES/run_cpu_stream.json" || rc=1
  rm -f "$WORK/run_tc.json"
  "$BIN/motionrt" run --engine "$WORK/tiny.engine" $run --out "$WORK/s_gpu" --timing-cache "$WORK/run_tc.json" --json > "$RES/run_gpu_stream.json" || rc=1
  # the VAE at 3 frames was not in the engine: its algorithms were timed and kept
  $PY -c "import json, sys; c = json.load(open(sys.argv[1]))['tactics']; print('run timing cache:', len(c['conv']), 'convolutions,', len(c.get('gemm', {})), 'GEMMs')" "$WORK/run_tc.json" || rc=1
  $PY bench/gpu/psnr.py "$WORK/s_cpu" "$WORK/s_gpu" --min 35 | tee "$RES/psnr_tiny_stream.json" || rc=1
  stamp "tiny: run --engine without the wheels' folders on LD_LIBRARY_PATH: cuBLAS, cuBLASLt, cuDNN loaded from where the probe finds them"
  rm -rf "$WORK/p_gpu"; mkdir -p "$WORK/p_gpu"
  env LD_LIBRARY_PATH="$LD0" "$BIN/motionrt" run --engine "$WORK/tiny.engine" $run --out "$WORK/p_gpu" --timing-cache "$WORK/run_tc.json" --json > "$RES/run_gpu_preload.json" || rc=1
  $PY bench/gpu/psnr.py "$WORK/s_cpu" "$WORK/p_gpu" --min 35 | tee "$RES/psnr_tiny_preload.json" || rc=1
  return $rc
}

stage_bench() {
  full_export || return 1
  # each benchmark under its own limit (BENCH_S, default 200 s, 280 with the A/B loads), so that
  # a hang leaves time for the fallbacks below
  local bench_s=${BENCH_S:-$([ -n "$AB" ] && echo 200 || echo 280)}
  local lim="timeout --foreground -k 5 $bench_s"
  stamp "bench: UNet step, 16 frames 512x512, batch 2, float16, layouts $LAYOUTS"
  $lim "$BIN/examples/engine_gpu" bench --model "$WORK/exp" --layout "$LAYOUTS" $AB --json "$RES/engine_bench.json" 2>&1 | tee "$RES/engine_bench.log"
  local r=$? r2=0
  # channels-last and motionrt's tactic kernels have never run on a GPU (NCHW without them did,
  # 2026-11-25): if the benchmark ends in an error (a CUDA fault leaves the process's context
  # unusable), it again without the tactic kernels (cuDNN and cuBLASLt only), then if that too
  # ends in an error in NCHW without them, so the call still brings a timing; then the
  # step-by-step search
  if [ $r != 0 ] && ended_in_error "$RES/engine_bench.log" $r; then
    stamp "bench: ended in an error (exit $r); the same benchmark without motionrt's tactic kernels"
    $lim "$BIN/examples/engine_gpu" bench --model "$WORK/exp" --layout "$LAYOUTS" --no-kernel-tactics $AB \
      --json "$RES/engine_bench_lib.json" 2>&1 | tee "$RES/engine_bench_lib.log"
    r2=$?
    if [ $r2 != 0 ] && [ "$LAYOUTS" != nchw ] && ended_in_error "$RES/engine_bench_lib.log" $r2; then
      stamp "bench: that too ended in an error (exit $r2); the same in NCHW without the tactic kernels"
      $lim "$BIN/examples/engine_gpu" bench --model "$WORK/exp" --layout nchw --no-kernel-tactics $AB \
        --json "$RES/engine_bench_nchw.json" 2>&1 | tee "$RES/engine_bench_nchw.log"
    fi
  fi
  # the full UNet's float16 program at 2 frames 16x16 (its CPU reference takes a minute or two)
  localize_after_error "$RES/engine_bench.log" $r unet_small --model "$WORK/exp" --graphs unet --batch 1 \
    --frames 2 --height 16 --width 16 --layout "$LAYOUTS" --precisions fp16
  # (124 is the stage's own time limit to the loop below: this one was the benchmark's)
  [ $r = 124 ] && { echo "bench: the benchmark ran past $bench_s s"; r=1; }
  return $r
}

stage_torch() {
  full_export || return 1
  stamp "torch: diffusers UNetMotionModel fp16 eager (SDPA), then torch.compile, same shape"
  $PY bench/gpu/unet_step_torch.py --model "$WORK/exp" --profile 2>&1 | grep --line-buffered -v Warning | tee "$RES/torch_bench.log"
}

stage_full_small() {
  full_export || return 1
  stamp "full-small: the benchmark's program (UNet, $LAYOUTS float16) at 2 frames 16x16 vs ONNX Runtime CPU fp32"
  "$BIN/examples/engine_gpu" check --model "$WORK/exp" --graphs unet --batch 1 --frames 2 --height 16 --width 16 \
    --layout "$LAYOUTS" --precisions fp16 2>&1 | tee "$RES/check_full_small.md"
  local r=$?
  localize_after_error "$RES/check_full_small.md" $r unet_small_check --model "$WORK/exp" --graphs unet --batch 1 \
    --frames 2 --height 16 --width 16 --layout "$LAYOUTS" --precisions fp16
  return $r
}

stage_full_check() {
  local rc=0
  full_export || return 1
  stamp "full-check: UNet at 2 frames 16x16, both layouts, fp32 and fp16"
  "$BIN/examples/engine_gpu" check --model "$WORK/exp" --graphs unet --batch 1 --frames 2 --height 16 --width 16 2>&1 | tee "$RES/check_full.md"
  local r_unet=$?; [ $r_unet = 0 ] || rc=1
  stamp "full-check: UNet at 16 frames 512x512, batch 2, channels-last fp16 (the benchmark's configuration)"
  "$BIN/examples/engine_gpu" check --model "$WORK/exp" --graphs unet --batch 2 --frames 16 --height 64 --width 64 --layout nhwc --precisions fp16 2>&1 | tee "$RES/check_full_16f.md" || rc=1
  stamp "full-check: CLIP text encoder, and the VAE decoder at 512x512 (64x64 latent)"
  "$BIN/examples/engine_gpu" check --model "$WORK/exp" --graphs text_encoder --batch 2 2>&1 | tee "$RES/check_text.md"
  local r_text=$?; [ $r_text = 0 ] || rc=1
  "$BIN/examples/engine_gpu" check --model "$WORK/exp" --graphs vae_decoder --batch 1 --height 64 --width 64 2>&1 | tee "$RES/check_vae.md" || rc=1
  # after every check ran: the ones that ended in an error, one step at a time (the channels-last
  # float16 program first, the benchmark's)
  localize_after_error "$RES/check_full.md" $r_unet unet_full --model "$WORK/exp" --graphs unet --batch 1 \
    --frames 2 --height 16 --width 16 --layout nhwc,nchw --precisions fp16,fp32
  localize_after_error "$RES/check_text.md" $r_text text --model "$WORK/exp" --graphs text_encoder --batch 2
  return $rc
}

stage_build() {
  local rc=0 t0
  full_export || return 1
  stamp "build: motionrt build of the full engine"
  rm -rf "$WORK/full.engine" "$WORK/full2.engine" "$WORK/tcf.json"
  t0=$SECONDS
  # the VAE tuned for the run's 4 frames per decode call (the default is 16)
  local kt=
  if ! "$BIN/motionrt" build --model "$WORK/exp" --out "$WORK/full.engine" --vae-chunk 4 --timing-cache "$WORK/tcf.json" 2>&1 | tee "$RES/build_full.log"; then
    # (the stages after still run, on an engine without motionrt's tactic kernels)
    rc=1; kt=--no-kernel-tactics
    echo "failed build: $((SECONDS - t0)) s" | tee -a "$RES/build_full.log"
    stamp "build: failed; building without motionrt's tactic kernels"
    rm -rf "$WORK/tcf.json" "$WORK/full.engine"
    t0=$SECONDS
    "$BIN/motionrt" build --model "$WORK/exp" --out "$WORK/full.engine" --vae-chunk 4 --timing-cache "$WORK/tcf.json" $kt 2>&1 | tee -a "$RES/build_full.log"
  fi
  # (summary.py reads this line: the build that made the engine, labelled when it is the retry)
  echo "build${kt:+ ($kt)}: $((SECONDS - t0)) s" | tee -a "$RES/build_full.log"; du -sh "$WORK/full.engine"
  if [ "${FULL_REBUILD:-0}" = 1 ]; then
    t0=$SECONDS
    "$BIN/motionrt" build --model "$WORK/exp" --out "$WORK/full2.engine" --vae-chunk 4 --timing-cache "$WORK/tcf.json" $kt 2>&1 | tail -2 || rc=1
    echo "rebuild: $((SECONDS - t0)) s"
    if diff <(cd "$WORK/full.engine" && find . -type f | sort | xargs sha256sum) \
            <(cd "$WORK/full2.engine" && find . -type f | sort | xargs sha256sum); then
      echo "full rebuild with the timing cache: identical engine" | tee "$RES/full_rebuild.txt"
    else echo "full rebuild with the timing cache: engines DIFFER" | tee "$RES/full_rebuild.txt"; rc=1; fi
    rm -rf "$WORK/full2.engine"
  fi
  stamp "build: the whole pipeline on the full engine: 16 frames 512x512, 8 DDIM steps, CFG, 4 frames per VAE call"
  "$BIN/motionrt" run --engine "$WORK/full.engine" --prompt "a_red_fox_running" --frames 16 --height 512 --width 512 \
    --steps 8 --seed 1 --decode-chunk 4 --out "$WORK/full.gif" --json > "$RES/run_full_engine.json" || rc=1
  cat "$RES/run_full_engine.json"
  return $rc
}

# the full engine the build stage keeps, built here if it did not run
full_engine() {
  [ -f "$WORK/full.engine/engine.json" ] && return 0
  stamp "no full engine from the build stage: building it"
  rm -rf "$WORK/full.engine"
  "$BIN/motionrt" build --model "$WORK/exp" --out "$WORK/full.engine" --vae-chunk 4 --timing-cache "$WORK/tcf.json" 2>&1 | tail -3 ||
    { stamp "the build failed; building without motionrt's tactic kernels"; rm -f "$WORK/tcf.json"
      "$BIN/motionrt" build --model "$WORK/exp" --out "$WORK/full.engine" --vae-chunk 4 --no-kernel-tactics 2>&1 | tail -3; }
}
export -f full_engine

stage_pipeline() {
  full_export && full_engine || return 1
  stamp "pipeline: motionrt bench --engine, 16 frames 512x512, 8 DDIM steps, CFG, 4 frames per VAE call (programs made and captured first, then 1 warm-up and 2 timed runs)"
  "$BIN/motionrt" bench --engine "$WORK/full.engine" --frames 16 --height 512 --width 512 --steps 8 \
    --decode-chunk 4 --warmup 1 --runs 2 --json "$RES/bench_full_engine.json"
}

stage_full_psnr() {
  local rc=0
  full_export && full_engine || return 1
  # the engine's smallest profile shape, so that ONNX Runtime on the CPU takes a minute or two
  local run="--prompt a_red_fox_running --frames 8 --height 256 --width 256 --steps 2 --seed 2 --decode-chunk 4"
  rm -rf "$WORK/fc_cpu" "$WORK/fc_gpu"; mkdir -p "$WORK/fc_cpu" "$WORK/fc_gpu"
  stamp "full-psnr: the whole SD1.5 + v2 pipeline, 8 frames 256x256, 2 DDIM steps, CFG: run --engine"
  "$BIN/motionrt" run --engine "$WORK/full.engine" $run --out "$WORK/fc_gpu" --json > "$RES/run_full_small_gpu.json" || rc=1
  stamp "full-psnr: the same on ONNX Runtime (CPU, float32)"
  "$BIN/motionrt" run --model "$WORK/exp" $run --out "$WORK/fc_cpu" --json > "$RES/run_full_small_cpu.json" || rc=1
  $PY bench/gpu/psnr.py "$WORK/fc_cpu" "$WORK/fc_gpu" --min 35 | tee "$RES/psnr_full.json" || rc=1
  return $rc
}

export -f stage_tiny stage_bench stage_torch stage_full_small stage_full_check stage_build stage_pipeline stage_full_psnr
rc=${TORCH_SKIPPED:+1}; rc=${rc:-0}
# killed from outside (the device's own limit): the finished stages' results are still packed
pack() {
  if [ -n "$OUTX" ]; then
    tar czf "$OUTX/results.tgz" -C "$RES" . 2>/dev/null
    for j in engine_bench.json engine_bench_lib.json engine_bench_nchw.json torch_bench.log; do [ -f "$RES/$j" ] && cp "$RES/$j" "$OUTX/"; done
  fi
  return 0
}
# (pack first: tee may be gone with the same signal, and a write to it would end this shell)
trap 'pack; stamp "terminated: packed what finished"; exit 143' TERM
for s in ${stages//,/ }; do
  f=stage_${s//-/_}
  if ! declare -F "$f" >/dev/null; then
    echo "unknown stage $s"; rc=2; echo "$s unknown 0 0" >> "$RES/stages.txt"; continue
  fi
  limit=${STAGE_TIMEOUT:-300}
  [ -z "${STAGE_TIMEOUT:-}" ] && [ "$s" = full-check ] && limit=480
  [ -z "${STAGE_TIMEOUT:-}" ] && [ "$s" = torch ] && limit=420
  # the call's deadline, less 20 s to pack the results and print the summary
  left=$(( ${DEADLINE_S:-570} - ($(date +%s) - T0) - 20 ))
  if [ "$left" -lt 30 ]; then
    stamp "stage $s: SKIPPED (${left} s left before the deadline)"; rc=1
    echo "$s skipped 0 0" >> "$RES/stages.txt"; continue
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  stamp "stage $s (limit $limit s)"
  t_stage=$(date +%s)
  timeout -k 10 "$limit" bash -o pipefail -c "$f"
  r=$?
  if [ $r = 124 ]; then echo "stage $s: TIMED OUT after $limit s"; fi
  [ $r = 0 ] || { echo "stage $s: exit $r"; rc=1; }
  # (summary.py prints these: each stage's exit status, limit and time)
  echo "$s $r $limit $(( $(date +%s) - t_stage ))" >> "$RES/stages.txt"
  pack
done
stamp "done (exit $rc)"
$PY bench/gpu/summary.py "$RES" || true
return $rc
}

# everything printed also goes to $OUT/engine.log (the pipeline ends, and tee with it, before exit)
if [ -n "$OUTX" ]; then
  main 2>&1 | tee -a "$OUTX/engine.log"
  exit "${PIPESTATUS[0]}"
fi
main
