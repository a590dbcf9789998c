"""What `spec-export serve` is started with, checked once when it is made."""
from __future__ import annotations

from dataclasses import dataclass

from ...runtime.errors import InvalidArgument


@dataclass(frozen=True)
class ServeOptions:
    api_key: str | None = None      # None: no authentication (loopback use)
    queue_size: int = 16            # requests waiting behind the running one; more get 429
    latest_wins: bool = False       # any new request cancels every older one (one editor, one user)
    max_body_bytes: int = 1 << 20   # larger request bodies get 413
    k: int | None = None            # draft tokens per round; None: the bundle's default
    speculative: bool | None = None  # False: plain decoding; None: the bundle's default
    drafter: str | None = None      # model | lookup | hybrid; None: the bundle's default
    adaptive: bool | None = None    # k per round from running estimates; None: the bundle's default
    model_id: str | None = None     # the name /v1/models lists; default: the bundle folder's name
    chat_template: str | None = None  # "plain" (prompting.PLAIN_CHAT) or a .jinja/.json file; None: the bundle's

    def __post_init__(self):
        # An empty key would be a key anyone can send: refused, whether it came from --api-key or SPECEDGE_API_KEY.
        if self.api_key is not None and not self.api_key.strip():
            raise InvalidArgument("the API key is empty (--api-key or SPECEDGE_API_KEY): give a key, or leave both "
                                  "unset for no authentication", "api_key")
