#!/usr/bin/env bash
# The demo pair's benchmark on this machine: plain vs speculative (k = 2, 4, 6) vs onnxruntime-genai's speculative
# decoding on the same graphs vs transformers assisted generation, greedy, on held-out standard-library prompts.
# Writes benchmarks/results/demo-<machine>.json and .png. Usage: bash benchmarks/run_demo.sh [max-new-tokens]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
tag=$(uname -m)-$(nproc)core
mkdir -p benchmarks/results
$BIN/spec-export demo --max-new-tokens 8 >/dev/null        # exports the demo bundle into .specedge-demo/ if needed
$BIN/spec-export bench .specedge-demo/bundle --prompts benchmarks/heldout.jsonl --max-new-tokens "${1:-96}" \
    --k 2,4,6 --baselines plain,model,ort-genai,ort-genai-plain,hf,hf-plain \
    --json "benchmarks/results/demo-$tag.json" --plot "benchmarks/results/demo-$tag.png"
