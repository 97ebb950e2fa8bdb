"""Load test of `newstune serve` with a real HTTP client: 1, 8 and 32 concurrent clients sending single-text
requests to a server on 127.0.0.1 (bounded: each level runs for --seconds). Reports requests/s, p50/p99, errors,
and the CPU seconds the client process itself used (it shares the machine's cores with the server).

    python benchmarks/serve_load.py runs/ag_news_minilm_lora                   # lean keep-alive client (as wrk)
    python benchmarks/serve_load.py runs/ag_news_minilm_lora --client httpx    # the httpx client of earlier figures
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import re
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED_DATA, cpu_line, machine, markdown_table, served, write_results  # noqa: E402


async def httpx_client(http, model: str, texts: list[str], deadline: float, latencies: list[float],
                       errors: list) -> None:
    """One simulated client: sends its texts one per request until the deadline; a 200's latency is kept."""
    i = 0
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        try:
            response = await http.post("/v1/classify", json={"model": model, "texts": [texts[i % len(texts)]]})
            if response.status_code == 200:
                latencies.append(time.perf_counter() - start)
            else:
                errors.append(response.status_code)
        except Exception as err:  # noqa: BLE001 -- every failure counts as an error
            errors.append(type(err).__name__)
        i += 1


# The lean client: one keep-alive HTTP/1.1 connection per simulated client, request bytes built before the clock
# starts (httpx's clock also covers its JSON encoding), the answer read by its Content-Length. Written by hand (httpx
# and aiohttp do far more per request) because the load generator runs on the same 2 cores as the server: httpx took
# ~0.6 of them at ~240 requests/s, CPU the server then lacks. wrk or oha would do the same from outside Python;
# neither is installable here.
CONTENT_LENGTH = re.compile(rb"(?i)\r\ncontent-length:\s*(\d+)")
CLOSE = re.compile(rb"(?i)\r\nconnection:\s*close")
TIMEOUT_S = 30  # as the httpx client's


def raw_requests(base: str, model: str, texts: list[str]) -> list[bytes]:
    host = urlsplit(base).netloc
    bodies = (json.dumps({"model": model, "texts": [text]}).encode() for text in texts)
    return [(f"POST /v1/classify HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
             f"Content-Length: {len(body)}\r\n\r\n").encode() + body for body in bodies]


async def raw_exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       request: bytes) -> tuple[bytes, bool]:
    """Send one request and read its whole answer: (status, whether the connection can carry another)."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    length = CONTENT_LENGTH.search(head)
    if length is None:  # chunked or unknown: the stream cannot be trusted to be in step any more
        raise ValueError("answer without Content-Length")
    await reader.readexactly(int(length.group(1)))
    return head[9:12], CLOSE.search(head) is None


async def raw_client(base: str, requests: list[bytes], deadline: float, latencies: list[float],
                     errors: list) -> None:
    """`httpx_client` on a raw connection: renewed after an error or a `Connection: close`."""
    address = urlsplit(base)
    connection = None
    i = 0
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        try:
            async with asyncio.timeout(TIMEOUT_S):
                if connection is None:
                    connection = await asyncio.open_connection(address.hostname, address.port)
                status, keep = await raw_exchange(*connection, requests[i % len(requests)])
            if status == b"200":
                latencies.append(time.perf_counter() - start)
            else:
                errors.append(status.decode())
        except Exception as err:  # noqa: BLE001 -- every failure counts as an error
            errors.append(type(err).__name__)
            keep = False
        if not keep and connection is not None:
            connection[1].close()
            connection = None
        i += 1
    if connection is not None:
        connection[1].close()


def percentile_ms(ordered: list[float], q: float) -> float:
    return 1000 * ordered[int(len(ordered) * q)] if ordered else float("nan")


async def level(base: str, model: str, texts: list[str], clients: int, seconds: float, kind: str) -> dict:
    """`clients` simulated clients for `seconds`; requests/s and percentiles count answered (200) requests only."""
    import httpx

    latencies: list[float] = []
    errors: list = []
    shares = [texts[k::clients] for k in range(clients)]
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=base, timeout=TIMEOUT_S, limits=limits) as http:
        await http.post("/v1/classify", json={"model": model, "texts": texts[:1]})
        if kind == "raw":
            prepared = [raw_requests(base, model, share) for share in shares]

            def runners(deadline: float) -> list:
                return [raw_client(base, requests, deadline, latencies, errors) for requests in prepared]
        else:
            def runners(deadline: float) -> list:
                return [httpx_client(http, model, share, deadline, latencies, errors) for share in shares]
        cpu, wall = time.process_time(), time.perf_counter()
        await asyncio.gather(*runners(wall + seconds))
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    latencies.sort()
    return {"clients": clients, "requests": len(latencies), "requests_per_s": len(latencies) / wall,
            "p50_ms": percentile_ms(latencies, 0.5), "p99_ms": percentile_ms(latencies, 0.99),
            "errors": len(errors), "client_cores": cpu / wall}


def main() -> None:
    from newstune.config import DataConfig
    from newstune.data.registry import load_dataset

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--backend", default="auto", help="the server's --backend")
    parser.add_argument("--max-wait-ms", default="4", help="the server's --max-wait-ms")
    parser.add_argument("--workers", default="1", help="the server's --workers")
    parser.add_argument("--max-batch", default="16", help="the server's --max-batch")
    parser.add_argument("--client", choices=("raw", "httpx"), default="raw",
                        help="raw: a lean keep-alive client (default); httpx: the library client")
    parser.add_argument("--out", default="bench_results")
    args = parser.parse_args()
    texts = load_dataset(DataConfig(name="ag_news", dir=SHARED_DATA / "ag_news")).splits["test"].texts
    server_args = ("--backend", args.backend, "--max-wait-ms", args.max_wait_ms, "--workers", args.workers,
                   "--max-batch", args.max_batch, "--quiet")
    with served([f"topics={args.run}"], server_args) as base:
        import httpx

        backend = httpx.get(base + "/v1/models").json()[0]["backend"]
        # the client holds the dataset and newstune's imports: a full collection of all that would stall every
        # client at once and count as server latency (the server freezes its own loaded objects the same way)
        gc.collect()
        gc.freeze()
        rows = [asyncio.run(level(base, "topics", texts, n, args.seconds, args.client)) for n in (1, 8, 32)]
    table = markdown_table(rows, [("clients", "concurrent clients"), ("requests", "requests"),
                                  ("requests_per_s", "requests/s"), ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"),
                                  ("errors", "errors"), ("client_cores", "client CPU, cores")])
    write_results(Path(args.out), "serve_load", {"machine": machine(), "cpu": cpu_line(), "run": str(args.run),
                                                  "backend": backend, "max_wait_ms": args.max_wait_ms,
                                                  "workers": args.workers, "max_batch": args.max_batch,
                                                  "client": args.client, "rows": rows},
                  f"{table}\n\nserver backend: {backend}, --max-batch {args.max_batch}; {args.client} client; "
                  f"single-text requests cycling over {len(texts):,} texts."
                  f"\n{cpu_line()}")
    at_1, at_32 = rows[0], rows[-1]
    print(cpu_line())
    print(f"backend: {backend}; client: {args.client}; server --max-batch {args.max_batch}")
    print(f"p50_ms_at_1: {at_1['p50_ms']:.1f}")
    print(f"rps_at_32: {at_32['requests_per_s']:.0f}")
    print(f"p99_ms_at_32: {at_32['p99_ms']:.0f}")
    print(f"errors: {sum(r['errors'] for r in rows)} beside {sum(r['requests'] for r in rows)} answered requests")


if __name__ == "__main__":
    main()
