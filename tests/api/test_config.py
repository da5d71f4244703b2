"""danon.config: defaults, validation, error messages."""
import dataclasses

import pytest

from danon.config import (
    BaseConfig,
    DALAConfig,
    DenseConfig,
    MSRAConfig,
    SuperHybridConfig,
    UCSAConfig,
    config_class_for,
)

ALL = [DenseConfig, MSRAConfig, DALAConfig, UCSAConfig, SuperHybridConfig]
SPARSE = [MSRAConfig, DALAConfig, UCSAConfig, SuperHybridConfig]


@pytest.mark.parametrize("cls", ALL)
def test_defaults_are_valid(cls):
    cfg = cls()
    cfg.validate()
    assert cfg.vocab_size == 32000
    assert cfg.causal is True
    assert cfg.head_dim * cfg.num_heads == cfg.hidden_size
    assert cfg.kv_heads == cfg.num_heads
    assert cfg.mlp_size == 4 * cfg.hidden_size
    assert isinstance(cfg, BaseConfig)
    assert dataclasses.is_dataclass(cfg)


def test_seed_readme_examples_that_have_a_meaning():
    cfg = MSRAConfig(hidden_size=768, num_levels=3, num_layers=6, compression_factor=4)
    assert (cfg.hidden_size, cfg.num_levels, cfg.num_layers, cfg.head_dim) == (768, 3, 6, 96)
    cfg = DALAConfig(hidden_size=768, num_heads=8, max_sequence_length=1000000, memory_size=1000,
                     attention_dropout=0.1)
    assert cfg.memory_size == 1000 and cfg.attention_dropout == 0.1
    cfg = UCSAConfig(hidden_size=768, sparsity_factor=0.1, local_window_size=512, global_tokens=64)
    assert cfg.sparsity_factor == 0.1
    cfg = SuperHybridConfig(hidden_size=768, num_levels=3, num_layers=6, sparsity_factor=0.1)
    assert cfg.num_levels == 3 and cfg.sparsity_factor == 0.1


@pytest.mark.parametrize(
    "cls, name, value",
    [
        (MSRAConfig, "calibration_factor", 0.1),
        (MSRAConfig, "bidirectional_flow", True),
        (MSRAConfig, "feature_fusion", "adaptive"),
        (MSRAConfig, "stability_factor", 0.5),
        (MSRAConfig, "memory_efficient", True),
        (DALAConfig, "use_adaptive_router", True),
        (DALAConfig, "importance_threshold", 0.5),
        (DALAConfig, "state_update_frequency", 10),
        (UCSAConfig, "compression_ratio", 0.5),
        (UCSAConfig, "enable_cache", True),
        (UCSAConfig, "max_cache_size", 10000),
        (UCSAConfig, "error_tolerance", 0.001),
        (UCSAConfig, "cache_strategy", "lru"),
        (SuperHybridConfig, "enable_all_optimizations", True),
        (SuperHybridConfig, "compression_ratio", 0.5),
    ],
)
def test_seed_fields_without_meaning_raise_value_error(cls, name, value):
    with pytest.raises(ValueError) as info:
        cls(hidden_size=768, **{name: value})
    msg = str(info.value)
    assert name in msg
    assert "no meaning in danon" in msg
    assert cls.__name__ in msg


def test_seed_super_hybrid_example_names_the_meaningless_field():
    with pytest.raises(ValueError, match="compression_ratio"):
        SuperHybridConfig(hidden_size=768, num_levels=3, num_layers=6, sparsity_factor=0.1,
                          compression_ratio=0.5, enable_all_optimizations=True)


@pytest.mark.parametrize("cls", ALL)
def test_unknown_field_is_a_value_error_listing_allowed_fields(cls):
    with pytest.raises(ValueError) as info:
        cls(hidden_sise=64)
    msg = str(info.value)
    assert "'hidden_sise'" in msg and "Allowed fields" in msg and "hidden_size" in msg


def test_field_of_another_family_names_its_owner():
    with pytest.raises(ValueError, match=r"local_window_size.*UCSAConfig"):
        MSRAConfig(local_window_size=128)
    with pytest.raises(ValueError, match=r"router_temperature.*SuperHybridConfig"):
        DALAConfig(router_temperature=0.1)
    with pytest.raises(ValueError, match=r"window.*MSRAConfig"):
        DenseConfig(window=128)


def test_positional_arguments_rejected():
    with pytest.raises(TypeError, match="keyword"):
        MSRAConfig(768)


