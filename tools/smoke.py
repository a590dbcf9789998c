"""`spec-export smoke`: a short, deterministic, warm run with budgets, for device CI (RTX, Jetson).

Warm first, then time: every step size a round uses (1..k+1) and every smoke prompt's prefill run once untimed, so
CUDA graph capture and cold prefills never land in what is timed. The prompts are then timed `repeats` times,
plain and speculative interleaved, and the medians compared with the budgets. Each budget is one verdict; a budget
not given is a skipped verdict; greedy exactness (no break, see exactness.py) is always one.
"""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from pathlib import Path

from ..runtime.manifest import load_manifest
from .bench import run_bench

SMOKE_PROMPTS = (
    "def binary_search(items, target):\n    lo, hi = 0, len(items) - 1\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
    "import json\n\n\ndef load(path):\n    with open(path) as f:\n",
)
REPEATS = 4   # 12 timed runs per configuration: a median that a single slow run cannot move


@dataclass(frozen=True)
class Budgets:
    ttft_ms: float | None = None       # time to first token, speculative, median
    tpot_ms: float | None = None       # time per output token after the first, speculative, median
    min_speedup: float | None = None   # speculative / plain tokens per second


@dataclass(frozen=True)
class Measurements:
    ttft_ms: float                     # speculative, median
    tpot_ms: float | None              # 1 / the speculative decode rate after the first token
    speedup: float | None              # speculative / plain tokens per second
    alpha: float | None                # None: nothing was drafted
    k: int
    drafter: str                       # the bundle's default drafter, at k
    plain_tokens_per_s: float
    spec_tokens_per_s: float           # speculative
    near_ties: int | None
    breaks: int | None


@dataclass(frozen=True)
class Verdict:
    """One budget. passed: None when no budget was given (the case is skipped), else whether the measurement is
    within it."""
    name: str
    measured: float | int | None
    budget: float | int | None
    bound: str                         # "at most" or "at least"
    unit: str
    passed: bool | None
    message: str                       # why it failed ("" otherwise)


@dataclass(frozen=True)
class SmokeResult:
    """What `spec-export smoke --json` writes (`to_dict`)."""
    bundle: str
    provider: str
    prompts: int
    repeats: int
    max_new_tokens: int
    budgets: Budgets
    measurements: Measurements
    verdicts: list[Verdict]
    passed: bool
    partings: list
    machine: dict

    def failures(self) -> list[str]:
        return [v.message for v in self.verdicts if v.passed is False]

    def to_dict(self) -> dict:
        return asdict(self)


def smoke(bundle: Path, budgets: Budgets = Budgets(), max_new_tokens: int = 32, provider: str | None = None,
          repeats: int = REPEATS) -> SmokeResult:
    """Greedy, fixed prompts, warm: plain against the bundle's default drafter at its k (lookup on a bundle without
    a draft model); returns measurements and one verdict per budget (see `to_junit`)."""
    k, drafter = _defaults(bundle)
    report = run_bench(bundle, list(SMOKE_PROMPTS), max_new_tokens, ks=(k,), baselines=("plain", drafter),
                       provider=provider, repeats=repeats, warm_every_prompt=True)
    plain, spec = report.row("plain"), report.row(f"{drafter}-k{k}")
    got = Measurements(ttft_ms=spec.ttft_ms, tpot_ms=1e3 / spec.tokens_per_s if spec.tokens_per_s else None,
                       speedup=spec.speedup_vs_plain, alpha=spec.alpha, k=k, drafter=drafter,
                       plain_tokens_per_s=plain.tokens_per_s, spec_tokens_per_s=spec.tokens_per_s,
                       near_ties=spec.near_ties, breaks=spec.breaks)
    b = budgets
    verdicts = [
        _verdict("ttft_ms", got.ttft_ms, b.ttft_ms, "ms", "at most",
                 f"time to first token {got.ttft_ms:.1f} ms exceeds the budget of {_g(b.ttft_ms)} ms"),
        _verdict("tpot_ms", got.tpot_ms, b.tpot_ms, "ms", "at most",
                 f"time per output token {_g(got.tpot_ms)} ms exceeds the budget of {_g(b.tpot_ms)} ms"),
        _verdict("speedup", got.speedup, b.min_speedup, "x", "at least",
                 f"speculative speedup {got.speedup or 0:.2f}x is below the minimum {_g(b.min_speedup)}x"),
        _verdict("exactness", got.breaks, 0, "breaks", "at most",
                 f"speculative output parts from plain greedy output {got.breaks} time(s) where the target's two "
                 f"best logits are not tied within rounding: exactness is broken"),
    ]
    return SmokeResult(bundle=str(bundle), provider=report.provider, prompts=len(SMOKE_PROMPTS), repeats=repeats,
                       max_new_tokens=max_new_tokens, budgets=budgets, measurements=got, verdicts=verdicts,
                       passed=all(v.passed is not False for v in verdicts), partings=report.partings,
                       machine=report.machine)


def _defaults(bundle: Path) -> tuple[int, str]:
    """The bundle's default k and fixed-k drafter (what a plain `generate` would use)."""
    d = load_manifest(bundle).bundle_defaults()
    return d.k, d.drafter


def _verdict(name: str, measured, budget, unit: str, bound: str, failure: str) -> Verdict:
    if budget is None:
        passed = None
    else:
        passed = measured is not None and (measured <= budget if bound == "at most" else measured >= budget)
    return Verdict(name, measured, budget, bound, unit, passed, failure if passed is False else "")


def to_junit(result: SmokeResult) -> str:
    """JUnit XML as CI systems read it: one test case per budget; a failure carries measured vs budget; a budget not
    given is a skipped case."""
    vs = result.verdicts
    suites = ET.Element("testsuites", name="spec-export smoke")
    suite = ET.SubElement(suites, "testsuite", name="specedge.smoke", tests=str(len(vs)),
                          failures=str(sum(v.passed is False for v in vs)),
                          skipped=str(sum(v.passed is None for v in vs)), errors="0")
    props = ET.SubElement(suite, "properties")
    for key in ("bundle", "provider", "prompts", "repeats", "max_new_tokens"):
        ET.SubElement(props, "property", name=key, value=str(getattr(result, key)))
    for v in vs:
        case = ET.SubElement(suite, "testcase", classname=f"specedge.smoke.{Path(result.bundle).name}", name=v.name)
        detail = f"measured {_fmt(v.measured)} {v.unit}, budget {_fmt(v.budget)} {v.unit}"
        if v.passed is None:
            ET.SubElement(case, "skipped", message=f"no budget given (measured {_fmt(v.measured)} {v.unit})")
        elif v.passed is False:
            ET.SubElement(case, "failure", message=v.message, type="budget").text = detail
        else:
            ET.SubElement(case, "system-out").text = detail
    return ET.tostring(suites, encoding="unicode", xml_declaration=True)


def to_json(result: SmokeResult) -> str:
    return json.dumps(result.to_dict(), indent=1)


def _fmt(x) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def _g(x) -> str:
    return "-" if x is None else f"{x:.4g}"
