"""TensorRT through onnxruntime: session options, not a second runtime. Both paths are UNVERIFIED here (see README).

- "rtx": TensorRT-RTX as onnxruntime's plugin execution provider (`pip install 'specedge[rtx]'`) on the builder's
  NvTensorRtRtx graphs. It runs on RTX GPUs only (compute capability 8.6, 8.9, 12.x): on the H100 this workplace
  lends it registers but lists no device; CI has no GPU.
- "trt": native TensorRT (JetPack's on a Jetson, NVIDIA's wheel on a PC) through onnxruntime-gpu's TensorRT provider
  on plain-op torch.onnx graphs, with explicit optimization profiles (1 token .. the context) and an engine cache,
  so the engine is built once per GPU and model. The `tensorrt` libraries cannot be installed in this workplace.

In both, the KV buffers stay in host memory bound through IOBinding, so every step copies them: the CUDA provider
is the device-resident path.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import onnxruntime as ort

from .errors import InvalidArgument
from .manifest import ModelSpec


def engine_cache(graph: str) -> Path:
    """Where compiled engines for one graph live: per user, outside the (possibly read-only) bundle."""
    key = hashlib.sha256(str(Path(graph).resolve()).encode()).hexdigest()[:16]
    root = Path(os.environ.get("SPECEDGE_CACHE", Path.home() / ".cache" / "specedge"))
    (root / key).mkdir(parents=True, exist_ok=True)
    return root / key


def add_rtx_provider(opts: ort.SessionOptions, graph: str, cuda_graph: bool) -> None:
    """Append the TensorRT-RTX device to `opts`, or say precisely why it cannot be used."""
    try:
        import onnxruntime_ep_nv_tensorrt_rtx as rtx
    except ImportError:
        raise InvalidArgument("the TensorRT-RTX provider is not installed: pip install 'specedge[rtx]' (it needs the "
                              "CPU build of onnxruntime, not onnxruntime-gpu), or use --provider cuda / cpu") from None
    name = rtx.get_ep_name()
    if name not in {d.ep_name for d in ort.get_ep_devices()}:
        ort.register_execution_provider_library(name, rtx.get_library_path())
    devices = [d for d in ort.get_ep_devices() if d.ep_name == name]
    if not devices:  # without this check onnxruntime would quietly run the graph on the CPU
        raise InvalidArgument("TensorRT-RTX found no supported GPU: it runs on RTX GPUs (compute capability 8.6, 8.9 "
                              "or 12.x) only; on other NVIDIA GPUs use --provider cuda")
    opts.add_provider_for_devices(devices[:1], {"enable_cuda_graph": "1" if cuda_graph else "0",
                                               "nv_runtime_cache_path": str(engine_cache(graph))})


def trt_provider(spec: ModelSpec, graph: str) -> tuple[str, dict]:
    """The TensorRT provider with one optimization profile covering prefill and verify: every dynamic length runs
    from 1 (decode) to the context; opt is a verify of 5 tokens on half a context."""
    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        raise InvalidArgument("this onnxruntime has no TensorRT provider: on a Jetson install JetPack's TensorRT and "
                              "an onnxruntime-gpu wheel built with TensorRT; on a PC, onnxruntime-gpu plus NVIDIA's "
                              "tensorrt wheel (pip install tensorrt --extra-index-url https://pypi.nvidia.com)")
    L, h, d = spec.max_length, spec.num_kv_heads, spec.head_dim

    def shapes(n: int, past: int, total: int) -> str:
        dims = {"input_ids": n, "position_ids": n, "attention_mask": total}
        kv = {t.format(i=i) for i in range(spec.num_layers) for t in (spec.past_key, spec.past_value)}
        return ",".join(f"{x}:1x{dims[x]}" if x in dims else f"{x}:1x{h}x{past}x{d}"
                        for x in spec.inputs if x in dims or x in kv)

    return "TensorrtExecutionProvider", {
        "trt_engine_cache_enable": "1", "trt_engine_cache_path": str(engine_cache(graph)),
        "trt_timing_cache_enable": "1", "trt_fp16_enable": "1",
        "trt_profile_min_shapes": shapes(1, 0, 1), "trt_profile_opt_shapes": shapes(5, L // 2, L // 2 + 5),
        "trt_profile_max_shapes": shapes(L, L, L)}
