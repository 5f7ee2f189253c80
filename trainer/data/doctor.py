"""The dataset doctor: check every media item before caching and say, in plain words, what is wrong.

``diagnose(dataset_config)`` lists the dataset (``dataset.py``), opens every file with PyAV,
decodes its video (without converting pictures) and its audio, measures the sound (BS.1770 loudness,
peak, clipping, silence, speech) and reports one ``DoctorEntry`` per item with the fields of the
report of the `doctor` command plus a few extras.

Errors make an item unusable (unreadable, truncated, empty, no video, no frames, too short for the
smallest frame bucket, a caption that is not text, ...) or, for the audio verdict (``audio_verdict.py``, the
one the cache applies: silent, near-silent or too little audio), unusable as voice supervision: such a clip
is cached audio-free. Warnings are worth fixing but the item still trains (no audio, clipped, too quiet,
audio ending early, variable frame rate, missing or empty captions, duplicates). ``DoctorEntry.ok`` is
true when an item has no error.

The training modes' inputs are checked too: an audio source's item by its sound alone (and long enough for
the smallest frame bucket); references (``references.py``) present, decodable and long enough: an IC-LoRA
reference gives ``reference_frames`` frames, ID-LoRA reference audio lasts ``reference_audio_seconds`` (a
shorter one is a warning: it is used whole).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..config import DatasetConfig
from ..io_utils import atomic_write_json
from .audio_only import audio_only_frames, prepare_audio_only
from .audio_verdict import AudioThresholds, judge_clip_audio
from .dataset import DatasetItem, scan_dataset
from .media import audio as audio_measures
from .media.decode import count_decodable_frames, decode_audio
from .media.probe import MediaError, MediaInfo, probe_media
from .media.timing import (
    AUDIO_SAMPLE_RATE,
    ClipSpec,
    available_frames,
    choose_frame_bucket,
    choose_resolution_bucket,
    clip_audio_samples,
    cut_audio,
    detect_fps,
    stretch_problem,
)
from .reference_media import check_reference, check_reference_audio, missing_reference_problems

Severity = Literal["error", "warning"]
ProgressCallback = Callable[[int, int, str], None]  # (items done, items total, path being checked)


@dataclass(frozen=True)
class DoctorThresholds:
    """The doctor's own limits; the audio verdict's are in the dataset config (``AudioThresholds``)."""

    audio_gap_s: float = 0.1  # audio starting this much after the video is reported
    min_sample_rate: int = AUDIO_SAMPLE_RATE  # lower rates are upsampled and lack high frequencies
    decode_check_fraction: float = 0.9  # fewer decodable frames than this share of the packets is an error


@dataclass
class Issue:
    severity: Severity
    code: str  # short cause: truncated, no_audio, silent, vfr, duplicate, ...
    message: str


@dataclass
class DoctorEntry:
    # The report fields other tools read (the `doctor --json` entries); the extras follow.
    path: str
    ok: bool = True
    has_audio: bool = False
    audio_seconds: float | None = None
    video_seconds: float | None = None
    fps: float | None = None
    frames: int | None = None
    sample_rate: int | None = None
    channels: int | None = None
    loudness_lufs: float | None = None
    peak_dbfs: float | None = None
    clipped_fraction: float | None = None
    silence_fraction: float | None = None
    caption: str = ""
    caption_has_trigger: bool = False
    problems: list[str] = field(default_factory=list)
    # Extras.
    issues: list[Issue] = field(default_factory=list)
    speech_seconds: float | None = None
    audio_path: str | None = None  # where the sound comes from (the file itself or a separate file)
    audio_stream: int | None = None
    width: int | None = None
    height: int | None = None
    container: str | None = None
    video_codec: str | None = None
    audio_codec: str | None = None
    variable_frame_rate: bool = False
    frame_bucket: int | None = None  # frames a training clip from this item gets
    resolution_bucket: list[int] | None = None  # [width, height]
    is_image: bool = False
    is_validation: bool = False
    content_sha256: str | None = None
    is_audio_only: bool = False  # an audio source's item (audio-only mode)
    reference: str | None = None  # IC-LoRA reference file
    reference_audio: str | None = None  # ID-LoRA reference audio (a file, or another clip of the speaker)
    reference_audio_seconds: float | None = None

    def add(self, severity: Severity, code: str, message: str) -> None:
        self.issues.append(Issue(severity, code, message))
        self.problems.append(message)
        if severity == "error":
            self.ok = False

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "error"]

    @property
    def warnings(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "warning"]


@dataclass
class DoctorSummary:
    items: int = 0
    ok: int = 0
    with_errors: int = 0
    with_warnings: int = 0
    with_audio: int = 0
    images: int = 0
    validation_items: int = 0
    video_seconds: float = 0.0
    audio_seconds: float = 0.0
    speech_seconds: float = 0.0
    usable_speech_seconds: float = 0.0  # speech in items without errors
    issues_by_code: dict[str, int] = field(default_factory=dict)


@dataclass
class DoctorReport:
    entries: list[DoctorEntry]
    summary: DoctorSummary
    dataset_problems: list[Issue]  # about sources (missing folder, bad JSONL line, ...), not single items
    strict: bool = False

    @property
    def has_errors(self) -> bool:
        return any(not e.ok for e in self.entries) or any(p.severity == "error" for p in self.dataset_problems)

    @property
    def exit_code(self) -> int:
        """1 when strict and anything is an error, or when no item at all is usable; else 0."""
        if self.summary.ok == 0:
            return 1
        return 1 if self.strict and self.has_errors else 0

    def to_dict(self) -> dict[str, Any]:
        return _clean({
            "ok": not self.has_errors,
            "exit_code": self.exit_code,
            "strict": self.strict,
            "summary": dataclasses.asdict(self.summary),
            "dataset_problems": [dataclasses.asdict(p) for p in self.dataset_problems],
            "items": [dataclasses.asdict(e) for e in self.entries],
        })

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)

    def to_text(self) -> str:
        return render_text(self)


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def diagnose(
    dataset_cfg: DatasetConfig,
    *,
    strict: bool = False,
    thresholds: DoctorThresholds | None = None,
    progress: ProgressCallback | None = None,
) -> DoctorReport:
    """Check every item of ``dataset_cfg``; never raises for bad media (it is reported instead)."""
    thresholds = thresholds or DoctorThresholds()
    scan = scan_dataset(dataset_cfg)
    spec = ClipSpec.from_config(dataset_cfg)
    entries = []
    for done, item in enumerate(scan.items):
        if progress is not None:
            progress(done, len(scan.items), str(item.media_path))
        entries.append(diagnose_item(item, dataset_cfg, spec, thresholds))
    if progress is not None:
        progress(len(scan.items), len(scan.items), "")
    _flag_duplicates(entries)
    dataset_problems = [Issue(p.severity, "dataset", p.message) for p in scan.problems]
    return DoctorReport(entries, summarise(entries), dataset_problems, strict)


def run_doctor(
    dataset_cfg: DatasetConfig,
    json_path: str | os.PathLike | None = None,
    strict: bool = False,
    *,
    thresholds: DoctorThresholds | None = None,
    progress: ProgressCallback | None = None,
) -> DoctorReport:
    """``diagnose`` and, with ``json_path``, write the report there atomically."""
    report = diagnose(dataset_cfg, strict=strict, thresholds=thresholds, progress=progress)
    if json_path is not None:
        atomic_write_json(json_path, report.to_dict())
    return report


# --------------------------------------------------------------------------------------------
# One item
# --------------------------------------------------------------------------------------------


def diagnose_item(item: DatasetItem, dataset_cfg: DatasetConfig, spec: ClipSpec,
                  thresholds: DoctorThresholds) -> DoctorEntry:
    entry = DoctorEntry(path=str(item.media_path), caption=item.caption, caption_has_trigger=item.caption_has_trigger,
                        is_image=item.is_image, is_validation=item.is_validation, is_audio_only=item.is_audio_only)
    for problem in item.problems:
        entry.add("warning", "dataset", problem)
    for severity, code, message in item.caption_problems:
        entry.add(severity, code, message)
    _check_trigger(entry, item, dataset_cfg)
    _check_references(entry, item, dataset_cfg)

    try:
        info = probe_media(item.media_path)
    except MediaError as exc:
        entry.add("error", exc.kind, exc.sentence)
        return entry
    entry.content_sha256 = _sha256(item.media_path)
    entry.container = info.container
    if info.truncated:
        entry.add("error", "truncated", f"the file is truncated: {info.truncated}. Re-export or re-download it")
    if item.is_audio_only:
        _check_audio_only(entry, item, info, spec, thresholds, dataset_cfg)
        return entry
    if not _check_video(entry, item, info, spec, thresholds):
        return entry
    if not item.is_image and dataset_cfg.with_audio:
        _check_audio(entry, item, info, thresholds, dataset_cfg, spec)
    elif info.audio or item.audio_path is not None:
        entry.has_audio = not item.is_image  # present but not used: dataset.with_audio is off
    return entry


def _check_trigger(entry: DoctorEntry, item: DatasetItem, dataset_cfg: DatasetConfig) -> None:
    trigger = dataset_cfg.trigger
    if not trigger or item.caption_has_trigger or not item.raw_caption:
        return  # no trigger in use, or the missing/empty caption was reported already
    if "{trigger}" in dataset_cfg.caption_template:
        entry.add("warning", "caption_no_trigger",
                  f"the caption does not contain the trigger {trigger!r}; it is trained as {item.caption!r}. "
                  "Write the trigger into the caption where it belongs if that reads better")
    else:
        entry.add("warning", "caption_no_trigger",
                  f"the caption does not contain the trigger {trigger!r} and caption_template does not add it, so "
                  "this item does not teach the trigger: add it to the caption or put {trigger} in the template")


def _check_video(entry: DoctorEntry, item: DatasetItem, info: MediaInfo, spec: ClipSpec,
                 thresholds: DoctorThresholds) -> bool:
    """Video checks; False when the item has no usable picture at all (nothing more to check)."""
    video = info.video
    if video is None:
        entry.add("error", "no_video", "the file has no video stream (it is audio-only or not a media file). Put "
                                       "audio-only files in the source's audio_dir, named like the video they go with")
        return False
    entry.width, entry.height, entry.video_codec = video.width, video.height, video.codec
    entry.variable_frame_rate = video.variable_frame_rate
    if item.is_image:
        entry.frames, entry.video_seconds, entry.frame_bucket = 1, 0.0, 1
    else:
        entry.frames, entry.video_seconds = video.frame_count, round(video.duration_s, 4)
        if video.frame_count == 0:
            entry.add("error", "zero_length", "the video stream has no frames. Re-export the clip")
            return False
        try:
            entry.fps = detect_fps(info, item.fps_override)
            decodable = count_decodable_frames(item.media_path, info)
        except MediaError as exc:
            entry.add("error", exc.kind, exc.sentence)
            return False
        if decodable < thresholds.decode_check_fraction * video.frame_count:
            entry.add("error", "decode_failed", f"only {decodable} of its {video.frame_count} video frames can be "
                                                "decoded: the file is damaged. Re-encode or re-export it")
        if video.variable_frame_rate:
            entry.add("warning", "vfr",
                      f"variable frame rate (frame intervals from {1000 * (video.min_interval_s or 0):.0f} to "
                      f"{1000 * (video.max_interval_s or 0):.0f} ms); it is resampled by timestamps to "
                      f"{spec.target_fps:g} fps, but re-encoding at a constant rate is safer")
        problem = stretch_problem(entry.fps, spec)
        if problem:
            entry.add("error", "bad_frame_rate", f"{problem}. Use retime = \"resample\" for this dataset")
        available = available_frames(info, spec, item.fps_override)
        entry.frame_bucket = choose_frame_bucket(available, spec.frame_buckets)
        if entry.frame_bucket is None:
            smallest = min(spec.frame_buckets)
            entry.add("error", "too_short",
                      f"too short: {video.duration_s:.2f} s gives {available} frames at {spec.target_fps:g} fps but "
                      f"the smallest frame bucket needs {smallest} frames ({smallest / spec.target_fps:.2f} s). "
                      "Use a longer clip or add a smaller 8n+1 frame bucket")
    bucket = choose_resolution_bucket(video.width, video.height, spec.resolution_buckets, spec.allow_upscale)
    if bucket is None:
        smallest = min(spec.resolution_buckets, key=lambda b: b[0] * b[1])
        entry.add("error", "too_small",
                  f"{video.width}x{video.height} is smaller than every resolution bucket (smallest "
                  f"{smallest[0]}x{smallest[1]}) and allow_upscale is off. Add a smaller bucket or allow upscaling")
    else:
        entry.resolution_bucket = list(bucket)
    return True


def _check_audio(entry: DoctorEntry, item: DatasetItem, info: MediaInfo, thresholds: DoctorThresholds,
                 dataset_cfg: DatasetConfig, spec: ClipSpec) -> None:
    if item.audio_path is not None:
        source_path, audio_index = item.audio_path, 0
    else:
        source_path, audio_index = item.media_path, item.audio_stream
        if not info.audio:
            entry.add("warning", "no_audio",
                      "no audio stream: this clip trains video-only (no audio loss). Add its sound as a separate file "
                      f"named {item.media_path.stem}.wav in the source's audio_dir, or ignore this for silent clips")
            return
        if len(info.audio) > 1:
            chosen = info.audio[audio_index] if audio_index < len(info.audio) else None
            described = f"stream {audio_index} ({_describe_stream(chosen)})" if chosen else f"stream {audio_index}"
            entry.add("warning", "several_audio_streams",
                      f"{len(info.audio)} audio streams; {described} is used. Set audio_stream on the source to "
                      "pick another (0-based)")
    entry.audio_path, entry.audio_stream = str(source_path), audio_index
    try:
        audio_info = info if source_path == item.media_path else probe_media(source_path)
        track = decode_audio(source_path, audio_index=audio_index, info=audio_info)
    except MediaError as exc:
        # The cache would fail on this item the same way, so it is unusable until fixed.
        where = exc.sentence if exc.path == entry.path else str(exc)  # name a separate audio file
        entry.add("error", f"audio_{exc.kind}", f"audio: {where}")
        return
    stream_info = audio_info.audio[audio_index]
    entry.audio_codec, entry.sample_rate, entry.channels = stream_info.codec, track.sample_rate, track.channels
    entry.audio_seconds = round(track.duration_s, 4)
    if track.samples.shape[1] == 0:
        entry.add("error", "zero_length", f"the audio stream of {source_path} has no samples. Re-export the sound")
        return
    entry.has_audio = True

    stats = audio_measures.measure(track.samples, track.sample_rate, track.channel_names)
    entry.loudness_lufs, entry.peak_dbfs = stats.loudness_lufs, stats.peak_dbfs
    entry.clipped_fraction, entry.silence_fraction = stats.clipped_fraction, stats.silence_fraction
    entry.speech_seconds = stats.speech_seconds

    if item.audio_path is None and info.video is not None:
        # Where the sound sits against the picture on the file's shared clock.
        video_start = info.video.start_s - info.origin_s
        _check_start(entry, track.start_s - video_start, thresholds)

    # The verdict on what the cache will train on: the clip's span of the sound, cut as the cache cuts it.
    if entry.frame_bucket is not None and entry.fps:
        video_start = info.video.start_s - info.origin_s
        if item.audio_path is not None:
            track.start_s += video_start  # a separate file starts with the first video frame (as the cache reads it)
        span_fps = entry.fps if spec.retime == "stretch" else spec.target_fps
        clip, valid = cut_audio(track, video_start, clip_audio_samples(entry.frame_bucket, span_fps, AUDIO_SAMPLE_RATE),
                                AUDIO_SAMPLE_RATE)
        verdict = judge_clip_audio(clip, valid, AUDIO_SAMPLE_RATE, AudioThresholds.from_dataset(dataset_cfg))
        for severity, code, message in verdict.issues:
            entry.add(severity, code, message)
    if track.sample_rate < thresholds.min_sample_rate:
        entry.add("warning", "low_sample_rate",
                  f"the audio is sampled at {track.sample_rate} Hz; it is upsampled to {AUDIO_SAMPLE_RATE} Hz and has "
                  "no high frequencies. Use a higher-quality recording if you have one")


def _check_audio_only(entry: DoctorEntry, item: DatasetItem, info: MediaInfo, spec: ClipSpec,
                      thresholds: DoctorThresholds, dataset_cfg: DatasetConfig) -> None:
    """An audio source's item: its sound is the clip (the picture of a video file is not used). The verdict is the
    cache's, on the span the cache cuts; an item whose sound is no voice supervision has nothing to train."""
    if not info.audio:
        entry.add("error", "no_audio", "an audio source's item needs sound and this file has no audio stream: remove it "
                                       "from the audio source")
        return
    _check_audio(entry, item, info, thresholds, dataset_cfg, spec)
    if entry.audio_seconds is None or not entry.has_audio:
        return
    entry.frame_bucket = audio_only_frames(entry.audio_seconds, spec)
    if entry.frame_bucket is None:
        smallest = min(spec.frame_buckets)
        entry.add("error", "too_short",
                  f"too short: the sound lasts {entry.audio_seconds:.2f} s but the shortest clip is {smallest} frames "
                  f"({smallest / spec.target_fps:.2f} s). Use a longer recording or add a smaller 8n+1 frame bucket")
        return
    try:
        sound = prepare_audio_only(item.media_path, dataset_cfg, audio_index=item.audio_stream)
    except MediaError as exc:
        entry.add("error", exc.kind, exc.sentence)
        return
    verdict = judge_clip_audio(sound.audio, sound.valid_samples, AUDIO_SAMPLE_RATE, AudioThresholds.from_dataset(dataset_cfg))
    for severity, code, message in verdict.issues:
        entry.add(severity, code, message)


