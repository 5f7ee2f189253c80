"""References of the training modes: which file conditions which clip, whether it is usable, and its media.

- IC-LoRA (``conditioning.mode = "ic"``): a reference video or image per clip, found by file stem in the source's
  ``reference_dir`` (``clip.mp4`` ↔ ``clip.png`` or ``clip.mp4``). It is cut to ``dataset.reference_frames``
  frames at the target frame rate (an image is repeated) and sized to 1/``reference_downscale`` of the clip's
  width and height, then encoded once into the cache.
- ID-LoRA (``conditioning.mode = "id"``): reference audio per clip, found by file stem in ``reference_audio_dir``
  (an audio file, or a video's sound), or with ``dataset.reference_audio_same_speaker`` the sound of another clip
  of the same speaker: the next clip in the same folder (one folder per speaker), so a clip never references
  itself. The first ``reference_audio_seconds`` are used.

Folders are resolved like ``audio_dir``: a relative path next to the source first, then from the working directory.
The references' media (the doctor's checks, the frames and sound the cache encodes) are ``reference_media.py``.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from .media.probe import AUDIO_EXTENSIONS, IMAGE_EXTENSIONS, VIDEO_EXTENSIONS

REFERENCE_EXTENSIONS = VIDEO_EXTENSIONS + IMAGE_EXTENSIONS
REFERENCE_AUDIO_EXTENSIONS = AUDIO_EXTENSIONS + VIDEO_EXTENSIONS


class ReferenceFolderError(ValueError):
    """A folder option (a reference folder, ``audio_dir``) that is not a folder; the message names it and the fix."""


def resolve_folder(given: str, root: Path, key: str) -> Path:
    """``given`` next to the source (a folder source, or a JSONL file's folder) first, then from the working
    directory; a clear error naming ``key`` when neither is a folder."""
    path = Path(given).expanduser()
    base = root if root.is_dir() else root.parent
    candidates = [path] if path.is_absolute() else [base / path, Path.cwd() / path]
    folder = next((c for c in candidates if c.is_dir()), None)
    if folder is None:
        raise ReferenceFolderError(f"{key} {given!r} is not a folder (looked in {' and '.join(str(c) for c in candidates)}): "
                             f"fix the path or remove {key}")
    return folder


def stem_index(folder: Path, extensions: tuple[str, ...]) -> dict[str, list[Path]]:
    """stem → the files with that stem (several when the same stem exists with two extensions)."""
    index: dict[str, list[Path]] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix.lower() in extensions and not path.name.startswith("."):
            index.setdefault(path.stem, []).append(path)
    return index


def match_by_stem(media: Path, index: dict[str, list[Path]], folder: Path, what: str) -> tuple[Path | None, list[str]]:
    """(the reference of ``media`` or None, problems): several matches are reported and the first is used. A missing
    reference is the doctor's error (``missing_reference_problem``), not a listing problem."""
    matches = index.get(media.stem, [])
    if not matches:
        return None, []
    if len(matches) > 1:
        return matches[0], [f"several {what}s match {media.name} in {folder} ({', '.join(m.name for m in matches)}); "
                            f"using {matches[0].name}: keep only one"]
    return matches[0], []


def same_speaker_references(items: list) -> None:
    """For items without reference audio: the sound of the next clip of the same speaker (same source and folder,
    sorted by path, wrapping around). A speaker with a single clip keeps none (the doctor says why)."""
    groups: dict[tuple[int, Path], list] = defaultdict(list)
    for item in items:
        if not item.is_image:
            groups[(item.source_index, item.media_path.parent)].append(item)
    for members in groups.values():
        members.sort(key=lambda i: str(i.media_path))
        for position, item in enumerate(members):
            if item.reference_audio_path is not None or len(members) < 2:
                continue
            other = members[(position + 1) % len(members)]
            item.reference_audio_path = other.audio_path or other.media_path
            item.reference_audio_stream = 0 if other.audio_path else other.audio_stream
