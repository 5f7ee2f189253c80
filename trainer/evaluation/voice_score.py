"""Voice identity score: how much generated audio sounds like the dataset's speaker.

The score is the cosine similarity between speaker embeddings of Resemblyzer's ``VoiceEncoder``
(a 3-layer LSTM trained with the GE2E speaker-verification loss; its weights ship inside the
``resemblyzer`` wheel, so nothing is downloaded). The reference is the mean embedding of the
dataset's speech clips; a sample is scored against it. ``score_ab`` scores the LoRA sample and the
base-model sample of the same seed and prompt, so the gain from training is visible.

How audio reaches the encoder: decoded with PyAV (``media.decode``), averaged to mono, resampled to
the encoder's 16 kHz with our soxr ``resample``, raised to Resemblyzer's -30 dBFS speech level (never
above full scale), then Resemblyzer's own WebRTC VAD drops the long pauses, so only voiced parts are
embedded. Whether the clip holds speech at all is decided by that VAD and our pitch-periodicity
analysis (``media.audio.speech_seconds``) together.

What the score can and cannot tell (read before trusting a number):

- Range: embeddings are non-negative and unit length, so similarities lie in [0, 1]. In our tests
  (espeak-ng and synthetic voices) two sentences of one voice score about 0.85-0.95 and different
  voices 0.4-0.75; on real recordings the ranges move and overlap for similar voices. Compare a
  sample with ``VoiceReference.typical_similarity`` (the dataset's own clips against the
  reference): that is the ceiling a perfect clone would reach.
- It measures timbre (vocal-tract and pitch cues) only: not words, intelligibility, prosody,
  lip-sync or audio quality. Loud noise, music or reverb pull every score towards the middle.
- Random or barely trained models (the demo's tiny model, the first steps of a run) generate noise:
  no speech is detected, the noise itself is embedded, and LoRA and base scores land near each other
  (a gain of a few hundredths means nothing). ``VoiceScore.speech_detected`` is False then.
- Clips shorter than the encoder's 1.6 s window are zero-padded; below ~1 s of speech scores get
  noisy. Score several prompts/seeds and look at the trend over steps, not at one value.
"""

from __future__ import annotations

import json
import math
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from ..data.media.audio import resample, speech_seconds, to_mono
from ..data.media.decode import decode_audio
from ..data.media.probe import MediaError
from ..io_utils import atomic_write_json

ENCODER_RATE = 16000  # Resemblyzer's sampling_rate
SPEECH_LEVEL_DBFS = -30.0  # Resemblyzer's audio_norm_target_dBFS
MAX_PEAK = 0.99  # the level raise never pushes a sample past this (the VAD converts to int16)
MIN_SECONDS = 0.3  # shorter audio cannot be scored
MIN_VOICED_SECONDS = 0.3  # less speech than this after the VAD counts as "no speech detected"
SILENCE_PEAK = 1e-4  # peaks below this (-80 dBFS) are silence
REFERENCE_FORMAT = 1
INSTALL_HINT = "pip install resemblyzer"


class VoiceScoreError(ValueError):
    """Audio that cannot be scored (silent, too short, wrong shape) or a reference that cannot be built."""


@dataclass
class VoiceScore:
    """One clip scored against a reference."""

    similarity: float  # cosine similarity with the reference embedding, in [0, 1]
    seconds: float  # length of the scored audio
    voiced_seconds: float  # what was embedded: the VAD's voiced parts, or the whole clip when it found none
    speech_seconds: float  # pitched (periodic) speech found by our analysis (media.audio.speech_seconds)
    speech_detected: bool  # False: no speech found (noise, silence, music): the score means little

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class VoiceGain:
    """The same seed and prompt with and without the LoRA, both against the reference."""

    lora: float
    base: float
    gain: float  # lora - base: how much closer to the dataset voice training brought the sample
    lora_detail: VoiceScore
    base_detail: VoiceScore

    @classmethod
    def of(cls, lora: VoiceScore, base: VoiceScore) -> "VoiceGain":
        return cls(lora.similarity, base.similarity, lora.similarity - base.similarity, lora, base)

    def to_dict(self) -> dict:
        return {"lora": self.lora, "base": self.base, "gain": self.gain,
                "lora_detail": self.lora_detail.to_dict(), "base_detail": self.base_detail.to_dict()}


@dataclass
class VoiceEmbedding:
    """A speaker embedding of one clip and what went into it."""

    vector: np.ndarray  # [256], unit length
    seconds: float
    voiced_seconds: float
    speech_seconds: float
    speech_detected: bool


