"""`spec-export bench`: every configuration on the same prompts and graphs, interleaved in one process.

Each run is described by the runtime's own `Stats` (peers' runs are converted into one), so tokens/s has one
definition for every configuration: `Stats.tokens_per_s_after_first`, the decode rate after the first token, measured
from token timestamps the same way for ours and the peers'; time to first token and the end-to-end rate (new tokens
/ the request's wall time, prompt reading included) are reported beside it.

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
from .exactness import Parting, classify
from .llamacpp import best_of

GREEDY = GenerationConfig(temperature=0.0, seed=0)
# Our own configurations, named by the runtime's drafters: baseline -> (drafter, adaptive k). Fixed-k ones run at
# every k ("model-k4"); adaptive ones at the largest k as their limit, once per drafter the bundle has
# ("adaptive-hybrid"). plain is always run: every speedup is over it. The peers are tools/peers.py's PEERS.
OURS = {"model": ("model", False), "lookup": ("lookup", False), "hybrid": ("hybrid", False),
        "adaptive": (None, True)}
RENAMED = {"spec": "model"}   # bench's old names -> the runtime's


def baseline_names() -> tuple[str, ...]:
    """Every name --baselines accepts: plain, our drafters, then the registered peers."""
    from .peers import PEERS

    return ("plain", *OURS, *(p.name for p in PEERS))


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
    """One prompt through one configuration, timed from the caller's side."""
    token_ids: list[int]
    stats: Stats
    wall_ms: float = 0.0            # request start to the end of the response
    ids_known: bool = True          # False: a peer that counted its tokens but did not hand back their ids


@dataclass(frozen=True)
class Config:
    """One column of the comparison: a name, its k (None: no drafting) and how to run one prompt."""
    name: str
    k: int | None
    run: Callable[[list[int], int], Run]           # (prompt ids, max new tokens) -> Run
    close: Callable[[], None] = lambda: None
    compare: bool = True     # False: a peer on other weights (llama.cpp's GGUF, transformers' fp32 sources against a
                             # quantized target): its outputs are not partings


@dataclass(frozen=True)
class Row:
    """One configuration over every prompt: medians and percentiles over the prompts, counters summed."""
    name: str
    k: int | None
    prompts: int
    new_tokens: int
    tokens_per_s: float             # median of Stats.tokens_per_s_after_first
    tokens_per_s_p10: float
    tokens_per_s_p90: float
    tokens_per_s_end_to_end: float  # median of new tokens / wall time per request (prompt reading included)
    ttft_ms: float                  # median
    tpot_p50_ms: float              # gaps between consecutive tokens, all prompts together
    tpot_p90_ms: float
    tpot_p99_ms: float
    drafted: int
    accepted: int
    tested: int
    alpha: float | None             # None: nothing was drafted
    mean_accepted_length: float | None   # tau
    accept_hist: list[int]          # [n] rounds that accepted n drafts (empty without drafting)
    speedup_vs_plain: float | None = None
    predicted_speedup: float | None = None          # the model drafter's, from alpha, k, c and t(n)
    predicted_speedup_simple: float | None = None   # the same with t(n) = t(1)
    near_ties: int | None = None    # greedy only: partings from plain decoding at a near-tie / anywhere else
    breaks: int | None = None


