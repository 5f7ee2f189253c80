"""Which samples form each batch: shape buckets (``BucketBatchSampler``) and, on top, how often the audio
branch gets real audio (``AudioAwareBatchSampler``).

Audio and audio-free items never share a batch (their bucket keys differ). By default batches come in
the plain shuffled bucket order (``BucketBatchSampler``), so audio batches appear at their natural share.
Two opt-in rules (mutually exclusive) tilt that:

- ``batch_probability`` p: whenever both kinds are available, the next batch is an audio batch with
  probability p;
- ``min_batches_per_accum`` k: every gradient-accumulation window of ``accumulation`` micro-batches holds at
  least k audio batches (the last slots of a window are forced to audio when needed; the others follow
  the natural share).

Audio and audio-free batches then come from two independent shuffled streams. Every choice is a pure
function of (seed, draw number), so the whole state is a few counters and a resumed run draws exactly the
same batches.
"""

from __future__ import annotations

import math

import torch

from .batches import LatentSample


class BucketBatchSampler:
    """Yields lists of sample indices; every batch comes from one shape bucket (so audio and non-audio
    items never share a batch). The order of an epoch is a pure function of (seed, epoch), so the
    sampler's whole state is (epoch, position) and a resumed run sees exactly the same batches."""

    def __init__(self, samples: list[LatentSample], batch_size: int, seed: int, indices: list[int] | None = None):
        """``indices``: draw only these samples (a subset, e.g. the audio items); the yielded indices still
        point into ``samples``."""
        if not samples:
            raise ValueError("no training samples: the cache is empty or every item failed; run `ltx2-av-trainer doctor`")
        self.batch_size = batch_size
        self.seed = seed
        buckets: dict[tuple, list[int]] = {}
        for i in range(len(samples)) if indices is None else indices:
            buckets.setdefault(samples[i].bucket_key(), []).append(i)
        if not buckets:
            raise ValueError("BucketBatchSampler: the subset of samples to draw from is empty")
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

    def batches_per_epoch(self) -> int:
        return sum(math.ceil(len(b) / self.batch_size) for b in self.buckets)

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


class AudioAwareBatchSampler:
    def __init__(self, samples: list[LatentSample], batch_size: int, seed: int, *, accumulation: int = 1,
                 batch_probability: float | None = None, min_audio_per_accum: int = 0):
        if batch_probability is not None and min_audio_per_accum > 0:
            raise ValueError("audio.batch_probability and audio.min_batches_per_accum are mutually exclusive")
        if min_audio_per_accum > accumulation:
            raise ValueError(f"audio.min_batches_per_accum = {min_audio_per_accum} exceeds the {accumulation} micro-batches per step")
        self.seed = seed
        self.accumulation = accumulation
        self.batch_probability = batch_probability
        self.min_audio_per_accum = min_audio_per_accum
        self.tilted = batch_probability is not None or min_audio_per_accum > 0
        audio = [i for i, s in enumerate(samples) if s.audio is not None]
        other = [i for i, s in enumerate(samples) if s.audio is None]
        self.has_audio = bool(audio)
        self.has_other = bool(other)
        if not self.tilted:
            # The plain order: exactly the batches (and resume state) of a run without these options.
            self.plain = BucketBatchSampler(samples, batch_size, seed)
            self.audio_stream = self.other_stream = None
        else:
            self.plain = None
            self.audio_stream = BucketBatchSampler(samples, batch_size, seed, indices=audio) if audio else None
            self.other_stream = BucketBatchSampler(samples, batch_size, seed + 1, indices=other) if other else None
        n_audio = self.audio_stream.batches_per_epoch() if self.audio_stream else 0
        n_other = self.other_stream.batches_per_epoch() if self.other_stream else 0
        self.natural_audio_share = n_audio / max(1, n_audio + n_other)
        self.draws = 0
        self.window_audio = 0  # audio batches drawn so far in the current accumulation window

    def next_batch(self) -> list[int]:
        if self.plain is not None:
            self.draws += 1
            return self.plain.next_batch()
        use_audio = self._choose_audio()
        position = self.draws % self.accumulation
        if position == 0:
            self.window_audio = 0
        self.draws += 1
        if use_audio:
            self.window_audio += 1
            return self.audio_stream.next_batch()
        return self.other_stream.next_batch()

    def _choose_audio(self) -> bool:
        if not self.has_audio:
            return False
        if not self.has_other:
            return True
        if self.min_audio_per_accum > 0:
            position = self.draws % self.accumulation
            already = 0 if position == 0 else self.window_audio
            if self.min_audio_per_accum - already >= self.accumulation - position:
                return True  # the remaining slots of this window are needed for audio
            probability = self.natural_audio_share
        else:
            probability = self.batch_probability
        return self._uniform(self.draws) < probability

    def _uniform(self, draw: int) -> float:
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + draw * 7_919 + 11) % (2**63))
        return float(torch.rand(1, generator=generator))

    def state_dict(self) -> dict:
        if self.plain is not None:
            return {**self.plain.state_dict(), "draws": self.draws}
        return {
            "draws": self.draws,
            "window_audio": self.window_audio,
            "audio": self.audio_stream.state_dict() if self.audio_stream else None,
            "other": self.other_stream.state_dict() if self.other_stream else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.draws = int(state.get("draws", 0))
        if self.plain is not None:
            self.plain.load_state_dict(state)
            return
        self.window_audio = int(state["window_audio"])
        if self.audio_stream:
            self.audio_stream.load_state_dict(state["audio"])
        if self.other_stream:
            self.other_stream.load_state_dict(state["other"])
