"""TGI's ``typical_p`` and ``watermark`` as vLLM V1 logits processors, plus a detector.

Both processors are loaded once by the engine (``EngineArgs(logits_processors=[...])``,
as classes or as ``"tgi_compat.logits:TypicalPLogitsProcessor"``) and switched on per
request through ``SamplingParams.extra_args``:

``{"typical_p": 0.9}``
    Locally typical sampling with the semantics of TGI's ``TypicalLogitsWarper`` /
    ``HeterogeneousTypicalLogitsWarper`` (``mass=typical_p``, ``min_tokens_to_keep=1``).
    Optional ``"typical_top_k"`` (int > 0) and ``"typical_top_p"`` (float in (0, 1))
    run TGI's top-k and top-p warpers inside this processor, before typical; see
    "Order of the warpers" below.

``{"watermark": True}``
    Kirchenbauer et al.'s watermark exactly as TGI's ``WatermarkLogitsProcessor``
    does it: ``delta`` (env ``WATERMARK_DELTA``, default 2.0) is added to the logits of
    a green list of ``int(vocab * gamma)`` tokens (env ``WATERMARK_GAMMA``, default
    0.5), the green list being ``torch.randperm(vocab)`` from a CPU generator seeded
    with ``15485863 * previous_token``. The previous token is the request's latest
    generated token, or the last prompt token before anything is generated.

Where each runs in vLLM's sampler (``vllm/v1/sample/sampler.py``)
------------------------------------------------------------------
vLLM runs processors that are *not* argmax-invariant on the raw logits, before
penalties and temperature; argmax-invariant ones run after temperature and before
top-k/top-p, and only when the batch samples (their effect on greedy rows is dropped).

* Watermark is not argmax-invariant (it can move the argmax). It therefore runs
  first, before repetition/frequency penalties: the same place as in TGI, whose
  ``NextTokenChooser`` applies watermark, then penalties, then the warpers.

* Typical-p *can* drop the argmax: the typical set holds the tokens whose surprisal
  ``-log p`` is closest to the entropy, and a dominant token (low surprisal) next to a
  long flat tail (high entropy) can fall outside it. ``is_argmax_invariant()`` still
  returns True, deliberately. What vLLM does with that flag is choose the *place* the
  processor runs; it does not check the claim. True puts typical after temperature,
  which is TGI's order (temperature -> top_k -> top_p -> typical_p) and changes the
  result: typical sets depend on the temperature. False would run it on raw logits,
  before penalties and temperature, unlike TGI. The one thing given up by claiming
  True is that greedy rows skip it, which is also TGI: ``typical_p < 1`` makes TGI
  sample (the server maps such requests to sampling; a greedy row that carries
  ``typical_p`` anyway gets plain argmax).

Order of the warpers
--------------------
vLLM applies its own top-k/top-p *after* argmax-invariant processors, so with
``SamplingParams(top_k=..., top_p=...)`` plus ``typical_p`` the order is
temperature -> typical -> top_k -> top_p, whereas TGI's is temperature -> top_k ->
top_p -> typical. To reproduce TGI's order exactly, pass the request's top-k/top-p
as ``extra_args["typical_top_k"]`` / ``extra_args["typical_top_p"]`` and leave
``SamplingParams.top_k``/``top_p`` neutral (0 / 1.0); this processor then applies
TGI's top-k and top-p warpers (same semantics as TGI's heterogeneous ones) right
before typical. vLLM's own top-k/top-p use the same semantics as TGI's, so for
requests without ``typical_p`` nothing needs to change.

Green lists are always drawn on the CPU, whatever device the logits are on: a CUDA
generator yields a different permutation for the same seed, so TGI on a GPU puts
different tokens in its green lists than TGI (or this module) on a CPU. Drawing on
the CPU makes the server and :func:`watermark_z_score` agree on every device. Green
lists also depend on torch's ``randperm`` implementation, so detect with a torch
whose CPU ``randperm`` matches the one the server used.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

# The detector needs no vLLM, so it lives beside its CLI; re-exported here.
from tgi_compat.watermark_detect import (
    WATERMARK_HASH_KEY,
    WatermarkScore,
    green_list_ids,
    watermark_delta,
    watermark_gamma,
    watermark_score,
    watermark_z_score,
)

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.config import VllmConfig

__all__ = [
    "WATERMARK_HASH_KEY",
    "TypicalPLogitsProcessor",
    "WatermarkLogitsProcessor",
    "WatermarkScore",
    "green_list_ids",
    "tgi_top_k_top_p_",
    "typical_p_mask",
    "watermark_delta",
    "watermark_gamma",
    "watermark_score",
    "watermark_z_score",
]

TYPICAL_P_KEY = "typical_p"
TYPICAL_TOP_K_KEY = "typical_top_k"
TYPICAL_TOP_P_KEY = "typical_top_p"
# Divides the logits after vLLM's temperature: how temperatures above vLLM's limit of 2
# (TGI has none) are applied, still before top-k/top-p.
TEMPERATURE_SCALE_KEY = "temperature_scale"
WATERMARK_KEY = "watermark"


def _extra(params: SamplingParams) -> dict[str, Any]:
    return params.extra_args or {}


# --------------------------------------------------------------------------- typical_p


def tgi_top_k_top_p_(
    scores: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    """TGI's ``HeterogeneousTopKLogitsWarper`` then ``HeterogeneousTopPLogitsWarper``, in place.

    ``top_k``: int64 ``(rows, 1)``, 0 disables a row. ``top_p``: ``(rows, 1)``, 1.0
    disables a row. Top-k keeps every token scoring at least the k-th score (ties kept);
    top-p removes the low tail whose cumulative probability is ``<= 1 - top_p``, always
    keeping the most probable token.
    """
    vocab = scores.shape[-1]
    if top_k is not None:
        k = top_k.clamp(min=1, max=vocab)
        kth = torch.topk(scores, int(k.max()), dim=-1).values.gather(1, k - 1)
        kth.masked_fill_(top_k == 0, -math.inf)
        scores.masked_fill_(scores < kth, -math.inf)
    if top_p is not None:
        sorted_logits, sorted_indices = torch.sort(scores, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= (1 - top_p)
        remove[..., -1:] = False
        scores.masked_fill_(remove.scatter(1, sorted_indices, remove), -math.inf)
    return scores


def typical_p_mask(scores: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the tokens TGI's typical warper removes (True = remove).

    ``scores``: ``(rows, vocab)`` float logits; ``mass``: ``(rows, 1)`` typical_p per
    row. This is TGI's ``HeterogeneousTypicalLogitsWarper`` step for step (tokens sorted
    by ``|-log p - H|``; the shortest prefix whose probability reaches ``mass`` is kept,
    plus any token tied with its last), with transformers' clamp of the cut-off index,
    which TGI's heterogeneous copy lacks (it would index past the vocab when rounding
    keeps the cumulative sum just under ``mass``).
    """
    normalized = torch.nn.functional.log_softmax(scores, dim=-1)
    p = torch.exp(normalized)
    ent = -(normalized * p).nansum(-1, keepdim=True)
    shifted = torch.abs((-normalized) - ent)
    sorted_scores, sorted_indices = torch.sort(shifted, descending=False)
    cum = scores.gather(-1, sorted_indices).softmax(dim=-1).cumsum(dim=-1)
    last_ind = (cum < mass).sum(dim=1).clamp_(max=scores.shape[-1] - 1)
    sorted_remove = sorted_scores > sorted_scores.gather(1, last_ind.view(-1, 1))
    return sorted_remove.scatter(1, sorted_indices, sorted_remove)


