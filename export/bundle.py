"""`spec-export export`: check a pair, build both graphs, validate them, write one bundle atomically."""
from __future__ import annotations

import dataclasses
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..runtime.errors import ExportError, InvalidArgument, SpecError
from ..runtime.manifest import MANIFEST, Manifest, ModelSpec, TokenizerSpec, sha256
from . import parity
from .check import check_pair, check_target, require_compatible, tokenizer_fingerprint
from .distill_card import DISTILL_CARD
from .graphs import PRECISIONS, build_graph, graph_io
from .osutil import replace_dir


DEFAULT_MAX_LENGTH = 2048


@dataclass(frozen=True)
class ExportOptions:
    target: Path
    draft: Path | None                    # None: a target-only bundle, which drafts by prompt lookup
    out: Path
    target_precision: str | None = None   # default: auto on cpu (int4, int8 or fp32), fp32 on trt, fp16 on cuda/rtx
    draft_precision: str | None = None    # default: int4; fp8 on trt
    device: str = "cpu"                   # cpu | cuda | rtx (TensorRT-RTX) | trt (native TensorRT)
    max_length: int | None = None         # None: DEFAULT_MAX_LENGTH, or less if either model's limit is lower
    force: bool = False
    k: int = 4                            # default draft length recorded in the manifest
    draft_vocab: int = 0                  # keep the N most frequent tokens in the draft's LM head (0: all)
    draft_vocab_corpus: Path | None = None  # text that counts them (a file or folder); default: Python's stdlib


def export_bundle(o: ExportOptions, progress=None, log=None) -> Manifest:
    """Write the bundle to o.out, or raise leaving o.out exactly as it was. `progress(step, total, text)` reports
    the steps; `log(text)` receives one-off notes (stale leftovers removed)."""
    say = progress or (lambda i, n, text: None)
    tp, dp = _precisions(o)
    out = Path(o.out)
    if out.exists() and not o.force:
        raise InvalidArgument(f"{out} already exists: pass --force to replace it (the old bundle is kept until the "
                              f"new one is complete)")
    if out.is_file() or out.is_symlink() or (out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file()):
        # --force replaces a bundle, never a file or a folder of something else (think --out ~ --force)
        raise InvalidArgument(f"{out} exists and is not a specedge bundle: --force only replaces bundles; choose "
                              f"another --out")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its "Loading weights" bars would interleave with the [i/6] steps
    tmp, created = _make_partial(out, log or (lambda text: None))
    try:
        say(0, 6, "checking compatibility")
        ctp = "fp32" if tp == "auto" else tp   # the byte ratio judged at the precision auto falls back to
        verdict = check_pair(Path(o.target), Path(o.draft), ctp, dp) if o.draft else check_target(Path(o.target), ctp)
        require_compatible(verdict)
        o, context_note = _context_length(o, verdict)
        say(0, 6, f"context length {o.max_length}: {context_note}")
        manifest = _build(o, tp, dp, verdict, tmp, say, context_note)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp made it 0700: give the bundle an ordinary folder's permissions
        replace_dir(tmp, out)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for d in created:  # folders made for --out's parent: a failed export leaves nothing behind
            try:
                d.rmdir()
            except OSError:
                break
        raise


# Hidden siblings of the destination while an export runs: .NAME.partial-PID-xxxx (the bundle being built) and
# .NAME.old-PID-xxxx (the previous bundle during osutil.replace_dir's swap). The PID in the name says whether they are
# still in use.
STALE_AFTER_S = 3600  # leftovers without a PID (older versions of this tool) are stale after an hour


def _make_partial(out: Path, log) -> tuple[Path, list[Path]]:
    """Remove stale leftovers of interrupted exports to `out`, then create the temporary folder beside it.
    Returns (the folder, the ancestors of `out` created for it, deepest first)."""
    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        for stale in stale_leftovers(out):
            shutil.rmtree(stale)
            log(f"removed {stale.name}, left beside {out.name} by an interrupted export")
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent)), created
    except OSError as e:
        raise InvalidArgument(f"cannot create the bundle in {out.parent} ({e.strerror or e}): choose an --out in a "
                              f"folder you can write to") from e


