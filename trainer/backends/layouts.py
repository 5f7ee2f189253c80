"""Where conditioning tokens sit in the model's sequences: the positions ComfyUI's core inference nodes give them.

Both backends lay out the conditioning of the training modes with these functions, so a LoRA trained on either
meets at inference exactly what ComfyUI's nodes feed the model:

- **IC-LoRA guide** (``LTXVAddGuide`` with ``frame_idx = 0``, ``GetICLoRAParameters``): the clean reference latents
  are appended after the video tokens with σ = 0. Their positions are those of the first guide-length latent frames
  of the video (causal time: the first latent frame spans pixel frame 0 alone). With a spatial downscale factor
  ``f`` the reference was encoded at 1/f of the video's width and height; ComfyUI spreads its latent over the
  video's grid (token ``(h, w)`` of the reference sits at ``(f·h, f·w)``, the positions in between are dropped from
  the sequence), and each reference token spans ``f`` video tokens per spatial axis: its RoPE end is moved by
  ``(f - 1)`` latent cells so that the token's middle is the middle of the area it covers.
- **ID-LoRA reference audio** (``LTXVReferenceAudio``): the clean reference audio tokens are prepended to the audio
  sequence with σ = 0 and negative times: the reference's own (causal) times shifted so that it ends one audio
  latent step (40 ms) before t = 0.

Positions are ``[B, axes, tokens, 2]`` (start, end) in the units ComfyUI computes them in: video in pixels (time in
pixel frames, divided by the frame rate only when the rotary embedding is built), audio in seconds.
"""

from __future__ import annotations

import torch

from .interface import AUDIO_SAMPLE_RATE

VIDEO_SCALE_FACTORS = (8, 32, 32)  # pixel frames per latent frame, pixels per latent cell (height, width)
AUDIO_HOP_LENGTH = 160  # mel hop in samples at 16 kHz
AUDIO_LATENT_DOWNSAMPLE = 4  # mel frames per audio latent
AUDIO_SECONDS_PER_LATENT = AUDIO_HOP_LENGTH * AUDIO_LATENT_DOWNSAMPLE / AUDIO_SAMPLE_RATE  # 0.04 s


def guide_downscale(video_shape, guide_shape) -> int:
    """The spatial downscale factor of a guide latent ``[B, C, Fg, Hg, Wg]`` against the video ``[B, C, F, H, W]``
    (what ``GetICLoRAParameters`` reads from the LoRA); a clear error when the shapes cannot belong together."""
    frames, height, width = video_shape[2:]
    guide_frames, guide_height, guide_width = guide_shape[2:]
    factor = height // guide_height if guide_height else 0
    if (factor < 1 or guide_height * factor != height or guide_width * factor != width) or guide_frames > frames:
        raise ValueError(
            f"reference latent {list(guide_shape[2:])} does not fit the video latent {list(video_shape[2:])}: the "
            "reference must have at most as many latent frames and 1/f of the video's height and width for one whole "
            "factor f (dataset.reference_downscale); re-run the cache"
        )
    return factor


def _causal_time(latent_frames: torch.Tensor) -> torch.Tensor:
    """Pixel frame of latent frame boundaries, the first latent frame spanning pixel frame 0 alone."""
    return (latent_frames * VIDEO_SCALE_FACTORS[0] + 1 - VIDEO_SCALE_FACTORS[0]).clamp(min=0)


def guide_positions(guide_frames: int, guide_height: int, guide_width: int, factor: int, batch: int,
                    *, dilated: bool = False, device=None) -> torch.Tensor:
    """Pixel positions ``[B, 3, N, 2]`` of a guide latent's tokens, as ``LTXVAddGuide`` (frame 0) lays them out.

    ``dilated=False``: the ``Fg·Hg·Wg`` tokens the model sees, in (frame, height, width) order. ``dilated=True``:
    every cell of the video-sized grid the guide is spread over (``Fg·(f·Hg)·(f·Wg)``), the dropped cells included,
    which is the form ComfyUI's ``keyframe_idxs`` takes before its grid mask filters them."""
    step = 1 if dilated else factor
    rows, cols = (guide_height * factor, guide_width * factor) if dilated else (guide_height, guide_width)
    t = torch.arange(guide_frames, dtype=torch.float32, device=device)
    h = torch.arange(rows, dtype=torch.float32, device=device) * step
    w = torch.arange(cols, dtype=torch.float32, device=device) * step
    grid_t, grid_h, grid_w = torch.meshgrid(t, h, w, indexing="ij")
    grid_t, grid_h, grid_w = grid_t.flatten(), grid_h.flatten(), grid_w.flatten()
    extra = factor - 1  # end moved so that the token's middle is the middle of the f x f cells it covers
    time = torch.stack([_causal_time(grid_t), _causal_time(grid_t + 1)], dim=-1)
    height = torch.stack([grid_h, grid_h + 1 + extra], dim=-1) * VIDEO_SCALE_FACTORS[1]
    width = torch.stack([grid_w, grid_w + 1 + extra], dim=-1) * VIDEO_SCALE_FACTORS[2]
    return torch.stack([time, height, width], dim=0).unsqueeze(0).expand(batch, -1, -1, -1).contiguous()


def dilate_guide(guide: torch.Tensor, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The guide spread over the video-sized grid (zeros between its cells) and a per-cell keep mask
    ``[B, 1, Fg, f·Hg, f·Wg]`` (True where a guide token sits): ComfyUI's sequence holds only the kept cells."""
    batch, channels, frames, height, width = guide.shape
    spread = guide.new_zeros(batch, channels, frames, height * factor, width * factor)
    spread[..., ::factor, ::factor] = guide
    keep = torch.zeros(batch, 1, frames, height * factor, width * factor, dtype=torch.bool, device=guide.device)
    keep[..., ::factor, ::factor] = True
    return spread, keep


def audio_times(start: int, end: int, device=None) -> torch.Tensor:
    """Causal start times (seconds) of audio latents ``start..end-1`` (the first spans one mel frame)."""
    latents = torch.arange(start, end, dtype=torch.float32, device=device)
    mel = (latents * AUDIO_LATENT_DOWNSAMPLE + 1 - AUDIO_LATENT_DOWNSAMPLE).clamp(min=0)
    return mel * AUDIO_HOP_LENGTH / AUDIO_SAMPLE_RATE


def reference_audio_positions(tokens: int, batch: int, device=None) -> torch.Tensor:
    """Times ``[B, 1, tokens, 2]`` (seconds) of prepended reference audio tokens, as ``LTXVReferenceAudio`` places
    them: the reference's own times shifted to end one audio latent step before t = 0."""
    start = audio_times(0, tokens, device)
    end = audio_times(1, tokens + 1, device)
    offset = float(end[-1]) + AUDIO_SECONDS_PER_LATENT
    positions = torch.stack([start - offset, end - offset], dim=-1)
    return positions.view(1, 1, tokens, 2).expand(batch, -1, -1, -1).contiguous()
