"""`spec-export`: the command line. The only place where SpecError becomes a message and an exit code."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..runtime.errors import SpecError


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except SpecError as e:
            click.secho(f"error: {e}", fg="red", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="specedge")
def main():
    """Speculative decoding at the edge: export a same-family target + draft, generate exactly and fast.

    \b
    Examples:
      spec-export check  --target ./llama-1b --draft ./llama-60m
      spec-export export --target ./llama-1b --draft ./llama-60m --out ./bundle
      spec-export inspect ./bundle
      spec-export generate ./bundle --prompt "def quicksort(xs):" --max-new-tokens 64 --json
    """


@main.command()
@click.option("--target", type=click.Path(path_type=Path), required=True, help="Target checkpoint folder (HF).")
@click.option("--draft", type=click.Path(path_type=Path), required=True, help="Draft checkpoint folder (HF).")
@click.option("--target-precision", type=click.Choice(["fp32", "fp16", "int8", "int4"]), default="fp32",
              show_default=True, help="Precision the target will be exported in (the size rule compares bytes).")
@click.option("--draft-precision", type=click.Choice(["int4", "int8", "fp16", "fp32", "fp8"]), default="int4",
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
@click.option("--target", type=click.Path(path_type=Path), required=True, help="Target checkpoint folder (HF).")
@click.option("--draft", type=click.Path(path_type=Path), required=True, help="Draft checkpoint folder (HF).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Bundle folder to write.")
@click.option("--target-precision", type=click.Choice(["fp32", "fp16", "int8", "int4"]), default=None,
              help="Default: fp32 on cpu/trt, fp16 on cuda/rtx (fp16 is refused on cpu).")
@click.option("--draft-precision", type=click.Choice(["int4", "int8", "fp16", "fp32", "fp8"]), default=None,
              help="Default: int4; fp8 on trt (fp8 is for TensorRT only).")
@click.option("--device", type=click.Choice(["cpu", "cuda", "rtx", "trt"]), default="cpu", show_default=True,
              help="What the graphs are built for: cpu, cuda (onnxruntime-gpu), rtx (TensorRT-RTX plugin), "
                   "trt (native TensorRT via onnxruntime).")
@click.option("--max-length", type=click.IntRange(16, None), default=2048, show_default=True,
              help="Context length (prompt + response) the KV buffers hold.")
@click.option("--k", type=click.IntRange(1, 32), default=4, show_default=True, help="Default draft length.")
@click.option("--force", is_flag=True, help="Replace an existing bundle (atomically).")
@click.option("--draft-vocab", type=click.IntRange(0, None), default=0,
              help="Keep only the N most frequent tokens in the draft's LM head (cheaper draft steps for 100k+ "
                   "vocabularies; exactness is unchanged). Default: the full vocabulary.")
@click.option("--draft-vocab-corpus", type=click.Path(path_type=Path), default=None,
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
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), transient=True) as bar:
        task = bar.add_task("export", total=6)
        m = export_bundle(opts, progress=lambda i, n, text: bar.update(task, completed=i, description=text))
    click.echo(describe(m, out))
    click.secho(f"bundle written to {out}", fg="green")


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
    for s in (m.target, m.draft):
        p = m.parity.get(s.role, {})
        lines.append(f"  {s.role:6} {s.architecture} {s.parameters / 1e6:.2f}M {s.precision}/{s.provider} "
                     f"{s.num_layers} layers, kv {s.kv_layout} [{s.num_kv_heads}x{s.max_length}x{s.head_dim}] "
                     f"via {s.builder}")
        if any(s.windows):
            lines.append(f"         sliding windows per layer: {', '.join(str(w or 'global') for w in s.windows)}")
        if s.draft_vocab:
            lines.append(f"         reduced vocabulary: the LM head keeps {s.draft_vocab} of {s.vocab_size} tokens")
        if p:
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
@click.option("--prompt", help="Prompt text.")
@click.option("--prompt-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Read the prompt from a UTF-8 file.")
@click.option("--max-new-tokens", type=int, default=128, show_default=True)
@click.option("--k", type=int, default=None, help="Draft tokens per round (default: the bundle's).")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-k", type=int, default=0, show_default=True)
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=None)
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--no-speculation", is_flag=True, help="Plain decoding with the target only.")
@click.option("--stream", is_flag=True, help="Print text as it is generated.")
@click.option("--provider", type=click.Choice(["cpu", "cuda", "rtx", "trt"]), default=None,
              help="Where to run (default: the device the bundle was exported for).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: text, token_ids, stats.")
def generate(bundle, prompt, prompt_file, max_new_tokens, k, temperature, top_k, top_p, seed, stop,
             no_speculation, stream, provider, as_json):
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
                           seed=seed, stop=tuple(stop), speculative=False if no_speculation else None)
    engine = Engine(bundle, provider)
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
    if not all(1 <= k <= 32 for k in ks):
        raise InvalidArgument(f"every k must be between 1 and 32, got {text!r}")
    return ks


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--prompts", "prompt_files", type=click.Path(path_type=Path), multiple=True, required=True,
              help="JSON lines with a 'prompt' field, or text files (one prompt each). Repeatable.")
@click.option("--max-new-tokens", type=int, default=128, show_default=True)
@click.option("--k", "k_list", default="2,4,6", show_default=True, help="Comma-separated draft lengths.")
@click.option("--temperature", type=float, default=0.0, show_default=True)
@click.option("--baselines", default="plain,spec", show_default=True,
              help="Comma-separated: plain, spec, ort-genai, ort-genai-plain, hf, hf-plain.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Write the report as JSON here.")
@click.option("--plot", "plot_out", type=click.Path(path_type=Path), help="Write PNG plots here.")
@click.option("--provider", type=click.Choice(["cpu", "cuda", "rtx", "trt"]), default=None,
              help="Where to run (default: the device the bundle was exported for).")
def bench(bundle, prompt_files, max_new_tokens, k_list, temperature, baselines, json_out, plot_out, provider):
    """Side-by-side tokens/s, latency, alpha, tau and c on your prompts; peers on the same graphs.

    \b
    Example:
      spec-export bench ./bundle --prompts traffic.jsonl --k 2,4,6 --baselines plain,spec,ort-genai,hf \\
          --json bench.json --plot bench.png
    """
    from rich.progress import Progress

    from . import bench as b

    prompts = b.load_prompts(list(prompt_files))
    names = tuple(x.strip() for x in baselines.split(",") if x.strip())
    unknown = set(names) - {"plain", "spec", "ort-genai", "ort-genai-plain", "hf", "hf-plain"}
    if unknown:
        from ..runtime.errors import InvalidArgument

        raise InvalidArgument(f"unknown baseline(s) {', '.join(sorted(unknown))}")
    with Progress(transient=True) as bar:
        task = bar.add_task("benchmarking", total=None)
        report = b.run_bench(bundle, prompts, max_new_tokens, _ints(k_list), temperature, names, provider=provider,
                             progress=lambda name, i: bar.update(task, description=f"prompt {i + 1}/{len(prompts)}: {name}"))
    click.echo(b.table(report))
    if json_out:
        Path(json_out).write_text(json.dumps(report, indent=1))
    if plot_out:
        b.plot(report, Path(plot_out))
    b.check_identical(report)


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--prompts", "prompt_files", type=click.Path(path_type=Path), multiple=True, required=True,
              help="JSON lines with a 'prompt' field, or text files (one prompt each). Repeatable.")
@click.option("--drafts", type=click.Path(path_type=Path), multiple=True,
              help="Other bundles (same target, other drafts or draft precisions) to compare. Repeatable.")
@click.option("--max-new-tokens", type=int, default=128, show_default=True)
def tune(bundle, prompt_files, drafts, max_new_tokens):
    """Measure alpha and c on your prompts, pick k (and the draft), write the choice into the manifest.

    \b
    Example:
      spec-export tune ./bundle --prompts traffic.jsonl --drafts ./bundle-int8-draft
    """
    from . import bench as b

    out = b.tune(bundle, b.load_prompts(list(prompt_files)), max_new_tokens, tuple(drafts))
    for e in out["evaluated"]:
        pred = " ".join(f"k{k}:{v:.2f}x" for k, v in e["predicted"].items())
        meas = " ".join(f"k{k}:{v:.2f}x" for k, v in e["measured"].items())
        click.echo(f"{e['bundle']}: alpha {e['alpha']:.2f}, c {e['c']:.3f}\n  predicted {pred}\n  measured  {meas}")
    ch = out["choice"]
    if ch["speculative"]:
        click.secho(f"choice: {ch['draft_bundle']} with k={ch['k']} ({ch['expected_speedup']:.2f}x over plain); "
                    f"written to {bundle}/manifest.json as the default", fg="green")
    else:
        click.secho("speculation does not pay here: " + "; ".join(out["reasons"]) +
                    f". Plain decoding is now {bundle}'s default.", fg="yellow")
    for s in out["suggestions"]:
        click.echo(f"suggestion: {s}")


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--budget-ttft-ms", type=float, help="Fail if time to first token exceeds this.")
@click.option("--budget-tpot-ms", type=float, help="Fail if time per output token exceeds this.")
@click.option("--min-speedup", type=float, help="Fail if speculative/plain tokens/s is below this.")
@click.option("--max-new-tokens", type=int, default=32, show_default=True)
@click.option("--provider", type=click.Choice(["cpu", "cuda", "rtx", "trt"]), default=None,
              help="Where to run (default: the device the bundle was exported for).")
def smoke(bundle, budget_ttft_ms, budget_tpot_ms, min_speedup, max_new_tokens, provider):
    """Short deterministic latency check for device CI (RTX, Jetson): exit 1 when a budget is missed.

    \b
    Example (a Jetson CI job):
      spec-export smoke ./bundle --budget-ttft-ms 150 --budget-tpot-ms 40 --min-speedup 1.5
    """
    from . import bench as b

    got, failures = b.smoke(bundle, budget_ttft_ms, budget_tpot_ms, min_speedup, max_new_tokens, provider)
    click.echo(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in got.items()))
    for f in failures:
        click.secho(f"FAIL: {f}", fg="red", err=True)
    sys.exit(1 if failures else 0)


@main.command()
@click.option("--workdir", type=click.Path(path_type=Path), default=Path(".specedge-demo"), show_default=True,
              help="Where the demo pair and its bundle are cached.")
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--k", type=int, default=4, show_default=True)
def demo(workdir, max_new_tokens, k):
    """Export the built-in demo pair (once) and autocomplete a code prompt: plain vs speculative.

    \b
    Example:
      spec-export demo --max-new-tokens 32
    """
    from ..runtime import Engine
    from .demo import PROMPT, ensure_bundle

    engine = Engine(ensure_bundle(workdir, say=lambda t: click.echo(t, err=True)))
    plain = engine.generate(PROMPT, max_new_tokens=max_new_tokens, speculative=False)
    spec = engine.generate(PROMPT, max_new_tokens=max_new_tokens, k=k)
    click.secho(PROMPT, nl=False, bold=True)
    click.echo(spec.text)
    p, s = plain.stats, spec.stats
    same = "identical" if plain.token_ids == spec.token_ids else "DIFFERENT (a bug: please report it)"
    click.echo(f"plain {p.tokens_per_s:.1f} tok/s | speculative {s.tokens_per_s:.1f} tok/s "
               f"({s.tokens_per_s / p.tokens_per_s:.2f}x) | alpha {s.alpha:.2f} tau {s.mean_accepted_length:.2f} "
               f"k {s.k} | outputs {same}")
