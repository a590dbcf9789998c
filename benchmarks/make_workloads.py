"""Write the drafting workloads from third-party Python code the demo pair never saw (it was trained on the CPython
standard library only), deterministically for the installed package versions (each prompt names its source).

    python benchmarks/make_workloads.py            # writes benchmarks/{completion,editing,nopay}.jsonl

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

tok = Tokenizer.from_file(str(TOKENIZER))


def n_tokens(text: str) -> int:
    return len(tok.encode(text).ids)


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


def completion(files, rng) -> list[dict]:
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
        while start < cut and n_tokens("".join(lines[max(0, start) : cut])) > MAX_TOKENS:
            start += 5
        start = max(0, start)
        if cut - start < 10:
            continue
        prompts.append({"prompt": "".join(lines[start:cut]), "source": f"{label}:{start + 1}-{cut}"})
        per[package] = per.get(package, 0) + 1
        if len(prompts) == N_PROMPTS:
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


def editing(files, rng) -> list[dict]:
    copies, siblings = [], []
    for label, _, lines in rng.sample(files, len(files)):
        before = len(copies) + len(siblings)
        for fn, body in functions(lines):
            if len(copies) + len(siblings) - before >= PER_PACKAGE - 1:
                break
            text = "".join(lines[fn.lineno - 1 : fn.end_lineno])
            if n_tokens(text) * 2 > MAX_TOKENS:
                continue
            # an edited copy: the same function renamed, one of its identifiers renamed throughout
            names = sorted(n for n in {x.id for x in ast.walk(fn) if isinstance(x, ast.Name)}
                           | {a.arg for a in fn.args.args} if len(n) > 2 and n[0].islower() and n not in ("self", "cls"))
            counts = {n: len(re.findall(rf"\b{n}\b", text)) for n in names}
            used = [n for n in names if counts[n] >= 3]
            if used and len(copies) < N_PROMPTS // 2:
                old = rng.choice(used)
                copy = re.sub(rf"\b{old}\b", f"new_{old}", text).replace(f"def {fn.name}(", f"def {fn.name}_v2(", 1)
                head = copy.splitlines(True)
                body_at = fn.body[0].lineno - fn.lineno  # the copy's header (signature) and its first body line
                prompt = text + "\n" + "".join(head[: body_at + 1])
                copies.append({"prompt": prompt, "source": f"{label}:{fn.lineno}-{fn.end_lineno} "
                               f"({fn.name} copied as {fn.name}_v2, {old} renamed new_{old})"})
            # a similar sibling: the next function of the same body, when it mostly repeats this one
            nxt = next((s for s in body if s.lineno > fn.end_lineno), None)
            if isinstance(nxt, ast.FunctionDef) and len(siblings) < N_PROMPTS // 2:
                sib = "".join(lines[nxt.lineno - 1 : nxt.end_lineno])
                if difflib.SequenceMatcher(None, text, sib).ratio() >= 0.6 and n_tokens(text + sib) <= MAX_TOKENS:
                    gap = "".join(lines[fn.end_lineno : nxt.lineno - 1])
                    siblings.append({"prompt": text + gap + lines[nxt.lineno - 1],
                                     "source": f"{label}:{fn.lineno}-{nxt.lineno} ({fn.name}, then {nxt.name})"})
        if len(copies) + len(siblings) >= N_PROMPTS:
            break
    return copies + siblings


def nopay(rng) -> list[dict]:
    special = {int(t["id"]) for t in json.loads(TOKENIZER.read_text())["added_tokens"]}
    vocab = [i for i in range(tok.get_vocab_size()) if i not in special]
    prompts = []
    for i in range(N_PROMPTS):
        ids = rng.sample(vocab, rng.randrange(64, 256))
        text = tok.decode(ids)
        while n_tokens(text) > MAX_TOKENS:
            ids = ids[: len(ids) * 3 // 4]
            text = tok.decode(ids)
        prompts.append({"prompt": text, "source": f"{len(ids)} random token ids of models/demo/target/tokenizer.json "
                                                  f"(make_workloads.py seed {SEED}, prompt {i})"})
    return prompts


def main() -> None:
    files = sources()
    for name, prompts in [("completion", completion(files, random.Random(SEED))),
                          ("editing", editing(files, random.Random(SEED + 1))),
                          ("nopay", nopay(random.Random(SEED + 2)))]:
        (HERE / f"{name}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
        lengths = [n_tokens(p["prompt"]) for p in prompts]
        print(f"{name}: {len(prompts)} prompts, {min(lengths)}-{max(lengths)} tokens")


if __name__ == "__main__":
    main()
