"""Write the drafting workloads from third-party Python code the demo pair never saw (it was trained on the CPython
standard library only), deterministically for the installed package versions, the tokenizer and the seed (each
prompt names its source).

    python benchmarks/make_workloads.py            # the demo tokenizer: writes benchmarks/{completion,editing,nopay}.jsonl
    python benchmarks/make_workloads.py --tokenizer ~/.cache/specedge/gemma3-270m/bundle-dv16k/tokenizer.json \
        --seed 23 --out benchmarks/workloads/gemma3     # Gemma's tokenizer (benchmarks/gemma_vs_llamacpp.py)

The tokenizer sets the token budgets (MAX_TOKENS per prompt) and the vocabulary nopay draws from.

completion: a file's preceding lines, cut at a random line: continue it (what an IDE asks for).
editing:    a function followed by the start of an edited copy (one identifier renamed) or of a similar sibling:
            the answer mostly repeats the prompt.
nopay:      random token ids of the demo tokenizer, decoded: nothing to look up, little to predict.
"""
from __future__ import annotations

import ast
import difflib
import importlib.metadata as md
import json
import random
import re
from pathlib import Path

from tokenizers import Tokenizer

HERE = Path(__file__).parent
TOKENIZER = HERE.parent / "models" / "demo" / "target" / "tokenizer.json"
PACKAGES = ["click", "rich", "hypothesis", "jinja2", "pygments", "markdown-it-py", "packaging", "pluggy", "typer"]
N_PROMPTS, MAX_TOKENS, SEED = 16, 700, 12
PER_PACKAGE = 3      # completion prompts per package at most, and editing prompts per file: spread the sources
DATA = re.compile(r"lexers/|_unicode_data|builtins|_mapping|/vendor")   # tables and generated files, not code



