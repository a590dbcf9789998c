"""One exported decoder and its KV cache. The cache position is a host integer: rollback is `model.pos = n`."""
from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort

from .errors import InvalidArgument
from .manifest import ModelSpec

_NP = {"float32": np.float32, "float16": np.float16}
_ORT = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def make_session(path: str, provider: str = "cpu", threads: int = 0) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    if provider != "cpu":
        # The device-resident CUDA path (KV and logits on the GPU, CUDA graphs) is not built yet: refuse rather than
        # run a cuda bundle through host buffers and report numbers that are not what the product promises.
        raise InvalidArgument(f"this runtime runs cpu bundles only; {path} was exported for {provider!r}: "
                              f"re-export with --device cpu")
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


class KVModel:
    """Runs `forward(ids)` for the tokens at positions pos..pos+n-1 and returns their logits [n, vocab].

    The cache holds the first `pos` tokens of the sequence. Rewinding is assigning a smaller `pos`: the slots past it
    are simply overwritten by the next forward, because the mask (in-place layout) or the view (concat layout) is
    derived from `pos`.
    """

    def __init__(self, spec: ModelSpec, session: ort.InferenceSession):
        self.spec, self.session = spec, session
        self.pos = 0
        self.seen: list[int] = []     # token ids behind the cache rows; only seen[:pos] is meaningful
        self.run_s = 0.0              # seconds spent inside session.run, for overhead accounting
        s, L = spec, spec.max_length
        dtype = _NP[s.kv_dtype]
        self._mask = np.ones((1, L), np.int64)                                 # (1, max_length); sliced to pos + n
        self._logits: dict[int, np.ndarray] = {}                               # n -> (1, n, vocab), reused
        self._logits_dtype = _ORT[next(o.type for o in session.get_outputs() if o.name == "logits")]
        if s.kv_layout == "inplace":
            shape = (1, s.num_kv_heads, L, s.head_dim)
            # One buffer per layer and kind, bound as both past input and present output (GroupQueryAttention
            # writes the new rows in place). Allocated once; never copied or cropped. The OrtValues wrap the numpy
            # arrays without a copy, so the arrays are kept alive (and give tests a free view of the cache).
            self.cache = [np.zeros(shape, dtype) for _ in range(2 * s.num_layers)]  # 2*layers x (1, kv_heads, max_length, head_dim)
            self._ort_cache = [ort.OrtValue.ortvalue_from_numpy(a) for a in self.cache]
            self.binding = session.io_binding()
            self._ids = np.zeros((1, L), np.int64)                             # (1, max_length); first n used
            self._ids_ptr, self._mask_ptr, self._bound_n = self._ids.ctypes.data, self._mask.ctypes.data, 0
            for i in range(s.num_layers):
                for j, (past, present) in enumerate([(s.past_key, s.present_key), (s.past_value, s.present_value)]):
                    buf = self._ort_cache[2 * i + j]
                    self.binding.bind_ortvalue_input(past.format(i=i), buf)
                    self.binding.bind_ortvalue_output(present.format(i=i), buf)
        elif s.kv_layout == "concat":
            # The graph returns past ++ new as fresh arrays. Keeping them and slicing [:pos] on rewind is free (a view);
            # the cost is inside the graph, which copies the whole cache on every step (Concat).
            empty = np.zeros((1, s.num_kv_heads, 0, s.head_dim), dtype)
            self.cache = [empty] * (2 * s.num_layers)                          # 2*layers x (1, kv_heads, pos, head_dim)
            self._pos_ids = np.arange(L, dtype=np.int64)[None]                 # (1, max_length)
            self._outputs = ["logits"] + [t.format(i=i) for i in range(s.num_layers)
                                          for t in (s.present_key, s.present_value)]
        else:
            raise ValueError(f"unknown kv_layout {s.kv_layout!r}")

    def forward(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)                  # (1, n)
        n, p = ids.shape[1], self.pos
        assert n >= 1 and p + n <= self.spec.max_length, (p, n)
        if self.spec.kv_layout == "inplace":
            # Inputs and logits live in preallocated host buffers bound by pointer: per step only shapes change.
            # (Only this allocation differs for a device-resident path.)
            # Binding costs tens of microseconds, so ids and logits are rebound only when n changes (a target
            # verifies k + 1 tokens every round); the mask's length changes every step.
            b = self.binding
            self._ids[0, :n] = ids[0]
            b.bind_input("attention_mask", "cpu", 0, np.int64, (1, p + n), self._mask_ptr)
            if n != self._bound_n:
                self._out = self._logits.get(n)
                if self._out is None:  # keep buffers for decode/verify sizes, not for every prompt length
                    self._out = np.empty((1, n, self.spec.vocab_size), self._logits_dtype)
                    if n <= 64:
                        self._logits[n] = self._out
                b.bind_input("input_ids", "cpu", 0, np.int64, (1, n), self._ids_ptr)
                b.bind_output("logits", "cpu", 0, self._out.dtype, self._out.shape, self._out.ctypes.data)
                self._bound_n = n
            logits = self._out
            t = time.perf_counter()
            self.session.run_with_iobinding(b)
            self.run_s += time.perf_counter() - t
        else:
            s = self.spec
            feeds = {"input_ids": ids, "attention_mask": self._mask[:, : p + n]}
            if "position_ids" in s.inputs:  # torch.onnx graphs take them; builder graphs derive them from the mask
                feeds["position_ids"] = self._pos_ids[:, p : p + n]
            for i in range(s.num_layers):
                feeds[s.past_key.format(i=i)] = self.cache[2 * i][:, :, :p]
                feeds[s.past_value.format(i=i)] = self.cache[2 * i + 1][:, :, :p]
            t = time.perf_counter()
            out = self.session.run(self._outputs, feeds)
            self.run_s += time.perf_counter() - t
            logits, self.cache = out[0], out[1:]
        self.pos = p + n
        self.seen[p:] = ids[0].tolist()
        return logits[0].astype(np.float32, copy=False)

    def reuse(self, tokens: list[int]) -> int:
        """Rewind to the longest cached prefix of `tokens`, leaving at least one token to feed; return it."""
        keep = min(self.pos, len(tokens) - 1)
        if self.seen[:keep] != tokens[:keep]:
            keep = next(i for i, (a, b) in enumerate(zip(self.seen, tokens)) if a != b)
        self.pos = keep
        return keep

    def kv(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Copies of the valid cache rows of one layer, (kv_heads, pos, head_dim) each: for tests and tools."""
        k, v = self.cache[2 * layer], self.cache[2 * layer + 1]
        return k[0, :, : self.pos].copy(), v[0, :, : self.pos].copy()
