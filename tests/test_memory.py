"""Memory options (``trainer/memory``) on the tiny diffusers model, CPU only.

Quantised bases and offloading train correctly: 12 LoRA steps with the real ``Trainer`` and the loss curve
compared with the unquantised run. Measured on the tiny model (torch 2.11 CPU, torchao 0.18.0, fp32, 12 steps),
the largest relative deviation of a step's video/audio loss from the unquantised run was int8 3.7e-4,
float8 3.5e-3, nf4 9.6e-3 (bf16 autocast: about the same); the tolerances below are ~3-5x those. Activation
offload and block swapping only move exact copies, so their runs must match bit for bit.

Without CUDA, block swapping runs with the CPU as the "device" (every swap-in is a real copy, so the
bookkeeping, the hook order and forward+backward equality are all exercised); the side-stream prefetch, pinned
memory and their overlap need a GPU (the CUDA test below is skipped here).
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ltx2_av_trainer.trainer.adapters.network import build_lora
from ltx2_av_trainer.trainer.backends.diffusers_backend import build_denoiser
from ltx2_av_trainer.trainer.backends.interface import DenoiserInput
from ltx2_av_trainer.trainer.config import Config, ConfigError, ModelConfig
from ltx2_av_trainer.trainer.data.batches import collate
from ltx2_av_trainer.trainer.training.loop import Trainer
from ltx2_av_trainer.trainer.memory.activation_offload import OffloadedCheckpoint
from ltx2_av_trainer.trainer.memory.attention import check_attention, select_attention, text_mask_for
from ltx2_av_trainer.trainer.memory.block_swap import MAX_SWAPPED_RESIDENT, BlockSwapper, swapped_block_indices
from ltx2_av_trainer.trainer.config import MemoryConfig, validate_memory
from ltx2_av_trainer.trainer.memory.quantize import (
    QuantizedLinear,
    dequantized_weight,
    inner_tensors,
    is_quantized_tensor,
    map_inner_tensors,
    quantize_blocks,
    quantized_kind,
)
from ltx2_av_trainer.trainer.memory.setup import apply_memory_options

from latent_fixtures import make_samples, tiny_config

torchao = pytest.importorskip("torchao", reason="the quantisation tests need torchao (pip install torchao)")

MODES = ["int8", "float8", "nf4"]
# Largest relative deviation of any step's loss from the unquantised run (measured values in the module docstring).
LOSS_TOLERANCE = {"int8": 2e-3, "float8": 1.5e-2, "nf4": 4e-2}
# Largest |dequantised - original| / max |original| of a tiny-model layer (measured: 3.9e-3, 3.6e-2, 0.15).
WEIGHT_TOLERANCE = {"int8": 1e-2, "float8": 6e-2, "nf4": 0.25}
EXPECTED_KIND = {"int8": "torchao", "float8": "torchao", "nf4": "torchao_nf4"}
STEPS = 12


# ---- helpers -----------------------------------------------------------------------------------------------


def loss_curves(run_dir) -> tuple[list[float], list[float]]:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss_video"] for r in rows], [r["loss_audio"] for r in rows]


def train(tmp_path, name: str, memory: MemoryConfig | None = None, prepare=None, steps: int = STEPS, **overrides):
    """LoRA steps of the real Trainer on the tiny model; returns the (video, audio) loss curves."""
    cfg = tiny_config(tmp_path / name, **{"train.steps": steps, "output.save_every": 1000, **overrides})
    denoiser = build_denoiser(cfg.model, memory)
    if prepare is not None:
        prepare(denoiser)
    Trainer(cfg, denoiser, make_samples(cfg, 3), cfg.output.dir).run()
    return loss_curves(cfg.output.dir)


def largest_relative_deviation(curves, reference) -> float:
    return max(abs(a - b) / abs(b) for curve, ref in zip(curves, reference) for a, b in zip(curve, ref))


@pytest.fixture(scope="module")
def reference_curves(tmp_path_factory):
    return train(tmp_path_factory.mktemp("reference"), "none")


def denoiser_inputs(cfg: Config, batch: int = 2) -> DenoiserInput:
    b = collate(make_samples(cfg, batch))
    return DenoiserInput(b.video, b.audio, torch.tensor([0.3, 0.6][:batch]), torch.tensor([0.5, 0.2][:batch]), b.text, 25.0)


def lora_step(denoiser, cfg: Config, network=None):
    """One forward+backward with a perturbed LoRA; returns (loss, adapter gradients)."""
    network = network or build_lora(denoiser, cfg.network, with_audio=True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in network.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    video, audio = denoiser(denoiser_inputs(cfg))
    loss = video.float().square().mean() + audio.float().square().mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in network.parameters()]


# ---- precise type checks -------------------------------------------------------------------------------------


def test_a_plain_tensor_is_never_quantized_even_though_it_has_dequantize():
    # The trap behind "derivative for dequantize is not implemented": every tensor has .dequantize().
    assert hasattr(torch.randn(2), "dequantize")
    plain = [torch.randn(4, 4), torch.randn(4, 4, dtype=torch.bfloat16), torch.randn(4, 4, dtype=torch.float16),
             nn.Parameter(torch.randn(4, 4)), torch.randn(4, 4, requires_grad=True) * 2]
    for tensor in plain:
        assert quantized_kind(tensor) is None and not is_quantized_tensor(tensor), tensor.dtype
    # Reading a plain weight inside a graph leaves backward intact.
    linear = nn.Linear(4, 3)
    x = torch.randn(2, 4, requires_grad=True)
    (x @ dequantized_weight(linear).T).sum().backward()
    assert torch.equal(dequantized_weight(linear), linear.weight.detach())
    assert x.grad is not None


def test_quantized_kinds_and_dequantized_weights_are_exact_per_type():
    weight = torch.randn(8, 16)
    fp8 = weight.to(torch.float8_e4m3fn)  # a ComfyUI fp8 checkpoint's storage
    assert quantized_kind(fp8) == "float8"
    assert torch.equal(dequantized_weight(types.SimpleNamespace(weight=fp8)), fp8.float())
    native = torch.quantize_per_tensor(weight, 0.05, 0, torch.qint8)
    assert quantized_kind(native) == "torch"
    assert torch.equal(dequantized_weight(types.SimpleNamespace(weight=native)), native.dequantize())
    assert dequantized_weight(types.SimpleNamespace(weight=fp8), torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("mode", MODES)
def test_quantize_blocks_stores_every_block_linear_and_reads_back_close(mode):
    denoiser = build_denoiser(ModelConfig())
    originals = {n: m.weight.detach().clone() for n, m in denoiser.transformer.named_modules() if type(m) is nn.Linear}
    report = quantize_blocks(denoiser.transformer, mode)
    block_linears = [n for n in originals if n.startswith("transformer_blocks.")]
    assert report.quantized == block_linears and not report.skipped
    assert report.bytes_after < report.bytes_before / (3 if mode == "nf4" else 1.7)
    modules = dict(denoiser.transformer.named_modules())
    for name, original in originals.items():
        module = modules[name]
        if name in block_linears:
            assert isinstance(module, QuantizedLinear) and quantized_kind(module.weight) == EXPECTED_KIND[mode]
            error = (dequantized_weight(module) - original).abs().max() / original.abs().max()
            assert 0 < error < WEIGHT_TOLERANCE[mode], (name, float(error))
        else:  # layers outside the blocks stay as they were
            assert type(module) is nn.Linear and torch.equal(module.weight, original)


def test_unknown_tensor_subclass_is_an_error_not_a_guess():
    class OddTensor(torch.Tensor):
        pass

    odd = torch.randn(3, 3).as_subclass(OddTensor)
    assert quantized_kind(odd) == "unknown"
    with pytest.raises(TypeError, match="OddTensor"):
        dequantized_weight(types.SimpleNamespace(weight=odd))


@pytest.mark.parametrize("mode", MODES)
def test_inner_tensors_of_quantized_weights_can_be_mapped(mode):
    layer = nn.Sequential(nn.Linear(128, 64))
    quantize_blocks(layer, mode, prefix="0")
    weight = layer[0].weight
    copy = map_inner_tensors(weight, lambda t: t.clone())
    assert type(copy) is type(weight)
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(inner_tensors(copy), inner_tensors(weight)))
    assert torch.equal(dequantized_weight(types.SimpleNamespace(weight=copy)), dequantized_weight(layer[0]))


# ---- dtypes --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("autocast", [False, True])
def test_quantized_linear_returns_the_dtype_a_plain_linear_returns(mode, input_dtype, autocast):
    plain = nn.Linear(128, 64)
    quantized = nn.Sequential(nn.Linear(128, 64))
    quantized.load_state_dict({"0." + k: v for k, v in plain.state_dict().items()})
    quantize_blocks(quantized, mode, prefix="0")
    x = torch.randn(3, 128, dtype=input_dtype, requires_grad=True)
    # Without autocast a plain Linear needs weights of the input's dtype; the quantised one takes any input.
    reference = plain if autocast else plain.to(input_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        expected = reference(x)
        out = quantized(x)
    assert out.dtype == expected.dtype
    tolerance = WEIGHT_TOLERANCE[mode] * 4 + (0.05 if expected.dtype == torch.bfloat16 else 0)
    assert (out.float() - expected.float()).abs().max() <= tolerance * expected.float().abs().max()
    out.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == input_dtype


class _RecordAttention(TorchFunctionMode):
    """(query dtype, mask dtype or None) of every scaled_dot_product_attention call."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[torch.dtype, torch.dtype | None]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            query = kwargs.get("query", args[0] if args else None)
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            self.calls.append((query.dtype, None if mask is None else mask.dtype))
        return func(*args, **kwargs)


