"""FP8 drafts for TensorRT: NVIDIA ModelOpt's ONNX post-training quantization, run in its own environment.

ModelOpt pins onnx/transformers versions that conflict with the exporter's, so it lives in a separate virtual
environment (created on first use, about 1 GB with the CPU build of torch) and runs as a subprocess. It quantizes
plain-op graphs (the torch.onnx export) without TensorRT; graphs with onnxruntime contrib ops (the builder's
GroupQueryAttention) need TensorRT itself inside that environment, which this workplace cannot install.
Calibration runs on the CPU provider over real code prompts. The result is FP8 (E4M3) Quantize/DequantizeLinear
pairs around the matmuls: TensorRT fuses them into FP8 GEMMs on Ada/Hopper/Blackwell; onnxruntime's CPU provider
emulates them, which is how the exporter validates the graph here.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from ..runtime.errors import ExportError
from ..runtime.providers import cache_root
from .osutil import die_with_parent, save_graph

MODELOPT = "nvidia-modelopt[onnx]==0.47.0"
TORCH = "torch==2.13.0"   # installed first: ModelOpt depends on torch, and an unpinned one pulls a CUDA build


class ModelOptUnavailable(ExportError):
    """The ModelOpt environment cannot be created here (no writable folder, no package index): a property of the
    machine, not of the model. Tests skip on it; a failure of the quantization itself is a plain ExportError."""


def env_dir() -> Path:
    return Path(os.environ.get("SPECEDGE_MODELOPT_ENV", cache_root() / "modelopt-venv"))


def ensure_env() -> Path:
    """The ModelOpt environment's python, created on first use (minutes; logged beside it)."""
    env = env_dir()
    python, log = env / "bin" / "python", env.with_name(env.name + ".log")
    if (env / ".ready").exists():
        return python
    why = (f"could not create the ModelOpt environment for FP8 at {env}: it needs a writable folder and PyPI access "
           f"once, or set SPECEDGE_MODELOPT_ENV to a venv with {MODELOPT}")
    shutil.rmtree(env, ignore_errors=True)
    try:
        env.parent.mkdir(parents=True, exist_ok=True)
        f = open(log, "w")
    except OSError as e:
        raise ModelOptUnavailable(f"{why} ({e})") from e
    with f:
        for cmd in ([sys.executable, "-m", "venv", str(env)],
                    [str(python), "-m", "pip", "install", "-q", TORCH],
                    [str(python), "-m", "pip", "install", "-q", MODELOPT]):
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode:
                shutil.rmtree(env, ignore_errors=True)
                tail = "".join(open(log).readlines()[-3:]).strip()
                raise ModelOptUnavailable(f"{why} (see {log}; it ends: {tail})")
    (env / ".ready").touch()
    return python


def quantize_fp8(path: Path, calibration: dict[str, np.ndarray], log: Path) -> None:
    """Replace the fp32 graph at `path` by its FP8 Q/DQ version calibrated on `calibration` (input name -> array)."""
    python = ensure_env()
    work = path.parent / ".fp8"
    work.mkdir()
    np.savez(work / "calibration.npz", **calibration)
    cmd = [str(python), "-m", "modelopt.onnx.quantization", "--onnx_path", str(path), "--quantize_mode", "fp8",
           "--calibration_method", "max", "--calibration_data_path", str(work / "calibration.npz"),
           "--calibration_eps", "cpu", "--output_path", str(work / "model.onnx"), "--use_external_data_format"]
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=work, preexec_fn=die_with_parent)
    if r.returncode or not (work / "model.onnx").exists():
        tail = "".join(open(log).readlines()[-10:])
        raise ExportError(f"ModelOpt FP8 quantization of {path.parent.name} failed (exit {r.returncode}); last lines "
                          f"of {log.name}:\n{tail}")
    import onnx

    model = onnx.load(str(work / "model.onnx"))
    save_graph(model, path)
    shutil.rmtree(work)
