"""The speculative decoding loop: draft -> verify -> accept -> rewind, behind a streaming generator."""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from tokenizers import Tokenizer

from .drafter import Drafter, ModelDrafter
from .errors import InvalidArgument
from .manifest import load_manifest
from .model import KVModel, make_session
from .sampling import distribution, sample, verify_greedy, verify_sampled
from .text import TextStream

MAX_K = 32


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


@dataclass
class Stats:
    """Per request. alpha is the per-token acceptance probability of the theory (accepted / tested, where a round
    tests tokens up to its first rejection); mean_accepted_length is tau, tokens committed per target pass."""
    k: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    tested: int = 0
    rounds_plain: int = 0             # of `rounds` (target passes): the ones without a draft (end of budget/context)
    accept_hist: list[int] = field(default_factory=list)     # [n] drafting rounds that accepted n drafts, n = 0..k
    reject_round_pos: list[int] = field(default_factory=list)  # [i] rejections at draft position i in a round
    reject_token_pos: list[int] = field(default_factory=list)  # index in the response of each rejected draft
    prefill_ms: float = 0.0
    draft_ms: float = 0.0
    target_ms: float = 0.0
    ort_ms: float = 0.0               # of draft_ms + target_ms + prefill_ms: inside onnxruntime
    ttft_ms: float = 0.0
    decode_ms: float = 0.0            # after the prefill until the last token
    token_ms: list[float] = field(default_factory=list)      # time between consecutive tokens as committed

    @property
    def alpha(self) -> float:
        return self.accepted / self.tested if self.tested else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        return self.new_tokens / self.rounds if self.rounds else 0.0

    @property
    def tokens_per_s(self) -> float:
        return 1e3 * self.new_tokens / self.decode_ms if self.decode_ms else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.token_ms, q)) if self.token_ms else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("token_ms")
        d.update(alpha=self.alpha, acceptance_rate=self.acceptance_rate,
                 mean_accepted_length=self.mean_accepted_length, tokens_per_s=self.tokens_per_s,
                 tpot_p50_ms=self.percentile(50), tpot_p90_ms=self.percentile(90), tpot_p99_ms=self.percentile(99))
        return d


@dataclass(frozen=True)
class Result:
    text: str
    token_ids: list[int]
    finish_reason: str                # "length" | "eos" | "stop" | "context_full" | "cancelled"
    stats: Stats

    def to_dict(self) -> dict:
        return {"text": self.text, "token_ids": self.token_ids, "finish_reason": self.finish_reason,
                "stats": self.stats.to_dict()}


class Engine:
    """Loads a bundle once: two sessions, their fixed KV buffers and the tokenizer; serves requests one at a time."""

    def __init__(self, bundle: str | Path, provider: str | None = None, threads: int = 0, verify: bool = True,
                 cuda_graph: bool = True):
        """provider: cpu | cuda | rtx | trt; default: the one the bundle was exported for.
        cuda_graph: capture and replay each decode/verify step size (GPU providers only)."""
        self.bundle = bundle = Path(bundle)
        self.manifest = m = load_manifest(bundle, verify=verify)
        self.provider = provider = provider or m.target.provider

        def load(spec, threads):
            session = make_session(str(bundle / spec.graph), provider, threads, cuda_graph, spec)
            return KVModel(spec, session, cuda_graph)

        self.target = load(m.target, threads)
        # The draft runs on the calling thread alone: it is too small to gain from a pool, and a second session's
        # pool would spin between its runs and steal a core from the target's verify (1.6x slower rounds measured).
        self.draft = load(m.draft, 1)
        self.tokenizer = Tokenizer.from_file(str(bundle / "tokenizer.json"))
        self.eos = frozenset(m.tokenizer.eos_token_ids)
        self.max_length = min(m.target.max_length, m.draft.max_length)
        self.default_k = int(m.defaults.get("k", 4))
        self.default_speculative = bool(m.defaults.get("speculative", True))  # `tune` may have found it does not pay

    def forget(self) -> None:
        """Drop the cached prefix (the next request prefills from scratch): for cold-start measurements."""
        for m in (self.target, self.draft):
            m.reset()

    def make_drafter(self, c: GenerationConfig, rng: np.random.Generator) -> Drafter:
        """The bundle's draft model, sampling with the request's settings (the same processing as the target's)."""
        return ModelDrafter(self.draft, c.temperature, c.top_k, c.top_p, rng)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def generator(self, prompt: str | list[int] | None = None, config: GenerationConfig | None = None,
                  **options) -> "Generator":
        g = Generator(self, config or GenerationConfig(**options))
        if prompt is not None and len(prompt) == 0:
            raise InvalidArgument("the prompt is empty: give at least one character of text")
        if prompt is not None:
            g.append_tokens(self.encode(prompt) if isinstance(prompt, str) else prompt)
        return g

    def generate(self, prompt: str | list[int], config: GenerationConfig | None = None,
                 on_text: Callable[[str], None] | None = None, **options) -> Result:
        """Run one request to the end; `on_text` receives each text delta as soon as it is final."""
        g = self.generator(prompt, config, **options)
        for delta in g.text_deltas():
            if on_text:
                on_text(delta)
        return g.result()


