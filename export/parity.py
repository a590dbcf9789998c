"""Validate an exported graph against the PyTorch checkpoint it came from, on real prompts.

Two properties: (1) the graph computes the checkpoint's logits; (2) a multi-token step with past equals
token-by-token decoding -- speculative verification rests on it. Both on every row of a step (the graph's default);
the last row computed alone (`logits_from`, as a prompt read or a draft's catch-up asks) is reported beside them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..runtime.manifest import ModelSpec
from ..runtime.kv import open_model

PROMPTS = (
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    a, b = 0, 1\n",
    "import os\nimport sys\n\n\nclass Config:\n    def __init__(self, path):\n        self.path = path\n",
    "for i, line in enumerate(open(filename)):\n    if line.startswith('#'):\n        continue\n",
)
# fp32 graphs must match PyTorch to float rounding; lower precisions are reported, and for a target the step
# consistency (same argmax) is what exactness needs.
FP32_TOL = 1e-3
VERIFY_LEN = 5


def long_prompt(tok, n: int) -> list[int]:
    """n token ids of real code (the standard library's textwrap.py, repeated if short): a parity prompt longer than
    a sliding window."""
    import sysconfig

    text = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text(encoding="utf-8")
    ids = tok.encode(text).ids
    while len(ids) < n:
        ids += tok.encode(text, add_special_tokens=False).ids
    return ids[:n]


def hf_logits(model_dir: Path, prompts: list[list[int]]) -> list[np.ndarray]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(torch.tensor([p])).logits[0].float().numpy() for p in prompts]


def check_graph(spec: ModelSpec, bundle: Path, prompts: list[list[int]], reference: list[np.ndarray],
                columns: np.ndarray | None = None) -> dict:
    """Compare the graph with reference logits; returns the parity record stored in the manifest. `columns`: the
    token ids compared (a reduced draft vocabulary: its logits are -inf elsewhere by construction)."""
    cols = slice(None) if columns is None else np.asarray(columns)
    # On the CPU provider whatever the bundle's device: every graph the exporter writes runs there (fp16 and FP8
    # included), so validation is the same on a laptop, in CI and on the target machine.
    model = open_model(bundle, spec, "cpu")
    dmax, agree, total, step_dmax, step_agree, step_total, last_dmax = 0.0, 0, 0, 0.0, 0, 0, 0.0
    for ids, ref in zip(prompts, reference):
        model.rewind(0)
        full = model.forward(ids)[:, cols].copy()                          # (n, V), one pass from an empty cache
        model.rewind(0)
        last = model.forward(ids, rows=1)[:, cols]                         # (1, V), the head on the last row only
        last_dmax = max(last_dmax, float(np.abs(last - full[-1:]).max()))
        ref = ref[:, cols]
        dmax = max(dmax, float(np.abs(full - ref).max()))
        agree += int((full.argmax(-1) == ref.argmax(-1)).sum())
        total += len(ids)
        # verification step: prefix, then VERIFY_LEN tokens at once vs the same tokens one at a time
        cut = max(1, len(ids) - VERIFY_LEN)
        model.rewind(0)
        model.forward(ids[:cut])
        multi = model.forward(ids[cut:])[:, cols].copy()
        model.rewind(cut)
        single = np.stack([model.forward(ids[i : i + 1])[0, cols].copy() for i in range(cut, len(ids))])
        step_dmax = max(step_dmax, float(np.abs(multi - single).max()))
        step_agree += int((multi.argmax(-1) == single.argmax(-1)).sum())
        step_total += len(ids) - cut
    return {"validated_on": "CPUExecutionProvider", "max_abs_logit_diff": dmax, "top1_agreement": agree / total,
            "tokens": total, "step_max_abs_diff": step_dmax, "step_top1_agreement": step_agree / step_total,
            "last_row_max_abs_diff": last_dmax}


def passes(record: dict, precision: str) -> tuple[bool, str]:
    """A target graph must be step-consistent; an fp32 one must also match PyTorch to FP32_TOL."""
    if record["step_top1_agreement"] < 1.0:
        return False, (f"a multi-token step disagrees with token-by-token decoding "
                       f"(top-1 agreement {record['step_top1_agreement']:.3f}): verification would not be exact")
    if precision == "fp32" and record["max_abs_logit_diff"] > FP32_TOL:
        return False, f"max |Δlogit| vs PyTorch is {record['max_abs_logit_diff']:.2e} > {FP32_TOL:g}"
    return True, ""
