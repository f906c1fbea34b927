"""Builder for the embedded tiny vision-language model (``--model-id embedded:tiny-vlm``).

An Idefics 3 model (``Idefics3ForConditionalGeneration``, one of TGI's VLM families): a
2-layer SigLIP-style vision tower on 64x64 images (64 patches of 8 pixels, pixel-shuffled
by 2 into 16 image tokens per image), its connector, and a 2-layer Llama text model.
LLaVA, Qwen2-VL, Gemma 3 and Llama 4 are out of reach here: vLLM's modules for them
import torchvision, which the CPU install removes. The tokenizer is the embedded text
model's (``tiny_model``) plus Idefics 3's image tokens; the image processor (no image
splitting) is saved with an ``Idefics3Processor`` so vLLM's multimodal processor loads it
from disk. Weights are random (seeded); the output is gibberish, but it depends on the image,
which is what tests need. Built offline, deterministically, cached under a versioned key.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from tgi_compat import tiny_model

# Bump when anything below changes the produced files.
BUILDER_VERSION = "1"

IMAGE_TOKEN = "<image>"
# Idefics 3's processor wraps each image's tokens in these.
EXTRA_TOKENS = ["<fake_token_around_image>", IMAGE_TOKEN, "<end_of_utterance>", "<global-img>"]
IMAGE_SIZE = 64
PATCH_SIZE = 8
SCALE_FACTOR = 2
IMAGE_TOKENS_PER_IMAGE = (IMAGE_SIZE // PATCH_SIZE) ** 2 // SCALE_FACTOR**2
VISION_HIDDEN = 64
VISION_LAYERS = 2
VISION_HEADS = 1  # head_dim 64, as the text model (vLLM's CPU attention rejects 16)
WEIGHT_SEED = 1

# Images go where the message puts them: LLaVA's placeholder replaces each image part.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or part['type'] == 'image_url' %}" + IMAGE_TOKEN + "{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _key() -> str:
    raw = json.dumps([BUILDER_VERSION, tiny_model._key()])
    return hashlib.sha256(raw.encode()).hexdigest()[:12]


def _build(out: Path, text_model: Path) -> None:
    import torch
    from transformers import (
        AutoTokenizer,
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
        Idefics3VisionConfig,
        LlamaConfig,
    )

    tok = AutoTokenizer.from_pretrained(text_model)
    tok.add_tokens(EXTRA_TOKENS, special_tokens=True)
    image_processor = Idefics3ImageProcessorPil(
        do_resize=True,
        size={"longest_edge": IMAGE_SIZE},
        do_image_splitting=False,
        max_image_size={"longest_edge": IMAGE_SIZE},
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tok,
        image_seq_len=IMAGE_TOKENS_PER_IMAGE,
        chat_template=CHAT_TEMPLATE,
    )
    tok.chat_template = CHAT_TEMPLATE
    processor.save_pretrained(out)
    tok.save_pretrained(out)

    text_config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=tiny_model.HIDDEN_SIZE,
        intermediate_size=tiny_model.HIDDEN_SIZE * 2,
        num_hidden_layers=tiny_model.NUM_LAYERS,
        num_attention_heads=tiny_model.NUM_HEADS,
        num_key_value_heads=tiny_model.NUM_HEADS,
        max_position_embeddings=tiny_model.MAX_POSITION_EMBEDDINGS,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    vision_config = Idefics3VisionConfig(
        hidden_size=VISION_HIDDEN,
        intermediate_size=VISION_HIDDEN * 2,
        num_hidden_layers=VISION_LAYERS,
        num_attention_heads=VISION_HEADS,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
    )
    config = Idefics3Config(
        vision_config=vision_config.to_dict(),
        text_config=text_config.to_dict(),
        image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        scale_factor=SCALE_FACTOR,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    config.dtype = "float32"
    torch.manual_seed(WEIGHT_SEED)
    model = Idefics3ForConditionalGeneration(config)
    with torch.no_grad():
        # As the text model: sharp logits so greedy decoding has clear winners.
        model.lm_head.weight.mul_(40.0)
        model.lm_head.weight[tok.eos_token_id].mul_(1.5)
        # Image features on a larger scale than the text embeddings dominate the
        # prompt, so a different image gives a different greedy answer.
        for p in model.model.connector.parameters():
            p.mul_(4.0)
    model.to(torch.float32).save_pretrained(out, safe_serialization=True)
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id})
    )


def build_tiny_vlm(cache_dir: Path | None = None) -> Path:
    """Return the path of the tiny VLM, building it (and the text model) on first use."""
    root = Path(cache_dir) if cache_dir else tiny_model.default_cache_dir()
    target = root / f"tiny-idefics3-{_key()}"
    if (target / "config.json").exists():
        return target
    text_model = tiny_model.build_tiny_model(root)
    return tiny_model.build_cached(target, lambda out: _build(out, text_model))


if __name__ == "__main__":
    print(build_tiny_vlm(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
