"""`spec-export distill`: train a draft toward its target on the user's own text.

    spec-export distill --target ./llama-1b --draft ./llama-60m --corpus ./my-code --minutes 30 --out ./draft-mine
    spec-export distill --target ./gemma-270m --from-target 2 --corpus chats.jsonl --tokens 2000000 --out ./d

The loss is (1 - W) * cross-entropy + W * KL(target || draft) per token, with the target's logits computed on the fly
(the recipe of models/train_demo.py, W = 0.5). The steps:
  1. read the corpus (files, folders, JSONL with a "text" field) and hold out a fraction by content hash;
  2. the draft: a same-tokenizer checkpoint (--draft) or the target's embeddings, chosen layers, norm and head;
  3. alpha before, on the held-out text, as the runtime measures it (`greedy_alpha`);
  4. AdamW with warmup + cosine over a token or time budget; batch b of step s is a pure function of (seed, s), so a
     run resumed from a checkpoint (model + optimizer + RNG + step, written atomically) ends with the same weights as
     an uninterrupted one (a --tokens run exactly; a --minutes run stops at its time budget, which no machine repeats);
  5. alpha after, and an ordinary Hugging Face folder with distill_card.json / .md (and loss.png), renamed into --out.

Torch and transformers are imported inside functions: this module is importable from the lean tools, whose `tune`
uses `advice` (pure arithmetic on the cost model) to say when distilling would pay.
"""
from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..runtime.errors import ExportError, InvalidArgument
from ..runtime.stats import predicted_speedup
from .check import TOKENIZER_FILES, _config, check_pair, require_compatible

KL_WEIGHT = 1.0                 # a draft's job is to agree with its target: on text the target was not trained on,
                                # cross-entropy pulls the draft toward the text and away from the target
                                # (benchmarks/domain_adapt.py: a 0.5 mix lowered alpha by 14 points)
HOLDOUT = 0.05                  # share of documents held out for alpha (by content hash)
KS = tuple(range(1, 9))         # alpha is reported for k = 1..8
EVAL_WINDOWS, EVAL_PROMPT, EVAL_NEW = 24, 128, 64   # held-out windows: prompt tokens, target greedy continuation
EVAL_EVERY_S = 60               # held-out alpha during training: at a checkpoint, at most once a minute
WARMUP = 50                     # steps (at most 5% of the run)
SKIP_DIRS = {".git", ".hg", ".svn", "__pycache__", ".venv", "venv", "node_modules", ".tox", ".mypy_cache"}
CHECKPOINT = "checkpoint.pt"
DISTILL_CARD = "distill_card.json"   # in the draft folder, and copied by export into BUNDLE/draft/


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


# -- corpus ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Corpus:
    train: tuple[str, ...]
    held_out: tuple[str, ...]
    sha256: str              # over every document's sha256, in order: the same files give the same hash
    documents: int
    bytes: int
    skipped: int             # binary or non-UTF-8 files left out


def _text(path: Path) -> str | None:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise InvalidArgument(f"cannot read corpus file {path}: {e.strerror}") from e
    if b"\0" in raw[:8192]:
        return None  # binary
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _jsonl(path: Path) -> list[str]:
    texts = []
    with open(path, encoding="utf-8", errors="strict") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InvalidArgument(f"{path}:{n} is not valid JSON ({e.msg}); JSONL corpora have one object with "
                                      f"a \"text\" field per line") from e
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise InvalidArgument(f"{path}:{n} has no string \"text\" field; each JSONL line must be like "
                                      f"{{\"text\": \"...\"}}")
            texts.append(row["text"])
    return texts


