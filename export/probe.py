"""The attention probe: the target graph's GroupQueryAttention nodes alone, written beside a quantized CPU target so
that the runtime can find, on the CPU it runs on, the context lengths where attention starts rounding another way
(runtime/switches.py says why and how). The nodes keep their attributes (heads, scale, sliding window, softcap);
rotary embedding is off and the inputs are random, because only the products' shapes choose MLAS's kernels and
strides."""
from __future__ import annotations

import json
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from ..runtime.switches import PROBE_FILE

KEEP = ("num_heads", "kv_num_heads", "scale", "local_window_size", "softcap")


def write_attention_probe(graph: Path, kv_dtype: str | None = None, out: Path | None = None) -> Path | None:
    """Write the probe for the builder graph file `graph` (one GroupQueryAttention node per distinct set of
    attributes) to PROBE_FILE beside it, where runtime/kv.open_model looks, or into folder `out`; None, writing
    nothing, when the graph has no such node. `kv_dtype`: the attention's type (float32, float16), by default the
    graph's own. The type matters: onnxruntime's CPU kernel converts a float16 cache to float32 buffers of its own,
    and on an AMD EPYC the float32 kernel's switches every 128 tokens are not there in float16."""
    graph = Path(graph)
    head_dim = json.loads((graph.parent / "genai_config.json").read_text())["model"]["decoder"]["head_size"]
    model = onnx.load(str(graph), load_external_data=False)
    kinds: dict[tuple, dict] = {}
    for node in model.graph.node:
        if node.op_type == "GroupQueryAttention" and node.domain == "com.microsoft":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name in KEEP}
            kinds.setdefault(tuple(sorted(attrs.items())), attrs)
    if not kinds:
        return None
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.input}
    past = next(n.input[3] for n in model.graph.node if n.op_type == "GroupQueryAttention")
    f = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}[kv_dtype] if kv_dtype else types[past]
    nodes, inputs, outputs = [], [], []
    for j, attrs in enumerate(kinds.values()):
        heads = {"query": attrs["num_heads"], "key": attrs["kv_num_heads"], "value": attrs["kv_num_heads"]}
        cache = ["batch", attrs["kv_num_heads"], "past", head_dim]
        io = [helper.make_tensor_value_info(f"{name}.{j}", f, ["batch", "seq", h * head_dim])
              for name, h in heads.items()]
        io += [helper.make_tensor_value_info(f"past_{kind}.{j}", f, cache) for kind in ("key", "value")]
        outs = [helper.make_tensor_value_info(f"out.{j}", f, ["batch", "seq", attrs["num_heads"] * head_dim]),
                *(helper.make_tensor_value_info(f"present_{kind}.{j}", f, cache) for kind in ("key", "value"))]
        inputs += io
        outputs += outs
        nodes.append(helper.make_node("GroupQueryAttention",
                                      [v.name for v in io] + ["seqlens_k", "total_sequence_length"],
                                      [v.name for v in outs], name=f"attention.{j}", domain="com.microsoft",
                                      do_rotary=0, **attrs))
    inputs += [helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
               helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, [])]
    g = helper.make_graph(nodes, "attention_probe", inputs, outputs)
    probe = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=model.ir_version)
    path = (Path(out) if out else graph.parent) / PROBE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(probe, str(path))   # into the export's temporary folder, renamed into place with the bundle
    return path
