"""DalleBart: shapes of the published variants, cached decoding == full forward, training loss, input checks."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from dallemini.config import BART_PRESETS, BartConfig
from dallemini.errors import ConfigError, InputError
from dallemini.models import kernels
from dallemini.models.bart import DalleBart, DecoderCache
from dallemini.models.kernels import cuda_graph, native


def _inputs(
    cfg: BartConfig, batch: int = 3, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, cfg.encoder_vocab_size, (batch, cfg.max_text_length), generator=g)
    mask = torch.ones_like(ids)
    ids[:, 0] = 0
    for b in range(batch):  # different amounts of padding per row
        n = cfg.max_text_length - 3 * b - 1
        ids[b, n] = 2
        ids[b, n + 1 :] = 1
        mask[b, n + 1 :] = 0
    labels = torch.randint(0, cfg.image_vocab_size, (batch, cfg.image_length), generator=g)
    return ids, mask, labels


@pytest.fixture
def tiny() -> DalleBart:
    torch.manual_seed(0)
    return DalleBart(BART_PRESETS["tiny"]).eval()


def _copy(model: DalleBart, dtype: torch.dtype, device: str = "cpu") -> DalleBart:
    """Another DalleBart with `model`'s weights, in `dtype` on `device` (the fixture stays float32)."""
    other = DalleBart(model.config).eval()
    other.load_state_dict(model.state_dict())
    return other.to(device, dtype)


def _fast_steps(model: DalleBart, tokens: torch.Tensor, cache: DecoderCache) -> torch.Tensor:
    """Logits of `tokens` [B, n] fed one at a time as generation feeds them: through
    kernels.fast_step where one applies (one image on CPU: the native decoder layers), else decode_step."""
    step = kernels.fast_step(model, cache, tokens.shape[0], cache.length)
    out = []
    for i in range(tokens.shape[1]):
        if step is None:
            out.append(model.decode_step(tokens[:, i : i + 1], cache))
        else:
            out.append(step(tokens[:, i : i + 1], cache.length))
            cache.length += 1
    return torch.cat(out, 1)


def _param_count(cfg: BartConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in DalleBart(cfg).parameters())


def test_published_variants_have_the_published_shapes() -> None:
    mini, mega = BART_PRESETS["mini"], BART_PRESETS["mega"]
    with torch.device("meta"):
        m = DalleBart(mini)
    sd = m.state_dict()
    assert sd["decoder.embed_tokens.weight"].shape == (16385, 1024)
    assert sd["decoder.lm_head.weight"].shape == (16385, 1024)
    assert sd["encoder.embed_tokens.weight"].shape == (50264, 1024)
    assert sd["encoder.layers.11.glu.fc0.weight"].shape == (2730, 1024)
    # no dense biases, bias-only norms before dense layers, scaled norms after attention
    assert not any(k.endswith("proj.bias") or (".fc" in k and k.endswith("bias")) for k in sd)
    assert "encoder.layers.0.pre_self_attn_layer_norm.weight" not in sd
    assert "decoder.layers.0.glu.ln1.bias" in sd and "decoder.layers.0.glu.ln1.weight" not in sd
    assert "decoder.layers.0.encoder_attn_layer_norm.weight" in sd
    assert "decoder.final_ln.weight" not in sd
    assert 0.40e9 < _param_count(mini) < 0.45e9  # "mini ≈ 0.4B"
    assert 2.4e9 < _param_count(mega) < 2.8e9  # "mega ≈ 2.6B"
    with torch.device("meta"):
        assert DalleBart(mega).decoder.lm_head.weight.shape == (16416, 2048)


def test_cached_decoding_equals_full_forward(tiny: DalleBart) -> None:
    cfg = tiny.config
    ids, mask, labels = _inputs(cfg)
    with torch.no_grad():
        full = tiny(ids, mask, labels=labels).logits
        dec_in = tiny.shift_right(labels)
        cache = tiny.init_cache(tiny.encode(ids, mask), mask)
        steps = torch.cat(
            [tiny.decode_step(dec_in[:, i : i + 1], cache) for i in range(cfg.image_length)], 1
        )
        torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)
        # chunks of several tokens (a forced prefix) then single steps
        cache = tiny.init_cache(tiny.encode(ids, mask), mask)
        chunked = torch.cat(
            [tiny.decode_step(dec_in[:, :5], cache), tiny.decode_step(dec_in[:, 5:9], cache)]
            + [tiny.decode_step(dec_in[:, i : i + 1], cache) for i in range(9, cfg.image_length)],
            1,
        )
        torch.testing.assert_close(chunked, full, atol=1e-5, rtol=1e-5)


