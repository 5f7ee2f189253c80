"""The Training Config node's widget list (``nodes/config_widgets.py``), without ComfyUI.

Saved workflows store widget values by position, so the order of ``TRAINING_CONFIG_WIDGETS`` is a contract:
``RELEASED_ORDER`` below is the order as released, and the list may only grow at its end. The ComfyUI tier
checks the same order on a running server (``/object_info``) and in the frontend (test_browser.py).
"""

from __future__ import annotations

import pytest

from ltx2_av_trainer.nodes.config_widgets import (
    TRAINING_CONFIG_WIDGETS,
    config_fields,
    config_from_widgets,
    not_in_node_reason,
    training_widgets,
)
from ltx2_av_trainer.trainer.config import Config, ConfigError

# The widget order of the first release of the redesigned node. Never edit these names or their order: a new
# option is appended to TRAINING_CONFIG_WIDGETS (and may be appended here once released).
RELEASED_ORDER = (
    "train_steps", "network_preset", "network_rank", "network_alpha", "optimizer_lr", "optimizer_audio_lr",
    "timesteps_independent_audio", "loss_balance", "audio_missing_audio", "model_gradient_checkpointing",
    "train_mixed_precision", "output_save_every", "train_seed", "model_cross_modal_sigma", "network_type",
    "network_include", "network_exclude", "network_dropout", "network_rank_dropout", "network_module_dropout",
    "network_lokr_factor", "network_init_seed", "optimizer_name", "optimizer_lr_overrides", "optimizer_loraplus_ratio",
    "optimizer_weight_decay", "optimizer_beta1", "optimizer_beta2", "optimizer_eps", "schedule_name",
    "schedule_warmup_steps", "schedule_num_cycles", "schedule_min_lr_ratio", "timesteps_sampling",
    "timesteps_shifted_mode", "timesteps_fixed_shift", "timesteps_shift", "timesteps_logit_std",
    "timesteps_stretched_uniform_fraction", "timesteps_min_sigma", "timesteps_max_sigma", "loss_type",
    "loss_huber_delta", "loss_video_weight", "loss_audio_weight", "loss_target_ratio", "loss_ema_decay",
    "loss_balance_min", "loss_balance_max", "loss_inv_freq_beta", "loss_inv_freq_eps", "loss_caption_dropout",
    "loss_caption_dropout_video", "loss_caption_dropout_audio", "loss_noise_offset", "loss_audio_noise_offset",
    "audio_silence_weight", "audio_audio_dop_multiplier", "audio_batch_probability", "audio_min_batches_per_accum",
    "audio_bucket_strategy", "audio_bucket_interval_seconds", "audio_supervision_mode", "audio_supervision_warmup",
    "audio_supervision_interval", "audio_supervision_min_ratio", "preservation_dop", "preservation_dop_class_prompt",
    "preservation_dop_multiplier", "preservation_blank", "preservation_blank_multiplier",
    "preservation_prior_divergence", "preservation_prior_divergence_multiplier", "validation_every_steps",
    "validation_sigmas", "validation_seed", "validation_sample_every_steps", "validation_prompts",
    "validation_sample_seeds", "validation_sample_steps", "validation_sample_seconds", "validation_fixed_sigma",
    "validation_voice_score", "validation_report", "train_batch_size", "train_gradient_accumulation",
    "train_max_grad_norm", "train_max_consecutive_nonfinite", "logging_log_every", "logging_tensorboard",
    "logging_quiet", "output_keep_states", "output_save_dtype",
)

# Options validated against a partner: the range of one is only valid with the partner set alike.
PARTNERS = {"audio_min_batches_per_accum": "train_gradient_accumulation", "loss_balance_min": "loss_balance_max",
            "loss_balance_max": "loss_balance_min"}
NUMBER_KINDS = ("INT", "FLOAT", "OPTIONAL_FLOAT", "ITEM")


def defaults() -> dict:
    return {spec.name: spec.default for spec in training_widgets()}


def test_widget_order_only_grows_at_the_end():
    names = [definition.name for definition in TRAINING_CONFIG_WIDGETS]
    assert tuple(names[: len(RELEASED_ORDER)]) == RELEASED_ORDER, (
        "the Training Config widgets were reordered, removed or renamed, or one was inserted before the end: "
        "saved workflows would load their values into the wrong widgets. Append new options at the END of "
        "TRAINING_CONFIG_WIDGETS (nodes/config_widgets.py)"
    )


