"""The cost of a verification pass across 1-4 machines, on paper (edgespec/distributed/hops.py): each
machine streams the layers its GPU cannot hold over its own PCIe link, the hidden states hop between
machines. Prints the markdown tables of benchmarks/pipeline_hops.md.

    python scripts/pipeline_figures.py
"""
from __future__ import annotations

from edgespec.distributed.hops import LINKS, NETS, SHAPES, hops_seconds, pass_seconds

TREES = (64, 256, 1024)


def main() -> None:
    print("## Hops alone: seconds per pass (stages - 1 hidden-state hops + the verdict back), bf16 hidden states\n")
    print("| shape | tokens | " + " | ".join(f"{n} st. {net}" for n in (2, 4) for net in NETS) + " |")
    print("|---" * (2 + 2 * len(NETS)) + "|")
    for shape in SHAPES.values():
        for t in TREES:
            cells = [f"{hops_seconds(n, t, shape.hidden, net) * 1e3:.1f} ms" for n in (2, 4) for net in NETS.values()]
            print(f"| {shape.name} | {t} | " + " | ".join(cells) + " |")
    for link_name, link in LINKS.items():
        print(f"\n## Whole pass, PCIe {link_name} ({link / 1e9:.0f} GB/s), 20 GB of layers resident per GPU, "
              "100 TFLOP/s per GPU: seconds (hop share)\n")
        print("| shape | tokens | 1 machine | " + " | ".join(f"{n} st. {net}" for n in (2, 3, 4) for net in NETS) + " |")
        print("|---" * (3 + 3 * len(NETS)) + "|")
        for shape in SHAPES.values():
            for t in TREES:
                one = pass_seconds(shape, 1, t, NETS["1GbE"], link)
                cells = []
                for n in (2, 3, 4):
                    for net in NETS.values():
                        total = pass_seconds(shape, n, t, net, link)
                        cells.append(f"{total:.2f} s ({hops_seconds(n, t, shape.hidden, net) / total:.0%})")
                print(f"| {shape.name} | {t} | {one:.2f} s | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
