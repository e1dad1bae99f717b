"""The drafter's bitsandbytes copy is saved once and loaded from edgespec's cache afterwards
(edgespec/loading/bnb_copy.py): the same model as quantizing afresh, re-made when its source changes."""
from __future__ import annotations

import pytest
import torch

import edgespec.loading.models as models
from edgespec.loading.models import load_model
from tests.conftest import tiny_model

IDS = torch.randint(0, 96, (1, 10), generator=torch.Generator().manual_seed(5))


@pytest.fixture
def source(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGESPEC_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "drafter"
    tiny_model("llama", 0, vocab=96, layers=2, hidden=64).save_pretrained(folder)
    return folder


def quantizations(monkeypatch) -> list:
    """Records each load that quantizes (rather than reading a saved copy)."""
    calls, real = [], models._from_pretrained
    monkeypatch.setattr(models, "_from_pretrained", lambda *a: calls.append(a) or real(*a))
    return calls


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_second_load_reads_the_saved_copy(source, monkeypatch, tmp_path, quantize):
    calls = quantizations(monkeypatch)
    first = load_model(str(source), quantize=quantize, progress=False)
    second = load_model(str(source), quantize=quantize, progress=False)
    assert len(calls) == 1, "the second load must not quantize again"
    assert len(list((tmp_path / "cache" / "quantized").iterdir())) == 1
    assert torch.equal(logits(first), logits(second))
    assert second.config.name_or_path == str(source)  # named after its source (calibration keys)
    assert type(second.model.layers[0].mlp.up_proj) is type(first.model.layers[0].mlp.up_proj)


def test_a_changed_source_is_quantized_again(source, monkeypatch):
    calls = quantizations(monkeypatch)
    old = load_model(str(source), quantize="nf4", progress=False)
    tiny_model("llama", 7, vocab=96, layers=2, hidden=64).save_pretrained(source)  # new weights, same place
    fresh = load_model(str(source), quantize="nf4", progress=False)
    assert len(calls) == 2 and not torch.equal(logits(old), logits(fresh)), "a stale copy was used"
    again = load_model(str(source), quantize="nf4", progress=False)
    assert len(calls) == 2 and torch.equal(logits(fresh), logits(again))


def test_a_broken_copy_is_replaced(source, monkeypatch, tmp_path):
    calls = quantizations(monkeypatch)
    first = load_model(str(source), quantize="nf4", progress=False)
    (copy,) = (tmp_path / "cache" / "quantized").iterdir()
    (copy / "model.safetensors").write_bytes(b"broken")
    again = load_model(str(source), quantize="nf4", progress=False)
    assert len(calls) == 2 and torch.equal(logits(first), logits(again))
    assert (copy / "model.safetensors").stat().st_size > 100  # saved anew
