"""Synthetic "talking clips": real video + voice-like audio files for the no-weights demo and the tests.

Nothing here is a recording. Each speaker is a small set of numbers: a voice (pitch, formants,
breathiness, speaking rate) and a look (colours, face position and size). From them we synthesise

- audio by source-filter synthesis: a Rosenberg glottal pulse train with intonation, vibrato and
  jitter, shaped by second-order formant resonators that move between vowel targets syllable by
  syllable, under a syllable envelope with pauses between words, plus a little aspiration noise;
- video of a cartoon face whose mouth opening follows that same syllable envelope at each frame time,
  so the pair carries a real audio→video correlation (lip sync) a model can learn;
- a caption with the trigger word, a description of the voice and a (made-up) transcript.

Clips are written with PyAV (its wheel bundles FFmpeg) as h264 (or mpeg4) + AAC, atomically.
Everything is deterministic for the same arguments and vectorised with numpy / scipy.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple

import av
import numpy as np
from scipy import ndimage, signal

from ..io_utils import atomic_write_json, atomic_write_text
from .media.encode import CONTAINER_FORMATS, video_codec_name, write_av_file

# Vowel targets as ratios to a speaker's neutral (schwa-like) formants. Derived from Peterson & Barney's
# average adult formants (F1, F2, F3) divided by the neutral tract's 500/1500/2500 Hz; F4 barely moves.
VOWEL_FORMANT_RATIOS: dict[str, tuple[float, float, float, float]] = {
    "i": (0.54, 1.53, 1.20, 1.0),
    "e": (1.06, 1.23, 0.99, 1.0),
    "a": (1.46, 0.73, 0.98, 1.0),
    "o": (1.14, 0.56, 0.96, 1.0),
    "u": (0.60, 0.58, 0.90, 1.0),
}

TARGET_RMS_DBFS = -20.0  # about -20 LUFS for speech without long pauses
PEAK_CEILING_DBFS = -1.0
ROOM_TONE_DBFS = -62.0  # a quiet room, not digital silence (which the doctor would flag)
DEMO_MANIFEST = "synth_manifest.json"


# --------------------------------------------------------------------------------------------
# Speakers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpeakerVoice:
    """The numbers behind one synthetic voice. Frequencies in Hz, depths relative to f0."""

    f0_hz: float
    formants_hz: tuple[float, ...]  # neutral vocal tract, 3-4 formants; vowels scale these
    bandwidths_hz: tuple[float, ...]  # one per formant
    f0_jitter: float = 0.01  # fast random pitch perturbation (relative std)
    vibrato_hz: float = 5.0
    vibrato_depth: float = 0.008
    intonation_depth: float = 0.08  # syllable pitch accents and declination (relative)
    breathiness: float = 0.08  # aspiration noise relative to the voiced source, 0..1
    syllables_per_second: float = 4.0
    open_quotient: float = 0.6  # fraction of each glottal period the folds are open

    def __post_init__(self) -> None:
        if not 50.0 <= self.f0_hz <= 500.0:
            raise ValueError(f"SpeakerVoice.f0_hz={self.f0_hz} is outside 50-500 Hz; use a speaking pitch.")
        if not 3 <= len(self.formants_hz) <= 4 or len(self.formants_hz) != len(self.bandwidths_hz):
            raise ValueError(
                f"SpeakerVoice needs 3 or 4 formants with one bandwidth each; got formants_hz={self.formants_hz}, "
                f"bandwidths_hz={self.bandwidths_hz}."
            )
        if any(f <= 0 for f in self.formants_hz) or any(b <= 0 for b in self.bandwidths_hz):
            raise ValueError("SpeakerVoice formants and bandwidths must be positive frequencies in Hz.")
        if not 0.0 <= self.breathiness <= 1.0:
            raise ValueError(f"SpeakerVoice.breathiness={self.breathiness} must be within 0..1.")
        if not 1.0 <= self.syllables_per_second <= 10.0:
            raise ValueError(
                f"SpeakerVoice.syllables_per_second={self.syllables_per_second} must be within 1..10 (speech rate)."
            )
        for name in ("f0_jitter", "vibrato_depth", "intonation_depth"):
            if not 0.0 <= getattr(self, name) <= 0.3:
                raise ValueError(f"SpeakerVoice.{name}={getattr(self, name)} must be within 0..0.3 (relative to f0).")
        if not 0.3 <= self.open_quotient <= 0.9:
            raise ValueError(f"SpeakerVoice.open_quotient={self.open_quotient} must be within 0.3..0.9.")


@dataclass(frozen=True)
class SpeakerLook:
    """How a synthetic speaker is drawn. Colours are RGB 0-255; geometry is relative to the frame."""

    skin_rgb: tuple[int, int, int]
    background_rgb: tuple[int, int, int]
    hair_rgb: tuple[int, int, int]
    shirt_rgb: tuple[int, int, int]
    face_center: tuple[float, float] = (0.5, 0.45)  # (x, y) as fractions of width, height
    face_height: float = 0.62  # head height as a fraction of the frame height

    def __post_init__(self) -> None:
        if not (0.2 <= self.face_center[0] <= 0.8 and 0.25 <= self.face_center[1] <= 0.75):
            raise ValueError(f"SpeakerLook.face_center={self.face_center} would put the face off the frame.")
        if not 0.2 <= self.face_height <= 0.9:
            raise ValueError(f"SpeakerLook.face_height={self.face_height} must be within 0.2..0.9 of the frame.")


@dataclass(frozen=True)
class Speaker:
    name: str
    description: str  # as it appears in captions: "a person with {description}"
    voice: SpeakerVoice
    look: SpeakerLook


def _neutral_tract(scale: float) -> tuple[float, ...]:
    """Formants of a uniform tube scaled by vocal-tract size (shorter tract → higher formants)."""
    return tuple(round(f * scale, 1) for f in (500.0, 1500.0, 2500.0, 3500.0))


# Presets, distinct in pitch, formants (vocal-tract size), breathiness, rate and look.
_PRESETS: tuple[Speaker, ...] = (
    Speaker(
        "deep",
        "a deep warm voice",
        SpeakerVoice(110.0, _neutral_tract(0.95), (60.0, 90.0, 120.0, 160.0), breathiness=0.05,
                     syllables_per_second=4.0),
        SpeakerLook((224, 172, 140), (70, 90, 120), (60, 40, 30), (40, 60, 90), (0.5, 0.45), 0.62),
    ),
    Speaker(
        "bright",
        "a bright clear voice",
        SpeakerVoice(210.0, _neutral_tract(1.17), (70.0, 100.0, 140.0, 180.0), breathiness=0.12,
                     syllables_per_second=4.6, open_quotient=0.65),
        SpeakerLook((190, 130, 95), (150, 120, 90), (25, 20, 20), (150, 40, 60), (0.48, 0.44), 0.58),
    ),
    Speaker(
        "light",
        "a light high voice",
        SpeakerVoice(270.0, _neutral_tract(1.3), (80.0, 110.0, 150.0, 200.0), breathiness=0.1,
                     syllables_per_second=5.0, intonation_depth=0.12, open_quotient=0.7),
        SpeakerLook((240, 200, 170), (90, 140, 90), (200, 150, 60), (230, 200, 60), (0.52, 0.47), 0.55),
    ),
    Speaker(
        "raspy",
        "a low raspy voice",
        SpeakerVoice(92.0, _neutral_tract(0.9), (70.0, 100.0, 130.0, 170.0), breathiness=0.3,
                     syllables_per_second=3.5, f0_jitter=0.02, open_quotient=0.5),
        SpeakerLook((140, 95, 70), (110, 110, 110), (90, 90, 90), (70, 70, 60), (0.5, 0.46), 0.66),
    ),
)
SPEAKER_NAMES: tuple[str, ...] = tuple(p.name for p in _PRESETS)


def speaker(index_or_name: int | str, seed: int = 0) -> Speaker:
    """A distinct, deterministic speaker.

    Indices 0-3 (or the names in ``SPEAKER_NAMES``) are presets ("deep" ~110 Hz with low formants,
    "bright" ~210 Hz with higher formants, ...), nudged a little by ``seed`` (±4 % pitch, ±3 %
    formants, a few colour levels). Higher indices are drawn at random from ``seed`` and the index.
    """
    if isinstance(index_or_name, str):
        if index_or_name not in SPEAKER_NAMES:
            raise ValueError(f"Unknown speaker name {index_or_name!r}; use one of {list(SPEAKER_NAMES)} or an index.")
        index = SPEAKER_NAMES.index(index_or_name)
    else:
        index = int(index_or_name)
        if index < 0:
            raise ValueError(f"Speaker index must be >= 0, got {index}.")
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, index, 0x5EA7])
    if index < len(_PRESETS):
        base = _PRESETS[index]
    else:
        base = _random_speaker(index, rng)
    pitch = 1.0 + rng.uniform(-0.04, 0.04)
    tract = 1.0 + rng.uniform(-0.03, 0.03)
    voice = replace(
        base.voice,
        f0_hz=round(base.voice.f0_hz * pitch, 2),
        formants_hz=tuple(round(f * tract, 1) for f in base.voice.formants_hz),
        vibrato_hz=round(base.voice.vibrato_hz + rng.uniform(-0.5, 0.5), 2),
    )
    look = replace(
        base.look,
        skin_rgb=_jitter_rgb(base.look.skin_rgb, rng),
        background_rgb=_jitter_rgb(base.look.background_rgb, rng),
    )
    return replace(base, voice=voice, look=look)


def _jitter_rgb(rgb: tuple[int, int, int], rng: np.random.Generator) -> tuple[int, int, int]:
    shifted = np.clip(np.asarray(rgb) + rng.integers(-8, 9, size=3), 0, 255)
    return (int(shifted[0]), int(shifted[1]), int(shifted[2]))


def _random_speaker(index: int, rng: np.random.Generator) -> Speaker:
    # Pitch and tract size go together in people (bigger larynx, longer tract), with some spread.
    f0 = float(rng.uniform(90.0, 260.0))
    tract = float(np.clip(0.9 + (f0 - 90.0) / 170.0 * 0.35 + rng.normal(0.0, 0.04), 0.85, 1.3))
    pitch_word = "low" if f0 < 140 else "medium" if f0 < 200 else "high"
    quality = str(rng.choice(["calm", "soft", "lively", "husky", "smooth"]))
    breathiness = 0.25 if quality == "husky" else float(rng.uniform(0.04, 0.14))
    voice = SpeakerVoice(
        round(f0, 1),
        _neutral_tract(tract),
        (65.0, 95.0, 130.0, 170.0),
        breathiness=breathiness,
        syllables_per_second=round(float(rng.uniform(3.5, 5.2)), 2),
        intonation_depth=round(float(rng.uniform(0.05, 0.12)), 3),
    )
    colours = rng.integers(30, 226, size=(4, 3))
    look = SpeakerLook(
        skin_rgb=tuple(int(c) for c in np.clip(colours[0] + 60, 120, 245)),
        background_rgb=tuple(int(c) for c in colours[1]),
        hair_rgb=tuple(int(c) for c in colours[2] // 2),
        shirt_rgb=tuple(int(c) for c in colours[3]),
        face_center=(round(float(rng.uniform(0.42, 0.58)), 3), round(float(rng.uniform(0.42, 0.5)), 3)),
        face_height=round(float(rng.uniform(0.52, 0.66)), 3),
    )
    return Speaker(f"speaker{index}", f"a {quality} {pitch_word} voice", voice, look)


# --------------------------------------------------------------------------------------------
# Voice
# --------------------------------------------------------------------------------------------


class VoiceSignal(NamedTuple):
    audio: np.ndarray  # float32 [channels, samples], about -20 dBFS RMS, peaks below -1 dBFS
    envelope: np.ndarray  # float32 [samples], the syllable amplitude envelope in 0..1


@dataclass(frozen=True)
class _Syllables:
    starts: np.ndarray  # seconds
    ends: np.ndarray
    vowels: np.ndarray  # index into VOWEL_FORMANT_RATIOS
    amplitudes: np.ndarray
    accents: np.ndarray  # pitch accent, in units of intonation_depth
    fricative: np.ndarray  # bool: starts with a noisy consonant


def _plan_syllables(voice: SpeakerVoice, seconds: float, rng: np.random.Generator) -> _Syllables:
    """Words of 1-3 syllables at the speaking rate with short pauses between words."""
    syllable_seconds = 1.0 / voice.syllables_per_second
    t = float(rng.uniform(0.05, 0.15))  # a breath before the first word
    end_limit = seconds - 0.04  # let the last syllable finish inside the clip
    rows: list[tuple[float, float, int, float, float, bool]] = []
    while t < end_limit:
        word_length = int(rng.choice([1, 2, 3], p=[0.35, 0.45, 0.2]))
        for position in range(word_length):
            # The last syllable may be shortened to end with the clip, but not below 60 % of its length.
            duration = min(syllable_seconds * float(rng.uniform(0.75, 1.25)), end_limit - t)
            if duration < 0.6 * syllable_seconds:
                break
            stressed = position == 0
            rows.append((
                t,
                t + duration,
                int(rng.integers(len(VOWEL_FORMANT_RATIOS))),
                float(rng.uniform(0.85, 1.0) if stressed else rng.uniform(0.6, 0.85)),
                float(rng.normal(0.4 if stressed else -0.2, 0.5)),
                bool(rng.random() < 0.4),
            ))
            t += duration
        else:
            t += float(rng.uniform(0.07, 0.18))  # pause between words
            continue
        break
    if not rows:
        raise ValueError(
            f"seconds={seconds:.3f} is too short for one syllable at {voice.syllables_per_second} syllables/s; "
            f"use at least {0.2 + 1.3 * syllable_seconds:.2f} s."
        )
    columns = list(zip(*rows))
    return _Syllables(*(np.asarray(c) for c in columns))


def _smooth(x: np.ndarray, window_samples: int) -> np.ndarray:
    """Triangular moving average (two box passes) along the last axis, edges held, O(n)."""
    half = max(1, int(window_samples) // 2)
    once = ndimage.uniform_filter1d(np.asarray(x, dtype=np.float64), half, axis=-1, mode="nearest")
    return ndimage.uniform_filter1d(once, half, axis=-1, mode="nearest")


def _rosenberg_flow(phase: np.ndarray, open_quotient: float) -> np.ndarray:
    """Glottal flow of a Rosenberg pulse at each point of the period (phase in [0, 1))."""
    # Slow opening, abrupt closing (as in modal voice): the sharp closure is what excites the
    # higher formants; a symmetric pulse sounds muffled.
    rise = open_quotient * 0.85
    fall = open_quotient - rise
    flow = np.zeros_like(phase)
    opening = phase < rise
    closing = (phase >= rise) & (phase < open_quotient)
    flow[opening] = 0.5 * (1.0 - np.cos(np.pi * phase[opening] / rise))
    flow[closing] = np.cos(0.5 * np.pi * (phase[closing] - rise) / fall)
    return flow


def _resonator(frequency: float, bandwidth: float, sample_rate: int) -> np.ndarray:
    """One second-order all-pole formant resonator with unit gain at DC (Klatt-style), as an SOS row."""
    r = np.exp(-np.pi * bandwidth / sample_rate)
    theta = 2.0 * np.pi * frequency / sample_rate
    a1, a2 = -2.0 * r * np.cos(theta), r * r
    return np.array([1.0 + a1 + a2, 0.0, 0.0, 1.0, a1, a2])


def _higher_poles(voice: SpeakerVoice, sample_rate: int) -> np.ndarray:
    """Resonators above the last formant, spaced like the speaker's formants, up to near Nyquist.

    A tube keeps resonating above F4: the product of all its DC-normalised resonances is flat on
    average, while a cascade cut off after F4 falls 12 dB/octave per missing pole and sounds muffled
    (Klatt's "higher-pole correction"). They belong to the speaker, not to the vowel.
    """
    spacing = (voice.formants_hz[-1] - voice.formants_hz[0]) / (len(voice.formants_hz) - 1)
    frequencies = np.arange(voice.formants_hz[-1] + spacing, 0.42 * sample_rate, spacing)
    return np.array([_resonator(f, 0.1 * f, sample_rate) for f in frequencies]).reshape(-1, 6)


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def synthesize_voice(
    speaker: Speaker | SpeakerVoice,
    seconds: float,
    sample_rate: int = 48000,
    seed: int = 0,
    channels: int = 2,
) -> VoiceSignal:
    """Voice-like babble for ``seconds`` by source-filter synthesis; returns audio and its envelope.

    The envelope is the syllable amplitude that drives the voice (0 in pauses), per sample: sample it
    at video frame times (``envelope_at_frames``) to animate a mouth in sync with the sound.
    """
    voice = speaker.voice if isinstance(speaker, Speaker) else speaker
    if seconds <= 0:
        raise ValueError(f"seconds must be positive, got {seconds}.")
    if sample_rate < 16000:
        raise ValueError(f"sample_rate={sample_rate} is too low for speech formants; use 16000 Hz or more.")
    if channels not in (1, 2):
        raise ValueError(f"channels must be 1 or 2, got {channels}.")
    highest = max(voice.formants_hz) * max(r[len(voice.formants_hz) - 1] for r in VOWEL_FORMANT_RATIOS.values())
    if highest >= 0.45 * sample_rate:
        raise ValueError(f"Formants up to {highest:.0f} Hz do not fit under sample_rate={sample_rate}; raise it.")

    # The seed alone picks syllables, vowels and noise, so two voices with one seed say "the same thing".
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x701CE])
    n = int(round(seconds * sample_rate))
    t = np.arange(n) / sample_rate
    plan = _plan_syllables(voice, seconds, rng)

    # Which syllable each sample belongs to, and where inside it (pauses: outside every syllable).
    index = np.clip(np.searchsorted(plan.starts, t, side="right") - 1, 0, len(plan.starts) - 1)
    inside = (t >= plan.starts[index]) & (t < plan.ends[index])
    progress = np.clip((t - plan.starts[index]) / (plan.ends[index] - plan.starts[index]), 0.0, 1.0)
    envelope = np.where(inside, plan.amplitudes[index] * np.sin(np.pi * progress) ** 0.6, 0.0)

    # Pitch: per-syllable accents smoothed into a contour, declination, vibrato and fast jitter (log f0).
    ten_ms = sample_rate // 100
    # Accents are centred so that f0_hz stays the speaker's mean speaking pitch.
    accents = plan.accents - plan.accents.mean()
    log_f0 = voice.intonation_depth * (_smooth(accents[index], 12 * ten_ms) + 0.6 * (0.5 - t / seconds))
    log_f0 += voice.vibrato_depth * np.sin(2 * np.pi * voice.vibrato_hz * t + rng.uniform(0, 2 * np.pi))
    jitter_knots = np.arange(0.0, seconds + 2.0 / voice.f0_hz, 1.0 / voice.f0_hz)
    log_f0 += voice.f0_jitter * np.interp(t, jitter_knots, rng.normal(0.0, 1.0, len(jitter_knots)))
    f0 = voice.f0_hz * np.exp(log_f0)
    phase = np.cumsum(f0 / sample_rate) + rng.uniform(0.0, 1.0)
    cycle = phase % 1.0

    # Source: differentiated glottal flow (flow derivative + lip radiation), with aspiration noise
    # strongest while the folds are open, all under the syllable envelope.
    voiced = np.diff(_rosenberg_flow(cycle, voice.open_quotient), prepend=0.0)
    voiced /= _rms(voiced) + 1e-12
    aspiration = rng.normal(0.0, 1.0, n) * (0.4 + 0.6 * (cycle < voice.open_quotient))
    source = envelope * ((1.0 - voice.breathiness) * voiced + voice.breathiness * aspiration)

    # Vocal tract: the source through a cascade of formant resonators for each vowel target; outputs
    # are cross-faded by which vowel each syllable holds (equal loudness per vowel, so loudness
    # follows the envelope rather than vowel colour).
    vowel_weights = np.zeros((len(VOWEL_FORMANT_RATIOS), n))
    vowel_weights[plan.vowels[index], np.arange(n)] = 1.0
    vowel_weights = _smooth(vowel_weights, 3 * ten_ms)
    speech = np.zeros(n)
    for vowel, ratios in enumerate(VOWEL_FORMANT_RATIOS.values()):
        if not vowel_weights[vowel].any():
            continue
        cascade = np.array([
            _resonator(formant * ratio, bandwidth, sample_rate)
            for formant, bandwidth, ratio in zip(voice.formants_hz, voice.bandwidths_hz, ratios)
        ])
        shaped = signal.sosfilt(cascade, source)
        speech += vowel_weights[vowel] * shaped / (_rms(shaped) + 1e-12)
    higher = _higher_poles(voice, sample_rate)
    if len(higher):
        speech = signal.sosfilt(higher, speech)

    # Consonant-like hiss at the start of some syllables (high-passed noise, not formant-shaped).
    onset = inside & plan.fricative[index] & (progress < 0.2)
    if onset.any():
        hiss = signal.sosfilt(signal.butter(4, 3500.0, "highpass", fs=sample_rate, output="sos"), rng.normal(0, 1, n))
        speech += 0.25 * onset * (1.0 - progress / 0.2) * plan.amplitudes[index] * hiss

    speech *= 10 ** (TARGET_RMS_DBFS / 20) / (_rms(speech) + 1e-12)
    speech += 10 ** (ROOM_TONE_DBFS / 20) * rng.normal(0.0, 1.0, n)
    peak = float(np.max(np.abs(speech)))
    ceiling = 10 ** (PEAK_CEILING_DBFS / 20)
    if peak > ceiling:  # rare, very peaky syllables: lower the whole clip rather than clip it
        speech *= ceiling / peak
    audio = np.repeat(speech[None, :], channels, axis=0).astype(np.float32)
    return VoiceSignal(audio, envelope.astype(np.float32))


def _stable_id(obj) -> int:
    """A process-independent 32-bit id of a dataclass (Python's hash() is salted per process)."""
    return zlib.crc32(json.dumps(asdict(obj), sort_keys=True).encode())


def envelope_at_frames(envelope: np.ndarray, sample_rate: int, fps: float, frames: int) -> np.ndarray:
    """Mean of a per-sample envelope over each video frame's interval [i/fps, (i+1)/fps)."""
    bounds = np.round(np.arange(frames + 1) * sample_rate / fps).astype(np.int64)
    bounds = np.clip(bounds, 0, len(envelope))
    sums = np.concatenate([[0.0], np.cumsum(envelope, dtype=np.float64)])
    counts = np.maximum(bounds[1:] - bounds[:-1], 1)
    return ((sums[bounds[1:]] - sums[bounds[:-1]]) / counts).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Face
# --------------------------------------------------------------------------------------------


class _Canvas:
    """Frames ``[F, H, W, 3]`` (float32, 0..1) that ellipses are painted onto, all frames at once.

    Ellipse parameters may differ per frame (arrays shaped ``[F, 1, 1]``). Each ellipse is only
    evaluated inside its bounding box over all frames, which keeps small features (eyes, mouth) cheap.
    """

    def __init__(self, frames: int, height: int, width: int, background: np.ndarray) -> None:
        self.image = np.empty((frames, height, width, 3), dtype=np.float32)
        self.image[:] = background
        self.frames, self.height, self.width = frames, height, width

    def ellipse(self, rgb: np.ndarray, cx, cy, rx, ry, below_y=None) -> None:
        """Anti-aliased ellipse (about one pixel of soft edge); ``below_y`` cuts it off under that row."""
        cx, cy, rx, ry = (np.broadcast_to(np.asarray(v, np.float32), (self.frames, 1, 1)) for v in (cx, cy, rx, ry))
        rx, ry = np.maximum(rx, 0.5), np.maximum(ry, 0.5)
        rows = slice(max(0, int(np.floor((cy - ry).min())) - 1), min(self.height, int(np.ceil((cy + ry).max())) + 2))
        cols = slice(max(0, int(np.floor((cx - rx).min())) - 1), min(self.width, int(np.ceil((cx + rx).max())) + 2))
        if rows.start >= rows.stop or cols.start >= cols.stop:
            return
        y = np.arange(rows.start, rows.stop, dtype=np.float32)[None, :, None] + 0.5
        x = np.arange(cols.start, cols.stop, dtype=np.float32)[None, None, :] + 0.5
        radius = np.sqrt(np.square((x - cx) / rx) + np.square((y - cy) / ry))
        coverage = np.clip(0.5 - (radius - 1.0) * np.minimum(rx, ry), 0.0, 1.0)
        if below_y is not None:
            coverage *= y < np.asarray(below_y, np.float32)
        region = self.image[:, rows, cols]
        region += coverage[..., None] * (np.asarray(rgb, np.float32) - region)


def _blink_openness(frames: int, fps: float, rng: np.random.Generator) -> np.ndarray:
    """Eye openness per frame: 1 open, 0 shut; a ~150 ms blink every 2-5 s."""
    times = np.arange(frames) / fps
    openness = np.ones(frames)
    blink = float(rng.uniform(0.2, 2.5))
    while blink < times[-1] + 1.0:
        distance = np.abs(times - blink) / 0.075
        openness = np.minimum(openness, np.clip(distance, 0.0, 1.0))
        blink += float(rng.uniform(2.0, 5.0))
    return openness


def _face_geometry(look: SpeakerLook, height: int) -> tuple[float, float]:
    """Head half-height and half-width in pixels."""
    ry = 0.5 * look.face_height * height
    return 0.78 * ry, ry


def render_face_frames(
    look: SpeakerLook,
    envelope_per_frame: np.ndarray,
    width: int,
    height: int,
    fps: float,
    seed: int = 0,
) -> np.ndarray:
    """A simple talking face, uint8 ``[F, H, W, 3]``; the mouth opens with ``envelope_per_frame`` (0..1).

    The head drifts slightly, nods a little while speaking and the eyes blink now and then, so the
    mouth is not the only thing that moves, but it is the only thing that follows the audio.
    """
    envelope = np.clip(np.asarray(envelope_per_frame, dtype=np.float64).reshape(-1), 0.0, 1.0)
    frames = len(envelope)
    if frames == 0:
        raise ValueError("envelope_per_frame is empty; give one value per video frame.")
    if width < 32 or height < 32:
        raise ValueError(f"Frame size {width}x{height} is too small to draw a face; use at least 32x32.")
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, _stable_id(look), 0xFACE])
    times = np.arange(frames) / fps

    def per_frame(values: np.ndarray) -> np.ndarray:  # [F] → [F, 1, 1], to broadcast over pixels
        return np.asarray(values, dtype=np.float32)[:, None, None]

    def colour(rgb: tuple[int, int, int]) -> np.ndarray:
        return np.asarray(rgb, dtype=np.float32) / 255.0

    rx, ry = _face_geometry(look, height)
    sway = 0.015 * width * np.sin(2 * np.pi * rng.uniform(0.2, 0.5) * times + rng.uniform(0, 2 * np.pi))
    nod = 0.01 * height * np.sin(2 * np.pi * rng.uniform(0.3, 0.6) * times + rng.uniform(0, 2 * np.pi))
    nod += 0.008 * height * _smooth(envelope[None, :], 5)[0]  # the chin dips a little on loud syllables
    cx = per_frame(look.face_center[0] * width + sway)
    cy = per_frame(look.face_center[1] * height + nod)
    eye_open = per_frame(_blink_openness(frames, fps, rng))
    mouth = per_frame(envelope)

    # A soft vertical gradient behind the speaker, then body, neck, hair, head, fringe, eyes, mouth.
    shade = (0.85 + 0.3 * (np.arange(height, dtype=np.float32) + 0.5) / height)[:, None, None]
    canvas = _Canvas(frames, height, width, colour(look.background_rgb) * shade)
    skin, hair = colour(look.skin_rgb), colour(look.hair_rgb)
    canvas.ellipse(colour(look.shirt_rgb), cx, cy + 1.25 * ry, 1.9 * rx, 0.55 * ry)
    canvas.ellipse(skin, cx, cy + 0.95 * ry, 0.28 * rx, 0.3 * ry)
    canvas.ellipse(hair, cx, cy - 0.08 * ry, 1.06 * rx, ry)
    canvas.ellipse(skin, cx, cy, rx, ry)
    canvas.ellipse(hair, cx, cy - 0.75 * ry, 0.95 * rx, 0.35 * ry, below_y=cy - 0.55 * ry)
    for side in (-1.0, 1.0):
        canvas.ellipse(np.array([0.12, 0.1, 0.1]), cx + side * 0.36 * rx, cy - 0.12 * ry, 0.13 * rx,
                       (0.1 * eye_open + 0.02) * ry)
    mouth_cy = cy + 0.5 * ry
    mouth_rx = (0.38 - 0.08 * mouth) * rx  # lips round a little as they open
    mouth_ry = (0.03 + 0.3 * mouth) * ry
    canvas.ellipse(skin * np.array([0.75, 0.45, 0.45]), cx, mouth_cy, mouth_rx + 0.08 * rx, mouth_ry + 0.06 * ry)
    canvas.ellipse(np.array([0.18, 0.05, 0.06]), cx, mouth_cy, mouth_rx, mouth_ry)
    return np.clip(np.round(canvas.image * 255.0), 0, 255).astype(np.uint8)


