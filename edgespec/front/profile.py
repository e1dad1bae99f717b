"""`edgespec profile`: where the memory and the time go.

Measures device and host memory (CUDA peaks, process RSS before/after loading and after
generating, pinned bytes), the host→device link bandwidth, per-layer transfer and compute time of
the streamed target, the target pass time vs tree size (random trees on a KV prefix), the draft
time vs budget (trees built from a real prompt), and the accepted tokens per step and tokens/s over
a few real prompts. Writes `profile.json` and `profile.png` to --out-dir and prints a table.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import psutil
import torch
from tqdm.auto import tqdm

from edgespec.base.device import param_bytes
from edgespec.base.errors import EdgespecError
from edgespec.base.stats import Totals
from edgespec.engine.face import FrontEnd
from edgespec.front import replay

DEFAULTS = {  # sizes, budgets, prompts, max new tokens: small on CPU, the real range on a GPU
    "cpu": ("1,4,16,64,256", "4,16,64", 2, 32),
    "cuda": ("1,4,16,64,256,1024,2048", "16,64,256,1024", 5, 128),
}


def rss() -> int:
    return psutil.Process().memory_info().rss


def peak_rss() -> int:
    """This process's largest resident set so far, in bytes (0 where unknown).

    Linux: VmHWM, the peak of this process image (getrusage's ru_maxrss would also count the RSS of
    the parent a subprocess was forked from)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # Windows
        return 0
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise EdgespecError(f"--{what} takes comma-separated integers, e.g. 1,4,16; got {text!r}") from None
    if not values or min(values) < 1:
        raise EdgespecError(f"--{what} needs positive integers, got {text!r}")
    return values


# ---- measurements ------------------------------------------------------------------------------
def pass_times(engine: FrontEnd, sizes: list[int], prefix: int, bar) -> list[dict]:
    """Target pass time per tree size (random tree on a `prefix`-token cache), with streaming stats."""
    from edgespec.scheduler.timing import time_passes

    rows = []
    for n in sizes:
        row = time_passes(engine.target, engine.device, [n], past=prefix, handle=engine.offload)[0]
        st = row["stats"][-1]
        layers = engine.offload.streamed_layers if engine.offload is not None else 0
        rows.append({"tokens": n, "pass_s": row["pass_s"], "streamed_layers": layers,
                     **({} if st is None else {"transfer_s": st.transfer_time, "compute_s": st.compute_time,
                                                "wait_s": st.wait_time, "decode_s": st.decode_time,
                                                "bytes": st.bytes})})
        bar.update()
    return rows


def draft_times(engine: FrontEnd, prompt_ids: list[int], budgets: list[int], bar) -> list[dict]:
    """Time to build a tree of each budget under the prompt (drafter prefix cached, not timed)."""
    from edgespec.scheduler.timing import time_drafts

    rows = time_drafts(engine.draft_runner, prompt_ids, budgets, engine.config.plan)
    bar.update(len(budgets))
    return rows


def generation(engine: FrontEnd, prompts: list[list[dict]], max_new: int, bar) -> dict:
    """Real answers: accepted tokens per step (histogram), tokens/s, per-layer streaming costs."""
    if engine.offload is not None:
        engine.offload.reset_stats()
    totals, steps = Totals(), []
    for msgs in prompts:
        engine.reset()
        stats = engine.generate(msgs, max_new_tokens=max_new, temperature=0).stats  # greedy: the acceptance figure
        totals.add(stats)
        steps += stats.steps
        bar.update()
    t = totals.as_dict()
    result = {
        "prompts": len(prompts), "new_tokens": totals.new_tokens, "wall_s": totals.wall_time, "steps": totals.steps,
        "tokens_per_s": totals.tokens_per_second, "accepted_per_pass": totals.accepted_per_pass,
        "mean_budget": t["mean_budget"], "mean_tree_size": t["mean_tree_size"],
        "draft_s": totals.draft_time, "verify_s": totals.verify_time, "acceptance_histogram": t["accepted_histogram"],
        "rest_s": totals.overhead_time, "rest": t["rest"], "step_stats": steps,
    }
    if engine.offload is not None:
        result["per_layer"] = per_layer(engine.offload)
    return result


