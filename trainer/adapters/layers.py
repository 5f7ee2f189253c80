"""The four adapter types, each for one ``nn.Linear``, applied around the layer's own forward.

Why our own small implementation and not LyCORIS (installed, 4.1.3): LyCORIS modules replace the wrapped
layer's forward with their own weight-merging forward (``org_module.weight`` + diff, or a full
``F.linear`` with a rebuilt weight), which breaks on the host's cast-and-offload / fp8 / torchao forwards
that we must keep calling, and select targets through class-level presets shared by every network in the
process. The math here is a few lines per type; the keys and scalings follow exactly what ComfyUI's
``comfy.weight_adapter`` applies (a ComfyUI-tier test checks the applied weight delta).

Every type keeps ``base(x)`` as the layer's own forward and adds an update, never writing ``.weight``:

- ``lora``: ``base(x) + s·up(down(x))``, s = alpha/rank.
- ``dora``: W' = (W + s·up·down)·diag(m / ‖W + s·up·down‖_col): a magnitude per *input* column (shape
  ``[1, in]`` in the file). Because the column scaling acts on the input, ``W'x = (W + ΔW)(c ⊙ x)`` with
  c = m / ‖·‖_col, i.e. ``base(c ⊙ x) - bias + ΔW(c ⊙ x) + bias``: still the host's forward. DoRA *reads* the base
  weight for the norm (dequantised when it is a quantised tensor). The norm is detached (the DoRA paper's
  memory saving). The ``[1, in]`` layout is also the one ComfyUI v0.33.0 normalises by the merged weight;
  its ``[out, 1]`` branch divides by the base weight's norm instead, so that layout would load differently.
- ``lokr``: ΔW = s·kron(w1, w2), w2 = w2_a·w2_b when rank < half its size (s = alpha/rank), else a full w2
  (s = 1, as ComfyUI ignores alpha then); applied without building ΔW: ``w1 · X · w2ᵀ`` on x viewed as
  ``[in_m, in_n]``.
- ``loha``: ΔW = s·(w1_a·w1_b) ⊙ (w2_a·w2_b), s = alpha/rank, built per forward by an autograd function that
  keeps only the four factors for backward.

Dropout on the adapter input, rank dropout (per sample: rank channels for lora/dora, output rows of the update
for lokr/loha; the rest rescaled by 1/(1-p)) and module dropout (in ``adapters``) apply in training only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import NetworkConfig

NETWORK_TYPES = ("lora", "dora", "lokr", "loha")


def _uniform_init(tensor: torch.Tensor, generator: torch.Generator) -> None:
    """kaiming_uniform(a=√5) as nn.Linear uses: bound 1/√fan_in, fan_in = size of dim 1."""
    bound = 1.0 / math.sqrt(tensor.shape[1])
    with torch.no_grad():
        tensor.uniform_(-bound, bound, generator=generator)


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dimension`` into (m, n), m <= n, m·n = dimension: m = ``factor`` when it divides and fits,
    else the most square split whose smaller part is at most ``factor`` (-1: no limit). The same split
    LyCORIS and ComfyUI use for LoKr."""
    if factor > 0 and dimension % factor == 0 and dimension >= factor * factor:
        m, n = factor, dimension // factor
        return (m, n) if m <= n else (n, m)
    limit = dimension if factor < 0 else factor
    m, n = 1, dimension
    while m < n:
        candidate = m + 1
        while dimension % candidate:
            candidate += 1
        other = dimension // candidate
        if candidate + other > m + n or candidate > limit:
            break
        m, n = candidate, other
    return (m, n) if m <= n else (n, m)


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The layer's base weight as a plain float tensor (for DoRA's norm), dequantised precisely by type
    (torch-quantised, torchao int8/float8/NF4, ComfyUI's quantised tensors); never written."""
    from ..memory.quantize import dequantized_weight

    return dequantized_weight(module)


def _same_compute_dtype(out: torch.Tensor, h: torch.Tensor) -> bool:
    """Whether ``addmm(out, h, up)`` computes in the dtype of ``out``, as ``out + (h·upᵀ).to(out.dtype)`` does:
    under autocast when ``out`` already has the autocast dtype, otherwise when every operand shares it."""
    if torch.is_autocast_enabled(out.device.type):
        return out.dtype == torch.get_autocast_dtype(out.device.type)
    return out.dtype == h.dtype


class AdapterLayer(nn.Module):
    """Common parts: input dropout, rank dropout, and the contract every type implements."""

    kind = ""

    def __init__(self, net: NetworkConfig):
        super().__init__()
        self.rank = net.rank
        self.alpha = float(net.alpha)
        self.dropout = net.dropout
        self.rank_dropout = net.rank_dropout

    def _input(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        h = x.to(dtype)
        if self.dropout > 0 and self.training:
            h = F.dropout(h, p=self.dropout)
        return h

    def _rank_mask(self, h: torch.Tensor) -> torch.Tensor:
        """Per-sample keep mask over the last dim of ``h``, rescaled so the expectation is unchanged."""
        shape = (h.shape[0],) + (1,) * (h.ndim - 2) + (h.shape[-1],)
        keep = (torch.rand(shape, device=h.device) >= self.rank_dropout).to(h.dtype)
        return keep / (1.0 - self.rank_dropout)

    def _use_rank_dropout(self, h: torch.Tensor) -> bool:
        return self.rank_dropout > 0 and self.training and h.ndim >= 2

    # ---- the contract ----------------------------------------------------------------------------

    def adapted_forward(self, base_forward, x: torch.Tensor, args: tuple, kwargs: dict, multiplier: float) -> torch.Tensor:
        """The adapted layer's output at strength ``multiplier`` (1 = trained strength)."""
        out = base_forward(x, *args, **kwargs)
        return out + (self.delta(x) * multiplier).to(out.dtype)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The additive update ΔW·x (types whose update is additive)."""
        raise NotImplementedError

    def weight_delta(self, base_weight: torch.Tensor) -> torch.Tensor:
        """W_adapted - W at strength 1, ``[out, in]`` (what ComfyUI adds to the weight when it merges)."""
        raise NotImplementedError

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """Key suffix → tensor, in ComfyUI's layout for this type."""
        raise NotImplementedError

    def load_file_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def zero_initialised_parameters(self) -> list[nn.Parameter]:
        """The factor(s) that start at zero (LoRA+ trains them faster)."""
        raise NotImplementedError


class LoRALayer(AdapterLayer):
    """``down`` [rank, in] Kaiming-initialised, ``up`` [out, rank] zero: the adapted model starts at the base."""

    kind = "lora"

    def __init__(self, in_features: int, out_features: int, net: NetworkConfig, generator: torch.Generator):
        super().__init__(net)
        self.down = nn.Parameter(torch.empty(net.rank, in_features))
        self.up = nn.Parameter(torch.zeros(out_features, net.rank))
        _uniform_init(self.down, generator)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def _down(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(self._input(x, self.down.dtype), self.down)
        if self._use_rank_dropout(h):
            h = h * self._rank_mask(h)
        return h

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._down(x), self.up) * self.scale

    def adapted_forward(self, base_forward, x: torch.Tensor, args: tuple, kwargs: dict, multiplier: float) -> torch.Tensor:
        out = base_forward(x, *args, **kwargs)
        h = self._down(x)
        if not _same_compute_dtype(out, h):
            return out + (F.linear(h, self.up) * (self.scale * multiplier)).to(out.dtype)
        # One GEMM that accumulates s·up·h into the base output (the scale is the GEMM's alpha): no
        # [tokens, out] temporaries for the update, its scaling and the sum, in forward and backward.
        fused = torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), self.up.t(),
                            alpha=self.scale * multiplier)
        return fused.view(out.shape)

    def weight_delta(self, base_weight: torch.Tensor) -> torch.Tensor:
        return (self.up @ self.down) * self.scale

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return {".lora_down.weight": self.down, ".lora_up.weight": self.up, ".alpha": torch.tensor(self.alpha)}

    def load_file_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.down.copy_(tensors[".lora_down.weight"].float())
            self.up.copy_(tensors[".lora_up.weight"].float())
        self.alpha = float(tensors[".alpha"].item()) if ".alpha" in tensors else float(self.rank)

    def zero_initialised_parameters(self) -> list[nn.Parameter]:
        return [self.up]


