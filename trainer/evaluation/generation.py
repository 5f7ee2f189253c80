"""Audio+video generation with the trained adapter, and the same seed without it (A/B).

A plain Euler flow-matching sampler: from pure noise at σ = 1 to σ = 0 on a shifted schedule
(shift from the video token count, as the reference scheduler does), both modalities stepped with
their own velocity. Classifier-free guidance is optional (``guidance > 1`` with a negative context).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..backends.interface import DenoiserInput, TextContext
from ..training.timesteps import token_count_mu


@dataclass
class SampleRequest:
    text: TextContext  # batch of 1
    latent_frames: int
    latent_height: int
    latent_width: int
    audio_frames: int
    fps: float
    steps: int = 20
    seed: int = 0
    guidance: float = 1.0
    negative: TextContext | None = None


def sigma_schedule(steps: int, video_tokens: int) -> torch.Tensor:
    """``steps + 1`` σ values from 1 to 0, shifted towards high noise for long sequences."""
    shift = math.exp(token_count_mu(video_tokens))
    base = torch.linspace(1.0, 0.0, steps + 1)
    return shift * base / (1 + (shift - 1) * base)


@torch.no_grad()
def sample_av(denoiser, request: SampleRequest, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    device = torch.device(device)
    g = torch.Generator().manual_seed(request.seed)
    video = torch.randn(1, 128, request.latent_frames, request.latent_height, request.latent_width, generator=g).to(device)
    audio = torch.randn(1, 8, request.audio_frames, 16, generator=g).to(device)
    sigmas = sigma_schedule(request.steps, request.latent_frames * request.latent_height * request.latent_width)
    text = request.text.to(device)
    negative = request.negative.to(device) if request.negative is not None else None
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        s = sigma.reshape(1).to(device)
        v_video, v_audio = denoiser(DenoiserInput(video, audio, s, s, text, request.fps))
        if negative is not None and request.guidance != 1.0:
            n_video, n_audio = denoiser(DenoiserInput(video, audio, s, s, negative, request.fps))
            v_video = n_video + request.guidance * (v_video - n_video)
            v_audio = n_audio + request.guidance * (v_audio - n_audio)
        step = float(sigma_next - sigma)
        video = video + step * v_video.float()
        audio = audio + step * v_audio.float()
    return video, audio


def sample_ab(denoiser, network, request: SampleRequest, device: torch.device | str = "cpu") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The same request and seed with the adapter on ("lora") and off ("base")."""
    previous = network.multiplier
    was_training = network.training
    network.eval()
    try:
        network.set_multiplier(1.0)
        with_lora = sample_av(denoiser, request, device)
        network.set_multiplier(0.0)
        without = sample_av(denoiser, request, device)
    finally:
        network.set_multiplier(previous)
        network.train(was_training)
    return {"lora": with_lora, "base": without}
