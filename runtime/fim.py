"""Fill-in-the-middle: the special tokens a tokenizer defines for it. Read at export time (the family is recorded in
the manifest's defaults) and at run time (the server's /infill and `suffix`), so it lives in the runtime."""
from __future__ import annotations

from tokenizers import Tokenizer

# Fill-in-the-middle families, all in prefix-suffix-middle order: PREFIX {prefix} SUFFIX {suffix} MIDDLE -> middle.
FIM_FAMILIES = (
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),   # Qwen2.5-Coder, Granite, ...
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),         # StarCoder, SmolLM, ...
    ("<fim-prefix>", "<fim-suffix>", "<fim-middle>"),         # SantaCoder
    ("<PRE>", "<SUF>", "<MID>"),                              # CodeLlama (as added tokens)
    ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),   # DeepSeek-Coder: begin=prefix, hole=suffix, end=middle
)


def fim_tokens(tokenizer: Tokenizer) -> dict[str, str] | None:
    """{"prefix", "suffix", "middle"} token strings when the tokenizer has one whole FIM family as single tokens."""
    for family in FIM_FAMILIES:
        ids = [tokenizer.token_to_id(t) for t in family]
        if all(i is not None for i in ids):
            return dict(zip(("prefix", "suffix", "middle"), family))
    return None


def fim_ids(tokenizer: Tokenizer, recorded: dict | None) -> tuple[int, int, int] | None:
    """The FIM token ids: the family recorded at export time, else a scan of the tokenizer (older bundles)."""
    names = recorded or fim_tokens(tokenizer)
    if not names:
        return None
    ids = tuple(tokenizer.token_to_id(names[r]) for r in ("prefix", "suffix", "middle"))
    return None if None in ids else ids
