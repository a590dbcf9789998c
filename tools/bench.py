"""`spec-export bench`: every configuration on the same prompts and graphs, interleaved in one process.

Each run is described by the runtime's own `Stats` (peers' runs are converted into one), so tokens/s has one
definition for every configuration: `Stats.tokens_per_s_after_first`, the decode rate after the first token, measured
from token timestamps the same way for ours and the peers'; time to first token is reported beside it.

Greedy outputs are compared with plain decoding. Where one parts from it, the target's logits at the parting position
are recomputed from a fresh cache and the parting is classified (`exactness.classify`): a near-tie (the two tokens'
logits are equal within the graph's rounding, which plain decoding itself does not resolve stably) or a break.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from ..runtime import Engine, GenerationConfig, Stats
from ..runtime.errors import InvalidArgument, SpecError
from ..runtime.kv import KVModel
from ..runtime.stats import predicted_speedup
from .exactness import classify

GREEDY = GenerationConfig(temperature=0.0, seed=0)
BASELINES = ("plain", "spec", "lookup", "hybrid", "adaptive", "ort-genai", "ort-genai-plain", "hf", "hf-plain",
             "hf-lookup")
# Our own configurations: baseline name -> (config name prefix, drafter, adaptive k). Fixed-k ones run at every k;
# adaptive ones at the largest k as their limit.
OURS = {"spec": ("spec", "model", False), "lookup": ("lookup", "lookup", False), "hybrid": ("hybrid", "hybrid", False),
        "adaptive": ("adaptive", None, True)}


def load_prompts(paths: list[Path]) -> list[str]:
    """JSON lines with a "prompt" field (.jsonl), or plain text files (one prompt each)."""
    prompts: list[str] = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise InvalidArgument(f"prompts file {path} does not exist or is not a regular file")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidArgument(f"{path} is not valid UTF-8 ({e})") from e
        if path.suffix in (".jsonl", ".json"):
            for i, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        prompt = json.loads(line)["prompt"]
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise InvalidArgument(f"{path}:{i}: expected a JSON object with a \"prompt\" field") from e
                    if not isinstance(prompt, str):
                        raise InvalidArgument(f"{path}:{i}: \"prompt\" must be a string, got "
                                              f"{type(prompt).__name__} {json.dumps(prompt)[:40]}")
                    prompts.append(prompt)
        else:
            prompts.append(text)
    if not prompts or not all(prompts):
        raise InvalidArgument("no prompts (or an empty one) in " + ", ".join(map(str, paths)))
    return prompts


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


class Run(NamedTuple):
    """One prompt through one configuration."""
    token_ids: list[int]
    stats: Stats


@dataclass(frozen=True)
class Config:
    """One column of the comparison: a name, its k (None: no drafting) and how to run one prompt."""
    name: str
    k: int | None
    run: Callable[[list[int], int], Run]           # (prompt ids, max new tokens) -> Run
    close: Callable[[], None] = lambda: None


def run_bench(bundle: Path, prompts: list[str], max_new_tokens: int = 128, ks: tuple[int, ...] = (2, 4, 6),
              baselines: tuple[str, ...] = ("plain", "spec"), sampling: GenerationConfig = GREEDY,
              provider: str | None = None, repeats: int = 1, warm_every_prompt: bool = False, progress=None,
              say: Callable[[str], None] = lambda line: None) -> dict:
    """All configurations, interleaved prompt by prompt; returns the report (see `results`).
    repeats: time every prompt this many times; warm_every_prompt: warm up on every prompt at full length (smoke:
    few prompts, so a cold one would land in the median); say: one line per peer that does not apply."""
    engine = Engine(bundle, provider)
    ids = [engine.encode(p)[: engine.max_length // 2] for p in prompts]
    configs, skipped = make_configs(engine, ks, baselines, sampling, say)
    try:
        warm_up(engine, configs, ids, max_new_tokens if warm_every_prompt else 8, ks, warm_every_prompt)
        runs = measure(configs, ids * repeats, max_new_tokens, progress)
    finally:
        for c in configs:
            c.close()
    step_ms = measure_step_costs(engine, ks)
    results = [summarize(c.name, c.k, runs[c.name]) for c in configs]
    add_speedups(results, step_ms)
    greedy = sampling.temperature == 0
    partings = find_partings(engine, ids * repeats, runs, len(ids)) if greedy else []
    for r in results:
        r["near_ties"] = sum(p["kind"] == "near-tie" for p in partings if p["config"] == r["name"]) if greedy else None
        r["breaks"] = sum(p["kind"] == "break" for p in partings if p["config"] == r["name"]) if greedy else None
    return {
        "bundle": str(bundle), "prompts": len(prompts), "repeats": repeats, "max_new_tokens": max_new_tokens,
        "temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p,
        "seed": sampling.seed, "provider": engine.provider, "machine": machine(), "results": results,
        "skipped": skipped, "step_ms": step_ms, "c": step_ms["draft"][1] / step_ms["target"][1],
        "verify_cost": {n: t / step_ms["target"][1] for n, t in step_ms["target"].items()},
        "outputs_identical": {name: [r.token_ids for r in rs] == [r.token_ids for r in runs["plain"]]
                              for name, rs in runs.items()} if greedy else None,
        "partings": partings,
        "acceptance_by_position": {r["name"]: _by_position(r["accept_hist"]) for r in results
                                   if len(r["accept_hist"]) > 1},
    }


# -- the steps of run_bench, in order ---------------------------------------------------------------------------------
def make_configs(engine: Engine, ks, baselines, sampling: GenerationConfig, say) -> tuple[list[Config], dict]:
    """plain, our drafters (spec-k*: the draft model, lookup-k*, hybrid-k*, adaptive-*), then the peers that apply
    to this bundle; returns (configs, {skipped name: why})."""
    def ours(k, drafter="model", adaptive=False):
        def run(prompt_ids, n):
            engine.forget()  # cold prefill, like the peers: the engine's prefix reuse would otherwise skip it
            r = engine.generate(prompt_ids, dataclasses.replace(sampling, max_new_tokens=n, k=k or 1,
                                                                speculative=k is not None, drafter=drafter,
                                                                adaptive=adaptive))
            return Run(r.token_ids, r.stats)
        return run

    configs, skipped = [Config("plain", None, ours(None))], {}
    for base, (prefix, drafter, adaptive) in OURS.items():
        if base not in baselines:
            continue
        if drafter == "model" and engine.draft is None:
            skipped[prefix] = f"{engine.bundle} has no draft model"
            say(f"skipping {prefix}: {skipped[prefix]}")
        elif adaptive:  # the adaptive policy with each drafter the bundle has, at most the largest k per round
            configs += [Config(f"adaptive-{d}", max(ks), ours(max(ks), d, True))
                        for d in (("model", "hybrid") if engine.draft else ("lookup",))]
        else:
            configs += [Config(f"{prefix}-k{k}", k, ours(k, drafter)) for k in ks]
    try:
        for name, k, make in _peer_factories(engine, ks, baselines, skipped, say):
            peer = make()
            configs.append(Config(name, k, _peer_run(peer, sampling), peer.close))
    except BaseException:
        for c in configs:  # the peers already started hold sessions and temporary folders
            c.close()
        raise
    return configs, skipped


def _peer_factories(engine: Engine, ks, baselines, skipped: dict, say):
    """(name, k, constructor) for each peer asked for that can run on this bundle; the others are skipped with one
    line saying why (a torch.onnx bundle has no genai_config.json; the source checkpoints may be gone)."""
    wanted = [b for b in BASELINES if b in baselines and b not in ("plain", "spec")]

    def skip(name, why):
        skipped[name] = why
        say(f"skipping {name}: {why}")

    if engine.draft is None:  # their speculation needs a draft model; their plain decoding does not
        for name in {"ort-genai", "hf"} & set(wanted):
            skip(name, f"{engine.bundle} has no draft model")
            wanted.remove(name)
    if {"ort-genai", "ort-genai-plain"} & set(wanted):
        m = engine.manifest
        missing = [r for r in ("target", "draft") if getattr(m, r) and not (engine.bundle / getattr(m, r).graph)
                   .with_name("genai_config.json").is_file()]
        why = None
        if missing:
            why = (f"{engine.bundle} was exported through {getattr(m, missing[0]).builder}, which writes no "
                   f"genai_config.json; onnxruntime-genai runs bundles built by its model builder only")
        elif not _importable("onnxruntime_genai"):
            why = "onnxruntime-genai is not installed (pip install onnxruntime-genai)"
        for name in ("ort-genai-plain", "ort-genai"):
            if name in wanted and why:
                skip(name, why)
        if not why:
            from .peers import OrtGenAI

            if "ort-genai-plain" in wanted:
                yield "ort-genai-plain", None, lambda: OrtGenAI(engine.bundle, None)
            if "ort-genai" in wanted:
                for k in ks:
                    yield f"ort-genai-k{k}", k, lambda k=k: OrtGenAI(engine.bundle, k)
    if {"hf", "hf-plain"} & set(wanted):
        comp = engine.manifest.compatibility
        sources = [Path(comp[r]["path"]) for r in ("target", "draft") if comp.get(r)]
        target, draft = sources[0], sources[-1]
        why = None
        if not all(p.is_dir() for p in sources):
            why = f"transformers needs the source checkpoints {' and '.join(map(str, sources))}, which are gone"
        elif not (_importable("torch") and _importable("transformers")):
            why = "torch and transformers are not installed (pip install 'specedge[export]')"
        for name in ("hf-plain", "hf"):
            if name in wanted and why:
                skip(name, why)
        if not why:
            from .peers import HFAssisted

            eos = list(engine.manifest.tokenizer.eos_token_ids)
            if "hf-plain" in wanted:
                yield "hf-plain", None, lambda: HFAssisted(target, None, None, eos_token_ids=eos)
            if "hf" in wanted:
                for k in ks:
                    yield f"hf-k{k}", k, lambda k=k: HFAssisted(target, draft, k, eos_token_ids=eos)
    if "hf-lookup" in wanted:
        target = Path(engine.manifest.compatibility["target"]["path"])
        if not target.is_dir():
            skip("hf-lookup", f"transformers needs the source checkpoint {target}, which is gone")
        elif not (_importable("torch") and _importable("transformers")):
            skip("hf-lookup", "torch and transformers are not installed (pip install 'specedge[export]')")
        else:
            from .peers import HFPromptLookup

            eos = list(engine.manifest.tokenizer.eos_token_ids)
            for k in ks:
                yield f"hf-lookup-k{k}", k, lambda k=k: HFPromptLookup(target, k, eos_token_ids=eos)


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _peer_run(peer, s: GenerationConfig):
    """A peer's run as `Stats`: its first-token time and the gaps between the tokens it handed back."""
    def run(prompt_ids, n):
        p = peer.generate(prompt_ids, n, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=s.seed)
        stats = Stats(new_tokens=len(p.token_ids), ttft_ms=p.ttft_ms, token_ms=[p.ttft_ms, *p.token_ms],
                      drafted=p.drafted or 0, accepted=p.accepted or 0)
        return Run(p.token_ids, stats)
    return run


