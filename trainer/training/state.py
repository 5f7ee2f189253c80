"""Resumable training state: everything needed to continue bit for bit, in safetensors and JSON.

Layout under ``<run>/state/``: one folder per saved step (``step_00000120/``) holding
``adapter.safetensors``, ``optimizer.safetensors``, ``rng.safetensors`` and ``state.json`` (plus
``regularizers.safetensors`` when a regulariser trains modules of its own, e.g. CREPA's projector), and
``latest.json`` naming the newest complete folder. A folder is written under a temporary name and
renamed when complete, and ``latest.json`` is replaced atomically afterwards, so a run killed at any
moment leaves either the previous state or the new one, never a partial one that looks valid.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..io_utils import TMP_PREFIX, atomic_write_json

STATE_VERSION = 1
_FILES = ("adapter.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json")
REGULARIZERS_FILE = "regularizers.safetensors"  # optional: trained regulariser modules, never exported


@dataclass
class SavedState:
    folder: Path
    step: int
    adapter: dict[str, torch.Tensor]
    optimizer: dict
    rng: dict[str, torch.Tensor]
    extra: dict  # scheduler, balancer, sampler, counters, config fingerprint
    regularizers: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. CREPA's projector


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for idx, entry in sd["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], structure: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for idx, entry in structure.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(entry)
    return {"state": state, "param_groups": structure["param_groups"]}


def save_state(
    run_dir: str | Path,
    step: int,
    adapter: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    rng: dict[str, torch.Tensor],
    extra: dict,
    keep: int = 2,
    regularizers: dict[str, torch.Tensor] | None = None,
) -> Path:
    state_root = Path(run_dir) / "state"
    state_root.mkdir(parents=True, exist_ok=True)
    final = state_root / f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}step_{step:08d}.", dir=state_root))
    try:
        opt_tensors, opt_structure = optimizer_to_tensors(optimizer)
        save_file({k: v.detach().cpu().contiguous() for k, v in adapter.items()}, str(tmp / "adapter.safetensors"))
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        save_file({k: v.contiguous() for k, v in rng.items()}, str(tmp / "rng.safetensors"))
        written = list(_FILES)
        if regularizers:
            save_file({k: v.detach().cpu().contiguous() for k, v in regularizers.items()}, str(tmp / REGULARIZERS_FILE))
            written.append(REGULARIZERS_FILE)
        payload = {"version": STATE_VERSION, "step": step, "optimizer": opt_structure, "extra": extra}
        (tmp / "state.json").write_text(json.dumps(payload, sort_keys=True), encoding="utf-8")
        for name in written:
            with open(tmp / name, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            # Re-saving the same step (e.g. after a resume): move the old folder out of the way first.
            shutil.move(str(final), str(state_root / f"{TMP_PREFIX}old.{final.name}"))
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    atomic_write_json(state_root / "latest.json", {"step": step, "folder": final.name})
    _prune(state_root, keep)
    return final


def _prune(state_root: Path, keep: int) -> None:
    for leftover in state_root.glob(TMP_PREFIX + "*"):
        shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
    folders = sorted(p for p in state_root.glob("step_*") if p.is_dir())
    for old in folders[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _is_complete(folder: Path) -> bool:
    return folder.is_dir() and all((folder / name).is_file() for name in _FILES)


def find_latest_state(run_dir: str | Path) -> Path | None:
    """The newest complete state folder, preferring the one ``latest.json`` names."""
    state_root = Path(run_dir) / "state"
    if not state_root.is_dir():
        return None
    latest = state_root / "latest.json"
    if latest.is_file():
        try:
            folder = state_root / json.loads(latest.read_text(encoding="utf-8"))["folder"]
            if _is_complete(folder):
                return folder
        except (json.JSONDecodeError, KeyError, OSError):
            pass
    candidates = sorted((p for p in state_root.glob("step_*") if _is_complete(p)), reverse=True)
    return candidates[0] if candidates else None


def load_state(folder: str | Path) -> SavedState:
    folder = Path(folder)
    payload = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    if payload.get("version") != STATE_VERSION:
        raise ValueError(f"{folder}: state version {payload.get('version')} is not supported (expected {STATE_VERSION})")
    return SavedState(
        folder=folder,
        step=int(payload["step"]),
        adapter=load_file(str(folder / "adapter.safetensors")),
        optimizer=optimizer_from_tensors(load_file(str(folder / "optimizer.safetensors")), payload["optimizer"]),
        rng=load_file(str(folder / "rng.safetensors")),
        extra=payload["extra"],
        regularizers=load_file(str(folder / REGULARIZERS_FILE)) if (folder / REGULARIZERS_FILE).is_file() else {},
    )
