"""The loop: draft -> verify -> accept -> rewind, one round on one screen, behind a streaming generator. It knows the
target's KV model, a drafter (by its protocol), an optional k policy and its limits; the Engine that made it, never."""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
from tokenizers import Tokenizer

from .config import GenerationConfig, Result
from .drafter import Drafter, Proposal
from .errors import InvalidArgument
from .kpolicy import KPolicy
from .kv import KVModel
from .prompt import check_ids
from .sampling import distribution, same_width, verify_greedy, verify_sampled
from .stats import Stats
from .text import TextStream

PLAIN = Proposal(np.zeros(0, np.int64), np.zeros((0, 0)), "plain")   # (0,), (0, 0): a plain step is a k = 0 round


@dataclass(frozen=True)
class Limits:
    """What the bundle bounds every request by."""
    max_length: int                         # tokens the context holds, prompt and response
    vocab_size: int                         # token ids are 0..vocab_size-1
    eos: frozenset[int] = frozenset()       # ids that end the text (and are not part of it)


class Output:
    """A request's tokens as they are committed: the stop conditions, checked token by token, and the buffers from
    which a round's tokens (and text deltas) are handed out one at a time."""

    def __init__(self, config: GenerationConfig, limits: Limits, tokenizer: Tokenizer):
        self.config, self.limits = config, limits
        self.tokens: list[int] = []          # prompt + committed response
        self.n_prompt = 0
        self.pending: deque[int] = deque()   # committed tokens not yet handed out
        self.texts: deque[str] = deque()     # final text deltas not yet handed out
        self.stream = TextStream(tokenizer, config.stop)

    @property
    def response(self) -> list[int]:
        return self.tokens[self.n_prompt :]

    @property
    def done(self) -> int:
        """Tokens of the response (without copying it, as `response` does)."""
        return len(self.tokens) - self.n_prompt

    def prompt(self, ids) -> None:
        ids = check_ids("ids", ids, self.limits.vocab_size)
        if len(self.tokens) + len(ids) >= self.limits.max_length:
            raise InvalidArgument(f"the prompt would have {len(self.tokens) + len(ids)} tokens but the bundle's "
                                  f"context holds {self.limits.max_length}: shorten it", "ids")
        self.tokens += ids
        self.n_prompt = len(self.tokens)

    def commit(self, new: list[int]) -> str | None:
        """Append a round's tokens one by one, applying the stop conditions in order; the reason to finish, if any."""
        for t in new:
            if t in self.limits.eos:
                return "eos"
            self.tokens.append(t)
            self.pending.append(t)
            self.text(self.stream.push(t))
            if self.stream.stopped:
                return "stop"
            if self.done >= self.config.max_new_tokens:
                return "length"
            if len(self.tokens) >= self.limits.max_length:
                return "context_full"
        return None

    def room(self) -> int:
        """Draft tokens a round can still keep: one new token is the target's own."""
        return min(self.config.max_new_tokens - self.done, self.limits.max_length - len(self.tokens)) - 1

    def text(self, delta: str) -> None:
        if delta:
            self.texts.append(delta)


