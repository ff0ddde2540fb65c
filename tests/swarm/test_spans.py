import dataclasses

import pytest

from swarm.spans import Span


def test_parse_and_half_open_membership():
    s = Span.parse("3:7")
    assert (s.start, s.end, len(s)) == (3, 7, 4)
    assert 3 in s and 6 in s and 7 not in s and 2 not in s
    assert Span(0, 10).covers(s) and not s.covers(Span(0, 10))


@pytest.mark.parametrize("text", ["3-7", "7:3", "3:3", "a:b", "1:2:3", "-1:4", ""])
def test_bad_spans_are_refused_with_a_message(text):
    with pytest.raises(ValueError, match="START:END|empty or negative"):
        Span.parse(text)


def test_span_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Span(0, 1).start = 2  # type: ignore[misc]
