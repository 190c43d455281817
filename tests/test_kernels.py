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


needs_bf16_kernel = pytest.mark.skipif(
    not kernels.available(torch.bfloat16), reason="no C compiler or no AVX512-BF16 here"
)


@needs_bf16_kernel
@pytest.mark.parametrize("n,k", [(37, 50), (8, 32), (2730, 1024), (1024, 2730), (5, 3)])
@pytest.mark.parametrize("shape", [(1,), (2,), (2, 1)])
def test_bf16_gemv_matches_matmul(n: int, k: int, shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(n + k)
    w = (torch.randn(n, k, generator=g) * 0.02).bfloat16()
    x = torch.randn(*shape, k, generator=g).bfloat16()
    packed = kernels.pack_bf16(w)
    assert packed is not None
    y = kernels.gemv_bf16(x, packed, n, k)
    assert y is not None and y.dtype == torch.bfloat16 and y.shape == (*shape, n)
    exact = (x.float() @ w.float().t()).bfloat16()  # float32 products and sums, rounded once
    torch.testing.assert_close(y, exact, rtol=1e-2, atol=1e-3)
    assert kernels.gemv_bf16(torch.randn(3, k).bfloat16(), packed, n, k) is None


@needs_bf16_kernel
def test_dense_bf16_keeps_one_packed_copy() -> None:
    torch.manual_seed(0)
    layer = Dense(96, 40).bfloat16()
    layer.prepack = True
    one, many = torch.randn(2, 1, 96).bfloat16(), torch.randn(18, 1, 96).bfloat16()
    with torch.inference_mode():
        torch.testing.assert_close(layer(one), F.linear(one, layer.weight), rtol=1e-2, atol=1e-2)
        assert layer._blocked is not None and layer._packed is None
        prefill = torch.randn(2, 5, 96).bfloat16()  # one image's prefill keeps the blocked copy
        torch.testing.assert_close(layer(prefill), F.linear(prefill, layer.weight))
        assert layer._blocked is not None and layer._packed is None
        torch.testing.assert_close(layer(many), F.linear(many, layer.weight), rtol=1e-2, atol=1e-2)
        assert layer._packed is not None and layer._blocked is None
