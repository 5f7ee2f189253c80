"""ComfyUI tier: every node's ``execute`` on real ComfyUI objects (tiny LTXAV checkpoint, tiny video VAE, tiny
audio VAE loaded by ComfyUI's own loader node, tiny Gemma text encoder), on a small synthesised dataset.

Runs with ``COMFYUI_PATH`` pointing at a ComfyUI checkout whose requirements are installed; skipped otherwise.
ComfyUI's folders (output, input, loras, checkpoints) are redirected to a temporary folder for the module.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
from pathlib import Path

import pytest
import torch

from ltx2_av_trainer.trainer.backends.comfyui.sampling import DEFAULT_NEGATIVE
from ltx2_av_trainer.trainer.config import Config, ConfigError, TinyModelConfig

pytestmark = pytest.mark.comfyui

TINY = TinyModelConfig()
CLIPS = 3
FRAMES = 9
SIZE = 64
TOTAL_STEPS = 4
STEPS_PER_QUEUE = 2
NODE_ID = "17"

MODE_REFERENCE_INPUTS = ("reference_dir", "reference_frames", "reference_downscale", "reference_audio_dir",
                         "reference_audio_same_speaker", "reference_audio_seconds")
# The node contract (docs: nodes_contract): id → (inputs, outputs), names in order.
CONTRACT = {
    "LTX2AV_LoadDataset": (["folder", "trigger", "caption_extension", "audio_dir", "target_fps", "frames", "width",
                            "height", "with_audio", "validation_split", "kind", "repeats", "frame_buckets",
                            # The training modes' references (advanced, optional).
                            *MODE_REFERENCE_INPUTS], ["dataset"]),
    "LTX2AV_DatasetDoctor": (["dataset", "strict", "listen_index"], ["report", "report_json", "audio"]),
    "LTX2AV_ExtractAudio": (["file", "audio_stream"], ["audio"]),
    "LTX2AV_CacheLatents": (["dataset", "model", "vae", "audio_vae", "clip", "cache_name", "decode_previews"],
                            ["cache", "summary"]),
    # audio_vae is an addition to the contract: a cache value holds folders, not model objects.
    "LTX2AV_PreviewCachedAudio": (["cache", "index", "audio_vae"], ["audio"]),
    "LTX2AV_TrainLoRA": (["model", "cache", "config", "steps_per_queue", "run_name", "vae", "audio_vae", "clip"],
                         ["lora", "loss_history"]),
    "LTX2AV_SaveLoRA": (["lora", "filename", "overwrite"], ["path"]),
    "LTX2AV_VerifyLoRAKeys": (["model", "lora", "lora_name"], ["report", "ok"]),
    "LTX2AV_SampleAV": (["model", "clip", "vae", "audio_vae", "prompt", "seed", "steps", "frames", "width", "height",
                         "guidance", "lora", "lora_name", "negative_prompt", "sampler_name", "lora_strength",
                         "frame_rate", "first_frame", "guide_video", "reference_audio"],
                        ["video_lora", "audio_lora", "video_base", "audio_base"]),
    # Added after the contract: the speaker similarity of an AUDIO with the dataset voice.
    "LTX2AV_VoiceScore": (["audio", "cache", "reference_file"], ["score", "report"]),
    # LoRA files of any trainer into our layout, and two LoRAs into one (test_comfy_lora_nodes.py).
    "LTX2AV_ConvertLoRA": (["lora_name", "lora", "filename", "lora_format", "model", "alpha", "skip_unconvertible"],
                           ["lora", "report"]),
    "LTX2AV_MergeLoRAs": (["lora_a_name", "lora_b_name", "a_audio", "a_video", "b_audio", "b_video", "method", "rank",
                           "filename", "a_other", "b_other", "lora_format", "max_error"], ["lora", "report"]),
    # The training modes' workflows: the trained LoRA through ComfyUI's loader, for its core sampling nodes.
    "LTX2AV_ApplyTrainedLoRA": (["model", "lora", "strength"], ["model"]),
}
OUTPUT_TYPES = {
    "dataset": "LTX2AV_DATASET", "cache": "LTX2AV_CACHE", "config": "LTX2AV_CONFIG", "lora": "LTX2AV_LORA",
    "audio": "AUDIO", "report": "STRING", "report_json": "STRING", "summary": "STRING", "loss_history": "STRING",
    "path": "STRING", "ok": "BOOLEAN", "video_lora": "IMAGE", "audio_lora": "AUDIO", "video_base": "IMAGE",
    "audio_base": "AUDIO", "score": "FLOAT", "model": "MODEL",
}
EVENT_KEYS = {"node", "step", "total", "loss_video", "loss_audio", "audio_weight", "step_time_s", "eta_s"}


# ---- ComfyUI, its folders and the tiny objects ------------------------------------------------------------


@pytest.fixture(scope="module")
def comfy_home(tmp_path_factory):
    """ComfyUI importable from COMFYUI_PATH (CPU library mode), with its folders in a temporary folder."""
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        pytest.skip("COMFYUI_PATH is not set: point it at a ComfyUI checkout to run the ComfyUI tier (make test-comfyui)")
    from ltx2_av_trainer.trainer.backends.comfyui.env import import_model_management

    import_model_management(path)
    import folder_paths
    from comfy_fixtures import comfy_model_folders

    root = tmp_path_factory.mktemp("comfy_home")
    folders = {name: root / name for name in ("output", "input", "loras", "checkpoints")}
    for folder in folders.values():
        folder.mkdir()
    saved = (folder_paths.get_output_directory(), folder_paths.get_input_directory())
    folder_paths.set_output_directory(str(folders["output"]))
    folder_paths.set_input_directory(str(folders["input"]))
    try:
        with comfy_model_folders({name: folders[name] for name in ("loras", "checkpoints")}):
            yield folders
    finally:
        folder_paths.set_output_directory(saved[0])
        folder_paths.set_input_directory(saved[1])


@pytest.fixture(scope="module")
def objects(comfy_home, tmp_path_factory):
    """MODEL, VAE, audio VAE and CLIP as ComfyUI's loaders hand them to nodes (made inside inference mode)."""
    import comfy.sd
    import comfy_model_fixtures as fixtures
    from comfy_fixtures import write_tiny_ltxav_checkpoint

    folder = tmp_path_factory.mktemp("weights")
    checkpoint = write_tiny_ltxav_checkpoint(folder, "2.0", TINY)
    fixtures.write_tiny_audio_vae(comfy_home["checkpoints"])
    video_vae = fixtures.write_tiny_video_vae(folder)
    text_encoder = fixtures.write_tiny_text_encoder(folder, "2.0", TINY)
    with torch.inference_mode():
        return {
            "model": comfy.sd.load_diffusion_model(str(checkpoint)),
            "vae": fixtures.load_video_vae(video_vae),
            "audio_vae": fixtures.load_audio_vae("tiny_ltx2_audio_vae.safetensors"),
            "clip": fixtures.load_text_encoder(text_encoder, "2.0", TINY),
        }


