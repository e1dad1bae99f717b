"""The engine: prompt → drafter builds tree → scheduler picks budget → target verifies → accept →
caches pruned → tokens streamed.

`Engine` wires the pieces once and hands generations out: the drafter (edgespec/core/drafter.py), the
scheduler, the stepper that runs one step at a time (edgespec/engine/step.py), the conversation the steps
advance (edgespec/engine/conversation.py), and the runs that turn steps into text (edgespec/engine/run.py).
"""
from __future__ import annotations

from collections.abc import Iterator

from edgespec.core import attention
from edgespec.core.kv import new_cache
from edgespec.base.config import DraftConfig, LoadConfig, split_fields
from edgespec.engine.conversation import Conversation
from edgespec.base.device import model_device, side_stream
from edgespec.core.drafter import Drafter
from edgespec.base.errors import EdgespecError
from edgespec.offload import find_handle
from edgespec.engine.overlap import Overlap, wanted
from edgespec.core.pair import context_window, eos_ids, proposal_vocab
from edgespec.engine.prompts import encode
from edgespec.engine.run import Generation, Run
from edgespec.core.sampling import Sampler, SamplingConfig, model_defaults, resolve
from edgespec.scheduler import Scheduler, make_scheduler
from edgespec.core.scores import ScoreCalibration, ScoreCalibrations
from edgespec.core.verify import TreeVerifier
from edgespec.engine.step import Stepper


