"""Every codec's tables follow the tensor they touch, and a weight is encoded where it lives (issue 25:
`--stream-quant nf4` crashed at the 70B shape because NF4Blocks kept its bucketize boundaries on the
host while the padded layers were built on the GPU).

How this is tested without a second device: the codec is made while the default device is `meta`
(`with torch.device("meta")`), as one made inside `with torch.device("cuda")` would be, and then used on
CPU tensors. The old NF4Blocks built its levels, boundaries and byte table in its constructor, so
they landed on `meta` and neither its encode nor its decode of a CPU weight could work; now every
table is made on first use on the device of the tensor at hand (and `meta` tensors get meta tables).
The self-drafter's int8 copy is checked with a weight already on the copy's device (`meta` here):
bitsandbytes' Int8Params quantize only a weight leaving the host, so it stayed unquantized before."""
from __future__ import annotations

import torch
from torch import nn

from edgespec.loading import lowbit
from edgespec.offload import gguf_blocks
from edgespec.offload.codecs import GGUFRaw, Int8Rows, NF4Blocks
from tests.test_gguf_blocks import random_blocks, reference, shape_of


def roundtrip(codec, w: torch.Tensor, dtype=torch.float32):
    region = torch.zeros(codec.nbytes(w.shape), dtype=torch.uint8)  # zeros: alignment gaps compare equal
    codec.encode_into(w, region)
    out = torch.empty(w.shape, dtype=dtype)
    codec.decode_into(region, out)
    return region, out


def test_a_codec_made_on_another_device_encodes_and_decodes_cpu_weights():
    w = torch.randn(37, 192, generator=torch.Generator().manual_seed(0)) * 0.05
    for make in (NF4Blocks, Int8Rows):
        with torch.device("meta"):
            elsewhere = make()
            elsewhere.prepare(torch.device("meta"))  # tables staged for "the device" (meta)
        region, out = roundtrip(elsewhere, w)
        want_region, want = roundtrip(make(), w)
        assert torch.equal(region, want_region) and torch.equal(out, want), make.name


def test_nf4_tables_are_made_on_each_tensors_device():
    codec = NF4Blocks()
    codec.prepare(torch.device("meta"))
    w = torch.randn(3, 128)
    roundtrip(codec, w)
    devices = {(name, dev.type) for name, dev in codec._tables}
    assert {("mids", "cpu"), ("pairs", "cpu"), ("levels", "meta"), ("pairs", "meta")} <= devices
    region = torch.empty(codec.nbytes(w.shape), dtype=torch.uint8, device="meta")
    codec.encode_into(w.to("meta"), region)  # a weight on another device than the host tables: encoded there
    assert ("mids", "meta") in {(name, dev.type) for name, dev in codec._tables}


def test_gguf_tables_are_made_on_the_outputs_device():
    raw = random_blocks("IQ4_NL", 5)
    with torch.device("meta"):
        gguf_blocks.prepare(torch.device("meta"))
    out = torch.empty(shape_of("IQ4_NL", 5))
    GGUFRaw("IQ4_NL").decode_into(torch.from_numpy(raw.copy()).reshape(-1), out)
    assert torch.equal(out, reference(raw, "IQ4_NL"))
    assert gguf_blocks.table("IQ4_NL", torch.device("meta")).is_meta


def test_an_int8_copy_is_quantized_where_its_weight_already_is():
    """The self-drafter decodes a streamed layer on the GPU, then makes its copies there."""
    with torch.device("meta"):
        linear = nn.Linear(64, 48, bias=False)
    copy = lowbit.quantize(linear, "int8", torch.device("meta"), torch.bfloat16)
    assert copy.weight.dtype == torch.int8 and copy.weight.SCB is not None and copy.weight.SCB.shape == (48,)
    host = lowbit.quantize(nn.Linear(64, 48, bias=False), "int8", torch.device("cpu"), torch.float32)
    assert host.weight.dtype == torch.int8 and host.weight.SCB.shape == (48,)
