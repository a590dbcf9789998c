"""The quickstart's main job: export the built-in demo pair (cached) and autocomplete a real code prompt, printing
plain vs speculative decoding side by side.

The demo pair (models/demo, see models/README.md) is a Llama target and a distilled ~1/18-size Llama draft trained
on the CPython standard library. Where it is missing (a trimmed install), a tiny random-weight pair is built instead:
that shows the pipeline and its exactness, but random weights give alpha ~ 0 and no speedup.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from ..runtime.errors import SpecError

PROMPT = 'def read_config(path):\n    """Read a JSON config file and return it as a dict."""\n    with open(path) as f:\n'
DEMO = Path(__file__).resolve().parent.parent / "models" / "demo"   # the repository layout (editable installs)
if not DEMO.is_dir():
    from .. import models as _models

    DEMO = Path(_models.__file__).resolve().parent / "demo"           # an installed wheel ships it as package data


def _fingerprint(*dirs: Path) -> str:
    """Hash of the source checkpoints: the bundle is rebuilt when they change (stale), not only when missing."""
    h = hashlib.sha256()
    for d in dirs:
        for f in sorted(d.iterdir()):
            if f.is_file():
                h.update(f.name.encode())
                h.update(f.read_bytes())
    return h.hexdigest()


def ensure_bundle(workdir: Path, say=print) -> Path:
    """Export the demo pair once; reuse the bundle while it verifies and its sources are unchanged."""
    from ..export.bundle import ExportOptions, export_bundle
    from ..runtime.manifest import load_manifest

    bundle, stamp = workdir / "bundle", workdir / "sources.sha256"
    trained = (DEMO / "target" / "config.json").is_file() and (DEMO / "draft" / "config.json").is_file()
    if trained:
        target, draft, max_length = DEMO / "target", DEMO / "draft", 1024
        fp = _fingerprint(target, draft)
        try:
            if stamp.read_text() == fp:
                load_manifest(bundle, verify=True)
                return bundle
        except (OSError, SpecError):
            pass
        say(f"exporting the demo pair from {DEMO} into {bundle} (once)...")
    else:
        try:
            load_manifest(bundle, verify=True)
            return bundle
        except SpecError:
            pass
        from ..models import tiny

        say(f"no trained demo pair in {DEMO}: building a tiny random-weight pair in {workdir} (once)...")
        tok = tiny.train_tokenizer(workdir / "tokenizer")
        target = tiny.build_tiny(workdir / "target", "llama", tok, layers=4, hidden=256, heads=8, kv_heads=4,
                                 inter=768, max_pos=1024)
        draft = tiny.build_tiny(workdir / "draft", "llama", tok, seed=1, layers=1, hidden=64, heads=4, kv_heads=2,
                                inter=128, max_pos=1024)
        max_length, fp = 1024, ""
    export_bundle(ExportOptions(target=target, draft=draft, out=bundle, max_length=max_length, force=True),
                  progress=lambda i, n, text: say(f"  [{i}/{n}] {text}"), log=lambda text: say(f"  {text}"))
    workdir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(fp)
    return bundle
