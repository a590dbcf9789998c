"""bench / tune / smoke on a tiny bundle: the JSON contract, the decisions and the exit codes (no timing asserts)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from specedge.runtime.errors import InvalidArgument, SpecError
from specedge.runtime.manifest import load_manifest
from specedge.runtime.stats import expected_tau
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
    assert names == ["plain", "model-k1", "model-k3", "lookup-k1", "lookup-k3", "hybrid-k1", "hybrid-k3",
                     "adaptive-model", "adaptive-hybrid"]           # the default: every drafter of ours
    for x in report["results"]:
        for key in ("name", "tokens_per_s", "ttft_ms", "alpha", "mean_accepted_length", "speedup_vs_plain"):
            assert key in x
    assert all(report["outputs_identical"].values())
    assert set(report["verify_cost"]) == {"1", "2", "3", "4"} and report["c"] > 0
    assert report["results"][2]["predicted_speedup"] > 0
    assert png.stat().st_size > 10_000


def test_tau_formula():
    assert expected_tau(0.0, 4) == 1.0 and expected_tau(1.0, 4) == 5.0
    assert expected_tau(0.8, 4) == pytest.approx((1 - 0.8**5) / 0.2)


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
    r = CliRunner().invoke(main, ["tune", str(b), "--prompts", str(prompts), "--max-new-tokens", "10",
                                  "--drafters", "spec"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert r.output.count("warning: --drafters name 'spec' is deprecated: use 'model'") == 1   # bench's old name
    # a random-weight draft is never accepted: plain decoding must be recommended and become the default
    assert "speculation does not pay" in r.output and "acceptance" in r.output
    d = load_manifest(b, verify=True).defaults
    assert d["speculative"] is False and 1 <= d["k"] <= 8
    from specedge.runtime import Engine

    assert Engine(b).generate("def f(x):", max_new_tokens=5).stats.drafted == 0


def test_tune_suggests_a_reduced_draft_vocab(bundles):
    import dataclasses

    from specedge.tools.tune import draft_vocab_suggestion

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


# -- defect 2: partings from plain decoding are classified, near-ties do not fail ----------------------------------
@pytest.fixture(scope="module")
def tied(checkpoints, bundles, tmp_path_factory):
    """A bundle whose target's lm_head has two identical rows: the first token it generates after PROMPT is in a real
    tie with a second one. Returns (engine, prompt ids, plain output, the tied twin of its first token)."""
    import torch
    from transformers import AutoModelForCausalLM

    from specedge.export.bundle import ExportOptions, export_bundle
    from specedge.runtime import Engine

    target, draft = checkpoints("llama")
    first = Engine(bundles("llama")).generate(PROMPT, max_new_tokens=1, speculative=False).token_ids[0]
    d = tmp_path_factory.mktemp("tied")
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    head = model.lm_head.weight
    twin = head.shape[0] - 1 if first != head.shape[0] - 1 else 3
    with torch.no_grad():
        head[twin] = head[first]
    model.save_pretrained(d / "target")
    for f in target.iterdir():
        if "token" in f.name:
            shutil.copy(f, d / "target" / f.name)
    export_bundle(ExportOptions(target=d / "target", draft=draft, out=d / "bundle", max_length=64,
                                target_precision="fp32"))
    engine = Engine(d / "bundle")
    ids = engine.encode(PROMPT)
    plain = engine.generate(ids, max_new_tokens=6, speculative=False).token_ids
    assert plain[0] in (first, twin)
    return engine, ids, plain, twin if plain[0] == first else first


PROMPT = "def f(x):\n"


def test_parting_at_a_real_tie_is_a_near_tie_and_elsewhere_a_break(tied):
    from specedge.runtime.reference import next_logits
    from specedge.tools.exactness import classify

    engine, ids, plain, twin = tied
    dtype, eos = np.dtype(engine.target.logits_dtype).name, engine.eos
    tie = classify(engine.target, ids, plain, [twin, *plain[1:]], dtype, eos)
    assert tie.kind == "near-tie" and tie.position == 0 and tie.tokens == [plain[0], twin]
    assert tie.margin <= tie.tolerance == pytest.approx(1e-5 * max(1.0, abs(next_logits(engine.target, ids).max())))
    worst = int(next_logits(engine.target, ids).argmin())
    brk = classify(engine.target, ids, plain, [worst, *plain[1:]], dtype, eos)
    assert brk.kind == "break" and brk.margin > 1.0
    # a response that stopped: its token is an EOS, which is no tie here
    assert classify(engine.target, ids, plain, plain[:2], dtype, eos).kind == "break"
    assert engine.target.pos == 0  # the classifier leaves the cache empty


def test_bench_fails_on_breaks_only(tied):
    from specedge.runtime import Stats

    engine, ids, plain, twin = tied
    from specedge.tools.exactness import Parting

    runs = {"plain": [bench.Run(plain, Stats())], "model-k2": [bench.Run([twin, *plain[1:]], Stats())],
            "model-k4": [bench.Run(plain, Stats())]}
    partings = bench.find_partings(engine, [ids], runs, 1)
    assert [(p.config, p.kind, p.prompt) for p in partings] == [("model-k2", "near-tie", 0)]
    bench.check_exactness(partings)  # a near-tie is reported, not failed
    breaks = [Parting(3, [1, 2], 4.0, 1e-5, "break", "model-k4", i) for i in (0, 1)]
    with pytest.raises(SpecError, match=r"model-k4 \(2 prompts\): exactness is broken"):
        bench.check_exactness(partings + breaks)


def test_fp16_tolerance_is_two_fp16_steps():
    from specedge.tools.exactness import tolerance

    assert tolerance(5.0, "float16") == 2 * 0.00390625   # the H100's parting: one step at |x| in [4, 8)
    assert tolerance(-5.0, "float16") == tolerance(5.0, "float16")
    assert tolerance(0.5, "float32") == 1e-5 and tolerance(200.0, "float32") == pytest.approx(2e-3)


# -- defect 3: smoke times nothing it has not warmed ---------------------------------------------------------------
def test_warm_up_covers_every_step_size_the_timed_runs_use(bundles):
    from specedge.runtime import Engine
    from specedge.tools.smoke import SMOKE_PROMPTS

    engine = Engine(bundles("llama"))
    configs, _ = bench.make_configs(engine, (3,), ("plain", "model"), bench.GREEDY, print)
    ids = [engine.encode(p) for p in SMOKE_PROMPTS]
    sizes = {"target": set(), "draft": set()}
    for role in sizes:
        model = getattr(engine, role)
        forward = model.forward

        def recording(x, *args, forward=forward, seen=sizes[role], **kwargs):
            seen.add(len(x))
            return forward(x, *args, **kwargs)
        model.forward = recording
    bench.warm_up(engine, configs, ids, 20, (3,), every_prompt=True)
    warmed = {r: set(s) for r, s in sizes.items()}
    for s in sizes.values():
        s.clear()
    bench.measure(configs, ids * 2, 20)
    assert sizes["target"] <= warmed["target"] and sizes["draft"] <= warmed["draft"], (sizes, warmed)
    assert set(range(1, 5)) <= warmed["target"] and {len(i) - 1 for i in ids} <= warmed["target"]


# -- defect 11: smoke writes JUnit and JSON a device CI can read ---------------------------------------------------
def test_smoke_junit_and_json(bundles, tmp_path):
    import xml.etree.ElementTree as ET

    xml, js = tmp_path / "smoke.xml", tmp_path / "smoke.json"
    r = CliRunner().invoke(main, ["smoke", str(bundles("llama")), "--budget-ttft-ms", "100000",
                                  "--budget-tpot-ms", "0.000001", "--max-new-tokens", "8", "--junit", str(xml),
                                  "--json", str(js)])
    assert r.exit_code == 1, r.output
    suite = ET.parse(xml).getroot().find("testsuite")
    cases = {c.get("name"): c for c in suite.findall("testcase")}
    assert set(cases) == {"ttft_ms", "tpot_ms", "speedup", "exactness"}
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped")) == ("4", "1", "1")
    failure = cases["tpot_ms"].find("failure")
    assert "exceeds the budget" in failure.get("message") and failure.text.startswith("measured ")
    assert "budget 1e-06 ms" in failure.text
    assert cases["speedup"].find("skipped") is not None                 # no --min-speedup: a skipped case
    assert cases["ttft_ms"].find("failure") is None and cases["exactness"].find("failure") is None
    report = json.loads(js.read_text())
    assert report["passed"] is False and report["repeats"] >= 2
    verdicts = {v["name"]: v for v in report["verdicts"]}
    assert verdicts["tpot_ms"]["passed"] is False and verdicts["ttft_ms"]["passed"] is True
    assert verdicts["speedup"]["passed"] is None and verdicts["exactness"]["measured"] == 0
    assert report["measurements"]["tpot_ms"] == verdicts["tpot_ms"]["measured"] > 0


# -- defect 5: tune writes the choice where the CLI says it did -----------------------------------------------------
def test_tune_writes_the_winning_draft_bundle(bundles, prompts, tmp_path, monkeypatch):
    """The measurement is replaced by fixed numbers (timing is not what is tested): the second bundle wins."""
    from specedge.tools import tune

    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(bundles("llama"), a)
    shutil.copytree(bundles("llama"), b)

    def measured(bundle, prompts, max_new_tokens, k_range, progress=None, drafters=()):
        win = Path(bundle) == b
        k = 3 if win else 2
        return tune.Evaluation(bundle=str(bundle), alpha=0.8 if win else 0.6, c=0.05, t={1: 1.0}, predicted={k: 1.5},
                               measured={f"model-k{k}": 1.6 if win else 1.2}, best_k=k,
                               best_speedup=1.6 if win else 1.2, best_config=f"model-k{k}", best_tau=2.0,
                               plain_tokens_per_s=100.0, mean_new_tokens=10.0)
    monkeypatch.setattr(tune, "measure", measured)
    r = CliRunner().invoke(main, ["tune", str(a), "--prompts", str(prompts), "--drafts", str(b)],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert f"written to {b / 'manifest.json'}" in r.output and f"Use {b} instead of {a}" in r.output
    assert load_manifest(b).defaults["k"] == 3 and load_manifest(b).defaults["speculative"] is True
    assert load_manifest(b).defaults["drafter"] == "model" and load_manifest(b).defaults["adaptive"] is False
    assert load_manifest(a).defaults == {"k": 4}                        # untouched, as the CLI said
    load_manifest(b, verify=True)


# -- defects 6 and 9: peers get the sampling settings; a peer that does not apply is skipped ------------------------
def test_peers_that_do_not_apply_are_skipped_with_a_line(bundles, prompts, tmp_path):
    import dataclasses

    gpt2 = tmp_path / "gpt2"
    shutil.copytree(bundles("gpt2"), gpt2)
    m = load_manifest(gpt2)
    comp = {**m.compatibility, "target": {**m.compatibility["target"], "path": str(tmp_path / "gone")}}
    (gpt2 / "manifest.json").write_text(dataclasses.replace(m, compatibility=comp).to_json())
    out = tmp_path / "r.json"
    r = CliRunner().invoke(main, ["bench", str(gpt2), "--prompts", str(prompts), "--max-new-tokens", "6", "--k", "2",
                                  "--baselines", "plain,model,ort-genai,hf-plain", "--json", str(out)],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "skipping ort-genai: " in r.output and "genai_config.json" in r.output
    assert "skipping hf-plain: transformers needs the source checkpoints" in r.output
    report = json.loads(out.read_text())
    assert [x["name"] for x in report["results"]] == ["plain", "model-k2"]
    assert set(report["skipped"]) == {"ort-genai", "hf-plain"}


def test_peers_sample_with_the_bench_settings(bundles):
    from specedge.runtime import Engine, GenerationConfig
    from specedge.tools.peers import OrtGenAI

    engine = Engine(bundles("llama"))
    ids = engine.encode(PROMPT)
    peer = OrtGenAI(engine.bundle, None)
    try:
        greedy = bench._peer_run(peer, bench.GREEDY)(ids, 16).token_ids
        assert greedy == engine.generate(ids, max_new_tokens=16, speculative=False).token_ids
        hot = [bench._peer_run(peer, GenerationConfig(temperature=2.0, seed=s))(ids, 16).token_ids for s in (1, 2, 1)]
    finally:
        peer.close()
    assert hot[0] == hot[2] and hot[0] != hot[1] and hot[0] != greedy   # seeded sampling, not greedy


def test_tune_does_not_recommend_a_gain_the_timing_model_cannot_explain(tmp_path):
    """alpha 0 cannot be faster than plain: a measured 1.2x there is noise (a busy machine), not a recommendation."""
    from specedge.tools import tune

    noisy = tune.Evaluation(bundle=str(tmp_path), alpha=0.0, c=0.6, t={1: 1.0}, predicted={1: 0.6},
                            measured={"model-k1": 1.2}, best_k=1, best_speedup=1.2, best_config="model-k1",
                            best_tau=1.0, plain_tokens_per_s=100.0, mean_new_tokens=10.0)
    out = tune.choose(tmp_path, [noisy])
    assert out.choice.speculative is False and out.choice.written_to == str(tmp_path)
    assert "is noise: α and c predict 0.60x" in out.reasons[0] and "acceptance α = 0.00" in out.reasons[1]
    assert json.loads(json.dumps(out.to_dict()))["choice"]["drafter"] == "model"   # a report serialises as it is


def test_tune_reads_every_configuration_name_bench_writes(tmp_path):
    """bench names configurations DRAFTER-kK and adaptive-DRAFTER, with the runtime's drafter names."""
    from specedge.tools import tune

    for config, drafter, adaptive in (("model-k4", "model", False), ("lookup-k2", "lookup", False),
                                      ("hybrid-k8", "hybrid", False), ("adaptive-hybrid", "hybrid", True),
                                      ("adaptive-lookup", "lookup", True)):
        e = tune.Evaluation(bundle=str(tmp_path), alpha=0.9, c=0.05, t={1: 1.0}, predicted={4: 3.0},
                            measured={config: 2.0}, best_k=4, best_speedup=2.0, best_config=config, best_tau=3.0,
                            plain_tokens_per_s=100.0, mean_new_tokens=64.0)
        ch = tune.choose(tmp_path, [e]).choice
        assert (ch.speculative, ch.drafter, ch.adaptive) == (True, drafter, adaptive), config


