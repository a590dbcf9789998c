"""The distillation corpus: the user's text read from files, folders and JSONL, split by content hash into training
and held-out documents, encoded into one token stream, and cut into the batch of each step.

No torch here: the batches are numpy, a pure function of (seed, step), which is what makes a resumed run repeat an
uninterrupted one.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..runtime.errors import InvalidArgument

HOLDOUT = 0.05                  # share of documents held out for alpha (by content hash)
SKIP_DIRS = {".git", ".hg", ".svn", "__pycache__", ".venv", "venv", "node_modules", ".tox", ".mypy_cache"}


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
