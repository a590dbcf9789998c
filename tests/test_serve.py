"""`spec-export serve` as users meet it: a live server in a subprocess on 127.0.0.1 and a free port, driven by the
official `openai` client (and httpx for raw HTTP). Greedy output through the server must equal Engine.generate.

The load test runs short in CI (40 sequential requests, 10 s of 16 concurrent clients); SPECEDGE_SERVE_FULL=1 runs
the issue's full size (200 sequential, 30 s)."""
from __future__ import annotations

import json
import os
import queue
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("starlette")

from specedge.models import tiny  # noqa: E402
from specedge.runtime import Engine  # noqa: E402

DRAFT_SHAPE = dict(layers=1, hidden=32, heads=2, kv_heads=1, inter=64)   # as conftest.py

KEY = "test-key-123"
FIM = ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")
CHAT = ("{% if messages[0]['role'] == 'robot' %}{{ raise_exception('roles must be system, user or assistant') }}"
        "{% endif %}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LONG = 400            # tokens: a generation long enough to be cancelled in the middle
PROMPTS = ["def f(x):\n    return", "import os\n\n", "class Stack:\n    def push(self, item):", "for i in range(",
           "# parse the arguments\n", "with open(path) as f:", "x = [1, 2,", "if __name__ == '__main__':"]
ROOT = Path(__file__).resolve().parent.parent
SPEC_EXPORT = str(Path(sys.executable).parent / "spec-export")


@pytest.fixture(scope="module")
def fim_bundle(tmp_path_factory) -> Path:
    """A tiny pair whose tokenizer has FIM tokens and a chat template, exported with a 512-token context."""
    from specedge.export.bundle import ExportOptions, export_bundle

    root = tmp_path_factory.mktemp("fim")
    tok = tiny.train_tokenizer(root / "tok", extra_special_tokens=(*FIM, "<|im_start|>", "<|im_end|>"),
                               chat_template=CHAT)
    target = tiny.build_tiny(root / "target", "llama", tok, max_pos=512)
    draft = tiny.build_tiny(root / "draft", "llama", tok, seed=1, max_pos=512, **DRAFT_SHAPE)
    export_bundle(ExportOptions(target=target, draft=draft, out=root / "bundle", max_length=512,
                                target_precision="fp32"))
    return root / "bundle"


@pytest.fixture(scope="module")
def engine(fim_bundle) -> Engine:
    return Engine(fim_bundle)


class Server:
    """`spec-export serve BUNDLE --port 0 ...` in a subprocess; stderr is drained by a thread (kept for failures)."""

    def __init__(self, bundle: Path, *args: str):
        self.proc = subprocess.Popen([SPEC_EXPORT, "serve", str(bundle), "--port", "0", *args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.log: list[str] = []
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._drain, args=(lines,), daemon=True).start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                assert self.proc.poll() is None, f"the server exited: {''.join(self.log)}"
                continue
            if line.startswith("serving "):
                self.url = line.split(" at ")[1].split()[0]       # http://127.0.0.1:PORT/v1
                self.base = self.url.removesuffix("/v1")
                return
        raise AssertionError(f"the server did not start within 120 s: {''.join(self.log)}")

    def _drain(self, lines: queue.Queue) -> None:
        for line in self.proc.stderr:
            self.log.append(line)
            lines.put(line)

    def client(self, key: str | None = None) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url, api_key=key or "none", max_retries=0, timeout=60)

    def http(self, key: str | None = None) -> "httpx.Client":
        return httpx.Client(base_url=self.base, timeout=60,
                            headers={"Authorization": f"Bearer {key}"} if key else {})

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)


@pytest.fixture(scope="module")
def server(fim_bundle):
    """The FIM + chat bundle behind an API key, a small queue and a small body limit."""
    s = Server(fim_bundle, "--api-key", KEY, "--queue-size", "2", "--max-body-bytes", "65536")
    yield s
    s.stop()
    assert "Traceback" not in "".join(s.log), "".join(s.log)


@pytest.fixture(scope="module")
def plain_server(bundles):
    """The conftest bundle: no FIM tokens, no chat template."""
    s = Server(bundles("llama"))
    yield s
    s.stop()
    assert "Traceback" not in "".join(s.log), "".join(s.log)


