"""Training samples (cached latents + text), batches of them (``collate``) and per-batch transforms (caption
dropout, audio truncation). Which samples form each batch is ``batch_sampler.py``."""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass

import torch

from ..backends.interface import AUDIO_LATENTS_PER_SECOND, TextContext
from ..backends.text_connectors import TextFeatures


@dataclass
class LatentSample:
    """One cached training item. ``audio`` is None for items without audio (images, silent clips)."""

    id: str
    video: torch.Tensor  # [128, F', H', W']
    audio: torch.Tensor | None  # [8, T, 16]
    audio_valid_frames: int  # latent frames of real audio (the rest is padding, masked in the loss)
    text: TextContext  # unbatched: [L, D]
    fps: float
    video_loss_weight: float = 1.0
    audio_loss_weight: float = 1.0
    # Why an item that should have audio has none (the cache manifest's ``audio_problem``), for the
    # audio supervision monitor's message.
    audio_problem: str | None = None
    # False for items that never carry audio (images); a clip whose audio failed still expects it.
    expects_audio: bool = True
    is_validation: bool = False
    # Pre-connector text features, only for connector training (network.connectors).
    text_features: TextFeatures | None = None
    # Training modes (conditioning.mode): the IC-LoRA reference latent [128, Fg, H'/f, W'/f], the ID-LoRA
    # reference audio latent [8, Tr, 16], and whether ``video`` is the audio-only mode's stand-in.
    reference_video: torch.Tensor | None = None
    reference_audio: torch.Tensor | None = None
    audio_only: bool = False

    def bucket_key(self) -> tuple:
        # Audio and audio-free items always land in different buckets (audio_shape None vs a shape), so they
        # never share a batch.
        audio_shape = None if self.audio is None else tuple(self.audio.shape)
        features = None if self.text_features is None else (tuple(self.text_features.video.shape), tuple(self.text_features.audio.shape))
        key = (tuple(self.video.shape), audio_shape, tuple(self.text.video.shape), self.fps, features)
        if self.reference_video is not None or self.reference_audio is not None or self.audio_only:
            key += (_shape(self.reference_video), _shape(self.reference_audio), self.audio_only)
        return key


def _shape(tensor: torch.Tensor | None) -> tuple | None:
    return None if tensor is None else tuple(tensor.shape)


def content_digest(samples: list[LatentSample]) -> str:
    """A digest of what a run trains on, in training order: every sample's tensors (latents, valid audio length,
    text context and features), frame rate and loss weights. File names, paths and ids do not enter it, so the
    same items re-encoded identically (another cache folder, a moved dataset, a repaired entry) give the same
    digest; any change in content or order gives another."""
    per_object: dict[int, str] = {}
    total = hashlib.blake2b(digest_size=16)
    for sample in samples:
        key = id(sample)  # repeats are the same object several times: hashed once
        if key not in per_object:
            per_object[key] = _sample_digest(sample)
        total.update(per_object[key].encode())
    return total.hexdigest()


def _sample_digest(sample: LatentSample) -> str:
    h = hashlib.blake2b(digest_size=16)
    text = [sample.text.video, sample.text.audio, sample.text.mask]
    features = [] if sample.text_features is None else [sample.text_features.video, sample.text_features.audio,
                                                          sample.text_features.mask]
    for tensor in [sample.video, sample.audio, *text, *features]:
        if tensor is None:
            h.update(b"none")
            continue
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{flat.dtype}{list(tensor.shape)}".encode())
        h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    h.update(repr((sample.audio_valid_frames, sample.fps, sample.video_loss_weight, sample.audio_loss_weight,
                   sample.is_validation)).encode())
    return h.hexdigest()


@dataclass
class Batch:
    ids: list[str]
    video: torch.Tensor  # [B, 128, F', H', W']
    audio: torch.Tensor | None  # [B, 8, T, 16]
    audio_valid_frames: torch.Tensor | None  # [B]
    text: TextContext
    fps: float
    video_loss_weight: torch.Tensor  # [B]
    audio_loss_weight: torch.Tensor  # [B]
    text_features: TextFeatures | None = None
    reference_video: torch.Tensor | None = None  # [B, 128, Fg, H'/f, W'/f]
    reference_audio: torch.Tensor | None = None  # [B, 8, Tr, 16]
    audio_only: bool = False

    @property
    def size(self) -> int:
        return self.video.shape[0]


