"""The slow, obviously-correct oracle: no cache reuse, no rounds, no rollback.

Every new token recomputes the whole sequence from an empty cache, so nothing the fast path does (in-place KV,
rewinding, multi-token verification) can leak into the answer.
"""
from __future__ import annotations

import numpy as np

from .model import KVModel
from .sampling import distribution


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


def sequence_probability(model: KVModel, prompt: list[int], response: list[int], temperature: float,
                         top_k: int = 0, top_p: float = 1.0) -> float:
    """Probability that target-only sampling (processed as in the runtime) produces `response` after `prompt`."""
    prob, tokens = 1.0, list(prompt)
    for t in response:
        prob *= float(distribution(next_logits(model, tokens), temperature, top_k, top_p)[t])
        tokens.append(t)
    return prob
