"""Low-bit copies of a model's linear layers, for the self-drafter (edgespec/loading/self_drafter.py): made once from
the layer's weights, kept on the device, and saved to / loaded from edgespec's cache as safetensors (no
pickle). Each codec is a well-kept library's own layer module, so its kernels run the matmul:

| codec | library | device bytes per weight | relative weight error (Gaussian weights) |
|---|---|---|---|
| nf4  | bitsandbytes Linear4bit, 4-bit normal float, block 64, fp32 absmax | 0.56 | 9.1 % |
| fp4  | bitsandbytes Linear4bit, 4-bit float, block 64, fp32 absmax | 0.56 | 12 % |
| int8 | bitsandbytes Linear8bitLt (LLM.int8 rows, outlier split at 6.0), as `Int8Copy` | 1.0 | 0.8 % |
| hqq4 / hqq3 / hqq2 | HQQ (`pip install hqq`): half-quadratic, group 64, scale and zero per group | 0.56 / 0.44 / 0.31 (fp32 meta; bf16 halves it) | 6.2 / 13 / 31 % |

nf4 is the same code as the drafter copy transformers makes for `--draft-quant nf4` (no double
quantization), so a self-drafter with no resident layer drafts as that copy does. HQQ quantizes on the
device it is given: seconds per layer on a GPU, ~1 min per 1.5B-model layer on a 2-core CPU (the saved
copy makes that a one-time cost). benchmarks/self_drafter_cpu.md measures what each codec buys.

int8 copies are bitsandbytes' Linear8bitLt with LLM.int8's outlier threshold (6.0, transformers'
default for `load_in_8bit`): on a GPU its int8 matmul quantizes the activations too, keeping their
outlier columns in fp16. Without the split, or on a CPU, that route loses much of what the copy accepts
(3.9 % output error against its de-quantized weight on activations with outlier features, SmolLM2's int8
self-drafter at K=64: 10.3 tokens per pass instead of 15.2) and is 10-20x slower on a CPU than a plain
matmul. So on a CPU `Int8Copy` takes bitsandbytes' own CPU route for training instead (MatMul8bitFp's
way): the weight de-quantized from its codes, then one matmul in the input's dtype — exactly the
de-quantized weight.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from edgespec.base.errors import EdgespecError, InvalidArgumentError
from edgespec.base.quiet import quiet_bitsandbytes

CODECS = ("nf4", "fp4", "int8", "hqq4", "hqq3", "hqq2")
HQQ_BITS = {"hqq4": 4, "hqq3": 3, "hqq2": 2}
GROUP = 64  # weights per scale (bitsandbytes block, HQQ group)
VERSION = 1  # of the saved layout below; a change re-quantizes


def check(codec: str) -> None:
    if codec not in CODECS:
        raise InvalidArgumentError(f"unknown draft-copy codec {codec!r}: use one of {', '.join(CODECS)}")


def applies(linear: nn.Module, codec: str) -> bool:
    """Whether `codec` encodes this layer: a linear layer whose rows are whole groups (blocks never straddle
    rows; bitsandbytes' CPU kernels need it too). Others stay dense in the copy (tiny test models)."""
    return isinstance(linear, nn.Linear) and linear.in_features % GROUP == 0


def copy_bytes(shape: tuple[int, int], codec: str) -> int:
    """Device bytes of one (out, in) weight's copy (bias excluded)."""
    n = shape[0] * shape[1]
    if codec in ("nf4", "fp4"):
        return n // 2 + -(-n // GROUP) * 4
    if codec == "int8":
        return n + shape[0] * 4
    bits = HQQ_BITS[codec]
    packed = n * bits // 8 if bits != 3 else -(-n // (10 * GROUP)) * GROUP * 4  # 3-bit: 10 codes per int32
    return packed + 2 * (n // GROUP) * 4


def library_version(codec: str) -> str:
    """The library (and its version) a codec's bytes come from, for cache keys."""
    from importlib.metadata import PackageNotFoundError, version

    name = "hqq" if codec in HQQ_BITS else "bitsandbytes"
    try:
        return f"{name}{version(name)}"
    except PackageNotFoundError:
        return name


COPY_CLASSES = {"Linear4bit", "Int8Copy", "HQQLinear"}
INT8_THRESHOLD = 6.0  # LLM.int8's outlier split (see the module's docstring)


def is_copy(module: nn.Module) -> bool:
    """Whether `module` is one of these codecs' layer modules."""
    return type(module).__name__ in COPY_CLASSES


def nbytes(module: nn.Module) -> int:
    """Device bytes of a copy (its codes, scales and bias)."""
    state = module.state_dict()  # every codec's: its codes, scales, bias (and a few scalar tensors)
    return sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))


