"""The training report: one self-contained HTML page in the run directory.

``write_training_report(run_dir)`` reads what a run leaves behind — ``report.json``, ``metrics.jsonl``,
``validation.jsonl``, the A/B samples, the cache's ``previews/round_trip.json`` and a doctor JSON —
and writes ``run_dir/report.html`` with the loss curves per modality, the audio loss weight, σ
histograms per modality, the fixed-σ validation losses, voice scores over steps, the A/B samples
(players linked relatively), the cache round-trip scores and the doctor's warnings.

Plots are drawn with matplotlib's Agg renderer (through ``Figure`` directly, so no global pyplot
state or backend is touched) and embedded as base64 PNG; media files are linked by relative paths,
so the page works offline and can be moved together with the run folder. Every section is always
present: when its data is missing, a line says why and how to get it.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence
from urllib.parse import quote

from ..io_utils import atomic_write_text, read_jsonl
from .validation_sampling import SAMPLES_FOLDER, VALIDATION_LOG

REPORT_NAME = "report.html"
EMA_ALPHA = 0.05  # smoothing of the loss curves (about a 20-step window)


class ReportError(RuntimeError):
    """The report cannot be written (no run directory, matplotlib missing)."""


@dataclass
class Section:
    id: str
    title: str
    body: str  # HTML


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def write_training_report(run_dir: str | Path, *, doctor_json: str | Path | None = None, cache_dir: str | Path | None = None,
                          samples_dir: str | Path | None = None) -> Path:
    """Write ``run_dir/report.html`` and return its path.

    ``doctor_json``: a ``doctor --json`` file (default: ``run_dir/doctor.json`` when present).
    ``cache_dir``: the latent cache (default: ``cache.dir`` from ``run_dir/config.json``, else ``run_dir/cache``).
    ``samples_dir``: A/B samples — ``step_<n>/`` folders of validation sampling and/or a ``samples.json`` of
    ``ltx2-av-trainer sample`` (default: ``run_dir/samples``).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: no such run directory; pass the folder `train` wrote (output.dir)")
    figure_class = _require_matplotlib()
    run_report = _read_json(run_dir / "report.json")
    config = _read_json(run_dir / "config.json")
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    validation = read_jsonl(run_dir / VALIDATION_LOG)
    doctor_path = Path(doctor_json) if doctor_json is not None else _existing(run_dir / "doctor.json")
    cache_path = Path(cache_dir) if cache_dir is not None else _cache_dir_from_config(run_dir, config)
    samples_path = Path(samples_dir) if samples_dir is not None else run_dir / SAMPLES_FOLDER
    plot = _Plotter(figure_class)

    sections = [
        summary_section(run_dir, run_report, metrics),
        loss_section(metrics, plot),
        *([] if (terms := regulariser_section(metrics, plot)) is None else [terms]),
        audio_weight_section(metrics, plot),
        sigma_section(metrics, plot),
        validation_loss_section(validation, metrics, plot),
        voice_section(validation, samples_path, plot),
        samples_section(run_dir, samples_path, validation),
        round_trip_section(run_dir, cache_path),
        doctor_section(doctor_path),
    ]
    target = run_dir / REPORT_NAME
    atomic_write_text(target, render_page(_run_title(run_dir, config), sections))
    return target


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


def summary_section(run_dir: Path, run_report: dict | None, metrics: list[dict]) -> Section:
    if run_report is None:
        steps = metrics[-1]["step"] if metrics else 0
        body = _missing(f"no report.json in {run_dir}: the run has not finished (or was interrupted); "
                        f"metrics.jsonl has {steps} step(s)")
        return Section("summary", "Run summary", body)
    rows = [
        ("steps", run_report.get("steps")),
        ("completed", run_report.get("completed")),
        ("resumed from step", run_report.get("resumed_from")),
        ("final video loss", run_report.get("final_loss_video")),
        ("final audio loss", run_report.get("final_loss_audio")),
        ("audio loss weight", run_report.get("audio_weight")),
        ("trained with audio", run_report.get("with_audio")),
        ("adapted modules", run_report.get("adapted_modules")),
        ("adapted groups", ", ".join(run_report.get("adapted_groups") or []) or None),
        ("trainable parameters", run_report.get("trainable_parameters")),
    ]
    lora = (run_report.get("files") or {}).get("lora") or []
    if lora:
        rows.append(("last LoRA", Path(lora[-1]).name))
    body = _table(["", "value"], [[name, _fmt(value)] for name, value in rows])
    warnings = run_report.get("warnings") or []
    body += "<h3>Training warnings</h3>"
    body += _list(warnings) if warnings else "<p>None.</p>"
    return Section("summary", "Run summary", body)


