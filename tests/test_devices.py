"""GPU-path bundles (cuda, rtx, trt with an FP8 draft) and provider selection.

Every graph the exporter writes also runs on onnxruntime's CPU provider, so the exactness of the GPU bundles'
graphs (fp16 GroupQueryAttention, int4 drafts, FP8 Q/DQ) is tested here on any machine. What needs a GPU (the
device-resident buffers, CUDA graphs) is tested at the end and skips cleanly without one.
"""
from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort
import pytest

from specedge.export.bundle import ExportOptions, export_bundle
from specedge.export.fp8 import ModelOptUnavailable, ensure_env
from specedge.runtime import Engine, reference
from specedge.runtime.errors import ExportError, InvalidArgument
from specedge.runtime.kv import KVModel, open_model

PROMPTS = ["d", "def add(a, b):\n    return", "import os\nimport sys\n\nclass Path:\n    def __init__(self, p):\n"]
HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


def oracle(engine: Engine, provider: str) -> KVModel:
    m = engine.manifest
    return open_model(engine.bundle, m.target, provider)


def assert_exact(engine: Engine, provider: str, ks=(1, 4, 8), n=24):
    """Plain and speculative greedy output equal the slow oracle's, token for token."""
    ref_model = oracle(engine, provider)
    for prompt in PROMPTS:
        ids = engine.encode(prompt)
        ref = reference.greedy(ref_model, ids, n, engine.eos)
        assert engine.generate(prompt, max_new_tokens=n, speculative=False).token_ids == ref
        # the bundle's default (adaptive: it may rightly stop drafting where drafts cost more than they save, as this
        # int4 draft does on a CPU), then every k fixed, which drafts every round after the first
        assert engine.generate(prompt, max_new_tokens=n).token_ids == ref
        for k in ks:
            r = engine.generate(prompt, max_new_tokens=n, k=k, adaptive=False)
            assert r.token_ids == ref, (engine.manifest.target.provider, prompt, k)
            assert r.stats.drafted > 0


@pytest.mark.parametrize("device", ["cuda", "rtx"])
def test_gpu_bundles_are_exact(bundles, device):
    """The builder's fp16 target + int4 draft for CUDA / TensorRT-RTX, run through the same runtime."""
    b = bundles("llama", device=device)
    engine = Engine(b, provider="cpu")
    m = engine.manifest
    assert (m.target.provider, m.target.precision, m.target.kv_dtype, m.target.kv_layout) == \
        (device, "fp16", "float16", "inplace")
    assert m.draft.precision == "int4" and "argmax" in m.target.outputs
    assert m.parity["target"]["step_top1_agreement"] == 1.0
    assert m.parity["target"]["top1_agreement"] > 0.9 and m.parity["target"]["max_abs_logit_diff"] < 0.1
    assert_exact(engine, "cpu")


def test_trt_bundle_has_plain_graphs_and_an_fp8_draft(bundles):
    """Native TensorRT gets plain-op torch.onnx graphs; the draft is quantized to FP8 by ModelOpt (in its own
    environment, created on first use) and validated on the CPU provider, which emulates FP8. A machine where that
    environment cannot be created (no package index) skips, saying so; a CI that must run it sets
    SPECEDGE_REQUIRE_FP8=1 to fail instead."""
    import onnx

    try:
        b = bundles("llama", device="trt")
    except ModelOptUnavailable as e:
        if os.environ.get("SPECEDGE_REQUIRE_FP8"):
            raise
        pytest.skip(f"the ModelOpt environment for FP8 cannot be created on this machine: {e}")
    engine = Engine(b, provider="cpu")
    m = engine.manifest
    assert (m.target.provider, m.target.precision, m.target.kv_layout) == ("trt", "fp32", "concat")
    assert m.draft.precision == "fp8"
    g = onnx.load(str(b / m.draft.graph), load_external_data=False).graph
    fp8 = onnx.TensorProto.FLOAT8E4M3FN
    assert sum(n.op_type == "DequantizeLinear" for n in g.node) > 0
    assert any(t.data_type == fp8 for t in g.initializer), "no FP8 weights in the draft"
    assert {n.domain for n in g.node} <= {"", "ai.onnx"}, "TensorRT's ONNX parser needs standard ops only"
    assert m.parity["draft"]["top1_agreement"] > 0.3  # random weights: FP8 damage is reported, not gated
    assert_exact(engine, "cpu", ks=(2, 4))


