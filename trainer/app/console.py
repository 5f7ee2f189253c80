"""Console output for long commands: a progress bar with rate and ETA on a terminal, plain lines
otherwise, nothing but errors with ``--quiet``. Also the training callback that prints the audio log
line every ``logging.log_every`` steps and mirrors metrics to TensorBoard when asked."""

from __future__ import annotations

import sys
import time

from ..training.loop import TrainCallbacks


class Progress:
    def __init__(self, total: int, label: str, *, quiet: bool = False, stream=None, start: int = 0):
        self.total = max(1, total)
        self.label = label
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start_count = start
        self.count = start
        self.started = time.monotonic()
        self._last_plain = 0.0

    def update(self, count: int | None = None, note: str = "") -> None:
        self.count = self.count + 1 if count is None else count
        if self.quiet:
            return
        done = self.count - self.start_count
        elapsed = time.monotonic() - self.started
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.count) / rate if rate > 0 else 0.0
        text = f"{self.label} {self.count}/{self.total} {rate:.2f}/s ETA {_clock(eta)}" + (f" {note}" if note else "")
        if self.tty:
            width = 24
            filled = int(width * self.count / self.total)
            self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {text}\033[K")
            if self.count >= self.total:
                self.stream.write("\n")
            self.stream.flush()
        elif self.count >= self.total or time.monotonic() - self._last_plain > 10:
            self._last_plain = time.monotonic()
            self.stream.write(text + "\n")
            self.stream.flush()

    def line(self, text: str) -> None:
        """A message that must not be mangled by the bar."""
        if self.quiet:
            return
        self.stream.write(("\r\033[K" if self.tty else "") + text + "\n")
        self.stream.flush()


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ConsoleTraining(TrainCallbacks):
    """Progress bar, the periodic audio/video loss line, warnings, and optional TensorBoard."""

    def __init__(self, quiet: bool = False, tensorboard_dir=None):
        self.quiet = quiet
        self.progress: Progress | None = None
        self.writer = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise RuntimeError("logging.tensorboard = true needs the tensorboard package: pip install tensorboard") from None
            self.writer = SummaryWriter(str(tensorboard_dir))

    def on_start(self, trainer) -> None:
        self.progress = Progress(trainer.config.train.steps, "train", quiet=self.quiet, start=trainer.step)
        if trainer.resumed_from:
            self.progress.line(f"resumed from step {trainer.resumed_from} ({trainer.last_state})")

    def on_step(self, trainer, metrics: dict) -> None:
        self.progress.update(metrics["step"], f"loss={metrics['loss']:.4f}")
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                    self.writer.add_scalar(key, value, metrics["step"])

    def on_log(self, trainer, line: str) -> None:
        self.progress.line(line)

    def on_warning(self, trainer, message: str) -> None:
        if self.progress:
            self.progress.line("warning: " + message)
        else:
            print("warning: " + message, file=sys.stderr)

    def on_checkpoint(self, trainer, lora_path, state_path) -> None:
        if self.progress:
            self.progress.line(f"saved {lora_path.name} and resumable state {state_path.name}")

    def on_end(self, trainer, result) -> None:
        if self.writer is not None:
            self.writer.close()
