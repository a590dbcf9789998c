"""Measure, compare, choose: the numbers behind `spec-export bench`, `tune` and `smoke`.

Every configuration runs on the same prompts and graphs, interleaved in one process. Throughput is the decode rate
after the first token, (tokens - 1) / (t_last - t_first), measured from token timestamps the same way for every
configuration (ours and the peers'); time to first token is reported beside it.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..runtime import Engine
from ..runtime.errors import InvalidArgument, SpecError
from ..runtime.manifest import load_manifest
from ..runtime.model import KVModel


def load_prompts(paths: list[Path]) -> list[str]:
    """JSON lines with a "prompt" field (.jsonl), or plain text files (one prompt each)."""
    prompts: list[str] = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise InvalidArgument(f"prompts file {path} does not exist")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidArgument(f"{path} is not valid UTF-8 ({e})") from e
        if path.suffix in (".jsonl", ".json"):
            for i, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        prompts.append(json.loads(line)["prompt"])
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise InvalidArgument(f"{path}:{i}: expected a JSON object with a \"prompt\" field") from e
        else:
            prompts.append(text)
    if not prompts or not all(prompts):
        raise InvalidArgument("no prompts (or an empty one) in " + ", ".join(map(str, paths)))
    return prompts


def tau(alpha: float, k: int) -> float:
    """Expected tokens per target pass: (1 - alpha^(k+1)) / (1 - alpha)."""
    return k + 1.0 if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)


def step_costs(model: KVModel, sizes: list[int], past: int, repeats: int = 15) -> dict[int, float]:
    """Median ms of one forward of n tokens on top of `past` cached tokens, for each n."""
    model.reset()
    model.forward(list(range(3, 3 + past)), want=None)
    out = {}
    for n in sizes:
        times = []
        for _ in range(repeats):
            model.rewind(past)
            t = time.perf_counter()
            model.forward([5] * n, want="argmax")  # what a greedy step reads back
            times.append(time.perf_counter() - t)
        out[n] = 1e3 * float(np.median(times))
    model.reset()
    return out


@dataclass
class Run:
    """One prompt through one configuration."""
    token_ids: list[int]
    ttft_ms: float
    token_ms: list[float]            # between consecutive tokens; token_ms[0] is the time to the first
    drafted: int = 0
    accepted: int = 0
    tested: int = 0
    rounds: int = 0
    accept_hist: list[int] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        t = sum(self.token_ms[1:])
        return 1e3 * (len(self.token_ms) - 1) / t if t > 0 else 0.0


def engine_run(engine: Engine, ids: list[int], max_new_tokens: int, k: int | None, temperature: float,
               seed: int) -> Run:
    engine.forget()  # cold prefill, like the peers: the engine's prefix reuse would otherwise skip it
    r = engine.generate(ids, max_new_tokens=max_new_tokens, k=k or 1, speculative=k is not None,
                        temperature=temperature, seed=seed)
    s = r.stats
    return Run(r.token_ids, s.ttft_ms, s.token_ms, s.drafted, s.accepted, s.tested, s.rounds, s.accept_hist)


def peer_run(peer, ids: list[int], max_new_tokens: int) -> Run:
    p = peer.generate(ids, max_new_tokens)                   # p.token_ms: the n - 1 gaps after the first token
    return Run(p.token_ids, p.ttft_ms, [p.ttft_ms, *p.token_ms], drafted=p.drafted or 0, accepted=p.accepted or 0)


def summarize(name: str, k: int | None, runs: list[Run]) -> dict:
    tps = [r.tokens_per_s for r in runs]
    gaps = [g for r in runs for g in r.token_ms[1:]]
    drafted, accepted, tested = (sum(getattr(r, a) for r in runs) for a in ("drafted", "accepted", "tested"))
    rounds, tokens = sum(r.rounds for r in runs), sum(len(r.token_ids) for r in runs)
    hist = np.sum([r.accept_hist for r in runs if r.accept_hist], axis=0).tolist() if k and runs[0].accept_hist \
        else []
    return {
        "name": name, "k": k, "prompts": len(runs), "new_tokens": tokens,
        "tokens_per_s": float(np.median(tps)), "tokens_per_s_p10": float(np.percentile(tps, 10)),
        "tokens_per_s_p90": float(np.percentile(tps, 90)),
        "ttft_ms": float(np.median([r.ttft_ms for r in runs])),
        "tpot_p50_ms": float(np.percentile(gaps, 50)) if gaps else 0.0,
        "tpot_p90_ms": float(np.percentile(gaps, 90)) if gaps else 0.0,
        "tpot_p99_ms": float(np.percentile(gaps, 99)) if gaps else 0.0,
        "drafted": drafted, "accepted": accepted, "tested": tested,
        "alpha": accepted / tested if tested else (accepted / drafted if drafted else None),
        "mean_accepted_length": tokens / rounds if rounds else None,
        "accept_hist": hist,
    }


def run_bench(bundle: Path, prompts: list[str], max_new_tokens: int = 128, ks: tuple[int, ...] = (2, 4, 6),
              temperature: float = 0.0, baselines: tuple[str, ...] = ("plain", "spec"), seed: int = 0,
              progress=None, provider: str | None = None) -> dict:
    """All configurations, interleaved prompt by prompt; returns the report (see `results`)."""
    engine = Engine(bundle, provider)
    ids = [engine.encode(p)[: engine.max_length // 2] for p in prompts]
    configs: dict[str, tuple] = {"plain": ("engine", None)}
    if "spec" in baselines:
        configs.update({f"spec-k{k}": ("engine", k) for k in ks})
    peers = _peers(engine, baselines, ks)
    configs.update({name: ("peer", peer) for name, peer in peers.items()})
    try:
        def once(name, prompt_ids, n):
            kind, arg = configs[name]
            if kind == "engine":
                return engine_run(engine, prompt_ids, n, arg, temperature, seed)
            return peer_run(arg, prompt_ids, n)

        for name in configs:  # warm-up: first-run allocations and thread pools out of the measurement
            once(name, ids[0], 8)
        runs: dict[str, list[Run]] = {name: [] for name in configs}
        names = list(configs)
        for i, prompt_ids in enumerate(ids):
            for name in names[i % len(names):] + names[: i % len(names)]:  # rotate the order: no position bias
                runs[name].append(once(name, prompt_ids, max_new_tokens))
                if progress:
                    progress(name, i)
    finally:
        for peer in peers.values():
            peer.close()

    past = min(256, engine.max_length // 2)
    kmax = max(ks)
    t_cost = step_costs(engine.target, list(range(1, kmax + 2)), past)
    d_cost = step_costs(engine.draft, [1, 2], past)
    c = d_cost[1] / t_cost[1]
    results = [summarize(name, _k(name), runs[name]) for name in configs]
    plain = next(r for r in results if r["name"] == "plain")
    for r in results:
        r["speedup_vs_plain"] = r["tokens_per_s"] / plain["tokens_per_s"] if plain["tokens_per_s"] else None
        if r["name"].startswith("spec-") and r["alpha"] is not None:
            k = r["k"]
            r["predicted_speedup"] = tau(r["alpha"], k) * t_cost[1] / (k * d_cost[1] + t_cost[k + 1])
            r["predicted_speedup_simple"] = tau(r["alpha"], k) / (1 + k * c)
    identical = {name: [rr.token_ids for rr in runs[name]] == [rr.token_ids for rr in runs["plain"]]
                 for name in configs}
    return {
        "bundle": str(bundle), "prompts": len(prompts), "max_new_tokens": max_new_tokens,
        "temperature": temperature, "machine": _machine(), "results": results,
        "step_ms": {"target": t_cost, "draft": d_cost, "past": past},
        "verify_cost": {n: t_cost[n] / t_cost[1] for n in t_cost}, "c": c,
        "outputs_identical": identical if temperature == 0 else None,
        "acceptance_by_position": {r["name"]: _by_position(r["accept_hist"]) for r in results if r["accept_hist"]},
    }


def _k(name: str) -> int | None:
    return int(name.rsplit("-k", 1)[1]) if "-k" in name else None


def _by_position(hist: list[int]) -> list[float]:
    """P(draft i accepted | drafts before it were): from the histogram of accepted counts per round."""
    out = []
    for i in range(len(hist) - 1):
        reached = sum(hist[i:])
        out.append(sum(hist[i + 1:]) / reached if reached else 0.0)
    return out


def _peers(engine: Engine, baselines, ks) -> dict:
    """Peers on the same graphs (onnxruntime-genai) and on the source checkpoints (transformers), when available."""
    peers = {}
    wanted = set(baselines)
    if wanted & {"ort-genai", "ort-genai-plain"}:
        from .peers import OrtGenAI

        if "ort-genai-plain" in wanted:
            peers["ort-genai-plain"] = OrtGenAI(engine.bundle, None)
        if "ort-genai" in wanted:
            peers.update({f"ort-genai-k{k}": OrtGenAI(engine.bundle, k) for k in ks})
    if wanted & {"hf", "hf-plain"}:
        from .peers import HFAssisted

        comp = engine.manifest.compatibility
        target, draft = Path(comp["target"]["path"]), Path(comp["draft"]["path"])
        if not (target.is_dir() and draft.is_dir()):
            raise InvalidArgument(f"the hf baseline needs the source checkpoints {target} and {draft}, which are gone")
        if "hf-plain" in wanted:
            peers["hf-plain"] = HFAssisted(target, None, None)
        if "hf" in wanted:
            peers.update({f"hf-k{k}": HFAssisted(target, draft, k) for k in ks})
    return peers


def _machine() -> dict:
    import os
    import platform

    import onnxruntime

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version(), "onnxruntime": onnxruntime.__version__}


def check_identical(report: dict) -> None:
    bad = [name for name, same in (report["outputs_identical"] or {}).items() if not same]
    if bad:
        raise SpecError(f"greedy outputs differ from plain decoding for {', '.join(bad)}: exactness is broken "
                        f"(or a peer stops differently); the report was still written")


def table(report: dict) -> str:
    rows = [f"{'config':16} {'tok/s':>8} {'p10-p90':>13} {'ttft ms':>8} {'tpot p50/p99':>13} {'alpha':>6} "
            f"{'tau':>5} {'speedup':>8} {'predicted':>9}"]
    for r in report["results"]:
        a = f"{r['alpha']:.2f}" if r["alpha"] is not None else "-"
        t = f"{r['mean_accepted_length']:.2f}" if r["mean_accepted_length"] else "-"
        p = f"{r['predicted_speedup']:.2f}x" if r.get("predicted_speedup") else "-"
        rows.append(f"{r['name']:16} {r['tokens_per_s']:8.1f} {r['tokens_per_s_p10']:6.1f}-{r['tokens_per_s_p90']:<6.1f} "
                    f"{r['ttft_ms']:8.1f} {r['tpot_p50_ms']:6.2f}/{r['tpot_p99_ms']:<6.2f} {a:>6} {t:>5} "
                    f"{r['speedup_vs_plain']:7.2f}x {p:>9}")
    vc = " ".join(f"{n}:{v:.2f}" for n, v in report["verify_cost"].items())
    rows.append(f"verify cost t(n)/t(1): {vc}   draft cost ratio c = {report['c']:.3f}")
    return "\n".join(rows)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    res = report["results"]
    spec = [r for r in res if r["name"].startswith("spec-")]
    if spec:
        alpha = sum(r["accepted"] for r in spec) / max(1, sum(r["tested"] for r in spec))
        t, d = report["step_ms"]["target"], report["step_ms"]["draft"]
        ks = [k for k in range(1, len(t)) if k + 1 in t]
        ax1.plot(ks, [tau(alpha, k) * t[1] / (k * d[1] + t[k + 1]) for k in ks], "-", color="gray",
                 label=f"predicted (α={alpha:.2f}, measured c and t(n))")
    for prefix, marker in (("spec-", "o"), ("ort-genai-k", "s"), ("hf-k", "^")):
        pts = [(r["k"], r["speedup_vs_plain"]) for r in res if r["name"].startswith(prefix)]
        if pts:
            ax1.plot(*zip(*pts), marker, label=prefix.rstrip("-k").rstrip("-") + " (measured)")
    ax1.axhline(1.0, color="k", lw=0.5)
    ax1.set(xlabel="k (draft tokens per round)", ylabel="speedup vs plain (tokens/s)", title="speedup vs k")
    ax1.legend(fontsize=8)
    for name, probs in report["acceptance_by_position"].items():
        ax2.plot(range(1, len(probs) + 1), probs, marker="o", label=name)
    ax2.set(xlabel="draft position in the round", ylabel="P(accepted | reached)", ylim=(0, 1.05),
            title="acceptance by position")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- tune: predict from one measurement, verify the best predictions, write the choice ------------------------------
def tune(bundle: Path, prompts: list[str], max_new_tokens: int = 128, candidates: tuple[Path, ...] = (),
         k_range: range = range(1, 9), progress=None) -> dict:
    """Pick the draft (bundle) and k that maximise measured tokens/s; say when plain decoding is better."""
    evaluated = []
    for b in (bundle, *candidates):
        first = run_bench(b, prompts, max_new_tokens, ks=(4,), progress=progress)
        spec4 = next(r for r in first["results"] if r["name"] == "spec-k4")
        alpha = spec4["alpha"] or 0.0
        t1, d1 = first["step_ms"]["target"][1], first["step_ms"]["draft"][1]
        # t(n) beyond the measured k + 1 = 5 grows linearly with the measured slope
        tn = first["step_ms"]["target"]
        slope = (tn[5] - tn[1]) / 4
        predicted = {k: tau(alpha, k) * t1 / (k * d1 + tn.get(k + 1, t1 + slope * k)) for k in k_range}
        top = sorted(predicted, key=predicted.get, reverse=True)[:3]
        second = run_bench(b, prompts, max_new_tokens, ks=tuple(sorted(top)), progress=progress)
        measured = {r["k"]: r["speedup_vs_plain"] for r in second["results"] if r["name"].startswith("spec-")}
        best_k = max(measured, key=measured.get)
        evaluated.append({"bundle": str(b), "alpha": alpha, "c": first["c"], "predicted": predicted,
                          "measured": measured, "best_k": best_k, "best_speedup": measured[best_k],
                          "plain_tokens_per_s": next(r["tokens_per_s"] for r in second["results"]
                                                     if r["name"] == "plain"),
                          "mean_new_tokens": second["results"][0]["new_tokens"] / len(prompts)})
    best = max(evaluated, key=lambda e: e["best_speedup"])
    pays = best["best_speedup"] >= 1.05
    reasons = []
    if not pays:
        if best["alpha"] < 0.55:
            reasons.append(f"acceptance α = {best['alpha']:.2f} is below the ~0.55-0.6 where speculation pays")
        if best["c"] > 0.3:
            reasons.append(f"the draft costs c = {best['c']:.2f} of a target step: use a smaller or more quantized "
                           f"draft (int4), or a shallower one on GPUs")
        if best["mean_new_tokens"] < 16:
            reasons.append(f"responses are short ({best['mean_new_tokens']:.0f} tokens): time to first token "
                           f"dominates and drafting cannot amortise")
        reasons = reasons or ["measured speedup below 1.05x at every k tried"]
    choice = {"k": best["best_k"], "speculative": pays, "draft_bundle": best["bundle"],
              "expected_speedup": best["best_speedup"], "alpha": best["alpha"], "c": best["c"]}
    write_defaults(bundle, {"k": best["best_k"], "speculative": pays,
                            "tuned": {k: v for k, v in choice.items() if k != "draft_bundle"}})
    suggestions = [s for s in (draft_vocab_suggestion(load_manifest(bundle)),) if s]
    return {"choice": choice, "reasons": reasons, "evaluated": evaluated, "suggestions": suggestions}


def draft_vocab_suggestion(m) -> str:
    """A sentence suggesting --draft-vocab when the bundle's draft pays for a large vocabulary's head ('' if not)."""
    from ..export.check import SUGGESTED_DRAFT_VOCAB

    d = m.draft
    if d.draft_vocab or d.vocab_size <= 2 * SUGGESTED_DRAFT_VOCAB:
        return ""
    return (f"the draft computes all {d.vocab_size:,} logits every step: re-export with --draft-vocab "
            f"{SUGGESTED_DRAFT_VOCAB} for cheaper draft steps (output unchanged; `spec-export check` estimates the "
            f"bytes saved)")


def write_defaults(bundle: Path, defaults: dict) -> None:
    """Replace the manifest's defaults atomically (the manifest is not among the hashed files)."""
    import dataclasses
    import os

    from ..runtime.manifest import MANIFEST

    m = load_manifest(bundle, verify=True)
    m = dataclasses.replace(m, defaults={**m.defaults, **defaults})
    tmp = Path(bundle) / (MANIFEST + ".tmp")
    tmp.write_text(m.to_json())
    os.replace(tmp, Path(bundle) / MANIFEST)


