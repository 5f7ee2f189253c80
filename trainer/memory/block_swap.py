"""Block swapping: the last ``blocks_to_swap`` transformer blocks live in (pinned) CPU memory and are
copied to the GPU just before they run.

Why the last blocks: the forward meets them after the resident ones (the first swapped block is prefetched
while the last resident one computes), and backward, which recomputes the blocks in reverse under gradient
checkpointing, starts with the block the forward ended with, still on the GPU.

How. A forward pre-hook on every block (it also fires when backward recomputes a checkpointed block):

1. makes the block's weights resident: waits for its prefetch (an event recorded on the side stream) or, if
   it was not predicted, copies it now;
2. prefetches the block expected next — the next index in the direction the calls are going (up in the
   forward, down in the recomputing backward; a repeated index means the backward has started) — on a side
   CUDA stream, so the copy overlaps the current block's compute;
3. keeps at most two swapped blocks on the device (the running one and the prefetched one): any other is
   evicted before a copy starts.

The base weights are frozen, so evicting is just pointing the parameters back at their CPU copies; nothing is
copied back. A tensor that autograd or a running kernel still uses stays valid: autograd holds its own
reference, and every device copy is marked with ``record_stream`` for the compute stream, so the caching
allocator does not reuse its memory before the compute stream is done with it. Prediction only decides what is
copied early; the pre-hook always makes the running block resident, so a wrong guess costs time, never
correctness. Without gradient checkpointing autograd would keep every block's device weights until backward
(``config.validate_memory`` refuses that combination).

On a non-CUDA device the copies are synchronous ``.to(device, copy=True)``; with the CPU as the "device" this
runs the whole bookkeeping on a CPU-only machine (the tests do), though it saves nothing there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..config import ConfigError
from .quantize import inner_tensors, map_inner_tensors

MAX_SWAPPED_RESIDENT = 2  # the running block and the prefetched one


@dataclass(frozen=True)
class _Slot:
    """One parameter or buffer of a block: where it is registered and its CPU ("home") copy."""

    module: nn.Module
    name: str
    is_parameter: bool
    home: torch.Tensor


def swapped_block_indices(num_blocks: int, blocks_to_swap: int) -> list[int]:
    """The blocks kept in CPU memory: the last ``blocks_to_swap`` (at least one block stays resident)."""
    if not 0 <= blocks_to_swap < num_blocks:
        raise ConfigError(
            f"memory.blocks_to_swap = {blocks_to_swap}: the model has {num_blocks} blocks and at least one must stay on "
            f"the GPU; use 0 to {num_blocks - 1}"
        )
    return list(range(num_blocks - blocks_to_swap, num_blocks))


class BlockSwapper:
    """Streams the swapped blocks of ``blocks`` to ``device`` around their calls (see the module docstring).

    ``place()`` puts resident blocks on ``device`` and swapped ones in CPU memory and installs the hooks;
    ``remove()`` takes the hooks off and leaves every block on ``device``. ``log`` (when ``record=True``) lists
    ``("run", i)``, ``("load", i)``, ``("prefetch", i)``, ``("evict", i)`` in order."""

    def __init__(self, blocks: Sequence[nn.Module], device: torch.device | str, blocks_to_swap: int, *,
                 pin_memory: bool = True, record: bool = False):
        self.blocks = list(blocks)
        self.device = torch.device(device)
        self.swapped = swapped_block_indices(len(self.blocks), blocks_to_swap)
        for index in self.swapped:
            trainable = [name for name, p in self.blocks[index].named_parameters() if p.requires_grad]
            if trainable:
                raise ConfigError(
                    f"memory.blocks_to_swap: block {index} has trainable base parameters ({trainable[0]}, ...); swapping "
                    "assumes a frozen base (adapters live outside the blocks)"
                )
        self.pin_memory = pin_memory and self.device.type == "cuda"
        self.log: list[tuple[str, int]] | None = [] if record else None
        self._slots: dict[int, list[_Slot]] = {}
        self._loaded: dict[int, torch.cuda.Event | None] = {}  # swapped blocks on the device → pending copy event
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._handles: list = []
        self._last_index: int | None = None

    # ---- placement --------------------------------------------------------------------------------------

    def place(self) -> None:
        for index, block in enumerate(self.blocks):
            if index in self.swapped:
                self._slots[index] = self._make_home(block)
                self._point_at_home(index)
            else:
                block.to(self.device)
        for index, block in enumerate(self.blocks):
            self._handles.append(block.register_forward_pre_hook(self._pre_hook(index)))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for index in self.swapped:
            if index not in self._loaded:
                self._copy_in(index, asynchronous=False)
            self._ensure_ready(index)
        self._slots.clear()
        self._loaded.clear()

    def resident_swapped_blocks(self) -> list[int]:
        """The swapped blocks whose weights are on the device now."""
        return sorted(self._loaded)

    def _make_home(self, block: nn.Module) -> list[_Slot]:
        def to_home(tensor: torch.Tensor) -> torch.Tensor:
            home = tensor.to("cpu")
            return home.pin_memory() if self.pin_memory else home

        slots = []
        for module in block.modules():
            for table, is_parameter in ((module._parameters, True), (module._buffers, False)):
                for name, tensor in table.items():
                    if tensor is not None:
                        slots.append(_Slot(module, name, is_parameter, map_inner_tensors(tensor, to_home)))
        return slots

    # ---- the hook -------------------------------------------------------------------------------------------

    def _pre_hook(self, index: int):
        def hook(module, args):
            self._before_block(index)

        return hook

    def _before_block(self, index: int) -> None:
        backward = self._last_index is not None and index <= self._last_index
        self._last_index = index
        self._record("run", index)
        if index in self.swapped:
            if index not in self._loaded:
                self._make_room(keep=())
                self._copy_in(index, asynchronous=False)
                self._record("load", index)
            self._ensure_ready(index)
        upcoming = index - 1 if backward else index + 1
        if upcoming in self.swapped and upcoming not in self._loaded:
            self._make_room(keep=(index,))
            self._copy_in(upcoming, asynchronous=self._stream is not None)
            self._record("prefetch", upcoming)

    # ---- moving ----------------------------------------------------------------------------------------------

    def _copy_in(self, index: int, asynchronous: bool) -> None:
        event = None
        if asynchronous:
            with torch.cuda.stream(self._stream):
                copies = [map_inner_tensors(s.home, lambda t: t.to(self.device, non_blocking=True)) for s in self._slots[index]]
                event = torch.cuda.Event()
                event.record(self._stream)
        else:
            copies = [map_inner_tensors(s.home, lambda t: t.to(self.device, copy=True)) for s in self._slots[index]]
        for slot, copy in zip(self._slots[index], copies):
            _register(slot, copy)
        self._loaded[index] = event

    def _ensure_ready(self, index: int) -> None:
        """Make the compute stream wait for the block's copy and tie its memory to the compute stream."""
        event = self._loaded[index]
        if event is None:
            return
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(event)
        for slot in self._slots[index]:
            tensor = slot.module._parameters[slot.name] if slot.is_parameter else slot.module._buffers[slot.name]
            for inner in inner_tensors(tensor):
                inner.record_stream(compute)
        self._loaded[index] = None

    def _make_room(self, keep: Sequence[int]) -> None:
        """Evict every swapped block but ``keep`` (at most one), so that one more fits in the two slots."""
        for index in list(self._loaded):
            if index not in keep:
                self._point_at_home(index)
                del self._loaded[index]
                self._record("evict", index)

    def _point_at_home(self, index: int) -> None:
        for slot in self._slots[index]:
            _register(slot, slot.home)

    def _record(self, what: str, index: int) -> None:
        if self.log is not None:
            self.log.append((what, index))


def _register(slot: _Slot, tensor: torch.Tensor) -> None:
    if slot.is_parameter:
        slot.module._parameters[slot.name] = nn.Parameter(tensor, requires_grad=False)
    else:
        slot.module._buffers[slot.name] = tensor