def require_resemblyzer():
    """The ``resemblyzer`` module, or an ImportError that says how to install it."""
    try:
        import resemblyzer
    except ImportError as exc:
        raise ImportError(
            f"the voice identity score needs the resemblyzer package ({exc}); install it with `{INSTALL_HINT}` "
            "(its speaker-encoder weights ship inside the package, nothing is downloaded)"
        ) from None
    return resemblyzer


@lru_cache(maxsize=2)
def voice_encoder(device: str = "cpu"):
    """The pretrained speaker encoder, loaded once per device. The weights file ships inside the
    resemblyzer wheel; torch >= 2.6 reads it with ``weights_only=True`` (no code is unpickled)."""
    resemblyzer = require_resemblyzer()
    return resemblyzer.VoiceEncoder(device, verbose=False)


def encoder_name() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"resemblyzer-{version('resemblyzer')}"
    except PackageNotFoundError:
        return "resemblyzer"


# --------------------------------------------------------------------------------------------
# Audio → embedding
# --------------------------------------------------------------------------------------------


def _as_channels_first(audio, where: str) -> np.ndarray:
    """float32 ``[C, S]`` from a numpy array or torch tensor shaped ``[C, S]`` or ``[S]``."""
    if hasattr(audio, "detach"):  # a torch tensor (ComfyUI AUDIO waveforms are torch)
        audio = audio.detach().float().cpu().numpy()
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 1:
        audio = audio[None]
    if audio.ndim != 2:
        raise VoiceScoreError(f"{where}: audio must be shaped [channels, samples] or [samples], got {list(audio.shape)}"
                              " (for a batch [B, C, S] pass one clip, e.g. waveform[0])")
    if audio.shape[0] > audio.shape[1]:
        raise VoiceScoreError(f"{where}: audio shaped {list(audio.shape)} has more channels than samples; "
                              "pass [channels, samples] (transpose a [samples, channels] array)")
    if not np.isfinite(audio).all():
        raise VoiceScoreError(f"{where}: audio contains NaN or infinite values")
    return audio


def _prepare_for_encoder(audio: np.ndarray, rate: int, where: str) -> tuple[np.ndarray, float]:
    """Mono 16 kHz at speech level, clipped to full scale like any decoded file."""
    if rate <= 0:
        raise VoiceScoreError(f"{where}: sample rate must be positive, got {rate}")
    seconds = audio.shape[1] / rate
    if seconds < MIN_SECONDS:
        raise VoiceScoreError(f"{where}: {seconds:.2f} s of audio is too short to score; give at least {MIN_SECONDS} s")
    mono = resample(to_mono(np.clip(audio, -1.0, 1.0))[None], rate, ENCODER_RATE)[0].astype(np.float64)
    peak = float(np.max(np.abs(mono)))
    if peak < SILENCE_PEAK:
        raise VoiceScoreError(f"{where}: the audio is silent (peak {20 * math.log10(max(peak, 1e-12)):.0f} dBFS); "
                              "there is no voice to score")
    # Resemblyzer raises quiet audio to -30 dBFS RMS (never lowers it). We do the same but cap the
    # gain so no sample passes full scale: its VAD converts to int16, where overflow would wrap.
    rms = float(np.sqrt(np.mean(mono**2)))
    gain = max(1.0, min(10 ** (SPEECH_LEVEL_DBFS / 20) / rms, MAX_PEAK / peak))
    return (mono * gain).astype(np.float32), seconds


def embed_audio(audio, rate: int, *, where: str = "audio", device: str = "cpu") -> VoiceEmbedding:
    """Speaker embedding of one clip's voiced parts (the whole clip when the VAD finds no speech)."""
    resemblyzer = require_resemblyzer()
    wav, seconds = _prepare_for_encoder(_as_channels_first(audio, where), int(rate), where)
    voiced = resemblyzer.trim_long_silences(wav)
    vad_found_voice = voiced.size / ENCODER_RATE >= MIN_VOICED_SECONDS
    # WebRTC's VAD also flags loud noise as voice; our pitch-periodicity measure does not, so speech
    # counts as detected only when both agree.
    periodic = speech_seconds(wav[None], ENCODER_RATE)
    used = voiced if vad_found_voice else wav
    with _one_cpu_thread(device):
        vector = voice_encoder(device).embed_utterance(used)
    if not np.isfinite(vector).all():
        raise VoiceScoreError(f"{where}: the speaker encoder produced non-finite values for this audio")
    return VoiceEmbedding(vector.astype(np.float64), seconds, used.size / ENCODER_RATE, periodic,
                      vad_found_voice and periodic >= MIN_VOICED_SECONDS)


