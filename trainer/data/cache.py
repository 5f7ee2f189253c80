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
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors import safe_open

from ..backends.interface import AUDIO_SAMPLE_RATE, TextContext
from ..config import Config, ConfigError
from ..io_utils import atomic_write_json, remove_stale_temporaries, save_safetensors_atomic
from .audio_only import prepare_audio_only, standin_video_latent
from .batches import LatentSample
from .media.timing import prepare_item
from .reference_media import prepare_reference, prepare_reference_audio

CACHE_FORMAT = 1
MANIFEST = "manifest.json"
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


@dataclass
class CacheSummary:
    video_encoded: int = 0
    audio_encoded: int = 0
    audio_failed: int = 0
    reused: int = 0
    invalidated: int = 0
    failed: int = 0
    failures: list[dict] = field(default_factory=list)  # {path, reason}
    entries: int = 0

    def totals(self) -> dict:
        return {k: getattr(self, k) for k in ("video_encoded", "audio_encoded", "audio_failed", "reused", "invalidated")}

    def console_line(self) -> str:
        return f"Audio latent caching: {self.audio_encoded} encoded, {self.audio_failed} failed"

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
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        return {"format": CACHE_FORMAT, "entries": []}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: the cache manifest is not valid JSON ({exc}); delete it to rebuild the cache") from None
    if manifest.get("format") != CACHE_FORMAT:
        return {"format": CACHE_FORMAT, "entries": []}  # an older layout: everything is re-encoded
    return manifest


def validate_entry(cache_dir: str | Path, entry: CacheEntry, expect_audio: bool) -> list[str]:
    """Problems with one cached file, read from its header and tensors; empty when it can be used."""
    path = Path(cache_dir) / entry.file
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

    path = Path(cache_dir) / entry.file
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
    return [CacheEntry(**e) for e in read_manifest(cache_dir)["entries"]]


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
        return PreparedItem(frames=None, fps=sound.fps, audio=torch.from_numpy(np.ascontiguousarray(sound.audio)),
                            audio_valid_samples=sound.valid_samples, audio_only_frames=sound.frames)
    clip = prepare_item(item, config.dataset, seed=config.train.seed)
    audio = None if clip.audio is None else torch.from_numpy(np.ascontiguousarray(clip.audio))
    # prepare_clip raises MediaError for audio that exists but cannot be decoded; None means no audio stream.
    problem = "no audio stream" if audio is None and not item.is_image and config.dataset.with_audio else None
    return PreparedItem(frames=torch.from_numpy(np.ascontiguousarray(clip.frames)), fps=clip.fps, audio=audio,
                        audio_valid_samples=clip.audio_valid_samples, audio_problem=problem)


def build_cache(
    config: Config,
    items: list,
    encoders,
    prepare: Callable[[object], PreparedItem],
    cache_dir: str | Path,
    *,
    on_item: Callable[[int, str], None] | None = None,
    warn: Callable[[str], None] = print,
) -> CacheSummary:
    """Encode what changed, reuse what did not, drop what left the dataset. ``items`` are dataset
    items (``dataset.DatasetItem``); ``prepare`` decodes and times one item."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(cache_dir)
    old = {e["id"]: CacheEntry(**e) for e in read_manifest(cache_dir)["entries"]}
    expect_audio = config.dataset.with_audio
    encoder_fp = encoders.fingerprint()
    summary = CacheSummary()
    entries: list[CacheEntry] = []
    for index, item in enumerate(items):
        item_id = _item_id(item)
        fingerprint = entry_fingerprint(
            {
                "format": CACHE_FORMAT,
                "media": content_hash(item.media_path),
                "audio": content_hash(item.audio_path) if item.audio_path else None,
                "encoders": encoder_fp,
                "model_version": config.model.version,
                "caption": item.caption,
                "geometry": [config.dataset.width, config.dataset.height, config.dataset.frames, config.dataset.frame_buckets,
                             config.dataset.resolution_buckets, config.dataset.crop, config.dataset.allow_upscale],
                "timing": [config.dataset.target_fps, getattr(item, "fps_override", 0.0), getattr(config.dataset, "retime", "resample")],
                "audio_params": [AUDIO_SAMPLE_RATE, 2, expect_audio, getattr(item, "audio_stream", 0)],
                "video_dtype": config.cache.video_dtype,
                # Connector training needs the connectors' inputs cached too.
                "text_features": config.network.connectors != "off",
                **_mode_fingerprint(item, config),
            }
        )
        previous = old.get(item_id)
        if previous is not None and previous.fingerprint == fingerprint:
            problems = validate_entry(cache_dir, previous, expect_audio)
            if not problems:
                _refresh_weights(previous, item)
                entries.append(previous)
                summary.reused += 1
                if on_item:
                    on_item(index, f"reused {item_id}")
                continue
            warn(f"cache entry for {item.media_path} is invalid and will be re-encoded: {'; '.join(problems)}")
            summary.invalidated += 1
        elif previous is not None:
            summary.invalidated += 1
        try:
            entry = _encode_item(config, item, item_id, fingerprint, encoders, prepare, cache_dir, summary, warn)
        except ConfigError:
            raise  # a setting problem, not a bad file: stop and say so
        except Exception as exc:  # one bad file never stops the rest; it is named with its reason
            summary.failed += 1
            if expect_audio:
                summary.audio_failed += 1
            summary.failures.append({"path": str(item.media_path), "reason": str(exc)})
            warn(f"{item.media_path}: not cached: {exc}")
            if on_item:
                on_item(index, f"failed {item_id}")
            continue
        entries.append(entry)
        if on_item:
            on_item(index, f"encoded {item_id}")
    # Files of items that left the dataset are removed with their manifest entries.
    keep = {e.file for e in entries}
    for entry in old.values():
        if entry.file not in keep:
            (cache_dir / entry.file).unlink(missing_ok=True)
    atomic_write_json(cache_dir / MANIFEST, {"format": CACHE_FORMAT, "model_version": config.model.version,
                                              "encoder_fingerprint": encoder_fp, "entries": [asdict(e) for e in entries]})
    summary.entries = len(entries)
    return summary


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
def _encode_item(config, item, item_id, fingerprint, encoders, prepare, cache_dir, summary, warn) -> CacheEntry:
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
    elif config.dataset.with_audio and not getattr(item, "is_image", False):
        summary.audio_failed += 1
        reason = audio_problem or "no audio"
        summary.failures.append({"path": str(item.audio_path or item.media_path), "reason": f"audio: {reason}"})
        warn(f"{item.audio_path or item.media_path}: audio not cached ({reason}); the clip trains video only")
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
