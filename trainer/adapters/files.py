"""Adapter files: every network type in keys ComfyUI, diffusers and ltx-core load, with the run's metadata.

Keys are ``diffusion_model.<reference module path><suffix>``. LoRA and DoRA follow ``output.lora_format``
(``formats.py`` says which runtime loads which): ``lora_ab`` (default) ``.lora_A.weight`` / ``.lora_B.weight``
with alpha/rank folded into lora_B, the one layout ComfyUI, diffusers and ltx-core apply identically;
``down_up`` ``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` (ComfyUI only). DoRA adds ``.dora_scale``
``[1, in]``; LoKr writes ``.lokr_w1`` and ``.lokr_w2`` or ``.lokr_w2_a`` / ``.lokr_w2_b`` plus ``.alpha``; LoHa
``.hada_w1_a`` / ``.hada_w1_b`` / ``.hada_w2_a`` / ``.hada_w2_b`` plus ``.alpha`` (the suffixes
``comfy.weight_adapter`` reads; only ComfyUI applies those three types).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from ..io_utils import save_safetensors_atomic
from .formats import GROUPS, METADATA_PREFIX, export_tensors, module_group

__all__ = ["GROUPS", "METADATA_PREFIX", "SAVE_DTYPES", "module_group", "read_adapter_file", "save_network"]

SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

def save_network(network, path: str | Path, *, config_json: str, base_fingerprint: str, step: int, version: str,
                 dtype: str = "bfloat16", lora_format: str = "lora_ab", extra_metadata: dict[str, str] | None = None) -> Path:
    """Write the network's tensors (keys of ``lora_format``) and the run's metadata atomically. ``extra_metadata``:
    keys other readers look for (the training mode's, e.g. ``reference_downscale_factor`` for ComfyUI's IC-LoRA
    nodes)."""
    path = Path(path)
    net = network.net_config
    folded = lora_format == "lora_ab" and net.type in ("lora", "dora")
    metadata = {
        METADATA_PREFIX + "config": config_json,
        METADATA_PREFIX + "base_fingerprint": base_fingerprint,
        METADATA_PREFIX + "step": str(step),
        METADATA_PREFIX + "model_version": version,
        METADATA_PREFIX + "network_type": net.type,
        METADATA_PREFIX + "groups": json.dumps(sorted({module_group(p) for p, _ in network.named_layers()})),
        METADATA_PREFIX + "lora_format": lora_format,
        "ss_network_dim": str(net.rank),
        # With alpha/rank folded into lora_B the file applies at alpha = rank.
        "ss_network_alpha": str(net.rank if folded else net.alpha),
        "modelspec.architecture": f"ltx-2{'.3' if version == '2.3' else ''}/{'lora' if net.type == 'lora' else 'lycoris-' + net.type}",
        **(extra_metadata or {}),
    }
    tensors = export_tensors(network.module_tensors(), lora_format, SAVE_DTYPES[dtype])
    save_safetensors_atomic(tensors, path, metadata=metadata)
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