def read_corpus(paths: tuple[Path, ...], globs: tuple[str, ...] = (), holdout: float = HOLDOUT) -> Corpus:
    """Documents from files (JSONL: one per line), folders (recursive; `globs` filter names), split by content hash."""
    if not paths:
        raise InvalidArgument("no --corpus given: pass files, folders or JSONL files of your own text")
    docs, skipped = [], 0
    for p in map(Path, paths):
        if not p.exists():
            raise InvalidArgument(f"corpus path {p} does not exist")
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and not SKIP_DIRS & set(f.relative_to(p).parts)
                           and (not globs or any(fnmatch.fnmatch(f.name, g) for g in globs)))
        else:
            files = [p]
        for f in files:
            if f.suffix == ".jsonl":
                try:
                    docs.extend(_jsonl(f))
                except UnicodeDecodeError as e:
                    raise InvalidArgument(f"{f} is not UTF-8 ({e}); convert it first") from e
                continue
            text = _text(f)
            if text is None:
                skipped += 1
            else:
                docs.append(text)
    docs = [d for d in docs if d.strip()]
    if not docs:
        where = ", ".join(map(str, paths))
        hint = f" matching {', '.join(globs)}" if globs else ""
        raise InvalidArgument(f"the corpus ({where}) has no non-empty UTF-8 text files{hint}; point --corpus at "
                              f"your text (files, folders, or JSONL with a \"text\" field)")
    digests = [hashlib.sha256(d.encode()).hexdigest() for d in docs]
    # Held out by content hash: deterministic, independent of file order, and duplicates land on the same side.
    bucket = [int(h[:8], 16) / 2**32 for h in digests]
    held = [i for i, b in enumerate(bucket) if b < holdout]
    if not held:
        held = [min(range(len(docs)), key=bucket.__getitem__)]
    train = [d for i, d in enumerate(docs) if i not in set(held)]
    held_docs = [docs[i] for i in held]
    if not train:  # one document: hold out its tail instead
        lines = docs[0].splitlines(keepends=True)
        cut = max(1, int(len(lines) * (1 - max(holdout, 0.1))))
        train, held_docs = ["".join(lines[:cut])], ["".join(lines[cut:])]
    return Corpus(tuple(train), tuple(held_docs), hashlib.sha256("".join(digests).encode()).hexdigest(), len(docs),
                  sum(len(d.encode()) for d in docs), skipped)


