"""Which media items a ``DatasetConfig`` describes, with their captions, audio files and weights.

Sources (``DatasetSource.kind``):

- ``video``: a folder (searched recursively) of video files, each with a sidecar caption
  ``<stem><caption_extension>`` next to it;
- ``image``: the same for still images (1-frame items, never audio);
- ``jsonl``: a file with one JSON object per line, ``{"media": ..., "caption": ..., "audio": ...}``;
  paths are relative to the JSONL file, ``audio`` is optional, and without ``caption`` the sidecar
  file next to the media is read.

With ``audio_dir``, a separate audio file with the same stem (``clip.wav`` for ``clip.mp4``) replaces
the container's sound. A relative ``audio_dir`` is looked up next to the source first, then from the
working directory.

- ``audio``: a folder of audio files (and videos, whose sound is used) for the audio-only mode; each
  item is its sound alone (``is_audio_only``), captioned like a clip.

The training modes' references (``reference_dir``, ``reference_audio_dir``, ``reference_audio_same_speaker``)
are matched to items here too (``references.py``).

Nothing here decodes media: problems found are about the listing itself (missing captions, bad
encodings, ambiguous audio matches). ``doctor.py`` checks the files.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..config import DatasetConfig, DatasetSource
from .media.probe import AUDIO_EXTENSIONS, IMAGE_EXTENSIONS, VIDEO_EXTENSIONS
from .references import (
    REFERENCE_AUDIO_EXTENSIONS,
    REFERENCE_EXTENSIONS,
    ReferenceFolderError,
    match_by_stem,
    resolve_folder,
    same_speaker_references,
    stem_index,
)


class DatasetError(ValueError):
    """The dataset definition cannot be listed (missing folder, unreadable JSONL, no media at all)."""


@dataclass
class DatasetItem:
    media_path: Path
    audio_path: Path | None  # a separate audio file replacing the container's sound, or None
    caption: str  # the text trained on: the raw caption with the trigger added by caption_template
    raw_caption: str  # as read from the file / JSONL, whitespace-normalised
    caption_path: Path | None  # the sidecar file, or None for captions given inline in a JSONL
    source_index: int
    is_image: bool
    is_validation: bool
    video_loss_weight: float
    audio_loss_weight: float
    repeats: int
    audio_stream: int = 0  # index among the container's audio streams (from the source)
    fps_override: float = 0.0  # from the source; 0 = detect
    caption_has_trigger: bool = False  # whether the raw caption already names the trigger
    key: str = ""  # stable id: "<source index>:<path relative to the source>"
    problems: list[str] = field(default_factory=list)
    is_audio_only: bool = False  # an audio source's item: its sound alone (audio-only mode)
    reference_path: Path | None = None  # IC-LoRA reference video or image
    reference_audio_path: Path | None = None  # ID-LoRA reference audio (a file, or another clip of the speaker)
    reference_audio_stream: int = 0  # the audio stream of reference_audio_path
    # Caption problems as (severity, code, message): caption_missing / caption_empty (warnings: the item trains on
    # the trigger alone), caption_not_utf8 / caption_binary (errors: the item is not cached).
    caption_problems: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def caption_error(self) -> str | None:
        """Why the caption cannot be used as text (the item then fails in the cache), or None."""
        errors = [message for severity, _, message in self.caption_problems if severity == "error"]
        return "; ".join(errors) if errors else None


@dataclass
class SourceProblem:
    severity: Literal["error", "warning"]
    message: str


@dataclass
class DatasetScan:
    items: list[DatasetItem]
    problems: list[SourceProblem]  # about sources, not single items

    @property
    def errors(self) -> list[str]:
        return [p.message for p in self.problems if p.severity == "error"]


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------


_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")  # never in text; \t \n \v \f \r are whitespace


def read_caption(path: Path) -> tuple[str, list[tuple[str, str, str]]]:
    """(caption text, problems as (severity, code, message)). UTF-8 (a BOM is allowed); whitespace runs,
    newlines included, become single spaces. A file that is not UTF-8 or holds binary bytes is an error: its
    text would be garbage, so the caption is empty and the item is not cached."""
    if not path.is_file():
        return "", [("warning", "caption_missing", f"no caption: {path} does not exist (write the caption there, or "
                                                   "the item trains on the trigger alone)")]
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return "", [("error", "caption_not_utf8",
                     f"caption {path} is not valid UTF-8 (byte 0x{data[exc.start]:02x} at position {exc.start}): the "
                     "item is not cached. Re-save the file as UTF-8")]
    control = _CONTROL.search(text)
    if control:
        return "", [("error", "caption_binary",
                     f"caption {path} holds binary data (byte 0x{ord(control.group()):02x} at character "
                     f"{control.start()}), not text: the item is not cached. Write the caption as plain UTF-8 text")]
    text = " ".join(text.split())
    if not text:
        return "", [("warning", "caption_empty", f"caption {path} is empty (the item trains on the trigger alone): write a caption")]
    return text, []


def _trigger_pattern(trigger: str) -> re.Pattern[str]:
    # The trigger as a whole word, any case: "ohwx" matches "Ohwx," but not "ohwxy".
    return re.compile(r"(?<![\w])" + re.escape(trigger) + r"(?![\w])", re.IGNORECASE)


def caption_has_trigger(caption: str, trigger: str) -> bool:
    return bool(trigger) and bool(_trigger_pattern(trigger).search(caption))


def apply_trigger(raw_caption: str, trigger: str, template: str) -> str:
    """The caption trained on: ``template`` with ``{trigger}`` and ``{caption}`` filled in, unless the
    caption already names the trigger (then it is used unchanged, never double-prefixed)."""
    if not trigger or caption_has_trigger(raw_caption, trigger):
        return raw_caption
    # One pass, so braces or "{caption}" inside the caption or trigger are never substituted again.
    filled = re.sub(r"\{(trigger|caption)\}", lambda m: trigger if m.group(1) == "trigger" else raw_caption, template)
    return filled.strip().strip(",;:").strip()  # an empty caption leaves "ohwx, " → "ohwx"


def validation_fraction_of(key: str) -> float:
    """A number in [0, 1) fixed by the item's relative path: the same item always lands on the same
    side of the split, and adding items never moves the others."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


