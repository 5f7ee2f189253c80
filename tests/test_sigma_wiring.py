"""The cross-modal σ wiring of the diffusers backend (README, "How it trains"), checked with hooks on the adaLN modules."""

import pytest
import torch

from ltx2_av_trainer.trainer.backends.diffusers_backend import build_denoiser
from ltx2_av_trainer.trainer.backends.interface import DenoiserInput, TextContext
from ltx2_av_trainer.trainer.config import Config, ModelConfig

from latent_fixtures import make_samples, text_widths


def _inputs(version, sigma_video, sigma_audio, batch=2, seed=0):
    cfg = Config().replace(**{"model.version": version})
    g = torch.Generator().manual_seed(seed)
    dv, da = text_widths(cfg)
    return DenoiserInput(
        video=torch.randn(batch, 128, 2, 2, 3, generator=g),
        audio=torch.randn(batch, 8, 9, 16, generator=g),
        sigma_video=sigma_video,
        sigma_audio=sigma_audio,
        text=TextContext(torch.randn(batch, 6, dv, generator=g), torch.randn(batch, 6, da, generator=g), torch.ones(batch, 6)),
        fps=25.0,
    )


def _record_inputs(transformer, names):
    seen = {}
    handles = []
    for name in names:
        module = transformer.get_submodule(name)
        handles.append(module.register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, args[0].detach().clone())))
    return seen, handles


ADALN = ["time_embed", "audio_time_embed", "av_cross_attn_video_scale_shift", "av_cross_attn_audio_scale_shift",
         "av_cross_attn_video_a2v_gate", "av_cross_attn_audio_v2a_gate"]


@pytest.mark.parametrize("version", ["2.0", "2.3"])
def test_reference_wiring_routes_each_sigma(version):
    denoiser = build_denoiser(ModelConfig(version=version))
    tokens = 2 * 2 * 3  # latent frames x height x width of _inputs
    sigma_video = torch.tensor([[0.0] * 3 + [0.7] * (tokens - 3), [0.0] * 3 + [0.4] * (tokens - 3)])  # per token
    sigma_audio = torch.tensor([0.15, 0.9])
    seen, handles = _record_inputs(denoiser.transformer, ADALN)
    denoiser(_inputs(version, sigma_video, sigma_audio))
    for h in handles:
        h.remove()
    # Each modality's own (per-token) timestep drives its adaLN and its cross-attention scale/shift.
    assert torch.allclose(seen["time_embed"], sigma_video.flatten() * 1000)
    assert torch.allclose(seen["av_cross_attn_video_scale_shift"], sigma_video.flatten() * 1000)
    assert torch.allclose(seen["audio_time_embed"], sigma_audio * 1000)
    assert torch.allclose(seen["av_cross_attn_audio_scale_shift"], sigma_audio * 1000)
    # The a2v gate (video queries, audio keys) follows σ_a; the v2a gate follows σ_v (per sample).
    assert torch.allclose(seen["av_cross_attn_video_a2v_gate"], sigma_audio * 1000)
    assert torch.allclose(seen["av_cross_attn_audio_v2a_gate"], torch.tensor([0.7, 0.4]) * 1000)


@pytest.mark.parametrize("wiring,a2v_from,v2a_from", [("own", "video", "audio"), ("cross", "audio", "video")])
def test_alternative_wirings(wiring, a2v_from, v2a_from):
    denoiser = build_denoiser(ModelConfig(version="2.0", cross_modal_sigma=wiring))
    sv, sa = torch.tensor([0.8, 0.3]), torch.tensor([0.1, 0.6])
    seen, handles = _record_inputs(denoiser.transformer, ADALN)
    denoiser(_inputs("2.0", sv, sa))
    for h in handles:
        h.remove()
    by = {"video": sv * 1000, "audio": sa * 1000}
    assert torch.allclose(seen["av_cross_attn_video_a2v_gate"], by[a2v_from])
    assert torch.allclose(seen["av_cross_attn_audio_v2a_gate"], by[v2a_from])
    assert torch.allclose(seen["av_cross_attn_video_scale_shift"], by[a2v_from])


@pytest.mark.parametrize("version", ["2.0", "2.3"])
def test_changing_only_audio_sigma_changes_audio_and_video_predictions(version):
    denoiser = build_denoiser(ModelConfig(version=version))
    sv = torch.tensor([0.5, 0.5])
    with torch.no_grad():
        v1, a1 = denoiser(_inputs(version, sv, torch.tensor([0.2, 0.2])))
        v2, a2 = denoiser(_inputs(version, sv, torch.tensor([0.8, 0.8])))
        v3, a3 = denoiser(_inputs(version, sv, torch.tensor([0.2, 0.2])))
    assert torch.equal(v1, v3) and torch.equal(a1, a3)  # deterministic
    assert (a1 - a2).abs().max() > 1e-3  # audio sees its own σ
    assert (v1 - v2).abs().max() > 1e-5  # video sees σ_a through the a2v gate and audio keys/values


@pytest.mark.parametrize("version", ["2.0", "2.3"])
def test_video_only_batch_has_no_audio_influence(version):
    """Without audio, nothing of the audio branch or the cross-modal attention reaches the video prediction:
    changing every audio-side weight leaves it bit for bit the same (with audio it changes it)."""
    clean, perturbed = build_denoiser(ModelConfig(version=version)), build_denoiser(ModelConfig(version=version))
    generator = torch.Generator().manual_seed(0)
    touched = 0
    with torch.no_grad():
        for name, parameter in perturbed.transformer.named_parameters():
            if "audio" in name:  # audio blocks, audio_to_video / video_to_audio attention, audio embeddings
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.5)
                touched += 1
    assert touched > 20
    video_only = _inputs(version, torch.tensor([0.5, 0.5]), None)
    video_only.audio = None
    with torch.no_grad():
        video_a, audio_a = clean(video_only)
        video_b, audio_b = perturbed(video_only)
    assert audio_a is None and audio_b is None and video_a.shape == video_only.video.shape
    assert torch.equal(video_a, video_b)
    with_audio = _inputs(version, torch.tensor([0.5, 0.5]), torch.tensor([0.5, 0.5]))
    with torch.no_grad():
        assert not torch.equal(clean(with_audio)[0], perturbed(with_audio)[0])  # the perturbation does matter


def test_sigma_logged_equals_sigma_received(tmp_path):
    """The σ values the model received equal the ones written to metrics.jsonl."""
    from latent_fixtures import tiny_config
    from ltx2_av_trainer.trainer.training.loop import Trainer
    import json

    cfg = tiny_config(tmp_path, **{"train.steps": 4, "output.save_every": 100})
    denoiser = build_denoiser(cfg.model)
    received = {"video": [], "audio": []}
    tr = denoiser.transformer
    tr.audio_time_embed.register_forward_hook(lambda m, a, o: received["audio"].append(a[0].detach() / 1000))
    tr.time_embed.register_forward_hook(lambda m, a, o: received["video"].append(a[0].detach() / 1000))
    Trainer(cfg, denoiser, make_samples(cfg, 2), cfg.output.dir).run()
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert len(rows) == 4
    for row, v, a in zip(rows, received["video"], received["audio"]):
        assert row["sigma_video"] == pytest.approx(v.mean().item(), abs=1e-6)
        assert row["sigma_audio"] == pytest.approx(a.mean().item(), abs=1e-6)