@pytest.mark.parametrize(
    "cls, name, value, allowed",
    [
        (DenseConfig, "hidden_size", 0, "int >= 1"),
        (DenseConfig, "hidden_size", 64.0, "int >= 1"),
        (DenseConfig, "num_heads", True, "int >= 1"),
        (DenseConfig, "num_layers", 0, "int >= 1"),
        (DenseConfig, "vocab_size", -5, "int >= 1"),
        (DenseConfig, "num_kv_heads", 0, "int >= 1 or None"),
        (DenseConfig, "intermediate_size", 0, "int >= 1 or None"),
        (DenseConfig, "max_sequence_length", 0, "int >= 1"),
        (DenseConfig, "causal", "yes", "True or False"),
        (DenseConfig, "attention_dropout", 1.0, "[0, 1)"),
        (DenseConfig, "hidden_dropout", -0.1, "[0, 1)"),
        (DenseConfig, "layer_norm_eps", 0.0, "> 0"),
        (MSRAConfig, "block_size", 8, "power of two >= 16"),
        (MSRAConfig, "block_size", 48, "power of two >= 16"),
        (MSRAConfig, "window", -1, "int >= 0"),
        (MSRAConfig, "num_levels", 0, '"auto"'),
        (MSRAConfig, "num_levels", "many", '"auto"'),
        (MSRAConfig, "compression_factor", 1, "int >= 2"),
        (DALAConfig, "decay", "exponential", '"alibi", "none"'),
        (DALAConfig, "memory_size", -1, "int >= 0"),
        (DALAConfig, "compress_rest", 1, "True or False"),
        (DALAConfig, "router_hidden_size", 0, "int >= 1 or None"),
        (UCSAConfig, "local_window_size", -16, "int >= 0"),
        (UCSAConfig, "global_tokens", 1.5, "int >= 0"),
        (UCSAConfig, "top_k_blocks", -1, "int >= 0"),
        (UCSAConfig, "sparsity_factor", 0.0, "(0, 1]"),
        (UCSAConfig, "sparsity_factor", 1.5, "(0, 1]"),
        (SuperHybridConfig, "router_temperature", 0.0, "> 0"),
        (SuperHybridConfig, "router_temperature", float("inf"), "> 0"),
        (SuperHybridConfig, "block_size", 100, "power of two"),
    ],
)
def test_bad_values_name_the_field_and_what_is_allowed(cls, name, value, allowed):
    with pytest.raises(ValueError) as info:
        cls(**{name: value})
    msg = str(info.value)
    assert f"{cls.__name__}.{name}" in msg
    assert allowed in msg
    assert repr(value) in msg


def test_divisibility():
    with pytest.raises(ValueError, match=r"hidden_size \(100\) must be divisible by num_heads \(8\)"):
        DenseConfig(hidden_size=100, num_heads=8)
    with pytest.raises(ValueError, match=r"num_kv_heads \(3\) must divide num_heads \(8\)"):
        MSRAConfig(num_kv_heads=3)
    cfg = UCSAConfig(hidden_size=64, num_heads=8, num_kv_heads=2)
    assert cfg.kv_heads == 2 and cfg.head_dim == 8


def test_valid_special_values():
    assert MSRAConfig(num_levels="auto").num_levels == "auto"
    assert MSRAConfig(window=0).window == 0
    assert DALAConfig(decay="none").decay == "none"
    assert UCSAConfig(sparsity_factor=1.0, top_k_blocks=0).sparsity_factor == 1.0
    assert SuperHybridConfig(block_size=16).block_size == 16
    assert DALAConfig(hidden_size=64, num_heads=4).router_width == 16
    assert DALAConfig(hidden_size=512, router_hidden_size=7).router_width == 7


@pytest.mark.parametrize("cls", ALL)
def test_dict_round_trip_and_replace(cls):
    cfg = cls(hidden_size=64, num_heads=4, num_layers=2)
    assert cls.from_dict(cfg.to_dict()) == cfg
    other = cfg.replace(num_layers=3)
    assert other.num_layers == 3 and cfg.num_layers == 2
    with pytest.raises(ValueError, match="num_layers"):
        cfg.replace(num_layers=0)
    with pytest.raises(ValueError, match="calibration_factor"):
        cls.from_dict({"calibration_factor": 0.1})