def mouth_box(look: SpeakerLook, width: int, height: int) -> tuple[slice, slice]:
    """Rows and columns that contain the mouth in every frame (head motion included)."""
    rx, ry = _face_geometry(look, height)
    cx = look.face_center[0] * width
    cy = look.face_center[1] * height + 0.5 * ry
    # Widest/tallest open mouth with its lips, plus the largest sway (1.5 %) and nod (1.8 %).
    half_w = 0.46 * rx + 0.015 * width + 1
    top = cy - 0.38 * ry - 0.018 * height
    bottom = cy + 0.4 * ry + 0.018 * height + 1
    return (
        slice(max(0, int(top)), min(height, int(np.ceil(bottom)))),
        slice(max(0, int(cx - half_w)), min(width, int(np.ceil(cx + half_w)))),
    )


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def write_talking_clip(
    path: str | Path,
    speaker: Speaker,
    seconds: float,
    fps: int = 25,
    width: int = 128,
    height: int = 96,
    sample_rate: int = 48000,
    seed: int = 0,
    container: str = "mp4",
) -> Path:
    """Write one talking clip (yuv420p video + stereo AAC, in sync) atomically; returns its path.

    The clip has ``round(seconds * fps)`` frames and exactly that many frames' worth of audio.
    """
    path = Path(path)
    if container not in CONTAINER_FORMATS:
        raise ValueError(f"container={container!r} is not supported; use one of {sorted(CONTAINER_FORMATS)}.")
    if path.suffix.lower() != "." + container:
        raise ValueError(f"{path}: the file name should end in .{container} to match container={container!r}.")
    if width % 2 or height % 2:
        raise ValueError(f"{path}: width and height must be even for yuv420p video, got {width}x{height}.")
    if int(fps) != fps or fps <= 0:
        raise ValueError(f"{path}: fps must be a positive whole number, got {fps}.")
    fps = int(fps)
    frames = int(round(seconds * fps))
    if frames < 1:
        raise ValueError(f"{path}: seconds={seconds} gives no video frame at {fps} fps.")

    try:
        voice = synthesize_voice(speaker, frames / fps, sample_rate=sample_rate, seed=seed, channels=2)
        mouth_opening = envelope_at_frames(voice.envelope, sample_rate, fps, frames)
        pictures = render_face_frames(speaker.look, mouth_opening, width, height, fps, seed=seed)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error
    # Audio and video are muxed frame by frame: each frame carries exactly its 1/fps of audio.
    return write_av_file(path, pictures, fps, voice.audio, sample_rate, container)


