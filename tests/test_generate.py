"""Sampling: filters, super-conditioning, seeds, batch independence, prefixes, streaming."""

from __future__ import annotations

import pytest
import torch

from dallemini.config import BART_PRESETS, SamplingConfig
from dallemini.errors import InputError
from dallemini.generate import draw, filter_logits, iter_image_tokens, sample_image_tokens
from dallemini.models.bart import DalleBart

CODES = 60  # fewer than the decoder's 64 image rows: rows 60..64 must never be sampled


@pytest.fixture(scope="module")
def model() -> DalleBart:
    torch.manual_seed(0)
    m = DalleBart(BART_PRESETS["tiny"]).eval()
    with torch.no_grad():  # make the unused rows very likely, so a missing codebook cut would show
        m.decoder.lm_head.weight[CODES:] *= 50
    return m


def _text(
    n: int, length: int = 32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 1000, (n, length), generator=g)
    ids[:, 0], ids[:, 10], ids[:, 11:] = 0, 2, 1
    mask = ids.ne(1).long()
    u = torch.ones(1, length, dtype=torch.long)
    u[0, :2] = torch.tensor([0, 2])
    return ids, mask, u, u.ne(1).long()


def test_filters() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0]])
    lw, idx = filter_logits(logits, SamplingConfig(top_k=2))
    assert idx.tolist() == [[1, 3]]
    lw, idx = filter_logits(logits, SamplingConfig(top_k=0, top_p=0.7))
    kept = idx[torch.isfinite(lw)].tolist()
    assert kept == [1, 3]  # p(1)=0.64 < 0.7, so the next one is needed too
    lw, idx = filter_logits(logits, SamplingConfig(top_k=0, top_p=0.01))
    assert idx[torch.isfinite(lw)].tolist() == [1]  # the most likely token always stays
    # temperature sharpens before top-p
    lw, idx = filter_logits(logits, SamplingConfig(top_k=0, top_p=0.7, temperature=0.3))
    assert idx[torch.isfinite(lw)].tolist() == [1]


def test_draw_follows_the_distribution() -> None:
    logits = torch.log(torch.tensor([[0.1, 0.6, 0.3]])).repeat(20000, 1)
    u = torch.rand(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    counts = torch.bincount(draw(logits, None, u), minlength=3).float() / 20000
    torch.testing.assert_close(counts, torch.tensor([0.1, 0.6, 0.3]), atol=0.015, rtol=0)
    masked = logits.clone()
    masked[:, 1] = float("-inf")
    assert 1 not in draw(masked, None, u).tolist()


def test_greedy_first_token_uses_superconditioning_formula(model: DalleBart) -> None:
    ids, mask, u, um = _text(1)
    s = 3.0
    toks = sample_image_tokens(
        model, ids, mask, u, um, [0], SamplingConfig(top_k=1, condition_scale=s), CODES
    )
    with torch.no_grad():
        bos = torch.full((1, 1), model.config.decoder_start_token_id)
        lc = model.decode_step(bos, model.init_cache(model.encode(ids, mask), mask))[0, -1, :CODES]
        lu = model.decode_step(bos, model.init_cache(model.encode(u, um), um))[0, -1, :CODES]
    assert toks[0, 0].item() == int(torch.argmax(lu + s * (lc - lu)))
    assert toks[0, 0].item() != int(torch.argmax(lc)) or s == 1  # the mix mattered here


def test_seeds_reproducible_and_batch_independent(model: DalleBart) -> None:
    ids, mask, u, um = _text(2)
    cfg = SamplingConfig(top_k=0)
    a = sample_image_tokens(
        model, ids, mask, u, um, [7, 8, 9], cfg, CODES, prompt_index=torch.tensor([0, 0, 1])
    )
    b = sample_image_tokens(
        model, ids, mask, u, um, [7, 8, 9], cfg, CODES, prompt_index=torch.tensor([0, 0, 1])
    )
    alone = sample_image_tokens(model, ids[1:], mask[1:], u, um, [9], cfg, CODES)
    assert torch.equal(a, b)
    assert torch.equal(a[2], alone[0])
    assert not torch.equal(a[0], a[1])
    assert int(a.max()) < CODES


def test_prefix_is_kept_and_stream_ends_with_the_result(model: DalleBart) -> None:
    ids, mask, u, um = _text(1)
    cfg = SamplingConfig()
    prefix = torch.tensor([[5, 6, 7, 8, 9, 10]]).repeat(2, 1)
    frames = list(
        iter_image_tokens(
            model,
            ids,
            mask,
            u,
            um,
            [1, 2],
            cfg,
            CODES,
            prompt_index=torch.tensor([0, 0]),
            prefix=prefix,
            stream_every=4,
        )
    )
    assert [f.done for f in frames] == [8, 12, 16]
    final = frames[-1].tokens
    assert torch.equal(final[:, :6], prefix)
    assert torch.equal(frames[0].tokens, final[:, :8])
    again = sample_image_tokens(
        model,
        ids,
        mask,
        u,
        um,
        [1, 2],
        cfg,
        CODES,
        prompt_index=torch.tensor([0, 0]),
        prefix=prefix,
    )
    assert torch.equal(again, final)


def test_bad_settings_are_refused(model: DalleBart) -> None:
    ids, mask, u, um = _text(1)
    with pytest.raises(InputError, match="temperature"):
        SamplingConfig(temperature=0)
    with pytest.raises(InputError, match="top_p"):
        SamplingConfig(top_p=1.5)
    with pytest.raises(InputError, match="prefix codes"):
        sample_image_tokens(
            model, ids, mask, u, um, [0], SamplingConfig(), CODES, prefix=torch.tensor([[CODES]])
        )
    with pytest.raises(InputError, match="seeds"):
        sample_image_tokens(model, ids, mask, u, um, [0, 1], SamplingConfig(), CODES)
