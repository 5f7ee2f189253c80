"""ComfyUI tier: every training mode against the conditioning ComfyUI's CORE inference nodes build.

For each mode a core node (``LTXVImgToVideo``, ``LTXVAddGuide`` + ``GetICLoRAParameters``, ``LTXVReferenceAudio``,
``EmptyLTXVLatentVideo`` next to an encoded audio latent) conditions a tiny LTXAV model, and ComfyUI's own sampler
(``comfy.sample.sample_custom``, one step at a training σ, the raw model output captured by a diffusion-model
wrapper) runs it. Our training forward — ``conditioning.condition_inputs`` (what ``training_step`` calls) into our
denoiser — runs on the same latents, noise and σ. They must agree to float32 rounding (``ComfyDenoiser``) and, with
ComfyUI's two known forward deviations neutralised, the diffusers backend too. A negative control per mode (the
reference moved, or its timesteps changed) shows the comparison is discriminating.

Every test runs on the LTX-2.0 and the LTX-2.3 tiny model. Measured (ComfyUI v0.33 at commit 783545f6, torch 2.11
CPU, float32, seed-0 tiny weights) with ``pytest -s``: the relative errors are printed per mode.
"""

from __future__ import annotations

import os

import pytest
import torch

from ltx2_av_trainer.trainer.config import TinyModelConfig

TINY = TinyModelConfig()
FPS = 25.0
FRAMES, SIZE = 17, 128  # 3 latent frames of 4 x 4 tokens
SIGMA = 0.6
EXACT = 1e-5  # float32 rounding of two runs of the same ComfyUI model (measured ~1e-7)
DIFFUSERS = 1e-5  # diffusers against ComfyUI with its deviations neutralised (measured ~3e-7)
CONTROL = 1e-3  # a moved reference must change the output by far more than rounding


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().float().cpu(), expected.detach().float().cpu()
    return float((actual - expected).norm() / expected.norm())


# ---- ComfyUI objects -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """ComfyUI importable (CPU library mode) with its model folders in a temporary folder."""
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        pytest.skip("COMFYUI_PATH is not set: point it at a ComfyUI checkout to run the ComfyUI tier (make test-comfyui)")
    from ltx2_av_trainer.trainer.backends.comfyui.env import import_model_management

    import_model_management(path)
    from comfy_fixtures import comfy_model_folders

    root = tmp_path_factory.mktemp("mode_parity")
    folders = {name: root / name for name in ("checkpoints", "loras", "weights")}
    for folder in folders.values():
        folder.mkdir()
    with comfy_model_folders({name: folders[name] for name in ("checkpoints", "loras")}):
        yield folders


@pytest.fixture(scope="module", params=["2.0", "2.3"])
def parts(home, request):
    """The loader's MODEL, the video VAE, the audio VAE and the checkpoint's weights (for diffusers), for LTX-2.0
    and LTX-2.3."""
    import comfy.sd
    import comfy_model_fixtures as fixtures
    from safetensors.torch import load_file

    from comfy_fixtures import write_tiny_ltxav_checkpoint

    version = request.param
    checkpoint = write_tiny_ltxav_checkpoint(home["weights"], version, TINY)
    fixtures.write_tiny_audio_vae(home["checkpoints"])
    with torch.inference_mode():
        model = comfy.sd.load_diffusion_model(str(checkpoint))
        vae = fixtures.load_video_vae(fixtures.write_tiny_video_vae(home["weights"]))
        audio_vae = fixtures.load_audio_vae("tiny_ltx2_audio_vae.safetensors")
    return {"model": model, "vae": vae, "audio_vae": audio_vae, "state": load_file(str(checkpoint)), "version": version}


@pytest.fixture(scope="module")
def ours(parts):
    from ltx2_av_trainer.trainer.backends.comfyui.denoiser import ComfyDenoiser

    denoiser = ComfyDenoiser(parts["model"], parts["version"], checkpointing="none")
    denoiser.load()
    return denoiser


@pytest.fixture(scope="module")
def diffusers_denoiser(parts):
    from comfy_fixtures import diffusers_denoiser_from_comfy_state

    return diffusers_denoiser_from_comfy_state(parts["state"], parts["version"], TINY)


