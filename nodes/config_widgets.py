"""Node widgets generated from ``trainer/config.py``: one widget per trainer option, so the node and the
TOML config can never drift apart.

Each dataclass field becomes a widget named ``<section>_<field>`` (``optimizer_lr``, ``network_rank``)
with the field's help text as its tooltip: ``Literal`` → COMBO, ``bool`` → BOOLEAN, ``int`` → INT,
``float`` → FLOAT, lists → STRING holding JSON, ``float | None`` → STRING (empty = unset).

Options that another node or the MODEL decides are not widgets (``SET_ELSEWHERE``): the dataset (Load
Dataset), the cache folder (Cache Latents), the model version and source (the MODEL input), the run
folder, LoRA name and resume policy (Train LoRA's run_name: every queue resumes its run), the device
(ComfyUI's model management) and connector training (off in ComfyUI).
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from ..trainer.config import Config, ConfigError

SET_ELSEWHERE: dict[str, str] = {
    "dataset": "the LTX2AV Load Dataset node",
    "cache": "the LTX2AV Cache Latents node",
    "model.version": "the MODEL input (detected from the checkpoint)",
    "model.source": "the MODEL input",
    "model.tiny": "the MODEL input",
    "output.dir": "Train LoRA's run_name (output/ltx2av_runs/<run_name>)",
    "output.name": "Train LoRA's run_name",
    "output.resume": "Train LoRA (every queue continues its run; use a new run_name to start over)",
    "train.device": "ComfyUI's model management (the MODEL's load device)",
    "network.connectors": "nothing: it stays off in ComfyUI, whose text connectors run before the MODEL's forward",
}

INT_MAX = 2**31 - 1
FLOAT_MAX = 1.0e6


@dataclass(frozen=True)
class WidgetSpec:
    """One trainer option as a node widget."""

    name: str  # widget id, e.g. "optimizer_lr"
    key: str  # dotted config key, e.g. "optimizer.lr"
    kind: Literal["COMBO", "BOOLEAN", "INT", "FLOAT", "JSON", "OPTIONAL_FLOAT", "STRING"]
    default: Any  # as the widget shows it
    tooltip: str
    options: tuple[str, ...] = ()


def _set_elsewhere(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in SET_ELSEWHERE)


def _kind(tp: Any) -> tuple[str, tuple[str, ...]]:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "COMBO", tuple(str(v) for v in typing.get_args(tp))
    if origin in (list, typing.List):
        return "JSON", ()
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if args == [float]:
            return "OPTIONAL_FLOAT", ()
    if tp is bool:
        return "BOOLEAN", ()
    if tp is int:
        return "INT", ()
    if tp is float:
        return "FLOAT", ()
    if tp is str:
        return "STRING", ()
    raise TypeError(f"no widget for config type {tp}")  # a new kind of field in config.py: add it here


def _widget_default(kind: str, value: Any) -> Any:
    if kind == "JSON":
        return json.dumps(value)
    if kind == "OPTIONAL_FLOAT":
        return "" if value is None else repr(float(value))
    return value


def training_widgets() -> list[WidgetSpec]:
    """Every trainer option the Training Config node shows, in config.py order."""
    defaults = Config()
    specs = []
    for section in dataclasses.fields(Config):
        section_cls = section.type if isinstance(section.type, type) else type(getattr(defaults, section.name))
        hints = typing.get_type_hints(section_cls)
        section_value = getattr(defaults, section.name)
        for field in dataclasses.fields(section_cls):
            key = f"{section.name}.{field.name}"
            if _set_elsewhere(key):
                continue
            kind, options = _kind(hints[field.name])
            help_text = field.metadata.get("help")
            if not help_text:
                raise TypeError(f"config field {key} has no help text (config.py's opt() gives every field one)")
            suffix = " JSON list." if kind == "JSON" else " Empty = unset." if kind == "OPTIONAL_FLOAT" else ""
            specs.append(WidgetSpec(
                name=f"{section.name}_{field.name}",
                key=key,
                kind=kind,
                default=_widget_default(kind, getattr(section_value, field.name)),
                tooltip=f"{help_text}{suffix} [config key: {key}]",
                options=options,
            ))
    names = [s.name for s in specs]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise TypeError(f"config widgets with the same name: {sorted(duplicates)}")
    return specs


def float_step(default: float) -> float:
    """Widget step two decades below the default, so the frontend's rounding (to the step's precision) keeps
    small values such as lr 1e-4 or eps 1e-8 exact."""
    if default == 0:
        return 0.001
    return min(0.01, 10.0 ** (math.floor(math.log10(abs(default))) - 2))


def widget_inputs(specs: list[WidgetSpec]) -> list:
    """The V3 inputs for ``specs``."""
    from comfy_api.latest import io

    inputs = []
    for spec in specs:
        common = dict(tooltip=spec.tooltip, default=spec.default)
        if spec.kind == "COMBO":
            inputs.append(io.Combo.Input(spec.name, options=list(spec.options), **common))
        elif spec.kind == "BOOLEAN":
            inputs.append(io.Boolean.Input(spec.name, **common))
        elif spec.kind == "INT":
            # The frontend clamps to [0, 2048] unless told otherwise; -1 is a valid "automatic" for some options.
            inputs.append(io.Int.Input(spec.name, min=min(0, spec.default), max=INT_MAX, step=1, **common))
        elif spec.kind == "FLOAT":
            inputs.append(io.Float.Input(spec.name, min=min(0.0, spec.default), max=FLOAT_MAX, step=float_step(spec.default), **common))
        else:  # JSON, OPTIONAL_FLOAT, STRING
            inputs.append(io.String.Input(spec.name, **common))
    return inputs


def parse_widget(spec: WidgetSpec, value: Any) -> Any:
    """A widget value → the config value; errors name the widget and what it expects."""
    if spec.kind == "JSON":
        try:
            return json.loads(value) if isinstance(value, str) else value
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{spec.name}: not valid JSON ({exc}); expected a list such as {spec.default}") from None
    if spec.kind == "OPTIONAL_FLOAT":
        text = str(value).strip()
        if not text:
            return None
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{spec.name}: {value!r} is not a number; leave it empty to unset") from None
    if spec.kind == "COMBO" and spec.options and value not in spec.options:
        raise ConfigError(f"{spec.name}: {value!r} is not one of {', '.join(spec.options)}")
    return value


def config_from_widgets(values: dict[str, Any], specs: list[WidgetSpec] | None = None) -> Config:
    """A validated ``Config`` from widget values (options set elsewhere keep their defaults)."""
    specs = specs if specs is not None else training_widgets()
    data = Config().to_dict()
    missing = [s.name for s in specs if s.name not in values]
    if missing:
        raise ConfigError(f"missing config widgets: {', '.join(missing)}")
    for spec in specs:
        section, field = spec.key.split(".")
        data[section][field] = parse_widget(spec, values[spec.name])
    return Config.from_dict(data)
