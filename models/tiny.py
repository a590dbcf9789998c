"""Tiny random-weight Hugging Face checkpoints and a real BPE tokenizer, built offline.

Random weights prove exactness (greedy equality, rollback, distributions), never acceptance
or speed: those need the trained demo pair. Needs the `export` extra (torch, transformers).
"""
from __future__ import annotations

import sysconfig
from pathlib import Path

ARCHS = ("llama", "qwen2", "qwen3", "mistral", "phi3", "gemma", "gemma2", "gemma3", "gpt2")
# Small enough that the tests' prompts and generations cross it; real models use 512-4096.
WINDOW = 16
# Named variants of an architecture: name -> (arch, tiny_config options).
VARIANTS = {
    "mistral-sw": ("mistral", dict(window=WINDOW)),             # Mistral-7B-v0.1: every layer windowed
    "smollm2": ("llama", dict(tie_word_embeddings=True)),       # SmolLM2: a Llama with a tied head
}


def stdlib_files(limit: int | None = None) -> list[Path]:
    """CPython standard-library sources: a real code corpus every machine has offline."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py"))
    return files[:limit] if limit else files


def train_tokenizer(out: Path, vocab_size: int = 512, files: list[Path] | None = None,
                    extra_special_tokens: tuple[str, ...] = (), chat_template: str | None = None) -> Path:
    """Byte-level BPE trained on real code; saved as HF tokenizer files (tokenizer.json + config).
    extra_special_tokens (e.g. FIM tokens) get ids after the three standard ones; chat_template is saved into
    tokenizer_config.json, as Hugging Face chat models ship it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|bos|>", "<|pad|>", *extra_special_tokens]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    files = files or stdlib_files(limit=40)
    tok.train([str(f) for f in files], trainer)
    bos = tok.token_to_id("<|bos|>")
    # The BOS token is prepended by the tokenizer itself, as Llama-family tokenizers do.
    tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|endoftext|>",
                                   pad_token="<|pad|>", unk_token=None)
    if chat_template is not None:
        fast.chat_template = chat_template
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return out


def tiny_config(arch: str, vocab_size: int, *, layers: int = 2, hidden: int = 64, heads: int = 4,
                kv_heads: int = 2, inter: int = 128, max_pos: int = 256, bos: int = 1, eos: int = 0, pad: int = 2,
                window: int | None = None, **overrides):
    """A transformers config for `arch` with tiny shapes; ids match `train_tokenizer`'s specials.

    `window`: sliding-window attention over that many tokens (Mistral: every layer; Gemma 2/3: their own
    local/global interleave, which they always have, so they default to WINDOW)."""
    import transformers as tf

    common = dict(vocab_size=vocab_size, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
                  tie_word_embeddings=False)
    if arch == "gpt2":
        cfg = tf.GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=max_pos, n_inner=inter,
                            **common)
    else:
        cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "qwen3": tf.Qwen3Config,
               "mistral": tf.MistralConfig, "phi3": tf.Phi3Config, "gemma": tf.GemmaConfig,
               "gemma2": tf.Gemma2Config, "gemma3": tf.Gemma3TextConfig}[arch]
        kw = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, intermediate_size=inter, max_position_embeddings=max_pos,
                  head_dim=hidden // heads, **common)
        if arch == "mistral":
            kw["sliding_window"] = window  # None: full attention (Mistral v0.2+)
        if arch in ("gemma2", "gemma3"):
            # Local layers first, then a global one (Gemma 3 has 5 local : 1 global; two layers keep one of each).
            # query_pre_attn_scalar != head_dim, Gemma 2's soft-capping and the tied head make the exporter prove it keeps
            # them.
            kw.update(sliding_window=window or WINDOW, tie_word_embeddings=True, query_pre_attn_scalar=2 * (hidden // heads),
                      layer_types=["sliding_attention"] * (layers - 1) + ["full_attention"])
        if arch == "phi3":
            kw["original_max_position_embeddings"] = max_pos
            kw["pad_token_id"] = pad
        cfg = cls(**kw)
        if arch == "gemma3":
            cfg.architectures = ["Gemma3ForCausalLM"]  # text-only, as the 270M/1B checkpoints are
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def build_tiny(out: Path, arch: str, tokenizer_dir: Path, *, seed: int = 0, **shape) -> Path:
    """Save a random-initialised causal LM of `arch` (or one of VARIANTS) plus the tokenizer files into `out`."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from tokenizers import Tokenizer

    arch, variant = VARIANTS.get(arch, (arch, {}))
    shape = {**variant, **shape}
    vocab_size = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size()
    cfg = tiny_config(arch, vocab_size=shape.pop("vocab_size", vocab_size), **shape)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # larger logits than the default init: sharper, less tie-prone distributions
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out
