"""Can this draft speed up this target? A verdict from config.json, safetensors headers and tokenizer files only.

No weights are loaded and neither torch nor transformers is imported, so a check takes well under a second even for
checkpoints of many gigabytes. Each error says what is wrong and what to do; warnings never block an export.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from ..runtime.errors import ExportError, IncompatibleModels

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")
SPECIALS = ("bos", "eos", "pad", "unk")

# Recurrent / state-space (or hybrid) layers carry a state that is overwritten in place: it cannot be rewound.
RECURRENT = {"mamba", "mamba2", "falcon_mamba", "rwkv", "recurrent_gemma", "jamba", "lfm2", "falcon_h1", "zamba",
             "zamba2", "bamba", "nemotron_h", "granitemoehybrid", "qwen3_next"}
FULL_ATTENTION = {"full_attention", "attention"}
# Families whose sliding window is switched by use_sliding_window (and then applies from max_window_layers on).
QWEN_WINDOWS = {"qwen2", "qwen2_moe", "qwen3", "qwen3_moe"}

# Family decision: exact model_type equality is the same family. Model types in one group below are generations or
# variants of one family (same tokenizer lineage, same decoder layout: Qwen2 -> Qwen3, Gemma 1 -> 3, Mistral ->
# Mixtral); they may pair, with a warning, because the tokenizer checks are what guarantee correctness. Any other
# pair is an error: unrelated families share no training data or tokenizer, so a draft of one rarely helps the other.
FAMILY_GROUPS = (
    {"qwen2", "qwen2_moe", "qwen3", "qwen3_moe"},
    {"gemma", "gemma2", "gemma3", "gemma3_text"},
    {"mistral", "mixtral"},
    {"phi3", "phimoe"},
    {"granite", "granitemoe"},
    {"deepseek_v2", "deepseek_v3"},
)

# Rule of thumb from practice: a draft that reads 10-50x fewer bytes per step than the target (decoding is
# memory-bound, so bytes per step, precision included, set a step's cost; the target's own weights in int4 are a
# legitimate draft).
RATIO_MAX, RATIO_MIN = 1 / 10, 1 / 50
# Bytes per weight as exported: MatMulNBits stores 4 or 8 bits plus one fp32 scale per block of 32 weights.
BYTES_PER_WEIGHT = {"fp32": 4.0, "fp16": 2.0, "fp8": 1.0, "int8": 1 + 4 / 32, "int4": 0.5 + 4 / 32}
TINY_DRAFT = 5_000_000
# A draft whose LM head is more than this share of its bytes per step is told about --draft-vocab.
HEAD_SHARE, SUGGESTED_DRAFT_VOCAB = 0.3, 16384
DEEP_DRAFT = 8


@dataclass(frozen=True)
class ModelInfo:
    path: str
    architecture: str
    model_type: str
    parameters: int
    num_layers: int
    hidden_size: int
    vocab_size: int          # config vocab (embedding rows); may exceed the tokenizer's size (padded vocabularies)
    rewindable: bool
    rewind_reason: str       # '' when rewindable
    windows: tuple[int, ...]  # per layer: tokens of sliding-window attention, 0 = global
    step_parameters: int     # weights one decode step reads: all but an untied input embedding (a row lookup)

@dataclass(frozen=True)
class Verdict:
    compatible: bool
    errors: tuple[str, ...]      # each names the problem and what to do
    warnings: tuple[str, ...]
    target: ModelInfo
    draft: ModelInfo | None      # None: a target-only bundle (prompt lookup drafts)
    tokenizer_vocab_size: int    # the larger of the two tokenizers' sizes (equal when they are the same tokenizer)
    vocab_size_difference: int   # target config vocab - draft config vocab
    size_ratio: float            # draft params / target params
    step_bytes_ratio: float      # draft / target weight bytes read per step, at the precisions they are exported in
    precisions: tuple[str, str]  # (target, draft) precisions the byte ratio assumes

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _json(path: Path, default=None) -> dict:
    if not path.is_file():
        if default is None:
            raise ExportError(f"{path.parent} has no {path.name}: it is not a Hugging Face checkpoint folder; point "
                              f"at the folder written by save_pretrained (or a hub snapshot)")
        return default
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{path} is not valid JSON ({e}); re-download or re-save the checkpoint") from e
    if not isinstance(data, dict):
        raise ExportError(f"{path} holds a JSON {type(data).__name__}, not an object; re-download or re-save the "
                          f"checkpoint")
    return data


def read_config(path: Path) -> dict:
    """A checkpoint folder's config.json, with the decoder's settings at the top level."""
    raw = _json(Path(path) / "config.json")
    # Multimodal checkpoints keep the decoder's settings in text_config; top-level keys win where both exist.
    return {**(raw.get("text_config") or {}), **raw}


def num_layers(cfg: dict) -> int:
    """Decoder layers, under whichever name the family's config uses (0 when it names none)."""
    return cfg.get("num_hidden_layers") or cfg.get("n_layer") or cfg.get("num_layers") or 0


