import os
import sys
from pathlib import Path

import pytest

# Test helpers (fixtures modules) live next to the tests.
sys.path.insert(0, str(Path(__file__).parent))
# Two cores on CI: keep torch from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="module")
def comfy():
    """ComfyUI importable from ``COMFYUI_PATH`` (CPU library mode); skips the test without it."""
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        pytest.skip("COMFYUI_PATH is not set: point it at a ComfyUI checkout to run the ComfyUI tier (make test-comfyui)")
    from ltx2_av_trainer.trainer.backends.comfyui.env import import_model_management

    return import_model_management(path)
