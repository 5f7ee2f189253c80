"""The Voice Score node (ComfyUI tier): a dataset clip scores close to the dataset voice, another speaker lower."""

import os

import pytest
import torch

pytestmark = pytest.mark.comfyui


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        pytest.skip("COMFYUI_PATH is not set: point it at a ComfyUI checkout to run the ComfyUI tier (make test-comfyui)")
    pytest.importorskip("resemblyzer", reason="the voice score needs `pip install resemblyzer`")
    from ltx2_av_trainer.trainer.backends.comfyui.env import import_model_management
    from ltx2_av_trainer.trainer.config import Config
    from ltx2_av_trainer.trainer.app.pipeline import build_headless_encoders, cache_dataset
    from ltx2_av_trainer.trainer.data.synth import make_demo_dataset

    import_model_management(path)
    root = tmp_path_factory.mktemp("score")
    make_demo_dataset(root / "clips", speakers=1, clips_per_speaker=3, seconds=1.6, width=64, height=64)
    config = Config.from_dict({"dataset": {"sources": [{"path": str(root / "clips")}], "frames": 25, "width": 64, "height": 64},
                               "cache": {"dir": str(root / "cache")}, "train": {"mixed_precision": "fp32", "device": "cpu"}})
    cache_dataset(config, build_headless_encoders(config), quiet=True)
    return {"cache_dir": str(root / "cache")}, root


def _audio(speaker_name: str, seed: int) -> dict:
    from ltx2_av_trainer.trainer.data.synth import speaker, synthesize_voice

    voice = synthesize_voice(speaker(speaker_name), 2.0, sample_rate=48000, seed=seed)
    return {"waveform": torch.from_numpy(voice.audio)[None], "sample_rate": 48000}


def test_voice_score_node_separates_speakers(cache):
    from ltx2_av_trainer.nodes.score_nodes import VoiceScore

    payload, _ = cache
    same = VoiceScore.execute(_audio("deep", seed=11), payload)
    other = VoiceScore.execute(_audio("bright", seed=11), payload)
    assert same.args[0] > other.args[0] + 0.05
    assert "voice score" in same.args[1] and "dataset's own clips" in same.args[1]


def test_voice_score_node_needs_a_reference(cache):
    from ltx2_av_trainer.nodes.score_nodes import VoiceScore

    with pytest.raises(ValueError, match="no reference voice"):
        VoiceScore.execute(_audio("deep", seed=1), None)
    with pytest.raises(ValueError, match="neither .* nor a cache of that name exists"):
        VoiceScore.execute(_audio("deep", seed=1), None, "no_such_reference.json")
    with pytest.raises(ValueError, match="outside the folders ComfyUI nodes may read"):
        VoiceScore.execute(_audio("deep", seed=1), None, "/nonexistent/ref.json")
