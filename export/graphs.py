"""Turn one Hugging Face checkpoint into one ONNX decoder graph plus the facts the runtime needs (a ModelSpec).

Preferred: onnxruntime-genai's model builder (GroupQueryAttention with in-place KV, MatMulNBits for int4/int8).
Fallback for architectures it lacks (GPT-2): torch.onnx.export(dynamo=True) with a flat concat-KV interface.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx

from ..runtime.errors import ExportError
from .check import TOKENIZER_FILES, layer_windows
from .osutil import die_with_parent, save_graph
from .draft_vocab import lm_head, map_sha256, reduce_head
from .torch_export import PAST_KEY, PAST_VALUE, PRESENT_KEY, PRESENT_VALUE
from ..runtime.kv import LOGITS_FROM
from ..runtime.manifest import PRECISIONS  # noqa: F401  (re-exported: the exporter's precisions are the manifest's)

# Architectures the builder handles with plain full attention (checked against onnxruntime-genai 0.18).
BUILDER_ARCHS = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                 "Phi3ForCausalLM", "GemmaForCausalLM", "GraniteForCausalLM", "OlmoForCausalLM",
                 "SmolLM3ForCausalLM", "NemotronForCausalLM", "PhiForCausalLM", "Gemma2ForCausalLM",
                 "Gemma3ForCausalLM"}
BUILDER_EP = {"cpu": "cpu", "cuda": "cuda", "rtx": "NvTensorRtRtx"}


def build_graph(model_dir: Path, out_dir: Path, precision: str, device: str, log: Path,
                calibration: list[list[int]] = (), head_rows=None) -> dict:
    """Export model_dir into out_dir/model.onnx; return the graph facts for the manifest (without role/params).
    `calibration`: token id lists for FP8 calibration. `head_rows`: target ids to keep in the LM head (a reduced
    draft vocabulary, see draft_vocab.py); None keeps them all."""
    config = json.loads((model_dir / "config.json").read_text())
    arch = config["architectures"][0]
    windows = layer_windows({**(config.get("text_config") or {}), **config})
    out_dir.mkdir(parents=True, exist_ok=True)
    if device in BUILDER_EP and arch in BUILDER_ARCHS and not builder_problem(config):
        facts = _builder(model_dir, out_dir, precision, BUILDER_EP[device], log)
        _check_windows(out_dir / "model.onnx", windows)
    elif device in ("cpu", "trt"):  # native TensorRT reads plain ONNX ops: always the torch.onnx graph
        facts = _fallback(model_dir, out_dir, precision, arch, log, calibration)
    else:
        raise ExportError(f"{arch} is not supported by onnxruntime-genai's model builder, whose in-place KV graphs "
                          f"--device {device} needs; export it with --device cpu or --device trt")
    if device not in ("rtx", "trt") and not select_rows(out_dir / "model.onnx"):
        with open(log, "a") as f:
            f.write(f"note: {out_dir.name}'s LM head was not found; the graph computes logits for every position\n")
    if head_rows is not None:
        reduce_head(out_dir / "model.onnx", head_rows)
        facts = dict(facts, draft_vocab=len(head_rows), vocab_map_sha256=map_sha256(head_rows))
    add_argmax(out_dir / "model.onnx")
    return dict(facts, windows=windows, **graph_io(out_dir / "model.onnx"))


def builder_problem(config: dict) -> str:
    """Why the model builder would export this checkpoint wrongly ('' if it will not); then torch.onnx does it."""
    rope = config.get("rope_parameters") or {}
    if "full_attention" in rope and any(r.get("rope_type", "default") != "default" for r in rope.values()):
        # Per-layer-type scaled RoPE (Gemma 3 4B+: linear x8 on global layers only): the builder applies one
        # scaling to the caches of both layer types.
        return "per-layer-type RoPE scaling"
    return ""


def _check_windows(path: Path, windows: tuple[int, ...]) -> None:
    """The graph must apply each layer's window as a mask over a full-length buffer: the window transformers uses
    (a builder that drops it gives other logits past the window) and no ring buffer (which cannot be rewound)."""
    m = onnx.load(str(path), load_external_data=False)
    attn = [n for n in m.graph.node if n.op_type == "GroupQueryAttention"]
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in attn]
    if len(attrs) != len(windows):
        return  # not one GroupQueryAttention per layer (fp16 CPU graphs): parity is the check there
    got = tuple(max(0, a.get("local_window_size", -1)) for a in attrs)
    if got != windows:
        raise ExportError(f"the model builder applied sliding windows {got} but the checkpoint's layers use "
                          f"{windows} (0 = global); report it, and export with --device cpu meanwhile")
    if any(a.get("sliding_window_cache") for a in attrs):
        raise ExportError("the model builder wrote window-sized ring-buffer KV caches, which cannot be rewound; "
                          "this onnxruntime-genai ignored windowed_kv_cache=false: use version 0.18")


def _builder(model_dir: Path, out_dir: Path, precision: str, device: str, log: Path) -> dict:
    cache = out_dir.parent / f".cache-{out_dir.name}"
    # Through genai_builder, which adapts the configs the builder misreads (windows, Gemma 3's RoPE). Full-length
    # KV buffers for sliding-window layers too: the window is then a mask, and rewinding stays an integer.
    cmd = [sys.executable, "-m", "specedge.export.genai_builder", "-i", str(model_dir), "-o", str(out_dir),
           "-p", precision, "-e", device, "-c", str(cache), "--extra_options", "windowed_kv_cache=false"]
    # The builder prints a lot and its --help crashes; run it apart and keep its log for the error message.
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                           preexec_fn=die_with_parent)
    shutil.rmtree(cache, ignore_errors=True)
    if r.returncode != 0:
        tail = "".join(open(log).readlines()[-15:])
        raise ExportError(f"onnxruntime-genai's model builder failed on {model_dir} (exit {r.returncode}); "
                          f"last lines of {log.name}:\n{tail}")
    for extra in TOKENIZER_FILES:
        (out_dir / extra).unlink(missing_ok=True)  # the bundle keeps one copy of the tokenizer, at its root
    genai = json.loads((out_dir / "genai_config.json").read_text())["model"]["decoder"]
    return dict(builder="onnxruntime-genai model builder",
                past_key=PAST_KEY, past_value=PAST_VALUE, present_key=PRESENT_KEY, present_value=PRESENT_VALUE,
                num_layers=genai["num_hidden_layers"], num_kv_heads=genai["num_key_value_heads"],
                head_dim=genai["head_size"])


def _fallback(model_dir: Path, out_dir: Path, precision: str, arch: str, log: Path,
              calibration: list[list[int]]) -> dict:
    from .torch_export import export_concat

    if precision == "fp16":
        raise ExportError(f"{arch} is exported through torch.onnx (the model builder does not support it), "
                          f"which produces fp32 graphs here: use --*-precision fp32, int8 or int4")
    path = out_dir / "model.onnx"
    iface = export_concat(model_dir, path)
    if precision in ("int4", "int8"):
        quantize_matmul_nbits(path, bits=4 if precision == "int4" else 8)
    elif precision == "fp8":
        from .fp8 import quantize_fp8

        n = min(len(c) for c in calibration)  # one batch of equal-length prefills of real text
        empty = np.zeros((len(calibration), iface["num_kv_heads"], 0, iface["head_dim"]), np.float32)
        feeds = {"input_ids": np.array([c[:n] for c in calibration], np.int64),
                 "attention_mask": np.ones((len(calibration), n), np.int64),
                 "position_ids": np.tile(np.arange(n, dtype=np.int64), (len(calibration), 1))}
        feeds.update({t.format(i=i): empty for i in range(iface["num_layers"])
                      for t in (iface["past_key"], iface["past_value"])})
        quantize_fp8(path, {k: v for k, v in feeds.items() if k in iface["inputs"]}, log)
    return dict(builder="torch.onnx.export(dynamo=True)",
                past_key=iface["past_key"], past_value=iface["past_value"], present_key=iface["present_key"],
                present_value=iface["present_value"], num_layers=iface["num_layers"],
                num_kv_heads=iface["num_kv_heads"], head_dim=iface["head_dim"])


def quantize_matmul_nbits(path: Path, bits: int) -> None:
    """Weight-only block quantization (MatMulNBits): step-consistent, unlike quantize_dynamic's per-tensor
    activation scales, which make a multi-token step disagree with one-by-one decoding. Every weight MatMul is
    quantized, a tied LM head included (see untie_transposed_weights)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(path))
    untie_transposed_weights(model)
    q = MatMulNBitsQuantizer(model, bits=bits, block_size=32, is_symmetric=True)
    q.process()
    save_graph(q.model.model, path)


