"""Streaming text: deltas never split a UTF-8 character and never show part of a stop string."""
from __future__ import annotations

from tokenizers import Tokenizer

from specedge.runtime.text import TextStream

TEXT = "naïve café — ✓ 日本語 😀 def f(x):\n    return x  # done"


def stream(tok, ids, stop=()):
    s = TextStream(tok, stop)
    deltas = [s.push(t) for t in ids]
    return s, deltas + [s.flush()]


def test_deltas_are_whole_characters(tok_dir):
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    ids = tok.encode(TEXT, add_special_tokens=False).ids
    assert len(ids) > len(TEXT) // 4  # multi-byte characters are split over byte-level tokens
    s, deltas = stream(tok, ids)
    assert "".join(deltas) == TEXT == s.text
    assert not any("\ufffd" in d for d in deltas)


def test_stop_string_is_cut_and_never_leaks(tok_dir):
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    ids = tok.encode(TEXT, add_special_tokens=False).ids
    s, deltas = stream(tok, ids, stop=("日本",))
    assert s.stopped and s.text == TEXT[: TEXT.index("日本")] == "".join(deltas)
    s, deltas = stream(tok, ids, stop=("return y",))  # a prefix appears, the whole never does
    assert not s.stopped and "".join(deltas) == TEXT
    stop = "return y"
    shown = ""
    for d in deltas[:-1]:  # before the final flush, a possible start of the stop string is always held back
        shown += d
        assert not any(shown.endswith(stop[:n]) for n in range(1, len(stop)))
