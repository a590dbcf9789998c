"""Bad input, systematically: every command and option of `spec-export`, and the Python API.

A bad value is refused with exit status 2 and a message naming the option (click's `Usage:` + `Error:` lines, or
one `error:` line), never a traceback, and nothing is written: the bundle and the working folder hash the same
before and after. The Python API raises a typed error from `specedge.runtime`, never numpy's or onnxruntime's.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
from collections import Counter
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import encodable
from specedge.runtime import BundleError, Engine, GenerationConfig, InvalidArgument
from specedge.tools.cli import POSITIVE, FiniteFloat, main

ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False


def tree_hash(*roots: Path) -> str:
    """Names, modes and contents of everything under roots: 'nothing written' is an equal hash."""
    h = hashlib.sha256()
    for root in roots:
        for p in sorted(root.rglob("*")):
            h.update(f"{p.relative_to(root)}:{p.lstat().st_mode}".encode())
            if p.is_file() and not p.is_symlink():
                h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def ws(tmp_path_factory, bundles, checkpoints):
    """A working folder of good and bad inputs; placeholders in the table below name them."""
    w = tmp_path_factory.mktemp("bad")
    target, draft = checkpoints("llama")
    files = {
        "GOOD": ('{"prompt": "def f(x):"}\n', ".jsonl"),
        "NONUTF8": (b"def \xff\xfe(x):", ".txt"),
        "EMPTY": ("", ".txt"),
        "BLANKLINES": ("\n\n", ".jsonl"),
        "NUMBER": ('{"prompt": 5}\n', ".jsonl"),
        "EMPTYPROMPT": ('{"prompt": ""}\n', ".jsonl"),
        "NOFIELD": ('{"text": "x"}\n', ".jsonl"),
        "NOTJSON": ('{"prompt": "x"\n', ".jsonl"),
        "LIST": ('["x"]\n', ".jsonl"),
        "NULL": ('{"prompt": null}\n', ".jsonl"),
    }
    paths = {}
    for name, (content, suffix) in files.items():
        p = w / f"{name.lower()}{suffix}"
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
        paths[name] = p
    (w / "dir").mkdir()
    (w / "notabundle").mkdir()
    (w / "notabundle" / "notes.txt").write_text("mine")
    (w / "emptydir").mkdir()
    locked = w / "locked.txt"
    locked.write_text("def f(x):")
    locked.chmod(0)
    broken = {"CFGLIST": ("config.json", b"[1]"), "CFGNOTJSON": ("config.json", b"{"),
              "TOKNONUTF8": ("tokenizer.json", b"\xff\xfe"), "NOTOK": ("tokenizer.json", None),
              "NOWEIGHTS": ("model.safetensors", None)}
    for name, (f, content) in broken.items():   # checkpoints broken in one file each
        shutil.copytree(target, w / name.lower())
        if content is None:
            (w / name.lower() / f).unlink()
        else:
            (w / name.lower() / f).write_bytes(content)
        paths[name] = w / name.lower()
    paths.update(B=bundles("llama"), T=target, D=draft, MISSING=w / "missing", DIR=w / "dir",
                 FILE=paths["GOOD"], NOTABUNDLE=w / "notabundle", EMPTYDIR=w / "emptydir", LOCKED=locked,
                 NEWOUT=w / "out", NOPARENT=w / "missing" / "report.json", W=w)
    return paths


# (command line with placeholders, what the message must name). One row per bad value.
G = "generate B --prompt x"
CASES = [
    # check
    ("check --target MISSING --draft D", "--target"),
    ("check --target FILE --draft D", "--target"),
    ("check --target T --draft MISSING", "--draft"),
    ("check --target T --draft FILE", "--draft"),
    ("check --target T", "--draft"),
    ("check --target EMPTYDIR --draft D", "has no config.json"),
    ("check --target T --draft D --json=x", "--json"),
    ("check --target CFGLIST --draft D", "config.json holds a JSON list"),
    ("check --target CFGNOTJSON --draft D", "config.json is not valid JSON"),
    ("check --target T --draft TOKNONUTF8", "tokenizer.json could not be read"),
    ("check --target NOTOK --draft D", "has no tokenizer.json"),
    # export
    ("export --target T --draft D", "--out"),
    ("export --target MISSING --draft D --out NEWOUT", "--target"),
    ("export --target T --draft FILE --out NEWOUT", "--draft"),
    ("export --target T --draft EMPTYDIR --out NEWOUT", "has no config.json"),
    ("export --target CFGLIST --draft D --out NEWOUT", "config.json holds a JSON list"),
    ("export --target T --draft TOKNONUTF8 --out NEWOUT", "tokenizer.json could not be read"),
    ("export --target NOWEIGHTS --draft D --out NEWOUT", "has no *.safetensors weights"),
    ("export --target T --draft D --out B", "already exists: pass --force"),
    ("export --target T --draft D --out FILE --force", "not a specedge bundle"),
    ("export --target T --draft D --out NOTABUNDLE --force", "not a specedge bundle"),
    ("export --target T --draft D --out /proc/forbidden", "cannot create the bundle in /proc"),
    *[(f"export --target T --draft D --out NEWOUT --max-length {v}", "--max-length")
      for v in ("8", "0", "-1", "1.5", "abc", "''", "nan", "inf")],
    ("export --target T --draft D --out NEWOUT --max-length 100000", "max_position_embeddings"),
    *[(f"export --target T --draft D --out NEWOUT --k {v}", "--k") for v in ("0", "33", "-1", "x", "nan")],
    ("export --target T --draft D --out NEWOUT --device gpu", "--device"),
    ("export --target T --draft D --out NEWOUT --device ''", "--device"),
    ("export --target T --draft D --out NEWOUT --target-precision fp7", "--target-precision"),
    ("export --target T --draft D --out NEWOUT --draft-precision int3", "--draft-precision"),
    ("export --target T --draft D --out NEWOUT --draft-precision fp8", "--draft-precision fp8 needs TensorRT"),
    ("export --target T --draft D --out NEWOUT --target-precision fp16", "fp16 graphs are for --device cuda"),
    ("export --target T --draft D --out NEWOUT --device trt --target-precision int4", "--device trt takes fp32"),
    ("export --target T --draft D --out NEWOUT --force=yes", "--force"),
    ("export --target T --draft D --out NEWOUT --draft-vocab -1", "--draft-vocab"),
    ("export --target T --draft D --out NEWOUT --draft-vocab many", "--draft-vocab"),
    ("export --target T --draft D --out NEWOUT --draft-vocab 64 --draft-vocab-corpus MISSING", "--draft-vocab-corpus"),
    ("export --target T --out NEWOUT --draft-vocab 64", "give one with --draft"),
    # inspect
    ("inspect MISSING", "not a specedge bundle"),
    ("inspect FILE", "not a specedge bundle"),
    ("inspect EMPTYDIR", "not a specedge bundle"),
    ("inspect ''", "not a specedge bundle"),
    ("inspect", "BUNDLE"),
    # generate
    ("generate B", "--prompt"),
    ("generate B --prompt x --prompt-file GOOD", "exactly one of --prompt"),
    ("generate MISSING --prompt x", "not a specedge bundle"),
    ("generate T --prompt x", "not a specedge bundle"),
    ("generate B --prompt ''", "--prompt"),
    ("generate B --prompt-file MISSING", "--prompt-file"),
    ("generate B --prompt-file DIR", "--prompt-file"),
    ("generate B --prompt-file NONUTF8", "not valid UTF-8"),
    ("generate B --prompt-file EMPTY", "prompt is empty"),
    ("generate B --prompt-file LOCKED", "--prompt-file"),
    *[(f"{G} --max-new-tokens {v}", "--max-new-tokens") for v in ("0", "-1", "1.5", "x", "''", "nan", "1e9")],
    *[(f"{G} --k {v}", "--k") for v in ("0", "-1", "33", "1.5", "x", "''")],
    *[(f"{G} --temperature {v}", "--temperature") for v in ("-1", "-0.1", "nan", "inf", "-inf", "x", "''")],
    *[(f"{G} --top-k {v}", "--top-k") for v in ("-1", "1.5", "x")],
    *[(f"{G} --top-p {v}", "--top-p") for v in ("0", "-0.5", "1.5", "nan", "inf", "x")],
    *[(f"{G} --seed {v}", "--seed") for v in ("-5", "-1", "1.5", "x", "''")],
    (f"{G} --stop ''", "--stop"),
    (f"{G} --stop a --stop ''", "--stop"),
    (f"{G} --provider gpu", "--provider"),
    (f"{G} --no-speculation=1", "--no-speculation"),
    # bench
    ("bench B", "--prompts"),
    ("bench MISSING --prompts GOOD", "not a specedge bundle"),
    *[(f"bench B --prompts {v}", "--prompts") for v in ("MISSING", "DIR", "NONUTF8", "EMPTY", "BLANKLINES", "NUMBER",
                                                        "EMPTYPROMPT", "NOFIELD", "NOTJSON", "LIST", "NULL", "LOCKED")],
    ("bench B --prompts GOOD --prompts NUMBER", "--prompts"),
    *[(f"bench B --prompts GOOD --max-new-tokens {v}", "--max-new-tokens") for v in ("0", "-3", "x")],
    *[(f"bench B --prompts GOOD --k {v}", "--k") for v in ("0", "33", "x", "''", "2,,4", "2,nan", "1.5")],
    *[(f"bench B --prompts GOOD --temperature {v}", "--temperature") for v in ("-1", "nan", "inf")],
    *[(f"bench B --prompts GOOD --baselines {v}", "--baselines") for v in ("foo", "plain,foo", "''", ",")],
    ("bench B --prompts GOOD --json DIR", "--json"),
    ("bench B --prompts GOOD --json NOPARENT", "--json"),
    ("bench B --prompts GOOD --plot DIR", "--plot"),
    ("bench B --prompts GOOD --plot NOPARENT", "--plot"),
    ("bench B --prompts GOOD --provider npu", "--provider"),
    *[(f"bench B --prompts GOOD --threads {v}", "--threads") for v in ("-1", "x")],
    *[(f"bench B --prompts GOOD --gguf {v}", "--gguf") for v in ("MISSING", "DIR")],
    # tune (it writes the manifest when it runs: a refusal must leave it as it was)
    ("tune B", "--prompts"),
    *[(f"tune B --prompts {v}", "--prompts") for v in ("MISSING", "DIR", "NONUTF8", "NUMBER", "NOTJSON", "EMPTY")],
    ("tune B --prompts GOOD --drafts MISSING", "--drafts"),
    ("distill --target T --draft D --out NEWOUT", "--corpus"),
    ("distill --target MISSING --draft D --corpus GOOD --out NEWOUT", "--target"),
    ("distill --target T --draft FILE --corpus GOOD --out NEWOUT", "--draft"),
    ("distill --target T --draft D --corpus MISSING --out NEWOUT", "--corpus"),
    ("distill --target T --draft D --corpus GOOD --out NEWOUT --minutes -1", "--minutes"),
    ("distill --target T --draft D --corpus GOOD --out NEWOUT --minutes nan", "--minutes"),
    ("distill --target T --draft D --corpus GOOD --out NEWOUT --tokens 0", "--tokens"),
    ("distill --target T --draft D --corpus GOOD --out NEWOUT --kl-weight 1.5", "--kl-weight"),
    ("distill --target T --draft D --corpus GOOD --out NEWOUT --seq-len 1", "--seq-len"),
    ("distill --target T --draft D --corpus GOOD --out NEWOUT --batch 0", "--batch"),
    ("distill --target T --draft D --corpus GOOD --out NEWOUT --lr 0", "--lr"),
    ("distill --target T --draft D --corpus GOOD --out NEWOUT --seed -1", "--seed"),
    ("distill --target T --draft D --corpus GOOD --out NEWOUT --checkpoint-minutes inf", "--checkpoint-minutes"),
    ("distill --target T --draft D --corpus GOOD --out NEWOUT --pause-after 0", "--pause-after"),
    ("bench B --prompts GOOD --temperature 1 --top-k -1", "--top-k"),
    ("bench B --prompts GOOD --temperature 1 --top-p 1.5", "--top-p"),
    ("bench B --prompts GOOD --temperature 1 --seed -1", "--seed"),
    ("tune B --prompts GOOD --drafters magic", "--drafters"),
    ("tune B --prompts GOOD --drafters ''", "--drafters"),
    ("generate B --prompt x --drafter magic", "--drafter"),
    ("serve B --drafter magic", "--drafter"),
    ("tune B --prompts GOOD --drafts FILE", "--drafts"),
    ("tune B --prompts GOOD --drafts EMPTYDIR", "not a specedge bundle"),
    ("tune MISSING --prompts GOOD", "not a specedge bundle"),
    *[(f"tune B --prompts GOOD --max-new-tokens {v}", "--max-new-tokens") for v in ("0", "-1", "x")],
    # smoke
    ("smoke MISSING", "not a specedge bundle"),
    *[(f"smoke B --budget-ttft-ms {v}", "--budget-ttft-ms") for v in ("-1", "0", "nan", "inf", "x", "''")],
    *[(f"smoke B --budget-tpot-ms {v}", "--budget-tpot-ms") for v in ("-1", "0", "-inf", "nan")],
    *[(f"smoke B --min-speedup {v}", "--min-speedup") for v in ("-1", "0", "nan", "inf")],
    *[(f"smoke B --max-new-tokens {v}", "--max-new-tokens") for v in ("0", "x")],
    ("smoke B --provider x", "--provider"),
    ("smoke B --junit NOPARENT", "--junit"),
    ("smoke B --json NOPARENT", "--json"),
    ("serve B --port 70000", "--port"),
    ("serve B --k 0", "--k"),
    ("serve B --threads -1", "--threads"),
    ("serve B --queue-size 0", "--queue-size"),
    ("serve B --max-body-bytes 10", "--max-body-bytes"),
    # demo
    *[(f"demo --max-new-tokens {v}", "--max-new-tokens") for v in ("0", "-1", "x")],
    *[(f"demo --k {v}", "--k") for v in ("0", "33", "x")],
    ("demo --workdir FILE", "--workdir"),
    *[(f"demo --heldout {v}", "--heldout") for v in ("-1", "7", "x")],
    *[(f"demo --repeats {v}", "--repeats") for v in ("0", "51", "x")],
    ("demo --model nope", "--model"),
    # the group itself
    ("frobnicate", "No such command"),
    ("generate B --prompt x --no-such-option", "--no-such-option"),
]


def expand(line: str, ws: dict) -> list[str]:
    import shlex

    return [str(ws.get(w, w)) for w in shlex.split(line)]


@pytest.mark.parametrize("line,names", CASES, ids=[c[0] for c in CASES])
def test_cli_refuses(ws, line, names):
    if "LOCKED" in line and ROOT:
        pytest.skip("running as root: chmod 000 does not stop root from reading (the DIR/MISSING rows cover it)")
    argv = expand(line, ws)
    before = tree_hash(ws["B"], ws["W"], ws["T"])
    r = CliRunner().invoke(main, argv)
    assert r.exit_code == 2, r.output
    assert isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.output
    assert names in r.output, r.output
    assert r.output.startswith(("Usage:", "Error:")) or r.output.count("error: ") == 1, r.output
    assert tree_hash(ws["B"], ws["W"], ws["T"]) == before, "a refused command wrote something"
    assert not ws["NEWOUT"].exists() and not Path("/proc/forbidden").exists()


def test_every_command_and_numeric_option_has_rows():
    """The table covers every command, and every option that takes a number or a path."""
    covered = Counter(c[0].split()[0] for c in CASES)
    for name, cmd in main.commands.items():
        assert covered[name] >= 3, name
        for p in cmd.params:
            if isinstance(p.type, (click.IntRange, click.FloatRange, click.Path)) or p.type in (click.INT,
                                                                                                click.FLOAT):
                assert any(c[0].split()[0] == name and (p.opts[0] in c[0] or p.opts[0] == p.name)
                           for c in CASES), f"{name} {p.opts[0]} has no bad-input row"


def test_cli_notes_what_cannot_be_met(ws):
    """--max-new-tokens beyond the context: a note up front on stderr, then the generation runs to the end."""
    r = CliRunner().invoke(main, ["generate", str(ws["B"]), "--prompt", "def f(x):", "--max-new-tokens", "100000",
                                  "--json"])
    assert r.exit_code == 0, r.output
    assert "note: --max-new-tokens 100000 does not fit" in r.stderr
    out = json.loads(r.stdout)   # the random-weight model may draw its end-of-text token before the context is full
    assert out["finish_reason"] in ("context_full", "eos") and len(out["token_ids"]) < 128


# -- hypothesis: the parameter types themselves, and a whole command on arbitrary text ------------------------------
@given(st.one_of(st.floats(), st.text(max_size=12), st.integers().map(str)))
def test_finite_float_types_accept_finite_or_refuse_cleanly(value):
    for t in (POSITIVE, FiniteFloat(min=0), FiniteFloat(0, 1, min_open=True)):
        try:
            v = t.convert(value if isinstance(value, str) else repr(value), None, None)
        except click.BadParameter:
            continue
        assert math.isfinite(v) and v >= 0


def _is_valid(text: str, lo: int, hi: float) -> bool:
    try:
        return lo <= int(text) <= hi   # what click's INT does with a string
    except ValueError:
        return False


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.text(max_size=8), st.integers(-10**6, 15).map(str), st.floats().map(repr)))
def test_export_max_length_any_bad_text(ws, value):
    if _is_valid(value, 16, math.inf) or value.startswith("-") and len(value) > 1 and not value[1:2].isdigit():
        return  # valid, or read by click as another option
    r = CliRunner().invoke(main, ["export", "--target", str(ws["T"]), "--draft", str(ws["D"]), "--out",
                                  str(ws["NEWOUT"]), "--max-length", value])
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit) and "--max-length" in r.output, r.output
    assert not ws["NEWOUT"].exists()


# -- the Python API -----------------------------------------------------------------------------------------------
def test_engine_on_what_is_not_a_bundle(ws, tmp_path):
    for where in (ws["MISSING"], ws["FILE"], ws["EMPTYDIR"], ws["T"]):
        with pytest.raises(BundleError, match="not a specedge bundle"):
            Engine(where)
    broken = tmp_path / "b"
    shutil.copytree(ws["B"], broken)
    for text, match in (("{", "corrupted"), ("[]", "must be a JSON object"), ("\xff", "corrupted"),
                        ('{"schema_version": 1}', "missing")):
        (broken / "manifest.json").write_bytes(text.encode("latin-1"))
        with pytest.raises(BundleError, match=match):
            Engine(broken)
    with pytest.raises(InvalidArgument, match="provider"):
        Engine(ws["B"], provider="npu")


BAD_CONFIGS = [
    dict(max_new_tokens=0), dict(max_new_tokens=-1), dict(max_new_tokens=1.5), dict(max_new_tokens="x"),
    dict(max_new_tokens=True), dict(temperature=math.nan), dict(temperature=math.inf), dict(temperature=-1),
    dict(temperature="0.5"), dict(top_p=0), dict(top_p=1.5), dict(top_p=math.nan), dict(top_k=-1), dict(top_k=1.5),
    dict(k=0), dict(k=100), dict(k=2.0), dict(seed=-1), dict(seed=1.5), dict(seed="x"), dict(stop=("",)),
    dict(stop="\n\n"), dict(stop=(5,)), dict(speculative="yes"), dict(stop=("ok", "a\ud800b")), dict(drafter=["model"]),
    dict(drafter="magic"), dict(adaptive=1), dict(draft_window=-1), dict(draft_window=2.5),
]


@pytest.mark.parametrize("bad", BAD_CONFIGS, ids=[repr(b) for b in BAD_CONFIGS])
def test_generation_config_validates_itself(bad):
    with pytest.raises(InvalidArgument, match=next(iter(bad))) as e:
        GenerationConfig(**bad)
    assert e.value.param.split("[")[0] == next(iter(bad))   # `param` names the field (stop[1]: the item)
    str(e.value).encode("utf-8")                             # and the message never echoes a surrogate


@pytest.fixture(scope="module")
def engine(ws):
    return Engine(ws["B"])


@pytest.mark.parametrize("prompt", ["", [], 5, None, b"def", [-1], [10**9], ["a"], [1.5], {"a": 1}],
                         ids=lambda p: repr(p)[:20])
def test_generate_refuses_bad_prompts(engine, prompt):
    with pytest.raises(InvalidArgument, match="prompt|token ids"):
        engine.generate(prompt, max_new_tokens=4)
    assert engine.generate("def f(x):", max_new_tokens=4).finish_reason in ("length", "eos")  # still usable


def test_prompt_longer_than_the_context(engine):
    with pytest.raises(InvalidArgument, match="context holds"):
        engine.generate([5] * engine.max_length, max_new_tokens=4)


# -- the Python API under abuse: every entry point raises a SpecError naming the argument ---------------------------
# Text that includes category Cs (lone surrogates), which the default st.text() leaves out; and text made to hold one.
ANY_TEXT = st.one_of(st.text(alphabet=st.characters(exclude_categories=()), max_size=12),
                     st.tuples(st.text(max_size=6), st.sampled_from("\ud800\udbff\udc00\udfff"), st.text(max_size=6))
                     .map("".join))
ANY_VALUE = st.one_of(st.none(), st.booleans(), st.integers(-2, 2**40), st.floats(), ANY_TEXT,
                      st.lists(st.integers(-1, 5), max_size=3), st.lists(ANY_TEXT, max_size=2))
FIELDS = [f.name for f in dataclasses.fields(GenerationConfig)]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(FIELDS), ANY_VALUE)
def test_any_config_value_is_taken_or_refused_by_name(name, value):
    try:
        GenerationConfig(**{name: value})
    except InvalidArgument as e:
        assert e.param.split("[")[0] == name, (e.param, name)
        str(e).encode("utf-8")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ANY_TEXT, ANY_TEXT)
def test_any_text_prompt_or_stop_is_taken_or_refused_by_name(engine, prompt, stop):
    try:
        r = engine.generate(prompt, max_new_tokens=2, stop=(stop,) if stop else ())
    except InvalidArgument as e:
        # the request's settings are checked first, then the prompt
        assert e.param == ("prompt" if encodable(stop) else "stop[0]"), (e.param, prompt, stop)
        assert e.param != "prompt" or prompt == "" or not encodable(prompt)
        str(e).encode("utf-8")
    else:
        assert encodable(prompt) and encodable(stop) and r.finish_reason in ("length", "eos", "stop")


def test_surrogates_and_numpy_ids_through_every_text_entry(engine):
    with pytest.raises(InvalidArgument, match="surrogate") as e:
        engine.generate("def f():\ud800 x", max_new_tokens=2)
    assert e.value.param == "prompt"
    with pytest.raises(InvalidArgument, match="surrogate"):
        engine.encode("x\udfff")
    ids = engine.encode("def f(x):\n    return")
    for arr in (np.array(ids, np.int64), np.array(ids, np.int32), np.array(ids, np.uint16)):
        assert engine.generate(arr, max_new_tokens=3).token_ids == engine.generate(ids, max_new_tokens=3).token_ids
    for bad in (np.array([ids]), np.array(ids, np.float32), np.array([-1, 2]), np.array([], np.int64)):
        with pytest.raises(InvalidArgument) as e:
            engine.generate(bad, max_new_tokens=3)
        assert e.value.param == "prompt"


@pytest.mark.parametrize("call,param", [
    (lambda B: Engine(5), "bundle"),
    (lambda B: Engine(B, provider=3), "provider"),
    (lambda B: Engine(B, threads=-1), "threads"),
    (lambda B: Engine(B, threads=1.5), "threads"),
    (lambda B: Engine(B, verify="yes"), "verify"),
    (lambda B: Engine(B, cuda_graph=None), "cuda_graph"),
], ids=["bundle", "provider", "threads", "threads-float", "verify", "cuda_graph"])
def test_engine_arguments(ws, call, param):
    with pytest.raises(InvalidArgument) as e:
        call(ws["B"])
    assert e.value.param == param


@pytest.mark.parametrize("kwargs,param", [
    (dict(config="greedy"), "config"),
    (dict(config=GenerationConfig(), k=2), "k"),
    (dict(max_tokens=5), "max_tokens"),
    (dict(timeout=-1), "timeout"),
    (dict(timeout=math.nan), "timeout"),
    (dict(custom_drafter=object()), "custom_drafter"),
    (dict(k=64), "k"),
    (dict(stop=["\udc80"]), "stop[0]"),
], ids=lambda v: repr(v)[:30])
def test_generator_arguments(engine, kwargs, param):
    for entry in (engine.generator, engine.generate):
        with pytest.raises(InvalidArgument) as e:
            entry("def f(x):", **kwargs)
        assert e.value.param == param
    with pytest.raises(InvalidArgument) as e:
        engine.generate("def f(x):", on_text="print")
    assert e.value.param == "on_text"
    assert engine.generate("def f(x):", max_new_tokens=2).finish_reason in ("length", "eos")   # still usable


def test_generator_methods_after_misuse(engine):
    g = engine.generator(None, max_new_tokens=4)
    for bad in ("def", [1.5], np.array([[1]]), [engine.manifest.tokenizer.vocab_size], None):
        with pytest.raises(InvalidArgument) as e:
            g.append_tokens(bad)
        assert e.value.param == "ids"
    with pytest.raises(InvalidArgument) as e:
        g.append_tokens([5] * engine.max_length)
    assert e.value.param == "ids"
    g.append_tokens(np.array(engine.encode("def f(x):"), np.int64))
    first = next(iter(g))
    with pytest.raises(InvalidArgument, match="after generation started") as e:
        g.append_tokens([5])
    assert e.value.param == "ids"
    r = g.result()
    assert r.token_ids[0] == first and list(g.text_deltas()) == [] and list(g) == []
    g.cancel()
    g.close()                                   # idempotent once finished
    assert g.result().token_ids == r.token_ids and list(g.text_deltas()) == []
    empty = engine.generator(None, max_new_tokens=4)
    with pytest.raises(InvalidArgument, match="prompt is empty") as e:
        list(empty)
    assert e.value.param == "prompt" and empty.finish_reason == "error"
    assert engine.generate("def f(x):", max_new_tokens=2).finish_reason in ("length", "eos")   # released


@pytest.mark.parametrize("rel", ["target/model.onnx", "target/model.onnx.data", "draft/model.onnx", "tokenizer.json"])
def test_engine_without_verify_on_a_truncated_file(ws, tmp_path, rel):
    """verify=False skips the hashes: a truncated graph, its weights or the tokenizer is still a BundleError that
    names the file, never onnxruntime's or tokenizers' own exception."""
    b = tmp_path / "b"
    shutil.copytree(ws["B"], b)
    f = b / rel
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(BundleError, match=rel.replace(".", r"\.")):
        Engine(b, verify=False)
    with pytest.raises(BundleError, match="was modified after export"):
        Engine(b)