def loss_section(metrics: list[dict], plot: "_Plotter") -> Section:
    title = "Loss per modality"
    if not metrics:
        return Section("losses", title, _missing("no metrics.jsonl rows: the run has not completed a step yet"))
    series = {name: _series(metrics, key) for name, key in
              (("video", "loss_video"), ("audio (raw)", "loss_audio"), ("audio (weighted)", "loss_audio_weighted"),
               ("total", "loss"))}
    body = plot.lines({k: v for k, v in series.items() if v[0]}, ylabel="loss", smooth=True,
                      title="training losses (faint: per step, solid: moving average)")
    if not series["audio (raw)"][0]:
        body += _missing("no step had an audio loss (loss_audio is null everywhere): this was a video-only run")
    body += _table(["", "first step", "last step", "first 10 % mean", "last 10 % mean"],
                   [[name, _fmt(v[1][0]), _fmt(v[1][-1]), _fmt(_mean(_head(v[1]))), _fmt(_mean(_tail(v[1])))]
                    for name, v in series.items() if v[0]])
    return Section("losses", title, body)


# Unweighted regulariser and objective terms of metrics.jsonl (null on steps without them), in this order.
REGULARISER_TERMS = (
    ("CREPA", "loss_crepa"), ("Self-Flow", "loss_self_flow"), ("Self-Flow frame", "loss_self_flow_frame"),
    ("Self-Flow delta", "loss_self_flow_delta"), ("slider +1", "loss_slider_positive"), ("slider -1", "loss_slider_negative"),
)


def regulariser_section(metrics: list[dict], plot: "_Plotter") -> Section | None:
    """The CREPA / Self-Flow / slider terms, when the run had any (no section otherwise)."""
    series = {name: _series(metrics, key) for name, key in REGULARISER_TERMS}
    series = {name: v for name, v in series.items() if v[0]}
    if not series:
        return None
    body = plot.lines(series, ylabel="term (unweighted)", smooth=True,
                      title="regulariser and slider terms (faint: per step, solid: moving average)")
    body += _table(["", "first step", "last step", "first 10 % mean", "last 10 % mean"],
                   [[name, _fmt(v[1][0]), _fmt(v[1][-1]), _fmt(_mean(_head(v[1]))), _fmt(_mean(_tail(v[1])))]
                    for name, v in series.items()])
    return Section("regularisers", "Regulariser terms", body)


def audio_weight_section(metrics: list[dict], plot: "_Plotter") -> Section:
    title = "Audio loss weight"
    if not metrics:
        return Section("audio-weight", title, _missing("no metrics.jsonl rows: the run has not completed a step yet"))
    steps, weights = _series(metrics, "audio_weight")
    if not steps:
        return Section("audio-weight", title, _missing("audio_weight is null in every step: no step trained on audio"))
    body = plot.lines({"audio weight": (steps, weights)}, ylabel="weight",
                      title="effective audio loss weight (set by loss.balance)")
    return Section("audio-weight", title, body)


def sigma_section(metrics: list[dict], plot: "_Plotter") -> Section:
    title = "σ per modality"
    if not metrics:
        return Section("sigma", title, _missing("no metrics.jsonl rows: the run has not completed a step yet"))
    video = _series(metrics, "sigma_video")[1]
    audio = _series(metrics, "sigma_audio")[1]
    body = plot.histograms({"σ video": video, "σ audio": audio},
                           title="σ drawn per step (batch means), per modality")
    if not audio:
        body += _missing("sigma_audio is null in every step: no step trained on audio")
    else:
        pairs = [(m["sigma_video"], m["sigma_audio"]) for m in metrics
                 if _finite(m.get("sigma_video")) and _finite(m.get("sigma_audio"))]
        differs = sum(abs(v - a) > 0.05 for v, a in pairs) / max(1, len(pairs))
        body += f"<p>σ_audio differs from σ_video by more than 0.05 in {100 * differs:.0f} % of the steps.</p>"
    return Section("sigma", title, body)


