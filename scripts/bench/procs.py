"""Subprocesses for benchmarks: pinned start-up, readiness, CPU accounting, guaranteed clean-up.

``Fleet`` is a context manager owning every process a benchmark starts. Each one runs in its own
session (so a terminal Ctrl-C reaches only the benchmark, which then stops them in order), gets
SIGTERM from the kernel if the benchmark itself dies (PR_SET_PDEATHSIG, Linux), and logs to a
file whose tail is shown when it fails to come up.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from types import TracebackType

from runtime_patches.launch import free_port as launch_free_port

HOST = "127.0.0.1"
_PR_SET_PDEATHSIG = 1


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    """A port free to listen on now, outside the ephemeral range (``runtime_patches.launch``)."""
    return launch_free_port(HOST)


def can_pin() -> bool:
    return shutil.which("taskset") is not None and (os.cpu_count() or 1) > 1


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads) from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _die_with_parent() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def wait_http(url: str, timeout_s: float = 60.0,
              proc: subprocess.Popen[bytes] | None = None) -> None:
    """Poll ``url`` until it answers 200; fail early if ``proc`` exits meanwhile."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode} "
                               f"before {url} was ready")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout_s}s")


class Fleet:
    """Starts, pins and stops the benchmark's subprocesses; stops all of them on any exit."""

    def __init__(self, cwd: str, log_dir: str | None = None) -> None:
        """Logs go to ``log_dir`` (kept afterwards) or to a temporary folder (removed)."""
        self.cwd = cwd
        self._keep_logs = log_dir is not None
        if log_dir is not None:
            os.makedirs(log_dir, exist_ok=True)
        self.log_dir = log_dir or tempfile.mkdtemp(prefix="bench-logs-")
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str], cpu: int | None) -> subprocess.Popen[bytes]:
        """Start ``argv`` (under ``taskset -c cpu`` when pinning is possible)."""
        prefix = ["taskset", "-c", str(cpu)] if cpu is not None and can_pin() else []
        with open(self.log_path(name), "wb") as out:
            proc = subprocess.Popen(prefix + argv, cwd=self.cwd, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, preexec_fn=_die_with_parent)
        self.procs.append((name, proc))
        return proc

    def log_path(self, name: str) -> str:
        return os.path.join(self.log_dir, f"{name}.log")

    def log_tail(self, name: str, num_bytes: int = 2000) -> str:
        try:
            with open(self.log_path(name), "rb") as f:
                return f.read()[-num_bytes:].decode(errors="replace")
        except OSError:
            return ""

    def stop_all(self, grace_s: float = 5.0) -> None:
        """SIGTERM every process group (newest first), then SIGKILL what is left."""
        for _, proc in reversed(self.procs):
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for _, proc in reversed(self.procs):
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
        self.procs.clear()
        if not self._keep_logs:
            shutil.rmtree(self.log_dir, ignore_errors=True)

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None and not issubclass(exc_type, KeyboardInterrupt):
            for name, _ in self.procs:
                tail = self.log_tail(name).strip()
                if tail:
                    log(f"--- last output of {name} ---\n{tail}")
        self.stop_all()


def _signal_group(proc: subprocess.Popen[bytes], signum: int) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signum)  # start_new_session: the group id is the child's pid
    except ProcessLookupError:
        pass


def timed_generate(url: str, body: dict[str, object], timeout: float = 1800.0
                   ) -> tuple[float, dict[str, object]]:
    """POST ``body`` to a worker's ``/generate``; (wall seconds, the answer's ``meta_info``)."""
    import json

    req = urllib.request.Request(url + "/generate", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        out = json.loads(resp.read())
    return time.perf_counter() - started, out["meta_info"]
