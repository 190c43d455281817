"""Continuous batching: rows with any settings join and leave a running batch and sample what they would alone."""

from __future__ import annotations

import pytest
import torch

from dallemini.config import BART_PRESETS, SamplingConfig
from dallemini.continuous import RowRequest, RunningBatch
from dallemini.errors import InputError
from dallemini.generate import filter_logits, sample_image_tokens
from dallemini.models.bart import DalleBart
from dallemini.models.kernels import native

CODES = 60
LENGTH = 24


@pytest.fixture(scope="module")
def model() -> DalleBart:
    torch.manual_seed(0)
    cfg = BART_PRESETS["tiny"]
    return DalleBart(cfg).eval()


def _prompts(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """n random prompts of different lengths, padded to LENGTH, and the empty caption."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 1000, (n, LENGTH), generator=g)
    mask = torch.zeros(n, LENGTH, dtype=torch.long)
    for i in range(n):
        end = 4 + 3 * i
        ids[i, 0], ids[i, end], ids[i, end + 1 :] = 0, 2, 1
        mask[i, : end + 1] = 1
    u = torch.ones(1, LENGTH, dtype=torch.long)
    u[0, :2] = torch.tensor([0, 2])
    return ids, mask, u, u.ne(1).long()


SETTINGS = [
    SamplingConfig(temperature=1.0, top_k=0, condition_scale=1.0),
    SamplingConfig(temperature=0.7, top_k=8, condition_scale=3.0),
    SamplingConfig(temperature=1.3, top_k=0, top_p=0.9, condition_scale=1.5),
    SamplingConfig(temperature=1.6, top_k=8, condition_scale=2.0),  # samples with SETTINGS[1]
]


def _alone(model, ids, mask, u, um, i, seed, settings, prefix=None) -> torch.Tensor:
    return sample_image_tokens(
        model,
        ids[i : i + 1],
        mask[i : i + 1],
        u,
        um,
        [seed],
        settings,
        CODES,
        prefix=None if prefix is None else prefix[None],
    )[0]


def _run(batch: RunningBatch, joining: dict[int, list[RowRequest]]) -> dict[int, list]:
    """Step until every row is done, admitting joining[k] before step k; the rows by admission."""
    admitted: dict[int, list] = {}
    k = 0
    while k <= max(joining) or batch.rows:
        if k in joining:
            admitted[k] = batch.admit(joining[k])
        batch.step()
        k += 1
    return admitted


@pytest.mark.parametrize("path", ["native", "onednn"])
def test_rows_with_any_settings_joining_mid_batch_sample_what_they_would_alone(
    model: DalleBart, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the native decoder layers (each row at its own position) or the layers op by op."""
    monkeypatch.setenv("DALLEMINI_FEW_ROWS", path)  # the step path, as choice.py would pick it
    ids, mask, u, um = _prompts(3)
    batch = RunningBatch(model, u, um, CODES, capacity=6)
    assert (batch.native is not None) == (path == "native" and native.available())
    req = lambda i, seed, s: RowRequest(ids[i], mask[i], seed, s)  # noqa: E731
    joining = {
        0: [req(0, 5, SETTINGS[0]), req(1, 6, SETTINGS[1]), req(2, 11, SETTINGS[3])],
        5: [req(2, 7, SETTINGS[2]), req(0, 8, SETTINGS[1])],  # admitted before step 5 of 16
        11: [req(1, 9, SETTINGS[0])],
        16: [req(2, 10, SETTINGS[1])],  # as the first rows finish
    }
    admitted = _run(batch, joining)
    for k, rows in admitted.items():
        for row, r in zip(rows, joining[k], strict=True):
            i = next(j for j in range(3) if torch.equal(ids[j], r.ids))
            alone = _alone(model, ids, mask, u, um, i, r.seed, r.settings)
            assert torch.equal(row.tokens, alone), (k, r.seed)
            assert row.done == model.config.image_length and not row.slots
    assert batch.used_slots == 0 and not batch.rows


def test_forced_codes_are_kept_and_the_rest_sampled_as_alone(model: DalleBart) -> None:
    ids, mask, u, um = _prompts(2)
    batch = RunningBatch(model, u, um, CODES, capacity=4)
    prefix = torch.arange(10, 26) % CODES
    joining = {
        0: [RowRequest(ids[0], mask[0], 3, SETTINGS[1])],
        5: [
            RowRequest(ids[1], mask[1], 4, SETTINGS[1], prefix=prefix),
            RowRequest(ids[0], mask[0], 5, SETTINGS[2], prefix=prefix[:4]),
        ],
    }
    admitted = _run(batch, joining)
    a, b = admitted[5]
    assert torch.equal(a.tokens[:16], prefix) and torch.equal(b.tokens[:4], prefix[:4])
    assert torch.equal(a.tokens, _alone(model, ids, mask, u, um, 1, 4, SETTINGS[1], prefix))
    assert torch.equal(b.tokens, _alone(model, ids, mask, u, um, 0, 5, SETTINGS[2], prefix[:4]))


def test_a_dropped_row_frees_its_slots_and_the_others_go_on(model: DalleBart) -> None:
    ids, mask, u, um = _prompts(2)
    batch = RunningBatch(model, u, um, CODES, capacity=2)
    first, second = batch.admit(
        [RowRequest(ids[0], mask[0], 1, SETTINGS[1]), RowRequest(ids[1], mask[1], 2, SETTINGS[1])]
    )
    third = RowRequest(ids[1], mask[1], 3, SETTINGS[2])
    assert not batch.fits([third])  # two guided rows fill capacity 2
    for _ in range(10):
        batch.step()
    batch.drop(first.key)  # cancelled: its slots go to the next row at once
    assert batch.fits([third]) and batch.used_slots == 2
    (late,) = batch.admit([third])
    while batch.rows:
        batch.step()
    assert torch.equal(second.tokens, _alone(model, ids, mask, u, um, 1, 2, SETTINGS[1]))
    assert torch.equal(late.tokens, _alone(model, ids, mask, u, um, 1, 3, SETTINGS[2]))
    assert first.done == 10


def test_bad_rows_are_refused(model: DalleBart) -> None:
    ids, mask, u, um = _prompts(1)
    batch = RunningBatch(model, u, um, CODES, capacity=1)
    with pytest.raises(InputError, match="do not fit"):
        batch.admit([RowRequest(ids[0], mask[0], 1, SETTINGS[1])] * 2)
    with pytest.raises(InputError, match="forced codes"):
        batch.admit([RowRequest(ids[0], mask[0], 1, SETTINGS[1], prefix=torch.tensor([CODES]))])
    with pytest.raises(InputError, match="encoded as"):
        batch.admit([RowRequest(ids[0, :5], mask[0, :5], 1, SETTINGS[1])])
    with pytest.raises(InputError, match="capacity"):
        RunningBatch(model, u, um, CODES, capacity=0)


def test_a_temperature_and_scale_per_row_give_the_bits_of_each_rows_own() -> None:
    """Rows that differ only in temperature and condition scale sample in one group: dividing and
    mixing by [n, 1] float32 tensors gives the very logits the numbers give, row by row."""
    g = torch.Generator().manual_seed(3)
    cond, uncond = torch.randn(3, 512, generator=g) * 4, torch.randn(3, 512, generator=g) * 4
    rows = [(0.7, 3.0), (1.6, 2.0), (0.33, 10.0)]
    temperature = torch.tensor([[t] for t, _ in rows])
    scale = torch.tensor([[c] for _, c in rows])
    together = filter_logits(
        (uncond + scale * (cond - uncond)) / temperature,
        SamplingConfig(temperature=1.0, top_k=8, condition_scale=2.0),
    )
    for r, (t, c) in enumerate(rows):
        alone = filter_logits(
            uncond[r : r + 1] + c * (cond[r : r + 1] - uncond[r : r + 1]),
            SamplingConfig(temperature=t, top_k=8, condition_scale=c),
        )
        assert torch.equal(together[0][r], alone[0][0]) and torch.equal(together[1][r], alone[1][0])
