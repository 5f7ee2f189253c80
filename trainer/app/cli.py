"""``ltx2-av-trainer``: the headless command line on the same core as the ComfyUI nodes.

Subcommands: demo, doctor, cache, train, slider, verify, convert, merge, sample, score, report, bench. Every one takes ``--help``; those that write
a report take ``--json PATH``. Errors exit non-zero with one line saying what is wrong and what to do.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import Config, ConfigError


class UserError(Exception):
    """A problem the user can fix; printed as one line."""


def _load_config(args) -> Config:
    config = Config.from_toml(args.config) if getattr(args, "config", None) else Config()
    overrides = {}
    if getattr(args, "steps", None):
        overrides["train.steps"] = args.steps
    if args.command in ("train", "slider") and args.out:
        overrides["output.dir"] = str(args.out)
    if getattr(args, "quiet", False):
        overrides["logging.quiet"] = True
    return config.replace(**overrides) if overrides else config


def _write_json(path: str | None, payload: dict) -> None:
    if path:
        from ..io_utils import atomic_write_json

        atomic_write_json(path, payload)


def cmd_demo(args) -> int:
    from .demo import run_demo

    if args.mode != "av":
        from .mode_demo import run_mode_demo

        report = run_mode_demo(Path(args.out), args.mode, steps=args.steps, version=args.version, quiet=args.quiet)
        _write_json(args.json, report)
        return 0 if report["ok"] else 1
    report = run_demo(Path(args.out), steps=args.steps, version=args.version, quiet=args.quiet)
    _write_json(args.json, report)
    return 0 if report["ok"] else 1


def cmd_doctor(args) -> int:
    from .pipeline import run_doctor_command

    config = _load_config(args)
    report = run_doctor_command(config, strict=args.strict, quiet=args.quiet)
    _write_json(args.json, report.to_dict())
    return report.exit_code


def cmd_cache(args) -> int:
    from .pipeline import run_cache_command

    config = _load_config(args)
    summary = run_cache_command(config, decode=args.decode, quiet=args.quiet)
    _write_json(args.json, summary)
    if summary["stopped_by"]:
        from ..training.stopping import exit_code_for

        print(f"stopped by {summary['stopped_by']}: the {summary['video_encoded']} items encoded so far are kept in "
              f"{summary['cache_dir']}; run the same command again to encode the rest", file=sys.stderr)
        return exit_code_for(summary["stopped_by"])
    if summary["entries"] == 0:
        print(f"error: nothing usable was cached ({summary['failed']} of {summary['items']} items failed; "
              "their reasons are above): fix the files or run `doctor`", file=sys.stderr)
        return 1
    # Failed items are named above; they fail the command only when asked (as doctor --strict does).
    return 1 if args.strict and summary["failures"] else 0


def cmd_train(args) -> int:
    from ..training.distributed import launched_rank
    from ..training.stopping import exit_code_for
    from .pipeline import run_train_command

    if args.resume and args.no_resume:
        raise UserError("--resume and --no-resume contradict each other: give one of them")
    config = _load_config(args)
    report = run_train_command(config, resume=args.resume, no_resume=args.no_resume, quiet=args.quiet)
    if launched_rank() != 0:
        return exit_code_for(report["stopped_by"]) if report.get("stopped_by") else 0  # rank 0 reports for the run
    _write_json(args.json, report)
    if report.get("stopped_by"):
        state = report["files"]["state"]
        saved = f"resumable state saved in {state}" if state else "nothing trained yet, nothing saved"
        print(f"stopped by {report['stopped_by']} after step {report['steps']}: {saved}; run the same command again "
              "to continue", file=sys.stderr)
        return exit_code_for(report["stopped_by"])
    return 0


def cmd_slider(args) -> int:
    from .slider_command import run_slider_command

    if args.resume and args.no_resume:
        raise UserError("--resume and --no-resume contradict each other: give one of them")
    config = _load_config(args)
    overrides = {f"slider.{key}": value for key in ("positive", "negative", "target_class")
                 if (value := getattr(args, key)) is not None}
    config = config.replace(**overrides) if overrides else config
    report = run_slider_command(config, resume=args.resume, no_resume=args.no_resume, quiet=args.quiet)
    _write_json(args.json, report)
    if report.get("stopped_by"):
        from ..training.stopping import exit_code_for

        print(f"stopped by {report['stopped_by']} after step {report['steps']}: run the same command again to continue",
              file=sys.stderr)
        return exit_code_for(report["stopped_by"])
    return 0


def cmd_verify(args) -> int:
    from .pipeline import run_verify_command

    config = _load_config(args)
    report = run_verify_command(config, Path(args.lora))
    if not args.quiet:
        print(report.to_text())
    _write_json(args.json, report.to_dict())
    return 0 if report.ok else 1


def cmd_sample(args) -> int:
    from .pipeline import run_sample_command

    config = _load_config(args)
    report = run_sample_command(config, Path(args.lora) if args.lora else None, args.prompt, Path(args.out),
                                seed=args.seed, steps=args.sample_steps, seconds=args.seconds)
    _write_json(args.json, report)
    return 0


def cmd_score(args) -> int:
    from ..evaluation.voice_score import VoiceReference, score_file

    if sum(bool(x) for x in (args.reference, args.cache, args.config)) != 1:
        raise UserError("give exactly one of --reference JSON, --cache DIR or --config run.toml for the dataset voice")
    if args.reference:
        reference = VoiceReference.load(args.reference)
    elif args.cache:
        reference = VoiceReference.from_cache(args.cache)
    else:
        reference = VoiceReference.from_dataset(_load_config(args).dataset)
    if args.save_reference:
        reference.save(args.save_reference)
    rows, failures = [], []
    for path in args.files:
        # Each file on its own: one that cannot be scored is named with its reason and the rest are still scored.
        try:
            score = score_file(path, reference)
        except Exception as exc:
            failures.append({"file": str(path), "error": str(exc)})
            print(f"error: {path}: {exc}", file=sys.stderr)
            continue
        rows.append({"file": str(path), **score.to_dict()})
        note = "" if score.speech_detected else "  (no speech detected: the score means little)"
        print(f"{score.similarity:.3f}  {path}{note}")
    print(f"reference: {reference.typical_similarity:.3f} is how the dataset's own clips score against it")
    _write_json(args.json, {"reference_typical": reference.typical_similarity, "scores": rows, "failures": failures})
    if failures:
        print(f"error: {len(failures)} of {len(args.files)} files could not be scored (named above)", file=sys.stderr)
    return 1 if failures else 0


def cmd_report(args) -> int:
    from ..evaluation.report_html import write_training_report

    page = write_training_report(Path(args.run_dir), doctor_json=args.doctor_json, cache_dir=args.cache_dir, samples_dir=args.samples_dir)
    print(page)
    return 0


def cmd_bench(args) -> int:
    if args.ranks is not None:
        if args.backend == "comfyui":
            raise ConfigError("bench --ranks measures the headless trainer's scaling; it does not combine with --backend comfyui")
        from .bench_distributed import cmd_scaling_bench as run
    elif args.backend == "comfyui":
        from .bench_comfyui import cmd_bench_comfyui as run
    else:
        from .bench import cmd_bench as run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ltx2-av-trainer", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show the full traceback of unexpected errors")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, config=True, json_report=True):
        if config:
            p.add_argument("--config", help="TOML config file (see README: Configuration)")
        if json_report:
            p.add_argument("--json", metavar="PATH", help="also write the report as JSON to PATH")
        p.add_argument("--quiet", action="store_true", help="print only errors")

    p = sub.add_parser("demo", help="no-weights end-to-end demo on synthesised talking clips")
    p.add_argument("--out", required=True, help="output folder (data/, cache/, run/, samples/, report.json)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's 400)")
    p.add_argument("--version", choices=["2.0", "2.3"], default="2.0", help="embedded tiny model version")
    p.add_argument("--mode", choices=["av", "audio", "i2v", "ic", "id"], default="av",
                   help="training mode: av (audio+video, the default), audio (audio-only), i2v (first-frame "
                        "conditioning), ic (IC-LoRA with reference videos), id (ID-LoRA with reference audio); the "
                        "modes other than av train 100 steps by default")
    common(p, config=False)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("doctor", help="check every media item of the dataset and report problems")
    p.add_argument("--strict", action="store_true", help="exit non-zero when any item has an error")
    common(p)
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("cache", help="encode video/audio latents and text once, reuse them while inputs are unchanged")
    p.add_argument("--decode", action="store_true", help="also write decoded audio (wav) and a video preview per item, with round-trip scores")
    p.add_argument("--strict", action="store_true", help="exit non-zero when any item (or any clip's audio) could not be cached")
    common(p)
    p.set_defaults(func=cmd_cache)

    def run_options(p):
        p.add_argument("--steps", type=int, help="override train.steps")
        p.add_argument("--out", help="override output.dir (the run directory)")
        p.add_argument("--resume", metavar="STATE", help="resume from this state folder (default: the latest in the run directory)")
        p.add_argument("--no-resume", action="store_true", help="start over even if the run directory holds a state")
        common(p)

    p = sub.add_parser("train", help="train the LoRA from the cache (source media not needed)")
    run_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("slider", help="train a slider LoRA between two prompts on the base model (no dataset; "
                                      "use it at + and - strength)")
    p.add_argument("--positive", help="override slider.positive (the prompt + strength moves towards)")
    p.add_argument("--negative", help="override slider.negative (the prompt - strength moves towards)")
    p.add_argument("--target-class", dest="target_class", help="override slider.target_class (the prompt it trains on)")
    run_options(p)
    p.set_defaults(func=cmd_slider)

    p = sub.add_parser("verify", help="check which LoRA keys land on the model, per module group (files of other trainers "
                                      "too: what would load after convert)")
    p.add_argument("lora", help="LoRA .safetensors file")
    common(p)
    p.set_defaults(func=cmd_verify)

    from .lora_cli import add_convert_arguments, add_merge_arguments

    add_convert_arguments(sub.add_parser("convert", help="write a LoRA of any LTX-2 trainer in our key layout (loads in "
                                                         "ComfyUI, diffusers and ltx-core)"))
    add_merge_arguments(sub.add_parser("merge", help="merge LoRAs into one (concatenated ranks, exact; or SVD to a rank), "
                                                     "with weights per module group"))

    p = sub.add_parser("sample", help="generate audio+video with the LoRA and, same seed, without it")
    p.add_argument("--lora", help="LoRA file (omit to sample the base model only)")
    p.add_argument("--prompt", required=True, help="prompt text (include the trigger word)")
    p.add_argument("--out", required=True, help="folder for the mp4/wav files")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample-steps", type=int, default=20, help="denoising steps")
    p.add_argument("--seconds", type=float, default=None, help="clip length (default: the dataset's frames at target fps)")
    common(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("score", help="voice identity score of audio/video files against a dataset's voice (Resemblyzer)")
    p.add_argument("files", nargs="+", help="audio or video files to score")
    p.add_argument("--reference", help="a saved reference (JSON written by --save-reference)")
    p.add_argument("--cache", help="build the reference from the source clips of this cache folder")
    p.add_argument("--save-reference", metavar="PATH", help="also save the reference as JSON for later runs")
    common(p)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("report", help="write the HTML training report of a run directory (offline page)")
    p.add_argument("run_dir", help="the run directory (output.dir)")
    p.add_argument("--doctor-json", help="doctor report JSON to include (default: run_dir/doctor.json)")
    p.add_argument("--cache-dir", help="cache folder for the round-trip scores (default: from the run's config)")
    p.add_argument("--samples-dir", help="folder with A/B samples (default: run_dir/samples)")
    p.add_argument("--quiet", action="store_true", help="print only errors")
    p.set_defaults(func=cmd_report)

    from .bench_cli import add_bench_arguments

    p = sub.add_parser("bench", help="time our training step against a plain diffusers + peft loop (same model, same work)")
    add_bench_arguments(p)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _only_train_under_torchrun(args.command)
        return args.func(args)
    except (ConfigError, UserError, FileNotFoundError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # train and cache stop on Ctrl-C themselves and say what they kept; this is any other moment.
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # last resort: still one clear line, the traceback only on request
        if _is_reported_error(exc):
            print(f"error: {exc}", file=sys.stderr)
            return 1
        if args.debug:
            raise
        print(f"error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


def _only_train_under_torchrun(command: str) -> None:
    from ..training.distributed import launched_ranks

    ranks = launched_ranks()
    if ranks > 1 and command != "train":
        raise UserError(f"`{command}` runs in one process, but torchrun started {ranks}: only `train` runs on several "
                        f"ranks; run `ltx2-av-trainer {command} ...` without torchrun")


def _is_reported_error(exc: Exception) -> bool:
    """Errors whose message already says what is wrong and what to do."""
    from ..adapters.files import AdapterFileError
    from ..data.cache import CacheError
    from ..data.media.probe import MediaError
    from ..evaluation.report_html import ReportError
    from ..evaluation.voice_score import VoiceScoreError
    from ..training.distributed import PeerFailure
    from ..training.loop import TrainingError

    return isinstance(exc, (TrainingError, MediaError, ReportError, VoiceScoreError, CacheError, AdapterFileError, PeerFailure))


if __name__ == "__main__":
    sys.exit(main())