def _tensor_shapes(path: Path) -> dict[str, list[int]]:
    """name -> shape for every tensor of the checkpoint, read from the safetensors headers (8-byte LE length + JSON)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(_json(index)["weight_map"].values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{path} has no *.safetensors weights; save the model with "
                          f"save_pretrained(DIR, safe_serialization=True) or convert its .bin/.pt weights")
    shapes = {}
    for name in files:
        f = path / name
        if not f.is_file():
            raise ExportError(f"{f} is listed in {index.name} but missing; re-download the checkpoint")
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        shapes.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
    return shapes


def _count_parameters(path: Path, cfg: dict) -> tuple[int, int]:
    """(parameters, weights read per decode step)."""
    shapes = _tensor_shapes(path)
    # Buffers some checkpoints save alongside the weights: RoPE frequencies, GPT-2's causal masks. Not parameters.
    shapes = {k: s for k, s in shapes.items() if not k.endswith(("inv_freq", ".attn.bias", ".attn.masked_bias"))}
    tied = cfg.get("tie_word_embeddings", cfg.get("model_type") in ("gpt2", "gemma", "gemma2", "gemma3",
                                                                     "gemma3_text"))
    if tied:
        shapes.pop("lm_head.weight", None)  # tied: the output head is the embedding matrix, counted once
    total = sum(math.prod(s) for s in shapes.values())
    # An untied input embedding is a lookup of one row per token; a tied one is also the head, read every step.
    embedding = 0 if tied else sum(math.prod(s) for k, s in shapes.items()
                                   if k.endswith(("embed_tokens.weight", "wte.weight")))
    return total, total - embedding


def _layer_types(cfg: dict) -> list[str]:
    """Each layer's attention type, as transformers derives it when config.json lists none (older checkpoints)."""
    n = num_layers(cfg)
    if cfg.get("layer_types") or cfg.get("layers_block_type"):
        return list(cfg.get("layer_types") or cfg["layers_block_type"])
    model_type, window = cfg.get("model_type", ""), cfg.get("sliding_window")
    if window is None:
        return ["full_attention"] * n
    if model_type in QWEN_WINDOWS:  # the window is off unless use_sliding_window, and then only past max_window_layers
        on, first = cfg.get("use_sliding_window", False), cfg.get("max_window_layers", 0)
        return ["sliding_attention" if on and i >= first else "full_attention" for i in range(n)]
    if model_type == "gemma2":      # local, global, local, ...
        return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    if model_type in ("gemma3", "gemma3_text"):  # (pattern - 1) local layers, then one global
        pattern = cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6
        return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n)]
    return ["sliding_attention"] * n  # Mistral, Phi-3, ...: every layer attends within the window


def layer_windows(cfg: dict) -> tuple[int, ...]:
    """Tokens each layer attends back over (0: the whole sequence). A window >= max_position_embeddings never
    evicts anything and counts as global."""
    types = _layer_types(cfg)
    window, max_pos = cfg.get("sliding_window") or 0, cfg.get("max_position_embeddings") or 0
    if window <= 0 or (max_pos and window >= max_pos):
        return (0,) * len(types)
    return tuple(window if t == "sliding_attention" else 0 for t in types)


