"""Stop strings and incremental text, as pure functions: what a stream may send after each token.

OpenAI's rule: generation ends at the first occurrence of any stop string, and the returned text ends
just before it (the stop string itself is not returned). A stop string may span several tokens, so a
stream holds back the longest tail of the text that could still grow into one, and text that ends in
an incomplete UTF-8 character (a byte-level token that is half a character decodes to U+FFFD).
"""
from __future__ import annotations

from typing import Callable, Sequence

REPLACEMENT = "\ufffd"  # what a decoder yields for an incomplete UTF-8 sequence


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> int | None:
    """Index where the earliest occurrence of any of ``stops`` begins in ``text[start:]`` (absolute), or None."""
    found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(found) if found else None


def partial_stop_length(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of some stop string: text that must
    be held back because the next token may complete the stop string."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


def stable_length(text: str) -> int:
    """Length of ``text`` without a trailing run of U+FFFD (bytes of a character not yet complete)."""
    return len(text.rstrip(REPLACEMENT))


class TextTracker:
    """One choice's text while tokens arrive: the text that may be sent so far, and where it stops.

    ``decode(ids)`` turns all token ids generated so far into text (the tokenizer's own decode, run on
    the whole sequence each time, so multi-token characters and merges come out as in one decode).
    Token ``k`` is *released* (its logprob may be sent) once the text up to its end has been sent;
    tokens wholly after a stop string are never released.
    """

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str] = ()):
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        self.decode, self.stops = decode, tuple(stops)
        self.longest_stop = max((len(s) for s in self.stops), default=0)
        self.ids: list[int] = []
        self.text = ""  # the whole decoded text so far
        self.sent = 0  # characters of self.text already handed out
        self.ends: list[int] = []  # text length after each token
        self.released = 0  # tokens whose logprobs were handed out
        self.stopped = False  # a stop string appeared (or finish() was called): the text is final

    def add(self, token_id: int) -> tuple[str, range]:
        """Take the next token; returns (text that may be sent now, indices of tokens released with it).
        Sets ``stopped`` when a stop string appears (the text is then final)."""
        if self.stopped:
            raise RuntimeError("this choice already stopped")
        self.ids.append(int(token_id))
        self.text = self.decode(self.ids)
        self.ends.append(len(self.text))
        stable = stable_length(self.text)
        if self.stops:
            hit = find_stop(self.text[:stable], self.stops, max(0, self.sent - self.longest_stop))
            if hit is not None:
                return self._close(max(hit, self.sent))
            stable -= partial_stop_length(self.text[:stable], self.stops)
        return self._advance(max(stable, self.sent))

    def finish(self) -> tuple[str, range]:
        """Generation ended without a stop string (EOS or length): everything held back goes out, every
        token is released."""
        if self.stopped:
            return "", range(self.released, self.released)
        self.stopped = True
        delta, self.sent = self.text[self.sent:], len(self.text)
        first, self.released = self.released, len(self.ids)
        return delta, range(first, self.released)

    @property
    def token_starts(self) -> list[int]:
        """Where each token's text begins, clamped to the text sent (the completions API's text_offset)."""
        return [min(e, self.sent) for e in [0, *self.ends[:-1]]]

    def _advance(self, upto: int) -> tuple[str, range]:
        delta, self.sent = self.text[self.sent:upto], upto
        first = self.released
        while self.released < len(self.ends) and self.ends[self.released] <= upto:
            self.released += 1
        return delta, range(first, self.released)

    def _close(self, upto: int) -> tuple[str, range]:
        """A stop string begins at ``upto``: the text ends there; every token that begins before it is released."""
        self.stopped = True
        delta, self.sent = self.text[self.sent:upto], upto
        first, starts = self.released, [0, *self.ends[:-1]]
        while self.released < len(self.ends) and starts[self.released] < upto:
            self.released += 1
        return delta, range(first, self.released)
