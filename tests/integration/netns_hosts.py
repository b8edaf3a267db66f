"""Several "hosts" on one machine for multi-host tests: network namespaces with an SSH server each.

``NetnsHosts(3)`` creates namespaces ``bana-h1`` .. ``bana-h3``, each with a veth pair into one
bridge in the root namespace (``bana-br0``, 10.213.0.1/24; host ``k`` is 10.213.0.1k), loopback
up, and Debian's sshd listening on the host's address only, accepting one throwaway key for root.
The test process (root namespace) reaches every host over the bridge, as a launch machine would.
Everything is private to this machine: the test subnet exists inside the bridge and namespaces
only, nothing is routed or forwarded, and ``close()`` kills every process left in the namespaces,
then deletes them and the bridge.

``skip_reason()`` says why the harness cannot run here (not root, no ``ip netns``, no sshd), so
the test skips with that reason instead of failing.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass

BRIDGE = "bana-br0"
SUBNET = "10.213.0"
SSHD = "/usr/sbin/sshd"


@dataclass(frozen=True)
class Host:
    name: str
    """Namespace name (``bana-h1``) and the cluster file's node name (``h1``)."""
    node: str
    address: str
    interface: str
    """The host's network interface (its end of the veth pair), e.g. for GLOO_SOCKET_IFNAME."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def skip_reason() -> str | None:
    """Why network-namespace hosts cannot be made here, or ``None``."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    if not os.path.exists(SSHD):
        return f"{SSHD} is missing (Debian's openssh-server; scripts/setup.sh --test installs it)"
    probe = f"bana-probe-{os.getpid()}"  # each xdist process probes at collection, together
    _ip("netns", "del", probe, check=False)
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


class NetnsHosts:
    """``n`` namespace hosts with sshd; use as a context manager."""

    def __init__(self, n: int) -> None:
        self.dir = tempfile.mkdtemp(prefix="bana-netns-")
        self.key = os.path.join(self.dir, "id_ed25519")
        self.hosts = [Host(f"bana-h{k}", f"h{k}", f"{SUBNET}.1{k}", f"bana-v{k}i")
                      for k in range(1, n + 1)]
        self._sshd: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> NetnsHosts:
        try:
            self._cleanup_leftovers()
            self._make_network()
            self._start_sshd()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _cleanup_leftovers(self) -> None:
        for h in self.hosts:
            if _ip("netns", "pids", h.name, check=False).returncode == 0:
                self._kill_all(h)
                _ip("netns", "del", h.name, check=False)
        _ip("link", "del", BRIDGE, check=False)

    def _make_network(self) -> None:
        _ip("link", "add", BRIDGE, "type", "bridge")
        _ip("addr", "add", f"{SUBNET}.1/24", "dev", BRIDGE)
        _ip("link", "set", BRIDGE, "up")
        for k, h in enumerate(self.hosts, start=1):
            outer, inner = f"bana-v{k}", h.interface
            _ip("netns", "add", h.name)
            _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            _ip("link", "set", inner, "netns", h.name)
            _ip("link", "set", outer, "master", BRIDGE)
            _ip("link", "set", outer, "up")
            _ip("-n", h.name, "addr", "add", f"{h.address}/24", "dev", inner)
            _ip("-n", h.name, "link", "set", inner, "up")
            _ip("-n", h.name, "link", "set", "lo", "up")

    def _start_sshd(self) -> None:
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", self.key],
                       check=True)
        host_key = os.path.join(self.dir, "host_ed25519")
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", host_key],
                       check=True)
        shutil.copy(self.key + ".pub", os.path.join(self.dir, "authorized_keys"))
        os.makedirs("/run/sshd", exist_ok=True)
        for h in self.hosts:
            cfg = os.path.join(self.dir, f"sshd-{h.node}.conf")
            with open(cfg, "w") as f:
                f.write(f"ListenAddress {h.address}\nHostKey {host_key}\n"
                        f"AuthorizedKeysFile {self.dir}/authorized_keys\n"
                        "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
                        "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
                        f"PidFile {self.dir}/sshd-{h.node}.pid\n"
                        "AcceptEnv none\nPrintMotd no\n")
            log = open(os.path.join(self.dir, f"sshd-{h.node}.log"), "wb")
            self._sshd.append(subprocess.Popen(
                ["ip", "netns", "exec", h.name, SSHD, "-D", "-e", "-f", cfg],
                stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 30
        for h in self.hosts:
            while self.ssh(h, "true").returncode != 0:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"sshd on {h.address} did not answer: "
                                       f"{self.ssh(h, 'true').stderr.strip()}")
                time.sleep(0.2)

    def ssh(self, h: Host, command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
             "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
             "-o", "ConnectTimeout=5", "-i", self.key, f"root@{h.address}", command],
            capture_output=True, text=True, timeout=60)

    def pids(self, h: Host) -> list[int]:
        out = _ip("netns", "pids", h.name, check=False).stdout.split()
        return [int(p) for p in out]

    def _kill_all(self, h: Host) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = self.pids(h)
            for p in pids:
                try:
                    os.kill(p, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 10
            while self.pids(h) and time.monotonic() < deadline:
                time.sleep(0.2)

    def close(self) -> None:
        for p in self._sshd:
            p.terminate()
        for p in self._sshd:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        for h in self.hosts:
            self._kill_all(h)
            _ip("netns", "del", h.name, check=False)
            _ip("link", "del", f"bana-v{h.node[1:]}", check=False)
        _ip("link", "del", BRIDGE, check=False)
        shutil.rmtree(self.dir, ignore_errors=True)