def _rewind_problem(cfg: dict) -> str:
    """Why the KV cache of this model cannot be cut back to an earlier position ('' if it can).

    A sliding-window layer can: specedge keeps every position in a full-length buffer and the window is only a mask
    over it (GroupQueryAttention's local_window_size, or transformers' sliding mask in torch.onnx graphs), which a
    rollback (an integer) does not disturb. What cannot is state that is overwritten in place: recurrent/SSM layers,
    and ring-buffer caches of window size (which the exporter never writes; see graphs.py)."""
    model_type = cfg.get("model_type", "")
    if model_type in RECURRENT:
        return f"{model_type} has recurrent (state-space) layers whose state is overwritten in place"
    other = sorted(set(_layer_types(cfg)) - FULL_ATTENTION - {"sliding_attention"})
    if other:
        return f"layer types {other} keep a recurrent or rolling state, not a full KV cache"
    return ""


def model_info(path: Path) -> ModelInfo:
    path = Path(path)
    cfg = read_config(path)
    vocab = cfg.get("vocab_size")
    if not vocab:
        raise ExportError(f"{path}/config.json has no vocab_size; add the embedding's row count as vocab_size")
    reason = _rewind_problem(cfg)
    parameters, step_parameters = _count_parameters(path, cfg)
    return ModelInfo(
        path=str(path),
        architecture=(cfg.get("architectures") or ["?"])[0],
        model_type=cfg.get("model_type", "?"),
        parameters=parameters,
        num_layers=num_layers(cfg),
        hidden_size=cfg.get("hidden_size") or cfg.get("n_embd") or cfg.get("d_model") or 0,
        vocab_size=vocab,
        rewindable=not reason,
        rewind_reason=reason,
        windows=layer_windows(cfg),
        step_parameters=step_parameters,
    )


@dataclass(frozen=True)
class _Tok:
    vocab: dict[str, int]                                  # token -> id, added tokens included
    size: int
    specials: dict[str, tuple[tuple[int, ...], str | None]]  # name -> (ids, text)
    add_bos: bool
    files: list[str]


def _read_tokenizer(path: Path) -> _Tok:
    from tokenizers import Tokenizer

    path = Path(path)
    f = path / "tokenizer.json"
    if not f.is_file():
        raise ExportError(f"{path} has no tokenizer.json (the fast tokenizer file); load the tokenizer with "
                          f"transformers.AutoTokenizer and save_pretrained it into {path}")
    try:
        tok = Tokenizer.from_file(str(f))
    except Exception as e:  # the tokenizers library raises a bare Exception for any unreadable file
        raise ExportError(f"{f} could not be read as a tokenizer ({e}); re-save the tokenizer into {path}") from e
    cfg = read_config(path) if (path / "config.json").is_file() else {}  # a tokenizer-only folder has none
    gen, tcfg = _json(path / "generation_config.json", {}), _json(path / "tokenizer_config.json", {})
    specials = {}
    for name in SPECIALS:
        text = tcfg.get(f"{name}_token")
        text = text.get("content") if isinstance(text, dict) else text  # older files store AddedToken dicts
        # Ids come from generation_config.json (what generate() uses), then config.json, then the token's text.
        ids = next((x for x in (gen.get(f"{name}_token_id"), cfg.get(f"{name}_token_id")) if x is not None), None)
        if ids is None and text is not None:
            ids = tok.token_to_id(text)
        ids = tuple(sorted(set(ids))) if isinstance(ids, list) else (() if ids is None else (ids,))
        specials[name] = (ids, text)
    bos = specials["bos"][0]
    sample = "def f(x): return x"
    with_specials, plain = tok.encode(sample).ids, tok.encode(sample, add_special_tokens=False).ids
    add_bos = bool(bos) and with_specials[:1] == [bos[0]] and plain[:1] != [bos[0]]
    files = [n for n in TOKENIZER_FILES if (path / n).is_file()]
    return _Tok(tok.get_vocab(with_added_tokens=True), tok.get_vocab_size(with_added_tokens=True), specials, add_bos,
                files)


def tokenizer_fingerprint(path: Path) -> dict:
    t = _read_tokenizer(path)
    first = lambda ids: ids[0] if ids else None  # noqa: E731
    return {
        "vocab_size": t.size,
        "vocab_sha256": hashlib.sha256(json.dumps(sorted(t.vocab.items())).encode()).hexdigest(),
        "bos_token_id": first(t.specials["bos"][0]),
        "eos_token_ids": list(t.specials["eos"][0]),
        "pad_token_id": first(t.specials["pad"][0]),
        "add_bos": t.add_bos,
        "files": t.files,
    }


