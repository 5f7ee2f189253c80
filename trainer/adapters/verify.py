"""The LoRA key check ("verify"): which keys of an adapter file land on a model, counted per module group, and
what a file of another trainer would load after ``ltx2-av-trainer convert``.

Keys are read with ``formats.parse_lora``, which knows every layout (ComfyUI ``lora_A``/``lora_B`` and
``lora_down``/``lora_up``, kohya / musubi-tuner ``lora_unet_``, diffusers ``transformer.``, PEFT
``base_model.model.``) and every adapter type's suffixes; module paths are the reference (ComfyUI) paths, never
rebuilt by turning underscores back into dots (``audio_attn1`` has underscores of its own).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .files import GROUPS, METADATA_PREFIX, module_group, read_adapter_file
from .formats import ParsedLoRA, comfyui_module, parse_lora, runtime_support

_SHOWN = 20


@dataclass
class VerifyReport:
    """Which LoRA modules land on a model: applied modules per group and the keys that would not load; for any
    file, what would load after conversion and what cannot be converted, and how each runtime loads it as it is."""

    file: str
    total_keys: int
    applied_modules: int
    unloaded_keys: list[str]
    by_group: dict[str, int]
    trained_groups: list[str] = field(default_factory=list)
    missing_groups: list[str] = field(default_factory=list)
    ok: bool = True
    layout: str = ""  # the file's key layout (formats.LAYOUT_WRITERS)
    written_by: str = ""
    convertible_by_group: dict[str, int] = field(default_factory=dict)  # modules on this model after `convert`
    not_convertible: dict[str, str] = field(default_factory=dict)  # file key → why it cannot be converted or applied
    runtimes: dict[str, dict] = field(default_factory=dict)  # comfyui / diffusers / ltx_core → RuntimeSupport as dict
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        groups = ", ".join(f"{g}={n}" for g, n in self.by_group.items() if n)
        status = "OK" if self.ok else "FAILED"
        line = f"verify {status}: {self.applied_modules} modules applied ({groups or 'none'}), {len(self.unloaded_keys)} keys not loaded"
        if self.missing_groups:
            line += f"; trained groups missing from the model: {', '.join(self.missing_groups)}"
        return line

    def conversion_summary(self) -> str:
        converted = sum(self.convertible_by_group.values())
        groups = ", ".join(f"{g}={n}" for g, n in self.convertible_by_group.items() if n)
        return (f"after `ltx2-av-trainer convert`: {converted} modules would load ({groups or 'none'}), "
                f"{len(self.not_convertible)} keys cannot be converted")

    def to_text(self) -> str:
        """The report as a few readable lines (the Verify node's output, the CLI's)."""
        lines = [self.summary(), f"file: {self.file} ({self.total_keys} keys)"]
        if self.layout:
            lines.append(f"key layout: {self.layout} (written by {self.written_by})")
        lines.append("applied modules per group: " + ", ".join(f"{g}={self.by_group[g]}" for g in GROUPS))
        if self.trained_groups:
            lines.append("groups the run trained: " + ", ".join(self.trained_groups))
        if self.unloaded_keys:
            shown = self.unloaded_keys[:_SHOWN]
            lines.append(f"keys ComfyUI does not load ({len(self.unloaded_keys)}): " + ", ".join(shown)
                         + (" ..." if len(self.unloaded_keys) > len(shown) else ""))
        if self.runtimes:
            lines.append("as it is: " + "; ".join(
                f"{name} {r['status']} ({r['modules']} modules{', ' + r['reason'] if r['reason'] else ''})"
                for name, r in self.runtimes.items()))
        if self.convertible_by_group:
            lines.append(self.conversion_summary())
            lines.append("  per group: " + ", ".join(f"{g}={self.convertible_by_group[g]}" for g in GROUPS))
        for key, why in list(self.not_convertible.items())[:_SHOWN]:
            lines.append(f"  cannot convert {key}: {why}")
        if len(self.not_convertible) > _SHOWN:
            lines.append(f"  ... and {len(self.not_convertible) - _SHOWN} more")
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def verify_report(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                  applied_modules: set[str], unloaded_keys: list[str], model_module_paths: set[str] | None = None,
                  parsed: ParsedLoRA | None = None) -> VerifyReport:
    """The report of an adapter file given what a loader applied as it is: counts per group, the groups the run
    trained (from the file's metadata) that nothing was applied to; with the model's module paths, also what
    the file would apply after conversion to our layout, and why the rest cannot be converted."""
    by_group = {g: 0 for g in GROUPS}
    for module in applied_modules:
        by_group[module_group(module)] += 1
    trained_groups = json.loads(metadata.get(METADATA_PREFIX + "groups", "[]"))
    missing = [g for g in trained_groups if by_group.get(g, 0) == 0]
    report = VerifyReport(
        file=str(path),
        total_keys=len(tensors),
        applied_modules=len(applied_modules),
        unloaded_keys=list(unloaded_keys),
        by_group=by_group,
        trained_groups=trained_groups,
        missing_groups=missing,
        ok=not unloaded_keys and not missing and bool(applied_modules),
    )
    parsed = parsed if parsed is not None else parse_lora(tensors, metadata)
    report.layout, report.written_by = parsed.layout, parsed.writers
    report.runtimes = {name: support.to_dict() for name, support in runtime_support(tensors, parse_lora(tensors)).items()}
    report.notes = list(parsed.notes)
    report.not_convertible = dict(parsed.unconvertible)
    if model_module_paths is not None:
        convertible = {g: 0 for g in GROUPS}
        for module_path, module_tensors in parsed.modules.items():
            if module_path in model_module_paths:
                convertible[module_group(module_path)] += 1
            else:
                for suffix in module_tensors:
                    report.not_convertible[f"{module_path}{suffix}"] = (
                        "this model has no such module (a file for another model version?)")
        report.convertible_by_group = convertible
    return report


def verify_lora_keys(path: str | Path, model_module_paths: set[str]) -> VerifyReport:
    """Check a LoRA file against the reference module paths of a model (the headless check; the ComfyUI node runs
    ComfyUI's own key map for the as-is part). A key loads as it is when ComfyUI's key map holds its name
    (``formats.comfyui_module``) and its module exists in the model with complete factors."""
    tensors, metadata = read_adapter_file(path)
    parsed = parse_lora(tensors, metadata)
    applied: set[str] = set()
    unloaded: list[str] = []
    for key in sorted(tensors):
        module = comfyui_module(key)
        if module is not None and module in model_module_paths and module in parsed.modules:
            applied.add(module)
        else:
            unloaded.append(key)
    return verify_report(path, tensors, metadata, applied, unloaded, model_module_paths, parsed)
