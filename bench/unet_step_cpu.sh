#!/usr/bin/env bash
# One UNet step on the CPU: motionrt (exported ONNX on ONNX Runtime) vs diffusers (UNetMotionModel
# on PyTorch), same weights, same inputs, same thread count. The two sides run one after another in
# separate processes, each under /usr/bin/time -v for its peak RSS; the outputs are compared
# (max |motionrt - diffusers| / max |diffusers| <= 1e-3). Prints a Markdown block for BENCHMARKS.md.
#
#   bench/unet_step_cpu.sh [--tiny] [--batch B] [--frames F] [--height H] [--width W]
#                          [--threads N] [--warmup K] [--repeats R] [--seed S] [--no-build]
#                          [--winograd] [--fused-attention] WORKDIR
#
# Full size (default): a random-weight SD1.5 UNet + AnimateDiff v2 motion module (written into
# WORKDIR/sd15 by `cargo run --release --example synth_sd15`, ~5 GB, once), B=2 (classifier-free
# guidance), F=8, latent 16x16 (128x128 px), threads = nproc, warmup 1, repeats 3.
# --tiny: the test fixtures tests/fixtures/unet/sd_tiny + adapter_v2 (seconds; checks the harness).
# --no-build: use the binaries already in target/release instead of running cargo build.
# --winograd, --fused-attention: passed to `motionrt export` (the export goes to its own folder).
# Environment: PYTHON (default /opt/fxenv/bin/python, else python3), ORT_DYLIB_PATH (default: the
# library inside $PYTHON's onnxruntime package).
set -euo pipefail

die() { echo "unet_step_cpu.sh: error: $*" >&2; exit 1; }
usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

cmdline="bench/unet_step_cpu.sh $*"
export_flags=(); tiny=0; build=1; batch=2; frames=8; height=16; width=16; threads=""; warmup=1; repeats=3; seed=0; work=""
need() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"; }
int() { [[ "$2" =~ ^[0-9]+$ ]] || die "$1 expects a non-negative integer, got '$2'"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tiny) tiny=1; shift ;;
    --winograd|--fused-attention) export_flags+=("$1"); shift ;;
    --no-build) build=0; shift ;;
    --batch|--frames|--height|--width|--threads|--warmup|--repeats|--seed)
      need "$@"; int "$1" "$2"
      case "$1" in
        --batch) batch=$2 ;; --frames) frames=$2 ;; --height) height=$2 ;; --width) width=$2 ;;
        --threads) threads=$2 ;; --warmup) warmup=$2 ;; --repeats) repeats=$2 ;; --seed) seed=$2 ;;
      esac
      shift 2 ;;
    -h|--help) usage 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) [[ -z "$work" ]] || die "one WORKDIR only (got '$work' and '$1')"; work=$1; shift ;;
  esac
done
[[ -n "$work" ]] || { echo "unet_step_cpu.sh: error: WORKDIR missing" >&2; usage 2; }
[[ -n "$threads" ]] || threads=$(nproc)
(( repeats >= 1 )) || die "--repeats must be at least 1"
(( batch >= 1 && frames >= 1 && height >= 1 && width >= 1 && threads >= 1 )) || die "sizes and --threads must be >= 1"

root="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$work"; work="$(cd "$work" && pwd)"

PYTHON=${PYTHON:-}
if [[ -z "$PYTHON" ]]; then
  if [[ -x /opt/fxenv/bin/python ]]; then PYTHON=/opt/fxenv/bin/python; else PYTHON=python3; fi
fi
"$PYTHON" -c 'import torch, diffusers, numpy' 2>/dev/null \
  || die "$PYTHON cannot import torch, diffusers and numpy (set PYTHON to an interpreter that can)"
if [[ -z "${ORT_DYLIB_PATH:-}" ]]; then
  capi=$("$PYTHON" -c 'import onnxruntime, os; print(os.path.join(os.path.dirname(onnxruntime.__file__), "capi"))' 2>/dev/null) \
    || die "ORT_DYLIB_PATH is unset and $PYTHON has no onnxruntime package"
  ORT_DYLIB_PATH=$(ls "$capi"/libonnxruntime.so.* 2>/dev/null | sort | tail -n 1) \
    && [[ -n "$ORT_DYLIB_PATH" ]] || die "no libonnxruntime.so.* in $capi"
