"""Optimizer (with per-module learning-rate groups) and learning-rate schedule from the config.

Learning rate of each adapted module, highest priority first: the first ``optimizer.lr_overrides`` regex
that matches its reference path, ``optimizer.audio_lr`` for audio modules (audio attentions, audio FF, both
cross-modal attentions, the audio text connector), then ``optimizer.lr``. LoRA+ multiplies the
zero-initialised factor's rate within each of those groups. Optional optimizers are imported only when
chosen, with an error that names the package to install.
"""

from __future__ import annotations

import contextlib
import math
import re
from typing import Iterator

import torch

from ..config import ConfigError, OptimizerConfig, ScheduleConfig, parse_lr_override

AUDIO_MODULE = re.compile(
    r"(^|\.)(audio_attn1|audio_attn2|audio_ff|audio_to_video_attn|video_to_audio_attn|audio_embeddings_connector)\."
)
OPTIONAL_PACKAGES = {"adamw8bit": "bitsandbytes", "prodigy": "prodigyopt", "schedule_free_adamw": "schedulefree"}


def is_audio_module(path: str) -> bool:
    return bool(AUDIO_MODULE.search(path + "."))


def module_learning_rate(path: str, cfg: OptimizerConfig) -> tuple[float, str]:
    """(learning rate, group name) of one adapted module."""
    for item in cfg.lr_overrides:
        pattern, lr = parse_lr_override(item)
        if re.search(pattern, path):
            return lr, f"override:{pattern}"
    if cfg.audio_lr is not None and is_audio_module(path):
        return cfg.audio_lr, "audio"
    return cfg.lr, "base"


def parameter_groups(network, cfg: OptimizerConfig) -> list[dict]:
    """Optimizer parameter groups ``{"params", "lr", "name"}`` in a fixed order (first appearance), so the
    optimizer state maps to the same parameters on every resume. Without per-module rates it is one
    group holding ``network.parameters()`` in order."""
    groups: dict[str, dict] = {}
    for path, layer in network.named_layers():
        lr, name = module_learning_rate(path, cfg)
        zero_init = {id(p) for p in layer.zero_initialised_parameters()} if cfg.loraplus_ratio != 1.0 else set()
        for param in layer.parameters():
            if not param.requires_grad:
                continue
            group_name, group_lr = (f"{name}+loraplus", lr * cfg.loraplus_ratio) if id(param) in zero_init else (name, lr)
            groups.setdefault(group_name, {"params": [], "lr": group_lr, "name": group_name})["params"].append(param)
    return list(groups.values())


def build_optimizer(network, cfg: OptimizerConfig, schedule: ScheduleConfig, device: torch.device,
                    extra_groups: list[dict] = ()) -> torch.optim.Optimizer:
    """``extra_groups``: parameters trained alongside the adapter (the representation regularisers' projectors),
    after the adapter's groups so that the optimizer state of runs without them keeps its layout."""
    groups = parameter_groups(network, cfg) + list(extra_groups)
    betas = tuple(cfg.betas)
    if cfg.name == "adamw":
        # The fused kernel (one pass per tensor instead of about ten small ops) on CPU and CUDA; it is
        # deterministic, so resumes stay bit for bit. Elsewhere the single-tensor loop, for the same reason.
        implementation = {"fused": True} if device.type in ("cpu", "cuda") else {"foreach": False}
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay, **implementation)
    if cfg.name == "adamw8bit":
        if device.type != "cuda":
            raise ConfigError(f"optimizer.name = \"adamw8bit\" needs a CUDA device (bitsandbytes' 8-bit optimizers); this run is on {device}. Use \"adamw\".")
        bnb = _import_optional("adamw8bit", "bitsandbytes")
        return bnb.optim.AdamW8bit(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.name == "prodigy":
        prodigyopt = _import_optional("prodigy", "prodigyopt")
        return prodigyopt.Prodigy(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay, decouple=True)
    if cfg.name == "schedule_free_adamw":
        schedulefree = _import_optional("schedule_free_adamw", "schedulefree")
        # The optimizer does its own warm-up; build_scheduler leaves the rate constant for it.
        return schedulefree.AdamWScheduleFree(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                                              warmup_steps=schedule.warmup_steps, foreach=False)
    raise ConfigError(f"optimizer.name: {cfg.name!r} is not supported; choose adamw, adamw8bit, prodigy or schedule_free_adamw")


def _import_optional(name: str, package: str):
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError as exc:
        raise ConfigError(f"optimizer.name = {name!r} needs the {package} package ({exc}): pip install {package}") from None


def optimizer_warnings(cfg: OptimizerConfig) -> list[str]:
    """Settings that run but are almost certainly not what the user wants."""
    found = []
    if cfg.name == "prodigy" and cfg.lr < 0.1:
        found.append(f"optimizer.name = \"prodigy\" with lr = {cfg.lr:g}: Prodigy estimates the step size itself and lr "
                     "multiplies it (normally 1.0); with this lr training will barely move")
    if cfg.name != "prodigy" and cfg.lr >= 0.1:
        found.append(f"optimizer.lr = {cfg.lr:g} is very high for {cfg.name} (1e-4 is typical); did you mean prodigy?")
    return found


# ---- schedule-free optimizers: training vs evaluation weights ---------------------------------------------


def is_schedule_free(optimizer: torch.optim.Optimizer) -> bool:
    return "train_mode" in optimizer.param_groups[0] and hasattr(optimizer, "eval")


def enter_training(optimizer: torch.optim.Optimizer) -> None:
    """Schedule-free optimizers must be in train mode for step(); others need nothing."""
    if is_schedule_free(optimizer):
        optimizer.train()


@contextlib.contextmanager
def evaluation_weights(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> Iterator[None]:
    """For the duration, the parameters hold the weights to export or validate: a schedule-free optimizer's
    averaged point x instead of its gradient point y. Afterwards y is restored bit for bit (switching back
    with ``train()`` alone is not exact in floating point, and resumes must be)."""
    if not is_schedule_free(optimizer):
        yield
        return
    saved = [p.detach().clone() for p in params]
    optimizer.eval()
    try:
        yield
    finally:
        optimizer.train()
        with torch.no_grad():
            for param, value in zip(params, saved):
                param.copy_(value)


# ---- schedule -----------------------------------------------------------------------------------------------


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
    if is_schedule_free(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)  # the optimizer warms up itself
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, cfg))
