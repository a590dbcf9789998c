"""Acceptance vs a reduced draft vocabulary on the trained demo pair (8k vocabulary), greedy, k = 4.

Exports the demo pair with the full draft vocabulary and with --draft-vocab N for each N, the tokens counted on the
standard library minus the files the held-out prompts come from (benchmarks/heldout.jsonl), then generates every
held-out prompt with every bundle, interleaved prompt by prompt, and reports alpha (accepted / tested) and tau.
Greedy output must be identical across bundles (exactness); the script fails otherwise.

    python benchmarks/draft_vocab_alpha.py --out benchmarks/results/draft-vocab-alpha-demo --sizes 4096,2048,1024
"""
from __future__ import annotations

import argparse
import json
import shutil
import sysconfig
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def corpus(prompts: list[str], out: Path) -> Path:
    """The stdlib's *.py files, without any file a held-out prompt was cut from."""
    out.mkdir(parents=True)
    heads = [p.strip().splitlines()[0] for p in prompts if p.strip()]
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = f.read_text(encoding="utf-8", errors="replace")
        if not any(h in text for h in heads):
            (out / f.name).write_text(text)
    return out


def main() -> None:
    from rich.progress import track

    from specedge.export.bundle import ExportOptions, export_bundle
    from specedge.runtime import Engine
    from specedge.tools.demo import DEMO

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--sizes", default="4096,2048,1024")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--k", type=int, default=4)
    a = ap.parse_args()
    prompts = [json.loads(line)["prompt"] for line in (HERE / "heldout.jsonl").read_text().splitlines() if line]
    work = Path(tempfile.mkdtemp(prefix="dv-alpha-"))
    try:
        text = corpus(prompts, work / "corpus")
        sizes = [0] + [int(n) for n in a.sizes.split(",")]
        engines = {}
        for n in sizes:
            b = work / f"bundle-{n}"
            export_bundle(ExportOptions(target=DEMO / "target", draft=DEMO / "draft", out=b, max_length=1024,
                                        draft_vocab=n, draft_vocab_corpus=text if n else None))
            engines[n] = Engine(b)
        totals = {n: {"accepted": 0, "tested": 0, "rounds": 0, "tokens": 0} for n in sizes}
        for p in track(prompts, description="generating"):
            outputs = {}
            for n, e in engines.items():     # interleaved: every bundle on this prompt before the next prompt
                r = e.generate(p, max_new_tokens=a.max_new_tokens, k=a.k)
                outputs[n] = r.token_ids
                t = totals[n]
                t["accepted"] += r.stats.accepted
                t["tested"] += r.stats.tested
                t["rounds"] += r.stats.rounds
                t["tokens"] += len(r.token_ids)
            assert all(o == outputs[0] for o in outputs.values()), "greedy output changed with the draft vocabulary"
        report = {"pair": "demo (models/demo)", "vocab": engines[0].manifest.draft.vocab_size, "k": a.k,
                  "prompts": len(prompts), "max_new_tokens": a.max_new_tokens,
                  "corpus": "CPython stdlib *.py minus the held-out prompts' files",
                  "by_N": {str(n or "full"): {"alpha": t["accepted"] / t["tested"], "tau": t["tokens"] / t["rounds"]}
                           for n, t in totals.items()}}
        a.out.parent.mkdir(parents=True, exist_ok=True)
        Path(f"{a.out}.json").write_text(json.dumps(report, indent=1))
        print(json.dumps(report["by_N"], indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
