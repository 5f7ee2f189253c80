"""DoRA / LoKr / LoHa beside LoRA: forward = merged-weight math, start at the base, dropouts, files, loading."""

import pytest
import torch
import torch.nn.functional as F

from ltx2_av_trainer.trainer.adapters.network import build_lora, load_lora_file
from ltx2_av_trainer.trainer.backends.diffusers_backend import build_denoiser
from ltx2_av_trainer.trainer.config import ModelConfig, NetworkConfig
from ltx2_av_trainer.trainer.adapters.verify import verify_lora_keys
from ltx2_av_trainer.trainer.training.loop import Trainer
from ltx2_av_trainer.trainer.adapters.files import read_adapter_file, save_network
from ltx2_av_trainer.trainer.adapters.layers import factorization

from latent_fixtures import make_samples, tiny_config

TYPES = ["lora", "dora", "lokr", "loha"]
EXPECTED_SUFFIXES = {
    # LoRA and DoRA in the default output.lora_format (lora_ab: alpha/rank folded into lora_B).
    "lora": {".lora_A.weight", ".lora_B.weight"},
    "dora": {".lora_A.weight", ".lora_B.weight", ".dora_scale"},
    "lokr": {".lokr_w1", ".lokr_w2", ".alpha"},  # rank 4 >= half of the 8x8 w2: full w2
    "loha": {".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".alpha"},
}


@pytest.fixture(scope="module")
def denoiser():
    return build_denoiser(ModelConfig(version="2.0"))


def perturb(network, seed=0, scale=0.2):
    """Give every adapter parameter a non-trivial value (the zero-initialised factors included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * (p.abs().mean() + 0.1))


@pytest.mark.parametrize("kind", TYPES)
def test_forward_equals_the_merged_weight_and_starts_at_the_base(denoiser, kind):
    net = build_lora(denoiser, NetworkConfig(type=kind, rank=4, alpha=2.0, preset="av"), with_audio=True)
    try:
        module = denoiser.transformer.transformer_blocks[0].audio_attn1.to_q
        layer = dict(net.named_layers())["transformer_blocks.0.audio_attn1.to_q"]
        x = torch.randn(2, 5, module.in_features)
        with net.disabled():
            base = module(x)
        assert torch.allclose(module(x), base, atol=1e-6)  # the adapted model starts at the base model
        perturb(net)
        adapted = module(x)
        assert not torch.allclose(adapted, base, atol=1e-4)
        merged = F.linear(x, module.weight + layer.weight_delta(module.weight), module.bias)
        assert torch.allclose(adapted, merged, atol=1e-5), (adapted - merged).abs().max()
        # Half strength is halfway between the base and the merged weight (how ComfyUI applies strength).
        net.set_multiplier(0.5)
        half = F.linear(x, module.weight + 0.5 * layer.weight_delta(module.weight), module.bias)
        assert torch.allclose(module(x), half, atol=1e-5)
        net.set_multiplier(1.0)
        # Gradients reach every adapter parameter through the wrapped forward.
        module(x).square().mean().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())
    finally:
        net.detach()
    assert torch.equal(module(x), base)  # never merged into .weight


def test_lokr_split_is_the_most_square_divisor_pair():
    # The loaders rebuild ΔW from the tensors' shapes; this split only decides those shapes (the ComfyUI tier
    # compares it with comfy.weight_adapter.base.factorization).
    assert [factorization(d) for d in (127, 128, 360, 1024, 4096)] == [(1, 127), (8, 16), (18, 20), (32, 32), (64, 64)]
    assert [factorization(d, 4) for d in (128, 250, 360, 1024)] == [(4, 32), (2, 125), (4, 90), (4, 256)]
    assert factorization(250, 8) == (5, 50)


@pytest.mark.parametrize("kind", ["lora", "lokr", "loha"])
def test_rank_dropout_is_unbiased_and_module_dropout_skips_layers(denoiser, kind):
    torch.manual_seed(0)
    net = build_lora(denoiser, NetworkConfig(type=kind, rank=4, preset="av", rank_dropout=0.5), with_audio=True)
    try:
        perturb(net)
        module = denoiser.transformer.transformer_blocks[0].attn1.to_q
        x = torch.randn(64, 3, module.in_features)
        net.eval()
        clean = module(x)
        net.train()
        noisy = module(x)
        assert not torch.allclose(noisy, clean, atol=1e-5)
        samples = torch.stack([module(x) for _ in range(200)])
        with net.disabled():
            base = module(x)
        error = (samples.mean(0) - clean).norm() / (clean - base).norm()
        assert error < 0.15, error  # the 1/(1-p) rescaling keeps the expectation
    finally:
        net.detach()
    skip = build_lora(denoiser, NetworkConfig(type=kind, rank=4, preset="av", module_dropout=0.3), with_audio=True)
    try:
        perturb(skip)
        skip.train()
        with skip.disabled():
            base = module(x)
        skipped = sum(torch.equal(module(x), base) for _ in range(300)) / 300
        assert abs(skipped - 0.3) < 0.08, skipped
    finally:
        skip.detach()


@pytest.mark.parametrize("kind", TYPES)
def test_files_carry_comfyui_keys_and_load_back_exactly(tmp_path, denoiser, kind):
    net = build_lora(denoiser, NetworkConfig(type=kind, rank=4, alpha=2.0, preset="voice"), with_audio=True)
    perturb(net)
    x = torch.randn(3, 16)
    module = denoiser.transformer.transformer_blocks[1].audio_attn2.to_v
    trained = module(x)
    path = save_network(net, tmp_path / f"{kind}.safetensors", config_json="{}", base_fingerprint="fp", step=7,
                        version="2.0", dtype="float32")
    net.detach()
    tensors, metadata = read_adapter_file(path)
    assert metadata["ltx2_av_trainer.network_type"] == kind
    assert all(k.startswith("diffusion_model.transformer_blocks.") for k in tensors)
    suffixes = {k[len("diffusion_model.transformer_blocks.1.audio_attn2.to_v"):] for k in tensors
                if k.startswith("diffusion_model.transformer_blocks.1.audio_attn2.to_v.")}
    assert suffixes == EXPECTED_SUFFIXES[kind]
    if kind == "dora":
        assert tensors["diffusion_model.transformer_blocks.1.audio_attn2.to_v.dora_scale"].shape == (1, 16)
    loaded = load_lora_file(denoiser, path)
    try:
        assert torch.allclose(module(x), trained, atol=1e-6)
    finally:
        loaded.detach()


def test_lokr_factors_w2_when_rank_is_small(tmp_path, denoiser):
    net = build_lora(denoiser, NetworkConfig(type="lokr", rank=2, alpha=4.0, preset="audio", lokr_factor=2), with_audio=True)
    layer = dict(net.named_layers())["transformer_blocks.0.audio_ff.net.0.proj"]  # 16 → 64
    assert (layer.out_l, layer.out_k, layer.in_m, layer.in_n) == (2, 32, 2, 8) and layer.factored
    assert layer.scale == 2.0  # alpha / rank applies to a factored w2
    perturb(net)
    module = denoiser.transformer.transformer_blocks[0].audio_ff.net[0].proj
    x = torch.randn(4, 16)
    trained = module(x)
    path = save_network(net, tmp_path / "k.safetensors", config_json="{}", base_fingerprint="fp", step=1, version="2.0", dtype="float32")
    net.detach()
    tensors, _ = read_adapter_file(path)
    assert "diffusion_model.transformer_blocks.0.audio_ff.net.0.proj.lokr_w2_a" in tensors
    loaded = load_lora_file(denoiser, path)
    try:
        assert torch.allclose(module(x), trained, atol=1e-6)
    finally:
        loaded.detach()


@pytest.mark.parametrize("kind", ["dora", "lokr", "loha"])
def test_each_type_trains_resumes_and_exports(tmp_path, kind):
    def train(name, until=None, resume=False):
        cfg = tiny_config(tmp_path, **{"network.type": kind, "train.steps": 4, "output.save_every": 2,
                                       "output.dir": str(tmp_path / name), "network.rank_dropout": 0.1})
        trainer = Trainer(cfg, build_denoiser(cfg.model), make_samples(cfg, 3), cfg.output.dir)
        if resume:
            trainer.try_resume()
        trainer.run(until_step=until)
        return trainer

    straight = train("straight")
    train("split", until=2)
    resumed = train("split", resume=True)
    a, b = straight.network.state_dict(), resumed.network.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in a.items())
    tensors, metadata = read_adapter_file(straight.last_lora)
    assert metadata["ltx2_av_trainer.network_type"] == kind
    assert all(any(k.endswith(s) for s in EXPECTED_SUFFIXES[kind]) for k in tensors)


def test_verify_understands_the_new_key_types(tmp_path, denoiser):
    """The headless key check counts DoRA/LoKr/LoHa modules as applied."""
    from ltx2_av_trainer.trainer.backends.diffusers_backend import diffusers_to_reference_path

    paths = {diffusers_to_reference_path(n) for n, _ in denoiser.transformer.named_modules()}
    for kind in TYPES:
        net = build_lora(denoiser, NetworkConfig(type=kind, rank=4, preset="av"), with_audio=True)
        path = save_network(net, tmp_path / f"v{kind}.safetensors", config_json="{}", base_fingerprint="fp", step=1, version="2.0")
        net.detach()
        report = verify_lora_keys(path, paths)
        assert report.ok and report.applied_modules == 48, report.summary()
