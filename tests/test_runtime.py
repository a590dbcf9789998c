"""The product's promise: greedy output equals the target's own, sampling follows the target's distribution,
rollback leaves the cache as a fresh run would, and bad input gets a clear error."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from specedge.runtime import Engine, GenerationConfig
from specedge.runtime import reference
from specedge.runtime.drafter import ModelDrafter, Proposal
from specedge.runtime.errors import BundleError, InvalidArgument
from specedge.runtime.generator import Generator, Limits
from specedge.runtime.kv import KVModel, open_model
from specedge.runtime.lookup import LookupDrafter

PROMPTS = ["d", "def add(a, b):\n    return", "import os\nimport sys\n\nclass Path:\n    def __init__(self, p):\n"]
ARCHS = ["llama", "qwen2", "qwen3", "mistral", "phi3", "gemma", "gpt2"]


def target_model(engine: Engine) -> KVModel:
    """A second, independent instance of the target graph: the oracle's own cache."""
    m = engine.manifest
    return open_model(engine.bundle, m.target)


@pytest.fixture(scope="module")
def llama(bundles):
    return Engine(bundles("llama"))


class SelfDrafter:
    """The target drafting for itself (always right, alpha = 1) or proposing its second choice (always wrong)."""
    reads_prompt = True

    def __init__(self, model: KVModel, rank: int):
        self.model, self.rank, self.base = model, rank, 0

    def lead(self, tokens):
        return "self"

    def unread(self, tokens):
        return len(tokens) - 1 - self.model.cached(tokens)

    def propose(self, tokens, k):
        m = self.model
        keep = m.reuse(tokens)
        self.base = len(tokens)
        logits = m.forward(tokens[keep:])[-1]
        draft = np.empty(k, np.int64)
        for i in range(k):
            draft[i] = np.argsort(logits)[-1 - self.rank]
            logits = m.forward(draft[i : i + 1])[0]
        return Proposal(draft, None, "self")

    def accepted(self, n):
        self.model.rewind(min(self.model.pos, self.base + n))


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_equals_target_greedy(bundles, checkpoints, arch):
    engine = Engine(bundles(arch))
    oracle = target_model(engine)
    hf = _hf_model(checkpoints(arch)[0])
    for prompt in PROMPTS:
        ids = engine.encode(prompt)
        ref = reference.greedy(oracle, ids, 24, engine.eos)
        assert _hf_greedy(hf, ids, 24, engine.eos) == ref, "reference disagrees with transformers generate"
        plain = engine.generate(prompt, max_new_tokens=24, speculative=False)
        assert plain.token_ids == ref
        assert engine.generate(prompt, max_new_tokens=24).token_ids == ref    # the bundle's defaults
        for k in (1, 2, 4, 8):
            r = engine.generate(prompt, max_new_tokens=24, k=k, drafter="model", adaptive=False)
            assert r.token_ids == ref, (arch, prompt, k)
            assert r.stats.drafted > 0 and r.stats.rounds <= len(ref) + 1  # + the round that met EOS


@pytest.mark.parametrize("rank,alpha", [(0, 1.0), (1, 0.0)])
def test_always_right_and_always_wrong_drafts(llama, rank, alpha):
    oracle = target_model(llama)
    drafter = SelfDrafter(target_model(llama), rank)
    for prompt in PROMPTS:
        ids = llama.encode(prompt)
        ref = reference.greedy(oracle, ids, 30, llama.eos)
        for k in (1, 4, 8):
            r = llama.generate(prompt, max_new_tokens=30, k=k, adaptive=False, custom_drafter=drafter)
            assert r.token_ids == ref
            assert r.stats.alpha == alpha
            if alpha == 1.0 and r.finish_reason == "length":
                assert r.stats.mean_accepted_length > k * 0.7  # up to k + 1 tokens per target pass