class DoRALayer(LoRALayer):
    """LoRA plus a magnitude per input column, initialised to the base weight's column norms (so the
    adapted model starts exactly at the base)."""

    kind = "dora"

    def __init__(self, module: nn.Linear, net: NetworkConfig, generator: torch.Generator):
        super().__init__(module.in_features, module.out_features, net, generator)
        self.magnitude = nn.Parameter(self._column_norm(dense_weight(module).float()).cpu())
        self._module = [module]  # a list keeps the host layer out of this module's children and state

    @staticmethod
    def _column_norm(weight: torch.Tensor) -> torch.Tensor:
        # ComfyUI adds the float32 epsilon to the norm (weight_decompose, intermediate dtype float32).
        return weight.norm(dim=0) + torch.finfo(torch.float32).eps

    def _column_scale(self, device: torch.device) -> torch.Tensor:
        weight = dense_weight(self._module[0]).to(device, torch.float32)
        merged = weight + (self.up @ self.down).to(device) * self.scale
        return self.magnitude.to(device) / self._column_norm(merged).detach()

    def adapted_forward(self, base_forward, x, args, kwargs, multiplier):
        scaled = x * self._column_scale(x.device).to(x.dtype)
        out = base_forward(scaled, *args, **kwargs)
        out = out + self.delta(scaled).to(out.dtype)
        if multiplier == 1.0:
            return out
        base = base_forward(x, *args, **kwargs)
        return base + (out - base) * multiplier

    def weight_delta(self, base_weight: torch.Tensor) -> torch.Tensor:
        merged = base_weight.float() + (self.up @ self.down) * self.scale
        return merged * (self.magnitude / self._column_norm(merged))[None, :] - base_weight.float()

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return {**super().file_tensors(), ".dora_scale": self.magnitude.view(1, -1)}

    def load_file_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_file_tensors(tensors)
        scale = tensors[".dora_scale"].float()
        if scale.shape != (1, self.magnitude.numel()):
            raise ValueError(f"dora_scale of shape {tuple(scale.shape)}: only the per-input-column layout [1, in] is supported")
        with torch.no_grad():
            self.magnitude.copy_(scale.view(-1))


