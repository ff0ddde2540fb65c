"""Start a local swarm of real processes (bootstrap peer + nodes) on loopback.

Used by the tests, the benchmarks and the demo. Every process is stopped on exit; each child asks to
die with its launcher (swarm.process.die_with_parent).
"""
from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

from swarm.process import PARENT_ENV


class LaunchError(RuntimeError):
    """A process did not become ready; carries what it printed on stderr."""


class Proc:
    """A child process whose stdout lines are collected on a thread (so reads can time out)."""

    def __init__(self, argv: Sequence[str], env: dict[str, str] | None = None, stdin: bool = False,
                 new_session: bool = False):
        """``stdin``: a pipe to write to (else /dev/null). ``new_session``: in a session and process group of its
        own (its children too, unless they leave it), so ``os.killpg(proc.pid, sig)`` signals all of them at
        once, as systemd does a unit's."""
        self.argv = list(argv)
        env = {**(os.environ if env is None else env), PARENT_ENV: str(os.getpid())}  # see die_with_parent
        self.popen = subprocess.Popen(
            self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, start_new_session=new_session,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.stderr_lines: list[str] = []
        threading.Thread(target=self._pump_stdout, daemon=True).start()
        threading.Thread(target=self._pump_stderr, daemon=True).start()

    def _pump_stdout(self) -> None:
        for line in self.popen.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)  # end of output: the process exited

    def _pump_stderr(self) -> None:
        for line in self.popen.stderr:
            self.stderr_lines.append(line.rstrip("\n"))

    @property
    def pid(self) -> int:
        return self.popen.pid

    def read_line(self, timeout: float) -> str:
        """The next stdout line; LaunchError if the process exits or stays silent for ``timeout``."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise LaunchError(f"{self.argv[:4]} printed nothing in {timeout}s; stderr: {self.stderr_tail()}") from None
        if line is None:
            self.popen.wait(5)
            raise LaunchError(f"{self.argv[:4]} exited with {self.popen.returncode}; stderr: {self.stderr_tail()}")
        return line

    def stderr_tail(self, n: int = 5) -> str:
        return " | ".join(line for line in self.stderr_lines[-n:] if line)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Send ``sig`` and wait; SIGKILL if it does not exit in time. Returns the exit code."""
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        return self.popen.returncode


MODULES = {"node": "node", "swarm": "client"}  # console script -> the package whose __main__ runs it


def command(tool: str, use_scripts: bool = False) -> list[str]:
    """How to run ``node`` / ``swarm``: the installed console script beside this Python (by path, since
    a bare ``node`` may be Node.js), or ``python -m node`` / ``python -m client``."""
    if use_scripts:
        script = Path(sys.executable).parent / tool
        if not script.exists():
            raise LaunchError(f"no {tool} script at {script}; is swarmlm installed in this environment?")
        return [str(script)]
    return [sys.executable, "-m", MODULES[tool]]


class LocalSwarm:
    """A bootstrap peer plus nodes, as separate processes on 127.0.0.1. Use as a context manager."""

    def __init__(self, model: str | Path, *, use_scripts: bool = False, ready_timeout: float = 120,
                 env: dict[str, str] | None = None, link=None):
        """``link``: a tests.helpers.link.LinkProfile; then each node listens behind a relay emulating that
        link and announces the relay's address, so every call to it crosses the link (``set_link`` changes
        the profile of all of them at once)."""
        self.model = str(model)
        self.link = link
        self.relays: list = []  # tests.helpers.link.LinkRelay in front of each node, with a link
        self.use_scripts, self.ready_timeout = use_scripts, ready_timeout
        self.env = {**os.environ, **(env or {})}
        self.bootstrap: Proc | None = None
        self.peers: list[str] = []
        self.nodes: list[Proc] = []
        self.addresses: list[str] = []

    def start_bootstrap(self) -> list[str]:
        self.bootstrap = Proc([*command("swarm", self.use_scripts), "bootstrap", "--host", "127.0.0.1"], self.env)
        self.peers = [self.bootstrap.read_line(self.ready_timeout)]
        return self.peers

    def start_node(self, blocks: str, *extra: str) -> str:
        """Start ``node serve --blocks blocks``; returns its gRPC address once it prints it."""
        return self.start_nodes([blocks], *extra)[0]

    def start_nodes(self, spans: Sequence[str], *extra: str, each: Sequence[Sequence[str]] = ()) -> list[str]:
        """Start one node per span at once (nodes that measure their thread counts load and measure one at a
        time, node.threads); returns their addresses in order.
        ``extra``: flags of every node; ``each[i]``: flags of the i-th node only."""
        if not self.peers:
            self.start_bootstrap()
        procs = []
        for i, blocks in enumerate(spans):
            argv = [*command("node", self.use_scripts), "serve", "--model", self.model, "--blocks", blocks,
                    "--host", "127.0.0.1", "--initial-peers", *self.peers, *extra, *(each[i] if i < len(each) else ())]
            if self.link is not None:
                argv += self._behind_relay()
            procs.append(Proc(argv, self.env))
        self.nodes.extend(procs)
        addresses = [proc.read_line(self.ready_timeout) for proc in procs]
        self.addresses.extend(addresses)
        return addresses

    def _behind_relay(self) -> list[str]:
        """Flags that put a node behind a new relay emulating ``self.link``."""
        from tests.helpers.link import LinkRelay
        from tests.helpers.network import free_port

        port = free_port()
        relay = LinkRelay(port, self.link)
        self.relays.append(relay)
        return ["--port", str(port), "--announce-host", relay.address]

    def set_link(self, profile) -> None:
        """Every relay emulates ``profile`` from now on (bytes already queued keep their times)."""
        if self.link is None:
            raise ValueError("this swarm was started without a link (LocalSwarm(..., link=PROFILES[...]))")
        self.link = profile
        for relay in self.relays:
            relay.profile = profile

    def stop(self) -> None:
        """SIGTERM every node at once (they drain in parallel), wait for each, then the bootstrap peer."""
        for proc in self.nodes:
            if proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGTERM)
        for proc in self.nodes:
            proc.stop()
        if self.bootstrap is not None:
            self.bootstrap.stop()
        for relay in self.relays:
            relay.close()

    def __enter__(self) -> "LocalSwarm":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_for(predicate, timeout: float, interval: float = 0.2) -> bool:
    """Poll ``predicate`` until true or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
