"""Engine: loads a bundle once (two sessions, their fixed KV buffers, the tokenizer) and hands out generators.

Generations on one Engine are serialised: the caches belong to one request at a time. A generator holds the Engine
from creation until it finishes, is cancelled or is closed (or is garbage-collected). Another thread asking for a
generator meanwhile waits (optionally with a timeout, then EngineBusy); the thread that holds a live generator is
refused at once, because waiting there would deadlock.
"""
from __future__ import annotations

import dataclasses
import math
import os
import threading
import weakref
from pathlib import Path
from typing import Callable

import numpy as np
from tokenizers import Tokenizer

from .config import MAX_K, GenerationConfig, Result
from .drafter import Drafter, ModelDrafter
from .errors import BundleError, EngineBusy, InvalidArgument, SpecError
from .generator import Generator, Limits
from .kpolicy import KPolicy
from .kv import KVModel, open_model
from .lookup import HybridDrafter, LookupDrafter
from .manifest import ModelSpec, load_manifest
from .prompt import check_text, encode_prompt, longest_token

PROTOCOL = ("propose", "accepted", "lead", "unread")   # what a custom drafter must have, beside a bool `reads_prompt`


class Engine:
    def __init__(self, bundle: str | Path, provider: str | None = None, threads: int = 0, verify: bool = True,
                 cuda_graph: bool = True):
        """provider: cpu | cuda | rtx | trt; default: the one the bundle was exported for. threads: the target's
        onnxruntime threads (0: its default). verify: check every file's hash first (False: only what loading
        checks). cuda_graph: capture and replay each decode/verify step size (GPU providers only)."""
        if not isinstance(bundle, (str, os.PathLike)):
            raise InvalidArgument(f"bundle must be a path (str or Path), got {type(bundle).__name__}", "bundle")
        if provider is not None and not isinstance(provider, str):
            raise InvalidArgument(f"provider must be a name (str) or None, got {type(provider).__name__}", "provider")
        if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 0:
            raise InvalidArgument(f"threads must be an integer >= 0 (0: onnxruntime's default), got {threads!r}",
                                  "threads")
        for name, v in (("verify", verify), ("cuda_graph", cuda_graph)):
            if not isinstance(v, bool):
                raise InvalidArgument(f"{name} must be True or False, got {v!r}", name)
        self.bundle = Path(bundle)
        self.manifest = m = load_manifest(self.bundle, verify=verify)
        self.defaults = m.bundle_defaults()
        self.provider = provider = provider or m.target.provider
        self.target = _open(self.bundle, m.target, provider, int(threads), cuda_graph)
        # The draft runs on the calling thread alone: it is too small to gain from a pool, and a second session's
        # pool would spin between its runs and steal a core from the target's verify (1.6x slower rounds measured).
        self.draft = _open(self.bundle, m.draft, provider, 1, cuda_graph) if m.draft else None
        self.tokenizer = _tokenizer(self.bundle / "tokenizer.json")
        self.longest_token = longest_token(self.tokenizer)
        self.eos = frozenset(m.tokenizer.eos_token_ids)
        self.max_length = min(s.max_length for s in (m.target, m.draft) if s)
        # Adaptive k learns acceptance per drafter and the step costs t(n)/t(1), c; generations on an Engine are
        # serialised, so one policy carries what it learnt from request to request.
        self.policy = KPolicy(k_max=MAX_K, read_ratio=m.draft.parameters / m.target.parameters if m.draft else 1.0)
        self._lock = threading.Lock()        # held by the live generator
        self._state = threading.RLock()      # guards the two fields below (re-entrant: GC may call _orphaned)
        self._owner: weakref.ref | None = None
        self._owner_thread = 0

    def forget(self) -> None:
        """Drop the cached prefix (the next request prefills from scratch): for cold-start measurements."""
        for m in (self.target, self.draft):
            if m:
                m.reset()

    def run_s(self) -> float:
        """Seconds spent inside onnxruntime so far, both models."""
        return sum(m.run_s for m in (self.target, self.draft) if m)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (with the tokenizer's special tokens, as a prompt gets them)."""
        return self.tokenizer.encode(check_text("text", text)).ids

    def generator(self, prompt: str | list[int] | np.ndarray | None = None, config: GenerationConfig | None = None,
                  *, custom_drafter: Drafter | None = None, timeout: float | None = None, **options) -> Generator:
        """A generator for one request: `config`, or GenerationConfig fields as keywords (not both); settings left
        at None take the bundle's defaults (`engine.defaults`). custom_drafter: a Drafter object to draft with instead
        of the one `drafter` names. Waits while another thread's generation runs (up to `timeout` seconds)."""
        c = self._config(config, options, custom_drafter)
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not math.isfinite(timeout) or timeout < 0):
            raise InvalidArgument(f"timeout must be a finite number of seconds >= 0 or None, got {timeout!r}", "timeout")
        ids = [] if prompt is None else encode_prompt(prompt, self.tokenizer, self.manifest.tokenizer.vocab_size,
                                                      self.max_length, self.longest_token)
        rng = np.random.default_rng(c.seed)
        drafter = custom_drafter if custom_drafter is not None else self._drafter(c, rng)
        policy = self.policy if drafter is not None and c.adaptive else None
        limits = Limits(self.max_length, self.manifest.tokenizer.vocab_size, self.eos)
        g = Generator(self.target, drafter, c, limits, self.tokenizer, self._release, policy, rng, self.run_s)
        self._acquire(g, timeout)
        g.append_tokens(ids)
        return g

    def generate(self, prompt: str | list[int] | np.ndarray, config: GenerationConfig | None = None, *,
                 on_text: Callable[[str], None] | None = None, custom_drafter: Drafter | None = None,
                 timeout: float | None = None, **options) -> Result:
        """Run one request to the end; `on_text` receives each text delta as soon as it is final."""
        if on_text is not None and not callable(on_text):
            raise InvalidArgument(f"on_text must be a function of one str, got {type(on_text).__name__}", "on_text")
        g = self.generator(prompt, config, custom_drafter=custom_drafter, timeout=timeout, **options)
        try:
            for delta in g.text_deltas():
                if on_text:
                    on_text(delta)
        finally:
            g.close()
        return g.result()

    # -- one request's settings, checked here once (GenerationConfig checks each field) ------------------------------
    def _config(self, config, options: dict, custom_drafter) -> GenerationConfig:
        if config is not None and options:
            raise InvalidArgument(f"give a GenerationConfig or keyword options, not both: {', '.join(options)} would "
                                  f"be ignored", next(iter(options)))
        if config is not None and not isinstance(config, GenerationConfig):
            raise InvalidArgument(f"config must be a GenerationConfig, got {type(config).__name__}", "config")
        if config is None:
            fields = {f.name for f in dataclasses.fields(GenerationConfig)}
            for name in options:
                if name not in fields:
                    raise InvalidArgument(f"unknown option {name!r}: GenerationConfig has {', '.join(sorted(fields))}",
                                          name)
            config = GenerationConfig(**options)
        if custom_drafter is not None:
            missing = [a for a in PROTOCOL if not callable(getattr(custom_drafter, a, None))]
            if missing or not isinstance(getattr(custom_drafter, "reads_prompt", None), bool):
                raise InvalidArgument(f"custom_drafter must follow the Drafter protocol ({', '.join(PROTOCOL)} and "
                                      f"a bool reads_prompt); {type(custom_drafter).__name__} lacks "
                                      f"{', '.join(missing) or 'reads_prompt'}", "custom_drafter")
            if config.drafter is not None or config.speculative is False:
                raise InvalidArgument("custom_drafter drafts: it cannot be combined with a drafter name or "
                                      "speculative=False", "custom_drafter")
            config = dataclasses.replace(config, speculative=True)
        c = self.defaults.fill(config)
        k_max = min(MAX_K, self.max_length // 2)  # a round writes k + 1 cache rows; past half the cache is nonsense
        if not 1 <= c.k <= k_max:
            raise InvalidArgument(f"k must be between 1 and {k_max} draft tokens per round for this bundle "
                                  f"(context {self.max_length}), got {c.k}", "k")
        if c.drafter == "model" and self.draft is None and custom_drafter is None and c.speculative:
            raise InvalidArgument("this bundle has no draft model (exported with the target only): use drafter "
                                  "lookup or hybrid, or re-export with --draft", "drafter")
        room = self.draft.spec.max_length if self.draft else 0
        if self.draft and c.draft_window and 2 * c.draft_window + MAX_K + 1 > room:
            raise InvalidArgument(f"draft_window must be at most {(room - MAX_K - 1) // 2} for this bundle (the draft "
                                  f"reads up to twice the window, then k), got {c.draft_window}", "draft_window")
        return c

    def _drafter(self, c: GenerationConfig, rng: np.random.Generator) -> Drafter | None:
        """The one drafter the request names (None: plain decoding); the draft model samples with the request's
        settings (the target's processing)."""
        if not c.speculative:
            return None
        if c.drafter == "lookup":
            return LookupDrafter(self.manifest.target.vocab_size, c.temperature)
        model = ModelDrafter(self.draft, c, rng, c.draft_window or None) if self.draft is not None else None
        if c.drafter == "model":
            return model
        return HybridDrafter(LookupDrafter(self.manifest.target.vocab_size, c.temperature), model)

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

    def _release(self, g: Generator, failed: bool = False) -> None:
        with self._state:
            if self._owner is not None and self._owner() is g:
                if failed:   # a step that failed midway leaves the caches in an unknown state
                    self.forget()
                self._owner = None
                self._lock.release()

    def _orphaned(self, ref: weakref.ref) -> None:
        """A generator dropped without finishing: its Engine is free again."""
        with self._state:
            if self._owner is ref:
                self._owner = None
                self._lock.release()


def _open(bundle: Path, spec: ModelSpec, provider: str, threads: int, cuda_graph: bool) -> KVModel:
    """The session for one graph; a graph onnxruntime cannot load (truncated, corrupted: possible with verify=False)
    is the bundle's fault and says which file."""
    try:
        return open_model(bundle, spec, provider, threads, cuda_graph)
    except SpecError:
        raise
    except Exception as e:  # onnxruntime's Fail, InvalidProtobuf, NoSuchFile, ...: no common base but Exception
        data = f" or its weights {spec.graph}.data" if (bundle / f"{spec.graph}.data").is_file() else ""
        raise BundleError(f"the {spec.role} graph {spec.graph}{data} in {bundle} cannot be loaded: "
                          f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}; re-export the "
                          f"bundle, or load it with verify=True to find the modified file") from e


def _tokenizer(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for a missing, truncated or invalid file
        raise BundleError(f"{path.name} in {path.parent} cannot be loaded ({str(e)[:300]}); re-export the bundle, "
                          f"or load it with verify=True to find the modified file") from e
