"""`spec-export distill`: train a draft toward its target on the user's own text.

    spec-export distill --target ./llama-1b --draft ./llama-60m --corpus ./my-code --minutes 30 --out ./draft-mine
    spec-export distill --target ./gemma-270m --from-target 2 --corpus chats.jsonl --tokens 2000000 --out ./d

The loss is (1 - W) * cross-entropy + W * KL(target || draft) per token, with the target's logits computed on the fly
(the recipe of models/train_demo.py, W = 0.5). The steps of `distill`:
  1. validate the options and read the corpus (distill_corpus.py: files, folders, JSONL with a "text" field; a
     fraction held out by content hash), before anything is written;
  2. the draft (distill_models.py): a same-tokenizer checkpoint (--draft) or the target's embeddings, chosen layers,
     norm and head;
  3. alpha before, on the held-out text, as the runtime measures it (`distill_models.greedy_alpha`);
  4. AdamW with warmup + cosine over a token or time budget; batch b of step s is a pure function of (seed, s), so a
     run resumed from a checkpoint (model + optimizer + RNG + step, written atomically) ends with the same weights as
     an uninterrupted one (a --tokens run exactly; a --minutes run stops at its time budget, which no machine repeats);
  5. alpha after, and an ordinary Hugging Face folder with its card (distill_card.py), renamed into --out.

Torch and transformers are imported inside functions, so importing this module costs numpy only.
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..runtime.errors import ExportError, InvalidArgument
from .check import TOKENIZER_FILES, check_pair, num_layers, read_config, require_compatible
from .distill_card import KL_WEIGHT, write_card
from .distill_corpus import HOLDOUT, Corpus, batch_at, encode, read_corpus
from .distill_models import carve, eval_windows, greedy_alpha, load_model
from .osutil import atomic_path, replace_dir

EVAL_EVERY_S = 60               # held-out alpha during training: at a checkpoint, at most once a minute
WARMUP = 50                     # steps (at most 5% of the run)
CHECKPOINT = "checkpoint.pt"


@dataclass(frozen=True)
class DistillOptions:
    target: Path
    out: Path
    corpus: tuple[Path, ...]
    draft: Path | None = None
    from_target: tuple[int, ...] | None = None   # layer indices of the target kept in the carved draft
    glob: tuple[str, ...] = ()                   # filters for files found in corpus folders ('' = all text files)
    minutes: float | None = None                 # training-time budget (resumed runs count the time already spent)
    tokens: int | None = None                    # training-token budget (exclusive with minutes)
    device: str = "auto"
    resume: bool = False
    force: bool = False
    kl_weight: float = KL_WEIGHT
    seq_len: int = 256
    batch: int = 16
    lr: float = 1e-3
    seed: int = 0
    checkpoint_minutes: float = 5.0              # 0 = after every step
    pause_after: int | None = None               # stop this invocation after N steps, keeping the checkpoint

    def recipe(self) -> dict:
        """What a resumed run must share with the run that wrote the checkpoint."""
        return {"target": str(Path(self.target).resolve()), "draft": str(Path(self.draft).resolve()) if self.draft
                else None, "from_target": list(self.from_target) if self.from_target else None,
                "minutes": self.minutes, "tokens": self.tokens, "kl_weight": self.kl_weight, "seq_len": self.seq_len,
                "batch": self.batch, "lr": self.lr, "seed": self.seed}

    def budget_minutes(self) -> float | None:
        """The time budget: --minutes, none for a --tokens run, 10 minutes when neither is given."""
        return self.minutes if self.minutes is not None else (None if self.tokens is not None else 10.0)


@dataclass(frozen=True)
class Progress:
    step: int
    total_steps: int | None
    done: float          # share of the budget used, 0..1
    tokens: int
    tokens_per_s: float
    loss: float
    alpha: float | None  # latest held-out alpha at k = 4
    note: str = ""


# -- schedule and checkpoints (also the demo trainer's) -------------------------------------------------------------
def lr_at(step: int, total: int, peak: float) -> float:
    """Linear warmup over min(WARMUP, 5%) of the steps, then cosine from `peak` down to 0.1 * peak at `total`."""
    warm = max(1, min(WARMUP, total // 20))
    return peak * min(1.0, (step + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / total))))


def save_checkpoint(state: dict, path: Path) -> None:
    """torch.save, atomically: a crash mid-write leaves the previous checkpoint intact."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def work_dir(out: Path) -> Path:
    """Checkpoints and the staged output live beside --out (same filesystem: the final rename is atomic)."""
    out = Path(out)
    return out.with_name(f".{out.name}.distill")


