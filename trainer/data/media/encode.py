"""Writing media with PyAV (bundled FFmpeg): video with its audio muxed in sync, and wav files.

Used by the synthetic demo clips, the cache's listen-before-you-train previews and the A/B samples.
Writes are atomic (temporary name, then rename).
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from ...io_utils import atomic_path

CONTAINER_FORMATS = {"mp4": "mp4", "mov": "mov", "mkv": "matroska"}


def video_codec_name() -> str:
    """h264 through libx264 when this PyAV build has it, else MPEG-4 part 2 (always bundled)."""
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def write_av_file(path: str | Path, frames: np.ndarray, fps: int, audio: np.ndarray | None, sample_rate: int,
                  container: str | None = None) -> Path:
    """Write ``frames`` (uint8 [F, H, W, 3], even H and W) at ``fps`` with ``audio`` (float32 [C, S], C ≤ 2)
    muxed frame by frame so both streams share one time origin. ``audio`` None writes video only."""
    path = Path(path)
    container = container or path.suffix.lower().lstrip(".")
    if container not in CONTAINER_FORMATS:
        raise ValueError(f"{path}: container {container!r} is not supported; use one of {sorted(CONTAINER_FORMATS)}")
    count, height, width, _ = frames.shape
    if width % 2 or height % 2:
        raise ValueError(f"{path}: width and height must be even for yuv420p video, got {width}x{height}")
    fps = int(fps)
    codec = video_codec_name()
    options = {"preset": "veryfast", "crf": "18"} if codec == "libx264" else {}
    if audio is not None:
        audio = np.ascontiguousarray(np.clip(audio, -1.0, 1.0), dtype=np.float32)
        if audio.shape[0] == 1:
            audio = np.repeat(audio, 2, axis=0)
        # Audio sample where each video frame starts; audio beyond the last frame goes with it.
        bounds = np.minimum(np.round(np.arange(count + 1) * sample_rate / fps), audio.shape[1]).astype(np.int64)
        bounds[-1] = audio.shape[1]
    audio_codec = "aac" if container in ("mp4", "mov") else "libopus" if "libopus" in av.codecs_available else "aac"
    with atomic_path(path) as tmp:
        with av.open(str(tmp), mode="w", format=CONTAINER_FORMATS[container]) as out:
            video = out.add_stream(codec, rate=fps, options=options)
            video.width, video.height, video.pix_fmt = width, height, "yuv420p"
            if codec == "mpeg4":
                video.bit_rate = 2_000_000
            video.codec_context.time_base = Fraction(1, fps)
            stream = None
            if audio is not None:
                rate = 48000 if audio_codec == "libopus" else sample_rate
                if rate != sample_rate:
                    raise ValueError(f"{path}: opus needs 48 kHz audio, got {sample_rate} Hz; write mp4 instead")
                stream = out.add_stream(audio_codec, rate=rate, layout="stereo", options={"aac_coder": "fast"} if audio_codec == "aac" else {})
                stream.bit_rate = 128_000
                stream.codec_context.time_base = Fraction(1, rate)
            for i in range(count):
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frames[i]), format="rgb24")
                frame.pts = i
                frame.time_base = Fraction(1, fps)
                out.mux(video.encode(frame))
                if stream is not None and bounds[i + 1] > bounds[i]:
                    chunk = av.AudioFrame.from_ndarray(np.ascontiguousarray(audio[:, bounds[i] : bounds[i + 1]]), format="fltp", layout="stereo")
                    chunk.sample_rate = sample_rate
                    chunk.pts = int(bounds[i])
                    chunk.time_base = Fraction(1, sample_rate)
                    out.mux(stream.encode(chunk))
            out.mux(video.encode(None))
            if stream is not None:
                out.mux(stream.encode(None))
    return path


def write_wav(path: str | Path, audio: np.ndarray, sample_rate: int) -> Path:
    """16-bit PCM wav of float audio [C, S] in [-1, 1]."""
    path = Path(path)
    audio = np.ascontiguousarray(np.clip(audio, -1.0, 1.0), dtype=np.float32)
    layout = "mono" if audio.shape[0] == 1 else "stereo"
    with atomic_path(path) as tmp:
        with av.open(str(tmp), mode="w", format="wav") as out:
            stream = out.add_stream("pcm_s16le", rate=sample_rate, layout=layout)
            frame = av.AudioFrame.from_ndarray((audio * 32767).astype(np.int16).reshape(1, -1, order="F") if audio.shape[0] > 1 else (audio * 32767).astype(np.int16), format="s16", layout=layout)
            frame.sample_rate = sample_rate
            frame.pts = 0
            out.mux(stream.encode(frame))
            out.mux(stream.encode(None))
    return path
