"""The attention probe (runtime/switches.py, export/probe.py): where onnxruntime's CPU attention rounds another way
by context length on the CPU running the tests, checked against a slow oracle that runs every pass position.

The attention is Gemma 3 270M's (head_dim 256, 4 query heads, 1 KV head; a 512-token sliding window and a global
layer), the shape the switches were found on; the weights do not matter, only the products' sizes choose MLAS's
kernels. Where this CPU has no switch the cuts are empty and the oracle still has to agree."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from specedge.export.probe import write_attention_probe
from specedge.runtime.switches import PROBE_FILE, Probe, attention_cuts

HEAD_DIM, HEADS, KV_HEADS, WINDOW = 256, 4, 1, 512
LENGTH, MIN_STEP, WIDTH = 700, 2, 33          # past 64 + WINDOW: the sliding layer's first switch on a Xeon


@pytest.fixture(scope="module", params=["float32", "float16"])
def probe(tmp_path_factory, request):
    """A stand-in for a builder graph (its attention nodes and what the probe reads), and the probe written from it
    in each KV type a target runs with (float16: a quantized CPU target's, export/quantize.KV_DTYPE)."""
    d = tmp_path_factory.mktemp("attn")
    f, i32 = TensorProto.FLOAT, TensorProto.INT32
    inputs, nodes, outputs = [], [], []
    for j, window in enumerate((WINDOW, -1)):
        io = [helper.make_tensor_value_info(f"{name}.{j}", f, ["b", "s", h * HEAD_DIM])
              for name, h in (("q", HEADS), ("k", KV_HEADS), ("v", KV_HEADS))]
        io += [helper.make_tensor_value_info(f"past_key_values.{j}.{kind}", f, ["b", KV_HEADS, "p", HEAD_DIM])
               for kind in ("key", "value")]
        inputs += io
        outs = [f"out.{j}", f"present.{j}.key", f"present.{j}.value"]
        outputs += [helper.make_tensor_value_info(o, f, None) for o in outs]
        nodes.append(helper.make_node("GroupQueryAttention", [v.name for v in io] + ["seqlens_k", "total"], outs,
                                      domain="com.microsoft", num_heads=HEADS, kv_num_heads=KV_HEADS,
                                      scale=HEAD_DIM ** -0.5, local_window_size=window, softcap=0.0))
    inputs += [helper.make_tensor_value_info("seqlens_k", i32, ["b"]),
               helper.make_tensor_value_info("total", i32, [])]
    g = helper.make_graph(nodes, "g", inputs, outputs)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    onnx.save(helper.make_model(g, opset_imports=opsets), str(d / "model.onnx"))
    (d / "genai_config.json").write_text(json.dumps({"model": {"decoder": {"head_size": HEAD_DIM}}}))
    path = write_attention_probe(d / "model.onnx", request.param)
    assert path == d / PROBE_FILE
    kinds = {i.type.tensor_type.elem_type for i in onnx.load(str(path)).graph.input if i.name != "seqlens_k" and
             i.name != "total_sequence_length"}
    assert kinds == {helper.np_dtype_to_tensor_dtype(np.dtype(request.param))}
    return str(path)


def test_the_probe_keeps_each_kind_of_attention_once(probe):
    nodes = onnx.load(probe).graph.node
    assert [n.op_type for n in nodes] == ["GroupQueryAttention"] * 2
    windows = sorted(a.i for n in nodes for a in n.attribute if a.name == "local_window_size")
    assert windows == [-1, WINDOW]


def test_split_at_the_cuts_every_pass_computes_its_rows_as_single_steps_do(probe):
    """The oracle: a pass of WIDTH rows at every position, split where attention_cuts says, against padded single
    steps, bit for bit; and each cut is needed: some pass across it, unsplit, parts from the single steps."""
    cuts = attention_cuts(probe, LENGTH, MIN_STEP, WIDTH, 0)
    assert list(cuts) == sorted(set(cuts)) and all(0 < c < LENGTH for c in cuts)
    p = Probe(probe, LENGTH + MIN_STEP - 1)
    single = np.stack([p.run(r, MIN_STEP)[0] for r in range(LENGTH)])           # (LENGTH, width)
    needed = set()
    for start in range(LENGTH - WIDTH + 1):
        bounds = [start, *(c for c in cuts if start < c < start + WIDTH), start + WIDTH]
        # (WIDTH, width); a part narrower than MIN_STEP padded, as KVModel._last pads it
        split = np.concatenate([p.run(a, max(b - a, MIN_STEP))[: b - a] for a, b in zip(bounds, bounds[1:])])
        rows = WIDTH - MIN_STEP + 1           # the last rows' single steps reach past the pass's context
        assert np.array_equal(split[:rows], single[start : start + rows]), (start, cuts)
        if len(bounds) > 2 and not np.array_equal(p.run(start, WIDTH)[:rows], single[start : start + rows]):
            needed.update(bounds[1:-1])
    assert needed == set(cuts)
