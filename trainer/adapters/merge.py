"""Merging LoRAs: a weighted sum of several adapter files into one LoRA that every runtime loads.

``merge_loras`` is a pure function of the parsed sources (the CLI's ``merge`` and the Merge LoRAs node call it
through ``merge_files``). For each module, the update is ΔW = Σ_i w_i(group) · ΔW_i, where w_i(group) is source
i's weight for the module's group (``files.GROUPS``): "the voice from A, the look from B" is A with the audio
groups at 1 and the video groups at 0, and B the other way round.

Two methods:

- ``concat``: the sources' factors side by side, exact. With s_i = alpha_i / rank_i,
  B = [w_1 s_1 B_1 | w_2 s_2 B_2 | ...] and A = [A_1; A_2; ...], so B·A = Σ w_i s_i B_i A_i. The merged rank of a
  module is the sum of its sources' ranks. LoRA sources only.
- ``svd``: ΔW re-projected to a chosen rank r by a truncated SVD (LoKr and LoHa sources are expanded to their ΔW;
  LoRA sources are never expanded: the SVD runs on the QR factors of the stacked B and Aᵀ). Per module, the
  relative error ‖ΔW − ΔW_r‖_F / ‖ΔW‖_F = sqrt(Σ_{k>r} σ_k² / Σ_k σ_k²) is reported. It is the smallest error any
  rank-r LoRA can reach (Eckart–Young), and at most sqrt(1 − r/R), R being the rank of ΔW: the discarded singular
  values are the smallest ones, so their share of the energy is at most their share of the count. r ≥ R is exact.

DoRA sources are refused: a DoRA update depends on the base weights (it rescales the merged weight's columns), so
it is not a sum of updates.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch

from ..config import ConfigError
from ..io_utils import save_safetensors_atomic
from .files import GROUPS, SAVE_DTYPES, module_group, read_adapter_file
from .formats import LORA_FORMATS, METADATA_PREFIX, export_tensors, parse_lora
from .layers import detect_type, layer_from_file

MERGE_METHODS = ("concat", "svd")
# Group families for weights: the modules that write into each stream (a2v updates the video stream, v2a audio).
FAMILIES = {
    "audio": ("audio_attn", "audio_ff", "v2a"),
    "video": ("video_attn", "video_ff", "a2v"),
    "all": GROUPS,
}


def parse_weights(spec: str | float | dict | None) -> dict[str, float]:
    """A weight per group from ``1.0``, ``"0.8"``, ``"audio=1,video=0"``, ``"audio_attn=0.5,default=1"`` or a dict
    of such names. Later names override earlier ones; ``default`` (or a bare number) applies to every group."""
    if spec is None:
        return {g: 1.0 for g in GROUPS}
    if isinstance(spec, (int, float)):
        return {g: float(spec) for g in GROUPS}
    items = spec.items() if isinstance(spec, dict) else [part.split("=", 1) if "=" in part else ("default", part)
                                                          for part in str(spec).split(",") if part.strip()]
    weights = {g: 1.0 for g in GROUPS}
    ordered = sorted(items, key=lambda kv: kv[0].strip() not in ("default", "all"))  # defaults first
    for name, value in ordered:
        name = name.strip()
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"merge weights {spec!r}: {value!r} is not a number") from None
        if not math.isfinite(number):
            raise ConfigError(f"merge weights {spec!r}: {value!r} is not a finite number")
        if name in ("default", "all"):
            groups = GROUPS
        elif name in FAMILIES:
            groups = FAMILIES[name]
        elif name in GROUPS:
            groups = (name,)
        else:
            raise ConfigError(f"merge weights {spec!r}: unknown group {name!r}; use a number, default, "
                              f"{', '.join(FAMILIES)} or one of {', '.join(GROUPS)}")
        for group in groups:
            weights[group] = number
    return weights


@dataclass
class MergeSource:
    """One input of a merge: its modules in our suffixes (``formats.parse_lora``) and a weight per group."""

    name: str
    modules: dict[str, dict[str, torch.Tensor]]
    weights: dict[str, float] = field(default_factory=lambda: {g: 1.0 for g in GROUPS})
    metadata: dict[str, str] = field(default_factory=dict)
    sha256: str = ""


@dataclass
class MergeResult:
    method: str
    rank: int | None  # the requested rank (svd)
    modules: dict[str, dict[str, torch.Tensor]]  # path → {".lora_down.weight": A, ".lora_up.weight": B} (scale folded)
    errors: dict[str, float]  # path → relative Frobenius error of the merged update (0 for concat)
    bounds: dict[str, float]  # path → sqrt(1 − r/R), the most that error can be
    sources: list[MergeSource]

    @property
    def max_error(self) -> float:
        return max(self.errors.values(), default=0.0)

    @property
    def mean_error(self) -> float:
        return sum(self.errors.values()) / len(self.errors) if self.errors else 0.0

    def ranks(self) -> dict[str, int]:
        return {p: int(m[".lora_down.weight"].shape[0]) for p, m in self.modules.items()}

    def summary(self) -> str:
        ranks = sorted(set(self.ranks().values()))
        groups = {g: 0 for g in GROUPS}
        for path in self.modules:
            groups[module_group(path)] += 1
        line = (f"merged {len(self.sources)} LoRAs ({self.method}) into {len(self.modules)} modules "
                f"({', '.join(f'{g}={n}' for g, n in groups.items() if n)}), rank {ranks[0] if len(ranks) == 1 else ranks}")
        if self.method == "svd":
            line += (f"; relative error per module: max {self.max_error:.3g}, mean {self.mean_error:.3g} "
                     f"(bound sqrt(1 - r/R): max {max(self.bounds.values(), default=0.0):.3g})")
        return line

    def metadata(self, lora_format: str) -> dict[str, str]:
        versions = {s.metadata.get(METADATA_PREFIX + "model_version") for s in self.sources} - {None}
        fingerprints = {s.metadata.get(METADATA_PREFIX + "base_fingerprint") for s in self.sources}
        metadata = {
            METADATA_PREFIX + "network_type": "lora",
            METADATA_PREFIX + "lora_format": lora_format,
            METADATA_PREFIX + "groups": json.dumps(sorted({module_group(p) for p in self.modules})),
            METADATA_PREFIX + "merge": json.dumps({
                "method": self.method,
                "rank": self.rank,
                "max_relative_error": self.max_error,
                "mean_relative_error": self.mean_error,
                "sources": [{"file": s.name, "sha256": s.sha256, "weights": s.weights, "modules": len(s.modules),
                             "model_version": s.metadata.get(METADATA_PREFIX + "model_version"),
                             "step": s.metadata.get(METADATA_PREFIX + "step")} for s in self.sources],
            }),
            "modelspec.architecture": f"ltx-2{'.3' if versions == {'2.3'} else ''}/lora",
        }
        if len(versions) == 1:
            metadata[METADATA_PREFIX + "model_version"] = versions.pop()
        if len(fingerprints) == 1 and None not in fingerprints:
            metadata[METADATA_PREFIX + "base_fingerprint"] = fingerprints.pop()
        return metadata


def _lora_factors(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B·alpha/rank) of one LoRA module, float64."""
    down = tensors[".lora_down.weight"].double()
    up = tensors[".lora_up.weight"].double()
    rank = down.shape[0]
    alpha = float(tensors[".alpha"].item()) if ".alpha" in tensors else float(rank)
    return down, up * (alpha / rank)