fi
[[ -f "$ORT_DYLIB_PATH" ]] || die "ORT_DYLIB_PATH=$ORT_DYLIB_PATH does not exist"
export ORT_DYLIB_PATH

bin="$root/target/release/motionrt"
step="$root/target/release/examples/unet_step"
synth="$root/target/release/examples/synth_sd15"
if (( build )); then
  echo "== building release binaries" >&2
  examples=(--example unet_step)
  (( tiny )) || examples+=(--example synth_sd15)
  (cd "$root" && cargo build --release --quiet --bin motionrt "${examples[@]}") \
    || die "cargo build failed (rerun with --no-build to use the binaries already in target/release)"
fi
for b in "$bin" "$step"; do [[ -x "$b" ]] || die "$b missing (build it: cargo build --release --bin motionrt --example unet_step)"; done

suffix=""
for f in ${export_flags[@]+"${export_flags[@]}"}; do suffix+="_${f#--}"; done
if (( tiny )); then
  label="tiny fixtures (tests/fixtures/unet/sd_tiny + adapter_v2)"
  unet="$root/tests/fixtures/unet/sd_tiny"; mm="$root/tests/fixtures/unet/adapter_v2"
  out="$work/tiny_onnx$suffix"
else
  label="SD1.5 UNet + AnimateDiff v2 motion module, random fp32 weights (examples/synth_sd15.rs)"
  paths="$work/sd15.paths"
  if [[ ! -s "$paths" ]]; then
    [[ -x "$synth" ]] || die "$synth missing (cargo build --release --example synth_sd15)"
    echo "== generating the full-size model in $work/sd15 (~5 GB, about a minute)" >&2
    rm -rf "$work/sd15"
    "$synth" "$work/sd15" > "$paths.tmp" || die "synth_sd15 failed"
    mv "$paths.tmp" "$paths"
  fi
  unet=$(sed -n 1p "$paths"); mm=$(sed -n 2p "$paths")
  [[ -d "$unet" && -e "$mm" ]] || die "$paths names missing files ($unet, $mm); delete it to regenerate"
  out="$work/sd15_onnx$suffix"
fi

if [[ -s "$out/model.json" && -s "$out/unet.onnx" ]] \
   && "$PYTHON" -c 'import json,sys; m=json.load(open(sys.argv[1])); sys.exit(m.get("semantics")!="diffusers" or bool(m.get("winograd"))!=("--winograd" in sys.argv[2:]) or bool(m.get("fused_attention"))!=("--fused-attention" in sys.argv[2:]))' "$out/model.json" ${export_flags[@]+"${export_flags[@]}"}; then
  echo "== using the existing export in $out" >&2
else
  echo "== exporting to $out" >&2
  rm -rf "$out"
  "$bin" export --unet "$unet" --motion-module "$mm" --out "$out" --semantics diffusers --unet-only ${export_flags[@]+"${export_flags[@]}"} >&2 \
    || die "motionrt export failed"
fi

