"""The dispatch-policy seam.

Contract:
- A policy is a class registered under a type name with ``@register("name")``; the router builds
  exactly one instance per role at start-up with ``build(name, params)``, where ``params`` is a
  ``dict[str, str]`` parsed from ``--policy name:key=value,...``. The constructor parses its own
  parameters and raises ``ValueError`` naming a bad one (start-up then stops).
- ``handlers`` call ``pick(candidates, request)`` once per request, on the event loop, with the
  healthy workers' read-only ``WorkerView`` snapshots (``views.py``; never empty) and the request's
  ``RequestFeatures``. It returns one of the candidates and must not block or do I/O.
- A policy class with ``wants_prefix_index = True`` gets the prompt's token ids and each
  worker's cached prefix from the router's KV index in ``RequestFeatures`` (when the index is on
  and the router can tokenize); the others never pay for tokenization.
- A policy may keep its own small state (a counter, an RNG); worker state belongs to
  ``router.workers.WorkerPool`` and is only read here.

Adding a policy is one module in this package: a class with ``@register``, plus a section in
``router/policy/README.md``. ``router.policy`` imports every module in the package.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from router.policy.views import WorkerView


@dataclass(frozen=True)
class RequestFeatures:
    """What a policy may know about a request."""

    route: str
    """``chat``, ``completion`` or ``generate``."""
    max_tokens: int | None
    """Requested completion tokens, when given."""
    prompt_text: str = ""
    """The prompt as one string, for prefix affinity."""
    prompt_tokens: int = 0
    """Prompt length in tokens (exact or estimated, see ``router.validation``)."""
    predicted_length: int | None = None
    """Predicted output tokens (``--length-predictor``), None when not configured or unknown."""
    predicted_bucket: int | None = None
    """Index of the predicted output-length bucket, None likewise."""
    prompt_ids: tuple[int, ...] | None = None
    """The prompt's token ids as the worker will cache them, when the router has them (set
    for policies with ``wants_prefix_index``, with the KV index on and a tokenizer here)."""
    cached_tokens: Mapping[str, int] | None = None
    """Leading prompt tokens in each worker's device cache, by worker URL (the KV index)."""
    host_tokens: Mapping[str, int] | None = None
    """Leading prompt tokens in each worker's host tier (HiCache), by worker URL."""
    store_tokens: int = 0
    """Leading prompt tokens the shared kvstore holds (``--kvstore``, ``router.store_index``):
    loadable by every worker of the pool instead of recomputed."""


class Policy(Protocol):
    name: str

    def pick(self, candidates: Sequence[WorkerView], request: RequestFeatures) -> WorkerView:
        ...


_REGISTRY: dict[str, Callable[[dict[str, str]], Policy]] = {}


def register(name: str) -> Callable[[type], type]:
    def add(cls: type) -> type:
        if name in _REGISTRY:
            raise ValueError(f"policy {name!r} is registered twice")
        cls.name = name  # type: ignore[attr-defined]
        _REGISTRY[name] = cls
        return cls

    return add


def names() -> list[str]:
    return sorted(_REGISTRY)


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``load_aware:w_compute=1,w_memory=0.5`` -> (``load_aware``, {...})."""
    name, _, rest = spec.partition(":")
    params: dict[str, str] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"policy parameter {item!r} in {spec!r} is not key=value")
        params[key.strip()] = value.strip()
    return name.strip(), params


def build(spec: str) -> Policy:
    name, params = parse_spec(spec)
    if name not in _REGISTRY:
        raise ValueError(f"unknown policy {name!r}; available: {', '.join(names())}")
    return _REGISTRY[name](params)


def take_float(params: dict[str, str], key: str, default: float, *, minimum: float = 0.0) -> float:
    """Pop a float parameter, with a ``ValueError`` that names it."""
    raw = params.pop(key, None)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"policy parameter {key}={raw!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"policy parameter {key}={raw!r} must be a finite number")
    if value < minimum:
        raise ValueError(f"policy parameter {key}={value} must be >= {minimum}")
    return value


def take_seed(params: dict[str, str]) -> int | None:
    """Pop the optional integer ``seed`` parameter, with a ``ValueError`` that names it."""
    raw = params.pop("seed", None)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"policy parameter seed={raw!r} is not an integer") from None


def reject_unknown(name: str, params: dict[str, str]) -> None:
    if params:
        raise ValueError(f"policy {name!r} has no parameter(s) {', '.join(sorted(params))}")