class LoKrLayer(AdapterLayer):
    """ΔW = s·kron(w1, w2): w1 [out_l, in_m] Kaiming, w2 [out_k, in_n] zero (or w2_a Kaiming · w2_b zero)."""

    kind = "lokr"

    def __init__(self, in_features: int, out_features: int, net: NetworkConfig, generator: torch.Generator,
                 w1_shape: tuple[int, int] | None = None, factored: bool | None = None):
        """``w1_shape`` / ``factored`` override the split chosen from the config (loading a file)."""
        super().__init__(net)
        if w1_shape is None:
            self.out_l, self.out_k = factorization(out_features, net.lokr_factor)
            self.in_m, self.in_n = factorization(in_features, net.lokr_factor)
        else:
            (self.out_l, self.in_m) = w1_shape
            if out_features % self.out_l or in_features % self.in_m:
                raise ValueError(f"lokr_w1 of shape {tuple(w1_shape)} does not divide a [{out_features}, {in_features}] layer")
            self.out_k, self.in_n = out_features // self.out_l, in_features // self.in_m
        self.w1 = nn.Parameter(torch.empty(self.out_l, self.in_m))
        _uniform_init(self.w1, generator)
        # LyCORIS' rule: factor w2 only when that saves parameters.
        self.factored = net.rank < max(self.out_k, self.in_n) / 2 if factored is None else factored
        if self.factored:
            self.w2_a = nn.Parameter(torch.empty(self.out_k, net.rank))
            self.w2_b = nn.Parameter(torch.zeros(net.rank, self.in_n))
            _uniform_init(self.w2_a, generator)
        else:
            self.w2 = nn.Parameter(torch.zeros(self.out_k, self.in_n))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.factored else 1.0

    def _w2(self) -> torch.Tensor:
        return self.w2_a @ self.w2_b if self.factored else self.w2

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        h = self._input(x, self.w1.dtype)
        grid = h.reshape(*h.shape[:-1], self.in_m, self.in_n)
        # kron(w1, w2)·x = w1 · X · w2ᵀ with x viewed as X [in_m, in_n]; no [out, in] matrix is built.
        out = torch.einsum("ac,...cb->...ab", self.w1, grid @ self._w2().T)
        out = out.reshape(*h.shape[:-1], self.out_l * self.out_k) * self.scale
        if self._use_rank_dropout(out):
            out = out * self._rank_mask(out)
        return out

    def weight_delta(self, base_weight: torch.Tensor) -> torch.Tensor:
        return torch.kron(self.w1, self._w2()) * self.scale

    def file_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {".lokr_w1": self.w1, ".alpha": torch.tensor(self.alpha)}
        if self.factored:
            tensors.update({".lokr_w2_a": self.w2_a, ".lokr_w2_b": self.w2_b})
        else:
            tensors[".lokr_w2"] = self.w2
        return tensors

    def load_file_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.w1.copy_(tensors[".lokr_w1"].float())
            if self.factored:
                self.w2_a.copy_(tensors[".lokr_w2_a"].float())
                self.w2_b.copy_(tensors[".lokr_w2_b"].float())
            else:
                self.w2.copy_(tensors[".lokr_w2"].float())
        self.alpha = float(tensors[".alpha"].item()) if ".alpha" in tensors else float(self.rank)

    def zero_initialised_parameters(self) -> list[nn.Parameter]:
        return [self.w2_b] if self.factored else [self.w2]


