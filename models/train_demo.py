"""Train the built-in demo pair on the CPython standard library: a Llama target and a ~1/18-size draft.

    python -m specedge.models.train_demo --out models/demo --target-minutes 45 --draft-minutes 20   (make demo-train)

Steps (models/README.md has the card): 1. byte-level BPE tokenizer on the training modules, with fill-in-the-middle
tokens appended; 2. the target, next-token cross-entropy, a FIM_RATE share of its windows in prefix-suffix-middle
order (or `--init-target DIR`: continue an earlier target, its embedding grown by the FIM rows); 3. the draft:
`spec-export distill` (export/distill.py: cross-entropy mixed with KL to the target) of a small fresh draft, an
earlier one (`--init-draft`), or one carved out of the target (`--draft-layers N`, `--from-target`); 4. alpha on the held-out modules, k = 1..8 (the
runtime's estimator, distill_models.greedy_alpha); 5. both as ordinary Hugging Face folders (config, fp16 safetensors,
tokenizer) that `spec-export` accepts. Uses a GPU when one is present; seeds are fixed; loss curves go to
train_log.json and loss.png.

Resumable: every stage keeps its result (or a checkpoint, written atomically every few minutes) in OUT/.work, and
rerunning the same command continues where an interrupted run stopped, with the same data order.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sysconfig
import time
from pathlib import Path

import numpy as np

# Held out of tokenizer and model training: the evaluation set for alpha (fixed, documented in models/README.md).
HELD_OUT = ("argparse.py", "textwrap.py", "shutil.py", "csv.py", "difflib.py", "json/", "email/", "tomllib/",
            "test/test_argparse.py", "test/test_textwrap.py", "test/test_csv.py")
# A target big enough to be memory-bound on a laptop CPU, yet trainable on 2 cores in an hour, and a ~1/18 draft. A
# draft carved out of the target (--draft-layers 2) agrees more on unseen code (+4..8 points of alpha) but its int4
# prefill of a 600-token prompt costs 0.6 of the target's on a 2-core CPU, a net loss for short completions there
# (models/README.md); the small draft ships.
TARGET_SHAPE = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                    intermediate_size=1408)
DRAFT_SHAPE = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                   intermediate_size=384)
VOCAB, SEQ, MAX_POS = 8192, 256, 2048   # VOCAB: the BPE's size; the FIM tokens come after it (ids 8192..8194)
SPECIALS = ["<|endoftext|>", "<|bos|>", "<|pad|>"]
FIM = ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"]   # a family tools/prompting.py recognises
DEMO_KL_WEIGHT = 0.5   # on the target's own corpus the half cross-entropy mix adds +11 points of alpha over CE alone
FIM_RATE, FIM_MAX_MIDDLE = 0.25, 64   # share of target windows in prefix-suffix-middle order; middle length (tokens)


def corpus() -> tuple[list[Path], list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and _utf8(p))
    held = [p for p in files if any(str(p.relative_to(root)).startswith(h) for h in HELD_OUT)]
    return [p for p in files if p not in held], held


def _utf8(path: Path) -> bool:
    """A few test modules are deliberately Latin-1 or broken; code models train on valid UTF-8 only."""
    try:
        path.read_bytes().decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def train_tokenizer(files: list[Path], out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([str(f) for f in files], trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", 1)])
    save_tokenizer(tok, out)


def save_tokenizer(tok, out: Path) -> None:
    """Appends the FIM tokens (when missing) after the BPE's ids, so a tokenizer without them keeps every id."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in FIM])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|endoftext|>",
                                   pad_token="<|pad|>", additional_special_tokens=FIM)
    fast.save_pretrained(out)


def to_psm(rows: np.ndarray, fim_ids: list[int], rng) -> np.ndarray:
    """A FIM_RATE share of the windows [batch, seq + 1] rewritten as <pre> P <suf> S <mid> M <eos>, the order an
    editor's fill-in-the-middle prompt uses (middle: 1..FIM_MAX_MIDDLE tokens at a random place); same length."""
    pre, suf, mid = fim_ids
    out = rows.copy()
    for r in np.flatnonzero(rng.random(len(rows)) < FIM_RATE):
        w = rows[r, : rows.shape[1] - 4]                      # room for the 3 FIM tokens and the EOS
        n = int(rng.integers(1, FIM_MAX_MIDDLE + 1))
        i = int(rng.integers(0, len(w) - n))
        out[r] = np.concatenate([[pre], w[:i], [suf], w[i + n:], [mid], w[i : i + n], [0]])
    return out


def encode(tok, files: list[Path]) -> np.ndarray:
    """One stream: <bos> file <eos> <bos> file <eos> ... (uint16 ids)."""
    texts = [f.read_text(encoding="utf-8") for f in files]
    ids = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids + [0])
    return np.array(ids, dtype=np.uint16)


