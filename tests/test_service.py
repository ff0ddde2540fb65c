"""`node serve` as a service runs it: lifecycle log lines with levels, its metrics endpoint, and a stop
the way systemd (or Ctrl-C in a terminal) does it: a signal to every process of the node's group at once,
its p2p daemon included. That stop must be as clean as a SIGTERM to the node alone."""
from __future__ import annotations

import os
import re
import signal
import time

import pytest

from node.progress import LoadProgress
from swarm.spans import Span
from tests.helpers.launch import LocalSwarm, Proc, command, wait_for
from tests.node.test_metrics import scrape, value


def children(pid: int) -> dict[int, str]:
    """pid -> command name of the direct children of ``pid`` (from /proc)."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            name, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
            if int(rest[1]) == pid:
                found[int(entry)] = name
    return found


def alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture
def peers(tiny_path):
    swarm = LocalSwarm(tiny_path, use_scripts=True)
    try:
        yield swarm.start_bootstrap()
    finally:
        swarm.stop()


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads the process table from /proc (Linux)")
def test_group_sigterm_drains_and_exits_cleanly(peers, tiny_path):
    node = Proc([*command("node", use_scripts=True), "serve", "--model", str(tiny_path), "--blocks", "0:6",
                 "--host", "127.0.0.1", "--initial-peers", *peers, "--metrics-port", "0"], new_session=True)
    try:
        address = node.read_line(120)
        log = "\n".join(node.stderr_lines)
        url = re.search(r"metrics at (http://\S+)", log).group(1)
        samples = scrape(url)
        assert value(samples, "swarmlm_node_online") == 1 and value(samples, "process_resident_memory_bytes") > 0
        daemons = [pid for pid, name in children(node.pid).items() if name == "p2pd"]
        assert len(daemons) == 1, children(node.pid)
        assert os.getpgid(daemons[0]) != node.pid  # its own group: the group's signal reaches the node alone
        started = time.monotonic()
        os.killpg(node.pid, signal.SIGTERM)  # what systemd's stop and a terminal's Ctrl-C do: the whole group
        code = node.popen.wait(60)
        seconds = time.monotonic() - started
    finally:
        node.stop(signal.SIGKILL)
    lines = node.stderr_lines
    text = "\n".join(lines)
    assert code == 0, text
    assert "Traceback" not in text and "could not announce" not in text, text
    assert seconds < 20, f"took {seconds:.1f}s to exit (a hang on a dead p2p daemon took 15 s or more here)"
    for event in ("INFO node.server: joined the DHT", "INFO node.server: loaded 6 blocks 0:6 in",
                  "INFO node.server: ONLINE: serving blocks 0:6 of tiny-llama", "INFO node: SIGTERM received",
                  "INFO node.server: draining: OFFLINE announced", "INFO node.server: OFFLINE: stopped in"):
        assert sum(event in line for line in lines) == 1, (event, text)
    assert address in text
    assert "\r" not in text and "block/s" not in text  # stderr is no terminal here: plain lines, no bar redraws
    assert wait_for(lambda: not alive(daemons[0]), 10), "the node left its p2p daemon running"


def test_progress_bar_when_asked(capsys):
    progress = LoadProgress(Span(2, 5), bar=True)
    for block in range(2, 5):
        progress(block)
    assert progress.close() >= 0
    err = capsys.readouterr().err
    assert progress.done == 3
    assert "\rloading blocks 2:5:" in err and "/3 [" in err  # a tqdm bar, redrawn in place