class Tokens:
    """The tokenizer the workloads are measured with: token counts, and the ids nopay may draw (no special ones)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tok = Tokenizer.from_file(str(self.path))
        root = HERE.parent.resolve()   # the label in each nopay prompt's source: relative to the repository if inside
        full = self.path.resolve()
        home = Path.home().resolve()
        self.label = str(full.relative_to(root)) if full.is_relative_to(root) else \
            f"~/{full.relative_to(home)}" if full.is_relative_to(home) else str(full)

    def count(self, text: str) -> int:
        return len(self.tok.encode(text).ids)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    def ordinary_ids(self) -> list[int]:
        special = {int(t["id"]) for t in json.loads(self.path.read_text())["added_tokens"]}
        return [i for i in range(self.tok.get_vocab_size()) if i not in special]


def sources() -> list[tuple[str, Path, list[str]]]:
    """(label prefix, path, lines) of every .py file of the packages, in a fixed order."""
    out = []
    for name in PACKAGES:
        dist = md.distribution(name)
        for f in sorted(str(p) for p in dist.files or [] if str(p).endswith(".py") and not DATA.search(str(p))):
            path = Path(dist.locate_file(f))
            if path.is_file():
                out.append((f"{name} {dist.version}: {f}", path, path.read_text(encoding="utf-8").splitlines(True)))
    return out


def completion(files, rng, tok: Tokens, n_prompts: int = N_PROMPTS) -> list[dict]:
    prompts = []
    long = [f for f in files if len(f[2]) >= 80]
    per: dict[str, int] = {}
    for label, _, lines in rng.sample(long, len(long)):
        package = label.split()[0]
        if per.get(package, 0) == PER_PACKAGE:
            continue
        cut = rng.randrange(30, len(lines) - 10)
        if not lines[cut].strip():
            continue
        start = cut - 60                         # at most 60 lines back, fewer when they exceed the token budget
        while start < cut and tok.count("".join(lines[max(0, start) : cut])) > MAX_TOKENS:
            start += 5
        start = max(0, start)
        if cut - start < 10:
            continue
        prompts.append({"prompt": "".join(lines[start:cut]), "source": f"{label}:{start + 1}-{cut}"})
        per[package] = per.get(package, 0) + 1
        if len(prompts) == n_prompts:
            break
    return prompts


def functions(lines: list[str]) -> list[tuple[ast.FunctionDef, list[ast.stmt]]]:
    """Functions of 6..30 lines, with their siblings (the statements of the same body)."""
    try:
        tree = ast.parse("".join(lines))
    except SyntaxError:
        return []
    out = []
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        for child in body if isinstance(body, list) else []:   # a lambda's body is one expression
            if isinstance(child, ast.FunctionDef) and 6 <= child.end_lineno - child.lineno + 1 <= 30 \
                    and not child.decorator_list:
                out.append((child, node.body))
    return out


def editing(files, rng, tok: Tokens, n_prompts: int = N_PROMPTS) -> list[dict]:
    copies, siblings = [], []
    for label, _, lines in rng.sample(files, len(files)):
        before = len(copies) + len(siblings)
        for fn, body in functions(lines):
            if len(copies) + len(siblings) - before >= PER_PACKAGE - 1:
                break
            text = "".join(lines[fn.lineno - 1 : fn.end_lineno])
            if tok.count(text) * 2 > MAX_TOKENS:
                continue
            # an edited copy: the same function renamed, one of its identifiers renamed throughout
            names = sorted(n for n in {x.id for x in ast.walk(fn) if isinstance(x, ast.Name)}
                           | {a.arg for a in fn.args.args} if len(n) > 2 and n[0].islower() and n not in ("self", "cls"))
            counts = {n: len(re.findall(rf"\b{n}\b", text)) for n in names}
            used = [n for n in names if counts[n] >= 3]
            if used and len(copies) < n_prompts // 2:
                old = rng.choice(used)
                copy = re.sub(rf"\b{old}\b", f"new_{old}", text).replace(f"def {fn.name}(", f"def {fn.name}_v2(", 1)
                head = copy.splitlines(True)
                body_at = fn.body[0].lineno - fn.lineno  # the copy's header (signature) and its first body line
                prompt = text + "\n" + "".join(head[: body_at + 1])
                copies.append({"prompt": prompt, "source": f"{label}:{fn.lineno}-{fn.end_lineno} "
                               f"({fn.name} copied as {fn.name}_v2, {old} renamed new_{old})"})
            # a similar sibling: the next function of the same body, when it mostly repeats this one
            nxt = next((s for s in body if s.lineno > fn.end_lineno), None)
            if isinstance(nxt, ast.FunctionDef) and len(siblings) < n_prompts // 2:
                sib = "".join(lines[nxt.lineno - 1 : nxt.end_lineno])
                if difflib.SequenceMatcher(None, text, sib).ratio() >= 0.6 and tok.count(text + sib) <= MAX_TOKENS:
                    gap = "".join(lines[fn.end_lineno : nxt.lineno - 1])
                    siblings.append({"prompt": text + gap + lines[nxt.lineno - 1],
                                     "source": f"{label}:{fn.lineno}-{nxt.lineno} ({fn.name}, then {nxt.name})"})
        if len(copies) + len(siblings) >= n_prompts:
            break
    return copies + siblings


def nopay(rng, tok: Tokens, seed: int, n_prompts: int = N_PROMPTS) -> list[dict]:
    vocab = tok.ordinary_ids()
    prompts = []
    for i in range(n_prompts):
        ids = rng.sample(vocab, rng.randrange(64, 256))
        text = tok.decode(ids)
        while tok.count(text) > MAX_TOKENS:
            ids = ids[: len(ids) * 3 // 4]
            text = tok.decode(ids)
        prompts.append({"prompt": text, "source": f"{len(ids)} random token ids of {tok.label} "
                                                  f"(make_workloads.py seed {seed}, prompt {i})"})
    return prompts


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", type=Path, default=TOKENIZER, help="tokenizer.json (default: the demo pair's)")
    ap.add_argument("--seed", type=int, default=SEED, help="completion uses SEED, editing SEED+1, nopay SEED+2")
    ap.add_argument("--prompts", type=int, default=N_PROMPTS, help="prompts per workload")
    ap.add_argument("--out", type=Path, default=HERE, help="folder for completion/editing/nopay.jsonl")
    a = ap.parse_args(argv)
    tok = Tokens(a.tokenizer)
    files = sources()
    a.out.mkdir(parents=True, exist_ok=True)
    for name, prompts in [("completion", completion(files, random.Random(a.seed), tok, a.prompts)),
                          ("editing", editing(files, random.Random(a.seed + 1), tok, a.prompts)),
                          ("nopay", nopay(random.Random(a.seed + 2), tok, a.seed, a.prompts))]:
        (a.out / f"{name}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
        lengths = [tok.count(p["prompt"]) for p in prompts]
        print(f"{name}: {len(prompts)} prompts, {min(lengths)}-{max(lengths)} tokens ({tok.path})")


if __name__ == "__main__":
    main()
