"""Distill the demo draft on a slice of the standard library for a few minutes; alpha before/after on third-party code.

    python benchmarks/distill_cpu.py --minutes 5 --json benchmarks/results/distill-cpu.json

Training throughput (tokens/s) of `spec-export distill` on this machine for the demo pair, and alpha (the runtime's
greedy estimator, `distill_models.greedy_alpha`, k = 1..8) of the shipped draft and the distilled one on code nobody
trained on: the .py files of installed third-party packages (rich, click). The same windows score both drafts.
"""
from __future__ import annotations

import argparse
import importlib
import json
import platform
import sysconfig
import time
from pathlib import Path

import numpy as np

from specedge.export.distill import DistillOptions, distill
from specedge.export.distill_corpus import encode
from specedge.export.distill_models import eval_windows, greedy_alpha, load_model
from specedge.models.train_demo import HELD_OUT

DEMO = Path(__file__).resolve().parents[1] / "models" / "demo"


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=5)
    ap.add_argument("--files", type=int, default=300, help="How many standard-library modules to train on.")
    ap.add_argument("--packages", default="rich,click", help="Third-party packages to measure alpha on.")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--work", type=Path, default=Path("/tmp/specedge-distill-bench"))
    ap.add_argument("--json", type=Path, required=True)
    a = ap.parse_args()

    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in sorted(root.glob("*.py")) if not any(p.name.startswith(h) for h in HELD_OUT)][: a.files]
    out = a.work / "draft"
    t0 = time.time()
    card = distill(DistillOptions(target=DEMO / "target", draft=DEMO / "draft", out=out, corpus=tuple(files),
                                  minutes=a.minutes, device=a.device, batch=a.batch, force=True))
    wall = time.time() - t0

    device = torch.device(a.device)
    target = load_model(DEMO / "target", torch).to(device).eval()
    drafts = {"shipped": load_model(DEMO / "draft", torch).to(device).eval(),
              "distilled": load_model(out, torch).to(device).eval()}
    third_party = {}
    for name in a.packages.split(","):
        pkg = Path(importlib.import_module(name).__file__).parent
        texts = tuple(p.read_text(encoding="utf-8") for p in sorted(pkg.rglob("*.py")))
        ids = encode(DEMO / "target", texts, eos=0)
        windows, prompt = eval_windows(target, ids, device, 2048)
        third_party[name] = {"files": len(texts), "tokens": int(len(ids)),
                             **{d: greedy_alpha(target, m, windows, prompt) for d, m in drafts.items()}}
        print(name, {d: round(third_party[name][d]["alpha"][4], 3) for d in drafts})

    report = {"command": f"python benchmarks/distill_cpu.py --minutes {a.minutes} --files {a.files} --packages "
                         f"{a.packages} --device {a.device} --batch {a.batch} --json {a.json}",
              "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                          "torch": torch.__version__},
              "train": {k: card[k] for k in ("steps", "tokens_seen", "train_seconds", "tokens_per_s", "device")},
              "wall_seconds": round(wall, 1), "corpus": card["corpus"],
              "held_out_stdlib": {"before": card["before"], "after": card["after"]},
              "third_party": third_party}
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(report, indent=1))
    ks = range(1, 9)
    print(f"{card['steps']} steps, {card['tokens_seen']:,} tokens, {card['tokens_per_s']:.0f} tokens/s")
    for name, r in third_party.items():
        for d in drafts:
            print(f"{name:6} {d:9} " + " ".join(f"{r[d]['alpha'][k]:.3f}" for k in ks))
    print(np.round([card["before"]["alpha"][k] for k in ks], 3), np.round([card["after"]["alpha"][k] for k in ks], 3))


if __name__ == "__main__":
    main()
