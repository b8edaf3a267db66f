"""A lean closed-loop HTTP/1.1 load generator on raw asyncio streams (keep-alive).

aiohttp's client costs more CPU per request than the routers under test, so this one sends
precomputed request bytes and parses only what it must: the status line, then the body by
Content-Length, by chunked transfer-encoding, or up to EOF when the response has neither. A
streamed (SSE) response counts as complete only once ``data: [DONE]`` has been read. Failed
requests (non-200, missing [DONE], dropped connection) are counted and the connection reopened.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

DONE = b"data: [DONE]"


def request_bytes(host: str, port: int, path: str, body: dict[str, object]) -> bytes:
    payload = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload


class Connection:
    """One keep-alive connection; ``exchange`` sends a request and reads its whole response."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def exchange(self, request: bytes, expect_done: bool = False) -> bool:
        """True when the answer was a 200 (and, if ``expect_done``, ended the SSE stream)."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lower = head.lower()
        marker = lower.find(b"\r\ncontent-length:")
        if marker >= 0:
            end = lower.find(b"\r\n", marker + 2)
            tail = await self.reader.readexactly(int(head[marker + 17:end]))
        elif b"\r\ntransfer-encoding: chunked" in lower:
            tail = await self._read_chunked()
        else:  # delimited by the server closing the connection
            tail = await self.reader.read()
            self.close()
        if b"\r\nconnection: close" in lower:
            self.close()
        return head[9:12] == b"200" and (not expect_done or DONE in tail)

    async def _read_chunked(self) -> bytes:
        """Read a chunked body; return its last bytes (enough to hold ``data: [DONE]``)."""
        assert self.reader is not None
        tail = b""
        while True:
            size_line = await self.reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                await self._trailers()
                return tail
            tail = (tail + (await self.reader.readexactly(size + 2))[:-2])[-64:]

    async def _trailers(self) -> None:
        assert self.reader is not None
        while await self.reader.readuntil(b"\r\n") != b"\r\n":
            pass

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


@dataclass
class LoadResult:
    completed: int
    errors: int
    seconds: float
    client_cpu_s: float
    latencies_s: list[float]

    @property
    def rate(self) -> float:
        return self.completed / self.seconds if self.seconds else 0.0


async def sequential(host: str, port: int, request: bytes, count: int) -> list[float]:
    """Concurrency 1: ``count`` requests back to back on one connection; per-request latency."""
    conn = Connection(host, port)
    latencies = []
    try:
        for _ in range(count):
            started = time.perf_counter()
            ok = await conn.exchange(request)
            latencies.append(time.perf_counter() - started)
            if not ok:
                raise RuntimeError(f"{host}:{port} did not answer 200")
    finally:
        conn.close()
    return latencies


async def closed_loop(host: str, port: int, request: bytes, concurrency: int, seconds: float,
                      expect_done: bool = False) -> LoadResult:
    """``concurrency`` connections each sending requests back to back for ``seconds``.

    Requests in flight at the deadline are finished and counted; ``seconds`` in the result is
    the wall time until the last of them ended.
    """
    conns = [Connection(host, port) for _ in range(concurrency)]
    completed = errors = 0
    latencies: list[float] = []

    async def worker(conn: Connection) -> None:
        nonlocal completed, errors
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            try:
                ok = await conn.exchange(request, expect_done)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
                conn.close()
                ok = False
            if ok:
                completed += 1
                latencies.append(time.perf_counter() - started)
            else:
                errors += 1

    cpu_started, started = time.process_time(), time.perf_counter()
    deadline = started + seconds
    try:
        await asyncio.gather(*(worker(c) for c in conns))
    finally:
        for conn in conns:
            conn.close()
    return LoadResult(completed, errors, time.perf_counter() - started,
                      time.process_time() - cpu_started, latencies)
