"""Draft step cost vs a reduced draft vocabulary N, on the CPU (timings only: random weights).

Shape: a 2-layer, 512-wide Llama draft with Llama 3's 128,256-token vocabulary and a tied head, exported int4 (the
default draft precision) and fp32 by the model builder as `spec-export export` does. The full graph is built once; each N is a copy whose head keeps N rows
(draft_vocab.reduce_head, the same surgery `--draft-vocab` does; which rows does not change the cost). Per N:
ms of one decode step (n = 1, on `--past` cached tokens), reading the argmax (greedy) and the full-width logits
(sampling), on one thread as the runtime's draft session runs; configurations interleaved round by round so machine
noise hits all of them alike. Reported: the minimum over rounds (the step's own cost: on a shared machine other
processes only ever add to it) and the median. The reduced graphs map their N logits back to the full width with
GatherElements on every step (the runtime binds the full-width logits even for greedy steps), so that cost is in.

    python benchmarks/draft_vocab.py --out benchmarks/results/draft-vocab-x86_64-2core-run1 --rounds 200
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

VOCAB = 128256
DRAFT = dict(layers=2, hidden=512, heads=8, kv_heads=4, inter=2048)
SIZES = {"int4": (VOCAB, 65536, 32768, 16384, 8192, 4096, 2048), "fp32": (VOCAB, 32768, 16384, 4096)}


def checkpoint(out: Path, tok: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    from specedge.models.tiny import tiny_config

    cfg = tiny_config("llama", VOCAB, max_pos=4096, tie_word_embeddings=True, **DRAFT)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(out)
    for f in tok.iterdir():
        shutil.copy(f, out / f.name)
    return out


def main() -> None:
    from rich.progress import track

    from specedge.export import graphs
    from specedge.export.draft_vocab import reduce_head
    from specedge.models.tiny import train_tokenizer
    from specedge.runtime.manifest import ModelSpec
    from specedge.runtime.kv import open_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--past", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="draft-vocab-"))
    try:
        ckpt = checkpoint(work / "hf", train_tokenizer(work / "tok"))
        models = {}
        for precision, sizes in SIZES.items():
            base = work / f"base-{precision}"
            base.mkdir()
            facts = graphs._builder(ckpt, base, precision, "cpu", work / "export.log")
            for n in sizes:
                d = work / f"{precision}-{n}"
                shutil.copytree(base, d)
                if n < VOCAB:
                    reduce_head(d / "model.onnx", np.arange(n))
                graphs.add_argmax(d / "model.onnx")
                spec = ModelSpec(role="draft", architecture="LlamaForCausalLM", model_type="llama", parameters=0,
                                 precision=precision, provider="cpu", graph="model.onnx", max_length=a.past + 8,
                                 rewindable=True, **facts, **graphs.graph_io(d / "model.onnx"))
                m = models[precision, n] = open_model(d, spec, threads=a.threads)
                m.forward(list(range(3, 3 + a.past)), want=None)
            shutil.rmtree(base)
        times = {key: {"argmax": [], "logits": []} for key in models}
        for _ in track(range(a.rounds), description="timing"):
            for key, m in models.items():        # interleaved: each round times every configuration once per readout
                for want in ("argmax", "logits"):
                    m.rewind(a.past)
                    t = time.perf_counter()
                    m.forward([5], want=want)
                    times[key][want].append(1e3 * (time.perf_counter() - t))
        stat = lambda f: {p: {str(n): {w: float(f(v)) for w, v in times[p, n].items()} for n in SIZES[p]}  # noqa: E731
                          for p in SIZES}
        ms, median = stat(np.min), stat(np.median)
        report = {"utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "cpus": os.cpu_count(),
                  "load_average": os.getloadavg(), "threads": a.threads, "vocab": VOCAB, "draft": DRAFT,
                  "past": a.past, "rounds": a.rounds, "ms": ms, "median_ms": median,
                  "speedup_vs_full": {p: {n: {w: ms[p][str(VOCAB)][w] / v for w, v in r.items()}
                                          for n, r in ms[p].items()} for p in ms}}
        a.out.parent.mkdir(parents=True, exist_ok=True)
        Path(f"{a.out}.json").write_text(json.dumps(report, indent=1))
        plot(report, Path(f"{a.out}.png"))
        print(json.dumps(report["speedup_vs_full"], indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for precision, style in (("int4", "-o"), ("fp32", "--s")):
        r = report["ms"][precision]
        ns = sorted(r, key=int)
        ax.plot([int(n) for n in ns], [r[n]["argmax"] for n in ns], style,
                label=f"{precision} draft ({r[str(report['vocab'])]['argmax'] / r[str(16384)]['argmax']:.1f}x "
                      f"faster at N = 16k)")
    ax.set(xscale="log", yscale="log", xlabel="draft vocabulary N (tokens in the LM head)",
           ylabel="ms per draft step (min over rounds)",
           title=f"2-layer 512-wide draft, {report['vocab']:,}-token vocabulary, CPU, 1 thread")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