def validation_loss_section(validation: list[dict], metrics: list[dict], plot: "_Plotter") -> Section:
    """Two sources, either may be absent: the validation sampler's fixed-σ losses with and without the
    LoRA (``validation.jsonl``) and the loop's held-out losses (``val_loss_*`` in ``metrics.jsonl``)."""
    title = "Validation losses at a fixed σ"
    held_out = {name: _series(metrics, key) for name, key in (("video, held-out items", "val_loss_video"),
                                                               ("audio, held-out items", "val_loss_audio"))}
    held_out = {k: v for k, v in held_out.items() if v[0]}
    if not validation and not held_out:
        return Section("validation-losses", title, _no_validation())
    body = ""
    if held_out:
        body += plot.lines(held_out, ylabel="loss", markers=True, colours={"video, held-out items": "C0", "audio, held-out items": "C1"},
                           title="loss on the held-out validation items (fixed σ set and noise)")
    failed = [r for r in validation if r.get("error")]
    evaluated = [r for r in validation if not r.get("error")]
    if validation and not evaluated:
        body += _missing("every validation sampling failed:") + _list([r["error"] for r in failed])
    elif evaluated:
        curves = {}
        for name, key in (("audio, LoRA", "audio_loss_fixed_sigma"), ("video, LoRA", "video_loss_fixed_sigma"),
                          ("audio, base", "audio_loss_fixed_sigma_base"), ("video, base", "video_loss_fixed_sigma_base")):
            steps, values = _series(evaluated, key)
            if steps:
                curves[name] = (steps, values)
        last = evaluated[-1]
        body += plot.lines(curves, ylabel="loss", markers=True,
                           colours={"audio, LoRA": "C1", "audio, base": "C1", "video, LoRA": "C0", "video, base": "C0"},
                           title=f"velocity loss at σ = {last.get('fixed_sigma')} with fixed noise (dashed: base model)")
        if "audio, LoRA" not in curves:
            body += _missing("no audio validation loss: none of the evaluated items has cached audio")
        items = ", ".join(last.get("loss_items") or [])
        body += f"<p>Evaluated on {html.escape(str(last.get('loss_on')))} items: {html.escape(items)}.</p>"
        if failed:
            body += "<p>Failed validations:</p>" + _list([r["error"] for r in failed])
    else:
        body += _missing(f"no {VALIDATION_LOG}: validation sampling (A/B samples, fixed-σ losses with and without the "
                         "LoRA) was off")
    return Section("validation-losses", title, body)


def voice_section(validation: list[dict], samples_dir: Path, plot: "_Plotter") -> Section:
    title = "Voice identity score"
    explain = ("<p>Cosine similarity of Resemblyzer speaker embeddings with the dataset's voice (0-1, higher = closer). "
               "Compare the LoRA with the base model at the same seed and prompt; samples of an untrained or tiny "
               "model are noise and score alike.</p>")
    ab = _ab_voice(samples_dir)
    if not validation and ab is None:
        return Section("voice", title, explain + _no_validation())
    body = explain
    if validation:
        curves = {name: _series(validation, key) for name, key in
                  (("LoRA", "voice_score_lora"), ("base", "voice_score_base"),
                   ("dataset clips (ceiling)", "voice_reference_similarity"))}
        curves = {k: v for k, v in curves.items() if v[0]}
        if curves:
            body += plot.lines(curves, ylabel="similarity", markers=True, ylim=(0.0, 1.0),
                               colours={"LoRA": "C3", "base": "C7", "dataset clips (ceiling)": "C2"},
                               title="voice score over steps (dashed: base model)")
            rows = [[r["step"], _fmt(r.get("voice_score_lora")), _fmt(r.get("voice_score_base")), _fmt(r.get("voice_gain")),
                     html.escape(r.get("voice_note") or "")] for r in validation]
            body += _table(["step", "LoRA", "base", "gain", "note"], rows)
        else:
            body += _missing(f"validation ran without voice scores: {validation[-1].get('voice_note') or 'no reason recorded'}")
    if ab is not None:
        body += "<h3>Final A/B sample</h3>" + _table(["LoRA", "base", "gain"],
                                                      [[_fmt(ab.get("lora")), _fmt(ab.get("base")), _fmt(ab.get("gain"))]])
    return Section("voice", title, body)


