"""The small interfaces every model backend implements (diffusers headless, ComfyUI in the nodes).

The trainer only ever talks to a ``Denoiser`` and an ``Encoders`` object. Latent layouts follow the
reference: video ``[B, 128, F', H/32, W/32]``, audio ``[B, 8, T, 16]`` (25 latents per second), both
normalised as the VAEs define. σ is in [0, 1]; backends scale it for their model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol, runtime_checkable

import torch
from torch import nn

AUDIO_LATENT_CHANNELS = 8
AUDIO_LATENT_MEL_BINS = 16
VIDEO_LATENT_CHANNELS = 128
AUDIO_SAMPLE_RATE = 16000  # what the LTX-2 audio VAE takes (stereo)
AUDIO_LATENTS_PER_SECOND = 25.0  # 16 kHz, hop 160, time ÷4 in the audio VAE


@dataclass
class TextContext:
    """Text conditioning as the denoiser consumes it (after the text connectors).

    ``video``: ``[B, L, D_video_ctx]``, ``audio``: ``[B, L, D_audio_ctx]``, ``mask``: ``[B, L]`` with 1
    for real tokens. For LTX-2.0 both streams have the caption width (3840 on the real model); for
    LTX-2.3 each has its stream's width.
    """

    video: torch.Tensor
    audio: torch.Tensor
    mask: torch.Tensor

    def to(self, device=None, dtype=None) -> "TextContext":
        return TextContext(
            self.video.to(device=device, dtype=dtype),
            self.audio.to(device=device, dtype=dtype),
            self.mask.to(device=device),
        )

    def select(self, index) -> "TextContext":
        return TextContext(self.video[index], self.audio[index], self.mask[index])


@dataclass
class DenoiserInput:
    """One denoiser call. ``audio`` is None for a batch without audio: the audio branch and both
    cross-modal attentions are then switched off, so video is not conditioned on dummy audio.

    Optional in-context conditioning (``layouts.py`` places it as ComfyUI's inference nodes do; the velocities
    returned cover ``video`` and ``audio`` only): ``video_guide`` holds clean IC-LoRA reference latents, appended
    after the video tokens with σ = 0 (``LTXVAddGuide`` at frame 0; a guide with 1/f of the video's height and
    width is a downscaled reference); ``audio_reference`` holds clean reference audio latents, prepended to the
    audio tokens with σ = 0 at negative times (``LTXVReferenceAudio``)."""

    video: torch.Tensor  # [B, 128, F', H', W'] noisy video latents
    audio: torch.Tensor | None  # [B, 8, T, 16] noisy audio latents
    sigma_video: torch.Tensor  # [B] or per token [B, F'·H'·W']
    sigma_audio: torch.Tensor | None  # [B] or per token [B, T]
    text: TextContext
    fps: float
    video_guide: torch.Tensor | None = None  # [B, 128, Fg, H'/f, W'/f] clean reference latents (IC-LoRA)
    audio_reference: torch.Tensor | None = None  # [B, 8, Tr, 16] clean reference audio latents (ID-LoRA)


@dataclass
class EncodedAudio:
    latents: torch.Tensor  # [B, 8, T, 16], float32, normalised
    valid_frames: list[int]  # latent frames per sample that come from real (unpadded) audio


@runtime_checkable
class Denoiser(Protocol):
    """Predicts flow-matching velocities (ε - x0) for both modalities."""

    version: str  # "2.0" or "2.3"

    def __call__(self, inputs: DenoiserInput) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns (video velocity in the video latent layout, audio velocity in the audio layout)."""
        ...

    @property
    def module(self) -> nn.Module:
        """The root torch module (adapters attach below it; parameters are frozen by the trainer)."""
        ...

    def adaptable_modules(self) -> Iterator[tuple[str, nn.Module]]:
        """(reference module path, module) for every Linear an adapter may target, e.g.
        ``transformer_blocks.3.audio_attn1.to_q``. Reference naming is ComfyUI's naming."""
        ...

    def fingerprint(self) -> str:
        """A short stable hash of the base weights and architecture (stored in LoRA metadata)."""
        ...


class Encoders(Protocol):
    """Media → latents and text → TextContext, and back for previews."""

    audio_sample_rate: int  # the audio VAE's input rate (16 kHz for LTX-2)

    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        """``[B, 3, F, H, W]`` in [-1, 1] → ``[B, 128, F', H/32, W/32]``."""
        ...

    def encode_audio(self, waveform: torch.Tensor) -> torch.Tensor:
        """``[B, 2, S]`` at ``audio_sample_rate`` → ``[B, 8, T, 16]`` (fp32, posterior mean, normalised)."""
        ...

    def encode_audio_padded(self, waveform: torch.Tensor, valid_samples) -> EncodedAudio:
        """Like ``encode_audio`` for zero-padded clips, with the latent frames that come from real audio."""
        ...

    def audio_latent_frames(self, num_samples: int) -> int:
        """Audio latent frames for ``num_samples`` samples at ``audio_sample_rate`` (25 per second)."""
        ...

    def decode_video(self, latents: torch.Tensor) -> torch.Tensor:
        """``[B, 128, F', H', W']`` → frames ``[B, 3, F, H, W]`` in [-1, 1] (previews)."""
        ...

    def decode_audio(self, latents: torch.Tensor) -> tuple[torch.Tensor, int]:
        """``[B, 8, T, 16]`` → (waveform ``[B, 2, S]``, sample rate)."""
        ...

    def encode_text(self, prompts: list[str]) -> TextContext:
        ...

    def fingerprint(self) -> str:
        ...


def encode_padded_audio(encoders: "Encoders", waveform: torch.Tensor, valid_samples) -> EncodedAudio:
    """``encoders.encode_audio`` of a zero-padded batch, with each sample's latent frames that come from real
    audio (``audio_latent_frames`` of its valid sample count, at most the encoded length)."""
    if len(valid_samples) != waveform.shape[0]:
        raise ValueError(f"{len(valid_samples)} valid lengths for a batch of {waveform.shape[0]} waveforms")
    latents = encoders.encode_audio(waveform)
    valid = []
    for count in valid_samples:
        if not 0 < int(count) <= waveform.shape[-1]:
            raise ValueError(f"valid sample count {count} outside 1..{waveform.shape[-1]}")
        valid.append(min(encoders.audio_latent_frames(int(count)), latents.shape[2]))
    return EncodedAudio(latents, valid)


def video_token_count(latent: torch.Tensor) -> int:
    return int(latent.shape[2] * latent.shape[3] * latent.shape[4])


def audio_token_count(latent: torch.Tensor) -> int:
    return int(latent.shape[2])
