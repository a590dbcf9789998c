"""One exported decoder and its KV cache, one class per cache layout. The position is a host integer that changes
in one guarded place (`_move`): a pass advances it (`_advance`: forward, and a greedy draft chain as one pass),
`rewind` moves it back, and rollback is nothing more.

In-place layout (the model builder's GroupQueryAttention graphs): every buffer a step touches (token ids, the
attention mask, the KV cache, logits, argmax) is allocated once on the session's device and bound through IOBinding,
one binding per step size n (and rows m); per step only the new ids and the mask cross from the host, and only what
the caller asks for comes back (the greedy path reads n int64 argmax ids, never the logits). Fixed addresses per
step size are what CUDA graphs need: with `cuda_graph=True` each decode/verify size is captured once and replayed
afterwards.

Rows: a graph exported with the `logits_from` input (export/graphs.select_rows) computes the LM head for the last m
positions of a step only. A prompt read asks for none (one is computed), a draft's catch-up feed for its last, a
verify pass for all; a graph without the input computes all and the rest are dropped here.

Padding: a quantized CPU target computes its rows alike whatever the step's width only if its attention runs on at
least 2 rows, which its graph does itself (spec.attention_rows, export/graphs.pad_attention), or if every step runs
as at least spec.min_step tokens (KVModel._last says why). Either way the buffers keep room for the extra rows, and a
pass that spans a context length where this CPU's attention rounds another way is split (runtime/switches.py finds
them).

Concat layout (torch.onnx graphs): the graph returns past ++ new; rewinding slices a view. CPU only.
"""
from __future__ import annotations

import bisect
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .errors import InvalidArgument
from .manifest import ModelSpec
from .providers import make_session
from .switches import FLOATS, PROBE_FILE, attention_cuts

_NP = {"float32": np.float32, "float16": np.float16}
# Step sizes up to k + 1 (k <= 32) keep their buffers and binding, and get a captured CUDA graph: decode, verify and
# the draft's catch-up feeds. Longer steps (prompts) allocate per call and run without a graph.
BOUND_MAX_N = 33
# The context length past which onnxruntime's CPU GroupQueryAttention rounds another way on every CPU measured, and
# again 64 tokens past every multiple of a sliding window (Gemma 3's 512: past 576, 1088, ...). Where a bundle carries
# the attention probe (runtime/switches.py), the switches this CPU has are found by running it and added to these.
ATTENTION_SWITCH = 64
# The optional graph input that selects the rows reaching the LM head: int64 [1], a slice start over the step's
# positions (-m: the last m; default 0: all, which is what onnxruntime-genai, never feeding it, gets).
LOGITS_FROM = "logits_from"


def open_model(bundle: str | Path, spec: ModelSpec, provider: str = "cpu", threads: int = 0,
               cuda_graph: bool = False) -> "KVModel":
    """The session for one of a bundle's graphs, driven by the class of its KV layout."""
    path = Path(bundle) / spec.graph
    session = make_session(str(path), provider, threads, cuda_graph, spec)
    layouts = {"inplace": InplaceKV, "concat": ConcatKV}
    if spec.kv_layout not in layouts:
        raise InvalidArgument(f"{spec.graph} has an unknown KV layout {spec.kv_layout!r}; re-export the bundle")
    model = layouts[spec.kv_layout](spec, session, cuda_graph)
    probe = path.parent / PROBE_FILE
    if spec.attention_width > 1 and model.device == "cpu" and probe.is_file():
        model.add_cuts(attention_cuts(str(probe), spec.max_length, spec.attention_width, BOUND_MAX_N, threads))
    return model


