"""Markdown table of several `newstune profile` results (their profile.json), one row per profile.

    python benchmarks/profile_table.py runs/profile_* > docs/results/profiles.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from newstune.tables import markdown_table

HEADER = ["profile", "tokens/s", "MFU", "GEMM", "attention", "norm+elementwise", "optimizer", "data", "other",
          "forward ms", "backward ms", "optimizer ms", "top op"]
SHARES = ("gemm", "attention", "norm_elementwise", "optimizer", "data", "other")


def row(p: dict) -> list[str]:
    cached = f" (layers 0-{p['cached_layers'] - 1} cached)" if p.get("cached_layers") else ""
    phase, top = p["phase_ms"], p["top_ops"][0]
    return [f"{p['model']} {p['method']} {p['precision']}{cached}", f"{p['tokens_per_s']:,.0f}", f"{p['mfu']:.1%}",
            *(f"{p['category_share'][c]:.0%}" for c in SHARES),
            *(f"{phase[k]:,.0f}" for k in ("forward", "backward", "optimizer")),
            f"{top['op']} ({top['self_ms']:,.0f} ms)"]


def main() -> None:
    profiles = [json.loads((Path(folder) / "profile.json").read_text()) for folder in sys.argv[1:]]
    print(markdown_table(HEADER, [row(p) for p in profiles]))


if __name__ == "__main__":
    main()