def encode(tokenizer_dir: Path, texts: tuple[str, ...], eos: int) -> np.ndarray:
    """One stream: each document as the tokenizer encodes it (with its BOS if it adds one), then EOS."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    ids: list[int] = []
    for enc in tok.encode_batch(list(texts)):
        ids.extend(enc.ids + [eos])
    return np.array(ids, dtype=np.int64)


def batch_at(data: np.ndarray, seed: int, step: int, batch: int, seq: int) -> np.ndarray:
    """The windows of step `step`: a pure function of (seed, step), so a resumed run sees the same data order."""
    starts = np.random.default_rng([seed, step]).integers(0, len(data) - seq, batch)
    return np.stack([data[s : s + seq + 1] for s in starts])  # [batch, seq + 1]


# -- models ----------------------------------------------------------------------------------------------------------
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


def _depth(cfg: dict) -> int:
    return cfg.get("num_hidden_layers") or cfg.get("n_layer") or cfg.get("num_layers") or 0


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


def _load(path: Path, torch):
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


# -- training ----------------------------------------------------------------------------------------------------------
def _lr(step: int, total: int, peak: float) -> float:
    warm = max(1, min(WARMUP, total // 20))
    return peak * min(1.0, (step + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / total))))


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InvalidArgument("--device cuda but torch sees no CUDA GPU; use --device cpu (or auto), or install a "
                              "CUDA build of torch")
    return torch.device(name)


def _save_atomic(obj, path: Path) -> None:
    import torch

    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a crash mid-write leaves the previous checkpoint intact


def work_dir(out: Path) -> Path:
    """Checkpoints and the staged output live beside --out (same filesystem: the final rename is atomic)."""
    out = Path(out)
    return out.with_name(f".{out.name}.distill")


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


def distill(o: DistillOptions, progress: Callable[[Progress], None] | None = None) -> dict | None:
    """Train, then write o.out atomically. Returns the card (None when paused by o.pause_after). Raises
    InvalidArgument / ExportError before writing anything when the inputs are wrong; an interruption or a crash keeps
    the last checkpoint (at most one interval old: a checkpoint is only ever written between steps) for --resume."""
    say = progress or (lambda p: None)
    # 1. validate everything cheap first: nothing is written until the inputs are known to be good
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
    out, work = Path(o.out), work_dir(o.out)
    if out.exists() and not o.force:
        raise InvalidArgument(f"{out} already exists: pass --force to replace it (the old folder is kept until the "
                              f"new one is complete)")
    ckpt_path = work / CHECKPOINT
    if o.resume and not ckpt_path.is_file():
        raise InvalidArgument(f"--resume: no checkpoint at {ckpt_path}; start without --resume")
    if not o.resume and ckpt_path.is_file() and not o.force:
        raise InvalidArgument(f"an interrupted run left a checkpoint at {ckpt_path}: pass --resume to continue it, or "
                              f"--force to start over")
    tcfg = _config(Path(o.target))
    depth = _depth(tcfg)
    if o.from_target is not None:
        bad = [i for i in o.from_target if not 0 <= i < depth]
        if bad or len(o.from_target) >= depth:
            raise InvalidArgument(f"--from-target: the target has {depth} layers (0..{depth - 1}); a draft keeps "
                                  f"fewer, e.g. --from-target {max(1, depth // 4)}")
    else:
        require_compatible(check_pair(Path(o.target), Path(o.draft)))
    corpus = read_corpus(o.corpus, o.glob)

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one progress bar (ours), not one per weight load and save
    device = _device(o.device)
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


def _run(o: DistillOptions, corpus: Corpus, device, work: Path, ckpt_path: Path, say, torch) -> dict:
    import torch.nn.functional as F

    target = _load(Path(o.target), torch).to(device).eval()
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
    draft = carve(target, o.from_target) if o.from_target else _load(Path(o.draft), torch)
    draft.to(device).train()
    if len(held) < 16:
        raise InvalidArgument(f"the held-out share of the corpus is only {len(held)} tokens, too few to measure "
                              f"alpha; add more documents (about {HOLDOUT:.0%} of them are held out)")
    windows, prompt = eval_windows(target, held, device, max_pos)
    step_tokens = o.batch * seq
    decay = [p for p in draft.parameters() if p.dim() >= 2]
    other = [p for p in draft.parameters() if p.dim() < 2]  # norms: no weight decay
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=o.lr, betas=(0.9, 0.95))
    minutes = o.minutes if o.minutes is not None else (None if o.tokens is not None else 10.0)

    if o.resume:
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        changed = [k for k, v in o.recipe().items() if state["recipe"].get(k) != v]
        if changed:
            raise InvalidArgument(f"--resume with other options than the interrupted run ({', '.join(changed)}); "
                                  f"rerun with the same options, or --force to start over")
        draft.load_state_dict(state["draft"])
        opt.load_state_dict(state["opt"])
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"])
        step, elapsed, total, log, before, evals = (state["step"], state["elapsed"], state["total_steps"],
                                                    state["log"], state["before"], state["evals"])
    else:
        torch.manual_seed(o.seed)
        draft.eval()
        before = greedy_alpha(target, draft, windows, prompt)
        draft.train()
        step, elapsed, log, evals = 0, 0.0, [], [{"step": 0, "alpha_k4": before["alpha"][4]}]
        total = math.ceil(o.tokens / step_tokens) if o.tokens is not None else None

    def checkpoint():
        _save_atomic({"recipe": o.recipe(), "draft": draft.state_dict(), "opt": opt.state_dict(), "step": step,
                      "elapsed": elapsed, "total_steps": total, "log": log, "before": before, "evals": evals,
                      "rng": {"torch": torch.get_rng_state(),
                              "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None}}, ckpt_path)

    # 2. train: the budget is steps (--tokens) or training seconds (--minutes, summed over resumed invocations)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    t0, run_steps, run_tokens = time.time(), 0, 0
    last_ckpt = last_eval = t0
    started = elapsed
    alpha_now = before["alpha"][4]
    while True:
        elapsed = started + time.time() - t0
        if (total is not None and step >= total) or (minutes is not None and elapsed >= minutes * 60):
            break  # --tokens: a fixed step count; --minutes: the time budget, or the estimated count if sooner
        if o.pause_after is not None and run_steps >= o.pause_after:
            checkpoint()
            return None
        if total is None and step >= 10:
            # --minutes: the schedule's length is estimated once, from the first 10 steps, and kept in the checkpoint
            # (the run then stops at that step: a resumed run follows the same schedule to the same end)
            total = max(step + 1, int(step * minutes * 60 / max(elapsed, 1e-6)))
        xy = torch.from_numpy(batch_at(data, o.seed, step, o.batch, seq)).to(device)
        x, y = xy[:, :-1], xy[:, 1:]
        for g in opt.param_groups:
            g["lr"] = _lr(step, total or 10**9, o.lr)
        with autocast:
            logits = draft(x).logits.float()
            with torch.no_grad():
                t_logits = target(x).logits.float()
        v = min(logits.shape[-1], t_logits.shape[-1])
        ce = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        kl = F.kl_div(F.log_softmax(logits[..., :v], -1), F.log_softmax(t_logits[..., :v], -1), log_target=True,
                      reduction="sum") / y.numel()
        loss = (1 - o.kl_weight) * ce + o.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        opt.step()
        step += 1
        run_steps += 1
        run_tokens += step_tokens
        elapsed = started + time.time() - t0
        log.append({"step": step, "seconds": round(elapsed, 2), "loss": round(loss.item(), 4),
                    "ce": round(ce.item(), 4), "kl": round(kl.item(), 4)})
        if time.time() - last_ckpt >= o.checkpoint_minutes * 60:
            if time.time() - last_eval >= EVAL_EVERY_S:  # alpha never touches the weights or the RNG
                draft.eval()
                alpha_now = greedy_alpha(target, draft, windows, prompt)["alpha"][4]
                draft.train()
                evals.append({"step": step, "alpha_k4": alpha_now})
                last_eval = time.time()
            checkpoint()
            last_ckpt = time.time()
        done = step / total if total else elapsed / (minutes * 60)
        say(Progress(step, total, min(1.0, done), step * step_tokens, run_tokens / max(time.time() - t0, 1e-6),
                     log[-1]["loss"], alpha_now))
    checkpoint()

    # 3. alpha after, the folder, the card
    draft.eval()
    after = greedy_alpha(target, draft, windows, prompt)
    evals.append({"step": step, "alpha_k4": after["alpha"][4]})
    say(Progress(step, total, 1.0, step * step_tokens, run_tokens / max(time.time() - t0, 1e-6),
                 log[-1]["loss"] if log else float("nan"), after["alpha"][4], note="writing the draft"))
    staging = work / "staging"
    shutil.rmtree(staging, ignore_errors=True)
    dtype = _saved_dtype(Path(o.target), torch)
    draft.to("cpu").to(dtype).save_pretrained(staging)
    for name in (*TOKENIZER_FILES, "generation_config.json"):
        if (Path(o.target) / name).is_file():
            shutil.copy(Path(o.target) / name, staging / name)
    card = {
        "target": str(o.target), "source": {"draft": str(o.draft)} if o.draft else
        {"from_target": list(o.from_target)},
        "parameters": sum(p.numel() for p in draft.parameters()), "num_hidden_layers": draft.config.num_hidden_layers,
        "corpus": {"paths": [str(p) for p in o.corpus[:20]] + ([f"... {len(o.corpus) - 20} more"] if len(o.corpus) > 20
                                                                 else []), "glob": list(o.glob), "sha256": corpus.sha256,
                   "documents": corpus.documents, "bytes": corpus.bytes, "skipped_files": corpus.skipped,
                   "held_out_documents": len(corpus.held_out), "train_tokens": int(len(data)),
                   "held_out_tokens": int(len(held))},
        "recipe": {**o.recipe(), "seq_len": seq, "loss": "(1 - kl_weight) * CE + kl_weight * KL(target || draft)",
                   "optimizer": "AdamW(0.9, 0.95), wd 0.1 on matrices, warmup + cosine to 0.1 lr, clip 1.0"},
        "steps": step, "tokens_seen": step * step_tokens, "train_seconds": round(elapsed, 1),
        "tokens_per_s": round(step * step_tokens / max(elapsed, 1e-6), 1), "device": _describe(device, torch),
        "alpha_estimator": ("greedy speculative rounds, alpha = accepted / tested (the runtime's), by teacher forcing "
                            f"on the target's greedy continuation of {len(windows)} held-out windows "
                            f"({prompt} prompt + {windows.shape[1] - prompt} tokens), PyTorch fp32 weights"),
        "before": before, "after": after, "alpha_evals": evals,
    }
    note = _plot(log, evals, staging / "loss.png")
    card["loss_curve"] = "loss.png" if note is None else note
    (staging / DISTILL_CARD).write_text(json.dumps({**card, "log": log}, indent=1))
    (staging / "distill_card.md").write_text(card_markdown(card))
    _replace(staging, Path(o.out))
    shutil.rmtree(work, ignore_errors=True)
    return card


def _saved_dtype(target: Path, torch):
    """The draft is written in the target checkpoint's dtype (fp16 demo pair, bf16 hub models, fp32 tiny tests)."""
    cfg = _config(target)
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(name, torch.float32)


