"""Issue 23's table: specedge against llama.cpp on Gemma 3 270M, on a 2-core CPU, the same prompts, in one run.

Setup: both sides get the same token ids (the prompt encoded once by the bundle's tokenizer, Gemma's), greedy, 64 new
tokens, stopping at EOS on both, prompt caching off on both (specedge: the Engine forgets its prefix before each
request; llama.cpp: `cache_prompt: false` and `--cache-ram 0`), 2 threads each. Both are timed by one harness
(specedge.tools.peers.Clock): llama.cpp through llama-server's streamed /completion over HTTP on 127.0.0.1, specedge
in-process through the Generator's token iterator (its server's stream sends one text chunk per round without token
ids, and its drafter and k are per server, not per request: one process per configuration would measure start-ups).
Per request: TTFT, the decode rate after the first token (n - 1) / (t_last - t_first), end-to-end tokens/s n / wall,
and llama.cpp's drafted/accepted from its `timings`.

Runs: every prompt through every configuration (the order rotated from prompt to prompt), the whole pass `--runs`
times (2: two interleaved runs); a request's value is the median of its runs. Configurations are chosen on the even
prompts of each workload (the selection half) and reported on the odd ones (the report half): "best" is the best
decode rate on the selection half, for specedge (every configuration, plain included) and for llama.cpp (plain and
its n-gram sweep) separately.

    python benchmarks/make_workloads.py --tokenizer BUNDLE/tokenizer.json --seed 23 --out benchmarks/workloads/gemma3
    python benchmarks/gemma_vs_llamacpp.py             # the full table (1-2 hours on a quiet 2-core machine)
    python benchmarks/gemma_vs_llamacpp.py --prompts 2 --max-new-tokens 16 --runs 1 --name smoke   # a smoke
    python benchmarks/gemma_vs_llamacpp.py --markdown benchmarks/results/NAME.json   # README's table from a run

Writes benchmarks/results/NAME.json and NAME.png. Needs llama-server (benchmarks/build_llama_cpp.sh), the Gemma
bundle (`spec-export demo --model gemma-3-270m`) and its GGUF (made by the same command).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

from specedge.runtime import Engine, GenerationConfig
from specedge.tools.bench import load_prompts
from specedge.tools.llamacpp import DRAFTS, LlamaCpp, find_binary, llama_bench, sweep
from specedge.tools.peers import OpenAIStream, Specedge

HERE = Path(__file__).resolve().parent
CACHE = Path.home() / ".cache" / "specedge" / "gemma3-270m"
WORKLOADS = ("editing", "completion", "nopay")   # copy-and-modify, completion, no-pay
# Checks beside the table, never a side's "best" nor compared for partings: specedge's plain decoding through its HTTP
# server (--http-check), and another bundle's plain decoding (--compare-bundle: e.g. one exported by older code).
CHECKS = ("plain-http", "plain-compare")


def ours(engine: Engine, ks: list[int]) -> dict[str, Specedge]:
    """specedge's configurations: plain, the fixed-k drafters the bundle has, the adaptive policy per drafter."""
    g = lambda **o: GenerationConfig(temperature=0.0, seed=0, **o)  # noqa: E731
    out = {"plain": Specedge(engine, g(speculative=False))}
    drafters = ["lookup", "hybrid", "model"] if engine.draft else ["lookup"]
    for d in drafters:
        for k in ks:
            out[f"{d}-k{k}"] = Specedge(engine, g(speculative=True, drafter=d, k=k, adaptive=False))
    for d in drafters:
        out[f"adaptive-{d}"] = Specedge(engine, g(speculative=True, drafter=d, k=max(ks), adaptive=True))
    return out


def llama(gguf: Path, threads: int, eos: list[int], specs) -> dict[str, LlamaCpp]:
    """llama.cpp plain and one server per n-gram setting, all started now (an idle llama-server takes no CPU)."""
    out = {}
    try:
        out["llama.cpp"] = LlamaCpp(gguf, None, threads, eos)
        for spec in specs:
            out[spec.name] = LlamaCpp(gguf, spec, threads, eos)
    except BaseException:
        for p in out.values():
            p.close()
        raise
    return out


