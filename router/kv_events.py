"""The router's live view of every worker's KV cache: one SGLang KV-event stream per worker into
one ``KvIndex``.

Who calls what, and when:
- ``router/app.py`` builds one ``KvEvents`` (unless ``--no-kv-index``) and enters ``running()``
  in the app's cleanup context; a reconcile loop then follows the pool's membership: for each
  healthy worker without a stream it reads ``GET /get_server_info``; a worker started with a ZMQ
  ``--kv-events-config`` (``runtime_patches.launch`` sets one by default) gets a stream task, a
  worker without one is noted and asked again later; a worker that turns unhealthy loses its
  stream and its entries until it is back (a restart empties its cache), one that left the pool
  loses them for good (``KvIndex.forget``).
- A stream subscribes to the worker's publisher, first replays what the publisher still buffers
  from sequence 0 (so a router started late, or a second replica, starts from the worker's real
  cache, not from its own history), then applies live batches. ``SeqTracker`` decides per
  sequence number: apply, skip a duplicate, fill a gap from the replay socket, or treat a
  sequence that went backwards as a restarted worker (its entries are cleared first). A gap the
  replay cannot fill, or a malformed event, clears the worker: the index may miss a prefix but
  never claims one the worker dropped.
- Policies read ``index`` (``router.policy.kv_index``); ``/workers`` and ``/metrics`` read
  ``stats()``.

Wire format (SGLang 0.5.23, ``sglang/srt/disaggregation/kv_events.py``): PUB frames
``[topic, seq (8 bytes big-endian), msgpack([ts, [event, ...], dp_rank])]``, each event a map
tagged by ``type``; replay: send ``[b"", start_seq]`` on a DEALER to the ROUTER socket, receive
``[b"", topic, seq, payload]`` per buffered batch and ``[b"", b"", 2**64-1, b""]`` at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import msgpack
import zmq
import zmq.asyncio

from router.policy.kv_index import KvIndex
from router.workers import WorkerPool

log = logging.getLogger(__name__)

END_SEQ = 2**64 - 1
REPLAY_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Source:
    """Where one worker publishes (from its ``kv_events_config``, wildcard host made concrete)."""

    endpoint: str
    replay_endpoint: str | None
    topic: str

    @staticmethod
    def from_server_info(worker_url: str, info: dict[str, Any]) -> Source | None:
        """None when the worker publishes no ZMQ KV events. Raises ``ValueError`` for a config
        it cannot read."""
        raw = info.get("kv_events_config")
        if not raw:
            return None
        cfg = json.loads(raw) if isinstance(raw, str) else raw
        if not isinstance(cfg, dict) or cfg.get("publisher") != "zmq":
            return None
        host = urlsplit(worker_url).hostname or "127.0.0.1"

        def concrete(endpoint: Any) -> str | None:
            if not endpoint:
                return None
            if not isinstance(endpoint, str) or not endpoint.startswith("tcp://"):
                raise ValueError(f"kv_events_config endpoint {endpoint!r} is not tcp://HOST:PORT")
            where, _, port = endpoint[len("tcp://"):].rpartition(":")
            if where in ("*", "0.0.0.0", "::", "[::]", ""):
                where = host
            return f"tcp://{where}:{int(port)}"

        endpoint = concrete(cfg.get("endpoint", "tcp://*:5557"))
        assert endpoint is not None
        return Source(endpoint, concrete(cfg.get("replay_endpoint")), str(cfg.get("topic", "")))


class SeqTracker:
    """Per-stream sequence bookkeeping (pure). ``next_seq``: the next batch the index needs."""

    def __init__(self) -> None:
        self.next_seq = 0
        self.last_live: int | None = None
        """The last sequence received live (the PUB stream only goes up, unless restarted)."""

    def classify(self, seq: int) -> str:
        """For a live batch: ``apply``; ``dup`` (a replay applied it already); ``gap`` (fill
        ``[next_seq, seq)`` from the replay socket first); ``restart`` (the live stream went
        backwards: the publisher started over, so clear and replay from 0)."""
        restarted = self.last_live is not None and seq <= self.last_live
        self.last_live = seq
        if restarted:
            return "restart"
        if seq == self.next_seq:
            return "apply"
        return "gap" if seq > self.next_seq else "dup"

    def applied(self, seq: int) -> None:
        self.next_seq = seq + 1

    def reset(self) -> None:
        """After a restart: everything from sequence 0 is needed again."""
        self.next_seq = 0


@dataclass
class StreamStats:
    source: str = ""
    num_batches: int = 0
    num_replayed: int = 0
    num_resets: int = 0
    num_restarts: int = 0
    last_error: str | None = None


class KvEvents:
    """Owns the index and the streams; see the module docstring."""

    def __init__(self, pool: WorkerPool, index: KvIndex | None = None,
                 reconcile_interval_s: float = 1.0) -> None:
        self.index = index or KvIndex()
        self._pool = pool
        self._interval = reconcile_interval_s
        self._ctx = zmq.asyncio.Context()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._without: set[str] = set()
        self._stats: dict[str, StreamStats] = {}

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per worker: the stream's counters and the index's (``/workers``, ``/metrics``)."""
        out = {}
        for url in self._pool.urls:
            s = self._stats.get(url)
            idx = self.index.stats(url)
            out[url] = {"streaming": url in self._tasks and not self._tasks[url].done(),
                        "source": s.source if s else None,
                        "num_blocks": idx.num_blocks, "num_events": idx.num_events,
                        "num_orphans": idx.num_orphans, "num_batches": s.num_batches if s else 0,
                        "num_replayed": s.num_replayed if s else 0,
                        "num_resets": s.num_resets if s else 0,
                        "num_restarts": s.num_restarts if s else 0,
                        "last_error": s.last_error if s else None}
        return out

    @contextlib.asynccontextmanager
    async def running(self, session: aiohttp.ClientSession) -> AsyncIterator[None]:
        loop = asyncio.create_task(self._reconcile_loop(session), name="kv-events-reconcile")
        try:
            yield
        finally:
            loop.cancel()
            for task in [loop, *self._tasks.values()]:
                task.cancel()
            await asyncio.gather(loop, *self._tasks.values(), return_exceptions=True)
            self._ctx.destroy(linger=0)

    async def _reconcile_loop(self, session: aiohttp.ClientSession) -> None:
        while True:
            try:
                await self._reconcile(session)
            except Exception:  # one bad answer must not end the loop; logged, retried
                log.exception("kv events: reconcile failed")
            await asyncio.sleep(self._interval)

    async def _reconcile(self, session: aiohttp.ClientSession) -> None:
        members = set(self._pool.urls)
        for url in [u for u in self._tasks if u not in members]:
            self._tasks.pop(url).cancel()
            self.index.forget(url)
            self._stats.pop(url, None)
        for view in self._pool.snapshot():
            task = self._tasks.get(view.url)
            if not view.healthy:
                # down (or restarting): not a candidate, and its cache is gone or going; a
                # fresh stream re-reads it once the worker is back
                if task is not None:
                    self._tasks.pop(view.url).cancel()
                    self.index.clear(view.url, count=False)
                continue
            if task is not None and not task.done():
                continue
            async with session.get(view.url + "/get_server_info",
                                   timeout=aiohttp.ClientTimeout(total=5)) as resp:
                if resp.status != 200:
                    continue
                info = await resp.json(content_type=None)
            source = Source.from_server_info(view.url, info)
            if source is None:
                if view.url not in self._without:
                    log.info("kv events: %s publishes none (no ZMQ --kv-events-config); its "
                             "cache is not indexed", view.url)
                    self._without.add(view.url)
                continue
            self._without.discard(view.url)
            self._stats.setdefault(view.url, StreamStats()).source = source.endpoint
            self._tasks[view.url] = asyncio.create_task(self._guarded(view.url, source),
                                                        name=f"kv-events {view.url}")

    async def _guarded(self, url: str, source: Source) -> None:
        """``_stream`` until cancelled; a failure clears the worker and the reconcile loop starts
        a fresh stream."""
        try:
            await self._stream(url, source)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # zmq or protocol failure: logged, counted, restarted
            self._reset(url, self._stats[url], f"stream failed: {exc!r}")

    async def _stream(self, url: str, source: Source) -> None:
        stats = self._stats[url]
        seqs = SeqTracker()
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.connect(source.endpoint)
        sub.setsockopt(zmq.SUBSCRIBE, source.topic.encode())
        try:
            self.index.clear(url, count=False)
            await self._catch_up(url, source, seqs, stats)
            while True:
                _topic, seq_bytes, payload = await sub.recv_multipart()
                seq = int.from_bytes(seq_bytes, "big")
                kind = seqs.classify(seq)
                if kind == "dup":
                    continue
                if kind == "restart":
                    log.info("kv events: %s started over (seq %d after %d); re-reading its "
                             "cache", url, seq, seqs.next_seq - 1)
                    stats.num_restarts += 1
                    self.index.clear(url, count=False)
                    seqs.reset()
                if kind in ("gap", "restart"):
                    await self._catch_up(url, source, seqs, stats, until=seq)
                    if seq > seqs.next_seq:  # the publisher no longer buffers the gap
                        self._reset(url, stats, f"events {seqs.next_seq}..{seq - 1} lost")
                self._apply(url, payload, stats)
                seqs.applied(seq)
        finally:
            sub.close(linger=0)

    async def _catch_up(self, url: str, source: Source, seqs: SeqTracker, stats: StreamStats,
                        until: int | None = None) -> None:
        """Apply buffered batches from ``seqs.next_seq`` (all the publisher has, or those below
        ``until``); a hole at the start (already dropped from its buffer) resets the worker."""
        if source.replay_endpoint is None:
            return
        req = self._ctx.socket(zmq.DEALER)
        req.setsockopt(zmq.LINGER, 0)
        req.connect(source.replay_endpoint)
        try:
            await req.send_multipart([b"", seqs.next_seq.to_bytes(8, "big")])
            while True:
                if not await req.poll(REPLAY_TIMEOUT_S * 1000):
                    log.warning("kv events: %s replay timed out", url)
                    return
                frames = await req.recv_multipart()
                seq = int.from_bytes(frames[2], "big") if len(frames) >= 4 else END_SEQ
                if seq == END_SEQ:
                    return
                if seq < seqs.next_seq or (until is not None and seq >= until):
                    continue
                if seq > seqs.next_seq:
                    self._reset(url, stats, f"replay starts at {seq}, needed {seqs.next_seq}")
                self._apply(url, frames[3], stats)
                seqs.applied(seq)
                stats.num_replayed += 1
        finally:
            req.close(linger=0)

    def _apply(self, url: str, payload: bytes, stats: StreamStats) -> None:
        stats.num_batches += 1
        try:
            batch = msgpack.unpackb(payload, raw=False, strict_map_key=False)
            events = batch[1]
            if not isinstance(events, list):
                raise ValueError("a KV event batch is [ts, [event, ...], dp_rank]")
            for event in events:
                if not isinstance(event, dict):
                    raise ValueError(f"a KV event is a map, got {type(event).__name__}")
                self.index.apply(url, event)
        except (ValueError, TypeError, IndexError, msgpack.UnpackException) as exc:
            self._reset(url, stats, f"bad event batch: {exc}")

    def _reset(self, url: str, stats: StreamStats, why: str) -> None:
        log.warning("kv events: %s: %s; forgetting its indexed cache", url, why)
        stats.num_resets += 1
        stats.last_error = why
        self.index.clear(url)