def test_every_config_option_has_a_widget_or_a_stated_reason():
    covered = {definition.key for definition in TRAINING_CONFIG_WIDGETS}
    for key, *_ in config_fields():
        reason = not_in_node_reason(key)
        if reason is None:
            assert key in covered, (f"config option {key} has no Training Config widget: append one at the END of "
                                    "TRAINING_CONFIG_WIDGETS in nodes/config_widgets.py (or give the reason in "
                                    "NOT_IN_TRAINING_CONFIG)")
        else:
            assert key not in covered, f"{key} has a widget but NOT_IN_TRAINING_CONFIG says: {reason}"


def test_the_shown_widgets_come_first_and_are_few():
    advanced = [definition.advanced for definition in TRAINING_CONFIG_WIDGETS[: len(RELEASED_ORDER)]]
    shown = advanced.count(False)
    assert advanced == [False] * shown + [True] * (len(advanced) - shown)
    assert 8 <= shown <= 15, f"{shown} widgets are shown; the node should show about a dozen"


def test_default_widgets_give_the_default_config():
    assert config_from_widgets(defaults()).to_dict() == Config().to_dict()


def test_every_number_range_is_what_the_trainer_accepts():
    """The frontend and ComfyUI's validation keep a number inside [min, max]: every value there must be a valid
    config (both ends checked), and every default must lie inside."""
    for spec in training_widgets():
        if spec.kind not in NUMBER_KINDS:
            continue
        low, high = spec.definition.min, spec.definition.max
        assert low <= spec.default <= high, spec.name
        for end in (low, high):
            values = defaults() | {spec.name: end}
            if spec.name in PARTNERS:  # the partner at the same value, within its own range
                partner = next(s for s in training_widgets() if s.name == PARTNERS[spec.name]).definition
                values[partner.name] = min(max(end, partner.min), partner.max)
            try:
                config_from_widgets(values)
            except ConfigError as exc:
                pytest.fail(f"{spec.name} = {end} is inside the widget's range but the trainer refuses it: {exc}")


def test_typed_lists_and_optionals_map_to_the_config():
    config = config_from_widgets(defaults() | {
        "network_include": "audio_ff\\.net\\.2$\n\n  attn1 \n",
        "optimizer_lr_overrides": "audio_attn=5e-5",
        "validation_sigmas": "0.2, 0.6;0.9",
        "validation_sample_seeds": "1 2,3",
        "validation_prompts": "ohwx, a person speaks\nohwx, a person laughs",
        "optimizer_beta1": 0.8, "optimizer_beta2": 0.95,
        "optimizer_audio_lr": 5e-5, "audio_batch_probability": 0.5,
        "timesteps_fixed_shift": True, "timesteps_shift": 0.0,
    })
    assert config.network.include == ["audio_ff\\.net\\.2$", "attn1"]
    assert config.optimizer.lr_overrides == ["audio_attn=5e-5"]
    assert config.validation.sigmas == [0.2, 0.6, 0.9] and config.validation.sample_seeds == [1, 2, 3]
    assert config.validation.prompts == ["ohwx, a person speaks", "ohwx, a person laughs"]
    assert config.optimizer.betas == [0.8, 0.95]
    assert (config.optimizer.audio_lr, config.audio.batch_probability, config.timesteps.shift) == (5e-5, 0.5, 0.0)
    unset = config_from_widgets(defaults() | {"timesteps_fixed_shift": False, "timesteps_shift": 2.0})
    assert unset.timesteps.shift is None and unset.optimizer.audio_lr is None and unset.audio.batch_probability is None


def test_bad_values_are_named_with_the_fix():
    with pytest.raises(ConfigError, match="validation_sigmas: 'high' is not a number"):
        config_from_widgets(defaults() | {"validation_sigmas": "0.1, high"})
    with pytest.raises(ConfigError, match="validation_sample_seeds: '1.5' is not a whole number"):
        config_from_widgets(defaults() | {"validation_sample_seeds": "1.5"})
    with pytest.raises(ConfigError, match="network_preset: 'faces' is not one of"):
        config_from_widgets(defaults() | {"network_preset": "faces"})
    with pytest.raises(ConfigError, match="optimizer.lr_overrides"):
        config_from_widgets(defaults() | {"optimizer_lr_overrides": "audio_attn"})
    with pytest.raises(ConfigError, match="missing Training Config widgets: train_steps"):
        config_from_widgets({k: v for k, v in defaults().items() if k != "train_steps"})
