"""Command-line flags declared on config dataclass fields, so each option is written once.

A config field becomes a flag by carrying ``metadata=flag("--name", "help ...")``; the field's
name, type and default stay the single source of the option's value. Who calls what, and when:

- ``router/__main__.py`` builds its parser with ``add_flags(group, SomeConfig, ...)`` (which
  fields, in what order and under which argument group is the CLI's layout, so it stays there),
  then, after ``parse_args``, rebuilds each config with ``from_args(SomeConfig, args, ...)``.
- The config modules (``router/config.py``, ``admission.py``, ``breaker.py``, ``length.py``,
  ``batching/``, ``rebalance/config.py``) only call ``flag`` in their field declarations.

The argparse ``dest`` of a flag is argparse's own (``--health-interval`` -> ``health_interval``),
so its default metavar is too. ``type`` is taken from the field's annotation (``int``, ``float``,
``X | None``; ``bool`` becomes a ``store_true`` switch) unless given. Help text is argparse's, so
``%(default)s`` (or ``%(default)g``, ...) shows the flag's default and a literal ``%`` is ``%%``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Callable, Collection, Sequence
from typing import Any

_KEY = "router.cli_fields"
_FIELD_DEFAULT: Any = object()


@dataclasses.dataclass(frozen=True)
class Flag:
    """How one config field appears on the command line."""

    name: str
    """The option string, e.g. ``--health-interval``."""
    help: str | Callable[[], str] | None
    """Help text (argparse ``%`` formatting); a callable is called when the parser is built."""
    type: Callable[[str], Any] | None = None
    """Converter of one command-line word; None: from the field's annotation."""
    metavar: str | tuple[str, ...] | None = None
    choices: Sequence[str] | None = None
    nargs: str | None = None
    action: str | None = None
    """An argparse action (``append``, ``extend``, ``store_true``); None: ``store``, or
    ``store_true`` for a ``bool`` field."""
    default: Any = _FIELD_DEFAULT
    """The flag's default when it differs from the field's (after ``to_cli``)."""
    env: str | None = None
    """Environment variable read, when the parser is built, for the flag's default."""
    to_cli: Callable[[Any], Any] | None = None
    """Field default -> flag default (e.g. seconds -> the flag's milliseconds)."""
    from_cli: Callable[[Any], Any] | None = None
    """Parsed flag value -> field value (the inverse of ``to_cli``, or a parser that raises
    ValueError on bad input)."""
    switch: bool = False
    """The flag only switches an optional sub-config on: ``from_args`` never reads it, the
    caller builds that sub-config and passes it."""

    @property
    def dest(self) -> str:
        return self.name.lstrip("-").replace("-", "_")



def flag(name: str, help: str | Callable[[], str] | None, **kwargs: Any) -> dict[str, Flag]:
    """Field metadata that makes the field the flag ``name`` (keyword arguments: ``Flag``'s)."""
    return {_KEY: Flag(name, help, **kwargs)}


def flags(cls: type) -> dict[str, Flag]:
    """Field name -> its flag, for every field of ``cls`` that has one, in field order."""
    return {f.name: f.metadata[_KEY] for f in dataclasses.fields(cls) if _KEY in f.metadata}


def flag_name(cls: type, field_name: str) -> str:
    """The option string of ``cls.field_name`` (for error messages that name the flag)."""
    return flags(cls)[field_name].name


def add_flags(group: argparse._ActionsContainer, cls: type, *names: str,
              skip: Collection[str] = ()) -> None:
    """Add the flags of ``cls``'s fields ``names`` (default: all but ``skip``) to ``group``."""
    declared = flags(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for name in names or [n for n in declared if n not in skip]:
        spec = declared[name]
        kwargs: dict[str, Any] = {"default": _flag_default(cls, fields[name], spec)}
        value_type = spec.type or _scalar_type(hints[name])
        action = spec.action or ("store_true" if value_type is bool else None)
        if action is not None:
            kwargs["action"] = action
        if value_type is not None and value_type is not bool and action != "store_true":
            kwargs["type"] = value_type
        for key in ("metavar", "choices", "nargs"):
            if getattr(spec, key) is not None:
                kwargs[key] = getattr(spec, key)
        kwargs["help"] = spec.help() if callable(spec.help) else spec.help
        group.add_argument(spec.name, **kwargs)


def values_from_args(cls: type, args: argparse.Namespace,
                     skip: Collection[str] = ()) -> dict[str, Any]:
    """The field values of ``cls`` that its flags set (``from_cli`` applied), but ``skip``."""
    values = {}
    for name, spec in flags(cls).items():
        if name in skip:
            continue
        if spec.switch:
            raise TypeError(f"{cls.__name__}.{name}: {spec.name} only switches it on; "
                            "build it and pass it to from_args")
        value = getattr(args, spec.dest)
        values[name] = spec.from_cli(value) if spec.from_cli is not None else value
    return values


def from_args(cls: type, args: argparse.Namespace, **given: Any) -> Any:
    """``cls`` built from its flags' values in ``args``; ``given`` fields are passed as is and
    fields without a flag keep their defaults. The config's ValueError propagates."""
    return cls(**values_from_args(cls, args, skip=given), **given)


def _flag_default(cls: type, fld: dataclasses.Field[Any], spec: Flag) -> Any:
    if spec.env is not None and spec.env in os.environ:
        return os.environ[spec.env]
    if spec.default is not _FIELD_DEFAULT:
        return spec.default
    if fld.default is not dataclasses.MISSING:
        value = fld.default
    elif fld.default_factory is not dataclasses.MISSING:
        value = fld.default_factory()
    else:
        raise TypeError(f"{cls.__name__}.{fld.name}: {spec.name} needs a default")
    return spec.to_cli(value) if spec.to_cli is not None else value


def _scalar_type(hint: Any) -> Callable[[str], Any] | None:
    """``int``/``float``/``bool`` (also inside ``X | None``) -> itself; anything else: None."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        rest = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = rest[0] if len(rest) == 1 else None
    return hint if hint in (int, float, bool) else None
