"""Engine: loads a bundle once (two sessions, their fixed KV buffers, the tokenizer) and hands out generators.

Generations on one Engine are serialised: the caches belong to one request at a time. A generator holds the Engine
from creation until it finishes, is cancelled or is closed (or is garbage-collected). Another thread asking for a
generator meanwhile waits (optionally with a timeout, then EngineBusy); the thread that holds a live generator is
refused at once, because waiting there would deadlock.
"""
from __future__ import annotations

import threading
import weakref
from pathlib import Path
from typing import Callable

import numpy as np
from tokenizers import Tokenizer

from .config import MAX_K, GenerationConfig, Result
from .drafter import Drafter, ModelDrafter
from .errors import EngineBusy, InvalidArgument
from .generator import Generator
from .kpolicy import KPolicy
from .kv import open_model
from .lookup import HybridDrafter, LookupDrafter
from .manifest import load_manifest


class Engine:
    def __init__(self, bundle: str | Path, provider: str | None = None, threads: int = 0, verify: bool = True,
                 cuda_graph: bool = True):
        """provider: cpu | cuda | rtx | trt; default: the one the bundle was exported for.
        cuda_graph: capture and replay each decode/verify step size (GPU providers only)."""
        self.bundle = Path(bundle)
        self.manifest = m = load_manifest(self.bundle, verify=verify)
        self.provider = provider = provider or m.target.provider
        self.target = open_model(self.bundle, m.target, provider, threads, cuda_graph)
        # The draft runs on the calling thread alone: it is too small to gain from a pool, and a second session's
        # pool would spin between its runs and steal a core from the target's verify (1.6x slower rounds measured).
        self.draft = open_model(self.bundle, m.draft, provider, 1, cuda_graph) if m.draft else None
        self.tokenizer = Tokenizer.from_file(str(self.bundle / "tokenizer.json"))
        self.eos = frozenset(m.tokenizer.eos_token_ids)
        self.max_length = min(s.max_length for s in (m.target, m.draft) if s)
        self.default_k = int(m.defaults.get("k", 4))
        self.default_speculative = bool(m.defaults.get("speculative", True))  # `tune` may have found it does not pay
        self.default_drafter = m.defaults.get("drafter", "model" if self.draft else "lookup")
        self.default_adaptive = bool(m.defaults.get("adaptive", False))
        # Adaptive k learns acceptance per drafter and the step costs t(n)/t(1), c; generations on an Engine are
        # serialised, so one policy carries what it learnt from request to request.
        self.policy = KPolicy(k_max=MAX_K)
        self._lock = threading.Lock()        # held by the live generator
        self._state = threading.RLock()      # guards the two fields below (re-entrant: GC may call _orphaned)
        self._owner: weakref.ref | None = None
        self._owner_thread = 0

    def forget(self) -> None:
        """Drop the cached prefix (the next request prefills from scratch): for cold-start measurements."""
        for m in (self.target, self.draft):
            if m:
                m.reset()

    def make_drafter(self, name: str, c: GenerationConfig, rng: np.random.Generator) -> Drafter:
        """A drafter by name; the draft model samples with the request's settings (the target's processing)."""
        if name == "model" and self.draft is None:
            raise InvalidArgument("this bundle has no draft model (exported with the target only): use drafter "
                                  "lookup or hybrid, or re-export with --draft")
        model = ModelDrafter(self.draft, c.temperature, c.top_k, c.top_p, rng) if self.draft else None
        lookup = LookupDrafter(self.manifest.target.vocab_size, c.temperature)
        return {"model": model, "lookup": lookup, "hybrid": HybridDrafter(lookup, model)}[name]

    def run_s(self) -> float:
        """Seconds spent inside onnxruntime so far, both models."""
        return sum(m.run_s for m in (self.target, self.draft) if m)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def generator(self, prompt: str | list[int] | None = None, config: GenerationConfig | None = None,
                  timeout: float | None = None, **options) -> Generator:
        """A generator for one request. Waits while another thread's generation runs (up to `timeout` seconds)."""
        c = config or GenerationConfig(**options)
        k = self.default_k if c.k is None else c.k
        k_max = min(MAX_K, self.max_length // 2)  # a round writes k + 1 cache rows; past half the cache is nonsense
        if not 1 <= k <= k_max:
            raise InvalidArgument(f"k must be between 1 and {k_max} draft tokens per round for this bundle "
                                  f"(context {self.max_length}), got {k}")
        if prompt is not None and (not isinstance(prompt, (str, list, tuple, np.ndarray)) or len(prompt) == 0):
            raise InvalidArgument("the prompt is empty (or neither text nor a list of token ids): give at least one "
                                  "character of text")
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt or [])
        if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool)
                   and 0 <= t < self.manifest.tokenizer.vocab_size for t in ids):
            raise InvalidArgument(f"token ids must be integers in 0..{self.manifest.tokenizer.vocab_size - 1}")
        pick = lambda value, default: default if value is None else value  # noqa: E731
        g = Generator(self, c, k, pick(c.speculative, self.default_speculative), pick(c.drafter, self.default_drafter),
                      pick(c.adaptive, self.default_adaptive))
        self._acquire(g, timeout)
        g.append_tokens(ids)
        return g

    def generate(self, prompt: str | list[int], config: GenerationConfig | None = None,
                 on_text: Callable[[str], None] | None = None, timeout: float | None = None, **options) -> Result:
        """Run one request to the end; `on_text` receives each text delta as soon as it is final."""
        g = self.generator(prompt, config, timeout, **options)
        try:
            for delta in g.text_deltas():
                if on_text:
                    on_text(delta)
        finally:
            g.close()
        return g.result()

    # -- one generation at a time --------------------------------------------------------------------------------
    def _acquire(self, g: Generator, timeout: float | None) -> None:
        with self._state:
            live = self._owner() if self._owner else None
            if live is not None and self._owner_thread == threading.get_ident():
                raise EngineBusy("this thread already holds a live generator on this Engine: finish, cancel or "
                                 "close it first (generations on one Engine run one at a time)")
        if not self._lock.acquire(timeout=-1 if timeout is None else timeout):
            raise EngineBusy(f"the Engine stayed busy with another generation for {timeout:g} s: retry later, or "
                             f"load a second Engine for concurrent requests")
        with self._state:
            self._owner, self._owner_thread = weakref.ref(g, self._orphaned), threading.get_ident()

    def _release(self, g: Generator) -> None:
        with self._state:
            if self._owner is not None and self._owner() is g:
                self._owner = None
                self._lock.release()

    def _orphaned(self, ref: weakref.ref) -> None:
        """A generator dropped without finishing: its Engine is free again."""
        with self._state:
            if self._owner is ref:
                self._owner = None
                self._lock.release()
