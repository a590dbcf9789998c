"""The torch.onnx (dynamo) fallback exporter: concat-layout graphs match Hugging Face logits, incrementally and after
a rewind, both fed by hand and through runtime.KVModel."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("onnxscript")

from specedge.export.torch_export import export_concat  # noqa: E402
from specedge.models import tiny  # noqa: E402
from specedge.runtime.manifest import ModelSpec  # noqa: E402
from specedge.runtime.kv import open_model  # noqa: E402
from specedge.runtime.providers import make_session  # noqa: E402

TOL = 1e-4
T = 20


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny.train_tokenizer(tmp_path_factory.mktemp("tok"))


# Gemma 3 and the windowed Mistral: T = 20 tokens cross their 16-token window (Gemma 3 with per-layer RoPE scaling
# takes this path; its soft-capping-free text model, embedding scale and tied head must survive the trace).
@pytest.fixture(scope="module", params=["gpt2", "llama", "gemma3", "mistral-sw"])
def exported(request, tmp_path_factory, tok):
    """(interface, onnx path, HF logits [T, vocab] of `ids`, ids) for one tiny architecture."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp(request.param)
    model_dir = tiny.build_tiny(root / "hf", request.param, tok)
    info = export_concat(model_dir, root / "onnx" / "model.onnx")
    ids = torch.randint(3, info["vocab_size"], (1, T), generator=torch.Generator().manual_seed(0))
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(ids).logits[0].numpy()
    return info, root / "onnx" / "model.onnx", ref, ids[0].numpy()


def _step(sess, info, cache, pos, toks, rows=None):
    """One graph call for tokens at pos..pos+n-1 given the cache rows [0, pos): (logits [n, vocab], presents);
    `rows`: feed logits_from = -rows (a graph with graphs.select_rows applied), logits [rows, vocab]."""
    n = len(toks)
    feeds = {"input_ids": np.asarray(toks, np.int64)[None], "attention_mask": np.ones((1, pos + n), np.int64),
             "position_ids": np.arange(pos, pos + n, dtype=np.int64)[None]}
    if rows is not None:
        feeds["logits_from"] = np.array([-rows], np.int64)
    for i in range(info["num_layers"]):
        feeds[info["past_key"].format(i=i)] = cache[2 * i]
        feeds[info["past_value"].format(i=i)] = cache[2 * i + 1]
    out = sess.run(info["outputs"], feeds)
    return out[0][0], out[1:]


def test_interface(exported):
    info, path, _, _ = exported
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    assert [v.name for v in g.input] == info["inputs"]
    assert [v.name for v in g.output] == info["outputs"]
    L = info["num_layers"]
    assert info["inputs"] == ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{kv}" for i in range(L) for kv in ("key", "value")]
    assert info["outputs"] == ["logits"] + [f"present.{i}.{kv}" for i in range(L) for kv in ("key", "value")]

def test_full_and_incremental_and_rewind(exported):
    info, path, ref, ids = exported
    sess = make_session(str(path))
    H, D = info["num_kv_heads"], info["head_dim"]
    empty = [np.zeros((1, H, 0, D), np.float32)] * (2 * info["num_layers"])

    logits, _ = _step(sess, info, empty, 0, ids)                       # whole sequence, past = 0
    assert np.abs(logits - ref).max() < TOL

    errs = []
    logits, cache = _step(sess, info, empty, 0, ids[:7])               # prefill 7
    errs.append(np.abs(logits - ref[:7]).max())
    logits, cache = _step(sess, info, cache, 7, ids[7:12])             # 5-token step with past
    errs.append(np.abs(logits - ref[7:12]).max())
    after_step = cache
    for t in range(12, T):                                             # single-token steps
        logits, cache = _step(sess, info, cache, t, ids[t:t + 1])
        errs.append(np.abs(logits - ref[t:t + 1]).max())
    assert cache[0].shape == (1, H, T, D)
    assert max(errs) < TOL

    rewound = [c[:, :, :9] for c in after_step]                        # drop rows 9..11, replay from 9
    logits, cache = _step(sess, info, rewound, 9, ids[9:])
    assert np.abs(logits - ref[9:]).max() < TOL


