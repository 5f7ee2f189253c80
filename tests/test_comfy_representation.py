"""ComfyUI tier: CREPA / Self-Flow on ComfyUI's own LTX-2 model (hooks on its blocks), and a slider LoRA loaded by
ComfyUI's LoRA loader at + and - strength.

Runs with ``COMFYUI_PATH`` pointing at a ComfyUI checkout (``make test-comfyui``); skipped otherwise.
"""

from __future__ import annotations

import json

import pytest
import torch
from latent_fixtures import make_samples, tiny_config
from ltx2_av_trainer.trainer.backends.interface import DenoiserInput, TextContext, video_token_count
from ltx2_av_trainer.trainer.config import TinyModelConfig
from ltx2_av_trainer.trainer.training.loop import Trainer

TINY = TinyModelConfig()
BOTH = {"crepa.enabled": True, "self_flow.enabled": True, "self_flow.temporal_mode": "hybrid", "train.batch_size": 2,
        "output.save_every": 2, "logging.log_every": 1}


@pytest.fixture(scope="module")
def checkpoint(comfy, tmp_path_factory):
    from comfy_fixtures import write_tiny_ltxav_checkpoint

    return write_tiny_ltxav_checkpoint(tmp_path_factory.mktemp("ltxav"), "2.0", TINY)


def _comfy_denoiser(path):
    import comfy.sd
    from ltx2_av_trainer.trainer.backends.comfyui.denoiser import ComfyDenoiser

    with torch.inference_mode():
        patcher = comfy.sd.load_diffusion_model(str(path))
    denoiser = ComfyDenoiser(patcher, "2.0")
    denoiser.load()
    return denoiser


def _diffusers_denoiser(path):
    from comfy_fixtures import diffusers_denoiser_from_comfy_state
    from safetensors.torch import load_file

    return diffusers_denoiser_from_comfy_state(load_file(str(path)), "2.0", TINY)


@pytest.mark.comfyui
def test_block_features_on_comfyui_match_the_diffusers_backend_in_batch_order(checkpoint, tmp_path):
    """Two samples with different σ: ComfyUI's backend runs them as two forwards; the captured block outputs come
    back in batch order and equal the diffusers backend's (same weights) to the backends' known deviation."""
    comfy_denoiser, reference = _comfy_denoiser(checkpoint), _diffusers_denoiser(checkpoint)
    g = torch.Generator().manual_seed(0)
    cfg = tiny_config(tmp_path)
    sample = make_samples(cfg, 1)[0]
    inputs = DenoiserInput(video=torch.randn(2, 128, 2, 4, 4, generator=g), audio=torch.randn(2, 8, 13, 16, generator=g),
                           sigma_video=torch.tensor([0.3, 0.8]), sigma_audio=torch.tensor([0.3, 0.8]),
                           text=TextContext(sample.text.video.expand(2, -1, -1), sample.text.audio.expand(2, -1, -1),
                                            sample.text.mask.expand(2, -1)), fps=25.0)
    tokens = video_token_count(inputs.video)
    captured = {}
    for name, denoiser in (("comfy", comfy_denoiser), ("diffusers", reference)):
        with torch.no_grad(), denoiser.block_features([0, 1], tokens) as features:
            denoiser(inputs)
        captured[name] = [features.video(index, 2) for index in (0, 1)]
        assert denoiser.num_blocks == 2 and captured[name][0].shape == (2, tokens, denoiser.video_width)
    for ours, theirs in zip(captured["comfy"], captured["diffusers"]):
        error = ((ours - theirs).norm() / theirs.norm()).item()
        assert error < 0.05, error  # the recorded ComfyUI-vs-reference deviation band is a few 1e-2 at most
        swapped = ((ours.flip(0) - theirs).norm() / theirs.norm()).item()
        assert swapped > 10 * error  # the rows are in batch order, not in forward order


