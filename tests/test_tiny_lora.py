"""The tiny LoRA adapter has PEFT's layout, keys and shapes (no engine)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tgi_compat.tiny_lora import MLP_MODULES, build_tiny_lora
from tgi_compat.tiny_model import build_tiny_model


def _keys(n_layers, modules):
    block = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn"}
    return {
        f"base_model.model.model.layers.{i}.{block.get(m, 'mlp')}.{m}.lora_{ab}.weight"
        for i in range(n_layers)
        for m in modules
        for ab in "AB"
    }


def test_tiny_lora_for_the_tiny_model(tmp_path):
    base = build_tiny_model()
    out = build_tiny_lora(base, tmp_path / "lora", rank=8, seed=0)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["bias"] == "none"
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16
    assert cfg["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert cfg["base_model_name_or_path"] == str(base)

    t = load_file(out / "adapter_model.safetensors")
    base_cfg = json.loads((base / "config.json").read_text())
    assert set(t) == _keys(base_cfg["num_hidden_layers"], ["q_proj", "k_proj", "v_proj", "o_proj"])
    hidden = base_cfg["hidden_size"]
    for k, v in t.items():
        assert v.dtype == torch.float32
        assert v.shape == ((8, hidden) if ".lora_A." in k else (hidden, 8)), k
    # Effective update (alpha / r) * B @ A has about the requested std (0.05).
    a = t["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = t["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert 0.03 < float((2.0 * b @ a).std()) < 0.08

    again = load_file(build_tiny_lora(base, tmp_path / "again", rank=8, seed=0) / "adapter_model.safetensors")
    assert all(torch.equal(t[k], again[k]) for k in t)
    other = load_file(build_tiny_lora(base, tmp_path / "other", rank=8, seed=1) / "adapter_model.safetensors")
    assert not all(torch.equal(t[k], other[k]) for k in t)


def test_tiny_lora_gqa_and_mlp_shapes(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(
        json.dumps(
            {
                "hidden_size": 96,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "head_dim": 32,
                "intermediate_size": 200,
                "num_hidden_layers": 3,
            }
        )
    )
    mods = ["q_proj", "k_proj", "v_proj", "o_proj", *MLP_MODULES]
    out = build_tiny_lora(base, tmp_path / "lora", rank=4, target_modules=mods, lora_alpha=4)
    t = load_file(out / "adapter_model.safetensors")
    assert set(t) == _keys(3, mods)
    p = "base_model.model.model.layers.2"
    assert t[f"{p}.self_attn.q_proj.lora_A.weight"].shape == (4, 96)
    assert t[f"{p}.self_attn.q_proj.lora_B.weight"].shape == (128, 4)
    assert t[f"{p}.self_attn.k_proj.lora_B.weight"].shape == (64, 4)
    assert t[f"{p}.self_attn.o_proj.lora_A.weight"].shape == (4, 128)
    assert t[f"{p}.self_attn.o_proj.lora_B.weight"].shape == (96, 4)
    assert t[f"{p}.mlp.down_proj.lora_A.weight"].shape == (4, 200)
    assert t[f"{p}.mlp.up_proj.lora_B.weight"].shape == (200, 4)
    with pytest.raises(ValueError):
        build_tiny_lora(base, tmp_path / "bad", target_modules=["lm_head"])
