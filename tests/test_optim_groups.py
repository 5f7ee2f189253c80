"""Learning-rate control: per-module rates (regex > audio > base), LoRA+, and the optimizer variants
(AdamW, AdamW8bit's clear error, Prodigy, schedule-free) including bit-for-bit resume."""

import sys

import pytest
import torch
from safetensors.torch import load_file

from ltx2_av_trainer.trainer.backends.diffusers_backend import build_denoiser
from ltx2_av_trainer.trainer.config import ConfigError, OptimizerConfig
from ltx2_av_trainer.trainer.training.loop import Trainer
from ltx2_av_trainer.trainer.training.optim import module_learning_rate

from latent_fixtures import make_samples, tiny_config
from voice_fixtures import metric_rows


def _expected_lr(path: str) -> float:
    # lr_overrides ['video_to_audio=5e-6', 'audio_attn=1e-6']: first match wins ('video_to_audio_attn' also
    # contains 'audio_attn', so the order matters).
    if "video_to_audio" in path:
        return 5e-6
    if "audio_attn" in path:
        return 1e-6
    if any(name in path for name in ("audio_ff", "audio_to_video_attn")):
        return 1e-5  # audio_lr
    return 1e-4


def test_per_module_learning_rates_reach_the_right_parameters(tmp_path):
    cfg = tiny_config(tmp_path, **{"network.preset": "full", "optimizer.lr": 1e-4, "optimizer.audio_lr": 1e-5,
                                   "optimizer.lr_overrides": ["video_to_audio=5e-6", "audio_attn=1e-6"],
                                   "optimizer.loraplus_ratio": 4.0, "schedule.name": "constant", "train.steps": 2,
                                   "train.max_grad_norm": 0.0, "loss.balance": "none",
                                   "optimizer.eps": 1e-30})  # no epsilon: Adam steps are exactly ±lr·const
    trainer = Trainer(cfg, build_denoiser(cfg.model), make_samples(cfg, 2), cfg.output.dir)
    group_of = {id(p): g for g in trainer.optimizer.param_groups for p in g["params"]}
    names = {g["name"] for g in trainer.optimizer.param_groups}
    assert names == {"base", "base+loraplus", "audio", "audio+loraplus", "override:audio_attn", "override:audio_attn+loraplus",
                     "override:video_to_audio", "override:video_to_audio+loraplus"}
    for path, layer in trainer.network.named_layers():
        assert group_of[id(layer.down)]["lr"] == pytest.approx(_expected_lr(path))
        assert group_of[id(layer.up)]["lr"] == pytest.approx(4 * _expected_lr(path))  # LoRA+ on the zero-initialised up
    snapshot = lambda: {path: (l.down.detach().clone(), l.up.detach().clone()) for path, l in trainer.network.named_layers()}  # noqa: E731
    start = snapshot()
    trainer.run(until_step=1)
    after_one = snapshot()
    trainer.run(until_step=2)
    after_two = snapshot()
    # Adam's first step moves every parameter with a gradient by exactly ±lr: the rate each module really got.
    # (down has no gradient while up is zero; its second-step move is a fixed fraction of its lr, up to the
    # float32 resolution of a 1e-6 step on weights of ~0.1.)
    down_ratios = []
    for path in start:
        up_step = (after_one[path][1] - start[path][1]).abs().max().item()
        assert up_step == pytest.approx(4 * _expected_lr(path), rel=1e-3), path
        assert torch.equal(after_one[path][0], start[path][0])
        down_ratios.append((after_two[path][0] - after_one[path][0]).abs().max().item() / _expected_lr(path))
    assert max(down_ratios) == pytest.approx(min(down_ratios), rel=5e-3) and min(down_ratios) > 0.5, down_ratios
    assert metric_rows(cfg.output.dir)[0]["lr_groups"]["audio"] == pytest.approx(1e-5)


def test_learning_rate_priority_and_bad_overrides():
    cfg = OptimizerConfig(lr=1.0, audio_lr=0.5, lr_overrides=["attn1\\.to_q=0.1"])
    assert module_learning_rate("transformer_blocks.0.audio_attn1.to_q", cfg) == (0.1, "override:attn1\\.to_q")
    assert module_learning_rate("transformer_blocks.0.audio_attn1.to_k", cfg) == (0.5, "audio")
    assert module_learning_rate("transformer_blocks.0.video_to_audio_attn.to_k", cfg) == (0.5, "audio")
    assert module_learning_rate("audio_embeddings_connector.transformer_1d_blocks.0.attn1.to_k", cfg) == (0.5, "audio")
    assert module_learning_rate("transformer_blocks.0.attn2.to_k", cfg) == (1.0, "base")
    from ltx2_av_trainer.trainer.config import Config

    for bad, message in ((["audio_attn"], "is not 'regex=lr'"), (["x=fast"], "is not a number"), (["(=1e-4"], "not a valid regular"),
                         (["x=-1"], "must be > 0")):
        with pytest.raises(ConfigError, match=message):
            Config.from_dict({"optimizer": {"lr_overrides": bad}})