# -- the run ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setup:
    """What one run trains and measures on, fixed once loaded."""
    target: object           # the target model, frozen, in eval mode
    draft: object            # the draft being trained
    data: np.ndarray         # [train tokens] the training stream
    held: np.ndarray         # [held-out tokens]
    windows: object          # [n, prompt + new] held-out prompts and the target's greedy continuations
    prompt: int              # prompt tokens in each window
    seq: int                 # training window length
    step_tokens: int         # tokens per step: batch * seq
    device: object


@dataclass
class State:
    """What a checkpoint keeps besides the weights, the optimizer and the RNG; the loop advances it."""
    step: int
    elapsed: float           # training seconds, summed over resumed invocations
    total: int | None        # the schedule's length in steps; a --minutes run estimates it after 10 steps
    log: list[dict]          # per step: seconds, loss, ce, kl
    before: dict             # held-out alpha before training
    evals: list[dict]        # held-out alpha at k = 4 during training


def distill(o: DistillOptions, progress: Callable[[Progress], None] | None = None) -> dict | None:
    """Train, then write o.out atomically. Returns the card (None when paused by o.pause_after). Raises
    InvalidArgument / ExportError before writing anything when the inputs are wrong; an interruption or a crash keeps
    the last checkpoint (at most one interval old: a checkpoint is only ever written between steps) for --resume."""
    say = progress or (lambda p: None)
    corpus = _validate(o)  # 1. nothing is written until the inputs are known to be good

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one progress bar (ours), not one per weight load and save
    device = _device(o.device)
    out, work = Path(o.out), work_dir(o.out)
    ckpt_path = work / CHECKPOINT
    try:
        if o.force and not o.resume:
            shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InvalidArgument(f"cannot write beside --out {out}: {e.strerror} ({work}); choose a writable folder") \
            from e
    fresh_work = not ckpt_path.is_file()
    try:
        return _run(o, corpus, device, work, ckpt_path, say, torch)
    except BaseException as e:
        shutil.rmtree(work / "staging", ignore_errors=True)
        if fresh_work and not ckpt_path.is_file():
            shutil.rmtree(work, ignore_errors=True)  # failed before the first checkpoint: nothing worth keeping
        if isinstance(e, KeyboardInterrupt) and ckpt_path.is_file():
            raise ExportError(f"interrupted; the last checkpoint is {ckpt_path}: rerun with --resume") from e
        raise


def _validate(o: DistillOptions) -> Corpus:
    """Every check that needs no torch: the options, --out and its checkpoint, the pair; then the corpus."""
    if (o.draft is None) == (o.from_target is None):
        raise InvalidArgument("give exactly one of --draft DIR (continue a draft) or --from-target LAYERS (carve one "
                              "out of the target)")
    if o.minutes is not None and o.tokens is not None:
        raise InvalidArgument("give --minutes or --tokens, not both")
    for name, value, low in (("--minutes", o.minutes, 0), ("--tokens", o.tokens, 0), ("--batch", o.batch, 0),
                             ("--seq-len", o.seq_len, 1), ("--lr", o.lr, 0)):
        if value is not None and value <= low:
            raise InvalidArgument(f"{name} must be positive, got {value}")
    if not 0 <= o.kl_weight <= 1:
        raise InvalidArgument(f"--kl-weight is the KL share of the loss, between 0 and 1; got {o.kl_weight}")
    out = Path(o.out)
    if out.exists() and not o.force:
        raise InvalidArgument(f"{out} already exists: pass --force to replace it (the old folder is kept until the "
                              f"new one is complete)")
    ckpt_path = work_dir(out) / CHECKPOINT
    if o.resume and not ckpt_path.is_file():
        raise InvalidArgument(f"--resume: no checkpoint at {ckpt_path}; start without --resume")
    if not o.resume and ckpt_path.is_file() and not o.force:
        raise InvalidArgument(f"an interrupted run left a checkpoint at {ckpt_path}: pass --resume to continue it, or "
                              f"--force to start over")
    if o.from_target is not None:
        depth = num_layers(read_config(Path(o.target)))
        bad = [i for i in o.from_target if not 0 <= i < depth]
        if bad or len(o.from_target) >= depth:
            raise InvalidArgument(f"--from-target: the target has {depth} layers (0..{depth - 1}); a draft keeps "
                                  f"fewer, e.g. --from-target {max(1, depth // 4)}")
    else:
        require_compatible(check_pair(Path(o.target), Path(o.draft)))
    return read_corpus(o.corpus, o.glob)


