"""`swarm monitor` in a real browser: a real bootstrap peer, two real nodes and a real monitor process;
headless Chromium (Debian's `chromium`) loads the page, runs its scripts, and the DOM it dumps must list
every node; a SIGKILLed node must show FAILED (or be gone) within its record's TTL. In CI (CI set) a
missing Chromium fails the test: .ci/run installs it."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from html.parser import HTMLParser

import pytest

from tests.helpers.launch import LocalSwarm, Proc, command

TTL = 15.0  # the nodes' record TTL (node serve --ttl)


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        message = "no chromium on PATH (Debian: apt-get install -y chromium; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


class MonitorPage(HTMLParser):
    """The node rows (address -> state) and coverage cells (block -> state) of a dumped DOM."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.nodes: dict[str, str] = {}
        self.blocks: dict[int, str] = {}
        self.updated: str | None = None
        self.feed(html)

    def handle_starttag(self, tag: str, attrs) -> None:
        a = dict(attrs)
        if tag == "tr" and "node" in (a.get("class") or "").split():
            self.nodes[a["data-address"]] = a["data-state"]
        elif tag == "td" and "data-block" in a:
            self.blocks[int(a["data-block"])] = a["data-state"]
        elif tag == "p" and a.get("id") == "updated":
            self.updated = a.get("data-state")


def load_page(browser: str, url: str, profile, *extra: str) -> MonitorPage:
    """The page after its scripts ran (--virtual-time-budget lets its fetch and timers run first)."""
    result = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--user-data-dir={profile}",
         "--virtual-time-budget=5000", *extra, url], capture_output=True, text=True, timeout=120,
        stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-2000:]
    return MonitorPage(result.stdout)


def wait_for_page(browser: str, url: str, profile, done, deadline: float) -> MonitorPage:
    """Load the page until ``done(page)``; fail once ``deadline`` (time.monotonic) has passed."""
    while True:
        page = load_page(browser, url, profile, "--dump-dom")
        if done(page):
            return page
        assert time.monotonic() < deadline, f"the page still shows {page.nodes}, coverage {page.blocks}"


def check_assets(url: str) -> None:
    """Everything the page loads comes from the monitor itself, and the browser is told so (CSP)."""
    with urllib.request.urlopen(url) as response:
        html = response.read().decode()
        assert "default-src 'self'" in response.headers["Content-Security-Policy"]
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert assets and all(a.startswith("/") and not a.startswith("//") for a in assets), assets
    for asset in assets:
        with urllib.request.urlopen(url + asset) as response:
            assert response.status == 200
            text = response.read().decode().replace('xmlns="http://www.w3.org/2000/svg"', "")  # a name, not a fetch
            assert not re.search(r"https?://", text), f"{asset} names an outside URL"


def test_monitor_page_lists_nodes_and_shows_a_killed_one_failed(tiny_path, tmp_path):
    browser = chromium()
    profile = tmp_path / "chromium-profile"
    with LocalSwarm(tiny_path) as swarm:
        a, b = swarm.start_nodes(["0:4", "2:6"], "--ttl", str(TTL))
        monitor = Proc([*command("swarm"), "monitor", "--initial-peers", *swarm.peers, "--model", str(tiny_path),
                        "--port", "0", "--refresh", "0.5", "--probe-timeout", "2"], swarm.env)
        swarm.nodes.append(monitor)  # stopped with the swarm
        url = monitor.read_line(swarm.ready_timeout)
        check_assets(url)

        page = wait_for_page(browser, url, profile, lambda p: p.nodes.get(a) == p.nodes.get(b) == "ONLINE",
                             time.monotonic() + 60)
        assert set(page.nodes) == {a, b} and page.updated == "ok"
        assert page.blocks == {block: "ok" for block in range(6)}
        status = json.load(urllib.request.urlopen(url + "/api/status"))
        node = next(n for n in status["models"][0]["nodes"] if n["address"] == a)
        assert node["rtt_ms"] > 0 and node["cache_tokens"] > 0 and (node["start"], node["end"]) == (0, 4)

        swarm.nodes[0].popen.kill()  # node a: no OFFLINE announcement, its record stays until the TTL
        killed = time.monotonic()
        page = wait_for_page(browser, url, profile, lambda p: p.nodes.get(a, "gone") in ("FAILED", "gone"),
                             killed + TTL)
        print(f"the page showed the killed node {page.nodes.get(a, 'gone')} {time.monotonic() - killed:.1f} s after")
        assert page.nodes[b] == "ONLINE"
        assert page.blocks[0] == page.blocks[1] == "gap" and page.blocks[4] == "ok"  # only a served 0 and 1

        shot = tmp_path / "monitor.png"
        load_page(browser, url, profile, "--window-size=1400,900", f"--screenshot={shot}")
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert monitor.stop() == 0  # SIGTERM: a clean exit


def test_monitor_needs_peers_and_a_model(capsys):
    from client.cli import main

    assert main(["monitor", "--model", "x"]) == 2
    assert "give --initial-peers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["monitor", "--initial-peers", "/ip4/127.0.0.1/tcp/1"])
