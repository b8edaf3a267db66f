"""Run a cluster plan on bare-metal nodes over SSH: up, status, down, logs.

Who calls: ``scripts.launch_cluster`` (the CLI). No state is kept on the launching machine: each
unit's pid file and log live on its node under ``spec.log_dir``, and every command asks the node.
A running unit's process carries ``BANASERVE_UNIT=<cluster>/<unit>`` in its environment, so a
stale pid file (a reused pid) is never mistaken for the unit.

- ``up`` starts the stages in order (``plan.STAGES``), waiting until every unit of a stage
  answers its ready URL (fetched on its own node) before the next; a unit already running is
  left alone (``up`` twice is harmless). If a unit dies or is not ready in time, ``up`` prints
  its log's tail, stops what this call started, and fails.
- ``status`` prints one line per unit: running (pid) and ready, or down.
- ``down`` sends SIGTERM to each unit's process group (router first, Mooncake master last),
  waits up to ``stop_timeout_s``, then SIGKILL; a unit not running is skipped.
- ``logs`` prints the tail of units' logs.

``dry_run`` prints every ssh command and the script it would send, and runs nothing.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from scripts.cluster.plan import STAGES, Unit
from scripts.cluster.spec import ClusterSpec, Node


class LaunchError(RuntimeError):
    """A unit could not be started, died, or did not become ready."""


@dataclass(frozen=True)
class SSHOptions:
    connect_timeout_s: float = 10.0
    """ssh's ConnectTimeout."""
    ready_timeout_s: float = 1800.0
    """How long ``up`` waits for one stage to be ready."""
    stop_timeout_s: float = 30.0
    """How long ``down`` waits after SIGTERM before SIGKILL."""
    poll_s: float = 1.0
    """Ready-check interval."""
    strict_host_keys: bool = False
    """``StrictHostKeyChecking=yes``; off: accept new host keys (first contact)."""
    dry_run: bool = False
    """Print every command instead of running it."""


def ssh_argv(node: Node, opts: SSHOptions) -> list[str]:
    """The ssh command that runs ``bash -s`` on ``node`` (the script comes on stdin)."""
    argv = ["ssh"]
    for option in node.ssh_options:  # ssh keeps the first value it sees: the node's win
        argv += ["-o", option]
    argv += ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={int(opts.connect_timeout_s)}",
            "-o", "StrictHostKeyChecking=" + ("yes" if opts.strict_host_keys else "accept-new"),
            "-o", "LogLevel=ERROR", "-p", str(node.port)]
    if node.ssh_key:
        argv += ["-i", node.ssh_key]
    if node.user:
        argv += ["-l", node.user]
    return [*argv, node.address, "bash", "-s"]


# -- the scripts each node runs (pure: tested without ssh) -----------------------------------

def _paths(spec: ClusterSpec, unit: Unit) -> tuple[str, str, str]:
    base = f"{spec.log_dir}/{unit.name}"
    return base + ".pid", base + ".log", f"{spec.name}/{unit.name}"


_ALIVE = """alive() {{ [ -f {pid} ] && p=$(cat {pid}) && kill -0 "$p" 2>/dev/null \
&& tr '\\0' '\\n' < /proc/$p/environ 2>/dev/null | grep -qx 'BANASERVE_UNIT={tag}'; }}
"""


def start_script(spec: ClusterSpec, unit: Unit) -> str:
    """Start ``unit`` unless it runs; prints ``started PID`` or ``running PID``."""
    pid, log, tag = _paths(spec, unit)
    q = shlex.quote
    env = " ".join(f"{k}={q(v)}" for k, v in (*unit.env, ("BANASERVE_UNIT", tag)))
    cmd = " ".join(q(a) for a in unit.argv)
    return (f"set -e\nmkdir -p {q(spec.log_dir)}\ncd {q(spec.workdir)}\n"
            + _ALIVE.format(pid=q(pid), tag=tag)
            + f"if alive; then echo \"running $(cat {q(pid)})\"; exit 0; fi\n"
            f"env {env} nohup setsid {cmd} > {q(log)} 2>&1 < /dev/null &\n"
            f"echo $! > {q(pid)}\necho \"started $!\"\n")


def probe_script(spec: ClusterSpec, unit: Unit) -> str:
    """Prints ``down``, ``running PID`` or ``ready PID`` (ready: its ready URL answered 200)."""
    pid, _, tag = _paths(spec, unit)
    q = shlex.quote
    script = _ALIVE.format(pid=q(pid), tag=tag) + "if ! alive; then echo down; exit 0; fi\n"
    if unit.ready_url is None:
        return script + f"echo \"ready $(cat {q(pid)})\"\n"
    fetch = (f"{q(spec.python_path())} -c 'import sys, urllib.request; "
             f"urllib.request.urlopen(sys.argv[1], timeout=5)' {q(unit.ready_url)}")
    return script + (f"if {fetch} >/dev/null 2>&1; then echo \"ready $(cat {q(pid)})\"; "
                     f"else echo \"running $(cat {q(pid)})\"; fi\n")