def warm_up(engine: Engine, configs: list[Config], ids: list[list[int]], n: int, ks, every_prompt: bool) -> None:
    """Take first-run costs out of the measurement: every step size a round uses (1..k+1: verify passes, the draft's
    catch-up feeds, plain steps; a GPU captures one CUDA graph per size), then each configuration on the first prompt (or, with
    every_prompt, on every prompt at the full length: each prompt's prefill size warmed as well)."""
    for model in filter(None, (engine.target, engine.draft)):
        for size in range(1, max(ks) + 2):
            model.reset()
            model.forward([5] * size, want="argmax")
        model.reset()
    for c in configs:
        for prompt_ids in (ids if every_prompt else ids[:1]):
            c.run(prompt_ids, n)


def measure(configs: list[Config], ids: list[list[int]], max_new_tokens: int, progress=None) -> dict[str, list[Run]]:
    """Each prompt through every configuration, the order rotated from prompt to prompt: no position bias."""
    runs: dict[str, list[Run]] = {c.name: [] for c in configs}
    for i, prompt_ids in enumerate(ids):
        for c in configs[i % len(configs):] + configs[: i % len(configs)]:
            runs[c.name].append(c.run(prompt_ids, max_new_tokens))
            if progress:
                progress(c.name, i)
    return runs