@pytest.fixture(scope="module")
def prompt(parts):
    """A CONDITIONING as the LTX-2 text encoder gives it (projected Gemma features before the connectors) and the
    TextContext our cache would hold for it."""
    from ltx2_av_trainer.trainer.backends.comfyui.denoiser import text_context_from_conditioning

    from ltx2_av_trainer.trainer.backends.comfyui.denoiser import context_widths, ltxav_diffusion_model

    # LTX-2.0's text encoder projects to caption_channels; LTX-2.3's dual projection to the video and audio widths.
    width = sum(context_widths(ltxav_diffusion_model(parts["model"]))) if parts["version"] == "2.3" else TINY.caption_channels
    features = torch.randn(1, 7, width, generator=torch.Generator().manual_seed(3))
    conditioning = [[features, {"unprocessed_ltxav_embeds": True, "frame_rate": FPS}]]
    with torch.no_grad():
        text = text_context_from_conditioning(parts["model"], features, unprocessed=True)
    return conditioning, text


def comfy_sampler_output(model_patcher, positive, latent: dict, noise: list[torch.Tensor], sigma: float) -> list[torch.Tensor]:
    """The raw model output (velocities, guide frames included) of ComfyUI's own sampling path at ``sigma``:
    ``sample_custom`` with a one-step sampler, cfg 1, the latent's noise mask, the model output captured by a
    diffusion-model wrapper."""
    import comfy.nested_tensor
    import comfy.patcher_extension
    import comfy.sample
    import comfy.samplers

    captured: list[list[torch.Tensor]] = []

    def capture(executor, *args, **kwargs):
        out = executor(*args, **kwargs)
        captured.append([t.detach().clone() for t in (out if isinstance(out, (list, tuple)) else [out])])
        return out

    def one_step(model, x, sigmas, extra_args=None, callback=None, disable=None):
        return model(x, sigmas[0] * x.new_ones([x.shape[0]]), **(extra_args or {}))

    patched = model_patcher.clone()
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "ltx2av_mode_parity", capture)
    with torch.no_grad():
        comfy.sample.sample_custom(patched, comfy.nested_tensor.NestedTensor(noise), 1.0,
                                   comfy.samplers.KSAMPLER(one_step), torch.tensor([sigma, 0.0]), positive, positive,
                                   latent["samples"], noise_mask=latent.get("noise_mask"))
    assert len(captured) == 1, f"expected one model call, got {len(captured)}"
    return captured[0]


def concat_av(video_latent: dict, audio_latent: dict) -> dict:
    from comfy_extras.nodes_lt import LTXVConcatAVLatent

    return LTXVConcatAVLatent.execute(video_latent, audio_latent).args[0]


