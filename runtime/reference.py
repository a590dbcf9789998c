"""The slow, obviously-correct oracle: no cache reuse, no rounds, no rollback.

Every new token recomputes the whole sequence from an empty cache, so nothing the fast path does (in-place KV,
rewinding, multi-token verification) can leak into the answer.
"""
from __future__ import annotations

import numpy as np

from .model import KVModel


def next_logits(model: KVModel, tokens: list[int]) -> np.ndarray:
    """Logits [V] for the token after `tokens`, computed from scratch."""
    model.reset()
    return model.forward(tokens)[-1].copy()


def greedy(model: KVModel, prompt: list[int], max_new_tokens: int, eos: frozenset[int] = frozenset()) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_new_tokens):
        t = int(next_logits(model, tokens).argmax())
        if t in eos:
            break
        tokens.append(t)
    return tokens[len(prompt):]