# -- issue 23: bench and smoke on a bundle without a draft model ------------------------------------------------------
def test_bench_and_smoke_on_a_target_only_bundle(checkpoints, prompts, tmp_path):
    """plain never asks for the draft model; model-drafter configurations and draft-model peers are skipped with
    the reason; the old name `spec` still works, with one deprecation line."""
    from specedge.export.bundle import ExportOptions, export_bundle
    from specedge.tools import smoke

    solo = tmp_path / "solo"
    export_bundle(ExportOptions(target=checkpoints("llama")[0], draft=None, out=solo, max_length=128,
                                target_precision="fp32"))
    out = tmp_path / "r.json"
    r = CliRunner().invoke(main, ["bench", str(solo), "--prompts", str(prompts), "--max-new-tokens", "6", "--k", "2",
                                  "--baselines", "plain,spec,lookup,hybrid,adaptive,ort-genai,hf", "--json", str(out)],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert r.output.count("warning: --baselines name 'spec' is deprecated: use 'model'") == 1
    assert "skipping model: " in r.output                      # the console may wrap the line
    report = json.loads(out.read_text())
    assert report["skipped"]["model"] == f"{solo} has no draft model"
    assert [x["name"] for x in report["results"]] == ["plain", "lookup-k2", "hybrid-k2", "adaptive-lookup"]
    assert set(report["skipped"]) == {"model", "ort-genai", "hf"} and all(report["outputs_identical"].values())
    assert report["results"][0]["drafted"] == 0 and report["c"] == 0.0
    s = smoke.smoke(solo, max_new_tokens=6, repeats=1)           # the bundle's default drafter: lookup
    assert s.measurements.drafter == "lookup" and s.passed and json.loads(smoke.to_json(s))["measurements"]["k"] >= 1
