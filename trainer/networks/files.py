"""Adapter files: every network type in the keys ComfyUI loads, with the run's metadata.

Keys are ``diffusion_model.<reference module path><suffix>``; the suffixes per type are those
``comfy.weight_adapter`` reads: lora ``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``; dora the same
plus ``.dora_scale`` ``[1, in]``; lokr ``.lokr_w1`` and ``.lokr_w2`` or ``.lokr_w2_a`` / ``.lokr_w2_b`` plus
``.alpha``; loha ``.hada_w1_a`` / ``.hada_w1_b`` / ``.hada_w2_a`` / ``.hada_w2_b`` plus ``.alpha``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from ..export import KEY_PREFIX, METADATA_PREFIX, SAVE_DTYPES, module_group
from ..io_utils import save_safetensors_atomic
from .layers import FILE_SUFFIXES

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


def read_adapter_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file not found: {path}")
    with safe_open(str(path), framework="pt") as fh:
        metadata = fh.metadata() or {}
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
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