def fim_ids(engine: Engine, prefix: str, suffix: str) -> list[int]:
    t = engine.tokenizer
    enc = lambda s: t.encode(s, add_special_tokens=False).ids  # noqa: E731
    p, s, m = (t.token_to_id(x) for x in FIM)
    return [engine.manifest.tokenizer.bos_token_id, p, *enc(prefix), s, *enc(suffix), m]


def chat_ids(bundle: Path, messages: list[dict]) -> list[int]:
    """The oracle: transformers' own apply_chat_template on the bundle's tokenizer files."""
    from transformers import AutoTokenizer

    return list(AutoTokenizer.from_pretrained(str(bundle)).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False))


def long_prompt(engine: Engine) -> str:
    """A prompt whose greedy continuation runs LONG tokens without meeting EOS (random weights may stop early)."""
    for p in PROMPTS:
        if engine.generate(p, max_new_tokens=LONG).finish_reason == "length":
            return p
    raise AssertionError("no prompt runs to its length limit on the tiny model")


# -- exactness ----------------------------------------------------------------------------------------------------
def test_completions_equal_the_engine(server, engine):
    c = server.client(KEY)
    for p in PROMPTS[:4]:
        want = engine.generate(p, max_new_tokens=24)
        r = c.completions.create(model="anything", prompt=p, max_tokens=24, temperature=0)
        assert r.choices[0].text == want.text
        assert r.choices[0].finish_reason == {"eos": "stop", "length": "length"}[want.finish_reason]
        assert r.usage.prompt_tokens == len(engine.encode(p)) and r.usage.completion_tokens == len(want.token_ids)
        vendor = r.model_extra["specedge"]
        assert {"alpha", "tau", "tokens_per_s", "ttft_ms", "k"} <= set(vendor)
        chunks = list(c.completions.create(model="x", prompt=p, max_tokens=24, temperature=0, stream=True))
        assert "".join(ch.choices[0].text for ch in chunks) == want.text
        assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
        assert chunks[-1].usage.completion_tokens == len(want.token_ids) and "specedge" in chunks[-1].model_extra
    ids = engine.encode(PROMPTS[0])   # a prompt given as token ids
    r = c.completions.create(model="x", prompt=ids, max_tokens=12, temperature=0)
    assert r.choices[0].text == engine.generate(ids, max_new_tokens=12).text


