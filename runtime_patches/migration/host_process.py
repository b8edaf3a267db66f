"""Start and stop a layer host process (``python -m runtime_patches layer-host``).

Used by the launcher (``--layer-host-port``: a host beside the worker, on the worker's cores),
``scripts/serve_local.sh`` and the tests. The host needs the CPU engine's environment like a
worker (``SGLANG_USE_CPU_ENGINE=1`` before Python starts, for the ``sgl_kernel`` stand-in).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import IO

from runtime_patches.migration.transport import LayerHostLost, TcpTransport


def _die_with_parent() -> None:
    """Linux: SIGTERM the host when the thread that started it exits, however it ends (start
    hosts from a thread that lives as long as they should)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class LayerHostStartError(RuntimeError):
    """The layer host exited or did not answer ``hello`` in time."""


@dataclass(frozen=True)
class LayerHostConfig:
    """One layer host process."""

    port: int
    """TCP port the host listens on."""
    host: str = "127.0.0.1"
    """Interface it listens on."""
    cpus: list[int] | None = None
    """Cores it is pinned to (a worker's cores, to share its device); None: not pinned."""
    threads: int | None = None
    """torch threads; default: one per pinned core, else torch's default."""
    device: str = "cpu"
    """``cpu`` (the CPU engine's environment) or ``cuda``."""
    warm_model: str | None = None
    """A model folder to initialise SGLang's runtime from at start (the first migration then
    does not wait for it); None: at the first migration."""
    warm_dtype: str | None = None
    """The dtype to warm up in (the workers' served dtype); None: the launcher's choice on this
    machine (``runtime_patches.cpu_dtype``)."""

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"LayerHostConfig.port: {self.port} is not a TCP port")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"LayerHostConfig.threads: must be >= 1, got {self.threads}")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class LayerHostProcess:
    """Owns one layer host process."""

    def __init__(self, cfg: LayerHostConfig, log_path: str | None = None) -> None:
        self.cfg = cfg
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def address(self) -> str:
        return self.cfg.address

    def start(self) -> None:
        cfg = self.cfg
        threads = cfg.threads or (len(cfg.cpus) if cfg.cpus else None)
        argv = [sys.executable, "-m", "runtime_patches", "layer-host", "--host", cfg.host,
                "--port", str(cfg.port)]
        if threads:
            argv += ["--threads", str(threads)]
        if cfg.warm_model:
            argv += ["--warm-model", cfg.warm_model]
            if cfg.warm_dtype:
                argv += ["--warm-dtype", cfg.warm_dtype]
        env = dict(os.environ)
        if cfg.device == "cpu":
            env["SGLANG_USE_CPU_ENGINE"] = "1"
            if threads:
                env["OMP_NUM_THREADS"] = str(threads)
        if self.log_path:
            os.makedirs(os.path.dirname(os.path.abspath(self.log_path)), exist_ok=True)
            self._log = open(self.log_path, "wb")
        cores = cfg.cpus

        def prepare_child() -> None:
            _die_with_parent()
            if cores:
                os.sched_setaffinity(0, cores)

        self._proc = subprocess.Popen(
            argv, env=env, stdout=self._log, stderr=subprocess.STDOUT if self._log else None,
            stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=prepare_child)

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                raise LayerHostStartError(f"layer host {self.address} exited"
                                          f"{self._log_hint()}")
            try:
                transport = TcpTransport(self.address, connect_timeout=1.0, call_timeout=5.0)
                transport.call("hello")
                transport.close()
                return
            except LayerHostLost:
                time.sleep(0.3)
        raise LayerHostStartError(f"layer host {self.address} not ready after {timeout_s:.0f} s"
                                  f"{self._log_hint()}")

    def _log_hint(self) -> str:
        if not self.log_path or not os.path.exists(self.log_path):
            return ""
        with open(self.log_path, "rb") as f:
            lines = f.read()[-3000:].decode(errors="replace").strip().splitlines()
        return f" (log {self.log_path}: {lines[-1][:300] if lines else ''})"

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def kill(self) -> None:
        """SIGKILL (failure tests)."""
        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
