"""Adapters (LoRA, DoRA, LoKr, LoHa) that leave the base model untouched.

Why our own small implementation rather than an adapter library: the adapter must run on whatever
forward the host model's Linear layers have — ComfyUI's cast-and-offload ops, fp8 checkpoints,
torchao-quantised weights — without ever writing or merging ``.weight``. Each adapted Linear keeps its
name and its own forward; we only wrap the forward of that instance (the per-type math is in
``layers.py``; LoRA: ``y = base(x) + (alpha / rank) · up(down(dropout(x)))``). PEFT renames
modules (``to_q.base_layer``), and LyCORIS by default merges the delta into ``org_module.weight`` on every
call and selects targets through class-level global presets, which would leak between two trainings in
one ComfyUI process.

Targets are chosen by presets (regexes over reference module paths) plus include/exclude regexes, and
optionally the text connectors (``network.connectors``). ``to_gate_logits`` (LTX-2.3) is never adapted:
LoRAs there produce NaN gates and black video. Module dropout skips a whole adapted layer for one forward.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from torch import nn

from ..config import ConfigError, NetworkConfig
from .layers import AdapterLayer, detect_type, layer_from_file, make_layer

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
# The audio branch alone (the audio-only mode): no cross-modal attention, which would attach to the stand-in video.
AUDIO_BRANCH = re.compile(r"(^|\.)(audio_attn1|audio_attn2|audio_ff)\.")


def select_targets(
    module_paths: Iterable[str], net: NetworkConfig, *, with_audio: bool, audio_only: bool = False
) -> list[str]:
    """Reference module paths to adapt, in model order. ``audio_only``: only the audio branch (audio-only mode)."""
    patterns = [re.compile(p) for p in TARGET_PRESETS[net.preset]]
    try:
        includes = [re.compile(p) for p in net.include]
        excludes = [re.compile(p) for p in net.exclude]
    except re.error as exc:
        raise ConfigError(f"network.include/exclude: invalid regular expression ({exc})") from None
    chosen = []
    dropped_for_video_only = dropped_for_audio_only = 0
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
        if audio_only and not AUDIO_BRANCH.search(path):
            # The video branch sees only the stand-in, and cross-modal layers would tie the voice to it.
            dropped_for_audio_only += 1
            continue
        chosen.append(path)
    if dropped_for_video_only:
        warnings.warn(
            f"video-only run: {dropped_for_video_only} audio/cross-modal modules of preset {net.preset!r} are not "
            "adapted (they would drift without audio supervision and degrade the base voice)",
            stacklevel=2,
        )
    if dropped_for_audio_only:
        warnings.warn(
            f"audio-only run: {dropped_for_audio_only} video/cross-modal modules of preset {net.preset!r} are not "
            "adapted (only audio_attn1, audio_attn2 and audio_ff are)",
            stacklevel=2,
        )
    if not chosen:
        raise ConfigError(
            f"network: preset {net.preset!r} with include={net.include} exclude={net.exclude} selects no module"
            + ("" if with_audio else " in a video-only run (audio modules are never adapted without audio)")
            + (" in an audio-only run (only audio_attn1, audio_attn2 and audio_ff are adapted)" if audio_only else "")
        )
    return chosen


@dataclass
class _Attachment:
    module: nn.Module
    layer: AdapterLayer


def is_linear_like(module: nn.Module) -> bool:
    """An ``nn.Linear``, or a layer that acts as one without subclassing it (ComfyUI's quantised-checkpoint
    Linear): integer ``in_features`` / ``out_features`` and a ``weight``. The adapter only wraps its forward."""
    if isinstance(module, nn.Linear):
        return True
    return (isinstance(getattr(module, "in_features", None), int) and isinstance(getattr(module, "out_features", None), int)
            and hasattr(module, "weight"))


class LoRANetwork(nn.Module):
    """All adapter layers of one training run (of one ``network.type``), keyed by reference module path."""

    def __init__(self, paths_and_modules: list[tuple[str, nn.Module]], net: NetworkConfig, make_for_path=None):
        """``make_for_path(path, module)`` builds a layer per module (loading a file); default: from ``net``."""
        super().__init__()
        self.net_config = net
        generator = torch.Generator().manual_seed(net.init_seed)
        self.layers = nn.ModuleDict()
        self.paths: dict[str, str] = {}  # ModuleDict key → reference path
        self._attached: dict[str, _Attachment] = {}
        self.multiplier = 1.0
        self.module_dropout = net.module_dropout
        for path, module in paths_and_modules:
            if not is_linear_like(module):
                raise ConfigError(f"network: {path} is a {type(module).__name__}, only Linear layers can take an adapter")
            key = path.replace(".", "__")
            self.layers[key] = make_layer(module, net, generator) if make_for_path is None else make_for_path(path, module)
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

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """The base model for the duration (preservation and audio-DOP targets)."""
        previous = self.multiplier
        self.multiplier = 0.0
        try:
            yield
        finally:
            self.multiplier = previous

    # ---- views ----------------------------------------------------------------------------------

    def named_layers(self) -> Iterable[tuple[str, AdapterLayer]]:
        for key, layer in self.layers.items():
            yield self.paths[key], layer

    def module_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """Reference path → the layer's tensors by key suffix (``layers.FILE_SUFFIXES``), detached, float32."""
        return {path: {suffix: tensor.detach().float() for suffix, tensor in layer.file_tensors().items()}
                for path, layer in self.named_layers()}

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _make_forward(base_forward, layer: AdapterLayer, network: LoRANetwork):
    def forward(x, *args, **kwargs):
        if network.multiplier == 0.0:
            return base_forward(x, *args, **kwargs)
        if network.module_dropout > 0 and layer.training and float(torch.rand(())) < network.module_dropout:
            return base_forward(x, *args, **kwargs)  # module dropout: this layer is the base layer this time
        return layer.adapted_forward(base_forward, x, args, kwargs, network.multiplier)

    return forward


