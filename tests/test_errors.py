"""Bad input gets an edgespec error that names the problem and the fix (no deep torch traceback)."""
import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from torch import nn
from transformers import PreTrainedTokenizerFast

from edgespec import Engine
from edgespec.base.errors import (
    ContextLengthError, InvalidArgumentError, ModelNotFoundError, TokenizerMismatchError, UnsupportedModelError,
)
from edgespec.loading.models import load_model
from edgespec.core.pair import check_tokenizers
from edgespec.scheduler import make_scheduler
from tests.conftest import Fixed, greedy_reference, tiny_pair
from edgespec.base.stats import Plan


def word_tokenizer(words):
    vocab = {w: i for i, w in enumerate(["[UNK]", *words])}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def test_tokenizer_mismatch():
    check_tokenizers(word_tokenizer(["a", "b"]), word_tokenizer(["a", "b"]))  # same vocabulary: fine
    with pytest.raises(TokenizerMismatchError, match="tokenizers differ.*same tokenizer"):
        check_tokenizers(word_tokenizer(["a", "b", "c"]), word_tokenizer(["a", "x"]))


def test_missing_folder_and_gguf(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not found.*Check the path"):
        load_model(str(tmp_path / "nope.gguf"))
    with pytest.raises(ModelNotFoundError, match="not found"):
        load_model(str(tmp_path / "missing" / "model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json.*model folder or a .gguf"):
        load_model(str(tmp_path / "empty"))


def test_corrupt_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGESPEC_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"this is not a gguf file" * 100)
    with pytest.raises(ModelNotFoundError, match="Could not read GGUF.*Re-download"):
        load_model(str(bad), progress=False)


def test_unsupported_architecture():
    from edgespec.offload import offload_layers

    with pytest.raises(UnsupportedModelError):
        offload_layers(nn.Sequential(nn.Linear(4, 4)), "cpu", progress=False)


def test_prompt_longer_than_context():
    target, drafter = tiny_pair("llama")
    engine = Engine(target, drafter, budget=4, max_context=32)
    with pytest.raises(ContextLengthError, match="40 tokens.*context window is 32.*shorten"):
        engine.generate(list(range(1, 41)), max_new_tokens=4)


def test_generation_stops_at_the_context_window():
    target, drafter = tiny_pair("llama", init=0.1)
    engine = Engine(target, drafter, scheduler=Fixed(Plan(16, 8, 4, 16)), max_context=30)
    ids = [1, 2, 3, 4, 5]
    out = engine.generate(ids, max_new_tokens=100)
    assert out.stats.stop_reason == "context"
    assert len(ids) + len(out.ids) == 30
    assert out.ids == greedy_reference(target, ids, 100)[: len(out.ids)]
    assert engine.state.tcache.get_seq_length() < 30


@pytest.mark.parametrize("budget", [-1, "fast", 2.5, None])
def test_invalid_budgets(budget):
    with pytest.raises(InvalidArgumentError, match="budget"):
        make_scheduler(budget)


@pytest.mark.parametrize("kw,word", [({"temperature": -0.5}, "temperature"), ({"top_p": 0.0}, "top_p"),
                                     ({"top_p": 2.0}, "top_p"), ({"max_new_tokens": 0}, "max_new_tokens")])
def test_invalid_generation_arguments(kw, word):
    target, drafter = tiny_pair("llama")
    engine = Engine(target, drafter, budget=4)
    with pytest.raises(InvalidArgumentError, match=word):
        engine.generate([1, 2, 3], **{"max_new_tokens": 4, **kw})


def test_empty_prompt():
    target, drafter = tiny_pair("llama")
    engine = Engine(target, drafter, budget=4, tokenizer=word_tokenizer(["a"]))
    for empty in ("", [], torch.tensor([], dtype=torch.long)):
        with pytest.raises(InvalidArgumentError, match="prompt is empty"):
            engine.generate(empty, max_new_tokens=4)


def test_gguf_conversion_out_of_disk_space(tmp_path, monkeypatch):
    import errno

    import edgespec.loading.convert as convert
    from edgespec.base.errors import EdgespecError

    monkeypatch.setenv("EDGESPEC_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"x" * 1000)

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(convert, "convert_gguf", full)
    with pytest.raises(EdgespecError, match="Not enough disk space in .*cache.*EDGESPEC_CACHE at a bigger disk"):
        load_model(str(gguf), progress=False)
    assert not list((tmp_path / "cache").glob("*.tmp"))


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_invalid_draft_temperature(bad):
    from edgespec.core.sampling import Sampler

    with pytest.raises(InvalidArgumentError, match="draft_temperature must be > 0"):
        Sampler(draft_temperature=bad)


def test_hub_ids_fail_fast_offline(monkeypatch, tmp_path, capsys):
    """HF_HUB_OFFLINE set, or the hub unreachable in one attempt: the cached snapshot if there is one,
    else one ModelNotFoundError at once (no HTTP request, no retry lines)."""
    import socket

    from edgespec.loading import resolve as res

    def no_connect(*a, **k):
        raise AssertionError("no network attempt when HF_HUB_OFFLINE is set")

    res._unreachable.cache_clear()
    monkeypatch.setattr(socket, "create_connection", no_connect)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="'nobody/no-model' is not in the Hugging Face cache.*HF_HUB_OFFLINE"):
        load_model("nobody/no-model")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(res, "_offline", lambda: False)

    def refused(*a, **k):
        refused.calls += 1
        raise OSError(101, "Network is unreachable")

    refused.calls = 0
    monkeypatch.setattr(socket, "create_connection", refused)
    with pytest.raises(ModelNotFoundError, match="cannot be used \\(huggingface.co: Network is unreachable\\)"):
        load_model("nobody/no-model")
    snapshot = tmp_path / "snapshot"
    monkeypatch.setattr(res, "_cached", lambda repo: str(snapshot) if repo == "some/model" else None)
    assert res.resolve("some/model") == (str(snapshot), None)  # the cached copy, offline
    assert refused.calls == 1 and "Retrying" not in capsys.readouterr().err  # one attempt per process
    res._unreachable.cache_clear()


def test_built_in_prompts_do_not_name_the_development_layout(monkeypatch, tmp_path, capsys):
    from edgespec.engine import prompts

    monkeypatch.setattr(prompts, "default_questions", lambda: tmp_path / "shared" / "data" / "missing.jsonl")
    texts, source = prompts.load_prompts(3)
    assert len(texts) == 3 and source == "built-in prompts"
    err = capsys.readouterr().err
    assert "built-in prompts" in err and "shared" not in err and "jsonl" not in err
