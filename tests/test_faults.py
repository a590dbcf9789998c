"""Faults: exports killed at every stage, bundles changed after export, manifests edited into nonsense, generations
cancelled from another thread. Nothing is left half-done and every refusal names what is wrong."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from specedge.export.bundle import _make_partial, stale_leftovers
from specedge.runtime import BundleError, Engine
from specedge.runtime.manifest import load_manifest
from specedge.tools.cli import main

SPEC_EXPORT = str(Path(sys.executable).parent / "spec-export")
STAGES = 6  # the export's progress steps, [0/6] .. [5/6]


def tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def builders_running(tag: str) -> list[int]:
    """PIDs of processes whose command line mentions `tag` (the model builder writing into a partial folder)."""
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if tag.encode() in (p / "cmdline").read_bytes():
                    pids.append(int(p.name))
            except OSError:
                pass
    return pids


def export_cmd(target, draft, out) -> list[str]:
    return [SPEC_EXPORT, "export", "--target", str(target), "--draft", str(draft), "--out", str(out),
            "--max-length", "32", "--force"]


def interrupt(cmd: list[str], stage: int, sig: int, delay: float = 0.0) -> tuple[int, str]:
    """Run an export and send `sig` once it reports step `stage` (plus `delay` seconds into it); (exit code, stderr)."""
    # as from a terminal: a shell running the suite in the background (`make test &`) ignores SIGINT, and the export
    # would inherit that
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    for line in p.stderr:
        seen.append(line)
        if line.startswith(f"[{stage}/{STAGES}]"):
            time.sleep(delay)
            p.send_signal(sig)
            break
    else:
        pytest.fail(f"the export ended before step {stage}:\n{''.join(seen)}")
    seen.append(p.stderr.read())
    return p.wait(timeout=120), "".join(seen)


def test_export_killed_at_every_stage(checkpoints, bundles, tmp_path):
    """SIGKILL, SIGINT and SIGTERM during an export: the destination is absent or the previous bundle intact, no
    builder runs on, and the next export succeeds, removes the stale folders, says so, and leaves nothing else.

    Steps 0 and 1 get a real SIGKILL each. Steps 2 to 4 cost one more model build or validation each, so one export
    is frozen there (SIGSTOP: what a SIGKILL would leave on disk, checked while the process still holds it), then
    SIGKILLed at step 5: one export instead of three, on a machine where an export of tiny models takes 20-70 s."""
    target, draft = checkpoints("llama")
    out = tmp_path / "bundle"
    cmd = export_cmd(target, draft, out)
    faults = 0

    # a fresh destination, killed while the builder writes the target graph: it stays absent, no orphan runs on
    interrupt(cmd, 1, signal.SIGKILL, delay=1.0)
    faults += 1
    assert not out.exists() and len(leftovers(out)) == 1
    deadline = time.time() + 10
    while builders_running(leftovers(out)[0]) and time.time() < deadline:
        time.sleep(0.1)
    assert not builders_running(leftovers(out)[0]), "the model builder outlived its killed export"

    shutil.copytree(bundles("llama"), out)
    before, prev = tree_hash(out), leftovers(out)
    # SIGINT (Ctrl-C) and SIGTERM (a CI job cancelled), inside the builder: the export removes the stale folder,
    # then its own
    for sig, code in ((signal.SIGINT, 1), (signal.SIGTERM, 143)):
        rc, err = interrupt(cmd, 1, sig, delay=0.5)
        faults += 1
        assert rc == code and "Traceback" not in err, err
        assert all(f"removed {name}, left beside bundle by an interrupted export" in err for name in prev), err
        assert tree_hash(out) == before and leftovers(out) == []
        prev = []

    rc, _ = interrupt(cmd, 0, signal.SIGKILL)
    faults += 1
    assert rc == -signal.SIGKILL and tree_hash(out) == before
    prev = leftovers(out)
    assert len(prev) == 1

    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = []
    try:
        for line in p.stderr:
            seen.append(line)
            if line.startswith("[5/"):
                p.kill()
                break
            if line.startswith(("[2/", "[3/", "[4/")):
                p.send_signal(signal.SIGSTOP)
                faults += 1
                assert tree_hash(out) == before                     # the destination is untouched at every step
                own = leftovers(out)                                # the stale one is gone, this one is in use
                assert len(own) == 1 and own != prev and stale_leftovers(out) == []
                p.send_signal(signal.SIGCONT)
        rc = p.wait(timeout=60)
    finally:
        p.kill()
    faults += 1
    assert f"removed {prev[0]}, left beside bundle by an interrupted export" in "".join(seen)
    assert rc in (0, -signal.SIGKILL)
    if out.exists():   # a whole bundle: the previous one, or the new one where the kill came after the swap
        load_manifest(out, verify=True)
        assert tree_hash(out) == before or load_manifest(out).target.max_length == 32
    else:              # killed between the swap's two renames (microseconds): the previous bundle is in .old-*
        assert any(".old-" in n for n in leftovers(out))
    stale = leftovers(out)
    assert len(stale) <= 2

    # the next export, with a stricter umask: removes the stale folder, says so, and leaves an ordinary bundle
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, preexec_fn=lambda: os.umask(0o027))
    assert r.returncode == 0, r.stderr
    for name in stale:
        assert f"removed {name}, left beside bundle by an interrupted export" in r.stderr
    assert leftovers(out) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
    assert load_manifest(out, verify=True).target.max_length == 32
    assert stat.S_IMODE(out.stat().st_mode) == 0o750                # mkdtemp's 0700 would lock out the group
    for p in out.rglob("*"):
        assert stat.S_IMODE(p.stat().st_mode) == (0o750 if p.is_dir() else 0o640), p
    print(f"export faults injected: {faults}")


def test_stale_leftovers_are_told_apart_from_live_ones(tmp_path):
    """A folder is stale when the PID in its name is gone, or, without a PID (older versions), after an hour."""
    out = tmp_path / "b"
    dead = subprocess.Popen(["true"])
    dead.wait()
    names = {f".b.partial-{dead.pid}-x1y2": True, f".b.old-{dead.pid}-1700000000": True,
             f".b.partial-{os.getpid()}-abcd": False,          # a live export (this process)
             ".b.partial-oldfmt01": False, ".b.partial-oldfmt02": True,  # no PID: young, and two hours old
             ".c.partial-99999999-zz": False}                  # another destination's
    for n in names:
        (tmp_path / n).mkdir()
        (tmp_path / n / "model.onnx").write_bytes(b"x")
    two_hours_ago = time.time() - 7200
    os.utime(tmp_path / ".b.partial-oldfmt02", (two_hours_ago, two_hours_ago))
    assert sorted(p.name for p in stale_leftovers(out)) == sorted(n for n, s in names.items() if s)

    notes = []
    tmp, created = _make_partial(out, notes.append)   # what export_bundle does first
    assert len(notes) == 3 and all(n.startswith("removed .b.") for n in notes) and created == []
    assert tmp.name.startswith(f".b.partial-{os.getpid()}-")
    tmp.rmdir()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for n, s in names.items() if not s)


@pytest.fixture(scope="module")
def bundle_copy(bundles, tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "bundle"
    shutil.copytree(bundles("llama"), out)
    return out


def test_one_byte_changed_in_any_hashed_file(bundle_copy):
    """Every file the manifest hashes, one byte flipped in its middle (then restored): inspect and Engine refuse,
    naming the file. A missing file too."""
    files = load_manifest(bundle_copy).files
    assert {"tokenizer.json", "target/model.onnx", "draft/model.onnx"} <= set(files)
    for rel in files:
        path = bundle_copy / rel
        data = path.read_bytes()
        i = len(data) // 2
        path.write_bytes(data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1:])
        try:
            r = CliRunner().invoke(main, ["inspect", str(bundle_copy)])
            assert r.exit_code == 2 and f"bundle file {rel} was modified" in r.output, r.output
            assert "Traceback" not in r.output
            with pytest.raises(BundleError, match=f"bundle file {rel} was modified"):
                Engine(bundle_copy)
        finally:
            path.write_bytes(data)
        path.rename(path.with_name(path.name + ".moved"))
        try:
            with pytest.raises(BundleError, match=f"bundle file {rel} is missing"):
                Engine(bundle_copy)
        finally:
            path.with_name(path.name + ".moved").rename(path)
    Engine(bundle_copy)  # restored: accepted again
    print(f"hashed files: {len(files)}, faults injected: {2 * len(files)}")


def _set(path: list, value):
    def edit(d):
        for key in path[:-1]:
            d = d[key]
        d[path[-1]] = value
    return edit


def _drop(path: list):
    def edit(d):
        for key in path[:-1]:
            d = d[key]
        del d[path[-1]]
    return edit


# (edit, what the error must name)
MANIFEST_EDITS = [
    (_set(["target", "num_layers"], "2"), "target.num_layers must be an integer"),
    (_set(["draft", "head_dim"], 0), "draft.head_dim must be at least 1"),
    (_set(["target", "attention_rows"], 0), "target.attention_rows must be at least 1"),
    (_set(["target", "attention_rows"], "2"), "target.attention_rows must be an integer"),
    (_set(["target", "max_length"], 12.5), "target.max_length must be an integer"),
    (_set(["target", "rewindable"], "yes"), "target.rewindable must be true or false"),
    (_set(["target", "kv_layout"], "paged"), "target.kv_layout must be 'inplace' or 'concat'"),
    (_set(["target", "inputs"], "input_ids"), "target.inputs must be a list"),
    (_set(["draft", "graph"], "../../etc/passwd"), "draft.graph must be a relative path inside the bundle"),
    (_set(["draft", "role"], "target"), "draft.role must be 'draft'"),
    (_set(["target", "flavour"], 1), "target.flavour is unknown"),
    (_drop(["target", "num_kv_heads"]), "target.num_kv_heads is missing"),
    (_drop(["draft"]), "'draft' is missing"),
    (_drop(["files"]), "files is missing"),
    (_set(["tokenizer"], []), "tokenizer must be an object, got a list"),
    (_set(["tokenizer", "eos_token_ids"], [0, "a"]), "tokenizer.eos_token_ids[1] must be an integer"),
    (_set(["tokenizer", "add_bos"], None), "tokenizer.add_bos must be true or false"),
    (_set(["tokenizer", "files"], ["/etc/passwd"]), "tokenizer.files[0] must be a relative path"),
    (_set(["files"], ["tokenizer.json"]), "files must be an object"),
    (_set(["files", "tokenizer.json"], "abc"), "must be a sha256 hex digest"),
    (_set(["files", "/etc/shadow"], "0" * 64), "must be a relative path inside the bundle"),
    (_set(["defaults", "k"], 100), "defaults.k must be an integer from 1 to 32"),
    (_set(["defaults", "k"], 0), "defaults.k must be an integer from 1 to 32"),
    (_set(["defaults", "k"], "4"), "defaults.k must be an integer from 1 to 32"),
    (_set(["defaults", "speculative"], "no"), "defaults.speculative must be true or false"),
    (_set(["defaults"], [4]), "defaults must be an object"),
    (_set(["parity"], "good"), "parity must be an object"),
    (_set(["parity", "target"], "good"), "parity.target must be an object"),
    (_set(["parity", "target", "top1_agreement"], "1.0"), "parity.target.top1_agreement must be a number"),
    (_set(["schema_version"], 2), "schema version 2 is not supported"),
    (_set(["schema_version"], "1"), "schema version '1' is not supported"),
    (_drop(["schema_version"]), "schema version None is not supported"),
]
RAW_MANIFESTS = [("not json {", "corrupted"), ('["a", "list"]', "must be a JSON object, got a list"),
                 ("42", "must be a JSON object, got a number"), ("", "corrupted"), ("\xff\xfe", "corrupted")]


def test_manifest_edited_into_nonsense(bundle_copy):
    path = bundle_copy / "manifest.json"
    good = path.read_text()
    cases = [(lambda d, e=e: e(d), why) for e, why in MANIFEST_EDITS] + [(text, why) for text, why in RAW_MANIFESTS]
    try:
        for edit, why in cases:
            if isinstance(edit, str):
                path.write_bytes(edit.encode("latin-1"))
            else:
                d = json.loads(good)
                edit(d)
                path.write_text(json.dumps(d))
            r = CliRunner().invoke(main, ["inspect", str(bundle_copy)])
            assert r.exit_code == 2 and why in r.output and "Traceback" not in r.output, (why, r.output)
            assert r.output.startswith(f"error: {path}")           # the file, then the field
            with pytest.raises(BundleError, match="manifest"):
                Engine(bundle_copy)
    finally:
        path.write_text(good)
    Engine(bundle_copy)
    print(f"manifest faults injected: {len(cases)}")


def test_cancelled_from_another_thread_then_exact(bundles):
    """Cancel mid-generation from a second thread: the request ends 'cancelled' and the next ones are exact."""
    engine = Engine(bundles("llama"))
    prompts = ["def f(x):\n    return", "import os\nimport sys\n", "class A:\n    def __init__(self):"]
    want = {p: engine.generate(p, max_new_tokens=48, k=3) for p in prompts}
    sampled = engine.generate(prompts[1], max_new_tokens=48, temperature=0.8, seed=7)
    long = max(prompts, key=lambda p: len(want[p].token_ids))
    assert len(want[long].token_ids) >= 8, "no prompt gives a response long enough to cancel in the middle"

    for after in (1, 4):   # cancel after the first token, and after a few rounds
        g = engine.generator(long, max_new_tokens=48, k=3)
        go = threading.Event()
        t = threading.Thread(target=lambda: (go.wait(10), g.cancel()))
        t.start()
        got = []
        for token in g:
            got.append(token)
            if len(got) == after:
                go.set()
                t.join()
        r = g.result()
        assert r.finish_reason == "cancelled" and len(r.token_ids) < len(want[long].token_ids)
        assert r.token_ids == want[long].token_ids[: len(r.token_ids)]    # what it gave before stopping was right
        for p in prompts:   # the engine serves on, exactly (prefix reuse over the cancelled request's cache)
            assert engine.generate(p, max_new_tokens=48, k=3).token_ids == want[p].token_ids
        assert engine.generate(prompts[1], max_new_tokens=48, temperature=0.8, seed=7).token_ids == \
            sampled.token_ids



def test_a_draft_chain_past_the_cache_moves_nothing(bundles):
    """greedy_chain goes through the same guarded bookkeeping as forward: a feed and chain that would run past the
    cache are refused before anything runs (position, seen tokens and cache rows unchanged); one that fits ends as
    the host loop ends, its time counted."""
    import numpy as np

    from specedge.runtime.errors import InvalidArgument
    from specedge.runtime.kv import InplaceKV, KVModel, open_model

    engine = Engine(bundles("llama"))
    d, host = engine.draft, open_model(engine.bundle, engine.draft.spec)
    assert isinstance(d, InplaceKV) and d._has_argmax
    L = d.spec.max_length
    ids = list(range(3, L - 3))                                              # L - 6 tokens
    for m in (d, host):
        m.reset()
        m.forward(ids[:-1], want=None)
    before = (d.pos, list(d.seen), [a.copy() for a in d.kv(0)], d.run_s)
    with pytest.raises(InvalidArgument, match="8 tokens at position .* do not fit the draft cache"):
        d.greedy_chain(ids[-1:] + [7, 8], 6)                                 # 3 + 5 rows from L - 7: one too many
    assert (d.pos, d.seen, d.run_s) == (before[0], before[1], before[3])
    assert all(np.array_equal(a, b) for a, b in zip(d.kv(0), before[2]))
    chained = d.greedy_chain(ids[-1:] + [7, 8], 5)                            # ends exactly at L
    assert chained.tolist() == KVModel.greedy_chain(host, ids[-1:] + [7, 8], 5).tolist()
    assert d.pos == host.pos == L and d.seen == host.seen and d.run_s > before[3]
