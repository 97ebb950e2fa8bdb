"""Shared pieces of the benchmarks: the real data, machine facts, matmul peak, results as JSON + markdown."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from newstune import tables
from newstune.paths import cache_dir

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("NEWSTUNE_DATA", ROOT.parent / "shared" / "data"))


def empty_token_cache(folder: Path) -> None:
    """Point newstune's cache at `folder` (no tokenization from an earlier contender) that still holds the installed
    models (`newstune models install mpnet` puts MPNet under the cache)."""
    installed = cache_dir() / "models"
    folder.mkdir(parents=True, exist_ok=True)
    if installed.is_dir():
        (folder / "models").symlink_to(installed.resolve(), target_is_directory=True)
    os.environ["NEWSTUNE_CACHE"] = str(folder)


def machine() -> dict:
    import peft
    import transformers

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_line() -> str:
    """`cpu: <model name> [flags that decide precision and int8 speed]`, from /proc/cpuinfo."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                 platform.processor() or platform.machine())
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    return f"cpu: {model}, {os.cpu_count()} cores, flags: {' '.join(f for f in CPU_FLAGS if f in flags) or 'none'}"


def onednn_isa(dtype: torch.dtype) -> str:
    """What oneDNN dispatched for one `dtype` linear layer on this CPU: its ISA line and the matmul kernel name, from
    ONEDNN_VERBOSE in a child process (the variable is read once per process). "not used" when torch ran the
    GEMM elsewhere (fp32 matmuls go to MKL/OpenBLAS)."""
    import subprocess
    import sys

    code = (f"import torch; x = torch.randn(64, 256, dtype=torch.{str(dtype).split('.')[-1]}); "
            "torch.nn.functional.linear(x, torch.randn(256, 256, dtype=x.dtype))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "ONEDNN_VERBOSE": "1", "DNNL_VERBOSE": "1"}).stdout
    isa = next((line.split("isa:", 1)[1].strip() for line in out.splitlines() if "isa:" in line), None)
    kernels = sorted({field for line in out.splitlines() if ",exec," in line and "matmul" in line
                      for field in line.split(",") if ":" in field and any(k in field for k in ("brg", "gemm", "jit"))})
    if isa is None and not kernels:
        return "not used"
    return f"{isa or '?'}; matmul kernel: {', '.join(kernels) or '?'}"


def write_results(out_dir: Path, name: str, payload: dict, table: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(payload, indent=1))
    (out_dir / f"{name}.md").write_text(table + "\n")
    print(table)


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    return tables.markdown_table([title for _, title in columns],
                                 [[_cell(row.get(key, "")) for key, _ in columns] for row in rows])


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


@contextmanager
def served(specs: list[str], extra_args: tuple[str, ...] = ()) -> Iterator[str]:
    """`newstune serve SPECS [extra_args]` on a free 127.0.0.1 port; yields its base URL once /health answers."""
    import socket
    import subprocess
    import sys
    import time

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "newstune.cli", "serve", *specs, "--port", str(port), *extra_args],
                              env=os.environ.copy(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                if httpx.get(base + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        yield base
    finally:
        server.terminate()
        server.wait(timeout=30)