@pytest.mark.parametrize("mode", ["none"] + MODES)
def test_attention_masks_match_the_query_dtype_under_bf16_autocast(mode):
    cfg = Config.from_dict({"network": {"rank": 4, "alpha": 4.0}})
    denoiser = build_denoiser(cfg.model, MemoryConfig(quantization=mode))
    network = build_lora(denoiser, cfg.network, with_audio=True)
    inputs = denoiser_inputs(cfg)
    inputs.video, inputs.audio = inputs.video.bfloat16(), inputs.audio.bfloat16()  # as training_step passes them
    inputs.text = inputs.text.to(dtype=torch.bfloat16)
    recorder = _RecordAttention()
    with recorder, torch.autocast("cpu", dtype=torch.bfloat16):
        video, audio = denoiser(inputs)
    (video.float().square().mean() + audio.float().square().mean()).backward()
    masked = [(q, m) for q, m in recorder.calls if m is not None]
    assert masked, "the text cross-attentions take the text mask"
    assert all(m in (q, torch.bool) for q, m in recorder.calls if m is not None), recorder.calls
    assert video.dtype == audio.dtype == torch.bfloat16
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in network.parameters())


# ---- training on quantised bases ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_lora_on_a_quantized_base_follows_the_unquantized_loss_curve(tmp_path, reference_curves, mode):
    curves = train(tmp_path, mode, MemoryConfig(quantization=mode))
    deviation = largest_relative_deviation(curves, reference_curves)
    assert 0 < deviation < LOSS_TOLERANCE[mode], deviation
    assert curves[0][-1] < curves[0][0]  # and it trains


