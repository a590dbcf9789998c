"""Prompt lookup and hybrid drafting: the index against a brute-force oracle, its cost per round, the one-hot
acceptance maths, and exactness through the real loop (greedy equals plain decoding; sampling follows the target)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_runtime import PROMPTS, _support, target_model
from test_sampling import Script, exact_output_distribution, probs

from specedge.runtime import Engine, GenerationConfig
from specedge.runtime import reference
from specedge.runtime.drafter import ModelDrafter
from specedge.runtime.errors import InvalidArgument
from specedge.runtime.lookup import HybridDrafter, LookupDrafter
from specedge.runtime.sampling import sample, verify_sampled

tokens_st = st.lists(st.integers(0, 3), max_size=40)   # a small alphabet: many repeats, many ties
sizes_st = st.tuples(st.integers(1, 4), st.integers(1, 4)).map(sorted)


def brute_force(tokens: list[int], min_ngram: int, max_ngram: int) -> tuple[int, int]:
    """The longest suffix (n <= max_ngram) with an earlier occurrence, and the end of its most recent one."""
    L = len(tokens)
    for n in range(min(max_ngram, L - 1), min_ngram - 1, -1):
        ends = [e for e in range(n, L) if tokens[e - n : e] == tokens[L - n :]]
        if ends:
            return n, max(ends)
    return 0, -1


def copy_after(tokens: list[int], end: int, k: int) -> list[int]:
    """What follows the occurrence, continued by the copy itself once it reaches the end of `tokens`."""
    ext = list(tokens)
    for i in range(k):
        ext.append(ext[end + i])
    return ext[len(tokens):]


@settings(max_examples=200, deadline=None)
@given(tokens_st, sizes_st, st.integers(1, 6))
def test_match_is_the_most_recent_occurrence_of_the_longest_suffix(tokens, sizes, k):
    lo, hi = sizes
    d = LookupDrafter(4, max_ngram=hi, min_ngram=lo)
    grown: list[int] = []  # the same list growing, as the generator's is: only the new tail is indexed
    for t in tokens:
        grown.append(t)
        n, end = brute_force(grown, lo, hi)
        assert d.find(grown) == (n, end)
        draft, p = (prop := d.propose(grown, k)).tokens, prop.p
        assert p is None and draft.dtype == np.int64 and prop.source == d.lead(grown) == "lookup"
        assert draft.tolist() == (copy_after(grown, end, k) if n else [])


@settings(max_examples=100, deadline=None)
@given(tokens_st, st.lists(st.integers(1, 5), max_size=10), st.integers(1, 4))
def test_incremental_index_equals_a_rebuild(tokens, chunks, hi):
    d = LookupDrafter(4, max_ngram=hi)
    seen: list[int] = []
    i = 0
    for size in chunks + [len(tokens)]:
        seen += tokens[i : i + size]
        i += size
        d.find(seen)
    fresh = LookupDrafter(4, max_ngram=hi)
    fresh.find(list(tokens))
    assert d.index == fresh.index and d.seq == fresh.seq == tokens


@settings(max_examples=100, deadline=None)
@given(tokens_st, tokens_st, st.integers(0, 40), st.booleans())
def test_a_changed_prefix_rebuilds_from_the_common_part(a, b, cut, same_list):
    """A new request (another list) or a list cut back and regrown in place (an edit): the index is the new one's."""
    d = LookupDrafter(4, max_ngram=3)
    tokens = list(a)
    d.find(tokens)
    if same_list:
        tokens[cut:] = b
    else:
        tokens = a[:cut] + b
    d.find(tokens)
    fresh = LookupDrafter(4, max_ngram=3)
    fresh.find(a[:cut] + b)
    assert d.index == fresh.index and d.seq == fresh.seq == a[:cut] + b


def test_work_per_round_depends_on_new_tokens_only():
    rng = np.random.default_rng(0)
    for length in (100, 10_000):
        d = LookupDrafter(64, max_ngram=3)
        tokens = rng.integers(0, 64, length).tolist()
        d.propose(tokens, 4)
        before = d.ops
        for _ in range(20):           # rounds committing 1..5 tokens each
            tokens += rng.integers(0, 64, 1 + _ % 5).tolist()
            d.propose(tokens, 4)
            d.accepted(2)
        assert d.ops - before == 3 * sum(1 + i % 5 for i in range(20))