def per_layer(handle) -> dict:
    """Mean seconds per streamed layer use over the passes since the last reset."""
    total = handle.stats.total
    uses = max(total.layers, 1)
    all_uses = max(total.passes * len(handle.layers), 1)
    passes = max(total.passes, 1)
    return {"passes": total.passes, "transfer_s": total.transfer_time / uses, "wait_s": total.wait_time / uses,
            "compute_s": total.compute_time / all_uses, "overlap": total.overlap, "bytes": total.bytes // uses,
            "decode_s": total.decode_time / uses, "decode_s_per_pass": total.decode_time / passes,
            "bytes_per_pass": total.bytes // passes}


def memory(engine: FrontEnd, before_load: int, after_load: int, after_gen: int, load_peak: int = 0) -> dict:
    mem = {"rss_before_load": before_load, "rss_peak_while_loading": load_peak, "rss_after_load": after_load,
           "rss_after_generate": after_gen,
           "target_weight_bytes": param_bytes(engine.target), "drafter_weight_bytes": param_bytes(engine.drafter),
           "pinned_bytes": engine.offload.pinned_bytes if engine.offload is not None else 0}
    if engine.self_draft is not None:  # the drafter's own bytes: the rest is the target's
        mem["drafter_weight_bytes"] = engine.self_draft.copy_bytes
    mem["weight_bytes"] = mem["target_weight_bytes"] + mem["drafter_weight_bytes"]
    if engine.device.type == "cuda":
        mem["cuda_peak_allocated"] = torch.cuda.max_memory_allocated(engine.device)
        mem["cuda_peak_reserved"] = torch.cuda.max_memory_reserved(engine.device)
    return mem


def bandwidth(device: torch.device) -> dict:
    from edgespec.offload.bandwidth import measure_bandwidth

    link = "pinned host->device copy" if device.type == "cuda" else "host memcpy"
    return {"bytes_per_s": measure_bandwidth(device), "link": link}


# ---- the run -----------------------------------------------------------------------------------
def settings(args, device: torch.device) -> tuple[list[int], list[int], int, int]:
    sizes, budgets, n, max_new = DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    return (int_list(args.sizes or sizes, "sizes"), int_list(args.budgets or budgets, "budgets"),
            args.prompts if args.prompts is not None else n,
            max_new if args.max_new_tokens is None else args.max_new_tokens)


def profile(engine: FrontEnd, args, before_load: int, load_s: float) -> dict:
    from edgespec.engine.prompts import chat_messages, load_prompts

    after_load, load_peak = rss(), peak_rss()
    sizes, budgets, n_prompts, max_new = settings(args, engine.device)
    texts, source = load_prompts(max(n_prompts, 1))
    prompts = [chat_messages(t, args.system) for t in texts[:n_prompts]]
    with tqdm(total=1 + len(sizes) + len(budgets) + len(prompts), desc="edgespec: profiling", unit="run") as bar:
        link = bandwidth(engine.device)
        bar.update()
        passes = pass_times(engine, sizes, args.prefix, bar)
        drafts = draft_times(engine, engine.encode(chat_messages(texts[0], args.system)), budgets, bar)
        gen = generation(engine, prompts, max_new, bar)
    return {"device": str(engine.device), "load_s": load_s, "prompts_from": source, "max_new_tokens": max_new,
            "model": model_info(engine), "memory": memory(engine, before_load, after_load, rss(), load_peak),
            "bandwidth": link, "pass_time": passes, "draft_time": drafts, "generation": gen}


def model_info(engine) -> dict:
    off = engine.offload
    info = {"target": str(getattr(engine.target.config, "name_or_path", "")) or type(engine.target).__name__,
            "layers": engine.target.config.num_hidden_layers, "offloaded": off is not None,
            "drafter_forward": engine.drafter_forward()}
    if off is not None:
        info.update(streamed_layers=off.streamed_layers, resident_layers=off.resident_layers, ring=off.ring,
                    link_delay=off.transport.link_delay, bytes_per_pass=off.pinned_bytes, codecs=off.codecs())
    if engine.self_draft is not None:
        info.update(self_draft=engine.self_draft.describe(), self_draft_line=engine.self_draft.line())
    return info


def streamed_lines(model: dict) -> list[str]:
    """What one pass streams and how each tensor type crosses the link (offloaded targets only)."""
    if "codecs" not in model:
        return []
    lines = ["", f"streamed per pass: {model['bytes_per_pass'] / 2**20:,.1f} MiB in {model['streamed_layers']} layers"]
    for c in model["codecs"]:
        lines.append(f"  {c['type']:<10} {c['codec']:<12} {c['tensors']:>6} tensors {c['bytes'] / 2**20:>10,.1f} MiB")
    return lines


def main(args, load) -> int:
    pyplot = require_matplotlib()
    before = rss()
    t0 = time.perf_counter()
    engine = load()
    result = profile(engine, args, before, time.perf_counter() - t0)
    steps = result["generation"].pop("step_stats")
    if steps:
        replay.write_costs(args, steps, f"edgespec profile on {engine.device}")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(result, indent=2) + "\n")
    save_png(pyplot, result, out / "profile.png")
    print(table(result))
    print(f"\nwrote {out / 'profile.json'} and {out / 'profile.png'}")
    return 0


# ---- the figure --------------------------------------------------------------------------------
def require_matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise EdgespecError("edgespec profile draws profile.png with matplotlib: pip install 'edgespec[plot]' "
                            "(or pip install matplotlib)") from None
    return plt


MEMORY_LABELS = {"weight_bytes": "weights (target + drafter)", "pinned_bytes": "host layer buffers",
                 "rss_before_load": "RSS before load", "rss_after_load": "RSS after load",
                 "rss_after_generate": "RSS after generate", "cuda_peak_allocated": "GPU peak allocated",
                 "cuda_peak_reserved": "GPU peak reserved"}


