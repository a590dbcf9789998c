"""Export: every architecture yields a bundle whose manifest records passing parity; writing is atomic."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from specedge.export.bundle import ExportOptions, export_bundle
from specedge.runtime.errors import ExportError, IncompatibleModels, InvalidArgument
from specedge.runtime.manifest import load_manifest

ARCHS = ["llama", "qwen2", "qwen3", "mistral", "phi3", "gemma", "gpt2"]


@pytest.mark.parametrize("arch", ARCHS)
def test_bundle_manifest_and_parity(bundles, arch):
    b = bundles(arch)
    m = load_manifest(b, verify=True)
    assert m.schema_version == 1
    assert m.target.kv_layout == ("concat" if arch == "gpt2" else "inplace")
    assert (m.target.precision, m.draft.precision) == ("fp32", "int4")
    assert m.target.max_length == m.draft.max_length == 128 and m.target.rewindable
    t, d = m.parity["target"], m.parity["draft"]
    assert t["max_abs_logit_diff"] < 1e-3 and t["top1_agreement"] == 1.0          # fp32 vs PyTorch
    assert t["step_top1_agreement"] == 1.0 and t["step_max_abs_diff"] < 1e-3       # verify step == one by one
    assert d["step_top1_agreement"] == 1.0 and 0 <= d["top1_agreement"] <= 1        # int4 draft: reported
    assert m.compatibility["compatible"] and m.tokenizer.vocab_size == 512
    assert set(m.files) >= {"tokenizer.json", m.target.graph, m.draft.graph}


def test_existing_bundle_needs_force_and_failures_leave_nothing(bundles, checkpoints, tmp_path):
    target, draft = checkpoints("llama")
    out = tmp_path / "b"
    shutil.copytree(bundles("llama"), out)
    before = sorted(p.name for p in out.rglob("*"))
    with pytest.raises(InvalidArgument, match="--force"):
        export_bundle(ExportOptions(target=target, draft=draft, out=out, max_length=128, target_precision="fp32"))
    # a draft whose weights are truncated: the export fails after the target graph was built
    bad = tmp_path / "bad_draft"
    shutil.copytree(draft, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ExportError):
        export_bundle(ExportOptions(target=target, draft=bad, out=out, max_length=128, force=True,
                                    target_precision="fp32"))
    assert sorted(p.name for p in out.rglob("*")) == before          # the old bundle is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "bad_draft"]   # no half bundle left behind
    load_manifest(out, verify=True)
    export_bundle(ExportOptions(target=target, draft=draft, out=out, max_length=64, force=True,
                                target_precision="fp32"))
    assert load_manifest(out).target.max_length == 64


def test_refusals(checkpoints, tmp_path):
    target, draft = checkpoints("llama")
    with pytest.raises(InvalidArgument, match="fp8 needs TensorRT .--device trt.; for --device cpu use int4"):
        export_bundle(ExportOptions(target=target, draft=draft, out=tmp_path / "x", draft_precision="fp8",
                                    target_precision="fp32"))
    with pytest.raises(InvalidArgument, match="max_position_embeddings"):
        export_bundle(ExportOptions(target=target, draft=draft, out=tmp_path / "x", max_length=100000,
                                    target_precision="fp32"))
    # Recurrent state cannot be rewound (sliding windows can: see test_families.py).
    mamba = tmp_path / "mamba"
    shutil.copytree(draft, mamba)
    cfg = json.loads((mamba / "config.json").read_text())
    (mamba / "config.json").write_text(json.dumps({**cfg, "model_type": "mamba"}))
    with pytest.raises(IncompatibleModels, match="recurrent"):
        export_bundle(ExportOptions(target=target, draft=mamba, out=tmp_path / "x", target_precision="fp32"))
    assert not (tmp_path / "x").exists()


def test_manifest_is_plain_versioned_json(bundles):
    data = json.loads((bundles("llama") / "manifest.json").read_text())
    assert data["schema_version"] == 1 and data["defaults"] == {"k": 4}
    assert data["tools"]["onnxruntime"] and data["target"]["graph"] == "target/model.onnx"


def test_default_context_length_fits_the_models(checkpoints, tmp_path):
    """Without --max-length the context is min(2048, both models' max_position_embeddings), said in the manifest and
    the export log; a value the user typed that does not fit stays an error."""
    target, draft = checkpoints("llama")                                  # max_position_embeddings 256
    m = export_bundle(ExportOptions(target=target, draft=draft, out=tmp_path / "b", target_precision="fp32"))
    assert m.target.max_length == m.draft.max_length == 256
    assert m.tools["max_length"].startswith("256: default, min(2048, the target's max_position_embeddings 256")
    assert "context length (max_length) 256: default" in (tmp_path / "b" / "export.log").read_text()
    assert load_manifest(tmp_path / "b", verify=True).defaults == {"k": 4}  # schema unchanged
    with pytest.raises(InvalidArgument, match="--max-length 300 exceeds .*max_position_embeddings .256."):
        export_bundle(ExportOptions(target=target, draft=draft, out=tmp_path / "c", max_length=300,
                                    target_precision="fp32"))


# -- prompt reads compute only the logits they use (`logits_from`) ---------------------------------------------------
def _without_row_select(bundle, spec, out):
    """A copy of the bundle's graph for `spec` as it was before graphs.select_rows: the head reads every row."""
    import onnx

    from specedge.runtime.kv import LOGITS_FROM

    shutil.copytree(bundle / spec.graph.split("/")[0], out / spec.graph.split("/")[0])
    m = onnx.load(str(out / spec.graph), load_external_data=False)
    g = m.graph
    cut = next(n for n in g.node if n.op_type == "Slice" and n.input[1] == LOGITS_FROM)
    for n in g.node:
        n.input[:] = [cut.input[0] if i == cut.output[0] else i for i in n.input]
    g.node.remove(cut)
    g.input.remove(next(i for i in g.input if i.name == LOGITS_FROM))
    onnx.save(m, str(out / spec.graph))
    return out


# Heads: untied MatMul (llama), tied (smollm2), soft-capped (gemma2), Gemma 3 (builder), tied Transpose through
# torch.onnx (gpt2); each target fp32 and each draft int4 (MatMulNBits).
@pytest.mark.parametrize("arch", ["llama", "smollm2", "gemma2", "gemma3", "gpt2"])
def test_selected_rows_equal_the_full_pass(bundles, arch, tmp_path):
    """For random (cached prefix p, step of n tokens, last m rows): forward(rows=m) equals the last m rows of the full
    pass, logits and argmax; a prompt read (want=None) computes one row and writes the same cache; and the graph fed
    nothing equals the graph without the input, bit for bit (what onnxruntime-genai runs)."""
    from specedge.runtime.kv import BOUND_MAX_N, LOGITS_FROM, InplaceKV, open_model

    b = bundles(arch)
    m = load_manifest(b)
    rng = np.random.default_rng(0)
    for spec in (m.target, m.draft):
        assert LOGITS_FROM in spec.inputs
        model, old = open_model(b, spec), open_model(_without_row_select(b, spec, tmp_path / spec.role), spec)
        assert model._selects_rows and not old._selects_rows
        ids = rng.integers(3, spec.vocab_size, spec.max_length).tolist()
        assert np.array_equal(model.forward(ids), old.forward(ids))           # fed nothing: all rows, bit for bit
        for p, n in [(0, 1), (0, 40), (7, 1), (7, 5), (30, BOUND_MAX_N), (90, 38)]:
            old.rewind(0)
            if p:
                old.forward(ids[:p])
            ref = old.forward(ids[p : p + n]).copy()                            # (n, V), every row
            model.rewind(0)
            if p:
                assert model.forward(ids[:p], want=None) is None                # the prefix through a one-row read
            for rows in sorted({1, 2, n // 2 + 1, n} & set(range(1, n + 1))):
                model.rewind(p)
                got = model.forward(ids[p : p + n], rows=rows)                  # (rows, V)
                assert got.shape == (rows, spec.vocab_size)
                np.testing.assert_allclose(got, ref[-rows:], rtol=0, atol=1e-5)
                model.rewind(p)
                best = model.forward(ids[p : p + n], want="argmax", rows=rows)  # (rows,)
                assert best.tolist() == got.argmax(-1).tolist()
            if isinstance(model, InplaceKV) and n <= BOUND_MAX_N:
                model.rewind(p)
                model.forward(ids[p : p + n], want=None)
                assert model._steps[n, 1].logits.shape == (1, 1, spec.vocab_size)  # the buffer one row fills
        with pytest.raises(InvalidArgument, match="rows=0 must be between 1 and the 3 tokens"):
            model.forward(ids[:3], rows=0)
