"""The CLI, through click's CliRunner: exit codes, JSON contracts, messages."""
from __future__ import annotations

import json

from click.testing import CliRunner

from specedge.tools.cli import main


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_check_exit_codes(checkpoints):
    t, d = checkpoints("llama")
    r = run("check", "--target", t, "--draft", d)
    assert r.exit_code == 0 and "compatible" in r.output
    r = run("check", "--target", t, "--draft", checkpoints("gpt2")[1], "--json")
    assert r.exit_code == 1 and json.loads(r.output)["compatible"] is False


def test_export_inspect_generate(checkpoints, tmp_path):
    t, d = checkpoints("qwen2")
    out = tmp_path / "bundle"
    r = run("export", "--target", t, "--draft", d, "--out", out, "--max-length", 96, "--k", 3)
    assert r.exit_code == 0, r.output
    assert "parity vs PyTorch" in r.output
    r = run("inspect", out)
    assert r.exit_code == 0 and "file hashes verified" in r.output
    r = run("generate", out, "--prompt", "def f(x):", "--max-new-tokens", 12, "--json")
    assert r.exit_code == 0, r.output
    spec = json.loads(r.output)
    assert len(spec["token_ids"]) <= 12 and spec["stats"]["k"] == 3
    for key in ("drafted", "accepted", "alpha", "mean_accepted_length", "rounds", "tokens_per_s", "ttft_ms"):
        assert key in spec["stats"]
    plain = json.loads(run("generate", out, "--prompt", "def f(x):", "--max-new-tokens", 12, "--json",
                           "--no-speculation").output)
    assert plain["token_ids"] == spec["token_ids"] and plain["stats"]["drafted"] == 0
    r = run("export", "--target", t, "--draft", d, "--out", out)
    assert r.exit_code == 2 and "already exists: pass --force" in r.output


def test_generate_errors_are_messages(bundles, tmp_path):
    b = bundles("llama")
    bad = tmp_path / "p.txt"
    bad.write_bytes(b"def \xff\xfe(x):")
    r = run("generate", b, "--prompt-file", bad)
    assert r.exit_code == 2 and "not valid UTF-8" in r.output
    r = run("generate", b, "--prompt", "x", "--k", 0)
    assert r.exit_code == 2 and "'--k': 0 is not in the range 1<=x<=32" in r.output   # click's range check
    r = run("generate", b)
    assert r.exit_code == 2 and "--prompt" in r.output
    r = run("inspect", tmp_path)
    assert r.exit_code == 2 and "not a specedge bundle" in r.output


def test_check_self_speculation_and_windows(checkpoints):
    t = checkpoints("mistral-sw")[0]
    r = run("check", "--target", t, "--draft", t)                 # the target's own weights, int4 by default
    assert r.exit_code == 0 and "1/6.4 in bytes read per step (int4 draft, fp32 target)" in r.output
    assert "sliding windows 16, 16" in r.output
    r = run("check", "--target", t, "--draft", t, "--draft-precision", "fp32")
    assert r.exit_code == 1 and "the draft is not cheaper than the target" in r.output


def test_help_imports_no_heavy_module():
    """`spec-export --help` and every command's --help load neither torch, transformers, onnxruntime-genai, the
    exporters, the bench/tune/smoke tools nor the server: the heavy modules load inside the commands that use them."""
    import subprocess
    import sys

    code = """if True:
        import sys
        from specedge.tools.cli import main
        for args in [[], *[[name] for name in main.commands]]:
            try:
                main([*args, "--help"])
            except SystemExit:
                pass
        heavy = ("torch", "transformers", "onnxruntime_genai", "uvicorn", "starlette", "matplotlib",
                 "specedge.export", "specedge.tools.bench", "specedge.tools.tune", "specedge.tools.smoke",
                 "specedge.tools.serve")
        print(sorted(m for m in sys.modules if any(m == h or m.startswith(h + ".") for h in heavy)), file=sys.stderr)
    """
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip().splitlines()[-1] == "[]", r.stderr
    assert "Commands:" in r.stdout and "--baselines" in r.stdout


def test_help_examples_and_defaults():
    from specedge.export.distill_card import KL_WEIGHT

    gen = run("generate", "--help").output
    assert "--prompt $'import os\\n'" in gen and '"import os\\n"' not in gen   # bash's $'...' sends a newline
    assert f"Default: {KL_WEIGHT:g} (the recipe's KL_WEIGHT)" in run("distill", "--help").output


def test_generate_with_nothing_drafted_has_no_alpha(bundles):
    """A request whose rounds drafted nothing (here one new token: no room to draft) reports alpha as null / -."""
    b = bundles("llama")
    r = run("generate", b, "--prompt", "def f(x):", "--max-new-tokens", 1, "--drafter", "lookup", "--json")
    assert r.exit_code == 0, r.output
    stats = json.loads(r.output)["stats"]
    assert stats["drafted"] == 0 and stats["alpha"] is None
    r = run("generate", b, "--prompt", "def f(x):", "--max-new-tokens", 1, "--drafter", "lookup")
    assert r.exit_code == 0 and "alpha=- " in r.output, r.output
