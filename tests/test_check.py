"""The compatibility verdict on tiny random checkpoints: no weights are loaded, only configs, headers, tokenizers."""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import struct
from pathlib import Path

import pytest

from specedge.export.check import check_pair, model_info, require_compatible, tokenizer_fingerprint
from specedge.models import tiny
from specedge.runtime.errors import ExportError, IncompatibleModels

SMALL = dict(seed=1, layers=1, hidden=32, heads=2, kv_heads=1, inter=64)


@pytest.fixture(scope="module")
def m(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("check")
    tok = tiny.train_tokenizer(d / "tok")
    # Trained on other files: the merges, hence the ids past the byte alphabet, differ.
    other_tok = tiny.train_tokenizer(d / "tok2", files=tiny.stdlib_files()[40:80])
    return {
        "tok": tok,
        "other_tok": other_tok,
        "target": tiny.build_tiny(d / "target", "llama", tok),
        "draft": tiny.build_tiny(d / "draft", "llama", tok, **SMALL),
        "padded": tiny.build_tiny(d / "padded", "llama", tok, vocab_size=520, **SMALL),
        "other": tiny.build_tiny(d / "other", "llama", other_tok, **SMALL),
        "gpt2": tiny.build_tiny(d / "gpt2", "gpt2", tok, **SMALL),
        "qwen3": tiny.build_tiny(d / "qwen3", "qwen3", tok),
        "qwen2": tiny.build_tiny(d / "qwen2", "qwen2", tok, **SMALL),
        "mistral_sw": tiny.build_tiny(d / "mistral_sw", "mistral", tok, sliding_window=16),
        "mistral": tiny.build_tiny(d / "mistral", "mistral", tok, **SMALL),
    }


def variant(src: Path, dst: Path, **edits: dict) -> Path:
    """A copy of checkpoint `src` with keys of its JSON files replaced, e.g. config={"eos_token_id": 2}."""
    shutil.copytree(src, dst)
    for stem, changes in edits.items():
        f = dst / f"{stem}.json"
        f.write_text(json.dumps({**json.loads(f.read_text()), **changes}))
    return dst


def test_compatible_pair(m):
    v = check_pair(m["target"], m["draft"], draft_precision="fp32")  # same precision: the byte ratio is the params'
    assert v.compatible and v.errors == ()
    require_compatible(v)
    assert v.tokenizer_vocab_size == 512 and v.vocab_size_difference == 0
    assert v.target.model_type == v.draft.model_type == "llama" and v.target.architecture == "LlamaForCausalLM"
    assert v.target.num_layers == 2 and v.draft.num_layers == 1 and v.draft.hidden_size == 32
    assert 0.1 < v.size_ratio < 1
    # Tiny random models: a draft ~1/4 of the target and far below 5M parameters.
    assert len(v.warnings) == 2
    assert "above 1/10" in v.warnings[0] and "high c" in v.warnings[0]
    assert "fine for tests, too small for real traffic" in v.warnings[1]
    assert json.loads(json.dumps(v.to_dict()))["draft"]["parameters"] == v.draft.parameters


def test_parameter_count_matches_the_model(m):
    from transformers import AutoModelForCausalLM

    for name in ("target", "gpt2"):
        assert model_info(m[name]).parameters == AutoModelForCausalLM.from_pretrained(m[name]).num_parameters()


def write_safetensors(path: Path, shapes: dict[str, list[int]]) -> None:
    """A valid safetensors file of zeros: 8-byte little-endian header length, JSON header, data."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))


def test_sharded_and_tied_parameters(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 10, "hidden_size": 4,
        "num_hidden_layers": 1, "tie_word_embeddings": True}))
    write_safetensors(tmp_path / "a.safetensors", {"model.embed_tokens.weight": [10, 4], "lm_head.weight": [10, 4]})
    write_safetensors(tmp_path / "b.safetensors", {"model.layers.0.mlp.weight": [4, 8],
                                                   "model.layers.0.self_attn.rotary_emb.inv_freq": [2]})
    write_safetensors(tmp_path / "stray.safetensors", {"x": [1000]})  # not in the index: ignored
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "model.embed_tokens.weight": "a.safetensors", "lm_head.weight": "a.safetensors",
        "model.layers.0.mlp.weight": "b.safetensors"}}))
    # Tied: lm_head is the embedding, counted once; inv_freq is a buffer.
    assert model_info(tmp_path).parameters == 10 * 4 + 4 * 8


def test_tokenizer_fingerprint(m):
    from tokenizers import Tokenizer

    fp = tokenizer_fingerprint(m["target"])
    vocab = Tokenizer.from_file(str(m["target"] / "tokenizer.json")).get_vocab()
    assert fp == {"vocab_size": 512, "vocab_sha256": hashlib.sha256(json.dumps(sorted(vocab.items())).encode())
                  .hexdigest(), "bos_token_id": 1, "eos_token_ids": [0], "pad_token_id": 2, "add_bos": True,
                  "files": ["tokenizer.json", "tokenizer_config.json"]}
    assert tokenizer_fingerprint(m["other"])["vocab_sha256"] != fp["vocab_sha256"]


def test_different_tokenizer_names_first_differing_id(m):
    from tokenizers import Tokenizer

    t, d = (Tokenizer.from_file(str(m[k] / "tokenizer.json")) for k in ("target", "other"))
    first = next(i for i in range(512) if t.id_to_token(i) != d.id_to_token(i))
    v = check_pair(m["target"], m["other"])
    assert not v.compatible
    assert len(v.errors) == 1
    assert f"id {first}: target {t.id_to_token(first)!r} vs draft {d.id_to_token(first)!r}" in v.errors[0]
    assert "the draft must use the target's tokenizer" in v.errors[0]
    with pytest.raises(IncompatibleModels, match=f"id {first}"):
        require_compatible(v)


def test_different_special_tokens(m, tmp_path):
    eos = variant(m["draft"], tmp_path / "eos", config={"eos_token_id": 2}, generation_config={"eos_token_id": 2},
                  tokenizer_config={"eos_token": "<|pad|>"})
    v = check_pair(m["target"], eos)
    assert not v.compatible
    [err] = v.errors
    assert "EOS token differs: target id [0] '<|endoftext|>' vs draft id [2] '<|pad|>'" in err
    assert "the draft must use the target's tokenizer" in err
    # The text alone differing is enough.
    pad = variant(m["draft"], tmp_path / "pad", tokenizer_config={"pad_token": "<|endoftext|>"})
    assert any(e.startswith("PAD token differs") for e in check_pair(m["target"], pad).errors)


def test_add_bos_mismatch(m, tmp_path):
    nobos = tmp_path / "nobos"
    shutil.copytree(m["draft"], nobos)
    tj = json.loads((nobos / "tokenizer.json").read_text())
    tj["post_processor"] = None
    (nobos / "tokenizer.json").write_text(json.dumps(tj))
    assert tokenizer_fingerprint(nobos)["add_bos"] is False
    errs = check_pair(m["target"], nobos).errors
    assert errs == ("the target tokenizer prepends BOS but the draft's does not prepend BOS; the draft must use the "
                    "target's tokenizer: pick a draft of the target's family (e.g. a smaller sibling)",)


def test_sliding_window_is_rewindable(m):
    # The window is a mask over specedge's full-length KV buffer: rollback (an integer) does not disturb it.
    info = model_info(m["mistral_sw"])
    assert info.rewindable and info.rewind_reason == "" and info.windows == (16, 16)
    assert check_pair(m["mistral_sw"], m["mistral"]).compatible
    assert model_info(m["mistral"]).windows == (0,)


def test_layer_windows(m, tmp_path):
    # Qwen2 configs carry a window that use_sliding_window=false switches off; on, it applies from max_window_layers.
    off = variant(m["qwen3"], tmp_path / "off", config={"sliding_window": 16, "use_sliding_window": False})
    assert model_info(off).windows == (0, 0)
    on = variant(m["qwen3"], tmp_path / "on", config={"sliding_window": 16, "use_sliding_window": True,
                                                      "max_window_layers": 1, "layer_types": None})
    assert model_info(on).windows == (0, 16)
    wide = variant(m["mistral_sw"], tmp_path / "wide", config={"sliding_window": 4096})
    assert model_info(wide).windows == (0, 0)
    # Gemma 3 ignores use_sliding_window (its logits do not change), and so does the verdict; older Gemma 3
    # configs give a pattern instead of layer_types.
    g3 = {"model_type": "gemma3_text", "num_hidden_layers": 7, "sliding_window": 512, "use_sliding_window": False,
          "max_position_embeddings": 32768, "sliding_window_pattern": 6}
    gemma3 = variant(m["mistral_sw"], tmp_path / "gemma3", config=g3)
    assert model_info(gemma3).windows == (512,) * 5 + (0, 512)


def test_recurrent_state_is_not_rewindable(m, tmp_path):
    hybrid = variant(m["draft"], tmp_path / "hybrid", config={"layer_types": ["full_attention", "linear_attention"]})
    assert "linear_attention" in model_info(hybrid).rewind_reason
    mamba = variant(m["draft"], tmp_path / "mamba", config={"model_type": "mamba"})
    assert not model_info(mamba).rewindable
    [err] = [e for e in check_pair(m["target"], mamba).errors if "rewound" in e]  # (and a family error)
    assert err.startswith("the draft (mamba) cannot be rewound after rejected draft tokens: mamba has recurrent")
    assert "pick a model whose layers are all attention (full or sliding-window)" in err
    assert "sliding_window: null" not in err  # the old advice crashed Gemma 3 and did nothing to its logits


def test_large_vocabulary_suggests_a_reduced_draft_vocab(m, tmp_path):
    # Config only (no weights are read for the vocabulary): a 128k-row head on a 32-wide draft dominates its bytes.
    big = variant(m["draft"], tmp_path / "big", config={"vocab_size": 128256})
    v = check_pair(m["target"], big)
    [w] = [w for w in v.warnings if "--draft-vocab" in w]
    assert w.startswith("the draft's LM head (128,256 x 32) is") and "--draft-vocab 16384" in w
    assert not any("--draft-vocab" in w for w in check_pair(m["target"], m["draft"]).warnings)


def test_padded_vocab_is_a_warning(m):
    v = check_pair(m["target"], m["padded"])
    assert v.compatible and v.vocab_size_difference == -8 and v.draft.vocab_size == 520
    assert any("config vocab sizes differ by 8 rows (target 512, draft 520)" in w for w in v.warnings)


def test_vocab_smaller_than_tokenizer(m, tmp_path):
    short = variant(m["draft"], tmp_path / "short", config={"vocab_size": 500})
    [err] = check_pair(m["target"], short).errors
    assert "the draft's config vocab_size 500 is smaller than the tokenizer's 512 tokens" in err


def test_different_family(m):
    v = check_pair(m["target"], m["gpt2"])
    [err] = v.errors
    assert "different model families (llama target, gpt2 draft)" in err
    assert "cannot share a draft safely" in err and "pick a draft of the target's family (llama)" in err


def test_different_generation_is_a_warning(m):
    v = check_pair(m["qwen3"], m["qwen2"])
    assert v.compatible
    assert any("different generations of one family (qwen3 target, qwen2 draft)" in w for w in v.warnings)


def test_draft_larger_than_target(m):
    v = check_pair(m["draft"], m["target"], draft_precision="fp32")
    [err] = v.errors
    assert err.startswith("the draft is not cheaper than the target") and "10-50x smaller" in err
    assert "of weights read per step" in err and "--draft-precision int4" in err


def test_self_speculation_with_a_quantized_copy(m):
    # The target's own weights at int4 read 6.4x fewer bytes per step than at fp32: allowed, with the high-c warning.
    v = check_pair(m["target"], m["target"])
    assert v.compatible and v.size_ratio == 1 and v.step_bytes_ratio == pytest.approx(0.625 / 4)
    assert any("above 1/10" in w and "(int4) / target" in w for w in v.warnings)
    assert not check_pair(m["target"], m["target"], draft_precision="fp32").compatible
    # An untied input embedding is a row lookup, not read per step; a tied one is the head and is.
    info = model_info(m["target"])
    assert info.parameters - info.step_parameters == 512 * 64


def test_deep_draft_warning(m, tmp_path):
    deep = variant(m["draft"], tmp_path / "deep", config={"num_hidden_layers": 9})  # config only: no weights read
    assert any("on GPUs a shallow draft (few, wider layers)" in w for w in check_pair(m["target"], deep).warnings)


@pytest.mark.parametrize("missing, named", [("tokenizer.json", "has no tokenizer.json"),
                                             ("config.json", "has no config.json"),
                                             ("model.safetensors", "has no *.safetensors")])
def test_missing_files(m, tmp_path, missing, named):
    broken = tmp_path / "broken"
    shutil.copytree(m["draft"], broken)
    (broken / missing).unlink()
    with pytest.raises(ExportError) as e:
        check_pair(m["target"], broken)
    assert named in str(e.value) and "save_pretrained" in str(e.value)  # the problem and the fix


def test_other_family_special_tokens_advise_the_family_not_copying(m, tmp_path):
    """A gpt2 draft with another EOS: copying the llama target's tokenizer files into it would not make a usable draft."""
    eos = variant(m["gpt2"], tmp_path / "eos", config={"eos_token_id": 2}, generation_config={"eos_token_id": 2},
                  tokenizer_config={"eos_token": "<|pad|>"})
    errors = check_pair(m["target"], eos).errors
    [special] = [e for e in errors if e.startswith("EOS token differs")]
    assert "copy the target's tokenizer files" not in special
    assert "the draft must come from the target's family" in special
    assert any("different model families (llama target, gpt2 draft)" in e for e in errors)
    # same family: copying the tokenizer files is still the advice
    same = variant(m["draft"], tmp_path / "same", config={"eos_token_id": 2}, generation_config={"eos_token_id": 2},
                   tokenizer_config={"eos_token": "<|pad|>"})
    assert "copy the target's tokenizer files" in check_pair(m["target"], same).errors[0]
