"""What prompt lookup would give on each workload, before it is wired into the loop: replay the LookupDrafter on the
target's own greedy continuation (greedy acceptance = the draft equals what the target wrote next).

    python benchmarks/simulate_lookup.py [--bundle .specedge-demo/bundle] [--max-new-tokens 64] [--measure] [--limit N]

Prints, per workload and k: match rate (rounds with a proposal), alpha (accepted / tested, as Stats), acceptance
per drafted token, tau (tokens per target pass). --measure also runs plain, fixed-k model / lookup / hybrid and
adaptive-k drafting through the current loop (interleaved prompt by prompt), reports tokens/s, the speedup over
plain (geometric mean over prompts), alpha and tau, and checks that every output equals plain decoding.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from specedge.runtime import Engine, GenerationConfig
from specedge.runtime.drafter import ModelDrafter
from specedge.runtime.kpolicy import KPolicy
from specedge.runtime.lookup import HybridDrafter, LookupDrafter

HERE = Path(__file__).parent
WORKLOADS = ("completion", "editing", "nopay")
KS = (2, 4, 8)


def replay(prompt: list[int], response: list[int], k: int, max_ngram: int = 3) -> dict:
    d = LookupDrafter(1, max_ngram=max_ngram)
    ctx, rounds, matched, drafted, accepted, tested = list(prompt), 0, 0, 0, 0, 0
    i = 0
    while i < len(response):
        draft = d.propose(ctx, min(k, len(response) - i - 1) or 1).tokens
        draft = draft[: len(response) - i - 1]            # the loop never drafts past the budget
        n = 0
        while n < len(draft) and draft[n] == response[i + n]:
            n += 1
        rounds, matched, drafted, accepted = rounds + 1, matched + (len(draft) > 0), drafted + len(draft), accepted + n
        tested += n + (n < len(draft))
        ctx += response[i : i + n + 1]
        i += n + 1
    return dict(rounds=rounds, matched=matched, drafted=drafted, accepted=accepted, tested=tested,
                tokens=len(response))


def summary(rows: list[dict]) -> dict:
    t = {key: sum(r[key] for r in rows) for key in rows[0]}
    return dict(match_rate=t["matched"] / t["rounds"], alpha=t["accepted"] / max(t["tested"], 1),
                acceptance=t["accepted"] / max(t["drafted"], 1), tau=t["tokens"] / t["rounds"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", default=".specedge-demo/bundle")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--measure", action="store_true")
    ap.add_argument("--limit", type=int, default=None, help="the first N prompts of each workload")
    ap.add_argument("--json", default=str(HERE / "results" / "lookup-sim.json"))
    a = ap.parse_args()
    engine = Engine(a.bundle)
    out: dict = {"bundle": a.bundle, "max_new_tokens": a.max_new_tokens, "workloads": {}}
    for name in WORKLOADS:
        prompts = [json.loads(line)["prompt"] for line in (HERE / f"{name}.jsonl").read_text().splitlines()][: a.limit]
        sims: dict[int, list[dict]] = {k: [] for k in KS}
        timing: dict[str, list[tuple]] = {}
        adaptive: dict[str, KPolicy] = {}
        for text in prompts:
            ids = engine.encode(text)
            plain = engine.generate(ids, max_new_tokens=a.max_new_tokens, speculative=False)
            for k in KS:
                sims[k].append(replay(ids, plain.token_ids, k))
            if a.measure:
                _measure(engine, ids, plain, a.max_new_tokens, timing, adaptive)
        w = out["workloads"][name] = {f"k={k}": summary(rows) for k, rows in sims.items()}
        for k in KS:
            s = w[f"k={k}"]
            print(f"{name:10s} k={k}: match {s['match_rate']:.2f}  alpha {s['alpha']:.2f}  "
                  f"accepted/drafted {s['acceptance']:.2f}  tau {s['tau']:.2f}")
        if timing:
            # speedup: geometric mean over prompts of tokens/s relative to plain on the same prompt
            plain_tps = np.array([t[0] for t in timing["plain"]])
            w["measured"] = m = {}
            for c, v in timing.items():
                tps, alpha, tau = (np.array(x) for x in zip(*v))
                m[c] = dict(tokens_per_s=float(np.median(tps)), speedup=float(np.exp(np.log(tps / plain_tps).mean())),
                            alpha=None if np.isnan(alpha).all() else float(np.nanmean(alpha)), tau=float(tau.mean()))
                shown = "-" if m[c]["alpha"] is None else f"{m[c]['alpha']:.2f}"
                print(f"{name:10s} {c:16s} {m[c]['tokens_per_s']:6.1f} tok/s  {m[c]['speedup']:.2f}x  "
                      f"alpha {shown}  tau {m[c]['tau']:.2f}")
            for c, p in adaptive.items():
                m[f"adaptive {c}"]["policy"] = dict(
                    c={d: p.draft_step_cost(d) for d in ("model", "lookup")},
                    verify_cost={n: p.verify_cost(n) for n in range(1, 10)},
                    acceptance={d: p.acceptance(d, 8) for d in ("model", "lookup")},
                    choice={d: p.choose(d, 8) for d in ("model", "lookup")})
                print(f"{name:10s} adaptive {c}: c {m[f'adaptive {c}']['policy']['c']}, "
                      f"t(5)/t(1) {p.verify_cost(5):.2f}, k now {m[f'adaptive {c}']['policy']['choice']}")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=1) + "\n")


def _measure(engine: Engine, ids: list[int], plain, n: int, timing: dict, adaptive: dict) -> None:
    """Fixed-k model, lookup, hybrid and adaptive drafting through the loop, one after another, each checked against
    plain decoding. The drafters are passed in (custom_drafter); each adaptive configuration keeps its own policy
    across prompts, as an engine-wide one would."""
    V = engine.manifest.target.vocab_size

    def model(c, rng):
        return ModelDrafter(engine.draft, c, rng)

    def hybrid(c, rng):
        return HybridDrafter(LookupDrafter(V, c.temperature), model(c, rng))

    configs = {
        "plain": (None, dict(speculative=False)),
        "model k=4": (model, dict(k=4)),
        "lookup k=4": (lambda c, rng: LookupDrafter(V, c.temperature), dict(k=4)),
        "lookup k=8": (lambda c, rng: LookupDrafter(V, c.temperature), dict(k=8)),
        "hybrid k=4": (hybrid, dict(k=4)),
        "hybrid k=8": (hybrid, dict(k=8)),
        "adaptive model": (model, dict(k=8, adaptive=True)),
        "adaptive hybrid": (hybrid, dict(k=8, adaptive=True)),
    }
    shared = engine.policy
    for name, (make, opts) in configs.items():
        c = GenerationConfig(max_new_tokens=n, **{"adaptive": False, **opts})
        if c.adaptive:
            engine.policy = adaptive.setdefault(name.split()[-1], KPolicy(k_max=8))
        try:
            r = engine.generate(ids, c, custom_drafter=make(c, np.random.default_rng(0)) if make else None)
        finally:
            engine.policy = shared
        assert r.token_ids == plain.token_ids, f"{name} differs from plain decoding"
        alpha = r.stats.alpha if r.stats.alpha is not None else float("nan")   # None: nothing drafted
        timing.setdefault(name, []).append((r.stats.tokens_per_s, alpha, r.stats.mean_accepted_length))


if __name__ == "__main__":
    main()
