#!/usr/bin/env bash
# Issue 21's check that the seams redesign slowed nothing: the demo pair's bench (plain, model, lookup, hybrid,
# adaptive at k = 4) on the main this work started from (OLD, a worktree) and on this tree, on ONE bundle exported by
# the old code (fp32 target, so both read the same graphs), alternating old/new per workload, in the given run order.
# Usage: bash benchmarks/seams_before_after.sh OLD_WORKTREE BUNDLE RUN   (run 1: old first; run 2: new first)
set -euo pipefail
cd "$(dirname "$0")/.."
old=$1; bundle=$2; run=$3; py=${PY:-.venv/bin/python}; out=benchmarks/results/seams
mkdir -p "$old/.pyroot/specedge" "$out"
for d in runtime export tools models; do ln -sfn "$(cd "$old" && pwd)/$d" "$old/.pyroot/specedge/$d"; done
bench() {  # side workload
  local side=$1 w=$2 names=plain,model,lookup,hybrid,adaptive pp=$PWD
  [ "$side" = old ] && { names=plain,spec,lookup,hybrid,adaptive; pp=$(cd "$old" && pwd)/.pyroot; }
  PYTHONPATH=$pp $py -c "from specedge.tools.cli import main; main()" bench "$bundle" \
    --prompts "benchmarks/$w.jsonl" --max-new-tokens 64 --k 4 --baselines $names \
    --json "$out/$w-$side-run$run.json" > "$out/$w-$side-run$run.txt"
}
order="old new"; [ "$run" = 2 ] && order="new old"
for w in completion editing; do for side in $order; do echo "$w $side"; bench "$side" "$w"; done; done
