"""Text-connector training (text → audio adaptation) on the diffusers backend: the cached pre-connector
features reproduce the library's contexts, only the chosen connector learns, and the file carries its keys."""

import dataclasses

import pytest
import torch

from ltx2_av_trainer.trainer.adapters.network import load_lora_file
from ltx2_av_trainer.trainer.backends.diffusers_backend import build_denoiser
from ltx2_av_trainer.trainer.backends.text_encoder import build_tiny_text_encoder
from ltx2_av_trainer.trainer.config import ConfigError, TinyModelConfig
from ltx2_av_trainer.trainer.backends.text_connectors import ConnectorStack, TextFeatures, capture_text_features
from ltx2_av_trainer.trainer.training.loop import Trainer
from ltx2_av_trainer.trainer.adapters.files import read_adapter_file

from latent_fixtures import make_samples, tiny_config

PROMPTS = ["ohwx, a woman speaking", "ohwx, a man laughs in a studio", "ohwx, close up of a singer"]


@pytest.fixture(scope="module")
def text_encoders():
    return {version: build_tiny_text_encoder(version, TinyModelConfig(), seed=3) for version in ("2.0", "2.3")}


def _features_and_contexts(encoder, prompts):
    tokens = encoder.tokenize(prompts)
    return capture_text_features(encoder.connectors, encoder.hidden_states(tokens), tokens.attention_mask)


@pytest.mark.parametrize("version", ["2.0", "2.3"])
def test_cached_features_reproduce_the_librarys_contexts(text_encoders, version):
    encoder = text_encoders[version]
    features, contexts = _features_and_contexts(encoder, PROMPTS)
    reference = encoder.encode_text(PROMPTS)  # LTX2TextConnectors.forward end to end
    assert torch.equal(contexts.video, reference.video) and torch.equal(contexts.audio, reference.audio)
    with torch.no_grad():
        rebuilt = ConnectorStack(encoder.connectors)(features)
    assert torch.allclose(rebuilt.video, reference.video, atol=1e-6) and torch.allclose(rebuilt.audio, reference.audio, atol=1e-6)
    assert torch.equal(rebuilt.mask, reference.mask)
    # The features are the connectors' inputs (small: one row per token at the connector width).
    assert features.video.shape[:2] == features.mask.shape and features.video.shape[-1] == encoder.connectors.video_connector.inner_dim


def _samples_with_features(cfg, encoder):
    features, contexts = _features_and_contexts(encoder, PROMPTS)
    samples = make_samples(cfg, len(PROMPTS), text_len=features.mask.shape[1])
    return [dataclasses.replace(s, text=contexts.select(i), text_features=TextFeatures(features.video[i], features.audio[i], features.mask[i]))
            for i, s in enumerate(samples)]


def test_audio_connector_training_adapts_only_the_audio_text_path(tmp_path, text_encoders):
    encoder = text_encoders["2.0"]
    cfg = tiny_config(tmp_path, **{"network.connectors": "audio", "network.preset": "audio", "train.steps": 6,
                                   "optimizer.lr": 5e-3, "output.save_every": 6})
    samples = _samples_with_features(cfg, encoder)
    denoiser = build_denoiser(cfg.model)
    trainer = Trainer(cfg, denoiser, samples, cfg.output.dir, text_connectors=encoder.connectors)
    connector_paths = [p for p in trainer.network.paths.values() if "embeddings_connector" in p]
    assert connector_paths and all(p.startswith("audio_embeddings_connector.transformer_1d_blocks.") for p in connector_paths)
    stack = trainer.connectors
    batch_features = TextFeatures(*(torch.stack([getattr(s.text_features, n) for s in samples]) for n in ("video", "audio", "mask")))
    with torch.no_grad():
        before = stack(batch_features)
    trainer.run()
    with torch.no_grad():
        after = stack(batch_features)
    assert torch.equal(after.video, before.video)  # the video connector is not adapted
    assert not torch.allclose(after.audio, before.audio, atol=1e-4)  # the audio text context learned
    tensors, _ = read_adapter_file(trainer.last_lora)
    assert "diffusion_model.audio_embeddings_connector.transformer_1d_blocks.0.attn1.to_q.lora_B.weight" in tensors
    trainer.network.detach()
    with pytest.raises(ConfigError, match="pass the connectors"):
        load_lora_file(denoiser, trainer.last_lora)
    loaded = load_lora_file(denoiser, trainer.last_lora, connectors=stack)
    try:
        with torch.no_grad():
            assert torch.allclose(stack(batch_features).audio, after.audio, atol=1e-2)  # bf16 file
    finally:
        loaded.detach()


def test_connector_training_needs_connectors_and_features(tmp_path, text_encoders):
    cfg = tiny_config(tmp_path, **{"network.connectors": "audio"})
    with pytest.raises(ConfigError, match=r"needs the text connectors.*ComfyUI nodes cannot train the connectors"):
        Trainer(cfg, build_denoiser(cfg.model), make_samples(cfg, 2), cfg.output.dir)
    with pytest.raises(ConfigError, match=r"needs pre-connector text features for every item; 2 lack them \(first: clip0\)"):
        Trainer(cfg, build_denoiser(cfg.model), make_samples(cfg, 2), cfg.output.dir, text_connectors=text_encoders["2.0"].connectors)
