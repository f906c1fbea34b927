"""Tokenizer access for the spec layers: encode, decode, and per-token text.

TGI sends one event per token carrying that token's own text, decoded incrementally
with special tokens kept (``""`` while a multi-byte character is incomplete; the next
token then carries it). ``tokenizers.decoders.DecodeStream`` does exactly that in Rust,
in O(1) per token, so each request owns one stream.
"""

from __future__ import annotations

from tokenizers.decoders import DecodeStream

# Prompt tokens fed to a new DecodeStream so that the first generated token decodes
# in context (SentencePiece-style tokenizers drop a leading space otherwise).
_PRIME_TOKENS = 6


class Tokenizer:
    """The served model's tokenizer, shared by every request."""

    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer
        # The Rust tokenizer behind a fast HF tokenizer: calls cost a third as much.
        self.backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        self.special_ids = frozenset(hf_tokenizer.all_special_ids)
        self.eos_token_id = hf_tokenizer.eos_token_id
        self._single: dict[int, str] = {}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self.backend is not None:
            return self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        return self.hf(text, add_special_tokens=add_special_tokens).input_ids

    def encode_no_special(self, text: str) -> list[int]:
        """For prompts already rendered by a chat template (which adds its own BOS)."""
        return self.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if self.backend is not None:
            return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """One token decoded on its own (prefill and top-n alternatives, as TGI does)."""
        text = self._single.get(token_id)
        if text is None:
            text = self._single[token_id] = self.decode([token_id], skip_special_tokens=False)
        return text

    def offsets(self, text: str, add_special_tokens: bool = True) -> list[tuple[int, str, int, int]]:
        """(id, text, start, stop) per token, with byte offsets into ``text``."""
        enc = self.hf(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        out = []
        # Character offsets -> UTF-8 byte offsets.
        byte_pos = [0]
        for ch in text:
            byte_pos.append(byte_pos[-1] + len(ch.encode("utf-8")))
        for token_id, (start, stop) in zip(enc.input_ids, enc.offset_mapping):
            out.append((token_id, text[start:stop], byte_pos[start], byte_pos[stop]))
        return out

    def stream(self, prompt_ids: list[int]) -> TokenTextStream:
        return TokenTextStream(self, prompt_ids)


class TokenTextStream:
    """Per-request incremental decoder: ``step(id)`` returns that token's text."""

    __slots__ = ("_backend", "_stream", "_hf")

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int]):
        self._backend = tokenizer.backend
        self._hf = tokenizer
        prime = prompt_ids[-_PRIME_TOKENS:]
        if self._backend is not None:
            self._stream = DecodeStream(ids=prime, skip_special_tokens=False)
        else:  # slow tokenizer: TGI's prefix/read-offset algorithm in Python
            self._stream = _OffsetDecoder(tokenizer, prime)

    def step(self, token_id: int) -> str:
        if self._backend is not None:
            return self._stream.step(self._backend, token_id) or ""
        return self._stream.step(token_id)


class _OffsetDecoder:
    """TGI's ``decode_token`` (server/text_generation_server/models/model.py)."""

    def __init__(self, tokenizer: Tokenizer, prime: list[int]):
        self.tok = tokenizer
        self.ids = list(prime)
        self.prefix = 0
        self.read = len(self.ids)

    def step(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text = self.tok.decode(self.ids[self.prefix : self.read], skip_special_tokens=False)
        new_text = self.tok.decode(self.ids[self.prefix :], skip_special_tokens=False)
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return new_text[len(prefix_text) :]
        return ""
