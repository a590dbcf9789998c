"""The quickstart's main job: export the built-in demo pair (cached) and autocomplete a real code prompt, printing
plain vs speculative decoding side by side, and the same on held-out prompts cut from third-party code.

The demo pair (models/demo, see models/README.md) is a Llama target and a distilled ~1/18-size Llama draft trained
on the CPython standard library. Where it is missing (a trimmed install), a tiny random-weight pair is built instead:
that shows the pipeline and its exactness, but random weights give alpha ~ 0 and no speedup.

Honesty: a target that loops ("'a', 'a', 'a', ...") is easy to draft for, so one prompt's speedup can be far above
what real text gets. The demo therefore (1) says so when the completion is a loop (`find_loop`), (2) prints the
same comparison aggregated over held-out prompts (data/heldout.jsonl, third-party code the pair never saw), and (3)
measures like the bench (configurations interleaved, repeated, medians) and says when its timings are not results (a
speedup above tau, repeats that disagree, a busy machine: `problems`).
`spec-export demo --model NAME` (tools/demo_real.py) runs the same comparison on a real pretrained model.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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
    from ..export.quantize import QUANTIZE_VERSION
    from ..runtime.manifest import load_manifest

    bundle, stamp = workdir / "bundle", workdir / "sources.sha256"
    trained = (DEMO / "target" / "config.json").is_file() and (DEMO / "draft" / "config.json").is_file()
    if trained:
        target, draft, max_length = DEMO / "target", DEMO / "draft", 1024
        # the export's choice, and how a quantized target is made, are part of what is cached
        fp = _fingerprint(target, draft) + f" target_precision=auto quantize={QUANTIZE_VERSION}"
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

# Like the bench: every configuration runs REPEATS times on the same prompts, interleaved, and the table shows medians.
# The numbers are called unreliable, not printed as results, when (`problems`) a speedup exceeds MAX_OVER_TAU x tau
# (every round costs at least one target pass, so a speedup above tau means the plain runs were slowed down), a
# configuration's tokens/s varies more than MAX_SPREAD between repeats (p90/p10), or other processes used more than
# MAX_OTHERS_CPU of the machine's CPU time while it ran (`others_cpu_share`).
REPEATS = 3              # triples the generating: seconds on the built-in pair, a minute or two on Gemma 3 270M
MAX_OVER_TAU, MAX_SPREAD, MAX_OTHERS_CPU = 1.05, 1.25, 0.10


@dataclass(frozen=True)
class Config:
    label: str       # what the table calls it: "plain", "speculative, k 4", "lookup, k 4"
    engine: object   # the Engine that runs it (a second bundle for another draft)
    options: dict    # GenerationConfig fields


@dataclass(frozen=True)
class Row:
    label: str
    stats: Stats                      # one repeat summed over the prompts: alpha and tau (greedy: every repeat alike)
    tokens_per_s: tuple[float, ...]   # [repeat] total new tokens / total decode time over the prompts
    speedups: tuple[float, ...]       # [repeat] tokens_per_s over the first row's (plain) in the same repeat
    identical: int                    # prompts whose output equals plain decoding's in every repeat
    prompts: int

    @property
    def median_tokens_per_s(self) -> float:
        return float(np.median(self.tokens_per_s))

    @property
    def speedup(self) -> float:
        return float(np.median(self.speedups))

    @property
    def spread(self) -> float:
        """p90/p10 of tokens/s over the repeats: 1.0 when they agree."""
        lo, hi = np.percentile(self.tokens_per_s, [10, 90])
        return float(hi / lo) if lo > 0 else float("inf")


@dataclass(frozen=True)
class Measurement:
    rows: list[Row]
    texts: list[str]                  # [prompt] the first configuration's (plain) completion
    repeats: int
    others_cpu: float | None          # share of the machine's CPU time other processes used; None without /proc

    @property
    def problems(self) -> list[str]:
        return problems(self.rows, self.others_cpu)


def heldout_prompts(n: int) -> list[tuple[str, str]]:
    """The first n (source, prompt) pairs of the shipped held-out set."""
    lines = HELDOUT.read_text(encoding="utf-8").splitlines()
    return [(d["source"], d["prompt"]) for d in map(json.loads, lines[:n])]


def measure(configs: list[Config], prompts: list[str], max_new_tokens: int, repeats: int = REPEATS,
            progress=None) -> Measurement:
    """Greedy generation of every prompt with every configuration, `repeats` times (the first configuration is the
    reference, plain decoding); one untimed warm-up each. Each repeat runs every prompt through every configuration,
    the order rotated from one (repeat, prompt) to the next: no configuration always runs first or last. Tokens/s of
    a repeat aggregates its prompts as total new tokens / total decode time."""
    assert configs and not configs[0].options.get("speculative", True), "the first configuration is plain"
    assert repeats >= 1 and prompts
    for c in configs:
        c.engine.generate(prompts[0], max_new_tokens=WARMUP_TOKENS, **c.options)
    runs = {c.label: [[None] * len(prompts) for _ in range(repeats)] for c in configs}   # [repeat][prompt] Result
    before = cpu_sample()
    for rep in range(repeats):
        for i, prompt in enumerate(prompts):
            turn = rep * len(prompts) + i
            for c in configs[turn % len(configs):] + configs[:turn % len(configs)]:
                if progress:
                    progress(f"repeat {rep + 1}/{repeats}, prompt {i + 1}/{len(prompts)}: {c.label}")
                runs[c.label][rep][i] = c.engine.generate(prompt, max_new_tokens=max_new_tokens, **c.options)
    others = others_cpu_share(before, cpu_sample())
    reference = runs[configs[0].label]
    plain_tps = [_total(rs).tokens_per_s for rs in reference]
    rows = []
    for c in configs:
        tps = tuple(_total(rs).tokens_per_s for rs in runs[c.label])
        same = sum(all(runs[c.label][rep][i].token_ids == reference[rep][i].token_ids for rep in range(repeats))
                   for i in range(len(prompts)))
        rows.append(Row(c.label, _total(runs[c.label][0]), tps,
                        tuple(t / p if p else 0.0 for t, p in zip(tps, plain_tps)), same, len(prompts)))
    return Measurement(rows, [r.text for r in reference[0]], repeats, others)


def _total(results) -> Stats:
    return Stats(**{f: sum(getattr(r.stats, f) for r in results)
                    for f in ("new_tokens", "decode_ms", "tested", "accepted", "rounds")})


def problems(rows: list[Row], others_cpu: float | None) -> list[str]:
    """Why the timings are not results (empty when they are): the three rules at the top of this section."""
    out = []
    if others_cpu is not None and others_cpu > MAX_OTHERS_CPU:
        out.append(f"other processes used {others_cpu:.0%} of the CPU meanwhile (at most {MAX_OTHERS_CPU:.0%})")
    for r in rows[1:]:
        tau = r.stats.mean_accepted_length
        if r.speedup > MAX_OVER_TAU * tau:
            out.append(f"{r.label}: {r.speedup:.2f}x at tau {tau:.2f}, more than every round's one target pass "
                       f"allows")
    for r in rows:
        if len(r.tokens_per_s) < 2:
            out.append(f"{r.label}: one repeat, so how much it varies is unknown (--repeats 3)")
            break
        if r.spread > MAX_SPREAD:
            out.append(f"{r.label}: tokens/s varied {r.spread:.2f}x between repeats (p90/p10, at most "
                       f"{MAX_SPREAD:.2f})")
    return out


def cpu_sample() -> tuple[str, str] | None:
    """(/proc/stat, /proc/self/stat) now, or None where there is no /proc (macOS, Windows)."""
    try:
        return Path("/proc/stat").read_text(), Path("/proc/self/stat").read_text()
    except OSError:
        return None


def others_cpu_share(before: tuple[str, str] | None, after: tuple[str, str] | None) -> float | None:
    """The share of the machine's CPU time that other processes (and other virtual machines: steal) were busy
    between two `cpu_sample`s: busy jiffies of all cores (the `cpu` line of /proc/stat sums them) minus this
    process's own utime + stime (its /proc/self/stat counts all its threads), over all jiffies of all cores."""
    if before is None or after is None:
        return None

    def machine(text):        # (busy, total): user nice system idle iowait irq softirq steal; guest is inside user
        f = [int(x) for x in next(line for line in text.splitlines() if line.startswith("cpu ")).split()[1:9]]
        return sum(f) - f[3] - f[4], sum(f)

    def own(text):            # utime + stime: fields 14 and 15, counted after the ")" that ends the command name
        f = text[text.rindex(")") + 2:].split()
        return int(f[11]) + int(f[12])

    (busy0, total0), (busy1, total1) = machine(before[0]), machine(after[0])
    if total1 <= total0:
        return None
    return min(1.0, max(0.0, (busy1 - busy0 - (own(after[1]) - own(before[1]))) / (total1 - total0)))