def test_bf16_autocast_training_on_an_int8_base(tmp_path, reference_curves):
    curves = train(tmp_path, "int8_bf16", MemoryConfig(quantization="int8"), **{"train.mixed_precision": "bf16"})
    assert largest_relative_deviation(curves, reference_curves) < LOSS_TOLERANCE["int8"] + 2e-3


@pytest.mark.parametrize("mode", ["int8", "float8", "nf4"])
def test_dora_trains_on_a_quantized_base(tmp_path, mode):
    reference = train(tmp_path, "dora_none", **{"network.type": "dora"})
    curves = train(tmp_path, f"dora_{mode}", MemoryConfig(quantization=mode), **{"network.type": "dora"})
    assert largest_relative_deviation(curves, reference) < LOSS_TOLERANCE[mode]


def test_fingerprint_is_the_unquantized_bases():
    assert (build_denoiser(ModelConfig(), MemoryConfig(quantization="int8")).fingerprint()
            == build_denoiser(ModelConfig()).fingerprint())


# ---- activation offload ---------------------------------------------------------------------------------------


def test_offloaded_checkpoint_inputs_train_exactly_like_plain_checkpointing(tmp_path):
    checkpointed = {"model.gradient_checkpointing": True, "steps": 6}  # copies are exact: a few steps suffice
    reference = train(tmp_path, "checkpointing", MemoryConfig(), **checkpointed)
    offload = OffloadedCheckpoint("cpu", copy_on_same_device=True)  # a real copy even on this CPU-only machine
    curves = train(tmp_path, "offload", MemoryConfig(),
                   prepare=lambda d: d.transformer.enable_gradient_checkpointing(offload), **checkpointed)
    assert curves == reference
    # Two residual streams per block and forward, stored as copies.
    assert offload.offloaded_bytes > 0


