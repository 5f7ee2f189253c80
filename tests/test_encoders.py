"""The headless encoders: log-mel front-end, diffusers VAEs / vocoders, Gemma-3 + connectors, fingerprints.

Everything runs on the real diffusers / transformers classes at tiny sizes with seeded random weights.
"""

from __future__ import annotations

import copy
import json
import math
import time
from functools import lru_cache

import pytest
import torch

from ltx2_av_trainer.trainer.backends.audio_frontend import (
    audio_latent_count,
    log_mel_spectrogram,
    mel_frame_count,
)
from ltx2_av_trainer.trainer.backends.diffusers_backend import DiffusersDenoiser, build_tiny_transformer
from ltx2_av_trainer.trainer.backends.diffusers_encoders import (
    DiffusersEncoders,
    build_tiny_encoders,
    load_encoders,
)
from ltx2_av_trainer.trainer.backends.interface import DenoiserInput, TextContext
from ltx2_av_trainer.trainer.backends.text_encoder import (
    TINY_MAX_TEXT_LENGTH,
    PrecomputedText,
    TextEncoder,
    build_tiny_text_encoder,
    build_tiny_tokenizer,
    save_precomputed_text,
)
from ltx2_av_trainer.trainer.backends.fingerprint import tensor_checksum, tokenizer_digest
from ltx2_av_trainer.trainer.config import ConfigError, TinyModelConfig

VERSIONS = ["2.0", "2.3"]
TINY = TinyModelConfig()
SR = 16000


