"""The queue in front of the Engine: one worker thread owns it and runs one generation at a time (the Engine is one
set of KV buffers); requests wait in a bounded queue; a newer request from the same user (or any request, with
latest_wins) cancels the older one, running or waiting. Nothing here knows about HTTP: it is driven by Jobs, and the
HTTP layer turns QueueFull and ShuttingDown into 429 and 503."""
from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections import Counter, deque
from typing import Any, AsyncIterator

from ...runtime import Engine, GenerationConfig, Result, SpecError


class QueueFull(Exception):
    """Every place in the queue is taken: retry later."""

    def __init__(self, waiting: int):
        super().__init__(f"the server is busy: {waiting} requests are waiting for the one running; retry later")


class ShuttingDown(Exception):
    """The scheduler is closed and takes no more jobs."""

    def __init__(self):
        super().__init__("the server is shutting down")


class Job:
    """One request as the worker sees it: prompt ids, a config, and a channel of events back to the event loop:
    ("delta", text) ..., then ("done", Result | None) or ("error", exception). None: cancelled while waiting.
    Made on the event loop that will read its outcome. `user` has been checked as text by whoever made the job: it is
    kept for latest-wins and shown by /health."""

    def __init__(self, ids: list[int], config: GenerationConfig, user: str | None, stream: bool):
        self.id, self.ids, self.config, self.user, self.stream = uuid.uuid4().hex[:24], ids, config, user, stream
        self.loop = asyncio.get_running_loop()
        # Events from the worker wait in `inbox`; the event loop is woken once per batch, not once per token: the
        # tokens of one round arrive within microseconds, so a stream sends one event per round.
        self.inbox: list[tuple[str, Any]] = []
        self.inbox_lock = threading.Lock()
        self.wake_scheduled = False
        self.ready = asyncio.Event()
        self.lock = threading.Lock()   # orders cancel() against the worker creating the generator
        self.cancelled, self.gen = False, None
        self.t_submit, self.t_start = time.perf_counter(), None
        self.result: Result | None = None

    @property
    def queue_ms(self) -> float:
        return 1e3 * ((self.t_start or time.perf_counter()) - self.t_submit)

    def put(self, kind: str, value: Any) -> None:
        """Called from the worker thread."""
        with self.inbox_lock:
            self.inbox.append((kind, value))
            if self.wake_scheduled:
                return
            self.wake_scheduled = True
        with contextlib.suppress(RuntimeError):   # the event loop is gone: the server is shutting down
            self.loop.call_soon_threadsafe(self.ready.set)

    def cancel(self) -> None:
        with self.lock:
            self.cancelled = True
            if self.gen is not None:
                self.gen.cancel()    # seen by the generator at its next round

    def run(self, engine: Engine) -> Result | None:
        self.t_start = time.perf_counter()
        with self.lock:
            if self.cancelled:
                self.put("done", None)
                return None
            try:
                self.gen = engine.generator(self.ids, self.config)
            except SpecError as e:
                self.put("error", e)
                return None
        try:
            if self.stream:
                for delta in self.gen.text_deltas():
                    self.put("delta", delta)
            result = self.gen.result()
        except Exception as e:  # noqa: BLE001 - a SpecError is the request's fault (400), anything else ours (500)
            self.put("error", e)
            return None
        finally:
            close = getattr(self.gen, "close", None)   # releases the engine even when the generation failed
            if close is not None:
                close()
        self.result = result
        self.put("done", result)
        return result

    async def outcome(self) -> AsyncIterator[tuple[str, Any]]:
        """The job's events, on the event loop: ("delta", the text that arrived since the last one) ..., then the end."""
        while True:
            await self.ready.wait()
            self.ready.clear()
            with self.inbox_lock:
                items, self.inbox, self.wake_scheduled = self.inbox, [], False
            text = "".join(v for k, v in items if k == "delta")
            if text:
                yield "delta", text
            end = next((it for it in items if it[0] != "delta"), None)
            if end is not None:
                yield end
                return


class Scheduler:
    """A bounded queue in front of one worker thread. The only place requests are ordered and cancelled."""

    def __init__(self, engine: Engine, queue_size: int, latest_wins: bool):
        self.engine, self.queue_size, self.latest_wins = engine, queue_size, latest_wins
        self.cv = threading.Condition()
        self.waiting: deque[Job] = deque()
        self.running: Job | None = None
        self.stopping = False
        self.counts: Counter = Counter()
        self.recent: deque[dict] = deque(maxlen=16)   # the last requests, for /health
        self.thread = threading.Thread(target=self._work, name="specedge-engine", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        """Queue `job`, first cancelling the requests it supersedes; QueueFull when every place is taken (the
        superseded ones are cancelled even then: their places are what a retry needs)."""
        with self.cv:
            if self.stopping:
                raise ShuttingDown()
            # Latest wins: the same client's (or with latest_wins, anyone's) older request is stale: cancel it.
            for old in [j for j in (self.running, *self.waiting) if j is not None and not j.cancelled]:
                if self.latest_wins or (job.user is not None and old.user == job.user):
                    self._cancel(old)
            if len(self.waiting) >= self.queue_size:
                raise QueueFull(len(self.waiting))
            self.waiting.append(job)
            self.cv.notify()

    def cancel(self, job: Job) -> None:
        with self.cv:
            self._cancel(job)

    def _cancel(self, job: Job) -> None:
        if job in self.waiting:        # never started: leave the queue now, freeing its place
            self.waiting.remove(job)
            job.cancelled = True
            job.put("done", None)
            self._record(job, None)
        else:
            job.cancel()

    def _work(self) -> None:
        while True:
            with self.cv:
                while not self.waiting and not self.stopping:
                    self.cv.wait()
                if self.stopping:
                    return
                job = self.running = self.waiting.popleft()
            result = job.run(self.engine)
            with self.cv:
                self.running = None
                self._record(job, result)

    def _record(self, job: Job, result: Result | None) -> None:
        reason = result.finish_reason if result else ("cancelled" if job.cancelled else "error")
        self.counts[reason] += 1
        self.recent.append({"id": job.id, "user": job.user, "finish_reason": reason, "prompt_tokens": len(job.ids),
                            "completion_tokens": len(result.token_ids) if result else 0,
                            "max_tokens": job.config.max_new_tokens, "queue_ms": round(job.queue_ms, 2)})

    def state(self) -> dict:
        with self.cv:
            return {"busy": self.running is not None, "waiting": len(self.waiting), "queue_size": self.queue_size,
                    "finished": dict(self.counts), "recent": list(self.recent)}

    def close(self) -> None:
        with self.cv:
            self.stopping = True
            for j in [*self.waiting, *([self.running] if self.running else [])]:
                self._cancel(j)
            self.cv.notify_all()
        self.thread.join(timeout=10)
