"""Tiny random-weight checkpoints and bundles, built once per session, offline. Random weights prove exactness
(greedy equality, rollback, distributions), never acceptance or speed."""
from __future__ import annotations

from pathlib import Path

import pytest

from specedge.models import tiny

DRAFT_SHAPE = dict(layers=1, hidden=32, heads=2, kv_heads=1, inter=64)


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory) -> Path:
    return tiny.train_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory, tok_dir):
    """checkpoints(arch) -> (target_dir, draft_dir), built on first use."""
    cache: dict[str, tuple[Path, Path]] = {}

    def get(arch: str) -> tuple[Path, Path]:
        if arch not in cache:
            root = tmp_path_factory.mktemp(arch)
            cache[arch] = (tiny.build_tiny(root / "target", arch, tok_dir),
                           tiny.build_tiny(root / "draft", arch, tok_dir, seed=1, **DRAFT_SHAPE))
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def bundles(tmp_path_factory, checkpoints):
    """bundles(arch, **export options) -> bundle dir, exported on first use."""
    from specedge.export.bundle import ExportOptions, export_bundle

    cache: dict[tuple, Path] = {}

    def get(arch: str, **opts) -> Path:
        if opts.get("device", "cpu") == "cpu":  # tests compare with transformers: fp32 unless they ask otherwise
            opts = {"target_precision": "fp32", **opts}
        key = (arch, *sorted(opts.items()))
        if key not in cache:
            target, draft = checkpoints(arch)
            out = tmp_path_factory.mktemp("bundle") / arch
            export_bundle(ExportOptions(target=target, draft=draft, out=out, max_length=128, **opts))
            cache[key] = out
        return cache[key]

    return get


def encodable(text: str) -> bool:
    """Whether UTF-8 can encode `text` (a lone surrogate cannot): the tests' own oracle for the text checks."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False
