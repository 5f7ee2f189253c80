"""The LoRA key check ("verify"): which keys of an adapter file land on a model, counted per module group.

Keys are read with ``files.split_adapter_key``, which knows every adapter type's suffixes; module paths are
the reference (ComfyUI) paths, never rebuilt by turning underscores back into dots (``audio_attn1`` has
underscores of its own).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .files import GROUPS, KEY_PREFIX, METADATA_PREFIX, module_group, read_adapter_file, split_adapter_key


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

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        groups = ", ".join(f"{g}={n}" for g, n in self.by_group.items() if n)
        status = "OK" if self.ok else "FAILED"
        line = f"verify {status}: {self.applied_modules} modules applied ({groups or 'none'}), {len(self.unloaded_keys)} keys not loaded"
        if self.missing_groups:
            line += f"; trained groups missing from the model: {', '.join(self.missing_groups)}"
        return line

    def to_text(self) -> str:
        """The report as a few readable lines (the Verify node's output)."""
        lines = [self.summary(), f"file: {self.file} ({self.total_keys} keys)",
                 "applied modules per group: " + ", ".join(f"{g}={self.by_group[g]}" for g in GROUPS)]
        if self.trained_groups:
            lines.append("groups the run trained: " + ", ".join(self.trained_groups))
        if self.unloaded_keys:
            shown = self.unloaded_keys[:20]
            lines.append(f"keys ComfyUI does not load ({len(self.unloaded_keys)}): " + ", ".join(shown)
                         + (" ..." if len(self.unloaded_keys) > len(shown) else ""))
        return "\n".join(lines)


def verify_report(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                  applied_modules: set[str], unloaded_keys: list[str]) -> VerifyReport:
    """The report of an adapter file given what a loader applied: counts per group, and the groups the run
    trained (from the file's metadata) that nothing was applied to."""
    by_group = {g: 0 for g in GROUPS}
    for module in applied_modules:
        by_group[module_group(module)] += 1
    trained_groups = json.loads(metadata.get(METADATA_PREFIX + "groups", "[]"))
    missing = [g for g in trained_groups if by_group.get(g, 0) == 0]
    return VerifyReport(
        file=str(path),
        total_keys=len(tensors),
        applied_modules=len(applied_modules),
        unloaded_keys=list(unloaded_keys),
        by_group=by_group,
        trained_groups=trained_groups,
        missing_groups=missing,
        ok=not unloaded_keys and not missing and bool(applied_modules),
    )


def verify_lora_keys(path: str | Path, model_module_paths: set[str], *, prefix_required: bool = True) -> VerifyReport:
    """Check a LoRA file against the reference module paths of a model (headless check; the ComfyUI
    node runs ComfyUI's own key map). A key is loaded when its module path exists in the model and it
    carries a prefix ComfyUI maps (``diffusion_model.`` or none; never diffusers' ``transformer.``)."""
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
    return verify_report(path, tensors, metadata, applied, unloaded)
