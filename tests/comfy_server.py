"""Start and drive a real ComfyUI server (``main.py --cpu``) with this pack installed, for the end-to-end tiers.

The server runs from ``COMFYUI_PATH`` with ``--base-directory`` pointing at a temporary folder whose
``custom_nodes/ltx2-av-trainer`` is a symlink to this repository, so ComfyUI imports the pack exactly as it
would from a user's install, and whose ``models/`` holds the tiny test models. HTTP goes through the standard
library; the websocket (live ``ltx2av.train`` events) through aiohttp, which ComfyUI itself requires.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

REPO_ROOT = Path(__file__).resolve().parent.parent
PACK_FOLDER_NAME = "ltx2-av-trainer"  # the folder name users get from a git clone / the registry
MODEL_FOLDERS = ("checkpoints", "text_encoders", "loras", "diffusion_models", "vae")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class ComfyServerError(RuntimeError):
    """The server did not start, rejected a prompt, or a prompt failed; the message carries the details."""


def comfyui_checkout() -> Path | None:
    """The ComfyUI checkout named by ``COMFYUI_PATH``, or None when the variable is unset."""
    raw = os.environ.get("COMFYUI_PATH")
    if not raw:
        return None
    path = Path(raw).expanduser().resolve()
    if not (path / "main.py").is_file():
        raise ComfyServerError(f"COMFYUI_PATH={raw} holds no main.py: point it at a ComfyUI checkout")
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare_base_directory(base_dir: Path, extra_custom_nodes: dict[str, Path] | None = None) -> Path:
    """Create ComfyUI's folders under ``base_dir`` and link this pack (and any extra test packs) into it."""
    custom_nodes = base_dir / "custom_nodes"
    custom_nodes.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FOLDERS:
        (base_dir / "models" / name).mkdir(parents=True, exist_ok=True)
    for name in ("input", "output", "temp", "user"):
        (base_dir / name).mkdir(exist_ok=True)
    links = {PACK_FOLDER_NAME: REPO_ROOT, **(extra_custom_nodes or {})}
    for name, target in links.items():
        link = custom_nodes / name
        if link.is_symlink():
            link.unlink()
        elif link.exists():
            raise ComfyServerError(f"{link} exists and is not a link; use an empty base directory for the tests")
        link.symlink_to(target, target_is_directory=True)
    return base_dir


@dataclass
class HistoryEntry:
    """One finished prompt from ``/history``: its ui outputs per node and the execution messages."""

    prompt_id: str
    status: str  # "success" or "error"
    outputs: dict[str, dict[str, Any]]
    messages: list[tuple[str, dict]]

    def message(self, event: str) -> dict | None:
        return next((data for name, data in self.messages if name == event), None)


