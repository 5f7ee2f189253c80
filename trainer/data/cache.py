"""The latent cache: one safetensors file per item plus a manifest, each entry fingerprinted.

An entry holds the video latent, the audio latent with its number of valid latent frames (the rest is
padding) and the text context. Its fingerprint covers everything it depends on (media bytes, separate
audio bytes, encoder weights, resolution/frames/fps, audio parameters, final caption, model version,
cache format), so a changed input re-encodes exactly the affected items. Before training every entry
is validated from its header and tensors (audio present whenever audio is expected, lengths
consistent, finite values); an invalid entry is re-encoded, never used. Audio is encoded in fp32
with the posterior mean. Writes are atomic. Training can run from the cache folder alone.

The training modes add to an entry: an audio source's item stores the all-zero stand-in video latent
(``audio_only.py``) instead of an encoded picture; an IC-LoRA reference (``reference_video_latent``) and
ID-LoRA reference audio (``reference_audio_latent``) are encoded once with the item, and the reference
file's bytes and settings are part of the entry's fingerprint.

No finished work is lost: each entry is appended to ``manifest.journal`` (one fsynced JSON line) as soon
as its file is written, and the journal is folded into ``manifest.json`` when a run ends; a run stopped or
killed in between leaves every finished entry for the next one to reuse. Every file the manifest names
must be a plain file name inside the cache folder: a manifest that points elsewhere is refused, never
followed (no read or delete outside the folder).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors import safe_open

from ..backends.interface import AUDIO_SAMPLE_RATE, TextContext
from ..config import Config, ConfigError
from ..io_utils import atomic_write_json, read_jsonl, remove_stale_temporaries, save_safetensors_atomic
from .audio_only import prepare_audio_only, standin_video_latent
from .audio_verdict import AudioThresholds, judge_clip_audio
from .batches import LatentSample
from .media.timing import prepare_item
from .reference_media import prepare_reference, prepare_reference_audio

CACHE_FORMAT = 1
MANIFEST = "manifest.json"
JOURNAL = "manifest.journal"  # entries finished since manifest.json was last written (JSON lines)


class CacheError(ValueError):
    """A cache folder that cannot be used as it is (a manifest naming files outside it, unknown fields); the
    message names the file and the fix."""
VIDEO_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class CacheEntry:
    id: str
    file: str  # relative to the cache folder
    fingerprint: str
    media: str
    caption: str
    has_audio: bool
    audio_valid_frames: int
    fps: float
    video_shape: list[int]
    audio_shape: list[int] | None
    video_loss_weight: float = 1.0
    audio_loss_weight: float = 1.0
    repeats: int = 1
    is_validation: bool = False
    audio_problem: str | None = None  # why an item expected to have audio has none
    audio_only: bool = False  # the video latent is the audio-only stand-in
    reference_shape: list[int] | None = None  # IC-LoRA reference latent [128, Fg, H'/f, W'/f]
    reference_audio_shape: list[int] | None = None  # ID-LoRA reference audio latent [8, Tr, 16]

    @classmethod
    def from_record(cls, record, where: str) -> "CacheEntry":
        """An entry read from the manifest or the journal, checked: known fields only, and ``file`` a plain
        file name (no folder, no ``..``), so nothing outside the cache folder is ever read or deleted."""
        fix = "the manifest was altered or written by another program: delete it (and manifest.journal) to rebuild the cache"
        if not isinstance(record, dict):
            raise CacheError(f"{where}: an entry is not a JSON object; {fix}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(record) - known)
        if unknown:
            raise CacheError(f"{where}: entry {record.get('id', '?')!r} has unknown field {unknown[0]!r}; {fix}")
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.default is dataclasses.MISSING and f.name not in record)
        if missing:
            raise CacheError(f"{where}: entry {record.get('id', '?')!r} lacks {', '.join(missing)}; {fix}")
        name = record["file"]
        if not isinstance(name, str) or not _is_plain_name(name):
            raise CacheError(f"{where}: entry {record.get('id', '?')!r} names {name!r}, which is not a file inside the "
                             f"cache folder; {fix}")
        return cls(**record)


def _is_plain_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and Path(name).name == name and "\\" not in name \
        and not Path(name).is_absolute() and not name.startswith("~")


def entry_path(cache_dir: str | Path, entry: CacheEntry) -> Path:
    """The entry's file, always inside ``cache_dir`` (``from_record`` refused any other name)."""
    folder = Path(cache_dir).resolve()
    path = (folder / entry.file).resolve()
    if path.parent != folder:
        raise CacheError(f"{Path(cache_dir) / MANIFEST}: entry {entry.id!r} names {entry.file!r}, outside the cache folder")
    return path


