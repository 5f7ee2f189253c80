"""Regularisers that keep a LoRA from changing what it should not, and what replaces missing audio.

Preservation (``[preservation]``), each on the batch's own noisy latents and σ:

- ``dop`` (differential output preservation): the LoRA's prediction with the *class* prompt must match the
  base model's (LoRA off). Scopes the LoRA to the trigger word. +2 forwards (one without gradient), +1 backward.
- ``blank``: the same with the empty prompt, the CFG baseline at inference. +2 forwards, +1 backward.
- ``prior_divergence``: minus the distance between the LoRA's prediction on the training prompt and the base
  model's; against timid LoRAs. +1 forward without gradient, no extra backward. Unbounded below, so the
  multiplier stays small (0.05-0.1).

The prompts' text contexts come from the pipeline (``Trainer(..., preservation_contexts={"class": ctx,
"blank": ctx})``), encoded once with the same text encoder as the cache.

Audio-free batches (``audio.missing_audio``) never train audio towards zero latents:

- ``silence``: the batch becomes an audio batch whose target is the audio VAE's *encoded* silence
  (``SilenceLatents``, provided by the pipeline), with its own weight; no extra forward.
- ``audio_dop``: on silence latents, the LoRA's audio prediction must match the base model's; the loss is on
  the audio branch only. +2 forwards, +1 backward, on audio-free batches only.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from ..backends.interface import DenoiserInput, TextContext
from ..config import Config, ConfigError
from ..data.batches import Batch, audio_frames_for_video
from .timesteps import AUDIO_OFFSET_DIMS, add_noise, offset_noise, sample_sigmas

SilenceSource = torch.Tensor | Callable[[int], torch.Tensor]


def prediction_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.mean((pred.float() - target.float()) ** 2)


class SilenceLatents:
    """The audio VAE's encoded silence, ``[8, T, 16]`` for any T.

    ``source`` is a tensor ``[8, T0, 16]`` (the encoding of a long zero waveform; cut to T, or extended by
    repeating its last frame — silence is stationary) or a callable ``T -> [8, T, 16]``."""

    def __init__(self, source: SilenceSource):
        if not callable(source):
            source = torch.as_tensor(source).detach().float().cpu()
            if source.ndim != 3 or source.shape[0] != 8 or source.shape[2] != 16 or source.shape[1] < 1:
                raise ValueError(f"silence latent has shape {list(source.shape)}, expected [8, T, 16] (the audio VAE's "
                                 "encoding of a zero waveform)")
        self.source = source
        self._cache: dict[int, torch.Tensor] = {}

    def get(self, frames: int) -> torch.Tensor:
        if frames not in self._cache:
            if callable(self.source):
                latent = torch.as_tensor(self.source(frames)).detach().float().cpu()
            else:
                latent = self.source
                if latent.shape[1] < frames:
                    tail = latent[:, -1:].expand(-1, frames - latent.shape[1], -1)
                    latent = torch.cat([latent, tail], dim=1)
                latent = latent[:, :frames]
            if latent.ndim != 3 or latent.shape[0] != 8 or latent.shape[2] != 16 or latent.shape[1] != frames:
                raise ValueError(f"silence latent has shape {list(latent.shape)}, expected [8, {frames}, 16] (the audio VAE's "
                                 "encoding of a zero waveform)")
            if not torch.isfinite(latent).all():
                raise ValueError("silence latent has non-finite values; re-encode the silence with the audio VAE")
            self._cache[frames] = latent
        return self._cache[frames]

    def for_batch(self, batch: Batch) -> torch.Tensor:
        """``[B, 8, T, 16]`` silence spanning the batch's clips."""
        frames = audio_frames_for_video(batch.video.shape[2], batch.fps)
        return self.get(frames).unsqueeze(0).expand(batch.size, -1, -1, -1)


def require_silence(config: Config, silence: SilenceSource | None) -> SilenceLatents | None:
    mode = config.audio.missing_audio
    if mode == "skip":
        return None
    if silence is None:
        raise ConfigError(
            f"audio.missing_audio = {mode!r} needs the audio VAE's encoded silence (Trainer(..., silence_audio_latent=...): "
            "the pipeline encodes a zero waveform with the audio VAE). Use audio.missing_audio = \"skip\" without it"
        )
    return SilenceLatents(silence)


