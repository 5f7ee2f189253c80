"""``ltx2-av-trainer slider``: train a slider LoRA from two prompts on the base model (``[slider]``; no dataset, no
cache). The run directory, resumable state, metrics, report and exported LoRA are those of ``train``."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import ConfigError
from ..training.loop import TrainCallbacks, TrainResult
from ..training.slider import SliderTrainer, check_slider_config
from ..training.stopping import StopRequest, stop_on_signals
from .console import ConsoleTraining
from .pipeline import _announce, build_headless_denoiser, build_headless_encoders, run_and_report


def train_slider(config, denoiser, encoders, *, callbacks: TrainCallbacks | None = None, resume: str | None = None,
                 no_resume: bool = False, until_step: int | None = None, quiet: bool = False,
                 stop: StopRequest | None = None) -> TrainResult:
    """Encode the slider's three prompts with ``encoders`` and train; the base model is left as it was."""
    if resume and no_resume:
        raise ConfigError("--resume and --no-resume contradict each other: give one of them")
    check_slider_config(config)
    s = config.slider
    prompts = encoders.encode_text([s.target_class, s.positive, s.negative])
    trainer = SliderTrainer(config, denoiser, prompts, config.output.dir, callbacks, stop=stop)
    return run_and_report(config, trainer, resume=resume, no_resume=no_resume, until_step=until_step, quiet=quiet)


def run_slider_command(config, *, resume: str | None = None, no_resume: bool = False, quiet: bool = False) -> dict:
    check_slider_config(config)  # before any model is loaded
    denoiser = build_headless_denoiser(config)
    encoders = build_headless_encoders(config)
    tensorboard = Path(config.output.dir) / "tensorboard" if config.logging.tensorboard else None
    callbacks = ConsoleTraining(quiet=quiet or config.logging.quiet, tensorboard_dir=tensorboard)
    with stop_on_signals(StopRequest(), announce=_announce) as stop:
        result = train_slider(config, denoiser, encoders, callbacks=callbacks, resume=resume, no_resume=no_resume,
                              quiet=quiet, stop=stop)
    return json.loads((result.run_dir / "report.json").read_text(encoding="utf-8"))