def make_model(shape: dict, vocab: int, seed: int, init: Path | None):
    """A fresh model, or (--init-target / --init-draft) an earlier one whose embedding grows to the tokenizer's new
    FIM rows."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if init is not None:
        model = LlamaForCausalLM.from_pretrained(init, dtype=torch.float32)
        model.resize_token_embeddings(vocab, mean_resizing=True)
        return model
    cfg = LlamaConfig(vocab_size=vocab, max_position_embeddings=MAX_POS, bos_token_id=1, eos_token_id=0,
                      pad_token_id=2, tie_word_embeddings=True, rope_theta=10000.0, **shape)
    return LlamaForCausalLM(cfg)


def train_target(model, data: np.ndarray, minutes: float, lr: float, batch: int, device, seed: int, ckpt: Path,
                 fim_ids: list[int], checkpoint_minutes: float = 5.0) -> list[dict]:
    """Time-budgeted AdamW (warmup, cosine over the step count estimated from the first 20 steps), resumable from
    `ckpt`: batches are distill_corpus.batch_at(seed, step), and the checkpoint keeps weights, optimizer, step,
    schedule."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from ..export.distill import lr_at, save_checkpoint
    from ..export.distill_corpus import batch_at

    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    step, spent, total, log = 0, 0.0, None, []
    if ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        torch.set_rng_state(state["rng"])
        step, spent, total, log = state["step"], state["spent"], state["total"], state["log"]
        print(f"target: resuming at step {step} ({spent / 60:.1f} of {minutes} minutes spent)")

    def checkpoint():
        save_checkpoint({"model": model.state_dict(), "opt": opt.state_dict(), "rng": torch.get_rng_state(),
                         "step": step, "spent": spent, "total": total, "log": log}, ckpt)

    start, last = time.time() - spent, time.time()
    bar = tqdm(total=int(minutes * 60), initial=int(spent), desc="target", unit="s")
    while (total is None and spent < minutes * 60) or (total is not None and step < total):
        if total is None and step == 20:  # the schedule's length, from the first 20 steps; kept in the checkpoint
            total = max(21, int(20 * minutes * 60 / spent))
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total or 10**9, lr)
        rows = to_psm(batch_at(data, seed, step, batch, SEQ), fim_ids, np.random.default_rng([seed, step, 1]))
        xy = torch.from_numpy(rows.astype(np.int64)).to(device)
        logits = model(xy[:, :-1]).logits
        ce = F.cross_entropy(logits.flatten(0, 1).float(), xy[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        ce.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        spent = time.time() - start
        log.append({"step": step, "seconds": round(spent, 1), "loss": round(ce.item(), 4)})
        bar.n = int(spent)
        bar.set_postfix(step=step, ce=f"{ce.item():.3f}")
        if time.time() - last > checkpoint_minutes * 60:
            checkpoint()
            last = time.time()
    checkpoint()
    bar.close()
    model.eval()
    return log


def eval_loss(model, data, device, n: int = 32) -> float:
    import torch
    import torch.nn.functional as F

    from ..export.distill_corpus import batch_at

    with torch.no_grad():
        losses = []
        for i in range(n // 8):
            xy = torch.from_numpy(batch_at(data, 1234, i, 8, SEQ).astype(np.int64)).to(device)
            losses.append(float(F.cross_entropy(model(xy[:, :-1]).logits.flatten(0, 1).float(), xy[:, 1:].flatten())))
    return float(np.mean(losses))


def save(model, tok_dir: Path, out: Path, dtype: str = "float16") -> None:
    import torch

    model.to(getattr(torch, dtype)).save_pretrained(out)
    for f in tok_dir.iterdir():
        shutil.copy(f, out / f.name)


def distill_draft(work: Path, name: str, files: list[Path], a, **recipe) -> dict:
    """The draft through `spec-export distill`: from work/draft_init, or carved from the target (--draft-layers N);
    resumed when its checkpoint exists; returns its card."""
    from ..export.distill import DistillOptions, distill, work_dir

    out = work / name
    if not (out / "distill_card.json").is_file():
        resume = (work_dir(out) / "checkpoint.pt").is_file()
        print(f"{name}: {'resuming' if resume else 'training'} with spec-export distill")
        start = dict(from_target=tuple(range(a.draft_layers))) if a.draft_layers else dict(draft=work / "draft_init")
        distill(DistillOptions(target=work / "target", out=out, corpus=tuple(files), batch=a.batch, seq_len=SEQ,
                               lr=1e-3 if a.draft_layers else 2e-3, seed=a.seed + 1, device=a.device, resume=resume,
                               **start, **recipe))
    return json.loads((out / "distill_card.json").read_text())


def main(argv=None):
    import torch

    from ..export.distill_models import eval_windows, greedy_alpha, load_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("models/demo"))
    ap.add_argument("--target-minutes", type=float, default=45)
    ap.add_argument("--draft-minutes", type=float, default=20)
    ap.add_argument("--draft-layers", type=int, default=0, help="carve the draft out of the target's first N layers "
                    "instead of training the small DRAFT_SHAPE")
    ap.add_argument("--init-draft", type=Path, help="continue an earlier draft (embedding grown by the FIM rows)")
    ap.add_argument("--init-target", type=Path, help="continue an earlier target (its tokenizer is kept, FIM tokens "
                    "appended) instead of training one from scratch")
    ap.add_argument("--target-lr", type=float, help="peak learning rate (default 3e-3 from scratch, 1e-3 continued)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0, help="initialisation and data order (a continued target should "
                    "take another seed than its first run, to see other windows)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    a = ap.parse_args(argv)
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    torch.manual_seed(a.seed)
    work = a.out / ".work"  # every stage's result and checkpoint: rerun the same command to resume
    work.mkdir(parents=True, exist_ok=True)

    train_files, held = corpus()
    print(f"corpus: {len(train_files)} training modules, {len(held)} held out; device {device}")
    if not (work / "tokenizer" / "tokenizer.json").is_file():
        if a.init_target:
            from tokenizers import Tokenizer

            save_tokenizer(Tokenizer.from_file(str(a.init_target / "tokenizer.json")), work / "tokenizer")
        else:
            train_tokenizer(train_files, work / "tokenizer")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(work / "tokenizer" / "tokenizer.json"))
    fim_ids = [tok.token_to_id(t) for t in FIM]
    data, held_data = encode(tok, train_files), encode(tok, held)
    print(f"tokens: {len(data):,} training, {len(held_data):,} held out; vocabulary {tok.get_vocab_size()}")

    # 1. the target (fp16 folder in .work/target once done; .work/target.ckpt while training)
    target_log = work / "target_log.json"
    if not (work / "target" / "config.json").is_file():
        target = make_model(TARGET_SHAPE, tok.get_vocab_size(), a.seed, a.init_target)
        lr = a.target_lr or (1e-3 if a.init_target else 3e-3)
        log = train_target(target, data, a.target_minutes, lr, a.batch, device, a.seed, work / "target.ckpt", fim_ids)
        target_log.write_text(json.dumps(log))
        save(target, work / "tokenizer", work / "target")
    # 2. the draft: small (fresh or --init-draft) or carved out of the target, distilled (CE mixed with KL)
    if not a.draft_layers and not (work / "draft_init" / "config.json").is_file():
        save(make_model(DRAFT_SHAPE, tok.get_vocab_size(), a.seed + 1, a.init_draft), work / "tokenizer",
             work / "draft_init", dtype="float32")
    cards = {"draft": distill_draft(work, "draft", train_files, a, minutes=a.draft_minutes,
                                        kl_weight=DEMO_KL_WEIGHT)}
    # 3. evaluation on the held-out modules, with the runtime's alpha estimator
    logs = {"target": json.loads(target_log.read_text()),
            "draft": [{"step": r["step"], "seconds": r["seconds"], "loss": r["ce"]} for r in cards["draft"]["log"]]}
    models = {n: load_model(work / n, torch).to(device).eval() for n in ("target", "draft")}
    windows, prompt = eval_windows(models["target"], held_data.astype(np.int64), device, MAX_POS)
    card = {"device": str(device), "train_tokens": int(len(data)), "held_out_tokens": int(len(held_data)),
            "held_out_modules": list(HELD_OUT), "vocab_size": tok.get_vocab_size(), "seq_len": SEQ,
            "batch": a.batch, "fim_rate": FIM_RATE, "init_target": str(a.init_target) if a.init_target else None,
            "seed": a.seed, "draft_layers": a.draft_layers,
            "init_draft": str(a.init_draft) if a.init_draft else None}
    for name, m in models.items():
        c = m.config
        card[name] = {"parameters": sum(p.numel() for p in m.parameters()), "steps": len(logs[name]),
                      "final_train_loss": float(np.mean([r["loss"] for r in logs[name][-20:]])),
                      "held_out_loss": eval_loss(m, held_data, device), "hidden_size": c.hidden_size,
                      "num_hidden_layers": c.num_hidden_layers, "intermediate_size": c.intermediate_size}
        if name != "target":
            g = greedy_alpha(models["target"], m, windows, prompt)
            card[name]["greedy_agreement"] = {"per_token_agreement": g["agreement"], "kl": g["kl"],
                                              **{f"alpha_k{k}": v for k, v in g["alpha"].items()}}
            print(name, json.dumps(card[name]["greedy_agreement"]))
    for role in ("target", "draft"):
        shutil.rmtree(a.out / role, ignore_errors=True)
        shutil.copytree(work / role, a.out / role)
    (a.out / "train_log.json").write_text(json.dumps({"card": card, "logs": logs}, indent=1))
    plot(logs, a.out / "loss.png")
    shutil.rmtree(work)
    print(json.dumps(card, indent=1))


def plot(logs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, log in logs.items():
        ax.plot([r["step"] for r in log], [r["loss"] for r in log], label=name, lw=1)
    ax.set(xlabel="step", ylabel="train cross-entropy (nats/token)", title="demo pair training", yscale="log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
