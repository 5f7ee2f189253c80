"""Media ingest: probe and decode files with PyAV, process audio, and cut aligned training clips.

- ``probe``: what a file holds (streams, real frame counts and timing, truncation) and ``MediaError``;
- ``decode``: RGB frames and float32 audio on one shared time origin;
- ``audio``: downmix, resampling, time-stretch, loudness and other measures;
- ``timing``: target frame rate, frame/resolution buckets and ``PreparedClip``.
"""

from .decode import AudioTrack, VideoFrames, decode_audio, decode_media, decode_video
from .probe import MediaError, MediaInfo, probe_media
from .timing import ClipSpec, PreparedClip, prepare_clip, prepare_item

__all__ = [
    "AudioTrack",
    "ClipSpec",
    "MediaError",
    "MediaInfo",
    "PreparedClip",
    "VideoFrames",
    "decode_audio",
    "decode_media",
    "decode_video",
    "prepare_clip",
    "prepare_item",
    "probe_media",
]
