"""The engine: prompt → drafter builds tree → scheduler picks budget → target verifies → accept →
caches pruned → tokens streamed.

`Engine` wires the pieces once and hands generations out: the draft runner (edgespec/core/draft_runner.py),
the scheduler, the stepper that runs one step at a time (edgespec/engine/step.py), the conversation the
steps advance (edgespec/engine/conversation.py), and the runs that turn steps into text (edgespec/engine/run.py).
What the front ends read from it is `FrontEnd` (edgespec/engine/face.py).
"""
from __future__ import annotations

import time
from collections.abc import Iterator, Mapping

from edgespec.base import checks
from edgespec.base.clock import Clock, WallClock
from edgespec.base.config import DraftConfig, LoadConfig, split_fields
from edgespec.base.device import model_device, side_stream
from edgespec.base.errors import EdgespecError, GrammarError
from edgespec.core import attention
from edgespec.core.draft_runner import DraftRunner
from edgespec.core.grammar import Constraint, Grammar, as_grammar, token_table
from edgespec.core.kv import new_cache
from edgespec.core.logprobs import MAX_TOP
from edgespec.core.pair import context_window, eos_ids, proposal_vocab
from edgespec.core.sampling import Sampler, SamplingConfig, model_defaults, resolve
from edgespec.core.scores import ScoreCalibration, ScoreCalibrations
from edgespec.engine.conversation import Conversation
from edgespec.engine.overlap import Overlap, wanted
from edgespec.engine.prompts import encode
from edgespec.engine.run import Generation, Run
from edgespec.core.verify import TreeVerifier
from edgespec.engine.step import Stepper
from edgespec.offload import find_handle
from edgespec.scheduler import Scheduler, make_scheduler


# what the start-up calibration drafts under: real text (trees as deep as an answer's), no benchmark's prompt
CALIBRATION_TEXT = ("A bicycle stays upright because the rider keeps steering its front wheel under the "
                    "falling frame, and the faster it rolls, the smaller the corrections need to be. Here is how:")


