"""The LoRA key check ("verify"): which keys of an adapter file land on a model, counted per module group, and
what a file of another trainer would load after ``ltx2-av-trainer convert``.

Keys are read with ``formats.parse_lora``, which knows every layout (ComfyUI ``lora_A``/``lora_B`` and
``lora_down``/``lora_up``, kohya / musubi-tuner ``lora_unet_``, diffusers ``transformer.``, PEFT
``base_model.model.``) and every adapter type's suffixes; module paths are the reference (ComfyUI) paths, never
rebuilt by turning underscores back into dots (``audio_attn1`` has underscores of its own).
A key that lands on a module is only useful when its tensors have the shapes that module needs: every
applied module's factors must compose to an update of the layer's ``[out, in]`` shape (LoRA up·down, LoHa's two
products, LoKr's Kronecker product, DoRA's ``[1, in]`` magnitude), else the file fails with the list of
mismatches.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .files import GROUPS, METADATA_PREFIX, module_group, read_adapter_file
from .formats import ParsedLoRA, comfyui_module, parse_lora, runtime_support
from .layers import detect_type

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
    shape_mismatches: list[str] = field(default_factory=list)  # "module: why its tensors do not fit the layer"

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        groups = ", ".join(f"{g}={n}" for g, n in self.by_group.items() if n)
        status = "OK" if self.ok else "FAILED"
        line = f"verify {status}: {self.applied_modules} modules applied ({groups or 'none'}), {len(self.unloaded_keys)} keys not loaded"
        if self.missing_groups:
            line += f"; trained groups missing from the model: {', '.join(self.missing_groups)}"
        if self.shape_mismatches:
            line += f"; {len(self.shape_mismatches)} modules have tensors of the wrong shape for the model"
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
        for mismatch in self.shape_mismatches[:20]:
            lines.append(f"wrong shape: {mismatch}")
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
                  applied_modules: set[str], unloaded_keys: list[str],
                  model_modules: set[str] | dict[str, tuple[int, int] | None] | None = None,
                  parsed: ParsedLoRA | None = None) -> VerifyReport:
    """The report of an adapter file given what a loader applied as it is: counts per group, the groups the run
    trained (from the file's metadata) that nothing was applied to; with the model's modules (their reference
    paths, or ``model_modules(...)``: path → the Linear layer's ``(out, in)``, None for other modules), also what the
    file would apply after conversion to our layout and why the rest cannot be converted, and, given the shapes,
    every applied module whose tensors do not fit its layer."""
    by_group = {g: 0 for g in GROUPS}
    for module in applied_modules:
        by_group[module_group(module)] += 1
    trained_groups = json.loads(metadata.get(METADATA_PREFIX + "groups", "[]"))
    missing = [g for g in trained_groups if by_group.get(g, 0) == 0]
    parsed = parsed if parsed is not None else parse_lora(tensors, metadata)
    mismatches = []
    if isinstance(model_modules, dict):
        for module in sorted(applied_modules):
            problem = update_shape_problem(parsed.modules.get(module, {}), model_modules.get(module))
            if problem:
                mismatches.append(f"{module}: {problem}")
    report = VerifyReport(
        file=str(path),
        total_keys=len(tensors),
        applied_modules=len(applied_modules),
        unloaded_keys=list(unloaded_keys),
        by_group=by_group,
        trained_groups=trained_groups,
        missing_groups=missing,
        ok=not unloaded_keys and not missing and bool(applied_modules) and not mismatches,
        shape_mismatches=mismatches,
    )
    report.layout, report.written_by = parsed.layout, parsed.writers
    report.runtimes = {name: support.to_dict() for name, support in runtime_support(tensors, parse_lora(tensors)).items()}
    report.notes = list(parsed.notes)
    report.not_convertible = dict(parsed.unconvertible)
    if model_modules is not None:
        convertible = {g: 0 for g in GROUPS}
        for module_path, module_tensors in parsed.modules.items():
            if module_path in model_modules:
                convertible[module_group(module_path)] += 1
            else:
                for suffix in module_tensors:
                    report.not_convertible[f"{module_path}{suffix}"] = (
                        "this model has no such module (a file for another model version?)")
        report.convertible_by_group = convertible
    return report


def update_shape_problem(factors: dict[str, torch.Tensor], layer: tuple[int, int] | None) -> str | None:
    """Why one module's tensors (suffix → tensor) do not make an update of the layer's ``(out, in)`` shape, or
    None when they do. Only shapes are read: nothing is computed."""
    if layer is None:
        return "the model has no Linear layer there"
    shapes = {suffix: tuple(t.shape) for suffix, t in factors.items()}
    listed = ", ".join(f"{suffix.lstrip('.')} {list(shape)}" for suffix, shape in sorted(shapes.items()) if suffix != ".alpha")
    if ".alpha" in shapes and factors[".alpha"].numel() != 1:
        return f"alpha has {factors['.alpha'].numel()} values, not one"
    if any(len(shape) != 2 for suffix, shape in shapes.items() if suffix != ".alpha"):
        return f"factors must be matrices ({listed})"
    try:
        kind = detect_type(set(shapes))
        if kind in ("lora", "dora"):
            (rank, inner), (out, rank_up) = shapes[".lora_down.weight"], shapes[".lora_up.weight"]
            update = (out, inner) if rank == rank_up else None
        elif kind == "loha":
            products = []
            for w in ("1", "2"):
                (out, rank_a), (rank_b, inner) = shapes[f".hada_w{w}_a"], shapes[f".hada_w{w}_b"]
                products.append((out, inner) if rank_a == rank_b else None)
            update = products[0] if products[0] == products[1] else None
        else:  # lokr
            (a, c) = shapes[".lokr_w1"]
            if ".lokr_w2" in shapes:
                (b, d) = shapes[".lokr_w2"]
            else:
                (b, rank), (rank_b, d) = shapes[".lokr_w2_a"], shapes[".lokr_w2_b"]
                if rank != rank_b:
                    return f"the factors do not multiply ({listed})"
            update = (a * b, c * d)
    except (KeyError, ValueError) as exc:
        return f"incomplete or unknown adapter tensors ({listed}): {exc}"
    if update is None:
        return f"the factors do not multiply ({listed})"
    if update != tuple(layer):
        return f"{listed} give a {list(update)} update but the layer is {list(layer)} (another model or size?)"
    if kind == "dora" and shapes[".dora_scale"] != (1, layer[1]):
        return f"dora_scale is {list(shapes['.dora_scale'])}, the layer needs [1, {layer[1]}]"
    return None


def model_modules(module, reference_path=lambda name: name) -> dict[str, tuple[int, int] | None]:
    """Every named module of ``module`` by its reference path (``reference_path`` maps a runtime's own names), with
    the Linear layers' ``(out, in)`` for the shape check (None for the other modules)."""
    shapes = {}
    for name, sub in module.named_modules():
        if name:
            weight = getattr(sub, "weight", None)
            shapes[reference_path(name)] = tuple(weight.shape) if isinstance(weight, torch.Tensor) and weight.ndim == 2 else None
    return shapes


def verify_lora_keys(path: str | Path, model_modules: set[str] | dict[str, tuple[int, int] | None]) -> VerifyReport:
    """Check a LoRA file against a model's modules (the headless check; the ComfyUI node runs ComfyUI's own key map
    for the as-is part). A key loads as it is when ComfyUI's key map holds its name (``formats.comfyui_module``) and
    its module exists in the model with complete factors; given the layers' shapes (``model_modules``), the applied
    modules' tensors must fit them too."""
    tensors, metadata = read_adapter_file(path)
    parsed = parse_lora(tensors, metadata)
    applied: set[str] = set()
    unloaded: list[str] = []
    for key in sorted(tensors):
        module = comfyui_module(key)
        if module is not None and module in model_modules and module in parsed.modules:
            applied.add(module)
        else:
            unloaded.append(key)
    return verify_report(path, tensors, metadata, applied, unloaded, model_modules, parsed)