@contextmanager
def _one_cpu_thread(device: str) -> Iterator[None]:
    """Run the encoder on one CPU thread, then restore torch's setting. Its LSTM over 1.6 s windows is
    too small to gain from threads, and on a busy machine OpenMP's thread barriers made it 10-100x slower."""
    if torch.device(device).type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _unit(vector: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    if norm == 0.0:
        raise VoiceScoreError("the reference embedding is all zeros; build it from clips with speech")
    return vector / norm


# --------------------------------------------------------------------------------------------
# The reference voice
# --------------------------------------------------------------------------------------------


@dataclass
class VoiceReference:
    """The dataset's voice: the unit-length mean of its speech clips' embeddings."""

    embedding: np.ndarray  # [256], unit length
    sources: list[str]  # the clips it was built from
    clip_similarities: list[float]  # each clip against the reference (how consistent the dataset voice is)
    voiced_seconds: float  # speech that went into it
    skipped: list[str] = field(default_factory=list)  # clips left out, each with its reason
    encoder: str = ""
    device: str = "cpu"

    # ---- building --------------------------------------------------------------------------------

    @classmethod
    def from_waveforms(cls, clips: Iterable[tuple[str, np.ndarray, int]], *, device: str = "cpu") -> "VoiceReference":
        """From ``(name, audio [C, S], rate)`` triples. Clips where the VAD finds no speech are left
        out (listed in ``skipped``); at least one clip with speech is needed."""
        embeddings, sources, skipped = [], [], []
        for name, audio, rate in clips:
            try:
                embedding = embed_audio(audio, rate, where=name, device=device)
            except VoiceScoreError as exc:
                skipped.append(str(exc))
                continue
            if not embedding.speech_detected:
                skipped.append(f"{name}: no speech detected (less than {MIN_VOICED_SECONDS} s voiced)")
                continue
            embeddings.append(embedding)
            sources.append(name)
        if not embeddings:
            detail = "; ".join(skipped[:5]) or "no clips given"
            raise VoiceScoreError(f"no clip with speech to build the voice reference from ({detail}); "
                                  "give clips where the speaker talks")
        reference = _unit(np.mean([e.vector for e in embeddings], axis=0))
        return cls(
            embedding=reference,
            sources=sources,
            clip_similarities=[float(e.vector @ reference) for e in embeddings],
            voiced_seconds=float(sum(e.voiced_seconds for e in embeddings)),
            skipped=skipped,
            encoder=encoder_name(),
            device=device,
        )

    @classmethod
    def from_files(cls, paths: Sequence[str | Path], *, audio_stream: int = 0, device: str = "cpu") -> "VoiceReference":
        """From media files (video with sound, wav, flac, ...), decoded with PyAV. A file that cannot
        be decoded raises ``MediaError`` naming it."""
        if not paths:
            raise VoiceScoreError("no files given for the voice reference")
        return cls.from_waveforms(_decoded(paths, [audio_stream] * len(paths)), device=device)

    @classmethod
    def from_dataset(cls, dataset_config, *, device: str = "cpu") -> "VoiceReference":
        """From the training items of a ``DatasetConfig`` (separate audio files and audio_stream
        respected; images and validation items left out)."""
        from ..data.dataset import enumerate_dataset

        items = [i for i in enumerate_dataset(dataset_config) if not i.is_image and not i.is_validation]
        if not items:
            raise VoiceScoreError("the dataset has no video/audio training items to build the voice reference from")
        paths = [i.audio_path or i.media_path for i in items]
        streams = [0 if i.audio_path else i.audio_stream for i in items]
        # Clips without sound train video only; they are left out here (and named), not an error.
        without_audio: list[str] = []
        reference = cls.from_waveforms(_decoded(paths, streams, without_audio), device=device)
        reference.skipped.extend(without_audio)
        return reference

    @classmethod
    def from_cache(cls, cache_dir: str | Path, *, device: str = "cpu") -> "VoiceReference":
        """From the source media of a latent cache's audio entries (decoded again with PyAV: the
        cached latents are what the model learns, not what the voice sounds like). The manifest keeps
        no separate audio paths or stream choice: for datasets using ``audio_dir`` or
        ``audio_stream`` use ``from_dataset``."""
        from ..data.cache import manifest_entries

        cache_dir = Path(cache_dir)
        if not (cache_dir / "manifest.json").is_file():
            raise VoiceScoreError(f"{cache_dir}: no manifest.json; run `ltx2-av-trainer cache` first or use from_files")
        entries = [e for e in manifest_entries(cache_dir) if e.has_audio and not e.is_validation]
        if not entries:
            raise VoiceScoreError(f"{cache_dir}: the cache has no training entry with audio")
        missing = [e.media for e in entries if not Path(e.media).is_file()]
        if missing:
            raise VoiceScoreError(
                f"{cache_dir}: source media of {len(missing)} cached item(s) is gone (e.g. {missing[0]}); the voice "
                "reference needs the original audio: use VoiceReference.from_files with the clips you still have"
            )
        return cls.from_files([e.media for e in entries], device=device)

    # ---- scoring ----------------------------------------------------------------------------------

    @property
    def typical_similarity(self) -> float:
        """Mean similarity of the dataset's own clips to the reference: what a perfect clone scores."""
        return float(np.mean(self.clip_similarities))

    def score_detail(self, audio, rate: int, *, where: str = "audio") -> VoiceScore:
        embedding = embed_audio(audio, rate, where=where, device=self.device)
        return VoiceScore(float(embedding.vector @ self.embedding), embedding.seconds, embedding.voiced_seconds,
                          embedding.speech_seconds, embedding.speech_detected)

    def score(self, audio, rate: int) -> float:
        """Similarity in [0, 1] of ``audio`` ([C, S] or [S], numpy or torch) to the reference voice."""
        result = self.score_detail(audio, rate)
        if not result.speech_detected:
            warnings.warn("voice score: no speech detected in the audio; the whole clip was scored, "
                          "so the value says little about the voice", stacklevel=2)
        return result.similarity

    def score_ab(self, lora_audio, base_audio, rate: int) -> VoiceGain:
        """Score the LoRA sample and the base-model sample (same seed and prompt) at ``rate``."""
        return VoiceGain.of(self.score_detail(lora_audio, rate, where="LoRA sample"),
                            self.score_detail(base_audio, rate, where="base sample"))

    # ---- persistence (JSON, no pickle) ------------------------------------------------------------

    def to_dict(self) -> dict:
        return {"format": REFERENCE_FORMAT, "encoder": self.encoder, "embedding": [float(x) for x in self.embedding],
                "sources": self.sources, "clip_similarities": self.clip_similarities,
                "voiced_seconds": self.voiced_seconds, "skipped": self.skipped}

    def save(self, path: str | Path) -> Path:
        atomic_write_json(path, self.to_dict())
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, *, device: str = "cpu") -> "VoiceReference":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise VoiceScoreError(f"{path}: not a readable voice reference ({exc})") from None
        if data.get("format") != REFERENCE_FORMAT or len(data.get("embedding", [])) != 256:
            raise VoiceScoreError(f"{path}: not a voice reference of format {REFERENCE_FORMAT}; build it again")
        if data.get("encoder") and data["encoder"] != encoder_name():
            warnings.warn(f"{path}: built with {data['encoder']}, scoring with {encoder_name()}; rebuild the "
                          "reference if scores look off", stacklevel=2)
        return cls(_unit(np.asarray(data["embedding"], dtype=np.float64)), list(data["sources"]),
                   [float(x) for x in data["clip_similarities"]], float(data["voiced_seconds"]),
                   list(data.get("skipped", [])), data.get("encoder", ""), device)


