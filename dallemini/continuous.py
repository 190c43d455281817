"""Continuous batching: one running decoder batch that image rows join and leave at step boundaries.

Every image row keeps its own position, seed and sampling settings, so one batch serves any mix of
requests, and a row samples the tokens `generate.iter_image_tokens` samples for it alone: the same
encoder input, the same per-row uniforms, the same filter and draw, applied per group of equal
settings. `admit` encodes new rows' prompts, writes their cross-attention K/V into free cache slots
and prefills a completion's forced tokens; `step` advances every row by one token (a row's tokens
live in its slot until it leaves, or until `sync` copies them for a partial image); a finished or
dropped row frees its slots at once. The slots in use stay dense: a freed slot takes the last one.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace
from itertools import count

import torch
from torch import Tensor

from . import threads
from .config import SamplingConfig
from .errors import InputError
from .generate import draw, filter_logits, row_uniforms, trim_padding
from .models import kernels
from .models.bart import DalleBart, DecoderCache


@dataclass(frozen=True)
class RowRequest:
    """One image to sample: its prompt's encoder input [T], its seed and settings, forced first codes."""

    ids: Tensor
    mask: Tensor
    seed: int
    settings: SamplingConfig
    prefix: Tensor | None = None  # [m] codes the image starts with (completion)

    @property
    def guided(self) -> bool:
        """Super-conditioning needs a second (unconditional) row."""
        return self.settings.condition_scale != 1.0

    @property
    def slots(self) -> int:
        """Cache slots the row takes."""
        return 2 if self.guided else 1


@dataclass(eq=False)
class Row:
    """An admitted image row: its request, cache slots (conditional, then unconditional), progress."""

    key: int
    request: RowRequest
    slots: list[int]
    tokens: Tensor  # [image_length] on the CPU: forced codes; sampled ones from `sync`
    uniforms: Tensor  # [image_length] float64, from the row's seed
    done: int = 0
    text_length: int = 0  # text positions its cross-attention reads (the rest is padding)


@dataclass
class _Group:
    """Rows that sample with the same top-k and top-p: their conditional slots, unconditional ones
    (None without super-conditioning), and where the rows' temperatures or condition scales differ
    (on CPU), those per row as [n, 1] float32 tensors (else None: `settings`' own)."""

    settings: SamplingConfig
    cond: Tensor
    uncond: Tensor | None
    temperature: Tensor | None = None
    scale: Tensor | None = None


