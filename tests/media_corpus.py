"""A small corpus of real media files, good and broken, synthesised with PyAV at test time.

``build_corpus(folder)`` writes it (a few seconds on 2 cores) and returns ``{name: path}``;
``EXPECTED`` says what the doctor must report for each item, ``corpus_dataset_config`` gives the
``DatasetConfig`` that lists it. Nothing binary is committed: every file comes from the writers here.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from ltx2_av_trainer.trainer.config import DatasetConfig, DatasetSource
from scipy import signal

TRIGGER = "ohwx"
WIDTH, HEIGHT = 96, 64
FPS = 25
SAMPLE_RATE = 48000
CONTAINER_FORMATS = {".mp4": "mp4", ".mov": "mov", ".mkv": "matroska", ".wav": "wav", ".flac": "flac"}


def video_codec() -> str:
    """h264 when this PyAV wheel has libx264, else MPEG-4 part 2 (always bundled)."""
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def opus_codec() -> str:
    return "libopus" if "libopus" in av.codecs_available else "opus"


# --------------------------------------------------------------------------------------------
# Signals
# --------------------------------------------------------------------------------------------


def voice_like(seconds: float, sample_rate: int = SAMPLE_RATE, *, f0: float = 140.0, seed: int = 0,
               rms_dbfs: float = -20.0) -> np.ndarray:
    """Mono voice-like audio [S]: a harmonic source with drifting pitch through two formant resonators,
    under a ~4 Hz syllable envelope with short pauses, plus a faint noise floor (-65 dBFS)."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sample_rate))
    t = np.arange(n) / sample_rate
    pitch = f0 * (1.0 + 0.12 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 6)))
    phase = 2 * np.pi * np.cumsum(pitch) / sample_rate
    source = sum(np.sin(k * phase) / k for k in range(1, 30) if k * f0 * 1.2 < sample_rate / 2)
    voiced = np.zeros(n)
    for centre, bandwidth in ((700.0, 110.0), (1250.0, 150.0)):
        radius = np.exp(-np.pi * bandwidth / sample_rate)
        theta = 2 * np.pi * centre / sample_rate
        voiced += signal.lfilter([1.0 - radius], [1.0, -2 * radius * np.cos(theta), radius * radius], source)
    syllables = np.clip(0.55 + 0.7 * np.sin(2 * np.pi * 4.0 * t), 0.03, 1.0)  # dips ~30 dB between syllables
    pauses = (np.sin(2 * np.pi * 0.45 * t + 1.0) > -0.8).astype(float)
    envelope = signal.lfilter([0.01], [1.0, -0.99], syllables * pauses)
    speech = voiced * envelope
    speech *= 10 ** (rms_dbfs / 20) / max(np.sqrt(np.mean(speech**2)), 1e-12)
    noise = rng.normal(0.0, 10 ** (-65 / 20), n)
    return (speech + noise).astype(np.float32)


