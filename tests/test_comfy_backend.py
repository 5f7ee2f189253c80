"""ComfyUI tier: ``ComfyDenoiser`` on real ComfyUI objects (tiny LTXAV checkpoints made at test time).

Runs with ``COMFYUI_PATH`` pointing at a ComfyUI checkout whose requirements are installed; skipped otherwise
(except the import-safety test, which needs no ComfyUI).
"""

from __future__ import annotations

import contextlib
import gc
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

from ltx2_av_trainer.trainer.backends.interface import DenoiserInput, TextContext
from ltx2_av_trainer.trainer.config import ConfigError, TinyModelConfig

TINY = TinyModelConfig()
VIDEO_GRID = (3, 4, 4)  # latent frames, height, width → 48 video tokens
AUDIO_FRAMES = 12
TEXT_TOKENS = 8
PARITY_TOLERANCE = 1e-5
GRADIENT_TOLERANCE = 1e-4

# Relative error of UNMODIFIED ComfyUI vs the reference wiring on `reference_inputs(version)` (seed-0 tiny
# weights), measured with ComfyUI v0.33.0 (commit 783545f6), torch 2.11 CPU, float32:
#   2.0: video 1.04e-2, audio 5.85e-2;  2.3: video 5.3e-3, audio 3.8e-2  (almost all of it: v2a reads the
#   video stream after the in-place a2v update);  q/k RMSNorm eps 1e-5 instead of 1e-6 alone: 2.0 4.5e-6 /
#   5.1e-6, 2.3 1.9e-6 / 2.1e-6.
# The bands are about ±25 %: a ComfyUI upgrade that changes either deviation leaves them; then re-measure,
# re-record here, and decide whether the neutralisation still applies.
UNMODIFIED_COMFYUI_BANDS = {
    # version: ((video low, video high), (audio low, audio high))
    "2.0": ((0.008, 0.013), (0.045, 0.075)),
    "2.3": ((0.004, 0.007), (0.029, 0.048)),
}
NORM_EPS_ONLY_BANDS = {
    "2.0": ((3e-6, 6e-6), (3.5e-6, 6.5e-6)),
    "2.3": ((1.3e-6, 2.5e-6), (1.5e-6, 2.8e-6)),
}


# ---- ComfyUI availability -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(comfy, tmp_path_factory) -> dict[str, Path]:
    from comfy_fixtures import write_tiny_ltxav_checkpoint

    folder = tmp_path_factory.mktemp("ltxav")
    return {version: write_tiny_ltxav_checkpoint(folder, version, TINY) for version in ("2.0", "2.3")}


def load_like_a_node(path: Path):
    """``comfy.sd.load_diffusion_model`` inside ``torch.inference_mode()``, as ComfyUI runs loader nodes."""
    import comfy.sd

    with torch.inference_mode():
        return comfy.sd.load_diffusion_model(str(path))


def reference_pair(path: Path, version: str, checkpointing: str = "block", wiring: str = "reference"):
    """(ComfyDenoiser on the loaded checkpoint, DiffusersDenoiser with the same weights)."""
    from safetensors.torch import load_file

    from comfy_fixtures import diffusers_denoiser_from_comfy_state
    from ltx2_av_trainer.trainer.backends.comfyui.denoiser import ComfyDenoiser

    denoiser = ComfyDenoiser(load_like_a_node(path), version, checkpointing=checkpointing, cross_modal_sigma=wiring)
    denoiser.load()
    reference = diffusers_denoiser_from_comfy_state(load_file(str(path)), version, TINY, cross_modal_sigma=wiring)
    return denoiser, reference


# ---- inputs ---------------------------------------------------------------------------------------------


def text_widths(version: str) -> tuple[int, int]:
    if version == "2.3":
        return TINY.num_attention_heads * TINY.attention_head_dim, TINY.audio_num_attention_heads * TINY.audio_attention_head_dim
    return TINY.caption_channels, TINY.caption_channels


