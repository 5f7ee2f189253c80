"""Stable fingerprints of models and tokenizers (cache invalidation, LoRA metadata, resume checks).

The checksum reads every bit of every weight, computed where the weights live (no copy of a 24 GB
model to the CPU), so a single changed element changes the fingerprint.
"""

from __future__ import annotations

import hashlib
import json
from typing import Iterable

import torch
from torch import nn

_CHECKSUM_CHUNK = 1 << 22
_POSITION_MODULUS = 251


def tensor_checksum(tensor: torch.Tensor) -> int:
    """Exact checksum of a tensor's bits, computed where the tensor lives (no copy of a 24 GB model
    to the CPU): Σ (bits_i + 1)·(i mod 251 + 1) over the raw integer bit patterns. Integer sums do
    not depend on reduction order, so CPU and GPU give the same value; any single changed element
    changes it (the term difference is non-zero and far below 2^63)."""
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.numel() == 0:
        return 0
    itemsize = flat.element_size()
    bit_view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int32}.get(itemsize)
    if bit_view is None:
        raise TypeError(f"cannot checksum a tensor of dtype {tensor.dtype}")
    bits = flat.view(bit_view)  # 8-byte elements become two 32-bit words
    unsigned_mask = (1 << (8 * bits.element_size())) - 1
    total = 0
    for start in range(0, bits.numel(), _CHECKSUM_CHUNK):
        chunk = bits[start : start + _CHECKSUM_CHUNK].to(torch.int64) & unsigned_mask
        positions = torch.arange(start, start + chunk.numel(), device=chunk.device, dtype=torch.int64)
        weights = positions % _POSITION_MODULUS + 1
        total = (total + int(((chunk + 1) * weights).sum())) % (1 << 64)
    return total


def weights_digest(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(named_tensors, key=lambda item: item[0]):
        h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|{tensor_checksum(tensor)}\n".encode())
    return h.hexdigest()


def module_fingerprint(module: nn.Module) -> str:
    """Class, config (without paths and library versions) and the exact checksum of every weight."""
    h = hashlib.sha256(type(module).__name__.encode())
    h.update(json.dumps(_config_dict(module), sort_keys=True, default=str).encode())
    h.update(weights_digest(module.state_dict().items()).encode())
    return h.hexdigest()[:16]


def tokenizer_digest(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        # Tokenizing with padding/truncation records those settings in the backend: they say
        # nothing about the vocabulary, and must not change the fingerprint after first use.
        spec.pop("padding", None)
        spec.pop("truncation", None)
        text = json.dumps(spec, sort_keys=True)
    else:
        text = json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _config_dict(module: nn.Module) -> dict:
    config = getattr(module, "config", None)
    if config is None:
        return {}
    return _without_volatile_keys(config.to_dict() if hasattr(config, "to_dict") else dict(config))


def _without_volatile_keys(config: dict) -> dict:
    # Paths, library versions and the load dtype say nothing about the weights (their dtype is hashed
    # with every tensor); leaving them out keeps a saved-then-loaded model's fingerprint unchanged.
    ignored = ("transformers_version", "name_or_path", "dtype", "torch_dtype")
    return {
        k: _without_volatile_keys(v) if isinstance(v, dict) else v
        for k, v in config.items()
        if not str(k).startswith("_") and k not in ignored
    }
