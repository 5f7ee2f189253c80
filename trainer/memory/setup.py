"""Applying ``[memory]`` to a diffusers ``LTX2VideoTransformer3DModel``.

Two moments: ``apply_memory_options`` at build time (quantisation, gradient checkpointing with or without
activation offload, compilation), and ``MemoryPlan.place`` once the training device is known (attention
kernel, block swapping, and moving the rest of the model to the device).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import MemoryConfig
from .activation_offload import OffloadedCheckpoint
from .attention import select_attention
from .block_swap import BlockSwapper
from .compile import compile_blocks
from .quantize import QuantizationReport, quantize_blocks


@dataclass
class MemoryReport:
    """What the memory options did to the model (for the run report)."""

    quantization: QuantizationReport | None = None
    gradient_checkpointing: bool = False
    activation_offload: bool = False
    compiled_blocks: int = 0
    swapped_blocks: list[int] = field(default_factory=list)
    attention: str = "sdpa"
    warnings: list[str] = field(default_factory=list)


class MemoryPlan:
    """A ``MemoryConfig`` applied to one transformer: the build-time report, then placement on the device."""

    def __init__(self, memory: MemoryConfig, report: MemoryReport, checkpoint_function: OffloadedCheckpoint | None):
        self.memory = memory
        self.report = report
        self.checkpoint_function = checkpoint_function
        self.swapper: BlockSwapper | None = None

    def place(self, transformer: nn.Module, device: torch.device | str) -> None:
        """Move the transformer to ``device``: swapped blocks go to (pinned) CPU memory with their hooks, every
        other weight to the device; then select the attention kernel."""
        device = torch.device(device)
        select_attention(transformer, self.memory.attention, device)
        self.report.attention = self.memory.attention
        if device.type != "cuda":
            for option, active in (("blocks_to_swap", self.memory.blocks_to_swap > 0),
                                   ("activation_offload", self.memory.activation_offload)):
                if active:
                    self._warn(f"memory.{option} does nothing when training on {device} (there is no GPU memory to "
                               "save); it applies on a CUDA device")
        if self.memory.blocks_to_swap and device.type == "cuda" and self.swapper is None:
            blocks = transformer.transformer_blocks
            self.swapper = BlockSwapper(blocks, device, self.memory.blocks_to_swap, pin_memory=self.memory.pin_memory)
            _move_all_but_blocks(transformer, device)
            self.swapper.place()
            self.report.swapped_blocks = list(self.swapper.swapped)
        elif self.swapper is None:
            transformer.to(device)

    def _warn(self, message: str) -> None:
        self.report.warnings.append(message)
        warnings.warn(message, stacklevel=3)


def apply_memory_options(transformer: nn.Module, memory: MemoryConfig, *, gradient_checkpointing: bool,
                         compile_backend: str = "inductor") -> MemoryPlan:
    """Quantise, checkpoint (offloading block inputs when asked) and compile ``transformer`` as ``memory``
    says. Placement on the device is ``MemoryPlan.place``."""
    report = MemoryReport(gradient_checkpointing=gradient_checkpointing)
    if memory.quantization != "none":
        report.quantization = quantize_blocks(transformer, memory.quantization)
    checkpoint_function = None
    if gradient_checkpointing:
        if memory.activation_offload:
            checkpoint_function = OffloadedCheckpoint("cpu", pin_memory=memory.pin_memory)
            report.activation_offload = True
        transformer.enable_gradient_checkpointing(checkpoint_function)
    plan = MemoryPlan(memory, report, checkpoint_function)
    if memory.compile:
        if memory.blocks_to_swap:
            plan._warn("memory.compile is off: memory.blocks_to_swap swaps each block's weights from a hook inside the "
                       "block call, which a compiled block cannot follow; set blocks_to_swap = 0 to compile")
        else:
            report.compiled_blocks = compile_blocks(transformer.transformer_blocks, backend=compile_backend)
    return plan


def _move_all_but_blocks(transformer: nn.Module, device: torch.device) -> None:
    """Everything of the transformer but its blocks to ``device`` (the swapper places the blocks)."""
    blocks = transformer.transformer_blocks
    transformer.transformer_blocks = nn.ModuleList()  # hidden from .to() for the moment
    try:
        transformer.to(device)
    finally:
        transformer.transformer_blocks = blocks

