"""From a decoded file to a training clip: target frame rate, frame/resolution buckets, aligned audio.

A ``PreparedClip`` holds ``F`` frames (8n+1) at the target frame rate (25 fps by default) and the
16 kHz stereo audio of exactly the same ``F / fps`` seconds, so that audio latent ``i`` (40 ms at
25 latents per second) plays with video frame ``i``.

Two ways to reach the target frame rate (``retime``):

- ``"resample"`` (default): real time is kept. Target frame ``k`` shows the source frame whose
  timestamp is nearest to ``k / fps``; the audio is cut to the same time span. Motion and speech keep
  their speed; some source frames are dropped (or repeated).
- ``"stretch"``: every source frame is kept and re-timed at the target rate (a 30 fps clip becomes
  1.2x slower at 25 fps); the audio is time-stretched by the same factor with its pitch preserved
  (WSOLA), so lips and voice stay together.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from ...backends.interface import AUDIO_SAMPLE_RATE
from .audio import resample, time_stretch, to_stereo
from .decode import AudioTrack, decode_audio, decode_video
from .probe import MediaError, MediaInfo, probe_media

if TYPE_CHECKING:  # typing only: dataset.py imports nothing from here
    from ...config import DatasetConfig
    from ..dataset import DatasetItem

MEL_HOP = 160  # log-mel hop at 16 kHz: 100 mel frames per second
AUDIO_VAE_TIME_DOWNSAMPLE = 4  # 4 mel frames per audio latent: 25 latents per second
VIDEO_VAE_TIME_DOWNSAMPLE = 8  # causal video VAE: latent 0 = frame 0, latent j covers frames 8j-7..8j
RESOLUTION_MULTIPLE = 32
MAX_STRETCH_FACTOR = 4.0
RetimeMode = Literal["resample", "stretch"]
RETIME_MODES: tuple[str, ...] = ("resample", "stretch")

# --------------------------------------------------------------------------------------------
# Latent time maps
# --------------------------------------------------------------------------------------------


def video_latent_index(pixel_frame: int) -> int:
    """Latent frame of the causal video VAE that holds ``pixel_frame``: 0 → 0, 1..8 → 1, 9..16 → 2, ..."""
    if pixel_frame < 0:
        raise ValueError(f"pixel frame must be >= 0, got {pixel_frame}")
    return (pixel_frame + VIDEO_VAE_TIME_DOWNSAMPLE - 1) // VIDEO_VAE_TIME_DOWNSAMPLE


def pixel_frames_of_video_latent(latent_frame: int) -> range:
    """The pixel frames a video latent frame covers (inverse of ``video_latent_index``)."""
    if latent_frame == 0:
        return range(0, 1)
    return range(VIDEO_VAE_TIME_DOWNSAMPLE * latent_frame - 7, VIDEO_VAE_TIME_DOWNSAMPLE * latent_frame + 1)


def mel_frame_to_audio_latent(mel_frame: int) -> int:
    """Audio latent holding a log-mel frame (hop 160 at 16 kHz, VAE time ÷4): 40 ms per latent."""
    return int(mel_frame) // AUDIO_VAE_TIME_DOWNSAMPLE


def audio_latent_index(time_s: float) -> int:
    """Audio latent that covers ``time_s`` seconds into a clip."""
    return mel_frame_to_audio_latent(int(math.floor(time_s * AUDIO_SAMPLE_RATE / MEL_HOP + 1e-9)))


def clip_audio_samples(frames: int, fps: float, sample_rate: int = AUDIO_SAMPLE_RATE) -> int:
    """Audio samples that last exactly as long as ``frames`` video frames at ``fps``."""
    return int(round(frames * sample_rate / fps))


# --------------------------------------------------------------------------------------------
# Frame rate and buckets
# --------------------------------------------------------------------------------------------


def detect_fps(info: MediaInfo, fps_override: float = 0.0) -> float:
    """The source frame rate: ``fps_override`` when set, else FFmpeg's real base rate when it agrees
    with the rate measured from packet timestamps (keeps exact rates such as 30000/1001), else the
    measured rate, else whatever the header says."""
    if fps_override and fps_override > 0:
        return float(fps_override)
    video = info.video
    if video is None:
        raise MediaError(info.path, "has no video stream, so it has no frame rate", "use a video file",
                         kind="no_video")
    measured, real, average = video.measured_fps, video.real_fps, video.average_fps
    if measured:
        for declared in (real, average):
            if declared and abs(declared - measured) <= 0.01 * measured:
                return float(declared)
        return float(measured)
    for declared in (average, real):
        if declared and declared < 1000:  # 1000/90000 are timestamp clocks, not frame rates
            return float(declared)
    raise MediaError(info.path, "its frame rate cannot be determined",
                     "set fps_override for this source or re-encode at a constant frame rate", kind="unreadable")


@dataclass(frozen=True)
class ClipSpec:
    """How clips are cut: target frame rate, allowed frame counts and resolutions, crop, retime mode."""

    target_fps: float = 25.0
    frame_buckets: tuple[int, ...] = (25,)
    resolution_buckets: tuple[tuple[int, int], ...] = ((256, 256),)  # (width, height)
    crop: Literal["center", "random"] = "center"
    allow_upscale: bool = True
    retime: RetimeMode = "resample"
    with_audio: bool = True
    sample_rate: int = AUDIO_SAMPLE_RATE

    def __post_init__(self) -> None:
        for frames in self.frame_buckets:
            if frames < 1 or (frames - 1) % 8:
                raise ValueError(f"frame bucket {frames} is not 8n+1 (1, 9, 17, 25, ...)")
        for width, height in self.resolution_buckets:
            if width <= 0 or height <= 0 or width % RESOLUTION_MULTIPLE or height % RESOLUTION_MULTIPLE:
                raise ValueError(f"resolution bucket {width}x{height} is not a positive multiple of 32")
        if self.retime not in RETIME_MODES:
            raise ValueError(f"retime {self.retime!r} is not one of {', '.join(RETIME_MODES)}")
        if self.crop not in ("center", "random"):
            raise ValueError(f"crop {self.crop!r} is not 'center' or 'random'")

    @classmethod
    def from_config(cls, dataset: DatasetConfig) -> ClipSpec:
        """From ``DatasetConfig``: ``frame_buckets`` are extra counts next to ``frames``; resolution
        buckets replace ``width``/``height`` when given. ``retime`` is read when the config has it."""
        frames = sorted({int(dataset.frames), *(int(f) for f in dataset.frame_buckets)})
        resolutions = tuple((int(w), int(h)) for w, h in dataset.resolution_buckets) or (
            (int(dataset.width), int(dataset.height)),)
        return cls(
            target_fps=float(dataset.target_fps),
            frame_buckets=tuple(frames),
            resolution_buckets=resolutions,
            crop=dataset.crop,
            allow_upscale=bool(dataset.allow_upscale),
            retime=getattr(dataset, "retime", "resample"),
            with_audio=bool(dataset.with_audio),
        )


def stretch_problem(source_fps: float, spec: ClipSpec) -> str | None:
    """Why ``retime = "stretch"`` cannot retime ``source_fps`` to the target rate, or None when it can."""
    factor = source_fps / spec.target_fps
    if spec.retime != "stretch" or 1.0 / MAX_STRETCH_FACTOR <= factor <= MAX_STRETCH_FACTOR:
        return None
    return (f"stretching {source_fps:g} fps to {spec.target_fps:g} fps changes its speed x{factor:.2f}, more than "
            f"the x{MAX_STRETCH_FACTOR:g} allowed")


def choose_frame_bucket(available_frames: int, buckets: Sequence[int]) -> int | None:
    """The largest bucket that fits ``available_frames``, or None when even the smallest does not."""
    fitting = [b for b in buckets if b <= available_frames]
    return max(fitting) if fitting else None


def available_frames(info: MediaInfo, spec: ClipSpec, fps_override: float = 0.0, start_s: float = 0.0) -> int:
    """Target-rate frames the clip can give from ``start_s`` on (stretch: source frames, as all are kept)."""
    if info.video is None:
        return 0
    if info.is_image:
        return 1
    source_fps = detect_fps(info, fps_override)
    if spec.retime == "stretch":
        return max(0, info.video.frame_count - int(math.floor(start_s * source_fps + 1e-6)))
    duration = info.video.frame_count / source_fps if fps_override else info.video.duration_s
    return max(0, int(math.floor((duration - start_s) * spec.target_fps + 1e-6)))


def choose_resolution_bucket(
    width: int, height: int, buckets: Sequence[tuple[int, int]], allow_upscale: bool = True
) -> tuple[int, int] | None:
    """The bucket closest in aspect ratio to ``width x height`` (ties: the larger bucket). Without
    upscaling only buckets the picture covers are allowed; None when none is."""
    candidates = [tuple(b) for b in buckets if allow_upscale or (b[0] <= width and b[1] <= height)]
    if not candidates or width <= 0 or height <= 0:
        return None
    aspect = math.log(width / height)
    return min(candidates, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1]))


def cover_size(width: int, height: int, bucket: tuple[int, int]) -> tuple[int, int]:
    """Size after scaling ``width x height`` (aspect kept) to just cover ``bucket``."""
    scale = max(bucket[0] / width, bucket[1] / height)
    return max(bucket[0], int(math.ceil(width * scale - 1e-6))), max(bucket[1], int(math.ceil(height * scale - 1e-6)))


def crop_offsets(
    size: tuple[int, int], bucket: tuple[int, int], mode: str, rng: np.random.Generator | None = None
) -> tuple[int, int]:
    """Top-left corner (x, y) of the ``bucket`` crop in a picture of ``size``."""
    spare_x, spare_y = size[0] - bucket[0], size[1] - bucket[1]
    if mode == "random":
        rng = rng if rng is not None else np.random.default_rng(0)
        return int(rng.integers(0, spare_x + 1)), int(rng.integers(0, spare_y + 1))
    return spare_x // 2, spare_y // 2


def nearest_frame_indices(source_times: np.ndarray, target_times: np.ndarray) -> np.ndarray:
    """For every target time, the index of the source frame whose timestamp is nearest (earlier on ties)."""
    source_times = np.asarray(source_times, dtype=np.float64)
    after = np.clip(np.searchsorted(source_times, target_times), 0, len(source_times) - 1)
    before = np.clip(after - 1, 0, len(source_times) - 1)
    take_before = np.abs(target_times - source_times[before]) <= np.abs(source_times[after] - target_times) + 1e-9
    return np.where(take_before, before, after)


# --------------------------------------------------------------------------------------------
# Preparing a clip
# --------------------------------------------------------------------------------------------


@dataclass
class PreparedClip:
    frames: np.ndarray  # [F, H, W, 3] uint8 at ``fps``
    audio: np.ndarray | None  # [2, S] float32 at ``sample_rate``, S = F / fps seconds; None without audio
    audio_valid_samples: int  # samples of real audio from the start; the rest of ``audio`` is zero padding
    fps: float
    sample_rate: int
    source_path: str
    audio_path: str | None  # where the sound came from (the media file itself or a separate file)
    source_fps: float
    retime: str
    start_s: float  # where the clip starts in the source, seconds after its first video frame
    source_times_s: np.ndarray  # [F] time of the source frame behind each output frame, after its first frame
    frame_bucket: int
    resolution_bucket: tuple[int, int]  # (width, height)
    crop_box: tuple[int, int, int, int]  # (x, y, width, height) in the scaled picture
    scaled_size: tuple[int, int]  # (width, height) the source was scaled to before cropping
    info: MediaInfo
    notes: list[str] = field(default_factory=list)

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def duration_s(self) -> float:
        return self.num_frames / self.fps


def prepare_clip(
    path: str | os.PathLike,
    spec: ClipSpec,
    *,
    audio_path: str | os.PathLike | None = None,
    audio_index: int = 0,
    fps_override: float = 0.0,
    start_s: float = 0.0,
    seed: int = 0,
    info: MediaInfo | None = None,
) -> PreparedClip:
    """Decode, retime, bucket and crop one media file (see the module docstring). Raises ``MediaError``
    when the file cannot give a clip (unreadable, no video, shorter than the smallest bucket, ...)."""
    path = Path(path)
    info = info or probe_media(path)
    if info.video is None:
        raise MediaError(path, "has no video stream", "use a video or image file (audio goes into audio_dir)",
                         kind="no_video")
    if info.video.frame_count == 0 and not info.is_image:
        raise MediaError(path, "its video stream has no frames", "re-export the clip", kind="zero_length")
    rng = np.random.default_rng(seed)
    bucket = choose_resolution_bucket(info.video.width, info.video.height, spec.resolution_buckets, spec.allow_upscale)
    if bucket is None:
        smallest = min(spec.resolution_buckets, key=lambda b: b[0] * b[1])
        raise MediaError(path, f"{info.video.width}x{info.video.height} is smaller than every resolution bucket "
                               f"(smallest {smallest[0]}x{smallest[1]}) and allow_upscale is off",
                         "add a smaller resolution bucket or set allow_upscale = true", kind="too_small")
    scaled = cover_size(info.video.width, info.video.height, bucket)
    x, y = crop_offsets(scaled, bucket, spec.crop, rng)

    if info.is_image:
        return _prepare_image(path, info, spec, bucket, scaled, (x, y))

    source_fps = detect_fps(info, fps_override)
    available = available_frames(info, spec, fps_override, start_s)
    frame_count = choose_frame_bucket(available, spec.frame_buckets)
    if frame_count is None:
        raise MediaError(path, _too_short_reason(info, spec, source_fps, available),
                         f"use a longer clip or add a smaller frame bucket (8n+1, e.g. {_smaller_bucket(available)})",
                         kind="too_short")
    video_start = info.video.start_s - info.origin_s  # the first frame's time on the shared clock
    clip_start = video_start + start_s

    if spec.retime == "stretch":
        stretch = source_fps / spec.target_fps
        problem = stretch_problem(source_fps, spec)
        if problem:
            raise MediaError(path, problem, "use retime = \"resample\" for this dataset", kind="bad_frame_rate")
        first = int(math.floor(start_s * source_fps + 1e-6))
        video = decode_video(path, info=info, size=scaled, keep=lambda i, _t: i >= first, max_frames=frame_count)
        chosen = np.arange(video.count)[:frame_count]
        if fps_override:
            frame_times = (first + np.arange(video.count)) / source_fps
            clip_start = video_start + first / source_fps
        else:
            frame_times = video.times_s - video_start
            if video.count:
                clip_start = float(video.times_s[0])
    else:
        stretch = 1.0
        target_times = np.arange(frame_count) / spec.target_fps
        if fps_override:
            # The timestamps are not trusted: frame i is at i / fps_override after the first frame.
            first = int(math.floor(start_s * source_fps + 1e-6))
            last = first + int(math.ceil(frame_count / spec.target_fps * source_fps)) + 1
            video = decode_video(path, info=info, size=scaled, keep=lambda i, _t: first <= i <= last,
                                 max_frames=last - first + 1)
            frame_times = (first + np.arange(video.count)) / source_fps
        else:
            margin = 1.0 / source_fps
            video = decode_video(path, info=info, size=scaled, start_s=clip_start - margin,
                                 end_s=clip_start + frame_count / spec.target_fps + margin)
            frame_times = video.times_s - video_start
        if video.count == 0:
            raise MediaError(path, "no video frame could be decoded in the clip's time span",
                             "re-encode the clip", kind="decode_failed")
        chosen = nearest_frame_indices(frame_times - start_s, target_times)
    if len(chosen) < frame_count:
        raise MediaError(path, f"only {len(chosen)} of the {frame_count} frames the header promises could be decoded",
                         "the file is truncated or damaged: re-export it", kind="decode_failed")
    frames = np.ascontiguousarray(video.frames[chosen, y : y + bucket[1], x : x + bucket[0]])

    audio, valid, audio_from = None, 0, None
    notes: list[str] = []
    if spec.with_audio:
        track = _load_audio(path, info, audio_path, audio_index, video_start)
        if track is not None:
            audio_from = track.path
            out_samples = clip_audio_samples(frame_count, spec.target_fps, spec.sample_rate)
            # Stretch reads the source span of the kept frames, then time-stretches it to the clip's length.
            span_fps = source_fps if stretch != 1.0 else spec.target_fps
            span_samples = clip_audio_samples(frame_count, span_fps, spec.sample_rate)
            audio, valid = cut_audio(track, clip_start, span_samples, spec.sample_rate)
            if stretch != 1.0:
                audio = time_stretch(audio, stretch, spec.sample_rate)[:, :out_samples]
                audio = np.pad(audio, ((0, 0), (0, out_samples - audio.shape[1])))
                valid = min(out_samples, int(round(valid * stretch)))
                audio[:, valid:] = 0.0
            if valid < out_samples:
                notes.append(f"audio ends {(out_samples - valid) / spec.sample_rate:.2f} s before the clip; "
                             "padded with silence")

    return PreparedClip(
        frames=frames, audio=audio, audio_valid_samples=valid, fps=spec.target_fps, sample_rate=spec.sample_rate,
        source_path=str(path), audio_path=audio_from, source_fps=source_fps, retime=spec.retime,
        start_s=clip_start - video_start, source_times_s=np.asarray(frame_times, dtype=np.float64)[chosen],
        frame_bucket=frame_count,
        resolution_bucket=bucket, crop_box=(x, y, bucket[0], bucket[1]), scaled_size=scaled, info=info,
        notes=notes,
    )


def _prepare_image(path: Path, info: MediaInfo, spec: ClipSpec, bucket, scaled, offset) -> PreparedClip:
    x, y = offset
    picture = decode_video(path, info=info, size=scaled, max_frames=1)
    if picture.count == 0:
        raise MediaError(path, "the image decodes to no picture", "re-save the image as PNG or JPEG",
                         kind="decode_failed")
    frames = np.ascontiguousarray(picture.frames[:1, y : y + bucket[1], x : x + bucket[0]])
    return PreparedClip(
        frames=frames, audio=None, audio_valid_samples=0, fps=spec.target_fps, sample_rate=spec.sample_rate,
        source_path=str(path), audio_path=None, source_fps=spec.target_fps, retime=spec.retime, start_s=0.0,
        source_times_s=np.zeros(1), frame_bucket=1, resolution_bucket=bucket,
        crop_box=(x, y, bucket[0], bucket[1]), scaled_size=scaled, info=info,
    )


def _load_audio(path: Path, info: MediaInfo, audio_path, audio_index: int, video_start: float) -> AudioTrack | None:
    if audio_path is not None:
        track = decode_audio(audio_path, audio_index=0)
        track.start_s += video_start  # a separate file starts with the first video frame
        return track
    if not info.audio:
        return None
    return decode_audio(path, audio_index=audio_index, info=info)


def cut_audio(track: AudioTrack, start_s: float, num_samples: int, sample_rate: int) -> tuple[np.ndarray, int]:
    """``num_samples`` of stereo audio at ``sample_rate`` starting ``start_s`` seconds after the file's
    origin, zero where the track has no sound; returns (audio, samples of real audio from the start).

    Only the needed span (plus a 0.1 s margin that keeps the resampler's edge effects out) is converted.
    """
    margin = int(round(0.1 * track.sample_rate))
    offset_s = start_s - track.start_s  # where the clip starts inside the track
    first = int(math.floor(offset_s * track.sample_rate)) - margin
    last = int(math.ceil((offset_s + num_samples / sample_rate) * track.sample_rate)) + margin
    lo, hi = max(first, 0), min(last, track.samples.shape[1])
    out = np.zeros((2, num_samples), dtype=np.float32)
    if hi <= lo:
        return out, 0
    segment = resample(to_stereo(track.samples[:, lo:hi], track.channel_names), track.sample_rate, sample_rate)
    segment_start_s = track.start_s + lo / track.sample_rate
    offset = int(round((start_s - segment_start_s) * sample_rate))  # clip sample 0 inside the segment
    src_lo, dst_lo = max(offset, 0), max(-offset, 0)
    count = max(0, min(num_samples - dst_lo, segment.shape[1] - src_lo))
    out[:, dst_lo : dst_lo + count] = segment[:, src_lo : src_lo + count]
    # Real sound runs until the track ends (the segment only stops early when the track does).
    track_end_s = track.start_s + track.samples.shape[1] / track.sample_rate
    valid = int(round((track_end_s - start_s) * sample_rate))
    return out, int(min(max(valid, 0), num_samples, dst_lo + count))


def _too_short_reason(info: MediaInfo, spec: ClipSpec, source_fps: float, available: int) -> str:
    smallest = min(spec.frame_buckets)
    if spec.retime == "stretch":
        return (f"it has {available} frames but the smallest frame bucket needs {smallest} "
                f"(retime = stretch keeps source frames)")
    duration = info.video.duration_s if info.video else 0.0
    return (f"it lasts {duration:.2f} s ({available} frames at {spec.target_fps:g} fps) but the smallest frame "
            f"bucket needs {smallest} frames ({smallest / spec.target_fps:.2f} s)")


def _smaller_bucket(available: int) -> int:
    return max(1, (max(available, 1) - 1) // 8 * 8 + 1)


def prepare_item(item: DatasetItem, dataset: DatasetConfig, *, seed: int = 0, start_s: float = 0.0) -> PreparedClip:
    """``prepare_clip`` with the settings of a dataset item and its source. Random choices (``crop =
    "random"``) are seeded by ``seed`` and the item's key together: each clip gets its own crop, the same one
    on every run."""
    spec = ClipSpec.from_config(dataset)
    clip_seed = int.from_bytes(hashlib.sha256(f"{seed}:{item.key or item.media_path}".encode()).digest()[:8], "big")
    return prepare_clip(
        item.media_path, spec, audio_path=item.audio_path, audio_index=item.audio_stream,
        fps_override=item.fps_override, start_s=start_s, seed=clip_seed,
    )
