"""LoRA adapters named by TGI's ``--lora-adapters`` (``LORA_ADAPTERS``).

TGI's format (server/text_generation_server/utils/adapter.py ``parse_lora_adapters``):
a comma-separated list of ``id``, ``id=path``, ``id@revision`` or ``id=path@revision``.
Requests pick one with ``adapter_id`` (the OpenAI routes with ``model``); vLLM applies
it per request (``LoRARequest``), batched with requests on the base model.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

_ADAPTER = re.compile(r"^([^=@]+)(?:=([^@]+))?(?:@(.+))?$")
# vLLM accepts only these LoRA ranks for --max-lora-rank.
_VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass(frozen=True)
class Adapter:
    id: str
    path: str | None = None
    revision: str | None = None


def parse_lora_adapters(spec: str | None) -> list[Adapter]:
    if not spec:
        return []
    out = []
    for item in spec.split(","):
        item = item.strip()
        match = _ADAPTER.match(item) if item.count("=") <= 1 and item.count("@") <= 1 else None
        if match is None:
            raise ValueError(f"Invalid LoRA adapter format: {item}")
        adapter_id, path, revision = match.groups()
        out.append(Adapter(adapter_id.strip(), path.strip() if path else None, revision))
    ids = [a.id for a in out]
    if len(set(ids)) != len(ids):
        raise ValueError(f"LoRA adapter ids must be unique: {', '.join(ids)}")
    return out


def resolve(adapter: Adapter, cache_dir: str | None = None) -> str:
    """A local directory holding the adapter (downloaded from the Hub when needed, into
    ``cache_dir`` when given: TGI's --huggingface-hub-cache)."""
    source = adapter.path or adapter.id
    if Path(source).is_dir():
        return str(Path(source).resolve())
    from huggingface_hub import snapshot_download

    return snapshot_download(source, revision=adapter.revision, cache_dir=cache_dir)


def lora_rank(path: str) -> int:
    try:
        return int(json.loads((Path(path) / "adapter_config.json").read_text())["r"])
    except (OSError, ValueError, KeyError, TypeError):
        return 16


def vllm_max_rank(ranks: list[int]) -> int:
    need = max(ranks, default=8)
    return next((r for r in _VLLM_RANKS if r >= need), need)
