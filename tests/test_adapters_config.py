"""Adapter configs (adapters/registry.py, adapters/config.py, adapters/targeting.py): parsing from a dict with
named errors, range checks, and target modules that match nothing."""

from __future__ import annotations

import pytest
from conftest import tiny_llama

import slim_peft as sp


def test_config_from_dict_rejects_unknown_key_by_name():
    with pytest.raises(sp.ConfigError, match=r"unknown key 'lora_alpah'.*did you mean 'lora_alpha'"):
        sp.config_from_dict({"method": "slim", "lora_alpah": 16})
    with pytest.raises(sp.ConfigError, match="unknown method 'slm'.*'slim'"):
        sp.config_from_dict({"method": "slm"})
    cfg = sp.config_from_dict({"method": "slim", "r": 8, "top_k": 3})
    assert isinstance(cfg, sp.SlimConfig) and cfg.r == 8 and cfg.top_k == 3


@pytest.mark.parametrize("kwargs, match", [
    (dict(r=0), "r must be a positive integer"),
    (dict(top_k=11), "top_k=11 must be between 1"),
    (dict(mask_ratio=1.0), r"mask_ratio must be in \[0, 1\)"),
    (dict(target_modules="everything"), "target_modules must be a list"),
])
def test_config_out_of_range(kwargs, match):
    with pytest.raises(sp.ConfigError, match=match):
        sp.SlimConfig(**kwargs)


def test_missing_target_modules_names_the_available_ones():
    with pytest.raises(sp.TargetModuleError, match=r"no linear module matching.*\['down_proj', 'gate_proj'"):
        sp.get_adapter_model(tiny_llama(), sp.LoraConfig(target_modules=["c_attn"]))
