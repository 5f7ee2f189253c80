"""The README's option reference, generated from the config's help texts (``tests/test_readme.py`` keeps the
README in step; ``python tests/test_readme.py --write`` rewrites it)."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, Literal

from ltx2_av_trainer.trainer.config import Config


def reference_markdown() -> str:
    """The option reference: one table per config section."""
    lines = []
    for section in dataclasses.fields(Config):
        _section_markdown(section.name, section.type if isinstance(section.type, type) else typing.get_type_hints(Config)[section.name], lines)
    return "\n".join(lines) + "\n"


def _section_markdown(name: str, cls: type, lines: list[str]) -> None:
    hints = typing.get_type_hints(cls)
    rows = []
    nested = []
    instance = cls()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            nested.append((f"{name}.{f.name}", tp))
            continue
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
        if item is not None and dataclasses.is_dataclass(item):
            nested.append((f"[[{name}.{f.name}]]", item))
            continue
        default = getattr(instance, f.name)
        rows.append(f"| `{f.name}` | {_type_name(tp)} | `{json.dumps(default)}` | {f.metadata.get('help', '')} |")
    header = name if name.startswith("[") else f"[{name}]"
    lines.append(f"#### `{header}`\n")
    lines.append("| key | type | default | meaning |")
    lines.append("|---|---|---|---|")
    lines.extend(rows)
    lines.append("")
    for child, tp in nested:
        _section_markdown(child, tp, lines)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " \\| ".join(f"`{v}`" for v in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(t) for t in typing.get_args(tp) if t is not type(None)) + " (optional)"
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))
