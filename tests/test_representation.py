"""CREPA and Self-Flow (``trainer/training/representation.py``): the terms, where their gradients go, the teacher
pass, the state they add to a run and its exact resume, and the metrics / report they show in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from latent_fixtures import make_samples, tiny_config
from ltx2_av_trainer.trainer.backends.diffusers_backend import build_denoiser
from ltx2_av_trainer.trainer.backends.interface import video_token_count
from ltx2_av_trainer.trainer.config import ConfigError
from ltx2_av_trainer.trainer.data.batches import collate
from ltx2_av_trainer.trainer.evaluation.report_html import write_training_report
from ltx2_av_trainer.trainer.training.loop import Trainer, training_step
from ltx2_av_trainer.trainer.training.representation import (
    delta_alignment,
    neighbour_alignment,
    token_alignment,
)
from ltx2_av_trainer.trainer.training.state import REGULARIZERS_FILE, find_latest_state
from safetensors.torch import load_file

BOTH = {"crepa.enabled": True, "self_flow.enabled": True, "self_flow.temporal_mode": "hybrid"}


def _rows(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


# ---- the terms -----------------------------------------------------------------------------------------------------


def test_each_term_is_zero_when_the_features_align_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    batch, frames, tokens, width = 2, 4, 3, 8
    # Aligned: every frame of the student points where the teacher's frames do (any positive scale), so each frame
    # also aligns with its neighbours.
    direction = torch.randn(batch, 1, tokens, width, generator=g)
    student = direction.expand(batch, frames, tokens, width) * 2.0
    teacher = direction.expand(batch, frames, tokens, width) * 0.5
    unrelated = torch.randn(batch, frames, tokens, width, generator=g)
    assert neighbour_alignment(student, teacher, num_neighbors=2, tau=1.0).abs() < 1e-6
    assert neighbour_alignment(student, unrelated, num_neighbors=2, tau=1.0) > 0.1
    # Frame by frame equal but frames differing: zero without neighbours, positive with them.
    varied = torch.randn(batch, frames, tokens, width, generator=g)
    assert neighbour_alignment(varied, 3 * varied, num_neighbors=0, tau=1.0).abs() < 1e-6
    assert neighbour_alignment(varied, 3 * varied, num_neighbors=1, tau=1.0) > 0.1
    assert token_alignment(varied, 3 * varied).abs() < 1e-6 and token_alignment(varied, unrelated) > 0.1
    pooled = torch.randn(batch, frames, width, generator=g)
    assert delta_alignment(pooled, 2 * pooled + 1.0).abs() < 1e-6  # the same changes, scaled and offset
    assert delta_alignment(pooled, torch.randn(batch, frames, width, generator=g)) > 0.1


def test_crepa_term_through_the_model_is_zero_when_the_projection_points_at_the_teacher(tmp_path, monkeypatch):
    """The whole path (hooks on the real tiny model, projector, frames): a projector whose output points where the
    teacher block's features do, frame by frame, gives 0 (no neighbours here: the teacher's frames differ); the
    projector as initialised gives a positive term."""
    cfg = tiny_config(tmp_path, **{"crepa.enabled": True, "crepa.num_neighbors": 0})
    trainer = Trainer(cfg, build_denoiser(cfg.model), make_samples(cfg, 2), cfg.output.dir)
    batch = collate(trainer.samples)
    crepa = trainer.representation.crepa

    def step_terms():
        with trainer.representation.capture(trainer.denoiser, video_token_count(batch.video)) as features:
            losses = training_step(batch, trainer.denoiser, cfg, torch.Generator().manual_seed(1), trainer.device, None)
        return features, dict((name, value) for name, value, _ in
                              trainer.representation.terms(features, losses.inputs, trainer.denoiser, trainer.network, 0,
                                                           trainer.device, None))

    features, terms = step_terms()
    assert terms["crepa"] > 0.05
    teacher = features.video(crepa.teacher, batch.size).detach()
    monkeypatch.setattr(crepa.projector, "forward", lambda student: 5.0 * teacher + 0.0 * student.float())
    assert step_terms()[1]["crepa"].abs() < 1e-5


# ---- gradients and the teacher ---------------------------------------------------------------------------------------


def _perturbed_trainer(tmp_path, denoiser=None, **overrides):
    cfg = tiny_config(tmp_path, **overrides)
    trainer = Trainer(cfg, denoiser or build_denoiser(cfg.model), make_samples(cfg, 2), cfg.output.dir)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # a trained-looking LoRA: up weights non-zero, so the LoRA model differs from the base
        for _, layer in trainer.network.named_layers():
            layer.up.copy_(0.1 * torch.randn(layer.up.shape, generator=g))
    return cfg, trainer


def _term_gradients(trainer, cfg, name):
    """Backpropagate only the named term of one micro-batch; which parameters got a non-zero gradient."""
    batch = collate(trainer.samples)
    with trainer.representation.capture(trainer.denoiser, video_token_count(batch.video)) as features:
        losses = training_step(batch, trainer.denoiser, cfg, torch.Generator().manual_seed(1), trainer.device, None,
                               dual_timestep=trainer.representation.dual_timestep)
    terms = {n: v for n, v, _ in trainer.representation.terms(features, losses.inputs, trainer.denoiser, trainer.network,
                                                              0, trainer.device, None)}
    terms[name].backward()
    lora = {path: any(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())
            for path, layer in trainer.network.named_layers()}
    projector = [p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.representation.projectors[name].parameters()]
    model = getattr(trainer.denoiser, "transformer", None) or trainer.denoiser.diffusion_model
    base = [n for n, p in model.named_parameters() if p.requires_grad or p.grad is not None]
    return lora, projector, base, terms, losses


@pytest.mark.parametrize("name", ["crepa", "self_flow"])
def test_gradients_reach_the_projector_and_the_lora_up_to_the_student_block_never_the_base(tmp_path, name):
    cfg, trainer = _perturbed_trainer(tmp_path, **{f"{name}.enabled": True, f"{name}.student_block_idx": 0,
                                                   f"{name}.teacher_block_idx": 1})
    check_term_gradients(trainer, cfg, name)


def check_term_gradients(trainer, cfg, name):
    lora, projector, base, _, _ = _term_gradients(trainer, cfg, name)
    assert all(projector)
    assert base == []  # the base model trains nothing and collects no gradient
    student_block = [on for path, on in lora.items() if path.startswith("transformer_blocks.0.")]
    teacher_block = [on for path, on in lora.items() if path.startswith("transformer_blocks.1.")]
    assert student_block and any(student_block)  # the student's features depend on block 0's adapters
    assert teacher_block and not any(teacher_block)  # the teacher's features are a target: no gradient through them


def test_self_flow_teacher_is_the_base_model_at_the_lower_sigma(tmp_path):
    """The term recomputed by hand from the base model's block-1 features (LoRA off, every token at the lower σ) is
    the one the trainer computed; with the LoRA on for the teacher (the negative control) it is not."""
    cfg, trainer = _perturbed_trainer(tmp_path, **{"self_flow.enabled": True, "self_flow.mask_ratio": 0.5,
                                                   "self_flow.student_block_idx": 0, "self_flow.teacher_block_idx": 1})
    batch = collate(trainer.samples)
    dual = trainer.representation.dual_timestep
    with trainer.representation.capture(trainer.denoiser, video_token_count(batch.video)) as features:
        losses = training_step(batch, trainer.denoiser, cfg, torch.Generator().manual_seed(1), trainer.device, None,
                               dual_timestep=dual)
    value = dict((n, v) for n, v, _ in trainer.representation.terms(features, losses.inputs, trainer.denoiser,
                                                                    trainer.network, 0, trainer.device, None))["self_flow"]
    student_sigma = losses.inputs.sigma_video
    assert student_sigma.ndim == 2 and (student_sigma > dual.teacher_sigma[:, None]).any()  # dual-timestep noising on
    teacher_in = dual.teacher_inputs(losses.inputs)
    assert torch.equal(teacher_in.sigma_video, dual.teacher_sigma[:, None].expand_as(student_sigma))
    student = trainer.representation.self_flow.projector(features.video(0, batch.size))

    def teacher_features(multiplier):
        trainer.network.set_multiplier(multiplier)
        try:
            with torch.no_grad(), trainer.denoiser.block_features([1], features.video_tokens) as taught:
                trainer.denoiser(teacher_in)
        finally:
            trainer.network.set_multiplier(1.0)
        return taught.video(1, batch.size)

    assert torch.allclose(value, token_alignment(student, teacher_features(0.0)), atol=1e-6)
    assert not torch.allclose(value, token_alignment(student, teacher_features(1.0)), atol=1e-4)


# ---- config ------------------------------------------------------------------------------------------------------------


def test_block_choices_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="crepa.teacher_block_idx"):
        tiny_config(tmp_path, **{"crepa.enabled": True, "crepa.student_block_idx": 1, "crepa.teacher_block_idx": 1})
    cfg = tiny_config(tmp_path, **{"self_flow.enabled": True, "self_flow.teacher_block_idx": 5})
    with pytest.raises(ConfigError, match="self_flow: .*2 blocks"):
        Trainer(cfg, build_denoiser(cfg.model), make_samples(cfg, 2), cfg.output.dir)
    with pytest.raises(ConfigError, match="crepa.enabled"):
        tiny_config(tmp_path, **{"crepa.enabled": True, "conditioning.mode": "audio"})


# ---- a run: metrics, state, export, resume ---------------------------------------------------------------------------


def _train(tmp_path, name, until=None, resume=False, run=True):
    cfg = tiny_config(tmp_path, **BOTH, **{"train.steps": 6, "output.dir": str(tmp_path / name), "output.save_every": 3,
                                           "train.batch_size": 2, "logging.log_every": 1, "self_flow.warmup_steps": 2,
                                           "crepa.schedule": "cosine"})
    trainer = Trainer(cfg, build_denoiser(cfg.model), make_samples(cfg, 4), cfg.output.dir)
    if resume:
        assert trainer.try_resume() == 3
    if run:
        trainer.run(until_step=until)
    return trainer


def test_resume_with_both_regularisers_is_bit_for_bit_and_the_projectors_stay_out_of_the_lora(tmp_path):
    straight = _train(tmp_path, "straight")
    _train(tmp_path, "split", until=3)
    resumed = _train(tmp_path, "split", resume=True)
    for a, b in ((straight.network.state_dict(), resumed.network.state_dict()),
                 (straight.representation.state_dict(), resumed.representation.state_dict())):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows_a, rows_b = _rows(tmp_path / "straight"), _rows(tmp_path / "split")
    assert [r["step"] for r in rows_b] == list(range(1, 7))
    for key in ("loss", "loss_crepa", "loss_self_flow", "loss_self_flow_frame", "loss_self_flow_delta"):
        assert [r[key] for r in rows_a] == [r[key] for r in rows_b], key
        assert all(r[key] > 0 for r in rows_a), key
    # The projectors: in the state, trained (not their initial values), never in the exported LoRA.
    saved = load_file(str(find_latest_state(tmp_path / "split") / REGULARIZERS_FILE))
    assert {k.split(".")[0] for k in saved} == {"crepa", "self_flow"}
    fresh = _train(tmp_path, "fresh", run=False).representation.state_dict()
    assert any(not torch.equal(saved[k], fresh[k]) for k in saved)
    lora = load_file(str(tmp_path / "split" / "lora" / "ltx2_av_lora_000006.safetensors"))
    assert not any("crepa" in k or "self_flow" in k or "net." in k for k in lora)
    plain = tiny_config(tmp_path, **{"output.dir": str(tmp_path / "plain")})
    plain_keys = set(Trainer(plain, build_denoiser(plain.model), make_samples(plain, 2), plain.output.dir).network.state_dict())
    assert set(straight.network.state_dict()) == plain_keys


def test_terms_show_in_the_html_report(tmp_path):
    pytest.importorskip("matplotlib")
    _train(tmp_path, "run", until=2)
    page = write_training_report(tmp_path / "run").read_text()
    assert 'id="regularisers"' in page and "CREPA" in page and "Self-Flow delta" in page
    plain = tiny_config(tmp_path, **{"output.dir": str(tmp_path / "plain"), "train.steps": 1})
    Trainer(plain, build_denoiser(plain.model), make_samples(plain, 2), plain.output.dir).run()
    assert 'id="regularisers"' not in write_training_report(tmp_path / "plain").read_text()
