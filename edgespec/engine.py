"""The engine: prompt → drafter builds tree → scheduler picks budget → target verifies → accept →
caches pruned → tokens streamed.

Both models keep a KV cache of the committed tokens except the most recent ones still pending
(at least the last token, the next tree's root). Each step feeds the pending tokens ("stem") and
the tree in one forward per model, so the target's prompt prefill rides along with the first
verification pass, and consecutive prompts (chat turns) reuse the cached common prefix.
"""
from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from edgespec import attention, lean
from edgespec.cache import crop, new_cache, prune_to_path
from edgespec.draft import TreeSearch
from edgespec.errors import (
    BackoffWarning,
    ContextLengthError,
    EdgespecError,
    InvalidArgumentError,
    OutOfMemoryError,
    TokenizerMismatchError,
)
from edgespec.forward import model_device
from edgespec.sampling import Sampler, SamplingConfig, model_defaults, resolve
from edgespec.scores import ScoreCalibration
from edgespec.stats import Plan, RunStats, StepStats
from edgespec.tree import Tree
from edgespec.verify import Verdict, verify

OOM_ERRORS = (torch.cuda.OutOfMemoryError,)


@dataclass
class Generation:
    text: str
    ids: list[int]  # new tokens (an end-of-sequence token included, as transformers' generate does)
    stats: RunStats = field(default_factory=RunStats)


class _State:
    """Committed tokens and both models' caches; caches never hold more than len(ids) - 1 entries."""

    def __init__(self, target, drafter):
        self.ids: list[int] = []
        self.tcache = new_cache(target)
        self.dcache = new_cache(drafter)
        self.search: TreeSearch | None = None  # drafted subtree under the last token, reusable next step

    def sync(self, ids: list[int]) -> None:
        """Make `ids` the committed sequence, keeping the cached common prefix."""
        common = 0
        for a, b in zip(self.ids, ids):
            if a != b:
                break
            common += 1
        self.ids = list(ids)
        self.trim(min(common, len(ids) - 1))

    def trim(self, length: int) -> None:
        self.search = None
        for cache in (self.tcache, self.dcache):
            if cache.get_seq_length() > length:
                crop(cache, length)

    def lengths(self) -> tuple[int, int]:
        return self.tcache.get_seq_length(), self.dcache.get_seq_length()