def samples_section(run_dir: Path, samples_dir: Path, validation: list[dict]) -> Section:
    title = "A/B samples (with and without the LoRA, same seed and prompt)"
    body = ""
    manifest = _read_json(samples_dir / "samples.json")
    if manifest is not None:
        body += f"<h3>Sample: {html.escape(str(manifest.get('prompt', '')))} (seed {_fmt(manifest.get('seed'))})</h3>"
        # The paths in samples.json may be relative to wherever the command ran: the files sit next to it.
        files = manifest.get("files") or {}
        pairs = {mode: {kind: samples_dir / Path(path).name for kind, path in (files.get(mode) or {}).items()
                        if kind in ("mp4", "wav")} for mode in ("lora", "base")}
        body += _ab_players(run_dir, pairs)
    steps = sorted(samples_dir.glob("step_*")) if samples_dir.is_dir() else []
    if steps:
        latest = steps[-1]
        body += f"<h3>Validation samples, latest: {html.escape(latest.name)}</h3>"
        prompts = _prompts_by_index(validation)
        for index in sorted({p.name.split("_")[0] for p in latest.glob("prompt*_lora.mp4")}):
            number = index.removeprefix("prompt")
            label = prompts.get(number, "")
            body += f"<h4>{html.escape(index)}{': ' + html.escape(label) if label else ''}</h4>"
            body += _ab_players(run_dir, {mode: {"mp4": latest / f"{index}_{mode}.mp4", "wav": latest / f"{index}_{mode}.wav"}
                                          for mode in ("lora", "base")})
        if len(steps) > 1:
            rows = [[html.escape(folder.name), _links(run_dir, folder.glob("*_lora.mp4")), _links(run_dir, folder.glob("*_base.mp4"))]
                    for folder in steps]
            body += "<h4>All validation steps</h4>" + _table(["step", "LoRA", "base"], rows)
    if not body:
        body = _missing(f"no A/B samples in {samples_dir}: turn on validation sampling (validation.sample_every_steps) or run "
                        "`ltx2-av-trainer sample --lora ... --out DIR` and pass samples_dir=DIR")
    return Section("samples", title, body)


def round_trip_section(run_dir: Path, cache_dir: Path | None) -> Section:
    title = "Cache round trip (listen before you train)"
    if cache_dir is None:
        return Section("round-trip", title, _missing("the cache folder is unknown: pass cache_dir"))
    path = cache_dir / "previews" / "round_trip.json"
    rows = _read_json(path)
    if rows is None:
        return Section("round-trip", title, _missing(f"no {path}: run `ltx2-av-trainer cache --decode` to write the "
                                                     "decoded previews and their round-trip scores"))
    explain = ("<p>Source audio against the audio VAE's decode of its cached latents: log-mel distance (lower is better) "
               "and SNR (higher is better). A tiny random VAE scores badly; a real one should be close to its reference.</p>")
    table_rows = []
    for row in rows:
        score = row.get("round_trip") or {}
        note = row.get("round_trip_error") or ("" if row.get("has_audio") else "no audio")
        previews = " ".join(_link(run_dir, cache_dir / "previews" / Path(row[k]).name) for k in ("wav", "video") if row.get(k))
        table_rows.append([html.escape(str(row.get("id"))), _fmt(score.get("log_mel_distance")), _fmt(score.get("snr_db")),
                           _fmt(score.get("seconds")), previews, html.escape(note)])
    body = explain + _table(["item", "log-mel distance", "SNR dB", "seconds", "previews", "note"], table_rows)
    return Section("round-trip", title, body)


