"""Arguments of ``ltx2-av-trainer bench``, kept free of torch so that ``--help`` stays instant."""

from __future__ import annotations

import argparse

PRESETS = ("tiny", "small", "real")
BACKENDS = ("diffusers", "comfyui")
PRECISIONS = ("fp32", "bf16", "fp16")  # the keys of loop.PRECISION_DTYPES


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``ltx2-av-trainer bench`` (including ``--json`` and ``--quiet``)."""
    parser.add_argument("--backend", choices=BACKENDS, default="diffusers",
                        help="diffusers: ours against a plain diffusers + peft loop; comfyui: ours on a ComfyUI-loaded model "
                             "against ComfyUI's own Train LoRA step, plus our AV step, checkpointing and batched forwards "
                             "(needs COMFYUI_PATH outside ComfyUI; tiny and small presets)")
    parser.add_argument("--preset", choices=PRESETS, default="small",
                        help="tiny: embedded test model; small: CPU-sized model; real: real LTX-2 dims at 768x512x97 on a CUDA GPU")
    parser.add_argument("--layers", type=int, default=None, help="transformer blocks (real preset default: 8; LTX-2 has 48)")
    parser.add_argument("--checkpointing", choices=["on", "off"], default="off", help="gradient checkpointing on both sides")
    parser.add_argument("--precision", choices=PRECISIONS, default=None,
                        help="mixed precision on both sides (default: fp32 for tiny/small, bf16 for real)")
    parser.add_argument("--steps", type=int, default=None, help="measured steps per side (after warm-up)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps per side, not measured")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cpu for tiny/small, cuda for real)")
    parser.add_argument("--compare-checkpointing", action="store_true",
                        help="also measure our step's memory with checkpointing off and on and report the cut")
    parser.add_argument("--unfused", action="store_true",
                        help="also time our step with the AdamW loop and the LoRA update as separate ops (the step "
                             "before its fused kernels), alternating with the other two (diffusers backend)")
    parser.add_argument("--ranks", type=int, default=None,
                        help="instead: scaling of our step over this many torch.distributed ranks (gloo on cpu, NCCL on "
                             "cuda) vs one process, tokens/s per rank and the collectives' share of the step")
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON to PATH")
    parser.add_argument("--quiet", action="store_true", help="print only errors")