@pytest.mark.parametrize("opts,match", [
    (dict(device="cuda", draft_precision="fp8"), "fp8 needs TensorRT"),
    (dict(device="rtx", draft_precision="fp8"), "GroupQueryAttention needs TensorRT inside ModelOpt"),
    (dict(device="cpu", target_precision="fp16"), "fp16 graphs are for --device cuda"),
    (dict(device="trt", target_precision="fp16"), "--device trt takes fp32 graphs"),
    (dict(device="trt", draft_precision="int4"), "--device trt takes fp32 graphs"),
    (dict(device="npu"), "must be cpu, cuda, rtx"),
])
def test_device_precision_errors(checkpoints, tmp_path, opts, match):
    t, d = checkpoints("llama")
    with pytest.raises(InvalidArgument, match=match):
        export_bundle(ExportOptions(target=t, draft=d, out=tmp_path / "b", max_length=64, **opts))
    assert not (tmp_path / "b").exists()


def test_fp8_environment_failure_is_explained(checkpoints, tmp_path, monkeypatch):
    """ModelOpt's environment cannot be created (here: its path runs through a file): a clear error, nothing written."""
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("SPECEDGE_MODELOPT_ENV", str(tmp_path / "a-file" / "venv"))
    t, d = checkpoints("llama")
    with pytest.raises(ExportError, match="could not create the ModelOpt environment for FP8"):
        export_bundle(ExportOptions(target=t, draft=d, out=tmp_path / "b", device="trt", max_length=64))
    assert not (tmp_path / "b").exists()


def test_no_package_index_makes_modelopt_unavailable(tmp_path, monkeypatch):
    """pip cannot reach an index (here: told to use none): ModelOptUnavailable, which the FP8 test skips on, rather
    than a plain ExportError, which it does not."""
    monkeypatch.setenv("SPECEDGE_MODELOPT_ENV", str(tmp_path / "venv"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    with pytest.raises(ModelOptUnavailable, match="could not create the ModelOpt environment"):
        ensure_env()
    assert not (tmp_path / "venv").exists()


def test_gpt2_cannot_go_to_cuda(checkpoints, tmp_path):
    t, d = checkpoints("gpt2")
    with pytest.raises(ExportError, match="not supported by onnxruntime-genai's model builder"):
        export_bundle(ExportOptions(target=t, draft=d, out=tmp_path / "b", device="cuda", max_length=64))
    assert list(tmp_path.iterdir()) == []


def test_missing_providers_are_refused_not_faked(bundles):
    """onnxruntime falls back to the CPU when a GPU provider cannot start; the runtime refuses instead."""
    b = bundles("llama")
    with pytest.raises(InvalidArgument, match="must be one of"):
        Engine(b, provider="npu")
    if not HAS_CUDA:
        with pytest.raises(InvalidArgument, match="has no CUDA provider"):
            Engine(b, provider="cuda")
    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(InvalidArgument, match="no TensorRT provider"):
            Engine(b, provider="trt")
    try:
        import onnxruntime_ep_nv_tensorrt_rtx  # noqa: F401
    except ImportError:
        with pytest.raises(InvalidArgument, match="TensorRT-RTX provider is not installed"):
            Engine(b, provider="rtx")


# -- on a GPU ------------------------------------------------------------------------------------------------------
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu and a CUDA GPU")


@gpu
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_cuda_is_exact_and_device_resident(bundles, cuda_graph):
    engine = Engine(bundles("llama", device="cuda"), cuda_graph=cuda_graph)
    assert engine.target.device == engine.draft.device == "cuda"
    buffers = engine.target.buffers() + engine.draft.buffers()
    assert_exact(engine, "cuda")
    assert engine.target.buffers() + engine.draft.buffers() == buffers  # nothing reallocated, nothing copied
    # rollback on the device: the valid cache rows equal a fresh run's
    r = engine.generate(PROMPTS[2], max_new_tokens=30, k=4)
    assert r.stats.accept_hist[0] > 0
    t, fresh = engine.target, oracle(engine, "cuda")
    fresh.forward(t.seen[: t.pos])
    for layer in range(t.spec.num_layers):
        for a, b in zip(t.kv(layer), fresh.kv(layer)):
            np.testing.assert_allclose(a, b, atol=2e-2)  # fp16; a multi-token step rounds differently


@gpu
def test_cuda_graph_replay_matches_no_graph(bundles):
    b = bundles("llama", device="cuda")
    outs = [Engine(b, cuda_graph=g).generate(PROMPTS[1], max_new_tokens=32, k=4).token_ids for g in (False, True)]
    assert outs[0] == outs[1]
