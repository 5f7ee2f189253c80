"""Synthesised data of the training modes, for the demo and the tests (no download, PyAV only).

- ``make_audio_dataset``: one speaker's voice as wav files, plus one talking clip whose sound the audio-only mode
  uses (an audio source takes the sound of videos too), each with a caption.
- ``make_reference_folder``: an IC-LoRA reference per clip: the clip in grey (a colourisation IC-LoRA), as a video,
  and for the first clip as a still image (its first frame), so both kinds of reference are exercised.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from ..io_utils import atomic_path, atomic_write_text
from .media.encode import write_av_file, write_wav
from .synth import _TRANSCRIPTS, speaker, synthesize_voice, write_talking_clip

VOICE_RATE = 48000


def make_audio_dataset(folder: str | Path, *, clips: int = 6, seconds: float = 1.2, trigger: str = "ohwx",
                       seed: int = 0) -> list[Path]:
    """``clips`` files of one speaker's voice (``voice_<k>.wav``; the last is a talking clip ``voice_<k>.mp4``) with
    ``.txt`` captions; returns the media files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    who = speaker(0, seed)
    files = []
    for k in range(clips):
        clip_seed = int(np.random.SeedSequence([seed & 0xFFFFFFFF, 0xA0D10, k]).generate_state(1)[0])
        if k == clips - 1:
            path = write_talking_clip(folder / f"voice_{k:03d}.mp4", who, seconds, seed=clip_seed)
        else:
            voice = synthesize_voice(who, seconds, sample_rate=VOICE_RATE, seed=clip_seed)
            path = write_wav(folder / f"voice_{k:03d}.wav", voice.audio, VOICE_RATE)
        transcript = _TRANSCRIPTS[k % len(_TRANSCRIPTS)]
        atomic_write_text(path.with_suffix(".txt"), f"{trigger}, a person with {who.description} says: "
                                                   f"\"{transcript}\". Clear speech, no music.\n")
        files.append(path)
    return files


def _grey_frames(path: Path) -> tuple[np.ndarray, int]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps = int(round(float(stream.average_rate or 25)))
        frames = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(stream)])
    grey = frames.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return np.repeat(grey[..., None], 3, axis=-1).round().astype(np.uint8), fps


def write_png(path: str | Path, picture: np.ndarray) -> Path:
    """One uint8 ``[H, W, 3]`` picture as a PNG file (PyAV's png encoder), written atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with av.open(str(tmp), mode="w", format="image2") as out:
            stream = out.add_stream("png", rate=1)
            stream.width, stream.height, stream.pix_fmt = picture.shape[1], picture.shape[0], "rgb24"
            stream.codec_context.time_base = Fraction(1, 1)
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(picture), format="rgb24")
            frame.pts = 0
            out.mux(stream.encode(frame))
            out.mux(stream.encode(None))
    return path


def make_reference_folder(clips: list[Path], folder: str | Path) -> list[Path]:
    """The grey version of every clip in ``folder`` under the clip's file stem: the first as a PNG of its first
    frame, the others as silent mp4 videos. Returns the references."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    references = []
    for index, clip in enumerate(clips):
        grey, fps = _grey_frames(clip)
        if index == 0:
            references.append(write_png(folder / f"{clip.stem}.png", grey[0]))
        else:
            references.append(write_av_file(folder / f"{clip.stem}.mp4", grey, fps, None, VOICE_RATE))
    return references
