"""Reading the three config formats, their defaults, and refusing what is not Mamba-2."""

import json
import math

import pytest

from mamba2_cli.config import Mamba2Config, config_from_hf, preset_config, read_config
from mamba2_cli.errors import Mamba2Error

CODESTRAL_HF = """{
  "model_type": "mamba2", "hidden_size": 4096, "num_hidden_layers": 64, "num_heads": 128,
  "head_dim": 64, "expand": 2, "n_groups": 8, "state_size": 128, "conv_kernel": 4,
  "chunk_size": 256, "vocab_size": 32768, "use_bias": false, "use_conv_bias": true,
  "residual_in_fp32": true, "rms_norm": true, "layer_norm_epsilon": 1e-05,
  "time_step_limit": [0.0, Infinity], "tie_word_embeddings": false, "norm_before_gate": true,
  "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0
}"""


def write(tmp_path, name, text):
    (tmp_path / name).write_text(text if isinstance(text, str) else json.dumps(text))
    return tmp_path


def test_codestral_hf_config(tmp_path):
    cfg = read_config(write(tmp_path, "config.json", CODESTRAL_HF))
    assert (cfg.nheads, cfg.ngroups, cfg.d_state, cfg.in_proj_dim) == (128, 8, 128, 18560)
    assert cfg.dt_limit == (0.0, math.inf)
    assert cfg.norm_before_gate is False  # HF configs' key is ignored
    assert cfg.num_parameters() == 7_285_403_648
    assert cfg.format == "hf"


def test_time_step_limit_as_float_object(tmp_path):
    text = CODESTRAL_HF.replace("[0.0, Infinity]", '[0.001, {"__float__": "Infinity"}]')
    assert read_config(write(tmp_path, "config.json", text)).dt_limit == (0.001, math.inf)


def test_mamba_ssm_config_defaults_are_mamba2s(tmp_path):
    cfg = read_config(write(tmp_path, "config.json", {
        "d_model": 768, "d_intermediate": 0, "n_layer": 24, "vocab_size": 50277,
        "ssm_cfg": {"layer": "Mamba2"}, "attn_layer_idx": [], "rms_norm": True,
        "residual_in_fp32": True, "pad_vocab_size_multiple": 16, "tie_embeddings": True}))
    assert (cfg.d_state, cfg.headdim, cfg.expand, cfg.d_conv, cfg.chunk_size, cfg.ngroups) == (128, 64, 2, 4, 256, 1)
    assert cfg.padded_vocab_size == 50288 and cfg.vocab_size == 50277
    assert cfg.format == "mamba_ssm" and cfg.tie_embeddings


def test_mamba_ssm_norm_before_gate_is_honoured(tmp_path):
    cfg = read_config(write(tmp_path, "config.json", {
        "d_model": 64, "n_layer": 2, "vocab_size": 100, "ssm_cfg": {"layer": "Mamba2", "norm_before_gate": True}}))
    assert cfg.norm_before_gate is True


