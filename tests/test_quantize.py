"""export/quantize.py on a tiny random Gemma 3: the step check passes on fp32, catches a graph whose rows depend on
the step's width, and shows (and pins) why int8-compute int4 graphs need a minimum step width on onnxruntime's CPU
provider."""
from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from specedge.export.graphs import build_graph
from specedge.export.quantize import (choose_precision, distance, min_exact_width, open_graph, quantize_graph,
                                       step_consistency)


@pytest.fixture(scope="module")
def graphs(tmp_path_factory, checkpoints):
    """{"fp32": dir, "int4": dir (accuracy_level 4), "skewed": dir}: builder graphs of the tiny Gemma 3 target."""
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    root = tmp_path_factory.mktemp("quantize")
    target, _ = checkpoints("gemma3")
    build_graph(target, root / "fp32", "fp32", "cpu", root / "log.txt")
    quantize_graph(root / "fp32", root / "int4", bits=4, accuracy_level=4)
    _skew(root / "fp32", root / "skewed")
    return {name: root / name / "model.onnx" for name in ("fp32", "int4", "skewed")}


def _skew(src, out, token: int = 7) -> None:
    """A copy of the fp32 graph whose logits for `token` grow by 100 per extra token in the step: one-token steps
    are unchanged, a verify pass picks `token` everywhere. Inconsistent by construction, through real onnxruntime."""
    m = onnx.load(str(src / "model.onnx"))
    g = m.graph
    vocab = next(o for o in g.output if o.name == "logits").type.tensor_type.shape.dim[-1].dim_value
    producer = next(n for n in g.node if "logits" in n.output)
    producer.output[list(producer.output).index("logits")] = "logits_raw"
    hot = np.zeros(vocab, np.float32)
    hot[token] = 100.0
    g.initializer.extend([numpy_helper.from_array(hot, "skew_hot"), numpy_helper.from_array(np.array([1], np.int64),
                                                                                            "skew_one")])
    g.node.extend([
        helper.make_node("Shape", ["input_ids"], ["skew_shape"], start=1, end=2),   # (1,) = n
        helper.make_node("Sub", ["skew_shape", "skew_one"], ["skew_extra"]),          # n - 1
        helper.make_node("Cast", ["skew_extra"], ["skew_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["skew_f", "skew_hot"], ["skew_add"]),               # (vocab,)
        helper.make_node("Add", ["logits_raw", "skew_add"], ["logits"]),
    ])
    out.mkdir(parents=True)
    (out / "genai_config.json").write_bytes((src / "genai_config.json").read_bytes())
    onnx.save(m, str(out / "model.onnx"), save_as_external_data=True, location="model.onnx.data")


def _prompts(graph, n=2, length=45):
    vocab = open_graph(graph).spec.vocab_size
    rng = np.random.default_rng(0)
    return [rng.integers(3, vocab, length).tolist() for _ in range(n)]


def test_fp32_graph_is_step_consistent(graphs):
    rep = step_consistency(graphs["fp32"], _prompts(graphs["fp32"]))
    assert rep.argmax_ok, rep.summary()
    assert all(w.max_logit_diff < 1e-3 and w.max_kv_diff < 1e-4 for w in rep.widths), rep.summary()
    assert [w.width for w in rep.widths] == list(range(1, 34))
    assert rep.widths[0].bitwise   # width 1 against single steps is the same computation


def test_step_check_catches_rows_that_depend_on_the_width(graphs):
    rep = step_consistency(graphs["skewed"], _prompts(graphs["skewed"]), widths=(1, 2, 5))
    assert not rep.argmax_ok and not rep.exact
    one, two, five = rep.widths
    assert one.argmax_ok and one.bitwise                       # a one-token step is the unskewed graph
    assert not two.argmax_ok and two.max_logit_diff >= 99      # every row of a 2-token step: +100 on token 7
    assert five.argmax_agree < five.positions and five.max_logit_diff >= 399
    assert one.max_kv_diff == 0 and two.max_kv_diff < 1e-4      # the skew is after the cache: rows as in fp32


def test_int8_compute_rows_need_two_token_steps(graphs):
    """onnxruntime's CPU kernels compute a one-token step (MatMulNBits' and SGEMM's M = 1 paths) differently from
    a row of a wider step. Padding every step to 2 tokens makes widths 2..32 bitwise identical to single steps; a
    width with one row past a multiple of 32 (33) still differs, so the runtime pads it to 34."""
    prompts = _prompts(graphs["int4"])
    loose = step_consistency(graphs["int4"], prompts, widths=range(1, 9))
    assert not loose.exact and loose.widths[0].bitwise
    width, rep = min_exact_width(graphs["int4"], prompts, widths=range(1, 33))
    assert width == 2, rep.summary()
    assert not step_consistency(graphs["int4"], prompts, widths=(33,), min_width=2).exact


def test_distance_is_zero_to_itself_and_positive_for_int4(graphs):
    prompts = _prompts(graphs["fp32"], n=2, length=20)
    same = distance(graphs["fp32"], graphs["fp32"], prompts, new_tokens=8)
    assert same.positions == 16 and same.top1_agreement == 1.0 and abs(same.mean_kl) < 1e-9
    q = distance(graphs["int4"], graphs["fp32"], prompts, new_tokens=8)
    assert q.mean_kl > 1e-6 and 0.0 <= q.top1_agreement <= 1.0


def test_auto_precision_says_why_it_falls_back(graphs, tmp_path):
    """On the tiny model no quantized graph is exact at width 33 (see above): auto keeps fp32 and says why. (No
    distance bar here: a graph under it is refused before its step check.)"""
    prompts = _prompts(graphs["fp32"])
    choice = choose_precision(graphs["fp32"].parent, tmp_path, prompts, prompts, min_top1=0.0)
    assert choice.precision == "fp32" and choice.min_width == 1 and choice.graph == graphs["fp32"]
    assert [r.split(":")[0] for r in choice.reasons] == ["int4 (block 32)", "int8 (block 64)", "int8 (block 32)",
                                                         "fp32"]
    assert "not exact" in choice.reasons[0] and "not at [33]" in choice.reasons[0]


def test_half_kv_stores_the_cache_in_float16_and_changes_nothing_else(graphs, tmp_path):
    """graphs.half_kv on the fp32 graph: the runtime binds float16 KV buffers, the cache holds what the fp32 graph's
    holds to float16's precision, and the logits stay within float16 rounding of fp32's (same argmax)."""
    from specedge.export.graphs import half_kv

    m = onnx.load(str(graphs["fp32"]))
    attention = sum(n.op_type == "GroupQueryAttention" for n in m.graph.node)
    assert half_kv(m) == attention > 0 and half_kv(m) == 0      # once: a float16 cache is left alone
    (tmp_path / "half").mkdir()
    onnx.save(m, str(tmp_path / "half" / "model.onnx"))
    (tmp_path / "half" / "genai_config.json").write_bytes((graphs["fp32"].parent / "genai_config.json").read_bytes())
    ids = _prompts(graphs["fp32"], n=1, length=40)[0]
    full, half = open_graph(graphs["fp32"]), open_graph(tmp_path / "half" / "model.onnx")
    assert (full.spec.kv_dtype, half.spec.kv_dtype) == ("float32", "float16")
    a, b = full.forward(ids), half.forward(ids)                                # (40, vocab) each
    assert (a.argmax(-1) == b.argmax(-1)).all() and np.abs(a - b).max() < 1e-2 * np.abs(a).max()
    for layer in range(full.spec.num_layers):
        for x, y in zip(full.kv(layer), half.kv(layer)):
            assert y.dtype == np.float16 and np.allclose(x, y, rtol=2e-3, atol=2e-3)