def doctor_section(doctor_path: Path | None) -> Section:
    title = "Dataset doctor"
    if doctor_path is None:
        return Section("doctor", title, _missing("no doctor report given: run `ltx2-av-trainer doctor --json PATH` and "
                                                 "pass doctor_json=PATH"))
    report = _read_json(doctor_path)
    if report is None:
        return Section("doctor", title, _missing(f"{doctor_path}: not found or not valid JSON; run "
                                                 "`ltx2-av-trainer doctor --json PATH` again"))
    summary = report.get("summary") or {}
    body = _table(["items", "ok", "with errors", "with warnings", "with audio", "speech seconds"],
                  [[_fmt(summary.get(k)) for k in ("items", "ok", "with_errors", "with_warnings", "with_audio", "speech_seconds")]])
    rows = [[html.escape(p.get("severity", "")), "(dataset)", html.escape(p.get("message", ""))]
            for p in report.get("dataset_problems") or []]
    for item in report.get("items") or []:
        issues = item.get("issues") or [{"severity": "", "message": m} for m in item.get("problems") or []]
        rows += [[html.escape(i.get("severity", "")), html.escape(Path(str(item.get("path"))).name), html.escape(i.get("message", ""))]
                 for i in issues]
    body += _table(["severity", "item", "message"], rows) if rows else "<p>No warnings or errors.</p>"
    return Section("doctor", title, body)


