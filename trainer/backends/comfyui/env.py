"""Small helpers for using ComfyUI as a library from the node pack (and from the ComfyUI-tier tests).

Nothing here imports ComfyUI at module import time: ``ltx2_av_trainer.nodes`` must stay importable in CI
without a ComfyUI checkout. Inside a running ComfyUI every helper is a no-op apart from the import.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Iterator

import torch

COMFYUI_PATH_ENV = "COMFYUI_PATH"


class ComfyUnavailableError(ImportError):
    """ComfyUI cannot be imported; the message says how to make it importable."""


def _has_accelerator() -> bool:
    if torch.cuda.is_available():
        return True
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        return True
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def add_comfyui_to_path(comfyui_path: str | os.PathLike | None = None) -> Path | None:
    """Put a ComfyUI checkout on ``sys.path`` (argument, else env ``COMFYUI_PATH``); returns the path used.

    Not needed inside a running ComfyUI, where ``comfy`` is already importable.
    """
    raw = comfyui_path if comfyui_path is not None else os.environ.get(COMFYUI_PATH_ENV)
    if not raw:
        return None
    path = Path(raw).expanduser().resolve()
    if not (path / "comfy" / "model_management.py").is_file():
        raise ComfyUnavailableError(
            f"{path} is not a ComfyUI checkout (no comfy/model_management.py in it); "
            f"point {COMFYUI_PATH_ENV} at the folder that holds ComfyUI's main.py"
        )
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    return path


def import_model_management(comfyui_path: str | os.PathLike | None = None) -> ModuleType:
    """Import ``comfy.model_management`` safely and return it.

    Library use on a machine without an accelerator needs ``comfy.cli_args.args.cpu = True`` *before*
    ``comfy.model_management`` is imported (it probes the device at import). Inside a running ComfyUI
    the module is already imported with the user's flags, which are left alone.
    """
    if "comfy.model_management" in sys.modules:
        return sys.modules["comfy.model_management"]
    add_comfyui_to_path(comfyui_path)
    try:
        cli_args = importlib.import_module("comfy.cli_args")
    except ImportError as exc:
        raise ComfyUnavailableError(
            f"cannot import ComfyUI ({exc}); run inside ComfyUI or set {COMFYUI_PATH_ENV} to a ComfyUI checkout "
            "whose requirements are installed in this Python environment"
        ) from exc
    if not _has_accelerator():
        cli_args.args.cpu = True
    return importlib.import_module("comfy.model_management")


@contextlib.contextmanager
def comfy_training_mode() -> Iterator[None]:
    """``comfy.model_management.in_training = True`` for the duration (restored even on errors).

    With it set, LTX blocks use autograd-friendly RMSNorm/adaLN instead of fused inference kernels.
    """
    mm = import_model_management()
    previous = mm.in_training
    mm.in_training = True
    try:
        yield
    finally:
        mm.in_training = previous