def save_png(plt, r: dict, path: Path) -> None:
    fig, ax = plt.subplots(2, 2, figsize=(11, 8))
    p, d = r["pass_time"], r["draft_time"]
    _curve(ax[0, 0], [x["tokens"] for x in p], [1e3 * x["pass_s"] for x in p], "tree size (tokens)",
           "target pass time vs tree size", "tab:blue")
    _curve(ax[0, 1], [x["budget"] for x in d], [1e3 * x["draft_s"] for x in d], "budget (draft tokens)",
           "draft time vs budget", "tab:orange")
    hist = {int(k): v for k, v in r["generation"]["acceptance_histogram"].items()}
    ax[1, 0].bar(list(hist), list(hist.values()), color="tab:green")
    ax[1, 0].set_xticks(range(1, max(hist, default=1) + 1))
    ax[1, 0].set(xlabel="tokens accepted per step", ylabel="steps",
                 title=f"acceptance ({r['generation']['tokens_per_s']:.2f} tokens/s)")
    mem = {MEMORY_LABELS[k]: v for k, v in r["memory"].items() if k in MEMORY_LABELS}
    ax[1, 1].barh(list(mem), [v / 2**20 for v in mem.values()], color="tab:purple")
    ax[1, 1].set(xlabel="MiB", title="memory")
    fig.suptitle(f"edgespec profile: {r['model']['target']} on {r['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _curve(ax, xs, ys, xlabel: str, title: str, color: str) -> None:
    ax.plot(xs, ys, "o-", color=color)
    ax.set(xscale="log", xlabel=xlabel, ylabel="ms", title=title)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.minorticks_off()
    ax.set_ylim(bottom=0)


# ---- the table ---------------------------------------------------------------------------------
def table(r: dict) -> str:
    m, g, bw = r["memory"], r["generation"], r["bandwidth"]
    link = f"link ({bw['link']}) {bw['bytes_per_s'] / 1e9:.2f} GB/s"
    lines = [f"device {r['device']}, loaded in {r['load_s']:.1f} s; {link}", "", "memory"]
    for key in ("weight_bytes", "pinned_bytes", "rss_before_load", "rss_peak_while_loading", "rss_after_load",
                "rss_after_generate",
                "cuda_peak_allocated", "cuda_peak_reserved"):
        if key in m:
            lines.append(f"  {key:<22} {m[key] / 2**20:>10,.1f} MiB")
    lines += streamed_lines(r["model"])
    if "self_draft_line" in r["model"]:
        lines += ["", r["model"]["self_draft_line"]]
    head = "".join(f"{h:>10}" for h in ("pass ms", "xfer ms", "comp ms", "wait ms", "decode ms"))
    lines += ["", "target pass vs tree size (per pass)", f"  {'tokens':>6}{head}"]
    for p in r["pass_time"]:
        cols = " ".join(f"{1e3 * p[k]:9.1f}" if k in p else f"{'-':>9}"
                        for k in ("transfer_s", "compute_s", "wait_s", "decode_s"))
        lines.append(f"  {p['tokens']:>6} {1e3 * p['pass_s']:9.1f} {cols}")
    lines += ["", f"draft vs budget (drafter forward: {r['model'].get('drafter_forward', '?')})",
              f"  {'budget':>6} {'draft ms':>9} {'size':>5} {'depth':>5}"]
    for d in r["draft_time"]:
        lines.append(f"  {d['budget']:>6} {1e3 * d['draft_s']:9.1f} {d['tree_size']:>5} {d['tree_depth']:>5}")
    speed = f"{g['tokens_per_s']:.2f} tokens/s, {g['accepted_per_pass']:.2f} accepted/pass over {g['steps']} steps"
    hist = ", ".join(f"{k}: {v}" for k, v in g["acceptance_histogram"].items())
    head = f"generation: {g['prompts']} prompts, {g['new_tokens']} tokens, {speed}, mean budget {g['mean_budget']:.1f}"
    lines += ["", head, f"  accepted/step histogram: {hist}"]
    if "rest" in g:
        parts = ", ".join(f"{k} {1e3 * v:.1f}" for k, v in g["rest"].items())
        lines.append(f"  per-step rest {1e3 * g['rest_s']:.1f} ms in all: {parts} (ms)")
    if "per_layer" in g:
        pl = g["per_layer"]
        ms = {k: f"{1e3 * pl[k]:.2f} ms" for k in ("transfer_s", "wait_s", "compute_s")}
        lines.append(f"  per streamed layer: transfer {ms['transfer_s']}, wait {ms['wait_s']}; "
                     f"compute per layer {ms['compute_s']}; overlap {pl['overlap']:.2f}")
        if "decode_s_per_pass" in pl:
            lines.append(f"  per pass: {pl['bytes_per_pass'] / 2**20:,.1f} MiB streamed, "
                         f"decode {1e3 * pl['decode_s_per_pass']:.1f} ms")
    return "\n".join(lines)