def voice_like(seconds: float, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """A stereo, voice-like test signal: harmonics of a gliding pitch, plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * SR), dtype=torch.float32) / SR
    rows = []
    for b in range(batch):
        f0 = 120.0 + 40.0 * b + 30.0 * torch.sin(2 * math.pi * 0.7 * t)
        phase = 2 * math.pi * torch.cumsum(f0, 0) / SR
        tone = sum(torch.sin(k * phase) / k for k in range(1, 6)) * 0.2
        left = tone + 0.01 * torch.randn(t.shape, generator=g)
        right = 0.8 * tone + 0.01 * torch.randn(t.shape, generator=g)
        rows.append(torch.stack([left, right]))
    return torch.stack(rows)


def clip_frames(frames: int = 25, height: int = 96, width: int = 128, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, frames, height, width, generator=g) * 2 - 1


@lru_cache(maxsize=None)
def shared_encoders(version: str) -> DiffusersEncoders:
    """Tiny encoders shared by the tests that do not modify them (tests that do build their own)."""
    return build_tiny_encoders(version, TINY, seed=0)


@pytest.fixture(params=VERSIONS)
def encoders(request) -> DiffusersEncoders:
    return shared_encoders(request.param)


# ---- audio front-end ----------------------------------------------------------------------------


def test_log_mel_matches_torchaudio():
    torchaudio_transforms = pytest.importorskip("torchaudio.transforms")
    wave = voice_like(1.3, batch=2)
    ours = log_mel_spectrogram(wave, SR)
    reference = torchaudio_transforms.MelSpectrogram(
        sample_rate=SR, n_fft=1024, win_length=1024, hop_length=160, f_min=0.0, f_max=8000.0, n_mels=64,
        window_fn=torch.hann_window, center=True, pad_mode="reflect", power=1.0, mel_scale="slaney", norm="slaney",
    )(wave)
    reference = torch.log(torch.clamp(reference, min=1e-5)).permute(0, 1, 3, 2)
    assert ours.shape == reference.shape == (2, 2, mel_frame_count(wave.shape[-1]), 64)
    assert ours.dtype == torch.float32
    relative = (ours - reference).abs().max() / reference.abs().max()
    assert relative < 1e-5, relative


def test_log_mel_frame_rate_and_channels():
    for seconds in (0.5, 1.0, 2.0):
        samples = int(seconds * SR)
        assert mel_frame_count(samples) == 1 + samples // 160  # centred frames, ≈100 per second
        assert abs(mel_frame_count(samples) / seconds - 100) <= 2 / seconds
    stereo = voice_like(0.5)
    mono = stereo[:, :1]
    mel_mono = log_mel_spectrogram(mono, SR)
    assert mel_mono.shape[1] == 2 and torch.equal(mel_mono[:, 0], mel_mono[:, 1])
    with pytest.warns(UserWarning, match="6 channels"):
        surround = log_mel_spectrogram(stereo.repeat(1, 3, 1), SR)
    assert surround.shape[1] == 2


def test_log_mel_rejects_bad_audio():
    with pytest.raises(ValueError, match="resample"):
        log_mel_spectrogram(voice_like(0.5), 44100)
    with pytest.raises(ValueError, match="at least 513 samples"):
        log_mel_spectrogram(torch.zeros(1, 2, 300), SR)
    broken = voice_like(0.5)
    broken[0, 0, 10] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        log_mel_spectrogram(broken, SR)


# ---- shapes, dtypes and fit with the tiny transformer ---------------------------------------------


def test_shapes_dtypes_and_denoiser_fit(encoders):
    version = encoders.version
    video = encoders.encode_video(clip_frames())
    audio = encoders.encode_audio(voice_like(1.0))
    text = encoders.encode_text(["ohwx, a man speaks calmly"])
    assert video.shape == (1, 128, 4, 3, 4) and video.dtype == torch.float32
    assert audio.shape == (1, 8, 26, 16) and audio.dtype == torch.float32
    widths = (32, 32) if version == "2.0" else (32, 16)  # 2.0: caption width; 2.3: video / audio inner widths
    assert (text.video.shape[-1], text.audio.shape[-1]) == widths
    assert text.video.shape[:2] == text.audio.shape[:2] == text.mask.shape == (1, TINY_MAX_TEXT_LENGTH)
    assert torch.isfinite(video).all() and torch.isfinite(audio).all() and torch.isfinite(text.video).all()

    # The contexts and latents feed the embedded tiny transformer of the same version as they are.
    denoiser = DiffusersDenoiser(build_tiny_transformer(version, TINY), version)
    sigma = torch.tensor([0.5])
    with torch.no_grad():
        v_pred, a_pred = denoiser(DenoiserInput(video, audio, sigma, sigma, text, fps=25.0))
    assert v_pred.shape == video.shape and a_pred.shape == audio.shape


def test_audio_latents_per_second(encoders):
    for seconds in (0.5, 1.37, 2.0):
        samples = int(seconds * SR)
        latents = encoders.encode_audio(voice_like(seconds))
        assert latents.shape[2] == encoders.audio_latent_frames(samples) == audio_latent_count(samples)
    assert abs(latents.shape[2] - 50) <= 1  # 2.0 s → 25 latents per second


def test_encode_audio_is_normalised_posterior_mean(encoders):
    wave = voice_like(1.0, batch=2)
    first = encoders.encode_audio(wave)
    assert torch.equal(first, encoders.encode_audio(wave))  # deterministic: never a posterior sample
    vae = encoders.audio_vae
    with torch.no_grad():
        posterior = vae.encode(log_mel_spectrogram(wave, SR)).latent_dist
    # Statistics are stored for packed [B, T, C·M] tokens: normalise there and unpack, like the pipeline.
    packed = posterior.mean.transpose(1, 2).flatten(2, 3)
    expected = ((packed - vae.latents_mean) / vae.latents_std).unflatten(2, (8, 16)).transpose(1, 2)
    torch.testing.assert_close(first, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(posterior.std, torch.zeros_like(posterior.std))  # a sample would differ


def test_encode_audio_stays_fp32_with_bf16_audio_vae():
    base = shared_encoders("2.0")
    bf16_vae = copy.deepcopy(base.audio_vae).bfloat16()
    rounded_vae = copy.deepcopy(bf16_vae).float()  # the same bf16-rounded weights, in fp32
    bf16_encoders = DiffusersEncoders(base.video_vae, bf16_vae, base.vocoder, base.text, "2.0")
    reference = DiffusersEncoders(base.video_vae, rounded_vae, base.vocoder, base.text, "2.0")
    wave = voice_like(1.0)
    latents = bf16_encoders.encode_audio(wave)
    assert latents.dtype == torch.float32
    assert bf16_encoders.audio_vae.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a caller's autocast must not lower it either
        under_autocast = bf16_encoders.encode_audio(wave)
    torch.testing.assert_close(latents, reference.encode_audio(wave), rtol=0, atol=0)
    torch.testing.assert_close(under_autocast, latents, rtol=0, atol=0)


def test_encode_audio_padded_valid_frames(encoders):
    full = voice_like(2.0)
    padded = torch.zeros(2, 2, full.shape[-1])
    padded[0] = full[0]
    short = int(1.2 * SR)
    padded[1, :, :short] = full[0, :, :short]
    result = encoders.encode_audio_padded(padded, [full.shape[-1], short])
    assert result.valid_frames == [encoders.audio_latent_frames(full.shape[-1]), encoders.audio_latent_frames(short)]
    alone = encoders.encode_audio(full[:, :, :short])
    valid = result.valid_frames[1]
    assert alone.shape[2] == valid
    # The encoder is causal in time: every valid frame but the last (whose STFT window reaches into the
    # padding) is the same as encoding the unpadded clip.
    torch.testing.assert_close(result.latents[1:, :, : valid - 1], alone[:, :, : valid - 1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="valid lengths"):
        encoders.encode_audio_padded(padded, [short])


def test_decode_audio_length(encoders):
    latents = encoders.encode_audio(voice_like(1.0))
    waveform, rate = encoders.decode_audio(latents)
    assert rate == (24000 if encoders.version == "2.0" else 48000)
    assert waveform.shape[:2] == (1, 2) and waveform.dtype == torch.float32
    # T latents → 4T-3 mel frames of 10 ms.
    assert waveform.shape[-1] == (4 * latents.shape[2] - 3) * rate // 100
    assert abs(waveform.shape[-1] / rate - 1.0) < 0.05
    assert torch.isfinite(waveform).all()


def test_video_latents_are_normalised_posterior_mean(encoders):
    vae = encoders.video_vae
    frames = clip_frames()
    latents = encoders.encode_video(frames)
    assert torch.equal(latents, encoders.encode_video(frames))
    stats = (vae.latents_mean.view(1, -1, 1, 1, 1), vae.latents_std.view(1, -1, 1, 1, 1))
    with torch.no_grad():
        mean = vae.encode(frames).latent_dist.mean
        expected_frames = vae.decode(latents * stats[1] / vae.config.scaling_factor + stats[0]).sample.clamp(-1, 1)
    torch.testing.assert_close(latents, (mean - stats[0]) * vae.config.scaling_factor / stats[1])
    torch.testing.assert_close(encoders.decode_video(latents), expected_frames)


def test_decode_video_shape(encoders):
    latents = encoders.encode_video(clip_frames())
    frames = encoders.decode_video(latents)
    assert frames.shape == (1, 3, 25, 96, 128) and frames.dtype == torch.float32
    assert frames.min() >= -1 and frames.max() <= 1


def test_encode_video_rejects_bad_input(encoders):
    with pytest.raises(ValueError, match="8n\\+1"):
        encoders.encode_video(clip_frames(frames=24))
    with pytest.raises(ValueError, match="multiples of 32"):
        encoders.encode_video(clip_frames(height=100))
    with pytest.raises(ValueError, match="expected \\[-1, 1\\]"):
        encoders.encode_video(clip_frames() * 127.5 + 127.5)


# ---- text ---------------------------------------------------------------------------------------


def test_prompts_are_left_padded(encoders):
    text = encoders.text
    tokens = text.tokenize(["a man speaks", "ohwx, a woman sings loudly in a bright studio at night"])
    short = tokens.attention_mask[0]
    count = tokens.token_counts[0]
    n = TINY_MAX_TEXT_LENGTH
    assert short[: n - count].eq(0).all() and short[n - count :].eq(1).all()  # zeros at the start
    assert tokens.input_ids[0, n - count] == text.tokenizer.bos_token_id
    with pytest.warns(UserWarning, match=f"truncated to {n}"):
        text.tokenize([" ".join(["word"] * (n + 10))])
    # With learnable registers the connectors fill the padding, so every context token is attended.
    context = encoders.encode_text(["a man speaks"])
    assert context.mask.dtype == torch.int64 and context.mask.eq(1).all()


def test_prompts_give_distinct_and_batch_independent_contexts(encoders):
    both = encoders.encode_text(["ohwx, a man speaks calmly", "a woman laughs in a loud room"])
    assert not torch.allclose(both.video[0], both.video[1])
    assert not torch.allclose(both.audio[0], both.audio[1])
    alone = encoders.encode_text(["  a woman laughs in a loud room  "])  # stripped like the pipeline does
    torch.testing.assert_close(alone.video[0], both.video[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alone.audio[0], both.audio[1], rtol=1e-5, atol=1e-5)


def test_tiny_tokenizer_is_deterministic_and_total():
    first, second = build_tiny_tokenizer(), build_tiny_tokenizer()
    assert tokenizer_digest(first) == tokenizer_digest(second)
    ids = first("café 東京 🎤 ohwx")["input_ids"]
    assert first.unk_token_id not in ids  # byte-level fallback: nothing is unknown
    assert first.decode(ids, skip_special_tokens=True).strip() == "café 東京 🎤 ohwx"


def test_precomputed_text_roundtrip(tmp_path):
    text = build_tiny_text_encoder("2.3", TINY, seed=3)
    prompts = ["ohwx, a man speaks", "a woman sings"]
    context = text.encode_text(prompts)
    path = tmp_path / "contexts.safetensors"
    save_precomputed_text(path, prompts, context, "2.3")
    stored = PrecomputedText(path)
    assert stored.version == "2.3" and stored.widths == (32, 16)
    again = stored.encode_text(["a woman sings", "ohwx, a man speaks"])
    assert torch.equal(again.video, context.video.flip(0)) and torch.equal(again.mask, context.mask.flip(0))
    with pytest.raises(ConfigError, match="contexts.safetensors: no precomputed text context for prompt 'a dog'"):
        stored.encode_text(["a dog"])
    # It stands in for the text encoder, and the encoder fingerprint follows it.
    tiny = shared_encoders("2.3")
    swapped = DiffusersEncoders(tiny.video_vae, tiny.audio_vae, tiny.vocoder, stored, "2.3")
    assert torch.equal(swapped.encode_text(prompts).audio, context.audio)
    assert swapped.fingerprint() != tiny.fingerprint()
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match="bad.safetensors: not a readable safetensors file"):
        PrecomputedText(tmp_path / "bad.safetensors")


# ---- fingerprints -------------------------------------------------------------------------------


def test_fingerprint_is_stable_and_sees_every_weight():
    first = build_tiny_encoders("2.0", TINY, seed=0)
    assert first.fingerprint() == build_tiny_encoders("2.0", TINY, seed=0).fingerprint()
    before = first.fingerprint()
    assert len(before) == 16
    assert build_tiny_encoders("2.0", TINY, seed=1).fingerprint() != before
    # One element at the far end of the largest video-VAE tensor (no sampling can skip it).
    largest = max(first.video_vae.parameters(), key=lambda p: p.numel())
    with torch.no_grad():
        largest.view(-1)[-1] += 1e-3
    changed = first.fingerprint()
    assert changed != before
    with torch.no_grad():
        first.text.connectors.video_connector.learnable_registers[3, 5] += 1e-3
    assert first.fingerprint() != changed


def test_tensor_checksum_is_exact_for_all_dtypes():
    for dtype in (torch.float32, torch.bfloat16, torch.float64, torch.int64, torch.bool, torch.uint8):
        tensor = (torch.arange(5000) % 7).to(dtype)
        edited = tensor.clone()
        edited[4321] = 1 if dtype == torch.bool else 5
        assert tensor_checksum(tensor) == tensor_checksum(tensor.clone())
        if not torch.equal(edited, tensor):
            assert tensor_checksum(edited) != tensor_checksum(tensor), dtype
    # Same values, other dtype: other bits, other checksum (a bf16 cache must not reuse fp32 latents).
    x = torch.randn(100)
    assert tensor_checksum(x) != tensor_checksum(x.double())


# ---- loading a diffusers pipeline folder ----------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_load_encoders_from_pipeline_folder(tmp_path, version):
    tiny = shared_encoders(version)
    tiny.video_vae.save_pretrained(tmp_path / "vae")
    tiny.audio_vae.save_pretrained(tmp_path / "audio_vae")
    tiny.vocoder.save_pretrained(tmp_path / "vocoder")
    tiny.text.connectors.save_pretrained(tmp_path / "connectors")
    tiny.text.text_model.save_pretrained(tmp_path / "text_encoder")
    tiny.text.tokenizer.save_pretrained(tmp_path / "tokenizer")
    loaded = load_encoders(tmp_path, version, precision="fp32", max_text_length=TINY_MAX_TEXT_LENGTH)
    frames, wave, prompts = clip_frames(), voice_like(1.0), ["ohwx, a man speaks"]
    assert torch.equal(loaded.encode_video(frames), tiny.encode_video(frames))
    assert torch.equal(loaded.encode_audio(wave), tiny.encode_audio(wave))
    loaded_text, tiny_text = loaded.encode_text(prompts), tiny.encode_text(prompts)
    assert torch.equal(loaded_text.video, tiny_text.video) and torch.equal(loaded_text.audio, tiny_text.audio)
    assert loaded.fingerprint() == tiny.fingerprint()
    if version == "2.0":
        half = load_encoders(tmp_path, version, precision="bf16", max_text_length=TINY_MAX_TEXT_LENGTH)
        assert half.video_vae.dtype == half.vocoder.dtype == torch.bfloat16
        assert half.audio_vae.dtype == torch.float32 and half.encode_audio(wave).dtype == torch.float32
    other = "2.3" if version == "2.0" else "2.0"
    with pytest.raises(ConfigError, match=f"model.version is '{other}' but .* holds LTX-{version} weights"):
        load_encoders(tmp_path, other, precision="fp32", max_text_length=TINY_MAX_TEXT_LENGTH)


def test_load_encoders_with_separate_gemma3_multimodal_folder(tmp_path):
    """The real LTX-2 text encoder is a Gemma3ForConditionalGeneration (text + vision tower), here
    tiny and given through ``text_encoder_path``, with its own tokenizer files."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    tiny = shared_encoders("2.0")
    for name, module in (("vae", tiny.video_vae), ("audio_vae", tiny.audio_vae), ("vocoder", tiny.vocoder),
                         ("connectors", tiny.text.connectors)):
        module.save_pretrained(tmp_path / "pipeline" / name)
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        gemma = Gemma3ForConditionalGeneration(Gemma3Config(
            text_config=tiny.text.text_model.config.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
        )).eval()
    gemma.save_pretrained(tmp_path / "gemma")
    tiny.text.tokenizer.save_pretrained(tmp_path / "gemma")
    loaded = load_encoders(tmp_path / "pipeline", "2.0", text_encoder_path=tmp_path / "gemma", precision="fp32",
                           max_text_length=TINY_MAX_TEXT_LENGTH)
    assert type(loaded.text.text_model).__name__ == "Gemma3ForConditionalGeneration"
    direct = TextEncoder(tiny.text.tokenizer, gemma, tiny.text.connectors, "2.0", max_length=TINY_MAX_TEXT_LENGTH)
    prompts = ["ohwx, a man speaks", "a woman sings"]
    tokens = direct.tokenize(prompts)
    with torch.no_grad():  # through the LM-head model, as diffusers' pipeline calls it
        states = gemma(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, output_hidden_states=True)
    assert torch.equal(direct.hidden_states(tokens), torch.stack(states.hidden_states, dim=-1).flatten(2, 3))
    assert torch.equal(loaded.encode_text(prompts).video, direct.encode_text(prompts).video)


def test_load_encoders_names_missing_parts(tmp_path):
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLLTX2Video"}))
    with pytest.raises(ConfigError) as info:
        load_encoders(tmp_path, "2.0")
    message = str(info.value)
    for part in ("audio_vae/", "vocoder/", "connectors/", "text_encoder/", "tokenizer/"):
        assert part in message
    assert "missing vae/" not in message
    with pytest.raises(ConfigError, match="not found"):
        load_encoders(tmp_path / "nowhere", "2.0")
    with pytest.raises(ConfigError, match="precision"):
        load_encoders(tmp_path, "2.0", precision="int3")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_quantized_gemma_needs_cuda(tmp_path):
    tiny = shared_encoders("2.0")
    for name, module in (("vae", tiny.video_vae), ("audio_vae", tiny.audio_vae), ("vocoder", tiny.vocoder),
                         ("connectors", tiny.text.connectors), ("text_encoder", tiny.text.text_model)):
        module.save_pretrained(tmp_path / name)
    tiny.text.tokenizer.save_pretrained(tmp_path / "tokenizer")
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        load_encoders(tmp_path, "2.0", load_in_8bit=True, max_text_length=TINY_MAX_TEXT_LENGTH)
    with pytest.raises(ConfigError, match="not both"):
        load_encoders(tmp_path, "2.0", load_in_8bit=True, load_in_4bit=True)


def test_version_mismatch_is_refused():
    tiny20, tiny23 = shared_encoders("2.0"), shared_encoders("2.3")
    with pytest.raises(ConfigError, match="vocoder is LTX2Vocoder"):
        DiffusersEncoders(tiny20.video_vae, tiny20.audio_vae, tiny20.vocoder, tiny23.text, "2.3")
    with pytest.raises(ConfigError, match="text source is for LTX-2.0"):
        DiffusersEncoders(tiny23.video_vae, tiny23.audio_vae, tiny23.vocoder, tiny20.text, "2.3")


def test_tiny_encoder_timing(encoders):
    """Encoding a 25-frame 128x96 clip, 1 s of audio and a caption (printed, not asserted)."""
    frames, wave = clip_frames(), voice_like(1.0)
    encoders.encode_video(frames)  # warm-up
    timings, outputs = {}, {}
    for name, call in (("video", lambda: encoders.encode_video(frames)), ("audio", lambda: encoders.encode_audio(wave)),
                       ("text", lambda: encoders.encode_text(["ohwx, a man speaks calmly"]))):
        start = time.perf_counter()
        outputs[name] = call()
        timings[name] = time.perf_counter() - start
    print(f"\ntiny LTX-{encoders.version} encoders, {torch.get_num_threads()} threads: "
          + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in timings.items()))
    assert outputs["video"].shape == (1, 128, 4, 3, 4) and outputs["audio"].shape == (1, 8, 26, 16)
    assert isinstance(outputs["text"], TextContext)


def test_fingerprint_is_unchanged_by_use():
    """Encoding text sets padding/truncation on the tokenizer backend; the fingerprint must not move,
    or every second cache run would re-encode everything."""
    from ltx2_av_trainer.trainer.backends.diffusers_encoders import build_tiny_encoders

    encoders = build_tiny_encoders("2.0", TINY)
    before = encoders.fingerprint()
    encoders.encode_text(["a short prompt", "a somewhat longer prompt with more words in it"])
    encoders.encode_audio(voice_like(0.5))
    assert encoders.fingerprint() == before