def tone(seconds: float, frequency: float, sample_rate: int = SAMPLE_RATE, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(int(round(seconds * sample_rate))) / sample_rate
    return (amplitude * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


def moving_picture(frames: int, width: int = WIDTH, height: int = HEIGHT, seed: int = 0) -> np.ndarray:
    """[F, H, W, 3] uint8: a colour gradient with a bright square moving left to right."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1),
                     np.full_like(x, int(rng.integers(40, 200)))], axis=-1).astype(np.uint8)
    video = np.repeat(base[None], frames, axis=0)
    side = max(4, min(width, height) // 4)
    for i in range(frames):
        left = int((width - side) * i / max(frames - 1, 1))
        top = (height - side) // 2
        video[i, top : top + side, left : left + side] = 255
    return video


# --------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------


@dataclass
class AudioSpec:
    samples: np.ndarray  # [C, S] float32
    sample_rate: int = SAMPLE_RATE
    layout: str = "stereo"
    codec: str = "aac"


def write_media(
    path: Path,
    *,
    video: np.ndarray | None = None,
    fps: int = FPS,
    frame_times_ms: list[int] | None = None,
    audio: list[AudioSpec] | None = None,
    video_codec_name: str | None = None,
    pix_fmt: str = "yuv420p",
) -> Path:
    """Write a container with an optional video stream ([F, H, W, 3] uint8 at ``fps``, or at explicit
    millisecond timestamps for variable frame rate) and any number of audio streams."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", format=CONTAINER_FORMATS[path.suffix]) as out:
        video_stream = None
        if video is not None:
            codec = video_codec_name or video_codec()
            video_stream = out.add_stream(codec, rate=fps)
            video_stream.width, video_stream.height = video.shape[2], video.shape[1]
            odd = video.shape[1] % 2 or video.shape[2] % 2
            # x264's 4:2:0 needs even sizes; 4:4:4 does not (mpeg4 pads odd sizes itself).
            video_stream.pix_fmt = "yuv444p" if odd and codec == "libx264" and pix_fmt == "yuv420p" else pix_fmt
            if codec == "mpeg4":
                video_stream.bit_rate = 1_000_000
            time_base = Fraction(1, 1000) if frame_times_ms is not None else Fraction(1, fps)
            video_stream.codec_context.time_base = time_base
        audio_streams = []
        for spec in audio or []:
            stream = out.add_stream(spec.codec, rate=spec.sample_rate, layout=spec.layout)
            stream.codec_context.time_base = Fraction(1, spec.sample_rate)
            audio_streams.append(stream)
        if video_stream is not None:
            for i, picture in enumerate(video):
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(picture), format="rgb24")
                frame.pts = frame_times_ms[i] if frame_times_ms is not None else i
                frame.time_base = video_stream.codec_context.time_base
                out.mux(video_stream.encode(frame))
            out.mux(video_stream.encode(None))
        for stream, spec in zip(audio_streams, audio or [], strict=True):
            chunk = 1024
            for start in range(0, spec.samples.shape[1], chunk):
                frame = av.AudioFrame.from_ndarray(
                    np.ascontiguousarray(spec.samples[:, start : start + chunk], dtype=np.float32),
                    format="fltp", layout=spec.layout)
                frame.sample_rate = spec.sample_rate
                frame.pts = start
                frame.time_base = Fraction(1, spec.sample_rate)
                out.mux(stream.encode(frame))
            out.mux(stream.encode(None))
    return path


def write_caption(media: Path, text: str | bytes, extension: str = ".txt") -> Path:
    path = media.with_suffix(extension)
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def stereo(mono: np.ndarray) -> np.ndarray:
    return np.stack([mono, mono])


def talking_clip(path: Path, seconds: float = 1.6, *, fps: int = FPS, seed: int = 0, audio_seconds: float | None = None,
                 width: int = WIDTH, height: int = HEIGHT, **audio_overrides) -> Path:
    """The standard good clip: a moving picture and voice-like stereo AAC."""
    frames = int(round(seconds * fps))
    voice = voice_like(audio_seconds if audio_seconds is not None else seconds, seed=seed)
    spec = AudioSpec(stereo(voice), **audio_overrides)
    return write_media(path, video=moving_picture(frames, width, height, seed), fps=fps, audio=[spec])


# --------------------------------------------------------------------------------------------
# The corpus
# --------------------------------------------------------------------------------------------

GOOD_CAPTION = f"{TRIGGER}, a person speaks to the camera in a quiet room"

