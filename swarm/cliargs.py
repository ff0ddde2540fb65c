"""Argument parsing shared by the `node` and `swarm` commands: mistakes give one line, not a traceback."""
from __future__ import annotations

import argparse
import sys
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def fail(prog: str, message: str, status: int = 1) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return status


def peers_list(values: list[str] | None) -> tuple[str, ...]:
    """``--initial-peers`` accepts several values and/or comma-separated lists."""
    return tuple(p for v in values or () for p in v.replace(",", " ").split())
