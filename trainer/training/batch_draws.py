"""The random numbers of one training batch, drawn before anything is computed.

``training_step`` consumes the trainer's generator in a fixed order: σ_video and σ_audio, the video noise, the audio
noise, caption dropout, first-frame conditioning. Drawing them here, for a batch of ``total`` samples, lets a run
with several ranks draw the whole global batch on every rank (the generator is replicated) and keep its rows: each
sample gets the numbers it gets in one process, and a rank with an empty share still advances the generator.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from ..backends.interface import audio_token_count, video_token_count
from ..config import Config
from ..data.batches import Batch, caption_keep_masks
from .conditioning import draw_first_frame, timestep_config
from .timesteps import AUDIO_OFFSET_DIMS, VIDEO_OFFSET_DIMS, offset_noise, sample_modality_sigmas


@dataclass
class BatchDraws:
    """Per-sample random numbers of a batch; the first dimension of every tensor is the sample."""

    total: int  # samples of the whole batch (the global batch): the denominator of the batch-mean losses
    sigma_video: torch.Tensor  # [B]
    sigma_audio: torch.Tensor | None  # [B]; also for a silence target
    noise_video: torch.Tensor  # [B, C, F, H, W]
    noise_audio: torch.Tensor | None  # [B, 8, T, 16]
    caption_keep: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # [B] bool each: video, audio, mask
    first_frame: torch.Tensor | None  # [B] bool

    def rows(self, rows: slice) -> "BatchDraws":
        """The draws of some rows (one rank's share); ``total`` stays the whole batch's."""
        def take(value):
            if isinstance(value, torch.Tensor):
                return value[rows]
            if isinstance(value, tuple):
                return tuple(v[rows] for v in value)
            return value

        return BatchDraws(**{f.name: take(getattr(self, f.name)) for f in fields(self) if f.name != "total"},
                          total=self.total)


def draw_batch(batch: Batch, config: Config, generator: torch.Generator, *, audio_shape: tuple[int, ...] | None,
               total: int | None = None) -> BatchDraws:
    """The draws of a batch of ``total`` samples shaped like ``batch`` (default: ``batch`` itself).
    ``audio_shape``: the audio target of one batch row (real audio or the silence target), or None."""
    total = batch.size if total is None else total
    loss_cfg = config.loss
    video_shape = (total, *batch.video.shape[1:])
    audio_tokens = None if audio_shape is None else audio_token_count(torch.empty(audio_shape, device="meta"))
    sigma_video, sigma_audio = sample_modality_sigmas(
        timestep_config(config, batch), config.model.version, total, video_token_count(batch.video), audio_tokens,
        generator,
    )
    noise_video = offset_noise(video_shape, loss_cfg.noise_offset, VIDEO_OFFSET_DIMS, generator)
    noise_audio = None
    if audio_shape is not None:
        noise_audio = offset_noise((total, *audio_shape[1:]), loss_cfg.audio_noise_offset, AUDIO_OFFSET_DIMS, generator)
    caption_keep = None
    if loss_cfg.caption_dropout or loss_cfg.caption_dropout_video or loss_cfg.caption_dropout_audio:
        caption_keep = caption_keep_masks(total, loss_cfg.caption_dropout, loss_cfg.caption_dropout_video,
                                          loss_cfg.caption_dropout_audio, generator)
    first_frame = draw_first_frame(config.conditioning.first_frame_p, total, batch.video.shape[2], generator)
    return BatchDraws(total, sigma_video, sigma_audio, noise_video, noise_audio, caption_keep, first_frame)


def batch_mean(per_sample: torch.Tensor, total: int) -> torch.Tensor:
    """The mean over the whole batch of per-sample values of which ``per_sample`` holds some rows (a rank's
    share): their sum over ``total``. For the whole batch it is the plain mean."""
    if per_sample.shape[0] == total:
        return per_sample.mean()
    return per_sample.sum() / total
