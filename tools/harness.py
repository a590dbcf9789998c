"""The benchmark's streaming harness, one for every runtime: `Clock` stamps tokens as the caller receives them,
`PeerRun` holds what one request measured, `post_sse` is the HTTP client half (stdlib only)."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field


@dataclass
class PeerRun:
    token_ids: list[int]          # generated tokens only (no prompt), stopping at EOS (excluded) or max_new_tokens
    ttft_ms: float                # request start to the first generated token
    token_ms: list[float] = field(default_factory=list)  # gaps between consecutive arrivals as observed (n - 1)
    drafted: int | None = None    # from the peer's own speculative counters, where it has them
    accepted: int | None = None
    wall_ms: float = 0.0          # request start to the end of the response: end-to-end tokens/s = n / wall
    new_tokens: int | None = None  # set where a stream counts its tokens but does not send their ids
    text: str | None = None       # the response text, where the peer hands it back
    timings: dict | None = None   # the peer's own timings (llama-server's `timings`), for the report

    @property
    def n(self) -> int:
        return len(self.token_ids) if self.new_tokens is None else self.new_tokens

    @property
    def tokens_per_s_after_first(self) -> float:
        """(n - 1) / (t_last - t_first): the decode rate after the first token, as the caller saw the tokens."""
        span = sum(self.token_ms)
        return 1e3 * (self.n - 1) / span if span > 0 else 0.0

    @property
    def tokens_per_s_end_to_end(self) -> float:
        """n / wall time of the request: prompt reading and decoding together."""
        return 1e3 * self.n / self.wall_ms if self.wall_ms > 0 else 0.0


class Clock:
    """The streaming harness's timing, the same for every runtime: stamps tokens as the caller receives them (tokens
    that arrive together get gaps of 0), from the moment the request starts to the end of its response."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.t_end: float | None = None
        self.stamps: list[float] = []

    def tick(self, n: int = 1) -> None:
        self.stamps += [time.perf_counter()] * n

    def done(self) -> None:
        """The response has ended (its last byte, or generate returning): the end of the wall time."""
        self.t_end = time.perf_counter()

    def run(self, token_ids: list[int], new_tokens: int | None = None, **extra) -> PeerRun:
        """token_ids as stamped; or, for a stream that sends text in chunks without ids, one tick per chunk and the
        count it reports at the end as new_tokens (the gaps are then between chunks: their sum is still t_last -
        t_first, all the decode rate needs)."""
        end = self.t_end if self.t_end is not None else time.perf_counter()
        wall = 1e3 * (end - self.t0)
        s = self.stamps if new_tokens is not None else self.stamps[:len(token_ids)]
        if not s:
            return PeerRun(token_ids, 0.0, [], wall_ms=wall, new_tokens=new_tokens, **extra)
        return PeerRun(token_ids, 1e3 * (s[0] - self.t0), [1e3 * (b - a) for a, b in zip(s, s[1:])], wall_ms=wall,
                       new_tokens=new_tokens, **extra)


def post_sse(url: str, body: dict, timeout_s: float = 600.0, headers: dict | None = None):
    """POST `body` as JSON and yield (arrival time, event) for each `data:` event of the server-sent-events answer,
    until `[DONE]` or the end of the response. The client half of the harness: stdlib only, one connection per
    request (no pooling to hide a server's connection costs)."""
    import http.client
    import urllib.parse

    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout_s)
    try:
        conn.request("POST", u.path, json.dumps(body), {"Content-Type": "application/json",
                                                        "Accept": "text/event-stream", **(headers or {})})
        r = conn.getresponse()
        if r.status != 200:
            raise RuntimeError(f"POST {url} answered {r.status}: {r.read()[:500].decode(errors='replace')}")
        while True:
            line = r.readline()   # chunked transfer: returns as soon as a line has arrived
            if not line:
                return
            t = time.perf_counter()
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                return
            yield t, json.loads(data)
    finally:
        conn.close()