class ServedPlain(OpenAIStream):
    """`spec-export serve BUNDLE --no-speculation` in a subprocess, timed over HTTP like llama-server: the check of
    what specedge's HTTP layer adds to the in-process numbers. Its prefix reuse stays on (the server has no switch
    for it), but consecutive requests carry different prompts, so only the BOS token is reused."""

    def __init__(self, bundle: Path, threads: int):
        import subprocess
        import urllib.request

        exe = Path(sys.executable).with_name("spec-export")
        self.proc = subprocess.Popen([str(exe), "serve", str(bundle), "--port", "0", "--no-speculation",
                                      "--threads", str(threads)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        url = None
        for line in self.proc.stderr:          # "serving NAME at http://127.0.0.1:PORT/v1 (...)"
            if line.startswith("serving "):
                url = line.split(" at ")[1].split()[0].removesuffix("/v1")
                break
        if url is None:
            raise RuntimeError(f"spec-export serve exited with {self.proc.wait()}")
        for _ in range(600):                   # bound first, listening once uvicorn runs
            try:
                urllib.request.urlopen(url + "/health", timeout=2).close()
                break
            except OSError:
                time.sleep(0.1)
        super().__init__(url)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=15)


def measure(configs: dict, prompts: dict[str, list[list[int]]], n: int, runs: int, say) -> list[dict]:
    """Every prompt through every configuration, the order rotated from prompt to prompt, `runs` times."""
    names, rows, i = list(configs), [], 0
    for run in range(runs):
        for workload, ids_list in prompts.items():
            for p, ids in enumerate(ids_list):
                for name in names[i % len(names):] + names[: i % len(names)]:
                    r = configs[name].generate(ids, n)
                    rows.append({"run": run, "workload": workload, "prompt": p, "config": name,
                                 "prompt_tokens": len(ids), "new_tokens": r.n, "ttft_ms": r.ttft_ms,
                                 "decode_tps": r.tokens_per_s_after_first, "e2e_tps": r.tokens_per_s_end_to_end,
                                 "drafted": r.drafted, "accepted": r.accepted, "token_ids": r.token_ids,
                                 "server_timings": r.timings})
                i += 1
                say(f"run {run + 1}/{runs} {workload} prompt {p + 1}/{len(ids_list)}")
    return rows


def summarize(rows: list[dict], workloads: list[str], configs: list[str]) -> dict:
    """Per workload, half ("select": even prompts, "report": odd ones) and configuration: medians over prompts of
    each prompt's median over runs. Then the best of each side, chosen on "select", read on "report"."""
    def cell(workload, half, config):
        per_prompt: dict[int, list[dict]] = {}
        for r in rows:
            if r["workload"] == workload and r["config"] == config and r["prompt"] % 2 == (half == "report"):
                per_prompt.setdefault(r["prompt"], []).append(r)
        if not per_prompt:
            return None
        med = lambda key: statistics.median(statistics.median(x[key] for x in rs) for rs in per_prompt.values())  # noqa: E731
        drafted = sum(x["drafted"] or 0 for rs in per_prompt.values() for x in rs)
        accepted = sum(x["accepted"] or 0 for rs in per_prompt.values() for x in rs)
        return {"prompts": len(per_prompt), "decode_tps": med("decode_tps"), "e2e_tps": med("e2e_tps"),
                "ttft_ms": med("ttft_ms"), "new_tokens": med("new_tokens"), "drafted": drafted,
                "accepted": accepted, "acceptance": accepted / drafted if drafted else None}

    out = {}
    for w in workloads:
        table = {h: {c: cell(w, h, c) for c in configs} for h in ("select", "report")}
        # A one-prompt smoke has no report half: it reports on the selection half, and says so.
        report = "report" if any(table["report"].values()) else "select"
        side = {"specedge": [c for c in configs if not c.startswith("llama.cpp") and c not in CHECKS],
                "llama.cpp": [c for c in configs if c.startswith("llama.cpp")]}
        best = {s: max((c for c in cs if table["select"][c]), key=lambda c: table["select"][c]["decode_tps"],
                       default=None) for s, cs in side.items()}
        pick = lambda c: table[report].get(c) if c else None  # noqa: E731
        ours_plain, ours_best = pick("plain"), pick(best["specedge"])
        ll_plain, ll_best = pick("llama.cpp"), pick(best["llama.cpp"])
        ratio = lambda a, b, key: a[key] / b[key] if a and b and b[key] else None  # noqa: E731
        out[w] = {"reported_on": report, "best": best, "table": table, "ratios": {
            "plain_decode": ratio(ours_plain, ll_plain, "decode_tps"),
            "plain_e2e": ratio(ours_plain, ll_plain, "e2e_tps"),
            "best_decode": ratio(ours_best, ll_best, "decode_tps"),
            "best_e2e": ratio(ours_best, ll_best, "e2e_tps"),
            "ttft_plain": ratio(ours_plain, ll_plain, "ttft_ms")}}
    return out


def partings(rows: list[dict]) -> dict[str, int]:
    """Requests whose greedy output differs from the same side's plain decoding on the same prompt and run
    (specedge's drafters against its plain; llama.cpp's n-gram servers against its plain server)."""
    plain = {(r["run"], r["workload"], r["prompt"], r["config"].startswith("llama.cpp")): r["token_ids"]
             for r in rows if r["config"] in ("plain", "llama.cpp")}
    out: dict[str, int] = {}
    for r in rows:
        if r["config"] not in ("plain", "llama.cpp", *CHECKS) and r["token_ids"]:
            ref = plain.get((r["run"], r["workload"], r["prompt"], r["config"].startswith("llama.cpp")))
            out[r["config"]] = out.get(r["config"], 0) + (ref is not None and ref != r["token_ids"])
    return out


def markdown(report: dict) -> str:
    """README's table from a results file: per workload (its report half), each configuration's decode rate, end-to-end
    rate and TTFT, its decode rate over specedge's plain in each run (the median of the two is the "never below plain"
    check) and over llama.cpp's plain. Only llama.cpp's plain and best rows are shown."""
    rows, out = report["requests"], []
    for w, s in report["summary"].items():
        t, half = s["table"][s["reported_on"]], s["reported_on"] == "report"
        runs = sorted({r["run"] for r in rows})

        def run_rate(config, run):   # median over the half's prompts of one run
            xs = [r["decode_tps"] for r in rows if (r["workload"], r["config"], r["run"]) == (w, config, run)
                  and r["prompt"] % 2 == half]
            return statistics.median(xs) if xs else None

        out += [f"**{w}** ({t['plain']['prompts']} prompts, {report['setup']['max_new_tokens']} new tokens)", "",
                "| configuration | decode tok/s | e2e tok/s | TTFT ms | decode vs plain, per run | vs llama.cpp plain |",
                "|---|---|---|---|---|---|"]
        shown = [c for c in t if t[c] and (not c.startswith("llama.cpp") or c in ("llama.cpp", s["best"]["llama.cpp"]))]
        for c in shown:
            v = t[c]
            per_run = " / ".join(f"{run_rate(c, r) / run_rate('plain', r):.2f}x" for r in runs)
            best = " (best)" if c in s["best"].values() else ""
            out.append(f"| {c}{best} | {v['decode_tps']:.1f} | {v['e2e_tps']:.1f} | {v['ttft_ms']:.0f} | {per_run} | "
                       f"{v['decode_tps'] / t['llama.cpp']['decode_tps']:.2f}x |")
        out.append("")
    return "\n".join(out)


def plot(summary: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    bars = [("specedge plain", "#9ecae1"), ("specedge best", "#3182bd"), ("llama.cpp plain", "#fdae6b"),
            ("llama.cpp best", "#e6550d")]
    for ax, key, label in ((axes[0], "decode_tps", "decode rate after the first token (tok/s)"),
                           (axes[1], "e2e_tps", "end-to-end tokens/s (n / wall)")):
        top = 0.0
        for j, (name, color) in enumerate(bars):
            xs, ys, tags = [], [], []
            for i, (w, s) in enumerate(summary.items()):
                c = {"specedge plain": "plain", "specedge best": s["best"]["specedge"],
                     "llama.cpp plain": "llama.cpp", "llama.cpp best": s["best"]["llama.cpp"]}[name]
                v = s["table"][s["reported_on"]].get(c) if c else None
                if v:
                    xs.append(i + (j - 1.5) * 0.2)
                    ys.append(v[key])
                    tags.append(c.replace("llama.cpp-", "") if "best" in name else "")
            ax.bar(xs, ys, 0.2, color=color, label=name)
            top = max([top, *ys])
            for x, y, t in zip(xs, ys, tags):   # the configuration each "best" bar is
                ax.text(x, y, t, rotation=90, ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(summary)), list(summary))
        ax.set(ylabel=label, ylim=(0, 1.6 * top or 1))
        ax.legend(fontsize=8, loc="upper left", ncol=2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, default=CACHE / "bundle-dv16k")
    ap.add_argument("--gguf", type=Path, default=CACHE / "gemma-3-270m-q4_k_m.gguf")
    ap.add_argument("--workloads", type=Path, default=HERE / "workloads" / "gemma3",
                    help="folder with editing/completion/nopay.jsonl (benchmarks/make_workloads.py --out)")
    ap.add_argument("--prompts", type=int, default=16, help="prompts per workload (half select, half report)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--ks", default="4,8", help="specedge's fixed draft lengths (the adaptive limit is the largest)")
    ap.add_argument("--no-sweep", action="store_true", help="llama.cpp plain only (no n-gram servers)")
    ap.add_argument("--llama-drafts", default=",".join(map(str, DRAFTS)), help="llama.cpp's n-gram draft lengths")
    ap.add_argument("--llama-lookups", default="default,4",
                    help="llama.cpp's n-gram lookup lengths (default: its own, 12 or 24 for ngram-mod)")
    ap.add_argument("--llama-bench", action="store_true", help="also record llama-bench's pp512/tg64")
    ap.add_argument("--http-check", action="store_true",
                    help="also time specedge's plain decoding through `spec-export serve` (config plain-http)")
    ap.add_argument("--compare-bundle", type=Path, metavar="DIR",
                    help="also time this bundle's plain decoding, interleaved (config plain-compare)")
    ap.add_argument("--name", default="gemma3-270m-vs-llamacpp-x86_64-2core")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--markdown", type=Path, metavar="JSON", help="print README's table from a results file, run nothing")
    a = ap.parse_args(argv)
    if a.markdown:
        return print(markdown(json.loads(a.markdown.read_text())))
    say = lambda line: print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)  # noqa: E731

    binary, why = find_binary()
    if binary is None:
        sys.exit(f"cannot run llama.cpp: {why}")
    ks = [int(k) for k in a.ks.split(",")]
    engine = Engine(a.bundle, threads=a.threads)
    eos = sorted(engine.eos)
    # A prompt longer than the bundle's context leaves room for the answer: BOS and its last tokens are kept (the
    # end is where the answer starts), the same ids on both sides.
    room = engine.max_length - a.max_new_tokens
    fit = lambda ids: ids if len(ids) <= room else ids[:1] + ids[len(ids) - room + 1:]  # noqa: E731
    prompts = {w: [fit(engine.encode(p)) for p in load_prompts([a.workloads / f"{w}.jsonl"])[: a.prompts]]
               for w in WORKLOADS}
    specs = () if a.no_sweep else sweep(tuple(int(d) for d in a.llama_drafts.split(",")),
                                        tuple(None if n == "default" else int(n) for n in a.llama_lookups.split(",")))
    configs: dict = ours(engine, ks)
    try:
        if a.http_check:
            configs["plain-http"] = ServedPlain(a.bundle, a.threads)
        if a.compare_bundle:
            other = Engine(a.compare_bundle, threads=a.threads)
            configs["plain-compare"] = Specedge(other, GenerationConfig(temperature=0.0, seed=0, speculative=False))
        say(f"starting llama-server x{1 + len(specs)} ({binary})")
        configs.update(llama(a.gguf, a.threads, eos, specs))
        say(f"warming up {len(configs)} configurations")
        warm = prompts[WORKLOADS[-1]][-1][:64]   # not the first measured prompt: plain-http would reuse its prefix
        for c in configs.values():
            c.generate(warm, 8)
        t0 = time.time()
        rows = measure(configs, prompts, a.max_new_tokens, a.runs, say)
        elapsed = time.time() - t0
    finally:
        for c in configs.values():
            c.close()
    summary = summarize(rows, list(WORKLOADS), list(configs))
    report = {
        "setup": {"bundle": str(a.bundle), "manifest_target": engine.manifest.target.precision,
                  "compare_bundle": str(a.compare_bundle) if a.compare_bundle else None,
                  "gguf": str(a.gguf), "llama_server": str(binary), "threads": a.threads,
                  "max_new_tokens": a.max_new_tokens, "runs": a.runs, "prompts_per_workload": a.prompts,
                  "context": engine.max_length, "ks": ks, "llama_sweep": [s.name for s in specs],
                  "workloads": str(a.workloads), "stop": "EOS or max_new_tokens on both sides",
                  "prompt_cache": "off on both", "machine": {"cpu": platform.processor() or platform.machine(),
                                                              "python": platform.python_version()},
                  "seconds": round(elapsed, 1)},
        "summary": summary, "partings": partings(rows), "requests": rows}
    if a.llama_bench:
        report["llama_bench"] = llama_bench(a.gguf, a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"{a.name}.json").write_text(json.dumps(report, indent=1))
    plot(summary, a.out / f"{a.name}.png",
         f"Gemma 3 270M, {a.threads} threads, {a.max_new_tokens} new tokens, {a.runs} run(s): specedge vs llama.cpp")
    for w, s in summary.items():
        r, t = s["ratios"], s["table"][s["reported_on"]]
        f = lambda x: f"{x:.2f}x" if x is not None else "-"  # noqa: E731
        say(f"{w} ({s['reported_on']} half): best specedge {s['best']['specedge']}, best llama.cpp "
            f"{s['best']['llama.cpp']}; plain decode {f(r['plain_decode'])}, best decode {f(r['best_decode'])}, "
            f"best e2e {f(r['best_e2e'])}, TTFT ratio {f(r['ttft_plain'])}")
        for c, v in t.items():
            if v:
                say(f"   {c:28} decode {v['decode_tps']:6.1f}  e2e {v['e2e_tps']:6.1f}  ttft {v['ttft_ms']:7.1f} ms"
                    f"  n {v['new_tokens']:.0f}" + (f"  acc {v['accepted']}/{v['drafted']}" if v["drafted"] else ""))
    say(f"wrote {a.out / (a.name + '.json')} and .png")


if __name__ == "__main__":
    main()
