"""Training samples (cached latents + text), batching by shape, and a resumable sampler."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .backends.interface import TextContext


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

    def bucket_key(self) -> tuple:
        audio_shape = None if self.audio is None else tuple(self.audio.shape)
        return (tuple(self.video.shape), audio_shape, tuple(self.text.video.shape), self.fps)


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
    )


class BucketBatchSampler:
    """Yields lists of sample indices; every batch comes from one shape bucket (so audio and non-audio
    items never share a batch). The order of an epoch is a pure function of (seed, epoch), so the
    sampler's whole state is (epoch, position) and a resumed run sees exactly the same batches."""

    def __init__(self, samples: list[LatentSample], batch_size: int, seed: int):
        if not samples:
            raise ValueError("no training samples: the cache is empty or every item failed; run `ltx2-av-trainer doctor`")
        self.batch_size = batch_size
        self.seed = seed
        buckets: dict[tuple, list[int]] = {}
        for i, s in enumerate(samples):
            buckets.setdefault(s.bucket_key(), []).append(i)
        self.buckets = list(buckets.values())
        self.epoch = 0
        self.position = 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        batches = []
        for bucket in self.buckets:
            perm = [bucket[i] for i in torch.randperm(len(bucket), generator=g).tolist()]
            # Incomplete tail batches are kept (small character datasets cannot afford to drop clips).
            batches.extend(perm[i : i + self.batch_size] for i in range(0, len(perm), self.batch_size))
        order = torch.randperm(len(batches), generator=g).tolist()
        return [batches[i] for i in order]

    def next_batch(self) -> list[int]:
        if self.position >= len(self._order):
            self.epoch += 1
            self.position = 0
            self._order = self._epoch_order(self.epoch)
        batch = self._order[self.position]
        self.position += 1
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order = self._epoch_order(self.epoch)