@pytest.fixture(scope="module")
def dataset(comfy_home):
    from ltx2_av_trainer.nodes.data_nodes import LoadDataset
    from ltx2_av_trainer.trainer.data.synth import make_demo_dataset

    make_demo_dataset(comfy_home["input"] / "clips", clips_per_speaker=CLIPS, seconds=0.8, width=SIZE, height=SIZE)
    with torch.inference_mode():
        return LoadDataset.execute("clips", "ohwx", ".txt", "", 25.0, FRAMES, SIZE, SIZE, True, 0.0, "video", 1).args[0]


@pytest.fixture(scope="module")
def cache(objects, dataset):
    from ltx2_av_trainer.nodes.data_nodes import CacheLatents

    with torch.inference_mode():
        return CacheLatents.execute(dataset, objects["model"], objects["vae"], objects["audio_vae"], objects["clip"],
                                    "tiny_cache", True).args


@pytest.fixture(scope="module")
def mixed_cache(objects, comfy_home):
    """A cache of one talking clip and one clip without an audio stream (the same pictures, video only)."""
    import av
    import numpy as np

    from ltx2_av_trainer.nodes.data_nodes import CacheLatents, LoadDataset
    from ltx2_av_trainer.trainer.data.media.encode import write_av_file
    from ltx2_av_trainer.trainer.data.synth import make_demo_dataset

    folder = comfy_home["input"] / "mixed_clips"
    talking = make_demo_dataset(folder, clips_per_speaker=1, seconds=0.8, width=SIZE, height=SIZE)[0]
    with av.open(str(talking)) as container:
        pictures = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])
    write_av_file(folder / "no_audio.mp4", pictures, 25, None, 48000)
    (folder / "no_audio.txt").write_text("a person looks at the camera without a sound\n", encoding="utf-8")
    with torch.inference_mode():
        dataset = LoadDataset.execute("mixed_clips", "ohwx", ".txt", "", 25.0, FRAMES, SIZE, SIZE, True, 0.0, "video",
                                      1).args[0]
        cache, summary = CacheLatents.execute(dataset, objects["model"], objects["vae"], objects["audio_vae"],
                                              objects["clip"], "mixed_cache", False).args
    assert "Audio latent caching: 1 encoded, 1 failed" in summary
    return cache


def training_config(**changes) -> dict:
    from ltx2_av_trainer.nodes.config_widgets import training_widgets
    from ltx2_av_trainer.nodes.train_nodes import TrainingConfig

    widgets = {spec.name: spec.default for spec in training_widgets()}
    widgets.update(train_steps=TOTAL_STEPS, train_mixed_precision="fp32", optimizer_lr=1e-3, network_rank=4,
                   network_alpha=4.0, output_save_every=100)
    widgets.update(changes)
    with torch.inference_mode():
        return TrainingConfig.execute(**widgets).args[0]


class EventRecorder:
    """Stands in for the running PromptServer's instance: records what the node sends to the browser."""

    def __init__(self):
        self.events: list[tuple[str, dict]] = []

    def send_sync(self, event, data, sid=None):
        self.events.append((event, data))

    def steps(self) -> list[int]:
        return [data["step"] for event, data in self.events if event == "ltx2av.train"]


@pytest.fixture
def events(comfy_home, monkeypatch):
    import server

    recorder = EventRecorder()
    monkeypatch.setattr(server.PromptServer, "instance", recorder, raising=False)
    return recorder


def train_node():
    """Train LoRA as ComfyUI executes it: a class clone that knows its node id."""
    from comfy_api.latest import io

    from ltx2_av_trainer.nodes.train_nodes import TrainLoRA

    return TrainLoRA.PREPARE_CLASS_CLONE({"hidden_inputs": {io.Hidden.unique_id: NODE_ID}})


def probe_output(model) -> torch.Tensor:
    """The MODEL's video prediction for a fixed input (no gradients, as sampling calls it)."""
    from ltx2_av_trainer.trainer.backends.comfyui.denoiser import ComfyDenoiser
    from ltx2_av_trainer.trainer.backends.interface import DenoiserInput, TextContext

    g = torch.Generator().manual_seed(3)
    text = TextContext(torch.randn(1, 8, TINY.caption_channels, generator=g),
                       torch.randn(1, 8, TINY.caption_channels, generator=g), torch.ones(1, 8, dtype=torch.long))
    inputs = DenoiserInput(torch.randn(1, 128, 2, 2, 2, generator=g), torch.randn(1, 8, 10, 16, generator=g),
                           torch.tensor([0.6]), torch.tensor([0.4]), text, 25.0)
    with torch.no_grad():
        return ComfyDenoiser(model, "2.0")(inputs)[0].clone()


@pytest.fixture(scope="module")
def trained(objects, cache, comfy_home):
    """Two queues of Train LoRA on the loader's MODEL, inside torch.inference_mode(), with recorded events."""
    import server

    from ltx2_av_trainer.nodes.train_nodes import TrainLoRA, saved_step, run_folder

    recorder = EventRecorder()
    previous = getattr(server.PromptServer, "instance", None)
    server.PromptServer.instance = recorder
    config = training_config()
    before = probe_output(objects["model"])
    queues = []
    try:
        for _ in range(2):
            fingerprint = TrainLoRA.fingerprint_inputs(steps_per_queue=STEPS_PER_QUEUE, run_name="two_queues")
            start = len(recorder.events)
            with torch.inference_mode():
                out = train_node().execute(objects["model"], cache[0], config, STEPS_PER_QUEUE, "two_queues")
            queues.append({"out": out, "events": [d for _, d in recorder.events[start:]], "fingerprint": fingerprint})
    finally:
        server.PromptServer.instance = previous
    return {"queues": queues, "before": before, "after": probe_output(objects["model"]),
            "run_dir": run_folder("two_queues"), "saved_step": saved_step(run_folder("two_queues"))}


# ---- schema and docs -------------------------------------------------------------------------------------------


