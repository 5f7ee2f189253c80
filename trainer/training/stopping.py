"""Stopping a run on a step boundary: the one mechanism behind Ctrl-C, SIGTERM and ComfyUI's Cancel.

Whoever wants training to stop calls ``StopRequest.request(reason)``: the CLI's signal handlers
(``stop_on_signals``), the ComfyUI callbacks when Cancel is pressed, a test. ``Trainer.run`` asks
``should_stop()`` between two optimizer steps, never inside one, so the state it then saves is exactly the
state a straight run has after that step; a run resumed from it continues bit for bit.

``should_stop()`` is the single place that decides: in a run with several ranks every rank agrees there (stop when
any rank was asked, with its reason), so that all of them stop after the same step.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

SIGNAL_EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}  # the shell's 128 + signal number


class StopRequest:
    """A request to stop at the next step boundary; thread-safe and set at most once (the first reason wins)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._reason: str | None = None
        self._lock = threading.Lock()
        self._agree: Callable[[str | None], str | None] | None = None

    def request(self, reason: str) -> None:
        with self._lock:
            if self._reason is None:
                self._reason = reason
            self._event.set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    @property
    def reason(self) -> str | None:
        return self._reason

    def agree_with(self, agree: Callable[[str | None], str | None]) -> None:
        """Several ranks: ``agree(this rank's reason or None)`` returns the reason any rank has to stop, or None
        (``distributed.World.stop_reason``, a collective every rank calls at the same boundary)."""
        self._agree = agree

    def should_stop(self) -> bool:
        """Whether the run stops at this step boundary (called by ``Trainer.run`` between steps, on every rank)."""
        if self._agree is None:
            return self.requested
        reason = self._agree(self._reason if self.requested else None)
        if reason is not None and not self.requested:
            self.request(reason)  # another rank was asked: this one stops for its reason
        return reason is not None


@contextmanager
def stop_on_signals(stop: StopRequest, announce: Callable[[str], None] | None = None) -> Iterator[StopRequest]:
    """While the block runs, SIGINT (Ctrl-C) and SIGTERM request a stop at the next boundary instead of
    raising; a second signal raises ``KeyboardInterrupt`` at once (the run then saves the last completed
    step). The previous handlers are restored on exit. Outside the main thread (ComfyUI runs nodes in a
    worker thread, and its handlers belong to it) nothing is installed."""
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    names = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}

    def handler(signum, frame):
        name = names.get(signum, str(signum))
        if stop.requested:
            raise KeyboardInterrupt(name)
        stop.request(name)
        if announce is not None:
            announce(f"{name}: stopping after the current step (send it again to stop at once)")

    previous = {signum: signal.getsignal(signum) for signum in names}
    try:
        for signum in names:
            signal.signal(signum, handler)
        yield stop
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def exit_code_for(reason: str | None) -> int:
    """The process exit code of a run stopped for ``reason`` (130 for SIGINT, 143 for SIGTERM, else 1)."""
    return SIGNAL_EXIT_CODES.get(reason or "", 1)
