"""The distill card: what a distilled draft records about itself (distill_card.json and .md, loss.png), reading it
back from a bundle, and tune's hint built on it: would distilling pay?

Light on purpose (no torch, no numpy): the export, `tune` and the CLI's option defaults read it without loading the
trainer.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..runtime.stats import predicted_speedup

DISTILL_CARD = "distill_card.json"   # in the draft folder, and copied by export into BUNDLE/draft/
KS = tuple(range(1, 9))              # alpha is reported for k = 1..8
KL_WEIGHT = 1.0                 # the recipe's default KL share of the loss. A draft's job is to agree with its target:
                                # on text the target was not trained on, cross-entropy pulls the draft toward the text
                                # and away from the target (benchmarks/domain_adapt.py: a 0.5 mix lowered alpha by 14
                                # points)


def write_card(folder: Path, card: dict, log: list[dict], evals: list[dict]) -> dict:
    """distill_card.json (the card and the loss log), distill_card.md and, with matplotlib, loss.png into `folder`.
    Returns the card as written, without the log."""
    note = _plot(log, evals, folder / "loss.png")
    card = {**card, "loss_curve": "loss.png" if note is None else note}
    (folder / DISTILL_CARD).write_text(json.dumps({**card, "log": log}, indent=1))
    (folder / "distill_card.md").write_text(card_markdown(card))
    return card


def bundle_card(bundle: Path) -> dict | None:
    """The distill card a bundle's draft was exported with (None for a draft that was not distilled)."""
    f = Path(bundle) / "draft" / DISTILL_CARD
    return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else None


def _plot(log: list[dict], evals: list[dict], path: Path) -> str | None:
    try:
        import matplotlib
    except ImportError:
        return "no plot: matplotlib is not installed (pip install 'specedge[bench]')"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    steps = [r["step"] for r in log]
    for key in ("loss", "ce", "kl"):
        a1.plot(steps, [r[key] for r in log], label=key, lw=0.8)
    a1.set(xlabel="step", ylabel="nats/token", title="training loss")
    a1.legend()
    a2.plot([e["step"] for e in evals], [e["alpha_k4"] for e in evals], "o-")
    a2.set(xlabel="step", ylabel="alpha (k = 4)", title="held-out alpha")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def card_markdown(card: dict) -> str:
    c, b, a = card["corpus"], card["before"], card["after"]
    rows = "\n".join(f"| {k} | {b['alpha'][k]:.3f} | {a['alpha'][k]:.3f} |" for k in KS)
    src = card["source"]
    how = f"continued from {src['draft']}" if "draft" in src else f"carved from the target's layers {src['from_target']}"
    return f"""# Distilled draft

Draft for `{card['target']}`, {how}; {card['parameters'] / 1e6:.2f}M parameters, {card['num_hidden_layers']} layers.

- corpus: {c['documents']} documents, {c['bytes']:,} bytes, sha256 `{c['sha256'][:16]}`; {c['train_tokens']:,} training \
tokens, {c['held_out_documents']} documents ({c['held_out_tokens']:,} tokens) held out
- trained: {card['steps']} steps, {card['tokens_seen']:,} tokens seen in {card['train_seconds']:.0f} s \
({card['tokens_per_s']:.0f} tokens/s) on {card['device']['type']} ({card['device'].get('gpu') or card['device']['cpu']})
- loss: {card['recipe']['loss']}, kl_weight {card['recipe']['kl_weight']}, lr {card['recipe']['lr']}, batch \
{card['recipe']['batch']} x {card['recipe']['seq_len']}, seed {card['recipe']['seed']}
- held out: KL(target || draft) {b['kl']:.3f} -> {a['kl']:.3f}, greedy agreement {b['agreement']:.3f} -> \
{a['agreement']:.3f}
- alpha: {card['alpha_estimator']}

| k | alpha before | alpha after |
|---|---|---|
{rows}
"""


# -- tune's hint: would distilling pay? (no torch) ---------------------------------------------------------------------
@dataclass(frozen=True)
class Advice:
    distill: bool
    reason: str
    alpha_needed: float | None        # the alpha at which the cost model predicts a gain (best k), None if none does
    predicted_speedup: float          # at the measured alpha, best k
    predicted_speedup_after: float    # at alpha + TYPICAL_GAIN (what distilling usually adds)


TYPICAL_GAIN = 0.08   # distilling on the user's domain: +5..10 points of alpha in practice, +11 on the demo pair
MIN_GAIN = 1.05       # the speedup below which speculation is not worth having (tune's threshold)
CARD_DROP = 0.05      # alpha on the user's prompts this far below the card's: the traffic is not the corpus


def advice(alpha: float, c: float, t: dict[int, float] | None = None, card: dict | None = None,
           ks: tuple[int, ...] = KS) -> Advice:
    """Would `spec-export distill` pay for this draft? Yes when the measured alpha is below the level where the
    cost model predicts a gain (and a typical distillation gain would reach it or improve the speedup), or when alpha
    on the user's prompts is CARD_DROP below what the draft's distill card recorded."""
    best = lambda a: max(predicted_speedup(a, k, c, t) for k in ks)  # noqa: E731
    now, after = best(alpha), best(min(alpha + TYPICAL_GAIN, 0.99))
    needed = next((a / 100 for a in range(0, 100) if best(a / 100) >= MIN_GAIN), None)
    cmd = "spec-export distill --target TARGET --draft DRAFT --corpus YOUR_TEXT --out DRAFT-distilled"
    if needed is not None and alpha < needed:
        gain = "reach" if after >= MIN_GAIN else "approach"
        return Advice(True, f"alpha {alpha:.2f} is below {needed:.2f}, where the cost model (c = {c:.3f}) predicts a "
                            f"gain; distilling on your own text (+{TYPICAL_GAIN:.2f} alpha is typical) would {gain} "
                            f"it (predicted {now:.2f}x -> {after:.2f}x): {cmd}", needed, now, after)
    if card:
        alphas = card.get("after", {}).get("alpha", {})
        k_best = max(ks, key=lambda k: predicted_speedup(alpha, k, c, t))
        recorded = alphas.get(k_best, alphas.get(str(k_best)))
        if recorded is not None and alpha < recorded - CARD_DROP:
            return Advice(True, f"alpha on your prompts ({alpha:.2f} at k = {k_best}) is {recorded - alpha:.2f} below "
                                f"the {recorded:.2f} recorded in the draft's distill card: your traffic differs from "
                                f"its distillation corpus; distill it on your own text: {cmd}", needed, now, after)
    if needed is None:
        return Advice(False, f"the draft costs too much (c = {c:.3f}): no alpha makes speculation pay; distilling "
                             f"cannot help, a smaller or more quantized draft can", None, now, after)
    return Advice(False, f"alpha {alpha:.2f} is above {needed:.2f}, where speculation starts to pay; distilling "
                         f"would still add about {after / now - 1:.0%} (predicted {now:.2f}x -> {after:.2f}x)",
                  needed, now, after)