class KVModel:
    """Runs `forward(ids)` for the tokens at positions pos..pos+n-1. The cache holds the first `pos` tokens of the
    sequence; the rows past it are overwritten by the next forward, because the mask (in-place) or the view (concat)
    is derived from `pos`."""

    def __init__(self, spec: ModelSpec, session: ort.InferenceSession):
        self.spec, self.session = spec, session
        self.device = "cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self._pos = 0
        self.seen: list[int] = []     # token ids behind the cache rows; only seen[:pos] is meaningful
        self.run_s = 0.0              # seconds spent inside session.run, for overhead accounting
        outputs = {o.name: o.type for o in session.get_outputs()}
        self.logits_dtype = FLOATS[outputs["logits"]]   # np.float32 | np.float16
        self._has_argmax = "argmax" in outputs
        # An input with a default is an overridable initializer to onnxruntime, listed apart from the inputs.
        inputs = session.get_inputs() + session.get_overridable_initializers()
        self._selects_rows = any(i.name == LOGITS_FROM for i in inputs)
        # the first row a padded single step computes past each switch (_last): a pass never holds rows on both sides
        switches = {ATTENTION_SWITCH, *(j * w + ATTENTION_SWITCH for w in set(spec.windows) if w
                                        for j in range(1, spec.max_length // w + 1))}
        width = spec.attention_width
        self._cuts = tuple(sorted(s - width + 1 for s in switches)) if width > 1 else ()

    def add_cuts(self, cuts) -> None:
        """More rows a pass is split at (the switches the attention probe found on this CPU)."""
        self._cuts = tuple(sorted({*self._cuts, *cuts}))

    @property
    def pos(self) -> int:
        return self._pos

    def _move(self, pos: int) -> None:
        """The one place the position changes."""
        if not 0 <= pos <= self.spec.max_length:
            raise InvalidArgument(f"{self.spec.role} cache position {pos} is outside 0..{self.spec.max_length}")
        self._pos = pos

    def rewind(self, pos: int) -> None:
        """Keep the first `pos` cached tokens and forget the rest: the only way a cache position moves back."""
        if pos > self._pos:
            raise InvalidArgument(f"cannot rewind the {self.spec.role} cache forward to {pos}: it holds {self._pos}")
        self._move(pos)

    def reset(self) -> None:
        """Forget everything (the next request prefills from scratch)."""
        self.rewind(0)
        self.seen = []

    def cached(self, tokens: list[int]) -> int:
        """The longest cached prefix of `tokens`, leaving at least one token to feed. Changes nothing."""
        keep = min(self._pos, len(tokens) - 1)
        if self.seen[:keep] != tokens[:keep]:
            keep = next(i for i, (a, b) in enumerate(zip(self.seen, tokens)) if a != b)
        return keep

    def reuse(self, tokens: list[int]) -> int:
        """Rewind to the longest cached prefix of `tokens` (`cached`); return it."""
        keep = self.cached(tokens)
        self.rewind(keep)
        return keep

    def forward(self, ids, want: str | None = "logits", rows: int | None = None) -> np.ndarray | None:
        """Run the n tokens at pos..pos+n-1; return the logits (rows, vocab) float32 or the argmax (rows,) int64 of
        the last `rows` of them (all n when None), or nothing (want None: the graph computes a single row)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)                  # (1, n)
        n = ids.shape[1]
        m = 1 if want is None else n if rows is None else rows
        if want is not None and rows is not None and not 1 <= rows <= n:
            raise InvalidArgument(f"rows={rows} must be between 1 and the {n} tokens fed")
        return self._advance(n, lambda p: (self._last(ids, p, m, want), ids[0]))

    def _last(self, ids: np.ndarray, p: int, m: int, want: str | None) -> np.ndarray | None:
        """_run for the last m rows of ids (1, n): only those reach the head where the graph selects rows; else all
        are computed and the rest dropped here. Every pass runs through here.

        Padding, the one place the runtime pads: a step narrower than spec.min_step is run as min_step tokens (its
        last id repeated), and the head computes at least min_step rows. onnxruntime's CPU kernels (MLAS) can
        compute a one-row product with other kernels (GEMV, MatMulNBits' M = 1 path) than a row of a wider
        product; with int8 activations (quantized targets) that float rounding flips greedy tokens, so a verify
        pass and plain decoding would part. Padded, every row is computed the same way whatever the step's width
        (the export checks it bit for bit, export/quantize.py). The pad rows' outputs are dropped; their KV rows lie
        past the position, so the mask hides them and the next step overwrites them. (A graph whose attention is
        the only such kernel pads its attention itself, spec.attention_rows, and needs no padding here.)

        Splitting, for the same reason: rows a padded single step's attention computes with a context on either
        side of an attention switch (ATTENTION_SWITCH and those the attention probe finds on this CPU,
        runtime/switches.py; `_cuts`, the first row past each) are never computed by one pass; a pass over both is
        run as parts, each in its rows' own regime."""
        n, step = ids.shape[1], self.spec.min_step
        i = bisect.bisect_right(self._cuts, p)                        # the first cut past p (per pass: no scan)
        cut = self._cuts[i] if i < len(self._cuts) and self._cuts[i] < p + n else None
        if cut is not None:
            a, b = cut - p, p + n - cut                                # rows before the cut, rows from it
            first = self._last(ids[:, :a], p, max(1, m - b), want if m > b else None)
            first = None if first is None else first.copy()            # a bound step's buffer: the next may reuse it
            last = self._last(ids[:, a:], cut, min(m, b), want)
            return last if m <= b or want is None else np.concatenate([first, last])
        pad = max(0, step - n)
        if pad:
            ids = np.concatenate([ids, np.repeat(ids[:, -1:], pad, axis=1)], axis=1)   # (1, min_step)
        head = min(n + pad, max(m + pad, step)) if self._selects_rows else n + pad
        out = self._run(ids, p, n + pad, head, want)
        return None if out is None else out[len(out) - pad - m : len(out) - pad]

    def _advance(self, n: int, run) -> np.ndarray | None:
        """The one place a pass moves the position forward: check that n tokens fit after pos, time `run(pos)`, then
        move to pos + n and record the ids fed. `run` returns (output, the n ids fed): a chained draft learns its
        ids by running. A pass that raises moves nothing."""
        p = self._pos
        if n < 1 or p + n > self.spec.max_length:
            raise InvalidArgument(f"{n} tokens at position {p} do not fit the {self.spec.role} cache "
                                  f"({self.spec.max_length})")
        t = time.perf_counter()
        out, fed = run(p)
        self.run_s += time.perf_counter() - t
        self._move(p + n)
        self.seen[p:] = np.asarray(fed).tolist()
        return out

    def _run(self, ids: np.ndarray, p: int, n: int, m: int, want: str | None) -> np.ndarray | None:
        """One pass over ids (1, n) at position p whose head computes the last m rows; what `want` asks of them."""
        raise NotImplementedError

    def greedy_chain(self, ids, k: int) -> np.ndarray:
        """Feed `ids`, then draft greedily: the k tokens that follow (k,) int64. The cache ends holding ids and the
        first k - 1 of them (the last is fed next round, and only if the target keeps it)."""
        return self._greedy(ids, k, self._host_steps)

    def _greedy(self, ids, k: int, steps) -> np.ndarray:
        """greedy_chain with its k - 1 one-token steps run by `steps(p, draft)`. Feed and steps are one pass to the
        bookkeeping: refused before anything runs if they do not fit, one move, one record of what was fed."""
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)                  # (1, n)
        n, draft = ids.shape[1], np.empty(k, np.int64)                         # (k,)

        def run(p):
            draft[0] = self._last(ids, p, 1, "argmax")[0]  # the catch-up feed: only its last row is read
            steps(p + n, draft)
            return None, [*ids[0], *draft[: k - 1]]

        self._advance(n + k - 1, run)
        return draft

    def _host_steps(self, p: int, draft: np.ndarray) -> None:
        """draft[1:] (k,): one greedy step per token from position p, each id through the host."""
        for i in range(1, len(draft)):
            draft[i] = self._last(draft[None, i - 1 : i], p + i - 1, 1, "argmax")[0]

    def _logits_out(self, logits: np.ndarray, want: str | None) -> np.ndarray | None:
        """logits (1, n, V) → what the caller wants, for graphs without (or paths not reading) the argmax output."""
        if want == "argmax":
            return logits[0].argmax(-1)
        return None if want is None else logits[0].astype(np.float32, copy=False)

    def kv(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Copies of the valid cache rows of one layer, (kv_heads, pos, head_dim) each: for tests and tools."""
        k, v = self._layer(layer)
        return k[0, :, : self._pos].copy(), v[0, :, : self._pos].copy()

    def _layer(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def buffers(self) -> list[int]:
        """Device addresses of the KV buffers: constant for the model's life (tests check nothing is reallocated)."""
        return []


@dataclass
class _Step:
    """What one step of n tokens computing m rows binds: ids (1, n) in; logits (1, m, vocab) and argmax (1, m) out.
    Host arrays are the staging copies on a GPU and the buffers themselves on the CPU (the OrtValues wrap them
    without a copy)."""
    binding: ort.IOBinding
    ids: np.ndarray                          # (1, n) int64, host
    ids_ov: ort.OrtValue
    logits: np.ndarray | None                # (1, m, vocab), host (CPU only)
    logits_ov: ort.OrtValue
    argmax: np.ndarray | None                # (1, m) int64, host (CPU only)
    argmax_ov: ort.OrtValue | None
    run_options: ort.RunOptions | None       # selects the captured CUDA graph for this (n, m)
    start: np.ndarray | None = None          # (1,) int64 logits_from = -m, host (Slice reads it there); m < n only


class InplaceKV(KVModel):
    """One fixed buffer per layer and kind, bound as both past input and present output (GroupQueryAttention writes
    the new rows in place), and a fixed-length mask: ones for positions < pos + n, zeros after."""

    def __init__(self, spec: ModelSpec, session: ort.InferenceSession, cuda_graph: bool = False):
        super().__init__(spec, session)
        self.cuda_graph = cuda_graph and self.device == "cuda"
        s, L = spec, spec.max_length + spec.attention_width - 1   # room for a padded step at the end of the context
        # The mask's length never changes, so it is bound once (GroupQueryAttention counts the ones; the zeros hide
        # stale rows past a rewind).
        self._mask = np.zeros((1, L), np.int64)                        # (1, max_length + attention_width - 1)
        self._mask_ov, self._ones = self._wrap(self._mask), 0
        shape = (1, s.num_kv_heads, L, s.head_dim)                     # L = max_length + attention_width - 1
        self._kv = [self._wrap(np.zeros(shape, _NP[s.kv_dtype])) for _ in range(2 * s.num_layers)]  # 2*layers x shape
        self._steps: dict[int, _Step] = {}
        self._ring: list[tuple[ort.OrtValue, np.ndarray]] = []   # draft chaining (greedy_chain), built on first use
        self._links: list[tuple[ort.IOBinding, ort.RunOptions | None]] | None = None

    def _wrap(self, a: np.ndarray) -> ort.OrtValue:
        """The device buffer for host array `a`: the same memory on the CPU, a copy on the GPU."""
        return ort.OrtValue.ortvalue_from_numpy(a, self.device, 0)

    def _step(self, n: int, m: int) -> _Step:
        st = self._steps.get((n, m))
        if st is not None:
            return st
        s, cpu = self.spec, self.device == "cpu"
        b = self.session.io_binding()
        ids = np.zeros((1, n), np.int64)
        shape = (1, m, s.vocab_size)
        logits = np.empty(shape, self.logits_dtype) if cpu else None  # on a GPU: read back only when asked for
        logits_ov = self._wrap(logits) if cpu else \
            ort.OrtValue.ortvalue_from_shape_and_type(shape, self.logits_dtype, self.device, 0)
        argmax = np.zeros((1, m), np.int64) if self._has_argmax else None
        st = _Step(b, ids, self._wrap(ids), logits, logits_ov, argmax,
                   self._wrap(argmax) if argmax is not None else None, None)
        b.bind_ortvalue_input("input_ids", st.ids_ov)
        if m < n:  # else the default: every row
            st.start = np.array([-m], np.int64)
            b.bind_ortvalue_input(LOGITS_FROM, ort.OrtValue.ortvalue_from_numpy(st.start))
        b.bind_ortvalue_input("attention_mask", self._mask_ov)
        for i in range(s.num_layers):
            for j, (past, present) in enumerate([(s.past_key, s.present_key), (s.past_value, s.present_value)]):
                b.bind_ortvalue_input(past.format(i=i), self._kv[2 * i + j])
                b.bind_ortvalue_output(present.format(i=i), self._kv[2 * i + j])
        b.bind_ortvalue_output("logits", st.logits_ov)
        if st.argmax_ov is not None:
            b.bind_ortvalue_output("argmax", st.argmax_ov)
        if self.cuda_graph:
            # One captured graph per step size and rows (ids n for all rows; past the chain's links for fewer); a
            # prompt runs without one (-1).
            graph = n if m == n else (BOUND_MAX_N + 1) * (m + 1) + n
            st.run_options = ort.RunOptions()
            st.run_options.add_run_config_entry("gpu_graph_id", str(graph) if n <= BOUND_MAX_N else "-1")
        if n <= BOUND_MAX_N:  # keep decode/verify sizes, not every prompt length
            self._steps[n, m] = st
        return st

    def _run(self, ids, p, n, m, want):
        st = self._step(n, m)
        st.ids[0] = ids[0]
        if self.device != "cpu":          # host -> device: n ids and the mask, nothing else
            st.ids_ov.update_inplace(st.ids)
        self._mask_for(p, n)
        self.session.run_with_iobinding(st.binding, st.run_options)
        if want == "argmax" and st.argmax_ov is not None:
            return (st.argmax if self.device == "cpu" else st.argmax_ov.numpy())[0]
        if want is None:
            return None
        return self._logits_out(st.logits if self.device == "cpu" else st.logits_ov.numpy(), want)

    def _mask_for(self, p: int, n: int) -> None:
        """Ones for the positions < p + n, zeros after (rows past a rewind); on a GPU the mask then goes to the
        device."""
        m = self._mask
        m[0, p : p + n] = 1
        m[0, p + n : self._ones] = 0
        self._ones = p + n
        if self.device != "cpu":
            self._mask_ov.update_inplace(m)

    def greedy_chain(self, ids, k):
        """Draft steps chained on the device: step i's in-graph argmax is bound as step i+1's input ids, so no token
        goes to the host and back between steps; the k - 1 ids are read once, after the chain."""
        # One link per step after the first; links are one-token steps, so a padded graph drafts on the host.
        if not self._has_argmax or k - 1 > BOUND_MAX_N or self.spec.min_step > 1:
            return super().greedy_chain(ids, k)
        return self._greedy(ids, k, self._chained_steps)

    def _chained_steps(self, p: int, draft: np.ndarray) -> None:
        """draft[1:] (k,) through links 0..k-2 from position p, draft[0] in."""
        k = len(draft)
        if k == 1:
            return
        ring, links = self._chain()
        ring[0][1][0, 0] = draft[0]
        if self.device != "cpu":
            ring[0][0].update_inplace(ring[0][1])
        for i in range(k - 1):
            self._mask_for(p + i, 1)
            self.session.run_with_iobinding(*links[i])
        for i in range(1, k):
            draft[i] = (ring[i][1] if self.device == "cpu" else ring[i][0].numpy())[0, 0]

    def _chain(self):
        """BOUND_MAX_N + 1 one-token id buffers R and one binding per link i: ids R[i] in, argmax R[i+1] out (the
        rest as a one-token step binds it). Built once."""
        if self._links is None:
            s, one = self.spec, self._step(1, 1)
            host = [np.zeros((1, 1), np.int64) for _ in range(BOUND_MAX_N + 1)]  # (1, 1) each
            self._ring = [(self._wrap(h), h) for h in host]
            self._links = []
            for i in range(BOUND_MAX_N):
                b = self.session.io_binding()
                b.bind_ortvalue_input("input_ids", self._ring[i][0])
                b.bind_ortvalue_input("attention_mask", self._mask_ov)
                for layer in range(s.num_layers):
                    for j, (past, present) in enumerate([(s.past_key, s.present_key),
                                                         (s.past_value, s.present_value)]):
                        b.bind_ortvalue_input(past.format(i=layer), self._kv[2 * layer + j])
                        b.bind_ortvalue_output(present.format(i=layer), self._kv[2 * layer + j])
                b.bind_ortvalue_output("logits", one.logits_ov)
                b.bind_ortvalue_output("argmax", self._ring[i + 1][0])
                options = None
                if self.cuda_graph:  # each link has its own addresses, so its own captured graph
                    options = ort.RunOptions()
                    options.add_run_config_entry("gpu_graph_id", str(BOUND_MAX_N + 1 + i))
                self._links.append((b, options))
        return self._ring, self._links

    def _layer(self, layer):
        return self._kv[2 * layer].numpy(), self._kv[2 * layer + 1].numpy()

    def buffers(self):
        return [v.data_ptr() for v in self._kv]


class ConcatKV(KVModel):
    """present = concat(past, new) as fresh arrays. Keeping them and slicing [:pos] on rewind is free (a view); the
    cost is inside the graph, which copies the whole cache on every step (Concat)."""

    def __init__(self, spec: ModelSpec, session: ort.InferenceSession, cuda_graph: bool = False):
        super().__init__(spec, session)
        if self.device != "cpu":
            raise InvalidArgument(f"{spec.graph} is a torch.onnx graph (concat KV), which runs on the CPU only; "
                                  f"export a family the model builder supports for the GPU")
        if spec.min_step > 1:  # the export never quantizes a concat graph; padding would need the cache cut back
            raise InvalidArgument(f"{spec.graph} (concat KV) cannot pad steps to {spec.min_step} tokens; re-export it")
        s, L = spec, spec.max_length
        empty = np.zeros((1, s.num_kv_heads, 0, s.head_dim), _NP[s.kv_dtype])
        self.cache = [empty] * (2 * s.num_layers)                          # 2*layers x (1, kv_heads, pos, head_dim)
        self._mask = np.ones((1, L), np.int64)                             # (1, max_length); sliced to pos + n
        self._pos_ids = np.arange(L, dtype=np.int64)[None]                 # (1, max_length)
        self._outputs = ["logits"] + [t.format(i=i) for i in range(s.num_layers)
                                      for t in (s.present_key, s.present_value)]

    def _run(self, ids, p, n, m, want):
        s = self.spec
        feeds = {"input_ids": ids, "attention_mask": self._mask[:, : p + n]}
        if m < n:  # else the default: every row
            feeds[LOGITS_FROM] = np.array([-m], np.int64)
        if "position_ids" in s.inputs:  # torch.onnx graphs take them; builder graphs derive them from the mask
            feeds["position_ids"] = self._pos_ids[:, p : p + n]
        for i in range(s.num_layers):
            feeds[s.past_key.format(i=i)] = self.cache[2 * i][:, :, :p]
            feeds[s.past_value.format(i=i)] = self.cache[2 * i + 1][:, :, :p]
        out = self.session.run(self._outputs, feeds)
        logits, self.cache = out[0], out[1:]
        return self._logits_out(logits, want)

    def _layer(self, layer):
        return self.cache[2 * layer], self.cache[2 * layer + 1]