def collate(samples: list[LatentSample]) -> Batch:
    keys = {s.bucket_key() for s in samples}
    if len(keys) != 1:
        raise ValueError(f"cannot batch samples of different shapes: {sorted(map(str, keys))}")
    has_audio = samples[0].audio is not None
    return Batch(
        ids=[s.id for s in samples],
        video=torch.stack([s.video for s in samples]),
        audio=torch.stack([s.audio for s in samples]) if has_audio else None,
        audio_valid_frames=torch.tensor([s.audio_valid_frames for s in samples]) if has_audio else None,
        text=TextContext(
            torch.stack([s.text.video for s in samples]),
            torch.stack([s.text.audio for s in samples]),
            torch.stack([s.text.mask for s in samples]),
        ),
        fps=samples[0].fps,
        video_loss_weight=torch.tensor([s.video_loss_weight for s in samples], dtype=torch.float32),
        audio_loss_weight=torch.tensor([s.audio_loss_weight for s in samples], dtype=torch.float32),
        text_features=None if samples[0].text_features is None else TextFeatures(
            torch.stack([s.text_features.video for s in samples]),
            torch.stack([s.text_features.audio for s in samples]),
            torch.stack([s.text_features.mask for s in samples]),
        ),
        reference_video=None if samples[0].reference_video is None else torch.stack([s.reference_video for s in samples]),
        reference_audio=None if samples[0].reference_audio is None else torch.stack([s.reference_audio for s in samples]),
        audio_only=samples[0].audio_only,
    )


# ---- per-batch transforms -------------------------------------------------------------------------


def drop_captions(text: TextContext, joint: float, video: float, audio: float, generator: torch.Generator) -> TextContext:
    """Caption dropout per sample. ``joint``: both contexts and the mask zeroed (trains the unconditional
    prediction CFG needs). ``video`` / ``audio``: only that modality's context zeroed (the mask is shared by
    both streams, so it stays). Random numbers are drawn only for rates > 0, so a run without caption
    dropout sees exactly the same σ and noise as before."""
    return apply_caption_keep(text, caption_keep_masks(text.video.shape[0], joint, video, audio, generator))


def caption_keep_masks(batch: int, joint: float, video: float, audio: float,
                       generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The draws of ``drop_captions`` for ``batch`` samples: which keep their video context, audio context and mask
    (``[batch]`` bool each)."""
    keep_video = torch.ones(batch, dtype=torch.bool)
    keep_audio = torch.ones(batch, dtype=torch.bool)
    keep_mask = torch.ones(batch, dtype=torch.bool)
    if joint > 0:
        dropped = torch.rand(batch, generator=generator) < joint
        keep_video &= ~dropped
        keep_audio &= ~dropped
        keep_mask &= ~dropped
    if video > 0:
        keep_video &= ~(torch.rand(batch, generator=generator) < video)
    if audio > 0:
        keep_audio &= ~(torch.rand(batch, generator=generator) < audio)
    return keep_video, keep_audio, keep_mask


def apply_caption_keep(text: TextContext, keep: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> TextContext:
    """``text`` with the contexts and masks that ``keep`` (from ``caption_keep_masks``) drops zeroed."""
    keep_video, keep_audio, keep_mask = keep
    if bool(keep_video.all() and keep_audio.all() and keep_mask.all()):
        return text
    batch = text.video.shape[0]

    def apply(tensor: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        shape = (batch,) + (1,) * (tensor.ndim - 1)
        return tensor * keep.view(shape).to(tensor.device, tensor.dtype)

    return TextContext(apply(text.video, keep_video), apply(text.audio, keep_audio), apply(text.mask, keep_mask))


def truncate_audio(sample: LatentSample, interval_seconds: float) -> LatentSample:
    """audio.bucket_strategy = truncate: cut the audio latent to its valid frames floored to a multiple of
    ``interval_seconds`` (a clip shorter than one interval keeps all its valid frames), so nothing is padded
    or masked. Items without audio are returned unchanged."""
    if sample.audio is None:
        return sample
    interval = max(1, round(interval_seconds * AUDIO_LATENTS_PER_SECOND))
    valid = sample.audio_valid_frames
    length = valid if valid < interval else (valid // interval) * interval
    audio = sample.audio[:, :length].clone()
    return dataclasses.replace(sample, audio=audio, audio_valid_frames=length)


def audio_frames_for_video(video_latent_frames: int, fps: float) -> int:
    """Audio latent frames that span a clip of ``video_latent_frames`` (8n+1 pixel frames at ``fps``): the
    length a silence target needs for an audio-free clip (25 audio latents per second, at least one)."""
    pixel_frames = (video_latent_frames - 1) * 8 + 1
    return max(1, math.ceil(pixel_frames / fps * AUDIO_LATENTS_PER_SECOND))