def test_rollback_leaves_cache_as_fresh_run(llama):
    for k in (1, 3, 8):
        r = llama.generate(PROMPTS[2], max_new_tokens=40, k=k, drafter="model", adaptive=False)
        t = llama.target
        assert r.stats.rounds > 1 and r.stats.accept_hist[0] > 0  # rejections happened, so rewinds did
        fresh = target_model(llama)
        fresh.forward(t.seen[: t.pos])
        for layer in range(t.spec.num_layers):
            for a, b in zip(t.kv(layer), fresh.kv(layer)):
                np.testing.assert_allclose(a, b, atol=1e-5)
        d = llama.draft
        fresh_d = open_model(llama.bundle, d.spec)
        fresh_d.forward(d.seen[: d.pos])
        for a, b in zip(d.kv(0), fresh_d.kv(0)):
            np.testing.assert_allclose(a, b, atol=1e-5)


def test_sampling_follows_target_distribution(llama):
    """Chi-square of 3-token generations against the exact target-only distribution (top-k keeps it enumerable),
    with the bundle's draft (mostly rejections: the residual path) and with the target as its own draft (p == q:
    every draft accepted, the bonus path). The first token is a plain step; the second round drafts."""
    from scipy.stats import chisquare

    ids = llama.encode("x = ")
    cfg = dict(max_new_tokens=3, temperature=1.5, top_k=3)
    support = _support(target_model(llama), ids, cfg, llama.eos)
    n = 1500
    self_model = target_model(llama)
    for self_draft in (False, True):
        if self_draft:   # its own rng: the draft's draws need only be independent of the verifier's
            results = [llama.generate(ids, GenerationConfig(seed=seed, k=2, adaptive=False, **cfg),
                                      custom_drafter=ModelDrafter(self_model, GenerationConfig(**cfg),
                                                                  np.random.default_rng(n + seed)))
                       for seed in range(n)]
        else:
            results = [llama.generate(ids, GenerationConfig(seed=seed, k=2, drafter="model", adaptive=False, **cfg))
                       for seed in range(n)]
        assert sum(r.stats.drafted for r in results) > n // 2, "the second round should draft"
        seqs = [tuple(r.token_ids) for r in results]
        assert set(seqs) <= set(support), "generated a sequence the target cannot produce"
        observed = np.array([seqs.count(s) for s in support], float)
        expected = np.array(list(support.values())) * n
        assert chisquare(observed, expected).pvalue > 1e-3, (observed, expected)


def _support(oracle, ids, cfg, eos) -> dict[tuple, float]:
    """Every response target-only sampling can give, with its probability (a response ends early at EOS)."""
    from specedge.runtime.sampling import distribution

    out: dict[tuple, float] = {}

    def walk(response: tuple, prob: float) -> None:
        if len(response) == cfg["max_new_tokens"]:
            out[response] = out.get(response, 0.0) + prob
            return
        p = distribution(reference.next_logits(oracle, ids + list(response)), cfg["temperature"], cfg["top_k"])
        for a in map(int, np.nonzero(p)[0]):
            if a in eos:
                out[response] = out.get(response, 0.0) + prob * p[a]
            else:
                walk(response + (a,), prob * p[a])

    walk((), 1.0)
    return out


def test_seeded_sampling_is_reproducible(llama):
    a = llama.generate(PROMPTS[1], max_new_tokens=20, temperature=0.9, top_p=0.9, seed=7)
    b = llama.generate(PROMPTS[1], max_new_tokens=20, temperature=0.9, top_p=0.9, seed=7)
    assert a.token_ids == b.token_ids


