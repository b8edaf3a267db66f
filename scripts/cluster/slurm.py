"""A Slurm batch script that runs a cluster plan inside one allocation: pure, deterministic.

Who calls: the cluster CLI (``render_slurm``) and the unit tests, which check the script's
syntax and run it with stand-in ``srun`` / ``scontrol`` commands.

Slurm picks the hosts, so the spec's node addresses are unknown when the script is written.
The script maps the spec's nodes, in order, onto the allocation's hosts
(``scontrol show hostnames``) and exports one variable per node (``NODE_h1``); the units are
planned from a copy of the spec whose addresses are ``${NODE_h1}`` and so on (``slurm_spec``).
Each argv element is double-quoted with everything escaped but those placeholders, so the
placeholders, and nothing else, are expanded on the unit's node.

At run time the script starts each unit as a background ``srun --overlap`` step on its node,
stage by stage (``plan.STAGES``), and waits until every ready URL of a stage answers (fetched on
the unit's own node) before the next stage. Then it waits: the first unit to exit, ``scancel``
or the end of the job stops the others (router first). A unit's output goes to
``<log_dir>/<unit>.log`` on its node, as with SSH.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import replace

from scripts.cluster.plan import STAGES, Unit, build_plan
from scripts.cluster.spec import ClusterSpec, SpecError

STAGE_TIMEOUT_S = {"workers": 1800}
"""Seconds a stage's units may take to be ready (model load); other stages get the default."""
DEFAULT_TIMEOUT_S = 600
POLL_S = 2


class SlurmError(SpecError):
    """The spec or plan cannot be written as a batch script; the message names the field."""


def node_var(name: str) -> str:
    """The shell variable holding the host of spec node ``name``."""
    return "NODE_" + re.sub(r"\W", "_", name, flags=re.ASCII)


def placeholder(name: str) -> str:
    """What a unit's argv says for the host of spec node ``name``: ``${NODE_h1}``."""
    return "${" + node_var(name) + "}"


def slurm_spec(spec: ClusterSpec) -> ClusterSpec:
    """``spec`` with every node address replaced by its placeholder (``${NODE_h1}``)."""
    return replace(spec, nodes=tuple(replace(n, address=placeholder(n.name))
                                     for n in spec.nodes))


def render_slurm(spec: ClusterSpec, units: Sequence[Unit] | None = None) -> str:
    """The batch script (``sbatch job.sh``).

    ``units``: what to run. None, or the plan of ``spec`` itself (``build_plan(spec)``), runs
    the plan of ``slurm_spec(spec)``, whose addresses are the allocation's hosts. Other units
    (hand-made ones, the tests') run as given and may name a host as ``${NODE_<name>}``."""
    names = _node_vars(spec)
    if units is None or list(units) == build_plan(spec):
        units = build_plan(slurm_spec(spec))
    q = _Quoter(names.values())
    lines = _header(spec) + _allocation(spec, names) + _functions(spec, q)
    for i, stage in enumerate(STAGES):
        stage_units = [u for u in units if u.stage == i]
        if not stage_units:
            continue
        lines += ["", f"# -- stage {stage} " + "-" * (80 - 13 - len(stage))]
        for u in stage_units:
            if u.node not in names:
                raise SlurmError(f"unit {u.name}: unknown node {u.node!r}")
            lines.append(f"start {shlex.quote(u.name)} \"${names[u.node]}\" "
                         f"{shlex.quote(_unit_script(spec, u, q))}")
        timeout = STAGE_TIMEOUT_S.get(stage, DEFAULT_TIMEOUT_S)
        lines += [f"wait_ready {shlex.quote(u.name)} {q(u.ready_url)} {timeout}"
                  for u in stage_units if u.ready_url]
    return "\n".join(lines + _tail(spec, units, q)) + "\n"


def _node_vars(spec: ClusterSpec) -> dict[str, str]:
    names: dict[str, str] = {}
    for i, n in enumerate(spec.nodes):
        var = node_var(n.name)
        clash = next((other for other, v in names.items() if v == var), None)
        if clash is not None:
            raise SlurmError(f"nodes[{i}].name: {n.name!r} and {clash!r} both become the shell "
                             f"variable {var}; rename one")
        names[n.name] = var
    if not names:
        raise SlurmError("nodes: a Slurm job needs the cluster's nodes")
    return names


class _Quoter:
    """Double-quotes a word for bash, escaping ``"``, ``\\``, `````` and ``$`` everywhere except
    in the node placeholders, which the shell on the node expands."""

    def __init__(self, variables: Iterable[str]) -> None:
        alternatives = "|".join(re.escape(v) for v in sorted(variables))
        self._placeholder = re.compile(r"\$\{(?:" + alternatives + r")\}")

    def __call__(self, word: str | None) -> str:
        word = word or ""
        parts, pos = [], 0
        for m in self._placeholder.finditer(word):
            parts += [_escape(word[pos:m.start()]), m.group()]
            pos = m.end()
        parts.append(_escape(word[pos:]))
        return '"' + "".join(parts) + '"'


def _escape(text: str) -> str:
    return re.sub(r'(["\\`$])', r"\\\1", text)


