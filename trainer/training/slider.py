"""Slider LoRAs: a direction between two prompts, learned from the base model alone (``[slider]``, the
``ltx2-av-trainer slider`` command). No dataset: every step starts from fresh noise.

The concept-slider objective (Gandikota et al., as ai-toolkit and the musubi-tuner LTX-2 fork train text sliders):
with d = v(x_σ, positive) - v(x_σ, negative) the base model's velocity difference, the LoRA at strength +1 on the
``target_class`` prompt must predict ``v(x_σ, target) + η·d`` and at -1 ``v(x_σ, target) - η·d`` (η =
``guidance_strength``). A LoRA is close to linear in its strength, so any strength scales the step along d, and
ComfyUI's LoRA loader applies the file at a negative strength as well as a positive one.

One micro-batch (``SliderTrainer._micro_batch``):

1. Noise ε and σ per modality, drawn as for training (``[timesteps]``) from the token counts of a clip of
   ``dataset.frames`` x ``width`` x ``height`` (and its audio when ``dataset.with_audio``). x_σ is reached by
   ``denoise_steps`` Euler steps of the base model with the target prompt from x_1 = ε, so the slider learns on latents
   the model meets when sampling (0: x = ε at σ = 1).
2. The base model's velocities for the target, positive and negative prompts: one forward without gradient over the
   three prompts.
3. The LoRA at +1 and at -1, each a forward and a backward (their graphs never coexist), MSE per modality against its
   target, weighted by ``loss.video_weight`` / ``loss.audio_weight``; the step's objective is the mean of the two.

Everything else — optimizer, schedule, checkpoints, resume bit for bit, stopping, metrics, export — is the
``Trainer``'s: the slider's one training item is a synthetic ``LatentSample`` holding the latent geometry and the
target prompt's context.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math

import torch

from ..backends.interface import DenoiserInput, TextContext, audio_token_count, video_token_count
from ..config import Config, ConfigError
from ..data.batches import Batch, LatentSample, audio_frames_for_video, collate
from .loop import Trainer, _StepTally
from .preservation import prediction_mse
from .timesteps import sample_modality_sigmas

PROMPTS = ("target", "positive", "negative")


def check_slider_config(config: Config) -> None:
    """The options a slider run needs, and those it cannot honour (one line each, naming the key)."""
    s = config.slider
    if not s.positive.strip() or not s.negative.strip():
        raise ConfigError("slider.positive and slider.negative: give both prompts (the slider moves from the negative "
                          "towards the positive one)")
    if s.positive.strip() == s.negative.strip():
        raise ConfigError("slider.positive and slider.negative are the same prompt: there is no direction to learn")
    unused = [key for key, on in (
        ("preservation.dop", config.preservation.dop), ("preservation.blank", config.preservation.blank),
        ("preservation.prior_divergence", config.preservation.prior_divergence),
        ("crepa.enabled", config.crepa.enabled), ("self_flow.enabled", config.self_flow.enabled),
        ("audio.missing_audio", config.audio.missing_audio != "skip"), ("network.connectors", config.network.connectors != "off"),
        ("conditioning.mode", config.conditioning.mode != "av"), ("conditioning.first_frame_p", config.conditioning.first_frame_p > 0),
    ) if on]
    if unused:
        raise ConfigError(f"{unused[0]}: a slider run trains from prompts alone and does not use it; reset it to its default "
                          "for `ltx2-av-trainer slider`")


def slider_item(config: Config, target: TextContext) -> LatentSample:
    """The slider's one training item: the latent geometry of a ``dataset.frames`` x ``width`` x ``height`` clip (its
    latents are never read) and the target prompt's context."""
    d = config.dataset
    frames = (d.frames - 1) // 8 + 1
    video = torch.zeros(128, frames, d.height // 32, d.width // 32)
    audio_frames = audio_frames_for_video(frames, d.target_fps)
    audio = torch.zeros(8, audio_frames, 16) if d.with_audio else None
    return LatentSample(id="slider", video=video, audio=audio, audio_valid_frames=audio_frames, text=target, fps=d.target_fps)


@dataclasses.dataclass
class SliderTargets:
    inputs: DenoiserInput  # x_σ with the target prompt
    positive: tuple[torch.Tensor, torch.Tensor | None]  # what the LoRA at +1 must predict (video, audio)
    negative: tuple[torch.Tensor, torch.Tensor | None]  # ... at -1


def noisy_latents(batch: Batch, denoiser, network, config: Config, generator: torch.Generator, device: torch.device,
                  autocast_dtype) -> DenoiserInput:
    """x_σ for the batch's latent geometry: σ drawn per modality, then ``slider.denoise_steps`` Euler steps of the base
    model (target prompt) from pure noise at σ = 1."""
    video_shape = tuple(batch.video.shape)
    audio_shape = None if batch.audio is None else tuple(batch.audio.shape)
    sigma_video, sigma_audio = sample_modality_sigmas(
        config.timesteps, config.model.version, batch.size, video_token_count(batch.video),
        None if batch.audio is None else audio_token_count(batch.audio), generator)
    video = torch.randn(video_shape, generator=generator).to(device)
    audio = None if audio_shape is None else torch.randn(audio_shape, generator=generator).to(device)
    steps = config.slider.denoise_steps
    target_v = sigma_video.to(device) if steps else torch.ones(batch.size, device=device)
    target_a = None if audio is None else (sigma_audio.to(device) if steps else torch.ones(batch.size, device=device))
    text = batch.text.to(device, autocast_dtype or torch.float32)
    ones = torch.ones(batch.size, device=device)
    for step in range(steps):
        now_v = ones + (target_v - 1) * step / steps
        next_v = ones + (target_v - 1) * (step + 1) / steps
        now_a = None if audio is None else ones + (target_a - 1) * step / steps
        probe = DenoiserInput(video=video, audio=audio, sigma_video=now_v, sigma_audio=now_a, text=text, fps=batch.fps)
        with torch.no_grad(), network.disabled(), _autocast(device, autocast_dtype):
            velocity_v, velocity_a = denoiser(_cast(probe, autocast_dtype))
        video = video + _per_sample(next_v - now_v, video) * velocity_v.float()
        if audio is not None:
            next_a = ones + (target_a - 1) * (step + 1) / steps
            audio = audio + _per_sample(next_a - now_a, audio) * velocity_a.float()
    return DenoiserInput(video=video, audio=audio, sigma_video=target_v, sigma_audio=target_a, text=text, fps=batch.fps)


def slider_targets(inputs: DenoiserInput, prompts: TextContext, denoiser, network, guidance: float, device, autocast_dtype) -> SliderTargets:
    """The base model's velocities for the three prompts (one forward without gradient) → the ±1 targets."""
    batch = inputs.video.shape[0]
    contexts = [_repeat(prompts.select(slice(i, i + 1)), batch, device, inputs.text.video.dtype) for i in range(3)]
    joint = DenoiserInput(
        video=inputs.video.repeat(3, 1, 1, 1, 1), audio=None if inputs.audio is None else inputs.audio.repeat(3, 1, 1, 1),
        sigma_video=inputs.sigma_video.repeat(3), sigma_audio=None if inputs.sigma_audio is None else inputs.sigma_audio.repeat(3),
        text=TextContext(*(torch.cat([getattr(c, name) for c in contexts]) for name in ("video", "audio", "mask"))),
        fps=inputs.fps,
    )
    with torch.no_grad(), network.disabled(), _autocast(device, autocast_dtype):
        velocity_v, velocity_a = denoiser(_cast(joint, autocast_dtype))
    v_target, v_pos, v_neg = velocity_v.float().chunk(3)
    a_target, a_pos, a_neg = (None, None, None) if velocity_a is None else velocity_a.float().chunk(3)
    step_v = guidance * (v_pos - v_neg)
    step_a = None if a_target is None else guidance * (a_pos - a_neg)
    positive = (v_target + step_v, None if a_target is None else a_target + step_a)
    negative = (v_target - step_v, None if a_target is None else a_target - step_a)
    return SliderTargets(dataclasses.replace(inputs, text=contexts[0]), positive, negative)


class SliderTrainer(Trainer):
    """A ``Trainer`` whose micro-batch is the slider objective. ``prompts``: the target, positive and negative
    prompts' contexts, encoded together (``[3, L, D]``, in ``PROMPTS`` order)."""

    def __init__(self, config: Config, denoiser, prompts: TextContext, run_dir, callbacks=None, *, stop=None):
        check_slider_config(config)
        if prompts.video.shape[0] != len(PROMPTS):
            raise ValueError(f"slider prompts: expected the contexts of {len(PROMPTS)} prompts {PROMPTS}, got {prompts.video.shape[0]}")
        self.prompts = prompts
        super().__init__(config, denoiser, [slider_item(config, prompts.select(0))], run_dir, callbacks, stop=stop)

    def _resume_fingerprint(self) -> dict:
        h = hashlib.blake2b(digest_size=16)
        for tensor in (self.prompts.video, self.prompts.audio, self.prompts.mask):
            h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
        return {**super()._resume_fingerprint(), "slider": self.config.slider.__dict__, "slider_prompts": h.hexdigest()}

    def _micro_batch(self, tally: _StepTally) -> bool:
        cfg = self.config
        accum = cfg.train.gradient_accumulation
        batch = collate([self.samples[0]] * cfg.train.batch_size)
        tally.ids.extend(batch.ids)
        inputs = noisy_latents(batch, self.denoiser, self.network, cfg, self.generator, self.device, self.autocast_dtype)
        targets = slider_targets(inputs, self.prompts, self.denoiser, self.network, cfg.slider.guidance_strength,
                                 self.device, self.autocast_dtype)
        video_losses, audio_losses = [], []
        for name, strength, (target_video, target_audio) in (("positive", 1.0, targets.positive), ("negative", -1.0, targets.negative)):
            self.network.set_multiplier(strength)
            try:
                with _autocast(self.device, self.autocast_dtype):
                    pred_video, pred_audio = self.denoiser(_cast(targets.inputs, self.autocast_dtype))
            finally:
                self.network.set_multiplier(1.0)
            loss_video = prediction_mse(pred_video, target_video)
            loss_audio = None if target_audio is None else prediction_mse(pred_audio, target_audio)
            total = cfg.loss.video_weight * loss_video + (0 if loss_audio is None else cfg.loss.audio_weight * loss_audio)
            values = [loss_video.item()] + ([] if loss_audio is None else [loss_audio.item()])
            if not all(math.isfinite(v) for v in values):
                self._skip_nonfinite(tally.ids, values[0], values[1] if len(values) > 1 else None, what=f"slider {name} loss")
                return False
            tally.extras.setdefault(f"slider_{name}", []).append(total.item())
            video_losses.append(values[0])
            if loss_audio is not None:
                audio_losses.append(values[1])
            self._backward(0.5 * total / accum)
        tally.video += sum(video_losses) / 2
        tally.video_batches += 1
        tally.sigma_video += inputs.sigma_video.mean().item()
        if audio_losses:
            tally.audio += sum(audio_losses) / 2
            tally.weighted_audio += cfg.loss.audio_weight * sum(audio_losses) / 2
            tally.sigma_audio += inputs.sigma_audio.mean().item()
            tally.audio_batches += 1
        tally.batches += 1
        return True

    def _step_metrics(self, tally: _StepTally, grad_norm, step_time: float) -> dict:
        row = super()._step_metrics(tally, grad_norm, step_time)
        row["audio_weight"] = self.config.loss.audio_weight if tally.audio_batches else None
        row["loss_slider_positive"] = _mean(tally.extras.get("slider_positive"))
        row["loss_slider_negative"] = _mean(tally.extras.get("slider_negative"))
        return row


def _mean(values):
    return sum(values) / len(values) if values else None


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, *([1] * (like.ndim - 1)))


def _repeat(context: TextContext, batch: int, device, dtype) -> TextContext:
    return TextContext(context.video.expand(batch, -1, -1).to(device, dtype), context.audio.expand(batch, -1, -1).to(device, dtype),
                       context.mask.expand(batch, -1).to(device))


def _cast(inputs: DenoiserInput, dtype) -> DenoiserInput:
    if dtype is None:
        return inputs
    return dataclasses.replace(inputs, video=inputs.video.to(dtype), audio=None if inputs.audio is None else inputs.audio.to(dtype))


def _autocast(device: torch.device, dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