def test_proposals_are_one_hot_when_sampling_and_may_be_short():
    d = LookupDrafter(10, temperature=0.8)
    prop = d.propose([1, 2, 3, 4, 1, 2], 4)
    draft, p = prop.tokens, prop.p
    assert draft.tolist() == [3, 4, 1, 2] and p.shape == (4, 10)
    np.testing.assert_array_equal(p, np.eye(10)[draft])
    prop = d.propose([1, 2, 3, 4, 1, 2, 3, 4, 5], 4)   # "5" never occurred before
    assert prop.tokens.shape == (0,) and prop.p.shape == (0, 10)
    assert LookupDrafter(10, min_ngram=2).propose([7, 1, 5, 1], 3).tokens.size == 0  # only a 1-gram matches
    with pytest.raises(InvalidArgument, match="min_ngram"):
        LookupDrafter(10, max_ngram=2, min_ngram=3)


def test_hybrid_without_a_draft_model_is_lookup():
    """A bundle exported with the target alone still speculates, by lookup (any match length leads)."""
    tokens = [1, 2, 3, 4, 1, 2, 9, 9, 4]
    h, d = HybridDrafter(LookupDrafter(10, 0.7), None), LookupDrafter(10, 0.7)
    for n in range(1, len(tokens) + 1):
        a, b = h.propose(tokens[:n], 3), d.propose(tokens[:n], 3)
        assert a.tokens.tolist() == b.tokens.tolist() and np.array_equal(a.p, b.p) and h.lead(tokens[:n]) == "lookup"
        assert not h.reads_prompt and h.unread(tokens[:n]) == 0 and a.source == "lookup"
        h.accepted(0)


# -- one-hot p: accept with q(x), resample from q without x -------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(st.integers(2, 6).flatmap(lambda v: st.tuples(probs(v), st.integers(0, v - 1))))
def test_one_hot_draft_recovers_target(qx):
    q, x = qx
    p = np.eye(len(q))[x]
    np.testing.assert_allclose(exact_output_distribution(p, q), q, atol=1e-9)


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 6).flatmap(lambda v: st.tuples(probs(v), st.integers(0, v - 1))),
       st.floats(0.0, 0.999999), st.floats(0.0, 0.999999))
def test_one_hot_branch_is_accept_with_q_else_q_without_x(qx, u, w):
    q, x = qx
    n, nxt = verify_sampled(np.array([x]), np.eye(len(q))[x][None], np.stack([q, q]), Script([u, w]))
    if u < q[x]:
        assert n == 1 and nxt == sample(q, Script([w]))
    else:
        rest = np.where(np.arange(len(q)) == x, 0.0, q)
        assert n == 0 and nxt != x and nxt == sample(rest / rest.sum(), Script([w]))


@settings(max_examples=200, deadline=None)
@given(st.integers(3, 6).flatmap(lambda v: st.tuples(probs(v), probs(v), st.lists(st.booleans(), min_size=v,
                                                                                      max_size=v))))
def test_reduced_support_draft_recovers_target(pqm):
    """p that puts no mass where q has some (a top-k draft, a one-hot row mixed with a model's): still exact."""
    p, q, keep = pqm
    p = np.where(keep, p, 0.0)
    if p.sum() == 0:
        return
    p = p / p.sum()
    if np.maximum(q - p, 0).sum() < 1e-12:  # p == q up to rounding: the helper's residual would be 0/0
        np.testing.assert_allclose(p, q, atol=1e-12)
        return
    np.testing.assert_allclose(exact_output_distribution(p, q), q, atol=1e-9)


# -- through the real loop ------------------------------------------------------------------------------------------
REPETITIVE = "def add(a, b):\n    return a + b\n\n\ndef add(a, b):\n    return a + b\n\n\ndef add(a,"


@pytest.fixture(scope="module")
def llama(bundles):
    return Engine(bundles("llama"))


def lookup_drafter(engine, c, rng):
    return LookupDrafter(engine.manifest.target.vocab_size, c.temperature)


def hybrid_drafter(engine, c, rng, **lookup_options):
    return HybridDrafter(LookupDrafter(engine.manifest.target.vocab_size, c.temperature, **lookup_options),
                         ModelDrafter(engine.draft, c, rng), min_match=1 if lookup_options else 2)


def topup_drafter(engine, c, rng):
    """Lookup stopping where its match ends, any match leading: most rounds mix looked-up and model tokens."""
    return hybrid_drafter(engine, c, rng, repeat=False)


