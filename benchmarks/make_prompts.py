"""Write benchmark prompts from the demo pair's held-out standard-library modules (never seen in training).

    python benchmarks/make_prompts.py > benchmarks/heldout.jsonl

Each prompt is the code just before a function body: a realistic autocomplete request (IDE-style prefix).
"""
import json
import sys
import sysconfig
from pathlib import Path

from specedge.models.train_demo import HELD_OUT

root = Path(sysconfig.get_paths()["stdlib"])
prompts = []
for held in HELD_OUT:
    path = root / held
    files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
    for f in files:
        lines = f.read_text(encoding="utf-8").splitlines(keepends=True)
        defs = [i for i, line in enumerate(lines) if line.lstrip().startswith("def ") and line.rstrip().endswith(":")]
        for i in defs[1::7][:3]:  # a few functions per module, spread out
            prompts.append({"prompt": "".join(lines[max(0, i - 30) : i + 1]), "source": f"{f.relative_to(root)}:{i + 1}"})
for p in prompts[:20]:
    print(json.dumps(p))
print(f"{min(len(prompts), 20)} prompts", file=sys.stderr)
