"""The media of the training modes' references (``references.py`` finds them): the doctor's checks (present,
decodable, long enough) and the frames and sound the cache encodes."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..backends.interface import AUDIO_SAMPLE_RATE
from ..config import DatasetConfig
from .media import audio as audio_measures
from .media.decode import decode_audio
from .media.probe import MediaError, probe_media
from .media.timing import ClipSpec, available_frames, cut_audio, prepare_clip

SILENT_FRACTION = 0.98  # as the doctor's clip check: this much below -60 dBFS is silence


# ---- checks (the doctor) ---------------------------------------------------------------------------------


def missing_reference_problems(item, dataset: DatasetConfig) -> list[tuple[str, str, str]]:
    """Errors for an item whose source asks for references it lacks (it cannot train the IC / ID mode)."""
    source = dataset.sources[item.source_index]
    problems = []
    if source.reference_dir and item.reference_path is None and not item.is_audio_only:
        problems.append(("error", "no_reference",
                         f"no reference for {item.media_path.name}: put a video or image named {item.media_path.stem}.<ext> "
                         f"in reference_dir ({source.reference_dir}); every clip of an IC-LoRA source needs one"))
    wants_audio = source.reference_audio_dir or dataset.reference_audio_same_speaker
    if wants_audio and item.reference_audio_path is None and not item.is_image:
        where = f"no file named {item.media_path.stem}.<ext> in reference_audio_dir ({source.reference_audio_dir})" \
            if source.reference_audio_dir else "no reference_audio_dir on the source"
        same = (f", and no other clip of the speaker in {item.media_path.parent} (reference_audio_same_speaker)"
                if dataset.reference_audio_same_speaker else "")
        problems.append(("error", "no_reference_audio",
                         f"no reference audio for {item.media_path.name}: {where}{same}. Add a reference of the speaker"))
    return problems


def check_reference(path: Path, dataset: DatasetConfig) -> list[tuple[str, str, str]]:
    """(severity, code, message) problems of an IC-LoRA reference: unreadable, no picture, shorter than
    ``reference_frames``."""
    try:
        info = probe_media(path)
    except MediaError as exc:
        return [("error", "reference_unreadable", f"reference: {exc}")]
    if info.video is None:
        return [("error", "reference_no_video", f"reference {path} has no picture: use a video or an image")]
    if info.is_image:
        return []
    spec = ClipSpec.from_config(dataset)
    try:
        frames = available_frames(info, spec)
    except MediaError as exc:
        return [("error", "reference_unreadable", f"reference: {exc}")]
    if frames < dataset.reference_frames:
        return [("error", "reference_too_short",
                 f"reference {path} gives {frames} frames at {spec.target_fps:g} fps but dataset.reference_frames is "
                 f"{dataset.reference_frames}: use a longer reference or fewer reference frames")]
    return []


def check_reference_audio(path: Path, dataset: DatasetConfig, audio_index: int = 0) -> tuple[list[tuple[str, str, str]], float | None]:
    """(problems, seconds of sound) of an ID-LoRA reference: unreadable or without sound (errors), shorter than
    ``reference_audio_seconds`` or silent (warnings)."""
    try:
        track = decode_audio(path, audio_index=audio_index)
    except MediaError as exc:
        return [("error", "reference_audio_unreadable", f"reference audio: {exc}")], None
    seconds = track.duration_s
    problems = []
    if track.samples.shape[1] == 0:
        return [("error", "reference_audio_empty", f"reference audio {path} has no samples: re-export it")], 0.0
    if seconds < dataset.reference_audio_seconds - 1e-3:
        problems.append(("warning", "reference_audio_short",
                         f"reference audio {path} lasts {seconds:.2f} s, less than dataset.reference_audio_seconds = "
                         f"{dataset.reference_audio_seconds:g} s (ComfyUI's LTXV Reference Audio node recommends about "
                         "5 s): it is used whole; a longer reference carries the voice better"))
    if audio_measures.silence_fraction(track.samples, track.sample_rate) >= SILENT_FRACTION:
        problems.append(("warning", "reference_audio_silent",
                         f"reference audio {path} is silent: it cannot carry a voice; use a clip of the speaker talking"))
    return problems, seconds


# ---- media for the cache ---------------------------------------------------------------------------------


def prepare_reference(path: Path, dataset: DatasetConfig, clip_width: int, clip_height: int, *, seed: int = 0) -> np.ndarray:
    """uint8 ``[reference_frames, H/f, W/f, 3]`` frames of an IC-LoRA reference for a clip of ``clip_width`` x
    ``clip_height``: cut and timed like a clip, an image repeated. Raises ``MediaError`` naming the file."""
    factor = dataset.reference_downscale
    spec = ClipSpec(target_fps=float(dataset.target_fps), frame_buckets=(int(dataset.reference_frames),),
                    resolution_buckets=((clip_width // factor, clip_height // factor),), crop=dataset.crop,
                    allow_upscale=True, retime=dataset.retime, with_audio=False)
    clip = prepare_clip(path, spec, seed=seed)
    frames = clip.frames
    if frames.shape[0] == 1 and dataset.reference_frames > 1:
        frames = np.repeat(frames, dataset.reference_frames, axis=0)
    return np.ascontiguousarray(frames)


def prepare_reference_audio(path: Path, dataset: DatasetConfig, audio_index: int = 0) -> np.ndarray:
    """float32 ``[2, S]`` at 16 kHz: the first ``reference_audio_seconds`` of the reference's sound (all of it when
    shorter). Raises ``MediaError`` naming the file."""
    track = decode_audio(path, audio_index=audio_index)
    wanted = int(math.floor(min(track.duration_s, dataset.reference_audio_seconds) * AUDIO_SAMPLE_RATE))
    audio, valid = cut_audio(track, track.start_s, wanted, AUDIO_SAMPLE_RATE)
    if valid < AUDIO_SAMPLE_RATE // 25:  # less than one audio latent (40 ms)
        raise MediaError(path, f"its sound lasts {track.duration_s:.3f} s, too short for a reference",
                         "use a reference of a few seconds (about 5 s)", kind="too_short")
    return np.ascontiguousarray(audio[:, :valid])