@dataclass(frozen=True)
class BenchReport:
    """What `spec-export bench --json` writes (`to_dict`)."""
    bundle: str
    prompts: int
    repeats: int
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int | None
    provider: str
    machine: dict
    results: list[Row]              # plain first
    skipped: dict[str, str]         # baseline -> why it did not run
    step_ms: dict                   # {"target": {n: ms}, "draft": {1: ms, 2: ms}, "past": cached tokens}
    c: float                        # the draft's t(1) / the target's t(1)
    verify_cost: dict[int, float]   # t(n) / t(1) of the target
    outputs_identical: dict[str, bool] | None   # greedy only: each configuration's outputs equal plain's
    partings: list[Parting]
    acceptance_by_position: dict[str, list[float]]

    def row(self, name: str) -> Row:
        return next(r for r in self.results if r.name == name)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def run_bench(bundle: Path, prompts: list[str], max_new_tokens: int = 128, ks: tuple[int, ...] = (2, 4, 6),
              baselines: tuple[str, ...] = ("plain", "model"), sampling: GenerationConfig = GREEDY,
              provider: str | None = None, repeats: int = 1, warm_every_prompt: bool = False, progress=None,
              say: Callable[[str], None] = lambda line: None, threads: int = 0,
              gguf: Path | None = None) -> BenchReport:
    """All configurations, interleaved prompt by prompt. repeats: time every prompt this many times;
    warm_every_prompt: warm up on every prompt at full length (smoke: few prompts, so a cold one would land in the
    median); say: one line per baseline that does not apply; threads and gguf: for the engine and the peers."""
    engine = Engine(bundle, provider, threads)
    ids = [engine.encode(p)[: engine.max_length // 2] for p in prompts]
    configs, skipped = make_configs(engine, ks, baselines, sampling, say, threads, gguf)
    try:
        warm_up(engine, configs, ids, max_new_tokens if warm_every_prompt else 8, ks, warm_every_prompt)
        runs = measure(configs, ids * repeats, max_new_tokens, progress)
    finally:
        for c in configs:
            c.close()
    step_ms = measure_step_costs(engine, ks)
    greedy = sampling.temperature == 0
    compared = {c.name: runs[c.name] for c in configs if c.compare}
    partings = find_partings(engine, ids * repeats, compared, len(ids)) if greedy else []
    rows = [summarize(c.name, c.k, runs[c.name]) for c in configs]
    rows = [dataclasses.replace(r, **_speedups(r, rows[0], step_ms),
                                **_partings(r.name, partings, greedy and r.name in compared)) for r in rows]
    return BenchReport(
        bundle=str(bundle), prompts=len(prompts), repeats=repeats, max_new_tokens=max_new_tokens,
        temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p, seed=sampling.seed,
        provider=engine.provider, machine=machine(), results=rows, skipped=skipped, step_ms=step_ms,
        c=step_ms["draft"][1] / step_ms["target"][1],
        verify_cost={n: t / step_ms["target"][1] for n, t in step_ms["target"].items()},
        outputs_identical={name: [r.token_ids for r in rs] == [r.token_ids for r in runs["plain"]]
                           for name, rs in compared.items() if all(r.ids_known for r in rs)} if greedy else None,
        partings=partings,
        acceptance_by_position={r.name: _by_position(r.accept_hist) for r in rows if len(r.accept_hist) > 1})


def current_names(baselines) -> tuple[str, ...]:
    """Old bench names renamed to the runtime's (the CLI says so on stderr; Python callers get a warning)."""
    old = [b for b in baselines if b in RENAMED]
    if old:
        import warnings

        warnings.warn(f"bench baseline name(s) {', '.join(old)} are deprecated: use "
                      f"{', '.join(RENAMED[b] for b in old)}", DeprecationWarning, stacklevel=3)
    return tuple(RENAMED.get(b, b) for b in baselines)


# -- the steps of run_bench, in order ---------------------------------------------------------------------------------
def make_configs(engine: Engine, ks, baselines, sampling: GenerationConfig, say, threads: int = 0,
                 gguf: Path | None = None) -> tuple[list[Config], dict[str, str]]:
    """plain, our drafters (model-k*, lookup-k*, hybrid-k*, adaptive-*), then the peers asked for; a baseline that
    does not apply to this bundle is skipped with one line saying why. Returns (configs, {skipped name: why})."""
    from .peers import PEERS, PeerSetup

    baselines = current_names(baselines)

    def ours(k, drafter, adaptive=False):
        def run(prompt_ids, n):
            engine.forget()  # cold prefill, like the peers: the engine's prefix reuse would otherwise skip it
            c = dataclasses.replace(sampling, max_new_tokens=n, k=k or 1, speculative=k is not None,
                                    drafter=drafter, adaptive=adaptive)
            t0 = time.perf_counter()
            r = engine.generate(prompt_ids, c)
            return Run(r.token_ids, r.stats, 1e3 * (time.perf_counter() - t0))
        return run

    skipped: dict[str, str] = {}

    def applies(name: str, needs_draft: bool, unavailable=lambda: None) -> bool:
        why = f"{engine.bundle} has no draft model" if needs_draft and engine.draft is None else unavailable()
        if why:
            skipped[name] = why
            say(f"skipping {name}: {why}")
        return not why

    # plain decoding drafts nothing: it names the free drafter, so it never asks for a draft model
    configs = [Config("plain", None, ours(None, "lookup"))]
    for base, (drafter, adaptive) in OURS.items():
        if base in baselines and applies(base, drafter == "model"):
            if adaptive:  # the adaptive policy with each drafter the bundle has, at most the largest k per round
                configs += [Config(f"adaptive-{d}", max(ks), ours(max(ks), d, True))
                            for d in (("model", "hybrid") if engine.draft else ("lookup",))]
            else:
                configs += [Config(f"{drafter}-k{k}", k, ours(k, drafter)) for k in ks]
    setup = PeerSetup(engine, tuple(ks), threads, gguf)
    try:
        for peer in PEERS:
            if peer.name in baselines and applies(peer.name, peer.needs_draft, lambda: peer.unavailable(setup)):
                for name, k, start in peer.configs(setup):
                    p = start()
                    configs.append(Config(name, k, _peer_run(p, sampling), p.close, peer.compared(setup)))
    except BaseException:
        for c in configs:  # the peers already started hold sessions and temporary folders
            c.close()
        raise
    return configs, skipped


def _peer_run(peer, s: GenerationConfig):
    """A peer's run as `Stats`: its first-token time and the gaps between the tokens it handed back."""
    def run(prompt_ids, n):
        p = peer.generate(prompt_ids, n, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=s.seed)
        stats = Stats(new_tokens=p.n, ttft_ms=p.ttft_ms, token_ms=[p.ttft_ms, *p.token_ms],
                      drafted=p.drafted or 0, accepted=p.accepted or 0)
        return Run(p.token_ids, stats, p.wall_ms, p.new_tokens is None)
    return run


def warm_up(engine: Engine, configs: list[Config], ids: list[list[int]], n: int, ks, every_prompt: bool) -> None:
    """Take first-run costs out of the measurement: every step size a round uses (1..k+1: verify passes, the draft's
    catch-up feeds, plain steps; a GPU captures one CUDA graph per size), then each configuration on the first prompt
    (or, with every_prompt, on every prompt at the full length: each prompt's prefill size warmed as well)."""
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


def summarize(name: str, k: int | None, runs: list[Run]) -> Row:
    stats = [r.stats for r in runs]
    tps = [s.tokens_per_s_after_first for s in stats]
    gaps = [g for s in stats for g in s.token_ms[1:s.new_tokens]]
    drafted, accepted, tested = (sum(getattr(s, a) for s in stats) for a in ("drafted", "accepted", "tested"))
    rounds, tokens = sum(s.rounds for s in stats), sum(s.new_tokens for s in stats)
    pct = lambda xs, q: float(np.percentile(xs, q)) if xs else 0.0  # noqa: E731
    return Row(
        name=name, k=k, prompts=len(runs), new_tokens=tokens, tokens_per_s=float(np.median(tps)),
        tokens_per_s_p10=pct(tps, 10), tokens_per_s_p90=pct(tps, 90),
        tokens_per_s_end_to_end=float(np.median([1e3 * s.new_tokens / r.wall_ms if r.wall_ms > 0 else 0.0
                                                 for s, r in zip(stats, runs)])),
        ttft_ms=float(np.median([s.ttft_ms for s in stats])),
        tpot_p50_ms=pct(gaps, 50), tpot_p90_ms=pct(gaps, 90), tpot_p99_ms=pct(gaps, 99),
        drafted=drafted, accepted=accepted, tested=tested,
        alpha=accepted / tested if tested else (accepted / drafted if drafted else None),
        mean_accepted_length=tokens / rounds if rounds else None,
        accept_hist=np.sum([s.accept_hist for s in stats], axis=0).tolist() if k and stats[0].accept_hist else [])


def _speedups(r: Row, plain: Row, step_ms: dict) -> dict:
    """Measured speedup over plain; for the model drafter also the speedup predicted from alpha, k, the draft's
    t(1) and the target's t(n) (and with t(n) = t(1))."""
    out = {"speedup_vs_plain": r.tokens_per_s / plain.tokens_per_s if plain.tokens_per_s else None}
    if r.name.startswith("model-") and r.alpha is not None:
        t, d = step_ms["target"], step_ms["draft"]
        out.update(predicted_speedup=predicted_speedup(r.alpha, r.k, d[1] / t[1], t),
                   predicted_speedup_simple=predicted_speedup(r.alpha, r.k, d[1] / t[1]))
    return out


def _partings(name: str, partings: list[Parting], greedy: bool) -> dict:
    if not greedy:
        return {}
    kinds = [p.kind for p in partings if p.config == name]
    return {"near_ties": kinds.count("near-tie"), "breaks": kinds.count("break")}


def find_partings(engine: Engine, ids: list[list[int]], runs: dict[str, list[Run]], n_prompts: int) -> list[Parting]:
    """Every greedy output that parts from plain decoding, classified as a near-tie or a break."""
    out = []
    dtype, eos = np.dtype(engine.target.logits_dtype).name, engine.eos
    for name, rs in runs.items():
        for i, (prompt_ids, plain, other) in enumerate(zip(ids, runs["plain"], rs)):
            if name != "plain" and other.ids_known and plain.token_ids != other.token_ids:
                p = classify(engine.target, prompt_ids, plain.token_ids, other.token_ids, dtype, eos)
                out.append(dataclasses.replace(p, config=name, prompt=i % n_prompts))
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
def check_exactness(partings: list[Parting]) -> None:
    """Raise on a break; near-ties are reported, not failed (see exactness.py for the rule)."""
    bad: dict[str, int] = {}
    for p in partings:
        if p.kind == "break":
            bad[p.config] = bad.get(p.config, 0) + 1
    if bad:
        which = ", ".join(f"{name} ({n} prompt{'s' * (n > 1)})" for name, n in bad.items())
        raise SpecError(f"greedy outputs part from plain decoding where the target's two best logits are not tied "
                        f"within rounding, for {which}: exactness is broken (or a peer stops differently); see "
                        f"`partings` in the JSON report, which was still written")


def table(report: BenchReport) -> str:
    rows = [f"{'config':16} {'tok/s':>8} {'p10-p90':>13} {'e2e':>6} {'ttft ms':>8} {'tpot p50/p99':>13} {'alpha':>6} "
            f"{'tau':>5} {'speedup':>8} {'predicted':>9} {'ties/breaks':>11}"]
    for r in report.results:
        a = f"{r.alpha:.2f}" if r.alpha is not None else "-"
        t = f"{r.mean_accepted_length:.2f}" if r.mean_accepted_length else "-"
        p = f"{r.predicted_speedup:.2f}x" if r.predicted_speedup else "-"
        s = f"{r.speedup_vs_plain:7.2f}x" if r.speedup_vs_plain is not None else f"{'-':>8}"
        tb = f"{r.near_ties}/{r.breaks}" if r.breaks is not None else "-"
        rows.append(f"{r.name:16} {r.tokens_per_s:8.1f} {r.tokens_per_s_p10:6.1f}-{r.tokens_per_s_p90:<6.1f} "
                    f"{r.tokens_per_s_end_to_end:6.1f} {r.ttft_ms:8.1f} {r.tpot_p50_ms:6.2f}/{r.tpot_p99_ms:<6.2f} "
                    f"{a:>6} {t:>5} {s} {p:>9} {tb:>11}")
    vc = " ".join(f"{n}:{v:.2f}" for n, v in report.verify_cost.items())
    best = best_of(report.results)
    if best:
        rows.append(f"llama.cpp-ngram's best: {best.name} ({best.tokens_per_s:.1f} tok/s)")
    rows.append("tok/s: the decode rate after the first token (median, p10-p90); e2e: new tokens / request time")
    rows.append(f"verify cost t(n)/t(1): {vc}   draft cost ratio c = {report.c:.3f}")
    if report.temperature == 0:
        rows.append("ties/breaks: greedy outputs parting from plain decoding at a near-tie of the target's two best "
                    "logits (within the graph's rounding) / anywhere else (a failure)")
    return "\n".join(rows)


def plot(report: BenchReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    res = report.results
    model = [r for r in res if r.name.startswith("model-")]
    if model:
        alpha = sum(r.accepted for r in model) / max(1, sum(r.tested for r in model))
        t, d = report.step_ms["target"], report.step_ms["draft"]
        ks = [k for k in range(1, len(t)) if k + 1 in t]
        ax1.plot(ks, [predicted_speedup(alpha, k, d[1] / t[1], t) for k in ks], "-", color="gray",
                 label=f"predicted (α={alpha:.2f}, measured c and t(n))")
    for prefix, marker in (("model-k", "o"), ("lookup-k", "D"), ("hybrid-k", "P"), ("adaptive-", "*"),
                           ("ort-genai-k", "s"), ("hf-k", "^"), ("hf-lookup-k", "v")):
        pts = [(r.k, r.speedup_vs_plain) for r in res if r.name.startswith(prefix)]
        if pts:
            ax1.plot(*zip(*pts), marker, label=prefix.rstrip("-k").rstrip("-") + " (measured)")
    ax1.axhline(1.0, color="k", lw=0.5)
    ax1.set(xlabel="k (draft tokens per round)", ylabel="speedup vs plain (tokens/s)", title="speedup vs k")
    ax1.legend(fontsize=8)
    for name, probs in report.acceptance_by_position.items():
        ax2.plot(range(1, len(probs) + 1), probs, marker="o", label=name)
    ax2.set(xlabel="draft position in the round", ylabel="P(accepted | reached)", ylim=(0, 1.05),
            title="acceptance by position")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
