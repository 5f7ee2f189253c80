"""LoRA adapters that leave the base model untouched.

Why our own small implementation rather than an adapter library: the adapter must run on whatever
forward the host model's Linear layers have — ComfyUI's cast-and-offload ops, fp8 checkpoints,
torchao-quantised weights — without ever reading or merging ``.weight``. Each adapted Linear keeps its
name and its own forward; we only wrap the forward of that instance:
``y = base(x) + (alpha / rank) · up(down(dropout(x)))``. PEFT renames modules (``to_q.base_layer``),
and LyCORIS by default merges the delta into ``org_module.weight`` on every call and selects targets
through class-level global presets, which would leak between two trainings in one ComfyUI process.

Targets are chosen by presets (regexes over reference module paths) plus include/exclude regexes.
``to_gate_logits`` (LTX-2.3) is never adapted: LoRAs there produce NaN gates and black video.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .config import ConfigError, NetworkConfig

_QKVO = r"(to_q|to_k|to_v|to_out\.0)"
_VIDEO_ATTN = r"(attn1|attn2)"
_AUDIO_ATTN = r"(audio_attn1|audio_attn2)"
_CROSS_ATTN = r"(audio_to_video_attn|video_to_audio_attn)"
_ALL_ATTN = r"(attn1|attn2|audio_attn1|audio_attn2|audio_to_video_attn|video_to_audio_attn)"
_FF = r"ff\.net\.(0\.proj|2)"
_AUDIO_FF = r"audio_ff\.net\.(0\.proj|2)"
_BLOCK = r"^transformer_blocks\.\d+\."

TARGET_PRESETS: dict[str, list[str]] = {
    # Official AV recipe: q/k/v/out of all six attentions (video, audio, both cross-modal).
    "av": [_BLOCK + _ALL_ATTN + r"\." + _QKVO + "$"],
    # Audio-only: audio self/text attention and audio FF.
    "audio": [_BLOCK + _AUDIO_ATTN + r"\." + _QKVO + "$", _BLOCK + _AUDIO_FF + "$"],
    # Voice / identity (ID-LoRA style): audio attentions + audio FF + both cross-modal attentions.
    "voice": [_BLOCK + _AUDIO_ATTN + r"\." + _QKVO + "$", _BLOCK + _AUDIO_FF + "$", _BLOCK + _CROSS_ATTN + r"\." + _QKVO + "$"],
    # Video-only: video self/text attention and video FF.
    "video": [_BLOCK + _VIDEO_ATTN + r"\." + _QKVO + "$", _BLOCK + _FF + "$"],
    # Video-to-video / IC-LoRA style: every attention plus both FFNs.
    "v2v": [_BLOCK + _ALL_ATTN + r"\." + _QKVO + "$", _BLOCK + _FF + "$", _BLOCK + _AUDIO_FF + "$"],
    # Every Linear inside the transformer blocks.
    "full": [_BLOCK + r".*"],
}

NEVER_TARGET = re.compile(r"(^|\.)to_gate_logits$")
# Modules that only matter when audio is trained: audio branch and both cross-modal attentions.
AUDIO_OR_CROSS_MODAL = re.compile(r"(^|\.)(audio_attn1|audio_attn2|audio_ff|audio_to_video_attn|video_to_audio_attn)\.")


def select_targets(
    module_paths: Iterable[str], net: NetworkConfig, *, with_audio: bool
) -> list[str]:
    """Reference module paths to adapt, in model order."""
    patterns = [re.compile(p) for p in TARGET_PRESETS[net.preset]]
    try:
        includes = [re.compile(p) for p in net.include]
        excludes = [re.compile(p) for p in net.exclude]
    except re.error as exc:
        raise ConfigError(f"network.include/exclude: invalid regular expression ({exc})") from None
    chosen = []
    dropped_for_video_only = 0
    for path in module_paths:
        if NEVER_TARGET.search(path):
            continue
        if not (any(p.search(path) for p in patterns) or any(p.search(path) for p in includes)):
            continue
        if any(p.search(path) for p in excludes):
            continue
        if not with_audio and AUDIO_OR_CROSS_MODAL.search(path):
            # Without audio signal these modules would still drift through a2v gradients and
            # degrade the base voice (ai-toolkit #1020): never adapt them in a video-only run.
            dropped_for_video_only += 1
            continue
        chosen.append(path)
    if dropped_for_video_only:
        warnings.warn(
            f"video-only run: {dropped_for_video_only} audio/cross-modal modules of preset {net.preset!r} are not "
            "adapted (they would drift without audio supervision and degrade the base voice)",
            stacklevel=2,
        )
    if not chosen:
        raise ConfigError(
            f"network: preset {net.preset!r} with include={net.include} exclude={net.exclude} selects no module"
            + ("" if with_audio else " in a video-only run (audio modules are never adapted without audio)")
        )
    return chosen


class LoRALayer(nn.Module):
    """The trainable pair for one Linear. ``down`` [rank, in] is Kaiming-initialised, ``up`` [out, rank]
    starts at zero so the adapted model starts exactly at the base model."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float, generator: torch.Generator):
        super().__init__()
        self.rank = rank
        self.alpha = float(alpha)
        self.down = nn.Parameter(torch.empty(rank, in_features))
        self.up = nn.Parameter(torch.zeros(out_features, rank))
        bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform(a=√5) bound, as nn.Linear uses
        with torch.no_grad():
            self.down.uniform_(-bound, bound, generator=generator)
        self.dropout = dropout

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(self.down.dtype)
        if self.dropout > 0 and self.training:
            h = F.dropout(h, p=self.dropout)
        return F.linear(F.linear(h, self.down), self.up) * self.scale


