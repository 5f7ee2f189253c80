"""Fitting the big models in the headless diffusers backend: quantised base weights, activation offload,
block swapping, compilation and attention kernels (the ComfyUI backend relies on ComfyUI's own loading and
offloading; see ``backends/comfyui/memory.py``). The options are the ``[memory]`` section of the config.

Modules, one job each:

- ``quantize``: precise quantised-tensor checks, ``dequantized_weight`` (for DoRA), weight-only int8 / float8 /
  nf4 quantisation of the transformer blocks with dtype-preserving Linear forwards.
- ``activation_offload``: checkpointed block inputs (or all saved activations) kept in CPU memory.
- ``block_swap``: N blocks resident on the GPU, the rest streamed in from pinned CPU memory.
- ``compile``: ``torch.compile`` per transformer block.
- ``attention``: the diffusers attention backend (SDPA, PyTorch's flash kernel, flash-attn).
- ``setup``: applies a ``MemoryConfig`` to a diffusers transformer and places it on the training device.
"""
