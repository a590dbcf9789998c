"""Drafters: anything that proposes k tokens and learns how many the target kept."""
from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

from .kv import KVModel
from .sampling import distribution, sample


class Drafter(Protocol):
    def propose(self, tokens: Sequence[int], k: int) -> tuple[np.ndarray, np.ndarray | None]:
        """k draft tokens continuing `tokens` and the k rows of the distribution they were drawn from
        ([k, V] float64; None for greedy drafting)."""

    def accepted(self, n: int) -> None:
        """The target kept the first n tokens of the last proposal; forget the rest."""


class ModelDrafter:
    """A small decoder with its own KV cache. Greedy when temperature == 0, else samples from the processed p."""

    def __init__(self, model: KVModel, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 rng: np.random.Generator | None = None):
        self.model, self.base = model, 0
        self.temperature, self.top_k, self.top_p, self.rng = temperature, top_k, top_p, rng

    def propose(self, tokens, k):
        m = self.model
        # Feed what the draft has not seen (last round's accepted tokens and the target's correction; the whole
        # prompt on a new request, minus any prefix it shares with the last one) in one step, then k-1 single steps.
        keep = m.reuse(tokens)
        self.base = len(tokens)
        if self.temperature == 0:  # greedy: ids only, chained on the device where the graph allows
            return m.greedy_chain(tokens[keep:], k), None
        out = m.forward(tokens[keep:])[-1]                                     # (V,) logits
        draft = np.empty(k, np.int64)                                          # (k,)
        probs = np.empty((k, len(out)))                                        # (k, V)
        for i in range(k):
            probs[i] = distribution(out, self.temperature, self.top_k, self.top_p)
            draft[i] = sample(probs[i], self.rng)
            if i + 1 < k:  # the last draft token is fed next round, and only if the target accepts it
                out = m.forward(draft[i : i + 1])[0]
        return draft, probs

    def accepted(self, n):
        # The cache holds tokens + draft[:k-1]; keep tokens + draft[:n]. Setting an integer is the whole rewind.
        self.model.rewind(min(self.model.pos, self.base + n))