class Generator:
    """One request, holding its Engine until it finishes, is cancelled or closed (then `release`, failed=True after an
    error). Iterate for ids or `text_deltas()`; `cancel()` from any thread. drafter None: plain; policy None: fixed k."""

    def __init__(self, target: KVModel, drafter: Drafter | None, config: GenerationConfig, limits: Limits,
                 tokenizer: Tokenizer, release: Callable[[Generator, bool], None], policy: KPolicy | None = None,
                 rng: np.random.Generator | None = None, run_s: Callable[[], float] | None = None):
        self.target, self.drafter, self.config, self.limits, self.policy = target, drafter, config, limits, policy
        self.rng = rng if rng is not None else np.random.default_rng(config.seed)
        self._release, self._run_s = release, run_s or (lambda: target.run_s)   # run_s: seconds in onnxruntime
        self._cancel, self._busy = threading.Event(), threading.Lock()   # _busy: held while a round runs
        self.out, self.stats = Output(config, limits, tokenizer), Stats(k=config.k)
        self.tokens = self.out.tokens         # prompt + committed response (the same list)
        self.finish_reason = self.t0 = self.t_prefill = self.t_last = None   # finish_reason: str once finished

    def append_tokens(self, ids) -> None:
        if self.t0 is not None or self.finish_reason:
            raise InvalidArgument("append_tokens after generation started: make a new generator", "ids")
        self.out.prompt(ids)

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
        return self._drain(self.out.pending)

    def text_deltas(self) -> Iterator[str]:
        return self._drain(self.out.texts)

    def _drain(self, buffer: deque):
        while buffer or not self.finish_reason:
            if buffer:
                yield buffer.popleft()
            else:
                self._advance()

    def result(self) -> Result:
        """Run to the end. What it returns counts as handed out: iteration and text_deltas() yield nothing more."""
        deque(self, maxlen=0)
        self.out.texts.clear()
        return Result(self.out.stream.text, self.out.response, self.finish_reason, self.stats)

    def _advance(self) -> None:
        with self._busy:
            if self.finish_reason or self._cancel.is_set():
                return self._finish("cancelled")   # nothing when already finished
            try:
                if self.t0 is None:
                    self._prefill()
                # At most what can be kept; none first if the drafter reads the prompt (it never delays token 1).
                plain = self.drafter is None or (self.drafter.reads_prompt and not self.out.done)
                reason = self._round(0 if plain else min(self.config.k, self.out.room()))
            except BaseException:
                self._finish("error", failed=True)
                raise
            if reason:
                self._finish(reason)

    def _prefill(self) -> None:
        if not self.tokens:
            raise InvalidArgument("the prompt is empty: give at least one token of text", "prompt")
        self.t0, self._ort0 = time.perf_counter(), self._run_s()
        # The target's cache holds every committed token but the last, which opens the next verify pass.
        keep = self.target.reuse(self.tokens)
        if keep < len(self.tokens) - 1:
            self.target.forward(self.tokens[keep:-1], want=None)
        self.t_last = self.t_prefill = time.perf_counter()
        if self.policy:   # until a draft has read, what reading costs the target prices a catch-up
            self.policy.observe_read("target", len(self.tokens) - 1 - keep, self.t_prefill - self.t0)
        self.stats.prefill(len(self.tokens), self.t_prefill - self.t0)

    def _round(self, k: int) -> str | None:   # the reason to finish, if any
        c, target, t0 = self.config, self.target, time.perf_counter()
        # 1. draft: k tokens, or as many as the policy expects to pay best from whoever leads now (0: a plain step),
        #    with the draft distribution p they came from when sampling
        if self.policy and k:   # what the drafter would read first is weighed against what the rest can save
            k = self.policy.choose(self.drafter.lead(self.tokens), k, self.drafter.unread(self.tokens), self.out.room()+1)
        d = _admit(self.drafter.propose(self.tokens, k), k, self.limits.vocab_size, c.temperature) if k else PLAIN
        k, t1 = len(d.tokens), time.perf_counter()                               # a drafter may propose fewer
        # 2. verify all k in ONE target pass over [last token] + draft, and
        # 3. accept: the longest prefix matching the target's argmax (computed in the graph: k+1 ids come back, not
        #    k+1 rows of logits), or rejection sampling against q (needs the rows: the residual max(0, q - p))
        ids = np.concatenate(([self.tokens[-1]], d.tokens))
        if c.temperature == 0:
            n, nxt = verify_greedy(d.tokens, target.forward(ids, want="argmax"))      # (k+1,) ids
        else:
            q = distribution(target.forward(ids), c.temperature, c.top_k, c.top_p)    # (k+1, V)
            n, nxt = verify_sampled(d.tokens, *same_width(d.p, q), self.rng)
        # 4. rewind both caches to the accepted length: an integer each, no copies
        target.rewind(target.pos - (k - n))
        if k:
            self.drafter.accepted(n)
        t2 = time.perf_counter()
        if self.policy:
            self.policy.observe(d.source, k, n, t1 - t0 - d.read_s, t2 - t1)
            self.policy.observe_read("draft", d.read_n, d.read_s)
        before = len(self.tokens)
        reason, now = self.out.commit([*d.tokens[:n].tolist(), nxt]), time.perf_counter()
        self.stats.round(k, n, len(self.tokens) - before, t1 - t0, d.read_s, t2 - t1, now - self.t_last, now - self.t0)
        self.t_last = now
        return reason

    def _finish(self, reason: str, failed: bool = False) -> None:
        if self.finish_reason:
            return
        self.finish_reason = reason
        self.out.text(self.out.stream.flush())
        if self.t0 is not None:   # else it never started
            self.stats.finish(self.out.done, time.perf_counter() - self.t_prefill,
                              self._run_s() - self._ort0)
        self._release(self, failed)


def _admit(d: Proposal, k: int, vocab_size: int, temperature: float) -> Proposal:
    """A proposal the loop can verify (a drafter passed in by the caller may break the protocol): at most k ids in
    the vocabulary, and the draft distribution p when sampling."""
    ok = isinstance(d, Proposal) and len(d.tokens) <= k and (temperature == 0 or d.p is not None)
    if ok and len(d.tokens) and not 0 <= d.tokens.min() <= d.tokens.max() < vocab_size:
        ok = False
    if not ok:
        raise InvalidArgument(f"the drafter proposed {d!r:.120} for k = {k}: a Proposal of at most k token ids in "
                              f"0..{vocab_size - 1}, with p when sampling", "drafter")
    return d
