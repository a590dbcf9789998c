"""Where text and token ids enter the runtime: checked once, here, by the Engine and the server alike.

Text must be encodable Unicode (a lone UTF-16 surrogate, which JSON's "\\ud800" escape and Python strings allow, is
not) and short enough to fit the context before anything is tokenized: a token covers at most `longest_token`
characters of text, so a prompt longer than max_tokens * longest_token characters cannot fit, and is refused
without spending memory on tokenizing it.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from tokenizers import Tokenizer

from .errors import InvalidArgument


def check_text(name: str, text: object) -> str:
    """`text` if it is a str that UTF-8 can encode, else InvalidArgument naming `name` and the first bad place."""
    if not isinstance(text, str):
        raise InvalidArgument(f"{name} must be text (str), got {type(text).__name__}", name)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        # Never echo the text itself: a message holding a surrogate cannot be encoded either.
        raise InvalidArgument(f"{name} holds a lone UTF-16 surrogate (U+{ord(text[e.start]):04X}) at character "
                              f"{e.start}: send valid Unicode text (pair the surrogate or remove it)", name) from None
    return text


def longest_token(tokenizer: Tokenizer) -> int:
    """The most characters one token's text can stand for (its vocabulary string; byte-fallback pieces such as
    <0xE2> are longer than the byte they encode, so this bounds from above). At least 1."""
    return max([1, *(len(t) for t in tokenizer.get_vocab(with_added_tokens=True))])


def check_ids(name: str, ids: object, vocab_size: int) -> list[int]:
    """Token ids as a list of ints: a list, tuple or 1-D integer numpy array, every id in 0..vocab_size-1."""
    if isinstance(ids, np.ndarray):
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise InvalidArgument(f"{name} as a numpy array must be 1-D integer token ids, got shape {ids.shape} "
                                  f"of {ids.dtype}", name)
        ids = ids.tolist()
    if not isinstance(ids, (list, tuple)):
        raise InvalidArgument(f"{name} must be text or a list of token ids, got {type(ids).__name__}", name)
    for i, t in enumerate(ids):
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < vocab_size:
            raise InvalidArgument(f"{name}[{i}] = {t!r} is not a token id: ids are integers in 0..{vocab_size - 1}", name)
    return [int(t) for t in ids]


def encode_text(name: str, text: object, tokenizer: Tokenizer, max_tokens: int, longest: int,
                add_special_tokens: bool = True) -> list[int]:
    """Token ids of `text`, refused before tokenizing when it cannot fit `max_tokens` tokens."""
    text = check_text(name, text)
    if len(text) > max_tokens * longest:
        raise InvalidArgument(f"{name} has {len(text):,} characters ({len(text.encode('utf-8')):,} bytes), more "
                              f"than {max_tokens:,} tokens can hold: shorten it, or re-export with a larger "
                              f"--max-length", name)
    return tokenizer.encode(text, add_special_tokens=add_special_tokens).ids


def encode_prompt(prompt: str | Sequence[int] | np.ndarray, tokenizer: Tokenizer, vocab_size: int, max_length: int,
                  longest: int, name: str = "prompt") -> list[int]:
    """A request's prompt as token ids that leave room for at least one new token in a `max_length` context."""
    ids = encode_text(name, prompt, tokenizer, max_length, longest) if isinstance(prompt, str) \
        else check_ids(name, prompt, vocab_size)
    if not ids or (isinstance(prompt, str) and not prompt):   # "" may encode to a BOS token alone
        raise InvalidArgument(f"{name} is empty: give at least one character of text or one token id", name)
    if len(ids) >= max_length:
        raise InvalidArgument(f"{name} has {len(ids)} tokens but the bundle's context holds {max_length}: shorten "
                              f"it or re-export with a larger --max-length", name)
    return ids
