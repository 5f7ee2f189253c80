"""Stable fingerprints of models and tokenizers (cache invalidation, LoRA metadata, resume checks).

Two kinds. ``module_fingerprint`` / ``weights_digest`` read every bit of every weight, computed where the
weights live (no copy of a 24 GB model to the CPU), so a single changed element changes the fingerprint; the
headless backends use them (a few seconds per billion parameters on a CPU).

``weights_identity`` is what the ComfyUI backend uses on the models a loader holds, where reading all of a
19B model at every queue would take minutes: the state dict's keys, shapes and dtypes, the sizes of the files
the loader read, and a fixed sample of ``SAMPLES_PER_TENSOR`` values of every tensor (their raw bits). Any
other checkpoint (another seed, a fine-tune, a merge, another precision) differs in all of these at once; a
change confined to elements the sample skips goes unnoticed, which is the price of not reading 19B values.
File names, paths and modification times are left out on purpose: moving or renaming a model file must not
orphan a run or a cache. ``remembered`` keeps such an identity per model object, so it is computed once
per loaded model, not once per queue.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import weakref
from typing import Callable, Iterable

import numpy as np
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
    h.update(json.dumps(config_dict(module), sort_keys=True, default=str).encode())
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


def config_dict(module: nn.Module) -> dict:
    """A module's ``config`` as a dict without paths, library versions or the load dtype (empty without one)."""
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


# ---- cheap identity of loaded weights (ComfyUI) ------------------------------------------------------------

SAMPLES_PER_TENSOR = 64
_BIT_VIEWS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _stored(tensor: torch.Tensor) -> tuple[torch.Tensor, str]:
    """The plain tensor holding a weight's values and a description of its storage. ComfyUI's quantised
    weights (comfy_kitchen ``QuantizedTensor``) keep their values in ``_qdata`` and describe the format in
    ``_layout_cls``."""
    qdata = getattr(tensor, "_qdata", None)
    if isinstance(qdata, torch.Tensor):
        return qdata, f"{getattr(tensor, '_layout_cls', 'quantized')}:{tuple(qdata.shape)}:{qdata.dtype}"
    return tensor, "plain"


def sample_positions(numel: int, count: int = SAMPLES_PER_TENSOR) -> np.ndarray:
    """Fixed flat positions (row-major) spread over a tensor of ``numel`` elements, first and last included."""
    if numel <= count:
        return np.arange(numel, dtype=np.int64)
    return np.unique(np.linspace(0, numel - 1, count).round().astype(np.int64))


_OFFSETS: dict[tuple, tuple[torch.Tensor, int]] = {}


def _sample_offsets(shape: torch.Size, stride: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, int]:
    """Storage offsets (relative to the tensor's own) of the sample positions, and the span they need; cached
    per layout, since a model repeats the same few shapes in every block."""
    key = (tuple(shape), tuple(stride), str(device))
    found = _OFFSETS.get(key)
    if found is None:
        positions = sample_positions(math.prod(shape))
        offsets = sum((index * step for index, step in zip(np.unravel_index(positions, tuple(shape)), stride)),
                      np.zeros(len(positions), dtype=np.int64))
        found = (torch.as_tensor(offsets, dtype=torch.int64, device=device), int(offsets.max()) + 1)
        if len(_OFFSETS) < 4096:
            _OFFSETS[key] = found
    return found


def sampled_values(tensor: torch.Tensor) -> torch.Tensor | None:
    """The tensor's values at ``sample_positions``, gathered where the tensor lives through its strides (an
    expanded or otherwise non-contiguous tensor is not materialised). None for a tensor without data (meta)."""
    values, _ = _stored(tensor.detach())
    if values.is_meta:
        return None
    if values.numel() == 0:
        return values.reshape(0)
    if values.ndim == 0:
        return values.reshape(1)
    offsets, span = _sample_offsets(values.shape, values.stride(), values.device)
    return values.as_strided((span,), (1,))[offsets]


def _bits(values: torch.Tensor) -> torch.Tensor:
    """Raw bit patterns as int64 (exact: equal bits ↔ equal values, whatever the dtype)."""
    if values.dtype == torch.bool:
        values = values.to(torch.uint8)
    bit_view = _BIT_VIEWS.get(values.element_size())
    if bit_view is None:
        raise TypeError(f"cannot sample a tensor of dtype {values.dtype}")
    return values.contiguous().view(bit_view).to(torch.int64)


def weights_identity(named_tensors: Iterable[tuple[str, torch.Tensor]], source_sizes: Iterable[int] = ()) -> str:
    """Keys, shapes, dtypes, storage formats and a fixed sample of values of every tensor, plus the sizes of the
    files they were loaded from (see the module docstring): ~0.1 ms per tensor, whatever its size."""
    h = hashlib.sha256()
    h.update(json.dumps(sorted(int(size) for size in source_sizes)).encode())
    # Samples are batched per (device, dtype): one bit conversion and one transfer per group, not per tensor.
    groups: dict[tuple[str, torch.dtype], list[torch.Tensor]] = {}
    for name, tensor in sorted(named_tensors, key=lambda item: item[0]):
        _, storage = _stored(tensor)
        picked = sampled_values(tensor)
        h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|{storage}|{'meta' if picked is None else picked.numel()}\n".encode())
        if picked is not None:
            groups.setdefault((str(picked.device), picked.dtype), []).append(picked)
    for (device, dtype), picked in groups.items():
        h.update(f"{device}|{dtype}\n".encode())
        h.update(_bits(torch.cat(picked)).cpu().numpy().tobytes())
    return h.hexdigest()


def loaded_file_sizes(patcher) -> list[int]:
    """Sizes of the files a ComfyUI loader read for this patcher (``cached_patcher_init``: the loader function
    and its arguments, file paths among them); empty when ComfyUI did not record them."""
    init = getattr(patcher, "cached_patcher_init", None)
    if not init or len(init) < 2:
        return []
    sizes = []
    for argument in init[1]:
        for candidate in (argument if isinstance(argument, (list, tuple)) else [argument]):
            if isinstance(candidate, (str, os.PathLike)) and os.path.isfile(candidate):
                sizes.append(os.path.getsize(candidate))
    return sizes


_REMEMBERED: "weakref.WeakKeyDictionary[object, dict[str, str]]" = weakref.WeakKeyDictionary()


def remembered(owner: object, what: str, compute: Callable[[], str]) -> str:
    """``compute()`` once per (model object, what); later calls return the remembered value for as long as
    the object lives. For identities of weights that do not change under the object (a loaded model)."""
    known = _REMEMBERED.setdefault(owner, {})
    if what not in known:
        known[what] = compute()
    return known[what]
