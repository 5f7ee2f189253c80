"""Small synthetic training samples for loop tests (the media → cache path has its own tests)."""

from __future__ import annotations

import torch

from ltx2_av_trainer.trainer.backends.interface import TextContext
from ltx2_av_trainer.trainer.config import Config
from ltx2_av_trainer.trainer.data.batches import LatentSample


def text_widths(config: Config) -> tuple[int, int]:
    tiny = config.model.tiny
    if config.model.version == "2.3":
        return tiny.num_attention_heads * tiny.attention_head_dim, tiny.audio_num_attention_heads * tiny.audio_attention_head_dim
    return tiny.caption_channels, tiny.caption_channels


def make_samples(config: Config, count: int = 4, *, with_audio: bool = True, latent_frames: int = 2, hw: int = 4,
                 audio_frames: int = 13, text_len: int = 8, seed: int = 0) -> list[LatentSample]:
    g = torch.Generator().manual_seed(seed)
    dv, da = text_widths(config)
    samples = []
    for i in range(count):
        samples.append(
            LatentSample(
                id=f"clip{i}",
                video=torch.randn(128, latent_frames, hw, hw, generator=g),
                audio=torch.randn(8, audio_frames, 16, generator=g) if with_audio else None,
                audio_valid_frames=audio_frames - (i % 3),
                text=TextContext(torch.randn(text_len, dv, generator=g), torch.randn(text_len, da, generator=g), torch.ones(text_len)),
                fps=25.0,
            )
        )
    return samples


def tiny_config(tmp_path, **overrides) -> Config:
    base = {
        "train": {"steps": 20, "mixed_precision": "fp32", "device": "cpu", "seed": 3},
        "output": {"dir": str(tmp_path / "run"), "save_every": 10},
        "network": {"rank": 4, "alpha": 4.0},
        "optimizer": {"lr": 1e-3},
        "logging": {"log_every": 5},
    }
    for dotted, value in overrides.items():
        section, key = dotted.split(".", 1)
        base.setdefault(section, {})[key] = value
    return Config.from_dict(base)


def make_structured_sample(config: Config, *, latent_frames: int = 2, hw: int = 4, audio_frames: int = 13,
                           text_len: int = 8, rank: int = 4, seed: int = 0) -> LatentSample:
    """One sample whose latents have the low-rank, smooth structure of real VAE latents (a few channel
    directions times smooth spatial/temporal patterns), for overfit tests."""
    g = torch.Generator().manual_seed(seed)
    dv, da = text_widths(config)

    def smooth(*size):
        coarse = torch.randn(rank, *[max(1, s // 2) for s in size], generator=g)
        return torch.nn.functional.interpolate(coarse[None], size=size, mode="nearest")[0] if len(size) > 1 else coarse

    directions_v = torch.randn(128, rank, generator=g) / rank**0.5
    video = torch.einsum("ck,kfhw->cfhw", directions_v, smooth(latent_frames, hw, hw))
    directions_a = torch.randn(8 * 16, rank, generator=g) / rank**0.5
    audio_patterns = torch.nn.functional.interpolate(torch.randn(1, rank, max(1, audio_frames // 3), generator=g), size=audio_frames, mode="linear")[0]
    audio = torch.einsum("ck,kt->ct", directions_a, audio_patterns).reshape(8, 16, audio_frames).permute(0, 2, 1).contiguous()
    return LatentSample(
        id="structured",
        video=video,
        audio=audio,
        audio_valid_frames=audio_frames,
        text=TextContext(torch.randn(text_len, dv, generator=g), torch.randn(text_len, da, generator=g), torch.ones(text_len)),
        fps=25.0,
    )
