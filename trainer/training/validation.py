"""Validation loss per modality on held-out items, at fixed σ with fixed noise.

Every validation item is scored at every σ of ``validation.sigmas`` (the same σ for video and audio), with
noise drawn from a generator seeded by (``validation.seed``, item, σ index): two calls on the same weights
give the same numbers, and the losses of different steps are comparable. The adapter runs in eval mode
(no dropout), nothing touches the training RNG, and a schedule-free optimizer is scored at its averaged
weights. Losses are the plain element-wise loss (``loss.type``), masked like training, without dataset
weights, noise offset or caption dropout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import Config
from ..data.batches import LatentSample, collate
from .conditioning import condition_inputs
from .losses import audio_padding_mask, elementwise_loss, masked_per_sample_loss
from .timesteps import add_noise, velocity_target


@dataclass
class ValidationLosses:
    loss_video: float | None  # None in the audio-only mode (the stand-in video is no target)
    loss_audio: float | None  # None when no validation item has audio
    items: int


@torch.no_grad()
def validation_losses(samples: list[LatentSample], denoiser, network, config: Config, device: torch.device,
                      autocast_dtype, text_for_batch=None) -> ValidationLosses:
    """Mean video / audio loss over items x σ. ``text_for_batch(batch)`` gives the text context when the
    connectors are trained (default: the cached context)."""
    cfg, loss_cfg = config.validation, config.loss
    was_training = network.training
    network.eval()
    video_total, video_count, audio_total, audio_count = 0.0, 0, 0.0, 0
    try:
        for item, sample in enumerate(samples):
            batch = collate([sample])
            video = batch.video.to(device, torch.float32)
            audio = None if batch.audio is None else batch.audio.to(device, torch.float32)
            text = text_for_batch(batch) if text_for_batch is not None else batch.text.to(device, autocast_dtype or torch.float32)
            for index, sigma_value in enumerate(cfg.sigmas):
                generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + item * 1_009 + index)
                sigma = torch.full((1,), float(sigma_value), device=device)
                noise_video = torch.randn(video.shape, generator=generator).to(device)
                noise_audio = None if audio is None else torch.randn(audio.shape, generator=generator).to(device)
                dtype = autocast_dtype or torch.float32
                # The training mode's references, as in training (never the random first-frame conditioning).
                conditioned = condition_inputs(
                    batch, config.conditioning.mode, video, add_noise(video, noise_video, sigma).to(dtype), sigma,
                    None if audio is None else add_noise(audio, noise_audio, sigma).to(dtype),
                    None if audio is None else sigma, text,
                )
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    pred_video, pred_audio = denoiser(conditioned.inputs)
                if conditioned.train_video:
                    video_total += float(masked_per_sample_loss(
                        elementwise_loss(pred_video, velocity_target(video, noise_video), loss_cfg.type, loss_cfg.huber_delta), None).mean())
                    video_count += 1
                if audio is not None:
                    mask = audio_padding_mask(audio, batch.audio_valid_frames)
                    audio_total += float(masked_per_sample_loss(
                        elementwise_loss(pred_audio, velocity_target(audio, noise_audio), loss_cfg.type, loss_cfg.huber_delta), mask).mean())
                    audio_count += 1
    finally:
        network.train(was_training)
    return ValidationLosses(video_total / video_count if video_count else None,
                            audio_total / audio_count if audio_count else None, len(samples))
