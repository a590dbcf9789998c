"""Train the built-in demo pair: a Llama target and a ~1/10-size Llama draft on the CPython standard library.

    python -m specedge.models.train_demo --out models/demo --target-minutes 45 --draft-minutes 10

Steps (models/README.md has the card): 1. byte-level BPE tokenizer on the training modules; 2. the target, next-token
cross-entropy; 3. two drafts on the same batches -- one plain, one distilled from the target (cross-entropy mixed
with KL to the target's distribution); 4. greedy agreement alpha of each draft with the target on held-out modules,
k = 1..8; 5. both as ordinary Hugging Face folders (config, fp16 safetensors, tokenizer) that `spec-export` accepts.
Uses a GPU when one is present; seeds are fixed; loss curves go to train_log.json and loss.png.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sysconfig
import time
from pathlib import Path

import numpy as np

# Held out of tokenizer and model training: the evaluation set for alpha (fixed, documented in models/README.md).
HELD_OUT = ("argparse.py", "textwrap.py", "shutil.py", "csv.py", "difflib.py", "json/", "email/", "tomllib/",
            "test/test_argparse.py", "test/test_textwrap.py", "test/test_csv.py")
SHAPES = {  # a target big enough to be memory-bound on a laptop CPU, yet trainable on 2 cores in an hour; a ~1/18 draft
    "target": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                   intermediate_size=1408),
    "draft": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                  intermediate_size=384),
}
VOCAB, SEQ, MAX_POS = 8192, 256, 2048
SPECIALS = ["<|endoftext|>", "<|bos|>", "<|pad|>"]


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


def train_tokenizer(files: list[Path], out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([str(f) for f in files], trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|endoftext|>",
                                   pad_token="<|pad|>")
    fast.save_pretrained(out)
    return tok


def encode(tok, files: list[Path]) -> np.ndarray:
    """One stream: <bos> file <eos> <bos> file <eos> ... (uint16 ids)."""
    texts = [f.read_text(encoding="utf-8") for f in files]
    ids = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids + [0])
    return np.array(ids, dtype=np.uint16)


def make_model(role: str, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=MAX_POS, bos_token_id=1, eos_token_id=0,
                      pad_token_id=2, tie_word_embeddings=True, rope_theta=10000.0, **SHAPES[role])
    return LlamaForCausalLM(cfg)


def batches(data: np.ndarray, batch: int, seed: int):
    import torch

    rng = np.random.default_rng(seed)
    while True:
        starts = rng.integers(0, len(data) - SEQ - 1, batch)
        x = np.stack([data[s : s + SEQ + 1] for s in starts]).astype(np.int64)
        yield torch.from_numpy(x[:, :-1]), torch.from_numpy(x[:, 1:])


def train(model, data, minutes: float, lr: float, batch: int, device, seed: int, teacher=None, kl_weight=0.5,
          label="model", max_steps: int | None = None) -> list[dict]:
    """Time-budgeted (or step-budgeted) AdamW with warmup and cosine decay over the expected number of steps."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    log, start, step, est = [], time.time(), 0, None
    bar = tqdm(total=int(minutes * 60), desc=label, unit="s")
    for x, y in batches(data, batch, seed):
        x, y = x.to(device), y.to(device)
        elapsed = time.time() - start
        if (max_steps is None and elapsed > minutes * 60) or step == max_steps:
            break
        if step == 20 and max_steps is None:  # estimate the total steps from the first 20 to shape the schedule
            est = int(20 * minutes * 60 / elapsed)
        est = max_steps or est
        total = est or 10**9
        warm = 50
        scale = min(1.0, (step + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / total))))
        for g in opt.param_groups:
            g["lr"] = lr * scale
        logits = model(x).logits
        ce = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss = ce
        if teacher is not None:
            with torch.no_grad():
                t = teacher(x).logits.float()
            kl = F.kl_div(F.log_softmax(logits.float(), -1), F.log_softmax(t, -1), log_target=True,
                          reduction="batchmean") / x.shape[1]
            loss = (1 - kl_weight) * ce + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        log.append({"step": step, "seconds": round(time.time() - start, 1), "loss": round(float(ce), 4)})
        bar.n = int(time.time() - start)
        bar.set_postfix(step=step, ce=f"{float(ce):.3f}")
    bar.close()
    model.eval()
    return log


