"""Fitting the big models: quantised base weights, activation offload, block swapping, compilation and
attention kernels for the diffusers backend (the ComfyUI backend relies on ComfyUI's own loading and
offloading; see ``nodes/comfy_memory.py``).

Modules, one job each:

- ``options``: ``MemoryConfig`` (the ``[memory]`` config section) and its cross-field rules.
- ``quantize``: precise quantised-tensor checks, ``dequantized_weight`` (for DoRA), weight-only int8 / float8 /
  nf4 quantisation of the transformer blocks with dtype-preserving Linear forwards.
- ``activation_offload``: checkpointed block inputs (or all saved activations) kept in CPU memory.
- ``block_swap``: N blocks resident on the GPU, the rest streamed in from pinned CPU memory.
- ``compile``: ``torch.compile`` per transformer block.
- ``attention``: the diffusers attention backend (SDPA, PyTorch's flash kernel, flash-attn).
- ``setup``: applies a ``MemoryConfig`` to a diffusers transformer and places it on the training device.

``config.py`` imports ``options`` (for the ``[memory]`` section) while it is being initialised, and ``options``
imports ``opt`` from ``config``. Importing ``config`` here, first, makes both import orders work; nothing else
is imported, so the heavier modules are not pulled in with the config.
"""

from .. import config  # noqa: F401  (see above)
