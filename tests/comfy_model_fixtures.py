"""Tiny ComfyUI encoder objects for the node tests, built from ComfyUI's own classes at test time.

- Video VAE: ComfyUI's LTX ``VideoVAE`` with a narrow config carried in the file's metadata (``{"vae": cfg}``,
  as real LTX-2 checkpoints do), loaded by ``comfy.sd.VAE`` exactly as ``VAELoader`` loads a file.
- Audio VAE: ComfyUI's ``AudioVAE`` (causal audio autoencoder + HiFi-GAN vocoder) with a narrow config in the
  metadata (``{"audio_vae": ..., "vocoder": ...}``), keys ``audio_vae.*`` / ``vocoder.*`` as in an LTX-2
  checkpoint; loaded by ComfyUI's own ``LTXVAudioVAELoader`` node from a checkpoints folder.
- Text encoder: ComfyUI's ``LTXAVTEModel`` with a tiny Gemma-3 text model (ComfyUI's ``Gemma3_4B`` class,
  dimensions overridden through ``model_options``) and the real Gemma tokenizer code on a small
  SentencePiece model trained here. ``LTXAVTextEncoderLoader`` cannot load it: ComfyUI detects the Gemma
  variant from full-size key names (48 layers) and builds its fixed 12B config, so the ``CLIP`` object is made
  with ``comfy.sd.CLIP`` from the same parts that loader would pick. Its projection width matches the tiny
  LTXAV checkpoint of ``comfy_fixtures`` (2.0: one projection to ``caption_channels``; 2.3: the dual
  video/audio projection to the stream widths).

Needs ComfyUI importable (call ``backends.comfyui.env.import_model_management`` first).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

from ltx2_av_trainer.trainer.config import TinyModelConfig
from ltx2_av_trainer.trainer.io_utils import save_safetensors_atomic

TINY_VIDEO_VAE = {
    "_class_name": "CausalVideoAutoencoder",
    "dims": 3,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 128,
    # patch 4 x three 2x space-time compressions = 32x space, 8x time (LTX-2's geometry)
    "encoder_blocks": [["res_x", {"num_layers": 1}], ["compress_all", {}], ["res_x", {"num_layers": 1}],
                       ["compress_all", {}], ["compress_all", {}]],
    "decoder_blocks": [["res_x", {"num_layers": 1, "inject_noise": False}],
                       ["compress_all", {"residual": True, "multiplier": 1}],
                       ["compress_all", {"residual": True, "multiplier": 1}],
                       ["compress_all", {"residual": True, "multiplier": 1}],
                       ["res_x", {"num_layers": 1, "inject_noise": False}]],
    "encoder_base_channels": 16,
    "decoder_base_channels": 16,
    "scaling_factor": 1.0,
    "norm_layer": "pixel_norm",
    "patch_size": 4,
    "latent_log_var": "uniform",
    "use_quant_conv": False,
    "causal_decoder": False,
    "timestep_conditioning": False,
}

TINY_AUDIO_VAE = {
    "model": {"params": {
        "ddconfig": {"double_z": True, "mel_bins": 64, "z_channels": 8, "resolution": 256, "downsample_time": False,
                     "in_channels": 2, "out_ch": 2, "ch": 16, "ch_mult": [1, 1, 1], "num_res_blocks": 1,
                     "attn_resolutions": [], "dropout": 0.0, "mid_block_add_attention": False, "norm_type": "pixel",
                     "causality_axis": "height"},
        "sampling_rate": 16000,
    }},
    "preprocessing": {"stft": {"filter_length": 1024, "hop_length": 160}},
}

# HiFi-GAN, 6·5·8 = 240x upsampling of 100 Hz mel frames → 24 kHz, as LTX-2.0's vocoder.
TINY_VOCODER = {
    "resblock_kernel_sizes": [3], "upsample_rates": [6, 5, 8], "upsample_kernel_sizes": [12, 15, 16],
    "resblock_dilation_sizes": [[1, 3, 5]], "upsample_initial_channel": 32, "stereo": True, "resblock": "1",
    "activation": "snake", "use_bias_at_final": True, "use_tanh_at_final": True,
}

TINY_GEMMA = {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 2, "num_key_value_heads": 1}
GEMMA_PREFIX = "gemma3_12b.transformer."  # LTXAVTEModel's attribute path to the Gemma weights

TOKENIZER_CORPUS = [
    "ohwx, a person speaks to the camera in a quiet room",
    "a talking face with a calm voice, close-up, soft light",
    "ohwx talks about the weather, the sea and the city at night",
]


def random_like_state(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Seeded random weights of the right shapes: ~unit activations through layers, positive latent std."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, tensor in sorted(state.items()):
        if not tensor.is_floating_point():
            out[name] = tensor
            continue
        noise = torch.randn(tensor.shape, generator=generator)
        if name.endswith("std-of-means"):
            out[name] = 0.5 + noise.abs()
        elif tensor.ndim >= 2:
            out[name] = noise / max(1, tensor[0].numel()) ** 0.5
        else:
            out[name] = 0.1 * noise
    return out


# ---- video VAE ------------------------------------------------------------------------------------


def write_tiny_video_vae(folder: Path, seed: int = 0) -> Path:
    from comfy.ldm.lightricks.vae.causal_video_autoencoder import VideoVAE

    state = random_like_state(VideoVAE(config=TINY_VIDEO_VAE).state_dict(), seed)
    path = Path(folder) / "tiny_ltx2_video_vae.safetensors"
    save_safetensors_atomic(state, path, metadata={"config": json.dumps({"vae": TINY_VIDEO_VAE})})
    return path


def load_video_vae(path: Path):
    """As ComfyUI's VAELoader loads a VAE file."""
    import comfy.sd
    import comfy.utils

    sd, metadata = comfy.utils.load_torch_file(str(path), return_metadata=True)
    vae = comfy.sd.VAE(sd=sd, metadata=metadata)
    vae.throw_exception_if_invalid()
    return vae


