"""llama.cpp as a bench peer: `llama-server` on a GGUF of the same model, driven over HTTP by the streaming harness.

    spec-export bench BUNDLE --prompts P --baselines plain,lookup,llama.cpp,llama.cpp-ngram --gguf MODEL.gguf

* `llama.cpp`: plain decoding.
* `llama.cpp-ngram`: llama.cpp's n-gram speculation, one server per `--spec-type`, draft length and lookup length
  (`SWEEP`: 3 x 3 x 2 servers); the bench reports each, `best_of` picks the best.

`llama-server` is found on PATH or in the cache `benchmarks/build_llama_cpp.sh` builds it into
(${SPECEDGE_CACHE:-~/.cache/specedge}/llama.cpp/...); where neither has it, the peer is skipped with that reason. It is
never a runtime dependency.

Each server runs on 127.0.0.1 on a free port with the bench's threads and one slot, and is killed on close. Every
request is `/completion` with the prompt as token ids (the same ids the other side reads: the tokenizers never
differ), `cache_prompt: false` (and the server's RAM prompt cache off: `--cache-ram 0`), greedy (`temperature 0`,
`top_k 1`), `n_predict` new tokens, stopping at EOS like specedge; `return_tokens` gives each chunk's token ids, so
the harness stamps every token as it arrives, and the last chunk's `timings` gives the drafted/accepted counts.
"""
from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .harness import Clock, PeerRun, post_sse

TYPES = ("ngram-simple", "ngram-mod", "ngram-map-k")   # llama.cpp's n-gram --spec-type values that need no model
DRAFTS = (4, 8, 16)                                     # draft lengths swept for each type (its default is 48-64)
LOOKUPS = (None, 4)   # n-gram lengths looked up: llama.cpp's default (12, or 24 for ngram-mod), and a short one that
                      # finds matches in code whose repeats are broken by numbers and names (measured: the default
                      # drafted nothing on a 12-line repetitive block of Gemma tokens, 4 drafted 40-68 tokens)
BUILD_HINT = "build it once with benchmarks/build_llama_cpp.sh (about 10 minutes on 2 cores), or put it on PATH"


def cache_dir() -> Path:
    return Path(os.environ.get("SPECEDGE_CACHE") or Path.home() / ".cache" / "specedge") / "llama.cpp"


def find_binary(name: str = "llama-server") -> tuple[Path | None, str | None]:
    """(path, None), or (None, why not): PATH first, then the build cache of benchmarks/build_llama_cpp.sh."""
    on_path = shutil.which(name)
    if on_path:
        return Path(on_path), None
    built = sorted(glob.glob(str(cache_dir() / "sdist" / "*" / "llama.cpp" / "build" / "bin" / name)))
    if built and os.access(built[-1], os.X_OK):
        return Path(built[-1]), None
    return None, f"{name} is not on PATH nor built in {cache_dir()}: {BUILD_HINT}"


