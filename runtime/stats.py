"""What one generation measured: alpha, tau, k per round, the acceptance histogram, latencies."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class Stats:
    """Per request, filled at one place per phase (prefill, round, finish). alpha is the per-token acceptance
    probability of the theory (accepted / tested, where a round tests tokens up to its first rejection; None when
    nothing was drafted); mean_accepted_length is tau, tokens committed per target pass."""
    k: int = 0                        # the largest k a round may use
    prompt_tokens: int = 0
    new_tokens: int = 0
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    tested: int = 0
    rounds_plain: int = 0             # of `rounds` (target passes): the ones without a draft (k = 0)
    accept_hist: list[int] = field(default_factory=list)     # [n] drafting rounds that accepted n drafts, n = 0..k
    reject_round_pos: list[int] = field(default_factory=list)  # [i] rejections at draft position i in a round
    reject_token_pos: list[int] = field(default_factory=list)  # index in the response of each rejected draft
    k_hist: list[int] = field(default_factory=list)          # [k] rounds that drafted k tokens, k = 0..k
    prefill_ms: float = 0.0
    draft_ms: float = 0.0
    draft_read_ms: float = 0.0        # of draft_ms: the draft model reading context it had not seen (the prompt, the
                                      # tokens of rounds it sat out, a moved window)
    target_ms: float = 0.0
    ort_ms: float = 0.0               # of draft_ms + target_ms + prefill_ms: inside onnxruntime
    ttft_ms: float = 0.0
    decode_ms: float = 0.0            # after the prefill until the last token
    token_ms: list[float] = field(default_factory=list)      # time between consecutive tokens as they arrive: a
                                                             # round's tokens arrive together (0 after its first)
    itl_ms: list[float] = field(default_factory=list)        # inter-token latency a streaming client sees: each
                                                             # round's time since the last spread over its tokens

    def __post_init__(self):
        for name in ("accept_hist", "k_hist"):
            if not getattr(self, name):
                setattr(self, name, [0] * (self.k + 1))
        if not self.reject_round_pos:
            self.reject_round_pos = [0] * self.k

    # -- the phases -------------------------------------------------------------------------------------------------
    def prefill(self, prompt_tokens: int, seconds: float) -> None:
        self.prompt_tokens, self.prefill_ms = prompt_tokens, 1e3 * seconds

    def round(self, k: int, n: int, committed: int, draft_s: float, read_s: float, verify_s: float, gap_s: float,
              since_start_s: float) -> None:
        """One target pass that tested k drafts and accepted n; `committed` tokens joined the response (fewer than
        n + 1 at a stop condition); gap_s since the last round ended, since_start_s since the request began."""
        before = len(self.itl_ms)   # tokens committed before this round: each has its entry
        self.rounds += 1
        self.k_hist[k] += 1
        self.draft_ms += 1e3 * draft_s
        self.draft_read_ms += 1e3 * read_s
        self.target_ms += 1e3 * verify_s
        if committed:
            self.ttft_ms = self.ttft_ms or 1e3 * since_start_s
            self.token_ms += [1e3 * gap_s] + [0.0] * (committed - 1)
            self.itl_ms += [1e3 * gap_s / committed] * committed
        if k == 0:
            self.rounds_plain += 1
            return
        self.drafted, self.accepted = self.drafted + k, self.accepted + n
        self.tested += n + (n < k)
        self.accept_hist[n] += 1
        if n < k:
            self.reject_round_pos[n] += 1
            self.reject_token_pos.append(before + n)

    def finish(self, new_tokens: int, decode_s: float, ort_s: float) -> None:
        self.new_tokens, self.decode_ms, self.ort_ms = new_tokens, 1e3 * decode_s, 1e3 * ort_s

    # -- what is derived --------------------------------------------------------------------------------------------
    @property
    def alpha(self) -> float | None:
        return self.accepted / self.tested if self.tested else None

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        return self.new_tokens / self.rounds if self.rounds else 0.0

    @property
    def tokens_per_s(self) -> float:
        return 1e3 * self.new_tokens / self.decode_ms if self.decode_ms else 0.0

    @property
    def tokens_per_s_after_first(self) -> float:
        """(new_tokens - 1) / (first token to last): the decode rate a caller timing tokens sees, measurable the
        same way for any runtime (the bench compares peers by it); time to first token is reported beside it."""
        t = sum(self.token_ms[1 : self.new_tokens])
        return 1e3 * (self.new_tokens - 1) / t if t > 0 else 0.0

    def itl_percentile(self, q: float) -> float:
        """A percentile of the inter-token latency, after the first token (whose wait is ttft_ms)."""
        return float(np.percentile(self.itl_ms[1:], q)) if len(self.itl_ms) > 1 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("token_ms")
        d.pop("itl_ms")
        d.update(alpha=self.alpha, acceptance_rate=self.acceptance_rate,
                 mean_accepted_length=self.mean_accepted_length, tokens_per_s=self.tokens_per_s,
                 itl_p50_ms=self.itl_percentile(50), itl_p90_ms=self.itl_percentile(90),
                 itl_p99_ms=self.itl_percentile(99))
        return d


def expected_tau(alpha: float, k: int) -> float:
    """Expected tokens per target pass with k drafts: (1 - alpha^(k+1)) / (1 - alpha)."""
    return k + 1.0 if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)


def predicted_speedup(alpha: float, k: int, c: float, t: dict[int, float] | None = None) -> float:
    """tau / (t(k+1)/t(1) + k c): the speedup over plain decoding the theory predicts. t(n) is the target's step
    time for n tokens (any unit); beyond the measured sizes it grows linearly with the measured slope; without it,
    t(n) = t(1) (memory-bound)."""
    t = t or {}
    t1 = t.get(1, 1.0)
    if k + 1 in t:
        tk = t[k + 1]
    elif len(t) >= 2:
        n_max = max(t)
        tk = t[n_max] + (t[n_max] - t1) / max(n_max - 1, 1) * (k + 1 - n_max)
    else:
        tk = t1
    return expected_tau(alpha, k) * t1 / (k * c * t1 + tk)
