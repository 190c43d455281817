"""Our Adafactor step against torch.optim.Adafactor: same updates, same state, interchangeable checkpoints."""

from __future__ import annotations

import pytest
import torch

from dallemini.training.optim import Adafactor


def _params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(37, 53), (3, 8, 5), (11,), (64, 1)]
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def _run(opt_cls: type, steps: int, **settings: object) -> list[torch.Tensor]:
    params = _params(0)
    opt = opt_cls(params, lr=0.01, **settings)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
            p.grad[0] = 0.0  # a row without gradient, as unused embedding rows have
        opt.step()
    return [p.detach() for p in params]


@pytest.mark.parametrize(
    "settings", [{}, {"weight_decay": 0.1}, {"maximize": True}, {"eps": (1e-4, 1e-2), "d": 2.0}]
)
def test_adafactor_matches_torch(settings: dict[str, object]) -> None:
    ours = _run(Adafactor, 6, **settings)
    theirs = _run(torch.optim.Adafactor, 6, **settings)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(ours[0], _params(0)[0].detach())  # the weights moved


def test_adafactor_resumes_from_torch_state() -> None:
    """A checkpoint of torch's Adafactor continues under ours as it would under torch's."""

    def first_step(opt_params: list[torch.nn.Parameter]) -> torch.optim.Adafactor:
        opt = torch.optim.Adafactor(opt_params, lr=0.01)
        for p in opt_params:
            p.grad = torch.ones_like(p)
        opt.step()
        for p in opt_params:
            p.grad = torch.full_like(p, 0.5)
        return opt

    a, b = _params(0), _params(0)
    state = first_step(a).state_dict()
    ours = Adafactor(a, lr=0.01)
    ours.load_state_dict(state)
    ours.step()
    first_step(b).step()
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    assert float(ours.state_dict()["state"][0]["step"]) == 2.0