class RunningBatch:
    """A decoder batch of at most `capacity` guided image rows that rows join and leave between steps."""

    def __init__(
        self,
        model: DalleBart,
        uncond_ids: Tensor,
        uncond_mask: Tensor,
        num_codes: int,
        capacity: int,
    ) -> None:
        if capacity < 1:
            raise InputError(f"capacity must be >= 1, got {capacity}")
        cfg = model.config
        if not 0 < num_codes <= cfg.image_vocab_size:
            raise InputError(f"num_codes {num_codes} does not fit {cfg.image_vocab_size}")
        weight = model.decoder.embed_tokens.weight
        self.model, self.num_codes = kernels.accelerate(model.eval()), num_codes
        self.device = weight.device
        self.uncond_ids = uncond_ids.reshape(-1).to(self.device)
        self.uncond_mask = uncond_mask.reshape(-1).to(self.device)
        self.capacity_slots = 2 * capacity  # each guided image takes two
        s, t = self.capacity_slots, self.uncond_ids.shape[0]
        dtype = kernels.cache_dtype(weight.dtype, self.device)
        layers, h, dh = cfg.decoder_layers, cfg.attention_heads, cfg.head_dim
        zeros = lambda *shape: torch.zeros(shape, dtype=dtype, device=self.device)  # noqa: E731
        # Zeros, not empty: a masked slot's value must be finite (0 weight x NaN is NaN).
        self.cache = DecoderCache(
            self_k=zeros(layers, s, h, cfg.image_length, dh),
            self_v=zeros(layers, s, h, cfg.image_length, dh),
            cross_k=zeros(layers, s, h, t, dh),
            cross_v=zeros(layers, s, h, t, dh),
            cross_mask=zeros(s, 1, 1, t),
        )
        self.feed = torch.zeros(s, dtype=torch.long, device=self.device)  # each slot's next input
        self.pos = torch.zeros(s, dtype=torch.long, device=self.device)  # and its position
        # Per slot: its row's uniforms and the tokens sampled so far (conditional slots), so that
        # a step samples each settings group with a few tensor ops, not a Python loop over rows.
        length = cfg.image_length
        self.uniforms = torch.zeros(s, length, dtype=torch.float64, device=self.device)
        self.tokens = torch.zeros(s, length, dtype=torch.long, device=self.device)
        self._groups: list[_Group] | None = None
        self.owner: list[tuple[Row, int]] = []  # slot -> (row, index in row.slots)
        self.rows: dict[int, Row] = {}
        self._keys = count()
        self.tuner = threads.tuner("decode") if self.device.type == "cpu" else threads.FIXED
        # The native CPU decoder layers where they apply (chosen now, on the empty cache: the race
        # against the layers op by op writes position 0 of every slot, which admission rewrites).
        self.native = kernels.native_step(self.model, self.cache, 0)

    @property
    def used_slots(self) -> int:
        """Cache slots in use (the first `used_slots`)."""
        return len(self.owner)

    def fits(self, requests: list[RowRequest]) -> bool:
        """Whether these rows can be admitted now."""
        return self.used_slots + sum(r.slots for r in requests) <= self.capacity_slots

    # ---- joining -------------------------------------------------------------------------------

    @torch.inference_mode()
    def admit(self, requests: list[RowRequest]) -> list[Row]:
        """Add rows to the batch (prompts encoded, cross K/V written, forced codes prefilled)."""
        if not requests:
            return []
        if not self.fits(requests):
            raise InputError(f"{len(requests)} rows do not fit: {self.used_slots} slots in use")
        total = self.model.config.image_length
        for r in requests:
            if r.ids.shape != self.uncond_ids.shape or r.mask.shape != self.uncond_ids.shape:
                raise InputError(f"a row's prompt must be encoded as [{self.uncond_ids.shape[0]}]")
            if r.prefix is not None and not (
                r.prefix.dim() == 1
                and r.prefix.shape[0] <= total
                and (
                    r.prefix.numel() == 0 or 0 <= r.prefix.min() <= r.prefix.max() < self.num_codes
                )
            ):
                raise InputError(f"forced codes must be [<= {total}] in [0, {self.num_codes})")
        # Rows with equally many forced codes are prefilled together, so each group's slots are
        # contiguous: its conditional rows, then its unconditional ones.
        groups: dict[int, list[RowRequest]] = defaultdict(list)
        for r in requests:
            groups[0 if r.prefix is None else r.prefix.shape[0]].append(r)
        admitted = []
        for m, group in sorted(groups.items()):
            admitted += self._admit_group(group, m)
        order = {id(r): i for i, r in enumerate(requests)}
        return sorted(admitted, key=lambda row: order[id(row.request)])

    def _admit_group(self, group: list[RowRequest], m: int) -> list[Row]:
        """Admit rows that all force `m` codes into slots used_slots.. (conditional, unconditional)."""
        cfg, cache = self.model.config, self.cache
        first = self.used_slots
        rows = []
        for r in group:
            tokens = torch.zeros(cfg.image_length, dtype=torch.long)
            if m:
                tokens[:m] = r.prefix.cpu()
            uniforms = row_uniforms([r.seed], cfg.image_length, torch.device("cpu"))[0]
            rows.append(Row(next(self._keys), r, [], tokens, uniforms, done=m))
        if m == cfg.image_length:  # nothing left to sample: no slots; the next step returns them
            self.rows.update((row.key, row) for row in rows)
            return rows
        guided = [row for row in rows if row.request.guided]
        slot_rows = [(row, 0) for row in rows] + [(row, 1) for row in guided]
        for row, which in slot_rows:
            row.slots.append(len(self.owner))
            self.owner.append((row, which))
        new = slice(first, self.used_slots)
        self._groups = None
        self.uniforms[new] = torch.stack([row.uniforms for row, _ in slot_rows]).to(self.device)
        self.tokens[new] = torch.stack([row.tokens for row, _ in slot_rows]).to(self.device)
        # 1. one encoder pass over the group's prompts and, if any is guided, the empty caption
        ids = torch.stack([r.ids.to(self.device) for r in group] + [self.uncond_ids] * bool(guided))
        mask = torch.stack(
            [r.mask.to(self.device) for r in group] + [self.uncond_mask] * bool(guided)
        )
        ids, mask = trim_padding(ids, mask)
        enc = self.model.encode(ids, mask)
        which_enc = [i for i in range(len(group))] + [len(group)] * len(guided)
        enc_rows = torch.tensor(which_enc, device=self.device)
        # 2. their cross-attention K/V and mask, padded to the cache's text length
        t = ids.shape[1]
        for row, _ in slot_rows:
            row.text_length = t
        for i, layer in enumerate(self.model.decoder.layers):
            k, v = layer.encoder_attn.project_kv(enc)
            cache.cross_k[i, new, :, :t] = k.index_select(0, enc_rows).to(cache.cross_k.dtype)
            cache.cross_v[i, new, :, :t] = v.index_select(0, enc_rows).to(cache.cross_v.dtype)
        keep = torch.zeros(len(which_enc), cache.cross_mask.shape[-1], dtype=torch.bool)
        keep[:, :t] = mask.bool().index_select(0, enc_rows).cpu()
        cache.cross_mask[new] = torch.zeros_like(cache.cross_mask[new]).masked_fill_(
            ~keep.to(self.device)[:, None, None, :], float("-inf")
        )
        # 3. the forced codes' K/V at positions 0..m-1 (inputs: BOS and all but the last code)
        bos = cfg.decoder_start_token_id
        inputs = torch.stack(
            [torch.cat([torch.tensor([bos]), row.tokens[: max(m - 1, 0)]]) for row, _ in slot_rows]
        ).to(self.device)
        if m:
            view = DecoderCache(
                cache.self_k[:, new], cache.self_v[:, new], cache.cross_k[:, new],
                cache.cross_v[:, new], cache.cross_mask[new],
            )  # fmt: skip
            self.model.decode_step(inputs[:, :m], view, last_only=True)
        # 4. each slot's next input: the last forced code (or BOS) at position m
        last = torch.tensor([row.tokens[m - 1] if m else bos for row, _ in slot_rows])
        self.feed[new] = last.to(self.device)
        self.pos[new] = m
        for row in rows:
            self.rows[row.key] = row
        return rows

    # ---- stepping ------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[Row]:
        """One token for every unfinished row; returns the rows that finished (their slots freed)."""
        running = [row for row in self.rows.values() if row.slots]
        if running:
            with self.tuner.step():
                logits = self._logits()[:, : self.num_codes].float()  # mix in float32
            if self._groups is None:
                self._groups = self._settings_groups()
            for group in self._groups:
                self._sample(logits, group)
            self.pos[: self.used_slots] += 1  # every slot in use belongs to a running row
            for row in running:
                row.done += 1
        finished = [row for row in self.rows.values() if row.done == row.tokens.shape[0]]
        for row in finished:
            self.drop(row.key)
        return finished

    def _settings_groups(self) -> list[_Group]:
        """The rows in groups that filter alike (top-k, top-p, with or without an unconditional
        row). On CPU a group's rows may differ in temperature and condition scale: there x / t and
        s * x with t and s in float32 tensors give the bits the numbers give (tested); elsewhere
        (CUDA divides by a number as a product with its reciprocal) only equal settings share one."""
        by_filter: dict[tuple, list[Row]] = defaultdict(list)
        for row in self.rows.values():
            if row.slots:
                s = row.request.settings
                key: tuple = (s.top_k, s.top_p, row.request.guided)
                if self.device.type != "cpu":
                    key += (s.temperature, s.condition_scale)
                by_filter[key].append(row)
        out = []
        for rows in by_filter.values():
            first = rows[0].request
            group = _Group(
                first.settings,
                torch.tensor([row.slots[0] for row in rows], device=self.device),
                torch.tensor([row.slots[1] for row in rows], device=self.device)
                if first.guided
                else None,
            )
            temperatures = [row.request.settings.temperature for row in rows]
            scales = [row.request.settings.condition_scale for row in rows]
            if len(set(temperatures)) > 1:
                group.temperature = torch.tensor(temperatures, device=self.device)[:, None]
                group.settings = replace(first.settings, temperature=1.0)
            if len(set(scales)) > 1:
                group.scale = torch.tensor(scales, device=self.device)[:, None]
            out.append(group)
        return out

    def _sample(self, logits: Tensor, group: _Group) -> None:
        """The next token of one group's rows (iter_image_tokens' mix, filter and draw), written to
        their slots' tokens and next inputs."""
        cond, uncond = group.cond, group.uncond
        mixed = logits.index_select(0, cond)
        if uncond is not None:
            u = logits.index_select(0, uncond)
            scale = group.settings.condition_scale if group.scale is None else group.scale
            mixed = u + scale * (mixed - u)
        if group.temperature is not None:  # group.settings' temperature is 1 then
            mixed = mixed / group.temperature
        lw, idx = filter_logits(mixed, group.settings)
        at = self.pos.index_select(0, cond)
        chosen = draw(lw, idx, self.uniforms[cond, at])
        self.tokens[cond, at] = chosen
        self.feed[cond] = chosen
        if uncond is not None:
            self.feed[uncond] = chosen

    @torch.inference_mode()
    def sync(self, rows: list[Row]) -> None:
        """Copy the tokens sampled so far into these rows' `tokens` (for partial images)."""
        for row in rows:
            if row.slots:
                row.tokens[: row.done] = self.tokens[row.slots[0], : row.done].cpu()

    def _logits(self) -> Tensor:
        """Decoder logits [slots, V] of every slot's next input at its own position."""
        model, cache, n = self.model, self.cache, self.used_slots
        dec = model.decoder
        tokens, pos = self.feed[:n, None], self.pos[:n]
        if self.native is not None:
            return self.native.at(tokens, pos)[:, 0]
        x = dec.embed(tokens, pos)
        end = max(row.done for row in self.rows.values() if row.slots) + 1  # keys any row sees
        later = torch.arange(end, device=self.device)[None, :] > pos[:, None]
        mask = torch.zeros((n, 1, 1, end), dtype=cache.self_k.dtype, device=self.device)
        mask.masked_fill_(later[:, None, None, :], float("-inf"))
        slot = torch.arange(n, device=self.device)
        # cross-attention reads the text positions some row uses: padding in every row is skipped
        t = max(row.text_length for row in self.rows.values() if row.slots)
        cross_k, cross_v = cache.cross_k[:, :n, :, :t], cache.cross_v[:, :n, :, :t]
        cross_mask = cache.cross_mask[:n, :, :, :t]
        for i, layer in enumerate(dec.layers):
            h = layer.pre_self_attn_layer_norm(x)
            q, k, v = layer.self_attn.project_qkv(h)
            self_k, self_v = cache.self_k[i], cache.self_v[i]
            self_k[slot, :, pos] = k[:, :, 0].to(self_k.dtype)
            self_v[slot, :, pos] = v[:, :, 0].to(self_v.dtype)
            h = layer.self_attn.attend_q(
                q, self_k[:n, :, :end], self_v[:n, :, :end], mask, dtype=x.dtype
            )
            x = x + layer.dropout(layer.self_attn_layer_norm(h))
            x = layer.cross_and_glu(x, cross_k[i], cross_v[i], cross_mask)
        return dec.lm_head(dec.final_ln(x))[:, 0]

    # ---- leaving -------------------------------------------------------------------------------

    @torch.inference_mode()
    def drop(self, key: int) -> Row | None:
        """Remove a row (finished or cancelled) and free its slots; None if it is not here."""
        row = self.rows.pop(key, None)
        if row is None:
            return None
        self.sync([row])
        self._groups = None
        for slot in sorted(row.slots, reverse=True):
            last = self.used_slots - 1
            if slot != last:
                self._move(last, slot)
            self.owner.pop()
        row.slots = []
        return row

    def _move(self, src: int, dst: int) -> None:
        """Slot `src`'s state into slot `dst` (the K/V it has written so far, its text, input)."""
        cache = self.cache
        p = int(self.pos[src]) + 1
        cache.self_k[:, dst, :, :p] = cache.self_k[:, src, :, :p]
        cache.self_v[:, dst, :, :p] = cache.self_v[:, src, :, :p]
        cache.cross_k[:, dst] = cache.cross_k[:, src]
        cache.cross_v[:, dst] = cache.cross_v[:, src]
        cache.cross_mask[dst] = cache.cross_mask[src]
        self.feed[dst], self.pos[dst] = self.feed[src], self.pos[src]
        self.uniforms[dst], self.tokens[dst] = self.uniforms[src], self.tokens[src]
        row, which = self.owner[src]
        row.slots[which] = dst
        self.owner[dst] = (row, which)