def measure_step_costs(engine: Engine, ks) -> dict:
    """t(n) of the target for n = 1..max k + 1 and t(1), t(2) of the draft, at half the context or 256 cached."""
    past = min(256, engine.max_length // 2)
    draft = step_costs(engine.draft, [1, 2], past) if engine.draft else {1: 0.0, 2: 0.0}  # no draft model: free
    return {"target": step_costs(engine.target, list(range(1, max(ks) + 2)), past), "draft": draft, "past": past}


def summarize(name: str, k: int | None, runs: list[Run]) -> dict:
    stats = [r.stats for r in runs]
    tps = [s.tokens_per_s_after_first for s in stats]
    gaps = [g for s in stats for g in s.token_ms[1:s.new_tokens]]
    drafted, accepted, tested = (sum(getattr(s, a) for s in stats) for a in ("drafted", "accepted", "tested"))
    rounds, tokens = sum(s.rounds for s in stats), sum(s.new_tokens for s in stats)
    hist = np.sum([s.accept_hist for s in stats], axis=0).tolist() if k and stats[0].accept_hist else []
    return {
        "name": name, "k": k, "prompts": len(runs), "new_tokens": tokens,
        "tokens_per_s": float(np.median(tps)), "tokens_per_s_p10": float(np.percentile(tps, 10)),
        "tokens_per_s_p90": float(np.percentile(tps, 90)),
        "ttft_ms": float(np.median([s.ttft_ms for s in stats])),
        "tpot_p50_ms": float(np.percentile(gaps, 50)) if gaps else 0.0,
        "tpot_p90_ms": float(np.percentile(gaps, 90)) if gaps else 0.0,
        "tpot_p99_ms": float(np.percentile(gaps, 99)) if gaps else 0.0,
        "drafted": drafted, "accepted": accepted, "tested": tested,
        "alpha": accepted / tested if tested else (accepted / drafted if drafted else None),
        "mean_accepted_length": tokens / rounds if rounds else None,
        "accept_hist": hist,
    }


def add_speedups(results: list[dict], step_ms: dict) -> None:
    """Measured speedup over plain, and the speedup predicted from alpha, k, the draft's t(1) and the target's t(n)."""
    t, d = step_ms["target"], step_ms["draft"]
    plain = next(r for r in results if r["name"] == "plain")["tokens_per_s"]
    for r in results:
        r["speedup_vs_plain"] = r["tokens_per_s"] / plain if plain else None
        if r["name"].startswith("spec-") and r["alpha"] is not None:
            k = r["k"]
            r["predicted_speedup"] = predicted_speedup(r["alpha"], k, d[1] / t[1], t)
            r["predicted_speedup_simple"] = predicted_speedup(r["alpha"], k, d[1] / t[1])


def find_partings(engine: Engine, ids: list[list[int]], runs: dict[str, list[Run]], n_prompts: int) -> list[dict]:
    """Every greedy output that parts from plain decoding, classified as a near-tie or a break."""
    out = []
    dtype, eos = engine.manifest.target.kv_dtype, engine.eos
    for name, rs in runs.items():
        for i, (prompt_ids, plain, other) in enumerate(zip(ids, runs["plain"], rs)):
            if name != "plain" and plain.token_ids != other.token_ids:
                p = classify(engine.target, prompt_ids, plain.token_ids, other.token_ids, dtype, eos)
                out.append({"config": name, "prompt": i % n_prompts, **p})
    engine.forget()
    return out


def _by_position(hist: list[int]) -> list[float]:
    """P(draft i accepted | drafts before it were): from the histogram of accepted counts per round."""
    out = []
    for i in range(len(hist) - 1):
        reached = sum(hist[i:])
        out.append(sum(hist[i + 1:]) / reached if reached else 0.0)
    return out


def machine() -> dict:
    import onnxruntime

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version(), "onnxruntime": onnxruntime.__version__}