def _check_references(entry: DoctorEntry, item: DatasetItem, dataset_cfg: DatasetConfig) -> None:
    """The item's references: present when its source asks for them, decodable, long enough."""
    problems = missing_reference_problems(item, dataset_cfg)
    if item.reference_path is not None:
        entry.reference = str(item.reference_path)
        problems += check_reference(item.reference_path, dataset_cfg)
    if item.reference_audio_path is not None and dataset_cfg.with_audio:
        entry.reference_audio = str(item.reference_audio_path)
        audio_problems, entry.reference_audio_seconds = check_reference_audio(
            item.reference_audio_path, dataset_cfg, item.reference_audio_stream)
        problems += audio_problems
    for severity, code, message in problems:
        entry.add(severity, code, message)


def _check_start(entry: DoctorEntry, audio_start: float, thresholds: DoctorThresholds) -> None:
    tolerance = max(thresholds.audio_gap_s, 2.0 / (entry.fps or 25.0))
    if audio_start > tolerance:
        entry.add("warning", "audio_starts_late",
                  f"the audio starts {audio_start:.2f} s after the video; the gap is filled with silence")


def _describe_stream(stream) -> str:
    parts = [stream.codec, f"{stream.channels} ch", f"{stream.sample_rate} Hz"]
    if stream.language and stream.language != "und":
        parts.append(stream.language)
    if stream.title:
        parts.append(repr(stream.title))
    return ", ".join(parts)


