"""The audio supervision monitor: does the audio branch of an audio run really see audio?

Voice training fails quietly when audio never reaches the loss: the cache holds no audio (wrong stream,
a video-only cache reused), decoding failed for many clips, or the batches are mostly images and silent
clips. Every micro-batch of a run with ``dataset.with_audio`` is *expected* to train audio; it is
*supervised* when it trained on real cached audio (silence and audio-DOP steps are not). After
``supervision_warmup`` expected micro-batches, and then every ``supervision_interval``, the share of
supervised ones is checked against ``supervision_min_ratio``; a failed check names the cause(s) and the
fix. The loop warns (``warn``) or stops (``error``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from ..config import AudioConfig
from ..data.batches import LatentSample

_NO_PROBLEM_RECORDED = "no audio (no reason recorded in the cache)"


@dataclass
class SupervisionCheck:
    """A failed check: the measured ratio and a message that names the cause."""

    expected: int
    supervised: int
    ratio: float
    message: str


@dataclass
class AudioSupervisionMonitor:
    cfg: AudioConfig
    samples: list[LatentSample]
    expected: int = 0
    supervised: int = 0
    failed_audio: Counter = field(default_factory=Counter)  # "id: reason" of unsupervised items that expected audio
    audio_free_items: int = 0  # unsupervised items that never carry audio (images)
    next_check: int = 0

    def __post_init__(self) -> None:
        self.next_check = max(1, self.cfg.supervision_warmup)

    @property
    def enabled(self) -> bool:
        return self.cfg.supervision_mode != "off"

    def observe(self, batch: list[LatentSample], supervised: bool) -> SupervisionCheck | None:
        """Record one micro-batch of an audio run; returns a failed check when one is due and fails."""
        if not self.enabled:
            return None
        self.expected += 1
        if supervised:
            self.supervised += 1
        else:
            for sample in batch:
                if sample.expects_audio:
                    self.failed_audio[f"{sample.id}: {sample.audio_problem or _NO_PROBLEM_RECORDED}"] += 1
                else:
                    self.audio_free_items += 1
        if self.expected < self.next_check:
            return None
        self.next_check = self.expected + self.cfg.supervision_interval
        ratio = self.supervised / self.expected
        if ratio >= self.cfg.supervision_min_ratio:
            return None
        return SupervisionCheck(self.expected, self.supervised, ratio, self._explain(ratio))

    def _explain(self, ratio: float) -> str:
        head = (f"audio supervision too low: {self.supervised} of {self.expected} micro-batches ({ratio:.0%}) trained on "
                f"real audio, below audio.supervision_min_ratio = {self.cfg.supervision_min_ratio:g}.")
        causes = []
        with_audio = sum(1 for s in self.samples if s.audio is not None)
        if with_audio == 0:
            reasons = Counter(s.audio_problem or _NO_PROBLEM_RECORDED for s in self.samples if s.expects_audio)
            detail = "; ".join(f"{n} item(s): {reason}" for reason, n in reasons.most_common(3))
            causes.append(
                f"No audio in the cache: none of the {len(self.samples)} training items has cached audio"
                + (f" ({detail})" if detail else " (all are images)")
                + ". Check the cache report ('Audio latent caching: N encoded, M failed'), re-run `cache` with "
                "dataset.with_audio = true, or set dataset.with_audio = false for a video-only LoRA."
            )
        else:
            if self.failed_audio:
                listed = ", ".join(item for item, _ in self.failed_audio.most_common(3))
                causes.append(
                    f"Audio decode/encode failures: {len(self.failed_audio)} clip(s) that should have audio trained without "
                    f"it (e.g. {listed}). Fix or convert those files (`ltx2-av-trainer doctor` lists them) and re-run `cache`."
                )
            if self.audio_free_items:
                share = with_audio / len(self.samples)
                causes.append(
                    f"The sampler starves audio: audio items are {share:.0%} of the training set and images/audio-free items "
                    f"filled the other batches. Raise the repeats of the audio sources, or set audio.batch_probability "
                    "or audio.min_batches_per_accum."
                )
        if not causes:
            causes.append("Audio batches are rare in this run; raise the repeats of the audio sources.")
        return head + " " + " ".join(causes)

    def state_dict(self) -> dict:
        return {"expected": self.expected, "supervised": self.supervised, "failed_audio": dict(self.failed_audio),
                "audio_free_items": self.audio_free_items, "next_check": self.next_check}

    def load_state_dict(self, state: dict) -> None:
        self.expected = int(state["expected"])
        self.supervised = int(state["supervised"])
        self.failed_audio = Counter({k: int(v) for k, v in state["failed_audio"].items()})
        self.audio_free_items = int(state["audio_free_items"])
        self.next_check = int(state["next_check"])
