"""Adapter files: every network type in the keys ComfyUI loads, with the run's metadata.

Keys are ``diffusion_model.<reference module path><suffix>``; the suffixes per type are those
``comfy.weight_adapter`` reads: lora ``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``; dora the same
plus ``.dora_scale`` ``[1, in]``; lokr ``.lokr_w1`` and ``.lokr_w2`` or ``.lokr_w2_a`` / ``.lokr_w2_b`` plus
``.alpha``; loha ``.hada_w1_a`` / ``.hada_w1_b`` / ``.hada_w2_a`` / ``.hada_w2_b`` plus ``.alpha``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from ..io_utils import save_safetensors_atomic
from .layers import FILE_SUFFIXES

KEY_PREFIX = "diffusion_model."
METADATA_PREFIX = "ltx2_av_trainer."
SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Module groups: verify counts applied modules per group, and a file's metadata lists the groups it trains.
GROUPS = ("video_attn", "audio_attn", "a2v", "v2a", "video_ff", "audio_ff", "connector", "other")
_GROUP_RULES = [
    ("connector", re.compile(r"(^|\.)(video|audio)_embeddings_connector\.")),
    ("a2v", re.compile(r"(^|\.)audio_to_video_attn\.")),
    ("v2a", re.compile(r"(^|\.)video_to_audio_attn\.")),
    ("audio_attn", re.compile(r"(^|\.)audio_attn[12]\.")),
    ("video_attn", re.compile(r"(^|\.)attn[12]\.")),
    ("audio_ff", re.compile(r"(^|\.)audio_ff\.")),
    ("video_ff", re.compile(r"(^|\.)ff\.")),
]


def module_group(path: str) -> str:
    for group, rule in _GROUP_RULES:
        if rule.search(path):
            return group
    return "other"


_ALL_SUFFIXES = sorted({s for suffixes in FILE_SUFFIXES.values() for s in suffixes}, key=len, reverse=True)
_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.")


def save_network(network, path: str | Path, *, config_json: str, base_fingerprint: str, step: int, version: str,
                 dtype: str = "bfloat16") -> Path:
    """Write the network's tensors (ComfyUI keys) and the run's metadata atomically."""
    path = Path(path)
    net = network.net_config
    metadata = {
        METADATA_PREFIX + "config": config_json,
        METADATA_PREFIX + "base_fingerprint": base_fingerprint,
        METADATA_PREFIX + "step": str(step),
        METADATA_PREFIX + "model_version": version,
        METADATA_PREFIX + "network_type": net.type,
        METADATA_PREFIX + "groups": json.dumps(sorted({module_group(p) for p, _ in network.named_layers()})),
        "ss_network_dim": str(net.rank),
        "ss_network_alpha": str(net.alpha),
        "modelspec.architecture": f"ltx-2{'.3' if version == '2.3' else ''}/{'lora' if net.type == 'lora' else 'lycoris-' + net.type}",
    }
    save_safetensors_atomic(network.file_tensors(KEY_PREFIX, SAVE_DTYPES[dtype]), path, metadata=metadata)
    return path


class AdapterFileError(ValueError):
    """A file that is not an adapter file at all (empty, not safetensors); the message says so in plain words."""


def read_adapter_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file not found: {path}")
    if path.stat().st_size == 0:
        raise AdapterFileError(f"{path} is empty (0 bytes): it is not a LoRA file; train or copy it again")
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception:  # safetensors' own errors ("header too large", ...) name no file and no fix
        raise AdapterFileError(f"{path} is not a safetensors LoRA file (its header cannot be read: another format, "
                               "or a truncated copy). Give the .safetensors file the trainer wrote") from None
    return tensors, metadata


def split_adapter_key(key: str) -> tuple[str, str] | None:
    """'diffusion_model.a.b.lokr_w2_a' → ('a.b', '.lokr_w2_a'); None if not an adapter tensor key."""
    for suffix in _ALL_SUFFIXES:
        if key.endswith(suffix):
            module = key[: -len(suffix)]
            for prefix in _PREFIXES:
                if module.startswith(prefix):
                    return module[len(prefix):], suffix
            return module, suffix
    return None


def group_file_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Reference module path → {suffix: tensor}."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        parsed = split_adapter_key(key)
        if parsed is not None:
            grouped.setdefault(parsed[0], {})[parsed[1]] = tensor
    return grouped
