"""The bundle's one versioned JSON manifest, as frozen dataclasses. The runtime reads only this."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .config import BundleDefaults
from .errors import BundleError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
PARITY_NUMBERS = {"max_abs_logit_diff", "top1_agreement", "step_max_abs_diff", "step_top1_agreement"}
PRECISIONS = ("fp32", "fp16", "int8", "int4", "fp8")   # what ModelSpec.precision may say (fp8: TensorRT drafts only)


@dataclass(frozen=True)
class ModelSpec:
    """One exported decoder graph and what the runtime needs to drive it."""
    role: str                 # "target" | "draft"
    architecture: str         # e.g. LlamaForCausalLM
    model_type: str           # e.g. llama
    parameters: int
    precision: str            # one of PRECISIONS
    provider: str             # cpu | cuda
    graph: str                # path of the .onnx file, relative to the bundle
    kv_layout: str            # "inplace": one [1, kv_heads, max_length, head_dim] buffer per layer bound as past and
                              # present (GroupQueryAttention); "concat": present = concat(past, new) (plain graphs)
    builder: str              # which exporter produced the graph
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    past_key: str             # name templates with {i} for the layer
    past_value: str
    present_key: str
    present_value: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int           # rows of the logits (may exceed the tokenizer's size: padded vocabularies)
    max_length: int           # tokens the KV buffers hold
    kv_dtype: str             # float32 | float16
    rewindable: bool
    # Optional (older manifests lack it): per layer, the tokens a sliding-window layer attends back over, 0 = global.
    # Informational: the graph applies the window itself over the full-length buffer, so rewinding is unchanged.
    windows: tuple[int, ...] = ()
    # Optional: a reduced draft vocabulary. The LM head keeps `draft_vocab` rows (0: all); the graph maps them back
    # to target ids itself (argmax is a target id, logits are -inf outside the subset), so the runtime is unchanged.
    # The hash is of the kept target ids, int64 little-endian, sorted.
    draft_vocab: int = 0
    vocab_map_sha256: str = ""
    # Optional: the runtime pads every step of this graph to at least `min_step` tokens (kv.py KVModel._last): an
    # int8-compute quantized CPU target is exact only then (export/quantize.py). Its KV buffers and mask hold
    # max_length + min_step - 1 rows so a padded step at the end of the context fits; positions stay < max_length.
    # Such a graph has its attention probe beside it (runtime/switches.PROBE_FILE), which the runtime runs on load.
    min_step: int = 1
    # Optional: the graph itself runs its attention on at least `attention_rows` rows (export/graphs.pad_attention;
    # the rest of the step keeps its own width). Like min_step it needs rows of room past max_length and splits at
    # the attention's switches: `attention_width` is the narrower attention any step of this graph runs.
    attention_rows: int = 1

    @property
    def attention_width(self) -> int:
        """The fewest rows any step's attention computes: the KV buffers hold max_length + attention_width - 1 rows
        (a padded step at the end of the context fits), and a pass is split at the attention switches it sees."""
        return max(self.min_step, self.attention_rows)


@dataclass(frozen=True)
class TokenizerSpec:
    files: tuple[str, ...]
    vocab_size: int
    vocab_sha256: str         # hash of the sorted token -> id mapping
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    add_bos: bool


@dataclass(frozen=True)
class Manifest:
    target: ModelSpec
    draft: ModelSpec | None                      # None: a target-only bundle (drafting by prompt lookup)
    tokenizer: TokenizerSpec
    files: dict[str, str]                        # relative path -> sha256, every file of the bundle but this one
    compatibility: dict = field(default_factory=dict)
    parity: dict = field(default_factory=dict)
    tools: dict = field(default_factory=dict)
    defaults: dict = field(default_factory=dict)  # e.g. {"k": 4}; `tune` writes its choice here (typed:
                                                  # bundle_defaults(), Engine.defaults)
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        """Check every field (type, range, paths inside the bundle): a BundleError names the first bad one."""
        if not isinstance(d, dict):
            raise BundleError(f"the manifest must be a JSON object, got {_kind(d)}; re-export the bundle")
        v = d.get("schema_version")
        if v != SCHEMA_VERSION:
            raise BundleError(f"manifest schema version {v!r} is not supported (this specedge reads version "
                              f"{SCHEMA_VERSION}); re-export the bundle with this version of spec-export")
        top = _fields(cls, {k: x for k, x in d.items() if k not in ("target", "draft", "tokenizer")}, "",
                      skip=("target", "draft", "tokenizer"))
        for key in ("target", "draft", "tokenizer"):
            if key not in d:
                raise BundleError(f"manifest field {key!r} is missing; re-export the bundle")
        specs = {role: ModelSpec(**_fields(ModelSpec, d[role], role)) for role in ("target", "draft")
                 if role == "target" or d[role] is not None}
        m = cls(target=specs["target"], draft=specs.get("draft"),
                tokenizer=TokenizerSpec(**_fields(TokenizerSpec, d["tokenizer"], "tokenizer")), **top)
        for role, s in specs.items():
            _check(s.role == role, f"{role}.role", f"must be {role!r}, got {s.role!r}")
            _check(s.kv_layout in ("inplace", "concat"), f"{role}.kv_layout",
                   f"must be 'inplace' or 'concat', got {s.kv_layout!r}")
            for name in ("num_layers", "num_kv_heads", "head_dim", "vocab_size", "max_length", "min_step",
                         "attention_rows"):
                _check(getattr(s, name) >= 1, f"{role}.{name}", f"must be at least 1, got {getattr(s, name)}")
            for name in ("min_step", "attention_rows"):
                _check(getattr(s, name) == 1 or s.kv_layout == "inplace", f"{role}.{name}",
                       f"must be 1 for the concat layout, got {getattr(s, name)}")
            _check(_inside(s.graph), f"{role}.graph", f"must be a relative path inside the bundle, got {s.graph!r}")
        for i, f in enumerate(m.tokenizer.files):
            _check(_inside(f), f"tokenizer.files[{i}]", f"must be a relative path inside the bundle, got {f!r}")
        for rel, digest in m.files.items():
            _check(_inside(rel), f"files[{rel!r}]", "must be a relative path inside the bundle")
            _check(bool(re.fullmatch(r"[0-9a-f]{64}", digest)), f"files[{rel!r}]",
                   f"must be a sha256 hex digest, got {digest!r}")
        for role, rec in m.parity.items():  # free-form records, but what `inspect` prints must be numbers
            _check(isinstance(rec, dict), f"parity.{role}", f"must be an object, got {_kind(rec)}")
            for key in PARITY_NUMBERS & rec.keys():
                _check(type(rec[key]) in (int, float), f"parity.{role}.{key}", f"must be a number, got "
                       f"{_kind(rec[key])}")
        m.bundle_defaults()   # checked at load: a bad default is the bundle's fault, not a request's
        return m

    def bundle_defaults(self) -> BundleDefaults:
        """`defaults` typed (the dict stays as written, for tools that print it)."""
        return BundleDefaults.from_manifest(self.defaults, has_draft=self.draft is not None)


def _check(ok: bool, name: str, what: str) -> None:
    if not ok:
        raise BundleError(f"manifest field {name} {what}; re-export the bundle (or undo the edit)")


def _kind(x) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(x), "a number" if isinstance(x, (int, float)) else type(x).__name__)


def _inside(rel: str) -> bool:
    p = PurePosixPath(rel)
    return bool(rel) and not p.is_absolute() and ".." not in p.parts and "\\" not in rel


def _fields(cls, d, where: str, skip: tuple[str, ...] = ()) -> dict:
    """`d` checked against the dataclass `cls`'s annotations; errors name the field as where.name."""
    if not isinstance(d, dict):
        raise BundleError(f"manifest field {where} must be an object, got {_kind(d)}; re-export the bundle")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in skip}
    name = lambda key: f"{where}.{key}" if where else key  # noqa: E731
    for key in d:
        _check(key in fields, name(key), "is unknown to this version of specedge")
    out = {}
    for key, f in fields.items():
        if key in d:
            out[key] = _value(hints[key], d[key], name(key))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise BundleError(f"manifest field {name(key)} is missing; re-export the bundle")
    return out