@dataclass(frozen=True)
class _TypicalParams:
    mass: float  # 1.0: off
    top_k: int  # 0: off
    top_p: float  # 1.0: off
    scale: float = 1.0  # extra temperature divisor (TGI allows temperatures vLLM refuses)


class TypicalPLogitsProcessor(LogitsProcessor):
    """``extra_args["typical_p"]``: TGI's locally typical sampling (see module doc)."""

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool):
        self.device = torch.device(device)
        self.params: dict[int, _TypicalParams] = {}
        # Rebuilt when the requesting rows change: row indices, mass, top-k, top-p.
        self._rows = torch.empty(0, dtype=torch.long)
        self._all_rows = False
        self._mass = torch.empty(0, 1)
        self._top_k: torch.Tensor | None = None
        self._top_p: torch.Tensor | None = None
        self._scale: torch.Tensor | None = None
        self._typical_rows: torch.Tensor | None = None
        self._any_typical = False

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        extra = _extra(sampling_params)
        mass = extra.get(TYPICAL_P_KEY)
        if mass is not None and (
            isinstance(mass, bool) or not isinstance(mass, (int, float)) or not 0.0 < mass < 1.0
        ):
            raise ValueError("`typical_p` must be > 0.0 and < 1.0")
        top_k = extra.get(TYPICAL_TOP_K_KEY)
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
            raise ValueError("`typical_top_k` must be a non-negative integer")
        top_p = extra.get(TYPICAL_TOP_P_KEY)
        if top_p is not None and (
            isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0
        ):
            raise ValueError("`typical_top_p` must be > 0.0 and <= 1.0")
        scale = extra.get(TEMPERATURE_SCALE_KEY)
        if scale is not None and (
            isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0.0 < scale < math.inf
        ):
            raise ValueError("`temperature_scale` must be a finite number > 0")

    def is_argmax_invariant(self) -> bool:
        # Not strictly true (the typical set can exclude the argmax); declared so that
        # vLLM runs it after temperature, as TGI does. See the module docstring.
        return True

    @staticmethod
    def _new_state(params: SamplingParams, _prompt, _output) -> _TypicalParams | None:
        extra = _extra(params)
        mass = extra.get(TYPICAL_P_KEY)
        scale = float(extra.get(TEMPERATURE_SCALE_KEY) or 1.0)
        typical = mass is not None and 0.0 < float(mass) < 1.0
        if not typical and scale == 1.0:
            return None
        return _TypicalParams(
            float(mass) if typical else 1.0,
            int(extra.get(TYPICAL_TOP_K_KEY) or 0),
            float(extra.get(TYPICAL_TOP_P_KEY) or 1.0),
            scale,
        )

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if not process_dict_updates(self.params, batch_update, self._new_state):
            return
        rows = sorted(self.params)
        values = [self.params[i] for i in rows]
        self._rows = torch.tensor(rows, dtype=torch.long, device=self.device)
        self._all_rows = rows == list(range(len(rows)))  # rows 0..n-1: no gather needed
        self._mass = torch.tensor([v.mass for v in values], dtype=torch.float32, device=self.device).view(-1, 1)
        self._top_k = (
            torch.tensor([v.top_k for v in values], dtype=torch.long, device=self.device).view(-1, 1)
            if any(v.top_k for v in values)
            else None
        )
        self._top_p = (
            torch.tensor([v.top_p for v in values], dtype=torch.float32, device=self.device).view(-1, 1)
            if any(v.top_p < 1.0 for v in values)
            else None
        )
        self._scale = (
            torch.tensor([v.scale for v in values], dtype=torch.float32, device=self.device).view(-1, 1)
            if any(v.scale != 1.0 for v in values)
            else None
        )
        self._typical_rows = (
            None if all(v.mass < 1.0 for v in values)
            else torch.tensor([v.mass < 1.0 for v in values], device=self.device).view(-1, 1)
        )
        self._any_typical = any(v.mass < 1.0 for v in values)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.params:
            return logits
        full = self._all_rows and logits.shape[0] == self._rows.numel()
        rows = logits if full else logits[self._rows]
        if self._scale is not None:
            rows.div_(self._scale)
        if self._any_typical:
            if self._top_k is not None or self._top_p is not None:
                tgi_top_k_top_p_(rows, self._top_k, self._top_p)
            mask = typical_p_mask(rows, self._mass)
            if self._typical_rows is not None:
                mask &= self._typical_rows
            rows.masked_fill_(mask, -math.inf)
        if not full:
            logits[self._rows] = rows
        return logits


