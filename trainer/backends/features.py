"""Video hidden states of chosen transformer blocks, read by forward hooks while a denoiser call runs.

The representation regularisers (CREPA, Self-Flow) align the hidden states of two blocks. They need no extra
forward: a forward hook on each chosen block copies the video stream the block returns. The copy is a clone
because ComfyUI's blocks update the residual streams in place: the tensor a hook sees is changed again by the
next block, while the clone keeps the value at this block and stays on the autograd graph (gradients reach the
block and everything before it). Hooks record only while the capture is open: with gradient checkpointing,
backward recomputes blocks after the call has returned, and those recomputations must not add anything.

A backend whose model calls cover the batch in another order or in pieces (ComfyUI's forward puts a sample
with per-token σ first) marks the batch rows each call covers with ``rows``; ``video`` puts the pieces back in
batch order.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import torch
from torch import nn


class BlockFeatures:
    """A context manager capturing the video hidden states ``[B, video_tokens, D]`` that blocks ``indices``
    output during the calls made while it is open (guide tokens after the clip's own tokens are dropped)."""

    def __init__(self, blocks: Sequence[nn.Module], indices: Sequence[int], video_tokens: int,
                 on_open: Callable[["BlockFeatures | None"], None] | None = None):
        for index in indices:
            if not 0 <= index < len(blocks):
                raise ValueError(f"block {index} does not exist: the model has {len(blocks)} blocks (0-{len(blocks) - 1})")
        self._blocks = {index: blocks[index] for index in indices}
        self.video_tokens = video_tokens
        self._parts: dict[int, list[tuple[list[int] | None, torch.Tensor]]] = {index: [] for index in indices}
        self._rows: list[int] | None = None
        self._handles: list = []
        self._on_open = on_open
        self.recording = False

    def __enter__(self) -> "BlockFeatures":
        for index, block in self._blocks.items():
            self._handles.append(block.register_forward_hook(self._hook(index)))
        self.recording = True
        if self._on_open is not None:
            self._on_open(self)
        return self

    def __exit__(self, *exc) -> None:
        self.recording = False
        if self._on_open is not None:
            self._on_open(None)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, index: int):
        def hook(_module, _args, output):
            if not self.recording:
                return None
            video = output[0] if isinstance(output, (tuple, list)) else output
            self._parts[index].append((self._rows, video[:, : self.video_tokens].clone()))
            return None

        return hook

    @contextlib.contextmanager
    def rows(self, rows: Sequence[int]) -> Iterator[None]:
        """The model calls inside cover these batch rows (in this order)."""
        previous, self._rows = self._rows, list(rows)
        try:
            yield
        finally:
            self._rows = previous

    def video(self, index: int, batch: int) -> torch.Tensor:
        """``[batch, video_tokens, D]`` of block ``index``, in batch order."""
        parts = self._parts[index]
        if not parts:
            raise RuntimeError(f"block {index} did not run while its hidden states were captured")
        if len(parts) == 1 and parts[0][0] is None:
            return parts[0][1]
        if any(rows is None for rows, _ in parts):
            raise RuntimeError(f"block {index} ran more than once in one captured call")
        slots: list[torch.Tensor | None] = [None] * batch
        for rows, tensor in parts:
            for position, row in enumerate(rows):
                slots[row] = tensor[position : position + 1]
        missing = [row for row, value in enumerate(slots) if value is None]
        if missing:
            raise RuntimeError(f"block {index}: no hidden states for batch rows {missing}")
        return torch.cat(slots)
