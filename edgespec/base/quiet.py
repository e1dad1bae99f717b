"""Library chatter off where edgespec reports progress itself (transformers' load warnings and bars,
bitsandbytes' note about an optional hub kernel and its per-call note on int8 inputs)."""
from __future__ import annotations

import logging
from contextlib import contextmanager


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


def quiet_bitsandbytes() -> None:
    """Before bitsandbytes is imported: on CPUs with AVX512-BF16 it warns at import that an optional
    kernel from the hub (`kernels` package) is missing, and its built-in kernel runs instead; an int8
    layer fed fp32 or bf16 (the self-drafter's int8 copies) logs on every call that its inputs are cast
    to fp16 for quantization, which is how its kernel works. Both only confuse (thousands of lines in a
    chat). (`addFilter` ignores a filter it already holds, so calling this again adds nothing.)"""
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_drop_hub_kernel_warning)
    logging.getLogger("bitsandbytes.autograd._functions").addFilter(_drop_int8_cast_note)


def _drop_hub_kernel_warning(record: logging.LogRecord) -> bool:
    return "kernels-community" not in record.getMessage()


def _drop_int8_cast_note(record: logging.LogRecord) -> bool:
    return "to float16 during quantization" not in record.getMessage()
