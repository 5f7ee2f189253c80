"""The cheap identity of loaded weights (``fingerprint.weights_identity``), which the ComfyUI backend uses instead
of reading every weight at every queue; and that it is remembered per model object.

The full-scale check (ComfyUI tier) builds ComfyUI's LTXAVModel at LTX-2's real 19B dimensions from strided
views (``fingerprint_scale.py``); ``COMFYUI_PATH=... python tests/fingerprint_scale.py`` prints its time.
"""

from __future__ import annotations

import time

import pytest
import torch

from ltx2_av_trainer.trainer.backends.fingerprint import remembered, sample_positions, weights_identity


def state(seed: int = 0, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "blocks.0.attn.to_q.weight": torch.randn(64, 48, generator=g).to(dtype),
        "blocks.0.attn.to_q.bias": torch.randn(64, generator=g).to(dtype),
        "blocks.1.ff.weight": torch.randn(300, 7, generator=g).to(dtype),
        "scale_shift_table": torch.randn(6, 32, generator=g).to(dtype),
        "step": torch.tensor(3),
    }


def test_same_weights_same_identity_and_any_other_checkpoint_differs():
    base = weights_identity(state().items(), [1234])
    assert base == weights_identity(reversed(list(state().items())), [1234])  # order of the state dict
    assert weights_identity(state(seed=1).items(), [1234]) != base  # other values everywhere
    assert weights_identity(state(dtype=torch.float16).items(), [1234]) != base  # other precision
    assert weights_identity(state().items(), [1235]) != base  # another file
    renamed = {k.replace("to_q", "to_k"): v for k, v in state().items()}
    assert weights_identity(renamed.items(), [1234]) != base
    reshaped = state() | {"scale_shift_table": state()["scale_shift_table"].reshape(32, 6)}
    assert weights_identity(reshaped.items(), [1234]) != base


def test_a_changed_sampled_value_changes_it():
    base = weights_identity(state().items())
    weight = state()["blocks.1.ff.weight"]
    for position in sample_positions(weight.numel())[[0, 7, -1]]:
        edited = weight.clone()
        edited.view(-1)[int(position)] += 1
        assert weights_identity((state() | {"blocks.1.ff.weight": edited}).items()) != base, int(position)


def test_strided_views_read_through_their_strides_without_a_copy():
    dense = state()
    views = {key: value.t().contiguous().t() if value.ndim == 2 else value for key, value in dense.items()}
    assert not views["blocks.1.ff.weight"].is_contiguous()
    assert weights_identity(views.items()) == weights_identity(dense.items())
    # 2 * 10^12 elements held as one row repeated with stride 0: a copy could not be allocated.
    row = torch.randn(1_000_000, dtype=torch.bfloat16)
    huge = row.as_strided((2_000_000, 1_000_000), (0, 1))
    first = weights_identity([("w", huge)])
    edited = row.clone()
    edited[-1] += 1
    assert weights_identity([("w", edited.as_strided((2_000_000, 1_000_000), (0, 1)))]) != first


def test_meta_tensors_count_by_shape_only():
    meta = {key: torch.empty_like(value, device="meta") for key, value in state().items()}
    assert weights_identity(meta.items()) == weights_identity(meta.items()) != weights_identity(state().items())


def test_remembered_once_per_object():
    calls = []

    class Model(torch.nn.Module):
        pass

    first, second = Model(), Model()
    compute = lambda: calls.append(1) or f"id{len(calls)}"  # noqa: E731
    assert remembered(first, "weights", compute) == remembered(first, "weights", compute) == "id1"
    assert remembered(second, "weights", compute) == "id2" and len(calls) == 2
    assert remembered(first, "connectors", compute) == "id3"


@pytest.mark.comfyui
@pytest.mark.slow
def test_identity_of_19b_parameters_reads_samples_only(comfy, capsys):
    """ComfyUI's LTXAVModel at LTX-2's real dimensions (19.6B parameters): the identity is computed from the
    samples (every tensor a strided view: reading all values would take minutes), and one changed column of one
    block's weight changes it. The time is printed, not asserted (it is a measurement)."""
    from fingerprint_scale import ltx2_19b_shapes, strided_state

    shapes = ltx2_19b_shapes()
    weights = strided_state(shapes)
    parameters = sum(t.numel() for t in weights.values())
    assert parameters > 19e9 and len(weights) > 3000
    start = time.perf_counter()
    base = weights_identity(weights.items())
    elapsed = time.perf_counter() - start
    key = "transformer_blocks.30.attn1.to_q.weight"
    row = weights[key][0].clone()
    row[-1] += 1  # the last column: a sample position of every row
    weights[key] = row.as_strided(shapes[key], (0, 1))
    assert weights_identity(weights.items()) != base
    with capsys.disabled():
        print(f"\nweights_identity of {parameters / 1e9:.2f}B parameters ({len(weights)} tensors): {elapsed:.3f} s")