def untie_transposed_weights(model: onnx.ModelProto) -> int:
    """Give each MatMul fed by Transpose(initializer) its own transposed initializer; return how many.

    torch.onnx writes a tied LM head as MatMul(h, Transpose(embedding)). The quantizer only takes MatMuls whose
    weight is an initializer, so the head (a 262k x 640 matrix in Gemma 3, most of a small model's bytes per step)
    stayed fp32 in int4 drafts. The embedding's Gather keeps the fp32 table (it reads one row per token); the head
    gets an int4 copy: the file grows by an eighth of the head, each step reads an eighth of it."""
    from onnx import numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    users: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            users[i] = users.get(i, 0) + 1
    done = 0
    for n in g.node:
        if n.op_type != "MatMul" or len(n.input) < 2:
            continue
        t = producer.get(n.input[1])
        if t is None or t.op_type != "Transpose" or t.input[0] not in inits:
            continue
        w = numpy_helper.to_array(inits[t.input[0]])
        perm = next((list(a.ints) for a in t.attribute if a.name == "perm"), None)
        if w.ndim != 2 or perm not in (None, [1, 0]):
            continue
        name = f"{t.input[0]}.T"
        g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w.T), name))
        n.input[1] = name
        users[t.output[0]] -= 1
        if users[t.output[0]] == 0:
            g.node.remove(t)
        done += 1
    return done


