"""`spec-export serve` under abuse, by class (issue 22 A): text that is not encodable Unicode in any field, JSON
nested deeper than any request needs, clients that vanish while uploading, the Authorization scheme's case, an empty
API key from the environment, and the memory a refused huge prompt costs. A live server on 127.0.0.1, as in
test_serve.py; every loop is bounded."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from conftest import encodable  # noqa: E402
from test_serve import KEY, SPEC_EXPORT, Server  # noqa: E402
from test_serve import fim_bundle as fim_bundle  # noqa: E402,F401 - the module-scoped fixture, rebuilt here

ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/infill")


@pytest.fixture(scope="module")
def server(fim_bundle):
    s = Server(fim_bundle, "--api-key", KEY, "--max-body-bytes", str(4 << 20), "--no-warmup")
    yield s
    s.stop()


def no_traceback(s: Server) -> None:
    assert "Traceback" not in "".join(s.log), "".join(s.log)


def post(s: Server, path: str, body: bytes, **headers) -> httpx.Response:
    return s.http(KEY).post(path, content=body, headers={"content-type": "application/json", **headers})


# -- 1. text that UTF-8 cannot encode, in every text field --------------------------------------------------------
# (param the error names, body with the text at that place); max_tokens 1 keeps the valid cases cheap.
PLACES = [
    ("prompt", "/v1/completions", lambda t: {"prompt": t, "max_tokens": 1}),
    ("prompt", "/v1/completions", lambda t: {"prompt": [t], "max_tokens": 1}),
    ("suffix", "/v1/completions", lambda t: {"prompt": "def f(", "suffix": t, "max_tokens": 1}),
    ("stop", "/v1/completions", lambda t: {"prompt": "x", "stop": t, "max_tokens": 1}),
    ("stop", "/v1/completions", lambda t: {"prompt": "x", "stop": ["a", t], "max_tokens": 1}),
    ("user", "/v1/completions", lambda t: {"prompt": "x", "user": t, "max_tokens": 1}),
    ("model", "/v1/completions", lambda t: {"prompt": "x", "model": t, "max_tokens": 1}),
    ("messages", "/v1/chat/completions", lambda t: {"messages": [{"role": "user", "content": t}], "max_tokens": 1}),
    ("messages", "/v1/chat/completions", lambda t: {"messages": [{"role": t, "content": "hi"}], "max_tokens": 1}),
    ("messages", "/v1/chat/completions",
     lambda t: {"messages": [{"role": "user", "content": [{"type": "text", "text": t}]}], "max_tokens": 1}),
    ("user", "/v1/chat/completions",
     lambda t: {"messages": [{"role": "user", "content": "hi"}], "user": t, "max_tokens": 1}),
    ("input_prefix", "/infill", lambda t: {"input_prefix": t, "input_suffix": "x", "n_predict": 1}),
    ("input_suffix", "/infill", lambda t: {"input_prefix": "x", "input_suffix": t, "n_predict": 1}),
]
# Any text, surrogates (category Cs) included: st.text() leaves them out by default.
TEXT = st.text(st.characters(codec=None, categories=["L", "N", "P", "S", "Z", "Cc", "Cs"]), max_size=12)
SURROGATE = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)


def test_text_with_a_lone_surrogate_is_a_400_in_every_field(server):
    """The issue's own cases, at every place text enters: a 400 naming the field, never a 500; the message does not
    echo the text; /health still answers afterwards (nothing unencodable was stored for it)."""
    for escaped in (True, False):   # "\\ud800" as a JSON escape, and as the raw (surrogatepass) UTF-8 bytes
        for param, path, make in PLACES:
            body = make("def f():\ud800 x")
            raw = json.dumps(body).encode() if escaped else \
                json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass")
            r = post(server, path, raw)
            assert r.status_code == 400, (param, body, r.text)
            err = r.json()["error"]
            assert err["param"].split(".")[0] == param and "surrogate" in err["message"], err
            assert err["type"] == "invalid_request_error" and "f():" not in err["message"]
    for _ in range(2):
        assert server.http(KEY).get("/health").status_code == 200
    no_traceback(server)


@settings(max_examples=int(os.environ.get("SPECEDGE_FUZZ_EXAMPLES", 60)), deadline=None,
          derandomize="SPECEDGE_FUZZ_EXAMPLES" not in os.environ,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(place=st.sampled_from(PLACES), text=TEXT, bad=st.one_of(st.none(), SURROGATE), at=st.integers(0, 12))
def test_any_text_in_any_field_is_never_a_5xx(server, place, text, bad, at):
    """Property: any text (surrogates included) at any text field gives a 2xx or a 4xx in OpenAI's shape; text that
    UTF-8 cannot encode is always a 400; /health always answers."""
    if bad is not None:
        text = text[:at] + bad + text[at:]
    param, path, make = place
    r = post(server, path, json.dumps(make(text)).encode())
    assert r.status_code < 500, (path, text, r.text)
    # What the server reads: JSON joins an escaped high surrogate followed by a low one into one valid character.
    if not encodable(json.loads(json.dumps(text))):
        assert r.status_code == 400 and r.json()["error"]["param"].split(".")[0] == param, r.text
    elif r.status_code >= 400:
        assert r.json()["error"]["type"] == "invalid_request_error", r.text
    h = server.http(KEY).get("/health")
    assert h.status_code == 200 and h.json()["status"] == "ok"


# -- 2. JSON nested deeper than any request needs -----------------------------------------------------------------
@pytest.mark.parametrize("where", ["unknown", "prompt", "messages", "objects"])
def test_json_nested_deeper_than_ten_thousand_is_a_400(server, where):
    deep = 20_000   # > 10^4, and 40 KB: well under the body limit
    nest = "[" * deep + "]" * deep
    body = {"unknown": f'{{"prompt": "x", "max_tokens": 1, "frobnicate": {nest}}}',
            "prompt": f'{{"prompt": {nest}, "max_tokens": 1}}',
            "messages": f'{{"messages": [{{"role": "user", "content": {nest}}}]}}',
            "objects": '{"prompt": "x", "x": ' + '{"a": ' * deep + "1" + "}" * deep + "}"}[where]
    path = "/v1/chat/completions" if where == "messages" else "/v1/completions"
    r = post(server, path, body.encode())
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert "nested" in err["message"] and err["type"] == "invalid_request_error", err
    # Brackets inside strings are text, not nesting: a prompt of 20,000 "[" is an ordinary (too long) prompt.
    r = post(server, "/v1/completions", json.dumps({"prompt": "[" * deep, "max_tokens": 1}).encode())
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt" and "nested" not in r.text
    assert server.http(KEY).get("/health").status_code == 200
    no_traceback(server)


# -- 3. clients that go away while their body is still uploading --------------------------------------------------
def _raw(server: Server, data: bytes, pause: float = 0.0) -> None:
    host, port = server.base.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(data)
        time.sleep(pause)


def test_a_client_that_disconnects_mid_upload_logs_no_traceback(server):
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\n")
    n_log = len(server.log)
    for _ in range(3):
        _raw(server, (head + "Content-Length: 1000\r\n\r\n").encode() + b'{"prompt": "x",')   # longer than sent
        _raw(server, (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + b"5\r\n{\"pro\r\nzz\r\n")  # malformed
        _raw(server, (head + "Content-Length: 500\r\n\r\n").encode() + b'{"prompt": ', pause=0.3)   # slow, then gone
        _raw(server, (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + b"40\r\n{\"prompt\": \"x\"")  # mid-chunk
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not any(" 499 " in line for line in server.log[n_log:]):
        time.sleep(0.05)
    time.sleep(0.3)
    assert server.http(KEY).get("/health").status_code == 200
    r = server.http(KEY).post("/v1/completions", json={"prompt": "def f(", "max_tokens": 2})
    assert r.status_code == 200
    new = server.log[n_log:]
    assert not any("Traceback" in line or "ClientDisconnect" in line for line in new), "".join(new)
    assert len(new) <= 3 * 4 * 2 + 2, "".join(new)   # one line per dropped request at most (and the two above)


# -- 5. authorization ---------------------------------------------------------------------------------------------
def test_the_bearer_scheme_is_case_insensitive(server):
    for scheme in ("Bearer", "bearer", "BEARER", "bEaReR"):
        r = httpx.get(server.base + "/v1/models", headers={"Authorization": f"{scheme} {KEY}"}, timeout=30)
        assert r.status_code == 200, (scheme, r.text)
    for header in (f"Basic {KEY}", f"Bearer{KEY}", "bearer wrong", KEY, f"Bearer {KEY}x"):
        r = httpx.get(server.base + "/v1/models", headers={"Authorization": header}, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (header, r.text)


def test_an_empty_api_key_from_the_environment_is_refused(fim_bundle):
    for args, env in (([], {"SPECEDGE_API_KEY": ""}), (["--api-key", ""], {}), ([], {"SPECEDGE_API_KEY": "  "})):
        r = subprocess.run([SPEC_EXPORT, "serve", str(fim_bundle), "--port", "0", *args], capture_output=True,
                           text=True, timeout=60, env={**os.environ, **env})
        assert r.returncode == 2 and "empty" in r.stderr and "Traceback" not in r.stderr, (args, env, r.stderr)


# -- 4. memory: a refused huge prompt is refused before it is tokenized -------------------------------------------
def vm_hwm_mb(s: Server) -> float:
    for line in Path(f"/proc/{s.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_a_refused_megabyte_prompt_costs_little_memory(fim_bundle):
    """A 1 MB prompt is refused (400, too long) before it is tokenized: the server's peak memory (VmHWM) rises by
    at most 20 MB; a whole run of huge and deep bodies at every text field by at most 100 MB over the idle server."""
    s = Server(fim_bundle, "--max-body-bytes", str(4 << 20))
    try:
        h = s.http()
        for _ in range(3):   # the first requests' own allocations are part of the idle server
            assert h.post("/v1/completions", json={"prompt": "def f(x):", "max_tokens": 4}).status_code == 200
            assert h.get("/health").status_code == 200
        idle = vm_hwm_mb(s)
        r = h.post("/v1/completions", json={"prompt": "def f(x): return x\n" * 52_429, "max_tokens": 4})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
        one = vm_hwm_mb(s) - idle
        assert one <= 20, f"a refused 1 MB prompt raised VmHWM by {one:.1f} MB"
        mb = "def f(x): return x\n" * 52_429
        wide = "é" * (1 << 19)     # 1 MB of UTF-8 in half as many characters
        astral = "\U0001F600" * (1 << 18)   # 1 MB of UTF-8, a 4-byte-per-character str
        abuse = [("/v1/completions", {"prompt": t, "max_tokens": 4}) for t in (wide, astral)] + [
            ("/v1/completions", {"prompt": "def f(", "suffix": mb}),
            ("/v1/completions", {"prompt": [mb]}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": mb}]}),
            ("/infill", {"input_prefix": mb, "input_suffix": "x"}),
            ("/infill", {"input_prefix": "x", "input_suffix": mb}),
            ("/v1/completions", {"prompt": "x", "user": mb, "max_tokens": 1}),
            ("/v1/completions", {"prompt": list(range(5)) * 100_000}),
        ]
        for _ in range(3):
            for path, body in abuse:
                assert h.post(path, json=body).status_code in (400, 422), (path, list(body))
            deep = "[" * 500_000 + "]" * 500_000
            assert h.post("/v1/completions", content=f'{{"prompt": {deep}}}').status_code == 400
        assert h.get("/health").status_code == 200
        run = vm_hwm_mb(s) - idle
        assert run <= 100, f"an abusive run raised VmHWM by {run:.1f} MB"
        print(f"VmHWM idle {idle:.1f} MB, +{one:.1f} MB for a refused 1 MB prompt, +{run:.1f} MB for the run")
    finally:
        s.stop()
    no_traceback(s)


# -- 6. one log line per request ----------------------------------------------------------------------------------
def test_every_request_writes_one_log_line(server):
    n_log = len(server.log)
    r = server.http(KEY).post("/v1/completions", json={"prompt": "def f(", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200
    server.http().get("/health")   # no key: 401
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and len(server.log) < n_log + 2:
        time.sleep(0.05)
    lines = server.log[n_log:]
    done = r.json()["usage"]["completion_tokens"]
    assert any(line.startswith("POST /v1/completions 200 ") and f"tokens={done} " in line and " ms=" in line
               for line in lines), lines
    assert any(line.startswith("GET /health 401 ") for line in lines), lines
