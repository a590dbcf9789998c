"""Pure accept/reject maths. Notation of gpt-fast and the issue: p = draft distribution, q = target distribution.

Both are the *processed* distributions (temperature, top-k, top-p applied identically to each), so the output of
`verify_sampled` follows exactly the processed target distribution (Leviathan et al. 2023, Chen et al. 2023).
"""
from __future__ import annotations

import numpy as np


def distribution(logits: np.ndarray, temperature: float, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """Softmax of logits [..., V] / temperature, restricted to the top-k and the top-p nucleus. Rows sum to 1."""
    z = logits.astype(np.float64) / temperature
    if top_k and top_k < z.shape[-1]:
        kth = np.partition(z, -top_k, axis=-1)[..., -top_k, None]
        z = np.where(z < kth, -np.inf, z)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    probs = z / z.sum(axis=-1, keepdims=True)
    if top_p < 1.0:
        order = np.argsort(-probs, axis=-1, kind="stable")
        sorted_p = np.take_along_axis(probs, order, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (the token crossing the threshold is kept)
        drop_sorted = np.cumsum(sorted_p, axis=-1) - sorted_p >= top_p
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        probs = np.where(drop, 0.0, probs)
        probs /= probs.sum(axis=-1, keepdims=True)
    return probs


def sample(probs: np.ndarray, rng: np.random.Generator) -> int:
    """One draw from a probability vector by inverse CDF (one uniform: reproducible for a seed)."""
    c = np.cumsum(probs)
    return int(min(np.searchsorted(c, rng.random() * c[-1], side="right"), len(c) - 1))


def same_width(*dists: np.ndarray) -> list[np.ndarray]:
    """Distributions [..., V_i] padded with zeros to the widest V: padded vocabularies (extra embedding rows) make a
    draft's rows and the target's differ in width, and the padding rows never hold mass."""
    w = max(d.shape[-1] for d in dists)
    return [d if d.shape[-1] == w else np.pad(d, [(0, 0)] * (d.ndim - 1) + [(0, w - d.shape[-1])]) for d in dists]


def verify_greedy(draft: np.ndarray, best: np.ndarray) -> tuple[int, int]:
    """draft [k] tokens, best [k+1] the target's argmax at the same positions and one past them. Accept the longest
    prefix equal to the target's choice.

    Returns (n accepted, next token): the target's argmax after the accepted prefix, which is the correction on a
    rejection and the bonus token when all k are accepted.
    """
    n = 0
    while n < len(draft) and draft[n] == best[n]:
        n += 1
    return n, int(best[n])


def verify_sampled(draft: np.ndarray, p: np.ndarray, q: np.ndarray, rng: np.random.Generator) -> tuple[int, int]:
    """Rejection sampling. draft [k] tokens drawn from p [k, V] (draft); q [k+1, V] (target) at the same positions.

    Token x_i is accepted with probability min(1, q_i(x)/p_i(x)); on the first rejection the next token is drawn from
    the residual normalise(max(0, q_i - p_i)), and when all k are accepted a bonus token is drawn from q_k.
    """
    for i, x in enumerate(draft):
        if rng.random() * p[i, x] < q[i, x]:       # q >= p: always accept; otherwise with probability q/p
            continue
        residual = np.maximum(q[i] - p[i], 0.0)    # p(x) > q(x) here, so q - p has positive mass elsewhere,
        return i, sample(residual if residual.sum() > 0 else q[i], rng)  # unless float rounding erased it
    return len(draft), sample(q[len(draft)], rng)
