"""What a volunteer sees while a node starts: a progress bar on stderr when it is a terminal, plain log
lines otherwise (journalctl, a redirected file), so logs never fill with carriage-return bar redraws."""
from __future__ import annotations

import logging
import sys
import time

from swarm.spans import Span

log = logging.getLogger("node.server")


class LoadProgress:
    """Called with each block's index once it is loaded (from the loading thread); ``close()`` logs the
    one "loaded N blocks in S s" line. ``bar``: show a tqdm bar (default: when stderr is a terminal)."""

    def __init__(self, span: Span, bar: bool | None = None):
        self.span, self.done, self.started = span, 0, time.monotonic()
        self._bar = None
        if sys.stderr.isatty() if bar is None else bar:
            from tqdm import tqdm

            self._bar = tqdm(total=len(span), desc=f"loading blocks {span}", unit="block", file=sys.stderr,
                             dynamic_ncols=True, leave=False)

    def __call__(self, block: int) -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.update(1)
        elif self.done < len(self.span) and self.done * 10 // len(self.span) > (self.done - 1) * 10 // len(self.span):
            log.info("loading blocks %s: %d/%d (block %d)", self.span, self.done, len(self.span), block)

    def close(self) -> float:
        """Ends the bar; returns the seconds loading took."""
        seconds = time.monotonic() - self.started
        if self._bar is not None:
            self._bar.close()
        log.info("loaded %d blocks %s in %.1f s", self.done, self.span, seconds)
        return seconds