@dataclass
class _Attachment:
    module: nn.Module
    layer: LoRALayer


class LoRANetwork(nn.Module):
    """All LoRA layers of one training run, keyed by reference module path."""

    def __init__(self, paths_and_modules: list[tuple[str, nn.Module]], net: NetworkConfig):
        super().__init__()
        self.net_config = net
        generator = torch.Generator().manual_seed(net.init_seed)
        self.layers = nn.ModuleDict()
        self.paths: dict[str, str] = {}  # ModuleDict key → reference path
        self._attached: dict[str, _Attachment] = {}
        self.multiplier = 1.0
        for path, module in paths_and_modules:
            if not isinstance(module, nn.Linear):
                raise ConfigError(f"network: {path} is a {type(module).__name__}, only Linear layers can take a LoRA")
            key = path.replace(".", "__")
            self.layers[key] = LoRALayer(module.in_features, module.out_features, net.rank, net.alpha, net.dropout, generator)
            self.paths[key] = path
            self._attached[key] = _Attachment(module, self.layers[key])

    # ---- attach / detach ----------------------------------------------------------------------

    def attach(self) -> None:
        for key, att in self._attached.items():
            module = att.module
            if "_lora_base_forward" in module.__dict__:
                raise RuntimeError(f"{self.paths[key]} already carries a LoRA; detach the previous network first")
            base_forward = module.forward
            module.__dict__["_lora_base_forward"] = base_forward
            module.forward = _make_forward(base_forward, att.layer, self)

    def detach(self) -> None:
        for att in self._attached.values():
            module = att.module
            base = module.__dict__.pop("_lora_base_forward", None)
            if base is not None:
                module.__dict__.pop("forward", None)

    def set_multiplier(self, value: float) -> None:
        """0 switches the adapter off (base model), 1 is the trained strength."""
        self.multiplier = float(value)

    # ---- views ----------------------------------------------------------------------------------

    def named_layers(self) -> Iterable[tuple[str, LoRALayer]]:
        for key, layer in self.layers.items():
            yield self.paths[key], layer

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _make_forward(base_forward, layer: LoRALayer, network: LoRANetwork):
    def forward(x, *args, **kwargs):
        out = base_forward(x, *args, **kwargs)
        if network.multiplier == 0.0:
            return out
        return out + (layer.delta(x) * network.multiplier).to(out.dtype)

    return forward


def build_lora(denoiser, net: NetworkConfig, *, with_audio: bool) -> LoRANetwork:
    modules = dict(denoiser.adaptable_modules())
    targets = select_targets(modules.keys(), net, with_audio=with_audio)
    network = LoRANetwork([(p, modules[p]) for p in targets], net)
    network.attach()
    return network


def load_lora_file(denoiser, path, *, multiplier: float = 1.0) -> LoRANetwork:
    """Attach a LoRA file (our export or any ``diffusion_model.<path>.lora_down/up`` file) to ``denoiser``
    for sampling. Rank and alpha are read per module from the file."""
    from .export import KEY_PREFIX, read_lora, split_lora_key

    tensors, _ = read_lora(path)
    modules = dict(denoiser.adaptable_modules())
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        parsed = split_lora_key(key)
        if parsed is None:
            continue
        grouped.setdefault(parsed[0], {})[parsed[1]] = tensor
    unknown = sorted(p for p in grouped if p not in modules)
    if unknown:
        raise ConfigError(f"{path}: {len(unknown)} LoRA modules are not in this model (first: {unknown[0]}); "
                          "was it trained for another model version?")
    ranks = {p: t[".lora_down.weight"].shape[0] for p, t in grouped.items() if ".lora_down.weight" in t}
    if not ranks:
        raise ConfigError(f"{path}: no lora_down/lora_up tensors found")
    rank = next(iter(ranks.values()))
    net = NetworkConfig(rank=rank, alpha=float(rank))
    network = LoRANetwork([(p, modules[p]) for p in ranks], net)
    with torch.no_grad():
        for key, layer in network.layers.items():
            entry = grouped[network.paths[key]]
            if entry[".lora_down.weight"].shape[0] != layer.rank:
                raise ConfigError(f"{path}: mixed ranks are not supported for sampling ({network.paths[key]})")
            layer.down.copy_(entry[".lora_down.weight"].float())
            layer.up.copy_(entry[".lora_up.weight"].float())
            layer.alpha = float(entry[".alpha"].item()) if ".alpha" in entry else float(layer.rank)
    network.set_multiplier(multiplier)
    network.attach()
    return network
