"""The loop: draft -> verify -> accept -> rewind, one round on one screen, behind a streaming generator."""
from __future__ import annotations

import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Iterator

import numpy as np

from .config import GenerationConfig, Result
from .errors import InvalidArgument
from .lookup import HybridDrafter
from .sampling import distribution, verify_greedy, verify_sampled
from .stats import Stats
from .text import TextStream

if TYPE_CHECKING:
    from .engine import Engine

NO_DRAFT = np.zeros(0, np.int64)                                               # (0,): a plain step is a k = 0 round


class Generator:
    """One request, holding the Engine from creation until it finishes, is cancelled or closed. Iterate for token
    ids (`for t in gen`) or text deltas (`gen.text_deltas()`); a round's tokens are buffered and handed out one at a
    time. `cancel()` may be called from any thread."""

    def __init__(self, engine: Engine, config: GenerationConfig, k: int, speculative: bool, drafter: str,
                 adaptive: bool):
        self.engine, self.config, self.k, self.speculative = engine, config, k, speculative
        self.rng = np.random.default_rng(config.seed)
        self.drafter_name, self.drafter = drafter, engine.make_drafter(drafter, config, self.rng)
        self.has_draft_model = getattr(self.drafter, "model", None) is not None   # model/hybrid: a prompt to prefill
        self.policy = engine.policy if adaptive else None   # None: every round drafts k (fewer near the end)
        self._cancel, self._busy = threading.Event(), threading.Lock()   # _busy: held while a round runs
        self.tokens: list[int] = []          # prompt + committed response
        self.n_prompt = 0
        self.pending: deque[int] = deque()   # committed tokens not yet handed out
        self.texts: deque[str] = deque()     # final text deltas not yet handed out
        self.finish_reason: str | None = None
        self.stream = TextStream(engine.tokenizer, config.stop)
        self.stats = Stats(k=k)
        self.t0 = self.t_prefill = self.t_last = None

    def append_tokens(self, ids: list[int]) -> None:
        if self.t0 is not None:
            raise InvalidArgument("append_tokens after generation started: make a new generator for a new request")
        self.tokens += [int(i) for i in ids]
        self.n_prompt = len(self.tokens)

    @property
    def response(self) -> list[int]:
        return self.tokens[self.n_prompt :]

    def cancel(self) -> None:
        """Stop after the round in flight (at once if none is), keeping what was committed; frees the Engine."""
        self._cancel.set()
        if self._busy.acquire(blocking=False):  # no round in flight: finish here rather than wait for the owner
            try:
                self._finish("cancelled")
            finally:
                self._busy.release()

    close = cancel                           # the same for a caller that is simply done with it

    def __iter__(self) -> Iterator[int]:
        return self._drain(self.pending)

    def text_deltas(self) -> Iterator[str]:
        return self._drain(self.texts)

    def _drain(self, buffer: deque):
        while buffer or not self.finish_reason:
            if buffer:
                yield buffer.popleft()
            else:
                self._advance()

    def result(self) -> Result:
        for _ in self:
            pass
        return Result(self.stream.text, self.response, self.finish_reason, self.stats)

    def _advance(self) -> None:
        e, c = self.engine, self.config
        with self._busy:
            if self.finish_reason:
                return
            if self._cancel.is_set():
                return self._finish("cancelled")
            try:
                if self.t0 is None:
                    self._start()
                # k shrinks near the end of the context and of the budget: never draft what cannot be kept. With a
                # draft model the first round is a plain step: its prefill of the prompt never delays the first token.
                done = len(self.tokens) - self.n_prompt
                left = min(c.max_new_tokens - done, e.max_length - len(self.tokens))
                drafts = self.speculative and (done > 0 or not self.has_draft_model)
                new = self._round(min(self.k, left - 1) if drafts else 0)
            except BaseException as exc:
                if not isinstance(exc, InvalidArgument):
                    e.forget()               # a step that failed midway leaves the caches in an unknown state
                self._finish("error")
                raise
            now = time.perf_counter()
            self.stats.token_ms += [1e3 * (now - self.t_last)] + [0.0] * (len(new) - 1)
            self.t_last = now
            self._commit(new)

    def _start(self) -> None:
        e = self.engine
        if not self.tokens:
            raise InvalidArgument("the prompt is empty: give at least one token of text")
        if len(self.tokens) >= e.max_length:
            raise InvalidArgument(f"the prompt has {len(self.tokens)} tokens but the bundle's context holds "
                                  f"{e.max_length}: shorten the prompt or re-export with a larger --max-length")
        self.stats.prompt_tokens = len(self.tokens)
        self.t0, self._ort0 = time.perf_counter(), e.run_s()
        # The target's cache holds every committed token but the last, which opens the next verify pass.
        keep = e.target.reuse(self.tokens)
        if keep < len(self.tokens) - 1:
            e.target.forward(self.tokens[keep:-1], want=None)
        self.t_last = self.t_prefill = time.perf_counter()
        self.stats.prefill_ms = 1e3 * (self.t_prefill - self.t0)

    def _round(self, k: int) -> list[int]:
        c, target = self.config, self.engine.target
        t0 = time.perf_counter()
        # 0. how many to draft: k, or what the policy expects to pay best now (0 = a plain step)
        if self.policy:
            source = self.drafter.source(self.tokens) if isinstance(self.drafter, HybridDrafter) else self.drafter_name
            k = self.policy.choose(source, k) if k else 0
        # 1. draft k tokens (and the draft distribution p they came from, when sampling); k = 0 is a plain step
        draft, p = self.drafter.propose(self.tokens, k) if k else (NO_DRAFT, None)     # (k,), (k, V) | None
        k = len(draft)                                                               # a drafter may propose fewer
        t1 = time.perf_counter()
        # 2. verify all k in ONE target pass over [last token] + draft, and
        # 3. accept: the longest prefix matching the target's argmax (computed in the graph: k+1 ids come back, not
        #    k+1 rows of logits), or rejection sampling against q (needs the rows: the residual max(0, q - p))
        ids = np.concatenate(([self.tokens[-1]], draft))
        if c.temperature == 0:
            n, nxt = verify_greedy(draft, target.forward(ids, want="argmax"))         # (k+1,) ids
        else:
            q = distribution(target.forward(ids), c.temperature, c.top_k, c.top_p)    # (k+1, V)
            n, nxt = verify_sampled(draft, *_same_width(p, q), self.rng)
        # 4. rewind both caches to the accepted length: an integer each, no copies
        target.rewind(target.pos - (k - n))
        if k:
            self.drafter.accepted(n)
        t2 = time.perf_counter()
        if self.policy:
            self.policy.observe(source, k, n, t1 - t0, t2 - t1)
        self.stats.round(k, n, len(self.response), 1e3 * (t1 - t0), 1e3 * (t2 - t1))
        return [*draft[:n].tolist(), nxt]

    def _commit(self, new: list[int]) -> None:
        """Append a round's tokens one by one, applying the stop conditions in order."""
        e, c = self.engine, self.config
        for t in new:
            if t in e.eos:
                return self._finish("eos")
            self.tokens.append(t)
            self.pending.append(t)
            self._text(self.stream.push(t))
            if not self.stats.ttft_ms:
                self.stats.ttft_ms = 1e3 * (time.perf_counter() - self.t0)
            if self.stream.stopped:
                return self._finish("stop")
            if len(self.response) >= c.max_new_tokens:
                return self._finish("length")
            if len(self.tokens) >= e.max_length:
                return self._finish("context_full")

    def _text(self, delta: str) -> None:
        if delta:
            self.texts.append(delta)

    def _finish(self, reason: str) -> None:
        if self.finish_reason:
            return
        e, s = self.engine, self.stats
        self.finish_reason = reason
        self._text(self.stream.flush())
        s.new_tokens = len(self.response)
        if self.t0 is not None:
            s.decode_ms = 1e3 * (time.perf_counter() - self.t_prefill)
            s.ort_ms = 1e3 * (e.run_s() - self._ort0)
        e._release(self)


def _same_width(p: np.ndarray | None, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pad the narrower distribution with zeros: padded vocabularies (extra embedding rows) may differ in width.
    A plain step (no draft) has p of shape (0, V)."""
    if p is None:
        return np.zeros((0, q.shape[-1])), q
    if p.shape[-1] == q.shape[-1]:
        return p, q
    w = max(p.shape[-1], q.shape[-1])
    pad = lambda a: np.pad(a, ((0, 0), (0, w - a.shape[-1])))  # noqa: E731
    return pad(p), pad(q)