@dataclass(frozen=True)
class Spec:
    """One llama.cpp n-gram speculation setting: a --spec-type, the most tokens it drafts per round, and the length
    of the n-gram it looks up (None: llama.cpp's default, 12 for ngram-simple and ngram-map-k, 24 for ngram-mod)."""
    type: str
    draft: int
    lookup: int | None = None

    @property
    def name(self) -> str:
        return f"llama.cpp-{self.type}-d{self.draft}" + (f"-n{self.lookup}" if self.lookup else "")

    def args(self) -> list[str]:
        d, n = str(self.draft), str(self.lookup)
        if self.type in ("ngram-simple", "ngram-map-k"):
            flag = f"--spec-{self.type}"
            return ["--spec-type", self.type, f"{flag}-size-m", d, *([f"{flag}-size-n", n] if self.lookup else [])]
        if self.type == "ngram-mod":
            # n-min: drafts shorter than this are dropped; llama.cpp's default pair is 48 of 64, kept in proportion
            return ["--spec-type", self.type, "--spec-ngram-mod-n-max", d,
                    "--spec-ngram-mod-n-min", str(max(1, 3 * self.draft // 4)),
                    *(["--spec-ngram-mod-n-match", n] if self.lookup else [])]
        raise ValueError(f"unknown llama.cpp n-gram type {self.type!r}: one of {', '.join(TYPES)}")


def sweep(drafts=DRAFTS, lookups=LOOKUPS) -> tuple[Spec, ...]:
    return tuple(Spec(t, d, n) for t in TYPES for n in lookups for d in drafts)


SWEEP = sweep()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """A llama-server process on 127.0.0.1: started and waited for (GET /health answers 200 once the model is loaded
    and warmed up), killed by close(). Its log goes to a temporary file, quoted when it fails."""

    def __init__(self, gguf: Path, spec: Spec | None = None, threads: int = 0, ctx: int = 4096,
                 binary: Path | None = None, timeout_s: float = 180.0):
        """threads 0: llama.cpp's own default."""
        if binary is None:
            binary, why = find_binary()
            if binary is None:
                raise FileNotFoundError(why)
        gguf = Path(gguf)
        if not gguf.is_file():
            raise FileNotFoundError(f"GGUF file {gguf} does not exist")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="specedge-llama-server-", suffix=".log", delete=False)
        # -np 1: one slot, the whole context for one request; --cache-ram 0: no prompt cache kept in RAM between
        # requests (cache_prompt false covers the slot's own cache); threads for both decode and prompt batches.
        self.cmd = [str(binary), "-m", str(gguf), *(["-t", str(threads), "-tb", str(threads)] if threads else []),
                    "--host", "127.0.0.1", "--port", str(self.port), "-c", str(ctx), "-np", "1", "--cache-ram", "0",
                    "--no-webui", *(spec.args() if spec else [])]
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            self._wait(timeout_s)
        except BaseException:
            self.close()
            raise

    def _wait(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.proc.returncode}: {' '.join(self.cmd)}\n"
                                   f"{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass   # not listening yet, or 503 while loading
            time.sleep(0.2)
        raise TimeoutError(f"llama-server did not answer /health within {timeout_s:.0f} s: {' '.join(self.cmd)}\n"
                           f"{self.tail()}")

    def tail(self, chars: int = 3000) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-chars:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)


class LlamaCpp:
    """The peer: one llama-server (plain, or with one n-gram `spec`), `generate` timed by the streaming harness."""

    def __init__(self, gguf: Path, spec: Spec | None = None, threads: int = 0, eos_token_ids=(), ctx: int = 4096,
                 binary: Path | None = None):
        self.spec, self.eos = spec, set(eos_token_ids)
        self.server = LlamaServer(gguf, spec, threads, ctx, binary)

    def generate(self, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None) -> PeerRun:
        body = {"prompt": [int(t) for t in prompt_ids], "n_predict": max_new_tokens, "stream": True,
                "cache_prompt": False, "return_tokens": True, "temperature": temperature,
                # greedy: top_k 1 as well, so no sampler chain can pick anything but the argmax
                "top_k": top_k if temperature > 0 else 1, "top_p": top_p if temperature > 0 else 1.0,
                "min_p": 0.0, "repeat_penalty": 1.0, "seed": -1 if seed is None else seed}
        clock, ids, final = Clock(), [], {}
        for _, event in post_sse(self.server.url + "/completion", body):
            new = [t for t in event.get("tokens") or [] if t not in self.eos]
            if new:
                ids += new
                clock.tick(len(new))
            if event.get("stop"):
                final = event
        clock.done()
        t = final.get("timings") or {}
        # llama-server leaves the counters out of `timings` when nothing was drafted
        counters = dict(drafted=t.get("draft_n", 0), accepted=t.get("draft_n_accepted", 0)) if self.spec else {}
        return clock.run(ids, timings=t or None, **counters)

    def close(self) -> None:
        self.server.close()


def best_of(rows, rate=lambda r: r.tokens_per_s):
    """The fastest of llama.cpp's n-gram configurations among a bench report's result rows, or None."""
    ngram = [r for r in rows if r.name.startswith("llama.cpp-ngram")]
    return max(ngram, key=rate) if ngram else None


def llama_bench(gguf: Path, threads: int = 2, binary: Path | None = None, prompt: int = 512, gen: int = 64) -> dict:
    """llama-bench's own pp<prompt> and tg<gen> rates (tokens/s) on the GGUF: the reference numbers beside the
    harness's. Raises FileNotFoundError when llama-bench is absent."""
    import json

    if binary is None:
        binary, why = find_binary("llama-bench")
        if binary is None:
            raise FileNotFoundError(why)
    out = subprocess.run([str(binary), "-m", str(gguf), "-t", str(threads), "-p", str(prompt), "-n", str(gen),
                          "-o", "json"], capture_output=True, text=True, check=True, timeout=900).stdout
    rows = json.loads(out)
    return {(f"pp{r['n_prompt']}" if r["n_prompt"] else f"tg{r['n_gen']}"): r["avg_ts"] for r in rows}
