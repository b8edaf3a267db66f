"""Package arrows point one way: import rules as data, and no import cycle between modules.

A static scan (``ast``, nothing is imported) of every ``.py`` file under ``SCANNED``. Every
``import`` / ``from ... import`` counts, wherever it sits: at module level, inside a function (a
lazy import is still a dependency) or in an ``if TYPE_CHECKING:`` block. Which check sees which:

- the rules (``RULES``) see all of them, ``TYPE_CHECKING`` imports included: a type-only import
  across a forbidden arrow still ties the two packages together;
- the cycle check sees runtime imports only (module level and lazy), ``TYPE_CHECKING`` excluded:
  such an import never runs, so it cannot take part in an import-time loop.

Module graph: ``a/b/c.py`` is module ``a.b.c`` (``a/b/__init__.py`` is ``a.b``). ``import x.y``
points at ``x.y``; ``from x.y import z`` at ``x.y.z`` when that file exists, else at ``x.y``;
relative imports are resolved against the importing file's package first. An import of something
outside the scanned tree (the standard library, SGLang, aiohttp) is kept for the rules (so
``("router.policy", "aiohttp", ...)`` is one more line) but is not a node of the graph.
``importlib.import_module`` calls are not seen (``router.policy`` loads its policy modules that
way, below itself).

Adding a rule: one line in ``RULES``: (importer prefix, forbidden prefix, reason[, exempt
modules]). A prefix matches the module itself and everything below it (``router.policy`` matches
``router.policy.base``, not ``router.policy_x``).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("router", "runtime_patches", "kvstore", "profiler_ft", "scripts")


class Rule(NamedTuple):
    importer: str
    """Dotted prefix of the modules the rule applies to."""
    forbidden: str
    """Dotted prefix of what they must not import (a local package or a third-party one)."""
    reason: str
    """Why, printed with every violation."""
    exempt: tuple[str, ...] = ()
    """Modules under ``importer`` that may import it anyway (composition roots)."""
    allowed: tuple[str, ...] = ()
    """Prefixes under ``forbidden`` that stay allowed (``router`` forbidden, its floor allowed)."""


FLOOR = ("router.policy", "router.batching", "router.placement", "router.rebalance.messages",
         "router.rebalance.config", "router.rebalance.signals", "router.rebalance.decide",
         "router.breaker", "router.cli_fields")
"""The router's pure floor: plain data and algorithms, no I/O. The worker's patches and the
simulator import only these from ``router``; these import only each other (and never aiohttp)."""


RULES: tuple[Rule, ...] = (
    Rule("kvstore", "runtime_patches", "the store is below the patches: the patches wire it into "
         "SGLang (layer-wise state lives in kvstore.layerwise)"),
    Rule("kvstore", "router", "the store knows nothing of routing"),
    Rule("kvstore", "profiler_ft", "the store knows nothing of the length predictor"),
    Rule("profiler_ft", "runtime_patches", "the library takes model folders; only its CLI "
         "resolves prepared model names", exempt=("profiler_ft.__main__",)),
    Rule("scripts.cluster.spec", "scripts.cluster.checks", "the schema is below its checks "
         "(scripts.cluster.load parses, then validates)"),
    *(Rule(floor, "router", "the pure floor imports only the floor", allowed=FLOOR)
      for floor in FLOOR),
    *(Rule(floor, "aiohttp", "the pure floor does no HTTP") for floor in FLOOR),
    Rule("router.policy", "router.workers", "policies take plain data (router.policy.views)"),
    Rule("runtime_patches", "router", "the worker imports only the router's pure floor",
         allowed=FLOOR),
    Rule("scripts.sim", "router", "the simulator runs the router's own algorithms, not its I/O",
         allowed=FLOOR),
)


@dataclass(frozen=True)
class Import:
    module: str
    """The importing module (``router.policy.base``)."""
    path: str
    """Its file, relative to the scanned root."""
    line: int
    target: str
    """What it imports, resolved (a local module where one matches)."""
    type_checking: bool
    """Inside an ``if TYPE_CHECKING:`` block."""

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
            or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _imports_of(tree: ast.AST, in_type_checking: bool = False,
                ) -> Iterable[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import node below ``tree`` (function bodies included), with whether it sits in an
    ``if TYPE_CHECKING:`` body."""
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child, in_type_checking
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.body:
                yield from _imports_of(ast.Module(body=[stmt], type_ignores=[]), True)
            for stmt in child.orelse:
                yield from _imports_of(ast.Module(body=[stmt], type_ignores=[]),
                                       in_type_checking)
        else:
            yield from _imports_of(child, in_type_checking)


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool,
             modules: set[str]) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        if node.level - 1 > len(package):
            return []  # beyond the top package: not ours to judge
        package = package[:len(package) - (node.level - 1)]
        base = ".".join([*package, *([base] if base else [])])
    found = []
    for alias in node.names:
        sub = f"{base}.{alias.name}" if base else alias.name
        found.append(sub if sub in modules else base)
    return [t for t in dict.fromkeys(found) if t]


def scan(root: Path, packages: Sequence[str] = SCANNED) -> tuple[list[Import], set[str]]:
    """Every import under ``root/<package>`` for each package, and the set of local modules."""
    files = sorted(p for pkg in packages for p in (root / pkg).rglob("*.py"))
    modules = {module_name(p, root) for p in files}
    found = []
    for path in files:
        module = module_name(path, root)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node, type_only in _imports_of(tree):
            for target in _targets(node, module, path.name == "__init__.py", modules):
                found.append(Import(module, str(path.relative_to(root)), node.lineno, target,
                                    type_only))
    return found, modules


