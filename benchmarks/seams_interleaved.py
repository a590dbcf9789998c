"""Issue 21's speed check, in one process: the runtime of an older checkout (OLD, e.g. a worktree of 94ea258) and this
tree's, each with its own Engine on ONE bundle, run request by request in alternating order (old first on even
prompts, new first on odd), so that machine load lands on both sides alike. seams_before_after.sh ran the sides as
separate invocations, whose runs differed by up to 40%; here both sides share every minute of the run.

Reports, per workload and configuration, the median decode rate after the first token, (n - 1) / (t_last - t_first),
of each side, new/old, and whether every output of the two sides is the same token list.

    python benchmarks/seams_interleaved.py /work/wt-old .specedge-demo/bundle --runs 2 --json OUT.json
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

CONFIGS = {   # name -> GenerationConfig fields (both sides' GenerationConfig take these)
    "plain": dict(speculative=False),
    "model-k4": dict(drafter="model", k=4, adaptive=False),
    "lookup-k4": dict(drafter="lookup", k=4, adaptive=False),
    "hybrid-k4": dict(drafter="hybrid", k=4, adaptive=False),
    "adaptive-model": dict(drafter="model", k=4, adaptive=True),
    "adaptive-hybrid": dict(drafter="hybrid", k=4, adaptive=True),
}


def runtime_from(root: Path, alias: str):
    """The `runtime` package of a checkout, imported as `alias.runtime` (its modules import each other relatively)."""
    pkg = Path(tempfile.mkdtemp()) / alias
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "runtime").symlink_to(root.resolve() / "runtime")
    sys.path.insert(0, str(pkg.parent))
    return importlib.import_module(f"{alias}.runtime.engine"), importlib.import_module(f"{alias}.runtime.config")


def timed(engine, config_cls, ids, fields, n):
    g = engine.generator(list(ids), config_cls(max_new_tokens=n, **fields))
    stamps, out = [], []
    for t in g:
        stamps.append(time.perf_counter())
        out.append(int(t))
    rate = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
    return rate, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old", type=Path, help="an older checkout (its runtime/ is imported)")
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--workloads", default="completion,editing")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()

    here = Path(__file__).resolve().parents[1]
    sides = {}
    for name, root in (("old", a.old), ("new", here)):
        eng_mod, cfg_mod = runtime_from(root, f"seams_{name}")
        sides[name] = (eng_mod.Engine(a.bundle), cfg_mod.GenerationConfig)
    configs = a.configs.split(",")
    rows, same = [], True
    for run in range(1, a.runs + 1):
        for w in a.workloads.split(","):
            prompts = [json.loads(line)["prompt"] for line in open(here / "benchmarks" / f"{w}.jsonl")]
            for i, p in enumerate(prompts):
                ids = sides["new"][0].tokenizer.encode(p).ids
                for c in configs:
                    order = ("old", "new") if (i + run) % 2 == 0 else ("new", "old")
                    outs = {}
                    for side in order:
                        engine, cfg = sides[side]
                        rate, outs[side] = timed(engine, cfg, ids, CONFIGS[c], a.max_new_tokens)
                        rows.append(dict(run=run, workload=w, prompt=i, config=c, side=side, decode_tps=rate))
                    same &= outs["old"] == outs["new"]
                print(f"run {run} {w} prompt {i + 1}/{len(prompts)}", file=sys.stderr, flush=True)
    summary = {}
    print(f"{'workload':11s} {'config':16s} " + "  ".join(f"run{r} old   new  new/old" for r in range(1, a.runs + 1)))
    for w in a.workloads.split(","):
        for c in configs:
            line, summary[f"{w}/{c}"] = f"{w:11s} {c:16s} ", {}
            for r in range(1, a.runs + 1):
                med = {s: median(x["decode_tps"] for x in rows if (x["run"], x["workload"], x["config"], x["side"])
                                 == (r, w, c, s)) for s in ("old", "new")}
                summary[f"{w}/{c}"][f"run{r}"] = dict(med, ratio=med["new"] / med["old"])
                line += f"  {med['old']:6.1f} {med['new']:6.1f} {med['new'] / med['old']:5.3f}"
            print(line)
    print(f"outputs identical between old and new: {same}")
    if a.json:
        a.json.write_text(json.dumps(dict(old=str(a.old), bundle=str(a.bundle), max_new_tokens=a.max_new_tokens,
                                          identical=same, summary=summary, requests=rows), indent=1))


if __name__ == "__main__":
    main()
