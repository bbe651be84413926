"""Headless Chromium for the tests, driven over ``--remote-debugging-pipe`` with the standard library only.

The DevTools protocol runs over file descriptors 3 (commands in) and 4
(replies and events out), one JSON message per NUL-terminated chunk.
:func:`open_page` loads a file with the network emulated offline and returns
what the page did: every request it sent, console messages and exceptions,
and screenshots under the themes asked for.

Chromium comes from Debian's package (``apt-get install chromium``; ``.ci/run``
installs it); :func:`find_chromium` returns None when it is missing, and the
tests skip saying so.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-default-apps", "--disable-extensions",
    "--mute-audio", "--hide-scrollbars", "--proxy-server=127.0.0.1:9",  # a request that got past offline mode fails
    "--remote-debugging-pipe",
]


def _log():
    """Chromium's own log (it is chatty about D-Bus): kept when CODEQ_CHROMIUM_LOG names a file."""
    path = os.environ.get("CODEQ_CHROMIUM_LOG")
    return open(path, "ab") if path else subprocess.DEVNULL


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class PageRun:
    requests: list[str] = field(default_factory=list)  # URLs the page asked for (the page itself included)
    errors: list[str] = field(default_factory=list)  # console errors, exceptions, failed loads
    screenshots: dict[str, bytes] = field(default_factory=dict)  # theme -> PNG


class _Pipe:
    def __init__(self, binary: str, profile: str) -> None:
        cmd_r, self._cmd_w = os.pipe()  # we write commands, Chromium reads fd 3
        self._out_r, out_w = os.pipe()  # Chromium writes fd 4, we read

        def child() -> None:  # runs before Popen closes the fds outside pass_fds
            import fcntl

            high_r, high_w = fcntl.fcntl(cmd_r, fcntl.F_DUPFD, 10), fcntl.fcntl(out_w, fcntl.F_DUPFD, 10)
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)

        self.proc = subprocess.Popen([binary, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=_log(),
                                     pass_fds=(3, 4), preexec_fn=child)
        os.close(cmd_r)
        os.close(out_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []

    def _read(self, deadline: float) -> dict:
        import select

        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._out_r], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._out_r, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the pipe")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        for i, e in enumerate(self.events):
            if e.get("method") == method:
                return self.events.pop(i)
        while True:
            e = self._read(deadline)
            if e.get("method") == method:
                return e
            self.events.append(e)

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._cmd_w)
        os.close(self._out_r)


def open_page(path: Path, themes: tuple[str, ...] = ("light",), width: int = 1200, height: int = 900,
              full_page: bool = True, binary: str | None = None, scale: float = 1.0) -> PageRun:
    """Load ``path`` offline and take one screenshot per theme: ``light``, ``dark`` or ``print``."""
    binary = binary or find_chromium()
    if binary is None:
        raise RuntimeError("no Chromium found")
    run = PageRun()
    with tempfile.TemporaryDirectory(prefix="codeq-chromium-") as profile:
        pipe = _Pipe(binary, profile)
        try:
            targets = pipe.send("Target.getTargets")["targetInfos"]
            page = next(t for t in targets if t["type"] == "page")
            session = pipe.send("Target.attachToTarget", {"targetId": page["targetId"], "flatten": True})["sessionId"]
            for domain in ("Page", "Network", "Runtime", "Log"):
                pipe.send(f"{domain}.enable", session=session)
            pipe.send("Network.emulateNetworkConditions", {"offline": True, "latency": 0, "downloadThroughput": -1,
                                                           "uploadThroughput": -1}, session=session)
            pipe.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                             "mobile": False}, session=session)
            pipe.events.clear()  # about:blank's own events
            pipe.send("Page.navigate", {"url": path.resolve().as_uri()}, session=session)
            pipe.wait_for("Page.loadEventFired")
            for theme in themes:
                media = "print" if theme == "print" else "screen"
                scheme = "dark" if theme == "dark" else "light"
                pipe.send("Emulation.setEmulatedMedia", {"media": media, "features": [
                    {"name": "prefers-color-scheme", "value": scheme}]}, session=session)
                params: dict = {"format": "png", "captureBeyondViewport": full_page}
                if full_page:
                    size = pipe.send("Page.getLayoutMetrics", session=session)["cssContentSize"]
                    params["clip"] = {"x": 0, "y": 0, "width": width, "height": min(size["height"], 16000),
                                      "scale": scale}
                shot = pipe.send("Page.captureScreenshot", params, session=session)
                run.screenshots[theme] = base64.b64decode(shot["data"])
            time.sleep(0.2)
            pipe.send("Runtime.evaluate", {"expression": "1"}, session=session)  # flush events still in flight
        finally:
            pipe.close()
    for e in pipe.events:
        m, p = e.get("method"), e.get("params", {})
        if m == "Network.requestWillBeSent":
            run.requests.append(p["request"]["url"])
        elif m == "Network.loadingFailed":
            run.errors.append(f"load failed: {p.get('errorText')}")
        elif m == "Runtime.exceptionThrown":
            run.errors.append(f"exception: {p['exceptionDetails'].get('text')}")
        elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert", "warning"):
            run.errors.append(f"console {p['type']}: {[a.get('value') for a in p.get('args', [])]}")
        elif m == "Log.entryAdded" and p["entry"].get("level") in ("error", "warning"):
            run.errors.append(f"log {p['entry']['level']}: {p['entry'].get('text')}")
    return run


if __name__ == "__main__":  # a screenshot for the docs: python tests/browser.py PAGE.html OUT.png [light|dark|print]
    import sys

    page, out = Path(sys.argv[1]), Path(sys.argv[2])
    theme = sys.argv[3] if len(sys.argv) > 3 else "light"
    result = open_page(page, themes=(theme,), width=1100, scale=0.75)
    if result.errors or result.requests != [page.resolve().as_uri()]:
        sys.exit(f"the page misbehaved: requests {result.requests}, errors {result.errors}")
    out.write_bytes(result.screenshots[theme])
    print(f"wrote {out} ({out.stat().st_size / 1e3:.0f} kB)")
