"""The one typed configuration object that drives the CLI, the ComfyUI nodes and the tests.

Every option lives here, with its default and its allowed values. ``Config.from_toml`` /
``Config.from_dict`` reject unknown keys and wrong values with a message that names the key and what
is allowed, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


class ConfigError(ValueError):
    """A bad configuration value or key; the message names the key and the fix."""


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class DatasetSource:
    """One folder (or JSONL list) of media with captions."""

    path: str = ""
    kind: Literal["video", "image", "jsonl"] = "video"
    caption_extension: str = ".txt"
    audio_dir: str = ""  # optional folder of separate audio files matched by stem
    audio_stream: int = 0  # index among the container's audio streams
    repeats: int = 1
    video_loss_weight: float = 1.0
    audio_loss_weight: float = 1.0
    fps_override: float = 0.0  # 0 = auto-detect the source frame rate
    is_validation: bool = False


@dataclass
class DatasetConfig:
    sources: list[DatasetSource] = field(default_factory=list)
    trigger: str = "ohwx"
    caption_template: str = "{trigger}, {caption}"
    target_fps: float = 25.0
    frames: int = 25  # 8n+1 frames per clip
    width: int = 256  # multiple of 32
    height: int = 256  # multiple of 32
    frame_buckets: list[int] = field(default_factory=list)  # extra 8n+1 frame counts; empty = [frames]
    resolution_buckets: list[list[int]] = field(default_factory=list)  # [[w, h], ...]; empty = [[width, height]]
    crop: Literal["center", "random"] = "center"
    allow_upscale: bool = True
    validation_split: float = 0.0
    with_audio: bool = True


@dataclass
class CacheConfig:
    dir: str = ""  # empty = <output.dir>/cache
    audio_dtype: Literal["float32"] = "float32"  # audio is always encoded in fp32 (posterior mean)
    video_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    decode_previews: bool = False


@dataclass
class TinyModelConfig:
    """Dimensions of the embedded random-weight model (demo, tests, CPU bench)."""

    num_layers: int = 2
    num_attention_heads: int = 2
    attention_head_dim: int = 16
    audio_num_attention_heads: int = 2
    audio_attention_head_dim: int = 8
    caption_channels: int = 32
    seed: int = 0


@dataclass
class ModelConfig:
    version: Literal["2.0", "2.3"] = "2.0"
    source: str = "tiny"  # "tiny" or a local diffusers-format folder / transformer folder
    # Which σ drives the cross-modal (a2v / v2a) scale/shift and gates. "reference": the current
    # ltx-core / ComfyUI wiring (scale/shift from each modality's own timestep, a2v gate from σ_a,
    # v2a gate from σ_v). "own": both from the modality's own timestep (Jan 2026, diffusers
    # use_cross_timestep=False). "cross": both from the other modality's σ (Mar 2026).
    cross_modal_sigma: Literal["reference", "own", "cross"] = "reference"
    gradient_checkpointing: bool = False
    attention: Literal["sdpa", "native"] = "sdpa"
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)


@dataclass
class NetworkConfig:
    type: Literal["lora"] = "lora"
    rank: int = 32
    alpha: float = 32.0
    preset: Literal["av", "audio", "voice", "video", "v2v", "full"] = "av"
    include: list[str] = field(default_factory=list)  # extra regexes on module paths
    exclude: list[str] = field(default_factory=list)  # regexes removed after include
    dropout: float = 0.0
    init_seed: int = 0


@dataclass
class OptimizerConfig:
    name: Literal["adamw"] = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8


@dataclass
class ScheduleConfig:
    name: Literal["constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "linear"] = (
        "constant_with_warmup"
    )
    warmup_steps: int = 0
    num_cycles: int = 1  # restarts for cosine_with_restarts
    min_lr_ratio: float = 0.0


@dataclass
class TimestepConfig:
    sampling: Literal["shifted_logit_normal", "logit_normal", "uniform"] = "shifted_logit_normal"
    shifted_mode: Literal["auto", "legacy", "stretched"] = "auto"  # auto: legacy for 2.0, stretched for 2.3
    shift: float | None = None  # μ of the logit-normal; unset = from the modality's token count
    logit_std: float = 1.0
    stretched_uniform_fraction: float = 0.1
    min_sigma: float = 0.0
    max_sigma: float = 1.0
    independent_audio: bool = True  # draw σ_a independently of σ_v (shared σ when false)


@dataclass
class LossConfig:
    type: Literal["mse", "l1", "huber"] = "mse"
    huber_delta: float = 1.0
    video_weight: float = 1.0
    audio_weight: float = 1.0
    balance: Literal["none", "ema_mag", "inv_freq"] = "ema_mag"
    target_ratio: float = 0.33  # ema_mag: audio loss aims at this fraction of video loss
    ema_decay: float = 0.99
    balance_min: float = 0.05
    balance_max: float = 4.0
    inv_freq_beta: float = 0.01
    inv_freq_eps: float = 0.05
    min_snr_gamma: float = 0.0  # rejected when > 0: Min-SNR does not exist for flow matching


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 1
    gradient_accumulation: int = 1
    max_grad_norm: float = 1.0  # 0 disables clipping
    mixed_precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    seed: int = 42
    device: str = "auto"  # auto = cuda when available, else cpu
    max_consecutive_nonfinite: int = 5
    num_threads: int = 0  # 0 = torch default


@dataclass
class LoggingConfig:
    log_every: int = 10  # console line with raw/weighted audio loss, video loss and weight
    tensorboard: bool = False
    quiet: bool = False


@dataclass
class OutputConfig:
    dir: str = "runs/ltx2_av_lora"
    name: str = "ltx2_av_lora"
    save_every: int = 250  # LoRA + resumable state every N steps (and at the end)
    keep_states: int = 2  # resumable states kept on disk
    save_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    resume: Literal["auto", "never"] = "auto"


@dataclass
class Config:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    timesteps: TimestepConfig = field(default_factory=TimestepConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    # ---- construction -----------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Config":
        config = _build(cls, data, "")
        config.validate()
        return config

    @classmethod
    def from_toml(cls, path: str | Path) -> "Config":
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML ({exc})") from None
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def replace(self, **sections: Any) -> "Config":
        """A copy with whole sections or dotted keys replaced, validated: ``replace(**{"train.steps": 5})``."""
        data = self.to_dict()
        for dotted, value in sections.items():
            node = data
            *parents, leaf = dotted.split(".")
            for key in parents:
                node = node[key]
            node[leaf] = value
        return Config.from_dict(data)

    # ---- cross-field rules ------------------------------------------------------------------

    def validate(self) -> None:
        d, n, t, lo, tr = self.dataset, self.network, self.timesteps, self.loss, self.train
        _require((d.frames - 1) % 8 == 0 and d.frames >= 1, "dataset.frames", f"must be 8n+1 (1, 9, 17, 25, ...), got {d.frames}")
        for f in d.frame_buckets:
            _require((f - 1) % 8 == 0 and f >= 1, "dataset.frame_buckets", f"every entry must be 8n+1, got {f}")
        _require(d.width % 32 == 0 and d.width > 0, "dataset.width", f"must be a positive multiple of 32, got {d.width}")
        _require(d.height % 32 == 0 and d.height > 0, "dataset.height", f"must be a positive multiple of 32, got {d.height}")
        for wh in d.resolution_buckets:
            _require(
                len(wh) == 2 and all(v > 0 and v % 32 == 0 for v in wh),
                "dataset.resolution_buckets",
                f"every entry must be [width, height] in positive multiples of 32, got {wh}",
            )
        _require(d.target_fps > 0, "dataset.target_fps", "must be > 0")
        _require(0.0 <= d.validation_split < 1.0, "dataset.validation_split", "must be in [0, 1)")
        _require("{caption}" in d.caption_template, "dataset.caption_template", "must contain {caption}")
        for i, s in enumerate(d.sources):
            _require(s.repeats >= 1, f"dataset.sources[{i}].repeats", "must be >= 1")
            _require(s.caption_extension.startswith("."), f"dataset.sources[{i}].caption_extension", "must start with '.', e.g. '.txt'")
        _require(n.rank >= 1, "network.rank", "must be >= 1")
        _require(n.alpha > 0, "network.alpha", "must be > 0")
        _require(0.0 <= n.dropout < 1.0, "network.dropout", "must be in [0, 1)")
        _require(self.optimizer.lr > 0, "optimizer.lr", "must be > 0")
        _require(len(self.optimizer.betas) == 2, "optimizer.betas", "must be two numbers, e.g. [0.9, 0.999]")
        _require(self.schedule.num_cycles >= 1, "schedule.num_cycles", "must be >= 1")
        _require(0.0 <= t.min_sigma < t.max_sigma <= 1.0, "timesteps.min_sigma/max_sigma", "need 0 <= min_sigma < max_sigma <= 1")
        _require(t.logit_std > 0, "timesteps.logit_std", "must be > 0")
        _require(0.0 <= t.stretched_uniform_fraction <= 1.0, "timesteps.stretched_uniform_fraction", "must be in [0, 1]")
        _require(
            lo.min_snr_gamma == 0,
            "loss.min_snr_gamma",
            "Min-SNR weighting does not exist for flow matching (LTX-2 has no alphas_cumprod); set it to 0 and "
            "shape the noise levels with [timesteps] sampling/shift instead",
        )
        _require(0 < lo.balance_min <= lo.balance_max, "loss.balance_min/balance_max", "need 0 < balance_min <= balance_max")
        _require(0.0 < lo.ema_decay < 1.0, "loss.ema_decay", "must be in (0, 1)")
        _require(lo.target_ratio > 0, "loss.target_ratio", "must be > 0")
        _require(lo.huber_delta > 0, "loss.huber_delta", "must be > 0")
        _require(tr.steps >= 1, "train.steps", "must be >= 1")
        _require(tr.batch_size >= 1, "train.batch_size", "must be >= 1")
        _require(tr.gradient_accumulation >= 1, "train.gradient_accumulation", "must be >= 1")
        _require(tr.max_grad_norm >= 0, "train.max_grad_norm", "must be >= 0 (0 disables clipping)")
        _require(tr.max_consecutive_nonfinite >= 1, "train.max_consecutive_nonfinite", "must be >= 1")
        _require(self.logging.log_every >= 1, "logging.log_every", "must be >= 1")
        _require(self.output.save_every >= 1, "output.save_every", "must be >= 1")
        _require(self.output.keep_states >= 1, "output.keep_states", "must be >= 1")
        _require(bool(self.output.name) and "/" not in self.output.name and "\\" not in self.output.name and ".." not in self.output.name,
                 "output.name", f"must be a plain file name without path separators, got {self.output.name!r}")


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


# --------------------------------------------------------------------------------------------
# Generic dict -> dataclass builder with strict checks
# --------------------------------------------------------------------------------------------


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a table of keys, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = prefix or "top level"
        raise ConfigError(f"unknown key {_join(prefix, unknown[0])!r} in {where}; allowed keys: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, _join(prefix, name))
    return cls(**kwargs)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}")
        return value
    if origin in (list, typing.List):
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return _coerce(option, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if tp is typing.Any:
        return value
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{key}: expected nothing, got {value!r}")
        return None
    raise ConfigError(f"{key}: unsupported type {tp}")  # a programming error in this file


def default_config() -> Config:
    return Config()