CONNECTOR_PATTERNS = {
    "audio": re.compile(r"^audio_embeddings_connector\."),
    "video_audio": re.compile(r"^(video|audio)_embeddings_connector\."),
}


def select_connector_targets(module_paths: Iterable[str], net: NetworkConfig) -> list[str]:
    """Connector Linear layers to adapt for ``network.connectors`` (include/exclude apply too)."""
    if net.connectors == "off":
        return []
    pattern = CONNECTOR_PATTERNS[net.connectors]
    excludes = [re.compile(p) for p in net.exclude]
    chosen = [p for p in module_paths if pattern.search(p) and not any(e.search(p) for e in excludes)]
    if not chosen:
        raise ConfigError(f"network.connectors = {net.connectors!r} selects no connector module")
    return chosen


def build_lora(denoiser, net: NetworkConfig, *, with_audio: bool, connectors=None, audio_only: bool = False) -> LoRANetwork:
    """The adapter network on the denoiser's targets (and the text connectors' when ``network.connectors``
    is on; ``connectors`` is a ``ConnectorStack``), attached. ``audio_only``: the audio branch alone."""
    modules = dict(denoiser.adaptable_modules())
    targets = select_targets(modules.keys(), net, with_audio=with_audio, audio_only=audio_only)
    pairs = [(p, modules[p]) for p in targets]
    if net.connectors != "off":
        if connectors is None:
            raise ConfigError(
                f"network.connectors = {net.connectors!r} needs the text connectors and pre-connector text features "
                "(headless diffusers backend: the pipeline passes them). The ComfyUI nodes cannot train the connectors "
                "(ComfyUI runs them inside the text encoder); set network.connectors = \"off\""
            )
        if not with_audio:
            raise ConfigError("network.connectors: a video-only run does not adapt connectors (no audio supervision); set it to \"off\"")
        connector_modules = dict(connectors.adaptable_modules())
        pairs += [(p, connector_modules[p]) for p in select_connector_targets(connector_modules.keys(), net)]
    network = LoRANetwork(pairs, net)
    network.attach()
    return network


def load_lora_file(denoiser, path, *, multiplier: float = 1.0, connectors=None) -> LoRANetwork:
    """Attach an adapter file to ``denoiser`` (and ``connectors`` for connector keys) for sampling: our export, or
    a LoRA / DoRA / LoKr / LoHa file in any layout ``formats.parse_lora`` reads (ComfyUI, kohya / musubi-tuner,
    diffusers, PEFT). Type, rank, alpha and the LoKr split are read per module from the file."""
    from ..backends.diffusers_backend import diffusers_to_reference_path
    from .files import read_adapter_file
    from .formats import parse_lora

    tensors, metadata = read_adapter_file(path)
    # Files of other trainers may also adapt Linear layers outside the blocks (ai-toolkit adapts every one).
    modules = {diffusers_to_reference_path(name): module for name, module in denoiser.module.named_modules()
               if name and is_linear_like(module)}
    modules.update(denoiser.adaptable_modules())
    if connectors is not None:
        modules.update(connectors.adaptable_modules())
    parsed = parse_lora(tensors, metadata)
    grouped = parsed.modules
    if not grouped:
        reasons = sorted(set(parsed.unconvertible.values()))
        raise ConfigError(f"{path}: no adapter tensors (lora_A/B, lora_down/up, lokr_*, hada_*) found"
                          + (f" ({reasons[0]})" if reasons else ""))
    if parsed.unconvertible:
        key, why = next(iter(parsed.unconvertible.items()))
        raise ConfigError(f"{path}: {len(parsed.unconvertible)} keys cannot be applied (first: {key}: {why}); "
                          "`ltx2-av-trainer verify` lists them")
    unknown = sorted(p for p in grouped if p not in modules)
    if unknown:
        hint = " (text-connector modules: pass the connectors)" if any("embeddings_connector" in p for p in unknown) else ""
        raise ConfigError(f"{path}: {len(unknown)} adapter modules are not in this model (first: {unknown[0]}){hint}; "
                          "was it trained for another model version?")

    def make_for_path(module_path: str, module: nn.Module) -> AdapterLayer:
        try:
            return layer_from_file(module, grouped[module_path])
        except (ValueError, KeyError) as exc:
            raise ConfigError(f"{path}: {module_path}: {exc}") from None

    kinds = sorted({detect_type(set(t)) for t in grouped.values()})
    first = next(iter(grouped.values()))
    net = NetworkConfig(type=kinds[0], rank=1, alpha=float(first[".alpha"].item()) if ".alpha" in first else 1.0)
    network = LoRANetwork([(p, modules[p]) for p in grouped], net, make_for_path)
    network.set_multiplier(multiplier)
    network.attach()
    return network