# ---- quantizing -----------------------------------------------------------------------------------
@torch.no_grad()
def quantize(linear: nn.Linear, codec: str, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """`linear`'s low-bit copy on `device`, computing in `dtype`, quantized there (the weight may be on
    the host or already on `device`)."""
    check(codec)
    w = linear.weight.detach()
    bias = None if linear.bias is None else linear.bias.detach().to(device, dtype)
    if codec in HQQ_BITS:
        return _hqq_quantize(w, bias, HQQ_BITS[codec], device, dtype)
    if codec == "int8":
        return _int8(w, bias, device)
    return _bnb4(w, bias, codec, device, dtype)


def _bnb4(w: torch.Tensor, bias, codec: str, device, dtype) -> nn.Module:
    bnb = _bnb()

    out, inp = w.shape
    module = bnb.nn.Linear4bit(inp, out, bias=bias is not None, compute_dtype=dtype, compress_statistics=False,
                               quant_type=codec, device="meta")
    module.weight = bnb.nn.Params4bit(w.to(dtype).contiguous(), requires_grad=False, quant_type=codec,
                                      blocksize=GROUP, compress_statistics=False, module=module)
    module.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
    return module.to(device)  # bitsandbytes quantizes when the weight moves to the device


def _int8(w: torch.Tensor, bias, device) -> nn.Module:
    """bitsandbytes' row-wise int8 codes and scales, computed on `device` wherever `w` lives (its
    Int8Params quantize only a weight that moves off the host: a weight already on the GPU, as the
    self-drafter decodes it, would stay unquantized there)."""
    bnb = _bnb()

    out, inp = w.shape
    module = int8_class()(inp, out, bias=bias is not None, has_fp16_weights=False, threshold=INT8_THRESHOLD,
                          device="meta")
    codes, scb, _ = bnb.functional.int8_vectorwise_quant(w.to(device=device, dtype=torch.float16).contiguous())
    module.weight = bnb.nn.Int8Params(codes, requires_grad=False, has_fp16_weights=False)
    module.weight.CB, module.weight.SCB = codes, scb
    module.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
    return module


@functools.cache
def int8_class() -> type:
    """`Int8Copy`: bitsandbytes' Linear8bitLt, de-quantize-then-matmul on a CPU (module docstring).
    Made on first use, so that importing edgespec does not import bitsandbytes."""
    bnb = _bnb()

    class Int8Copy(bnb.nn.Linear8bitLt):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.device.type != "cpu":
                return super().forward(x)
            weight = int8_weight(self, x.dtype)
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return nn.functional.linear(x, weight, bias)

    return Int8Copy


def _hqq_quantize(w: torch.Tensor, bias, bits: int, device, dtype) -> nn.Module:
    hqq = _hqq()
    config = hqq.BaseQuantizeConfig(nbits=bits, group_size=GROUP, axis=1)
    module = hqq.HQQLinear(None, config, compute_dtype=dtype, device=str(device), initialize=False)
    module.quantize(w.to(device), **module.quant_config)
    module.bias = bias
    return _hqq_ready(module, dtype)


def _hqq_ready(module, dtype: torch.dtype):
    """Scale and zero in the compute dtype (HQQ keeps them as its optimiser left them), eval, frozen."""
    for key in ("scale", "zero"):
        module.meta[key] = module.meta[key].to(dtype)
    module.eval()
    return module


def int8_weight(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """An int8 copy's weight de-quantized in `dtype`: its codes times their row's absmax / 127."""
    scb = module.weight.SCB if module.weight.SCB is not None else module.state.SCB
    return module.weight.data.to(dtype) * (scb.to(dtype)[:, None] / 127)


def _bnb():
    """bitsandbytes, imported with its chatter filtered first (quiet.py)."""
    quiet_bitsandbytes()
    import bitsandbytes

    return bitsandbytes


def _hqq():
    """HQQ's quantizer, or an EdgespecError with the install command."""
    try:
        import hqq.core.quantize as hqq_quantize
    except ImportError:
        raise EdgespecError("the hqq2/hqq3/hqq4 draft copies need HQQ: pip install hqq (or 'edgespec[hqq]'), "
                            "or use --draft-quant nf4") from None
    return hqq_quantize


# ---- saving and loading -----------------------------------------------------------------------------
def tensors(module: nn.Module, codec: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) that `restore` rebuilds `module` from, all safetensors-storable."""
    if codec in HQQ_BITS:
        state = {k: v for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}
        return state, {"shape": list(module.meta["shape"])}
    state = {k: v.detach() for k, v in module.state_dict().items()}
    return state, {"shape": [module.out_features, module.in_features]}


def restore(state: dict[str, torch.Tensor], meta: dict, codec: str, device: torch.device,
            dtype: torch.dtype) -> nn.Module:
    """The module `tensors` described, on `device`."""
    out, inp = meta["shape"]
    if codec in HQQ_BITS:
        hqq = _hqq()
        module = hqq.HQQLinear(None, None, compute_dtype=dtype, device=str(device), initialize=False)
        module.load_state_dict(dict(state))
        return _hqq_ready(module, dtype)
    bnb = _bnb()

    bias = state.get("bias")
    if codec == "int8":
        module = int8_class()(inp, out, bias=bias is not None, has_fp16_weights=False, threshold=INT8_THRESHOLD,
                              device="meta")
        module.weight = bnb.nn.Int8Params(state["weight"].to(device), requires_grad=False, has_fp16_weights=False)
        module.weight.CB, module.weight.SCB = module.weight.data, state["SCB"].to(device)
    else:
        module = bnb.nn.Linear4bit(inp, out, bias=bias is not None, compute_dtype=dtype, compress_statistics=False,
                                   quant_type=codec, device="meta")
        stats = {k[len("weight."):]: v for k, v in state.items() if k.startswith("weight.")}
        module.weight = bnb.nn.Params4bit.from_prequantized(state["weight"], stats, device=device, module=module)
    module.bias = None if bias is None else nn.Parameter(bias.to(device, dtype), requires_grad=False)
    return module


def dequantized(module: nn.Module, codec: str) -> torch.Tensor:
    """The copy's weight as the matmul sees it (tests, error measurements)."""
    if codec in HQQ_BITS:
        return module.dequantize()
    if codec == "int8":
        return int8_weight(module, torch.float32)
    return _bnb().functional.dequantize_4bit(module.weight.data, module.weight.quant_state)

