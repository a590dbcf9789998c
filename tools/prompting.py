"""Prompt formats a bundle's tokenizer defines: fill-in-the-middle special tokens and the chat template.

Used at export time (the FIM tokens are recorded in the manifest's `defaults["fim"]`) and by the server. Imports only
tokenizers (and jinja2, lazily, for chat templates: the `serve` extra).
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from tokenizers import Tokenizer

from ..runtime.errors import InvalidArgument

# Fill-in-the-middle families, all in prefix-suffix-middle order: PREFIX {prefix} SUFFIX {suffix} MIDDLE -> middle.
FIM_FAMILIES = (
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),   # Qwen2.5-Coder, Granite, ...
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),         # StarCoder, SmolLM, ...
    ("<fim-prefix>", "<fim-suffix>", "<fim-middle>"),         # SantaCoder
    ("<PRE>", "<SUF>", "<MID>"),                              # CodeLlama (as added tokens)
    ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),   # DeepSeek-Coder: begin=prefix, hole=suffix, end=middle
)
CHAT_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json")


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


def chat_template(folder: Path) -> str | None:
    """The default chat template shipped with the tokenizer files (any of the three places transformers uses)."""
    folder = Path(folder)
    for name in CHAT_FILES:
        f = folder / name
        if not f.is_file():
            continue
        if name.endswith(".jinja"):
            return f.read_text(encoding="utf-8")
        t = json.loads(f.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(t, list):  # named templates: [{"name": "default", "template": ...}, ...]
            t = next((x.get("template") for x in t if x.get("name") == "default"), None)
        if isinstance(t, str) and t:
            return t
    return None


class ChatTemplate:
    """A chat template compiled once in an immutable sandbox: a template is code shipped with a model, and a sandbox
    keeps it from reaching Python objects or mutating its inputs."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = ""):
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        # trim_blocks/lstrip_blocks as transformers renders them: the same template gives the same text.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals.update(raise_exception=raise_exception,
                           strftime_now=lambda fmt: datetime.now().strftime(fmt))
        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
        try:
            self.template = env.from_string(source)
        except TemplateError as e:
            raise InvalidArgument(f"the bundle's chat template does not compile ({e})") from e
        self.bos_token, self.eos_token = bos_token, eos_token

    def render(self, messages: list[dict]) -> str:
        """The prompt text for `messages`, ending with the assistant's turn opened (add_generation_prompt)."""
        try:
            return self.template.render(messages=messages, add_generation_prompt=True, bos_token=self.bos_token,
                                        eos_token=self.eos_token)
        except Exception as e:  # the template's own raise_exception("roles must alternate ..."), or its code failing
            raise InvalidArgument(f"the chat template refused these messages: {e}") from e