def latents(seed: int, audio_frames: int = 17):
    """Clean video/audio latents of a clip and the noise of one training step."""
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(1, 128, (FRAMES - 1) // 8 + 1, SIZE // 32, SIZE // 32, generator=g)
    audio = torch.randn(1, 8, audio_frames, 16, generator=g)
    return video, audio, torch.randn(video.shape, generator=g), torch.randn(audio.shape, generator=g)


def sample(video, audio, text, **fields):
    """A one-item batch as the cache loads it."""
    from ltx2_av_trainer.trainer.data.batches import LatentSample, collate

    return collate([LatentSample(id="clip", video=video[0], audio=audio[0], audio_valid_frames=audio.shape[2],
                                 text=text.select(0), fps=FPS, **fields)])


def training_forward(denoiser, batch, mode: str, video, audio, noise_video, noise_audio, text, *, sigma_video=SIGMA,
                     sigma_audio=SIGMA, first_frame=None):
    """Our training forward at fixed σ and noise: the conditioning ``training_step`` builds, into ``denoiser``."""
    from ltx2_av_trainer.trainer.training.conditioning import condition_inputs
    from ltx2_av_trainer.trainer.training.timesteps import add_noise

    sv, sa = torch.tensor([sigma_video]), torch.tensor([sigma_audio])
    conditioned = condition_inputs(batch, mode, video, add_noise(video, noise_video, sv), sv,
                                   add_noise(audio, noise_audio, sa), sa, text, first_frame)
    with torch.no_grad():
        return denoiser(conditioned.inputs), conditioned


def neutralised(parts):
    from test_comfy_backend import neutralised_comfyui_deviations

    return neutralised_comfyui_deviations(parts["model"].model.diffusion_model)


def report(mode: str, **errors: float) -> None:
    print(f"\n[mode parity] {mode}: " + ", ".join(f"{name} {value:.2e}" for name, value in errors.items()))


# ---- first frame (LTXVImgToVideo) -----------------------------------------------------------------------------


@pytest.mark.comfyui
def test_first_frame_matches_ltxv_img_to_video(parts, ours, diffusers_denoiser, prompt):
    from comfy_extras.nodes_lt import LTXVImgToVideo

    positive, text = prompt
    video, audio, noise_video, noise_audio = latents(seed=11)
    image = torch.rand(1, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(12))
    with torch.inference_mode():
        _, _, node_latent = LTXVImgToVideo.execute(positive, positive, image, parts["vae"], SIZE, SIZE, FRAMES, 1, 1.0).args
    # The node's first latent frame is the encoded image; the rest of the clip is ours.
    assert node_latent["noise_mask"].flatten().tolist() == [0.0, 1.0, 1.0]
    video = video.clone()
    video[:, :, :1] = node_latent["samples"][:, :, :1]
    latent = concat_av({"samples": video.clone(), "noise_mask": node_latent["noise_mask"]}, {"samples": audio})
    comfy_video, comfy_audio = comfy_sampler_output(parts["model"], positive, latent, [noise_video, noise_audio], SIGMA)

    batch = sample(video, audio, text)
    first = torch.tensor([True])
    (our_video, our_audio), conditioned = training_forward(ours, batch, "av", video, audio, noise_video, noise_audio,
                                                           text, first_frame=first)
    assert conditioned.video_loss_mask.flatten().tolist() == [0.0, 1.0, 1.0]  # the image frame is never a target
    errors = {"video": relative_error(our_video, comfy_video), "audio": relative_error(our_audio, comfy_audio)}
    assert max(errors.values()) < EXACT, errors

    # Negative controls: the clean first frame at the clip's σ instead of 0; the first frame noised like the rest.
    from ltx2_av_trainer.trainer.backends.interface import DenoiserInput

    (control_video, _), _ = training_forward(ours, batch, "av", video, audio, noise_video, noise_audio, text)
    inputs = conditioned.inputs
    with torch.no_grad():
        wrong_sigma, _ = ours(DenoiserInput(inputs.video, inputs.audio, torch.tensor([SIGMA]), inputs.sigma_audio, text, FPS))
    errors["control: first frame at σ"] = relative_error(wrong_sigma, comfy_video)
    errors["control: first frame noised"] = relative_error(control_video, comfy_video)
    assert errors["control: first frame at σ"] > CONTROL and errors["control: first frame noised"] > CONTROL, errors

    with neutralised(parts):
        comfy_video_n, comfy_audio_n = comfy_sampler_output(parts["model"], positive, latent, [noise_video, noise_audio], SIGMA)
    (diff_video, diff_audio), _ = training_forward(diffusers_denoiser, batch, "av", video, audio, noise_video, noise_audio,
                                                   text, first_frame=first)
    errors["diffusers video"] = relative_error(diff_video, comfy_video_n)
    errors["diffusers audio"] = relative_error(diff_audio, comfy_audio_n)
    report("first frame (LTXVImgToVideo)", **errors)
    assert errors["diffusers video"] < DIFFUSERS and errors["diffusers audio"] < DIFFUSERS, errors


# ---- IC-LoRA (LTXVAddGuide + GetICLoRAParameters) --------------------------------------------------------------


def ic_lora_parameters(parts, home, factor: int) -> dict:
    """``GetICLoRAParameters`` on the MODEL after ComfyUI's LoRA loader loaded a file we export in the IC mode."""
    from comfy_extras.nodes_lt import GetICLoRAParameters
    from nodes import LoraLoaderModelOnly

    from ltx2_av_trainer.trainer.adapters.files import save_network
    from ltx2_av_trainer.trainer.adapters.network import build_lora
    from ltx2_av_trainer.trainer.backends.comfyui.denoiser import ComfyDenoiser
    from ltx2_av_trainer.trainer.config import Config
    from ltx2_av_trainer.trainer.training.conditioning import lora_metadata

    config = Config.from_dict({"conditioning": {"mode": "ic"}, "network": {"preset": "v2v", "rank": 2, "alpha": 2.0},
                               "dataset": {"reference_downscale": factor, "width": SIZE, "height": SIZE}})
    denoiser = ComfyDenoiser(parts["model"], parts["version"], checkpointing="none")
    network = build_lora(denoiser, config.network, with_audio=True)
    try:
        name = f"ic_factor{factor}.safetensors"
        save_network(network, home["loras"] / name, config_json=config.to_json(), base_fingerprint="test", step=1,
                     version=parts["version"], extra_metadata=lora_metadata(config))
    finally:
        network.detach()
    with torch.inference_mode():
        loaded = LoraLoaderModelOnly().load_lora_model_only(parts["model"], name, 1.0)[0]
        return GetICLoRAParameters.execute(loaded).args[0]


@pytest.mark.comfyui
@pytest.mark.parametrize("factor", [1, 2])
def test_ic_lora_matches_ltxv_add_guide(parts, home, ours, diffusers_denoiser, prompt, factor):
    from comfy_extras.nodes_lt import LTXVAddGuide

    positive, text = prompt
    parameters = ic_lora_parameters(parts, home, factor)
    assert parameters == {"reference_downscale_factor": factor}  # read back from our LoRA's metadata
    video, audio, noise_video, noise_audio = latents(seed=21 + factor)
    reference = torch.rand(9, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(23))  # 9 frames: 2 latent frames

    def add_guide(frame_idx: int):
        with torch.inference_mode():
            pos, _, guided = LTXVAddGuide.execute(positive, positive, parts["vae"], {"samples": video.clone()}, reference,
                                                  frame_idx, 1.0, None, parameters).args
        noise_guided = torch.cat([noise_video, torch.zeros_like(guided["samples"][:, :, video.shape[2]:])], dim=2)
        latent = concat_av(guided, {"samples": audio})
        return guided, comfy_sampler_output(parts["model"], pos, latent, [noise_guided, noise_audio], SIGMA), pos, latent, noise_guided

    guided, (comfy_video, comfy_audio), guided_positive, latent, noise_guided = add_guide(0)
    frames = video.shape[2]
    # The node spread the reference over the video grid; our cache holds it at 1/factor of the size.
    guide = guided["samples"][:, :, frames:, ::factor, ::factor].clone()
    assert guide.shape == (1, 128, 2, SIZE // 32 // factor, SIZE // 32 // factor)
    batch = sample(video, audio, text, reference_video=guide[0])
    (our_video, our_audio), conditioned = training_forward(ours, batch, "ic", video, audio, noise_video, noise_audio, text)
    assert conditioned.video_loss_mask is None and our_video.shape == video.shape  # the guide is never a target
    errors = {"video": relative_error(our_video, comfy_video[:, :, :frames]), "audio": relative_error(our_audio, comfy_audio)}
    assert max(errors.values()) < EXACT, errors

    # Negative control: the same reference added at frame 8 (one latent frame later) moves only its positions.
    _, (moved_video, _), *_ = add_guide(8)
    errors["control: guide at frame 8"] = relative_error(our_video, moved_video[:, :, :frames])
    assert errors["control: guide at frame 8"] > CONTROL, errors

    with neutralised(parts):
        comfy_video_n, comfy_audio_n = comfy_sampler_output(parts["model"], guided_positive, latent,
                                                            [noise_guided, noise_audio], SIGMA)
    (diff_video, diff_audio), _ = training_forward(diffusers_denoiser, batch, "ic", video, audio, noise_video,
                                                   noise_audio, text)
    errors["diffusers video"] = relative_error(diff_video, comfy_video_n[:, :, :frames])
    errors["diffusers audio"] = relative_error(diff_audio, comfy_audio_n)
    report(f"IC-LoRA (LTXVAddGuide, reference_downscale_factor {factor})", **errors)
    assert errors["diffusers video"] < DIFFUSERS and errors["diffusers audio"] < DIFFUSERS, errors


# ---- ID-LoRA (LTXVReferenceAudio) -------------------------------------------------------------------------------


@pytest.mark.comfyui
def test_id_lora_matches_ltxv_reference_audio(parts, ours, diffusers_denoiser, prompt, monkeypatch):
    from comfy_extras.nodes_lt import LTXVReferenceAudio

    from ltx2_av_trainer.trainer.backends.comfyui.encoders import encode_audio
    from ltx2_av_trainer.trainer.backends.interface import DenoiserInput

    positive, text = prompt
    video, audio, noise_video, noise_audio = latents(seed=31)
    waveform = 0.3 * torch.randn(1, 2, 16000, generator=torch.Generator().manual_seed(32))  # 1 s at 16 kHz
    with torch.inference_mode():
        model, ref_positive, _ = LTXVReferenceAudio.execute(parts["model"], positive, positive,
                                                            {"waveform": waveform, "sample_rate": 16000},
                                                            parts["audio_vae"], 0.0, 0.0, 1.0).args
        ours_encoded = encode_audio(parts["audio_vae"], waveform)
    tokens = ref_positive[0][1]["ref_audio"]["tokens"]
    # The node's VAE encode goes through 44.1 kHz and keeps a centred multiple of 4096 samples there (up to
    # 93 ms less); our cache encodes at 16 kHz uncropped. Same VAE, same latent rate: the model is compared on the
    # node's latents, as the cache would hold them.
    cached = tokens.reshape(1, tokens.shape[1], 8, 16).permute(0, 2, 1, 3).contiguous()
    assert 0 <= ours_encoded.shape[2] - cached.shape[2] <= 3
    latent = concat_av({"samples": video}, {"samples": audio})
    comfy_video, comfy_audio = comfy_sampler_output(model, ref_positive, latent, [noise_video, noise_audio], SIGMA)

    batch = sample(video, audio, text, reference_audio=cached[0])
    (our_video, our_audio), conditioned = training_forward(ours, batch, "id", video, audio, noise_video, noise_audio, text)
    assert our_audio.shape == audio.shape  # the reference is never a target
    errors = {"video": relative_error(our_video, comfy_video), "audio": relative_error(our_audio, comfy_audio)}
    assert max(errors.values()) < EXACT, errors

    # Negative control: the same clean reference tokens at σ = 0, but at the ordinary (non-negative) times, as
    # the start of the clip's own audio.
    inputs = conditioned.inputs
    reference_frames = cached.shape[2]
    sigma_audio = torch.cat([torch.zeros(1, reference_frames), torch.full((1, audio.shape[2]), SIGMA)], dim=1)
    with torch.no_grad():
        _, plain = ours(DenoiserInput(inputs.video, torch.cat([cached, inputs.audio], dim=2), inputs.sigma_video,
                                      sigma_audio, text, FPS))
    errors["control: reference at t >= 0"] = relative_error(plain[:, :, reference_frames:], comfy_audio)
    assert errors["control: reference at t >= 0"] > CONTROL, errors

    with neutralised(parts):
        comfy_video_n, comfy_audio_n = comfy_sampler_output(model, ref_positive, latent, [noise_video, noise_audio], SIGMA)
    (diff_video, diff_audio), _ = training_forward(diffusers_denoiser, batch, "id", video, audio, noise_video,
                                                   noise_audio, text)
    errors["diffusers video"] = relative_error(diff_video, comfy_video_n)
    errors["diffusers audio"] = relative_error(diff_audio, comfy_audio_n)
    # Negative control on the diffusers side, which places the reference itself: one latent step later.
    import ltx2_av_trainer.trainer.backends.diffusers_backend as backend

    original = backend.reference_audio_positions
    monkeypatch.setattr(backend, "reference_audio_positions", lambda *a, **k: original(*a, **k) + 0.04)
    (_, shifted_audio), _ = training_forward(diffusers_denoiser, batch, "id", video, audio, noise_video, noise_audio, text)
    errors["control: diffusers reference 40 ms later"] = relative_error(shifted_audio, comfy_audio_n)
    report("ID-LoRA (LTXVReferenceAudio)", **errors)
    assert errors["diffusers video"] < DIFFUSERS and errors["diffusers audio"] < DIFFUSERS, errors
    assert errors["control: diffusers reference 40 ms later"] > CONTROL, errors


# ---- audio only (EmptyLTXVLatentVideo stand-in) ------------------------------------------------------------------


@pytest.mark.comfyui
def test_audio_only_matches_comfyui_audio_generation_path(parts, ours, diffusers_denoiser, prompt):
    from comfy_extras.nodes_lt import EmptyLTXVLatentVideo
    from comfy_extras.nodes_lt_audio import LTXVAudioVAEEncode, LTXVEmptyLatentAudio

    from ltx2_av_trainer.trainer.data.audio_only import standin_video_latent

    positive, text = prompt
    waveform = 0.3 * torch.randn(1, 2, int(FRAMES / FPS * 16000), generator=torch.Generator().manual_seed(41))
    with torch.inference_mode():
        # 64x64: what the README and the shipped workflow tell users to generate with.
        empty = EmptyLTXVLatentVideo.execute(64, 64, FRAMES, 1).args[0]
        encoded = LTXVAudioVAEEncode.execute({"waveform": waveform, "sample_rate": 16000}, parts["audio_vae"]).args[0]
        empty_audio = LTXVEmptyLatentAudio.execute(FRAMES, FPS, 1, parts["audio_vae"]).args[0]
    standin = standin_video_latent(FRAMES)[None]
    assert torch.equal(standin, empty["samples"])  # the cache's stand-in is exactly the node's empty latent
    audio = encoded["samples"].clone()
    assert audio.shape == empty_audio["samples"].shape  # the audio length LTXVEmptyLatentAudio generates
    g = torch.Generator().manual_seed(42)
    noise_video, noise_audio = torch.randn(standin.shape, generator=g), torch.randn(audio.shape, generator=g)
    latent = concat_av(empty, {"samples": audio})
    _, comfy_audio = comfy_sampler_output(parts["model"], positive, latent, [noise_video, noise_audio], SIGMA)

    batch = sample(standin, audio, text, audio_only=True)
    (_, our_audio), conditioned = training_forward(ours, batch, "audio", standin, audio, noise_video, noise_audio, text)
    assert not conditioned.train_video  # the stand-in is never a target
    errors = {"audio": relative_error(our_audio, comfy_audio)}
    assert errors["audio"] < EXACT, errors

    # Negative controls: a 128x128 stand-in, and the stand-in at another σ than the audio.
    big = torch.zeros(1, 128, standin.shape[2], 4, 4)
    (_, big_audio), _ = training_forward(ours, sample(big, audio, text, audio_only=True), "audio", big, audio,
                                         torch.randn(big.shape, generator=g), noise_audio, text)
    (_, other_sigma), _ = training_forward(ours, batch, "audio", standin, audio, noise_video, noise_audio, text,
                                           sigma_video=0.9)
    errors["control: 128x128 stand-in"] = relative_error(big_audio, comfy_audio)
    errors["control: stand-in at σ 0.9"] = relative_error(other_sigma, comfy_audio)
    assert errors["control: 128x128 stand-in"] > CONTROL and errors["control: stand-in at σ 0.9"] > CONTROL, errors

    with neutralised(parts):
        _, comfy_audio_n = comfy_sampler_output(parts["model"], positive, latent, [noise_video, noise_audio], SIGMA)
    (_, diff_audio), _ = training_forward(diffusers_denoiser, batch, "audio", standin, audio, noise_video, noise_audio, text)
    errors["diffusers audio"] = relative_error(diff_audio, comfy_audio_n)
    report("audio only (EmptyLTXVLatentVideo 64x64 stand-in)", **errors)
    assert errors["diffusers audio"] < DIFFUSERS, errors
