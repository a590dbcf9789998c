"""A reduced draft vocabulary: the draft's head keeps N tokens, its graph maps them back to target ids, and the
output is unchanged (greedy equal to plain decoding; sampled exactness is tests/test_sampling.py's p = 0 cases)."""
from __future__ import annotations

import numpy as np
import pytest

from specedge.export.bundle import ExportOptions, export_bundle
from specedge.export.draft_vocab import choose_tokens, corpus_files, map_sha256
from specedge.runtime import Engine
from specedge.runtime.errors import InvalidArgument
from specedge.runtime.manifest import load_manifest
from specedge.runtime.kv import open_model

N = 64
PROMPT = "import os\nimport sys\n\n\nclass Config:\n    def __init__(self, path):\n        self.path = path\n"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # builder MatMulNBits head; torch.onnx head (quantized there)
def test_reduced_head_maps_back_to_target_ids(bundles, arch):
    b = bundles(arch, draft_vocab=N)
    m = load_manifest(b)
    kept = choose_tokens(b / "tokenizer.json", N, m.draft.vocab_size, corpus_files(None),
                         (m.tokenizer.bos_token_id, m.tokenizer.pad_token_id, *m.tokenizer.eos_token_ids))
    assert m.draft.draft_vocab == N and m.draft.vocab_map_sha256 == map_sha256(kept)
    assert m.target.draft_vocab == 0 and m.draft.vocab_size == m.target.vocab_size   # full-width logits out
    assert set(m.tokenizer.eos_token_ids) <= set(kept.tolist())                       # the draft can propose EOS
    assert m.parity["draft"]["step_top1_agreement"] == 1.0

    draft = open_model(b, m.draft)
    ids = Engine(b).encode(PROMPT)
    logits = draft.forward(ids).copy()                     # (n, V)
    draft.rewind(0)
    best = draft.forward(ids, want="argmax").copy()        # (n,) target ids
    outside = np.setdiff1d(np.arange(logits.shape[1]), kept)
    assert np.isneginf(logits[:, outside]).all() and np.isfinite(logits[:, kept]).all()
    assert (best == logits.argmax(-1)).all() and np.isin(best, kept).all()
    # The rows are chosen before the sliced head (logits_from): the last rows alone equal those of the full pass.
    for rows in (1, 3):
        draft.rewind(0)
        np.testing.assert_allclose(draft.forward(ids, rows=rows), logits[-rows:], rtol=0, atol=1e-5)
        draft.rewind(0)
        assert draft.forward(ids, want="argmax", rows=rows).tolist() == best[-rows:].tolist()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_output_is_unchanged(bundles, arch):
    full, reduced = Engine(bundles(arch)), Engine(bundles(arch, draft_vocab=N))
    ref = full.generate(PROMPT, max_new_tokens=32, speculative=False).token_ids
    for k in (1, 4):
        assert reduced.generate(PROMPT, max_new_tokens=32, k=k).token_ids == ref
    r = reduced.generate(PROMPT, max_new_tokens=32, k=4, temperature=0.9, seed=3)
    assert r.stats.drafted > 0 and len(r.token_ids) > 0


def test_bad_sizes_and_corpus(checkpoints, tmp_path):
    target, draft = checkpoints("llama")
    for n in (512, 100000):
        with pytest.raises(InvalidArgument, match="--draft-vocab"):
            export_bundle(ExportOptions(target=target, draft=draft, out=tmp_path / "x", max_length=64, draft_vocab=n,
                                        target_precision="fp32"))
    with pytest.raises(InvalidArgument, match="--draft-vocab-corpus"):
        corpus_files(tmp_path / "missing")
    (tmp_path / "c.txt").write_text("return return return self self")
    kept = choose_tokens(target / "tokenizer.json", 8, 512, corpus_files(tmp_path / "c.txt"), (0,))
    assert len(kept) == 8 and 0 in kept and list(kept) == sorted(kept)
    assert not (tmp_path / "x").exists()
