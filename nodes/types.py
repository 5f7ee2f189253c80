"""The pack's custom ComfyUI types, what their values hold, and the small conversions between ComfyUI
values (AUDIO, IMAGE, folders) and the trainer's.

Custom socket types (``io.Custom``), each a plain dict so a workflow can inspect it:

- ``LTX2AV_DATASET``: ``DatasetConfig`` as a dict (``dataclasses.asdict``);
- ``LTX2AV_CACHE``: ``{"cache_dir", "config", "summary"}``; ``config`` is the full ``Config.to_dict()`` the
  cache was built with, ``summary`` the cache report (totals, failures, warnings, previews);
- ``LTX2AV_CONFIG``: the full ``Config.to_dict()``;
- ``LTX2AV_LORA``: ``{"path", "step", "run_dir", "groups", "config"}``.

ComfyUI values: ``AUDIO`` is ``{"waveform": [B, C, S] float, "sample_rate": int}``; ``IMAGE`` is
``[N, H, W, 3]`` float in [0, 1] (one row per video frame).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from comfy_api.latest import io

CATEGORY = "LTX-2 AV Trainer"
CATEGORY_DATA = CATEGORY + "/data"
CATEGORY_TRAIN = CATEGORY + "/train"
CATEGORY_CHECK = CATEGORY + "/check"

DatasetType = io.Custom("LTX2AV_DATASET")
CacheType = io.Custom("LTX2AV_CACHE")
ConfigType = io.Custom("LTX2AV_CONFIG")
LoRAType = io.Custom("LTX2AV_LORA")

CACHE_KEYS = ("cache_dir", "config", "summary")
LORA_KEYS = ("path", "step", "run_dir", "groups", "config")

# Subfolders of ComfyUI's output folder.
CACHE_ROOT = "ltx2av_cache"
RUNS_ROOT = "ltx2av_runs"


# ---- payload checks ------------------------------------------------------------------------------


def require_payload(value: Any, keys: tuple[str, ...], type_name: str, producer: str) -> dict:
    """The dict a custom socket carries, or a clear error when something else was connected."""
    if not isinstance(value, dict) or any(key not in value for key in keys):
        found = sorted(value) if isinstance(value, dict) else type(value).__name__
        raise ValueError(f"expected an {type_name} value from the {producer} node (keys {', '.join(keys)}), got {found}")
    return value


def cache_payload(value: Any) -> dict:
    return require_payload(value, CACHE_KEYS, "LTX2AV_CACHE", "LTX2AV Cache Latents")


def lora_payload(value: Any) -> dict:
    return require_payload(value, LORA_KEYS, "LTX2AV_LORA", "LTX2AV Train LoRA")


# ---- names and folders ---------------------------------------------------------------------------

_UNSAFE = re.compile(r"[\\/:*?\"<>|\x00-\x1f]")


def safe_name(name: str, what: str) -> str:
    """A single file or folder name that cannot leave the folder it is joined to: no path separators, no
    '..', no drive letters or control characters. Errors name the input and the fix."""
    cleaned = name.strip()
    if not cleaned:
        raise ValueError(f"{what} is empty; give a plain name such as 'my_character'")
    if cleaned in (".", "..") or ".." in cleaned or _UNSAFE.search(cleaned):
        raise ValueError(
            f"{what} {name!r} must be a plain name without path separators, '..', ':' or control characters "
            "(it is created inside ComfyUI's folder and may not point elsewhere)"
        )
    return cleaned


def output_subfolder(root: str, name: str, what: str) -> Path:
    """``<ComfyUI output>/<root>/<name>`` for a user-chosen ``name`` (checked by ``safe_name``)."""
    import folder_paths

    return Path(folder_paths.get_output_directory()) / root / safe_name(name, what)


# ---- what nodes may read ---------------------------------------------------------------------------------

# A server-side setting only: the environment of the process that starts ComfyUI. A remote client can change
# ComfyUI's settings and user files, but not this.
DATASET_ROOTS_ENV = "LTX2AV_DATASET_ROOTS"


def readable_roots() -> list[Path]:
    """The folders nodes may read media from: ComfyUI's input folder, the pack's cache and run folders under
    ComfyUI's output folder, and the folders the server's owner listed in ``LTX2AV_DATASET_ROOTS``."""
    import folder_paths

    output = Path(folder_paths.get_output_directory())
    roots = [Path(folder_paths.get_input_directory()), output / CACHE_ROOT, output / RUNS_ROOT]
    extra = os.environ.get(DATASET_ROOTS_ENV, "")
    roots += [Path(entry.strip()).expanduser() for entry in extra.split(os.pathsep) if entry.strip()]
    return [Path(os.path.abspath(root)) for root in roots]


def is_readable(path: Path) -> bool:
    """Whether ``path`` (made absolute, '..' resolved by name) lies in one of ``readable_roots``. Links inside a
    root are followed: only the server's owner can place them there."""
    absolute = Path(os.path.abspath(path))
    return any(absolute == root or root in absolute.parents for root in readable_roots())


