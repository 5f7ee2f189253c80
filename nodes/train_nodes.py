"""Training nodes: the training config, the LoRA training itself (N steps per queue, live chart), saving.

Train LoRA runs ``trainer/app/pipeline.train_from_cache`` on a ``ComfyDenoiser`` over the loader's MODEL (no
second copy of the weights). Its run folder is ``<ComfyUI output>/ltx2av_runs/<run_name>``; each queue
trains ``steps_per_queue`` more steps (``until_step``) and the next queue resumes from the run's saved
state, until ``train.steps`` (the run's total) is reached. Cancel stops the run on a step boundary with its
state saved (``chart.ComfyTraining``), then the node raises ComfyUI's ``InterruptProcessingException``; a Cancel
inside a step keeps the last completed step. Either way the next queue continues bit for bit. After every step the node sends
``PromptServer.instance.send_sync("ltx2av.train", point)`` for the live chart and returns every point
of the run as ``ui["ltx2av_history"]``, so the chart comes back after a page reload.

The optional ``vae``, ``audio_vae`` and ``clip`` inputs give the trainer its ``Encoders``
(``ComfyEncoders``) for the options that need them: the encoded silence of ``audio.missing_audio`` =
silence / audio_dop, the prompt contexts of ``preservation.dop`` / ``blank`` and validation samples.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from comfy_api.latest import io

from ..trainer.adapters.files import METADATA_PREFIX, read_adapter_file
from ..trainer.app.pipeline import train_from_cache
from ..trainer.backends.comfyui.denoiser import ComfyDenoiser, detect_comfy_version, ltxav_diffusion_model
from ..trainer.backends.comfyui.encoders import ComfyEncoders
from ..trainer.backends.comfyui.env import comfy_training_mode, import_model_management
from ..trainer.config import Config, ConfigError
from ..trainer.io_utils import atomic_path, read_jsonl
from ..trainer.training.loop import TrainingError
from ..trainer.training.state import find_latest_state
from .chart import ComfyTraining, chart_history, queue_status
from .config_widgets import config_from_widgets, training_widgets, widget_inputs
from .types import (
    CATEGORY_TRAIN,
    RUNS_ROOT,
    CacheType,
    ConfigType,
    LoRAType,
    cache_payload,
    lora_payload,
    output_subfolder,
    safe_name,
)

log = logging.getLogger(__name__)

ENCODERS_TOOLTIP = "needed for audio.missing_audio silence/audio_dop, preservation dop/blank and validation samples"


# ---- Training Config ----------------------------------------------------------------------------------


class TrainingConfig(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LTX2AV_TrainingConfig",
            display_name="LTX2AV Training Config",
            category=CATEGORY_TRAIN,
            description="The training options, with the values recommended for a voice LoRA. The options that matter "
                        "most are shown; every other trainer option is an advanced input (the same keys as the CLI's "
                        "TOML config; each tooltip names its key). The dataset, cache, model version, run folder and "
                        "device come from the other nodes, memory from ComfyUI's model management.",
            inputs=widget_inputs(training_widgets()),
            outputs=[ConfigType.Output("config", tooltip="The full trainer config (LTX2AV_CONFIG).")],
        )

    @classmethod
    def execute(cls, **widgets) -> io.NodeOutput:
        return io.NodeOutput(config_from_widgets(widgets).to_dict())


# ---- the run --------------------------------------------------------------------------------------------


def run_folder(run_name: str) -> Path:
    return output_subfolder(RUNS_ROOT, run_name, "run_name")


def saved_step(run_dir: Path) -> int:
    """The step of the run's latest complete resumable state (0 for a new run)."""
    folder = find_latest_state(run_dir)
    if folder is None:
        return 0
    return int(json.loads((folder / "state.json").read_text(encoding="utf-8"))["step"])