def reference_inputs(version: str, *, per_token: bool = False, with_audio: bool = True, seed: int = 0) -> DenoiserInput:
    """Two samples with σ_a ≠ σ_v and different σ per sample; optionally per-token σ (a clean first latent
    frame and, in sample 1, a σ that varies inside a frame; clean leading audio tokens) and a padded text."""
    g = torch.Generator().manual_seed(seed)
    frames, height, width = VIDEO_GRID
    video = torch.randn(2, 128, frames, height, width, generator=g)
    audio = torch.randn(2, 8, AUDIO_FRAMES, 16, generator=g)
    sigma_video = torch.tensor([0.8, 0.35])
    sigma_audio = torch.tensor([0.25, 0.9])
    if per_token:
        grid = sigma_video.view(2, 1, 1, 1).expand(2, frames, height, width).clone()
        grid[:, 0] = 0.0  # first latent frame is a clean conditioning frame
        grid[1, 1, :, : width // 2] = 0.1  # σ varying inside one frame
        sigma_video = grid.reshape(2, -1)
        sigma_audio = sigma_audio.view(2, 1).expand(2, AUDIO_FRAMES).clone()
        sigma_audio[:, :3] = 0.0
    video_width, audio_width = text_widths(version)
    mask = torch.ones(2, TEXT_TOKENS, dtype=torch.long)
    mask[1, -3:] = 0
    text = TextContext(
        torch.randn(2, TEXT_TOKENS, video_width, generator=g), torch.randn(2, TEXT_TOKENS, audio_width, generator=g), mask
    )
    return DenoiserInput(
        video=video,
        audio=audio if with_audio else None,
        sigma_video=sigma_video,
        sigma_audio=sigma_audio if with_audio else None,
        text=text,
        fps=24.0,
    )


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    # On a machine with a GPU ComfyUI runs there while the diffusers reference stays on the CPU.
    actual, expected = actual.detach().float().cpu(), expected.detach().float().cpu()
    return float((actual - expected).norm() / expected.norm())


# ---- ComfyUI's two known forward deviations, neutralised at test time (no edit of ComfyUI's files) ----------


@contextlib.contextmanager
def neutralised_comfyui_deviations(diffusion_model, norm_eps: bool = True, v2a_order: bool = True):
    """Run ComfyUI's LTXAV as the reference does, by instance-level patches removed on exit:

    1. ``norm_eps``: q/k RMSNorm eps 1e-5 → 1e-6 (attribute of each norm module);
    2. ``v2a_order``: v2a reads the video stream *before* the a2v update: each block's forward is wrapped so
       that the a2v attention returns zeros (its in-place update adds nothing) and its real output, times
       ComfyUI's own a2v gate, is added to the video stream right after the v2a attention has run.
    """
    norms = [
        module
        for name, module in diffusion_model.named_modules()
        if norm_eps and name.startswith("transformer_blocks.") and name.endswith(("q_norm", "k_norm"))
    ]
    saved_eps = [norm.eps for norm in norms]
    for norm in norms:
        norm.eps = 1e-6
    blocks = list(diffusion_model.transformer_blocks) if v2a_order else []
    for block in blocks:
        block.forward = _reference_order_forward(block, block.forward)
    try:
        yield
    finally:
        for norm, eps in zip(norms, saved_eps):
            norm.eps = eps
        for block in blocks:
            del block.forward  # back to the class's forward


def _reference_order_forward(block, original_forward):
    def forward(x, *args, **kwargs):
        vx, _ = x
        pending = []
        a2v, v2a = block.audio_to_video_attn, block.video_to_audio_attn

        def a2v_deferred(*a, **k):
            out = type(a2v).forward(a2v, *a, **k)
            pending.append(out)
            return torch.zeros_like(out)

        def v2a_then_a2v_update(*a, **k):
            out = type(v2a).forward(v2a, *a, **k)
            gate = block.get_ada_values(block.scale_shift_table_a2v_ca_video[4:, :], vx.shape[0], kwargs["v_cross_gate_timestep"])[0]
            vx.addcmul_(pending.pop(), gate)
            return out

        a2v.forward, v2a.forward = a2v_deferred, v2a_then_a2v_update
        try:
            result = original_forward(x, *args, **kwargs)
        finally:
            del a2v.forward, v2a.forward
        assert not pending, "a2v ran without v2a: the neutralisation assumes both cross-modal attentions run"
        return result

    return forward


# ---- tests ----------------------------------------------------------------------------------------------


def test_backend_imports_without_comfyui():
    """CI has no ComfyUI: importing the backend module must not import it."""
    code = (
        "import sys; import ltx2_av_trainer.trainer.backends.comfyui.denoiser, ltx2_av_trainer.trainer.backends.comfyui.env; "
        "assert 'comfy' not in sys.modules, 'comfy imported at import time'"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("COMFYUI_PATH", "PYTHONPATH")}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_comfyui_path_that_is_not_a_checkout_is_named_in_the_error(tmp_path):
    from ltx2_av_trainer.trainer.backends.comfyui.env import ComfyUnavailableError, add_comfyui_to_path

    with pytest.raises(ComfyUnavailableError, match=f"{tmp_path}.*not a ComfyUI checkout.*COMFYUI_PATH"):
        add_comfyui_to_path(tmp_path)


@pytest.mark.comfyui
@pytest.mark.parametrize("version", ["2.0", "2.3"])
@pytest.mark.parametrize("wiring", ["reference", "own", "cross"])
def test_matches_diffusers_reference_once_deviations_are_neutralised(checkpoints, version, wiring):
    denoiser, reference = reference_pair(checkpoints[version], version, wiring=wiring)
    with torch.no_grad(), neutralised_comfyui_deviations(denoiser.module):
        for per_token in (False, True):
            inputs = reference_inputs(version, per_token=per_token)
            video, audio = denoiser(inputs)
            ref_video, ref_audio = reference(inputs)
            assert video.shape == inputs.video.shape and audio.shape == inputs.audio.shape
            assert relative_error(video, ref_video) < PARITY_TOLERANCE, (per_token, relative_error(video, ref_video))
            assert relative_error(audio, ref_audio) < PARITY_TOLERANCE, (per_token, relative_error(audio, ref_audio))


@pytest.mark.comfyui
@pytest.mark.parametrize("version", ["2.0", "2.3"])
def test_video_only_matches_diffusers_isolated_modalities(checkpoints, version):
    """audio=None: ComfyUI's empty audio stream switches audio and both cross-attentions off, like
    diffusers' isolate_modalities (no deviation to neutralise apart from the norm eps)."""
    denoiser, reference = reference_pair(checkpoints[version], version)
    inputs = reference_inputs(version, per_token=True, with_audio=False)
    with torch.no_grad(), neutralised_comfyui_deviations(denoiser.module):
        video, audio = denoiser(inputs)
    ref_video, _ = reference(inputs)
    assert audio is None
    assert relative_error(video, ref_video) < PARITY_TOLERANCE


@pytest.mark.comfyui
@pytest.mark.parametrize("version", ["2.0", "2.3"])
def test_unmodified_comfyui_deviation_stays_in_recorded_band(checkpoints, version):
    denoiser, reference = reference_pair(checkpoints[version], version)
    inputs = reference_inputs(version)
    with torch.no_grad():
        video, audio = denoiser(inputs)
        ref_video, ref_audio = reference(inputs)
        with neutralised_comfyui_deviations(denoiser.module, norm_eps=False):
            eps_video, eps_audio = denoiser(inputs)
    for what, bands, errors in (
        ("unmodified ComfyUI", UNMODIFIED_COMFYUI_BANDS[version], (relative_error(video, ref_video), relative_error(audio, ref_audio))),
        ("RMSNorm eps only", NORM_EPS_ONLY_BANDS[version], (relative_error(eps_video, ref_video), relative_error(eps_audio, ref_audio))),
    ):
        for stream, (low, high), error in zip(("video", "audio"), bands, errors):
            assert low < error < high, f"{what}: {stream} relative error {error:.3g} left its recorded band ({low}, {high})"


TRAINED_WEIGHTS = [
    "transformer_blocks.0.attn1.to_q.weight",
    "transformer_blocks.0.audio_attn2.to_k.weight",
    "transformer_blocks.0.audio_to_video_attn.to_v.weight",
    "transformer_blocks.0.video_to_audio_attn.to_q.weight",
    "transformer_blocks.1.attn2.to_out.0.weight",
    "transformer_blocks.1.audio_attn1.to_out.0.weight",
    "transformer_blocks.1.ff.net.0.proj.weight",
    "transformer_blocks.1.audio_ff.net.2.weight",
]


def weight_gradients(module: torch.nn.Module, denoiser, inputs: DenoiserInput) -> dict[str, torch.Tensor]:
    """Gradients of a velocity loss w.r.t. a few block weights (the Linear layers a LoRA adapts)."""
    params = dict(module.named_parameters())
    for name in TRAINED_WEIGHTS:
        params[name].requires_grad_(True)
    try:
        video, audio = denoiser(inputs)
        (video.square().mean() + audio.square().mean()).backward()
        return {name: params[name].grad.clone() for name in TRAINED_WEIGHTS}
    finally:
        for name in TRAINED_WEIGHTS:
            params[name].grad = None
            params[name].requires_grad_(False)


@pytest.mark.comfyui
@pytest.mark.parametrize("checkpointing", ["block", "model", "none"])
def test_gradients_match_out_of_place_reference(checkpoints, checkpointing):
    """ComfyUI's blocks update their streams in place; with our checkpointing the gradients must equal those
    of diffusers' out-of-place model (same weights, deviations neutralised)."""
    denoiser, reference = reference_pair(checkpoints["2.0"], "2.0", checkpointing=checkpointing)
    inputs = reference_inputs("2.0", per_token=True)
    expected = weight_gradients(reference.module, reference, inputs)
    with neutralised_comfyui_deviations(denoiser.module):
        actual = weight_gradients(denoiser.module, denoiser, inputs)
    for name in TRAINED_WEIGHTS:
        assert expected[name].norm() > 0
        assert relative_error(actual[name], expected[name]) < GRADIENT_TOLERANCE, (name, relative_error(actual[name], expected[name]))


@pytest.mark.comfyui
def test_block_checkpointing_reproduces_comfyui_forward_gradients(checkpoints):
    """Unmodified ComfyUI forward: per-block checkpointing gives the gradients of keeping all activations."""
    inputs = reference_inputs("2.3", per_token=True)
    block, _ = reference_pair(checkpoints["2.3"], "2.3", checkpointing="block")
    plain, _ = reference_pair(checkpoints["2.3"], "2.3", checkpointing="none")
    with_block = weight_gradients(block.module, block, inputs)
    without = weight_gradients(plain.module, plain, inputs)
    for name in TRAINED_WEIGHTS:
        assert relative_error(with_block[name], without[name]) < GRADIENT_TOLERANCE


def four_samples_with_different_sigmas(version: str, per_token: bool) -> DenoiserInput:
    """Four samples, every σ_v and σ_a different; per token: samples 1 and 3 vary inside a frame, sample 0
    does not (so the forward must reorder the batch for ComfyUI's spatial-mask check)."""
    first, second = reference_inputs(version, per_token=per_token, seed=0), reference_inputs(version, per_token=per_token, seed=1)
    mask = torch.cat([first.text.mask, second.text.mask])
    mask[2, -5:] = 0  # one more padded text
    return DenoiserInput(
        video=torch.cat([first.video, second.video]),
        audio=torch.cat([first.audio, second.audio]),
        sigma_video=torch.cat([first.sigma_video, 0.5 * second.sigma_video + 0.05]),
        sigma_audio=torch.cat([first.sigma_audio, 0.5 * second.sigma_audio + 0.05]),
        text=TextContext(torch.cat([first.text.video, second.text.video]), torch.cat([first.text.audio, second.text.audio]), mask),
        fps=first.fps,
    )


def one_sample(inputs: DenoiserInput, i: int) -> DenoiserInput:
    part = slice(i, i + 1)
    return DenoiserInput(inputs.video[part], inputs.audio[part], inputs.sigma_video[part], inputs.sigma_audio[part],
                         inputs.text.select(part), inputs.fps)


@pytest.mark.comfyui
@pytest.mark.parametrize("wiring", ["reference", "own", "cross"])
def test_batch_with_different_sigmas_is_one_forward_equal_to_single_forwards(checkpoints, wiring):
    denoiser, _ = reference_pair(checkpoints["2.3"], "2.3", wiring=wiring)
    for per_token in (False, True):
        inputs = four_samples_with_different_sigmas("2.3", per_token)
        calls = []
        handle = denoiser.module.register_forward_pre_hook(lambda module, args: calls.append(args[0][0].shape[0]))
        try:
            with torch.no_grad():
                video, audio = denoiser(inputs)
        finally:
            handle.remove()
        assert calls == [4], calls
        with torch.no_grad():
            for i in range(4):
                single_video, single_audio = denoiser(one_sample(inputs, i))
                assert relative_error(video[i : i + 1], single_video) < 1e-6, (per_token, i)
                assert relative_error(audio[i : i + 1], single_audio) < 1e-6, (per_token, i)


@pytest.mark.comfyui
def test_batch_without_per_sample_gates_would_mix_samples(checkpoints, monkeypatch):
    """Negative control: with ComfyUI's batch-wide gate max left in place, a sample's output depends on its
    neighbours' σ, so the per-sample gates are what makes one forward per batch correct."""
    import ltx2_av_trainer.trainer.backends.comfyui.denoiser as backend

    denoiser, _ = reference_pair(checkpoints["2.3"], "2.3")
    inputs = four_samples_with_different_sigmas("2.3", per_token=False)
    with torch.no_grad():
        singles = [denoiser(one_sample(inputs, i)) for i in range(4)]
        monkeypatch.setattr(backend, "_cross_modal_sigma_hooks", lambda *args: contextlib.nullcontext())
        video, audio = denoiser(inputs)
    # σ_a is not the batch max in samples 0 and 2 (a2v gate), σ_v not in samples 1, 2 and 3 (v2a gate).
    assert relative_error(video[0:1], singles[0][0]) > 1e-3
    assert relative_error(audio[1:2], singles[1][1]) > 1e-3


@pytest.mark.comfyui
def test_trains_on_loader_model_inside_inference_mode_without_second_copy(checkpoints):
    import comfy.model_management
    import comfy.sample
    from comfy.nested_tensor import NestedTensor

    from ltx2_av_trainer.trainer.backends.comfyui.denoiser import ComfyDenoiser, has_inference_tensors
    from ltx2_av_trainer.trainer.backends.comfyui.env import comfy_training_mode

    patcher = load_like_a_node(checkpoints["2.0"])
    module = patcher.model
    assert has_inference_tensors(module)
    old_tensors = [weakref.ref(t) for t in list(module.parameters()) + list(module.buffers())]
    model_bytes = sum(t.numel() * t.element_size() for t in module.parameters())
    inputs = reference_inputs("2.0", per_token=True)
    denoiser = ComfyDenoiser(patcher, "2.0")

    with torch.inference_mode():  # the node's execute() runs here
        comfy.model_management.load_models_gpu([patcher])  # as a sampler would load it
        before, _ = denoiser(inputs)  # calls without gradients work on the untouched MODEL
        assert has_inference_tensors(module)
        with torch.inference_mode(False):
            with pytest.raises(RuntimeError, match="prepare_for_training"):
                denoiser(inputs)
            preparation = denoiser.load()
            assert preparation.tensors_replaced == len(old_tensors)
            assert preparation.bytes_replaced >= model_bytes

            # LoRA-like adapters: trainable low-rank deltas added to a few block Linears.
            g = torch.Generator().manual_seed(0)
            adapters, handles = [], []
            for name, linear in denoiser.adaptable_modules():
                if name.endswith(("attn1.to_q", "audio_to_video_attn.to_k", "video_to_audio_attn.to_v")):
                    down = (0.1 * torch.randn(4, linear.in_features, generator=g)).requires_grad_(True)
                    up = (0.1 * torch.randn(linear.out_features, 4, generator=g)).requires_grad_(True)
                    adapters += [down, up]
                    hook = lambda mod, args, out, down=down, up=up: out + args[0] @ down.T @ up.T
                    handles.append(linear.register_forward_hook(hook))
            optimizer = torch.optim.AdamW(adapters, lr=1e-2)
            target_video = torch.zeros_like(inputs.video)
            losses = []
            with comfy_training_mode():
                for _ in range(4):
                    video, audio = denoiser(inputs)
                    loss = (video - target_video).square().mean() + audio.square().mean()
                    optimizer.zero_grad()
                    loss.backward()
                    assert all(p.grad is not None and p.grad.norm() > 0 for p in adapters)
                    optimizer.step()
                    losses.append(loss.item())
            for handle in handles:
                handle.remove()
        assert losses[-1] < losses[0]

        # The same module objects, now without inference tensors, and no copy of the weights left behind:
        # every replaced inference tensor has been freed.
        assert patcher.model is module and not has_inference_tensors(module)
        gc.collect()
        assert all(ref() is None for ref in old_tensors)
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in module.parameters()}
        assert sum(storages.values()) == model_bytes

        # The base weights are untouched and the MODEL still samples (2 Euler steps of AV sampling).
        with torch.no_grad():
            after, _ = denoiser(inputs)
        assert relative_error(after, before) < 1e-6
        frames, height, width = VIDEO_GRID
        latent = NestedTensor((torch.zeros(1, 128, frames, height, width), torch.zeros(1, 8, AUDIO_FRAMES, 16)))
        noise = comfy.sample.prepare_noise(latent, seed=0)
        context = torch.cat([inputs.text.video[:1], inputs.text.audio[:1]], dim=-1)
        conditioning = [[context, {}]]
        samples = comfy.sample.sample(patcher, noise, 2, 1.0, "euler", "simple", conditioning, conditioning, latent,
                                      disable_pbar=True, seed=0)
        video_sample, audio_sample = samples.unbind()
        assert video_sample.shape == (1, 128, frames, height, width) and audio_sample.shape == (1, 8, AUDIO_FRAMES, 16)
        assert torch.isfinite(video_sample).all() and torch.isfinite(audio_sample).all()