# --------------------------------------------------------------------------------------------
# Listing
# --------------------------------------------------------------------------------------------


def scan_dataset(config: DatasetConfig) -> DatasetScan:
    """List every item of every source; problems are collected, not raised."""
    items: list[DatasetItem] = []
    problems: list[SourceProblem] = []
    if not config.sources:
        problems.append(SourceProblem("error", "dataset.sources is empty: add at least one [[dataset.sources]] "
                                               "with a path to a folder of clips"))
    for index, source in enumerate(config.sources):
        where = f"dataset.sources[{index}] ({source.path or 'no path'})"
        try:
            found = _scan_source(index, source, config, problems, where)
        except DatasetError as exc:
            problems.append(SourceProblem("error", f"{where}: {exc}"))
            continue
        if not found:
            wanted = {"video": "video files", "image": "images", "jsonl": "entries", "audio": "audio or video files"}[source.kind]
            problems.append(SourceProblem("error", f"{where}: no {wanted} found"))
        items.extend(found)
    if config.reference_audio_same_speaker:
        same_speaker_references(items)
    return DatasetScan(items, problems)


def enumerate_dataset(config: DatasetConfig) -> list[DatasetItem]:
    """Every item of the dataset (each once; ``repeats`` is a field). Raises ``DatasetError`` when a
    source cannot be listed; per-item problems are in ``item.problems``."""
    scan = scan_dataset(config)
    if scan.errors:
        raise DatasetError("; ".join(scan.errors))
    return scan.items


def training_items(items: list[DatasetItem]) -> list[DatasetItem]:
    """The training items with ``repeats`` applied (validation items left out)."""
    return [item for item in items if not item.is_validation for _ in range(item.repeats)]


def _scan_source(
    index: int, source: DatasetSource, config: DatasetConfig, problems: list[SourceProblem], where: str
) -> list[DatasetItem]:
    if not source.path:
        raise DatasetError("path is empty: set it to a folder of clips (or a .jsonl file for kind = \"jsonl\")")
    root = Path(source.path).expanduser()
    if not root.exists():
        raise DatasetError(f"{root} does not exist: check the path")
    audio_files = _audio_index(source, root, problems, where)
    if source.kind == "jsonl":
        if not root.is_file():
            raise DatasetError(f"{root} is not a file: a jsonl source is a .jsonl file with one JSON object per line")
        entries = _jsonl_entries(root, problems)
    else:
        if not root.is_dir():
            raise DatasetError(f"{root} is not a folder: a {source.kind} source is a folder of media files")
        paired = {p for paths in audio_files.values() for p in paths}
        entries = _folder_entries(root, source, problems, where, paired if source.kind == "video" else None)

    items = []
    used_audio: set[Path] = set()
    for entry in entries:
        item = _make_item(index, source, config, entry, audio_files)
        if item.audio_path is not None:
            used_audio.add(item.audio_path)
        items.append(item)
    try:
        _attach_references(items, source, root, problems, where)
    except ReferenceFolderError as exc:
        raise DatasetError(str(exc)) from None
    unmatched = sorted(p for paths in audio_files.values() for p in paths if p not in used_audio)
    if unmatched:
        problems.append(SourceProblem("warning", f"{where}: {len(unmatched)} audio file(s) in audio_dir match no "
                                                 f"media file by name and are not used: "
                                                 f"{_first_names([p.name for p in unmatched])}"))
    return items