def outside_roots_message(what: str, given: str, path: Path) -> str:
    import folder_paths

    return (f"{what} {given!r} ({path}) is outside the folders ComfyUI nodes may read: ComfyUI's input folder "
            f"({folder_paths.get_input_directory()}) and output/{CACHE_ROOT}, output/{RUNS_ROOT}. Put the files in "
            f"ComfyUI's input folder, or let the server read that folder: start ComfyUI with the environment "
            f"variable {DATASET_ROOTS_ENV}=<folder> (several separated by '{os.pathsep}'); see the README, "
            "\"Datasets outside ComfyUI's input folder\"")


def resolve_input_path(path: str, what: str, relative_to: list[Path] | None = None) -> Path:
    """A user-given path, confined to ``readable_roots``. A relative path is read from the first of
    ``relative_to`` (default: ComfyUI's input folder) where it exists."""
    import folder_paths

    raw = path.strip()
    if not raw:
        raise ValueError(f"{what} is empty; give a path relative to ComfyUI's input folder")
    candidate = Path(raw).expanduser()
    if not candidate.is_absolute():
        bases = relative_to or [Path(folder_paths.get_input_directory())]
        candidate = next((base / candidate for base in bases if (base / candidate).exists()), bases[0] / candidate)
    candidate = Path(os.path.abspath(candidate))
    if not is_readable(candidate):
        raise ValueError(outside_roots_message(what, raw, candidate))
    return candidate


def file_state(path: Path) -> tuple:
    """(size, modification time) of a file, or ("absent",): what changes when the file is replaced or edited."""
    try:
        stat = path.stat()
    except OSError:
        return ("absent",)
    return (stat.st_size, stat.st_mtime_ns)


# ---- AUDIO and IMAGE -----------------------------------------------------------------------------


def audio_value(waveform: torch.Tensor | np.ndarray, sample_rate: int) -> dict:
    """ComfyUI AUDIO from ``[C, S]`` or ``[B, C, S]`` samples."""
    tensor = torch.as_tensor(np.ascontiguousarray(waveform) if isinstance(waveform, np.ndarray) else waveform)
    tensor = tensor.detach().float().cpu()
    if tensor.ndim == 2:
        tensor = tensor[None]
    if tensor.ndim != 3:
        raise ValueError(f"audio must be [channels, samples] or [batch, channels, samples], got {tuple(tensor.shape)}")
    return {"waveform": tensor, "sample_rate": int(sample_rate)}


def image_batch(frames: torch.Tensor) -> torch.Tensor:
    """Trainer frames ``[3, F, H, W]`` in [-1, 1] → ComfyUI IMAGE ``[F, H, W, 3]`` in [0, 1]."""
    if frames.ndim != 4 or frames.shape[0] != 3:
        raise ValueError(f"video frames must be [3, F, H, W], got {tuple(frames.shape)}")
    return ((frames.float().clamp(-1, 1) + 1) / 2).permute(1, 2, 3, 0).contiguous().cpu()
