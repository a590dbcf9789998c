"""The lean runtime: onnxruntime + numpy + tokenizers only (never torch or transformers)."""
from .engine import Engine, GenerationConfig, Result, Stats
from .errors import BundleError, IncompatibleModels, InvalidArgument, SpecError

__all__ = ["Engine", "GenerationConfig", "Result", "Stats", "SpecError", "BundleError", "IncompatibleModels",
           "InvalidArgument"]
