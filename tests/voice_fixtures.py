"""Helpers for the audio-free / preservation / sampler / network tests: mixed audio and audio-free samples,
and probes of the denoiser's output with the adapter on and off."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ltx2_av_trainer.trainer.backends.interface import DenoiserInput, TextContext
from ltx2_av_trainer.trainer.data.batches import LatentSample

from latent_fixtures import make_samples


def mixed_samples(config, audio: int, silent: int, *, images: int = 0, audio_problem: str | None = "no audio stream") -> list[LatentSample]:
    """``audio`` clips with audio, ``silent`` clips whose audio failed (``audio_problem``), ``images`` 1-frame items."""
    samples = make_samples(config, audio, seed=1) if audio else []
    for i, s in enumerate(make_samples(config, silent, with_audio=False, seed=2)):
        s.id, s.audio_problem = f"silent{i}", audio_problem
        samples.append(s)
    for i, s in enumerate(make_samples(config, images, with_audio=False, latent_frames=1, seed=3)):
        s.id, s.expects_audio = f"image{i}", False
        samples.append(s)
    return samples


def probe_input(config, *, audio: bool = True, text: TextContext | None = None, seed: int = 5) -> DenoiserInput:
    """A fixed noisy input (not a training item) to compare the adapted and the base model on."""
    from latent_fixtures import text_widths

    g = torch.Generator().manual_seed(seed)
    dv, da = text_widths(config)
    if text is None:
        text = TextContext(torch.randn(1, 8, dv, generator=g), torch.randn(1, 8, da, generator=g), torch.ones(1, 8))
    return DenoiserInput(
        video=torch.randn(1, 128, 2, 4, 4, generator=g),
        audio=torch.randn(1, 8, 13, 16, generator=g) if audio else None,
        sigma_video=torch.tensor([0.6]),
        sigma_audio=torch.tensor([0.4]) if audio else None,
        text=text,
        fps=25.0,
    )


@torch.no_grad()
def relative_drift(trainer, probe: DenoiserInput, modality: int) -> float:
    """‖adapted − base‖ / ‖base‖ of one output (0 = video, 1 = audio) on ``probe``."""
    adapted = trainer.denoiser(probe)[modality]
    with trainer.network.disabled():
        base = trainer.denoiser(probe)[modality]
    return float((adapted - base).norm() / base.norm())


def metric_rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
