"""bench / tune / smoke on a tiny bundle: the JSON contract, the decisions and the exit codes (no timing asserts)."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from specedge.runtime.errors import InvalidArgument
from specedge.runtime.manifest import load_manifest
from specedge.tools import bench
from specedge.tools.cli import main


@pytest.fixture()
def prompts(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text("\n".join(json.dumps({"prompt": t}) for t in ("def f(x):\n", "import os\n", "class A:\n    x = 1\n")))
    return p


def test_bench_json_contract_and_plot(bundles, prompts, tmp_path):
    out, png = tmp_path / "b.json", tmp_path / "b.png"
    r = CliRunner().invoke(main, ["bench", str(bundles("llama")), "--prompts", str(prompts), "--max-new-tokens", "12",
                                  "--k", "1,3", "--json", str(out), "--plot", str(png)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    names = [x["name"] for x in report["results"]]
    assert names == ["plain", "spec-k1", "spec-k3"]
    for x in report["results"]:
        for key in ("name", "tokens_per_s", "ttft_ms", "alpha", "mean_accepted_length", "speedup_vs_plain"):
            assert key in x
    assert all(report["outputs_identical"].values())
    assert set(report["verify_cost"]) == {"1", "2", "3", "4"} and report["c"] > 0
    assert report["results"][2]["predicted_speedup"] > 0
    assert png.stat().st_size > 10_000


def test_tau_formula():
    assert bench.tau(0.0, 4) == 1.0 and bench.tau(1.0, 4) == 5.0
    assert bench.tau(0.8, 4) == pytest.approx((1 - 0.8**5) / 0.2)


def test_prompt_files(tmp_path):
    t = tmp_path / "a.txt"
    t.write_text("def g():\n")
    assert bench.load_prompts([t]) == ["def g():\n"]
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"text": "x"}\n')
    with pytest.raises(InvalidArgument, match="b.jsonl:1"):
        bench.load_prompts([bad])


def test_tune_says_when_speculation_does_not_pay(bundles, prompts, tmp_path):
    import shutil

    b = tmp_path / "b"
    shutil.copytree(bundles("llama"), b)
    r = CliRunner().invoke(main, ["tune", str(b), "--prompts", str(prompts), "--max-new-tokens", "10"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    # a random-weight draft is never accepted: plain decoding must be recommended and become the default
    assert "speculation does not pay" in r.output and "acceptance" in r.output
    d = load_manifest(b, verify=True).defaults
    assert d["speculative"] is False and 1 <= d["k"] <= 8
    from specedge.runtime import Engine

    assert Engine(b).generate("def f(x):", max_new_tokens=5).stats.drafted == 0


def test_tune_suggests_a_reduced_draft_vocab(bundles):
    import dataclasses

    from specedge.tools.bench import draft_vocab_suggestion

    m = load_manifest(bundles("llama"))
    assert draft_vocab_suggestion(m) == ""                                    # a 512-token vocabulary
    big = dataclasses.replace(m, draft=dataclasses.replace(m.draft, vocab_size=128256))
    assert "re-export with --draft-vocab 16384" in draft_vocab_suggestion(big)
    done = dataclasses.replace(m, draft=dataclasses.replace(m.draft, vocab_size=128256, draft_vocab=16384))
    assert draft_vocab_suggestion(done) == ""


def test_smoke_budgets(bundles):
    b = str(bundles("llama"))
    ok = CliRunner().invoke(main, ["smoke", b, "--budget-ttft-ms", "100000", "--budget-tpot-ms", "100000",
                                   "--max-new-tokens", "8"])
    assert ok.exit_code == 0, ok.output
    fail = CliRunner().invoke(main, ["smoke", b, "--budget-tpot-ms", "0.000001", "--min-speedup", "50",
                                     "--max-new-tokens", "8"])
    assert fail.exit_code == 1
    assert "time per output token" in fail.output and "below the minimum 50x" in fail.output


def test_bad_bench_arguments_are_messages(bundles, prompts, tmp_path):
    b = str(bundles("llama"))
    r = CliRunner().invoke(main, ["bench", b, "--prompts", str(prompts), "--baselines", "plain,vllm"])
    assert r.exit_code == 2 and "unknown baseline(s) vllm" in r.output
    r = CliRunner().invoke(main, ["bench", b, "--prompts", str(prompts), "--k", "2,x"])
    assert r.exit_code == 2 and "comma-separated list of integers" in r.output
    r = CliRunner().invoke(main, ["bench", b, "--prompts", str(tmp_path / "nope.jsonl")])
    assert r.exit_code == 2 and "does not exist" in r.output
