"""Execution providers in one place: which onnxruntime provider each `--provider` name means, and the session
options each needs (CPU, CUDA, TensorRT-RTX plugin, native TensorRT).

TensorRT paths are session options, not a second runtime, and both are UNVERIFIED on their hardware (see README):
- "rtx": TensorRT-RTX as onnxruntime's plugin execution provider (`pip install 'specedge[rtx]'`) on the builder's
  NvTensorRtRtx graphs. It runs on RTX GPUs only (compute capability 8.6, 8.9, 12.x).
- "trt": native TensorRT (JetPack's on a Jetson, NVIDIA's wheel on a PC) through onnxruntime-gpu's TensorRT provider
  on plain-op torch.onnx graphs, with explicit optimization profiles (1 token .. the context) and an engine cache.
In both the KV buffers stay in host memory bound through IOBinding, so every step copies them: the CUDA provider is
the device-resident path.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import onnxruntime as ort

from .errors import InvalidArgument
from .manifest import ModelSpec

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "rtx": "NvTensorRTRTXExecutionProvider",
             "trt": "TensorrtExecutionProvider"}


def make_session(path: str, provider: str = "cpu", threads: int = 0, cuda_graph: bool = False,
                 spec: ModelSpec | None = None) -> ort.InferenceSession:
    """A session on exactly `provider`, or an InvalidArgument saying why not: onnxruntime silently falls back to the
    CPU when a GPU provider cannot start, and CPU numbers must never be reported as GPU numbers."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Errors only: onnxruntime warns on every load that an input with a default (the graphs' `logits_from`, see
    # kv.py) is an initializer it will not fold, which is the point of it; failures still raise.
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    if provider == "cpu":
        providers = ["CPUExecutionProvider"]
    elif provider == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise InvalidArgument(f"this onnxruntime ({ort.__version__}, {', '.join(ort.get_available_providers())}) "
                                  f"has no CUDA provider: replace it with the GPU build (pip uninstall -y onnxruntime "
                                  f"&& pip install onnxruntime-gpu), or run on the CPU with --provider cpu")
        providers = [("CUDAExecutionProvider", {"enable_cuda_graph": "1" if cuda_graph else "0"}),
                     "CPUExecutionProvider"]
    elif provider == "rtx":
        _add_rtx_provider(opts, path, cuda_graph)
        providers = None
    elif provider == "trt":  # needs the spec for its optimization profiles
        providers = [_trt_provider(spec, path), "CPUExecutionProvider"]
    else:
        raise InvalidArgument(f"provider {provider!r} must be one of {', '.join(PROVIDERS)}")
    session = ort.InferenceSession(path, opts, providers=providers)
    if session.get_providers()[0] != PROVIDERS[provider]:
        raise InvalidArgument(f"onnxruntime could not start {PROVIDERS[provider]} for {path} (it fell back to "
                              f"{session.get_providers()[0]}): check that the GPU is visible (nvidia-smi) and the "
                              f"driver matches the CUDA build, or run with --provider cpu")
    return session


def cache_root() -> Path:
    """specedge's per-user cache (compiled engines, the ModelOpt environment): $SPECEDGE_CACHE or ~/.cache/specedge."""
    return Path(os.environ.get("SPECEDGE_CACHE", Path.home() / ".cache" / "specedge"))


def engine_cache(graph: str) -> Path:
    """Where compiled engines for one graph live: per user, outside the (possibly read-only) bundle."""
    key = hashlib.sha256(str(Path(graph).resolve()).encode()).hexdigest()[:16]
    path = cache_root() / key
    path.mkdir(parents=True, exist_ok=True)
    return path


def _add_rtx_provider(opts: ort.SessionOptions, graph: str, cuda_graph: bool) -> None:
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


def _trt_provider(spec: ModelSpec, graph: str) -> tuple[str, dict]:
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