@pytest.mark.comfyui
def test_matches_comfyui_sampling_path_at_shared_sigma(checkpoints):
    """At σ_v = σ_a our direct call equals ComfyUI's own ``apply_model`` (what its samplers run), with the
    text made from a CONDITIONING tensor by ComfyUI's connectors: checks the σ scale and the context layout."""
    import comfy.utils

    from ltx2_av_trainer.trainer.backends.comfyui.denoiser import ComfyDenoiser, text_context_from_conditioning

    patcher = load_like_a_node(checkpoints["2.0"])
    denoiser = ComfyDenoiser(patcher, "2.0")
    denoiser.load()
    g = torch.Generator().manual_seed(1)
    # LTXAVTEModel output: projected Gemma features before the connectors, padding trimmed.
    conditioning = torch.randn(1, 7, TINY.caption_channels, generator=g)
    with torch.no_grad():
        text = text_context_from_conditioning(patcher, conditioning, unprocessed=True)
    assert text.video.shape == (1, 1024, TINY.caption_channels) and text.audio.shape == (1, 1024, TINY.caption_channels)
    assert bool(text.mask.all())

    frames, height, width = VIDEO_GRID
    video = torch.randn(1, 128, frames, height, width, generator=g)
    audio = torch.randn(1, 8, AUDIO_FRAMES, 16, generator=g)
    sigma = torch.tensor([0.6])
    inputs = DenoiserInput(video, audio, sigma, sigma, text, fps=25.0)
    packed, shapes = comfy.utils.pack_latents([video, audio])
    with torch.no_grad():
        ours_video, ours_audio = denoiser(inputs)
        denoised = patcher.model.apply_model(packed, sigma, c_crossattn=torch.cat([text.video, text.audio], -1),
                                             frame_rate=25.0, latent_shapes=shapes)
    velocity = (packed - denoised) / sigma  # ComfyUI's flow model: x0 = x - σ·v
    comfy_video, comfy_audio = comfy.utils.unpack_latents(velocity, shapes)
    assert relative_error(ours_video, comfy_video) < 1e-5
    assert relative_error(ours_audio, comfy_audio) < 1e-5