# name -> (severity of the worst problem or None when clean, words the doctor's problem text must contain)
EXPECTED: dict[str, tuple[str | None, tuple[str, ...]]] = {
    "good": (None, ()),
    "fps60": (None, ()),
    "fps30": (None, ()),
    "mono_44k": (None, ()),
    "surround_51": (None, ()),
    "opus_mkv": (None, ()),
    "pcm_mov": (None, ()),
    "silent_video_with_wav": (None, ()),
    "odd_resolution": (None, ()),
    "image": (None, ()),
    "no_audio": ("warning", ("no audio stream",)),
    "audio_ends_early": ("warning", ("audio ends",)),
    "two_audio_streams": ("warning", ("2 audio streams",)),
    "silent_audio": ("error", ("silent", "not voice supervision")),
    "clipped": ("warning", ("clipped",)),
    "too_quiet": ("warning", ("too quiet",)),
    "vfr": ("warning", ("variable frame rate",)),
    "duplicate": ("warning", ("same content as",)),
    "missing_caption": ("warning", ("no caption",)),
    "latin1_caption": ("error", ("not valid utf-8",)),
    "no_trigger": ("warning", ("trigger",)),
    "truncated": ("error", ("truncated",)),
    "unsupported_codec": ("error", ("cannot decode",)),
    "zero_byte": ("error", ("empty (0 bytes)",)),
    "too_short": ("error", ("smallest frame bucket",)),
}


# Items whose only error is the audio verdict: not voice supervision, so they are cached audio-free (the video trains).
AUDIO_FREE = {"silent_audio"}