def _describe(device, torch) -> dict:
    import platform

    d = {"type": device.type, "torch": torch.__version__, "threads": torch.get_num_threads(),
         "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    if device.type == "cuda":
        d["gpu"] = torch.cuda.get_device_name(device)
    return d


def _replace(staging: Path, out: Path) -> None:
    """Swap the finished folder in with renames, so no reader ever sees half a draft."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{int(time.time())}")
        out.rename(old)
    staging.rename(out)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _plot(log: list[dict], evals: list[dict], path: Path) -> str | None:
    try:
        import matplotlib
    except ImportError:
        return "no plot: matplotlib is not installed (pip install 'specedge[bench]')"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    steps = [r["step"] for r in log]
    for key in ("loss", "ce", "kl"):
        a1.plot(steps, [r[key] for r in log], label=key, lw=0.8)
    a1.set(xlabel="step", ylabel="nats/token", title="training loss")
    a1.legend()
    a2.plot([e["step"] for e in evals], [e["alpha_k4"] for e in evals], "o-")
    a2.set(xlabel="step", ylabel="alpha (k = 4)", title="held-out alpha")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def card_markdown(card: dict) -> str:
    c, b, a = card["corpus"], card["before"], card["after"]
    rows = "\n".join(f"| {k} | {b['alpha'][k]:.3f} | {a['alpha'][k]:.3f} |" for k in KS)
    src = card["source"]
    how = f"continued from {src['draft']}" if "draft" in src else f"carved from the target's layers {src['from_target']}"
    return f"""# Distilled draft

Draft for `{card['target']}`, {how}; {card['parameters'] / 1e6:.2f}M parameters, {card['num_hidden_layers']} layers.

- corpus: {c['documents']} documents, {c['bytes']:,} bytes, sha256 `{c['sha256'][:16]}`; {c['train_tokens']:,} training \
tokens, {c['held_out_documents']} documents ({c['held_out_tokens']:,} tokens) held out
- trained: {card['steps']} steps, {card['tokens_seen']:,} tokens seen in {card['train_seconds']:.0f} s \
({card['tokens_per_s']:.0f} tokens/s) on {card['device']['type']} ({card['device'].get('gpu') or card['device']['cpu']})
- loss: {card['recipe']['loss']}, kl_weight {card['recipe']['kl_weight']}, lr {card['recipe']['lr']}, batch \
{card['recipe']['batch']} x {card['recipe']['seq_len']}, seed {card['recipe']['seed']}
- held out: KL(target || draft) {b['kl']:.3f} -> {a['kl']:.3f}, greedy agreement {b['agreement']:.3f} -> \
{a['agreement']:.3f}
- alpha: {card['alpha_estimator']}

| k | alpha before | alpha after |
|---|---|---|
{rows}
"""


# -- tune's hint: would distilling pay? (no torch) ---------------------------------------------------------------------
@dataclass(frozen=True)
class Advice:
    distill: bool
    reason: str
    alpha_needed: float | None        # the alpha at which the cost model predicts a gain (best k), None if none does
    predicted_speedup: float          # at the measured alpha, best k
    predicted_speedup_after: float    # at alpha + TYPICAL_GAIN (what distilling usually adds)


TYPICAL_GAIN = 0.08   # distilling on the user's domain: +5..10 points of alpha in practice, +11 on the demo pair
MIN_GAIN = 1.05       # the speedup below which speculation is not worth having (tune's threshold)
CARD_DROP = 0.05      # alpha on the user's prompts this far below the card's: the traffic is not the corpus


def advice(alpha: float, c: float, t: dict[int, float] | None = None, card: dict | None = None,
           ks: tuple[int, ...] = KS) -> Advice:
    """Would `spec-export distill` pay for this draft? Yes when the measured alpha is below the level where the
    cost model predicts a gain (and a typical distillation gain would reach it or improve the speedup), or when alpha
    on the user's prompts is CARD_DROP below what the draft's distill card recorded."""
    best = lambda a: max(predicted_speedup(a, k, c, t) for k in ks)  # noqa: E731
    now, after = best(alpha), best(min(alpha + TYPICAL_GAIN, 0.99))
    needed = next((a / 100 for a in range(0, 100) if best(a / 100) >= MIN_GAIN), None)
    cmd = "spec-export distill --target TARGET --draft DRAFT --corpus YOUR_TEXT --out DRAFT-distilled"
    if needed is not None and alpha < needed:
        gain = "reach" if after >= MIN_GAIN else "approach"
        return Advice(True, f"alpha {alpha:.2f} is below {needed:.2f}, where the cost model (c = {c:.3f}) predicts a "
                            f"gain; distilling on your own text (+{TYPICAL_GAIN:.2f} alpha is typical) would {gain} "
                            f"it (predicted {now:.2f}x -> {after:.2f}x): {cmd}", needed, now, after)
    if card:
        alphas = card.get("after", {}).get("alpha", {})
        k_best = max(ks, key=lambda k: predicted_speedup(alpha, k, c, t))
        recorded = alphas.get(k_best, alphas.get(str(k_best)))
        if recorded is not None and alpha < recorded - CARD_DROP:
            return Advice(True, f"alpha on your prompts ({alpha:.2f} at k = {k_best}) is {recorded - alpha:.2f} below "
                                f"the {recorded:.2f} recorded in the draft's distill card: your traffic differs from "
                                f"its distillation corpus; distill it on your own text: {cmd}", needed, now, after)
    if needed is None:
        return Advice(False, f"the draft costs too much (c = {c:.3f}): no alpha makes speculation pay; distilling "
                             f"cannot help, a smaller or more quantized draft can", None, now, after)
    return Advice(False, f"alpha {alpha:.2f} is above {needed:.2f}, where speculation starts to pay; distilling "
                         f"would still add about {after / now - 1:.0%} (predicted {now:.2f}x -> {after:.2f}x)",
                  needed, now, after)


def bundle_card(bundle: Path) -> dict | None:
    """The distill card a bundle's draft was exported with (None for a draft that was not distilled)."""
    f = Path(bundle) / "draft" / DISTILL_CARD
    return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else None
