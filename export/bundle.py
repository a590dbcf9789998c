"""`spec-export export`: check a pair, build both graphs, validate them, write one bundle atomically."""
from __future__ import annotations

import dataclasses
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..runtime.errors import ExportError, InvalidArgument, SpecError
from ..runtime.manifest import MANIFEST, Manifest, ModelSpec, TokenizerSpec, sha256
from . import parity
from .check import check_pair, require_compatible, tokenizer_fingerprint
from .graphs import PRECISIONS, build_graph


@dataclass(frozen=True)
class ExportOptions:
    target: Path
    draft: Path
    out: Path
    target_precision: str | None = None   # default: fp32 on cpu/trt, fp16 on cuda/rtx
    draft_precision: str | None = None    # default: int4; fp8 on trt
    device: str = "cpu"                   # cpu | cuda | rtx (TensorRT-RTX) | trt (native TensorRT)
    max_length: int = 2048
    force: bool = False
    k: int = 4                            # default draft length recorded in the manifest
    draft_vocab: int = 0                  # keep the N most frequent tokens in the draft's LM head (0: all)
    draft_vocab_corpus: Path | None = None  # text that counts them (a file or folder); default: Python's stdlib


def export_bundle(o: ExportOptions, progress=None) -> Manifest:
    """Write the bundle to o.out, or raise leaving o.out exactly as it was. `progress(step, total, text)` reports."""
    say = progress or (lambda i, n, text: None)
    tp, dp = _precisions(o)
    out = Path(o.out)
    if out.exists() and not o.force:
        raise InvalidArgument(f"{out} already exists: pass --force to replace it (the old bundle is kept until the "
                              f"new one is complete)")
    say(0, 6, "checking compatibility")
    verdict = check_pair(Path(o.target), Path(o.draft), tp, dp)
    require_compatible(verdict)
    for info in (verdict.target, verdict.draft):
        limit = _max_positions(Path(info.path))
        if limit and o.max_length > limit:
            raise InvalidArgument(f"--max-length {o.max_length} exceeds {info.path}'s max_position_embeddings "
                                  f"({limit}); use --max-length {limit} or less")
    if o.max_length < 16:
        raise InvalidArgument(f"--max-length {o.max_length} is too small; use at least 16")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        manifest = _build(o, tp, dp, verdict, tmp, say)
        _replace(tmp, out)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _precisions(o: ExportOptions) -> tuple[str, str]:
    """The (target, draft) precisions for o.device, or an InvalidArgument naming the combination and the fix."""
    if o.device not in ("cpu", "cuda", "rtx", "trt"):
        raise InvalidArgument(f"--device {o.device!r} must be cpu, cuda, rtx (TensorRT-RTX) or trt (native TensorRT)")
    tp = o.target_precision or ("fp16" if o.device in ("cuda", "rtx") else "fp32")
    dp = o.draft_precision or ("fp8" if o.device == "trt" else "int4")
    for name, p in (("target", tp), ("draft", dp)):
        if p not in PRECISIONS:
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


def _build(o: ExportOptions, tp: str, dp: str, verdict, tmp: Path, say) -> Manifest:
    from tokenizers import Tokenizer

    fp = tokenizer_fingerprint(Path(o.target))
    for f in fp["files"]:
        shutil.copy(Path(o.target) / f, tmp / f)
    tok = Tokenizer.from_file(str(tmp / "tokenizer.json"))
    prompts = [tok.encode(p).ids[: o.max_length] for p in parity.PROMPTS]
    windows = [w for info in (verdict.target, verdict.draft) for w in info.windows if 0 < w < o.max_length]
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
    specs, records, timings = {}, {}, {}
    for step, (role, src, precision, info) in enumerate(
            [("target", o.target, tp, verdict.target), ("draft", o.draft, dp, verdict.draft)]):
        t0 = time.perf_counter()
        say(1 + 2 * step, 6, f"building the {role} graph ({precision}, {o.device})")
        rows = head_rows if role == "draft" else None
        facts = build_graph(Path(src), tmp / role, precision, o.device, log, prompts, rows)
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
        specs[role], records[role], timings[role] = spec, rec, round(time.perf_counter() - t0, 2)
    say(5, 6, "writing the manifest")
    files = {str(p.relative_to(tmp)): sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    manifest = Manifest(
        target=specs["target"], draft=specs["draft"],
        tokenizer=TokenizerSpec(files=tuple(fp["files"]), vocab_size=fp["vocab_size"],
                                vocab_sha256=fp["vocab_sha256"], bos_token_id=fp["bos_token_id"],
                                eos_token_ids=tuple(fp["eos_token_ids"]), pad_token_id=fp["pad_token_id"],
                                add_bos=fp["add_bos"]),
        files=files, compatibility=verdict.to_dict(), parity=records,
        tools=_tool_versions() | {"export_seconds": timings}, defaults={"k": o.k})
    (tmp / MANIFEST).write_text(manifest.to_json())
    return manifest


def _replace(tmp: Path, out: Path) -> None:
    """Swap the finished bundle in with renames, so no reader ever sees half a bundle."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{int(time.time())}")
        out.rename(old)
    tmp.rename(out)
    if old:
        shutil.rmtree(old, ignore_errors=True)


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


def as_dict(o: ExportOptions) -> dict:
    return {k: str(v) for k, v in dataclasses.asdict(o).items()}
