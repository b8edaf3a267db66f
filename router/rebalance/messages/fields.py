"""Reading a control message's JSON: one ``Fields`` per object, one error type.

Who calls: every ``from_json`` / ``read`` in ``requests``, ``status`` and ``replies``. Each reader
checks one field's type and raises ``ControlMessageError`` naming the message and the field's
path (``status: field 'kv.capacity_tokens': expected a count (an int >= 0), got -1``).
"""

from __future__ import annotations

import math
from typing import Any


class ControlMessageError(ValueError):
    """A control message that does not follow its schema; the text names message and field."""


def show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_count(value: Any) -> bool:
    """An int >= 0, or a float holding one (JSON writers may emit ``10.0``)."""
    whole = is_int(value) or (isinstance(value, float) and value.is_integer())
    return whole and value >= 0


def _is_number(value: Any) -> bool:
    return (is_int(value) or isinstance(value, float)) and math.isfinite(value) and value >= 0


def check_span(name: str, key: str, value: Any) -> tuple[int, int]:
    """A layer range ``[start, end]``, end exclusive, ``0 <= start < end``."""
    if (not isinstance(value, list | tuple) or len(value) != 2
            or not all(is_int(x) for x in value)):
        raise ControlMessageError(f"{name}: field '{key}': expected [start, end]: two integers, "
                                  f"end exclusive, got {show(value)}")
    if not 0 <= value[0] < value[1]:
        raise ControlMessageError(f"{name}: field '{key}': [{value[0]}, {value[1]}) is not a "
                                  "non-empty range (0 <= start < end)")
    return value[0], value[1]


def check_ids(name: str, key: str, value: Any) -> tuple[int, ...]:
    """A non-empty list of distinct integers."""
    if (not isinstance(value, list | tuple) or not value
            or not all(is_int(x) for x in value)):
        raise ControlMessageError(f"{name}: field '{key}': expected a non-empty list of "
                                  f"integers, got {show(value)}")
    if len(set(value)) != len(value):
        raise ControlMessageError(f"{name}: field '{key}' has duplicates: {list(value)}")
    return tuple(value)


def check_target(name: str, value: Any) -> str:
    """The layer-host name of a request (the worker checks that it knows it)."""
    if not isinstance(value, str):
        raise ControlMessageError(f"{name}: field 'target': unknown target {show(value)}; "
                                  "expected the name of a layer host")
    return value


class Fields:
    """One JSON object of message ``name``, at ``path`` (``"kv."``) inside it, read by field.

    A reader given a default returns it when the field is absent or null; without one the field
    is required. ``known`` (requests) refuses every other field."""

    def __init__(self, obj: Any, name: str, path: str = "",
                 known: frozenset[str] | None = None) -> None:
        if not isinstance(obj, dict):
            where = f"field '{path.rstrip('.')}'" if path else "the body"
            raise ControlMessageError(f"{name}: {where} must be a JSON object, got {show(obj)}")
        if known is not None and set(obj) - known:
            raise ControlMessageError(f"{name}: unknown fields {sorted(set(obj) - known)}; "
                                      f"expected only {sorted(known)}")
        self.obj, self.name, self.path = obj, name, path

    def has(self, key: str) -> bool:
        return key in self.obj

    def error(self, key: str, expected: str, value: Any) -> ControlMessageError:
        return ControlMessageError(
            f"{self.name}: field '{self.path}{key}': expected {expected}, got {show(value)}")

    def _raw(self, key: str, required: bool) -> Any:
        if required and key not in self.obj:
            raise ControlMessageError(f"{self.name}: field '{self.path}{key}' is required")
        return self.obj.get(key)

    def count(self, key: str, default: int | None = None) -> int:
        value = self._raw(key, default is None)
        if value is None and default is not None:
            return default
        if not _is_count(value):
            raise self.error(key, "a count (an int >= 0)", value)
        return int(value)

    def opt_count(self, key: str) -> int | None:
        return None if self.obj.get(key) is None else self.count(key)

    def integer(self, key: str) -> int:
        value = self._raw(key, True)
        if not is_int(value):
            raise self.error(key, "an integer", value)
        return int(value)

    def number(self, key: str, default: float | None = None) -> float:
        value = self._raw(key, default is None)
        if value is None and default is not None:
            return default
        if not _is_number(value):
            raise self.error(key, "a number >= 0", value)
        number: float = value  # an int stays an int, so the JSON reads back the same
        return number

    def opt_number(self, key: str) -> float | None:
        return None if self.obj.get(key) is None else self.number(key)

    def string(self, key: str) -> str:
        value = self._raw(key, True)
        if not isinstance(value, str):
            raise self.error(key, "a string", value)
        return value

    def opt_string(self, key: str) -> str | None:
        return None if self.obj.get(key) is None else self.string(key)

    def boolean(self, key: str, default: bool) -> bool:
        value = self.obj.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.error(key, "true or false", value)
        return value

    def ints(self, key: str, default: tuple[int, ...] | None = None) -> tuple[int, ...]:
        value = self._raw(key, default is None)
        if value is None and default is not None:
            return default
        if not isinstance(value, list) or not all(is_int(x) for x in value):
            raise self.error(key, "a list of integers", value)
        return tuple(value)

    def span(self, key: str) -> tuple[int, int]:
        return check_span(self.name, self.path + key, self._raw(key, True))

    def spans(self, key: str) -> tuple[tuple[int, int], ...]:
        """A list of layer ranges; empty when absent or null."""
        value = self.obj.get(key)
        if value is None:
            return ()
        if not isinstance(value, list):
            raise self.error(key, "a list of [start, end] ranges", value)
        return tuple(check_span(self.name, f"{self.path}{key}[]", item) for item in value)

    def id_list(self, key: str) -> tuple[int, ...]:
        return check_ids(self.name, self.path + key, self._raw(key, True))

    def obj_of(self, key: str) -> Fields:
        """A nested object; an empty one when absent or null."""
        value = self.obj.get(key)
        return Fields({} if value is None else value, self.name, f"{self.path}{key}.")

    def objects(self, key: str) -> list[Fields]:
        """A list of objects; empty when absent or null."""
        value = self.obj.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.error(key, "a list of objects", value)
        return [Fields(item, self.name, f"{self.path}{key}[].") for item in value]

    def names(self, key: str) -> tuple[tuple[str, str], ...]:
        """An object of names to strings, as (name, value) pairs in the order sent."""
        value = self.obj.get(key)
        if value is None:
            return ()
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise self.error(key, "an object of names to host:port strings", value)
        return tuple(value.items())

    def rest(self, known: frozenset[str]) -> dict[str, Any]:
        return {k: v for k, v in self.obj.items() if k not in known}
