"""Run onnxruntime-genai's model builder (0.18) on configs it misreads, without forking it.

`python -m specedge.export.genai_builder BUILDER-ARGS...` is `python -m onnxruntime_genai.models.builder
BUILDER-ARGS...` with each config the builder loads adapted first. It runs in its own process (graphs.py starts
it), so nothing here touches the exporter's own transformers.

What the builder misreads, and the adaptation:
1. Sliding windows without `layer_types` (Mistral, Phi-3): the builder applies a window only to layers marked
   "sliding_attention", so it silently exported them as global attention. We set layer_types from check.py's
   per-layer windows, the same ones recorded in the manifest.
2. Gemma 3 under transformers 5 keeps one RoPE per layer type (rope_parameters = {"full_attention": {...},
   "sliding_attention": {...}}); the builder reads the flat layout of transformers 4 (rope_parameters["rope_type"]
   -> KeyError, and rope_local_base_freq for the local layers' theta). We give it the flat layout. Only plain
   RoPE is adapted: graphs.builder_problem sends Gemma 3 with scaled RoPE to the torch.onnx exporter instead.
3. Gemma's embedding scale: the builder rounds sqrt(hidden_size) to two decimals (25.3 for 25.298... at 640
   wide); transformers multiplies by the exact value. We restore the exact value.
"""
from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

from .check import layer_windows


def adapt(config, raw: dict) -> None:
    """Adapt a transformers config object in place; `raw` is its config.json (text_config merged in)."""
    windows = layer_windows(raw)
    config.layer_types = ["sliding_attention" if w else "full_attention" for w in windows]
    if any(windows):
        config.sliding_window = max(windows)
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and "full_attention" in rope:
        full, local = rope["full_attention"], rope.get("sliding_attention", rope["full_attention"])
        config.rope_parameters = dict(full)
        config.rope_theta = full["rope_theta"]
        config.rope_local_base_freq = local["rope_theta"]


def main(argv: list[str]) -> None:
    import numpy as np
    from transformers import AutoConfig

    raw = json.loads((Path(argv[argv.index("-i") + 1]) / "config.json").read_text())
    raw = {**(raw.get("text_config") or {}), **raw}
    load = AutoConfig.from_pretrained

    def from_pretrained(*args, **kwargs):
        config = load(*args, **kwargs)
        if not isinstance(config, tuple):  # (config, unused kwargs): transformers loading the weights, left as is
            adapt(config, raw)
        return config

    AutoConfig.from_pretrained = from_pretrained

    import onnxruntime_genai.models  # noqa: F401  (puts the builder's own modules on sys.path, as it expects)
    from builders import gemma

    init = gemma.GemmaModel.__init__

    def gemma_init(self, config, *args, **kwargs):
        init(self, config, *args, **kwargs)
        self.embed_attrs["scale"] = float(np.float32(np.sqrt(self.hidden_size)))

    gemma.GemmaModel.__init__ = gemma_init
    sys.argv = ["builder", *argv]
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
