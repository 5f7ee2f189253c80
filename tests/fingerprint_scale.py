"""A state dict with the keys, shapes and dtype of the real LTX-2 19B transformer, for the weight identity of the
ComfyUI backend at full scale, without 38 GB of memory.

ComfyUI's own ``LTXAVModel`` is built at its real dimensions (its defaults are LTX-2's: 48 blocks, 4096-wide
video and 2048-wide audio streams, 3840-wide captions) on the meta device, which gives every key and shape.
Each tensor is then a bfloat16 view of a small random row repeated along the leading dimensions (stride 0),
so it reports the full shape and holds its own values per column, while only the row is in memory: reading
every element would still take minutes, which is what the identity must avoid.

Run it to measure (prints the parameter count and the time of ``weights_identity``)::

    COMFYUI_PATH=/path/to/ComfyUI .venv/bin/python tests/fingerprint_scale.py
"""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def ltx2_19b_shapes() -> dict[str, torch.Size]:
    """Key → shape of ComfyUI's LTXAVModel at LTX-2's dimensions (built on the meta device)."""
    from ltx2_av_trainer.trainer.backends.comfyui.env import import_model_management

    import_model_management()
    import comfy.ops
    from comfy.ldm.lightricks.av_model import LTXAVModel

    model = LTXAVModel(device="meta", dtype=torch.bfloat16, operations=comfy.ops.disable_weight_init)
    return {key: value.shape for key, value in model.state_dict().items()}


def strided_state(shapes: dict[str, torch.Size], seed: int = 0) -> dict[str, torch.Tensor]:
    """One bfloat16 tensor per shape: a random row of the last dimension, repeated with stride 0."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        row = torch.randn(shape[-1] if len(shape) else 1, generator=generator).to(torch.bfloat16)
        state[key] = row.as_strided(tuple(shape), (0,) * (len(shape) - 1) + (1,)) if len(shape) else row[0]
    return state


def main() -> int:
    from ltx2_av_trainer.trainer.backends.fingerprint import weights_identity

    shapes = ltx2_19b_shapes()
    state = strided_state(shapes)
    parameters = sum(tensor.numel() for tensor in state.values())
    gc.collect()  # building 3,500 tensors leaves garbage whose collection would otherwise land in the timing
    times = []
    for _ in range(2):  # the first call in a process also builds the per-shape sample offsets
        start = time.perf_counter()
        identity = weights_identity(state.items(), [parameters * 2])
        times.append(time.perf_counter() - start)
    print(f"{len(state)} tensors, {parameters / 1e9:.2f}B parameters: weights_identity took {times[0]:.3f} s "
          f"(first call in the process), {times[1]:.3f} s (again) [{identity[:16]}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
