"""Draft step cost vs a reduced draft vocabulary N, on the CPU (timings only: random weights).

Shape: a 2-layer, 512-wide Llama draft with Llama 3's 128,256-token vocabulary and a tied head, exported int4 by the
model builder as `spec-export export` does. The full graph is built once; each N is a copy whose head keeps N rows
(draft_vocab.reduce_head, the same surgery `--draft-vocab` does; which rows does not change the cost). Per N:
median ms of one decode step (n = 1, on `--past` cached tokens), reading the argmax (greedy) and the full-width
logits (sampling); configurations interleaved round by round so machine noise hits all of them alike.

    python benchmarks/draft_vocab.py --out benchmarks/results/draft-vocab-x86_64-2core
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

VOCAB = 128256
DRAFT = dict(layers=2, hidden=512, heads=8, kv_heads=4, inter=2048)
SIZES = (VOCAB, 65536, 32768, 16384, 8192, 4096, 2048)


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
    from specedge.runtime.model import KVModel, make_session

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--past", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="draft-vocab-"))
    try:
        ckpt = checkpoint(work / "hf", train_tokenizer(work / "tok"))
        base = work / "base"
        base.mkdir()
        facts = graphs._builder(ckpt, base, "int4", "cpu", work / "export.log")
        models = {}
        for n in SIZES:
            d = work / f"n{n}"
            shutil.copytree(base, d)
            if n < VOCAB:
                reduce_head(d / "model.onnx", np.arange(n))
            graphs.add_argmax(d / "model.onnx")
            spec = ModelSpec(role="draft", architecture="LlamaForCausalLM", model_type="llama", parameters=0,
                             precision="int4", provider="cpu", graph="model.onnx", max_length=a.past + 8,
                             rewindable=True, **facts, **graphs._graph_io(d / "model.onnx"))
            m = models[n] = KVModel(spec, make_session(str(d / "model.onnx"), threads=a.threads))
            m.forward(list(range(3, 3 + a.past)), want=None)
        times = {n: {"argmax": [], "logits": []} for n in SIZES}
        for _ in track(range(a.rounds), description="timing"):
            for n, m in models.items():          # interleaved: each round times every N once per readout
                for want in ("argmax", "logits"):
                    m.rewind(a.past)
                    t = time.perf_counter()
                    m.forward([5], want=want)
                    times[n][want].append(1e3 * (time.perf_counter() - t))
        ms = {n: {w: float(np.median(v)) for w, v in t.items()} for n, t in times.items()}
        report = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "vocab": VOCAB,
                  "draft": DRAFT, "precision": "int4", "past": a.past, "rounds": a.rounds, "ms": ms,
                  "speedup_vs_full": {n: {w: ms[VOCAB][w] / ms[n][w] for w in ms[n]} for n in SIZES}}
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

    ns = sorted(int(n) for n in report["ms"])
    fig, ax = plt.subplots(figsize=(6, 4))
    for want, style in (("argmax", "-o"), ("logits", "--x")):
        ax.plot(ns, [report["ms"][n][want] for n in ns], style, label=f"decode step, reads {want}")
    ax.set(xscale="log", xlabel="draft vocabulary N (tokens in the LM head)", ylabel="ms per draft step",
           title=f"2-layer 512-wide int4 draft, {report['vocab']:,}-token vocabulary, CPU")
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
