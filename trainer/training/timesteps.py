"""Noise levels (σ) per modality for flow-matching training.

Each modality draws σ from a distribution shaped by its own token count: video (thousands of tokens)
gets a high-noise distribution, audio (~25 tokens per second) a much lower one. With
``independent_audio`` (the default) σ_a is an independent draw; otherwise audio reuses σ_v.
"""

from __future__ import annotations

import math

import torch

from ..config import TimestepConfig

STRETCHED_EPS = 1e-3
# Quantiles of N(0, 1) used by the stretched sampler: 0.5 % and 99.9 %.
STRETCH_LOW_Z = 2.5758
STRETCH_HIGH_Z = 3.0902


def token_count_mu(tokens: int) -> float:
    """μ of the shifted logit-normal: 0.95 at 1024 tokens, 2.05 at 4096, linear and unclamped."""
    return 0.95 + 1.1 * (tokens - 1024) / 3072


def resolve_shifted_mode(cfg: TimestepConfig, version: str) -> str:
    if cfg.shifted_mode != "auto":
        return cfg.shifted_mode
    return "stretched" if version == "2.3" else "legacy"


def sample_sigmas(
    cfg: TimestepConfig, version: str, batch: int, tokens: int, generator: torch.Generator
) -> torch.Tensor:
    """Draw ``batch`` σ values in [min_sigma, max_sigma] for a modality with ``tokens`` tokens."""
    if cfg.sampling == "uniform":
        unit = torch.rand(batch, generator=generator)
    else:
        if cfg.sampling == "logit_normal":
            mu = cfg.shift if cfg.shift is not None else 0.0
        else:
            mu = cfg.shift if cfg.shift is not None else token_count_mu(tokens)
        normal = torch.randn(batch, generator=generator) * cfg.logit_std + mu
        unit = torch.sigmoid(normal)
        if cfg.sampling == "shifted_logit_normal" and resolve_shifted_mode(cfg, version) == "stretched":
            unit = _stretch(unit, mu, cfg.logit_std, cfg.stretched_uniform_fraction, generator)
    # Bounds rescale rather than clamp, so no probability mass piles up on the edges.
    return cfg.min_sigma + (cfg.max_sigma - cfg.min_sigma) * unit


def _stretch(unit: torch.Tensor, mu: float, std: float, uniform_fraction: float, generator: torch.Generator) -> torch.Tensor:
    low = _sigmoid(mu - STRETCH_LOW_Z * std)
    high = _sigmoid(mu + STRETCH_HIGH_Z * std)
    stretched = (unit - low) / (high - low)
    # Reflect values below ε back above it (numerical floor), then cap at 1.
    stretched = torch.where(stretched < STRETCHED_EPS, 2 * STRETCHED_EPS - stretched, stretched)
    stretched = stretched.clamp(STRETCHED_EPS, 1.0)
    # A fraction of uniform draws keeps every noise level visited at large token counts.
    replace = torch.rand(unit.shape, generator=generator) < uniform_fraction
    uniform = STRETCHED_EPS + (1 - STRETCHED_EPS) * torch.rand(unit.shape, generator=generator)
    return torch.where(replace, uniform, stretched)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def sample_modality_sigmas(
    cfg: TimestepConfig, version: str, batch: int, video_tokens: int, audio_tokens: int | None, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(σ_v [B], σ_a [B] or None). σ_a is drawn from the audio token count when independent."""
    sigma_video = sample_sigmas(cfg, version, batch, video_tokens, generator)
    if audio_tokens is None:
        return sigma_video, None
    if not cfg.independent_audio:
        return sigma_video, sigma_video.clone()
    return sigma_video, sample_sigmas(cfg, version, batch, audio_tokens, generator)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Flow matching: x_σ = (1 - σ)·x0 + σ·ε, σ per sample broadcast over the remaining dims, or (video latents
    ``[B, C, F', H', W']``) per token ``[B, F'·H'·W']`` broadcast over the channels."""
    if sigma.ndim == 2:
        if x0.ndim != 5:
            raise ValueError(f"per-token σ {tuple(sigma.shape)} needs video latents [B, C, F', H', W'], got {tuple(x0.shape)}")
        s = sigma.reshape(x0.shape[0], 1, *x0.shape[2:]).to(x0.dtype)
        return (1 - s) * x0 + s * noise
    s = sigma.reshape(sigma.shape[0], *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def offset_noise(shape: tuple[int, ...], offset: float, constant_dims: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """N(0, 1) noise plus ``offset``·N(0, 1) that is constant along ``constant_dims`` (noise offset). Video
    ``[B, C, F, H, W]`` uses (2, 3, 4): one shift per sample and channel over all frames and pixels; audio
    ``[B, 8, T, 16]`` uses (2,): one per sample, channel and mel bin over time. With offset 0 no extra random
    numbers are drawn, so runs without it keep their exact noise."""
    noise = torch.randn(shape, generator=generator)
    if offset > 0:
        offset_shape = tuple(1 if i in constant_dims else size for i, size in enumerate(shape))
        noise = noise + offset * torch.randn(offset_shape, generator=generator)
    return noise


VIDEO_OFFSET_DIMS = (2, 3, 4)
AUDIO_OFFSET_DIMS = (2,)