@dataclass
class _Entry:
    media: Path
    relative: str  # path relative to the source root, the item's stable key
    caption: str | None  # inline caption (JSONL) or None to read the sidecar
    audio: Path | None  # explicit audio (JSONL)
    problems: list[str]


def _folder_entries(root: Path, source: DatasetSource, problems: list[SourceProblem], where: str,
                    audio_files_used: set[Path] | None = None) -> list[_Entry]:
    """Media files of a video/image folder. ``audio_files_used``: audio files that audio_dir pairs
    (others found among the media are reported as unused)."""
    wanted = {"video": VIDEO_EXTENSIONS, "image": IMAGE_EXTENSIONS, "audio": AUDIO_EXTENSIONS + VIDEO_EXTENSIONS}[source.kind]
    other = IMAGE_EXTENSIONS if source.kind in ("video", "audio") else VIDEO_EXTENSIONS
    entries, skipped, loose_audio = [], [], []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue  # hidden files and leftovers of interrupted writes (".tmp-*")
        suffix = path.suffix.lower()
        if suffix in wanted:
            entries.append(_Entry(path, relative.as_posix(), None, None, []))
        elif suffix in other:
            skipped.append(relative.as_posix())
        elif suffix in AUDIO_EXTENSIONS:
            loose_audio.append(path)
    if skipped:
        other_kind = "image" if source.kind in ("video", "audio") else "video"
        problems.append(SourceProblem("warning", f"{where}: {len(skipped)} {other_kind} file(s) are ignored in a "
                                                 f"{source.kind} source (add a kind = \"{other_kind}\" source for "
                                                 f"them): {_first_names(skipped)}"))
    if loose_audio and audio_files_used is not None:
        unused = [p for p in loose_audio if p not in audio_files_used]
        if unused:
            problems.append(SourceProblem("warning", f"{where}: {len(unused)} audio file(s) lie among the media but "
                                                     "are not used (set audio_dir to their folder to pair them with "
                                                     f"videos by name): {_first_names([p.name for p in unused])}"))
    return entries


def _first_names(names: list[str], count: int = 5) -> str:
    return ", ".join(names[:count]) + (" ..." if len(names) > count else "")


def _jsonl_entries(path: Path, problems: list[SourceProblem]) -> list[_Entry]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path} is not valid UTF-8 (byte position {exc.start}): re-save it as UTF-8") from None
    base = path.parent
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(SourceProblem("error", f"{path} line {number}: not valid JSON ({exc.msg}); the line is "
                                                   "skipped: fix it"))
            continue
        media = row.get("media") if isinstance(row, dict) else None
        if not isinstance(media, str) or not media:
            problems.append(SourceProblem("error", f"{path} line {number}: needs a \"media\" path string; the line "
                                                   "is skipped: add it"))
            continue
        entry_problems = []
        caption = row.get("caption")
        if caption is not None and not isinstance(caption, str):
            entry_problems.append(f"{path} line {number}: \"caption\" must be a string, got {type(caption).__name__}; "
                                  "the sidecar caption file is read instead")
            caption = None
        audio = row.get("audio")
        if audio is not None and not isinstance(audio, str):
            entry_problems.append(f"{path} line {number}: \"audio\" must be a path string; it is ignored")
            audio = None
        media_path = (base / media).expanduser()
        audio_path = (base / audio).expanduser() if audio else None
        if audio_path is not None and not audio_path.is_file():
            entry_problems.append(f"{path} line {number}: audio file {audio_path} does not exist; the container's "
                                  "sound is used instead: fix the path")
            audio_path = None
        entries.append(_Entry(media_path, media, caption, audio_path, entry_problems))
    return entries