def test_embedding_rows_at_their_own_positions(tiny: DalleBart) -> None:
    """embed with one start per row gives each row what embed with that start gives it alone."""
    length = tiny.config.image_length
    tokens = torch.randint(0, tiny.config.image_vocab_size, (3, 2))
    starts = torch.tensor([0, length // 2, length - 2])
    with torch.no_grad():
        together = tiny.decoder.embed(tokens, starts)
        for r in range(3):
            assert torch.equal(
                together[r], tiny.decoder.embed(tokens[r : r + 1], int(starts[r]))[0]
            )


def test_padding_does_not_leak(tiny: DalleBart) -> None:
    """Tokens behind the attention mask must not change anything."""
    ids, mask, labels = _inputs(tiny.config)
    ids2 = ids.clone()
    ids2[mask == 0] = 7
    with torch.no_grad():
        a = tiny(ids, mask, labels=labels).logits
        b = tiny(ids2, mask, labels=labels).logits
    torch.testing.assert_close(a, b)


def test_cache_rows_share_prompts(tiny: DalleBart) -> None:
    """rows= maps several images onto one prompt's encoder pass: same as repeating the prompt."""
    ids, mask, labels = _inputs(tiny.config, batch=2)
    rows = torch.tensor([0, 0, 1, 1, 1])
    with torch.no_grad():
        enc = tiny.encode(ids, mask)
        c1 = tiny.init_cache(enc, mask, rows=rows)
        c2 = tiny.init_cache(enc[rows], mask[rows])
        tok = labels[rows, :3]
        torch.testing.assert_close(tiny.decode_step(tok, c1), tiny.decode_step(tok, c2))


@torch.enable_grad()  # other tests may import min_dalle.min_dalle, which turns autograd off globally
def test_training_loss_falls(tiny: DalleBart) -> None:
    ids, mask, labels = _inputs(tiny.config, batch=4)
    tiny.train()
    opt = torch.optim.AdamW(tiny.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        loss = tiny(ids, mask, labels=labels).loss
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_bad_inputs_are_explained(tiny: DalleBart) -> None:
    cfg = tiny.config
    ids, mask, labels = _inputs(cfg)
    with pytest.raises(InputError, match="at most"):
        tiny.encode(torch.cat([ids, ids], 1), torch.cat([mask, mask], 1))
    bad = ids.clone()
    bad[0, 1] = cfg.encoder_vocab_size
    with pytest.raises(InputError, match="tokenizer does not match"):
        tiny.encode(bad, mask)
    with pytest.raises(InputError, match="labels"):
        tiny(ids, mask)
    cache = tiny.init_cache(tiny.encode(ids, mask), mask)
    with pytest.raises(InputError, match="past image_length"):
        tiny.decode_step(labels[:, :1].repeat(1, cfg.image_length + 1), cache)


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="divisible"):
        BartConfig(d_model=100, attention_heads=3)
    with pytest.raises(ConfigError, match="decoder_start_token_id"):
        BartConfig(image_vocab_size=10, decoder_start_token_id=11)
    with pytest.raises(ConfigError, match="unknown field"):
        BartConfig.from_dict({"d_model": 64, "use_alibi": True})
    assert BartConfig.from_dict(BART_PRESETS["tiny"].to_dict()) == BART_PRESETS["tiny"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_inference_paths_match_the_training_path(tiny: DalleBart, dtype: torch.dtype) -> None:
    """Cached decoding without autograd (native kernels, oneDNN, packed and fused weights, the K/V
    cache of kernels.cache_dtype) gives the logits of the teacher-forced forward with autograd on (plain
    F.linear), for 2 rows, 3 (the float32 packing threshold) and 10, and a weight change reaches
    the packed copies."""
    model = kernels.accelerate(_copy(tiny, dtype))
    cache_dtype = kernels.cache_dtype(dtype, torch.device("cpu"))
    tol = {"atol": 2e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0.1, "rtol": 0.05}
    for batch in (2, 3, 10):
        ids, mask, labels = _inputs(model.config, batch=batch, seed=batch)
        dec_in = model.shift_right(labels)[:, :12]
        with torch.enable_grad():
            full = model(ids, mask, decoder_input_ids=dec_in).logits.detach()
        with torch.inference_mode():
            cache = model.init_cache(model.encode(ids, mask), mask, dtype=cache_dtype)
            # float32 on CPU, except bfloat16 where the native kernels read it
            assert cache.self_k.dtype == torch.float32 or native.available(torch.bfloat16)
            steps = _fast_steps(model, dec_in, cache)
        assert steps.dtype == dtype
        torch.testing.assert_close(steps.float(), full.float(), **tol)
    with torch.no_grad():  # in-place update: packed copies must not go stale
        for p in model.decoder.parameters():
            p.mul_(1.5)
    ids, mask, labels = _inputs(model.config, batch=10, seed=1)
    dec_in = model.shift_right(labels)[:, :3]
    with torch.enable_grad():
        full = model(ids, mask, decoder_input_ids=dec_in).logits.detach()
    with torch.inference_mode():
        cache = model.init_cache(model.encode(ids, mask), mask, dtype=cache_dtype)
        steps = _fast_steps(model, dec_in, cache)
    torch.testing.assert_close(steps.float(), full.float(), **tol)


def test_trimmed_padding_gives_the_same_logits(tiny: DalleBart) -> None:
    """Cutting the text columns that are padding in every row changes neither encoder states nor decoding."""
    from dallemini.generate import trim_padding

    ids, mask, labels = _inputs(tiny.config, batch=2)
    keep = tiny.config.max_text_length // 2
    mask[:, keep:] = 0
    ids[:, keep:] = 1
    mask[1, keep - 3 :] = 0  # a shorter row: the longest one decides
    short_ids, short_mask = trim_padding(ids, mask)
    assert short_ids.shape[1] == keep
    with torch.no_grad():
        enc = tiny.encode(ids, mask)
        short = tiny.encode(short_ids, short_mask)
        torch.testing.assert_close(short, enc[:, :keep], atol=1e-5, rtol=1e-5)
        a = tiny.decode_step(labels[:, :4], tiny.init_cache(enc, mask))
        b = tiny.decode_step(labels[:, :4], tiny.init_cache(short, short_mask))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _assert_steps_match_eager(
    model: DalleBart,
    ids: torch.Tensor,
    mask: torch.Tensor,
    tokens: torch.Tensor,
    prefill: int,
    stepper: Callable[[DecoderCache], Callable[[torch.Tensor, int], torch.Tensor]],
    tol: dict[str, float],
) -> None:
    """After a `prefill`-token decode_step on two caches, one-token steps through `stepper(cache)`
    give decode_step's logits on the other, and the same self-attention cache."""
    with torch.inference_mode():
        enc = model.encode(ids, mask)
        eager, other = model.init_cache(enc, mask), model.init_cache(enc, mask)
        for c in (eager, other):
            model.decode_step(tokens[:, :prefill], c)  # torch's ops on both
        step = stepper(other)
        n = tokens.shape[1]
        for i in range(prefill, n):
            want = model.decode_step(tokens[:, i : i + 1], eager)
            got = step(tokens[:, i : i + 1], i)
            other.length = i + 1
            torch.testing.assert_close(got.float(), want.float(), **tol)
        torch.testing.assert_close(
            other.self_k[:, :, :, :n].float(), eager.self_k[:, :, :, :n].float(), **tol
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_static_step_matches_decode_step(tiny: DalleBart, dtype: torch.dtype) -> None:
    """cuda_graph.static_step (the CUDA-graph step: attention over every slot, later ones masked,
    position as a tensor) gives decode_step's logits and cache, after a multi-token prefill too."""
    model = kernels.accelerate(_copy(tiny, dtype))
    ids, mask, labels = _inputs(model.config, batch=2, seed=3)
    mask[1, -3:] = 0
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0.05, "rtol": 0.05}

    def stepper(cache: DecoderCache) -> Callable[[torch.Tensor, int], torch.Tensor]:
        return lambda t, i: cuda_graph.static_step(model, t, cache, torch.tensor([i]))

    tokens = model.shift_right(labels)[:, :10]
    _assert_steps_match_eager(model, ids, mask, tokens, 3, stepper, tol)


def test_graphed_steps_are_for_cuda_only(tiny: DalleBart) -> None:
    ids, mask, _ = _inputs(tiny.config, batch=2)
    with torch.inference_mode():
        cache = tiny.init_cache(tiny.encode(ids, mask), mask)
    assert cuda_graph.graphed_step(tiny, cache, 2, 0) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_graphed_steps_match_eager_steps_on_cuda(tiny: DalleBart, dtype: torch.dtype) -> None:
    """A CUDA graph of the static step, replayed with new tokens and positions, gives decode_step's
    logits step after step (the copies into its static inputs, the cache writes in the graph)."""
    model = kernels.accelerate(_copy(tiny, dtype, "cuda"))
    ids, mask, labels = (t.cuda() for t in _inputs(model.config, batch=2, seed=4))
    tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 0.02, "rtol": 0.02}

    def stepper(cache: DecoderCache) -> Callable[[torch.Tensor, int], torch.Tensor]:
        graph = cuda_graph.GraphedStep(model, cache, rows=2, pos=2)
        return lambda t, i: graph(t, i).clone()  # the graph's output buffer is reused

    tokens = model.shift_right(labels)[:, :12]
    _assert_steps_match_eager(model, ids, mask, tokens, 2, stepper, tol)


def test_last_only_prefill_gives_the_last_positions_logits(tiny: DalleBart) -> None:
    ids, mask, labels = _inputs(tiny.config, batch=2, seed=5)
    tokens = tiny.shift_right(labels)[:, :7]
    with torch.inference_mode():
        enc = tiny.encode(ids, mask)
        full = tiny.decode_step(tokens, tiny.init_cache(enc, mask))
        cache = tiny.init_cache(enc, mask)
        last = tiny.decode_step(tokens, cache, last_only=True)
    assert last.shape == (2, 1, full.shape[-1]) and cache.length == 7
    torch.testing.assert_close(last, full[:, -1:])
