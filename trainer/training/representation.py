"""Representation regularisers on the transformer's video hidden states: CREPA and Self-Flow.

Both align the hidden states of a *student* block, through a small trainable projector (two Linear layers of the
video width with a SiLU between), with those of a deeper *teacher* block, by cosine similarity per video token.
Each term is ``1 - cos``, averaged: 0 when the projected student features point where the teacher's do, up to 2.
The hidden states are read with forward hooks while the denoiser runs (``backends/features.py``), so both backends
work, with or without gradient checkpointing.

- **CREPA** (``[crepa]``, backbone mode): the teacher is a deeper block of the *same* training forward, detached;
  each latent frame of the student aligns with the teacher's frames within ``num_neighbors`` on each side (the same
  spatial token), weighted ``exp(-|f - k| / tau)``. No extra forward.
- **Self-Flow** (``[self_flow]``): the teacher is the frozen base model (LoRA multipliers zeroed) in one extra
  forward without gradient. With dual-timestep noising a second σ is drawn; a share ``mask_ratio`` of the video
  tokens (or latent frames) gets the higher σ in the training forward, every other token the lower one, and the
  teacher sees every token at the lower σ (the same noise), so the student must infer what the teacher sees more
  clearly. The flow-matching loss of the training forward is unchanged (its target ε - x0 does not depend on σ).
  Optional temporal terms on per-frame mean-pooled features: ``frame`` aligns each frame with the teacher's
  neighbouring frames, ``delta`` aligns the frame-to-frame changes.

Gradients reach the projector and the adapters of the blocks up to the student block; the teacher features carry
none. The projectors train in the optimizer (their own parameter group), are saved in the run's resumable state and
never enter the exported LoRA. Weights can ramp up (``warmup_steps``) and decay (``schedule``), as functions of the
step alone, so a resumed run continues bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch
from torch import nn

from ..backends.interface import DenoiserInput, video_token_count
from ..config import Config, ConfigError, OptimizerConfig, TimestepConfig
from .timesteps import add_noise, sample_sigmas

PROJECTOR_SEED = 0x5EF  # the projectors' initialisation is fixed (and independent of every other random stream)


# ---- the loss terms ---------------------------------------------------------------------------------------------


def neighbour_alignment(student: torch.Tensor, teacher: torch.Tensor, num_neighbors: int, tau: float) -> torch.Tensor:
    """Mean over batch, frames and tokens of ``Σ_k w_k (1 - cos(student[f], teacher[k])) / Σ_k w_k`` for the frames k
    within ``num_neighbors`` of f, ``w_k = exp(-|f - k| / tau)``. ``student``, ``teacher``: ``[B, F, S, D]`` (S
    tokens per frame, compared position by position; S = 1 for pooled frames)."""
    frames = student.shape[1]
    s = nn.functional.normalize(student.float(), dim=-1)
    t = nn.functional.normalize(teacher.float(), dim=-1)
    weighted = torch.zeros(student.shape[:3], device=student.device)
    total_weight = torch.zeros(frames, device=student.device)
    for offset in range(-min(num_neighbors, frames - 1), min(num_neighbors, frames - 1) + 1):
        weight = math.exp(-abs(offset) / tau)
        lo, hi = max(0, -offset), min(frames, frames - offset)  # frames f with f + offset inside the clip
        cosine = (s[:, lo:hi] * t[:, lo + offset : hi + offset]).sum(-1)
        weighted[:, lo:hi] += weight * (1 - cosine)
        total_weight[lo:hi] += weight
    return (weighted / total_weight.view(1, frames, 1)).mean()


def token_alignment(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean of ``1 - cos`` over the tokens of ``[..., D]`` features."""
    return (1 - nn.functional.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()


def delta_alignment(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``1 - cos`` of the frame-to-frame changes of ``[B, F, D]`` features (F >= 2), averaged."""
    return token_alignment(student[:, 1:] - student[:, :-1], teacher[:, 1:] - teacher[:, :-1])


def weight_at(step: int, total_steps: int, schedule: str, warmup_steps: int) -> float:
    """Multiplier of a regulariser's weight at optimizer step ``step`` (0-based): a linear warm-up from 0, then
    constant or a linear / cosine decay to 0 at ``total_steps``."""
    ramp = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    if schedule == "constant":
        return ramp
    progress = min(1.0, step / max(1, total_steps))
    decay = 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return ramp * decay


# ---- the projector and the block choice -------------------------------------------------------------------------


class Projector(nn.Module):
    """student width → hidden → teacher width, SiLU between (REPA's projector, two layers)."""

    def __init__(self, width: int, hidden: int, generator: torch.Generator):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, width))
        with torch.no_grad():
            for layer in (self.net[0], self.net[2]):
                bound = 1.0 / math.sqrt(layer.in_features)  # nn.Linear's own range, from our generator
                layer.weight.uniform_(-bound, bound, generator=generator)
                layer.bias.uniform_(-bound, bound, generator=generator)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features.float())