def test_schemas_follow_the_contract(comfy_home):
    from ltx2_av_trainer.nodes.extension import DOCS_DIR, LTX2AVTrainerExtension
    from ltx2_av_trainer.nodes.types import CATEGORY

    nodes = asyncio.run(LTX2AVTrainerExtension().get_node_list())
    schemas = {node.GET_SCHEMA().node_id: node.GET_SCHEMA() for node in nodes}
    assert set(schemas) == set(CONTRACT) | {"LTX2AV_TrainingConfig"}
    for node_id, schema in schemas.items():
        assert schema.category.startswith(CATEGORY + "/") and schema.description, node_id
        assert all(i.tooltip for i in schema.inputs), f"{node_id}: an input has no tooltip"
        assert (DOCS_DIR / f"{node_id}.md").read_text(encoding="utf-8").startswith("# "), node_id
        if node_id in CONTRACT:
            inputs, outputs = CONTRACT[node_id]
            assert [i.id for i in schema.inputs] == inputs, node_id
            assert [o.id for o in schema.outputs] == outputs, node_id
            assert [o.io_type for o in schema.outputs] == [OUTPUT_TYPES[o] for o in outputs], node_id
    optional = {(n, i.id) for n, s in schemas.items() for i in s.inputs if i.optional}
    assert optional == {("LTX2AV_VerifyLoRAKeys", "lora"), ("LTX2AV_VerifyLoRAKeys", "lora_name"),
                        ("LTX2AV_SampleAV", "lora"), ("LTX2AV_SampleAV", "lora_name"),
                        ("LTX2AV_SampleAV", "negative_prompt"), ("LTX2AV_SampleAV", "sampler_name"),
                        ("LTX2AV_SampleAV", "lora_strength"), ("LTX2AV_SampleAV", "frame_rate"), ("LTX2AV_SampleAV", "first_frame"),
                        ("LTX2AV_SampleAV", "guide_video"), ("LTX2AV_SampleAV", "reference_audio"), ("LTX2AV_TrainLoRA", "vae"),
                        ("LTX2AV_TrainLoRA", "audio_vae"), ("LTX2AV_TrainLoRA", "clip"), ("LTX2AV_VoiceScore", "cache"),
                        ("LTX2AV_VoiceScore", "reference_file"), ("LTX2AV_ConvertLoRA", "lora_name"),
                        ("LTX2AV_ConvertLoRA", "lora"), ("LTX2AV_ConvertLoRA", "model")} | {
                            ("LTX2AV_LoadDataset", name) for name in MODE_REFERENCE_INPUTS}
    assert schemas["LTX2AV_TrainLoRA"].inputs[3].default == 100


def test_help_pages_are_served_where_the_frontend_looks(comfy_home, tmp_path):
    """The frontend fetches /extensions/<pack folder>/docs/<node id>.md; the pack's js/ folder is served at
    /extensions/<pack folder>. Both routes as ComfyUI's server adds them (ours first), on a real aiohttp app."""
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from ltx2_av_trainer.nodes.extension import add_docs_route

    (tmp_path / "chart.js").write_text("// js", encoding="utf-8")

    async def fetch() -> list[tuple[int, str]]:
        routes = web.RouteTableDef()
        add_docs_route(routes, "my-pack")
        routes.static("/extensions/my-pack", str(tmp_path))
        app = web.Application()
        app.add_routes(routes)
        async with TestClient(TestServer(app)) as client:
            results = []
            for url in ("/extensions/my-pack/docs/LTX2AV_TrainLoRA.md", "/extensions/my-pack/chart.js",
                        "/extensions/my-pack/docs/../../../etc/passwd"):
                response = await client.get(url)
                results.append((response.status, await response.text()))
            return results

    (docs_status, docs), (js_status, js), (escape_status, _) = asyncio.run(fetch())
    assert docs_status == 200 and docs.startswith("# LTX2AV Train LoRA")
    assert js_status == 200 and js == "// js"
    assert escape_status in (403, 404)


def test_training_config_schema_follows_the_widget_list(comfy_home):
    """The node declares TRAINING_CONFIG_WIDGETS in that order (saved workflows depend on it), the shown ones
    first, every number with the trainer's range, no JSON text; the default node gives the default config."""
    from comfy_api.latest import io

    from ltx2_av_trainer.nodes.config_widgets import TRAINING_CONFIG_WIDGETS, training_widgets
    from ltx2_av_trainer.nodes.train_nodes import TrainingConfig

    inputs = TrainingConfig.GET_SCHEMA().inputs
    assert [i.id for i in inputs] == [d.name for d in TRAINING_CONFIG_WIDGETS]
    assert [bool(i.advanced) for i in inputs] == [d.advanced for d in TRAINING_CONFIG_WIDGETS]
    for spec, widget in zip(training_widgets(), inputs):
        if isinstance(widget, (io.Int.Input, io.Float.Input)):
            assert (widget.min, widget.max) == (spec.definition.min, spec.definition.max), spec.name
        if isinstance(widget, io.String.Input):
            assert not str(widget.default).lstrip().startswith("["), f"{spec.name} still looks like JSON"
    assert not any(i.id.startswith("memory_") for i in inputs)
    assert training_config(network_rank=32, network_alpha=32.0, optimizer_lr=1e-4, train_steps=2000,
                           train_mixed_precision="bf16", output_save_every=250) == Config().to_dict()


def test_train_lora_refuses_headless_memory_options(objects, cache):
    from ltx2_av_trainer.nodes.train_nodes import run_config, run_folder

    config = Config.from_dict(training_config()).replace(**{"memory.quantization": "nf4"}).to_dict()
    with pytest.raises(ConfigError, match="memory.quantization: headless options that ComfyUI decides"):
        run_config(config, cache[0], run_folder("headless"), "headless", objects["model"])


# ---- data ------------------------------------------------------------------------------------------------------


def test_load_dataset_names_what_is_wrong(comfy_home):
    from ltx2_av_trainer.nodes.data_nodes import LoadDataset

    with pytest.raises(ValueError, match="no_such_folder does not exist"):
        LoadDataset.execute("no_such_folder", "ohwx", ".txt", "", 25.0, 9, 64, 64, True, 0.0, "video", 1)
    with pytest.raises(ConfigError, match="dataset.frames"):
        LoadDataset.execute("clips", "ohwx", ".txt", "", 25.0, 10, 64, 64, True, 0.0, "video", 1)


