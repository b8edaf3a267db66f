"""Frames between a worker and a layer host: a msgpack header plus raw tensor bytes.

Who uses it: ``runtime_patches.migration.transport`` (the worker's client) and
``runtime_patches.migration.host`` (the layer host's server) read and write every message
with ``send_message`` / ``recv_message``. Nothing here knows about SGLang.

Frame: an 8-byte big-endian header ``(header_len: u32, magic: u32)``, ``header_len`` bytes of
one msgpack map, then each tensor's bytes back to back in the order the header lists them. The
map carries the caller's fields plus ``"tensors": [[name, dtype, shape, nbytes], ...]``. Tensors
cross as their raw little-endian storage (bf16 included), so what arrives is bitwise what was
sent. A frame whose magic or sizes do not check out raises :class:`WireError`; the connection is
then unusable and the caller closes it.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

import msgpack
import torch

MAGIC = 0xBA7A1A7E
_PREFIX = struct.Struct("!II")
MAX_HEADER_BYTES = 64 << 20
MAX_TENSOR_BYTES = 16 << 30

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "float64": torch.float64, "int64": torch.int64, "int32": torch.int32, "int16": torch.int16,
    "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class WireError(ConnectionError):
    """The peer sent something that is not a frame; the connection must be closed."""


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _NAMES[dtype]
    except KeyError:
        raise ValueError(f"wire: dtype {dtype} cannot be sent") from None


def parse_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise WireError(f"wire: unknown dtype {name!r}") from None


def _as_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    return memoryview(flat.view(torch.uint8).numpy())


def send_message(sock: socket.socket, header: dict[str, Any],
                 tensors: dict[str, torch.Tensor] | None = None) -> int:
    """Send one frame; returns the bytes written (tensor payloads included)."""
    tensors = tensors or {}
    payloads = [(name, _as_bytes(t), t) for name, t in tensors.items()]
    meta = dict(header)
    meta["tensors"] = [[name, dtype_name(t.dtype), list(t.shape), len(buf)]
                       for name, buf, t in payloads]
    packed = msgpack.packb(meta, use_bin_type=True)
    sock.sendall(_PREFIX.pack(len(packed), MAGIC) + packed)
    total = _PREFIX.size + len(packed)
    for _, buf, _ in payloads:
        if len(buf):
            sock.sendall(buf)
        total += len(buf)
    return total


def _recv_exact(sock: socket.socket, nbytes: int) -> bytearray:
    buf = bytearray(nbytes)
    view = memoryview(buf)
    got = 0
    while got < nbytes:
        n = sock.recv_into(view[got:], nbytes - got)
        if n == 0:
            raise ConnectionResetError("wire: peer closed the connection mid-frame"
                                       if got else "wire: peer closed the connection")
        got += n
    return buf


def recv_message(sock: socket.socket) -> tuple[dict[str, Any], dict[str, torch.Tensor], int]:
    """Read one frame: (header without "tensors", tensors by name, bytes read)."""
    header_len, magic = _PREFIX.unpack(_recv_exact(sock, _PREFIX.size))
    if magic != MAGIC:
        raise WireError(f"wire: bad magic {magic:#x}: the peer is not a BanaServe layer host")
    if header_len > MAX_HEADER_BYTES:
        raise WireError(f"wire: header of {header_len} bytes is over the limit")
    try:
        meta = msgpack.unpackb(bytes(_recv_exact(sock, header_len)), raw=False,
                               strict_map_key=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise WireError(f"wire: the header is not msgpack: {exc}") from None
    if not isinstance(meta, dict):
        raise WireError("wire: the header is not a map")
    specs = meta.pop("tensors", [])
    total = _PREFIX.size + header_len
    tensors: dict[str, torch.Tensor] = {}
    for name, dtype, shape, nbytes in specs:
        if not 0 <= nbytes <= MAX_TENSOR_BYTES:
            raise WireError(f"wire: tensor {name!r} of {nbytes} bytes is over the limit")
        torch_dtype = parse_dtype(dtype)
        raw = _recv_exact(sock, nbytes)
        total += nbytes
        if nbytes == 0:
            tensors[name] = torch.empty(shape, dtype=torch_dtype)
            continue
        flat = torch.frombuffer(raw, dtype=torch.uint8).view(torch_dtype)
        if flat.numel() != _numel(shape):
            raise WireError(f"wire: tensor {name!r}: {nbytes} bytes do not make shape {shape}")
        tensors[name] = flat.reshape(shape)
    return meta, tensors, total


def _numel(shape: list[int]) -> int:
    n = 1
    for dim in shape:
        n *= int(dim)
    return n
