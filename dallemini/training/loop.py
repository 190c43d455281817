"""The training loop every trainer shares: gradient accumulation, mixed precision, clipping, EMA,
schedules, periodic logging/evaluation/samples, and exactly resumable checkpoints. Config files and
`--set` overrides are read by `settings`.

A trainer subclasses `Trainer`, registers its modules in `setup()` (`add_module`), sets `self.data` (an
iterable with `state_dict()`/`load_state_dict()`, e.g. `ShardDataset`) and implements `compute_loss`
(or the whole `train_step` when it has several optimizers, as the VQGAN/GAN trainer does). Randomness
inside a step comes from `step_generator()`, seeded by (seed, step, rank), so that a resumed run draws
exactly what the uninterrupted run would have drawn.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import CheckpointError, ConfigError
from ..memory import keep_freed_memory
from ..threads import settle, tuning
from . import distributed as D
from .checkpointing import (
    list_checkpoints,
    load_checkpoint,
    remove_stale_temps,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .optim import EMA, build_optimizer
from .schedule import make_scheduler
from .tracker import Tracker

log = logging.getLogger("dallemini.train")

PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
CONFIG_NAME = "train_config.json"


def option(default: Any, help: str, flag: str | None = None) -> Any:
    """A config field that is also an option of its trainer's command (built by `training.cli`):
    `help` is the option's help text, `flag` its name when not --field-name. A subclass that only
    gives the field another default keeps the option."""
    return dataclasses.field(default=default, metadata={"help": help, "cli": True, "flag": flag})


@dataclass
class TrainConfig:
    """Settings every trainer shares; trainers extend it with their own fields. Fields made with
    `option` are also command-line options (None there: keep the config file's value)."""

    out: str = option("runs/train", "run folder: checkpoints, logs, model")
    steps: int = option(1000, "optimizer updates")
    # global batch = batch_size × grad_accum × ranks
    batch_size: int = option(8, "per-rank micro-batch")
    grad_accum: int = option(1, "micro-batches per update")
    optimizer: str = "adafactor"
    lr: float = option(5e-3, "peak learning rate")
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    warmup_steps: int = 0
    decay: str = "linear"
    min_lr_ratio: float = 0.0
    clip_grad: float = 1.0  # max global grad norm; 0 = off
    # float32 is no autocast; float16 comes with loss scaling
    precision: str = option("float32", "float32, bfloat16 or float16 autocast")
    ema_decay: float = 0.0  # 0 = no EMA; e.g. 0.999
    log_every: int = 10
    eval_every: int = 0  # 0 = only at the end (when there is evaluation data)
    sample_every: int = 0  # 0 = only at the end
    save_every: int = 500
    keep_last: int = 3
    seed: int = option(0, "seed of everything random")
    device: str = option("auto", "auto, cpu, cuda, mps")
    distributed: str = "ddp"  # ddp or fsdp (fully_shard, for models too big to replicate)
    deterministic: bool = False
    resume: bool = option(False, "continue the run in --out")
    tensorboard: bool = True
    wandb: bool = option(False, "also log to Weights & Biases")
    wandb_project: str = "dallemini"

    def validate(self) -> None:
        """Reject settings that cannot work, naming the field."""
        for name in ("steps", "batch_size", "grad_accum", "log_every", "save_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "sample_every", "keep_last"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}"
            )
        if self.distributed not in D.STRATEGIES:
            raise ConfigError(
                f"distributed must be one of {D.STRATEGIES}, got {self.distributed!r}"
            )
        if self.clip_grad < 0:
            raise ConfigError(f"clip_grad must be >= 0, got {self.clip_grad}")
        if self.ema_decay and not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay must be 0 (off) or in (0, 1), got {self.ema_decay}")
        if self.distributed == "fsdp" and self.optimizer == "adafactor":
            raise ConfigError(
                "distributed=fsdp needs optimizer=adamw: Adafactor's factored statistics need whole "
                "rows and columns, which FSDP shards"
            )
        if self.ema_decay and self.distributed == "fsdp":
            raise ConfigError("ema_decay is not supported with distributed=fsdp; use ddp or no EMA")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class _Optim:
    module: str
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler


class Trainer:
    """Base trainer: subclasses build modules and data in `setup()` and define the loss (see module doc)."""

    config_class: type[TrainConfig] = TrainConfig
    main_module = "model"

    def __init__(self, cfg: TrainConfig, env: D.DistEnv | None = None) -> None:
        cfg.validate()
        keep_freed_memory()  # every step allocates the same large blocks again
        self.cfg = cfg
        self.env = env if env is not None else D.init_distributed(cfg.device)
        self.device = self.env.device
        self.out = Path(cfg.out)
        self.ckpt_dir = self.out / "checkpoints"
        self.step = 0
        self.modules: dict[str, nn.Module] = {}
        self.wrapped: dict[str, nn.Module] = {}
        self.optims: dict[str, _Optim] = {}
        self.ema: EMA | None = None
        self.data: Any = None
        self._data_iter: Iterator[Any] | None = None
        self.autocast_dtype = PRECISIONS[cfg.precision]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "float16")
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        torch.manual_seed(cfg.seed)  # every rank starts from the same initial weights
        self.tracker = Tracker(self.out / "logs", cfg.steps, active=False)
        self.setup()
        if self.main_module not in self.modules:
            raise ConfigError(
                f"{type(self).__name__}.setup() registered no {self.main_module!r} module"
            )
        if cfg.ema_decay:
            self.ema = EMA(self.modules[self.main_module], cfg.ema_decay)

    # --- what subclasses provide ----------------------------------------------------------------
    def setup(self) -> None:
        """Build modules (`add_module`) and `self.data`."""
        raise NotImplementedError

    def compute_loss(self, batch: Any) -> tuple[Tensor, dict[str, float]]:
        """(loss to minimise, metrics) for one micro-batch; metrics named n_* are counts and are summed."""
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics (called on every rank; reduce across ranks inside). Empty when there is nothing to evaluate."""
        return {}

    def sample(self, step: int) -> Path | None:
        """Write samples made with the current weights (called on every rank; rank 0 writes)."""
        return None

    def export(self, state: dict[str, Tensor]) -> Path | None:
        """Write the final model (rank 0 only) from the main module's full weights (EMA when enabled)."""
        return None

    # --- registration ---------------------------------------------------------------------------
    def add_module(
        self,
        name: str,
        module: nn.Module,
        *,
        train: bool = True,
        lr: float | None = None,
        no_decay: Callable[[str, Tensor], bool] | None = None,
    ) -> nn.Module:
        """Move a module to the device, wrap it for DDP/FSDP and give it an optimizer + schedule when trained.

        `no_decay(param_name, param)` picks parameters that get no weight decay (e.g. gains and biases).
        """
        cfg = self.cfg
        module = module.to(self.device)
        self.modules[name] = module
        if not train:
            module.requires_grad_(False).eval()
            self.wrapped[name] = module
            return module
        wrapped = D.wrap_model(module, self.env, cfg.distributed)
        self.wrapped[name] = wrapped
        params: Any = wrapped.parameters()
        if no_decay is not None:
            named = list(wrapped.named_parameters())
            params = [
                {"params": [p for n, p in named if not no_decay(n, p)]},
                {"params": [p for n, p in named if no_decay(n, p)], "weight_decay": 0.0},
            ]
        opt = build_optimizer(
            params,
            cfg.optimizer,
            lr if lr is not None else cfg.lr,
            cfg.weight_decay,
            (cfg.beta1, cfg.beta2),
        )
        sched = make_scheduler(opt, cfg.warmup_steps, cfg.steps, cfg.decay, cfg.min_lr_ratio)
        self.optims[name] = _Optim(name, opt, sched)
        return wrapped

    # --- helpers for a step ---------------------------------------------------------------------
    def autocast(self) -> AbstractContextManager[Any]:
        """Mixed precision for the forward pass when `precision` is not float32."""
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def step_generator(
        self, tag: str = "", device: torch.device | None = None, shared: bool = False
    ) -> torch.Generator:
        """A generator seeded by (seed, step, rank, tag): per-step randomness that resumes exactly.

        `shared`: the rank is left out, so every rank draws the same numbers.
        """
        rank = "" if shared else f"{self.env.rank}/"
        h = hashlib.sha256(f"{self.cfg.seed}/{self.step}/{rank}{tag}".encode()).digest()
        g = torch.Generator(device=device or "cpu")
        g.manual_seed(int.from_bytes(h[:8], "little") & (2**63 - 1))
        return g

    def next_batch(self) -> Any:
        """The next training batch; the data position advances with it (and is saved in checkpoints)."""
        if self._data_iter is None:
            self._data_iter = iter(self.data)
        try:
            return next(self._data_iter)
        except StopIteration:
            raise ConfigError("the training data ran out; use more data or epochs") from None

    def backward(self, loss: Tensor) -> None:
        """Backward through the loss scaler (a no-op scale unless precision is float16)."""
        self.scaler.scale(loss).backward()

    def optimizer_step(self, name: str | None = None) -> float:
        """Unscale, clip, step and zero one module's optimizer, advance its schedule; returns the grad norm."""
        name = name or self.main_module
        o = self.optims[name]
        self.scaler.unscale_(o.optimizer)
        params = [p for g in o.optimizer.param_groups for p in g["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.clip_grad or math.inf)
        self.scaler.step(o.optimizer)
        o.optimizer.zero_grad(set_to_none=True)
        o.scheduler.step()
        if self.ema is not None and name == self.main_module:
            self.ema.update()
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def train_step(self) -> dict[str, float]:
        """One optimizer update of the main module over `grad_accum` micro-batches."""
        accum = self.cfg.grad_accum
        model = self.wrapped[self.main_module]
        logs: dict[str, float] = defaultdict(float)
        for i in range(accum):
            batch = self.next_batch()
            with D.gradient_sync(model, i == accum - 1), self.autocast():
                loss, metrics = self.compute_loss(batch)
            self.backward(loss / accum)
            for k, v in metrics.items():
                logs[k] += v if k.startswith("n_") else v / accum
        logs["grad_norm"] = self.optimizer_step()
        return logs

    def lr(self, name: str | None = None) -> float:
        return self.optims[name or self.main_module].optimizer.param_groups[0]["lr"]

    def swap_ema(self) -> AbstractContextManager[Any]:
        """The EMA weights in the main module for the duration (nothing without EMA)."""
        return self.ema.swapped_in() if self.ema is not None else nullcontext()

    # --- checkpoints ----------------------------------------------------------------------------
    def save(self) -> Path | None:
        """Write step-NNNNNN/ (rank 0) from full states gathered on every rank."""
        main = self.wrapped[self.main_module]
        model_state = D.full_model_state(main)
        trainer: dict[str, Any] = {
            "optimizers": {
                n: D.full_optimizer_state(self.wrapped[o.module], o.optimizer)
                for n, o in self.optims.items()
            },
            "schedulers": {n: o.scheduler.state_dict() for n, o in self.optims.items()},
            "scaler": self.scaler.state_dict(),
            "modules": {
                n: D.full_model_state(w) for n, w in self.wrapped.items() if n != self.main_module
            },
            "rng": rng_state(),
            "data": self.data.state_dict() if hasattr(self.data, "state_dict") else None,
        }
        if self.ema is not None:
            trainer["ema"] = self.ema.state_dict()
        path = None
        if self.env.is_main:
            path = save_checkpoint(
                self.ckpt_dir,
                self.step,
                model_state,
                trainer,
                extra={
                    "config": self.cfg.to_dict(),
                    "world_size": self.env.world_size,
                    "threads": torch.get_num_threads(),
                },
                keep_last=self.cfg.keep_last or None,
            )
        D.barrier(self.env)
        return path

    def load(self) -> int:
        """Restore the newest complete checkpoint (a broken newest one is skipped with a warning)."""
        ckpt = load_checkpoint(self.ckpt_dir)
        saved_world = ckpt.extra.get("world_size", 1)
        t = ckpt.trainer
        D.load_full_model_state(self.wrapped[self.main_module], ckpt.model)
        for n, state in t.get("modules", {}).items():
            if n in self.wrapped:
                D.load_full_model_state(self.wrapped[n], state)
        for n, o in self.optims.items():
            if n not in t["optimizers"]:
                raise CheckpointError(f"{ckpt.path}: no optimizer state for {n!r}")
            D.load_full_optimizer_state(self.wrapped[o.module], o.optimizer, t["optimizers"][n])
            o.scheduler.load_state_dict(t["schedulers"][n])
        self.scaler.load_state_dict(t["scaler"])
        if self.ema is not None:
            if "ema" not in t:
                raise CheckpointError(f"{ckpt.path} has no EMA weights but ema_decay is set")
            self.ema.load_state_dict(t["ema"])
        set_rng_state(t["rng"])
        if t.get("data") is not None and hasattr(self.data, "load_state_dict"):
            if saved_world != self.env.world_size:
                raise CheckpointError(
                    f"{ckpt.path} was written by {saved_world} rank(s); resume with the same number "
                    f"of ranks ({self.env.world_size} now) to continue the same data order"
                )
            self.data.load_state_dict({**t["data"], "rank": self.env.rank})
        self._data_iter = None
        self.step = ckpt.step
        self._resumed_threads = ckpt.extra.get("threads")
        return ckpt.step

    def settle_threads(self) -> None:
        """The run's CPU thread count, chosen once (threads.settle: one thread where other work
        holds a core) and kept by its resumes, so that a resumed run repeats the same arithmetic."""
        if not tuning("train"):
            return
        saved = getattr(self, "_resumed_threads", None)
        if isinstance(saved, int) and saved >= 1:
            torch.set_num_threads(saved)
            return
        # a product of one of the model's weights (at most 4M entries: a few ms) stands for a step;
        # a convolution's weight [out, in, kh, kw] as the matmul it is ([out, in * kh * kw]): a
        # VQGAN's only 2-D weight, its codebook, is a product too thin to show what threads give
        weights = [p for p in self.modules[self.main_module].parameters() if p.dim() >= 2]
        weights = [p for p in weights if p.numel() <= 1 << 22] or weights
        if not weights:
            return
        w = max(weights, key=lambda p: p.numel()).detach().flatten(1)
        x = torch.randn(256, w.shape[1], generator=torch.Generator().manual_seed(0)).to(w.dtype)

        def probe() -> None:
            for _ in range(8):
                torch.mm(x, w.t())

        n = settle("train", probe)
        log.info("training with %d CPU thread(s)", n)

    def _prepare_out(self) -> None:
        """Refuse to mix a new run into an old one; write the effective config next to the checkpoints."""
        has = bool(list_checkpoints(self.ckpt_dir))
        if has and not self.cfg.resume:
            raise ConfigError(
                f"{self.ckpt_dir} already holds checkpoints; pass --resume to continue that run "
                f"or choose another --out"
            )
        if self.env.is_main:
            if self.cfg.resume:  # only rank 0 writes checkpoints and the model: no temp is live
                self._remove_temps()
            self.out.mkdir(parents=True, exist_ok=True)
            tmp = self.out / f".{CONFIG_NAME}.tmp"
            tmp.write_text(json.dumps(self.cfg.to_dict(), indent=2) + "\n")
            tmp.replace(self.out / CONFIG_NAME)
        D.barrier(self.env)

    def _remove_temps(self) -> None:
        """Delete what killed runs left half-written: checkpoint temps and export temps (`.model.tmp-*`)."""
        remove_stale_temps(self.ckpt_dir, all_pids=True)
        if self.out.is_dir():  # export() writes out/model through save_model_dir's mkdtemp folder
            for p in self.out.glob(".model.tmp-*"):
                if p.is_dir() and not p.is_symlink():
                    log.info("removing %s, left by an export that did not finish", p)
                    shutil.rmtree(p, ignore_errors=True)

    # --- the loop -------------------------------------------------------------------------------
    def fit(self) -> dict[str, float]:
        """Train to `steps` updates (resuming when asked), then evaluate, sample and export; returns the last logs."""
        cfg = self.cfg
        self._prepare_out()
        if cfg.resume and list_checkpoints(self.ckpt_dir):
            self.load()
            log.info("resumed at step %d from %s", self.step, self.ckpt_dir)
        if self.device.type == "cpu":
            self.settle_threads()
        self.tracker = Tracker(
            self.out / "logs",
            cfg.steps,
            self.step,
            active=self.env.is_main,
            tensorboard=cfg.tensorboard,
            wandb=cfg.wandb,
            wandb_project=cfg.wandb_project,
            config=cfg.to_dict(),
        )
        for m in self.wrapped.values():
            if any(p.requires_grad for p in m.parameters()):
                m.train()
        window: dict[str, float] = defaultdict(float)
        seen: dict[str, int] = defaultdict(int)  # steps that logged each key (some only log later)
        seconds = 0.0  # throughput counts training time only, not saves or samples
        last: dict[str, float] = {}
        try:
            while self.step < cfg.steps:
                t0 = time.perf_counter()
                logs = self.train_step()
                self.scaler.update()
                seconds += time.perf_counter() - t0
                self.step += 1
                for k, v in logs.items():
                    window[k] += v
                    seen[k] += 1
                done = self.step == cfg.steps
                if self.step % cfg.log_every == 0 or done:
                    last = self._log_window(window, seen, seconds)
                    window, seen, seconds = defaultdict(float), defaultdict(int), 0.0
                if (cfg.eval_every and self.step % cfg.eval_every == 0) or done:
                    last.update(self._run_eval())
                if (cfg.sample_every and self.step % cfg.sample_every == 0) or done:
                    with self.swap_ema():
                        path = self.sample(self.step)
                    if path is not None:
                        self.tracker.message(f"samples: {path}")
                if self.step % cfg.save_every == 0 or done:
                    self.save()
            with self.swap_ema():
                state = D.full_model_state(self.wrapped[self.main_module])
            if self.env.is_main:
                path = self.export(state)
                if path is not None:
                    self.tracker.message(f"model: {path}")
            D.barrier(self.env)
        finally:
            self.tracker.close()
        return last

    def _log_window(
        self, window: dict[str, float], seen: dict[str, int], seconds: float
    ) -> dict[str, float]:
        keys = sorted(window)
        totals = D.all_reduce_sum(
            torch.tensor(
                [window[k] for k in keys] + [float(seen[k]) for k in keys], dtype=torch.float64
            ),
            self.env,
        ).tolist()
        out: dict[str, float] = {}
        for k, v, count in zip(keys, totals[: len(keys)], totals[len(keys) :], strict=True):
            if k.startswith("n_"):
                out[f"train/{k[2:]}_per_s"] = v / max(seconds, 1e-9)
            else:  # the mean over the steps (on all ranks) that logged it
                out[f"train/{k}"] = v / max(count, 1.0)
        for n in self.optims:
            out[f"train/lr_{n}" if len(self.optims) > 1 else "train/lr"] = self.lr(n)
        self.tracker.scalars(self.step, out)
        self.tracker.progress(self.step, out)
        return out

    def _run_eval(self) -> dict[str, float]:
        for m in self.wrapped.values():
            m.eval()
        try:
            with torch.no_grad(), self.swap_ema():
                metrics = self.evaluate()
        finally:
            for m in self.wrapped.values():
                if any(p.requires_grad for p in m.parameters()):
                    m.train()
        out = {f"eval/{k}": v for k, v in metrics.items()}
        if out:
            self.tracker.scalars(self.step, out)
            self.tracker.message(
                f"step {self.step} eval " + " ".join(f"{k[5:]} {v:.4g}" for k, v in out.items())
            )
        return out