def test_kvmodel(exported):
    info, path, ref, ids = exported
    spec = ModelSpec(role="target", architecture="x", model_type="x", parameters=0, precision="fp32",
                     provider="cpu", graph=path.name, kv_layout="concat", builder="torch.onnx",
                     inputs=tuple(info["inputs"]), outputs=tuple(info["outputs"]), past_key=info["past_key"],
                     past_value=info["past_value"], present_key=info["present_key"],
                     present_value=info["present_value"], num_layers=info["num_layers"],
                     num_kv_heads=info["num_kv_heads"], head_dim=info["head_dim"], vocab_size=info["vocab_size"],
                     max_length=64, kv_dtype="float32", rewindable=True)
    m = open_model(path.parent, spec)
    assert np.abs(m.forward(ids[:7]) - ref[:7]).max() < TOL
    assert np.abs(m.forward(ids[7:12]) - ref[7:12]).max() < TOL
    m.rewind(9)                                                         # rewind: the view drops rows 9..11
    assert np.abs(m.forward(ids[9:10]) - ref[9:10]).max() < TOL
    assert np.abs(m.forward(ids[10:]) - ref[10:]).max() < TOL
    assert m.pos == T
    k, v = m.kv(0)
    assert k.shape == v.shape == (info["num_kv_heads"], T, info["head_dim"])


def test_selected_rows(exported, tmp_path):
    """graphs.select_rows on the torch.onnx graph: fed nothing it equals the exported graph bit for bit; fed
    logits_from = -m it returns the last m rows of that graph's logits, for a prefill and for a step with past."""
    import shutil

    from specedge.export.graphs import select_rows
    from specedge.runtime.kv import LOGITS_FROM

    info, path, _, ids = exported
    shutil.copytree(path.parent, tmp_path / "onnx")
    assert select_rows(tmp_path / "onnx" / path.name) and select_rows(tmp_path / "onnx" / path.name)  # idempotent
    old, new = make_session(str(path)), make_session(str(tmp_path / "onnx" / path.name))
    assert LOGITS_FROM in [i.name for i in new.get_overridable_initializers()]
    H, D = info["num_kv_heads"], info["head_dim"]
    empty = [np.zeros((1, H, 0, D), np.float32)] * (2 * info["num_layers"])
    full, cache = _step(old, info, empty, 0, ids[:12])                  # (12, V)
    same, cache_new = _step(new, info, empty, 0, ids[:12])
    assert np.array_equal(full, same) and all(np.array_equal(a, b) for a, b in zip(cache, cache_new))
    step, _ = _step(old, info, cache, 12, ids[12:])                     # (T - 12, V), a step with past
    for pos, toks, ref in [(0, ids[:12], full), (12, ids[12:], step)]:
        for m in range(1, len(toks) + 1):
            got, present = _step(new, info, empty if pos == 0 else cache, pos, toks, rows=m)
            assert got.shape == (m, info["vocab_size"])
            np.testing.assert_allclose(got, ref[-m:], rtol=0, atol=1e-5)
            assert present[0].shape == (1, H, pos + len(toks), D)       # the cache gets every row regardless


def test_int4_quantizes_a_tied_head(tmp_path, tok):
    """A tied LM head is MatMul(h, Transpose(embedding)) in torch.onnx graphs; the int4 draft must quantize it too."""
    import onnx

    from specedge.export.graphs import quantize_matmul_nbits, weight_bytes_per_step

    path = tmp_path / "onnx" / "model.onnx"
    info = export_concat(tiny.build_tiny(tmp_path / "hf", "smollm2", tok), path)
    fp32 = weight_bytes_per_step(path)
    quantize_matmul_nbits(path, bits=4)
    g = onnx.load(str(path)).graph
    consts = {t.name for t in g.initializer} | {n.output[0] for n in g.node if n.op_type == "Transpose"
                                                and n.input[0] in {t.name for t in g.initializer}}
    assert not [n.name for n in g.node if n.op_type == "MatMul" and n.input[1] in consts]  # no fp32 weight left
    assert weight_bytes_per_step(path) < fp32 / 5     # 4 bits + an fp32 scale per 32 weights = 1/6.4 of fp32
    logits = onnxruntime_logits(path, info)
    assert logits.shape[-1] == info["vocab_size"] and np.isfinite(logits).all()


def onnxruntime_logits(path, info):
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    n = 5
    feeds = {"input_ids": np.arange(3, 3 + n)[None], "attention_mask": np.ones((1, n), np.int64),
             "position_ids": np.arange(n)[None]}
    empty = np.zeros((1, info["num_kv_heads"], 0, info["head_dim"]), np.float32)
    feeds.update({t.format(i=i): empty for i in range(info["num_layers"]) for t in (info["past_key"],
                                                                                   info["past_value"])})
    return s.run(["logits"], feeds)[0]
