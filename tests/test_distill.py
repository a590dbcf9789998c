"""`spec-export distill` on tiny random models: it learns, it carves exact drafts, it resumes bit for bit, it refuses
bad input without writing anything."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from specedge.export.distill import DistillOptions, distill, work_dir
from specedge.export.distill_card import advice, bundle_card
from specedge.export.distill_models import carve
from specedge.models import tiny
from specedge.runtime.stats import predicted_speedup
from specedge.tools.cli import main

# Small and sharp: pure KL, a high learning rate, 4 x 32-token windows per step.
FAST = dict(batch=4, seq_len=32, kl_weight=1.0, lr=1e-2)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: thread hand-offs cost more than the maths, badly so on a shared CPU. (Also makes the killed
    subprocess and the in-process reference run with the same thread count, so their sums are bit-identical.)"""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A repetitive synthetic code corpus: 40 files of a few recurring one-line functions."""
    root = tmp_path_factory.mktemp("corpus")
    r = random.Random(0)
    for i in range(40):
        (root / f"m{i}.py").write_text("".join(f"def f{n}(x):\n    return x + {n}\n"
                                               for n in (r.randint(0, 9) for _ in range(30))))
    (root / "blob.bin").write_bytes(b"\0\1\2" * 100)  # binary files are skipped, not fatal
    return root


def _weights(folder: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_distill_lowers_kl_and_raises_agreement(checkpoints, corpus, tmp_path, arch):
    target, draft = checkpoints(arch)
    out = tmp_path / "d"
    card = distill(DistillOptions(target=target, out=out, corpus=(corpus,), draft=draft, tokens=4 * 32 * 60, **FAST))
    b, a = card["before"], card["after"]
    assert a["kl"] < b["kl"] - 0.1, (b["kl"], a["kl"])
    assert a["agreement"] > b["agreement"], (b["agreement"], a["agreement"])
    assert card["steps"] == 60 and card["tokens_seen"] == 60 * 4 * 32 and card["corpus"]["skipped_files"] == 1
    assert sorted(card["after"]["alpha"]) == list(range(1, 9))
    for name in ("config.json", "model.safetensors", "tokenizer.json", "distill_card.json", "distill_card.md",
                 "loss.png"):
        assert (out / name).is_file(), name
    assert not work_dir(out).exists()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma"])
def test_carving_every_layer_reproduces_the_target(checkpoints, arch):
    """The slicing is right: a 'draft' that keeps all layers is the target, logit for logit; tied heads stay tied."""
    import torch
    from transformers import AutoModelForCausalLM

    target = AutoModelForCausalLM.from_pretrained(checkpoints(arch)[0], dtype=torch.float32).eval()
    n = target.config.num_hidden_layers
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        assert torch.equal(carve(target, tuple(range(n))).eval()(ids).logits, target(ids).logits)
        one = carve(target, (n - 1,)).eval()
    assert one.config.num_hidden_layers == 1
    assert len(getattr(one.config, "layer_types", None) or [None]) == 1
    assert torch.equal(one.model.layers[0].mlp.up_proj.weight, target.model.layers[n - 1].mlp.up_proj.weight)
    if target.config.tie_word_embeddings:
        assert one.lm_head.weight.data_ptr() == one.model.embed_tokens.weight.data_ptr()


def test_from_target_draft_checks_exports_and_is_exact(checkpoints, corpus, tmp_path):
    from specedge.export.bundle import ExportOptions, export_bundle
    from specedge.export.check import check_pair
    from specedge.runtime import Engine

    target = checkpoints("llama")[0]
    out = tmp_path / "carved"
    r = cli("distill", "--target", target, "--from-target", 1, "--corpus", corpus, "--glob", "*.py", "--out", out,
            "--tokens", 4 * 32 * 10, "--batch", 4, "--seq-len", 32)
    assert r.exit_code == 0, r.output
    assert "after" in r.output and "draft written to" in r.output
    v = check_pair(target, out)
    assert v.compatible, v.errors
    assert v.draft.num_layers == 1
    bundle = tmp_path / "bundle"
    export_bundle(ExportOptions(target=target, draft=out, out=bundle, max_length=96, target_precision="fp32"))
    assert bundle_card(bundle)["source"] == {"from_target": [0]}  # tune reads the card from the bundle
    engine = Engine(bundle)
    for prompt in ("def f(x):\n", "import os\n\nclass A:\n"):
        plain = engine.generate(prompt, max_new_tokens=20, speculative=False).token_ids
        for k in (1, 4):
            assert engine.generate(prompt, max_new_tokens=20, k=k).token_ids == plain, k


# -- resume: same weights as an uninterrupted run ----------------------------------------------------------------------
STEPS = 100


def _opts(checkpoints, corpus, out, **kw):
    target, draft = checkpoints("llama")
    return DistillOptions(target=target, out=out, corpus=(corpus,), draft=draft, tokens=4 * 32 * STEPS,
                          checkpoint_minutes=0, **FAST, **kw)


@pytest.fixture(scope="module")
def uninterrupted(checkpoints, corpus, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ref") / "d"
    distill(_opts(checkpoints, corpus, out))
    return _weights(out)


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k


def test_pause_and_resume_give_the_same_weights(checkpoints, corpus, tmp_path, uninterrupted):
    out = tmp_path / "d"
    assert distill(_opts(checkpoints, corpus, out, pause_after=7)) is None
    assert not out.exists() and (work_dir(out) / "checkpoint.pt").is_file()
    r = cli("distill", "--target", checkpoints("llama")[0], "--draft", checkpoints("llama")[1], "--corpus", corpus,
            "--out", out, "--tokens", 4 * 32 * STEPS)
    assert r.exit_code == 2 and "--resume" in r.output  # a leftover checkpoint is never silently overwritten
    changed = cli("distill", "--target", checkpoints("llama")[0], "--draft", checkpoints("llama")[1], "--corpus",
                  corpus, "--out", out, "--tokens", 4 * 32 * STEPS, "--resume", "--batch", 4, "--seq-len", 32,
                  "--kl-weight", 1.0, "--lr", 0.02)
    assert changed.exit_code == 2 and "lr" in changed.output
    card = distill(_opts(checkpoints, corpus, out, resume=True))
    assert card["steps"] == STEPS
    _same(_weights(out), uninterrupted)
    assert not work_dir(out).exists()


def test_killed_run_resumes_to_the_same_weights(checkpoints, corpus, tmp_path, uninterrupted):
    """SIGKILL (no cleanup at all) once the first checkpoint exists; --resume finishes the run."""
    target, draft = checkpoints("llama")
    out = tmp_path / "d"
    args = [Path(sys.executable).parent / "spec-export", "distill", "--target", target, "--draft", draft, "--corpus",
            corpus, "--out", out, "--tokens", 4 * 32 * STEPS, "--batch", 4, "--seq-len", 32, "--kl-weight", 1.0,
            "--lr", 0.01, "--checkpoint-minutes", 0]
    args = [str(a) for a in args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    ckpt = work_dir(out) / "checkpoint.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ckpt.exists() and not out.exists(), "the run ended before it could be killed"
    assert distill(_opts(checkpoints, corpus, out, resume=True))["steps"] == STEPS
    _same(_weights(out), uninterrupted)


# -- bad input: one error line, exit 2, nothing written ----------------------------------------------------------------
@pytest.fixture(scope="module")
def foreign_draft(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("foreign")
    tok = tiny.train_tokenizer(root / "tok", vocab_size=400, files=tiny.stdlib_files()[60:90])
    return tiny.build_tiny(root / "draft", "llama", tok, layers=1, hidden=32, heads=2, kv_heads=1, inter=64)


def test_bad_input_is_refused_without_writing(checkpoints, corpus, tmp_path, foreign_draft):
    target, draft = checkpoints("llama")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.py").write_text("   \n")
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    out = tmp_path / "out"
    cases = [
        (["--draft", foreign_draft, "--corpus", corpus, "--out", out], "tokenizers differ"),
        (["--draft", draft, "--corpus", empty, "--out", out], "no non-empty UTF-8 text"),
        (["--draft", draft, "--corpus", tmp_path / "nowhere", "--out", out], "does not exist"),
        (["--draft", draft, "--corpus", corpus, "--glob", "*.rs", "--out", out], "matching *.rs"),
        (["--from-target", 2, "--corpus", corpus, "--out", out], "the target has 2 layers"),
        (["--from-target", "0,7", "--corpus", corpus, "--out", out], "the target has 2 layers"),
        (["--from-target", "x", "--corpus", corpus, "--out", out], "layer count"),
        (["--corpus", corpus, "--out", out], "exactly one of --draft"),
        (["--draft", draft, "--corpus", corpus, "--out", "/proc/specedge-distill/out"], "cannot write"),
        (["--draft", draft, "--corpus", corpus, "--out", existing], "already exists"),
        (["--draft", draft, "--corpus", corpus, "--out", out, "--resume"], "no checkpoint"),
        (["--draft", draft, "--corpus", corpus, "--out", out, "--minutes", 1, "--tokens", 10], "not both"),
    ]
    for args, message in cases:
        r = cli("distill", "--target", target, *args)
        assert r.exit_code == 2, (args, r.output)
        assert r.output.strip().startswith(("error:", "Usage:")) and message in r.output, (message, r.output)
    assert not out.exists() and not work_dir(out).exists()
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "existing"]


# -- tune's hint -------------------------------------------------------------------------------------------------------
def test_advice_follows_the_cost_model():
    # a CPU-like target whose verify cost grows with n: speculation needs alpha near 0.5 before it gains
    t = {1: 1.0, 2: 1.3, 5: 2.2}
    low = advice(0.3, 0.1, t)
    assert low.distill and "below" in low.reason and 0.3 < low.alpha_needed < 0.6
    assert low.predicted_speedup < 1.05 <= max(predicted_speedup(low.alpha_needed, k, 0.1, t) for k in range(1, 9))
    good = advice(0.8, 0.1, t)
    assert not good.distill and good.predicted_speedup_after > good.predicted_speedup > 1.05
    # alpha on the user's prompts well below the card's: the traffic is not the distillation corpus
    card = {"after": {"alpha": {str(k): 0.9 for k in range(1, 9)}}}
    drop = advice(0.7, 0.1, t, card=card)
    assert drop.distill and "card" in drop.reason
    assert not advice(0.88, 0.1, t, card=card).distill
    # a draft as expensive as the target: no alpha helps, distilling is not the fix
    hopeless = advice(0.5, 1.0, t={1: 1.0, 2: 2.0, 5: 5.0})
    assert not hopeless.distill and hopeless.alpha_needed is None and "c = 1.000" in hopeless.reason


def test_carving_gemma3_slices_the_per_layer_attention_pattern():
    """Gemma 3 alternates sliding and full attention per layer: the carved draft keeps each kept layer's kind."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=8,
                           max_position_embeddings=64, tie_word_embeddings=True)
    torch.manual_seed(0)
    target = Gemma3ForCausalLM(cfg).eval()
    ids = torch.arange(3, 40)[None]  # longer than the window: sliding layers really differ from full ones
    with torch.no_grad():
        assert torch.allclose(carve(target, tuple(range(6))).eval()(ids).logits, target(ids).logits, atol=1e-5)
        draft = carve(target, (0, 5)).eval()
    assert draft.config.layer_types == [cfg.layer_types[0], cfg.layer_types[5]]
    assert draft.config.layer_types[0] != draft.config.layer_types[1]
    assert draft.lm_head.weight.data_ptr() == draft.model.embed_tokens.weight.data_ptr()


# -- the folder swap every exporter uses (bundle, distill, gguf) -------------------------------------------------------
def test_replace_dir_swaps_whole_folders_and_puts_the_old_one_back_on_failure(tmp_path):
    from specedge.export.osutil import replace_dir

    out, new = tmp_path / "out", tmp_path / "new"
    out.mkdir()
    (out / "a").write_text("old")
    new.mkdir()
    (new / "b").write_text("new")
    replace_dir(new, out)
    assert [p.name for p in out.iterdir()] == ["b"] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(FileNotFoundError):  # the second rename fails: `out` is the previous folder again
        replace_dir(tmp_path / "missing", out)
    assert [p.name for p in out.iterdir()] == ["b"] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