def test_offloaded_checkpoint_stores_copies_of_the_streams_only():
    stored = []

    class Spy(nn.Module):
        def forward(self, video, audio, context):
            stored.append((video, audio, context))
            return video * video, audio * audio + context.sum()  # products: backward needs the saved inputs

    offload = OffloadedCheckpoint("cpu", copy_on_same_device=True)
    video = torch.randn(2, 5, 4, requires_grad=True)
    audio = torch.randn(2, 3, 4, requires_grad=True)
    context = torch.randn(2, 4)
    out_video, out_audio = offload(Spy(), video, audio, context)
    (out_video.sum() + out_audio.sum()).backward()
    seen_video, seen_audio, seen_context = stored[0]
    assert seen_video.data_ptr() != video.data_ptr() and seen_audio.data_ptr() != audio.data_ptr()
    assert seen_context is context  # shared by every block: never copied
    assert torch.equal(video.grad, 2 * video) and torch.equal(audio.grad, 2 * audio)
    assert len(stored) == 2  # the forward and backward's recomputation


def test_activation_offload_and_block_swap_do_nothing_on_cpu_and_say_so():
    model = ModelConfig(gradient_checkpointing=True)
    denoiser = build_denoiser(model, MemoryConfig(activation_offload=True, blocks_to_swap=1))
    assert denoiser.memory_plan.report.activation_offload
    with pytest.warns(UserWarning) as caught:
        denoiser.place_on("cpu")
    messages = " ".join(str(w.message) for w in caught)
    assert "memory.blocks_to_swap does nothing" in messages and "memory.activation_offload does nothing" in messages
    assert denoiser.memory_plan.swapper is None


# ---- block swapping ------------------------------------------------------------------------------------------


def four_block_config() -> Config:
    return Config.from_dict({"network": {"rank": 4, "alpha": 4.0},
                             "model": {"gradient_checkpointing": True, "tiny": {"num_layers": 4}}})


def test_swapped_blocks_are_the_last_and_one_block_stays_resident():
    assert swapped_block_indices(4, 0) == [] and swapped_block_indices(4, 3) == [1, 2, 3]
    with pytest.raises(ConfigError, match="at least one must stay"):
        swapped_block_indices(4, 4)


