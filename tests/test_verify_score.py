"""verify checks tensor shapes against the model, not only key names, and says plainly when a file is no LoRA;
score scores every file it can and names each one it cannot."""

from __future__ import annotations

import json

import pytest
import torch
from ltx2_av_trainer.trainer.adapters.files import read_adapter_file, save_network
from ltx2_av_trainer.trainer.adapters.network import build_lora
from ltx2_av_trainer.trainer.app.cli import main
from ltx2_av_trainer.trainer.backends.diffusers_backend import build_denoiser
from ltx2_av_trainer.trainer.config import Config
from safetensors.torch import save_file

TOML = """
[model.tiny]
attention_head_dim = {head}

[network]
type = "{kind}"
rank = 4
alpha = 4.0
"""


def _lora(tmp_path, kind: str, head: int = 16):
    """A LoRA of ``kind`` for the tiny model whose video heads are ``head`` wide, and the TOML of that model."""
    config = Config.from_dict({"model": {"tiny": {"attention_head_dim": head}},
                               "network": {"type": kind, "rank": 4, "alpha": 4.0}})
    network = build_lora(build_denoiser(config.model), config.network, with_audio=True)
    for parameter in network.parameters():
        torch.nn.init.normal_(parameter)  # any values: only shapes matter here
    path = save_network(network, tmp_path / f"{kind}_{head}.safetensors", config_json=config.to_json(),
                        base_fingerprint="x", step=1, version="2.0", dtype="float32")
    network.detach()
    return path


def _toml(tmp_path, kind: str, head: int):
    path = tmp_path / f"model_{kind}_{head}.toml"
    path.write_text(TOML.format(head=head, kind=kind), encoding="utf-8")
    return path


def _errors(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.strip().splitlines() if "torchao" not in line]


@pytest.mark.parametrize("kind", ["lora", "dora", "lokr", "loha"])
def test_verify_fails_a_lora_whose_shapes_do_not_fit_the_model(tmp_path, kind, capsys):
    lora = _lora(tmp_path, kind, head=16)
    assert main(["verify", str(lora), "--config", str(_toml(tmp_path, kind, 16)), "--json", str(tmp_path / "ok.json")]) == 0
    assert json.loads((tmp_path / "ok.json").read_text())["shape_mismatches"] == []
    capsys.readouterr()
    # The same module names on a model with wider video heads: every video attention layer is another size.
    assert main(["verify", str(lora), "--config", str(_toml(tmp_path, kind, 32)), "--json", str(tmp_path / "bad.json")]) == 1
    report = json.loads((tmp_path / "bad.json").read_text())
    assert not report["ok"] and report["unloaded_keys"] == []  # every key name lands: only the shapes are wrong
    mismatched = {m.split(":")[0] for m in report["shape_mismatches"]}
    assert "transformer_blocks.0.attn1.to_q" in mismatched and "transformer_blocks.0.audio_attn1.to_q" not in mismatched
    out = capsys.readouterr().out
    assert "verify FAILED" in out and "wrong shape: transformer_blocks.0.attn1.to_q:" in out


def test_verify_names_factors_that_do_not_multiply(tmp_path, capsys):
    lora = _lora(tmp_path, "lokr")
    tensors, metadata = read_adapter_file(lora)
    key = next(k for k in tensors if k.endswith("attn1.to_q.lokr_w2_b") or k.endswith("attn1.to_q.lokr_w2"))
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1])
    save_file(tensors, str(lora), metadata=metadata)
    assert main(["verify", str(lora), "--config", str(_toml(tmp_path, "lokr", 16)), "--json", str(tmp_path / "r.json")]) == 1
    (mismatch,) = [m for m in json.loads((tmp_path / "r.json").read_text())["shape_mismatches"]]
    assert mismatch.startswith("transformer_blocks.0.attn1.to_q:")


@pytest.mark.parametrize("content,words", [(b"", "is empty (0 bytes)"), (b"\xff" * 64, "is not a safetensors LoRA file")])
def test_verify_says_plainly_when_a_file_is_no_lora(tmp_path, capsys, content, words):
    path = tmp_path / "not_a_lora.safetensors"
    path.write_bytes(content)
    assert main(["verify", str(path)]) == 1
    err = _errors(capsys)
    assert len(err) == 1 and str(path) in err[0] and words in err[0] and "Error" not in err[0], err


def test_score_scores_every_file_and_names_each_failure(tmp_path, capsys):
    pytest.importorskip("resemblyzer")
    from ltx2_av_trainer.trainer.data.synth import make_demo_dataset

    clips = tmp_path / "clips"
    make_demo_dataset(clips, clips_per_speaker=2, seconds=1.0, width=64, height=64)
    toml = tmp_path / "data.toml"
    toml.write_text(f'[[dataset.sources]]\npath = "{clips}"\n', encoding="utf-8")
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF not really")
    files = sorted(str(p) for p in clips.glob("*.mp4"))
    assert main(["score", files[0], str(broken), str(tmp_path / "missing.wav"), files[1], "--config", str(toml),
                 "--json", str(tmp_path / "score.json")]) == 1
    report = json.loads((tmp_path / "score.json").read_text())
    assert [r["file"] for r in report["scores"]] == [files[0], files[1]]
    assert [f["file"] for f in report["failures"]] == [str(broken), str(tmp_path / "missing.wav")]
    err = _errors(capsys)
    assert any(line.startswith(f"error: {broken}:") for line in err)
    assert err[-1] == "error: 2 of 4 files could not be scored (named above)"
    assert main(["score", files[0], "--config", str(toml)]) == 0