def test_doctor_reports_and_plays_what_the_cache_will_encode(comfy_home, dataset):
    from ltx2_av_trainer.nodes.data_nodes import DatasetDoctor, ExtractAudio

    with torch.inference_mode():
        report, report_json, audio = DatasetDoctor.execute(dataset, True, 1).args
    items = json.loads(report_json)["items"]
    assert len(items) == CLIPS and all(item["ok"] and item["has_audio"] for item in items)
    assert all(Path(item["path"]).name in report for item in items)
    assert f"listen_index 1: {items[1]['path']}" in report
    assert audio["sample_rate"] == 16000 and audio["waveform"].shape == (1, 2, FRAMES * 16000 // 25)
    assert audio["waveform"].abs().max() > 0.01  # the synthesised voice, not silence
    with pytest.raises(ValueError, match=f"listen_index {CLIPS} is out of range"):
        DatasetDoctor.execute(dataset, False, CLIPS)

    source = ExtractAudio.execute(items[0]["path"], 0).args[0]
    assert source["waveform"].shape[:2] == (1, 2) and source["sample_rate"] == 48000
    assert abs(source["waveform"].shape[2] / 48000 - 0.8) < 0.05
    with pytest.raises(ValueError, match="audio_stream=1 does not exist"):
        ExtractAudio.execute(items[0]["path"], 1)


def test_cache_holds_the_audio_posterior_mean_and_is_reused(comfy_home, objects, dataset, cache):
    """The cached audio latent is ComfyUI's audio VAE posterior MEAN, normalised, in float32 (computed here
    from ComfyUI's own components); a second queue reuses every entry."""

    from ltx2_av_trainer.nodes.data_nodes import CacheLatents, dataset_config
    from ltx2_av_trainer.trainer.data.cache import load_entry, manifest_entries
    from ltx2_av_trainer.trainer.data.dataset import enumerate_dataset
    from ltx2_av_trainer.trainer.data.cache import prepare_for_cache

    payload, summary = cache
    assert summary.splitlines()[0] == f"Audio latent caching: {CLIPS} encoded, 0 failed"
    assert payload["summary"]["video_encoded"] == CLIPS and len(payload["summary"]["previews"]) == CLIPS
    entries = manifest_entries(payload["cache_dir"])
    assert len(entries) == CLIPS and all(e.has_audio for e in entries)

    config = dataset_config(dataset)
    item = next(i for i in enumerate_dataset(config.dataset) if str(i.media_path) == entries[0].media)
    waveform = prepare_for_cache(item, config).audio[None]
    audio_vae = objects["audio_vae"].first_stage_model
    with torch.no_grad():
        mel = audio_vae.preprocessor.waveform_to_mel(waveform, 16000, device="cpu")
        mean, logvar = audio_vae.autoencoder.encode(mel).chunk(2, dim=1)
        expected = audio_vae.normalizer.normalize(mean)
    cached = load_entry(payload["cache_dir"], entries[0]).audio
    assert cached.dtype == torch.float32 and logvar.exp().min() > 0
    torch.testing.assert_close(cached, expected[0], rtol=1e-5, atol=1e-5)

    with torch.inference_mode():
        again, text = CacheLatents.execute(dataset, objects["model"], objects["vae"], objects["audio_vae"],
                                           objects["clip"], "tiny_cache", False).args
    assert again["summary"]["reused"] == CLIPS and again["summary"]["video_encoded"] == 0
    with pytest.raises(ValueError, match="cache_name '../elsewhere' must be a plain name"):
        CacheLatents.execute(dataset, objects["model"], objects["vae"], objects["audio_vae"], objects["clip"],
                             "../elsewhere", False)


def test_preview_cached_audio_decodes_the_entry(objects, cache):
    from ltx2_av_trainer.nodes.data_nodes import PreviewCachedAudio
    from ltx2_av_trainer.trainer.data.cache import manifest_entries

    with torch.inference_mode():
        audio = PreviewCachedAudio.execute(cache[0], 0, objects["audio_vae"]).args[0]
    entry = manifest_entries(cache[0]["cache_dir"])[0]
    decoded = (4 * entry.audio_shape[1] - 3) * 240  # T latents → 4T-3 mel frames → 240 samples each
    assert audio["sample_rate"] == 24000
    assert audio["waveform"].shape == (1, 2, min(decoded, round(entry.audio_valid_frames / 25 * 24000)))
    assert torch.isfinite(audio["waveform"]).all()
    with pytest.raises(ValueError, match=f"index {CLIPS} is out of range"):
        PreviewCachedAudio.execute(cache[0], CLIPS, objects["audio_vae"])


def test_text_encoder_and_connectors_of_ltx23_give_the_stream_widths(comfy_home, tmp_path):
    """LTX-2.3: the dual video/audio projection, then the MODEL's connectors, give the context widths the
    2.3 denoiser checks."""
    import comfy.sd
    import comfy_model_fixtures as fixtures
    from comfy_fixtures import write_tiny_ltxav_checkpoint

    from ltx2_av_trainer.trainer.backends.comfyui.denoiser import context_widths, ltxav_diffusion_model
    from ltx2_av_trainer.trainer.backends.comfyui.encoders import encode_prompt

    with torch.inference_mode():
        model = comfy.sd.load_diffusion_model(str(write_tiny_ltxav_checkpoint(tmp_path, "2.3", TINY)))
        clip = fixtures.load_text_encoder(fixtures.write_tiny_text_encoder(tmp_path, "2.3", TINY), "2.3", TINY)
        text = encode_prompt(clip, model, "ohwx, a person speaks")
    video_width, audio_width = context_widths(ltxav_diffusion_model(model))
    assert (video_width, audio_width) == (32, 16)
    assert text.video.shape == (1, 1024, video_width) and text.audio.shape == (1, 1024, audio_width)


# ---- training --------------------------------------------------------------------------------------------------


def test_two_queues_continue_one_run_and_leave_the_model_unchanged(trained):
    first, second = trained["queues"]
    lora, history_json = first["out"].args
    assert lora["step"] == STEPS_PER_QUEUE and Path(lora["path"]).is_file()
    assert lora["groups"] == ["a2v", "audio_attn", "v2a", "video_attn"]
    assert [e["step"] for e in first["events"]] == [1, 2]
    assert [e["step"] for e in second["events"]] == [3, 4]  # the second queue starts where the first stopped
    for event in first["events"] + second["events"]:
        assert set(event) == EVENT_KEYS and event["node"] == NODE_ID and event["total"] == TOTAL_STEPS
        assert event["loss_audio"] is not None and event["eta_s"] >= 0
    assert len(json.loads(history_json)) == STEPS_PER_QUEUE
    assert first["out"].ui["ltx2av_history"] == first["events"]
    # After the second queue the node's ui holds the whole run, for the chart after a page reload.
    assert second["out"].ui["ltx2av_history"] == first["events"] + second["events"]
    assert second["out"].args[0]["step"] == TOTAL_STEPS and trained["saved_step"] == TOTAL_STEPS
    assert first["fingerprint"] != second["fingerprint"]  # ComfyUI re-executes the node on the next queue
    assert [r["step"] for r in json.loads(second["out"].args[1])] == [1, 2, 3, 4]
    # The adapter is gone and the base weights are as loaded: the MODEL predicts exactly as before.
    torch.testing.assert_close(trained["after"], trained["before"], rtol=0, atol=0)


def test_cancel_leaves_resumable_state_and_the_next_queue_resumes(objects, cache, events):
    import comfy.model_management as mm
    import comfy.utils

    from ltx2_av_trainer.nodes.train_nodes import run_folder, saved_step

    config = training_config(train_steps=6)
    cancelled_at = []

    def progress_hook(value, total, preview, node_id=None):
        # What Cancel does in ComfyUI: the interrupt flag is set, and the progress hook raises it.
        if value >= 2 and not cancelled_at:
            cancelled_at.append(value)
            mm.interrupt_current_processing(True)
        mm.throw_exception_if_processing_interrupted()

    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(progress_hook)
    try:
        with torch.inference_mode(), pytest.raises(mm.InterruptProcessingException):
            train_node().execute(objects["model"], cache[0], config, 4, "cancelled")
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
    # The hook is throttled (100 ms); on a fast machine it may first see a later step.
    stopped = cancelled_at[0]
    assert 2 <= stopped < 4 and events.steps() == list(range(1, stopped + 1))
    assert saved_step(run_folder("cancelled")) == stopped  # the state of the step that was running is saved

    with torch.inference_mode():
        lora, _ = train_node().execute(objects["model"], cache[0], config, 4, "cancelled").args
    assert events.steps() == list(range(1, stopped + 1)) + list(range(stopped + 1, 7)) and lora["step"] == 6
    # Bit for bit the run that was never cancelled.
    with torch.inference_mode():
        straight, _ = train_node().execute(objects["model"], cache[0], config, 6, "never_cancelled").args
    _assert_same_lora(lora["path"], straight["path"])


def _assert_same_lora(path_a, path_b):
    from safetensors.torch import load_file

    a, b = load_file(str(path_a)), load_file(str(path_b))
    assert set(a) == set(b)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)}/{len(a)} tensors differ, e.g. {different[:3]}"


