"""The option types and option groups the `spec-export` commands share; each is declared and validated here once.

A group is a decorator that adds its options to a command and hands them to the command as one value:
`sampling_options` and `drafter_options` fold theirs into one `config: GenerationConfig` keyword (in whichever
order they are stacked), so a sampling knob added to `GenerationConfig` is added here once for every command.
This module imports click and the runtime's constants only: `spec-export --help` stays fast.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import Callable

import click

from ..runtime.config import DRAFTERS, MAX_K, GenerationConfig
from ..runtime.providers import PROVIDERS

DEVICES = tuple(PROVIDERS)   # cpu, cuda, rtx, trt: what a bundle is exported for is where it runs


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
BUNDLE = click.Path(path_type=Path)   # checked by the Engine, which says what is wrong with it


class CommaList(click.ParamType):
    """A comma-separated list, the one way every list option is parsed: each item converted by `item` (a click
    type) or checked against `choices`; `renamed` maps deprecated names to current ones, with one line on stderr.
    `choices` may be a function, so that a registry is read only when the option is used."""

    name = "list"

    def __init__(self, what: str, example: str, item: click.ParamType | None = None,
                 choices: tuple[str, ...] | Callable[[], tuple[str, ...]] = (), renamed: dict[str, str] | None = None):
        self.what, self.example, self.item, self._choices, self.renamed = what, example, item, choices, renamed or {}

    def choices(self) -> tuple[str, ...]:
        return self._choices() if callable(self._choices) else self._choices

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):   # a default already converted
            return value
        parts = [x.strip() for x in str(value).split(",")]
        if not all(parts):
            self.fail(f"{value!r} is not a comma-separated list of {self.what}s like {self.example}.", param, ctx)
        out = []
        for x in parts:
            if x in self.renamed:
                click.echo(f"warning: {param.opts[0] if param else self.what} name {x!r} is deprecated: use "
                           f"{self.renamed[x]!r}", err=True)
                x = self.renamed[x]
            if self.item is not None:
                try:
                    x = self.item.convert(x, param, ctx)
                except click.BadParameter as e:
                    self.fail(f"{value!r} is not a comma-separated list of {self.what}s like {self.example}: "
                              f"{e.message}", param, ctx)
            out.append(x)
        unknown = [x for x in out if self.item is None and x not in self.choices()]
        if unknown:
            self.fail(f"unknown {self.what}(s) {', '.join(unknown)}; choose from {', '.join(self.choices())}.",
                      param, ctx)
        return tuple(dict.fromkeys(out))   # in the order given, once each


class LazyHelpOption(click.Option):
    """An option whose help text is made when help is shown (from a registry the command imports only then)."""

    def __init__(self, *args, make_help: Callable[[], str], **kwargs):
        super().__init__(*args, **kwargs)
        self.make_help = make_help

    def get_help_record(self, ctx):
        self.help = self.make_help()
        return super().get_help_record(ctx)


# -- callbacks ---------------------------------------------------------------------------------------------------
def no_empty(ctx, param, value):
    """Refuse an empty string (alone or in a repeated option), which would otherwise be ignored."""
    for v in value if isinstance(value, tuple) else (value,):
        if v == "":
            raise click.BadParameter("must not be empty.", ctx, param)
    return value


def output_file(ctx, param, value):
    """A file to write at the end of a long run: refuse up front what would fail only then."""
    if value is not None:
        if value.is_dir():
            raise click.BadParameter(f"{value} is a folder; give a file name.", ctx, param)
        if not value.parent.is_dir():
            raise click.BadParameter(f"folder {value.parent} does not exist.", ctx, param)
    return value


def prompt_files(ctx, param, value):
    """Read the prompt files now, so a bad line is a usage error before any model is loaded; the command gets the
    prompts (a list of strings)."""
    from ..runtime.errors import InvalidArgument
    from .bench import load_prompts

    try:
        return load_prompts(list(value))
    except InvalidArgument as e:
        raise click.BadParameter(str(e), ctx, param) from e


# -- option groups -------------------------------------------------------------------------------------------------
def _stack(f, options):
    for option in reversed(options):
        f = option(f)
    return f


def _into_config(f, names: tuple[str, ...], fields: Callable[..., dict]):
    """Wrap command `f`: take the options `names` out of its keywords and fold `fields(**them)` into `config`."""
    @functools.wraps(f)
    def command(*args, **kwargs):
        got = {n: kwargs.pop(n) for n in names}
        kwargs["config"] = dataclasses.replace(kwargs.get("config") or GenerationConfig(), **fields(**got))
        return f(*args, **kwargs)
    return command


def sampling_options(seed: int | None = None, note: str = ""):
    """--temperature, --top-k, --top-p, --seed, folded into `config`. seed: its default (None: a fresh one)."""
    with_t = "With --temperature: " if note else ""
    options = [
        click.option("--temperature", type=FiniteFloat(min=0), default=0.0, show_default=True,
                     help=f"0 = greedy{note}."),
        click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True, help=f"{with_t}0 = off."),
        click.option("--top-p", type=FiniteFloat(0, 1, min_open=True), default=1.0, show_default=True,
                     help=f"{with_t}1 = off."),
        click.option("--seed", type=click.IntRange(min=0), default=seed, show_default=seed is not None,
                     help=f"{with_t}the sampling seed." if note else "Sampling seed (default: a fresh one)."),
    ]
    names = ("temperature", "top_k", "top_p", "seed")
    return lambda f: _stack(_into_config(f, names, lambda **got: got), options)


def drafter_options(f):
    """--k, --no-speculation, --drafter, --adaptive/--fixed-k, folded into `config` (None: the bundle's default)."""
    options = [
        click.option("--k", type=K, default=None, help="Draft tokens per round (default: the bundle's)."),
        click.option("--no-speculation", is_flag=True, help="Plain decoding with the target only."),
        click.option("--drafter", type=click.Choice(DRAFTERS), default=None,
                     help="model: the draft model; lookup: prompt lookup (free); hybrid: lookup, else the model. "
                          "Default: the bundle's (tuned)."),
        click.option("--adaptive/--fixed-k", default=None,
                     help="Choose k per round from running estimates (--k is then the most a round drafts), or "
                          "always k. Default: the bundle's."),
    ]
    fields = lambda k, no_speculation, drafter, adaptive: dict(  # noqa: E731
        k=k, speculative=False if no_speculation else None, drafter=drafter, adaptive=adaptive)
    return _stack(_into_config(f, ("k", "no_speculation", "drafter", "adaptive"), fields), options)


def provider_options(threads: bool = False):
    """--provider (and --threads): where the engine runs; passed on as `provider` (and `threads`)."""
    options = [click.option("--provider", type=click.Choice(DEVICES), default=None,
                            help="Where to run (default: the device the bundle was exported for).")]
    if threads:
        options.append(click.option("--threads", type=click.IntRange(0, 1024), default=0, show_default=True,
                                    help="onnxruntime threads for the target (0: its default, one per core)."))
    return lambda f: _stack(f, options)


def max_new_tokens_option(default: int):
    return click.option("--max-new-tokens", type=TOKENS, default=default, show_default=True)


def prompts_option(f):
    return click.option("--prompts", "prompts", type=INPUT_FILE, multiple=True, required=True,
                        callback=prompt_files,
                        help="JSON lines with a 'prompt' field, or text files (one prompt each). Repeatable.")(f)
