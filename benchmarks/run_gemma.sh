#!/usr/bin/env bash
# Gemma 3 270M (issues 15 and 16) on the 2-core CPU: greedy, configurations interleaved prompt by prompt, on the
# third-party workloads of benchmarks/make_workloads.py (8 of 16 prompts each, every other line, to fit the time):
#   editing     copy-and-modify prompts: ours (plain, int4 self-draft, lookup, hybrid, adaptive) beside transformers'
#               greedy and prompt lookup on the same fp32 model
#   completion  continue a file at a random line: ours
#   ttft300     the last 300 Gemma tokens of each completion prompt, 4 new tokens: time to first token
# The bundle is the real demo's (`spec-export demo --model gemma-3-270m` or benchmarks/gemma3_270m.py makes it).
# Writes benchmarks/results/gemma3-270m-<workload>-<machine>-run<N>.json and .png.
# Usage: bash benchmarks/run_gemma.sh [run number] [bundle] [workloads...]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
run=${1:-1}; bundle=${2:-$HOME/.cache/specedge/gemma3-270m/bundle-dv16k}; shift $(( $# < 2 ? $# : 2 ))
tag=$(uname -m)-$(nproc)core
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
awk 'NR % 2 == 1' benchmarks/editing.jsonl > "$work/editing.jsonl"
awk 'NR % 2 == 1' benchmarks/completion.jsonl > "$work/completion.jsonl"
$BIN/python - "$bundle" "$work" <<'EOF'
import json, sys
from pathlib import Path
from tokenizers import Tokenizer
bundle, work = Path(sys.argv[1]), Path(sys.argv[2])
tok = Tokenizer.from_file(str(bundle / "tokenizer.json"))
with open(work / "ttft300.jsonl", "w") as out:
    for line in open(work / "completion.jsonl"):
        ids = tok.encode(json.loads(line)["prompt"], add_special_tokens=False).ids
        if len(ids) >= 300:
            out.write(json.dumps({"prompt": tok.decode(ids[-300:])}) + "\n")
EOF
declare -A args=(
  [editing]="--max-new-tokens 48 --k 4,8 --baselines plain,model,lookup,hybrid,adaptive,hf-plain,hf-lookup"
  [completion]="--max-new-tokens 48 --k 2,4 --baselines plain,model,lookup,hybrid,adaptive"
  [ttft300]="--max-new-tokens 4 --k 4 --baselines plain,model,hybrid"
)
for workload in "${@:-editing completion ttft300}"; do
  for w in $workload; do
    # shellcheck disable=SC2086
    $BIN/spec-export bench "$bundle" --prompts "$work/$w.jsonl" ${args[$w]} \
        --json "benchmarks/results/gemma3-270m-$w-$tag-run$run.json" \
        --plot "benchmarks/results/gemma3-270m-$w-$tag-run$run.png"
  done
done
