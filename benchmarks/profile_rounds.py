"""Where a round's time goes, per drafter: draft ms, verify ms, the rest (Python between onnxruntime calls), α, τ.

    python benchmarks/profile_rounds.py [--bundle .specedge-demo/bundle] [--workload completion] [--k 4] [--tag NAME]

Greedy, each prompt cold (no prefix reuse), 64 new tokens; prints a table and writes
benchmarks/results/profile-<workload>-<machine>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

from specedge.runtime import Engine, GenerationConfig

HERE = Path(__file__).parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", type=Path, default=Path(".specedge-demo/bundle"))
    ap.add_argument("--workload", default="completion")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--tag", default="", help="added to the result's file name (another bundle than the demo's)")
    a = ap.parse_args()
    engine = Engine(a.bundle)
    prompts = [json.loads(line)["prompt"] for line in (HERE / f"{a.workload}.jsonl").read_text().splitlines()]
    configs = {"plain": dict(speculative=False), "model": dict(drafter="model", adaptive=False),
               "lookup": dict(drafter="lookup", adaptive=False), "hybrid": dict(drafter="hybrid", adaptive=False),
               "adaptive-hybrid": dict(drafter="hybrid", adaptive=True)}
    for opts in configs.values():                                        # warm-up
        engine.generate(prompts[0], GenerationConfig(max_new_tokens=8, k=a.k, **opts))
    rows = {}
    for name, opts in configs.items():
        tot = dict(rounds=0, tokens=0, draft_ms=0.0, verify_ms=0.0, decode_ms=0.0, accepted=0, tested=0)
        for p in prompts:
            engine.forget()
            s = engine.generate(p, GenerationConfig(max_new_tokens=a.max_new_tokens, k=a.k, **opts)).stats
            tot["rounds"] += s.rounds
            tot["tokens"] += s.new_tokens
            tot["draft_ms"] += s.draft_ms
            tot["verify_ms"] += s.target_ms
            tot["decode_ms"] += s.decode_ms
            tot["accepted"] += s.accepted
            tot["tested"] += s.tested
        r = tot["rounds"]
        rows[name] = {"draft_ms_per_round": tot["draft_ms"] / r, "verify_ms_per_round": tot["verify_ms"] / r,
                      "other_ms_per_round": (tot["decode_ms"] - tot["draft_ms"] - tot["verify_ms"]) / r,
                      "tau": tot["tokens"] / r, "alpha": tot["accepted"] / tot["tested"] if tot["tested"] else None,
                      "tokens_per_s": 1e3 * tot["tokens"] / tot["decode_ms"]}
    print(f"{'config':16} {'draft ms':>9} {'verify ms':>9} {'other ms':>9} {'tau':>5} {'alpha':>6} {'tok/s':>7}")
    for name, x in rows.items():
        alpha = f"{x['alpha']:.2f}" if x["alpha"] is not None else "-"
        print(f"{name:16} {x['draft_ms_per_round']:9.2f} {x['verify_ms_per_round']:9.2f} {x['other_ms_per_round']:9.2f}"
              f" {x['tau']:5.2f} {alpha:>6} {x['tokens_per_s']:7.1f}")
    tag = f"{a.tag}-" if a.tag else ""
    out = HERE / "results" / f"profile-{tag}{a.workload}-{platform.machine()}-{os.cpu_count()}core.json"
    out.write_text(json.dumps({"bundle": str(a.bundle), "workload": a.workload, "k": a.k,
                               "max_new_tokens": a.max_new_tokens, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
