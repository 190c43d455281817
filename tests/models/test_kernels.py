"""The speed paths of models/kernels: the native kernels give torch's products and decoder layers, the CPU
paths bind to a model from outside and are used only where they apply."""

import json
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from dallemini.config import BartConfig
from dallemini.models import kernels
from dallemini.models.bart import DalleBart
from dallemini.models.kernels import cpu, native
from dallemini.models.kernels.cpu import CpuLinear
from dallemini.pipeline import TextToImage
from dallemini.random_model import create_random_model

needs_kernel = pytest.mark.skipif(
    not native.available(), reason="no C compiler or no AVX-512/AVX2 here"
)


@needs_kernel
@pytest.mark.parametrize("n,k", [(37, 50), (8, 16), (2730, 1024), (1024, 2730), (5, 3)])
@pytest.mark.parametrize("shape", [(1,), (2,), (2, 1), (1, 2)])
def test_gemv_matches_matmul(n: int, k: int, shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(n * k)
    w = torch.randn(n, k, generator=g) * 0.02
    x = torch.randn(*shape, k, generator=g)
    y = native.gemv(x, w)
    assert y is not None and y.shape == (*shape, n)
    torch.testing.assert_close(y, x @ w.t(), rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("n,k", [(37, 50), (2730, 1024), (1024, 2730), (5, 3)])
@pytest.mark.parametrize("rows", [1, 3, 7, 18, 23])
def test_gemm_matches_matmul_and_gemv_bitwise(n: int, k: int, rows: int) -> None:
    """The multi-row float32 product gives torch's product, and each row exactly the bits `gemv`
    gives it alone: a row's result does not depend on the rows decoding beside it."""
    g = torch.Generator().manual_seed(n + k + rows)
    w = torch.randn(n, k, generator=g) * 0.02
    x = torch.randn(rows, k, generator=g)
    y = native.gemm(x, w)
    assert y is not None and y.shape == (rows, n)
    torch.testing.assert_close(y, x @ w.t(), rtol=1e-5, atol=1e-5)
    for r in range(rows):
        assert torch.equal(y[r], native.gemv(x[r], w))


@needs_kernel
def test_gemm_declines_what_it_does_not_do() -> None:
    w = torch.randn(8, 32)
    assert native.gemm(torch.randn(3, 32, dtype=torch.bfloat16), w.bfloat16()) is None
    assert native.gemm(torch.randn(3, 32), torch.randn(32, 8).t()) is None  # strided weight
    assert native.gemm(torch.randn(3, 16), w) is None  # wrong width
    assert native.gemm(torch.randn(0, 32), w) is None


@needs_kernel
def test_gemv_declines_what_it_does_not_do() -> None:
    w = torch.randn(8, 32)
    assert native.gemv(torch.randn(3, 32), w) is None  # more than two rows: oneDNN's matmul
    assert native.gemv(torch.randn(2, 32, dtype=torch.bfloat16), w.bfloat16()) is None
    assert native.gemv(torch.randn(2, 32), torch.randn(32, 8).t()) is None  # strided weight
    assert native.gemv(torch.randn(2, 16), w) is None  # wrong width


@needs_kernel
def test_dense_uses_it_in_inference_only() -> None:
    torch.manual_seed(0)
    layer = CpuLinear(96, 40)
    x = torch.randn(2, 1, 96)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight), rtol=1e-5, atol=1e-5)
    x.requires_grad_(True)
    layer(x).sum().backward()  # training takes torch's path: gradients flow
    assert x.grad is not None and layer.weight.grad is not None


def test_switched_off_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DALLEMINI_NATIVE_KERNELS", "0")
    assert native._compile() is None


