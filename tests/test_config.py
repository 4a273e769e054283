"""BuildConfig layering and validation: preset → card build: → command line, every error naming its field."""
import pytest

from builder.config import BuildConfig, ConfigError, resolve_config, round_channels


def test_layers_apply_in_order():
    c = resolve_config("fast", {"ffn_keep": 0.5, "heal_steps": 7}, {"ffn-keep": "0.625"})
    assert c.ffn_keep == 0.625 and c.heal_steps == 7
    assert c.mask_steps == 12  # from the fast preset
    assert resolve_config().mask_steps == BuildConfig().mask_steps


@pytest.mark.parametrize("layer, field", [
    ({"ffn_keepp": 0.5}, "ffn_keepp"),
    ({"ffn_keep": 1.5}, "ffn_keep"),
    ({"heal_steps": "many"}, "heal_steps"),
    ({"method": "random"}, "method"),
    ({"precision": "int3"}, "precision"),
    ({"mask_steps": 2.5}, "mask_steps"),
    ({"device": "gpu"}, "device"),
    ({"refit_ridges": "0.1,-1"}, "refit_ridges"),
    ({"refit_folds": 1}, "refit_folds"),
    ({"heal_on_policy": 1.5}, "heal_on_policy"),
    ({"on_policy_refresh": 0}, "on_policy_refresh"),
    ({"ffn_accuracy_level": 7}, "ffn_accuracy_level"),
    ({"ffn_accuracy_level": "fast"}, "ffn_accuracy_level"),
    ({"ffn_block_size": 24}, "ffn_block_size"),
    ({"heldout_stride": 0}, "heldout_stride"),
    ({"accuracy_level": 0}, "accuracy_level"),  # int8 weights at fp32 compute: ORT's slow fallback
    ({"ffn_precision": "int8", "precision": "int4", "ffn_accuracy_level": 1}, "ffn_accuracy_level"),
    ({"precision": "int8", "accuracy_level": 0, "ffn_precision": "int4"}, "accuracy_level"),
    ({"ffn_keep_fallback": "1.0,0.875"}, "ffn_keep_fallback"),  # widths must widen
    ({"ffn_keep_fallback": "0.9,1.2"}, "ffn_keep_fallback"),
    ({"ffn_keep_fallback": "wide"}, "ffn_keep_fallback"),
    ({"judge_samples": 0}, "judge_samples"),
    ({"judge_max_samples": 0}, "judge_max_samples"),
    ({"judge_confidence": -1}, "judge_confidence"),
])
def test_bad_settings_name_the_field(layer, field):
    with pytest.raises(ConfigError, match=f"^{field}:"):
        resolve_config("default", layer)


def test_float_compute_is_allowed_where_a_fast_kernel_exists():
    assert resolve_config("default", {"ffn_precision": "int4", "ffn_accuracy_level": 0}).ffn_accuracy_level == 0
    assert resolve_config("default", {"precision": "int4", "accuracy_level": 0}).accuracy_level == 0
    assert resolve_config("default", {"precision": "fp32", "ffn_precision": "int4", "accuracy_level": 0})


def test_ffn_settings_fall_back_to_the_trunks():
    c = resolve_config("default", {"ffn_precision": "int4", "ffn_block_size": 32})
    assert (c.ffn_setting("precision"), c.ffn_setting("quant_block_size")) == ("int4", 32)
    assert c.ffn_setting("accuracy_level") == c.accuracy_level == 4
    # auto (the default): an int4 FFN under a quantised trunk, an exact export under fp32; none: the trunk's
    assert resolve_config().ffn_setting("precision") == "int4"
    assert resolve_config("default", {"precision": "fp32"}).ffn_setting("precision") == "fp32"
    assert resolve_config("default", {"ffn_precision": "none"}).ffn_setting("precision") == "int8"


def test_tuples_come_from_lists_or_comma_separated_text():
    assert resolve_config("default", {"refit_ridges": "0.1, 1"}).refit_ridges == (0.1, 1.0)
    assert resolve_config("default", {"refit_ridges": [3]}).refit_ridges == (3.0,)


def test_keep_ladder_widens_from_the_requested_width():
    assert resolve_config().keep_ladder() == resolve_config("fast").keep_ladder() == [0.875, 1.0]
    assert resolve_config("default", {"ffn_keep": 0.5, "ffn_keep_fallback": "0.75,0.875"}).keep_ladder() == [
        0.5, 0.75, 0.875]
    assert resolve_config("default", {"ffn_keep": 0.9, "ffn_keep_fallback": "0.875,1"}).keep_ladder() == [
        0.9, 1.0]  # narrower fallbacks skipped
    for empty in ("", "none", []):  # the command line's and a card's way to say: report a failure, do not widen
        c = resolve_config("default", {"ffn_keep_fallback": empty})
        assert c.ffn_keep_fallback == () and c.keep_ladder() == [0.875]


def test_unknown_preset():
    with pytest.raises(ConfigError, match="preset"):
        resolve_config("turbo")


def test_fingerprint_tracks_artifact_settings_only():
    a = resolve_config("default")
    assert a.fingerprint() == resolve_config("default", {"threads": 2}).fingerprint()
    assert a.fingerprint() != resolve_config("default", {"ffn_keep": 0.5}).fingerprint()


def test_round_channels():
    assert round_channels(1536, 0.75, 16) == 1152
    assert round_channels(1536, 0.5, 16) == 768
    assert round_channels(1536, 1.0, 16) == 1536
    assert round_channels(128, 0.01, 16) == 16
    assert round_channels(100, 1.0, 16) == 96  # never more than n, always a multiple
