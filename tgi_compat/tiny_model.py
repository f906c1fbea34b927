"""Builder for the embedded tiny model served when no ``--model-id`` is given.

The model is a 2-layer Llama with random (seeded) weights and a byte-level BPE
tokenizer trained at build time on text that ships with Python, so it needs no
network. Its output is gibberish; it exists so that the server, the tests and the
benchmarks run the real vLLM engine anywhere. The build is deterministic for a given
Python/tokenizers/transformers install and cached on disk under a versioned key.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

# Bump when anything below changes the produced files.
BUILDER_VERSION = "2"

VOCAB_SIZE = 1024
HIDDEN_SIZE = 128
NUM_LAYERS = 2
NUM_HEADS = 2  # head_dim 64: vLLM's CPU attention rejects head_dim 16.
MAX_POSITION_EMBEDDINGS = 8192
WEIGHT_SEED = 0

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]

# A plain role-tagged template; roles are special tokens so chat tests can find them.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# Non-ASCII text so the vocabulary holds multi-byte characters split across tokens.
_EXTRA_TEXT = (
    "Grüße aus Köln. Ça va très bien, merci. ¿Dónde está la biblioteca? "
    "日本語のテキストです。中文文本。Ελληνικά κείμενα. Русский текст. "
    "emoji 🙂🚀✨ and math ∑∫√π≈≠. "
)

_CORPUS_MODULES = ("this", "json", "argparse", "asyncio.events", "textwrap", "string", "heapq")


def default_cache_dir() -> Path:
    base = os.environ.get("TGI_COMPAT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tgi-compat"
    )
    return Path(base)


def _corpus() -> list[str]:
    """Text that ships with Python: the sources of a few stdlib modules."""
    import importlib.util

    texts = [_EXTRA_TEXT * 20]
    for name in _CORPUS_MODULES:
        spec = importlib.util.find_spec(name)
        if spec and spec.origin and os.path.exists(spec.origin):
            with open(spec.origin, encoding="utf-8") as f:
                texts.append(f.read())
    return texts


def _key() -> str:
    import tokenizers
    import transformers

    raw = json.dumps(
        [BUILDER_VERSION, sys.version_info[:2], tokenizers.__version__, transformers.__version__]
    )
    return hashlib.sha256(raw.encode()).hexdigest()[:12]


def _build_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [BOS, EOS, PAD, *ROLE_TOKENS]
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=ROLE_TOKENS,
        model_max_length=MAX_POSITION_EMBEDDINGS,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)


def _build_weights(out: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(out)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=HIDDEN_SIZE,
        intermediate_size=HIDDEN_SIZE * 2,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_HEADS,
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(WEIGHT_SEED)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        # Random init gives near-uniform logits; sharpen them so greedy decoding has
        # clear winners and EOS is reachable, which tests of EOS handling need.
        model.lm_head.weight.mul_(40.0)
        model.lm_head.weight[tok.eos_token_id].mul_(1.5)
    model.to(torch.float32).save_pretrained(out, safe_serialization=True)
    # vLLM reads generation_config for default stop ids; keep it minimal and explicit.
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id})
    )


def build_cached(target: Path, build) -> Path:
    """``target``, made by ``build(tmp_dir)`` on first use and renamed into place
    atomically (a concurrent builder's identical copy wins ties)."""
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    try:
        build(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race; its copy is identical
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_tiny_model(cache_dir: Path | None = None) -> Path:
    """Return the path of the tiny model, building it on first use (atomic rename)."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()

    def build(out: Path) -> None:
        _build_tokenizer(out)
        _build_weights(out)

    return build_cached(root / f"tiny-llama-{_key()}", build)


if __name__ == "__main__":
    print(build_tiny_model())
