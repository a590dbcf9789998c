"""The chat template a bundle's tokenizer defines, for the server. Imports only tokenizers (and jinja2, lazily: the
`serve` extra). Fill-in-the-middle tokens live in the runtime (`runtime/fim.py`)."""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from ..runtime.errors import InvalidArgument

CHAT_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json")

# For a base model that ships no chat template (`spec-export serve --chat-template plain`): the messages as a plain
# dialogue, the shape base models have read in transcripts and forums, and the one examples/voice.py sends by hand:
#     SYSTEM TEXT
#
#     User: hello
#     Assistant:
# after the BOS token where the tokenizer adds one to a plain prompt. Generation stops where the model starts writing
# the user's next turn (PLAIN_STOP).
PLAIN_CHAT = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n\n{% else %}"
              "{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}Assistant:{% endif %}")
PLAIN_STOP = ("\nUser:",)


def chat_template(folder: Path) -> str | None:
    """The default chat template shipped with the tokenizer files (any of the three places transformers uses)."""
    folder = Path(folder)
    for name in CHAT_FILES:
        if (folder / name).is_file():
            t = template_file(folder / name)
            if t:
                return t
    return None


def template_file(f: Path) -> str | None:
    """The chat template in one file: a .jinja file's text, or a JSON file's "chat_template" (a string, or named
    templates, of which "default")."""
    f = Path(f)
    try:
        text = f.read_text(encoding="utf-8")
        if f.suffix != ".json":
            return text
        t = json.loads(text).get("chat_template")
    except (OSError, ValueError, AttributeError) as e:
        raise InvalidArgument(f"cannot read a chat template from {f} ({e}): give a .jinja file, or a JSON file with "
                              f"a chat_template field") from e
    if isinstance(t, list):  # named templates: [{"name": "default", "template": ...}, ...]
        t = next((x.get("template") for x in t if isinstance(x, dict) and x.get("name") == "default"), None)
    return t if isinstance(t, str) and t else None


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
