"""What the HTTP server costs: time to first token and tokens/s through `spec-export serve` (streaming, one client)
against Engine.generate in this process, on the same prompts, interleaved prompt by prompt; and keystroke traffic (a
prompt growing by a few characters per request) with the prefill that prefix reuse saves.

Both sides are measured the same way, on the client's clock: TTFT = first non-empty text delta - request start;
decode tokens/s = (tokens - 1) / (last delta - first delta). The server's engine and this process's engine are two
copies of the bundle; only one runs at a time. Greedy texts must be equal (the script fails otherwise).

    python benchmarks/serve_bench.py --bundle .specedge-demo/bundle --out benchmarks/results/serve-x86_64-2core
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from statistics import median

import httpx

from specedge.runtime import Engine

ROOT = Path(__file__).resolve().parent


def start_server(bundle: Path, *args: str) -> tuple[subprocess.Popen, str]:
    exe = str(Path(sys.executable).parent / "spec-export")
    proc = subprocess.Popen([exe, "serve", str(bundle), "--port", "0", *args], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    for line in proc.stderr:
        if line.startswith("serving "):
            # The server logs a line per request: keep reading its stderr, or a full pipe would stall it.
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, line.split(" at ")[1].split()[0].removesuffix("/v1")
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise SystemExit(f"the server did not start: {line}")


def through_server(http: httpx.Client, prompt: str, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    stamps, text, final = [], [], {}
    with http.stream("POST", "/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens,
                                                       "temperature": 0, "stream": True}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            delta = ev["choices"][0]["text"]
            if delta:
                stamps.append(time.perf_counter())
                text.append(delta)
            if ev["choices"][0]["finish_reason"]:
                final = ev
    v = final["specedge"]
    return _timing(t0, stamps, "".join(text), final["usage"]["completion_tokens"], v["prefill_ms"], v["ttft_ms"])


def in_process(engine: Engine, prompt: str, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    stamps = []
    r = engine.generate(prompt, max_new_tokens=max_tokens, on_text=lambda d: stamps.append(time.perf_counter()))
    return _timing(t0, stamps, r.text, len(r.token_ids), r.stats.prefill_ms, r.stats.ttft_ms)


def _timing(t0: float, stamps: list[float], text: str, n: int, prefill_ms: float, engine_ttft_ms: float) -> dict:
    """engine_ttft_ms: the generator's own TTFT (from its first step); ttft_ms - engine_ttft_ms is what the path to
    the engine and back adds (tokenizing, and for the server HTTP, the queue hand-off, SSE), free of prefill noise."""
    ttft = 1e3 * (stamps[0] - t0) if stamps else float("nan")
    span = stamps[-1] - stamps[0] if len(stamps) > 1 else 0.0
    return {"ttft_ms": ttft, "tokens_per_s": (n - 1) / span if span > 0 else float("nan"), "tokens": n,
            "prefill_ms": prefill_ms, "overhead_ms": ttft - engine_ttft_ms, "text": text}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, default=Path(".specedge-demo/bundle"))
    ap.add_argument("--prompts", type=Path, default=ROOT / "heldout.jsonl")
    ap.add_argument("--n-prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--keystrokes", type=int, default=30)
    ap.add_argument("--chars-per-key", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / f"serve-{platform.machine()}")
    a = ap.parse_args()

    prompts = [json.loads(x)["prompt"] for x in a.prompts.read_text().splitlines() if x.strip()][: a.n_prompts]
    proc, base = start_server(a.bundle)
    try:
        http = httpx.Client(base_url=base, timeout=300)
        engine = Engine(a.bundle)
        in_process(engine, "import os\n", 8)   # warm this process's engine as the server warmed its own
        rows = []
        for run in range(a.runs):
            for i, p in enumerate(prompts):
                # interleaved, the order alternating: neither side always runs right after the other
                sides = [("server", lambda: through_server(http, p, a.max_new_tokens)),
                         ("engine", lambda: in_process(engine, p, a.max_new_tokens))]
                got = {name: f() for name, f in (sides if (run + i) % 2 else sides[::-1])}
                if got["server"]["text"] != got["engine"]["text"]:
                    raise SystemExit(f"prompt {i}: the server's greedy text differs from Engine.generate's")
                rows.append({"run": run, "prompt": i, **{f"{k}_{s}": v for s in got for k, v in got[s].items()
                                                         if k != "text"}})
                print(f"run {run} prompt {i}: ttft server {got['server']['ttft_ms']:.1f} / engine "
                      f"{got['engine']['ttft_ms']:.1f} ms, tok/s {got['server']['tokens_per_s']:.1f} / "
                      f"{got['engine']['tokens_per_s']:.1f}", file=sys.stderr)
        per_run = []
        for run in range(a.runs):
            rs = [r for r in rows if r["run"] == run]
            m = {k: median(r[k] for r in rs) for k in ("ttft_ms_server", "ttft_ms_engine", "tokens_per_s_server",
                                                        "tokens_per_s_engine")}
            m["ttft_added_ms"] = m["ttft_ms_server"] - m["ttft_ms_engine"]
            # Paired per request (client TTFT minus the engine's own TTFT on the same request): the prefill's
            # run-to-run noise on a shared machine cancels out.
            m["overhead_ms_server"] = median(r["overhead_ms_server"] for r in rs)
            m["overhead_ms_engine"] = median(r["overhead_ms_engine"] for r in rs)
            m["ttft_added_ms_paired"] = m["overhead_ms_server"] - m["overhead_ms_engine"]
            m["tokens_per_s_ratio"] = m["tokens_per_s_server"] / m["tokens_per_s_engine"]
            per_run.append(m)

        # Keystroke traffic: the text before the cursor grows by a few characters per request.
        doc = prompts[0]
        start = len(doc) // 2
        texts = [doc[: start + a.chars_per_key * j] for j in range(a.keystrokes)]
        keys = {"server": [through_server(http, t, 8) for t in texts],
                "engine_reuse": [in_process(engine, t, 8) for t in texts]}
        cold = []
        for t in texts:
            engine.forget()   # no cached prefix: the whole prompt is prefilled
            cold.append(in_process(engine, t, 8))
        keys["engine_cold"] = cold
        keystroke = {name: {"prefill_ms_median": median(r["prefill_ms"] for r in rs[1:]),
                            "prefill_ms_mean": sum(r["prefill_ms"] for r in rs[1:]) / (len(rs) - 1),
                            "ttft_ms_median": median(r["ttft_ms"] for r in rs[1:]),
                            "prefill_ms": [r["prefill_ms"] for r in rs], "ttft_ms": [r["ttft_ms"] for r in rs]}
                     for name, rs in keys.items()}
        keystroke["prompt_tokens"] = [len(engine.encode(t)) for t in texts]
        # The first keystroke follows other traffic: the saving is over the later ones (rs[1:]) only.
        keystroke["prefill_saved_ms_mean"] = (keystroke["engine_cold"]["prefill_ms_mean"]
                                              - keystroke["server"]["prefill_ms_mean"])
        keystroke["ttft_saved_ms_median"] = (keystroke["engine_cold"]["ttft_ms_median"]
                                             - keystroke["server"]["ttft_ms_median"])
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    report = {"bundle": str(a.bundle), "machine": f"{platform.machine()} {platform.processor()}".strip(),
              "max_new_tokens": a.max_new_tokens, "prompts": len(prompts), "runs": per_run, "rows": rows,
              "keystroke": keystroke, "targets": {"ttft_added_ms_paired": "<= 2", "tokens_per_s_ratio": ">= 0.90"}}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    plot(report, a.out.with_suffix(".png"))
    for i, m in enumerate(per_run):
        print(f"run {i}: TTFT server {m['ttft_ms_server']:.1f} ms vs engine {m['ttft_ms_engine']:.1f} ms "
              f"(+{m['ttft_added_ms']:.2f} ms; paired per request +{m['ttft_added_ms_paired']:.2f} ms); tokens/s server {m['tokens_per_s_server']:.1f} vs engine "
              f"{m['tokens_per_s_engine']:.1f} ({m['tokens_per_s_ratio']:.3f}x)")
    k = keystroke
    print(f"keystrokes ({a.keystrokes}, +{a.chars_per_key} characters each): prefill mean cold "
          f"{k['engine_cold']['prefill_ms_mean']:.1f} ms, with prefix reuse {k['engine_reuse']['prefill_ms_mean']:.1f} "
          f"ms in-process / {k['server']['prefill_ms_mean']:.1f} ms through the server; TTFT median cold "
          f"{k['engine_cold']['ttft_ms_median']:.1f} ms, with reuse {k['engine_reuse']['ttft_ms_median']:.1f} ms "
          f"in-process / {k['server']['ttft_ms_median']:.1f} ms through the server")
    print(f"wrote {a.out.with_suffix('.json')} and {a.out.with_suffix('.png')}")


def plot(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 4, figsize=(19, 4.2))
    runs = report["runs"]
    x = range(len(runs))
    w = 0.38
    for j, (key, label) in enumerate((("ttft_ms", "TTFT (ms, median)"), ("tokens_per_s", "decode tokens/s (median)"),
                                      ("overhead_ms", "TTFT minus the engine's own TTFT\n(same request; ms, median)"))):
        ax[j].bar([i - w / 2 for i in x], [m[f"{key}_engine"] for m in runs], w, label="Engine.generate")
        ax[j].bar([i + w / 2 for i in x], [m[f"{key}_server"] for m in runs], w, label="through the server (SSE)")
        ax[j].set_xticks(list(x), [f"run {i + 1}" for i in x])
        ax[j].set_title(label)
        ax[j].legend(fontsize=8, loc="lower right")
    ax[2].legend(fontsize=8, loc="upper left")
    k = report["keystroke"]
    for name, label in (("engine_cold", "cold (no reuse)"), ("engine_reuse", "prefix reuse, in-process"),
                        ("server", "prefix reuse, through the server")):
        ax[3].plot(k[name]["prefill_ms"], marker=".", label=label)
    ax[3].set_title("keystroke traffic: prefill per request (ms)")
    ax[3].set_xlabel("keystroke (+3 characters each)")
    ax[3].legend(fontsize=8)
    fig.suptitle(f"spec-export serve vs in-process, {report['bundle']}, {report['machine']}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--replot"]:   # redraw a saved report: --replot OUT.json
        plot(json.loads(Path(sys.argv[2]).read_text()), Path(sys.argv[2]).with_suffix(".png"))
    else:
        main()
