"""`edgespec` command line: chat, generate, profile, bench.

    edgespec chat                                  # the embedded default, offloaded target + nf4 drafter
    edgespec generate "What is the capital of France?" --json
    edgespec profile --out-dir edgespec-profile
    edgespec bench --n-prompts 5 --max-new-tokens 64 --out bench.md

User errors print `edgespec: error: <message>` and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import sys

from edgespec.errors import EdgespecError


# ---- models ------------------------------------------------------------------------------------
def make_engine(args: argparse.Namespace):
    """Build the engine from the model options (tests replace this to inject a ready engine)."""
    from edgespec.engine import Engine

    drafter = args.draft or args.target  # no --draft: the target's own quantized copy drafts for it
    return Engine.from_pretrained(args.target, drafter, device=args.device, draft_quant=args.draft_quant,
                                  offload=not args.no_offload, resident_layers=args.resident_layers,
                                  link_delay=args.link_delay, budget=args.budget, target_shape=args.target_shape,
                                  stream_quant=args.stream_quant, draft_temperature=args.draft_temperature,
                                  tree_scores=args.tree_scores)


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
                   help="drafter: hub id, local folder or .gguf (default: the target itself, quantized)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--budget", type=budget_arg, default="auto", help="draft tokens per target pass: auto or N")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--max-new-tokens", type=int, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--system", default=None, help="system message for the chat template")
    g.add_argument("--no-offload", action="store_true", help="keep the whole target on the device")
    g.add_argument("--resident-layers", type=int, default=None, help="target layers kept on the device (default: fit)")
    g.add_argument("--link-delay", type=float, default=0.0, help="emulated seconds per streamed layer (slow link)")
    g.add_argument("--draft-quant", default="nf4", choices=["nf4", "int8", "none"])
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
    return p


def build_parser() -> argparse.ArgumentParser:
    common = model_options()
    ap = argparse.ArgumentParser(prog="edgespec", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True, metavar="{chat,generate,profile,bench}")
    sub.add_parser("chat", parents=[common], help="multi-turn chat in the terminal")
    gen = sub.add_parser("generate", parents=[common], help="one answer to stdout")
    gen.add_argument("prompt", nargs="?", default=None, help="the prompt (absent or '-': read stdin)")
    gen.add_argument("--raw", action="store_true", help="plain text prompt, no chat template")
    gen.add_argument("--json", action="store_true", help="print text, ids and stats as JSON")
    prof = sub.add_parser("profile", parents=[common], help="memory and latency profile (JSON + PNG)")
    prof.add_argument("--out-dir", default="edgespec-profile")
    prof.add_argument("--sizes", default=None, help="target tree sizes, e.g. 1,4,16,64,256 (default by device)")
    prof.add_argument("--budgets", default=None, help="draft budgets, e.g. 4,16,64 (default by device)")
    prof.add_argument("--prompts", type=int, default=None, help="real prompts for the acceptance histogram")
    prof.add_argument("--prefix", type=int, default=128, help="KV-cache tokens before each timed tree")
    bench = sub.add_parser("bench", parents=[common], help="MT-Bench: edgespec vs plain vs HF assisted")
    bench.add_argument("--questions", default=None, help="MT-Bench questions .jsonl (default: ../shared/data)")
    bench.add_argument("--n-prompts", type=int, default=5)
    bench.add_argument("--json", action="store_true", help="print the results as JSON")
    bench.add_argument("--out", default=None, help="also write the markdown table (with a header) here")
    return ap


# ---- commands ----------------------------------------------------------------------------------
def cmd_chat(args) -> int:
    from edgespec.chat import ChatSession, repl

    engine = make_engine(args)
    prefix = "" if sys.stdin.isatty() else "assistant: "
    session = ChatSession(engine, system=args.system, max_new_tokens=args.max_new_tokens or 512,
                          temperature=args.temperature, top_p=args.top_p, seed=args.seed, prefix=prefix)
    return repl(session)


def cmd_generate(args) -> int:
    text = read_prompt(args.prompt)
    engine = make_engine(args)
    prompt = text if args.raw else chat_messages(text, args.system)
    kw = {"max_new_tokens": args.max_new_tokens or 256, "temperature": args.temperature, "top_p": args.top_p,
          "seed": args.seed}
    if args.json:
        out = engine.generate(prompt, **kw)
        print(json.dumps(generation_json(engine, out), indent=2))
        return 0
    run = engine.run(prompt, **kw)
    for piece in run:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
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


def chat_messages(text: str, system: str | None = None) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": text}]


def generation_json(engine, out) -> dict:
    steps = [{k: v for k, v in vars(s).items() if k != "node_probs"} for s in out.stats.steps]
    result = {"text": out.text, "ids": out.ids, "stats": out.stats.summary(), "steps": steps}
    if hasattr(engine.scheduler, "stats"):
        result["scheduler"] = engine.scheduler.stats()
    if engine.offload is not None:
        result["offload"] = engine.offload.describe()  # bytes per pass, codec per tensor type, decode time
    if out.stats.hit_rates:
        result["hit_rates"] = out.stats.hit_rates  # how often the target took draft nodes, by draft probability
    return result


def cmd_profile(args) -> int:
    from edgespec import profile

    return profile.main(args, lambda: make_engine(args))


def cmd_bench(args) -> int:
    from edgespec import bench

    return bench.main(args, lambda: make_engine(args))


COMMANDS = {"chat": cmd_chat, "generate": cmd_generate, "profile": cmd_profile, "bench": cmd_bench}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return COMMANDS[args.command](args)
    except EdgespecError as e:
        print(f"edgespec: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
