"""The LoRA key check ("verify") against a model, module groups, and the naming shared by the adapter files.

Adapter files (``trainer.networks.files``) use keys built from each adapted module's reference path (never by
turning underscores back into dots: ``audio_attn1`` has underscores of its own), e.g.
``diffusion_model.<path>.lora_down.weight`` [rank, in], ``.lora_up.weight`` [out, rank] and ``.alpha``.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch


KEY_PREFIX = "diffusion_model."
METADATA_PREFIX = "ltx2_av_trainer."
SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Verify groups (architecture.md): applied modules are counted per group.
GROUPS = ("video_attn", "audio_attn", "a2v", "v2a", "video_ff", "audio_ff", "connector", "other")
_GROUP_RULES = [
    ("connector", re.compile(r"(^|\.)(video|audio)_embeddings_connector\.")),
    ("a2v", re.compile(r"(^|\.)audio_to_video_attn\.")),
    ("v2a", re.compile(r"(^|\.)video_to_audio_attn\.")),
    ("audio_attn", re.compile(r"(^|\.)audio_attn[12]\.")),
    ("video_attn", re.compile(r"(^|\.)attn[12]\.")),
    ("audio_ff", re.compile(r"(^|\.)audio_ff\.")),
    ("video_ff", re.compile(r"(^|\.)ff\.")),
]

def module_group(path: str) -> str:
    for group, rule in _GROUP_RULES:
        if rule.search(path):
            return group
    return "other"


@dataclass
class VerifyReport:
    """Which LoRA modules land on a model (architecture.md verify contract)."""

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


def verify_lora_keys(path: str | Path, model_module_paths: set[str], *, prefix_required: bool = True) -> VerifyReport:
    """Check a LoRA file against the reference module paths of a model (headless check; the ComfyUI
    node runs ComfyUI's own key map). A key is loaded when its module path exists in the model and it
    carries a prefix ComfyUI maps (``diffusion_model.`` or none; never diffusers' ``transformer.``)."""
    from .networks.files import read_adapter_file, split_adapter_key

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
    by_group = {g: 0 for g in GROUPS}
    for module in applied:
        by_group[module_group(module)] += 1
    trained_groups = json.loads(metadata.get(METADATA_PREFIX + "groups", "[]"))
    missing = [g for g in trained_groups if by_group.get(g, 0) == 0]
    return VerifyReport(
        file=str(path),
        total_keys=len(tensors),
        applied_modules=len(applied),
        unloaded_keys=unloaded,
        by_group=by_group,
        trained_groups=trained_groups,
        missing_groups=missing,
        ok=not unloaded and not missing and bool(applied),
    )
