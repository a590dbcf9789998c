"""The GPU evidence for the CUDA path, on random-weight models of realistic shapes (timings only: random weights
prove nothing about acceptance). Needs onnxruntime-gpu and a CUDA GPU; torch is used for the bandwidth probe only.

Per shape (Llama-3.2-1B, 3B targets; a shallow ~100M draft): export with `--device cuda`, then measure with the
runtime's own KVModel, with and without CUDA graphs,
  - t(n)/t(1): a verify of n = 2..9 tokens against a 1-token decode, on `--past` cached tokens;
  - c = t_draft(1) / t_target(1) for the fp16 and the int4 draft;
  - plain decode tokens/s against the bandwidth floor (fp16 weight bytes / measured device-to-device bandwidth);
  - the speedup the timing model predicts, tau(alpha, k) / (k c + t(k+1)/t(1)), for the alpha given with --alpha
    (measure it on a trained pair: the demo pair gives 0.67 through the runtime on held-out code), and that
    speculative tokens/s as a multiple of the bandwidth floor.
Writes JSON and a PNG. Usage (on the GPU machine):
    python benchmarks/gpu_bench.py --out benchmarks/results/gpu-h100 [--shapes 1b,3b] [--alpha 0.67]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

SHAPES = {  # Llama 3.2 (vocabulary 128256, GQA with 8 KV heads)
    "1b": dict(layers=16, hidden=2048, heads=32, kv_heads=8, inter=8192),
    "3b": dict(layers=28, hidden=3072, heads=24, kv_heads=8, inter=8192),
}
DRAFT = dict(layers=2, hidden=768, heads=12, kv_heads=4, inter=3072)  # shallow: a GPU pays per layer launched
VOCAB = 128256


def checkpoint(out: Path, tok: Path, shape: dict) -> Path:
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from specedge.models.tiny import tiny_config

    cfg = tiny_config("llama", VOCAB, max_pos=4096, **shape)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float16)  # default init: finite fp16 activations
    model.save_pretrained(out)
    for f in tok.iterdir():
        shutil.copy(f, out / f.name)
    return out


def bandwidth_gbs() -> float:
    import torch

    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        b.copy_(a)
    torch.cuda.synchronize()
    return 2 * 20 * a.numel() / (time.perf_counter() - t) / 1e9  # read + write


def steps(bundle: Path, role: str, sizes: list[int], past: int, cuda_graph: bool) -> dict[int, float]:
    from specedge.runtime.manifest import load_manifest
    from specedge.runtime.kv import open_model
    from specedge.tools.bench import step_costs

    spec = getattr(load_manifest(bundle), role)
    model = open_model(bundle, spec, "cuda", cuda_graph=cuda_graph)
    step_costs(model, sizes, past, repeats=3)  # capture the graphs first
    return step_costs(model, sizes, past, repeats=50)


def main() -> None:
    from specedge.export.bundle import ExportOptions, export_bundle
    from specedge.models.tiny import train_tokenizer
    from specedge.tools.bench import tau

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shapes", default="1b,3b")
    ap.add_argument("--alpha", type=float, default=0.67)
    ap.add_argument("--past", type=int, default=512)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    tok = train_tokenizer(work / "tok")
    draft = checkpoint(work / "draft", tok, DRAFT)
    bw = bandwidth_gbs()
    report = {"alpha": a.alpha, "past": a.past, "bandwidth_GBs": bw, "shapes": {}}
    for name in a.shapes.split(","):
        target = checkpoint(work / name, tok, SHAPES[name])
        weight_bytes = sum(p.stat().st_size for p in target.glob("*.safetensors"))
        r = report["shapes"][name] = {"weight_bytes": weight_bytes, "floor_ms": weight_bytes / bw / 1e6}
        for dp in ("fp16", "int4"):
            b = work / f"bundle-{name}-{dp}"
            export_bundle(ExportOptions(target=target, draft=draft, out=b, device="cuda", draft_precision=dp,
                                        max_length=2048))
            for g in (False, True):
                key = "graph" if g else "no_graph"
                if dp == "fp16":
                    r[f"target_ms_{key}"] = t = steps(b, "target", list(range(1, 10)), a.past, g)
                    r[f"verify_cost_{key}"] = {n: t[n] / t[1] for n in t}
                r[f"draft_{dp}_ms_{key}"] = steps(b, "draft", [1, 2], a.past, g)
        t = r["target_ms_graph"]
        r["plain_tokens_per_s"] = 1e3 / t[1]
        r["plain_fraction_of_floor"] = r["floor_ms"] / t[1]
        for dp in ("fp16", "int4"):
            td = r[f"draft_{dp}_ms_graph"][1]
            r[f"c_{dp}"] = td / t[1]
            pred = {k: tau(a.alpha, k) * t[1] / (k * td + t[k + 1]) for k in range(1, 9)}
            best = max(pred, key=pred.get)
            r[f"predicted_{dp}"] = {"by_k": pred, "k": best, "speedup": pred[best],
                                    "spec_multiple_of_floor": pred[best] * r["plain_fraction_of_floor"]}
        print(json.dumps({name: {k: v for k, v in r.items() if not isinstance(v, dict)}}, indent=1), flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{a.out}.json").write_text(json.dumps(report, indent=1))
    plot(report, Path(f"{a.out}.png"))


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in report["shapes"].items():
        for key, style in (("graph", "-o"), ("no_graph", "--x")):
            v = r[f"verify_cost_{key}"]
            ax[0].plot([int(n) for n in v], list(v.values()), style, label=f"{name} {key.replace('_', ' ')}")
        p = r["predicted_fp16"]["by_k"]
        ax[1].plot([int(k) for k in p], list(p.values()), "-o", label=f"{name}, fp16 draft, c={r['c_fp16']:.2f}")
    ax[0].set(xlabel="tokens per step n", ylabel="t(n) / t(1)", title="verification cost")
    ax[1].axhline(1, color="gray", lw=0.8)
    ax[1].set(xlabel="k", ylabel="predicted speedup", title=f"timing model at alpha={report['alpha']}")
    for x in ax:
        x.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
