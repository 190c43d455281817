"""Where training metrics go: TensorBoard event files, Weights & Biases (opt-in) and a progress display.

Only rank 0 makes a Tracker that writes; the others get a silent one. On a terminal progress is a tqdm
bar with loss, lr, throughput and ETA; elsewhere (CI, log files) it is one plain line per log interval.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..errors import ConfigError
from ..extras import needs_extra

log = logging.getLogger("dallemini.train")


def _fmt(value: float) -> str:
    return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"


class Tracker:
    """Scalars to TensorBoard (+ wandb) and a progress display; all methods are no-ops when not `active`."""

    def __init__(
        self,
        log_dir: Path,
        total_steps: int,
        start_step: int = 0,
        *,
        active: bool = True,
        tensorboard: bool = True,
        wandb: bool = False,
        wandb_project: str = "dallemini",
        config: dict[str, Any] | None = None,
        progress: bool | None = None,
    ) -> None:
        self.active = active
        self.total = total_steps
        self.start_step = start_step
        self.started = time.perf_counter()
        self.writer = None
        self.run = None
        self.bar = None
        if not active:
            return
        log_dir.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            with needs_extra("TensorBoard logging"):
                # optional extra [train]: only training writes TensorBoard event files
                from tensorboardX import SummaryWriter
            self.writer = SummaryWriter(str(log_dir), purge_step=start_step or None)
        if wandb:
            try:
                import wandb as wandb_lib  # optional extra: only --wandb needs it
            except ImportError as e:
                raise ConfigError(
                    "--wandb needs the wandb package: pip install 'dallemini[wandb]' "
                    "(set WANDB_MODE=offline to log without an account)"
                ) from e
            self.run = wandb_lib.init(
                project=wandb_project, dir=str(log_dir), config=config or {}, resume="allow"
            )
        if progress is None:
            progress = sys.stderr.isatty()
        if progress:
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Record scalars under their names (e.g. 'train/loss', 'eval/loss') at a step."""
        if not self.active:
            return
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)
        if self.run is not None:
            self.run.log(values, step=step)

    def progress(self, step: int, values: dict[str, float]) -> None:
        """Show progress after `step` updates: bar postfix on a TTY, else one log line with the ETA."""
        if not self.active:
            return
        shown = {k.split("/")[-1]: v for k, v in values.items()}
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix({k: _fmt(v) for k, v in shown.items()}, refresh=True)
            return
        done = step - self.start_step
        elapsed = time.perf_counter() - self.started
        eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
        fields = " ".join(f"{k} {_fmt(v)}" for k, v in shown.items())
        log.info("step %d/%d %s eta %s", step, self.total, fields, _duration(eta))

    def message(self, text: str) -> None:
        """A line for the user that does not break the progress bar."""
        if not self.active:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            log.info(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.run is not None:
            self.run.finish()


def _duration(seconds: float) -> str:
    if seconds != seconds:  # NaN
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