class Engine:
    """Lossless tree speculative decoding with an (optionally offloaded) target and a small drafter.

    `budget` is the tree size (draft tokens verified per target pass): an int, or "auto" to let the
    scheduler size each tree from measured costs and observed acceptance (`calibrate`: measure those
    costs at start-up, cached per machine and models). `draft` (or its fields as keywords: max_depth,
    branch, batch, overlap, overlap_factor, draft_temperature, tree_scores, forward) says how trees are
    drafted (edgespec/base/config.py); the output is the target's whatever the tree. `sampling`: the defaults
    a generation's sampling settings fall back to (None: the target's own generation_config, else chat
    defaults; edgespec/core/sampling.py). `draft_tokenizer`: the drafter's, when it has its own (the pair is
    refused unless it equals `tokenizer`). `offload`: the target's streaming handle (default: found
    from the target, if `offload_layers` streams it). `self_draft`: the self_drafter.SelfDraft whose model
    is `drafter`, when the target drafts for itself (its layout shows in the stats). `clock`: whose seconds
    the steps, the scheduler and the runs see (edgespec/base/clock.py: a ReplayClock charges a cost
    file's; default the wall clock).

    `engine.target` and `engine.drafter` are the two models as given; `engine.draft_runner` runs the
    drafter's forwards.
    """

    def __init__(self, target, drafter, tokenizer=None, *, budget="auto", scheduler: Scheduler | None = None,
                 max_context: int | None = None, calibrate: bool = False, progress: bool = True,
                 sampling: SamplingConfig | None = None, draft_tokenizer=None, offload=None,
                 draft: DraftConfig | None = None, self_draft=None, verifier: TreeVerifier | None = None,
                 clock: Clock | None = None, **draft_fields):
        (draft_fields,) = split_fields(draft_fields, DraftConfig)  # a misspelt option is named
        self.config = DraftConfig(**{**vars(draft or DraftConfig()), **draft_fields})
        self.vocab = proposal_vocab(target, drafter, tokenizer, draft_tokenizer)
        # a prompt's ids must index both models' embeddings
        self.prompt_vocab = min(m.get_input_embeddings().num_embeddings for m in (target, drafter))
        for model in {id(target): target, id(drafter): drafter}.values():
            attention.prepare(model)  # refuse what a tree mask can't express; SDPA or eager attention
        self.target, self.drafter, self.tokenizer = target.eval(), drafter, tokenizer
        self.draft_runner = DraftRunner(drafter, self.config.forward, self.vocab)
        self.sampling = sampling or model_defaults(target)
        self.offload = offload if offload is not None else find_handle(target)
        self.self_draft = self_draft  # self_drafter.SelfDraft when `drafter` is the target's own (its layout, plan)
        self.verifier = verifier  # what verifies the trees when not `target` itself (a split target), else None
        self.device = model_device(target)
        self.clock: Clock = clock or WallClock()
        self.max_context = max_context or context_window(target, drafter)
        self.eos_ids = eos_ids(target, tokenizer)
        self.calibrations = ScoreCalibrations(self.config.tree_scores == "calibrated")
        self.conversation = Conversation(verifier.cache if verifier else new_cache(target),
                                         self.draft_runner.new_cache())
        self._constraints: dict[Grammar, Constraint] = {}  # compiled grammars, the latest few
        start = time.perf_counter()  # the warm-up, paid here, before the first answer and not charged to it
        if budget != 0:
            self.draft_runner.prepare(self.conversation.dcache)  # capture the drafter's graphs now, not mid-step
        self.scheduler: Scheduler = scheduler or self._scheduler(budget, calibrate, progress)
        self.warmup_seconds = time.perf_counter() - start  # graph capture and the scheduler's calibration
        stream = side_stream(self.draft_runner.device)
        overlap = wanted(self.offload) if self.config.overlap == "auto" else bool(self.config.overlap)
        self.stepper = Stepper(verifier or self.target, self.draft_runner, self.device, self.offload,
                               Overlap(self.config.overlap_factor, stream) if overlap else None, stream, self.clock)

    def _scheduler(self, budget, calibrate: bool, progress: bool) -> Scheduler:
        c = self.config
        costs = {}
        if calibrate and budget == "auto":
            from edgespec.scheduler.calibrate import startup_costs

            prefix = self.encode(CALIBRATION_TEXT) if self.tokenizer is not None else None
            costs = startup_costs(self.target, self.draft_runner, self.offload, c, progress, self.clock, prefix)
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
    def overlap(self) -> bool:
        """Whether drafting goes on during the target pass."""
        return self.stepper.overlap is not None

    @property
    def state(self) -> Conversation:
        return self.conversation

    def drafter_forward(self) -> str:
        """How the drafter's forwards run: "transformers", "lean", "lean+static" or "lean+cuda-graphs"."""
        return self.draft_runner.describe(self.conversation.dcache)

    # ---- generations -------------------------------------------------------------------------
    def generate(self, prompt, max_new_tokens: int = 256, **options) -> Generation:
        """Generate a completion; returns text, new token ids and per-step stats. `options`: those of
        `run` (stop, seed, sampling and the sampling settings by name, grammar, logprobs)."""
        run = self.run(prompt, max_new_tokens, **options)
        for _ in run:
            pass
        return run.result

    def stream(self, prompt, max_new_tokens: int = 256, **options) -> Iterator[str]:
        """Yield text pieces as the target accepts them (`options`: those of `run`)."""
        yield from self.run(prompt, max_new_tokens, **options)

    def run(self, prompt, max_new_tokens: int = 256, *, stop: str | list[str] | None = None, seed: int | None = None,
            sampling: SamplingConfig | Mapping | None = None, grammar=None, logprobs: int | None = None,
            **settings) -> Run:
        """A generation in progress: iterate it for text pieces; `.result` holds the Generation.

        How the target samples is one value: `sampling`, a SamplingConfig or a mapping of its fields
        (temperature, top_p, top_k, min_p, repetition_penalty), and/or those fields by name as keywords;
        a setting left out or None takes the engine's default (`engine.sampling`); temperature 0 is
        greedy. `max_new_tokens`: an integer >= 1 (None: 256). `seed`: the same seed gives the same answer.
        `stop`: a string (the whole string) or a list of strings that end it. Bad arguments are refused
        with an InvalidArgumentError naming them (edgespec/base/checks.py). `grammar`: a constraint the
        answer follows (a core.grammar.Grammar, a JSON schema dict or a pydantic model class); `logprobs`:
        0-20, each new token's log-probability with that many top alternatives (`Generation.logprobs`)."""
        max_new_tokens, stop = checks.max_new_tokens(max_new_tokens, default=256), checks.stop_strings(stop)
        config = self.sampling_for(sampling, **settings)
        sampler = Sampler.of(config, checks.seed(seed), draft_temperature=self.config.draft_temperature)
        if logprobs is not None:
            logprobs = checks.integer("logprobs", logprobs, 0, MAX_TOP, " (the top alternatives each token comes with)")
        run = Run(self.stepper, self.scheduler, self.conversation, self.encode(prompt), max_new_tokens, sampler,
                  tokenizer=self.tokenizer, eos_ids=self.eos_ids, max_context=self.max_context, stop=stop,
                  calibration=self.score_calibration(sampler), constraint=self.constraint(grammar),
                  logprobs=logprobs, clock=self.clock)
        run.stats.sampling = config.describe()
        return run

    def sampling_for(self, sampling: SamplingConfig | Mapping | None = None, **settings) -> SamplingConfig:
        """The sampling settings a generation given these uses (edgespec/core/sampling.py `resolve`): a
        SamplingConfig as is (with `settings` in place), else the engine's defaults with the mapping's and
        `settings`' values in place."""
        if isinstance(sampling, SamplingConfig):
            return resolve(sampling, settings)
        if settings:
            sampling = {**sampling, **settings} if isinstance(sampling, Mapping) else sampling or settings
        return resolve(self.sampling, sampling)

    def constraint(self, grammar) -> Constraint | None:
        """`grammar` (see generate) compiled for this engine's tokenizer and vocabulary (None: none); a
        grammar that cannot be compiled is a GrammarError naming the problem."""
        grammar = as_grammar(grammar)
        if grammar is None:
            return None
        if grammar not in self._constraints:
            if self.tokenizer is None:
                raise GrammarError("a grammar constraint needs the engine's tokenizer: pass tokenizer= to Engine")
            vocab = self.target.get_output_embeddings().weight.shape[0]
            table = token_table(self.tokenizer, vocab, self.eos_ids)
            if len(self._constraints) >= 16:
                self._constraints.pop(next(iter(self._constraints)))
            self._constraints[grammar] = Constraint(grammar, table, vocab)
        return self._constraints[grammar]

    def score_calibration(self, sampler: Sampler) -> ScoreCalibration | None:
        """The hit-rate calibration of tree scores for this sampling setting (None: raw draft scores)."""
        return self.calibrations.for_sampler(sampler)

    def encode(self, prompt) -> list[int]:
        """str → token ids (no template); list of {role, content} → chat template; ids (in the vocabulary)
        pass through; anything else is an InvalidPromptError naming the problem."""
        return encode(self.tokenizer, prompt, self.max_context, self.prompt_vocab)

    def reset(self) -> None:
        """Forget the cached conversation (the caches' buffers, and the graphs replayed over them, stay)."""
        self.conversation.keep(0)


__all__ = ["Engine", "Generation", "Run", "EdgespecError"]