def half_kv(model: onnx.ModelProto) -> int:
    """Keep the KV cache in float16: every GroupQueryAttention of a float32 graph gets its float inputs (query, key,
    value, the rotary caches) as float16 and its output cast back to float32, and the past/present inputs and
    outputs become float16. Returns how many attention nodes changed (0: none, or none in float32).

    Why, on the CPU: attention reads the whole cache every step, 36 KB per token for Gemma 3 270M's 18 layers in
    float32, and at a few hundred tokens of context that rivals the weights' bytes. onnxruntime's CPU kernel
    converts a float16 cache to float32 buffers of its own and multiplies in float32; what is rounded to float16 is
    what is stored (each K/V row, each head's output). Its products round by context length where the float32
    kernel's do not (the attention probe is written in the cache's type), so quantize.choose_precision checks a
    candidate with both caches. Gemma 3 270M int8, 2 cores, against the float32 cache: half the cache's memory;
    plain decoding 0.97x after 64 tokens of context, 1.03-1.11x after 300-800
    (benchmarks/results/int4-consistency-speed-gemma-int8-kv16-vs-kv32-ctx*.json); in issue 23's table, interleaved,
    decode 1.00-1.02x, time to first token 0.82-0.85x (fewer context switches to split prompt reads at on an AMD
    EPYC), end to end 1.03-1.06x (gemma3-270m-vs-llamacpp-x86_64-2core-epyc-kv16.json, plain-compare)."""
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    io = {v.name: v for v in [*g.input, *g.output]}
    nodes, halved, changed = [], {}, 0
    for n in g.node:
        if n.op_type != "GroupQueryAttention" or io[n.input[3]].type.tensor_type.elem_type != TensorProto.FLOAT:
            nodes.append(n)
            continue
        # query, key, value, the rotary cos/sin caches, attention bias, head sink: float (T); the rest are ints
        for j in (0, 1, 2, 7, 8, 10, 11):
            name = n.input[j] if j < len(n.input) else ""
            if not name:
                continue
            if name not in halved:
                halved[name] = f"{name}/float16"
                if name in inits:
                    g.initializer.append(numpy_helper.from_array(
                        numpy_helper.to_array(inits[name]).astype(np.float16), halved[name]))
                else:
                    nodes.append(helper.make_node("Cast", [name], [halved[name]], to=TensorProto.FLOAT16,
                                                  name=f"{halved[name]}/Cast"))
            n.input[j] = halved[name]
        for name in (n.input[3], n.input[4], n.output[1], n.output[2]):   # past and present K/V
            io[name].type.tensor_type.elem_type = TensorProto.FLOAT16
        out = n.output[0]
        n.output[0] = f"{out}/float16"
        nodes += [n, helper.make_node("Cast", [n.output[0]], [out], to=TensorProto.FLOAT, name=f"{out}/Cast")]
        changed += 1
    del g.node[:]
    g.node.extend(nodes)
    used = {i for n in g.node for i in n.input}
    unused = [t for t in g.initializer if t.name in halved and t.name not in used]   # float32 rotary caches
    for t in unused:
        g.initializer.remove(t)
    return changed