# run_measured NAME CMD...: runs CMD with stdout to $work/NAME.json, stderr to $work/NAME.log, and
# its peak RSS (KiB) to $work/NAME.rss.
run_measured() {
  local name=$1; shift
  local rc=0
  if [[ -x /usr/bin/time ]]; then
    /usr/bin/time -v -o "$work/$name.time" "$@" > "$work/$name.json" 2> "$work/$name.log" || rc=$?
    if [[ -f "$work/$name.time" ]]; then
      awk -F': ' '/Maximum resident set size/ {print $2}' "$work/$name.time" > "$work/$name.rss"
    fi
  else
    "$PYTHON" - "$work/$name.rss" "$@" > "$work/$name.json" 2> "$work/$name.log" <<'EOF' || rc=$?
import resource, subprocess, sys
rc = subprocess.call(sys.argv[2:])
open(sys.argv[1], "w").write("%d\n" % resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.exit(rc)
EOF
  fi
  if (( rc != 0 )); then
    echo "---- $work/$name.log (last 30 lines)" >&2; tail -n 30 "$work/$name.log" >&2
    die "$name exited with status $rc"
  fi
}

args=(--model "$out" --batch "$batch" --frames "$frames" --height "$height" --width "$width"
      --threads "$threads" --warmup "$warmup" --repeats "$repeats" --seed "$seed" --inputs "$work/inputs.bin")
rm -f "$work"/{motionrt,diffusers}.{json,log,time,rss} "$work"/out_{motionrt,diffusers}.bin*
echo "== motionrt on ONNX Runtime ($threads threads)" >&2
run_measured motionrt "$step" "${args[@]}" --save-output "$work/out_motionrt.bin"
echo "== diffusers on PyTorch ($threads threads)" >&2
run_measured diffusers "$PYTHON" "$root/bench/diffusers_unet_step.py" "${args[@]}" --save-output "$work/out_diffusers.bin"
echo "== comparing outputs" >&2
cmp_rc=0
"$PYTHON" "$root/bench/diffusers_unet_step.py" --compare "$work/out_motionrt.bin" "$work/out_diffusers.bin" \
  > "$work/compare.json" || cmp_rc=$?
[[ -s "$work/compare.json" ]] || die "the output comparison failed"

cpu=$(lscpu 2>/dev/null | awk -F': *' '/^Model name/ {print $2; exit}')
mem=$(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo 2>/dev/null || echo "?")
EXPORT_FLAGS="${export_flags[*]+${export_flags[*]}}" "$PYTHON" - "$work" "$cmdline" "$label" "${cpu:-unknown}" "$(nproc)" "$mem" "$(date -u '+%Y-%m-%d %H:%M UTC')" \
  "$(ort=${ORT_DYLIB_PATH##*/}; echo "${ort#libonnxruntime.so.}")" <<'EOF'
import json, os, sys
work, cmd, label, cpu, ncpu, mem, date, ortv = sys.argv[1:]
rd = lambda n: json.load(open(os.path.join(work, n)))
rt, df, cmp = rd("motionrt.json"), rd("diffusers.json"), rd("compare.json")
def rss(n):
    try:
        return int(open(os.path.join(work, n + ".rss")).read().split()[0]) / 1024
    except (OSError, ValueError, IndexError):
        return float("nan")
rrt, rdf = rss("motionrt"), rss("diffusers")
ts = lambda j: ", ".join("%.3f" % t for t in j["times_s"])
b, c, f, h, w = rt["shape"]
print("```text")
print("UNet step on the CPU: motionrt (ONNX Runtime %s) vs diffusers %s (PyTorch %s)" % (ortv, df["diffusers"], df["torch"]))
print("model:    %s" % label)
print("export:   %s" % (os.environ.get("EXPORT_FLAGS") or "standard ops"))
print("inputs:   sample [%d,%d,%d,%d,%d] (B=%d, %d frames, latent %dx%d = %dx%d px), timestep %g, context [%d,77,%d]"
      % (b, c, f, h, w, b, f, h, w, 8 * h, 8 * w, rt["timestep"], b * f, rt["cross_attention_dim"]))
print("threads:  %d intra-op each (torch interop 1), warmup %d, repeats %d, one process per side, run one after another"
      % (rt["threads"], len(rt["warmup_s"]), len(rt["times_s"])))
print("machine:  %s, %s logical CPUs, %s RAM" % (cpu, ncpu, mem))
print("date:     %s" % date)
print("command:  %s" % cmd)
print()
print("| impl | median s/step | steps (s) | load s | peak RSS MiB |")
print("|---|---|---|---|---|")
print("| motionrt (ORT) | %.3f | %s | %.1f | %.0f |" % (rt["median_s"], ts(rt), rt["load_s"], rrt))
print("| diffusers (torch) | %.3f | %s | %.1f | %.0f |" % (df["median_s"], ts(df), df["load_s"], rdf))
print()
print("speed ratio diffusers/motionrt: %.2fx (>1: motionrt faster)" % (df["median_s"] / rt["median_s"]))
print("peak RSS ratio diffusers/motionrt: %.2fx" % (rdf / rrt if rrt else float("nan")))
print("agreement: max|motionrt - diffusers| = %.3g, max|diffusers| = %.3g, relative %.2e (tol %.0e): %s"
      % (cmp["max_abs_diff"], cmp["max_abs_ref"], cmp["rel_err"], cmp["tol"], "OK" if cmp["ok"] else "FAIL"))
print("```")
EOF
echo "(raw results: $work/{motionrt,diffusers,compare}.json, logs: $work/*.log)" >&2
(( cmp_rc == 0 )) || die "outputs disagree beyond tolerance (see $work/compare.json)"
