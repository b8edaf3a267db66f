"""profiler_ft.buckets: presets, custom bounds, invalid specs, index(), labels, fallback lengths."""

from __future__ import annotations

import pytest

from profiler_ft.buckets import DEFAULT, PRESETS, Buckets


def test_parse_pow2_preset() -> None:
    buckets = Buckets.parse("pow2")
    assert buckets.bounds == (32, 64, 128, 256, 512)
    assert buckets.num_buckets == 6


def test_parse_uellm_preset() -> None:
    buckets = Buckets.parse("uellm")
    assert buckets.bounds == (256, 512, 1024)
    assert buckets.num_buckets == 4


def test_default_is_a_preset() -> None:
    assert DEFAULT in PRESETS
    assert Buckets.parse(DEFAULT).bounds == PRESETS[DEFAULT]


def test_parse_strips_surrounding_whitespace_of_a_preset() -> None:
    assert Buckets.parse("  uellm\n").bounds == PRESETS["uellm"]


@pytest.mark.parametrize(("spec", "bounds"), [
    ("64,256,1024", (64, 256, 1024)),
    (" 64 , 256 ,1024 ", (64, 256, 1024)),
    ("100", (100,)),
    ("1,2", (1, 2)),
    ("10,20,", (10, 20)),
])
def test_parse_custom_bounds(spec: str, bounds: tuple[int, ...]) -> None:
    assert Buckets.parse(spec).bounds == bounds
    assert Buckets.parse(spec).num_buckets == len(bounds) + 1


@pytest.mark.parametrize(("spec", "problem"), [
    ("", "at least one bound"),
    (" , ", "at least one bound"),
    ("a,b", "integer upper bounds"),
    ("1.5,3", "integer upper bounds"),
    ("pow3", "integer upper bounds"),
    ("64,32", "strictly increasing"),
    ("64,64", "strictly increasing"),
    ("0,10", "integer >= 1"),
    ("-5,10", "integer >= 1"),
])
def test_parse_invalid_spec_raises_value_error_naming_the_problem(spec: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        Buckets.parse(spec)


def test_parse_unknown_name_lists_the_presets() -> None:
    with pytest.raises(ValueError) as excinfo:
        Buckets.parse("pow3")
    for name in PRESETS:
        assert name in str(excinfo.value)


def test_constructor_rejects_non_integer_bounds() -> None:
    with pytest.raises(ValueError, match="integer"):
        Buckets((1.5, 3))  # type: ignore[arg-type]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_index_at_and_around_each_bound(preset: str) -> None:
    buckets = Buckets.parse(preset)
    for i, bound in enumerate(buckets.bounds):
        assert buckets.index(bound) == i, "a bound is an inclusive upper bound"
        assert buckets.index(bound - 1) == i
        assert buckets.index(bound + 1) == i + 1


def test_index_pow2_examples() -> None:
    buckets = Buckets.parse("pow2")
    assert buckets.index(0) == 0
    assert buckets.index(1) == 0
    assert buckets.index(32) == 0
    assert buckets.index(33) == 1
    assert buckets.index(64) == 1
    assert buckets.index(65) == 2
    assert buckets.index(512) == 4
    assert buckets.index(513) == 5


def test_index_above_the_last_bound_is_the_last_bucket() -> None:
    buckets = Buckets.parse("uellm")
    assert buckets.index(1025) == buckets.num_buckets - 1
    assert buckets.index(10**9) == buckets.num_buckets - 1


def test_labels_pow2() -> None:
    assert Buckets.parse("pow2").labels() == ["<=32", "33-64", "65-128", "129-256", "257-512",
                                              ">512"]


def test_labels_uellm() -> None:
    assert Buckets.parse("uellm").labels() == ["<=256", "257-512", "513-1024", ">1024"]


def test_label_of_single_bound() -> None:
    buckets = Buckets((10,))
    assert buckets.labels() == ["<=10", ">10"]
    assert buckets.label(0) == "<=10"
    assert buckets.label(1) == ">10"


def test_fallback_length_is_the_middle_of_a_bucket() -> None:
    buckets = Buckets.parse("pow2")
    assert buckets.fallback_length(0) == (1 + 32) // 2
    assert buckets.fallback_length(1) == (33 + 64) // 2
    assert buckets.fallback_length(4) == (257 + 512) // 2


def test_fallback_length_of_the_top_bucket_is_one_and_a_half_times_the_last_bound() -> None:
    assert Buckets.parse("pow2").fallback_length(5) == 768
    assert Buckets.parse("uellm").fallback_length(3) == 1536


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_fallback_length_lies_in_its_own_bucket(preset: str) -> None:
    buckets = Buckets.parse(preset)
    for i in range(buckets.num_buckets):
        assert buckets.index(buckets.fallback_length(i)) == i