def _unit_script(spec: ClusterSpec, u: Unit, q: _Quoter) -> str:
    """What ``bash -c`` runs on the unit's node: the unit's process, its output in its log."""
    env = " ".join(f"{k}={q(v)}" for k, v in (("BANASERVE_UNIT", f"{spec.name}/{u.name}"),
                                               *u.env))
    log = q(f"{spec.log_dir}/{u.name}.log")
    return (f"mkdir -p {q(spec.log_dir)} && exec env {env} "
            + " ".join(q(a) for a in u.argv) + f" > {log} 2>&1 < /dev/null")


def _header(spec: ClusterSpec) -> list[str]:
    gpus = max((g.gpus for g in spec.workers), default=0)
    lines = ["#!/bin/bash", f"#SBATCH --job-name=banaserve-{spec.name}",
             f"#SBATCH --nodes={len(spec.nodes)}", "#SBATCH --ntasks-per-node=1"]
    if gpus > 0:
        lines.append(f"#SBATCH --gpus-per-node={gpus}")
    lines += [f"#SBATCH --output=banaserve-{spec.name}-%j.out",
              f"# BanaServe cluster {spec.name!r}, generated by scripts.cluster.slurm from the "
              "cluster file: edit that, not this.",
              "# sbatch flags (--time, --partition, ...) given on the command line add to these.",
              f"# Unit logs: {spec.log_dir}/<unit>.log on each unit's node.",
              "set -uo pipefail"]
    return lines


def _allocation(spec: ClusterSpec, names: dict[str, str]) -> list[str]:
    n = len(spec.nodes)
    lines = ["", "# The spec's nodes, in order, on the allocation's hosts.",
             'mapfile -t HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")',
             f"if (( ${{#HOSTS[@]}} < {n} )); then",
             f'  echo "banaserve: the allocation has ${{#HOSTS[@]}} hosts; the cluster needs '
             f'{n}" >&2',
             "  exit 1", "fi"]
    lines += [f'export {names[node.name]}="${{HOSTS[{i}]}}"  # node {node.name}'
              for i, node in enumerate(spec.nodes)]
    return lines


_FUNCTIONS = """
PY={py}
WORKDIR={workdir}
STEP=(srun --nodes=1 --ntasks=1 --overlap --export=ALL --chdir="$WORKDIR")
PIDS=()
NAMES=()
declare -A PID_OF=() NODE_OF=()

stop_all() {{  # TERM every step, newest (the router) first; KILL what is left after 60 s
  trap - EXIT INT TERM
  local i p left deadline=$((SECONDS + 60))
  for (( i=${{#PIDS[@]}}-1; i>=0; i-- )); do kill -TERM "${{PIDS[i]}}" 2>/dev/null; done
  while (( SECONDS < deadline )); do
    left=0
    for p in "${{PIDS[@]}}"; do kill -0 "$p" 2>/dev/null && left=1; done
    (( left )) || break
    sleep 1
  done
  for p in "${{PIDS[@]}}"; do kill -KILL "$p" 2>/dev/null; done
  wait
}}
trap stop_all EXIT
trap 'exit 143' INT TERM

start() {{  # NAME HOST SCRIPT: run SCRIPT on HOST as a background step
  echo "banaserve: starting $1 on $2"
  "${{STEP[@]}}" -w "$2" bash -c "$3" &
  PIDS+=("$!"); NAMES+=("$1"); PID_OF[$1]=$!; NODE_OF[$1]=$2
}}

alive() {{ kill -0 "${{PID_OF[$1]}}" 2>/dev/null; }}

fail() {{  # NAME WHY: say why, show the unit's log tail, stop everything
  echo "banaserve: $1 $2; the end of its log:" >&2
  "${{STEP[@]}}" --quiet -w "${{NODE_OF[$1]}}" tail -n 40 {log_dir}/"$1.log" >&2
  exit 1
}}

wait_ready() {{  # NAME URL TIMEOUT_S: until URL answers on the unit's node
  local deadline=$((SECONDS + $3))
  until "${{STEP[@]}}" --quiet -w "${{NODE_OF[$1]}}" "$PY" -c \\
      'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)' "$2" \\
      >/dev/null 2>&1; do
    alive "$1" || fail "$1" "exited before it was ready"
    (( SECONDS < deadline )) || fail "$1" "was not ready after $3 s ($2)"
    sleep {poll}
  done
  echo "banaserve: $1 is ready"
}}"""


def _functions(spec: ClusterSpec, q: _Quoter) -> list[str]:
    return _FUNCTIONS.format(py=q(spec.python_path()), workdir=q(spec.workdir),
                             log_dir=q(spec.log_dir), poll=POLL_S).split("\n")


def _tail(spec: ClusterSpec, units: Sequence[Unit], q: _Quoter) -> list[str]:
    router = next((u for u in units if u.name == "router" and u.ready_url), None)
    where = (q(f"{router.ready_url.rsplit('/', 1)[0]}/v1/chat/completions")[1:-1]
             if router and router.ready_url else "every unit is ready")
    return ["", "# -- serving until a unit exits or the job ends " + "-" * 34,
            f'echo "banaserve: cluster {_escape(spec.name)} is up: {where}"',
            "wait -n",
            "rc=$?",
            'for name in "${NAMES[@]}"; do alive "$name" || echo "banaserve: $name exited" >&2;'
            " done",
            'echo "banaserve: a unit exited (status $rc); stopping the cluster" >&2',
            "exit 1"]
