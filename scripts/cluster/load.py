"""Reading a cluster file: YAML -> ``ClusterSpec``, field by field, then the cross-field checks.

Who calls: ``scripts.launch_cluster`` (every command) and the tests call ``load_spec`` (a file)
or ``parse_spec`` (parsed YAML); they are the only way a ``ClusterSpec`` is built from a file.
Types and unknown keys are checked here, field by field; ``scripts.cluster.checks.validate``
then checks what spans fields. The arrows point one way: this module imports ``spec`` (the
schema) and ``checks``; ``checks`` imports ``spec``; ``spec`` imports neither.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any

import yaml

from scripts.cluster.checks import validate
from scripts.cluster.spec import (
    ROLES,
    ClusterSpec,
    KVStoreSpec,
    MooncakeSpec,
    Node,
    RouterSpec,
    SpecError,
    WorkerGroup,
)


def _fail(path: str, why: str) -> SpecError:
    return SpecError(f"{path}: {why}")


def load_spec(path: str) -> ClusterSpec:
    """Read and validate a cluster file; ``SpecError`` naming the field on any problem."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except OSError as e:
        raise SpecError(f"{path}: cannot read: {e.strerror or e}") from e
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from e
    return parse_spec(raw)


def parse_spec(raw: Any) -> ClusterSpec:
    """Build a ``ClusterSpec`` from parsed YAML (a mapping)."""
    top = _mapping(raw, "cluster")
    _known(top, ClusterSpec, "")
    nodes = tuple(_build(Node, n, f"nodes[{i}]") for i, n in
                  enumerate(_list(top.get("nodes", []), "nodes")))
    router = _build(RouterSpec, top.get("router"), "router")
    kv_raw = top.get("kvstore")
    kvstore = None
    if kv_raw is not None:
        kv = dict(_mapping(kv_raw, "kvstore"))
        kv["mooncake"] = _build(MooncakeSpec, kv.get("mooncake", {}), "kvstore.mooncake")
        kvstore = _build(KVStoreSpec, kv, "kvstore")
    workers = tuple(_build(WorkerGroup, w, f"workers[{i}]") for i, w in
                    enumerate(_list(top.get("workers"), "workers")))
    sg = _mapping(top.get("sglang_args", {}) or {}, "sglang_args")
    sglang_args: dict[str, tuple[str, ...]] = {}
    for key, value in sg.items():
        if key not in ("all", *ROLES):
            raise _fail(f"sglang_args.{key}", f"unknown role; use one of {('all', *ROLES)}")
        sglang_args[key] = _strings(value, f"sglang_args.{key}")
    rest = {k: v for k, v in top.items()
            if k not in ("nodes", "router", "kvstore", "workers", "sglang_args")}
    spec = _build(ClusterSpec, {**rest, "nodes": nodes, "router": router, "kvstore": kvstore,
                                "workers": workers, "sglang_args": sglang_args}, "", check=False)
    validate(spec)
    return spec


def _mapping(value: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _fail(path or "cluster", f"must be a mapping, got {type(value).__name__}")
    return value


def _list(value: Any, path: str) -> list[Any]:
    if value is None:
        raise _fail(path, "is required")
    if not isinstance(value, list):
        raise _fail(path, f"must be a list, got {type(value).__name__}")
    return value


def _strings(value: Any, path: str) -> tuple[str, ...]:
    if isinstance(value, str):
        raise _fail(path, "must be a list of strings (one flag or value per item)")
    items = _list(value, path)
    for i, item in enumerate(items):
        if not isinstance(item, str | int | float) or isinstance(item, bool):
            raise _fail(f"{path}[{i}]", f"must be a string, got {item!r}")
    return tuple(str(i) for i in items)


def _scalar(value: Any, path: str) -> str:
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise _fail(path, f"must be a string, got {value!r}")
    return str(value)


def _known(raw: Mapping[str, Any], cls: type, path: str) -> None:
    names = {f.name for f in fields(cls)}
    for key in raw:
        if key not in names:
            where = f"{path}.{key}" if path else str(key)
            raise _fail(where, f"unknown field; known: {', '.join(sorted(names))}")


_TYPES: dict[str, type | tuple[type, ...]] = {"str": str, "int": int, "float": (int, float),
                                               "bool": bool}


def _build(cls: type, raw: Any, path: str, check: bool = True) -> Any:
    raw = _mapping(raw, path)
    if check:
        _known(raw, cls, path)
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        where = f"{path}.{f.name}" if path else f.name
        if f.name not in raw:
            if f.default is f.default_factory:  # both MISSING: required
                raise _fail(where, "is required")
            continue
        value = raw[f.name]
        kind = str(f.type)
        if kind.startswith("tuple[str"):
            value = _strings(value, where)
        elif kind.startswith("Mapping[str, str]"):
            value = {str(k): _scalar(v, f"{where}.{k}")
                     for k, v in _mapping(value or {}, where).items()}
        elif value is not None or "None" not in kind:
            base = kind.split(" |")[0]
            want = _TYPES.get(base)
            if want is not None and (not isinstance(value, want) or
                                     (base != "bool" and isinstance(value, bool))):
                raise _fail(where, f"must be {base}, got {value!r}")
            if base == "float":
                value = float(value)
        kwargs[f.name] = value
    return cls(**kwargs)
