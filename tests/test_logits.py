"""typical_p and watermark logits processors, and the watermark detector (pure torch, no engine)."""

from __future__ import annotations

import itertools
import math
import random
from types import SimpleNamespace

import pytest
import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

from tgi_compat.logits import (
    TypicalPLogitsProcessor,
    WatermarkLogitsProcessor,
    green_list_ids,
    tgi_top_k_top_p_,
    typical_p_mask,
    watermark_score,
    watermark_z_score,
)

CPU = torch.device("cpu")
VOCAB = 64


def _config(vocab=VOCAB):
    return SimpleNamespace(model_config=SimpleNamespace(get_vocab_size=lambda: vocab))


def _params(**extra) -> SamplingParams:
    return SamplingParams(temperature=1.0, extra_args=extra or None)


def _update(size, removed=(), added=(), moved=()) -> BatchUpdate:
    return BatchUpdate(batch_size=size, removed=list(removed), added=list(added), moved=list(moved))


# ------------------------------------------------------------------ typical_p: the set


def _typical_set_bruteforce(logits: list[float], mass: float) -> set[int]:
    """Meister et al.'s typical set as TGI computes it, in plain Python floats."""
    m = max(logits)
    z = sum(math.exp(x - m) for x in logits)
    p = [math.exp(x - m) / z for x in logits]
    h = -sum(q * math.log(q) for q in p if q > 0)
    order = sorted(range(len(p)), key=lambda i: abs(-math.log(p[i]) - h))
    kept, cum = set(), 0.0
    for i in order:  # the shortest prefix (by distance to the entropy) reaching `mass`
        kept.add(i)
        cum += p[i]
        if cum >= mass:
            break
    return kept


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("mass", [0.2, 0.5, 0.9, 0.95])
def test_typical_keeps_exactly_the_typical_set(seed, mass):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, 12, generator=g, dtype=torch.float64) * 2
    expected = _typical_set_bruteforce(logits[0].tolist(), mass)
    removed = typical_p_mask(logits.clone(), torch.tensor([[mass]], dtype=torch.float64))
    kept = {i for i in range(12) if not removed[0, i]}
    assert kept == expected


def test_typical_can_drop_the_argmax_and_declares_argmax_invariance():
    # One token at p=0.4 and 60 at p=0.01: the flat tail sits closer to the entropy.
    probs = torch.tensor([0.4] + [0.01] * 60)
    logits = probs.log().view(1, -1)
    removed = typical_p_mask(logits, torch.tensor([[0.3]]))
    # The argmax is outside the typical set; the tail tokens are tied, and TGI keeps every
    # token tied with the last one of the prefix, so the whole tail survives.
    assert removed[0].nonzero().view(-1).tolist() == [0]
    proc = TypicalPLogitsProcessor(_config(), CPU, False)
    assert proc.is_argmax_invariant()  # by choice: run after temperature, as TGI does


def test_tgi_top_k_top_p_semantics():
    logits = torch.tensor([[3.0, 2.0, 2.0, 1.0, 0.0], [3.0, 2.0, 1.0, 0.0, -1.0]])
    out = tgi_top_k_top_p_(logits.clone(), torch.tensor([[2], [0]]), None)
    assert torch.isinf(out[0]).tolist() == [False, False, False, True, True]  # ties with the k-th kept
    assert not torch.isinf(out[1]).any()  # 0 disables
    p = logits[1].softmax(-1)
    out = tgi_top_k_top_p_(logits.clone(), None, torch.tensor([[1.0], [float(p[0] + p[1] - 1e-4)]]))
    assert not torch.isinf(out[0]).any()
    assert torch.isinf(out[1]).tolist() == [False, False, True, True, True]


# ------------------------------------------------------------------ typical_p: batch


def _expected_typical(row: torch.Tensor, mass: float) -> torch.Tensor:
    out = row.clone().view(1, -1)
    return out.masked_fill_(typical_p_mask(out.clone(), torch.tensor([[mass]])), -math.inf)[0]


def _check_rows(proc, logits, masses: dict[int, float]):
    out = proc.apply(logits.clone())
    for i in range(logits.shape[0]):
        if i in masses:
            assert torch.equal(out[i], _expected_typical(logits[i], masses[i])), i
        else:
            assert torch.equal(out[i], logits[i]), i