def _audio_index(source: DatasetSource, root: Path, problems: list[SourceProblem], where: str) -> dict[str, list[Path]]:
    """stem -> audio files in ``audio_dir`` (several when the same stem exists with two extensions)."""
    if not source.audio_dir or source.kind in ("image", "audio"):
        return {}
    try:
        folder = resolve_folder(source.audio_dir, root, "audio_dir")
    except ReferenceFolderError as exc:
        raise DatasetError(str(exc)) from None
    index = stem_index(folder, AUDIO_EXTENSIONS)
    if not index:
        problems.append(SourceProblem("warning", f"{where}: audio_dir {folder} holds no audio files "
                                                 f"({', '.join(AUDIO_EXTENSIONS)})"))
    return index


def _make_item(
    index: int, source: DatasetSource, config: DatasetConfig, entry: _Entry, audio_files: dict[str, list[Path]]
) -> DatasetItem:
    problems = list(entry.problems)
    is_image = source.kind == "image" or (source.kind == "jsonl" and entry.media.suffix.lower() in IMAGE_EXTENSIONS)
    is_audio_only = source.kind == "audio" or (source.kind == "jsonl" and entry.media.suffix.lower() in AUDIO_EXTENSIONS)

    caption_path = None
    caption_problems: list[tuple[str, str, str]] = []
    if entry.caption is not None:
        raw = " ".join(entry.caption.split())
        if _CONTROL.search(entry.caption):
            raw = ""
            caption_problems.append(("error", "caption_binary", f"the caption of {entry.media} in the JSONL holds "
                                     "control characters, not text: the item is not cached. Write plain text"))
        elif not raw:
            caption_problems.append(("warning", "caption_empty", f"the caption of {entry.media} in the JSONL is empty "
                                     "(the item trains on the trigger alone): write a caption"))
    else:
        caption_path = entry.media.with_suffix(source.caption_extension)
        raw, caption_problems = read_caption(caption_path)

    audio_path = entry.audio
    if audio_path is None and not is_image and not is_audio_only:
        matches = audio_files.get(entry.media.stem, [])
        if len(matches) > 1:
            problems.append(f"several audio files match {entry.media.name} in audio_dir "
                            f"({', '.join(m.name for m in matches)}); using {matches[0].name}: keep only one")
        audio_path = matches[0] if matches else None

    key = f"{index}:{entry.relative}"
    if source.is_validation:
        is_validation = True
    else:
        is_validation = config.validation_split > 0 and validation_fraction_of(entry.relative) < config.validation_split
    return DatasetItem(
        media_path=entry.media,
        audio_path=audio_path,
        caption=apply_trigger(raw, config.trigger, config.caption_template),
        raw_caption=raw,
        caption_path=caption_path,
        source_index=index,
        is_image=is_image,
        is_validation=is_validation,
        video_loss_weight=float(source.video_loss_weight),
        audio_loss_weight=0.0 if is_image else float(source.audio_loss_weight),
        repeats=int(source.repeats),
        audio_stream=int(source.audio_stream),
        fps_override=float(source.fps_override),
        caption_has_trigger=caption_has_trigger(raw, config.trigger),
        key=key,
        problems=problems,
        is_audio_only=is_audio_only,
        caption_problems=caption_problems,
    )


def _attach_references(items: list[DatasetItem], source: DatasetSource, root: Path, problems: list[SourceProblem],
                       where: str) -> None:
    """The source's references by file stem (``references.py``); references that match no item are reported."""
    for key, what, extensions, field_name in (
        ("reference_dir", "reference", REFERENCE_EXTENSIONS, "reference_path"),
        ("reference_audio_dir", "reference audio", REFERENCE_AUDIO_EXTENSIONS, "reference_audio_path"),
    ):
        given = getattr(source, key)
        if not given:
            continue
        folder = resolve_folder(given, root, f"{where}: {key}")
        index = stem_index(folder, extensions)
        used: set[Path] = set()
        for item in items:
            if item.is_image and field_name == "reference_audio_path":
                continue
            found, item_problems = match_by_stem(item.media_path, index, folder, what)
            item.problems.extend(item_problems)
            setattr(item, field_name, found)
            if found is not None:
                used.add(found)
        unused = sorted(p.name for paths in index.values() for p in paths if p not in used)
        if unused:
            problems.append(SourceProblem("warning", f"{where}: {len(unused)} file(s) in {key} match no clip by name and "
                                                     f"are not used: {_first_names(unused)}"))
