"""The LoRA key check ("verify"): which keys of an adapter file land on a model, counted per module group.

Keys are read with ``files.split_adapter_key``, which knows every adapter type's suffixes; module paths are
the reference (ComfyUI) paths, never rebuilt by turning underscores back into dots (``audio_attn1`` has
underscores of its own). A key that lands on a module is only useful when its tensors have the shapes that
module needs: every applied module's factors must compose to an update of the layer's ``[out, in]`` shape
(LoRA up·down, LoHa's two products, LoKr's Kronecker product, DoRA's ``[1, in]`` magnitude), else the file
fails with the list of mismatches.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .files import GROUPS, KEY_PREFIX, METADATA_PREFIX, group_file_tensors, module_group, read_adapter_file, split_adapter_key
from .layers import detect_type


@dataclass
class VerifyReport:
    """Which LoRA modules land on a model: applied modules per group and the keys that would not load."""

    file: str
    total_keys: int
    applied_modules: int
    unloaded_keys: list[str]
    by_group: dict[str, int]
    trained_groups: list[str] = field(default_factory=list)
    missing_groups: list[str] = field(default_factory=list)
    ok: bool = True
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

    def to_text(self) -> str:
        """The report as a few readable lines (the Verify node's output)."""
        lines = [self.summary(), f"file: {self.file} ({self.total_keys} keys)",
                 "applied modules per group: " + ", ".join(f"{g}={self.by_group[g]}" for g in GROUPS)]
        if self.trained_groups:
            lines.append("groups the run trained: " + ", ".join(self.trained_groups))
        for mismatch in self.shape_mismatches[:20]:
            lines.append(f"wrong shape: {mismatch}")
        if self.unloaded_keys:
            shown = self.unloaded_keys[:20]
            lines.append(f"keys ComfyUI does not load ({len(self.unloaded_keys)}): " + ", ".join(shown)
                         + (" ..." if len(self.unloaded_keys) > len(shown) else ""))
        return "\n".join(lines)


def verify_report(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                  applied_modules: set[str], unloaded_keys: list[str],
                  module_shapes: dict[str, tuple[int, int]] | None = None) -> VerifyReport:
    """The report of an adapter file given what a loader applied: counts per group, the groups the run
    trained (from the file's metadata) that nothing was applied to, and, with ``module_shapes`` (reference
    module path → the layer's ``(out, in)``), every applied module whose tensors do not fit its layer."""
    by_group = {g: 0 for g in GROUPS}
    for module in applied_modules:
        by_group[module_group(module)] += 1
    trained_groups = json.loads(metadata.get(METADATA_PREFIX + "groups", "[]"))
    missing = [g for g in trained_groups if by_group.get(g, 0) == 0]
    mismatches = []
    if module_shapes is not None:
        grouped = group_file_tensors(tensors)
        for module in sorted(applied_modules):
            problem = update_shape_problem(grouped.get(module, {}), module_shapes.get(module))
            if problem:
                mismatches.append(f"{module}: {problem}")
    return VerifyReport(
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


def verify_lora_keys(path: str | Path, model_module_paths: set[str] | dict[str, tuple[int, int]], *,
                     prefix_required: bool = True) -> VerifyReport:
    """Check a LoRA file against the reference module paths of a model (headless check; the ComfyUI
    node runs ComfyUI's own key map). A key is loaded when its module path exists in the model and it
    carries a prefix ComfyUI maps (``diffusion_model.`` or none; never diffusers' ``transformer.``). Given a
    dict (path → the Linear layer's ``(out, in)``), the applied modules' tensor shapes are checked too."""
    tensors, metadata = read_adapter_file(path)
    applied: set[str] = set()
    unloaded: list[str] = []
    for key in sorted(tensors):
        parsed = split_adapter_key(key)
        if parsed is None or key.startswith("transformer.") or (prefix_required and not key.startswith(KEY_PREFIX)):
            unloaded.append(key)
            continue
        module, _ = parsed
        if module in model_module_paths:
            applied.add(module)
        else:
            unloaded.append(key)
    shapes = model_module_paths if isinstance(model_module_paths, dict) else None
    return verify_report(path, tensors, metadata, applied, unloaded, shapes)
