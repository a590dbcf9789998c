"""Incremental detokenisation: text deltas that never split a UTF-8 character and never leak part of a stop string."""
from __future__ import annotations

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


class TextStream:
    """Push token ids one at a time; get back only text that is final.

    tokenizers' own incremental decoder (DecodeStream) holds back a character split over several byte-level tokens
    until it is complete; this class adds only the stop strings: a suffix that could still grow into one is held back
    until it cannot, and nothing from a stop string on is ever shown.
    """

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer, self.stop = tokenizer, tuple(s for s in stop if s)
        self._decoder = DecodeStream(skip_special_tokens=True)
        self.ids: list[int] = []
        self.text = ""          # final text so far; a stop string and what follows it are cut
        self.emitted = 0        # characters of `text` handed out
        self.stopped = False

    def push(self, token: int) -> str:
        """Append one token; return the new text that can be shown (may be empty). Nothing after a stop string."""
        if self.stopped:
            return ""
        self.ids.append(token)
        self.text += self._decoder.step(self.tokenizer, token) or ""
        for s in self.stop:
            at = self.text.find(s, self.emitted)  # emitted text never holds a stop string's start
            if at >= 0:
                self.text, self.stopped = self.text[:at], True
        hold = 0 if self.stopped else max((_partial(self.text, s) for s in self.stop), default=0)
        return self._emit(len(self.text) - hold)

    def flush(self) -> str:
        """End of generation: release what was held back (an incomplete character decodes as U+FFFD now)."""
        if not self.stopped:
            full = self.tokenizer.decode(self.ids, skip_special_tokens=True)
            if len(full) > len(self.text) and full.startswith(self.text):
                self.text = full
        return self._emit(len(self.text))

    def _emit(self, end: int) -> str:
        end = max(end, self.emitted)
        delta, self.emitted = self.text[self.emitted : end], end
        return delta


def _partial(text: str, stop: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of stop."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
