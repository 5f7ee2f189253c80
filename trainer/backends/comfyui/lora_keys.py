"""Which keys of an adapter file ComfyUI's own LoRA loader applies to a MODEL (what LoraLoaderModelOnly does)."""

from __future__ import annotations

import torch

from .denoiser import ltxav_diffusion_model


def keys_comfyui_applies(model_patcher, tensors: dict[str, torch.Tensor]) -> tuple[set[str], list[str]]:
    """Load ``tensors`` (an adapter file's) with ComfyUI's key map onto a clone of the MODEL: (the module paths
    that received a patch, the file keys ComfyUI leaves unloaded).

    ``model_lora_keys_unet`` maps LoRA key prefixes to model weights, ``load_lora`` builds the patches,
    ``add_patches`` returns the model keys that received one. A file key is consumed when it belongs to a
    mapped prefix (``<prefix>.lora_up.weight``, ``<prefix>.alpha``, ...) whose weight was patched; every
    other key is what ComfyUI leaves unloaded. The MODEL itself is not changed.
    """
    import comfy.lora

    ltxav_diffusion_model(model_patcher)
    key_map = comfy.lora.model_lora_keys_unet(model_patcher.model, {})
    patches = comfy.lora.load_lora(tensors, key_map, log_missing=False)
    applied = {_target_key(k) for k in model_patcher.clone().add_patches(patches)}
    prefix_target = {prefix: _target_key(target) for prefix, target in key_map.items()}
    unloaded = sorted(key for key in tensors if prefix_target.get(_lora_prefix(key, prefix_target)) not in applied)
    modules = {key.removeprefix("diffusion_model.").rsplit(".", 1)[0] for key in applied}
    return modules, unloaded


def _target_key(target) -> str:
    return target if isinstance(target, str) else target[0]  # (key, offset[, function]) for split weights


def _lora_prefix(key: str, prefixes: dict) -> str | None:
    """The longest mapped prefix ``p`` with ``key == p + "." + suffix``."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        candidate = ".".join(parts[:cut])
        if candidate in prefixes:
            return candidate
    return None
