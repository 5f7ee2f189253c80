"""Per-modality masked losses and the audio loss balancer.

Losses are computed in fp32, masked (audio padding never counts) and renormalised per sample (each
sample's loss is the mean over its own valid elements, so short clips are not diluted by padding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import LossConfig


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, kind: str, huber_delta: float = 1.0) -> torch.Tensor:
    pred, target = pred.float(), target.float()
    if kind == "mse":
        return (pred - target) ** 2
    if kind == "l1":
        return (pred - target).abs()
    if kind == "huber":
        return F.huber_loss(pred, target, reduction="none", delta=huber_delta)
    raise ValueError(f"loss.type: unknown loss {kind!r}; choose mse, l1 or huber")


def masked_per_sample_loss(elem: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``elem`` over each sample's valid elements → ``[B]``. ``mask`` broadcasts against ``elem``."""
    batch = elem.shape[0]
    if mask is None:
        return elem.reshape(batch, -1).mean(dim=1)
    mask = mask.to(elem.dtype).expand_as(elem)
    total = (elem * mask).reshape(batch, -1).sum(dim=1)
    count = mask.reshape(batch, -1).sum(dim=1)
    return total / count.clamp_min(1.0)


def audio_padding_mask(audio_latent: torch.Tensor, valid_frames: torch.Tensor) -> torch.Tensor:
    """``[B, 1, T, 1]`` mask: 1 on each sample's first ``valid_frames`` latent frames."""
    frames = audio_latent.shape[2]
    idx = torch.arange(frames, device=audio_latent.device)
    mask = idx[None, :] < valid_frames.to(audio_latent.device)[:, None]
    return mask[:, None, :, None]


class AudioLossBalancer:
    """Effective audio loss weight per step.

    - ``none``: the fixed ``audio_weight``.
    - ``ema_mag``: w = clamp(w0 · r · EMA(L_v) / EMA(L_a), min, max). Bidirectional: it dampens audio
      when its loss is above r·video (the common LTX-2 case, raw audio MSE ≈ 0.45 vs video ≈ 0.25)
      and boosts it when below.
    - ``inv_freq``: w = clamp(w0 / max(EMA(audio present), eps), min, max): rare audio batches count more.
    """

    def __init__(self, cfg: LossConfig):
        self.cfg = cfg
        self.ema_video: float | None = None
        self.ema_audio: float | None = None
        self.ema_present: float = 1.0
        self.weight: float = cfg.audio_weight

    def update(self, loss_video: float | None, loss_audio: float | None) -> float:
        """Feed this step's raw (detached) losses; returns the weight to apply to this step's audio loss."""
        cfg = self.cfg
        if cfg.balance == "none":
            self.weight = cfg.audio_weight
        elif cfg.balance == "ema_mag":
            if loss_video is not None and loss_audio is not None:
                self.ema_video = _ema(self.ema_video, loss_video, cfg.ema_decay)
                self.ema_audio = _ema(self.ema_audio, loss_audio, cfg.ema_decay)
            if self.ema_video is not None and self.ema_audio is not None and self.ema_audio > 0:
                raw = cfg.audio_weight * cfg.target_ratio * self.ema_video / self.ema_audio
                self.weight = min(max(raw, cfg.balance_min), cfg.balance_max)
            else:
                self.weight = cfg.audio_weight
        elif cfg.balance == "inv_freq":
            present = 1.0 if loss_audio is not None else 0.0
            self.ema_present = (1 - cfg.inv_freq_beta) * self.ema_present + cfg.inv_freq_beta * present
            raw = cfg.audio_weight / max(self.ema_present, cfg.inv_freq_eps)
            self.weight = min(max(raw, cfg.balance_min), cfg.balance_max)
        else:  # guarded by the config's Literal type
            raise ValueError(f"loss.balance: unknown mode {cfg.balance!r}")
        return self.weight

    def state_dict(self) -> dict:
        return {"ema_video": self.ema_video, "ema_audio": self.ema_audio, "ema_present": self.ema_present, "weight": self.weight}

    def load_state_dict(self, state: dict) -> None:
        self.ema_video = state["ema_video"]
        self.ema_audio = state["ema_audio"]
        self.ema_present = state["ema_present"]
        self.weight = state["weight"]


def _ema(previous: float | None, value: float, decay: float) -> float:
    return value if previous is None else decay * previous + (1 - decay) * value
