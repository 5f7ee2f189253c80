"""The Training Config node's widgets: one per trainer option of ``trainer/config.py``, in a fixed order.

Saved workflows keep widget values by position. ``TRAINING_CONFIG_WIDGETS`` is therefore an explicit,
append-only list: a new config option gets its widget at the END of the list, whichever section it belongs
to, so every value in a saved workflow stays on its widget (a workflow saved before the new option simply
lacks its value, and the frontend gives that widget its default). ``tests/test_training_config_widgets.py``
holds the order as released and fails on a reorder, a removal or an insertion in the middle, and when a
config option has neither a widget nor a reason in ``NOT_IN_TRAINING_CONFIG``.

What a person sees: the first widgets (``advanced=False``) are the options that matter for a voice LoRA,
with the recommended values as defaults; the rest are ComfyUI advanced inputs, folded until the node's
"show advanced inputs" is turned on. Every number has the range the trainer accepts, so the frontend and
ComfyUI's prompt validation refuse anything else. Lists are typed: one entry per line (regular
expressions, prompts, ``regex=lr`` overrides), numbers separated by commas (σ values, seeds), or one number
widget per entry (Adam's betas). Defaults and tooltips come from the config itself, so node and TOML cannot
drift apart: widget ``section_field`` is TOML key ``section.field``.

Options not in the node are in ``NOT_IN_TRAINING_CONFIG`` with the reason: another node or the MODEL
decides them, or they belong to the headless command line (the ``[memory]`` section: ComfyUI's own model
management loads, offloads and casts the MODEL).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from ..trainer.config import Config, ConfigError

NOT_IN_TRAINING_CONFIG: dict[str, str] = {
    "dataset": "the LTX2AV Load Dataset node",
    "cache": "the LTX2AV Cache Latents node",
    "model.version": "the MODEL input (detected from the checkpoint)",
    "model.source": "the MODEL input",
    "model.tiny": "the MODEL input",
    "output.dir": "Train LoRA's run_name (output/ltx2av_runs/<run_name>)",
    "output.name": "Train LoRA's run_name",
    "output.resume": "Train LoRA (every queue continues its run; use a new run_name to start over)",
    "train.device": "ComfyUI's model management (the MODEL's load device)",
    "train.num_threads": "ComfyUI's process (torch's thread count is the server's, not one run's)",
    "network.connectors": "nothing: it stays off in ComfyUI, whose text connectors run before the MODEL's forward",
    "loss.min_snr_gamma": "nothing: it must stay 0 (Min-SNR weighting does not exist for flow matching)",
    "slider": "the headless ltx2-av-trainer slider command (a slider trains from two prompts, without the dataset "
              "and cache these nodes feed)",
    "memory": "ComfyUI's model management: it loads and offloads the MODEL as for sampling; fp8 weights come "
              "from the loader's weight_dtype, the attention kernel from ComfyUI's launch options. The "
              "[memory] options are for the headless command line.",
}

INT_LIMIT = 2**31 - 1
STEPS_LIMIT = 1_000_000
SEED_LIMIT = 2**31 - 1

Kind = Literal["COMBO", "BOOLEAN", "INT", "FLOAT", "STRING", "LINES", "FLOATS", "INTS", "OPTIONAL_FLOAT", "SWITCH",
               "ITEM"]


@dataclass(frozen=True)
class WidgetDef:
    """How one widget maps to the config; the rest (type, default, help) is read from ``trainer/config.py``.

    ``unset``: for an optional number (``float | None``), the widget value that means "unset".
    ``switch``: for an optional number whose every value is meaningful, the BOOLEAN widget that turns it on.
    ``index``: for a fixed-length list shown as one number widget per entry (Adam's betas).
    """

    name: str
    key: str
    advanced: bool = True
    min: float | None = None
    max: float | None = None
    step: float | None = None
    unset: float | None = None
    switch: str | None = None
    index: int | None = None
    multiline: bool = False


def _w(name: str, *, key: str | None = None, advanced: bool = True, **options) -> WidgetDef:
    section, field = name.split("_", 1)
    return WidgetDef(name=name, key=key or f"{section}.{field}", advanced=advanced, **options)


def _main(name: str, **options) -> WidgetDef:
    return _w(name, advanced=False, **options)


# APPEND ONLY: saved workflows store these values by position. Add a new option at the very end.
TRAINING_CONFIG_WIDGETS: tuple[WidgetDef, ...] = (
    # -- shown: what a voice LoRA needs, with the recommended values --
    _main("train_steps", min=1, max=STEPS_LIMIT),
    _main("network_preset"),
    _main("network_rank", min=1, max=1024),
    _main("network_alpha", min=0.01, max=4096.0, step=0.01),
    _main("optimizer_lr", min=1e-6, max=10.0),
    _main("optimizer_audio_lr", min=0.0, max=10.0, step=1e-6, unset=0.0),
    _main("timesteps_independent_audio"),
    _main("loss_balance"),
    _main("audio_missing_audio"),
    _main("model_gradient_checkpointing"),
    _main("train_mixed_precision"),
    _main("output_save_every", min=1, max=STEPS_LIMIT),
    _main("train_seed", min=0, max=SEED_LIMIT),
    # -- advanced: model and adapter --
    _w("model_cross_modal_sigma"),
    _w("network_type"),
    _w("network_include"),
    _w("network_exclude"),
    _w("network_dropout", min=0.0, max=0.99, step=0.01),
    _w("network_rank_dropout", min=0.0, max=0.99, step=0.01),
    _w("network_module_dropout", min=0.0, max=0.99, step=0.01),
    _w("network_lokr_factor", min=-1, max=1024),
    _w("network_init_seed", min=0, max=SEED_LIMIT),
    # -- advanced: optimizer and schedule --
    _w("optimizer_name"),
    _w("optimizer_lr_overrides"),
    _w("optimizer_loraplus_ratio", min=0.01, max=1000.0, step=0.01),
    _w("optimizer_weight_decay", min=0.0, max=10.0, step=0.0001),
    _w("optimizer_beta1", key="optimizer.betas", index=0, min=0.0, max=0.9999, step=0.0001),
    _w("optimizer_beta2", key="optimizer.betas", index=1, min=0.0, max=0.99999, step=0.00001),
    _w("optimizer_eps", min=1e-12, max=1e-2, step=1e-12),
    _w("schedule_name"),
    _w("schedule_warmup_steps", min=0, max=STEPS_LIMIT),
    _w("schedule_num_cycles", min=1, max=1000),
    _w("schedule_min_lr_ratio", min=0.0, max=1.0, step=0.01),
    # -- advanced: noise levels --
    _w("timesteps_sampling"),
    _w("timesteps_shifted_mode"),
    _w("timesteps_fixed_shift", key="timesteps.shift"),
    _w("timesteps_shift", switch="timesteps_fixed_shift", min=-10.0, max=10.0, step=0.01),
    _w("timesteps_logit_std", min=0.01, max=10.0, step=0.01),
    _w("timesteps_stretched_uniform_fraction", min=0.0, max=1.0, step=0.01),
    _w("timesteps_min_sigma", min=0.0, max=0.99, step=0.01),
    _w("timesteps_max_sigma", min=0.01, max=1.0, step=0.01),
    # -- advanced: losses and audio balance --
    _w("loss_type"),
    _w("loss_huber_delta", min=0.001, max=100.0, step=0.001),
    _w("loss_video_weight", min=0.0, max=100.0, step=0.01),
    _w("loss_audio_weight", min=0.0, max=100.0, step=0.01),
    _w("loss_target_ratio", min=0.001, max=100.0, step=0.001),
    _w("loss_ema_decay", min=0.5, max=0.9999, step=0.0001),
    _w("loss_balance_min", min=0.001, max=100.0, step=0.001),
    _w("loss_balance_max", min=0.001, max=100.0, step=0.001),
    _w("loss_inv_freq_beta", min=0.0001, max=1.0, step=0.0001),
    _w("loss_inv_freq_eps", min=0.001, max=1.0, step=0.001),
    _w("loss_caption_dropout", min=0.0, max=0.99, step=0.01),
    _w("loss_caption_dropout_video", min=0.0, max=0.99, step=0.01),
    _w("loss_caption_dropout_audio", min=0.0, max=0.99, step=0.01),
    _w("loss_noise_offset", min=0.0, max=1.0, step=0.001),
    _w("loss_audio_noise_offset", min=0.0, max=1.0, step=0.001),
    # -- advanced: audio-free batches and the audio supervision monitor --
    _w("audio_silence_weight", min=0.001, max=100.0, step=0.001),
    _w("audio_audio_dop_multiplier", min=0.001, max=100.0, step=0.001),
    _w("audio_batch_probability", min=-1.0, max=1.0, step=0.01, unset=-1.0),
    _w("audio_min_batches_per_accum", min=0, max=64),
    _w("audio_bucket_strategy"),
    _w("audio_bucket_interval_seconds", min=0.04, max=60.0, step=0.01),
    _w("audio_supervision_mode"),
    _w("audio_supervision_warmup", min=0, max=STEPS_LIMIT),
    _w("audio_supervision_interval", min=1, max=STEPS_LIMIT),
    _w("audio_supervision_min_ratio", min=0.0, max=1.0, step=0.01),
    # -- advanced: preservation --
    _w("preservation_dop"),
    _w("preservation_dop_class_prompt"),
    _w("preservation_dop_multiplier", min=0.001, max=100.0, step=0.001),
    _w("preservation_blank"),
    _w("preservation_blank_multiplier", min=0.001, max=100.0, step=0.001),
    _w("preservation_prior_divergence"),
    _w("preservation_prior_divergence_multiplier", min=0.001, max=10.0, step=0.001),
    # -- advanced: validation --
    _w("validation_every_steps", min=0, max=STEPS_LIMIT),
    _w("validation_sigmas"),
    _w("validation_seed", min=0, max=SEED_LIMIT),
    _w("validation_sample_every_steps", min=-1, max=STEPS_LIMIT),
    _w("validation_prompts"),
    _w("validation_sample_seeds"),
    _w("validation_sample_steps", min=1, max=1000),
    _w("validation_sample_seconds", min=0.0, max=60.0, step=0.01),
    _w("validation_fixed_sigma", min=0.01, max=1.0, step=0.01),
    _w("validation_voice_score"),
    _w("validation_report"),
    # -- advanced: training loop, logging, saving --
    _w("train_batch_size", min=1, max=64),
    _w("train_gradient_accumulation", min=1, max=1024),
    _w("train_max_grad_norm", min=0.0, max=1000.0, step=0.01),
    _w("train_max_consecutive_nonfinite", min=1, max=1000),
    _w("logging_log_every", min=1, max=STEPS_LIMIT),
    _w("logging_tensorboard"),
    _w("logging_quiet"),
    _w("output_keep_states", min=1, max=1000),
    _w("output_save_dtype"),
    # -- advanced: added after the first release (appended, never above) --
    _w("output_lora_format"),
    _w("conditioning_mode"),
    _w("conditioning_first_frame_p", min=0.0, max=1.0, step=0.01),
    _w("crepa_enabled"),
    _w("crepa_student_block_idx", min=-1, max=1000),
    _w("crepa_teacher_block_idx", min=-1, max=1000),
    _w("crepa_lambda_crepa", min=0.001, max=100.0, step=0.001),
    _w("crepa_tau", min=0.001, max=100.0, step=0.01),
    _w("crepa_num_neighbors", min=0, max=64),
    _w("crepa_schedule"),
    _w("crepa_warmup_steps", min=0, max=STEPS_LIMIT),
    _w("crepa_projector_lr", min=0.0, max=10.0, step=1e-6, unset=0.0),
    _w("self_flow_enabled", key="self_flow.enabled"),
    _w("self_flow_student_block_idx", key="self_flow.student_block_idx", min=-1, max=1000),
    _w("self_flow_teacher_block_idx", key="self_flow.teacher_block_idx", min=-1, max=1000),
    _w("self_flow_lambda_self_flow", key="self_flow.lambda_self_flow", min=0.001, max=100.0, step=0.001),
    _w("self_flow_dual_timestep", key="self_flow.dual_timestep"),
    _w("self_flow_mask_ratio", key="self_flow.mask_ratio", min=0.0, max=0.5, step=0.01),
    _w("self_flow_frame_level_mask", key="self_flow.frame_level_mask"),
    _w("self_flow_temporal_mode", key="self_flow.temporal_mode"),
    _w("self_flow_lambda_temporal", key="self_flow.lambda_temporal", min=0.0, max=100.0, step=0.001),
    _w("self_flow_lambda_delta", key="self_flow.lambda_delta", min=0.0, max=100.0, step=0.001),
    _w("self_flow_num_neighbors", key="self_flow.num_neighbors", min=0, max=64),
    _w("self_flow_temporal_tau", key="self_flow.temporal_tau", min=0.001, max=100.0, step=0.01),
    _w("self_flow_schedule", key="self_flow.schedule"),
    _w("self_flow_warmup_steps", key="self_flow.warmup_steps", min=0, max=STEPS_LIMIT),
    _w("self_flow_projector_lr", key="self_flow.projector_lr", min=0.0, max=10.0, step=1e-06, unset=0.0),
    # New options: append here (never above), with a range for numbers.
)


@dataclass(frozen=True)
class WidgetSpec:
    """One widget as the node declares it: its kind, default (as the widget shows it) and tooltip."""

    definition: WidgetDef
    kind: Kind
    default: Any
    tooltip: str
    options: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.definition.name

    @property
    def key(self) -> str:
        return self.definition.key


def not_in_node_reason(key: str) -> str | None:
    """Why the Training Config has no widget for ``key`` (None when it should have one)."""
    for prefix, reason in NOT_IN_TRAINING_CONFIG.items():
        if key == prefix or key.startswith(prefix + "."):
            return reason
    return None


def config_fields() -> list[tuple[str, Any, dataclasses.Field, Any]]:
    """(dotted key, type, field, default value) of every option of ``Config`` (nested tables expanded)."""
    found = []

    def walk(cls: type, value: Any, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            key = f"{prefix}.{field.name}" if prefix else field.name
            tp, current = hints[field.name], getattr(value, field.name)
            if dataclasses.is_dataclass(tp):
                walk(tp, current, key)
            else:
                found.append((key, tp, field, current))

    walk(Config, Config(), "")
    return found


def _kind(tp: Any, definition: WidgetDef) -> tuple[Kind, tuple[str, ...]]:
    origin = typing.get_origin(tp)
    if definition.index is not None:
        return "ITEM", ()
    if origin is Literal:
        return "COMBO", tuple(str(v) for v in typing.get_args(tp))
    if origin in (list, typing.List):
        (item,) = typing.get_args(tp)
        kinds = {str: "LINES", float: "FLOATS", int: "INTS"}
        if item in kinds:
            return kinds[item], ()
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if args == [float]:
            if definition.unset is not None:
                return "OPTIONAL_FLOAT", ()
            if definition.switch is not None:
                return "FLOAT", ()
            return "SWITCH", ()
    if tp is bool:
        return "BOOLEAN", ()
    if tp is int:
        return "INT", ()
    if tp is float:
        return "FLOAT", ()
    if tp is str:
        return "STRING", ()
    raise TypeError(f"{definition.name}: no widget for config type {tp} (add one in nodes/config_widgets.py)")


def _display_default(kind: Kind, definition: WidgetDef, value: Any) -> Any:
    if kind == "LINES":
        return "\n".join(value)
    if kind in ("FLOATS", "INTS"):
        return ", ".join(repr(v) for v in value)
    if kind == "ITEM":
        return value[definition.index]
    if kind == "OPTIONAL_FLOAT":
        return definition.unset if value is None else float(value)
    if kind == "SWITCH":
        return value is not None
    if definition.switch is not None:  # the number an optional's switch turns on
        return 0.0 if value is None else float(value)
    return value


_HOW = {
    "LINES": " One entry per line.",
    "FLOATS": " Numbers separated by commas.",
    "INTS": " Whole numbers separated by commas.",
}


def _tooltip(kind: Kind, definition: WidgetDef, help_text: str) -> str:
    extra = _HOW.get(kind, "")
    if kind == "OPTIONAL_FLOAT":
        extra = f" {definition.unset:g} = unset."
    elif kind == "SWITCH":
        help_text = f"On: use the fixed value of the next widget for this option. Off: unset. ({help_text})"
    elif definition.switch is not None:
        extra = f" Used when {definition.switch} is on."
    elif kind == "ITEM":
        extra = f" (entry {definition.index + 1})"
    return f"{help_text}{extra} [config key: {definition.key}]"


def training_widgets() -> list[WidgetSpec]:
    """Every widget of the Training Config node, in saved-workflow order."""
    fields = {key: (tp, field, value) for key, tp, field, value in config_fields()}
    specs = []
    for definition in TRAINING_CONFIG_WIDGETS:
        if definition.key not in fields:
            raise TypeError(f"widget {definition.name}: config.py has no option {definition.key}")
        tp, field, value = fields[definition.key]
        help_text = field.metadata.get("help")
        if not help_text:
            raise TypeError(f"config field {definition.key} has no help text (config.py's opt() gives every field one)")
        kind, options = _kind(tp, definition)
        if kind in ("INT", "FLOAT", "OPTIONAL_FLOAT", "ITEM") and (definition.min is None or definition.max is None):
            raise TypeError(f"widget {definition.name} needs min and max (the range the trainer accepts)")
        specs.append(WidgetSpec(definition, kind, _display_default(kind, definition, value),
                                _tooltip(kind, definition, help_text), options))
    names = [s.name for s in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise TypeError(f"Training Config widgets with the same name: {duplicates}")
    return specs


def float_step(default: float) -> float:
    """A step two decades below the default, so the frontend's rounding (to the step's precision) keeps small
    values such as lr 1e-4 exact."""
    if default == 0:
        return 0.001
    return min(0.01, 10.0 ** (math.floor(math.log10(abs(default))) - 2))


def _number_options(spec: WidgetSpec) -> dict:
    definition = spec.definition
    step = definition.step if definition.step is not None else float_step(spec.default)
    options: dict = {"min": definition.min, "max": definition.max, "step": step}
    # The frontend rounds a FLOAT to its `round` (default: the step); keep the step's precision.
    options["round"] = step
    return options


def widget_inputs(specs: list[WidgetSpec]) -> list:
    """The V3 inputs for ``specs`` (ComfyUI's ``io``)."""
    from comfy_api.latest import io

    inputs = []
    for spec in specs:
        common = dict(tooltip=spec.tooltip, default=spec.default, advanced=spec.definition.advanced)
        if spec.kind == "COMBO":
            inputs.append(io.Combo.Input(spec.name, options=list(spec.options), **common))
        elif spec.kind in ("BOOLEAN", "SWITCH"):
            inputs.append(io.Boolean.Input(spec.name, **common))
        elif spec.kind == "INT":
            inputs.append(io.Int.Input(spec.name, min=int(spec.definition.min), max=int(spec.definition.max), step=1,
                                       **common))
        elif spec.kind in ("FLOAT", "OPTIONAL_FLOAT", "ITEM"):
            inputs.append(io.Float.Input(spec.name, **_number_options(spec), **common))
        else:  # STRING, LINES, FLOATS, INTS
            inputs.append(io.String.Input(spec.name, multiline=spec.kind == "LINES", **common))
    return inputs


_SEPARATORS = re.compile(r"[,;\s]+")


def _numbers(spec: WidgetSpec, value: Any, parse: type) -> list:
    if isinstance(value, list):
        return value
    items = [item for item in _SEPARATORS.split(str(value).strip()) if item]
    try:
        return [parse(item) for item in items]
    except ValueError:
        bad = next(item for item in items if not _parses(parse, item))
        what = "a whole number" if parse is int else "a number"
        raise ConfigError(f"{spec.name}: {bad!r} is not {what}; give {'whole ' if parse is int else ''}numbers "
                          f"separated by commas, e.g. {spec.default}") from None


def _parses(parse: type, text: str) -> bool:
    try:
        parse(text)
    except ValueError:
        return False
    return True


def parse_widget(spec: WidgetSpec, value: Any) -> Any:
    """A widget value → the config value; errors name the widget and what it expects."""
    if spec.kind == "LINES":
        return [line.strip() for line in str(value).splitlines() if line.strip()]
    if spec.kind == "FLOATS":
        return [float(v) for v in _numbers(spec, value, float)]
    if spec.kind == "INTS":
        return [int(v) for v in _numbers(spec, value, int)]
    if spec.kind == "OPTIONAL_FLOAT":
        return None if float(value) == spec.definition.unset else float(value)
    if spec.kind == "COMBO" and value not in spec.options:
        raise ConfigError(f"{spec.name}: {value!r} is not one of {', '.join(spec.options)}")
    return value


def config_from_widgets(values: dict[str, Any], specs: list[WidgetSpec] | None = None) -> Config:
    """A validated ``Config`` from widget values (options that are not widgets keep their defaults)."""
    specs = specs if specs is not None else training_widgets()
    missing = [s.name for s in specs if s.name not in values]
    if missing:
        raise ConfigError(f"missing Training Config widgets: {', '.join(missing)}")
    data = Config().to_dict()
    switches = {s.name: bool(values[s.name]) for s in specs if s.kind == "SWITCH"}
    for spec in specs:
        if spec.kind == "SWITCH":
            continue  # read by the number it turns on
        *parents, leaf = spec.key.split(".")
        node = data
        for part in parents:
            node = node[part]
        value = parse_widget(spec, values[spec.name])
        if spec.kind == "ITEM":
            node[leaf] = list(node[leaf])
            node[leaf][spec.definition.index] = value
        elif spec.definition.switch is not None:
            node[leaf] = value if switches[spec.definition.switch] else None
        else:
            node[leaf] = value
    return Config.from_dict(data)
