"""Non-finite logits (a corrupt model file, an fp16 overflow) stop the answer with NonFiniteLogitsError,
from the target or the drafter, instead of answering token 0 over and over; the conversation goes on
exactly once the model is sound again; a GGUF whose tensor data is garbage makes `edgespec generate`
exit 2 with that error, no traceback."""
from __future__ import annotations

import pytest
import torch

from edgespec.base.errors import NonFiniteLogitsError
from tests.conftest import greedy_reference, tiny_engine


@pytest.mark.parametrize("which", ["target", "drafter"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_logits_stop_the_answer(which, bad):
    engine = tiny_engine(budget=4)
    first = engine.generate("hello world", max_new_tokens=6).ids
    model = engine.target if which == "target" else engine.drafter
    head = model.get_output_embeddings().weight
    saved = head.detach().clone()
    with torch.no_grad():
        head[5, 3] = bad
    with pytest.raises(NonFiniteLogitsError, match=f"the {which}'s logits are not finite.*corrupt.*float16"):
        engine.generate([*engine.encode("hello world"), *first, 7, 8], max_new_tokens=6)
    with torch.no_grad():
        head.copy_(saved)
    prompt = [*engine.encode("hello world"), *first, 9, 10]
    assert engine.generate(prompt, max_new_tokens=8).ids == greedy_reference(engine.target, prompt, 8)


def test_garbage_gguf_exits_with_the_error(tmp_path, monkeypatch, capsys):
    from gguf import GGUFReader

    from edgespec.front import cli
    from tests.test_gguf_stream import write_gguf

    monkeypatch.setenv("EDGESPEC_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "garbage.gguf"
    write_gguf(path, "llama")
    data = bytearray(path.read_bytes())
    for t in GGUFReader(str(path)).tensors:
        if t.name.startswith("blk.1."):  # one layer's blocks all 0xFF: NaN scales, NaN weights
            data[t.data_offset: t.data_offset + t.n_bytes] = b"\xff" * t.n_bytes
    path.write_bytes(bytes(data))
    rc = cli.main(["generate", "AB ab", "--raw", "--target", str(path), "--budget", "4", "--max-new-tokens", "8"])
    err = capsys.readouterr().err
    assert rc == 2 and "logits are not finite" in err and "corrupt" in err and "Traceback" not in err


def test_server_answers_non_finite_logits_as_its_own_fault():
    from edgespec.front.server.worker import api_error

    err = api_error(NonFiniteLogitsError("target", 3), "messages")
    assert err.status == 500 and err.code == "non_finite_logits" and "corrupt" in err.message