def test_cache_dir_follows_environment(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("DALLEMINI_CACHE", str(tmp_path))
    assert native.cache_dir() == tmp_path / "kernels"


needs_bf16_kernel = pytest.mark.skipif(
    not native.available(torch.bfloat16), reason="no C compiler here"
)
BLOCKED_BF16 = native.bf16_layout() == "blocked"  # AVX512-BF16 pair dot products, 1-2 rows


@needs_bf16_kernel
@pytest.mark.parametrize("n,k", [(37, 50), (8, 32), (2730, 1024), (1024, 2730), (5, 3)])
@pytest.mark.parametrize("shape", [(1,), (2,), (2, 1)])
def test_bf16_gemv_matches_matmul(n: int, k: int, shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(n + k)
    w = (torch.randn(n, k, generator=g) * 0.02).bfloat16()
    x = torch.randn(*shape, k, generator=g).bfloat16()
    packed = native.pack_bf16(w)
    assert packed is not None
    y = native.gemv_bf16(x, packed, n, k)
    assert y is not None and y.dtype == torch.bfloat16 and y.shape == (*shape, n)
    exact = (x.float() @ w.float().t()).bfloat16()  # float32 products and sums, rounded once
    torch.testing.assert_close(y, exact, rtol=1e-2, atol=1e-3)
    x3 = torch.randn(3, k, generator=g).bfloat16()
    y3 = native.gemv_bf16(x3, packed, n, k)
    if BLOCKED_BF16:
        assert y3 is None
    else:  # the plain weight itself, widened: any number of rows, each as alone
        assert packed.data_ptr() == w.data_ptr()
        torch.testing.assert_close(
            y3, (x3.float() @ w.float().t()).bfloat16(), rtol=1e-2, atol=1e-3
        )
        assert torch.equal(native.gemv_bf16(x3[1:2], packed, n, k), y3[1:2])


@needs_bf16_kernel
def test_dense_bf16_keeps_one_packed_copy() -> None:
    torch.manual_seed(0)
    layer = CpuLinear(96, 40, prepack=True).bfloat16()
    one, many = torch.randn(2, 1, 96).bfloat16(), torch.randn(18, 1, 96).bfloat16()
    with torch.inference_mode():
        torch.testing.assert_close(layer(one), F.linear(one, layer.weight), rtol=1e-2, atol=1e-2)
        assert layer._blocked is not None and layer._packed is None
        prefill = torch.randn(2, 5, 96).bfloat16()  # one image's prefill keeps the blocked copy
        torch.testing.assert_close(layer(prefill), F.linear(prefill, layer.weight))
        assert layer._blocked is not None and layer._packed is None
        torch.testing.assert_close(layer(many), F.linear(many, layer.weight), rtol=1e-2, atol=1e-2)
        if cpu._ONEDNN_BF16:  # several rows through oneDNN's copy, which replaced the native one
            assert layer._packed is not None and layer._blocked is None


def _bart(dtype: torch.dtype, scale: bool) -> DalleBart:
    """A small DalleBart whose layer norms are not identity (so their order and use are checked)."""
    cfg = BartConfig(
        d_model=64,
        encoder_layers=1,
        decoder_layers=2,
        attention_heads=4,
        ffn_dim=90,  # not a multiple of 16 or 32: the kernels' column tails
        encoder_vocab_size=100,
        image_vocab_size=128,
        decoder_start_token_id=128,
        image_length=16,
        max_text_length=8,
        force_ln_scale=scale,
    )
    torch.manual_seed(0)
    m = DalleBart(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name or ".ln" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return kernels.accelerate(m.to(dtype))


def _greedy_logits(
    m: DalleBart, rows: int, use_native: bool, steps: int = 8, tokens: Tensor | None = None
) -> tuple[Tensor, cpu.NativeStep | None]:
    """Logits of a 3-token prefill and then `steps` - 1 greedy one-token steps (or steps that feed
    `tokens` [rows, steps - 1], as another run chose them), and the native step that ran them
    (use_native=False: torch's ops)."""
    ids = torch.randint(0, 100, (rows, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(rows, 6, dtype=torch.long)
    mask[-1, 4:] = 0  # padded text: the cross-attention mask
    with torch.inference_mode():
        enc = m.encode(ids, mask)
        cache = m.init_cache(enc, mask, dtype=kernels.cache_dtype(enc.dtype, enc.device))
        # A prefill of several tokens (torch's ops) writes the cache the native steps then read.
        tok = torch.tensor([[m.config.decoder_start_token_id, 5, 77]] * rows)
        logits = m.decode_step(tok, cache)
        out = [logits.float()]
        step = cpu.native_step(m, cache, cache.length) if use_native else None
        for i in range(steps - 1):
            tok = (
                logits[:, -1, :128].argmax(-1, keepdim=True)
                if tokens is None
                else tokens[:, i : i + 1]
            )
            if step is None:
                logits = m.decode_step(tok, cache)
            else:
                logits = step(tok, cache.length)
                cache.length += 1
            out.append(logits.float())
    return torch.cat(out, 1), step


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 7])
@pytest.mark.parametrize("scale", [False, True])
def test_native_decoder_layer_matches_torch(dtype: torch.dtype, rows: int, scale: bool) -> None:
    """Decoding steps through the C decoder layer give torch's logits: any rows in float32 and
    plain bfloat16, one image (one or two rows) in blocked bfloat16."""
    if not native.available(dtype):
        pytest.skip(f"no native {dtype} kernel here")
    if dtype == torch.bfloat16 and rows > 2 and BLOCKED_BF16:
        pytest.skip("several bfloat16 rows take oneDNN's matmuls where the CPU has AVX512-BF16")
    m = _bart(dtype, scale)
    want, _ = _greedy_logits(m, rows, use_native=False)
    # the tokens torch's run chose (bfloat16 rounding may flip a near tie of the greedy choice)
    chosen = want[:, 2:-1, :128].argmax(-1)
    got, step = _greedy_logits(m, rows, use_native=True, tokens=chosen)
    assert isinstance(step, cpu.NativeStep) and len(step.layers) == 2  # the native path ran
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:  # the C layer keeps float32 between products where torch rounds each op to bfloat16
        torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_step_gives_a_row_the_bits_it_gets_alone(dtype: torch.dtype) -> None:
    """A row's logits through the native layers are bitwise those it gets alone, whatever rows
    step beside it (the GLU width, 90, leaves a different tail of the flattened rows each time)."""
    if not native.available(dtype) or (dtype == torch.bfloat16 and BLOCKED_BF16):
        pytest.skip(f"no native {dtype} kernel for several rows here")
    m = _bart(dtype, True)
    _, step = _greedy_logits(m, 3, use_native=True, steps=3)
    assert isinstance(step, cpu.NativeStep)
    g = torch.Generator().manual_seed(0)
    for position in range(5, 16):  # slots past those written, each written twice alike
        tokens = torch.randint(0, 128, (3, 1), generator=g)
        positions = torch.full((3,), position, dtype=torch.long)
        with torch.inference_mode():
            together = step.at(tokens, positions)
            alone = step.at(tokens[:1], positions[:1])
        assert torch.equal(alone[0], together[0])


@needs_kernel
def test_native_decoder_layer_only_where_it_applies() -> None:
    m = _bart(torch.float32, False)
    mask = torch.ones(3, 6, dtype=torch.long)
    with torch.inference_mode():
        enc = m.encode(torch.randint(0, 100, (3, 6)), mask)
        assert isinstance(cpu.native_step(m, m.init_cache(enc, mask), 0), cpu.NativeStep)
        assert isinstance(cpu.native_step(m, m.init_cache(enc[:2], mask[:2]), 0), cpu.NativeStep)
        plain = DalleBart(m.config).eval()  # not accelerated: torch's ops
        assert cpu.native_step(plain, plain.init_cache(enc[:2], mask[:2]), 0) is None
        m.train()
        assert cpu.native_step(m, m.init_cache(enc[:2], mask[:2]), 0) is None
        if native.available(torch.bfloat16):  # blocked bfloat16 layers: one image (1-2 rows)
            mb = _bart(torch.bfloat16, False)
            encb = mb.encode(torch.randint(0, 100, (3, 6)), mask)
            cache = mb.init_cache(encb, mask, dtype=kernels.cache_dtype(encb.dtype, encb.device))
            step = cpu.native_step(mb, cache, 0)
            assert (step is None) == BLOCKED_BF16


@needs_kernel
def test_native_decoder_layer_checks_its_arguments() -> None:
    m = _bart(torch.float32, False)
    mask = torch.ones(2, 6, dtype=torch.long)
    with torch.inference_mode():
        cache = m.init_cache(m.encode(torch.randint(0, 100, (2, 6)), mask), mask)
        step = cpu.native_step(m, cache, cache.length)
        assert step is not None
        kernel = step.layers[0]
        with pytest.raises(ValueError, match="expected x"):
            kernel(torch.zeros(3, 64), 1)
        with pytest.raises(ValueError, match="outside the cache"):
            kernel(torch.zeros(2, 64), 16)
        with pytest.raises(ValueError, match="outside the cache"):
            kernel(torch.zeros(2, 64), torch.tensor([3, -1]))
        with pytest.raises(ValueError, match="positions int64"):
            kernel(torch.zeros(2, 64), torch.tensor([3, 1], dtype=torch.int32))
        layer = m.decoder.layers[0]
        weights = [layer.self_attn.q_proj.weight.t()] * 9  # not contiguous
        with pytest.raises(ValueError, match="weight 0"):
            native.DecoderLayerKernel(
                weights,
                [(None, torch.zeros(64))] * 5 + [(None, torch.zeros(90))],
                1e-5,
                4,
                cache.self_k[0],
                cache.self_v[0],
                cache.cross_k[0],
                cache.cross_v[0],
                cache.cross_mask.reshape(2, -1),
                bf16=False,
            )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "rows,t,dh", [(1, 1, 16), (2, 7, 64), (18, 40, 24), (1, 16, 64), (3, 41, 64), (2, 129, 64)]
)
def test_attend1_matches_sdpa_on_cache_views(
    dtype: torch.dtype, rows: int, t: int, dh: int
) -> None:
    """Single-query attention over the filled prefix of a float32 or bfloat16 cache, as torch's."""
    if not native.available(dtype):
        pytest.skip(f"no native {dtype} kernel here")
    g = torch.Generator().manual_seed(rows + t)
    cache_k, cache_v = torch.randn(2, rows, 4, 160, dh, generator=g).to(dtype).unbind(0)
    k, v = cache_k[:, :, :t], cache_v[:, :, :t]  # the filled prefix of a longer cache
    q = torch.randn(rows, 1, 4, dh, generator=g).transpose(1, 2)  # a split, non-contiguous query
    mask = torch.zeros(rows, 1, 1, t)
    mask[-1, ..., t // 2 + 1 :] = float("-inf")
    for m in (None, mask, mask.to(dtype)):
        got = native.attend1(q.to(dtype), k, v, m)
        assert got is not None and got.dtype == torch.float32
        want = F.scaled_dot_product_attention(
            q.to(dtype).float(), k.float(), v.float(), attn_mask=None if m is None else m.float()
        )
        torch.testing.assert_close(got, want)


@needs_kernel
def test_attend1_declines_what_it_does_not_do() -> None:
    q, k = torch.randn(2, 4, 1, 16), torch.randn(2, 4, 5, 16)
    assert native.attend1(torch.randn(2, 4, 2, 16), k, k) is None  # two queries
    assert native.attend1(q.half(), k.half(), k.half()) is None
    assert native.attend1(q, k, k.bfloat16()) is None  # keys and values of different dtypes
    assert native.attend1(q, k, k, torch.ones(2, 1, 1, 5, dtype=torch.bool)) is None
    assert native.attend1(q, k.transpose(2, 3).contiguous().transpose(2, 3), k) is None


def test_huge_page_tensors_hold_values() -> None:
    big = native.huge_page_empty((1100, 1024), torch.bfloat16)  # > 2 MiB: an advised mapping
    small = native.huge_page_empty((3, 5), torch.float32)
    assert big.shape == (1100, 1024) and big.dtype == torch.bfloat16 and big.is_contiguous()
    assert small.shape == (3, 5) and small.dtype == torch.float32
    src = torch.randn(1100, 1024).bfloat16()
    big.copy_(src)
    assert torch.equal(big, src)


@needs_kernel
def test_model_still_trains_after_native_decoding() -> None:
    """Native decoding moves float32 weights onto huge pages inside inference mode; the values stay
    and the parameters stay ordinary tensors that autograd can use."""
    m = _bart(torch.float32, False)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    _, step = _greedy_logits(m, 2, use_native=True, steps=2)
    assert isinstance(step, cpu.NativeStep)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    m.train()
    ids = torch.randint(0, 100, (2, 6))
    loss = m(ids, torch.ones_like(ids), labels=torch.randint(0, 128, (2, 16))).loss
    loss.backward()
    assert m.decoder.lm_head.weight.grad is not None


def test_moving_to_huge_pages_inside_inference_mode_keeps_autograd() -> None:
    p = torch.nn.Parameter(torch.randn(1100, 1024))  # 4.3 MiB: an advised mapping
    want = p.detach().clone()
    with torch.inference_mode():
        native.move_to_huge_pages(p)
        native.move_to_huge_pages(p)  # once only
    assert torch.equal(p.detach(), want) and not p.is_inference()
    (p * 2).sum().backward()
    assert p.grad is not None and torch.all(p.grad == 2)


@pytest.fixture
def avx2_build(monkeypatch: pytest.MonkeyPatch, tmp_path):
    """The kernels rebuilt for AVX2 CPUs (-march=x86-64-v3: no AVX-512), loaded in place of this
    machine's build for one test."""
    import shutil
    from pathlib import Path

    info = Path("/proc/cpuinfo")
    flags = info.read_text() if info.exists() else ""
    if " avx2" not in flags or shutil.which("cc") is None:
        pytest.skip("no AVX2 CPU or no C compiler here")
    monkeypatch.setenv("DALLEMINI_KERNEL_MARCH", "x86-64-v3")
    monkeypatch.setenv("DALLEMINI_CACHE", str(tmp_path))
    saved = dict(native._STATE)
    native._STATE.clear()
    yield
    native._STATE.clear()
    native._STATE.update(saved)


def test_avx2_build_runs_float32_decoding(avx2_build: None) -> None:
    """Without AVX-512 the float32 kernels (plain vectorized loops) give torch's products, attention
    and decoder layers; bfloat16 weights are read plain, widened."""
    assert native.available() and native.bf16_layout() == "plain"
    assert list(native.cache_dir().glob("gemv-*.so"))  # built for this test, not the shared cache
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(2730, 1000, generator=g) * 0.02, torch.randn(2, 1, 1000, generator=g)
    torch.testing.assert_close(native.gemv(x, w), x @ w.t(), rtol=1e-5, atol=1e-5)
    x5 = torch.randn(5, 1000, generator=g)
    torch.testing.assert_close(native.gemm(x5, w), x5 @ w.t(), rtol=1e-5, atol=1e-5)
    k, v = torch.randn(3, 4, 9, 24, generator=g), torch.randn(3, 4, 9, 24, generator=g)
    q = torch.randn(3, 4, 1, 24, generator=g)
    torch.testing.assert_close(native.attend1(q, k, v), F.scaled_dot_product_attention(q, k, v))
    m = _bart(torch.float32, True)
    for rows in (2, 5):
        got, step = _greedy_logits(m, rows, use_native=True)
        want, _ = _greedy_logits(m, rows, use_native=False)
        assert isinstance(step, cpu.NativeStep)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    wb, xb = w.bfloat16(), torch.randn(3, 1000, generator=g).bfloat16()
    yb = native.gemv_bf16(xb, native.pack_bf16(wb), *wb.shape)
    torch.testing.assert_close(yb, (xb.float() @ wb.float().t()).bfloat16(), rtol=1e-2, atol=1e-3)
    mb = _bart(torch.bfloat16, True)
    want, _ = _greedy_logits(mb, 3, use_native=False)
    got, step = _greedy_logits(mb, 3, use_native=True, tokens=want[:, 2:-1, :128].argmax(-1))
    assert isinstance(step, cpu.NativeStep)
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)


def test_the_plain_model_has_no_speed_paths() -> None:
    """models/bart.py builds plain torch layers; the speed paths come only with kernels.accelerate,
    which keeps every parameter (the same objects) and state-dict name."""
    m = _bart(torch.float32, False)
    plain = DalleBart(m.config)
    linears = [x for x in plain.modules() if isinstance(x, torch.nn.Linear)]
    assert linears and all(type(x) is torch.nn.Linear for x in linears)
    params = dict(plain.named_parameters())
    fast = kernels.accelerate(plain)
    assert fast is plain and kernels.accelerate(fast) is fast
    assert dict(fast.named_parameters()) == params
    assert all(isinstance(x, CpuLinear) for x in fast.modules() if isinstance(x, torch.nn.Linear))
    layer = fast.decoder.layers[0]
    assert isinstance(layer.glu, cpu.FusedGLU) and isinstance(layer.self_attn, cpu.CpuAttention)
    assert type(fast.encoder.layers[0].glu).__name__ == "GLU"  # the encoder runs once: no fusing
    prepacked = {name for name, x in fast.named_modules() if getattr(x, "prepack", False)}
    assert "decoder.lm_head" in prepacked and "decoder.layers.0.encoder_attn.out_proj" in prepacked
    assert not any(n.startswith("encoder.") or "encoder_attn.k_proj" in n for n in prepacked)


@needs_kernel
def test_generation_takes_the_fast_paths(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pipeline binds the speed paths: float32 CPU images decode every step through the native
    decoder layers, one image or several (which then keep no oneDNN copies); with the op-by-op step
    chosen, two images (four rows) go through oneDNN's packed and fused decoder weights."""
    pipe = TextToImage.from_pretrained(
        create_random_model(tmp_path_factory.mktemp("k") / "tiny", preset="tiny", seed=0),
        device="cpu",
    )
    steps: list[int] = []
    call = cpu.NativeStep.__call__
    monkeypatch.setattr(
        cpu.NativeStep, "__call__", lambda self, t, pos: steps.append(pos) or call(self, t, pos)
    )
    pipe("a cat", num_images=1, seed=0)
    total = pipe.config.bart.image_length
    assert steps == list(range(total))  # every step, from the first one
    dec = pipe.bart.decoder
    assert isinstance(dec.lm_head, CpuLinear) and dec.lm_head._packed is None
    steps.clear()
    pipe("a cat", num_images=2, seed=0)
    assert steps[-total:] == list(range(total))  # after the one race of this shape
    layer = dec.layers[0]
    assert layer.glu.fc2._packed is None and layer.self_attn.qkv._cache is None
    if cpu._ONEDNN_LINEAR:
        monkeypatch.setenv("DALLEMINI_FEW_ROWS", "onednn")
        steps.clear()
        pipe("a cat", num_images=2, seed=0)
        assert not steps
        assert dec.lm_head._packed is not None and layer.glu.fc2._packed is not None
        assert layer.self_attn.qkv._cache is not None and layer.glu.fc01._cache is not None
        assert pipe.bart.encoder.layers[0].glu.fc0._packed is None  # the encoder is not packed


@pytest.mark.parametrize("build", ["native", "avx2"])
@pytest.mark.parametrize(
    ("rows", "n", "k"), [(1, 2730, 1024), (2, 37, 50), (9, 100, 33), (32, 5, 7)]
)
def test_int8_kernel_matches_the_dequantized_product(
    request: pytest.FixtureRequest, build: str, rows: int, n: int, k: int
) -> None:
    """Weights widened from int8, times the scale: the float product of the dequantized weight,
    for any width (tails of K % 16) and 1 to 32 rows, in both builds; each row's result is the
    one it gets alone."""
    if build == "avx2":
        request.getfixturevalue("avx2_build")
    if not native.available(torch.int8):
        pytest.skip("no native kernels here")
    g = torch.Generator().manual_seed(rows + n + k)
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scale, x = torch.rand(n, generator=g) * 0.01, torch.randn(rows, k, generator=g)
    want = (x.double() @ (w.double() * scale.double()[:, None]).t()).float()
    got = native.gemv_int8(x, w, scale)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[-1:], native.gemv_int8(x[-1:], w, scale))
    assert native.gemv_int8(torch.randn(33, k), w, scale) is None  # past INT8_MAX_ROWS


@pytest.fixture
def unmeasured_choices(monkeypatch: pytest.MonkeyPatch, tmp_path) -> ModuleType:
    """models.kernels.choice with nothing measured or forced yet, keeping its file under tmp_path."""
    from dallemini.models.kernels import choice

    if not native.available():
        pytest.skip("no native kernels here")
    monkeypatch.delenv("DALLEMINI_FEW_ROWS", raising=False)
    monkeypatch.setenv("DALLEMINI_CACHE", str(tmp_path))
    monkeypatch.setattr(choice, "_CHOICES", {})
    monkeypatch.setattr(choice, "_LOADED", [])
    return choice


def test_the_few_row_path_is_measured_once_and_kept(
    monkeypatch: pytest.MonkeyPatch, unmeasured_choices: ModuleType
) -> None:
    """Each weight shape's faster path (native kernel or oneDNN) is timed once, kept on disk for
    later processes, and forced by $DALLEMINI_FEW_ROWS; a forced oneDNN path gives the same product
    and keeps one image's float32 steps off the native layer kernel."""
    choice = unmeasured_choices
    timed = []
    monkeypatch.setattr(choice, "measure", lambda w, f: timed.append(w.shape) or "onednn")
    layer = cpu.CpuLinear(64, 48, prepack=True)
    x = torch.randn(2, 64)
    with torch.no_grad():
        want = x @ layer.weight.t()
        torch.testing.assert_close(layer(x), want)
        layer(x)
    assert timed == [(48, 64)]  # once
    saved = json.loads(choice.choices_file().read_text())
    assert list(saved.values()) == ["onednn"]
    monkeypatch.setattr(choice, "_CHOICES", {})
    monkeypatch.setattr(choice, "_LOADED", [])
    assert layer.few_rows_path() == "onednn" and timed == [(48, 64)]  # read back, not timed
    monkeypatch.setenv("DALLEMINI_FEW_ROWS", "native")
    assert layer.few_rows_path() == "native"
    monkeypatch.setenv("DALLEMINI_FEW_ROWS", "onednn")
    m = _bart(torch.float32, True)
    _, step = _greedy_logits(m, 2, use_native=True)
    assert not isinstance(step, cpu.NativeStep)


def test_the_decoding_step_path_is_raced_once_and_kept(
    monkeypatch: pytest.MonkeyPatch, unmeasured_choices: ModuleType
) -> None:
    """A float32 model's one-image step takes the native layer kernels where a whole step through
    them beats the layers op by op (timed once per model shape, kept on disk), even where oneDNN
    wins every product alone; the timing leaves the cache as the sampling expects it."""
    choice = unmeasured_choices
    monkeypatch.setattr(choice, "measure", lambda w, f: "onednn")  # every product alone
    raced = []
    real_best_of = choice._best_of

    def best_of(fn, repeats):  # the op-by-op step is the slower, as for small models
        raced.append(fn)
        return real_best_of(fn, repeats) * (1.0 if len(raced) % 2 else 1e3)

    monkeypatch.setattr(choice, "_best_of", best_of)
    m = _bart(torch.float32, True)
    got, step = _greedy_logits(m, 2, use_native=True)
    assert isinstance(step, cpu.NativeStep) and len(raced) == 2
    want, _ = _greedy_logits(m, 2, use_native=False)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # the race wrote nothing stale
    saved = json.loads(choice.choices_file().read_text())
    assert [v for k, v in saved.items() if "|step|" in k] == ["native"]
    _greedy_logits(m, 2, use_native=True)
    assert len(raced) == 2  # kept, not raced again


@pytest.mark.skipif(native.bf16_layout() != "plain", reason="plain bfloat16 layer kernels only")
@pytest.mark.parametrize("avx512", [False, True])
def test_several_bf16_rows_race_only_where_onednn_could_win(
    monkeypatch: pytest.MonkeyPatch, unmeasured_choices: ModuleType, avx512: bool
) -> None:
    """Several images' plain-bfloat16 steps race the layers op by op only on CPUs with AVX-512:
    without it oneDNN's bfloat16 matmuls are far too slow to win, and a race costs about a
    minute."""
    choice = unmeasured_choices
    monkeypatch.setattr(native, "has_avx512", lambda: avx512)
    raced = []
    real_best_of = choice._best_of
    monkeypatch.setattr(choice, "_best_of", lambda fn, n: raced.append(fn) or real_best_of(fn, n))
    m = _bart(torch.bfloat16, True)
    _, step = _greedy_logits(m, 4, use_native=True, steps=3)
    assert len(raced) == (2 if avx512 else 0)
    if not avx512:
        assert isinstance(step, cpu.NativeStep)


@pytest.mark.parametrize("rows", [1, 2, 5])
def test_native_decoder_layer_with_int8_weights_matches_torch(rows: int) -> None:
    """8-bit weights (models/quant.py) in the native layer kernel: the op-by-op int8 model's logits."""
    from dallemini.models.quant import quantize_

    if not native.available(torch.int8):
        pytest.skip("no native kernels here")
    m = quantize_(_bart(torch.float32, True))
    got, step = _greedy_logits(m, rows, use_native=True)
    want, _ = _greedy_logits(m, rows, use_native=False)
    assert isinstance(step, cpu.NativeStep)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
