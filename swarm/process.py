"""Process lifecycle shared by the command-line programs: die with the process that launched us."""
from __future__ import annotations

import os
import signal

PARENT_ENV = "SWARMLM_DIE_WITH_PARENT"  # set by Proc for its children: the launching process's pid
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Called first by the `node` and `swarm` commands. When started by a launcher that sets PARENT_ENV
    (the tests' and benchmarks' ``Proc``), ask Linux for SIGTERM once the launching thread exits, so a
    killed test run or demo never leaves nodes behind; if the launcher is already gone, stop now. A
    no-op otherwise and off Linux.

    Done in the child itself rather than in a ``preexec_fn``: that would make subprocess fork() instead
    of spawning, running gRPC's fork handlers in a parent whose gRPC threads are busy (gRPC logs
    "skipping fork() handlers", and a child once aborted with an epoll error)."""
    expected = os.environ.pop(PARENT_ENV, "")
    if not expected.isdigit():
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != int(expected):
        os.kill(os.getpid(), signal.SIGTERM)


GRPC_VERBOSITY_DEFAULT = "ERROR"


def quiet_grpc_core() -> None:
    """Called by the `node` and `swarm` commands before gRPC is imported: gRPC's C core otherwise writes
    its own INFO lines straight to stderr (e.g. ``ssl_transport_security.cc ... Handshake failed`` for
    every plaintext client of a TLS node), outside our logging. Only ERROR and worse are kept; a user
    who wants them all sets ``GRPC_VERBOSITY=INFO`` (or DEBUG) themselves, which is left alone."""
    os.environ.setdefault("GRPC_VERBOSITY", GRPC_VERBOSITY_DEFAULT)


class _ClosedLoopChildFilter:
    """Drops asyncio's "Loop ... that handles pid N is closed" warning. It comes from Python 3.11's child
    watcher thread when a child (hivemind's p2pd daemon) is reaped after its loop closed: after a DHT peer
    failed to start (a dead bootstrap: hivemind does not wait for the daemon it started), the error line is
    already printed and the child is gone; the warning would only add a confusing line."""

    def filter(self, record) -> bool:
        return not str(record.msg).startswith("Loop %r that handles pid")


def quiet_closed_loop_warnings() -> None:
    """Called by the `node` and `swarm` commands (see _ClosedLoopChildFilter)."""
    import logging

    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _ClosedLoopChildFilter) for f in asyncio_log.filters):
        asyncio_log.addFilter(_ClosedLoopChildFilter())
