"""Draft step cost of the real Gemma 3 270M int4 self-draft (262,144-token vocabulary), full head vs --draft-vocab.

Reads the bundles benchmarks/gemma3_270m.py leaves in its cache (bundle-default, bundle-dv16k) and changes nothing
there. Configurations, timed on one thread as the runtime's draft session runs, interleaved round by round:
  full      bundle-default's draft (all 262,144 rows in the head)
  current   the same draft graph reduced by today's exporter (draft_vocab.reduce_head) to bundle-dv16k's kept ids,
            in a temporary folder: what `--draft-vocab 16384` exports now
  on-disk   bundle-dv16k's draft as it was exported (an older exporter may have written another id map)
Per configuration: ms of one decode step (n = 1 on `--past` cached tokens) reading the argmax and the logits; the
minimum over rounds (the step's own cost on a shared machine) and the median. `current` and `on-disk` must give
identical logits (asserted: same kept ids, same weights).

    python benchmarks/draft_vocab_gemma3.py --out benchmarks/results/draft-vocab-gemma3-270m-x86_64-2core-run1
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def reduced_copy(full: Path, spec, kept: np.ndarray, out: Path) -> Path:
    """bundle `full`'s draft folder copied to `out`/draft with its head reduced to `kept` by the current exporter."""
    import onnx

    from specedge.export.draft_vocab import reduce_head
    from specedge.export.osutil import save_graph

    shutil.copytree(full / Path(spec.graph).parent, out / Path(spec.graph).parent)
    path = out / spec.graph
    g = onnx.load(str(path))  # drop the argmax the export added: reduce_head adds its own, through the id map
    g.graph.node.remove(next(n for n in g.graph.node if n.output[0] == "argmax"))
    g.graph.output.remove(next(o for o in g.graph.output if o.name == "argmax"))
    save_graph(g, path)
    reduce_head(path, kept)
    return out


def kept_ids(bundle: Path, spec) -> np.ndarray:
    import onnx
    from onnx import numpy_helper
    from onnx.external_data_helper import load_external_data_for_tensor

    m = onnx.load(str(bundle / spec.graph), load_external_data=False)
    t = next(t for t in m.graph.initializer if t.name == "draft_vocab_kept")
    if t.data_location == onnx.TensorProto.EXTERNAL:
        load_external_data_for_tensor(t, str((bundle / spec.graph).parent))
    return numpy_helper.to_array(t)


def main() -> None:
    from rich.progress import track

    from specedge.export.draft_vocab import map_sha256
    from specedge.runtime.kv import open_model
    from specedge.runtime.manifest import load_manifest

    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache/specedge/gemma3-270m")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--past", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=50)
    a = ap.parse_args()
    full_b, dv_b = a.cache / "bundle-default", a.cache / "bundle-dv16k"
    mf, md = load_manifest(full_b), load_manifest(dv_b)
    kept = kept_ids(dv_b, md.draft)
    assert map_sha256(kept) == md.draft.vocab_map_sha256
    work = Path(tempfile.mkdtemp(prefix="draft-vocab-gemma3-"))
    try:
        cur = reduced_copy(full_b, mf.draft, kept, work)
        length = a.past + 8
        models = {"full": open_model(full_b, dataclasses.replace(mf.draft, max_length=length), threads=1),
                  "current": open_model(cur, dataclasses.replace(md.draft, max_length=length), threads=1),
                  "on-disk": open_model(dv_b, dataclasses.replace(md.draft, max_length=length), threads=1)}
        last = {}
        for name, m in models.items():
            m.forward(list(range(3, 3 + a.past)), want=None)
            m.rewind(a.past)
            last[name] = m.forward([5], want="logits").copy()
        assert np.array_equal(last["current"], last["on-disk"]), "same kept ids and weights, other logits"
        times = {name: {"argmax": [], "logits": []} for name in models}
        for _ in track(range(a.rounds), description="timing"):
            for name, m in models.items():   # interleaved: machine noise hits every configuration alike
                for want in ("argmax", "logits"):
                    m.rewind(a.past)
                    t = time.perf_counter()
                    m.forward([5], want=want)
                    times[name][want].append(1e3 * (time.perf_counter() - t))
        ms = {n: {w: float(np.min(v)) for w, v in r.items()} for n, r in times.items()}
        median = {n: {w: float(np.median(v)) for w, v in r.items()} for n, r in times.items()}
        report = {"utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": platform.machine(),
                  "cpus": os.cpu_count(), "load_average": os.getloadavg(), "threads": 1,
                  "vocab": mf.draft.vocab_size, "draft_vocab": len(kept), "past": a.past, "rounds": a.rounds,
                  "ms": ms, "median_ms": median,
                  "speedup_vs_full": {n: {w: ms["full"][w] / v for w, v in r.items()} for n, r in ms.items()}}
        a.out.parent.mkdir(parents=True, exist_ok=True)
        Path(f"{a.out}.json").write_text(json.dumps(report, indent=1))
        print(json.dumps({"ms": ms, "speedup_vs_full": report["speedup_vs_full"]}, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
