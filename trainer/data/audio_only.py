"""Audio-only items (``kind = "audio"`` sources): their sound cut to a clip length, and the video stand-in.

An audio-only item is an audio file (wav/flac/mp3/m4a/...) or the sound of a video file. It is cut like a video
clip: the largest frame bucket (8n+1 frames at ``target_fps``) that the sound covers gives its length, so audio
latents and the stand-in's latent frames line up as in an audio+video clip.

The stand-in is what ComfyUI's audio generation path puts next to the audio: ``EmptyLTXVLatentVideo`` at 64x64 with
the same length, an all-zero latent of ``2 x 2`` tokens per latent frame. The cache stores exactly that latent, so
training sees what sampling sees, and the stand-in's token count (which ``LTXVScheduler`` shifts σ by) grows with
the audio's duration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..backends.interface import AUDIO_SAMPLE_RATE, VIDEO_LATENT_CHANNELS
from ..config import DatasetConfig
from .media.decode import decode_audio
from .media.probe import MediaError
from .media.timing import ClipSpec, choose_frame_bucket, clip_audio_samples, cut_audio

STANDIN_SIZE = 64  # pixels, width and height of the stand-in video (2 x 2 latent cells)


def standin_video_latent(frames: int) -> torch.Tensor:
    """``[128, F', 2, 2]`` zeros for a clip of ``frames`` (8n+1) pixel frames: ``EmptyLTXVLatentVideo`` at 64x64."""
    cells = STANDIN_SIZE // 32
    return torch.zeros(VIDEO_LATENT_CHANNELS, (frames - 1) // 8 + 1, cells, cells)


@dataclass
class AudioOnlyClip:
    audio: np.ndarray  # float32 [2, S] at 16 kHz, S = frames / fps seconds
    valid_samples: int  # samples of real sound from the start (the rest is zero padding)
    frames: int  # the clip length in pixel frames (a frame bucket)
    fps: float
    source_path: str


def audio_only_frames(duration_s: float, spec: ClipSpec) -> int | None:
    """The largest frame bucket the sound covers, or None when it is shorter than the smallest."""
    return choose_frame_bucket(int(math.floor(duration_s * spec.target_fps + 1e-6)), spec.frame_buckets)


def prepare_audio_only(path, dataset: DatasetConfig, *, audio_index: int = 0) -> AudioOnlyClip:
    """Decode the sound of ``path`` and cut it to the longest frame bucket it covers. Raises ``MediaError`` (naming
    the file and the fix) when it has no sound or is too short."""
    spec = ClipSpec.from_config(dataset)
    track = decode_audio(path, audio_index=audio_index)
    frames = audio_only_frames(track.duration_s, spec)
    if frames is None:
        smallest = min(spec.frame_buckets)
        raise MediaError(path, f"its sound lasts {track.duration_s:.2f} s but the shortest clip is {smallest} frames "
                               f"({smallest / spec.target_fps:.2f} s at {spec.target_fps:g} fps)",
                         "use a longer recording or a smaller 8n+1 frame bucket", kind="too_short")
    samples = clip_audio_samples(frames, spec.target_fps, AUDIO_SAMPLE_RATE)
    audio, valid = cut_audio(track, track.start_s, samples, AUDIO_SAMPLE_RATE)
    return AudioOnlyClip(audio, valid, frames, spec.target_fps, str(path))
