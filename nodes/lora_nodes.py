"""LoRA file nodes: Convert LoRA (any LTX-2 trainer's file into our key layout), Merge LoRAs (two LoRAs into one,
with weights per stream) and Apply Trained LoRA (the run's LoRA on a MODEL for sampling with core nodes). Both read from ComfyUI's ``loras`` folder (or a Train LoRA output) and write into it;
the work is ``trainer/adapters/formats.convert_lora`` and ``trainer/adapters/merge.merge_files``.
"""

from __future__ import annotations

import json
from pathlib import Path

from comfy_api.latest import io

from ..trainer.adapters.files import read_adapter_file
from ..trainer.adapters.formats import LORA_FORMATS
from ..trainer.adapters.merge import MERGE_METHODS, merge_files
from ..trainer.app.lora_cli import convert_file
from ..trainer.backends.comfyui.denoiser import ltxav_diffusion_model
from ..trainer.backends.comfyui.sampling import with_lora
from .check_nodes import NO_FILE, chosen_lora, lora_file_choices
from .train_nodes import lora_target
from .types import CATEGORY, CATEGORY_TRAIN, LoRAType, lora_payload

CATEGORY_LORA = CATEGORY + "/lora"

FORMAT_TOOLTIP = ("Key layout. lora_ab: lora_A/lora_B with alpha folded in, loaded identically by ComfyUI, diffusers and "
                  "ltx-core / ltx-pipelines. down_up: lora_down/lora_up/alpha (ComfyUI only).")


def lora_value(path: Path) -> dict:
    """An LTX2AV_LORA value for a file this pack wrote (Verify and Sample A/B read its path)."""
    _, metadata = read_adapter_file(path)
    groups = json.loads(metadata.get("ltx2_av_trainer.groups", "[]"))
    return {"path": str(path), "step": 0, "run_dir": "", "groups": groups, "config": None}


def model_module_paths(model) -> set[str]:
    return {name for name, _ in ltxav_diffusion_model(model).named_modules() if name}


class ConvertLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LTX2AV_ConvertLoRA",
            display_name="LTX2AV Convert LoRA",
            category=CATEGORY_LORA,
            description="Writes a LoRA of any LTX-2 trainer (ai-toolkit, ltx-trainer, musubi-tuner, diffusers, PEFT, "
                        "ComfyUI) in the key layout every runtime loads, into the loras folder.",
            inputs=[
                io.Combo.Input("lora_name", options=lora_file_choices(), default=NO_FILE, optional=True,
                               tooltip="The LoRA file in ComfyUI's loras folder to convert."),
                LoRAType.Input("lora", optional=True, tooltip="Or a LoRA from LTX2AV Train LoRA / Merge LoRAs."),
                io.String.Input("filename", default="converted_lora", tooltip="Output file name in the loras folder "
                                "(a plain name; .safetensors is added; an existing file is never replaced: the "
                                "copy is numbered _00001, _00002, ... as Save LoRA does)."),
                io.Combo.Input("lora_format", options=list(LORA_FORMATS), default="lora_ab", tooltip=FORMAT_TOOLTIP),
                io.Model.Input("model", optional=True, tooltip="Optional: refuse modules this MODEL does not have "
                               "(a LoRA for another model version)."),
                io.Float.Input("alpha", default=0.0, min=0.0, max=4096.0, step=1.0, advanced=True,
                               tooltip="For files without alpha keys (ltx-trainer, PEFT): the alpha they were trained "
                                       "with, folded in. 0 = apply them as they are (scale 1)."),
                io.Boolean.Input("skip_unconvertible", default=False, advanced=True,
                                 tooltip="Leave out keys that cannot be converted (listed in the report) instead of "
                                         "stopping."),
            ],
            outputs=[
                LoRAType.Output("lora", tooltip="The converted LoRA (for Verify LoRA Keys and Sample A/B)."),
                io.String.Output("report", tooltip="What was converted, what was left out and why."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, filename: str, lora_format: str, lora_name: str | None = None, lora=None, model=None,
                alpha: float = 0.0, skip_unconvertible: bool = False) -> io.NodeOutput:
        source = chosen_lora(lora, lora_name)
        report = convert_file(source, lora_target(filename), lora_format=lora_format, alpha=alpha or None,
                              skip_unconvertible=skip_unconvertible,
                              module_paths=model_module_paths(model) if model is not None else None)
        lines = [f"{report['summary']} → {report['file']}", f"source: {source.name} (written by {report['written_by']})"]
        lines += [f"left out {key}: {why}" for key, why in list(report["left_out"].items())[:20]]
        lines += [f"note: {note}" for note in report["notes"]]
        text = "\n".join(lines)
        return io.NodeOutput(lora_value(Path(report["file"])), text, ui={"text": [text]})


def _stream_weights(audio: float, video: float, other: float) -> dict[str, float]:
    return {"audio_attn": audio, "audio_ff": audio, "v2a": audio, "video_attn": video, "video_ff": video, "a2v": video,
            "connector": other, "other": other}


class MergeLoRAs(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        weight = dict(min=-4.0, max=4.0, step=0.05)
        return io.Schema(
            node_id="LTX2AV_MergeLoRAs",
            display_name="LTX2AV Merge LoRAs",
            category=CATEGORY_LORA,
            description="Merges two LoRAs into one file in the loras folder, with a weight per stream: e.g. the voice "
                        "(audio) from A and the look (video) from B. concat is exact; svd re-projects to a rank and "
                        "reports its error.",
            inputs=[
                io.Combo.Input("lora_a_name", options=lora_file_choices(), tooltip="LoRA A (loras folder)."),
                io.Combo.Input("lora_b_name", options=lora_file_choices(), tooltip="LoRA B (loras folder)."),
                io.Float.Input("a_audio", default=1.0, **weight, tooltip="Weight of A's audio modules (audio attention, "
                               "audio FF, video→audio attention)."),
                io.Float.Input("a_video", default=1.0, **weight, tooltip="Weight of A's video modules (video attention, "
                               "video FF, audio→video attention)."),
                io.Float.Input("b_audio", default=1.0, **weight, tooltip="Weight of B's audio modules."),
                io.Float.Input("b_video", default=1.0, **weight, tooltip="Weight of B's video modules."),
                io.Combo.Input("method", options=list(MERGE_METHODS), default="concat",
                               tooltip="concat: exact (the merged rank is the sum of both ranks). svd: re-projected to "
                                       "rank (smaller file; the error per module is reported)."),
                io.Int.Input("rank", default=32, min=1, max=1024, tooltip="Rank of the svd merge (ignored by concat)."),
                io.String.Input("filename", default="merged_lora", tooltip="Output file name in the loras folder "
                                "(a plain name; .safetensors is added; an existing file is never replaced: the "
                                "copy is numbered _00001, _00002, ... as Save LoRA does)."),
                io.Float.Input("a_other", default=1.0, **weight, advanced=True,
                               tooltip="Weight of A's other modules (text connectors, layers outside the blocks)."),
                io.Float.Input("b_other", default=1.0, **weight, advanced=True, tooltip="Weight of B's other modules."),
                io.Combo.Input("lora_format", options=list(LORA_FORMATS), default="lora_ab", advanced=True,
                               tooltip=FORMAT_TOOLTIP),
                io.Float.Input("max_error", default=0.0, min=0.0, max=1.0, step=0.01, advanced=True,
                               tooltip="svd: stop without writing when a module's relative error exceeds this (0 = no limit)."),
            ],
            outputs=[
                LoRAType.Output("lora", tooltip="The merged LoRA (for Verify LoRA Keys and Sample A/B)."),
                io.String.Output("report", tooltip="Modules, ranks and (svd) the relative error per module."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, lora_a_name: str, lora_b_name: str, a_audio: float, a_video: float, b_audio: float, b_video: float,
                method: str, rank: int, filename: str, a_other: float = 1.0, b_other: float = 1.0,
                lora_format: str = "lora_ab", max_error: float = 0.0) -> io.NodeOutput:
        import comfy.model_management
        import comfy.utils

        sources = [chosen_lora(None, lora_a_name), chosen_lora(None, lora_b_name)]
        bar = comfy.utils.ProgressBar(1)

        def progress(done: int, total: int) -> None:
            # Cancel stops between modules; the file is written only at the end (atomically), so nothing half-done remains.
            comfy.model_management.throw_exception_if_processing_interrupted()
            bar.update_absolute(done, total)

        report = merge_files(sources, lora_target(filename),
                             weights=[_stream_weights(a_audio, a_video, a_other), _stream_weights(b_audio, b_video, b_other)],
                             method=method, rank=rank if method == "svd" else None, lora_format=lora_format,
                             max_error=max_error or None, on_module=progress)
        text = f"{report['summary']} → {report['file']}"
        return io.NodeOutput(lora_value(Path(report["file"])), text, ui={"text": [text]})


class ApplyTrainedLoRA(io.ComfyNode):
    """A workflow that trains and then samples cannot use ``LoraLoaderModelOnly`` for the LoRA it is about to train
    (its file list is checked before the queue runs). This node does what that loader does on Train LoRA's output:
    ``comfy.sd.load_lora_for_models`` on a clone of the MODEL, with the file's metadata attached, so ComfyUI's
    ``GetICLoRAParameters`` reads ``reference_downscale_factor`` from it as from a loaded file. The MODEL is unchanged."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LTX2AV_ApplyTrainedLoRA",
            display_name="LTX2AV Apply Trained LoRA",
            category=CATEGORY_TRAIN,
            description="The trained LoRA on the MODEL with ComfyUI's own LoRA loader (as Load LoRA does, metadata "
                        "included), for sampling with ComfyUI's nodes in the same workflow.",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL the LoRA was trained on."),
                LoRAType.Input("lora", tooltip="From LTX2AV Train LoRA."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="LoRA strength (1 = as trained), as in Load LoRA."),
            ],
            outputs=[io.Model.Output("model", tooltip="A clone of the MODEL with the LoRA applied.")],
        )

    @classmethod
    def execute(cls, model, lora, strength: float) -> io.NodeOutput:
        path = Path(lora_payload(lora)["path"])
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the LoRA file of this run is missing; train again")
        return io.NodeOutput(with_lora(model, path, strength))