def build_corpus(folder: str | Path) -> dict[str, Path]:
    """Write every corpus item under ``folder`` (clips/, audio/, images/); returns name -> media path."""
    folder = Path(folder)
    clips, audio_dir, images = folder / "clips", folder / "audio", folder / "images"
    for sub in (clips, audio_dir, images):
        sub.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}

    files["good"] = talking_clip(clips / "good.mp4", seed=1)
    files["fps60"] = talking_clip(clips / "fps60.mp4", fps=60, seed=2)
    files["fps30"] = talking_clip(clips / "fps30.mp4", fps=30, seed=3)
    files["mono_44k"] = write_media(
        clips / "mono_44k.mp4", video=moving_picture(40, seed=4),
        audio=[AudioSpec(voice_like(1.6, 44100, seed=4)[None], 44100, "mono")])
    surround = np.zeros((6, int(1.6 * SAMPLE_RATE)), dtype=np.float32)
    surround[2] = voice_like(1.6, seed=5)  # dialogue in the centre channel, as films do
    surround[4] = surround[5] = 0.1 * voice_like(1.6, seed=6)
    files["surround_51"] = write_media(clips / "surround_51.mp4", video=moving_picture(40, seed=5),
                                       audio=[AudioSpec(surround, layout="5.1")])
    files["opus_mkv"] = talking_clip(clips / "opus_mkv.mkv", seed=7, codec=opus_codec())
    files["pcm_mov"] = talking_clip(clips / "pcm_mov.mov", seed=8, codec="pcm_s16le")
    files["silent_video_with_wav"] = write_media(clips / "silent_video_with_wav.mp4", video=moving_picture(40, seed=9))
    write_media(audio_dir / "silent_video_with_wav.wav",
                audio=[AudioSpec(stereo(voice_like(1.6, 24000, seed=9)), 24000, codec="pcm_s16le")])
    files["odd_resolution"] = talking_clip(clips / "odd_resolution.mp4", seed=10, width=333, height=250)
    files["no_audio"] = write_media(clips / "no_audio.mp4", video=moving_picture(40, seed=11))
    files["audio_ends_early"] = talking_clip(clips / "audio_ends_early.mp4", seconds=1.6, audio_seconds=0.8, seed=12)
    files["two_audio_streams"] = write_media(
        clips / "two_audio_streams.mkv", video=moving_picture(40, seed=13),
        audio=[AudioSpec(stereo(voice_like(1.6, seed=13))), AudioSpec(stereo(tone(1.6, 440.0)))])
    files["silent_audio"] = write_media(clips / "silent_audio.mov", video=moving_picture(40, seed=14),
                                        audio=[AudioSpec(np.zeros((2, int(1.6 * SAMPLE_RATE)), np.float32),
                                                         codec="pcm_s16le")])
    loud = np.clip(voice_like(1.6, seed=15, rms_dbfs=-3.0) * 2.0, -1.0, 1.0)
    files["clipped"] = write_media(clips / "clipped.mov", video=moving_picture(40, seed=15),
                                   audio=[AudioSpec(stereo(loud), codec="pcm_s16le")])
    files["too_quiet"] = write_media(clips / "too_quiet.mp4", video=moving_picture(40, seed=16),
                                     audio=[AudioSpec(stereo(voice_like(1.6, seed=16, rms_dbfs=-45.0)))])
    times, t = [], 0
    for i in range(45):
        times.append(t)
        t += 33 if i % 3 else 60
    files["vfr"] = write_media(clips / "vfr.mp4", video=moving_picture(45, seed=17), frame_times_ms=times,
                               audio=[AudioSpec(stereo(voice_like(t / 1000.0, seed=17)))])
    files["duplicate"] = Path(shutil.copyfile(files["good"], clips / "good_copy.mp4"))
    files["missing_caption"] = talking_clip(clips / "missing_caption.mp4", seed=18)
    files["latin1_caption"] = talking_clip(clips / "latin1_caption.mp4", seed=19)
    files["no_trigger"] = talking_clip(clips / "no_trigger.mp4", seed=20)
    good_bytes = files["good"].read_bytes()
    files["truncated"] = clips / "truncated.mp4"
    files["truncated"].write_bytes(good_bytes[: len(good_bytes) * 2 // 3])
    # A Matroska file whose video codec id is unknown to FFmpeg (same length, so the file stays valid).
    valid = write_media(clips / "unsupported_codec.mkv", video=moving_picture(20, seed=23), video_codec_name="mpeg4",
                        audio=[AudioSpec(stereo(tone(0.8, 300.0)), codec="pcm_s16le")])
    valid.write_bytes(valid.read_bytes().replace(b"V_MPEG4/ISO/ASP", b"V_ZZZZZ/ISO/ASP", 1))
    files["unsupported_codec"] = valid
    files["zero_byte"] = clips / "zero_byte.mp4"
    files["zero_byte"].write_bytes(b"")
    files["too_short"] = talking_clip(clips / "too_short.mp4", seconds=7 / FPS, seed=21)

    picture = moving_picture(1, 120, 90, seed=22)[0]
    files["image"] = images / "portrait.png"
    write_png(files["image"], picture)
    write_caption(files["image"], f"{TRIGGER}, a portrait")

    for name, path in files.items():
        if name == "missing_caption" or path.parent != clips:
            continue
        if name == "latin1_caption":
            write_caption(path, f"{TRIGGER}, caf\u00e9 cr\u00e8me talk".encode("latin-1"))
        elif name == "no_trigger":
            write_caption(path, "a person speaks to the camera")
        else:
            write_caption(path, GOOD_CAPTION)
    return files


def write_png(path: Path, picture: np.ndarray) -> None:
    """A PNG through FFmpeg's png encoder (no Pillow needed)."""
    with av.open(str(path), mode="w", format="image2") as out:
        stream = out.add_stream("png", rate=1)
        stream.width, stream.height, stream.pix_fmt = picture.shape[1], picture.shape[0], "rgb24"
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(picture), format="rgb24")
        out.mux(stream.encode(frame))
        out.mux(stream.encode(None))


def corpus_dataset_config(folder: str | Path, **overrides) -> DatasetConfig:
    """A DatasetConfig with the corpus's clips (audio_dir = audio/) and images as two sources."""
    folder = Path(folder)
    config = DatasetConfig(
        sources=[DatasetSource(path=str(folder / "clips"), audio_dir=str(folder / "audio")),
                 DatasetSource(path=str(folder / "images"), kind="image")],
        trigger=TRIGGER, frames=9, frame_buckets=[25], width=64, height=64,
        resolution_buckets=[[64, 64], [96, 64], [64, 96]],
    )
    for key, value in overrides.items():
        setattr(config, key, value)
    return config
