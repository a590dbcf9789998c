"""Drafters: anything that proposes k tokens and learns how many the target kept. The loop knows them only through
the `Drafter` protocol; the draft model is here, prompt lookup and the hybrid in lookup.py."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from .config import GenerationConfig
from .errors import InvalidArgument
from .kv import KVModel
from .sampling import distribution, sample


@dataclass(frozen=True)
class Proposal:
    """One round's draft."""
    tokens: np.ndarray            # (k,) int64: the draft tokens continuing the context
    p: np.ndarray | None          # (k, V) float64: the distribution each was drawn from; None when drafted greedily
    source: str                   # who drafted ("model", "lookup"): the name the k policy keeps estimates under
    read_s: float = 0.0           # of the drafting time: reading context the drafter had not seen (its catch-up)
    read_n: int = 0               # the tokens that catch-up read

    def __post_init__(self):
        t, p = self.tokens, self.p
        if not (isinstance(t, np.ndarray) and t.ndim == 1 and np.issubdtype(t.dtype, np.integer)):
            raise InvalidArgument(f"a Proposal's tokens must be a 1-D integer numpy array, got {t!r:.80}", "drafter")
        if p is not None and not (isinstance(p, np.ndarray) and p.ndim == 2 and len(p) == len(t)):
            raise InvalidArgument(f"a Proposal's p must be None or one row per token, (k, V), got "
                                  f"{getattr(p, 'shape', type(p).__name__)} for {len(t)} tokens", "drafter")
        object.__setattr__(self, "tokens", t.astype(np.int64, copy=False))


class Drafter(Protocol):
    reads_prompt: bool   # True: a proposal first reads the context the drafter has not seen (a draft model's
                         # prefill); the loop then makes the first round a plain step, so that no prompt read delays
                         # the first token

    def unread(self, tokens: Sequence[int]) -> int:
        """Tokens of context the next proposal would read before drafting (a draft model's catch-up; 0 for a drafter
        that drafts at no read cost): the k policy weighs it against what the rest of the request can save. Cheap;
        changes nothing."""

    def lead(self, tokens: Sequence[int]) -> str:
        """Who would draft after `tokens` now: the `source` of the next proposal, named before it is made so that
        the k policy can choose k from that source's estimates. Cheap; changes nothing."""

    def propose(self, tokens: Sequence[int], k: int) -> Proposal:
        """Up to k draft tokens continuing `tokens` (k >= 1; fewer when the drafter has no better guess)."""

    def accepted(self, n: int) -> None:
        """The target kept the first n tokens of the last proposal; forget the rest."""


class ModelDrafter:
    """A small decoder with its own KV cache. Greedy when the request is, else samples from the processed p (the
    request's temperature, top-k and top-p, applied as the target's are).

    window: with W, the draft reads only recent context, at its own positions from 0: the tokens from a start that
    moves forward only when the context past it exceeds 2W tokens, then to the last W. A long prompt then costs at most
    W tokens to read, and a moving window W tokens once per W new ones. Proposals only need to be good, since the
    target verifies every token: output is the same either way."""

    reads_prompt = True

    def __init__(self, model: KVModel, config: GenerationConfig | None = None,
                 rng: np.random.Generator | None = None, window: int | None = None):
        if window is not None and not 1 <= window:
            raise InvalidArgument(f"draft_window must be at least 1 token (or 0/None: all), got {window}",
                                  "draft_window")
        self.model, self.config, self.rng, self.window = model, config or GenerationConfig(), rng, window
        self.base = 0    # tokens of the (windowed) context the last proposal continued
        self.start = 0   # where the window begins in the context

    def lead(self, tokens):
        return "model"

    def unread(self, tokens):   # per adaptive round: no copy of the context when there is no window
        start = self._start(tokens)
        ctx = tokens[start:] if start else tokens
        return _catch_up(len(ctx), self.model.cached(ctx))

    def propose(self, tokens, k):
        m, c = self.model, self.config
        ctx = self._window(tokens)
        keep = m.reuse(ctx)
        self.base = len(ctx)
        # The round's own feed is last round's correction (and the bonus token when all were kept): one or two
        # tokens. More is catch-up (the prompt, rounds this drafter sat out, a moved window): read it in one pass that
        # keeps no logits, and time it apart, so that the k policy charges it to this drafter.
        t, read_s, read_n = time.perf_counter(), 0.0, _catch_up(len(ctx), keep)
        if read_n:
            m.forward(ctx[keep:-1], want=None)
            keep, read_s = len(ctx) - 1, time.perf_counter() - t
        if c.temperature == 0:  # greedy: ids only, chained on the device where the graph allows
            return Proposal(m.greedy_chain(ctx[keep:], k), None, "model", read_s, read_n)
        out = m.forward(ctx[keep:], rows=1)[0]                                  # (V,) logits: the last row
        draft = np.empty(k, np.int64)                                          # (k,)
        probs = np.empty((k, len(out)))                                        # (k, V)
        for i in range(k):
            probs[i] = distribution(out, c.temperature, c.top_k, c.top_p)
            draft[i] = sample(probs[i], self.rng)
            if i + 1 < k:  # the last draft token is fed next round, and only if the target accepts it
                out = m.forward(draft[i : i + 1])[0]
        return Proposal(draft, probs, "model", read_s, read_n)

    def accepted(self, n):
        # The cache holds context + draft[:k-1]; keep context + draft[:n]. Setting an integer is the whole rewind.
        # (n may be negative: the hybrid's model drafted after looked-up tokens, n - m of which were kept.)
        self.model.rewind(max(0, min(self.model.pos, self.base + n)))

    def _window(self, tokens: Sequence[int]) -> Sequence[int]:
        self.start = self._start(tokens)
        return tokens[self.start :] if self.start else tokens

    def _start(self, tokens: Sequence[int]) -> int:
        """Where the window begins for `tokens`: where it began, unless this is a new request or the window is full."""
        if self.window and not 0 < len(tokens) - self.start <= 2 * self.window:
            return max(0, len(tokens) - self.window)
        return self.start if self.window else 0


def _catch_up(n: int, keep: int) -> int:
    """Tokens read before drafting when `keep` of `n` context tokens are cached: none when the round's own feed (last
    round's correction, and the bonus token when all were kept: one or two tokens) is all that is new."""
    return n - 1 - keep if n - keep > 2 else 0
