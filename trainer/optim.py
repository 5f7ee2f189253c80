"""Optimizer and learning-rate schedule from the config."""

from __future__ import annotations

import math

import torch

from .config import OptimizerConfig, ScheduleConfig


def build_optimizer(params, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.name == "adamw":
        # foreach=False keeps the update order (and so the bits) identical across resumes and
        # between CPU runs of different lengths.
        return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay, foreach=False)
    raise ValueError(f"optimizer.name: {cfg.name!r} is not supported; choose adamw")


def lr_factor(step: int, total_steps: int, cfg: ScheduleConfig) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based)."""
    warmup = cfg.warmup_steps if cfg.name != "constant" else 0
    if warmup and step < warmup:
        return (step + 1) / warmup
    if cfg.name in ("constant", "constant_with_warmup"):
        return 1.0
    decay_steps = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    floor = cfg.min_lr_ratio
    if cfg.name == "linear":
        return floor + (1 - floor) * (1 - progress)
    if cfg.name == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.name == "cosine_with_restarts":
        if progress >= 1.0:
            return floor
        cycle_progress = (progress * cfg.num_cycles) % 1.0
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * cycle_progress))
    raise ValueError(f"schedule.name: unknown schedule {cfg.name!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, cfg: ScheduleConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, cfg))