@pytest.mark.comfyui
@pytest.mark.parametrize("checkpointing", ["block", "model", "none"])
@pytest.mark.parametrize("name", ["crepa", "self_flow"])
def test_gradients_on_comfyui_reach_the_projector_and_the_student_blocks_lora_only(checkpoint, tmp_path, name, checkpointing):
    from test_representation import _perturbed_trainer, check_term_gradients

    denoiser = _comfy_denoiser(checkpoint)
    denoiser.checkpointing = checkpointing
    overrides = {f"{name}.enabled": True, f"{name}.student_block_idx": 0, f"{name}.teacher_block_idx": 1}
    cfg, trainer = _perturbed_trainer(tmp_path, denoiser, **overrides)
    try:
        check_term_gradients(trainer, cfg, name)
    finally:
        trainer.network.detach()


@pytest.mark.comfyui
def test_crepa_and_self_flow_train_on_comfyui_and_resume_bit_for_bit(checkpoint, tmp_path):
    def train(name, until=None, resume=False):
        cfg = tiny_config(tmp_path, **BOTH, **{"train.steps": 4, "output.dir": str(tmp_path / name)})
        denoiser = _comfy_denoiser(checkpoint)
        trainer = Trainer(cfg, denoiser, make_samples(cfg, 4), cfg.output.dir)
        if resume:
            assert trainer.try_resume() == 2
        trainer.run(until_step=until)
        trainer.network.detach()
        return trainer

    straight = train("straight")
    train("split", until=2)
    resumed = train("split", resume=True)
    for a, b in ((straight.network.state_dict(), resumed.network.state_dict()),
                 (straight.representation.state_dict(), resumed.representation.state_dict())):
        assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [[json.loads(line) for line in (tmp_path / n / "metrics.jsonl").read_text().splitlines()] for n in ("straight", "split")]
    for key in ("loss_crepa", "loss_self_flow", "loss_self_flow_frame", "loss_self_flow_delta"):
        assert [r[key] for r in rows[0]] == [r[key] for r in rows[1]] and all(r[key] > 0 for r in rows[0]), key


@pytest.mark.comfyui
def test_slider_file_moves_comfyuis_model_both_ways_through_comfyuis_lora_loader(checkpoint, tmp_path):
    """A slider trained on the diffusers backend, saved, and applied by ``comfy.sd.load_lora_for_models`` (the LoRA
    loader nodes' call) at +1 and -1 to ComfyUI's model: its prediction moves along (positive - negative) and back."""
    import comfy.sd
    import comfy.utils
    from ltx2_av_trainer.trainer.backends.comfyui.denoiser import ComfyDenoiser
    from ltx2_av_trainer.trainer.training.slider import SliderTrainer
    from test_slider import SLIDER, _predictions, _prompts

    cfg = tiny_config(tmp_path, **SLIDER, **{"train.steps": 12, "optimizer.lr": 6e-3, "output.save_every": 100})
    trainer = SliderTrainer(cfg, _diffusers_denoiser(checkpoint), _prompts(cfg), cfg.output.dir)
    trainer.run()
    trainer.network.detach()
    lora = comfy.utils.load_torch_file(str(trainer.last_lora), safe_load=True)
    with torch.inference_mode():
        base = comfy.sd.load_diffusion_model(str(checkpoint))
    along = {}
    for strength in (0.0, 1.0, -1.0):
        patched, _ = comfy.sd.load_lora_for_models(base, None, lora, strength, 0)
        patched.patch_model(force_patch_weights=True)
        try:
            trainer.denoiser = ComfyDenoiser(patched, "2.0")  # _predictions runs the trainer's denoiser
            target, positive, negative = _predictions(trainer, trainer.prompts, 0.0)
        finally:
            patched.unpatch_model()
        if strength == 0.0:
            reference = (target, positive - negative)
        else:
            direction = reference[1]
            along[strength] = (((target - reference[0]) * direction).sum() / (direction * direction).sum()).item()
    assert along[1.0] > 0.4 and along[-1.0] < -0.4, along