def resolve_blocks(section: str, student: int, teacher: int, depth: int, auto: tuple[int, int]) -> tuple[int, int]:
    """(student, teacher) block indices with -1 replaced by ``auto``; a clear error when they do not fit the model."""
    student = auto[0] if student < 0 else student
    teacher = min(auto[1], depth - 1) if teacher < 0 else teacher
    if not (0 <= student < teacher < depth):
        raise ConfigError(
            f"{section}: student block {student} and teacher block {teacher} do not fit this model's {depth} blocks "
            f"(need 0 <= student_block_idx < teacher_block_idx <= {depth - 1}; -1 picks them from the depth)"
        )
    return student, teacher


def _require_hooks(denoiser, option: str) -> None:
    if not all(hasattr(denoiser, name) for name in ("block_features", "num_blocks", "video_width")):
        raise ConfigError(f"{option} needs the transformer blocks' hidden states, which the {type(denoiser).__name__} "
                          "backend does not expose; turn it off")


# ---- dual-timestep noising ----------------------------------------------------------------------------------------


class DualTimestep:
    """Self-Flow's noising of the training forward's video (``training_step(..., dual_timestep=...)``), remembering
    what the teacher sees."""

    def __init__(self, timesteps: TimestepConfig, version: str, mask_ratio: float, frame_level: bool):
        self.timesteps = timesteps
        self.version = version
        self.mask_ratio = mask_ratio
        self.frame_level = frame_level
        self.mask: torch.Tensor | None = None  # [B, N] True where the student has the higher σ
        self.teacher_video: torch.Tensor | None = None  # every token at the lower σ
        self.teacher_sigma: torch.Tensor | None = None  # [B] the lower σ

    def noise(self, video: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, generator: torch.Generator):
        """(the student's noisy video, its per-token σ ``[B, F'·H'·W']``) for clean ``video``, ``noise`` and the
        drawn σ ``[B]``; a second σ and the mask come from ``generator``."""
        batch, _, frames, height, width = video.shape
        second = sample_sigmas(self.timesteps, self.version, batch, video_token_count(video), generator).to(sigma.device)
        low, high = torch.minimum(sigma, second), torch.maximum(sigma, second)
        if self.frame_level:
            mask = (torch.rand(batch, frames, generator=generator) < self.mask_ratio).repeat_interleave(height * width, dim=1)
        else:
            mask = torch.rand(batch, frames * height * width, generator=generator) < self.mask_ratio
        mask = mask.to(sigma.device)
        token_sigma = torch.where(mask, high[:, None], low[:, None])
        self.mask, self.teacher_sigma = mask, low
        self.teacher_video = add_noise(video, noise, low)
        return add_noise(video, noise, token_sigma), token_sigma

    def teacher_inputs(self, student: DenoiserInput) -> DenoiserInput:
        """The student's input with the masked tokens at the lower σ. Tokens the training mode made conditioning
        (σ = 0, clean: a first frame) stay as the student has them."""
        sigma = student.sigma_video
        token_sigma = sigma if sigma.ndim == 2 else sigma[:, None].expand(-1, self.mask.shape[1])
        replace = self.mask & (token_sigma != 0)
        video_replace = replace.reshape(student.video.shape[0], 1, *student.video.shape[2:])
        video = torch.where(video_replace, self.teacher_video.to(student.video.dtype), student.video)
        teacher_sigma = torch.where(replace, self.teacher_sigma[:, None].to(token_sigma.dtype), token_sigma)
        return dataclasses.replace(student, video=video, sigma_video=teacher_sigma)


# ---- the regularisers of one run -----------------------------------------------------------------------------------


@dataclasses.dataclass
class _Alignment:
    name: str  # "crepa" / "self_flow"
    student: int
    teacher: int
    projector: Projector


