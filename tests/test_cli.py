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
