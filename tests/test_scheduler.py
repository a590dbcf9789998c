"""The server's scheduler without HTTP: a real Engine on the tiny pair, Jobs submitted from an asyncio loop as the
HTTP layer submits them. The queue is bounded, latest-wins cancels the same user's (or, globally, anyone's) older
request whether it is running or waiting, a cancelled waiting job frees its place, and closing cancels everything."""
from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("starlette")

from specedge.runtime import Engine, GenerationConfig  # noqa: E402
from specedge.tools.serve.scheduler import Job, QueueFull, Scheduler, ShuttingDown  # noqa: E402

LONG = 120   # tokens: the tiny bundle's context is 128
# A long job has to outlast the test's next step (a cancel, a close, another submit) by a wide margin: every round
# drafts 8 tokens that the random-weight draft gets wrong (the adaptive policy would rightly stop drafting and finish
# 120 tokens in tens of milliseconds, racing the test).
SLOW = dict(speculative=True, drafter="model", adaptive=False, k=8)


@pytest.fixture(scope="module")
def engine(bundles) -> Engine:
    return Engine(bundles("llama"))


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))   # bounded: a hung job fails the test


async def collect(job: Job) -> tuple[str, object]:
    """The job's streamed text and its end event."""
    text = []
    async for kind, value in job.outcome():
        if kind == "delta":
            text.append(value)
        else:
            return "".join(text), (kind, value)


async def started(job: Job) -> None:
    while job.gen is None:   # the worker has started its generation
        await asyncio.sleep(0.001)


def cancelled(end: tuple[str, object]) -> bool:
    """Ended by a cancel: before the generator ran (None) or during the generation."""
    return end[0] == "done" and (end[1] is None or end[1].finish_reason == "cancelled")


def ids(engine: Engine, text: str = "def f(x):\n    return") -> list[int]:
    return engine.encode(text)


def test_a_job_streams_what_the_engine_generates(engine):
    want = engine.generate(ids(engine), max_new_tokens=12)

    async def go():
        s = Scheduler(engine, 4, False)
        try:
            job = Job(ids(engine), GenerationConfig(max_new_tokens=12), None, True)
            s.submit(job)
            out = await collect(job)
            for _ in range(2000):   # the worker records the job just after handing out its end
                if s.state()["recent"]:
                    break
                await asyncio.sleep(0.001)
            return out, s.state()
        finally:
            s.close()

    (text, (kind, result)), state = run(go())
    assert kind == "done" and result.token_ids == want.token_ids and text == want.text
    assert state["recent"][-1]["completion_tokens"] == len(want.token_ids) and not state["busy"]


def test_the_queue_is_bounded_and_a_cancelled_waiting_job_frees_its_place(engine):
    async def go():
        s = Scheduler(engine, 2, False)
        try:
            jobs = [Job(ids(engine), GenerationConfig(max_new_tokens=LONG, **SLOW), f"u{i}", False) for i in range(3)]
            s.submit(jobs[0])
            await started(jobs[0])
            s.submit(jobs[1]), s.submit(jobs[2])    # two waiting: the queue is full
            with pytest.raises(QueueFull, match="2 requests are waiting"):
                s.submit(Job(ids(engine), GenerationConfig(max_new_tokens=1), "u9", False))
            s.cancel(jobs[1])                        # leaves the queue at once
            assert (await collect(jobs[1]))[1] == ("done", None)
            late = Job(ids(engine), GenerationConfig(max_new_tokens=2), "u9", False)
            s.submit(late)                           # its place is free again
            for j in (jobs[0], jobs[2]):
                s.cancel(j)
            return [await collect(j) for j in (jobs[0], jobs[2], late)], s.state()
        finally:
            s.close()

    (first, third, late), state = run(go())
    assert cancelled(first[1]) and len(first[1][1].token_ids) < LONG
    assert third[1] == ("done", None)            # cancelled while waiting: never ran
    assert late[1][1].finish_reason in ("length", "eos")
    assert state["finished"]["cancelled"] == 3 and state["waiting"] == 0


@pytest.mark.parametrize("latest_wins", [False, True])
def test_latest_wins_cancels_the_older_request(engine, latest_wins):
    """Per user by default: alice's new request cancels her running and her waiting one, never bob's; with
    latest_wins, any new request cancels every older one."""
    async def go():
        s = Scheduler(engine, 4, latest_wins)
        try:
            cfg = GenerationConfig(max_new_tokens=LONG, **SLOW)
            running, waiting, bob = (Job(ids(engine), cfg, u, True) for u in ("alice", "alice", "bob"))
            s.submit(running)
            await started(running)
            s.submit(bob) if not latest_wins else None
            s.submit(waiting) if not latest_wins else None
            new = Job(ids(engine), GenerationConfig(max_new_tokens=4), "alice", False)
            s.submit(new)
            return [await collect(j) for j in ((running, waiting, bob) if not latest_wins else (running,))] + \
                [await collect(new)]
        finally:
            s.close()

    outs = run(go())
    assert cancelled(outs[0][1]) and len(outs[0][1][1].token_ids) < LONG
    assert outs[-1][1][1].token_ids == engine.generate(ids(engine), max_new_tokens=4).token_ids
    if not latest_wins:
        assert outs[1][1] == ("done", None)                            # alice's waiting one: cancelled unstarted
        assert outs[2][1][1].finish_reason in ("length", "eos", "context_full")   # bob's ran to its end


def test_close_cancels_everything_and_refuses_new_jobs(engine):
    async def go():
        s = Scheduler(engine, 4, False)
        running, waiting = (Job(ids(engine), GenerationConfig(max_new_tokens=LONG, **SLOW), None, False) for _ in range(2))
        s.submit(running), s.submit(waiting)
        await started(running)
        s.close()
        with pytest.raises(ShuttingDown):
            s.submit(Job(ids(engine), GenerationConfig(max_new_tokens=1), None, False))
        return await collect(running), await collect(waiting), s.thread.is_alive()

    running, waiting, alive = run(go())
    assert cancelled(running[1]) and waiting[1] == ("done", None) and not alive


def test_an_engine_refusal_is_the_jobs_error_and_the_worker_serves_on(engine):
    async def go():
        s = Scheduler(engine, 4, False)
        try:
            bad = Job([10 ** 9], GenerationConfig(max_new_tokens=2), None, False)   # not a token id
            s.submit(bad)
            good = Job(ids(engine), GenerationConfig(max_new_tokens=2), None, False)
            s.submit(good)
            return await collect(bad), await collect(good)
        finally:
            s.close()

    bad, good = run(go())
    assert bad[1][0] == "error" and "token" in str(bad[1][1])
    assert good[1][1].token_ids == engine.generate(ids(engine), max_new_tokens=2).token_ids