def dense_update(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """ΔW ``[out, in]`` of one LoRA / LoKr / LoHa module, as ComfyUI applies it (float64)."""
    kind = detect_type(set(tensors))
    if kind == "lora":
        down, up = _lora_factors(tensors)
        return up @ down
    if kind == "lokr":
        w1 = tensors[".lokr_w1"]
        w2 = tensors[".lokr_w2"] if ".lokr_w2" in tensors else tensors[".lokr_w2_a"] @ tensors[".lokr_w2_b"]
        shape = SimpleNamespace(out_features=w1.shape[0] * w2.shape[0], in_features=w1.shape[1] * w2.shape[1])
    elif kind == "loha":
        shape = SimpleNamespace(out_features=tensors[".hada_w1_a"].shape[0], in_features=tensors[".hada_w1_b"].shape[1])
    else:
        raise ConfigError("DoRA modules cannot be merged: their update depends on the base weights")
    layer = layer_from_file(shape, {k: v.float() for k, v in tensors.items()})
    with torch.no_grad():
        return layer.weight_delta(None).double()


def _truncate(b: torch.Tensor, a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Rank-``rank`` factors of B·A (B [out, R0], A [R0, in]) by QR + SVD of the small core; (A_r, B_r, relative
    error, its bound sqrt(1 − r/R))."""
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    return _from_svd(qb @ u, s, vh @ qa.T, rank)


def _from_svd(u, s, vh, rank):
    energy = s.square()
    total = float(energy.sum())
    effective = int((s > s.max() * 1e-10).sum()) if total > 0 else 0
    keep = min(rank, effective)
    error = math.sqrt(float(energy[keep:].sum()) / total) if total > 0 else 0.0
    bound = math.sqrt(1.0 - keep / effective) if effective else 0.0
    root = s[:keep].sqrt()
    return root[:, None] * vh[:keep], u[:, :keep] * root[None, :], error, bound


def merge_loras(sources: list[MergeSource], *, method: str = "concat", rank: int | None = None,
                on_module: Callable[[int, int], None] | None = None) -> MergeResult:
    """The merged LoRA of ``sources`` (module docstring). Pure: nothing is read or written. ``on_module(done,
    total)`` is called after each module (progress; it may raise to stop)."""
    if method not in MERGE_METHODS:
        raise ConfigError(f"merge method {method!r}; choose one of {', '.join(MERGE_METHODS)}")
    if method == "svd" and (rank is None or rank < 1):
        raise ConfigError("merge method svd needs a rank of 1 or more")
    if not sources:
        raise ConfigError("merge: no LoRA to merge")
    versions = {s.name: s.metadata.get(METADATA_PREFIX + "model_version") for s in sources}
    if len(set(versions.values()) - {None}) > 1:
        raise ConfigError("merge: the LoRAs are for different model versions ("
                          + ", ".join(f"{n}: LTX-{v}" for n, v in versions.items() if v) + "); LoRAs do not transfer between them")
    for source in sources:
        for path, tensors in source.modules.items():
            kind = detect_type(set(tensors))
            if kind == "dora":
                raise ConfigError(f"merge: {source.name}: {path} is a DoRA module; DoRA updates depend on the base "
                                  "weights and cannot be summed")
            if kind != "lora" and method == "concat":
                raise ConfigError(f"merge: {source.name}: {path} is a {kind} module; concat merges LoRA factors, "
                                  "use method svd to re-project LoKr / LoHa to a LoRA")
    paths = sorted({p for s in sources for p in s.modules})
    modules, errors, bounds = {}, {}, {}
    for index, path in enumerate(paths):
        if on_module is not None and index:
            on_module(index, len(paths))
        group = module_group(path)
        parts = [(s, s.weights[group]) for s in sources if path in s.modules and s.weights[group] != 0.0]
        if not parts:
            continue
        shapes = {tuple(dense_shape(s.modules[path])) for s, _ in parts}
        if len(shapes) > 1:
            raise ConfigError(f"merge: {path} has different shapes in {', '.join(s.name for s, _ in parts)} ({sorted(shapes)}): "
                              "LoRAs of different models")
        if method == "concat":
            factors = [_lora_factors(s.modules[path]) for s, _ in parts]
            a = torch.cat([f[0] for f in factors])
            b = torch.cat([f[1] * w for f, (_, w) in zip(factors, parts)], dim=1)
            errors[path], bounds[path] = 0.0, 0.0
        elif all(detect_type(set(s.modules[path])) == "lora" for s, _ in parts):
            factors = [_lora_factors(s.modules[path]) for s, _ in parts]
            a, b, errors[path], bounds[path] = _truncate(torch.cat([f[1] * w for f, (_, w) in zip(factors, parts)], dim=1),
                                                         torch.cat([f[0] for f in factors]), rank)
        else:
            delta = sum(w * dense_update(s.modules[path]) for s, w in parts)
            u, s_, vh = torch.linalg.svd(delta, full_matrices=False)
            a, b, errors[path], bounds[path] = _from_svd(u, s_, vh, rank)
        if a.shape[0] == 0:  # the weighted updates cancel exactly
            continue
        modules[path] = {".lora_down.weight": a.float(), ".lora_up.weight": b.float()}
    if on_module is not None:
        on_module(len(paths), len(paths))
    if not modules:
        raise ConfigError("merge: every module has weight 0 (check the per-group weights)")
    return MergeResult(method, rank, modules, errors, bounds, list(sources))


def dense_shape(tensors: dict[str, torch.Tensor]) -> tuple[int, int]:
    """[out, in] of the layer a module's tensors adapt."""
    kind = detect_type(set(tensors))
    if kind in ("lora", "dora"):
        return tensors[".lora_up.weight"].shape[0], tensors[".lora_down.weight"].shape[1]
    if kind == "loha":
        return tensors[".hada_w1_a"].shape[0], tensors[".hada_w1_b"].shape[1]
    w1 = tensors[".lokr_w1"]
    w2 = tensors[".lokr_w2"] if ".lokr_w2" in tensors else tensors[".lokr_w2_a"] @ tensors[".lokr_w2_b"]
    return w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1]


# ---- files --------------------------------------------------------------------------------------------------------


def read_source(path: str | Path, weights=None) -> MergeSource:
    """A merge source from an adapter file in any layout ``formats.parse_lora`` reads; every key must convert."""
    path = Path(path)
    tensors, metadata = read_adapter_file(path)
    parsed = parse_lora(tensors, metadata)
    if parsed.unconvertible:
        key, why = next(iter(parsed.unconvertible.items()))
        raise ConfigError(f"{path}: {len(parsed.unconvertible)} keys cannot be merged (first: {key}: {why}); "
                          "`ltx2-av-trainer verify` lists them")
    if not parsed.modules:
        raise ConfigError(f"{path}: no adapter tensors of LTX-2 modules")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return MergeSource(path.name, parsed.modules, parse_weights(weights), metadata, digest)


def merge_files(paths, out: str | Path, *, weights=None, method: str = "concat", rank: int | None = None,
                lora_format: str = "lora_ab", dtype: str = "bfloat16", max_error: float | None = None,
                on_module: Callable[[int, int], None] | None = None) -> dict:
    """Merge adapter files into ``out`` (written atomically); ``weights`` has one spec per file (``parse_weights``).
    With ``max_error``, nothing is written when a module's relative error exceeds it. Returns the report."""
    paths = [Path(p) for p in paths]
    specs = list(weights) if weights else [None] * len(paths)
    if len(specs) != len(paths):
        raise ConfigError(f"merge: {len(specs)} weight specs for {len(paths)} LoRAs; give one per LoRA (or none)")
    if lora_format not in LORA_FORMATS:
        raise ConfigError(f"merge: lora format {lora_format!r}; choose one of {', '.join(LORA_FORMATS)}")
    if dtype not in SAVE_DTYPES:
        raise ConfigError(f"merge: dtype {dtype!r}; choose one of {', '.join(SAVE_DTYPES)}")
    result = merge_loras([read_source(p, w) for p, w in zip(paths, specs)], method=method, rank=rank, on_module=on_module)
    report = {"file": str(out), "summary": result.summary(), "method": method, "rank": rank, "modules": len(result.modules),
              "max_relative_error": result.max_error, "mean_relative_error": result.mean_error,
              "max_error_bound": max(result.bounds.values(), default=0.0), "errors": result.errors,
              "sources": [{"file": str(p), "weights": s.weights} for p, s in zip(paths, result.sources)], "written": False}
    if max_error is not None and result.max_error > max_error:
        worst = max(result.errors, key=result.errors.get)
        raise ConfigError(f"merge: {worst} would have a relative error of {result.max_error:.3g} > {max_error:g}; "
                          "raise the rank (or the allowed error)")
    tensors = export_tensors(result.modules, lora_format, SAVE_DTYPES[dtype])
    save_safetensors_atomic(tensors, Path(out), metadata=result.metadata(lora_format))
    report["written"] = True
    return report
