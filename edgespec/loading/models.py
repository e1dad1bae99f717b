"""Loading whole models: the drafter (bitsandbytes-quantized where asked, its copy saved once:
edgespec/loading/bnb_copy.py), a target that is not offloaded, and tokenizers.

A spec is resolved to local files first (edgespec/loading/resolve.py); a GGUF is read from its de-quantized
copy (edgespec/loading/convert.py, made once, one layer at a time, in the dtype the model runs in), its
tokenizer converted alone. An offloaded target is loaded layer by layer instead: edgespec/loading/loader.py.
"""
from __future__ import annotations

import torch

from edgespec.loading.convert import dequantized_copy, tokenizer_copy
from edgespec.base.device import run_dtype
from edgespec.base.errors import EdgespecError, ModelNotFoundError
from edgespec.base.quiet import quiet_bitsandbytes, quiet_transformers
from edgespec.base.files import cache_dir
from edgespec.loading.resolve import EMBEDDED, embedded_gguf, resolve

__all__ = ["load_model", "load_tokenizer", "pick_device", "local_folder", "resolve",
           "embedded_gguf", "cache_dir", "quiet_transformers", "EMBEDDED"]


def local_folder(spec: str | None, progress: bool = True, dtype: torch.dtype = torch.float32) -> str:
    """A folder or hub id transformers can load directly (GGUFs are converted once, to `dtype`)."""
    folder, gguf = resolve(spec)
    return str(dequantized_copy(folder, gguf, progress, dtype)) if gguf else folder


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" → the first CUDA device when there is one, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EdgespecError(f"--device {device} asked for, but PyTorch sees no CUDA GPU: use --device cpu (or auto).")
    return dev


def load_model(spec: str | None = None, *, quantize: str | None = None, dtype: torch.dtype | None = None,
               device: str | torch.device = "cpu", progress: bool = True):
    """Load a causal LM. quantize: None, "nf4" or "int8" (bitsandbytes; for drafters)."""
    from transformers import BitsAndBytesConfig

    device = torch.device(device)
    kwargs: dict = {"dtype": dtype or run_dtype(device)}
    folder = local_folder(spec, progress, kwargs["dtype"])
    if quantize:
        compute = run_dtype(device)
        configs = {
            "nf4": lambda: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute),
            "int8": lambda: BitsAndBytesConfig(load_in_8bit=True),
        }
        if quantize not in configs:
            raise EdgespecError(f"Unknown drafter quantization {quantize!r}: use nf4, int8 or none.")
        kwargs.update(quantization_config=configs[quantize](), device_map={"": str(device)})
        quiet_bitsandbytes()
        return _load_quantized(spec, folder, quantize, device, kwargs)
    model = _from_pretrained(spec, folder, kwargs)
    return model.to(device).eval()


def _load_quantized(spec, folder: str, quantize: str, device: torch.device, kwargs: dict):
    """A bitsandbytes drafter: its saved quantized copy if there is one, else quantized now (and saved)."""
    from edgespec.loading import bnb_copy as quantized

    path = quantized.copy_path(folder, quantize, device, kwargs["dtype"])
    model = quantized.load(path, folder, device, kwargs["dtype"])
    if model is None:
        model = _from_pretrained(spec, folder, kwargs)
        quantized.save(model, path or quantized.copy_path(folder, quantize, device, kwargs["dtype"]))
    return model.eval()


def _from_pretrained(spec, folder: str, kwargs: dict):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except OSError as err:
        raise ModelNotFoundError(
            f"Could not load model {spec!r}: {err}. Give a local folder, a .gguf file, or a hub id "
            "(hub ids need network access, or a model already in the Hugging Face cache)."
        ) from err


def load_tokenizer(spec: str | None = None, progress: bool = True):
    from transformers import AutoTokenizer

    folder, gguf = resolve(spec)
    folder = str(tokenizer_copy(folder, gguf)) if gguf else folder
    try:
        return AutoTokenizer.from_pretrained(folder)
    except OSError as err:
        raise ModelNotFoundError(f"Could not load the tokenizer of {spec!r}: {err}") from err