@pytest.mark.comfyui
def test_adaptable_modules_use_reference_names(checkpoints):
    for version in ("2.0", "2.3"):
        denoiser, reference = reference_pair(checkpoints[version], version)
        paths = {name for name, _ in denoiser.adaptable_modules()}
        assert paths == {name for name, _ in reference.adaptable_modules()}
        assert "transformer_blocks.1.audio_attn1.to_q" in paths and "transformer_blocks.0.ff.net.0.proj" in paths
        assert all(isinstance(module, torch.nn.Linear) for _, module in denoiser.adaptable_modules())


@pytest.mark.comfyui
def test_fingerprint_is_stable_and_ignores_applied_weight_patches(checkpoints, tmp_path):
    import comfy.lora

    from comfy_fixtures import write_tiny_ltxav_checkpoint
    from ltx2_av_trainer.trainer.backends.comfyui.denoiser import ComfyDenoiser

    first = ComfyDenoiser(load_like_a_node(checkpoints["2.0"]), "2.0")
    second = ComfyDenoiser(load_like_a_node(checkpoints["2.0"]), "2.0")
    other = ComfyDenoiser(load_like_a_node(write_tiny_ltxav_checkpoint(tmp_path, "2.0", TINY, seed=1)), "2.0")
    assert first.fingerprint() == second.fingerprint() != other.fingerprint()

    # A LoRA merged into the weights by ComfyUI (as a LoRA loader does) leaves the base fingerprint alone.
    key = "diffusion_model.transformer_blocks.0.attn1.to_q"
    lora = {f"{key}.lora_down.weight": torch.randn(2, 32), f"{key}.lora_up.weight": torch.randn(32, 2)}
    patches = comfy.lora.load_lora(lora, comfy.lora.model_lora_keys_unet(first.model_patcher.model, {}), log_missing=False)
    patched = first.model_patcher.clone()
    assert patched.add_patches(patches, 1.0)
    patched_denoiser = ComfyDenoiser(patched, "2.0")
    weight_before = patched_denoiser.module.transformer_blocks[0].attn1.to_q.weight.detach().clone()
    patched_denoiser.load()
    assert not torch.equal(patched_denoiser.module.transformer_blocks[0].attn1.to_q.weight, weight_before)
    assert patched_denoiser.fingerprint() == first.fingerprint()


