"""The ``[memory]`` section of the config: how the base model is made to fit (headless diffusers backend).

``config.py`` imports this module after it has defined ``opt`` and ``ConfigError`` (the two names used here),
so this module must import nothing else from the package at import time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from ..config import ConfigError, opt

if TYPE_CHECKING:
    from ..config import ModelConfig

QUANTIZATION_MODES = ("none", "int8", "float8", "nf4")
ATTENTION_BACKENDS = ("sdpa", "sdpa_flash", "flash")


@dataclass
class MemoryConfig:
    quantization: Literal["none", "int8", "float8", "nf4"] = opt(
        "none",
        "Weight-only quantisation of the transformer blocks' Linear layers (torchao; the adapter trains on top, the "
        "base stays frozen). none: as loaded. int8: per-channel int8 (~half of bf16). float8: per-channel float8 e4m3 "
        "(~half of bf16). nf4: 4-bit NormalFloat, QLoRA's format (~quarter of bf16, largest error). Needs "
        "`pip install torchao` (0.18 for torch 2.11). Exported LoRAs apply to the unquantised base.",
    )
    blocks_to_swap: int = opt(
        0,
        "Keep this many transformer blocks in CPU memory and stream each to the GPU just before it runs (the next "
        "one is copied on a side CUDA stream while the current one computes). 0 = off. Needs "
        "model.gradient_checkpointing; at most the number of blocks - 1. Does nothing when training on the CPU.",
    )
    pin_memory: bool = opt(
        True, "Keep swapped blocks and offloaded activations in pinned (page-locked) CPU memory: faster, asynchronous copies."
    )
    activation_offload: bool = opt(
        False,
        "Keep the checkpointed blocks' inputs (the video and audio residual streams, the activations that "
        "checkpointing keeps per block) in CPU memory between forward and backward. Needs "
        "model.gradient_checkpointing. Saves GPU memory at the cost of PCIe copies; does nothing when training on the CPU.",
    )
    compile: bool = opt(
        False,
        "torch.compile each transformer block (the first steps are slow while it compiles; ~15-20 % faster after "
        "on a GPU). Switched off with a warning together with blocks_to_swap, whose hooks swap the block's weights "
        "at every call.",
    )
    attention: Literal["sdpa", "sdpa_flash", "flash"] = opt(
        "sdpa",
        "Attention kernel. sdpa: PyTorch scaled_dot_product_attention, kernel chosen by PyTorch (default, any "
        "device). sdpa_flash: PyTorch's built-in FlashAttention kernel (CUDA, bf16/fp16). flash: the flash-attn "
        "package (FlashAttention 2; CUDA; pip install flash-attn). Both flash kinds need a text mask without padding.",
    )


def validate_memory(memory: MemoryConfig, model: "ModelConfig") -> None:
    """Cross-field rules of ``[memory]`` (raises ``ConfigError`` naming the key and the fix)."""
    if memory.blocks_to_swap < 0:
        raise ConfigError(f"memory.blocks_to_swap: must be >= 0 (0 = off), got {memory.blocks_to_swap}")
    if memory.blocks_to_swap and not model.gradient_checkpointing:
        raise ConfigError(
            "memory.blocks_to_swap needs model.gradient_checkpointing = true: without checkpointing, autograd keeps "
            "every block's GPU weights alive until backward, so swapping would save nothing"
        )
    if memory.activation_offload and not model.gradient_checkpointing:
        raise ConfigError(
            "memory.activation_offload needs model.gradient_checkpointing = true: it keeps the checkpointed blocks' "
            "inputs in CPU memory (without checkpointing, use it off and lower the batch or clip size instead)"
        )
    if model.source == "tiny" and memory.blocks_to_swap >= model.tiny.num_layers:
        raise ConfigError(
            f"memory.blocks_to_swap = {memory.blocks_to_swap}: the model has {model.tiny.num_layers} blocks and at least "
            f"one must stay on the GPU; use at most {model.tiny.num_layers - 1}"
        )
