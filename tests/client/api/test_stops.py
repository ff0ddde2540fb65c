"""Stop strings and incremental text (client.api.stops): pure functions, no swarm."""
import pytest

from client.api.stops import TextTracker, find_stop, partial_stop_length, stable_length


def tracker(pieces: dict[int, str], stops=()):
    return TextTracker(lambda ids: "".join(pieces[i] for i in ids), stops)


def feed(t: TextTracker, ids):
    """Send ids one by one until the tracker stops; returns the streamed deltas and the released ranges."""
    deltas, released = [], []
    for i in ids:
        text, rel = t.add(i)
        deltas.append(text)
        released.append(rel)
        if t.stopped:
            return deltas, released
    text, rel = t.finish()
    return deltas + [text], released + [rel]


def test_find_stop_is_the_earliest_of_any():
    assert find_stop("abc STOP x END", ["END", "STOP"]) == 4
    assert find_stop("abc", ["x"]) is None
    assert find_stop("xx ab", ["x"], start=2) is None


def test_partial_stop_length_is_the_longest_tail_that_could_grow_into_a_stop():
    assert partial_stop_length("hello wor", ["world"]) == 3
    assert partial_stop_length("hello w", ["world", "xw"]) == 1
    assert partial_stop_length("hello", ["world"]) == 0
    assert partial_stop_length("ab", ["abc", "b"]) == 2  # a whole stop is not "partial": find_stop handles it
    assert partial_stop_length("", ["x"]) == 0


def test_stable_length_holds_back_incomplete_characters():
    assert stable_length("ab\ufffd\ufffd") == 2 and stable_length("a\ufffdb") == 3


def test_stop_spanning_tokens_is_cut_exactly_and_partial_text_held_back():
    t = tracker({1: "Hello", 2: " wo", 3: "rld", 4: "!\n", 5: "\nmore"}, stops=["\n\n"])
    deltas, released = feed(t, [1, 2, 3, 4, 5, 1])
    assert "".join(deltas) == "Hello world!" and t.stopped
    assert deltas[3] == "!"  # the "\n" that could start "\n\n" was held back, then cut
    # "!\n" begins before the cut and is released with it; "\nmore" begins inside the stop string: never released
    assert [list(r) for r in released] == [[0], [1], [2], [], [3]]


def test_stream_never_sends_what_the_final_text_drops():
    pieces = {1: "a", 2: "b", 3: "c", 4: "STO", 5: "P", 6: "d"}
    for ids in ([1, 4, 5, 6], [1, 2, 4, 2, 3], [4, 5], [1, 2, 3]):
        t = tracker(pieces, stops=["STOP"])
        deltas, _ = feed(t, ids)
        whole = "".join(pieces[i] for i in ids)
        expected = whole[:whole.find("STOP")] if "STOP" in whole else whole
        assert "".join(deltas) == expected


def test_a_stop_at_the_very_start_gives_empty_text():
    t = tracker({1: "##", 2: "x"}, stops=["#"])
    assert feed(t, [1, 2]) == ([""], [range(0, 0)])


def test_several_stops_the_earliest_occurrence_wins():
    t = tracker({1: "one two", 2: " three"}, stops=["three", "two"])
    deltas, _ = feed(t, [1, 2])
    assert "".join(deltas) == "one "


def test_incomplete_utf8_is_held_until_the_character_is_complete():
    # a character split over two byte-level tokens: the first alone decodes to U+FFFD
    byte_pieces = {1: b"caf", 2: b"\xc3", 3: b"\xa9", 4: b"!"}
    t = TextTracker(lambda ids: b"".join(byte_pieces[i] for i in ids).decode("utf-8", errors="replace"))
    assert t.add(1)[0] == "caf"
    assert t.add(2)[0] == ""
    assert t.add(3)[0] == "\u00e9"
    assert t.add(4)[0] == "!"
    assert t.finish() == ("", range(4, 4))


def test_empty_stop_strings_are_refused():
    with pytest.raises(ValueError):
        TextTracker(lambda ids: "", [""])


def test_finish_releases_every_token_and_token_starts_follow_the_text():
    t = tracker({1: "ab", 2: "", 3: "cd"}, stops=["zz"])
    deltas, released = feed(t, [1, 2, 3])
    assert "".join(deltas) == "abcd" and sorted(i for r in released for i in r) == [0, 1, 2]
    assert t.token_starts == [0, 2, 2]