def test_cancel_inside_an_op_keeps_the_last_completed_step_and_resumes_bit_for_bit(objects, cache, events):
    """ComfyUI's ops check the interrupt flag on every call: Cancel can land in the middle of a forward."""
    import comfy.model_management as mm

    from ltx2_av_trainer.nodes.train_nodes import run_folder, saved_step
    from ltx2_av_trainer.trainer.backends.comfyui.denoiser import ltxav_diffusion_model

    config = training_config(train_steps=6)
    block = ltxav_diffusion_model(objects["model"]).transformer_blocks[0]
    calls = []

    def op_checks_the_flag(module, args):
        calls.append(1)
        if len(events.steps()) == 3 and len(calls) > 1:  # inside the forward of step 4
            mm.interrupt_current_processing(True)
        mm.throw_exception_if_processing_interrupted()

    handle = block.register_forward_pre_hook(op_checks_the_flag)
    try:
        with torch.inference_mode(), pytest.raises(mm.InterruptProcessingException):
            train_node().execute(objects["model"], cache[0], config, 6, "cancelled_in_op")
    finally:
        handle.remove()
    assert saved_step(run_folder("cancelled_in_op")) == 3  # the last completed step, not the half of step 4
    with torch.inference_mode():
        lora, _ = train_node().execute(objects["model"], cache[0], config, 6, "cancelled_in_op").args
        straight, _ = train_node().execute(objects["model"], cache[0], config, 6, "never_cancelled_op").args
    assert lora["step"] == 6
    _assert_same_lora(lora["path"], straight["path"])


def test_a_changed_run_is_refused_with_the_comfyui_fix(objects, cache, trained):
    with torch.inference_mode(), pytest.raises(Exception, match="use a new run_name"):
        train_node().execute(objects["model"], cache[0], training_config(network_rank=8, train_steps=6), 2, "two_queues")


def test_silence_and_blank_prompt_train_with_the_encoder_inputs_and_name_them_without(objects, mixed_cache, events):
    from ltx2_av_trainer.nodes.train_nodes import run_folder, saved_step

    config = training_config(train_steps=4, audio_missing_audio="silence", preservation_blank=True)
    with torch.inference_mode(), pytest.raises(ConfigError) as missing:
        train_node().execute(objects["model"], mixed_cache, config, 4, "silence_without_encoders")
    assert "audio.missing_audio" in str(missing.value) and "connect the vae" in str(missing.value)
    assert "audio_vae" in str(missing.value) and "clip" in str(missing.value)
    assert saved_step(run_folder("silence_without_encoders")) == 0 and events.steps() == []
    with torch.inference_mode(), pytest.raises(ConfigError, match="audio_vae, clip not connected"):
        train_node().execute(objects["model"], mixed_cache, config, 4, "silence_partial", vae=objects["vae"])
    with torch.inference_mode(), pytest.raises(ConfigError, match="sample_every_steps = 2 needs the encoders.*connect the vae"):
        train_node().execute(objects["model"], mixed_cache, training_config(validation_sample_every_steps=2), 4,
                             "validation_without_encoders")

    with torch.inference_mode():
        lora, history_json = train_node().execute(objects["model"], mixed_cache, config, 4, "silence_with_encoders",
                                                  vae=objects["vae"], audio_vae=objects["audio_vae"],
                                                  clip=objects["clip"]).args
    rows = json.loads(history_json)
    assert lora["step"] == 4 and [r["step"] for r in rows] == [1, 2, 3, 4]
    # Every step trains the blank-prompt preservation; the steps that drew the audio-free clip train the silence
    # target, and their chart events carry the regulariser and its loss.
    assert all(r["loss_blank"] is not None and math.isfinite(r["loss_blank"]) for r in rows)
    silent_steps = [r["step"] for r in rows if r["regularizer"] == "silence"]
    assert silent_steps and len(silent_steps) < len(rows)
    sent = [data for event, data in events.events if event == "ltx2av.train"]
    for row, point in zip(rows, sent):
        if row["regularizer"] is None:
            assert set(point) == EVENT_KEYS
        else:
            assert set(point) == EVENT_KEYS | {"regularizer", "loss_regularizer"}
            assert point["regularizer"] == "silence" and point["loss_regularizer"] == row["loss_regularizer"] > 0


