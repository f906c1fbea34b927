"""Score text for TGI's watermark: ``python -m tgi_compat.watermark_detect --model-id M "text"``.

Prints one JSON object: ``{"z_score": ..., "green_fraction": ..., "tokens": ...}``
(``tokens``: how many tokens were scored). A z-score above about 4 means watermarked.
The text is tokenized without special tokens; ``--prompt`` gives the prompt the text
was generated from, whose last token (as the server saw it, special tokens included)
seeds the first green list, so every generated token is scored. Re-tokenizing text can
split it differently from how it was generated, which lowers the score a little.
``--gamma`` defaults to env ``WATERMARK_GAMMA`` (0.5), as on the server; the vocabulary
size is the model's (its logits width), from its config.

The green lists and the z-test live here rather than in ``tgi_compat.logits`` (which
re-exports them) so that detecting needs torch and transformers but not vLLM.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "WATERMARK_HASH_KEY",
    "WatermarkScore",
    "green_list_ids",
    "main",
    "watermark_delta",
    "watermark_gamma",
    "watermark_score",
    "watermark_z_score",
]

# TGI's hash key: "just a large prime number to create a rng seed with sufficient bit width".
WATERMARK_HASH_KEY = 15485863


def watermark_gamma() -> float:
    """Green-list fraction, from env ``WATERMARK_GAMMA`` (TGI's default 0.5)."""
    return float(os.environ.get("WATERMARK_GAMMA", "0.5"))


def watermark_delta() -> float:
    """Green-list logit bias, from env ``WATERMARK_DELTA`` (TGI's default 2.0)."""
    return float(os.environ.get("WATERMARK_DELTA", "2.0"))


def green_list_ids(
    prev_token: int,
    vocab_size: int,
    gamma: float | None = None,
    hash_key: int = WATERMARK_HASH_KEY,
) -> torch.Tensor:
    """TGI's green list for the token after ``prev_token``: int64 ids, drawn on the CPU.

    TGI: ``rng.manual_seed(hash_key * prev_token)``, ``torch.randperm(vocab, generator=rng)``,
    first ``int(vocab * gamma)`` entries.
    """
    gamma = watermark_gamma() if gamma is None else gamma
    rng = torch.Generator(device="cpu")
    rng.manual_seed(hash_key * int(prev_token))
    perm = torch.randperm(vocab_size, device="cpu", generator=rng)
    return perm[: int(vocab_size * gamma)]


@dataclass(frozen=True)
class WatermarkScore:
    z_score: float
    green_fraction: float
    green: int
    tokens: int  # tokens scored


def watermark_score(
    token_ids: Sequence[int],
    vocab_size: int,
    gamma: float | None = None,
    hash_key: int = WATERMARK_HASH_KEY,
    prefix_token: int | None = None,
    ignore_repeated_bigrams: bool = False,
) -> WatermarkScore:
    """Kirchenbauer et al.'s one-proportion z-test for TGI's watermark.

    Each token is scored against the green list seeded by the token before it. Without
    ``prefix_token`` the first token has no predecessor and is not scored; with it (the
    last prompt token) every token is. ``z = (green - gamma*T) / sqrt(T*gamma*(1-gamma))``;
    no token to score gives z = 0.

    ``ignore_repeated_bigrams`` scores each distinct (previous, token) pair once, as the
    paper's detector can: text that loops (small or low-entropy models do) repeats the
    same pairs, which are not independent draws and push z far from 0 either way.
    """
    gamma = watermark_gamma() if gamma is None else gamma
    ids = [int(t) for t in token_ids]
    if prefix_token is not None:
        ids = [int(prefix_token), *ids]
    pairs = list(itertools.pairwise(ids))
    if ignore_repeated_bigrams:
        pairs = list(dict.fromkeys(pairs))
    masks: dict[int, torch.Tensor] = {}
    green = 0
    for prev, tok in pairs:
        mask = masks.get(prev)
        if mask is None:
            mask = torch.zeros(vocab_size, dtype=torch.bool)
            mask[green_list_ids(prev, vocab_size, gamma, hash_key)] = True
            masks[prev] = mask
        green += bool(0 <= tok < vocab_size and mask[tok])
    total = len(pairs)
    if total == 0:
        return WatermarkScore(0.0, 0.0, 0, 0)
    z = (green - gamma * total) / math.sqrt(total * gamma * (1 - gamma))
    return WatermarkScore(z, green / total, green, total)


def watermark_z_score(
    token_ids: Sequence[int],
    vocab_size: int,
    gamma: float | None = None,
    hash_key: int = WATERMARK_HASH_KEY,
    prefix_token: int | None = None,
    ignore_repeated_bigrams: bool = False,
) -> float:
    """z-score of ``token_ids`` under TGI's watermark; ~0 unwatermarked, > 4 watermarked."""
    return watermark_score(token_ids, vocab_size, gamma, hash_key, prefix_token, ignore_repeated_bigrams).z_score


def _vocab_size(model_id: str, tokenizer) -> int:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_id)
    except (OSError, ValueError):  # a tokenizer-only repo: fall back to the tokenizer's size
        return len(tokenizer)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(getattr(text_config, "vocab_size", None) or len(tokenizer))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tgi_compat.watermark_detect", description=__doc__.split("\n")[0])
    ap.add_argument("--model-id", required=True, help="model path, hub id or embedded:<name> (tokenizer and config)")
    ap.add_argument("--prompt", default=None, help="prompt the text continues; its last token seeds the first green list")
    ap.add_argument("--gamma", type=float, default=None, help="green-list fraction (default: env WATERMARK_GAMMA or 0.5)")
    ap.add_argument("--vocab-size", type=int, default=None, help="logits width (default: the model config's vocab_size)")
    ap.add_argument(
        "--ignore-repeated-bigrams", action="store_true", help="score each distinct (previous, token) pair once"
    )
    ap.add_argument("text", help="text to score ('-' reads stdin)")
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    if args.model_id.startswith("embedded:"):  # as the server resolves it
        from tgi_compat.config import build_embedded_model

        args.model_id = build_embedded_model(args.model_id)
    tokenizer = AutoTokenizer.from_pretrained(args.model_id)
    text = sys.stdin.read() if args.text == "-" else args.text
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    prefix = None
    if args.prompt is not None:
        prompt_ids = tokenizer(args.prompt)["input_ids"]  # as the server tokenizes prompts
        prefix = prompt_ids[-1] if prompt_ids else None
    vocab = args.vocab_size or _vocab_size(args.model_id, tokenizer)
    gamma = watermark_gamma() if args.gamma is None else args.gamma
    score = watermark_score(
        ids, vocab, gamma=gamma, prefix_token=prefix, ignore_repeated_bigrams=args.ignore_repeated_bigrams
    )
    print(json.dumps({"z_score": score.z_score, "green_fraction": score.green_fraction, "tokens": score.tokens}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