ATTENTION_ROWS = "specedge_attention_rows"   # the initializer pad_attention leaves: graph_io reads it back


def pad_attention(model: onnx.ModelProto, rows: int = 2) -> int:
    """Every GroupQueryAttention computes at least `rows` query rows, whatever the step's width: a narrower step's
    query/key/value get their last row repeated (Pad, edge) and the last position it writes (seqlens_k) grows to
    match; the output is cut back to the step's rows. Returns how many attention nodes changed (0: none, or done).

    Why: onnxruntime's CPU attention computes a one-row step with other kernels (MLAS's GEMV for P·V) than the same
    row in a wider pass, so a quantized target needs every step at least 2 rows wide to stay exact
    (export/quantize.py). Padding the whole step (kv.KVModel._last, min_step) also runs every MatMulNBits, most of
    the step's time, on the pad row, where MatMulNBits' one-row kernel gives the row of a wider product bit for bit
    (8 bits at blocks 32 and 64 on the AMD EPYC; the export's step check decides). Padded here, only attention does
    the extra row. The repeated row writes its K/V one position past the step, which the mask hides and the next
    step overwrites, as with min_step: the cache keeps rows - 1 rows of room (ModelSpec.attention_rows)."""
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    gqa = [n for n in g.node if n.op_type == "GroupQueryAttention"]
    if not gqa or any(t.name == ATTENTION_ROWS for t in g.initializer):
        return 0
    # one shared subgraph: s = the step's width, extra = max(rows - s, 0) as the Pad's pads and in int32
    p = "/specedge/pad_attention"
    g.initializer.extend([numpy_helper.from_array(np.array([rows], np.int64), ATTENTION_ROWS),
                          numpy_helper.from_array(np.array([0], np.int64), f"{p}/zero"),
                          numpy_helper.from_array(np.array([1], np.int64), f"{p}/one"),
                          numpy_helper.from_array(np.zeros(4, np.int64), f"{p}/zeros4")])
    shared = [
        helper.make_node("Shape", ["input_ids"], [f"{p}/s"], start=1, end=2, name=f"{p}/Shape"),   # [1] int64
        helper.make_node("Sub", [ATTENTION_ROWS, f"{p}/s"], [f"{p}/short"], name=f"{p}/Sub"),
        helper.make_node("Max", [f"{p}/short", f"{p}/zero"], [f"{p}/extra"], name=f"{p}/Max"),   # [1] int64
        helper.make_node("Concat", [f"{p}/zeros4", f"{p}/extra", f"{p}/zero"], [f"{p}/pads"], axis=0,
                         name=f"{p}/pads"),                                                      # (B, S, D) pads
        helper.make_node("Cast", [f"{p}/extra"], [f"{p}/extra32"], to=TensorProto.INT32, name=f"{p}/Cast"),
    ]
    nodes, grown = shared, {}   # the shared nodes read only input_ids and constants: first
    for n in g.node:
        if n.op_type != "GroupQueryAttention":
            nodes.append(n)
            continue
        for j in (0, 1, 2):   # query, key, value (key and value empty where the query is packed)
            if j < len(n.input) and n.input[j]:
                name = n.input[j]
                nodes.append(helper.make_node("Pad", [name, f"{p}/pads"], [f"{name}/padded"], mode="edge",
                                              name=f"{name}/Pad"))
                n.input[j] = f"{name}/padded"
        # seqlens_k (B,), the last position each sequence writes, grows; total_sequence_length stays: with the
        # in-place cache it is the buffer's length (a bound), which holds the extra row (attention_rows)
        if n.input[5] not in grown:
            grown[n.input[5]] = f"{n.input[5]}/padded"
            nodes.append(helper.make_node("Add", [n.input[5], f"{p}/extra32"], [grown[n.input[5]]],
                                          name=f"{n.input[5]}/Add"))
        n.input[5] = grown[n.input[5]]
        out = n.output[0]
        n.output[0] = f"{out}/padded"
        nodes += [n, helper.make_node("Slice", [n.output[0], f"{p}/zero", f"{p}/s", f"{p}/one"], [out],
                                      name=f"{out}/Slice")]
    del g.node[:]
    g.node.extend(nodes)
    return len(gqa)


