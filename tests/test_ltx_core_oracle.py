"""Our diffusers backend held to Lightricks' reference implementation, ltx-core, on CPU.

The PyPI release pinned in requirements-dev.txt (ltx-core 1.0.0, March 2026) implements the ``cross`` wiring of
``model.cross_modal_sigma``; ltx-core since 1.1.4 and ComfyUI implement ``reference`` (the default; the ComfyUI
tier holds it to ComfyUI). Set ``LTX_CORE_PATH`` to a Lightricks/LTX-2 checkout to run the same tests against
that release and the wiring it implements (``ltx_core_oracle.WIRING_BY_VERSION``).

Every test uses σ_a ≠ σ_v within each sample and different σ across the batch (with one shared σ every wiring
computes the same numbers, which is the negative control below).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import ltx_core_oracle as oracle_lib
import pytest
import torch
from ltx2_av_trainer.trainer.backends.diffusers_backend import CROSS_MODAL_SIGMA_WIRINGS, build_denoiser
from ltx2_av_trainer.trainer.config import ModelConfig, TinyModelConfig

ORACLE = oracle_lib.load_oracle()
TINY = TinyModelConfig()
TOKENS = 2 * 2 * 3  # video tokens of make_inputs' default latent (frames x height x width)
# Measured on a 2-core CPU, float32 (ltx-core 1.0.0 and 1.2.0, 2.0 and 2.3): forward 1.6e-7 to 1.9e-7 relative.
FORWARD_TOLERANCE = 1e-5
GRADIENT_TOLERANCE = 1e-4
# The smallest gap between wirings when σ_a ≠ σ_v on this model: 1.7e-2 (cross vs reference); swapped σ: 0.17.
WIRING_GAP = 1e-3

SIGMAS = {
    # Per sample: σ_a ≠ σ_v in each sample, and the samples differ.
    "per_sample": (torch.tensor([0.8, 0.35]), torch.tensor([0.2, 0.6])),
    # Per-token video σ: the first latent frame is a clean conditioning frame (σ = 0), as in image-to-video.
    "per_token": (torch.tensor([[0.0] * 3 + [0.7] * (TOKENS - 3), [0.0] * 3 + [0.4] * (TOKENS - 3)]), torch.tensor([0.15, 0.9])),
}


@pytest.fixture(scope="module", params=["2.0", "2.3"])
def models(request, tmp_path_factory):
    """Our denoiser in every wiring (same seeded weights) and ltx-core's model with those weights."""
    version = request.param
    ours = {w: build_denoiser(ModelConfig(version=version, cross_modal_sigma=w)) for w in CROSS_MODAL_SIGMA_WIRINGS}
    checkpoint = oracle_lib.write_checkpoint(ours["reference"], tmp_path_factory.mktemp(f"ltx_core_{version}"), TINY)
    return version, ours, oracle_lib.build_model(checkpoint)


def test_the_oracle_is_the_pinned_release_or_the_named_checkout():
    if os.environ.get(oracle_lib.ENV_VAR):
        assert ORACLE.origin != "PyPI" and ORACLE.wiring in CROSS_MODAL_SIGMA_WIRINGS
        print(f"ltx-core {ORACLE.version} from {ORACLE.origin}: expects the {ORACLE.wiring!r} wiring")
        return
    pins = (Path(__file__).resolve().parent.parent / "requirements-dev.txt").read_text(encoding="utf-8")
    pinned = re.search(r"^ltx-core==(\S+)", pins, re.MULTILINE)
    assert pinned, "requirements-dev.txt pins ltx-core"
    assert ORACLE.version == pinned.group(1) and ORACLE.wiring == "cross"


def test_every_tensor_maps_onto_ltx_core(models):
    version, ours, reference = models
    mine = oracle_lib.reference_state_dict(ours["reference"].transformer)
    theirs = reference.state_dict()
    assert set(mine) == set(theirs), (sorted(set(mine) ^ set(theirs))[:5])
    assert len(theirs) == {"2.0": 198, "2.3": 230}[version]
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)