def _tokenizer_problems(tt: _Tok, dt: _Tok, one_family: bool = True) -> tuple[list[str], list[str]]:
    """one_family False: the draft is of another family, so copying tokenizer files could not make it fit."""
    errors, warnings = [], []
    same = "the draft must use the target's tokenizer: pick a draft of the target's family (e.g. a smaller sibling)"
    t_ids, d_ids = ({i: s for s, i in t.vocab.items()} for t in (tt, dt))
    first = next((i for i in range(min(tt.size, dt.size)) if t_ids.get(i) != d_ids.get(i)), None)
    if first is not None:
        show = lambda s: "(none)" if s is None else repr(s)  # noqa: E731
        errors.append(f"tokenizers differ at id {first}: target {show(t_ids.get(first))} vs draft "
                      f"{show(d_ids.get(first))}; {same}")
    elif tt.size != dt.size:
        warnings.append(f"tokenizer sizes differ (target {tt.size}, draft {dt.size}) but agree on their first "
                        f"{min(tt.size, dt.size)} ids; ids beyond that exist in one tokenizer only and are rarely "
                        f"accepted")
    for name in SPECIALS:
        (ti, tx), (di, dx) = tt.specials[name], dt.specials[name]
        if ti != di or tx != dx:
            fix = (f"{same}, or copy the target's tokenizer files and *_token_id entries (config.json, "
                   f"generation_config.json) to the draft") if one_family else \
                "the draft must come from the target's family, whose models share its tokenizer and special tokens"
            errors.append(f"{name.upper()} token differs: target id {list(ti)} {tx!r} vs draft id {list(di)} {dx!r}; "
                          f"{fix}")
    if tt.add_bos != dt.add_bos:
        says = lambda b: "prepends BOS" if b else "does not prepend BOS"  # noqa: E731
        errors.append(f"the target tokenizer {says(tt.add_bos)} but the draft's {says(dt.add_bos)}; {same}")
    return errors, warnings


def _family_problems(t: ModelInfo, d: ModelInfo) -> tuple[list[str], list[str]]:
    if t.model_type == d.model_type:
        if t.architecture == d.architecture:
            return [], []
        return [f"architectures differ ({t.architecture} vs {d.architecture}); use a draft with the target's "
                f"architecture (both causal LMs of one family)"], []
    if any({t.model_type, d.model_type} <= group for group in FAMILY_GROUPS):
        return [], [f"different generations of one family ({t.model_type} target, {d.model_type} draft): allowed "
                    f"because the tokenizers match, but a draft of the target's own generation usually agrees more"]
    return [f"different model families ({t.model_type} target, {d.model_type} draft): different families cannot "
            f"share a draft safely; pick a draft of the target's family ({t.model_type})"], []