def test_mistral_params(tmp_path):
    cfg = read_config(write(tmp_path, "params.json", {
        "dim": 4096, "n_layers": 64, "vocab_size": 32768, "n_groups": 8, "rms_norm": True,
        "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 1, "tie_embeddings": False}))
    assert cfg.num_parameters() == 7_285_403_648 and cfg.format == "mistral"


@pytest.mark.parametrize("cfg, words", [
    ({"model_type": "mamba", "hidden_size": 768, "num_hidden_layers": 24, "vocab_size": 50280}, "Mamba-1"),
    ({"d_model": 768, "n_layer": 24, "vocab_size": 50277, "ssm_cfg": {}}, "Mamba-2"),
    ({"d_model": 768, "n_layer": 24, "vocab_size": 50277, "ssm_cfg": {"layer": "Mamba2"}, "attn_layer_idx": [3]}, "hybrid"),
    ({"d_model": 768, "n_layer": 24, "vocab_size": 50277, "ssm_cfg": {"layer": "Mamba2"}, "d_intermediate": 1024}, "MLP"),
    ({"model_type": "llama", "hidden_size": 4096}, "not a Mamba-2"),
])
def test_refuses_what_is_not_pure_mamba2(tmp_path, cfg, words):
    with pytest.raises(Mamba2Error, match=words):
        read_config(write(tmp_path, "config.json", cfg))


def test_missing_config_is_a_clear_error(tmp_path):
    with pytest.raises(Mamba2Error, match="no config.json"):
        read_config(tmp_path)


def test_presets_have_the_published_shapes():
    assert preset_config("codestral-7b").num_parameters() == 7_285_403_648
    assert preset_config("mamba2-130m").padded_vocab_size == 50288
    with pytest.raises(Mamba2Error, match="unknown preset"):
        preset_config("gpt-5")


def test_inconsistent_heads_are_refused():
    with pytest.raises(Mamba2Error, match="num_heads"):
        config_from_hf({"model_type": "mamba2", "hidden_size": 64, "num_hidden_layers": 1, "vocab_size": 10,
                        "num_heads": 3, "head_dim": 16})
    with pytest.raises(Mamba2Error, match="groups"):
        Mamba2Config(d_model=64, n_layer=1, vocab_size=10, headdim=16, ngroups=3)


def hf_config(**over) -> dict:
    d = {"model_type": "mamba2", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 100, "head_dim": 16,
         "n_groups": 2, "state_size": 16, "chunk_size": 16}
    d.update(over)
    return d


# Each field of each type: a value of the wrong type, and one out of range, named with the
# file's own key and the file.
@pytest.mark.parametrize("key, value, problem", [
    ("expand", "2", "must be a positive integer, got '2'"),
    ("head_dim", "16", "must be a positive integer, got '16'"),
    ("state_size", "16", "must be a positive integer, got '16'"),
    ("hidden_size", 64.0, "must be a positive integer, got 64.0"),
    ("n_groups", 0, "must be a positive integer, got 0"),
    ("n_groups", -2, "must be a positive integer, got -2"),
    ("head_dim", 0, "must be a positive integer, got 0"),
    ("expand", True, "must be a positive integer, got True"),
    ("chunk_size", 16.5, "must be a positive integer, got 16.5"),
    ("chunk_size", 16.0, "must be a positive integer, got 16.0"),
    ("conv_kernel", None, "must be a positive integer, got None"),
    ("num_hidden_layers", -1, "must be a positive integer, got -1"),
    ("layer_norm_epsilon", "1e-5", "must be a positive number, got '1e-5'"),
    ("layer_norm_epsilon", 0, "must be a positive number, got 0"),
    ("layer_norm_epsilon", math.nan, "must be a positive number, got nan"),
    ("use_bias", "false", "must be true or false, got 'false'"),
    ("tie_word_embeddings", 0, "must be true or false, got 0"),
    ("residual_in_fp32", None, "must be true or false, got None"),
    ("time_step_limit", ["a", 1.0], "holds 'a', not a number"),
    ("time_step_limit", [0.1], "must be a pair"),
    ("time_step_limit", [0.5, 0.1], r"must be \[low, high\] with 0 <= low <= high"),
    ("time_step_limit", [math.nan, 1.0], "holds nan, not a number"),
])
def test_every_field_is_checked_and_named_with_its_file(tmp_path, key, value, problem):
    with pytest.raises(Mamba2Error, match=rf"config\.json: {key} {problem}") as e:
        read_config(write(tmp_path, "config.json", hf_config(**{key: value})))
    assert "\n" not in str(e.value)


def test_fields_of_the_other_formats_are_named_as_their_files_name_them(tmp_path):
    ssm = {"d_model": 64, "n_layer": 2, "vocab_size": 100, "ssm_cfg": {"layer": "Mamba2", "headdim": 16}}
    with pytest.raises(Mamba2Error, match=r"config\.json: ssm_cfg\.ngroups must be a positive integer, got 0"):
        read_config(write(tmp_path, "config.json", {**ssm, "ssm_cfg": {**ssm["ssm_cfg"], "ngroups": 0}}))
    with pytest.raises(Mamba2Error, match=r"config\.json: ssm_cfg\.norm_before_gate must be true or false"):
        read_config(write(tmp_path, "config.json", {**ssm, "ssm_cfg": {**ssm["ssm_cfg"], "norm_before_gate": "yes"}}))
    with pytest.raises(Mamba2Error, match=r"config\.json: norm_epsilon must be a positive number, got 'small'"):
        read_config(write(tmp_path, "config.json", {**ssm, "norm_epsilon": "small"}))
    with pytest.raises(Mamba2Error, match=r"config\.json: ssm_cfg must be an object"):
        read_config(write(tmp_path, "config.json", {**ssm, "ssm_cfg": ["Mamba2"]}))
    with pytest.raises(Mamba2Error, match=r"config\.json: pad_vocab_size_multiple must be a positive integer, got 0"):
        read_config(write(tmp_path, "config.json", {**ssm, "pad_vocab_size_multiple": 0}))
    (tmp_path / "config.json").unlink()
    params = {"dim": 64, "n_layers": 2, "vocab_size": 100, "headdim": 16}
    with pytest.raises(Mamba2Error, match=r"params\.json: n_groups must be a positive integer, got '1'"):
        read_config(write(tmp_path, "params.json", {**params, "n_groups": "1"}))
    with pytest.raises(Mamba2Error, match=r"params\.json: norm_eps must be a positive number, got -1e-05"):
        read_config(write(tmp_path, "params.json", {**params, "norm_eps": -1e-5}))


def test_sizes_that_do_not_divide_name_the_key_and_the_file(tmp_path):
    with pytest.raises(Mamba2Error, match=r"config\.json: n_groups 3 does not divide the 8 heads"):
        read_config(write(tmp_path, "config.json", hf_config(n_groups=3)))
    with pytest.raises(Mamba2Error, match=r"config\.json: head_dim 48 does not divide d_inner 128"):
        read_config(write(tmp_path, "config.json", hf_config(head_dim=48, n_groups=1)))


def test_direct_construction_checks_fields_before_dividing_by_them():
    with pytest.raises(Mamba2Error, match="config: headdim must be a positive integer, got 0"):
        Mamba2Config(d_model=64, n_layer=1, vocab_size=10, headdim=0)
    with pytest.raises(Mamba2Error, match="config: ngroups must be a positive integer, got 0"):
        Mamba2Config(d_model=64, n_layer=1, vocab_size=10, headdim=16, ngroups=0)


def test_deeply_nested_json_is_a_clear_error(tmp_path):
    text = '{"model_type": "mamba2", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    with pytest.raises(Mamba2Error, match=r"config\.json .*nested too deeply"):
        read_config(write(tmp_path, "config.json", text))
