"""The live loss chart of Train LoRA (the ``js/ltx2av_chart.js`` widget) and the node's progress bar.

After every step ``ComfyTraining`` sends ``PromptServer.instance.send_sync("ltx2av.train", point)``; the widget
draws the points whose ``node`` is its own node id. Train LoRA also returns every point of the run as
``ui["ltx2av_history"]``, so the chart comes back after a page reload, and one line about the queue as
``ui["ltx2av_status"]`` (the chart's status line shows it). The progress bar is ComfyUI's and follows the queue
(a queue of 4 steps goes 1/4 … 4/4, whatever the run's total), and the check after each step makes Cancel stop
within one step: Cancel seen there (or by the progress bar's hook) becomes the trainer's stop request, so the run
ends on that step boundary with its state saved; Train LoRA then raises ComfyUI's interrupt. A Cancel raised
inside one of ComfyUI's ops in the middle of a step ends the run too, and the trainer keeps the last completed step.
"""

from __future__ import annotations

from pathlib import Path

from ..trainer.app.console import ConsoleTraining
from ..trainer.backends.comfyui.env import import_model_management
from ..trainer.config import Config
from ..trainer.io_utils import read_jsonl

TRAIN_EVENT = "ltx2av.train"
ETA_WINDOW = 20  # steps averaged for the ETA
# Metrics copied into a chart event only on the steps that have them (held-out losses every N steps; the
# missing-audio regulariser on steps that drew an audio-free clip).
OPTIONAL_EVENT_KEYS = ("val_loss_video", "val_loss_audio", "regularizer", "loss_regularizer",
                       # from the A/B validation samples (validation.sample_every_steps)
                       "val_voice_score_lora", "val_voice_score_base", "val_audio_loss_fixed_sigma",
                       # the representation regularisers (crepa, self_flow)
                       "loss_crepa", "loss_self_flow", "loss_self_flow_frame", "loss_self_flow_delta")


def chart_point(node: str, row: dict, total: int, recent_step_times: list[float]) -> dict:
    """One chart event (the contract's payload) from a metrics.jsonl row."""
    recent = recent_step_times[-ETA_WINDOW:]
    mean_time = sum(recent) / len(recent) if recent else row["step_time_s"]
    point = {
        "node": node,
        "step": row["step"],
        "total": total,
        "loss_video": row["loss_video"],
        "loss_audio": row["loss_audio"],
        "audio_weight": row["audio_weight"],
        "step_time_s": row["step_time_s"],
        "eta_s": max(0, total - row["step"]) * mean_time,
    }
    for key in OPTIONAL_EVENT_KEYS:
        if row.get(key) is not None:
            point[key] = row[key]
    return point


def chart_history(node: str, rows: list[dict], total: int) -> list[dict]:
    """The chart points of every step in ``rows`` (metrics.jsonl), computed as the live events were."""
    points, times = [], []
    for row in rows:
        times.append(row["step_time_s"])
        points.append(chart_point(node, row, total, times))
    return points


def send_train_event(point: dict) -> bool:
    """Send one chart point to the browser; False when no ComfyUI server runs in this process."""
    try:
        from server import PromptServer
    except ImportError:  # library use (CLI, tests without a server): nobody to send to
        return False
    instance = getattr(PromptServer, "instance", None)
    if instance is None:
        return False
    instance.send_sync(TRAIN_EVENT, point)
    return True


class ComfyTraining(ConsoleTraining):
    """Console lines and TensorBoard (``ConsoleTraining``) plus ComfyUI's progress bar, Cancel and the chart."""

    def __init__(self, node: str, config: Config, until_step: int | None = None):
        tensorboard = Path(config.output.dir) / "tensorboard" if config.logging.tensorboard else None
        super().__init__(quiet=config.logging.quiet, tensorboard_dir=tensorboard)
        self.node = node
        self.total = config.train.steps
        self.until = min(until_step, self.total) if until_step is not None else self.total
        self.first_step = 0  # the step the queue resumed from
        self.points: list[dict] = []
        self._times: list[float] = []
        self._bar = None
        self.cancelled = False  # Cancel was seen between steps: the run stopped there (Train LoRA raises the interrupt)

    def on_start(self, trainer) -> None:
        import comfy.utils

        super().on_start(trainer)
        # The run so far (the trainer has already cut metrics.jsonl back to the resumed step).
        for row in read_jsonl(Path(trainer.run_dir) / "metrics.jsonl"):
            self._times.append(row["step_time_s"])
            self.points.append(chart_point(self.node, row, self.total, self._times))
        self.first_step = trainer.step
        self._bar = comfy.utils.ProgressBar(max(1, self.until - self.first_step))
        self._watch_cancel(trainer, lambda: self._bar.update_absolute(0))

    def on_step(self, trainer, metrics: dict) -> None:
        super().on_step(trainer, metrics)
        self._times.append(metrics["step_time_s"])
        point = chart_point(self.node, metrics, self.total, self._times)
        self.points.append(point)
        send_train_event(point)
        # The bar's hook raises on Cancel but is throttled; the explicit check makes Cancel stop within one step.
        self._watch_cancel(trainer, lambda: self._bar.update_absolute(metrics["step"] - self.first_step))
        self._watch_cancel(trainer, import_model_management().throw_exception_if_processing_interrupted)

    def _watch_cancel(self, trainer, call) -> None:
        """Run ``call``; ComfyUI's interrupt it raises becomes the trainer's stop request (a step boundary)."""
        try:
            call()
        except import_model_management().InterruptProcessingException:
            self.cancelled = True
            trainer.stop.request("ComfyUI Cancel")


def queue_status(run_name: str, start: int, step: int, total: int) -> str:
    """The line the chart shows for a queue that trained ``start``..``step`` of ``total`` steps."""
    if step <= start:
        return (f"{run_name}: already trained {step} of {total} steps. Raise train_steps in the Training Config to "
                "continue this run, or use a new run_name.")
    if step >= total:
        return f"{run_name}: trained steps {start + 1}-{step}; the run is complete ({step} of {total} steps)."
    return f"{run_name}: trained steps {start + 1}-{step} ({step} of {total}); queue again to continue."
