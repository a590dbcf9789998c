"""examples/: the sentence splitter of voice.py (what a text-to-speech stage is handed, and when)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("openai")   # the examples' client (dev extra)

_spec = importlib.util.spec_from_file_location("voice", Path(__file__).resolve().parent.parent / "examples" / "voice.py")
voice = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(voice)


def split(deltas) -> list[str]:
    out = []
    voice.sentences(iter(deltas), out.append)
    return out


def test_a_leading_newline_is_not_the_first_sentence():
    """The issue's case: a reply that starts with a newline was timed at the newline."""
    assert split(["\n", "Open", " the file.", " Then", " read it.\n", "\n"]) == ["\nOpen the file. ", "Then read it.\n"]
    assert split(["\n\n", "...", " ", "Yes", "!"]) == ["\n\n... Yes!"]
    assert split(["OK.\n", "\n", "- ", "\n", "Done"]) == ["OK.\n", "\n- \nDone"]
    assert split(["\n", " ", "...", "\n"]) == []            # nothing to say
    assert split(["2", ".", " 3."]) == ["2. ", "3."]       # a digit is something to say


# Text built from what matters to the splitter: sentence ends, closing quotes, newlines, spaces, letters, digits and
# anything else (surrogates included), streamed in random pieces.
PIECES = st.one_of(st.sampled_from([".", "!", "?", "…", "\"", "')", "]", "\n", " ", "\t", "a", "Z", "7", "é", "-", "·"]),
                   st.characters())


@given(st.lists(st.lists(PIECES, max_size=6).map("".join), max_size=30))
def test_sentences_property(deltas):
    text = "".join(deltas)
    out = split(deltas)
    joined = "".join(out)
    assert text.startswith(joined) and not voice.speakable(text[len(joined):])   # nothing said is lost or reordered
    assert all(voice.speakable(s) for s in out)                                  # each one has a letter or digit
    for s in out[:-1]:                                                           # each but the last ends a sentence
        assert any(m.end() == len(s) and voice.speakable(s[: m.start()]) for m in voice.END.finditer(s))
    if voice.speakable(text):
        assert out and voice.speakable(out[0])
