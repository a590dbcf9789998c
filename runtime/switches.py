"""Where attention rounds another way, found on the CPU this runs on.

onnxruntime's CPU GroupQueryAttention computes its two products (Q K' over the context, probabilities V) with MLAS
SGEMMs sized by the pass's context length, and MLAS picks strides, blocking and kernels from those sizes, which
changes the order of the sums at some lengths. A verify pass computes all its rows with the context of its last row,
a single step with its own; where a switch lies between the two, the row's last bits differ, and an int8-compute
target (export/quantize.py) turns that into other greedy tokens. Where the switches lie depends on the CPU: past 64
and 64 past every multiple of a sliding window on an AVX-512 Xeon; past 64, 192, 320, ... (every 128) on an AMD EPYC
(both measured, onnxruntime 1.32). So a quantized target's bundle carries PROBE_FILE, its attention nodes alone
(export/probe.py), and the runtime runs it once per process and shape: passes as wide as a verify pass against
padded single steps over every context, which is exactly what KVModel must keep equal. The rows where they part are
the cuts KVModel._last splits passes at."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from .errors import BundleError
from .providers import make_session

PROBE_FILE = "attention_probe.onnx"
FLOATS = {"tensor(float)": np.float32, "tensor(float16)": np.float16}   # onnxruntime's float types, as numpy's


class Probe:
    """The probe graph on the CPU, random queries, keys and values for every position, and in-place KV buffers (as
    the runtime binds them): `run(p, n)` computes rows p..p+n-1 with the context p + n."""

    def __init__(self, path: str, length: int, threads: int = 0):
        self.session = make_session(path, "cpu", threads)
        shape = {i.name: i.shape for i in self.session.get_inputs()}
        dtype = FLOATS[self.session.get_inputs()[0].type]
        self.nodes = sorted({n.rpartition(".")[2] for n in shape if n.startswith("query.")})
        rng = np.random.default_rng(0)
        self.rows, self.binding = {}, self.session.io_binding()
        for j in self.nodes:
            kvh, d = shape[f"past_key.{j}"][1], shape[f"past_key.{j}"][3]
            for kind, width in (("query", shape[f"query.{j}"][2]), ("key", kvh * d), ("value", kvh * d)):
                self.rows[f"{kind}.{j}"] = rng.standard_normal((length, width)).astype(dtype)  # (length, width)
            for kind in ("key", "value"):
                kv = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, kvh, length, d), dtype))  # (1, kvh, L, d)
                self.binding.bind_ortvalue_input(f"past_{kind}.{j}", kv)
                self.binding.bind_ortvalue_output(f"present_{kind}.{j}", kv)

    def run(self, p: int, n: int) -> np.ndarray:
        """Every node's output for rows p..p+n-1, side by side: (n, sum of heads * head_dim)."""
        b = self.binding
        for name, r in self.rows.items():
            b.bind_cpu_input(name, np.ascontiguousarray(r[None, p : p + n]))
        b.bind_cpu_input("seqlens_k", np.array([p + n - 1], np.int32))
        b.bind_cpu_input("total_sequence_length", np.array(p + n, np.int32))
        for j in self.nodes:
            b.bind_output(f"out.{j}", "cpu")
        self.session.run_with_iobinding(b)
        return np.concatenate([o[0] for o in b.copy_outputs_to_cpu() if o.ndim == 3], axis=-1)   # presents: 4-d


_found: dict[tuple, tuple[int, ...]] = {}   # per probe graph (its bytes: a copied or re-exported file too) and shape


def attention_cuts(path: str, max_length: int, min_step: int, width: int, threads: int) -> tuple[int, ...]:
    """The rows where a pass of up to `width` rows (`min_step` at least) must be split so that every row is computed
    with a context on the same side of every switch as the padded single step at that row: the first row past each
    switch, ascending. Runs the probe graph at `path` over contexts up to max_length + min_step - 1 (about a second
    for 2k tokens on 2 cores), once per process for the same graph and arguments. A probe onnxruntime cannot run
    (truncated, corrupted) is a BundleError naming it."""
    key = (Path(path).read_bytes(), max_length, min_step, width, threads)
    if key not in _found:
        try:
            _found[key] = _cuts(path, max_length, min_step, width, threads)
        except Exception as e:  # onnxruntime's Fail, InvalidProtobuf, ...: no common base but Exception
            raise BundleError(f"the attention probe {path} cannot be run: {type(e).__name__}: "
                              f"{str(e).splitlines()[0][:300] if str(e) else ''}; re-export the bundle") from e
    return _found[key]


def _cuts(path: str, max_length: int, min_step: int, width: int, threads: int) -> tuple[int, ...]:
    probe = Probe(path, max_length + min_step - 1, threads)
    last = max_length - 1                                                    # the last row a single step computes
    single = np.stack([probe.run(r, min_step)[0] for r in range(last + 1)])  # (rows, width): padded single steps
    cuts = set()
    # A pass at p sees a switch between its rows' single-step contexts (p + min_step .. p + width) and its own
    # (p + width); passes width - min_step rows apart see every context.
    for p in range(0, last - width + 2, width - min_step):
        wide = probe.run(p, width)
        same = [np.array_equal(wide[i], single[p + i]) for i in range(width - min_step + 1)]
        cuts.update(p + i for i in range(1, len(same)) if same[i] != same[i - 1])
    return tuple(sorted(cuts))
