"""Fallback exporter: a plain fp32 ONNX decoder via torch.onnx.export(dynamo=True), for architectures that
onnxruntime-genai's model builder does not support (GPT-2, ...). KV layout "concat": present = concat(past, new)."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

PAST_KEY, PAST_VALUE = "past_key_values.{i}.key", "past_key_values.{i}.value"
PRESENT_KEY, PRESENT_VALUE = "present.{i}.key", "present.{i}.value"


def _shape(cfg) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) under whatever names the config uses (GPT-2's attribute_map covers it)."""
    layers, heads = cfg.num_hidden_layers, cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return layers, kv_heads, head_dim


def export_concat(model_dir: Path, out_file: Path, *, opset: int = 18) -> dict:
    """Export the HF causal LM in model_dir (fp32) to out_file (+ out_file.name + '.data' past 2 GB of weights).

    Graph: input_ids [b, n], attention_mask [b, past+n] (all ones), position_ids [b, n] (past..past+n-1), then
    past_key_values.{i}.key / .value [b, kv_heads, past, head_dim] per layer -> logits [b, n, vocab], then
    present.{i}.key / .value per layer (interleaved), each [b, kv_heads, past+n, head_dim]. b, n >= 1 and past >= 0
    are dynamic. Returns the interface (names, templates, shapes) for the manifest.
    """
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    L, H, D = _shape(model.config)
    V = model.get_output_embeddings().weight.shape[0]   # rows of the logits; may exceed the tokenizer's size

    class Flat(torch.nn.Module):
        """The model with its cache as flat tensors in and out: ONNX carries no Cache objects."""

        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, past):
            cache = DynamicCache()
            for i in range(L):  # DynamicLayer.update concatenates onto an empty tensor: the cache is exactly `past`
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=cache, use_cache=True)
            # The model appended the new rows in place, so the layers now hold concat(past, new).
            return out.logits, *[t for layer in cache.layers for t in (layer.keys, layer.values)]

    inputs = ["input_ids", "attention_mask", "position_ids"]
    inputs += [t.format(i=i) for i in range(L) for t in (PAST_KEY, PAST_VALUE)]
    outputs = ["logits"] + [t.format(i=i) for i in range(L) for t in (PRESENT_KEY, PRESENT_VALUE)]

    # Example past=3, n=2: export would specialise a size of 0 or 1 into a constant. The graph still runs with
    # past=0 (empty cache at prefill) and n=1: DynamicLayer's `numel() == 0` branch returns the same length 0 as
    # `shape[-2]`, and the rest is shape arithmetic; the tests check both. Named dims name the ONNX axes.
    past, n = 3, 2
    example = (torch.zeros(1, n, dtype=torch.int64), torch.ones(1, past + n, dtype=torch.int64),
               torch.arange(past, past + n).unsqueeze(0), tuple(torch.zeros(1, H, past, D) for _ in range(2 * L)))
    Dim = torch.export.Dim
    b, s, p = Dim("batch"), Dim("seq"), Dim("past", min=0)
    # The mask gets its own dim: export cannot declare it as past + seq (a sum of two Dims), nor does it need to.
    dyn = ({0: b, 1: s}, {0: b, 1: Dim("total")}, {0: b, 1: s}, tuple({0: b, 2: p} for _ in range(2 * L)))

    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    # Quiet the exporter: warnings (torchvision ops skipped, pytree deprecations, axis renames) are not actionable.
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prog = torch.onnx.export(Flat().eval(), example, dynamo=True, dynamic_shapes=dyn, input_names=inputs,
                                     output_names=outputs, opset_version=opset, verbose=False)
            prog.save(out_file)  # external data (out_file.name + ".data") only when the weights exceed 2 GB
    finally:
        onnx_log.setLevel(level)
    return {"inputs": inputs, "outputs": outputs, "num_layers": L, "num_kv_heads": H, "head_dim": D,
            "vocab_size": V, "past_key": PAST_KEY, "past_value": PAST_VALUE, "present_key": PRESENT_KEY,
            "present_value": PRESENT_VALUE}
