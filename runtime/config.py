"""What a request asks for (GenerationConfig, validated when it is made) and what it returns (Result)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import InvalidArgument
from .stats import Stats

MAX_K = 32           # draft tokens per round, at most
DRAFTERS = ("model", "lookup", "hybrid")   # the draft model; prompt lookup; lookup topped up by the model
FINISH_REASONS = ("length", "eos", "stop", "context_full", "cancelled")   # and "error" on a raised exception


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 128
    k: int | None = None              # draft tokens per round; None: the bundle's default (tuned), else 4
    temperature: float = 0.0          # 0: greedy (output equals the target's own greedy output)
    top_k: int = 0                    # 0: off
    top_p: float = 1.0                # 1: off
    seed: int | None = None
    stop: tuple[str, ...] = ()        # stop strings, matched on decoded text
    speculative: bool | None = None   # False: plain decoding through the same engine; None: the bundle's default
    drafter: str | None = None        # one of DRAFTERS; None: the bundle's default (tuned), else model (lookup if
                                      # the bundle has no draft model)
    adaptive: bool | None = None      # True: k per round from running estimates (k is then the most a round drafts);
                                      # None: the bundle's default

    def __post_init__(self):
        _int("max_new_tokens", self.max_new_tokens, 1)
        if self.k is not None:
            _int("k", self.k, 1, MAX_K)
        _float("temperature", self.temperature, 0.0, "0 = greedy")
        _int("top_k", self.top_k, 0)
        _float("top_p", self.top_p, 0.0, "1 = off", low_open=True, high=1.0)
        if self.seed is not None:
            _int("seed", self.seed, 0)
        if isinstance(self.stop, str) or not isinstance(self.stop, (tuple, list)) \
                or not all(isinstance(s, str) for s in self.stop):
            raise InvalidArgument(f"stop must be a list of strings, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(self.stop))   # frozen: normalised once, here
        if any(s == "" for s in self.stop):
            raise InvalidArgument("stop strings must not be empty: an empty string would stop before any text")
        for name in ("speculative", "adaptive"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise InvalidArgument(f"{name} must be True, False or None, got {getattr(self, name)!r}")
        if self.drafter is not None and self.drafter not in DRAFTERS:
            raise InvalidArgument(f"drafter must be one of {', '.join(DRAFTERS)}, got {self.drafter!r}")


def _int(name: str, v, low: int, high: int | None = None) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < low or (high is not None and v > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise InvalidArgument(f"{name} must be an integer {bound}, got {v!r}")


def _float(name: str, v, low: float, note: str, low_open: bool = False, high: float | None = None) -> None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) \
        and (v > low if low_open else v >= low) and (high is None or v <= high)
    if not ok:
        bound = f"in ({low:g}, {high:g}]" if high is not None else f">= {low:g}"
        raise InvalidArgument(f"{name} must be a finite number {bound} ({note}), got {v!r}")


@dataclass(frozen=True)
class Result:
    text: str
    token_ids: list[int]
    finish_reason: str                # one of FINISH_REASONS
    stats: Stats

    def to_dict(self) -> dict:
        return {"text": self.text, "token_ids": self.token_ids, "finish_reason": self.finish_reason,
                "stats": self.stats.to_dict()}
