"""``python -m scripts.launch_cluster``: a BanaServe cluster from one YAML file.

    python -m scripts.launch_cluster up CLUSTER.yaml [--dry-run]   # SSH: start everything
    python -m scripts.launch_cluster status CLUSTER.yaml            # SSH: what runs where
    python -m scripts.launch_cluster logs CLUSTER.yaml [UNIT ...]   # SSH: log tails
    python -m scripts.launch_cluster down CLUSTER.yaml              # SSH: stop everything
    python -m scripts.launch_cluster plan CLUSTER.yaml              # every process, every node
    python -m scripts.launch_cluster slurm CLUSTER.yaml > job.sh    # sbatch job.sh
    python -m scripts.launch_cluster k8s CLUSTER.yaml > cluster.yaml  # kubectl apply -f

The file's schema is in ``scripts/cluster/spec.py`` and docs/deployment.md. A bad file, an
unreachable node or a unit that fails to come up exits 1 with one readable line (``up`` also
prints the failed unit's log tail and stops what it started).
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a file: python scripts/launch_cluster.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scripts.cluster.load import load_spec  # noqa: E402
from scripts.cluster.spec import SpecError  # noqa: E402

_SSH = ("up", "status", "down", "logs")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m scripts.launch_cluster",
        description="Launch a BanaServe cluster (KV store, SGLang workers, router) described by "
                    "one YAML file: over SSH on bare-metal nodes, as a Slurm batch script, or "
                    "as Kubernetes manifests. See docs/deployment.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    helps = {
        "up": "start the cluster over SSH (idempotent: running units are left alone)",
        "status": "show each unit: down, running or ready",
        "down": "stop the cluster (router first, KV store last)",
        "logs": "print the tail of units' logs",
        "plan": "print every process the cluster runs, node by node (no SSH)",
        "slurm": "print a Slurm batch script that runs the cluster in one allocation",
        "k8s": "print Kubernetes manifests (kubectl apply -f)",
    }
    for name, text in helps.items():
        s = sub.add_parser(name, help=text, description=text)
        s.add_argument("cluster", metavar="CLUSTER.yaml", help="the cluster description")
        if name in _SSH:
            s.add_argument("--dry-run", action="store_true",
                           help="print every ssh command and remote script; run nothing")
            s.add_argument("--connect-timeout", type=float, default=10.0,
                           help="ssh ConnectTimeout in seconds (default 10)")
            s.add_argument("--strict-host-keys", action="store_true",
                           help="refuse unknown host keys (default: accept new ones)")
        if name == "up":
            s.add_argument("--ready-timeout", type=float, default=1800.0,
                           help="seconds each stage may take to be ready (default 1800)")
        if name == "down":
            s.add_argument("--stop-timeout", type=float, default=30.0,
                           help="seconds between SIGTERM and SIGKILL (default 30)")
        if name == "logs":
            s.add_argument("units", nargs="*", metavar="UNIT",
                           help="units to show (default: all; names from `plan`)")
            s.add_argument("-n", "--lines", type=int, default=50, help="lines per log (50)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from scripts.cluster.plan import build_plan
    from scripts.cluster.ssh import LaunchError, SSHCluster, SSHOptions, fail

    try:
        spec = load_spec(args.cluster)
        if args.command == "k8s":
            from scripts.cluster.k8s import dump_k8s

            sys.stdout.write(dump_k8s(spec))
            return 0
        units = build_plan(spec)
        if args.command == "slurm":
            from scripts.cluster.slurm import render_slurm

            sys.stdout.write(render_slurm(spec))
            return 0
        if args.command == "plan":
            for u in units:
                print(f"[{u.node}] {u.name}: {u.shell()}")
            return 0
        if args.command == "logs" and args.units:
            unknown = sorted(set(args.units) - {u.name for u in units})
            if unknown:
                return fail(f"unknown unit {unknown[0]!r}; units: "
                            + ", ".join(u.name for u in units))
            units = [u for u in units if u.name in args.units]
        opts = SSHOptions(connect_timeout_s=args.connect_timeout, dry_run=args.dry_run,
                          strict_host_keys=args.strict_host_keys,
                          ready_timeout_s=getattr(args, "ready_timeout", 1800.0),
                          stop_timeout_s=getattr(args, "stop_timeout", 30.0))
        cluster = SSHCluster(spec, units, opts)
        if args.command == "up":
            cluster.up()
            if not opts.dry_run:
                r = spec.router
                print(f"cluster {spec.name} is up: http://{spec.node(r.node).address}:{r.port}"
                      "/v1/chat/completions")
        elif args.command == "status":
            states = cluster.status()
            return 0 if all(s.startswith("ready") for s in states.values()) else 3
        elif args.command == "down":
            cluster.down()
        else:
            cluster.logs(args.lines)
        return 0
    except SpecError as e:
        return fail(str(e))
    except LaunchError as e:
        return fail(str(e))
    except KeyboardInterrupt:
        return fail("interrupted")


if __name__ == "__main__":
    sys.exit(main())
