"""The README's LoRA target table is the code's table (src/newstune/modeling/model.py ARCH_MODULES)."""

from pathlib import Path

from newstune.modeling.model import ARCH_MODULES, SHORTHANDS

README = Path(__file__).resolve().parents[1] / "README.md"
ROLES = ["q", "k", "v", "o", "ffn_in", "ffn_out"]


def shown(pattern: str) -> str:
    return "`" + pattern.replace("\\.", ".").replace("\\d+", "N") + "`"


def lora_table() -> list[str]:
    by_table: dict[tuple, list[str]] = {}
    for arch, table in ARCH_MODULES.items():
        by_table.setdefault(tuple(table[role] for role in ROLES), []).append(arch)
    lines = ["| architecture | " + " | ".join(ROLES) + " |", "|---|" + "---|" * len(ROLES)]
    lines += ["| " + ", ".join(archs) + " | " + " | ".join(shown(p) for p in patterns) + " |"
              for patterns, archs in by_table.items()]
    return lines


def test_readme_lora_table_matches_the_code():
    text = README.read_text()
    for line in lora_table():
        assert line in text, f"README.md lacks the LoRA table line:\n{line}"
    for shorthand in SHORTHANDS:
        assert f"`{shorthand}`" in text, f"README.md does not document the shorthand {shorthand}"