@dataclass
class CacheSummary:
    """What one ``cache`` run did and what the cache now holds for the dataset.

    ``video_encoded`` / ``audio_encoded``: items encoded by this run (with audio). ``reused``: entries kept as
    they were. ``invalidated``: entries replaced because their input changed or their file was broken. ``failed``:
    items not in the cache at all (their reasons in ``failures``). ``audio_failed``: items that should carry audio
    (video clips of an audio run) but have none in the cache now, failed items included, whether this run or an
    earlier one decided it; every one of them has a record in ``failures``. ``stopped_by``: set when the run was
    stopped before the last item (what was finished is kept)."""

    video_encoded: int = 0
    audio_encoded: int = 0
    audio_failed: int = 0
    reused: int = 0
    invalidated: int = 0
    failed: int = 0
    failures: list[dict] = field(default_factory=list)  # {path, reason, kind: "item" | "audio", reused}
    entries: int = 0
    items: int = 0
    stopped_by: str | None = None

    def totals(self) -> dict:
        return {k: getattr(self, k) for k in ("video_encoded", "audio_encoded", "audio_failed", "reused", "invalidated")}

    def console_line(self) -> str:
        return f"Audio latent caching: {self.audio_encoded} encoded, {self.audio_failed} failed"

    def items_line(self) -> str:
        """The second console line: every item accounted for (encoded + reused + failed = items)."""
        line = (f"Cache: {self.items} items: {self.video_encoded} encoded, {self.reused} reused, {self.failed} not cached"
                f" ({self.entries} entries in the cache)")
        if self.stopped_by:
            line += f"; stopped by {self.stopped_by} before the rest (finished entries are kept: run cache again)"
        return line

    def to_dict(self) -> dict:
        return asdict(self)


