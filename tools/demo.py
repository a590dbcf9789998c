"""The quickstart's main job: export the built-in demo pair (cached) and autocomplete a real code prompt, printing
plain vs speculative decoding side by side.

Until the trained demo pair ships (models/README.md), the pair is a tiny random-weight Llama target and draft with a
BPE tokenizer trained on this machine's Python standard library: it shows the whole pipeline and its exactness, but
random weights give an acceptance near zero, so it cannot show a speedup.
"""
from __future__ import annotations

from pathlib import Path

from ..runtime.errors import SpecError

PROMPT = 'def read_config(path):\n    """Read a JSON config file and return it as a dict."""\n    with open(path) as f:\n'


def ensure_bundle(workdir: Path, say=print) -> Path:
    """Build the demo checkpoints and export them once; reuse the bundle while it verifies."""
    from ..runtime.manifest import load_manifest

    bundle = workdir / "bundle"
    try:
        load_manifest(bundle, verify=True)
        return bundle
    except SpecError:
        pass
    from ..export.bundle import ExportOptions, export_bundle
    from ..models import tiny

    say(f"building the demo pair in {workdir} (once)...")
    tok = tiny.train_tokenizer(workdir / "tokenizer")
    target = tiny.build_tiny(workdir / "target", "llama", tok, layers=4, hidden=256, heads=8, kv_heads=4, inter=768,
                             max_pos=1024)
    draft = tiny.build_tiny(workdir / "draft", "llama", tok, seed=1, layers=1, hidden=64, heads=4, kv_heads=2,
                            inter=128, max_pos=1024)
    export_bundle(ExportOptions(target=target, draft=draft, out=bundle, max_length=1024, force=True),
                  progress=lambda i, n, text: say(f"  [{i}/{n}] {text}"))
    return bundle
