"""A lean closed-loop HTTP/1.1 load generator on raw asyncio streams (keep-alive).

aiohttp's client costs more CPU per request than the routers under test, so this one sends
precomputed request bytes and parses only what it must: the status line, Content-Length or the
end of a chunked body.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass


def request_bytes(host: str, port: int, path: str, body: dict[str, object]) -> bytes:
    payload = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @staticmethod
    async def open(host: str, port: int) -> Connection:
        reader, writer = await asyncio.open_connection(host, port)
        return Connection(reader, writer)

    async def exchange(self, request: bytes) -> int:
        """Send one request and read the whole response; return the HTTP status."""
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        lower = head.lower()
        marker = lower.find(b"content-length:")
        if marker >= 0:
            end = lower.find(b"\r\n", marker)
            await self.reader.readexactly(int(head[marker + 15:end]))
        elif b"transfer-encoding: chunked" in lower:
            await self._read_chunked()
        return status

    async def _read_chunked(self) -> None:
        while True:
            size_line = await self.reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            await self.reader.readexactly(size + 2)
            if size == 0:
                return

    def close(self) -> None:
        self.writer.close()


@dataclass
class LoadResult:
    completed: int
    errors: int
    seconds: float
    latencies_s: list[float]

    @property
    def rate(self) -> float:
        return self.completed / self.seconds if self.seconds else 0.0


async def sequential(host: str, port: int, request: bytes, count: int) -> list[float]:
    """Concurrency 1: ``count`` requests back to back on one connection; per-request latency."""
    conn = await Connection.open(host, port)
    latencies = []
    try:
        for _ in range(count):
            started = time.perf_counter()
            status = await conn.exchange(request)
            latencies.append(time.perf_counter() - started)
            if status != 200:
                raise RuntimeError(f"{host}:{port} answered {status}")
    finally:
        conn.close()
    return latencies


async def closed_loop(host: str, port: int, request: bytes, concurrency: int,
                      seconds: float) -> LoadResult:
    """``concurrency`` connections each sending requests back to back for ``seconds``."""
    conns = [await Connection.open(host, port) for _ in range(concurrency)]
    deadline = time.perf_counter() + seconds
    completed = errors = 0
    latencies: list[float] = []

    async def worker(conn: Connection) -> None:
        nonlocal completed, errors
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            status = await conn.exchange(request)
            if status == 200:
                completed += 1
                latencies.append(time.perf_counter() - started)
            else:
                errors += 1

    started = time.perf_counter()
    try:
        await asyncio.gather(*(worker(c) for c in conns))
    finally:
        for conn in conns:
            conn.close()
    return LoadResult(completed, errors, time.perf_counter() - started, latencies)
