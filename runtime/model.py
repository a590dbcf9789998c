"""One exported decoder and its KV cache. The cache position is a host integer: rollback is `model.pos = n`.

The same code drives the CPU and the GPU. Every buffer a step touches (token ids, the attention mask, the KV cache,
logits, argmax) is allocated once on the session's device and bound through IOBinding, one binding per step size n;
per step only the new ids and the mask cross from the host, and only what the caller asks for comes back (the
greedy path reads n int64 argmax ids, never the logits). Fixed addresses per step size are what CUDA graphs need:
with `cuda_graph=True` each decode/verify size is captured once and replayed afterwards.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from .errors import InvalidArgument
from .manifest import ModelSpec

_NP = {"float32": np.float32, "float16": np.float16}
_ORT = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "rtx": "NvTensorRTRTXExecutionProvider",
             "trt": "TensorrtExecutionProvider"}
# Step sizes up to k + 1 (k <= 32) keep their buffers and binding, and get a captured CUDA graph: decode, verify and
# the draft's catch-up feeds. Longer steps (prompts) allocate per call and run without a graph.
BOUND_MAX_N = 33


def make_session(path: str, provider: str = "cpu", threads: int = 0, cuda_graph: bool = False,
                 spec: ModelSpec | None = None) -> ort.InferenceSession:
    """A session on exactly `provider`, or an InvalidArgument saying why not: onnxruntime silently falls back to the
    CPU when a GPU provider cannot start, and CPU numbers must never be reported as GPU numbers."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    if provider == "cpu":
        providers = ["CPUExecutionProvider"]
    elif provider == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise InvalidArgument(f"this onnxruntime ({ort.__version__}, {', '.join(ort.get_available_providers())}) "
                                  f"has no CUDA provider: replace it with the GPU build (pip uninstall -y onnxruntime "
                                  f"&& pip install onnxruntime-gpu), or run on the CPU with --provider cpu")
        providers = [("CUDAExecutionProvider", {"enable_cuda_graph": "1" if cuda_graph else "0"}),
                     "CPUExecutionProvider"]
    elif provider == "rtx":
        from .tensorrt import add_rtx_provider

        add_rtx_provider(opts, path, cuda_graph)
        providers = None
    elif provider == "trt":  # needs the spec for its optimization profiles
        from .tensorrt import trt_provider

        providers = [trt_provider(spec, path), "CPUExecutionProvider"]
    else:
        raise InvalidArgument(f"provider {provider!r} must be one of {', '.join(PROVIDERS)}")
    session = ort.InferenceSession(path, opts, providers=providers)
    if session.get_providers()[0] != PROVIDERS[provider]:
        raise InvalidArgument(f"onnxruntime could not start {PROVIDERS[provider]} for {path} (it fell back to "
                              f"{session.get_providers()[0]}): check that the GPU is visible (nvidia-smi) and the "
                              f"driver matches the CUDA build, or run with --provider cpu")
    return session


@dataclass
class _Step:
    """What one step size n binds: ids (1, n) in; logits (1, n, vocab) and argmax (1, n) out. Host arrays are the
    staging copies on a GPU and the buffers themselves on the CPU (the OrtValues wrap them without a copy)."""
    binding: ort.IOBinding
    ids: np.ndarray                          # (1, n) int64, host
    ids_ov: ort.OrtValue
    logits: np.ndarray | None                # (1, n, vocab), host (CPU only)
    logits_ov: ort.OrtValue
    argmax: np.ndarray | None                # (1, n) int64, host (CPU only)
    argmax_ov: ort.OrtValue | None
    run_options: ort.RunOptions | None       # selects the captured CUDA graph for this n