def weight_bytes_per_step(path: Path) -> int:
    """Bytes of weights one decode step reads: every constant a MatMul/MatMulNBits/Gemm multiplies by (through a
    Transpose too). Embedding tables are left out: a Gather reads one row per token."""
    from onnx import numpy_helper

    m = onnx.load(str(path))
    inits = {t.name: t for t in m.graph.initializer}
    producer = {o: n for n in m.graph.node for o in n.output}
    total = 0
    for n in m.graph.node:
        if n.op_type not in ("MatMul", "MatMulNBits", "Gemm"):
            continue
        for name in n.input[1:]:
            src = producer.get(name)
            if src is not None and src.op_type == "Transpose":
                name = src.input[0]
            if name in inits:
                total += numpy_helper.to_array(inits[name]).nbytes
    return total


def select_rows(path: Path) -> bool:
    """Add the optional input `logits_from` (int64 [1], default [0]): the LM head reads hidden[:, logits_from:, :],
    a Python slice start over the step's positions, so -m computes the logits (and argmax) of the last m positions
    only and the default 0 computes all of them. Return False (graph unchanged) where no MatMul head is found.

    A start rather than a count: it is Slice's own `starts` input, so the graph gains one node and no arithmetic
    (on a GPU, Slice reads its starts on the host, where kv.py binds them).
    The default is an initializer of the same name, which a feed overrides (ONNX IR >= 4): onnxruntime-genai,
    which runs these graphs too and knows nothing of the input, gets every row as before. The KV cache is written
    before the head, so it does not depend on the rows chosen. Not added for TensorRT (rtx, trt), where a slice
    start fed at run time becomes a shape input its engines would need profiles for.

    Prompt reads are what it is for: Gemma 3 270M's tied 262k-row head is 63% of its weights, and a 300-token
    prefill whose logits nobody reads spends most of its time there."""
    m = onnx.load(str(path), load_external_data=False)  # weights stay where they are, referenced by file name
    g = m.graph
    if any(i.name == LOGITS_FROM for i in g.input):
        return True
    producer = {o: n for n in g.node for o in n.output}
    head = lm_head(g, producer)
    logits = next(o for o in g.output if o.name == "logits")
    if head is None or len(logits.type.tensor_type.shape.dim) != 3:  # [b, n, V]: the head reads [b, n, hidden]
        return False
    hidden, kept = head.input[0], f"{head.input[0]}/{LOGITS_FROM}"
    g.initializer.extend([onnx.numpy_helper.from_array(np.array([0], np.int64), LOGITS_FROM),
                          onnx.numpy_helper.from_array(np.array([np.iinfo(np.int64).max], np.int64),
                                                       f"{LOGITS_FROM}/end"),
                          onnx.numpy_helper.from_array(np.array([1], np.int64), f"{LOGITS_FROM}/axis")])
    g.input.append(onnx.helper.make_tensor_value_info(LOGITS_FROM, onnx.TensorProto.INT64, [1]))
    g.node.insert(list(g.node).index(head), onnx.helper.make_node(
        "Slice", [hidden, LOGITS_FROM, f"{LOGITS_FROM}/end", f"{LOGITS_FROM}/axis"], [kept],
        name=f"/{LOGITS_FROM}/Slice"))
    head.input[0] = kept
    # Shapes recorded from the head on hold the step's length, which the logits no longer have: drop them, and give
    # the output's row axis its own name (onnxruntime reuses buffers between tensors of equal symbolic shape).
    after, stack = set(), [kept]
    while stack:
        t = stack.pop()
        for n in g.node:
            if t in n.input:
                stack.extend(o for o in n.output if o not in after)
                after.update(n.output)
    keep = [v for v in g.value_info if v.name not in after]
    del g.value_info[:]
    g.value_info.extend(keep)
    logits.type.tensor_type.shape.dim[1].dim_param = "logits_length"
    onnx.save(m, str(path))
    return True


