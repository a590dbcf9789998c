"""The quickstart's main job: export the built-in demo pair (cached) and autocomplete a real code prompt, printing
plain vs speculative decoding side by side, and the same on held-out prompts cut from third-party code.

The demo pair (models/demo, see models/README.md) is a Llama target and a distilled ~1/18-size Llama draft trained
on the CPython standard library. Where it is missing (a trimmed install), a tiny random-weight pair is built instead:
that shows the pipeline and its exactness, but random weights give alpha ~ 0 and no speedup.

Honesty: a target that loops ("'a', 'a', 'a', ...") is easy to draft for, so one prompt's speedup can be far above
what real text gets. The demo therefore (1) says so when the completion is a loop (`find_loop`), and (2) prints the
same comparison aggregated over held-out prompts (data/heldout.jsonl, third-party code the pair never saw).
`spec-export demo --model NAME` (tools/demo_real.py) runs the same comparison on a real pretrained model.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..runtime.errors import SpecError
from ..runtime.stats import Stats

# read_config done, write_config to write. Chosen because neither the first demo pair nor its retrained target
# (checked 2026-11-25) falls into a loop on it, where the old prompt (read_config alone) made both loop; a real model
# copies from the function above, which is what prompt lookup is for.
PROMPT = ('import json\n\n\ndef read_config(path):\n    """Read a JSON config file and return it as a dict."""\n'
          '    with open(path, encoding="utf-8") as f:\n        return json.load(f)\n\n\ndef write_config(path, config):\n')
HELDOUT = Path(__file__).resolve().parent / "data" / "heldout.jsonl"   # package data (see its NOTICE.md)
HELDOUT_PROMPTS = 6      # lines in HELDOUT: one prompt from each of six packages
HELDOUT_TOKENS = 48      # new tokens per held-out prompt: 6 x 48 x 2 configurations take a few seconds on 2 cores
WARMUP_TOKENS = 4        # an untimed first generation per configuration: onnxruntime's first run is slow

# The loop rule (find_loop): a piece of text of 1..LOOP_MAX_UNIT characters, not only whitespace, repeated back to
# back at least LOOP_MIN_REPEATS times, covering at least LOOP_MIN_SHARE of the completion. Indentation (whitespace)
# and the short repeats of ordinary code (a ruler "# =====", "0, 0, 0" in a table) stay below it.
LOOP_MAX_UNIT, LOOP_MIN_REPEATS, LOOP_MIN_SHARE = 64, 3, 1 / 3

DEMO = Path(__file__).resolve().parent.parent / "models" / "demo"   # the repository layout (editable installs)
if not DEMO.is_dir():
    from .. import models as _models

    DEMO = Path(_models.__file__).resolve().parent / "demo"           # an installed wheel ships it as package data


def _fingerprint(*dirs: Path) -> str:
    """Hash of the source checkpoints: the bundle is rebuilt when they change (stale), not only when missing."""
    h = hashlib.sha256()
    for d in dirs:
        for f in sorted(d.iterdir()):
            if f.is_file():
                h.update(f.name.encode())
                h.update(f.read_bytes())
    return h.hexdigest()


def ensure_bundle(workdir: Path, say=print) -> Path:
    """Export the demo pair once; reuse the bundle while it verifies and its sources are unchanged."""
    from ..export.bundle import ExportOptions, export_bundle
    from ..runtime.manifest import load_manifest

    bundle, stamp = workdir / "bundle", workdir / "sources.sha256"
    trained = (DEMO / "target" / "config.json").is_file() and (DEMO / "draft" / "config.json").is_file()
    if trained:
        target, draft, max_length = DEMO / "target", DEMO / "draft", 1024
        fp = _fingerprint(target, draft)
        try:
            if stamp.read_text() == fp:
                load_manifest(bundle, verify=True)
                return bundle
        except (OSError, SpecError):
            pass
        say(f"exporting the demo pair from {DEMO} into {bundle} (once)...")
    else:
        try:
            load_manifest(bundle, verify=True)
            return bundle
        except SpecError:
            pass
        from ..models import tiny

        say(f"no trained demo pair in {DEMO}: building a tiny random-weight pair in {workdir} (once)...")
        tok = tiny.train_tokenizer(workdir / "tokenizer")
        target = tiny.build_tiny(workdir / "target", "llama", tok, layers=4, hidden=256, heads=8, kv_heads=4,
                                 inter=768, max_pos=2048)
        draft = tiny.build_tiny(workdir / "draft", "llama", tok, seed=1, layers=1, hidden=64, heads=4, kv_heads=2,
                                inter=128, max_pos=2048)
        max_length, fp = 2048, ""   # room for the held-out prompts (~1,100 tiny-tokenizer tokens)
    export_bundle(ExportOptions(target=target, draft=draft, out=bundle, max_length=max_length, force=True),
                  progress=lambda i, n, text: say(f"  [{i}/{n}] {text}"), log=lambda text: say(f"  {text}"))
    workdir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(fp)
    return bundle


# -- loops ------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Loop:
    unit: str        # the repeated piece of text
    times: int       # back-to-back repeats
    share: float     # of the completion's characters inside the repeats


def find_loop(text: str) -> Loop | None:
    """The longest back-to-back repeat in `text` if it makes the text a loop by the rule above, else None."""
    best = None                                        # (covered characters, unit length, start)
    for n in range(1, min(LOOP_MAX_UNIT, len(text) // LOOP_MIN_REPEATS) + 1):
        run = 0                                        # consecutive i with text[i] == text[i + n]
        for i in range(len(text) - n + 1):
            if i + n < len(text) and text[i] == text[i + n]:
                run += 1
                continue
            start, covered = i - run, run + n          # text[start : start + covered] has period n
            if run >= (LOOP_MIN_REPEATS - 1) * n and text[start:start + n].strip() \
                    and (best is None or covered > best[0]):
                best = (covered, n, start)
            run = 0
    if best is None or best[0] < LOOP_MIN_SHARE * len(text):
        return None
    covered, n, start = best
    return Loop(unit=text[start:start + n], times=covered // n, share=covered / len(text))


# -- measuring --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Config:
    label: str       # what the table calls it: "plain", "speculative, k 4", "lookup, k 4"
    engine: object   # the Engine that runs it (a second bundle for another draft)
    options: dict    # GenerationConfig fields


@dataclass(frozen=True)
class Row:
    label: str
    stats: Stats     # summed over the prompts: tokens/s, alpha and tau come from its properties
    identical: int   # prompts whose output equals plain decoding's
    prompts: int


def heldout_prompts(n: int) -> list[tuple[str, str]]:
    """The first n (source, prompt) pairs of the shipped held-out set."""
    lines = HELDOUT.read_text(encoding="utf-8").splitlines()
    return [(d["source"], d["prompt"]) for d in map(json.loads, lines[:n])]


def measure(configs: list[Config], prompts: list[str], max_new_tokens: int, progress=None):
    """Greedy generation of every prompt with every configuration, configurations interleaved prompt by prompt
    (the first is the reference, plain decoding); one untimed warm-up each. Returns (rows, completions of the
    first configuration, one per prompt). Tokens/s aggregates as total new tokens / total decode time."""
    assert configs and not configs[0].options.get("speculative", True), "the first configuration is plain"
    for c in configs:
        c.engine.generate(prompts[0], max_new_tokens=WARMUP_TOKENS, **c.options)
    results = {c.label: [] for c in configs}
    for i, prompt in enumerate(prompts):
        for c in configs:
            if progress:
                progress(f"prompt {i + 1}/{len(prompts)}: {c.label}")
            results[c.label].append(c.engine.generate(prompt, max_new_tokens=max_new_tokens, **c.options))
    reference = results[configs[0].label]
    rows = []
    for c in configs:
        rs = results[c.label]
        total = Stats(**{f: sum(getattr(r.stats, f) for r in rs)
                         for f in ("new_tokens", "decode_ms", "tested", "accepted", "rounds")})
        rows.append(Row(c.label, total, sum(r.token_ids == ref.token_ids for r, ref in zip(rs, reference)), len(rs)))
    return rows, [r.text for r in reference]


def table(rows: list[Row]) -> str:
    """One line per configuration: tokens/s, speedup over the first row (plain), alpha, tau, exactness."""
    width = max(len(r.label) for r in rows)
    plain = rows[0].stats.tokens_per_s
    lines = [f"  {'':{width}}  {'tok/s':>7}  {'vs plain':>8}  {'alpha':>5}  {'tau':>5}  output"]
    for r in rows:
        if r is rows[0]:
            lines.append(f"  {r.label:{width}}  {r.stats.tokens_per_s:7.1f}  {'1.00x':>8}  {'-':>5}  {'-':>5}  reference")
            continue
        same = ("identical" if r.identical == r.prompts else
                f"DIFFERENT on {r.prompts - r.identical} of {r.prompts} (a bug: please report it)")
        alpha = f"{r.stats.alpha:5.2f}" if r.stats.tested else f"{'-':>5}"   # nothing drafted (lookup found no match)
        lines.append(f"  {r.label:{width}}  {r.stats.tokens_per_s:7.1f}  {r.stats.tokens_per_s / plain:7.2f}x  {alpha}  "
                     f"{r.stats.mean_accepted_length:5.2f}  {same}")
    return "\n".join(lines)


def loop_warning(text: str, heldout: int) -> str | None:
    """The plain-words note printed under a looping completion, or None."""
    loop = find_loop(text)
    if loop is None:
        return None
    see = "see the held-out numbers below" if heldout else "add --heldout 6 for numbers on held-out prompts"
    return (f"note: this completion is a loop ({loop.unit!r} repeated {loop.times} times, {loop.share:.0%} of the "
            f"text). A looping model is easy to draft for, so the speedup on this prompt is not typical: {see}.")
