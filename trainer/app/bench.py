"""``ltx2-av-trainer bench``: our training step against a plain diffusers + peft loop, in one process.

Both sides train the same thing: one seeded ``LTX2VideoTransformer3DModel`` (the reference shares its
frozen base weights), the same in-memory batches, σ and noise, LoRA of the same rank on the same modules
(our ``av`` preset), AdamW with the same hyper-parameters, the same mixed precision.

- **Ours** is our real code path: a ``Trainer`` (``DiffusersDenoiser`` + ``build_lora`` + ``training_step``)
  driven one ``Trainer.train_step`` at a time, so collation (data loading from the warm in-memory cache),
  σ sampling, masked losses, the audio balancer, clipping and the optimizer all count.
- **Reference** is the plain loop people write: collate, noise, diffusers forward with ``timestep`` /
  ``audio_timestep``, MSE on both modalities, backward, clip, AdamW (torch's default implementation).
  It has no σ-gate hooks, so the bench draws σ_a = σ_v (``timesteps.independent_audio = false``): all
  cross-modal wirings then compute the same thing, and the first step's losses of both sides match.

Steps alternate (the order flips every step), warm-up steps are excluded, and medians are reported; the
step-time ratio is the median of the per-pair ratios, which a burst of load from elsewhere hits on both sides.

Memory of one side = the bytes it keeps between steps (base weights, adapter, optimizer state) plus the
highest allocation above that during one step (activations, gradients, temporaries). On CUDA the step part
comes from the caching allocator's counters; on CPU, which has no allocator statistics, from the
allocation/free events that ``torch.profiler`` records with ``profile_memory=True``. ``activation_bytes``
is the size of the distinct tensors saved for backward during one step (weights excluded), counted with
``saved_tensors_hooks``; under non-reentrant checkpointing it sees only the checkpointed blocks' inputs.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters.network import LoRANetwork
from ..backends.diffusers_backend import DiffusersDenoiser, build_denoiser, tiny_transformer_config
from ..backends.interface import TextContext
from ..config import Config, ConfigError
from ..data.batch_sampler import BucketBatchSampler
from ..data.batches import LatentSample, collate
from ..training.loop import PRECISION_DTYPES, Trainer
from ..training.timesteps import sample_modality_sigmas
from .bench_cli import PRECISIONS, PRESETS

MODEL_VERSION = "2.0"  # the real LTX-2 dims below are LTX-2.0's (2.3 adds gates and prompt adaLN)

# Targets the bench measures (they are never asserted as timings in tests).
STEP_TIME_RATIO_LIMIT = 1.05
PEAK_MEMORY_RATIO_LIMIT = 1.0
DATA_SHARE_LIMIT = 0.05
CHECKPOINTING_CUT_MIN = 0.40

# Dense bf16 tensor-core peak of common accelerators, FLOP/s (vendor data sheets, without sparsity).
# Matched in order against torch.cuda.get_device_name(); the first substring that occurs wins.
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM / HBM3
    ("GH200", 989e12),
    ("H200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
]


# --------------------------------------------------------------------------------------------
# What is benchmarked
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelDims:
    layers: int
    video_heads: int
    video_head_dim: int
    audio_heads: int
    audio_head_dim: int
    caption_channels: int

    @property
    def video_inner(self) -> int:
        return self.video_heads * self.video_head_dim

    @property
    def audio_inner(self) -> int:
        return self.audio_heads * self.audio_head_dim

    def to_dict(self) -> dict:
        return {
            "video": {"heads": self.video_heads, "head_dim": self.video_head_dim, "inner": self.video_inner, "ff": 4 * self.video_inner},
            "audio": {"heads": self.audio_heads, "head_dim": self.audio_head_dim, "inner": self.audio_inner, "ff": 4 * self.audio_inner},
            "caption_channels": self.caption_channels,
        }


@dataclass(frozen=True)
class BenchShapes:
    """One training sample, in latent units: video ``[128, F', H', W']``, audio ``[8, T, 16]``, text ``[L, D]``."""

    latent_frames: int
    latent_height: int
    latent_width: int
    audio_frames: int
    text_tokens: int
    batch_size: int = 1

    @property
    def video_tokens(self) -> int:
        return self.latent_frames * self.latent_height * self.latent_width

    @property
    def pixels(self) -> str:
        """The clip these latents stand for, ``WxHxframes``."""
        return f"{self.latent_width * 32}x{self.latent_height * 32}x{(self.latent_frames - 1) * 8 + 1}"


@dataclass(frozen=True)
class BenchConfig:
    preset: str
    dims: ModelDims
    shapes: BenchShapes
    precision: str
    checkpointing: bool
    device: str
    steps: int
    warmup: int
    rank: int
    alpha: float
    seed: int = 0
    samples: int = 4

    @classmethod
    def from_preset(cls, preset: str, *, layers: int | None = None, checkpointing: bool = False,
                    precision: str | None = None, steps: int | None = None, warmup: int | None = None,
                    device: str | None = None) -> "BenchConfig":
        if preset not in PRESETS:
            raise ConfigError(f"bench preset {preset!r} is unknown; choose one of {', '.join(PRESETS)}")
        base = _PRESETS[preset]
        if layers is not None:
            if layers < 1:
                raise ConfigError(f"bench --layers must be >= 1, got {layers}")
            base = replace(base, dims=replace(base.dims, layers=layers))
        if precision is not None and precision not in PRECISIONS:
            raise ConfigError(f"bench --precision {precision!r} is unknown; choose one of {', '.join(PRECISIONS)}")
        for name, value, minimum in (("--steps", steps, 1), ("--warmup", warmup, 1)):
            if value is not None and value < minimum:
                raise ConfigError(f"bench {name} must be >= {minimum}, got {value}")
        return replace(
            base,
            checkpointing=checkpointing,
            precision=precision or base.precision,
            steps=steps or base.steps,
            warmup=warmup or base.warmup,
            device=device or base.device,
        )

    def trainer_config(self) -> Config:
        """Our trainer's config for this bench: defaults everywhere except the model, the LoRA size and σ_a = σ_v."""
        d = self.dims
        return Config.from_dict({
            "model": {
                "version": MODEL_VERSION,
                "source": "tiny",
                "gradient_checkpointing": self.checkpointing,
                "tiny": {"num_layers": d.layers, "num_attention_heads": d.video_heads, "attention_head_dim": d.video_head_dim,
                         "audio_num_attention_heads": d.audio_heads, "audio_attention_head_dim": d.audio_head_dim,
                         "caption_channels": d.caption_channels, "seed": self.seed},
            },
            "network": {"type": "lora", "preset": "av", "rank": self.rank, "alpha": self.alpha},
            "timesteps": {"independent_audio": False},
            "train": {"steps": self.warmup + self.steps + 16, "batch_size": self.shapes.batch_size,
                      "mixed_precision": self.precision, "device": self.device, "seed": self.seed},
        })


_PRESETS: dict[str, BenchConfig] = {
    # The embedded tiny test model: seconds end to end, for tests.
    "tiny": BenchConfig("tiny", ModelDims(2, 2, 16, 2, 8, 32), BenchShapes(2, 4, 4, 13, 8),
                        precision="fp32", checkpointing=False, device="cpu", steps=4, warmup=2, rank=4, alpha=4.0),
    # CPU-sized, with the real model's proportions: 256x192x49 video (336 tokens), 2 s of audio (49 tokens).
    "small": BenchConfig("small", ModelDims(4, 4, 64, 4, 32, 256), BenchShapes(7, 6, 8, 49, 64),
                         precision="fp32", checkpointing=False, device="cpu", steps=20, warmup=3, rank=32, alpha=32.0),
    # Real LTX-2 (19B) dims: 48 blocks, video 32 heads x 128, audio 32 x 64, caption 3840; at 768x512x97 (4992 video tokens) + 97 audio tokens, 1024 text tokens.
    "real": BenchConfig("real", ModelDims(8, 32, 128, 32, 64, 3840), BenchShapes(13, 16, 24, 97, 1024),
                        precision="bf16", checkpointing=False, device="cuda", steps=10, warmup=3, rank=32, alpha=32.0),
}


def make_bench_samples(bench: BenchConfig) -> list[LatentSample]:
    """Seeded random latents and text of the bench's shapes (the warm in-memory cache of a real run)."""
    s, g = bench.shapes, torch.Generator().manual_seed(bench.seed + 1)
    width = bench.dims.caption_channels
    return [
        LatentSample(
            id=f"bench{i}",
            video=torch.randn(128, s.latent_frames, s.latent_height, s.latent_width, generator=g),
            audio=torch.randn(8, s.audio_frames, 16, generator=g),
            audio_valid_frames=s.audio_frames,
            text=TextContext(torch.randn(s.text_tokens, width, generator=g), torch.randn(s.text_tokens, width, generator=g),
                             torch.ones(s.text_tokens)),
            fps=25.0,
        )
        for i in range(bench.samples)
    ]


def build_bench_denoiser(bench: BenchConfig, config: Config) -> DiffusersDenoiser:
    """``tiny`` / ``small``: our own construction path. ``real``: the same model and wrapping, but built
    directly on the GPU in the training dtype (a 19B-class model would not fit built in fp32 on the host)."""
    if bench.preset != "real":
        return build_denoiser(config.model)
    from diffusers import LTX2VideoTransformer3DModel

    device = torch.device(bench.device)
    # Seed only a forked RNG state, as build_tiny_transformer does: building never moves the caller's RNGs.
    cuda_devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(PRECISION_DTYPES[bench.precision])
        with torch.random.fork_rng(devices=cuda_devices), torch.device(device):
            torch.manual_seed(bench.seed)
            transformer = LTX2VideoTransformer3DModel(**tiny_transformer_config(MODEL_VERSION, config.model.tiny))
    finally:
        torch.set_default_dtype(previous)
    transformer.requires_grad_(False)
    transformer.eval()
    denoiser = DiffusersDenoiser(transformer, MODEL_VERSION, config.model.cross_modal_sigma)
    if config.model.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    return denoiser


# --------------------------------------------------------------------------------------------
# The reference: diffusers + peft, written the plain way
# --------------------------------------------------------------------------------------------


def share_frozen_weights(source: nn.Module) -> nn.Module:
    """A second instance of ``source``'s diffusers model whose parameters share ``source``'s storage (both
    sides keep their base weights frozen, so one copy in memory is enough and they are the same model)."""
    with torch.device("meta"):
        clone = type(source).from_config(source.config)
    missing = {name for name, _ in clone.named_buffers()} - set(clone.state_dict())
    if missing:  # non-persistent buffers would stay on the meta device
        raise RuntimeError(f"cannot share the weights of {type(source).__name__}: non-persistent buffers {sorted(missing)}")
    clone.load_state_dict(source.state_dict(), strict=True, assign=True)
    return clone


def reference_lora_targets(model: nn.Module) -> list[str]:
    """Module paths that carry a peft LoRA layer, in model order."""
    from peft.tuners.lora import LoraLayer

    return [name for name, module in model.named_modules() if isinstance(module, LoraLayer)]


class ReferenceLoop:
    """diffusers ``LTX2VideoTransformer3DModel`` + peft LoRA + torch AdamW, one plain step at a time."""

    def __init__(self, base: nn.Module, ours: LoRANetwork, config: Config, samples: list[LatentSample],
                 device: torch.device, autocast_dtype: torch.dtype | None):
        from peft import LoraConfig, inject_adapter_in_model

        self.config = config
        self.device = device
        self.autocast_dtype = autocast_dtype
        self.model = share_frozen_weights(base)
        self.model.requires_grad_(False)
        self.model.eval()
        net = config.network
        targets = list(ours.paths.values())
        inject_adapter_in_model(LoraConfig(r=net.rank, lora_alpha=net.alpha, lora_dropout=net.dropout, target_modules=targets), self.model)
        self._start_from(ours)
        if config.model.gradient_checkpointing:
            self.model.enable_gradient_checkpointing()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        opt = config.optimizer
        self.optimizer = torch.optim.AdamW(self.params, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps, weight_decay=opt.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda") if config.train.mixed_precision == "fp16" else None
        # Same seed, same draw order as our training_step: step k of both sides sees the same batch, σ and noise.
        self.sampler = BucketBatchSampler(samples, config.train.batch_size, config.train.seed)
        self.generator = torch.Generator().manual_seed(config.train.seed)
        self.samples = samples

    def _start_from(self, ours: LoRANetwork) -> None:
        """fp32 adapters (as ours; peft would give them the base dtype) with our initial values."""
        modules = dict(self.model.named_modules())
        with torch.no_grad():
            for path, layer in ours.named_layers():
                lora = modules[path]
                a, b = lora.lora_A["default"].weight, lora.lora_B["default"].weight
                a.data = layer.down.detach().to(self.device, torch.float32).clone()
                b.data = layer.up.detach().to(self.device, torch.float32).clone()

    def step(self) -> dict:
        cfg = self.config
        self.optimizer.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        batch = collate([self.samples[i] for i in self.sampler.next_batch()])
        data_time = time.perf_counter() - t0
        video = batch.video.to(self.device, torch.float32)
        audio = batch.audio.to(self.device, torch.float32)
        sigma_video, sigma_audio = sample_modality_sigmas(
            cfg.timesteps, cfg.model.version, batch.size, video[0, 0].numel(), audio.shape[2], self.generator)
        noise_video = torch.randn(video.shape, generator=self.generator).to(self.device)
        noise_audio = torch.randn(audio.shape, generator=self.generator).to(self.device)
        sv = sigma_video.to(self.device).view(-1, 1, 1, 1, 1)
        sa = sigma_audio.to(self.device).view(-1, 1, 1, 1)
        noisy_video = (1 - sv) * video + sv * noise_video
        noisy_audio = (1 - sa) * audio + sa * noise_audio

        dtype = self.autocast_dtype or torch.float32
        scale = self.model.config.timestep_scale_multiplier
        mask = batch.text.mask.to(self.device)
        _, _, frames, height, width = video.shape
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            pred_video, pred_audio = self.model(
                hidden_states=_pack_video(noisy_video).to(dtype),
                audio_hidden_states=_pack_audio(noisy_audio).to(dtype),
                encoder_hidden_states=batch.text.video.to(self.device, dtype),
                audio_encoder_hidden_states=batch.text.audio.to(self.device, dtype),
                encoder_attention_mask=mask,
                audio_encoder_attention_mask=mask,
                timestep=sigma_video.to(self.device) * scale,
                audio_timestep=sigma_audio.to(self.device) * scale,
                num_frames=frames, height=height, width=width, fps=float(batch.fps),
                audio_num_frames=audio.shape[2],
                return_dict=False,
            )
        loss_video = F.mse_loss(pred_video.float(), _pack_video(noise_video - video))
        loss_audio = F.mse_loss(pred_audio.float(), _pack_audio(noise_audio - audio))
        total = loss_video + loss_audio
        if self.scaler:
            self.scaler.scale(total).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            total.backward()
        max_norm = cfg.train.max_grad_norm if cfg.train.max_grad_norm > 0 else float("inf")
        torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        return {"loss_video": loss_video.item(), "loss_audio": loss_audio.item(), "data_time_s": data_time}


def _pack_video(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, F, H, W]`` → ``[B, F·H·W, C]`` (patch size 1)."""
    return x.flatten(2).transpose(1, 2)


def _pack_audio(x: torch.Tensor) -> torch.Tensor:
    """``[B, 8, T, 16]`` → ``[B, T, 128]``."""
    return x.permute(0, 2, 1, 3).flatten(2)


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------


@dataclass
class MemoryMeasure:
    persistent_bytes: int  # kept between steps: base weights, adapter, optimizer state
    step_peak_bytes: int  # highest allocation above that during one step
    activation_bytes: int  # distinct tensors saved for backward (weights excluded)

    @property
    def peak_mem_bytes(self) -> int:
        return self.persistent_bytes + self.step_peak_bytes


def unique_storage_bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None or t.device.type == "meta":
            continue
        storage = t.untyped_storage()
        seen.setdefault(storage.data_ptr(), storage.nbytes())
    return sum(seen.values())


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


class SavedTensorBytes:
    """``saved_tensors_hooks`` pair that sums the distinct storages saved for backward, except ``exclude``."""

    def __init__(self, exclude: set[int]):
        self.exclude = exclude
        self.sizes: dict[int, int] = {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self.exclude:
            self.sizes.setdefault(ptr, storage.nbytes())
        return tensor

    @staticmethod
    def unpack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    @property
    def total(self) -> int:
        return sum(self.sizes.values())


def measure_step_memory(step: Callable[[], object], device: torch.device, persistent: Callable[[], int],
                        weights: list[torch.Tensor]) -> MemoryMeasure:
    """Run ``step`` once under the memory counters (see the module docstring for what is counted)."""
    saved = SavedTensorBytes({w.untyped_storage().data_ptr() for w in weights})
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            start = torch.cuda.memory_allocated(device)
            step()
            torch.cuda.synchronize(device)
            step_peak = torch.cuda.max_memory_allocated(device) - start
        else:
            step_peak = _cpu_step_peak_bytes(step)
    return MemoryMeasure(persistent(), int(step_peak), saved.total)


def _cpu_step_peak_bytes(step: Callable[[], object]) -> int:
    """Highest running sum of the CPU allocations and frees torch.profiler records during ``step``."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    # Kineto probes for GPUs when it starts and logs an error line on machines without one.
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    with warnings.catch_warnings():
        # One profiling cycle is all we read, so its notice about clearing events between cycles does not apply.
        warnings.filterwarnings("ignore", message=".*clears events at the end of each cycle.*")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type() == DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())  # stable: simultaneous events keep their recorded order
    running = peak = 0
    for event in events:
        running += event.nbytes()
        peak = max(peak, running)
    return peak


# --------------------------------------------------------------------------------------------
# Analytic FLOPs
# --------------------------------------------------------------------------------------------

# attention name inside a block → (query stream, key/value stream)
_ATTENTION_STREAMS = {
    "attn1": ("video", "video"),
    "attn2": ("video", "text"),
    "audio_attn1": ("audio", "audio"),
    "audio_attn2": ("audio", "text"),
    "audio_to_video_attn": ("video", "audio"),
    "video_to_audio_attn": ("audio", "video"),
}
_BLOCK_MODULE = re.compile(r"^transformer_blocks\.(\d+)\.([a-z0-9_]+)(?:\.(.+))?$")
# top-level module → (stream of its input rows, whether the gradient flows back through its input)
_TOP_LEVEL_LINEARS = {
    "proj_in": ("video", False),
    "audio_proj_in": ("audio", False),
    "proj_out": ("video", True),
    "audio_proj_out": ("audio", True),
    "caption_projection": ("text", False),
    "audio_caption_projection": ("text", False),
    # Timestep embeddings and adaLN tables: one row per sample.
    "time_embed": ("sample", False),
    "audio_time_embed": ("sample", False),
    "av_cross_attn_video_scale_shift": ("sample", False),
    "av_cross_attn_audio_scale_shift": ("sample", False),
    "av_cross_attn_video_a2v_gate": ("sample", False),
    "av_cross_attn_audio_v2a_gate": ("sample", False),
    "prompt_adaln": ("sample", False),
    "audio_prompt_adaln": ("sample", False),
}


@dataclass
class FlopCount:
    forward: float  # one forward pass of the base model and the adapters
    train_step: float  # forward + backward of one optimizer step (model FLOPs: checkpoint recomputation not counted)


def _linear_role(path: str) -> tuple[str, bool]:
    """(stream whose rows this Linear multiplies, whether its input needs a gradient) for the ``av`` preset."""
    match = _BLOCK_MODULE.match(path)
    if match:
        block, part, rest = int(match.group(1)), match.group(2), match.group(3) or ""
        if part in _ATTENTION_STREAMS:
            query, kv = _ATTENTION_STREAMS[part]
            stream = kv if rest in ("to_k", "to_v") else query
            # Text carries no gradient; in block 0 the self-attentions see the streams before any adapter.
            first_self_attention = block == 0 and part in ("attn1", "audio_attn1") and rest in ("to_q", "to_k", "to_v")
            return stream, stream != "text" and not first_self_attention
        if part == "ff":
            return "video", True
        if part == "audio_ff":
            return "audio", True
    top = path.split(".", 1)[0]
    if top in _TOP_LEVEL_LINEARS:
        return _TOP_LEVEL_LINEARS[top]
    raise ValueError(f"bench FLOPs: no token count known for Linear {path!r}; add it to the bench's module table")


def analytic_flops(model: nn.Module, tokens: dict[str, int], batch: int, lora_rank: int, adapted: set[str]) -> FlopCount:
    """Matmul FLOPs (2 per multiply-add) from the model's real Linear shapes and attention sizes.

    Backward: a frozen Linear costs one more matmul only when its input needs a gradient (no weight
    gradient); attention's score and value products cost two more; adapters (trainable) cost two more.
    """
    rows = {**tokens, "sample": 1}
    forward = train = 0.0
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear):
            stream, input_grad = _linear_role(path)
            base = 2.0 * batch * rows[stream] * module.in_features * module.out_features
            forward += base
            train += base * (2 if input_grad else 1)
            if path in adapted:
                lora = 2.0 * batch * rows[stream] * lora_rank * (module.in_features + module.out_features)
                forward += lora
                train += 3 * lora
        match = _BLOCK_MODULE.match(path)
        if match and match.group(2) in _ATTENTION_STREAMS and match.group(3) is None:
            query, kv = _ATTENTION_STREAMS[match.group(2)]
            core = 4.0 * batch * rows[query] * rows[kv] * module.inner_dim  # QKᵀ and PV
            forward += core
            train += 3 * core
    return FlopCount(forward, train)


