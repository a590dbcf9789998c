"""The bundle's one versioned JSON manifest, as frozen dataclasses. The runtime reads only this."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BundleError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class ModelSpec:
    """One exported decoder graph and what the runtime needs to drive it."""
    role: str                 # "target" | "draft"
    architecture: str         # e.g. LlamaForCausalLM
    model_type: str           # e.g. llama
    parameters: int
    precision: str            # fp32 | fp16 | int8 | int4
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
    draft: ModelSpec
    tokenizer: TokenizerSpec
    files: dict[str, str]                        # relative path -> sha256, every file of the bundle but this one
    compatibility: dict = field(default_factory=dict)
    parity: dict = field(default_factory=dict)
    tools: dict = field(default_factory=dict)
    defaults: dict = field(default_factory=dict)  # e.g. {"k": 4}; `tune` writes its choice here
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        v = d.get("schema_version")
        if v != SCHEMA_VERSION:
            raise BundleError(f"manifest schema version {v!r} is not supported (this specedge reads version "
                              f"{SCHEMA_VERSION}); re-export the bundle with this version of spec-export")
        try:
            tup = lambda x: {k: tuple(v) if isinstance(v, list) else v for k, v in x.items()}  # noqa: E731
            return cls(target=ModelSpec(**tup(d["target"])), draft=ModelSpec(**tup(d["draft"])),
                       tokenizer=TokenizerSpec(**tup(d["tokenizer"])), files=d["files"],
                       compatibility=d.get("compatibility", {}), parity=d.get("parity", {}),
                       tools=d.get("tools", {}), defaults=d.get("defaults", {}), schema_version=v)
        except (KeyError, TypeError) as e:
            raise BundleError(f"manifest is malformed ({e}); re-export the bundle") from e


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
    m = Manifest.from_dict(data)
    if verify:
        verify_files(bundle, m)
    return m


def verify_files(bundle: Path, m: Manifest) -> None:
    for rel, digest in m.files.items():
        f = Path(bundle) / rel
        if not f.is_file():
            raise BundleError(f"bundle file {rel} is missing from {bundle}; re-export the bundle")
        if sha256(f) != digest:
            raise BundleError(f"bundle file {rel} was modified after export (sha256 differs from the manifest); "
                              f"re-export the bundle")