def test_validate_after_assignment():
    cfg = DenseConfig(hidden_size=64, num_heads=4)
    cfg.num_heads = 5
    with pytest.raises(ValueError, match="num_heads"):
        cfg.validate()


def test_config_class_for():
    assert config_class_for("msra") is MSRAConfig
    assert config_class_for("hybrid") is SuperHybridConfig
    assert config_class_for("dense") is DenseConfig
    with pytest.raises(ValueError, match="family must be one of"):
        config_class_for("linformer")


def test_docstring_mentions_attention_dropout_semantics():
    assert "output" in BaseConfig.__doc__ and "attention_dropout" in BaseConfig.__doc__


# ------------------------------------------------------------------------------------------------
# Backend options of the memory passes (danon.passes.options.DanonConfig)

from danon.passes.options import DanonConfig  # noqa: E402


def test_memory_options_defaults_and_values():
    cfg = DanonConfig.from_options({})
    assert (cfg.checkpoint, cfg.quantize, cfg.budget) == ("none", "none", None)
    assert DanonConfig.from_options({"checkpoint": "auto"}).budget == 0.5
    assert DanonConfig.from_options({"checkpoint": "auto", "memory_budget": 0}).budget == 0.0
    cfg = DanonConfig.from_options({"checkpoint": "auto", "max_activation_bytes": 2 ** 20})
    assert cfg.budget is None and cfg.max_activation_bytes == 2 ** 20
    cfg = DanonConfig.from_options({"quantize": "int8-weight", "quantize_skip": "lm_head", "quantize_min_features": 64,
                                    "quantize_tolerance": 0.01})
    assert cfg.quantize_skip == ("lm_head",) and cfg.quantize_min_features == 64
    assert DanonConfig.from_options({"quantize": "fp8-weight", "quantize_skip": ["a", "b.*"]}).quantize_skip == ("a", "b.*")


@pytest.mark.parametrize("options, message", [
    ({"checkpoint": "full"}, "'checkpoint' must be one of none, auto; got 'full'"),
    ({"checkpoint": "auto", "memory_budget": 1.5}, "'memory_budget' must be a number in [0, 1]"),
    ({"checkpoint": "auto", "memory_budget": "half"}, "'memory_budget' must be a number in [0, 1]"),
    ({"checkpoint": "auto", "memory_budget": True}, "'memory_budget' must be a number in [0, 1]"),
    ({"checkpoint": "auto", "max_activation_bytes": -1}, "'max_activation_bytes' must be an integer >= 0"),
    ({"checkpoint": "auto", "max_activation_bytes": 1.5e6}, "'max_activation_bytes' must be an integer >= 0"),
    ({"checkpoint": "auto", "memory_budget": 0.5, "max_activation_bytes": 10}, "exclude each other"),
    ({"memory_budget": 0.5}, "'memory_budget' applies only with checkpoint='auto'"),
    ({"max_activation_bytes": 10}, "'max_activation_bytes' applies only with checkpoint='auto'"),
    ({"quantize": "int4"}, "'quantize' must be one of none, int8-weight, fp8-weight; got 'int4'"),
    ({"quantize": "int8-weight", "quantize_min_features": -1}, "'quantize_min_features' must be an integer >= 0"),
    ({"quantize": "int8-weight", "quantize_skip": [3]}, "'quantize_skip' must be a module-name pattern"),
    ({"quantize": "int8-weight", "quantize_skip": [""]}, "'quantize_skip' must be a module-name pattern"),
    ({"quantize": "int8-weight", "quantize_tolerance": 0}, "'quantize_tolerance' must be a number > 0"),
    ({"quantize": "int8-weight", "quantize_tolerance": float("nan")}, "'quantize_tolerance' must be a number > 0"),
    ({"quantize_skip": ["lm_head"]}, "'quantize_skip' applies only with quantize='int8-weight' or 'fp8-weight'"),
    ({"quantize_tolerance": 0.1}, "'quantize_tolerance' applies only with quantize="),
    ({"quantize": "int8-weight", "target": "onnxrt"}, "'quantize' works with target 'inductor' or 'eager'"),
    ({"checkpoint": "auto", "target": "tensorrt"}, "'checkpoint' works with target 'inductor' or 'eager'"),
    ({"checkpont": "auto"}, "unknown danon option 'checkpont'"),
])
def test_memory_options_bad_values_name_the_option(options, message):
    with pytest.raises(ValueError) as info:
        DanonConfig.from_options(options)
    assert message in str(info.value)
