"""The de-quantized copy of a GGUF: a cached safetensors folder, written one decoder layer at a time.

Kept for what still needs a transformers folder: the drafter (bitsandbytes quantizes from it) and a
target that is not offloaded (an offloaded GGUF target streams the file's blocks as they are:
edgespec/loading/loader.py). transformers reads a GGUF by de-quantizing every tensor into memory at once
(fp32: 4 bytes per weight, 280 GB for a 70B); here the GGUF tensor source (edgespec/loading/tensors.py)
de-quantizes each tensor exactly as transformers does, and each decoder layer is written to its own
shard before the next is read, so host RAM holds one layer at a time. The folder (config, generation
config, tokenizer, sharded weights with an index) is in the dtype the model runs in (fp32 on a CPU,
bf16 on a GPU) under ~/.cache/edgespec (or $EDGESPEC_CACHE), keyed by the file's path, size and
mtime. Architectures whose processors rename or merge tensors (MoE, GPT-2, ...) raise `Unsupported`
and are converted whole through transformers instead. A GGUF's tokenizer is converted alone.
"""
from __future__ import annotations

import errno
import hashlib
import json
import shutil
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from edgespec.base.errors import EdgespecError, ModelNotFoundError
from edgespec.base.files import cache_dir, write_folder
from edgespec.loading.skeleton import gguf_model, layer_groups, meta_model
from edgespec.loading.tensors import GGUFTensors, Unsupported, gguf_table

__all__ = ["dequantized_copy", "gguf_index", "tokenizer_copy", "convert_gguf", "convert_whole", "Unsupported"]


def gguf_cache(src: Path, suffix: str = "") -> Path:
    """Where the converted copy of the GGUF `src` lives (keyed by path, size and mtime)."""
    key = hashlib.sha1(gguf_stamp(src).encode()).hexdigest()[:12]
    return cache_dir() / f"{src.stem}-{key}{suffix}"


def gguf_stamp(src: Path) -> str:
    """The GGUF file `src` as one string for cache keys: resolved path, size, mtime."""
    stat = src.stat()
    return f"{src.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def dequantized_copy(folder: str, gguf: str, progress: bool, dtype: torch.dtype = torch.float32) -> Path:
    """De-quantize a GGUF once into a safetensors folder of `dtype` (cached); returns that folder.

    `dtype` is the one the model runs in here (fp32 on a CPU, bf16 on a GPU): a bf16 copy halves the
    disk and the reading and loads as the same model as the fp32 copy cast on load."""
    src = Path(folder) / gguf
    out = gguf_cache(src, "" if dtype == torch.float32 else f"-{str(dtype).removeprefix('torch.')}")
    if (out / "config.json").is_file() and (out / "tokenizer_config.json").is_file():
        return out
    if progress:
        print(f"edgespec: de-quantizing {src.name} once (cached in {out})", file=sys.stderr, flush=True)
    return _convert_into(out, src, lambda tmp: _convert(folder, gguf, tmp, dtype, progress))


def tokenizer_copy(folder: str, gguf: str) -> Path:
    """The GGUF's tokenizer alone, converted once (no weights: a big target's tokenizer must not
    cost a de-quantized copy of the model)."""
    from transformers import AutoTokenizer

    src = Path(folder) / gguf
    out = gguf_cache(src, "-tokenizer")
    if (out / "tokenizer_config.json").is_file():
        return out
    save = lambda tmp: AutoTokenizer.from_pretrained(folder, gguf_file=gguf).save_pretrained(tmp)  # noqa: E731
    return _convert_into(out, src, save)


def gguf_index(folder: str, gguf: str) -> Path:
    """The GGUF's metadata parsed once (cached, some KB): `config.json` as transformers parses it from
    the file, and `tensors.json`, the file's tensor table with transformers' names (edgespec/loading/tensors.py):
    gguf-py and transformers take seconds to tens of seconds for these, and a raw-streamed target reads
    the file itself at every load."""
    from transformers import AutoConfig

    src = Path(folder) / gguf
    out = gguf_cache(src, "-index")
    if (out / "tensors.json").is_file():
        return out

    def write(tmp: Path) -> None:
        config = AutoConfig.from_pretrained(folder, gguf_file=gguf)
        try:
            skeleton = meta_model(config, torch.float32)
        except Unsupported:
            skeleton = None  # recorded in the table: read whole
        tmp.mkdir(parents=True)
        config.save_pretrained(tmp)
        (tmp / "tensors.json").write_text(json.dumps(gguf_table(str(src), skeleton)))

    return _convert_into(out, src, write)


def _convert(folder: str, gguf: str, out: Path, dtype: torch.dtype, progress: bool) -> None:
    try:
        convert_gguf(folder, gguf, out, progress, dtype)
    except Unsupported as why:
        shutil.rmtree(out, ignore_errors=True)
        if progress:
            print(f"edgespec: converting {gguf} whole ({why})", file=sys.stderr, flush=True)
        convert_whole(folder, gguf, out, dtype)


def _convert_into(out: Path, src: Path, write) -> Path:
    """Run `write(tmp)` and move tmp to `out`; a failure names the GGUF and leaves no partial folder."""
    try:
        return write_folder(out, write)
    except EdgespecError:  # already says what to do (a nested copy's failure)
        raise
    except Exception as err:  # a corrupt or unsupported GGUF surfaces here
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            raise EdgespecError(f"Not enough disk space in {out.parent} for the de-quantized copy of {src.name} "
                                f"(several times the file's {src.stat().st_size / 1e9:.1f} GB): free some space, "
                                "or point EDGESPEC_CACHE at a bigger disk.") from None
        raise ModelNotFoundError(f"Could not read GGUF {src}: {err}. Re-download the file or use another "
                                 "model.") from err


def convert_whole(folder: str, gguf: str, out: Path, dtype: torch.dtype = torch.float32) -> None:
    """transformers' own GGUF load (every tensor de-quantized in memory at once), saved as safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model.hf_quantizer = None  # a GGUF-loaded model refuses save_pretrained otherwise
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)


def convert_gguf(folder: str, gguf: str, out: Path, progress: bool = True, dtype: torch.dtype = torch.float32) -> None:
    """Write the de-quantized model of `folder/gguf`, in `dtype`, into the new folder `out`."""
    from transformers import AutoTokenizer, GenerationConfig

    config, skeleton, source = gguf_model(Path(folder) / gguf, gguf_index(folder, gguf), dtype)
    groups = _shards(skeleton, source)
    out.mkdir(parents=True)
    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(folder, gguf_file=gguf).save_pretrained(out)
    _write(source, groups, out, progress, dtype)


def _shards(skeleton, source: GGUFTensors) -> list[list[str]]:
    """Tensor names per shard: everything outside the decoder layers, then one shard per layer."""
    names = list(skeleton.state_dict(keep_vars=True))
    tied = bool(getattr(skeleton.config, "tie_word_embeddings", False))
    missing = [k for k in names if k not in source and not (tied and k == "lm_head.weight")]
    if missing:
        raise Unsupported(f"the GGUF has no tensor for {missing[0]}")
    _, outside, per_layer = layer_groups(skeleton, source)
    return [outside, *per_layer]


def _write(source: GGUFTensors, groups: list[list[str]], out: Path, progress: bool, dtype: torch.dtype) -> None:
    from safetensors.torch import save_file

    weight_map, total = {}, 0
    bar = tqdm(groups, desc="edgespec: de-quantizing the GGUF", unit="shard", disable=not progress)
    for i, names in enumerate(bar):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = source.read(dict.fromkeys(names, dtype))
        save_file(tensors, out / file, metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(names, file))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