def add_argmax(path: Path) -> None:
    """Append an `argmax` output [batch, n] int64 = argmax of the logits over the vocabulary. Greedy decoding then
    reads n integers per step instead of n x vocab logits: on a GPU the logits never leave the device."""
    m = onnx.load(str(path), load_external_data=False)  # weights stay where they are, referenced by file name
    g = m.graph
    if any(o.name == "argmax" for o in g.output):
        return
    src, logits = "logits", next(o for o in g.output if o.name == "logits")
    if logits.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        # ArgMax has no fp16 kernel on the CPU; casting (n, vocab) on the device costs microseconds.
        g.node.append(onnx.helper.make_node("Cast", ["logits"], ["logits_fp32"], to=onnx.TensorProto.FLOAT))
        src = "logits_fp32"
    g.node.append(onnx.helper.make_node("ArgMax", [src], ["argmax"], axis=-1, keepdims=0))  # first max on ties
    rows = [d.dim_param or d.dim_value for d in logits.type.tensor_type.shape.dim[:2]]   # the logits' [b, n]
    g.output.append(onnx.helper.make_tensor_value_info("argmax", onnx.TensorProto.INT64, rows))
    onnx.save(m, str(path))


_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16"}


def graph_io(path: Path) -> dict:
    m = onnx.load(str(path), load_external_data=False)
    g = m.graph
    inputs = tuple(i.name for i in g.input)
    outputs = tuple(o.name for o in g.output)
    logits = next(o for o in g.output if o.name == "logits")
    vocab = logits.type.tensor_type.shape.dim[-1].dim_value
    kv = next(i for i in g.input if i.name.startswith("past_key_values"))
    # GroupQueryAttention writes into a shared past/present buffer; anything else (the builder's fp16 CPU graphs,
    # torch.onnx graphs) returns concat(past, new). The layout is read off the graph, never assumed.
    inplace = any(n.op_type == "GroupQueryAttention" for n in m.graph.node)
    rows = next((int(onnx.numpy_helper.to_array(t)[0]) for t in g.initializer if t.name == ATTENTION_ROWS), 1)
    return dict(inputs=inputs, outputs=outputs, vocab_size=vocab, kv_dtype=_DTYPES[kv.type.tensor_type.elem_type],
                kv_layout="inplace" if inplace else "concat", attention_rows=rows)
