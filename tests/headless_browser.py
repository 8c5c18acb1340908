"""Chromium (Debian's `chromium` package) driven over the DevTools protocol on a pipe
(`--remote-debugging-pipe`: JSON messages ending in NUL on fds 3 and 4), so no websocket
library is needed. Used by the report's browser test."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    def __init__(self, offline: bool = True) -> None:
        executable = chromium_path()
        if executable is None:
            raise FileNotFoundError("chromium is not installed: apt-get install -y chromium (scripts/test.sh does it)")
        self.profile = tempfile.mkdtemp(prefix="fedtune-chromium-")
        commands_r, self._commands = os.pipe()
        self._events, events_w = os.pipe()
        args = [executable, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--mute-audio",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--user-data-dir={self.profile}", "--remote-debugging-pipe", "about:blank"]
        # The network off for real: a fresh network namespace with no interfaces (when allowed).
        prefix = ["unshare", "-rn"] if offline and shutil.which("unshare") and _can_unshare() else []
        self.network_namespace = bool(prefix)
        self.proc = subprocess.Popen(
            [*prefix, "bash", "-c", f'exec "$0" "$@" 3<&{commands_r} 4>&{events_w}', *args],
            pass_fds=(commands_r, events_w), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(commands_r)
        os.close(events_w)
        self._buffer, self._next_id, self.events = b"", 0, []

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            if time.monotonic() > deadline:
                raise TimeoutError("chromium did not answer")
            chunk = os.read(self._events, 1 << 16)
            if not chunk:
                raise ConnectionError("chromium closed the DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        for event in self.events:
            if event.get("method") == method:
                return event
        while True:
            event = self._read_message(deadline)
            self.events.append(event)
            if event.get("method") == method:
                return event

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except (OSError, RuntimeError, TimeoutError, ConnectionError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._commands)
        os.close(self._events)
        shutil.rmtree(self.profile, ignore_errors=True)


def _can_unshare() -> bool:
    return subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode == 0


CHARTS_JS = """JSON.stringify([...document.querySelectorAll('svg.chart')].map(svg => {
  const box = svg.getBoundingClientRect();
  // a drawn mark has an area (a line path: a length) and is not hidden
  const drawn = m => { const b = m.getBBox(), style = getComputedStyle(m);
    const sized = m.tagName === 'path' ? (b.width > 0 || b.height > 0) : (b.width > 0 && b.height > 0);
    return sized && style.display !== 'none' && style.visibility !== 'hidden' && style.opacity !== '0'; };
  const marks = [...svg.querySelectorAll('.mark')].filter(drawn);
  return {name: svg.dataset.chart, width: box.width, height: box.height, marks: marks.length,
          total: svg.querySelectorAll('.mark').length};
}))"""


def load_page(path: Path, screenshot: Path | None = None) -> dict:
    """Open `path` from a file:// URL with the network off; return the charts as rendered, every
    request the page made, console and log messages, and (optionally) save a full-page screenshot."""
    browser = Browser()
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Network", "Log", "Runtime"):
            browser.send(f"{domain}.enable", session=session)
        browser.send("Network.emulateNetworkConditions", {"offline": True, "latency": 0, "downloadThroughput": -1,
                                                          "uploadThroughput": -1}, session=session)
        browser.send("Emulation.setDeviceMetricsOverride", {"width": 1200, "height": 900, "deviceScaleFactor": 1,
                                                            "mobile": False}, session=session)
        browser.send("Page.navigate", {"url": path.resolve().as_uri()}, session=session)
        browser.wait_for("Page.loadEventFired")
        value = browser.send("Runtime.evaluate", {"expression": CHARTS_JS, "returnByValue": True}, session=session)
        charts = json.loads(value["result"]["value"])
        if screenshot is not None:
            import base64

            shot = browser.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, session=session)
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            screenshot.write_bytes(base64.b64decode(shot["data"]))
        events = browser.events
        return {
            "charts": charts,
            "requests": [e["params"]["request"]["url"] for e in events if e.get("method") == "Network.requestWillBeSent"],
            "messages": [e["params"]["entry"]["text"] for e in events if e.get("method") == "Log.entryAdded"]
                        + [" ".join(str(a.get("value", "")) for a in e["params"]["args"])
                           for e in events if e.get("method") == "Runtime.consoleAPICalled"],
            "network_namespace": browser.network_namespace,
        }
    finally:
        browser.close()
