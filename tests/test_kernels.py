"""The native float32 decoding kernel: same products as torch, used only where it applies."""

import pytest
import torch
import torch.nn.functional as F

from dallemini.models import kernels
from dallemini.models.bart import Dense

needs_kernel = pytest.mark.skipif(
    not kernels.available(), reason="no C compiler or no AVX-512 here"
)


@needs_kernel
@pytest.mark.parametrize("n,k", [(37, 50), (8, 16), (2730, 1024), (1024, 2730), (5, 3)])
@pytest.mark.parametrize("shape", [(1,), (2,), (2, 1), (1, 2)])
def test_gemv_matches_matmul(n: int, k: int, shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(n * k)
    w = torch.randn(n, k, generator=g) * 0.02
    x = torch.randn(*shape, k, generator=g)
    y = kernels.gemv(x, w)
    assert y is not None and y.shape == (*shape, n)
    torch.testing.assert_close(y, x @ w.t(), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_gemv_declines_what_it_does_not_do() -> None:
    w = torch.randn(8, 32)
    assert kernels.gemv(torch.randn(3, 32), w) is None  # more than two rows: oneDNN's matmul
    assert kernels.gemv(torch.randn(2, 32, dtype=torch.bfloat16), w.bfloat16()) is None
    assert kernels.gemv(torch.randn(2, 32), torch.randn(32, 8).t()) is None  # strided weight
    assert kernels.gemv(torch.randn(2, 16), w) is None  # wrong width


@needs_kernel
def test_dense_uses_it_in_inference_only() -> None:
    torch.manual_seed(0)
    layer = Dense(96, 40)
    x = torch.randn(2, 1, 96)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight), rtol=1e-5, atol=1e-5)
    x.requires_grad_(True)
    layer(x).sum().backward()  # training takes torch's path: gradients flow
    assert x.grad is not None and layer.weight.grad is not None


def test_switched_off_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DALLEMINI_NATIVE_KERNELS", "0")
    assert kernels._compile() is None


def test_cache_dir_follows_environment(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("DALLEMINI_CACHE", str(tmp_path))
    assert kernels.cache_dir() == tmp_path / "kernels"
