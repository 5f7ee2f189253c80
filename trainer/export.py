"""LoRA files in the keys ComfyUI loads, and the key check ("verify") against a model.

Keys are built from each adapted module's reference path (never by turning underscores back into
dots: ``audio_attn1`` has underscores of its own):
``diffusion_model.<path>.lora_down.weight`` [rank, in], ``.lora_up.weight`` [out, rank] and ``.alpha``.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from .io_utils import save_safetensors_atomic

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

# Suffixes of one LoRA module's tensors in the formats ComfyUI maps for LTX/LTXAV (facts §3).
_LORA_SUFFIXES = (
    ".lora_down.weight",
    ".lora_up.weight",
    ".alpha",
    ".lora_A.weight",
    ".lora_B.weight",
    ".lora_mid.weight",
    ".dora_scale",
)


def module_group(path: str) -> str:
    for group, rule in _GROUP_RULES:
        if rule.search(path):
            return group
    return "other"


def lora_state_dict(network, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    tensors = {}
    for path, layer in network.named_layers():
        base = KEY_PREFIX + path
        tensors[base + ".lora_down.weight"] = layer.down.detach().to("cpu", dtype)
        tensors[base + ".lora_up.weight"] = layer.up.detach().to("cpu", dtype)
        tensors[base + ".alpha"] = torch.tensor(layer.alpha, dtype=dtype)
    return tensors


def save_lora(network, path: str | Path, *, config_json: str, base_fingerprint: str, step: int, version: str, dtype: str = "bfloat16") -> Path:
    path = Path(path)
    tensors = lora_state_dict(network, SAVE_DTYPES[dtype])
    net = network.net_config
    metadata = {
        METADATA_PREFIX + "config": config_json,
        METADATA_PREFIX + "base_fingerprint": base_fingerprint,
        METADATA_PREFIX + "step": str(step),
        METADATA_PREFIX + "model_version": version,
        METADATA_PREFIX + "groups": json.dumps(sorted({module_group(p) for p, _ in network.named_layers()})),
        "ss_network_dim": str(net.rank),
        "ss_network_alpha": str(net.alpha),
        "modelspec.architecture": f"ltx-2{'.3' if version == '2.3' else ''}/lora",
    }
    save_safetensors_atomic(tensors, path, metadata=metadata)
    return path


def read_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    with safe_open(str(path), framework="pt") as fh:
        metadata = fh.metadata() or {}
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    return tensors, metadata


def split_lora_key(key: str) -> tuple[str, str] | None:
    """'diffusion_model.a.b.lora_up.weight' → ('a.b', '.lora_up.weight'); None if not a LoRA tensor key."""
    for suffix in _LORA_SUFFIXES:
        if key.endswith(suffix):
            module = key[: -len(suffix)]
            for prefix in ("diffusion_model.", "model.diffusion_model.", "transformer."):
                if module.startswith(prefix):
                    return module[len(prefix):], suffix
            return module, suffix
    return None


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
    tensors, metadata = read_lora(path)
    applied: set[str] = set()
    unloaded: list[str] = []
    for key in sorted(tensors):
        parsed = split_lora_key(key)
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
