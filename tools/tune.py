"""`spec-export tune`: predict from one measurement, verify the best predictions by measurement, write the choice.

With `--drafts`, each bundle (the same target with another draft or draft precision) is measured the same way. The
choice is written into the bundle that won, and only there: when another bundle's draft wins, the user is told to
use that bundle, whose manifest now carries the chosen k. When no bundle pays, plain decoding becomes the default
of the bundle the user tuned.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from ..export.distill_card import advice, bundle_card
from ..export.osutil import atomic_path
from ..runtime.config import DRAFTERS as RUNTIME_DRAFTERS
from ..runtime.manifest import MANIFEST, load_manifest
from ..runtime.stats import predicted_speedup
from .bench import run_bench

PAYS = 1.05   # a measured speedup below this is noise or a loss: plain decoding is simpler and as fast
DRAFTERS = (*RUNTIME_DRAFTERS, "adaptive")   # what tune may choose: model, lookup, hybrid (fixed k), adaptive k


@dataclass(frozen=True)
class Evaluation:
    """One bundle measured: alpha and c at k = 4, the model drafter's predicted speedups, and the measured best."""
    bundle: str
    alpha: float                    # at k = 4: the draft model's, or lookup's on a bundle without one
    c: float                        # the draft's step cost / the target's
    t: dict[int, float]             # the target's step ms for n tokens
    predicted: dict[int, float]     # k -> the model drafter's speedup predicted from alpha, c and t(n)
    measured: dict[str, float]      # configuration ("model-k3", "adaptive-hybrid") -> speedup over plain
    best_k: int
    best_speedup: float
    best_config: str
    best_tau: float                 # tokens per target pass of the best configuration
    plain_tokens_per_s: float
    mean_new_tokens: float


@dataclass(frozen=True)
class Choice:
    """What is written into a bundle's manifest defaults (`written_to`)."""
    k: int
    speculative: bool
    draft_bundle: str               # the bundle whose draft won
    config: str                     # the winning configuration's bench name
    drafter: str                    # the runtime's name: model, lookup or hybrid
    adaptive: bool
    expected_speedup: float
    alpha: float
    c: float
    written_to: str                 # the winning bundle, or the tuned one when speculation does not pay


@dataclass(frozen=True)
class TuneReport:
    choice: Choice
    reasons: list[str]              # why speculation does not pay (empty when it does)
    evaluated: list[Evaluation]
    distill_hint: str | None = None
    suggestions: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def tune(bundle: Path, prompts: list[str], max_new_tokens: int = 128, candidates: tuple[Path, ...] = (),
         k_range: range = range(1, 9), progress=None, drafters: tuple[str, ...] = DRAFTERS) -> TuneReport:
    """Pick the draft (bundle), drafter and k that maximise measured tokens/s, write it, and return the decision."""
    evaluated = [measure(b, prompts, max_new_tokens, k_range, progress, drafters) for b in (bundle, *candidates)]
    out = choose(Path(bundle), evaluated)
    write_choice(out.choice)
    best = next(e for e in evaluated if e.bundle == out.choice.draft_bundle)
    hint = advice(best.alpha, best.c, t=best.t, card=bundle_card(Path(best.bundle)))
    suggestion = draft_vocab_suggestion(load_manifest(Path(best.bundle)))
    return dataclasses.replace(out, distill_hint=hint.reason if hint.distill else None,
                               suggestions=[suggestion] if suggestion else [])


def draft_vocab_suggestion(m) -> str:
    """A sentence suggesting --draft-vocab when the bundle's draft pays for a large vocabulary's head ('' if not)."""
    from ..export.check import SUGGESTED_DRAFT_VOCAB

    d = m.draft
    if d is None or d.draft_vocab or d.vocab_size <= 2 * SUGGESTED_DRAFT_VOCAB:
        return ""
    return (f"the draft computes all {d.vocab_size:,} logits every step: re-export with --draft-vocab "
            f"{SUGGESTED_DRAFT_VOCAB} for cheaper draft steps (output unchanged; `spec-export check` estimates the "
            f"bytes saved)")


