"""Stop sequences over arbitrarily split UTF-8 pieces."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from erllama import errors
from erllama.model.stops import TextStream, validate_stops

ALPHABET = "ab\n é😀<>/"


def earliest(text, stops):
    """The stop that completes first in ``text`` (ties: the one starting first)."""
    best = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or (i + len(s), i) < (best[0] + len(best[1]), best[0])):
            best = (i, s)
    return best


@st.composite
def split_bytes(draw, data):
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    pieces, prev = [], 0
    for c in cuts + [len(data)]:
        pieces.append(data[prev:c])
        prev = c
    return pieces


@settings(max_examples=500, deadline=None)
@given(st.data(), st.text(alphabet=ALPHABET, max_size=60),
       st.lists(st.text(alphabet=ALPHABET, min_size=1, max_size=4), max_size=4))
def test_stream_equals_text_cut_at_the_first_stop(data, text, stops):
    pieces = data.draw(split_bytes(text.encode()))
    ts = TextStream(stops)
    shown = []
    for p in pieces:
        out = ts.feed(p)
        shown.append(out)
        emitted = "".join(shown)
        for s in ts.stops:  # nothing shown ever contains a stop
            assert s not in emitted
    shown.append(ts.flush())
    hit = earliest(text, validate_stops(stops))
    if hit is None:
        assert "".join(shown) == text and ts.matched is None
    else:
        assert "".join(shown) == text[: hit[0]] and ts.matched == hit[1]


def test_held_back_text_is_released_when_it_cannot_become_a_stop():
    ts = TextStream(["</end>"])
    assert ts.feed(b"hello </") == "hello "
    assert ts.feed(b"en") == ""
    assert ts.feed(b"try") == "</entry"
    assert ts.feed(b" ok</end> tail") == " ok" and ts.matched == "</end>"
    assert ts.feed(b"more") == "" and ts.flush() == ""


def test_split_utf8_is_never_shown_broken():
    ts = TextStream()
    smile = "😀".encode()
    assert ts.feed(smile[:2]) == ""
    assert ts.feed(smile[2:]) == "😀"
    assert ts.feed(b"\xff") == "\ufffd"  # invalid bytes become the replacement character


def test_validation():
    assert validate_stops(None) == () and validate_stops("x") == ("x",)
    assert validate_stops(["a", "a", "b"]) == ("a", "b")
    for bad in ([""], [1], b"x", 3):
        with pytest.raises(errors.InvalidParameter, match="stop"):
            validate_stops(bad)
