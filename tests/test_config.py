import pytest

from ltx2_av_trainer.trainer.config import Config, ConfigError


def test_defaults_validate_and_round_trip():
    cfg = Config()
    cfg.validate()
    again = Config.from_dict(cfg.to_dict())
    assert again == cfg
    assert cfg.network.rank == 32 and cfg.network.alpha == 32
    assert cfg.timesteps.independent_audio is True
    assert cfg.loss.balance == "ema_mag" and cfg.loss.target_ratio == 0.33
    assert (cfg.loss.balance_min, cfg.loss.balance_max) == (0.05, 4.0)
    assert cfg.logging.log_every == 10


def test_unknown_key_is_an_error_naming_key_and_allowed_keys():
    with pytest.raises(ConfigError) as exc:
        Config.from_dict({"train": {"stepz": 10}})
    message = str(exc.value)
    assert "train.stepz" in message and "steps" in message and "allowed keys" in message


def test_unknown_section_is_an_error():
    with pytest.raises(ConfigError, match="unknown key 'trian'"):
        Config.from_dict({"trian": {}})


def test_bad_choice_names_allowed_values():
    with pytest.raises(ConfigError) as exc:
        Config.from_dict({"loss": {"balance": "auto"}})
    assert "loss.balance" in str(exc.value) and "'ema_mag'" in str(exc.value) and "'inv_freq'" in str(exc.value)


def test_wrong_types_are_rejected():
    with pytest.raises(ConfigError, match="train.steps: expected an integer"):
        Config.from_dict({"train": {"steps": "100"}})
    with pytest.raises(ConfigError, match="timesteps.independent_audio: expected true or false"):
        Config.from_dict({"timesteps": {"independent_audio": 1}})


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="dataset.frames: must be 8n\\+1"):
        Config.from_dict({"dataset": {"frames": 24}})
    with pytest.raises(ConfigError, match="dataset.width"):
        Config.from_dict({"dataset": {"width": 100}})
    with pytest.raises(ConfigError, match="Min-SNR weighting does not exist for flow matching"):
        Config.from_dict({"loss": {"min_snr_gamma": 5.0}})
    with pytest.raises(ConfigError, match="output.name"):
        Config.from_dict({"output": {"name": "../escape"}})


def test_toml_loading_and_errors(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        """
[model]
version = "2.3"
cross_modal_sigma = "own"

[[dataset.sources]]
path = "clips"
repeats = 2

[timesteps]
shift = 0.0
""",
        encoding="utf-8",
    )
    cfg = Config.from_toml(path)
    assert cfg.model.version == "2.3" and cfg.model.cross_modal_sigma == "own"
    assert cfg.dataset.sources[0].repeats == 2 and cfg.dataset.sources[0].caption_extension == ".txt"
    assert cfg.timesteps.shift == 0.0
    bad = tmp_path / "bad.toml"
    bad.write_text("[network]\nrank = 8\nalgo = 'lokr'\n", encoding="utf-8")
    with pytest.raises(ConfigError) as exc:
        Config.from_toml(bad)
    assert str(bad) in str(exc.value) and "network.algo" in str(exc.value)
    with pytest.raises(ConfigError, match="not valid TOML"):
        (tmp_path / "broken.toml").write_text("[train\n", encoding="utf-8")
        Config.from_toml(tmp_path / "broken.toml")


def test_replace_with_dotted_keys_validates():
    cfg = Config().replace(**{"train.steps": 7, "network.preset": "voice"})
    assert cfg.train.steps == 7 and cfg.network.preset == "voice"
    with pytest.raises(ConfigError):
        Config().replace(**{"network.preset": "everything"})