def measure(bundle: Path, prompts: list[str], max_new_tokens: int, k_range: range, progress=None,
            drafters: tuple[str, ...] = DRAFTERS) -> Evaluation:
    """alpha and c at k = 4, the speedup predicted for every k in k_range, then every drafter measured at the three
    best k (adaptive k at the largest of them)."""
    first = run_bench(bundle, prompts, max_new_tokens, ks=(4,), baselines=("plain", "model", "lookup"),
                      progress=progress)
    at4 = {r.name: r for r in first.results}
    alpha = (at4.get("model-k4") or at4["lookup-k4"]).alpha or 0.0   # a bundle without a draft model: lookup's
    tn, d1 = first.step_ms["target"], first.step_ms["draft"][1]
    predicted = {k: predicted_speedup(alpha, k, d1 / tn[1], tn) for k in k_range}
    top = sorted(predicted, key=predicted.get, reverse=True)[:3]
    second = run_bench(bundle, prompts, max_new_tokens, ks=tuple(sorted(top)), baselines=("plain", *drafters),
                       progress=progress)
    ours = [r for r in second.results if r.name != "plain"]
    best = max(ours, key=lambda r: r.speedup_vs_plain)
    return Evaluation(bundle=str(bundle), alpha=alpha, c=first.c, t=tn, predicted=predicted,
                      measured={r.name: r.speedup_vs_plain for r in ours}, best_k=best.k,
                      best_speedup=best.speedup_vs_plain, best_config=best.name,
                      best_tau=best.mean_accepted_length or 1.0, plain_tokens_per_s=second.row("plain").tokens_per_s,
                      mean_new_tokens=second.results[0].new_tokens / len(prompts))


def choose(bundle: Path, evaluated: list[Evaluation]) -> TuneReport:
    """The best bundle and k, or plain decoding with the reasons; `written_to` is the bundle whose defaults change."""
    best = max(evaluated, key=lambda e: e.best_speedup)
    # Both must agree: a measured gain the timing model cannot explain from alpha and c (alpha 0 "winning" on a busy
    # machine) is noise, and recommending speculation on noise would make every request slower.
    # The model drafter's gain must follow from alpha and c; any drafter's is bounded by tau (tokens per target pass).
    config = best.best_config
    predicted = best.predicted.get(best.best_k, 0.0) if config.startswith("model-") else best.best_tau
    pays = best.best_speedup >= PAYS and predicted >= 1.0
    reasons = []
    if not pays:
        if best.best_speedup >= PAYS:
            reasons.append(f"the measured {best.best_speedup:.2f}x at k={best.best_k} is noise: α and c "
                           f"predict {predicted:.2f}x; measure with more prompts on a quiet machine")
        if best.alpha < 0.55:
            reasons.append(f"acceptance α = {best.alpha:.2f} is below the ~0.55-0.6 where speculation pays")
        if best.c > 0.3:
            reasons.append(f"the draft costs c = {best.c:.2f} of a target step: use a smaller or more quantized "
                           f"draft (int4), or a shallower one on GPUs")
        if best.mean_new_tokens < 16:
            reasons.append(f"responses are short ({best.mean_new_tokens:.0f} tokens): time to first token "
                           f"dominates and drafting cannot amortise")
        reasons = reasons or [f"measured speedup below {PAYS}x at every k tried"]
    # bench names a configuration DRAFTER-kK or adaptive-DRAFTER
    first, last = config.split("-")[0], config.rsplit("-", 1)[-1]
    choice = Choice(k=best.best_k, speculative=pays, draft_bundle=best.bundle, config=config,
                    drafter=last if first == "adaptive" else first, adaptive=first == "adaptive",
                    expected_speedup=best.best_speedup, alpha=best.alpha, c=best.c,
                    written_to=best.bundle if pays else str(bundle))
    return TuneReport(choice=choice, reasons=reasons, evaluated=evaluated)


def write_choice(choice: Choice) -> None:
    tuned = {k: getattr(choice, k) for k in ("k", "speculative", "config", "expected_speedup", "alpha", "c")}
    write_defaults(Path(choice.written_to), {k: getattr(choice, k) for k in ("k", "speculative", "drafter", "adaptive")}
                   | {"tuned": tuned})


def write_defaults(bundle: Path, defaults: dict) -> None:
    """Replace the manifest's defaults atomically (the manifest is not among the hashed files)."""
    m = load_manifest(bundle, verify=True)
    m = dataclasses.replace(m, defaults={**m.defaults, **defaults})
    with atomic_path(Path(bundle) / MANIFEST) as tmp:
        tmp.write_text(m.to_json())
