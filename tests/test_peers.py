"""The bench's streaming harness and its peers, against real servers: `spec-export serve` on the tiny bundle over
HTTP, specedge in-process, onnxruntime-genai's n-gram decoding, and llama.cpp's llama-server where it is built (the
llama.cpp tests skip, saying why, where it is not: CI does not build it)."""
from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from specedge.runtime import Engine, GenerationConfig
from specedge.tools import llamacpp
from specedge.tools.peers import PEERS, OrtGenAI, OpenAIStream, PeerRun, PeerSetup, Specedge, \
    ort_genai_ngram_unsupported

SPEC_EXPORT = str(Path(sys.executable).parent / "spec-export")
PROMPT = "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n    return"
GREEDY = GenerationConfig(temperature=0.0, seed=0, speculative=False)
GEMMA_GGUF = Path(os.environ.get("SPECEDGE_CACHE") or Path.home() / ".cache" / "specedge") / "gemma3-270m" / \
    "gemma-3-270m-q4_k_m.gguf"


def test_rates_are_the_issue_definitions():
    """Decode rate after the first token (n - 1) / (t_last - t_first); end to end n / wall."""
    r = PeerRun([7, 8, 9, 10, 11], ttft_ms=100.0, token_ms=[10.0, 0.0, 20.0, 10.0], wall_ms=150.0)
    assert r.tokens_per_s_after_first == pytest.approx(4 / 0.040)
    assert r.tokens_per_s_end_to_end == pytest.approx(5 / 0.150)
    # a stream that counts tokens without sending ids: one gap per chunk, the count from the last chunk
    chunked = PeerRun([], ttft_ms=50.0, token_ms=[30.0], wall_ms=90.0, new_tokens=7)
    assert chunked.n == 7 and chunked.tokens_per_s_after_first == pytest.approx(6 / 0.030)


