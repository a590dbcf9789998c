#!/usr/bin/env bash
# Drafting on third-party code (issue: lookup, hybrid, adaptive k): every drafter of ours at k = 2, 4, 8, side by
# side with onnxruntime-genai's speculative decoding on the same graphs and transformers' prompt lookup, greedy,
# interleaved prompt by prompt, on the workloads made by benchmarks/make_workloads.py (never trained on).
# Writes benchmarks/results/drafting-<workload>-<machine>-run<N>.json and .png.
# Usage: bash benchmarks/run_drafting.sh [run number] [max-new-tokens] [workloads...]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
run=${1:-1}; n=${2:-64}; shift $(( $# < 2 ? $# : 2 ))
tag=$(uname -m)-$(nproc)core
mkdir -p benchmarks/results
$BIN/spec-export demo --max-new-tokens 8 >/dev/null        # exports the demo bundle into .specedge-demo/ if needed
for w in "${@:-completion editing nopay}"; do
  for workload in $w; do
    $BIN/spec-export bench .specedge-demo/bundle --prompts "benchmarks/$workload.jsonl" --max-new-tokens "$n" \
        --k 2,4,8 --baselines plain,model,lookup,hybrid,adaptive,ort-genai,hf-lookup \
        --json "benchmarks/results/drafting-$workload-$tag-run$run.json" \
        --plot "benchmarks/results/drafting-$workload-$tag-run$run.png"
  done
done
