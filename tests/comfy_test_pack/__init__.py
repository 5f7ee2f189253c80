"""Test-only ComfyUI node pack, linked into the end-to-end test server's custom_nodes (never shipped).

``LTX2AVTest_SaveTensors`` writes an IMAGE and an AUDIO without rounding, for bit-exact comparisons of two graphs.
``LTX2AVTest_TinyTextEncoderLoader`` stands in for ComfyUI's ``LTXAVTextEncoderLoader`` in the workflows the
tests run: that loader always builds the full-size Gemma-3-12B (a fixed config and a vision tower), so it
cannot load a tiny text encoder. This node takes the same inputs and builds the same ``LTXAVTEModel``
(projection, Gemma tokenizer code) with a tiny Gemma, from a file written by
``comfy_model_fixtures.write_tiny_text_encoder``.
"""

from __future__ import annotations

import sys
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent.parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))  # the fixtures modules live next to the tests

import folder_paths  # noqa: E402
from comfy_api.latest import ComfyExtension, io  # noqa: E402
from safetensors import safe_open  # noqa: E402

DUAL_PROJECTION_KEY = "text_embedding_projection.video_aggregate_embed.weight"  # LTX-2.3's text projection


def ltx_version_of(path: str) -> str:
    """2.3 text encoders carry the dual video/audio projection, 2.0 ones a single projection."""
    with safe_open(path, framework="pt") as handle:
        return "2.3" if DUAL_PROJECTION_KEY in handle.keys() else "2.0"


class TinyTextEncoderLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LTX2AVTest_TinyTextEncoderLoader",
            display_name="(test) Load tiny LTXAV text encoder",
            category="testing",
            inputs=[
                io.Combo.Input("text_encoder", options=folder_paths.get_filename_list("text_encoders"),
                               tooltip="A tiny text encoder from comfy_model_fixtures.write_tiny_text_encoder."),
                io.Combo.Input("ckpt_name", options=folder_paths.get_filename_list("checkpoints"),
                               tooltip="Unused (the real loader reads the connectors' checkpoint here)."),
                io.Combo.Input("device", options=["default", "cpu"], tooltip="Unused; the tests run on the CPU."),
            ],
            outputs=[io.Clip.Output()],
        )

    @classmethod
    def execute(cls, text_encoder: str, ckpt_name: str, device: str) -> io.NodeOutput:
        from comfy_model_fixtures import load_text_encoder

        from ltx2_av_trainer.trainer.config import TinyModelConfig

        path = folder_paths.get_full_path_or_raise("text_encoders", text_encoder)
        return io.NodeOutput(load_text_encoder(Path(path), ltx_version_of(path), TinyModelConfig()))


class SaveTensors(io.ComfyNode):
    """Writes an IMAGE and an AUDIO exactly (no 8-bit or codec rounding) to ``output/ltx2av_test/<name>.safetensors``,
    so a test can compare two graphs' results bit for bit."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LTX2AVTest_SaveTensors",
            display_name="(test) Save IMAGE and AUDIO tensors",
            category="testing",
            inputs=[
                io.Image.Input("images", tooltip="Frames."),
                io.Audio.Input("audio", tooltip="Audio."),
                io.String.Input("name", default="tensors", tooltip="File name under output/ltx2av_test."),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, images, audio, name: str) -> io.NodeOutput:
        import torch
        from safetensors.torch import save_file

        folder = Path(folder_paths.get_output_directory()) / "ltx2av_test"
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"images": images.float().cpu().contiguous(), "waveform": audio["waveform"].float().cpu().contiguous(),
                   "sample_rate": torch.tensor(int(audio["sample_rate"]))}, str(folder / f"{name}.safetensors"))
        return io.NodeOutput()


class TestPackExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [TinyTextEncoderLoader, SaveTensors]


async def comfy_entrypoint() -> TestPackExtension:
    return TestPackExtension()