class RepresentationAlignment:
    """CREPA and Self-Flow for one run (either, both or none). With none on, ``capture`` opens nothing and ``terms``
    is empty, so the loop calls them unconditionally."""

    def __init__(self, config: Config, denoiser, device: torch.device):
        self.config = config
        self.crepa: _Alignment | None = None
        self.self_flow: _Alignment | None = None
        self.dual_timestep: DualTimestep | None = None
        self.projectors = nn.ModuleDict()
        c, f = config.crepa, config.self_flow
        if not (c.enabled or f.enabled):
            return
        generator = torch.Generator().manual_seed(PROJECTOR_SEED)
        if c.enabled:
            _require_hooks(denoiser, "crepa.enabled")
            depth = denoiser.num_blocks
            blocks = resolve_blocks("crepa", c.student_block_idx, c.teacher_block_idx, depth, (depth // 3, 2 * depth // 3))
            self.crepa = _Alignment("crepa", *blocks, Projector(denoiser.video_width, denoiser.video_width, generator))
            self.projectors["crepa"] = self.crepa.projector
        if f.enabled:
            _require_hooks(denoiser, "self_flow.enabled")
            depth = denoiser.num_blocks
            blocks = resolve_blocks("self_flow", f.student_block_idx, f.teacher_block_idx, depth,
                                    (math.floor(0.3 * depth), math.ceil(0.7 * depth)))
            self.self_flow = _Alignment("self_flow", *blocks, Projector(denoiser.video_width, denoiser.video_width, generator))
            self.projectors["self_flow"] = self.self_flow.projector
            if f.dual_timestep:
                self.dual_timestep = DualTimestep(config.timesteps, config.model.version, f.mask_ratio, f.frame_level_mask)
        self.projectors.to(device)

    @property
    def active(self) -> bool:
        return self.crepa is not None or self.self_flow is not None

    @property
    def term_names(self) -> list[str]:
        names = ["crepa"] if self.crepa is not None else []
        if self.self_flow is not None:
            mode = self.config.self_flow.temporal_mode
            names += ["self_flow"] + (["self_flow_frame"] if mode in ("frame", "hybrid") else []) + (
                ["self_flow_delta"] if mode in ("delta", "hybrid") else [])
        return names

    # ---- optimizer and state ---------------------------------------------------------------------------------

    def parameter_groups(self, optimizer: OptimizerConfig) -> list[dict]:
        """One optimizer group per projector, after the adapter's groups."""
        groups = []
        for name, projector in self.projectors.items():
            lr = getattr(self.config, name).projector_lr
            groups.append({"params": list(projector.parameters()), "lr": optimizer.lr if lr is None else lr,
                           "name": f"projector:{name}"})
        return groups

    def parameters(self) -> list[torch.Tensor]:
        return list(self.projectors.parameters())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {key: value.detach() for key, value in self.projectors.state_dict().items()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        expected = set(self.projectors.state_dict())
        if set(tensors) != expected:
            raise ConfigError(f"{where}: the saved projectors ({sorted(tensors) or 'none'}) do not match this run's "
                              f"({sorted(expected) or 'none'}); use a new output.dir, or --no-resume to start over")
        self.projectors.load_state_dict(tensors)

    # ---- one micro-batch ----------------------------------------------------------------------------------------

    def capture(self, denoiser, video_tokens: int):
        """Open around the training forward: captures the blocks the terms need (nothing when none is on)."""
        blocks: set[int] = set()
        if self.crepa is not None:
            blocks |= {self.crepa.student, self.crepa.teacher}
        if self.self_flow is not None:
            blocks.add(self.self_flow.student)  # its teacher comes from the base model's own forward
        if not blocks:
            return contextlib.nullcontext()
        return denoiser.block_features(sorted(blocks), video_tokens)

    def terms(self, features, inputs: DenoiserInput | None, denoiser, network, step: int, device: torch.device,
              autocast_dtype) -> list[tuple[str, torch.Tensor, float]]:
        """``(name, unweighted value, weight)`` of every active term for the training forward that ``features``
        captured (``inputs``: what that forward saw)."""
        if features is None or inputs is None:
            return []
        found = []
        batch, _, frames, height, width = inputs.video.shape
        total = self.config.train.steps
        if self.crepa is not None:
            c = self.config.crepa
            student = self.crepa.projector(features.video(self.crepa.student, batch))
            teacher = features.video(self.crepa.teacher, batch).detach()
            value = neighbour_alignment(_frames(student, frames), _frames(teacher, frames), c.num_neighbors, c.tau)
            found.append(("crepa", value, c.lambda_crepa * weight_at(step, total, c.schedule, c.warmup_steps)))
        if self.self_flow is not None:
            found += self._self_flow_terms(features, inputs, denoiser, network, step, device, autocast_dtype)
        return found

    def _self_flow_terms(self, features, inputs, denoiser, network, step, device, autocast_dtype):
        f = self.config.self_flow
        batch, frames = inputs.video.shape[0], inputs.video.shape[2]
        teacher_inputs = self.dual_timestep.teacher_inputs(inputs) if self.dual_timestep is not None else inputs
        with torch.no_grad(), network.disabled(), denoiser.block_features([self.self_flow.teacher], features.video_tokens) as taught:
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                denoiser(teacher_inputs)
        teacher = taught.video(self.self_flow.teacher, batch).float()
        student = self.self_flow.projector(features.video(self.self_flow.student, batch))
        scale = weight_at(step, self.config.train.steps, f.schedule, f.warmup_steps)
        found = [("self_flow", token_alignment(student, teacher), f.lambda_self_flow * scale)]
        pooled_student, pooled_teacher = _frames(student, frames).mean(2), _frames(teacher, frames).mean(2)
        if f.temporal_mode in ("frame", "hybrid"):
            value = neighbour_alignment(pooled_student[:, :, None], pooled_teacher[:, :, None], f.num_neighbors, f.temporal_tau)
            found.append(("self_flow_frame", value, f.lambda_temporal * scale))
        if f.temporal_mode in ("delta", "hybrid") and frames >= 2:
            found.append(("self_flow_delta", delta_alignment(pooled_student, pooled_teacher), f.lambda_delta * scale))
        return found


def _frames(tokens: torch.Tensor, frames: int) -> torch.Tensor:
    """``[B, F'·S, D]`` video tokens (frame-major, as both backends patchify) → ``[B, F', S, D]``."""
    return tokens.reshape(tokens.shape[0], frames, -1, tokens.shape[-1])
