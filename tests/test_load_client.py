"""The load benchmark's lean HTTP client: it must count only whole 200 answers, never trust an answer it cannot
delimit, and renew a connection the server closes -- else the service figures it prints would read too good."""

import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from serve_load import raw_client, raw_requests  # noqa: E402

ANSWERS = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
]


def test_the_raw_client_counts_only_whole_200_answers_and_renews_closed_connections():
    sent = {"good": 0}

    async def scenario():
        turn = 0

        async def answer(reader, writer):
            nonlocal turn
            try:
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
                    await reader.readexactly(length)
                    reply = ANSWERS[turn % len(ANSWERS)]
                    turn += 1
                    sent["good"] += reply is ANSWERS[0]
                    writer.write(reply)
                    await writer.drain()
                    if b"Connection: close" in reply:
                        break
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            writer.close()

        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        base = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        latencies, errors = [], []
        async with server:
            await asyncio.wait_for(raw_client(base, raw_requests(base, "m", ["a text"]), time.perf_counter() + 0.3,
                                              latencies, errors), timeout=10)
        return latencies, errors

    latencies, errors = asyncio.run(scenario())
    assert sent["good"] >= 3 and len(latencies) == sent["good"]
    assert set(errors) == {"503", "ValueError"}
