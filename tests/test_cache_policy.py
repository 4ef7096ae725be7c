"""Save policy (SPEC 4.8): trim/align, cold split, continued/finish gates, validation."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from erllama import errors
from erllama.cache.policy import (
    SavePolicy,
    cold_save_split,
    should_continued_save,
    should_finish_save,
    trim_count,
)

FIELDS = [f.name for f in dataclasses.fields(SavePolicy)]


@st.composite
def policies(draw):
    """Any valid policy."""
    mn = draw(st.integers(0, 3000))
    cold_min = draw(st.integers(mn, mn + 3000))
    cold_max = draw(st.integers(cold_min, cold_min + 5000))
    return SavePolicy(
        min_tokens=mn,
        cold_min_tokens=cold_min,
        cold_max_tokens=cold_max,
        continued_interval=draw(st.integers(1, 4096)),
        boundary_trim_tokens=draw(st.integers(0, 200)),
        boundary_align_tokens=draw(st.integers(1, 4096)),
    )


# --- trim_count -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "trim", "align", "expected"),
    [
        (100, 0, 1, 100),  # align 1, trim 0: identity
        (100, 10, 1, 90),  # align 1: length - trim
        (2048 + 32, 32, 2048, 2048),  # exact threshold
        (2048 + 31, 32, 2048, None),  # one short
        (5000, 32, 2048, 4096),
        (10, 20, 1, None),  # trim > length
        (0, 0, 1, None),
        (32, 32, 1, None),  # nothing left
        (64, 0, 64, 64),
        (127, 0, 64, 64),
    ],
)
def test_trim_count_cases(length, trim, align, expected):
    assert trim_count(length, trim, align) == expected


@pytest.mark.parametrize(
    ("args", "name"),
    [
        ((-1, 0, 1), "length"),
        ((10, -1, 1), "trim"),
        ((10, 0, 0), "align"),
        ((10, 0, -4), "align"),
        ((10.0, 0, 1), "length"),
        ((10, 0, True), "align"),
        ((10, "1", 1), "trim"),
    ],
)
def test_trim_count_badarg(args, name):
    with pytest.raises(errors.ConfigError, match=name):
        trim_count(*args)


@given(st.integers(0, 100_000), st.integers(0, 500), st.integers(1, 5000))
def test_trim_count_properties(length, trim, align):
    n = trim_count(length, trim, align)
    if length - trim < align:
        assert n is None
    else:
        assert n is not None
        assert n % align == 0
        assert align <= n <= length - trim
        assert length - trim - n < align  # the largest such multiple


# --- cold_save_split --------------------------------------------------------------------


@given(policy=policies(), n=st.integers(0, 12000))
def test_cold_split_properties(policy, n):
    tokens = list(range(n))
    split = cold_save_split(policy, tokens)
    keep = trim_count(n, policy.boundary_trim_tokens, policy.boundary_align_tokens)
    in_bounds = policy.cold_min_tokens <= n <= policy.cold_max_tokens
    if not in_bounds or keep is None:
        assert split is None
        return
    assert split is not None
    prefix, rest = split
    assert prefix + rest == tokens
    assert len(prefix) == keep
    assert len(prefix) % policy.boundary_align_tokens == 0
    assert len(rest) >= policy.boundary_trim_tokens


def test_cold_split_bounds():
    p = SavePolicy(
        min_tokens=10,
        cold_min_tokens=100,
        cold_max_tokens=200,
        boundary_trim_tokens=8,
        boundary_align_tokens=16,
    )
    assert cold_save_split(p, list(range(99))) is None
    assert cold_save_split(p, list(range(201))) is None
    prefix, rest = cold_save_split(p, list(range(100)))  # type: ignore[misc]
    assert prefix == list(range(80)) and rest == list(range(80, 100))
    prefix, rest = cold_save_split(p, list(range(200)))  # type: ignore[misc]
    assert len(prefix) == 192 and len(rest) == 8


def test_cold_split_trim_skips():
    p = SavePolicy(
        min_tokens=0,
        cold_min_tokens=0,
        cold_max_tokens=100,
        boundary_trim_tokens=10,
        boundary_align_tokens=16,
    )
    assert cold_save_split(p, list(range(25))) is None
    assert cold_save_split(p, list(range(26))) == (list(range(16)), list(range(16, 26)))


def test_cold_split_accepts_tuple_and_returns_lists():
    p = SavePolicy(min_tokens=0, cold_min_tokens=0, boundary_trim_tokens=1, boundary_align_tokens=2)
    assert cold_save_split(p, (1, 2, 3, 4)) == ([1, 2], [3, 4])


# --- continued / finish gates -----------------------------------------------------------


def test_continued_gate_cases():
    p = SavePolicy(min_tokens=100, cold_min_tokens=100, continued_interval=50)
    assert should_continued_save(p, 150, 100)
    assert not should_continued_save(p, 149, 100)
    assert not should_continued_save(p, 99, 0)  # interval met, below min
    assert should_continued_save(p, 100, 0)
    assert should_continued_save(p, 100, 50)


def test_finish_gate_cases():
    p = SavePolicy(min_tokens=100, cold_min_tokens=100)
    assert should_finish_save(p, 100)
    assert not should_finish_save(p, 99)
    assert should_finish_save(SavePolicy(min_tokens=0, cold_min_tokens=0), 0)


@given(policy=policies(), live=st.integers(0, 20000), last_at=st.integers(0, 20000),
       more=st.integers(0, 5000))
def test_continued_gate_monotone(policy, live, last_at, more):
    fires = should_continued_save(policy, live, last_at)
    assert fires == (
        live - last_at >= policy.continued_interval and live >= policy.min_tokens
    )
    if fires:
        assert should_continued_save(policy, live + more, last_at)
        assert should_continued_save(policy, live, max(0, last_at - more))
    else:
        assert not should_continued_save(policy, max(0, live - more), last_at)
        assert not should_continued_save(policy, live, last_at + more)


@given(policy=policies(), live=st.integers(0, 20000), more=st.integers(0, 5000))
def test_finish_gate_monotone(policy, live, more):
    fires = should_finish_save(policy, live)
    assert fires == (live >= policy.min_tokens)
    if fires:
        assert should_finish_save(policy, live + more)
    else:
        assert not should_finish_save(policy, max(0, live - more))


# --- validation -------------------------------------------------------------------------


def test_defaults_are_valid_and_documented():
    p = SavePolicy()
    assert p == SavePolicy.from_dict({})
    assert p.min_tokens <= p.cold_min_tokens <= p.cold_max_tokens
    assert p.continued_interval > 0 and p.boundary_align_tokens > 0
    assert p.boundary_trim_tokens >= 0


@given(policies())
def test_validate_accepts_valid(policy):
    assert SavePolicy.from_dict(dataclasses.asdict(policy)) == policy


def test_from_dict_partial_and_unknown():
    p = SavePolicy.from_dict({"min_tokens": 16, "cold_min_tokens": 16, "boundary_align_tokens": 16})
    assert p.min_tokens == 16 and p.boundary_align_tokens == 16
    assert p.cold_max_tokens == SavePolicy().cold_max_tokens
    with pytest.raises(errors.ConfigError, match="stride_tokens"):
        SavePolicy.from_dict({"stride_tokens": 4})


@pytest.mark.parametrize(
    ("knobs", "field", "value"),
    [
        ({"min_tokens": -1, "cold_min_tokens": 0}, "min_tokens", "-1"),
        ({"min_tokens": 100, "cold_min_tokens": 99}, "cold_min_tokens", "99"),
        ({"cold_min_tokens": 600, "cold_max_tokens": 599}, "cold_max_tokens", "599"),
        ({"continued_interval": 0}, "continued_interval", "0"),
        ({"continued_interval": -5}, "continued_interval", "-5"),
        ({"boundary_trim_tokens": -1}, "boundary_trim_tokens", "-1"),
        ({"boundary_align_tokens": 0}, "boundary_align_tokens", "0"),
        ({"boundary_align_tokens": 1.5}, "boundary_align_tokens", "1.5"),
        ({"min_tokens": True}, "min_tokens", "True"),
        ({"continued_interval": "2048"}, "continued_interval", "2048"),
        ({"cold_max_tokens": None}, "cold_max_tokens", "None"),
    ],
)
def test_validation_names_field_and_value(knobs, field, value):
    with pytest.raises(errors.ConfigError, match=rf"{field}.*{value}"):
        SavePolicy.from_dict(knobs)
    with pytest.raises(errors.ConfigError, match=field):
        SavePolicy(**knobs)


@pytest.mark.parametrize("field", FIELDS)
def test_every_field_rejects_non_int(field):
    with pytest.raises(errors.ConfigError, match=field):
        SavePolicy(**{field: 3.0})


def test_policy_is_frozen():
    p = SavePolicy()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.min_tokens = 1  # type: ignore[misc]