def violations(imports: Iterable[Import], rules: Iterable[Rule] = RULES) -> list[str]:
    out = []
    for rule in rules:
        for imp in imports:
            if (_under(imp.module, rule.importer) and _under(imp.target, rule.forbidden)
                    and imp.module not in rule.exempt
                    and not any(_under(imp.target, ok) for ok in rule.allowed)):
                kind = " (TYPE_CHECKING)" if imp.type_checking else ""
                out.append(f"{imp.where}: {imp.module} imports {imp.target}{kind}: "
                           f"{rule.importer} must not import {rule.forbidden} ({rule.reason})")
    return out


def _local(target: str, modules: set[str]) -> str | None:
    """The local module an import target lands in (the longest matching prefix), if any."""
    parts = target.split(".")
    for n in range(len(parts), 0, -1):
        name = ".".join(parts[:n])
        if name in modules:
            return name
    return None


def cycles(imports: Iterable[Import], modules: set[str]) -> list[list[Import]]:
    """Strongly connected groups of modules (two or more, or one importing itself) in the
    runtime import graph; each as the imports between its members, sorted."""
    edges: dict[str, dict[str, list[Import]]] = {m: {} for m in modules}
    for imp in imports:
        target = None if imp.type_checking else _local(imp.target, modules)
        if target is not None:
            edges[imp.module].setdefault(target, []).append(imp)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def connect(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in edges[node]:
            if succ not in index:
                connect(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1 or node in edges[node]:
                groups.append(group)

    for node in sorted(modules):
        if node not in index:
            connect(node)
    return sorted(([imp for m in sorted(g) for t in sorted(edges[m]) if t in g
                    for imp in edges[m][t]] for g in groups), key=lambda c: c[0].module)


def describe(group: list[Import]) -> str:
    members = sorted({imp.module for imp in group})
    lines = [f"cycle between {', '.join(members)}:"]
    lines += [f"    {imp.where}: {imp.module} -> {_short(imp.target, members)}" for imp in group]
    return "\n".join(lines)


def _short(target: str, members: list[str]) -> str:
    return next((m for m in sorted(members, key=len, reverse=True) if _under(target, m)), target)


# -- the tree as it is ----------------------------------------------------------------------------

def test_every_import_follows_the_rules() -> None:
    imports, _ = scan(ROOT)
    broken = violations(imports)
    assert not broken, "import rule(s) broken:\n  " + "\n  ".join(broken)


def test_no_import_cycle_between_modules() -> None:
    imports, modules = scan(ROOT)
    found = cycles(imports, modules)
    assert not found, (f"{len(found)} import cycle(s) (runtime imports, lazy ones included):\n"
                       + "\n".join(describe(group) for group in found))


def test_the_scan_sees_every_package_and_lazy_imports() -> None:
    imports, modules = scan(ROOT)
    assert {m.split(".")[0] for m in modules} == set(SCANNED)
    # profiler_ft's CLI resolves model names with a lazy import inside a function
    assert any(i.module == "profiler_ft.__main__" and i.target == "runtime_patches.models"
               for i in imports)


# -- the checker itself, on a tiny tree with known faults ------------------------------------------

def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_checker_reports_violations_and_cycles_it_should(tmp_path: Path) -> None:
    _write(tmp_path, {
        "low/__init__.py": "",
        "low/a.py": "import os\n\ndef lazy():\n    from high import api\n",
        "low/b.py": "from . import c\n",
        "low/c.py": "from .b import thing\n",
        "low/d.py": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                     "    from low import e\n"),
        "low/e.py": "import low.d\n",
        "high/__init__.py": "",
        "high/api.py": "import low.a\nimport aiohttp.web\n",
        "high/__main__.py": "import low.a\n",
    })
    imports, modules = scan(tmp_path, ("low", "high"))
    rules = (Rule("low", "high", "low is below high"),
             Rule("high", "aiohttp", "no HTTP here", exempt=("high.__main__",)),
             Rule("high", "low", "a type-only import counts too", exempt=("high.api",
                                                                          "high.__main__")),
             Rule("low.d", "low.e", "type-only imports count for rules"))
    broken = violations(imports, rules)
    assert broken == [
        "low/a.py:4: low.a imports high.api: low must not import high (low is below high)",
        "high/api.py:2: high.api imports aiohttp.web: high must not import aiohttp "
        "(no HTTP here)",
        "low/d.py:3: low.d imports low.e (TYPE_CHECKING): low.d must not import low.e "
        "(type-only imports count for rules)",
    ]
    found = cycles(imports, modules)
    # a <-> api through a lazy import; b <-> c through relative imports; d -> e -> d is
    # type-only on one side, so no cycle
    assert [sorted({i.module for i in group}) for group in found] == [
        ["high.api", "low.a"], ["low.b", "low.c"]]
    text = describe(found[0])
    assert "high/api.py:1: high.api -> low.a" in text and "low/a.py:4: low.a -> high.api" in text


def test_a_clean_tree_passes(tmp_path: Path) -> None:
    _write(tmp_path, {"low/__init__.py": "", "low/a.py": "import os\n",
                      "high/__init__.py": "from low import a\n"})
    imports, modules = scan(tmp_path, ("low", "high"))
    assert violations(imports, (Rule("low", "high", "low is below high"),)) == []
    assert cycles(imports, modules) == []
