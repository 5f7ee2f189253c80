"""Audio+video generation with the trained adapter, and the same seed without it (A/B).

A plain Euler flow-matching sampler: from pure noise at σ = 1 to σ = 0 on a shifted schedule
(shift from the video token count, as the reference scheduler does), both modalities stepped with
their own velocity. Classifier-free guidance is optional (``guidance > 1`` with a negative context).

The training modes' conditioning, as ComfyUI's inference nodes apply it: a clean first latent frame kept at
σ = 0 (``LTXVImgToVideo``), an IC-LoRA guide and ID-LoRA reference audio passed to every step
(``DenoiserInput.video_guide`` / ``audio_reference``).
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
    first_frame: torch.Tensor | None = None  # [1, 128, 1, H', W'] clean first latent frame (image-to-video)
    video_guide: torch.Tensor | None = None  # [1, 128, Fg, H'/f, W'/f] IC-LoRA reference latents
    audio_reference: torch.Tensor | None = None  # [1, 8, Tr, 16] ID-LoRA reference audio latents


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
    guide = None if request.video_guide is None else request.video_guide.to(device)
    reference = None if request.audio_reference is None else request.audio_reference.to(device)
    first = None if request.first_frame is None else request.first_frame.to(device)
    tokens_per_frame = request.latent_height * request.latent_width
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        s = sigma.reshape(1).to(device)
        s_video = s
        if first is not None:  # the conditioning frame stays clean, at σ = 0 on its tokens
            video[:, :, :1] = first
            s_video = s.view(1, 1).repeat(1, request.latent_frames * tokens_per_frame)
            s_video[:, :tokens_per_frame] = 0.0
        v_video, v_audio = denoiser(DenoiserInput(video, audio, s_video, s, text, request.fps, guide, reference))
        if negative is not None and request.guidance != 1.0:
            n_video, n_audio = denoiser(DenoiserInput(video, audio, s_video, s, negative, request.fps, guide, reference))
            v_video = n_video + request.guidance * (v_video - n_video)
            v_audio = n_audio + request.guidance * (v_audio - n_audio)
        step = float(sigma_next - sigma)
        video = video + step * v_video.float()
        audio = audio + step * v_audio.float()
    if first is not None:
        video[:, :, :1] = first
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
