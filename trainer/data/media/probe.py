"""What is in a media file: container, video stream, audio streams, real timing — read with PyAV.

``probe_media`` opens the file and demuxes its packets (no decoding, so it is fast) to learn what the
headers do not reliably say: how many frames there really are, where each stream starts and ends,
whether the frame rate is constant, and whether the data stops before the header says it should
(a truncated file). Failures raise ``MediaError``, whose message names the file, what is wrong and
what to do about it.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import av
import numpy as np

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".mpg", ".mpeg", ".ts", ".mts", ".m2ts",
                    ".flv", ".wmv", ".3gp", ".ogv", ".gif")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".aac", ".aif", ".aiff", ".wma", ".mka")

# A frame interval that differs from the typical one by more than this fraction counts as irregular;
# more than VFR_IRREGULAR_FRACTION irregular intervals make the stream variable-frame-rate.
VFR_INTERVAL_TOLERANCE = 0.10
VFR_IRREGULAR_FRACTION = 0.02
# Data ending this much (and 5 %) before the duration the header announces means the file was cut off.
TRUNCATION_TOLERANCE_S = 0.25


class MediaError(Exception):
    """A media file that cannot be used as it is. ``str()`` reads: "<file>: <what is wrong>. <what to do>"."""

    def __init__(self, path: str | os.PathLike, reason: str, fix: str, *, kind: str = "unreadable") -> None:
        self.path = str(path)
        self.reason = reason
        self.fix = fix
        # A short machine-readable cause: missing, empty, truncated, unreadable, no_video, no_audio, bad_frame_rate,
        # zero_length, unsupported_codec, too_short, too_small, decode_failed.
        self.kind = kind
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.path}: {self.sentence}"

    @property
    def sentence(self) -> str:
        """What is wrong and what to do, without the file name: "<reason>. <Fix>"."""
        fix = self.fix[:1].upper() + self.fix[1:]
        return f"{self.reason}. {fix}" if fix else self.reason


@dataclass
class VideoStreamInfo:
    stream_index: int  # index among all the container's streams
    codec: str
    width: int  # as displayed, i.e. after the rotation below
    height: int
    coded_width: int
    coded_height: int
    rotation: int  # degrees counter-clockwise the decoded picture must be turned for display (0/90/180/270)
    pix_fmt: str | None
    average_fps: float | None  # the container's average frame rate (avg_frame_rate)
    real_fps: float | None  # FFmpeg's "real base frame rate" (r_frame_rate): the rate timestamps tick at
    measured_fps: float | None  # from packet timestamps: frames per second of presentation time
    frame_count: int  # packets with a timestamp, i.e. frames actually in the file
    header_frame_count: int  # what the header claims (0 when the container does not say)
    start_s: float  # presentation time of the first frame
    duration_s: float  # first frame to the end of the last frame
    variable_frame_rate: bool
    min_interval_s: float | None
    max_interval_s: float | None


@dataclass
class AudioStreamInfo:
    audio_index: int  # index among the audio streams (what ``DatasetSource.audio_stream`` counts)
    stream_index: int  # index among all the container's streams
    codec: str
    sample_rate: int
    channels: int
    layout: str
    channel_names: list[str]
    start_s: float
    duration_s: float  # from packet timestamps
    header_duration_s: float | None  # what the stream header says (mp4 edit lists exclude codec padding)
    packet_count: int
    language: str | None
    title: str | None


@dataclass
class MediaInfo:
    path: str
    container: str
    size_bytes: int
    header_duration_s: float | None
    video: VideoStreamInfo | None
    audio: list[AudioStreamInfo] = field(default_factory=list)
    is_image: bool = False
    truncated: str | None = None  # why the file looks cut off, or None
    container_start_s: float | None = None  # the container's start time (FFmpeg: earliest stream start)

    @property
    def origin_s(self) -> float:
        """The shared time origin of all streams: times in ``decode`` are seconds after it, so audio and
        video of one file line up even when the container does not start at 0."""
        if self.container_start_s is not None:
            return self.container_start_s
        starts = ([self.video.start_s] if self.video else []) + [a.start_s for a in self.audio]
        return min(starts) if starts else 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# Opening files with clear errors
# --------------------------------------------------------------------------------------------


def open_container(path: str | os.PathLike) -> av.container.InputContainer:
    """``av.open`` that turns every failure into a ``MediaError`` saying why and what to do."""
    path = Path(path)
    if not path.exists():
        raise MediaError(path, "file not found", "check the path (and the JSONL entry or folder it came from)",
                         kind="missing")
    if path.is_dir():
        raise MediaError(path, "is a folder, not a media file", "point to a video, image or audio file",
                         kind="unreadable")
    size = path.stat().st_size
    if size == 0:
        raise MediaError(path, "file is empty (0 bytes)", "re-export or re-download it, or delete it", kind="empty")
    try:
        return av.open(str(path), mode="r", metadata_errors="replace")
    except av.error.FFmpegError as exc:
        truncation = _mp4_truncation(path, size)
        if truncation:
            raise MediaError(path, f"the file is truncated ({truncation})",
                             "it was cut off while being written or downloaded: re-export or re-download it",
                             kind="truncated") from None
        raise MediaError(path, f"FFmpeg cannot read it ({_ffmpeg_reason(exc)})",
                         "check that it is a complete video/audio file; re-encode it to mp4 (h264 + aac)",
                         kind="unreadable") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MediaError(path, f"cannot open it ({exc})", "check file permissions and that it is a media file",
                         kind="unreadable") from None


def _ffmpeg_reason(exc: BaseException) -> str:
    reason = getattr(exc, "strerror", None) or str(exc)
    return str(reason).rstrip(".")


def _mp4_truncation(path: Path, size: int) -> str | None:
    """For an ISO-BMFF (mp4/mov) file, walk the top-level boxes: a box running past the end of the file,
    or a missing ``moov`` index, means the file was cut off."""
    boxes = []
    with open(path, "rb") as fh:
        header = fh.read(12)
        if len(header) < 8 or header[4:8] not in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip"):
            return None  # not an mp4/mov file
        offset = 0
        while offset + 8 <= size:
            fh.seek(offset)
            raw = fh.read(16)
            box_size, box_type = struct.unpack(">I4s", raw[:8])
            if box_size == 1 and len(raw) >= 16:
                box_size = struct.unpack(">Q", raw[8:16])[0]
            elif box_size == 0:  # "to the end of the file"
                box_size = size - offset
            if box_size < 8:
                return f"broken '{box_type.decode('latin-1')}' box at byte {offset}"
            boxes.append(box_type)
            if offset + box_size > size:
                return (f"its '{box_type.decode('latin-1')}' box needs {offset + box_size} bytes but the file has "
                        f"{size}")
            offset += box_size
    if b"moov" not in boxes:
        return "no 'moov' index box"
    return None


# --------------------------------------------------------------------------------------------
# Probing
# --------------------------------------------------------------------------------------------


def probe_media(path: str | os.PathLike, *, scan_packets: bool = True) -> MediaInfo:
    """Everything ``decode`` and the doctor need to know about ``path``; raises ``MediaError``.

    With ``scan_packets`` (default) every packet is demuxed (not decoded) to measure real frame
    counts, durations, frame-rate regularity and truncation. Without it only headers are read.
    """
    path = Path(path)
    with open_container(path) as container:
        video_stream = _main_video_stream(container)
        audio_streams = list(container.streams.audio)
        packets = _scan_packets(path, container, video_stream, audio_streams) if scan_packets else None
        video = _video_info(path, video_stream, packets) if video_stream is not None else None
        audio = [_audio_info(path, i, s, packets) for i, s in enumerate(audio_streams)]
        header_duration = container.duration / av.time_base if container.duration else None
        container_start = container.start_time / av.time_base if container.start_time is not None else None
        info = MediaInfo(
            path=str(path),
            container=container.format.name,
            size_bytes=path.stat().st_size,
            header_duration_s=header_duration,
            video=video,
            audio=audio,
            is_image=_is_image(container, path),
            container_start_s=container_start,
        )
    if video is not None:
        _check_first_frame(path, video)
    if packets is not None:
        info.truncated = _truncation(info, packets)
    return info


def _main_video_stream(container: av.container.InputContainer) -> av.video.stream.VideoStream | None:
    """The first video stream that is not an attached picture (cover art in audio files)."""
    for stream in container.streams.video:
        if not (stream.disposition & av.stream.Disposition.attached_pic):
            return stream
    return None


def _is_image(container: av.container.InputContainer, path: Path) -> bool:
    name = container.format.name
    return path.suffix.lower() in IMAGE_EXTENSIONS or name.endswith("_pipe") or name == "image2"


@dataclass
class _PacketScan:
    times: dict[int, np.ndarray]  # stream index -> sorted presentation times (s) of its packets
    ends: dict[int, float]  # stream index -> end of the last packet (s)
    error: str | None  # a demux error that stopped the scan early


def _scan_packets(path: Path, container, video_stream, audio_streams) -> _PacketScan:
    streams = ([video_stream] if video_stream is not None else []) + audio_streams
    times: dict[int, list[float]] = {s.index: [] for s in streams}
    ends: dict[int, float] = {}
    error = None
    if not streams:
        return _PacketScan({}, {}, None)
    try:
        for packet in container.demux(*streams):
            timestamp = packet.pts if packet.pts is not None else packet.dts
            if timestamp is None or packet.size == 0:
                continue  # flush packets carry no data
            base = packet.time_base
            start = float(timestamp * base)
            times[packet.stream.index].append(start)
            end = start + float((packet.duration or 0) * base)
            ends[packet.stream.index] = max(ends.get(packet.stream.index, end), end)
    except av.error.FFmpegError as exc:
        error = _ffmpeg_reason(exc)
    return _PacketScan({k: np.sort(np.asarray(v, dtype=np.float64)) for k, v in times.items()}, ends, error)


def _rate(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) and value > 0 else None


def _codec_name(path: Path, stream) -> str:
    try:
        context = stream.codec_context
        name = context.name if context is not None else None
    except (av.error.FFmpegError, ValueError):
        name = None
    if not name:
        raise MediaError(path, f"its {stream.type} stream #{stream.index} uses a codec this FFmpeg build cannot decode",
                         "re-encode the file to a common codec (h264/mpeg4 video, aac/pcm audio)",
                         kind="unsupported_codec")
    return name


def _check_first_frame(path: Path, video: VideoStreamInfo) -> None:
    """Decode the first video frame: proves the codec works and reads the display rotation, which
    PyAV exposes per frame (the display matrix side data), not per stream."""
    with open_container(path) as container:
        stream = container.streams[video.stream_index]
        try:
            frame = next(container.decode(stream), None)
        except av.error.DecoderNotFoundError:
            raise MediaError(path, f"its video codec '{video.codec}' cannot be decoded by this FFmpeg build",
                             "re-encode the video to h264 or mpeg4", kind="unsupported_codec") from None
        except av.error.FFmpegError as exc:
            raise MediaError(path, f"decoding the first video frame failed ({_ffmpeg_reason(exc)})",
                             "the file is damaged or uses an unsupported codec: re-encode or re-export it",
                             kind="decode_failed") from None
    if frame is None:
        if video.frame_count > 0:
            raise MediaError(path, f"its {video.frame_count} video packets decode to no picture",
                             "the video data is damaged: re-encode or re-export it", kind="decode_failed")
        return
    rotation = int(round(float(frame.rotation or 0) / 90.0)) * 90 % 360
    video.rotation = rotation
    if rotation in (90, 270):
        video.width, video.height = video.coded_height, video.coded_width


def _video_info(path: Path, stream, packets: _PacketScan | None) -> VideoStreamInfo:
    codec = _codec_name(path, stream)
    context = stream.codec_context
    coded_width, coded_height = int(context.width or 0), int(context.height or 0)
    average_fps, real_fps = _rate(stream.average_rate), _rate(stream.base_rate or stream.guessed_rate)
    header_frames = int(stream.frames or 0)
    start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0

    times = packets.times.get(stream.index) if packets is not None else None
    if times is not None and times.size:
        if stream.start_time is None:
            start = float(times[0])
        intervals = np.diff(times)
        intervals = intervals[intervals > 0]
        typical = float(np.median(intervals)) if intervals.size else (1.0 / (real_fps or average_fps or 25.0))
        end = max(packets.ends.get(stream.index, 0.0), float(times[-1]) + typical)
        duration = end - start
        frame_count = int(times.size)
        irregular = np.abs(intervals - typical) > VFR_INTERVAL_TOLERANCE * typical
        vfr = bool(intervals.size >= 2 and irregular.mean() > VFR_IRREGULAR_FRACTION)
        measured = frame_count / duration if duration > 0 else None
        min_interval = float(intervals.min()) if intervals.size else None
        max_interval = float(intervals.max()) if intervals.size else None
    else:
        frame_count = header_frames if packets is None else 0
        fps = average_fps or real_fps
        duration = float(stream.duration * stream.time_base) if stream.duration else (
            frame_count / fps if fps and frame_count else 0.0)
        vfr, measured, min_interval, max_interval = False, None, None, None
    return VideoStreamInfo(
        stream_index=stream.index, codec=codec, width=coded_width, height=coded_height, coded_width=coded_width,
        coded_height=coded_height, rotation=0, pix_fmt=getattr(context, "pix_fmt", None),
        average_fps=average_fps, real_fps=real_fps, measured_fps=measured, frame_count=frame_count,
        header_frame_count=header_frames, start_s=start, duration_s=duration, variable_frame_rate=vfr,
        min_interval_s=min_interval, max_interval_s=max_interval,
    )


def _audio_info(path: Path, audio_index: int, stream, packets: _PacketScan | None) -> AudioStreamInfo:
    codec = _codec_name(path, stream)
    context = stream.codec_context
    layout = context.layout
    names = [channel.name for channel in layout.channels] if layout is not None else []
    start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
    header_duration = float(stream.duration * stream.time_base) if stream.duration else None
    duration = header_duration or 0.0
    count = 0
    times = packets.times.get(stream.index) if packets is not None else None
    if times is not None:
        count = int(times.size)
        if times.size:
            # The stream start accounts for encoder priming (AAC, Opus) that decoders drop; the first
            # packet's timestamp does not.
            if stream.start_time is None:
                start = float(times[0])
            duration = max(packets.ends.get(stream.index, float(times[-1])) - start, 0.0)
        else:
            duration = 0.0
    metadata = dict(stream.metadata or {})
    return AudioStreamInfo(
        audio_index=audio_index, stream_index=stream.index, codec=codec, sample_rate=int(context.sample_rate or 0),
        channels=int(context.channels or len(names)), layout=layout.name if layout is not None else "",
        channel_names=names, start_s=start, duration_s=duration, header_duration_s=header_duration, packet_count=count,
        language=metadata.get("language"), title=metadata.get("title"),
    )


def _truncation(info: MediaInfo, packets: _PacketScan) -> str | None:
    if packets.error:
        return f"reading its packets failed part-way ({packets.error})"
    if info.is_image:
        return None
    if info.video is not None and info.video.header_frame_count > info.video.frame_count > 0:
        return (f"the header announces {info.video.header_frame_count} video frames but only "
                f"{info.video.frame_count} are present")
    ends = list(packets.ends.values())
    if info.header_duration_s and ends:
        data_end = max(ends) - info.origin_s
        missing = info.header_duration_s - data_end
        if missing > max(TRUNCATION_TOLERANCE_S, 0.05 * info.header_duration_s):
            return f"the header announces {info.header_duration_s:.2f} s but the data ends at {data_end:.2f} s"
    return None