def test_chart_events_carry_the_held_out_losses_when_the_row_has_them(comfy_home):
    from ltx2_av_trainer.nodes.chart import chart_history

    base = {"loss_video": 0.5, "loss_audio": 0.4, "audio_weight": 1.0, "step_time_s": 2.0, "regularizer": None,
            "loss_regularizer": None, "val_loss_video": None, "val_loss_audio": None}
    rows = [dict(base, step=1), dict(base, step=2, val_loss_video=0.3, val_loss_audio=0.2),
            dict(base, step=3, val_voice_score_lora=0.81, val_voice_score_base=0.62, val_audio_loss_fixed_sigma=0.4)]
    first, second, third = chart_history(NODE_ID, rows, total=4)
    assert set(first) == EVENT_KEYS and second["eta_s"] == 2 * 2.0
    assert (second["val_loss_video"], second["val_loss_audio"]) == (0.3, 0.2)
    assert (third["val_voice_score_lora"], third["val_voice_score_base"]) == (0.81, 0.62)  # the status line shows them


# ---- save, verify, sample ----------------------------------------------------------------------------------------


def test_saved_lora_loads_with_comfyui_key_map(comfy_home, objects, trained):
    import comfy.lora
    import comfy.utils

    from ltx2_av_trainer.nodes.check_nodes import VerifyLoRAKeys
    from ltx2_av_trainer.nodes.train_nodes import SaveLoRA

    lora = trained["queues"][1]["out"].args[0]
    path = Path(SaveLoRA.execute(lora, "character_av").args[0])
    assert path == comfy_home["loras"] / "character_av.safetensors" and path.read_bytes() == Path(lora["path"]).read_bytes()
    for bad in ("../x", "sub/x", "..", ""):
        with pytest.raises(ValueError, match="filename"):
            SaveLoRA.execute(lora, bad)
    assert not (comfy_home["output"].parent / "x.safetensors").exists()

    # ComfyUI's loader itself: every module of the file becomes a patch on the MODEL.
    sd = comfy.utils.load_torch_file(str(path), safe_load=True)
    patches = comfy.lora.load_lora(sd, comfy.lora.model_lora_keys_unet(objects["model"].model, {}), log_missing=False)
    assert len(objects["model"].clone().add_patches(patches)) == len(sd) // 2  # lora_A, lora_B per module

    with torch.inference_mode():
        by_socket = VerifyLoRAKeys.execute(objects["model"], lora, None)
        by_name = VerifyLoRAKeys.execute(objects["model"], None, "character_av.safetensors")
    for result in (by_socket, by_name):
        report, ok = result.args
        assert ok and "0 keys not loaded" in report
        assert "video_attn=16, audio_attn=16, a2v=8, v2a=8, video_ff=0, audio_ff=0" in report
    with pytest.raises(ValueError, match="not both"):
        VerifyLoRAKeys.execute(objects["model"], lora, "character_av.safetensors")
    with pytest.raises(ValueError, match="no LoRA"):
        VerifyLoRAKeys.execute(objects["model"], None, "(none)")


def test_verify_names_unloaded_keys_and_refuses_missing_trained_groups(comfy_home, objects, trained):
    from ltx2_av_trainer.nodes.check_nodes import VerifyLoRAKeys
    from ltx2_av_trainer.trainer.adapters.files import METADATA_PREFIX
    from ltx2_av_trainer.trainer.adapters.files import read_adapter_file
    from ltx2_av_trainer.trainer.io_utils import save_safetensors_atomic

    tensors, metadata = read_adapter_file(trained["queues"][1]["out"].args[0]["path"])
    foreign = dict(tensors)
    foreign["transformer.transformer_blocks.0.attn1.to_q.lora_A.weight"] = torch.zeros(4, 32)  # diffusers naming
    save_safetensors_atomic(foreign, comfy_home["loras"] / "foreign.safetensors", metadata=metadata)
    report, ok = VerifyLoRAKeys.execute(objects["model"], None, "foreign.safetensors").args
    assert not ok and "transformer.transformer_blocks.0.attn1.to_q.lora_A.weight" in report

    # Every key lands, but one module's up matrix ([out, rank]) is two rows too tall for its layer.
    misshapen = dict(tensors)
    key = next(k for k, t in tensors.items() if ".transformer_blocks.0.attn1.to_q." in k and t.ndim == 2 and t.shape[0] > t.shape[1])
    misshapen[key] = torch.zeros(tensors[key].shape[0] + 2, tensors[key].shape[1])
    save_safetensors_atomic(misshapen, comfy_home["loras"] / "misshapen.safetensors", metadata=metadata)
    report, ok = VerifyLoRAKeys.execute(objects["model"], None, "misshapen.safetensors").args
    assert not ok and "0 keys not loaded" in report and "wrong shape: transformer_blocks.0.attn1.to_q:" in report

    audio_dropped = {k: v for k, v in tensors.items() if ".audio_attn" not in k}
    save_safetensors_atomic(audio_dropped, comfy_home["loras"] / "no_audio.safetensors", metadata=metadata)
    assert "audio_attn" in metadata[METADATA_PREFIX + "groups"]
    with pytest.raises(ValueError, match="trained audio_attn but ComfyUI applies nothing there"):
        VerifyLoRAKeys.execute(objects["model"], None, "no_audio.safetensors")


