"""The embedded tiny model builds deterministically, offline, and is cached."""

from __future__ import annotations

import hashlib

from tgi_compat.tiny_model import build_tiny_model


def _digest(path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def test_build_is_deterministic_and_cached(tmp_path):
    a = build_tiny_model(tmp_path / "a")
    b = build_tiny_model(tmp_path / "b")
    assert _digest(a) == _digest(b)
    assert build_tiny_model(tmp_path / "a") == a  # cached: same path, no rebuild
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a)
    assert tok.chat_template and tok.eos_token == "</s>" and tok.bos_token == "<s>"
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<s><|user|>\nhi</s>\n<|assistant|>\n"
