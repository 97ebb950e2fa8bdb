"""Markdown table of several `newstune profile` results (their profile.json), one row per profile.

    python benchmarks/profile_table.py runs/profile_* > docs/results/profiles.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    header = ("| profile | tokens/s | MFU | GEMM | attention | norm+elementwise | optimizer | data | other "
              "| forward ms | backward ms | optimizer ms | top op |")
    lines = [header, "|" + "---|" * 13]
    for folder in sys.argv[1:]:
        p = json.loads((Path(folder) / "profile.json").read_text())
        share = p["category_share"]
        phase = p["phase_ms"]
        top = p["top_ops"][0]
        cached = f" (layers 0-{p['cached_layers'] - 1} cached)" if p.get("cached_layers") else ""
        lines.append(
            f"| {p['model']} {p['method']} {p['precision']}{cached} | {p['tokens_per_s']:,.0f} | {p['mfu']:.1%} | "
            + " | ".join(f"{share[c]:.0%}" for c in ("gemm", "attention", "norm_elementwise", "optimizer", "data",
                                                      "other"))
            + f" | {phase['forward']:,.0f} | {phase['backward']:,.0f} | {phase['optimizer']:,.0f} | "
            f"{top['op']} ({top['self_ms']:,.0f} ms) |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