class Engine:
    """Lossless tree speculative decoding with an (optionally offloaded) target and a small drafter.

    `budget` is the tree size (draft tokens verified per target pass): an int, or "auto" to let the
    scheduler size each tree from measured costs and observed acceptance. `tree_scores` ranks draft
    nodes by hit rates learnt from the trees the target verified ("calibrated", edgespec/scores.py) or
    by the drafter's raw probabilities ("draft"); the output is the target's either way. `sampling`:
    the defaults a generation's sampling arguments fall back to (None: the target's own
    generation_config, else chat defaults; edgespec/sampling.py). `draft_tokenizer`: the drafter's,
    when it has its own (the pair is refused unless it equals `tokenizer`).
    """

    def __init__(self, target, drafter, tokenizer=None, *, budget="auto", max_depth: int = 32,
                 branch: int = 16, batch: int = 64, scheduler=None, max_context: int | None = None,
                 overlap: bool | str = "auto", overlap_factor: int = 4, calibrate: bool = False,
                 progress: bool = True, draft_temperature: float = 1.0, tree_scores: str = "calibrated",
                 sampling: SamplingConfig | None = None, draft_tokenizer=None):
        self.vocab = _proposal_vocab(target, drafter, tokenizer, draft_tokenizer)
        self.target, self.drafter, self.tokenizer = target.eval(), drafter.eval(), tokenizer
        self.sampling = sampling or model_defaults(target)
        for model in {id(target): target, id(drafter): drafter}.values():
            attention.prepare(model)  # refuse what a tree mask can't express; SDPA or eager attention
        if drafter is not target:
            lean.enable(drafter)  # the drafter's forwards on a lighter path (the target's stay transformers')
        self.max_depth, self.branch, self.batch, self.progress = max_depth, branch, batch, progress
        self.draft_temperature = draft_temperature  # greedy tree scoring (Sampler.draft_temperature)
        if tree_scores not in ("calibrated", "draft"):
            raise InvalidArgumentError(f"tree_scores must be 'calibrated' or 'draft', got {tree_scores!r}")
        self.tree_scores = tree_scores
        self._calibrations: dict[tuple, ScoreCalibration] = {}  # per sampling setting, kept across runs
        self.offload = getattr(target, "_edgespec_offload", None)
        self.device = model_device(target)
        if scheduler is None:
            from edgespec.scheduler import make_scheduler

            calib = self._calibration() if calibrate and budget == "auto" else {}
            scheduler = make_scheduler(budget, max_depth=max_depth, branch=branch, batch=batch, **calib)
        self.scheduler = scheduler
        self.max_context = max_context or _context_window(target, drafter)
        self.eos_ids = _eos_ids(target, tokenizer)
        self.state = _State(target, drafter)
        if budget != 0:
            lean.prepare(drafter, self.state.dcache)  # capture the drafter's graphs now, not mid-step
        self.overlap = _overlap_wanted(self.offload) if overlap == "auto" else bool(overlap)
        self.overlap_factor = overlap_factor
        self._pass_estimate, self._round_estimate = float("inf"), 0.0  # seconds, learnt while overlapping
        self._draft_stream = _side_stream(drafter)

    @classmethod
    def from_pretrained(cls, target: str | None = None, drafter: str | None = None, *, device: str = "auto",
                        draft_quant: str | None = "nf4", offload: bool = True, resident_layers: int | None = None,
                        link_delay: float = 0.0, budget="auto", progress: bool = True, target_shape: str | None = None,
                        stream_quant: str | None = None, **engine_kw) -> "Engine":
        """Load a pair and build an engine. target/drafter: hub id, local folder, .gguf file, or None for
        the embedded default (SmolLM2-135M-Instruct; its nf4 copy drafts for it).

        The target's decoder layers are streamed from host RAM (`offload=True`); `resident_layers`
        of them stay on the device (None = as many as fit). A GGUF target streams its layers as the file's
        blocks, decoded on the device after each copy (edgespec/loader.py). `link_delay` (seconds per streamed layer)
        emulates a slow host-device link on CPU-only machines. `stream_quant` ("int8" or "nf4") keeps the
        streamed layers encoded in host RAM and decodes them on the device after each copy: 2x / 3.6x
        fewer bytes per pass than bf16 (less host RAM once packed), for a quantized target (the output is exactly
        the quantized target's; int8 ≈ 0.6 % weight error, nf4 ≈ 10 %). `target_shape` (benchmarks: a name from
        offload.shapes.SHAPES, e.g. "llama-8b") zero-pads a Llama target into that bigger shape, so it
        streams and computes like the big model while predicting exactly as the loaded one."""
        from edgespec.loader import load_pair

        loaded = load_pair(target, drafter, device=device, draft_quant=draft_quant, offload=offload,
                           resident_layers=resident_layers, link_delay=link_delay, progress=progress,
                           target_shape=target_shape, stream_quant=stream_quant)
        engine_kw.setdefault("calibrate", True)
        return cls(loaded.target, loaded.drafter, loaded.tokenizer, budget=budget, progress=progress, **engine_kw)

    def _calibration(self) -> dict:
        """A short profiling run (target pass vs tree size, drafting vs budget), cached per machine,
        models and link; shows a progress bar while it measures."""
        from edgespec.measure import time_drafts, time_passes
        from edgespec.scheduler import machine_key

        off = self.offload
        extra = "plain" if off is None else (
            f"offload:resident={off.resident_layers}:delay={off.transport.link_delay}:q={off.quantize}")
        pair = f"{_model_name(self.target)}+draft:{_model_name(self.drafter)}:{lean.describe(self.drafter)}"
        if self.draft_temperature != 1.0:  # other tree shapes, other drafting costs
            pair += f":dt{self.draft_temperature:g}"
        key = machine_key(pair, f"{extra}:{next(self.target.parameters()).dtype}")
        from edgespec.scheduler.cost import CALIBRATION_SIZES, DRAFT_CALIBRATION_SIZES

        runs = len(CALIBRATION_SIZES) + len(DRAFT_CALIBRATION_SIZES)
        bar = _LazyBar("edgespec: calibrating the scheduler (once per machine and models)", self.progress, runs)
        prefix = torch.randint(0, self.drafter.config.vocab_size, (64,), generator=torch.Generator().manual_seed(0))
        sched_plan = lambda k: Plan(k, self.max_depth, self.branch, self.batch)  # noqa: E731
        return {"cache_key": key,
                "measure_fn": bar.wrap(lambda n: time_passes(self.target, self.device, [n], past=64)[0]["pass_s"]),
                "draft_fn": bar.wrap(lambda k: time_drafts(self.drafter, prefix.tolist(), [k], sched_plan,
                                                           draft_temperature=self.draft_temperature)[0]["draft_s"])}

    # ---- public API -------------------------------------------------------------------------
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
            top_k=None, min_p=None, repetition_penalty=None) -> "Run":
        """A generation in progress: iterate it for text pieces; `.result` holds the Generation."""
        config = self.sampling_for(temperature, top_p, top_k, min_p, repetition_penalty)
        sampler = Sampler.of(config, seed, draft_temperature=self.draft_temperature)
        sampler.calibration = self.score_calibration(sampler)
        run = Run(self, self.encode(prompt), max_new_tokens, sampler, stop or [])
        run.stats.sampling = config.describe()
        return run

    def sampling_for(self, temperature=None, top_p=None, top_k=None, min_p=None,
                     repetition_penalty=None) -> SamplingConfig:
        """The sampling settings a generation with these arguments uses (None: the engine's default)."""
        return resolve(self.sampling, temperature, top_p, top_k, min_p, repetition_penalty)

    def score_calibration(self, sampler: Sampler) -> ScoreCalibration | None:
        """The hit-rate calibration of tree scores for this sampling setting (None: raw draft scores)."""
        if self.tree_scores != "calibrated":
            return None
        return self._calibrations.setdefault(sampler.key_of_setting(), ScoreCalibration())

    def reset(self) -> None:
        """Forget the cached conversation (the caches' buffers, and the graphs replayed over them, stay)."""
        self.state.ids = []
        self.state.trim(0)

    def encode(self, prompt) -> list[int]:
        """str → token ids (no template); list of {role, content} → chat template; ids pass through."""
        if isinstance(prompt, torch.Tensor):
            ids = prompt.reshape(-1).tolist()
        elif isinstance(prompt, str):
            ids = self._tok().encode(prompt) if prompt else []
        elif prompt and isinstance(prompt[0], dict):
            ids = self._tok().apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
            ids = ids["input_ids"] if not isinstance(ids, list) else ids
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise InvalidArgumentError("The prompt is empty: give at least one token of text.")
        if len(ids) >= self.max_context:
            raise ContextLengthError(
                f"The prompt has {len(ids)} tokens but the context window is {self.max_context}: "
                "shorten the prompt (or, in chat, /reset the conversation)."
            )
        return ids

    def _tok(self):
        if self.tokenizer is None:
            raise InvalidArgumentError("This engine has no tokenizer: pass token ids, or give Engine a tokenizer.")
        return self.tokenizer

    # ---- one step ---------------------------------------------------------------------------
    def step(self, plan: Plan, sampler: Sampler) -> tuple[list[int], StepStats]:
        """Draft, verify, accept, prune; backs off to a smaller tree on device out-of-memory."""
        retries = 0
        while True:
            before = self.state.lengths()
            try:
                tokens, stats = self._step(plan, sampler)
                stats.retries = retries
                return tokens, stats
            except OOM_ERRORS as err:
                self._rollback(before)
                if plan.budget == 0:
                    raise OutOfMemoryError(
                        "Out of device memory even for a single-token step: free GPU memory, keep fewer "
                        "layers resident, or use a smaller drafter."
                    ) from err
                retries += 1
                plan = self._back_off(plan)

    def _back_off(self, plan: Plan) -> Plan:
        """After an out-of-memory: halve the tree (and cap the scheduler there), stream an eighth of
        the target's resident layers, free the allocator's cache, and say so."""
        smaller = Plan(plan.budget // 2, plan.max_depth, plan.branch, max(1, plan.batch // 2))
        self.scheduler.set_max_budget(smaller.budget)
        moved = self.offload.demote(max(1, self.offload.resident_layers // 8)) if self.offload else 0
        _empty_device_cache()
        layers = f", {moved} fewer resident target layers" if moved else ""
        warnings.warn(f"edgespec: out of device memory; retrying the step with a tree of {smaller.budget}{layers}",
                      BackoffWarning, stacklevel=4)
        return smaller

    def _rollback(self, before: tuple[int, int]) -> None:
        st = self.state
        st.search = None
        crop(st.tcache, before[0])
        crop(st.dcache, min(before[1], len(st.ids) - 1))

    @torch.no_grad()
    def _step(self, plan: Plan, sampler: Sampler) -> tuple[list[int], StepStats]:
        st = self.state
        if plan.budget > 0:
            lean.prepare(self.drafter, st.dcache)  # (re)captures the drafter's graphs, if any are missing
        t0 = time.perf_counter()
        with _on_stream(self._draft_stream):
            search, reused = self._search(plan, sampler)
            if search is not None:
                search.grow(plan)
                tree = search.tree(plan.budget)
            else:
                tree = Tree.root_only(st.ids[-1])
        _wait_stream(self._draft_stream)
        t1 = time.perf_counter()
        tlen = st.tcache.get_seq_length()
        tstem = torch.tensor(st.ids[tlen:])
        if self.overlap and search is not None:
            verdict, overlap_time = self._verify_while_drafting(search, plan, tstem, tree, sampler)
        else:
            verdict, overlap_time = self._verify(tstem, tree, sampler), 0.0
        t2 = time.perf_counter()
        if sampler.calibration is not None:
            sampler.calibration.observe_tree(tree, verdict.path)
        troot = tlen + tstem.numel()  # entries up to and including the root
        prune_to_path(st.tcache, troot, [troot - 1 + j for j in verdict.path])
        with _on_stream(self._draft_stream):
            st.search = search.advance(verdict.path, verdict.tokens[-1]) if search is not None else None
        st.ids.extend(verdict.tokens)
        stats = StepStats(plan.budget, tree.size, tree.depth, len(verdict.tokens), t1 - t0, t2 - t1,
                          tstem.numel() + tree.size, tree.node_probs(), reused=reused, overlap_time=overlap_time)
        return verdict.tokens, stats

    def _search(self, plan: Plan, sampler: Sampler) -> tuple[TreeSearch | None, int]:
        """The search to grow this step's tree from: last step's re-rooted one, or a fresh one."""
        st = self.state
        if plan.budget <= 0:
            st.trim(len(st.ids) - 1)  # a plain step: drop any drafted subtree
            return None, 0
        if st.search is not None:
            st.search.sampler = sampler
            st.search.rescore()
            return st.search, int(st.search.alive.sum()) - 1
        dstem = torch.tensor(st.ids[st.dcache.get_seq_length():])
        return TreeSearch.start(self.drafter, st.dcache, dstem, sampler, plan.branch, st.ids, self.vocab), 0

    def _verify(self, tstem: torch.Tensor, tree: Tree, sampler: Sampler) -> Verdict:
        verdict = verify(self.target, self.state.tcache, tstem, tree, sampler, self.state.ids)
        _sync_device(self.target)
        return verdict

    def _verify_while_drafting(self, search: TreeSearch, plan: Plan, tstem, tree: Tree, sampler):
        """Run the target pass in a worker thread; meanwhile keep growing the search (up to
        `overlap_factor` x budget) so the next step's tree is partly drafted when the pass ends."""
        box: dict = {}

        def work():
            try:
                with torch.no_grad():
                    box["verdict"] = self._verify(tstem, tree, sampler)
                    box["done"] = time.perf_counter()
            except BaseException as err:  # re-raised in the caller's thread
                box["error"] = err

        worker = threading.Thread(target=work, name="edgespec-verify", daemon=True)
        wider = Plan(plan.budget * self.overlap_factor, plan.max_depth, plan.branch, plan.batch)
        start = time.perf_counter()
        deadline = start + self._pass_estimate  # a round that would outlast the pass delays the step
        worker.start()
        with _on_stream(self._draft_stream):
            while worker.is_alive() and time.perf_counter() + self._round_estimate < deadline:
                t = time.perf_counter()
                if search.grow(wider, rounds=1):
                    break
                self._round_estimate = 0.7 * self._round_estimate + 0.3 * (time.perf_counter() - t)
        _wait_stream(self._draft_stream)
        drafted = time.perf_counter() - start
        worker.join()
        if "error" in box:
            raise box["error"]
        took = box["done"] - start
        est = self._pass_estimate
        self._pass_estimate = took if est == float("inf") else 0.5 * est + 0.5 * took
        return box["verdict"], drafted

    def plan_for(self, remaining: int) -> Plan | None:
        """The scheduler's plan, clipped to the context window and the tokens still wanted."""
        room = self.max_context - len(self.state.ids)
        if room <= 0 or remaining <= 0:
            return None
        plan = self.scheduler.plan(context_room=room)
        depth = min(plan.max_depth, room - 1, remaining - 1)
        budget = min(plan.budget, self.memory_cap()) if depth > 0 else 0
        return Plan(budget, max(depth, 1), plan.branch, plan.batch)


    def memory_cap(self) -> int:
        """The largest tree whose target-pass activations fit in half the free memory now."""
        from edgespec.measure import free_memory, max_tree_tokens

        pending = len(self.state.ids) - self.state.tcache.get_seq_length()
        fit = max_tree_tokens(self.target.config, len(self.state.ids), free_memory(self.device))
        return max(0, fit - pending)


class Run:
    """Iterator over the text pieces of one generation; stops on EOS, stop strings, budget or context."""

    def __init__(self, engine: Engine, prompt_ids: list[int], max_new_tokens: int, sampler: Sampler, stop: list[str]):
        if max_new_tokens < 1:
            raise InvalidArgumentError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.engine, self.prompt_ids, self.max_new = engine, prompt_ids, max_new_tokens
        self.sampler, self.stop = sampler, stop
        self.new: list[int] = []
        self.stats = RunStats()
        self.result: Generation | None = None
        self._text = ""
        self.cancel: threading.Event | None = None  # once set, the run ends before its next step ("cancelled")

    def __iter__(self) -> Iterator[str]:
        eng = self.engine
        eng.state.sync(self.prompt_ids)
        start = time.perf_counter()
        try:
            yield from self._loop()
        except KeyboardInterrupt:
            self.stats.stop_reason = "interrupted"
            raise
        finally:
            n_keep = len(self.prompt_ids) + len(self.new)
            eng.state.ids = eng.state.ids[:n_keep]
            eng.state.trim(n_keep - 1)
            self.stats.wall_time = time.perf_counter() - start
            self.stats.new_tokens = len(self.new)
            calib = self.sampler.calibration
            self.stats.hit_rates = calib.state() if calib is not None and calib.trees else None
            self.result = Generation(self._text, list(self.new), self.stats)

    def _loop(self) -> Iterator[str]:
        eng = self.engine
        while True:
            if self.cancel is not None and self.cancel.is_set():
                self.stats.stop_reason = "cancelled"
                return
            start = time.perf_counter()
            plan = eng.plan_for(self.max_new - len(self.new))
            if plan is None:
                self.stats.stop_reason = "length" if len(self.new) >= self.max_new else "context"
                return
            tokens, step = eng.step(plan, self.sampler)
            done = self._commit(tokens)
            piece, stopped = self._new_text()
            spent = time.perf_counter() - start
            step.overhead_time = max(0.0, spent - step.draft_time - step.verify_time)
            eng.scheduler.observe(step)
            self.stats.steps.append(step)
            if piece:
                yield piece
            if done or stopped:
                return

    def _commit(self, tokens: list[int]) -> bool:
        """Append accepted tokens up to EOS / max_new_tokens; True when generation must stop."""
        for tok in tokens:
            self.new.append(tok)
            if tok in self.engine.eos_ids:
                self.stats.stop_reason = "eos"
                return True
            if len(self.new) >= self.max_new:
                self.stats.stop_reason = "length"
                return True
        return False

    def _new_text(self) -> tuple[str, bool]:
        """The text decoded since the last piece, and whether a stop string was reached.

        A piece ending in an incomplete multi-byte character is held back until it completes."""
        tok = self.engine.tokenizer
        if tok is None:
            return "", False
        text = tok.decode([t for t in self.new if t not in self.engine.eos_ids], skip_special_tokens=True)
        hit = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if hit >= 0:
            text = text[:hit]
            self.stats.stop_reason = "stop"
            self._drop_after_stop(text)
        elif text.endswith("\ufffd"):
            return "", False
        piece, self._text = text[len(self._text):], text
        return piece, hit >= 0

    def _drop_after_stop(self, kept: str) -> None:
        """Keep the fewest tokens whose text reaches past `kept` (the one completing the stop string)."""
        tok = self.engine.tokenizer
        for n in range(1, len(self.new) + 1):
            if len(tok.decode(self.new[:n], skip_special_tokens=True)) > len(kept):
                del self.new[n:]
                return


def _model_name(model) -> str:
    name = str(getattr(model.config, "name_or_path", "")) or type(model).__name__
    quant = getattr(model, "quantization_config", None) or getattr(model.config, "quantization_config", None)
    bits = getattr(quant, "bnb_4bit_quant_type", None) if getattr(quant, "load_in_4bit", False) else (
        "int8" if getattr(quant, "load_in_8bit", False) else None)
    return f"{name}:{bits}" if bits else name


class _LazyBar:
    """A progress bar that appears only if the wrapped measurements actually run (a cache miss)."""

    def __init__(self, desc: str, enabled: bool, total: int | None = None):
        self.desc, self.enabled, self.total, self.bar = desc, enabled, total, None

    def wrap(self, fn):
        def measured(n):
            if self.bar is None and self.enabled:
                from tqdm.auto import tqdm

                self.bar = tqdm(desc=self.desc, unit="run", total=self.total)
            value = fn(n)
            if self.bar is not None:
                self.bar.update()
            return value

        return measured


def _overlap_wanted(offload) -> bool:
    """Overlap drafting with the target pass when the pass waits on a (real or emulated) link."""
    if offload is None:
        return False
    dev = getattr(offload, "device", torch.device("cpu"))
    return torch.device(dev).type == "cuda" or getattr(offload.transport, "link_delay", 0.0) > 0


def _side_stream(model):
    dev = model.get_input_embeddings().weight.device
    return torch.cuda.Stream(dev) if dev.type == "cuda" else None


def _on_stream(stream):
    import contextlib

    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def _wait_stream(stream) -> None:
    if stream is not None:
        torch.cuda.current_stream(stream.device).wait_stream(stream)


def _proposal_vocab(target, drafter, tokenizer, draft_tokenizer) -> int | None:
    """The ids the drafter may propose: all of its own (None) when both models have as many, else
    the smaller count, when one tokenizer that fits both shows they are one vocabulary padded
    differently (Qwen2.5-0.5B: 151,936 rows, 7B: 152,064, tokenizer: 151,665 ids). Refuses a pair
    whose tokenizers differ, or whose sizes differ with nothing to show they share a tokenizer."""
    if tokenizer is not None and draft_tokenizer is not None and draft_tokenizer is not tokenizer:
        from edgespec.models import check_tokenizers

        check_tokenizers(tokenizer, draft_tokenizer, "target", "drafter")
    tv, dv = (m.get_input_embeddings().num_embeddings for m in (target, drafter))
    if tv == dv:
        return None
    if tokenizer is None or len(tokenizer) > min(tv, dv):
        held = "no tokenizer was given" if tokenizer is None else f"the tokenizer has {len(tokenizer)} ids"
        raise TokenizerMismatchError(
            f"The drafter's vocabulary has {dv} tokens and the target's {tv} ({held}): their token ids would "
            "not mean the same words. Use a drafter from the target's family with the same tokenizer, and pass "
            "that tokenizer to Engine(target, drafter, tokenizer).")
    return min(tv, dv)


def _context_window(*models) -> int:
    """The models' smallest max_position_embeddings (sliding windows are masked, edgespec/attention.py;
    only a family not verified past its window is held to it)."""
    sizes = [getattr(attention.text_config(m.config), "max_position_embeddings", None) for m in models]
    sizes += [attention.context_cap(m.config) for m in models]
    sizes = [s for s in sizes if s]
    return min(sizes) if sizes else 2048


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    gen = getattr(model, "generation_config", None)
    for src in (getattr(gen, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif src:
            ids.update(int(s) for s in src)
    return ids


def _sync_device(model) -> None:
    dev = model.get_input_embeddings().weight.device
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _empty_device_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


__all__ = ["Engine", "Generation", "Run", "EdgespecError"]
