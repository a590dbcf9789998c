"""GGUF -> an ordinary float32 Hugging Face folder, through transformers' GGUF loader (needs `gguf` and `accelerate`:
the `gemma` extra). Used by `spec-export demo --model ...` and benchmarks/gemma3_270m.py."""
from __future__ import annotations

import shutil
from pathlib import Path

from ..runtime.errors import ExportError
from .osutil import replace_dir

# Bump when the conversion below changes what it writes: cached folders made by an older one are then stale.
CONVERT_VERSION = 1


def gguf_to_hf(gguf: Path, out: Path) -> Path:
    """Dequantize GGUF into a float32 HF folder at `out` (model.safetensors, config, tokenizer). Written beside `out`
    and renamed into place at the end, so `out` is either the old folder or a complete new one."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf, out = Path(gguf), Path(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The GGUF-loaded model is marked quantized (save_pretrained refuses it) although its weights are already
        # dequantized to float32: copy them into a plain model built from the same config and save that.
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(model.state_dict())
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(f"converting {gguf} to a Hugging Face folder failed ({type(e).__name__}: {e}); delete "
                          f"{gguf} to assemble it again") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out)
    return out
