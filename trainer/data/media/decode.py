"""Decode pictures (RGB uint8) and sound (float32 ``[C, S]``) from media files with PyAV.

All times are seconds after the file's shared origin (``MediaInfo.origin_s``, the container start),
taken from each frame's ``pts * time_base``, so the audio and video of one container line up even
when the container does not start at 0 or the audio starts later than the picture. A separate audio
file has its own origin and is taken to start with the video's first frame.

If PyAV cannot decode an audio stream and an ``ffmpeg`` executable is on the PATH, the audio is decoded
by that executable instead (raw float32 PCM through a pipe). Every failure raises ``MediaError``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from .audio import DEFAULT_LAYOUTS
from .probe import MediaError, MediaInfo, _ffmpeg_reason, open_container, probe_media

FFMPEG_TIMEOUT_S = 600
MAX_CODEC_PADDING = 4096  # samples; two AAC frames
SEEK_AFTER_S = 2.0  # clips starting later than this seek instead of decoding from the start
SEEK_MARGIN_S = 1.0


@dataclass
class VideoFrames:
    frames: np.ndarray  # [F, H, W, 3] uint8, display orientation (rotation applied)
    times_s: np.ndarray  # [F] float64, presentation times after the file's origin, increasing
    path: str

    @property
    def count(self) -> int:
        return int(self.frames.shape[0])


@dataclass
class AudioTrack:
    samples: np.ndarray  # [C, S] float32, full scale ±1
    sample_rate: int
    start_s: float  # time of the first sample after the file's origin
    channel_names: tuple[str, ...]
    path: str
    audio_index: int
    decoder: str  # "pyav" or "ffmpeg-cli"

    @property
    def channels(self) -> int:
        return int(self.samples.shape[0])

    @property
    def duration_s(self) -> float:
        return self.samples.shape[1] / self.sample_rate if self.sample_rate else 0.0


# --------------------------------------------------------------------------------------------
# Video
# --------------------------------------------------------------------------------------------


def decode_video(
    path: str | os.PathLike,
    *,
    info: MediaInfo | None = None,
    start_s: float = 0.0,
    end_s: float | None = None,
    max_frames: int | None = None,
    size: tuple[int, int] | None = None,
    keep: Callable[[int, float], bool] | None = None,
) -> VideoFrames:
    """Decode the frames of the main video stream whose time lies in ``[start_s, end_s)``.

    ``size=(width, height)`` scales each picture (in display orientation) with FFmpeg's area filter
    when shrinking and bicubic when enlarging; ``keep(index, time_s)`` can skip frames before the
    RGB conversion (``index`` counts decoded frames from the start of the stream). Decoding stops
    after ``end_s`` or ``max_frames`` kept frames.
    """
    path = Path(path)
    info = info or probe_media(path, scan_packets=False)
    if info.video is None:
        raise MediaError(path, "has no video stream", "use a video file, or put audio-only files in audio_dir",
                         kind="no_video")
    rotation = info.video.rotation
    quarter_turns = (rotation // 90) % 4
    scaled = None
    if size is not None:
        width, height = int(size[0]), int(size[1])
        # Scale before rotating: swap the requested size for quarter turns.
        scaled = (height, width) if quarter_turns % 2 else (width, height)
        shrinking = scaled[0] * scaled[1] <= info.video.coded_width * info.video.coded_height
    origin = info.origin_s
    pictures, times = [], []
    with open_container(path) as container:
        stream = container.streams[info.video.stream_index]
        stream.thread_type = "AUTO"
        index = -1
        if keep is None and start_s > SEEK_AFTER_S:
            # Jump to the keyframe before the clip instead of decoding everything up to it; frames before
            # start_s are still skipped by their timestamps. (``keep`` counts frames from the start, so
            # it needs a full decode.)
            target = int((start_s + origin - SEEK_MARGIN_S) / stream.time_base)
            try:
                container.seek(max(target, 0), stream=stream, backward=True)
            except av.error.FFmpegError:
                pass  # not seekable: decode from the start
        try:
            for frame in container.decode(stream):
                index += 1
                if frame.pts is None:
                    continue
                time_s = float(frame.pts * frame.time_base) - origin
                if time_s < start_s - 1e-9:
                    continue
                if end_s is not None and time_s >= end_s - 1e-9:
                    break
                if keep is not None and not keep(index, time_s):
                    continue
                if scaled is not None and (frame.width, frame.height) != scaled:
                    frame = frame.reformat(width=scaled[0], height=scaled[1], format="rgb24",
                                           interpolation="AREA" if shrinking else "BICUBIC")
                picture = frame.to_ndarray(format="rgb24")
                if quarter_turns:
                    picture = np.ascontiguousarray(np.rot90(picture, k=quarter_turns))
                pictures.append(picture)
                times.append(time_s)
                if max_frames is not None and len(pictures) >= max_frames:
                    break
        except av.error.FFmpegError as exc:
            raise MediaError(path, f"decoding the video failed after {len(pictures)} frames ({_ffmpeg_reason(exc)})",
                             "the file is damaged or truncated: re-encode or re-export it",
                             kind="decode_failed") from None
    if not pictures:
        return VideoFrames(np.zeros((0, 0, 0, 3), dtype=np.uint8), np.zeros(0), str(path))
    order = np.argsort(np.asarray(times), kind="stable")  # presentation order (decoders emit it already)
    return VideoFrames(np.stack(pictures)[order], np.asarray(times, dtype=np.float64)[order], str(path))


def count_decodable_frames(path: str | os.PathLike, info: MediaInfo | None = None) -> int:
    """Decode every video frame without converting it (a cheap integrity check); raises ``MediaError``."""
    path = Path(path)
    info = info or probe_media(path, scan_packets=False)
    if info.video is None:
        return 0
    count = 0
    with open_container(path) as container:
        stream = container.streams[info.video.stream_index]
        stream.thread_type = "AUTO"
        try:
            for _ in container.decode(stream):
                count += 1
        except av.error.FFmpegError as exc:
            raise MediaError(path, f"decoding the video failed after {count} frames ({_ffmpeg_reason(exc)})",
                             "the file is damaged or truncated: re-encode or re-export it",
                             kind="decode_failed") from None
    return count


# --------------------------------------------------------------------------------------------
# Audio
# --------------------------------------------------------------------------------------------


def decode_audio(
    path: str | os.PathLike, *, audio_index: int = 0, info: MediaInfo | None = None
) -> AudioTrack:
    """The whole ``audio_index``-th audio stream of ``path`` as float32 ``[C, S]`` at its own rate.

    PyAV first; when PyAV fails and an ``ffmpeg`` executable is on the PATH, that executable decodes
    it (argument list, no shell). Raises ``MediaError`` when the file has no such stream or neither
    decoder succeeds.
    """
    path = Path(path)
    info = info or probe_media(path, scan_packets=False)
    if not info.audio:
        raise MediaError(path, "has no audio stream",
                         "add the sound as a separate file in audio_dir, or train this clip video-only",
                         kind="no_audio")
    if not 0 <= audio_index < len(info.audio):
        raise MediaError(path, f"has {len(info.audio)} audio stream(s); audio_stream={audio_index} does not exist",
                         f"set audio_stream between 0 and {len(info.audio) - 1}", kind="no_audio")
    try:
        return _decode_audio_pyav(path, audio_index, info)
    except MediaError as pyav_error:
        ffmpeg = shutil.which("ffmpeg")
        if ffmpeg is None or pyav_error.kind in ("missing", "empty"):
            raise
        try:
            return _decode_audio_ffmpeg(ffmpeg, path, audio_index, info)
        except MediaError as cli_error:
            raise MediaError(path, f"{pyav_error.reason}; the ffmpeg executable failed too ({cli_error.reason})",
                             pyav_error.fix, kind=pyav_error.kind) from None


def _decode_audio_pyav(path: Path, audio_index: int, info: MediaInfo) -> AudioTrack:
    stream_info = info.audio[audio_index]
    chunks: list[np.ndarray] = []
    first_time = None
    names: tuple[str, ...] = tuple(stream_info.channel_names)
    # Converts whatever sample format the decoder gives (s16, s32, flt, packed or planar) into planar
    # float32 at the same rate and layout, inside FFmpeg.
    converter = av.AudioResampler(format="fltp")
    try:
        with open_container(path) as container:
            stream = container.streams[stream_info.stream_index]
            for frame in container.decode(stream):
                if first_time is None and frame.pts is not None:
                    first_time = float(frame.pts * frame.time_base)
                    names = tuple(channel.name for channel in frame.layout.channels) or names
                for converted in converter.resample(frame):
                    chunks.append(converted.to_ndarray())
            for converted in converter.resample(None):
                chunks.append(converted.to_ndarray())
    except av.error.DecoderNotFoundError:
        raise MediaError(path, f"its audio codec '{stream_info.codec}' cannot be decoded by this FFmpeg build",
                         "re-encode the audio to aac, flac or pcm (wav)", kind="unsupported_codec") from None
    except av.error.FFmpegError as exc:
        raise MediaError(path, f"decoding audio stream {audio_index} failed ({_ffmpeg_reason(exc)})",
                         "the audio data is damaged: re-encode or re-export the file", kind="decode_failed") from None
    channels = stream_info.channels or len(names) or 1
    samples = np.concatenate(chunks, axis=1) if chunks else np.zeros((channels, 0), dtype=np.float32)
    if stream_info.header_duration_s:
        # Encoders pad the last frame (AAC to 1024 samples); the stream duration (mp4 edit list) says
        # where the real sound ends. Only a codec-frame-sized excess is trimmed, never real audio.
        declared = int(round(stream_info.header_duration_s * stream_info.sample_rate))
        if 0 < samples.shape[1] - declared <= MAX_CODEC_PADDING:
            samples = samples[:, :declared]
    start = (first_time if first_time is not None else stream_info.start_s) - info.origin_s
    return AudioTrack(np.ascontiguousarray(samples, dtype=np.float32), stream_info.sample_rate, start,
                      _channel_names(names, samples.shape[0]), str(path), audio_index, "pyav")


def _decode_audio_ffmpeg(ffmpeg: str, path: Path, audio_index: int, info: MediaInfo) -> AudioTrack:
    stream_info = info.audio[audio_index]
    channels = stream_info.channels or 2
    rate = stream_info.sample_rate or 48000
    command = [ffmpeg, "-nostdin", "-hide_banner", "-v", "error", "-i", str(path), "-map", f"0:a:{audio_index}",
               "-vn", "-f", "f32le", "-acodec", "pcm_f32le", "-ac", str(channels), "-ar", str(rate), "-"]
    try:
        result = subprocess.run(command, capture_output=True, timeout=FFMPEG_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MediaError(path, f"running {ffmpeg} failed ({exc})", "check the ffmpeg installation",
                         kind="decode_failed") from None
    if result.returncode != 0:
        message = result.stderr.decode("utf-8", "replace").strip().splitlines()
        raise MediaError(path, f"ffmpeg exited with {result.returncode}: {message[-1] if message else 'no message'}",
                         "re-encode the audio", kind="decode_failed")
    usable = len(result.stdout) // (4 * channels) * (4 * channels)
    interleaved = np.frombuffer(result.stdout[:usable], dtype="<f4")
    samples = np.ascontiguousarray(interleaved.reshape(-1, channels).T, dtype=np.float32)
    return AudioTrack(samples, rate, stream_info.start_s - info.origin_s,
                      _channel_names(tuple(stream_info.channel_names), channels), str(path), audio_index,
                      "ffmpeg-cli")


def _channel_names(names: tuple[str, ...], channels: int) -> tuple[str, ...]:
    if len(names) == channels and all(names):
        return names
    return DEFAULT_LAYOUTS.get(channels, tuple(f"c{i}" for i in range(channels)))


# --------------------------------------------------------------------------------------------
# Both
# --------------------------------------------------------------------------------------------


@dataclass
class DecodedMedia:
    info: MediaInfo
    video: VideoFrames | None
    audio: AudioTrack | None  # from the container, or from the separate audio file when one is given
    audio_info: MediaInfo | None  # probe of wherever the audio came from


def decode_media(
    path: str | os.PathLike,
    *,
    audio_path: str | os.PathLike | None = None,
    audio_index: int = 0,
    with_video: bool = True,
    with_audio: bool = True,
    size: tuple[int, int] | None = None,
) -> DecodedMedia:
    """Frames and sound of one item. A separate ``audio_path`` replaces the container's audio and is
    placed so that its first sample plays with the first video frame. Missing audio is not an error
    here (``audio`` is None); the doctor reports it."""
    info = probe_media(path, scan_packets=False)
    video = decode_video(path, info=info, size=size) if with_video and info.video is not None else None
    audio, audio_info = None, None
    if with_audio:
        if audio_path is not None:
            audio_info = probe_media(audio_path, scan_packets=False)
            audio = decode_audio(audio_path, audio_index=0, info=audio_info)
            video_start = (info.video.start_s - info.origin_s) if info.video is not None else 0.0
            audio.start_s = video_start + audio.start_s
        elif info.audio:
            audio_info = info
            audio = decode_audio(path, audio_index=audio_index, info=info)
    return DecodedMedia(info, video, audio, audio_info)
