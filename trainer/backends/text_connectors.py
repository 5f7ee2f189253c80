"""Text-connector training (text → audio/video adaptation) on the headless diffusers backend.

LTX-2's text path is Gemma-3 → feature extractor (per-layer norm + ``text_proj_in``) → two 1-D transformer
connectors (``video_connector`` / ``audio_connector``, 128 learnable registers) → the denoiser's text
contexts. The cache normally stores the connectors' *outputs* (``TextContext``), which leaves nothing to
train. To adapt the connectors, the cache also stores their *inputs*: the projected features
(``TextFeatures``: ``[L, D_video]``, ``[L, D_audio]`` and the tokenizer mask with the left padding). They are
as small as the contexts themselves (Gemma's raw hidden states would be 49x larger).

``capture_text_features`` takes those inputs from a normal run of diffusers' ``LTX2TextConnectors`` (forward
pre-hooks on both connectors, so the feature extractor is the library's own code), and
``ConnectorStack`` runs the connectors on cached features with gradients. Adapters attach to the connectors'
Linear layers under their reference (ComfyUI) names ``{video,audio}_embeddings_connector.transformer_1d_blocks.N...``.

In ComfyUI the connectors run inside the text encoder (CLIP) before the nodes see the conditioning, so
connector training is not offered there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from ..config import ConfigError
from .interface import TextContext

# diffusers LTX2TextConnectors names → reference (ComfyUI / ltx-core) names.
_CONNECTOR_RENAMES = [
    (r"^video_connector\.transformer_blocks\.", "video_embeddings_connector.transformer_1d_blocks."),
    (r"^audio_connector\.transformer_blocks\.", "audio_embeddings_connector.transformer_1d_blocks."),
]


@dataclass
class TextFeatures:
    """Pre-connector text features of one caption (unbatched ``[L, D]``) or a batch (``[B, L, D]``).

    ``video`` / ``audio`` are the feature extractor's outputs for each connector (the same tensor for LTX-2.0),
    ``mask`` the tokenizer mask (1 = real token, left padding)."""

    video: torch.Tensor
    audio: torch.Tensor
    mask: torch.Tensor

    def to(self, device=None, dtype=None) -> "TextFeatures":
        return TextFeatures(self.video.to(device=device, dtype=dtype), self.audio.to(device=device, dtype=dtype),
                            self.mask.to(device=device))


def connector_reference_path(diffusers_path: str) -> str | None:
    """``audio_connector.transformer_blocks.0.attn1.to_q`` → ``audio_embeddings_connector.transformer_1d_blocks.0.attn1.to_q``;
    None for modules outside the connector blocks (the feature extractor is not a target)."""
    for pattern, repl in _CONNECTOR_RENAMES:
        if re.match(pattern, diffusers_path):
            return re.sub(pattern, repl, diffusers_path, count=1)
    return None


class ConnectorStack:
    """The two connectors of a diffusers ``LTX2TextConnectors``, run on cached ``TextFeatures``."""

    def __init__(self, connectors: nn.Module):
        for name in ("video_connector", "audio_connector"):
            if not hasattr(connectors, name):
                raise ConfigError(
                    f"network.connectors needs diffusers' LTX2TextConnectors (with {name}); got {type(connectors).__name__}"
                )
        self.connectors = connectors.requires_grad_(False).eval()

    def adaptable_modules(self) -> Iterator[tuple[str, nn.Module]]:
        for name, module in self.connectors.named_modules():
            path = connector_reference_path(name)
            if path is not None and isinstance(module, nn.Linear):
                yield path, module

    def to(self, device) -> "ConnectorStack":
        self.connectors.to(device)
        return self

    def __call__(self, features: TextFeatures) -> TextContext:
        """The tail of ``LTX2TextConnectors.forward`` from the connectors' inputs on: additive mask, both
        connectors, the video context masked by the connector's output mask (all ones with registers)."""
        dtype = features.video.dtype
        additive = (features.mask.to(torch.int64) - 1).to(dtype)
        additive = additive.reshape(additive.shape[0], 1, -1, additive.shape[-1]) * torch.finfo(dtype).max
        video, video_mask = self.connectors.video_connector(features.video, additive)
        binary = (video_mask < 1e-6).to(torch.int64).reshape(video.shape[0], video.shape[1], 1)
        video = video * binary
        audio, _ = self.connectors.audio_connector(features.audio, additive)
        return TextContext(video=video, audio=audio, mask=binary.squeeze(-1))


@torch.no_grad()
def capture_text_features(connectors: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor,
                          padding_side: str = "left") -> tuple[TextFeatures, TextContext]:
    """Run diffusers' ``LTX2TextConnectors`` on Gemma hidden states (``TextEncoder.hidden_states``) and return
    the connectors' inputs (for the cache) and the usual contexts. The inputs are read with forward pre-hooks,
    so the feature extractor is exactly the library's."""
    captured: dict[str, torch.Tensor] = {}

    def grab(name):
        def hook(module, args):
            captured[name] = args[0].detach()
        return hook

    handles = [connectors.video_connector.register_forward_pre_hook(grab("video")),
               connectors.audio_connector.register_forward_pre_hook(grab("audio"))]
    try:
        video, audio, mask = connectors(hidden_states, attention_mask, padding_side=padding_side)
    finally:
        for handle in handles:
            handle.remove()
    features = TextFeatures(captured["video"], captured["audio"], attention_mask.to(torch.int64))
    return features, TextContext(video=video, audio=audio, mask=mask.to(torch.int64))
