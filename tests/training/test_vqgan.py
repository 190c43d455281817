"""The VQGAN trainer: its images (PairDataset), L1 falls, late GAN start, fine-tuning, export, exact resume, torchrun."""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
import tarfile
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dallemini.checkpoints.native import save_model_dir
from dallemini.config import PipelineConfig, VQGANConfig
from dallemini.data.pairs import PairDataset
from dallemini.data.sources import FolderSource, Record, Source, open_source
from dallemini.errors import ConfigError, InputError
from dallemini.models.vqgan import VQGAN
from dallemini.pipeline import load_vqgan
from dallemini.training.losses import LPIPS, PatchDiscriminator
from dallemini.training.settings import load_config
from dallemini.training.vqgan import (
    VQGANTrainConfig,
    VQGANTrainer,
    spread_pick,
)
from tests.train_utils import kill9_resume_and_compare, subprocess_env

RES = 16
# 16x16 images -> 8x8 codes from 32 entries; a training step takes a few milliseconds.
TINY_VQGAN: dict[str, Any] = {
    "ch": 16,
    "ch_mult": [1, 2],
    "num_res_blocks": 1,
    "attn_resolutions": [],
    "z_channels": 16,
    "embed_dim": 16,
    "n_embed": 32,
    "resolution": RES,
    "num_groups": 8,
}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    """Tiny convolutions gain nothing from a second thread, and the shared cores stay responsive."""
    torch.set_num_threads(1)  # conftest puts the old count back


def _picture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A flat background with a square of another colour somewhere on it."""
    a = np.empty((size, size, 3), np.uint8)
    a[:] = rng.integers(0, 256, 3)
    side = size // 2
    x, y = rng.integers(0, size - side, 2)
    a[y : y + side, x : x + side] = rng.integers(0, 256, 3)
    return a


def write_images(folder: Path, n: int = 32, size: int = 24, seed: int = 0) -> Path:
    """n PNG images (size x size, resized to RES by the trainer) with a .txt caption each."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(_picture(rng, size)).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(f"picture {i}\n")
    return folder


def _cfg(data: Path, out: Path, **kw: Any) -> VQGANTrainConfig:
    base: dict[str, Any] = dict(
        data=str(data),
        out=str(out),
        steps=30,
        batch_size=8,
        lr=1e-3,
        preset="tiny",
        vqgan=TINY_VQGAN,
        disc_start=20,
        disc_ch=8,
        disc_layers=2,
        log_every=5,
        save_every=100,
        tensorboard=False,
        device="cpu",
    )
    base.update(kw)
    return load_config(VQGANTrainConfig, None, base)


def _cli_args(data: Path, out: Path, steps: int, extra: list[str] | None = None) -> list[str]:
    args = [
        "train-vqgan",
        "--data",
        str(data),
        "--out",
        str(out),
        "--steps",
        str(steps),
        "--batch-size",
        "8",
        "--lr",
        "0.001",
        "--model-preset",
        "tiny",
        "--device",
        "cpu",
        "--set",
        "tensorboard=false",
        "--set",
        "disc_ch=8",
        "--set",
        "disc_layers=2",
    ]
    for k, v in TINY_VQGAN.items():
        value = ",".join(map(str, v)) if isinstance(v, list) else str(v)
        args += ["--set", f"vqgan.{k}={value or '[]'}"]
    return args + (extra or [])


