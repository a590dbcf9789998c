"""The PyTorch side of distillation: loading a checkpoint, carving a draft out of its target, and alpha between the
two on held-out text, as the runtime measures it. The trainer uses all of it; the demo trainer
(models/train_demo.py) and benchmarks/distill_cpu.py load and measure their own pairs with it."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..runtime.errors import ExportError, InvalidArgument
from .distill_card import KS

EVAL_WINDOWS, EVAL_PROMPT, EVAL_NEW = 24, 128, 64   # held-out windows: prompt tokens, target greedy continuation


# -- the draft's starting point -------------------------------------------------------------------------------------
def parse_layers(text: str) -> tuple[int, ...]:
    """'2' -> the first two layers (0, 1); '0,5,11' -> exactly those."""
    try:
        parts = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError as e:
        raise InvalidArgument(f"--from-target takes a layer count like 2 or a list of layer indices like 0,5,11; "
                              f"got {text!r}") from e
    if not parts:
        raise InvalidArgument("--from-target needs a layer count or a list of layer indices")
    if "," not in str(text):
        if parts[0] < 1:
            raise InvalidArgument(f"--from-target {parts[0]}: keep at least one layer")
        return tuple(range(parts[0]))
    if sorted(set(parts)) != parts:
        raise InvalidArgument(f"--from-target {text}: list each layer once, in increasing order")
    return tuple(parts)


def carve(target_model, layers: tuple[int, ...]):
    """A draft made of the target's embeddings, the given decoder layers (renumbered 0..n-1), final norm and head.

    A fresh model of the sliced config receives the weights, so per-layer state (attention layer_idx, sliding or
    full attention) follows the new numbering; tied embeddings stay tied because the config still says so."""
    import copy

    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(target_model.config)
    n_old = cfg.num_hidden_layers
    for key, value in list(vars(cfg).items()):  # per-layer lists (layer_types, ...) keep the chosen layers' entries
        if isinstance(value, (list, tuple)) and len(value) == n_old and key != "architectures":
            setattr(cfg, key, [value[i] for i in layers])
    if isinstance(getattr(cfg, "max_window_layers", None), int):  # Qwen2: layers below this index use the window
        cfg.max_window_layers = sum(i < cfg.max_window_layers for i in layers)
    cfg.num_hidden_layers = len(layers)
    draft = AutoModelForCausalLM.from_config(cfg)
    new_index = {old: new for new, old in enumerate(layers)}
    state = {}
    for name, tensor in target_model.state_dict().items():
        parts = name.split(".")
        if "layers" in parts:
            at = parts.index("layers") + 1
            old = int(parts[at])
            if old not in new_index:
                continue
            parts[at] = str(new_index[old])
        state[".".join(parts)] = tensor.clone()
    missing, unexpected = draft.load_state_dict(state, strict=False)
    # A tied head is absent from the state dict or equal to the embedding; anything else is a bug in the slicing.
    assert not unexpected and all("lm_head" in m for m in missing), (missing, unexpected)
    return draft


def load_model(path: Path, torch):
    """A Hugging Face causal LM in float32, or an ExportError saying what the folder should be."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:
        raise ExportError(f"cannot load {path} as a causal LM ({e}); point at a Hugging Face checkpoint folder") from e


# -- alpha: the runtime's estimator, computed with PyTorch -----------------------------------------------------------
def eval_windows(target, held: np.ndarray, device, max_pos: int, seed: int = 7):
    """Held-out prompts and the target's greedy continuation of each: [n, prompt + new] token ids (fixed per run)."""
    import torch

    new = EVAL_NEW
    prompt = min(EVAL_PROMPT, max_pos - new - 1, max(4, len(held) - 1))
    starts = np.random.default_rng(seed).integers(0, max(1, len(held) - prompt), EVAL_WINDOWS)
    ids = torch.from_numpy(np.stack([held[s : s + prompt] for s in starts])).to(device)
    with torch.no_grad():
        out = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                              eos_token_id=None, pad_token_id=0)  # no EOS: every window runs its full length
    return out, prompt


def greedy_alpha(target, draft, windows, prompt: int) -> dict:
    """alpha(k) = accepted / tested over greedy speculative rounds of k drafts, as the runtime counts them (a round
    tests drafts up to and including its first rejection), plus per-token agreement and KL(target || draft).

    Computed by teacher forcing on the target's greedy continuation, which is exact for greedy rounds: inside a round
    every accepted draft token equals the target's, so the draft's proposal at each tested position is its argmax on
    that continuation, and each round restarts right after the target's correction (or bonus) token."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        t_logits = target(windows).logits[:, prompt - 1 : -1].float()
        d_logits = draft(windows).logits[:, prompt - 1 : -1].float()
        v = min(t_logits.shape[-1], d_logits.shape[-1])
        t_logits, d_logits = t_logits[..., :v], d_logits[..., :v]
        agree = (t_logits.argmax(-1) == d_logits.argmax(-1)).cpu().numpy()  # [n, new]
        kl = F.kl_div(F.log_softmax(d_logits, -1), F.log_softmax(t_logits, -1), log_target=True,
                      reduction="sum") / agree.size
        ce = F.cross_entropy(d_logits.flatten(0, 1), windows[:, prompt:].flatten())
    out = {"agreement": float(agree.mean()), "kl": float(kl), "ce_on_target_greedy": float(ce), "alpha": {}}
    for k in KS:
        acc = tested = 0
        for a in agree:
            i = 0
            while i < len(a):
                n = 0
                while n < k and i + n < len(a) and a[i + n]:
                    n += 1
                acc += n
                tested += n + (n < k and i + n < len(a))
                i += n + 1
        out["alpha"][k] = acc / max(tested, 1)
    return out
