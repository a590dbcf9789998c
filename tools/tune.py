"""`spec-export tune`: predict from one measurement, verify the best predictions by measurement, write the choice.

With `--drafts`, each bundle (the same target with another draft or draft precision) is measured the same way. The
choice is written into the bundle that won, and only there: when another bundle's draft wins, the user is told to
use that bundle, whose manifest now carries the chosen k. When no bundle pays, plain decoding becomes the default
of the bundle the user tuned.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from ..export.distill import advice, bundle_card
from ..runtime.manifest import MANIFEST, load_manifest
from .bench import run_bench, tau

PAYS = 1.05   # a measured speedup below this is noise or a loss: plain decoding is simpler and as fast


def tune(bundle: Path, prompts: list[str], max_new_tokens: int = 128, candidates: tuple[Path, ...] = (),
         k_range: range = range(1, 9), progress=None) -> dict:
    """Pick the draft (bundle) and k that maximise measured tokens/s, write it, and return what was decided."""
    evaluated = [measure(b, prompts, max_new_tokens, k_range, progress) for b in (bundle, *candidates)]
    out = choose(Path(bundle), evaluated)
    write_choice(out["choice"])
    best = next(e for e in evaluated if e["bundle"] == out["choice"]["draft_bundle"])
    hint = advice(best["alpha"], best["c"], t=best["t"], card=bundle_card(Path(best["bundle"])))
    out["distill_hint"] = hint.reason if hint.distill else None
    return out


def measure(bundle: Path, prompts: list[str], max_new_tokens: int, k_range: range, progress=None) -> dict:
    """alpha and c at k = 4, the predicted speedup for every k in k_range, then the three best measured."""
    first = run_bench(bundle, prompts, max_new_tokens, ks=(4,), progress=progress)
    spec4 = next(r for r in first["results"] if r["name"] == "spec-k4")
    alpha = spec4["alpha"] or 0.0
    tn, d1 = first["step_ms"]["target"], first["step_ms"]["draft"][1]
    slope = (tn[5] - tn[1]) / 4  # t(n) beyond the measured k + 1 = 5 grows linearly with the measured slope
    predicted = {k: tau(alpha, k) * tn[1] / (k * d1 + tn.get(k + 1, tn[1] + slope * k)) for k in k_range}
    top = sorted(predicted, key=predicted.get, reverse=True)[:3]
    second = run_bench(bundle, prompts, max_new_tokens, ks=tuple(sorted(top)), progress=progress)
    measured = {r["k"]: r["speedup_vs_plain"] for r in second["results"] if r["name"].startswith("spec-")}
    best_k = max(measured, key=measured.get)
    return {"bundle": str(bundle), "alpha": alpha, "c": first["c"], "t": tn, "predicted": predicted,
            "measured": measured,
            "best_k": best_k, "best_speedup": measured[best_k],
            "plain_tokens_per_s": next(r["tokens_per_s"] for r in second["results"] if r["name"] == "plain"),
            "mean_new_tokens": second["results"][0]["new_tokens"] / len(prompts)}


def choose(bundle: Path, evaluated: list[dict]) -> dict:
    """The best bundle and k, or plain decoding with the reasons; `written_to` is the bundle whose defaults change."""
    best = max(evaluated, key=lambda e: e["best_speedup"])
    # Both must agree: a measured gain the timing model cannot explain from alpha and c (alpha 0 "winning" on a busy
    # machine) is noise, and recommending speculation on noise would make every request slower.
    predicted = best["predicted"].get(best["best_k"], 0.0)
    pays = best["best_speedup"] >= PAYS and predicted >= 1.0
    reasons = []
    if not pays:
        if best["best_speedup"] >= PAYS:
            reasons.append(f"the measured {best['best_speedup']:.2f}x at k={best['best_k']} is noise: α and c "
                           f"predict {predicted:.2f}x; measure with more prompts on a quiet machine")
        if best["alpha"] < 0.55:
            reasons.append(f"acceptance α = {best['alpha']:.2f} is below the ~0.55-0.6 where speculation pays")
        if best["c"] > 0.3:
            reasons.append(f"the draft costs c = {best['c']:.2f} of a target step: use a smaller or more quantized "
                           f"draft (int4), or a shallower one on GPUs")
        if best["mean_new_tokens"] < 16:
            reasons.append(f"responses are short ({best['mean_new_tokens']:.0f} tokens): time to first token "
                           f"dominates and drafting cannot amortise")
        reasons = reasons or [f"measured speedup below {PAYS}x at every k tried"]
    choice = {"k": best["best_k"], "speculative": pays, "draft_bundle": best["bundle"],
              "expected_speedup": best["best_speedup"], "alpha": best["alpha"], "c": best["c"],
              "written_to": best["bundle"] if pays else str(bundle)}
    return {"choice": choice, "reasons": reasons, "evaluated": evaluated}


def write_choice(choice: dict) -> None:
    tuned = {k: choice[k] for k in ("k", "speculative", "expected_speedup", "alpha", "c")}
    write_defaults(Path(choice["written_to"]), {"k": choice["k"], "speculative": choice["speculative"],
                                                "tuned": tuned})


def write_defaults(bundle: Path, defaults: dict) -> None:
    """Replace the manifest's defaults atomically (the manifest is not among the hashed files)."""
    m = load_manifest(bundle, verify=True)
    m = dataclasses.replace(m, defaults={**m.defaults, **defaults})
    tmp = Path(bundle) / (MANIFEST + ".tmp")
    tmp.write_text(m.to_json())
    os.replace(tmp, Path(bundle) / MANIFEST)