def test_streaming_tokens_text_callback_and_stats(llama):
    g = llama.generator(PROMPTS[1], max_new_tokens=25, k=3)
    tokens = list(g)
    r = llama.generate(PROMPTS[1], max_new_tokens=25, k=3)
    assert tokens == r.token_ids and len(tokens) == 25
    deltas: list[str] = []
    r2 = llama.generate(PROMPTS[1], max_new_tokens=25, k=3, on_text=deltas.append)
    assert "".join(deltas) == r2.text == llama.tokenizer.decode(r2.token_ids)
    s = r.stats
    assert s.new_tokens == 25 and s.prompt_tokens == len(llama.encode(PROMPTS[1]))
    assert sum(s.accept_hist) <= s.rounds and s.accepted == sum(i * c for i, c in enumerate(s.accept_hist))
    assert s.mean_accepted_length == pytest.approx(25 / s.rounds)
    assert len(s.token_ms) == 25 and s.ttft_ms > 0 and s.tokens_per_s > 0
    assert s.ort_ms <= s.draft_ms + s.target_ms + s.prefill_ms + 1e-6
    d = r.to_dict()
    for key in ("drafted", "accepted", "alpha", "mean_accepted_length", "rounds", "tokens_per_s", "ttft_ms"):
        assert key in d["stats"]


def test_stop_strings_and_eos(llama):
    full = llama.generate(PROMPTS[2], max_new_tokens=30)
    stop = full.text[10:13]
    assert stop and full.text.find(stop) == 10
    deltas: list[str] = []
    r = llama.generate(PROMPTS[2], max_new_tokens=30, stop=(stop,), on_text=deltas.append)
    assert r.finish_reason == "stop" and r.text == full.text[:10] and "".join(deltas) == r.text
    assert full.token_ids[: len(r.token_ids)] == r.token_ids
    # EOS: make the first generated token an end-of-sequence token
    eos = llama.eos
    llama.eos = frozenset({full.token_ids[5]})
    try:
        r = llama.generate(PROMPTS[2], max_new_tokens=30)
        assert r.finish_reason == "eos" and r.token_ids == full.token_ids[: full.token_ids.index(full.token_ids[5])]
    finally:
        llama.eos = eos


def test_context_full_stops_cleanly(llama):
    ids = llama.encode(PROMPTS[2])
    room = llama.max_length - len(ids)
    r = llama.generate(PROMPTS[2], max_new_tokens=room + 50, k=8)
    assert r.finish_reason == "context_full" and len(r.token_ids) == room
    assert r.token_ids == reference.greedy(target_model(llama), ids, room, llama.eos)


def test_cancel_from_another_thread(llama):
    g = llama.generator(PROMPTS[0], max_new_tokens=100, k=1)
    it = iter(g)
    next(it)
    threading.Thread(target=g.cancel).start()
    rest = list(it)
    assert g.finish_reason == "cancelled" and len(rest) < 99


def test_reuse_across_requests_keeps_buffers(llama):
    buffers = llama.target.buffers() + llama.draft.buffers()
    assert buffers
    a = llama.generate(PROMPTS[2], max_new_tokens=20)
    llama.generate(PROMPTS[1], max_new_tokens=20)
    g = llama.generator(PROMPTS[2], max_new_tokens=20)
    b = g.result()
    c = llama.generator(llama.encode(PROMPTS[2]), max_new_tokens=20).result()
    assert a.token_ids == b.token_ids == c.token_ids
    assert llama.target.buffers() + llama.draft.buffers() == buffers


@pytest.mark.parametrize("opts,match", [
    (dict(prompt=""), "prompt is empty"),
    (dict(prompt=[]), "prompt is empty"),
    (dict(prompt="x " * 400), "context holds"),
    (dict(prompt="x", k=0), "k must be"),
    (dict(prompt="x", k=1000), "k must be"),
    (dict(prompt="x", temperature=-1.0), "temperature must be"),
    (dict(prompt="x", top_p=0.0), "top_p"),
    (dict(prompt="x", max_new_tokens=0), "max_new_tokens"),
])
def test_bad_requests(llama, opts, match):
    prompt = opts.pop("prompt")
    with pytest.raises(InvalidArgument, match=match):
        llama.generate(prompt, **opts)