@dataclass
class ComfyServer:
    comfyui_path: Path
    base_dir: Path
    port: int
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen | None = None
    _object_info: dict | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ---- process ----------------------------------------------------------------------------------------

    def start(self, timeout_s: float = 120.0) -> "ComfyServer":
        """Start ``main.py --cpu`` and wait until it answers (after it has imported the custom nodes).

        The database lives in memory (no file left behind); the process gets its own session so that a Ctrl-C
        in the terminal reaches pytest, whose fixture teardown then stops the server."""
        command = [
            sys.executable, "main.py", "--cpu",
            "--listen", "127.0.0.1", "--port", str(self.port),
            "--base-directory", str(self.base_dir),
            "--database-url", "sqlite:///:memory:",
            "--disable-auto-launch",
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
               **self.env}
        log = open(self.log_path, "w", encoding="utf-8")
        self.process = subprocess.Popen(
            command, cwd=self.comfyui_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ComfyServerError(f"ComfyUI exited with code {self.process.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(OSError, ComfyServerError):
                self.get_json("/system_stats")
                return self
            time.sleep(0.5)
        self.stop()
        raise ComfyServerError(f"ComfyUI did not answer within {timeout_s:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=20)

    def log(self) -> str:
        """The server's console output so far, without colour codes."""
        return _ANSI.sub("", self.log_path.read_text(encoding="utf-8", errors="replace"))

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    # ---- HTTP -------------------------------------------------------------------------------------------

    def _request(self, path: str, payload: Any = None, timeout_s: float = 30.0) -> bytes:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(
            self.url + path, data=data, headers={"Content-Type": "application/json"} if data else {}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                body = response.read()
        except urllib.error.HTTPError as exc:
            raise ComfyServerError(f"{path}: HTTP {exc.code}: {exc.read().decode(errors='replace')}") from exc
        return body

    def get_json(self, path: str) -> Any:
        return json.loads(self._request(path))

    def get_bytes(self, path: str) -> bytes:
        return self._request(path)

    def get_text(self, path: str) -> str:
        return self._request(path).decode("utf-8")

    def post_json(self, path: str, payload: Any) -> Any:
        body = self._request(path, payload if payload is not None else {})
        return json.loads(body) if body else None

    def object_info(self) -> dict:
        if self._object_info is None:
            self._object_info = self.get_json("/object_info")
        return self._object_info

    def queue(self, prompt: dict, client_id: str | None = None) -> str:
        """POST an API-format prompt; returns its id. A rejected prompt raises with the server's node errors."""
        payload = {"prompt": prompt, "client_id": client_id or uuid.uuid4().hex}
        try:
            answer = self.post_json("/prompt", payload)
        except ComfyServerError as exc:
            raise ComfyServerError(f"ComfyUI rejected the prompt: {exc}") from None
        return answer["prompt_id"]

    def history(self, prompt_id: str) -> HistoryEntry | None:
        # ComfyUI adds a prompt to the history only once it has finished (successfully, with an error, or
        # interrupted); the status then says which.
        entry = self.get_json(f"/history/{prompt_id}").get(prompt_id)
        if not entry or "status" not in entry:
            return None
        status = entry["status"]
        return HistoryEntry(
            prompt_id=prompt_id,
            status=status.get("status_str", "?"),
            outputs=entry.get("outputs", {}),
            messages=[(name, data) for name, data in status.get("messages", [])],
        )

    def wait_for(self, prompt_id: str, timeout_s: float = 300.0, expect_success: bool = True) -> HistoryEntry:
        """Poll ``/history`` until the prompt finished. With ``expect_success`` a failure raises with the error
        ComfyUI recorded and the end of the server log."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            entry = self.history(prompt_id)
            if entry is not None:
                if expect_success and entry.status != "success":
                    error = entry.message("execution_error") or entry.messages
                    raise ComfyServerError(
                        f"prompt {prompt_id} ended with status {entry.status}: "
                        f"{json.dumps(error, indent=1)[:4000]}\n--- server log ---\n{self.log_tail()}"
                    )
                return entry
            if self.process is not None and self.process.poll() is not None:
                raise ComfyServerError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            time.sleep(0.5)
        raise ComfyServerError(f"prompt {prompt_id} did not finish within {timeout_s:.0f} s:\n{self.log_tail()}")

    def run(self, prompt: dict, timeout_s: float = 300.0) -> HistoryEntry:
        return self.wait_for(self.queue(prompt), timeout_s)

    def interrupt(self) -> None:
        self.post_json("/interrupt", {})

    # ---- websocket ----------------------------------------------------------------------------------------

    def run_with_events(
        self,
        prompt: dict,
        on_event: Callable[[str, dict], bool],
        timeout_s: float = 300.0,
    ) -> list[tuple[str, dict]]:
        """Queue ``prompt`` while listening on the websocket; ``on_event(type, data)`` sees every JSON message
        and returns True to stop listening. Returns the messages received (binary previews are skipped)."""
        return asyncio.run(self._listen(prompt, on_event, timeout_s))

    async def _listen(self, prompt: dict, on_event: Callable[[str, dict], bool], timeout_s: float) -> list:
        import aiohttp

        client_id = uuid.uuid4().hex
        received: list[tuple[str, dict]] = []
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"ws://127.0.0.1:{self.port}/ws?clientId={client_id}") as ws:
                await asyncio.to_thread(self.queue, prompt, client_id)
                deadline = time.monotonic() + timeout_s
                while True:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise ComfyServerError(f"no stopping event within {timeout_s:.0f} s:\n{self.log_tail()}")
                    message = await ws.receive(timeout=remaining)
                    if message.type != aiohttp.WSMsgType.TEXT:
                        if message.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                            raise ComfyServerError(f"websocket closed:\n{self.log_tail()}")
                        continue
                    event = json.loads(message.data)
                    received.append((event["type"], event.get("data") or {}))
                    if event["type"] == "execution_error":
                        raise ComfyServerError(f"execution error: {json.dumps(event['data'])[:4000]}")
                    if await asyncio.to_thread(on_event, event["type"], event.get("data") or {}):
                        return received


@contextlib.contextmanager
def running_comfyui(
    comfyui_path: Path, base_dir: Path, timeout_s: float = 120.0, env: dict[str, str] | None = None
) -> Iterator[ComfyServer]:
    """A started server on a free localhost port; stopped (and its log kept in ``base_dir``) on exit. ``env``: extra
    environment variables of the server process (server-side settings)."""
    server = ComfyServer(comfyui_path, base_dir, free_port(), base_dir / "comfyui.log", env=env or {})
    server.start(timeout_s)
    try:
        yield server
    finally:
        server.stop()
