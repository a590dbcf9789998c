"""Prompt lookup: draft by copying what followed the last time the context's tail appeared (no model, no cost).

Code repeats itself (a sibling function, a test beside its code, an edited copy of a block): when the last n tokens
of prompt + output occurred before, the tokens that followed them then are a good guess for what follows now.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .drafter import Drafter, Proposal
from .errors import InvalidArgument
from .sampling import same_width


class LookupDrafter:
    """Proposes the continuation of the most recent earlier occurrence of the longest matching suffix of `tokens`
    (n = max_ngram ... min_ngram tokens): k tokens, none when nothing matches, and fewer than k when the copy
    reaches the end of `tokens` and `repeat` is off.

    The index maps each n-gram to the end of its most recent occurrence and is updated with the new tokens only,
    so a round costs O(new tokens x max_ngram) however long the context. Drafts are deterministic: greedy callers
    get no probabilities; sampling callers get one-hot rows, so verification accepts a draft x with probability
    q(x) and resamples from q without x (renormalised) on a rejection.
    """

    reads_prompt = False   # the index catches up on new tokens at no model cost

    def __init__(self, vocab_size: int, temperature: float = 0.0, max_ngram: int = 3, min_ngram: int = 1,
                 repeat: bool = True):
        """repeat: when the match ends within the last k tokens, continue the copy with itself (a period shorter
        than k: indentation runs, repeated lines, a model stuck in a loop); False stops at the end of `tokens`."""
        if not 1 <= min_ngram <= max_ngram:
            raise InvalidArgument(f"lookup n-gram sizes must satisfy 1 <= min_ngram <= max_ngram, "
                                  f"got min_ngram={min_ngram}, max_ngram={max_ngram}")
        self.vocab_size, self.temperature = vocab_size, temperature
        self.max_ngram, self.min_ngram, self.repeat = max_ngram, min_ngram, repeat
        self.ops = 0            # index writes since construction: the work the O(1) claim is about (tests count it)
        self.match = 0          # length of the suffix the last proposal matched (0: no match)
        self._reset()

    def _reset(self) -> None:
        self.seq: list[int] = []                     # the tokens indexed so far (a copy: the caller's list moves)
        self.index: dict[tuple[int, ...], int] = {}  # n-gram -> end (exclusive) of its most recent occurrence

    def lead(self, tokens: Sequence[int]) -> str:
        return "lookup"

    def unread(self, tokens: Sequence[int]) -> int:
        return 0

    def propose(self, tokens: Sequence[int], k: int) -> Proposal:
        self._sync(tokens)
        draft = np.asarray(self._continuation(k), np.int64)                          # (m,), m <= k
        if self.temperature == 0:
            return Proposal(draft, None, "lookup")
        probs = np.zeros((len(draft), self.vocab_size))                                # (m, V) one-hot
        probs[np.arange(len(draft)), draft] = 1.0
        return Proposal(draft, probs, "lookup")

    def accepted(self, n: int) -> None:
        """Nothing to forget: the index holds committed tokens only, and they arrive with the next `tokens`."""

    def find(self, tokens: Sequence[int]) -> tuple[int, int]:
        """(n, end): the longest suffix length n with an earlier occurrence ending at `end` (< len(tokens)), or
        (0, -1) when none. Cheap and idempotent: the hybrid drafter asks it before choosing who drafts."""
        self._sync(tokens)
        return self._find()

    # -- the index ---------------------------------------------------------------------------------------------
    def _sync(self, tokens: Sequence[int]) -> None:
        """Bring the index to `tokens`: index the new tail when `tokens` extends what was indexed (every round of a
        request); rebuild from the common prefix when an earlier token changed (a new request, an edit). The prefix
        check is one C-level list comparison (about 2 us per 1,000 tokens); the index work is the new tail only."""
        seq, old = self.seq, len(self.seq)
        if list(tokens[:old]) != seq:
            common = next((i for i, (a, b) in enumerate(zip(seq, tokens)) if a != b), min(old, len(tokens)))
            kept = seq[:common]   # the most recent occurrences past `common` are gone, and with them older ones
            self._reset()         # they had overwritten: only a rebuild recovers those
            self._extend(kept)
        self._extend(tokens[len(self.seq):])

    def _extend(self, new: Sequence[int]) -> None:
        seq, index, top = self.seq, self.index, self.max_ngram
        for t in new:
            # Occurrences are indexed by their end e; the one ending at the newest position is not indexed until a
            # token follows it (the suffix must not match itself, and an occurrence needs a continuation).
            e = len(seq)
            for n in range(1, min(top, e) + 1):
                index[tuple(seq[e - n : e])] = e
            self.ops += min(top, e)
            seq.append(int(t))

    def _find(self) -> tuple[int, int]:
        seq = self.seq
        for n in range(min(self.max_ngram, len(seq) - 1), self.min_ngram - 1, -1):
            end = self.index.get(tuple(seq[len(seq) - n :]))
            if end is not None:
                return n, end
        return 0, -1

    def _continuation(self, k: int) -> list[int]:
        """What followed the match, up to k tokens. A match close to the end runs into the suffix itself: the copy
        then continues with its own tokens (repeat), which repeats the period, or stops there."""
        n, end = self._find()
        self.match = n
        if n == 0:
            return []
        seq, L = self.seq, len(self.seq)
        if not self.repeat:
            return seq[end : end + k]
        out: list[int] = []
        for i in range(k):
            out.append(seq[end + i] if end + i < L else out[end + i - L])
        return out


class HybridDrafter:
    """Lookup where the context's last `min_match` or more tokens occurred before (free), the model drafter
    otherwise; a lookup proposal shorter than k is topped up by the model, which drafts after the looked-up tokens
    (unless the model would first read more than k tokens of context).
    A one-token match is a weak guess (on the demo pair its first token is kept 35% of the time, the model's 65%),
    hence the default min_match of 2.

    In the sampled path the looked-up tokens have one-hot rows and the model's tokens the model's own p rows.
    `last` says who drafted the last proposal: (tokens looked up, tokens from the model).
    """

    def __init__(self, lookup: LookupDrafter, model: Drafter | None, min_match: int = 2):
        self.lookup, self.model, self.min_match = lookup, model, min_match
        self.reads_prompt = model is not None and model.reads_prompt
        self.last = (0, 0)

    def lead(self, tokens: Sequence[int]) -> str:
        """"lookup" when the tail matches, else "model" (the policy keeps estimates per source). With no model,
        always "lookup"."""
        return "lookup" if self.model is None or self.lookup.find(tokens)[0] >= self.min_match else "model"

    def unread(self, tokens: Sequence[int]) -> int:
        """The model's catch-up when it leads; none when lookup does (a lookup-led round tops up with the model only
        when it has at most k tokens to read, so that a long catch-up is paid only where the k policy weighed it)."""
        return self.model.unread(tokens) if self.lead(tokens) == "model" else 0

    def propose(self, tokens, k):
        lead = self.lead(tokens)
        look = self.lookup.propose(tokens, k if lead == "lookup" else 0)              # (m,), (m, V) | None
        m = len(look.tokens)
        self.last = (m, 0)
        ahead = [*tokens, *look.tokens.tolist()]
        if m == k or self.model is None or (lead == "lookup" and self.model.unread(ahead) > k):
            return look
        # The model drafter feeds whatever its cache has not seen (KVModel.reuse: longest common prefix), so
        # drafting after tokens + the looked-up part keeps its cache consistent with no extra bookkeeping.
        more = self.model.propose(ahead, k - m)           # (k-m,), (k-m, Vd) | None
        self.last = (m, len(more.tokens))
        p = None if look.p is None or more.p is None else np.concatenate(same_width(look.p, more.p))
        return Proposal(np.concatenate([look.tokens, more.tokens]), p, lead, more.read_s, more.read_n)

    def accepted(self, n):
        m, used = self.last
        if used:
            # The model's proposal started after the m looked-up tokens; n < m rejects some of those too, and the
            # model then keeps only tokens + draft[:n]: a negative count relative to its own base.
            self.model.accepted(n - m)