class KVModel:
    """Runs `forward(ids)` for the tokens at positions pos..pos+n-1.

    The cache holds the first `pos` tokens of the sequence. Rewinding is assigning a smaller `pos`: the slots past it
    are simply overwritten by the next forward, because the mask (in-place layout) or the view (concat layout) is
    derived from `pos`.
    """

    def __init__(self, spec: ModelSpec, session: ort.InferenceSession, cuda_graph: bool = False):
        self.spec, self.session = spec, session
        self.device = "cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self.cuda_graph = cuda_graph and self.device == "cuda"
        self.pos = 0
        self.seen: list[int] = []     # token ids behind the cache rows; only seen[:pos] is meaningful
        self.run_s = 0.0              # seconds spent inside session.run, for overhead accounting
        s, L = spec, spec.max_length
        dtype = _NP[s.kv_dtype]
        self._logits_dtype = _ORT[next(o.type for o in session.get_outputs() if o.name == "logits")]
        self._has_argmax = "argmax" in (o.name for o in session.get_outputs())
        if s.kv_layout == "inplace":
            # The mask has a fixed length: ones for the positions < pos + n, zeros after. Its length never changes,
            # so it is bound once (GroupQueryAttention counts the ones; the zeros hide stale rows past a rewind).
            self._mask = np.zeros((1, L), np.int64)                            # (1, max_length)
            self._mask_ov, self._ones = self._wrap(self._mask), 0
            # One buffer per layer and kind, bound as both past input and present output (GroupQueryAttention
            # writes the new rows in place). Allocated once; never copied or cropped.
            shape = (1, s.num_kv_heads, L, s.head_dim)
            self._kv = [self._wrap(np.zeros(shape, dtype)) for _ in range(2 * s.num_layers)]  # 2*layers x shape
            self._steps: dict[int, _Step] = {}
        elif s.kv_layout == "concat":
            if self.device != "cpu":
                raise InvalidArgument(f"{s.graph} is a torch.onnx graph (concat KV), which runs on the CPU only; "
                                      f"export a family the model builder supports for the GPU")
            # The graph returns past ++ new as fresh arrays. Keeping them and slicing [:pos] on rewind is free (a view);
            # the cost is inside the graph, which copies the whole cache on every step (Concat).
            empty = np.zeros((1, s.num_kv_heads, 0, s.head_dim), dtype)
            self.cache = [empty] * (2 * s.num_layers)                          # 2*layers x (1, kv_heads, pos, head_dim)
            self._mask = np.ones((1, L), np.int64)                             # (1, max_length); sliced to pos + n
            self._pos_ids = np.arange(L, dtype=np.int64)[None]                 # (1, max_length)
            self._outputs = ["logits"] + [t.format(i=i) for i in range(s.num_layers)
                                          for t in (s.present_key, s.present_value)]
        else:
            raise ValueError(f"unknown kv_layout {s.kv_layout!r}")

    def _wrap(self, a: np.ndarray) -> ort.OrtValue:
        """The device buffer for host array `a`: the same memory on the CPU, a copy on the GPU."""
        return ort.OrtValue.ortvalue_from_numpy(a, self.device, 0)

    def _step(self, n: int) -> _Step:
        st = self._steps.get(n)
        if st is not None:
            return st
        s, cpu = self.spec, self.device == "cpu"
        b = self.session.io_binding()
        ids = np.zeros((1, n), np.int64)
        st = _Step(b, ids, self._wrap(ids), None, None, None, None, None)  # filled below
        shape = (1, n, s.vocab_size)
        if cpu:
            st.logits = np.empty(shape, self._logits_dtype)
            st.logits_ov = self._wrap(st.logits)
        else:  # never staged on the host: read back only when asked for
            st.logits_ov = ort.OrtValue.ortvalue_from_shape_and_type(shape, self._logits_dtype, self.device, 0)
        if self._has_argmax:
            st.argmax = np.zeros((1, n), np.int64)
            st.argmax_ov = self._wrap(st.argmax)
        b.bind_ortvalue_input("input_ids", st.ids_ov)
        b.bind_ortvalue_input("attention_mask", self._mask_ov)
        for i in range(s.num_layers):
            for j, (past, present) in enumerate([(s.past_key, s.present_key), (s.past_value, s.present_value)]):
                b.bind_ortvalue_input(past.format(i=i), self._kv[2 * i + j])
                b.bind_ortvalue_output(present.format(i=i), self._kv[2 * i + j])
        b.bind_ortvalue_output("logits", st.logits_ov)
        if st.argmax_ov is not None:
            b.bind_ortvalue_output("argmax", st.argmax_ov)
        if self.cuda_graph:
            # One captured graph per step size; a prompt runs without one (-1).
            st.run_options = ort.RunOptions()
            st.run_options.add_run_config_entry("gpu_graph_id", str(n) if n <= BOUND_MAX_N else "-1")
        if n <= BOUND_MAX_N:  # keep decode/verify sizes, not every prompt length
            self._steps[n] = st
        return st

    def forward(self, ids, want: str | None = "logits") -> np.ndarray | None:
        """Run the tokens; return their logits (n, vocab) float32, their argmax (n,) int64, or nothing (None)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)                  # (1, n)
        n, p = ids.shape[1], self.pos
        assert n >= 1 and p + n <= self.spec.max_length, (p, n)
        if self.spec.kv_layout == "inplace":
            st = self._step(n)
            st.ids[0] = ids[0]
            m = self._mask
            m[0, p : p + n] = 1
            m[0, p + n : self._ones] = 0     # rows past a rewind
            self._ones = p + n
            if self.device != "cpu":          # host -> device: n ids and the mask, nothing else
                st.ids_ov.update_inplace(st.ids)
                self._mask_ov.update_inplace(m)
            t = time.perf_counter()
            self.session.run_with_iobinding(st.binding, st.run_options)
            self.run_s += time.perf_counter() - t
            self.pos = p + n
            self.seen[p:] = ids[0].tolist()
            if want == "argmax" and st.argmax_ov is not None:
                return (st.argmax if self.device == "cpu" else st.argmax_ov.numpy())[0]
            if want is None:
                return None
            logits = st.logits if self.device == "cpu" else st.logits_ov.numpy()
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
        if want == "argmax":                  # graphs exported before the argmax output existed
            return logits[0].argmax(-1)
        return None if want is None else logits[0].astype(np.float32, copy=False)

    def rewind(self, pos: int) -> None:
        """Keep the first `pos` cached tokens and forget the rest: the only way a cache position moves back."""
        if not 0 <= pos <= self.pos:
            raise InvalidArgument(f"cannot rewind {self.spec.role} cache to {pos}: it holds {self.pos} tokens")
        self.pos = pos

    def reset(self) -> None:
        """Forget everything (the next request prefills from scratch)."""
        self.rewind(0)
        self.seen = []

    def reuse(self, tokens: list[int]) -> int:
        """Rewind to the longest cached prefix of `tokens`, leaving at least one token to feed; return it."""
        keep = min(self.pos, len(tokens) - 1)
        if self.seen[:keep] != tokens[:keep]:
            keep = next(i for i, (a, b) in enumerate(zip(self.seen, tokens)) if a != b)
        self.pos = keep
        return keep

    def kv(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Copies of the valid cache rows of one layer, (kv_heads, pos, head_dim) each: for tests and tools."""
        if self.spec.kv_layout == "inplace":
            k, v = self._kv[2 * layer].numpy(), self._kv[2 * layer + 1].numpy()
        else:
            k, v = self.cache[2 * layer], self.cache[2 * layer + 1]
        return k[0, :, : self.pos].copy(), v[0, :, : self.pos].copy()

    def buffers(self) -> list[int]:
        """Device addresses of the KV buffers: constant for the model's life (tests check nothing is reallocated)."""
        return [v.data_ptr() for v in self._kv] if self.spec.kv_layout == "inplace" else []
