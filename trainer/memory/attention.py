"""The attention kernel of the diffusers transformer (``memory.attention``).

diffusers 0.42 dispatches attention per processor (``processor._attention_backend``), set by
``ModelMixin.set_attention_backend(name)``; that call also changes diffusers' process-wide default backend,
which every other diffusers model (the text connectors, the VAEs) would then use. ``select_attention``
sets it inside ``diffusers.attention_backend(...)``, whose exit restores the previous default, so only this
transformer changes. The choice is per module, so backward's recomputation of a checkpointed block uses the
same kernel as the forward did.

- ``sdpa``: diffusers' ``native`` backend, ``torch.nn.functional.scaled_dot_product_attention``, with
  PyTorch picking the kernel (flash / memory-efficient / cuDNN / math). Any device, takes masks. Default.
- ``sdpa_flash``: diffusers' ``_native_flash``, PyTorch's built-in FlashAttention-2 kernel. CUDA, bf16/fp16.
- ``flash``: diffusers' ``flash``, the flash-attn package (FlashAttention 2). CUDA, bf16/fp16.

Both flash kinds take no attention mask: the denoiser passes the text mask as None when it has no padding
(real LTX-2 contexts are padded with learned registers to 1024 tokens and their mask is all ones) and raises
a clear error otherwise.
"""

from __future__ import annotations

import importlib.util

import torch

from ..config import ConfigError

DIFFUSERS_BACKENDS = {"sdpa": "native", "sdpa_flash": "_native_flash", "flash": "flash"}
MASKLESS_BACKENDS = ("sdpa_flash", "flash")


def check_attention(attention: str, device: torch.device) -> None:
    """Refuse a backend this device or environment cannot run, naming the fix."""
    if attention not in DIFFUSERS_BACKENDS:
        raise ConfigError(f"memory.attention: {attention!r}; choose one of {', '.join(DIFFUSERS_BACKENDS)}")
    if attention == "sdpa":
        return
    if device.type != "cuda":
        raise ConfigError(
            f"memory.attention = {attention!r} needs a CUDA device (training runs on {device}); use \"sdpa\""
        )
    if attention == "flash" and importlib.util.find_spec("flash_attn") is None:
        raise ConfigError(
            "memory.attention = \"flash\" needs the flash-attn package: pip install flash-attn (built for your CUDA and "
            "torch versions); or use \"sdpa_flash\" (PyTorch's built-in FlashAttention kernel, no package) or \"sdpa\""
        )


def select_attention(transformer, attention: str, device: torch.device) -> None:
    """Set the transformer's attention backend (after ``check_attention``); ``sdpa`` leaves diffusers' default."""
    check_attention(attention, device)
    if attention == "sdpa":
        return
    from diffusers import attention_backend

    try:
        with attention_backend(DIFFUSERS_BACKENDS["sdpa"]):  # restores diffusers' process-wide default on exit
            transformer.set_attention_backend(DIFFUSERS_BACKENDS[attention])
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"memory.attention = {attention!r}: {exc}") from None


def text_mask_for(attention: str, mask: torch.Tensor) -> torch.Tensor | None:
    """The text mask to pass: unchanged for ``sdpa``; None for a flash kind when nothing is padded."""
    if attention not in MASKLESS_BACKENDS:
        return mask
    if bool((mask != 0).all()):
        return None
    raise ValueError(
        f"memory.attention = {attention!r} cannot apply a text padding mask (some text tokens are masked out); cache "
        "the text with the LTX-2 connectors' full-length contexts (all tokens valid) or use memory.attention = \"sdpa\""
    )
