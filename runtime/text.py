"""Incremental detokenisation: text deltas that never split a UTF-8 character and never leak part of a stop string."""
from __future__ import annotations

from tokenizers import Tokenizer


class TextStream:
    """Push token ids one at a time; get back only text that is final.

    Byte-level BPE can split one character over several tokens; decoding such a prefix ends in U+FFFD, so text waits
    until it does not. Decoders may also treat the first token specially (SentencePiece drops a leading space), so
    new text is the difference between decoding ids[prefix:] and ids[prefix:read], a window of constant size.
    A suffix that could still grow into a stop string is held back until it cannot.
    """

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer, self.stop = tokenizer, tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.prefix = self.read = 0
        self._before = ""       # decode(ids[prefix:read])
        self.text = ""          # final text so far; a stop string and what follows it are cut
        self.emitted = 0        # characters of `text` handed out
        self.stopped = False

    def push(self, token: int) -> str:
        """Append one token; return the new text that can be shown (may be empty). Nothing after a stop string."""
        if self.stopped:
            return ""
        self.ids.append(token)
        self._decode(final=False)
        for s in self.stop:
            at = self.text.find(s, self.emitted)  # emitted text never holds a stop string's start
            if at >= 0:
                self.text, self.stopped = self.text[:at], True
        hold = 0 if self.stopped else max((_partial(self.text, s) for s in self.stop), default=0)
        return self._emit(len(self.text) - hold)

    def flush(self) -> str:
        """End of generation: release what was held back (an incomplete character decodes as U+FFFD now)."""
        if not self.stopped:
            self._decode(final=True)
        return self._emit(len(self.text))

    def _decode(self, final: bool) -> None:
        after = self.tokenizer.decode(self.ids[self.prefix :], skip_special_tokens=True)
        if len(after) > len(self._before) and (final or not after.endswith("\ufffd")):
            self.text += after[len(self._before) :]
            self.prefix, self.read = self.read, len(self.ids)
            # decode(ids[prefix:read]) for the next token: one decode per token on the hot path, not two
            self._before = self.tokenizer.decode(self.ids[self.prefix : self.read], skip_special_tokens=True)

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