def test_bundle_missing_or_modified_file(bundles, tmp_path):
    import shutil

    def copy(name):
        shutil.copytree(bundles("llama"), tmp_path / name)
        return tmp_path / name

    b = copy("modified")
    with open(b / "draft" / "model.onnx.data", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(BundleError, match="draft/model.onnx.data was modified"):
        Engine(b)
    b = copy("missing")
    (b / "target" / "model.onnx").unlink()
    with pytest.raises(BundleError, match="target/model.onnx is missing"):
        Engine(b)
    b = copy("corrupted")
    (b / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="corrupted"):
        Engine(b)
    with pytest.raises(BundleError, match="not a specedge bundle"):
        Engine(tmp_path)


def _hf_model(path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _hf_greedy(model, ids, n, eos):
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, eos_token_id=sorted(eos) or None,
                             pad_token_id=0)[0, len(ids):].tolist()
    return out[: next((i for i, t in enumerate(out) if t in eos), len(out))]


def test_draft_steps_chained_on_the_device_equal_host_steps(llama):
    """greedy_chain binds step i's argmax output as step i+1's ids (no host round trip between draft steps): the
    tokens and the cache it leaves equal the host loop's, one forward at a time."""
    from specedge.runtime.kv import InplaceKV

    d = llama.draft
    assert isinstance(d, InplaceKV)
    host = open_model(llama.bundle, d.spec)
    ids = llama.encode(PROMPTS[2])
    buffers = d.buffers()
    for k in (2, 5, 9):
        d.reset()
        host.reset()
        chained = d.greedy_chain(ids, k)
        looped = KVModel.greedy_chain(host, ids, k)     # the base class: one host round trip per step
        assert chained.tolist() == looped.tolist() and d.pos == host.pos == len(ids) + k - 1
        assert d.seen[: d.pos] == host.seen[: host.pos]
        for a, b in zip(d.kv(0), host.kv(0)):
            np.testing.assert_array_equal(a, b)
    assert d.buffers() == buffers


# -- the seams: a Generator without an Engine, drafters passed in, defaults, stats ----------------------------------
def test_generator_runs_without_an_engine(llama, tok_dir):
    """The loop needs a target, a drafter, limits and a release callback: no Engine."""
    from tokenizers import Tokenizer

    target = target_model(llama)
    ids = llama.encode(PROMPTS[2])
    ref = reference.greedy(target_model(llama), ids, 20, llama.eos)
    released = []
    V = llama.manifest.target.vocab_size
    for drafter in (None, LookupDrafter(V)):
        c = GenerationConfig(max_new_tokens=20, k=4, speculative=drafter is not None)
        g = Generator(target, drafter, c, Limits(llama.max_length, V, llama.eos),
                      Tokenizer.from_file(str(llama.bundle / "tokenizer.json")),
                      lambda g, failed: released.append((g, failed)))
        g.append_tokens(np.array(ids, np.int64))
        r = g.result()
        assert r.token_ids == ref and released[-1] == (g, False)


def test_text_deltas_after_result_never_replay(llama):
    g = llama.generator(PROMPTS[1], max_new_tokens=12)
    r = g.result()
    assert r.text and list(g.text_deltas()) == [] and list(g) == []
    g = llama.generator(PROMPTS[1], max_new_tokens=12)
    tokens = list(g)                                   # tokens handed out: the text is still there to take
    assert "".join(g.text_deltas()) == r.text and tokens == r.token_ids
    assert g.result().text == r.text and list(g.text_deltas()) == []


def test_numpy_prompts_and_config_with_options(llama):
    ids = llama.encode(PROMPTS[2])
    want = llama.generate(ids, max_new_tokens=8).token_ids
    assert llama.generate(np.array(ids, np.int64), max_new_tokens=8).token_ids == want
    assert llama.generate(np.array(ids, np.int32), GenerationConfig(max_new_tokens=np.int64(8))).token_ids == want
    with pytest.raises(InvalidArgument, match="not both") as e:
        llama.generate(PROMPTS[0], GenerationConfig(max_new_tokens=3), max_new_tokens=30)
    assert e.value.param == "max_new_tokens"
    with pytest.raises(InvalidArgument, match="unknown option") as e:
        llama.generate(PROMPTS[0], max_new_token=3)
    assert e.value.param == "max_new_token"


def test_bundle_defaults_are_typed_and_used(llama):
    """A bundle with a draft model drafts with the adaptive hybrid unless its manifest names a drafter."""
    d = llama.defaults
    assert (d.k, d.speculative, d.drafter, d.adaptive, d.draft_window) == (4, True, "hybrid", True, 0)
    g = llama.generator(PROMPTS[0], max_new_tokens=2)
    assert (g.config.k, g.config.drafter, g.config.adaptive, g.policy is llama.policy) == (4, "hybrid", True, True)
    g.close()
    from specedge.runtime.config import BundleDefaults

    tuned = BundleDefaults.from_manifest({"k": 3, "drafter": "model"}, has_draft=True)
    assert (tuned.k, tuned.drafter, tuned.adaptive) == (3, "model", False)
    solo = BundleDefaults.from_manifest({"k": 4}, has_draft=False)
    assert (solo.drafter, solo.adaptive) == ("lookup", False)
    with pytest.raises(BundleError, match="defaults.drafter is 'model' but the bundle has no draft model"):
        BundleDefaults.from_manifest({"drafter": "model"}, has_draft=False)


def test_stats_of_a_plain_request_and_of_rounds(llama):
    plain = llama.generate(PROMPTS[1], max_new_tokens=10, speculative=False)
    assert plain.stats.alpha is None and plain.to_dict()["stats"]["alpha"] is None
    spec = llama.generate(PROMPTS[1], max_new_tokens=20, k=4, drafter="model", adaptive=False)
    s, d = spec.stats, spec.to_dict()["stats"]
    assert s.alpha is not None and len(s.itl_ms) == len(s.token_ms) == 20
    assert sum(s.itl_ms) == pytest.approx(sum(s.token_ms))           # the same time, spread over a round's tokens
    assert d["itl_p50_ms"] > 0 and "tpot_p50_ms" not in d
    assert s.rounds == sum(s.k_hist) and s.accepted == sum(i * c for i, c in enumerate(s.accept_hist))


@pytest.mark.parametrize("window", [32, 40])
def test_draft_window_keeps_greedy_output_and_bounds_the_draft(llama, window):
    """The draft reads only recent context (its own positions from 0): proposals change, output does not."""
    oracle = target_model(llama)
    for prompt in PROMPTS[1:]:
        ids = llama.encode(prompt * 3)[:70]
        ref = reference.greedy(oracle, ids, 40, llama.eos)
        for k in (1, 4):
            llama.forget()   # a cold draft cache: the first drafting round reads its window
            g = llama.generator(ids, max_new_tokens=40, k=k, drafter="model", adaptive=False, draft_window=window)
            longest = 0
            for _ in g:
                longest = max(longest, llama.draft.pos)
            r = g.result()
            assert r.token_ids == ref, (prompt, k, window)
            assert r.stats.drafted > 0 and longest <= 2 * window + k
            assert r.stats.draft_read_ms > 0                 # the first drafting round read the window apart
    with pytest.raises(InvalidArgument, match="draft_window must be at most") as e:
        llama.generate(PROMPTS[0], draft_window=1000)
    assert e.value.param == "draft_window"


def test_a_custom_drafter_that_breaks_the_protocol(llama):
    class TooMany(SelfDrafter):
        def propose(self, tokens, k):
            return Proposal(np.zeros(k + 3, np.int64), None, "self")

    with pytest.raises(InvalidArgument, match="protocol") as e:
        llama.generate(PROMPTS[0], custom_drafter=object())
    assert e.value.param == "custom_drafter"
    with pytest.raises(InvalidArgument, match="not both|cannot be combined"):
        llama.generate(PROMPTS[0], drafter="lookup", custom_drafter=SelfDrafter(llama.draft, 0))
    with pytest.raises(InvalidArgument, match="at most k") as e:
        llama.generate(PROMPTS[1], max_new_tokens=10, adaptive=False, custom_drafter=TooMany(llama.draft, 0))
    assert e.value.param == "drafter"
    assert llama.generate(PROMPTS[1], max_new_tokens=5).finish_reason in ("length", "eos")   # still usable