def test_sample_ab_with_and_without_the_lora(objects, trained):
    """Sample A/B samples through ComfyUI's own sampling: the LoRA side equals the same core-node generation on
    the MODEL with the LoRA loaded as LoraLoaderModelOnly loads it (the server test builds that graph from core
    nodes); the MODEL itself is left as it was."""
    from ltx2_av_trainer.nodes.check_nodes import SampleAV
    from ltx2_av_trainer.trainer.backends.comfyui.sampling import GenerationRequest, generate, with_lora

    lora = trained["queues"][1]["out"].args[0]
    weights_before = {k: v.clone() for k, v in objects["model"].model.state_dict().items()}
    with torch.inference_mode():
        request = GenerationRequest("ohwx, a person speaks", seed=5, steps=3, frames=FRAMES, width=SIZE, height=SIZE,
                                    guidance=3.0)
        expected_video, expected_audio = generate(with_lora(objects["model"], Path(lora["path"])), objects["clip"],
                                                  objects["vae"], objects["audio_vae"], request)
        # Its base sample comes last: ComfyUI takes a LoRA's patch off the MODEL when the MODEL is loaded without it.
        video_lora, audio_lora, video_base, audio_base = SampleAV.execute(
            objects["model"], objects["clip"], objects["vae"], objects["audio_vae"], "ohwx, a person speaks", 5, 3,
            FRAMES, SIZE, SIZE, 3.0, lora, "(none)").args
    assert video_lora.shape == video_base.shape == (FRAMES, SIZE, SIZE, 3)
    assert torch.equal(video_lora, expected_video) and torch.equal(audio_lora["waveform"], expected_audio["waveform"])
    for audio in (audio_lora, audio_base):
        assert audio["sample_rate"] == 24000 and audio["waveform"].shape[:2] == (1, 2)
    assert not torch.equal(video_lora, video_base) and not torch.equal(audio_lora["waveform"], audio_base["waveform"])
    # The LoRA went on a clone: the MODEL's weights are exactly as before.
    for key, value in objects["model"].model.state_dict().items():
        assert torch.equal(value, weights_before[key]), key
    with pytest.raises(ValueError, match="frames must be 8n\\+1"):
        SampleAV.execute(objects["model"], objects["clip"], objects["vae"], objects["audio_vae"], "x", 0, 1, 10, SIZE,
                         SIZE, 1.0, lora, "(none)")


def core_node_generation(model, clip, vae, audio_vae, lora_path: Path, prompt: str, seed: int, steps: int, cfg: float,
                         reference: str, value):
    """What a user's graph of ComfyUI core nodes gives for a LoRA trained in a mode, written out node by node as in
    ComfyUI's LTX-2 templates (LoraLoaderModelOnly, CLIPTextEncode, LTXVConditioning, the mode's reference node,
    LTXVEmptyLatentAudio, LTXVConcatAVLatent, LTXVScheduler, CFGGuider, SamplerCustomAdvanced, decoders)."""
    import nodes
    from comfy_extras import nodes_custom_sampler as cs
    from comfy_extras import nodes_lt as lt
    from comfy_extras.nodes_lt_audio import LTXVAudioVAEDecode, LTXVEmptyLatentAudio

    model = nodes.LoraLoaderModelOnly().load_lora_model_only(model, lora_path.name, 1.0)[0]
    positive = nodes.CLIPTextEncode().encode(clip, prompt)[0]
    negative = nodes.CLIPTextEncode().encode(clip, DEFAULT_NEGATIVE)[0]
    positive, negative = lt.LTXVConditioning.execute(positive, negative, 25.0).args
    if reference == "first_frame":
        positive, negative, video = lt.LTXVImgToVideo.execute(positive, negative, value, vae, SIZE, SIZE, FRAMES, 1,
                                                              1.0).args
    else:
        video = lt.EmptyLTXVLatentVideo.execute(SIZE, SIZE, FRAMES, 1).args[0]
    if reference == "guide_video":
        parameters = lt.GetICLoRAParameters.execute(model).args[0]
        positive, negative, video = lt.LTXVAddGuide.execute(positive, negative, vae, video, value, 0, 1.0,
                                                            iclora_parameters=parameters).args
    if reference == "reference_audio":
        model, positive, negative = lt.LTXVReferenceAudio.execute(model, positive, negative, value, audio_vae, 3.0, 0.0,
                                                                  1.0).args
    audio = LTXVEmptyLatentAudio.execute(FRAMES, 25.0, 1, audio_vae).args[0]
    latent = lt.LTXVConcatAVLatent.execute(video, audio).args[0]
    sigmas = lt.LTXVScheduler.execute(steps, 2.05, 0.95, True, 0.1, latent=latent).args[0]
    guider = cs.CFGGuider.execute(model, positive, negative, cfg).args[0]
    out = cs.SamplerCustomAdvanced.execute(cs.RandomNoise.execute(seed).args[0], guider,
                                           cs.KSamplerSelect.execute("euler_ancestral").args[0], sigmas, latent).args[0]
    video, audio = lt.LTXVSeparateAVLatent.execute(out).args
    if reference == "guide_video":
        video = lt.LTXVCropGuides.execute(positive, negative, video).args[2]
    return nodes.VAEDecode().decode(vae, video)[0], LTXVAudioVAEDecode.execute(audio, audio_vae).args[0]


@pytest.mark.parametrize("reference", ["first_frame", "guide_video", "reference_audio"])
def test_sample_ab_with_a_training_modes_reference_equals_the_core_node_graph(objects, trained, comfy_home, reference):
    """Sample A/B with a first frame, an IC-LoRA guide video or an ID-LoRA reference voice gives, on its LoRA side,
    exactly what the core-node graph of that mode gives; and the reference changes the result."""
    import shutil

    from ltx2_av_trainer.nodes.check_nodes import SampleAV

    lora = trained["queues"][1]["out"].args[0]
    shutil.copyfile(lora["path"], comfy_home["loras"] / "modes_ab.safetensors")
    generator = torch.Generator().manual_seed(3)
    value = {"first_frame": lambda: torch.rand(1, SIZE, SIZE, 3, generator=generator),
             "guide_video": lambda: torch.rand(FRAMES, SIZE, SIZE, 3, generator=generator),
             "reference_audio": lambda: {"waveform": 0.1 * torch.randn(1, 2, 16000, generator=generator),
                                         "sample_rate": 16000}}[reference]()
    parts = (objects["model"], objects["clip"], objects["vae"], objects["audio_vae"])
    with torch.inference_mode():
        expected_video, expected_audio = core_node_generation(*parts, comfy_home["loras"] / "modes_ab.safetensors",
                                                              "ohwx, a person speaks", 5, 2, 3.0, reference, value)
        with_reference = SampleAV.execute(*parts, "ohwx, a person speaks", 5, 2, FRAMES, SIZE, SIZE, 3.0, lora, "(none)",
                                          **{reference: value}).args
        without = SampleAV.execute(*parts, "ohwx, a person speaks", 5, 2, FRAMES, SIZE, SIZE, 3.0, lora, "(none)").args
    video_lora, audio_lora = with_reference[0], with_reference[1]
    assert video_lora.shape == expected_video.shape == (FRAMES, SIZE, SIZE, 3)
    assert torch.equal(video_lora, expected_video), reference
    assert torch.equal(audio_lora["waveform"], expected_audio["waveform"]), reference
    changed = not torch.equal(video_lora, without[0]) or not torch.equal(audio_lora["waveform"], without[1]["waveform"])
    assert changed, f"{reference} did not change the generation"