# -- smoke: a short deterministic run with budgets, for device CI (RTX, Jetson) ------------------------------------
SMOKE_PROMPTS = (
    "def binary_search(items, target):\n    lo, hi = 0, len(items) - 1\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
    "import json\n\n\ndef load(path):\n    with open(path) as f:\n",
)


def smoke(bundle: Path, budget_ttft_ms: float | None = None, budget_tpot_ms: float | None = None,
          min_speedup: float | None = None, max_new_tokens: int = 32, provider: str | None = None
          ) -> tuple[dict, list[str]]:
    """Greedy, fixed prompts, warm; returns (measurements, failures). Budgets that are None are not checked."""
    k = int(load_manifest(bundle).defaults.get("k", 4))
    report = run_bench(bundle, list(SMOKE_PROMPTS), max_new_tokens, ks=(k,), provider=provider)
    plain, spec = report["results"][0], report["results"][1]
    got = {"ttft_ms": spec["ttft_ms"], "tpot_ms": 1e3 / spec["tokens_per_s"] if spec["tokens_per_s"] else float("inf"),
           "speedup": spec["speedup_vs_plain"], "alpha": spec["alpha"], "k": spec["k"],
           "plain_tokens_per_s": plain["tokens_per_s"], "spec_tokens_per_s": spec["tokens_per_s"]}
    failures = []
    if budget_ttft_ms is not None and got["ttft_ms"] > budget_ttft_ms:
        failures.append(f"time to first token {got['ttft_ms']:.1f} ms exceeds the budget of {budget_ttft_ms:g} ms")
    if budget_tpot_ms is not None and got["tpot_ms"] > budget_tpot_ms:
        failures.append(f"time per output token {got['tpot_ms']:.2f} ms exceeds the budget of {budget_tpot_ms:g} ms")
    if min_speedup is not None and got["speedup"] < min_speedup:
        failures.append(f"speculative speedup {got['speedup']:.2f}x is below the minimum {min_speedup:g}x")
    if not all((report["outputs_identical"] or {}).values()):
        failures.append("speculative output differs from plain greedy output: exactness is broken")
    return got, failures
