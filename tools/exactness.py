"""Is a greedy output that parts from plain decoding a near-tie or a break?

Speculative decoding scores a token inside an n-token verify pass, plain decoding in a one-token step. The logits
are the same mathematically, but each pass rounds its own way: on an H100 the fp16 kernels for n = 1 and n > 1 gave
the same position logits 0.0039 apart, one fp16 step. Where the target's two best logits are equal or closer than
that, greedy argmax follows the rounding, and plain decoding itself has no stable answer there.

The rule, stated once: recompute the target's logits at the parting position from a fresh cache (the whole prefix
in one pass, `reference.next_logits`). The parting is a *near-tie* when the tokens both sides chose are each within
`tolerance(best logit, dtype)` of the best logit (dtype: the graph's logits', the last rounding a pass makes);
anything else is a *break* (a bug, or a peer that stops differently). The tolerance is
  * float16 logits: two fp16 steps at the best logit's magnitude, 2 * np.spacing(np.float16(|x|)): one step of
    rounding in each of the two passes being compared;
  * float32 logits: 1e-5 * max(1, |x|): an n-token and a one-token fp32 pass differ by about 1e-6 (their sums are
    accumulated in another order).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..runtime.kv import KVModel
from ..runtime.reference import next_logits


def tolerance(logit: float, dtype: str) -> float:
    """How far apart two logits can be and still count as tied under the graph's arithmetic (see the module doc)."""
    if dtype == "float16":
        return 2 * float(np.spacing(np.float16(abs(logit))))
    return 1e-5 * max(1.0, abs(logit))


@dataclass(frozen=True)
class Parting:
    """Where a greedy response parts from plain decoding's, and whether that is a near-tie or a break."""
    position: int                   # index in the response
    tokens: list[int | None]        # [plain's, the other's] token there (a response that stopped chose an EOS)
    margin: float | None            # how far the less likely of the two is below the best logit
    tolerance: float                # tolerance(best logit, dtype)
    kind: str                       # "near-tie" or "break"
    config: str | None = None       # bench: the configuration that parted, and the prompt's index
    prompt: int | None = None


def classify(model: KVModel, prompt: list[int], plain: list[int], other: list[int], dtype: str,
             eos: frozenset[int] = frozenset()) -> Parting:
    """`plain` and `other` are two greedy responses to `prompt` that differ: where and how they part.
    Leaves `model`'s cache reset."""
    j = next((i for i, (a, b) in enumerate(zip(plain, other)) if a != b), min(len(plain), len(other)))
    assert j < max(len(plain), len(other)), "the responses do not differ"
    logits = next_logits(model, list(prompt) + list(plain[:j]))              # (V,) from an empty cache
    model.reset()
    best = float(logits.max())

    def chosen(response):
        if j < len(response):
            return int(response[j])
        return max(eos, key=lambda t: logits[t]) if eos else None          # it stopped: on its likeliest EOS

    tokens = [chosen(plain), chosen(other)]
    # None: a response stopped without an EOS (a peer's own limit), which no tie explains
    margin = None if None in tokens else max(best - float(logits[t]) for t in tokens)
    tol = tolerance(best, dtype)
    return Parting(j, tokens, margin, tol, "near-tie" if margin is not None and margin <= tol else "break")