class _HadamardWeight(torch.autograd.Function):
    """(w1_a·w1_b) ⊙ (w2_a·w2_b); backward recomputes the two products instead of keeping them."""

    @staticmethod
    def forward(ctx, w1_a, w1_b, w2_a, w2_b):
        ctx.save_for_backward(w1_a, w1_b, w2_a, w2_b)
        return (w1_a @ w1_b) * (w2_a @ w2_b)

    @staticmethod
    def backward(ctx, grad):
        w1_a, w1_b, w2_a, w2_b = ctx.saved_tensors
        grad_1 = grad * (w2_a @ w2_b)
        grad_2 = grad * (w1_a @ w1_b)
        return grad_1 @ w1_b.T, w1_a.T @ grad_1, grad_2 @ w2_b.T, w2_a.T @ grad_2


class LoHaLayer(AdapterLayer):
    """ΔW = s·(w1_a·w1_b) ⊙ (w2_a·w2_b); w2_a starts at zero (LyCORIS' initialisation)."""

    kind = "loha"

    def __init__(self, in_features: int, out_features: int, net: NetworkConfig, generator: torch.Generator):
        super().__init__(net)
        r = net.rank
        self.w1_a = nn.Parameter(torch.randn(out_features, r, generator=generator) * 0.1)
        self.w1_b = nn.Parameter(torch.randn(r, in_features, generator=generator))
        self.w2_a = nn.Parameter(torch.zeros(out_features, r))
        self.w2_b = nn.Parameter(torch.randn(r, in_features, generator=generator))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def _weight(self) -> torch.Tensor:
        return _HadamardWeight.apply(self.w1_a, self.w1_b, self.w2_a, self.w2_b) * self.scale

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(self._input(x, self.w1_a.dtype), self._weight())
        if self._use_rank_dropout(out):
            out = out * self._rank_mask(out)
        return out

    def weight_delta(self, base_weight: torch.Tensor) -> torch.Tensor:
        return self._weight()

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return {".hada_w1_a": self.w1_a, ".hada_w1_b": self.w1_b, ".hada_w2_a": self.w2_a, ".hada_w2_b": self.w2_b,
                ".alpha": torch.tensor(self.alpha)}

    def load_file_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name in ("w1_a", "w1_b", "w2_a", "w2_b"):
                getattr(self, name).copy_(tensors[f".hada_{name}"].float())
        self.alpha = float(tensors[".alpha"].item()) if ".alpha" in tensors else float(self.rank)

    def zero_initialised_parameters(self) -> list[nn.Parameter]:
        return [self.w2_a]


