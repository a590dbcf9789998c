"""A reduced draft vocabulary (as in FR-Spec and EAGLE-3): the draft's LM head keeps only the N most frequent tokens.

With a 128k-262k vocabulary the head dominates a small draft's bytes per step. Slicing it to N rows makes each draft
step cheaper; the draft still reads every target token (its input embedding keeps all rows), and the target still
verifies over the full vocabulary, so greedy output is unchanged and sampling stays exact: the draft's p is zero
outside the subset, and rejection sampling's residual max(0, q - p) covers the tokens the draft cannot propose.

The draft-id -> target-id map lives inside the draft graph, so the runtime needs no change:
  logits_kept [b, n, N] = head(h)[..., kept]           the sliced head (and any soft-capping after it)
  argmax      [b, n]    = Gather(kept, ArgMax(logits_kept))   a target id
  logits      [b, n, V] = GatherElements(Concat(logits_kept, -inf), position)   -inf outside the subset: p = 0 there

The runtime binds the full-width logits on every step (onnxruntime computes every output of a graph, requested or
not), so the map must cost little next to the sliced head. A plain Gather along the last axis copies one element
at a time (about 1.1 ms for 128k columns on one x86 core: more than the int4 head it replaces at N = 16k, which
held the int4 speedup at 1.7x); GatherElements with int32 indices broadcast to [b, n, V] does it in about 0.14 ms.
"""
from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..runtime.errors import ExportError, InvalidArgument
from .osutil import save_graph

# Elementwise ops that may sit between the head's MatMul and the logits output (Gemma 2's soft-capping: Div, Tanh,
# Mul; casts of fp16 graphs). They work on any last dimension, so they follow the head's new width unchanged.
ELEMENTWISE = {"Div", "Tanh", "Mul", "Add", "Cast", "Identity"}
# Default corpus: the CPython standard library's sources, which every machine has offline (code, comments and
# docstrings in English). Pass --draft-vocab-corpus for the text your users send.
DEFAULT_CORPUS_BYTES = 4_000_000


def default_corpus() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files, size = [], 0
    for f in sorted(root.glob("*.py")):
        files.append(f)
        size += f.stat().st_size
        if size >= DEFAULT_CORPUS_BYTES:
            break
    return files


def corpus_files(path: Path | None) -> list[Path]:
    if path is None:
        return default_corpus()
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file() and not f.name.startswith("."))
        if files:
            return files
    raise InvalidArgument(f"--draft-vocab-corpus {path} is not a file or a folder with files; give text the "
                          f"users' prompts resemble (a file, or a folder read recursively)")


def choose_tokens(tokenizer_file: Path, n: int, vocab_size: int, corpus: list[Path],
                  always: tuple[int, ...] = ()) -> np.ndarray:
    """The N target ids the draft may propose, sorted: `always` (EOS and the other specials) first, then the most
    frequent tokens of `corpus`, then the lowest unseen ids (a deterministic fill)."""
    from tokenizers import Tokenizer

    if not 0 < n < vocab_size:
        raise InvalidArgument(f"--draft-vocab {n} must be between 1 and the draft's vocabulary ({vocab_size}) "
                              f"minus one; leave it out for the full vocabulary")
    tok = Tokenizer.from_file(str(tokenizer_file))
    counts = np.zeros(vocab_size, np.int64)
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in corpus]
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids = np.asarray(enc.ids, np.int64)
        np.add.at(counts, ids[ids < vocab_size], 1)
    counts[[i for i in always if 0 <= i < vocab_size]] = np.iinfo(np.int64).max
    order = np.lexsort((np.arange(vocab_size), -counts))  # by count, descending; ties by id
    return np.sort(order[:n]).astype(np.int64)


def lm_head(g: onnx.GraphProto, producer: dict, output: str = "logits"):
    """The node that computes `output` from the hidden states (MatMul or MatMulNBits), found through the elementwise
    ops after it; None when something else (a Gemm, a Reshape) sits there."""
    node = producer.get(output)
    while node is not None and node.op_type in ELEMENTWISE:
        node = producer.get(node.input[0])
    return node if node is not None and node.op_type in ("MatMul", "MatMulNBits") else None


def map_sha256(kept: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(kept, "<i8").tobytes()).hexdigest()


