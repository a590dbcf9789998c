"""The lean runtime: onnxruntime + numpy + tokenizers only (never torch or transformers)."""
from .config import GenerationConfig, Result
from .engine import Engine
from .errors import BundleError, EngineBusy, IncompatibleModels, InvalidArgument, SpecError
from .generator import Generator
from .stats import Stats

__all__ = ["Engine", "Generator", "GenerationConfig", "Result", "Stats", "SpecError", "BundleError", "EngineBusy",
           "IncompatibleModels", "InvalidArgument"]