# --------------------------------------------------------------------------- watermark


class _GreenListCache:
    """LRU of green lists per previous token, on the logits' device, bounded in bytes."""

    def __init__(self, gamma: float, hash_key: int, device: torch.device, budget_bytes: int = 256 << 20):
        self.gamma, self.hash_key, self.device = gamma, hash_key, device
        self.budget_bytes = budget_bytes
        self.vocab_size = -1
        self.max_entries = 0
        self.entries: OrderedDict[int, torch.Tensor] = OrderedDict()

    def get(self, prev_token: int, vocab_size: int) -> torch.Tensor:
        if vocab_size != self.vocab_size:
            self.entries.clear()
            self.vocab_size = vocab_size
            per_entry = max(int(vocab_size * self.gamma), 1) * 8
            self.max_entries = max(64, self.budget_bytes // per_entry)
        ids = self.entries.get(prev_token)
        if ids is not None:
            self.entries.move_to_end(prev_token)
            return ids
        ids = green_list_ids(prev_token, vocab_size, self.gamma, self.hash_key).to(self.device)
        self.entries[prev_token] = ids
        if len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)
        return ids


class WatermarkLogitsProcessor(LogitsProcessor):
    """``extra_args["watermark"]``: TGI's green-list watermark (see module doc)."""

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool):
        self.device = torch.device(device)
        self.gamma = watermark_gamma()
        self.delta = watermark_delta()
        self.hash_key = WATERMARK_HASH_KEY
        # row -> (last prompt token or -1, live reference to the row's output tokens)
        self.reqs: dict[int, tuple[int, Sequence[int]]] = {}
        self._rows = torch.empty(0, 1, dtype=torch.long)
        self._row_list: list[int] = []
        self._cache = _GreenListCache(self.gamma, self.hash_key, self.device)
        model_config = getattr(vllm_config, "model_config", None)
        self.vocab_size = model_config.get_vocab_size() if model_config is not None else None

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        flag = _extra(sampling_params).get(WATERMARK_KEY)
        if flag is not None and not isinstance(flag, bool):
            raise ValueError("`watermark` must be a boolean")

    def is_argmax_invariant(self) -> bool:
        return False

    @staticmethod
    def _new_state(params: SamplingParams, prompt: list[int] | None, output: list[int]):
        if not _extra(params).get(WATERMARK_KEY):
            return None
        return (prompt[-1] if prompt else -1, output)

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if process_dict_updates(self.reqs, batch_update, self._new_state):
            self._row_list = sorted(self.reqs)
            self._rows = torch.tensor(self._row_list, dtype=torch.long, device=self.device).view(-1, 1)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.reqs:
            return logits
        vocab = logits.shape[-1]  # TGI: scores.shape[-1]
        rows: list[int] = []
        greens: list[torch.Tensor] = []
        for row in self._row_list:
            prompt_last, output = self.reqs[row]
            # Read at apply time: vLLM appends (and, with async scheduling, repairs the
            # placeholder of) the latest sampled token just before sampling.
            prev = output[-1] if output else prompt_last
            if prev < 0:
                continue  # nothing to seed from (prompt embeds) or an unrepaired placeholder
            rows.append(row)
            greens.append(self._cache.get(prev, vocab))
        if not rows or greens[0].numel() == 0:
            return logits
        if len(rows) == self._rows.numel():
            row_index = self._rows
        else:
            row_index = torch.tensor(rows, dtype=torch.long, device=self.device).view(-1, 1)
        green = torch.stack(greens) if len(greens) > 1 else greens[0].view(1, -1)
        # Green ids are distinct within a row, so a plain (non-accumulating) put is exact.
        logits[row_index, green] += self.delta
        return logits