def stop_script(spec: ClusterSpec, unit: Unit, timeout_s: float) -> str:
    """SIGTERM the unit's process group, SIGKILL after ``timeout_s``; prints what it did."""
    pid, _, tag = _paths(spec, unit)
    q = shlex.quote
    steps = max(1, int(timeout_s * 5))
    return (_ALIVE.format(pid=q(pid), tag=tag)
            + f"if ! alive; then rm -f {q(pid)}; echo 'not running'; exit 0; fi\n"
            f"p=$(cat {q(pid)}); kill -TERM -- -$p 2>/dev/null || kill -TERM $p\n"
            f"for i in $(seq {steps}); do kill -0 $p 2>/dev/null || break; sleep 0.2; done\n"
            f"if kill -0 $p 2>/dev/null; then kill -KILL -- -$p 2>/dev/null; "
            f"echo \"killed $p\"; else echo \"stopped $p\"; fi\n"
            f"rm -f {q(pid)}\n")


def logs_script(spec: ClusterSpec, unit: Unit, lines: int) -> str:
    _, log, _ = _paths(spec, unit)
    return f"tail -n {int(lines)} {shlex.quote(log)} 2>/dev/null || echo '(no log yet)'\n"


# -- running them -------------------------------------------------------------------------------

Say = Callable[[str], None]


def _say(line: str) -> None:
    print(line, flush=True)


class SSHCluster:
    """Runs ``units`` of ``spec`` on their nodes; holds no state between calls."""

    def __init__(self, spec: ClusterSpec, units: Sequence[Unit], opts: SSHOptions,
                 say: Say = _say) -> None:
        self.spec, self.units, self.opts, self.say = spec, list(units), opts, say

    def run(self, unit: Unit, script: str, timeout_s: float = 60.0) -> str:
        """Run ``script`` on ``unit``'s node; its stdout (``LaunchError`` if ssh fails)."""
        argv = ssh_argv(self.spec.node(unit.node), self.opts)
        if self.opts.dry_run:
            self.say(f"# {unit.node}: {shlex.join(argv)} <<'EOF'\n{script}EOF")
            return ""
        try:
            done = subprocess.run(argv, input=script, capture_output=True, text=True,
                                  timeout=timeout_s)
        except subprocess.TimeoutExpired as e:
            raise LaunchError(f"{unit.name}: ssh to {unit.node} timed out after "
                              f"{timeout_s:.0f} s") from e
        if done.returncode != 0:
            why = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
            raise LaunchError(f"{unit.name}: on {unit.node}: {why}")
        return done.stdout.strip()

    def probe(self, unit: Unit) -> str:
        return self.run(unit, probe_script(self.spec, unit)) or "down"

    # up ----------------------------------------------------------------------------------------
    def up(self) -> None:
        started: list[Unit] = []
        try:
            for stage, name in enumerate(STAGES):
                units = [u for u in self.units if u.stage == stage]
                if not units:
                    continue
                for u in units:
                    out = self.run(u, start_script(self.spec, u))
                    if out.startswith("started"):
                        started.append(u)
                    self.say(f"{u.name} on {u.node}: {out or 'would start'}")
                if not self.opts.dry_run:
                    self._wait_ready(name, units)
        except (LaunchError, KeyboardInterrupt):
            if started and not self.opts.dry_run:
                self.say(f"stopping the {len(started)} units this call started")
                self._stop(started)
            raise

    def _wait_ready(self, stage: str, units: list[Unit]) -> None:
        began = time.monotonic()
        pending = list(units)
        with ThreadPoolExecutor(max_workers=min(16, len(units))) as pool:
            while pending:
                states = list(pool.map(self.probe, pending))
                for u, state in zip(list(pending), states, strict=True):
                    if state == "down":
                        raise LaunchError(f"{u.name} on {u.node} exited:\n"
                                          + self.run(u, logs_script(self.spec, u, 15)))
                    if state.startswith("ready"):
                        pending.remove(u)
                        self.say(f"{u.name} ready ({time.monotonic() - began:.0f} s)")
                if pending and time.monotonic() - began > self.opts.ready_timeout_s:
                    names = ", ".join(u.name for u in pending)
                    raise LaunchError(f"stage {stage}: {names} not ready after "
                                      f"{self.opts.ready_timeout_s:.0f} s")
                if pending:
                    time.sleep(self.opts.poll_s)

    # status / down / logs ------------------------------------------------------------------------
    def status(self) -> dict[str, str]:
        """Unit name -> ``down`` / ``running PID`` / ``ready PID``; prints a line each."""
        with ThreadPoolExecutor(max_workers=min(16, len(self.units))) as pool:
            states = list(pool.map(self.probe, self.units))
        for u, state in zip(self.units, states, strict=True):
            self.say(f"{u.name:<24} {u.node:<12} {state}")
        return {u.name: s for u, s in zip(self.units, states, strict=True)}

    def down(self) -> None:
        self._stop(self.units)

    def _stop(self, units: Sequence[Unit]) -> None:
        for stage in reversed(range(len(STAGES))):
            batch = [u for u in units if u.stage == stage]
            if not batch:
                continue
            timeout = self.opts.stop_timeout_s + 30

            def stop(u: Unit, timeout: float = timeout) -> str:
                return self.run(u, stop_script(self.spec, u, self.opts.stop_timeout_s), timeout)

            with ThreadPoolExecutor(max_workers=min(16, len(batch))) as pool:
                for u, out in zip(batch, pool.map(stop, batch), strict=True):
                    self.say(f"{u.name} on {u.node}: {out or 'would stop'}")

    def logs(self, lines: int = 50) -> None:
        for u in self.units:
            self.say(f"==> {u.name} on {u.node} <==")
            self.say(self.run(u, logs_script(self.spec, u, lines)))


def fail(message: str) -> int:
    print(f"launch_cluster: {message}", file=sys.stderr)
    return 1
