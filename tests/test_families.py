"""The family matrix: every family specedge claims exports with default options, records passing parity, and decodes
greedily exactly as transformers does, plain and speculative, on prompts and generations that cross the tiny
models' 16-token sliding window where the family has one. docs/families.md's table is checked against the bundles."""
from __future__ import annotations

from pathlib import Path

import pytest

from specedge.export.check import check_pair
from specedge.runtime import Engine
from specedge.runtime.manifest import load_manifest

FAMILIES = ["llama", "smollm2", "qwen2", "qwen3", "mistral", "mistral-sw", "phi3", "gemma", "gemma2", "gemma3",
            "gpt2"]
DOC = Path(__file__).resolve().parent.parent / "docs" / "families.md"
# ~40 tokens of prompt and 40 generated: both cross the 16-token window, and stay inside max_length 128.
PROMPT = ("import os\nimport sys\n\n\nclass Config:\n    def __init__(self, path):\n        self.path = path\n"
          "        self.items = {}\n")
NEW = 40


def table_row(m, reduced_vocab: bool) -> list[str]:
    """What docs/families.md says about a family, derived from its exported bundle."""
    t = m.target
    windows = ", ".join(map(str, t.windows)) if any(t.windows) else "-"
    graph = "model builder" if "builder" in t.builder else "torch.onnx"
    return [t.architecture, graph, {"inplace": "in-place", "concat": "concat"}[t.kv_layout], windows,
            "yes" if reduced_vocab else "no"]


def reduces_vocab(bundle: Path, m, tmp: Path) -> bool:
    """--draft-vocab's surgery applies to this family's int4 draft graph: done on a copy, checked by one step."""
    import dataclasses
    import shutil

    import numpy as np
    import onnx

    from specedge.export.draft_vocab import reduce_head
    from specedge.runtime.kv import open_model

    shutil.copytree(bundle / "draft", tmp / "draft")
    g = onnx.load(str(tmp / m.draft.graph))  # drop the argmax the export added: reduce_head adds its own
    g.graph.node.remove(next(n for n in g.graph.node if n.output[0] == "argmax"))
    g.graph.output.remove(next(o for o in g.graph.output if o.name == "argmax"))
    onnx.save(g, str(tmp / m.draft.graph))
    kept = np.arange(0, m.draft.vocab_size, 7)
    reduce_head(tmp / m.draft.graph, kept)
    draft = open_model(tmp, dataclasses.replace(m.draft, draft_vocab=len(kept)))
    logits = draft.forward([1, 5, 9]).copy()
    draft.rewind(0)
    best = draft.forward([1, 5, 9], want="argmax")
    return bool(np.isneginf(np.delete(logits, kept, axis=1)).all() and (best == logits.argmax(-1)).all()
                and np.isin(best, kept).all())


def doc_rows() -> dict[str, list[str]]:
    rows = {}
    for line in DOC.read_text().splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if len(cells) >= 6 and cells[0] in FAMILIES:
            rows[cells[0]] = cells[1:6]
    return rows


def _hf_greedy(path, ids, n, eos):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, eos_token_id=sorted(eos) or None,
                             pad_token_id=0)[0, len(ids):].tolist()
    return out[: next((i for i, t in enumerate(out) if t in eos), len(out))]


def test_the_doc_lists_every_family():
    assert sorted(doc_rows()) == sorted(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_family(bundles, checkpoints, family, tmp_path):
    target, draft = checkpoints(family)
    v = check_pair(target, draft)
    assert v.compatible and v.target.rewindable, v.errors
    m = load_manifest(bundles(family), verify=True)
    assert m.target.windows == v.target.windows and m.draft.windows == v.draft.windows
    assert m.parity["target"]["max_abs_logit_diff"] < 1e-3 and m.parity["target"]["step_top1_agreement"] == 1.0
    row = table_row(m, reduces_vocab(bundles(family), m, tmp_path))
    assert row == doc_rows()[family], f"docs/families.md's row for {family} is out of date"
    engine = Engine(bundles(family))
    ids = engine.encode(PROMPT)
    window = max(m.target.windows)
    assert not window or len(ids) > window and len(ids) + NEW > 2 * window   # the window is crossed, twice over
    ref = _hf_greedy(target, ids, NEW, engine.eos)
    assert len(ref) > 8  # random weights rarely say EOS; an early EOS would leave the window uncrossed
    assert engine.generate(PROMPT, max_new_tokens=NEW, speculative=False).token_ids == ref
    for k in (2, 5):
        assert engine.generate(PROMPT, max_new_tokens=NEW, k=k).token_ids == ref, (family, k)



def test_builder_is_fed_what_it_reads(checkpoints):
    """genai_builder's adaptation of transformers-5 configs (the builder itself is exercised by test_family)."""
    import json

    from transformers import AutoConfig

    from specedge.export.genai_builder import adapt

    for family, types, window in [("mistral-sw", ["sliding_attention"] * 2, 16),
                                  ("gemma3", ["sliding_attention", "full_attention"], 16),
                                  ("llama", ["full_attention"] * 2, None)]:
        path = checkpoints(family)[0]
        config = AutoConfig.from_pretrained(path)
        adapt(config, json.loads((path / "config.json").read_text()))
        assert config.layer_types == types and getattr(config, "sliding_window", None) == window, family
    # Gemma 3: one flat RoPE (the global layers') plus the local layers' theta, as the builder reads them
    g3 = AutoConfig.from_pretrained(checkpoints("gemma3")[0])
    adapt(g3, json.loads((checkpoints("gemma3")[0] / "config.json").read_text()))
    assert (g3.rope_parameters["rope_type"], g3.rope_theta, g3.rope_local_base_freq) == ("default", 1e6, 1e4)
    # Per-layer-type RoPE scaling (Gemma 3 4B+) is beyond the adaptation: those go to the torch.onnx exporter.
    from specedge.export.graphs import builder_problem

    scaled = {"rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                  "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}
    assert builder_problem(scaled) and not builder_problem(json.loads((checkpoints("gemma3")[0] /
                                                                       "config.json").read_text()))