def test_stream_is_sse_ending_with_done(server):
    with server.http(KEY).stream("POST", "/v1/completions", json={"prompt": "def f(", "max_tokens": 8,
                                                                   "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["usage"]["completion_tokens"] >= 1


def test_sampled_requests_are_reproducible_with_a_seed(server):
    c = server.client(KEY)
    a, b = (c.completions.create(model="x", prompt="import os\n", max_tokens=16, temperature=0.9, top_p=0.9,
                                 seed=7, extra_body={"top_k": 20}).choices[0].text for _ in range(2))
    assert a == b


def test_chat_equals_the_engine_on_the_template(server, engine, fim_bundle):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def add(a, b):"}]
    want = engine.generate(chat_ids(fim_bundle, msgs), max_new_tokens=20)
    c = server.client(KEY)
    r = c.chat.completions.create(model="x", messages=msgs, max_tokens=20, temperature=0)
    assert r.choices[0].message.content == want.text and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(chat_ids(fim_bundle, msgs))
    chunks = list(c.chat.completions.create(model="x", messages=msgs, max_tokens=20, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want.text
    assert chunks[-1].usage.completion_tokens == len(want.token_ids)
    with pytest.raises(openai.BadRequestError, match="roles must be"):   # the template's own raise_exception
        c.chat.completions.create(model="x", messages=[{"role": "robot", "content": "hi"}], max_tokens=4)


def test_stop_strings(server, engine):
    p = PROMPTS[1]
    full = engine.generate(p, max_new_tokens=40).text
    stop = full[len(full) // 2: len(full) // 2 + 2]
    assert stop.strip(), full
    want = engine.generate(p, max_new_tokens=40, stop=(stop,))
    c = server.client(KEY)
    for stops in (stop, [stop, "\x00never"]):
        r = c.completions.create(model="x", prompt=p, max_tokens=40, temperature=0, stop=stops)
        assert r.choices[0].text == want.text == full[: full.index(stop)]
        assert r.choices[0].finish_reason == "stop"
    chunks = list(c.completions.create(model="x", prompt=p, max_tokens=40, temperature=0, stop=stop, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == want.text


def test_fill_in_the_middle(server, engine, fim_bundle):
    from specedge.runtime.manifest import load_manifest

    assert load_manifest(fim_bundle).defaults["fim"] == dict(zip(("prefix", "suffix", "middle"), FIM))
    pre, suf = "def area(r):\n    return ", "\n\nprint(area(2))\n"
    want = engine.generate(fim_ids(engine, pre, suf), max_new_tokens=16)
    r = server.client(KEY).completions.create(model="x", prompt=pre, suffix=suf, max_tokens=16, temperature=0)
    assert r.choices[0].text == want.text
    h = server.http(KEY)
    r = h.post("/infill", json={"input_prefix": pre, "input_suffix": suf, "n_predict": 16})
    assert r.status_code == 200 and r.json()["content"] == want.text and r.json()["stop"] is True
    with h.stream("POST", "/infill", json={"input_prefix": pre, "input_suffix": suf, "n_predict": 16,
                                           "stream": True}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line]
    assert "".join(e["content"] for e in events) == want.text and events[-1]["stop"] is True
    models = server.client(KEY).models.list().data[0].model_extra["specedge"]
    assert models["fim"] is True and models["chat_template"] is True


def test_a_bundle_without_fim_or_chat_template_says_so(plain_server):
    c = plain_server.client()
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="x", prompt="def f(", suffix=")\n", max_tokens=4)
    assert e.value.body["param"] == "suffix" and "fill-in-the-middle" in e.value.body["message"]
    r = plain_server.http().post("/infill", json={"input_prefix": "a", "input_suffix": "b"})
    assert r.status_code == 400 and "fill-in-the-middle" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        c.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}])
    r = c.completions.create(model="x", prompt="def f(", suffix="", max_tokens=4)   # empty suffix: plain completion
    assert r.usage.completion_tokens >= 1


def test_the_plain_chat_template_for_a_base_model(bundles, tmp_path):
    """--chat-template plain: chat on a bundle without a template is the User:/Assistant: dialogue, stopping before
    the user's next turn; a file that holds no template is refused at start-up."""
    from specedge.tools.prompting import PLAIN_STOP

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def add(a, b):"}]
    prompt = "Be brief.\n\nUser: def add(a, b):\nAssistant:"
    engine = Engine(bundles("llama"))
    want = engine.generate(prompt, max_new_tokens=30, stop=PLAIN_STOP)
    s = Server(bundles("llama"), "--chat-template", "plain", "--no-warmup")
    try:
        r = s.client().chat.completions.create(model="x", messages=msgs, max_tokens=30, temperature=0)
        assert r.choices[0].message.content == want.text
        assert r.usage.prompt_tokens == len(engine.encode(prompt))   # BOS as a plain prompt has it
    finally:
        s.stop()
    (tmp_path / "none.json").write_text("{}")
    r = subprocess.run([SPEC_EXPORT, "serve", str(bundles("llama")), "--chat-template", str(tmp_path / "none.json")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "holds no chat template" in r.stderr, r.stderr


# -- cancellation ------------------------------------------------------------------------------------------------
def recent(server, key=None) -> list[dict]:
    return server.http(key).get("/health").json()["recent"]


def wait_idle(server, key=None) -> dict:
    """Poll /health until the engine is free (a hang check, bounded at 30 s)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        h = server.http(key).get("/health").json()
        if not h["busy"] and not h["waiting"]:
            return h
        time.sleep(0.02)
    raise AssertionError("the engine is still busy 30 s later: a cancelled request kept running")


def test_closing_a_stream_cancels_its_generation(server, engine):
    p = long_prompt(engine)
    c = server.client(KEY)
    stream = c.completions.create(model="x", prompt=p, max_tokens=LONG, temperature=0, stream=True)
    for _, _chunk in zip(range(2), stream):
        pass
    stream.close()
    wait_idle(server, KEY)
    last = recent(server, KEY)[-1]
    assert last["finish_reason"] == "cancelled" and last["completion_tokens"] < LONG
    r = c.completions.create(model="x", prompt=PROMPTS[0], max_tokens=8, temperature=0)   # the engine is free
    assert r.choices[0].text == engine.generate(PROMPTS[0], max_new_tokens=8).text


def test_a_disconnected_non_streaming_client_cancels_too(server, engine):
    p = long_prompt(engine)
    t0 = time.perf_counter()
    engine.generate(p, max_new_tokens=LONG)
    gone = (time.perf_counter() - t0) / 5   # the client gives up a fifth of the way into the generation
    with pytest.raises(httpx.ReadTimeout):
        server.http(KEY).post("/v1/completions", json={"prompt": p, "max_tokens": LONG}, timeout=gone)
    wait_idle(server, KEY)
    last = recent(server, KEY)[-1]
    assert last["finish_reason"] == "cancelled" and last["completion_tokens"] < LONG


def _stream_in_thread(client, out: dict, **kw):
    """Stream a completion on a thread into `out`; out["started"] is set when its first chunk has arrived."""
    started = out["started"] = threading.Event()

    def run():
        try:
            chunks = []
            for ch in client.completions.create(model="x", stream=True, **kw):
                chunks.append(ch)
                started.set()
            out["finish"] = chunks[-1].choices[0].finish_reason
            out["text"] = "".join(ch.choices[0].text for ch in chunks)
        except Exception as e:  # noqa: BLE001 - reported by the test
            out["error"] = repr(e)
        started.set()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_latest_wins_per_user(server, engine):
    p = long_prompt(engine)
    c = server.client(KEY)
    stale, other = {}, {}
    t = _stream_in_thread(c, stale, prompt=p, max_tokens=LONG, temperature=0, user="alice")
    assert stale["started"].wait(30)
    t2 = _stream_in_thread(c, other, prompt=PROMPTS[0], max_tokens=6, temperature=0, user="bob")   # waits its turn
    r = c.completions.create(model="x", prompt=PROMPTS[2], max_tokens=6, temperature=0, user="alice")
    t.join(60), t2.join(60)
    assert stale["finish"] == "cancelled" and "error" not in stale
    assert other["finish"] in ("length", "stop") and other["text"] == engine.generate(PROMPTS[0], max_new_tokens=6).text
    assert r.choices[0].text == engine.generate(PROMPTS[2], max_new_tokens=6).text


def test_global_latest_wins(fim_bundle, engine):
    p = long_prompt(engine)
    s = Server(fim_bundle, "--latest-wins", "--no-warmup")
    try:
        c = s.client()
        stale = {}
        t = _stream_in_thread(c, stale, prompt=p, max_tokens=LONG, temperature=0)
        assert stale["started"].wait(30)
        r = c.completions.create(model="x", prompt=PROMPTS[0], max_tokens=6, temperature=0)   # no user: anyone's
        t.join(60)
        assert stale["finish"] == "cancelled"
        assert r.choices[0].text == engine.generate(PROMPTS[0], max_new_tokens=6).text
    finally:
        s.stop()


def test_full_queue_answers_429(fim_bundle, engine):
    # The model drafter at a fixed k: the long request must still run when the latecomers arrive, and the default
    # adaptive hybrid can finish LONG tokens of a tiny model's loop before they do.
    server = Server(fim_bundle, "--api-key", KEY, "--queue-size", "2", "--drafter", "model", "--fixed-k")
    try:
        _full_queue(server, engine)
    finally:
        server.stop()


def _full_queue(server, engine):
    p = long_prompt(engine)
    h = server.http(KEY)
    for attempt in range(3):   # a fast machine can finish u0's LONG tokens before u1 and u2 are queued: again
        clients = [server.client(KEY) for _ in range(3)]   # made first: only the requests race u0
        outs = [{} for _ in range(3)]
        threads = [_stream_in_thread(clients[0], outs[0], prompt=p, max_tokens=LONG, user="u0")]
        assert outs[0]["started"].wait(30)   # u0 runs; u1 and u2 wait
        threads += [_stream_in_thread(clients[i], o, prompt=p, max_tokens=LONG, user=f"u{i}")
                    for i, o in enumerate(outs) if i]
        deadline = time.monotonic() + 30
        while h.get("/health").json()["waiting"] < 2 and "finish" not in outs[0]:   # one running, two waiting
            assert time.monotonic() < deadline
            time.sleep(0.005)
        if "finish" not in outs[0]:
            break                        # the queue (size 2) is full, and u0 still runs
        for t in threads:
            t.join(60)
    else:
        raise AssertionError("u0 finished before two more requests were queued, three times")
    r = h.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
    assert r.status_code == 429 and r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "queue_full"
    # Latest wins frees the engine: each user's new request cancels its long one (even when the new one gets a 429).
    threads += [_stream_in_thread(server.client(KEY), {}, prompt="x", max_tokens=1, user=f"u{i}") for i in range(3)]
    for t in threads:
        t.join(60)
    assert [o.get("finish") for o in outs] == ["cancelled"] * 3, [(o.get("finish"), o.get("error")) for o in outs]


# -- bad input ----------------------------------------------------------------------------------------------------
BAD = [  # (endpoint, body, status, param, words in the message)
    ("/v1/completions", b'{"prompt": "x",', 400, None, "not valid JSON"),
    ("/v1/completions", b"\xff\xfe", 400, None, "not valid JSON"),
    ("/v1/completions", b"[1, 2]", 400, None, "JSON object"),
    ("/v1/completions", {"max_tokens": 4}, 422, "prompt", "required"),
    ("/v1/completions", {"prompt": 5}, 422, "prompt", "must be str"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "ten"}, 422, "max_tokens", "integer"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 422, "temperature", "number"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, 422, "stream", "boolean"),
    ("/v1/completions", {"prompt": "x", "stop": [1]}, 422, "stop", "must be"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -3}, 400, "max_tokens", "max_tokens must be"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens", "max_tokens must be"),
    ("/v1/completions", {"prompt": "x", "temperature": -0.5}, 400, "temperature", ">= 0"),
    ("/v1/completions", b'{"prompt": "x", "temperature": NaN}', 400, "temperature", ">= 0"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p", "(0, 1]"),
    ("/v1/completions", {"prompt": "x", "top_k": -1}, 400, "top_k", ">= 0"),
    ("/v1/completions", {"prompt": "x", "seed": -5}, 400, "seed", "seed must be"),
    ("/v1/completions", {"prompt": "x", "stop": ""}, 400, "stop.0", "empty"),
    ("/v1/completions", {"prompt": "x", "n": 3}, 400, "n", "must be 1"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt", "empty"),
    ("/v1/completions", {"prompt": []}, 400, "prompt", "empty"),
    ("/v1/completions", {"prompt": [1, 10 ** 9]}, 400, "prompt", "not a token id"),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt", "one prompt per request"),
    ("/v1/completions", {"prompt": "def f(x): " * 300}, 400, "prompt", "context holds 512"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", "empty"),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, 422, "messages.0.role", "required"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 422, "messages.0.content", "must be"),
    ("/v1/chat/completions", {"messages": "hi"}, 422, "messages", "list"),
    ("/infill", {"input_prefix": "a", "n_predict": -2}, 400, "n_predict", "-1"),
    ("/infill", {"input_prefix": 3}, 422, "input_prefix", "string"),
    ("/v1/completions", b"", 400, None, "not valid JSON"),
    ("/v1/completions", {"prompt": "x", "max_tokens": True}, 422, "max_tokens", "integer"),
    ("/v1/completions", {"prompt": "x", "top_k": 2.5}, 422, "top_k", "integer"),
    ("/v1/completions", b'{"prompt": "x", "top_p": Infinity}', 400, "top_p", "(0, 1]"),
    ("/v1/completions", {"prompt": "x", "seed": 2 ** 70}, 400, "seed", "seed must be"),
    ("/v1/completions", {"prompt": "x", "stop": ["a"] * 17}, 400, "stop", "at most 16"),
    ("/v1/completions", {"prompt": [1, -2]}, 400, "prompt", "not a token id"),
    ("/v1/completions", {"prompt": "x", "echo": True}, 400, "echo", "not supported"),
    ("/v1/completions", {"prompt": [5, 6], "suffix": "y"}, 400, "suffix", "text prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages.0.content", "only text"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}, 400,
     "max_completion_tokens", "max_completion_tokens must be"),
]


@pytest.mark.parametrize("path,body,status,param,words", BAD, ids=[f"{b[0]}-{b[2]}-{b[3]}-{i}"
                                                                  for i, b in enumerate(BAD)])
def test_bad_input_is_a_clear_4xx(server, path, body, status, param, words):
    h = server.http(KEY)
    r = h.post(path, content=body) if isinstance(body, bytes) else h.post(path, json=body)
    err = r.json()["error"]
    assert (r.status_code, err["param"]) == (status, param), err
    assert words in err["message"] and err["type"] == "invalid_request_error"


FIELDS = ("prompt", "suffix", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", "user", "n",
          "echo", "logprobs", "messages", "max_completion_tokens", "input_prefix", "input_suffix", "n_predict", "model")


def _json_values():
    from hypothesis import strategies as st

    leaf = (st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.integers(-3, 40)
            | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12) | st.sampled_from(["user", "text"]))
    return st.recursive(leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(
        st.sampled_from(["role", "content", "type", "text", "x"]), c, max_size=3), max_leaves=6)


def test_fuzzed_requests_never_get_a_5xx(server, engine):
    """Random JSON bodies over the fields the endpoints know (wrong types, NaN, infinities, huge integers, nested
    junk) and random bytes: every answer is a 2xx or a 4xx in OpenAI's shape, and the server serves on."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    h = server.http(KEY)
    paths = st.sampled_from(["/v1/completions", "/v1/chat/completions", "/infill"])
    bodies = st.dictionaries(st.sampled_from(FIELDS), _json_values(), max_size=6).map(
        lambda d: json.dumps(d).encode()) | st.binary(max_size=40)

    @settings(max_examples=int(os.environ.get("SPECEDGE_FUZZ_EXAMPLES", 80)), deadline=None,
              derandomize="SPECEDGE_FUZZ_EXAMPLES" not in os.environ,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(path=paths, body=bodies)
    def check(path, body):
        r = h.post(path, content=body)
        assert r.status_code < 500, (path, body, r.text)
        if r.status_code >= 400:
            err = r.json()["error"]
            assert err["message"] and err["type"] == "invalid_request_error", err

    check()
    r = h.post("/v1/completions", json={"prompt": PROMPTS[3], "max_tokens": 8})
    assert r.json()["choices"][0]["text"] == engine.generate(PROMPTS[3], max_new_tokens=8).text


def test_http_errors_keep_the_openai_shape_and_the_server_serves_on(server, engine):
    h = server.http(KEY)
    r = h.post("/v1/completions", content=b"x" * 70_000)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    r = h.get("/v1/nothing")
    assert r.status_code == 404 and "no such endpoint" in r.json()["error"]["message"]
    r = h.get("/v1/completions")
    assert r.status_code == 405 and "error" in r.json()
    for key in (None, "wrong"):
        r = server.http(key).get("/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        server.client("wrong").completions.create(model="x", prompt="x", max_tokens=2)
    unknown = {"prompt": PROMPTS[0], "max_tokens": 6, "frobnicate": {"a": 1}, "presence_penalty": 0}
    r = h.post("/v1/completions", json=unknown)   # unknown fields are ignored
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == engine.generate(PROMPTS[0], max_new_tokens=6).text
    models = h.get("/v1/models").json()["data"][0]
    assert models["specedge"]["context_length"] == 512 and models["specedge"]["draft"]["architecture"]


def test_cli_refusals(fim_bundle, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        r = subprocess.run([SPEC_EXPORT, "serve", str(fim_bundle), "--port", str(s.getsockname()[1])],
                           capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "cannot bind" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([SPEC_EXPORT, "serve", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "not a specedge bundle" in r.stderr


def test_binding_beyond_loopback_without_a_key_warns(fim_bundle):
    s = Server(fim_bundle, "--host", "0.0.0.0", "--no-warmup")
    try:
        assert "without an API key" in "".join(s.log)
        r = httpx.get(s.base.replace("0.0.0.0", "127.0.0.1") + "/health", timeout=30)
        assert r.status_code == 200
    finally:
        s.stop()


# -- the examples -------------------------------------------------------------------------------------------------
def run_example(name: str, server: Server, *args: str, key: str | None = None) -> dict:
    r = subprocess.run([sys.executable, str(ROOT / "examples" / name), "--base-url", server.url, "--json", *args],
                       capture_output=True, text=True, timeout=180,
                       env={**os.environ, "SPECEDGE_API_KEY": key or "none"})
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_autocomplete_example(server, engine):
    out = run_example("autocomplete.py", server, "--max-tokens", "12", key=KEY)
    assert out["mode"] == "fim" and out["completed"] + out["cancelled"] == out["keystrokes"] >= 10
    f = out["final"]
    assert f["finish_reason"] in ("length", "stop")   # the last keystroke is never stale
    assert f["text"] == engine.generate(fim_ids(engine, f["prefix"], f["suffix"]), max_new_tokens=12).text


def test_voice_example_chat_and_dialogue(server, engine, fim_bundle, plain_server, bundles):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import voice
    finally:
        sys.path.pop(0)
    out = run_example("voice.py", server, "--max-tokens", "40", "--say", "hello", key=KEY)
    msgs = [{"role": "system", "content": voice.SYSTEM}, {"role": "user", "content": "hello"}]
    assert out["mode"] == "chat" and out["text"] == engine.generate(chat_ids(fim_bundle, msgs), max_new_tokens=40).text
    assert out["sentences"] and out["time_to_first_sentence_ms"] > 0
    out = run_example("voice.py", plain_server, "--max-tokens", "40", "--say", "hello")
    want = Engine(bundles("llama")).generate(voice.dialogue_prompt("hello"), max_new_tokens=40, stop=("\nUser:",))
    spoken = []   # the text less a tail with no letter or digit: what the voice example hands on
    voice.sentences(iter([want.text]), spoken.append)
    assert out["mode"] == "dialogue" and out["text"] == "".join(spoken)
    said = []
    voice.sentences(iter(["Hi. How", " are you?", "\nFine"]), said.append)
    assert said == ["Hi. ", "How are you?\n", "Fine"]


# -- load ---------------------------------------------------------------------------------------------------------
def test_load(fim_bundle, engine):
    """Sequential requests, then 16 concurrent clients with random cancellations (shared users: latest-wins) and
    disconnects: no 5xx, no hung request, every completed greedy response equal to the engine's, bounded RSS."""
    full = os.environ.get("SPECEDGE_SERVE_FULL") == "1"
    n_seq, seconds, clients = (200, 30.0, 16) if full else (40, 10.0, 16)
    want = {(p, n): engine.generate(p, max_new_tokens=n).text for p in PROMPTS for n in (4, 12)}
    s = Server(fim_bundle)
    try:
        c = s.client()
        for i in range(n_seq):
            p, n = PROMPTS[i % len(PROMPTS)], (4, 12)[i % 2]
            assert c.completions.create(model="x", prompt=p, max_tokens=n, temperature=0).choices[0].text == want[p, n]
        rss0 = s.rss_mb()
        stop_at = time.monotonic() + seconds
        problems: list[str] = []
        counts = {"completed": 0, "cancelled": 0, "disconnected": 0, "busy": 0}
        lock = threading.Lock()

        def client(i: int) -> None:
            rng = random.Random(i)
            cl = s.client()
            while time.monotonic() < stop_at and len(problems) < 5:
                p, n = rng.choice(PROMPTS), rng.choice((4, 12))
                user = f"user{rng.randrange(4)}"   # four users over 16 clients: latest-wins cancels often
                try:
                    stream = cl.completions.create(model="x", prompt=p, max_tokens=n, temperature=0, stream=True,
                                                   user=user)
                    text, finish = [], None
                    for j, ch in enumerate(stream):
                        if rng.random() < 0.1 and j == 0:   # a client that goes away mid-stream
                            stream.close()
                            finish = "disconnected"
                            break
                        text.append(ch.choices[0].text)
                        finish = ch.choices[0].finish_reason or finish
                    key = finish if finish in ("cancelled", "disconnected") else "completed"
                    if key == "completed" and "".join(text) != want[p, n]:
                        problems.append(f"{p!r} {n}: {''.join(text)!r} != {want[p, n]!r}")
                except openai.RateLimitError:
                    key = "busy"
                except Exception as e:  # noqa: BLE001 - any 5xx, timeout or broken stream is a failure
                    problems.append(repr(e))
                    continue
                with lock:
                    counts[key] += 1

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(seconds + 90)
        assert not any(t.is_alive() for t in threads), "a client hung"
        assert not problems, problems
        assert counts["completed"] > 0 and counts["cancelled"] + counts["disconnected"] > 0, counts
        wait_idle(s)
        r = c.completions.create(model="x", prompt=PROMPTS[0], max_tokens=12, temperature=0)
        assert r.choices[0].text == want[PROMPTS[0], 12]
        growth = s.rss_mb() - rss0
        assert growth < 50, f"RSS grew {growth:.1f} MB"
        print(f"load: {n_seq} sequential, {seconds:.0f} s x {clients} clients: {counts}, RSS +{growth:.1f} MB")
    finally:
        s.stop()
    assert "Traceback" not in "".join(s.log), "".join(s.log)
