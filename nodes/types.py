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


def resolve_input_path(path: str, what: str) -> Path:
    """A user-given path; a relative one is read from ComfyUI's input folder."""
    import folder_paths

    raw = path.strip()
    if not raw:
        raise ValueError(f"{what} is empty; give an absolute path or one relative to ComfyUI's input folder")
    candidate = Path(raw).expanduser()
    if not candidate.is_absolute():
        candidate = Path(folder_paths.get_input_directory()) / candidate
    return candidate


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