def test_block_swap_hook_order_over_a_training_step():
    cfg = four_block_config()
    denoiser = build_denoiser(cfg.model)
    swapper = BlockSwapper(denoiser.transformer.transformer_blocks, "cpu", 3, record=True)
    swapper.place()
    lora_step(denoiser, cfg)
    assert swapper.log == [
        # forward: each swapped block is prefetched while the previous one runs; two at most on the device
        ("run", 0), ("prefetch", 1), ("run", 1), ("prefetch", 2), ("run", 2), ("evict", 1), ("prefetch", 3), ("run", 3),
        # backward recomputes in reverse: block 3 is still there, block 1 comes back while block 2 runs
        ("run", 3), ("run", 2), ("evict", 3), ("prefetch", 1), ("run", 1), ("run", 0),
    ]


def test_block_swap_keeps_two_swapped_blocks_on_the_device_and_runs_each_from_its_device_copy():
    cfg = four_block_config()
    denoiser = build_denoiser(cfg.model)
    blocks = denoiser.transformer.transformer_blocks
    home = {i: {n: p.data_ptr() for n, p in blocks[i].named_parameters()} for i in range(4)}
    swapper = BlockSwapper(blocks, "cpu", 3)
    swapper.place()
    seen = []

    def check(index):
        def hook(module, args):
            resident = swapper.resident_swapped_blocks()
            assert len(resident) <= MAX_SWAPPED_RESIDENT
            copies = [p.data_ptr() != home[index][n] for n, p in module.named_parameters()]
            seen.append((index, all(copies) if index in swapper.swapped else not any(copies)))
        return hook

    for i, block in enumerate(blocks):
        block.register_forward_pre_hook(check(i))  # after the swapper's hook
    lora_step(denoiser, cfg)
    assert [index for index, _ in seen] == [0, 1, 2, 3, 3, 2, 1, 0]
    assert all(ok for _, ok in seen), seen
    # Between steps the evicted block points at its CPU copy again.
    evicted = [i for i in swapper.swapped if i not in swapper.resident_swapped_blocks()]
    assert evicted and all(p.data_ptr() == home[i][n] for i in evicted for n, p in blocks[i].named_parameters())


@pytest.mark.parametrize("blocks_to_swap", [1, 3])
def test_block_swap_forward_and_backward_match_the_unswapped_model_exactly(blocks_to_swap):
    cfg = four_block_config()
    reference_loss, reference_grads = lora_step(build_denoiser(cfg.model), cfg)
    denoiser = build_denoiser(cfg.model)
    BlockSwapper(denoiser.transformer.transformer_blocks, "cpu", blocks_to_swap).place()
    loss, grads = lora_step(denoiser, cfg)
    assert torch.equal(loss, reference_loss)
    assert all(torch.equal(a, b) for a, b in zip(grads, reference_grads))


def test_block_swap_on_an_nf4_base_matches_the_unswapped_nf4_model():
    cfg = four_block_config()
    reference = build_denoiser(cfg.model, MemoryConfig(quantization="nf4"))
    denoiser = build_denoiser(cfg.model, MemoryConfig(quantization="nf4"))
    reference_loss, reference_grads = lora_step(reference, cfg)
    BlockSwapper(denoiser.transformer.transformer_blocks, "cpu", 2).place()
    loss, grads = lora_step(denoiser, cfg)
    assert torch.equal(loss, reference_loss) and all(torch.equal(a, b) for a, b in zip(grads, reference_grads))


def test_trainer_with_swapped_blocks_follows_the_unswapped_run_exactly(tmp_path):
    options = {"model.gradient_checkpointing": True, "model.tiny": {"num_layers": 3}, "steps": 6}
    reference = train(tmp_path, "unswapped", **options)
    curves = train(tmp_path, "swapped", prepare=lambda d: BlockSwapper(d.transformer.transformer_blocks, "cpu", 2).place(),
                   **options)
    assert curves == reference