def _decoded(paths: Sequence[str | Path], streams: Sequence[int], without_audio: list[str] | None = None):
    """``(name, audio, rate)`` per file, decoded one at a time. With ``without_audio`` given, files that
    have no audio stream are listed there instead of raising ``MediaError``."""
    for path, stream in zip(paths, streams):
        try:
            track = decode_audio(path, audio_index=stream)
        except MediaError as exc:
            if without_audio is None or exc.kind != "no_audio":
                raise
            without_audio.append(str(exc))
            continue
        yield str(path), track.samples, track.sample_rate


# --------------------------------------------------------------------------------------------
# One-call helpers (the `score` subcommand and the Voice Score node)
# --------------------------------------------------------------------------------------------


def score_waveform(waveform, rate: int, reference: VoiceReference) -> VoiceScore:
    """Score ``waveform`` (``[C, S]`` or ``[S]``, numpy or torch) at ``rate`` against ``reference``."""
    return reference.score_detail(waveform, rate, where="waveform")


def score_file(path: str | Path, reference: VoiceReference, *, audio_stream: int = 0) -> VoiceScore:
    """Score the sound of a media file (decoded with PyAV) against ``reference``."""
    track = decode_audio(path, audio_index=audio_stream)
    return reference.score_detail(track.samples, track.sample_rate, where=str(path))


def score_ab_files(lora_path: str | Path, base_path: str | Path, reference: VoiceReference) -> VoiceGain:
    """Score the files of an A/B pair (e.g. ``samples/lora.wav`` and ``samples/base.wav``)."""
    return VoiceGain.of(score_file(lora_path, reference), score_file(base_path, reference))
