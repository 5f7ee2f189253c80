"""Quantised base weights under a trainable adapter.

The adapters (``adapters.py``) wrap each Linear's forward, ``y = base(x) + Δ(x)``, and never read
``.weight`` except DoRA's column norm, which goes through ``dequantized_weight``. So a quantised base only
needs a forward that behaves like the plain Linear it replaces, and one precise way to read its weight.

Precise type checks. ``torch.Tensor.dequantize`` exists on every tensor, so ``hasattr(t, "dequantize")`` is
true for plain tensors too, and calling it inside the graph breaks backward ("derivative for dequantize is
not implemented"). ``quantized_kind`` names the storage by its exact type instead: PyTorch's own quantised
tensors (``t.is_quantized``), torchao's subclasses (``TorchAOBaseTensor``: ``Int8Tensor``, ``Float8Tensor``, ...;
``NF4Tensor``, whose ``dequantize`` is a different, static function), ComfyUI's ``QuantizedTensor`` (from
comfy_kitchen, scaled fp8 / nvfp4 / int8 checkpoints) and plain float8 storage (ComfyUI's unscaled fp8
checkpoints, cast at forward time by ``comfy.ops.manual_cast``). A library's classes are looked up only when
that library is already imported: a tensor of its type cannot exist otherwise. Any other tensor subclass is
an error, never a guess.

Dtypes. torchao's weight subclasses handle ``F.linear`` in ``__torch_function__``, before autocast: an int8
layer under bf16 autocast computes and returns the *weight's* dtype, a float8 layer with a bf16 input and
float32 weights fails ("expected m1 and m2 to have the same dtype"), an nf4 layer returns float32 for a bf16
input. ``QuantizedLinear`` therefore runs the quantised product in the weight's own dtype and returns the
dtype a plain ``nn.Linear`` would return (the autocast dtype under autocast, else the input's), so nothing
downstream — residual streams, attention masks built from the hidden dtype, SDPA — sees a leaked dtype.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from ..config import ConfigError

FLOAT8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz)
TORCHAO_HINT = "pip install torchao (0.18.x for torch 2.11)"
NF4_BLOCK_SIZE = 64  # QLoRA's block of 64 weights per absmax scale
NF4_SCALER_BLOCK_SIZE = 256  # QLoRA's block of 256 scales per second-level scale (double quantisation)


# ---- precise checks ----------------------------------------------------------------------------------------


def _loaded_class(module_name: str, attribute: str) -> type | None:
    """``module_name.attribute`` when that module is already imported, else None (never imports it)."""
    module = sys.modules.get(module_name)
    return getattr(module, attribute, None) if module is not None else None


def quantized_kind(tensor: torch.Tensor) -> str | None:
    """How a weight is stored: None for a plain tensor (any float dtype but float8), else one of ``"torch"``
    (PyTorch quantised tensor), ``"torchao"``, ``"torchao_nf4"``, ``"comfy"`` (ComfyUI/comfy_kitchen
    ``QuantizedTensor``), ``"float8"`` (plain float8 storage) or ``"unknown"`` (another tensor subclass)."""
    if type(tensor) in (torch.Tensor, nn.Parameter):
        if tensor.is_quantized:
            return "torch"
        return "float8" if tensor.dtype in FLOAT8_DTYPES else None
    nf4_class = _loaded_class("torchao.quantization", "NF4Tensor")
    if nf4_class is not None and isinstance(tensor, nf4_class):
        return "torchao_nf4"
    torchao_base = _loaded_class("torchao.utils", "TorchAOBaseTensor")
    if torchao_base is not None and isinstance(tensor, torchao_base):
        return "torchao"
    comfy_class = _loaded_class("comfy_kitchen.tensor", "QuantizedTensor")
    if comfy_class is not None and isinstance(tensor, comfy_class):
        return "comfy"
    return "unknown"


def is_quantized_tensor(tensor: torch.Tensor) -> bool:
    """True for quantised or float8 storage; False for every plain floating-point tensor."""
    return quantized_kind(tensor) is not None


def dequantized_weight(linear: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The layer's base weight as a plain, detached ``[out, in]`` tensor of ``dtype`` (float32 by default),
    where the weight lives. Read-only: for a plain weight of ``dtype`` it shares the weight's storage."""
    weight = linear.weight
    kind = quantized_kind(weight)
    with torch.no_grad():
        if kind in (None, "float8"):
            dense = weight
        elif kind in ("torch", "torchao", "comfy"):
            dense = weight.dequantize()
        elif kind == "torchao_nf4":
            dense = weight.get_original_weight()
        else:
            raise TypeError(
                f"{type(linear).__name__}.weight is a {type(weight).__module__}.{type(weight).__qualname__}, a tensor "
                "type this trainer cannot read; supported: plain and float8 tensors, PyTorch quantised tensors, torchao "
                "(int8, float8, nf4) and ComfyUI quantised weights"
            )
    return dense.detach().to(dtype)


# ---- dtype-preserving forward ------------------------------------------------------------------------------


