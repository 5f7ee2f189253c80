"""The training modes (``conditioning.mode``): what each one feeds the model and which tokens its loss counts.

Every mode reproduces at training time the conditioning a ComfyUI core inference node builds, so the LoRA meets at
inference exactly what it was trained on (the token positions are ``backends/layouts.py``):

- ``av``: text to audio+video, the trainer's default (video-only when the dataset has no audio).
- **first frame** (``first_frame_p``, any mode with video): the clip's first latent frame is fed clean with σ = 0
  on its tokens and left out of the loss, as ``LTXVImgToVideo`` conditions it (its noise mask is 0 there, so the
  sampler keeps the encoded image and the model sees timestep 0 on those tokens). A one-frame clip is never
  conditioned (nothing would be left to learn).
- ``audio``: audio-only. The video branch sees a stand-in: the cache's all-zero latent of a 64x64 video as long as
  the audio (``data/audio_only.py``), noised at the audio's σ (one σ for both, as ComfyUI's sampler gives them);
  it is never a loss target. That is ComfyUI's audio generation path: ``EmptyLTXVLatentVideo`` at 64x64 (a zero
  latent, 4 tokens per latent frame) next to the audio latent, sampled together with one σ schedule, the audio
  decoded. σ is drawn from the stand-in's token count, which is what ``LTXVScheduler`` shifts by when given that
  latent, so the σ distribution follows the audio's duration.
- ``ic``: IC-LoRA. The clip's cached reference is a clean guide (``DenoiserInput.video_guide``), appended with
  σ = 0 as ``LTXVAddGuide`` at frame 0 appends it; only the clip's own tokens are targets.
- ``id``: ID-LoRA. The cached reference audio is prepended with σ = 0 at negative times
  (``DenoiserInput.audio_reference``), as ``LTXVReferenceAudio`` conditions it; only the clip's audio is a target.
  Its items may come from audio sources too (an audio-only ID-LoRA): those batches get the stand-in as above.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..backends.interface import DenoiserInput, TextContext
from ..config import Config, ConfigError, TimestepConfig
from ..data.batches import Batch, LatentSample

MODES = ("av", "audio", "ic", "id")


@dataclass
class ConditionedInputs:
    """One training forward of a mode: the denoiser's input and which video tokens count in the loss."""

    inputs: DenoiserInput
    video_loss_mask: torch.Tensor | None  # [B, 1, F', 1, 1]: 0 on conditioning frames; None = every token counts
    train_video: bool  # False when the video is the audio-only stand-in (no video loss)


def timestep_config(config: Config, batch: Batch) -> TimestepConfig:
    """The σ sampling of a batch: one σ for an audio-only batch's stand-in and its audio (as ComfyUI samples them)."""
    if batch.audio_only:
        return dataclasses.replace(config.timesteps, independent_audio=False)
    return config.timesteps


def draw_first_frame(p: float, batch_size: int, latent_frames: int, generator: torch.Generator) -> torch.Tensor | None:
    """Which samples are conditioned on their first latent frame ([B] bool), or None when none can be. No random
    number is drawn when the option is off, so runs without it keep their exact σ and noise."""
    if p <= 0 or latent_frames < 2:
        return None
    chosen = torch.rand(batch_size, generator=generator) < p
    return chosen if bool(chosen.any()) else None


def condition_inputs(batch: Batch, mode: str, clean_video: torch.Tensor, noisy_video: torch.Tensor,
                     sigma_video: torch.Tensor, noisy_audio: torch.Tensor | None, sigma_audio: torch.Tensor | None,
                     text: TextContext, first_frame: torch.Tensor | None = None) -> ConditionedInputs:
    """The denoiser input of one training forward: noisy latents, their σ and the mode's conditioning.

    ``first_frame`` ([B] bool) marks the samples whose first latent frame is conditioning: it is replaced by the
    clean latent and its tokens get σ = 0. The references come from the batch (the cache)."""
    if mode not in MODES:
        raise ConfigError(f"conditioning.mode: {mode!r} is not one of {', '.join(MODES)}")
    video_mask = None
    if first_frame is not None:
        first_frame = first_frame.to(noisy_video.device)
        noisy_video = noisy_video.clone()
        noisy_video[first_frame, :, 0] = clean_video[first_frame, :, 0].to(noisy_video.dtype)
        batch_size, _, frames, height, width = noisy_video.shape
        if sigma_video.ndim == 1:
            frame_sigma = sigma_video.reshape(batch_size, 1).expand(batch_size, frames).clone()
            frame_sigma[first_frame, 0] = 0.0
            sigma_video = frame_sigma.repeat_interleave(height * width, dim=1)
        else:  # already per token (Self-Flow's dual-timestep noising)
            token_sigma = sigma_video.reshape(batch_size, frames, height * width).clone()
            token_sigma[first_frame, 0] = 0.0
            sigma_video = token_sigma.reshape(batch_size, -1)
        video_mask = torch.ones(batch_size, 1, frames, 1, 1, device=noisy_video.device)
        video_mask[first_frame, :, 0] = 0.0
    guide = reference = None
    if mode == "ic":
        if batch.reference_video is None:
            raise ConfigError(f"conditioning.mode = \"ic\": batch {', '.join(batch.ids)} has no cached reference; set "
                              "dataset.sources[].reference_dir and run the cache again")
        guide = batch.reference_video.to(noisy_video.device, noisy_video.dtype)
    if mode == "id":
        if batch.reference_audio is None or noisy_audio is None:
            raise ConfigError(f"conditioning.mode = \"id\": batch {', '.join(batch.ids)} has no cached reference audio "
                              "(or no audio); set dataset.sources[].reference_audio_dir or "
                              "dataset.reference_audio_same_speaker and run the cache again")
        reference = batch.reference_audio.to(noisy_audio.device, noisy_audio.dtype)
    inputs = DenoiserInput(
        video=noisy_video, audio=noisy_audio, sigma_video=sigma_video, sigma_audio=sigma_audio, text=text,
        fps=batch.fps, video_guide=guide, audio_reference=reference,
    )
    return ConditionedInputs(inputs, video_mask, train_video=not batch.audio_only)