@pytest.mark.parametrize("make", [lookup_drafter, hybrid_drafter, topup_drafter])
def test_greedy_equals_plain_decoding(llama, make):
    oracle = target_model(llama)
    matched = 0
    for prompt in PROMPTS + [REPETITIVE]:
        ids = llama.encode(prompt)
        ref = reference.greedy(oracle, ids, 40, llama.eos)
        for k in (1, 2, 4, 8):
            c = GenerationConfig(max_new_tokens=40, k=k, adaptive=False)
            r = llama.generate(prompt, c, custom_drafter=make(llama, c, np.random.default_rng(0)))
            assert r.token_ids == ref, (make.__name__, prompt, k)
            s = r.stats
            assert s.accepted <= s.drafted and sum(s.accept_hist) + s.rounds_plain == s.rounds
            matched += s.accepted
    # random weights rarely repeat 2 tokens of the prompt: the hybrid's lookup path is checked in the next test
    assert matched > 0 or make is hybrid_drafter, "lookup never drafted a kept token: the test exercises nothing"


@pytest.mark.parametrize("make", [hybrid_drafter, topup_drafter])
def test_hybrid_keeps_the_draft_cache_consistent(llama, make):
    """After every round the model drafted in, its cache holds a prefix of the committed tokens (what a fresh run
    holds), also when looked-up tokens before the model's were rejected; rounds drafted by lookup alone leave it
    alone (the next model proposal feeds what it has not seen)."""
    c = GenerationConfig(max_new_tokens=40, k=6, adaptive=False)
    paths = set()
    for prompt in (REPETITIVE, "0, 0, 0, 0, 0, 0, 0,"):   # the second repeats with a period shorter than k
        h = make(llama, c, np.random.default_rng(0))
        g = llama.generator(prompt, c, custom_drafter=h)
        while not g.finish_reason:
            g._advance()
            m, used = h.last
            paths.add("lookup" if not used else "model" if not m else "topped up")
            d = llama.draft
            if used:
                assert d.pos <= len(g.tokens) and d.seen[: d.pos] == g.tokens[: d.pos]
    assert paths >= ({"lookup", "model"} if make is hybrid_drafter else {"topped up"}), paths


@pytest.mark.parametrize("make", [lookup_drafter, hybrid_drafter, topup_drafter])
def test_sampling_follows_target_distribution(llama, make):
    """As test_runtime's: 3-token generations against the exact target-only distribution, here after a prompt whose
    tail repeats, so that lookup proposes (one-hot p: accepted with q(x), else resampled from q without x)."""
    from scipy.stats import chisquare

    ids = llama.encode("x = 1\nx = 1\nx =")
    cfg = dict(max_new_tokens=3, temperature=1.5, top_k=3)
    support = _support(target_model(llama), ids, cfg, llama.eos)
    n = 1500
    results = []
    for seed in range(n):   # the drafter's own rng: its draws need only be independent of the verifier's
        c = GenerationConfig(seed=seed, k=2, adaptive=False, **cfg)
        results.append(llama.generate(ids, c, custom_drafter=make(llama, c, np.random.default_rng(n + seed))))
    assert sum(r.stats.drafted for r in results) > n // 2, "lookup should propose after a repeated tail"
    seqs = [tuple(r.token_ids) for r in results]
    assert set(seqs) <= set(support), "generated a sequence the target cannot produce"
    observed = np.array([seqs.count(s) for s in support], float)
    expected = np.array(list(support.values())) * n
    assert chisquare(observed, expected).pvalue > 1e-3, (observed, expected)


def test_transformers_prompt_lookup_peer_matches_plain_decoding(llama, checkpoints):
    from specedge.tools.peers import HFPromptLookup

    peer = HFPromptLookup(checkpoints("llama")[0], k=4, eos_token_ids=sorted(llama.eos))
    try:
        for prompt in (PROMPTS[1], REPETITIVE):
            ids = llama.encode(prompt)
            run = peer.generate(ids, 24)
            assert run.token_ids == llama.generate(ids, max_new_tokens=24, speculative=False).token_ids
            assert len(run.token_ms) == len(run.token_ids) - 1
    finally:
        peer.close()