# --- the images: PairDataset without captions ---------------------------------------------------
# Exact resume in the default (whole-index shuffle) mode, the rank split, counted decode failures and
# refused setting changes are tested in training/test_clip.py; here what the VQGAN trainer adds.
def _folder_with_oddities(folder: Path) -> Path:
    """20 captioned images, 2 broken files and 1 image without a caption: 23 records, 21 decodable."""
    write_images(folder, n=20, size=12)
    (folder / "bad1.png").write_bytes(b"not a png")
    (folder / "bad2.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    Image.fromarray(np.zeros((10, 14, 3), np.uint8)).save(folder / "nocaption.png")
    return folder


class _Watched(Source):
    """A source whose records are watched, to see how many a reader holds at once."""

    def __init__(self, inner: Source) -> None:
        super().__init__(inner.paths, normalizer=None, description=inner.description)
        self.inner = inner
        self.refs: list[weakref.ref[Record]] = []

    def records(self) -> Iterator[Record]:
        for rec in self.inner.records():
            rec = Record(rec.key, rec.captions, rec.loader, rec.problem)
            self.refs.append(weakref.ref(rec))
            yield rec

    @property
    def alive(self) -> int:
        """Records made and not yet freed."""
        return sum(r() is not None for r in self.refs)


def test_images_without_captions_holdout_tar_and_skip_reports(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = _folder_with_oddities(tmp_path / "imgs")
    source = FolderSource(folder, normalizer=None)

    def images(**kw: Any) -> PairDataset:
        base = dict(shuffle=False, epochs=1, drop_last=False, require_captions=False)
        return PairDataset(source, 4, 8, **{**base, **kw})

    # Without captions required, the caption-less image is used (caption ""); broken files are counted.
    once = images()
    assert [it.key for it in once.records][-1] == "nocaption.png"
    batches = list(once)
    assert sum(len(b.captions) for b in batches) == 21
    assert once.records[int(batches[-1].record[-1])].key == "nocaption.png"
    assert batches[-1].captions[-1] == ""
    assert once.stats.total == 2
    assert {k for keys in once.stats.examples.values() for k in keys} == {"bad1.png", "bad2.png"}
    assert images(require_captions=True).index_stats.counts == {"missing_caption": 3}

    # start/stop: the first 5 records held out (source order, bad ones counted), the rest to train on.
    head, rest = images(stop=5), images(start=5)
    assert [it.key for it in head.records] == [f"{i:03d}.png" for i in range(5)]
    assert {it.key for it in head.records} | {it.key for it in rest.records} == {
        it.key for it in once.records
    }
    assert len(rest.records) == 18
    with pytest.raises(ConfigError, match="start changed"):
        images(start=6).load_state_dict(rest.state_dict())
    with pytest.raises(InputError, match=r"records 30 to the end\) holds no usable images"):
        images(start=30)

    # A webdataset tar works the same way, captions or not.
    tar_path = tmp_path / "shard-00000.tar"
    with tarfile.open(tar_path, "w") as tf:
        for i in range(5):
            buf = io.BytesIO()
            Image.fromarray(np.full((9, 9, 3), 40 * i, np.uint8)).save(buf, format="PNG")
            info = tarfile.TarInfo(f"{i:04d}.png")
            info.size = len(buf.getvalue())
            tf.addfile(info, io.BytesIO(buf.getvalue()))
    tar = open_source(tar_path, normalizer=None)
    batch = next(iter(PairDataset(tar, 5, 8, shuffle=False, require_captions=False)))
    assert torch.allclose(batch.pixels[:, 0, 0, 0], torch.tensor([0, 40, 80, 120, 160]) / 255.0)
    with pytest.raises(InputError, match="no usable"):
        PairDataset(tar, 5, 8)

    # The same files fail every epoch: a warning the first time, then quietly (debug).
    caplog.set_level(logging.DEBUG, logger="dallemini.data.pairs")
    caplog.clear()
    list(images(epochs=3))
    reports = [r for r in caplog.records if "skipped 2 images" in r.getMessage()]
    assert [r.levelno for r in reports] == [logging.WARNING, logging.DEBUG, logging.DEBUG]


def test_streamed_images_resume_exactly_split_ranks_and_hold_few_records(tmp_path: Path) -> None:
    folder = _folder_with_oddities(tmp_path / "imgs")
    source = FolderSource(folder, normalizer=None)

    def stream(src: Source = source, **kw: Any) -> PairDataset:
        base = dict(seed=1, shuffle_buffer=5, require_captions=False)
        return PairDataset(src, 4, 8, **{**base, **kw})

    s = stream()
    it = iter(s)
    first = [next(it) for _ in range(3)]
    saved = s.state_dict()
    rest = [next(it) for _ in range(5)]  # 21 decodable images, 5 batches an epoch: into epoch 1
    assert s.epoch == 1
    assert all(b.pixels.shape == (4, 3, 8, 8) for b in first + rest)
    resumed = stream()
    resumed.load_state_dict({**saved, "rank": 0})
    it = iter(resumed)
    assert all(torch.equal(a.pixels, next(it).pixels) for a in rest)
    assert resumed.state_dict() == s.state_dict()
    with pytest.raises(ConfigError, match="shuffle_buffer changed"):
        stream(shuffle_buffer=6).load_state_dict(saved)
    with pytest.raises(ConfigError, match="shuffle_buffer changed"):
        stream(shuffle_buffer=None).load_state_dict(saved)

    # A local shuffle: item i comes out at position >= i - 5; each epoch has its own order.
    order = s.rank_items(0)
    assert sorted(order.tolist()) == list(range(23))
    assert all(pos >= item - 5 for pos, item in enumerate(order.tolist()))
    assert order.tolist() != s.rank_items(1).tolist()
    # Without shuffling it reads the source order: the same batches as the in-memory index.
    plain = PairDataset(source, 4, 8, shuffle=False, require_captions=False)
    for a, b, _ in zip(stream(shuffle=False), plain, range(6), strict=False):
        assert torch.equal(a.pixels, b.pixels) and torch.equal(a.record, b.record)

    # Rank r of 2 takes records r, r+2, ...; together they read every decodable image once.
    seen = []
    for rank in (0, 1):
        part = stream(rank=rank, world_size=2, epochs=1, drop_last=False)
        assert part.rank_items(0).tolist()[:3] != list(range(rank, 6, 2))  # shuffled
        assert set(part.rank_items(0).tolist()) == set(range(rank, 23, 2))
        seen.append({part.records[int(r)].key for b in part for r in b.record})
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 21

    # Streaming holds about shuffle_buffer records at a time; the in-memory index holds them all.
    watched = _Watched(source)
    held = []
    for _ in stream(watched, epochs=2, drop_last=False):
        held.append(watched.alive)
    assert max(held) <= 5 + 3, held
    indexed = _Watched(source)
    ds = PairDataset(indexed, 4, 8, require_captions=False)
    next(iter(ds))
    assert indexed.alive == 23


# --- training ------------------------------------------------------------------------------------
def test_l1_falls_gan_starts_after_disc_start_and_export_encodes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_images(tmp_path / "imgs")
    run = tmp_path / "run"
    cfg = _cfg(data, run, eval_holdout=8, sample_every=15, tensorboard=True)
    caplog.set_level(logging.INFO, logger="dallemini.train")
    trainer = VQGANTrainer(cfg)
    before = trainer.evaluate()
    last = trainer.fit()
    assert last["eval/l1"] < 0.85 * before["l1"], (before, last)
    assert last["eval/psnr"] > before["psnr"] + 1.0
    assert last["train/images_per_s"] > 0 and last["train/d_weight"] > 0
    lines = {
        int(m.group(1)): r.getMessage()
        for r in caplog.records
        if (m := re.match(r"step (\d+)/30 ", r.getMessage()))
    }
    assert sorted(lines) == [5, 10, 15, 20, 25, 30]
    assert all(" d_loss " not in lines[s] and " g_loss " not in lines[s] for s in (5, 10, 15, 20))
    assert all(" d_loss " in lines[s] and " d_weight " in lines[s] for s in (25, 30))
    warned = [r for r in caplog.records if "without the perceptual term" in r.getMessage()]
    assert len(warned) == 1
    for step in (15, 30):
        with Image.open(run / "samples" / f"step-{step:06d}.png") as im:
            assert im.size == (8 * RES, 2 * RES)  # originals above reconstructions
    assert any((run / "logs").glob("events.out.tfevents.*"))

    final = load_file(str(run / "checkpoints" / "step-000030" / "model.safetensors"))
    vq = load_vqgan(run / "model", device="cpu")
    assert all(torch.equal(v, final[k]) for k, v in vq.state_dict().items())
    assert json.loads((run / "model" / "config.json").read_text())["bart"] is None
    images = next(iter(PairDataset(FolderSource(data), 4, RES, shuffle=False))).pixels
    assert vq.encode(images).shape == (4, RES // 2, RES // 2)

    from tests.test_cli import run_here

    code, err = run_here(
        capsys, "encode", data, tmp_path / "enc", "--model", run / "model", "--device", "cpu"
    )
    assert code == 0, err
    assert json.loads((tmp_path / "enc" / "dataset.json").read_text())["count"] == 32


def test_finetune_from_model_dir_with_lpips_and_taming_discriminator(tmp_path: Path) -> None:
    data = write_images(tmp_path / "imgs", n=16, size=RES)
    torch.manual_seed(1)
    vq_cfg = VQGANConfig.from_dict({**VQGANConfig().to_dict(), **TINY_VQGAN, "pixel_range": "-1,1"})
    start = VQGAN(vq_cfg).state_dict()
    model_dir = save_model_dir(tmp_path / "start", PipelineConfig(vqgan=vq_cfg), {"vqgan": start})
    disc = PatchDiscriminator(3, 8, 2).state_dict()
    ckpt = tmp_path / "taming.ckpt"
    torch.save({"state_dict": {f"loss.discriminator.{k}": v for k, v in disc.items()}}, ckpt)
    lp = LPIPS().state_dict()
    torch.save({k: v for k, v in lp.items() if k.startswith("features.")}, tmp_path / "vgg16.pth")
    torch.save({k: v.abs() for k, v in lp.items() if k.startswith("lin")}, tmp_path / "vgg.pth")

    with pytest.raises(ConfigError, match="cannot apply to --model"):
        _cfg(data, tmp_path / "x", model=str(model_dir))  # the tiny shape overrides
    cfg = _cfg(
        data,
        tmp_path / "run",
        vqgan={},
        preset="f16_16384",
        model=str(model_dir),
        discriminator=str(ckpt),
        lpips_vgg=str(tmp_path / "vgg16.pth"),
        lpips_lin=str(tmp_path / "vgg.pth"),
        disc_start=0,
        disc_lr=2e-4,
        steps=3,
    )
    trainer = VQGANTrainer(cfg)
    assert all(torch.equal(v, start[k]) for k, v in trainer.vqgan.state_dict().items())
    got = trainer.loss.discriminator.state_dict()
    assert got.keys() == disc.keys() and all(torch.equal(got[k], disc[k]) for k in disc)
    assert trainer.lr("discriminator") == 2e-4 and trainer.lr("model") == 1e-3
    last = trainer.fit()
    assert last["train/perceptual"] > 0 and "train/d_loss" in last
    out = load_vqgan(tmp_path / "run" / "model")
    assert out.config == vq_cfg
    assert any(not torch.equal(v, start[k]) for k, v in out.state_dict().items())


def test_decoder_only_finetune_keeps_every_code(tmp_path: Path) -> None:
    data = write_images(tmp_path / "imgs")
    torch.manual_seed(2)
    vq_cfg = VQGANConfig.from_dict({**VQGANConfig().to_dict(), **TINY_VQGAN})
    start = VQGAN(vq_cfg).state_dict()
    model_dir = save_model_dir(tmp_path / "start", PipelineConfig(vqgan=vq_cfg), {"vqgan": start})
    kw: dict[str, Any] = dict(vqgan={}, model=str(model_dir), steps=4, disc_start=100)
    cfg = _cfg(data, tmp_path / "run", train_encoder=False, **kw)
    trainer = VQGANTrainer(cfg)
    trainer.fit()
    out = load_vqgan(tmp_path / "run" / "model").state_dict()
    fixed = ("encoder.", "quant_conv.", "quantize.")
    assert all(torch.equal(v, start[k]) for k, v in out.items() if k.startswith(fixed))
    assert any(not torch.equal(v, start[k]) for k, v in out.items() if k.startswith("decoder."))
    for name, bad in (("model", {"model": None}), ("quantize_start", {"quantize_start": 2})):
        with pytest.raises(ConfigError, match=name):
            _cfg(data, tmp_path / "x", **{**kw, "train_encoder": False, **bad})


def test_cli_train_vqgan_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.test_cli import run_here

    code, err = run_here(capsys, "train-vqgan", "--out", tmp_path / "x")
    assert code == 2 and "data must name" in err
    code, err = run_here(capsys, "train-vqgan", "--data", tmp_path, "--model-preset", "huge")
    assert code == 2 and "unknown VQGAN preset" in err
    data = write_images(tmp_path / "imgs", n=4, size=RES)
    code, err = run_here(
        capsys, "train-vqgan", "--data", data, "--out", tmp_path / "z", "--set", "vqgan.chh=1"
    )
    assert code == 2 and "vqgan: unknown field" in err
    code, err = run_here(
        capsys,
        *_cli_args(data, tmp_path / "y", 1, ["--set", "eval_holdout=4"]),
    )
    assert code == 2 and "would leave none" in err


@pytest.mark.slow
def test_dead_codes_restart_onto_probe_latents(tmp_path: Path) -> None:
    data = write_images(tmp_path / "imgs")

    def collapsed(out: Path) -> VQGANTrainer:
        t = VQGANTrainer(_cfg(data, out, codebook_restart_every=2, codebook_restart_probe=16))
        weight = t.vqgan.quantize.embedding.weight
        with torch.no_grad():
            weight[1:] = 1e3  # every latent is nearest to entry 0: the rest are dead
        state = t.optims["model"].optimizer.state[weight] = {
            "exp_avg": torch.ones_like(weight),
            "exp_avg_sq": torch.ones_like(weight),
            "step": torch.tensor(1.0),
        }
        assert state["exp_avg"].sum() > 0
        t.step = 2
        return t

    a, b = collapsed(tmp_path / "a"), collapsed(tmp_path / "b")
    assert a._restart_due()
    logs = a.restart_dead_codes()
    assert logs == {"codes_restarted": 31.0, "codes_used": 1.0}
    weight = a.vqgan.quantize.embedding.weight.detach()
    assert (weight[1:] < 100).all()  # moved off the dead value onto latents
    probe = a._probe_images()
    with torch.no_grad():
        z = a.vqgan.encode_latents(probe).permute(0, 2, 3, 1).reshape(-1, weight.shape[1])
    # each restarted entry is one of the probe's latents
    assert all(bool((z - row).abs().amax(1).min() < 1e-6) for row in weight[1:])
    state = a.optims["model"].optimizer.state[a.vqgan.quantize.embedding.weight]
    assert state["exp_avg"][1:].abs().sum() == 0 and state["exp_avg"][0].abs().sum() > 0
    # the same (seed, step) draws the same latents in another trainer, so every rank agrees
    b.restart_dead_codes()
    assert torch.equal(weight, b.vqgan.quantize.embedding.weight.detach())
    assert a.restart_dead_codes()["codes_restarted"] < 31  # now in use
    a.step = 3
    assert not a._restart_due()
    with pytest.raises(ConfigError, match="codebook_restart_probe"):
        _cfg(data, tmp_path / "c", codebook_restart_probe=0)


def test_spread_pick_gives_a_mass_of_equal_latents_one_entry() -> None:
    z = torch.cat([torch.zeros(5000, 4), torch.randn(300, 4) + 3.0])
    pick = spread_pick(z, 64, torch.Generator().manual_seed(0))
    assert pick.shape == (64,) and int((pick < 5000).sum()) <= 1
    again = spread_pick(z, 64, torch.Generator().manual_seed(0))
    assert torch.equal(pick, again)
    assert spread_pick(torch.zeros(3, 2), 8, torch.Generator().manual_seed(0)).shape == (8,)


def test_quantize_warmup_then_codebook_seeded_from_latents(tmp_path: Path) -> None:
    data = write_images(tmp_path / "imgs")
    t = VQGANTrainer(_cfg(data, tmp_path / "a", quantize_start=2, codebook_restart_probe=16))
    quant = t.vqgan.quantize
    before = quant.embedding.weight.detach().clone()
    logs = t.train_step()
    assert logs["codebook"] == 0.0 and "codes_restarted" not in logs
    assert torch.equal(quant.embedding.weight.detach(), before)  # not in use: not trained
    t.step = 2
    logs = t.train_step()
    assert logs["codes_restarted"] == quant.n_embed and logs["codebook"] > 0
    # the seeding itself: every entry becomes one of the probe's latents, spread over them
    t.restart_dead_codes(every_code=True)
    with torch.no_grad():
        z = (
            t.vqgan.encode_latents(t._probe_images())
            .permute(0, 2, 3, 1)
            .reshape(-1, quant.embed_dim)
        )
    weight = quant.embedding.weight.detach()
    assert float(torch.cdist(weight, z).amin(1).max()) < 1e-3  # cdist rounding
    assert len(torch.unique(weight, dim=0)) > quant.n_embed // 2
    with pytest.raises(ConfigError, match="quantize_start"):
        _cfg(data, tmp_path / "c", quantize_start=-1)


def test_kill9_then_resume_matches_uninterrupted(tmp_path: Path) -> None:
    data = write_images(tmp_path / "imgs")
    steps = 48
    extra = ["--set", "save_every=6", "--set", "keep_last=0", "--set", "disc_start=9"]
    # restarts and the quantization warm-up's codebook seeding resume exactly too
    extra += ["--set", "codebook_restart_every=5", "--set", "quantize_start=4"]

    def command(out: Path, more: list[str]) -> list[str]:
        return [sys.executable, "-m", "dallemini.cli", *_cli_args(data, out, steps, extra + more)]

    ta, tb = kill9_resume_and_compare(command, tmp_path, steps)
    da, db = ta["modules"]["discriminator"], tb["modules"]["discriminator"]
    assert da.keys() == db.keys() and all(torch.equal(da[k], db[k]) for k in da)
    assert ta["data"]["epoch"] >= 1


@pytest.mark.slow
def test_torchrun_two_ranks(tmp_path: Path) -> None:
    data = write_images(tmp_path / "imgs")
    # No shuffling: rank r takes records r, r+2, ..., so 2 ranks x 4 images see what one process
    # with batches of 8 sees. Before the GAN starts the losses are batch means, so the weights agree;
    # after it, each rank's adaptive weight is its own, and the run only has to work.
    common = ["--set", "shuffle_buffer=0", "--set", "keep_last=0", "--set", "save_every=3"]
    common += ["--set", "disc_start=3", "--set", "log_every=1"]
    two = _cli_args(data, tmp_path / "two", 6, [*common, "--set", "grad_accum=2"])
    two[two.index("--batch-size") + 1] = "2"
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
    ]
    r = subprocess.run(
        [*launch, "-m", "dallemini.cli", *two],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    final = re.search(r"step 6/6 .*", r.stderr)
    assert final and " d_loss " in final.group(0), r.stderr[-3000:]
    assert float(re.search(r" d_weight (\S+)", final.group(0)).group(1)) > 0
    state = json.loads(
        (tmp_path / "two" / "checkpoints" / "step-000006" / "state.json").read_text()
    )
    assert state["extra"]["world_size"] == 2
    assert load_vqgan(tmp_path / "two" / "model").config.n_embed == 32

    one = VQGANTrainer(
        _cfg(data, tmp_path / "one", steps=3, disc_start=3, shuffle_buffer=0, save_every=3)
    )
    one.fit()
    a = load_file(str(tmp_path / "one" / "checkpoints" / "step-000003" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "checkpoints" / "step-000003" / "model.safetensors"))
    assert a.keys() == b.keys()
    # Adam's first steps are about lr * sign(gradient), so the few weights whose gradient is 0 up to
    # float noise (e.g. the attention key bias, which softmax ignores) may move either way; every
    # other weight must agree. (A one-process run on other images disagrees on ~96% of them.)
    off = sum(int((~torch.isclose(a[k], b[k], rtol=1e-4, atol=2e-5)).sum()) for k in a)
    total = sum(v.numel() for v in a.values())
    assert off <= 1e-3 * total, (off, total)
