"""Memory in the ComfyUI backend: ComfyUI's own loading, offloading and fp8 weights; nothing of ``[memory]``.

The ``[memory]`` options (torchao quantisation, block swapping, activation offload, compilation, attention
kernel) belong to the headless diffusers backend. In ComfyUI the MODEL is ComfyUI's, and so is its memory:

- Loading and offloading. ``ComfyDenoiser.load(memory_required, force_full_load)`` calls
  ``comfy.model_management.load_models_gpu([model_patcher], memory_required=..., force_full_load=...)``.
  ComfyUI frees other models until the MODEL plus ``memory_required`` bytes (plus its reserve) fit, and loads
  as many weights to the GPU as fit; the rest stay in CPU memory and ``comfy.ops`` casts them to the GPU layer
  by layer at forward time ("lowvram" partial loading; on NVIDIA the DynamicVRAM ``ModelPatcherDynamic`` does
  the same with pinned, prefetched weights). The train node loads with the defaults
  (``memory_required=0``): ComfyUI's minimum inference reserve is left for activations; pass the activation
  bytes of a training step as ``memory_required`` to keep more weights off the GPU for a big clip.
- fp8 checkpoints. A plain fp8 checkpoint (or a loader's ``weight_dtype`` fp8) gives ``comfy.ops.manual_cast``
  Linears: an ``nn.Linear`` whose float8 weight ``cast_bias_weight`` casts to the input's dtype at every forward.
  A scaled fp8 checkpoint (``comfy_quant`` / ``scale_weight`` keys) gives ``mixed_precision_ops`` Linears holding
  a comfy_kitchen ``QuantizedTensor``, dequantised (or, with fp8 compute on a GPU, multiplied in fp8 by
  ``QuantLinearFunc``, which returns input gradients) at forward time. Either way ``base(x)`` stays ComfyUI's own
  forward, so our forward-wrapping adapters (``y = base(x) + Δ(x)``) train on top with no extra code, and DoRA
  reads the weight through ``trainer.memory.quantize.dequantized_weight``, which knows both storages.
- Gradient checkpointing: ``ComfyDenoiser(checkpointing="block")``.

``base_weight_formats`` tells what a MODEL's block Linears hold (for logs and checks), and ``is_comfy_linear``
recognises both Linear kinds, since ``mixed_precision_ops``' Linear is not an ``nn.Linear`` subclass.
"""

from __future__ import annotations

from collections import Counter

from torch import nn

from ...memory.quantize import quantized_kind


def is_comfy_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` (``comfy.ops`` Linears subclass it) or a ``mixed_precision_ops`` Linear (quantised
    checkpoints), which is a plain ``nn.Module`` with ``in_features`` / ``out_features`` and ComfyUI's cast op."""
    if isinstance(module, nn.Linear):
        return True
    import comfy.ops

    return isinstance(module, comfy.ops.CastWeightBiasOp) and type(module).__qualname__.endswith("MixedPrecisionOps.Linear")


def base_weight_formats(diffusion_model: nn.Module, prefix: str = "transformer_blocks.") -> dict[str, int]:
    """How many Linear layers under ``prefix`` store their weight as each kind: ``"plain"``, ``"float8"``,
    ``"comfy"`` (ComfyUI quantised tensor), ... (``trainer.memory.quantize.quantized_kind``)."""
    counts: Counter[str] = Counter()
    for name, module in diffusion_model.named_modules():
        if name.startswith(prefix) and is_comfy_linear(module) and getattr(module, "weight", None) is not None:
            counts[quantized_kind(module.weight) or "plain"] += 1
    return dict(counts)
