"""Load test of `newstune serve` with a real HTTP client: 1, 8 and 32 concurrent clients sending single-text
requests to a server on 127.0.0.1 (bounded: each level runs for --seconds). Reports requests/s, p50/p99, errors.

    python benchmarks/serve_load.py runs/ag_news_minilm_lora
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED_DATA, cpu_line, machine, markdown_table, served, write_results  # noqa: E402


async def client(http, url: str, model: str, texts: list[str], deadline: float, latencies: list, errors: list):
    i = 0
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        try:
            response = await http.post(url, json={"model": model, "texts": [texts[i % len(texts)]]})
            if response.status_code != 200:
                errors.append(response.status_code)
        except Exception as err:  # noqa: BLE001 -- every failure counts as an error
            errors.append(type(err).__name__)
        latencies.append(time.perf_counter() - start)
        i += 1


async def level(base: str, model: str, texts: list[str], clients: int, seconds: float) -> dict:
    import httpx

    latencies: list[float] = []
    errors: list = []
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=base, timeout=30, limits=limits) as http:
        await http.post("/v1/classify", json={"model": model, "texts": texts[:1]})
        deadline = time.perf_counter() + seconds
        await asyncio.gather(*(client(http, "/v1/classify", model, texts[k::clients], deadline, latencies, errors)
                               for k in range(clients)))
    latencies.sort()
    return {"clients": clients, "requests": len(latencies), "requests_per_s": len(latencies) / seconds,
            "p50_ms": 1000 * latencies[len(latencies) // 2], "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)],
            "errors": len(errors)}


def main() -> None:
    from newstune.config import DataConfig
    from newstune.data.registry import load_dataset

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--backend", default="auto", help="the server's --backend")
    parser.add_argument("--max-wait-ms", default="4", help="the server's --max-wait-ms")
    parser.add_argument("--workers", default="1", help="the server's --workers")
    parser.add_argument("--out", default="bench_results")
    args = parser.parse_args()
    texts = load_dataset(DataConfig(name="ag_news", dir=SHARED_DATA / "ag_news")).splits["test"].texts
    server_args = ("--backend", args.backend, "--max-wait-ms", args.max_wait_ms, "--workers", args.workers, "--quiet")
    with served([f"topics={args.run}"], server_args) as base:
        import httpx

        backend = httpx.get(base + "/v1/models").json()[0]["backend"]
        rows = [asyncio.run(level(base, "topics", texts, n, args.seconds)) for n in (1, 8, 32)]
    table = markdown_table(rows, [("clients", "concurrent clients"), ("requests", "requests"),
                                  ("requests_per_s", "requests/s"), ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"),
                                  ("errors", "errors")])
    write_results(Path(args.out), "serve_load", {"machine": machine(), "cpu": cpu_line(), "run": str(args.run),
                                                  "backend": backend, "max_wait_ms": args.max_wait_ms,
                                                  "workers": args.workers, "rows": rows},
                  f"{table}\n\nserver backend: {backend}; single-text requests cycling over {len(texts):,} texts."
                  f"\n{cpu_line()}")
    at_1, at_32 = rows[0], rows[-1]
    print(cpu_line())
    print(f"backend: {backend}")
    print(f"p50_ms_at_1: {at_1['p50_ms']:.1f}")
    print(f"rps_at_32: {at_32['requests_per_s']:.0f}")
    print(f"p99_ms_at_32: {at_32['p99_ms']:.0f}")
    print(f"errors: {sum(r['errors'] for r in rows)} over {sum(r['requests'] for r in rows)} requests")


if __name__ == "__main__":
    main()
