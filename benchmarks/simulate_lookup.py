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
import time
from pathlib import Path

import numpy as np

from specedge.runtime import Engine
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
        draft, _ = d.propose(ctx, min(k, len(response) - i - 1) or 1)
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
        adaptive: dict[str, Adaptive] = {}
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
                            alpha=float(alpha.mean()), tau=float(tau.mean()))
                print(f"{name:10s} {c:16s} {m[c]['tokens_per_s']:6.1f} tok/s  {m[c]['speedup']:.2f}x  "
                      f"alpha {m[c]['alpha']:.2f}  tau {m[c]['tau']:.2f}")
            for c, ad in adaptive.items():
                p = ad.policy
                m[f"adaptive {c}"]["policy"] = dict(
                    c={d: p.draft_step_cost(d) for d in ("model", "lookup")},
                    verify_cost={n: p.verify_cost(n) for n in range(1, 10)},
                    acceptance={d: p.acceptance(d, 8) for d in ("model", "lookup")},
                    choice={d: p.choose(d, 8) for d in ("model", "lookup")})
                print(f"{name:10s} adaptive {c}: c {m[f'adaptive {c}']['policy']['c']}, "
                      f"t(5)/t(1) {p.verify_cost(5):.2f}, k now {m[f'adaptive {c}']['policy']['choice']}")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=1) + "\n")


class Adaptive:
    """Adaptive k emulated in the current loop, which asks every round for the fixed k (the upper limit): this
    proposes the k the policy chooses (possibly 0: a plain step) and feeds the round's timings back. The policy
    lives as long as the object (here: one per configuration, across prompts, as an engine-wide one would)."""

    def __init__(self, policy: KPolicy, vocab_size: int):
        self.policy, self.vocab_size, self.drafter = policy, vocab_size, None

    def propose(self, tokens, k):
        d = self.drafter
        self.source = d.source(tokens) if isinstance(d, HybridDrafter) else "model"
        k = self.policy.choose(self.source, k)
        t = time.perf_counter()
        draft, p = d.propose(tokens, k) if k else (np.empty(0, np.int64), None)
        self.t1 = time.perf_counter()
        self.draft_s, self.k = self.t1 - t, len(draft)
        return draft, p

    def accepted(self, n):
        verify_s = time.perf_counter() - self.t1
        if self.k:
            self.drafter.accepted(n)
        self.policy.observe(self.source, self.k, n, self.draft_s, verify_s)


def _measure(engine: Engine, ids: list[int], plain, n: int, timing: dict, adaptive: dict) -> None:
    """Fixed-k model, lookup, hybrid and adaptive drafting through the current loop, one after another, each
    checked against plain decoding."""
    V = engine.manifest.target.vocab_size

    def model(c, rng):
        return ModelDrafter(engine.draft, c.temperature, rng=rng)

    def hybrid(c, rng):
        return HybridDrafter(LookupDrafter(V, c.temperature), model(c, rng))

    def adapt(name, inner):
        def make(c, rng):
            a = adaptive.setdefault(name, Adaptive(KPolicy(k_max=8), V))
            a.drafter = inner(c, rng)
            return a
        return make

    configs = {
        "plain": (None, dict(speculative=False)),
        "model k=4": (None, dict(k=4)),
        "lookup k=4": (lambda c, rng: LookupDrafter(V, c.temperature), dict(k=4)),
        "lookup k=8": (lambda c, rng: LookupDrafter(V, c.temperature), dict(k=8)),
        "hybrid k=4": (hybrid, dict(k=4)),
        "hybrid k=8": (hybrid, dict(k=8)),
        "adaptive model": (adapt("model", model), dict(k=8)),
        "adaptive hybrid": (adapt("hybrid", hybrid), dict(k=8)),
    }
    for name, (make, opts) in configs.items():
        if make:
            engine.make_drafter = lambda name, c, rng, make=make: make(c, rng)
        try:
            r = engine.generate(ids, max_new_tokens=n, **opts)
        finally:
            engine.__dict__.pop("make_drafter", None)
        assert r.token_ids == plain.token_ids, f"{name} differs from plain decoding"
        timing.setdefault(name, []).append((r.stats.tokens_per_s, r.stats.alpha, r.stats.mean_accepted_length))


if __name__ == "__main__":
    main()