@pytest.mark.parametrize("drafter", ["model", "lookup", "hybrid"])
def test_every_drafter_fixed_and_adaptive_equals_plain_decoding(llama, drafter):
    """The public switches (GenerationConfig.drafter, .adaptive): greedy output is the target's own at every k."""
    oracle = target_model(llama)
    for prompt in (PROMPTS[1], REPETITIVE):
        ref = reference.greedy(oracle, llama.encode(prompt), 32, llama.eos)
        for k, adaptive in ((1, False), (4, False), (8, False), (8, True)):
            r = llama.generate(prompt, GenerationConfig(max_new_tokens=32, k=k, drafter=drafter, adaptive=adaptive))
            assert r.token_ids == ref, (drafter, k, adaptive, prompt)
            s = r.stats
            assert sum(s.k_hist) == s.rounds and s.rounds_plain == s.k_hist[0]
            assert all(n == 0 for n in s.k_hist[k + 1 :]), "a round drafted more than k"


def test_adaptive_k_stops_drafting_when_drafts_never_land(llama):
    """Random-weight drafts almost never match the target: the policy learns it and decodes plainly, probing now
    and then (k = 0 rounds dominate), while fixed k drafts every round."""
    llama.policy = type(llama.policy)(k_max=llama.policy.k_max)   # a fresh policy: nothing learnt yet
    r = llama.generate("import os\n", GenerationConfig(max_new_tokens=60, k=4, drafter="model", adaptive=True))
    fixed = llama.generate("import os\n", GenerationConfig(max_new_tokens=60, k=4, drafter="model", adaptive=False))
    assert r.token_ids == fixed.token_ids
    assert fixed.stats.rounds_plain <= 1 and r.stats.rounds_plain > r.stats.rounds // 2, r.stats.k_hist


def test_target_only_bundle_drafts_by_lookup(checkpoints, tmp_path):
    """`export` without --draft: the bundle holds the target alone and still speculates, by prompt lookup."""
    from click.testing import CliRunner

    from specedge.runtime.errors import InvalidArgument
    from specedge.tools.cli import main

    target, _ = checkpoints("llama")
    out = tmp_path / "solo"
    r = CliRunner().invoke(main, ["export", "--target", str(target), "--out", str(out), "--max-length", "128"])
    assert r.exit_code == 0, r.output
    assert "no draft model: drafts by prompt lookup" in CliRunner().invoke(main, ["inspect", str(out)]).output
    engine = Engine(out)
    assert engine.draft is None and engine.manifest.draft is None and engine.defaults.drafter == "lookup"
    ref = reference.greedy(target_model(engine), engine.encode(REPETITIVE), 32, engine.eos)
    for drafter, adaptive in (("lookup", False), ("hybrid", False), (None, True)):
        got = engine.generate(REPETITIVE, GenerationConfig(max_new_tokens=32, k=4, drafter=drafter, adaptive=adaptive))
        assert got.token_ids == ref, (drafter, adaptive)
    with pytest.raises(InvalidArgument, match="no draft model"):
        engine.generator("x", drafter="model")
    bad = CliRunner().invoke(main, ["export", "--target", str(target), "--out", str(tmp_path / "x"),
                                    "--draft-vocab", "64"])
    assert bad.exit_code == 2 and "--draft" in bad.output and not (tmp_path / "x").exists()


@pytest.mark.parametrize("window", [None, 8])
def test_unread_is_what_the_next_proposal_reads(llama, window):
    """The k policy prices a catch-up by `unread` before the round: it must be what `propose` then reads, for a
    growing context, rejections, a moved window and a new request; where lookup leads, a hybrid reads at most k."""
    rng = np.random.default_rng(5)
    d = ModelDrafter(llama.draft, GenerationConfig(), window=window)
    h = HybridDrafter(LookupDrafter(llama.manifest.target.vocab_size), d, min_match=1)
    for prompt in PROMPTS[:2]:
        tokens = llama.encode(prompt)
        for _ in range(12):
            for drafter in (d, h):
                unread, lead = drafter.unread(tokens), drafter.lead(tokens)
                p = drafter.propose(tokens, 3)
                if drafter is h and lead == "lookup":   # unread 0; a top-up may read up to k tokens first
                    assert unread == 0 and p.read_n <= 3 and (p.read_n == 0 or h.last[1]), (window, len(tokens))
                else:
                    assert p.read_n == unread, (window, len(tokens))
                kept = int(rng.integers(0, len(p.tokens) + 1))
                drafter.accepted(kept)
            tokens = tokens + [int(t) for t in rng.integers(3, 100, int(rng.integers(1, 7)))]
