"""`router.cli_fields`: flags declared on dataclass fields become argparse options and back."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import pytest

from router.cli_fields import add_flags, flag, flag_name, flags, from_args


@dataclass(frozen=True)
class Inner:
    depth: int = field(default=3, metadata=flag("--depth", "how deep (%(default)s)"))


@dataclass(frozen=True)
class Knobs:
    rate_s: float = field(default=0.02, metadata=flag(
        "--rate-ms", "rate (%(default).0f ms)", to_cli=lambda s: s * 1000,
        from_cli=lambda ms: ms / 1000.0))
    count: int | None = field(default=None, metadata=flag("--count", "a count"))
    name: str = field(default="x", metadata=flag("--name", None, choices=["x", "y"]))
    loud: bool = field(default=False, metadata=flag("--loud", "shout"))
    token: str | None = field(default=None, metadata=flag("--token", "t", env="KNOBS_TOKEN"))
    items: tuple[str, ...] = field(default=(), metadata=flag(
        "--items", "items", nargs="+", metavar="ITEM", to_cli=list, from_cli=tuple))
    inner: Inner | None = field(default=None, metadata=flag(
        "--inner", "use an Inner", action="store_true", default=False, switch=True))
    hidden: int = 7
    """No flag: always the default."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t")
    add_flags(parser, Knobs)
    add_flags(parser.add_argument_group("inner"), Inner)
    return parser


def test_defaults_round_trip_to_the_dataclass_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KNOBS_TOKEN", raising=False)
    args = _parser().parse_args([])
    assert args.rate_ms == 20.0 and args.items == [] and args.inner is False
    assert from_args(Knobs, args, inner=None) == Knobs()


def test_values_are_typed_from_the_annotation_and_converted() -> None:
    args = _parser().parse_args(["--rate-ms", "5", "--count", "4", "--name", "y", "--loud",
                                 "--token", "k", "--items", "a", "b", "--inner", "--depth", "9"])
    assert args.count == 4 and args.loud is True
    inner = from_args(Inner, args) if args.inner else None
    assert from_args(Knobs, args, inner=inner) == Knobs(
        rate_s=0.005, count=4, name="y", loud=True, token="k", items=("a", "b"),
        inner=Inner(depth=9))
    with pytest.raises(SystemExit):
        _parser().parse_args(["--count", "four"])


def test_env_supplies_a_default_when_the_parser_is_built(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KNOBS_TOKEN", "from-env")
    assert _parser().parse_args([]).token == "from-env"


def test_a_switch_is_never_read_as_the_field_value() -> None:
    with pytest.raises(TypeError, match="--inner only switches it on"):
        from_args(Knobs, _parser().parse_args([]))


def test_help_uses_the_flag_default_and_metadata() -> None:
    text = " ".join(_parser().format_help().split())
    assert "--rate-ms RATE_MS rate (20 ms)" in text and "--items ITEM [ITEM ...]" in text
    assert "--name {x,y}" in text and "how deep (3)" in text


def test_lookup_helpers_and_skip() -> None:
    assert list(flags(Knobs)) == ["rate_s", "count", "name", "loud", "token", "items", "inner"]
    assert flag_name(Knobs, "items") == "--items"
    parser = argparse.ArgumentParser()
    add_flags(parser, Knobs, "loud")
    add_flags(parser, Knobs, skip=("loud", "inner"))
    options = [s for action in parser._actions for s in action.option_strings]
    assert options == ["-h", "--help", "--loud", "--rate-ms", "--count", "--name", "--token",
                       "--items"]
