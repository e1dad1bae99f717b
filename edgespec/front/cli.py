"""`edgespec` command line: chat, generate, profile, bench.

    edgespec chat                                  # the embedded default, offloaded target + nf4 drafter
    edgespec generate "What is the capital of France?" --json
    edgespec profile --out-dir edgespec-profile
    edgespec bench --n-prompts 5 --max-new-tokens 64 --out bench.md
    edgespec serve --port 8080                     # OpenAI-compatible HTTP server on 127.0.0.1

User errors print `edgespec: error: <message>` and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from edgespec.base.errors import EdgespecError
from edgespec.core.sampling import SAMPLING_FIELDS
from edgespec.engine.face import FrontEnd
from edgespec.engine.prompts import chat_messages
from edgespec.front import arguments, replay


# ---- models ------------------------------------------------------------------------------------
# each model option and the config field it sets (tests check that every option is here or CLI-only)
OPTION_FIELDS = {
    "target": ("LoadConfig", "target"), "draft": ("LoadConfig", "drafter"), "device": ("LoadConfig", "device"),
    "draft_quant": ("LoadConfig", "draft_quant"), "no_offload": ("LoadConfig", "offload"),
    "resident_layers": ("LoadConfig", "resident_layers"), "link_delay": ("LoadConfig", "link_delay"),
    "stream_quant": ("LoadConfig", "stream_quant"), "target_shape": ("LoadConfig", "target_shape"),
    "draft_temperature": ("DraftConfig", "draft_temperature"), "tree_scores": ("DraftConfig", "tree_scores"),
    "temperature": ("SamplingConfig", "temperature"), "top_p": ("SamplingConfig", "top_p"),
    "top_k": ("SamplingConfig", "top_k"), "min_p": ("SamplingConfig", "min_p"),
    "repetition_penalty": ("SamplingConfig", "repetition_penalty"),
}
CLI_ONLY = {"budget", "max_new_tokens", "seed", "system",  # per generation / Engine(budget=), not a config
            "stages", "stage_bind", "stage_port", "allow_public",  # a split target (edgespec/distributed/)
            "hop_latency", "hop_gbps"}
OPENED: list = []  # the split targets this process opened: closed when the command ends, however it ends


def make_engine(args: argparse.Namespace):
    """Build the engine from the model options (tests replace this to inject a ready engine)."""
    from edgespec.engine.engine import Engine

    fields = {field: getattr(args, opt) for opt, (cls, field) in OPTION_FIELDS.items()
              if cls in ("LoadConfig", "DraftConfig")}
    fields["offload"] = not args.no_offload
    target, drafter = fields.pop("target"), fields.pop("drafter")
    if getattr(args, "stages", None):
        return split_engine(args, target, drafter)
    return Engine.from_pretrained(target, drafter, budget=args.budget, clock=replay.clock_for(args), **fields)


def split_engine(args: argparse.Namespace, target, drafter):
    """This process is stage 0 of a target split across machines (`--stages`): it hosts the rendezvous
    on --stage-bind:--stage-port, waits for the other stages (`edgespec stage`), shows the plan, and
    drafts with a separate drafter (the target's own nf4 copy by default)."""
    from edgespec.distributed.placement import Placement
    from edgespec.distributed.stage import emulated
    from edgespec.distributed.target import PipelineTarget
    from edgespec.engine.engine import Engine
    from edgespec.loading.models import load_model, load_tokenizer, pick_device

    device = pick_device(args.device)
    placement = Placement.parse(args.stages)
    pipe = PipelineTarget(target, placement, device, bind=args.stage_bind, port=args.stage_port,
                          allow_public=args.allow_public, link_delay=args.link_delay,
                          stream_quant=None if args.stream_quant == "none" else args.stream_quant,
                          emulate=emulated(args.hop_latency, args.hop_gbps))
    print(f"edgespec: stage 0 listening on {args.stage_bind}:{pipe.port}; start the other stages with "
          f"`edgespec stage --coordinator {args.stage_bind}:{pipe.port} --world {placement.world} --rank R ...`",
          file=sys.stderr, flush=True)
    pipe.start()
    OPENED.append(pipe)
    quant = None if args.draft_quant == "none" else "nf4" if args.draft_quant == "auto" else args.draft_quant
    tok = load_tokenizer(target)
    draft = load_model(drafter or target, quantize=quant, device=device)
    return Engine(pipe.model, draft, tok, budget=args.budget, verifier=pipe)


def budget_arg(text: str):
    if text.strip().lower() == "auto":
        return "auto"
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected 'auto' or a tree size >= 0, got {text!r}")
    return int(text)


def model_options() -> argparse.ArgumentParser:
    from edgespec.offload.shapes import SHAPES

    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("model options")
    g.add_argument("--target", default=None,
                   help="hub id, local folder or .gguf (default: the embedded SmolLM2-135M-Instruct)")
    g.add_argument("--draft", default=None,
                   help="drafter: 'self' (the target drafts for itself: its resident layers shared, its streamed "
                        "layers as low-bit copies on the device), or a hub id, local folder or .gguf (default: self "
                        "for an offloaded target whose copies fit, else the target's own nf4 copy)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--budget", type=budget_arg, default="auto", help="draft tokens per target pass: auto or N")
    s = p.add_argument_group(
        "sampling (default: the model's own generation_config; a model without one, as a GGUF, gets chat "
        "defaults: temperature 0.8, top-k 40, top-p 0.9, repetition penalty 1.1; bench decodes greedily)")
    s.add_argument("--temperature", type=float, default=None, help="0 = greedy: the target's own argmax tokens")
    s.add_argument("--top-p", type=float, default=None, help="nucleus: keep the most likely tokens up to this mass")
    s.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (0 = off)")
    s.add_argument("--min-p", type=float, default=None,
                   help="drop tokens below this fraction of the most likely one's probability (0 = off)")
    s.add_argument("--repetition-penalty", type=float, default=None,
                   help="divide the logits of tokens already in the conversation by this (1 = off; greedy too)")
    g.add_argument("--max-new-tokens", type=int, default=None)
    s.add_argument("--seed", type=int, default=None, help="same seed, same answer")
    g.add_argument("--system", default=None, help="system message for the chat template")
    g.add_argument("--no-offload", action="store_true", help="keep the whole target on the device")
    g.add_argument("--resident-layers", type=int, default=None, help="target layers kept on the device (default: fit)")
    g.add_argument("--link-delay", type=float, default=0.0, help="emulated seconds per streamed layer (slow link)")
    g.add_argument("--draft-quant", default="auto", choices=["auto", "nf4", "fp4", "int8", "hqq4", "hqq3", "hqq2", "none"],
                   help="the self-drafter's copies of the streamed layers (auto: the memory plan's; hqq* need "
                        "pip install hqq), or a separate drafter's bitsandbytes copy (nf4 = auto, int8, none)")
    g.add_argument("--stream-quant", default="none", choices=["none", "int8", "nf4"],
                   help="keep the target's streamed layers int8/nf4-encoded in host RAM, decoded on the device: "
                        "fewer bytes per pass and less RAM, for a quantized target (output exact for that target)")
    g.add_argument("--draft-temperature", type=float, default=1.0,
                   help="greedy: score tree nodes by the drafter's log-probs at this temperature; below 1 favours "
                        "deeper trees (0.5: +7/14/21%% tokens per pass at budget 16/64/256 on the embedded pair, "
                        "~50%% more drafting)")
    g.add_argument("--tree-scores", default="calibrated", choices=["calibrated", "draft"],
                   help="rank tree nodes by hit rates learnt from the trees the target verified (calibrated, "
                        "default) or by the drafter's raw probabilities (draft)")
    g.add_argument("--target-shape", default=None, choices=sorted(SHAPES),
                   help="benchmarks: zero-pad the (Llama) target into this bigger shape, so it streams and "
                        "computes like that model while predicting exactly as the loaded one")
    d = p.add_argument_group("a target split across machines (loopback or a trusted LAN only: no authentication)")
    d.add_argument("--stages", default=None,
                   help="HOST:LAYERS[:RESIDENT],... stage 0 (this process) first, e.g. 192.168.1.10:0-11,"
                        "192.168.1.11:12-29 (LAYERS: first-last, a count, or auto = by free memory), or a .toml")
    d.add_argument("--stage-bind", default="127.0.0.1", help="this machine's LAN address for the stages")
    d.add_argument("--stage-port", type=int, default=29500, help="the rendezvous port (0: any free port)")
    d.add_argument("--allow-public", action="store_true",
                   help="allow binding the stages' ports to a non-private address (they have no authentication)")
    d.add_argument("--hop-latency", type=float, default=None,
                   help="benchmarks: emulate a network on stage 0's sends, seconds per message (as `edgespec stage`)")
    d.add_argument("--hop-gbps", type=float, default=None, help="benchmarks: ... and gigabits per second")
    return p


def build_parser() -> argparse.ArgumentParser:
    common = model_options()
    ap = argparse.ArgumentParser(prog="edgespec", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True, metavar="{chat,generate,profile,bench,serve,stage}")
    sub.add_parser("chat", parents=[common], help="multi-turn chat in the terminal")
    gen = sub.add_parser("generate", parents=[common], help="one answer to stdout")
    gen.add_argument("prompt", nargs="?", default=None, help="the prompt (absent or '-': read stdin)")
    gen.add_argument("--raw", action="store_true", help="plain text prompt, no chat template")
    gen.add_argument("--json", action="store_true", help="print text, ids and stats as JSON")
    gen.add_argument("--json-schema", metavar="FILE", default=None,
                     help="the answer is JSON valid under this JSON schema (a .json file), exactly")
    gen.add_argument("--grammar", metavar="FILE", default=None,
                     help="the answer follows this Lark grammar (llguidance's dialect: start: ..., /regex/ "
                          "terminals, %%json{...} schemas)")
    prof = sub.add_parser("profile", parents=[common], help="memory and latency profile (JSON + PNG)")
    prof.add_argument("--out-dir", default="edgespec-profile")
    prof.add_argument("--sizes", default=None, help="target tree sizes, e.g. 1,4,16,64,256 (default by device)")
    prof.add_argument("--budgets", default=None, help="draft budgets, e.g. 4,16,64 (default by device)")
    prof.add_argument("--prompts", type=int, default=None, help="real prompts for the acceptance histogram")
    prof.add_argument("--prefix", type=int, default=128, help="KV-cache tokens before each timed tree")
    replay.add_options(prof)
    bench = sub.add_parser("bench", parents=[common], help="MT-Bench: edgespec vs plain vs HF assisted")
    bench.add_argument("--questions", default=None, help="MT-Bench questions .jsonl (default: 5 built-in prompts)")
    bench.add_argument("--n-prompts", type=int, default=5)
    bench.add_argument("--json", action="store_true", help="print the results as JSON")
    bench.add_argument("--out", default=None, help="also write the markdown table (with a header) here")
    replay.add_options(bench)
    serve_options(sub.add_parser("serve", parents=[common], help="OpenAI-compatible HTTP server"))
    return ap


def serve_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080; 0: any free port)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/* and /metrics (default: $EDGESPEC_API_KEY)")
    p.add_argument("--max-body-mb", type=float, default=4.0, help="largest request body accepted (MiB)")


# ---- commands ----------------------------------------------------------------------------------
def sampling_args(args) -> dict:
    """The sampling settings given on the command line, by SamplingConfig field (the rest fall back to the
    engine's defaults): the one sampling value a command hands the engine."""
    return {n: getattr(args, n) for n in SAMPLING_FIELDS if getattr(args, n, None) is not None}


def cmd_chat(args) -> int:
    from edgespec.front.chat import ChatSession, repl

    engine = make_engine(args)
    prefix = "" if sys.stdin.isatty() else "assistant: "
    sampling = sampling_args(args)
    print(f"edgespec: {engine.sampling_for(sampling).describe()}; --temperature 0 for greedy", file=sys.stderr)
    session = ChatSession(engine, system=args.system, max_new_tokens=arguments.max_new_tokens(args),
                          sampling=sampling, seed=args.seed, prefix=prefix)
    return repl(session)


def cmd_generate(args) -> int:
    text = read_prompt(args.prompt)
    grammar = arguments.grammar_file(args)
    engine = make_engine(args)
    prompt = text if args.raw else chat_messages(text, args.system)
    kw = {"max_new_tokens": arguments.max_new_tokens(args), "seed": args.seed, "sampling": sampling_args(args)}
    if grammar is not None:
        kw["grammar"] = grammar
    if args.json:
        out = engine.generate(prompt, **kw)
        print(json.dumps(generation_json(engine, out), indent=2))
        return 0
    run = engine.run(prompt, **kw)
    for piece in run:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    reason = engine.scheduler.no_tree_reason()
    if reason:  # a user who sees no speculation learns why
        print(f"edgespec: {reason}", file=sys.stderr)
    return 0




def read_prompt(arg: str | None) -> str:
    """The prompt argument, or stdin when it is absent or '-' (not from a terminal: that would hang)."""
    if arg in (None, "-"):
        if sys.stdin.isatty():
            raise EdgespecError('no prompt: edgespec generate "your prompt" (or pipe it on stdin)')
        arg = sys.stdin.read().rstrip("\n")
    if not arg.strip():
        raise EdgespecError("the prompt is empty: give some text to answer")
    return arg


def generation_json(engine: FrontEnd, out) -> dict:
    steps = [{k: v for k, v in vars(s).items() if k != "node_probs"} for s in out.stats.steps]
    result = {"text": out.text, "ids": out.ids, "stats": out.stats.summary(), "steps": steps}
    result["scheduler"] = engine.scheduler.stats()
    if engine.offload is not None:
        result["offload"] = engine.offload.describe()  # bytes per pass, codec per tensor type, decode time
    if engine.self_draft is not None:
        result["self_draft"] = engine.self_draft.describe()  # layers shared / copied, the memory plan
    if out.stats.hit_rates:
        result["hit_rates"] = out.stats.hit_rates  # how often the target took draft nodes, by draft probability
    return result


def cmd_profile(args) -> int:
    from edgespec.front import profile

    return profile.main(args, lambda: make_engine(args))


def cmd_bench(args) -> int:
    from edgespec.front import bench

    return bench.main(args, lambda: make_engine(args))


def cmd_serve(args) -> int:
    from edgespec.front import server

    api_key = args.api_key or os.environ.get("EDGESPEC_API_KEY") or None
    sock = server.bind(args.host, args.port)  # a taken port fails now, not after loading the models
    engine = make_engine(args)
    defaults = {**sampling_args(args), **({"seed": args.seed} if args.seed is not None else {})}
    drafter = args.draft or f"{server.served_name(args.target)}:{args.draft_quant}"  # no --draft: the target's copy
    if engine.self_draft is not None:  # the target drafts for itself
        drafter = f"{server.served_name(args.target)}:self-{engine.self_draft.codec}"
    config = server.ServerConfig(model_id=server.served_name(args.target), drafter_id=drafter, api_key=api_key,
                                 max_body_bytes=int(args.max_body_mb * (1 << 20)), max_tokens=args.max_new_tokens,
                                 defaults=defaults, system=args.system)
    print(f"edgespec: requests that leave sampling out get {engine.sampling_for(sampling_args(args)).describe()}",
          file=sys.stderr)
    return server.serve(engine, config, args.host, args.port, sock)


COMMANDS = {"chat": cmd_chat, "generate": cmd_generate, "profile": cmd_profile, "bench": cmd_bench,
            "serve": cmd_serve}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["stage"]:  # a stage of a split target: its own options (edgespec/distributed/stage.py)
        from edgespec.distributed.stage import main as stage_main

        return stage_main(argv[1:])
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        arguments.check_args(args)  # before any model loads
        return COMMANDS[args.command](args)
    except EdgespecError as e:
        print(f"edgespec: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    finally:
        close_opened()


def close_opened() -> None:
    """Stop the other stages of every split target this command opened (they exit cleanly, not on a
    broken connection)."""
    while OPENED:
        OPENED.pop().close()


if __name__ == "__main__":
    sys.exit(main())
