"""Property tests of the accept/reject maths on random p (draft) and q (target) vectors."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from specedge.runtime.sampling import distribution, sample, verify_greedy, verify_sampled


def probs(v: int):
    return st.lists(st.one_of(st.just(0.0), st.floats(1e-6, 1.0)), min_size=v, max_size=v).filter(lambda x: sum(x) > 1e-3).map(
        lambda x: np.array(x) / sum(x))


class Script:
    """A generator of uniforms in a fixed order: lets a test drive each branch of verify_sampled."""

    def __init__(self, us):
        self.us = list(us)

    def random(self):
        return self.us.pop(0)


def exact_output_distribution(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """k = 1, first token: P(out = y), integrating verify_sampled over its uniforms (piecewise constant in u)."""
    v = len(q)
    out = np.zeros(v)
    for x in range(v):
        if p[x] == 0:
            continue
        accept = min(1.0, q[x] / p[x])
        out[x] += p[x] * accept
        if accept < 1:
            residual = np.maximum(q - p, 0)
            out += p[x] * (1 - accept) * residual / residual.sum()
    return out


def reduced_vocab_probs(v: int):
    """A draft with a reduced vocabulary: logits -inf outside a subset (as its graph emits them), so p is zero there
    while q usually is not; the residual must supply the tokens the draft cannot propose."""
    return st.tuples(st.lists(st.floats(-4.0, 4.0), min_size=v, max_size=v),
                     st.lists(st.booleans(), min_size=v, max_size=v).filter(any)).map(
        lambda lk: distribution(np.where(lk[1], lk[0], -np.inf), 1.0))


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 6).flatmap(lambda v: st.tuples(st.one_of(probs(v), reduced_vocab_probs(v)), probs(v))))
def test_residual_maths_recovers_target(pq):
    p, q = pq
    np.testing.assert_allclose(exact_output_distribution(p, q), q, atol=1e-9)


@settings(max_examples=300, deadline=None)
@given(st.integers(2, 6).flatmap(lambda v: st.tuples(probs(v), probs(v), st.integers(0, v - 1))),
       st.floats(0.0, 0.999999), st.floats(0.0, 0.999999))
def test_branch_taken_matches_rule(pqx, u, w):
    """accept iff u < q(x)/p(x); a rejection resamples a token where q > p, at the inverse CDF of the residual."""
    p, q, x = pqx
    if p[x] == 0:
        return
    draft, P, Q = np.array([x]), p[None], np.stack([q, q])
    n, nxt = verify_sampled(draft, P, Q, Script([u, w]))
    if u < q[x] / p[x]:
        assert n == 1 and nxt == sample(q, Script([w]))                  # bonus token from q
    else:
        residual = np.maximum(q - p, 0)
        assert n == 0 and residual[nxt] > 0 and nxt == sample(residual, Script([w]))


@settings(max_examples=15, deadline=None)
@given(st.integers(2, 4).flatmap(lambda v: st.tuples(st.one_of(probs(v), reduced_vocab_probs(v)), probs(v))),
       st.integers(0, 2**32 - 1))
def test_monte_carlo_output_follows_q(pq, seed):
    """End to end with a real generator: draft from p, verify, compare the first output token's law with q."""
    from scipy.stats import chisquare

    p, q = pq
    rng = np.random.default_rng(seed)
    n = 4000
    counts = np.zeros(len(q))
    for _ in range(n):
        x = sample(p, rng)
        _, nxt = verify_sampled(np.array([x]), p[None], np.stack([q, q]), rng)
        counts[x if _ == 1 else nxt] += 1
    keep = q > 0
    assert counts[~keep].sum() == 0
    if keep.sum() > 1:
        assert chisquare(counts[keep], q[keep] / q[keep].sum() * n).pvalue > 1e-4


@given(st.lists(st.integers(0, 4), min_size=1, max_size=6), st.integers(0, 2**31))
def test_greedy_accepts_longest_matching_prefix(draft, seed):
    best = np.random.default_rng(seed).integers(0, 5, size=len(draft) + 1)
    n, nxt = verify_greedy(np.array(draft), best)
    assert list(draft[:n]) == list(best[:n]) and (n == len(draft) or draft[n] != best[n]) and nxt == best[n]


@given(st.integers(0, 2**31), st.floats(0.1, 3.0), st.integers(0, 8), st.floats(0.05, 1.0))
def test_distribution_is_a_restricted_softmax(seed, temperature, top_k, top_p):
    logits = np.random.default_rng(seed).normal(size=(3, 8)) * 3
    d = distribution(logits, temperature, top_k, top_p)
    np.testing.assert_allclose(d.sum(-1), 1.0)
    assert (d >= 0).all()
    kept = (d > 0).sum(-1)
    if top_k:
        assert (kept <= top_k).all()
    # the nucleus is the smallest prefix by probability that reaches top_p, under the top-k softmax
    base = distribution(logits, temperature, top_k)
    for row, b in zip(d, base):
        order = np.argsort(-b, kind="stable")
        need = int(np.searchsorted(np.cumsum(b[order]), top_p - 1e-12) + 1)
        if top_p == 1.0:   # off: every token stays, also those a float cumsum reaches 1 - 1e-12 without
            need = (b > 0).sum()
        assert (row > 0).sum() == min(need, (b > 0).sum())
        assert row.argmax() == b.argmax()


def test_reduced_vocabulary_draft_reaches_tokens_outside_its_subset():
    """p = 0 on half the vocabulary: those tokens still come out with exactly their q, through the residual."""
    p = distribution(np.array([1.0, 0.5, -np.inf, -np.inf]), 1.0)
    q = np.array([0.1, 0.2, 0.3, 0.4])
    assert p[2] == p[3] == 0
    np.testing.assert_allclose(exact_output_distribution(p, q), q, atol=1e-12)


def test_same_width_pads_the_narrower_with_zeros():
    from specedge.runtime.sampling import same_width

    p, q = np.full((2, 3), 1 / 3), np.full((3, 5), 0.2)
    a, b = same_width(p, q)
    assert a.shape == (2, 5) and b is q and np.array_equal(a[:, 3:], np.zeros((2, 2))) and np.allclose(a.sum(1), 1)
    e, _ = same_width(np.zeros((0, 0)), q)          # a plain step: no draft rows
    assert e.shape == (0, 5)