def test_block_swap_refuses_trainable_base_weights():
    denoiser = build_denoiser(ModelConfig())
    denoiser.transformer.transformer_blocks[1].requires_grad_(True)
    with pytest.raises(ConfigError, match="trainable base parameters"):
        BlockSwapper(denoiser.transformer.transformer_blocks, "cpu", 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: side-stream prefetch and pinned memory")
def test_block_swap_on_cuda_matches_the_unswapped_model():
    cfg = four_block_config()
    reference = build_denoiser(cfg.model)
    reference.place_on("cuda")
    reference_loss, reference_grads = lora_step(reference, cfg)
    denoiser = build_denoiser(cfg.model, MemoryConfig(blocks_to_swap=3, pin_memory=True))
    denoiser.place_on("cuda")
    swapper = denoiser.memory_plan.swapper
    assert swapper is not None and swapper.swapped == [1, 2, 3]
    assert all(p.device.type == "cpu" and p.is_pinned() for p in denoiser.transformer.transformer_blocks[3].parameters())
    loss, grads = lora_step(denoiser, cfg)
    torch.cuda.synchronize()
    assert torch.allclose(loss, reference_loss, rtol=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(grads, reference_grads))


# ---- options ----------------------------------------------------------------------------------------------------


def test_memory_options_reject_what_cannot_work():
    model = ModelConfig(gradient_checkpointing=False)  # the default is on
    with pytest.raises(ConfigError, match="needs model.gradient_checkpointing"):
        validate_memory(MemoryConfig(blocks_to_swap=1), model)
    with pytest.raises(ConfigError, match="needs model.gradient_checkpointing"):
        validate_memory(MemoryConfig(activation_offload=True), model)
    with pytest.raises(ConfigError, match="at most 1"):
        validate_memory(MemoryConfig(blocks_to_swap=2), ModelConfig(gradient_checkpointing=True))
    with pytest.raises(ConfigError, match=">= 0"):
        validate_memory(MemoryConfig(blocks_to_swap=-1), model)
    with pytest.raises(ConfigError, match="none, int8, float8, nf4"):
        quantize_blocks(nn.Sequential(nn.Linear(4, 4)), "int4", prefix="0")


def test_every_memory_option_has_help():
    import dataclasses

    for f in dataclasses.fields(MemoryConfig):
        assert len(f.metadata.get("help", "")) > 20, f.name


# ---- compilation and attention ----------------------------------------------------------------------------------


def test_compile_is_switched_off_with_block_swap_and_says_why():
    denoiser = build_denoiser(ModelConfig(gradient_checkpointing=True))
    with pytest.warns(UserWarning, match="memory.compile is off"):
        plan = apply_memory_options(denoiser.transformer, MemoryConfig(compile=True, blocks_to_swap=1),
                                    gradient_checkpointing=True)
    assert plan.report.compiled_blocks == 0


@pytest.mark.slow
def test_compiled_blocks_train_like_eager_blocks():
    # aot_eager: the same Dynamo + AOTAutograd graphs as inductor without generating kernels. Inductor itself
    # took ~117 s to compile the tiny model's blocks on 2 CPU cores: too slow for the suite (GPU bench only).
    cfg = Config.from_dict({"network": {"rank": 4, "alpha": 4.0}, "model": {"gradient_checkpointing": True}})
    reference_loss, reference_grads = lora_step(build_denoiser(cfg.model), cfg)
    denoiser = build_denoiser(cfg.model)
    plan = apply_memory_options(denoiser.transformer, MemoryConfig(compile=True), gradient_checkpointing=True,
                                compile_backend="aot_eager")
    assert plan.report.compiled_blocks == cfg.model.tiny.num_layers
    loss, grads = lora_step(denoiser, cfg)
    assert torch.allclose(loss, reference_loss, rtol=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(grads, reference_grads))


def test_flash_attention_needs_cuda_and_the_package():
    check_attention("sdpa", torch.device("cpu"))
    for attention in ("flash", "sdpa_flash"):
        with pytest.raises(ConfigError, match="needs a CUDA device"):
            check_attention(attention, torch.device("cpu"))
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="pip install flash-attn"):
            check_attention("flash", torch.device("cuda"))
    with pytest.raises(ConfigError, match="sdpa, sdpa_flash, flash"):
        check_attention("xformers", torch.device("cpu"))