# -- specedge's own server over HTTP ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(bundles):
    """`spec-export serve BUNDLE --port 0` in a subprocess: (base url, bundle)."""
    bundle = bundles("llama")
    proc = subprocess.Popen([SPEC_EXPORT, "serve", str(bundle), "--port", "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    log: list[str] = []

    def drain():
        for line in proc.stderr:
            log.append(line)
            lines.put(line)

    threading.Thread(target=drain, daemon=True).start()
    deadline, url = time.monotonic() + 120, None
    while url is None and time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            assert proc.poll() is None, "".join(log)
            continue
        if line.startswith("serving "):
            url = line.split(" at ")[1].split()[0].removesuffix("/v1")
    assert url, f"the server did not start within 120 s: {''.join(log)}"
    while time.monotonic() < deadline:   # "serving" is printed once bound; it accepts once uvicorn listens
        try:
            urllib.request.urlopen(url + "/health", timeout=2).close()
            break
        except OSError:
            time.sleep(0.2)
    yield url, bundle
    proc.terminate()
    proc.wait(timeout=15)
    assert "Traceback" not in "".join(log), "".join(log)


def test_harness_over_http_times_our_server(served):
    url, bundle = served
    engine = Engine(bundle)
    ids = engine.encode(PROMPT)
    want = engine.generate(ids, GenerationConfig(max_new_tokens=24, temperature=0.0, speculative=False))
    peer = OpenAIStream(url)
    runs = [peer.generate(ids, 24) for _ in range(2)]
    for r in runs:
        assert r.text == want.text and r.n == len(want.token_ids)        # the same request, answered over HTTP
        assert 0 < r.ttft_ms < r.wall_ms
        assert sum(r.token_ms) < r.wall_ms - r.ttft_ms + 1e-6           # t_last - t_first within the request
        # the server sends what arrived since its last event: a tiny model may finish within one, and a client
        # that saw one chunk has no decode rate to report (0, not a made-up number)
        assert (r.tokens_per_s_after_first > 0) == bool(r.token_ms and sum(r.token_ms) > 0)
        assert r.tokens_per_s_end_to_end == pytest.approx(1e3 * r.n / r.wall_ms)
        assert r.timings["finish"] in ("length", "eos")


def test_in_process_peer_matches_generate_and_is_timed_by_the_same_clock(bundles):
    engine = Engine(bundles("llama"))
    ids = engine.encode(PROMPT)
    want = engine.generate(ids, GenerationConfig(max_new_tokens=20, temperature=0.0, speculative=False))
    plain = Specedge(engine, GREEDY).generate(ids, 20)
    lookup = Specedge(engine, GenerationConfig(speculative=True, drafter="lookup", k=4)).generate(ids, 20)
    assert plain.token_ids == want.token_ids == lookup.token_ids
    assert plain.n == len(plain.token_ms) + 1 and plain.drafted == 0
    assert lookup.drafted > 0 and 0 < plain.ttft_ms < plain.wall_ms


# -- onnxruntime-genai's n-gram decoding -----------------------------------------------------------------------------
def test_ort_genai_ngram_is_exact_and_drafts(bundles):
    why = ort_genai_ngram_unsupported()
    if why:
        pytest.skip(why)
    engine = Engine(bundles("llama"))
    ids = engine.encode(PROMPT * 2)[:96]   # repeats: something for an n-gram to find (the context is 128)
    plain = OrtGenAI(engine.bundle, None)
    ngram = OrtGenAI(engine.bundle, 4, ngram=3)
    try:
        a, b = plain.generate(ids, 24), ngram.generate(ids, 24)
    finally:
        plain.close()
        ngram.close()
    assert a.token_ids == b.token_ids == engine.generate(ids, GenerationConfig(
        max_new_tokens=24, temperature=0.0, speculative=False)).token_ids
    assert a.drafted is None and b.drafted > 0


# -- llama.cpp ---------------------------------------------------------------------------------------------------------
def test_llamacpp_is_skipped_with_the_reason_when_absent(bundles, tmp_path, monkeypatch):
    """No binary on PATH or in the cache, or no --gguf: bench's registry says why instead of failing."""
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("SPECEDGE_CACHE", str(tmp_path / "cache"))
    path, why = llamacpp.find_binary()
    assert path is None and "llama-server is not on PATH nor built in" in why and "build_llama_cpp.sh" in why
    entries = {p.name: p for p in PEERS}
    setup = PeerSetup(Engine(bundles("llama")), (2,), 2, None)
    assert "pass --gguf FILE" in entries["llama.cpp"].unavailable(setup)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    for name in ("llama.cpp", "llama.cpp-ngram"):
        assert entries[name].unavailable(PeerSetup(setup.engine, (2,), 2, gguf)) == why
    with pytest.raises(FileNotFoundError, match="build_llama_cpp.sh"):
        llamacpp.LlamaServer(gguf)


def test_llamacpp_sweep_is_one_server_per_type_and_draft_length():
    assert {s.type for s in llamacpp.SWEEP} == {"ngram-simple", "ngram-mod", "ngram-map-k"}
    assert len({s.name for s in llamacpp.SWEEP}) == len(llamacpp.SWEEP)
    assert llamacpp.Spec("ngram-mod", 8).args() == ["--spec-type", "ngram-mod", "--spec-ngram-mod-n-max", "8",
                                                    "--spec-ngram-mod-n-min", "6"]
    assert llamacpp.Spec("ngram-simple", 4, 3).args() == ["--spec-type", "ngram-simple", "--spec-ngram-simple-size-m",
                                                          "4", "--spec-ngram-simple-size-n", "3"]
    with pytest.raises(ValueError, match="unknown llama.cpp n-gram type"):
        llamacpp.Spec("eagle", 4).args()


@pytest.fixture(scope="module")
def llama_server():
    path, why = llamacpp.find_binary()
    if path is None:
        pytest.skip(why)
    if not GEMMA_GGUF.is_file():
        pytest.skip(f"no GGUF to run llama-server on: {GEMMA_GGUF} is made by `spec-export demo --model gemma-3-270m`")
    return path


def test_llamacpp_plain_and_ngram_for_real(llama_server):
    """llama-server on Gemma 3 270M: greedy, 16 new tokens, the prompt read cold every time, the same tokens on every
    request, and drafted/accepted counts from its n-gram speculation. (Its speculative output is repeatable but not
    always its plain output: on this prompt it parts at the sixth token, a verify batch rounding differently from
    single steps; benchmarks/gemma_vs_llamacpp.py counts such partings.)"""
    plain = llamacpp.LlamaCpp(GEMMA_GGUF, None, threads=2, eos_token_ids=[1, 106])   # Gemma's <eos>, <end_of_turn>
    ngram = llamacpp.LlamaCpp(GEMMA_GGUF, llamacpp.Spec("ngram-simple", 4, 3), threads=2, eos_token_ids=[1, 106])
    try:
        ids = _tokenize(plain.server.url, PROMPT * 3)     # the GGUF's own tokenizer, BOS included
        a = [plain.generate(ids, 16) for _ in range(2)]
        b = [ngram.generate(ids, 16) for _ in range(2)]
    finally:
        plain.close()
        ngram.close()
    assert a[0].token_ids == a[1].token_ids and b[0].token_ids == b[1].token_ids and 0 < a[0].n <= 16
    for r in (*a, *b):
        assert r.timings["prompt_n"] == len(ids)            # no prompt cache: every token read again
        assert 0 < r.ttft_ms < r.wall_ms and r.tokens_per_s_after_first > 0
    assert a[0].drafted is None and b[0].drafted > 0 and 0 <= b[0].accepted <= b[0].drafted
    assert plain.server.proc.poll() is not None             # closed: the process is gone


def _tokenize(url: str, text: str) -> list[int]:
    import json

    req = urllib.request.Request(url + "/tokenize", json.dumps({"content": text, "add_special": True}).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())["tokens"]


def test_bench_runs_llamacpp_beside_ours_and_leaves_it_out_of_exactness(bundles, llama_server):
    """`spec-export bench --baselines plain,llama.cpp --gguf FILE`, through run_bench: llama.cpp's rows
    are measured by the harness, and its outputs (its own kernels, here even another model) are not partings."""
    from specedge.tools import bench

    report = bench.run_bench(bundles("llama"), [PROMPT], max_new_tokens=8, ks=(2,),
                             baselines=("plain", "llama.cpp"), threads=2, gguf=GEMMA_GGUF)
    rows = {r.name: r for r in report.results}
    assert set(rows) == {"plain", "llama.cpp"} and rows["llama.cpp"].tokens_per_s > 0
    assert rows["llama.cpp"].tokens_per_s_end_to_end > 0 and rows["llama.cpp"].ttft_ms > 0
    assert not [p for p in report.partings if p.config == "llama.cpp"]
    bench.check_exactness(report.partings)


def test_only_peers_on_the_targets_own_weights_are_held_to_its_plain_output():
    """transformers runs the fp32 sources: its greedy output is ours only where the target is fp32 (an int8 target
    parts from it by design); llama.cpp never runs our weights; onnxruntime-genai runs the bundle's own graphs."""
    from types import SimpleNamespace

    from specedge.tools.peers import PEERS

    def setup(precision):
        return SimpleNamespace(engine=SimpleNamespace(manifest=SimpleNamespace(target=SimpleNamespace(
            precision=precision))))

    held = {prec: {p.name for p in PEERS if p.compared(setup(prec))} for prec in ("fp32", "int8")}
    assert {"hf", "hf-plain", "hf-lookup", "ort-genai"} <= held["fp32"]
    assert held["int8"] == held["fp32"] - {"hf", "hf-plain", "hf-lookup"}
    assert not {"llama.cpp", "llama.cpp-ngram"} & held["fp32"]
