"""Apply Trained LoRA: the run's LoRA on a MODEL through ComfyUI's own LoRA loader, for sampling with core nodes.

A workflow that trains and then samples cannot use ``LoraLoaderModelOnly`` for the LoRA it is about to train (its
file list is checked before the queue runs). This node takes Train LoRA's output and does what that loader does:
``comfy.sd.load_lora_for_models`` on a clone of the MODEL, with the file's metadata attached, so ComfyUI's
``GetICLoRAParameters`` reads ``reference_downscale_factor`` from it as from a loaded file. The MODEL is unchanged.
"""

from __future__ import annotations

from pathlib import Path

from comfy_api.latest import io

from .types import CATEGORY_TRAIN, LoRAType, lora_payload


class ApplyTrainedLoRA(io.ComfyNode):
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
        import comfy.sd
        import comfy.utils

        path = Path(lora_payload(lora)["path"])
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the LoRA file of this run is missing; train again")
        tensors, metadata = comfy.utils.load_torch_file(str(path), safe_load=True, return_metadata=True)
        patched, _ = comfy.sd.load_lora_for_models(model, None, tensors, strength, 0.0, lora_metadata=metadata)
        return io.NodeOutput(patched)
