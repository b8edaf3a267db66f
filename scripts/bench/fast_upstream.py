"""A fast fake SGLang worker for router benchmarks: raw asyncio protocol, keep-alive HTTP/1.1.

``python -m scripts.bench.fast_upstream PORT`` answers the endpoints routers probe (/health,
/model_info, /v1/models, /v1/loads, ...) and POSTs with a fixed ~300-byte chat completion, or,
when the body asks for ``"stream": true``, 20 SSE events plus ``data: [DONE]`` (chunked).
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


class UpstreamProtocol(asyncio.Protocol):
    def connection_made(self, transport: Any) -> None:
        self.transport = transport  # uvloop's transports do not subclass asyncio.Transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self._answer_one():
            pass

    def _answer_one(self) -> bool:
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return False
        head = self.buffer[:end].decode("latin-1")
        lines = head.split("\r\n")
        method, path = lines[0].split(" ")[:2]
        headers = {k.strip().lower(): v.strip() for k, _, v in
                   (line.partition(":") for line in lines[1:])}
        body_start = end + 4
        if headers.get("transfer-encoding", "").lower() == "chunked":
            stop = self.buffer.find(b"\r\n0\r\n\r\n", body_start - 2)
            if stop < 0:
                return False
            body, consumed = self.buffer[body_start:stop], stop + 7
        else:
            length = int(headers.get("content-length", "0"))
            if len(self.buffer) < body_start + length:
                return False
            body, consumed = self.buffer[body_start:body_start + length], body_start + length
        self.buffer = self.buffer[consumed:]
        if method == "POST":
            stream = b'"stream": true' in body or b'"stream":true' in body
            self.transport.write(POST_SSE if stream else POST_JSON)
        else:
            self.transport.write(GET_RESPONSES.get(path.split("?")[0], NOT_FOUND))
        return True


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