def test_typical_batch_bookkeeping():
    proc = TypicalPLogitsProcessor(_config(), CPU, False)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, VOCAB, generator=g) * 3

    proc.update_state(None)
    assert proc.apply(logits) is logits  # no requesting row: untouched

    proc.update_state(
        _update(
            3,
            added=[(0, _params(typical_p=0.3), [1], []), (1, _params(), [1], []), (2, _params(typical_p=0.8), [1], [])],
        )
    )
    _check_rows(proc, logits[:3], {0: 0.3, 2: 0.8})

    proc.update_state(_update(3, moved=[(0, 1, MoveDirectionality.SWAP)]))  # 0 <-> 1
    _check_rows(proc, logits[:3], {1: 0.3, 2: 0.8})

    proc.update_state(_update(3, removed=[1]))
    _check_rows(proc, logits[:3], {2: 0.8})

    proc.update_state(_update(2, moved=[(2, 1, MoveDirectionality.UNIDIRECTIONAL)]))  # condense 2 -> 1
    _check_rows(proc, logits[:2], {1: 0.8})

    # A new request replaces a row that requested typical_p with one that does not.
    proc.update_state(_update(2, added=[(1, _params(), [1], [])]))
    assert not proc.params
    assert proc.apply(logits[:2]) is logits[:2] or torch.equal(proc.apply(logits[:2].clone()), logits[:2])

    # All rows requesting: fast path without gather.
    proc.update_state(_update(2, added=[(0, _params(typical_p=0.5), [1], []), (1, _params(typical_p=0.6), [1], [])]))
    _check_rows(proc, logits[:2], {0: 0.5, 1: 0.6})


def test_typical_with_top_k_top_p_runs_tgi_order():
    proc = TypicalPLogitsProcessor(_config(), CPU, False)
    proc.update_state(
        _update(1, added=[(0, _params(typical_p=0.9, typical_top_k=10, typical_top_p=0.8), [1], [])])
    )
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(3)) * 2
    expected = tgi_top_k_top_p_(logits.clone(), torch.tensor([[10]]), torch.tensor([[0.8]]))
    expected.masked_fill_(typical_p_mask(expected.clone(), torch.tensor([[0.9]])), -math.inf)
    assert torch.equal(proc.apply(logits.clone()), expected)


def test_temperature_scale_divides_only_its_rows_and_mixes_with_typical():
    proc = TypicalPLogitsProcessor(_config(), CPU, False)
    proc.update_state(_update(3, added=[(0, _params(temperature_scale=2.5), [1], []), (1, _params(), [1], []),
                                        (2, _params(typical_p=0.5, temperature_scale=2.0), [1], [])]))
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(5)) * 3
    out = proc.apply(logits.clone())
    assert torch.allclose(out[0], logits[0] / 2.5)  # scaled, nothing masked
    assert torch.equal(out[1], logits[1])  # not requesting
    scaled = logits[2:3] / 2.0
    expected = scaled.masked_fill(typical_p_mask(scaled.clone(), torch.tensor([[0.5]])), -math.inf)
    assert torch.equal(out[2:3], expected)  # typical set of the scaled distribution


@pytest.mark.parametrize(
    "extra",
    [{"typical_p": 0.0}, {"typical_p": 1.0}, {"typical_p": "0.5"}, {"typical_top_k": -1}, {"typical_top_p": 0.0},
     {"temperature_scale": 0.0}, {"temperature_scale": float("inf")}],
)
def test_typical_validate_params_rejects(extra):
    with pytest.raises(ValueError):
        TypicalPLogitsProcessor.validate_params(_params(**extra))


def test_validate_params_accepts():
    TypicalPLogitsProcessor.validate_params(_params(typical_p=0.5, typical_top_k=3, typical_top_p=0.9))
    TypicalPLogitsProcessor.validate_params(_params())
    WatermarkLogitsProcessor.validate_params(_params(watermark=True))
    with pytest.raises(ValueError):
        WatermarkLogitsProcessor.validate_params(_params(watermark="yes"))


# ------------------------------------------------------------------ watermark


def _tgi_green_ids(prev: int, vocab: int, gamma: float = 0.5) -> torch.Tensor:
    """TGI's WatermarkLogitsProcessor._get_greenlist_ids, verbatim in effect."""
    rng = torch.Generator(device="cpu")
    rng.manual_seed(15485863 * prev)
    return torch.randperm(vocab, device="cpu", generator=rng)[: int(vocab * gamma)]


def test_green_list_is_tgis():
    for prev in (0, 1, 7, 63):
        ids = green_list_ids(prev, VOCAB, 0.5)
        assert torch.equal(ids, _tgi_green_ids(prev, VOCAB))
        assert ids.numel() == VOCAB // 2 and ids.unique().numel() == VOCAB // 2
    assert green_list_ids(5, 1000, 0.25).numel() == 250
    assert not torch.equal(green_list_ids(1, VOCAB, 0.5), green_list_ids(2, VOCAB, 0.5))