def eval_loss(model, data, device, n: int = 32) -> float:
    import torch
    import torch.nn.functional as F

    gen = batches(data, 8, seed=1234)
    with torch.no_grad():
        losses = []
        for _ in range(n // 8):
            x, y = next(gen)
            losses.append(float(F.cross_entropy(model(x.to(device)).logits.flatten(0, 1).float(),
                                                y.to(device).flatten())))
    return float(np.mean(losses))


def greedy_alpha(target, draft, data, device, n_prompts=24, new=64, ks=range(1, 9)) -> dict:
    """Per-position greedy agreement on held-out code, and alpha(k) = accepted / tested when drafting k at a time
    against the target's own greedy continuation (the quantity the runtime reports)."""
    import torch

    rng = np.random.default_rng(7)
    agree = []
    with torch.no_grad():
        for s in rng.integers(0, len(data) - 200, n_prompts):
            ids = torch.from_numpy(data[s : s + 128].astype(np.int64))[None].to(device)
            cont = target.generate(ids, max_new_tokens=new, do_sample=False, pad_token_id=2, eos_token_id=None)
            tl = target(cont).logits[0, ids.shape[1] - 1 : -1].argmax(-1)
            dl = draft(cont).logits[0, ids.shape[1] - 1 : -1].argmax(-1)
            agree.append((tl == dl).cpu().numpy())
    out = {"per_token_agreement": float(np.mean(np.concatenate(agree)))}
    for k in ks:  # replay rounds over the agreement masks: a round tests drafts up to its first disagreement
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
        out[f"alpha_k{k}"] = acc / max(tested, 1)
    return out


def save(model, tok_dir: Path, out: Path) -> None:
    import torch

    model.to(torch.float16).save_pretrained(out)
    for f in tok_dir.iterdir():
        shutil.copy(f, out / f.name)


def main(argv=None):
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("models/demo"))
    ap.add_argument("--target-minutes", type=float, default=45)
    ap.add_argument("--draft-minutes", type=float, default=10)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(a.seed)
    work = a.out / ".work"
    work.mkdir(parents=True, exist_ok=True)

    train_files, held = corpus()
    print(f"corpus: {len(train_files)} training modules, {len(held)} held out; device {device}")
    tok = train_tokenizer(train_files, work / "tokenizer")
    data, held_data = encode(tok, train_files), encode(tok, held)
    print(f"tokens: {len(data):,} training, {len(held_data):,} held out")

    target = make_model("target", a.seed)
    card = {"device": device, "train_tokens": int(len(data)), "held_out_tokens": int(len(held_data)),
            "held_out_modules": list(HELD_OUT), "vocab_size": VOCAB, "seq_len": SEQ, "batch": a.batch}
    logs = {"target": train(target, data, a.target_minutes, 3e-3, a.batch, device, a.seed, label="target")}
    drafts = {}
    # The distilled draft gets the time budget; the plain one the same number of steps: a like-for-like comparison.
    for name, teacher in (("draft_distilled", target), ("draft_plain", None)):
        d = make_model("draft", a.seed + 1)
        steps = len(logs["draft_distilled"]) if name == "draft_plain" else None
        logs[name] = train(d, data, a.draft_minutes, 5e-3, a.batch, device, a.seed + 1, teacher=teacher, label=name,
                           max_steps=steps)
        drafts[name] = d
    for name, m in [("target", target), *drafts.items()]:
        card[name] = {"parameters": sum(p.numel() for p in m.parameters()), "steps": len(logs[name]),
                      "final_train_loss": float(np.mean([r["loss"] for r in logs[name][-20:]])),
                      "held_out_loss": eval_loss(m, held_data, device), **SHAPES[name.split("_")[0]]}
    for name, d in drafts.items():
        card[name]["greedy_agreement"] = greedy_alpha(target, d, held_data, device)
        print(name, json.dumps(card[name]["greedy_agreement"]))
    save(target, work / "tokenizer", a.out / "target")
    save(drafts["draft_distilled"], work / "tokenizer", a.out / "draft")
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
