"""The embedded tiny VLM builds deterministically, offline, is cached, and its processor
loads from disk and expands one image into the model's image tokens."""

from __future__ import annotations

import hashlib

from PIL import Image

from tgi_compat import tiny_vlm
from tgi_compat.tiny_vlm import build_tiny_vlm


def _digest(path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


def test_build_is_deterministic_cached_and_processes_images(tmp_path):
    a = build_tiny_vlm(tmp_path / "a")
    b = build_tiny_vlm(tmp_path / "b")
    assert _digest(a) == _digest(b)
    assert build_tiny_vlm(tmp_path / "a") == a  # cached: same path, no rebuild

    from transformers import AutoConfig, AutoProcessor, AutoTokenizer

    config = AutoConfig.from_pretrained(a)
    assert config.architectures == ["Idefics3ForConditionalGeneration"]
    processor = AutoProcessor.from_pretrained(a)
    tok = processor.tokenizer
    # The text model's tokenizer, plus the image tokens.
    text_tok = AutoTokenizer.from_pretrained(next((tmp_path / "a").glob("tiny-llama-*")))
    assert tok.encode("Once upon a time") == text_tok.encode("Once upon a time")
    assert config.image_token_id == tok.convert_tokens_to_ids(tiny_vlm.IMAGE_TOKEN)
    out = processor(text="Look: <image> now", images=[Image.new("RGB", (100, 40), (200, 10, 10))])
    ids = out["input_ids"][0]
    assert ids.count(config.image_token_id) == tiny_vlm.IMAGE_TOKENS_PER_IMAGE == 16
    assert tuple(out["pixel_values"].shape[-2:]) == (tiny_vlm.IMAGE_SIZE, tiny_vlm.IMAGE_SIZE)