def table(m: Measurement) -> str:
    """One line per configuration: median tokens/s, speedup over the first row (plain), alpha, tau, exactness. When
    the timings are unreliable (`timing_warning` says why), each of them carries a "?"."""
    rows, mark = m.rows, "?" if m.problems else " "
    width = max(len(r.label) for r in rows)
    lines = [f"  {'':{width}}  {'tok/s':>7}   {'vs plain':>8}   {'alpha':>5}  {'tau':>5}  output"]
    for r in rows:
        tps = f"{r.median_tokens_per_s:7.1f}{mark}"
        if r is rows[0]:
            lines.append(f"  {r.label:{width}}  {tps}  {'1.00x':>8}   {'-':>5}  {'-':>5}  reference")
            continue
        same = ("identical" if r.identical == r.prompts else
                f"DIFFERENT on {r.prompts - r.identical} of {r.prompts} (a bug: please report it)")
        alpha = f"{r.stats.alpha:5.2f}" if r.stats.tested else f"{'-':>5}"   # nothing drafted (lookup found no match)
        lines.append(f"  {r.label:{width}}  {tps}  {r.speedup:7.2f}x{mark}  {alpha}  "
                     f"{r.stats.mean_accepted_length:5.2f}  {same}")
    return "\n".join(lines)


def timing_warning(m: Measurement) -> str | None:
    """The plain-words note printed above an unreliable table, or None."""
    if not m.problems:
        return None
    return ("UNRELIABLE timing: the tok/s and speedups below (marked ?) are not results; rerun on a quiet machine:\n"
            + "\n".join(f"  - {why}" for why in m.problems))


def loop_warning(text: str, heldout: int) -> str | None:
    """The plain-words note printed under a looping completion, or None."""
    loop = find_loop(text)
    if loop is None:
        return None
    see = "see the held-out numbers below" if heldout else "add --heldout 6 for numbers on held-out prompts"
    return (f"note: this completion is a loop ({loop.unit!r} repeated {loop.times} times, {loop.share:.0%} of the "
            f"text). A looping model is easy to draft for, so the speedup on this prompt is not typical: {see}.")
