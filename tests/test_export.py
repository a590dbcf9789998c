"""Export: every architecture yields a bundle whose manifest records passing parity; writing is atomic."""
from __future__ import annotations

import json
import shutil

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
        export_bundle(ExportOptions(target=target, draft=draft, out=out, max_length=128))
    # a draft whose weights are truncated: the export fails after the target graph was built
    bad = tmp_path / "bad_draft"
    shutil.copytree(draft, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ExportError):
        export_bundle(ExportOptions(target=target, draft=bad, out=out, max_length=128, force=True))
    assert sorted(p.name for p in out.rglob("*")) == before          # the old bundle is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "bad_draft"]   # no half bundle left behind
    load_manifest(out, verify=True)
    export_bundle(ExportOptions(target=target, draft=draft, out=out, max_length=64, force=True))
    assert load_manifest(out).target.max_length == 64


def test_refusals(checkpoints, tmp_path):
    target, draft = checkpoints("llama")
    with pytest.raises(InvalidArgument, match="fp8 needs TensorRT .--device trt.; for --device cpu use int4"):
        export_bundle(ExportOptions(target=target, draft=draft, out=tmp_path / "x", draft_precision="fp8"))
    with pytest.raises(InvalidArgument, match="max_position_embeddings"):
        export_bundle(ExportOptions(target=target, draft=draft, out=tmp_path / "x", max_length=100000))
    # Recurrent state cannot be rewound (sliding windows can: see test_families.py).
    mamba = tmp_path / "mamba"
    shutil.copytree(draft, mamba)
    cfg = json.loads((mamba / "config.json").read_text())
    (mamba / "config.json").write_text(json.dumps({**cfg, "model_type": "mamba"}))
    with pytest.raises(IncompatibleModels, match="recurrent"):
        export_bundle(ExportOptions(target=target, draft=mamba, out=tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def test_manifest_is_plain_versioned_json(bundles):
    data = json.loads((bundles("llama") / "manifest.json").read_text())
    assert data["schema_version"] == 1 and data["defaults"] == {"k": 4}
    assert data["tools"]["onnxruntime"] and data["target"]["graph"] == "target/model.onnx"


def test_default_context_length_fits_the_models(checkpoints, tmp_path):
    """Without --max-length the context is min(2048, both models' max_position_embeddings), said in the manifest and
    the export log; a value the user typed that does not fit stays an error."""
    target, draft = checkpoints("llama")                                  # max_position_embeddings 256
    m = export_bundle(ExportOptions(target=target, draft=draft, out=tmp_path / "b"))
    assert m.target.max_length == m.draft.max_length == 256
    assert m.tools["max_length"].startswith("256: default, min(2048, the target's max_position_embeddings 256")
    assert "context length (max_length) 256: default" in (tmp_path / "b" / "export.log").read_text()
    assert load_manifest(tmp_path / "b", verify=True).defaults == {"k": 4}  # schema unchanged
    with pytest.raises(InvalidArgument, match="--max-length 300 exceeds .*max_position_embeddings .256."):
        export_bundle(ExportOptions(target=target, draft=draft, out=tmp_path / "c", max_length=300))
