"""fp16 mixed precision with loss scaling, on the CPU too (torch autocasts fp16 there), and the process-wide
thread count that train.num_threads sets only for the run."""

import pytest
import torch
from latent_fixtures import make_samples, tiny_config
from ltx2_av_trainer.trainer.backends.diffusers_backend import build_denoiser
from ltx2_av_trainer.trainer.training.loop import TrainCallbacks, Trainer
from ltx2_av_trainer.trainer.training.state import find_latest_state, load_state


def test_fp16_on_cpu_trains_and_a_forced_overflow_backs_the_scale_off(tmp_path):
    cfg = tiny_config(tmp_path, **{"train.mixed_precision": "fp16", "train.steps": 4, "output.save_every": 100,
                                   "train.max_consecutive_nonfinite": 3})
    trainer = Trainer(cfg, build_denoiser(cfg.model), make_samples(cfg, 3), cfg.output.dir)
    assert trainer.device.type == "cpu" and trainer.autocast_dtype == torch.float16
    # A scale no fp16 gradient survives: the first steps overflow, the scale backs off, training goes on.
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40, backoff_factor=2.0**-14)
    before = {k: v.clone() for k, v in trainer.network.state_dict().items()}
    result = trainer.run()
    overflows = [w for w in trainer.warnings if "fp16 overflow" in w]
    assert overflows, trainer.warnings
    assert result.step == 4 and result.completed
    assert trainer.scaler.get_scale() < 2.0**30
    after = trainer.network.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the steps after the overflow trained
    assert all(torch.isfinite(v).all() for v in after.values())
    saved = load_state(find_latest_state(cfg.output.dir))
    assert saved.extra["scaler"]["scale"] == trainer.scaler.get_scale()  # resumes with the backed-off scale


def test_num_threads_is_set_for_the_run_and_restored_after(tmp_path):
    before = torch.get_num_threads()
    wanted = 1 if before != 1 else 2
    cfg = tiny_config(tmp_path, **{"train.steps": 2, "train.num_threads": wanted, "output.save_every": 100})
    seen = []

    class Threads(TrainCallbacks):
        def on_step(self, trainer, metrics):
            seen.append(torch.get_num_threads())

    Trainer(cfg, build_denoiser(cfg.model), make_samples(cfg, 2), cfg.output.dir, Threads()).run()
    assert seen == [wanted, wanted]
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_other_precisions_have_no_scaler(tmp_path, precision):
    cfg = tiny_config(tmp_path, **{"train.mixed_precision": precision})
    assert Trainer(cfg, build_denoiser(cfg.model), make_samples(cfg, 1), cfg.output.dir).scaler is None