def _flag_duplicates(entries: list[DoctorEntry]) -> None:
    first_with: dict[str, DoctorEntry] = {}
    for entry in entries:
        if entry.content_sha256 is None:
            continue
        original = first_with.setdefault(entry.content_sha256, entry)
        if original is not entry:
            entry.add("warning", "duplicate", f"same content as {original.path} (identical bytes): it is trained "
                                              "twice as often. Delete one copy or use repeats on purpose")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Summary and rendering
# --------------------------------------------------------------------------------------------


def summarise(entries: list[DoctorEntry]) -> DoctorSummary:
    summary = DoctorSummary(items=len(entries))
    codes: Counter[str] = Counter()
    for entry in entries:
        summary.ok += entry.ok
        summary.with_errors += not entry.ok
        summary.with_warnings += bool(entry.warnings)
        summary.with_audio += entry.has_audio
        summary.images += entry.is_image
        summary.validation_items += entry.is_validation
        summary.video_seconds += entry.video_seconds or 0.0
        summary.audio_seconds += entry.audio_seconds or 0.0
        summary.speech_seconds += entry.speech_seconds or 0.0
        if entry.ok:
            summary.usable_speech_seconds += entry.speech_seconds or 0.0
        codes.update(issue.code for issue in entry.issues)
    summary.issues_by_code = dict(sorted(codes.items()))
    for name in ("video_seconds", "audio_seconds", "speech_seconds", "usable_speech_seconds"):
        setattr(summary, name, round(getattr(summary, name), 3))
    return summary