def test_schedule_applies_to_every_group(tmp_path):
    cfg = tiny_config(tmp_path, **{"optimizer.audio_lr": 1e-5, "schedule.name": "constant_with_warmup",
                                   "schedule.warmup_steps": 4, "train.steps": 2, "output.save_every": 100})
    trainer = Trainer(cfg, build_denoiser(cfg.model), make_samples(cfg, 2), cfg.output.dir)
    trainer.run()
    rows = metric_rows(cfg.output.dir)
    assert [r["lr"] for r in rows] == pytest.approx([0.25e-3, 0.5e-3])
    assert [r["lr_groups"]["audio"] for r in rows] == pytest.approx([0.25e-5, 0.5e-5])


def test_adamw8bit_needs_cuda_and_bitsandbytes(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, **{"optimizer.name": "adamw8bit"})
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        Trainer(cfg, build_denoiser(cfg.model), make_samples(cfg, 2), cfg.output.dir)
    from ltx2_av_trainer.trainer.training import optim

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    with pytest.raises(ConfigError, match="pip install bitsandbytes"):
        optim._import_optional("adamw8bit", "bitsandbytes")


def test_missing_optional_optimizer_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "prodigyopt", None)
    cfg = tiny_config(tmp_path, **{"optimizer.name": "prodigy", "optimizer.lr": 1.0})
    with pytest.raises(ConfigError, match=r"optimizer.name = 'prodigy' needs the prodigyopt package.*pip install prodigyopt"):
        Trainer(cfg, build_denoiser(cfg.model), make_samples(cfg, 2), cfg.output.dir)


def test_optimizer_specific_rules(tmp_path):
    with pytest.raises(ConfigError, match="cannot be combined with optimizer.name"):
        tiny_config(tmp_path, **{"optimizer.name": "schedule_free_adamw", "schedule.name": "cosine"})
    with pytest.raises(ConfigError, match="supports no per-module learning rates"):
        tiny_config(tmp_path, **{"optimizer.name": "prodigy", "optimizer.lr": 1.0, "optimizer.audio_lr": 0.5})


def test_prodigy_with_a_tiny_lr_warns(tmp_path):
    pytest.importorskip("prodigyopt")
    cfg = tiny_config(tmp_path, **{"optimizer.name": "prodigy", "optimizer.lr": 1e-4})
    trainer = Trainer(cfg, build_denoiser(cfg.model), make_samples(cfg, 2), cfg.output.dir)
    assert any("Prodigy estimates the step size itself" in w for w in trainer.warnings)


@pytest.mark.parametrize("name,lr", [("prodigy", 1.0), ("schedule_free_adamw", 1e-3)])
def test_optimizer_variants_train_and_resume_bit_for_bit(tmp_path, name, lr):
    pytest.importorskip({"prodigy": "prodigyopt", "schedule_free_adamw": "schedulefree"}[name])

    def train(run, until=None, resume=False):
        per_module = {} if name == "prodigy" else {"optimizer.audio_lr": lr / 2}
        cfg = tiny_config(tmp_path, **{"optimizer.name": name, "optimizer.lr": lr, **per_module,
                                       "schedule.warmup_steps": 2, "train.steps": 6, "output.save_every": 2,
                                       "output.dir": str(tmp_path / run)})
        trainer = Trainer(cfg, build_denoiser(cfg.model), make_samples(cfg, 3), cfg.output.dir)
        if resume:
            assert trainer.try_resume() == 3
        trainer.run(until_step=until)
        return trainer

    straight = train("straight")
    train("split", until=3)
    resumed = train("split", resume=True)
    a, b = straight.network.state_dict(), resumed.network.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.abs().sum() > 0 for k, v in a.items() if k.endswith(".up"))  # it trained
    rows_a, rows_b = metric_rows(tmp_path / "straight"), metric_rows(tmp_path / "split")
    assert [r["loss"] for r in rows_a] == [r["loss"] for r in rows_b]
    exported = load_file(str(straight.last_lora))
    key = "diffusion_model.transformer_blocks.0.attn1.to_q.lora_B.weight"  # alpha = rank: lora_B is up itself
    trained = straight.network.state_dict()["layers.transformer_blocks__0__attn1__to_q.up"]
    if name == "schedule_free_adamw":
        # The file holds the averaged weights x, the state the gradient point y; training goes on from y.
        assert not torch.allclose(exported[key].float(), trained.to(torch.bfloat16).float())
    else:
        assert torch.equal(exported[key], trained.to(torch.bfloat16))
