"""Library chatter edgespec turns off (edgespec/base/quiet.py) stays off where users would see it."""
import logging

import torch

from edgespec.loading import lowbit


def test_an_int8_copy_fed_fp32_logs_nothing(caplog):
    """bitsandbytes logs a note on every call of an int8 layer fed fp32; a chat with the self-drafter's
    int8 copies printed it thousands of times."""
    torch.manual_seed(0)
    copy = lowbit.quantize(torch.nn.Linear(64, 32), "int8", torch.device("cpu"), torch.float32)
    with caplog.at_level(logging.DEBUG):
        for _ in range(3):
            out = copy(torch.randn(2, 64))
    assert out.shape == (2, 32) and torch.isfinite(out).all()
    assert [r.getMessage() for r in caplog.records if r.name.startswith("bitsandbytes")] == []
