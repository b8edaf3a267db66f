"""A minimal SSE client on http.client, so tests control the socket (read some, hang up)."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse


class SSEStream:
    def __init__(self, url: str, path: str, body: dict[str, Any], timeout: float = 120.0):
        parsed = urlparse(url)
        self.conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=timeout)
        self.conn.request("POST", path, body=json.dumps(body),
                          headers={"Content-Type": "application/json"})
        self.response = self.conn.getresponse()
        self.status = self.response.status
        self.headers = dict(self.response.getheaders())

    def events(self) -> Iterator[str]:
        """Yield each ``data:`` payload as text until the stream ends."""
        for raw in self.response:
            line = raw.decode().strip()
            if line.startswith("data:"):
                yield line[len("data:"):].strip()

    def hang_up(self) -> None:
        assert self.conn.sock is not None
        self.conn.sock.close()
        self.conn.close()

    def close(self) -> None:
        self.conn.close()


def collect(url: str, path: str, body: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
    stream = SSEStream(url, path, body)
    assert stream.status == 200, stream.response.read()
    try:
        return list(stream.events()), stream.headers
    finally:
        stream.close()