class Engine:
    """Lossless tree speculative decoding with an (optionally offloaded) target and a small drafter.

    `budget` is the tree size (draft tokens verified per target pass): an int, or "auto" to let the
    scheduler size each tree from measured costs and observed acceptance (`calibrate`: measure those
    costs at start-up, cached per machine and models). `draft` (or its fields as keywords: max_depth,
    branch, batch, overlap, overlap_factor, draft_temperature, tree_scores, forward) says how trees are
    drafted (edgespec/base/config.py); the output is the target's whatever the tree. `sampling`: the defaults
    a generation's sampling arguments fall back to (None: the target's own generation_config, else chat
    defaults; edgespec/core/sampling.py). `draft_tokenizer`: the drafter's, when it has its own (the pair is
    refused unless it equals `tokenizer`). `offload`: the target's streaming handle (default: found
    from the target, if `offload_layers` streams it). `self_draft`: the selfdraft.SelfDraft whose model is
    `drafter`, when the target drafts for itself (its layout shows in the stats).
    """

    def __init__(self, target, drafter, tokenizer=None, *, budget="auto", scheduler: Scheduler | None = None,
                 max_context: int | None = None, calibrate: bool = False, progress: bool = True,
                 sampling: SamplingConfig | None = None, draft_tokenizer=None, offload=None,
                 draft: DraftConfig | None = None, self_draft=None, verifier: TreeVerifier | None = None,
                 **draft_fields):
        (draft_fields,) = split_fields(draft_fields, DraftConfig)  # a misspelt option is named
        self.config = DraftConfig(**{**vars(draft or DraftConfig()), **draft_fields})
        self.vocab = proposal_vocab(target, drafter, tokenizer, draft_tokenizer)
        for model in {id(target): target, id(drafter): drafter}.values():
            attention.prepare(model)  # refuse what a tree mask can't express; SDPA or eager attention
        self.target, self.tokenizer = target.eval(), tokenizer
        self.draft = Drafter(drafter, self.config.forward, self.vocab)
        self.sampling = sampling or model_defaults(target)
        self.offload = offload if offload is not None else find_handle(target)
        self.self_draft = self_draft  # selfdraft.SelfDraft when `drafter` is the target's own (its layout, plan)
        self.device = model_device(target)
        self.max_context = max_context or context_window(target, drafter)
        self.eos_ids = eos_ids(target, tokenizer)
        self.calibrations = ScoreCalibrations(self.config.tree_scores == "calibrated")
        self.conversation = Conversation(verifier.cache if verifier else new_cache(target), self.draft.new_cache())
        if budget != 0:
            self.draft.prepare(self.conversation.dcache)  # capture the drafter's graphs now, not mid-step
        stream = side_stream(self.draft.device)
        overlap = wanted(self.offload) if self.config.overlap == "auto" else bool(self.config.overlap)
        self.stepper = Stepper(verifier or self.target, self.draft, None, self.device, self.offload,
                               Overlap(self.config.overlap_factor, stream) if overlap else None, stream)
        self.scheduler = scheduler or self._scheduler(budget, calibrate, progress)

    def _scheduler(self, budget, calibrate: bool, progress: bool) -> Scheduler:
        c = self.config
        costs = {}
        if calibrate and budget == "auto":
            from edgespec.scheduler.calibrate import startup_costs

            costs = startup_costs(self.target, self.draft, self.offload, c, progress)
        return make_scheduler(budget, max_depth=c.max_depth, branch=c.branch, batch=c.batch, **costs)

    @classmethod
    def from_pretrained(cls, target: str | None = None, drafter: str | None = None, **options) -> "Engine":
        """Load a pair and build an engine. target/drafter: hub id, local folder, .gguf file; target None =
        the embedded default (SmolLM2-135M-Instruct); drafter "self" = the target drafts for itself (its
        resident layers shared, its streamed layers as low-bit copies, edgespec/loading/self_drafter.py); drafter
        None = the same for an offloaded target whose memory plan fits, else the target's own copy
        quantized with `draft_quant` (nf4). `options`: the fields of config.LoadConfig (device, draft_quant,
        offload, resident_layers, link_delay, stream_quant, target_shape, progress) and of this class's
        constructor (budget, calibrate — default True here —, sampling, the DraftConfig fields, ...).

        The target's decoder layers are streamed from host RAM (`offload=True`); `resident_layers` of them
        stay on the device (None = as many as fit). A GGUF target streams its layers as the file's blocks,
        decoded on the device after each copy (edgespec/loading/loader.py). `link_delay` (seconds per streamed
        layer) emulates a slow host-device link on CPU-only machines. `stream_quant` ("int8" or "nf4")
        keeps the streamed layers encoded in host RAM and decodes them on the device after each copy: 2x /
        3.6x fewer bytes per pass than bf16, for a quantized target (the output is exactly the quantized
        target's; int8 ≈ 0.6 % weight error, nf4 ≈ 10 %). `target_shape` (benchmarks: a name from
        offload.shapes.SHAPES, e.g. "llama-8b") zero-pads a Llama target into that bigger shape, so it
        streams and computes like the big model while predicting exactly as the loaded one."""
        from edgespec.loading.loader import load_pair

        load_kw = {k: options.pop(k) for k in list(options) if k in LoadConfig.__dataclass_fields__}
        loaded = load_pair(LoadConfig(target, drafter, **load_kw))
        options.setdefault("calibrate", True)
        options.setdefault("progress", load_kw.get("progress", True))
        return cls(loaded.target, loaded.drafter, loaded.tokenizer, offload=loaded.offload,
                   self_draft=loaded.self_draft, **options)

    # ---- the pieces, for stats and tests ------------------------------------------------------
    @property
    def drafter(self):
        """The drafting model (the Drafter object that runs it is `engine.draft`)."""
        return self.draft.model

    @property
    def scheduler(self) -> Scheduler:
        return self.stepper.scheduler

    @scheduler.setter
    def scheduler(self, value: Scheduler) -> None:
        self.stepper.scheduler = value

    @property
    def overlap(self) -> bool:
        """Whether drafting goes on during the target pass."""
        return self.stepper.overlap is not None

    @property
    def state(self) -> Conversation:
        return self.conversation

    # ---- generations -------------------------------------------------------------------------
    def generate(self, prompt, max_new_tokens: int = 256, temperature: float | None = None,
                 top_p: float | None = None, seed: int | None = None, stop: list[str] | None = None, *,
                 top_k: int | None = None, min_p: float | None = None,
                 repetition_penalty: float | None = None) -> Generation:
        """Generate a completion; returns text, new token ids and per-step stats. A sampling argument
        left None takes the engine's default (`engine.sampling`); temperature 0 is greedy."""
        run = self.run(prompt, max_new_tokens, temperature, top_p, seed, stop, top_k=top_k, min_p=min_p,
                       repetition_penalty=repetition_penalty)
        for _ in run:
            pass
        return run.result

    def stream(self, prompt, max_new_tokens: int = 256, temperature: float | None = None,
               top_p: float | None = None, seed: int | None = None, stop: list[str] | None = None, *,
               top_k: int | None = None, min_p: float | None = None,
               repetition_penalty: float | None = None) -> Iterator[str]:
        """Yield text pieces as the target accepts them."""
        yield from self.run(prompt, max_new_tokens, temperature, top_p, seed, stop, top_k=top_k, min_p=min_p,
                            repetition_penalty=repetition_penalty)

    def run(self, prompt, max_new_tokens=256, temperature=None, top_p=None, seed=None, stop=None, *,
            top_k=None, min_p=None, repetition_penalty=None) -> Run:
        """A generation in progress: iterate it for text pieces; `.result` holds the Generation."""
        config = self.sampling_for(temperature, top_p, top_k, min_p, repetition_penalty)
        sampler = Sampler.of(config, seed, draft_temperature=self.config.draft_temperature)
        run = Run(self.stepper, self.conversation, self.encode(prompt), max_new_tokens, sampler,
                  tokenizer=self.tokenizer, eos_ids=self.eos_ids, max_context=self.max_context, stop=stop,
                  calibration=self.score_calibration(sampler))
        run.stats.sampling = config.describe()
        return run

    def sampling_for(self, temperature=None, top_p=None, top_k=None, min_p=None,
                     repetition_penalty=None) -> SamplingConfig:
        """The sampling settings a generation with these arguments uses (None: the engine's default)."""
        return resolve(self.sampling, temperature, top_p, top_k, min_p, repetition_penalty)

    def score_calibration(self, sampler: Sampler) -> ScoreCalibration | None:
        """The hit-rate calibration of tree scores for this sampling setting (None: raw draft scores)."""
        return self.calibrations.for_sampler(sampler)

    def encode(self, prompt) -> list[int]:
        """str → token ids (no template); list of {role, content} → chat template; ids pass through."""
        return encode(self.tokenizer, prompt, self.max_context)

    def reset(self) -> None:
        """Forget the cached conversation (the caches' buffers, and the graphs replayed over them, stay)."""
        self.conversation.keep(0)


__all__ = ["Engine", "Generation", "Run", "EdgespecError"]