def test_selecting_a_kernel_changes_only_this_transformer():
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    denoiser = build_denoiser(ModelConfig())
    default_before = _AttentionBackendRegistry.get_active_backend()[0]
    select_attention(denoiser.transformer, "sdpa_flash", torch.device("cuda"))  # configuration only: nothing runs
    processors = [m.processor for m in denoiser.transformer.modules() if hasattr(m, "processor")]
    assert processors and all(p._attention_backend == AttentionBackendName._NATIVE_FLASH for p in processors)
    assert _AttentionBackendRegistry.get_active_backend()[0] == default_before


def test_flash_kinds_drop_an_all_ones_text_mask_and_refuse_padding():
    full, padded = torch.ones(2, 6), torch.tensor([[1, 1, 1, 0, 0, 0]] * 2)
    assert text_mask_for("sdpa", padded) is padded
    assert text_mask_for("flash", full) is None and text_mask_for("sdpa_flash", full) is None
    with pytest.raises(ValueError, match="padding mask"):
        text_mask_for("flash", padded)


# ---- ComfyUI tier: fp8 checkpoints need nothing extra ------------------------------------------------------------
# Measured (tiny 2.0 checkpoint, ComfyUI's manual_cast fp8 Linears vs the same checkpoint in fp32, 8 steps): the
# largest relative step-loss deviation was 1.6e-2 (float8 e4m3 rounding of every block weight, unscaled).
COMFY_FP8_LOSS_TOLERANCE = 5e-2


@pytest.fixture(scope="module")
def tiny_checkpoint(comfy, tmp_path_factory):
    from comfy_fixtures import write_tiny_ltxav_checkpoint

    from ltx2_av_trainer.trainer.config import TinyModelConfig

    return write_tiny_ltxav_checkpoint(tmp_path_factory.mktemp("ltxav"), "2.0", TinyModelConfig())


def train_on_comfy_model(tmp_path, name: str, patcher) -> tuple[list[float], list[float]]:
    """The node's path: ComfyDenoiser loaded outside inference mode, then the real Trainer."""
    from ltx2_av_trainer.trainer.backends.comfyui.denoiser import ComfyDenoiser

    cfg = tiny_config(tmp_path / name, **{"train.steps": 8, "output.save_every": 1000})
    denoiser = ComfyDenoiser(patcher, "2.0")
    with torch.inference_mode(False):
        denoiser.load()
        Trainer(cfg, denoiser, make_samples(cfg, 3), cfg.output.dir).run()
    return loss_curves(cfg.output.dir)


@pytest.mark.comfyui
def test_lora_trains_on_a_comfyui_fp8_checkpoint_through_the_trainer(comfy, tiny_checkpoint, tmp_path):
    import comfy.sd

    from ltx2_av_trainer.trainer.backends.comfyui.memory import base_weight_formats

    with torch.inference_mode():  # as a loader node runs
        fp32 = comfy.sd.load_diffusion_model(str(tiny_checkpoint))
        fp8 = comfy.sd.load_diffusion_model(str(tiny_checkpoint), model_options={"dtype": torch.float8_e4m3fn})
    blocks = fp8.model.diffusion_model.transformer_blocks
    linear = blocks[0].attn1.to_q
    assert type(linear).__qualname__ == "manual_cast.Linear" and linear.weight.dtype == torch.float8_e4m3fn
    formats = base_weight_formats(fp8.model.diffusion_model)
    assert set(formats) == {"float8"} and formats["float8"] > 0
    assert torch.equal(dequantized_weight(linear), linear.weight.float())
    before = {n: p.clone() for n, p in blocks.named_parameters()}

    reference = train_on_comfy_model(tmp_path, "fp32", fp32)
    curves = train_on_comfy_model(tmp_path, "fp8", fp8)
    deviation = largest_relative_deviation(curves, reference)
    assert 0 < deviation < COMFY_FP8_LOSS_TOLERANCE, deviation
    assert curves[0][-1] < curves[0][0]
    # The fp8 base is untouched: same dtype, same bits.
    assert all(p.dtype == before[n].dtype and torch.equal(p.view(torch.uint8), before[n].view(torch.uint8))
               for n, p in blocks.named_parameters() if p.dtype == torch.float8_e4m3fn)