def _run(o: DistillOptions, corpus: Corpus, device, work: Path, ckpt_path: Path, say, torch) -> dict | None:
    s = _setup(o, corpus, device, torch)                                                 # 2. the models and data
    opt = _optimizer(s.draft, o.lr, torch)
    state = _resume(o, s, opt, ckpt_path, torch) if o.resume else _fresh(o, s, torch)    # 3. alpha before
    tokens_per_s = _train(o, s, opt, state, ckpt_path, say, torch)                       # 4. train
    if tokens_per_s is None:
        return None  # paused by o.pause_after; the checkpoint is written
    return _finish(o, corpus, s, state, work, tokens_per_s, say, torch)                  # 5. alpha after, the folder


def _setup(o: DistillOptions, corpus: Corpus, device, torch) -> Setup:
    """The target, the corpus as tokens, the draft (loaded or carved) and the held-out windows alpha is measured on."""
    target = load_model(Path(o.target), torch).to(device).eval()
    for p in target.parameters():
        p.requires_grad_(False)
    eos = target.config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else (0 if eos is None else eos)
    data = encode(Path(o.target), corpus.train, eos)
    held = encode(Path(o.target), corpus.held_out, eos)
    max_pos = getattr(target.config, "max_position_embeddings", None) or 2048
    seq = min(o.seq_len, max_pos)
    if len(data) < seq + 2:
        raise InvalidArgument(f"the corpus has {len(data)} training tokens, fewer than one window of --seq-len {seq}; "
                              f"add text or lower --seq-len")
    draft = carve(target, o.from_target) if o.from_target else load_model(Path(o.draft), torch)
    draft.to(device).train()
    if len(held) < 16:
        raise InvalidArgument(f"the held-out share of the corpus is only {len(held)} tokens, too few to measure "
                              f"alpha; add more documents (about {HOLDOUT:.0%} of them are held out)")
    windows, prompt = eval_windows(target, held, device, max_pos)
    return Setup(target=target, draft=draft, data=data, held=held, windows=windows, prompt=prompt, seq=seq,
                 step_tokens=o.batch * seq, device=device)


def _optimizer(draft, lr: float, torch):
    decay = [p for p in draft.parameters() if p.dim() >= 2]
    other = [p for p in draft.parameters() if p.dim() < 2]  # norms: no weight decay
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95))


def _fresh(o: DistillOptions, s: Setup, torch) -> State:
    torch.manual_seed(o.seed)
    before = _alpha(s)
    total = math.ceil(o.tokens / s.step_tokens) if o.tokens is not None else None
    return State(step=0, elapsed=0.0, total=total, log=[], before=before,
                 evals=[{"step": 0, "alpha_k4": before["alpha"][4]}])