def peak_bf16_flops(device: torch.device, precision: str) -> tuple[float | None, str]:
    """The device's dense bf16/fp16 peak and a note saying where it came from (or why there is none)."""
    if device.type != "cuda":
        return None, "no MFU on CPU (no dense-bf16 peak figure for CPUs)"
    if precision == "fp32":
        return None, "no MFU in fp32 (the peak table holds dense bf16/fp16 figures)"
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS:
        if key in name:
            return flops, f"{name}: dense bf16 peak {flops / 1e12:.0f} TFLOP/s"
    return None, f"{name}: not in the bench's peak-FLOPs table, so no MFU"


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


@dataclass
class SideTimes:
    step_times_s: list[float]
    data_times_s: list[float]
    initial_loss: dict


def _resolve_device(bench: BenchConfig) -> torch.device:
    device = torch.device(bench.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        if bench.preset == "real":
            raise ConfigError("bench --preset real needs a CUDA GPU (real LTX-2 dims in bf16); use --preset small on CPU")
        raise ConfigError(f"bench --device {bench.device}: no CUDA device is available; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"bench --device {bench.device!r}: choose cpu or cuda")
    if bench.preset == "real" and device.type != "cuda":
        raise ConfigError("bench --preset real runs on a CUDA GPU only; use --preset small on CPU")
    if bench.precision == "fp16" and device.type != "cuda":
        raise ConfigError("bench --precision fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    return device


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step: Callable[[], dict], device: torch.device) -> tuple[float, dict]:
    _synchronize(device)
    started = time.perf_counter()
    out = step()
    _synchronize(device)
    return time.perf_counter() - started, out


class BenchRun:
    def __init__(self, bench: BenchConfig):
        self.bench = bench
        self.device = _resolve_device(bench)
        self.config = bench.trainer_config()
        self.samples = make_bench_samples(bench)
        denoiser = build_bench_denoiser(bench, self.config)
        # Only train_step is driven, which writes nothing: the run directory is never created.
        self.trainer = Trainer(self.config, denoiser, self.samples, Path(tempfile.gettempdir()) / "ltx2-av-trainer-bench-unused")
        self.reference = ReferenceLoop(denoiser.module, self.trainer.network, self.config, self.samples,
                                       self.device, self.trainer.autocast_dtype)

    # ---- the two steps ----------------------------------------------------------------------

    def ours_step(self) -> dict:
        metrics = self.trainer.train_step()
        if metrics is None:
            raise RuntimeError("our training step was skipped (non-finite loss) on random bench data")
        return metrics

    def reference_step(self) -> dict:
        return self.reference.step()

    # ---- measurements -----------------------------------------------------------------------

    def time_steps(self, progress: Callable[[int, int], None] | None = None) -> tuple[SideTimes, SideTimes]:
        """Alternate the two steps; ``progress(done, total)`` after each pair."""
        bench = self.bench
        sides = {"ours": (self.ours_step, SideTimes([], [], {})), "reference": (self.reference_step, SideTimes([], [], {}))}
        if progress:
            progress(0, bench.warmup + bench.steps)
        for i in range(bench.warmup + bench.steps):
            # Flip the order every step so neither side always runs on the other's warm caches.
            order = ("ours", "reference") if i % 2 == 0 else ("reference", "ours")
            for name in order:
                step, times = sides[name]
                elapsed, out = _timed(step, self.device)
                if i == 0:
                    times.initial_loss = {"video": out["loss_video"], "audio": out["loss_audio"]}
                if i >= bench.warmup:
                    times.step_times_s.append(elapsed)
                    times.data_times_s.append(out["data_time_s"])
            if progress:
                progress(i + 1, bench.warmup + bench.steps)
        return sides["ours"][1], sides["reference"][1]

    def _weights(self) -> list[torch.Tensor]:
        return [*self.trainer.denoiser.module.parameters(), *self.trainer.denoiser.module.buffers(),
                *self.trainer.network.parameters(), *self.reference.model.parameters()]

    def measure_ours(self) -> MemoryMeasure:
        self.trainer.optimizer.zero_grad(set_to_none=True)  # last step's gradients are not kept between steps
        module, network, optimizer = self.trainer.denoiser.module, self.trainer.network, self.trainer.optimizer
        return measure_step_memory(
            self.ours_step, self.device,
            lambda: unique_storage_bytes([*module.parameters(), *module.buffers(), *network.parameters(), *optimizer_state_tensors(optimizer)]),
            self._weights(),
        )

    def measure_reference(self) -> MemoryMeasure:
        self.reference.optimizer.zero_grad(set_to_none=True)
        model, optimizer = self.reference.model, self.reference.optimizer
        return measure_step_memory(
            self.reference_step, self.device,
            lambda: unique_storage_bytes([*model.parameters(), *model.buffers(), *optimizer_state_tensors(optimizer)]),
            self._weights(),
        )

    def compare_checkpointing(self) -> dict:
        """Our step's memory with gradient checkpointing off and on (same model, one step each)."""
        module = self.trainer.denoiser.module
        was_on = self.bench.checkpointing
        results = {}
        for state in ("off", "on"):
            if state == "on":
                module.enable_gradient_checkpointing()
            else:
                module.disable_gradient_checkpointing()
            results[state] = self.measure_ours()
        if not was_on:
            module.disable_gradient_checkpointing()
        off, on = results["off"], results["on"]
        return {
            "off": {"step_peak_bytes": off.step_peak_bytes, "activation_bytes": off.activation_bytes},
            "on": {"step_peak_bytes": on.step_peak_bytes, "activation_bytes": on.activation_bytes},
            "step_peak_cut": _cut(off.step_peak_bytes, on.step_peak_bytes),
            "activation_cut": _cut(off.activation_bytes, on.activation_bytes),
        }

    def flops(self) -> FlopCount:
        s = self.bench.shapes
        tokens = {"video": s.video_tokens, "audio": s.audio_frames, "text": s.text_tokens}
        adapted = set(self.trainer.network.paths.values())
        return analytic_flops(self.trainer.denoiser.module, tokens, s.batch_size, self.bench.rank, adapted)


def _cut(before: int, after: int) -> float | None:
    return None if before <= 0 else 1.0 - after / before


def _side_report(times: SideTimes, memory: MemoryMeasure, tokens_per_step: int, train_flops: float, peak_flops: float | None) -> dict:
    step = statistics.median(times.step_times_s)
    shares = [d / t for d, t in zip(times.data_times_s, times.step_times_s) if t > 0]
    return {
        "step_time_s": step,
        "step_times_s": times.step_times_s,
        "peak_mem_bytes": memory.peak_mem_bytes,
        "persistent_bytes": memory.persistent_bytes,
        "step_peak_bytes": memory.step_peak_bytes,
        "activation_bytes": memory.activation_bytes,
        "tokens_per_s": tokens_per_step / step,
        "data_time_s": statistics.median(times.data_times_s),
        "data_share": statistics.median(shares),
        "initial_loss": times.initial_loss,
        "mfu": None if peak_flops is None else train_flops / step / peak_flops,
    }


def _target(value: float | None, limit: float, at_most: bool, what: str) -> dict:
    met = None if value is None else (value <= limit if at_most else value >= limit)
    return {"value": value, "limit": limit, "rule": f"{what} {'<=' if at_most else '>='} {limit}", "met": met}


def _relative_difference(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def run_bench(preset: str = "small", layers: int | None = None, checkpointing: bool = False, precision: str | None = None,
              steps: int | None = None, warmup: int | None = None, device: str | None = None,
              compare_checkpointing: bool = False, progress: Callable[[int, int], None] | None = None) -> dict:
    """Run the bench and return its report: the architecture's bench contract (``device``, ``model``, ``ours``,
    ``reference``, ``ratio_step_time``, ``ratio_peak_mem``, ``mfu``) plus tokens/s, data share, memory
    components, analytic FLOPs, the targets with their measured values, and ``checkpointing_saving`` when
    ``compare_checkpointing`` is on. ``progress(done, total)`` is called after every timed pair of steps."""
    bench = BenchConfig.from_preset(preset, layers=layers, checkpointing=checkpointing, precision=precision,
                                    steps=steps, warmup=warmup, device=device)
    run = BenchRun(bench)
    ours_times, reference_times = run.time_steps(progress)
    ours_memory, reference_memory = run.measure_ours(), run.measure_reference()
    checkpointing_saving = run.compare_checkpointing() if compare_checkpointing else None

    s, d = bench.shapes, bench.dims
    tokens_per_step = (s.video_tokens + s.audio_frames) * s.batch_size
    flops = run.flops()
    peak_flops, peak_note = peak_bf16_flops(run.device, bench.precision)
    ours = _side_report(ours_times, ours_memory, tokens_per_step, flops.train_step, peak_flops)
    reference = _side_report(reference_times, reference_memory, tokens_per_step, flops.train_step, peak_flops)
    # Each pair of steps ran back to back, so a burst of load from elsewhere on the machine hits both:
    # the median of the per-pair ratios is steadier than the ratio of the medians.
    ratio_step = statistics.median(o / r for o, r in zip(ours_times.step_times_s, reference_times.step_times_s))
    ratio_mem = ours["peak_mem_bytes"] / reference["peak_mem_bytes"]
    loss_diff = max(_relative_difference(ours["initial_loss"][k], reference["initial_loss"][k]) for k in ("video", "audio"))

    targets = {
        "step_time_vs_reference": _target(ratio_step, STEP_TIME_RATIO_LIMIT, True, "ours / reference step time"),
        "peak_mem_vs_reference": _target(ratio_mem, PEAK_MEMORY_RATIO_LIMIT, True, "ours / reference peak memory"),
        "data_share": _target(ours["data_share"], DATA_SHARE_LIMIT, True, "data loading / step time"),
    }
    if checkpointing_saving is not None:
        targets["checkpointing_cut"] = _target(checkpointing_saving["step_peak_cut"], CHECKPOINTING_CUT_MIN, False,
                                               "1 - step peak with / without checkpointing")
    device_name = torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else "cpu"
    return {
        "preset": bench.preset,
        "device": run.device.type,
        "device_name": device_name,
        "threads": torch.get_num_threads(),
        "precision": bench.precision,
        "checkpointing": bench.checkpointing,
        "steps": bench.steps,
        "warmup": bench.warmup,
        "model": {
            "version": MODEL_VERSION,
            "dims": d.to_dict(),
            "layers": d.layers,
            "tokens": {"video": s.video_tokens, "audio": s.audio_frames, "text": s.text_tokens, "per_step": tokens_per_step},
            "clip": s.pixels,
            "batch_size": s.batch_size,
            "parameters": sum(p.numel() for p in run.trainer.denoiser.module.parameters()),
            "lora": {"rank": bench.rank, "alpha": bench.alpha, "modules": len(run.trainer.network.paths),
                     "parameters": run.trainer.network.parameter_count(),
                     "reference_parameters": sum(p.numel() for p in run.reference.params)},
        },
        "ours": ours,
        "reference": reference,
        "ratio_step_time": ratio_step,
        "ratio_peak_mem": ratio_mem,
        "tokens_per_s": ours["tokens_per_s"],
        "data_share": ours["data_share"],
        "initial_loss_rel_diff": loss_diff,
        "flops": {"forward": flops.forward, "train_step": flops.train_step,
                  "method": "analytic matmul FLOPs from the model's Linear shapes and attention sizes; backward = input "
                            "gradients of frozen layers + attention + adapter weight gradients; recomputation not counted"},
        "mfu": None if peak_flops is None else {"ours": ours["mfu"], "reference": reference["mfu"], "peak_flops": peak_flops},
        "mfu_note": peak_note,
        "targets": targets,
        "targets_note": "the step-time, memory and checkpointing targets are set for the small preset on CPU",
        "checkpointing_saving": checkpointing_saving,
        "notes": [
            "reference: diffusers forward with timestep/audio_timestep and no σ-gate hooks; the bench draws σ_a = σ_v "
            "so every cross-modal wiring computes the same and the first-step losses of both sides match",
            "reference: plain MSE on both modalities (no padding masks, no audio balancer), torch AdamW in its default "
            "implementation (ours: foreach=False for bit-exact resume), same clipping and hyper-parameters",
            "both sides share the frozen base weights in memory; each side's peak_mem_bytes counts them once",
            "ratio_step_time is the median of the per-pair ratios (each pair ran back to back); step_time_s are medians",
            "quantized base weights are not benchmarked: the trainer has no base-model quantization option yet",
        ],
    }


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def cmd_bench(args: argparse.Namespace) -> int:
    from ..io_utils import atomic_write_json
    from .console import Progress

    bar: Progress | None = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = Progress(total, f"bench {args.preset}: step pairs (warm-up included)", quiet=args.quiet)
        if done:
            bar.update(done)

    report = run_bench(args.preset, layers=args.layers, checkpointing=args.checkpointing == "on", precision=args.precision,
                       steps=args.steps, warmup=args.warmup, device=args.device,
                       compare_checkpointing=args.compare_checkpointing, progress=progress)
    if not args.quiet:
        print(format_report(report))
    if args.json:
        atomic_write_json(args.json, report)
    return 0


def format_report(report: dict) -> str:
    m, ours, ref = report["model"], report["ours"], report["reference"]
    dims, tokens = m["dims"], m["tokens"]
    lines = [
        f"bench {report['preset']} on {report['device_name']} ({report['threads']} threads), {report['precision']}, "
        f"checkpointing {'on' if report['checkpointing'] else 'off'}",
        f"model: {m['layers']} blocks, video {dims['video']['heads']}x{dims['video']['head_dim']}, audio "
        f"{dims['audio']['heads']}x{dims['audio']['head_dim']}, {m['parameters'] / 1e6:.1f}M params; LoRA rank {m['lora']['rank']} "
        f"on {m['lora']['modules']} modules",
        f"tokens: {tokens['video']} video ({m['clip']}) + {tokens['audio']} audio, {tokens['text']} text; "
        f"{report['steps']} measured steps after {report['warmup']} warm-up, medians",
        "",
        f"{'':22}{'ours':>14}{'reference':>14}{'ratio':>10}",
        _row("step time", _seconds(ours["step_time_s"]), _seconds(ref["step_time_s"]), report["ratio_step_time"]),
        _row("peak memory", _bytes(ours["peak_mem_bytes"]), _bytes(ref["peak_mem_bytes"]), report["ratio_peak_mem"]),
        _row("  step peak", _bytes(ours["step_peak_bytes"]), _bytes(ref["step_peak_bytes"]), _ratio(ours["step_peak_bytes"], ref["step_peak_bytes"])),
        _row("  saved activations", _bytes(ours["activation_bytes"]), _bytes(ref["activation_bytes"]), _ratio(ours["activation_bytes"], ref["activation_bytes"])),
        _row("tokens/s", f"{ours['tokens_per_s']:.0f}", f"{ref['tokens_per_s']:.0f}", None),
        _row("data share", f"{100 * ours['data_share']:.2f} %", f"{100 * ref['data_share']:.2f} %", None),
        _row("initial loss (v/a)", f"{ours['initial_loss']['video']:.4f}/{ours['initial_loss']['audio']:.4f}",
             f"{ref['initial_loss']['video']:.4f}/{ref['initial_loss']['audio']:.4f}", None),
    ]
    if report["mfu"] is not None:
        lines.append(_row("MFU", f"{100 * ours['mfu']:.1f} %", f"{100 * ref['mfu']:.1f} %", None))
    lines.append(f"model FLOPs per training step: {_flops(report['flops']['train_step'])}; {report['mfu_note']}")
    saving = report["checkpointing_saving"]
    if saving is not None:
        lines.append(f"checkpointing: step peak {_bytes(saving['off']['step_peak_bytes'])} -> {_bytes(saving['on']['step_peak_bytes'])} "
                     f"({100 * (saving['step_peak_cut'] or 0):.0f} % less), saved activations "
                     f"{_bytes(saving['off']['activation_bytes'])} -> {_bytes(saving['on']['activation_bytes'])}")
    lines.append("targets (" + report["targets_note"] + "):")
    for name, t in report["targets"].items():
        value = "n/a" if t["value"] is None else f"{t['value']:.3f}"
        lines.append(f"  {name}: {value} ({t['rule']}) {'met' if t['met'] else 'NOT met'}")
    return "\n".join(lines)


def _row(label: str, ours: str, reference: str, ratio: float | None) -> str:
    return f"{label:22}{ours:>14}{reference:>14}{'' if ratio is None else f'{ratio:.3f}':>10}"


def _ratio(a: int, b: int) -> float | None:
    return a / b if b else None


def _seconds(value: float) -> str:
    return f"{value:.4f} s" if value < 10 else f"{value:.2f} s"


def _flops(value: float) -> str:
    for unit, size in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if value >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value:.0f} FLOP"


def _bytes(value: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(value) >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value} B"