# --------------------------------------------------------------------------------------------
# Page
# --------------------------------------------------------------------------------------------

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 2em; }
nav a { margin-right: 1em; } table { border-collapse: collapse; margin: 0.8em 0; }
td, th { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; font-size: 0.92em; vertical-align: top; }
th { background: #f3f3f3; } .missing { color: #8a5a00; background: #fff6e0; padding: 0.4em 0.7em; }
.ab { display: flex; gap: 1.5em; flex-wrap: wrap; } .ab figure { margin: 0; }
img.plot { max-width: 100%; } video { width: 320px; background: #000; }
"""


def render_page(title: str, sections: Sequence[Section]) -> str:
    nav = " ".join(f'<a href="#{s.id}">{html.escape(s.title)}</a>' for s in sections)
    parts = "\n".join(f'<section id="{s.id}"><h2>{html.escape(s.title)}</h2>\n{s.body}\n</section>' for s in sections)
    generated = time.strftime("%Y-%m-%d %H:%M:%S")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body>\n<h1>{html.escape(title)}</h1>\n<p>Generated {generated} by "
            f"ltx2-av-trainer.</p>\n<nav>{nav}</nav>\n{parts}\n</body></html>\n")


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------


def _require_matplotlib():
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ReportError(f"the training report draws its plots with matplotlib ({exc}); install it with "
                          "`pip install matplotlib`") from None
    return Figure


class _Plotter:
    """Line and histogram figures as ``<img>`` tags with base64 PNG data."""

    def __init__(self, figure_class: Callable):
        self.figure_class = figure_class

    def lines(self, curves: dict[str, tuple[list, list]], *, ylabel: str, title: str, smooth: bool = False,
              markers: bool = False, colours: dict[str, str] | None = None, ylim: tuple[float, float] | None = None) -> str:
        """One line per curve; names containing "base" are dashed. ``colours`` pins a colour per name
        (so a LoRA curve and its base line match)."""
        from matplotlib.ticker import MaxNLocator

        if not curves:
            return ""
        figure = self.figure_class(figsize=(9, 3.6), dpi=100)
        axes = figure.add_subplot()
        for index, (name, (steps, values)) in enumerate(curves.items()):
            colour = (colours or {}).get(name, f"C{index}")
            if smooth and len(values) > 10:
                axes.plot(steps, values, color=colour, alpha=0.25, linewidth=0.8)
                axes.plot(steps, _ema(values), color=colour, linewidth=1.6, label=name)
            else:
                axes.plot(steps, values, color=colour, linewidth=1.4, marker="o" if markers else None, markersize=4,
                          linestyle="--" if "base" in name else "-", label=name)
        axes.set_xlabel("step")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_ylabel(ylabel)
        if ylim is not None:
            axes.set_ylim(*ylim)
        axes.set_title(title, fontsize=10)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
        return self._img(figure, title)

    def histograms(self, samples: dict[str, list[float]], *, title: str) -> str:
        samples = {k: v for k, v in samples.items() if v}
        if not samples:
            return ""
        figure = self.figure_class(figsize=(9, 3.2), dpi=100)
        axes = figure.add_subplot()
        for index, (name, values) in enumerate(samples.items()):
            axes.hist(values, bins=20, range=(0.0, 1.0), alpha=0.55, color=f"C{index}", label=f"{name} (n={len(values)})")
        axes.set_xlabel("σ")
        axes.set_ylabel("steps")
        axes.set_title(title, fontsize=10)
        axes.legend(fontsize=8)
        return self._img(figure, title)

    @staticmethod
    def _img(figure, alt: str) -> str:
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        data = base64.b64encode(buffer.getvalue()).decode("ascii")
        return f'<img class="plot" alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _existing(path: Path) -> Path | None:
    return path if path.is_file() else None


def _cache_dir_from_config(run_dir: Path, config: dict | None) -> Path:
    configured = ((config or {}).get("cache") or {}).get("dir")
    return Path(configured) if configured else run_dir / "cache"


def _run_title(run_dir: Path, config: dict | None) -> str:
    name = ((config or {}).get("output") or {}).get("name") or run_dir.name
    return f"Training report: {name}"


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r.get("step"), r.get(key)) for r in rows if _finite(r.get(key)) and r.get("step") is not None]
    return [p[0] for p in pairs], [float(p[1]) for p in pairs]


def _ema(values: list[float]) -> list[float]:
    out, current = [], values[0]
    for value in values:
        current = (1 - EMA_ALPHA) * current + EMA_ALPHA * value
        out.append(current)
    return out


def _head(values: list[float]) -> list[float]:
    return values[: max(1, len(values) // 10)]


def _tail(values: list[float]) -> list[float]:
    return values[-max(1, len(values) // 10):]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return html.escape(str(value))


def _missing(reason: str) -> str:
    return f'<p class="missing">{html.escape(reason)}</p>'


def _no_validation() -> str:
    return _missing(f"no {VALIDATION_LOG} in the run directory: validation sampling was off (it is off by default on "
                    "CPU; set validation.sample_every_steps to turn it on)")


def _table(header: list[str], rows: list[list]) -> str:
    """Cells are HTML already (escaped by the caller, e.g. through ``_fmt``); numbers are formatted here."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c if isinstance(c, str) else _fmt(c)}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _list(items: list[str]) -> str:
    return "<ul>" + "".join(f"<li>{html.escape(str(i))}</li>" for i in items) + "</ul>"


def _relative_url(run_dir: Path, target: Path) -> str:
    relative = os.path.relpath(Path(target).resolve(), Path(run_dir).resolve())
    return html.escape(quote(Path(relative).as_posix()), quote=True)


def _link(run_dir: Path, target: Path) -> str:
    if not Path(target).is_file():
        return f"<span>{html.escape(Path(target).name)} (missing)</span>"
    return f'<a href="{_relative_url(run_dir, target)}">{html.escape(Path(target).name)}</a>'


def _links(run_dir: Path, targets) -> str:
    return " ".join(_link(run_dir, target) for target in sorted(targets))


def _ab_players(run_dir: Path, files: dict[str, dict[str, Path]]) -> str:
    figures = []
    for mode in ("lora", "base"):
        paths = files.get(mode) or {}
        label = "with the LoRA" if mode == "lora" else "base model (LoRA off)"
        players = []
        if paths.get("mp4") is not None and Path(paths["mp4"]).is_file():
            players.append(f'<video controls preload="metadata" src="{_relative_url(run_dir, paths["mp4"])}"></video>')
        if paths.get("wav") is not None and Path(paths["wav"]).is_file():
            players.append(f'<br><audio controls preload="metadata" src="{_relative_url(run_dir, paths["wav"])}"></audio>')
        if not players:
            players.append(_missing(f"{mode}: file missing"))
        figures.append(f"<figure><figcaption>{label}</figcaption>{''.join(players)}</figure>")
    return f'<div class="ab">{"".join(figures)}</div>'


def _prompts_by_index(validation: list[dict]) -> dict[str, str]:
    prompts: dict[str, str] = {}
    for row in validation:
        for sample in row.get("samples") or []:
            prompts[str(sample.get("index"))] = str(sample.get("prompt", ""))
    return prompts


def _ab_voice(samples_dir: Path) -> dict | None:
    """A voice score stored with a ``sample`` command's A/B pair (``samples.json``: ``voice``)."""
    manifest = _read_json(samples_dir / "samples.json")
    voice = (manifest or {}).get("voice")
    return voice if isinstance(voice, dict) else None