def _resume(o: DistillOptions, s: Setup, opt, ckpt_path: Path, torch) -> State:
    state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    changed = [k for k, v in o.recipe().items() if state["recipe"].get(k) != v]
    if changed:
        raise InvalidArgument(f"--resume with other options than the interrupted run ({', '.join(changed)}); "
                              f"rerun with the same options, or --force to start over")
    s.draft.load_state_dict(state["draft"])
    opt.load_state_dict(state["opt"])
    torch.set_rng_state(state["rng"]["torch"])
    if s.device.type == "cuda" and state["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state(state["rng"]["cuda"])
    return State(step=state["step"], elapsed=state["elapsed"], total=state["total_steps"], log=state["log"],
                 before=state["before"], evals=state["evals"])


def _checkpoint(o: DistillOptions, s: Setup, opt, state: State, path: Path, torch) -> None:
    save_checkpoint({"recipe": o.recipe(), "draft": s.draft.state_dict(), "opt": opt.state_dict(), "step": state.step,
                     "elapsed": state.elapsed, "total_steps": state.total, "log": state.log, "before": state.before,
                     "evals": state.evals,
                     "rng": {"torch": torch.get_rng_state(),
                             "cuda": torch.cuda.get_rng_state() if s.device.type == "cuda" else None}}, path)


def _train(o: DistillOptions, s: Setup, opt, state: State, ckpt_path: Path, say, torch) -> float | None:
    """Steps until the budget: a step count (--tokens) or training seconds (--minutes, summed over resumed
    invocations). Checkpoints every o.checkpoint_minutes and at the end. Returns this invocation's tokens/s, or None
    when o.pause_after stopped it."""
    minutes = o.budget_minutes()
    t0, run_steps = time.time(), 0
    last_ckpt = last_eval = t0
    started = state.elapsed
    alpha_now = state.before["alpha"][4]
    while True:
        state.elapsed = started + time.time() - t0
        if (state.total is not None and state.step >= state.total) or \
                (minutes is not None and state.elapsed >= minutes * 60):
            break  # --tokens: a fixed step count; --minutes: the time budget, or the estimated count if sooner
        if o.pause_after is not None and run_steps >= o.pause_after:
            _checkpoint(o, s, opt, state, ckpt_path, torch)
            return None
        if state.total is None and state.step >= 10:
            # --minutes: the schedule's length is estimated once, from the first 10 steps, and kept in the checkpoint
            # (the run then stops at that step: a resumed run follows the same schedule to the same end)
            state.total = max(state.step + 1, int(state.step * minutes * 60 / max(state.elapsed, 1e-6)))
        losses = _step(o, s, opt, state.step, state.total or 10**9, torch)
        state.step += 1
        run_steps += 1
        state.elapsed = started + time.time() - t0
        state.log.append({"step": state.step, "seconds": round(state.elapsed, 2), **losses})
        if time.time() - last_ckpt >= o.checkpoint_minutes * 60:
            if time.time() - last_eval >= EVAL_EVERY_S:
                alpha_now = _alpha(s)["alpha"][4]
                state.evals.append({"step": state.step, "alpha_k4": alpha_now})
                last_eval = time.time()
            _checkpoint(o, s, opt, state, ckpt_path, torch)
            last_ckpt = time.time()
        done = state.step / state.total if state.total else state.elapsed / (minutes * 60)
        say(Progress(state.step, state.total, min(1.0, done), state.step * s.step_tokens,
                     run_steps * s.step_tokens / max(time.time() - t0, 1e-6), losses["loss"], alpha_now))
    _checkpoint(o, s, opt, state, ckpt_path, torch)
    return run_steps * s.step_tokens / max(time.time() - t0, 1e-6)


def _step(o: DistillOptions, s: Setup, opt, step: int, total: int, torch) -> dict:
    """One AdamW step on batch `step`; returns its loss and the two terms, rounded for the log."""
    import torch.nn.functional as F

    xy = torch.from_numpy(batch_at(s.data, o.seed, step, o.batch, s.seq)).to(s.device)
    x, y = xy[:, :-1], xy[:, 1:]
    for g in opt.param_groups:
        g["lr"] = lr_at(step, total, o.lr)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if s.device.type == "cuda" else contextlib.nullcontext()
    with autocast:
        logits = s.draft(x).logits.float()
        with torch.no_grad():
            t_logits = s.target(x).logits.float()
    v = min(logits.shape[-1], t_logits.shape[-1])
    ce = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    kl = F.kl_div(F.log_softmax(logits[..., :v], -1), F.log_softmax(t_logits[..., :v], -1), log_target=True,
                  reduction="sum") / y.numel()
    loss = (1 - o.kl_weight) * ce + o.kl_weight * kl
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(s.draft.parameters(), 1.0)
    opt.step()
    return {"loss": round(loss.item(), 4), "ce": round(ce.item(), 4), "kl": round(kl.item(), 4)}


def _alpha(s: Setup) -> dict:
    """Held-out alpha of the draft as it stands (it touches neither the weights nor the RNG)."""
    s.draft.eval()
    out = greedy_alpha(s.target, s.draft, s.windows, s.prompt)
    s.draft.train()
    return out


def _finish(o: DistillOptions, corpus: Corpus, s: Setup, state: State, work: Path, tokens_per_s: float, say,
            torch) -> dict:
    """Alpha after; the draft, its tokenizer and its card staged in `work`, then renamed into o.out."""
    after = _alpha(s)
    state.evals.append({"step": state.step, "alpha_k4": after["alpha"][4]})
    say(Progress(state.step, state.total, 1.0, state.step * s.step_tokens, tokens_per_s,
                 state.log[-1]["loss"] if state.log else float("nan"), after["alpha"][4], note="writing the draft"))
    staging = work / "staging"
    shutil.rmtree(staging, ignore_errors=True)
    s.draft.to("cpu").to(_saved_dtype(Path(o.target), torch)).save_pretrained(staging)
    for name in (*TOKENIZER_FILES, "generation_config.json"):
        if (Path(o.target) / name).is_file():
            shutil.copy(Path(o.target) / name, staging / name)
    card = write_card(staging, _card(o, corpus, s, state, after, torch), state.log, state.evals)
    replace_dir(staging, Path(o.out))
    shutil.rmtree(work, ignore_errors=True)
    return card


def _card(o: DistillOptions, corpus: Corpus, s: Setup, state: State, after: dict, torch) -> dict:
    """What distill_card.json records: where the draft came from, the corpus, the recipe, the run, alpha."""
    paths = [str(p) for p in o.corpus[:20]] + ([f"... {len(o.corpus) - 20} more"] if len(o.corpus) > 20 else [])
    return {
        "target": str(o.target), "source": {"draft": str(o.draft)} if o.draft else {"from_target": list(o.from_target)},
        "parameters": sum(p.numel() for p in s.draft.parameters()),
        "num_hidden_layers": s.draft.config.num_hidden_layers,
        "corpus": {"paths": paths, "glob": list(o.glob), "sha256": corpus.sha256, "documents": corpus.documents,
                   "bytes": corpus.bytes, "skipped_files": corpus.skipped, "held_out_documents": len(corpus.held_out),
                   "train_tokens": int(len(s.data)), "held_out_tokens": int(len(s.held))},
        "recipe": {**o.recipe(), "seq_len": s.seq, "loss": "(1 - kl_weight) * CE + kl_weight * KL(target || draft)",
                   "optimizer": "AdamW(0.9, 0.95), wd 0.1 on matrices, warmup + cosine to 0.1 lr, clip 1.0"},
        "steps": state.step, "tokens_seen": state.step * s.step_tokens, "train_seconds": round(state.elapsed, 1),
        "tokens_per_s": round(state.step * s.step_tokens / max(state.elapsed, 1e-6), 1),
        "device": _describe(s.device, torch),
        "alpha_estimator": ("greedy speculative rounds, alpha = accepted / tested (the runtime's), by teacher forcing "
                            f"on the target's greedy continuation of {len(s.windows)} held-out windows "
                            f"({s.prompt} prompt + {s.windows.shape[1] - s.prompt} tokens), PyTorch fp32 weights"),
        "before": state.before, "after": after, "alpha_evals": state.evals,
    }


def _saved_dtype(target: Path, torch):
    """The draft is written in the target checkpoint's dtype (fp16 demo pair, bf16 hub models, fp32 tiny tests)."""
    cfg = read_config(target)
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(name, torch.float32)


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InvalidArgument("--device cuda but torch sees no CUDA GPU; use --device cpu (or auto), or install a "
                              "CUDA build of torch")
    return torch.device(name)


def _describe(device, torch) -> dict:
    import platform

    d = {"type": device.type, "torch": torch.__version__, "threads": torch.get_num_threads(),
         "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    if device.type == "cuda":
        d["gpu"] = torch.cuda.get_device_name(device)
    return d