def audio_dop_draws(batch: Batch, silence: SilenceLatents, config: Config, generator: torch.Generator,
                    total: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """σ ``[total]`` and noise ``[total, 8, T, 16]`` of audio DOP for a batch of ``total`` samples shaped like
    ``batch`` (default: ``batch`` itself); a rank of a run with several ranks keeps its rows."""
    total = batch.size if total is None else total
    latent = silence.for_batch(batch)
    sigma = sample_sigmas(config.timesteps, config.model.version, total, latent.shape[2], generator)
    noise = offset_noise((total, *latent.shape[1:]), config.loss.audio_noise_offset, AUDIO_OFFSET_DIMS, generator)
    return sigma, noise


def audio_dop_loss(inputs: DenoiserInput, batch: Batch, denoiser, network, silence: SilenceLatents, config: Config,
                   generator: torch.Generator, device: torch.device, autocast_dtype,
                   draws: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Audio DOP on an audio-free batch: base vs LoRA audio prediction on noised silence (same video input).
    ``draws``: its σ and noise (``audio_dop_draws``); default: drawn here from ``generator``."""
    latent = silence.for_batch(batch).to(device)
    sigma, noise = draws if draws is not None else audio_dop_draws(batch, silence, config, generator)
    sigma, noise = sigma.to(device), noise.to(device)
    noisy = add_noise(latent, noise, sigma).to(inputs.video.dtype)
    probe = dataclasses.replace(inputs, audio=noisy, sigma_audio=sigma)
    with torch.no_grad(), network.disabled(), _autocast(device, autocast_dtype):
        _, base_audio = denoiser(probe)
    with _autocast(device, autocast_dtype):
        _, lora_audio = denoiser(probe)
    return prediction_mse(lora_audio, base_audio)


class Preservation:
    """dop / blank / prior divergence for one run."""

    def __init__(self, config: Config, contexts: dict[str, TextContext] | None):
        self.cfg = config.preservation
        contexts = contexts or {}
        needed = [name for name, on in (("class", self.cfg.dop), ("blank", self.cfg.blank)) if on]
        missing = [name for name in needed if name not in contexts]
        if missing:
            prompts = {"class": f"preservation.dop_class_prompt ({self.cfg.dop_class_prompt!r})", "blank": "the empty prompt \"\""}
            raise ConfigError(
                "preservation needs the text context of " + " and ".join(prompts[m] for m in missing)
                + ": the pipeline encodes it with the cache's text encoder and passes Trainer(..., preservation_contexts="
                + "{" + ", ".join(f"{m!r}: ctx" for m in missing) + "})"
            )
        self.contexts = {name: contexts[name] for name in needed}

    @property
    def active(self) -> bool:
        return self.cfg.dop or self.cfg.blank or self.cfg.prior_divergence

    @property
    def prompt_loss_names(self) -> list[str]:
        """The names ``prompt_losses`` returns, in its order."""
        return [name for name, key in (("dop", "class"), ("blank", "blank")) if key in self.contexts]

    def prompt_losses(self, inputs: DenoiserInput, denoiser, network, device, autocast_dtype) -> dict[str, torch.Tensor]:
        """``{"dop": loss, "blank": loss}`` (unweighted) for the enabled prompt preservations, each from a base
        forward without gradient and a LoRA forward with it, on the batch's noisy latents."""
        losses = {}
        for name, key in (("dop", "class"), ("blank", "blank")):
            if key not in self.contexts:
                continue
            probe = dataclasses.replace(inputs, text=_batched(self.contexts[key], inputs.video.shape[0], device, inputs.text.video.dtype))
            with torch.no_grad(), network.disabled(), _autocast(device, autocast_dtype):
                base = denoiser(probe)
            with _autocast(device, autocast_dtype):
                lora = denoiser(probe)
            losses[name] = _both_modalities_mse(lora, base)
        return losses

    def weight(self, name: str) -> float:
        return {"dop": self.cfg.dop_multiplier, "blank": self.cfg.blank_multiplier,
                "prior_divergence": self.cfg.prior_divergence_multiplier}[name]

    def prior_divergence(self, inputs: DenoiserInput, pred_video, pred_audio, denoiser, network, device, autocast_dtype) -> torch.Tensor:
        """Distance between the LoRA's prediction (with gradient) and the base model's on the training input;
        the loop subtracts it (weighted)."""
        with torch.no_grad(), network.disabled(), _autocast(device, autocast_dtype):
            base = denoiser(inputs)
        return _both_modalities_mse((pred_video, pred_audio), base)


def _both_modalities_mse(pred, target) -> torch.Tensor:
    loss = prediction_mse(pred[0], target[0])
    if pred[1] is not None and target[1] is not None:
        loss = loss + prediction_mse(pred[1], target[1])
    return loss


def _batched(context: TextContext, batch: int, device, dtype) -> TextContext:
    """An unbatched ``[L, D]`` context (or ``[1, L, D]``) repeated for the batch."""
    video, audio, mask = context.video, context.audio, context.mask
    if video.ndim == 2:
        video, audio, mask = video[None], audio[None], mask[None]
    return TextContext(video.expand(batch, -1, -1).to(device, dtype), audio.expand(batch, -1, -1).to(device, dtype),
                       mask.expand(batch, -1).to(device))


def _autocast(device: torch.device, dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
