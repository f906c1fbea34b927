"""A tiny PEFT LoRA adapter for a base model's ``config.json``, for tests (no network, no peft).

``build_tiny_lora(base_model_dir, out_dir)`` writes ``adapter_config.json`` and
``adapter_model.safetensors`` in PEFT's layout (keys
``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`` of shape
``(r, in_features)`` and ``...lora_B.weight`` of shape ``(out_features, r)``) with
seeded random weights large enough that the adapter visibly changes the output. It
reads only the base model's ``config.json`` (Llama-style attention and MLP names), so it
fits the embedded tiny model (``tgi_compat.tiny_model.build_tiny_model()``) and any
Llama/Mistral/Qwen-like checkpoint. Serve it with vLLM's ``enable_lora=True`` and
``max_lora_rank >= rank``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

__all__ = ["ATTENTION_MODULES", "MLP_MODULES", "build_tiny_lora", "lora_shapes"]

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")


def _text_config(config: dict) -> dict:
    return config.get("text_config") or config


def lora_shapes(config: dict, target_modules: Sequence[str] = ATTENTION_MODULES) -> dict[str, tuple[int, int]]:
    """``{module: (in_features, out_features)}`` for a Llama-style decoder layer."""
    c = _text_config(config)
    hidden = c["hidden_size"]
    heads = c["num_attention_heads"]
    kv_heads = c.get("num_key_value_heads") or heads
    head_dim = c.get("head_dim") or hidden // heads
    inter = c.get("intermediate_size")
    known = {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv_heads * head_dim),
        "v_proj": (hidden, kv_heads * head_dim),
        "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }
    unknown = [m for m in target_modules if m not in known or known[m][0] is None or known[m][1] is None]
    if unknown:
        raise ValueError(f"cannot size LoRA target modules {unknown} from this config")
    return {m: known[m] for m in target_modules}


def build_tiny_lora(
    base_model_dir: str | Path,
    out_dir: str | Path,
    rank: int = 8,
    seed: int = 0,
    scale: float = 0.05,
    target_modules: Sequence[str] = ATTENTION_MODULES,
    lora_alpha: int | None = None,
) -> Path:
    """Write a PEFT LoRA adapter for ``base_model_dir`` into ``out_dir``; return ``out_dir``.

    ``scale`` is the standard deviation of the entries of each effective weight update
    ``(lora_alpha / rank) * B @ A`` (the tiny model's weights have std 0.02, so the
    default 0.05 changes its greedy output from the first token on). ``lora_alpha``
    defaults to ``2 * rank``. Deterministic for a given ``seed`` and torch version.
    """
    import torch
    from safetensors.torch import save_file

    if rank <= 0:
        raise ValueError("rank must be positive")
    base = Path(base_model_dir)
    out = Path(out_dir)
    config = json.loads((base / "config.json").read_text())
    num_layers = _text_config(config)["num_hidden_layers"]
    shapes = lora_shapes(config, target_modules)
    alpha = 2 * rank if lora_alpha is None else lora_alpha

    # std(B @ A) = sqrt(rank) * std(A) * std(B); with std(A) = 1/sqrt(rank) it is std(B).
    std_a = 1.0 / math.sqrt(rank)
    std_b = scale * rank / alpha
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(num_layers):
        for module, (fan_in, fan_out) in shapes.items():
            block = "self_attn" if module in ATTENTION_MODULES else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, fan_in, generator=gen) * std_a
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, rank, generator=gen) * std_b

    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base),
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": list(target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
    }
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
    return out


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m tgi_compat.tiny_lora BASE_MODEL_DIR OUT_DIR")
    print(build_tiny_lora(sys.argv[1], sys.argv[2]))