class Generator:
    """One request. Iterate for token ids (`for t in gen`) or text deltas (`gen.text_deltas()`); tokens of a round are
    buffered and handed out one at a time. `cancel()` may be called from another thread."""

    def __init__(self, engine: Engine, config: GenerationConfig):
        self.engine, self.config = engine, config
        c = config
        if c.max_new_tokens < 1:
            raise InvalidArgument(f"max_new_tokens must be >= 1, got {c.max_new_tokens}")
        if c.temperature < 0:
            raise InvalidArgument(f"temperature must be >= 0 (0 = greedy), got {c.temperature}")
        if not 0 < c.top_p <= 1 or c.top_k < 0:
            raise InvalidArgument(f"top_p must be in (0, 1] and top_k >= 0, got top_p={c.top_p}, top_k={c.top_k}")
        self.k = engine.default_k if c.k is None else c.k
        k_max = min(MAX_K, engine.max_length // 2)  # a round writes k + 1 cache rows; past half the cache is nonsense
        if not 1 <= self.k <= k_max:
            raise InvalidArgument(f"k must be between 1 and {k_max} draft tokens per round for this bundle "
                                  f"(context {engine.max_length}), got {self.k}")
        self.speculative = engine.default_speculative if c.speculative is None else c.speculative
        self.rng = np.random.default_rng(c.seed)
        self.drafter = engine.make_drafter(c, self.rng)
        self._cancel = threading.Event()
        self.reset()

    def reset(self) -> None:
        """Forget the request; the engine's buffers are kept (and a shared prompt prefix is reused)."""
        self.tokens: list[int] = []      # prompt + committed response
        self.n_prompt = 0
        self.pending: deque[int] = deque()   # committed tokens not yet handed out
        self.texts: deque[str] = deque()     # final text deltas not yet handed out
        self.finish_reason: str | None = None
        self.stream = TextStream(self.engine.tokenizer, self.config.stop)
        self.stats = Stats(k=self.k, accept_hist=[0] * (self.k + 1), reject_round_pos=[0] * self.k)
        self._started = False
        self._cancel.clear()

    def append_tokens(self, ids: list[int]) -> None:
        if self._started:
            raise InvalidArgument("append_tokens after generation started; call reset() first")
        self.tokens += [int(i) for i in ids]
        self.n_prompt = len(self.tokens)

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def response(self) -> list[int]:
        return self.tokens[self.n_prompt :]

    def __iter__(self) -> Iterator[int]:
        return self._drain(self.pending)

    def text_deltas(self) -> Iterator[str]:
        return self._drain(self.texts)

    def _drain(self, buffer: deque):
        while True:
            if buffer:
                yield buffer.popleft()
            elif self.finish_reason:
                return
            else:
                self._advance()

    def result(self) -> Result:
        for _ in self:
            pass
        return Result(self.stream.text, self.response, self.finish_reason, self.stats)

    # -- the loop ----------------------------------------------------------------------------------------------
    def _start(self) -> None:
        e, s = self.engine, self.stats
        if not self.tokens:
            raise InvalidArgument("the prompt is empty: give at least one token of text")
        if len(self.tokens) >= e.max_length:
            raise InvalidArgument(f"the prompt has {len(self.tokens)} tokens but the bundle's context holds "
                                  f"{e.max_length}: shorten the prompt or re-export with a larger --max-length")
        self._started, s.prompt_tokens = True, len(self.tokens)
        self.t0, self._ort0 = time.perf_counter(), e.target.run_s + e.draft.run_s
        # The target's cache holds every committed token but the last, which opens the next verify pass.
        keep = e.target.reuse(self.tokens)
        if keep < len(self.tokens) - 1:
            e.target.forward(self.tokens[keep:-1], want=None)
        self.t_last = self.t_prefill = time.perf_counter()
        s.prefill_ms = 1e3 * (self.t_prefill - self.t0)

    def _advance(self) -> None:
        if not self._started:
            self._start()
        e, c, s = self.engine, self.config, self.stats
        if self._cancel.is_set():
            self._finish("cancelled")
            return
        # k shrinks near the end of the context and of the budget: never draft what cannot be kept.
        left = c.max_new_tokens - len(self.response)
        k = min(self.k, e.max_length - len(self.tokens), left - 1) if self.speculative else 0
        new = self._round(k) if k > 0 else self._plain_step()
        now = time.perf_counter()
        s.token_ms += [1e3 * (now - self.t_last)] + [0.0] * (len(new) - 1)
        self.t_last = now
        self._commit(new)

    def _plain_step(self) -> list[int]:
        t = time.perf_counter()
        c, target = self.config, self.engine.target
        if c.temperature == 0:
            nxt = int(target.forward(self.tokens[-1:], want="argmax")[0])
        else:
            nxt = sample(distribution(target.forward(self.tokens[-1:])[0], c.temperature, c.top_k, c.top_p), self.rng)
        self.stats.target_ms += 1e3 * (time.perf_counter() - t)
        self.stats.rounds += 1
        self.stats.rounds_plain += 1
        return [nxt]

    def _round(self, k: int) -> list[int]:
        e, c, s = self.engine, self.config, self.stats
        t0 = time.perf_counter()
        # 1. draft up to k tokens (and the draft distribution p they came from, when sampling); a drafter may
        #    propose fewer (prompt lookup stops where its match ends), and none makes this round a plain step
        draft, p = self.drafter.propose(self.tokens, k)                            # (m,), (m, V) | None
        k = len(draft)
        t1 = time.perf_counter()
        # 2. verify all k in ONE target pass over [last token] + draft, and
        # 3. accept: the longest prefix matching the target's argmax (computed in the graph: k+1 ids come back, not
        #    k+1 rows of logits), or rejection sampling against q (needs the rows: the residual max(0, q - p))
        ids = np.concatenate(([self.tokens[-1]], draft))
        if c.temperature == 0:
            n, nxt = verify_greedy(draft, e.target.forward(ids, want="argmax"))  # (k+1,) ids
        else:
            q = distribution(e.target.forward(ids), c.temperature, c.top_k, c.top_p)  # (k+1, V)
            n, nxt = verify_sampled(draft, *_same_width(p, q), self.rng)
        # 4. rewind both caches to the accepted length: an integer each, no copies
        e.target.rewind(e.target.pos - (k - n))
        self.drafter.accepted(n)
        t2 = time.perf_counter()
        s.draft_ms += 1e3 * (t1 - t0)
        s.target_ms += 1e3 * (t2 - t1)
        s.rounds, s.drafted, s.accepted = s.rounds + 1, s.drafted + k, s.accepted + n
        s.tested += n + (n < k)
        if k:
            s.accept_hist[n] += 1
        else:  # nothing proposed: the verify pass was a plain step
            s.rounds_plain += 1
        if n < k:
            s.reject_round_pos[n] += 1
            s.reject_token_pos.append(len(self.response) + n)
        return [*draft[:n].tolist(), nxt]

    def _commit(self, new: list[int]) -> None:
        """Append a round's tokens one by one, applying the stop conditions in order."""
        e, c = self.engine, self.config
        for t in new:
            if t in e.eos:
                self._finish("eos")
                break
            self.tokens.append(t)
            self.pending.append(t)
            self._text(self.stream.push(t))
            if not self.stats.ttft_ms:
                self.stats.ttft_ms = 1e3 * (time.perf_counter() - self.t0)
            if self.stream.stopped:
                self._finish("stop")
            elif len(self.response) >= c.max_new_tokens:
                self._finish("length")
            elif len(self.tokens) >= e.max_length:
                self._finish("context_full")
            if self.finish_reason:
                break

    def _text(self, delta: str) -> None:
        if delta:
            self.texts.append(delta)

    def _finish(self, reason: str) -> None:
        e, s = self.engine, self.stats
        self.finish_reason = reason
        self._text(self.stream.flush())
        s.new_tokens = len(self.response)
        s.decode_ms = 1e3 * (time.perf_counter() - self.t_prefill)
        s.ort_ms = 1e3 * (e.target.run_s + e.draft.run_s - self._ort0)


def _same_width(p: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pad the narrower distribution with zeros: padded vocabularies (extra embedding rows) may differ in width."""
    if p.shape[-1] == q.shape[-1]:
        return p, q
    w = max(p.shape[-1], q.shape[-1])
    pad = lambda a: np.pad(a, ((0, 0), (0, w - a.shape[-1])))  # noqa: E731
    return pad(p), pad(q)
