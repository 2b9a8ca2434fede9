#!/usr/bin/env bash
# The demo's experiment with one (arm, repeat) chain at a time vs two, with and without the runner's cap on
# torch's CPU threads (BENCHMARKS.md, "Parallel runs"). Each run gets its own copy of a prepared demo work dir
# (nnUNet_raw, nnUNet_preprocessed, logs), so phantom and preprocessing are not timed; the three runs go back to
# back, so compare them with each other, not with another day's numbers.
#
#   make demo                                          # once, to prepare demo_output (or any --work-dir)
#   benchmarks/bench_demo_jobs.sh demo_output /tmp/bench_demo_jobs
#   benchmarks/bench_demo_jobs.sh demo_output /tmp/quick --repeats 1 --budget epochs=1   # extra demo arguments
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 DEMO_WORK_DIR [OUT_DIR [promptlesion_demo arguments]]" >&2; exit 2; }
work=$(realpath "$1")
out=$(realpath -m "${2:-bench_demo_jobs}")
shift $(( $# >= 2 ? 2 : 1 ))
demo=$(realpath "$(dirname "$0")/../.venv/bin/promptlesion_demo")
ds=$(basename "$(ls -d "$work"/nnUNet_raw/Dataset*_* | head -1)")
did=$((10#$(echo "$ds" | sed -E 's/^Dataset([0-9]+)_.*/\1/')))
extra=("$@")
mkdir -p "$out"
export OMP_WAIT_POLICY=PASSIVE

run() {   # name, jobs, PROMPTLESION_TORCH_THREADS ("" = the runner's own choice)
  local d="$out/$1"
  rm -rf "$d" && mkdir -p "$d"
  cp -r "$work/nnUNet_raw" "$work/nnUNet_preprocessed" "$work/logs" "$d/"
  ( [ -n "$3" ] && export PROMPTLESION_TORCH_THREADS="$3"
    /usr/bin/time -f "$1: wall %e s, user %U s, sys %S s" -o "$out/$1.time" \
      "$demo" --work-dir "$d" --dataset-id "$did" --jobs "$2" "${extra[@]}" > "$out/$1.log" 2>&1 )
  cat "$out/$1.time"
}
run jobs1 1 ""
run jobs2_all_threads 2 "$(nproc)"   # what nnU-Net itself would do: every command gets every core
run jobs2_capped 2 ""                # the runner's cap: cores // jobs