def test_watermark_adds_delta_to_green_ids_of_previous_token(monkeypatch):
    monkeypatch.setenv("WATERMARK_GAMMA", "0.25")
    monkeypatch.setenv("WATERMARK_DELTA", "3.5")
    proc = WatermarkLogitsProcessor(_config(), CPU, False)
    assert not proc.is_argmax_invariant()
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(1))
    assert proc.apply(logits) is logits  # nobody asked

    out0: list[int] = []  # live output list of row 0
    out2: list[int] = [11, 12]
    proc.update_state(
        _update(
            3,
            added=[
                (0, _params(watermark=True), [4, 5, 9], out0),
                (1, _params(), [1], []),
                (2, _params(watermark=True), [3], out2),
            ],
        )
    )

    def expect(row, prev):
        e = logits[row].clone()
        e[_tgi_green_ids(prev, VOCAB, 0.25)] += 3.5
        return e

    out = proc.apply(logits.clone())
    assert torch.equal(out[0], expect(0, 9))  # nothing generated yet: the last prompt token
    assert torch.equal(out[1], logits[1])
    assert torch.equal(out[2], expect(2, 12))
    diff = out[0] - logits[0]
    assert int((diff != 0).sum()) == VOCAB // 4  # a gamma fraction of the vocabulary

    out0.append(17)  # the engine appends to the live list; no batch update needed
    out2.append(40)
    out = proc.apply(logits.clone())
    assert torch.equal(out[0], expect(0, 17))
    assert torch.equal(out[2], expect(2, 40))

    # Swap 0 <-> 2, then remove row 1 and move 2 -> 1.
    proc.update_state(_update(3, moved=[(0, 2, MoveDirectionality.SWAP)]))
    out = proc.apply(logits.clone())
    assert torch.equal(out[0], expect(0, 40)) and torch.equal(out[2], expect(2, 17))
    assert torch.equal(out[1], logits[1])
    proc.update_state(_update(2, removed=[1], moved=[(2, 1, MoveDirectionality.UNIDIRECTIONAL)]))
    out = proc.apply(logits[:2].clone())
    assert torch.equal(out[0], expect(0, 40)) and torch.equal(out[1], expect(1, 17))

    proc.update_state(_update(1, removed=[1]))
    assert sorted(proc.reqs) == [0]
    proc.update_state(_update(1, removed=[0]))
    assert proc.apply(logits[:1]) is logits[:1] or not proc.reqs


# ------------------------------------------------------------------ detector


def _green_walk(n: int, vocab: int, green: bool, seed: int = 0, gamma: float = 0.5) -> list[int]:
    rnd = random.Random(seed)
    ids = [rnd.randrange(vocab)]
    for _ in range(n):
        g = set(green_list_ids(ids[-1], vocab, gamma).tolist())
        pool = [t for t in range(vocab) if (t in g) == green]
        ids.append(rnd.choice(pool))
    return ids


def test_detector_high_for_green_sequences_and_low_for_random():
    vocab = 256
    green = _green_walk(100, vocab, green=True)
    s = watermark_score(green, vocab, gamma=0.5)
    assert s.tokens == 100 and s.green == 100 and s.green_fraction == 1.0
    assert s.z_score == pytest.approx(100 * 0.5 / math.sqrt(100 * 0.25))  # 10.0
    red = _green_walk(100, vocab, green=False)
    assert watermark_z_score(red, vocab, gamma=0.5) == pytest.approx(-10.0)

    rnd = random.Random(1)
    zs = [watermark_z_score([rnd.randrange(vocab) for _ in range(200)], vocab, gamma=0.5) for _ in range(20)]
    assert abs(sum(zs) / len(zs)) < 1.0 and max(abs(z) for z in zs) < 4.0


def test_detector_prefix_token_scores_the_first_token():
    vocab = 128
    walk = _green_walk(10, vocab, green=True, seed=5)
    s = watermark_score(walk[1:], vocab, gamma=0.5, prefix_token=walk[0])
    assert s.tokens == 10 and s.green == 10
    assert watermark_score([], vocab, gamma=0.5).tokens == 0
    assert watermark_score([3], vocab, gamma=0.5).z_score == 0.0


def test_detector_ignore_repeated_bigrams():
    vocab = 128
    walk = _green_walk(3, vocab, green=True, seed=2)  # 3 green pairs
    a, b = walk[-2], walk[-1]
    looped = walk + [a, b] * 20  # text stuck in a loop repeats pairs
    full = watermark_score(looped, vocab, gamma=0.5)
    dedup = watermark_score(looped, vocab, gamma=0.5, ignore_repeated_bigrams=True)
    assert full.tokens == len(looped) - 1
    assert dedup.tokens == len(set(itertools.pairwise(looped))) < full.tokens