def reduce_head(path: Path, kept: np.ndarray) -> None:
    """Slice the LM head of the graph at `path` to the rows `kept` and add the map back to target ids (see top)."""
    m = onnx.load(str(path))
    g = m.graph
    producer = {o: n for n in g.node for o in n.output}
    inits = {t.name: t for t in g.initializer}
    out = next((o for o in g.output if o.name == "logits"), None)
    if out is None or any(o.name == "argmax" for o in g.output):
        raise ExportError(f"{path} has no logits output, or already an argmax: cannot reduce its vocabulary")
    vocab = out.type.tensor_type.shape.dim[-1].dim_value
    node = lm_head(g, producer)
    if node is None:
        raise ExportError(f"{path}'s logits do not come from a MatMul by the LM head's weights: --draft-vocab cannot "
                          f"slice it; export without --draft-vocab")
    kept = np.asarray(kept, np.int64)
    _slice_head(node, g, inits, producer, kept)

    # logits -> logits_kept, everywhere it is produced or read
    for n in g.node:
        n.output[:] = ["logits_kept" if o == "logits" else o for o in n.output]
        n.input[:] = ["logits_kept" if i == "logits" else i for i in n.input]
    del g.value_info[:]  # intermediate shapes recorded at the full width; onnxruntime infers them again
    position = np.full((1, 1, vocab), len(kept), np.int32)  # target id -> column of logits_kept, or the -inf one
    position[..., kept] = np.arange(len(kept))
    dtype = out.type.tensor_type.elem_type
    np_dtype = onnx.helper.tensor_dtype_to_np_dtype(dtype)
    g.initializer.extend([numpy_helper.from_array(kept, "draft_vocab_kept"),
                          numpy_helper.from_array(position, "draft_vocab_position"),
                          numpy_helper.from_array(np.full((1, 1, 1), -np.inf, np_dtype), "draft_vocab_neg_inf"),
                          numpy_helper.from_array(np.array([0], np.int64), "draft_vocab_0"),
                          numpy_helper.from_array(np.array([2], np.int64), "draft_vocab_2"),
                          numpy_helper.from_array(np.array([1], np.int64), "draft_vocab_1"),
                          numpy_helper.from_array(np.array([vocab], np.int64), "draft_vocab_width")])
    src = "logits_kept"
    if dtype != onnx.TensorProto.FLOAT:
        g.node.append(helper.make_node("Cast", ["logits_kept"], ["logits_kept_fp32"], to=onnx.TensorProto.FLOAT))
        src = "logits_kept_fp32"
    g.node.extend([
        helper.make_node("ArgMax", [src], ["argmax_kept"], axis=-1, keepdims=0),          # first max on ties
        helper.make_node("Gather", ["draft_vocab_kept", "argmax_kept"], ["argmax"], axis=0),
        helper.make_node("Shape", ["logits_kept"], ["logits_kept_shape"]),
        helper.make_node("Slice", ["logits_kept_shape", "draft_vocab_0", "draft_vocab_2"], ["batch_seq"]),
        helper.make_node("Concat", ["batch_seq", "draft_vocab_1"], ["pad_shape"], axis=0),
        helper.make_node("Expand", ["draft_vocab_neg_inf", "pad_shape"], ["pad"]),
        helper.make_node("Concat", ["logits_kept", "pad"], ["logits_padded"], axis=-1),
        helper.make_node("Concat", ["batch_seq", "draft_vocab_width"], ["logits_shape"], axis=0),
        helper.make_node("Expand", ["draft_vocab_position", "logits_shape"], ["position"]),   # [b, n, V] int32
        helper.make_node("GatherElements", ["logits_padded", "position"], ["logits"], axis=2),
    ])
    rows = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim[:2]]   # the logits' [b, n]
    g.output.append(helper.make_tensor_value_info("argmax", onnx.TensorProto.INT64, rows))
    save_graph(m, path)


def _slice_head(node, g, inits, producer, kept: np.ndarray) -> None:
    """Keep the output rows `kept` of the head node (MatMulNBits, or MatMul by a constant or its Transpose)."""
    def replace(name: str, array: np.ndarray) -> str:
        new = f"{name}.draft_vocab"
        g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array), new))
        return new

    if node.op_type == "MatMulNBits":
        # B [N, blocks, blob], scales [N * blocks] or [N, blocks], zero points likewise (packed per row): row-major in N
        n_attr = next(a for a in node.attribute if a.name == "N")
        n_rows = n_attr.i
        for j in range(1, len(node.input)):
            name = node.input[j]
            if not name or name not in inits or j == 4:  # g_idx (input 4) is per input feature, not per row
                continue
            a = numpy_helper.to_array(inits[name])
            a = a.reshape(n_rows, -1)[kept].reshape((len(kept),) + a.shape[1:]) if a.shape[0] == n_rows else \
                a.reshape(n_rows, -1)[kept].reshape(-1)
            node.input[j] = replace(name, a)
        n_attr.i = len(kept)
        return
    if node.op_type == "MatMul":
        w = node.input[1]
        if w in inits:                                   # [K, V]: keep columns
            node.input[1] = replace(w, numpy_helper.to_array(inits[w])[:, kept])
            return
        t = producer.get(w)
        if t is not None and t.op_type == "Transpose" and t.input[0] in inits:   # tied head: Transpose([V, K])
            node.input[1] = replace(t.input[0], numpy_helper.to_array(inits[t.input[0]])[kept].T)
            return
    raise ExportError(f"the draft's LM head ({node.op_type} {node.name}) is not a MatMul by constant weights: "
                      f"--draft-vocab cannot slice it; export without --draft-vocab")
