"""``ltx2-av-trainer convert`` and ``ltx2-av-trainer merge``: LoRA files of any LTX-2 trainer into our layout, and
several LoRAs into one (``adapters/formats.py``, ``adapters/merge.py``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..adapters.files import SAVE_DTYPES, read_adapter_file
from ..adapters.formats import LORA_FORMATS, convert_lora
from ..adapters.merge import MERGE_METHODS, merge_files
from ..config import Config, ConfigError
from ..io_utils import atomic_write_json, save_safetensors_atomic


def _model_module_paths(config_path: str | None) -> set[str] | None:
    if not config_path:
        return None
    from .pipeline import model_module_paths

    return model_module_paths(Config.from_toml(config_path))


def convert_file(source: str | Path, out: str | Path, *, lora_format: str = "lora_ab", alpha: float | None = None,
                 dtype: str | None = None, skip_unconvertible: bool = False, module_paths: set[str] | None = None) -> dict:
    """Convert one adapter file and write it atomically; the report as a dict."""
    source, out = Path(source), Path(out)
    if source.resolve() == out.resolve():
        raise ConfigError(f"{out}: the converted file would replace its source; choose another --out")
    if dtype is not None and dtype not in SAVE_DTYPES:
        raise ConfigError(f"convert: dtype {dtype!r}; choose one of {', '.join(SAVE_DTYPES)}")
    tensors, metadata = read_adapter_file(source)
    try:
        conversion = convert_lora(tensors, metadata, lora_format=lora_format, alpha=alpha,
                                  dtype=SAVE_DTYPES[dtype] if dtype else None, skip_unconvertible=skip_unconvertible,
                                  module_paths=module_paths)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    save_safetensors_atomic(conversion.tensors, out, metadata=conversion.metadata)
    return {"file": str(out), "source": str(source), "layout": conversion.parsed.layout,
            "written_by": conversion.parsed.writers, "lora_format": lora_format, "modules": len(conversion.parsed.modules),
            "left_out": conversion.dropped, "notes": conversion.parsed.notes, "summary": conversion.summary()}


def cmd_convert(args) -> int:
    report = convert_file(args.lora, args.out, lora_format=args.format, alpha=args.alpha, dtype=args.dtype,
                          skip_unconvertible=args.skip_unconvertible, module_paths=_model_module_paths(args.config))
    if not args.quiet:
        print(f"{report['summary']} → {report['file']} ({report['lora_format']})")
        for key, why in list(report["left_out"].items())[:20]:
            print(f"  left out {key}: {why}")
        for note in report["notes"]:
            print(f"  note: {note}")
    if args.json:
        atomic_write_json(args.json, report)
    return 0


def cmd_merge(args) -> int:
    report = merge_files(args.loras, args.out, weights=args.weights, method=args.method, rank=args.rank,
                         lora_format=args.format, dtype=args.dtype, max_error=args.max_error)
    if not args.quiet:
        print(f"{report['summary']} → {report['file']}")
    if args.json:
        atomic_write_json(args.json, report)
    return 0


def add_convert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("lora", help="LoRA .safetensors file of any LTX-2 trainer (ComfyUI, ai-toolkit, ltx-trainer, musubi-tuner, "
                                "diffusers, PEFT)")
    p.add_argument("--out", required=True, help="the converted file")
    p.add_argument("--format", choices=LORA_FORMATS, default="lora_ab",
                   help="key layout: lora_ab (default; ComfyUI, diffusers and ltx-core) or down_up (ComfyUI only)")
    p.add_argument("--alpha", type=float, default=None,
                   help="the alpha a file without alpha keys was trained with (ltx-trainer and PEFT store none): folded in")
    p.add_argument("--dtype", choices=list(SAVE_DTYPES), default=None, help="tensor precision (default: the source's)")
    p.add_argument("--skip-unconvertible", action="store_true", help="leave out keys that cannot be converted (listed)")
    p.add_argument("--config", help="also refuse modules this run's model does not have (TOML config)")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON to PATH")
    p.add_argument("--quiet", action="store_true", help="print only errors")
    p.set_defaults(func=cmd_convert)


def add_merge_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("loras", nargs="+", help="LoRA files to merge (any layout convert reads)")
    p.add_argument("--out", required=True, help="the merged file")
    p.add_argument("--weights", action="append", metavar="SPEC",
                   help="one per LoRA, in order: a number, or group=weight pairs such as audio=1,video=0 "
                        "(audio: audio_attn, audio_ff, v2a; video: video_attn, video_ff, a2v; default=...)")
    p.add_argument("--method", choices=MERGE_METHODS, default="concat",
                   help="concat: exact, rank = sum of ranks; svd: re-project to --rank (error reported)")
    p.add_argument("--rank", type=int, default=None, help="rank of the svd merge")
    p.add_argument("--max-error", type=float, default=None,
                   help="svd: refuse to write when a module's relative error exceeds this")
    p.add_argument("--format", choices=LORA_FORMATS, default="lora_ab", help="key layout of the merged file")
    p.add_argument("--dtype", choices=list(SAVE_DTYPES), default="bfloat16", help="tensor precision of the merged file")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON to PATH")
    p.add_argument("--quiet", action="store_true", help="print only errors")
    p.set_defaults(func=cmd_merge)
