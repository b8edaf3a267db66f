"""A fast fake SGLang worker for router benchmarks: raw asyncio protocol, keep-alive HTTP/1.1.

``python -m scripts.bench.fast_upstream PORT`` answers the endpoints routers probe (/health,
/model_info, /v1/models, /v1/loads, ...) and POSTs with a fixed ~300-byte chat completion, or,
when the body asks for ``"stream": true``, 20 SSE events plus ``data: [DONE]`` (chunked).
Request bodies may come with Content-Length or chunked transfer-encoding (SMG streams bodies
chunked under ``--disable-retries``); pipelined requests are answered in order, and a request
with ``Connection: close`` (or HTTP/1.0) gets its answer and then the connection closes.
It is fast enough (tens of thousands of requests/s on one core) that the router is the bottleneck.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

MODEL = "bench-model"
_JSON = {
    "/health": b"",
    "/model_info": json.dumps({"served_model_name": MODEL, "model_path": "/nonexistent",
                               "tokenizer_path": None, "is_generation": True}).encode(),
    "/v1/models": json.dumps({"object": "list", "data": [
        {"id": MODEL, "object": "model", "owned_by": "bench", "max_model_len": 4096}]}).encode(),
    "/v1/loads": json.dumps({"loads": [{
        "num_running_reqs": 0, "num_waiting_reqs": 0, "num_waiting_uncached_tokens": 0,
        "token_usage": 0.0, "max_running_requests": 8, "max_total_num_tokens": 4096,
        "gen_throughput": 0.0}]}).encode(),
    "/server_info": json.dumps({"model_path": "/nonexistent", "version": "0.5.23"}).encode(),
    "/get_server_info": json.dumps({"model_path": "/nonexistent"}).encode(),
    "/version": json.dumps({"version": "0.5.23"}).encode(),
    "/get_model_info": json.dumps({"model_path": "/nonexistent", "is_generation": True}).encode(),
}
_JSON["/loads"] = _JSON["/v1/loads"]
COMPLETION = json.dumps({
    "id": "cmpl-bench", "object": "chat.completion", "created": 0, "model": MODEL,
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello there"},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}).encode()


def _response(body: bytes, content_type: bytes = b"application/json") -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: " + content_type + b"\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body)


def _sse_response(num_events: int = 20) -> bytes:
    out = [b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
           b"Transfer-Encoding: chunked\r\n\r\n"]
    for i in range(num_events):
        event = b'data: {"object":"chat.completion.chunk","choices":[{"delta":{"content":"t'
        event += str(i).encode() + b'"}}]}\n\n'
        out.append(b"%x\r\n%s\r\n" % (len(event), event))
    done = b"data: [DONE]\n\n"
    out.append(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
    return b"".join(out)


GET_RESPONSES = {path: _response(body) for path, body in _JSON.items()}
POST_JSON = _response(COMPLETION)
POST_SSE = _sse_response()
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"


def parse_chunked(buf: bytes, pos: int) -> tuple[bytes, int] | None:
    """Decode a chunked body that starts at ``pos``: (body, offset after it), None if partial."""
    parts = []
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(buf[pos:eol].split(b";")[0], 16)  # chunk extensions are ignored
        pos = eol + 2
        if size == 0:  # optional trailer lines, then an empty line
            end = buf.find(b"\r\n\r\n", pos - 2)
            return None if end < 0 else (b"".join(parts), end + 4)
        if len(buf) < pos + size + 2:
            return None
        parts.append(buf[pos:pos + size])
        pos += size + 2


def parse_request(buf: bytes) -> tuple[str, str, bytes, bool, int] | None:
    """One complete request at the start of ``buf``: (method, path, body, close, consumed)."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = buf[:end].decode("latin-1").split("\r\n")
    method, path = lines[0].split(" ")[:2]
    headers = {k.strip().lower(): v.strip().lower() for k, _, v in
               (line.partition(":") for line in lines[1:])}
    if "chunked" in headers.get("transfer-encoding", ""):
        parsed = parse_chunked(buf, end + 4)
        if parsed is None:
            return None
        body, consumed = parsed
    else:
        consumed = end + 4 + int(headers.get("content-length", "0"))
        if len(buf) < consumed:
            return None
        body = buf[end + 4:consumed]
    close = headers.get("connection") == "close" or lines[0].endswith("HTTP/1.0")
    return method, path, body, close, consumed


def respond(method: str, path: str, body: bytes) -> bytes:
    if method == "POST":
        stream = b'"stream": true' in body or b'"stream":true' in body
        return POST_SSE if stream else POST_JSON
    return GET_RESPONSES.get(path.split("?")[0], NOT_FOUND)


class UpstreamProtocol(asyncio.Protocol):
    """Keep-alive HTTP/1.1; pipelined requests are answered in order."""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport  # uvloop's transports do not subclass asyncio.Transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.buffer:
            request = parse_request(self.buffer)
            if request is None:
                return
            method, path, body, close, consumed = request
            self.buffer = self.buffer[consumed:]
            self.transport.write(respond(method, path, body))
            if close:
                self.transport.close()
                return


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(UpstreamProtocol, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(int(sys.argv[1])))


if __name__ == "__main__":
    main()
