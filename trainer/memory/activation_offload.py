"""Checkpointed block inputs kept in CPU memory.

With per-block gradient checkpointing the activations kept between forward and backward are, per block, its
inputs: the video and audio residual streams (``[B, N, D]`` each; every other block input — text context,
timestep embeddings, RoPE tables — is the same tensor for all blocks). ``OffloadedCheckpoint`` is a
``gradient_checkpointing_func`` for diffusers' ``enable_gradient_checkpointing``: it copies those two streams
to CPU memory (pinned, asynchronously, when asked), checkpoints the block on the CPU copies, and copies them
back to the compute device when backward recomputes the block. The copies are differentiable, so gradients
flow through them unchanged; the GPU originals are freed once the next block has consumed them.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

# LTX2VideoTransformerBlock.forward(hidden_states, audio_hidden_states, ...): the two residual streams.
LTX2_STREAM_ARGUMENTS = (0, 1)


class OffloadedCheckpoint:
    """``fn(block, *args)`` running ``block`` under non-reentrant checkpointing with the residual-stream
    arguments stored on ``storage`` (CPU) in between.

    ``copy_on_same_device``: copy the streams even when they already live on ``storage`` (CPU training has
    no GPU memory to save; the tests use it to run the offload path on a CPU-only machine)."""

    def __init__(self, storage: torch.device | str = "cpu", pin_memory: bool = False,
                 stream_arguments: Sequence[int] = LTX2_STREAM_ARGUMENTS, copy_on_same_device: bool = False):
        self.storage = torch.device(storage)
        self.pin_memory = pin_memory
        self.stream_arguments = tuple(stream_arguments)
        self.copy_on_same_device = copy_on_same_device
        self.offloaded_bytes = 0  # running total, for reports and tests

    def __call__(self, block: nn.Module, *args):
        args = list(args)
        devices: dict[int, torch.device] = {}
        for index in self.stream_arguments:
            value = args[index] if index < len(args) else None
            if isinstance(value, torch.Tensor) and (value.device != self.storage or self.copy_on_same_device):
                devices[index] = value.device
                args[index] = self._store(value)

        def run_block(*stored):
            # Runs in the forward and again when backward recomputes the block: the streams go back to the
            # compute device each time (the copy is on the current stream, so it is ordered after the offload).
            restored = [value.to(devices[i], non_blocking=True) if i in devices else value for i, value in enumerate(stored)]
            return block(*restored)

        return checkpoint(run_block, *args, use_reentrant=False)

    def _store(self, value: torch.Tensor) -> torch.Tensor:
        pin = self.pin_memory and self.storage.type == "cpu" and value.device.type == "cuda"
        # copy_ into a fresh buffer is differentiable (CopyBackwards): gradients return to the original device.
        buffer = torch.empty(value.shape, dtype=value.dtype, device=self.storage, pin_memory=pin)
        self.offloaded_bytes += buffer.numel() * buffer.element_size()
        return buffer.copy_(value, non_blocking=pin)