def stale_leftovers(out: Path) -> list[Path]:
    """The .NAME.partial-* / .NAME.old-* folders beside `out` whose exporting process is gone."""
    stale = []
    for p in sorted(out.parent.glob(f".{out.name}.partial-*")) + sorted(out.parent.glob(f".{out.name}.old-*")):
        if not p.is_dir() or p.is_symlink():
            continue
        pid, dash, _ = p.name[len(out.name) + 2:].partition("-")[2].partition("-")  # "partial-PID-xxxx" -> PID
        if dash and pid.isdigit():
            if not _alive(int(pid)):
                stale.append(p)
        elif time.time() - p.stat().st_mtime > STALE_AFTER_S:
            stale.append(p)
    return stale


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _umask() -> int:
    """The process umask, read without setting it (os.umask can only swap it, which races with other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _context_length(o: ExportOptions, verdict) -> tuple[ExportOptions, str]:
    """o with max_length resolved, and how it was chosen. A value the user gave must fit both models (else an
    error); without one, the default shrinks to the smaller model's limit: a default nobody typed is never an error."""
    limits = {role: _max_positions(Path(info.path)) for role, info in (("target", verdict.target),
                                                                        ("draft", verdict.draft)) if info}
    if o.max_length is None:
        known = {role: n for role, n in limits.items() if n}
        n = min([DEFAULT_MAX_LENGTH, *known.values()])
        parts = [str(DEFAULT_MAX_LENGTH)] + [f"the {role}'s max_position_embeddings {v}" for role, v in known.items()]
        return dataclasses.replace(o, max_length=n), f"default, min({', '.join(parts)}); set it with --max-length"
    for role, limit in limits.items():
        if limit and o.max_length > limit:
            info = getattr(verdict, role)
            raise InvalidArgument(f"--max-length {o.max_length} exceeds {info.path}'s max_position_embeddings "
                                  f"({limit}); use --max-length {limit} or less")
    if o.max_length < 16:
        raise InvalidArgument(f"--max-length {o.max_length} is too small; use at least 16")
    return o, "--max-length as given"


def _precisions(o: ExportOptions) -> tuple[str, str]:
    """The (target, draft) precisions for o.device, or an InvalidArgument naming the combination and the fix."""
    if not o.draft and (o.draft_precision or o.draft_vocab):
        raise InvalidArgument("--draft-precision and --draft-vocab shape a draft model: give one with --draft, or "
                              "leave them out for a target-only bundle (prompt lookup drafts)")
    if o.device not in ("cpu", "cuda", "rtx", "trt"):
        raise InvalidArgument(f"--device {o.device!r} must be cpu, cuda, rtx (TensorRT-RTX) or trt (native TensorRT)")
    tp = o.target_precision or {"cpu": "auto", "trt": "fp32"}.get(o.device, "fp16")
    dp = o.draft_precision or ("fp8" if o.device == "trt" else "int4")
    if tp == "auto" and o.device != "cpu":
        raise InvalidArgument(f"--target-precision auto is for --device cpu; for --device {o.device} leave it out")
    for name, p in (("target", tp), ("draft", dp)):
        if p not in PRECISIONS and (name, p) != ("target", "auto"):
            raise InvalidArgument(f"--{name}-precision {p!r} is not one of {', '.join(PRECISIONS)}")
    if tp == "fp8":
        raise InvalidArgument("fp8 is for drafts only: a target keeps fp32/fp16 so verification stays exact")
    if dp == "fp8" and o.device != "trt":
        raise InvalidArgument(f"--draft-precision fp8 needs TensorRT (--device trt); for --device {o.device} use int4"
                              + (" (FP8 of the RTX graphs' GroupQueryAttention needs TensorRT inside ModelOpt)"
                                 if o.device == "rtx" else ""))
    if o.device == "cpu" and "fp16" in (tp, dp):
        # The builder's fp16 CPU graphs have no GroupQueryAttention and fail in their mask subgraph in onnxruntime
        # 1.32; CPUs without fp16 units would run them slower than fp32 anyway.
        raise InvalidArgument("fp16 graphs are for --device cuda; on the CPU use fp32 for the target and int4 "
                              "(or int8) for the draft")
    if o.device == "trt" and ({tp, dp} - {"fp32", "fp8"}):
        # TensorRT picks fp16 kernels itself from fp32 graphs; int4/int8 here are onnxruntime's MatMulNBits.
        raise InvalidArgument("--device trt takes fp32 graphs (TensorRT builds fp16 kernels from them) and an fp8 "
                              "or fp32 draft")
    return tp, dp