@pytest.mark.parametrize("sigmas", list(SIGMAS))
def test_forward_matches_ltx_core(models, sigmas):
    version, ours, reference = models
    inputs = oracle_lib.make_inputs(version, TINY, *SIGMAS[sigmas])
    with torch.no_grad():
        expected = oracle_lib.ltx_core_forward(reference, inputs)
        got = ours[ORACLE.wiring](inputs)
    for name, e, g in zip(("video", "audio"), expected, got):
        assert oracle_lib.relative_error(g, e) < FORWARD_TOLERANCE, (name, oracle_lib.relative_error(g, e))


def test_gradients_match_ltx_core(models, tmp_path):
    """Gradients of one scalar of both outputs, with respect to both noisy inputs and every weight."""
    version, _, _ = models
    ours = build_denoiser(ModelConfig(version=version, cross_modal_sigma=ORACLE.wiring))
    reference = oracle_lib.build_model(oracle_lib.write_checkpoint(ours, tmp_path, TINY))
    ours.transformer.requires_grad_(True)
    reference.requires_grad_(True)
    g = torch.Generator().manual_seed(5)
    results = {}
    for name, run in (("ours", lambda i: ours(i)), ("ltx_core", lambda i: oracle_lib.ltx_core_forward(reference, i))):
        inputs = oracle_lib.make_inputs(version, TINY, *SIGMAS["per_token"])
        inputs.video.requires_grad_(True)
        inputs.audio.requires_grad_(True)
        video, audio = run(inputs)
        if not results:
            weights = (torch.randn(video.shape, generator=g), torch.randn(audio.shape, generator=g))
        ((video * weights[0]).sum() + (audio * weights[1]).sum()).backward()
        results[name] = (inputs.video.grad, inputs.audio.grad)
    for mine, theirs in zip(results["ours"], results["ltx_core"]):
        assert oracle_lib.relative_error(mine, theirs) < GRADIENT_TOLERANCE
    theirs = dict(reference.named_parameters())
    worst = max((oracle_lib.relative_error(p.grad, theirs[oracle_lib.reference_key(n)].grad), n)
                for n, p in ours.transformer.named_parameters())
    assert worst[0] < GRADIENT_TOLERANCE, worst
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in theirs.values() if p.ndim == 2)


def test_negative_controls(models):
    """The tests above can fail: the other wirings and swapped σ give other predictions; with one shared σ every
    wiring agrees with ltx-core (the wiring only matters once σ_a ≠ σ_v)."""
    version, ours, reference = models
    inputs = oracle_lib.make_inputs(version, TINY, *SIGMAS["per_sample"])
    with torch.no_grad():
        expected = oracle_lib.ltx_core_forward(reference, inputs)
        swapped = oracle_lib.ltx_core_forward(reference, inputs, swap_sigmas=True)
        for wiring, denoiser in ours.items():
            if wiring != ORACLE.wiring:
                video, audio = denoiser(inputs)
                assert oracle_lib.relative_error(video, expected[0]) > WIRING_GAP, wiring
                assert oracle_lib.relative_error(audio, expected[1]) > WIRING_GAP, wiring
        video, audio = ours[ORACLE.wiring](inputs)
        assert oracle_lib.relative_error(video, swapped[0]) > 10 * WIRING_GAP
        assert oracle_lib.relative_error(audio, swapped[1]) > 10 * WIRING_GAP
        shared = oracle_lib.make_inputs(version, TINY, torch.tensor([0.8, 0.35]), torch.tensor([0.8, 0.35]))
        expected = oracle_lib.ltx_core_forward(reference, shared)
        for wiring, denoiser in ours.items():
            video, audio = denoiser(shared)
            assert oracle_lib.relative_error(video, expected[0]) < FORWARD_TOLERANCE, wiring
            assert oracle_lib.relative_error(audio, expected[1]) < FORWARD_TOLERANCE, wiring
