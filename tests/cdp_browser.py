"""A headless Chromium driven over the Chrome DevTools Protocol, just enough to test ComfyUI's frontend.

No browser-automation package: Chromium's own ``--remote-debugging-port`` and aiohttp's websocket client
(ComfyUI requires aiohttp). Methods are async; ``run(coro)`` runs one from a test.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import shutil
import subprocess
import time
import urllib.request
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

CHROMIUM = Path("/usr/bin/chromium")

# Headless, nothing that talks to the network or starts background services, fresh profile each run.
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-extensions", "--mute-audio", "--hide-scrollbars",
)


class BrowserError(RuntimeError):
    """A DevTools call failed or JavaScript threw; the message carries the browser's description."""


def chromium_missing_reason() -> str | None:
    if not CHROMIUM.is_file():
        return f"{CHROMIUM} is absent: install Debian's chromium (apt-get install -y chromium) for the browser tests"
    return None


@dataclass
class Page:
    """One tab: ``evaluate`` JavaScript, ``navigate``, ``screenshot``; console errors are collected."""

    ws: Any
    _ids: Any = field(default_factory=lambda: itertools.count(1))
    _pending: dict[int, asyncio.Future] = field(default_factory=dict)
    console_errors: list[str] = field(default_factory=list)
    _reader: asyncio.Task | None = None

    def start(self) -> None:
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self.ws:
            data = json.loads(message.data)
            if "id" in data and data["id"] in self._pending:
                self._pending.pop(data["id"]).set_result(data)
            elif data.get("method") == "Runtime.exceptionThrown":
                details = data["params"]["exceptionDetails"]
                text = details.get("exception", {}).get("description") or details.get("text")
                self.console_errors.append(f"{text} [{_origin(details.get('stackTrace'))}]")
            elif data.get("method") == "Runtime.consoleAPICalled" and data["params"]["type"] == "error":
                params = data["params"]
                text = " ".join(str(a.get("value", a.get("description", ""))) for a in params["args"])
                self.console_errors.append(f"{text} [{_origin(params.get('stackTrace'))}]")
        for future in self._pending.values():
            future.set_exception(BrowserError("the browser closed the DevTools connection"))

    async def send(self, method: str, params: dict | None = None, timeout_s: float = 60.0) -> dict:
        call_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        await self.ws.send_json({"id": call_id, "method": method, "params": params or {}})
        answer = await asyncio.wait_for(future, timeout_s)
        if "error" in answer:
            raise BrowserError(f"{method}: {answer['error']}")
        return answer["result"]

    async def evaluate(self, expression: str, timeout_s: float = 60.0) -> Any:
        """The JSON value of ``expression`` (awaited if it is a promise); a JavaScript exception raises."""
        result = await self.send(
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": True, "returnByValue": True},
            timeout_s,
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise BrowserError(details.get("exception", {}).get("description") or details.get("text"))
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout_s: float = 60.0) -> Any:
        """Poll until ``expression`` is truthy; returns its value."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"timed out after {timeout_s:.0f} s waiting for: {expression}")
            await asyncio.sleep(0.25)

    async def navigate(self, url: str) -> None:
        await self.send("Page.navigate", {"url": url})

    async def screenshot(self, path: Path) -> Path:
        result = await self.send("Page.captureScreenshot", {"format": "png"})
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(result["data"]))
        return path


def _origin(stack: dict | None) -> str:
    """Every script URL of a JavaScript stack (so an error can be traced to the file that raised it)."""
    frames = (stack or {}).get("callFrames", [])
    return " < ".join(f"{f['url']}:{f['lineNumber'] + 1}" for f in frames) or "no stack"


def _json_get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


@asynccontextmanager
async def chromium_page(profile_dir: Path, port: int, size: tuple[int, int] = (1600, 1000),
                        log_path: Path | None = None) -> AsyncIterator[Page]:
    """A fresh headless Chromium (profile in ``profile_dir``, DevTools on ``port``) and its first tab."""
    import aiohttp

    if profile_dir.exists():
        shutil.rmtree(profile_dir)
    profile_dir.mkdir(parents=True)
    log = open(log_path or profile_dir / "chromium.log", "w")
    process = subprocess.Popen(
        [str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile_dir}", f"--remote-debugging-port={port}",
         f"--window-size={size[0]},{size[1]}", "about:blank"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    log.close()
    try:
        deadline = time.monotonic() + 30
        targets: list[dict] = []
        while not targets:
            if process.poll() is not None:
                raise BrowserError(f"chromium exited with code {process.returncode}; see {log.name}")
            if time.monotonic() > deadline:
                raise BrowserError(f"chromium opened no DevTools port within 30 s; see {log.name}")
            try:
                targets = [t for t in _json_get(f"http://127.0.0.1:{port}/json/list") if t["type"] == "page"]
            except OSError:
                await asyncio.sleep(0.2)
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(targets[0]["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                page = Page(ws)
                page.start()
                await page.send("Runtime.enable")
                await page.send("Page.enable")
                await page.send("Emulation.setDeviceMetricsOverride",
                                {"width": size[0], "height": size[1], "deviceScaleFactor": 1, "mobile": False})
                yield page
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