def _build(o: ExportOptions, tp: str, dp: str, verdict, tmp: Path, say, context_note: str) -> Manifest:
    from tokenizers import Tokenizer

    fp = tokenizer_fingerprint(Path(o.target))
    for f in fp["files"]:
        shutil.copyfile(Path(o.target) / f, tmp / f)  # content only: modes from the umask, like every file here
    tok = Tokenizer.from_file(str(tmp / "tokenizer.json"))
    prompts = [tok.encode(p).ids[: o.max_length] for p in parity.PROMPTS]
    windows = [w for info in (verdict.target, verdict.draft) if info for w in info.windows if 0 < w < o.max_length]
    if windows:  # one prompt past the widest window, so parity covers the positions where the mask matters
        prompts.append(parity.long_prompt(tok, min(o.max_length, max(windows) + 32)))
    head_rows = None
    if o.draft_vocab:
        from .draft_vocab import choose_tokens, corpus_files

        say(0, 6, f"choosing the draft's {o.draft_vocab} most frequent tokens")
        specials = [fp["bos_token_id"], fp["pad_token_id"], *fp["eos_token_ids"]]
        head_rows = choose_tokens(tmp / "tokenizer.json", o.draft_vocab, verdict.draft.vocab_size,
                                  corpus_files(o.draft_vocab_corpus), tuple(i for i in specials if i is not None))
    log = tmp / "export.log"
    log.write_text(f"context length (max_length) {o.max_length}: {context_note}\n")
    specs, records, timings = {}, {}, {}
    for step, (role, src, precision, info) in enumerate(
            [("target", o.target, tp, verdict.target), ("draft", o.draft, dp, verdict.draft)][: 1 + bool(o.draft)]):
        t0 = time.perf_counter()
        rows = head_rows if role == "draft" else None
        # A quantized CPU target starts as the fp32 graph; _quantize_target keeps it or a quantized copy.
        quantize = role == "target" and o.device == "cpu" and precision in ("auto", "int4", "int8")
        built = "fp32" if quantize else precision
        say(1 + 2 * step, 6, f"building the {role} graph ({built}, {o.device})")
        facts = build_graph(Path(src), tmp / role, built, o.device, log, prompts, rows)
        quantization = {}
        if quantize:
            precision, quantization = _quantize_target(o, precision, facts, tmp, tok, say, log)
            facts = dict(facts, min_step=quantization["min_step"], **graph_io(tmp / role / "model.onnx"))  # KV dtype
            width = max(facts["min_step"], facts["attention_rows"])
            room = _graph_context(tmp / role) - width + 1
            if o.max_length > room:  # a padded step at the last position writes rows past it: they need rotary room
                o = dataclasses.replace(o, max_length=room)
                context_note += f"; {width - 1} less for the padded steps of the {precision} target"
                prompts = [p[:room] for p in prompts]
        spec = ModelSpec(role=role, architecture=info.architecture, model_type=info.model_type,
                         parameters=info.parameters, precision=precision, provider=o.device,
                         graph=f"{role}/model.onnx", max_length=o.max_length, rewindable=info.rewindable, **facts)
        say(2 + 2 * step, 6, f"validating the {role} graph against PyTorch")
        try:
            rec = parity.check_graph(spec, tmp, prompts, parity.hf_logits(Path(src), prompts), rows)
        except SpecError:
            raise
        except Exception as e:  # onnxruntime or transformers refusing the graph/checkpoint: say which, keep the cause
            raise ExportError(f"the exported {role} graph ({precision}, {o.device}) could not be validated: {e}") from e
        if role == "target":
            ok, why = parity.passes(rec, precision)
            if not ok:
                raise ExportError(f"the target graph failed validation: {why}. Nothing was written to {o.out}; "
                                  f"try --target-precision fp32, and see {log.name} in the error's context")
        rec["reference"] = "PyTorch fp32 checkpoint" + (" (the unquantized draft)" if role == "draft" else "")
        if quantization:
            rec["quantization"] = quantization
        specs[role], records[role], timings[role] = spec, rec, round(time.perf_counter() - t0, 2)
    if o.draft and (Path(o.draft) / DISTILL_CARD).is_file():  # a distilled draft's record: tune compares alpha on
        shutil.copy(Path(o.draft) / DISTILL_CARD, tmp / "draft" / DISTILL_CARD)  # the user's prompts with it
    say(5, 6, "writing the manifest")
    files = {str(p.relative_to(tmp)): sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    manifest = Manifest(
        target=specs["target"], draft=specs.get("draft"),
        tokenizer=TokenizerSpec(files=tuple(fp["files"]), vocab_size=fp["vocab_size"],
                                vocab_sha256=fp["vocab_sha256"], bos_token_id=fp["bos_token_id"],
                                eos_token_ids=tuple(fp["eos_token_ids"]), pad_token_id=fp["pad_token_id"],
                                add_bos=fp["add_bos"]),
        files=files, compatibility=verdict.to_dict(), parity=records,
        tools=_tool_versions() | {"export_seconds": timings, "max_length": f"{o.max_length}: {context_note}"},
        defaults=_defaults(o, tok))
    (tmp / MANIFEST).write_text(manifest.to_json())
    return manifest


def _quantize_target(o: ExportOptions, precision: str, facts: dict, tmp: Path, tok, say, log: Path) -> tuple[str, dict]:
    """--target-precision auto|int4|int8 on the CPU, the fp32 graph built in tmp/target: keep a weight-only
    quantized copy (export/quantize.py) only if it computes every row bit for bit the same at every step width
    1..MAX_K+1 once steps are padded to min_step tokens. auto tries int4, then int8 (each also within MIN_TOP1 of
    fp32 on held-out text), then keeps fp32; an explicit int4/int8 that is not exact is an ExportError. Returns
    (precision, the manifest's record: precision, min_step, reasons, step check, distance to fp32)."""
    import json
    from importlib.resources import files

    from ..runtime.kv import ATTENTION_SWITCH
    from ..runtime.switches import attention_cuts
    from .probe import write_attention_probe
    from .quantize import KV_DTYPE, MIN_TOP1, MIN_WIDTH, WIDTHS, choose_precision

    if facts["kv_layout"] != "inplace":  # torch.onnx graphs: the quantizer and the padded runtime are the builder's
        if precision != "auto":
            raise ExportError(f"a {precision} CPU target needs a model-builder graph (in-place KV), and this "
                              f"architecture exports through torch.onnx; use --target-precision fp32")
        why = "fp32: a torch.onnx graph (concat KV), which is not quantized"
        say(1, 6, f"target precision {why}")
        return "fp32", {"precision": "fp32", "min_step": 1, "reasons": [why]}
    n = max(WIDTHS)
    windows = tuple(facts.get("windows", ()))
    # The attention alone, beside the graph: copied with every quantized candidate, so the step check's KVModel (and
    # the runtime's, from the bundle) splits passes at the switches this CPU has (runtime/switches.py). Float32 here
    # (the candidates are first checked with a float32 cache); written again as KV_DTYPE with the cache
    # (quantize.choose_precision). The check's contexts cross the switches of both.
    probe = write_attention_probe(tmp / "target" / "model.onnx")
    half = write_attention_probe(tmp / "target" / "model.onnx", KV_DTYPE, tmp / ".probe")
    cuts = {c for p in (probe, half) if p for c in attention_cuts(str(p), o.max_length, MIN_WIDTH, n, 0)}
    shutil.rmtree(tmp / ".probe", ignore_errors=True)
    ends = sorted({e for e in (*(j * w + ATTENTION_SWITCH + n // 2 for w in windows if w for j in (1, 2)),
                               *(c + n // 2 for c in cuts)) if 2 * n < e <= o.max_length - MIN_WIDTH})
    ids = parity.long_prompt(tok, max([6 * n, *ends]))
    # n + 1 tokens of prefix or more, then the n stepped at every width: two contexts across kv.ATTENTION_SWITCH, one
    # past it, for a sliding window W contexts across its switches at W + 64 and 2W + 64, and contexts across every
    # switch the probe found on this CPU
    steps = [ids[: 2 * n + 1], ids[2 * n + 1 : 4 * n + 2], ids[: 6 * n], *(ids[:e] for e in ends)]
    lines = files("specedge.tools").joinpath("data", "heldout.jsonl").read_text(encoding="utf-8").splitlines()
    heldout = [tok.encode(json.loads(line)["prompt"]).ids[:128] for line in lines]   # + 32 greedy tokens each
    say(1, 6, f"checking the target's precision ({precision}): quantized rows at step widths 1..{n}, distance to fp32")
    auto = precision == "auto"
    choice = choose_precision(tmp / "target", tmp / ".quantized", steps, heldout,
                              candidates=("int4", "int8") if auto else (precision,),
                              min_top1=MIN_TOP1 if auto else 0.0, windows=windows)
    with open(log, "a") as f:
        f.writelines(f"target precision {r}\n" for r in choice.reasons)
    for r in choice.reasons:
        say(1, 6, f"target precision {r}")
    if choice.precision != "fp32":
        shutil.rmtree(tmp / "target")
        (tmp / ".quantized" / choice.precision).rename(tmp / "target")
    elif probe:
        probe.unlink()   # an fp32 target takes single steps (min_step 1): nothing to split
    shutil.rmtree(tmp / ".quantized", ignore_errors=True)
    if not auto and choice.precision != precision:
        raise ExportError(f"the {precision} target is not exact: {'; '.join(choice.reasons[:-1])}; use "
                          f"--target-precision auto or fp32")
    record = {"precision": choice.precision, "min_step": choice.min_width, "reasons": list(choice.reasons)}
    if choice.block_size:
        record["block_size"] = choice.block_size
    if choice.report is not None:
        record |= {"step_check": choice.report.summary(), "step_exact": choice.report.exact,
                   "distance_to_fp32": choice.distance.to_dict() | {"heldout_prompts": len(heldout)}}
    return choice.precision, record


def _defaults(o: ExportOptions, tok) -> dict:
    """The runtime's defaults; the tokenizer's fill-in-the-middle tokens, when it has them, go here too (a free-form
    dict: the schema stays at its version, and older bundles fall back to scanning the tokenizer)."""
    from ..runtime.fim import fim_tokens

    fim = fim_tokens(tok)
    return {"k": o.k} | ({"fim": fim} if fim else {})


def _graph_context(graph_dir: Path) -> int:
    """The positions a builder graph's rotary cache covers (GroupQueryAttention refuses any past them)."""
    import json

    return json.loads((graph_dir / "genai_config.json").read_text())["model"]["context_length"]


def _max_positions(model_dir: Path) -> int | None:
    import json

    c = json.loads((model_dir / "config.json").read_text())
    return c.get("max_position_embeddings") or c.get("n_positions")


def _tool_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    v = {"python": platform.python_version()}
    for pkg in ("specedge", "onnxruntime", "onnxruntime-genai", "onnx", "torch", "transformers", "tokenizers"):
        try:
            v[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return v