def content_hash(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def entry_fingerprint(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def read_manifest(cache_dir: str | Path) -> dict:
    """The manifest with the journal of an unfinished run folded in (a journal entry replaces the manifest's
    entry of the same id), every entry checked by ``CacheEntry.from_record``."""
    path = Path(cache_dir) / MANIFEST
    manifest: dict = {"format": CACHE_FORMAT, "entries": []}
    if path.is_file():
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CacheError(f"{path}: the cache manifest is not valid JSON ({exc}); delete it to rebuild the cache") from None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("entries", []), list):
            raise CacheError(f"{path}: the cache manifest is not a manifest of this trainer; delete it to rebuild the cache")
        if manifest.get("format") != CACHE_FORMAT:
            manifest = {"format": CACHE_FORMAT, "entries": []}  # an older layout: everything is re-encoded
    entries = {}
    for record in manifest.get("entries", []):
        entry = CacheEntry.from_record(record, str(path))
        entries[entry.id] = entry
    for record in read_jsonl(Path(cache_dir) / JOURNAL):
        entry = CacheEntry.from_record(record, str(Path(cache_dir) / JOURNAL))
        entries[entry.id] = entry
    return {**manifest, "entries": [asdict(e) for e in entries.values()]}


def _journal(cache_dir: Path, entry: CacheEntry) -> None:
    """Append one finished entry to the journal, fsynced; a line torn by a kill is closed first."""
    path = cache_dir / JOURNAL
    with open(path, "ab") as fh:
        if fh.tell() and path.read_bytes()[-1:] != b"\n":
            fh.write(b"\n")
        fh.write((json.dumps(asdict(entry)) + "\n").encode("utf-8"))
        fh.flush()
        os.fsync(fh.fileno())


def validate_entry(cache_dir: str | Path, entry: CacheEntry, expect_audio: bool) -> list[str]:
    """Problems with one cached file, read from its header and tensors; empty when it can be used."""
    path = entry_path(cache_dir, entry)
    if not path.is_file():
        return [f"{path}: file missing"]
    problems = []
    try:
        with safe_open(str(path), framework="pt") as fh:
            keys = set(fh.keys())
            meta = fh.metadata() or {}
            if meta.get("fingerprint") != entry.fingerprint:
                problems.append(f"{path}: fingerprint differs from the manifest")
            required = {"video_latent", "text_video", "text_audio", "text_mask"}
            if expect_audio and entry.has_audio:
                required |= {"audio_latent", "audio_valid_frames"}
            references = {name: shape for name, shape in (("reference_video_latent", entry.reference_shape),
                                                          ("reference_audio_latent", entry.reference_audio_shape))
                          if shape is not None}
            required |= set(references)
            missing = required - keys
            if missing:
                problems.append(f"{path}: missing {', '.join(sorted(missing))}")
                return problems
            video = fh.get_tensor("video_latent")
            if list(video.shape) != entry.video_shape:
                problems.append(f"{path}: video latent shape {list(video.shape)} != manifest {entry.video_shape}")
            tensors = [video, fh.get_tensor("text_video"), fh.get_tensor("text_audio")]
            for name, shape in references.items():
                reference = fh.get_tensor(name)
                if list(reference.shape) != shape:
                    problems.append(f"{path}: {name} shape {list(reference.shape)} != manifest {shape}")
                tensors.append(reference)
            if "audio_latent" in required:
                audio = fh.get_tensor("audio_latent")
                valid = int(fh.get_tensor("audio_valid_frames").item())
                if audio.dtype != torch.float32:
                    problems.append(f"{path}: audio latent is {audio.dtype}, expected float32")
                if audio.ndim != 3 or audio.shape[0] != 8 or audio.shape[2] != 16:
                    problems.append(f"{path}: audio latent shape {list(audio.shape)} is not [8, T, 16]")
                elif not 0 < valid <= audio.shape[1]:
                    problems.append(f"{path}: audio valid length {valid} outside 1..{audio.shape[1]}")
                tensors.append(audio)
            if any(not torch.isfinite(t.float()).all() for t in tensors):
                problems.append(f"{path}: non-finite values")
    except Exception as exc:  # a truncated or foreign file
        problems.append(f"{path}: unreadable ({exc})")
    return problems


def load_entry(cache_dir: str | Path, entry: CacheEntry) -> LatentSample:
    from ..backends.text_connectors import TextFeatures

    path = entry_path(cache_dir, entry)
    with safe_open(str(path), framework="pt") as fh:
        audio = fh.get_tensor("audio_latent") if entry.has_audio else None
        features = None
        if "features_video" in fh.keys():
            features = TextFeatures(fh.get_tensor("features_video"), fh.get_tensor("features_audio"), fh.get_tensor("features_mask"))
        reference = fh.get_tensor("reference_video_latent").float() if entry.reference_shape is not None else None
        reference_audio = fh.get_tensor("reference_audio_latent") if entry.reference_audio_shape is not None else None
        return LatentSample(
            id=entry.id,
            video=fh.get_tensor("video_latent").float(),
            audio=audio,
            audio_valid_frames=entry.audio_valid_frames,
            text=TextContext(fh.get_tensor("text_video"), fh.get_tensor("text_audio"), fh.get_tensor("text_mask")),
            fps=entry.fps,
            video_loss_weight=entry.video_loss_weight,
            audio_loss_weight=entry.audio_loss_weight,
            audio_problem=entry.audio_problem,
            expects_audio=entry.has_audio or entry.audio_problem is not None,
            is_validation=entry.is_validation,
            text_features=features,
            reference_video=reference,
            reference_audio=reference_audio,
            audio_only=entry.audio_only,
        )


def manifest_entries(cache_dir: str | Path) -> list[CacheEntry]:
    return [CacheEntry.from_record(e, str(Path(cache_dir) / MANIFEST)) for e in read_manifest(cache_dir)["entries"]]


def load_training_samples(cache_dir: str | Path, *, expect_audio: bool, validation: bool = False) -> tuple[list[LatentSample], list[str]]:
    """Source-free training: samples from the manifest alone (repeats expanded). Invalid entries are
    never used: they are returned as problems (run ``cache`` again to re-encode them)."""
    samples, problems = [], []
    for entry in manifest_entries(cache_dir):
        if entry.is_validation != validation:
            continue
        entry_problems = validate_entry(cache_dir, entry, expect_audio)
        if entry_problems:
            problems.extend(entry_problems)
            continue
        sample = load_entry(cache_dir, entry)
        samples.extend([sample] * entry.repeats)
    return samples, problems


# ------------------------------------------------------------------------------------------------
# Building the cache
# ------------------------------------------------------------------------------------------------


@dataclass
class PreparedItem:
    """What the media layer hands the cache for one item (frames at the target fps and size, audio
    at 16 kHz stereo aligned to exactly those frames)."""

    frames: torch.Tensor | None  # uint8 [F, H, W, 3]; None for an audio source's item (its stand-in is cached)
    fps: float
    audio: torch.Tensor | None  # float32 [2, S] at 16 kHz
    audio_valid_samples: int
    audio_problem: str | None = None
    audio_only_frames: int = 0  # an audio source's item: the clip length in pixel frames


def prepare_for_cache(item, config: Config) -> PreparedItem:
    """Decode and time one dataset item with the media layer, as tensors for the encoders."""
    if getattr(item, "is_audio_only", False):
        sound = prepare_audio_only(item.media_path, config.dataset, audio_index=item.audio_stream)
        # The sound is all an audio-only item teaches: without voice supervision there is nothing to train.
        verdict = judge_clip_audio(sound.audio, sound.valid_samples, AUDIO_SAMPLE_RATE,
                                   AudioThresholds.from_dataset(config.dataset))
        if not verdict.supervises_voice:
            raise ValueError(f"{item.media_path}: {verdict.reason}; an audio-only item needs sound to train on: "
                             "replace or remove the file")
        return PreparedItem(frames=None, fps=sound.fps, audio=torch.from_numpy(np.ascontiguousarray(sound.audio)),
                            audio_valid_samples=sound.valid_samples, audio_only_frames=sound.frames)
    clip = prepare_item(item, config.dataset, seed=config.train.seed)
    audio = None if clip.audio is None else torch.from_numpy(np.ascontiguousarray(clip.audio))
    # prepare_clip raises MediaError for audio that exists but cannot be decoded; None means no audio stream.
    problem = "no audio stream" if audio is None and not item.is_image and config.dataset.with_audio else None
    if audio is not None:
        # The doctor's verdict on the same span: silent, near-silent or too little sound is no voice supervision.
        verdict = judge_clip_audio(clip.audio, clip.audio_valid_samples, clip.sample_rate,
                                   AudioThresholds.from_dataset(config.dataset))
        if not verdict.supervises_voice:
            audio, problem = None, verdict.reason
    return PreparedItem(frames=torch.from_numpy(np.ascontiguousarray(clip.frames)), fps=clip.fps, audio=audio,
                        audio_valid_samples=clip.audio_valid_samples if audio is not None else 0, audio_problem=problem)


def build_cache(
    config: Config,
    items: list,
    encoders,
    prepare: Callable[[object], PreparedItem],
    cache_dir: str | Path,
    *,
    on_item: Callable[[int, str], None] | None = None,
    warn: Callable[[str], None] = print,
    stop=None,
) -> CacheSummary:
    """Encode what changed, reuse what did not, drop what left the dataset. ``items`` are dataset
    items (``dataset.DatasetItem``); ``prepare`` decodes and times one item. Every finished entry is in the
    journal at once. ``stop`` (a ``training.stopping.StopRequest``: Ctrl-C, SIGTERM) is asked between items; a
    stopped run keeps what it finished and the entries it had not reached yet. One bad item fails only itself."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(cache_dir)
    old = {e["id"]: CacheEntry(**e) for e in read_manifest(cache_dir)["entries"]}
    expect_audio = config.dataset.with_audio
    encoder_fp = encoders.fingerprint()
    summary = CacheSummary(items=len(items))
    entries: dict[str, CacheEntry] = {}
    for index, item in enumerate(items):
        if stop is not None and stop.should_stop():
            summary.stopped_by = stop.reason
            break
        item_id = _item_id(item)
        entry = None
        try:
            fingerprint = _fingerprint(config, item, encoder_fp)
            previous = old.get(item_id)
            if previous is not None and previous.fingerprint == fingerprint:
                problems = validate_entry(cache_dir, previous, expect_audio)
                if not problems:
                    _refresh_weights(previous, item)
                    entry, note = previous, f"reused {item_id}"
                    summary.reused += 1
                else:
                    warn(f"cache entry for {item.media_path} is invalid and will be re-encoded: {'; '.join(problems)}")
                    summary.invalidated += 1
            elif previous is not None:
                summary.invalidated += 1
            if entry is None:
                _require_usable_caption(item)
                entry, note = _encode_item(config, item, item_id, fingerprint, encoders, prepare, cache_dir, summary), f"encoded {item_id}"
                _journal(cache_dir, entry)
        except ConfigError:
            raise  # a setting problem, not a bad file: stop and say so
        except Exception as exc:  # one bad file never stops the rest; it is named with its reason
            summary.failed += 1
            summary.failures.append({"path": str(item.media_path), "reason": str(exc), "kind": "item", "reused": False,
                                     "audio_expected": expect_audio and not getattr(item, "is_image", False)})
            warn(f"{item.media_path}: not cached: {exc}")
            note = f"failed {item_id}"
        if entry is not None:
            entries[item_id] = entry
            if expect_audio and not entry.has_audio and not getattr(item, "is_image", False):
                reason = entry.audio_problem or "no audio"
                summary.failures.append({"path": str(item.audio_path or item.media_path), "reason": f"audio: {reason}",
                                         "kind": "audio", "reused": note.startswith("reused"), "audio_expected": True})
                if not note.startswith("reused"):
                    warn(f"{item.audio_path or item.media_path}: audio not cached ({reason}); the clip trains audio-free")
        if on_item:
            on_item(index, note)
    # Items that every run should carry audio for and that have none now: failed items and audio-free entries.
    summary.audio_failed = sum(1 for f in summary.failures if f["audio_expected"])
    if summary.stopped_by is None:
        # Files of items that left the dataset are removed with their manifest entries (inside the folder only).
        keep = {e.file for e in entries.values()}
        for entry in old.values():
            if entry.file not in keep:
                entry_path(cache_dir, entry).unlink(missing_ok=True)
        final = list(entries.values())
    else:
        final = list(entries.values()) + [e for key, e in old.items() if key not in entries]
    atomic_write_json(cache_dir / MANIFEST, {"format": CACHE_FORMAT, "model_version": config.model.version,
                                              "encoder_fingerprint": encoder_fp, "entries": [asdict(e) for e in final]})
    (cache_dir / JOURNAL).unlink(missing_ok=True)  # folded into the manifest just written
    summary.entries = len(final)
    return summary


def _fingerprint(config: Config, item, encoder_fp: str) -> str:
    """Everything an entry depends on (inside the per-item error handling: a path that is no file fails its item)."""
    for path in (item.media_path, item.audio_path):
        if path is not None and not Path(path).is_file():
            raise ValueError(f"{path} is not a file (a folder or missing): point the dataset at media files")
    return entry_fingerprint(
        {
            "format": CACHE_FORMAT,
            "media": content_hash(item.media_path),
            "audio": content_hash(item.audio_path) if item.audio_path else None,
            "encoders": encoder_fp,
            "model_version": config.model.version,
            "caption": item.caption,
            "geometry": [config.dataset.width, config.dataset.height, config.dataset.frames, config.dataset.frame_buckets,
                         config.dataset.resolution_buckets, config.dataset.crop, config.dataset.allow_upscale]
            # A random crop is drawn from the seed: another seed is another crop.
            + ([config.train.seed] if config.dataset.crop == "random" else []),
            "timing": [config.dataset.target_fps, getattr(item, "fps_override", 0.0), getattr(config.dataset, "retime", "resample")],
            "audio_params": [AUDIO_SAMPLE_RATE, 2, config.dataset.with_audio, getattr(item, "audio_stream", 0)],
            # The audio verdict decides whether a clip's sound is cached as supervision.
            "audio_verdict": dataclasses.astuple(AudioThresholds.from_dataset(config.dataset)),
            "video_dtype": config.cache.video_dtype,
            # Connector training needs the connectors' inputs cached too.
            "text_features": config.network.connectors != "off",
            **_mode_fingerprint(item, config),
        }
    )


def _require_usable_caption(item) -> None:
    """A caption that cannot be read as text (binary, not UTF-8) fails its item: it would be encoded as garbage."""
    problem = getattr(item, "caption_error", None)
    if problem:
        raise ValueError(problem)


def _mode_fingerprint(item, config: Config) -> dict:
    """The training modes' parts of an entry's fingerprint: only present when used, so the entries of plain
    datasets keep their fingerprints."""
    d = config.dataset
    parts: dict = {}
    if getattr(item, "is_audio_only", False):
        parts["audio_only"] = True
    reference = getattr(item, "reference_path", None)
    if reference is not None:
        parts["reference"] = [content_hash(reference), d.reference_frames, d.reference_downscale]
    reference_audio = getattr(item, "reference_audio_path", None)
    if reference_audio is not None and d.with_audio:
        parts["reference_audio"] = [content_hash(reference_audio), getattr(item, "reference_audio_stream", 0),
                                    d.reference_audio_seconds]
    return parts


def _item_id(item) -> str:
    digest = hashlib.sha1(str(Path(item.media_path).resolve()).encode()).hexdigest()[:10]
    return f"{Path(item.media_path).stem}-{digest}"


def _refresh_weights(entry: CacheEntry, item) -> None:
    """Loss weights, repeats and the validation flag do not change latents: update them in place."""
    entry.video_loss_weight = item.video_loss_weight
    entry.audio_loss_weight = item.audio_loss_weight
    entry.repeats = item.repeats
    entry.is_validation = item.is_validation


def _text_with_features(encoders, caption: str):
    """Context and the connectors' inputs (for connector training) from the headless text encoder."""
    from ..backends.text_connectors import capture_text_features

    text = getattr(encoders, "text", None)
    if not (hasattr(text, "tokenize") and hasattr(text, "hidden_states") and hasattr(text, "connectors")):
        raise ConfigError("network.connectors needs the headless text encoder (Gemma + the model's text connectors); "
                          "in ComfyUI the connectors run inside the text encoder and cannot be trained: set it to \"off\"")
    tokens = text.tokenize([caption])
    return capture_text_features(text.connectors, text.hidden_states(tokens), tokens.attention_mask)


@torch.no_grad()
def _encode_item(config, item, item_id, fingerprint, encoders, prepare, cache_dir, summary) -> CacheEntry:
    prepared = prepare(item)
    if prepared.frames is None:  # an audio source's item: the stand-in ComfyUI's audio generation path uses
        video_latent = standin_video_latent(prepared.audio_only_frames).to(VIDEO_DTYPES[config.cache.video_dtype])
    else:
        frames = prepared.frames.permute(3, 0, 1, 2).float().div(127.5).sub(1.0)[None]  # [1, 3, F, H, W] in [-1, 1]
        video_latent = encoders.encode_video(frames)[0].to(VIDEO_DTYPES[config.cache.video_dtype]).cpu()
    tensors = {"video_latent": video_latent}
    tensors.update(_encode_references(config, item, prepared, encoders))
    if config.network.connectors != "off":
        features, text = _text_with_features(encoders, item.caption)
        # LTX-2.0 feeds both connectors the same tensor: store two copies (safetensors refuses shared memory).
        tensors.update(features_video=features.video[0].float().cpu().clone(), features_audio=features.audio[0].float().cpu().clone(),
                       features_mask=features.mask[0].cpu())
    else:
        text = encoders.encode_text([item.caption])
    tensors.update(text_video=text.video[0].cpu(), text_audio=text.audio[0].cpu(), text_mask=text.mask[0].cpu())
    has_audio, valid_frames, audio_shape, audio_problem = False, 0, None, prepared.audio_problem
    if config.dataset.with_audio and prepared.audio is not None:
        encoded = encoders.encode_audio_padded(prepared.audio[None].float(), [prepared.audio_valid_samples])
        audio_latent = encoded.latents[0].float().cpu()
        valid_frames = int(encoded.valid_frames[0])
        if not torch.isfinite(audio_latent).all():
            audio_problem = "the audio encoder produced non-finite values"
        else:
            tensors["audio_latent"] = audio_latent
            tensors["audio_valid_frames"] = torch.tensor(valid_frames, dtype=torch.int64)
            has_audio, audio_shape = True, list(audio_latent.shape)
    file = f"{item_id}.safetensors"
    save_safetensors_atomic(tensors, cache_dir / file, metadata={"fingerprint": fingerprint, "has_audio": str(has_audio)})
    # Counted once the entry is on disk, so the totals never claim an entry that failed to save.
    summary.video_encoded += 1
    if has_audio:
        summary.audio_encoded += 1
    return CacheEntry(
        id=item_id, file=file, fingerprint=fingerprint, media=str(item.media_path), caption=item.caption,
        has_audio=has_audio, audio_valid_frames=valid_frames, fps=float(prepared.fps), video_shape=list(video_latent.shape),
        audio_shape=audio_shape, video_loss_weight=item.video_loss_weight, audio_loss_weight=item.audio_loss_weight,
        repeats=item.repeats, is_validation=item.is_validation, audio_problem=audio_problem if not has_audio else None,
        audio_only=prepared.frames is None,
        reference_shape=list(tensors["reference_video_latent"].shape) if "reference_video_latent" in tensors else None,
        reference_audio_shape=list(tensors["reference_audio_latent"].shape) if "reference_audio_latent" in tensors else None,
    )


def _encode_references(config: Config, item, prepared: PreparedItem, encoders) -> dict[str, torch.Tensor]:
    """The item's IC-LoRA reference (sized to 1/reference_downscale of the clip) and ID-LoRA reference audio, encoded
    with the same encoders as the clip. A reference that cannot be decoded fails the item (named with the reason)."""
    tensors = {}
    reference = getattr(item, "reference_path", None)
    if reference is not None and prepared.frames is not None:
        height, width = prepared.frames.shape[1:3]
        frames = prepare_reference(reference, config.dataset, width, height, seed=config.train.seed)
        pixels = torch.from_numpy(frames).permute(3, 0, 1, 2).float().div(127.5).sub(1.0)[None]
        tensors["reference_video_latent"] = encoders.encode_video(pixels)[0].to(VIDEO_DTYPES[config.cache.video_dtype]).cpu()
    reference_audio = getattr(item, "reference_audio_path", None)
    if reference_audio is not None and config.dataset.with_audio:
        waveform = prepare_reference_audio(reference_audio, config.dataset, getattr(item, "reference_audio_stream", 0))
        latent = encoders.encode_audio(torch.from_numpy(waveform)[None].float())[0].float().cpu()
        if not torch.isfinite(latent).all():
            raise ValueError(f"reference audio {reference_audio}: the audio encoder produced non-finite values")
        tensors["reference_audio_latent"] = latent
    return tensors