# ---- audio VAE ------------------------------------------------------------------------------------


def write_tiny_audio_vae(folder: Path, seed: int = 1) -> Path:
    """An LTX-2-style checkpoint holding only the audio VAE and vocoder (``audio_vae.*``, ``vocoder.*``)."""
    from comfy.ldm.lightricks.vae.audio_vae import AudioVAE

    metadata = {"config": json.dumps({"audio_vae": TINY_AUDIO_VAE, "vocoder": TINY_VOCODER})}
    state = random_like_state(AudioVAE(metadata=metadata).state_dict(), seed)
    renamed = {("audio_vae." + k[len("autoencoder."):]) if k.startswith("autoencoder.") else k: v for k, v in state.items()}
    path = Path(folder) / "tiny_ltx2_audio_vae.safetensors"
    save_safetensors_atomic(renamed, path, metadata=metadata)
    return path


def load_audio_vae(ckpt_name: str):
    """Through ComfyUI's own LTXVAudioVAELoader node (the file must be in a 'checkpoints' folder)."""
    from comfy_extras.nodes_lt_audio import LTXVAudioVAELoader

    return LTXVAudioVAELoader.execute(ckpt_name).args[0]


# ---- text encoder ---------------------------------------------------------------------------------


def tiny_spiece_model() -> bytes:
    """A small SentencePiece model with Gemma's special ids (pad 0, eos 1, bos 2, unk 3)."""
    import sentencepiece

    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TOKENIZER_CORPUS * 10), model_writer=buffer, vocab_size=80, model_type="bpe",
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, character_coverage=1.0, minloglevel=2,
    )
    return buffer.getvalue()


def _clip_parts(version: str, tiny: TinyModelConfig):
    import comfy.text_encoders.lt as lt
    import comfy.text_encoders.lumina2 as lumina2

    if version == "2.0":
        projection = dict(video_projection_dim=tiny.caption_channels)
    else:
        projection = dict(text_projection_type="dual_linear",
                          video_projection_dim=tiny.num_attention_heads * tiny.attention_head_dim,
                          audio_projection_dim=tiny.audio_num_attention_heads * tiny.audio_attention_head_dim)
    clip_class = lt.ltxav_te(text_encoder_model=lumina2.Gemma3_4BModel, **projection)
    return clip_class, lt.LTXAVGemmaTokenizer


def write_tiny_text_encoder(folder: Path, version: str, tiny: TinyModelConfig, seed: int = 2) -> Path:
    """Gemma weights (``model.*``), the projection and the tokenizer (``spiece_model``) in one file."""
    clip_class, _ = _clip_parts(version, tiny)
    model = clip_class(device="cpu", dtype=torch.float32, model_options={"_model_config": TINY_GEMMA})
    state = {}
    for key, value in random_like_state(model.state_dict(), seed).items():
        state[key[len(GEMMA_PREFIX):] if key.startswith(GEMMA_PREFIX) else key] = value
    state["spiece_model"] = torch.frombuffer(bytearray(tiny_spiece_model()), dtype=torch.uint8)
    path = Path(folder) / f"tiny_ltxav_text_encoder_{version}.safetensors"
    save_safetensors_atomic(state, path)
    return path


def load_text_encoder(path: Path, version: str, tiny: TinyModelConfig):
    """A ``comfy.sd.CLIP`` of the tiny text encoder (what LTXAVTextEncoderLoader builds for the real one)."""
    import comfy.sd
    import comfy.supported_models_base
    import comfy.utils

    sd = comfy.utils.load_torch_file(str(path), safe_load=True)
    clip_class, tokenizer_class = _clip_parts(version, tiny)
    target = comfy.supported_models_base.ClipTarget(tokenizer_class, clip_class)
    spiece = sd.pop("spiece_model")
    return comfy.sd.CLIP(target, tokenizer_data={"spiece_model": spiece.numpy().tobytes()}, state_dict=[sd],
                         model_options={"_model_config": TINY_GEMMA})
