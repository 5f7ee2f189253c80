"""The audio verdict of one clip: is its sound voice supervision, and what is worth saying about it.

The doctor and the cache both call ``judge_clip_audio`` on the same audio, the 16 kHz span of the training
clip (``media.timing.cut_audio``), with the thresholds of the dataset config, so they always agree: a clip the
doctor calls silent is cached audio-free (it then trains as ``audio.missing_audio`` says), never as real audio
that would teach the voice LoRA silence.

Not voice supervision (errors in the doctor of an audio dataset): silent, near-silent, too short. Worth fixing
but still trained on (warnings): too quiet, clipped, ending early.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..config import DatasetConfig
from .media import audio as measures

NOT_VOICE = ("audio_silent", "audio_near_silent", "audio_too_short")  # verdict codes that make a clip audio-free


@dataclass(frozen=True)
class AudioThresholds:
    silent_fraction: float = 0.98
    near_silent_lufs: float = -50.0
    quiet_lufs: float = -35.0
    clipped_fraction: float = 0.001
    min_seconds: float = 0.2
    max_early_end_seconds: float = 0.1

    @classmethod
    def from_dataset(cls, dataset: DatasetConfig) -> "AudioThresholds":
        return cls(
            silent_fraction=dataset.audio_silent_fraction,
            near_silent_lufs=dataset.audio_near_silent_lufs,
            quiet_lufs=dataset.audio_quiet_lufs,
            clipped_fraction=dataset.audio_clipped_fraction,
            min_seconds=dataset.audio_min_seconds,
            max_early_end_seconds=dataset.audio_max_early_end_seconds,
        )


@dataclass
class AudioVerdict:
    issues: list[tuple[str, str, str]] = field(default_factory=list)  # (severity, code, message)
    stats: measures.AudioStats | None = None
    seconds: float = 0.0  # real audio in the clip

    @property
    def supervises_voice(self) -> bool:
        return not any(code in NOT_VOICE for _, code, _ in self.issues)

    @property
    def reason(self) -> str | None:
        """Why the clip's audio is not voice supervision (None when it is)."""
        reasons = [message for _, code, message in self.issues if code in NOT_VOICE]
        return "; ".join(reasons) if reasons else None


def judge_clip_audio(audio: np.ndarray, valid_samples: int, sample_rate: int, thresholds: AudioThresholds,
                     channel_names: Sequence[str] | None = None) -> AudioVerdict:
    """The verdict on a clip's audio ``[C, S]`` (S = the clip's length; the first ``valid_samples`` are real
    sound, the rest padding)."""
    t = thresholds
    clip_seconds = audio.shape[1] / sample_rate
    seconds = valid_samples / sample_rate
    verdict = AudioVerdict(seconds=seconds)
    if seconds < t.min_seconds:
        verdict.issues.append(("error", "audio_too_short",
                               f"the clip has only {seconds:.2f} s of audio (less than dataset.audio_min_seconds = "
                               f"{t.min_seconds:g} s): it is not voice supervision and trains audio-free. Use a clip "
                               "whose sound covers it"))
        return verdict
    real = audio[:, :valid_samples]
    stats = measures.measure(real, sample_rate, channel_names)
    verdict.stats = stats
    no_block_above_gate = stats.loudness_lufs is None and seconds >= measures.BLOCK_SECONDS
    if stats.silence_fraction >= t.silent_fraction:
        verdict.issues.append(("error", "audio_silent",
                               f"the clip's audio is silent ({100 * stats.silence_fraction:.0f} % below "
                               f"{measures.SILENCE_DBFS:g} dBFS): it is not voice supervision and trains audio-free "
                               "(it would teach the model silence). Replace or remove its sound"))
    elif no_block_above_gate or (stats.loudness_lufs is not None and stats.loudness_lufs < t.near_silent_lufs):
        level = "no 400 ms block above the loudness gate" if stats.loudness_lufs is None else f"{stats.loudness_lufs:.1f} LUFS"
        verdict.issues.append(("error", "audio_near_silent",
                               f"the clip's audio is near-silent ({level}, below dataset.audio_near_silent_lufs = "
                               f"{t.near_silent_lufs:g}): it is not voice supervision and trains audio-free. Normalise "
                               "it to about -23 to -16 LUFS or replace it"))
    elif stats.loudness_lufs is not None and stats.loudness_lufs < t.quiet_lufs:
        verdict.issues.append(("warning", "too_quiet",
                               f"the audio is too quiet ({stats.loudness_lufs:.1f} LUFS, below {t.quiet_lufs:g} LUFS). "
                               "Normalise it to about -23 to -16 LUFS"))
    if stats.clipped_fraction > t.clipped_fraction:
        verdict.issues.append(("warning", "clipped",
                               f"the audio is clipped ({100 * stats.clipped_fraction:.2f} % of samples at full scale): "
                               "the model would learn the distortion. Use a cleaner take or lower the recording level"))
    missing = clip_seconds - seconds
    if missing > t.max_early_end_seconds:
        verdict.issues.append(("warning", "audio_ends_early",
                               f"the audio ends {missing:.2f} s before the clip (audio {seconds:.2f} s of "
                               f"{clip_seconds:.2f} s): the rest is padded with silence and masked. Trim the video "
                               "or fix the sound"))
    return verdict
