"""``torch.compile`` per transformer block.

Compiling each block (rather than the whole model) keeps graphs small, reuses one compiled graph shape for
every block of the same kind, and leaves the parts between blocks (σ-gate hooks, checkpointing, adapter
bookkeeping) in eager mode. The adapters' wrapped Linear forwards are traced into the block's graph; a change
of adapter strength (``network.disabled()`` for the preservation targets) is a guard, so it recompiles once.

Block swapping replaces a block's parameters at every call from a forward pre-hook, which runs inside the
compiled call; ``setup.apply_memory_options`` therefore leaves compilation off (with a warning) when
``memory.blocks_to_swap`` is set.
"""

from __future__ import annotations

from torch import nn


def compile_blocks(blocks: nn.ModuleList, backend: str = "inductor") -> int:
    """Compile every block in place (``nn.Module.compile``); returns how many. ``backend`` is torch.compile's
    (``"inductor"`` for speed; ``"aot_eager"`` traces the same graphs without generating kernels)."""
    for block in blocks:
        block.compile(backend=backend)
    return len(blocks)