# --------------------------------------------------------------------------------------------
# Demo dataset
# --------------------------------------------------------------------------------------------

_TRANSCRIPTS = (
    "good morning, it is nice to see you",
    "let me tell you about my day",
    "the weather here is calm and bright",
    "thank you all for coming tonight",
    "I think we should start again",
    "this is how I usually sound",
    "can you hear me clearly now",
    "we walked along the river at noon",
    "every voice has its own colour",
    "listen closely to the rhythm",
    "I will read the next line slowly",
    "that was a lovely little song",
)
_PLACES = ("in a quiet room", "in a small studio", "at home", "in a calm office")


def demo_caption(trigger: str, speaker: Speaker, transcript: str, place: str) -> str:
    return (
        f"{trigger}, a person with {speaker.description} speaks to the camera {place}. "
        f'Speech: "{transcript}". Sounds: clear speech, no music.'
    )


def _plan_demo(
    speakers: int, clips_per_speaker: int, trigger: str, seed: int
) -> list[tuple[str, Speaker, int, str]]:
    """(file stem, speaker, clip seed, caption) for every clip, deterministically."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0xDA7A])
    plan = []
    for s in range(speakers):
        who = speaker(s, seed)
        transcripts = rng.permutation(len(_TRANSCRIPTS))
        for k in range(clips_per_speaker):
            transcript = _TRANSCRIPTS[transcripts[k % len(_TRANSCRIPTS)]]
            place = _PLACES[int(rng.integers(len(_PLACES)))]
            clip_seed = int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, s, k]).generate_state(1)[0])
            plan.append((f"{who.name}_{k:03d}", who, clip_seed, demo_caption(trigger, who, transcript, place)))
    return plan


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_demo_dataset(
    folder: str | Path,
    *,
    speakers: int = 1,
    clips_per_speaker: int = 6,
    seconds: float = 1.6,
    fps: int = 25,
    width: int = 128,
    height: int = 96,
    trigger: str = "ohwx",
    seed: int = 0,
) -> list[Path]:
    """Write a folder of talking clips (``<speaker>_<k>.mp4``) with ``.txt`` captions; returns the clips.

    Idempotent: a manifest records the arguments and each file's checksum; when it matches what is on
    disk nothing is rewritten. Otherwise the set is rebuilt (same bytes for the same arguments) and
    files this function wrote earlier but that are no longer part of the set are removed.
    """
    folder = Path(folder)
    if speakers < 1 or clips_per_speaker < 1:
        raise ValueError(f"{folder}: need at least one speaker and one clip, got {speakers=} {clips_per_speaker=}.")
    if not trigger.strip() or "," in trigger:
        raise ValueError(f"{folder}: trigger={trigger!r} must be a non-empty word without commas.")
    arguments = dict(speakers=speakers, clips_per_speaker=clips_per_speaker, seconds=seconds, fps=fps,
                     width=width, height=height, trigger=trigger, seed=seed, codec=video_codec_name(),
                     pyav=av.__version__)
    manifest_path = folder / DEMO_MANIFEST
    previous = _read_manifest(manifest_path)
    if previous.get("arguments") == arguments and _files_intact(folder, previous.get("files", {})):
        return [folder / name for name in previous["clips"]]

    # Before writing anything, record every file this set or the previous one may leave here, so an
    # interrupted rebuild is finished (and its leftovers removed) by the next call.
    plan = _plan_demo(speakers, clips_per_speaker, trigger, seed)
    planned = {f"{stem}{suffix}" for stem, *_ in plan for suffix in (".mp4", ".txt")}
    owned = set(previous.get("files", {})) | planned
    atomic_write_json(manifest_path, {"arguments": None, "clips": [], "files": {name: "" for name in owned}})

    clips, checksums = [], {}
    for stem, who, clip_seed, caption in plan:
        video = write_talking_clip(folder / f"{stem}.mp4", who, seconds, fps=fps, width=width, height=height,
                                   seed=clip_seed)
        caption_path = folder / f"{stem}.txt"
        atomic_write_text(caption_path, caption + "\n")
        clips.append(video)
        for written in (video, caption_path):
            checksums[written.name] = _sha256(written)
    for stale in owned - set(checksums):
        if Path(stale).name == stale:  # only plain names in this folder, as this function writes them
            (folder / stale).unlink(missing_ok=True)
    atomic_write_json(manifest_path, {"arguments": arguments, "clips": [c.name for c in clips], "files": checksums})
    return clips


def _read_manifest(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}  # unreadable: rebuild the set, which rewrites the manifest
    return manifest if isinstance(manifest, dict) else {}


def _files_intact(folder: Path, checksums: dict[str, str]) -> bool:
    return bool(checksums) and all(
        (folder / name).is_file() and _sha256(folder / name) == digest for name, digest in checksums.items()
    )