def test_save_lora_never_replaces_another_lora_unless_asked(comfy_home, trained):
    from ltx2_av_trainer.nodes.train_nodes import SaveLoRA

    first, second = (trained["queues"][i]["out"].args[0] for i in (0, 1))
    folder = comfy_home["loras"]
    assert Path(SaveLoRA.execute(first, "counted").args[0]) == folder / "counted.safetensors"
    again = SaveLoRA.execute(first, "counted")  # the same LoRA again: nothing new is written
    assert Path(again.args[0]) == folder / "counted.safetensors" and "already holds" in again.ui["text"][0]
    assert Path(SaveLoRA.execute(second, "counted").args[0]) == folder / "counted_00001.safetensors"
    assert (folder / "counted.safetensors").read_bytes() == Path(first["path"]).read_bytes()
    assert (folder / "counted_00001.safetensors").read_bytes() == Path(second["path"]).read_bytes()
    replaced = SaveLoRA.execute(second, "counted", True)
    assert Path(replaced.args[0]) == folder / "counted.safetensors"
    assert (folder / "counted.safetensors").read_bytes() == Path(second["path"]).read_bytes()
    assert sorted(p.name for p in folder.glob("counted*")) == ["counted.safetensors", "counted_00001.safetensors"]


def test_progress_bar_follows_the_queue_and_a_finished_run_says_so(objects, cache, events):
    import comfy.utils

    seen = []
    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: seen.append((value, total)))
    config = training_config(train_steps=5)
    try:
        statuses = []
        for _ in range(3):  # 3 + 2 steps, then nothing left to train
            seen.clear()
            with torch.inference_mode():
                out = train_node().execute(objects["model"], cache[0], config, 3, "per_queue")
            statuses.append((list(seen), out.ui["ltx2av_status"][0]))
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
    (first, first_text), (second, second_text), (third, third_text) = statuses
    assert first[-1] == (3, 3) and {total for _, total in first} == {3}
    assert second[-1] == (2, 2) and {total for _, total in second} == {2}  # the queue's own steps, not 5
    assert "trained steps 1-3 (3 of 5)" in first_text and "run is complete (5 of 5 steps)" in second_text
    assert "already trained 5 of 5 steps" in third_text and "Raise train_steps" in third_text
    assert events.steps() == [1, 2, 3, 4, 5]


def test_nodes_read_only_inside_the_input_folder_unless_the_server_allows_more(comfy_home, dataset, tmp_path, monkeypatch):
    from ltx2_av_trainer.nodes.data_nodes import ExtractAudio, LoadDataset
    from ltx2_av_trainer.nodes.score_nodes import VoiceScore
    from ltx2_av_trainer.nodes.types import DATASET_ROOTS_ENV
    from ltx2_av_trainer.trainer.data.synth import make_demo_dataset

    monkeypatch.delenv(DATASET_ROOTS_ENV, raising=False)
    elsewhere = tmp_path / "elsewhere"
    clip = make_demo_dataset(elsewhere, clips_per_speaker=1, seconds=0.8, width=SIZE, height=SIZE)[0]
    args = ("ohwx", ".txt", "", 25.0, FRAMES, SIZE, SIZE, True, 0.0, "video", 1)
    for given in (str(elsewhere), "../" + elsewhere.name, f"clips/../../{elsewhere.parent.name}/elsewhere"):
        with pytest.raises(ValueError, match=f"outside the folders ComfyUI nodes may read.*{DATASET_ROOTS_ENV}"):
            LoadDataset.execute(given, *args)
    with pytest.raises(ValueError, match="outside the folders"):
        ExtractAudio.execute(str(clip), 0)
    with pytest.raises(ValueError, match="outside the folders"):
        VoiceScore.execute({"waveform": torch.zeros(1, 1, 16000), "sample_rate": 16000}, None, str(clip))
    # A JSONL inside the input folder may not name media elsewhere.
    listing = comfy_home["input"] / "escape.jsonl"
    listing.write_text(json.dumps({"media": str(clip), "caption": "a person"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="the media of item 0:.*outside the folders"):
        LoadDataset.execute("escape.jsonl", "ohwx", ".txt", "", 25.0, FRAMES, SIZE, SIZE, True, 0.0, "jsonl", 1)

    # The server's owner allows the folder (an environment variable of the ComfyUI process).
    monkeypatch.setenv(DATASET_ROOTS_ENV, f"/nonexistent{os.pathsep}{elsewhere}")
    assert LoadDataset.execute(str(elsewhere), *args).args[0]["sources"][0]["path"] == str(elsewhere)
    assert ExtractAudio.execute(str(clip), 0).args[0]["sample_rate"] == 48000


def test_load_dataset_signature_follows_the_folder_content(comfy_home):
    """ComfyUI re-executes Load Dataset (and every node after it) when fingerprint_inputs changes: it must change
    with a new clip or an edited caption, and stay the same when nothing changed."""
    import shutil

    from ltx2_av_trainer.nodes.data_nodes import LoadDataset
    from ltx2_av_trainer.trainer.data.synth import make_demo_dataset

    folder = comfy_home["input"] / "growing"
    make_demo_dataset(folder, clips_per_speaker=1, seconds=0.8, width=SIZE, height=SIZE)
    widgets = dict(folder="growing", trigger="ohwx", caption_extension=".txt", audio_dir="", target_fps=25.0,
                   frames=FRAMES, width=SIZE, height=SIZE, with_audio=True, validation_split=0.0, kind="video",
                   repeats=1, frame_buckets="")
    first = LoadDataset.fingerprint_inputs(**widgets)
    assert LoadDataset.fingerprint_inputs(**widgets) == first
    clip = next(folder.glob("*.mp4"))
    shutil.copy(clip, folder / "added.mp4")
    shutil.copy(clip.with_suffix(".txt"), folder / "added.txt")
    added = LoadDataset.fingerprint_inputs(**widgets)
    assert added != first
    (folder / "added.txt").write_text("a different caption\n", encoding="utf-8")
    assert LoadDataset.fingerprint_inputs(**widgets) != added
    assert LoadDataset.fingerprint_inputs(**(widgets | {"folder": "/etc"})).startswith("unreadable: folder")