def _value(tp, x, name: str):
    """x as the annotated type tp (lists become tuples), or a BundleError naming the field and the expected type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):  # X | None
        if x is None and type(None) in args:
            return None
        return _value(next(a for a in args if a is not type(None)), x, name)
    if origin is tuple:
        _check(isinstance(x, list), name, f"must be a list, got {_kind(x)}")
        return tuple(_value(args[0], e, f"{name}[{i}]") for i, e in enumerate(x))
    if origin is dict or tp is dict:
        _check(isinstance(x, dict), name, f"must be an object, got {_kind(x)}")
        if args:
            return {_value(args[0], k, name): _value(args[1], e, f"{name}[{k!r}]") for k, e in x.items()}
        return x
    ok = {int: type(x) is int, bool: type(x) is bool, str: type(x) is str, float: type(x) in (int, float)}[tp]
    want = {int: "an integer", bool: "true or false", str: "a string", float: "a number"}[tp]
    _check(ok, name, f"must be {want}, got {_kind(x)} {json.dumps(x)[:40]}")
    return x


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_manifest(bundle: Path, verify: bool = True) -> Manifest:
    """Read BUNDLE/manifest.json; with `verify`, check that every listed file exists with its recorded hash."""
    bundle = Path(bundle)
    path = bundle / MANIFEST
    if not path.is_file():
        raise BundleError(f"{bundle} is not a specedge bundle: {MANIFEST} is missing "
                          f"(create one with `spec-export export --target DIR --draft DIR --out {bundle}`)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path} is corrupted ({e}); re-export the bundle") from e
    except OSError as e:
        raise BundleError(f"{path} cannot be read ({e.strerror or e}); check its permissions") from e
    try:
        m = Manifest.from_dict(data)
    except BundleError as e:
        raise BundleError(f"{path}: {e}") from e
    if verify:
        verify_files(bundle, m)
    return m


def verify_files(bundle: Path, m: Manifest) -> None:
    for rel, digest in m.files.items():
        f = Path(bundle) / rel
        if not f.is_file():
            raise BundleError(f"bundle file {rel} is missing from {bundle}; re-export the bundle")
        try:
            same = sha256(f) == digest
        except OSError as e:
            raise BundleError(f"bundle file {rel} in {bundle} cannot be read ({e.strerror or e}); check its "
                              f"permissions") from e
        if not same:
            raise BundleError(f"bundle file {rel} was modified after export (sha256 differs from the manifest); "
                              f"re-export the bundle")
