"""The adaptive k policy on synthetic rounds: deterministic acceptance profiles and cost curves, no models."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from specedge.runtime.errors import InvalidArgument
from specedge.runtime.kpolicy import KPolicy

T1 = 0.010  # seconds per target step


def verify_s(k: int, slope: float = 0.05) -> float:
    return T1 * (1 + slope * k)          # a verify pass over k + 1 tokens


def run(policy: KPolicy, drafter: str, accept, rounds: int, c: float, limit: int = 8) -> list[int]:
    """Drive the policy: accept(i) says whether draft position i (0-based) of a round would be accepted."""
    ks = []
    for r in range(rounds):
        k = policy.choose(drafter, limit)
        n = 0
        while n < k and accept(r, n):
            n += 1
        policy.observe(drafter, k, n, draft_s=k * c * T1, verify_s=verify_s(k))
        ks.append(k)
    return ks


def test_never_right_stops_drafting_and_probes_later():
    p = KPolicy(k_max=8, probe_every=10)
    ks = run(p, "model", lambda r, i: False, 200, c=0.05)
    late = ks[50:]
    assert late.count(0) >= 0.85 * len(late)              # a plain step almost every round
    assert 0 < sum(k > 0 for k in late) <= len(late) // 10 + 1   # and a probe every probe_every rounds
    assert all(k <= p.probe_k for k in late)


def test_always_right_with_cheap_drafts_drafts_long():
    p = KPolicy(k_max=16)
    ks = run(p, "lookup", lambda r, i: True, 60, c=0.0, limit=16)
    assert ks[-1] == 16 and p.acceptance("lookup", 4)[0] > 0.95


def test_expensive_drafts_draft_less_than_free_ones():
    free, costly = KPolicy(k_max=8), KPolicy(k_max=8)
    rng = np.random.default_rng(0)
    draws = rng.random((300, 8))
    run(free, "lookup", lambda r, i: draws[r, i] < 0.7, 300, c=0.0)
    run(costly, "model", lambda r, i: draws[r, i] < 0.7, 300, c=0.3)
    assert costly.choose("model", 8) < free.choose("lookup", 8)


def test_converges_on_a_synthetic_acceptance_profile():
    """Acceptance falling with position (0.9, 0.8, 0.7, ...): the estimates approach it and the choice is the k
    that maximises the true tokens per unit time."""
    true = [max(0.05, 0.9 - 0.1 * i) for i in range(8)]
    rng = np.random.default_rng(1)
    draws = rng.random((3000, 8))
    p = KPolicy(k_max=8, decay=0.99)
    ks = run(p, "model", lambda r, i: draws[r, i] < true[i], 3000, c=0.05)

    def true_rate(k):
        e = 1 + sum(np.prod(true[: i + 1]) for i in range(k))
        return e / (1 + 0.05 * k + 0.05 * k)

    best = max(range(9), key=true_rate)
    est = p.acceptance("model", 3)
    np.testing.assert_allclose(est, true[:3], atol=0.08)
    assert abs(np.median(ks[-500:]) - best) <= 1
    assert p.verify_cost(best + 1) == pytest.approx(1 + 0.05 * best, rel=1e-6)
    assert p.draft_step_cost("model") == pytest.approx(0.05, rel=1e-6)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 12), st.lists(st.tuples(st.integers(0, 12), st.floats(0, 1)), max_size=30),
       st.integers(-3, 20))
def test_never_exceeds_the_limit_or_k_max(k_max, rounds, limit):
    p = KPolicy(k_max=k_max, probe_every=3)
    for k, frac in rounds:
        k = min(k, k_max)
        p.observe("model", k, int(frac * k), draft_s=1e-4 * k, verify_s=verify_s(k))
        assert 0 <= p.choose("model", limit) <= max(0, min(limit, k_max))


def test_a_preempted_round_does_not_move_the_choice():
    p = KPolicy(k_max=8)
    pattern = lambda r, i: (r * 7 + i * 3) % 5 < 3  # noqa: E731
    run(p, "model", pattern, 100, c=0.05)
    k = p.choose("model", 8)
    p.observe("model", k, 1, draft_s=k * 0.05 * T1, verify_s=50 * verify_s(k))   # another process ran meanwhile
    assert p.choose("model", 8) == k


def test_a_rarely_timed_width_does_not_skew_the_cost_curve():
    p = KPolicy(k_max=8)
    for _ in range(16):
        p.observe("model", 4, 2, draft_s=4e-4, verify_s=verify_s(4))
        p.observe("model", 2, 1, draft_s=2e-4, verify_s=verify_s(2))
    p.observe("model", 0, 0, draft_s=0.0, verify_s=3 * T1)   # the one plain step, slowed by another process
    assert p.verify_cost(5) == pytest.approx(1.2) and p.draft_step_cost("model") == pytest.approx(0.01)


def test_timings_of_a_busy_spell_age_out():
    p = KPolicy(k_max=8)
    for _ in range(32):
        p.observe("model", 4, 2, draft_s=4e-4, verify_s=10 * verify_s(4))   # the machine was busy
    for _ in range(16):
        p.observe("model", 2, 1, draft_s=2e-4, verify_s=verify_s(2))
        p.observe("model", 4, 2, draft_s=4e-4, verify_s=verify_s(4))
    assert p.verify_cost(5) == pytest.approx(1.2)


def test_same_observations_same_choices():
    a, b = KPolicy(k_max=8), KPolicy(k_max=8)
    pattern = lambda r, i: (r * 7 + i * 3) % 5 < 3  # noqa: E731
    assert run(a, "model", pattern, 100, c=0.05) == run(b, "model", pattern, 100, c=0.05)


def test_bad_settings():
    with pytest.raises(InvalidArgument, match="k_max"):
        KPolicy(k_max=-1)
    with pytest.raises(InvalidArgument, match="decay"):
        KPolicy(k_max=4, decay=0.0)


def test_rates_are_expected_tokens_over_costs():
    p = KPolicy(k_max=8)
    run(p, "model", lambda r, i: (r + i) % 3 > 0, 50, c=0.05)
    e = p.expected_tokens("model", 8)
    assert e[0] == 1.0 and all(b > a for a, b in zip(e, e[1:]))
    want = [e[k] / (p.verify_cost(k + 1) + k * p.draft_step_cost("model")) for k in range(9)]
    assert p.rates("model", 8) == pytest.approx(want)


def _paying(read_s_per_token: float, reader: str = "draft") -> KPolicy:
    """A policy that has seen a model drafter pay (alpha 0.8, c 0.05) and reads priced at `read_s_per_token`."""
    p = KPolicy(k_max=8)
    rng = np.random.default_rng(2)
    draws = rng.random((100, 8))
    run(p, "model", lambda r, i: draws[r, i] < 0.8, 100, c=0.05)
    p.observe_read(reader, 100, 100 * read_s_per_token)
    return p


def test_a_catch_up_is_paid_only_where_the_rest_of_the_request_saves_more():
    p = _paying(T1 / 2)                        # a token read costs half a target step
    k = p.choose("model", 8)
    assert k > 0
    rates = p.rates("model", 8)
    saved_per_token = 1 / rates[0] - 1 / rates[k]
    left = 64
    worth = int(left * saved_per_token / 0.5)  # the longest catch-up those 64 tokens pay for
    assert p.choose("model", 8, unread=worth - 2, left=left) == k
    assert p.choose("model", 8, unread=worth + 2, left=left) == 0
    assert p.choose("model", 8, unread=400, left=2000) == k           # a long response pays for a long prompt
    assert p.choose("model", 8, unread=0, left=1) == k                 # nothing to read: the choice is unchanged


def test_the_draft_prices_its_reads_once_it_has_read():
    before = _paying(T1, reader="target")      # the target's prompt read: a step per token
    assert before.read_cost() == pytest.approx(1.0)
    before.observe_read("draft", 50, 50 * T1 / 10)
    assert before.read_cost() == pytest.approx(0.1)
    assert KPolicy(k_max=8).read_cost() == 0.0                          # nothing timed: nothing charged
    small = _paying(T1, reader="target")
    small.read_ratio = 0.05                                              # a draft 1/20 of the target's weights
    assert small.read_cost() == pytest.approx(0.05)
    before.observe_read("draft", 0, 0.0)                                # a round that read nothing says nothing
    assert before.read_cost() == pytest.approx(0.1)


def test_a_probe_that_would_read_too_much_waits_once_the_drafter_is_judged():
    first = KPolicy(k_max=8, probe_every=4)
    first.observe("model", 1, 0, draft_s=50 * T1, verify_s=verify_s(1))  # one slow first call: c = 50
    first.observe_read("draft", 10, 10 * T1)
    ks = [first.choose("model", 8, unread=20, left=100) for _ in range(8)]
    assert 0 < sum(k > 0 for k in ks) <= 2                                # one timing is not enough to stop probing
    p = KPolicy(k_max=8, probe_every=4)
    run(p, "model", lambda r, i: False, 40, c=0.05)                      # never right: plain steps and probes
    p.observe_read("draft", 10, 10 * T1)
    ks = [p.choose("model", 8, unread=20, left=100) for _ in range(12)]  # 20 steps > 5% of 100
    assert ks == [0] * 12
    ks = [p.choose("model", 8, unread=2, left=100) for _ in range(12)]   # 2 steps <= 5
    assert 0 < sum(k > 0 for k in ks) <= 3


def test_a_long_read_is_priced_by_its_tokens_not_by_the_overhead_of_short_ones():
    p = _paying(T1 / 100)                      # a 100-token read at a hundredth of a step per token
    for _ in range(10):                        # short catch-ups, each mostly a call's fixed overhead
        p.observe_read("draft", 3, T1 / 10)
    assert p.read_cost() < 0.02                # 130 tokens for 2 steps, not the short reads' 0.033 per token