def run_config(config_value: dict, cache: dict, run_dir: Path, run_name: str, model_patcher) -> Config:
    """The training config of this run: the Training Config node's options, the cache's dataset and folder,
    the MODEL's version and device, and the run folder."""
    if not isinstance(config_value, dict):
        raise ValueError("expected an LTX2AV_CONFIG value from the LTX2AV Training Config node")
    data = Config.from_dict(config_value).to_dict()
    refuse_headless_options(data)
    cached = Config.from_dict(cache["config"])
    version = detect_comfy_version(ltxav_diffusion_model(model_patcher))
    if cached.model.version != version:
        raise ConfigError(
            f"the cache in {cache['cache_dir']} was made with an LTX-{cached.model.version} model but the MODEL is "
            f"LTX-{version}; cache the dataset again with this MODEL (another cache_name)"
        )
    data["dataset"] = cached.to_dict()["dataset"]
    data["cache"] = cached.to_dict()["cache"]
    data["model"]["version"] = version
    data["output"].update(dir=str(run_dir), name=safe_name(run_name, "run_name"), resume="auto")
    data["train"]["device"] = str(model_patcher.load_device)
    return Config.from_dict(data)


def refuse_headless_options(data: dict) -> None:
    """Options the Training Config does not offer because ComfyUI decides them (``[memory]``, the thread count)
    must not arrive set from elsewhere: in ComfyUI they would be ignored without a word."""
    defaults = Config().to_dict()
    changed = [f"memory.{key}" for key, value in data["memory"].items() if value != defaults["memory"][key]]
    if data["train"]["num_threads"] != defaults["train"]["num_threads"]:
        changed.append("train.num_threads")
    if changed:
        raise ConfigError(
            f"{', '.join(changed)}: headless options that ComfyUI decides itself (it loads, offloads and casts the "
            "MODEL; fp8 weights come from the loader's weight_dtype, the attention kernel from ComfyUI's launch "
            "options); leave them at their defaults in ComfyUI, or train with the ltx2-av-trainer command"
        )


def lora_file(config: Config, step: int) -> Path:
    """The LoRA the trainer exported at ``step`` (``lora/<name>_<step>.safetensors``)."""
    return Path(config.output.dir) / "lora" / f"{config.output.name}_{step:06d}.safetensors"


# ---- Train LoRA ---------------------------------------------------------------------------------------------


CONNECT_ENCODERS = ("connect the vae (the checkpoint loader's VAE), audio_vae (LTXVAudioVAELoader) and clip "
                    "(LTXAVTextEncoderLoader) inputs of LTX2AV Train LoRA, or turn those options off in the Training Config")


def training_encoders(model_patcher, vae, audio_vae, clip) -> ComfyEncoders | None:
    """The trainer's encoders when all three optional inputs are connected; None when none is."""
    given = {"vae": vae, "audio_vae": audio_vae, "clip": clip}
    missing = [name for name, value in given.items() if value is None]
    if not missing:
        return ComfyEncoders(model_patcher, vae, audio_vae, clip)
    if len(missing) < len(given):
        raise ConfigError(f"LTX2AV Train LoRA: {', '.join(missing)} not connected; the encoders need all three of "
                          f"vae, audio_vae and clip ({ENCODERS_TOOLTIP}): connect the missing ones or disconnect all")
    return None


def check_validation_encoders(run: Config, encoders) -> None:
    """The pipeline leaves validation sampling off without encoders; an explicit interval asks for it."""
    if encoders is None and run.validation.sample_every_steps > 0:
        raise ConfigError(f"validation.sample_every_steps = {run.validation.sample_every_steps} needs the encoders to "
                          f"render samples: {CONNECT_ENCODERS} (set validation_sample_every_steps to 0 for no samples)")


class TrainLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LTX2AV_TrainLoRA",
            display_name="LTX2AV Train LoRA",
            category=CATEGORY_TRAIN,
            description="Trains an audio+video LoRA on the MODEL from the cache: steps_per_queue steps per queue, "
                        "continuing the run (output/ltx2av_runs/<run_name>) each time you queue again, up to the "
                        "config's train_steps. Cancel keeps a resumable state. The node shows a live loss chart.",
            inputs=[
                io.Model.Input("model", tooltip="The LTX-2 / LTX-2.3 audio-video MODEL the cache was made with. It is trained through an adapter and left unchanged."),
                CacheType.Input("cache", tooltip="From LTX2AV Cache Latents."),
                ConfigType.Input("config", tooltip="From LTX2AV Training Config."),
                io.Int.Input("steps_per_queue", default=100, min=1, max=1_000_000, tooltip="Optimizer steps per queue; queue again to continue the same run from its saved state."),
                io.String.Input("run_name", default="my_character", tooltip="Run folder under ComfyUI's output/ltx2av_runs and the LoRA file prefix (a plain name). A new name starts a new run."),
                io.Vae.Input("vae", optional=True, tooltip=f"The LTX-2 video VAE (checkpoint loader's VAE); {ENCODERS_TOOLTIP}."),
                io.Vae.Input("audio_vae", optional=True, tooltip=f"The LTX-2 audio VAE (LTXVAudioVAELoader); {ENCODERS_TOOLTIP}."),
                io.Clip.Input("clip", optional=True, tooltip=f"The Gemma text encoder (LTXAVTextEncoderLoader); {ENCODERS_TOOLTIP}."),
            ],
            outputs=[
                LoRAType.Output("lora", tooltip="The LoRA saved at the last step (LTX2AV_LORA)."),
                io.String.Output("loss_history", tooltip="JSON list of the per-step metrics of the run so far (metrics.jsonl)."),
            ],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, **inputs):
        # ComfyUI passes only the widget values here. Re-run on every queue while the run advances: its
        # saved step changes after each queue (a finished run stays cached).
        run_name, steps_per_queue = inputs.get("run_name", ""), inputs.get("steps_per_queue")
        try:
            return (run_name, steps_per_queue, saved_step(run_folder(run_name)))
        except ValueError:
            return (run_name, steps_per_queue)  # a bad run_name is reported by execute

    @classmethod
    def execute(cls, model, cache, config, steps_per_queue: int, run_name: str, vae=None, audio_vae=None,
                clip=None) -> io.NodeOutput:
        cache = cache_payload(cache)
        run_dir = run_folder(run_name)
        run = run_config(config, cache, run_dir, run_name, model)
        encoders = training_encoders(model, vae, audio_vae, clip)
        check_validation_encoders(run, encoders)
        node = str(cls.hidden.unique_id) if cls.hidden is not None and cls.hidden.unique_id is not None else ""
        start = saved_step(run_dir)
        until = min(start + steps_per_queue, run.train.steps)
        if start >= run.train.steps:
            log.info("LTX2AV Train LoRA: %s", queue_status(run_name, start, start, run.train.steps))
        denoiser = ComfyDenoiser(model, run.model.version,
                                 checkpointing="block" if run.model.gradient_checkpointing else "none",
                                 cross_modal_sigma=run.model.cross_modal_sigma)
        callbacks = ComfyTraining(node, run, until_step=until)
        # Nodes run under torch.inference_mode(); training needs autograd, and ComfyUI's training code path.
        with torch.inference_mode(False), torch.enable_grad(), comfy_training_mode():
            denoiser.load()  # after any sampling: loads the MODEL and makes its tensors trainable
            try:
                result = train_from_cache(run, denoiser, encoders=encoders, callbacks=callbacks, until_step=until)
            except TrainingError as exc:
                raise TrainingError(f"{exc} (in ComfyUI: use a new run_name to start a fresh run)") from exc
            except ConfigError as exc:
                # The pipeline names the options that need encoders; in ComfyUI the fix is to wire the inputs.
                if encoders is None and "need the encoders" in str(exc):
                    raise ConfigError(f"{exc}. In ComfyUI: {CONNECT_ENCODERS}") from exc
                raise
        if callbacks.cancelled or result.stopped_by:
            # Stopped on a step boundary with its state saved: tell ComfyUI the prompt was interrupted.
            raise import_model_management().InterruptProcessingException()
        lora_path = result.lora_path or lora_file(run, result.step)
        if not lora_path.is_file():
            raise FileNotFoundError(f"{lora_path}: the run has no LoRA for step {result.step}; queue again to train")
        _, metadata = read_adapter_file(lora_path)
        lora = {
            "path": str(lora_path),
            "step": result.step,
            "run_dir": str(run_dir),
            "groups": json.loads(metadata.get(METADATA_PREFIX + "groups", "[]")),
            "config": run.to_dict(),
        }
        rows = read_jsonl(run_dir / "metrics.jsonl")
        status = queue_status(run_name, start, result.step, run.train.steps)
        return io.NodeOutput(lora, json.dumps(rows), ui={"ltx2av_history": chart_history(node, rows, run.train.steps),
                                                         "ltx2av_status": [status]})