def layer_from_file(module: nn.Linear, tensors: dict[str, torch.Tensor]) -> AdapterLayer:
    """An adapter for ``module`` holding one module's tensors from a file (type, rank, alpha and the LoKr
    split are read from the tensors)."""
    kind = detect_type(set(tensors))
    alpha = float(tensors[".alpha"].item()) if ".alpha" in tensors else None
    generator = torch.Generator().manual_seed(0)  # every value is overwritten from the file
    if kind in ("lora", "dora"):
        rank = int(tensors[".lora_down.weight"].shape[0])
    elif kind == "loha":
        rank = int(tensors[".hada_w1_b"].shape[0])
    else:
        rank = int(tensors[".lokr_w2_b"].shape[0]) if ".lokr_w2_b" in tensors else 1
    net = NetworkConfig(type=kind, rank=rank, alpha=alpha if alpha is not None else float(rank))
    if kind == "lokr":
        layer = LoKrLayer(module.in_features, module.out_features, net, generator,
                          w1_shape=tuple(tensors[".lokr_w1"].shape), factored=".lokr_w2_b" in tensors)
    else:
        layer = make_layer(module, net, generator)
    missing = [suffix for suffix in layer.file_tensors() if suffix != ".alpha" and suffix not in tensors]
    if missing:
        raise ValueError(f"{kind} tensors incomplete: missing {', '.join(missing)}")
    layer.load_file_tensors(tensors)
    return layer


def make_layer(module: nn.Linear, net: NetworkConfig, generator: torch.Generator) -> AdapterLayer:
    if net.type == "lora":
        return LoRALayer(module.in_features, module.out_features, net, generator)
    if net.type == "dora":
        return DoRALayer(module, net, generator)
    if net.type == "lokr":
        return LoKrLayer(module.in_features, module.out_features, net, generator)
    if net.type == "loha":
        return LoHaLayer(module.in_features, module.out_features, net, generator)
    raise ValueError(f"network.type: unknown adapter type {net.type!r}; choose one of {', '.join(NETWORK_TYPES)}")


# Key suffixes of every type, for reading files back (longest first: '.lokr_w2_a' before '.lokr_w2').
FILE_SUFFIXES = {
    "lora": (".lora_down.weight", ".lora_up.weight", ".alpha"),
    "dora": (".lora_down.weight", ".lora_up.weight", ".alpha", ".dora_scale"),
    "lokr": (".lokr_w1", ".lokr_w2_a", ".lokr_w2_b", ".lokr_w2", ".alpha"),
    "loha": (".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".alpha"),
}


def detect_type(suffixes: set[str]) -> str:
    """The adapter type of one module's tensors in a file."""
    if ".dora_scale" in suffixes:
        return "dora"
    if ".lora_down.weight" in suffixes:
        return "lora"
    if ".lokr_w1" in suffixes:
        return "lokr"
    if ".hada_w1_a" in suffixes:
        return "loha"
    raise ValueError(f"no adapter tensors among {sorted(suffixes)}")
