"""Adaptive k: pick each round the number of draft tokens that maximises expected tokens per unit of time.

With a_i the probability that draft position i is accepted given that positions 1..i-1 were, a round that drafts k
tokens commits E(k) = 1 + sum_{i=1..k} prod_{j<=i} a_j tokens (the accepted run plus the target's own token) and
costs t(k+1)/t(1) + k*c target steps (one verify pass over k+1 tokens and k draft steps at c target steps each). k = 0
is a plain step (E = 1, cost 1), so a drafter that stops paying stops drafting; it is probed again every
`probe_every` rounds so that it can start paying again.

A draft model that has context to read first (the prompt, rounds it sat out) pays that catch-up once, before the
round: it drafts only when the tokens the request has left, drafted at the best k instead of decoded plainly, save
more target steps than the catch-up costs (a probe: when it costs at most `probe_budget` of what is left, or while the
drafter has too few timings to be judged). Reading
costs what the draft's reads took per token, or, until the draft has read, what the target's prompt read took scaled by
`read_ratio` (the Engine gives the draft's parameters over the target's: a read's work is its weights per token).

Pure Python, deterministic: the same observations give the same choices.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from statistics import median

from .errors import InvalidArgument


MIN_TIMINGS = 3   # draft-step timings below which a drafter is probed whatever its catch-up costs


@dataclass
class _Acceptance:
    """Decayed Beta-style counts of acceptance per draft position (index 0 = position 1)."""
    hits: list[float]
    trials: list[float]


@dataclass
class KPolicy:
    """Running estimates for one request (or one engine: they carry over if the caller keeps the object).

    k_max: the largest k considered. decay: weight of the past per observed round of a drafter (0.95 forgets in
    about 20 rounds). prior_alpha / prior_weight: what a position is assumed to accept before it has data, pulled
    towards the drafter's overall rate once there is some. verify_slope: t(n)/t(1) = 1 + slope*(n-1) until verify
    passes have been timed (with one width timed, it extrapolates from that one; with more, a line through them). draft_cost: c per drafter until its draft steps have been timed (lookup: 0).
    """
    k_max: int
    decay: float = 0.95
    probe_every: int = 16
    probe_k: int = 2
    probe_budget: float = 0.05         # a probe's catch-up may cost at most this share of the plain steps left
    read_ratio: float = 1.0            # a draft's read per token / the target's, until the draft has been timed
    prior_alpha: float = 0.6
    prior_weight: float = 2.0
    verify_slope: float = 0.05
    draft_cost: dict[str, float] = field(default_factory=lambda: {"model": 0.05, "lookup": 0.0})
    timing_window: int = 16            # timings kept per verify width and per drafter; their median is the estimate
    _acc: dict[str, _Acceptance] = field(default_factory=dict, init=False, repr=False)
    _verify_s: deque = field(default_factory=deque, init=False, repr=False)  # (width n, seconds), the latest
    _step_s: dict[str, deque] = field(default_factory=dict, init=False, repr=False)     # drafter -> s per draft
    _idle: dict[str, int] = field(default_factory=dict, init=False, repr=False)         # rounds since drafting
    _read_s: dict[str, deque] = field(default_factory=dict, init=False, repr=False)     # reader -> (tokens, s)
    _line: tuple[float, float, float] | None = field(default=None, init=False, repr=False)  # fit of _verify_s

    def __post_init__(self):
        if self.k_max < 0 or not 0 < self.decay <= 1 or self.probe_every < 1:
            raise InvalidArgument(f"KPolicy needs k_max >= 0, 0 < decay <= 1, probe_every >= 1; got "
                                  f"k_max={self.k_max}, decay={self.decay}, probe_every={self.probe_every}")

    # -- what the loop calls -----------------------------------------------------------------------------------
    def choose(self, drafter: str, limit: int, unread: int = 0, left: int = 0) -> int:
        """The k in 0..min(limit, k_max) with the most expected tokens per unit time; a probe when 0 has won for
        `probe_every` rounds in a row. unread: tokens the drafter reads before drafting; left: tokens the request
        may still produce (both only matter together: 0 when nothing is to be read)."""
        top = max(0, min(limit, self.k_max))
        rates = self.rates(drafter, top)
        k = rates.index(max(rates))   # ties: the smaller k
        read = unread * self.read_cost()                        # target steps, paid before the round
        if k and read > left * (1 / rates[0] - 1 / rates[k]):   # target steps saved over what is left, at rate k
            return 0
        if k == 0 and top > 0:
            idle = self._idle.get(drafter, 0) + 1
            self._idle[drafter] = idle
            # a probe pays its catch-up only within budget, unless too few draft steps were timed to trust the
            # estimate that stopped it (one was the first call of a step size, which also builds its binding)
            timed = len(self._step_s.get(drafter, ()))
            if idle >= self.probe_every and (read <= self.probe_budget * left or timed < MIN_TIMINGS):
                self._idle[drafter] = 0
                return min(self.probe_k, top)
        return k

    def observe_read(self, reader: str, tokens: int, seconds: float) -> None:
        """A read of `tokens` tokens of context in one pass: by the "draft" (a catch-up) or the "target" (a prompt)."""
        if tokens > 0 and seconds > 0:
            self._record(self._read_s, reader, (tokens, seconds))

    def observe(self, drafter: str, k: int, n_accepted: int, draft_s: float, verify_s: float) -> None:
        """One round: k tokens drafted (0 for a plain step), n_accepted of them kept, the seconds spent drafting
        (draft steps only: a catch-up on unread context is a cost already paid, see `rates`) and verifying (a pass
        over k + 1 tokens)."""
        assert 0 <= n_accepted <= k, (n_accepted, k)
        # One window for all widths: a width the policy stopped picking ages out instead of staying frozen at
        # whatever the machine was doing when it was last timed.
        self._verify_s.append((k + 1, verify_s))
        while len(self._verify_s) > 2 * self.timing_window:
            self._verify_s.popleft()
        self._line = None
        if k == 0:
            return
        self._idle[drafter] = 0
        self._record(self._step_s, drafter, draft_s / k)
        a = self._acc.setdefault(drafter, _Acceptance([], []))
        grow = max(0, k - len(a.hits))
        a.hits += [0.0] * grow
        a.trials += [0.0] * grow
        for i in range(len(a.hits)):
            a.hits[i] *= self.decay
            a.trials[i] *= self.decay
        # positions 1..n were accepted, position n+1 was tested and rejected, the rest were never tested
        for i in range(min(n_accepted + 1, k)):
            a.trials[i] += 1
            a.hits[i] += i < n_accepted

    # -- the model -----------------------------------------------------------------------------------------------
    def acceptance(self, drafter: str, k: int) -> list[float]:
        """a_1..a_k: per position, the decayed hit rate shrunk towards the drafter's overall rate."""
        a = self._acc.get(drafter)
        if a is None:
            return [self.prior_alpha] * k
        overall = (sum(a.hits) + self.prior_weight * self.prior_alpha) / (sum(a.trials) + self.prior_weight)
        w = self.prior_weight
        return [(a.hits[i] + w * overall) / (a.trials[i] + w) if i < len(a.hits) else overall for i in range(k)]

    def expected_tokens(self, drafter: str, top: int) -> list[float]:
        """E(k) for k = 0..top: 1 + sum_{i=1..k} prod_{j<=i} a_j (E(0) = 1: a plain step commits one token)."""
        out, run = [1.0], 1.0
        for a in self.acceptance(drafter, top):
            run *= a
            out.append(out[-1] + run)
        return out

    def verify_cost(self, n: int) -> float:
        """t(n)/t(1): from the timed widths (a plain step is width 1), the prior slope until there are any."""
        return self._t(n) / self._t(1) if self._verify_s else 1.0 + self.verify_slope * (n - 1)

    def draft_step_cost(self, drafter: str) -> float:
        """c: one draft step in target steps (one target step = a verify pass over one token)."""
        if drafter in self._step_s and self._verify_s:
            return median(self._step_s[drafter]) / self._t(1)
        return self.draft_cost.get(drafter, 0.05)

    def read_cost(self) -> float:
        """Target steps per token of catch-up: the draft's reads once timed, the target's times read_ratio until then,
        0 before both."""
        who = next((r for r in ("draft", "target") if r in self._read_s), None)
        if who is None or not self._verify_s:
            return 0.0
        # Seconds over tokens of the recent reads: the cost per token of the long reads that matter (a median per
        # read would be set by the many 3-token catch-ups, whose fixed overhead made a prompt look 10x dearer).
        tokens, seconds = map(sum, zip(*self._read_s[who]))
        return seconds / tokens * (self.read_ratio if who == "target" else 1.0) / self._t(1)

    def _t(self, n: int) -> float:
        """Seconds for a verify pass over n tokens: with one width timed, that time scaled by the prior slope; with
        more, a least-squares line through the median time of each width, weighted by its samples and leaving out
        widths timed once or twice when others have more (the policy rarely picks some, often k = 0), never
        decreasing with n."""
        if self._line is None:
            t: dict[int, list[float]] = {}
            for w, sec in self._verify_s:
                t.setdefault(w, []).append(sec)
            pts = [(w, median(v), len(v)) for w, v in t.items()]
            solid = [p for p in pts if p[2] >= 3]   # a median of 1-2 samples is one preempted round away from junk
            pts = solid if len(solid) >= 2 else pts
            if len(pts) == 1:   # the line through the one timed width with the prior's relative slope
                (w, y, _), = pts
                self._line = w, y, y * self.verify_slope / (1 + self.verify_slope * (w - 1))
            else:
                total = sum(c for _, _, c in pts)
                mw = sum(w * c for w, _, c in pts) / total
                mt = sum(y * c for _, y, c in pts) / total
                var = sum(c * (w - mw) ** 2 for w, _, c in pts)
                slope = max(0.0, sum(c * (w - mw) * (y - mt) for w, y, c in pts) / var)
                self._line = mw, mt, slope
        mw, mt, slope = self._line
        return max(mt + slope * (n - mw), 1e-9)

    def rates(self, drafter: str, top: int) -> list[float]:
        """Expected tokens per target-step time when drafting k, for k = 0..top: E(k) / (t(k+1)/t(1) + k*c). A draft
        model's catch-up (the prompt, rounds it sat out) is not charged: once paid it is sunk, and charging it to the
        rounds after made the policy sit out more rounds, which grew the next catch-up (adaptive model 8-12% slower on
        the demo pair's completion prompts, benchmarks/results/seams/): `choose` weighs it once, before it is paid."""
        c = self.draft_step_cost(drafter)
        return [e / (self.verify_cost(k + 1) + k * c) for k, e in enumerate(self.expected_tokens(drafter, top))]

    def _record(self, timings: dict, key, value) -> None:
        # the last few only (step costs take their median: one round preempted by another process must not move it)
        timings.setdefault(key, deque(maxlen=self.timing_window)).append(value)