def render_text(report: DoctorReport) -> str:
    """The human-readable report: a summary, then every item with its problems (errors first)."""
    s = report.summary
    lines = [
        f"Dataset doctor: {s.items} items, {s.ok} usable, {s.with_errors} with errors, {s.with_warnings} with warnings",
        f"  video {s.video_seconds:.1f} s, audio {s.audio_seconds:.1f} s in {s.with_audio} items, speech "
        f"{s.speech_seconds:.1f} s ({s.usable_speech_seconds:.1f} s in usable items)",
    ]
    for problem in report.dataset_problems:
        lines.append(f"  {problem.severity.upper():7} {problem.message}")
    order = sorted(report.entries, key=lambda e: (e.ok, not e.warnings, e.path))
    for entry in order:
        status = "ERROR" if not entry.ok else ("warn" if entry.warnings else "ok")
        lines.append(f"{status:7} {entry.path}  {_facts(entry)}")
        for issue in entry.errors + entry.warnings:
            lines.append(f"          {issue.severity}: {issue.message}")
    if report.exit_code:
        reason = "no item is usable" if s.ok == 0 else "errors found (strict mode)"
        lines.append(f"FAILED: {reason}")
    return "\n".join(lines)


def _facts(entry: DoctorEntry) -> str:
    facts = []
    if entry.is_image and entry.width:
        facts.append(f"image {entry.width}x{entry.height}")
    elif entry.video_seconds is not None:
        facts.append(f"{entry.video_seconds:.2f} s")
        if entry.fps:
            facts.append(f"{entry.fps:.3g} fps")
        if entry.width:
            facts.append(f"{entry.width}x{entry.height}")
    if entry.has_audio:
        facts.append(f"{(entry.sample_rate or 0) / 1000:g} kHz {entry.channels} ch")
        if entry.loudness_lufs is not None:
            facts.append(f"{entry.loudness_lufs:.1f} LUFS")
        if entry.speech_seconds:
            facts.append(f"speech {entry.speech_seconds:.1f} s")
    return ", ".join(facts)


def _clean(value: Any) -> Any:
    """JSON-safe: non-finite floats become null, floats are rounded to 6 significant decimals."""
    if isinstance(value, float):
        return round(value, 6) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
