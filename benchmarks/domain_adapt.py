"""Domain adaptation as a user would do it (issue 13): distill a copy of the demo draft for a few minutes on half of
one third-party package's files, then compare the runtime's alpha of the shipped and the adapted draft on completion
prompts cut from the package's other half. Nothing trained here ships.

    python benchmarks/domain_adapt.py --package pydantic --minutes 10 \
        --json benchmarks/results/domain-adapt-pydantic-x86_64-2core.json

Split: each .py file of the package goes to the training half or the measured half by the parity of the sha256 of its
path (deterministic, no file in both). Prompts: up to 60 lines before a random non-blank line (<= 700 tokens), at
most 3 per file, 24 in all (seeded). alpha = accepted / tested of the model drafter at fixed k (the runtime's
estimator, `Stats.alpha`), greedy, 64 new tokens; both bundles share the same fp32 target, so the target's output,
and what each draft is scored against, is identical.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as md
import json
import platform
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "demo"
SPEC_EXPORT = str(Path(sys.executable).with_name("spec-export"))
N_PROMPTS, PER_FILE, MAX_TOKENS, NEW = 24, 3, 700, 64


def split(package: str) -> tuple[list[Path], list[Path]]:
    dist = md.distribution(package)
    files = sorted(Path(dist.locate_file(f)) for f in dist.files or [] if str(f).endswith(".py"))
    files = [f for f in files if f.is_file() and f.stat().st_size > 0]
    half = [int(hashlib.sha256(str(f.relative_to(dist.locate_file(""))).encode()).hexdigest(), 16) % 2 for f in files]
    return [f for f, h in zip(files, half) if h == 0], [f for f, h in zip(files, half) if h == 1]


def prompts(files: list[Path], tokenizer, seed: int) -> list[dict]:
    rng, out = random.Random(seed), []
    for f in rng.sample(files, len(files)):
        lines = f.read_text(encoding="utf-8").splitlines(True)
        for _ in range(PER_FILE if len(lines) >= 80 else 0):
            cut = rng.randrange(30, len(lines) - 10)
            start = max(0, cut - 60)
            while start < cut and len(tokenizer.encode("".join(lines[start:cut])).ids) > MAX_TOKENS:
                start += 5
            if lines[cut].strip() and cut - start >= 10:
                out.append({"prompt": "".join(lines[start:cut]), "source": f"{f.name}:{start + 1}-{cut}"})
        if len(out) >= N_PROMPTS:
            return out[:N_PROMPTS]
    return out


def run(*cmd: str) -> None:
    print("$", " ".join(cmd[:8]), "..." if len(cmd) > 8 else "", flush=True)
    subprocess.run(cmd, check=True)


def alpha(bundle: Path, items: list[dict], k: int) -> dict:
    from specedge.runtime import Engine, GenerationConfig

    engine = Engine(bundle)
    cfg = GenerationConfig(max_new_tokens=NEW, k=k, drafter="model", adaptive=False)
    accepted = tested = rounds = new = 0
    for it in items:
        s = engine.generate(it["prompt"], cfg).stats
        accepted, tested, rounds, new = accepted + s.accepted, tested + s.tested, rounds + s.rounds, new + s.new_tokens
    return {"alpha": accepted / tested, "tau": new / rounds, "accepted": accepted, "tested": tested}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--package", default="pydantic")
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--k", default="2,4")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kl-weight", default="1.0")
    ap.add_argument("--work", type=Path, default=Path("/tmp/specedge-domain-adapt"))
    ap.add_argument("--json", type=Path, required=True)
    a = ap.parse_args()
    from tokenizers import Tokenizer

    train, held = split(a.package)
    corpus = a.work / "corpus"
    shutil.rmtree(corpus, ignore_errors=True)
    corpus.mkdir(parents=True)
    for i, f in enumerate(train):   # one folder of the training half (names kept unique)
        shutil.copy(f, corpus / f"{i:04d}_{f.name}")
    items = prompts(held, Tokenizer.from_file(str(DEMO / "target" / "tokenizer.json")), a.seed)
    print(f"{a.package}: {len(train)} files to train on, {len(held)} held out, {len(items)} prompts")

    adapted = a.work / "draft-adapted"
    t0 = time.time()
    run(SPEC_EXPORT, "distill", "--target", str(DEMO / "target"), "--draft", str(DEMO / "draft"), "--corpus",
        str(corpus), "--minutes", str(a.minutes), "--out", str(adapted), "--force", "--seed", str(a.seed), "--kl-weight", a.kl_weight)
    distill_s = time.time() - t0
    card = json.loads((adapted / "distill_card.json").read_text())
    bundles = {"shipped": a.work / "bundle-shipped", "adapted": a.work / "bundle-adapted"}
    for name, draft in (("shipped", DEMO / "draft"), ("adapted", adapted)):
        run(SPEC_EXPORT, "export", "--target", str(DEMO / "target"), "--draft", str(draft), "--out",
            str(bundles[name]), "--force")
    ks = [int(x) for x in a.k.split(",")]
    rows = {name: {k: alpha(b, items, k) for k in ks} for name, b in bundles.items()}
    for k in ks:
        print(f"k={k}: alpha shipped {rows['shipped'][k]['alpha']:.3f} -> adapted {rows['adapted'][k]['alpha']:.3f}")
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps({
        "package": a.package, "kl_weight": float(a.kl_weight), "version": md.version(a.package), "train_files": len(train), "held_files": len(held),
        "prompts": items, "minutes": a.minutes, "distill_wall_s": round(distill_s, 1),
        "tokens_seen": card["tokens_seen"], "train_tokens_per_s": card["tokens_per_s"],
        "distill_card_alpha": {"before": card["before"]["alpha"], "after": card["after"]["alpha"]},
        "machine": f"{platform.machine()} {platform.processor()} {__import__('os').cpu_count()} cores",
        "runtime_alpha": rows}, indent=1, default=str))


if __name__ == "__main__":
    main()