def write_scaled_fp8_checkpoint(folder: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """The tiny checkpoint with every block Linear weight in ComfyUI's scaled-fp8 format (``comfy_quant``)."""
    from comfy_fixtures import CHECKPOINT_PREFIX, build_tiny_ltxav_state_dict, comfy_transformer_config

    from ltx2_av_trainer.trainer.config import TinyModelConfig
    from ltx2_av_trainer.trainer.io_utils import save_safetensors_atomic

    state = build_tiny_ltxav_state_dict("2.0", TinyModelConfig())
    quant = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()), dtype=torch.uint8)
    tensors = {}
    for key, value in state.items():
        if key.startswith("transformer_blocks.") and key.endswith(".weight") and value.ndim == 2:
            layer = key[: -len("weight")]
            scale = value.abs().max() / torch.finfo(torch.float8_e4m3fn).max
            tensors[key] = (value / scale).to(torch.float8_e4m3fn)
            tensors[layer + "weight_scale"] = scale.reshape(()).float()
            tensors[layer + "comfy_quant"] = quant.clone()  # safetensors refuses shared storage
        else:
            tensors[key] = value
    path = folder / "tiny_ltxav_scaled_fp8.safetensors"
    metadata = {"config": json.dumps({"transformer": comfy_transformer_config("2.0", TinyModelConfig())})}
    save_safetensors_atomic({CHECKPOINT_PREFIX + k: v for k, v in tensors.items()}, path, metadata=metadata)
    return path, state


@pytest.mark.comfyui
def test_forward_wrapping_lora_trains_on_a_comfyui_scaled_fp8_linear(comfy, tmp_path):
    import comfy.sd

    from ltx2_av_trainer.trainer.backends.comfyui.memory import base_weight_formats, is_comfy_linear
    from ltx2_av_trainer.trainer.config import NetworkConfig
    from ltx2_av_trainer.trainer.adapters.layers import LoRALayer

    path, original = write_scaled_fp8_checkpoint(tmp_path)
    with torch.inference_mode():
        patcher = comfy.sd.load_diffusion_model(str(path))
    linear = patcher.model.diffusion_model.transformer_blocks[0].attn1.to_q
    # mixed_precision_ops' Linear is not an nn.Linear, and its weight is a comfy_kitchen QuantizedTensor.
    assert not isinstance(linear, nn.Linear) and is_comfy_linear(linear)
    assert quantized_kind(linear.weight) == "comfy" and set(base_weight_formats(patcher.model.diffusion_model)) == {"comfy"}
    reference = original["transformer_blocks.0.attn1.to_q.weight"]
    error = (dequantized_weight(linear) - reference).abs().max() / reference.abs().max()
    assert 0 < error < WEIGHT_TOLERANCE["float8"]

    with torch.inference_mode(False):
        linear.weight = nn.Parameter(linear.weight.clone(), requires_grad=False)  # the node's prepare_for_training
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.clone(), requires_grad=False)
        adapter = LoRALayer(linear.in_features, linear.out_features, NetworkConfig(rank=4, alpha=4.0), torch.Generator().manual_seed(0))
        base_forward = linear.forward
        optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-2)
        x = torch.randn(8, linear.in_features)
        target = torch.randn(8, linear.out_features)
        losses = []
        for _ in range(10):
            out = adapter.adapted_forward(base_forward, x, (), {}, 1.0)  # what the attached adapter's forward runs
            loss = (out - target).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert out.dtype == x.dtype and losses[-1] < losses[0]
    assert all(p.grad is not None for p in adapter.parameters())