# ---- Save LoRA ----------------------------------------------------------------------------------------------


def same_file_content(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with a.open("rb") as first, b.open("rb") as second:
        while True:
            chunk = first.read(1 << 20)
            if chunk != second.read(1 << 20):
                return False
            if not chunk:
                return True


def lora_target(filename: str, source: Path | None = None, overwrite: bool = False) -> Path:
    """Where Save LoRA (and Convert / Merge LoRAs) write: ``<first ComfyUI loras folder>/<filename>.safetensors``,
    or, when that file exists with other content and ``overwrite`` is off, the first free
    ``<filename>_00001.safetensors``, ``<filename>_00002.safetensors``, ... (a file that already holds the
    ``source`` LoRA is reused; without a ``source``, as for a LoRA still to be written, every existing file counts
    as another LoRA). The name cannot leave the folder."""
    import folder_paths

    stem = safe_name(filename, "filename")
    if stem.lower().endswith(".safetensors"):
        stem = stem[: -len(".safetensors")]
    folder = Path(folder_paths.get_folder_paths("loras")[0])
    target = folder / f"{stem}.safetensors"
    counter = 0
    while not overwrite and target.is_file() and (source is None or not same_file_content(target, source)):
        counter += 1
        target = folder / f"{stem}_{counter:05d}.safetensors"
    return target


class SaveLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LTX2AV_SaveLoRA",
            display_name="LTX2AV Save LoRA",
            category=CATEGORY_TRAIN,
            description="Copies the trained LoRA into ComfyUI's loras folder, where LoraLoaderModelOnly finds it. An "
                        "existing file is never replaced unless overwrite is on: the copy gets the next free number.",
            inputs=[
                LoRAType.Input("lora", tooltip="From LTX2AV Train LoRA."),
                io.String.Input("filename", default="my_character_av", tooltip="File name in ComfyUI's loras folder (a plain name; .safetensors is added)."),
                io.Boolean.Input("overwrite", default=False, tooltip="Off: when the file exists with another LoRA, save as <filename>_00001.safetensors, _00002, ... (as ComfyUI's own save nodes count). On: replace <filename>.safetensors."),
            ],
            outputs=[io.String.Output("path", tooltip="Where the LoRA was written.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, lora, filename: str, overwrite: bool = False) -> io.NodeOutput:
        source = Path(lora_payload(lora)["path"])
        if not source.is_file():
            raise FileNotFoundError(f"{source}: the LoRA file of this run is missing; train again")
        target = lora_target(filename, source, overwrite)
        if target.is_file() and same_file_content(target, source):
            text = f"{target.name} already holds this LoRA (step {lora['step']})"
        else:
            with atomic_path(target) as tmp:
                shutil.copyfile(source, tmp)
            text = f"saved step {lora['step']} as {target.name}"
        log.info("LTX2AV Save LoRA: %s (%s)", text, target)
        return io.NodeOutput(str(target), ui={"text": [text]})
