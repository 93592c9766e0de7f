#!/usr/bin/env bash
# Export wall time and peak RSS vs a plain `cp` of the same input files, interleaved
# (cp, export, cp, export, ...) with dirty pages flushed (`sync`) and outputs removed before each
# run, so both start from the same page-cache state. Prints each run and the medians.
#
#   bench/export_vs_cp.sh UNET_DIR MOTION_FILE [RUNS] [extra export flags...]
# Input: e.g. `cargo run --release --example synth_sd15 -- /tmp/sd15` (full SD1.5 + v2, 5.0 GB).
set -euo pipefail
unet="$1"; mm="$2"; runs="${3:-3}"; shift $(( $# < 3 ? $# : 3 ))
bin="$(cd "$(dirname "$0")/.." && pwd)/target/release/motionrt"
work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
files=("$(ls "$unet"/unet/diffusion_pytorch_model*.safetensors 2>/dev/null || ls "$unet"/diffusion_pytorch_model*.safetensors)" "$mm")
cat "${files[@]}" > /dev/null   # warm the page cache once for both
cp_t=(); ex_t=(); ex_rss=()
for i in $(seq "$runs"); do
  rm -rf "$work/cp" "$work/out"; mkdir "$work/cp"; sync
  t=$( { /usr/bin/time -f "%e" cp "${files[@]}" "$work/cp/"; } 2>&1 ); cp_t+=("$t")
  rm -rf "$work/cp"; sync
  r=$( { /usr/bin/time -f "%e %M" "$bin" export --unet "$unet" --motion-module "$mm" --out "$work/out" --json "$@" > /dev/null; } 2>&1 | tail -n 1 )
  ex_t+=("${r% *}"); ex_rss+=("${r#* }")
  rm -rf "$work/out"; sync
  echo "run $i: cp ${t} s, export ${r% *} s, export peak RSS $(( ${r#* } / 1024 )) MiB"
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
mc=$(median "${cp_t[@]}"); me=$(median "${ex_t[@]}"); mr=$(median "${ex_rss[@]}")
in_bytes=$(du -cb "${files[@]}" | tail -n 1 | cut -f1)
echo "median: cp ${mc} s, export ${me} s, ratio $(awk -v a="$me" -v b="$mc" 'BEGIN{printf "%.2f", a/b}')x, export peak RSS $(( mr / 1024 )) MiB, input $(( in_bytes / 1048576 )) MiB"