def _plain_linear_output_dtype(x: torch.Tensor) -> torch.dtype:
    """What ``nn.Linear`` returns for input ``x`` here: the autocast dtype under autocast, else x's dtype."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


class QuantizedLinear(nn.Linear):
    """An ``nn.Linear`` whose weight is a quantised tensor (made by ``quantize_blocks``, which switches the
    class of the existing module so its name, parameters and hooks stay). The product runs in the weight's
    dtype with autocast off (the quantised kernels do not take part in autocast) and the result has the
    dtype a plain Linear would give."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_dtype = _plain_linear_output_dtype(x)
        compute_dtype = self.weight.dtype  # the logical dtype of the quantised weight (its original dtype)
        with torch.autocast(x.device.type, enabled=False):
            bias = None if self.bias is None else self.bias.to(compute_dtype)
            out = F.linear(x.to(compute_dtype), self.weight, bias)
        return out.to(out_dtype)


# ---- quantising the blocks ----------------------------------------------------------------------------------


@dataclass
class QuantizationReport:
    """What ``quantize_blocks`` did: layers quantised, layers left as they were (with why), and bytes."""

    mode: str
    quantized: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # module path → reason
    bytes_before: int = 0
    bytes_after: int = 0


def block_linear_layers(module: nn.Module, prefix: str = "transformer_blocks.") -> list[tuple[str, nn.Linear]]:
    """Every plain ``nn.Linear`` inside the transformer blocks (the bulk of the weights), in model order."""
    return [(name, m) for name, m in module.named_modules() if type(m) is nn.Linear and name.startswith(prefix)]


def quantize_blocks(module: nn.Module, mode: str, prefix: str = "transformer_blocks.") -> QuantizationReport:
    """Quantise the weights of every ``nn.Linear`` under ``prefix`` in place (weight-only; biases, norms,
    embeddings and the layers outside the blocks stay as they are) and give those layers the dtype-preserving
    ``QuantizedLinear`` forward. ``mode``: ``"int8"`` | ``"float8"`` | ``"nf4"`` (torchao)."""
    if mode not in ("int8", "float8", "nf4"):
        raise ConfigError(f"memory.quantization: {mode!r}; choose one of none, int8, float8, nf4")
    torchao_quantization = _import_torchao()
    layers = block_linear_layers(module, prefix)
    if not layers:
        raise ConfigError(f"memory.quantization = {mode!r}: the model has no Linear layer under {prefix!r}")
    report = QuantizationReport(mode)
    for name, linear in layers:
        report.bytes_before += _storage_bytes(linear.weight)
        if quantized_kind(linear.weight) is not None:
            report.skipped[name] = f"already stored as {quantized_kind(linear.weight)}"
        elif mode == "nf4":
            reason = _nf4_unsupported_reason(linear.weight)
            if reason:
                report.skipped[name] = reason
            else:
                weight = linear.weight.detach()
                scaler_block = math.gcd(weight.numel() // NF4_BLOCK_SIZE, NF4_SCALER_BLOCK_SIZE)
                nf4 = torchao_quantization.to_nf4(weight, NF4_BLOCK_SIZE, scaler_block)
                linear.weight = nn.Parameter(nf4, requires_grad=False)
        else:
            config = torchao_quantization.Int8WeightOnlyConfig() if mode == "int8" else torchao_quantization.Float8WeightOnlyConfig()
            # quantize_ on the layer itself (its filter sees the root as "" with this module): one layer at a time
            # keeps the peak extra memory at one layer.
            torchao_quantization.quantize_(linear, config)
        if name not in report.skipped:
            linear.__class__ = QuantizedLinear
            report.quantized.append(name)
        report.bytes_after += _storage_bytes(linear.weight)
    return report


def _import_torchao():
    try:
        import torchao.quantization as torchao_quantization
    except ImportError as exc:
        raise ConfigError(f"memory.quantization needs torchao, which is not installed ({exc}); {TORCHAO_HINT}") from None
    return torchao_quantization


def _nf4_unsupported_reason(weight: torch.Tensor) -> str | None:
    if weight.ndim != 2 or weight.numel() % NF4_BLOCK_SIZE:
        return f"nf4 needs a multiple of {NF4_BLOCK_SIZE} weights, this layer has {weight.numel()}"
    return None


# ---- tensors, plain or subclass -------------------------------------------------------------------------------


def map_inner_tensors(tensor: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``fn`` applied to a plain tensor, or to every plain tensor inside a wrapper subclass (torchao's, ...),
    rebuilt with the same metadata. Used to pin and move quantised weights whose own ``pin_memory`` /
    ``record_stream`` are not implemented."""
    if type(tensor) in (torch.Tensor, nn.Parameter):
        return fn(tensor.detach())
    if not is_traceable_wrapper_subclass(tensor):
        raise TypeError(f"cannot move or pin a {type(tensor).__qualname__}: not a plain tensor nor a wrapper tensor subclass")
    names, context = tensor.__tensor_flatten__()
    inner = {name: map_inner_tensors(getattr(tensor, name), fn) for name in names}
    return type(tensor).__tensor_unflatten__(inner, context, tensor.size(), tensor.stride())


def inner_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding a (possibly subclass) tensor's data."""
    if type(tensor) in (torch.Tensor, nn.Parameter) or not is_traceable_wrapper_subclass(tensor):
        return [tensor]
    names, _ = tensor.__tensor_flatten__()
    return [t for name in names for t in inner_tensors(getattr(tensor, name))]


def _storage_bytes(tensor: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in inner_tensors(tensor))
