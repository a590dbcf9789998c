"""A shared Engine: generations are serialised, never interleaved; misuse is refused with a clear error."""
from __future__ import annotations

import gc
import threading

import pytest

from specedge.runtime import Engine, EngineBusy

PROMPTS = ["def add(a, b):\n    return", "import os\n", "class A:\n    def f(self):\n", "x = [", "d", "for i in"]


@pytest.fixture(scope="module")
def engine(bundles):
    return Engine(bundles("llama"))


def test_two_threads_get_the_answers_of_one(engine):
    """Interleaved requests from two threads (two token-by-token consumers) give exactly the sequential outputs."""
    expected = {p: engine.generate(p, max_new_tokens=24, k=3).token_ids for p in PROMPTS}
    got, errors = {}, []

    def worker(prompts):
        try:
            for p in prompts:
                g = engine.generator(p, max_new_tokens=24, k=3)
                got[p] = list(g)          # one token at a time: the other thread is waiting, not interleaving
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(PROMPTS[i::2],)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and got == expected


def test_second_live_generator_in_one_thread_is_refused(engine):
    g = engine.generator("def f(x):", max_new_tokens=8)
    next(iter(g))
    with pytest.raises(EngineBusy, match="finish, cancel or close it first"):
        engine.generator("import os", max_new_tokens=8)
    g.close()
    assert g.finish_reason == "cancelled" and list(g) == []   # closed: nothing more, the caches are not its own
    assert engine.generate("import os", max_new_tokens=8).finish_reason in ("length", "eos")


def test_waiting_thread_times_out_with_a_clear_error(engine):
    g = engine.generator("def f(x):", max_new_tokens=8)
    out = []
    t = threading.Thread(target=lambda: out.append(_try(lambda: engine.generator("x", max_new_tokens=4, timeout=0.2))))
    t.start()
    t.join(timeout=30)
    assert isinstance(out[0], EngineBusy) and "busy" in str(out[0])
    g.close()


def test_waiting_thread_proceeds_when_the_owner_finishes(engine):
    g = engine.generator("def f(x):", max_new_tokens=6)
    done = threading.Event()
    result = []
    t = threading.Thread(target=lambda: (result.append(engine.generate("import os", max_new_tokens=6)), done.set()))
    t.start()
    assert not done.wait(0.3)            # it waits while g is live
    g.result()                           # finishing releases the Engine
    t.join(timeout=60)
    assert done.is_set() and result[0].finish_reason in ("length", "eos")


def test_cancel_from_another_thread_frees_an_idle_generator(engine):
    g = engine.generator("def f(x):", max_new_tokens=50)
    next(iter(g))
    threading.Thread(target=g.cancel).start()
    r = engine.generate("def f(x):", max_new_tokens=6, timeout=10)   # would time out if the cancel did not free it
    assert g.finish_reason == "cancelled" and r.finish_reason in ("length", "eos")


def test_abandoned_generator_frees_the_engine(engine):
    g = engine.generator("def f(x):", max_new_tokens=50)
    next(iter(g))
    del g
    gc.collect()
    assert engine.generate("import os", max_new_tokens=4, timeout=5).token_ids


def _try(fn):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001
        return e