@pytest.mark.comfyui
def test_clear_errors_for_wrong_version_and_inputs(checkpoints):
    from ltx2_av_trainer.trainer.backends.comfyui.denoiser import ComfyDenoiser

    patcher = load_like_a_node(checkpoints["2.0"])
    with pytest.raises(ConfigError, match=r'model.version is .2.3. but the MODEL is LTX-2.0'):
        ComfyDenoiser(patcher, "2.3")
    with pytest.raises(ConfigError, match="checkpointing"):
        ComfyDenoiser(patcher, "2.0", checkpointing="layers")
    denoiser = ComfyDenoiser(patcher, "2.0")
    good = reference_inputs("2.0")
    narrow = TextContext(good.text.video[..., :16], good.text.audio, good.text.mask)
    with torch.no_grad():
        with pytest.raises(ValueError, match="text context widths"):
            denoiser(DenoiserInput(good.video, good.audio, good.sigma_video, good.sigma_audio, narrow, good.fps))
        with pytest.raises(ValueError, match="sigma_audio is None"):
            denoiser(DenoiserInput(good.video, good.audio, good.sigma_video, None, good.text, good.fps))
        with pytest.raises(ValueError, match="sigma_video must be"):
            denoiser(DenoiserInput(good.video, good.audio, good.sigma_video[:1], good.sigma_audio, good.text, good.fps))


@pytest.mark.comfyui
def test_fingerprint_is_remembered_per_loaded_model(checkpoints, monkeypatch):
    """A queue makes a new ComfyDenoiser for the MODEL the loader keeps: its fingerprint must not read the weights
    again (on a 19B model the old full checksum took minutes per queue)."""
    import ltx2_av_trainer.trainer.backends.comfyui.denoiser as denoiser_module
    from ltx2_av_trainer.trainer.backends.comfyui.denoiser import ComfyDenoiser

    calls = []
    identity = denoiser_module.weights_identity
    monkeypatch.setattr(denoiser_module, "weights_identity", lambda *a, **k: calls.append(1) or identity(*a, **k))
    model = load_like_a_node(checkpoints["2.3"])
    first = ComfyDenoiser(model, "2.3").fingerprint()
    assert ComfyDenoiser(model, "2.3").fingerprint() == ComfyDenoiser(model.clone(), "2.3").fingerprint() == first
    assert len(calls) == 1
    other = load_like_a_node(checkpoints["2.3"])  # the same file loaded again: another object, the same identity
    assert ComfyDenoiser(other, "2.3").fingerprint() == first and len(calls) == 2
