"""What a request asks for (GenerationConfig, validated once, when it is made), what a bundle gives a request that
leaves a setting open (BundleDefaults, typed once, when the manifest is read) and what a request returns (Result)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from .errors import BundleError, InvalidArgument
from .prompt import check_text
from .stats import Stats

MAX_K = 32           # draft tokens per round, at most
DRAFTERS = ("model", "lookup", "hybrid")   # the draft model; prompt lookup; lookup topped up by the model
FINISH_REASONS = ("length", "eos", "stop", "context_full", "cancelled")   # and "error" on a raised exception


@dataclass(frozen=True)
class GenerationConfig:
    """One request's settings. Every field is checked here and nowhere else; a bad one raises InvalidArgument whose
    `param` names it. numpy scalars are accepted and stored as Python numbers."""
    max_new_tokens: int = 128
    k: int | None = None              # draft tokens per round; None: the bundle's default (tuned), else 4
    temperature: float = 0.0          # 0: greedy (output equals the target's own greedy output)
    top_k: int = 0                    # 0: off
    top_p: float = 1.0                # 1: off
    seed: int | None = None
    stop: tuple[str, ...] = ()        # stop strings, matched on decoded text
    speculative: bool | None = None   # False: plain decoding through the same engine; None: the bundle's default
    drafter: str | None = None        # one of DRAFTERS; None: the bundle's default (BundleDefaults.drafter)
    adaptive: bool | None = None      # True: k per round from running estimates (k is then the most a round drafts);
                                      # None: the bundle's default
    draft_window: int | None = None   # tokens of recent context the draft model reads (its own positions from 0);
                                      # 0: all of it; None: the bundle's default

    def __post_init__(self):
        put = lambda name, v: object.__setattr__(self, name, v)  # noqa: E731  (frozen: normalised once, here)
        put("max_new_tokens", _int("max_new_tokens", self.max_new_tokens, 1))
        put("k", _opt(_int, "k", self.k, 1, MAX_K))
        put("temperature", _float("temperature", self.temperature, 0.0, "0 = greedy"))
        put("top_k", _int("top_k", self.top_k, 0))
        put("top_p", _float("top_p", self.top_p, 0.0, "1 = off", low_open=True, high=1.0))
        put("seed", _opt(_int, "seed", self.seed, 0))
        put("stop", _stop(self.stop))
        put("speculative", _opt(_bool, "speculative", self.speculative))
        put("adaptive", _opt(_bool, "adaptive", self.adaptive))
        if self.drafter is not None and (not isinstance(self.drafter, str) or self.drafter not in DRAFTERS):
            raise InvalidArgument(f"drafter must be one of {', '.join(DRAFTERS)}, got {self.drafter!r}", "drafter")
        put("draft_window", _opt(_int, "draft_window", self.draft_window, 0))


def _opt(check, name: str, v, *args):
    return None if v is None else check(name, v, *args)


def _int(name: str, v, low: int, high: int | None = None) -> int:
    ok = isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))
    if not ok or v < low or (high is not None and v > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise InvalidArgument(f"{name} must be an integer {bound}, got {v!r}", name)
    return int(v)


def _float(name: str, v, low: float, note: str, low_open: bool = False, high: float | None = None) -> float:
    ok = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_)) \
        and math.isfinite(v) and (v > low if low_open else v >= low) and (high is None or v <= high)
    if not ok:
        bound = f"in ({low:g}, {high:g}]" if high is not None else f">= {low:g}"
        raise InvalidArgument(f"{name} must be a finite number {bound} ({note}), got {v!r}", name)
    return float(v)


def _bool(name: str, v) -> bool:
    if not isinstance(v, (bool, np.bool_)):
        raise InvalidArgument(f"{name} must be True, False or None, got {v!r}", name)
    return bool(v)


def _stop(stop) -> tuple[str, ...]:
    if isinstance(stop, str) or not isinstance(stop, (tuple, list)):
        raise InvalidArgument(f"stop must be a list of strings, got {type(stop).__name__}", "stop")
    for i, s in enumerate(stop):
        check_text(f"stop[{i}]", s)
        if s == "":
            raise InvalidArgument("stop strings must not be empty: an empty string would stop before any text",
                                  f"stop[{i}]")
    return tuple(stop)


@dataclass(frozen=True)
class BundleDefaults:
    """The settings a request leaves at None, from the manifest's free-form `defaults` (export writes k and the FIM
    tokens; `tune` writes its choice), typed and checked once. A bundle with a draft model drafts with the adaptive
    hybrid unless the manifest names a drafter; a target-only bundle drafts by lookup with a fixed k."""
    k: int = 4
    speculative: bool = True          # False: `tune` found that speculation does not pay on this machine
    drafter: str = "hybrid"           # one of DRAFTERS
    adaptive: bool = True
    draft_window: int = 0             # 0: the draft model reads the whole context
    fim: dict | None = None           # {"prefix", "suffix", "middle"}: the tokenizer's fill-in-the-middle tokens
    tuned: dict | None = None         # what `tune` measured when it chose (free-form, for `inspect`)

    @classmethod
    def from_manifest(cls, d: dict, has_draft: bool) -> BundleDefaults:
        """BundleError naming the first bad field (manifest field defaults.X)."""
        named = "drafter" in d   # a drafter chosen (by tune or by hand) brings its own adaptive setting
        drafter = d.get("drafter", "hybrid" if has_draft else "lookup")
        out = cls(k=d.get("k", 4), speculative=d.get("speculative", True), drafter=drafter,
                  adaptive=d.get("adaptive", False if named or not has_draft else True),
                  draft_window=d.get("draft_window", 0), fim=d.get("fim"), tuned=d.get("tuned"))
        _bundle(type(out.k) is int and 1 <= out.k <= MAX_K, "k", f"must be an integer from 1 to {MAX_K}, got {out.k!r}")
        for key in ("speculative", "adaptive"):
            v = getattr(out, key)
            _bundle(type(v) is bool, key, f"must be true or false, got {v!r}")
        _bundle(drafter in DRAFTERS, "drafter", f"must be one of {', '.join(DRAFTERS)}, got {drafter!r}")
        _bundle(has_draft or drafter != "model", "drafter", "is 'model' but the bundle has no draft model")
        _bundle(type(out.draft_window) is int and out.draft_window >= 0, "draft_window",
                f"must be an integer >= 0, got {out.draft_window!r}")
        for key in ("fim", "tuned"):
            _bundle(getattr(out, key) is None or isinstance(getattr(out, key), dict), key, "must be an object")
        return out

    def fill(self, c: GenerationConfig) -> GenerationConfig:
        """`c` with every setting it left at None taken from these defaults (the seed stays None: a fresh draw). A
        seeded sampling request keeps a fixed k unless it asks for adaptive: adaptive k follows measured times, and
        another k draws other random numbers, so the seed would no longer give the same text."""
        pick = lambda v, default: default if v is None else v  # noqa: E731
        seeded = c.seed is not None and c.temperature > 0
        return dataclasses.replace(c, k=pick(c.k, self.k), speculative=pick(c.speculative, self.speculative),
                                   drafter=pick(c.drafter, self.drafter),
                                   adaptive=pick(c.adaptive, self.adaptive and not seeded),
                                   draft_window=pick(c.draft_window, self.draft_window))


def _bundle(ok: bool, key: str, what: str) -> None:
    if not ok:
        raise BundleError(f"manifest field defaults.{key} {what}; re-export the bundle (or undo the edit)")


@dataclass(frozen=True)
class Result:
    text: str
    token_ids: list[int]
    finish_reason: str                # one of FINISH_REASONS
    stats: Stats

    def to_dict(self) -> dict:
        return {"text": self.text, "token_ids": self.token_ids, "finish_reason": self.finish_reason,
                "stats": self.stats.to_dict()}