def check_samples(mode: str, samples: list[LatentSample], reference_downscale: int) -> list[str]:
    """Whether the cached samples can train ``mode``: raises ``ConfigError`` naming the items and the fix; returns
    warnings (references the mode does not use)."""
    def first(items: list[LatentSample]) -> str:
        return f"{len(items)} of {len(samples)} cached items (first: {items[0].id})"

    stand_ins = [s for s in samples if s.audio_only]
    if mode == "id":
        stand_ins = []  # an audio-only ID-LoRA is fine
    if mode == "audio":
        lacking = [s for s in samples if not s.audio_only]
        if lacking:
            raise ConfigError(f"conditioning.mode = \"audio\": {first(lacking)} are video clips; an audio-only run "
                              "trains on sources of kind = \"audio\" (their files' sound): change the sources and "
                              "run the cache again")
        return []
    if stand_ins:
        raise ConfigError(f"conditioning.mode = {mode!r}: {first(stand_ins)} come from audio sources (kind = "
                          "\"audio\") and have no video; train them with conditioning.mode = \"audio\"")
    if mode == "ic":
        lacking = [s for s in samples if s.reference_video is None]
        if lacking:
            raise ConfigError(f"conditioning.mode = \"ic\": {first(lacking)} have no cached reference: put a reference "
                              "video or image with the clip's file name in dataset.sources[].reference_dir, then run "
                              "the cache again")
        for sample in samples:
            factor = sample.video.shape[2] // sample.reference_video.shape[2]
            if factor != reference_downscale:
                raise ConfigError(f"conditioning.mode = \"ic\": the reference of {sample.id} was cached at downscale "
                                  f"{factor} but dataset.reference_downscale is {reference_downscale}; run the cache again")
    if mode == "id":
        lacking = [s for s in samples if s.reference_audio is None or s.audio is None]
        if lacking:
            raise ConfigError(f"conditioning.mode = \"id\": {first(lacking)} have no cached reference audio (or no "
                              "audio): put the speaker's reference in dataset.sources[].reference_audio_dir with the "
                              "clip's file name, or set dataset.reference_audio_same_speaker = true; then run the "
                              "cache again")
    unused = []
    if mode != "ic" and any(s.reference_video is not None for s in samples):
        unused.append(f"the cache holds IC-LoRA references but conditioning.mode = {mode!r} does not use them "
                      "(set it to \"ic\" to train with them)")
    if mode != "id" and any(s.reference_audio is not None for s in samples):
        unused.append(f"the cache holds reference audio but conditioning.mode = {mode!r} does not use it (set it to "
                      "\"id\" to train with it)")
    return unused


def generation_inputs(config: Config, sample: LatentSample) -> dict:
    """Fields of an ``evaluation.generation.SampleRequest`` that condition a sample like the mode's ComfyUI node,
    taken from a cached item: its first latent frame (first-frame conditioning), its reference (ic), its reference
    audio (id), or the stand-in's size (audio-only)."""
    if sample.audio_only:
        return {"latent_height": sample.video.shape[2], "latent_width": sample.video.shape[3]}
    mode, fields = config.conditioning.mode, {}
    if config.conditioning.first_frame_p > 0:
        fields["first_frame"] = sample.video[None, :, :1]
    if mode == "ic" and sample.reference_video is not None:
        fields["video_guide"] = sample.reference_video[None]
    if mode == "id" and sample.reference_audio is not None:
        fields["audio_reference"] = sample.reference_audio[None]
    return fields


def trains_audio_only(mode: str, samples: list[LatentSample]) -> bool:
    """Whether only the audio branch is adapted: every item is an audio source's (audio mode, or an audio-only
    ID-LoRA); cross-modal layers would tie the voice to the stand-in video."""
    return mode == "audio" or (bool(samples) and all(s.audio_only for s in samples))


def lora_metadata(config: Config) -> dict[str, str]:
    """Metadata the LoRA file carries for ComfyUI's readers: ``reference_downscale_factor`` is the key
    ``GetICLoRAParameters`` looks for (any key ending in it); the mode is ours."""
    mode = config.conditioning.mode
    metadata = {"ltx2_av_trainer.mode": mode}
    if mode == "ic":
        metadata["reference_downscale_factor"] = str(config.dataset.reference_downscale)
    return metadata