def check_pair(target: Path, draft: Path, target_precision: str = "fp32", draft_precision: str = "int4") -> Verdict:
    """The verdict for drafting `target` with `draft`, exported at these precisions (the CPU defaults: the size rule
    compares bytes read per step). Raises ExportError only for unreadable folders."""
    t, d = model_info(target), model_info(draft)
    tt, dt = _read_tokenizer(target), _read_tokenizer(draft)
    family_errors, family_warnings = _family_problems(t, d)
    errors, warnings = _tokenizer_problems(tt, dt, one_family=not family_errors)
    errors, warnings = errors + family_errors, warnings + family_warnings

    n_tok = max(tt.size, dt.size)
    diff = t.vocab_size - d.vocab_size
    small = [(role, m) for role, m in (("target", t), ("draft", d)) if m.vocab_size < n_tok]
    for role, m in small:
        errors.append(f"the {role}'s config vocab_size {m.vocab_size} is smaller than the tokenizer's {n_tok} tokens: "
                      f"ids {m.vocab_size}..{n_tok - 1} have no embedding row; use a {role} checkpoint whose "
                      f"embedding covers the shared tokenizer")
    if diff and not small:
        warnings.append(f"config vocab sizes differ by {abs(diff)} rows (target {t.vocab_size}, draft "
                        f"{d.vocab_size}): padding rows past the tokenizer's {n_tok} tokens, never produced by it")

    for role, m in (("target", t), ("draft", d)):
        if not m.rewindable:
            fix = "pick a model whose layers are all attention (full or sliding-window)"
            errors.append(f"the {role} ({m.model_type}) cannot be rewound after rejected draft tokens: "
                          f"{m.rewind_reason}; {fix}")

    ratio = d.parameters / t.parameters if t.parameters else math.inf
    t_bytes, d_bytes = (m.step_parameters * BYTES_PER_WEIGHT[p] for m, p in ((t, target_precision),
                                                                             (d, draft_precision)))
    byte_ratio = d_bytes / t_bytes if t_bytes else math.inf
    sizes = (f"draft {d_bytes / 1e6:.3g} MB ({draft_precision}) / target {t_bytes / 1e6:.3g} MB ({target_precision}) "
             f"of weights read per step")
    if d_bytes >= t_bytes:
        errors.append(f"the draft is not cheaper than the target ({sizes}): each draft step would cost a target "
                      f"step; quantize the draft (--draft-precision int4) or pick one 10-50x smaller")
    elif byte_ratio > RATIO_MAX:
        warnings.append(f"the draft is large ({sizes} = 1/{1 / byte_ratio:.1f}, above 1/10): each draft step costs a "
                        f"big fraction of a target step (high c), which eats the speedup; 1/10-1/50 is the usual "
                        f"range")
    elif byte_ratio < RATIO_MIN:
        warnings.append(f"the draft is small ({sizes} = 1/{1 / byte_ratio:.0f}, below 1/50): it will often disagree "
                        f"with the target (low acceptance); 1/10-1/50 is the usual range")
    head = d.vocab_size * d.hidden_size  # the draft's LM head, read every step
    if d.vocab_size > 2 * SUGGESTED_DRAFT_VOCAB and head > HEAD_SHARE * d.step_parameters:
        reduced = (d.step_parameters - head + SUGGESTED_DRAFT_VOCAB * d.hidden_size) / d.step_parameters
        warnings.append(f"the draft's LM head ({d.vocab_size:,} x {d.hidden_size}) is {head / d.step_parameters:.0%} "
                        f"of the weights it reads per step: export with --draft-vocab {SUGGESTED_DRAFT_VOCAB} to "
                        f"read {reduced:.0%} of them (output unchanged; acceptance drops slightly on rare tokens)")
    if d.parameters < TINY_DRAFT:
        warnings.append(f"the draft has only {d.parameters:,} parameters: fine for tests, too small for real traffic")
    if d.num_layers > DEEP_DRAFT:
        warnings.append(f"the draft has {d.num_layers} layers: on GPUs a shallow draft (few, wider layers) has lower "
                        f"per-step latency")

    return Verdict(compatible=not errors, errors=tuple(errors), warnings=tuple(warnings), target=t, draft=d,
                   tokenizer_vocab_size=n_tok, vocab_size_difference=diff, size_ratio=ratio,
                   step_bytes_ratio=byte_ratio, precisions=(target_precision, draft_precision))


def check_target(target: Path, target_precision: str = "fp32") -> Verdict:
    """The verdict for a target-only bundle (drafting by prompt lookup): the target must be rewindable."""
    t = model_info(target)
    n_tok = _read_tokenizer(target).size
    errors = [] if t.rewindable else [f"the target ({t.model_type}) cannot be rewound after rejected draft tokens: "
                                      f"{t.rewind_reason}; pick a model whose layers are all attention"]
    return Verdict(compatible=not errors, errors=tuple(errors), warnings=(), target=t, draft=None,
                   tokenizer_vocab_size=n_tok, vocab_size_difference=0, size_ratio=0.0, step_bytes_ratio=0.0,
                   precisions=(target_precision, ""))


def require_compatible(v: Verdict) -> None:
    if not v.compatible:
        lines = "\n".join(f"- {e}" for e in v.errors)
        who = f"{v.draft.path} cannot draft for {v.target.path}" if v.draft else f"{v.target.path} cannot be used"
        raise IncompatibleModels(f"{who}:\n{lines}")