# -- what the CLI prints and writes -----------------------------------------------------------------------------------
def check_exactness(report: dict) -> None:
    """Raise on a break; near-ties are reported, not failed (see exactness.py for the rule)."""
    bad = {r["name"]: r["breaks"] for r in report["results"] if r.get("breaks")}
    if bad:
        which = ", ".join(f"{name} ({n} prompt{'s' * (n > 1)})" for name, n in bad.items())
        raise SpecError(f"greedy outputs part from plain decoding where the target's two best logits are not tied "
                        f"within rounding, for {which}: exactness is broken (or a peer stops differently); see "
                        f"`partings` in the JSON report, which was still written")


def table(report: dict) -> str:
    rows = [f"{'config':16} {'tok/s':>8} {'p10-p90':>13} {'ttft ms':>8} {'tpot p50/p99':>13} {'alpha':>6} "
            f"{'tau':>5} {'speedup':>8} {'predicted':>9} {'ties/breaks':>11}"]
    for r in report["results"]:
        a = f"{r['alpha']:.2f}" if r["alpha"] is not None else "-"
        t = f"{r['mean_accepted_length']:.2f}" if r["mean_accepted_length"] else "-"
        p = f"{r['predicted_speedup']:.2f}x" if r.get("predicted_speedup") else "-"
        tb = f"{r['near_ties']}/{r['breaks']}" if r.get("breaks") is not None else "-"
        rows.append(f"{r['name']:16} {r['tokens_per_s']:8.1f} {r['tokens_per_s_p10']:6.1f}-{r['tokens_per_s_p90']:<6.1f} "
                    f"{r['ttft_ms']:8.1f} {r['tpot_p50_ms']:6.2f}/{r['tpot_p99_ms']:<6.2f} {a:>6} {t:>5} "
                    f"{r['speedup_vs_plain']:7.2f}x {p:>9} {tb:>11}")
    vc = " ".join(f"{n}:{v:.2f}" for n, v in report["verify_cost"].items())
    rows.append(f"verify cost t(n)/t(1): {vc}   draft cost ratio c = {report['c']:.3f}")
    if report["temperature"] == 0:
        rows.append("ties/breaks: greedy outputs parting from plain decoding at a near-tie of the target's two best "
                    "logits (within the graph's rounding) / anywhere else (a failure)")
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
        ax1.plot(ks, [predicted_speedup(alpha, k, d[1] / t[1], t) for k in ks], "-", color="gray",
                 label=f"predicted (α={alpha:.2f}, measured c and t(n))")
    for prefix, marker in (("spec-k", "o"), ("lookup-k", "D"), ("hybrid-k", "P"), ("adaptive-", "*"),
                           ("ort-genai-k", "s"), ("hf-k", "^"), ("hf-lookup-k", "v")):
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
